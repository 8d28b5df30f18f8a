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
///
/// Computed in 64-bit whole seconds on every target: a 32-bit board formats dates after
/// 2038-01-19 like any other, and a time before 1970 (a board whose clock was never set)
/// formats as that date instead of failing.
pub fn rfc3339_seconds(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        // A time between two whole seconds before the epoch belongs to the earlier second.
        Err(before) => {
            let d = before.duration();
            let whole = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            -whole - i64::from(d.subsec_nanos() > 0)
        }
    };
    let (year, month, day) = civil_from_days(secs.div_euclid(SECS_PER_DAY));
    let of_day = secs.rem_euclid(SECS_PER_DAY);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// Why a timestamp was refused by [`parse_rfc3339_utc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    /// The text is not `YYYY-MM-DDTHH:MM:SS` followed by an optional fraction and `Z`.
    #[error("it is not of the form YYYY-MM-DDTHH:MM:SSZ")]
    Shape,
    /// A field is outside its range (month 13, February 30, hour 24, a year before 1970 or
    /// after 9999).
    #[error("its {0} is out of range")]
    Range(&'static str),
    /// The time carries an offset from UTC other than zero.
    #[error("it is not in UTC (write it with Z at the end)")]
    NotUtc,
}

/// Parses an RFC 3339 time in UTC: `2026-11-21T10:00:03Z`, with an optional fraction of a
/// second, `T` or a space between date and time, and `Z`, `+00:00` or nothing at the end.
/// Years 1970 to 9999.
///
/// The arithmetic is 64-bit on every target: unlike parsers that stop where a 32-bit `time_t`
/// does, a 32-bit board reads 2038-01-19T03:14:08Z and later like any other date.
pub fn parse_rfc3339_utc(text: &str) -> Result<SystemTime, TimestampError> {
    let b = text.as_bytes();
    let shape_ok = b.len() >= 19
        && b[..19].iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => matches!(*c, b'T' | b't' | b' '),
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        });
    if !shape_ok {
        return Err(TimestampError::Shape);
    }
    let number =
        |from: usize, to: usize| b[from..to].iter().fold(0i64, |n, digit| n * 10 + i64::from(digit - b'0'));
    let (year, month, day) = (number(0, 4), number(5, 7), number(8, 10));
    let (hour, minute, second) = (number(11, 13), number(14, 16), number(17, 19));
    let mut rest = &b[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix(b".") {
        let digits = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(TimestampError::Shape);
        }
        // Digits past the ninth are below a nanosecond: read, then dropped.
        let mut scale = 100_000_000;
        for digit in &fraction[..digits] {
            nanos += u32::from(digit - b'0') * scale;
            scale /= 10;
        }
        rest = &fraction[digits..];
    }
    match rest {
        b"" | b"Z" | b"z" | b"+00:00" | b"-00:00" => {}
        [b'+' | b'-', ..] => return Err(TimestampError::NotUtc),
        _ => return Err(TimestampError::Shape),
    }
    if !(1970..=9999).contains(&year) {
        return Err(TimestampError::Range("year"));
    }
    if !(1..=12).contains(&month) {
        return Err(TimestampError::Range("month"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(TimestampError::Range("day"));
    }
    if hour > 23 {
        return Err(TimestampError::Range("hour"));
    }
    if minute > 59 {
        return Err(TimestampError::Range("minute"));
    }
    // A leap second (:60) is read as the last second of its minute.
    if second > 60 {
        return Err(TimestampError::Range("second"));
    }
    let secs = days_from_civil(year, month, day) * SECS_PER_DAY + hour * 3600 + minute * 60 + second.min(59);
    let secs = u64::try_from(secs).map_err(|_| TimestampError::Range("year"))?;
    Ok(UNIX_EPOCH + Duration::new(secs, nanos))
}

const SECS_PER_DAY: i64 = 86_400;

fn days_in_month(year: i64, month: i64) -> i64 {
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Howard Hinnant's `days_from_civil`: (year, month 1-12, day 1-31) to days since 1970-01-01.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
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

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// One instant per row: its text, and the Unix seconds it stands for.
    const INSTANTS: &[(&str, u64)] = &[
        ("1970-01-01T00:00:00Z", 0),
        ("2000-02-29T12:00:00Z", 951_825_600),
        ("2026-11-21T10:00:03Z", 1_795_255_203),
        // The last second a signed 32-bit time_t holds, and the ones after it.
        ("2038-01-19T03:14:07Z", 2_147_483_647),
        ("2038-01-19T03:14:08Z", 2_147_483_648),
        ("2099-01-01T00:00:00Z", 4_070_908_800),
        ("2106-02-07T06:28:16Z", 4_294_967_296),
        ("9999-12-31T23:59:59Z", 253_402_300_799),
    ];

    #[test]
    fn dates_after_2038_parse_and_format_on_every_target() {
        for &(text, secs) in INSTANTS {
            assert_eq!(parse_rfc3339_utc(text), Ok(at(secs)), "{text}");
            assert_eq!(rfc3339_seconds(at(secs)), text, "{secs}");
        }
    }

    fn check(text: &str, expected: Result<SystemTime, TimestampError>) {
        assert_eq!(parse_rfc3339_utc(text), expected, "{text:?}");
    }

    #[test]
    fn rfc3339_variants_in_utc_are_read_and_everything_else_is_refused() {
        let t = at(2_500_000_000); // 2049-03-22T04:26:40Z
        check("2049-03-22T04:26:40Z", Ok(t));
        check("2049-03-22 04:26:40", Ok(t));
        check("2049-03-22t04:26:40z", Ok(t));
        check("2049-03-22T04:26:40+00:00", Ok(t));
        check("2049-03-22T04:26:40.25Z", Ok(t + Duration::from_millis(250)));
        check("2049-03-22T04:26:40.1234567891Z", Ok(t + Duration::from_nanos(123_456_789)));
        check("2049-03-22T04:26:60Z", Ok(t + Duration::from_secs(19)));
        check("2049-03-22T04:26:40+02:00", Err(TimestampError::NotUtc));
        check("2049-03-22T04:26:40-05:00", Err(TimestampError::NotUtc));
        check("2049-03-22T04:26:40.Z", Err(TimestampError::Shape));
        check("2049-03-22T04:26Z", Err(TimestampError::Shape));
        check("2049-03-22T04:26:40ZZ", Err(TimestampError::Shape));
        check("2049-3-22T04:26:40Z", Err(TimestampError::Shape));
        check("soon", Err(TimestampError::Shape));
        check("", Err(TimestampError::Shape));
        check("２049-03-22T04:26:40Z", Err(TimestampError::Shape));
        check("1969-12-31T23:59:59Z", Err(TimestampError::Range("year")));
        check("2049-13-01T00:00:00Z", Err(TimestampError::Range("month")));
        check("2049-00-01T00:00:00Z", Err(TimestampError::Range("month")));
        check("2049-02-29T00:00:00Z", Err(TimestampError::Range("day")));
        check("2048-02-30T00:00:00Z", Err(TimestampError::Range("day")));
        check("2049-04-31T00:00:00Z", Err(TimestampError::Range("day")));
        check("2049-03-22T24:00:00Z", Err(TimestampError::Range("hour")));
        check("2049-03-22T23:60:00Z", Err(TimestampError::Range("minute")));
        check("2049-03-22T23:59:61Z", Err(TimestampError::Range("second")));
        assert_eq!(
            parse_rfc3339_utc("2048-02-29T00:00:00Z").map(rfc3339_seconds).as_deref(),
            Ok("2048-02-29T00:00:00Z")
        );
    }

    #[test]
    fn every_day_of_four_centuries_round_trips() {
        // 1970 to 2370 covers both leap-year exceptions (2100 is not one, 2000 and 2400 are).
        for day in 0..146_097i64 {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
            assert!((1..=days_in_month(y, m)).contains(&d), "{y}-{m}-{d}");
        }
    }

    #[test]
    fn times_before_1970_format_without_failing() {
        assert_eq!(rfc3339_seconds(UNIX_EPOCH - Duration::from_secs(1)), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339_seconds(UNIX_EPOCH - Duration::from_millis(1)), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339_seconds(UNIX_EPOCH - Duration::from_secs(86_400 * 365)), "1969-01-01T00:00:00Z");
    }

    proptest::proptest! {
        #[test]
        fn any_second_from_1970_to_9999_survives_a_round_trip(secs in 0u64..253_402_300_800) {
            proptest::prop_assert_eq!(parse_rfc3339_utc(&rfc3339_seconds(at(secs))), Ok(at(secs)));
        }
    }

    #[test]
    fn timestamps_round_trip_and_format_as_the_api_wants() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_255_203_250);
        assert_eq!(from_unix_millis(unix_millis(t)), t);
        assert_eq!(rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(1_795_255_203)), "2026-11-21T10:00:03Z");
    }
}
