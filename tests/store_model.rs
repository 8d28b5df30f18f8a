//! A model check of the buffer (vector's `model_check`): random sequences of begin, add
//! image, fail angle, finish, cancel, set state, prune and close-and-reopen run against a
//! real SQLite file and against a plain in-memory model; after every step both must agree on
//! each call's outcome, on `list()` and on `totals()` (kept by counters in the file, so this
//! also checks them), and the next inspection to upload.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capture_kiosk::store::{
    Caps, InspectionId, InspectionState, InspectionSummary, NewImage, NewInspection, Store, StoreError,
    Totals,
};
use capture_kiosk::vehicle::{CaseId, PhotoLabel};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use InspectionState::{Cancelled, Captured, Capturing, Completed, Failed, Uploading};

const LABELS: [PhotoLabel; 4] = [PhotoLabel::Front, PhotoLabel::Rear, PhotoLabel::Left, PhotoLabel::Right];
/// Small enough that the byte cap refuses now and then.
const CAPS: Caps = Caps { max_bytes: 500, min_free_disk: 0 };

#[derive(Debug, Clone)]
enum Op {
    Begin {
        case: u8,
        angles: Vec<usize>,
        expected: u64,
    },
    AddImage {
        pick: usize,
        angle: usize,
        len: usize,
    },
    FailAngle {
        pick: usize,
        angle: usize,
        reason: u8,
    },
    Finish {
        pick: usize,
    },
    Cancel {
        pick: usize,
    },
    /// `to` below 6 is any state; from 6 on, a state that may follow the current one.
    SetState {
        pick: usize,
        to: usize,
        reason: Option<u8>,
    },
    Prune {
        back: u64,
    },
    Reopen,
}

/// A sequence that starts with a `Begin`, so that most steps have an inspection to act on.
fn ops() -> impl Strategy<Value = Vec<Op>> {
    (begin(), proptest::collection::vec(op(), 0..48)).prop_map(|(first, rest)| {
        let mut ops = vec![first];
        ops.extend(rest);
        ops
    })
}

fn begin() -> impl Strategy<Value = Op> {
    (0u8..10, proptest::sample::subsequence(vec![0usize, 1, 2, 3], 1..=3), 0u64..250)
        .prop_map(|(case, angles, expected)| Op::Begin { case, angles, expected })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => begin(),
        5 => (0usize..8, 0usize..4, 1usize..100).prop_map(|(pick, angle, len)| Op::AddImage { pick, angle, len }),
        2 => (0usize..8, 0usize..4, 0u8..3).prop_map(|(pick, angle, reason)| Op::FailAngle { pick, angle, reason }),
        2 => (0usize..8).prop_map(|pick| Op::Finish { pick }),
        1 => (0usize..8).prop_map(|pick| Op::Cancel { pick }),
        4 => (0usize..8, 0usize..12, proptest::option::of(0u8..3))
            .prop_map(|(pick, to, reason)| Op::SetState { pick, to, reason }),
        1 => (0u64..20).prop_map(|back| Op::Prune { back }),
        1 => Just(Op::Reopen),
    ]
}

/// How a call ended, in terms both sides can produce.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    Id(InspectionId),
    State(InspectionState),
    Pruned(u64),
    Full,
    Unknown,
    Illegal,
    NotCapturing,
    AlreadyStored,
    NotRequested,
}

fn outcome_of_error(e: StoreError) -> Outcome {
    match e {
        StoreError::Full { .. } => Outcome::Full,
        StoreError::UnknownInspection { .. } => Outcome::Unknown,
        StoreError::IllegalTransition { .. } => Outcome::Illegal,
        StoreError::NotCapturing { .. } => Outcome::NotCapturing,
        StoreError::AngleAlreadyStored { .. } => Outcome::AlreadyStored,
        StoreError::AngleNotRequested { .. } => Outcome::NotRequested,
        other => panic!("the store failed in a way the model never does: {other}"),
    }
}

#[derive(Debug, Clone)]
struct ModelInspection {
    case_id: String,
    state: InspectionState,
    reason: Option<String>,
    angles: Vec<PhotoLabel>,
    images: Vec<(PhotoLabel, u64)>,
    failed: Vec<(PhotoLabel, String)>,
    created_at: SystemTime,
    updated_at: SystemTime,
}

/// The buffer as a map, written from the module doc, not from the code.
#[derive(Debug, Default)]
struct Model {
    next_id: i64,
    inspections: BTreeMap<i64, ModelInspection>,
}

fn legal(from: InspectionState, to: InspectionState) -> bool {
    matches!(
        (from, to),
        (Capturing, Captured | Failed | Cancelled)
            | (Captured, Uploading | Failed | Cancelled)
            | (Uploading, Completed | Captured | Failed)
            | (Failed | Cancelled, Captured)
    )
}

impl Model {
    fn new() -> Model {
        Model { next_id: 1, inspections: BTreeMap::new() }
    }

    fn bytes_of(&self, pick: impl Fn(&ModelInspection) -> bool) -> u64 {
        self.inspections.values().filter(|i| pick(i)).flat_map(|i| &i.images).map(|(_, b)| b).sum()
    }

    fn begin(&mut self, case_id: &str, angles: &[PhotoLabel], expected: u64, now: SystemTime) -> Outcome {
        let needed = expected * angles.len() as u64;
        let buffered = self.bytes_of(|_| true);
        if buffered + needed > CAPS.max_bytes {
            // Delivered inspections make room, oldest completion first, if they can.
            let completed = self.bytes_of(|i| i.state == Completed);
            if buffered - completed + needed > CAPS.max_bytes {
                return Outcome::Full;
            }
            while self.bytes_of(|_| true) + needed > CAPS.max_bytes {
                let oldest = self
                    .inspections
                    .iter()
                    .filter(|(_, i)| i.state == Completed)
                    .min_by_key(|(id, i)| (i.updated_at, **id))
                    .map(|(id, _)| *id)
                    .expect("enough completed bytes to prune");
                self.inspections.remove(&oldest);
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.inspections.insert(
            id,
            ModelInspection {
                case_id: case_id.to_owned(),
                state: Capturing,
                reason: None,
                angles: angles.to_vec(),
                images: vec![],
                failed: vec![],
                created_at: now,
                updated_at: now,
            },
        );
        Outcome::Id(InspectionId(id))
    }

    /// The checks shared by adding an image and recording a failure.
    fn recordable(&mut self, id: InspectionId, angle: PhotoLabel) -> Result<&mut ModelInspection, Outcome> {
        let i = self.inspections.get_mut(&id.0).ok_or(Outcome::Unknown)?;
        if i.state != Capturing {
            return Err(Outcome::NotCapturing);
        }
        if !i.angles.contains(&angle) {
            return Err(Outcome::NotRequested);
        }
        if i.images.iter().any(|(a, _)| *a == angle) {
            return Err(Outcome::AlreadyStored);
        }
        Ok(i)
    }

    fn add_image(&mut self, id: InspectionId, angle: PhotoLabel, len: u64) -> Outcome {
        match self.recordable(id, angle) {
            Err(o) => o,
            Ok(i) => {
                i.images.push((angle, len));
                i.failed.retain(|(a, _)| *a != angle);
                Outcome::Ok
            }
        }
    }

    fn fail_angle(&mut self, id: InspectionId, angle: PhotoLabel, reason: &str) -> Outcome {
        match self.recordable(id, angle) {
            Err(o) => o,
            Ok(i) => {
                match i.failed.iter_mut().find(|(a, _)| *a == angle) {
                    Some(f) => f.1 = reason.to_owned(),
                    None => i.failed.push((angle, reason.to_owned())),
                }
                Outcome::Ok
            }
        }
    }

    fn finish(&mut self, id: InspectionId, now: SystemTime) -> Outcome {
        let Some(i) = self.inspections.get_mut(&id.0) else { return Outcome::Unknown };
        if i.state != Capturing {
            return Outcome::Illegal;
        }
        if i.images.is_empty() {
            let each: Vec<String> = i.failed.iter().map(|(a, r)| format!("{a}: {r}")).collect();
            i.state = Failed;
            i.reason = Some(if each.is_empty() {
                "no angle was captured".to_owned()
            } else {
                format!("no angle was captured ({})", each.join("; "))
            });
        } else {
            i.state = Captured;
            i.reason = None;
        }
        i.updated_at = now;
        Outcome::State(i.state)
    }

    fn cancel(&mut self, id: InspectionId, reason: &str, now: SystemTime) -> Outcome {
        let Some(i) = self.inspections.get_mut(&id.0) else { return Outcome::Unknown };
        if !matches!(i.state, Capturing | Captured) {
            return Outcome::Illegal;
        }
        i.state = Cancelled;
        i.reason = Some(reason.to_owned());
        i.updated_at = now;
        Outcome::Ok
    }

    fn set_state(
        &mut self,
        id: InspectionId,
        to: InspectionState,
        reason: Option<&str>,
        now: SystemTime,
    ) -> Outcome {
        let Some(i) = self.inspections.get_mut(&id.0) else { return Outcome::Unknown };
        let needs_reason = matches!(to, Failed | Cancelled) && reason.is_none();
        if !legal(i.state, to) || (to == Captured && i.images.is_empty()) || needs_reason {
            return Outcome::Illegal;
        }
        let from = i.state;
        i.state = to;
        i.reason = reason.map(str::to_owned);
        i.updated_at = now;
        Outcome::State(from)
    }

    fn prune(&mut self, older_than: SystemTime) -> Outcome {
        let before = self.inspections.len();
        self.inspections.retain(|_, i| {
            let done = i.state == Completed || (matches!(i.state, Failed | Cancelled) && i.images.is_empty());
            !(done && i.updated_at < older_than)
        });
        Outcome::Pruned((before - self.inspections.len()) as u64)
    }

    fn reopen(&mut self, now: SystemTime) {
        // An interrupted capture is evidence: every angle neither stored nor failed fails, and
        // it is captured, or failed when it holds nothing.
        let ids: Vec<i64> =
            self.inspections.iter().filter(|(_, i)| i.state == Capturing).map(|(id, _)| *id).collect();
        for id in ids {
            let i = self.inspections.get_mut(&id).expect("just listed");
            for angle in i.angles.clone() {
                let done =
                    i.images.iter().any(|(a, _)| *a == angle) || i.failed.iter().any(|(a, _)| *a == angle);
                if !done {
                    i.failed.push((angle, "the kiosk stopped during capture".to_owned()));
                }
            }
            i.updated_at = now;
            let _ = self.finish(InspectionId(id), now);
        }
    }

    fn list(&self) -> Vec<InspectionSummary> {
        self.inspections
            .iter()
            .map(|(id, i)| InspectionSummary {
                id: InspectionId(*id),
                case_id: i.case_id.clone(),
                state: i.state,
                reason: i.reason.clone(),
                angles: i.angles.clone(),
                images: i.images.len() as u64,
                bytes: i.images.iter().map(|(_, b)| b).sum(),
                failed_angles: i.failed.clone(),
                created_at: i.created_at,
                updated_at: i.updated_at,
            })
            .collect()
    }

    fn totals(&self) -> Totals {
        let list = self.list();
        Totals {
            inspections: list.len() as u64,
            images: list.iter().map(|i| i.images).sum(),
            bytes: list.iter().map(|i| i.bytes).sum(),
            awaiting_upload: list.iter().filter(|i| matches!(i.state, Captured | Uploading)).count() as u64,
            oldest_created_at: list.iter().filter(|i| i.state != Completed).map(|i| i.created_at).min(),
        }
    }
}

fn at(step: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + step)
}

/// An id to act on: mostly one of the latest the model has seen (pruned ones included),
/// sometimes one that never existed.
fn pick(model: &Model, pick: usize) -> InspectionId {
    let known = model.next_id - 1;
    if known == 0 || pick == 7 {
        return InspectionId(1_000 + pick as i64);
    }
    InspectionId((known - (pick as i64 % 4)).max(1))
}

/// The target state of a `SetState`: any state, or one the table allows from where it is.
fn target(model: &Model, id: InspectionId, to: usize) -> InspectionState {
    let all = InspectionState::ALL;
    if to < all.len() {
        return all[to];
    }
    let from = model.inspections.get(&id.0).map_or(Capturing, |i| i.state);
    let next: Vec<InspectionState> = all.into_iter().filter(|s| legal(from, *s)).collect();
    if next.is_empty() {
        all[to % all.len()]
    } else {
        next[to % next.len()]
    }
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut store = Store::open(dir.path(), CAPS, at(0)).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut model = Model::new();
    for (step, op) in ops.iter().enumerate() {
        let now = at(step as u64 + 1);
        let (real, expected) = match op {
            Op::Begin { case, angles, expected } => {
                let angles: Vec<PhotoLabel> = angles.iter().map(|i| LABELS[*i]).collect();
                let case_id =
                    CaseId::parse(&format!("CASE-{case}")).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let new = NewInspection {
                    case_id: &case_id,
                    vehicle: None,
                    angles: &angles,
                    expected_image_bytes: *expected,
                };
                let real = store.begin_inspection(&new, now).map(Outcome::Id);
                (real, model.begin(case_id.as_str(), &angles, *expected, now))
            }
            Op::AddImage { pick: p, angle, len } => {
                let id = pick(&model, *p);
                let jpeg = vec![step as u8; *len];
                let image = NewImage {
                    angle: LABELS[*angle],
                    camera: "cam",
                    captured_at: now,
                    source_width: 8,
                    source_height: 6,
                    source_bytes: 100,
                    width: 4,
                    height: 3,
                    jpeg: &jpeg,
                };
                let real = store.add_image(id, &image).map(|()| Outcome::Ok);
                (real, model.add_image(id, LABELS[*angle], *len as u64))
            }
            Op::FailAngle { pick: p, angle, reason } => {
                let id = pick(&model, *p);
                let reason = format!("reason {reason}");
                let real = store.record_angle_failure(id, LABELS[*angle], &reason, now).map(|()| Outcome::Ok);
                (real, model.fail_angle(id, LABELS[*angle], &reason))
            }
            Op::Finish { pick: p } => {
                let id = pick(&model, *p);
                (store.finish_capture(id, now).map(Outcome::State), model.finish(id, now))
            }
            Op::Cancel { pick: p } => {
                let id = pick(&model, *p);
                (
                    store.cancel(id, "operator cancelled", now).map(|()| Outcome::Ok),
                    model.cancel(id, "operator cancelled", now),
                )
            }
            Op::SetState { pick: p, to, reason } => {
                let id = pick(&model, *p);
                let to = target(&model, id, *to);
                let reason = reason.map(|r| format!("uploader says {r}"));
                let real = store.set_state(id, to, reason.as_deref(), now).map(Outcome::State);
                (real, model.set_state(id, to, reason.as_deref(), now))
            }
            Op::Prune { back } => {
                let older_than = at((step as u64 + 1).saturating_sub(*back));
                (store.prune_completed(older_than).map(Outcome::Pruned), model.prune(older_than))
            }
            Op::Reopen => {
                drop(store);
                store = Store::open(dir.path(), CAPS, now).map_err(|e| TestCaseError::fail(e.to_string()))?;
                model.reopen(now);
                (Ok(Outcome::Ok), Outcome::Ok)
            }
        };
        let real = real.unwrap_or_else(outcome_of_error);
        prop_assert_eq!(&real, &expected, "step {}: {:?}", step, op);
        let list = store.list().map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&list, &model.list(), "list after step {}: {:?}", step, op);
        let totals = store.totals().map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(totals, model.totals(), "totals after step {}: {:?}", step, op);
        let next = store.next_to_upload().map_err(|e| TestCaseError::fail(e.to_string()))?.map(|i| i.id);
        let expected_next =
            model.list().into_iter().find(|i| matches!(i.state, Captured | Uploading)).map(|i| i.id);
        prop_assert_eq!(next, expected_next, "next to upload after step {}: {:?}", step, op);
    }
    for (id, i) in &model.inspections {
        let images = store.images(InspectionId(*id)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let got: Vec<(PhotoLabel, u64)> = images.iter().map(|m| (m.angle, m.bytes)).collect();
        prop_assert_eq!(&got, &i.images, "images of inspection {}", id);
    }
    prop_assert_eq!(
        store.check_integrity().map_err(|e| TestCaseError::fail(e.to_string()))?,
        Vec::<String>::new()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/store_model.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_buffer_agrees_with_a_simple_model_after_every_step(ops in ops()) {
        run(&ops)?;
    }
}
