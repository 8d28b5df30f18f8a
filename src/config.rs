//! The bay's configuration: one TOML file read into a serde `RawConfig` (unknown keys refused),
//! then checked into a [`Config`] whose values cannot be wrong. Every refusal names the key,
//! the problem and the fix.
//!
//! Each section has its check (`check_bay`, `check_inspection`, `check_imaging`,
//! `check_buffer`, `check_cameras`, `check_cloud`, `check_mqtt`); the value syntaxes and the one
//! range check they share are in [`crate::setting`], and a camera's own keys are checked by
//! [`crate::capture::config`]. `load` then reads the files the configuration names (secrets,
//! CA files) through [`crate::credentials`] and [`crate::trust`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::capture::config::RawCamera;
use crate::credentials::{self, CredentialError, Secret};
use crate::display::{DisplayConfig, RawDisplay};
use crate::imaging::ResizeSpec;
use crate::setting::{self, in_range, invalid, Invalid};
use crate::store::Caps;
use crate::vehicle::PhotoLabel;

pub use crate::capture::CameraConfig;
pub use crate::setting::ByteSize;
pub use crate::trust::CloudTrust;

/// A configuration that passed every check.
#[derive(Debug, Clone)]
pub struct Config {
    pub bay_id: String,
    pub state_dir: PathBuf,
    pub inspection: InspectionConfig,
    pub imaging: ResizeSpec,
    /// `[imaging] workers`: frames decoded, resized and encoded at once (the rest wait, in the
    /// order they arrived).
    pub imaging_workers: usize,
    pub buffer: BufferConfig,
    pub cameras: Vec<CameraConfig>,
    /// The cloud inspection API; `None` captures and buffers only.
    pub cloud: Option<CloudConfig>,
    /// The MQTT broker for status and commands; `None` runs without one.
    pub mqtt: Option<MqttConfig>,
    /// `[display]`: the driver's screen and the installer's camera page.
    pub display: DisplayConfig,
}

impl MqttConfig {
    /// The settings for a broker named only by its URL (the demo's `--mqtt`), with defaults for
    /// the rest.
    pub fn from_url(url: &str) -> Result<MqttConfig, ConfigError> {
        let raw = RawMqtt {
            url: url.to_owned(),
            topic_prefix: default_topic_prefix(),
            username: None,
            password_file: None,
            ca_file: None,
            client_id: None,
            client_cert_file: None,
            client_key_file: None,
            heartbeat: default_heartbeat(),
            home_assistant: false,
            discovery_prefix: default_discovery_prefix(),
        };
        check_mqtt(raw).map_err(|i| refused("--mqtt", i))
    }
}

/// `[mqtt]`: the broker that carries the bay's status and the operator's commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttConfig {
    /// `mqtts` (TLS) or plain `mqtt`.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Topics live under `{topic_prefix}/{bay_id}`.
    pub topic_prefix: String,
    pub username: Option<String>,
    /// File holding the password; without it, systemd's `$CREDENTIALS_DIRECTORY/mqtt-password`
    /// is used when present.
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA that signed the broker's certificate (required for `mqtts`).
    pub ca_file: Option<PathBuf>,
    /// The MQTT client id; `None` is `capture-kiosk-{bay_id}` (see [`MqttConfig::client_id`]).
    pub client_id: Option<String>,
    /// PEM certificate (chain) the kiosk shows the broker (mutual TLS), with its key.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`; owner-only permissions required.
    pub client_key_file: Option<PathBuf>,
    /// How often `state` is published when nothing changes.
    pub heartbeat: Duration,
    /// Announce the bay to Home Assistant (MQTT discovery) under `discovery_prefix`.
    pub home_assistant: bool,
    pub discovery_prefix: String,
}

impl MqttConfig {
    /// The client id the bay connects with: stable across restarts, so that the broker keeps
    /// its session (subscriptions and the commands queued while it was away).
    pub fn client_id(&self, bay_id: &str) -> String {
        self.client_id.clone().unwrap_or_else(|| format!("capture-kiosk-{bay_id}"))
    }
}

/// Longest client id accepted (AWS IoT Core's limit; Mosquitto, EMQX and HiveMQ take more).
pub const MAX_MQTT_CLIENT_ID: usize = 128;

/// `[cloud]`: where and as whom the kiosk uploads.
#[derive(Debug, Clone)]
pub struct CloudConfig {
    /// `https://…` (or `http://` for a stand-in on the same machine), without a trailing slash.
    pub base_url: String,
    pub username: String,
    pub api_key: String,
    /// The bay's `client_id` in `/api/authenticate`.
    pub client_id: String,
    /// Where the API secret comes from; read by [`CloudConfig::secret`].
    pub api_secret_file: Option<PathBuf>,
    /// Largest upload request body; images are split over several requests below it.
    pub max_request_bytes: u64,
    /// Deadline for one request, connect to last byte.
    pub request_timeout: Duration,
    /// Refuse to sign while the clock is not known to be right (turn off only on benches).
    pub require_clock_sync: bool,
    /// Which public roots the cloud's certificate may chain to.
    pub trust: CloudTrust,
    /// PEM certificates trusted besides [`CloudConfig::trust`]: a private CA, or the CA of a
    /// TLS-inspecting proxy.
    pub ca_file: Option<PathBuf>,
}

impl CloudConfig {
    /// Loads the API secret: `api_secret_file` (owner-only permissions required), else the
    /// systemd credential `api-secret` in `$CREDENTIALS_DIRECTORY` ([`credentials::load_secret`]).
    pub fn secret(&self) -> Result<Secret, CredentialError> {
        credentials::load_secret(self.api_secret_file.as_deref(), credentials::credentials_dir().as_deref())
    }
}

#[derive(Debug, Clone)]
pub struct InspectionConfig {
    /// The angles an inspection captures when none are named, in order.
    pub angles: Vec<PhotoLabel>,
    /// Captures of one angle before it is marked failed (first try included).
    pub capture_attempts: u32,
    /// Refuse an inspection when a camera it needs is offline, instead of capturing the other
    /// angles and marking the offline camera's angles failed.
    pub refuse_when_camera_offline: bool,
    /// How often idle cameras are checked.
    pub camera_probe_interval: Duration,
    /// Bad frames in a row that take a camera offline.
    pub bad_frames_to_offline: u32,
}

#[derive(Debug, Clone)]
pub struct BufferConfig {
    pub caps: Caps,
    /// Completed (uploaded) inspections older than this are pruned; `None` keeps them forever.
    pub completed_retention: Option<Duration>,
}

impl Config {
    /// The camera that shoots `angle`, if any.
    pub fn camera_for(&self, angle: PhotoLabel) -> Option<&CameraConfig> {
        self.cameras.iter().find(|c| c.angles.contains(&angle))
    }

    /// Every angle some camera can shoot, in camera order.
    pub fn covered_angles(&self) -> Vec<PhotoLabel> {
        self.cameras.iter().flat_map(|c| c.angles.iter().copied()).collect()
    }
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("config {path}: cannot be read: {reason}")]
    Unreadable { path: String, reason: String },
    /// TOML syntax, an unknown key or a value of the wrong type (the TOML parser's own words).
    #[error("config {path}: {message}")]
    Syntax { path: String, message: String },
    /// A key whose value is refused.
    #[error("config {path}: {key}: {problem}; {fix}")]
    Invalid { path: String, key: String, problem: String, fix: String },
}

impl ConfigError {
    /// The key at fault, when one is.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Reads and checks a configuration file; reads the files it names (secrets, CA files), creates
/// `state_dir` if needed and proves it writable.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Unreadable { path: origin.clone(), reason: e.to_string() })?;
    let config = parse(&text, &origin)?;
    check_files(&config).map_err(|i| refused(&origin, i))?;
    Ok(config)
}

/// Parses and checks a configuration without touching the file system; `origin` names the
/// text in messages.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: origin.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    raw.check().map_err(|i| refused(origin, i))
}

/// Creates the state directory if needed and proves the kiosk can write in it.
/// On failure: (what went wrong, what to do).
pub fn prepare_state_dir(dir: &Path) -> Result<(), (String, String)> {
    let fix = "create it and give the kiosk's user write access, or point state_dir at another directory";
    std::fs::create_dir_all(dir)
        .map_err(|e| (format!("{} cannot be created: {e}", dir.display()), fix.to_owned()))?;
    let probe = dir.join(".capture-kiosk-write-test");
    let written = std::fs::write(&probe, b"ok");
    let _ = std::fs::remove_file(&probe);
    match written {
        // A full disk is no permission problem: the buffer refuses new inspections with that
        // reason, and delivering and pruning still work.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => Ok(()),
        Err(e) => Err((format!("{} is not writable: {e}", dir.display()), fix.to_owned())),
        Ok(()) => Ok(()),
    }
}

/// The refusal of a key of the text named `origin`.
fn refused(origin: &str, i: Invalid) -> ConfigError {
    ConfigError::Invalid { path: origin.to_owned(), key: i.key, problem: i.problem, fix: i.fix }
}

/// Reads every file a checked configuration names, in the order a person fixes them: the
/// cloud's secret and roots, the MQTT client key, each camera's files, then the state directory.
fn check_files(config: &Config) -> Result<(), Invalid> {
    if let Some(cloud) = &config.cloud {
        cloud.secret().map_err(|e| {
            invalid("cloud.api_secret_file", e.to_string(), "the kiosk cannot sign requests without it")
        })?;
        crate::trust::check(cloud.trust, cloud.ca_file.as_deref()).map_err(|e| {
            invalid(e.key(), e.to_string(), "the kiosk cannot check the cloud's certificate without it")
        })?;
    }
    if let Some(key) = config.mqtt.as_ref().and_then(|m| m.client_key_file.as_deref()) {
        credentials::load_file(key).map_err(|e| {
            invalid(
                "mqtt.client_key_file",
                e.to_string(),
                "the kiosk cannot show the broker its certificate without it",
            )
        })?;
    }
    if let Some(token) = config.display.token_file.as_deref().filter(|_| config.display.enabled) {
        credentials::load_file(token).map_err(|e| {
            invalid("display.token_file", e.to_string(), "the camera page cannot be opened without it")
        })?;
    }
    for (i, camera) in config.cameras.iter().enumerate() {
        crate::capture::check_files(camera).map_err(|e| {
            invalid(
                format!("cameras[{i}].{}", e.key()),
                e.to_string(),
                "the camera cannot be used without it",
            )
        })?;
    }
    prepare_state_dir(&config.state_dir).map_err(|(problem, fix)| invalid("state_dir", problem, fix))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    bay_id: String,
    state_dir: PathBuf,
    #[serde(default)]
    inspection: RawInspection,
    #[serde(default)]
    imaging: RawImaging,
    #[serde(default)]
    buffer: RawBuffer,
    #[serde(default)]
    cameras: Vec<RawCamera>,
    cloud: Option<RawCloud>,
    mqtt: Option<RawMqtt>,
    #[serde(default)]
    display: RawDisplay,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    url: String,
    #[serde(default = "default_topic_prefix")]
    topic_prefix: String,
    username: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    client_id: Option<String>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    #[serde(default = "default_heartbeat")]
    heartbeat: String,
    #[serde(default)]
    home_assistant: bool,
    #[serde(default = "default_discovery_prefix")]
    discovery_prefix: String,
}

fn default_discovery_prefix() -> String {
    "homeassistant".to_owned()
}

fn default_topic_prefix() -> String {
    "capture-kiosk".to_owned()
}
fn default_heartbeat() -> String {
    "30s".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCloud {
    base_url: String,
    username: String,
    api_key: String,
    client_id: String,
    api_secret_file: Option<PathBuf>,
    #[serde(default = "default_request_bytes")]
    max_request_bytes: String,
    #[serde(default = "default_request_timeout")]
    request_timeout: String,
    #[serde(default = "default_true")]
    require_clock_sync: bool,
    #[serde(default = "default_trust")]
    trust: String,
    ca_file: Option<PathBuf>,
}

fn default_trust() -> String {
    "bundled".to_owned()
}

fn default_request_bytes() -> String {
    "32 MiB".to_owned()
}
fn default_request_timeout() -> String {
    "60s".to_owned()
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInspection {
    #[serde(default = "default_angles")]
    angles: Vec<String>,
    #[serde(default = "default_attempts")]
    capture_attempts: i64,
    #[serde(default)]
    refuse_when_camera_offline: bool,
    #[serde(default = "default_probe_interval")]
    camera_probe_interval: String,
    #[serde(default = "default_bad_frames")]
    bad_frames_to_offline: i64,
}

fn default_probe_interval() -> String {
    "10s".to_owned()
}
fn default_bad_frames() -> i64 {
    3
}

impl Default for RawInspection {
    fn default() -> Self {
        RawInspection {
            angles: default_angles(),
            capture_attempts: default_attempts(),
            refuse_when_camera_offline: false,
            camera_probe_interval: default_probe_interval(),
            bad_frames_to_offline: default_bad_frames(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImaging {
    #[serde(default = "default_long_edge")]
    max_long_edge: i64,
    #[serde(default = "default_quality")]
    jpeg_quality: i64,
    /// Default: one per CPU.
    workers: Option<i64>,
}

impl Default for RawImaging {
    fn default() -> Self {
        RawImaging { max_long_edge: default_long_edge(), jpeg_quality: default_quality(), workers: None }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuffer {
    #[serde(default = "default_max_bytes")]
    max_bytes: String,
    #[serde(default = "default_min_free")]
    min_free_disk: String,
    #[serde(default = "default_retention")]
    completed_retention: String,
}

impl Default for RawBuffer {
    fn default() -> Self {
        RawBuffer {
            max_bytes: default_max_bytes(),
            min_free_disk: default_min_free(),
            completed_retention: default_retention(),
        }
    }
}

fn default_angles() -> Vec<String> {
    PhotoLabel::EXTERIOR.iter().map(|l| l.as_str().to_owned()).collect()
}
fn default_attempts() -> i64 {
    3
}
fn default_long_edge() -> i64 {
    1920
}
fn default_quality() -> i64 {
    85
}
fn default_max_bytes() -> String {
    "8 GiB".to_owned()
}
fn default_min_free() -> String {
    "512 MiB".to_owned()
}
fn default_retention() -> String {
    "7 days".to_owned()
}

impl RawConfig {
    /// Checks section by section, in the order of the file.
    fn check(self) -> Result<Config, Invalid> {
        check_bay(&self.bay_id, &self.state_dir)?;
        let inspection = check_inspection(self.inspection)?;
        let (imaging, imaging_workers) = check_imaging(self.imaging)?;
        let buffer = check_buffer(self.buffer)?;
        let cameras = check_cameras(self.cameras, &inspection.angles)?;
        let cloud = self.cloud.map(check_cloud).transpose()?;
        let mqtt = self.mqtt.map(check_mqtt).transpose()?;
        let display = self.display.check()?;
        Ok(Config {
            bay_id: self.bay_id,
            state_dir: self.state_dir,
            inspection,
            imaging,
            imaging_workers,
            buffer,
            cameras,
            cloud,
            mqtt,
            display,
        })
    }
}

/// `bay_id` and `state_dir`.
fn check_bay(bay_id: &str, state_dir: &Path) -> Result<(), Invalid> {
    if !setting::is_plain_id(bay_id) {
        return Err(invalid(
            "bay_id",
            format!("{bay_id:?} is not a usable bay id (it becomes part of MQTT topics)"),
            "use 1-64 characters of A-Z, a-z, 0-9, '-' and '_', e.g. \"bay-07\"",
        ));
    }
    if state_dir.as_os_str().is_empty() {
        return Err(invalid(
            "state_dir",
            "is empty",
            "set it to a directory, e.g. \"/var/lib/capture-kiosk\"",
        ));
    }
    Ok(())
}

/// `[inspection]`.
fn check_inspection(raw: RawInspection) -> Result<InspectionConfig, Invalid> {
    let angles = setting::labels("inspection.angles", &raw.angles)?;
    if angles.is_empty() {
        return Err(invalid(
            "inspection.angles",
            "is empty",
            "list at least one angle, e.g. [\"Front\", \"Rear\"]",
        ));
    }
    if let Some(dup) = first_duplicate(&angles) {
        return Err(invalid("inspection.angles", format!("lists {dup} twice"), "list each angle once"));
    }
    let capture_attempts = in_range(
        "inspection.capture_attempts",
        raw.capture_attempts,
        1,
        10,
        "use 1 to 10 (3 is a good start)",
    )?;
    let camera_probe_interval = setting::duration_in_range(
        "inspection.camera_probe_interval",
        &raw.camera_probe_interval,
        Duration::from_secs(1),
        Duration::from_secs(3600),
        "use between \"1s\" and \"1h\" (\"10s\" is the default)",
    )?;
    let bad_frames_to_offline = in_range(
        "inspection.bad_frames_to_offline",
        raw.bad_frames_to_offline,
        1,
        100,
        "use 1 to 100 (3 is the default)",
    )?;
    Ok(InspectionConfig {
        angles,
        capture_attempts: capture_attempts as u32,
        refuse_when_camera_offline: raw.refuse_when_camera_offline,
        camera_probe_interval,
        bad_frames_to_offline: bad_frames_to_offline as u32,
    })
}

/// `[imaging]`: the resize and re-encode of every image, and how many frames are developed at
/// once.
fn check_imaging(raw: RawImaging) -> Result<(ResizeSpec, usize), Invalid> {
    let edge = in_range(
        "imaging.max_long_edge",
        raw.max_long_edge,
        64,
        16384,
        "use 64 to 16384 pixels (1920 is usual)",
    )?;
    let quality = in_range("imaging.jpeg_quality", raw.jpeg_quality, 1, 100, "use 1 to 100 (85 is usual)")?;
    let workers = match raw.workers {
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        Some(n) => in_range(
            "imaging.workers",
            n,
            1,
            64,
            "use 1 to 64 (leave it out for one per CPU; each worker holds one decoded frame)",
        )? as usize,
    };
    Ok((ResizeSpec { max_long_edge: edge as u32, jpeg_quality: quality as u8 }, workers))
}

/// `[buffer]`.
fn check_buffer(raw: RawBuffer) -> Result<BufferConfig, Invalid> {
    let max_bytes = in_range(
        "buffer.max_bytes",
        setting::size("buffer.max_bytes", &raw.max_bytes)?,
        ByteSize(1 << 20),
        ByteSize::MAX,
        "use at least \"64 MiB\" (less cannot hold one inspection)",
    )?;
    let min_free_disk = setting::size("buffer.min_free_disk", &raw.min_free_disk)?;
    let retention_text = raw.completed_retention.trim();
    let completed_retention = if retention_text.eq_ignore_ascii_case("forever") {
        None
    } else {
        Some(setting::duration("buffer.completed_retention", retention_text)?)
    };
    Ok(BufferConfig {
        caps: Caps { max_bytes: max_bytes.0, min_free_disk: min_free_disk.0 },
        completed_retention,
    })
}

/// `[[cameras]]`: each camera's own keys ([`RawCamera::check`]), then that every angle the
/// inspection needs (`required`) has a camera.
fn check_cameras(raw: Vec<RawCamera>, required: &[PhotoLabel]) -> Result<Vec<CameraConfig>, Invalid> {
    if raw.is_empty() {
        return Err(invalid(
            "cameras",
            "no camera is configured",
            "add a [[cameras]] table with id, source and angles",
        ));
    }
    let mut cameras = Vec::with_capacity(raw.len());
    for (index, camera) in raw.into_iter().enumerate() {
        let checked = camera.check(&format!("cameras[{index}]"), &cameras)?;
        cameras.push(checked);
    }
    if let Some(missing) = required.iter().find(|a| !cameras.iter().any(|c| c.angles.contains(a))) {
        return Err(invalid(
            "inspection.angles",
            format!("{missing} is required but no camera covers it"),
            format!(
                "add {missing} to the angles of a [[cameras]] entry, or remove it from inspection.angles"
            ),
        ));
    }
    Ok(cameras)
}

/// `[cloud]`.
fn check_cloud(raw: RawCloud) -> Result<CloudConfig, Invalid> {
    let url = raw.base_url.trim().trim_end_matches('/').to_owned();
    let lower = url.to_ascii_lowercase();
    let host = lower.split_once("://").map(|(_, rest)| rest).unwrap_or("");
    if !(lower.starts_with("https://") || lower.starts_with("http://")) || host.is_empty() {
        return Err(invalid(
            "cloud.base_url",
            format!("{url:?} is not an http(s) URL"),
            "write e.g. \"https://api.example.com\"",
        ));
    }
    if url.contains('@') {
        return Err(invalid(
            "cloud.base_url",
            "contains credentials",
            "remove user:password@ from the URL; the account goes in username, api_key and the secret file",
        ));
    }
    for (key, value) in [("cloud.username", &raw.username), ("cloud.api_key", &raw.api_key)] {
        if value.trim().is_empty() || value.chars().any(char::is_control) {
            return Err(invalid(
                key,
                "is empty or has control characters",
                "copy it from the cloud account's settings",
            ));
        }
    }
    let client_ok = !raw.client_id.is_empty()
        && raw.client_id.len() <= 64
        && !raw.client_id.chars().any(char::is_control);
    if !client_ok {
        return Err(invalid(
            "cloud.client_id",
            format!("{:?} is not usable", raw.client_id),
            "use 1-64 printable characters, e.g. \"BAY-07\"",
        ));
    }
    let max_request_bytes = in_range(
        "cloud.max_request_bytes",
        setting::size("cloud.max_request_bytes", &raw.max_request_bytes)?,
        ByteSize(1 << 20),
        ByteSize(64 << 20),
        "use 1 MiB to 64 MiB (the cloud refuses requests over 64 MiB)",
    )?;
    let request_timeout = setting::duration_in_range(
        "cloud.request_timeout",
        &raw.request_timeout,
        Duration::from_secs(1),
        Duration::from_secs(600),
        "use 1s to 10min",
    )?;
    let trust = CloudTrust::parse(&raw.trust).ok_or_else(|| {
        invalid(
            "cloud.trust",
            format!("{:?} is not a trust choice", raw.trust.trim()),
            "write \"bundled\" (the roots built in), \"system\" (the system's store) or \"both\"",
        )
    })?;
    if raw.ca_file.as_deref().is_some_and(|p| p.as_os_str().is_empty()) {
        return Err(invalid(
            "cloud.ca_file",
            "is empty",
            "give the path of a PEM file of CA certificates, or remove the key",
        ));
    }
    Ok(CloudConfig {
        trust,
        ca_file: raw.ca_file,
        base_url: url,
        username: raw.username,
        api_key: raw.api_key,
        client_id: raw.client_id,
        api_secret_file: raw.api_secret_file,
        max_request_bytes: max_request_bytes.0,
        request_timeout,
        require_clock_sync: raw.require_clock_sync,
    })
}

/// `[mqtt]`.
fn check_mqtt(raw: RawMqtt) -> Result<MqttConfig, Invalid> {
    let url = raw.url.trim();
    let url_fix = "write mqtt://HOST[:PORT] or mqtts://HOST[:PORT], e.g. \"mqtt://broker.local:1883\"";
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(invalid("mqtt.url", format!("{url:?} is not an mqtt:// or mqtts:// URL"), url_fix));
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('@') {
        return Err(invalid(
            "mqtt.url",
            "contains credentials",
            "remove user:password@ from the URL; use mqtt.username and mqtt.password_file",
        ));
    }
    if rest.contains(['/', '?', '#']) {
        return Err(invalid("mqtt.url", format!("{url:?} has a path or query"), url_fix));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(port) if port > 0 => (h, port),
            _ => return Err(invalid("mqtt.url", format!("port {p:?} is not a port number"), url_fix)),
        },
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid("mqtt.url", format!("{url:?} names no host"), url_fix));
    }
    let prefix = topic_levels("mqtt.topic_prefix", &raw.topic_prefix, "capture-kiosk")?;
    let discovery_prefix = topic_levels("mqtt.discovery_prefix", &raw.discovery_prefix, "homeassistant")?;
    if tls && raw.ca_file.is_none() {
        return Err(invalid(
            "mqtt.ca_file",
            "mqtts needs the CA that signed the broker's certificate",
            "set ca_file to a PEM file with that CA",
        ));
    }
    if !tls && raw.ca_file.is_some() {
        return Err(invalid(
            "mqtt.ca_file",
            "is only used with mqtts://",
            "remove it or use an mqtts:// URL",
        ));
    }
    if raw.password_file.is_some() && raw.username.is_none() {
        return Err(invalid("mqtt.password_file", "is set without a username", "set mqtt.username too"));
    }
    if let Some(id) = &raw.client_id {
        let ok = !id.is_empty()
            && id.len() <= MAX_MQTT_CLIENT_ID
            && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
        if !ok {
            return Err(invalid(
                "mqtt.client_id",
                format!("{id:?} is not a client id every broker takes"),
                format!("use 1-{MAX_MQTT_CLIENT_ID} of A-Z a-z 0-9 - _ . : (one per bay: a second client with the same id takes the session over), or leave it out for capture-kiosk-{{bay_id}}"),
            ));
        }
    }
    match (&raw.client_cert_file, &raw.client_key_file) {
        (Some(_), None) => {
            return Err(invalid(
                "mqtt.client_key_file",
                "is missing while client_cert_file is set",
                "set it to the PEM private key of the client certificate",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                "mqtt.client_cert_file",
                "is missing while client_key_file is set",
                "set it to the PEM client certificate that goes with the key",
            ))
        }
        (Some(_), Some(_)) if !tls => {
            return Err(invalid(
                "mqtt.client_cert_file",
                "is only used with mqtts://",
                "remove it or use an mqtts:// URL",
            ))
        }
        _ => {}
    }
    let heartbeat = setting::duration_in_range(
        "mqtt.heartbeat",
        &raw.heartbeat,
        Duration::from_secs(1),
        Duration::from_secs(3600),
        "use 1s to 1h",
    )?;
    Ok(MqttConfig {
        tls,
        host: host.to_owned(),
        port,
        topic_prefix: prefix,
        username: raw.username,
        password_file: raw.password_file,
        ca_file: raw.ca_file,
        client_id: raw.client_id,
        client_cert_file: raw.client_cert_file,
        client_key_file: raw.client_key_file,
        heartbeat,
        home_assistant: raw.home_assistant,
        discovery_prefix,
    })
}

/// A topic prefix: levels separated by `/`, without wildcards or empty levels.
fn topic_levels(key: &str, value: &str, example: &str) -> Result<String, Invalid> {
    let prefix = value.trim().to_owned();
    if prefix.is_empty()
        || prefix.starts_with('/')
        || prefix.ends_with('/')
        || prefix.contains(['+', '#', '\0'])
        || prefix.split('/').any(str::is_empty)
    {
        return Err(invalid(
            key,
            format!("{prefix:?} is not a usable topic prefix"),
            format!("use topic levels separated by /, without +, # or empty levels, e.g. \"{example}\""),
        ));
    }
    Ok(prefix)
}

fn first_duplicate(labels: &[PhotoLabel]) -> Option<PhotoLabel> {
    labels.iter().enumerate().find(|(i, l)| labels[..*i].contains(l)).map(|(_, l)| *l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging::{Fill, QualityThresholds};

    const GOOD: &str = r#"
bay_id = "bay-07"
state_dir = "/var/lib/capture-kiosk"

[inspection]
angles = ["Front", "Front_Left", "Left", "Rear_Left", "Rear", "Rear_Right", "Right", "Front_Right"]
capture_attempts = 3

[imaging]
max_long_edge = 1920
jpeg_quality = 85

[buffer]
max_bytes = "8 GiB"
min_free_disk = "512 MiB"

[[cameras]]
id = "front"
source = "synthetic:4032x3024"
angles = ["Front", "Front_Left", "Front_Right"]

[[cameras]]
id = "sides"
source = "dir:/srv/photos"
angles = ["Left", "Right"]

[[cameras]]
id = "rear"
source = "http://10.0.0.5/snapshot.jpg"
angles = ["Rear", "Rear_Left", "Rear_Right", "VIN"]
"#;

    /// Parses `text` and expects a refusal whose key is `key` and whose message has `words`.
    fn check_refused(text: &str, key: Option<&str>, words: &[&str]) {
        let err = parse(text, "test.toml").expect_err("config should be refused");
        assert_eq!(err.key(), key, "{err}");
        let shown = err.to_string();
        for w in words {
            assert!(shown.contains(w), "{shown:?} should mention {w:?}");
        }
    }

    #[test]
    fn the_mqtt_section_is_checked() {
        let with = |section: &str| format!("{GOOD}\n[mqtt]\n{section}\n");
        let m = parse(&with("url = \"mqtt://broker.local\""), "t").unwrap().mqtt.unwrap();
        assert_eq!(
            (m.host.as_str(), m.port, m.tls, m.topic_prefix.as_str()),
            ("broker.local", 1883, false, "capture-kiosk")
        );
        assert_eq!(m.heartbeat, Duration::from_secs(30));
        let m = parse(&with("url = \"mqtts://10.0.0.2:8884/\"\nca_file = \"/etc/ca.pem\"\nusername = \"bay\"\npassword_file = \"/etc/pw\"\ntopic_prefix = \"acme/kiosks\""), "t")
            .unwrap()
            .mqtt
            .unwrap();
        assert_eq!(
            (m.host.as_str(), m.port, m.tls, m.topic_prefix.as_str()),
            ("10.0.0.2", 8884, true, "acme/kiosks")
        );
        assert!(parse(GOOD, "t").unwrap().mqtt.is_none());
        check_refused(&with("url = \"http://broker\""), Some("mqtt.url"), &["mqtt://"]);
        check_refused(&with("url = \"mqtt://u:secret@broker\""), Some("mqtt.url"), &["credentials"]);
        check_refused(&with("url = \"mqtt://broker:99999\""), Some("mqtt.url"), &["port"]);
        check_refused(&with("url = \"mqtt://\""), Some("mqtt.url"), &["no host"]);
        check_refused(&with("url = \"mqtts://broker\""), Some("mqtt.ca_file"), &["CA"]);
        check_refused(
            &with("url = \"mqtt://b\"\ntopic_prefix = \"a/#\""),
            Some("mqtt.topic_prefix"),
            &["+, #"],
        );
        check_refused(
            &with("url = \"mqtt://b\"\npassword_file = \"/p\""),
            Some("mqtt.password_file"),
            &["username"],
        );
        check_refused(&with("url = \"mqtt://b\"\nheartbeat = \"0s\""), Some("mqtt.heartbeat"), &["1s to 1h"]);
        check_refused(&with("url = \"mqtt://b\"\nqos = 2"), None, &["qos"]);
        let m = parse(&with("url = \"mqtt://b\""), "t").unwrap().mqtt.unwrap();
        assert_eq!(m.client_id("bay-07"), "capture-kiosk-bay-07");
        let m =
            parse(&with("url = \"mqtt://b\"\nclient_id = \"acme:bay-07.east\""), "t").unwrap().mqtt.unwrap();
        assert_eq!(m.client_id("bay-07"), "acme:bay-07.east");
        for bad in ["\"\"", "\"bay 07\"", "\"bay/07\"", "\"bay#\"", &format!("\"{}\"", "x".repeat(129))] {
            check_refused(
                &with(&format!("url = \"mqtt://b\"\nclient_id = {bad}")),
                Some("mqtt.client_id"),
                &["client id", "capture-kiosk-{bay_id}"],
            );
        }
        let tls = "url = \"mqtts://b\"\nca_file = \"/ca.pem\"";
        let m =
            parse(&with(&format!("{tls}\nclient_cert_file = \"/c.pem\"\nclient_key_file = \"/c.key\"")), "t")
                .unwrap()
                .mqtt
                .unwrap();
        assert_eq!(m.client_key_file.as_deref(), Some(Path::new("/c.key")));
        check_refused(
            &with(&format!("{tls}\nclient_cert_file = \"/c.pem\"")),
            Some("mqtt.client_key_file"),
            &["private key"],
        );
        check_refused(
            &with(&format!("{tls}\nclient_key_file = \"/c.key\"")),
            Some("mqtt.client_cert_file"),
            &["client certificate"],
        );
        check_refused(
            &with("url = \"mqtt://b\"\nclient_cert_file = \"/c.pem\"\nclient_key_file = \"/c.key\""),
            Some("mqtt.client_cert_file"),
            &["mqtts://"],
        );
        let shown = parse(&with("url = \"mqtt://u:hunter2@b\""), "t").unwrap_err().to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn the_documented_example_is_accepted() {
        let c = parse(GOOD, "test.toml").unwrap();
        assert_eq!(c.bay_id, "bay-07");
        assert_eq!(c.inspection.angles.len(), 8);
        assert_eq!(c.buffer.caps.max_bytes, 8 << 30);
        assert_eq!(c.buffer.caps.min_free_disk, 512 << 20);
        assert_eq!(c.camera_for(PhotoLabel::Vin).unwrap().id, "rear");
        assert_eq!(c.imaging, ResizeSpec { max_long_edge: 1920, jpeg_quality: 85 });
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        assert_eq!(c.imaging_workers, cpus, "one imaging worker per CPU unless configured");
        let three =
            parse(&GOOD.replace("jpeg_quality = 85", "jpeg_quality = 85\nworkers = 3"), "test.toml").unwrap();
        assert_eq!(three.imaging_workers, 3);
    }

    #[test]
    fn every_documented_mistake_names_its_key_and_fix() {
        check_refused(
            &GOOD.replace("capture_attempts = 3", "capture_attempts = 3\nflash = true"),
            None,
            &["unknown field", "flash"],
        );
        check_refused(
            &GOOD.replace("[imaging]", "[imaging]\nsharpen = 1"),
            None,
            &["unknown field", "sharpen"],
        );
        check_refused(
            &GOOD.replace("angles = [\"Left\", \"Right\"]", "angles = [\"Left\"]"),
            Some("inspection.angles"),
            &["Right", "no camera covers it"],
        );
        check_refused(
            &GOOD.replace("angles = [\"Left\", \"Right\"]", "angles = [\"Left\", \"Right\", \"Front\"]"),
            Some("cameras[1].angles"),
            &["Front is covered twice", "\"front\"", "\"sides\""],
        );
        check_refused(
            &GOOD.replace("\"8 GiB\"", "\"8 gigs\""),
            Some("buffer.max_bytes"),
            &["unknown unit", "512 MiB"],
        );
        check_refused(
            &GOOD.replace("\"512 MiB\"", "\"lots\""),
            Some("buffer.min_free_disk"),
            &["does not start with a number"],
        );
        check_refused(
            &GOOD.replace("jpeg_quality = 85", "jpeg_quality = 101"),
            Some("imaging.jpeg_quality"),
            &["101", "1 to 100"],
        );
        check_refused(
            &GOOD.replace("jpeg_quality = 85", "jpeg_quality = 0"),
            Some("imaging.jpeg_quality"),
            &["out of range"],
        );
        check_refused(
            &GOOD.replace("jpeg_quality = 85", "jpeg_quality = 85\nworkers = 0"),
            Some("imaging.workers"),
            &["0 is out of range", "1 to 64"],
        );
        check_refused(
            &GOOD.replace("jpeg_quality = 85", "jpeg_quality = 85\nworkers = 65"),
            Some("imaging.workers"),
            &["65 is out of range"],
        );
        check_refused(
            &GOOD.replace("dir:/srv/photos", "ftp://cam/x.jpg"),
            Some("cameras[1].source"),
            &["ftp", "synthetic:WxH"],
        );
        check_refused(
            &GOOD.replace("\"Left\", \"Right\"]", "\"Left\", \"Sideways\"]"),
            Some("cameras[1].angles"),
            &["Sideways", "Front_Left"],
        );
        check_refused(
            &GOOD.replace("id = \"sides\"", "id = \"front\""),
            Some("cameras[1].id"),
            &["two cameras"],
        );
        check_refused(&GOOD.replace("bay_id = \"bay-07\"", "bay_id = \"bay/07\""), Some("bay_id"), &["MQTT"]);
        check_refused(
            &GOOD.replace("capture_attempts = 3", "capture_attempts = 0"),
            Some("inspection.capture_attempts"),
            &["1 to 10"],
        );
        check_refused(&GOOD.replace("state_dir = \"/var/lib/capture-kiosk\"\n", ""), None, &["state_dir"]);
        check_refused("bay_id = \"b\"\nstate_dir = \"/x\"\n", Some("cameras"), &["no camera"]);
    }

    #[test]
    fn a_state_dir_that_cannot_be_created_is_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let blocker = tmp.path().join("a-file");
        std::fs::write(&blocker, b"x").unwrap();
        let cfg_path = tmp.path().join("bay.toml");
        let text = GOOD.replace("/var/lib/capture-kiosk", &blocker.join("state").display().to_string());
        std::fs::write(&cfg_path, text).unwrap();
        let err = load(&cfg_path).unwrap_err();
        assert_eq!(err.key(), Some("state_dir"));
        assert!(err.to_string().contains("cannot be created"), "{err}");

        let ok_dir = tmp.path().join("state");
        std::fs::write(&cfg_path, GOOD.replace("/var/lib/capture-kiosk", &ok_dir.display().to_string()))
            .unwrap();
        load(&cfg_path).unwrap();
        assert!(ok_dir.is_dir());
    }

    #[test]
    fn the_cloud_section_is_checked_and_its_secret_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let secret = tmp.path().join("api-secret");
        std::fs::write(&secret, "the-secret\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
        let cloud = format!(
            "\n[cloud]\nbase_url = \"https://api.example.com/\"\nusername = \"acme\"\napi_key = \"KEY\"\nclient_id = \"BAY-07\"\napi_secret_file = \"{}\"\n",
            secret.display()
        );
        let text =
            GOOD.replace("/var/lib/capture-kiosk", &tmp.path().join("state").display().to_string()) + &cloud;
        let c = parse(&text, "test.toml").unwrap().cloud.unwrap();
        assert_eq!(c.base_url, "https://api.example.com");
        assert_eq!(c.max_request_bytes, 32 << 20);
        assert!(c.require_clock_sync);

        let path = tmp.path().join("bay.toml");
        std::fs::write(&path, &text).unwrap();
        let err = load(&path).unwrap_err();
        assert_eq!(err.key(), Some("cloud.api_secret_file"), "{err}");
        assert!(err.to_string().contains("chmod 600") && !err.to_string().contains("the-secret"), "{err}");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load(&path).unwrap().cloud.unwrap().secret().unwrap().expose(), "the-secret");

        check_refused(
            &text.replace("https://api.example.com/", "ftp://x"),
            Some("cloud.base_url"),
            &["http(s)"],
        );
        check_refused(
            &text.replace("client_id = \"BAY-07\"", "client_id = \"\""),
            Some("cloud.client_id"),
            &["1-64"],
        );
        check_refused(
            &text.replace("api_key = \"KEY\"", "api_key = \"KEY\"\ntoken = \"x\""),
            None,
            &["unknown field", "token"],
        );
        check_refused(
            &(text.clone() + "max_request_bytes = \"100 MiB\"\n"),
            Some("cloud.max_request_bytes"),
            &["64 MiB"],
        );
    }

    #[test]
    fn the_cloud_trust_is_a_named_choice_and_ca_file_is_a_path() {
        let cloud = "\n[cloud]\nbase_url = \"https://api.example.com\"\nusername = \"acme\"\napi_key = \"KEY\"\nclient_id = \"BAY-07\"\n";
        let text = GOOD.to_owned() + cloud;
        let c = parse(&text, "t").unwrap().cloud.unwrap();
        assert_eq!((c.trust, c.ca_file), (CloudTrust::Bundled, None), "today's behaviour by default");
        for (written, trust) in
            [("bundled", CloudTrust::Bundled), ("system", CloudTrust::System), ("both", CloudTrust::Both)]
        {
            let c = parse(&format!("{text}trust = \"{written}\"\n"), "t").unwrap().cloud.unwrap();
            assert_eq!(c.trust, trust);
            assert_eq!(c.trust.as_str(), written);
        }
        let c = parse(&format!("{text}ca_file = \"/etc/ck/ca.pem\"\n"), "t").unwrap().cloud.unwrap();
        assert_eq!(c.ca_file.as_deref(), Some(Path::new("/etc/ck/ca.pem")));
        check_refused(&format!("{text}trust = \"mozilla\"\n"), Some("cloud.trust"), &["\"both\""]);
        check_refused(&format!("{text}ca_file = \"\"\n"), Some("cloud.ca_file"), &["PEM"]);
    }

    #[test]
    fn camera_health_and_device_keys_are_checked_by_name() {
        let usb = GOOD.replace(
            "source = \"synthetic:4032x3024\"",
            "source = \"v4l2:/dev/video0\"\nresolution = \"3840x2160\"\nformat = \"YUYV\"\nkeep_warm = false",
        );
        let c = parse(&usb, "test.toml").unwrap();
        assert_eq!(c.cameras[0].resolution, Some((3840, 2160)));
        assert_eq!(c.cameras[0].format, Some(crate::capture::PixelFormat::Yuyv));
        assert!(!c.cameras[0].keep_warm && c.cameras[2].keep_warm);
        assert!(!c.inspection.refuse_when_camera_offline);
        assert_eq!(c.inspection.camera_probe_interval, Duration::from_secs(10));
        check_refused(&usb.replace("3840x2160", "4k"), Some("cameras[0].resolution"), &["WIDTHxHEIGHT"]);
        check_refused(&usb.replace("\"YUYV\"", "\"h264\""), Some("cameras[0].format"), &["mjpeg"]);
        let rear = "source = \"http://10.0.0.5/snapshot.jpg\"";
        check_refused(
            &GOOD.replace(rear, &format!("{rear}\nresolution = \"640x480\"")),
            Some("cameras[2].resolution"),
            &["not v4l2"],
        );
        check_refused(
            &GOOD.replace(rear, &format!("{rear}\nca_file = \"/etc/ca.pem\"")),
            Some("cameras[2].ca_file"),
            &["https://"],
        );
        check_refused(
            &GOOD.replace(
                "source = \"dir:/srv/photos\"",
                "source = \"dir:/srv/photos\"\ncredentials_file = \"/x\"",
            ),
            Some("cameras[1].credentials_file"),
            &["not http"],
        );
        check_refused(
            &GOOD.replace("10.0.0.5", "admin:pw@10.0.0.5"),
            Some("cameras[2].source"),
            &["credentials_file"],
        );
        let switches = GOOD.replace(
            "capture_attempts = 3",
            "capture_attempts = 3\nrefuse_when_camera_offline = true\ncamera_probe_interval = \"30s\"\nbad_frames_to_offline = 5",
        );
        let c = parse(&switches, "test.toml").unwrap();
        assert!(c.inspection.refuse_when_camera_offline);
        assert_eq!(
            (c.inspection.camera_probe_interval, c.inspection.bad_frames_to_offline),
            (Duration::from_secs(30), 5)
        );
        check_refused(
            &switches.replace("\"30s\"", "\"100ms\""),
            Some("inspection.camera_probe_interval"),
            &["out of range"],
        );
        check_refused(
            &switches.replace("= 5", "= 0"),
            Some("inspection.bad_frames_to_offline"),
            &["1 to 100"],
        );
    }

    #[test]
    fn camera_quality_thresholds_and_masks_are_checked_by_camera_and_mask() {
        let front = "angles = [\"Front\", \"Front_Left\", \"Front_Right\"]";
        let with = |keys: &str| GOOD.replacen(front, &format!("{front}\n{keys}"), 1);
        let c = parse(GOOD, "t").unwrap();
        assert_eq!(c.cameras[0].quality, QualityThresholds::DEFAULT);
        assert!(c.cameras[0].masks.is_empty());
        let c = parse(
            &with("quality = { min_sharpness = 60, max_glare = 0.02 }\nmasks = [{ name = \"lane\", polygon = [[0.5, 0], [1, 0], [1, 1]] }, { polygon = [[0, 0], [0.2, 0], [0.2, 0.2], [0, 0.2]], fill = \"pixelate\" }]"),
            "t",
        )
        .unwrap();
        let cam = &c.cameras[0];
        assert_eq!((cam.quality.min_sharpness, cam.quality.max_glare), (60.0, 0.02));
        assert_eq!(cam.quality.max_mean_luma, QualityThresholds::DEFAULT.max_mean_luma);
        assert_eq!(cam.masks.len(), 2);
        assert_eq!((cam.masks[0].name(), cam.masks[0].fill()), (Some("lane"), Fill::Black));
        assert_eq!(cam.masks[1].fill(), Fill::Pixelate);
        assert_eq!(cam.imaging().masks, cam.masks);

        check_refused(
            &with("masks = [{ polygon = [[0, 0], [1, 0]] }]"),
            Some("cameras[0].masks[0].polygon"),
            &["mask 1 of camera \"front\"", "2 point(s)", "3 to 256"],
        );
        check_refused(
            &with("masks = [{ polygon = [[0, 0], [1, 0], [1, 1]] }, { name = \"house\", polygon = [[0, 0], [1.5, 0], [1, 1]] }]"),
            Some("cameras[0].masks[1].polygon"),
            &["mask 2 (\"house\") of camera \"front\"", "point 2 [1.5, 0]", "outside the picture", "0.0 to 1.0"],
        );
        check_refused(
            &with("masks = [{ polygon = [[0, 0], [-0.1, 0.5], [1, 1]] }]"),
            Some("cameras[0].masks[0].polygon"),
            &["point 2 [-0.1, 0.5]"],
        );
        check_refused(
            &with("masks = [{ polygon = [[0, 0], [0.5, 0.5], [1, 1]] }]"),
            Some("cameras[0].masks[0].polygon"),
            &["no area"],
        );
        check_refused(
            &with("masks = [{ polygon = [[0, 0], [0.5, 0.5, 1], [1, 1]] }]"),
            Some("cameras[0].masks[0].polygon"),
            &["point 2 has 3 number(s)"],
        );
        check_refused(
            &with("masks = [{ polygon = [[0, 0], [1, 0], [1, 1]], fill = \"blur\" }]"),
            Some("cameras[0].masks[0].fill"),
            &["\"blur\" is not a fill", "pixelate"],
        );
        check_refused(
            &with("masks = [{ polygon = [[0, 0], [1, 0], [1, 1]], colour = 1 }]"),
            None,
            &["colour"],
        );
        check_refused(
            &with("quality = { max_bright_clipped = 1.5 }"),
            Some("cameras[0].quality.max_bright_clipped"),
            &["1.5 is out of range", "0.0 to 1.0"],
        );
        check_refused(
            &with("quality = { min_mean_luma = 200, max_mean_luma = 100 }"),
            Some("cameras[0].quality.min_mean_luma"),
            &["not below max_mean_luma"],
        );
        check_refused(&with("quality = { sharpness = 1 }"), None, &["unknown field", "sharpness"]);
    }

    #[test]
    fn a_camera_file_that_cannot_be_used_is_refused_by_its_camera_and_key() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let creds = tmp.path().join("rear.cred");
        std::fs::write(&creds, "admin:pa55-word\n").unwrap();
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
        let rear = "source = \"http://10.0.0.5/snapshot.jpg\"";
        let text = GOOD
            .replace("/var/lib/capture-kiosk", &tmp.path().join("state").display().to_string())
            .replace(rear, &format!("{rear}\ncredentials_file = \"{}\"", creds.display()));
        let path = tmp.path().join("bay.toml");
        std::fs::write(&path, &text).unwrap();
        let err = load(&path).unwrap_err();
        assert_eq!(err.key(), Some("cameras[2].credentials_file"), "{err}");
        let shown = err.to_string();
        assert!(shown.contains("rear.cred") && shown.contains("chmod 600"), "{shown}");
        assert!(!shown.contains("pa55-word"), "{shown}");

        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&creds, "admin-without-password\n").unwrap();
        let err = load(&path).unwrap_err();
        assert_eq!(err.key(), Some("cameras[2].credentials_file"), "{err}");
        assert!(err.to_string().contains("user:password"), "{err}");
        std::fs::write(&creds, "admin:pa55-word\n").unwrap();
        load(&path).unwrap();

        let https = text.replace("http://10.0.0.5", "https://10.0.0.5") + "ca_file = \"/nowhere/ca.pem\"\n";
        std::fs::write(&path, https).unwrap();
        let err = load(&path).unwrap_err();
        assert_eq!(err.key(), Some("cameras[2].ca_file"), "{err}");
        assert!(err.to_string().contains("/nowhere/ca.pem") && err.to_string().contains("PEM"), "{err}");
    }

    #[test]
    fn sizes_parse_in_the_units_people_write() {
        for (text, bytes) in [
            ("8 GiB", 8u64 << 30),
            ("512 MiB", 512 << 20),
            ("500MB", 500_000_000),
            ("1048576", 1 << 20),
            ("1.5 KiB", 1536),
            ("64 kb", 64_000),
        ] {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in ["", "GiB", "8 gigs", "-1 MiB", "1e400"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(ByteSize(8 << 30).to_string(), "8.0 GiB");
    }
}
