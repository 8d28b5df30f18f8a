//! `capture-kiosk run`: the long-running daemon, as a thin shell around the pure
//! [`core::Bay`]. The supervisor thread takes the shell's [`Event`]s from one channel, reads
//! the buffer and the cameras on a handle of its own ([`Input::Observed`]), hands each event to
//! the bay as an [`Input`] and carries out the [`Effect`]s it answers with. Capture runs
//! [`inspection::run`] on a thread of its own, the upload leg ([`UploadLeg`]) on another, and
//! MQTT ([`crate::mqtt::Link`]) on its own, which nothing ever waits for. The shell decides
//! nothing: every decision is in `core`, where a unit test reaches it.
//!
//! ```text
//!  signals   mqtt commands   capture progress   upload events   camera health   tick
//!     └───────────┴───────────────┴──► Event ◄───────┴───────────────┴──────────┘
//!                                        │ shell (supervisor thread)
//!              buffer facts ──► Input ──►│ Bay::handle(input, now) ──► Vec<Effect>
//!             ┌──────────────┬───────────┼──────────────┬──────────────────┐
//!        capture thread  upload thread   Link (state,   sd_notify          the buffer
//!        (jobs, cancel)  (wake)          events, acks)  (READY, WATCHDOG)  (answers, retry, prune)
//! ```

pub mod command;
pub mod core;
pub mod discovery;
pub mod notify;
pub mod upload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use crate::clock::Clock;
use crate::config::Config;
use crate::display::{self, Display, PreviewJob};
use crate::inspection::{self, InspectionError, Progress, Rig};
use crate::mqtt::{Link, LinkEvent};
use crate::status;
use crate::store::{InspectionId, Store, StoreError};

use self::core::{Bay, CaptureEnd, Effect, Input, Job, Now, Reloaded, Requeue};
use command::Ack;
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
        result: Result<CaptureEnd, String>,
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

/// Test hooks. `wedge_capture` makes the capture loop stop beating, as a hung camera would;
/// `hold_buffer` makes it hold its handle on the buffer, as a commit stuck in a slow fsync would.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub wedge_capture: Arc<AtomicBool>,
    pub hold_buffer: Arc<AtomicBool>,
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
    display: Option<std::net::SocketAddr>,
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

    /// Where the driver's screen and the camera page are served, when they are.
    pub fn display_addr(&self) -> Option<std::net::SocketAddr> {
        self.display
    }

    /// Waits until the daemon stopped.
    pub fn wait(self) -> anyhow::Result<()> {
        match self.supervisor.join() {
            Ok(result) => result,
            Err(_) => anyhow::bail!("the supervisor thread panicked"),
        }
    }
}

/// Opens the buffer, starts every loop and the MQTT link, then says `READY=1`. A buffer large
/// enough that checking it takes a while is opened after the link has started, so that the bay
/// shows `lifecycle: init` meanwhile.
pub fn start(config: Config, deps: Deps) -> anyhow::Result<Daemon> {
    let clock = deps.clock.clone();
    let boot_id = format!("{:016x}", fastrand::u64(..));
    let mut bay = Bay::new(config.clone(), boot_id, now(clock.as_ref()), deps.watchdog);
    let (events, inbox) = mpsc::channel();
    let (previews, preview_inbox) = mpsc::channel::<PreviewJob>();
    let display = start_display(&config, previews);
    let display_addr = display.as_ref().map(Display::addr);
    let mut shell = Shell {
        display,
        link: None,
        notifier: deps.notifier,
        config_path: deps.config_path,
        clock: clock.clone(),
        parts: None,
    };
    let slow_open = buffer_bytes(&config) > SLOW_OPEN_BYTES;
    if slow_open {
        shell.link = start_link(&config, &events)?;
        let effects = bay.handle(Input::Publish, now(clock.as_ref()));
        shell.carry_out(effects, &mut bay);
    }
    let store = match open_buffer(&config, &shell.notifier, clock.as_ref()) {
        Ok(store) => store,
        Err(e) => {
            if let Some(link) = &shell.link {
                link.stop(Duration::from_secs(1));
            }
            return Err(e);
        }
    };
    if !slow_open {
        shell.link = start_link(&config, &events)?;
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
    // The supervisor's own handle: status reads never wait for the capture's transactions.
    let status = store.another_handle().context("the daemon cannot open its status handle on the buffer")?;
    let store = Arc::new(Mutex::new(store));

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
            let inbox = Inbox { jobs: &job_inbox, previews: &preview_inbox };
            capture_loop(&mut rig, &store, inbox, &events, clock.as_ref(), &cancel, &beats, &hooks)
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
    let remembered = status.remembered_commands().unwrap_or_else(|e| {
        log::warn!(error:% = e; "Could not read the answered commands from the buffer; command ids from before this start are forgotten");
        Vec::new()
    });
    shell.parts = Some(Parts {
        status,
        store,
        monitor,
        jobs,
        capture: Some(capture),
        cancel,
        wake,
        stop_upload,
        beats,
    });
    shell.observe(&mut bay);
    let effects = bay.handle(Input::Opened { remembered }, now(clock.as_ref()));
    shell.carry_out(effects, &mut bay);
    shell.notifier.send("READY=1");
    log::info!(bay_id = bay.config().bay_id.as_str(), state_dir:% = bay.config().state_dir.display(); "Daemon ready");
    let supervisor =
        std::thread::Builder::new().name("supervisor".to_owned()).spawn(move || shell.run(bay, &inbox))?;
    Ok(Daemon { events, display: display_addr, supervisor })
}

/// Starts the driver's screen and the camera page. A bay whose pages cannot be served still
/// takes cars: the reason is logged and the daemon runs on without them.
fn start_display(config: &Config, previews: Sender<PreviewJob>) -> Option<Display> {
    if !config.display.enabled {
        return None;
    }
    let started = display::token(&config.display, &config.state_dir).and_then(|token| {
        let hint = token.1.how_to_read();
        let bay = display::BayInfo {
            bay_id: config.bay_id.clone(),
            cameras: display::CameraInfo::of(&config.cameras),
        };
        Display::start(&config.display, bay, token, previews).map(|d| (d, hint))
    });
    match started {
        Ok((display, hint)) => {
            log::info!(url:% = format!("http://{}/", display.addr()), camera_page_token:% = hint; "Serving the driver's screen at / and the camera page at /cameras");
            Some(display)
        }
        Err(e) => {
            log::warn!(error:% = e; "The bay's screen and camera page are not served; the bay takes cars without them");
            None
        }
    }
}

/// A buffer file above this size is checked with the MQTT link already up (`lifecycle: init`):
/// about 6 s at an SD card's speed.
const SLOW_OPEN_BYTES: u64 = 64 << 20;

fn buffer_bytes(config: &Config) -> u64 {
    std::fs::metadata(config.state_dir.join(crate::store::FILE_NAME)).map_or(0, |m| m.len())
}

fn start_link(config: &Config, events: &Sender<Event>) -> anyhow::Result<Option<Link>> {
    let Some(mqtt) = &config.mqtt else { return Ok(None) };
    let to_supervisor = Mutex::new(events.clone());
    let on_event = Box::new(move |e: LinkEvent| {
        let _ = lock(&to_supervisor).send(Event::Mqtt(e));
    });
    let link = Link::start(mqtt, &config.bay_id, on_event).context("the MQTT link cannot be set up")?;
    if let Some(messages) = discovery::retained(config) {
        link.set_retained(messages);
    }
    Ok(Some(link))
}

/// Opens the buffer as its owner, telling systemd first how long checking it may take.
fn open_buffer(config: &Config, notifier: &Notifier, clock: &dyn Clock) -> anyhow::Result<Store> {
    let buffer_bytes = buffer_bytes(config);
    let allowance = notify::start_allowance(buffer_bytes);
    // Before any open of the buffer: opening it as its owner checks every page.
    notifier.send(&format!("EXTEND_TIMEOUT_USEC={}", allowance.as_micros()));
    notifier.send(&format!("STATUS=checking the buffer ({} MiB)", buffer_bytes >> 20));
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
    Ok(store)
}

fn now(clock: &dyn Clock) -> Now {
    Now { wall: clock.wall(), mono: clock.monotonic() }
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

/// The shell: carries inputs to the [`Bay`] and its effects out to the threads, the buffer,
/// the MQTT link and systemd. It decides nothing.
struct Shell {
    /// The driver's screen and the camera page, when served.
    display: Option<Display>,
    link: Option<Link>,
    notifier: Notifier,
    config_path: Option<PathBuf>,
    clock: Arc<dyn Clock>,
    /// What exists once the buffer is open.
    parts: Option<Parts>,
}

struct Parts {
    /// The supervisor's handle on the buffer: status reads, command answers, retries, pruning.
    status: Store,
    /// The owner's handle, which the capture thread writes through (and a reload re-caps).
    store: Arc<Mutex<Store>>,
    /// The cameras' health, shared with the rig on the capture thread.
    monitor: crate::capture::health::Monitor,
    jobs: Sender<Job>,
    capture: Option<JoinHandle<()>>,
    cancel: Arc<AtomicBool>,
    wake: Sender<()>,
    stop_upload: Arc<AtomicBool>,
    beats: Beats,
}

impl Shell {
    fn run(mut self, mut bay: Bay, inbox: &Receiver<Event>) -> anyhow::Result<()> {
        loop {
            let first = match inbox.recv_timeout(TICK) {
                Ok(event) => Some(event),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            // One look at the buffer for everything that queued up meanwhile.
            self.observe(&mut bay);
            let mut next = first;
            let mut stop = false;
            while let Some(event) = next {
                match self.input(event) {
                    Some(input) => {
                        let effects = bay.handle(input, now(self.clock.as_ref()));
                        self.carry_out(effects, &mut bay);
                    }
                    None => stop = true,
                }
                if stop {
                    break;
                }
                next = inbox.try_recv().ok();
            }
            if stop {
                break;
            }
            let beats = self.parts.as_ref().map(|p| p.beats.get().to_vec()).unwrap_or_default();
            let effects = bay.handle(Input::Tick { beats }, now(self.clock.as_ref()));
            self.carry_out(effects, &mut bay);
        }
        self.shut_down(bay, inbox);
        Ok(())
    }

    /// The core's input for a shell event; `None` for the signal to stop.
    fn input(&mut self, event: Event) -> Option<Input> {
        Some(match event {
            Event::Signal(Signal::Terminate) => return None,
            Event::Signal(Signal::Reload) => Input::Reload(self.read_config()),
            Event::Mqtt(e) => Input::Link(e),
            Event::Capture(p) => Input::Capture(p),
            Event::CaptureDone { command_id, result } => Input::CaptureDone { command_id, result },
            Event::Upload(e) => Input::Upload(e),
            Event::Camera(e) => Input::Camera(e),
        })
    }

    fn read_config(&self) -> Reloaded {
        let Some(path) = &self.config_path else { return Reloaded::NoFile };
        let shown = path.display().to_string();
        match crate::config::load(path) {
            Ok(config) => Reloaded::Loaded { path: shown, config: Box::new(config) },
            Err(e) => Reloaded::Invalid { path: shown, reason: e.to_string() },
        }
    }

    /// Hands the core a fresh look at the buffer and the cameras.
    fn observe(&mut self, bay: &mut Bay) {
        let Some(parts) = &self.parts else { return };
        let buffer = parts.status.observe().map_err(|e| e.to_string());
        let cameras = parts.monitor.snapshot(self.clock.monotonic());
        let effects = bay.handle(Input::Observed { buffer, cameras }, now(self.clock.as_ref()));
        self.carry_out(effects, bay);
    }

    fn carry_out(&mut self, effects: Vec<Effect>, bay: &mut Bay) {
        for effect in effects {
            match effect {
                Effect::Ack { command, ack } => {
                    if let Some(link) = &self.link {
                        link.ack(&command, status::to_bytes(&ack));
                    }
                }
                Effect::Emit(event) => {
                    if let Some(display) = &self.display {
                        display.event(&event);
                    }
                    if let Some(link) = &self.link {
                        link.event(status::to_bytes(&event));
                    }
                }
                Effect::PublishState(state) => {
                    if let Some(display) = &self.display {
                        display.state(&state);
                    }
                    if let Some(link) = &self.link {
                        link.set_state(status::to_bytes(&state));
                    }
                }
                Effect::Notify(line) => self.notifier.send(&line),
                Effect::RememberAnswer(ack) => self.remember(&ack),
                Effect::StartCapture(job) => {
                    let command_id = job.command_id.clone();
                    let sent = match &self.parts {
                        Some(parts) => {
                            parts.cancel.store(false, Ordering::SeqCst);
                            parts.jobs.send(*job).is_ok()
                        }
                        None => false,
                    };
                    if !sent {
                        let effects =
                            bay.handle(Input::CaptureUnavailable { command_id }, now(self.clock.as_ref()));
                        self.carry_out(effects, bay);
                    }
                }
                Effect::CancelCapture => {
                    if let Some(parts) = &self.parts {
                        parts.cancel.store(true, Ordering::SeqCst);
                    }
                }
                Effect::WakeUpload => {
                    if let Some(parts) = &self.parts {
                        let _ = parts.wake.send(());
                    }
                }
                Effect::Requeue { command_id, inspection_id } => {
                    let result = self.requeue(inspection_id);
                    self.observe(bay);
                    let effects = bay.handle(
                        Input::Requeued { command_id, inspection_id, result },
                        now(self.clock.as_ref()),
                    );
                    self.carry_out(effects, bay);
                }
                Effect::Prune { cutoff, retention } => self.prune(cutoff, retention),
                Effect::SetCaps(caps) => {
                    if let Some(parts) = &mut self.parts {
                        lock(&parts.store).set_caps(caps);
                        parts.status.set_caps(caps);
                    }
                }
            }
        }
    }

    /// Writes a command's answer in the buffer. A buffer that cannot take it (a full disk)
    /// costs only the memory of this command across a restart.
    fn remember(&mut self, ack: &Ack) {
        let (Some(parts), Some(id)) = (&mut self.parts, ack.command_id.as_deref()) else { return };
        let answer = String::from_utf8_lossy(&ack.to_json()).into_owned();
        if let Err(e) = parts.status.remember_command(id, &answer, self.clock.wall()) {
            log::warn!(command_id = id, error:% = e; "Could not record the command's answer in the buffer; a restart will forget this command id");
        }
    }

    fn requeue(&mut self, inspection_id: InspectionId) -> Requeue {
        let Some(parts) = &mut self.parts else { return Requeue::Failed("the buffer is not open".into()) };
        match parts.status.retry(inspection_id, self.clock.wall()) {
            Ok(_) => Requeue::Done,
            Err(StoreError::UnknownInspection { .. }) => Requeue::Unknown,
            Err(StoreError::IllegalTransition { from, .. }) => Requeue::NotRetryable(from),
            Err(e) => Requeue::Failed(e.to_string()),
        }
    }

    /// The retention rule: completed inspections (the cloud has them) older than
    /// `buffer.completed_retention` leave the buffer, as `inspect` and `upload` do it.
    fn prune(&mut self, cutoff: std::time::SystemTime, retention: Duration) {
        let Some(parts) = &mut self.parts else { return };
        match parts.status.prune_completed(cutoff) {
            Ok(0) => {
                log::debug!(retention_s = retention.as_secs(); "Retention ran; no completed inspection is old enough to prune")
            }
            Ok(count) => {
                log::info!(inspections = count, retention_s = retention.as_secs(); "Retention pruned completed inspections from the buffer")
            }
            Err(e) => {
                log::warn!(error:% = e; "Retention could not prune completed inspections; trying again later")
            }
        }
    }

    fn shut_down(&mut self, mut bay: Bay, inbox: &Receiver<Event>) {
        log::info!("Daemon stopping");
        self.notifier.send("STOPPING=1");
        if let Some(parts) = &mut self.parts {
            // A capture in progress is finished, not cancelled: the car is in the bay and what
            // it takes is evidence. Should the stop outlast systemd's TimeoutStopSec, the kill
            // leaves the inspection capturing and the next start closes it with what it holds.
            parts.stop_upload.store(true, Ordering::SeqCst);
            let _ = parts.wake.send(());
            // Closing the job channel ends the capture loop once the running inspection stopped.
            let (closed, _) = mpsc::channel();
            parts.jobs = closed;
            if let Some(capture) = parts.capture.take() {
                let _ = capture.join();
            }
        }
        self.observe(&mut bay);
        while let Ok(event) = inbox.try_recv() {
            if matches!(event, Event::Capture(_) | Event::CaptureDone { .. }) {
                if let Some(input) = self.input(event) {
                    let effects = bay.handle(input, now(self.clock.as_ref()));
                    self.carry_out(effects, &mut bay);
                }
            }
        }
        let effects = bay.handle(Input::Publish, now(self.clock.as_ref()));
        self.carry_out(effects, &mut bay);
        if let Some(link) = &self.link {
            // The link hands over the last state and events, then says offline.
            link.stop(Duration::from_secs(2));
        }
        if let Some(display) = self.display.take() {
            display.stop();
        }
        log::info!("Daemon stopped");
    }
}

/// What the capture thread takes work from: inspections first, frames for the camera page only
/// while no inspection waits.
struct Inbox<'a> {
    jobs: &'a Receiver<Job>,
    previews: &'a Receiver<PreviewJob>,
}

/// How long the idle capture loop waits for work before it looks for camera-page frames and
/// due health checks.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// The camera page's frames: small enough for a phone, large enough to aim by.
const PREVIEW: crate::imaging::ResizeSpec =
    crate::imaging::ResizeSpec { max_long_edge: 960, jpeg_quality: 80 };

#[allow(clippy::too_many_arguments)]
fn capture_loop(
    rig: &mut Rig,
    store: &Mutex<Store>,
    inbox: Inbox<'_>,
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
        if hooks.hold_buffer.load(Ordering::SeqCst) {
            let _held = lock(store);
            while hooks.hold_buffer.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        beats.beat(CAPTURE_LOOP, clock.monotonic());
        let job = match inbox.jobs.try_recv() {
            Ok(job) => job,
            Err(mpsc::TryRecvError::Disconnected) => return,
            Err(mpsc::TryRecvError::Empty) => {
                if let Ok(preview) = inbox.previews.try_recv() {
                    let frame = rig.preview(&preview.camera, &PREVIEW, clock.monotonic());
                    let _ = preview.reply.send(frame);
                    continue;
                }
                match inbox.jobs.recv_timeout(IDLE_WAIT) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        // Idle: the cheap health checks that are due; a camera that came back
                        // is re-attached here.
                        rig.probe_due(clock.monotonic());
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        };
        let result = inspection::run(rig, store, &job.request, &job.settings, clock, cancel, &mut |p| {
            beats.beat(CAPTURE_LOOP, clock.monotonic());
            let _ = events.send(Event::Capture(p.clone()));
        });
        let result = match result {
            Ok(outcome) => Ok(CaptureEnd {
                inspection_id: outcome.inspection_id,
                state: outcome.state,
                images: outcome.captured.len() as u64,
                bytes: outcome.stored_bytes,
            }),
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
