//! The buffer's hot reads on a big buffer: picking the next inspection to upload (the
//! uploader, every pump) and the totals behind every MQTT `state`, with 10,000 images waiting
//! and 50,000 completed inspections of history (8 small images each) still in the file.
//! Goals: the pick under 1 ms, the totals under 5 ms. Also shows what the pick costs when it
//! lists every inspection instead, as it used to.
//!
//! `cargo bench --bench store_queue` (add `-- --runs N`, `--completed N`, `--waiting N`). Run
//! without `--bench` (as `cargo test --all-targets` does) it makes one small pass.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capture_kiosk::store::{Caps, InspectionState, Store, FILE_NAME};

const ANGLES: [&str; 8] =
    ["Front", "Front_Left", "Left", "Rear_Left", "Rear", "Rear_Right", "Right", "Front_Right"];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    // Without `--bench` (as `cargo test --all-targets` runs it) one small pass proves it works.
    let full = args.iter().any(|a| a == "--bench");
    let runs = arg("--runs", if full { 200 } else { 5 });
    let completed = arg("--completed", if full { 50_000 } else { 500 });
    let waiting_images = arg("--waiting", if full { 10_000 } else { 80 });
    let waiting = waiting_images.div_ceil(ANGLES.len());

    let dir = tempfile::tempdir().expect("a temporary directory");
    let caps = Caps { max_bytes: u64::MAX, min_free_disk: 0 };
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    drop(Store::open(dir.path(), caps, now).expect("a new buffer"));
    let started = Instant::now();
    fill(&dir.path().join(FILE_NAME), completed, waiting);
    let store = Store::open(dir.path(), caps, SystemTime::now()).expect("the filled buffer opens");
    let totals = store.totals().expect("totals");
    println!(
        "buffer: {} inspections ({completed} completed, {waiting} waiting), {} images, {:.1} MiB file, built in {:.1} s",
        totals.inspections,
        totals.images,
        std::fs::metadata(dir.path().join(FILE_NAME)).map_or(0, |m| m.len()) as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(totals.awaiting_upload, waiting as u64);

    let pick = measure(runs, || {
        let next = store.next_to_upload().expect("next").expect("something waits");
        assert_eq!(next.state, InspectionState::Captured);
    });
    let sums = measure(runs, || {
        store.totals().expect("totals");
    });
    let full = measure(runs, || {
        store.would_refuse(8, 800_000).expect("would_refuse");
    });
    let old_pick = measure(runs.min(10), || {
        let all = store.list().expect("list");
        all.into_iter().find(|i| matches!(i.state, InspectionState::Captured | InspectionState::Uploading));
    });
    // The totals as they were counted before the counters: every row, every time.
    let raw = rusqlite::Connection::open(dir.path().join(FILE_NAME)).expect("the buffer opens");
    let old_sums = measure(runs.min(20), || {
        raw.query_row(
            "SELECT (SELECT COUNT(*) FROM inspections), (SELECT COUNT(*) FROM images),
                    (SELECT COALESCE(SUM(bytes), 0) FROM images),
                    (SELECT COUNT(*) FROM inspections WHERE state IN ('captured', 'uploading')),
                    (SELECT MIN(created_at) FROM inspections)",
            [],
            |r| r.get::<_, i64>(1),
        )
        .expect("old totals");
    });
    report("next to upload (Store::next_to_upload)", &pick, Duration::from_millis(1));
    report("totals for state (Store::totals)", &sums, Duration::from_millis(5));
    report("buffer.full for state (Store::would_refuse)", &full, Duration::from_millis(5));
    println!(
        "for comparison, picking by listing every inspection: median {:.3} ms; totals by counting rows: median {:.3} ms",
        median(&old_pick).as_secs_f64() * 1000.0,
        median(&old_sums).as_secs_f64() * 1000.0
    );
}

/// Writes the history and the queue straight into the file in one transaction (the triggers
/// keep the counters as the store would).
fn fill(path: &std::path::Path, completed: usize, waiting: usize) {
    let mut conn = rusqlite::Connection::open(path).expect("the buffer opens");
    conn.pragma_update(None, "foreign_keys", "ON").expect("pragma");
    let tx = conn.transaction().expect("a transaction");
    {
        let mut inspection = tx
            .prepare(
                "INSERT INTO inspections (case_id, angles, state, session, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            )
            .expect("insert inspection");
        let mut image = tx
            .prepare(
                "INSERT INTO images (inspection_id, angle, camera, captured_at, source_width, source_height,
                                     source_bytes, width, height, bytes, sha256, jpeg)
                 VALUES (?1, ?2, 'cam', ?3, 4032, 3024, 4000000, 1920, 1440, 64, ?4, zeroblob(64))",
            )
            .expect("insert image");
        let angles = serde_json::to_string(&ANGLES).expect("labels");
        for n in 0..completed + waiting {
            let (state, session) =
                if n < completed { ("completed", Some(format!("S-{n}"))) } else { ("captured", None) };
            let at = 1_700_000_000_000i64 + n as i64 * 60_000;
            inspection
                .execute(rusqlite::params![format!("CASE-{n}"), angles, state, session, at])
                .expect("inspection");
            let id = tx.last_insert_rowid();
            for angle in ANGLES {
                image.execute(rusqlite::params![id, angle, at, format!("{id:064x}")]).expect("image");
            }
        }
    }
    tx.commit().expect("commit");
}

fn measure(runs: usize, mut f: impl FnMut()) -> Vec<Duration> {
    f(); // warm the page cache and the statement cache
    (0..runs.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn report(what: &str, times: &[Duration], goal: Duration) {
    let mut sorted = times.to_vec();
    sorted.sort();
    let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
    let med = median(times);
    println!(
        "{what}: median {:.3} ms, p99 {:.3} ms, goal < {:.0} ms: {}",
        med.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0,
        goal.as_secs_f64() * 1000.0,
        if med < goal { "met" } else { "MISSED" }
    );
}
