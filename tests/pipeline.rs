//! The capture pipeline end to end through the library: cameras -> validation -> resize ->
//! SQLite buffer, on real photos and real files, with cameras that misbehave.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capture_kiosk::capture::{Camera, CaptureError, DirectoryCamera, SyntheticCamera};
use capture_kiosk::clock::ManualClock;
use capture_kiosk::imaging::ResizeSpec;
use capture_kiosk::inspection::{self, InspectionError, Progress, Request, Rig, Settings};
use capture_kiosk::store::{Caps, InspectionState, Store};
use capture_kiosk::vehicle::{CaseId, PhotoLabel};
use sha2::Digest;

fn testdata() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata");
    assert!(dir.is_dir(), "the real photos are missing: expected them in {}", dir.display());
    dir
}

fn roomy() -> Caps {
    Caps { max_bytes: 1 << 30, min_free_disk: 1 << 20 }
}

fn settings(max_long_edge: u32) -> Settings {
    Settings { capture_attempts: 3, resize: ResizeSpec { max_long_edge, jpeg_quality: 85 } }
}

fn clock() -> ManualClock {
    ManualClock::starting_at(UNIX_EPOCH + Duration::from_secs(1_795_000_000))
}

fn request(case: &str, angles: &[PhotoLabel]) -> Request {
    Request { case_id: CaseId::parse(case).unwrap(), vehicle: None, angles: angles.to_vec() }
}

fn run(
    rig: &mut Rig,
    store: &Mutex<Store>,
    req: &Request,
    s: &Settings,
) -> (Result<inspection::Outcome, InspectionError>, Vec<Progress>) {
    let mut seen = Vec::new();
    let outcome =
        inspection::run(rig, store, req, s, &clock(), &AtomicBool::new(false), &mut |p| seen.push(p.clone()));
    (outcome, seen)
}

/// A camera that plays a script of frames, then repeats the last one.
struct Scripted {
    frames: Vec<Result<Vec<u8>, CaptureError>>,
    calls: usize,
}

impl Camera for Scripted {
    fn capture(&mut self, _angle: PhotoLabel) -> Result<Vec<u8>, CaptureError> {
        let i = self.calls.min(self.frames.len() - 1);
        self.calls += 1;
        self.frames[i].clone()
    }
}

fn boxed(c: impl Camera + 'static) -> Box<dyn Camera> {
    Box::new(c)
}

#[test]
fn real_car_photos_are_resized_stored_and_survive_a_reopen() {
    let photos = tempfile::tempdir().unwrap();
    let vehicles = testdata().join("vehicles");
    std::fs::copy(vehicles.join("canon_eos450d_red_car_12mp.jpg"), photos.path().join("Left.jpg")).unwrap();
    std::fs::copy(vehicles.join("canon_powershot_s40_car_rear_plate.jpg"), photos.path().join("rear.JPG"))
        .unwrap();
    let iphone = testdata().join("camera/apple_iphone4s_8mp_orient6.jpg");
    std::fs::copy(&iphone, photos.path().join("vin.jpeg")).unwrap();

    let state = tempfile::tempdir().unwrap();
    let store = Mutex::new(Store::open(state.path(), roomy(), SystemTime::now()).unwrap());
    let mut rig = Rig::from_cameras(vec![
        (
            "side".into(),
            vec![PhotoLabel::Left, PhotoLabel::Rear],
            boxed(DirectoryCamera::new("side", photos.path().into())),
        ),
        ("cabin".into(), vec![PhotoLabel::Vin], boxed(DirectoryCamera::new("cabin", photos.path().into()))),
    ]);
    let req = request("CASE-1", &[PhotoLabel::Left, PhotoLabel::Rear, PhotoLabel::Vin]);
    let (outcome, progress) = run(&mut rig, &store, &req, &settings(1024));
    let outcome = outcome.unwrap();
    assert_eq!(outcome.state, InspectionState::Captured, "{progress:?}");
    assert_eq!(outcome.captured.len(), 3, "{progress:?}");
    assert!(outcome.stored_bytes < outcome.source_bytes / 4, "resizing should shrink 12 MP photos a lot");
    drop(store);

    // Reopen: everything is still there, byte for byte.
    let store = Store::open(state.path(), roomy(), SystemTime::now()).unwrap();
    let images = store.images(outcome.inspection_id).unwrap();
    assert_eq!(images.len(), 3);
    for meta in &images {
        assert!(meta.width.max(meta.height) <= 1024, "{meta:?}");
        let jpeg = store.image_jpeg(outcome.inspection_id, meta.angle).unwrap().unwrap();
        assert_eq!(hex::encode(sha2::Sha256::digest(&jpeg)), meta.sha256);
        assert_eq!(jpeg.len() as u64, meta.bytes);
    }
    // The iPhone frame is stored landscape with EXIF orientation 6: it must come out portrait.
    let vin = images.iter().find(|m| m.angle == PhotoLabel::Vin).unwrap();
    assert!(vin.height > vin.width, "orientation not applied: {vin:?}");
    assert_eq!((vin.source_width, vin.source_height), (2448, 3264));
}

#[test]
fn a_bad_frame_is_captured_again_and_a_hopeless_angle_fails_while_the_others_carry_on() {
    let good = std::fs::read(testdata().join("orientation/Landscape_1.jpg")).unwrap();
    let truncated = good[..good.len() / 2].to_vec();
    let corrupt = std::fs::read(testdata().join("corrupt/its_bogus_marker_length.jpg")).unwrap();

    let state = tempfile::tempdir().unwrap();
    let store = Mutex::new(Store::open(state.path(), roomy(), SystemTime::now()).unwrap());
    let mut rig = Rig::from_cameras(vec![
        (
            "flaky".into(),
            vec![PhotoLabel::Front],
            boxed(Scripted { frames: vec![Ok(truncated.clone()), Ok(good.clone())], calls: 0 }),
        ),
        (
            "broken".into(),
            vec![PhotoLabel::Rear],
            boxed(Scripted { frames: vec![Ok(corrupt), Ok(truncated)], calls: 0 }),
        ),
        ("fine".into(), vec![PhotoLabel::Left], boxed(SyntheticCamera::new("fine", 640, 480))),
    ]);
    let req = request("CASE-2", &[PhotoLabel::Front, PhotoLabel::Rear, PhotoLabel::Left]);
    let (outcome, progress) = run(&mut rig, &store, &req, &settings(1920));
    let outcome = outcome.unwrap();

    assert_eq!(outcome.captured, vec![PhotoLabel::Front, PhotoLabel::Left], "{progress:?}");
    assert_eq!(outcome.failed.len(), 1);
    let (angle, reason) = &outcome.failed[0];
    assert_eq!(*angle, PhotoLabel::Rear);
    assert!(reason.contains("broken"), "the reason names the camera: {reason}");
    let retries_of_front =
        progress.iter().filter(|p| matches!(p, Progress::Retrying { angle: PhotoLabel::Front, .. })).count();
    assert_eq!(retries_of_front, 1, "one re-capture after the truncated frame: {progress:?}");
    let retries_of_rear =
        progress.iter().filter(|p| matches!(p, Progress::Retrying { angle: PhotoLabel::Rear, .. })).count();
    assert_eq!(retries_of_rear, 2, "capture_attempts = 3 means two re-captures: {progress:?}");

    // The failure and its reason are durable, and the inspection still counts as captured.
    let summary = store.lock().unwrap().inspection(outcome.inspection_id).unwrap().unwrap();
    assert_eq!(summary.state, InspectionState::Captured);
    assert_eq!(summary.images, 2);
    assert_eq!(summary.failed_angles.len(), 1);
    assert_eq!(summary.failed_angles[0].0, PhotoLabel::Rear);
}

#[test]
fn a_camera_that_is_gone_fails_its_angles_without_retrying_forever() {
    let state = tempfile::tempdir().unwrap();
    let store = Mutex::new(Store::open(state.path(), roomy(), SystemTime::now()).unwrap());
    let gone = CaptureError::NoDevice {
        camera: "usb".into(),
        device: "/dev/video9".into(),
        reason: "No such file or directory".into(),
    };
    let mut rig = Rig::from_cameras(vec![
        (
            "usb".into(),
            vec![PhotoLabel::Front, PhotoLabel::Rear],
            boxed(Scripted { frames: vec![Err(gone)], calls: 0 }),
        ),
        ("ok".into(), vec![PhotoLabel::Left], boxed(SyntheticCamera::new("ok", 320, 240))),
    ]);
    let req = request("CASE-3", &[PhotoLabel::Front, PhotoLabel::Rear, PhotoLabel::Left]);
    let (outcome, progress) = run(&mut rig, &store, &req, &settings(1920));
    let outcome = outcome.unwrap();
    assert_eq!(outcome.captured, vec![PhotoLabel::Left]);
    assert_eq!(outcome.failed.len(), 2);
    assert!(outcome.failed.iter().all(|(_, r)| r.contains("/dev/video9")), "{:?}", outcome.failed);
    assert!(
        !progress.iter().any(|p| matches!(p, Progress::Retrying { .. })),
        "a missing device is not retried: {progress:?}"
    );
}

#[test]
fn nothing_is_stored_when_every_angle_fails_and_the_inspection_says_why() {
    let state = tempfile::tempdir().unwrap();
    let store = Mutex::new(Store::open(state.path(), roomy(), SystemTime::now()).unwrap());
    let blank = {
        let img = image::RgbImage::from_pixel(640, 480, image::Rgb([128, 128, 128]));
        capture_kiosk::imaging::encode(&img, 90).unwrap()
    };
    let mut rig = Rig::from_cameras(vec![(
        "capped".into(),
        vec![PhotoLabel::Front],
        boxed(Scripted { frames: vec![Ok(blank)], calls: 0 }),
    )]);
    let (outcome, _) = run(&mut rig, &store, &request("CASE-4", &[PhotoLabel::Front]), &settings(1920));
    let outcome = outcome.unwrap();
    assert_eq!(outcome.state, InspectionState::Failed);
    let reason = &outcome.failed[0].1;
    assert!(reason.to_lowercase().contains("blank") || reason.to_lowercase().contains("colour"), "{reason}");
}

#[test]
fn requests_for_angles_no_camera_shoots_are_refused_before_anything_is_stored() {
    let state = tempfile::tempdir().unwrap();
    let store = Mutex::new(Store::open(state.path(), roomy(), SystemTime::now()).unwrap());
    let mut rig = Rig::from_cameras(vec![(
        "a".into(),
        vec![PhotoLabel::Front],
        boxed(SyntheticCamera::new("a", 320, 240)),
    )]);
    let (outcome, _) = run(
        &mut rig,
        &store,
        &request("CASE-5", &[PhotoLabel::Front, PhotoLabel::Undercarriage]),
        &settings(1920),
    );
    assert!(matches!(outcome, Err(InspectionError::NotCovered(PhotoLabel::Undercarriage))), "{outcome:?}");
    let (outcome, _) =
        run(&mut rig, &store, &request("CASE-5", &[PhotoLabel::Front, PhotoLabel::Front]), &settings(1920));
    assert!(matches!(outcome, Err(InspectionError::Duplicate(PhotoLabel::Front))), "{outcome:?}");
    assert_eq!(store.lock().unwrap().totals().unwrap().inspections, 0);
}

#[test]
fn a_full_buffer_refuses_the_next_inspection_and_keeps_what_it_holds() {
    let state = tempfile::tempdir().unwrap();
    // Room for about one small inspection: the estimate for a 256 px edge is ~15 KB an image.
    let caps = Caps { max_bytes: 40_000, min_free_disk: 1 << 20 };
    let store = Mutex::new(Store::open(state.path(), caps, SystemTime::now()).unwrap());
    let mut rig = Rig::from_cameras(vec![(
        "a".into(),
        vec![PhotoLabel::Front, PhotoLabel::Rear],
        boxed(SyntheticCamera::new("a", 640, 480)),
    )]);
    let small = settings(256);
    let (first, _) =
        run(&mut rig, &store, &request("CASE-6", &[PhotoLabel::Front, PhotoLabel::Rear]), &small);
    let first = first.unwrap();
    assert_eq!(first.captured.len(), 2);
    let before = store.lock().unwrap().totals().unwrap();

    let (second, progress) =
        run(&mut rig, &store, &request("CASE-7", &[PhotoLabel::Front, PhotoLabel::Rear]), &small);
    let err = second.expect_err("the buffer is full");
    let shown = err.to_string();
    assert!(shown.contains("max_bytes"), "the refusal names the cap: {shown}");
    assert!(progress.is_empty(), "no camera was driven: {progress:?}");
    assert_eq!(store.lock().unwrap().totals().unwrap(), before, "nothing buffered was touched");
}
