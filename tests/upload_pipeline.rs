//! Two sessions in flight: while one inspection's images travel, the next inspection's session
//! is opened on a second thread. The stand-in's records must show every image in its own
//! inspection's session, once, and every session completed once; a kill while the early
//! session is open but not yet written to the buffer must lose nothing and send nothing twice.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capture_kiosk::clock::{ManualClock, SystemClock};
use capture_kiosk::standin::{FaultKind, StandIn, StandInConfig};
use capture_kiosk::store::{InspectionId, InspectionState, Store};
use capture_kiosk::upload::drain::{drain, uploader};
use capture_kiosk::upload::Event;
use capture_kiosk::vehicle::PhotoLabel;
use support::{captured, cloud, cloud_toml, secret_file, CAPS};

const EXTERIOR: [PhotoLabel; 8] = PhotoLabel::EXTERIOR;

fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_000_000)
}

/// Waits (bounded) until the stand-in has answered `n` authentications.
fn until_authenticated(standin: &StandIn, n: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while standin.authenticate_calls() < n {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Every session the stand-in holds carries only images of its own inspection (by case id and
/// sha256), each stored once; each inspection has exactly one completed session holding all
/// of its images, completed once. Returns each case's completed session.
fn assert_no_image_in_the_wrong_session(
    standin: &StandIn,
    store: &Store,
    cases: &[(InspectionId, &str)],
) -> HashMap<String, String> {
    let mut expected: HashMap<&str, HashMap<String, String>> = HashMap::new();
    for (id, case) in cases {
        let images = store.images(*id).unwrap();
        expected
            .insert(case, images.iter().map(|m| (m.angle.as_str().to_owned(), m.sha256.clone())).collect());
    }
    let mut done = HashMap::new();
    for s in standin.sessions() {
        let own =
            expected.get(s.case_id.as_str()).unwrap_or_else(|| panic!("session of an unknown case: {s:#?}"));
        for p in &s.photos {
            assert_eq!(
                own.get(&p.label),
                Some(&p.sha256),
                "session {} of {} holds an image that is not its inspection's {}",
                s.session,
                s.case_id,
                p.label
            );
            assert_eq!(p.stores, 1, "{} stored twice in session {}", p.label, s.session);
        }
        assert!(s.completions <= 1, "session {} completed {} times", s.session, s.completions);
        if s.completed {
            assert_eq!(s.photos.len(), own.len(), "the completed session of {} holds every image", s.case_id);
            assert!(
                done.insert(s.case_id.clone(), s.session.clone()).is_none(),
                "{} completed twice",
                s.case_id
            );
        }
    }
    for (id, case) in cases {
        assert!(done.contains_key(*case), "{case} was never completed: {:#?}", standin.sessions());
        assert_eq!(store.inspection(*id).unwrap().unwrap().state, InspectionState::Completed);
    }
    assert_eq!(standin.completes_after_consumed(), 0);
    assert_eq!(standin.secret_leaks(), 0);
    done
}

#[test]
fn the_next_session_opens_while_images_travel_and_no_image_lands_in_the_wrong_session() {
    let clock = ManualClock::starting_at(start());
    let config = StandInConfig::default();
    let standin = StandIn::start(config.clone(), Arc::new(clock.clone())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = cloud(&standin.base_url(), &secret_file(dir.path(), &config));
    // 1 MiB requests: each inspection takes several, so images of two sessions are on the way
    // while both sessions are open.
    cloud.max_request_bytes = 1 << 20;
    let mut store = Store::open(&dir.path().join("state"), CAPS, start()).unwrap();
    let cases = [
        (captured(&mut store, "PIPE-1", &EXTERIOR, 300, start()), "PIPE-1"),
        (captured(&mut store, "PIPE-2", &EXTERIOR[..5], 200, start()), "PIPE-2"),
        (captured(&mut store, "PIPE-3", &EXTERIOR, 250, start()), "PIPE-3"),
    ];
    let mut up = uploader(&cloud, Arc::new(clock.clone())).unwrap().with_jitter(|| 0.5);
    let mut most_open = 0;
    let mut opened_early = 0;
    let mut first_sent_of = HashMap::new();
    let drained = drain(&mut up, &mut store, Duration::ZERO, &mut |d| clock.advance(d), &mut |e| {
        if let Event::Sent { id, .. } = e {
            if first_sent_of.insert(*id, ()).is_none() {
                // The first confirmed request of inspection n: the session of n + 1 is being
                // opened on the second thread (the last inspection has none behind it).
                let n = cases.iter().position(|(c, _)| c == id).unwrap();
                if n + 1 < cases.len() && until_authenticated(&standin, n + 2, Duration::from_secs(10)) {
                    opened_early += 1;
                }
            }
            let open = standin.sessions().iter().filter(|s| !s.completed).count();
            most_open = most_open.max(open);
        }
    });
    assert_eq!(drained.completed, cases.iter().map(|(id, _)| *id).collect::<Vec<_>>(), "oldest first");
    assert_eq!(opened_early, 2, "each next session was opened before the current one completed");
    assert_eq!(most_open, 2, "at most two sessions in flight");
    let done = assert_no_image_in_the_wrong_session(&standin, &store, &cases);
    assert_eq!(standin.sessions().len(), 3, "no session was wasted");
    // The authentication of PIPE-2 reached the cloud before PIPE-1 was completed.
    let paths: Vec<String> = standin.requests().iter().map(|r| r.path.clone()).collect();
    let second_auth = paths.iter().enumerate().filter(|(_, p)| *p == "/api/authenticate").nth(1).unwrap().0;
    let first_complete = paths.iter().position(|p| p == "/api/complete").unwrap();
    assert!(second_auth < first_complete, "{paths:?}");
    // Each inspection's buffer names the session the cloud completed for it.
    for (id, case) in &cases {
        assert_eq!(store.upload_state(*id).unwrap().session.as_deref(), Some(done[*case].as_str()));
    }
    standin.stop();
}

#[test]
fn the_next_inspections_images_travel_while_the_answer_to_the_previous_is_outstanding() {
    // Each inspection is one request. The first one is stored by the cloud, but its answer is
    // held for 4 s and then lost. The second inspection's images must reach the cloud while
    // that answer is still outstanding (the link does not wait on round trips), and the lost
    // answer must still end with every image stored once and every session completed once.
    let clock = ManualClock::starting_at(start());
    let config = StandInConfig::default();
    let standin = Arc::new(StandIn::start(config.clone(), Arc::new(clock.clone())).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let cloud = cloud(&standin.base_url(), &secret_file(dir.path(), &config));
    let mut store = Store::open(&dir.path().join("state"), CAPS, start()).unwrap();
    let cases = [
        (captured(&mut store, "OVER-1", &EXTERIOR, 200, start()), "OVER-1"),
        (captured(&mut store, "OVER-2", &EXTERIOR, 200, start()), "OVER-2"),
        (captured(&mut store, "OVER-3", &EXTERIOR, 200, start()), "OVER-3"),
    ];
    let hold = Duration::from_secs(4);
    standin.hold_after_accepting_next(1, hold, "/api/upload");
    let watcher = {
        let standin = standin.clone();
        std::thread::spawn(move || {
            // The hold is recorded as it begins; the second inspection's images must be in
            // before it ends (a margin of half a second is left for the watcher's own lag).
            let deadline = Instant::now() + Duration::from_secs(60);
            let (mut held_since, mut second_in, mut most_open) = (None::<Instant>, false, 0);
            loop {
                let sessions = standin.sessions();
                most_open = most_open.max(sessions.iter().filter(|s| !s.completed).count());
                if held_since.is_none()
                    && standin.requests().iter().any(|r| r.fault == Some(FaultKind::HeldAfterAccepting))
                {
                    held_since = Some(Instant::now());
                }
                second_in |= held_since.is_some()
                    && sessions.iter().any(|s| s.case_id == "OVER-2" && s.photos.len() == EXTERIOR.len());
                let hold_over = held_since.is_some_and(|t| t.elapsed() > hold - Duration::from_millis(500));
                if second_in || hold_over || Instant::now() > deadline {
                    return (held_since.is_some(), second_in, most_open);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut up = uploader(&cloud, Arc::new(clock.clone())).unwrap().with_jitter(|| 0.5);
    let mut most_open_after = 0;
    let drained =
        drain(&mut up, &mut store, Duration::from_secs(600), &mut |d| clock.advance(d), &mut |_| {
            most_open_after = most_open_after.max(standin.sessions().iter().filter(|s| !s.completed).count());
        });
    let (held, second_in, most_open) = watcher.join().unwrap();
    assert!(held, "the first upload's answer was never held: {:#?}", standin.requests());
    assert!(second_in, "the second inspection's images waited for the first one's answer");
    assert!(most_open.max(most_open_after) <= 2, "at most two sessions in flight: {:#?}", standin.sessions());
    let mut completed = drained.completed.clone();
    completed.sort();
    assert_eq!(completed, cases.iter().map(|(id, _)| *id).collect::<Vec<_>>());
    assert_no_image_in_the_wrong_session(&standin, &store, &cases);
    assert_eq!(standin.sessions().len(), 3, "the lost answer cost no session: {:#?}", standin.sessions());
    let completes = standin.requests().iter().filter(|r| r.path == "/api/complete").count();
    assert_eq!(completes, 3, "one complete per inspection");
    standin.stop();
}

#[test]
fn a_long_wait_while_a_session_is_open_early_mixes_nothing_and_wastes_no_image() {
    // The first inspection waits out a 15-minute Retry-After while the second one's session is
    // opened early: the first one's tokens age, and so may the early session (whether it was
    // opened before or after the wait depends on the thread). Either way nothing is mixed, each
    // is completed once, and a session left behind holds no image.
    let clock = ManualClock::starting_at(start());
    let config = StandInConfig::default();
    let standin = StandIn::start(config.clone(), Arc::new(clock.clone())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cloud = cloud(&standin.base_url(), &secret_file(dir.path(), &config));
    let mut store = Store::open(&dir.path().join("state"), CAPS, start()).unwrap();
    let cases = [
        (captured(&mut store, "AGE-1", &EXTERIOR[..3], 100, start()), "AGE-1"),
        (captured(&mut store, "AGE-2", &EXTERIOR[..3], 100, start()), "AGE-2"),
    ];
    standin.fail_next_uploads(1, 503, Duration::from_secs(900));
    let mut up = uploader(&cloud, Arc::new(clock.clone())).unwrap().with_jitter(|| 0.5);
    let drained =
        drain(&mut up, &mut store, Duration::from_secs(3600), &mut |d| clock.advance(d), &mut |_| {});
    // AGE-2's only request was on its way when AGE-1's answer said to wait: it is not held
    // back by AGE-1's wait, so it may complete first.
    let mut completed = drained.completed.clone();
    completed.sort();
    assert_eq!(completed, vec![cases[0].0, cases[1].0]);
    assert_no_image_in_the_wrong_session(&standin, &store, &cases);
    let unused: Vec<_> = standin.sessions().into_iter().filter(|s| !s.completed).collect();
    assert!(unused.iter().any(|s| s.case_id == "AGE-1"), "the first session of AGE-1 aged: {unused:#?}");
    assert!(unused.len() <= 2, "{unused:#?}");
    assert!(unused.iter().all(|s| s.photos.is_empty()), "{unused:#?}");
    standin.stop();
}

fn upload(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_capture-kiosk"))
        .args(["upload", "--config"])
        .arg(config)
        .args(["--max-wait", "20s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn kill_rig(standin: &StandIn, dir: &Path) -> (PathBuf, PathBuf) {
    let secret = secret_file(dir, standin.config());
    let state = dir.join("state");
    let config = dir.join("bay.toml");
    let text = format!(
        "bay_id = \"bay-pipe\"\nstate_dir = \"{}\"\n\n[inspection]\nangles = [\"Front\"]\n\n\
         [[cameras]]\nid = \"front\"\nsource = \"synthetic:64x48\"\nangles = [\"Front\"]\n\n{}",
        state.display(),
        cloud_toml(&standin.base_url(), &secret)
    );
    std::fs::write(&config, text).unwrap();
    (config, state)
}

#[test]
fn killed_while_the_next_session_is_open_but_not_yet_buffered_nothing_is_lost_or_sent_twice() {
    let standin = StandIn::start(StandInConfig::default(), Arc::new(SystemClock::new())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config, state) = kill_rig(&standin, dir.path());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("max_request_bytes = \"1 MiB\"\n");
    std::fs::write(&config, text).unwrap();
    let cases = {
        let mut store = Store::open(&state, CAPS, SystemTime::now()).unwrap();
        [
            (captured(&mut store, "KILL-P1", &EXTERIOR, 300, SystemTime::now()), "KILL-P1"),
            (captured(&mut store, "KILL-P2", &EXTERIOR, 300, SystemTime::now()), "KILL-P2"),
        ]
    };
    // The first upload (of three: 1 MiB requests) is held; meanwhile the second session is
    // opened early. Kill there.
    standin.stall_next_requests(1, Duration::from_secs(120), Some("/api/upload"));
    let mut child = upload(&config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(standin.requests().iter().any(|r| r.fault == Some(FaultKind::Stalled))
        && standin.authenticate_calls() >= 2)
    {
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!("upload ended ({status}) too early: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(Instant::now() < deadline, "the early session was never opened: {:#?}", standin.requests());
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    standin.clear_faults();
    {
        let store = Store::open(&state, CAPS, SystemTime::now()).unwrap();
        assert_eq!(
            store.upload_state(cases[1].0).unwrap().session,
            None,
            "the early session is not buffered yet"
        );
    }
    let early = standin.sessions().into_iter().find(|s| s.case_id == "KILL-P2").unwrap().session;

    let out = upload(&config).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let store = Store::open(&state, CAPS, SystemTime::now()).unwrap();
    let done = assert_no_image_in_the_wrong_session(&standin, &store, &cases);
    assert_ne!(done["KILL-P2"], early, "the session nobody named is never used");
    let orphan = standin.session(&early).unwrap();
    assert!(!orphan.completed && orphan.photos.is_empty() && orphan.upload_requests == 0, "{orphan:#?}");
    standin.stop();
}

#[test]
fn killed_while_a_complete_is_on_its_way_and_the_next_inspection_uploads_nothing_is_completed_twice() {
    let standin = StandIn::start(StandInConfig::default(), Arc::new(SystemClock::new())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config, state) = kill_rig(&standin, dir.path());
    let cases = {
        let mut store = Store::open(&state, CAPS, SystemTime::now()).unwrap();
        [
            (captured(&mut store, "KILL-C1", &EXTERIOR, 100, SystemTime::now()), "KILL-C1"),
            (captured(&mut store, "KILL-C2", &EXTERIOR, 100, SystemTime::now()), "KILL-C2"),
        ]
    };
    // The first complete takes effect and its answer is held; the second inspection's images
    // go meanwhile. Kill once they have.
    standin.hold_after_accepting_next(1, Duration::from_secs(120), "/api/complete");
    let mut child = upload(&config);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let requests = standin.requests();
        let held = requests.iter().any(|r| r.fault == Some(FaultKind::HeldAfterAccepting));
        let second_sent = standin.sessions().iter().any(|s| s.case_id == "KILL-C2" && !s.photos.is_empty());
        if held && second_sent {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!("upload ended ({status}) too early: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(
            Instant::now() < deadline,
            "the second inspection never went while the first completed: {requests:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    standin.clear_faults();

    let out = upload(&config).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let store = Store::open(&state, CAPS, SystemTime::now()).unwrap();
    assert_no_image_in_the_wrong_session(&standin, &store, &cases);
    let completes = standin.requests().iter().filter(|r| r.path == "/api/complete").count();
    assert_eq!(completes, 2, "one complete per inspection, the held one never sent again");
    standin.stop();
}
