//! Salvage of a damaged buffer file: what can still be read, and whose sha256 still matches, is
//! copied into a fresh buffer; the damaged file is kept aside untouched; and a report of what
//! was recovered and what was lost stays in the buffer (`recoveries`, schema version 4) until
//! an operator acknowledges it.
//!
//! # Finding damage
//!
//! The owner's open runs `PRAGMA quick_check` (see [`super`]). Damage only a hash can see (an
//! image's bytes changed on a sound page) is found by `capture-kiosk check`, which re-hashes
//! every image ([`check_buffer`]), and by [`super::Store::image_jpeg`] at each read; either
//! leaves a note, `buffer.sqlite3.damaged`, and the owner's next open salvages the buffer.
//! The open that finds damage changes nothing: it does not checkpoint the log into the file on
//! close, and puts back the `-shm` it touched and removes the empty `-wal` it made
//! ([`Companions`]). `check` takes no lock and writes nothing to the buffer: it reads it
//! read-only, as an immutable file when no `-wal` or `-shm` shows that someone has it open.
//!
//! # Reading a damaged file
//!
//! The damaged file is never opened for writing. It is read through a scratch directory
//! (`buffer.sqlite3.salvage-read`) holding a hard link to it (a copy where links are not
//! possible) and a copy of its `-wal`, opened read-only, so that SQLite's shared-memory index
//! and the write-ahead log of the original stay byte for byte as they were. `writable_schema`
//! lets SQLite read a file cut short (it refuses one whose header claims more pages than there
//! are), and `cell_size_check` makes it refuse a damaged page rather than misread it.
//!
//! When the first page (the 100-byte header, then the table directory) is damaged, so that the
//! file is "not a database", a copy is read with that page rebuilt: first with a sane header in
//! place of the damaged one, then with the whole first page of a fresh buffer made by this
//! build. Migrations only ever add tables, and with incremental auto-vacuum the root pages are
//! the first pages of the file in the order the tables were created, so a fresh buffer's table
//! directory points at the same pages. Whatever is read that way goes through the same checks
//! as anything else, so a wrong guess loses rows rather than inventing them.
//!
//! Every row is read on its own, by rowid: a table is scanned in rowid order until a damaged
//! page stops the scan, then the scan resumes past it (found by jumping ahead, doubling the
//! jump) and the rowids skipped are tried one by one. So one bad page loses what is on it and
//! nothing else. An image is read from the `images` table by rowid and also found through the
//! `(inspection_id, angle)` index, which names the angle of a row the table can no longer give.
//!
//! # What is copied
//!
//! - An inspection whose row reads back with a valid case id, state and angles, with the id it
//!   had. `uploading` becomes `captured` (the upload starts again, asking the cloud about the
//!   session the buffer names); `capturing` stays, for [`super::Store::open`] to handle as any
//!   interrupted capture. A `captured` inspection with no image left becomes `failed`.
//! - An image whose bytes match the sha256 and length stored with it; any other is lost.
//! - Angle failures, `sent` rows that match a recovered image, sessions given up (so that they
//!   stay given up), remembered command answers and earlier salvage reports, where readable.
//! - The id sequence: the new buffer never hands out an id the damaged one did. When the
//!   damaged file's sequence cannot be read, it is set [`ID_MARGIN`] past the highest id seen.
//!
//! An angle whose image was found but could not be read or no longer matches its hash, or (when
//! the `images` table was damaged) a requested angle with neither image nor failure, is lost: the
//! report names it and the new buffer records it as the angle's failure, so `queue` shows it.
//! Text that reads with zeros or control characters in it (a page cut short) is not trusted:
//! such a session name is dropped and the inspection goes to a new session. Inspections the
//! cloud already completed are copied but never reported as loss.
//!
//! # Crash safety
//!
//! The fresh buffer is built as `buffer.sqlite3.salvage`, renamed `buffer.sqlite3.salvaged` once
//! it is whole and synced; only then is the damaged file moved aside and the salvaged one put in
//! its place. A stop at any point leaves either the damaged file in place (the next start
//! salvages again) or the salvaged buffer waiting ([`finish_interrupted`] puts it in place).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};
use sha2::{Digest, Sha256};

use super::error::sqlite_error;
use super::{disk, schema, InspectionId, InspectionState, Store, StoreError};
use crate::clock::{from_unix_millis, rfc3339_seconds, unix_millis};
use crate::vehicle::{CaseId, PhotoLabel};

/// How far past the highest id seen the id sequence of a salvaged buffer is set when the
/// damaged file's own sequence cannot be read: ids that were handed out and then lost with a
/// damaged page are never given again.
pub const ID_MARGIN: i64 = 1000;

/// The fresh buffer while it is built.
const STAGING: &str = ".salvage";
/// The fresh buffer once it is whole and synced, until it takes the damaged file's place.
const SALVAGED: &str = ".salvaged";
/// The directory holding what the damaged file is read through.
const SCRATCH: &str = ".salvage-read";
/// A note next to the buffer that damage was found which `quick_check` cannot see (an image
/// whose bytes no longer match their sha256): the owner's next open salvages the buffer.
const DAMAGE_FLAG: &str = ".damaged";
/// Point reads tried one rowid at a time across damaged stretches, at most, per salvage.
const PROBE_BUDGET: u64 = 2_000_000;
/// How far past the last readable rowid single reads go when a table's end cannot be read.
const BLIND_WINDOW: i64 = 100_000;
/// The page size of every buffer this build creates (SQLite's default).
const PAGE_SIZE: u64 = 4096;

/// What a salvage found: what went into the fresh buffer and what was lost. Kept as JSON in the
/// `recoveries` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SalvageReport {
    /// Inspections copied into the fresh buffer, with the ids they had.
    pub inspections_recovered: u64,
    /// Images copied, each matching the sha256 stored with it.
    pub images_recovered: u64,
    /// Inspections not yet completed by the cloud that lost images, and inspections lost
    /// entirely whose case id could still be read.
    pub lost: Vec<LostInspection>,
    /// Inspections lost entirely whose case id could not be read (known only by rows of other
    /// tables that name them).
    pub lost_without_case_id: u64,
    /// Image rows found that could not be put down to an inspection in `lost` (their owner or
    /// their angle unreadable, or their inspection lost without a case id).
    pub images_unaccounted: u64,
    /// Part of the `inspections` table could not be read at all, so inspections may be lost that
    /// nothing in the file names any more.
    pub more_may_be_lost: bool,
    /// How the file was read and which parts could not be.
    pub notes: Vec<String>,
}

/// An inspection that lost images, or was lost entirely.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LostInspection {
    pub id: InspectionId,
    pub case_id: String,
    /// Its state in the fresh buffer; `None` when it was lost entirely.
    pub state: Option<InspectionState>,
    /// The angles whose image was lost, with why; for an inspection lost entirely, why it was.
    pub angles: Vec<LostAngle>,
}

/// One lost image (or, with `angle` empty, why a whole inspection was lost).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LostAngle {
    pub angle: String,
    pub why: String,
}

/// One salvage, as the buffer keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecoveryRecord {
    pub id: i64,
    #[serde(skip)]
    pub at: SystemTime,
    /// Where the damaged file (and its `-wal` and `-shm`) was kept, untouched.
    pub moved_to: PathBuf,
    /// What SQLite said about the damage.
    pub damage: String,
    #[serde(skip)]
    pub acknowledged_at: Option<SystemTime>,
    pub report: SalvageReport,
}

impl RecoveryRecord {
    /// One sentence for a person: what happened, what was recovered, what was lost, where the
    /// damaged file is.
    pub fn summary(&self) -> String {
        let r = &self.report;
        let mut lost: Vec<String> = r.lost.iter().map(LostInspection::describe).collect();
        if r.lost_without_case_id > 0 {
            lost.push(format!("{} inspection(s) whose case id is unreadable", r.lost_without_case_id));
        }
        if r.images_unaccounted > 0 {
            lost.push(format!("{} image(s) not tied to any inspection listed", r.images_unaccounted));
        }
        if r.more_may_be_lost {
            lost.push("possibly more: part of the inspections table is unreadable".to_owned());
        }
        let lost = if lost.is_empty() { "nothing".to_owned() } else { lost.join("; ") };
        format!(
            "the buffer file was damaged ({}) and salvaged at {}: {} inspection(s) with {} image(s) recovered; lost: {}; the damaged file is kept at {}",
            self.damage_in_short(),
            rfc3339_seconds(self.at),
            r.inspections_recovered,
            r.images_recovered,
            lost,
            self.moved_to.display()
        )
    }

    /// One line each: what was lost, the notes, the damage and where the file is kept.
    pub fn details(&self) -> Vec<String> {
        let r = &self.report;
        let mut out: Vec<String> = r.lost.iter().map(|l| format!("lost: {}", l.describe())).collect();
        if r.lost_without_case_id > 0 {
            out.push(format!("lost: {} inspection(s) whose case id is unreadable", r.lost_without_case_id));
        }
        if r.images_unaccounted > 0 {
            out.push(format!("lost: {} image(s) not tied to any inspection listed", r.images_unaccounted));
        }
        if r.more_may_be_lost {
            out.push("more may be lost: part of the inspections table is unreadable".to_owned());
        }
        out.extend(r.notes.iter().map(|n| format!("note: {n}")));
        out.push(format!("damage: {}", self.damage_in_short()));
        out.push(format!("the damaged file is kept, untouched, at {}", self.moved_to.display()));
        out
    }

    /// The first of SQLite's complaints, on one line.
    pub fn damage_in_short(&self) -> String {
        let mut lines =
            self.damage.lines().filter(|l| !l.trim().is_empty() && !l.contains("*** in database"));
        let first = lines.next().unwrap_or(&self.damage).trim().to_owned();
        let more = lines.count();
        let first = if first.chars().count() > 160 {
            first.chars().take(160).collect::<String>() + "…"
        } else {
            first
        };
        if more > 0 {
            format!("{first} and {more} more complaint(s)")
        } else {
            first
        }
    }

    /// Whether an operator has acknowledged it.
    pub fn acknowledged(&self) -> bool {
        self.acknowledged_at.is_some()
    }

    /// The record as `queue --json` and the `buffer_recovered` event show it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["at"] = serde_json::json!(rfc3339_seconds(self.at));
        v["acknowledged_at"] = serde_json::json!(self.acknowledged_at.map(rfc3339_seconds));
        v["summary"] = serde_json::json!(self.summary());
        v
    }
}

impl LostInspection {
    /// `inspection 2 (CASE-B, captured): Rear (its bytes no longer match their sha256)`.
    pub fn describe(&self) -> String {
        let state = self.state.map_or("lost entirely".to_owned(), |s| s.to_string());
        let angles: Vec<String> = self
            .angles
            .iter()
            .map(|a| if a.angle.is_empty() { a.why.clone() } else { format!("{} ({})", a.angle, a.why) })
            .collect();
        format!("inspection {} ({}, {}): {}", self.id, self.case_id, state, angles.join(", "))
    }
}

/// What `check` found in a buffer, read without taking it over: nothing is moved or changed
/// (damage found is noted next to it, for the next start to salvage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferCheck {
    /// The buffer file.
    pub path: PathBuf,
    /// Whether there is a buffer file yet.
    pub exists: bool,
    /// What `PRAGMA integrity_check` and the re-hash of every image found; empty when sound.
    pub problems: Vec<String>,
    /// Images whose bytes were hashed again.
    pub images_checked: u64,
    /// Salvage reports not acknowledged yet.
    pub unacknowledged: Vec<RecoveryRecord>,
}

/// Checks the buffer in `state_dir` the way `capture-kiosk check` does: a read-only
/// connection (no lock taken, nothing created, moved or migrated, so it is safe while the
/// daemon runs), the full `PRAGMA integrity_check`, a sha256 of every image against the one
/// stored with it, and the salvage reports not acknowledged yet. Damage is reported in
/// `problems` and noted next to the buffer, so that the owner's next open salvages it even when
/// `quick_check` cannot see it; `Err` only when the file cannot be opened at all.
pub fn check_buffer(state_dir: &Path) -> Result<BufferCheck, StoreError> {
    let path = state_dir.join(super::FILE_NAME);
    let mut check = BufferCheck {
        path: path.clone(),
        exists: false,
        problems: Vec::new(),
        images_checked: 0,
        unacknowledged: Vec::new(),
    };
    if !disk::exists(&path) {
        return Ok(check);
    }
    check.exists = true;
    let err = |e| sqlite_error(&path, e);
    // Without a `-wal` or `-shm` nobody has the file open: it is read as it is, creating
    // nothing next to it. Otherwise it is read through them, as the daemon writes it.
    let in_use = ["-wal", "-shm"].iter().any(|s| disk::exists(&disk::with_suffix(&path, s)));
    let target = if in_use { path.to_string_lossy().into_owned() } else { immutable_uri(&path) };
    let conn = Connection::open_with_flags(
        target,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(err)?;
    conn.busy_timeout(schema::BUSY_TIMEOUT).map_err(err)?;
    match integrity(&conn) {
        Ok((problems, images)) => {
            check.problems = problems;
            check.images_checked = images;
        }
        Err(e) if is_damage(&e) => check.problems.push(e.to_string()),
        Err(e) => return Err(err(e)),
    }
    if check.problems.is_empty() {
        check.unacknowledged =
            read_recoveries(&conn).map_err(err)?.into_iter().filter(|r| !r.acknowledged()).collect();
    } else {
        flag_damage(&path, &check.problems.join("; "));
    }
    Ok(check)
}

/// `file:<path>?immutable=1`: read-only, no lock, no `-wal` or `-shm` looked for or made.
fn immutable_uri(path: &Path) -> String {
    let mut uri = String::from("file:");
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3f"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    uri.push_str("?immutable=1");
    uri
}

/// Leaves a note next to the buffer at `path` that it is damaged in a way `quick_check` does
/// not see, so that the owner's next open salvages it. Best effort: logged when it fails.
pub(crate) fn flag_damage(path: &Path, detail: &str) {
    let flag = disk::with_suffix(path, DAMAGE_FLAG);
    if disk::exists(&flag) {
        return;
    }
    match std::fs::write(&flag, detail) {
        Ok(()) => {
            log::error!(path:% = path.display(), detail = detail; "Buffer damage found: it is salvaged at the next start")
        }
        Err(e) => {
            log::error!(path:% = flag.display(), error:% = e; "Buffer damage found but the note asking for a salvage cannot be written")
        }
    }
}

/// The damage noted by [`flag_damage`] and not salvaged yet, if any.
pub(crate) fn flagged_damage(path: &Path) -> Option<String> {
    let flag = disk::with_suffix(path, DAMAGE_FLAG);
    if !disk::exists(&flag) {
        return None;
    }
    let detail = std::fs::read_to_string(&flag).unwrap_or_default();
    Some(if detail.trim().is_empty() { "an image no longer matches its sha256".to_owned() } else { detail })
}

/// `Ok` unless damage was noted for the buffer and this process owns it: then it is
/// [`StoreError::Corrupt`] before the file is even opened, so that [`super::Store::open`]
/// salvages it and keeps it aside as it was.
pub(crate) fn refuse_flagged(path: &Path, owner: bool) -> Result<(), StoreError> {
    match flagged_damage(path) {
        Some(detail) if owner && disk::exists(path) => {
            Err(StoreError::Corrupt { path: path.to_owned(), detail: format!("noted earlier: {detail}") })
        }
        _ => Ok(()),
    }
}

/// Marks every salvage report of the buffer in `state_dir` acknowledged, at `now`, through a
/// connection of its own (no lock taken, so the daemon may run meanwhile: its state leaves
/// `alert` at its next publish). Returns the reports acknowledged.
pub fn acknowledge_recoveries(state_dir: &Path, now: SystemTime) -> Result<Vec<RecoveryRecord>, StoreError> {
    let path = state_dir.join(super::FILE_NAME);
    let err = |e| sqlite_error(&path, e);
    let mut conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(schema::BUSY_TIMEOUT).map_err(err)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(err)?;
    let open: Vec<RecoveryRecord> =
        read_recoveries(&tx).map_err(err)?.into_iter().filter(|r| !r.acknowledged()).collect();
    for record in &open {
        tx.execute(
            "UPDATE recoveries SET acknowledged_at = ?2 WHERE id = ?1",
            params![record.id, unix_millis(now)],
        )
        .map_err(err)?;
    }
    tx.commit().map_err(err)?;
    for record in &open {
        log::warn!(recovery_id = record.id, moved_to:% = record.moved_to.display(); "Buffer salvage report acknowledged by an operator");
    }
    Ok(open)
}

impl Store {
    /// Every salvage this buffer came out of, oldest first; none for a buffer that was never
    /// damaged.
    pub fn recoveries(&self) -> Result<Vec<RecoveryRecord>, StoreError> {
        read_recoveries(&self.conn).map_err(|e| sqlite_error(&self.path, e))
    }

    /// The salvage reports an operator has not acknowledged yet: while there is one, the kiosk
    /// is in alert (a human must account for what was lost).
    pub fn unacknowledged_recoveries(&self) -> Result<Vec<RecoveryRecord>, StoreError> {
        Ok(self.recoveries()?.into_iter().filter(|r| !r.acknowledged()).collect())
    }

    /// Damage found while the buffer was open (an image whose bytes no longer match their
    /// sha256) that waits for the salvage at the next start.
    pub fn damage_found(&self) -> Option<String> {
        flagged_damage(&self.path)
    }
}

/// The full `PRAGMA integrity_check` and a sha256 of every image against the one stored with
/// it: the problems found (none when sound) and how many images were hashed.
pub(crate) fn integrity(conn: &Connection) -> rusqlite::Result<(Vec<String>, u64)> {
    let tx = conn.unchecked_transaction()?;
    let mut problems = schema::check_rows(&tx, "integrity_check")?;
    let mut hashed = 0;
    let mut stmt =
        tx.prepare("SELECT inspection_id, angle, bytes, sha256, jpeg FROM images ORDER BY rowid")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let (id, angle, bytes, stored): (i64, String, i64, String) =
            (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
        let jpeg = row.get_ref(4)?.as_blob()?;
        hashed += 1;
        let actual = hex::encode(Sha256::digest(jpeg));
        if actual != stored {
            problems.push(format!("image {angle} of inspection {id}: sha256 {actual}, stored {stored}"));
        }
        if jpeg.len() as i64 != bytes {
            problems.push(format!("image {angle} of inspection {id}: {} bytes, stored {bytes}", jpeg.len()));
        }
    }
    Ok((problems, hashed))
}

/// The buffer's companions as they were before this process opened it: the `-shm` (SQLite's
/// shared-memory index of the log, small: 32 KiB per 4096 pages of log) and whether there was
/// a `-wal`. Opening a file creates both; a file found damaged is kept aside as it was found.
#[derive(Debug, Default)]
pub(crate) struct Companions {
    shm: Option<Vec<u8>>,
    wal: bool,
}

impl Companions {
    pub(crate) fn read(path: &Path) -> Companions {
        Companions {
            shm: std::fs::read(disk::with_suffix(path, "-shm")).ok(),
            wal: disk::exists(&disk::with_suffix(path, "-wal")),
        }
    }

    /// Puts the `-shm` back as it was and removes an empty `-wal` that opening created; called
    /// once no connection to the file is open.
    fn restore(self, path: &Path) {
        let shm = disk::with_suffix(path, "-shm");
        let wal = disk::with_suffix(path, "-wal");
        let created_wal = !self.wal && std::fs::metadata(&wal).is_ok_and(|m| m.len() == 0);
        let restored = match self.shm {
            Some(bytes) => std::fs::write(&shm, bytes),
            None if disk::exists(&shm) => std::fs::remove_file(&shm),
            None => Ok(()),
        }
        .and_then(|()| if created_wal { std::fs::remove_file(&wal) } else { Ok(()) });
        if let Err(e) = restored {
            log::warn!(path:% = path.display(), error:% = e; "The damaged buffer's companion files could not be put back as they were");
        }
    }
}

/// Puts in place a salvaged buffer that a stop between moving the damaged file aside and
/// renaming the salvaged one left waiting. Only the buffer's owner calls it, before opening.
pub(crate) fn finish_interrupted(path: &Path) -> Result<(), StoreError> {
    let done = disk::with_suffix(path, SALVAGED);
    if disk::exists(path) || !disk::exists(&done) {
        return Ok(());
    }
    disk::move_to(&done, path).map_err(|source| StoreError::Io {
        path: done.clone(),
        action: "put the salvaged buffer in place from",
        source,
    })?;
    log::warn!(path:% = path.display(); "A salvaged buffer left waiting by a stop during salvage was put in place");
    Ok(())
}

/// Replaces the damaged buffer at `path`: salvages what it still holds into a fresh buffer,
/// moves it (with its `-wal` and `-shm`) aside untouched to `<path>.corrupt-<unix ms>`, puts
/// the fresh buffer in its place and records the report there. Returns where the damaged file
/// went. `found` are its companions as they were before the open that found the damage.
/// Nothing is deleted but this module's own scratch files and what that open created.
pub(crate) fn replace_damaged(
    path: &Path,
    damage: &str,
    now: SystemTime,
    found: Companions,
) -> Result<PathBuf, StoreError> {
    found.restore(path);
    let io = |action: &'static str, at: &Path| {
        let at = at.to_owned();
        move |source| StoreError::Io { path: at, action, source }
    };
    let staging = disk::with_suffix(path, STAGING);
    let done = disk::with_suffix(path, SALVAGED);
    let scratch = disk::with_suffix(path, SCRATCH);
    remove_scratch(&staging, &done, &scratch);
    let target = disk::aside_name(path, now);
    log::error!(path:% = path.display(), detail = damage; "Buffer is damaged: salvaging what it still holds");

    let built = catch_unwind(AssertUnwindSafe(|| build(path, &staging, &scratch, &target, damage, now)))
        .unwrap_or_else(|_| Err("the salvage stopped on an internal error".to_owned()));
    let _ = std::fs::remove_dir_all(&scratch);
    match built {
        Ok(report) => {
            disk::move_to(&staging, &done).map_err(io("rename the salvaged buffer", &staging))?;
            disk::move_to(path, &target).map_err(io("move the damaged buffer aside from", path))?;
            disk::move_to(&done, path).map_err(io("put the salvaged buffer in place from", &done))?;
            let _ = std::fs::remove_file(disk::with_suffix(path, DAMAGE_FLAG));
            let record = RecoveryRecord {
                id: 0,
                at: now,
                moved_to: target.clone(),
                damage: damage.to_owned(),
                acknowledged_at: None,
                report,
            };
            log::error!(
                path:% = path.display(),
                moved_to:% = target.display(),
                inspections = record.report.inspections_recovered,
                images = record.report.images_recovered,
                summary = record.summary().as_str();
                "Buffer salvaged from a damaged file: the damaged file was kept aside, not deleted"
            );
        }
        Err(why) => {
            remove_scratch(&staging, &done, &scratch);
            disk::move_to(path, &target).map_err(io("move the damaged buffer aside from", path))?;
            let _ = std::fs::remove_file(disk::with_suffix(path, DAMAGE_FLAG));
            let report = SalvageReport {
                more_may_be_lost: true,
                notes: vec![format!("nothing could be salvaged: {why}")],
                ..SalvageReport::default()
            };
            let opened = schema::open(path, false)?;
            insert_report(&opened.connection, now, &target, damage, &report)
                .map_err(|e| sqlite_error(path, e))?;
            log::error!(
                path:% = path.display(),
                moved_to:% = target.display(),
                detail = damage,
                why = why.as_str();
                "Buffer is damaged and nothing could be salvaged: moved aside, not deleted, and a fresh buffer started"
            );
        }
    }
    Ok(target)
}

// ---- building the fresh buffer ------------------------------------------------------------

/// Builds the salvaged buffer at `staging` from the damaged file at `path`, with its report,
/// closed and synced. `Err` says why nothing could be salvaged.
fn build(
    path: &Path,
    staging: &Path,
    scratch: &Path,
    target: &Path,
    damage: &str,
    now: SystemTime,
) -> Result<SalvageReport, String> {
    let mut notes = Vec::new();
    let source = open_source(path, scratch, &mut notes)?;
    let mut fresh =
        schema::open(staging, false).map_err(|e| format!("the fresh buffer cannot be made: {e}"))?.connection;
    // A stop while building throws the half-built file away; the sync comes at the end.
    let _ = fresh.pragma_update(None, "synchronous", "OFF");
    let mut report = copy(&source, &mut fresh, now);
    drop(source);
    let mut all_notes = notes;
    all_notes.append(&mut report.notes);
    report.notes = all_notes;
    insert_report(&fresh, now, target, damage, &report)
        .map_err(|e| format!("the report cannot be written to the fresh buffer: {e}"))?;
    // One self-contained file, with no write-ahead log to carry along when it is renamed.
    let mode: String = fresh
        .pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get(0))
        .map_err(|e| format!("the fresh buffer cannot be checkpointed: {e}"))?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(format!("the fresh buffer cannot be checkpointed: journal_mode stayed {mode}"));
    }
    fresh.close().map_err(|(_, e)| format!("the fresh buffer cannot be closed: {e}"))?;
    File::open(staging)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("the fresh buffer cannot be synced: {e}"))?;
    Ok(report)
}

fn insert_report(
    conn: &Connection,
    now: SystemTime,
    moved_to: &Path,
    damage: &str,
    report: &SalvageReport,
) -> rusqlite::Result<()> {
    let json =
        serde_json::to_string(report).expect("a report is strings and numbers, which always serialise");
    conn.execute(
        "INSERT INTO recoveries (at, moved_to, damage, report) VALUES (?1, ?2, ?3, ?4)",
        params![unix_millis(now), moved_to.to_string_lossy(), damage, json],
    )?;
    Ok(())
}

fn remove_scratch(staging: &Path, done: &Path, scratch: &Path) {
    for base in [staging, done] {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(disk::with_suffix(base, suffix));
        }
    }
    let _ = std::fs::remove_dir_all(scratch);
}

// ---- reading the damaged file -------------------------------------------------------------

/// The damaged file, open read-only, with the columns each of its tables has.
struct Source {
    conn: Connection,
    columns: HashMap<String, Vec<String>>,
}

impl Source {
    fn has(&self, table: &str) -> bool {
        self.columns.contains_key(table)
    }

    /// `column` if the table has it, `default` (an SQL literal) otherwise: an older file lacks
    /// the columns later versions added.
    fn column_or(&self, table: &str, column: &str, default: &str) -> String {
        let found = self.columns.get(table).is_some_and(|c| c.iter().any(|n| n == column));
        if found {
            format!("\"{column}\"")
        } else {
            default.to_owned()
        }
    }
}

/// Opens the damaged file for reading as described in the module doc: as it is, then with a
/// sane header, then with a fresh buffer's first page.
fn open_source(path: &Path, scratch: &Path, notes: &mut Vec<String>) -> Result<Source, String> {
    std::fs::create_dir_all(scratch).map_err(|e| format!("{} cannot be created: {e}", scratch.display()))?;
    let wal = disk::with_suffix(path, "-wal");
    let direct = scratch.join("direct.sqlite3");
    if std::fs::hard_link(path, &direct).is_err() {
        std::fs::copy(path, &direct).map_err(|e| format!("the damaged file cannot be read: {e}"))?;
    }
    let copy_wal = |to: &Path, notes: &mut Vec<String>| {
        if disk::exists(&wal) {
            if let Err(e) = std::fs::copy(&wal, disk::with_suffix(to, "-wal")) {
                notes.push(format!(
                    "its write-ahead log could not be read ({e}); what only the log held is lost"
                ));
            }
        }
    };
    copy_wal(&direct, notes);
    let first = match read_only(&direct).map_err(|e| e.to_string()).and_then(Source::new) {
        Ok(source) => return Ok(source),
        Err(e) => e,
    };
    notes.push(format!("the file cannot be read as it is ({first}); its first page was rebuilt"));

    let len = std::fs::metadata(path).map_err(|e| format!("the damaged file cannot be read: {e}"))?.len();
    let free = disk::free_bytes(scratch).unwrap_or(0);
    if free < len.saturating_add(len / 10) {
        return Err(format!(
            "its first page is damaged ({first}) and there is no room for a repaired copy ({len} bytes needed, {free} free)"
        ));
    }
    if len < 2 * PAGE_SIZE {
        return Err(format!("its first page is damaged ({first}) and it holds nothing else"));
    }
    let repaired = scratch.join("repaired.sqlite3");
    std::fs::copy(path, &repaired).map_err(|e| format!("a repaired copy cannot be made: {e}"))?;
    copy_wal(&repaired, notes);
    let pages = u32::try_from(len.div_ceil(PAGE_SIZE)).unwrap_or(u32::MAX);
    let wal_mode = disk::exists(&wal);
    write_at(&repaired, 0, &sane_header(pages, wal_mode))
        .map_err(|e| format!("a repaired copy cannot be made: {e}"))?;
    let header_only = match read_only(&repaired).map_err(|e| e.to_string()).and_then(Source::new) {
        Ok(source) => {
            notes.push("read with a rebuilt header".to_owned());
            return Ok(source);
        }
        Err(e) => e,
    };
    let template =
        template_first_page(scratch).map_err(|e| format!("a fresh first page cannot be made: {e}"))?;
    let mut page = template;
    let mut header = sane_header(pages, wal_mode);
    // The fresh file's auto-vacuum fields (largest root page, incremental vacuum) and schema
    // version go with its table directory.
    for at in [52, 60, 64] {
        header[at..at + 4].copy_from_slice(&template_field(&page, at));
    }
    page[..100].copy_from_slice(&header);
    write_at(&repaired, 0, &page).map_err(|e| format!("a repaired copy cannot be made: {e}"))?;
    match read_only(&repaired).map_err(|e| e.to_string()).and_then(Source::new) {
        Ok(source) => {
            notes.push(
                "read with the table directory of a fresh buffer in place of its damaged first page"
                    .to_owned(),
            );
            Ok(source)
        }
        Err(e) => Err(format!(
            "its first page is damaged and it cannot be read with a rebuilt one ({first}; {header_only}; {e})"
        )),
    }
}

/// A read-only connection that reads as much of a damaged file as SQLite can.
fn read_only(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
    conn.execute_batch("PRAGMA writable_schema = ON; PRAGMA cell_size_check = ON; PRAGMA query_only = ON;")?;
    Ok(conn)
}

impl Source {
    fn new(conn: Connection) -> Result<Source, String> {
        Source::read_schema(conn).map_err(|e| e.to_string())?.check()
    }

    fn read_schema(conn: Connection) -> rusqlite::Result<Source> {
        let names: Vec<String> = {
            let mut stmt = conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table'")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut columns = HashMap::new();
        for name in names {
            let known = [
                "inspections",
                "images",
                "angle_failures",
                "sent",
                "dead_sessions",
                "commands",
                "recoveries",
            ];
            if !known.contains(&name.as_str()) {
                continue;
            }
            let cols: Vec<String> = {
                let mut stmt = conn.prepare(&format!("PRAGMA table_info(\"{name}\")"))?;
                let rows = stmt.query_map([], |r| r.get(1))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            columns.insert(name, cols);
        }
        Ok(Source { conn, columns })
    }

    fn check(self) -> Result<Source, String> {
        let source = self;
        let needed = ["id", "case_id", "angles", "state"];
        let usable = source
            .columns
            .get("inspections")
            .is_some_and(|c| needed.iter().all(|n| c.iter().any(|x| x == n)));
        if !usable {
            return Err("the file holds no inspections table".to_owned());
        }
        Ok(source)
    }
}

/// A 100-byte SQLite header for a file of `pages` pages of [`PAGE_SIZE`] bytes, in WAL mode or
/// not, with no free list: enough for SQLite to walk the tables from their root pages.
fn sane_header(pages: u32, wal: bool) -> [u8; 100] {
    let mut h = [0u8; 100];
    h[..16].copy_from_slice(b"SQLite format 3\0");
    h[16..18].copy_from_slice(&(PAGE_SIZE as u16).to_be_bytes());
    let version = if wal { 2 } else { 1 };
    h[18] = version;
    h[19] = version;
    h[21] = 64;
    h[22] = 32;
    h[23] = 32;
    h[24..28].copy_from_slice(&1u32.to_be_bytes());
    h[28..32].copy_from_slice(&pages.to_be_bytes());
    h[40..44].copy_from_slice(&1u32.to_be_bytes());
    h[44..48].copy_from_slice(&4u32.to_be_bytes());
    h[56..60].copy_from_slice(&1u32.to_be_bytes());
    h[92..96].copy_from_slice(&1u32.to_be_bytes());
    h[96..100].copy_from_slice(&3_046_000u32.to_be_bytes());
    h
}

fn template_field(page: &[u8], at: usize) -> [u8; 4] {
    let mut out = [0u8; 4];
    if let Some(bytes) = page.get(at..at + 4) {
        out.copy_from_slice(bytes);
    }
    out
}

/// The first page of a fresh buffer made by this build: its table directory.
fn template_first_page(scratch: &Path) -> Result<Vec<u8>, String> {
    let path = scratch.join("template.sqlite3");
    {
        let opened = schema::open(&path, false).map_err(|e| e.to_string())?;
        let _: String = opened
            .connection
            .pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get(0))
            .map_err(|e| e.to_string())?;
    }
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut file = File::open(&path).map_err(|e| e.to_string())?;
    file.read_exact(&mut page).map_err(|e| e.to_string())?;
    Ok(page)
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The rowids of a table that could be reached, and whether part of it could not be read.
struct Reached {
    rowids: BTreeSet<i64>,
    damaged: bool,
}

/// Every rowid of `table` that can still be reached, past damaged stretches (module doc).
/// `hint` is a rowid known to have been used (it bounds the search when the table's end
/// cannot be read); `budget` caps the single reads across damaged stretches.
fn reach(conn: &Connection, table: &str, hint: i64, budget: &mut u64) -> Reached {
    let mut rowids = BTreeSet::new();
    let max =
        conn.query_row(&format!("SELECT max(rowid) FROM \"{table}\""), [], |r| r.get::<_, Option<i64>>(0));
    let mut damaged = max.is_err();
    let known_end = max.as_ref().ok().map(|m| m.unwrap_or(0).max(hint));
    let mut after = 0i64;
    loop {
        let last = match scan_from(conn, table, after, &mut rowids) {
            Ok(()) => break,
            Err(last) => last,
        };
        damaged = true;
        let end = known_end.unwrap_or_else(|| last.saturating_add(BLIND_WINDOW).max(hint));
        // Jump past the damage, doubling the jump, to where a scan can start again.
        let mut step = 1i64;
        let resume = loop {
            let start = last.saturating_add(step);
            if start > end {
                break None;
            }
            match first_at_or_after(conn, table, start) {
                Ok(Some(found)) => break Some((start, Some(found))),
                Ok(None) => break Some((start, None)),
                Err(_) => step = step.saturating_mul(2),
            }
        };
        let probe_to = match resume {
            Some((start, _)) => start - 1,
            None => end,
        };
        let mut id = last.saturating_add(1);
        while id <= probe_to && *budget > 0 {
            *budget -= 1;
            if row_exists(conn, table, id).unwrap_or(false) {
                rowids.insert(id);
            }
            id += 1;
        }
        match resume {
            Some((_, Some(found))) => {
                rowids.insert(found);
                after = found;
            }
            _ => break,
        }
    }
    Reached { rowids, damaged }
}

/// Scans the table in rowid order from past `after`; `Err(last rowid read)` when damage stops it.
fn scan_from(conn: &Connection, table: &str, after: i64, out: &mut BTreeSet<i64>) -> Result<(), i64> {
    let mut last = after;
    let sql = format!("SELECT rowid FROM \"{table}\" NOT INDEXED WHERE rowid > ?1 ORDER BY rowid");
    let Ok(mut stmt) = conn.prepare(&sql) else { return Err(last) };
    let Ok(mut rows) = stmt.query([after]) else { return Err(last) };
    loop {
        match rows.next() {
            Ok(Some(row)) => match row.get::<_, i64>(0) {
                Ok(rowid) => {
                    out.insert(rowid);
                    last = rowid;
                }
                Err(_) => return Err(last),
            },
            Ok(None) => return Ok(()),
            Err(_) => return Err(last),
        }
    }
}

fn first_at_or_after(conn: &Connection, table: &str, start: i64) -> rusqlite::Result<Option<i64>> {
    let sql = format!("SELECT rowid FROM \"{table}\" NOT INDEXED WHERE rowid >= ?1 ORDER BY rowid LIMIT 1");
    conn.prepare_cached(&sql)?.query_row([start], |r| r.get(0)).optional()
}

fn row_exists(conn: &Connection, table: &str, rowid: i64) -> rusqlite::Result<bool> {
    let sql = format!("SELECT 1 FROM \"{table}\" WHERE rowid = ?1");
    Ok(conn.prepare_cached(&sql)?.query_row([rowid], |_| Ok(())).optional()?.is_some())
}

/// Reads every reachable row of `table` with `columns`, one rowid at a time; rows that cannot
/// be read are counted. `None` when the file has no such table.
fn read_rows<T>(
    source: &Source,
    table: &str,
    columns: &str,
    budget: &mut u64,
    map: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Option<Rows<T>> {
    if !source.has(table) {
        return None;
    }
    let reached = reach(&source.conn, table, 0, budget);
    let sql = format!("SELECT {columns} FROM \"{table}\" WHERE rowid = ?1");
    let mut rows = Rows { read: Vec::new(), unreadable: 0, damaged: reached.damaged };
    for rowid in reached.rowids {
        let row =
            source.conn.prepare_cached(&sql).and_then(|mut s| s.query_row([rowid], |r| map(r)).optional());
        match row {
            Ok(Some(value)) => rows.read.push((rowid, value)),
            Ok(None) | Err(_) => rows.unreadable += 1,
        }
    }
    Some(rows)
}

struct Rows<T> {
    read: Vec<(i64, T)>,
    unreadable: u64,
    damaged: bool,
}

impl<T> Rows<T> {
    fn note(&self, table: &str, notes: &mut Vec<String>) {
        if self.damaged || self.unreadable > 0 {
            notes.push(format!(
                "table {table} is damaged: {} row(s) read, {} unreadable",
                self.read.len(),
                self.unreadable
            ));
        }
    }
}

// ---- copying ------------------------------------------------------------------------------

/// An `inspections` row as the damaged file holds it.
struct InspectionRow {
    case_id: String,
    vehicle: Option<String>,
    angles: String,
    state: String,
    reason: Option<String>,
    created_at: i64,
    updated_at: i64,
    upload_attempts: i64,
    upload_error: Option<String>,
    session: Option<String>,
}

/// An `images` row, blob included.
struct ImageRow {
    inspection_id: i64,
    angle: String,
    camera: String,
    captured_at: i64,
    source_width: i64,
    source_height: i64,
    source_bytes: i64,
    width: i64,
    height: i64,
    bytes: i64,
    sha256: String,
    jpeg: Vec<u8>,
}

struct FailureRow {
    inspection_id: i64,
    angle: String,
    reason: String,
    at: i64,
}

struct SentRow {
    inspection_id: i64,
    session: String,
    angle: String,
    sha256: String,
    at: i64,
}

struct DeadRow {
    session: String,
    inspection_id: i64,
    why: String,
    at: i64,
}

/// An inspection row that passed the checks, ready to be copied.
struct Kept {
    id: i64,
    case_id: String,
    row: InspectionRow,
    state: InspectionState,
    angles: Vec<PhotoLabel>,
}

/// Copies everything readable from `source` into `fresh` (module doc) and says what was lost.
fn copy(source: &Source, fresh: &mut Connection, now: SystemTime) -> SalvageReport {
    let mut report = SalvageReport::default();
    let mut budget = PROBE_BUDGET;
    let sequence: Option<i64> = source
        .conn
        .query_row("SELECT seq FROM sqlite_sequence WHERE name = 'inspections'", [], |r| r.get(0))
        .optional()
        .ok()
        .flatten();
    if sequence.is_none() {
        report
            .notes
            .push(format!("the id sequence is unreadable: new ids start {ID_MARGIN} past the highest seen"));
    }

    let failures =
        read_rows(source, "angle_failures", "inspection_id, angle, reason, at", &mut budget, |r| {
            Ok(FailureRow { inspection_id: r.get(0)?, angle: r.get(1)?, reason: r.get(2)?, at: r.get(3)? })
        });
    let sent = read_rows(source, "sent", "inspection_id, session, angle, sha256, at", &mut budget, |r| {
        Ok(SentRow {
            inspection_id: r.get(0)?,
            session: r.get(1)?,
            angle: r.get(2)?,
            sha256: r.get(3)?,
            at: r.get(4)?,
        })
    });
    let dead = read_rows(source, "dead_sessions", "session, inspection_id, why, at", &mut budget, |r| {
        Ok(DeadRow { session: r.get(0)?, inspection_id: r.get(1)?, why: r.get(2)?, at: r.get(3)? })
    });
    let image_meta = read_rows(source, "images", "inspection_id, angle", &mut budget, |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
    });
    if let Some(rows) = &failures {
        rows.note("angle_failures", &mut report.notes);
    }
    if let Some(rows) = &sent {
        rows.note("sent", &mut report.notes);
    }
    if let Some(rows) = &dead {
        rows.note("dead_sessions", &mut report.notes);
    }
    if let Some(rows) = &image_meta {
        rows.note("images", &mut report.notes);
    }
    let images_damaged = image_meta.as_ref().is_none_or(|r| r.damaged || r.unreadable > 0);

    // Which image rows belong to which inspection, by rowid.
    let mut images_of: BTreeMap<i64, BTreeMap<i64, String>> = BTreeMap::new();
    let mut referenced: BTreeSet<i64> = BTreeSet::new();
    if let Some(rows) = &image_meta {
        report.images_unaccounted += rows.unreadable;
        for (rowid, (owner, angle)) in &rows.read {
            images_of.entry(*owner).or_default().insert(*rowid, angle.clone());
            referenced.insert(*owner);
        }
    }
    let mut failures_of: HashMap<i64, Vec<FailureRow>> = HashMap::new();
    for (_, f) in failures.map(|r| r.read).unwrap_or_default() {
        referenced.insert(f.inspection_id);
        failures_of.entry(f.inspection_id).or_default().push(f);
    }
    let mut sent_of: HashMap<i64, Vec<SentRow>> = HashMap::new();
    for (_, s) in sent.map(|r| r.read).unwrap_or_default() {
        referenced.insert(s.inspection_id);
        sent_of.entry(s.inspection_id).or_default().push(s);
    }
    let dead = dead.map(|r| r.read).unwrap_or_default();
    referenced.extend(dead.iter().map(|(_, d)| d.inspection_id));

    // The inspections: every id the table still reaches, and every id another table names.
    let hint = sequence.unwrap_or(0).max(referenced.last().copied().unwrap_or(0));
    let reached = reach(&source.conn, "inspections", hint, &mut budget);
    if reached.damaged {
        report.more_may_be_lost = true;
        report
            .notes
            .push("table inspections is damaged: inspections may be lost that no other row names".to_owned());
    }
    let mut ids = reached.rowids;
    ids.extend(referenced.iter().copied());
    let highest_seen = ids.last().copied().unwrap_or(0);
    let sql = format!(
        "SELECT case_id, {}, angles, state, {}, created_at, updated_at, {}, {}, {} FROM inspections WHERE id = ?1",
        source.column_or("inspections", "vehicle", "NULL"),
        source.column_or("inspections", "reason", "NULL"),
        source.column_or("inspections", "upload_attempts", "0"),
        source.column_or("inspections", "upload_error", "NULL"),
        source.column_or("inspections", "session", "NULL"),
    );
    let mut kept = Vec::new();
    for id in ids {
        let row = source.conn.prepare_cached(&sql).and_then(|mut s| {
            s.query_row([id], |r| {
                Ok(InspectionRow {
                    case_id: r.get(0)?,
                    vehicle: r.get(1)?,
                    angles: r.get(2)?,
                    state: r.get(3)?,
                    reason: r.get(4)?,
                    created_at: r.get(5)?,
                    updated_at: r.get(6)?,
                    upload_attempts: r.get(7)?,
                    upload_error: r.get(8)?,
                    session: r.get(9)?,
                })
            })
            .optional()
        });
        let row = match row {
            Ok(Some(row)) => row,
            Ok(None) | Err(_) => {
                // Named by another table but unreadable here: lost, case id unknown.
                report.lost_without_case_id += 1;
                report.images_unaccounted += images_of.get(&id).map_or(0, |m| m.len() as u64);
                continue;
            }
        };
        match check_inspection(id, row) {
            Ok(k) => kept.push(k),
            Err((case_id, why)) => match case_id {
                Some(case_id) => report.lost.push(LostInspection {
                    id: InspectionId(id),
                    case_id,
                    state: None,
                    angles: vec![LostAngle { angle: String::new(), why }],
                }),
                None => {
                    report.lost_without_case_id += 1;
                    report.images_unaccounted += images_of.get(&id).map_or(0, |m| m.len() as u64);
                }
            },
        }
    }

    // One transaction per inspection, in id order; a write that fails (a full disk) stops the
    // copy, and what is left is reported lost.
    let mut stopped: Option<String> = None;
    let mut kept_ids = BTreeSet::new();
    for inspection in kept {
        if let Some(why) = &stopped {
            report.lost.push(LostInspection {
                id: InspectionId(inspection.id),
                case_id: inspection.case_id.clone(),
                state: None,
                angles: vec![LostAngle { angle: String::new(), why: why.clone() }],
            });
            continue;
        }
        let mut rowids = images_of.remove(&inspection.id).unwrap_or_default();
        images_by_index(source, inspection.id, &mut rowids);
        let context = Context {
            images_damaged,
            failures: failures_of.remove(&inspection.id).unwrap_or_default(),
            sent: sent_of.remove(&inspection.id).unwrap_or_default(),
        };
        match copy_inspection(source, fresh, &inspection, &rowids, &context, now) {
            Ok(outcome) => {
                if outcome.vehicle_dropped {
                    report.notes.push(format!(
                        "inspection {} ({}): its vehicle object is unreadable; it is uploaded without one",
                        inspection.id, inspection.case_id
                    ));
                }
                kept_ids.insert(inspection.id);
                report.inspections_recovered += 1;
                report.images_recovered += outcome.images;
                let delivered = inspection.state == InspectionState::Completed;
                if !outcome.lost.is_empty() && !delivered {
                    report.lost.push(LostInspection {
                        id: InspectionId(inspection.id),
                        case_id: inspection.case_id.clone(),
                        state: Some(outcome.state),
                        angles: outcome.lost,
                    });
                }
            }
            Err(e) => {
                let why = format!("not copied: the fresh buffer refused a write ({e})");
                report.notes.push(format!("the copy stopped at inspection {}: {e}", inspection.id));
                report.lost.push(LostInspection {
                    id: InspectionId(inspection.id),
                    case_id: inspection.case_id.clone(),
                    state: None,
                    angles: vec![LostAngle { angle: String::new(), why: why.clone() }],
                });
                stopped = Some(why);
            }
        }
    }
    // Image rows of inspections that are not there at all.
    report.images_unaccounted += images_of.values().map(|m| m.len() as u64).sum::<u64>();

    if let Err(e) = copy_rest(source, fresh, &dead, &kept_ids, &mut budget) {
        report.notes.push(format!("sessions given up, command answers or earlier reports not copied: {e}"));
    }
    let mut next = sequence.unwrap_or(0).max(highest_seen);
    if sequence.is_none() {
        next = next.saturating_add(ID_MARGIN);
    }
    if let Err(e) = set_sequence(fresh, next) {
        report.notes.push(format!("the id sequence could not be set: {e}"));
    }
    report.lost.sort_by_key(|l| l.id);
    report
}

/// Checks an `inspections` row: a valid case id, state and angle list. `Err` carries the case
/// id when it is valid, and why the row cannot be used.
fn check_inspection(id: i64, row: InspectionRow) -> Result<Kept, (Option<String>, String)> {
    let case_id = CaseId::parse(&row.case_id).ok().map(|c| c.as_str().to_owned());
    let Some(valid_case) = case_id.clone() else {
        return Err((None, "its case id is unreadable".to_owned()));
    };
    let state = InspectionState::parse(&row.state)
        .ok_or_else(|| (case_id.clone(), format!("its state {:?} is unreadable", row.state)))?;
    let angles: Vec<PhotoLabel> = serde_json::from_str(&row.angles)
        .map_err(|_| (case_id.clone(), "its list of angles is unreadable".to_owned()))?;
    if angles.is_empty() {
        return Err((case_id, "its list of angles is empty".to_owned()));
    }
    let mut row = row;
    // Text from a page cut short reads with zeros in it: a session named so goes to a new one.
    row.session = row.session.filter(|s| plausible_text(s));
    row.reason = row.reason.filter(|s| plausible_text(s));
    row.upload_error = row.upload_error.filter(|s| plausible_text(s));
    Ok(Kept { id, case_id: valid_case, row, state, angles })
}

/// Text that is not garbled: no NUL or other control character but a line break.
fn plausible_text(text: &str) -> bool {
    !text.is_empty() && !text.chars().any(|c| c.is_control() && c != '\n')
}

/// Adds the image rows of `inspection` that the `(inspection_id, angle)` index names: it names
/// the angle of a row the damaged table cannot give, and reaches rows under a damaged page of
/// the table. A damaged index only adds less.
fn images_by_index(source: &Source, inspection: i64, rowids: &mut BTreeMap<i64, String>) {
    if !source.has("images") {
        return;
    }
    let sql = "SELECT rowid, angle FROM images INDEXED BY sqlite_autoindex_images_1 WHERE inspection_id = ?1";
    let Ok(mut stmt) = source.conn.prepare_cached(sql) else { return };
    let Ok(rows) = stmt.query_map([inspection], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))) else {
        return;
    };
    for row in rows {
        let Ok((rowid, angle)) = row else { return };
        rowids.entry(rowid).or_insert(angle);
    }
}

/// What the other tables hold about one inspection.
struct Context {
    images_damaged: bool,
    failures: Vec<FailureRow>,
    sent: Vec<SentRow>,
}

struct Copied {
    state: InspectionState,
    images: u64,
    lost: Vec<LostAngle>,
    /// The vehicle object was there but unreadable: the inspection goes without it.
    vehicle_dropped: bool,
}

const LOST_UNREADABLE: &str = "its image could not be read from the damaged file";
const LOST_MISMATCH: &str = "its image no longer matches the sha256 stored with it";
const LOST_MISSING: &str = "neither its image nor its failure could be found in the damaged file";

/// Copies one inspection with its images, failures and `sent` rows in one transaction.
fn copy_inspection(
    source: &Source,
    fresh: &mut Connection,
    inspection: &Kept,
    rowids: &BTreeMap<i64, String>,
    context: &Context,
    now: SystemTime,
) -> rusqlite::Result<Copied> {
    let id = inspection.id;
    let row = &inspection.row;
    // Back in the queue: the uploader asks the cloud about the session the buffer names.
    let mut state = match inspection.state {
        InspectionState::Uploading => InspectionState::Captured,
        s => s,
    };
    let mut reason = row.reason.clone();
    let vehicle =
        row.vehicle.as_ref().filter(|v| serde_json::from_str::<serde_json::Value>(v).is_ok()).cloned();
    let tx = fresh.transaction()?;
    tx.execute(
        "INSERT INTO inspections (id, case_id, vehicle, angles, state, reason, created_at, updated_at,
                                  upload_attempts, upload_error, session)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            id,
            inspection.case_id,
            vehicle,
            row.angles,
            state.as_str(),
            reason,
            row.created_at,
            row.updated_at,
            row.upload_attempts.max(0),
            row.upload_error,
            row.session
        ],
    )?;
    let mut stored: HashMap<PhotoLabel, String> = HashMap::new();
    let mut lost: Vec<LostAngle> = Vec::new();
    for (rowid, angle) in rowids {
        let image = read_image(source, *rowid);
        let Ok(Some(image)) = image else {
            lose(&mut lost, angle, LOST_UNREADABLE);
            continue;
        };
        let label = match PhotoLabel::parse(&image.angle) {
            Ok(label) if image.inspection_id == id && inspection.angles.contains(&label) => label,
            _ => {
                lose(&mut lost, angle, LOST_UNREADABLE);
                continue;
            }
        };
        if stored.contains_key(&label) {
            continue;
        }
        let actual = hex::encode(Sha256::digest(&image.jpeg));
        if actual != image.sha256 || image.jpeg.len() as i64 != image.bytes {
            lose(&mut lost, label.as_str(), LOST_MISMATCH);
            continue;
        }
        tx.execute(
            "INSERT INTO images (inspection_id, angle, camera, captured_at, source_width, source_height,
                                 source_bytes, width, height, bytes, sha256, jpeg)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                id,
                label.as_str(),
                image.camera,
                image.captured_at,
                image.source_width,
                image.source_height,
                image.source_bytes,
                image.width,
                image.height,
                image.bytes,
                image.sha256,
                image.jpeg
            ],
        )?;
        lost.retain(|l| l.angle != label.as_str());
        stored.insert(label, image.sha256);
    }
    let mut failed: BTreeSet<PhotoLabel> = BTreeSet::new();
    for f in &context.failures {
        let Ok(label) = PhotoLabel::parse(&f.angle) else { continue };
        if stored.contains_key(&label) || !inspection.angles.contains(&label) || !failed.insert(label) {
            continue;
        }
        tx.execute(
            "INSERT INTO angle_failures (inspection_id, angle, reason, at) VALUES (?1, ?2, ?3, ?4)",
            params![id, label.as_str(), f.reason, f.at],
        )?;
        lost.retain(|l| l.angle != label.as_str());
    }
    // A finished capture whose images may have gone with a damaged page: what is not found is lost.
    if context.images_damaged && !matches!(state, InspectionState::Capturing | InspectionState::Completed) {
        for label in &inspection.angles {
            if !stored.contains_key(label) && !failed.contains(label) {
                lose(&mut lost, label.as_str(), LOST_MISSING);
            }
        }
    }
    if state != InspectionState::Completed {
        for l in &lost {
            let Ok(label) = PhotoLabel::parse(&l.angle) else { continue };
            if failed.contains(&label) {
                continue;
            }
            tx.execute(
                "INSERT INTO angle_failures (inspection_id, angle, reason, at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (inspection_id, angle) DO NOTHING",
                params![
                    id,
                    label.as_str(),
                    format!("lost when the buffer file was damaged: {}", l.why),
                    unix_millis(now)
                ],
            )?;
        }
    }
    if stored.is_empty() && state == InspectionState::Captured {
        state = InspectionState::Failed;
        reason = Some("every image was lost when the buffer file was damaged".to_owned());
        tx.execute(
            "UPDATE inspections SET state = ?2, reason = ?3 WHERE id = ?1",
            params![id, state.as_str(), reason],
        )?;
    }
    for s in &context.sent {
        let matches =
            PhotoLabel::parse(&s.angle).ok().and_then(|l| stored.get(&l)).is_some_and(|sha| *sha == s.sha256);
        if matches {
            tx.execute(
                "INSERT INTO sent (inspection_id, session, angle, sha256, at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (inspection_id, session, angle) DO NOTHING",
                params![id, s.session, s.angle, s.sha256, s.at],
            )?;
        }
    }
    tx.commit()?;
    lost.sort_by(|a, b| a.angle.cmp(&b.angle));
    let vehicle_dropped = row.vehicle.is_some() && vehicle.is_none();
    Ok(Copied { state, images: stored.len() as u64, lost, vehicle_dropped })
}

fn lose(lost: &mut Vec<LostAngle>, angle: &str, why: &str) {
    if !lost.iter().any(|l| l.angle == angle) {
        lost.push(LostAngle { angle: angle.to_owned(), why: why.to_owned() });
    }
}

fn read_image(source: &Source, rowid: i64) -> rusqlite::Result<Option<ImageRow>> {
    source
        .conn
        .prepare_cached(
            "SELECT inspection_id, angle, camera, captured_at, source_width, source_height, source_bytes,
                    width, height, bytes, sha256, jpeg FROM images WHERE rowid = ?1",
        )?
        .query_row([rowid], |r| {
            Ok(ImageRow {
                inspection_id: r.get(0)?,
                angle: r.get(1)?,
                camera: r.get(2)?,
                captured_at: r.get(3)?,
                source_width: r.get(4)?,
                source_height: r.get(5)?,
                source_bytes: r.get(6)?,
                width: r.get(7)?,
                height: r.get(8)?,
                bytes: r.get(9)?,
                sha256: r.get(10)?,
                jpeg: r.get(11)?,
            })
        })
        .optional()
}

/// Sessions given up (of the inspections copied), remembered command answers and earlier
/// salvage reports.
fn copy_rest(
    source: &Source,
    fresh: &mut Connection,
    dead: &[(i64, DeadRow)],
    kept: &BTreeSet<i64>,
    budget: &mut u64,
) -> rusqlite::Result<()> {
    let commands = read_rows(source, "commands", "seq, command_id, answer, at", budget, |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?))
    });
    let earlier =
        read_rows(source, "recoveries", "at, moved_to, damage, report, acknowledged_at", budget, |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(4)?,
            ))
        });
    let tx = fresh.transaction()?;
    for (_, d) in dead.iter().filter(|(_, d)| kept.contains(&d.inspection_id) && plausible_text(&d.session)) {
        tx.execute(
            "INSERT OR IGNORE INTO dead_sessions (session, inspection_id, why, at) VALUES (?1, ?2, ?3, ?4)",
            params![d.session, d.inspection_id, d.why, d.at],
        )?;
    }
    for (_, (seq, command_id, answer, at)) in commands.map(|r| r.read).unwrap_or_default() {
        tx.execute(
            "INSERT OR IGNORE INTO commands (seq, command_id, answer, at) VALUES (?1, ?2, ?3, ?4)",
            params![seq, command_id, answer, at],
        )?;
    }
    for (_, (at, moved_to, damage, report, acknowledged_at)) in earlier.map(|r| r.read).unwrap_or_default() {
        tx.execute(
            "INSERT INTO recoveries (at, moved_to, damage, report, acknowledged_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![at, moved_to, damage, report, acknowledged_at],
        )?;
    }
    tx.commit()
}

/// Makes the next inspection id `next + 1` or more.
fn set_sequence(fresh: &Connection, next: i64) -> rusqlite::Result<()> {
    let changed =
        fresh.execute("UPDATE sqlite_sequence SET seq = max(seq, ?1) WHERE name = 'inspections'", [next])?;
    if changed == 0 {
        fresh.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('inspections', ?1)", [next])?;
    }
    Ok(())
}

// ---- the reports --------------------------------------------------------------------------

fn read_recoveries(conn: &Connection) -> rusqlite::Result<Vec<RecoveryRecord>> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'recoveries')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(Vec::new());
    }
    let mut stmt =
        conn.prepare("SELECT id, at, moved_to, damage, report, acknowledged_at FROM recoveries ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        let report: String = r.get(4)?;
        let report = serde_json::from_str(&report).unwrap_or_else(|e| SalvageReport {
            notes: vec![format!("the stored report is unreadable: {e}")],
            more_may_be_lost: true,
            ..SalvageReport::default()
        });
        Ok(RecoveryRecord {
            id: r.get(0)?,
            at: from_unix_millis(r.get(1)?),
            moved_to: PathBuf::from(r.get::<_, String>(2)?),
            damage: r.get(3)?,
            acknowledged_at: r.get::<_, Option<i64>>(5)?.map(from_unix_millis),
            report,
        })
    })?;
    rows.collect()
}

fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Caps, NewImage, NewInspection};
    use crate::vehicle::CaseId;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    /// A plain SQLite file with one table of `rows` rows of 100 bytes each (about 35 a page).
    fn table_file(dir: &Path, rows: i64) -> PathBuf {
        let path = dir.join("t.sqlite3");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER PRIMARY KEY, v BLOB NOT NULL)").unwrap();
        let tx = conn.unchecked_transaction().unwrap();
        for x in 1..=rows {
            tx.execute("INSERT INTO t (x, v) VALUES (?1, ?2)", params![x, vec![(x % 251) as u8; 100]])
                .unwrap();
        }
        tx.commit().unwrap();
        path
    }

    fn reach_all(path: &Path) -> Reached {
        let conn = read_only(path).unwrap();
        reach(&conn, "t", 0, &mut PROBE_BUDGET.clone())
    }

    #[test]
    fn a_sound_table_is_reached_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = table_file(dir.path(), 2000);
        let reached = reach_all(&path);
        assert!(!reached.damaged);
        assert_eq!(reached.rowids, (1..=2000).collect());
    }

    #[test]
    fn a_damaged_page_loses_only_the_rows_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = table_file(dir.path(), 2000);
        let pages = std::fs::metadata(&path).unwrap().len() / PAGE_SIZE;
        write_at(&path, pages / 2 * PAGE_SIZE, &[0xA5; PAGE_SIZE as usize]).unwrap();
        let reached = reach_all(&path);
        assert!(reached.damaged);
        let missing: Vec<i64> = (1..=2000).filter(|x| !reached.rowids.contains(x)).collect();
        assert!(!missing.is_empty() && missing.len() <= 60, "one page of rows lost, not {}", missing.len());
        let (first, last) = (missing[0], missing[missing.len() - 1]);
        assert_eq!(
            last - first + 1,
            missing.len() as i64,
            "the lost rows are the ones of one page: {missing:?}"
        );
        assert!(reached.rowids.contains(&2000), "the rows past the damage are found");
    }

    #[test]
    fn a_file_cut_short_keeps_the_rows_before_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = table_file(dir.path(), 2000);
        let len = std::fs::metadata(&path).unwrap().len();
        // Cut at a page boundary, as a file system cuts a file: a page cut in its middle reads
        // with zeros in place of what is missing, which only a hash can tell.
        let cut = len / 2 / PAGE_SIZE * PAGE_SIZE;
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(cut).unwrap();
        let reached = reach_all(&path);
        assert!(reached.damaged);
        // Every row reached reads back as it was written, and they are about half.
        let conn = read_only(&path).unwrap();
        let mut good = 0;
        for x in &reached.rowids {
            let v: Option<Vec<u8>> =
                conn.query_row("SELECT v FROM t WHERE x = ?1", [x], |r| r.get(0)).optional().unwrap_or(None);
            if let Some(v) = v {
                assert_eq!(v, vec![(x % 251) as u8; 100], "row {x}");
                good += 1;
            }
        }
        assert!((800..1000).contains(&good), "about half the rows: {good}");
    }

    fn image(store: &mut Store, id: InspectionId, angle: PhotoLabel, seed: u8) {
        let jpeg = [0xFF, 0xD8, seed, seed, 0xFF, 0xD9];
        store
            .add_image(
                id,
                &NewImage {
                    angle,
                    camera: "cam",
                    captured_at: at(1),
                    source_width: 4,
                    source_height: 3,
                    source_bytes: 100,
                    width: 4,
                    height: 3,
                    jpeg: &jpeg,
                },
            )
            .unwrap();
    }

    fn begin(store: &mut Store, case: &str) -> InspectionId {
        let case = CaseId::parse(case).unwrap();
        let angles = [PhotoLabel::Front, PhotoLabel::Rear];
        store
            .begin_inspection(
                &NewInspection { case_id: &case, vehicle: None, angles: &angles, expected_image_bytes: 6 },
                at(0),
            )
            .unwrap()
    }

    /// Copies the sound buffer in `dir` as a salvage would, returning the fresh buffer.
    fn salvage_copy(dir: &Path) -> (Connection, SalvageReport) {
        let conn = read_only(&dir.join(crate::store::FILE_NAME)).unwrap();
        let source = Source::new(conn).unwrap();
        let mut fresh = schema::open(&dir.join("fresh.sqlite3"), false).unwrap().connection;
        let report = copy(&source, &mut fresh, at(100));
        (fresh, report)
    }

    #[test]
    fn states_sessions_and_answers_come_across_and_ids_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let caps = Caps { max_bytes: u64::MAX, min_free_disk: 0 };
        {
            let mut store = Store::open(dir.path(), caps, at(0)).unwrap();
            // 1: being uploaded, with a session given up before and a live one holding Front.
            let one = begin(&mut store, "CASE-ONE");
            image(&mut store, one, PhotoLabel::Front, 1);
            store.record_angle_failure(one, PhotoLabel::Rear, "camera gone", at(1)).unwrap();
            store.finish_capture(one, at(2)).unwrap();
            store.set_state(one, InspectionState::Uploading, None, at(3)).unwrap();
            store.open_session(one, "S-OLD").unwrap();
            store.abandon_session(one, "expired", at(4)).unwrap();
            store.open_session(one, "S-NEW").unwrap();
            let sha = hex::encode(Sha256::digest([0xFF, 0xD8, 1, 1, 0xFF, 0xD9]));
            store.mark_sent(one, "S-NEW", &[(PhotoLabel::Front, sha.as_str())], at(5)).unwrap();
            // 2: completed by the cloud.
            let two = begin(&mut store, "CASE-TWO");
            image(&mut store, two, PhotoLabel::Front, 2);
            store.finish_capture(two, at(2)).unwrap();
            store.set_state(two, InspectionState::Uploading, None, at(3)).unwrap();
            store.set_state(two, InspectionState::Completed, None, at(4)).unwrap();
            // 3: still capturing (the process died), then 4 begun and pruned away.
            let three = begin(&mut store, "CASE-THREE");
            image(&mut store, three, PhotoLabel::Rear, 3);
            store.remember_command("cmd-1", r#"{"status":"accepted"}"#, at(6)).unwrap();
        }
        let (fresh, report) = salvage_copy(dir.path());
        assert_eq!((report.inspections_recovered, report.images_recovered), (3, 3), "{report:#?}");
        assert!(report.lost.is_empty() && !report.more_may_be_lost, "{report:#?}");
        let state = |id: i64| -> (String, Option<String>) {
            fresh
                .query_row("SELECT state, session FROM inspections WHERE id = ?1", [id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .unwrap()
        };
        assert_eq!(
            state(1),
            ("captured".to_owned(), Some("S-NEW".to_owned())),
            "uploading goes back to the queue"
        );
        assert_eq!(state(2).0, "completed");
        assert_eq!(state(3).0, "capturing", "left for the open path to handle as interrupted");
        let count = |sql: &str| fresh.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(
            count("SELECT COUNT(*) FROM dead_sessions WHERE session = 'S-OLD'"),
            1,
            "a dead session stays dead"
        );
        assert_eq!(count("SELECT COUNT(*) FROM sent WHERE session = 'S-NEW' AND angle = 'Front'"), 1);
        assert_eq!(
            count("SELECT COUNT(*) FROM angle_failures WHERE inspection_id = 1 AND angle = 'Rear'"),
            1
        );
        assert_eq!(count("SELECT COUNT(*) FROM commands WHERE command_id = 'cmd-1'"), 1);
        assert_eq!(count("SELECT seq FROM sqlite_sequence WHERE name = 'inspections'"), 3);

        // Without a readable sequence, the next id jumps past anything that may have been used.
        {
            let conn = Connection::open(dir.path().join(crate::store::FILE_NAME)).unwrap();
            conn.execute("DELETE FROM sqlite_sequence", []).unwrap();
        }
        let _ = std::fs::remove_file(dir.path().join("fresh.sqlite3"));
        let (fresh, report) = salvage_copy(dir.path());
        let seq: i64 = fresh
            .query_row("SELECT seq FROM sqlite_sequence WHERE name = 'inspections'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seq, 3 + ID_MARGIN);
        assert!(report.notes.iter().any(|n| n.contains("id sequence")), "{report:#?}");
    }

    #[test]
    fn a_salvaged_buffer_left_waiting_by_a_stop_is_put_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::store::FILE_NAME);
        let done = disk::with_suffix(&path, SALVAGED);
        std::fs::write(&done, b"salvaged").unwrap();
        std::fs::write(&path, b"damaged").unwrap();
        finish_interrupted(&path).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"damaged",
            "the damaged file is still there: salvage again"
        );
        std::fs::remove_file(&path).unwrap();
        finish_interrupted(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"salvaged");
        assert!(!done.exists());
    }

    #[test]
    fn the_damage_in_a_summary_is_one_short_line() {
        let record = RecoveryRecord {
            id: 1,
            at: at(0),
            moved_to: PathBuf::from("state/buffer.sqlite3.corrupt-1"),
            damage: "quick_check: *** in database main ***\nPage 3: never used\nPage 4: never used"
                .to_owned(),
            acknowledged_at: None,
            report: SalvageReport {
                inspections_recovered: 2,
                images_recovered: 15,
                lost: vec![LostInspection {
                    id: InspectionId(2),
                    case_id: "CASE-B".to_owned(),
                    state: Some(InspectionState::Captured),
                    angles: vec![LostAngle { angle: "Rear".to_owned(), why: LOST_MISMATCH.to_owned() }],
                }],
                lost_without_case_id: 1,
                ..SalvageReport::default()
            },
        };
        let summary = record.summary();
        assert!(!summary.contains('\n'), "{summary}");
        assert!(summary.contains("(Page 3: never used and 1 more complaint(s))"), "{summary}");
        assert!(summary.contains("2 inspection(s) with 15 image(s) recovered"), "{summary}");
        assert!(
            summary.contains("inspection 2 (CASE-B, captured): Rear (its image no longer matches"),
            "{summary}"
        );
        assert!(summary.contains("1 inspection(s) whose case id is unreadable"), "{summary}");
        assert!(summary.ends_with("kept at state/buffer.sqlite3.corrupt-1"), "{summary}");
    }
}
