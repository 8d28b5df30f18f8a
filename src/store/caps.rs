//! The buffer's caps as pure decisions: given what is buffered, what the disk has free and
//! what a new inspection or image needs, accept it or say why not. No SQL, no file system.

use super::Caps;

/// Why the buffer refused a new inspection or image. Nothing already buffered is touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The JPEG bytes buffered plus the estimate for the new inspection exceed `max_bytes`.
    MaxBytes { buffered: u64, needed: u64, max_bytes: u64 },
    /// The file system's free space minus what is needed would fall below `min_free_disk`.
    MinFreeDisk { free: u64, needed: u64, min_free_disk: u64 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Refusal::MaxBytes { buffered, needed, max_bytes } => write!(
                f,
                "{} are buffered and this needs about {} more, over [buffer] max_bytes = {}; \
                 upload or remove buffered inspections, or raise [buffer] max_bytes",
                Bytes(buffered),
                Bytes(needed),
                Bytes(max_bytes)
            ),
            Refusal::MinFreeDisk { free, needed, min_free_disk } => write!(
                f,
                "the file system has {} free and this needs about {}, which would leave less than \
                 [buffer] min_free_disk = {}; upload or remove buffered inspections, free disk space \
                 on the state directory's file system, or lower [buffer] min_free_disk",
                Bytes(free),
                Bytes(needed),
                Bytes(min_free_disk)
            ),
        }
    }
}

/// Whether a new inspection that needs about `needed` bytes fits, with `buffered` bytes
/// already in the buffer and `free` bytes free on the file system.
pub(crate) fn check_inspection(caps: Caps, buffered: u64, free: u64, needed: u64) -> Result<(), Refusal> {
    if buffered.saturating_add(needed) > caps.max_bytes {
        return Err(Refusal::MaxBytes { buffered, needed, max_bytes: caps.max_bytes });
    }
    check_image(caps, free, needed)
}

/// Whether `needed` more bytes keep the file system's free space at or above `min_free_disk`.
/// An image of an accepted inspection is held to this cap only: `max_bytes` was checked, with
/// an estimate, when the inspection began.
pub(crate) fn check_image(caps: Caps, free: u64, needed: u64) -> Result<(), Refusal> {
    if free < needed.saturating_add(caps.min_free_disk) {
        return Err(Refusal::MinFreeDisk { free, needed, min_free_disk: caps.min_free_disk });
    }
    Ok(())
}

/// A byte count as people read it: `9437184 bytes (9.0 MiB)`.
struct Bytes(u64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let n = self.0;
        if n < 1024 {
            return write!(f, "{n} bytes");
        }
        let mut value = n as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{n} bytes ({value:.1} {})", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps { max_bytes: 1000, min_free_disk: 100 };

    fn check(buffered: u64, free: u64, needed: u64, expected: Result<(), &str>) {
        let got = check_inspection(CAPS, buffered, free, needed);
        match (got, expected) {
            (Ok(()), Ok(())) => {}
            (Err(refusal), Err(part)) => {
                let shown = refusal.to_string();
                assert!(shown.contains(part), "{shown:?} should say {part:?}");
            }
            (got, expected) => {
                panic!("buffered {buffered}, free {free}, needed {needed}: {got:?}, expected {expected:?}")
            }
        }
    }

    #[test]
    fn caps_accept_up_to_the_limit_and_refuse_beyond_it() {
        check(0, 10_000, 1000, Ok(()));
        check(400, 10_000, 600, Ok(()));
        check(401, 10_000, 600, Err("max_bytes = 1000 bytes"));
        check(0, 1100, 1000, Ok(()));
        check(0, 1099, 1000, Err("min_free_disk = 100 bytes"));
        check(0, 50, 0, Err("min_free_disk"));
        check(u64::MAX, u64::MAX, u64::MAX, Err("max_bytes"));
        check(0, u64::MAX, 0, Ok(()));
    }

    #[test]
    fn refusals_give_the_numbers_and_the_fix() {
        let shown = Refusal::MaxBytes { buffered: 9_437_184, needed: 2048, max_bytes: 9_437_184 }.to_string();
        assert!(shown.contains("9437184 bytes (9.0 MiB) are buffered"), "{shown}");
        assert!(shown.contains("2048 bytes (2.0 KiB)"), "{shown}");
        assert!(
            shown.contains("upload or remove buffered inspections, or raise [buffer] max_bytes"),
            "{shown}"
        );
        let shown = Refusal::MinFreeDisk { free: 10, needed: 20, min_free_disk: 1 << 60 }.to_string();
        assert!(shown.contains("10 bytes free") && shown.contains("(1.0 EiB)"), "{shown}");
        assert!(shown.contains("lower [buffer] min_free_disk"), "{shown}");
    }
}
