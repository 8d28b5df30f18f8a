//! The uploader against the strict stand-in of the cloud API, over loopback, on a clock the
//! test moves: every wait the uploader asks for advances the clock instead of sleeping, so 15
//! minutes of token life and 5 minutes of backoff pass in milliseconds.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capture_kiosk::clock::ManualClock;
use capture_kiosk::standin::{FaultKind, SessionRecord, StandIn, StandInConfig};
use capture_kiosk::store::{InspectionId, InspectionState, Store};
use capture_kiosk::upload::clock_note;
use capture_kiosk::upload::drain::{drain, uploader, Drained};
use capture_kiosk::upload::{Event, Uploader};
use capture_kiosk::vehicle::PhotoLabel;
use support::{captured, cloud, secret_file, CAPS};

const EXTERIOR: [PhotoLabel; 8] = PhotoLabel::EXTERIOR;

struct Bay {
    clock: ManualClock,
    standin: StandIn,
    store: Store,
    uploader: Uploader,
    _dir: tempfile::TempDir,
}

fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_000_000)
}

fn bay_with(max_request_bytes: u64, configure: impl FnOnce(&mut StandInConfig)) -> Bay {
    let clock = ManualClock::starting_at(start());
    let mut config = StandInConfig::default();
    configure(&mut config);
    let standin = StandIn::start(config.clone(), Arc::new(clock.clone())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path(), &config);
    let mut cloud = cloud(&standin.base_url(), &secret);
    cloud.max_request_bytes = max_request_bytes;
    let store = Store::open(&dir.path().join("state"), CAPS, start()).unwrap();
    // Mid-range jitter: waits are deterministic and non-zero.
    let uploader = uploader(&cloud, Arc::new(clock.clone())).unwrap().with_jitter(|| 0.5);
    Bay { clock, standin, store, uploader, _dir: dir }
}

fn bay() -> Bay {
    bay_with(32 << 20, |_| {})
}

impl Bay {
    /// Drains with a budget of waits; every wait moves the clock. Returns the pass and the
    /// waits asked for.
    fn drain(&mut self, budget: Duration) -> (Drained, Vec<Duration>, Vec<Event>) {
        self.drain_with(budget, |_, _| {})
    }

    fn drain_with(
        &mut self,
        budget: Duration,
        mut on_event: impl FnMut(&Event, &StandIn),
    ) -> (Drained, Vec<Duration>, Vec<Event>) {
        let waits = Mutex::new(Vec::new());
        let mut events = Vec::new();
        let clock = self.clock.clone();
        let standin = &self.standin;
        let drained = drain(
            &mut self.uploader,
            &mut self.store,
            budget,
            &mut |d| {
                waits.lock().unwrap().push(d);
                clock.advance(d);
            },
            &mut |e| {
                on_event(e, standin);
                events.push(e.clone());
            },
        );
        (drained, waits.into_inner().unwrap(), events)
    }

    fn state(&self, id: InspectionId) -> InspectionState {
        self.store.inspection(id).unwrap().unwrap().state
    }

    fn completed_sessions(&self, case_id: &str) -> Vec<SessionRecord> {
        self.standin.sessions().into_iter().filter(|s| s.case_id == case_id && s.completed).collect()
    }

    /// The one completed session of `case_id` holds exactly the buffered images, each stored
    /// once, and was completed once listing every label.
    fn assert_delivered_once(&self, id: InspectionId, case_id: &str) -> SessionRecord {
        assert_eq!(self.state(id), InspectionState::Completed, "inspection {id} state");
        let completed = self.completed_sessions(case_id);
        assert_eq!(completed.len(), 1, "exactly one completed session for {case_id}: {completed:#?}");
        let session = completed.into_iter().next().unwrap();
        assert_eq!(session.completions, 1);
        let images = self.store.images(id).unwrap();
        assert_eq!(session.photos.len(), images.len(), "labels in the session");
        for meta in &images {
            let photo =
                session.photo(meta.angle.as_str()).unwrap_or_else(|| panic!("{} missing", meta.angle));
            assert_eq!(photo.sha256, meta.sha256, "{} arrived intact", meta.angle);
            assert_eq!(photo.bytes, meta.bytes);
            assert_eq!(photo.stores, 1, "{} stored once", meta.angle);
        }
        let mut listed = session.completed_labels.clone();
        listed.sort();
        let mut labels: Vec<String> = images.iter().map(|m| m.angle.as_str().to_owned()).collect();
        labels.sort();
        assert_eq!(listed, labels, "complete listed every captured label");
        for s in self.standin.sessions() {
            assert!(s.completions <= 1, "session {} completed twice", s.session);
        }
        assert_eq!(self.standin.secret_leaks(), 0, "the API secret never travels");
        session
    }
}

#[test]
fn happy_path_every_label_once_one_completion_no_secret_on_the_wire() {
    let mut bay = bay();
    let first = captured(&mut bay.store, "CASE-1", &EXTERIOR, 200, start());
    let second = captured(&mut bay.store, "CASE-2", &EXTERIOR[..3], 100, start());
    let (drained, waits, events) = bay.drain(Duration::ZERO);
    assert!(waits.is_empty(), "nothing to wait for: {waits:?}");
    assert_eq!(drained.completed, vec![first, second], "oldest first");
    assert!(drained.failed.is_empty());
    let session = bay.assert_delivered_once(first, "CASE-1");
    bay.assert_delivered_once(second, "CASE-2");
    assert_eq!(session.upload_requests, 1, "eight 200 KiB images fit one request");
    assert_eq!(bay.standin.authenticate_calls(), 2, "one session per inspection");
    let vin = session.vehicle.as_ref().and_then(|v| v.get("vin")).and_then(|v| v.as_str());
    assert_eq!(vin, Some("JN1CV6AR9BM123456"), "the vehicle went with authenticate");
    let upload_state = bay.store.upload_state(first).unwrap();
    assert_eq!(upload_state.last_error, None);
    assert!(events.iter().any(|e| matches!(e, Event::Uploaded { id, .. } if *id == first)));
    // Nothing left: the next pass is idle and sends nothing.
    let requests = bay.standin.requests().len();
    let (again, _, _) = bay.drain(Duration::ZERO);
    assert!(again.completed.is_empty());
    assert_eq!(bay.standin.requests().len(), requests, "an empty queue sends nothing");
    // The images stay in the buffer after completion; only the retention rule removes them.
    assert_eq!(bay.store.images(first).unwrap().len(), 8);
}

#[test]
fn requests_respect_the_byte_cap_and_tokens_are_renewed_before_they_expire() {
    // 1 MiB per request and ~300 KiB images: three images a request, three requests.
    let mut bay = bay_with(1 << 20, |_| {});
    let id = captured(&mut bay.store, "CASE-TOKENS", &EXTERIOR, 300, start());
    let mut sent = 0;
    let (drained, _, _) = bay.drain_with(Duration::ZERO, |e, _| {
        if let Event::Sent { .. } = e {
            sent += 1;
        }
    });
    assert_eq!(drained.completed, vec![id]);
    let session = bay.assert_delivered_once(id, "CASE-TOKENS");
    assert!(session.upload_requests >= 3, "split by bytes: {} requests", session.upload_requests);

    // Now the clock jumps 14 min 10 s after the first request: the tokens are within the
    // renewal margin, so the kiosk opens a new session before one is refused.
    let mut bay = bay_with(1 << 20, |_| {});
    let id = captured(&mut bay.store, "CASE-AGING", &EXTERIOR, 300, start());
    let clock = bay.clock.clone();
    let mut jumped = false;
    let (drained, _, _) = bay.drain_with(Duration::ZERO, |e, _| {
        if matches!(e, Event::Sent { .. }) && !jumped {
            jumped = true;
            clock.advance(Duration::from_secs(850));
        }
    });
    assert_eq!(drained.completed, vec![id]);
    bay.assert_delivered_once(id, "CASE-AGING");
    assert_eq!(bay.standin.sessions().len(), 2, "a second session after the renewal");
    let refused = bay.standin.requests().iter().filter(|r| r.status == Some(401)).count();
    assert_eq!(refused, 0, "renewed before expiry, not after a refusal");
}

#[test]
fn a_token_the_cloud_expires_mid_inspection_means_a_new_session_with_every_image() {
    let mut bay = bay_with(1 << 20, |_| {});
    let id = captured(&mut bay.store, "CASE-401", &EXTERIOR, 300, start());
    let mut expired = false;
    let (drained, _, _) = bay.drain_with(Duration::ZERO, |e, standin| {
        if matches!(e, Event::Sent { .. }) && !expired {
            expired = true;
            standin.expire_all_tokens();
        }
    });
    assert_eq!(drained.completed, vec![id]);
    let session = bay.assert_delivered_once(id, "CASE-401");
    let sessions = bay.standin.sessions();
    assert_eq!(sessions.len(), 2);
    let first = sessions.iter().find(|s| s.session != session.session).unwrap();
    assert!(!first.completed, "the first session is left, never completed");
    assert!(bay.standin.requests().iter().any(|r| r.status == Some(401)));
}

#[test]
fn an_expired_session_is_never_used_again() {
    let mut bay = bay_with(1 << 20, |_| {});
    let id = captured(&mut bay.store, "CASE-410", &EXTERIOR, 300, start());
    let mut expired = None;
    let (drained, _, _) = bay.drain_with(Duration::ZERO, |e, standin| {
        if matches!(e, Event::Sent { .. }) && expired.is_none() {
            let s = standin.sessions().into_iter().next().unwrap().session;
            assert!(standin.expire_session(&s));
            expired = Some(s);
        }
    });
    assert_eq!(drained.completed, vec![id]);
    let session = bay.assert_delivered_once(id, "CASE-410");
    let expired = expired.unwrap();
    assert_ne!(session.session, expired);
    let after_410: Vec<_> =
        bay.standin.requests().into_iter().skip_while(|r| r.status != Some(410)).skip(1).collect();
    assert!(!after_410.is_empty(), "a 410 was answered");
    assert!(bay.store.session_is_dead(&expired).unwrap(), "recorded as given up");
    // The stand-in records per session: the expired one received nothing after its expiry.
    let old = bay.standin.session(&expired).unwrap();
    assert!(!old.completed);
    assert!(old.upload_requests < 3, "the expired session got no more uploads: {}", old.upload_requests);
}

#[test]
fn retry_after_from_429_and_503_is_honoured() {
    let mut bay = bay();
    let id = captured(&mut bay.store, "CASE-BUSY", &EXTERIOR, 100, start());
    bay.standin.fail_next_uploads(1, 429, Duration::from_secs(7));
    bay.standin.fail_next_uploads(1, 503, Duration::from_secs(11));
    let (drained, waits, _) = bay.drain(Duration::from_secs(60));
    assert_eq!(drained.completed, vec![id]);
    assert_eq!(waits, vec![Duration::from_secs(7), Duration::from_secs(11)]);
    bay.assert_delivered_once(id, "CASE-BUSY");
    let state = bay.store.upload_state(id).unwrap();
    assert_eq!(state.attempts, 2, "each pause counted");
    assert_eq!(state.last_error, None, "cleared on completion");
}

#[test]
fn a_reset_connection_is_retried_after_a_jittered_backoff() {
    let mut bay = bay();
    let id = captured(&mut bay.store, "CASE-RESET", &EXTERIOR, 100, start());
    bay.standin.reset_next_requests(2, Some("/api/upload"));
    let (drained, waits, _) = bay.drain(Duration::from_secs(60));
    assert_eq!(drained.completed, vec![id]);
    // Full jitter at 0.5 of 1 s, then of 2 s.
    assert_eq!(waits, vec![Duration::from_millis(500), Duration::from_secs(1)]);
    bay.assert_delivered_once(id, "CASE-RESET");
}

#[test]
fn an_upload_accepted_then_dropped_is_retried_with_the_same_key_and_stored_once() {
    let mut bay = bay();
    let id = captured(&mut bay.store, "CASE-DROP", &EXTERIOR, 100, start());
    bay.standin.drop_after_accepting_next_uploads(1);
    let (drained, _, _) = bay.drain(Duration::from_secs(60));
    assert_eq!(drained.completed, vec![id]);
    let session = bay.assert_delivered_once(id, "CASE-DROP");
    assert_eq!(session.idempotent_replays, 1, "the retry was answered from its Idempotency-Key");
    assert_eq!(session.upload_requests, 1, "stored by one request only");
    assert!(bay.standin.requests().iter().any(|r| r.fault == Some(FaultKind::DroppedAfterAccepting)));
}

#[test]
fn a_stalled_server_cannot_stall_the_uploader() {
    let clock = ManualClock::starting_at(start());
    let config = StandInConfig::default();
    let standin = StandIn::start(config.clone(), Arc::new(clock.clone())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = cloud(&standin.base_url(), &secret_file(dir.path(), &config));
    cloud.request_timeout = Duration::from_millis(400);
    let mut store = Store::open(&dir.path().join("state"), CAPS, start()).unwrap();
    let id = captured(&mut store, "CASE-STALL", &EXTERIOR[..2], 50, start());
    let mut uploader = uploader(&cloud, Arc::new(clock.clone())).unwrap().with_jitter(|| 0.5);
    // Held for a minute of real time; the request deadline is 0.4 s.
    standin.stall_next_requests(1, Duration::from_secs(60), Some("/api/upload"));
    let began = std::time::Instant::now();
    let drained =
        drain(&mut uploader, &mut store, Duration::from_secs(60), &mut |d| clock.advance(d), &mut |_| {});
    assert!(began.elapsed() < Duration::from_secs(20), "the stall was cut short by the deadline");
    assert_eq!(drained.completed, vec![id]);
    assert!(standin.requests().iter().any(|r| r.fault == Some(FaultKind::Stalled)));
    standin.stop();
}

#[test]
fn the_cloud_down_at_capture_time_then_up_buffered_then_delivered() {
    // A port nobody listens on, then the stand-in on that very port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let clock = ManualClock::starting_at(start());
    let dir = tempfile::tempdir().unwrap();
    let config = StandInConfig { port, ..StandInConfig::default() };
    let cloud = cloud(&format!("http://127.0.0.1:{port}"), &secret_file(dir.path(), &config));
    let mut store = Store::open(&dir.path().join("state"), CAPS, start()).unwrap();
    let id = captured(&mut store, "CASE-OFFLINE", &EXTERIOR, 100, start());
    let mut uploader = uploader(&cloud, Arc::new(clock.clone())).unwrap().with_jitter(|| 0.9);
    let mut waited = Vec::new();
    let drained = drain(
        &mut uploader,
        &mut store,
        Duration::from_secs(600),
        &mut |d| {
            waited.push(d);
            clock.advance(d)
        },
        &mut |_| {},
    );
    assert!(drained.completed.is_empty());
    let why = drained.stopped.expect("the pass stops with a reason");
    assert!(why.contains("network error") || why.contains("reach"), "{why}");
    // Backoff doubles with jitter and never passes 5 minutes.
    assert!(waited.len() >= 4, "{waited:?}");
    assert!(waited.windows(2).all(|w| w[1] >= w[0]), "{waited:?}");
    assert!(waited.iter().all(|w| *w <= Duration::from_secs(300)));
    let state = store.upload_state(id).unwrap();
    assert!(state.attempts >= 4);
    assert!(state.last_error.as_deref().unwrap_or("").contains("network error"), "{state:?}");
    let summary = store.inspection(id).unwrap().unwrap();
    assert!(matches!(summary.state, InspectionState::Captured | InspectionState::Uploading));
    assert_eq!(store.images(id).unwrap().len(), 8, "every image kept");

    let standin = StandIn::start(config, Arc::new(clock.clone())).unwrap();
    uploader.wake();
    let drained =
        drain(&mut uploader, &mut store, Duration::from_secs(600), &mut |d| clock.advance(d), &mut |_| {});
    assert_eq!(drained.completed, vec![id]);
    let sessions: Vec<_> = standin.sessions().into_iter().filter(|s| s.completed).collect();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].photos.len(), 8);
    standin.stop();
}

#[test]
fn a_bad_vin_fails_the_inspection_with_the_cloud_reason_and_no_retry_loop() {
    let mut bay = bay();
    let id = captured(&mut bay.store, "CASE-VIN", &EXTERIOR[..2], 50, start());
    // A row written by an older build that did not check the VIN: the cloud is the judge.
    let path = bay.store.path().to_owned();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("UPDATE inspections SET vehicle = '{\"vin\":\"TOO-SHORT\"}' WHERE id = ?1", [id.0]).unwrap();
    drop(conn);
    let (drained, waits, _) = bay.drain(Duration::from_secs(600));
    assert!(waits.is_empty(), "a 400 is not retried: {waits:?}");
    assert_eq!(drained.failed.len(), 1);
    let summary = bay.store.inspection(id).unwrap().unwrap();
    assert_eq!(summary.state, InspectionState::Failed);
    let reason = summary.reason.unwrap();
    assert!(reason.contains("400") && reason.contains("vehicle.vin"), "{reason}");
    assert_eq!(bay.standin.authenticate_calls(), 1);
    // Still failed, still buffered, still not retried on the next pass.
    let (again, _, _) = bay.drain(Duration::from_secs(600));
    assert!(again.failed.is_empty() && again.completed.is_empty());
    assert_eq!(bay.standin.authenticate_calls(), 1);
    assert_eq!(bay.store.images(id).unwrap().len(), 2, "nothing dropped");
}

#[test]
fn with_a_wrong_clock_nothing_is_signed_until_it_is_right() {
    let mut bay = bay();
    let id = captured(&mut bay.store, "CASE-CLOCK", &EXTERIOR[..2], 50, start());
    // The cloud's clock is ten minutes ahead of the kiosk's.
    bay.standin.set_clock_offset(600);
    let (drained, waits, _) = bay.drain(Duration::from_secs(100));
    assert!(drained.completed.is_empty());
    let why = drained.stopped.unwrap();
    assert!(why.contains("clock untrusted") && why.contains("behind"), "{why}");
    assert_eq!(waits, vec![Duration::from_secs(60)]);
    assert_eq!(bay.standin.authenticate_calls(), 0, "nothing signed with a wrong clock");
    let state = bay.store.upload_state(id).unwrap();
    assert!(state.last_error.unwrap().contains("clock untrusted"));
    assert!(!bay.uploader.link().clock.may_sign());
    // The verdict is noted beside the buffer, where `queue` shows it as an alert.
    let state_dir = bay.store.path().parent().unwrap().to_owned();
    let note = clock_note::read(&state_dir).expect("the verdict noted");
    assert_eq!((note.trusted, note.skew_secs), (false, -600));
    assert!(note.alert().unwrap().reason.contains("600 s behind"));

    bay.standin.set_clock_offset(0);
    let (drained, _, _) = bay.drain(Duration::from_secs(100));
    assert_eq!(drained.completed, vec![id]);
    bay.assert_delivered_once(id, "CASE-CLOCK");
    assert_eq!(clock_note::read(&state_dir).unwrap().alert(), None, "a clock set right clears it");
}

#[test]
fn a_session_left_by_a_crash_is_asked_about_not_guessed() {
    let mut bay = bay();
    let id = captured(&mut bay.store, "CASE-ASK", &EXTERIOR, 100, start());
    // Everything is stored, then the answer to complete is lost.
    bay.standin.hold_after_accepting_next(1, Duration::from_secs(60), "/api/complete");
    let config = StandInConfig::default();
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = cloud(&bay.standin.base_url(), &secret_file(dir.path(), &config));
    cloud.request_timeout = Duration::from_millis(500);
    let mut short = uploader(&cloud, Arc::new(bay.clock.clone())).unwrap().with_jitter(|| 0.5);
    let clock = bay.clock.clone();
    let first = drain(&mut short, &mut bay.store, Duration::ZERO, &mut |d| clock.advance(d), &mut |_| {});
    assert!(first.completed.is_empty(), "the answer was lost");
    assert_eq!(bay.completed_sessions("CASE-ASK").len(), 1, "but the cloud completed it");
    // A fresh uploader (as after a restart) asks the session and records the completion
    // without completing again or opening a new session.
    let (drained, _, _) = bay.drain(Duration::ZERO);
    assert_eq!(drained.completed, vec![id]);
    bay.assert_delivered_once(id, "CASE-ASK");
    assert_eq!(bay.standin.authenticate_calls(), 1);
}

/// The requests the stand-in saw after the first one that `fault` shaped, as `METHOD path`.
fn requests_after(standin: &StandIn, path: &str, fault: FaultKind) -> Vec<String> {
    let requests = standin.requests();
    let at = requests
        .iter()
        .position(|r| r.path == path && r.fault == Some(fault))
        .unwrap_or_else(|| panic!("no {path} shaped by {fault:?}: {requests:#?}"));
    requests[at + 1..].iter().map(|r| format!("{} {}", r.method, r.path)).collect()
}

#[test]
fn a_complete_whose_answer_was_reset_is_asked_about_never_sent_again() {
    let mut bay = bay();
    let id = captured(&mut bay.store, "CASE-LOST", &EXTERIOR, 100, start());
    // The cloud completes the session, then resets the connection instead of answering.
    bay.standin.drop_after_accepting_next(1, "/api/complete");
    let (drained, waits, _) = bay.drain(Duration::from_secs(60));
    assert_eq!(drained.completed, vec![id]);
    assert_eq!(waits, vec![Duration::from_millis(500)], "one jittered backoff after the lost answer");
    let session = bay.assert_delivered_once(id, "CASE-LOST");
    assert_eq!(
        bay.standin.completes_after_consumed(),
        0,
        "a second complete reached a consumed session: {:#?}",
        bay.standin.requests()
    );
    // The next request after the lost answer is the question, and nothing follows it.
    assert_eq!(
        requests_after(&bay.standin, "/api/complete", FaultKind::DroppedAfterAccepting),
        vec![format!("GET /v1/sessions/{}", session.session)]
    );
    assert_eq!(bay.standin.authenticate_calls(), 1, "no new session either");
}

#[test]
fn a_complete_whose_answer_never_came_before_the_deadline_is_asked_about_in_process() {
    let clock = ManualClock::starting_at(start());
    let config = StandInConfig::default();
    let standin = StandIn::start(config.clone(), Arc::new(clock.clone())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = cloud(&standin.base_url(), &secret_file(dir.path(), &config));
    cloud.request_timeout = Duration::from_millis(500);
    let mut store = Store::open(&dir.path().join("state"), CAPS, start()).unwrap();
    let id = captured(&mut store, "CASE-SLOW", &EXTERIOR[..3], 50, start());
    let mut uploader = uploader(&cloud, Arc::new(clock.clone())).unwrap().with_jitter(|| 0.5);
    // Completed, then held past the request deadline: the same uploader must ask, not re-send.
    standin.hold_after_accepting_next(1, Duration::from_secs(60), "/api/complete");
    let drained =
        drain(&mut uploader, &mut store, Duration::from_secs(60), &mut |d| clock.advance(d), &mut |_| {});
    assert_eq!(drained.completed, vec![id]);
    assert_eq!(standin.completes_after_consumed(), 0, "{:#?}", standin.requests());
    let done: Vec<_> = standin.sessions().into_iter().filter(|s| s.completed).collect();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].completions, 1);
    assert_eq!(
        requests_after(&standin, "/api/complete", FaultKind::HeldAfterAccepting),
        vec![format!("GET /v1/sessions/{}", done[0].session)]
    );
    assert_eq!(store.inspection(id).unwrap().unwrap().state, InspectionState::Completed);
    standin.stop();
}
