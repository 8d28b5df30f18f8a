//! What the driver's screen shows, as a pure function of what the daemon published: the typed
//! [`State`] and the [`EventKind`]s, each handed in with the monotonic time it arrived. No
//! thread, no socket, no clock read: the server asks [`Board::screen`] at a time it chooses
//! and sleeps until [`Board::next_change`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::status::{CameraState, EventKind, Lifecycle, Stage, State};

/// The sentences on the screen, one per mode, and how angles are named; `[display.texts]`
/// and `[display.angles]` in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Texts {
    pub opening: String,
    pub closed: String,
    pub waiting: String,
    pub capturing: String,
    pub done: String,
    pub attention: String,
    /// An angle's name on the screen, by its label (`Front_Left`); unnamed ones are shown
    /// as their label with spaces for underscores.
    pub angles: BTreeMap<String, String>,
}

impl Default for Texts {
    fn default() -> Texts {
        Texts {
            opening: "Bay opening, please wait".to_owned(),
            closed: "Bay closed".to_owned(),
            waiting: "Drive in slowly".to_owned(),
            capturing: "Stop \u{2014} hold still".to_owned(),
            done: "Done \u{2014} please drive on".to_owned(),
            attention: "Please wait, an attendant is coming".to_owned(),
            angles: BTreeMap::new(),
        }
    }
}

impl Texts {
    fn angle(&self, label: &str) -> String {
        self.angles.get(label).cloned().unwrap_or_else(|| label.replace('_', " "))
    }
}

/// What the screen is saying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The daemon is starting (its buffer is being checked).
    Opening,
    /// The bay cannot take a car: a camera is offline, or the buffer is full or unreadable.
    Closed,
    /// Ready for the next car.
    Waiting,
    /// A car is being photographed.
    Capturing,
    /// Every angle is stored.
    Done,
    /// An angle failed, or the capture did: a person has to look.
    Attention,
}

/// One angle in the progress row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AngleState {
    Pending,
    Stored,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AngleView {
    /// The label as in the spec (`Front_Left`).
    pub angle: String,
    /// The name shown.
    pub label: String,
    pub state: AngleState,
}

/// Everything the page renders; sent whole on every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Screen {
    pub mode: Mode,
    pub text: String,
    /// What the page shows once it has lost the daemon for a few seconds (the bay cannot take
    /// a car then): the "closed" sentence.
    pub offline: String,
    /// The progress row; empty when no car is in the bay.
    pub angles: Vec<AngleView>,
    /// The page's `lang` attribute.
    pub lang: String,
}

/// The inspection on the screen: started, and maybe ended.
#[derive(Debug, Clone)]
struct Run {
    case_id: String,
    angles: Vec<(String, AngleState)>,
    /// Set once the capture ended: whether a person must look, and until when it is shown.
    ended: Option<(bool, Duration)>,
}

impl Run {
    fn failed(&self) -> bool {
        self.angles.iter().any(|(_, s)| *s == AngleState::Failed)
    }
}

/// The screen's memory of what the daemon published.
#[derive(Debug, Clone)]
pub struct Board {
    texts: Texts,
    lang: String,
    /// How long "done" stays before the bay waits for the next car.
    done_for: Duration,
    /// How long "attention" stays after a capture that needs a person, unless the next car
    /// is started sooner.
    attention_for: Duration,
    lifecycle: Option<Lifecycle>,
    closed: bool,
    capturing: bool,
    run: Option<Run>,
}

impl Board {
    pub fn new(texts: Texts, lang: String, done_for: Duration, attention_for: Duration) -> Board {
        Board {
            texts,
            lang,
            done_for,
            attention_for,
            lifecycle: None,
            closed: false,
            capturing: false,
            run: None,
        }
    }

    /// The daemon published `state`.
    pub fn state(&mut self, state: &State) {
        self.lifecycle = Some(state.lifecycle);
        self.capturing = state.stage == Stage::Capturing;
        self.closed = state.buffer.full
            || state.buffer.error.is_some()
            || state.cameras.values().any(|c| c.status == CameraState::Offline);
    }

    /// The daemon emitted `event` at `now`.
    pub fn event(&mut self, event: &EventKind, now: Duration) {
        match event {
            EventKind::InspectionStarted { case_id, angles, .. } => {
                self.capturing = true;
                self.run = Some(Run {
                    case_id: case_id.clone(),
                    angles: angles.iter().map(|a| (a.clone(), AngleState::Pending)).collect(),
                    ended: None,
                });
            }
            EventKind::AngleCaptured { case_id, angle, .. } => self.mark(case_id, angle, AngleState::Stored),
            EventKind::AngleFailed { case_id, angle, .. } => self.mark(case_id, angle, AngleState::Failed),
            EventKind::InspectionCaptured { case_id, .. } => self.end(case_id, false, now),
            EventKind::InspectionFailed { case_id, state: Some(_), .. } => self.end(case_id, true, now),
            _ => {}
        }
    }

    fn mark(&mut self, case_id: &str, angle: &str, state: AngleState) {
        let Some(run) = self.run.as_mut().filter(|r| r.case_id == case_id && r.ended.is_none()) else {
            return;
        };
        if let Some(slot) = run.angles.iter_mut().find(|(a, _)| a == angle) {
            slot.1 = state;
        }
    }

    fn end(&mut self, case_id: &str, failed: bool, now: Duration) {
        self.capturing = false;
        let (done_for, attention_for) = (self.done_for, self.attention_for);
        let Some(run) = self.run.as_mut().filter(|r| r.case_id == case_id) else { return };
        let attention = failed || run.failed();
        run.ended = Some((attention, now + if attention { attention_for } else { done_for }));
    }

    /// What the screen shows at `now`.
    pub fn screen(&self, now: Duration) -> Screen {
        let (mode, angles) = match &self.run {
            Some(run) if run.ended.is_none() => {
                (if run.failed() { Mode::Attention } else { Mode::Capturing }, self.row(run))
            }
            Some(run @ Run { ended: Some((attention, until)), .. }) if now < *until && !self.capturing => {
                (if *attention { Mode::Attention } else { Mode::Done }, self.row(run))
            }
            _ if self.capturing => (Mode::Capturing, Vec::new()),
            _ => match self.lifecycle {
                None | Some(Lifecycle::Init) => (Mode::Opening, Vec::new()),
                Some(_) if self.closed => (Mode::Closed, Vec::new()),
                Some(_) => (Mode::Waiting, Vec::new()),
            },
        };
        let text = match mode {
            Mode::Opening => &self.texts.opening,
            Mode::Closed => &self.texts.closed,
            Mode::Waiting => &self.texts.waiting,
            Mode::Capturing => &self.texts.capturing,
            Mode::Done => &self.texts.done,
            Mode::Attention => &self.texts.attention,
        };
        Screen {
            mode,
            text: text.clone(),
            offline: self.texts.closed.clone(),
            angles,
            lang: self.lang.clone(),
        }
    }

    /// When the screen changes by itself (a "done" or "attention" that runs out), if it will.
    pub fn next_change(&self, now: Duration) -> Option<Duration> {
        match self.run.as_ref()?.ended {
            Some((_, until)) if until > now => Some(until),
            _ => None,
        }
    }

    fn row(&self, run: &Run) -> Vec<AngleView> {
        run.angles
            .iter()
            .map(|(angle, state)| AngleView {
                angle: angle.clone(),
                label: self.texts.angle(angle),
                state: *state,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BufferStatus, CameraStatus, CloudStatus};

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn board() -> Board {
        Board::new(Texts::default(), "en".to_owned(), S(20), S(120))
    }

    fn state(lifecycle: Lifecycle, stage: Stage, full: bool, offline: bool) -> State {
        let camera = |offline: bool| CameraStatus {
            status: if offline { CameraState::Offline } else { CameraState::Online },
            last_frame_age_s: None,
            reason: None,
        };
        State {
            ts: String::new(),
            seq: 1,
            boot_id: String::new(),
            version: String::new(),
            lifecycle,
            alerts: Vec::new(),
            stage,
            inspection: None,
            cameras: [("a".to_owned(), camera(false)), ("b".to_owned(), camera(offline))].into(),
            buffer: BufferStatus {
                inspections: 0,
                images: 0,
                bytes: 0,
                awaiting_upload: 0,
                oldest_age_s: None,
                disk_free_bytes: None,
                full,
                error: None,
            },
            cloud: CloudStatus::default(),
            uptime_s: 0,
        }
    }

    fn started(case: &str, angles: &[&str]) -> EventKind {
        EventKind::InspectionStarted {
            inspection_id: 1,
            case_id: case.to_owned(),
            angles: angles.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn captured(case: &str, angle: &str) -> EventKind {
        EventKind::AngleCaptured {
            inspection_id: Some(1),
            case_id: case.to_owned(),
            angle: angle.to_owned(),
            camera: "a".to_owned(),
            bytes: 1,
            width: 1,
            height: 1,
            quality: crate::store::ImageQuality { scores: Default::default(), poor: None },
        }
    }

    fn ended(case: &str) -> EventKind {
        EventKind::InspectionCaptured {
            inspection_id: 1,
            case_id: case.to_owned(),
            state: "captured".to_owned(),
            images: 2,
            bytes: 2,
        }
    }

    fn states(screen: &Screen) -> Vec<AngleState> {
        screen.angles.iter().map(|a| a.state).collect()
    }

    #[test]
    fn before_any_state_the_bay_is_opening_then_waits_or_is_closed() {
        let mut b = board();
        assert_eq!(b.screen(S(0)).mode, Mode::Opening);
        b.state(&state(Lifecycle::Init, Stage::Idle, false, false));
        assert_eq!(b.screen(S(0)).mode, Mode::Opening);
        b.state(&state(Lifecycle::Ready, Stage::Idle, false, false));
        assert_eq!(b.screen(S(0)).text, "Drive in slowly");
        b.state(&state(Lifecycle::Alert, Stage::Idle, true, false));
        assert_eq!(b.screen(S(0)).mode, Mode::Closed);
        b.state(&state(Lifecycle::Alert, Stage::Idle, false, true));
        assert_eq!(b.screen(S(0)).mode, Mode::Closed);
        // An alert that does not stop the bay (a failed upload waiting for a retry) is no
        // business of the driver's.
        b.state(&state(Lifecycle::Alert, Stage::Uploading, false, false));
        assert_eq!(b.screen(S(0)).mode, Mode::Waiting);
    }

    #[test]
    fn a_capture_fills_the_row_then_says_done_for_a_while() {
        let mut b = board();
        b.state(&state(Lifecycle::Ready, Stage::Idle, false, false));
        b.event(&started("C1", &["Front", "Rear_Left"]), S(1));
        let s = b.screen(S(1));
        assert_eq!((s.mode, s.text.as_str()), (Mode::Capturing, "Stop \u{2014} hold still"));
        assert_eq!(s.angles[1].label, "Rear Left");
        assert_eq!(states(&s), [AngleState::Pending, AngleState::Pending]);
        b.event(&captured("C1", "Rear_Left"), S(2));
        b.event(&captured("OTHER", "Front"), S(2));
        assert_eq!(states(&b.screen(S(2))), [AngleState::Pending, AngleState::Stored]);
        b.event(&captured("C1", "Front"), S(2));
        b.event(&ended("C1"), S(3));
        b.state(&state(Lifecycle::Ready, Stage::Uploading, false, false));
        assert_eq!(b.screen(S(3)).mode, Mode::Done);
        assert_eq!(b.next_change(S(3)), Some(S(23)));
        assert_eq!(b.screen(S(22)).mode, Mode::Done);
        assert_eq!(b.screen(S(23)).mode, Mode::Waiting);
        assert_eq!(b.screen(S(23)).angles, []);
        assert_eq!(b.next_change(S(23)), None);
    }

    #[test]
    fn a_failed_angle_calls_an_attendant_until_the_next_car_or_the_time_runs_out() {
        let mut b = board();
        b.state(&state(Lifecycle::Ready, Stage::Idle, false, false));
        b.event(&started("C1", &["Front", "Rear"]), S(0));
        b.event(
            &EventKind::AngleFailed {
                inspection_id: Some(1),
                case_id: "C1".to_owned(),
                angle: "Rear".to_owned(),
                camera: "b".to_owned(),
                reason: "no frame".to_owned(),
            },
            S(1),
        );
        assert_eq!(b.screen(S(1)).mode, Mode::Attention);
        b.event(&captured("C1", "Front"), S(1));
        b.event(&ended("C1"), S(2));
        let s = b.screen(S(2));
        assert_eq!((s.mode, states(&s)), (Mode::Attention, vec![AngleState::Stored, AngleState::Failed]));
        assert_eq!(b.screen(S(121)).mode, Mode::Attention);
        b.event(&started("C2", &["Front"]), S(30));
        assert_eq!(b.screen(S(30)).mode, Mode::Capturing);
        let mut b2 = board();
        b2.state(&state(Lifecycle::Ready, Stage::Idle, false, false));
        b2.event(&started("C3", &["Front"]), S(0));
        b2.event(
            &EventKind::InspectionFailed {
                inspection_id: 1,
                case_id: "C3".to_owned(),
                state: Some("failed".to_owned()),
                images: Some(0),
                bytes: Some(0),
                reason: None,
            },
            S(1),
        );
        assert_eq!(b2.screen(S(1)).mode, Mode::Attention);
        assert_eq!(b2.screen(S(121)).mode, Mode::Waiting);
    }

    #[test]
    fn a_capture_the_state_announces_before_its_first_event_already_says_stop() {
        let mut b = board();
        b.state(&state(Lifecycle::Ready, Stage::Capturing, false, false));
        assert_eq!(b.screen(S(0)).mode, Mode::Capturing);
    }

    #[test]
    fn texts_and_angle_names_come_from_the_configuration() {
        let texts = Texts {
            waiting: "Langsam einfahren".to_owned(),
            angles: [("Front".to_owned(), "Vorne".to_owned())].into(),
            ..Texts::default()
        };
        let mut b = Board::new(texts, "de".to_owned(), S(20), S(120));
        b.state(&state(Lifecycle::Ready, Stage::Idle, false, false));
        assert_eq!((b.screen(S(0)).text.as_str(), b.screen(S(0)).lang.as_str()), ("Langsam einfahren", "de"));
        b.event(&started("C1", &["Front"]), S(0));
        assert_eq!(b.screen(S(0)).angles[0].label, "Vorne");
    }
}
