//! `capture-kiosk upload` SIGKILLed at the worst moments of an upload, then run again: the
//! inspection ends completed in exactly one session, with every image once, and no session is
//! completed twice. The stand-in holds the request at the chosen point so that the kill lands
//! there, not somewhere near it.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use capture_kiosk::clock::SystemClock;
use capture_kiosk::standin::{FaultKind, StandIn, StandInConfig};
use capture_kiosk::store::{InspectionId, InspectionState, Store};
use capture_kiosk::vehicle::PhotoLabel;
use support::{captured, cloud_toml, secret_file, CAPS};

struct Rig {
    standin: StandIn,
    config: PathBuf,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

fn rig() -> Rig {
    let standin = StandIn::start(StandInConfig::default(), Arc::new(SystemClock::new())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path(), standin.config());
    let state = dir.path().join("state");
    let config = dir.path().join("bay.toml");
    let text = format!(
        "bay_id = \"bay-kill\"\nstate_dir = \"{}\"\n\n[inspection]\nangles = [\"Front\"]\n\n\
         [[cameras]]\nid = \"front\"\nsource = \"synthetic:64x48\"\nangles = [\"Front\"]\n\n{}",
        state.display(),
        cloud_toml(&standin.base_url(), &secret)
    );
    std::fs::write(&config, text).unwrap();
    Rig { standin, config, state, _dir: dir }
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

impl Rig {
    fn buffer(&self, case_id: &str, labels: &[PhotoLabel], kib: usize) -> InspectionId {
        let mut store = Store::open(&self.state, CAPS, SystemTime::now()).unwrap();
        captured(&mut store, case_id, labels, kib, SystemTime::now())
    }

    /// Starts an upload, waits until the stand-in shows `fault` applied, and kills it there.
    fn kill_at(&self, fault: FaultKind) {
        let mut child = upload(&self.config);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.standin.requests().iter().any(|r| r.fault == Some(fault)) {
            if let Ok(Some(status)) = child.try_wait() {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "upload ended ({status}) before the fault applied: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(Instant::now() < deadline, "the fault {fault:?} never applied");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        self.standin.clear_faults();
    }

    /// Runs `upload` to the end; it must succeed.
    fn finish(&self) {
        let out = upload(&self.config).wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "the restarted upload failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Exactly one completed session holds every image once; none was completed twice.
    fn assert_delivered_once(&self, id: InspectionId, case_id: &str) -> String {
        let store = Store::open(&self.state, CAPS, SystemTime::now()).unwrap();
        assert_eq!(store.inspection(id).unwrap().unwrap().state, InspectionState::Completed);
        let sessions = self.standin.sessions();
        for s in &sessions {
            assert!(s.completions <= 1, "session {} completed {} times", s.session, s.completions);
        }
        let done: Vec<_> = sessions.iter().filter(|s| s.case_id == case_id && s.completed).collect();
        assert_eq!(done.len(), 1, "one completed session: {sessions:#?}");
        let images = store.images(id).unwrap();
        assert_eq!(done[0].photos.len(), images.len());
        for meta in &images {
            let photo = done[0].photo(meta.angle.as_str()).expect("every label arrived");
            assert_eq!(photo.sha256, meta.sha256);
            assert_eq!(photo.stores, 1, "{} stored once in the completed session", meta.angle);
        }
        assert_eq!(self.standin.secret_leaks(), 0);
        done[0].session.clone()
    }
}

#[test]
fn killed_after_authenticate_a_new_session_takes_everything() {
    let rig = rig();
    let id = rig.buffer("KILL-AUTH", &PhotoLabel::EXTERIOR, 100);
    rig.standin.stall_next_requests(1, Duration::from_secs(120), Some("/api/upload"));
    rig.kill_at(FaultKind::Stalled);
    assert_eq!(rig.standin.sessions().len(), 1, "the session was opened before the kill");
    rig.finish();
    let session = rig.assert_delivered_once(id, "KILL-AUTH");
    let first = rig.standin.sessions().into_iter().find(|s| s.session != session).unwrap();
    assert!(!first.completed, "the session left by the kill is never completed");
    rig.standin.stop();
}

#[test]
fn killed_mid_request_with_a_large_body_nothing_is_lost() {
    let rig = rig();
    // Fifteen ~1 MiB images: the body cannot fit in the socket buffers while it is held.
    let id = rig.buffer("KILL-MID", &PhotoLabel::ALL, 1024);
    rig.standin.stall_next_requests(1, Duration::from_secs(120), Some("/api/upload"));
    rig.kill_at(FaultKind::Stalled);
    rig.finish();
    rig.assert_delivered_once(id, "KILL-MID");
    rig.standin.stop();
}

#[test]
fn killed_after_the_cloud_stored_but_before_it_answered_the_session_is_completed_not_resent() {
    let rig = rig();
    let id = rig.buffer("KILL-STORED", &PhotoLabel::EXTERIOR, 100);
    rig.standin.hold_after_accepting_next(1, Duration::from_secs(120), "/api/upload");
    rig.kill_at(FaultKind::HeldAfterAccepting);
    rig.finish();
    rig.assert_delivered_once(id, "KILL-STORED");
    assert_eq!(rig.standin.authenticate_calls(), 1, "the stored session was asked about and completed");
    let uploads = rig.standin.requests().iter().filter(|r| r.path == "/api/upload").count();
    assert_eq!(uploads, 1, "no image was sent twice");
    rig.standin.stop();
}

#[test]
fn killed_before_complete_the_session_is_completed_once() {
    let rig = rig();
    let id = rig.buffer("KILL-COMPLETE", &PhotoLabel::EXTERIOR, 100);
    rig.standin.stall_next_requests(1, Duration::from_secs(120), Some("/api/complete"));
    rig.kill_at(FaultKind::Stalled);
    rig.finish();
    rig.assert_delivered_once(id, "KILL-COMPLETE");
    assert_eq!(rig.standin.authenticate_calls(), 1);
    rig.standin.stop();
}

#[test]
fn killed_after_complete_took_effect_the_completion_is_learnt_not_repeated() {
    let rig = rig();
    let id = rig.buffer("KILL-DONE", &PhotoLabel::EXTERIOR, 100);
    rig.standin.hold_after_accepting_next(1, Duration::from_secs(120), "/api/complete");
    rig.kill_at(FaultKind::HeldAfterAccepting);
    rig.finish();
    rig.assert_delivered_once(id, "KILL-DONE");
    let completes = rig.standin.requests().iter().filter(|r| r.path == "/api/complete").count();
    assert_eq!(completes, 1, "complete was not sent again");
    rig.standin.stop();
}

#[test]
fn upload_without_a_cloud_exits_buffered_with_the_images_safe() {
    let rig = rig();
    let id = rig.buffer("OFFLINE-1", &PhotoLabel::EXTERIOR[..2], 50);
    rig.standin.stop();
    let out = Command::new(env!("CARGO_BIN_EXE_capture-kiosk"))
        .args(["upload", "--config"])
        .arg(&rig.config)
        .args(["--max-wait", "2s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("buffered, will upload when online"), "{stdout}");
    let queue = Command::new(env!("CARGO_BIN_EXE_capture-kiosk"))
        .args(["queue", "--json", "--config"])
        .arg(&rig.config)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&queue.stdout).unwrap();
    let inspection = &json["inspections"][0];
    assert_eq!(inspection["id"], id.0);
    assert_eq!(inspection["images"], 2);
    assert!(inspection["upload"]["attempts"].as_u64().unwrap() >= 1);
    let error = inspection["upload"]["last_error"].as_str().unwrap();
    assert!(error.contains("network error"), "{error}");
    assert!(!String::from_utf8_lossy(&queue.stdout).contains(&StandInConfig::default().api_secret));
}

#[test]
fn inspect_captures_then_uploads_and_exits_zero_only_when_completed() {
    let rig = rig();
    let inspect = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_capture-kiosk"))
            .args(["inspect", "--case-id", "CASE-CLI", "--vin", "JN1CV6AR9BM123456", "--config"])
            .arg(&rig.config)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = inspect(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done: Vec<_> = rig.standin.sessions().into_iter().filter(|s| s.completed).collect();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].labels(), vec!["Front"]);

    let out = inspect(&["--no-upload"]);
    assert!(out.status.success());
    assert_eq!(rig.standin.sessions().len(), 1, "--no-upload sends nothing");

    rig.standin.stop();
    let out = inspect(&["--upload-wait", "1s"]);
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("buffered, will upload when online"));
    let store = Store::open(&rig.state, CAPS, SystemTime::now()).unwrap();
    let waiting: Vec<_> = store
        .list()
        .unwrap()
        .into_iter()
        .filter(|i| matches!(i.state, InspectionState::Captured | InspectionState::Uploading))
        .collect();
    assert_eq!(waiting.len(), 2, "the --no-upload one and the offline one stay buffered");
    assert!(waiting.iter().all(|i| i.images == 1));
}
