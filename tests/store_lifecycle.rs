//! The buffer's states and their ways out, driven through the real store, the real uploader
//! and the stand-in of the cloud on a clock the test moves: every state is left by upload,
//! retention or the next open on its own, or waits for an operator's retry; an interrupted
//! capture is evidence that gets uploaded; one inspection that keeps failing moves behind the
//! others; and what leaves the buffer leaves an audit row that matches what the cloud got.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capture_kiosk::clock::{Clock, ManualClock};
use capture_kiosk::standin::{StandIn, StandInConfig};
use capture_kiosk::store::{
    images_digest, Caps, Exit, InspectionId, InspectionState, NewImage, NewInspection, PruneRule, Store,
    StoreError, MOVE_BEHIND_AFTER,
};
use capture_kiosk::upload::drain::{drain, uploader, Drained};
use capture_kiosk::upload::Uploader;
use capture_kiosk::vehicle::{CaseId, PhotoLabel};
use support::{captured, cloud, jpeg, secret_file, CAPS};

use InspectionState::{Cancelled, Captured, Capturing, Completed, Failed, Uploading};

const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
const ANGLES: [PhotoLabel; 3] = [PhotoLabel::Front, PhotoLabel::Rear, PhotoLabel::Left];

fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_000_000)
}

/// A buffer, the uploader and the stand-in, on one manual clock.
struct Bay {
    clock: ManualClock,
    standin: StandIn,
    uploader: Uploader,
    store: Option<Store>,
    state_dir: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Bay {
    fn new() -> Bay {
        let clock = ManualClock::starting_at(start());
        let config = StandInConfig::default();
        let standin = StandIn::start(config.clone(), Arc::new(clock.clone())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let secret = secret_file(dir.path(), &config);
        let uploader = uploader(&cloud(&standin.base_url(), &secret), Arc::new(clock.clone()))
            .unwrap()
            .with_jitter(|| 0.5);
        let state_dir = dir.path().join("state");
        let store = Some(Store::open(&state_dir, CAPS, start()).unwrap());
        Bay { clock, standin, uploader, store, state_dir, _dir: dir }
    }

    fn store(&mut self) -> &mut Store {
        self.store.as_mut().expect("the store is open")
    }

    /// Closes the store without finishing anything, as a kill would, and opens it again.
    fn restart(&mut self) {
        drop(self.store.take());
        self.store = Some(Store::open(&self.state_dir, CAPS, self.clock.wall()).unwrap());
    }

    fn upload(&mut self) -> Drained {
        let clock = self.clock.clone();
        let store = self.store.as_mut().expect("the store is open");
        drain(&mut self.uploader, store, Duration::from_secs(3600), &mut |d| clock.advance(d), &mut |_| {})
    }

    fn state(&mut self, id: InspectionId) -> Option<InspectionState> {
        self.store().inspection(id).unwrap().map(|i| i.state)
    }

    /// The one completed session of `case_id`: its photos' sha256s.
    fn delivered(&self, case_id: &str) -> Vec<String> {
        let done: Vec<_> =
            self.standin.sessions().into_iter().filter(|s| s.case_id == case_id && s.completed).collect();
        assert_eq!(done.len(), 1, "{case_id} completed once: {done:#?}");
        done[0].photos.iter().map(|p| p.sha256.clone()).collect()
    }
}

/// Begins an inspection of [`ANGLES`] and stores images of the first `images` angles.
fn capturing(store: &mut Store, case_id: &str, images: usize, now: SystemTime) -> InspectionId {
    let case = CaseId::parse(case_id).unwrap();
    let id = store
        .begin_inspection(
            &NewInspection { case_id: &case, vehicle: None, angles: &ANGLES, expected_image_bytes: 50_000 },
            now,
        )
        .unwrap();
    for (i, angle) in ANGLES.iter().take(images).enumerate() {
        let bytes = jpeg(id.0 as u64 * 10 + i as u64, 30);
        store
            .add_image(
                id,
                &NewImage {
                    angle: *angle,
                    camera: "cam",
                    captured_at: now,
                    source_width: 4032,
                    source_height: 3024,
                    source_bytes: 4 << 20,
                    width: 1920,
                    height: 1440,
                    jpeg: &bytes,
                },
            )
            .unwrap();
    }
    id
}

#[test]
fn every_state_has_an_exit_that_upload_retention_the_next_open_or_an_operator_takes() {
    let mut bay = Bay::new();
    let now = bay.clock.wall();
    let store = bay.store();
    // One inspection in every state, holding images or not where that matters.
    let capturing_some = capturing(store, "CAPTURING-SOME", 2, now);
    let capturing_none = capturing(store, "CAPTURING-NONE", 0, now);
    let captured_one = captured(store, "CAPTURED", &ANGLES, 20, now);
    let uploading = captured(store, "UPLOADING", &ANGLES, 20, now);
    store.set_state(uploading, Uploading, None, now).unwrap();
    let completed = captured(store, "COMPLETED", &ANGLES, 20, now);
    store.set_state(completed, Uploading, None, now).unwrap();
    store.open_session(completed, "S-COMPLETED").unwrap();
    store.set_state(completed, Completed, None, now).unwrap();
    let failed_images = captured(store, "FAILED-IMAGES", &ANGLES, 20, now);
    store.set_state(failed_images, Failed, Some("the cloud refused it: 422"), now).unwrap();
    let cancelled_images = captured(store, "CANCELLED-IMAGES", &ANGLES, 20, now);
    store.cancel(cancelled_images, "the operator cancelled it", now).unwrap();
    let failed_none = capturing(store, "FAILED-NONE", 0, now);
    store.record_angle_failure(failed_none, PhotoLabel::Front, "camera gone", now).unwrap();
    assert_eq!(store.finish_capture(failed_none, now).unwrap(), Failed);
    let cancelled_none = capturing(store, "CANCELLED-NONE", 0, now);
    store.cancel(cancelled_none, "the operator cancelled it", now).unwrap();

    let all = [
        (capturing_some, Capturing, true),
        (capturing_none, Capturing, false),
        (captured_one, Captured, true),
        (uploading, Uploading, true),
        (completed, Completed, true),
        (failed_images, Failed, true),
        (cancelled_images, Cancelled, true),
        (failed_none, Failed, false),
        (cancelled_none, Cancelled, false),
    ];
    for state in InspectionState::ALL {
        assert!(all.iter().any(|(_, s, _)| *s == state), "the walk covers {state}");
    }
    for (id, state, images) in all {
        assert_eq!(bay.state(id), Some(state), "inspection {id} set up");
        let operator = images && matches!(state, Failed | Cancelled);
        assert_eq!(
            matches!(state.exit(images), Exit::Operator(_)),
            operator,
            "{state} holding images: {images}"
        );
    }

    // The kiosk dies mid-capture; its next open closes the captures as evidence.
    bay.restart();
    let recovered = bay.store().recovery().interrupted.clone();
    assert_eq!(recovered, vec![capturing_some, capturing_none]);
    assert_eq!(bay.state(capturing_some), Some(Captured), "an interrupted capture is evidence");
    let summary = bay.store().inspection(capturing_some).unwrap().unwrap();
    assert_eq!(
        summary.failed_angles,
        vec![(PhotoLabel::Left, "the kiosk stopped during capture".to_owned())]
    );
    assert_eq!(summary.reason, None);
    let nothing = bay.store().inspection(capturing_none).unwrap().unwrap();
    assert_eq!(nothing.state, Failed, "nothing to deliver: failed, with a reason");
    assert_eq!(
        nothing.reason.as_deref(),
        Some(
            "no angle was captured (Front: the kiosk stopped during capture; Rear: the kiosk stopped \
             during capture; Left: the kiosk stopped during capture)"
        )
    );

    // Upload takes what is captured or was being uploaded, the interrupted one included.
    let drained = bay.upload();
    assert_eq!(drained.completed, vec![capturing_some, captured_one, uploading], "oldest first");
    assert_eq!(bay.delivered("CAPTURING-SOME").len(), 2, "what the interrupted capture holds");

    // Retention prunes what the cloud completed and what holds nothing, when its time comes,
    // and never evidence the cloud does not have.
    let before: Vec<InspectionId> = bay.store().list().unwrap().iter().map(|i| i.id).collect();
    assert_eq!(before.len(), 9, "nothing has left yet");
    bay.clock.advance(RETENTION + Duration::from_secs(1));
    let cutoff = bay.clock.wall() - RETENTION;
    assert_eq!(bay.store().prune_completed(cutoff).unwrap(), 7);
    let left: Vec<InspectionId> = bay.store().list().unwrap().iter().map(|i| i.id).collect();
    assert_eq!(left, vec![failed_images, cancelled_images], "waiting for an operator");

    // The operator's retry queues failed and cancelled evidence again.
    let later = bay.clock.wall();
    assert_eq!(bay.store().retry(failed_images, later).unwrap(), Failed);
    assert_eq!(bay.store().retry(cancelled_images, later).unwrap(), Cancelled);
    let drained = bay.upload();
    assert_eq!(drained.completed, vec![failed_images, cancelled_images]);
    bay.clock.advance(RETENTION + Duration::from_secs(1));
    let cutoff = bay.clock.wall() - RETENTION;
    assert_eq!(bay.store().prune_completed(cutoff).unwrap(), 2);
    assert!(bay.store().list().unwrap().is_empty(), "every inspection found its way out");

    let history = bay.store().pruned_history().unwrap();
    assert_eq!(history.len(), 9);
    assert!(history.iter().all(|p| p.rule == PruneRule::Retention));
    for p in &history {
        match p.state {
            Completed => assert!(p.images > 0 && p.session.is_some(), "{p:?}"),
            Failed | Cancelled => assert_eq!((p.images, p.bytes), (0, 0), "{p:?}"),
            other => panic!("{other} is never pruned: {p:?}"),
        }
    }
    assert_eq!(bay.store().check_integrity().unwrap(), Vec::<String>::new());
}

#[test]
fn retry_takes_failed_or_cancelled_evidence_and_refuses_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), CAPS, start()).unwrap();
    let id = captured(&mut store, "CASE-1", &ANGLES, 10, start());
    for (from, setup) in
        [(Captured, None), (Uploading, Some((Uploading, None))), (Completed, Some((Completed, None)))]
    {
        if let Some((to, reason)) = setup {
            store.set_state(id, to, reason, start()).unwrap();
        }
        let err = store.retry(id, start()).unwrap_err();
        assert!(matches!(err, StoreError::IllegalTransition { .. }), "{from}: {err:?}");
        assert!(err.to_string().contains("only a failed or cancelled inspection can be retried"), "{err}");
    }
    let empty = capturing(&mut store, "CASE-2", 0, start());
    store.cancel(empty, "operator", start()).unwrap();
    let err = store.retry(empty, start()).unwrap_err();
    assert!(err.to_string().contains("it holds no image"), "{err}");
    assert_eq!(store.inspection(empty).unwrap().unwrap().state, Cancelled, "a refused retry changes nothing");
}

#[test]
fn one_inspection_that_keeps_failing_moves_behind_the_others_and_queue_shows_why() {
    let mut bay = Bay::new();
    let now = bay.clock.wall();
    let first = captured(bay.store(), "CASE-STUCK", &ANGLES, 30, now);
    // The cloud answers 503 to the next uploads. The first try fails while the inspection is
    // alone; then another one waits behind it. From then on the uploader sends one inspection
    // at a time (the link failed): the oldest takes the rest of the failures, one try each.
    bay.standin.fail_next_uploads(MOVE_BEHIND_AFTER as usize, 503, Duration::from_secs(5));
    let clock = bay.clock.clone();
    let store = bay.store.as_mut().unwrap();
    let tried = drain(&mut bay.uploader, store, Duration::ZERO, &mut |d| clock.advance(d), &mut |_| {});
    assert!(tried.completed.is_empty());
    assert_eq!(bay.store().upload_state(first).unwrap().attempts, 1);
    let second = captured(bay.store(), "CASE-NEXT", &ANGLES, 30, now);
    assert_eq!(bay.store().next_to_upload().unwrap().map(|i| i.id), Some(first), "oldest first");
    let drained = bay.upload();
    assert_eq!(drained.completed, vec![second, first], "the stuck one went behind, then through");
    let stuck = bay.store().upload_state(first).unwrap();
    assert_eq!(stuck.attempts, MOVE_BEHIND_AFTER);
    assert_eq!(stuck.moved_behind, 1);
    assert_eq!(bay.store().upload_state(second).unwrap().moved_behind, 0);
}

#[test]
fn a_failing_inspection_alone_in_the_queue_stays_first_and_the_order_is_by_age_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), CAPS, start()).unwrap();
    let a = captured(&mut store, "CASE-A", &ANGLES[..1], 5, start());
    for _ in 0..MOVE_BEHIND_AFTER * 2 {
        store.record_upload_attempt(a, Some("the cloud answered HTTP 503")).unwrap();
    }
    assert_eq!(store.upload_state(a).unwrap().moved_behind, 0, "nobody to let through");
    let b = captured(&mut store, "CASE-B", &ANGLES[..1], 5, start());
    let c = captured(&mut store, "CASE-C", &ANGLES[..1], 5, start());
    assert_eq!(store.next_to_upload().unwrap().map(|i| i.id), Some(a));
    // Its next failed try moves it behind both; then b fails its turn and goes behind a.
    store.record_upload_attempt(a, Some("timeout")).unwrap();
    assert_eq!(store.next_to_upload().unwrap().map(|i| i.id), Some(b));
    for _ in 0..MOVE_BEHIND_AFTER {
        store.record_upload_attempt(b, Some("timeout")).unwrap();
    }
    let order = |store: &mut Store| {
        let mut seen = Vec::new();
        while let Some(next) = store.next_to_upload().unwrap() {
            seen.push(next.id);
            store.set_state(next.id, Uploading, None, start()).unwrap();
            store.set_state(next.id, Completed, None, start()).unwrap();
        }
        seen
    };
    assert_eq!(order(&mut store), vec![c, a, b]);
    let a_state = store.upload_state(a).unwrap();
    assert_eq!((a_state.attempts, a_state.moved_behind), (MOVE_BEHIND_AFTER * 2 + 1, 1));
    assert_eq!(a_state.last_error.as_deref(), Some("timeout"));
}

#[test]
fn the_audit_trail_names_what_was_delivered_and_pruned_and_survives_a_reopen() {
    let mut bay = Bay::new();
    let now = bay.clock.wall();
    let id = captured(bay.store(), "CASE-AUDIT", &ANGLES, 40, now);
    let images = bay.store().images(id).unwrap();
    bay.upload();
    let completed_at = bay.store().inspection(id).unwrap().unwrap().updated_at;
    let session = bay.store().upload_state(id).unwrap().session.expect("the session is kept");
    bay.clock.advance(RETENTION * 2);
    let cutoff = bay.clock.wall() - RETENTION;
    assert_eq!(bay.store().prune_completed(cutoff).unwrap(), 1);
    bay.restart();

    let history = bay.store().pruned_history().unwrap();
    assert_eq!(history.len(), 1);
    let record = &history[0];
    assert_eq!((record.inspection_id, record.case_id.as_str()), (id, "CASE-AUDIT"));
    assert_eq!(record.state, Completed);
    assert_eq!(record.session.as_deref(), Some(session.as_str()));
    assert_eq!(record.completed_at, completed_at);
    assert_eq!(record.images, 3);
    assert_eq!(record.bytes, images.iter().map(|m| m.bytes).sum::<u64>());
    assert_eq!(record.rule, PruneRule::Retention);
    // The digest is the same whether taken from the buffer or from what the cloud holds.
    let ours: Vec<&str> = images.iter().map(|m| m.sha256.as_str()).collect();
    assert_eq!(record.images_sha256, images_digest(&ours));
    assert_eq!(record.images_sha256, images_digest(&bay.delivered("CASE-AUDIT")));
}

#[test]
fn a_bay_whose_cloud_keeps_up_never_refuses_a_car_for_what_it_already_delivered() {
    // max_bytes holds about three inspections; retention is a week, so only space pressure
    // can make room. Thirty cars in a row, each uploaded before the next arrives.
    let mut bay = Bay::new();
    let photos: Vec<Vec<u8>> = (0..3).map(|i| jpeg(900 + i, 20)).collect();
    let largest = photos.iter().map(|p| p.len() as u64).max().unwrap();
    let per_inspection: u64 = photos.iter().map(|p| p.len() as u64).sum();
    let caps = Caps { max_bytes: largest * 3 * 3 + largest * 3 / 2, min_free_disk: 0 };
    bay.store().set_caps(caps);
    let car = |bay: &mut Bay, case_id: &str| -> Result<InspectionId, StoreError> {
        let now = bay.clock.wall();
        let case = CaseId::parse(case_id).unwrap();
        let new =
            NewInspection { case_id: &case, vehicle: None, angles: &ANGLES, expected_image_bytes: largest };
        let id = bay.store().begin_inspection(&new, now)?;
        for (angle, bytes) in ANGLES.iter().zip(&photos) {
            let image = NewImage {
                angle: *angle,
                camera: "cam",
                captured_at: now,
                source_width: 4032,
                source_height: 3024,
                source_bytes: 4 << 20,
                width: 1920,
                height: 1440,
                jpeg: bytes,
            };
            bay.store().add_image(id, &image).unwrap();
        }
        bay.store().finish_capture(id, now).unwrap();
        Ok(id)
    };
    let mut ids = Vec::new();
    for n in 0..30 {
        bay.clock.advance(Duration::from_secs(600));
        let id = car(&mut bay, &format!("CASE-{n}")).unwrap_or_else(|e| panic!("car {n} refused: {e}"));
        assert_eq!(bay.upload().completed, vec![id]);
        ids.push(id);
        let totals = bay.store().totals().unwrap();
        assert!(totals.bytes <= caps.max_bytes, "car {n}: {} bytes buffered", totals.bytes);
        if n >= 2 {
            assert!(totals.bytes >= per_inspection * 2, "car {n}: only what was needed was pruned");
        }
    }
    let history = bay.store().pruned_history().unwrap();
    assert!(history.len() >= 26, "{} pruned", history.len());
    assert!(history.iter().all(|p| p.rule == PruneRule::Space && p.state == Completed), "{history:#?}");
    let pruned: Vec<InspectionId> = history.iter().map(|p| p.inspection_id).collect();
    assert_eq!(pruned, ids[..pruned.len()].to_vec(), "oldest first");

    // Evidence the cloud does not have is never pruned: with no upload, the buffer fills with
    // captured inspections and then refuses, keeping every one of them.
    let mut kept = Vec::new();
    let refused = loop {
        match car(&mut bay, &format!("OFFLINE-{}", kept.len())) {
            Ok(id) => kept.push(id),
            Err(e) => break e,
        }
        assert!(kept.len() < 10, "the cap must bind");
    };
    assert!(matches!(refused, StoreError::Full { .. }), "{refused:?}");
    assert!(!kept.is_empty());
    for id in &kept {
        assert_eq!(bay.state(*id), Some(Captured), "not delivered, so kept");
    }
    assert_eq!(bay.store().totals().unwrap().awaiting_upload, kept.len() as u64);
    assert_eq!(bay.store().check_integrity().unwrap(), Vec::<String>::new());
}

#[test]
fn only_a_failed_inspection_that_holds_images_asks_an_operator_for_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let now = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let mut store = Store::open(dir.path(), CAPS, now).unwrap();
    // Refused by the cloud: it holds images and waits for a retry.
    let refused = captured(&mut store, "CASE-REFUSED", &[PhotoLabel::Front], 8, now);
    store.set_state(refused, Failed, Some("the cloud refused it"), now).unwrap();
    // Cut short before its first frame: nothing to send.
    let case = CaseId::parse("CASE-EMPTY").unwrap();
    let empty = store
        .begin_inspection(
            &capture_kiosk::store::NewInspection {
                case_id: &case,
                vehicle: None,
                angles: &[PhotoLabel::Rear],
                expected_image_bytes: 8 << 10,
            },
            now,
        )
        .unwrap();
    store.set_state(empty, Failed, Some("the kiosk stopped during capture"), now).unwrap();
    assert_eq!(store.observe().unwrap().failed, 1);
    store.retry(refused, now).unwrap();
    assert_eq!(store.observe().unwrap().failed, 0);
}
