//! The `capture-kiosk` command line: argument parsing and what each subcommand prints.
//! Terminal output is for people (progress bars, tables); `--json` and non-terminal output
//! are for scripts.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::capture;
use crate::clock::{Clock as _, SystemClock};
use crate::config::{self, ByteSize, Config};
use crate::credentials::load_secret;
use crate::demo::{self, DemoOptions};
use crate::imaging;
use crate::inspection::{self, InspectionError, Progress, Request, Rig, Settings};
use crate::standin::{StandIn, StandInConfig, StandInTls};
use crate::store::{
    AngleQuality, InspectionId, InspectionState, InspectionSummary, PrunedRecord, Store, StoreError,
    UploadState,
};
use crate::upload::{drain, Event};
use crate::vehicle::{CaseId, PhotoLabel, Vehicle, Vin};

/// Where the configuration is read from when `--config` is not given: where the package puts
/// it and the systemd unit reads it.
pub const DEFAULT_CONFIG: &str = "/etc/capture-kiosk/bay.toml";

/// Exit status of a command that did its work.
pub const EXIT_OK: u8 = 0;
/// Something failed at run time (a camera, the buffer).
pub const EXIT_FAILED: u8 = 1;
/// The configuration or the arguments are wrong: nothing was done.
pub const EXIT_USAGE: u8 = 2;
/// An inspection was stored, but some angles failed.
pub const EXIT_PARTIAL: u8 = 3;
/// The buffer refused a new inspection (a cap was reached): nothing was captured.
pub const EXIT_REFUSED: u8 = 4;
/// The images are safe in the buffer but could not reach the cloud yet (offline, clock
/// untrusted, the cloud asking to wait): they will upload when it can be done.
pub const EXIT_BUFFERED: u8 = 5;

#[derive(Debug, Parser)]
#[command(
    name = "capture-kiosk",
    version,
    about = "The brain of an unattended drive-through vehicle inspection bay"
)]
pub struct Cli {
    /// More log output of the kiosk's own (-v: debug, -vv: trace); other crates stay at info.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a configuration file and the buffer it names (a full integrity check and a sha256
    /// of every image, read-only, safe while the daemon runs); exits 0 when the config is valid,
    /// the buffer sound and no salvage of a damaged buffer waits to be acknowledged.
    Check {
        /// The bay's configuration file (TOML, as in bay.example.toml).
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Acknowledge the reports of a buffer salvaged from a damaged file, once what they
        /// list as lost is accounted for; the kiosk leaves its alert.
        #[arg(long)]
        ack_recovery: bool,
    },
    /// Capture one inspection now and store it in the buffer.
    Inspect {
        /// The bay's configuration file (TOML, as in bay.example.toml).
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The integrator's case id (1-64 characters of A-Z a-z 0-9 -).
        #[arg(long)]
        case_id: String,
        /// The vehicle's VIN (17 characters).
        #[arg(long)]
        vin: Option<String>,
        /// Comma-separated angles (default: the config's inspection.angles).
        #[arg(long, value_delimiter = ',')]
        angles: Option<Vec<String>>,
        /// Only capture and buffer; leave the upload to `upload` or the daemon.
        #[arg(long)]
        no_upload: bool,
        /// How long the upload may wait on the cloud (Retry-After, backoff) before giving up
        /// and leaving the images buffered.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        upload_wait: Duration,
    },
    /// Upload what is buffered, oldest first, once, and exit: 0 when the queue is empty,
    /// 5 when images are left buffered (offline, clock untrusted), 3 when the cloud refused some.
    Upload {
        /// The bay's configuration file (TOML, as in bay.example.toml).
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// How long to wait on the cloud (Retry-After, backoff) before leaving the rest buffered.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        max_wait: Duration,
    },
    /// Put an inspection that failed for good (or was cancelled) back in the upload queue, as
    /// the MQTT `retry` command does: `upload` sends it now, a running daemon within a minute.
    Retry {
        /// The bay's configuration file (TOML, as in bay.example.toml).
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The inspection's id, as `queue` lists it.
        #[arg(long, value_name = "ID")]
        inspection: i64,
    },
    /// Show what is buffered, without writing anything (works on a full disk).
    Queue {
        /// The bay's configuration file (TOML, as in bay.example.toml).
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Show the audit trail of what left the buffer (delivered and pruned) instead.
        #[arg(long)]
        history: bool,
    },
    /// Test every configured camera (a test frame from each, its quality scores, a preview with
    /// its privacy masks) and list the V4L2 devices the system offers.
    Cameras {
        /// The bay's configuration file (TOML, as in bay.example.toml).
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Where the previews go, one `CAMERA.jpg` each (default: `previews/` in the state
        /// directory).
        #[arg(long)]
        preview_dir: Option<PathBuf>,
    },
    /// Serve a strict stand-in of the cloud inspection API on 127.0.0.1, for commissioning a bay
    /// and for tests, without billing real sessions.
    Standin {
        /// Port on 127.0.0.1 (0 picks a free one and prints it).
        #[arg(long, default_value_t = 8700)]
        port: u16,
        /// Account name (default: the built-in test account).
        #[arg(long)]
        username: Option<String>,
        /// API key (default: the built-in test account's).
        #[arg(long)]
        api_key: Option<String>,
        /// File holding the API secret, readable only by its owner (default: the test account's).
        #[arg(long)]
        api_secret_file: Option<PathBuf>,
        /// Lifetime of tokens in seconds.
        #[arg(long, default_value_t = 900)]
        token_ttl: u64,
        /// Lifetime of a session in seconds.
        #[arg(long, default_value_t = 3600)]
        session_ttl: u64,
        /// Serve HTTPS with this PEM certificate (chain), for testing `[cloud] ca_file`.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Run the kiosk: take `start` commands over MQTT, capture, upload in the background, report
    /// state; under systemd with `Type=notify`. SIGTERM stops it, SIGHUP reloads the config.
    Run {
        /// The bay's configuration file (TOML, as in bay.example.toml).
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// A simulated drive-through on embedded defaults: no config, no camera, no network.
    Demo {
        /// Frame size of the synthetic cameras.
        #[arg(long, default_value = "4032x3024")]
        frame: String,
        /// Keep the buffer in this directory instead of a temporary one.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Publish status and events to this broker (mqtt://HOST:PORT) under capture-kiosk/demo.
        #[arg(long)]
        mqtt: Option<String>,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Check { config, ack_recovery } => check(&config, ack_recovery),
        Command::Inspect { config, case_id, vin, angles, no_upload, upload_wait } => {
            let upload = (!no_upload).then_some(upload_wait);
            inspect(&config, &case_id, vin.as_deref(), angles.as_deref(), upload)
        }
        Command::Upload { config, max_wait } => upload(&config, max_wait),
        Command::Retry { config, inspection } => retry(&config, InspectionId(inspection)),
        Command::Queue { config, json, history } => queue(&config, json, history),
        Command::Cameras { config, preview_dir } => cameras(&config, preview_dir),
        Command::Standin {
            port,
            username,
            api_key,
            api_secret_file,
            token_ttl,
            session_ttl,
            tls_cert,
            tls_key,
        } => {
            let tls = tls_cert.zip(tls_key).map(|(cert_file, key_file)| StandInTls { cert_file, key_file });
            standin(port, username, api_key, api_secret_file, token_ttl, session_ttl, tls)
        }
        Command::Run { config } => run_daemon(&config),
        Command::Demo { frame, state_dir, mqtt } => run_demo(&frame, state_dir, mqtt),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn load(path: &Path) -> Result<Config, u8> {
    config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        EXIT_USAGE
    })
}

fn check(path: &Path, ack_recovery: bool) -> anyhow::Result<u8> {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    println!(
        "{}: valid: bay {}, {} camera(s), angles {}, buffer in {}",
        path.display(),
        config.bay_id,
        config.cameras.len(),
        config.inspection.angles.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(","),
        config.state_dir.display()
    );
    if let Some(cloud) = &config.cloud {
        // `load` has read the roots already; this only counts them for the installer.
        let mut roots = match cloud.trust {
            config::CloudTrust::Bundled => "the bundled roots".to_owned(),
            config::CloudTrust::System => "the system's roots".to_owned(),
            config::CloudTrust::Both => "the bundled and the system's roots".to_owned(),
        };
        if let Some(ca) = &cloud.ca_file {
            roots.push_str(&format!(" and the certificates of {}", ca.display()));
        }
        if let Ok(n @ 1..) = crate::trust::check(cloud.trust, cloud.ca_file.as_deref()) {
            roots.push_str(&format!(" ({n} in all)"));
        }
        println!("cloud {}: its certificate is checked against {roots}", cloud.base_url);
    }
    if config.display.enabled {
        let token = match &config.display.token_file {
            Some(file) => format!("the token in {}", file.display()),
            None => format!(
                "the token in the systemd credential {} or else {}",
                crate::display::TOKEN_CREDENTIAL,
                config.state_dir.join(crate::display::TOKEN_FILE).display()
            ),
        };
        println!(
            "display http://{}/: the driver's screen; /cameras: the camera page ({token})",
            config.display.listen
        );
    }
    let buffer = crate::store::check_buffer(&config.state_dir)
        .with_context(|| format!("the buffer in {} cannot be checked", config.state_dir.display()))?;
    if !buffer.exists {
        println!("buffer {}: none yet; it is created at the first start", buffer.path.display());
        return Ok(EXIT_OK);
    }
    if !buffer.problems.is_empty() {
        eprintln!(
            "error: buffer {} is damaged: {}; nothing was changed; the next start of capture-kiosk \
             salvages what it still holds into a fresh buffer and keeps the damaged file aside",
            buffer.path.display(),
            buffer.problems.iter().take(10).cloned().collect::<Vec<_>>().join("; ")
        );
        return Ok(EXIT_FAILED);
    }
    println!(
        "buffer {}: sound (integrity_check ok, {} image(s) match their sha256)",
        buffer.path.display(),
        buffer.images_checked
    );
    if buffer.unacknowledged.is_empty() {
        return Ok(EXIT_OK);
    }
    if ack_recovery {
        let done = crate::store::acknowledge_recoveries(&config.state_dir, SystemTime::now())
            .context("the salvage reports cannot be acknowledged")?;
        for r in &done {
            println!("acknowledged: {}", r.summary());
        }
        return Ok(EXIT_OK);
    }
    eprint!("{}", recovery_banner(&buffer.unacknowledged, path));
    eprintln!("error: the buffer was salvaged from a damaged file and the report is not acknowledged");
    Ok(EXIT_FAILED)
}

/// The lines `queue` and `check` show while a salvage report is not acknowledged.
fn recovery_banner(records: &[crate::store::RecoveryRecord], config: &Path) -> String {
    let mut out = String::new();
    for r in records {
        out.push_str(&format!(
            "!!! BUFFER SALVAGED FROM A DAMAGED FILE at {}: {} inspection(s), {} image(s) recovered; \
             check what was lost !!!\n",
            crate::clock::rfc3339_seconds(r.at),
            r.report.inspections_recovered,
            r.report.images_recovered
        ));
        for line in r.details() {
            out.push_str(&format!("!!!   {line}\n"));
        }
    }
    out.push_str(&format!(
        "!!! once the lost evidence is accounted for: capture-kiosk check --config {} --ack-recovery\n",
        config.display()
    ));
    out
}

fn open_store(config: &Config) -> anyhow::Result<Store> {
    let store = Store::open(&config.state_dir, config.buffer.caps, SystemTime::now())
        .with_context(|| format!("the buffer in {} cannot be opened", config.state_dir.display()))?;
    if let Some(retention) = config.buffer.completed_retention {
        let mut store = store;
        if let Some(cutoff) = SystemTime::now().checked_sub(retention) {
            store.prune_completed(cutoff).context("pruning completed inspections failed")?;
        }
        return Ok(store);
    }
    Ok(store)
}

fn inspect(
    path: &Path,
    case_id: &str,
    vin: Option<&str>,
    angles: Option<&[String]>,
    upload_wait: Option<Duration>,
) -> anyhow::Result<u8> {
    // Everything the operator typed is checked before a camera is touched.
    let case_id = match CaseId::parse(case_id) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    let vehicle = match vin.map(Vin::parse).transpose() {
        Ok(v) => v.map(Vehicle::with_vin),
        Err(e) => return usage(e),
    };
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let angles = match angles {
        None => config.inspection.angles.clone(),
        Some(names) => match names.iter().map(|n| PhotoLabel::parse(n)).collect::<Result<Vec<_>, _>>() {
            Ok(a) => a,
            Err(e) => return usage(e),
        },
    };
    let store = Mutex::new(open_store(&config)?);
    let mut rig = Rig::open(&config).context("a camera cannot be opened")?;
    let settings = Settings { capture_attempts: config.inspection.capture_attempts, resize: config.imaging };
    let request = Request { case_id, vehicle, angles };
    // Knows which cameras are offline before it starts (see inspection.refuse_when_camera_offline).
    rig.probe_due(SystemClock::new().monotonic());
    let mut display = ProgressDisplay::new(&request.angles, &rig);
    let cancel = AtomicBool::new(false);
    let outcome =
        inspection::run(&mut rig, &store, &request, &settings, &SystemClock::new(), &cancel, &mut |p| {
            display.show(p)
        });
    display.finish();
    let outcome = match outcome {
        Ok(o) => o,
        Err(InspectionError::Store(e @ (StoreError::Full { .. } | StoreError::DiskFull { .. }))) => {
            eprintln!("error: inspection refused: {e}");
            return Ok(EXIT_REFUSED);
        }
        Err(
            e @ (InspectionError::NotCovered(_) | InspectionError::Duplicate(_) | InspectionError::NoAngles),
        ) => return usage(e),
        Err(e) => return Err(e.into()),
    };
    println!(
        "inspection {} ({}): {} of {} angles stored, {} in the buffer, state {:?}, trigger to durable {:.2} s",
        outcome.inspection_id,
        request.case_id,
        outcome.captured.len(),
        request.angles.len(),
        ByteSize(outcome.stored_bytes),
        outcome.state,
        outcome.trigger_to_durable.as_secs_f64()
    );
    for (angle, reason) in &outcome.failed {
        println!("  failed {angle}: {reason}");
    }
    for (angle, reason) in &outcome.poor {
        println!("  stored below the quality thresholds {angle}: {reason}");
    }
    let captured = if outcome.disk_full {
        eprintln!(
            "error: the disk filled up during the capture; the angles above that say so were not stored"
        );
        EXIT_REFUSED
    } else if outcome.failed.is_empty() {
        EXIT_OK
    } else {
        EXIT_PARTIAL
    };
    if outcome.captured.is_empty() {
        return Ok(if outcome.disk_full { EXIT_REFUSED } else { EXIT_FAILED });
    }
    let (Some(cloud), Some(budget)) = (&config.cloud, upload_wait) else {
        if upload_wait.is_some() {
            println!("capture only: the config has no [cloud] section; the images stay buffered");
        }
        return Ok(captured);
    };
    let mut store = store.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
    let code = upload_until(&mut store, cloud, budget, Some(outcome.inspection_id))?;
    // A full disk outranks what the upload says: a person must act on it.
    Ok(if code == EXIT_OK || captured == EXIT_REFUSED { captured } else { code })
}

fn upload(path: &Path, max_wait: Duration) -> anyhow::Result<u8> {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let Some(cloud) = &config.cloud else {
        return usage(format!(
            "{}: no [cloud] section, so there is nowhere to upload to; add one (see README.md)",
            path.display()
        ));
    };
    let mut store = open_store(&config)?;
    upload_until(&mut store, cloud, max_wait, None)
}

/// What `queue` shows as alerts: salvages not acknowledged, inspections failed for good.
fn queue_alerts(
    list: &[InspectionSummary],
    recoveries: &[crate::store::RecoveryRecord],
    clock: Option<crate::upload::clock_note::ClockNote>,
) -> Vec<crate::status::Alert> {
    use crate::status::{Alert, AlertKind};
    let mut alerts: Vec<Alert> = recoveries
        .iter()
        .filter(|r| !r.acknowledged())
        .map(|r| Alert { kind: AlertKind::BufferRecovered, reason: r.summary() })
        .collect();
    // One that holds no image (a capture cut short before its first frame) has nothing to send.
    let failed: Vec<String> = list
        .iter()
        .filter(|i| i.state == InspectionState::Failed && i.images > 0)
        .map(|i| i.id.0.to_string())
        .collect();
    alerts.extend(clock.and_then(|note| note.alert()));
    if !failed.is_empty() {
        alerts.push(Alert {
            kind: AlertKind::InspectionFailed,
            reason: format!(
                "{} inspection(s) failed for good ({}); see the note below for why, then `capture-kiosk retry --inspection ID`",
                failed.len(),
                failed.join(", ")
            ),
        });
    }
    alerts
}

/// An operator's retry: a failed or cancelled inspection goes back to the upload queue.
fn retry(path: &Path, id: InspectionId) -> anyhow::Result<u8> {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let mut store = open_store(&config)?;
    let case_id = store.inspection(id).ok().flatten().map(|i| i.case_id).unwrap_or_default();
    match store.retry(id, SystemTime::now()) {
        Ok(from) => {
            println!(
                "inspection {id} (case {case_id}) was {from}; it is queued for upload again: `capture-kiosk upload` sends it now, a running daemon within a minute"
            );
            Ok(EXIT_OK)
        }
        Err(StoreError::UnknownInspection { .. }) => {
            eprintln!("there is no inspection {id} in the buffer; `capture-kiosk queue` lists them");
            Ok(EXIT_USAGE)
        }
        Err(StoreError::IllegalTransition { from, .. }) => {
            eprintln!(
                "inspection {id} (case {case_id}) is {from}; only a failed or cancelled inspection can be retried"
            );
            Ok(EXIT_USAGE)
        }
        Err(e) => Err(anyhow::anyhow!(e).context(format!("inspection {id} could not be queued again"))),
    }
}

/// Drains the queue and reports; with `focus`, the exit status is that inspection's fate.
fn upload_until(
    store: &mut Store,
    cloud: &config::CloudConfig,
    budget: Duration,
    focus: Option<InspectionId>,
) -> anyhow::Result<u8> {
    let clock: Arc<dyn crate::clock::Clock> = Arc::new(SystemClock::new());
    let mut uploader = match drain::uploader(cloud, clock) {
        Ok(u) => u,
        Err(e) => return usage(e),
    };
    let waiting = store.totals()?.awaiting_upload;
    eprintln!("uploading {waiting} inspection(s) to {}", cloud.base_url);
    let started = std::time::Instant::now();
    let mut display = UploadDisplay::new();
    let drained =
        drain::drain(&mut uploader, store, budget, &mut std::thread::sleep, &mut |e| display.show(e));
    display.finish();
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "uploaded {} inspection(s), {} in {:.2} s; {} refused by the cloud",
        drained.completed.len(),
        ByteSize(drained.bytes_sent),
        elapsed,
        drained.failed.len()
    );
    for (id, reason) in &drained.failed {
        println!("  inspection {id} failed: {reason}");
    }
    let left = store.totals()?.awaiting_upload;
    let buffered = |why: Option<&String>| {
        println!(
            "buffered, will upload when online: {}",
            why.map(String::as_str).unwrap_or("the cloud could not be reached")
        );
        EXIT_BUFFERED
    };
    Ok(match focus {
        Some(id) => match store.inspection(id)?.map(|i| i.state) {
            Some(InspectionState::Completed) => EXIT_OK,
            Some(InspectionState::Failed) => EXIT_FAILED,
            _ => buffered(drained.stopped.as_ref()),
        },
        None if left > 0 => buffered(drained.stopped.as_ref()),
        None if !drained.failed.is_empty() => EXIT_PARTIAL,
        None => EXIT_OK,
    })
}

fn usage(e: impl std::fmt::Display) -> anyhow::Result<u8> {
    eprintln!("error: {e}");
    Ok(EXIT_USAGE)
}

fn queue(path: &Path, json: bool, history: bool) -> anyhow::Result<u8> {
    // Read-only from the config on: no state directory is made and nothing is written, so that
    // `queue` answers on a full disk or a read-only file system.
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            let e =
                config::ConfigError::Unreadable { path: path.display().to_string(), reason: e.to_string() };
            return usage(e);
        }
    };
    let config = match config::parse(&text, &path.display().to_string()) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    let view = Store::read_only(&config.state_dir, config.buffer.caps, |store| {
        Ok(QueueView {
            list: if history { Vec::new() } else { store.list()? },
            totals: Some(store.totals()?),
            uploads: if history { HashMap::new() } else { store.upload_states()? },
            history: if history { store.pruned_history()? } else { Vec::new() },
            recoveries: store.recoveries()?,
            qualities: if history { HashMap::new() } else { store.image_qualities()? },
        })
    })
    .with_context(|| format!("the buffer in {} cannot be read", config.state_dir.display()))?
    .unwrap_or_default();
    if history {
        print_history(&config, &view, json)?;
        return Ok(EXIT_OK);
    }
    let QueueView { list, totals, uploads, recoveries, mut qualities, .. } = view;
    let totals = totals.unwrap_or(crate::store::Totals {
        inspections: 0,
        images: 0,
        bytes: 0,
        awaiting_upload: 0,
        oldest_created_at: None,
    });
    let now = SystemTime::now();
    let oldest_pending = totals.oldest_created_at.map(|o| age(now, o));
    let alerts = queue_alerts(&list, &recoveries, crate::upload::clock_note::read(&config.state_dir));
    if json {
        let inspections: Vec<serde_json::Value> = list
            .iter()
            .map(|i| {
                let mut v = serde_json::to_value(i).unwrap_or_default();
                v["age_s"] = serde_json::json!(age(now, i.created_at).as_secs());
                v["created_at"] = serde_json::json!(crate::clock::rfc3339_seconds(i.created_at));
                v["upload"] =
                    serde_json::to_value(uploads.get(&i.id).cloned().unwrap_or_default()).unwrap_or_default();
                // Kept on the bay: the cloud contract has no place for the scores.
                v["image_quality"] =
                    serde_json::to_value(qualities.remove(&i.id).unwrap_or_default()).unwrap_or_default();
                v
            })
            .collect();
        let recoveries: Vec<serde_json::Value> = recoveries.iter().map(|r| r.to_json()).collect();
        let alerts: Vec<serde_json::Value> =
            alerts.iter().map(|a| serde_json::json!({"type": a.kind, "reason": a.reason})).collect();
        let out = serde_json::json!({ "bay_id": config.bay_id, "inspections": inspections, "totals": totals,
            "oldest_pending_age_s": oldest_pending.map(|a| a.as_secs()), "alerts": alerts,
            "recoveries": recoveries });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(EXIT_OK);
    }
    let open: Vec<_> = recoveries.into_iter().filter(|r| !r.acknowledged()).collect();
    if !open.is_empty() {
        print!("{}", recovery_banner(&open, path));
    }
    for alert in alerts.iter().filter(|a| a.kind != crate::status::AlertKind::BufferRecovered) {
        println!("alert: {}", alert.reason);
    }
    match oldest_pending {
        Some(a) => println!("oldest inspection not yet in the cloud: {} old", short_age(a)),
        None => println!("every inspection in the buffer is in the cloud"),
    }
    println!(
        "{:>6}  {:<20} {:<10} {:>6} {:>10} {:>8} {:>8}  note",
        "id", "case_id", "state", "images", "bytes", "age", "attempts"
    );
    for i in &list {
        let upload = uploads.get(&i.id).cloned().unwrap_or_default();
        println!(
            "{:>6}  {:<20} {:<10} {:>6} {:>10} {:>8} {:>8}  {}",
            i.id.0,
            i.case_id,
            format!("{:?}", i.state).to_lowercase(),
            i.images,
            ByteSize(i.bytes).to_string(),
            short_age(age(now, i.created_at)),
            upload.attempts,
            note(i, &upload, qualities.get(&i.id).map(Vec::as_slice).unwrap_or_default())
        );
    }
    println!(
        "total: {} inspection(s), {} image(s), {}; {} awaiting upload",
        totals.inspections,
        totals.images,
        ByteSize(totals.bytes),
        totals.awaiting_upload
    );
    Ok(EXIT_OK)
}

/// What `queue` read from the buffer in one go.
#[derive(Default)]
struct QueueView {
    list: Vec<InspectionSummary>,
    totals: Option<crate::store::Totals>,
    uploads: HashMap<InspectionId, UploadState>,
    history: Vec<PrunedRecord>,
    recoveries: Vec<crate::store::RecoveryRecord>,
    qualities: HashMap<InspectionId, Vec<AngleQuality>>,
}

/// `queue --history`: what left the buffer, oldest first.
fn print_history(config: &Config, view: &QueueView, json: bool) -> anyhow::Result<()> {
    if json {
        let pruned: Vec<serde_json::Value> = view
            .history
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(p).unwrap_or_default();
                v["completed_at"] = serde_json::json!(crate::clock::rfc3339_seconds(p.completed_at));
                v
            })
            .collect();
        let out = serde_json::json!({ "bay_id": config.bay_id, "pruned": pruned });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:>6}  {:>6}  {:<20} {:<10} {:<20} {:>6} {:>10}  {:<9}  {:<24} images sha256",
        "seq", "id", "case_id", "state", "completed_at", "images", "bytes", "rule", "session"
    );
    for p in &view.history {
        println!(
            "{:>6}  {:>6}  {:<20} {:<10} {:<20} {:>6} {:>10}  {:<9}  {:<24} {}",
            p.seq,
            p.inspection_id.0,
            p.case_id,
            p.state.as_str(),
            crate::clock::rfc3339_seconds(p.completed_at),
            p.images,
            ByteSize(p.bytes).to_string(),
            p.rule.as_str(),
            p.session.as_deref().unwrap_or("-"),
            p.images_sha256
        );
    }
    println!(
        "{} inspection(s) left the buffer (the last {} are kept)",
        view.history.len(),
        crate::store::PRUNED_HISTORY
    );
    Ok(())
}

fn note(i: &InspectionSummary, upload: &UploadState, qualities: &[AngleQuality]) -> String {
    let mut parts = Vec::new();
    if let Some(r) = &i.reason {
        parts.push(r.clone());
    }
    if matches!(i.state, InspectionState::Captured | InspectionState::Uploading) {
        if let Some(session) = &upload.session {
            parts.push(format!("session {session} holds {} of {} image(s)", upload.sent, i.images));
        }
        if let Some(e) = &upload.last_error {
            parts.push(format!("last upload error: {e}"));
        }
        if upload.moved_behind > 0 {
            parts.push(format!(
                "moved behind the others {} time(s), each after {} failed tries in a row",
                upload.moved_behind,
                crate::store::MOVE_BEHIND_AFTER
            ));
        }
    }
    for (angle, reason) in &i.failed_angles {
        parts.push(format!("{angle} failed: {reason}"));
    }
    for q in qualities {
        if let Some(reason) = &q.quality.poor {
            parts.push(format!("{} poor: {reason}", q.angle));
        }
    }
    parts.join("; ")
}

fn age(now: SystemTime, then: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or_default()
}

fn short_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn cameras(path: &Path, preview_dir: Option<PathBuf>) -> anyhow::Result<u8> {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let preview_dir = preview_dir.unwrap_or_else(|| config.state_dir.join("previews"));
    let clock = SystemClock::new();
    let mut all_ok = true;
    let mut rig = Rig::open(&config).context("a camera cannot be opened")?;
    // Every camera is due at the first check: this is the daemon's idle health check, once.
    rig.probe_due(clock.monotonic());
    let health = rig.monitor().snapshot(clock.monotonic());
    for c in &config.cameras {
        let angles: Vec<&str> = c.angles.iter().map(|a| a.as_str()).collect();
        let h = health.iter().find(|h| h.camera == c.id);
        let mut details = Vec::new();
        let status = match h {
            Some(h) if h.status == capture::health::Status::Online => {
                // Online: one full frame shows what the camera really delivers.
                match capture::open(c).and_then(|mut cam| cam.capture(c.angles[0])) {
                    Ok(frame) => match imaging::check_complete(&frame) {
                        Ok(hd) => {
                            details = test_frame_details(c, &frame, &config.imaging, &preview_dir);
                            format!(
                                "online, test frame {}x{} ({})",
                                hd.width,
                                hd.height,
                                ByteSize(frame.len() as u64)
                            )
                        }
                        Err(e) => {
                            all_ok = false;
                            format!("online, but its frame is bad: {e}")
                        }
                    },
                    Err(e) => {
                        all_ok = false;
                        format!("online, but the test frame failed: {e}")
                    }
                }
            }
            Some(h) => {
                all_ok = false;
                format!("OFFLINE: {}", h.reason.as_deref().unwrap_or("not reachable"))
            }
            None => {
                all_ok = false;
                "not checked".to_owned()
            }
        };
        println!("{:<12} {:<40} [{}] {status}", c.id, c.source.to_string(), angles.join(","));
        for line in details {
            println!("{:<12} {line}", "");
        }
    }
    match capture::list_devices() {
        Ok(devices) if devices.is_empty() => println!("V4L2 devices on this system: none"),
        Ok(devices) => {
            println!("V4L2 devices on this system:");
            for d in devices {
                println!("  v4l2:{}  {}  {}", d.index, d.name, d.description);
                for m in &d.modes {
                    println!("      {m}");
                }
            }
        }
        Err(e) => println!("V4L2 devices on this system: cannot be listed: {e}"),
    }
    Ok(if all_ok { EXIT_OK } else { EXIT_FAILED })
}

/// What the `cameras` command says about a camera's test frame: its quality scores against the
/// camera's thresholds, its masks, and where the preview (the stored image with the masks
/// outlined and a grid every tenth) was written.
fn test_frame_details(
    camera: &config::CameraConfig,
    frame: &[u8],
    resize: &imaging::ResizeSpec,
    preview_dir: &Path,
) -> Vec<String> {
    let rules = camera.imaging();
    let (processed, preview) = match imaging::preview(frame, resize, &rules) {
        Ok(done) => done,
        Err(e) => return vec![format!("the test frame cannot be processed: {e}")],
    };
    let (s, t) = (processed.quality.scores, rules.quality);
    let verdict = match processed.quality.reason() {
        None => "passes".to_owned(),
        Some(reason) => format!("POOR, would be captured again: {reason}"),
    };
    let mut lines = vec![format!(
        "quality: sharpness {:.1} (min {}), mean luma {:.0} ({}-{}), crushed to black {:.1} % (max {:.1} %), \
         blown out {:.1} % (max {:.1} %), glare {:.1} % (max {:.1} %): {verdict}",
        s.sharpness,
        t.min_sharpness,
        s.mean_luma,
        t.min_mean_luma,
        t.max_mean_luma,
        s.dark_clipped * 100.0,
        t.max_dark_clipped * 100.0,
        s.bright_clipped * 100.0,
        t.max_bright_clipped * 100.0,
        s.glare * 100.0,
        t.max_glare * 100.0,
    )];
    for (i, mask) in rules.masks.iter().enumerate() {
        lines.push(format!(
            "mask {}{}: {}, {} points, {:.1} % of the picture, outlined in {}",
            i + 1,
            mask.name().map(|n| format!(" {n:?}")).unwrap_or_default(),
            mask.fill().as_str(),
            mask.polygon().len(),
            mask.area() * 100.0,
            imaging::mask::outline_colour_name(i),
        ));
    }
    let file = preview_dir.join(format!("{}.jpg", camera.id));
    match write_file(&file, &preview) {
        Ok(()) => lines.push(format!(
            "preview: {} ({}x{}, as stored, masks outlined, dotted grid every 0.1)",
            file.display(),
            processed.width,
            processed.height
        )),
        Err(e) => lines.push(format!("preview not written to {}: {e}", file.display())),
    }
    lines
}

/// Writes `bytes` to `path` whole or not at all (a page may be serving the old file).
fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = path.with_extension("jpg.partial");
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path)
}

fn standin(
    port: u16,
    username: Option<String>,
    api_key: Option<String>,
    api_secret_file: Option<PathBuf>,
    token_ttl: u64,
    session_ttl: u64,
    tls: Option<StandInTls>,
) -> anyhow::Result<u8> {
    let mut config = StandInConfig::default();
    let builtin_secret = api_secret_file.is_none();
    if let Some(file) = api_secret_file {
        match load_secret(Some(&file), None) {
            Ok(secret) => config.api_secret = secret.expose().to_owned(),
            Err(e) => return usage(e),
        }
    }
    config.username = username.unwrap_or(config.username);
    config.api_key = api_key.unwrap_or(config.api_key);
    config.token_ttl = Duration::from_secs(token_ttl.max(1));
    config.session_ttl = Duration::from_secs(session_ttl.max(1));
    config.port = port;
    config.tls = tls;
    let standin = StandIn::start(config, Arc::new(SystemClock::new()))
        .with_context(|| format!("the stand-in cannot listen on 127.0.0.1:{port}"))?;
    println!("stand-in cloud API listening on {}", standin.base_url());
    println!("account: username {:?}, api_key {:?}", standin.config().username, standin.config().api_key);
    if builtin_secret {
        println!(
            "secret: the built-in test account's (see README.md); pass --api-secret-file to use your own"
        );
    }
    println!("tokens live {token_ttl} s, sessions {session_ttl} s; stop with Ctrl-C");
    standin.wait().context("the stand-in stopped")?;
    Ok(EXIT_OK)
}

fn run_daemon(path: &Path) -> anyhow::Result<u8> {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let rig = Rig::open(&config).context("a camera of the config cannot be opened")?;
    let clock: Arc<dyn crate::clock::Clock> = Arc::new(SystemClock::new());
    let upload: Box<dyn crate::daemon::UploadLeg> =
        match crate::daemon::CloudLeg::open(&config, clock.clone()).context("the upload leg cannot start")? {
            Some(leg) => Box::new(leg),
            None => Box::new(crate::daemon::CaptureOnly::default()),
        };
    let deps = crate::daemon::Deps {
        clock,
        rig,
        upload,
        notifier: crate::daemon::Notifier::from_env(),
        watchdog: crate::daemon::notify::watchdog_from_env(),
        config_path: Some(path.to_owned()),
        hooks: crate::daemon::Hooks::default(),
    };
    // Installed before READY=1 goes out, so that a stop asked for right after it is not lost;
    // signals that come during the start wait in `signals` until the daemon can take them.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .context("signal handlers cannot be installed")?;
    let daemon = crate::daemon::start(config, deps)?;
    let events = daemon.sender();
    std::thread::Builder::new().name("signals".to_owned()).spawn(move || {
        for signal in signals.forever() {
            let signal = match signal {
                signal_hook::consts::SIGHUP => crate::daemon::Signal::Reload,
                _ => crate::daemon::Signal::Terminate,
            };
            if events.send(crate::daemon::Event::Signal(signal)).is_err() {
                return;
            }
        }
    })?;
    daemon.wait()?;
    Ok(EXIT_OK)
}

fn run_demo(frame: &str, state_dir: Option<PathBuf>, mqtt: Option<String>) -> anyhow::Result<u8> {
    let (width, height) = match capture::CameraSource::parse(&format!("synthetic:{frame}")) {
        Ok(capture::CameraSource::Synthetic { width, height }) => (width, height),
        _ => {
            return usage(format!(
                "--frame {frame:?} is not a size like 4032x3024 (16 to 16384 pixels a side)"
            ))
        }
    };
    let report = demo::run(&DemoOptions { width, height, state_dir, mqtt }, &mut |line| println!("{line}"))?;
    Ok(match (&report.upload, report.outcome.failed.is_empty()) {
        (Err(_), _) => EXIT_BUFFERED,
        (Ok(_), true) => EXIT_OK,
        (Ok(_), false) => EXIT_PARTIAL,
    })
}

/// A bar per angle on a terminal; one plain line per event otherwise.
struct ProgressDisplay {
    bars: Option<(indicatif::MultiProgress, Vec<(PhotoLabel, indicatif::ProgressBar)>)>,
}

impl ProgressDisplay {
    fn new(angles: &[PhotoLabel], rig: &Rig) -> ProgressDisplay {
        if !std::io::stderr().is_terminal() {
            return ProgressDisplay { bars: None };
        }
        let multi = indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr());
        let style = indicatif::ProgressStyle::with_template("{spinner} {prefix:<12} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
        let bars = angles
            .iter()
            .map(|a| {
                let bar = multi.add(indicatif::ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_prefix(a.as_str());
                bar.set_message(format!("waiting for camera {}", rig.camera_for(*a).unwrap_or("?")));
                bar.enable_steady_tick(Duration::from_millis(120));
                (*a, bar)
            })
            .collect();
        ProgressDisplay { bars: Some((multi, bars)) }
    }

    fn show(&mut self, p: &Progress) {
        let Some((_, bars)) = &self.bars else {
            match p {
                Progress::Started { inspection_id, angles } => {
                    eprintln!("inspection {inspection_id} started: {} angle(s)", angles.len())
                }
                Progress::Retrying { angle, camera, attempt, reason } => {
                    eprintln!("angle={angle} camera={camera} attempt={attempt} retrying: {reason}")
                }
                Progress::Captured { angle, camera, bytes, width, height, .. } => {
                    eprintln!("angle={angle} camera={camera} stored {width}x{height} {bytes} bytes")
                }
                Progress::Failed { angle, camera, reason } => {
                    eprintln!("angle={angle} camera={camera} FAILED: {reason}")
                }
            }
            return;
        };
        let bar = |angle: &PhotoLabel| bars.iter().find(|(a, _)| a == angle).map(|(_, b)| b);
        match p {
            Progress::Started { .. } => {}
            Progress::Retrying { angle, attempt, reason, .. } => {
                if let Some(b) = bar(angle) {
                    b.set_message(format!("attempt {attempt} ({reason})"));
                }
            }
            Progress::Captured { angle, width, height, bytes, .. } => {
                if let Some(b) = bar(angle) {
                    b.finish_with_message(format!("stored {width}x{height} {}", ByteSize(*bytes)));
                }
            }
            Progress::Failed { angle, reason, .. } => {
                if let Some(b) = bar(angle) {
                    b.finish_with_message(format!("FAILED: {reason}"));
                }
            }
        }
    }

    fn finish(&mut self) {
        if let Some((_, bars)) = &self.bars {
            for (_, b) in bars {
                if !b.is_finished() {
                    b.finish();
                }
            }
        }
    }
}

/// One line per request on a non-terminal; a byte bar on a terminal.
struct UploadDisplay {
    bar: Option<indicatif::ProgressBar>,
}

impl UploadDisplay {
    fn new() -> UploadDisplay {
        if !std::io::stderr().is_terminal() {
            return UploadDisplay { bar: None };
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} upload {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        UploadDisplay { bar: Some(bar) }
    }

    fn show(&mut self, e: &Event) {
        let line = match e {
            Event::Started { id, case_id } => format!("inspection {id} ({case_id}): started"),
            Event::Sent { id, labels, bytes, .. } => {
                let names: Vec<&str> = labels.iter().map(|l| l.as_str()).collect();
                format!("inspection {id}: sent {} ({})", names.join(","), ByteSize(*bytes))
            }
            Event::Uploaded { id, case_id, session, images, bytes } => format!(
                "inspection {id} ({case_id}): completed at the cloud, session {session}, {images} image(s), {}",
                ByteSize(*bytes)
            ),
            Event::Failed { id, case_id, reason } => format!("inspection {id} ({case_id}): FAILED: {reason}"),
            Event::SessionGivenUp { id, session, why, .. } => {
                format!("inspection {id}: session {session} given up ({why}); every image goes again")
            }
            Event::Link(link) => match &link.last_error {
                Some(e) => format!("waiting: {e}"),
                None => "cloud reachable".to_owned(),
            },
        };
        match &self.bar {
            Some(bar) => bar.set_message(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
