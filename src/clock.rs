//! Time as a seam: the wall clock (for timestamps and signing) and a monotonic clock (for
//! deadlines, backoff and durations), so that anything that depends on minutes or hours can be
//! tested in milliseconds with [`ManualClock`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of time. Only the shell of the program reads it; pure decisions take `now` as data.
pub trait Clock: Send + Sync {
    /// Wall-clock time, for timestamps that leave the machine.
    fn wall(&self) -> SystemTime;
    /// Time since an arbitrary fixed origin that never goes backwards.
    fn monotonic(&self) -> Duration;
}

/// The operating system's clocks.
#[derive(Debug, Clone)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    pub fn new() -> SystemClock {
        SystemClock { origin: Instant::now() }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that moves only when told to. Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<Mutex<(SystemTime, Duration)>>,
}

impl ManualClock {
    /// Starts at `wall`, with the monotonic clock at zero.
    pub fn starting_at(wall: SystemTime) -> ManualClock {
        ManualClock { inner: Arc::new(Mutex::new((wall, Duration::ZERO))) }
    }

    /// Moves both clocks forward.
    pub fn advance(&self, by: Duration) {
        let mut t = self.lock();
        t.0 += by;
        t.1 += by;
    }

    /// Sets the wall clock alone (a clock step, as NTP or a person would make).
    pub fn set_wall(&self, wall: SystemTime) {
        self.lock().0 = wall;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (SystemTime, Duration)> {
        // A poisoned clock still holds a valid time: a panic elsewhere cannot corrupt two numbers.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Clock for ManualClock {
    fn wall(&self) -> SystemTime {
        self.lock().0
    }
    fn monotonic(&self) -> Duration {
        self.lock().1
    }
}

/// Milliseconds since the Unix epoch, the form timestamps take in the buffer.
pub fn unix_millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// The inverse of [`unix_millis`].
pub fn from_unix_millis(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// `2026-11-21T10:00:03Z`: RFC 3339 in UTC at second precision, as the cloud API and MQTT use.
pub fn rfc3339_seconds(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told_and_clones_share_it() {
        let start = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let clock = ManualClock::starting_at(start);
        let other = clock.clone();
        assert_eq!(clock.wall(), start);
        other.advance(Duration::from_secs(900));
        assert_eq!(clock.wall(), start + Duration::from_secs(900));
        assert_eq!(clock.monotonic(), Duration::from_secs(900));
        clock.set_wall(start);
        assert_eq!(other.wall(), start);
        assert_eq!(other.monotonic(), Duration::from_secs(900));
    }

    #[test]
    fn timestamps_round_trip_and_format_as_the_api_wants() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_255_203_250);
        assert_eq!(from_unix_millis(unix_millis(t)), t);
        assert_eq!(rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(1_795_255_203)), "2026-11-21T10:00:03Z");
    }
}
