//! Disk space as the buffer sees it: what the caps may count (the file system's free space and
//! the buffer's own free pages), the reserve file that lets the buffer write what must be
//! written on a full disk, and giving pruned pages back to the file system.

use std::path::{Path, PathBuf};

use super::error::sqlite_error;
use super::{disk, schema, to_u64, Store, StoreError};

/// Size of `buffer.sqlite3.reserve`: room for the WAL of the writes that must not fail for want
/// of disk (an angle failure, the end of a capture, upload bookkeeping, a batch of pruning, the
/// first step of giving space back).
pub const RESERVE_BYTES: u64 = 4 << 20;

/// Pages moved by one step of incremental vacuum, at most; a step also never needs more than a
/// third of the free disk for its WAL.
const MAX_VACUUM_STEP: u64 = 4096;

/// The reserve file of the buffer file at `db`.
pub(super) fn reserve_path(db: &Path) -> PathBuf {
    disk::with_suffix(db, ".reserve")
}

/// Deletes the reserve file of the buffer at `db`, if there is one, because a write that must
/// not fail met a full disk. Returns whether there was one to give.
pub(super) fn release_reserve(db: &Path) -> bool {
    match std::fs::remove_file(reserve_path(db)) {
        Ok(()) => {
            log::warn!(path:% = db.display(), bytes = RESERVE_BYTES; "Disk full: the buffer's reserve was released so that it can still write what it must");
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            log::error!(path:% = db.display(), error:% = e; "The buffer's reserve cannot be released");
            false
        }
    }
}

impl Store {
    /// Runs a write that must not fail for want of disk: on `SQLITE_FULL` (the write was
    /// rolled back whole) the reserve is released and the write tried once more.
    pub(super) fn writing<T>(
        &mut self,
        mut write: impl FnMut(&mut Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match write(self) {
            Err(StoreError::DiskFull { .. }) if release_reserve(&self.path) => write(self),
            other => other,
        }
    }

    /// The bytes new inspections and images may use: the file system's free space plus the
    /// buffer's free pages, less the reserve's size while the reserve file is missing.
    pub(super) fn usable_space(&self) -> Result<u64, StoreError> {
        let free = self.free_bytes()?.saturating_add(self.freelist_bytes()?);
        let held_back = if reserve_path(&self.path).exists() { 0 } else { RESERVE_BYTES };
        Ok(free.saturating_sub(held_back))
    }

    /// `freelist_count × page_size`: pages of the file that hold nothing and are reused first.
    fn freelist_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.free_pages()?.saturating_mul(self.page_size()?))
    }

    pub(super) fn page_size(&self) -> Result<u64, StoreError> {
        self.conn
            .pragma_query_value(None, "page_size", |r| r.get::<_, i64>(0))
            .map(to_u64)
            .map_err(|e| sqlite_error(&self.path, e))
    }

    /// The owner makes the reserve file when it is missing and the disk has room for it.
    /// Failing to is logged, never an error: the reserve only matters on a full disk.
    pub(super) fn restore_reserve(&self) {
        let reserve = reserve_path(&self.path);
        if !self.owner || reserve.exists() {
            return;
        }
        match self.free_bytes() {
            Ok(free) if free >= RESERVE_BYTES => {}
            _ => return,
        }
        match disk::create_reserve(&reserve, RESERVE_BYTES) {
            Ok(()) => {
                log::info!(path:% = reserve.display(), bytes = RESERVE_BYTES; "Buffer reserve in place for writes on a full disk")
            }
            Err(e) => {
                log::warn!(path:% = reserve.display(), error:% = e; "Buffer reserve cannot be made; it is tried again later")
            }
        }
    }

    /// Gives the buffer's free pages back to the file system: steps of
    /// `PRAGMA incremental_vacuum(n)`, each small enough for the WAL to fit on the disk,
    /// each followed by a TRUNCATE checkpoint that shrinks the file. Stops early (logged) when
    /// the disk has no room even for a small step or a reader holds the WAL; the rest goes back
    /// after the next prune. Then the reserve is made again if it was used.
    pub(super) fn give_space_back(&mut self) {
        let before = self.page_count().unwrap_or(0);
        if let Err(e) = self.vacuum_steps() {
            log::warn!(path:% = self.path.display(), error:% = e; "Buffer space not all given back after pruning; the rest goes back after the next prune");
        }
        let after = self.page_count().unwrap_or(0);
        if after < before {
            log::debug!(path:% = self.path.display(), pages_before = before, pages_after = after; "Buffer file shrunk");
        }
        self.restore_reserve();
    }

    fn vacuum_steps(&mut self) -> Result<(), StoreError> {
        let err = |path: &Path, e| sqlite_error(path, e);
        if !schema::has_incremental_vacuum(&self.conn).map_err(|e| err(&self.path, e))? {
            return Ok(());
        }
        let page_size = self.page_size()?.max(512);
        loop {
            let free_pages = self.free_pages()?;
            if free_pages == 0 {
                return Ok(());
            }
            let mut room = self.free_bytes()?;
            if room < 48 * page_size && release_reserve(&self.path) {
                room = self.free_bytes()?;
            }
            let step = (room / page_size / 3).min(MAX_VACUUM_STEP).min(free_pages);
            if step == 0 {
                return Err(StoreError::DiskFull { path: self.path.clone() });
            }
            let path = self.path.clone();
            self.writing(|s| incremental_vacuum(&s.conn, step).map_err(|e| err(&path, e)))?;
            if !schema::checkpoint_truncate(&self.conn).map_err(|e| err(&self.path, e))? {
                log::debug!(path:% = self.path.display(); "A reader holds the WAL; the rest of the space goes back later");
                return Ok(());
            }
        }
    }

    /// A file made without incremental vacuum (before it was set) is converted once, by the
    /// owner, when the disk has room for what `VACUUM` writes (about twice the file). Until
    /// then freed pages are reused but not given back; it is tried again at every open.
    pub(super) fn convert_to_incremental_vacuum(&mut self) {
        let err = |e| sqlite_error(&self.path, e);
        match schema::has_incremental_vacuum(&self.conn).map_err(err) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                log::warn!(path:% = self.path.display(), error:% = e; "Buffer vacuum mode cannot be read");
                return;
            }
        }
        let size = self.page_count().unwrap_or(0).saturating_mul(self.page_size().unwrap_or(4096));
        let free = self.free_bytes().unwrap_or(0);
        let needed = size.saturating_mul(2).saturating_add(RESERVE_BYTES);
        if free < needed {
            log::warn!(path:% = self.path.display(), bytes = size, free = free, needed = needed; "Buffer not yet converted to incremental vacuum: the disk lacks room for the one-time VACUUM; freed pages are reused meanwhile");
            return;
        }
        log::info!(path:% = self.path.display(), bytes = size; "Converting the buffer to incremental vacuum with a one-time VACUUM");
        match schema::convert_to_incremental_vacuum(&self.conn) {
            Ok(()) => log::info!(path:% = self.path.display(); "Buffer converted to incremental vacuum"),
            Err(e) => {
                log::warn!(path:% = self.path.display(), error:% = e; "Buffer not converted to incremental vacuum; it is tried again at the next start")
            }
        }
    }
}

/// One `PRAGMA incremental_vacuum(pages)`, stepped to its end (it returns a row per page).
fn incremental_vacuum(conn: &rusqlite::Connection, pages: u64) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(&format!("PRAGMA incremental_vacuum({pages})"))?;
    let mut rows = stmt.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}
