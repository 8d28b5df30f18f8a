//! `capture-kiosk run`: the long-running daemon. A supervisor thread handles a closed set of
//! [`Event`]s in one loop; capture runs [`inspection::run`] on a thread of its own, the upload
//! leg ([`UploadLeg`]) on another, and MQTT ([`crate::mqtt::Link`]) on its own threads, which
//! nothing ever waits for.
//!
//! ```text
//!  signals ─┐   mqtt commands ─┐   capture progress ─┐   upload events ─┐   tick
//!           └──────────────────┴─────────► Event ◄───┴──────────────────┴────┘
//!                                            │ supervisor
//!             ┌──────────────┬───────────────┼──────────────┬────────────────┐
//!        capture thread  upload thread   Link (state,   sd_notify       the buffer
//!        (jobs, cancel)  (wake)          events, acks)  (READY, WATCHDOG) (retry, totals)
//! ```

pub mod command;
pub mod notify;
pub mod upload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use crate::clock::{rfc3339_seconds, unix_millis, Clock};
use crate::config::Config;
use crate::inspection::{self, InspectionError, Progress, Request, Rig, Settings};
use crate::mqtt::{Incoming, Link, LinkEvent};
use crate::store::{InspectionId, InspectionState, Store, StoreError};

use command::{Ack, AckStatus, Action, Answered};
pub use notify::Notifier;
pub use upload::{CaptureOnly, CloudLeg, UploadEvent, UploadLeg};

/// How often the supervisor wakes when nothing happens.
const TICK: Duration = Duration::from_millis(250);
/// How often an idle capture or upload loop shows it is alive.
const BEAT: Duration = Duration::from_millis(250);
/// How often the retention rule (`buffer.completed_retention`) runs; also once at start.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Everything that can make the daemon act. Every trigger is listed here.
#[derive(Debug)]
pub enum Event {
    Signal(Signal),
    Mqtt(LinkEvent),
    Capture(Progress),
    CaptureDone {
        command_id: Option<String>,
        result: Result<(InspectionId, InspectionState), String>,
    },
    Upload(UploadEvent),
    /// A camera went offline or came back (from the rig's health monitor).
    Camera(crate::capture::health::CameraEvent),
}

/// The signals the daemon handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: stop with the buffer consistent.
    Terminate,
    /// SIGHUP: reload what can change without a restart.
    Reload,
}

/// Test hooks. `wedge_capture` makes the capture loop stop beating, as a hung camera would.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub wedge_capture: Arc<AtomicBool>,
}

/// What the daemon runs on; `main` builds the real ones, tests their own.
pub struct Deps {
    pub clock: Arc<dyn Clock>,
    pub rig: Rig,
    pub upload: Box<dyn UploadLeg>,
    pub notifier: Notifier,
    /// systemd's watchdog interval, if it asked for one.
    pub watchdog: Option<Duration>,
    /// Where to re-read the configuration on SIGHUP.
    pub config_path: Option<PathBuf>,
    pub hooks: Hooks,
}

/// A running daemon.
pub struct Daemon {
    events: Sender<Event>,
    supervisor: JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    /// Delivers a signal (the signal thread in `main`, or a test).
    pub fn signal(&self, signal: Signal) {
        let _ = self.events.send(Event::Signal(signal));
    }

    /// A sender for events (the signal thread).
    pub fn sender(&self) -> Sender<Event> {
        self.events.clone()
    }

    /// Waits until the daemon stopped.
    pub fn wait(self) -> anyhow::Result<()> {
        match self.supervisor.join() {
            Ok(result) => result,
            Err(_) => anyhow::bail!("the supervisor thread panicked"),
        }
    }
}

/// Opens the buffer, starts every loop and the MQTT link, then says `READY=1`.
pub fn start(config: Config, deps: Deps) -> anyhow::Result<Daemon> {
    let clock = deps.clock.clone();
    let buffer_bytes =
        std::fs::metadata(config.state_dir.join(crate::store::FILE_NAME)).map_or(0, |m| m.len());
    let allowance = notify::start_allowance(buffer_bytes);
    // Before any open of the buffer: opening it as its owner checks every page.
    deps.notifier.send(&format!("EXTEND_TIMEOUT_USEC={}", allowance.as_micros()));
    deps.notifier.send(&format!("STATUS=checking the buffer ({} MiB)", buffer_bytes >> 20));
    log::debug!(bytes = buffer_bytes, allowance_s = allowance.as_secs(); "More start time asked of systemd before the buffer is opened");
    if buffer_bytes > 1 << 30 {
        log::info!(bytes = buffer_bytes, allowance_s = allowance.as_secs(); "Checking a large buffer before start; this can take minutes on an SD card");
    }
    let store = Store::open(&config.state_dir, config.buffer.caps, clock.wall())
        .with_context(|| format!("the buffer in {} cannot be opened", config.state_dir.display()))?;
    for id in &store.recovery().interrupted {
        log::warn!(inspection_id = id.0; "Inspection interrupted by the previous run was closed with the images it holds");
    }
    for r in store.unacknowledged_recoveries().unwrap_or_default() {
        log::error!(recovery_id = r.id, summary = r.summary().as_str(); "The buffer was salvaged from a damaged file and the report is not acknowledged");
    }
    let beats = Beats::new(clock.monotonic());
    // The upload leg's handle comes from this open: one owner, one recovery, one check.
    let mut leg = deps.upload;
    {
        let (beats, clock) = (beats.clone(), clock.clone());
        let alive: crate::upload::client::Alive =
            Arc::new(move |grace| beats.beat_with_grace(UPLOAD_LOOP, clock.monotonic(), grace));
        leg.attach(&store, alive).context("the upload leg cannot start")?;
    }
    let store = Arc::new(Mutex::new(store));
    let (events, inbox) = mpsc::channel();

    let link = match &config.mqtt {
        None => None,
        Some(mqtt) => {
            let to_supervisor = Mutex::new(events.clone());
            let on_event = Box::new(move |e: LinkEvent| {
                let _ = lock(&to_supervisor).send(Event::Mqtt(e));
            });
            Some(Link::start(mqtt, &config.bay_id, on_event).context("the MQTT link cannot be set up")?)
        }
    };

    let cancel = Arc::new(AtomicBool::new(false));
    let (jobs, job_inbox) = mpsc::channel::<Job>();
    let monitor = deps.rig.monitor();
    let capture = {
        let (store, events, clock, cancel, beats, hooks) =
            (store.clone(), events.clone(), clock.clone(), cancel.clone(), beats.clone(), deps.hooks.clone());
        let mut rig = deps.rig;
        let camera_events = rig.monitor().subscribe();
        let forward = events.clone();
        std::thread::Builder::new().name("camera-health".to_owned()).spawn(move || {
            for event in camera_events {
                if forward.send(Event::Camera(event)).is_err() {
                    return;
                }
            }
        })?;
        std::thread::Builder::new().name("capture".to_owned()).spawn(move || {
            capture_loop(&mut rig, &store, &job_inbox, &events, clock.as_ref(), &cancel, &beats, &hooks)
        })?
    };
    let (wake, wake_inbox) = mpsc::channel::<()>();
    let stop_upload = Arc::new(AtomicBool::new(false));
    {
        let (events, clock, beats, stop) =
            (events.clone(), clock.clone(), beats.clone(), stop_upload.clone());
        std::thread::Builder::new()
            .name("upload".to_owned())
            .spawn(move || upload_loop(leg.as_mut(), &wake_inbox, &events, clock.as_ref(), &beats, &stop))?;
    }

    let boot_id = format!("{:016x}", fastrand::u64(..));
    let mut supervisor = Supervisor {
        config,
        monitor,
        store,
        link,
        clock: clock.clone(),
        notifier: deps.notifier,
        watchdog: deps.watchdog,
        config_path: deps.config_path,
        jobs,
        capture: Some(capture),
        cancel,
        wake,
        stop_upload,
        beats,
        answered: Answered::default(),
        running: None,
        cloud: json!({"reachable": false, "clock_synced": null, "last_upload_at": null, "last_error": null}),
        cameras: Default::default(),
        uploading: None,
        boot_id,
        seq: 0,
        started: clock.monotonic(),
        last_state: None,
        last_state_at: None,
        last_watchdog: None,
        last_status_line: String::new(),
        last_prune: None,
        oversized: None,
        recoveries_announced: false,
        link_alerts: Default::default(),
    };
    supervisor.recall_answers();
    supervisor.publish_state(true);
    supervisor.notifier.send("READY=1");
    supervisor.send_status_line();
    log::info!(bay_id = supervisor.config.bay_id.as_str(), state_dir:% = supervisor.config.state_dir.display(); "Daemon ready");
    let supervisor =
        std::thread::Builder::new().name("supervisor".to_owned()).spawn(move || supervisor.run(&inbox))?;
    Ok(Daemon { events, supervisor })
}

/// A capture job for the capture thread.
struct Job {
    command_id: String,
    request: Request,
    settings: Settings,
}

/// When each loop last showed it is alive (monotonic), for the watchdog.
#[derive(Clone)]
struct Beats(Arc<Mutex<[notify::Beat; 2]>>);

const CAPTURE_LOOP: usize = 0;
const UPLOAD_LOOP: usize = 1;

impl Beats {
    fn new(now: Duration) -> Beats {
        Beats(Arc::new(Mutex::new([notify::Beat::at(now); 2])))
    }
    fn beat(&self, which: usize, now: Duration) {
        self.beat_with_grace(which, now, Duration::ZERO);
    }
    /// A beat from inside a request that may take `grace` more (its deadline).
    fn beat_with_grace(&self, which: usize, now: Duration, grace: Duration) {
        lock(&self.0)[which] = notify::Beat { at: now, grace };
    }
    fn get(&self) -> [notify::Beat; 2] {
        *lock(&self.0)
    }
}

struct Running {
    command_id: String,
    case_id: String,
    inspection_id: Option<InspectionId>,
    angles: usize,
    done: usize,
}

struct Supervisor {
    config: Config,
    /// The cameras' health, shared with the rig on the capture thread.
    monitor: crate::capture::health::Monitor,
    store: Arc<Mutex<Store>>,
    link: Option<Link>,
    clock: Arc<dyn Clock>,
    notifier: Notifier,
    watchdog: Option<Duration>,
    config_path: Option<PathBuf>,
    jobs: Sender<Job>,
    capture: Option<JoinHandle<()>>,
    cancel: Arc<AtomicBool>,
    wake: Sender<()>,
    stop_upload: Arc<AtomicBool>,
    beats: Beats,
    answered: Answered,
    running: Option<Running>,
    cloud: Value,
    cameras: std::collections::BTreeMap<String, &'static str>,
    uploading: Option<(i64, String)>,
    boot_id: String,
    seq: u64,
    started: Duration,
    last_state: Option<Value>,
    last_state_at: Option<Duration>,
    last_watchdog: Option<Duration>,
    last_status_line: String,
    /// When the retention rule last ran (monotonic).
    last_prune: Option<Duration>,
    /// The size of an MQTT message that cost the connection, told once it is back.
    oversized: Option<usize>,
    /// Whether this start already sent `buffer_recovered` for the unacknowledged salvages.
    recoveries_announced: bool,
    /// What the MQTT link says a person must act on (a refused subscription, a client id in
    /// use twice), by kind.
    link_alerts: std::collections::BTreeMap<&'static str, String>,
}

impl Supervisor {
    fn run(mut self, inbox: &Receiver<Event>) -> anyhow::Result<()> {
        loop {
            match inbox.recv_timeout(TICK) {
                Ok(Event::Signal(Signal::Terminate)) => break,
                Ok(event) => self.handle(event),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            self.tick();
        }
        self.shut_down(inbox);
        Ok(())
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Signal(Signal::Reload) => self.reload(),
            Event::Signal(Signal::Terminate) => {}
            Event::Mqtt(LinkEvent::Connected) => {
                self.announce_recoveries();
                self.publish_state(true);
                if let Some(bytes) = self.oversized.take() {
                    self.emit(json!({"type": "error", "reason": format!(
                        "an MQTT message of {bytes} bytes, over the {} the kiosk reads, cost the connection; commands sent meanwhile got no answer (send them again with the same command_id); set the broker's message_size_limit to refuse such messages",
                        crate::mqtt::MAX_READ_PAYLOAD)}));
                }
            }
            Event::Mqtt(LinkEvent::Oversized { bytes }) => self.oversized = Some(bytes),
            Event::Mqtt(LinkEvent::Disconnected { .. }) => {}
            Event::Mqtt(LinkEvent::Alert { kind, reason }) => {
                self.link_alerts.insert(kind, reason);
                self.publish_state(false);
            }
            Event::Mqtt(LinkEvent::AlertCleared { kind }) => {
                self.link_alerts.remove(kind);
                self.publish_state(false);
            }
            Event::Mqtt(LinkEvent::Command(incoming)) => self.command(incoming),
            Event::Capture(progress) => self.capture_progress(progress),
            Event::CaptureDone { command_id, result } => self.capture_done(command_id, result),
            Event::Upload(event) => self.upload_event(event),
            Event::Camera(event) => self.camera_event(event),
        }
    }

    fn tick(&mut self) {
        let now = self.clock.monotonic();
        let heartbeat = self.config.mqtt.as_ref().map_or(Duration::from_secs(30), |m| m.heartbeat);
        if self.last_state_at.is_none_or(|t| now.saturating_sub(t) >= heartbeat) {
            self.publish_state(true);
        } else {
            self.publish_state(false);
        }
        if let Some(interval) = self.watchdog {
            if notify::watchdog_due(now, self.last_watchdog, interval, &self.beats.get()) {
                self.notifier.send("WATCHDOG=1");
                self.last_watchdog = Some(now);
            }
        }
        self.send_status_line();
        if self.last_prune.is_none_or(|t| now.saturating_sub(t) >= PRUNE_EVERY) {
            self.last_prune = Some(now);
            self.prune();
        }
    }

    /// The retention rule: completed inspections (the cloud has them) older than
    /// `buffer.completed_retention` leave the buffer, as `inspect` and `upload` do it.
    fn prune(&mut self) {
        let Some(retention) = self.config.buffer.completed_retention else { return };
        let Some(cutoff) = self.clock.wall().checked_sub(retention) else { return };
        let pruned = lock(&self.store).prune_completed(cutoff);
        match pruned {
            Ok(0) => {
                log::debug!(retention_s = retention.as_secs(); "Retention ran; no completed inspection is old enough to prune")
            }
            Ok(count) => {
                log::info!(inspections = count, retention_s = retention.as_secs(); "Retention pruned completed inspections from the buffer");
                self.publish_state(false);
            }
            Err(e) => {
                log::warn!(error:% = e; "Retention could not prune completed inspections; trying again later")
            }
        }
    }

    // ---- commands -------------------------------------------------------------------------

    fn command(&mut self, incoming: Incoming) {
        let name = incoming.name.clone();
        let parsed = if incoming.size > crate::mqtt::MAX_COMMAND_BYTES {
            Err(command::oversized(&incoming.payload, incoming.size))
        } else {
            command::parse(&name, &incoming.payload, self.clock.wall())
        };
        let command = match parsed {
            Ok(c) => c,
            Err(refused) => {
                if let Some(first) = refused.command_id.as_deref().and_then(|id| self.answered.get(id)) {
                    let first = first.clone();
                    return self.ack(&name, &first);
                }
                log::warn!(command = name.as_str(), command_id = refused.command_id.as_deref().unwrap_or(""), reason = refused.reason.as_str(); "Command rejected");
                let ack = Ack::rejected(refused.command_id.as_deref(), refused.reason);
                self.remember(&ack);
                return self.ack(&name, &ack);
            }
        };
        if let Some(first) = self.answered.get(&command.id) {
            let first = first.clone();
            log::info!(command = name.as_str(), command_id = command.id.as_str(); "Command seen before answered with its first outcome");
            return self.ack(&name, &first);
        }
        if self.running.as_ref().is_some_and(|r| r.command_id == command.id) {
            // The same start again before its first answer: it is running; say so, once more.
            let ack = Ack::new(Some(&command.id), AckStatus::Accepted);
            let ack = match self.running.as_ref().and_then(|r| r.inspection_id) {
                Some(inspection_id) => ack.with_inspection(inspection_id),
                None => ack,
            };
            return self.ack(&name, &ack);
        }
        let id = command.id.clone();
        let ack = match command.action {
            Action::Ping => Some(Ack::new(Some(&id), AckStatus::Succeeded)),
            Action::Start { case_id, vehicle, angles } => self.start(&id, case_id, vehicle, angles),
            Action::Cancel { inspection_id } => Some(self.cancel(&id, inspection_id)),
            Action::Retry { inspection_id } => Some(self.retry(&id, inspection_id)),
        };
        if let Some(ack) = ack {
            log::info!(command = name.as_str(), command_id = id.as_str(), status = format!("{:?}", ack.status).as_str(); "Command answered");
            self.remember(&ack);
            self.ack(&name, &ack);
        }
    }

    /// Remembers the first outcome of a command, in memory and in the buffer, so that the same
    /// command id is answered alike after a restart.
    fn remember(&mut self, ack: &Ack) {
        self.answered.remember(ack);
        if let Some(first) = ack.command_id.as_deref().and_then(|id| self.answered.get(id)) {
            let first = first.clone();
            self.persist_answer(&first);
        }
    }

    /// Writes `ack` as the answer to its command id in the buffer. A buffer that cannot take it
    /// (a full disk) costs only the memory of this command across a restart.
    fn persist_answer(&self, ack: &Ack) {
        let Some(id) = ack.command_id.as_deref() else { return };
        let answer = String::from_utf8_lossy(&ack.to_json()).into_owned();
        if let Err(e) = lock(&self.store).remember_command(id, &answer, self.clock.wall()) {
            log::warn!(command_id = id, error:% = e; "Could not record the command's answer in the buffer; a restart will forget this command id");
        }
    }

    /// Loads the answers the buffer remembers from before this start.
    fn recall_answers(&mut self) {
        let remembered = match lock(&self.store).remembered_commands() {
            Ok(r) => r,
            Err(e) => {
                log::warn!(error:% = e; "Could not read the answered commands from the buffer; command ids from before this start are forgotten");
                return;
            }
        };
        let count = remembered.len();
        for (id, answer) in remembered {
            match serde_json::from_str::<Ack>(&answer) {
                Ok(ack) if ack.command_id.as_deref() == Some(id.as_str()) => self.answered.remember(&ack),
                _ => {
                    log::warn!(command_id = id.as_str(); "Ignoring an unreadable command answer in the buffer")
                }
            }
        }
        if count > 0 {
            log::info!(commands = count; "Command ids answered before this start are remembered");
        }
    }

    fn ack(&self, name: &str, ack: &Ack) {
        if let Some(link) = &self.link {
            link.ack(name, ack.to_json());
        }
    }

    /// `None` when the answer comes later (once the inspection has an id).
    fn start(
        &mut self,
        id: &str,
        case_id: crate::vehicle::CaseId,
        vehicle: Option<Box<crate::vehicle::Vehicle>>,
        angles: Option<Vec<crate::vehicle::PhotoLabel>>,
    ) -> Option<Ack> {
        if let Some(r) = &self.running {
            return Some(Ack::rejected(
                Some(id),
                format!(
                    "a capture is running (case {}); wait for inspection_captured or send cancel",
                    r.case_id
                ),
            ));
        }
        let angles = angles.unwrap_or_else(|| self.config.inspection.angles.clone());
        let covered = self.config.covered_angles();
        if let Some(missing) = angles.iter().find(|a| !covered.contains(a)) {
            return Some(Ack::rejected(
                Some(id),
                format!("angle {missing} is not shot by any camera of this bay; leave it out"),
            ));
        }
        let settings = Settings {
            capture_attempts: self.config.inspection.capture_attempts,
            resize: self.config.imaging,
        };
        let refusal = lock(&self.store).would_refuse(angles.len(), settings.expected_image_bytes());
        match refusal {
            Ok(None) => {}
            Ok(Some(refusal)) => {
                self.emit(json!({"type": "buffer_full", "reason": refusal.to_string()}));
                return Some(Ack::rejected(
                    Some(id),
                    format!("the buffer is full ({refusal}); wait for uploads or free space"),
                ));
            }
            Err(e) => return Some(Ack::new(Some(id), AckStatus::Failed).with_reason(e.to_string())),
        }
        let request =
            Request { case_id: case_id.clone(), vehicle: vehicle.map(|v| *v), angles: angles.clone() };
        self.running = Some(Running {
            command_id: id.to_owned(),
            case_id: case_id.as_str().to_owned(),
            inspection_id: None,
            angles: angles.len(),
            done: 0,
        });
        // Recorded before the capture can begin, so that a restart in between does not take
        // the same command for a new one; replaced by the answer that names the inspection.
        self.persist_answer(&Ack::new(Some(id), AckStatus::Accepted));
        self.cancel.store(false, Ordering::SeqCst);
        if self.jobs.send(Job { command_id: id.to_owned(), request, settings }).is_err() {
            self.running = None;
            return Some(
                Ack::new(Some(id), AckStatus::Failed)
                    .with_reason("the capture loop has stopped; restart the kiosk"),
            );
        }
        self.publish_state(false);
        None
    }

    fn cancel(&mut self, id: &str, inspection_id: Option<InspectionId>) -> Ack {
        let Some(running) = &self.running else {
            return Ack::rejected(Some(id), "no capture is running; nothing to cancel");
        };
        if let (Some(asked), Some(current)) = (inspection_id, running.inspection_id) {
            if asked != current {
                return Ack::rejected(
                    Some(id),
                    format!("inspection {asked} is not the one capturing ({current}); nothing cancelled"),
                );
            }
        }
        self.cancel.store(true, Ordering::SeqCst);
        let ack = Ack::new(Some(id), AckStatus::Accepted);
        match running.inspection_id {
            Some(current) => ack.with_inspection(current),
            None => ack,
        }
    }

    fn retry(&mut self, id: &str, inspection_id: InspectionId) -> Ack {
        let mut store = lock(&self.store);
        let summary = match store.inspection(inspection_id) {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Ack::rejected(
                    Some(id),
                    format!("there is no inspection {inspection_id} in the buffer"),
                )
            }
            Err(e) => return Ack::new(Some(id), AckStatus::Failed).with_reason(e.to_string()),
        };
        if !matches!(summary.state, InspectionState::Failed | InspectionState::Cancelled) {
            return Ack::rejected(
                Some(id),
                format!(
                    "inspection {inspection_id} is {}; only a failed or cancelled inspection can be retried",
                    summary.state
                ),
            )
            .with_inspection(inspection_id);
        }
        match store.retry(inspection_id, self.clock.wall()) {
            Ok(_) => {
                drop(store);
                log::info!(inspection_id = inspection_id.0, case_id = summary.case_id.as_str(); "Inspection queued for upload again by an operator's retry");
                let _ = self.wake.send(());
                Ack::new(Some(id), AckStatus::Succeeded).with_inspection(inspection_id)
            }
            Err(e) => Ack::new(Some(id), AckStatus::Failed)
                .with_reason(e.to_string())
                .with_inspection(inspection_id),
        }
    }

    // ---- capture and upload ----------------------------------------------------------------

    fn capture_progress(&mut self, progress: Progress) {
        let (case_id, inspection_id) = match &self.running {
            Some(r) => (r.case_id.clone(), r.inspection_id),
            None => return,
        };
        match progress {
            Progress::Started { inspection_id, angles } => {
                if let Some(r) = &mut self.running {
                    r.inspection_id = Some(inspection_id);
                    let ack =
                        Ack::new(Some(&r.command_id), AckStatus::Accepted).with_inspection(inspection_id);
                    self.remember(&ack);
                    self.ack("start", &ack);
                }
                let angles: Vec<&str> = angles.iter().map(|a| a.as_str()).collect();
                self.emit(json!({"type": "inspection_started", "inspection_id": inspection_id, "case_id": case_id, "angles": angles}));
            }
            Progress::Captured { angle, camera, bytes, width, height, quality, .. } => {
                if let Some(r) = &mut self.running {
                    r.done += 1;
                }
                self.cameras.insert(camera.clone(), "online");
                self.emit(json!({"type": "angle_captured", "inspection_id": inspection_id, "case_id": case_id,
                    "angle": angle.as_str(), "camera": camera, "bytes": bytes, "width": width, "height": height,
                    "quality": quality}));
            }
            Progress::Failed { angle, camera, reason } => {
                if let Some(r) = &mut self.running {
                    r.done += 1;
                }
                self.cameras.insert(camera.clone(), "failing");
                self.emit(json!({"type": "angle_failed", "inspection_id": inspection_id, "case_id": case_id,
                    "angle": angle.as_str(), "camera": camera, "reason": reason}));
            }
            Progress::Retrying { .. } => {}
        }
        self.publish_state(false);
    }

    fn capture_done(
        &mut self,
        command_id: Option<String>,
        result: Result<(InspectionId, InspectionState), String>,
    ) {
        let running = self.running.take();
        let case_id = running.as_ref().map(|r| r.case_id.clone()).unwrap_or_default();
        match result {
            Ok((inspection_id, state)) => {
                let images = lock(&self.store).inspection(inspection_id).ok().flatten();
                let (count, bytes) = images.map_or((0, 0), |s| (s.images, s.bytes));
                let kind = match state {
                    InspectionState::Cancelled => "inspection_failed",
                    InspectionState::Failed => "inspection_failed",
                    _ => "inspection_captured",
                };
                let mut event = json!({"type": kind, "inspection_id": inspection_id, "case_id": case_id,
                    "state": state.as_str(), "images": count, "bytes": bytes});
                if state == InspectionState::Cancelled {
                    event["reason"] = json!("cancelled while capturing");
                }
                self.emit(event);
                let _ = self.wake.send(());
            }
            Err(reason) => {
                if let Some(id) = command_id {
                    // The inspection never started: the start command's answer is this failure.
                    if running.as_ref().is_some_and(|r| r.inspection_id.is_none()) {
                        let ack = Ack::rejected(Some(&id), reason.clone());
                        self.remember(&ack);
                        self.ack("start", &ack);
                    }
                }
                self.emit(json!({"type": "error", "case_id": case_id, "reason": reason}));
            }
        }
        self.publish_state(false);
    }

    fn camera_event(&mut self, event: crate::capture::health::CameraEvent) {
        use crate::capture::health::CameraEvent;
        match event {
            CameraEvent::Offline { camera, reason } => {
                self.emit(json!({"type": "camera_offline", "camera": camera, "reason": reason}));
            }
            CameraEvent::Online { camera } => {
                self.emit(json!({"type": "camera_online", "camera": camera}));
            }
        }
        self.publish_state(false);
    }

    fn upload_event(&mut self, event: UploadEvent) {
        let now = rfc3339_seconds(self.clock.wall());
        match event {
            UploadEvent::Started { inspection_id, case_id } => {
                self.uploading = Some((inspection_id, case_id));
            }
            UploadEvent::Progress { inspection_id, case_id, images_sent, images_total, bytes } => {
                self.emit(
                    json!({"type": "upload_progress", "inspection_id": inspection_id, "case_id": case_id,
                    "images_sent": images_sent, "images_total": images_total, "bytes": bytes}),
                );
            }
            UploadEvent::Uploaded { inspection_id, case_id, images, bytes } => {
                self.uploading = None;
                self.cloud["last_upload_at"] = json!(now);
                self.emit(
                    json!({"type": "inspection_uploaded", "inspection_id": inspection_id, "case_id": case_id,
                    "images": images, "bytes": bytes}),
                );
            }
            UploadEvent::SessionExpired { inspection_id, case_id } => {
                self.emit(
                    json!({"type": "session_expired", "inspection_id": inspection_id, "case_id": case_id}),
                );
            }
            UploadEvent::Failed { inspection_id, case_id, reason } => {
                self.uploading = None;
                self.emit(
                    json!({"type": "inspection_failed", "inspection_id": inspection_id, "case_id": case_id,
                    "reason": reason}),
                );
            }
            UploadEvent::Link { online, clock_trusted, detail } => {
                self.cloud["reachable"] = json!(online);
                self.cloud["clock_synced"] = json!(clock_trusted);
                self.cloud["last_error"] = json!(detail);
            }
        }
        self.publish_state(false);
    }

    // ---- status ----------------------------------------------------------------------------

    /// `buffer_recovered`, once per start (at the first connection, so that it is not dropped
    /// as sent while offline), for every salvage of a damaged buffer not acknowledged yet.
    fn announce_recoveries(&mut self) {
        if self.recoveries_announced {
            return;
        }
        self.recoveries_announced = true;
        let open = lock(&self.store).unacknowledged_recoveries().unwrap_or_default();
        for r in open {
            self.emit(json!({"type": "buffer_recovered", "recovery_id": r.id, "at": rfc3339_seconds(r.at),
                "moved_to": r.moved_to, "damage": r.damage, "reason": r.summary(), "report": r.report}));
        }
    }

    fn emit(&mut self, mut event: Value) {
        self.seq += 1;
        event["ts"] = json!(rfc3339_seconds(self.clock.wall()));
        event["seq"] = json!(self.seq);
        if let Some(link) = &self.link {
            link.event(event.to_string().into_bytes());
        }
    }

    fn stage(&self) -> &'static str {
        if self.running.is_some() {
            "capturing"
        } else if self.uploading.is_some() {
            "uploading"
        } else {
            "idle"
        }
    }

    /// Builds the state and hands it to the link when it changed (or always, when `force`).
    fn publish_state(&mut self, force: bool) {
        let now = self.clock.wall();
        let store = lock(&self.store);
        let totals = store.totals();
        let free = store.disk_free_bytes().ok();
        let settings = Settings { capture_attempts: 1, resize: self.config.imaging };
        let full = store
            .would_refuse(self.config.inspection.angles.len(), settings.expected_image_bytes())
            .map(|r| r.is_some())
            .unwrap_or(true);
        // A salvaged buffer lost evidence: a human must account for it and acknowledge.
        let mut alerts: Vec<Value> = store
            .unacknowledged_recoveries()
            .unwrap_or_default()
            .iter()
            .map(|r| json!({"type": "buffer_recovered", "reason": r.summary()}))
            .collect();
        if let Some(found) = store.damage_found() {
            let reason = format!("the buffer is damaged ({found}); restart the kiosk to salvage it");
            alerts.push(json!({"type": "buffer_damaged", "reason": reason}));
        }
        drop(store);
        for (kind, reason) in &self.link_alerts {
            alerts.push(json!({"type": kind, "reason": reason}));
        }
        let buffer = match &totals {
            Ok(t) => json!({
                "inspections": t.inspections, "images": t.images, "bytes": t.bytes,
                "awaiting_upload": t.awaiting_upload,
                "oldest_age_s": t.oldest_created_at.map(|o| (unix_millis(now) - unix_millis(o)).max(0) / 1000),
                "disk_free_bytes": free, "full": full }),
            Err(e) => json!({"error": e.to_string(), "full": true}),
        };
        let inspection = self.running.as_ref().map(|r| {
            json!({"inspection_id": r.inspection_id, "case_id": r.case_id, "angles": r.angles, "done": r.done})
        });
        let health = self.monitor.snapshot(self.clock.monotonic());
        let cameras: serde_json::Map<String, Value> = self
            .config
            .cameras
            .iter()
            .map(|c| {
                let h = health.iter().find(|h| h.camera == c.id);
                let status = h
                    .and_then(|h| serde_json::to_value(h.status).ok())
                    .unwrap_or_else(|| json!(self.cameras.get(&c.id).copied().unwrap_or("unknown")));
                let mut v = json!({"status": status});
                if let Some(h) = h {
                    v["last_frame_age_s"] = json!(h.last_frame_age_s);
                    v["reason"] = json!(h.reason);
                }
                (c.id.clone(), v)
            })
            .collect();
        let lifecycle = if full || totals.is_err() || !alerts.is_empty() { "alert" } else { "ready" };
        let body = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "lifecycle": lifecycle,
            "alerts": alerts,
            "stage": self.stage(),
            "inspection": inspection,
            "cameras": cameras,
            "buffer": buffer,
            "cloud": self.cloud,
        });
        // Free disk space moves all the time on a busy machine; it rides along, not a change.
        let changed = self.last_state.as_ref().is_none_or(|last| {
            let mut a = last.clone();
            let mut b = body.clone();
            for v in [&mut a, &mut b] {
                v["buffer"]["disk_free_bytes"] = Value::Null;
                // Frame ages grow every second; they ride along, not a change.
                if let Some(cams) = v["cameras"].as_object_mut() {
                    for cam in cams.values_mut() {
                        cam["last_frame_age_s"] = Value::Null;
                    }
                }
            }
            a != b
        });
        if !(changed || force) {
            return;
        }
        self.last_state = Some(body.clone());
        self.last_state_at = Some(self.clock.monotonic());
        self.seq += 1;
        let mut state = body;
        state["ts"] = json!(rfc3339_seconds(now));
        state["seq"] = json!(self.seq);
        state["boot_id"] = json!(self.boot_id);
        state["uptime_s"] = json!(self.clock.monotonic().saturating_sub(self.started).as_secs());
        if let Some(link) = &self.link {
            link.set_state(state.to_string().into_bytes());
        }
    }

    fn send_status_line(&mut self) {
        let buffered =
            self.last_state.as_ref().and_then(|s| s["buffer"]["inspections"].as_u64()).unwrap_or(0);
        let online = match &self.link {
            None => "no mqtt",
            Some(l) if l.is_connected() => "online",
            Some(_) => "offline",
        };
        let line = format!("STATUS=stage {}, {buffered} inspections buffered, broker {online}", self.stage());
        if line != self.last_status_line {
            self.notifier.send(&line);
            self.last_status_line = line;
        }
    }

    // ---- reload and shutdown ---------------------------------------------------------------

    fn reload(&mut self) {
        self.notifier.send("RELOADING=1");
        let Some(path) = self.config_path.clone() else {
            log::warn!("Reload asked for but the daemon has no config file to read");
            return self.notifier.send("READY=1");
        };
        match crate::config::load(&path) {
            Err(e) => {
                log::warn!(path:% = path.display(), error:% = e; "Reload refused: the configuration is invalid; the running one stays")
            }
            Ok(new) => {
                let mut restart = Vec::new();
                if new.bay_id != self.config.bay_id {
                    restart.push("bay_id");
                }
                if new.state_dir != self.config.state_dir {
                    restart.push("state_dir");
                }
                if format!("{:?}", new.cameras) != format!("{:?}", self.config.cameras) {
                    restart.push("cameras");
                }
                if new.mqtt != self.config.mqtt {
                    restart.push("mqtt");
                }
                if format!("{:?}", new.cloud) != format!("{:?}", self.config.cloud) {
                    restart.push("cloud");
                }
                lock(&self.store).set_caps(new.buffer.caps);
                self.config.buffer = new.buffer;
                self.config.inspection = new.inspection;
                self.config.imaging = new.imaging;
                if let (Some(old), Some(new)) = (&mut self.config.mqtt, &new.mqtt) {
                    old.heartbeat = new.heartbeat;
                }
                if restart.is_empty() {
                    log::info!(path:% = path.display(); "Configuration reloaded");
                } else {
                    log::warn!(path:% = path.display(), needs_restart = restart.join(", ").as_str(); "Configuration reloaded; changed keys that need a restart were not applied");
                }
                self.publish_state(false);
            }
        }
        self.notifier.send("READY=1");
    }

    fn shut_down(&mut self, inbox: &Receiver<Event>) {
        log::info!("Daemon stopping");
        self.notifier.send("STOPPING=1");
        // A capture in progress is finished, not cancelled: the car is in the bay and what it
        // takes is evidence. Should the stop outlast systemd's TimeoutStopSec, the kill leaves
        // the inspection capturing and the next start closes it with what it holds.
        self.stop_upload.store(true, Ordering::SeqCst);
        let _ = self.wake.send(());
        // Closing the job channel ends the capture loop once the running inspection stopped.
        let (closed, _) = mpsc::channel();
        self.jobs = closed;
        if let Some(capture) = self.capture.take() {
            let _ = capture.join();
        }
        while let Ok(event) = inbox.try_recv() {
            if matches!(event, Event::Capture(_) | Event::CaptureDone { .. }) {
                self.handle(event);
            }
        }
        self.publish_state(true);
        if let Some(link) = &self.link {
            // Give the last state a moment to leave, then say offline.
            std::thread::sleep(crate::mqtt::STATE_MIN_INTERVAL);
            link.stop(Duration::from_secs(2));
        }
        log::info!("Daemon stopped");
    }
}

#[allow(clippy::too_many_arguments)]
fn capture_loop(
    rig: &mut Rig,
    store: &Mutex<Store>,
    jobs: &Receiver<Job>,
    events: &Sender<Event>,
    clock: &dyn Clock,
    cancel: &AtomicBool,
    beats: &Beats,
    hooks: &Hooks,
) {
    loop {
        while hooks.wedge_capture.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        beats.beat(CAPTURE_LOOP, clock.monotonic());
        let job = match jobs.recv_timeout(BEAT) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Idle: the cheap health checks that are due; a camera that came back is
                // re-attached here.
                rig.probe_due(clock.monotonic());
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let result = inspection::run(rig, store, &job.request, &job.settings, clock, cancel, &mut |p| {
            beats.beat(CAPTURE_LOOP, clock.monotonic());
            let _ = events.send(Event::Capture(p.clone()));
        });
        let result = match result {
            Ok(outcome) => Ok((outcome.inspection_id, outcome.state)),
            Err(e @ InspectionError::Store(StoreError::Full { .. })) => {
                Err(format!("{e}; wait for uploads or free space"))
            }
            Err(e) => Err(e.to_string()),
        };
        let _ = events.send(Event::CaptureDone { command_id: Some(job.command_id), result });
    }
}

fn upload_loop(
    leg: &mut dyn UploadLeg,
    wake: &Receiver<()>,
    events: &Sender<Event>,
    clock: &dyn Clock,
    beats: &Beats,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::SeqCst) {
        beats.beat(UPLOAD_LOOP, clock.monotonic());
        // Every event shows the loop alive too: a pump that sends a large inspection over a
        // slow uplink makes progress request by request, each within its deadline.
        let pause = leg.pump(&mut |e| {
            beats.beat(UPLOAD_LOOP, clock.monotonic());
            let _ = events.send(Event::Upload(e));
        });
        let deadline = clock.monotonic() + pause;
        loop {
            beats.beat(UPLOAD_LOOP, clock.monotonic());
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let left = deadline.saturating_sub(clock.monotonic());
            if left.is_zero() {
                break;
            }
            match wake.recv_timeout(left.min(BEAT)) {
                Ok(()) => {
                    leg.wake();
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
