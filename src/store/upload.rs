//! The uploader's bookkeeping in the buffer (schema version 2): which cloud session an
//! inspection is being sent under, which of its images that session already holds, the sessions
//! that must never be used again, and how many tries the upload took with the last error; and
//! the queue's order (schema version 4): which inspection goes next, and moving one that keeps
//! failing behind the others.
//!
//! No token is ever written here. Tokens live 15 minutes and are worth nothing after a restart,
//! but they would be worth something to whoever reads the file while they live. A session key
//! alone grants nothing: uploading needs the refresh token, and the signed calls need the secret.

use std::collections::HashMap;
use std::time::SystemTime;

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::error::sqlite_error;
use super::{to_i64, InspectionId, InspectionSummary, Store, StoreError};
use crate::clock::unix_millis;
use crate::vehicle::PhotoLabel;

/// Failed upload tries in a row after which an inspection moves behind every other one waiting,
/// so that one inspection that keeps failing with a transient error (a 503 on its images, a
/// request that always times out) cannot hold the queue forever. Oldest first otherwise.
pub const MOVE_BEHIND_AFTER: u64 = 5;

/// The upload side of one inspection, as `queue` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct UploadState {
    /// Upload tries that ended without completing the inspection.
    pub attempts: u64,
    /// Why the last try stopped (a transient error: offline, 503…); cleared on completion.
    pub last_error: Option<String>,
    /// The cloud session the inspection is being sent under, if one is open.
    pub session: Option<String>,
    /// Images the open session already holds.
    pub sent: u64,
    /// How often it was moved behind the others after [`MOVE_BEHIND_AFTER`] failed tries in
    /// a row.
    pub moved_behind: u64,
}

impl Store {
    /// The upload state of every inspection that has one worth showing, by id.
    pub fn upload_states(&self) -> Result<HashMap<InspectionId, UploadState>, StoreError> {
        let err = |e| sqlite_error(&self.path, e);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT i.id, i.upload_attempts, i.upload_error, i.session,
                        (SELECT COUNT(*) FROM sent s WHERE s.inspection_id = i.id AND s.session = i.session),
                        i.moved_behind
                 FROM inspections i",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    InspectionId(r.get(0)?),
                    UploadState {
                        attempts: r.get::<_, i64>(1)?.max(0) as u64,
                        last_error: r.get(2)?,
                        session: r.get(3)?,
                        sent: r.get::<_, i64>(4)?.max(0) as u64,
                        moved_behind: r.get::<_, i64>(5)?.max(0) as u64,
                    },
                ))
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// The upload state of one inspection.
    pub fn upload_state(&self, id: InspectionId) -> Result<UploadState, StoreError> {
        self.conn
            .query_row(
                "SELECT i.upload_attempts, i.upload_error, i.session,
                        (SELECT COUNT(*) FROM sent s WHERE s.inspection_id = i.id AND s.session = i.session),
                        i.moved_behind
                 FROM inspections i WHERE i.id = ?1",
                [id.0],
                |r| {
                    Ok(UploadState {
                        attempts: r.get::<_, i64>(0)?.max(0) as u64,
                        last_error: r.get(1)?,
                        session: r.get(2)?,
                        sent: r.get::<_, i64>(3)?.max(0) as u64,
                        moved_behind: r.get::<_, i64>(4)?.max(0) as u64,
                    })
                },
            )
            .optional()
            .map_err(|e| sqlite_error(&self.path, e))?
            .ok_or_else(|| StoreError::UnknownInspection { path: self.path.clone(), id })
    }

    /// The inspection the uploader takes next: the first `captured` or `uploading` one by
    /// queue rank, then age (an indexed lookup, however long the history), or `None` when
    /// nothing waits.
    pub fn next_to_upload(&self) -> Result<Option<InspectionSummary>, StoreError> {
        let err = |e| sqlite_error(&self.path, e);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let id: Option<i64> = tx
            .query_row(
                "SELECT id FROM inspections INDEXED BY inspections_upload_queue
                 WHERE state IN ('captured', 'uploading') ORDER BY queue_rank, id LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        let Some(id) = id else { return Ok(None) };
        Ok(self.summaries_in(&tx, Some(InspectionId(id)))?.pop())
    }

    /// The first inspection waiting for upload other than those in `besides` (same order as
    /// [`Store::next_to_upload`]), or `None`: the uploader authenticates it ahead of time, or
    /// goes on with it while an earlier one's `complete` is on its way.
    pub fn next_to_upload_besides(
        &self,
        besides: &[InspectionId],
    ) -> Result<Option<InspectionSummary>, StoreError> {
        let err = |e| sqlite_error(&self.path, e);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let skip = vec!["?"; besides.len()].join(", ");
        let id: Option<i64> = tx
            .query_row(
                &format!(
                    "SELECT id FROM inspections INDEXED BY inspections_upload_queue
                     WHERE state IN ('captured', 'uploading') AND id NOT IN ({skip})
                     ORDER BY queue_rank, id LIMIT 1"
                ),
                rusqlite::params_from_iter(besides.iter().map(|i| i.0)),
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        let Some(id) = id else { return Ok(None) };
        Ok(self.summaries_in(&tx, Some(InspectionId(id)))?.pop())
    }

    /// Records that `session` was opened for this inspection. Written before the first image
    /// goes, so that after a crash the uploader asks the cloud what this session holds.
    pub fn open_session(&mut self, id: InspectionId, session: &str) -> Result<(), StoreError> {
        self.writing(|s| s.open_session_once(id, session))
    }

    fn open_session_once(&mut self, id: InspectionId, session: &str) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |e| sqlite_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let dead: bool = tx
            .query_row("SELECT COUNT(*) FROM dead_sessions WHERE session = ?1", [session], |r| {
                r.get::<_, i64>(0).map(|n| n > 0)
            })
            .map_err(err)?;
        if dead {
            return Err(StoreError::SessionGivenUp { id, session: session.to_owned() });
        }
        let changed = tx
            .execute("UPDATE inspections SET session = ?2 WHERE id = ?1", params![id.0, session])
            .map_err(err)?;
        if changed == 0 {
            return Err(StoreError::UnknownInspection { path: path.clone(), id });
        }
        tx.commit().map_err(err)
    }

    /// Gives up the inspection's open session for good (expired, consumed, or its tokens lost
    /// with a restart while it was incomplete): it is recorded so that it is never used again,
    /// and what it held is forgotten, so that every image goes again under the next session.
    pub fn abandon_session(
        &mut self,
        id: InspectionId,
        why: &str,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        self.writing(|s| s.abandon_session_once(id, why, now))
    }

    fn abandon_session_once(
        &mut self,
        id: InspectionId,
        why: &str,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |e| sqlite_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let session: Option<Option<String>> = tx
            .query_row("SELECT session FROM inspections WHERE id = ?1", [id.0], |r| r.get(0))
            .optional()
            .map_err(err)?;
        let Some(session) = session else {
            return Err(StoreError::UnknownInspection { path: path.clone(), id });
        };
        if let Some(session) = session {
            tx.execute(
                "INSERT OR IGNORE INTO dead_sessions (session, inspection_id, why, at) VALUES (?1, ?2, ?3, ?4)",
                params![session, id.0, why, unix_millis(now)],
            )
            .map_err(err)?;
            tx.execute("DELETE FROM sent WHERE inspection_id = ?1", [id.0]).map_err(err)?;
            tx.execute("UPDATE inspections SET session = NULL WHERE id = ?1", [id.0]).map_err(err)?;
            log::info!(inspection_id = id.0, session = session.as_str(), why = why; "Cloud session given up");
        }
        tx.commit().map_err(err)
    }

    /// Whether `session` was given up earlier.
    pub fn session_is_dead(&self, session: &str) -> Result<bool, StoreError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM dead_sessions WHERE session = ?1", [session], |r| {
                r.get::<_, i64>(0).map(|n| n > 0)
            })
            .map_err(|e| sqlite_error(&self.path, e))
    }

    /// Records that the open `session` now holds these images (label and sha256).
    pub fn mark_sent(
        &mut self,
        id: InspectionId,
        session: &str,
        images: &[(PhotoLabel, &str)],
        now: SystemTime,
    ) -> Result<(), StoreError> {
        self.writing(|s| {
            let path = s.path.clone();
            let err = |e| sqlite_error(&path, e);
            let tx = s.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
            for (angle, sha256) in images {
            tx.execute(
                "INSERT INTO sent (inspection_id, session, angle, sha256, at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (inspection_id, session, angle) DO UPDATE SET sha256 = excluded.sha256, at = excluded.at",
                params![id.0, session, angle.as_str(), sha256, unix_millis(now)],
            )
            .map_err(err)?;
            }
            tx.commit().map_err(err)
        })
    }

    /// The images `session` holds for this inspection, as far as the kiosk knows: label → sha256.
    pub fn sent(&self, id: InspectionId, session: &str) -> Result<HashMap<PhotoLabel, String>, StoreError> {
        let err = |e| sqlite_error(&self.path, e);
        let mut stmt = self
            .conn
            .prepare("SELECT angle, sha256 FROM sent WHERE inspection_id = ?1 AND session = ?2")
            .map_err(err)?;
        let rows = stmt.query_map(params![id.0, session], |r| Ok((r.get(0)?, r.get(1)?))).map_err(err)?;
        let mut out = HashMap::new();
        for row in rows {
            let (angle, sha): (String, String) = row.map_err(err)?;
            let label = PhotoLabel::parse(&angle).map_err(|e| self.unreadable(id, e.to_string()))?;
            out.insert(label, sha);
        }
        Ok(out)
    }

    /// The vehicle object as stored (JSON), sent to the cloud as it is: the cloud is the judge
    /// of what it accepts, and a row this build would not accept is still delivered or failed
    /// with the cloud's reason, never stuck.
    pub fn vehicle_json(&self, id: InspectionId) -> Result<Option<serde_json::Value>, StoreError> {
        let json: Option<Option<String>> = self
            .conn
            .query_row("SELECT vehicle FROM inspections WHERE id = ?1", [id.0], |r| r.get(0))
            .optional()
            .map_err(|e| sqlite_error(&self.path, e))?;
        let json = json.ok_or_else(|| StoreError::UnknownInspection { path: self.path.clone(), id })?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| self.unreadable(id, format!("vehicle JSON: {e}"))))
            .transpose()
    }

    /// Counts a try that stopped short of completion, keeping why (`None` leaves the reason).
    /// The [`MOVE_BEHIND_AFTER`]th failed try in a row of an inspection that waits while others
    /// wait too moves it behind all of them (logged at INFO), and its count in a row starts
    /// again.
    pub fn record_upload_attempt(&mut self, id: InspectionId, error: Option<&str>) -> Result<(), StoreError> {
        self.writing(|s| s.record_upload_attempt_once(id, error))
    }

    fn record_upload_attempt_once(
        &mut self,
        id: InspectionId,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |e| sqlite_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let changed = tx
            .execute(
                "UPDATE inspections SET upload_attempts = upload_attempts + 1,
                        turn_attempts = turn_attempts + 1,
                        upload_error = COALESCE(?2, upload_error) WHERE id = ?1",
                params![id.0, error],
            )
            .map_err(err)?;
        if changed == 0 {
            return Err(StoreError::UnknownInspection { path: path.clone(), id });
        }
        let moved: Option<(String, i64)> = tx
            .query_row(
                "UPDATE inspections SET
                        queue_rank = (SELECT MAX(queue_rank) FROM inspections
                                      INDEXED BY inspections_upload_queue
                                      WHERE state IN ('captured', 'uploading')) + 1,
                        turn_attempts = 0,
                        moved_behind = moved_behind + 1
                 WHERE id = ?1 AND turn_attempts >= ?2 AND state IN ('captured', 'uploading')
                   AND EXISTS (SELECT 1 FROM inspections o
                               WHERE o.state IN ('captured', 'uploading') AND o.id <> ?1)
                 RETURNING case_id, upload_attempts",
                params![id.0, to_i64(MOVE_BEHIND_AFTER)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)?;
        tx.commit().map_err(err)?;
        if let Some((case_id, attempts)) = moved {
            log::info!(inspection_id = id.0, case_id = case_id.as_str(), attempts = attempts, error = error.unwrap_or(""); "Upload keeps failing: inspection moved behind the others waiting");
        }
        Ok(())
    }

    /// Sets or clears the last upload error without counting a try.
    pub fn set_upload_error(&mut self, id: InspectionId, error: Option<&str>) -> Result<(), StoreError> {
        self.writing(|s| {
            s.conn
                .execute("UPDATE inspections SET upload_error = ?2 WHERE id = ?1", params![id.0, error])
                .map_err(|e| sqlite_error(&s.path, e))?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Caps, InspectionState, NewImage, NewInspection};
    use super::*;
    use crate::vehicle::CaseId;
    use std::time::{Duration, UNIX_EPOCH};

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_790_000_000)
    }

    fn captured(store: &mut Store) -> InspectionId {
        let case = CaseId::parse("CASE-1").unwrap();
        let id = store
            .begin_inspection(
                &NewInspection {
                    case_id: &case,
                    vehicle: None,
                    angles: &[PhotoLabel::Front],
                    expected_image_bytes: 100,
                },
                now(),
            )
            .unwrap();
        let jpeg = b"\xff\xd8 not really a jpeg \xff\xd9".to_vec();
        store
            .add_image(
                id,
                &NewImage {
                    angle: PhotoLabel::Front,
                    camera: "front",
                    captured_at: now(),
                    source_width: 10,
                    source_height: 10,
                    source_bytes: 100,
                    width: 10,
                    height: 10,
                    jpeg: &jpeg,
                },
            )
            .unwrap();
        store.finish_capture(id, now()).unwrap();
        assert_eq!(store.inspection(id).unwrap().unwrap().state, InspectionState::Captured);
        id
    }

    #[test]
    fn a_session_and_what_it_holds_survive_a_reopen_and_die_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let mut store =
            Store::open(dir.path(), Caps { max_bytes: u64::MAX, min_free_disk: 0 }, now()).unwrap();
        let id = captured(&mut store);
        store.open_session(id, "S-1").unwrap();
        store.mark_sent(id, "S-1", &[(PhotoLabel::Front, "abc")], now()).unwrap();
        store.record_upload_attempt(id, Some("the cloud answered HTTP 503")).unwrap();
        drop(store);

        let mut store =
            Store::open(dir.path(), Caps { max_bytes: u64::MAX, min_free_disk: 0 }, now()).unwrap();
        let state = store.upload_state(id).unwrap();
        assert_eq!(state.session.as_deref(), Some("S-1"));
        assert_eq!(state.sent, 1);
        assert_eq!(state.attempts, 1);
        assert_eq!(state.last_error.as_deref(), Some("the cloud answered HTTP 503"));
        assert_eq!(store.sent(id, "S-1").unwrap().get(&PhotoLabel::Front).map(String::as_str), Some("abc"));

        store.abandon_session(id, "expired", now()).unwrap();
        let state = store.upload_state(id).unwrap();
        assert_eq!((state.session, state.sent), (None, 0));
        assert!(store.session_is_dead("S-1").unwrap());
        let again = store.open_session(id, "S-1").expect_err("a dead session is never used again");
        assert!(again.to_string().contains("S-1"), "{again}");
        store.open_session(id, "S-2").unwrap();
        assert!(store.sent(id, "S-2").unwrap().is_empty());
    }
}
