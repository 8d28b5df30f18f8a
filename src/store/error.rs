//! What can go wrong with the buffer, each case with what happened, whether trying again can
//! help, and what a person can do about it.

use std::path::{Path, PathBuf};

use rusqlite::{ffi, ErrorCode};

use super::{InspectionId, InspectionState, Refusal};
use crate::vehicle::PhotoLabel;

/// An error of the buffer. Messages name the buffer file or the inspection, and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A cap refused a new inspection or image ([`Refusal`] has the numbers). Nothing was
    /// written and nothing buffered was touched. Retrying helps once inspections are uploaded
    /// and pruned, disk space is freed, or the cap is raised.
    #[error("buffer {path} refuses {what}: {refusal}")]
    Full { path: PathBuf, what: String, refusal: Refusal },

    /// SQLite found no room to write (`SQLITE_FULL`: the disk, or the page limit of
    /// [`super::Store::set_page_limit`]). The write was rolled back; everything committed
    /// before is intact and the store stays usable. Retrying helps once space is freed.
    #[error(
        "buffer {path} is out of disk space (SQLITE_FULL); this write was rolled back and everything \
         stored before is intact; free disk space on the state directory's file system or upload \
         buffered inspections"
    )]
    DiskFull { path: PathBuf },

    /// Another connection held a lock for longer than the busy timeout: another process (a
    /// second daemon, or a `sqlite3` shell in a transaction) is using the buffer. Not
    /// corruption: nothing was changed. Retrying helps once the other process lets go.
    #[error(
        "buffer {path} is locked by another process ({source}); stop the other process using it \
         (a second capture-kiosk, or a sqlite3 shell) and try again"
    )]
    Locked { path: PathBuf, source: rusqlite::Error },

    /// The buffer file or its directory cannot be opened, read or written (permissions, a
    /// read-only file system). Not corruption: nothing was moved or changed. Retrying does not
    /// help until the permissions are fixed.
    #[error(
        "buffer {path} cannot be opened for reading and writing ({source}); make sure the service \
         user owns the state directory and the buffer files and that the file system is writable"
    )]
    Access { path: PathBuf, source: rusqlite::Error },

    /// A file-system operation on the state directory failed (creating it, taking the lock,
    /// reading free space, moving a damaged file aside). Retrying does not help until the
    /// cause (named in the message) is fixed.
    #[error("cannot {action} {path}: {source}; make sure it is a directory the service user can write")]
    Io { path: PathBuf, action: &'static str, source: std::io::Error },

    /// The file was written by a newer capture-kiosk whose schema this build does not know.
    /// Nothing in it was changed. Retrying does not help: run the newer release again.
    #[error(
        "buffer {path} has schema version {found} but this capture-kiosk knows versions up to \
         {supported}; it was written by a newer release and was left untouched: run that release \
         again, or move the file away to start an empty buffer (its inspections may not be \
         uploaded yet)"
    )]
    NewerSchema { path: PathBuf, found: i64, supported: u32 },

    /// Reading the buffer without writing (`queue`) found a file at an older schema version,
    /// which only a writer may migrate. Nothing was changed. Retrying helps once the kiosk
    /// (or any command that writes, such as `upload`) has opened the buffer once.
    #[error(
        "buffer {path} has schema version {found}, older than this capture-kiosk's {current}, and \
         reading it without writing cannot migrate it; start capture-kiosk (or run \
         `capture-kiosk upload`) once, which migrates it, then ask again"
    )]
    OlderSchema { path: PathBuf, found: u32, current: u32 },

    /// The buffer cannot be read without writing beside it (`queue` never writes): SQLite's
    /// shared-memory index is missing or cannot be set up (a full disk, a read-only file
    /// system), or a writer kept changing the file. Nothing was changed. Retrying helps once
    /// the kiosk has run (it folds the write-ahead log back into the file) or space is freed.
    #[error(
        "buffer {path} cannot be read without writing to it ({detail}); this command never writes: \
         start capture-kiosk (or run `capture-kiosk upload`) so that it folds its write-ahead log \
         back into the file, or free some disk space, then ask again"
    )]
    ReadOnly { path: PathBuf, detail: String },

    /// SQLite refused to switch the file to WAL (a file system without shared memory or
    /// locking, such as some network mounts). Retrying does not help: use a local file system.
    #[error("buffer {path} cannot use write-ahead logging (journal_mode is {mode}); put the state directory on a local file system")]
    NoWal { path: PathBuf, mode: String },

    /// SQLite reports the file as damaged, or an image's bytes no longer match their sha256.
    /// At open a damaged file is salvaged into a fresh buffer and moved aside; this error is seen
    /// when that is not possible (another process holds the buffer) or when the damage shows
    /// later. Retrying does not help.
    #[error(
        "buffer {path} is damaged: {detail}; stop capture-kiosk and check it with \
         `sqlite3 {path} 'PRAGMA integrity_check'`; at its next start capture-kiosk salvages \
         what the damaged file still holds into a fresh buffer and keeps the file aside, never \
         deleting it"
    )]
    Corrupt { path: PathBuf, detail: String },

    /// A row holds a value this build cannot read (an unknown state or label, bad JSON): the
    /// file was edited by hand or by another program. Retrying does not help.
    #[error("buffer {path} has an unreadable inspection {id}: {detail}; was the file edited outside capture-kiosk?")]
    Unreadable { path: PathBuf, id: InspectionId, detail: String },

    /// No inspection has this id (never created, or pruned). Retrying does not help.
    #[error("buffer {path} has no inspection {id}; it was never created or was pruned after upload")]
    UnknownInspection { path: PathBuf, id: InspectionId },

    /// The inspection's state does not allow this move; nothing was changed. Retrying does not
    /// help.
    #[error("inspection {id} cannot go from {from} to {to}: {why}")]
    IllegalTransition { id: InspectionId, from: InspectionState, to: InspectionState, why: String },

    /// Images and angle failures are only recorded while an inspection is `capturing`; nothing
    /// was changed. Retrying does not help.
    #[error("inspection {id} is {state}, not capturing; angle {angle} was not recorded")]
    NotCapturing { id: InspectionId, state: InspectionState, angle: PhotoLabel },

    /// The angle already has its image: a second one is refused, not swapped in, and the first
    /// is kept. Retrying does not help.
    #[error("inspection {id} already holds an image of angle {angle}; the stored image is kept")]
    AngleAlreadyStored { id: InspectionId, angle: PhotoLabel },

    /// The angle is not one the inspection asked for; nothing was changed. Retrying does not
    /// help.
    #[error("inspection {id} did not request angle {angle} (it requested {requested})")]
    AngleNotRequested { id: InspectionId, angle: PhotoLabel, requested: String },

    /// The new inspection lists no angle, or an angle twice; nothing was stored. Retrying does
    /// not help.
    #[error("inspection for case {case_id} not started: {why}")]
    InvalidInspection { case_id: String, why: String },

    /// A cloud session that was given up (expired, consumed, or lost with its tokens) is never
    /// used again; nothing was changed. Retrying does not help: authenticate a new session.
    #[error(
        "inspection {id} cannot use cloud session {session}: it was given up earlier and is never used again"
    )]
    SessionGivenUp { id: InspectionId, session: String },

    /// Any other SQLite failure (an I/O error from the storage device, a bug). The transaction
    /// was rolled back. Retrying may help for I/O errors of a flaky device; check the kernel log.
    #[error("buffer {path} failed: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
}

impl StoreError {
    /// Whether the same call can succeed later without a person changing anything but the
    /// buffer's contents or free space (uploads, pruning, another process letting go).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Full { .. }
            | StoreError::DiskFull { .. }
            | StoreError::Locked { .. }
            | StoreError::OlderSchema { .. }
            | StoreError::ReadOnly { .. } => true,
            StoreError::Sqlite { source, .. } => {
                source.sqlite_error_code() == Some(ErrorCode::SystemIoFailure)
            }
            StoreError::Access { .. }
            | StoreError::Io { .. }
            | StoreError::NewerSchema { .. }
            | StoreError::NoWal { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Unreadable { .. }
            | StoreError::UnknownInspection { .. }
            | StoreError::IllegalTransition { .. }
            | StoreError::NotCapturing { .. }
            | StoreError::AngleAlreadyStored { .. }
            | StoreError::AngleNotRequested { .. }
            | StoreError::InvalidInspection { .. }
            | StoreError::SessionGivenUp { .. } => false,
        }
    }
}

/// Sorts a SQLite failure on the buffer at `path` into the variant a person can act on.
pub(crate) fn sqlite_error(path: &Path, source: rusqlite::Error) -> StoreError {
    let path = path.to_owned();
    // SQLite makes the WAL index (`-shm`) by writing a byte into each of its pages; on a disk
    // with no byte free that fails as an I/O error of the index's size, which is a full disk.
    let index_not_allocated = matches!(
        source,
        rusqlite::Error::SqliteFailure(ffi::Error { extended_code: ffi::SQLITE_IOERR_SHMSIZE, .. }, _)
    );
    match source.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => StoreError::DiskFull { path },
        Some(ErrorCode::SystemIoFailure) if index_not_allocated => StoreError::DiskFull { path },
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Locked { path, source },
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            StoreError::Corrupt { path, detail: source.to_string() }
        }
        Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => {
            StoreError::Access { path, source }
        }
        _ => StoreError::Sqlite { path, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    fn check(code: i32, variant: &str, retryable: bool) {
        let e = sqlite_error(Path::new("state/buffer.sqlite3"), failure(code));
        let shown = format!("{e:?}");
        assert!(shown.starts_with(variant), "code {code}: {shown}");
        assert_eq!(e.is_retryable(), retryable, "code {code}");
        let message = e.to_string();
        assert!(message.contains("state/buffer.sqlite3"), "{message}");
        assert!(!message.ends_with('.'), "{message}");
    }

    #[test]
    fn sqlite_failures_are_sorted_into_what_a_person_can_act_on() {
        use rusqlite::ffi;
        check(ffi::SQLITE_FULL, "DiskFull", true);
        check(ffi::SQLITE_BUSY, "Locked", true);
        check(ffi::SQLITE_LOCKED, "Locked", true);
        check(ffi::SQLITE_CORRUPT, "Corrupt", false);
        check(ffi::SQLITE_NOTADB, "Corrupt", false);
        check(ffi::SQLITE_CANTOPEN, "Access", false);
        check(ffi::SQLITE_READONLY, "Access", false);
        check(ffi::SQLITE_PERM, "Access", false);
        check(ffi::SQLITE_IOERR, "Sqlite", true);
        check(ffi::SQLITE_IOERR_SHMSIZE, "DiskFull", true);
        check(ffi::SQLITE_MISMATCH, "Sqlite", false);
    }
}
