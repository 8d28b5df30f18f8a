//! The durable buffer: every inspection and every image the bay captured, in one SQLite file
//! in the state directory, kept until the cloud has it.
//!
//! # Design constraints
//!
//! The kiosk runs unattended for months. Power is cut without warning, the process is killed,
//! the disk fills up. Through all of that an image that was reported as stored must never be
//! lost, nothing may leave the buffer before the cloud has it, and nothing may stay in it for
//! good: every state has a way out. Speed and file size come second. The buffer is one
//! process's: writes come from the capture threads and the uploader of one daemon (behind a
//! mutex); the CLI may open it alongside, and `queue` reads it without writing anything.
//!
//! # On-disk layout
//!
//! One SQLite database, `buffer.sqlite3`, in the state directory (created if missing), with
//! SQLite's own `buffer.sqlite3-wal` and `buffer.sqlite3-shm` next to it, an empty
//! `buffer.sqlite3.lock` whose `flock` marks the process that owns the buffer (the kernel
//! drops it when that process dies, however it dies), and `buffer.sqlite3.reserve`, a file of
//! [`RESERVE_BYTES`] that the owner keeps so that the buffer can always write the few pages a
//! delete, a state change or an angle failure needs, even on a full disk (see "Space").
//!
//! Pragmas, set on every open, outside any transaction:
//! - `journal_mode=WAL`, set with `pragma_update_and_check`; any answer but `wal` is an error
//!   ([`StoreError::NoWal`]). Readers never block the writer and a commit is one append.
//! - `synchronous=FULL`: a commit is fsync'd before it returns, so it survives a power cut.
//! - `foreign_keys=ON`: images and angle failures cannot outlive their inspection.
//! - `busy_timeout` of 5 s: a second connection waits for a lock instead of failing at once.
//! - `auto_vacuum=INCREMENTAL`, set while a new file is still empty. It cannot change once a
//!   table exists without a full `VACUUM`: a file made without it (by a build before it was
//!   set, or by hand) is converted by the owner with one `VACUUM` after the version 4
//!   migration, when the disk has room for the copy VACUUM writes (twice the file); until then
//!   it is tried again at every owner's open, and freed pages are still reused.
//! - `journal_size_limit` of 64 MiB: the WAL file shrinks back after a checkpoint.
//!
//! Every write is one `BEGIN IMMEDIATE` transaction: it takes the write lock up front, so it
//! never fails half-way on a lock upgrade, and it commits whole or not at all.
//!
//! ## Tables (schema version 1)
//!
//! `inspections`, one row per inspection:
//! - `id INTEGER PRIMARY KEY AUTOINCREMENT`: [`InspectionId`]; never reused, even after pruning.
//! - `case_id TEXT`: the integrator's case id.
//! - `vehicle TEXT NULL`: the [`Vehicle`] as JSON, `NULL` when none was given.
//! - `angles TEXT`: the requested angles as a JSON list of API labels (`["Front","Rear"]`).
//! - `state TEXT`: one of the [`InspectionState`]s, in snake case.
//! - `reason TEXT NULL`: why it failed or was cancelled (or a note from the uploader).
//! - `created_at`, `updated_at INTEGER`: unix milliseconds; `updated_at` moves on every state
//!   change and nothing else (so for a `completed` inspection it is when the cloud completed it).
//!
//! `images`, one row per stored angle, `UNIQUE (inspection_id, angle)`:
//! `inspection_id` (→ `inspections.id`, `ON DELETE CASCADE`), `angle` (API label), `camera`,
//! `captured_at` (unix ms), `source_width`, `source_height`, `source_bytes` (the camera's
//! frame), `width`, `height`, `bytes` (the stored JPEG), `sha256` (lowercase hex, computed by
//! the store from the blob), `jpeg BLOB` (the JPEG itself, last so that scans of the other
//! columns do not read it).
//!
//! `angle_failures`, one row per angle that gave up, `UNIQUE (inspection_id, angle)`:
//! `inspection_id` (→ `inspections.id`, `ON DELETE CASCADE`), `angle`, `reason`, `at` (unix ms).
//!
//! ## Schema versions
//!
//! `PRAGMA user_version` holds the schema version (0 for a new file). At open the migrations
//! run forward one version at a time, each in its own immediate transaction that also moves
//! `user_version`, so a crash mid-migration leaves a file at a whole version. A file with a
//! version newer than this build's is refused with [`StoreError::NewerSchema`] before anything
//! in it changes. Version 1 is the capture tables above; version 2 adds the upload state below;
//! version 3 adds `commands` (`seq`, `command_id` unique, `answer` JSON, `at`): the daemon's
//! answers to the last `REMEMBERED_COMMANDS` commands, so a command id seen before a restart is
//! answered with its first outcome and not executed twice (`store/commands.rs`). Version 4 adds
//! `recoveries` (`id`, `at`, `moved_to`, `damage`, `report` JSON, `acknowledged_at`): the
//! reports of salvages from a damaged file, kept until an operator acknowledges them
//! (`store/salvage.rs`). Version 5
//! adds the counters, the queue order and the audit trail below. Version 6 adds the quality
//! gate's scores to `images` (`store/quality.rs`).
//!
//! ## Upload state (schema version 2)
//!
//! `inspections` gains `upload_attempts INTEGER` (tries that stopped short of completion),
//! `upload_error TEXT NULL` (why the last one stopped) and `session TEXT NULL` (the cloud session
//! the inspection is being sent under, kept after completion). `sent` rows (`inspection_id`,
//! `session`, `angle`, `sha256`, `at`; unique per inspection, session and angle) say which images
//! that session holds as far as the kiosk knows. `dead_sessions` (`session` primary key,
//! `inspection_id`, `why`, `at`) lists sessions given up for good (expired, consumed, or
//! incomplete when their tokens were lost with a restart): [`Store::open_session`] refuses them.
//! No token is ever stored: see `store/upload.rs`.
//!
//! ## Counters, queue order and audit trail (schema version 4)
//!
//! - `inspections.images`, `inspections.bytes`: the image count and JPEG bytes of the
//!   inspection, and `state_totals` (`state` primary key, `inspections`, `images`, `bytes`): the
//!   same per state. Both are kept by triggers on `images` and `inspections` in the transaction
//!   that changes them (cascaded deletes included), so [`Store::totals`] reads six rows instead
//!   of counting every image; [`Store::check_integrity`] recounts them.
//! - `inspections.queue_rank`, `turn_attempts`, `moved_behind`: the upload queue is
//!   `captured` and `uploading` inspections by `(queue_rank, id)` (the partial index
//!   `inspections_upload_queue`), so the oldest goes first. An inspection whose upload stopped
//!   on a transient error [`MOVE_BEHIND_AFTER`] times in a row while others wait gets the
//!   highest rank (it moves behind every one of them) and its count in a row starts again;
//!   `moved_behind` counts how often, for `queue`. An operator's retry puts it back at rank 0.
//! - `pruned`, the audit trail: one row per inspection that left the buffer (`seq`,
//!   `inspection_id`, `case_id`, `state`, `session`, `completed_at` (when it reached its final
//!   state), `images`, `bytes`, `images_sha256`, `rule`: `retention` or `space`), written in
//!   the transaction that deletes it. `images_sha256` is the sha256 of the image sha256s in
//!   ascending order, each as lowercase hex followed by a newline (`sort | sha256sum` of one
//!   hash a line), so that what the cloud received can be checked against it. The newest
//!   [`PRUNED_HISTORY`] rows are kept.
//! - `inspections_not_completed` (a partial index on `created_at`) finds the oldest inspection
//!   not yet completed; `dead_sessions_by_inspection` keeps cascaded deletes from scanning.
//!
//! # Inspection states
//!
//! | from | to | how |
//! |---|---|---|
//! | `capturing` | `captured` | [`Store::finish_capture`] with at least one image; or at open, when the process capturing it died |
//! | `capturing` | `failed` | the same with no image: "no angle was captured (…)" |
//! | `capturing` | `cancelled` | [`Store::cancel`]: an operator's cancel |
//! | `captured` | `uploading` | the uploader takes it |
//! | `captured` | `failed`, `cancelled` | given up for good; an operator's cancel |
//! | `uploading` | `completed` | the cloud accepted the inspection |
//! | `uploading` | `captured` | the upload stopped (crash, expired session): back in the queue |
//! | `uploading` | `failed` | the cloud refused it for good |
//! | `failed`, `cancelled` | `captured` | an operator's retry ([`Store::retry`]); needs at least one image |
//! | `completed` | — | final: it leaves only through pruning |
//!
//! Every other move is refused with [`StoreError::IllegalTransition`] and changes nothing;
//! moving to `failed` or `cancelled` needs a reason. [`Store::set_state`] applies any legal
//! move; `finish_capture`, `cancel` and `retry` are shorthands for it.
//!
//! ## Every state has an exit
//!
//! Nothing may stay for good where neither upload nor retention moves it; what only a person
//! can decide is said to be so ([`InspectionState::exit`] holds this table):
//!
//! | state | leaves by itself through | or by an operator's decision |
//! |---|---|---|
//! | `capturing` | the end of the capture, or the owner's next open (a kill or power cut mid-capture): `captured` with what it holds, its missing angles failed with "the kiosk stopped during capture"; `failed` when it holds nothing | `cancel` |
//! | `captured` | the uploader | `cancel` |
//! | `uploading` | the cloud's answer: `completed`, `failed`, or back to `captured` | — |
//! | `completed` | pruning: `completed_retention` after completion, or earlier, oldest first, when a new inspection needs the space | — |
//! | `failed`, `cancelled` holding no image | pruning, `completed_retention` after the last change: there is nothing to deliver | — |
//! | `failed` holding images | — (the cloud refused it for good: a person must look) | `retry` |
//! | `cancelled` holding images | — (an operator cancelled it) | `retry` |
//!
//! `cancelled` only ever comes from an operator's cancel, never from a crash.
//!
//! # Space
//!
//! - **Caps refuse, never evict what is not delivered**: a new inspection (or image) that would
//!   cross `max_bytes` or eat into `min_free_disk` is refused with [`StoreError::Full`]. The
//!   space the caps see is the file system's free space plus the buffer's own free pages
//!   (`freelist_count × page_size`, which SQLite reuses before it grows the file), less
//!   [`RESERVE_BYTES`] while the reserve file is missing (that space belongs to it).
//! - **Delivered evidence gives way**: before refusing, completed inspections (the cloud has
//!   them) are pruned early, oldest completion first, as far as needed, each with an audit row
//!   (rule `space`) and an INFO line. Nothing that is not completed is touched, so a bay whose
//!   cloud is reachable never refuses a car because of what it already delivered.
//! - **Space goes back to the file system**: after pruning, `PRAGMA incremental_vacuum` moves
//!   pages from the end of the file into the freed holes, in steps of at most a third of the
//!   free disk (the moved pages pass through the WAL), each followed by a
//!   `wal_checkpoint(TRUNCATE)` that shrinks the file and empties the WAL.
//! - **Deleting never needs free disk**: in WAL mode even a delete appends pages to the WAL. A
//!   write that must not fail (an angle failure, the end of a capture, a state change, upload
//!   bookkeeping, a prune, a migration) that hits `SQLITE_FULL` deletes the reserve file and is
//!   tried once more; the owner makes the reserve again once the disk has room for it. Pruning
//!   goes in batches of [`PRUNE_BATCH`] inspections so that one transaction stays small. New
//!   inspections and images never use the reserve.
//!
//! # Invariants
//!
//! - **An image is durable once its transaction commits**: when [`Store::add_image`] returns
//!   `Ok`, the image survives a kill or a power cut. A write that fails or is interrupted
//!   leaves nothing behind.
//! - **The JPEG bytes live in the database** as a blob next to the sha256 the store computed
//!   from them; [`Store::image_jpeg`] checks the hash on every read and reports a mismatch as
//!   [`StoreError::Corrupt`] instead of handing out damaged evidence.
//! - **Rows leave only through pruning, with an audit row each**: [`Store::prune_completed`]
//!   (retention) and the space rule above delete `completed` inspections, and retention also
//!   deletes `failed` or `cancelled` ones that hold no image; each is logged at INFO. Nothing
//!   that holds an image the cloud does not have is ever deleted, whatever the caps say.
//! - **An angle is captured or failed, never both**, and at most once: a second image of the
//!   same angle is refused ([`StoreError::AngleAlreadyStored`]), not swapped in. Images and
//!   failures are only recorded while the inspection is `capturing`.
//! - **Nothing stays `capturing` across a restart**: the owner's open closes what a dead
//!   process left capturing (see below); an interrupted capture is evidence already taken.
//! - **A damaged file is moved aside, never deleted**, and the move is logged at ERROR. What
//!   it still holds whose sha256 matches is salvaged into the fresh buffer first, and the
//!   report of what was recovered and lost stays in `recoveries` until acknowledged.
//!
//! # At open
//!
//! 1. The state directory is created if missing, and the lock taken if free. Only the lock's
//!    holder (the owner) runs recovery; another process opening the buffer meanwhile (the CLI
//!    while the daemon runs) skips it, since the inspections being captured are alive.
//! 2. The owner runs `PRAGMA quick_check`. From a file that is not a database, fails the
//!    check or was noted damaged (an image whose sha256 no longer matches, found by
//!    [`Store::image_jpeg`] or `check`: `buffer.sqlite3.damaged`), every inspection and image still readable whose sha256 matches is salvaged into a
//!    fresh buffer (`store/salvage.rs`), then the file is renamed, untouched, with its `-wal`
//!    and `-shm`, to `buffer.sqlite3.corrupt-<unix ms>` and the fresh buffer takes its place,
//!    with a report in `recoveries` (logged at ERROR). A locked file or a permission problem
//!    is not damage: it is an error naming the path and the fix, and nothing moves.
//! 3. The schema is migrated forward; the owner converts a file to incremental vacuum.
//! 4. The owner closes every inspection still `capturing`: `captured` when it holds an image
//!    (each angle neither stored nor failed is failed with "the kiosk stopped during capture"),
//!    `failed` when it holds none, logged at WARN. Then it makes the reserve file if missing.
//!
//! [`Store::recovery`] reports what happened.
//!
//! # Reading without writing
//!
//! [`Store::read_only`] is for `queue`: it creates nothing (no directory, no lock file, no
//! `-wal` or `-shm`), migrates nothing and moves nothing, so it works on a full disk. With no
//! `-wal` beside the file (nothing has it open) it reads the file as immutable and checks
//! afterwards that no writer came along meanwhile (reading again if one did); with a `-wal`
//! and its `-shm` it reads through them like any reader. A `-wal` without its `-shm`, or a file
//! at an older schema version, is an error that says to start the kiosk once.

mod caps;
mod commands;
mod disk;
mod error;
mod handle;
mod lifecycle;
mod observe;
mod prune;
mod quality;
mod salvage;
mod schema;
mod space;
mod upload;

pub use commands::REMEMBERED_COMMANDS;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};

use crate::clock::{from_unix_millis, unix_millis};
use crate::vehicle::{CaseId, PhotoLabel, Vehicle};

pub use caps::Refusal;
pub use error::StoreError;
pub use lifecycle::{Exit, INTERRUPTED_REASON};
pub use observe::BufferFacts;
pub use prune::{images_digest, PruneRule, PrunedRecord, PRUNED_HISTORY, PRUNE_BATCH};
pub use quality::{AngleQuality, ImageQuality};
pub use salvage::{
    acknowledge_recoveries, check_buffer, BufferCheck, LostAngle, LostInspection, RecoveryRecord,
    SalvageReport,
};
pub use schema::SCHEMA_VERSION;
pub use space::RESERVE_BYTES;
pub use upload::{UploadState, MOVE_BEHIND_AFTER};

use error::sqlite_error;

/// The buffer's file name in the state directory.
pub const FILE_NAME: &str = "buffer.sqlite3";

/// The caps the buffer enforces before it accepts a new inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Upper bound on the JPEG bytes held in the buffer.
    pub max_bytes: u64,
    /// Free space the file system must keep after the new inspection is stored.
    pub min_free_disk: u64,
}

/// The buffer's id of an inspection (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct InspectionId(pub i64);

impl fmt::Display for InspectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where an inspection stands. The module doc lists the legal moves between states and how
/// each state is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InspectionState {
    /// Angles are being captured; images and angle failures may be added.
    Capturing,
    /// Capture is over with at least one image; waiting for upload.
    Captured,
    /// The uploader is sending it.
    Uploading,
    /// The cloud has it; it may be pruned after the retention period, or earlier for space.
    Completed,
    /// Given up, with a reason; images kept.
    Failed,
    /// Stopped by an operator, with a reason; images kept.
    Cancelled,
}

impl InspectionState {
    pub const ALL: [InspectionState; 6] = [
        InspectionState::Capturing,
        InspectionState::Captured,
        InspectionState::Uploading,
        InspectionState::Completed,
        InspectionState::Failed,
        InspectionState::Cancelled,
    ];

    /// The state as the buffer and the JSON output spell it (`capturing`).
    pub fn as_str(self) -> &'static str {
        match self {
            InspectionState::Capturing => "capturing",
            InspectionState::Captured => "captured",
            InspectionState::Uploading => "uploading",
            InspectionState::Completed => "completed",
            InspectionState::Failed => "failed",
            InspectionState::Cancelled => "cancelled",
        }
    }

    /// The inverse of [`InspectionState::as_str`].
    pub fn parse(value: &str) -> Option<InspectionState> {
        InspectionState::ALL.into_iter().find(|s| s.as_str() == value)
    }

    /// The states that may follow this one.
    pub fn successors(self) -> &'static [InspectionState] {
        lifecycle::successors(self)
    }

    /// How an inspection in this state, holding images or not, leaves it (the module doc's
    /// table "Every state has an exit").
    pub fn exit(self, holds_images: bool) -> Exit {
        lifecycle::exit(self, holds_images)
    }
}

impl fmt::Display for InspectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for InspectionState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        InspectionState::parse(s).ok_or_else(|| format!("unknown inspection state {s:?}"))
    }
}

/// What is known when an inspection starts.
#[derive(Debug, Clone)]
pub struct NewInspection<'a> {
    pub case_id: &'a CaseId,
    pub vehicle: Option<&'a Vehicle>,
    /// The angles this inspection will try to capture, in order.
    pub angles: &'a [PhotoLabel],
    /// Expected size of one final image, used to check the caps before capture starts.
    pub expected_image_bytes: u64,
}

/// One processed image, ready to be stored.
#[derive(Debug, Clone)]
pub struct NewImage<'a> {
    pub angle: PhotoLabel,
    pub camera: &'a str,
    pub captured_at: SystemTime,
    pub source_width: u32,
    pub source_height: u32,
    pub source_bytes: u64,
    pub width: u32,
    pub height: u32,
    pub jpeg: &'a [u8],
}

/// One inspection as `queue` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InspectionSummary {
    pub id: InspectionId,
    pub case_id: String,
    pub state: InspectionState,
    pub reason: Option<String>,
    pub angles: Vec<PhotoLabel>,
    pub images: u64,
    pub bytes: u64,
    pub failed_angles: Vec<(PhotoLabel, String)>,
    #[serde(skip)]
    pub created_at: SystemTime,
    #[serde(skip)]
    pub updated_at: SystemTime,
}

/// One stored image without its bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageMeta {
    pub angle: PhotoLabel,
    pub camera: String,
    #[serde(skip)]
    pub captured_at: SystemTime,
    pub source_width: u32,
    pub source_height: u32,
    pub source_bytes: u64,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    pub sha256: String,
}

/// What the whole buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    /// Inspections in any state, completed ones not yet pruned included.
    pub inspections: u64,
    pub images: u64,
    /// JPEG bytes of all images.
    pub bytes: u64,
    /// Inspections `captured` or `uploading`: the upload queue.
    pub awaiting_upload: u64,
    /// When the oldest inspection not yet completed was created (MQTT's `oldest_age_s`);
    /// `None` when every inspection in the buffer is completed.
    #[serde(skip)]
    pub oldest_created_at: Option<SystemTime>,
}

/// What [`Store::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Inspections found `capturing`, left by a process that died mid-capture; each was closed:
    /// `captured` with what it holds (its missing angles failed with [`INTERRUPTED_REASON`]),
    /// or `failed` when it held no image.
    pub interrupted: Vec<InspectionId>,
    /// Where a damaged buffer file was moved (its `-wal` and `-shm`, if any, got the same name
    /// plus their suffix); the buffer now open is a fresh one holding what could be salvaged
    /// ([`Store::recoveries`] has the report).
    pub moved_aside: Option<PathBuf>,
    /// The schema version the file had before it was migrated, when it was.
    pub migrated_from: Option<u32>,
    /// Another process held the buffer's lock, so it is alive and its inspections are not
    /// interrupted: the quick check and recovery were skipped.
    pub shared: bool,
}

/// The open buffer. One per process; not shared between threads without a lock.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    dir: PathBuf,
    caps: Caps,
    recovery: Recovery,
    /// Whether this process holds the lock: it runs recovery and keeps the reserve file.
    owner: bool,
    /// Held for the store's lifetime when this process owns the buffer.
    _lock: Option<std::fs::File>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("caps", &self.caps)
            .field("recovery", &self.recovery)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the buffer in `state_dir` (creating both if missing), moves a damaged file aside,
    /// migrates the schema and closes inspections a dead process left `capturing`; the module
    /// doc has the details and [`Store::recovery`] the outcome. `now` stamps what recovery
    /// changes and names a moved-aside file.
    pub fn open(state_dir: &Path, caps: Caps, now: SystemTime) -> Result<Store, StoreError> {
        let io = |action, source| StoreError::Io { path: state_dir.to_owned(), action, source };
        std::fs::create_dir_all(state_dir).map_err(|e| io("create the state directory", e))?;
        let path = state_dir.join(FILE_NAME);
        let lock_path = disk::with_suffix(&path, ".lock");
        let lock = disk::try_lock(&lock_path).map_err(|source| StoreError::Io {
            path: lock_path.clone(),
            action: "lock",
            source,
        })?;
        let owner = lock.is_some();
        let mut recovery = Recovery { shared: !owner, ..Recovery::default() };
        if !owner {
            log::info!(path:% = path.display(); "Buffer is held by another process; recovery skipped");
        }

        // The companion files as found, to keep a damaged file's as they were.
        let mut found = salvage::Companions::default();
        if owner {
            salvage::finish_interrupted(&path)?;
            found = salvage::Companions::read(&path);
        }
        // A migration must not fail for want of disk: it may use the reserve.
        let open_schema = || match schema::open(&path, owner) {
            Err(StoreError::DiskFull { .. }) if space::release_reserve(&path) => schema::open(&path, owner),
            other => other,
        };
        let opened = match salvage::refuse_flagged(&path, owner).and_then(|()| open_schema()) {
            Err(StoreError::Corrupt { detail, .. }) if owner => {
                recovery.moved_aside = Some(salvage::replace_damaged(&path, &detail, now, found)?);
                open_schema()?
            }
            other => other?,
        };
        recovery.migrated_from = opened.migrated_from;
        // The file or its companions may be new: make their directory entries durable.
        disk::sync_dir(state_dir).map_err(|e| io("sync", e))?;

        let mut store = Store {
            conn: opened.connection,
            path,
            dir: state_dir.to_owned(),
            caps,
            recovery,
            owner,
            _lock: lock,
        };
        if owner {
            store.convert_to_incremental_vacuum();
            store.recovery.interrupted = store.writing(|s| s.close_interrupted(now))?;
            store.restore_reserve();
        }
        Ok(store)
    }

    /// Reads the buffer in `state_dir` without writing anything (see "Reading without
    /// writing" in the module doc): `read` gets a store that only reads, and its answer is
    /// returned once it is known that no writer changed the file meanwhile. `Ok(None)` when
    /// there is no buffer yet. Works on a full disk and on a read-only file system.
    pub fn read_only<T>(
        state_dir: &Path,
        caps: Caps,
        mut read: impl FnMut(&Store) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let path = state_dir.join(FILE_NAME);
        let mut tries = 0;
        loop {
            tries += 1;
            let Some(opened) = schema::open_read_only(&path)? else {
                return Ok(None);
            };
            let store = Store {
                conn: opened.connection,
                path: path.clone(),
                dir: state_dir.to_owned(),
                caps,
                recovery: Recovery { shared: true, ..Recovery::default() },
                owner: false,
                _lock: None,
            };
            let answer = read(&store);
            drop(store);
            if opened.snapshot.as_ref().is_none_or(|s| s.still_current(&path)) {
                return answer.map(Some);
            }
            if tries >= 3 {
                return Err(StoreError::ReadOnly {
                    path,
                    detail: "a writer kept changing it while it was read".to_owned(),
                });
            }
            log::debug!(path:% = path.display(); "Buffer changed while it was read without a lock; reading again");
        }
    }

    /// What [`Store::open`] found and repaired.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The buffer file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The caps this store enforces.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Enforces `caps` from now on (a reloaded configuration). Nothing buffered is touched,
    /// even if it is over the new caps: they only refuse what comes next.
    pub fn set_caps(&mut self, caps: Caps) {
        self.caps = caps;
    }

    /// Starts an inspection in state `capturing`, if the caps allow it: the buffered JPEG
    /// bytes plus `expected_image_bytes` per angle must stay within `max_bytes`, and the space
    /// the buffer may use must keep `min_free_disk` free after that estimate. Completed
    /// inspections are pruned early, oldest first, when that makes it fit. A refusal is
    /// [`StoreError::Full`], logged at WARN, and writes nothing.
    pub fn begin_inspection(
        &mut self,
        new: &NewInspection<'_>,
        now: SystemTime,
    ) -> Result<InspectionId, StoreError> {
        check_angles(new)?;
        let needed = new.expected_image_bytes.saturating_mul(new.angles.len() as u64);
        if let Err(refusal) = self.make_room(needed, prune::Need::Inspection)? {
            log::warn!(case_id = new.case_id.as_str(), refusal:% = refusal; "Inspection refused: the buffer is full");
            return Err(StoreError::Full {
                path: self.path.clone(),
                what: format!("a new inspection for case {}", new.case_id),
                refusal,
            });
        }
        let vehicle = new.vehicle.map(|v| {
            serde_json::to_string(v).expect("a Vehicle is strings and numbers, which always serialise")
        });
        let angles = serde_json::to_string(new.angles).expect("photo labels always serialise");
        let path = self.path.clone();
        let err = |e| sqlite_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let at = unix_millis(now);
        tx.execute(
            "INSERT INTO inspections (case_id, vehicle, angles, state, reason, created_at, updated_at)
             VALUES (?1, ?2, ?3, 'capturing', NULL, ?4, ?4)",
            params![new.case_id.as_str(), vehicle, angles, at],
        )
        .map_err(err)?;
        let id = InspectionId(tx.last_insert_rowid());
        tx.commit().map_err(err)?;
        Ok(id)
    }

    /// Stores one image of a `capturing` inspection; durable once this returns `Ok`. The
    /// store computes the sha256. Refused when the inspection is unknown or not capturing,
    /// the angle was not requested or already has its image, or the image would take the
    /// space the buffer may use below `min_free_disk` (after pruning completed inspections
    /// early, if that helps). A refusal writes nothing.
    pub fn add_image(&mut self, id: InspectionId, image: &NewImage<'_>) -> Result<(), StoreError> {
        self.insert_image(id, image, None)
    }

    /// `add_image`, with the image's quality scores in the same transaction when given.
    fn insert_image(
        &mut self,
        id: InspectionId,
        image: &NewImage<'_>,
        quality: Option<&ImageQuality>,
    ) -> Result<(), StoreError> {
        let bytes = image.jpeg.len() as u64;
        if let Err(refusal) = self.make_room(bytes, prune::Need::Image)? {
            log::warn!(inspection_id = id.0, angle = image.angle.as_str(), refusal:% = refusal; "Image refused: the disk is full");
            return Err(StoreError::Full {
                path: self.path.clone(),
                what: format!("image {} of inspection {id}", image.angle),
                refusal,
            });
        }
        match self.add_image_once(id, image, quality) {
            // The image passes through the WAL before it lands in the file's free pages: when
            // the disk has no room for that, the free pages go back to the file system first.
            Err(StoreError::DiskFull { .. }) if self.free_pages()? > 0 => {
                self.give_space_back();
                self.add_image_once(id, image, quality)
            }
            other => other,
        }
    }

    fn add_image_once(
        &mut self,
        id: InspectionId,
        image: &NewImage<'_>,
        quality: Option<&ImageQuality>,
    ) -> Result<(), StoreError> {
        let bytes = image.jpeg.len() as u64;
        let sha256 = hex::encode(Sha256::digest(image.jpeg));
        let path = self.path.clone();
        let err = |e| sqlite_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let head = load_head(&tx, &self.path, id)?;
        head.check_recording(id, image.angle)?;
        if has_image(&tx, id, image.angle).map_err(err)? {
            return Err(StoreError::AngleAlreadyStored { id, angle: image.angle });
        }
        tx.execute(
            "INSERT INTO images (inspection_id, angle, camera, captured_at, source_width, source_height,
                                 source_bytes, width, height, bytes, sha256, jpeg)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                id.0,
                image.angle.as_str(),
                image.camera,
                unix_millis(image.captured_at),
                image.source_width,
                image.source_height,
                to_i64(image.source_bytes),
                image.width,
                image.height,
                to_i64(bytes),
                sha256,
                image.jpeg,
            ],
        )
        .map_err(err)?;
        if let Some(quality) = quality {
            quality::write(&tx, id, image.angle, quality).map_err(err)?;
        }
        // The angle is captured now, so it is no longer failed.
        tx.execute(
            "DELETE FROM angle_failures WHERE inspection_id = ?1 AND angle = ?2",
            params![id.0, image.angle.as_str()],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Records why an angle of a `capturing` inspection could not be captured. Recording the
    /// same angle again replaces the reason; an angle that has its image cannot fail. May use
    /// the reserve on a full disk.
    pub fn record_angle_failure(
        &mut self,
        id: InspectionId,
        angle: PhotoLabel,
        reason: &str,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        self.writing(|s| s.record_angle_failure_once(id, angle, reason, now))
    }

    /// Ends the capture: `captured` when at least one image is stored, otherwise `failed`
    /// with the reason "no angle was captured" and why each angle failed. Returns the new
    /// state. May use the reserve on a full disk.
    pub fn finish_capture(
        &mut self,
        id: InspectionId,
        now: SystemTime,
    ) -> Result<InspectionState, StoreError> {
        self.writing(|s| s.finish_capture_once(id, now))
    }

    /// An operator's cancel of a `capturing` or `captured` inspection, with `reason`; its
    /// images stay, and an operator's [`Store::retry`] can queue it again.
    pub fn cancel(&mut self, id: InspectionId, reason: &str, now: SystemTime) -> Result<(), StoreError> {
        self.writing(|s| {
            let path = s.path.clone();
            let err = |e| sqlite_error(&path, e);
            let tx = s.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
            let head = load_head(&tx, &path, id)?;
            if !matches!(head.state, InspectionState::Capturing | InspectionState::Captured) {
                return Err(StoreError::IllegalTransition {
                    id,
                    from: head.state,
                    to: InspectionState::Cancelled,
                    why: "only a capturing or captured inspection can be cancelled".to_owned(),
                });
            }
            transition(&tx, &path, id, &head, InspectionState::Cancelled, Some(reason), now)?;
            tx.commit().map_err(err)
        })
    }

    /// An operator's retry: a `failed` or `cancelled` inspection that holds images goes back
    /// to `captured`, at its place in the upload queue by age, with its count of failed tries
    /// in a row cleared. Returns the state it left. Anything else is
    /// [`StoreError::IllegalTransition`] and changes nothing.
    pub fn retry(&mut self, id: InspectionId, now: SystemTime) -> Result<InspectionState, StoreError> {
        self.writing(|s| {
            let path = s.path.clone();
            let err = |e| sqlite_error(&path, e);
            let tx = s.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
            let head = load_head(&tx, &path, id)?;
            if !matches!(head.state, InspectionState::Failed | InspectionState::Cancelled) {
                return Err(StoreError::IllegalTransition {
                    id,
                    from: head.state,
                    to: InspectionState::Captured,
                    why: "only a failed or cancelled inspection can be retried".to_owned(),
                });
            }
            transition(&tx, &path, id, &head, InspectionState::Captured, None, now)?;
            tx.execute("UPDATE inspections SET queue_rank = 0, turn_attempts = 0 WHERE id = ?1", [id.0])
                .map_err(err)?;
            tx.commit().map_err(err)?;
            Ok(head.state)
        })
    }

    /// Moves an inspection to `to` if the state machine allows it (see the module doc), with
    /// `reason` (required for `failed` and `cancelled`; `None` clears it). Returns the state
    /// it left. An illegal move is [`StoreError::IllegalTransition`] and changes nothing.
    pub fn set_state(
        &mut self,
        id: InspectionId,
        to: InspectionState,
        reason: Option<&str>,
        now: SystemTime,
    ) -> Result<InspectionState, StoreError> {
        self.writing(|s| {
            let path = s.path.clone();
            let err = |e| sqlite_error(&path, e);
            let tx = s.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
            let head = load_head(&tx, &path, id)?;
            transition(&tx, &path, id, &head, to, reason, now)?;
            tx.commit().map_err(err)?;
            Ok(head.state)
        })
    }

    /// One inspection, or `None` if there is no such id.
    pub fn inspection(&self, id: InspectionId) -> Result<Option<InspectionSummary>, StoreError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| sqlite_error(&self.path, e))?;
        let mut found = self.summaries_in(&tx, Some(id))?;
        Ok(found.pop())
    }

    /// Every inspection in the buffer, oldest first.
    pub fn list(&self) -> Result<Vec<InspectionSummary>, StoreError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| sqlite_error(&self.path, e))?;
        self.summaries_in(&tx, None)
    }

    /// The vehicle given when the inspection began, if any.
    pub fn vehicle(&self, id: InspectionId) -> Result<Option<Vehicle>, StoreError> {
        self.vehicle_json(id)?
            .map(|v| serde_json::from_value(v).map_err(|e| self.unreadable(id, format!("vehicle JSON: {e}"))))
            .transpose()
    }

    /// The images of an inspection, in the order they were stored.
    pub fn images(&self, id: InspectionId) -> Result<Vec<ImageMeta>, StoreError> {
        let err = |e| sqlite_error(&self.path, e);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        if !inspection_exists(&tx, id).map_err(err)? {
            return Err(StoreError::UnknownInspection { path: self.path.clone(), id });
        }
        let mut stmt = tx
            .prepare(
                "SELECT angle, camera, captured_at, source_width, source_height, source_bytes,
                        width, height, bytes, sha256
                 FROM images WHERE inspection_id = ?1 ORDER BY rowid",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([id.0], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    ImageMeta {
                        // Replaced below, once the stored label is parsed.
                        angle: PhotoLabel::Front,
                        camera: r.get(1)?,
                        captured_at: from_unix_millis(r.get(2)?),
                        source_width: r.get(3)?,
                        source_height: r.get(4)?,
                        source_bytes: to_u64(r.get(5)?),
                        width: r.get(6)?,
                        height: r.get(7)?,
                        bytes: to_u64(r.get(8)?),
                        sha256: r.get(9)?,
                    },
                ))
            })
            .map_err(err)?;
        let mut images = Vec::new();
        for row in rows {
            let (angle, mut meta) = row.map_err(err)?;
            meta.angle = self.label(id, &angle)?;
            images.push(meta);
        }
        Ok(images)
    }

    /// The JPEG of one angle, checked against its stored sha256; `None` if the inspection
    /// has no image of that angle. A mismatch is [`StoreError::Corrupt`], logged at ERROR and
    /// noted next to the buffer, so that the next start salvages it (`store/salvage.rs`).
    pub fn image_jpeg(&self, id: InspectionId, angle: PhotoLabel) -> Result<Option<Vec<u8>>, StoreError> {
        let err = |e| sqlite_error(&self.path, e);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let row: Option<(Vec<u8>, String)> = tx
            .query_row(
                "SELECT jpeg, sha256 FROM images WHERE inspection_id = ?1 AND angle = ?2",
                params![id.0, angle.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)?;
        let Some((jpeg, stored)) = row else {
            if !inspection_exists(&tx, id).map_err(err)? {
                return Err(StoreError::UnknownInspection { path: self.path.clone(), id });
            }
            return Ok(None);
        };
        let actual = hex::encode(Sha256::digest(&jpeg));
        if actual != stored {
            log::error!(path:% = self.path.display(), inspection_id = id.0, angle = angle.as_str(); "Stored image does not match its sha256");
            let detail = format!(
                "image {angle} of inspection {id} has sha256 {actual} but {stored} was stored with it"
            );
            salvage::flag_damage(&self.path, &detail);
            return Err(StoreError::Corrupt { path: self.path.clone(), detail });
        }
        Ok(Some(jpeg))
    }

    /// What the whole buffer holds, read in one consistent snapshot from the counters the
    /// triggers keep: a handful of rows, however large the buffer.
    pub fn totals(&self) -> Result<Totals, StoreError> {
        let err = |e| sqlite_error(&self.path, e);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let per_state = state_totals(&tx).map_err(err)?;
        let oldest: Option<i64> = tx
            .query_row("SELECT MIN(created_at) FROM inspections WHERE state <> 'completed'", [], |r| r.get(0))
            .map_err(err)?;
        let mut totals = Totals {
            inspections: 0,
            images: 0,
            bytes: 0,
            awaiting_upload: 0,
            oldest_created_at: oldest.map(from_unix_millis),
        };
        for (state, counts) in per_state {
            totals.inspections += counts.inspections;
            totals.images += counts.images;
            totals.bytes += counts.bytes;
            if matches!(state.as_str(), "captured" | "uploading") {
                totals.awaiting_upload += counts.inspections;
            }
        }
        Ok(totals)
    }

    /// Bytes free on the state directory's file system (what the kernel says; the caps also
    /// count the buffer's own free pages, see [`Store::would_refuse`]).
    pub fn disk_free_bytes(&self) -> Result<u64, StoreError> {
        self.free_bytes()
    }

    /// The refusal [`Store::begin_inspection`] would give an inspection of `angles` angles of
    /// `expected_image_bytes` each right now, or `None` if it would be accepted, counting what
    /// pruning delivered inspections early would free (MQTT's `buffer.full`).
    pub fn would_refuse(
        &self,
        angles: usize,
        expected_image_bytes: u64,
    ) -> Result<Option<Refusal>, StoreError> {
        let needed = expected_image_bytes.saturating_mul(angles as u64);
        let space = self.usable_space()?;
        let (buffered, reclaimable) = self.buffered_and_reclaimable()?;
        Ok(observe::refusal(self.caps, buffered, reclaimable, space, needed))
    }

    /// Runs the full `PRAGMA integrity_check`, re-hashes every image and recounts what the
    /// counters say. Returns the problems found, none when the buffer is sound. Reads the
    /// whole file: slow on a big buffer.
    pub fn check_integrity(&self) -> Result<Vec<String>, StoreError> {
        let err = |e| sqlite_error(&self.path, e);
        let (mut problems, _) = salvage::integrity(&self.conn).map_err(err)?;
        problems.extend(schema::recount(&self.conn).map_err(err)?);
        Ok(problems)
    }

    /// Pages the buffer file has now (of `PRAGMA page_size` bytes each).
    pub fn page_count(&self) -> Result<u64, StoreError> {
        self.conn
            .pragma_query_value(None, "page_count", |r| r.get::<_, i64>(0))
            .map(to_u64)
            .map_err(|e| sqlite_error(&self.path, e))
    }

    /// Pages of the file that hold nothing (`PRAGMA freelist_count`): SQLite reuses them before
    /// it grows the file, and incremental vacuum gives them back to the file system.
    pub fn free_pages(&self) -> Result<u64, StoreError> {
        self.conn
            .pragma_query_value(None, "freelist_count", |r| r.get::<_, i64>(0))
            .map(to_u64)
            .map_err(|e| sqlite_error(&self.path, e))
    }

    /// Caps the buffer file at `pages` pages, as a nearly full disk would; used by tests.
    /// Writes that need more pages fail with [`StoreError::DiskFull`]. Lasts until the store
    /// is closed; SQLite never sets it below the current size. Returns the limit in force.
    pub fn set_page_limit(&self, pages: u64) -> Result<u64, StoreError> {
        self.conn
            .pragma_update_and_check(None, "max_page_count", to_i64(pages), |r| r.get::<_, i64>(0))
            .map(to_u64)
            .map_err(|e| sqlite_error(&self.path, e))
    }

    // ---- helpers ----

    fn record_angle_failure_once(
        &mut self,
        id: InspectionId,
        angle: PhotoLabel,
        reason: &str,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |e| sqlite_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let head = load_head(&tx, &self.path, id)?;
        head.check_recording(id, angle)?;
        if has_image(&tx, id, angle).map_err(err)? {
            return Err(StoreError::AngleAlreadyStored { id, angle });
        }
        tx.execute(
            "INSERT INTO angle_failures (inspection_id, angle, reason, at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (inspection_id, angle) DO UPDATE SET reason = excluded.reason, at = excluded.at",
            params![id.0, angle.as_str(), reason, unix_millis(now)],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    fn finish_capture_once(
        &mut self,
        id: InspectionId,
        now: SystemTime,
    ) -> Result<InspectionState, StoreError> {
        let path = self.path.clone();
        let err = |e| sqlite_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let head = load_head(&tx, &self.path, id)?;
        let (to, reason) = if head.images > 0 {
            (InspectionState::Captured, None)
        } else {
            let failures = failures_of(&tx, id).map_err(err)?;
            (InspectionState::Failed, Some(lifecycle::no_image_reason(&failures)))
        };
        if head.state != InspectionState::Capturing {
            let why = "only a capturing inspection can finish capture".to_owned();
            return Err(StoreError::IllegalTransition { id, from: head.state, to, why });
        }
        transition(&tx, &self.path, id, &head, to, reason.as_deref(), now)?;
        tx.commit().map_err(err)?;
        Ok(to)
    }

    /// Closes every inspection still `capturing`: its process died mid-capture. What it holds
    /// is evidence already taken: each angle neither stored nor failed fails with
    /// [`INTERRUPTED_REASON`], and it becomes `captured` (or `failed` when it holds no image).
    fn close_interrupted(&mut self, now: SystemTime) -> Result<Vec<InspectionId>, StoreError> {
        let path = self.path.clone();
        let err = |e| sqlite_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let found: Vec<i64> = {
            let mut stmt = tx
                .prepare("SELECT id FROM inspections WHERE state = 'capturing' ORDER BY id")
                .map_err(err)?;
            let rows = stmt.query_map([], |r| r.get(0)).map_err(err)?;
            rows.collect::<Result<_, _>>().map_err(err)?
        };
        let mut closed = Vec::new();
        for id in found.into_iter().map(InspectionId) {
            let head = load_head(&tx, &path, id)?;
            let failed: Vec<String> =
                failures_of(&tx, id).map_err(err)?.into_iter().map(|(a, _)| a).collect();
            for angle in &head.angles {
                if failed.iter().any(|a| a == angle.as_str()) || has_image(&tx, id, *angle).map_err(err)? {
                    continue;
                }
                tx.execute(
                    "INSERT INTO angle_failures (inspection_id, angle, reason, at) VALUES (?1, ?2, ?3, ?4)",
                    params![id.0, angle.as_str(), INTERRUPTED_REASON, unix_millis(now)],
                )
                .map_err(err)?;
            }
            let (to, reason) = if head.images > 0 {
                (InspectionState::Captured, None)
            } else {
                let failures = failures_of(&tx, id).map_err(err)?;
                (InspectionState::Failed, Some(lifecycle::no_image_reason(&failures)))
            };
            transition(&tx, &path, id, &head, to, reason.as_deref(), now)?;
            closed.push((id, head.case_id, head.images, to));
        }
        tx.commit().map_err(err)?;
        for (id, case_id, images, to) in &closed {
            log::warn!(inspection_id = id.0, case_id = case_id.as_str(), images = *images, state = to.as_str(); "Capture interrupted by a stop of the kiosk: what it holds is kept and goes to the cloud");
        }
        Ok(closed.into_iter().map(|(id, ..)| id).collect())
    }

    fn free_bytes(&self) -> Result<u64, StoreError> {
        disk::free_bytes(&self.dir).map_err(|source| StoreError::Io {
            path: self.dir.clone(),
            action: "read the free space of",
            source,
        })
    }

    /// All buffered JPEG bytes, and those of completed inspections (which may be pruned early).
    fn buffered_and_reclaimable(&self) -> Result<(u64, u64), StoreError> {
        let per_state = state_totals(&self.conn).map_err(|e| sqlite_error(&self.path, e))?;
        let buffered = per_state.iter().map(|(_, c)| c.bytes).sum();
        let reclaimable = per_state.iter().find(|(s, _)| s == "completed").map_or(0, |(_, c)| c.bytes);
        Ok((buffered, reclaimable))
    }

    /// Summaries of one inspection or of all, read through `conn` (one snapshot).
    fn summaries_in(
        &self,
        conn: &Connection,
        only: Option<InspectionId>,
    ) -> Result<Vec<InspectionSummary>, StoreError> {
        let err = |e| sqlite_error(&self.path, e);
        let mut failures: HashMap<i64, Vec<(String, String)>> = HashMap::new();
        {
            let (sql, args) = match only {
                Some(id) => (
                    "SELECT inspection_id, angle, reason FROM angle_failures
                     WHERE inspection_id = ?1 ORDER BY rowid",
                    vec![id.0],
                ),
                None => (
                    "SELECT inspection_id, angle, reason FROM angle_failures ORDER BY inspection_id, rowid",
                    vec![],
                ),
            };
            let mut stmt = conn.prepare(sql).map_err(err)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(err)?;
            for row in rows {
                let (id, angle, reason): (i64, String, String) = row.map_err(err)?;
                failures.entry(id).or_default().push((angle, reason));
            }
        }
        const COLUMNS: &str =
            "SELECT id, case_id, state, reason, angles, created_at, updated_at, images, bytes FROM inspections";
        let (sql, args) = match only {
            Some(id) => (format!("{COLUMNS} WHERE id = ?1"), vec![id.0]),
            None => (format!("{COLUMNS} ORDER BY id"), vec![]),
        };
        let mut stmt = conn.prepare(&sql).map_err(err)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), |r| {
                Ok(RawSummary {
                    id: r.get(0)?,
                    case_id: r.get(1)?,
                    state: r.get(2)?,
                    reason: r.get(3)?,
                    angles: r.get(4)?,
                    created_at: r.get(5)?,
                    updated_at: r.get(6)?,
                    images: r.get(7)?,
                    bytes: r.get(8)?,
                })
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let raw = row.map_err(err)?;
            let failed = failures.remove(&raw.id).unwrap_or_default();
            out.push(self.decode(raw, failed)?);
        }
        Ok(out)
    }

    fn decode(
        &self,
        raw: RawSummary,
        failed: Vec<(String, String)>,
    ) -> Result<InspectionSummary, StoreError> {
        let id = InspectionId(raw.id);
        let state = InspectionState::parse(&raw.state)
            .ok_or_else(|| self.unreadable(id, format!("unknown state {:?}", raw.state)))?;
        let angles: Vec<PhotoLabel> = serde_json::from_str(&raw.angles)
            .map_err(|e| self.unreadable(id, format!("angles {:?}: {e}", raw.angles)))?;
        let failed_angles = failed
            .into_iter()
            .map(|(angle, reason)| Ok((self.label(id, &angle)?, reason)))
            .collect::<Result<_, StoreError>>()?;
        Ok(InspectionSummary {
            id,
            case_id: raw.case_id,
            state,
            reason: raw.reason,
            angles,
            images: to_u64(raw.images),
            bytes: to_u64(raw.bytes),
            failed_angles,
            created_at: from_unix_millis(raw.created_at),
            updated_at: from_unix_millis(raw.updated_at),
        })
    }

    fn label(&self, id: InspectionId, value: &str) -> Result<PhotoLabel, StoreError> {
        PhotoLabel::parse(value).map_err(|e| self.unreadable(id, e.to_string()))
    }

    fn unreadable(&self, id: InspectionId, detail: String) -> StoreError {
        StoreError::Unreadable { path: self.path.clone(), id, detail }
    }
}

/// One `inspections` row with its image count and bytes, before decoding.
struct RawSummary {
    id: i64,
    case_id: String,
    state: String,
    reason: Option<String>,
    angles: String,
    created_at: i64,
    updated_at: i64,
    images: i64,
    bytes: i64,
}

/// What a write needs to know about an inspection before changing it.
struct Head {
    case_id: String,
    state: InspectionState,
    angles: Vec<PhotoLabel>,
    images: u64,
}

impl Head {
    /// Images and failures may only be recorded for a requested angle of a capturing inspection.
    fn check_recording(&self, id: InspectionId, angle: PhotoLabel) -> Result<(), StoreError> {
        if self.state != InspectionState::Capturing {
            return Err(StoreError::NotCapturing { id, state: self.state, angle });
        }
        if !self.angles.contains(&angle) {
            let requested: Vec<&str> = self.angles.iter().map(|a| a.as_str()).collect();
            return Err(StoreError::AngleNotRequested { id, angle, requested: requested.join(", ") });
        }
        Ok(())
    }
}

fn load_head(conn: &Connection, path: &Path, id: InspectionId) -> Result<Head, StoreError> {
    let raw: Option<(String, String, String, i64)> = conn
        .query_row("SELECT case_id, state, angles, images FROM inspections WHERE id = ?1", [id.0], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()
        .map_err(|e| sqlite_error(path, e))?;
    let (case_id, state, angles, images) =
        raw.ok_or_else(|| StoreError::UnknownInspection { path: path.to_owned(), id })?;
    let unreadable = |detail| StoreError::Unreadable { path: path.to_owned(), id, detail };
    let state =
        InspectionState::parse(&state).ok_or_else(|| unreadable(format!("unknown state {state:?}")))?;
    let angles = serde_json::from_str(&angles).map_err(|e| unreadable(format!("angles {angles:?}: {e}")))?;
    Ok(Head { case_id, state, angles, images: to_u64(images) })
}

/// Applies a checked state change inside the caller's transaction and logs it.
fn transition(
    conn: &Connection,
    path: &Path,
    id: InspectionId,
    head: &Head,
    to: InspectionState,
    reason: Option<&str>,
    now: SystemTime,
) -> Result<(), StoreError> {
    let from = head.state;
    lifecycle::check_transition(from, to, head.images, reason)
        .map_err(|why| StoreError::IllegalTransition { id, from, to, why })?;
    conn.execute(
        "UPDATE inspections SET state = ?2, reason = ?3, updated_at = ?4 WHERE id = ?1",
        params![id.0, to.as_str(), reason, unix_millis(now)],
    )
    .map_err(|e| sqlite_error(path, e))?;
    log::info!(
        inspection_id = id.0,
        case_id = head.case_id.as_str(),
        from = from.as_str(),
        to = to.as_str(),
        reason = reason.unwrap_or("");
        "Inspection state changed"
    );
    Ok(())
}

/// What one state's inspections hold, from `state_totals`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    inspections: u64,
    images: u64,
    bytes: u64,
}

/// The six rows of `state_totals`, as `(state, counts)`.
fn state_totals(conn: &Connection) -> rusqlite::Result<Vec<(String, Counts)>> {
    let mut stmt = conn.prepare_cached("SELECT state, inspections, images, bytes FROM state_totals")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get(0)?,
            Counts { inspections: to_u64(r.get(1)?), images: to_u64(r.get(2)?), bytes: to_u64(r.get(3)?) },
        ))
    })?;
    rows.collect()
}

fn failures_of(conn: &Connection, id: InspectionId) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt =
        conn.prepare("SELECT angle, reason FROM angle_failures WHERE inspection_id = ?1 ORDER BY rowid")?;
    let rows = stmt.query_map([id.0], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

fn has_image(conn: &Connection, id: InspectionId, angle: PhotoLabel) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM images WHERE inspection_id = ?1 AND angle = ?2)",
        params![id.0, angle.as_str()],
        |r| r.get(0),
    )
}

fn inspection_exists(conn: &Connection, id: InspectionId) -> rusqlite::Result<bool> {
    conn.query_row("SELECT EXISTS (SELECT 1 FROM inspections WHERE id = ?1)", [id.0], |r| r.get(0))
}

/// The store's own checks of a new inspection: at least one angle, each once.
fn check_angles(new: &NewInspection<'_>) -> Result<(), StoreError> {
    let why = if new.angles.is_empty() {
        Some("no angle was requested".to_owned())
    } else {
        new.angles
            .iter()
            .enumerate()
            .find(|(i, a)| new.angles[..*i].contains(a))
            .map(|(_, a)| format!("angle {a} is requested twice"))
    };
    match why {
        Some(why) => Err(StoreError::InvalidInspection { case_id: new.case_id.to_string(), why }),
        None => Ok(()),
    }
}

/// SQLite integers are signed; sizes and counts stored by this module are never negative.
fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for state in InspectionState::ALL {
            assert_eq!(InspectionState::parse(state.as_str()), Some(state));
            assert_eq!(state.as_str().parse::<InspectionState>(), Ok(state));
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()), "serde and the buffer agree");
        }
        assert_eq!(InspectionState::parse("Captured"), None);
    }

    #[test]
    fn a_new_inspection_needs_distinct_angles() {
        let case = CaseId::parse("CASE-1").unwrap();
        let new = |angles| NewInspection { case_id: &case, vehicle: None, angles, expected_image_bytes: 1 };
        assert!(check_angles(&new(&[PhotoLabel::Front, PhotoLabel::Rear])).is_ok());
        let twice =
            check_angles(&new(&[PhotoLabel::Front, PhotoLabel::Rear, PhotoLabel::Front])).unwrap_err();
        assert_eq!(
            twice.to_string(),
            "inspection for case CASE-1 not started: angle Front is requested twice"
        );
        assert!(check_angles(&new(&[])).unwrap_err().to_string().contains("no angle was requested"));
    }
}
