//! A damaged buffer file, as the field damages it: a real buffer of three inspections of eight
//! real photos each is damaged (4 KiB overwritten in the middle, cut to half its length, its
//! first page destroyed) and the binary is run on it as an installer would: `check`, `queue`,
//! `upload` against the stand-in. What can still be read with a matching sha256 is delivered,
//! what cannot is reported lost and never sent, the damaged file stays as it was, and the kiosk
//! says so until an operator acknowledges it. One test runs the daemon against Mosquitto.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capture_kiosk::clock::SystemClock;
use capture_kiosk::standin::{StandIn, StandInConfig};
use capture_kiosk::store::{self, InspectionId, NewImage, NewInspection, Store};
use capture_kiosk::vehicle::{CaseId, PhotoLabel, Vehicle, Vin};
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::{cloud_toml, secret_file, CAPS};

const CASES: [&str; 3] = ["SALV-A", "SALV-B", "SALV-C"];

/// The tests of this file run one at a time. They hand the buffer's lock from this process to
/// a child and back, and a child spawned by another test thread inherits every descriptor this
/// process has open until it execs: for that moment it would hold a lock this test just let go.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn testdata() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata");
    assert!(dir.is_dir(), "the real photos are missing: expected them in {}", dir.display());
    dir
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A real photo made unique by a JPEG comment naming its inspection and angle (the picture is
/// untouched; the hash differs, so each image can be told apart at the stand-in).
fn photo(n: usize, tag: &str) -> Vec<u8> {
    let names: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> = std::fs::read_dir(testdata().join("orientation"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
            .collect();
        v.sort();
        v
    };
    let original = std::fs::read(&names[n % names.len()]).unwrap();
    assert_eq!(&original[..2], &[0xFF, 0xD8]);
    let comment = tag.as_bytes();
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xFE];
    out.extend(((comment.len() + 2) as u16).to_be_bytes());
    out.extend(comment);
    out.extend(&original[2..]);
    out
}

/// What the buffer held before it was damaged: (case id, label) → sha256.
type Held = BTreeMap<(String, String), String>;

/// Builds a real buffer in `state`: three captured inspections of the eight exterior angles.
fn build_buffer(state: &Path) -> (Held, Vec<InspectionId>) {
    let now = SystemTime::now();
    let mut store = Store::open(state, CAPS, now).unwrap();
    let mut held = Held::new();
    let mut ids = Vec::new();
    let vehicle = Vehicle::with_vin(Vin::parse("JN1CV6AR9BM123456").unwrap());
    for (i, case) in CASES.iter().enumerate() {
        let case_id = CaseId::parse(case).unwrap();
        let labels = PhotoLabel::EXTERIOR;
        let id = store
            .begin_inspection(
                &NewInspection {
                    case_id: &case_id,
                    vehicle: Some(&vehicle),
                    angles: &labels,
                    expected_image_bytes: 400_000,
                },
                now,
            )
            .unwrap();
        for (j, label) in labels.iter().enumerate() {
            let jpeg = photo(i * 8 + j, &format!("{case} {label}"));
            held.insert((case.to_string(), label.as_str().to_owned()), sha256(&jpeg));
            let image = NewImage {
                angle: *label,
                camera: "cam",
                captured_at: now,
                source_width: 4032,
                source_height: 3024,
                source_bytes: 4 << 20,
                width: 1920,
                height: 1440,
                jpeg: &jpeg,
            };
            store.add_image(id, &image).unwrap();
        }
        store.finish_capture(id, now).unwrap();
        ids.push(id);
    }
    drop(store);
    let path = state.join(store::FILE_NAME);
    assert!(!Path::new(&format!("{}-wal", path.display())).exists(), "a clean close checkpoints the WAL");
    (held, ids)
}

/// How a test damages the file.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// 4 KiB of noise written over the middle of the file.
    MiddleOverwritten,
    /// The file cut to half its length.
    TruncatedToHalf,
    /// The first page (header and table directory) overwritten with noise.
    FirstPageDestroyed,
    /// 16 bytes inside the data of one image (SALV-C's Left) garbled; every page stays sound,
    /// so only the image's sha256 can tell.
    OneImageGarbled,
}

/// Where `needle` starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn damage(path: &Path, how: Damage) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    match how {
        Damage::MiddleOverwritten => {
            let at = bytes.len() / 2;
            bytes[at..at + 4096].iter_mut().for_each(|b| *b = rng.u8(..));
        }
        Damage::TruncatedToHalf => bytes.truncate(bytes.len() / 2),
        Damage::FirstPageDestroyed => bytes[..4096].iter_mut().for_each(|b| *b = rng.u8(..)),
        Damage::OneImageGarbled => {
            // The photos repeat after 18; the comment naming the image makes its start unique.
            let jpeg = photo(2 * 8 + 2, "SALV-C Left");
            let at = find(&bytes, &jpeg[..64]).expect("the image's bytes lie in the file");
            assert_eq!(find(&bytes[at + 1..], &jpeg[..64]), None, "the image's start is unique");
            bytes[at + 40..at + 56].iter_mut().for_each(|b| *b = !*b);
        }
    }
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// The images a plain reader can still take from the damaged file with their hash intact, each
/// image asked for on its own: what the salvage must deliver at least. Reads a copy.
fn readable_by_rowid(damaged: &[u8]) -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.sqlite3");
    std::fs::write(&copy, damaged).unwrap();
    let mut found = BTreeSet::new();
    let Ok(conn) = rusqlite::Connection::open_with_flags(&copy, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return found;
    };
    let _ = conn.execute_batch("PRAGMA writable_schema = ON");
    for rowid in 1..=24 {
        let row: rusqlite::Result<(String, Vec<u8>)> =
            conn.query_row("SELECT sha256, jpeg FROM images WHERE rowid = ?1", [rowid], |r| {
                Ok((r.get(0)?, r.get(1)?))
            });
        if let Ok((stored, jpeg)) = row {
            if sha256(&jpeg) == stored {
                found.insert(stored);
            }
        }
    }
    found
}

struct Bay {
    standin: StandIn,
    config: PathBuf,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

fn bay() -> Bay {
    let standin = StandIn::start(StandInConfig::default(), Arc::new(SystemClock::new())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path(), standin.config());
    let state = dir.path().join("state");
    let config = dir.path().join("bay.toml");
    let text = format!(
        "bay_id = \"bay-salvage\"\nstate_dir = \"{}\"\n\n[buffer]\nmin_free_disk = \"1 MiB\"\n\n\
         [inspection]\nangles = [\"Front\"]\n\n\
         [[cameras]]\nid = \"front\"\nsource = \"synthetic:64x48\"\nangles = [\"Front\"]\n\n{}",
        state.display(),
        cloud_toml(&standin.base_url(), &secret)
    );
    std::fs::write(&config, text).unwrap();
    Bay { standin, config, state, _dir: dir }
}

impl Bay {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_capture-kiosk"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("CAPTURE_KIOSK_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn buffer(&self) -> PathBuf {
        self.state.join(store::FILE_NAME)
    }

    /// Files in the state directory whose name holds `.corrupt-`.
    fn kept_aside(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.state)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".corrupt-"))
            .collect();
        v.sort();
        v
    }

    /// Every (case id, label) → sha256 the stand-in holds in completed sessions.
    fn delivered(&self) -> Held {
        let mut out = Held::new();
        for s in self.standin.sessions().into_iter().filter(|s| s.completed) {
            assert_eq!(s.completions, 1, "session {} completed once", s.session);
            for p in &s.photos {
                let before = out.insert((s.case_id.clone(), p.label.clone()), p.sha256.clone());
                assert!(before.is_none(), "{} {} delivered in two sessions", s.case_id, p.label);
            }
        }
        out
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Takes the buffer's lock as a running daemon holds it; released on drop.
struct HeldLock {
    _file: std::fs::File,
}

fn hold_lock(buffer: &Path) -> HeldLock {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(format!("{}.lock", buffer.display()))
        .unwrap();
    // SAFETY: the descriptor belongs to `file`, alive for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0, "the lock is free before the test takes it");
    HeldLock { _file: file }
}

/// The whole story of one kind of damage, through the binary.
fn damaged_buffer_is_salvaged_delivered_and_reported(how: Damage) -> (Held, Held, Value) {
    let bay = bay();
    let (held, ids) = build_buffer(&bay.state);
    let damaged = damage(&bay.buffer(), how);
    let plain = readable_by_rowid(&damaged);

    // `check` sees the damage, and moves nothing even when nobody holds the buffer, nor while a
    // daemon does; it adds nothing next to it but the note asking the next start to salvage.
    let names = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock") && !n.ends_with(".damaged"))
            .collect()
    };
    let before = names(&bay.state);
    for lock in [None, Some(hold_lock(&bay.buffer()))] {
        let out = bay.run(&["check"]);
        assert_eq!(out.status.code(), Some(1), "{how:?}: check must fail on damage: {}", text(&out));
        assert!(text(&out).contains("is damaged"), "{how:?}: {}", text(&out));
        assert_eq!(std::fs::read(bay.buffer()).unwrap(), damaged, "{how:?}: check changed the file");
        assert!(bay.kept_aside().is_empty(), "{how:?}: check moved the file");
        assert_eq!(names(&bay.state), before, "{how:?}: check made files next to the buffer");
        drop(lock);
    }

    // `queue` only reads: it may report the damage, but it salvages and moves nothing.
    let out = bay.run(&["queue", "--json"]);
    assert!(bay.kept_aside().is_empty(), "{how:?}: queue moved the file: {}", text(&out));
    assert_eq!(std::fs::read(bay.buffer()).unwrap(), damaged, "{how:?}: queue changed the file");

    // The kiosk's next start (the owner's open) salvages it.
    drop(Store::open(&bay.state, CAPS, SystemTime::now()).unwrap());
    let out = bay.run(&["queue", "--json"]);
    assert!(out.status.success(), "{how:?}: {}", text(&out));
    let queue: Value = serde_json::from_slice(&out.stdout).expect("queue --json prints JSON");
    let recoveries = queue["recoveries"].as_array().expect("queue --json lists the salvage");
    assert_eq!(recoveries.len(), 1, "{how:?}: {queue:#}");
    let report = recoveries[0].clone();
    eprintln!("{how:?}: plain reader gets {} image(s); report {report:#}", plain.len());
    assert_eq!(report["acknowledged_at"], Value::Null);

    // The damaged file is kept, byte for byte, with nothing added next to it.
    let aside = bay.kept_aside();
    assert_eq!(aside.len(), 1, "{how:?}: only the damaged file is kept aside: {aside:?}");
    assert_eq!(std::fs::read(&aside[0]).unwrap(), damaged, "{how:?}: the damaged file changed");
    assert_eq!(Path::new(report["moved_to"].as_str().unwrap()), aside[0]);
    let leftovers: Vec<_> = std::fs::read_dir(&bay.state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("salvage"))
        .collect();
    assert!(leftovers.is_empty(), "{how:?}: scratch files left: {leftovers:?}");

    // Text `queue` cannot be missed, and names what was lost.
    let out = bay.run(&["queue"]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.starts_with("!!! BUFFER SALVAGED FROM A DAMAGED FILE"), "{how:?}: {shown}");
    assert!(shown.contains(&aside[0].display().to_string()), "{shown}");
    assert!(shown.contains("--ack-recovery"), "{shown}");
    for lost in report["report"]["lost"].as_array().unwrap() {
        assert!(
            shown.contains(&format!("inspection {} ({}", lost["id"], lost["case_id"].as_str().unwrap())),
            "{shown}"
        );
    }

    // `check` fails while the report is not acknowledged.
    let out = bay.run(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{how:?}: {}", text(&out));
    assert!(text(&out).contains("salvaged from a damaged file"), "{}", text(&out));

    // Upload as usual: what was recovered reaches the stand-in, what was damaged never does.
    let out = bay.run(&["upload", "--max-wait", "20s"]);
    assert!(out.status.success(), "{how:?}: upload failed: {}", text(&out));
    let delivered = bay.delivered();
    for (key, sha) in &delivered {
        assert_eq!(held.get(key), Some(sha), "{how:?}: {key:?} delivered with bytes the buffer never held");
    }
    let delivered_hashes: BTreeSet<String> = delivered.values().cloned().collect();
    assert!(
        plain.is_subset(&delivered_hashes),
        "{how:?}: every image a plain reader still gets intact must be delivered; missing {:?}",
        plain.difference(&delivered_hashes).collect::<Vec<_>>()
    );
    assert_eq!(report["report"]["images_recovered"].as_u64(), Some(delivered.len() as u64), "{report:#}");

    // Every image the buffer held is either delivered or named as lost, per inspection.
    let lost = report["report"]["lost"].as_array().unwrap();
    for (case, label) in held.keys() {
        if delivered.contains_key(&(case.clone(), label.clone())) {
            continue;
        }
        let named = lost.iter().any(|l| {
            l["case_id"] == case.as_str()
                && l["angles"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|a| a["angle"] == label.as_str() || a["angle"] == "")
        });
        let unnamed = report["report"]["lost_without_case_id"].as_u64().unwrap_or(0) > 0
            || report["report"]["more_may_be_lost"] == true;
        assert!(named || unnamed, "{how:?}: {case} {label} neither delivered nor reported lost: {report:#}");
    }

    // Ids are never handed out again.
    let mut store = Store::open(&bay.state, CAPS, SystemTime::now()).unwrap();
    let case = CaseId::parse("SALV-NEW").unwrap();
    let next = store
        .begin_inspection(
            &NewInspection {
                case_id: &case,
                vehicle: None,
                angles: &[PhotoLabel::Front],
                expected_image_bytes: 1,
            },
            SystemTime::now(),
        )
        .unwrap();
    assert!(next > *ids.iter().max().unwrap(), "{how:?}: id {next} was used before the damage");
    store.cancel(next, "test only", SystemTime::now()).unwrap();
    drop(store);

    // Acknowledged, the alarm stops; the damaged file is still there as it was.
    let out = bay.run(&["check", "--ack-recovery"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = bay.run(&["check"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&bay.run(&["queue"])).contains("!!!"));
    assert_eq!(std::fs::read(&aside[0]).unwrap(), damaged);
    bay.standin.stop();
    (held, delivered, report)
}

#[test]
fn four_kib_overwritten_in_the_middle_loses_only_the_damaged_image() {
    let _serial = one_at_a_time();
    let (held, delivered, report) =
        damaged_buffer_is_salvaged_delivered_and_reported(Damage::MiddleOverwritten);
    let lost = held.len() - delivered.len();
    assert!((1..=2).contains(&lost), "4 KiB costs one or two images, not {lost}: {report:#}");
    assert_eq!(report["report"]["inspections_recovered"], 3, "{report:#}");
    let named: usize = report["report"]["lost"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["angles"].as_array().unwrap().len())
        .sum();
    assert_eq!(named, lost, "each lost image is named: {report:#}");
}

#[test]
fn a_file_cut_to_half_delivers_the_half_that_is_left() {
    let _serial = one_at_a_time();
    let (held, delivered, report) =
        damaged_buffer_is_salvaged_delivered_and_reported(Damage::TruncatedToHalf);
    assert!(
        delivered.len() >= 10 && delivered.len() < held.len(),
        "{} of {}: {report:#}",
        delivered.len(),
        held.len()
    );
}

#[test]
fn a_destroyed_first_page_is_rebuilt_and_everything_behind_it_delivered() {
    let _serial = one_at_a_time();
    let (held, delivered, report) =
        damaged_buffer_is_salvaged_delivered_and_reported(Damage::FirstPageDestroyed);
    assert_eq!(delivered, held, "every image lies behind the first page: {report:#}");
    let notes = report["report"]["notes"].to_string();
    assert!(notes.contains("first page"), "{notes}");
}

#[test]
fn an_image_whose_bytes_no_longer_match_is_reported_lost_and_never_uploaded() {
    let _serial = one_at_a_time();
    let (held, delivered, report) =
        damaged_buffer_is_salvaged_delivered_and_reported(Damage::OneImageGarbled);
    let mut expected = held.clone();
    expected.remove(&("SALV-C".to_owned(), "Left".to_owned()));
    assert_eq!(delivered, expected, "everything but the garbled image: {report:#}");
    let lost = &report["report"]["lost"];
    assert_eq!(lost.as_array().unwrap().len(), 1, "{report:#}");
    assert_eq!(lost[0]["case_id"], "SALV-C");
    assert_eq!(lost[0]["angles"][0]["angle"], "Left");
    assert!(lost[0]["angles"][0]["why"].as_str().unwrap().contains("sha256"), "{report:#}");
    assert!(report["damage"].as_str().unwrap().contains("image Left of inspection 3"), "{report:#}");
}

#[test]
fn a_damaged_buffer_without_a_cloud_is_kept_whole_when_only_its_header_is_garbled() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (held, _) = build_buffer(dir.path());
    let path = dir.path().join(store::FILE_NAME);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..100].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let store = Store::open(dir.path(), CAPS, UNIX_EPOCH + Duration::from_secs(1_900_000_000)).unwrap();
    let moved = store.recovery().moved_aside.clone().expect("the damaged file was moved aside");
    assert_eq!(std::fs::read(&moved).unwrap(), bytes);
    let records = store.unacknowledged_recoveries().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].report.images_recovered, 24, "{:#?}", records[0]);
    assert!(records[0].report.lost.is_empty(), "{:#?}", records[0]);
    let mut found = 0;
    for summary in store.list().unwrap() {
        for meta in store.images(summary.id).unwrap() {
            let jpeg = store.image_jpeg(summary.id, meta.angle).unwrap().unwrap();
            assert_eq!(
                held.get(&(summary.case_id.clone(), meta.angle.as_str().to_owned())),
                Some(&sha256(&jpeg))
            );
            found += 1;
        }
    }
    assert_eq!(found, 24);
    assert_eq!(store.check_integrity().unwrap(), Vec::<String>::new());
}

#[test]
fn a_damaged_file_is_kept_with_its_log_as_found_and_what_only_the_log_held_is_salvaged() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    build_buffer(&live);
    // A fourth inspection is committed to the log, and the power goes: the files are taken as
    // they are while the store is still open, so nothing is checkpointed into the database.
    let snapshot = dir.path().join("state");
    std::fs::create_dir_all(&snapshot).unwrap();
    let logged: Vec<(PhotoLabel, String)>;
    {
        let mut store = Store::open(&live, CAPS, SystemTime::now()).unwrap();
        let labels = [PhotoLabel::Front, PhotoLabel::Rear];
        let id = support::captured(&mut store, "SALV-LOG", &labels, 20, SystemTime::now());
        logged = store.images(id).unwrap().into_iter().map(|m| (m.angle, m.sha256)).collect();
        for suffix in ["", "-wal", "-shm"] {
            let name = format!("{}{suffix}", store::FILE_NAME);
            std::fs::copy(live.join(&name), snapshot.join(&name)).unwrap();
        }
    }
    let path = snapshot.join(store::FILE_NAME);
    let wal = std::fs::read(format!("{}-wal", path.display())).unwrap();
    let shm = std::fs::read(format!("{}-shm", path.display())).unwrap();
    assert!(wal.len() > 40_000, "the fourth inspection is in the log");
    let damaged = damage(&path, Damage::MiddleOverwritten);

    let store = Store::open(&snapshot, CAPS, SystemTime::now()).unwrap();
    let moved = store.recovery().moved_aside.clone().expect("the damaged file was moved aside");
    assert_eq!(std::fs::read(&moved).unwrap(), damaged, "the database as found");
    assert_eq!(std::fs::read(format!("{}-wal", moved.display())).unwrap(), wal, "its log as found");
    assert_eq!(std::fs::read(format!("{}-shm", moved.display())).unwrap(), shm, "its index as found");
    let fourth = store.list().unwrap().into_iter().find(|i| i.case_id == "SALV-LOG").expect("salvaged");
    let salvaged: Vec<(PhotoLabel, String)> =
        store.images(fourth.id).unwrap().into_iter().map(|m| (m.angle, m.sha256)).collect();
    assert_eq!(salvaged, logged, "what only the log held is salvaged");

    // `check` reads the buffer while its owner has it open, through its log.
    let check = store::check_buffer(&snapshot).unwrap();
    assert_eq!(check.problems, Vec::<String>::new());
    assert_eq!(check.images_checked, store.totals().unwrap().images);
    assert_eq!(check.unacknowledged.len(), 1);
    drop(store);
}

// ---- the daemon ---------------------------------------------------------------------------

/// A Mosquitto of this test's own, killed on drop.
struct Broker {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let (port, child) = support::mosquitto(dir.path(), "allow_anonymous true\n");
        Broker { port, child, _dir: dir }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_daemon_announces_a_salvage_and_stays_in_alert_until_it_is_acknowledged() {
    let _serial = one_at_a_time();
    use capture_kiosk::daemon::Signal;
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    build_buffer(&state);
    damage(&state.join(store::FILE_NAME), Damage::MiddleOverwritten);

    // Subscribed before the daemon starts: the event is not retained.
    let mut options = MqttOptions::new(format!("watcher-{}", fastrand::u32(..)), "127.0.0.1", broker.port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = Client::new(options, 64);
    client.subscribe("capture-kiosk/bay-s/#", QoS::AtLeastOnce).unwrap();
    let (tx, messages) = mpsc::channel::<(String, Value)>();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(("suback".to_owned(), Value::Null));
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    if tx.send((p.topic.clone(), v)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let wait = |want: &dyn Fn(&str, &Value) -> bool| -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (topic, v) = messages.recv_timeout(left).expect("the awaited message never came");
            if want(&topic, &v) {
                return v;
            }
        }
    };
    wait(&|topic, _| topic == "suback");

    let text = format!(
        "bay_id = \"bay-s\"\nstate_dir = \"{}\"\n[buffer]\nmin_free_disk = \"1 MiB\"\n[inspection]\nangles = [\"Front\"]\n\
         [[cameras]]\nid = \"cam\"\nsource = \"synthetic:64x48\"\nangles = [\"Front\"]\n\
         [mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nheartbeat = \"1s\"\n",
        state.display(),
        broker.port
    );
    let daemon = support::capture_only_daemon(capture_kiosk::config::parse(&text, "t").unwrap());

    let event = wait(&|topic, v| topic.ends_with("/events") && v["type"] == "buffer_recovered");
    assert_eq!(event["report"]["inspections_recovered"], 3, "{event:#}");
    assert!(event["report"]["images_recovered"].as_u64().unwrap() >= 22, "{event:#}");
    assert!(event["reason"].as_str().unwrap().contains("damaged"), "{event:#}");
    let alert = wait(&|topic, v| topic.ends_with("/state") && v["lifecycle"] == "alert");
    assert_eq!(alert["alerts"][0]["type"], "buffer_recovered", "{alert:#}");
    assert!(alert["alerts"][0]["reason"].as_str().unwrap().contains("recovered"), "{alert:#}");

    let acknowledged = store::acknowledge_recoveries(&state, SystemTime::now()).unwrap();
    assert_eq!(acknowledged.len(), 1);
    let ready = wait(&|topic, v| topic.ends_with("/state") && v["lifecycle"] == "ready");
    assert_eq!(ready["alerts"], serde_json::json!([]), "{ready:#}");
    daemon.signal(Signal::Terminate);
    daemon.wait().unwrap();
}
