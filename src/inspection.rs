//! One inspection, from trigger to durable: every camera on a thread of its own, driven through
//! its angles in order, fetching frames (I/O) all at once; the frames go, in the order they
//! arrive, to a bounded pool of imaging workers (`[imaging] workers`, by default one per CPU)
//! that validate, decode, judge, resize, mask and encode them, so that no more frames are
//! decoded at once than there are workers whatever the number of cameras. Each frame is
//! re-captured when bad or when the quality gate finds it poor, and committed to the buffer as
//! soon as it is ready. An angle whose every capture is poor keeps its best frame, stored with
//! its scores and the reason. An angle that cannot be captured is marked failed with its reason
//! while the other angles carry on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::capture::health::{self, Failure, Monitor, Status};
use crate::capture::{self, Camera, CaptureError};
use crate::clock::Clock;
use crate::config::Config;
use crate::imaging::{self, CameraImaging, ResizeSpec};
use crate::store::{ImageQuality, InspectionId, InspectionState, NewImage, NewInspection, Store, StoreError};
use crate::vehicle::{CaseId, PhotoLabel, Vehicle};

/// The bay's cameras, each with the angles it shoots in order.
pub struct Rig {
    stations: Vec<Station>,
    monitor: Monitor,
    refuse_when_offline: bool,
    /// Imaging workers: frames decoded, resized and encoded at once.
    workers: usize,
}

struct Station {
    camera_id: String,
    angles: Vec<PhotoLabel>,
    camera: Box<dyn Camera>,
    /// The camera's quality thresholds and privacy masks.
    imaging: CameraImaging,
}

impl Rig {
    /// Opens every configured camera.
    pub fn open(config: &Config) -> Result<Rig, CaptureError> {
        let mut stations = Vec::with_capacity(config.cameras.len());
        for c in &config.cameras {
            stations.push(Station {
                camera_id: c.id.clone(),
                angles: c.angles.clone(),
                camera: capture::open(c)?,
                imaging: c.imaging(),
            });
        }
        let policy = health::Policy {
            probe_interval: config.inspection.camera_probe_interval,
            bad_frames_to_offline: config.inspection.bad_frames_to_offline,
        };
        let ids: Vec<&str> = stations.iter().map(|s| s.camera_id.as_str()).collect();
        let monitor = Monitor::new(&ids, policy);
        Ok(Rig {
            stations,
            monitor,
            refuse_when_offline: config.inspection.refuse_when_camera_offline,
            workers: config.imaging_workers.max(1),
        })
    }

    /// A rig from cameras made elsewhere (tests, benchmarks).
    pub fn from_cameras(cameras: Vec<(String, Vec<PhotoLabel>, Box<dyn Camera>)>) -> Rig {
        let stations: Vec<Station> = cameras
            .into_iter()
            .map(|(camera_id, angles, camera)| Station {
                camera_id,
                angles,
                camera,
                imaging: CameraImaging::default(),
            })
            .collect();
        let ids: Vec<&str> = stations.iter().map(|s| s.camera_id.as_str()).collect();
        let monitor = Monitor::new(&ids, health::Policy::default());
        Rig { stations, monitor, refuse_when_offline: false, workers: default_workers() }
    }

    /// Sets the number of imaging workers (at least 1; a rig made by `from_cameras` has one per
    /// CPU).
    pub fn with_workers(mut self, workers: usize) -> Rig {
        self.workers = workers.max(1);
        self
    }

    /// Sets a camera's quality thresholds and privacy masks (a rig made by `from_cameras` has the
    /// default thresholds and no masks). An unknown camera id changes nothing.
    pub fn with_imaging(mut self, camera_id: &str, imaging: CameraImaging) -> Rig {
        if let Some(station) = self.stations.iter_mut().find(|s| s.camera_id == camera_id) {
            station.imaging = imaging;
        }
        self
    }

    /// Replaces the health policy (a new monitor: earlier subscribers hear nothing more) and
    /// says whether an inspection that needs an offline camera is refused.
    pub fn with_health(mut self, policy: health::Policy, refuse_when_offline: bool) -> Rig {
        let ids: Vec<&str> = self.stations.iter().map(|s| s.camera_id.as_str()).collect();
        self.monitor = Monitor::new(&ids, policy);
        self.refuse_when_offline = refuse_when_offline;
        self
    }

    /// The cameras' health: subscribe to it for `camera_online` / `camera_offline` and take
    /// snapshots for `state.cameras`, from any thread.
    pub fn monitor(&self) -> Monitor {
        self.monitor.clone()
    }

    /// Probes, all at once, the cameras whose health check is due at `now` (monotonic, as the
    /// clock given to [`run`]) and records the results; call it every second or so while idle.
    /// Returns what was probed. A camera that came back is re-attached by its probe.
    pub fn probe_due(&mut self, now: Duration) -> Vec<(String, Result<(), CaptureError>)> {
        let due = self.monitor.due(now);
        let results: Vec<(String, Result<(), CaptureError>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .stations
                .iter_mut()
                .filter(|s| due.contains(&s.camera_id))
                .map(|s| scope.spawn(move || (s.camera_id.clone(), s.camera.probe())))
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        for (camera, result) in &results {
            self.monitor.record(camera, result, now);
        }
        results
    }

    /// Lets every camera get ready for `angles`, all cameras at once; returns the cameras that
    /// could not, with the reason (they will be tried again at capture time).
    pub fn warm_up(&mut self, angles: &[PhotoLabel]) -> Vec<(String, CaptureError)> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .stations
                .iter_mut()
                .map(|s| {
                    let mine: Vec<PhotoLabel> =
                        s.angles.iter().copied().filter(|a| angles.contains(a)).collect();
                    scope.spawn(move || (s.camera_id.clone(), s.camera.warm_up(&mine)))
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| match h.join() {
                    Ok((id, Err(e))) => Some((id, e)),
                    _ => None,
                })
                .collect()
        })
    }

    /// One frame of `camera_id` for the installer's camera page: downscaled to `spec`, masks
    /// filled and outlined, a dotted grid for aiming. Only its health is recorded; the frame
    /// itself goes nowhere but back to the caller.
    pub fn preview(
        &mut self,
        camera_id: &str,
        spec: &ResizeSpec,
        now: Duration,
    ) -> Result<crate::display::Preview, String> {
        let Some(station) = self.stations.iter_mut().find(|s| s.camera_id == camera_id) else {
            return Err(format!("no camera {camera_id:?} in this bay's configuration"));
        };
        let angle = station.angles.first().copied().unwrap_or(PhotoLabel::Front);
        let raw = station.camera.capture(angle);
        self.monitor.record(camera_id, &raw.as_ref().map(|_| ()).map_err(Clone::clone), now);
        let raw = raw.map_err(|e| e.to_string())?;
        let (processed, guides) = imaging::preview(&raw, spec, &station.imaging)
            .map_err(|e| format!("camera {camera_id}: its frame cannot be used: {e}"))?;
        Ok(crate::display::Preview {
            jpeg: guides,
            source_width: processed.source_width,
            source_height: processed.source_height,
            problems: processed.quality.reason(),
            quality: processed.quality.scores,
        })
    }

    /// The camera that shoots `angle`.
    pub fn camera_for(&self, angle: PhotoLabel) -> Option<&str> {
        self.stations.iter().find(|s| s.angles.contains(&angle)).map(|s| s.camera_id.as_str())
    }
}

/// What to capture.
#[derive(Debug, Clone)]
pub struct Request {
    pub case_id: CaseId,
    pub vehicle: Option<Vehicle>,
    /// The angles to capture; each must be shot by some camera of the rig.
    pub angles: Vec<PhotoLabel>,
}

/// How to capture.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Captures of one angle before it is marked failed (first try included).
    pub capture_attempts: u32,
    pub resize: ResizeSpec,
}

impl Settings {
    /// A generous estimate of one final image's size, for the buffer's caps.
    pub fn expected_image_bytes(&self) -> u64 {
        let edge = u64::from(self.resize.max_long_edge);
        // A 4:3 frame at about 0.3 bytes a pixel, which typical quality settings stay under.
        edge * edge * 3 / 4 * 3 / 10
    }
}

/// What happened while an inspection ran, as it happens.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    Started {
        inspection_id: InspectionId,
        angles: Vec<PhotoLabel>,
    },
    /// A frame was refused, missing or poor, and the angle is tried again.
    Retrying {
        angle: PhotoLabel,
        camera: String,
        attempt: u32,
        reason: String,
    },
    /// The angle's image is durable in the buffer, with its quality scores (and, when every
    /// capture was poor, the reason, as stored with it).
    Captured {
        angle: PhotoLabel,
        camera: String,
        source_bytes: u64,
        bytes: u64,
        width: u32,
        height: u32,
        quality: ImageQuality,
    },
    /// The angle gave up; the reason is recorded in the buffer.
    Failed {
        angle: PhotoLabel,
        camera: String,
        reason: String,
    },
}

/// The result of one inspection.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub inspection_id: InspectionId,
    pub state: InspectionState,
    pub captured: Vec<PhotoLabel>,
    pub failed: Vec<(PhotoLabel, String)>,
    /// Angles stored below their camera's quality thresholds, with the reason.
    pub poor: Vec<(PhotoLabel, String)>,
    /// Bytes the cameras delivered for the stored angles.
    pub source_bytes: u64,
    /// Bytes of the stored images.
    pub stored_bytes: u64,
    /// From the trigger until the last image was committed.
    pub trigger_to_durable: Duration,
    /// Some image could not be stored because the disk was full; its angle failed with a
    /// reason that says so.
    pub disk_full: bool,
    /// The most frames the imaging workers developed at once (never more than the workers).
    pub developed_at_once: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectionError {
    /// An angle was requested that no camera of the bay shoots. Nothing was stored.
    #[error("angle {0} is not shot by any camera of this bay; add it to a camera's angles in the config or leave it out")]
    NotCovered(PhotoLabel),
    /// An angle was requested twice. Nothing was stored.
    #[error("angle {0} is requested twice; list each angle once")]
    Duplicate(PhotoLabel),
    /// No angle was requested. Nothing was stored.
    #[error("no angle was requested")]
    NoAngles,
    /// A camera the inspection needs is offline and `refuse_when_camera_offline` is set.
    /// Nothing was stored.
    #[error("camera {camera} is offline ({reason}); the inspection is refused because inspection.refuse_when_camera_offline is set: reconnect the camera, or turn the switch off to capture the other angles")]
    CameraOffline { camera: String, reason: String },
    /// The buffer refused the inspection (a cap) or failed. What was stored before is intact.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs one inspection. Returns once every angle is stored or failed (or `cancel` was set).
pub fn run(
    rig: &mut Rig,
    store: &Mutex<Store>,
    request: &Request,
    settings: &Settings,
    clock: &dyn Clock,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Outcome, InspectionError> {
    let trigger = clock.monotonic();
    if request.angles.is_empty() {
        return Err(InspectionError::NoAngles);
    }
    for (i, angle) in request.angles.iter().enumerate() {
        if request.angles[..i].contains(angle) {
            return Err(InspectionError::Duplicate(*angle));
        }
        if rig.camera_for(*angle).is_none() {
            return Err(InspectionError::NotCovered(*angle));
        }
    }
    // Cameras known to be offline are not waited for: their angles fail with the reason, or
    // the whole inspection is refused before anything is stored.
    let mut offline: Vec<(String, String)> = Vec::new();
    for station in &rig.stations {
        if !station.angles.iter().any(|a| request.angles.contains(a)) {
            continue;
        }
        if let Some((Status::Offline, reason)) = rig.monitor.status(&station.camera_id) {
            let reason = reason.unwrap_or_else(|| "no reason recorded".to_owned());
            if rig.refuse_when_offline {
                return Err(InspectionError::CameraOffline { camera: station.camera_id.clone(), reason });
            }
            offline.push((station.camera_id.clone(), reason));
        }
    }

    let inspection_id = lock(store).begin_inspection(
        &NewInspection {
            case_id: &request.case_id,
            vehicle: request.vehicle.as_ref(),
            angles: &request.angles,
            expected_image_bytes: settings.expected_image_bytes(),
        },
        clock.wall(),
    )?;
    log::info!(inspection_id = inspection_id.0, case_id = request.case_id.as_str(), angles = request.angles.len(); "Inspection started");
    progress(&Progress::Started { inspection_id, angles: request.angles.clone() });

    let (tx, rx) = mpsc::channel::<(Progress, u64)>();
    let (work_tx, work_rx) = mpsc::channel::<Work>();
    let work_rx = Mutex::new(work_rx);
    let developing = Developing::default();
    let mut captured = Vec::new();
    let mut failed = Vec::new();
    let mut poor = Vec::new();
    let (mut source_bytes, mut stored_bytes) = (0u64, 0u64);
    let disk_full = AtomicBool::new(false);
    let monitor = rig.monitor.clone();
    let workers = rig.workers;
    std::thread::scope(|scope| {
        let mut cameras = 0usize;
        for station in rig.stations.iter_mut() {
            let angles: Vec<PhotoLabel> =
                station.angles.iter().copied().filter(|a| request.angles.contains(a)).collect();
            if angles.is_empty() {
                continue;
            }
            if let Some((camera, reason)) = offline.iter().find(|(c, _)| *c == station.camera_id) {
                let reason = format!("camera {camera} is offline: {reason}");
                log::warn!(inspection_id = inspection_id.0, camera = camera.as_str(), reason = reason.as_str(); "Camera offline, its angles fail");
                for angle in angles {
                    if let Err(e) =
                        lock(store).record_angle_failure(inspection_id, angle, &reason, clock.wall())
                    {
                        log::error!(inspection_id = inspection_id.0, angle = angle.as_str(), error:% = e; "Angle failure not recorded");
                    }
                    let _ = tx.send((
                        Progress::Failed { angle, camera: camera.clone(), reason: reason.clone() },
                        0,
                    ));
                }
                continue;
            }
            let tx = tx.clone();
            let job = Job {
                inspection_id,
                store,
                settings,
                clock,
                cancel,
                pool: Pool { queue: work_tx.clone(), imaging: Arc::new(station.imaging.clone()) },
                monitor: &monitor,
                disk_full: &disk_full,
            };
            cameras += 1;
            scope.spawn(move || {
                for angle in angles {
                    job.shoot(station, angle, &|event| {
                        let _ = tx.send(event);
                    });
                }
            });
        }
        drop(tx);
        // The workers stop once every camera thread is done and the queue is empty.
        drop(work_tx);
        for _ in 0..workers.min(cameras) {
            let (work_rx, developing) = (&work_rx, &developing);
            let resize = &settings.resize;
            scope.spawn(move || develop_frames(work_rx, resize, developing));
        }
        for (event, source) in rx {
            match &event {
                Progress::Captured { angle, bytes, quality, .. } => {
                    captured.push(*angle);
                    source_bytes += source;
                    stored_bytes += bytes;
                    if let Some(reason) = &quality.poor {
                        poor.push((*angle, reason.clone()));
                    }
                }
                Progress::Failed { angle, reason, .. } => failed.push((*angle, reason.clone())),
                _ => {}
            }
            progress(&event);
        }
    });
    let trigger_to_durable = clock.monotonic().saturating_sub(trigger);

    let state = if cancel.load(Ordering::SeqCst) {
        lock(store).cancel(inspection_id, "cancelled while capturing", clock.wall())?;
        InspectionState::Cancelled
    } else {
        lock(store).finish_capture(inspection_id, clock.wall())?
    };
    log::info!(
        inspection_id = inspection_id.0,
        case_id = request.case_id.as_str(),
        captured = captured.len(),
        failed = failed.len(),
        millis = trigger_to_durable.as_millis() as u64;
        "Inspection captured"
    );
    captured.sort();
    poor.sort_by_key(|(angle, _)| *angle);
    Ok(Outcome {
        inspection_id,
        state,
        captured,
        failed,
        poor,
        source_bytes,
        stored_bytes,
        trigger_to_durable,
        disk_full: disk_full.load(Ordering::SeqCst),
        developed_at_once: developing.most.load(Ordering::SeqCst),
    })
}

/// What one camera thread needs to shoot its angles.
struct Job<'a> {
    inspection_id: InspectionId,
    store: &'a Mutex<Store>,
    settings: &'a Settings,
    clock: &'a dyn Clock,
    cancel: &'a AtomicBool,
    /// Where this camera's frames are developed.
    pool: Pool,
    monitor: &'a Monitor,
    /// Set when an image was refused because the disk was full.
    disk_full: &'a AtomicBool,
}

impl Job<'_> {
    /// Captures one angle, telling `report` each step with the camera's byte count. A frame
    /// below the camera's quality thresholds is shot again while attempts remain; when none
    /// passes, the least poor one is stored with its reason.
    fn shoot(&self, station: &mut Station, angle: PhotoLabel, report: &dyn Fn((Progress, u64))) {
        let camera = station.camera_id.clone();
        let mut last_reason = String::new();
        let mut best: Option<Frame> = None;
        let mut poor_frames = 0u32;
        let mut buffer_refused = false;
        for attempt in 1..=self.settings.capture_attempts {
            if self.cancel.load(Ordering::SeqCst) {
                last_reason = "inspection cancelled".to_owned();
                break;
            }
            if attempt > 1 {
                report((
                    Progress::Retrying {
                        angle,
                        camera: camera.clone(),
                        attempt,
                        reason: last_reason.clone(),
                    },
                    0,
                ));
            }
            let raw = match station.camera.capture(angle) {
                Ok(raw) => raw,
                Err(e) => {
                    last_reason = e.to_string();
                    self.monitor.record_failure(
                        &camera,
                        Failure::of(&e),
                        &last_reason,
                        self.clock.monotonic(),
                    );
                    log::warn!(inspection_id = self.inspection_id.0, camera = camera.as_str(), angle = angle.as_str(), attempt = attempt, reason = last_reason.as_str(); "Camera gave no frame");
                    if e.is_retryable() {
                        continue;
                    }
                    break;
                }
            };
            let captured_at = self.clock.wall();
            let source_bytes = raw.len() as u64;
            // The raw frame moves to the pool, which frees it as soon as it is decoded.
            let processed = match self.pool.develop(raw) {
                Ok(Ok(p)) => {
                    self.monitor.record_ok(&camera, self.clock.monotonic());
                    p
                }
                Ok(Err(e)) => {
                    last_reason = format!("bad frame from camera {camera}: {e}");
                    self.monitor.record_failure(
                        &camera,
                        Failure::BadFrame,
                        &e.to_string(),
                        self.clock.monotonic(),
                    );
                    log::warn!(inspection_id = self.inspection_id.0, camera = camera.as_str(), angle = angle.as_str(), attempt = attempt, reason:% = e; "Frame refused");
                    if e.is_retryable() {
                        continue;
                    }
                    // The camera makes every frame this way (its encoding or resolution).
                    break;
                }
                Err(_) => {
                    last_reason = format!("bad frame from camera {camera}: the JPEG decoder failed on it");
                    self.monitor.record_failure(
                        &camera,
                        Failure::BadFrame,
                        &last_reason,
                        self.clock.monotonic(),
                    );
                    continue;
                }
            };
            let frame = Frame { processed, captured_at, source_bytes };
            if frame.processed.quality.passes() {
                match self.store(&camera, angle, &frame, None, report) {
                    Ok(()) => return,
                    Err(e) => {
                        last_reason = e;
                        buffer_refused = true;
                        break;
                    }
                }
            }
            poor_frames += 1;
            let why = frame.processed.quality.reason().unwrap_or_default();
            last_reason = format!("poor frame from camera {camera}: {why}");
            log::info!(inspection_id = self.inspection_id.0, camera = camera.as_str(), angle = angle.as_str(), attempt = attempt, reason = why.as_str(); "Frame below the quality thresholds");
            let shortfall = frame.processed.quality.shortfall();
            if best.as_ref().is_none_or(|b| shortfall < b.processed.quality.shortfall()) {
                best = Some(frame);
            }
        }
        if let (Some(frame), false) = (best, buffer_refused) {
            let why = frame.processed.quality.reason().unwrap_or_default();
            let reason = format!("{why}; the best of {poor_frames} capture(s), none passed the quality gate");
            log::warn!(inspection_id = self.inspection_id.0, camera = camera.as_str(), angle = angle.as_str(), reason = reason.as_str(); "Image stored below the quality thresholds");
            match self.store(&camera, angle, &frame, Some(reason), report) {
                Ok(()) => return,
                Err(e) => last_reason = e,
            }
        }
        if let Err(e) =
            lock(self.store).record_angle_failure(self.inspection_id, angle, &last_reason, self.clock.wall())
        {
            log::error!(inspection_id = self.inspection_id.0, angle = angle.as_str(), error:% = e; "Angle failure not recorded");
        }
        log::warn!(inspection_id = self.inspection_id.0, camera = camera.as_str(), angle = angle.as_str(), reason = last_reason.as_str(); "Angle failed");
        report((Progress::Failed { angle, camera, reason: last_reason }, 0));
    }

    /// Commits a frame with its scores (and `poor`, the reason when it is below the
    /// thresholds) and reports it; on a refusal, says why.
    fn store(
        &self,
        camera: &str,
        angle: PhotoLabel,
        frame: &Frame,
        poor: Option<String>,
        report: &dyn Fn((Progress, u64)),
    ) -> Result<(), String> {
        let p = &frame.processed;
        let quality = ImageQuality { scores: p.quality.scores, poor };
        let stored = lock(self.store).add_image_with_quality(
            self.inspection_id,
            &NewImage {
                angle,
                camera,
                captured_at: frame.captured_at,
                source_width: p.source_width,
                source_height: p.source_height,
                source_bytes: frame.source_bytes,
                width: p.width,
                height: p.height,
                jpeg: &p.jpeg,
            },
            &quality,
        );
        match stored {
            Ok(()) => {
                report((
                    Progress::Captured {
                        angle,
                        camera: camera.to_owned(),
                        source_bytes: frame.source_bytes,
                        bytes: p.jpeg.len() as u64,
                        width: p.width,
                        height: p.height,
                        quality,
                    },
                    frame.source_bytes,
                ));
                Ok(())
            }
            Err(e) => {
                // The buffer is full or failing: another frame will not fit better.
                log::error!(inspection_id = self.inspection_id.0, angle = angle.as_str(), error:% = e; "Image not stored");
                if matches!(e, StoreError::Full { .. } | StoreError::DiskFull { .. }) {
                    self.disk_full.store(true, Ordering::SeqCst);
                    Err(format!("not stored: the disk was full ({e})"))
                } else {
                    Err(format!("not stored: {e}"))
                }
            }
        }
    }
}

/// A processed frame waiting to be stored.
struct Frame {
    processed: imaging::Processed,
    captured_at: std::time::SystemTime,
    source_bytes: u64,
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // Every write is one SQLite transaction: a thread that panicked cannot leave half of one.
    store.lock().unwrap_or_else(|p| p.into_inner())
}

/// The number of imaging workers when none is configured: one per CPU.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A frame on its way to an imaging worker, with the camera's thresholds and masks and where
/// the result goes.
struct Work {
    raw: Vec<u8>,
    imaging: Arc<CameraImaging>,
    reply: mpsc::SyncSender<Developed>,
}

/// What a worker made of a frame; `Err` when the decoder panicked.
type Developed = std::thread::Result<Result<imaging::Processed, imaging::FrameError>>;

/// A camera thread's way into the imaging pool.
struct Pool {
    queue: mpsc::Sender<Work>,
    imaging: Arc<CameraImaging>,
}

impl Pool {
    /// Queues the frame behind those that arrived before it and waits for a worker to develop
    /// it.
    fn develop(&self, raw: Vec<u8>) -> Developed {
        let (reply, answer) = mpsc::sync_channel(1);
        let gone = || -> Developed { Err(Box::new("the imaging workers stopped")) };
        if self.queue.send(Work { raw, imaging: Arc::clone(&self.imaging), reply }).is_err() {
            return gone();
        }
        answer.recv().unwrap_or_else(|_| gone())
    }
}

/// How many frames the workers develop now, and the most at once.
#[derive(Default)]
struct Developing {
    now: AtomicUsize,
    most: AtomicUsize,
}

/// An imaging worker: takes frames in the order they arrived until every camera is done.
fn develop_frames(queue: &Mutex<mpsc::Receiver<Work>>, resize: &ResizeSpec, developing: &Developing) {
    loop {
        // One worker waits on the queue at a time; the others wait for the lock, in turn.
        let next = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(Work { raw, imaging, reply }) = next else { return };
        let now = developing.now.fetch_add(1, Ordering::SeqCst) + 1;
        developing.most.fetch_max(now, Ordering::SeqCst);
        let developed = catch_unwind(AssertUnwindSafe(|| imaging::process_owned(raw, resize, &imaging)));
        developing.now.fetch_sub(1, Ordering::SeqCst);
        let _ = reply.send(developed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::SyntheticCamera;
    use crate::clock::ManualClock;
    use std::time::{Instant, UNIX_EPOCH};

    /// A camera whose frame comes only once every camera of the rig has been asked for one (or
    /// after 10 s, with an error): a rig that fetched one camera after another would fail it.
    struct Together {
        inner: SyntheticCamera,
        arrived: Arc<(Mutex<usize>, std::sync::Condvar)>,
        cameras: usize,
    }

    impl Camera for Together {
        fn capture(&mut self, angle: PhotoLabel) -> Result<Vec<u8>, CaptureError> {
            let (count, all_here) = &*self.arrived;
            let mut n = count.lock().unwrap();
            *n += 1;
            all_here.notify_all();
            let deadline = Instant::now() + Duration::from_secs(10);
            while *n < self.cameras {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(CaptureError::NoDevice {
                        camera: "together".into(),
                        device: "test".into(),
                        reason: format!("only {} of {} cameras were asked at once", *n, self.cameras),
                    });
                }
                n = all_here.wait_timeout(n, left).unwrap().0;
            }
            drop(n);
            self.inner.capture(angle)
        }
    }

    /// A camera whose every frame is cut short.
    struct CutShort;

    impl Camera for CutShort {
        fn capture(&mut self, _angle: PhotoLabel) -> Result<Vec<u8>, CaptureError> {
            let mut frame = SyntheticCamera::new("cut", 320, 240).capture(PhotoLabel::Rear)?;
            frame.truncate(frame.len() / 2);
            Ok(frame)
        }
    }

    fn inspect(workers: usize) -> (Outcome, Vec<u32>) {
        let angles = [PhotoLabel::Front, PhotoLabel::Left, PhotoLabel::Right, PhotoLabel::Rear];
        let arrived = Arc::new((Mutex::new(0), std::sync::Condvar::new()));
        let mut cameras: Vec<(String, Vec<PhotoLabel>, Box<dyn Camera>)> = angles[..3]
            .iter()
            .map(|a| {
                let camera: Box<dyn Camera> = Box::new(Together {
                    inner: SyntheticCamera::new(a.as_str(), 1600, 1200),
                    arrived: Arc::clone(&arrived),
                    cameras: 3,
                });
                (a.as_str().to_owned(), vec![*a], camera)
            })
            .collect();
        cameras.push(("cut".to_owned(), vec![PhotoLabel::Rear], Box::new(CutShort)));
        let mut rig = Rig::from_cameras(cameras).with_workers(workers);
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::starting_at(UNIX_EPOCH + Duration::from_secs(1_795_000_000));
        let store = Mutex::new(
            Store::open(
                dir.path(),
                crate::store::Caps { max_bytes: 1 << 30, min_free_disk: 0 },
                clock.wall(),
            )
            .unwrap(),
        );
        let request =
            Request { case_id: CaseId::parse("POOL-1").unwrap(), vehicle: None, angles: angles.to_vec() };
        let settings =
            Settings { capture_attempts: 2, resize: ResizeSpec { max_long_edge: 320, jpeg_quality: 80 } };
        let outcome =
            run(&mut rig, &store, &request, &settings, &clock, &AtomicBool::new(false), &mut |_| {}).unwrap();
        let widths = lock(&store).images(outcome.inspection_id).unwrap().iter().map(|i| i.width).collect();
        (outcome, widths)
    }

    #[test]
    fn cameras_fetch_at_once_while_no_more_frames_than_workers_are_developed_and_a_bad_one_fails_alone() {
        for workers in [1, 2] {
            let (outcome, widths) = inspect(workers);
            assert_eq!(outcome.captured, vec![PhotoLabel::Front, PhotoLabel::Left, PhotoLabel::Right]);
            assert_eq!(widths, vec![320, 320, 320], "every stored image is resized");
            assert_eq!(outcome.failed.len(), 1, "{:?}", outcome.failed);
            let (angle, reason) = &outcome.failed[0];
            assert_eq!(*angle, PhotoLabel::Rear);
            assert!(reason.contains("cut short"), "{reason}");
            assert!(
                (1..=workers).contains(&outcome.developed_at_once),
                "{workers} worker(s) developed {} frames at once",
                outcome.developed_at_once
            );
            assert_eq!(outcome.state, InspectionState::Captured);
        }
    }
}
