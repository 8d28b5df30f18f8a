//! The buffer against what the field does to it: close and reopen, full caps, a full disk,
//! SIGKILL mid-write, a damaged file, a file from a newer release, a locked file. Real SQLite
//! files in temp dirs throughout.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capture_kiosk::store::{
    Caps, ImageMeta, InspectionId, InspectionState, InspectionSummary, NewImage, NewInspection, Recovery,
    Refusal, Store, StoreError, Totals,
};
use capture_kiosk::vehicle::{CaseId, PhotoLabel, Vehicle, Vin};
use sha2::{Digest, Sha256};

const ROOMY: Caps = Caps { max_bytes: 1 << 40, min_free_disk: 0 };

/// A fixed wall clock: `at(s)` is `s` seconds into the test's day.
fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

fn case(value: &str) -> CaseId {
    CaseId::parse(value).unwrap()
}

/// Bytes that look like a JPEG (SOI ... EOI) with `len` bytes of noise from `seed`.
fn jpeg(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut bytes = vec![0xFF, 0xD8];
    bytes.extend((0..len.saturating_sub(4)).map(|_| rng.u8(..)));
    bytes.extend([0xFF, 0xD9]);
    bytes
}

fn image<'a>(angle: PhotoLabel, jpeg: &'a [u8], captured_at: SystemTime) -> NewImage<'a> {
    NewImage {
        angle,
        camera: "cam-front",
        captured_at,
        source_width: 4000,
        source_height: 3000,
        source_bytes: 5_000_000,
        width: 1600,
        height: 1200,
        jpeg,
    }
}

fn begin(store: &mut Store, case_id: &str, angles: &[PhotoLabel], now: SystemTime) -> InspectionId {
    let case_id = case(case_id);
    store
        .begin_inspection(
            &NewInspection { case_id: &case_id, vehicle: None, angles, expected_image_bytes: 1000 },
            now,
        )
        .unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The totals as they must follow from `list()`.
fn totals_of(list: &[InspectionSummary]) -> Totals {
    Totals {
        inspections: list.len() as u64,
        images: list.iter().map(|i| i.images).sum(),
        bytes: list.iter().map(|i| i.bytes).sum(),
        awaiting_upload: list
            .iter()
            .filter(|i| matches!(i.state, InspectionState::Captured | InspectionState::Uploading))
            .count() as u64,
        oldest_created_at: list.iter().map(|i| i.created_at).min(),
    }
}

fn snapshot(store: &Store) -> (Vec<InspectionSummary>, Totals) {
    (store.list().unwrap(), store.totals().unwrap())
}

fn corrupt_copies(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".corrupt-"))
        .collect();
    found.sort();
    found
}

#[test]
fn an_inspection_survives_close_and_reopen_with_every_field_intact() {
    let temp = tempfile::tempdir().unwrap();
    let state_dir = temp.path().join("not").join("yet");
    let vehicle = Vehicle {
        year: Some(2011),
        make: Some("Infiniti".into()),
        ..Vehicle::with_vin(Vin::parse("JN1CV6AR9BM123456").unwrap())
    };
    let angles = [PhotoLabel::Front, PhotoLabel::RearLeft, PhotoLabel::Vin];
    let front = jpeg(1, 30_000);
    let rear_left = jpeg(2, 12_345);
    let case_id = case("CASE-12345");

    let id = {
        let mut store = Store::open(&state_dir, ROOMY, at(0)).unwrap();
        assert_eq!(store.path(), state_dir.join("buffer.sqlite3"));
        let id = store
            .begin_inspection(
                &NewInspection {
                    case_id: &case_id,
                    vehicle: Some(&vehicle),
                    angles: &angles,
                    expected_image_bytes: 1,
                },
                at(1),
            )
            .unwrap();
        store.add_image(id, &image(PhotoLabel::Front, &front, at(2))).unwrap();
        let rear = NewImage {
            camera: "cam-rear",
            source_width: 640,
            height: 480,
            ..image(PhotoLabel::RearLeft, &rear_left, at(3))
        };
        store.add_image(id, &rear).unwrap();
        store.record_angle_failure(id, PhotoLabel::Vin, "camera cam-vin gave no frame", at(4)).unwrap();
        assert_eq!(store.finish_capture(id, at(5)).unwrap(), InspectionState::Captured);
        id
    };

    let store = Store::open(&state_dir, ROOMY, at(10)).unwrap();
    assert_eq!(store.recovery(), &Recovery::default(), "a clean close needs no recovery");
    let summary = store.inspection(id).unwrap().expect("the inspection is still there");
    assert_eq!(
        summary,
        InspectionSummary {
            id,
            case_id: "CASE-12345".into(),
            state: InspectionState::Captured,
            reason: None,
            angles: angles.to_vec(),
            images: 2,
            bytes: (front.len() + rear_left.len()) as u64,
            failed_angles: vec![(PhotoLabel::Vin, "camera cam-vin gave no frame".into())],
            created_at: at(1),
            updated_at: at(5),
        }
    );
    assert_eq!(store.list().unwrap(), vec![summary]);
    assert_eq!(store.vehicle(id).unwrap(), Some(vehicle));
    let meta = |angle, camera: &str, sw, h, bytes: &[u8], t| ImageMeta {
        angle,
        camera: camera.into(),
        captured_at: t,
        source_width: sw,
        source_height: 3000,
        source_bytes: 5_000_000,
        width: 1600,
        height: h,
        bytes: bytes.len() as u64,
        sha256: sha256(bytes),
    };
    assert_eq!(
        store.images(id).unwrap(),
        vec![
            meta(PhotoLabel::Front, "cam-front", 4000, 1200, &front, at(2)),
            meta(PhotoLabel::RearLeft, "cam-rear", 640, 480, &rear_left, at(3)),
        ]
    );
    assert_eq!(store.image_jpeg(id, PhotoLabel::Front).unwrap().as_deref(), Some(&front[..]));
    assert_eq!(store.image_jpeg(id, PhotoLabel::RearLeft).unwrap().as_deref(), Some(&rear_left[..]));
    assert_eq!(store.image_jpeg(id, PhotoLabel::Vin).unwrap(), None);
    assert_eq!(
        store.totals().unwrap(),
        Totals {
            inspections: 1,
            images: 2,
            bytes: (front.len() + rear_left.len()) as u64,
            awaiting_upload: 1,
            oldest_created_at: Some(at(1)),
        }
    );
    assert_eq!(store.check_integrity().unwrap(), Vec::<String>::new());
}

#[test]
fn an_interrupted_capture_is_closed_at_open_as_evidence_with_its_images_kept() {
    let dir = tempfile::tempdir().unwrap();
    let angles = [PhotoLabel::Front, PhotoLabel::Rear, PhotoLabel::Left];
    let (front, rear) = (jpeg(3, 2000), jpeg(4, 3000));
    let (done, cut, empty) = {
        let mut store = Store::open(dir.path(), ROOMY, at(0)).unwrap();
        let done = begin(&mut store, "CASE-1", &angles, at(1));
        store.add_image(done, &image(PhotoLabel::Front, &front, at(1))).unwrap();
        store.finish_capture(done, at(2)).unwrap();
        let cut = begin(&mut store, "CASE-2", &angles, at(3));
        store.add_image(cut, &image(PhotoLabel::Front, &front, at(4))).unwrap();
        store.record_angle_failure(cut, PhotoLabel::Left, "camera cam-left gave no frame", at(4)).unwrap();
        store.add_image(cut, &image(PhotoLabel::Rear, &rear, at(5))).unwrap();
        let empty = begin(&mut store, "CASE-3", &angles, at(6));
        (done, cut, empty)
        // Dropped without finishing: as if the process died mid-capture.
    };

    let store = Store::open(dir.path(), ROOMY, at(100)).unwrap();
    assert_eq!(store.recovery().interrupted, vec![cut, empty]);
    let closed = store.inspection(cut).unwrap().unwrap();
    assert_eq!(closed.state, InspectionState::Captured, "what it holds goes to the cloud");
    assert_eq!(closed.reason, None);
    assert_eq!(closed.updated_at, at(100));
    assert_eq!(closed.images, 2);
    assert_eq!(
        closed.failed_angles,
        vec![(PhotoLabel::Left, "camera cam-left gave no frame".to_owned())],
        "a failure recorded before the stop keeps its reason"
    );
    assert_eq!(store.image_jpeg(cut, PhotoLabel::Rear).unwrap().as_deref(), Some(&rear[..]));
    let nothing = store.inspection(empty).unwrap().unwrap();
    assert_eq!(nothing.state, InspectionState::Failed);
    assert_eq!(
        nothing.failed_angles,
        angles.iter().map(|a| (*a, "the kiosk stopped during capture".to_owned())).collect::<Vec<_>>()
    );
    assert!(nothing
        .reason
        .as_deref()
        .unwrap()
        .starts_with("no angle was captured (Front: the kiosk stopped during capture;"));
    assert_eq!(
        store.inspection(done).unwrap().unwrap().state,
        InspectionState::Captured,
        "finished ones are left alone"
    );
    assert_eq!(store.next_to_upload().unwrap().map(|i| i.id), Some(done));
    drop(store);
    let again = Store::open(dir.path(), ROOMY, at(200)).unwrap();
    assert!(again.recovery().interrupted.is_empty(), "recovery happens once");
}

#[test]
fn a_second_process_opening_the_buffer_leaves_live_captures_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Store::open(dir.path(), ROOMY, at(0)).unwrap();
    let id = begin(&mut daemon, "CASE-1", &[PhotoLabel::Front, PhotoLabel::Rear], at(1));

    let cli = Store::open(dir.path(), ROOMY, at(2)).unwrap();
    assert!(cli.recovery().shared);
    assert!(cli.recovery().interrupted.is_empty());
    assert_eq!(cli.inspection(id).unwrap().unwrap().state, InspectionState::Capturing);

    let front = jpeg(5, 1000);
    daemon.add_image(id, &image(PhotoLabel::Front, &front, at(3))).unwrap();
    assert_eq!(cli.inspection(id).unwrap().unwrap().images, 1, "the reader sees the daemon's commits");
    drop(cli);
    assert_eq!(daemon.finish_capture(id, at(4)).unwrap(), InspectionState::Captured);
}

#[test]
fn a_second_image_of_the_same_angle_is_refused_and_the_first_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), ROOMY, at(0)).unwrap();
    let id = begin(&mut store, "CASE-1", &[PhotoLabel::Front, PhotoLabel::Rear], at(1));
    let (first, second) = (jpeg(6, 1000), jpeg(7, 1000));
    store.add_image(id, &image(PhotoLabel::Front, &first, at(2))).unwrap();

    let err = store.add_image(id, &image(PhotoLabel::Front, &second, at(3))).unwrap_err();
    assert!(matches!(err, StoreError::AngleAlreadyStored { angle: PhotoLabel::Front, .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("inspection {id} already holds an image of angle Front; the stored image is kept")
    );
    assert_eq!(store.image_jpeg(id, PhotoLabel::Front).unwrap().as_deref(), Some(&first[..]));

    let err = store.add_image(id, &image(PhotoLabel::Roof, &second, at(3))).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("inspection {id} did not request angle Roof (it requested Front, Rear)")
    );
    let err = store.record_angle_failure(id, PhotoLabel::Front, "too late", at(4)).unwrap_err();
    assert!(matches!(err, StoreError::AngleAlreadyStored { .. }), "a captured angle cannot fail: {err:?}");
    assert_eq!(store.inspection(id).unwrap().unwrap().images, 1);
    assert!(store.inspection(id).unwrap().unwrap().failed_angles.is_empty());
}

#[test]
fn a_small_max_bytes_refuses_the_next_inspection_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let caps = Caps { max_bytes: 10_000, min_free_disk: 0 };
    let mut store = Store::open(dir.path(), caps, at(0)).unwrap();
    let first = begin(&mut store, "CASE-1", &[PhotoLabel::Front], at(1));
    store.add_image(first, &image(PhotoLabel::Front, &jpeg(8, 6000), at(1))).unwrap();
    store.finish_capture(first, at(2)).unwrap();
    let before = snapshot(&store);

    let case_id = case("CASE-2");
    let angles = [PhotoLabel::Front, PhotoLabel::Rear];
    let new = NewInspection { case_id: &case_id, vehicle: None, angles: &angles, expected_image_bytes: 3000 };
    let err = store.begin_inspection(&new, at(3)).unwrap_err();
    match &err {
        StoreError::Full {
            refusal: Refusal::MaxBytes { buffered: 6000, needed: 6000, max_bytes: 10_000 },
            ..
        } => {}
        other => panic!("expected a max_bytes refusal, got {other:?}"),
    }
    assert!(err.is_retryable());
    let shown = err.to_string();
    for part in [
        store.path().to_str().unwrap(),
        "a new inspection for case CASE-2",
        "6000 bytes (5.9 KiB) are buffered",
        "max_bytes = 10000 bytes",
        "upload or remove buffered inspections, or raise [buffer] max_bytes",
    ] {
        assert!(shown.contains(part), "{shown:?} should contain {part:?}");
    }
    assert_eq!(snapshot(&store), before, "nothing buffered was touched");
    assert_eq!(
        store.would_refuse(2, 3000).unwrap().map(|r| matches!(r, Refusal::MaxBytes { .. })),
        Some(true)
    );

    // What fits is still accepted, and gets the next id.
    let small = NewInspection { expected_image_bytes: 2000, ..new };
    assert_eq!(store.begin_inspection(&small, at(4)).unwrap(), InspectionId(first.0 + 1));
    assert_eq!(store.would_refuse(1, 0).unwrap(), None);
}

#[test]
fn a_min_free_disk_larger_than_any_disk_refuses_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), ROOMY, at(0)).unwrap();
    let id = begin(&mut store, "CASE-1", &[PhotoLabel::Front, PhotoLabel::Rear], at(1));
    store.add_image(id, &image(PhotoLabel::Front, &jpeg(9, 1000), at(1))).unwrap();
    let before = snapshot(&store);

    store.set_caps(Caps { max_bytes: 1 << 40, min_free_disk: 1 << 60 });
    let case_id = case("CASE-2");
    let err = store
        .begin_inspection(
            &NewInspection {
                case_id: &case_id,
                vehicle: None,
                angles: &[PhotoLabel::Front],
                expected_image_bytes: 1,
            },
            at(2),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Full {
                refusal: Refusal::MinFreeDisk { min_free_disk: 1_152_921_504_606_846_976, .. },
                ..
            }
        ),
        "{err:?}"
    );
    let shown = err.to_string();
    assert!(shown.contains("min_free_disk = 1152921504606846976 bytes (1.0 EiB)"), "{shown}");
    assert!(shown.contains("upload or remove buffered inspections"), "{shown}");

    // The image of an inspection already accepted is refused the same way: that angle fails.
    let err = store.add_image(id, &image(PhotoLabel::Rear, &jpeg(10, 1000), at(3))).unwrap_err();
    assert!(
        matches!(err, StoreError::Full { refusal: Refusal::MinFreeDisk { needed: 1000, .. }, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&format!("refuses image Rear of inspection {id}")), "{err}");
    assert_eq!(snapshot(&store), before, "nothing buffered was touched");
    store.record_angle_failure(id, PhotoLabel::Rear, &format!("not stored: {err}"), at(3)).unwrap();
    assert_eq!(store.finish_capture(id, at(4)).unwrap(), InspectionState::Captured);
}

#[test]
fn a_full_disk_during_add_image_fails_that_image_and_keeps_everything_else() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), ROOMY, at(0)).unwrap();
    let angles = [PhotoLabel::Front, PhotoLabel::Rear];
    let earlier = begin(&mut store, "CASE-1", &angles, at(1));
    let earlier_front = jpeg(11, 40_000);
    store.add_image(earlier, &image(PhotoLabel::Front, &earlier_front, at(1))).unwrap();
    store.add_image(earlier, &image(PhotoLabel::Rear, &jpeg(12, 40_000), at(1))).unwrap();
    store.finish_capture(earlier, at(2)).unwrap();
    let id = begin(&mut store, "CASE-2", &angles, at(3));
    let front = jpeg(13, 5000);
    store.add_image(id, &image(PhotoLabel::Front, &front, at(3))).unwrap();
    let before = snapshot(&store);

    let pages = store.page_count().unwrap();
    assert_eq!(store.set_page_limit(pages + 2).unwrap(), pages + 2);
    let rear = jpeg(14, 64 * 1024);
    let err = store.add_image(id, &image(PhotoLabel::Rear, &rear, at(4))).unwrap_err();
    assert!(matches!(err, StoreError::DiskFull { .. }), "{err:?}");
    assert!(err.is_retryable());
    let shown = err.to_string();
    assert!(shown.contains(store.path().to_str().unwrap()) && shown.contains("SQLITE_FULL"), "{shown}");
    assert!(shown.contains("everything stored before is intact"), "{shown}");
    assert_eq!(snapshot(&store), before, "the failed write left nothing behind");
    assert_eq!(store.image_jpeg(earlier, PhotoLabel::Front).unwrap().as_deref(), Some(&earlier_front[..]));

    // Space comes back: the same store takes the image.
    store.set_page_limit(1 << 30).unwrap();
    store.add_image(id, &image(PhotoLabel::Rear, &rear, at(5))).unwrap();
    assert_eq!(store.finish_capture(id, at(6)).unwrap(), InspectionState::Captured);
    drop(store);
    let store = Store::open(dir.path(), ROOMY, at(7)).unwrap();
    assert_eq!(store.check_integrity().unwrap(), Vec::<String>::new());
    assert_eq!(store.image_jpeg(id, PhotoLabel::Rear).unwrap().as_deref(), Some(&rear[..]));
    assert_eq!(store.image_jpeg(id, PhotoLabel::Front).unwrap().as_deref(), Some(&front[..]));
    assert_eq!(store.totals().unwrap().images, 4);
}

/// Marks the child process of the SIGKILL test and names its state directory.
const CHILD_ENV: &str = "CAPTURE_KIOSK_STORE_TEST_CHILD_DIR";
const CHILD_TEST: &str = "child_writes_inspections_until_killed";
const CHILD_READY: &str = "child-ready: first inspection committed";
const KILL_ANGLES: [PhotoLabel; 4] =
    [PhotoLabel::Front, PhotoLabel::Left, PhotoLabel::Rear, PhotoLabel::Right];

/// Not a test on its own: the body of the child process that
/// `a_process_killed_mid_write_leaves_no_half_inspection` starts and kills. Without the
/// environment variable it returns at once.
#[test]
fn child_writes_inspections_until_killed() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut store = Store::open(Path::new(&dir), ROOMY, SystemTime::now()).unwrap();
    let mut rng = fastrand::Rng::new();
    for n in 0u64.. {
        let id = begin(&mut store, &format!("KILL-{n}"), &KILL_ANGLES, SystemTime::now());
        for angle in KILL_ANGLES {
            let bytes = jpeg(rng.u64(..), rng.usize(1..60_000));
            store.add_image(id, &image(angle, &bytes, SystemTime::now())).unwrap();
        }
        match n % 4 {
            0 => {
                store.finish_capture(id, SystemTime::now()).unwrap();
            }
            1 => {
                store.finish_capture(id, SystemTime::now()).unwrap();
                store.set_state(id, InspectionState::Uploading, None, SystemTime::now()).unwrap();
                store.set_state(id, InspectionState::Completed, None, SystemTime::now()).unwrap();
            }
            2 => {
                store.cancel(id, "cancelled by the test", SystemTime::now()).unwrap();
            }
            _ => {
                store.finish_capture(id, SystemTime::now()).unwrap();
                store.prune_completed(SystemTime::now() + Duration::from_secs(1)).unwrap();
            }
        }
        if n == 0 {
            println!("{CHILD_READY}");
        }
    }
}

/// Kills and reaps the child however the test ends.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_process_killed_mid_write_leaves_no_half_inspection() {
    use std::os::unix::process::ExitStatusExt;

    let dir = tempfile::tempdir().unwrap();
    // (inspection, angle) -> sha256 of images in states the child never changes again.
    let mut settled: HashMap<(InspectionId, PhotoLabel), String> = HashMap::new();
    // Inspections the kills cut mid-capture, closed by recovery.
    let mut interrupted: HashSet<InspectionId> = HashSet::new();
    for round in 0..5 {
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut child = Reaper(child);
        let stdout = child.0.stdout.take().unwrap();
        let ready =
            BufReader::new(stdout).lines().map_while(Result::ok).any(|line| line.contains(CHILD_READY));
        assert!(ready, "round {round}: the child stopped before committing anything");
        std::thread::sleep(Duration::from_millis(fastrand::u64(1..250)));
        child.0.kill().unwrap();
        let status = child.0.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "round {round}: the child was killed, not ended: {status:?}"
        );

        let store = Store::open(dir.path(), ROOMY, SystemTime::now()).unwrap();
        assert!(!store.recovery().shared && store.recovery().moved_aside.is_none(), "{:?}", store.recovery());
        assert_eq!(store.check_integrity().unwrap(), Vec::<String>::new(), "round {round}");
        interrupted.extend(store.recovery().interrupted.iter().copied());
        let list = store.list().unwrap();
        assert_eq!(store.totals().unwrap(), totals_of(&list), "round {round}");
        for summary in &list {
            let id = summary.id;
            assert_ne!(summary.state, InspectionState::Capturing, "round {round}: {summary:?}");
            if interrupted.contains(&id) {
                // Closed as evidence: what it holds stays, and every other angle says why.
                let expected =
                    if summary.images > 0 { InspectionState::Captured } else { InspectionState::Failed };
                assert_eq!(summary.state, expected, "round {round}: {summary:?}");
                assert_eq!(
                    summary.images + summary.failed_angles.len() as u64,
                    KILL_ANGLES.len() as u64,
                    "round {round}: every angle stored or failed: {summary:?}"
                );
                for (_, why) in &summary.failed_angles {
                    assert_eq!(why, "the kiosk stopped during capture", "round {round}");
                }
            } else {
                assert_eq!(
                    summary.images,
                    KILL_ANGLES.len() as u64,
                    "round {round}: a finished inspection is whole: {summary:?}"
                );
            }
            let images = store.images(id).unwrap();
            assert_eq!(images.len() as u64, summary.images);
            assert_eq!(images.iter().map(|m| m.bytes).sum::<u64>(), summary.bytes);
            for meta in images {
                let bytes = store.image_jpeg(id, meta.angle).unwrap().unwrap();
                assert_eq!(
                    sha256(&bytes),
                    meta.sha256,
                    "round {round}: inspection {id} angle {}",
                    meta.angle
                );
                assert_eq!(bytes.len() as u64, meta.bytes);
                if matches!(summary.state, InspectionState::Captured | InspectionState::Cancelled) {
                    settled.insert((id, meta.angle), meta.sha256);
                }
            }
        }
        for ((id, angle), sha) in &settled {
            let meta = store.images(*id).unwrap().into_iter().find(|m| m.angle == *angle);
            assert_eq!(
                meta.map(|m| m.sha256).as_ref(),
                Some(sha),
                "round {round}: image {angle} of {id} was lost"
            );
        }
    }
    assert!(!settled.is_empty(), "the child stored something over five rounds");
}

#[test]
fn a_file_that_is_not_a_database_is_moved_aside_and_a_fresh_buffer_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer.sqlite3");
    let garbage: Vec<u8> = (0..16_384u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();

    let mut store = Store::open(dir.path(), ROOMY, at(7)).unwrap();
    let moved = dir.path().join(format!("buffer.sqlite3.corrupt-{}", (1_800_000_007u64) * 1000));
    assert_eq!(store.recovery().moved_aside.as_deref(), Some(moved.as_path()));
    assert_eq!(std::fs::read(&moved).unwrap(), garbage, "the original bytes are kept");
    assert_eq!(store.totals().unwrap().inspections, 0);
    let id = begin(&mut store, "CASE-1", &[PhotoLabel::Front], at(8));
    assert_eq!(store.list().unwrap().len(), 1);
    drop(store);

    let store = Store::open(dir.path(), ROOMY, at(9)).unwrap();
    assert_eq!(store.recovery().moved_aside, None, "the fresh buffer is sound");
    assert_eq!(store.recovery().interrupted, vec![id]);
    assert_eq!(corrupt_copies(dir.path()), vec![moved]);
}

#[test]
fn a_damaged_page_found_by_quick_check_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer.sqlite3");
    {
        let mut store = Store::open(dir.path(), ROOMY, at(0)).unwrap();
        for n in 0..4u64 {
            let id = begin(&mut store, &format!("CASE-{n}"), &[PhotoLabel::Front], at(n));
            store.add_image(id, &image(PhotoLabel::Front, &jpeg(n, 10_000), at(n))).unwrap();
            store.finish_capture(id, at(n)).unwrap();
        }
    }
    assert!(!dir.path().join("buffer.sqlite3-wal").exists(), "a clean close checkpoints the WAL");
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 8 * 4096);
    // Page 1 (the header and schema) stays; every other page is overwritten.
    bytes[4096..].fill(0x55);
    std::fs::write(&path, &bytes).unwrap();

    let store = Store::open(dir.path(), ROOMY, at(50)).unwrap();
    let moved = store.recovery().moved_aside.clone().expect("the damaged file was moved aside");
    assert_eq!(std::fs::read(&moved).unwrap(), bytes, "the damaged bytes are kept as they were");
    assert_eq!(store.totals().unwrap().inspections, 0);
    assert_eq!(store.check_integrity().unwrap(), Vec::<String>::new());
}

#[test]
fn a_buffer_from_a_newer_release_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer.sqlite3");
    {
        let mut store = Store::open(dir.path(), ROOMY, at(0)).unwrap();
        begin(&mut store, "CASE-1", &[PhotoLabel::Front], at(1));
    }
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    let before = std::fs::read(&path).unwrap();

    let err = Store::open(dir.path(), ROOMY, at(2)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NewerSchema { found: 99, supported: capture_kiosk::store::SCHEMA_VERSION, .. }
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    let shown = err.to_string();
    assert!(shown.contains(path.to_str().unwrap()) && shown.contains("schema version 99"), "{shown}");
    assert!(shown.contains("newer release") && shown.contains("left untouched"), "{shown}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "not a byte changed");
    assert!(corrupt_copies(dir.path()).is_empty(), "a newer file is not damage");
}

#[test]
fn a_locked_buffer_is_an_error_naming_the_path_not_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer.sqlite3");
    drop(Store::open(dir.path(), ROOMY, at(0)).unwrap());
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder
        .execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE; DELETE FROM inspections;")
        .unwrap();

    let err = Store::open(dir.path(), ROOMY, at(1)).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    assert!(err.is_retryable());
    let shown = err.to_string();
    assert!(shown.contains(path.to_str().unwrap()) && shown.contains("stop the other process"), "{shown}");
    assert!(corrupt_copies(dir.path()).is_empty(), "a lock is not damage");
    drop(holder);
    Store::open(dir.path(), ROOMY, at(2)).unwrap();
}

#[test]
fn a_state_dir_or_buffer_that_cannot_be_opened_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let err = Store::open(&file.join("state"), ROOMY, at(0)).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains(file.join("state").to_str().unwrap()), "{err}");

    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("buffer.sqlite3")).unwrap();
    let err = Store::open(&state, ROOMY, at(0)).unwrap_err();
    assert!(matches!(err, StoreError::Access { .. }), "{err:?}");
    assert!(err.to_string().contains(state.join("buffer.sqlite3").to_str().unwrap()), "{err}");
    assert!(state.join("buffer.sqlite3").is_dir() && corrupt_copies(&state).is_empty(), "nothing was moved");
}

#[test]
fn illegal_transitions_are_refused_and_change_nothing() {
    use InspectionState::*;
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), ROOMY, at(0)).unwrap();
    let angles = [PhotoLabel::Front, PhotoLabel::Rear];
    let id = begin(&mut store, "CASE-1", &angles, at(1));
    let empty = begin(&mut store, "CASE-2", &angles, at(1));
    store.add_image(id, &image(PhotoLabel::Front, &jpeg(20, 500), at(2))).unwrap();

    let refused = |store: &mut Store, id, to, reason: Option<&str>, why: &str| {
        let before = snapshot(store);
        let err = store.set_state(id, to, reason, at(99)).unwrap_err();
        assert!(matches!(err, StoreError::IllegalTransition { .. }), "{err:?}");
        assert!(!err.is_retryable());
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("inspection {id} cannot go from ")) && shown.contains(why),
            "{shown:?} should say {why:?}"
        );
        assert_eq!(snapshot(store), before, "a refused move changes nothing");
    };

    refused(&mut store, id, Uploading, None, "only captured, failed or cancelled may follow capturing");
    refused(&mut store, empty, Captured, None, "it holds no image");
    assert_eq!(store.finish_capture(id, at(3)).unwrap(), Captured);
    let err = store.finish_capture(id, at(4)).unwrap_err();
    assert_eq!(err.to_string(), format!("inspection {id} cannot go from captured to captured: only a capturing inspection can finish capture"));
    let err = store.add_image(id, &image(PhotoLabel::Rear, &jpeg(21, 500), at(4))).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("inspection {id} is captured, not capturing; angle Rear was not recorded")
    );
    refused(&mut store, id, Completed, None, "only uploading, failed or cancelled may follow captured");
    refused(&mut store, id, Failed, None, "moving to failed needs a reason");

    assert_eq!(store.set_state(id, Uploading, None, at(5)).unwrap(), Captured);
    let err = store.cancel(id, "operator", at(6)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("inspection {id} cannot go from uploading to cancelled: only a capturing or captured inspection can be cancelled")
    );
    assert_eq!(
        store.set_state(id, Captured, Some("session expired; queued again"), at(6)).unwrap(),
        Uploading
    );
    assert_eq!(
        store.inspection(id).unwrap().unwrap().reason.as_deref(),
        Some("session expired; queued again")
    );
    store.set_state(id, Uploading, None, at(7)).unwrap();
    store.set_state(id, Completed, None, at(8)).unwrap();
    for to in InspectionState::ALL {
        refused(&mut store, id, to, Some("why"), "completed is final");
    }

    store.record_angle_failure(empty, PhotoLabel::Front, "camera gone", at(9)).unwrap();
    store.record_angle_failure(empty, PhotoLabel::Rear, "bad frame", at(9)).unwrap();
    assert_eq!(store.finish_capture(empty, at(10)).unwrap(), Failed);
    let failed = store.inspection(empty).unwrap().unwrap();
    assert_eq!(failed.reason.as_deref(), Some("no angle was captured (Front: camera gone; Rear: bad frame)"));
    refused(&mut store, empty, Captured, None, "it holds no image");

    let unknown = InspectionId(12_345);
    let err = store.set_state(unknown, Captured, None, at(11)).unwrap_err();
    assert!(matches!(err, StoreError::UnknownInspection { .. }), "{err:?}");
    assert!(err.to_string().contains("has no inspection 12345"), "{err}");
    assert_eq!(store.inspection(unknown).unwrap(), None);
}

#[test]
fn pruning_removes_only_completed_inspections_older_than_the_cutoff() {
    use InspectionState::*;
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), ROOMY, at(0)).unwrap();
    let make = |store: &mut Store, name: &str, route: &[InspectionState], when: u64, size: usize| {
        let id = begin(store, name, &[PhotoLabel::Front], at(when));
        store.add_image(id, &image(PhotoLabel::Front, &jpeg(when, size), at(when))).unwrap();
        for to in route {
            store.set_state(id, *to, Some("test"), at(when)).unwrap();
        }
        id
    };
    let old_completed = make(&mut store, "OLD", &[Captured, Uploading, Completed], 10, 400_000);
    let new_completed = make(&mut store, "NEW", &[Captured, Uploading, Completed], 50, 1000);
    let keep = [
        make(&mut store, "CAPTURED", &[Captured], 1, 1000),
        make(&mut store, "UPLOADING", &[Captured, Uploading], 1, 1000),
        make(&mut store, "FAILED", &[Captured, Failed], 1, 1000),
        make(&mut store, "CANCELLED", &[Cancelled], 1, 1000),
        make(&mut store, "CAPTURING", &[], 1, 1000),
    ];
    let pages_before = store.page_count().unwrap();

    assert_eq!(store.prune_completed(at(30)).unwrap(), 1);
    let ids: Vec<InspectionId> = store.list().unwrap().iter().map(|i| i.id).collect();
    let mut expected = vec![new_completed];
    expected.extend(keep);
    assert_eq!(ids, expected);
    assert_eq!(
        store.images(old_completed).unwrap_err().to_string(),
        format!(
            "buffer {} has no inspection {old_completed}; it was never created or was pruned after upload",
            store.path().display()
        )
    );
    assert!(store.page_count().unwrap() < pages_before - 50, "the pruned pages went back to the file system");

    assert_eq!(store.prune_completed(at(30)).unwrap(), 0, "pruning again finds nothing");
    assert_eq!(store.prune_completed(at(1_000)).unwrap(), 1);
    let ids: Vec<InspectionId> = store.list().unwrap().iter().map(|i| i.id).collect();
    assert_eq!(ids, keep.to_vec(), "only completed inspections ever leave");
    assert_eq!(store.totals().unwrap().images, keep.len() as u64);

    let next = begin(&mut store, "NEXT", &[PhotoLabel::Front], at(2000));
    assert!(next > new_completed && next > keep[4], "ids are never reused");
}
