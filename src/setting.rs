//! One setting of the bay's configuration: how a value is refused ([`Invalid`]: the key, the
//! problem, the fix) and the value syntaxes that every section shares: byte sizes
//! ([`ByteSize`]), durations, lists of photo labels, ids, and numeric bounds ([`in_range`], the
//! one check of a bound). `config` checks the bay's sections with them and `capture::config`
//! the cameras', so that neither has to import the other's checks.

use std::fmt;
use std::time::Duration;

use crate::vehicle::PhotoLabel;

/// A value refused: the key (`cameras[0].timeout`), what is wrong with it, and what to do.
/// `config` adds the file's name and turns it into a `ConfigError`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub problem: String,
    pub fix: String,
}

/// The refusal of `key`: `problem`, and `fix`.
pub fn invalid(key: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Invalid {
    Invalid { key: key.into(), problem: problem.into(), fix: fix.into() }
}

/// The one check of a numeric bound: `value` when it lies in `min..=max`, else "VALUE is out of
/// range" under `key` with `fix` (which says the range and a usual value). A value that cannot
/// be compared (a NaN) is out of range.
pub fn in_range<T: PartialOrd + fmt::Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
    fix: &str,
) -> Result<T, Invalid> {
    if min <= value && value <= max {
        Ok(value)
    } else {
        Err(invalid(key, format!("{value} is out of range"), fix))
    }
}

/// A byte count written as `8 GiB`, `512 MiB`, `500MB`, `1048576` or `64 kB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The largest size there is, for a bound that has only a lower end.
    pub const MAX: ByteSize = ByteSize(u64::MAX);

    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let unit = unit.trim();
        if number.is_empty() {
            return Err(format!("{text:?} does not start with a number"));
        }
        let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "m" | "mb" => 1_000_000,
            "g" | "gb" => 1_000_000_000,
            "t" | "tb" => 1_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            _ => return Err(format!("{text:?} has an unknown unit {unit:?}")),
        };
        let value: f64 = number.parse().map_err(|_| format!("{text:?} does not start with a number"))?;
        let bytes = value * multiplier as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("{text:?} is out of range"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit < UNITS.len() - 1 {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}

const SIZE_FIX: &str = "write a number with a unit, e.g. \"8 GiB\", \"512 MiB\" or \"500 MB\"";

/// The byte count written at `key`.
pub fn size(key: &str, text: &str) -> Result<ByteSize, Invalid> {
    ByteSize::parse(text).map_err(|problem| invalid(key, problem, SIZE_FIX))
}

/// The duration written at `key` (`"5s"`, `"30 min"`, `"7 days"`).
pub fn duration(key: &str, text: &str) -> Result<Duration, Invalid> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        invalid(
            key,
            format!("{text:?} is not a duration ({e})"),
            "write e.g. \"5s\", \"30 min\" or \"7 days\"",
        )
    })
}

/// The duration written at `key`, which must lie in `min..=max` ([`in_range`]).
pub fn duration_in_range(
    key: &str,
    text: &str,
    min: Duration,
    max: Duration,
    fix: &str,
) -> Result<Duration, Invalid> {
    let value = duration(key, text)?;
    in_range(key, humantime::Duration::from(value), min.into(), max.into(), fix).map(Into::into)
}

/// The photo labels listed at `key`, in order.
pub fn labels(key: &str, names: &[String]) -> Result<Vec<PhotoLabel>, Invalid> {
    names
        .iter()
        .map(|n| {
            PhotoLabel::parse(n).map_err(|_| {
                invalid(
                    key,
                    format!("{n:?} is not a photo label"),
                    format!("use one of {}", PhotoLabel::names().join(", ")),
                )
            })
        })
        .collect()
}

/// Whether `text` can name a bay or a camera: 1-64 characters of A-Z, a-z, 0-9, '-' and '_'
/// (it becomes part of MQTT topics, file names and systemd credential names).
pub fn is_plain_id(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_is_checked_the_same_way_for_every_kind_of_number() {
        let fix = "use 1 to 10";
        assert_eq!(in_range("k", 3, 1, 10, fix), Ok(3));
        assert_eq!(in_range("k", 1, 1, 10, fix), Ok(1), "the ends are in range");
        assert_eq!(in_range("k", 10, 1, 10, fix), Ok(10));
        assert_eq!(in_range("k", 11, 1, 10, fix), Err(invalid("k", "11 is out of range", fix)));
        assert_eq!(in_range("k", -0.5, 0.0, 1.0, fix).unwrap_err().problem, "-0.5 is out of range");
        assert!(in_range("k", f64::NAN, 0.0, 1.0, fix).is_err(), "NaN is never in range");
        let err = in_range("k", ByteSize(1024), ByteSize(1 << 20), ByteSize::MAX, fix).unwrap_err();
        assert_eq!(err.problem, "1.0 KiB is out of range");
        let second = Duration::from_secs(1);
        assert_eq!(duration_in_range("k", "10s", second, 3600 * second, fix), Ok(10 * second));
        let err = duration_in_range("k", "100 ms", second, 3600 * second, fix).unwrap_err();
        assert_eq!((err.key.as_str(), err.problem.as_str()), ("k", "100ms is out of range"));
        let err = duration_in_range("k", "soon", second, 3600 * second, fix).unwrap_err();
        assert!(err.problem.contains("not a duration"), "{err:?}");
    }

    #[test]
    fn ids_are_short_and_plain() {
        assert!(is_plain_id("bay-07") && is_plain_id("front_left") && is_plain_id(&"x".repeat(64)));
        for bad in ["", "bay/07", "bay 07", "bay#", "bäy", &"x".repeat(65)] {
            assert!(!is_plain_id(bad), "{bad:?}");
        }
    }
}
