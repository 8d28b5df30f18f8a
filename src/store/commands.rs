//! The daemon's memory of the commands it answered (schema version 3), so that a command id
//! seen before a restart is still answered with its first outcome and not executed twice. The
//! answer is kept as the JSON the daemon published; the store does not read it.

use std::time::SystemTime;

use rusqlite::params;

use super::error::sqlite_error;
use super::{Store, StoreError};
use crate::clock::unix_millis;

/// How many answered commands the buffer keeps; older ones are forgotten first.
pub const REMEMBERED_COMMANDS: usize = 1024;

impl Store {
    /// Records the answer to `command_id`, replacing an earlier one for the same id (a `start`
    /// is first recorded as accepted before its inspection exists, then with its inspection).
    /// Durable once this returns; forgets the oldest beyond `REMEMBERED_COMMANDS`.
    pub fn remember_command(
        &mut self,
        command_id: &str,
        answer: &str,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        self.writing(|s| s.remember_command_once(command_id, answer, now))
    }

    fn remember_command_once(
        &mut self,
        command_id: &str,
        answer: &str,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        let err = |e| sqlite_error(&self.path, e);
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "INSERT INTO commands (command_id, answer, at) VALUES (?1, ?2, ?3)
             ON CONFLICT (command_id) DO UPDATE SET answer = excluded.answer",
            params![command_id, answer, unix_millis(now)],
        )
        .map_err(err)?;
        tx.execute(
            "DELETE FROM commands WHERE seq <= (SELECT MAX(seq) FROM commands) - ?1",
            params![REMEMBERED_COMMANDS as i64],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// The remembered answers, oldest first, as `(command_id, answer)`.
    pub fn remembered_commands(&self) -> Result<Vec<(String, String)>, StoreError> {
        let err = |e| sqlite_error(&self.path, e);
        let mut stmt =
            self.conn.prepare("SELECT command_id, answer FROM commands ORDER BY seq").map_err(err)?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Caps;
    use std::time::Duration;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000 + s)
    }

    #[test]
    fn answers_survive_a_reopen_the_latest_answer_wins_and_the_oldest_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let caps = Caps { max_bytes: 1 << 30, min_free_disk: 0 };
        {
            let mut store = Store::open(dir.path(), caps, at(0)).unwrap();
            store.remember_command("start-1", r#"{"status":"accepted"}"#, at(1)).unwrap();
            store.remember_command("ping-1", r#"{"status":"succeeded"}"#, at(2)).unwrap();
            store.remember_command("start-1", r#"{"status":"accepted","inspection_id":7}"#, at(3)).unwrap();
        }
        let mut store = Store::open(dir.path(), caps, at(4)).unwrap();
        assert_eq!(
            store.remembered_commands().unwrap(),
            vec![
                ("start-1".to_owned(), r#"{"status":"accepted","inspection_id":7}"#.to_owned()),
                ("ping-1".to_owned(), r#"{"status":"succeeded"}"#.to_owned()),
            ]
        );
        for i in 0..REMEMBERED_COMMANDS {
            store.remember_command(&format!("c{i}"), "{}", at(10)).unwrap();
        }
        let kept = store.remembered_commands().unwrap();
        assert_eq!(kept.len(), REMEMBERED_COMMANDS);
        assert_eq!(kept[0].0, "c0", "the two oldest went first");
        assert_eq!(kept[REMEMBERED_COMMANDS - 1].0, format!("c{}", REMEMBERED_COMMANDS - 1));
    }
}
