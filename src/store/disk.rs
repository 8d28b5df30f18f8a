//! The operating-system side of the buffer: free space on the state directory's file system
//! (statvfs), the lock that marks the process owning the buffer (flock), the reserve file
//! (fallocate), moving a damaged file aside and syncing the directory after a rename.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::clock::unix_millis;

/// Bytes an unprivileged process may still write on the file system holding `dir`
/// (`f_bavail * f_frsize`).
pub(crate) fn free_bytes(dir: &Path) -> io::Result<u64> {
    let c_path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the path contains a NUL byte"))?;
    let mut stat = MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points to writable memory
    // of the right type; statvfs fills it in or returns -1.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised the struct (and it was zeroed anyway).
    let stat = unsafe { stat.assume_init() };
    // The field types are narrower on 32-bit boards, where these conversions are not no-ops.
    #[allow(clippy::useless_conversion)]
    let (blocks, block_size) = (u64::from(stat.f_bavail), u64::from(stat.f_frsize));
    Ok(blocks.saturating_mul(block_size))
}

/// Takes the exclusive lock on `path` (created if missing) without waiting. `None` when
/// another process (or another open [`super::Store`] in this one) holds it. The kernel
/// releases the lock when the file is closed or the process dies, however it dies.
pub(crate) fn try_lock(path: &Path) -> io::Result<Option<File>> {
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    // SAFETY: the descriptor belongs to `file`, which is alive for the whole call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(file));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// Makes the reserve file at `path`: `bytes` really allocated on the file system (not a sparse
/// file), synced, then renamed into place so that a half-made reserve never counts. On failure
/// nothing is left behind.
pub(crate) fn create_reserve(path: &Path, bytes: u64) -> io::Result<()> {
    let partial = with_suffix(path, ".partial");
    let made = (|| {
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(&partial)?;
        let len = libc::off_t::try_from(bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the reserve size is too large"))?;
        // SAFETY: the descriptor belongs to `file`, which is alive for the whole call.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        file.sync_all()?;
        std::fs::rename(&partial, path)?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    made
}

/// The name a damaged file at `path` is moved aside to now: the first
/// `<path>.corrupt-<unix ms>` (counting up from `now`) that no file of an earlier move holds,
/// so an earlier copy is never overwritten.
pub(crate) fn aside_name(path: &Path, now: SystemTime) -> PathBuf {
    let mut millis = unix_millis(now);
    loop {
        let candidate = with_suffix(path, &format!(".corrupt-{millis}"));
        let taken = ["", "-wal", "-shm"].iter().any(|s| exists(&with_suffix(&candidate, s)));
        if !taken {
            return candidate;
        }
        millis += 1;
    }
}

/// Renames the database at `path` and its `-wal` and `-shm` files to `target` (plus the same
/// suffixes) and syncs the directory. Deletes nothing.
pub(crate) fn move_to(path: &Path, target: &Path) -> io::Result<()> {
    // The companions go first: a stale WAL left next to a fresh database could be replayed
    // into it, while a database left without its WAL is merely still damaged.
    for suffix in ["-wal", "-shm", ""] {
        let from = with_suffix(path, suffix);
        if exists(&from) {
            std::fs::rename(&from, with_suffix(target, suffix))?;
        }
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Makes the directory's entries (a created or renamed file) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `path` with `suffix` appended to its file name (`buffer.sqlite3` + `-wal`).
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

pub(crate) fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn free_space_is_reported_for_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn the_lock_is_exclusive_and_released_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = try_lock(&path).unwrap();
        assert!(first.is_some());
        assert!(try_lock(&path).unwrap().is_none(), "a second holder is refused");
        drop(first);
        assert!(try_lock(&path).unwrap().is_some());
    }

    #[test]
    fn the_reserve_is_allocated_for_real() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.reserve");
        create_reserve(&path, 1 << 20).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        assert!(meta.blocks() * 512 >= 1 << 20, "not sparse: {} blocks", meta.blocks());
        assert!(!with_suffix(&path, ".partial").exists());
    }

    #[test]
    fn moving_aside_never_overwrites_an_earlier_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.sqlite3");
        let now = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        std::fs::write(&path, b"first").unwrap();
        std::fs::write(with_suffix(&path, "-wal"), b"first wal").unwrap();
        let move_aside = |path: &Path| {
            let target = aside_name(path, now);
            move_to(path, &target).unwrap();
            target
        };
        let first = move_aside(&path);
        assert_eq!(first, dir.path().join("buffer.sqlite3.corrupt-1800000000123"));
        std::fs::write(&path, b"second").unwrap();
        let second = move_aside(&path);
        assert_eq!(second, dir.path().join("buffer.sqlite3.corrupt-1800000000124"));
        assert_eq!(std::fs::read(&first).unwrap(), b"first");
        assert_eq!(std::fs::read(with_suffix(&first, "-wal")).unwrap(), b"first wal");
        assert_eq!(std::fs::read(&second).unwrap(), b"second");
        assert!(!path.exists() && !with_suffix(&path, "-wal").exists());
    }
}
