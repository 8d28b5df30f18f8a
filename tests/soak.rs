//! Thirty days of a bay's life in a few seconds: 100 inspections a day, the cloud away a fifth
//! of the time in random spells, the retention rule applied every hour, and `max_bytes` set
//! below what seven days of delivered inspections would take, so that the caps bind. Time is a
//! `ManualClock` the test moves; the buffer is a real SQLite file, the cloud the strict
//! stand-in on loopback (unreachable while a spell lasts: every connection is reset).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capture_kiosk::clock::{Clock, ManualClock};
use capture_kiosk::standin::{StandIn, StandInConfig};
use capture_kiosk::store::{Caps, InspectionId, InspectionState, NewImage, NewInspection, Store, StoreError};
use capture_kiosk::upload::{Event, Pump};
use capture_kiosk::vehicle::{CaseId, PhotoLabel};
use support::{cloud, jpeg, secret_file};

const DAYS: u64 = 30;
const PER_DAY: u64 = 100;
const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
const HOUSEKEEPING: Duration = Duration::from_secs(3600);
/// About 2 KiB per image, 8 images per inspection.
const IMAGE_KIB: usize = 2;

/// A day of the cloud's life: spells away of 10 minutes to 8 hours, about a fifth of the time.
fn outages(rng: &mut fastrand::Rng, total: Duration) -> Vec<(Duration, Duration)> {
    let mut spells = Vec::new();
    let mut at = Duration::from_secs(rng.u64(3600..6 * 3600));
    while at < total {
        let length = Duration::from_secs(rng.u64(600..8 * 3600));
        spells.push((at, (at + length).min(total)));
        // Up time four times as long as a spell on average keeps the cloud away a fifth of the time.
        at += length + Duration::from_secs(rng.u64(4 * 600..4 * 8 * 3600));
    }
    spells
}

fn away(spells: &[(Duration, Duration)], t: Duration) -> bool {
    spells.iter().any(|(from, to)| *from <= t && t < *to)
}

#[test]
fn thirty_days_with_a_flaky_cloud_stay_bounded_and_deliver_everything_once() {
    let start = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let clock = ManualClock::starting_at(start);
    let standin = StandIn::start(StandInConfig::default(), Arc::new(clock.clone())).unwrap();
    // tmpfs keeps 40,000 fsync'd commits quick; the file is a real SQLite buffer all the same.
    let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
    let dir = tempfile::tempdir_in(base).unwrap();
    let secret = secret_file(dir.path(), standin.config());
    let cloud = cloud(&standin.base_url(), &secret);
    // A day and a half of pending inspections fits; a week of delivered ones does not.
    let per_inspection = 8 * (IMAGE_KIB as u64 + 1) * 1024;
    let caps = Caps { max_bytes: 150 * per_inspection, min_free_disk: 0 };
    let mut store = Store::open(&dir.path().join("state"), caps, start).unwrap();
    let mut uploader =
        capture_kiosk::upload::drain::uploader(&cloud, Arc::new(clock.clone())).unwrap().with_jitter(|| 0.5);

    let mut rng = fastrand::Rng::with_seed(0x5eed_2026);
    let total = Duration::from_secs(DAYS * 24 * 3600);
    let spells = outages(&mut rng, total);
    let away_total: Duration = spells.iter().map(|(a, b)| *b - *a).sum();
    let share = away_total.as_secs_f64() / total.as_secs_f64();
    assert!((0.12..0.3).contains(&share), "the cloud is away {:.0} % of the time", share * 100.0);

    let interval = Duration::from_secs(24 * 3600 / PER_DAY);
    let mut next_arrival = Duration::ZERO;
    let mut next_housekeeping = HOUSEKEEPING;
    let mut cloud_away = false;
    let mut captured: BTreeMap<String, InspectionId> = BTreeMap::new();
    let mut refused_while_reachable = Vec::new();
    let mut refused_while_away = 0u64;
    let mut uploaded: BTreeMap<InspectionId, usize> = BTreeMap::new();
    let mut peak_bytes = 0u64;
    let mut peak_file = 0u64;
    let mut n = 0u64;
    let page_size = 4096u64;

    let elapsed = |clock: &ManualClock| clock.wall().duration_since(start).unwrap();
    while elapsed(&clock) < total {
        let t = elapsed(&clock);
        let should_be_away = away(&spells, t);
        if should_be_away != cloud_away {
            cloud_away = should_be_away;
            if cloud_away {
                standin.reset_next_requests(usize::MAX, None);
            } else {
                standin.clear_faults();
                uploader.wake();
            }
        }
        if t >= next_housekeeping {
            store.prune_completed(clock.wall() - RETENTION).unwrap();
            next_housekeeping += HOUSEKEEPING;
        }
        if t >= next_arrival {
            n += 1;
            let case = format!("SOAK-{n:05}");
            match capture(&mut store, &case, n, clock.wall()) {
                Ok(id) => {
                    captured.insert(case, id);
                }
                Err(StoreError::Full { refusal, .. }) if cloud_away => {
                    refused_while_away += 1;
                    let _ = refusal;
                }
                Err(StoreError::Full { refusal, .. }) => {
                    refused_while_reachable.push((case, refusal.to_string()))
                }
                Err(e) => panic!("inspection {case} could not be stored: {e}"),
            }
            next_arrival += interval;
        }
        let totals = store.totals().unwrap();
        peak_bytes = peak_bytes.max(totals.bytes);
        peak_file = peak_file.max(store.page_count().unwrap() * page_size);

        // Upload until the uploader asks to wait or has nothing to do; then move time on to
        // the next thing that happens.
        let mut wait = Duration::MAX;
        for _ in 0..64 {
            let mut events = |e: Event| {
                if let Event::Uploaded { id, .. } = e {
                    *uploaded.entry(id).or_default() += 1;
                }
            };
            match uploader.pump(&mut store, &mut events) {
                Pump::Progress => continue,
                Pump::Idle => break,
                Pump::Wait(d, _) => {
                    wait = d;
                    break;
                }
            }
        }
        let t = elapsed(&clock);
        let next_spell_edge =
            spells.iter().flat_map(|(a, b)| [*a, *b]).filter(|edge| *edge > t).min().unwrap_or(total);
        let until = next_arrival.min(next_housekeeping).min(next_spell_edge).min(total);
        let step = until.saturating_sub(t).min(wait).max(Duration::from_millis(1));
        clock.advance(step);
    }

    // The cloud stays up at the end: everything left goes.
    standin.clear_faults();
    uploader.wake();
    for _ in 0..10_000 {
        let mut events = |e: Event| {
            if let Event::Uploaded { id, .. } = e {
                *uploaded.entry(id).or_default() += 1;
            }
        };
        match uploader.pump(&mut store, &mut events) {
            Pump::Idle => break,
            Pump::Progress => {}
            Pump::Wait(d, _) => clock.advance(d),
        }
    }

    let file_bound = caps.max_bytes * 2 + (4 << 20);
    println!(
        "soak: {n} inspections in {DAYS} days, cloud away {:.0} % in {} spells; {} refused while away, \
         {} while reachable; peak buffer {} bytes of max_bytes {}, peak file {} bytes",
        share * 100.0,
        spells.len(),
        refused_while_away,
        refused_while_reachable.len(),
        peak_bytes,
        caps.max_bytes,
        peak_file
    );
    assert!(
        refused_while_reachable.is_empty(),
        "{} inspections refused while the cloud was reachable, first: {:?}",
        refused_while_reachable.len(),
        refused_while_reachable.first()
    );
    assert!(peak_bytes <= caps.max_bytes, "buffer bytes {peak_bytes} over max_bytes {}", caps.max_bytes);
    assert!(peak_file <= file_bound, "buffer file {peak_file} bytes, bound {file_bound}");

    // Nothing stuck: every inspection still in the buffer is completed.
    let stuck: Vec<_> = store
        .list()
        .unwrap()
        .into_iter()
        .filter(|i| i.state != InspectionState::Completed)
        .map(|i| (i.case_id, i.state, i.reason))
        .collect();
    assert!(
        stuck.is_empty(),
        "{} inspections not completed at the end: {:?}",
        stuck.len(),
        &stuck[..stuck.len().min(5)]
    );

    // Every captured inspection was completed by the cloud exactly once, with all its images.
    let mut completed_per_case: BTreeMap<String, usize> = BTreeMap::new();
    for s in standin.sessions() {
        assert!(s.completions <= 1, "session {} completed {} times", s.session, s.completions);
        if s.completed {
            assert_eq!(s.photos.len(), 8, "session {} of {} holds every image", s.session, s.case_id);
            assert!(s.photos.iter().all(|p| p.stores == 1), "session {}: an image stored twice", s.session);
            *completed_per_case.entry(s.case_id.clone()).or_default() += 1;
        }
    }
    let cases: BTreeSet<&String> = captured.keys().collect();
    for case in &cases {
        assert_eq!(completed_per_case.get(*case).copied(), Some(1), "{case} completed exactly once");
    }
    assert_eq!(completed_per_case.len(), cases.len(), "no session for a case the bay never captured");
    for (id, count) in &uploaded {
        assert_eq!(*count, 1, "inspection {id} reported uploaded {count} times");
    }
    assert_eq!(uploaded.len(), captured.len());
    standin.stop();
}

fn capture(store: &mut Store, case: &str, seed: u64, now: SystemTime) -> Result<InspectionId, StoreError> {
    let case_id = CaseId::parse(case).unwrap();
    let angles = PhotoLabel::EXTERIOR;
    let id = store.begin_inspection(
        &NewInspection {
            case_id: &case_id,
            vehicle: None,
            angles: &angles,
            expected_image_bytes: (IMAGE_KIB as u64 + 1) * 1024,
        },
        now,
    )?;
    for (i, angle) in angles.iter().enumerate() {
        let bytes = jpeg(seed * 16 + i as u64, IMAGE_KIB);
        store.add_image(
            id,
            &NewImage {
                angle: *angle,
                camera: "cam",
                captured_at: now,
                source_width: 4032,
                source_height: 3024,
                source_bytes: 4 << 20,
                width: 64,
                height: 48,
                jpeg: &bytes,
            },
        )?;
    }
    store.finish_capture(id, now)?;
    Ok(id)
}
