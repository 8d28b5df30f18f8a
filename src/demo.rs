//! `capture-kiosk demo`: a simulated drive-through with no setup. Eight synthetic 12 MP
//! cameras, one per exterior angle, a temporary state directory, and the real pipeline:
//! capture, validate, resize, commit to the SQLite buffer, then the upload leg against the
//! stand-in of the cloud API started in-process on 127.0.0.1, all the way to a completed
//! session. Ends with a short report.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::capture::{Camera, SyntheticCamera};
use crate::clock::rfc3339_seconds;
use crate::clock::SystemClock;
use crate::config::{ByteSize, CloudConfig};
use crate::imaging::ResizeSpec;
use crate::inspection::{self, Outcome, Progress, Request, Rig, Settings};
use crate::mqtt::Link;
use crate::standin::{StandIn, StandInConfig};
use crate::status::{
    self, BufferStatus, CameraState, CameraStatus, CloudStatus, Event as StatusEvent, EventKind,
    InspectionStatus, Lifecycle, Stage, State,
};
use crate::store::{Caps, Store};
use crate::upload::Event;
use crate::vehicle::{CaseId, PhotoLabel, Vehicle, Vin};

/// What the demo runs on.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Frame size of every synthetic camera.
    pub width: u32,
    pub height: u32,
    /// Keep the buffer here instead of in a temporary directory.
    pub state_dir: Option<PathBuf>,
    /// Publish status and events to this broker (`mqtt://HOST:PORT`) under `capture-kiosk/demo`.
    pub mqtt: Option<String>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions { width: 4032, height: 3024, state_dir: None, mqtt: None }
    }
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub outcome: Outcome,
    /// The upload leg: what reached the stand-in, or why not.
    pub upload: Result<UploadReport, String>,
    pub cameras: usize,
    pub warm_up_seconds: f64,
    pub state_dir: PathBuf,
}

/// Runs the drive-through; `say` receives the lines of the report as they happen.
pub fn run(options: &DemoOptions, say: &mut dyn FnMut(&str)) -> anyhow::Result<DemoReport> {
    let temp;
    let state_dir = match &options.state_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("capture-kiosk-demo-")
                .tempdir()
                .context("no temporary directory for the demo's buffer")?;
            temp.path().to_owned()
        }
    };
    let settings =
        Settings { capture_attempts: 3, resize: ResizeSpec { max_long_edge: 1920, jpeg_quality: 85 } };
    let caps = Caps { max_bytes: 8 << 30, min_free_disk: 512 << 20 };
    let clock = SystemClock::new();
    let store = Mutex::new(
        Store::open(&state_dir, caps, std::time::SystemTime::now())
            .context("the demo's buffer cannot be opened")?,
    );

    let angles = PhotoLabel::EXTERIOR.to_vec();
    let cameras: Vec<(String, Vec<PhotoLabel>, Box<dyn Camera>)> = angles
        .iter()
        .map(|a| {
            let id = format!("cam-{}", a.as_str().to_ascii_lowercase().replace('_', "-"));
            let camera: Box<dyn Camera> = Box::new(SyntheticCamera::new(&id, options.width, options.height));
            (id, vec![*a], camera)
        })
        .collect();
    let count = cameras.len();
    let rig_cameras: Vec<String> = cameras.iter().map(|(id, ..)| id.clone()).collect();
    let mut rig = Rig::from_cameras(cameras);

    say(&format!(
        "capture-kiosk demo: a simulated drive-through with {count} synthetic cameras at {}x{} ({:.1} MP), one per exterior angle",
        options.width,
        options.height,
        f64::from(options.width) * f64::from(options.height) / 1e6
    ));
    say(&format!("buffer: {}", state_dir.display()));
    let started = Instant::now();
    for (camera, e) in rig.warm_up(&angles) {
        say(&format!("camera {camera} did not warm up: {e}"));
    }
    let warm_up_seconds = started.elapsed().as_secs_f64();
    say(&format!("cameras ready in {warm_up_seconds:.2} s (each rendered and encoded its first frame)"));
    say("trigger: a car has stopped in the bay");

    let broker = match &options.mqtt {
        None => None,
        Some(url) => {
            let config = crate::config::MqttConfig::from_url(url)?;
            let link = Link::start(&config, DEMO_BAY, Box::new(|_| {}))
                .context("the demo cannot set up its MQTT link")?;
            let deadline = Instant::now() + Duration::from_secs(3);
            while !link.is_connected() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if link.is_connected() {
                say(&format!(
                    "publishing to {url} under {}/{DEMO_BAY}/ (status, state, events)",
                    config.topic_prefix
                ));
            } else {
                say(&format!(
                    "broker {url} did not answer within 3 s; the demo goes on and publishes once it does"
                ));
            }
            let buffer = store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .another_handle()
                .context("the demo cannot read its buffer")?;
            Some(DemoStatus {
                link,
                buffer,
                seq: 0,
                boot_id: format!("{:016x}", fastrand::u64(..)),
                started,
                cameras: rig_cameras.clone(),
                inspection: None,
                settings,
            })
        }
    };
    let mut broker = broker;
    if let Some(b) = &mut broker {
        b.state(Stage::Capturing);
    }

    let request = Request {
        case_id: CaseId::parse("DEMO-0001")?,
        vehicle: Some(Vehicle::with_vin(Vin::parse("JN1CV6AR9BM123456")?)),
        angles: angles.clone(),
    };
    let cancel = AtomicBool::new(false);
    let outcome = inspection::run(&mut rig, &store, &request, &settings, &clock, &cancel, &mut |p| {
        if let Some(b) = &mut broker {
            b.progress(p, request.case_id.as_str());
        }
        match p {
            Progress::Captured { angle, camera, source_bytes, bytes, width, height, .. } => say(&format!(
                "  {:<12} {camera:<16} {} -> {width}x{height} {}",
                angle.as_str(),
                ByteSize(*source_bytes),
                ByteSize(*bytes)
            )),
            Progress::Failed { angle, reason, .. } => {
                say(&format!("  {:<12} FAILED: {reason}", angle.as_str()))
            }
            Progress::Retrying { angle, attempt, reason, .. } => {
                say(&format!("  {:<12} attempt {attempt}: {reason}", angle.as_str()))
            }
            Progress::Started { .. } => {}
        }
    })?;
    if let Some(mut b) = broker {
        b.event(EventKind::of_capture_end(
            outcome.inspection_id.0,
            request.case_id.as_str(),
            outcome.state,
            outcome.captured.len() as u64,
            outcome.stored_bytes,
        ));
        b.inspection = None;
        b.state(Stage::Idle);
        std::thread::sleep(Duration::from_millis(300));
        b.link.stop(Duration::from_secs(2));
    }

    let ratio = if outcome.source_bytes > 0 {
        outcome.stored_bytes as f64 / outcome.source_bytes as f64
    } else {
        0.0
    };
    say(&format!(
        "{} of {} angles durable in the buffer (inspection {}, state {:?})",
        outcome.captured.len(),
        angles.len(),
        outcome.inspection_id,
        outcome.state
    ));
    say(&format!(
        "bytes from the cameras: {}; stored after resizing: {} ({:.1} %)",
        ByteSize(outcome.source_bytes),
        ByteSize(outcome.stored_bytes),
        ratio * 100.0
    ));
    say(&format!(
        "trigger to all frames durable: {:.3} s on {} CPUs",
        outcome.trigger_to_durable.as_secs_f64(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    ));
    drop(store);
    let upload = upload_leg(&state_dir, caps, say);
    if options.state_dir.is_none() {
        say("the temporary buffer is removed now; pass --state-dir DIR to keep it");
    }
    Ok(DemoReport { outcome, upload, cameras: count, warm_up_seconds, state_dir })
}

/// What the upload leg of the demo did.
#[derive(Debug, Clone)]
pub struct UploadReport {
    pub session: String,
    pub images: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// Starts the stand-in, uploads what the buffer holds and completes the session.
fn upload_leg(
    state_dir: &std::path::Path,
    caps: Caps,
    say: &mut dyn FnMut(&str),
) -> Result<UploadReport, String> {
    use std::sync::Arc;
    let mut run = || -> anyhow::Result<UploadReport> {
        let clock: Arc<dyn crate::clock::Clock> = Arc::new(SystemClock::new());
        let account = StandInConfig::default();
        let standin = StandIn::start(account.clone(), clock.clone()).context("the stand-in cannot listen")?;
        let secret = state_dir.join("demo-api-secret");
        write_owner_only(&secret, account.api_secret.as_bytes())?;
        let cloud = CloudConfig {
            base_url: standin.base_url(),
            username: account.username.clone(),
            api_key: account.api_key.clone(),
            client_id: "DEMO-BAY".to_owned(),
            api_secret_file: Some(secret),
            max_request_bytes: 32 << 20,
            request_timeout: std::time::Duration::from_secs(30),
            require_clock_sync: true,
            trust: crate::config::CloudTrust::Bundled,
            ca_file: None,
        };
        say(&format!("upload: the stand-in cloud API listens on {}", standin.base_url()));
        let mut store = Store::open(state_dir, caps, std::time::SystemTime::now())?;
        let mut uploader = crate::upload::drain::uploader(&cloud, clock)?;
        let started = Instant::now();
        let mut session = None;
        let drained = crate::upload::drain::drain(
            &mut uploader,
            &mut store,
            std::time::Duration::from_secs(30),
            &mut std::thread::sleep,
            &mut |e| match e {
                Event::Sent { labels, bytes, .. } => {
                    say(&format!("  sent {} image(s), {}", labels.len(), ByteSize(*bytes)))
                }
                Event::Uploaded { session: s, .. } => session = Some(s.clone()),
                _ => {}
            },
        );
        let seconds = started.elapsed().as_secs_f64();
        let session = match (session, drained.stopped) {
            (Some(s), _) => s,
            (None, why) => anyhow::bail!("{}", why.unwrap_or_else(|| "nothing was completed".to_owned())),
        };
        let record = standin.session(&session).context("the stand-in forgot the session")?;
        standin.stop();
        Ok(UploadReport { session, images: record.photos.len() as u64, bytes: drained.bytes_sent, seconds })
    };
    match run() {
        Ok(report) => {
            say(&format!(
                "session {} completed at the stand-in: {} image(s), {} sent in {:.3} s ({:.1} MB/s over loopback)",
                report.session,
                report.images,
                ByteSize(report.bytes),
                report.seconds,
                report.bytes as f64 / 1e6 / report.seconds.max(1e-9)
            ));
            Ok(report)
        }
        Err(e) => {
            say(&format!("upload leg failed: {e:#}; the images stay in the buffer"));
            Err(format!("{e:#}"))
        }
    }
}

fn write_owner_only(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

/// The demo's bay id on MQTT.
const DEMO_BAY: &str = "demo";

/// What the demo publishes: the daemon's topics and payload types ([`crate::status`]), for a
/// bay that captures once and uploads to a stand-in.
struct DemoStatus {
    link: Link,
    /// A handle of its own on the buffer, so that a state never waits on the capture.
    buffer: Store,
    seq: u64,
    boot_id: String,
    started: Instant,
    cameras: Vec<String>,
    inspection: Option<InspectionStatus>,
    settings: Settings,
}

impl DemoStatus {
    fn event(&mut self, kind: EventKind) {
        self.seq += 1;
        let event = StatusEvent { ts: rfc3339_seconds(std::time::SystemTime::now()), seq: self.seq, kind };
        self.link.event(status::to_bytes(&event));
    }

    fn state(&mut self, stage: Stage) {
        self.seq += 1;
        let now = std::time::SystemTime::now();
        let angles = PhotoLabel::EXTERIOR.len();
        let buffer = match self.buffer.observe() {
            Ok(facts) => BufferStatus::of(&facts, now, angles, self.settings.expected_image_bytes()),
            Err(e) => BufferStatus::unknown(e.to_string(), true),
        };
        let online = CameraStatus { status: CameraState::Online, last_frame_age_s: Some(0), reason: None };
        let state = State {
            ts: rfc3339_seconds(now),
            seq: self.seq,
            boot_id: self.boot_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            lifecycle: Lifecycle::Ready,
            alerts: Vec::new(),
            stage,
            inspection: self.inspection.clone(),
            cameras: self.cameras.iter().map(|c| (c.clone(), online.clone())).collect(),
            buffer,
            cloud: CloudStatus {
                reachable: false,
                clock_synced: Some(true),
                last_upload_at: None,
                last_error: Some(
                    "demo: the upload runs after the capture, against a local stand-in".to_owned(),
                ),
            },
            uptime_s: self.started.elapsed().as_secs(),
        };
        self.link.set_state(status::to_bytes(&state));
    }

    fn progress(&mut self, p: &Progress, case_id: &str) {
        if let Progress::Started { inspection_id, angles } = p {
            self.inspection = Some(InspectionStatus {
                inspection_id: Some(inspection_id.0),
                case_id: case_id.to_owned(),
                angles: angles.len(),
                done: 0,
            });
        }
        if matches!(p, Progress::Captured { .. } | Progress::Failed { .. }) {
            if let Some(i) = &mut self.inspection {
                i.done += 1;
            }
        }
        let inspection_id = self.inspection.as_ref().and_then(|i| i.inspection_id);
        let Some(kind) = EventKind::of_progress(p, case_id, inspection_id) else { return };
        self.event(kind);
        self.state(Stage::Capturing);
    }
}
