//! One inspection, from trigger to durable: every camera on a thread of its own, driven through
//! its angles in order; each frame validated and re-captured when bad, judged by the quality
//! gate and re-captured when poor, then resized, masked and committed to the buffer as soon as
//! it is ready. An angle whose every capture is poor keeps its best frame, stored with its
//! scores and the reason. An angle that cannot be captured is marked failed with its reason
//! while the other angles carry on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Condvar, Mutex, MutexGuard};
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
        Ok(Rig { stations, monitor, refuse_when_offline: config.inspection.refuse_when_camera_offline })
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
        Rig { stations, monitor, refuse_when_offline: false }
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

    let permits = Permits::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
    let (tx, rx) = mpsc::channel::<(Progress, u64)>();
    let mut captured = Vec::new();
    let mut failed = Vec::new();
    let mut poor = Vec::new();
    let (mut source_bytes, mut stored_bytes) = (0u64, 0u64);
    let disk_full = AtomicBool::new(false);
    let monitor = rig.monitor.clone();
    std::thread::scope(|scope| {
        for station in rig.stations.iter_mut() {
            let angles: Vec<PhotoLabel> =
                station.angles.iter().copied().filter(|a| request.angles.contains(a)).collect();
            if angles.is_empty() {
                continue;
            }
            if let Some((camera, reason)) = offline.iter().find(|(c, _)| *c == station.camera_id) {
                let reason = format!("camera {camera} is offline: {reason}");
                log::warn!(inspection_id = inspection_id.0, camera = camera.as_str(); "Camera offline, its angles fail: {reason}");
                for angle in angles {
                    if let Err(e) =
                        lock(store).record_angle_failure(inspection_id, angle, &reason, clock.wall())
                    {
                        log::error!(inspection_id = inspection_id.0, angle = angle.as_str(); "Angle failure not recorded: {e}");
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
                permits: &permits,
                monitor: &monitor,
                disk_full: &disk_full,
            };
            scope.spawn(move || {
                for angle in angles {
                    job.shoot(station, angle, &|event| {
                        let _ = tx.send(event);
                    });
                }
            });
        }
        drop(tx);
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
    })
}

/// What one camera thread needs to shoot its angles.
struct Job<'a> {
    inspection_id: InspectionId,
    store: &'a Mutex<Store>,
    settings: &'a Settings,
    clock: &'a dyn Clock,
    cancel: &'a AtomicBool,
    permits: &'a Permits,
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
                    log::warn!(inspection_id = self.inspection_id.0, camera = camera.as_str(), angle = angle.as_str(), attempt = attempt; "Camera gave no frame: {last_reason}");
                    if e.is_retryable() {
                        continue;
                    }
                    break;
                }
            };
            let captured_at = self.clock.wall();
            let processed = {
                let _permit = self.permits.acquire();
                catch_unwind(AssertUnwindSafe(|| {
                    imaging::process_for(&raw, &self.settings.resize, &station.imaging)
                }))
            };
            let processed = match processed {
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
                    log::warn!(inspection_id = self.inspection_id.0, camera = camera.as_str(), angle = angle.as_str(), attempt = attempt; "Frame refused: {e}");
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
            let frame = Frame { processed, captured_at, source_bytes: raw.len() as u64 };
            drop(raw);
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
            log::info!(inspection_id = self.inspection_id.0, camera = camera.as_str(), angle = angle.as_str(), attempt = attempt; "Frame below the quality thresholds: {why}");
            let shortfall = frame.processed.quality.shortfall();
            if best.as_ref().is_none_or(|b| shortfall < b.processed.quality.shortfall()) {
                best = Some(frame);
            }
        }
        if let (Some(frame), false) = (best, buffer_refused) {
            let why = frame.processed.quality.reason().unwrap_or_default();
            let reason = format!("{why}; the best of {poor_frames} capture(s), none passed the quality gate");
            log::warn!(inspection_id = self.inspection_id.0, camera = camera.as_str(), angle = angle.as_str(); "Image stored below the quality thresholds: {reason}");
            match self.store(&camera, angle, &frame, Some(reason), report) {
                Ok(()) => return,
                Err(e) => last_reason = e,
            }
        }
        if let Err(e) =
            lock(self.store).record_angle_failure(self.inspection_id, angle, &last_reason, self.clock.wall())
        {
            log::error!(inspection_id = self.inspection_id.0, angle = angle.as_str(); "Angle failure not recorded: {e}");
        }
        log::warn!(inspection_id = self.inspection_id.0, camera = camera.as_str(), angle = angle.as_str(); "Angle failed: {last_reason}");
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
                log::error!(inspection_id = self.inspection_id.0, angle = angle.as_str(); "Image not stored: {e}");
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

/// A counting semaphore: at most as many frames are decoded and resized at once as there are
/// cores, which keeps the peak memory of eight 12 MP frames in check without losing speed.
struct Permits {
    free: Mutex<usize>,
    freed: Condvar,
}

struct Permit<'a>(&'a Permits);

impl Permits {
    fn new(n: usize) -> Permits {
        Permits { free: Mutex::new(n.max(1)), freed: Condvar::new() }
    }

    fn acquire(&self) -> Permit<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}
