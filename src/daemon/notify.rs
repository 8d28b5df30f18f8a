//! systemd's notification protocol: `READY=1`, `WATCHDOG=1`, `STATUS=…`,
//! `EXTEND_TIMEOUT_USEC=…` and `STOPPING=1` as datagrams to `$NOTIFY_SOCKET` (a path, or an
//! abstract name starting with `@`), and the pure rules for when the watchdog may be fed and
//! how long a start may take.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Where notifications go; does nothing when the daemon was not started by systemd.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, String)>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn none() -> Notifier {
        Notifier { target: None }
    }

    /// The notifier for socket `address` (`@name` for an abstract socket).
    pub fn to(address: &str) -> Notifier {
        match UnixDatagram::unbound() {
            Ok(socket) => Notifier { target: Some((socket, address.to_owned())) },
            Err(e) => {
                log::warn!(socket = address, error:% = e; "No socket for systemd notifications");
                Notifier::none()
            }
        }
    }

    /// The notifier `$NOTIFY_SOCKET` names, if any.
    pub fn from_env() -> Notifier {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(address) if !address.is_empty() => Notifier::to(&address),
            _ => Notifier::none(),
        }
    }

    /// Sends one notification (lines such as `READY=1`); failures are logged, never fatal.
    pub fn send(&self, message: &str) {
        let Some((socket, address)) = &self.target else { return };
        let sent = if let Some(name) = address.strip_prefix('@') {
            abstract_send(socket, name, message)
        } else {
            socket.send_to(message.as_bytes(), PathBuf::from(address))
        };
        if let Err(e) = sent {
            log::debug!(socket = address.as_str(), error:% = e; "systemd notification not delivered");
        }
    }
}

#[cfg(target_os = "linux")]
fn abstract_send(socket: &UnixDatagram, name: &str, message: &str) -> std::io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    socket.send_to_addr(message.as_bytes(), &addr)
}

#[cfg(not(target_os = "linux"))]
fn abstract_send(_: &UnixDatagram, _: &str, _: &str) -> std::io::Result<usize> {
    Err(std::io::Error::other("abstract sockets exist only on Linux"))
}

/// The watchdog interval systemd asks for (`$WATCHDOG_USEC`), if it asks and the notification
/// is meant for this process (`$WATCHDOG_PID`).
pub fn watchdog_from_env() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Read speed assumed for the buffer's storage: a slow SD card.
const SLOW_STORAGE_BYTES_PER_SEC: u64 = 10_000_000;

/// How long starting may take with a buffer file of `buffer_bytes`: opening it runs SQLite's
/// `quick_check`, which reads every page, so a full buffer on a slow SD card takes minutes, far
/// past the unit's `TimeoutStartSec`. Sent as `EXTEND_TIMEOUT_USEC` before the buffer is opened,
/// so systemd does not kill a start that is only slow. 30 s for the rest of the start.
pub fn start_allowance(buffer_bytes: u64) -> Duration {
    Duration::from_secs(30 + buffer_bytes / SLOW_STORAGE_BYTES_PER_SEC)
}

/// When a loop last showed it is alive (monotonic), and how much longer than the stall limit
/// it may then stay silent: the deadline of a request it is inside (a request has its own
/// deadline, so waiting for it is progress, not a wedge). Zero for a plain beat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    pub at: Duration,
    pub grace: Duration,
}

impl Beat {
    /// A plain beat at `at`.
    pub fn at(at: Duration) -> Beat {
        Beat { at, grace: Duration::ZERO }
    }
}

/// Whether `WATCHDOG=1` may be sent at `now`: every loop beat within half the interval (plus
/// the grace its last beat asked for), and half the interval passed since the last one. Times
/// are monotonic.
pub fn watchdog_due(now: Duration, last_sent: Option<Duration>, interval: Duration, beats: &[Beat]) -> bool {
    let stall_limit = interval / 2;
    let alive = beats.iter().all(|beat| now.saturating_sub(beat.at) <= stall_limit + beat.grace);
    let due = last_sent.is_none_or(|t| now.saturating_sub(t) >= interval / 2);
    alive && due
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_allowance_grows_with_the_buffer_at_slow_sd_card_speed() {
        assert_eq!(start_allowance(0), Duration::from_secs(30));
        assert_eq!(start_allowance(100 * 1024 * 1024), Duration::from_secs(30 + 10));
        // A full 8 GiB buffer: about 14 minutes more.
        assert_eq!(start_allowance(8 << 30), Duration::from_secs(30 + 858));
    }

    #[test]
    fn the_watchdog_is_fed_only_while_every_loop_beats() {
        let s = Duration::from_secs;
        let b = |secs| Beat::at(s(secs));
        let interval = s(10);
        assert!(watchdog_due(s(100), None, interval, &[b(99), b(98)]));
        assert!(!watchdog_due(s(100), Some(s(97)), interval, &[b(99), b(98)]), "too soon after the last");
        assert!(watchdog_due(s(100), Some(s(95)), interval, &[b(99), b(98)]));
        assert!(!watchdog_due(s(100), Some(s(90)), interval, &[b(99), b(94)]), "one loop is wedged");
        assert!(watchdog_due(s(100), Some(s(90)), interval, &[b(99), b(95)]));
    }

    #[test]
    fn a_loop_inside_a_request_is_alive_until_the_request_deadline_passes() {
        let s = Duration::from_secs;
        let interval = s(10);
        // Sent a request with a 60 s deadline at 40: alive until 40 + 5 + 60.
        let in_request = Beat { at: s(40), grace: s(60) };
        assert!(watchdog_due(s(100), None, interval, &[Beat::at(s(99)), in_request]));
        assert!(watchdog_due(s(105), None, interval, &[Beat::at(s(104)), in_request]));
        assert!(
            !watchdog_due(s(106), None, interval, &[Beat::at(s(105)), in_request]),
            "past the deadline: wedged"
        );
    }
}
