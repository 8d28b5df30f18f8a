//! The buffer file's schema and its migrations, and the pragmas every connection gets.
//! The module doc of [`super`] describes the tables; this file is the SQL that makes them.

use std::path::Path;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, TransactionBehavior};

use super::error::sqlite_error;
use super::StoreError;

/// The schema version this build writes and understands (`PRAGMA user_version`).
pub const SCHEMA_VERSION: u32 = 4;

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
}
