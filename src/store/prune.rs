//! Leaving the buffer (schema version 4): the retention rule, pruning delivered inspections
//! early when a new inspection needs the space, and the audit trail (`pruned`) of both, each
//! row written in the transaction that deletes the inspection.

use std::time::SystemTime;

use rusqlite::{params, Connection, TransactionBehavior};
use sha2::{Digest, Sha256};

use super::caps::{self, Refusal};
use super::error::sqlite_error;
use super::{to_u64, InspectionId, InspectionState, Store, StoreError};
use crate::clock::{from_unix_millis, unix_millis};

/// Inspections deleted per transaction at most, so that one prune's WAL stays small (a few
/// pages each: the rows, free-list trunks and pointer-map pages) and fits in the reserve.
pub const PRUNE_BATCH: usize = 16;

/// Audit rows kept; older ones are forgotten first.
pub const PRUNED_HISTORY: usize = 10_000;

/// Which rule took an inspection out of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneRule {
    /// `completed_retention` had passed since it was completed (or, holding no image, since
    /// it failed or was cancelled).
    Retention,
    /// A new inspection or image needed the space, and the cloud already had it.
    Space,
}

impl PruneRule {
    pub fn as_str(self) -> &'static str {
        match self {
            PruneRule::Retention => "retention",
            PruneRule::Space => "space",
        }
    }

    fn parse(value: &str) -> Option<PruneRule> {
        [PruneRule::Retention, PruneRule::Space].into_iter().find(|r| r.as_str() == value)
    }
}

/// One row of the audit trail: an inspection that left the buffer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PrunedRecord {
    /// Order of pruning (grows by one per record).
    pub seq: i64,
    pub inspection_id: InspectionId,
    pub case_id: String,
    /// The state it left from: `completed`, or `failed`/`cancelled` holding no image.
    pub state: InspectionState,
    /// The cloud session that completed it (the last one it used otherwise).
    pub session: Option<String>,
    /// When it reached that state: for a completed one, when the cloud completed it.
    #[serde(skip)]
    pub completed_at: SystemTime,
    pub images: u64,
    pub bytes: u64,
    /// [`images_digest`] of its images' sha256s.
    pub images_sha256: String,
    pub rule: PruneRule,
}

/// The digest the audit trail keeps of an inspection's images: the sha256 of their sha256s
/// in ascending order, each as lowercase hex followed by a newline (what
/// `sort hashes.txt | sha256sum` prints for a file of one hash a line).
pub fn images_digest<S: AsRef<str>>(sha256s: &[S]) -> String {
    let mut sorted: Vec<String> = sha256s.iter().map(|s| s.as_ref().to_ascii_lowercase()).collect();
    sorted.sort();
    let mut hasher = Sha256::new();
    for sha in &sorted {
        hasher.update(sha.as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(hasher.finalize())
}

/// What the caps are asked to make room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// A new inspection: `max_bytes` and `min_free_disk`.
    Inspection,
    /// An image of an inspection already accepted: `min_free_disk` only.
    Image,
}

/// An inspection chosen for pruning, with what its audit row needs.
struct Victim {
    id: i64,
    case_id: String,
    state: String,
    session: Option<String>,
    updated_at: i64,
    images: i64,
    bytes: i64,
}

impl Store {
    /// The retention rule: deletes the `completed` inspections last updated before
    /// `older_than`, and the `failed` or `cancelled` ones that hold no image (nothing to
    /// deliver), each with an audit row (rule `retention`) and an INFO line, then gives the
    /// freed pages back to the file system. Touches nothing else. Returns how many were pruned.
    /// Needs no free disk (it may use the reserve).
    pub fn prune_completed(&mut self, older_than: SystemTime) -> Result<u64, StoreError> {
        let cutoff = unix_millis(older_than);
        let mut pruned = 0u64;
        loop {
            let batch = self.writing(|s| {
                s.prune_batch(PruneRule::Retention, |conn| {
                    select_victims(
                        conn,
                        "SELECT id, case_id, state, session, updated_at, images, bytes FROM inspections
                         WHERE updated_at < ?1
                           AND (state = 'completed' OR (state IN ('failed', 'cancelled') AND images = 0))
                         ORDER BY updated_at, id LIMIT ?2",
                        cutoff,
                    )
                })
            })?;
            if batch.is_empty() {
                break;
            }
            pruned += batch.len() as u64;
            for v in &batch {
                log::info!(inspection_id = v.id, case_id = v.case_id.as_str(), state = v.state.as_str(), images = v.images, bytes = v.bytes; "Completed inspection pruned from the buffer");
            }
        }
        if pruned > 0 {
            self.give_space_back();
        }
        Ok(pruned)
    }

    /// The audit trail, oldest first (the newest [`PRUNED_HISTORY`] records).
    pub fn pruned_history(&self) -> Result<Vec<PrunedRecord>, StoreError> {
        let err = |e| sqlite_error(&self.path, e);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT seq, inspection_id, case_id, state, session, completed_at, images, bytes,
                        images_sha256, rule
                 FROM pruned ORDER BY seq",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, String>(8)?,
                    r.get::<_, String>(9)?,
                ))
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, id, case_id, state, session, completed_at, images, bytes, digest, rule) =
                row.map_err(err)?;
            let id = InspectionId(id);
            let state = InspectionState::parse(&state)
                .ok_or_else(|| self.unreadable(id, format!("audit row {seq}: unknown state {state:?}")))?;
            let rule = PruneRule::parse(&rule)
                .ok_or_else(|| self.unreadable(id, format!("audit row {seq}: unknown rule {rule:?}")))?;
            out.push(PrunedRecord {
                seq,
                inspection_id: id,
                case_id,
                state,
                session,
                completed_at: from_unix_millis(completed_at),
                images: to_u64(images),
                bytes: to_u64(bytes),
                images_sha256: digest,
                rule,
            });
        }
        Ok(out)
    }

    /// Checks the caps for `needed` more bytes and, when they refuse, prunes completed
    /// inspections early, oldest completion first, as far as that makes it fit; then checks
    /// again. Prunes nothing when even every completed inspection would not be enough.
    /// `Ok(Err(refusal))` when it does not fit.
    pub(super) fn make_room(&mut self, needed: u64, need: Need) -> Result<Result<(), Refusal>, StoreError> {
        let mut pruned_any = false;
        let verdict = loop {
            let (buffered, reclaimable) = self.buffered_and_reclaimable()?;
            let space = self.usable_space()?;
            let verdict = match need {
                Need::Inspection => caps::check_inspection(self.caps, buffered, space, needed),
                Need::Image => caps::check_image(self.caps, space, needed),
            };
            let Err(refusal) = verdict else { break Ok(()) };
            let deficit = match refusal {
                Refusal::MaxBytes { buffered, needed, max_bytes } => {
                    buffered.saturating_add(needed).saturating_sub(max_bytes)
                }
                Refusal::MinFreeDisk { free, needed, min_free_disk } => {
                    needed.saturating_add(min_free_disk).saturating_sub(free)
                }
            };
            if reclaimable < deficit {
                break Err(refusal);
            }
            let batch =
                self.writing(|s| s.prune_batch(PruneRule::Space, |conn| select_for_space(conn, deficit)))?;
            if batch.is_empty() {
                break Err(refusal);
            }
            pruned_any = true;
            for v in &batch {
                log::info!(inspection_id = v.id, case_id = v.case_id.as_str(), images = v.images, bytes = v.bytes, needed = needed; "Delivered inspection pruned early: the buffer needed its space");
            }
        };
        if pruned_any {
            self.give_space_back();
        }
        Ok(verdict)
    }

    /// One transaction: picks victims with `select`, writes each one's audit row and deletes
    /// it, and trims the audit trail.
    fn prune_batch(
        &mut self,
        rule: PruneRule,
        select: impl Fn(&Connection) -> rusqlite::Result<Vec<Victim>>,
    ) -> Result<Vec<Victim>, StoreError> {
        let path = self.path.clone();
        let err = |e| sqlite_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let victims = select(&tx).map_err(err)?;
        for v in &victims {
            let hashes: Vec<String> = {
                let mut stmt =
                    tx.prepare_cached("SELECT sha256 FROM images WHERE inspection_id = ?1").map_err(err)?;
                let rows = stmt.query_map([v.id], |r| r.get(0)).map_err(err)?;
                rows.collect::<Result<_, _>>().map_err(err)?
            };
            tx.execute(
                "INSERT INTO pruned (inspection_id, case_id, state, session, completed_at, images, bytes,
                                     images_sha256, rule)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    v.id,
                    v.case_id,
                    v.state,
                    v.session,
                    v.updated_at,
                    v.images,
                    v.bytes,
                    images_digest(&hashes),
                    rule.as_str()
                ],
            )
            .map_err(err)?;
            tx.execute("DELETE FROM inspections WHERE id = ?1", [v.id]).map_err(err)?;
        }
        if !victims.is_empty() {
            tx.execute(
                "DELETE FROM pruned WHERE seq <= (SELECT MAX(seq) FROM pruned) - ?1",
                [PRUNED_HISTORY as i64],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(victims)
    }
}

/// Up to [`PRUNE_BATCH`] victims by `sql`, which takes the cutoff as `?1` and the limit as `?2`.
fn select_victims(conn: &Connection, sql: &str, cutoff: i64) -> rusqlite::Result<Vec<Victim>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params![cutoff, PRUNE_BATCH as i64], victim)?;
    rows.collect()
}

/// The oldest completed inspections whose bytes add up to `deficit` (the one that crosses it
/// included), at most [`PRUNE_BATCH`].
fn select_for_space(conn: &Connection, deficit: u64) -> rusqlite::Result<Vec<Victim>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, case_id, state, session, updated_at, images, bytes FROM inspections
         WHERE state = 'completed' ORDER BY updated_at, id LIMIT ?1",
    )?;
    let mut rows = stmt.query([PRUNE_BATCH as i64])?;
    let mut chosen = Vec::new();
    let mut freed = 0u64;
    while freed < deficit {
        let Some(row) = rows.next()? else { break };
        let v = victim(row)?;
        freed = freed.saturating_add(to_u64(v.bytes));
        chosen.push(v);
    }
    Ok(chosen)
}

fn victim(r: &rusqlite::Row<'_>) -> rusqlite::Result<Victim> {
    Ok(Victim {
        id: r.get(0)?,
        case_id: r.get(1)?,
        state: r.get(2)?,
        session: r.get(3)?,
        updated_at: r.get(4)?,
        images: r.get(5)?,
        bytes: r.get(6)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_images_digest_is_sha256sum_of_the_sorted_hashes() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        // printf 'aaa…\nbbb…\n' | sha256sum
        let expected = hex::encode(Sha256::digest(format!("{a}\n{}\n", b.to_lowercase())));
        assert_eq!(images_digest(&[b.clone(), a.clone()]), expected);
        assert_eq!(images_digest(&[a, b]), expected, "order does not matter");
        assert_eq!(images_digest::<&str>(&[]), hex::encode(Sha256::digest(b"")));
    }
}
