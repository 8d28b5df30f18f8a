//! Telling a broker's session take-over apart from an ordinary lost connection, as pure
//! decisions over monotonic time: two kiosks started with the same client id (the same
//! `bay_id` by mistake) throw each other off the broker as soon as one connects, and would
//! do so forever at the reconnect backoff's pace.
//!
//! MQTT 3.1.1 gives no reason when the broker closes a connection, so the watch goes by the
//! pattern: [`SHORT_SESSIONS_TO_SUSPECT`] connections in a row closed by the broker (a clean end
//! of stream, not a network error) within [`SHORT_SESSION`] of being accepted, each accepted with
//! the bay's session present (the twin held it a moment ago) and at its first attempt. A broker
//! that restarts loses the session (unless it saved it), or refuses an attempt while it is
//! away, and a flaky network ends connections with errors: none of these counts. From then on
//! the kiosk waits [`SUSPECTED_RETRY`] (jittered) before reconnecting after a loss, and says
//! so, until a connection lasts [`STABLE_SESSION`].

use std::time::Duration;

/// A connection lost sooner than this after the broker accepted it counts as short.
pub const SHORT_SESSION: Duration = Duration::from_secs(10);
/// Short connections in a row that make the watch suspect another client with the same id.
pub const SHORT_SESSIONS_TO_SUSPECT: u32 = 5;
/// A connection that lasts this long clears the suspicion.
pub const STABLE_SESSION: Duration = Duration::from_secs(30 * 60);
/// The longest pause before reconnecting after a loss while suspected (at least half of it):
/// long enough that two kiosks with one id stop throwing each other off several times a
/// second, short enough that a wrong suspicion costs a bay only seconds of MQTT.
pub const SUSPECTED_RETRY: Duration = Duration::from_secs(20);

/// What a lost connection means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// An ordinary loss: reconnect with the usual backoff.
    Ordinary,
    /// This loss made the watch suspect a take-over: say so, then wait long.
    NowSuspected,
    /// Still suspected: wait long again.
    StillSuspected,
}

/// The watch over one link's connections.
#[derive(Debug, Clone, Default)]
pub struct TakeoverWatch {
    connected_at: Option<Duration>,
    /// Whether the broker still held the bay's session when it accepted the connection.
    session_present: bool,
    short_in_a_row: u32,
    suspected: bool,
}

impl TakeoverWatch {
    /// The broker accepted a connection at `now`, saying whether it still held the session.
    pub fn connected(&mut self, now: Duration, session_present: bool) {
        self.connected_at = Some(now);
        self.session_present = session_present;
    }

    /// The connection is still up at `now`; `true` once, when it has lasted long enough to clear
    /// the suspicion.
    pub fn still_connected(&mut self, now: Duration) -> bool {
        let lasted = self.connected_at.map(|at| now.saturating_sub(at));
        if self.suspected && lasted.is_some_and(|l| l >= STABLE_SESSION) {
            self.suspected = false;
            self.short_in_a_row = 0;
            return true;
        }
        false
    }

    /// A connection attempt failed (refused, unreachable): whatever ended the last connection,
    /// the broker was not there to accept the next one at once, so it was no take-over.
    pub fn attempt_failed(&mut self) {
        if !self.suspected {
            self.short_in_a_row = 0;
        }
    }

    /// The connection was lost at `now` with a network error rather than closed by the broker:
    /// it breaks a run of short sessions, and a suspicion stays as it is.
    pub fn broken(&mut self) -> Loss {
        self.connected_at = None;
        if self.suspected {
            return Loss::StillSuspected;
        }
        self.short_in_a_row = 0;
        Loss::Ordinary
    }

    /// The broker closed the connection at `now`.
    pub fn lost(&mut self, now: Duration) -> Loss {
        if !self.session_present {
            // The broker had lost the session: it restarted, nobody took the session over.
            return self.broken();
        }
        let Some(at) = self.connected_at.take() else { return Loss::Ordinary };
        let lasted = now.saturating_sub(at);
        if self.suspected {
            if lasted >= STABLE_SESSION {
                self.suspected = false;
                self.short_in_a_row = 0;
                return Loss::Ordinary;
            }
            return Loss::StillSuspected;
        }
        if lasted >= SHORT_SESSION {
            self.short_in_a_row = 0;
            return Loss::Ordinary;
        }
        self.short_in_a_row += 1;
        if self.short_in_a_row >= SHORT_SESSIONS_TO_SUSPECT {
            self.suspected = true;
            return Loss::NowSuspected;
        }
        Loss::Ordinary
    }

    pub fn is_suspected(&self) -> bool {
        self.suspected
    }

    /// The pause before reconnecting after a suspected loss, from `unit` (a number in 0..1).
    pub fn suspected_retry(unit: f64) -> Duration {
        SUSPECTED_RETRY.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// Runs `sessions` (connected at, lost at) through a fresh watch and returns the verdicts.
    fn check(sessions: &[(Duration, Duration)], expected: &[Loss]) {
        let mut watch = TakeoverWatch::default();
        let got: Vec<Loss> = sessions
            .iter()
            .map(|&(up, down)| {
                watch.connected(up, true);
                watch.lost(down)
            })
            .collect();
        assert_eq!(got, expected, "{sessions:?}");
    }

    #[test]
    fn five_short_connections_in_a_row_are_a_take_over() {
        use Loss::*;
        assert_eq!(SHORT_SESSIONS_TO_SUSPECT, 5, "the cases below are written for five");
        // Flapping at the backoff's pace.
        check(
            &[
                (S(0), MS(300)),
                (MS(700), S(1)),
                (MS(1400), S(2)),
                (MS(2300), S(3)),
                (MS(3200), S(4)),
                (S(60), MS(60_400)),
            ],
            &[Ordinary, Ordinary, Ordinary, Ordinary, NowSuspected, StillSuspected],
        );
        // A long connection between short ones resets the count.
        check(
            &[
                (S(0), S(1)),
                (S(2), S(3)),
                (S(4), S(5)),
                (S(6), S(7)),
                (S(8), S(60)),
                (S(61), S(62)),
                (S(63), S(64)),
            ],
            &[Ordinary; 7],
        );
        // A network that drops now and then is no take-over.
        check(&[(S(0), S(600)), (S(601), S(1200)), (S(1201), S(1800))], &[Ordinary, Ordinary, Ordinary]);
        // Once suspected, only a connection of STABLE_SESSION clears it.
        check(
            &[
                (S(0), S(1)),
                (S(2), S(3)),
                (S(4), S(5)),
                (S(6), S(7)),
                (S(8), S(9)),
                (S(300), S(900)),
                (S(1000), S(1000) + STABLE_SESSION),
            ],
            &[Ordinary, Ordinary, Ordinary, Ordinary, NowSuspected, StillSuspected, Ordinary],
        );
    }

    #[test]
    fn a_broker_that_restarts_or_a_network_error_breaks_the_run() {
        // A refused attempt between short sessions: the broker was away, not taken over.
        let mut watch = TakeoverWatch::default();
        for t in 0..6 {
            watch.connected(S(t * 3), true);
            assert_eq!(watch.lost(S(t * 3 + 1)), Loss::Ordinary, "session {t}");
            watch.attempt_failed();
        }
        assert!(!watch.is_suspected());
        // A broker that restarted quickly every time: the session was gone when it took the
        // kiosk back, and its restarts are no twin however quick.
        let mut watch = TakeoverWatch::default();
        for t in 0..10 {
            watch.connected(S(t * 2), false);
            assert_eq!(watch.lost(S(t * 2 + 1)), Loss::Ordinary, "session {t}");
        }
        assert!(!watch.is_suspected());
        // Network errors in between likewise.
        let mut watch = TakeoverWatch::default();
        for t in 0..6 {
            watch.connected(S(t * 2), true);
            let loss = if t % 2 == 0 { watch.lost(S(t * 2 + 1)) } else { watch.broken() };
            assert_eq!(loss, Loss::Ordinary, "session {t}");
        }
        assert!(!watch.is_suspected());
        // Once suspected, a network error or a refused attempt keeps the suspicion.
        let mut watch = TakeoverWatch::default();
        for t in 0..SHORT_SESSIONS_TO_SUSPECT as u64 {
            watch.connected(S(t * 2), true);
            watch.lost(S(t * 2 + 1));
        }
        assert!(watch.is_suspected());
        watch.attempt_failed();
        watch.connected(S(200), true);
        assert_eq!(watch.broken(), Loss::StillSuspected);
        assert!(watch.is_suspected());
    }

    #[test]
    fn a_stable_connection_clears_the_suspicion_once() {
        let mut watch = TakeoverWatch::default();
        for t in 0..SHORT_SESSIONS_TO_SUSPECT as u64 {
            watch.connected(S(t * 2), true);
            watch.lost(S(t * 2 + 1));
        }
        assert!(watch.is_suspected());
        watch.connected(S(100), true);
        assert!(!watch.still_connected(S(100) + STABLE_SESSION - S(1)));
        assert!(watch.still_connected(S(100) + STABLE_SESSION));
        assert!(!watch.still_connected(S(100) + STABLE_SESSION + S(1)));
        assert!(!watch.is_suspected());
        assert_eq!(watch.lost(S(100) + STABLE_SESSION + S(2)), Loss::Ordinary);
    }

    #[test]
    fn the_suspected_retry_is_seconds_and_jittered() {
        assert_eq!(TakeoverWatch::suspected_retry(0.0), SUSPECTED_RETRY / 2);
        assert_eq!(TakeoverWatch::suspected_retry(1.0), SUSPECTED_RETRY);
        assert_eq!(TakeoverWatch::suspected_retry(7.0), SUSPECTED_RETRY);
        assert!(TakeoverWatch::suspected_retry(0.5) >= Duration::from_secs(10));
    }
}
