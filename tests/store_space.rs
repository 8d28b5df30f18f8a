//! The buffer and the disk under it: the caps count the buffer's own free pages, pruning and
//! every write that must not fail work on a disk with no byte free, pruned space goes back to
//! the file system, and reading the buffer for `queue` creates and changes nothing. The full
//! disk is a real one: a small tmpfs each test mounts (as root; skipped otherwise).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capture_kiosk::store::{
    Caps, InspectionState, NewImage, NewInspection, PruneRule, Store, StoreError, FILE_NAME, RESERVE_BYTES,
};
use capture_kiosk::vehicle::{CaseId, PhotoLabel};
use support::{captured, jpeg, Tmpfs, CAPS};

const FOUR: [PhotoLabel; 4] = [PhotoLabel::Front, PhotoLabel::Rear, PhotoLabel::Left, PhotoLabel::Right];
const TIGHT: Caps = Caps { max_bytes: 1 << 30, min_free_disk: 0 };

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

/// Every file in `dir` with its length and contents' hash: what "nothing changed" means.
fn files(dir: &Path) -> BTreeMap<String, (u64, String)> {
    use sha2::{Digest, Sha256};
    let Ok(entries) = std::fs::read_dir(dir) else { return BTreeMap::new() };
    entries
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap_or_default();
            (
                e.file_name().to_string_lossy().into_owned(),
                (bytes.len() as u64, hex::encode(Sha256::digest(&bytes))),
            )
        })
        .collect()
}

fn complete(store: &mut Store, id: capture_kiosk::store::InspectionId, now: SystemTime) {
    store.set_state(id, InspectionState::Uploading, None, now).unwrap();
    store.set_state(id, InspectionState::Completed, None, now).unwrap();
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn a_full_disk_refuses_new_evidence_but_every_write_that_must_succeed_does_and_pruning_gives_space_back() {
    let Some(fs) = Tmpfs::mount(40 << 20, "a_full_disk_refuses_new_evidence…") else { return };
    let state = fs.path().join("state");
    let db = state.join(FILE_NAME);
    let reserve = state.join("buffer.sqlite3.reserve");
    let mut store = Store::open(&state, TIGHT, at(0)).unwrap();
    assert_eq!(file_len(&reserve), RESERVE_BYTES, "the owner keeps a reserve");

    // Evidence on its way to the cloud, a capture under way, then a disk with no byte left.
    let uploaded: Vec<_> =
        (0..6).map(|n| captured(&mut store, &format!("DONE-{n}"), &FOUR, 300, at(n))).collect();
    let waiting = captured(&mut store, "WAITING", &FOUR, 300, at(20));
    let capturing = {
        let case = CaseId::parse("CAPTURING").unwrap();
        let new = NewInspection { case_id: &case, vehicle: None, angles: &FOUR, expected_image_bytes: 1000 };
        store.begin_inspection(&new, at(21)).unwrap()
    };
    // A restart empties the WAL, so that the writes below need new room on the disk.
    drop(store);
    let mut store = Store::open(&state, TIGHT, at(21)).unwrap();
    assert_eq!(store.recovery().interrupted, vec![capturing], "closed: it held nothing");
    let capturing = {
        let case = CaseId::parse("CAPTURING-2").unwrap();
        let new = NewInspection { case_id: &case, vehicle: None, angles: &FOUR, expected_image_bytes: 1000 };
        store.begin_inspection(&new, at(21)).unwrap()
    };
    fs.fill("filler", 0);
    assert!(fs.free() < 64 << 10, "the disk is full: {} bytes free", fs.free());
    let size_full = file_len(&db);

    // Nothing is delivered yet, so new evidence is refused with the reason, touching nothing.
    let case = CaseId::parse("REFUSED").unwrap();
    let new = NewInspection { case_id: &case, vehicle: None, angles: &FOUR, expected_image_bytes: 1000 };
    let err = store.begin_inspection(&new, at(22)).unwrap_err();
    assert!(matches!(err, StoreError::Full { .. }), "{err:?}");
    assert!(err.to_string().contains("min_free_disk"), "{err}");
    let big = jpeg(77, 300);
    let image = NewImage {
        angle: PhotoLabel::Front,
        camera: "cam",
        captured_at: at(22),
        source_width: 4032,
        source_height: 3024,
        source_bytes: 4 << 20,
        width: 1920,
        height: 1440,
        jpeg: &big,
    };
    let err = store.add_image(capturing, &image).unwrap_err();
    assert!(matches!(err, StoreError::Full { .. }), "{err:?}");
    assert_eq!(store.totals().unwrap().inspections, 9);

    // Writes that must succeed do, on a disk with no byte free: an angle failure, upload
    // bookkeeping, state changes; the reserve is given for them.
    store.record_angle_failure(capturing, PhotoLabel::Rear, "camera gone", at(23)).unwrap();
    store.open_session(waiting, "S-WAITING").unwrap();
    store.record_upload_attempt(waiting, Some("the cloud answered HTTP 503")).unwrap();
    store.set_state(waiting, InspectionState::Uploading, None, at(24)).unwrap();
    for (n, id) in uploaded.iter().enumerate() {
        store.open_session(*id, &format!("S-{n}")).unwrap();
        complete(&mut store, *id, at(30 + n as u64));
    }
    assert!(!reserve.exists(), "the reserve was given for them");

    // Now the image gets space: delivered inspections give theirs, oldest first, no more.
    store.add_image(capturing, &image).unwrap();
    let history = store.pruned_history().unwrap();
    assert!(!history.is_empty(), "something delivered was pruned");
    assert!(history.iter().all(|p| p.rule == PruneRule::Space && p.state == InspectionState::Completed));
    let pruned: Vec<_> = history.iter().map(|p| p.inspection_id).collect();
    assert_eq!(pruned, uploaded[..pruned.len()].to_vec(), "oldest completion first");
    assert!(pruned.len() < uploaded.len(), "only as much as needed: {pruned:?}");
    assert_eq!(history[0].session.as_deref(), Some("S-0"));
    assert_eq!(store.inspection(waiting).unwrap().unwrap().state, InspectionState::Uploading);
    assert_eq!(store.finish_capture(capturing, at(40)).unwrap(), InspectionState::Captured);

    // Retention on a full disk again: deleting needs no free space, and the space goes back.
    fs.fill("filler", 0);
    let pages_before = store.page_count().unwrap();
    let pruned_now = store.prune_completed(at(1_000)).unwrap();
    // The rest of the delivered ones, and the capture the restart closed with nothing in it.
    assert_eq!(pruned_now as usize, uploaded.len() - pruned.len() + 1);
    assert!(store.page_count().unwrap() < pages_before, "the file shrank");
    assert!(file_len(&db) < size_full, "{} >= {size_full}", file_len(&db));
    assert!(fs.free() > 1 << 20, "the file system got the space: {} free", fs.free());
    assert_eq!(file_len(&reserve), RESERVE_BYTES, "the reserve is back");
    assert_eq!(store.free_pages().unwrap(), 0);
    assert_eq!(store.check_integrity().unwrap(), Vec::<String>::new());
    assert_eq!(store.images(waiting).unwrap().len(), 4, "evidence not delivered is all there");
    assert_eq!(store.pruned_history().unwrap().len(), uploaded.len() + 1);
    drop(store);
    let store = Store::open(&state, TIGHT, at(2_000)).unwrap();
    assert_eq!(store.check_integrity().unwrap(), Vec::<String>::new());
}

#[test]
fn the_caps_count_the_buffers_own_free_pages_and_give_them_back_for_an_image() {
    let Some(fs) = Tmpfs::mount(32 << 20, "the_caps_count_…") else { return };
    let state = fs.path().join("state");
    let mut store = Store::open(&state, TIGHT, at(0)).unwrap();
    captured(&mut store, "WAITING", &FOUR[..2], 200, at(1));
    // Free pages a writer could not give back (here: left by a plain SQLite connection).
    {
        let raw = rusqlite::Connection::open(state.join(FILE_NAME)).unwrap();
        raw.execute(
            "INSERT INTO commands (command_id, answer, at) VALUES ('pad', ?1, 0)",
            ["x".repeat(8 << 20)],
        )
        .unwrap();
        raw.execute("DELETE FROM commands WHERE command_id = 'pad'", []).unwrap();
    }
    let free_pages = store.free_pages().unwrap();
    assert!(free_pages * 4096 >= 8 << 20, "{free_pages} free pages");
    fs.fill("filler", 0);

    // The file system has nothing left, but the buffer has 8 MiB of its own.
    let needed = 2 << 20;
    assert_eq!(store.would_refuse(2, needed / 2).unwrap(), None);
    let case = CaseId::parse("NEXT").unwrap();
    let new =
        NewInspection { case_id: &case, vehicle: None, angles: &FOUR[..2], expected_image_bytes: needed / 2 };
    let id = store.begin_inspection(&new, at(2)).unwrap();
    // Its image passes through the WAL: the free pages go back to the file system first.
    let bytes = jpeg(5, 400);
    let image = NewImage {
        angle: PhotoLabel::Front,
        camera: "cam",
        captured_at: at(3),
        source_width: 4032,
        source_height: 3024,
        source_bytes: 4 << 20,
        width: 1920,
        height: 1440,
        jpeg: &bytes,
    };
    store.add_image(id, &image).unwrap();
    assert_eq!(store.finish_capture(id, at(4)).unwrap(), InspectionState::Captured);
    assert!(store.free_pages().unwrap() < free_pages);
    // Beyond what the buffer and the disk hold together, it refuses, with the numbers.
    let huge = NewInspection { expected_image_bytes: 64 << 20, ..new };
    let err = store.begin_inspection(&huge, at(5)).unwrap_err();
    assert!(matches!(err, StoreError::Full { .. }), "{err:?}");
    assert!(err.to_string().contains("min_free_disk"), "{err}");
    assert_eq!(store.check_integrity().unwrap(), Vec::<String>::new());
}

#[test]
fn reading_for_queue_creates_nothing_changes_nothing_and_sees_a_live_writer() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // No buffer yet: nothing to show, and no directory made.
    assert_eq!(Store::read_only(&state, CAPS, |s| s.totals()).unwrap(), None);
    assert!(!state.exists(), "reading made no directory");

    // A buffer nobody has open: read as it is, with nothing added beside it.
    let id = {
        let mut store = Store::open(&state, CAPS, at(0)).unwrap();
        captured(&mut store, "CASE-1", &FOUR[..2], 20, at(1))
    };
    let before = files(&state);
    let list = Store::read_only(&state, CAPS, |s| s.list()).unwrap().unwrap();
    assert_eq!(list.iter().map(|i| i.id).collect::<Vec<_>>(), vec![id]);
    assert_eq!(files(&state), before, "not a file created or changed");

    // While the kiosk writes: its latest commits are seen, through its WAL.
    let mut kiosk = Store::open(&state, CAPS, at(2)).unwrap();
    let second = captured(&mut kiosk, "CASE-2", &FOUR[..1], 20, at(3));
    let names = |dir: &Path| files(dir).into_keys().collect::<Vec<_>>();
    let open_names = names(&state);
    let totals = Store::read_only(&state, CAPS, |s| s.totals()).unwrap().unwrap();
    assert_eq!((totals.inspections, totals.images), (2, 3));
    let seen = Store::read_only(&state, CAPS, |s| s.inspection(second)).unwrap().unwrap();
    assert_eq!(seen.map(|i| i.state), Some(InspectionState::Captured));
    assert_eq!(names(&state), open_names, "no file created");
    drop(kiosk);

    // A WAL without its shared-memory index would need one created: refused with the fix.
    let wal = state.join("buffer.sqlite3-wal");
    std::fs::write(&wal, b"").unwrap();
    let before = files(&state);
    let err = Store::read_only(&state, CAPS, |s| s.totals()).unwrap_err();
    assert!(matches!(err, StoreError::ReadOnly { .. }), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains("never writes") && shown.contains("start capture-kiosk"), "{shown}");
    assert_eq!(files(&state), before);
    std::fs::remove_file(&wal).unwrap();

    // A file at an older schema version is not migrated by a reader.
    {
        let raw = rusqlite::Connection::open(state.join(FILE_NAME)).unwrap();
        raw.pragma_update(None, "user_version", 3).unwrap();
    }
    let before = files(&state);
    let err = Store::read_only(&state, CAPS, |s| s.totals()).unwrap_err();
    assert!(matches!(err, StoreError::OlderSchema { found: 3, .. }), "{err:?}");
    assert!(err.to_string().contains("migrates it"), "{err}");
    assert_eq!(files(&state), before, "not migrated");
}

#[test]
fn a_buffer_closed_on_a_full_disk_opens_again_with_the_help_of_its_reserve() {
    let Some(fs) = Tmpfs::mount(40 << 20, "a_buffer_closed_on_a_full_disk_opens_again…") else { return };
    let state = fs.path().join("state");
    let reserve = state.join("buffer.sqlite3.reserve");
    let mut store = Store::open(&state, TIGHT, at(0)).unwrap();
    let waiting = captured(&mut store, "WAITING", &FOUR, 300, at(1));
    // The last connection's close removes the WAL and its index: the next open must make them.
    drop(store);
    assert!(!state.join("buffer.sqlite3-shm").exists(), "closed cleanly");
    fs.fill("filler", 0);
    assert!(fs.free() < 64 << 10, "the disk is full: {} bytes free", fs.free());

    // The restart a power cut or a watchdog brings must not find the buffer unopenable.
    let mut store = Store::open(&state, TIGHT, at(2)).expect("the buffer opens on a full disk");
    assert!(!reserve.exists(), "the reserve gave the room for the WAL index");
    assert_eq!(store.totals().unwrap().inspections, 1);
    store.record_upload_attempt(waiting, Some("the cloud answered HTTP 503")).unwrap();

    // Without a reserve to give, the refusal says the disk is full, not an I/O riddle.
    drop(store);
    assert!(!state.join("buffer.sqlite3-shm").exists(), "closed cleanly");
    fs.fill("filler", 0);
    let err = Store::open(&state, TIGHT, at(3)).unwrap_err();
    assert!(matches!(err, StoreError::DiskFull { .. }), "{err:?}");
    assert!(err.to_string().contains("buffer.sqlite3"), "{err}");
}
