//! The durable buffer: every inspection and every image the bay captured, in one SQLite file
//! in the state directory, kept until the cloud has it.
//!
//! # Design constraints
//!
//! The kiosk runs unattended for months. Power is cut without warning, the process is killed,
//! the disk fills up. Through all of that an image that was reported as stored must never be
//! lost, and nothing may leave the buffer before the cloud has it. Speed and file size come
//! second. The buffer is one process's: writes come from the capture threads and the uploader
//! of one daemon (behind a mutex); the CLI may open it alongside to read.
//!
//! # On-disk layout
//!
//! One SQLite database, `buffer.sqlite3`, in the state directory (created if missing), with
//! SQLite's own `buffer.sqlite3-wal` and `buffer.sqlite3-shm` next to it, and an empty
//! `buffer.sqlite3.lock` whose `flock` marks the process that owns the buffer (the kernel
//! drops it when that process dies, however it dies).
//!
//! Pragmas, set on every open, outside any transaction:
//! - `journal_mode=WAL`, set with `pragma_update_and_check`; any answer but `wal` is an error
//!   ([`StoreError::NoWal`]). Readers never block the writer and a commit is one append.
//! - `synchronous=FULL`: a commit is fsync'd before it returns, so it survives a power cut.
//! - `foreign_keys=ON`: images and angle failures cannot outlive their inspection.
//! - `busy_timeout` of 5 s: a second connection waits for a lock instead of failing at once.
//! - `auto_vacuum=INCREMENTAL`, set while the file is still empty (it cannot change once a
//!   table exists without a full `VACUUM`), so pruning gives pages back to the file system
//!   with `PRAGMA incremental_vacuum`.
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
//!   change and nothing else.
//!
//! `images`, one row per stored angle, `UNIQUE (inspection_id, angle)`:
//! `inspection_id` (→ `inspections.id`, `ON DELETE CASCADE`), `angle` (API label), `camera`,
//! `captured_at` (unix ms), `source_width`, `source_height`, `source_bytes` (the camera's
//! frame), `width`, `height`, `bytes` (the stored JPEG), `sha256` (lowercase hex, computed by
//! the store from the blob), `jpeg BLOB` (the JPEG itself, last so that scans of the other
//! columns do not read it; an index on `(inspection_id, bytes)` serves the byte totals).
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
//! (`store/salvage.rs`).
//!
//! ## Upload state (schema version 2)
//!
//! `inspections` gains `upload_attempts INTEGER` (tries that stopped short of completion),
//! `upload_error TEXT NULL` (why the last one stopped) and `session TEXT NULL` (the cloud session
//! the inspection is being sent under). `sent` rows (`inspection_id`, `session`, `angle`, `sha256`,
//! `at`; unique per inspection, session and angle) say which images that session holds as far as
//! the kiosk knows. `dead_sessions` (`session` primary key, `inspection_id`, `why`, `at`) lists
//! sessions given up for good (expired, consumed, or incomplete when their tokens were lost with a
//! restart): [`Store::open_session`] refuses them. No token is ever stored: see `store/upload.rs`.
//!
//! # Inspection states
//!
//! | from | to | how |
//! |---|---|---|
//! | `capturing` | `captured` | [`Store::finish_capture`] with at least one image |
//! | `capturing` | `failed` | [`Store::finish_capture`] with no image: "no angle was captured (…)" |
//! | `capturing` | `cancelled` | [`Store::cancel`]; or at open, when the process capturing it died |
//! | `captured` | `uploading` | the uploader takes it |
//! | `captured` | `failed`, `cancelled` | given up for good; an operator's cancel |
//! | `uploading` | `completed` | the cloud accepted the inspection |
//! | `uploading` | `captured` | the upload stopped (crash, expired session): back in the queue |
//! | `uploading` | `failed` | the cloud refused it for good |
//! | `failed`, `cancelled` | `captured` | an operator's retry; needs at least one image |
//! | `completed` | — | final: it leaves only through [`Store::prune_completed`] |
//!
//! Every other move is refused with [`StoreError::IllegalTransition`] and changes nothing;
//! moving to `failed` or `cancelled` needs a reason. [`Store::set_state`] applies any legal
//! move; `finish_capture` and `cancel` are the capture pipeline's shorthands for it.
//!
//! # Invariants
//!
//! - **An image is durable once its transaction commits**: when [`Store::add_image`] returns
//!   `Ok`, the image survives a kill or a power cut. A write that fails or is interrupted
//!   leaves nothing behind.
//! - **The JPEG bytes live in the database** as a blob next to the sha256 the store computed
//!   from them; [`Store::image_jpeg`] checks the hash on every read and reports a mismatch as
//!   [`StoreError::Corrupt`] instead of handing out damaged evidence.
//! - **Rows leave only through a logged retention rule**: [`Store::prune_completed`] deletes
//!   `completed` inspections (the cloud has them) last updated before its cutoff, logging each
//!   at INFO. Nothing that is not uploaded is ever deleted, whatever the caps say.
//! - **Caps refuse, never evict**: when the buffer or the disk is full, a new inspection (or
//!   image) is refused with [`StoreError::Full`] and nothing buffered is touched.
//! - **An angle is captured or failed, never both**, and at most once: a second image of the
//!   same angle is refused ([`StoreError::AngleAlreadyStored`]), not swapped in. Images and
//!   failures are only recorded while the inspection is `capturing`.
//! - **Nothing stays `capturing` across a restart**: the owner's open cancels what a dead
//!   process left capturing, keeping its images (see below).
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
//! 3. The schema is migrated forward.
//! 4. The owner cancels every inspection still `capturing`, with the reason "capture
//!    interrupted: the kiosk stopped before this inspection finished; N images kept", logged at
//!    WARN. Its images stay.
//!
//! [`Store::recovery`] reports what happened.

mod caps;
mod commands;
mod disk;
mod error;
mod lifecycle;
mod salvage;
mod schema;
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
pub use salvage::{
    acknowledge_recoveries, check_buffer, BufferCheck, LostAngle, LostInspection, RecoveryRecord,
    SalvageReport,
};
pub use schema::SCHEMA_VERSION;
pub use upload::UploadState;

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

/// Where an inspection stands. The module doc lists the legal moves between states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InspectionState {
    /// Angles are being captured; images and angle failures may be added.
    Capturing,
    /// Capture is over with at least one image; waiting for upload.
    Captured,
    /// The uploader is sending it.
    Uploading,
    /// The cloud has it; it may be pruned after the retention period.
    Completed,
    /// Given up, with a reason; images kept.
    Failed,
    /// Stopped by an operator or by a crash mid-capture, with a reason; images kept.
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
    /// When the oldest inspection in the buffer was created (MQTT's `oldest_age_s`).
    #[serde(skip)]
    pub oldest_created_at: Option<SystemTime>,
}

/// What [`Store::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Inspections found `capturing`, left by a process that died mid-capture; each was
    /// cancelled with its images kept.
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
    /// Held for the store's lifetime when this process owns the buffer.
    _lock: Option<std::fs::File>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("caps", &self.caps)
            .field("recovery", &self.recovery)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the buffer in `state_dir` (creating both if missing), moves a damaged file aside,
    /// migrates the schema and cancels inspections a dead process left `capturing`; the module
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
        let opened = match salvage::refuse_flagged(&path, owner).and_then(|()| schema::open(&path, owner)) {
            Err(StoreError::Corrupt { detail, .. }) if owner => {
                recovery.moved_aside = Some(salvage::replace_damaged(&path, &detail, now, found)?);
                schema::open(&path, owner)?
            }
            other => other?,
        };
        recovery.migrated_from = opened.migrated_from;
        // The file or its companions may be new: make their directory entries durable.
        disk::sync_dir(state_dir).map_err(|e| io("sync", e))?;

        let mut store =
            Store { conn: opened.connection, path, dir: state_dir.to_owned(), caps, recovery, _lock: lock };
        if owner {
            store.recovery.interrupted = store.cancel_interrupted(now)?;
        }
        Ok(store)
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
    /// bytes plus `expected_image_bytes` per angle must stay within `max_bytes`, and the file
    /// system must keep `min_free_disk` free after that estimate. A refusal is
    /// [`StoreError::Full`], logged at WARN, and writes nothing.
    pub fn begin_inspection(
        &mut self,
        new: &NewInspection<'_>,
        now: SystemTime,
    ) -> Result<InspectionId, StoreError> {
        check_angles(new)?;
        let needed = new.expected_image_bytes.saturating_mul(new.angles.len() as u64);
        let free = self.free_bytes()?;
        let vehicle = new.vehicle.map(|v| {
            serde_json::to_string(v).expect("a Vehicle is strings and numbers, which always serialise")
        });
        let angles = serde_json::to_string(new.angles).expect("photo labels always serialise");
        let path = self.path.clone();
        let err = |e| sqlite_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let buffered: i64 =
            tx.query_row("SELECT COALESCE(SUM(bytes), 0) FROM images", [], |r| r.get(0)).map_err(err)?;
        if let Err(refusal) = caps::check_inspection(self.caps, to_u64(buffered), free, needed) {
            log::warn!(case_id = new.case_id.as_str(), refusal:% = refusal; "Inspection refused: the buffer is full");
            return Err(StoreError::Full {
                path: self.path.clone(),
                what: format!("a new inspection for case {}", new.case_id),
                refusal,
            });
        }
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
    /// file system's free space below `min_free_disk`. A refusal writes nothing.
    pub fn add_image(&mut self, id: InspectionId, image: &NewImage<'_>) -> Result<(), StoreError> {
        let bytes = image.jpeg.len() as u64;
        let free = self.free_bytes()?;
        if let Err(refusal) = caps::check_image(self.caps, free, bytes) {
            log::warn!(inspection_id = id.0, angle = image.angle.as_str(), refusal:% = refusal; "Image refused: the disk is full");
            return Err(StoreError::Full {
                path: self.path.clone(),
                what: format!("image {} of inspection {id}", image.angle),
                refusal,
            });
        }
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
        // The angle is captured now, so it is no longer failed.
        tx.execute(
            "DELETE FROM angle_failures WHERE inspection_id = ?1 AND angle = ?2",
            params![id.0, image.angle.as_str()],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Records why an angle of a `capturing` inspection could not be captured. Recording the
    /// same angle again replaces the reason; an angle that has its image cannot fail.
    pub fn record_angle_failure(
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

    /// Ends the capture: `captured` when at least one image is stored, otherwise `failed`
    /// with the reason "no angle was captured" and why each angle failed. Returns the new state.
    pub fn finish_capture(
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

    /// Cancels a `capturing` or `captured` inspection with `reason`; its images stay.
    pub fn cancel(&mut self, id: InspectionId, reason: &str, now: SystemTime) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |e| sqlite_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let head = load_head(&tx, &self.path, id)?;
        if !matches!(head.state, InspectionState::Capturing | InspectionState::Captured) {
            return Err(StoreError::IllegalTransition {
                id,
                from: head.state,
                to: InspectionState::Cancelled,
                why: "only a capturing or captured inspection can be cancelled".to_owned(),
            });
        }
        transition(&tx, &self.path, id, &head, InspectionState::Cancelled, Some(reason), now)?;
        tx.commit().map_err(err)
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
        let path = self.path.clone();
        let err = |e| sqlite_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let head = load_head(&tx, &self.path, id)?;
        transition(&tx, &self.path, id, &head, to, reason, now)?;
        tx.commit().map_err(err)?;
        Ok(head.state)
    }

    /// One inspection, or `None` if there is no such id.
    pub fn inspection(&self, id: InspectionId) -> Result<Option<InspectionSummary>, StoreError> {
        let mut found = self.summaries(Some(id))?;
        Ok(found.pop())
    }

    /// Every inspection in the buffer, oldest first.
    pub fn list(&self) -> Result<Vec<InspectionSummary>, StoreError> {
        self.summaries(None)
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

    /// What the whole buffer holds, read in one consistent snapshot.
    pub fn totals(&self) -> Result<Totals, StoreError> {
        self.conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM inspections),
                        (SELECT COUNT(*) FROM images),
                        (SELECT COALESCE(SUM(bytes), 0) FROM images),
                        (SELECT COUNT(*) FROM inspections WHERE state IN ('captured', 'uploading')),
                        (SELECT MIN(created_at) FROM inspections)",
                [],
                |r| {
                    Ok(Totals {
                        inspections: to_u64(r.get(0)?),
                        images: to_u64(r.get(1)?),
                        bytes: to_u64(r.get(2)?),
                        awaiting_upload: to_u64(r.get(3)?),
                        oldest_created_at: r.get::<_, Option<i64>>(4)?.map(from_unix_millis),
                    })
                },
            )
            .map_err(|e| sqlite_error(&self.path, e))
    }

    /// The retention rule: deletes the `completed` inspections last updated before
    /// `older_than`, with their images, logging each at INFO, then gives the freed pages back
    /// to the file system. Touches nothing in any other state. Returns how many were pruned.
    pub fn prune_completed(&mut self, older_than: SystemTime) -> Result<u64, StoreError> {
        let path = self.path.clone();
        let err = |e| sqlite_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let doomed: Vec<(i64, String, i64, i64)> = {
            let mut stmt = tx
                .prepare(
                    "SELECT i.id, i.case_id,
                            (SELECT COUNT(*) FROM images m WHERE m.inspection_id = i.id),
                            (SELECT COALESCE(SUM(bytes), 0) FROM images m WHERE m.inspection_id = i.id)
                     FROM inspections i
                     WHERE i.state = 'completed' AND i.updated_at < ?1
                     ORDER BY i.id",
                )
                .map_err(err)?;
            let rows = stmt
                .query_map([unix_millis(older_than)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .map_err(err)?;
            rows.collect::<Result<_, _>>().map_err(err)?
        };
        for (id, ..) in &doomed {
            tx.execute("DELETE FROM inspections WHERE id = ?1 AND state = 'completed'", [id]).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        for (id, case_id, images, bytes) in &doomed {
            log::info!(inspection_id = *id, case_id = case_id.as_str(), images = *images, bytes = *bytes; "Completed inspection pruned from the buffer");
        }
        if !doomed.is_empty() {
            if let Err(e) = self.give_space_back() {
                // The rows are gone for good either way; the space comes back at the next prune.
                log::warn!(path:% = self.path.display(), error:% = e; "Buffer space not given back after pruning");
            }
        }
        Ok(doomed.len() as u64)
    }

    /// Bytes free on the state directory's file system, as the caps see it.
    pub fn disk_free_bytes(&self) -> Result<u64, StoreError> {
        self.free_bytes()
    }

    /// The refusal [`Store::begin_inspection`] would give an inspection of `angles` angles of
    /// `expected_image_bytes` each right now, or `None` if it would be accepted (MQTT's
    /// `buffer.full`).
    pub fn would_refuse(
        &self,
        angles: usize,
        expected_image_bytes: u64,
    ) -> Result<Option<Refusal>, StoreError> {
        let needed = expected_image_bytes.saturating_mul(angles as u64);
        let free = self.free_bytes()?;
        let totals = self.totals()?;
        Ok(caps::check_inspection(self.caps, totals.bytes, free, needed).err())
    }

    /// Runs the full `PRAGMA integrity_check` and re-hashes every image. Returns the problems
    /// found, none when the buffer is sound. Reads the whole file: slow on a big buffer.
    pub fn check_integrity(&self) -> Result<Vec<String>, StoreError> {
        salvage::integrity(&self.conn).map(|(problems, _)| problems).map_err(|e| sqlite_error(&self.path, e))
    }

    /// Pages the buffer file has now (of `PRAGMA page_size` bytes each).
    pub fn page_count(&self) -> Result<u64, StoreError> {
        self.conn
            .pragma_query_value(None, "page_count", |r| r.get::<_, i64>(0))
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

    /// Cancels every inspection still `capturing`: its process died mid-capture.
    fn cancel_interrupted(&mut self, now: SystemTime) -> Result<Vec<InspectionId>, StoreError> {
        let path = self.path.clone();
        let err = |e| sqlite_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let found: Vec<(i64, String, i64)> = {
            let mut stmt = tx
                .prepare(
                    "SELECT i.id, i.case_id, (SELECT COUNT(*) FROM images m WHERE m.inspection_id = i.id)
                     FROM inspections i WHERE i.state = 'capturing' ORDER BY i.id",
                )
                .map_err(err)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(err)?;
            rows.collect::<Result<_, _>>().map_err(err)?
        };
        for (id, _, images) in &found {
            tx.execute(
                "UPDATE inspections SET state = 'cancelled', reason = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, lifecycle::interrupted_reason(to_u64(*images)), unix_millis(now)],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        for (id, case_id, images) in &found {
            log::warn!(inspection_id = *id, case_id = case_id.as_str(), images = *images; "Capture interrupted by a stop of the kiosk: inspection cancelled, images kept");
        }
        Ok(found.into_iter().map(|(id, ..)| InspectionId(id)).collect())
    }

    /// `PRAGMA incremental_vacuum` (stepped to the end: each step frees one page), then a
    /// checkpoint so the file really shrinks.
    fn give_space_back(&self) -> rusqlite::Result<()> {
        let mut stmt = self.conn.prepare("PRAGMA incremental_vacuum")?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
        drop(rows);
        let mut stmt = self.conn.prepare("PRAGMA wal_checkpoint(TRUNCATE)")?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
        Ok(())
    }

    fn free_bytes(&self) -> Result<u64, StoreError> {
        disk::free_bytes(&self.dir).map_err(|source| StoreError::Io {
            path: self.dir.clone(),
            action: "read the free space of",
            source,
        })
    }

    /// Summaries of one inspection or of all, read in one snapshot.
    fn summaries(&self, only: Option<InspectionId>) -> Result<Vec<InspectionSummary>, StoreError> {
        let err = |e| sqlite_error(&self.path, e);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let filter = only.map(|id| id.0);
        let mut failures: HashMap<i64, Vec<(String, String)>> = HashMap::new();
        {
            let mut stmt = tx
                .prepare(
                    "SELECT inspection_id, angle, reason FROM angle_failures
                     WHERE ?1 IS NULL OR inspection_id = ?1 ORDER BY inspection_id, rowid",
                )
                .map_err(err)?;
            let rows = stmt.query_map([filter], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(err)?;
            for row in rows {
                let (id, angle, reason): (i64, String, String) = row.map_err(err)?;
                failures.entry(id).or_default().push((angle, reason));
            }
        }
        let mut stmt = tx
            .prepare(
                "SELECT i.id, i.case_id, i.state, i.reason, i.angles, i.created_at, i.updated_at,
                        (SELECT COUNT(*) FROM images m WHERE m.inspection_id = i.id),
                        (SELECT COALESCE(SUM(bytes), 0) FROM images m WHERE m.inspection_id = i.id)
                 FROM inspections i WHERE ?1 IS NULL OR i.id = ?1 ORDER BY i.id",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([filter], |r| {
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
        .query_row(
            "SELECT case_id, state, angles, (SELECT COUNT(*) FROM images m WHERE m.inspection_id = i.id)
             FROM inspections i WHERE id = ?1",
            [id.0],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
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
