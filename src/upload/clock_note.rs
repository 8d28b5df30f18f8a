//! The cloud's last verdict on the bay's clock, kept in a small file beside the buffer so that
//! `queue` (another process) can show it: `cloud-clock.json` in the state directory, written
//! (atomically) by the uploader whenever the verdict changes.

use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::policy::ClockTrust;
use crate::status::{Alert, AlertKind};

/// The file, in the state directory.
pub const FILE: &str = "cloud-clock.json";

/// What the cloud last said about the bay's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockNote {
    pub trusted: bool,
    /// Seconds the bay's clock is ahead of the cloud's (negative: behind).
    pub skew_secs: i64,
    /// When the cloud's answer was read (RFC 3339, the bay's clock).
    pub at: String,
}

impl ClockNote {
    /// The note for `trust` read at `now`; `None` before the cloud answered.
    pub fn of(trust: ClockTrust, now: SystemTime) -> Option<ClockNote> {
        let (trusted, skew_secs) = match trust {
            ClockTrust::Unknown => return None,
            ClockTrust::Trusted { skew_secs } => (true, skew_secs),
            ClockTrust::Untrusted { skew_secs } => (false, skew_secs),
        };
        Some(ClockNote { trusted, skew_secs, at: crate::clock::rfc3339_seconds(now) })
    }

    /// The alert a person must act on, when the clock is not trusted.
    pub fn alert(&self) -> Option<Alert> {
        if self.trusted {
            return None;
        }
        let (by, way) =
            (self.skew_secs.unsigned_abs(), if self.skew_secs > 0 { "ahead of" } else { "behind" });
        Some(Alert {
            kind: AlertKind::ClockUntrusted,
            reason: format!(
                "the bay's clock was {by} s {way} the cloud's at {}; nothing is uploaded until it is set right (check NTP: timedatectl status)",
                self.at
            ),
        })
    }
}

/// Writes `note` in `state_dir`, replacing the last one whole.
pub fn write(state_dir: &Path, note: &ClockNote) -> std::io::Result<()> {
    let path = state_dir.join(FILE);
    let part = state_dir.join(format!("{FILE}.part"));
    std::fs::write(&part, serde_json::to_vec(note).unwrap_or_default())?;
    std::fs::rename(&part, &path)
}

/// The last note in `state_dir`, if there is a readable one.
pub fn read(state_dir: &Path) -> Option<ClockNote> {
    serde_json::from_slice(&std::fs::read(state_dir.join(FILE)).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_untrusted_clock_is_an_alert_with_the_skew_and_a_trusted_one_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        assert_eq!(ClockNote::of(ClockTrust::Unknown, now), None);
        write(dir.path(), &ClockNote::of(ClockTrust::Untrusted { skew_secs: -600 }, now).unwrap()).unwrap();
        let alert = read(dir.path()).unwrap().alert().unwrap();
        assert_eq!(alert.kind, AlertKind::ClockUntrusted);
        assert!(alert.reason.contains("600 s behind"), "{}", alert.reason);
        write(dir.path(), &ClockNote::of(ClockTrust::Trusted { skew_secs: 1 }, now).unwrap()).unwrap();
        assert_eq!(read(dir.path()).unwrap().alert(), None);
    }
}
