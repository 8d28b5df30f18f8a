//! What the daemon's status shows about the buffer, read in one go: the totals, the room left
//! (one `statvfs`), the salvages not acknowledged and any damage noted. The daemon reads it on a
//! handle of its own, so a state publish never waits on the capture's transactions (WAL: readers
//! do not block the writer, nor it them), and decides from it without touching SQL.

use std::path::PathBuf;

use super::{caps, state_totals, Caps, RecoveryRecord, Refusal, Store, StoreError, Totals};

/// The buffer as the daemon's status sees it, at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferFacts {
    pub path: PathBuf,
    pub totals: Totals,
    /// Inspections failed for good that hold images, waiting for an operator's `retry` (one
    /// that never stored an image, such as a capture cut short before its first frame, holds
    /// nothing to send and asks nothing of anyone).
    pub failed: u64,
    /// What the kernel says is free on the state directory's file system.
    pub disk_free: u64,
    /// What new inspections may use: free space and the file's free pages, less the reserve.
    pub usable: u64,
    /// JPEG bytes buffered, and those of completed inspections (which may be pruned early).
    pub buffered: u64,
    pub reclaimable: u64,
    pub caps: Caps,
    /// Salvages of a damaged file not yet acknowledged by an operator.
    pub recoveries: Vec<RecoveryRecord>,
    /// Damage noticed while running, which the next start salvages.
    pub damage: Option<String>,
}

impl BufferFacts {
    /// Why an inspection of `angles` images of about `expected_image_bytes` each would be
    /// refused now; `None` when it fits. The same rule as [`Store::would_refuse`].
    pub fn would_refuse(&self, angles: usize, expected_image_bytes: u64) -> Option<Refusal> {
        refusal(
            self.caps,
            self.buffered,
            self.reclaimable,
            self.usable,
            expected_image_bytes.saturating_mul(angles as u64),
        )
    }

    /// The share of `[buffer] max_bytes` the buffered images take, completed ones left out
    /// (they give way when room is needed).
    pub fn fill(&self) -> f64 {
        if self.caps.max_bytes == 0 {
            return 1.0;
        }
        self.buffered.saturating_sub(self.reclaimable) as f64 / self.caps.max_bytes as f64
    }
}

impl Store {
    /// Reads [`BufferFacts`]: a handful of counter rows, one `statvfs`, the recoveries table.
    pub fn observe(&self) -> Result<BufferFacts, StoreError> {
        let err = |e| super::sqlite_error(&self.path, e);
        let totals = self.totals()?;
        let per_state = state_totals(&self.conn).map_err(err)?;
        let failed: i64 = self
            .conn
            .prepare_cached(
                "SELECT COUNT(*) FROM inspections i WHERE i.state = 'failed'
                 AND EXISTS (SELECT 1 FROM images m WHERE m.inspection_id = i.id)",
            )
            .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
            .map_err(err)?;
        let buffered = per_state.iter().map(|(_, c)| c.bytes).sum();
        let reclaimable = per_state.iter().find(|(s, _)| s == "completed").map_or(0, |(_, c)| c.bytes);
        let disk_free = self.free_bytes()?;
        let held_back =
            if super::space::reserve_path(&self.path).exists() { 0 } else { super::RESERVE_BYTES };
        let usable = disk_free.saturating_add(self.free_pages()?.saturating_mul(self.page_size()?));
        Ok(BufferFacts {
            path: self.path.clone(),
            totals,
            failed: super::to_u64(failed),
            disk_free,
            usable: usable.saturating_sub(held_back),
            buffered,
            reclaimable,
            caps: self.caps,
            recoveries: self.unacknowledged_recoveries()?,
            damage: self.damage_found(),
        })
    }
}

/// The refusal of an inspection needing `needed` bytes, in today's numbers: completed
/// inspections count as room (they are pruned early when it is needed), but a refusal names
/// what is buffered and free now.
pub(super) fn refusal(
    caps: Caps,
    buffered: u64,
    reclaimable: u64,
    usable: u64,
    needed: u64,
) -> Option<Refusal> {
    caps::check_inspection(
        caps,
        buffered.saturating_sub(reclaimable),
        usable.saturating_add(reclaimable),
        needed,
    )
    .err()
    .map(|_| {
        caps::check_inspection(caps, buffered, usable, needed).err().unwrap_or(Refusal::MaxBytes {
            buffered,
            needed,
            max_bytes: caps.max_bytes,
        })
    })
}
