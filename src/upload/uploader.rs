//! The uploader: takes buffered inspections to the cloud, oldest first, and never blocks capture
//! (it runs on its own thread with its own connection to the buffer).
//!
//! Each call of [`Uploader::pump`] does the work that is due now for the oldest inspection
//! waiting (`captured` or `uploading`) and says when to call again. The link is kept busy by
//! two sessions in flight at most: the next inspection is authenticated on a second thread
//! while this one's images travel ([`Prefetch`]), and, when another inspection waits, this
//! one's last request of images and its `complete` go on a thread of their own
//! ([`Completing`]) while the pump takes up the next one, whose images follow on the link as
//! soon as this one's are written out, without waiting for the answers. Per inspection:
//!
//! 1. **Clock.** Nothing is signed while the kiosk's clock is known to be wrong: the `Date` of
//!    the last answer judges it ([`ClockTrust`]); before the first answer, a plain `GET /` asks
//!    for one. `cloud.require_clock_sync = false` skips the gate (benches without NTP).
//! 2. **Session.** Tokens live only in memory. With fresh tokens for this inspection, they are
//!    used. Otherwise, when the buffer names a session (a restart, or tokens that aged out),
//!    `GET /v1/sessions/{s}` says what it holds: completed → the inspection is done; every
//!    image there with the right sha256 → only `complete` is left (it is signed, no token
//!    needed); anything else → the session is given up for good and a new one is opened with
//!    `/api/authenticate`. The new session's key is committed to the buffer before the first
//!    image goes.
//! 3. **Images** not yet in the session go in requests of at most 99 files and
//!    `cloud.max_request_bytes` bytes, each with an `Idempotency-Key` derived from the session
//!    and the files' hashes, so a retry of a request whose answer was lost stores nothing twice.
//!    What the server confirms is committed to the buffer (`sent`).
//! 4. **Complete**, listing every captured label. A complete whose answer was lost (reset,
//!    deadline, 5xx) is never sent again blind: the tokens are forgotten, so the next try asks
//!    `GET /v1/sessions/{s}` first, exactly as after a restart (step 2), and completes again only
//!    a session the cloud says is still open. `409` → ask the session too. Then the inspection
//!    is `completed`; its images stay until the retention rule prunes them.
//!
//! Answers are sorted by [`classify`](super::policy::classify): `401` on upload, `410`, `409` →
//! the session is given up and every image goes again under a new one; `429`/`503` → wait
//! `Retry-After`; network errors and other `5xx` → exponential backoff with full jitter, capped
//! at 5 minutes; `400`/`413`/`415`/`422` → the inspection is `failed` with the server's reason
//! and waits for an operator's retry. Every request has the `cloud.request_timeout` deadline.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use super::client::{Client, Failure, Part, Tokens, PART_OVERHEAD};
use super::policy::{
    backoff, batches, ClockTrust, Verdict, BASE_BACKOFF, MAX_BACKOFF, MAX_FILES_PER_REQUEST,
};
use crate::clock::Clock;
use crate::store::{ImageMeta, InspectionId, InspectionState, InspectionSummary, Store, StoreError};
use crate::vehicle::PhotoLabel;

/// How long the uploader waits before asking the cloud's clock again while the kiosk's is wrong.
pub const CLOCK_RECHECK: Duration = Duration::from_secs(60);
/// How long it waits after the cloud refused the account's credentials (a person must act).
pub const CREDENTIALS_RECHECK: Duration = Duration::from_secs(5 * 60);
/// Room left in a request for the multipart fields and headers besides the files.
const REQUEST_HEAD_ROOM: u64 = 4096;

/// What a call of [`Uploader::pump`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pump {
    /// Nothing is waiting for upload.
    Idle,
    /// Work was done; call again at once.
    Progress,
    /// Nothing can be done before this long has passed (the reason is the last error).
    Wait(Duration, String),
}

/// What the uploader tells the rest of the kiosk (logs, MQTT events, a progress bar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An inspection left the queue for the cloud.
    Started { id: InspectionId, case_id: String },
    /// A session was given up (expired, refused, consumed, or incomplete when its tokens were
    /// lost); every image of the inspection goes again under a new one.
    SessionGivenUp { id: InspectionId, case_id: String, session: String, why: String },
    /// A request with these images was confirmed; the session now holds `images_sent` of the
    /// inspection's `images_total`.
    Sent {
        id: InspectionId,
        case_id: String,
        labels: Vec<PhotoLabel>,
        bytes: u64,
        images_sent: u64,
        images_total: u64,
    },
    /// The cloud completed the inspection's session.
    Uploaded { id: InspectionId, case_id: String, session: String, images: u64, bytes: u64 },
    /// The cloud refused the inspection for good; it is `failed` with this reason.
    Failed { id: InspectionId, case_id: String, reason: String },
    /// The link changed: whether the cloud answers, whether the clock may sign, and why not.
    Link(Link),
}

/// The uploader's view of the cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// `None` until the first answer (or failure).
    pub online: Option<bool>,
    pub clock: ClockTrust,
    /// Why the last try stopped, if it did.
    pub last_error: Option<String>,
}

/// Why delivering one inspection stopped.
enum Stop {
    /// Try the same inspection again after this long.
    Wait(Duration, String),
    /// The session was given up or the tokens renewed; go round again at once.
    Again,
    /// The cloud refused the inspection for good.
    Refused(String),
    /// The buffer failed.
    Store(StoreError),
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Stop {
        Stop::Store(e)
    }
}

pub struct Uploader {
    client: Client,
    clock: Arc<dyn Clock>,
    max_request_bytes: u64,
    require_clock_sync: bool,
    /// The tokens of the session of the inspection being delivered; never written anywhere.
    tokens: Option<(InspectionId, Tokens)>,
    /// Transient failures in a row (the backoff's exponent).
    failures: u32,
    /// Sessions given up in a row without a completion (to stop a 401 loop from spinning).
    renewals: u32,
    /// No request before this monotonic time.
    not_before: Duration,
    link: Link,
    jitter: Box<dyn FnMut() -> f64 + Send>,
    /// Sessions given up during the current pump, announced at its end.
    given_up: Vec<(InspectionId, String, String)>,
    /// Whether the kernel's unsynchronised clock was already reported (once until it syncs).
    told_kernel_unsynced: bool,
    /// The clock verdict last written beside the buffer (`clock_note`), for `queue`.
    noted_clock: ClockTrust,
    /// Sessions opened ahead of time (at most two, and then the current inspection's complete
    /// is settled: at most two sessions are open at once).
    prefetch: Vec<Prefetch>,
    /// Inspections finishing on threads of their own (their last request of images, then
    /// `complete`) while the pump goes on with the next, oldest first; two at most.
    completing: VecDeque<Completing>,
}

/// An inspection finishing on a thread of its own while the uploader goes on with the next:
/// its last request of images, then, when the cloud confirmed every file of it, `complete`.
/// So the next inspection's images start on the link before this one's answers are in, and
/// the link does not idle through those round trips. Its `complete` waits until the
/// `complete` of the inspection finishing before it was tried (completions stay oldest first).
/// The answers are settled exactly as ones awaited in turn (the images are marked sent, then
/// the inspection completed), oldest first, when they are in, before a third would start, or
/// before the queue is called empty. Meanwhile the pump skips this inspection. A kill while it
/// is on its way is the same window as a kill during any request: the session is in the
/// buffer and is asked about at restart. Once this session is consumed, the same thread may
/// authenticate the inspection after the next (so that two sessions at most are ever open).
struct Completing {
    inspection: InspectionSummary,
    session: String,
    images: Vec<ImageMeta>,
    /// The labels of the last request of images, sent by the thread (empty when every image
    /// was already confirmed and only `complete` was left).
    last_batch: Vec<PhotoLabel>,
    /// Closed by the thread once its last request is written out to the connection (or will
    /// not be): the next inspection's thread waits for it before its own images.
    written: Option<mpsc::Receiver<()>>,
    /// Closed by the thread once its `complete` was tried (or will not be): the next
    /// inspection's thread waits for it before its own `complete`.
    tried: Option<mpsc::Receiver<()>>,
    /// Taken when the thread is joined.
    handle: Option<std::thread::JoinHandle<Completed>>,
}

/// The authentication of the inspection waiting behind the one being sent, on a thread of its
/// own (a [`Client::twin`] on the same agent) while the current one uploads, so that the link
/// does not idle through that round trip. Its session is written to the buffer only when the
/// uploader takes it up, before its first image, exactly as a session opened in turn; if the
/// kiosk stops first, the cloud holds an empty session that nobody names, which expires unused.
struct Prefetch {
    id: InspectionId,
    state: Early,
}

/// Where an early authentication is.
enum Early {
    /// On its own thread.
    Running(std::thread::JoinHandle<Result<Tokens, Failure>>),
    /// Done, by the thread of the previous inspection's `complete`.
    Ready(Result<Tokens, Failure>),
}

/// What the thread of a finishing inspection did.
struct Completed {
    /// The answer to its last request of images, when it had one to send.
    upload: Option<Result<Vec<PhotoLabel>, Failure>>,
    /// The answer to `complete`; `None` when it was not sent (the images were not all confirmed).
    complete: Option<Result<(), Failure>>,
    /// If `complete` succeeded, the early authentication of the inspection queued next.
    early: Option<(InspectionId, Result<Tokens, Failure>)>,
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploader")
            .field("client", &self.client)
            .field("tokens", &self.tokens)
            .field("failures", &self.failures)
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

impl Uploader {
    pub fn new(client: Client, config: &crate::config::CloudConfig, clock: Arc<dyn Clock>) -> Uploader {
        Uploader {
            client,
            clock,
            max_request_bytes: config.max_request_bytes,
            require_clock_sync: config.require_clock_sync,
            tokens: None,
            failures: 0,
            renewals: 0,
            not_before: Duration::ZERO,
            link: Link { online: None, clock: ClockTrust::Unknown, last_error: None },
            jitter: Box::new(fastrand::f64),
            given_up: Vec::new(),
            told_kernel_unsynced: false,
            noted_clock: ClockTrust::Unknown,
            prefetch: Vec::new(),
            completing: VecDeque::new(),
        }
    }

    /// Reports every request to `alive`, so that a watchdog sees a long upload make progress.
    pub fn set_alive(&mut self, alive: super::client::Alive) {
        self.client.set_alive(alive);
    }

    /// Replaces the random source of the backoff's jitter (values in `[0, 1)`).
    pub fn with_jitter(mut self, jitter: impl FnMut() -> f64 + Send + 'static) -> Uploader {
        self.jitter = Box::new(jitter);
        self
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Forgets any wait, so that the next [`pump`](Self::pump) tries at once (an operator's
    /// retry, a link that came back).
    pub fn wake(&mut self) {
        self.not_before = Duration::ZERO;
    }

    /// Does the upload work due now and says when to call again. Never panics on what the cloud
    /// or the buffer says; errors become waits or a `failed` inspection with its reason.
    pub fn pump(&mut self, store: &mut Store, events: &mut dyn FnMut(Event)) -> Pump {
        let pumped = self.pump_once(store, events);
        self.note_clock(store);
        pumped
    }

    /// Writes the cloud's verdict on the clock beside the buffer when it changed, so that
    /// `queue` shows an untrusted clock. A note that cannot be written costs only that.
    fn note_clock(&mut self, store: &Store) {
        let trust = self.client.clock_trust();
        if std::mem::discriminant(&trust) == std::mem::discriminant(&self.noted_clock) {
            return;
        }
        let (Some(note), Some(dir)) =
            (super::clock_note::ClockNote::of(trust, self.clock.wall()), store.path().parent())
        else {
            return;
        };
        match super::clock_note::write(dir, &note) {
            Ok(()) => self.noted_clock = trust,
            Err(e) => log::debug!(error:% = e; "Could not note the clock's verdict beside the buffer"),
        }
    }

    fn pump_once(&mut self, store: &mut Store, events: &mut dyn FnMut(Event)) -> Pump {
        // An inspection finishing in the background whose answers are in is settled first,
        // even during a wait: the cloud holds its images, and the buffer should say so.
        if self.completing.front().is_some_and(|c| c.handle.as_ref().is_none_or(|h| h.is_finished())) {
            return self.settle_completing(store, events);
        }
        let now = self.clock.monotonic();
        if now < self.not_before {
            let why = self.link.last_error.clone().unwrap_or_else(|| "waiting".to_owned());
            return Pump::Wait(self.not_before - now, why);
        }
        // Two finishing already: the oldest is settled before a third session is taken up.
        if self.completing.len() >= 2 {
            return self.settle_completing(store, events);
        }
        let finishing = self.finishing();
        let next = match store.next_to_upload_besides(&finishing) {
            Ok(next) => next,
            Err(e) => return self.buffer_failed(&e),
        };
        let Some(inspection) = next else {
            if !self.completing.is_empty() {
                return self.settle_completing(store, events);
            }
            self.tokens = None;
            self.forget_prefetch();
            return Pump::Idle;
        };
        let outcome = self.deliver(store, &inspection, events);
        self.settle(store, &inspection, outcome, events)
    }

    /// The inspections finishing in the background.
    fn finishing(&self) -> Vec<InspectionId> {
        self.completing.iter().map(|c| c.inspection.id).collect()
    }

    /// Waits for the oldest inspection finishing in the background and acts on its answers.
    fn settle_completing(&mut self, store: &mut Store, events: &mut dyn FnMut(Event)) -> Pump {
        let Some(mut c) = self.completing.pop_front() else {
            return Pump::Progress;
        };
        let joined = c.handle.take().map(|handle| self.client.while_waiting(|| handle.join()));
        let done = match joined {
            Some(Ok(done)) => done,
            _ => Completed {
                upload: (!c.last_batch.is_empty())
                    .then(|| Err(panicked(&format!("upload to session {}", c.session)))),
                complete: Some(Err(panicked(&format!("complete session {}", c.session)))),
                early: None,
            },
        };
        if let Some((id, early)) = done.early {
            self.prefetch.push(Prefetch { id, state: Early::Ready(early) });
        }
        let outcome = self.after_finishing(store, &c, done.upload, done.complete, events);
        self.settle(store, &c.inspection, outcome, events)
    }

    /// Acts on the answers of an inspection that finished in the background: its last images
    /// first, exactly as if they had been sent in turn, then its `complete`.
    fn after_finishing(
        &mut self,
        store: &mut Store,
        c: &Completing,
        upload: Option<Result<Vec<PhotoLabel>, Failure>>,
        complete: Option<Result<(), Failure>>,
        events: &mut dyn FnMut(Event),
    ) -> Result<(), Stop> {
        if let Some(answer) = upload {
            let batch: Vec<&ImageMeta> =
                c.images.iter().filter(|m| c.last_batch.contains(&m.angle)).collect();
            self.after_upload(store, &c.inspection, &c.session, &batch, answer, events)?;
        }
        match complete {
            Some(answer) => self.after_complete(store, &c.inspection, &c.session, &c.images, answer, events),
            // Not reached: the thread completes whenever every file was confirmed.
            None => Err(Stop::Wait(self.next_backoff(), format!("complete session {}: not sent", c.session))),
        }
    }

    /// Acts on how delivering (or completing) `inspection` ended.
    fn settle(
        &mut self,
        store: &mut Store,
        inspection: &InspectionSummary,
        outcome: Result<(), Stop>,
        events: &mut dyn FnMut(Event),
    ) -> Pump {
        let (mine, others) =
            std::mem::take(&mut self.given_up).into_iter().partition(|g| g.0 == inspection.id);
        self.given_up = others;
        for (id, session, why) in mine {
            events(Event::SessionGivenUp { id, case_id: inspection.case_id.clone(), session, why });
        }
        match outcome {
            Ok(()) => {
                self.failures = 0;
                self.renewals = 0;
                self.set_link(Some(true), None, events);
                Pump::Progress
            }
            Err(Stop::Again) => {
                self.renewals += 1;
                if self.renewals > 3 {
                    // The cloud keeps refusing fresh sessions: back off instead of spinning.
                    let wait = self.next_backoff();
                    let why = format!(
                        "case {}: the cloud refused {} sessions in a row",
                        inspection.case_id, self.renewals
                    );
                    self.not_before = self.clock.monotonic() + wait;
                    return Pump::Wait(wait, why);
                }
                Pump::Progress
            }
            Err(Stop::Wait(wait, why)) => {
                log::warn!(
                    inspection_id = inspection.id.0, case_id = inspection.case_id.as_str(), retry_in_ms = wait.as_millis() as u64;
                    "Upload paused: {why}"
                );
                if let Err(e) = store.record_upload_attempt(inspection.id, Some(&why)) {
                    log::error!(inspection_id = inspection.id.0; "Could not record the upload attempt: {e}");
                }
                self.not_before = self.clock.monotonic() + wait;
                Pump::Wait(wait, why)
            }
            Err(Stop::Refused(reason)) => {
                self.drop_tokens_of(inspection.id);
                log::error!(
                    inspection_id = inspection.id.0, case_id = inspection.case_id.as_str();
                    "The cloud refused the inspection; it is kept as failed until an operator retries it: {reason}"
                );
                let recorded = store.record_upload_attempt(inspection.id, Some(&reason)).and_then(|()| {
                    store.set_state(inspection.id, InspectionState::Failed, Some(&reason), self.clock.wall())
                });
                if let Err(e) = recorded {
                    return self.buffer_failed(&e);
                }
                events(Event::Failed { id: inspection.id, case_id: inspection.case_id.clone(), reason });
                Pump::Progress
            }
            Err(Stop::Store(e)) => self.buffer_failed(&e),
        }
    }

    fn buffer_failed(&mut self, e: &StoreError) -> Pump {
        log::error!("The uploader cannot read or write the buffer: {e}");
        let wait = self.next_backoff();
        self.not_before = self.clock.monotonic() + wait;
        Pump::Wait(wait, format!("buffer: {e}"))
    }

    fn next_backoff(&mut self) -> Duration {
        let wait = backoff(self.failures, BASE_BACKOFF, MAX_BACKOFF, (self.jitter)());
        self.failures = self.failures.saturating_add(1);
        wait
    }

    fn set_link(&mut self, online: Option<bool>, error: Option<String>, events: &mut dyn FnMut(Event)) {
        let link = Link { online, clock: self.client.clock_trust(), last_error: error };
        if link != self.link {
            self.link = link.clone();
            events(Event::Link(link));
        }
    }

    fn deliver(
        &mut self,
        store: &mut Store,
        inspection: &InspectionSummary,
        events: &mut dyn FnMut(Event),
    ) -> Result<(), Stop> {
        let id = inspection.id;
        let case_id = inspection.case_id.as_str();
        self.check_clock(events)?;
        if inspection.state == InspectionState::Captured {
            store.set_state(id, InspectionState::Uploading, None, self.clock.wall())?;
            log::info!(inspection_id = id.0, case_id = case_id; "Upload started");
            events(Event::Started { id, case_id: case_id.to_owned() });
        }
        let images = store.images(id)?;
        if images.is_empty() {
            return Err(Stop::Refused("the inspection holds no image".to_owned()));
        }

        // The session: fresh tokens in memory, or what a session named in the buffer holds.
        if self.tokens.as_ref().is_some_and(|(owner, _)| *owner != id) {
            self.tokens = None;
        }
        let now = self.clock.monotonic();
        if let Some((_, tokens)) = self.tokens.as_ref().filter(|(_, t)| !t.fresh(now)) {
            log::info!(inspection_id = id.0, session = tokens.session.as_str(); "Tokens about to expire; renewing before they do");
            let all_sent = self.all_sent(store, id, &tokens.session, &images)?;
            if !all_sent {
                self.abandon(store, id, "its tokens were about to expire before every image was sent")?;
            }
            self.tokens = None;
        }
        let session = match &self.tokens {
            Some((_, tokens)) => tokens.session.clone(),
            None => match store.upload_state(id)?.session {
                Some(session) => match self.recover(store, inspection, &session, &images, events)? {
                    Recovered::Done => return Ok(()),
                    Recovered::CompleteOnly => session,
                    Recovered::GivenUp => self.open_session(store, inspection)?,
                },
                None => self.open_session(store, inspection)?,
            },
        };

        // The next inspection's session is opened while this one's images travel.
        self.prefetch_next(store, id);

        // The images the session does not hold yet. When another inspection waits, the last
        // request and `complete` go on a thread of their own, so that the next inspection's
        // images follow on the link without waiting for these answers. Only while the link is
        // healthy: after a failure, one inspection at a time, so that a cloud asking to wait
        // or failing is not sent two requests for every one it refuses.
        let mut finishing = self.finishing();
        finishing.push(id);
        let background =
            self.failures == 0 && matches!(store.next_to_upload_besides(&finishing), Ok(Some(_)));
        let sent = store.sent(id, &session)?;
        let todo: Vec<&ImageMeta> = images.iter().filter(|m| sent.get(&m.angle) != Some(&m.sha256)).collect();
        let sizes: Vec<u64> = todo.iter().map(|m| m.bytes + PART_OVERHEAD).collect();
        let limit = self.max_request_bytes.saturating_sub(REQUEST_HEAD_ROOM).max(1);
        let mut requests = batches(&sizes, MAX_FILES_PER_REQUEST, limit);
        let last = if background { requests.pop() } else { None };
        for range in requests {
            self.send_batch(store, inspection, &session, &todo[range], events)?;
        }
        if background {
            let last: Vec<&ImageMeta> = last.map_or_else(Vec::new, |range| todo[range].to_vec());
            if self.finish_in_background(store, inspection, &session, &images, &last)? {
                return Ok(());
            }
            // No thread: the last request goes in turn.
            if !last.is_empty() {
                self.send_batch(store, inspection, &session, &last, events)?;
            }
        }

        // Complete in turn, after every inspection finishing in the background was settled (so
        // completions stay oldest first).
        while !self.completing.is_empty() {
            let _ = self.settle_completing(store, events);
        }
        let labels: Vec<PhotoLabel> = images.iter().map(|m| m.angle).collect();
        let answer = self.client.complete(&session, case_id, &labels);
        self.after_complete(store, inspection, &session, &images, answer, events)
    }

    /// Hands the inspection's last request of images (`last`, perhaps none) and its `complete`
    /// to a thread of its own. `Ok(true)` when the thread took them; `Ok(false)` when they are
    /// to be sent in turn (no fresh token for the images, or no thread could be started).
    fn finish_in_background(
        &mut self,
        store: &mut Store,
        inspection: &InspectionSummary,
        session: &str,
        images: &[ImageMeta],
        last: &[&ImageMeta],
    ) -> Result<bool, Stop> {
        let id = inspection.id;
        let upload = if last.is_empty() {
            None
        } else {
            let now = self.clock.monotonic();
            let Some((_, tokens)) = self.tokens.as_ref().filter(|(owner, t)| *owner == id && t.fresh(now))
            else {
                // Sent in turn, where a session without a fresh token is given up.
                return Ok(false);
            };
            let tokens = tokens.clone();
            let jpegs = self.batch_jpegs(store, id, last)?;
            let files: Vec<(PhotoLabel, Vec<u8>, String)> =
                last.iter().zip(jpegs).map(|(m, jpeg)| (m.angle, jpeg, m.sha256.clone())).collect();
            Some((tokens, files))
        };
        let last_batch: Vec<PhotoLabel> = last.iter().map(|m| m.angle).collect();
        let labels: Vec<PhotoLabel> = images.iter().map(|m| m.angle).collect();
        let mut besides = self.finishing();
        besides.push(id);
        besides.extend(self.prefetch.iter().map(|p| p.id));
        // Only while the next inspection's session is already open and nothing else finishes:
        // the one after it is opened once this one is consumed (never three open at once).
        let after = if self.prefetch.len() == 1 && self.completing.is_empty() {
            self.to_open_early(store, &besides)
        } else {
            None
        };
        // The images follow the previous inspection's once those are all written out, and the
        // complete follows the previous complete.
        let (previous_written, previous_tried) = match self.completing.back_mut() {
            Some(c) => (c.written.take(), c.tried.take()),
            None => (None, None),
        };
        let (written_tx, written) = mpsc::channel::<()>();
        let (tried_tx, tried) = mpsc::channel::<()>();
        let mut twin = self.client.twin();
        let (s, c) = (session.to_owned(), inspection.case_id.clone());
        let batch_labels = last_batch.clone();
        let spawned = std::thread::Builder::new().name("upload-finish".to_owned()).spawn(move || {
            let upload = match upload {
                Some((tokens, files)) => {
                    let parts: Vec<Part<'_>> = files
                        .iter()
                        .map(|(label, jpeg, sha256)| Part { label: *label, jpeg, sha256 })
                        .collect();
                    if let Some(previous) = previous_written {
                        let _ = previous.recv();
                    }
                    Some(twin.upload_announcing(&tokens, &c, &parts, Some(written_tx)))
                }
                None => {
                    drop(written_tx);
                    None
                }
            };
            let confirmed = match &upload {
                None => true,
                Some(Ok(received)) => batch_labels.iter().all(|l| received.contains(l)),
                Some(Err(_)) => false,
            };
            // Oldest first: the previous inspection's complete is tried before this one's.
            if let Some(previous) = previous_tried {
                let _ = previous.recv();
            }
            let complete = confirmed.then(|| twin.complete(&s, &c, &labels));
            drop(tried_tx);
            let early = match (&complete, after) {
                (Some(Ok(())), Some((next, case_id, vehicle))) => {
                    Some((next, twin.authenticate(&case_id, vehicle.as_ref())))
                }
                _ => None,
            };
            Completed { upload, complete, early }
        });
        match spawned {
            Ok(handle) => {
                self.completing.push_back(Completing {
                    inspection: inspection.clone(),
                    session: session.to_owned(),
                    images: images.to_vec(),
                    last_batch,
                    written: Some(written),
                    tried: Some(tried),
                    handle: Some(handle),
                });
                Ok(true)
            }
            Err(e) => {
                log::warn!(inspection_id = id.0; "Could not start a thread to finish the inspection; it finishes in turn: {e}");
                Ok(false)
            }
        }
    }

    /// Acts on the answer to `complete` (or the lack of one).
    fn after_complete(
        &mut self,
        store: &mut Store,
        inspection: &InspectionSummary,
        session: &str,
        images: &[ImageMeta],
        answer: Result<(), Failure>,
        events: &mut dyn FnMut(Event),
    ) -> Result<(), Stop> {
        let id = inspection.id;
        let session = session.to_owned();
        match answer {
            Ok(()) => self.completed(store, inspection, &session, images, events),
            Err(f) if f.verdict == Verdict::SessionConsumed => {
                // A complete whose answer was lost consumed it; ask before deciding.
                match self.client.session(&session) {
                    Ok(info) if matches!(info.status.as_str(), "PROCESS" | "COMPLETE") => {
                        self.completed(store, inspection, &session, images, events)
                    }
                    Ok(_) | Err(_) => self.give_up(store, id, &session, &f.detail),
                }
            }
            Err(f) if matches!(f.verdict, Verdict::Permanent(_)) && !f.missing.is_empty() => {
                // The server lost images it had confirmed: send everything again, fresh.
                self.give_up(store, id, &session, &f.detail)
            }
            Err(f) if f.verdict == Verdict::Backoff => {
                // No answer (a reset, the deadline, a 5xx, an unreadable 2xx): the cloud may have
                // completed the session. Forgetting the tokens puts the uploader where a restart
                // would: the next try asks `GET /v1/sessions/{s}` and completes only a session
                // the cloud says is still open. A second complete is never sent blind.
                log::warn!(inspection_id = id.0, session = session.as_str(); "The answer to complete was lost; the session is asked about before anything else");
                self.drop_tokens_of(id);
                Err(self.failure(store, id, &session, f, events))
            }
            Err(f) => Err(self.failure(store, id, &session, f, events)),
        }
    }

    fn check_clock(&mut self, events: &mut dyn FnMut(Event)) -> Result<(), Stop> {
        if !self.require_clock_sync {
            return Ok(());
        }
        if !matches!(self.client.clock_trust(), ClockTrust::Trusted { .. }) {
            match super::client::kernel_clock_synchronised() {
                Some(false) if !self.told_kernel_unsynced => {
                    log::warn!("The kernel marks its clock unsynchronised (is NTP running?); asking the cloud's clock before signing");
                    self.told_kernel_unsynced = true;
                }
                Some(true) => self.told_kernel_unsynced = false,
                _ => {}
            }
            if let Err(f) = self.client.probe_clock() {
                let wait = self.next_backoff();
                self.set_link(Some(false), Some(f.detail.clone()), events);
                return Err(Stop::Wait(wait, f.detail));
            }
        }
        match self.client.clock_trust() {
            ClockTrust::Untrusted { .. } => {
                let why = format!(
                    "clock untrusted: the kiosk's clock is {}",
                    super::client::describe_trust(self.client.clock_trust())
                );
                self.set_link(Some(true), Some(why.clone()), events);
                Err(Stop::Wait(CLOCK_RECHECK, why))
            }
            _ => Ok(()),
        }
    }

    fn all_sent(
        &self,
        store: &Store,
        id: InspectionId,
        session: &str,
        images: &[ImageMeta],
    ) -> Result<bool, Stop> {
        let sent = store.sent(id, session)?;
        Ok(images.iter().all(|m| sent.get(&m.angle) == Some(&m.sha256)))
    }

    /// Finds out what a session named in the buffer (without tokens) holds.
    fn recover(
        &mut self,
        store: &mut Store,
        inspection: &InspectionSummary,
        session: &str,
        images: &[ImageMeta],
        events: &mut dyn FnMut(Event),
    ) -> Result<Recovered, Stop> {
        let id = inspection.id;
        match self.client.session(session) {
            Ok(info) if matches!(info.status.as_str(), "PROCESS" | "COMPLETE") => {
                log::info!(inspection_id = id.0, session = session; "The cloud already completed this session");
                self.completed(store, inspection, session, images, events)?;
                Ok(Recovered::Done)
            }
            Ok(info) if info.status != "EXPIRED" => {
                let holds_all = images.iter().all(|m| {
                    info.photos.iter().any(|p| p.photo_label == m.angle.as_str() && p.sha256 == m.sha256)
                });
                if holds_all {
                    log::info!(inspection_id = id.0, session = session; "The cloud holds every image of this session; completing it");
                    let pairs: Vec<(PhotoLabel, &str)> =
                        images.iter().map(|m| (m.angle, m.sha256.as_str())).collect();
                    store.mark_sent(id, session, &pairs, self.clock.wall())?;
                    Ok(Recovered::CompleteOnly)
                } else {
                    self.abandon(store, id, "incomplete, and its tokens were lost (restart or expiry); every image goes again under a new session")?;
                    Ok(Recovered::GivenUp)
                }
            }
            Ok(_) => {
                self.abandon(store, id, "the cloud says it expired")?;
                Ok(Recovered::GivenUp)
            }
            Err(f)
                if matches!(
                    f.verdict,
                    Verdict::SessionExpired | Verdict::SessionConsumed | Verdict::Permanent(_)
                ) =>
            {
                self.abandon(store, id, &f.detail)?;
                Ok(Recovered::GivenUp)
            }
            Err(f) => Err(self.failure(store, id, session, f, events)),
        }
    }

    fn open_session(&mut self, store: &mut Store, inspection: &InspectionSummary) -> Result<String, Stop> {
        let id = inspection.id;
        let tokens = match self.take_prefetched(id) {
            Some(tokens) => tokens,
            None => {
                let vehicle = store.vehicle_json(id)?;
                match self.client.authenticate(&inspection.case_id, vehicle.as_ref()) {
                    Ok(t) => t,
                    Err(f) => {
                        let mut nothing = |_| {};
                        return Err(self.failure(store, id, "", f, &mut nothing));
                    }
                }
            }
        };
        let session = tokens.session.clone();
        store.open_session(id, &session)?;
        log::info!(inspection_id = id.0, case_id = inspection.case_id.as_str(), session = session.as_str(); "Cloud session opened");
        self.tokens = Some((id, tokens));
        Ok(session)
    }

    /// Starts authenticating the inspection queued behind `current`, unless one is already
    /// running or that inspection names a session in the buffer (that one is asked about first,
    /// in turn). At most two sessions are thus in flight: the current one and the next.
    fn prefetch_next(&mut self, store: &Store, current: InspectionId) {
        if !self.prefetch.is_empty() || !self.completing.is_empty() {
            return;
        }
        let Some((next, case_id, vehicle)) = self.to_open_early(store, &[current]) else {
            return;
        };
        let mut twin = self.client.twin();
        let spawned = std::thread::Builder::new()
            .name("upload-prefetch".to_owned())
            .spawn(move || twin.authenticate(&case_id, vehicle.as_ref()));
        match spawned {
            Ok(handle) => {
                log::debug!(inspection_id = next.0; "Opening the next inspection's session while this one uploads");
                self.prefetch.push(Prefetch { id: next, state: Early::Running(handle) });
            }
            Err(e) => {
                log::warn!(inspection_id = next.0; "Could not start a thread to open the next session early; it is opened in turn: {e}");
            }
        }
    }

    /// The inspection whose session may be opened early: the first one waiting besides
    /// `besides` that names no session in the buffer (one that does is asked about first, in
    /// turn), with its case id and vehicle.
    fn to_open_early(
        &self,
        store: &Store,
        besides: &[InspectionId],
    ) -> Option<(InspectionId, String, Option<serde_json::Value>)> {
        let next = match store.next_to_upload_besides(besides) {
            Ok(next) => next?,
            Err(e) => {
                log::warn!("Could not look up the next inspection to upload: {e}");
                return None;
            }
        };
        if !matches!(store.upload_state(next.id), Ok(u) if u.session.is_none()) {
            return None;
        }
        // A vehicle that cannot be read is read again in turn, where it gets its clear error.
        let vehicle = store.vehicle_json(next.id).ok()?;
        Some((next.id, next.case_id, vehicle))
    }

    /// The tokens opened ahead of time for inspection `id`, if they are there and still fresh.
    /// A prefetch for another inspection stays where it is.
    fn take_prefetched(&mut self, id: InspectionId) -> Option<Tokens> {
        let at = self.prefetch.iter().position(|p| p.id == id)?;
        let prefetch = self.prefetch.remove(at);
        match self.early_result(prefetch.state) {
            Ok(tokens) if tokens.fresh(self.clock.monotonic()) => Some(tokens),
            Ok(tokens) => {
                log::info!(inspection_id = id.0, session = tokens.session.as_str(); "A session opened ahead of time aged before use; it expires unused and a new one is opened");
                None
            }
            Err(f) => {
                log::debug!(inspection_id = id.0, error = f.detail.as_str(); "Opening the session ahead of time failed; it is opened in turn");
                None
            }
        }
    }

    fn early_result(&self, state: Early) -> Result<Tokens, Failure> {
        match state {
            Early::Ready(result) => result,
            Early::Running(handle) => self
                .client
                .while_waiting(|| handle.join())
                .unwrap_or_else(|_| Err(panicked("authenticate ahead of time"))),
        }
    }

    /// Waits for a prefetch nobody will take (the queue ran empty): its session expires unused.
    fn forget_prefetch(&mut self) {
        for prefetch in std::mem::take(&mut self.prefetch) {
            if let Ok(tokens) = self.early_result(prefetch.state) {
                log::info!(inspection_id = prefetch.id.0, session = tokens.session.as_str(); "A session opened ahead of time was not needed; it expires unused");
            }
        }
    }

    fn send_batch(
        &mut self,
        store: &mut Store,
        inspection: &InspectionSummary,
        session: &str,
        batch: &[&ImageMeta],
        events: &mut dyn FnMut(Event),
    ) -> Result<(), Stop> {
        let id = inspection.id;
        let now = self.clock.monotonic();
        let Some((_, tokens)) = self.tokens.as_ref().filter(|(owner, t)| *owner == id && t.fresh(now)) else {
            // No usable token for this session (a recovered one, or tokens that aged out
            // between requests): the images go again under a new session.
            self.abandon(store, id, "no fresh token left for the images still to send")?;
            self.tokens = None;
            return Err(Stop::Again);
        };
        let jpegs = self.batch_jpegs(store, id, batch)?;
        let parts: Vec<Part<'_>> = batch
            .iter()
            .zip(&jpegs)
            .map(|(meta, jpeg)| Part { label: meta.angle, jpeg, sha256: &meta.sha256 })
            .collect();
        let answer = self.client.upload(tokens, &inspection.case_id, &parts);
        self.after_upload(store, inspection, session, batch, answer, events)
    }

    /// The bytes of a request's images, read from the buffer.
    fn batch_jpegs(
        &self,
        store: &Store,
        id: InspectionId,
        batch: &[&ImageMeta],
    ) -> Result<Vec<Vec<u8>>, Stop> {
        let mut jpegs = Vec::with_capacity(batch.len());
        for meta in batch {
            let jpeg = store.image_jpeg(id, meta.angle)?.ok_or_else(|| {
                Stop::Refused(format!("image {} vanished from the buffer while being uploaded", meta.angle))
            })?;
            jpegs.push(jpeg);
        }
        Ok(jpegs)
    }

    /// Acts on the answer to a request of images: what the cloud confirmed is marked sent.
    fn after_upload(
        &mut self,
        store: &mut Store,
        inspection: &InspectionSummary,
        session: &str,
        batch: &[&ImageMeta],
        answer: Result<Vec<PhotoLabel>, Failure>,
        events: &mut dyn FnMut(Event),
    ) -> Result<(), Stop> {
        let id = inspection.id;
        match answer {
            Ok(received) => {
                let confirmed: Vec<(PhotoLabel, &str)> = batch
                    .iter()
                    .filter(|m| received.contains(&m.angle))
                    .map(|m| (m.angle, m.sha256.as_str()))
                    .collect();
                store.mark_sent(id, session, &confirmed, self.clock.wall())?;
                let bytes = batch.iter().filter(|m| received.contains(&m.angle)).map(|m| m.bytes).sum();
                let images_sent = store.upload_state(id).map_or(0, |u| u.sent);
                events(Event::Sent {
                    id,
                    case_id: inspection.case_id.clone(),
                    labels: confirmed.iter().map(|(l, _)| *l).collect(),
                    bytes,
                    images_sent,
                    images_total: inspection.images,
                });
                if confirmed.len() < batch.len() {
                    let wait = self.next_backoff();
                    return Err(Stop::Wait(
                        wait,
                        format!("upload to session {session}: the cloud did not confirm every file"),
                    ));
                }
                Ok(())
            }
            Err(f) => Err(self.failure(store, id, session, f, events)),
        }
    }

    fn completed(
        &mut self,
        store: &mut Store,
        inspection: &InspectionSummary,
        session: &str,
        images: &[ImageMeta],
        events: &mut dyn FnMut(Event),
    ) -> Result<(), Stop> {
        store.set_state(inspection.id, InspectionState::Completed, None, self.clock.wall())?;
        store.set_upload_error(inspection.id, None)?;
        self.drop_tokens_of(inspection.id);
        let bytes = images.iter().map(|m| m.bytes).sum();
        log::info!(
            inspection_id = inspection.id.0, case_id = inspection.case_id.as_str(), session = session, images = images.len() as u64, bytes = bytes;
            "Inspection completed at the cloud"
        );
        events(Event::Uploaded {
            id: inspection.id,
            case_id: inspection.case_id.clone(),
            session: session.to_owned(),
            images: images.len() as u64,
            bytes,
        });
        Ok(())
    }

    /// Forgets the tokens in memory if they are inspection `id`'s (those of the inspection
    /// being sent stay while an earlier one's complete is settled).
    fn drop_tokens_of(&mut self, id: InspectionId) {
        if self.tokens.as_ref().is_some_and(|(owner, _)| *owner == id) {
            self.tokens = None;
        }
    }

    /// Gives up the inspection's open session for good and remembers to say so.
    fn abandon(&mut self, store: &mut Store, id: InspectionId, why: &str) -> Result<(), StoreError> {
        if let Some(session) = store.upload_state(id)?.session {
            self.given_up.push((id, session, why.to_owned()));
        }
        store.abandon_session(id, why, self.clock.wall())
    }

    fn give_up(&mut self, store: &mut Store, id: InspectionId, session: &str, why: &str) -> Result<(), Stop> {
        log::warn!(inspection_id = id.0, session = session; "Cloud session given up; every image goes again under a new one: {why}");
        self.abandon(store, id, why)?;
        self.drop_tokens_of(id);
        Err(Stop::Again)
    }

    /// Turns a failed call into what happens next.
    fn failure(
        &mut self,
        store: &mut Store,
        id: InspectionId,
        session: &str,
        f: Failure,
        events: &mut dyn FnMut(Event),
    ) -> Stop {
        match f.verdict {
            Verdict::Done => Stop::Again,
            Verdict::Reauthenticate | Verdict::SessionExpired | Verdict::SessionConsumed => {
                if session.is_empty() {
                    self.drop_tokens_of(id);
                    return Stop::Again;
                }
                match self.give_up(store, id, session, &f.detail) {
                    Err(stop) => stop,
                    Ok(()) => Stop::Again,
                }
            }
            Verdict::RetryAfter(wait) => {
                self.failures = self.failures.saturating_add(1);
                self.set_link(Some(true), Some(f.detail.clone()), events);
                Stop::Wait(wait, f.detail)
            }
            Verdict::Backoff => {
                let wait = self.next_backoff();
                self.set_link(Some(false), Some(f.detail.clone()), events);
                Stop::Wait(wait, f.detail)
            }
            Verdict::ClockRejected => {
                let why = format!("clock untrusted: {}", f.detail);
                self.set_link(Some(true), Some(why.clone()), events);
                Stop::Wait(CLOCK_RECHECK, why)
            }
            Verdict::BadCredentials(_) => {
                let why = format!("{}: check cloud.username, cloud.api_key and the API secret", f.detail);
                self.set_link(Some(true), Some(why.clone()), events);
                Stop::Wait(CREDENTIALS_RECHECK, why)
            }
            Verdict::Permanent(_) => Stop::Refused(f.detail),
        }
    }
}

/// A helper thread that died: treated as a request whose answer was lost.
fn panicked(what: &str) -> Failure {
    Failure {
        verdict: Verdict::Backoff,
        detail: format!("{what}: the thread sending it panicked"),
        missing: Vec::new(),
    }
}

enum Recovered {
    /// The cloud had already completed it.
    Done,
    /// The session holds every image: only `complete` is left.
    CompleteOnly,
    /// The session was given up; open a new one.
    GivenUp,
}
