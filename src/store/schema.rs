//! The buffer file's schema and its migrations, and the pragmas every connection gets.
//! The module doc of [`super`] describes the tables; this file is the SQL that makes them.

use std::path::Path;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::error::sqlite_error;
use super::StoreError;

/// The schema version this build writes and understands (`PRAGMA user_version`).
pub const SCHEMA_VERSION: u32 = 6;

/// How long a statement waits for another connection's lock before failing with `Locked`.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The WAL file is truncated back to this size after a checkpoint.
const JOURNAL_SIZE_LIMIT: i64 = 64 << 20;

/// One step forward: the SQL that takes the schema from `to - 1` to `to`.
struct Migration {
    to: u32,
    sql: &'static str,
}

/// Every step from an empty file to [`SCHEMA_VERSION`], in order. A later version appends a
/// step here and never edits an earlier one.
const MIGRATIONS: &[Migration] = &[
    Migration {
        to: 1,
        sql: "
        CREATE TABLE inspections (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            case_id     TEXT    NOT NULL,
            vehicle     TEXT,
            angles      TEXT    NOT NULL,
            state       TEXT    NOT NULL CHECK (state IN
                            ('capturing', 'captured', 'uploading', 'completed', 'failed', 'cancelled')),
            reason      TEXT,
            created_at  INTEGER NOT NULL,
            updated_at  INTEGER NOT NULL
        ) STRICT;
        CREATE INDEX inspections_by_state ON inspections (state, updated_at);

        CREATE TABLE images (
            inspection_id INTEGER NOT NULL REFERENCES inspections (id) ON DELETE CASCADE,
            angle         TEXT    NOT NULL,
            camera        TEXT    NOT NULL,
            captured_at   INTEGER NOT NULL,
            source_width  INTEGER NOT NULL,
            source_height INTEGER NOT NULL,
            source_bytes  INTEGER NOT NULL,
            width         INTEGER NOT NULL,
            height        INTEGER NOT NULL,
            bytes         INTEGER NOT NULL,
            sha256        TEXT    NOT NULL,
            jpeg          BLOB    NOT NULL,
            UNIQUE (inspection_id, angle)
        ) STRICT;
        CREATE INDEX images_bytes ON images (inspection_id, bytes);

        CREATE TABLE angle_failures (
            inspection_id INTEGER NOT NULL REFERENCES inspections (id) ON DELETE CASCADE,
            angle         TEXT    NOT NULL,
            reason        TEXT    NOT NULL,
            at            INTEGER NOT NULL,
            UNIQUE (inspection_id, angle)
        ) STRICT;
    ",
    },
    Migration {
        to: 2,
        sql: "
        ALTER TABLE inspections ADD COLUMN upload_attempts INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE inspections ADD COLUMN upload_error    TEXT;
        ALTER TABLE inspections ADD COLUMN session         TEXT;

        CREATE TABLE sent (
            inspection_id INTEGER NOT NULL REFERENCES inspections (id) ON DELETE CASCADE,
            session       TEXT    NOT NULL,
            angle         TEXT    NOT NULL,
            sha256        TEXT    NOT NULL,
            at            INTEGER NOT NULL,
            UNIQUE (inspection_id, session, angle)
        ) STRICT;

        CREATE TABLE dead_sessions (
            session       TEXT    PRIMARY KEY,
            inspection_id INTEGER NOT NULL REFERENCES inspections (id) ON DELETE CASCADE,
            why           TEXT    NOT NULL,
            at            INTEGER NOT NULL
        ) STRICT;
    ",
    },
    Migration {
        to: 3,
        sql: "
        CREATE TABLE commands (
            seq        INTEGER PRIMARY KEY AUTOINCREMENT,
            command_id TEXT    NOT NULL UNIQUE,
            answer     TEXT    NOT NULL,
            at         INTEGER NOT NULL
        ) STRICT;
    ",
    },
    Migration { to: 4, sql: RECOVERIES },
    Migration {
        to: 5,
        sql: "
        -- What each inspection holds, kept by the triggers below, so that nothing has to
        -- count images row by row.
        ALTER TABLE inspections ADD COLUMN images INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE inspections ADD COLUMN bytes  INTEGER NOT NULL DEFAULT 0;
        UPDATE inspections SET
            images = (SELECT COUNT(*) FROM images m WHERE m.inspection_id = inspections.id),
            bytes  = (SELECT COALESCE(SUM(m.bytes), 0) FROM images m WHERE m.inspection_id = inspections.id);

        -- The upload queue's order: rank first, then age. A rank above 0 means the
        -- inspection was moved behind the others after too many failed tries in a row.
        ALTER TABLE inspections ADD COLUMN queue_rank    INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE inspections ADD COLUMN turn_attempts INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE inspections ADD COLUMN moved_behind  INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX inspections_upload_queue ON inspections (queue_rank, id)
            WHERE state IN ('captured', 'uploading');
        CREATE INDEX inspections_not_completed ON inspections (created_at)
            WHERE state <> 'completed';
        CREATE INDEX dead_sessions_by_inspection ON dead_sessions (inspection_id);

        -- Inspections, images and bytes per state: the buffer's totals in six rows.
        CREATE TABLE state_totals (
            state       TEXT    PRIMARY KEY,
            inspections INTEGER NOT NULL,
            images      INTEGER NOT NULL,
            bytes       INTEGER NOT NULL
        ) STRICT, WITHOUT ROWID;
        INSERT INTO state_totals (state, inspections, images, bytes)
            SELECT s.state, COUNT(i.id), COALESCE(SUM(i.images), 0), COALESCE(SUM(i.bytes), 0)
            FROM (SELECT 'capturing' AS state UNION ALL SELECT 'captured' UNION ALL SELECT 'uploading'
                  UNION ALL SELECT 'completed' UNION ALL SELECT 'failed' UNION ALL SELECT 'cancelled') s
            LEFT JOIN inspections i ON i.state = s.state
            GROUP BY s.state;

        CREATE TRIGGER image_stored AFTER INSERT ON images BEGIN
            UPDATE inspections SET images = images + 1, bytes = bytes + NEW.bytes
            WHERE id = NEW.inspection_id;
        END;
        CREATE TRIGGER image_deleted AFTER DELETE ON images BEGIN
            UPDATE inspections SET images = images - 1, bytes = bytes - OLD.bytes
            WHERE id = OLD.inspection_id;
        END;
        CREATE TRIGGER inspection_added AFTER INSERT ON inspections BEGIN
            UPDATE state_totals SET inspections = inspections + 1, images = images + NEW.images,
                                    bytes = bytes + NEW.bytes
            WHERE state = NEW.state;
        END;
        CREATE TRIGGER inspection_deleted AFTER DELETE ON inspections BEGIN
            UPDATE state_totals SET inspections = inspections - 1, images = images - OLD.images,
                                    bytes = bytes - OLD.bytes
            WHERE state = OLD.state;
        END;
        CREATE TRIGGER inspection_changed AFTER UPDATE OF state, images, bytes ON inspections
        WHEN OLD.state IS NOT NEW.state OR OLD.images <> NEW.images OR OLD.bytes <> NEW.bytes
        BEGIN
            UPDATE state_totals SET inspections = inspections - 1, images = images - OLD.images,
                                    bytes = bytes - OLD.bytes
            WHERE state = OLD.state;
            UPDATE state_totals SET inspections = inspections + 1, images = images + NEW.images,
                                    bytes = bytes + NEW.bytes
            WHERE state = NEW.state;
        END;

        -- The audit trail of what left the buffer: one row per pruned inspection.
        CREATE TABLE pruned (
            seq           INTEGER PRIMARY KEY AUTOINCREMENT,
            inspection_id INTEGER NOT NULL,
            case_id       TEXT    NOT NULL,
            state         TEXT    NOT NULL,
            session       TEXT,
            completed_at  INTEGER NOT NULL,
            images        INTEGER NOT NULL,
            bytes         INTEGER NOT NULL,
            images_sha256 TEXT    NOT NULL,
            rule          TEXT    NOT NULL CHECK (rule IN ('retention', 'space'))
        ) STRICT;
    ",
    },
    Migration { to: 6, sql: super::quality::QUALITY_COLUMNS },
];

/// The reports of salvages from a damaged buffer file (`store/salvage.rs`): when, where the
/// damaged file was kept, what SQLite said about it, what was recovered and lost (JSON), and
/// when an operator acknowledged it (`NULL` until then).
const RECOVERIES: &str = "
        CREATE TABLE recoveries (
            id              INTEGER PRIMARY KEY AUTOINCREMENT,
            at              INTEGER NOT NULL,
            moved_to        TEXT    NOT NULL,
            damage          TEXT    NOT NULL,
            report          TEXT    NOT NULL,
            acknowledged_at INTEGER
        ) STRICT;
    ";

/// What [`open`] found and did.
pub(crate) struct Opened {
    pub connection: Connection,
    /// The version the file had before it was migrated, when it was migrated.
    pub migrated_from: Option<u32>,
}

/// Opens (or creates) the buffer at `path`: checks the schema version before writing
/// anything, sets the pragmas, runs `PRAGMA quick_check` when `check` is set, and migrates
/// forward. A damaged file comes back as [`StoreError::Corrupt`], a newer one as
/// [`StoreError::NewerSchema`], neither touched.
pub(crate) fn open(path: &Path, check: bool) -> Result<Opened, StoreError> {
    let err = |e| sqlite_error(path, e);
    let mut conn = Connection::open(path).map_err(err)?;
    // Until the file has proved sound, closing must not checkpoint its log into it: a damaged
    // file is kept aside with its `-wal` exactly as they were found.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true).map_err(err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    // Reading comes first: a file that is not a database, or one written by a newer release,
    // must be refused before a single byte of it changes.
    let found = user_version(&conn).map_err(err)?;
    refuse_newer(path, found)?;
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0)).map_err(err)?;
    if pages == 0 {
        // Only possible before the first table exists; later it would need a full VACUUM.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL").map_err(err)?;
    }
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NoWal { path: path.to_owned(), mode });
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(err)?;
    let _limit: i64 = conn
        .pragma_update_and_check(None, "journal_size_limit", JOURNAL_SIZE_LIMIT, |r| r.get(0))
        .map_err(err)?;
    if check {
        quick_check(path, &conn)?;
    }
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false).map_err(err)?;
    let migrated_from = migrate(path, &mut conn)?;
    Ok(Opened { connection: conn, migrated_from })
}

/// A connection that reads the buffer without writing anything, and what must still hold
/// once the reading is done for it to count (see [`Snapshot`]).
pub(crate) struct ReadOnly {
    pub connection: Connection,
    /// Set when the file was read as immutable (no `-wal` beside it).
    pub snapshot: Option<Snapshot>,
}

/// The buffer file as it was when it was opened as immutable: if a writer came along while it
/// was read (a `-wal` appeared, or the file changed), what was read may be torn.
pub(crate) struct Snapshot {
    identity: Option<(u64, u64, std::time::SystemTime)>,
}

impl Snapshot {
    fn take(path: &Path) -> Snapshot {
        Snapshot { identity: identity(path) }
    }

    /// Whether nothing wrote to the buffer since the snapshot was taken.
    pub fn still_current(&self, path: &Path) -> bool {
        !exists(&with_suffix(path, "-wal")) && identity(path) == self.identity
    }
}

fn identity(path: &Path) -> Option<(u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.ino(), meta.len(), meta.modified().ok()?))
}

/// Opens the buffer at `path` to read it without creating or changing anything: no `-wal` or
/// `-shm` is made, nothing is migrated. `Ok(None)` when there is no buffer yet (no file, or
/// an empty one). A file at another schema version, or a `-wal` without its `-shm`, is an
/// error saying what to do.
pub(crate) fn open_read_only(path: &Path) -> Result<Option<ReadOnly>, StoreError> {
    if !exists(path) {
        return Ok(None);
    }
    let wal = with_suffix(path, "-wal");
    let shm = with_suffix(path, "-shm");
    let snapshot = if !exists(&wal) {
        // Nothing has the buffer open: the file is whole on its own.
        Some(Snapshot::take(path))
    } else if exists(&shm) {
        None
    } else {
        return Err(StoreError::ReadOnly {
            path: path.to_owned(),
            detail: format!(
                "its write-ahead log {} has no shared-memory index {} beside it, which a reader \
                 would have to create",
                wal.display(),
                shm.display()
            ),
        });
    };
    let uri =
        format!("file:{}?mode=ro{}", uri_path(path), if snapshot.is_some() { "&immutable=1" } else { "" });
    let flags =
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let read_only_error = |e: rusqlite::Error| match sqlite_error(path, e) {
        e @ (StoreError::Corrupt { .. } | StoreError::Locked { .. }) => e,
        other => StoreError::ReadOnly { path: path.to_owned(), detail: other.to_string() },
    };
    let conn = Connection::open_with_flags(&uri, flags).map_err(read_only_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(read_only_error)?;
    let found = user_version(&conn).map_err(read_only_error)?;
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0)).map_err(read_only_error)?;
    if found == 0 && pages <= 1 {
        return Ok(None);
    }
    let found = refuse_newer(path, found)?;
    if found < SCHEMA_VERSION {
        return Err(StoreError::OlderSchema { path: path.to_owned(), found, current: SCHEMA_VERSION });
    }
    Ok(Some(ReadOnly { connection: conn, snapshot }))
}

/// Recounts what the counters of version 4 say (per inspection and per state); the
/// differences found, none when they agree.
pub(crate) fn recount(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT i.id, i.images, i.bytes,
                (SELECT COUNT(*) FROM images m WHERE m.inspection_id = i.id),
                (SELECT COALESCE(SUM(m.bytes), 0) FROM images m WHERE m.inspection_id = i.id)
         FROM inspections i",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })?;
    for row in rows {
        let (id, images, bytes, counted, summed) = row?;
        if (images, bytes) != (counted, summed) {
            problems.push(format!(
                "inspection {id}: counters say {images} image(s) of {bytes} bytes, the images table {counted} of {summed}"
            ));
        }
    }
    let mut stmt = conn.prepare(
        "SELECT t.state, t.inspections, t.images, t.bytes,
                (SELECT COUNT(*) FROM inspections i WHERE i.state = t.state),
                (SELECT COALESCE(SUM(i.images), 0) FROM inspections i WHERE i.state = t.state),
                (SELECT COALESCE(SUM(i.bytes), 0) FROM inspections i WHERE i.state = t.state)
         FROM state_totals t",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            [r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?],
            [r.get::<_, i64>(4)?, r.get::<_, i64>(5)?, r.get::<_, i64>(6)?],
        ))
    })?;
    for row in rows {
        let (state, kept, counted) = row?;
        if kept != counted {
            problems.push(format!(
                "state {state}: totals say {kept:?} (inspections, images, bytes), the rows {counted:?}"
            ));
        }
    }
    Ok(problems)
}

/// Whether the file gives pages back with `PRAGMA incremental_vacuum` (`auto_vacuum` = 2).
pub(crate) fn has_incremental_vacuum(conn: &Connection) -> rusqlite::Result<bool> {
    conn.pragma_query_value(None, "auto_vacuum", |r| r.get::<_, i64>(0)).map(|mode| mode == 2)
}

/// Converts the file to `auto_vacuum = INCREMENTAL` with one `VACUUM` (which rewrites it
/// whole), then empties the WAL. Outside any transaction.
pub(crate) fn convert_to_incremental_vacuum(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    conn.execute_batch("VACUUM")?;
    checkpoint_truncate(conn).map(|_| ())
}

/// `PRAGMA wal_checkpoint(TRUNCATE)`: copies the WAL into the file, shrinks the file to its
/// pages and the WAL to nothing. `Ok(false)` when a reader kept it from finishing.
pub(crate) fn checkpoint_truncate(conn: &Connection) -> rusqlite::Result<bool> {
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
    Ok(busy == 0)
}

/// `path` as the path part of an SQLite `file:` URI: `%`, `?` and `#` (and anything outside
/// printable ASCII) percent-encoded.
fn uri_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_graphic() && !matches!(b, b'%' | b'?' | b'#') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

fn with_suffix(path: &Path, suffix: &str) -> std::path::PathBuf {
    super::disk::with_suffix(path, suffix)
}

/// `PRAGMA quick_check`: `Ok` when it answers `ok`, [`StoreError::Corrupt`] with its first
/// complaints otherwise.
pub(crate) fn quick_check(path: &Path, conn: &Connection) -> Result<(), StoreError> {
    let problems = check_rows(conn, "quick_check").map_err(|e| sqlite_error(path, e))?;
    if problems.is_empty() {
        return Ok(());
    }
    Err(StoreError::Corrupt {
        path: path.to_owned(),
        detail: format!("quick_check: {}", problems.join("; ")),
    })
}

/// The rows of `PRAGMA integrity_check` or `quick_check`, without the single `ok`.
pub(crate) fn check_rows(conn: &Connection, pragma: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(&format!("PRAGMA {pragma}(20)"))?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut problems = Vec::new();
    for row in rows {
        let row = row?;
        if row != "ok" {
            problems.push(row);
        }
    }
    Ok(problems)
}

/// Runs every migration past the file's version, each step in its own immediate transaction
/// that also moves `user_version` forward. Returns the starting version if anything ran.
fn migrate(path: &Path, conn: &mut Connection) -> Result<Option<u32>, StoreError> {
    let err = |e| sqlite_error(path, e);
    let mut from = None;
    for step in MIGRATIONS {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        // Read again under the write lock: another process may have migrated meanwhile.
        let found = refuse_newer(path, user_version(&tx).map_err(err)?)?;
        if found >= step.to {
            continue;
        }
        tx.execute_batch(step.sql).map_err(err)?;
        tx.pragma_update(None, "user_version", step.to).map_err(err)?;
        tx.commit().map_err(err)?;
        log::info!(path:% = path.display(), from = found, to = step.to; "Buffer schema migrated");
        from.get_or_insert(found);
    }
    Ok(from)
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

/// The file's version if this build knows it, [`StoreError::NewerSchema`] otherwise.
fn refuse_newer(path: &Path, found: i64) -> Result<u32, StoreError> {
    match u32::try_from(found) {
        Ok(version) if version <= SCHEMA_VERSION => Ok(version),
        _ => Err(StoreError::NewerSchema { path: path.to_owned(), found, supported: SCHEMA_VERSION }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_consecutive_and_end_at_the_current_version() {
        for (i, step) in MIGRATIONS.iter().enumerate() {
            assert_eq!(step.to as usize, i + 1, "migration {i} must lead to version {}", i + 1);
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.to), Some(SCHEMA_VERSION));
    }

    #[test]
    fn a_new_file_gets_wal_incremental_vacuum_and_the_current_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.sqlite3");
        let opened = open(&path, true).unwrap();
        assert_eq!(opened.migrated_from, Some(0));
        let conn = &opened.connection;
        let get =
            |p: &str| conn.pragma_query_value(None, p, |r| r.get::<_, rusqlite::types::Value>(0)).unwrap();
        use rusqlite::types::Value::{Integer, Text};
        assert_eq!(get("journal_mode"), Text("wal".into()));
        assert_eq!(get("auto_vacuum"), Integer(2), "incremental");
        assert_eq!(get("synchronous"), Integer(2), "full");
        assert_eq!(get("foreign_keys"), Integer(1));
        assert_eq!(get("user_version"), Integer(i64::from(SCHEMA_VERSION)));
        drop(opened);
        let again = open(&path, true).unwrap();
        assert_eq!(again.migrated_from, None, "nothing to migrate the second time");
    }

    #[test]
    fn a_version_1_buffer_is_migrated_with_its_rows_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.sqlite3");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0].sql).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO inspections (case_id, angles, state, created_at, updated_at)
                 VALUES ('CASE-OLD', '[\"Front\"]', 'captured', 1, 1)",
                [],
            )
            .unwrap();
        }
        let opened = open(&path, true).unwrap();
        assert_eq!(opened.migrated_from, Some(1));
        let (case, attempts, session): (String, i64, Option<String>) = opened
            .connection
            .query_row("SELECT case_id, upload_attempts, session FROM inspections", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((case.as_str(), attempts, session), ("CASE-OLD", 0, None));
        let sent: i64 = opened.connection.query_row("SELECT COUNT(*) FROM sent", [], |r| r.get(0)).unwrap();
        assert_eq!(sent, 0);
    }

    #[test]
    fn a_version_3_buffer_without_incremental_vacuum_is_migrated_counted_and_converted() {
        use crate::store::{Caps, InspectionId, InspectionState, Store};
        use std::time::{Duration, UNIX_EPOCH};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(super::super::FILE_NAME);
        {
            // A version 3 file as an older release left it: no incremental vacuum, WAL.
            let mut conn = Connection::open(&path).unwrap();
            let mode: String =
                conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).unwrap();
            assert_eq!(mode, "wal");
            let tx = conn.transaction().unwrap();
            for step in &MIGRATIONS[..3] {
                tx.execute_batch(step.sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 3).unwrap();
            for (id, state) in [(1, "completed"), (2, "captured"), (3, "capturing"), (4, "failed")] {
                tx.execute(
                    "INSERT INTO inspections (id, case_id, angles, state, reason, created_at, updated_at)
                     VALUES (?1, ?2, '[\"Front\",\"Rear\"]', ?3, CASE ?3 WHEN 'failed' THEN 'no angle' END, ?1, ?1)",
                    rusqlite::params![id, format!("CASE-{id}"), state],
                )
                .unwrap();
            }
            for (id, angle, bytes) in
                [(1, "Front", 3000), (1, "Rear", 5000), (2, "Front", 7000), (3, "Rear", 11)]
            {
                tx.execute(
                    "INSERT INTO images (inspection_id, angle, camera, captured_at, source_width, source_height,
                                         source_bytes, width, height, bytes, sha256, jpeg)
                     VALUES (?1, ?2, 'cam', 0, 1, 1, 1, 1, 1, ?3, ?4, zeroblob(?3))",
                    rusqlite::params![id, angle, bytes, hex::encode(<sha2::Sha256 as sha2::Digest>::digest(vec![0u8; bytes as usize]))],
                )
                .unwrap();
            }
            tx.commit().unwrap();
            assert!(!has_incremental_vacuum(&conn).unwrap());
        }
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let store = Store::open(dir.path(), Caps { max_bytes: 1 << 30, min_free_disk: 0 }, now).unwrap();
        assert_eq!(store.recovery().migrated_from, Some(3));
        assert!(has_incremental_vacuum(&store.conn).unwrap(), "converted by the one-time VACUUM");
        assert_eq!(
            store.check_integrity().unwrap(),
            Vec::<String>::new(),
            "the counters agree with the rows"
        );
        let totals = store.totals().unwrap();
        assert_eq!(
            (totals.inspections, totals.images, totals.bytes, totals.awaiting_upload),
            (4, 4, 15_011, 2)
        );
        assert_eq!(
            totals.oldest_created_at,
            Some(UNIX_EPOCH + Duration::from_millis(2)),
            "the oldest inspection not completed"
        );
        let list = store.list().unwrap();
        let states: Vec<InspectionState> = list.iter().map(|i| i.state).collect();
        use InspectionState::*;
        assert_eq!(states, vec![Completed, Captured, Captured, Failed], "the interrupted one is evidence");
        assert_eq!(list[0].bytes, 8000);
        assert_eq!(store.next_to_upload().unwrap().map(|i| i.id), Some(InspectionId(2)));
        assert_eq!(store.upload_state(InspectionId(2)).unwrap().moved_behind, 0);
        assert!(store.pruned_history().unwrap().is_empty());
        drop(store);
        let again = Store::open(dir.path(), Caps { max_bytes: 1 << 30, min_free_disk: 0 }, now).unwrap();
        assert_eq!(again.recovery().migrated_from, None);
    }
}
