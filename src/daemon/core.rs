//! The daemon's decisions, with no I/O: [`Bay`] takes one [`Input`] at a time with the time it
//! happened ([`Now`]) and answers with the [`Effect`]s the shell must carry out. Refusing a
//! `start`, answering a command seen before, what a retry may do, the stage and lifecycle,
//! which alerts hold, when `state` goes out and when systemd hears from the daemon are all
//! decided here, and tested in `tests` below with no broker, no buffer and no sleeping.
//!
//! What the core needs to know about the world comes in as inputs: the shell reads the buffer
//! ([`BufferFacts`]) and the cameras' health on a handle of its own before it hands in
//! anything, so that a decision sees the buffer as it is; what the core wants done (a capture,
//! an answer written to the buffer, a requeue) goes out as effects, and a result that matters
//! comes back as another input ([`Input::Requeued`]).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::capture::health::{CameraEvent, CameraHealth};
use crate::clock::rfc3339_seconds;
use crate::config::Config;
use crate::inspection::{Progress, Request, Settings};
use crate::mqtt::{Incoming, LinkEvent};
use crate::status::{
    Alert, AlertKind, BufferStatus, CameraState, CameraStatus, CloudStatus, Event, EventKind,
    InspectionStatus, Lifecycle, Stage, State,
};
use crate::store::{BufferFacts, Caps, InspectionId, InspectionState};

use super::command::{self, Ack, AckStatus, Action, Answered};
use super::notify::{self, Beat};
use super::upload::UploadEvent;
use super::PRUNE_EVERY;

/// Share of `[buffer] max_bytes` above which the buffer is an alert before it refuses.
pub const NEARLY_FULL: f64 = 0.9;

/// The time an input happened: wall time for what is published, monotonic for intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub wall: SystemTime,
    pub mono: Duration,
}

/// Everything that can make the bay act. Every trigger is listed here.
#[derive(Debug)]
pub enum Input {
    /// The buffer is open; `remembered` are the command answers it kept from before.
    Opened {
        remembered: Vec<(String, String)>,
    },
    /// What the buffer and the cameras look like now; the shell sends it before the other
    /// inputs it hands in, so decisions see the buffer as it is.
    Observed {
        buffer: Result<BufferFacts, String>,
        cameras: Vec<CameraHealth>,
    },
    /// The MQTT link: connections, losses, alerts and commands.
    Link(LinkEvent),
    Capture(Progress),
    /// The capture of the start command `command_id` ended.
    CaptureDone {
        command_id: Option<String>,
        result: Result<CaptureEnd, String>,
    },
    /// The capture loop is gone; the start command could not be handed to it.
    CaptureUnavailable {
        command_id: String,
    },
    Upload(UploadEvent),
    Camera(CameraEvent),
    /// What became of an [`Effect::Requeue`].
    Requeued {
        command_id: String,
        inspection_id: InspectionId,
        result: Requeue,
    },
    /// Time passed; `beats` is when each worker loop last showed it is alive.
    Tick {
        beats: Vec<Beat>,
    },
    /// SIGHUP: the configuration file as read again.
    Reload(Reloaded),
    /// Publish the state whatever changed: the first one, and the last one at a stop.
    Publish,
}

/// How a capture ended, for [`Input::CaptureDone`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureEnd {
    pub inspection_id: InspectionId,
    pub state: InspectionState,
    pub images: u64,
    pub bytes: u64,
}

/// What the buffer did with an operator's retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeue {
    /// Back in the upload queue.
    Done,
    /// No such inspection.
    Unknown,
    /// The inspection is in a state a retry cannot leave.
    NotRetryable(InspectionState),
    /// The buffer could not do it.
    Failed(String),
}

/// The configuration as read again on SIGHUP.
#[derive(Debug)]
pub enum Reloaded {
    /// The daemon was started without a file to read.
    NoFile,
    Invalid {
        path: String,
        reason: String,
    },
    Loaded {
        path: String,
        config: Box<Config>,
    },
}

/// A capture to run, for the capture thread.
#[derive(Debug, Clone)]
pub struct Job {
    pub command_id: String,
    pub request: Request,
    pub settings: Settings,
}

/// What the shell must do. The order within one answer matters: carry them out in order.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Publish `ack` on `cmd/{command}/ack`.
    Ack {
        command: String,
        ack: Ack,
    },
    /// Publish an event.
    Emit(Event),
    /// Publish the retained state.
    PublishState(Box<State>),
    /// Write a command's answer to the buffer, so that a restart answers it alike.
    RememberAnswer(Ack),
    StartCapture(Box<Job>),
    /// Ask the running capture to stop.
    CancelCapture,
    /// Cut the upload leg's wait short.
    WakeUpload,
    /// Put a failed or cancelled inspection back in the upload queue; answer with
    /// [`Input::Requeued`].
    Requeue {
        command_id: String,
        inspection_id: InspectionId,
    },
    /// Prune completed inspections created before `cutoff` (the retention rule).
    Prune {
        cutoff: SystemTime,
        retention: Duration,
    },
    /// New caps for the buffer (a reload).
    SetCaps(Caps),
    /// A line for systemd (`READY=1`, `WATCHDOG=1`, `STATUS=…`).
    Notify(String),
}

/// The inspection being captured.
#[derive(Debug, Clone)]
struct Running {
    command_id: String,
    case_id: String,
    inspection_id: Option<InspectionId>,
    angles: usize,
    done: usize,
}

/// The bay's state and its decisions.
pub struct Bay {
    config: Config,
    boot_id: String,
    started: Duration,
    watchdog: Option<Duration>,
    answered: Answered,
    opened: bool,
    buffer: Option<Result<BufferFacts, String>>,
    cameras: Vec<CameraHealth>,
    running: Option<Running>,
    uploading: Option<(i64, String)>,
    cloud: CloudStatus,
    seq: u64,
    connected: bool,
    last_state: Option<State>,
    last_state_at: Option<Duration>,
    last_watchdog: Option<Duration>,
    last_status_line: String,
    last_prune: Option<Duration>,
    /// The size of an MQTT message that cost the connection, told once it is back.
    oversized: Option<usize>,
    /// Whether this start already sent `buffer_recovered` for the unacknowledged salvages.
    recoveries_announced: bool,
    /// What the MQTT link says a person must act on, by kind.
    link_alerts: BTreeMap<AlertKind, String>,
    effects: Vec<Effect>,
}

impl Bay {
    /// A bay starting at `now` with `config`; `watchdog` is systemd's interval, if it asked.
    pub fn new(config: Config, boot_id: String, now: Now, watchdog: Option<Duration>) -> Bay {
        Bay {
            config,
            boot_id,
            started: now.mono,
            watchdog,
            answered: Answered::default(),
            opened: false,
            buffer: None,
            cameras: Vec::new(),
            running: None,
            uploading: None,
            cloud: CloudStatus::default(),
            seq: 0,
            connected: false,
            last_state: None,
            last_state_at: None,
            last_watchdog: None,
            last_status_line: String::new(),
            last_prune: None,
            oversized: None,
            recoveries_announced: false,
            link_alerts: BTreeMap::new(),
            effects: Vec::new(),
        }
    }

    /// The configuration in force (reloads change part of it).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether a capture runs.
    pub fn capturing(&self) -> bool {
        self.running.is_some()
    }

    /// The state last published, if any.
    pub fn last_state(&self) -> Option<&State> {
        self.last_state.as_ref()
    }

    /// Takes one input and returns what to do about it, in order.
    pub fn handle(&mut self, input: Input, now: Now) -> Vec<Effect> {
        let force = match input {
            Input::Opened { remembered } => {
                self.opened = true;
                self.recall(remembered);
                true
            }
            Input::Observed { buffer, cameras } => {
                self.buffer = Some(buffer);
                self.cameras = cameras;
                false
            }
            Input::Link(event) => self.link_event(event, now),
            Input::Capture(progress) => {
                self.capture_progress(progress, now);
                false
            }
            Input::CaptureDone { command_id, result } => {
                self.capture_done(command_id, result, now);
                false
            }
            Input::CaptureUnavailable { command_id } => {
                self.running = None;
                let ack = Ack::new(Some(&command_id), AckStatus::Failed)
                    .with_reason("the capture loop has stopped; restart the kiosk");
                self.answer("start", ack);
                false
            }
            Input::Upload(event) => {
                self.upload_event(event, now);
                false
            }
            Input::Camera(event) => {
                self.camera_event(event, now);
                false
            }
            Input::Requeued { command_id, inspection_id, result } => {
                self.requeued(&command_id, inspection_id, result);
                false
            }
            Input::Tick { beats } => {
                self.tick(&beats, now);
                let heartbeat = self.config.mqtt.as_ref().map_or(Duration::from_secs(30), |m| m.heartbeat);
                self.last_state_at.is_none_or(|t| now.mono.saturating_sub(t) >= heartbeat)
            }
            Input::Reload(reloaded) => {
                self.reload(reloaded);
                false
            }
            Input::Publish => true,
        };
        // Before the buffer is open only an explicit publish shows `init`: a look at the
        // buffer on the way to `Opened` is not news.
        if self.opened || force {
            self.publish_state(force, now);
        }
        self.status_line();
        std::mem::take(&mut self.effects)
    }

    // ---- commands ----------------------------------------------------------------------------

    fn link_event(&mut self, event: LinkEvent, now: Now) -> bool {
        match event {
            LinkEvent::Connected => {
                self.connected = true;
                self.announce_recoveries(now);
                if let Some(bytes) = self.oversized.take() {
                    self.emit(EventKind::Error { case_id: None, reason: format!(
                        "an MQTT message of {bytes} bytes, over the {} the kiosk reads, cost the connection; commands sent meanwhile got no answer (send them again with the same command_id); set the broker's message_size_limit to refuse such messages",
                        crate::mqtt::MAX_READ_PAYLOAD) }, now);
                }
                true
            }
            LinkEvent::Disconnected { .. } => {
                self.connected = false;
                false
            }
            LinkEvent::Oversized { bytes } => {
                self.oversized = Some(bytes);
                false
            }
            LinkEvent::Alert { kind, reason } => {
                if let Some(kind) = AlertKind::of_link(kind) {
                    self.link_alerts.insert(kind, reason);
                }
                false
            }
            LinkEvent::AlertCleared { kind } => {
                if let Some(kind) = AlertKind::of_link(kind) {
                    self.link_alerts.remove(&kind);
                }
                false
            }
            LinkEvent::Command(incoming) => {
                self.command(incoming, now);
                false
            }
        }
    }

    fn command(&mut self, incoming: Incoming, now: Now) {
        let name = incoming.name;
        let parsed = if incoming.size > crate::mqtt::MAX_COMMAND_BYTES {
            Err(command::oversized(&incoming.payload, incoming.size))
        } else {
            command::parse(&name, &incoming.payload, now.wall)
        };
        let command = match parsed {
            Ok(c) => c,
            Err(refused) => {
                if let Some(first) = refused.command_id.as_deref().and_then(|id| self.answered.get(id)) {
                    let first = first.clone();
                    return self.ack(&name, first);
                }
                log::warn!(command = name.as_str(), command_id = refused.command_id.as_deref().unwrap_or(""), reason = refused.reason.as_str(); "Command rejected");
                let ack = Ack::rejected(refused.command_id.as_deref(), refused.reason);
                return self.answer(&name, ack);
            }
        };
        if let Some(first) = self.answered.get(&command.id) {
            let first = first.clone();
            log::info!(command = name.as_str(), command_id = command.id.as_str(); "Command seen before answered with its first outcome");
            return self.ack(&name, first);
        }
        if let Some(r) = self.running.as_ref().filter(|r| r.command_id == command.id) {
            // The same start again before its first answer: it is running; say so, once more.
            let ack = Ack::new(Some(&command.id), AckStatus::Accepted);
            let ack = match r.inspection_id {
                Some(inspection_id) => ack.with_inspection(inspection_id),
                None => ack,
            };
            return self.ack(&name, ack);
        }
        let id = command.id;
        let ack = match command.action {
            Action::Ping => Some(Ack::new(Some(&id), AckStatus::Succeeded)),
            Action::Start { case_id, vehicle, angles } => self.start(&id, case_id, vehicle, angles, now),
            Action::Cancel { inspection_id } => Some(self.cancel(&id, inspection_id)),
            Action::Retry { inspection_id } => {
                self.effects.push(Effect::Requeue { command_id: id.clone(), inspection_id });
                None
            }
        };
        if let Some(ack) = ack {
            self.answer(&name, ack);
        }
    }

    /// The first answer to a command: remembered (here and in the buffer) and published.
    fn answer(&mut self, name: &str, ack: Ack) {
        log::info!(command = name, command_id = ack.command_id.as_deref().unwrap_or(""), status = format!("{:?}", ack.status).as_str(); "Command answered");
        self.answered.remember(&ack);
        if let Some(first) = ack.command_id.as_deref().and_then(|id| self.answered.get(id)) {
            self.effects.push(Effect::RememberAnswer(first.clone()));
        }
        self.ack(name, ack);
    }

    fn ack(&mut self, name: &str, ack: Ack) {
        self.effects.push(Effect::Ack { command: name.to_owned(), ack });
    }

    /// Loads the answers the buffer kept from before this start.
    fn recall(&mut self, remembered: Vec<(String, String)>) {
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

    /// `None` when the answer comes later (once the inspection has an id).
    fn start(
        &mut self,
        id: &str,
        case_id: crate::vehicle::CaseId,
        vehicle: Option<Box<crate::vehicle::Vehicle>>,
        angles: Option<Vec<crate::vehicle::PhotoLabel>>,
        now: Now,
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
        let settings = self.settings();
        match &self.buffer {
            None => return Some(Ack::rejected(
                Some(id),
                "the kiosk is starting and its buffer is not open yet; send the command again in a moment",
            )),
            Some(Err(e)) => {
                return Some(
                    Ack::new(Some(id), AckStatus::Failed)
                        .with_reason(format!("the buffer cannot be read ({e}); see the kiosk's log")),
                )
            }
            Some(Ok(facts)) => {
                if let Some(refusal) = facts.would_refuse(angles.len(), settings.expected_image_bytes()) {
                    self.emit(EventKind::BufferFull { reason: refusal.to_string() }, now);
                    return Some(Ack::rejected(
                        Some(id),
                        format!("the buffer is full ({refusal}); wait for uploads or free space"),
                    ));
                }
            }
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
        self.effects.push(Effect::RememberAnswer(Ack::new(Some(id), AckStatus::Accepted)));
        self.effects.push(Effect::StartCapture(Box::new(Job {
            command_id: id.to_owned(),
            request,
            settings,
        })));
        None
    }

    fn settings(&self) -> Settings {
        Settings { capture_attempts: self.config.inspection.capture_attempts, resize: self.config.imaging }
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
        let ack = Ack::new(Some(id), AckStatus::Accepted);
        let ack = match running.inspection_id {
            Some(current) => ack.with_inspection(current),
            None => ack,
        };
        self.effects.push(Effect::CancelCapture);
        ack
    }

    fn requeued(&mut self, command_id: &str, inspection_id: InspectionId, result: Requeue) {
        let id = Some(command_id);
        let ack = match result {
            Requeue::Done => {
                log::info!(inspection_id = inspection_id.0; "Inspection queued for upload again by an operator's retry");
                self.effects.push(Effect::WakeUpload);
                Ack::new(id, AckStatus::Succeeded).with_inspection(inspection_id)
            }
            Requeue::Unknown => {
                Ack::rejected(id, format!("there is no inspection {inspection_id} in the buffer"))
            }
            Requeue::NotRetryable(state) => Ack::rejected(
                id,
                format!(
                    "inspection {inspection_id} is {state}; only a failed or cancelled inspection can be retried"
                ),
            )
            .with_inspection(inspection_id),
            Requeue::Failed(reason) => {
                Ack::new(id, AckStatus::Failed).with_reason(reason).with_inspection(inspection_id)
            }
        };
        self.answer("retry", ack);
    }

    // ---- capture and upload ----------------------------------------------------------------

    fn capture_progress(&mut self, progress: Progress, now: Now) {
        let Some(running) = &mut self.running else { return };
        match &progress {
            Progress::Started { inspection_id, .. } => running.inspection_id = Some(*inspection_id),
            Progress::Captured { .. } | Progress::Failed { .. } => running.done += 1,
            Progress::Retrying { .. } => {}
        }
        let (case_id, inspection_id, command_id) =
            (running.case_id.clone(), running.inspection_id, running.command_id.clone());
        if let Progress::Started { inspection_id, .. } = &progress {
            let ack = Ack::new(Some(&command_id), AckStatus::Accepted).with_inspection(*inspection_id);
            self.answered.remember(&ack);
            self.effects.push(Effect::RememberAnswer(ack.clone()));
            self.ack("start", ack);
        }
        if let Some(kind) = EventKind::of_progress(&progress, &case_id, inspection_id.map(|i| i.0)) {
            self.emit(kind, now);
        }
    }

    fn capture_done(&mut self, command_id: Option<String>, result: Result<CaptureEnd, String>, now: Now) {
        let running = self.running.take();
        let case_id = running.as_ref().map(|r| r.case_id.clone()).unwrap_or_default();
        match result {
            Ok(end) => {
                let kind = EventKind::of_capture_end(
                    end.inspection_id.0,
                    &case_id,
                    end.state,
                    end.images,
                    end.bytes,
                );
                self.emit(kind, now);
                self.effects.push(Effect::WakeUpload);
            }
            Err(reason) => {
                // The inspection never started: the start command's answer is this failure.
                if let Some(id) = command_id {
                    if running.as_ref().is_some_and(|r| r.inspection_id.is_none()) {
                        self.answer("start", Ack::rejected(Some(&id), reason.clone()));
                    }
                }
                self.emit(EventKind::Error { case_id: Some(case_id), reason }, now);
            }
        }
    }

    fn camera_event(&mut self, event: CameraEvent, now: Now) {
        let kind = match event {
            CameraEvent::Offline { camera, reason } => EventKind::CameraOffline { camera, reason },
            CameraEvent::Online { camera } => EventKind::CameraOnline { camera },
        };
        self.emit(kind, now);
    }

    fn upload_event(&mut self, event: UploadEvent, now: Now) {
        let kind = match event {
            UploadEvent::Started { inspection_id, case_id } => {
                self.uploading = Some((inspection_id, case_id));
                return;
            }
            UploadEvent::Progress { inspection_id, case_id, images_sent, images_total, bytes } => {
                EventKind::UploadProgress { inspection_id, case_id, images_sent, images_total, bytes }
            }
            UploadEvent::Uploaded { inspection_id, case_id, images, bytes } => {
                self.uploading = None;
                self.cloud.last_upload_at = Some(rfc3339_seconds(now.wall));
                EventKind::InspectionUploaded { inspection_id, case_id, images, bytes }
            }
            UploadEvent::SessionExpired { inspection_id, case_id } => {
                EventKind::SessionExpired { inspection_id, case_id }
            }
            UploadEvent::Failed { inspection_id, case_id, reason } => {
                self.uploading = None;
                EventKind::InspectionFailed {
                    inspection_id,
                    case_id,
                    state: None,
                    images: None,
                    bytes: None,
                    reason: Some(reason),
                }
            }
            UploadEvent::Link { online, clock_trusted, detail } => {
                self.cloud.reachable = online;
                self.cloud.clock_synced = Some(clock_trusted);
                self.cloud.last_error = detail;
                return;
            }
        };
        self.emit(kind, now);
    }

    // ---- time, reload ------------------------------------------------------------------------

    fn tick(&mut self, beats: &[Beat], now: Now) {
        if let Some(interval) = self.watchdog {
            if notify::watchdog_due(now.mono, self.last_watchdog, interval, beats) {
                self.effects.push(Effect::Notify("WATCHDOG=1".to_owned()));
                self.last_watchdog = Some(now.mono);
            }
        }
        if self.opened && self.last_prune.is_none_or(|t| now.mono.saturating_sub(t) >= PRUNE_EVERY) {
            self.last_prune = Some(now.mono);
            if let Some(retention) = self.config.buffer.completed_retention {
                if let Some(cutoff) = now.wall.checked_sub(retention) {
                    self.effects.push(Effect::Prune { cutoff, retention });
                }
            }
        }
    }

    fn reload(&mut self, reloaded: Reloaded) {
        self.effects.push(Effect::Notify("RELOADING=1".to_owned()));
        match reloaded {
            Reloaded::NoFile => log::warn!("Reload asked for but the daemon has no config file to read"),
            Reloaded::Invalid { path, reason } => {
                log::warn!(path = path.as_str(), error = reason.as_str(); "Reload refused: the configuration is invalid; the running one stays")
            }
            Reloaded::Loaded { path, config } => {
                let restart = needs_restart(&self.config, &config);
                self.effects.push(Effect::SetCaps(config.buffer.caps));
                let config = *config;
                self.config.buffer = config.buffer;
                self.config.inspection = config.inspection;
                self.config.imaging = config.imaging;
                if let (Some(old), Some(new)) = (&mut self.config.mqtt, &config.mqtt) {
                    old.heartbeat = new.heartbeat;
                }
                if restart.is_empty() {
                    log::info!(path = path.as_str(); "Configuration reloaded");
                } else {
                    log::warn!(path = path.as_str(), needs_restart = restart.join(", ").as_str(); "Configuration reloaded; changed keys that need a restart were not applied");
                }
            }
        }
        self.effects.push(Effect::Notify("READY=1".to_owned()));
    }

    // ---- status ------------------------------------------------------------------------------

    /// `buffer_recovered`, once per start (at the first connection, so that it is not dropped
    /// as sent while offline), for every salvage of a damaged buffer not acknowledged yet.
    fn announce_recoveries(&mut self, now: Now) {
        if self.recoveries_announced || !self.opened {
            return;
        }
        let Some(Ok(facts)) = &self.buffer else { return };
        self.recoveries_announced = true;
        let kinds: Vec<EventKind> = facts
            .recoveries
            .iter()
            .map(|r| EventKind::BufferRecovered {
                recovery_id: r.id,
                at: rfc3339_seconds(r.at),
                moved_to: r.moved_to.clone(),
                damage: r.damage.clone(),
                reason: r.summary(),
                report: r.report.clone(),
            })
            .collect();
        for kind in kinds {
            self.emit(kind, now);
        }
    }

    fn emit(&mut self, kind: EventKind, now: Now) {
        self.seq += 1;
        self.effects.push(Effect::Emit(Event { ts: rfc3339_seconds(now.wall), seq: self.seq, kind }));
    }

    fn stage(&self) -> Stage {
        if self.running.is_some() {
            Stage::Capturing
        } else if self.uploading.is_some() {
            Stage::Uploading
        } else {
            Stage::Idle
        }
    }

    /// Every condition a person must act on, in a stable order.
    fn alerts(&self) -> Vec<Alert> {
        let mut alerts = Vec::new();
        let mut alert = |kind, reason: String| alerts.push(Alert { kind, reason });
        match &self.buffer {
            None => {}
            Some(Err(e)) => alert(AlertKind::BufferUnreadable, format!("the buffer cannot be read: {e}")),
            Some(Ok(facts)) => {
                let expected = self.settings().expected_image_bytes();
                if let Some(refusal) = facts.would_refuse(self.config.inspection.angles.len(), expected) {
                    alert(AlertKind::BufferFull, format!("the buffer refuses new inspections: {refusal}"));
                } else if facts.fill() >= NEARLY_FULL {
                    alert(
                        AlertKind::BufferFull,
                        format!(
                            "the buffer holds {:.0} % of [buffer] max_bytes ({} bytes not yet uploaded); it refuses inspections once full: restore the uplink or raise max_bytes",
                            facts.fill() * 100.0,
                            facts.buffered.saturating_sub(facts.reclaimable)
                        ),
                    );
                }
                if facts.failed > 0 {
                    alert(
                        AlertKind::InspectionFailed,
                        format!(
                            "{} inspection(s) failed for good and wait in the buffer; see `capture-kiosk queue` for why, then send retry",
                            facts.failed
                        ),
                    );
                }
                // A salvaged buffer lost evidence: a human must account for it and acknowledge.
                for r in &facts.recoveries {
                    alert(AlertKind::BufferRecovered, r.summary());
                }
                if let Some(found) = &facts.damage {
                    alert(
                        AlertKind::BufferDamaged,
                        format!("the buffer is damaged ({found}); restart the kiosk to salvage it"),
                    );
                }
            }
        }
        for camera in &self.cameras {
            if camera.status == CameraState::Offline {
                let why = camera.reason.as_deref().unwrap_or("no frame");
                alert(AlertKind::CameraOffline, format!("camera {} is offline: {why}", camera.camera));
            }
        }
        if self.cloud.clock_synced == Some(false) {
            let why = self.cloud.last_error.as_deref().unwrap_or("it differs from the cloud's");
            alert(
                AlertKind::ClockUntrusted,
                format!("the bay's clock is not trusted ({why}); uploads wait until it is synchronised: check NTP"),
            );
        }
        for (kind, reason) in &self.link_alerts {
            alert(*kind, reason.clone());
        }
        alerts
    }

    fn buffer_status(&self, now: Now) -> BufferStatus {
        match &self.buffer {
            Some(Ok(facts)) => BufferStatus::of(
                facts,
                now.wall,
                self.config.inspection.angles.len(),
                self.settings().expected_image_bytes(),
            ),
            Some(Err(e)) => BufferStatus::unknown(e.clone(), true),
            None => BufferStatus::unknown("not open yet: the buffer is being checked".to_owned(), false),
        }
    }

    fn state(&self, now: Now) -> State {
        let alerts = self.alerts();
        let lifecycle = if !self.opened || self.buffer.is_none() {
            Lifecycle::Init
        } else if alerts.is_empty() {
            Lifecycle::Ready
        } else {
            Lifecycle::Alert
        };
        let cameras = self
            .config
            .cameras
            .iter()
            .map(|c| {
                let status = match self.cameras.iter().find(|h| h.camera == c.id) {
                    Some(h) => CameraStatus {
                        status: h.status,
                        last_frame_age_s: h.last_frame_age_s,
                        reason: h.reason.clone(),
                    },
                    None => {
                        CameraStatus { status: CameraState::Unknown, last_frame_age_s: None, reason: None }
                    }
                };
                (c.id.clone(), status)
            })
            .collect();
        State {
            ts: rfc3339_seconds(now.wall),
            seq: self.seq,
            boot_id: self.boot_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            lifecycle,
            alerts,
            stage: self.stage(),
            inspection: self.running.as_ref().map(|r| InspectionStatus {
                inspection_id: r.inspection_id.map(|i| i.0),
                case_id: r.case_id.clone(),
                angles: r.angles,
                done: r.done,
            }),
            cameras,
            buffer: self.buffer_status(now),
            cloud: self.cloud.clone(),
            uptime_s: now.mono.saturating_sub(self.started).as_secs(),
        }
    }

    /// Publishes the state when it changed (or always, when `force`).
    fn publish_state(&mut self, force: bool, now: Now) {
        let mut state = self.state(now);
        let changed = self.last_state.as_ref().is_none_or(|last| !same_news(last, &state));
        if !(changed || force) {
            return;
        }
        self.seq += 1;
        state.seq = self.seq;
        self.last_state = Some(state.clone());
        self.last_state_at = Some(now.mono);
        self.effects.push(Effect::PublishState(Box::new(state)));
    }

    fn status_line(&mut self) {
        let buffered = self.last_state.as_ref().map_or(0, |s| s.buffer.inspections);
        let broker = match (&self.config.mqtt, self.connected) {
            (None, _) => "no mqtt",
            (Some(_), true) => "online",
            (Some(_), false) => "offline",
        };
        let line = format!(
            "STATUS=stage {}, {buffered} inspections buffered, broker {broker}",
            self.stage().as_str()
        );
        if line != self.last_status_line {
            self.effects.push(Effect::Notify(line.clone()));
            self.last_status_line = line;
        }
    }
}

/// Whether two states tell the same: what moves all the time (the time, free disk space, frame
/// ages, uptime) rides along with a change, it is not one.
fn same_news(a: &State, b: &State) -> bool {
    let plain = |s: &State| {
        let mut s = s.clone();
        s.ts.clear();
        s.seq = 0;
        s.uptime_s = 0;
        s.buffer.disk_free_bytes = None;
        s.buffer.oldest_age_s = s.buffer.oldest_age_s.map(|_| 0);
        for camera in s.cameras.values_mut() {
            camera.last_frame_age_s = None;
        }
        s
    };
    plain(a) == plain(b)
}

/// The keys a reload cannot apply without a restart, when they changed.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut restart = Vec::new();
    if new.bay_id != old.bay_id {
        restart.push("bay_id");
    }
    if new.state_dir != old.state_dir {
        restart.push("state_dir");
    }
    if format!("{:?}", new.cameras) != format!("{:?}", old.cameras) {
        restart.push("cameras");
    }
    if new.mqtt != old.mqtt {
        restart.push("mqtt");
    }
    if format!("{:?}", new.cloud) != format!("{:?}", old.cloud) {
        restart.push("cloud");
    }
    restart
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::health::Status;
    use crate::clock::{Clock, ManualClock};
    use crate::store::{Caps, Totals};
    use crate::vehicle::PhotoLabel;

    const CONFIG: &str = r#"
bay_id = "bay-07"
state_dir = "/var/lib/capture-kiosk"

[inspection]
angles = ["Front", "Rear"]

[buffer]
max_bytes = "1 GiB"
min_free_disk = "100 MiB"
completed_retention = "7 days"

[[cameras]]
id = "cam-a"
source = "synthetic:64x48"
angles = ["Front", "Rear"]

[mqtt]
url = "mqtt://127.0.0.1:1883"
heartbeat = "30s"
"#;

    /// A bay under test on a manual clock.
    struct Rig {
        bay: Bay,
        clock: ManualClock,
    }

    impl Rig {
        /// An opened bay with room in its buffer and its camera online.
        fn ready() -> Rig {
            let mut rig = Rig::unopened();
            rig.observe(roomy(), Status::Online);
            rig.feed(Input::Opened { remembered: Vec::new() });
            rig
        }

        fn unopened() -> Rig {
            let clock = ManualClock::starting_at(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000));
            let config = crate::config::parse(CONFIG, "test").expect("the test config is valid");
            let now = Now { wall: clock.wall(), mono: clock.monotonic() };
            Rig { bay: Bay::new(config, "boot".into(), now, Some(Duration::from_secs(10))), clock }
        }

        fn now(&self) -> Now {
            Now { wall: self.clock.wall(), mono: self.clock.monotonic() }
        }

        fn feed(&mut self, input: Input) -> Vec<Effect> {
            let now = self.now();
            self.bay.handle(input, now)
        }

        fn observe(&mut self, buffer: BufferFacts, camera: Status) -> Vec<Effect> {
            let reason = (camera == Status::Offline).then(|| "unplugged".to_owned());
            let cameras = vec![CameraHealth {
                camera: "cam-a".into(),
                status: camera,
                last_frame_age_s: Some(1),
                reason,
            }];
            self.feed(Input::Observed { buffer: Ok(buffer), cameras })
        }

        fn command(&mut self, name: &str, payload: &str) -> Vec<Effect> {
            let payload = payload.as_bytes().to_vec();
            let size = payload.len();
            self.feed(Input::Link(LinkEvent::Command(Incoming { name: name.into(), payload, size })))
        }

        /// A start accepted and its inspection begun as inspection `id`.
        fn capturing(&mut self, command_id: &str, id: i64) {
            let effects =
                self.command("start", &format!(r#"{{"command_id": "{command_id}", "case_id": "CASE-1"}}"#));
            assert!(effects.iter().any(|e| matches!(e, Effect::StartCapture(_))), "{effects:?}");
            self.feed(Input::Capture(Progress::Started {
                inspection_id: InspectionId(id),
                angles: vec![PhotoLabel::Front, PhotoLabel::Rear],
            }));
        }
    }

    fn roomy() -> BufferFacts {
        BufferFacts {
            path: "/var/lib/capture-kiosk/buffer.sqlite3".into(),
            totals: Totals {
                inspections: 1,
                images: 2,
                bytes: 1000,
                awaiting_upload: 1,
                oldest_created_at: None,
            },
            failed: 0,
            disk_free: 10 << 30,
            usable: 10 << 30,
            buffered: 1000,
            reclaimable: 0,
            caps: Caps { max_bytes: 1 << 30, min_free_disk: 100 << 20 },
            recoveries: Vec::new(),
            damage: None,
        }
    }

    fn acks(effects: &[Effect]) -> Vec<(String, Ack)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Ack { command, ack } => Some((command.clone(), ack.clone())),
                _ => None,
            })
            .collect()
    }

    fn events(effects: &[Effect]) -> Vec<EventKind> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Emit(event) => Some(event.kind.clone()),
                _ => None,
            })
            .collect()
    }

    fn states(effects: &[Effect]) -> Vec<State> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::PublishState(s) => Some((**s).clone()),
                _ => None,
            })
            .collect()
    }

    /// Checks the one ack in `effects`: its status and words of its reason.
    fn check_ack(effects: &[Effect], status: AckStatus, words: &str) -> Ack {
        let acks = acks(effects);
        assert_eq!(acks.len(), 1, "one ack expected: {effects:?}");
        let ack = acks[0].1.clone();
        assert_eq!(ack.status, status, "{ack:?}");
        assert!(ack.reason.as_deref().unwrap_or("").contains(words), "{ack:?} lacks {words:?}");
        ack
    }

    #[test]
    fn every_command_and_refusal_gets_its_answer() {
        type Setup = fn(&mut Rig);
        let idle: Setup = |_| {};
        let busy: Setup = |r| r.capturing("s-0", 7);
        let full: Setup = |r| {
            let mut facts = roomy();
            facts.usable = 1 << 20;
            facts.disk_free = 1 << 20;
            r.observe(facts, Status::Online);
        };
        let cases: &[(&str, Setup, &str, &str, AckStatus, &str)] = &[
            ("ping", idle, "ping", r#"{"command_id": "p"}"#, AckStatus::Succeeded, ""),
            (
                "start while capturing",
                busy,
                "start",
                r#"{"command_id": "s", "case_id": "CASE-2"}"#,
                AckStatus::Rejected,
                "a capture is running (case CASE-1)",
            ),
            (
                "start while full",
                full,
                "start",
                r#"{"command_id": "s", "case_id": "CASE-2"}"#,
                AckStatus::Rejected,
                "the buffer is full",
            ),
            (
                "start of an angle no camera shoots",
                idle,
                "start",
                r#"{"command_id": "s", "case_id": "CASE-2", "angles": ["Left"]}"#,
                AckStatus::Rejected,
                "not shot by any camera",
            ),
            (
                "start with a bad case id",
                idle,
                "start",
                r#"{"command_id": "s", "case_id": ""}"#,
                AckStatus::Rejected,
                "case_id",
            ),
            (
                "start expired",
                idle,
                "start",
                r#"{"command_id": "s", "case_id": "CASE-2", "expires_at": "2020-01-01T00:00:00Z"}"#,
                AckStatus::Rejected,
                "expired",
            ),
            (
                "cancel with no capture",
                idle,
                "cancel",
                r#"{"command_id": "c"}"#,
                AckStatus::Rejected,
                "no capture is running",
            ),
            (
                "cancel of another inspection",
                busy,
                "cancel",
                r#"{"command_id": "c", "inspection_id": 8}"#,
                AckStatus::Rejected,
                "not the one capturing (7)",
            ),
            (
                "cancel of the capture",
                busy,
                "cancel",
                r#"{"command_id": "c", "inspection_id": 7}"#,
                AckStatus::Accepted,
                "",
            ),
            (
                "cancel of whatever captures",
                busy,
                "cancel",
                r#"{"command_id": "c"}"#,
                AckStatus::Accepted,
                "",
            ),
            (
                "unknown command",
                idle,
                "reboot",
                r#"{"command_id": "r"}"#,
                AckStatus::Rejected,
                "unknown command",
            ),
            ("not JSON", idle, "start", "{", AckStatus::Rejected, "not JSON"),
        ];
        for (what, setup, name, payload, status, words) in cases {
            let mut rig = Rig::ready();
            setup(&mut rig);
            let effects = rig.command(name, payload);
            let acks = acks(&effects);
            assert_eq!(acks.len(), 1, "{what}: {effects:?}");
            assert_eq!(acks[0].0, *name, "{what}");
            assert_eq!(acks[0].1.status, *status, "{what}: {:?}", acks[0].1);
            assert!(acks[0].1.reason.as_deref().unwrap_or("").contains(words), "{what}: {:?}", acks[0].1);
            let started = effects.iter().any(|e| matches!(e, Effect::StartCapture(_)));
            assert!(!started, "{what}: nothing may start");
            let cancelled = effects.iter().any(|e| matches!(e, Effect::CancelCapture));
            assert_eq!(cancelled, *status == AckStatus::Accepted && *name == "cancel", "{what}");
            if acks[0].1.command_id.is_some() {
                let remembered =
                    effects.iter().any(|e| matches!(e, Effect::RememberAnswer(a) if a == &acks[0].1));
                assert!(remembered, "{what}: the first answer is written to the buffer: {effects:?}");
            }
        }
    }

    #[test]
    fn a_start_runs_once_and_is_answered_when_its_inspection_has_an_id() {
        let mut rig = Rig::ready();
        let effects = rig.command("start", r#"{"command_id": "s-1", "case_id": "CASE-1"}"#);
        assert!(acks(&effects).is_empty(), "the answer waits for the inspection id: {effects:?}");
        let job = effects.iter().find_map(|e| match e {
            Effect::StartCapture(job) => Some(job.clone()),
            _ => None,
        });
        let job = job.expect("the capture starts");
        assert_eq!(job.request.angles, vec![PhotoLabel::Front, PhotoLabel::Rear]);
        assert!(
            effects.iter().any(|e| matches!(e, Effect::RememberAnswer(a) if a.status == AckStatus::Accepted && a.inspection_id.is_none())),
            "the command id is written down before the capture begins: {effects:?}"
        );
        assert_eq!(states(&effects).last().map(|s| s.stage), Some(Stage::Capturing));

        // The same start again, before its inspection has an id: accepted again, not re-run.
        let again = rig.command("start", r#"{"command_id": "s-1", "case_id": "CASE-1"}"#);
        check_ack(&again, AckStatus::Accepted, "");
        assert!(!again.iter().any(|e| matches!(e, Effect::StartCapture(_))));

        let effects = rig.feed(Input::Capture(Progress::Started {
            inspection_id: InspectionId(7),
            angles: vec![PhotoLabel::Front, PhotoLabel::Rear],
        }));
        let ack = check_ack(&effects, AckStatus::Accepted, "");
        assert_eq!(ack.inspection_id, Some(InspectionId(7)));
        assert!(matches!(&events(&effects)[..], [EventKind::InspectionStarted { inspection_id: 7, .. }]));
        let state = states(&effects).pop().expect("a state with the inspection");
        assert_eq!(state.inspection.map(|i| (i.inspection_id, i.angles, i.done)), Some((Some(7), 2, 0)));

        let effects = rig.feed(Input::CaptureDone {
            command_id: Some("s-1".into()),
            result: Ok(CaptureEnd {
                inspection_id: InspectionId(7),
                state: InspectionState::Captured,
                images: 2,
                bytes: 900,
            }),
        });
        assert!(matches!(
            &events(&effects)[..],
            [EventKind::InspectionCaptured { inspection_id: 7, images: 2, bytes: 900, .. }]
        ));
        assert!(effects.iter().any(|e| matches!(e, Effect::WakeUpload)));
        assert_eq!(states(&effects).pop().map(|s| s.stage), Some(Stage::Idle));

        // Later, the same id is answered with its first outcome and runs nothing.
        let later = rig.command("start", r#"{"command_id": "s-1", "case_id": "CASE-1"}"#);
        assert_eq!(check_ack(&later, AckStatus::Accepted, "").inspection_id, Some(InspectionId(7)));
        assert!(!later.iter().any(|e| matches!(e, Effect::StartCapture(_) | Effect::RememberAnswer(_))));
    }

    #[test]
    fn command_ids_answered_before_a_restart_are_answered_alike() {
        let mut rig = Rig::unopened();
        rig.observe(roomy(), Status::Online);
        let first = Ack::new(Some("s-9"), AckStatus::Accepted).with_inspection(InspectionId(3));
        let rejected = Ack::rejected(Some("bad"), "case_id: empty");
        let remembered = vec![
            ("s-9".to_owned(), String::from_utf8(first.to_json()).unwrap()),
            ("bad".to_owned(), String::from_utf8(rejected.to_json()).unwrap()),
            ("torn".to_owned(), "{not json".to_owned()),
        ];
        rig.feed(Input::Opened { remembered });
        let effects = rig.command("start", r#"{"command_id": "s-9", "case_id": "CASE-1"}"#);
        assert_eq!(acks(&effects), vec![("start".to_owned(), first)]);
        assert!(!effects.iter().any(|e| matches!(e, Effect::StartCapture(_))));
        // A refusal is remembered too, even when the payload is now a good one.
        let effects = rig.command("start", r#"{"command_id": "bad", "case_id": "CASE-1"}"#);
        assert_eq!(acks(&effects), vec![("start".to_owned(), rejected)]);
        // An unreadable answer is forgotten: the command runs.
        let effects = rig.command("start", r#"{"command_id": "torn", "case_id": "CASE-1"}"#);
        assert!(effects.iter().any(|e| matches!(e, Effect::StartCapture(_))));
    }

    #[test]
    fn a_retry_goes_through_the_buffer_and_is_answered_by_what_it_did() {
        let cases = [
            (Requeue::Done, AckStatus::Succeeded, "", Some(InspectionId(4)), true),
            (Requeue::Unknown, AckStatus::Rejected, "there is no inspection 4", None, false),
            (
                Requeue::NotRetryable(InspectionState::Completed),
                AckStatus::Rejected,
                "only a failed or cancelled inspection",
                Some(InspectionId(4)),
                false,
            ),
            (
                Requeue::Failed("disk I/O error".into()),
                AckStatus::Failed,
                "disk I/O error",
                Some(InspectionId(4)),
                false,
            ),
        ];
        for (result, status, words, inspection, wakes) in cases {
            let mut rig = Rig::ready();
            let effects = rig.command("retry", r#"{"command_id": "r-1", "inspection_id": 4}"#);
            assert!(acks(&effects).is_empty(), "{result:?}: the buffer answers first");
            assert!(
                effects.iter().any(|e| matches!(e, Effect::Requeue { command_id, inspection_id: InspectionId(4) } if command_id == "r-1")),
                "{effects:?}"
            );
            let effects = rig.feed(Input::Requeued {
                command_id: "r-1".into(),
                inspection_id: InspectionId(4),
                result: result.clone(),
            });
            let ack = check_ack(&effects, status, words);
            assert_eq!(ack.inspection_id, inspection, "{result:?}");
            assert_eq!(effects.iter().any(|e| matches!(e, Effect::WakeUpload)), wakes, "{result:?}");
            // The same retry again: its first answer, no second requeue.
            let again = rig.command("retry", r#"{"command_id": "r-1", "inspection_id": 4}"#);
            assert_eq!(acks(&again), vec![("retry".to_owned(), ack)]);
            assert!(!again.iter().any(|e| matches!(e, Effect::Requeue { .. })));
        }
    }

    #[test]
    fn a_start_that_never_began_is_answered_with_the_reason() {
        let mut rig = Rig::ready();
        rig.command("start", r#"{"command_id": "s-1", "case_id": "CASE-1"}"#);
        let effects = rig.feed(Input::CaptureDone {
            command_id: Some("s-1".into()),
            result: Err("camera cam-a is offline; check its cable".into()),
        });
        check_ack(&effects, AckStatus::Rejected, "offline");
        assert!(
            matches!(&events(&effects)[..], [EventKind::Error { reason, .. }] if reason.contains("offline"))
        );
        assert_eq!(states(&effects).pop().map(|s| s.stage), Some(Stage::Idle));
        // The capture loop gone: failed, and the bay is free again.
        rig.command("start", r#"{"command_id": "s-2", "case_id": "CASE-1"}"#);
        let effects = rig.feed(Input::CaptureUnavailable { command_id: "s-2".into() });
        check_ack(&effects, AckStatus::Failed, "restart the kiosk");
        assert!(!rig.bay.capturing());
    }

    #[test]
    fn a_cancelled_capture_ends_as_a_failed_inspection_with_the_reason() {
        let mut rig = Rig::ready();
        rig.capturing("s-1", 5);
        let effects = rig.feed(Input::CaptureDone {
            command_id: Some("s-1".into()),
            result: Ok(CaptureEnd {
                inspection_id: InspectionId(5),
                state: InspectionState::Cancelled,
                images: 1,
                bytes: 10,
            }),
        });
        match &events(&effects)[..] {
            [EventKind::InspectionFailed { state, reason, images, .. }] => {
                assert_eq!(state.as_deref(), Some("cancelled"));
                assert_eq!(reason.as_deref(), Some("cancelled while capturing"));
                assert_eq!(*images, Some(1));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lifecycle_is_init_until_the_buffer_is_open_then_ready_or_alert_for_each_condition() {
        let mut rig = Rig::unopened();
        let effects = rig.feed(Input::Publish);
        let state = states(&effects).pop().expect("the first state");
        assert_eq!(state.lifecycle, Lifecycle::Init);
        assert!(state.buffer.error.as_deref().is_some_and(|e| e.contains("not open yet")));
        // A look at the buffer on the way to being open is not news.
        assert!(states(&rig.observe(roomy(), Status::Online)).is_empty());

        let rig = Rig::ready();
        assert_eq!(rig.bay.last_state().map(|s| s.lifecycle), Some(Lifecycle::Ready));
        type Change = fn(&mut BufferFacts);
        type Case = (&'static str, Change, Status, Option<bool>, AlertKind, &'static str);
        let cases: &[Case] = &[
            (
                "refuses",
                |f| f.usable = 1 << 20,
                Status::Online,
                Some(true),
                AlertKind::BufferFull,
                "refuses new inspections",
            ),
            (
                "over 90 %",
                |f| f.buffered = 960 << 20,
                Status::Online,
                Some(true),
                AlertKind::BufferFull,
                "% of [buffer] max_bytes",
            ),
            (
                "camera",
                |_| {},
                Status::Offline,
                Some(true),
                AlertKind::CameraOffline,
                "camera cam-a is offline: unplugged",
            ),
            ("clock", |_| {}, Status::Online, Some(false), AlertKind::ClockUntrusted, "check NTP"),
            (
                "failed",
                |f| f.failed = 2,
                Status::Online,
                Some(true),
                AlertKind::InspectionFailed,
                "2 inspection(s) failed for good",
            ),
            (
                "damage",
                |f| f.damage = Some("page 7".into()),
                Status::Online,
                Some(true),
                AlertKind::BufferDamaged,
                "restart the kiosk",
            ),
        ];
        for (what, change, camera, clock, kind, words) in cases {
            let mut rig = Rig::ready();
            rig.feed(Input::Upload(UploadEvent::Link {
                online: true,
                clock_trusted: clock.unwrap_or(true),
                detail: None,
            }));
            let mut facts = roomy();
            change(&mut facts);
            let effects = rig.observe(facts, *camera);
            let state =
                states(&effects).pop().unwrap_or_else(|| rig.bay.last_state().cloned().expect("a state"));
            assert_eq!(state.lifecycle, Lifecycle::Alert, "{what}: {state:?}");
            assert!(
                state.alerts.iter().any(|a| a.kind == *kind && a.reason.contains(words)),
                "{what}: {:?}",
                state.alerts
            );
            // The condition gone: ready again, no alert left.
            let effects = rig.observe(roomy(), Status::Online);
            rig.feed(Input::Upload(UploadEvent::Link { online: true, clock_trusted: true, detail: None }));
            let state = rig.bay.last_state().cloned().expect("a state");
            assert_eq!(state.lifecycle, Lifecycle::Ready, "{what}: {state:?} {effects:?}");
            assert!(state.alerts.is_empty(), "{what}");
        }
        // The MQTT link's alerts come and go the same way.
        let mut rig = Rig::ready();
        rig.feed(Input::Link(LinkEvent::Alert {
            kind: crate::mqtt::ALERT_CLIENT_ID_IN_USE,
            reason: "twin".into(),
        }));
        assert_eq!(rig.bay.last_state().map(|s| s.lifecycle), Some(Lifecycle::Alert));
        rig.feed(Input::Link(LinkEvent::AlertCleared { kind: crate::mqtt::ALERT_CLIENT_ID_IN_USE }));
        assert_eq!(rig.bay.last_state().map(|s| s.lifecycle), Some(Lifecycle::Ready));
    }

    #[test]
    fn state_goes_out_on_change_and_as_a_heartbeat_not_for_what_moves_all_the_time() {
        let mut rig = Rig::ready();
        let tick = |rig: &mut Rig| rig.feed(Input::Tick { beats: Vec::new() });
        rig.clock.advance(Duration::from_secs(1));
        assert!(states(&tick(&mut rig)).is_empty(), "nothing changed");
        // Free disk space and frame ages move all the time: not a change.
        let mut facts = roomy();
        facts.disk_free -= 4096;
        assert!(states(&rig.observe(facts, Status::Online)).is_empty());
        // The heartbeat.
        rig.clock.advance(Duration::from_secs(29));
        let beat = states(&tick(&mut rig));
        assert_eq!(beat.len(), 1, "heartbeat after 30 s");
        assert_eq!(beat[0].buffer.disk_free_bytes, Some((10 << 30) - 4096), "it carries what rode along");
        assert_eq!(beat[0].uptime_s, 30);
        // A real change goes out at once, with a seq above every earlier message.
        let mut facts = roomy();
        facts.totals.inspections = 2;
        let changed = states(&rig.observe(facts, Status::Online));
        assert_eq!(changed.len(), 1);
        assert!(changed[0].seq > beat[0].seq);
        assert_eq!(changed[0].buffer.inspections, 2);
    }

    #[test]
    fn events_and_states_share_one_growing_seq() {
        let mut rig = Rig::ready();
        rig.capturing("s-1", 1);
        let mut effects = rig.feed(Input::Capture(Progress::Failed {
            angle: PhotoLabel::Front,
            camera: "cam-a".into(),
            reason: "blank frame".into(),
        }));
        effects.extend(
            rig.feed(Input::Camera(CameraEvent::Offline { camera: "cam-a".into(), reason: "gone".into() })),
        );
        let seqs: Vec<u64> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Emit(ev) => Some(ev.seq),
                Effect::PublishState(s) => Some(s.seq),
                _ => None,
            })
            .collect();
        assert!(seqs.len() >= 3, "{effects:?}");
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    }

    #[test]
    fn the_watchdog_is_fed_only_while_every_loop_beats() {
        let mut rig = Rig::ready();
        let fed =
            |effects: &[Effect]| effects.iter().any(|e| matches!(e, Effect::Notify(l) if l == "WATCHDOG=1"));
        rig.clock.advance(Duration::from_secs(6));
        let now = rig.clock.monotonic();
        let fresh = vec![Beat::at(now), Beat::at(now)];
        assert!(fed(&rig.feed(Input::Tick { beats: fresh.clone() })));
        assert!(!fed(&rig.feed(Input::Tick { beats: fresh })), "not again before half the interval");
        rig.clock.advance(Duration::from_secs(6));
        let stale = vec![Beat::at(rig.clock.monotonic()), Beat::at(now)];
        assert!(!fed(&rig.feed(Input::Tick { beats: stale })), "a loop stalled for 6 s of a 10 s watchdog");
    }

    #[test]
    fn upload_events_become_events_stage_and_cloud_state() {
        let mut rig = Rig::ready();
        let effects =
            rig.feed(Input::Upload(UploadEvent::Started { inspection_id: 3, case_id: "CASE-3".into() }));
        assert_eq!(states(&effects).pop().map(|s| s.stage), Some(Stage::Uploading));
        let effects = rig.feed(Input::Upload(UploadEvent::Progress {
            inspection_id: 3,
            case_id: "CASE-3".into(),
            images_sent: 1,
            images_total: 2,
            bytes: 10,
        }));
        assert!(matches!(
            &events(&effects)[..],
            [EventKind::UploadProgress { images_sent: 1, images_total: 2, .. }]
        ));
        let effects = rig.feed(Input::Upload(UploadEvent::Uploaded {
            inspection_id: 3,
            case_id: "CASE-3".into(),
            images: 2,
            bytes: 20,
        }));
        assert!(matches!(&events(&effects)[..], [EventKind::InspectionUploaded { .. }]));
        let state = states(&effects).pop().expect("state");
        assert_eq!(state.stage, Stage::Idle);
        assert_eq!(state.cloud.last_upload_at.as_deref(), Some(rfc3339_seconds(rig.clock.wall()).as_str()));
    }

    #[test]
    fn retention_runs_at_start_and_every_hour_and_reload_applies_what_it_can() {
        let mut rig = Rig::ready();
        let prunes =
            |effects: &[Effect]| effects.iter().filter(|e| matches!(e, Effect::Prune { .. })).count();
        assert_eq!(prunes(&rig.feed(Input::Tick { beats: Vec::new() })), 1);
        rig.clock.advance(Duration::from_secs(1800));
        assert_eq!(prunes(&rig.feed(Input::Tick { beats: Vec::new() })), 0);
        rig.clock.advance(Duration::from_secs(1800));
        assert_eq!(prunes(&rig.feed(Input::Tick { beats: Vec::new() })), 1);

        let text =
            CONFIG.replace("max_bytes = \"1 GiB\"", "max_bytes = \"2 GiB\"").replace("bay-07", "bay-08");
        let config = crate::config::parse(&text, "test").expect("valid");
        let effects =
            rig.feed(Input::Reload(Reloaded::Loaded { path: "bay.toml".into(), config: Box::new(config) }));
        let notes: Vec<&str> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Notify(l) if !l.starts_with("STATUS=") => Some(l.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(notes, ["RELOADING=1", "READY=1"]);
        assert!(effects.iter().any(|e| matches!(e, Effect::SetCaps(c) if c.max_bytes == 2 << 30)));
        assert_eq!(rig.bay.config().bay_id, "bay-07", "bay_id needs a restart");
        let effects =
            rig.feed(Input::Reload(Reloaded::Invalid { path: "bay.toml".into(), reason: "bad".into() }));
        assert!(!effects.iter().any(|e| matches!(e, Effect::SetCaps(_))));
    }

    #[test]
    fn the_status_line_follows_stage_buffer_and_broker() {
        let mut rig = Rig::ready();
        let line = |effects: &[Effect]| {
            effects.iter().find_map(|e| match e {
                Effect::Notify(l) if l.starts_with("STATUS=") => Some(l.clone()),
                _ => None,
            })
        };
        let effects = rig.feed(Input::Link(LinkEvent::Connected));
        assert_eq!(
            line(&effects).as_deref(),
            Some("STATUS=stage idle, 1 inspections buffered, broker online")
        );
        assert_eq!(line(&rig.feed(Input::Tick { beats: Vec::new() })), None, "said once");
        let effects = rig.feed(Input::Link(LinkEvent::Disconnected { reason: "gone".into() }));
        assert_eq!(
            line(&effects).as_deref(),
            Some("STATUS=stage idle, 1 inspections buffered, broker offline")
        );
    }

    #[test]
    fn an_oversized_message_is_told_once_the_broker_is_back() {
        let mut rig = Rig::ready();
        assert!(events(&rig.feed(Input::Link(LinkEvent::Oversized { bytes: 2 << 20 }))).is_empty());
        let effects = rig.feed(Input::Link(LinkEvent::Connected));
        assert!(
            matches!(&events(&effects)[..], [EventKind::Error { reason, .. }] if reason.contains("2097152 bytes"))
        );
        assert!(events(&rig.feed(Input::Link(LinkEvent::Connected))).is_empty(), "told once");
    }
}
