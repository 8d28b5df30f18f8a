//! Bay cameras that fail and come back, over real HTTP on 127.0.0.1 and a real SQLite buffer:
//! health transitions driven by an injected clock, inspections that skip or refuse offline
//! cameras, and the IP camera's failure modes and authentication.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Receiver;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capture_kiosk::capture::digest::Algorithm;
use capture_kiosk::capture::health::{CameraEvent, Policy, Status};
use capture_kiosk::capture::testcam::{Auth, Behaviour, SnapshotServer};
use capture_kiosk::capture::{render_scene, Camera, CaptureError, Credentials, HttpCamera, SyntheticCamera};
use capture_kiosk::clock::{Clock, ManualClock};
use capture_kiosk::imaging::{self, FrameError, ResizeSpec};
use capture_kiosk::inspection::{self, InspectionError, Outcome, Request, Rig, Settings};
use capture_kiosk::store::{Caps, Store};
use capture_kiosk::vehicle::{CaseId, PhotoLabel};

const SECOND: Duration = Duration::from_secs(1);

fn frame(seed: u64) -> Vec<u8> {
    imaging::encode(&render_scene(640, 480, PhotoLabel::Rear, seed), 90).unwrap()
}

fn settings() -> Settings {
    Settings { capture_attempts: 2, resize: ResizeSpec { max_long_edge: 320, jpeg_quality: 80 } }
}

fn clock() -> ManualClock {
    ManualClock::starting_at(UNIX_EPOCH + Duration::from_secs(1_795_000_000))
}

fn store(dir: &tempfile::TempDir) -> Mutex<Store> {
    Mutex::new(
        Store::open(dir.path(), Caps { max_bytes: 1 << 30, min_free_disk: 1 << 20 }, SystemTime::now())
            .unwrap(),
    )
}

fn ip_camera(id: &str, server: &SnapshotServer) -> HttpCamera {
    HttpCamera::new(id, &server.url(), Duration::from_millis(500), 8 << 20)
}

/// A synthetic front camera and an IP rear camera.
fn rig(server: &SnapshotServer, policy: Policy, refuse: bool) -> Rig {
    let front: Box<dyn Camera> = Box::new(SyntheticCamera::new("front", 640, 480));
    let rear: Box<dyn Camera> = Box::new(ip_camera("rear", server));
    Rig::from_cameras(vec![
        ("front".into(), vec![PhotoLabel::Front], front),
        ("rear".into(), vec![PhotoLabel::Rear], rear),
    ])
    .with_health(policy, refuse)
}

fn inspect(
    rig: &mut Rig,
    store: &Mutex<Store>,
    clock: &ManualClock,
    case: &str,
) -> Result<Outcome, InspectionError> {
    let request = Request {
        case_id: CaseId::parse(case).unwrap(),
        vehicle: None,
        angles: vec![PhotoLabel::Front, PhotoLabel::Rear],
    };
    inspection::run(rig, store, &request, &settings(), clock, &AtomicBool::new(false), &mut |_| {})
}

fn drain(events: &Receiver<CameraEvent>) -> Vec<CameraEvent> {
    events.try_iter().collect()
}

#[test]
fn a_camera_that_goes_down_is_reported_skipped_and_used_again_when_it_comes_back() {
    let server = SnapshotServer::start(frame(1)).unwrap();
    let policy = Policy { probe_interval: 10 * SECOND, bad_frames_to_offline: 3 };
    let mut rig = rig(&server, policy, false);
    let monitor = rig.monitor();
    let events = monitor.subscribe();
    let clock = clock();
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);

    rig.probe_due(clock.monotonic());
    let online = drain(&events);
    assert!(online.contains(&CameraEvent::Online { camera: "rear".into() }), "{online:?}");
    assert_eq!(server.requests(), 1, "one request per due probe");

    // Powered off: the next due probe finds it gone; probes before that do not run.
    server.set_behaviour(Behaviour::Off);
    clock.advance(5 * SECOND);
    assert!(rig.probe_due(clock.monotonic()).is_empty(), "not due yet");
    clock.advance(5 * SECOND);
    rig.probe_due(clock.monotonic());
    let gone = drain(&events);
    assert!(
        matches!(gone.as_slice(), [CameraEvent::Offline { camera, reason }] if camera == "rear" && reason.contains("unreachable")),
        "{gone:?}"
    );
    clock.advance(20 * SECOND);
    let snap = monitor.snapshot(clock.monotonic());
    let rear = snap.iter().find(|h| h.camera == "rear").unwrap();
    assert_eq!(
        (rear.status, rear.last_frame_age_s),
        (Status::Offline, Some(30)),
        "the last good probe was at 0 s"
    );
    assert!(rear.reason.as_deref().unwrap_or("").contains("unreachable"), "{rear:?}");

    // An inspection now captures the front and fails the rear with the reason, at once.
    let before = server.requests();
    let outcome = inspect(&mut rig, &store, &clock, "CASE-1").unwrap();
    assert_eq!(outcome.captured, vec![PhotoLabel::Front]);
    assert!(
        matches!(outcome.failed.as_slice(), [(PhotoLabel::Rear, reason)] if reason.contains("offline") && reason.contains("unreachable")),
        "{:?}",
        outcome.failed
    );
    assert_eq!(server.requests(), before, "an offline camera is not waited for");
    let stored = store.lock().unwrap().images(outcome.inspection_id).unwrap();
    assert_eq!(stored.len(), 1);

    // Back on: the next probe re-attaches it, without a restart, and the next inspection uses it.
    server.set_behaviour(Behaviour::Serve);
    clock.advance(10 * SECOND);
    rig.probe_due(clock.monotonic());
    assert_eq!(drain(&events), vec![CameraEvent::Online { camera: "rear".into() }]);
    let outcome = inspect(&mut rig, &store, &clock, "CASE-2").unwrap();
    assert_eq!(outcome.captured, vec![PhotoLabel::Front, PhotoLabel::Rear], "{:?}", outcome.failed);
    let stored = store.lock().unwrap().images(outcome.inspection_id).unwrap();
    assert!(stored.iter().any(|i| i.camera == "rear"), "{stored:?}");
    assert_eq!(monitor.snapshot(clock.monotonic())[1].last_frame_age_s, Some(0));
}

#[test]
fn with_the_switch_on_an_inspection_that_needs_an_offline_camera_is_refused_and_nothing_stored() {
    let server = SnapshotServer::start(frame(2)).unwrap();
    server.set_behaviour(Behaviour::Off);
    let mut rig = rig(&server, Policy::default(), true);
    let clock = clock();
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    rig.probe_due(clock.monotonic());
    match inspect(&mut rig, &store, &clock, "CASE-3") {
        Err(InspectionError::CameraOffline { camera, reason }) => {
            assert_eq!(camera, "rear");
            assert!(reason.contains("unreachable"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(store.lock().unwrap().list().unwrap().is_empty());
}

#[test]
fn repeated_bad_frames_take_a_camera_offline() {
    let server = SnapshotServer::start(frame(3)).unwrap();
    let policy = Policy { probe_interval: 10 * SECOND, bad_frames_to_offline: 3 };
    let mut rig = rig(&server, policy, false);
    let events = rig.monitor().subscribe();
    let clock = clock();
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    server.set_behaviour(Behaviour::Truncated);
    // Two attempts per angle: the first inspection leaves it online with two bad frames...
    let first = inspect(&mut rig, &store, &clock, "CASE-4").unwrap();
    assert!(first.failed[0].1.contains("cut short"), "{:?}", first.failed);
    assert!(drain(&events).iter().all(|e| !matches!(e, CameraEvent::Offline { .. })));
    // ...the third in a row takes it offline.
    inspect(&mut rig, &store, &clock, "CASE-5").unwrap();
    let gone = drain(&events);
    assert!(
        gone.iter().any(|e| matches!(e, CameraEvent::Offline { camera, reason } if camera == "rear" && reason.contains("3 bad frames"))),
        "{gone:?}"
    );
}

#[test]
fn a_hanging_camera_times_out_within_its_deadline() {
    let server = SnapshotServer::start(frame(4)).unwrap();
    server.set_behaviour(Behaviour::Hang);
    let mut cam = HttpCamera::new("rear", &server.url(), Duration::from_millis(300), 8 << 20);
    let t = Instant::now();
    let err = cam.capture(PhotoLabel::Rear).unwrap_err();
    assert!(t.elapsed() < 3 * SECOND, "took {:?}", t.elapsed());
    assert!(matches!(err, CaptureError::Unreachable { .. }) && err.to_string().contains("timeout"), "{err}");
    assert!(err.is_retryable());
    assert!(matches!(cam.probe(), Err(CaptureError::Unreachable { .. })));
    server.set_behaviour(Behaviour::Serve);
}

#[test]
fn garbage_and_cut_off_frames_are_refused_with_a_reason() {
    let server = SnapshotServer::start(frame(5)).unwrap();
    let mut cam = ip_camera("rear", &server);
    let spec = settings().resize;

    server.set_behaviour(Behaviour::Garbage);
    let body = cam.capture(PhotoLabel::Rear).unwrap();
    let err = imaging::process(&body, &spec).unwrap_err();
    assert!(matches!(err, FrameError::NotJpeg { .. }), "{err}");
    let probe = cam.probe().unwrap_err();
    assert!(probe.to_string().contains("not a JPEG"), "{probe}");

    server.set_behaviour(Behaviour::Truncated);
    let body = cam.capture(PhotoLabel::Rear).unwrap();
    let err = imaging::process(&body, &spec).unwrap_err();
    assert!(matches!(err, FrameError::Truncated { .. }), "{err}");
    assert!(err.is_retryable());

    server.set_behaviour(Behaviour::Serve);
    let body = cam.capture(PhotoLabel::Rear).unwrap();
    assert_eq!(imaging::process(&body, &spec).unwrap().source_width, 640);
}

#[test]
fn a_camera_that_wants_credentials_says_so_and_works_with_digest_or_basic() {
    let server = SnapshotServer::start(frame(6)).unwrap();
    let password = "Tr0ub4dor&3";
    for algorithm in [Algorithm::Md5, Algorithm::Sha256] {
        server.set_auth(Auth::Digest { user: "admin".into(), password: password.into(), algorithm });

        let err = ip_camera("rear", &server).capture(PhotoLabel::Rear).unwrap_err();
        assert!(err.to_string().contains("401") && err.to_string().contains("credentials_file"), "{err}");

        let wrong = Some(Credentials::new("admin", "wrong-password", "/etc/capture-kiosk/rear.cred"));
        let err = ip_camera("rear", &server).with_credentials(wrong).capture(PhotoLabel::Rear).unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains("refused the credentials") && shown.contains("rear.cred"), "{shown}");
        assert!(!shown.contains("wrong-password"), "{shown}");

        let good = Some(Credentials::new("admin", password, "test"));
        let mut cam = ip_camera("rear", &server).with_credentials(good);
        let before = server.requests();
        assert_eq!(cam.capture(PhotoLabel::Rear).unwrap(), frame(6), "{algorithm:?}");
        assert_eq!(server.requests() - before, 2, "one challenge, then the frame");
        let before = server.requests();
        cam.capture(PhotoLabel::Rear).unwrap();
        assert_eq!(server.requests() - before, 1, "the nonce is reused with the next nc");
        // An expired nonce costs one more round trip, not a failure.
        server.rotate_nonce();
        cam.capture(PhotoLabel::Rear).unwrap();
        cam.probe().unwrap();
    }

    server.set_auth(Auth::Basic { user: "op".into(), password: password.into() });
    let err = ip_camera("rear", &server).capture(PhotoLabel::Rear).unwrap_err();
    assert!(err.to_string().contains("credentials_file"), "{err}");
    let mut cam = ip_camera("rear", &server).with_credentials(Some(Credentials::new("op", password, "test")));
    assert_eq!(cam.capture(PhotoLabel::Rear).unwrap(), frame(6));
    let wrong = Some(Credentials::new("op", "nope", "test"));
    assert!(ip_camera("rear", &server).with_credentials(wrong).capture(PhotoLabel::Rear).is_err());
}

#[test]
fn an_unplugged_v4l2_camera_is_reported_offline_by_its_probe() {
    let text = r#"
bay_id = "bay-07"
state_dir = "/tmp/unused"
[inspection]
angles = ["Front"]
[[cameras]]
id = "usb-front"
source = "v4l2:/dev/video9"
angles = ["Front"]
resolution = "1920x1080"
format = "mjpeg"
keep_warm = true
"#;
    let config = capture_kiosk::config::parse(text, "test.toml").unwrap();
    let mut rig = Rig::open(&config).expect("the device thread starts without a device");
    let events = rig.monitor().subscribe();
    let probed = rig.probe_due(Duration::ZERO);
    assert!(
        matches!(probed.as_slice(), [(id, Err(CaptureError::NoDevice { .. }))] if id == "usb-front"),
        "{probed:?}"
    );
    match drain(&events).as_slice() {
        [CameraEvent::Offline { camera, reason }] => {
            assert_eq!(camera, "usb-front");
            assert!(reason.contains("/dev/video9") && reason.contains("plugged in"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}
