//! The link's decisions about its connection to the broker, as pure functions of what
//! happened and `now` (monotonic, since the link started): whether a CONNACK is a connection
//! or the clean session that only discards an oversized message, what a SUBACK means for the
//! subscription alert, and, after a failure, how long to wait (the capped, jittered
//! [`reconnect_delay`], or the take-over watch's pause) and how loudly to say so. The select
//! loop in `task.rs` does what these say; nothing here sleeps, logs or touches a socket.

use std::time::Duration;

use rumqttc::{ConnectionError, StateError};

use super::reconnect_delay;
use super::takeover::{Loss, TakeoverWatch};

/// What the link knows about its connection.
#[derive(Debug, Default)]
pub(crate) struct Connection {
    connected: bool,
    /// Attempts failed (or connections lost) since the last CONNACK: the backoff's exponent.
    failures: u32,
    watch: TakeoverWatch,
    subscription_refused: bool,
    /// The reason of the last failed attempt said at WARN, so that a broker refusing the same
    /// way every 30 s says it once.
    last_reason: String,
    /// An oversized message stays queued in the persistent session and would come back at
    /// every reconnect: the next connection is a clean one that discards it, and is dropped at
    /// once for a persistent one again.
    discard_session: bool,
}

/// What a CONNACK is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// A connection: subscribe, announce `online`, re-send the state, tell the owner.
    Connected,
    /// The clean session that discarded an oversized message: drop it and connect again at
    /// once, persistent (`set_clean_session(false)`).
    SessionDiscarded,
}

/// A change of the subscription to the bay's commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Subscription {
    /// The broker refused it (its ACL): raise the alert.
    Refused,
    /// The broker accepts it again: clear the alert.
    AcceptedAgain,
}

/// What a failed `poll` means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// How long to wait before the next attempt.
    pub delay: Duration,
    /// How to say it.
    pub report: Report,
    /// The size of a message over what the link reads, when that broke the connection: the
    /// next connection is a clean session (`set_clean_session(true)`).
    pub oversized: Option<usize>,
    /// This loss made the take-over watch suspect a second client with the bay's client id.
    pub takeover_suspected: bool,
}

/// How a failure is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    /// A connection that was up is lost: WARN, and `LinkEvent::Disconnected`.
    Lost,
    /// An attempt failed for a reason not said yet: WARN, with a hint when one is known.
    Refused,
    /// An attempt failed again for the reason said last: DEBUG.
    Again,
}

impl Connection {
    pub(crate) fn is_connected(&self) -> bool {
        self.connected
    }

    /// The broker accepted a connection at `now`, saying whether it still held the session.
    pub(crate) fn accepted(&mut self, now: Duration, session_present: bool) -> Accepted {
        if self.discard_session {
            self.discard_session = false;
            return Accepted::SessionDiscarded;
        }
        self.connected = true;
        self.failures = 0;
        self.last_reason.clear();
        self.watch.connected(now, session_present);
        Accepted::Connected
    }

    /// Something arrived at `now`: `true` once, when the connection has lasted long enough to
    /// clear a take-over suspicion (`ALERT_CLIENT_ID_IN_USE`).
    pub(crate) fn still_connected(&mut self, now: Duration) -> bool {
        self.watch.still_connected(now)
    }

    /// The broker answered the subscription; `refused` when it refused a filter.
    pub(crate) fn subscribed(&mut self, refused: bool) -> Option<Subscription> {
        let change = match (self.subscription_refused, refused) {
            (false, true) => Some(Subscription::Refused),
            (true, false) => Some(Subscription::AcceptedAgain),
            _ => None,
        };
        self.subscription_refused = refused;
        change
    }

    /// `poll` failed at `now` with `error`; `unit` (a number in 0..1) jitters the delay.
    pub(crate) fn failed(&mut self, now: Duration, error: &ConnectionError, unit: f64) -> Failure {
        let was_connected = std::mem::replace(&mut self.connected, false);
        let oversized = oversized(error);
        if oversized.is_some() {
            self.discard_session = true;
        }
        let closed_by_broker = matches!(error, ConnectionError::MqttState(StateError::ConnectionAborted));
        let loss = match (was_connected, closed_by_broker) {
            (true, true) => self.watch.lost(now),
            (true, false) => self.watch.broken(),
            (false, _) => {
                self.watch.attempt_failed();
                Loss::Ordinary
            }
        };
        let delay = match loss {
            Loss::Ordinary => {
                let delay = reconnect_delay(self.failures, unit);
                self.failures = self.failures.saturating_add(1);
                delay
            }
            Loss::NowSuspected | Loss::StillSuspected => TakeoverWatch::suspected_retry(unit),
        };
        let report = if was_connected {
            Report::Lost
        } else {
            let reason = error.to_string();
            if reason == self.last_reason {
                Report::Again
            } else {
                self.last_reason = reason;
                Report::Refused
            }
        };
        Failure { delay, report, oversized, takeover_suspected: loss == Loss::NowSuspected }
    }
}

/// The size of the packet that broke the connection, when that is what happened.
fn oversized(e: &ConnectionError) -> Option<usize> {
    match e {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(bytes),
        )) => Some(*bytes),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::mqtt::takeover::{SHORT_SESSIONS_TO_SUSPECT, SUSPECTED_RETRY};

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn refused() -> ConnectionError {
        ConnectionError::Io(io::Error::from(io::ErrorKind::ConnectionRefused))
    }
    fn reset() -> ConnectionError {
        ConnectionError::Io(io::Error::from(io::ErrorKind::ConnectionReset))
    }
    fn closed_by_broker() -> ConnectionError {
        ConnectionError::MqttState(StateError::ConnectionAborted)
    }
    fn too_big(bytes: usize) -> ConnectionError {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(bytes),
        ))
    }

    #[test]
    fn failed_attempts_back_off_and_a_connack_starts_over() {
        let mut c = Connection::default();
        let delays: Vec<u64> =
            (0..9).map(|n| c.failed(S(n), &refused(), 1.0).delay.as_millis() as u64).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]);
        assert_eq!(c.accepted(S(100), true), Accepted::Connected);
        assert!(c.is_connected());
        let lost = c.failed(S(200), &reset(), 1.0);
        assert_eq!((lost.delay, lost.report), (MS(500), Report::Lost));
        assert!(!c.is_connected());
        assert_eq!(c.failed(S(201), &refused(), 1.0).delay, MS(1000));
    }

    #[test]
    fn a_reason_is_said_loudly_once_until_it_changes_or_a_connection_succeeds() {
        let mut c = Connection::default();
        let reports: Vec<Report> = [refused(), refused(), reset(), reset(), refused()]
            .iter()
            .map(|e| c.failed(S(0), e, 0.5).report)
            .collect();
        use Report::*;
        assert_eq!(reports, [Refused, Again, Refused, Again, Refused]);
        c.accepted(S(1), false);
        assert_eq!(c.failed(S(2), &refused(), 0.5).report, Lost);
        assert_eq!(c.failed(S(3), &refused(), 0.5).report, Refused, "said again after a connection");
    }

    #[test]
    fn an_oversized_message_costs_one_clean_session_then_the_session_is_persistent_again() {
        let mut c = Connection::default();
        c.accepted(S(0), true);
        let failure = c.failed(S(1), &too_big(5 << 20), 1.0);
        assert_eq!((failure.oversized, failure.report), (Some(5 << 20), Report::Lost));
        assert_eq!(c.accepted(S(2), false), Accepted::SessionDiscarded);
        assert!(!c.is_connected());
        assert_eq!(c.accepted(S(2), false), Accepted::Connected);
        assert!(c.is_connected());
        assert_eq!(c.failed(S(3), &reset(), 1.0).oversized, None);
    }

    #[test]
    fn five_quick_closes_by_the_broker_make_the_wait_seconds_and_raise_the_alert_once() {
        let mut c = Connection::default();
        let mut suspected = vec![];
        for n in 0..SHORT_SESSIONS_TO_SUSPECT as u64 + 2 {
            c.accepted(S(n * 2), true);
            let failure = c.failed(S(n * 2 + 1), &closed_by_broker(), 0.0);
            suspected.push(failure.takeover_suspected);
            if n + 1 >= SHORT_SESSIONS_TO_SUSPECT as u64 {
                assert_eq!(failure.delay, SUSPECTED_RETRY / 2, "close {n}");
            } else {
                assert!(failure.delay < S(1), "close {n}: {:?}", failure.delay);
            }
        }
        assert_eq!(suspected, [false, false, false, false, true, false, false]);
        // Quick network errors are no take-over.
        let mut c = Connection::default();
        for n in 0..10 {
            c.accepted(S(n * 2), true);
            assert!(!c.failed(S(n * 2 + 1), &reset(), 0.0).takeover_suspected);
        }
    }

    #[test]
    fn a_refused_subscription_is_told_once_and_cleared_once() {
        let mut c = Connection::default();
        let got: Vec<Option<Subscription>> =
            [false, true, true, false, false, true].iter().map(|&r| c.subscribed(r)).collect();
        use Subscription::*;
        assert_eq!(got, [None, Some(Refused), None, Some(AcceptedAgain), None, Some(Refused)]);
    }
}
