//! Camera health: each camera is `online` or `offline` (or `unknown` until first checked) with
//! the age of its last good frame and the reason it is offline. Inspections and idle probes
//! report into a [`Monitor`]; it decides the transitions, logs them (WARN when a camera goes,
//! INFO when it comes back) and sends [`CameraEvent`]s to every subscriber. Time is an explicit
//! `now` (a monotonic reading), so transitions are tested without sleeping.
//!
//! The monitor is cheap to clone and safe to share between threads: the daemon can subscribe
//! and take snapshots on one thread while inspections and probes feed it on others.

use std::collections::BTreeMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use super::CaptureError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not checked since the kiosk started.
    Unknown,
    Online,
    Offline,
}

/// A transition, for `camera_online` / `camera_offline` events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CameraEvent {
    Online { camera: String },
    Offline { camera: String, reason: String },
}

/// One camera as `state.cameras` and `capture-kiosk cameras` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CameraHealth {
    pub camera: String,
    pub status: Status,
    /// Seconds since the last good frame or probe; `None` when there has been none.
    pub last_frame_age_s: Option<u64>,
    /// Why the camera is offline.
    pub reason: Option<String>,
}

/// How a failure counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The camera is not there (unplugged, unreachable, not answering): offline at once.
    Gone,
    /// The camera answered with a bad frame: offline after `bad_frames_to_offline` in a row.
    BadFrame,
}

impl Failure {
    pub fn of(e: &CaptureError) -> Failure {
        match e {
            CaptureError::NoDevice { .. } | CaptureError::Unreachable { .. } => Failure::Gone,
            _ => Failure::BadFrame,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How often an idle camera is probed.
    pub probe_interval: Duration,
    /// Bad frames in a row that take a camera offline.
    pub bad_frames_to_offline: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { probe_interval: Duration::from_secs(10), bad_frames_to_offline: 3 }
    }
}

struct Entry {
    status: Status,
    last_good: Option<Duration>,
    last_check: Option<Duration>,
    bad_in_a_row: u32,
    reason: Option<String>,
}

struct Inner {
    policy: Policy,
    cameras: BTreeMap<String, Entry>,
    subscribers: Vec<mpsc::Sender<CameraEvent>>,
}

#[derive(Clone)]
pub struct Monitor {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").field("cameras", &self.lock().cameras.len()).finish()
    }
}

impl Monitor {
    pub fn new<S: AsRef<str>>(cameras: &[S], policy: Policy) -> Monitor {
        let cameras = cameras
            .iter()
            .map(|id| {
                (
                    id.as_ref().to_owned(),
                    Entry {
                        status: Status::Unknown,
                        last_good: None,
                        last_check: None,
                        bad_in_a_row: 0,
                        reason: None,
                    },
                )
            })
            .collect();
        Monitor { inner: Arc::new(Mutex::new(Inner { policy, cameras, subscribers: Vec::new() })) }
    }

    /// Events from now on. A receiver that is dropped is forgotten.
    pub fn subscribe(&self) -> mpsc::Receiver<CameraEvent> {
        let (tx, rx) = mpsc::channel();
        self.lock().subscribers.push(tx);
        rx
    }

    pub fn policy(&self) -> Policy {
        self.lock().policy
    }

    /// The camera gave a good frame (or passed a probe) at `now`.
    pub fn record_ok(&self, camera: &str, now: Duration) {
        let mut inner = self.lock();
        let Some(e) = inner.cameras.get_mut(camera) else { return };
        e.last_good = Some(now);
        e.last_check = Some(now);
        e.bad_in_a_row = 0;
        e.reason = None;
        if e.status != Status::Online {
            let was = e.status;
            e.status = Status::Online;
            if was == Status::Offline {
                log::info!(camera = camera; "Camera is back online");
            } else {
                log::info!(camera = camera; "Camera is online");
            }
            inner.send(CameraEvent::Online { camera: camera.to_owned() });
        }
    }

    /// The camera failed at `now` for `reason`.
    pub fn record_failure(&self, camera: &str, failure: Failure, reason: &str, now: Duration) {
        let mut inner = self.lock();
        let threshold = inner.policy.bad_frames_to_offline.max(1);
        let Some(e) = inner.cameras.get_mut(camera) else { return };
        e.last_check = Some(now);
        e.bad_in_a_row = e.bad_in_a_row.saturating_add(1);
        let goes = match failure {
            Failure::Gone => true,
            Failure::BadFrame => e.bad_in_a_row >= threshold,
        };
        if !goes {
            return;
        }
        let reason = match failure {
            Failure::Gone => reason.to_owned(),
            Failure::BadFrame => format!("{} bad frames in a row, the last: {reason}", e.bad_in_a_row),
        };
        e.reason = Some(reason.clone());
        if e.status != Status::Offline {
            e.status = Status::Offline;
            log::warn!(camera = camera, reason = reason.as_str(); "Camera is offline");
            inner.send(CameraEvent::Offline { camera: camera.to_owned(), reason });
        }
    }

    /// Records the result of a capture or probe.
    pub fn record(&self, camera: &str, result: &Result<(), CaptureError>, now: Duration) {
        match result {
            Ok(()) => self.record_ok(camera, now),
            Err(e) => self.record_failure(camera, Failure::of(e), &e.to_string(), now),
        }
    }

    /// Cameras to probe at `now`: never checked, or not checked for `probe_interval`.
    pub fn due(&self, now: Duration) -> Vec<String> {
        let inner = self.lock();
        let interval = inner.policy.probe_interval;
        inner
            .cameras
            .iter()
            .filter(|(_, e)| e.last_check.is_none_or(|t| now.saturating_sub(t) >= interval))
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn status(&self, camera: &str) -> Option<(Status, Option<String>)> {
        self.lock().cameras.get(camera).map(|e| (e.status, e.reason.clone()))
    }

    /// Every camera's health at `now`, in id order.
    pub fn snapshot(&self, now: Duration) -> Vec<CameraHealth> {
        self.lock()
            .cameras
            .iter()
            .map(|(id, e)| CameraHealth {
                camera: id.clone(),
                status: e.status,
                last_frame_age_s: e.last_good.map(|t| now.saturating_sub(t).as_secs()),
                reason: e.reason.clone(),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves the table whole: a panic elsewhere cannot corrupt it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn send(&mut self, event: CameraEvent) {
        self.subscribers.retain(|s| s.send(event.clone()).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn transitions_are_reported_once_each_and_bad_frames_need_a_streak() {
        let m = Monitor::new(&["front", "rear"], Policy { probe_interval: 10 * S, bad_frames_to_offline: 3 });
        let events = m.subscribe();
        assert_eq!(
            m.due(Duration::ZERO),
            vec!["front".to_owned(), "rear".to_owned()],
            "unchecked cameras are due"
        );
        m.record_ok("front", Duration::ZERO);
        m.record_ok("front", 1 * S);
        assert_eq!(events.try_recv(), Ok(CameraEvent::Online { camera: "front".into() }));
        assert!(events.try_recv().is_err(), "a camera that stays online is reported once");

        m.record_failure("front", Failure::BadFrame, "truncated", 2 * S);
        m.record_failure("front", Failure::BadFrame, "truncated", 3 * S);
        assert!(events.try_recv().is_err(), "two bad frames are not yet an outage");
        m.record_failure("front", Failure::BadFrame, "truncated", 4 * S);
        match events.try_recv() {
            Ok(CameraEvent::Offline { camera, reason }) => {
                assert_eq!(camera, "front");
                assert!(reason.contains("3 bad frames") && reason.contains("truncated"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        m.record_failure("rear", Failure::Gone, "unplugged", 4 * S);
        assert_eq!(
            events.try_recv(),
            Ok(CameraEvent::Offline { camera: "rear".into(), reason: "unplugged".into() })
        );
        m.record_failure("rear", Failure::Gone, "unplugged", 5 * S);
        assert!(events.try_recv().is_err(), "a camera that stays offline is reported once");

        let snap = m.snapshot(30 * S);
        assert_eq!(snap[0].status, Status::Offline);
        assert_eq!(snap[0].last_frame_age_s, Some(29), "age of the last good frame, at 1 s");
        assert_eq!((snap[1].status, snap[1].last_frame_age_s), (Status::Offline, None));

        m.record_ok("rear", 31 * S);
        assert_eq!(events.try_recv(), Ok(CameraEvent::Online { camera: "rear".into() }));
        assert_eq!(m.status("rear"), Some((Status::Online, None)));
    }

    #[test]
    fn probes_fall_due_after_the_interval_only() {
        let m = Monitor::new(&["a", "b"], Policy { probe_interval: 10 * S, bad_frames_to_offline: 1 });
        m.record_ok("a", 100 * S);
        m.record_failure("b", Failure::BadFrame, "garbage", 105 * S);
        assert_eq!(m.status("b").map(|s| s.0), Some(Status::Offline), "threshold 1");
        assert!(m.due(109 * S).is_empty());
        assert_eq!(m.due(110 * S), vec!["a".to_owned()]);
        assert_eq!(m.due(115 * S), vec!["a".to_owned(), "b".to_owned()]);
    }

    #[test]
    fn a_dropped_subscriber_does_not_stop_the_others() {
        let m = Monitor::new(&["a"], Policy::default());
        drop(m.subscribe());
        let live = m.subscribe();
        let other = m.clone();
        std::thread::spawn(move || other.record_failure("a", Failure::Gone, "down", S)).join().unwrap();
        assert!(matches!(live.try_recv(), Ok(CameraEvent::Offline { .. })));
        let json = serde_json::to_string(&m.snapshot(3 * S)).unwrap();
        assert!(json.contains("\"status\":\"offline\"") && json.contains("\"reason\":\"down\""), "{json}");
    }
}
