//! The uploader's decisions as pure functions of data and `now`: what an answer from the cloud
//! means, how long to wait before the next try, whether a token is still fresh enough to use,
//! how images are split into requests, and whether the kiosk's clock can be trusted to sign.
//! Nothing here sleeps, reads a clock or touches a socket.

use std::time::{Duration, SystemTime};

/// What to do after an answer (or the lack of one) from the cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: carry on.
    Done,
    /// 401 on an upload: the token expired or is wrong. Authenticate again; a new session means
    /// every image of the inspection goes again under it.
    Reauthenticate,
    /// 401 naming the clock on a signed call: the kiosk's clock is off by more than the server
    /// allows. Nothing can be sent until the clock is right.
    ClockRejected,
    /// 401 "API Key not valid" on a signed call: the account settings are wrong. A person must act.
    BadCredentials(String),
    /// 410: the session expired. Start a new one; never use this one again.
    SessionExpired,
    /// 409: the session was consumed. Never use it again.
    SessionConsumed,
    /// 429 / 503: the server asked to come back after this long; the request had no effect.
    RetryAfter(Duration),
    /// A network error or another 5xx: try again after an exponential, jittered backoff.
    Backoff,
    /// 400 / 413 / 415 / 422 and other 4xx: the request itself is wrong and will stay wrong.
    /// The inspection fails with the server's reason until someone asks for a retry.
    Permanent(String),
}

/// Reads an HTTP answer. `signed` says whether the call carried the HMAC headers (all but
/// upload), `message` is the JSON body's `message`, `retry_after` the header's value.
pub fn classify(
    status: u16,
    signed: bool,
    message: &str,
    retry_after: Option<&str>,
    now: SystemTime,
) -> Verdict {
    match status {
        200..=299 => Verdict::Done,
        401 if signed && mentions_clock(message) => Verdict::ClockRejected,
        401 if signed => Verdict::BadCredentials(reason(status, message)),
        401 => Verdict::Reauthenticate,
        409 => Verdict::SessionConsumed,
        410 => Verdict::SessionExpired,
        429 | 503 => Verdict::RetryAfter(
            retry_after
                .and_then(|v| parse_retry_after(v, now))
                .unwrap_or(DEFAULT_RETRY_AFTER)
                .min(MAX_RETRY_AFTER),
        ),
        408 | 500..=599 => Verdict::Backoff,
        _ => Verdict::Permanent(reason(status, message)),
    }
}

/// Waited when a 429 or 503 carries no usable `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);
/// A `Retry-After` longer than this is not believed (a broken proxy must not park the bay for a day).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30 * 60);
/// The backoff never waits longer than this between tries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5 * 60);
/// First backoff step.
pub const BASE_BACKOFF: Duration = Duration::from_secs(1);

/// Exponential backoff with full jitter: a uniformly random wait between zero and
/// `min(cap, base · 2^failures)`. `random` is in `[0, 1)`, drawn by the caller.
pub fn backoff(failures: u32, base: Duration, cap: Duration, random: f64) -> Duration {
    let ceiling = base.saturating_mul(2u32.saturating_pow(failures.min(30))).min(cap);
    ceiling.mul_f64(random.clamp(0.0, 1.0))
}

/// `Retry-After` as seconds or as an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    httpdate::parse_http_date(v).ok().map(|at| at.duration_since(now).unwrap_or_default())
}

/// Tokens are renewed this long before they expire, so that a request in flight never
/// carries a token that dies on the way.
pub const TOKEN_MARGIN: Duration = Duration::from_secs(60);

/// Whether a token issued at `issued_at` (monotonic) with `expires_in` may still be used at `now`.
pub fn token_is_fresh(issued_at: Duration, expires_in: Duration, now: Duration) -> bool {
    now.saturating_sub(issued_at) + TOKEN_MARGIN < expires_in
}

/// The cloud's limits on one upload request.
pub const MAX_FILES_PER_REQUEST: usize = 99;

/// Splits images (given by size, in order) into requests of at most `max_files` files and at
/// most `max_bytes` bytes each; an image larger than `max_bytes` goes alone.
pub fn batches(sizes: &[u64], max_files: usize, max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        let full = i - start >= max_files.max(1) || (i > start && bytes.saturating_add(size) > max_bytes);
        if full {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// How far the kiosk's clock may be from the server's before it stops signing. The server
/// refuses beyond 300 s; stopping well before that leaves room for the request's own delay.
pub const MAX_TRUSTED_SKEW: Duration = Duration::from_secs(120);

/// What the kiosk knows about its clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockTrust {
    /// No server `Date` seen yet: try, and learn from the answer.
    Unknown,
    /// The last measured skew is within [`MAX_TRUSTED_SKEW`].
    Trusted { skew_secs: i64 },
    /// The clock is too far off to sign; nothing is sent until it is right.
    Untrusted { skew_secs: i64 },
}

impl ClockTrust {
    /// Whether signed calls may be sent.
    pub fn may_sign(self) -> bool {
        !matches!(self, ClockTrust::Untrusted { .. })
    }
}

/// Judges the clock from a server `Date` header read at local time `local` (positive skew:
/// the kiosk is ahead). `Date` has second precision, so one second of skew is noise.
pub fn judge_clock(server_date: &str, local: SystemTime) -> Option<ClockTrust> {
    let server = httpdate::parse_http_date(server_date.trim()).ok()?;
    let skew_secs = match local.duration_since(server) {
        Ok(ahead) => ahead.as_secs() as i64,
        Err(behind) => -(behind.duration().as_secs() as i64),
    };
    Some(if skew_secs.unsigned_abs() > MAX_TRUSTED_SKEW.as_secs() {
        ClockTrust::Untrusted { skew_secs }
    } else {
        ClockTrust::Trusted { skew_secs }
    })
}

fn mentions_clock(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("clock") || m.contains("skew") || m.contains("api-token expired")
}

fn reason(status: u16, message: &str) -> String {
    let m = message.trim();
    if m.is_empty() {
        format!("the cloud answered HTTP {status}")
    } else {
        format!("the cloud answered HTTP {status}: {}", m.chars().take(500).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_255_203)
    }

    fn check(status: u16, signed: bool, message: &str, retry_after: Option<&str>, expected: Verdict) {
        assert_eq!(classify(status, signed, message, retry_after, now()), expected, "{status} {message:?}");
    }

    #[test]
    fn answers_are_classified_as_the_contract_says() {
        check(200, true, "", None, Verdict::Done);
        check(401, false, "Token expired", None, Verdict::Reauthenticate);
        check(401, true, "API-Token expired or clock skew too large", None, Verdict::ClockRejected);
        check(
            401,
            true,
            "API Key not valid",
            None,
            Verdict::BadCredentials("the cloud answered HTTP 401: API Key not valid".into()),
        );
        check(409, true, "Session already consumed", None, Verdict::SessionConsumed);
        check(410, false, "The requested Session Key has already expired", None, Verdict::SessionExpired);
        check(429, false, "", Some("7"), Verdict::RetryAfter(Duration::from_secs(7)));
        check(
            503,
            false,
            "",
            Some("Sat, 21 Nov 2026 10:00:13 GMT"),
            Verdict::RetryAfter(Duration::from_secs(10)),
        );
        check(503, false, "", None, Verdict::RetryAfter(DEFAULT_RETRY_AFTER));
        check(503, false, "", Some("86400"), Verdict::RetryAfter(MAX_RETRY_AFTER));
        check(500, false, "", None, Verdict::Backoff);
        check(502, true, "", None, Verdict::Backoff);
        check(
            400,
            true,
            "Required fields are missing or invalid.",
            None,
            Verdict::Permanent("the cloud answered HTTP 400: Required fields are missing or invalid.".into()),
        );
        check(413, false, "", None, Verdict::Permanent("the cloud answered HTTP 413".into()));
        check(
            415,
            false,
            "not a JPEG",
            None,
            Verdict::Permanent("the cloud answered HTTP 415: not a JPEG".into()),
        );
        check(
            422,
            true,
            "Missing photos",
            None,
            Verdict::Permanent("the cloud answered HTTP 422: Missing photos".into()),
        );
    }

    #[test]
    fn http_dates_after_2038_are_read_on_32_bit_boards_too() {
        // 2040-01-01T00:00:00Z, past where a 32-bit time_t ends.
        let later = UNIX_EPOCH + Duration::from_secs(2_208_988_800);
        assert_eq!(parse_retry_after("Sun, 01 Jan 2040 00:00:40 GMT", later), Some(Duration::from_secs(40)));
        assert_eq!(
            judge_clock("Sat, 31 Dec 2039 23:57:00 GMT", later),
            Some(ClockTrust::Untrusted { skew_secs: 180 })
        );
        assert_eq!(
            judge_clock("Sun, 01 Jan 2040 00:00:30 GMT", later),
            Some(ClockTrust::Trusted { skew_secs: -30 })
        );
    }

    #[test]
    fn backoff_doubles_with_full_jitter_and_stops_at_five_minutes() {
        let b = |n, r| backoff(n, BASE_BACKOFF, MAX_BACKOFF, r);
        assert_eq!(b(0, 0.999_999), Duration::from_secs(1).mul_f64(0.999_999));
        assert_eq!(b(3, 0.5), Duration::from_secs(4));
        assert_eq!(b(0, 0.0), Duration::ZERO);
        assert_eq!(b(20, 0.5), Duration::from_secs(150));
        assert_eq!(b(u32::MAX, 1.0), MAX_BACKOFF);
        for n in 0..40 {
            assert!(b(n, 0.99) <= MAX_BACKOFF);
        }
    }

    #[test]
    fn tokens_are_renewed_a_minute_before_they_expire() {
        let ttl = Duration::from_secs(900);
        let issued = Duration::from_secs(100);
        assert!(token_is_fresh(issued, ttl, issued));
        assert!(token_is_fresh(issued, ttl, issued + Duration::from_secs(839)));
        assert!(!token_is_fresh(issued, ttl, issued + Duration::from_secs(840)));
        assert!(!token_is_fresh(issued, ttl, issued + Duration::from_secs(5000)));
    }

    #[test]
    fn images_are_split_by_count_and_bytes() {
        assert_eq!(batches(&[10, 10, 10], 2, 1000), vec![0..2, 2..3]);
        assert_eq!(batches(&[600, 600, 100], 99, 1000), vec![0..1, 1..3]);
        assert_eq!(batches(&[5000, 1], 99, 1000), vec![0..1, 1..2], "an oversized image goes alone");
        assert_eq!(batches(&[], 99, 1000), Vec::<std::ops::Range<usize>>::new());
        let many = vec![1u64; 250];
        assert_eq!(batches(&many, MAX_FILES_PER_REQUEST, u64::MAX), vec![0..99, 99..198, 198..250]);
    }

    #[test]
    fn the_clock_is_judged_against_the_server_date() {
        let server = "Sat, 21 Nov 2026 10:00:03 GMT";
        assert_eq!(judge_clock(server, now()), Some(ClockTrust::Trusted { skew_secs: 0 }));
        assert_eq!(
            judge_clock(server, now() + Duration::from_secs(119)),
            Some(ClockTrust::Trusted { skew_secs: 119 })
        );
        assert_eq!(
            judge_clock(server, now() + Duration::from_secs(121)),
            Some(ClockTrust::Untrusted { skew_secs: 121 })
        );
        assert_eq!(
            judge_clock(server, now() - Duration::from_secs(3600)),
            Some(ClockTrust::Untrusted { skew_secs: -3600 })
        );
        assert_eq!(judge_clock("yesterday", now()), None);
        assert!(!ClockTrust::Untrusted { skew_secs: 500 }.may_sign());
        assert!(ClockTrust::Unknown.may_sign());
    }
}
