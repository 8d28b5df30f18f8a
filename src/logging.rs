//! Where log records go: the systemd journal when the process is connected to it (key-value
//! fields become journal fields, so `journalctl CASE_ID=CASE-12345` finds one inspection), and
//! standard error otherwise, as `LEVEL message key=value …` lines.
//!
//! Other crates' records are capped at [`THIRD_PARTY_MAX`] whatever the verbosity: at debug and
//! trace, HTTP, TLS and MQTT libraries dump requests and the wire (ureq prints every byte it
//! sends, `Authorization` headers and bearer tokens included). `-v`, `-vv` and
//! `CAPTURE_KIOSK_LOG` raise the kiosk's own records only, and those never carry a secret.

use std::io::Write;

use log::kv::{Key, Value, VisitSource};
use log::{Level, LevelFilter, Log, Metadata, Record};

/// The most verbose level shown for records of any crate but this one.
pub const THIRD_PARTY_MAX: LevelFilter = LevelFilter::Info;

/// Installs the logger once. `verbosity` is the level to show for the kiosk's own records;
/// `CAPTURE_KIOSK_LOG` (error, warn, info, debug, trace) overrides it. Other crates never go
/// past [`THIRD_PARTY_MAX`].
pub fn init(verbosity: LevelFilter) {
    let ours = std::env::var("CAPTURE_KIOSK_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(verbosity);
    let journal = if systemd_journal_logger::connected_to_journal() {
        systemd_journal_logger::JournalLog::new().ok().map(|journal| {
            Box::new(journal.with_syslog_identifier("capture-kiosk".to_owned())) as Box<dyn Log>
        })
    } else {
        None
    };
    let inner = journal.unwrap_or_else(|| Box::new(StderrLog));
    let _ = log::set_boxed_logger(Box::new(Capped { inner, ours }));
    log::set_max_level(ours);
}

/// Whether a record of `target` at `level` is shown when the kiosk's own records go up to
/// `ours`. Pure, for the table test.
pub fn shown(target: &str, level: Level, ours: LevelFilter) -> bool {
    let own = target == OWN_TARGET || target.starts_with(OWN_PREFIX);
    let limit = if own { ours } else { ours.min(THIRD_PARTY_MAX) };
    level <= limit
}

const OWN_TARGET: &str = "capture_kiosk";
const OWN_PREFIX: &str = "capture_kiosk::";

/// Applies [`shown`] in front of the real logger, in `enabled` too, so that a library asking
/// `log_enabled!(Trace)` before formatting something sensitive is told no.
struct Capped {
    inner: Box<dyn Log>,
    ours: LevelFilter,
}

impl Log for Capped {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        shown(metadata.target(), metadata.level(), self.ours) && self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if shown(record.target(), record.level(), self.ours) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

struct StderrLog;

impl Log for StderrLog {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &Record<'_>) {
        let mut line = format!("{:<5} {}", record.level(), record.args());
        let mut fields = Fields(&mut line);
        let _ = record.key_values().visit(&mut fields);
        if record.level() <= Level::Error {
            line.push_str(&format!(" module={}", record.target()));
        }
        line.push('\n');
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

struct Fields<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let text = value.to_string();
        if text.contains(' ') || text.is_empty() {
            self.0.push_str(&format!(" {key}={text:?}"));
        } else {
            self.0.push_str(&format!(" {key}={text}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(target: &str, level: Level, ours: LevelFilter, expected: bool) {
        assert_eq!(shown(target, level, ours), expected, "{target} at {level} with -v up to {ours}");
    }

    #[test]
    fn other_crates_never_pass_info_whatever_the_verbosity() {
        use Level::*;
        check("capture_kiosk", Trace, LevelFilter::Trace, true);
        check("capture_kiosk::upload::client", Trace, LevelFilter::Trace, true);
        check("capture_kiosk::daemon", Debug, LevelFilter::Info, false);
        check("capture_kiosk::daemon", Info, LevelFilter::Info, true);
        check("ureq_proto::util", Trace, LevelFilter::Trace, false);
        check("ureq::run", Debug, LevelFilter::Trace, false);
        check("rustls::client::hs", Debug, LevelFilter::Debug, false);
        check("rumqttc::state", Debug, LevelFilter::Trace, false);
        check("rumqttc::state", Info, LevelFilter::Trace, true);
        check("ureq::run", Warn, LevelFilter::Trace, true);
        check("ureq::run", Info, LevelFilter::Warn, false);
        // A crate whose name only starts like ours is not ours.
        check("capture_kiosk_bench", Trace, LevelFilter::Trace, false);
    }
}
