//! Where log records go: the systemd journal when the process is connected to it (key-value
//! fields become journal fields, so `journalctl CASE_ID=CASE-12345` finds one inspection), and
//! standard error otherwise, as `LEVEL message key=value …` lines.

use std::io::Write;

use log::kv::{Key, Value, VisitSource};
use log::{Level, LevelFilter, Log, Metadata, Record};

/// Installs the logger once. `verbosity` is the level to show; `CAPTURE_KIOSK_LOG`
/// (error, warn, info, debug, trace) overrides it.
pub fn init(verbosity: LevelFilter) {
    let level = std::env::var("CAPTURE_KIOSK_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(verbosity);
    let installed = if systemd_journal_logger::connected_to_journal() {
        match systemd_journal_logger::JournalLog::new() {
            Ok(journal) => journal.with_syslog_identifier("capture-kiosk".to_owned()).install().is_ok(),
            Err(_) => false,
        }
    } else {
        false
    };
    if !installed {
        let _ = log::set_boxed_logger(Box::new(StderrLog));
    }
    log::set_max_level(level);
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
