//! Fixtures shared by the upload tests: a buffer with real JPEGs in it, and a `[cloud]`
//! section pointing at a stand-in of the cloud API on 127.0.0.1.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use capture_kiosk::config::CloudConfig;
use capture_kiosk::standin::StandInConfig;
use capture_kiosk::store::{Caps, InspectionId, NewImage, NewInspection, Store};
use capture_kiosk::vehicle::{CaseId, PhotoLabel, Vehicle, Vin};

pub const CAPS: Caps = Caps { max_bytes: u64::MAX, min_free_disk: 0 };

/// A camera-like JPEG of about `kib` KiB: noise compresses badly, like a real frame.
pub fn jpeg(seed: u64, kib: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    // Noise at quality 90 costs about 2.2 bytes per pixel.
    let pixels = (kib * 1024) as f64 / 2.2;
    let width = (pixels * 4.0 / 3.0).sqrt().max(16.0) as u32;
    let height = (width * 3 / 4).max(16);
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        let base = ((x + y) % 256) as u8;
        image::Rgb([base.wrapping_add(rng.u8(..)), rng.u8(..), base ^ rng.u8(..)])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
    out
}

/// Stores a captured inspection of `case_id` with one image per label; returns its id and
/// each label's sha256.
pub fn captured(
    store: &mut Store,
    case_id: &str,
    labels: &[PhotoLabel],
    kib: usize,
    now: SystemTime,
) -> InspectionId {
    let case = CaseId::parse(case_id).unwrap();
    let vehicle = Vehicle::with_vin(Vin::parse("JN1CV6AR9BM123456").unwrap());
    let id = store
        .begin_inspection(
            &NewInspection {
                case_id: &case,
                vehicle: Some(&vehicle),
                angles: labels,
                expected_image_bytes: (kib * 1024) as u64,
            },
            now,
        )
        .unwrap();
    for (i, label) in labels.iter().enumerate() {
        let bytes = jpeg(id.0 as u64 * 100 + i as u64, kib);
        store
            .add_image(
                id,
                &NewImage {
                    angle: *label,
                    camera: "cam",
                    captured_at: now,
                    source_width: 4032,
                    source_height: 3024,
                    source_bytes: 4 << 20,
                    width: 1920,
                    height: 1440,
                    jpeg: &bytes,
                },
            )
            .unwrap();
    }
    store.finish_capture(id, now).unwrap();
    id
}

/// Writes the stand-in's API secret to an owner-only file in `dir`.
pub fn secret_file(dir: &Path, standin: &StandInConfig) -> PathBuf {
    let path = dir.join("api-secret");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(standin.api_secret.as_bytes()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A `[cloud]` section for the stand-in at `base_url`.
pub fn cloud(base_url: &str, secret: &Path) -> CloudConfig {
    let standin = StandInConfig::default();
    CloudConfig {
        base_url: base_url.to_owned(),
        username: standin.username,
        api_key: standin.api_key,
        client_id: "BAY-TEST".to_owned(),
        api_secret_file: Some(secret.to_owned()),
        max_request_bytes: 32 << 20,
        request_timeout: Duration::from_secs(10),
        require_clock_sync: true,
        trust: capture_kiosk::config::CloudTrust::Bundled,
        ca_file: None,
    }
}

/// The same `[cloud]` section as TOML, for configuration files.
pub fn cloud_toml(base_url: &str, secret: &Path) -> String {
    let standin = StandInConfig::default();
    format!(
        "[cloud]\nbase_url = \"{base_url}\"\nusername = \"{}\"\napi_key = \"{}\"\nclient_id = \"BAY-TEST\"\napi_secret_file = \"{}\"\nrequest_timeout = \"10s\"\n",
        standin.username,
        standin.api_key,
        secret.display()
    )
}

/// A small tmpfs mounted on a temporary directory for one test (a real file system that
/// fills up), unmounted when dropped. Mounting needs root: without it, [`Tmpfs::mount`] prints
/// why the test is skipped and returns `None`.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(bytes: u64, test: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("{test}: skipped: mounting a tmpfs needs root (the test suite runs as root in CI)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=0755"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs on {} failed: {status}", dir.path().display());
        Some(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes an unprivileged writer may still use (statvfs `f_bavail * f_frsize`).
    pub fn free(&self) -> u64 {
        let c_path = std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes()).unwrap();
        let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: a valid C string and a writable statvfs.
        assert_eq!(unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) }, 0);
        // SAFETY: statvfs returned 0, so it filled the struct.
        let stat = unsafe { stat.assume_init() };
        #[allow(clippy::useless_conversion)]
        let free = u64::from(stat.f_bavail) * u64::from(stat.f_frsize);
        free
    }

    /// Grows the file `name` until at most `leave` bytes are free (0: until the disk is full).
    pub fn fill(&self, name: &str, leave: u64) {
        let mut file =
            std::fs::OpenOptions::new().create(true).append(true).open(self.path().join(name)).unwrap();
        let chunk = vec![0xA5u8; 64 << 10];
        loop {
            let free = self.free();
            if free <= leave {
                break;
            }
            let n = (free - leave).min(chunk.len() as u64) as usize;
            if file.write_all(&chunk[..n]).and_then(|()| file.sync_all()).is_err() {
                break;
            }
        }
    }

    /// Shrinks the file `name` by `bytes` (or deletes it when that is all of it).
    pub fn free_up(&self, name: &str, bytes: u64) {
        let path = self.path().join(name);
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len <= bytes {
            let _ = std::fs::remove_file(&path);
        } else {
            std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - bytes).unwrap();
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Starts Mosquitto on a free port of 127.0.0.1 with `settings` (lines of mosquitto.conf) and
/// waits until it listens. The configuration is written in `dir`. Returns the port and the
/// process, which the caller kills.
pub fn mosquitto(dir: &Path, settings: &str) -> (u16, std::process::Child) {
    use std::net::TcpStream;
    use std::time::Instant;
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, format!("listener {port} 127.0.0.1\npersistence false\n{settings}")).unwrap();
    let child = std::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto must be installed (scripts/setup-debian)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    (port, child)
}

/// A free port on 127.0.0.1 (for a broker started, stopped and started again on it), never
/// one handed out before in this process: tests run in parallel, and two that picked the same
/// port would talk to each other's brokers.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Starts Mosquitto with exactly `conf` (a whole mosquitto.conf, written in `dir`) and waits
/// until `port` listens. Its log goes to `dir/mosquitto.log`. Killed when dropped.
pub fn mosquitto_conf(dir: &Path, conf: &str, port: u16) -> Mosquitto {
    use std::net::TcpStream;
    use std::time::Instant;
    let path = dir.join("mosquitto.conf");
    let log = dir.join("mosquitto.log");
    // As root, Mosquitto would drop to its own user, which cannot write in a private temp dir.
    std::fs::write(&path, format!("user root\n{conf}\nlog_dest file {}\nlog_type all\n", log.display()))
        .unwrap();
    let mut child = std::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto must be installed (scripts/setup-debian)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("mosquitto exited ({status}): {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "mosquitto did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Something listens on the port: make sure it is this broker, not one that was there.
    std::thread::sleep(Duration::from_millis(50));
    if let Ok(Some(status)) = child.try_wait() {
        panic!("mosquitto exited ({status}): {}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    Mosquitto(child)
}

/// A Mosquitto process, killed (and reaped) when dropped.
pub struct Mosquitto(pub std::process::Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The daemon binary run with a configuration file, its stderr (the log) collected; killed
/// when dropped.
pub struct Kiosk {
    pub child: std::process::Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Kiosk {
    pub fn run(config: &Path) -> Kiosk {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_capture-kiosk"))
            .args(["run", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Kiosk { child, log }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (up to `secs`) for a log line holding every one of `words`; returns it.
    pub fn wait_log(&self, words: &[&str], secs: u64) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(line) = self.log().lines().find(|l| words.iter().all(|w| l.contains(w))) {
                return line.to_owned();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {words:?} in {secs} s; the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Kiosk {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain MQTT client for the tests: the operator, or an intruder logged in as some bay.
pub struct Probe {
    pub client: rumqttc::Client,
    messages: std::sync::mpsc::Receiver<ProbeSeen>,
    pub seen: Vec<ProbeSeen>,
}

/// What a [`Probe`] received.
#[derive(Debug, Clone)]
pub enum ProbeSeen {
    Message {
        topic: String,
        payload: Vec<u8>,
        retained: bool,
    },
    /// A SUBACK: whether each filter was granted.
    SubAck(Vec<bool>),
    /// The connection failed (or was refused) with this reason.
    Lost(String),
}

impl Probe {
    /// Connects to 127.0.0.1:`port` as `client_id`, with `login` (user, password) if given.
    pub fn connect(port: u16, client_id: &str, login: Option<(&str, &str)>) -> Probe {
        use rumqttc::{Event, MqttOptions, Packet, SubscribeReasonCode};
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5));
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        let (client, mut connection) = rumqttc::Client::new(options, 64);
        let (tx, messages) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                let seen = match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => ProbeSeen::Message {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retained: p.retain,
                    },
                    Ok(Event::Incoming(Packet::SubAck(s))) => ProbeSeen::SubAck(
                        s.return_codes.iter().map(|c| matches!(c, SubscribeReasonCode::Success(_))).collect(),
                    ),
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(ProbeSeen::Lost(e.to_string()));
                        return;
                    }
                };
                if tx.send(seen).is_err() {
                    return;
                }
            }
        });
        Probe { client, messages, seen: Vec::new() }
    }

    /// Subscribes to `filter` and returns whether the broker granted it.
    pub fn subscribe(&mut self, filter: &str) -> bool {
        self.client.subscribe(filter, rumqttc::QoS::AtLeastOnce).unwrap();
        match self.next(|s| matches!(s, ProbeSeen::SubAck(_) | ProbeSeen::Lost(_))) {
            ProbeSeen::SubAck(granted) => granted.iter().all(|g| *g),
            other => panic!("no SUBACK for {filter}: {other:?}"),
        }
    }

    pub fn publish(&self, topic: &str, payload: &str) {
        self.client.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.as_bytes()).unwrap();
    }

    /// Waits (up to 30 s) for the first thing received from now on that `want` accepts.
    pub fn next(&mut self, want: impl Fn(&ProbeSeen) -> bool) -> ProbeSeen {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.messages.recv_timeout(left) {
                Ok(seen) => {
                    self.seen.push(seen.clone());
                    if want(&seen) {
                        return seen;
                    }
                }
                Err(_) => panic!("nothing as wanted arrived; seen: {:#?}", self.summary()),
            }
        }
    }

    /// Waits for a message on `topic` whose JSON payload `want` accepts.
    pub fn json(&mut self, topic: &str, want: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let seen = self.next(|s| match s {
            ProbeSeen::Message { topic: t, payload, .. } => {
                t == topic && serde_json::from_slice(payload).is_ok_and(|v: serde_json::Value| want(&v))
            }
            _ => false,
        });
        match seen {
            ProbeSeen::Message { payload, .. } => serde_json::from_slice(&payload).unwrap(),
            _ => unreachable!(),
        }
    }

    /// The first message on `topic` whose JSON payload `want` accepts, among those already
    /// received or else the next ones.
    pub fn json_any(&mut self, topic: &str, want: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        self.drain();
        let found = self.seen.iter().find_map(|s| match s {
            ProbeSeen::Message { topic: t, payload, .. } if t == topic => {
                serde_json::from_slice(payload).ok().filter(|v: &serde_json::Value| want(v))
            }
            _ => None,
        });
        match found {
            Some(v) => v,
            None => self.json(topic, want),
        }
    }

    /// Waits for the plain-text `text` on `topic`.
    pub fn text(&mut self, topic: &str, text: &str) {
        self.next(|s| matches!(s, ProbeSeen::Message { topic: t, payload, .. } if t == topic && payload == text.as_bytes()));
    }

    /// Like [`Probe::text`], but a message already received counts.
    pub fn text_any(&mut self, topic: &str, text: &str) {
        self.drain();
        let is = |s: &ProbeSeen| matches!(s, ProbeSeen::Message { topic: t, payload, .. } if t == topic && payload == text.as_bytes());
        if !self.seen.iter().any(is) {
            self.next(is);
        }
    }

    /// Reads what is already there, without waiting.
    pub fn drain(&mut self) {
        while let Ok(seen) = self.messages.try_recv() {
            self.seen.push(seen);
        }
    }

    /// Every message received so far on a topic starting with `prefix`.
    pub fn messages_under(&self, prefix: &str) -> Vec<String> {
        self.seen
            .iter()
            .filter_map(|s| match s {
                ProbeSeen::Message { topic, payload, .. } if topic.starts_with(prefix) => {
                    Some(format!("{topic} {}", String::from_utf8_lossy(payload)))
                }
                _ => None,
            })
            .collect()
    }

    /// What was received (without the many `state` messages), for failure messages.
    pub fn summary(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter(|s| !matches!(s, ProbeSeen::Message { topic, .. } if topic.ends_with("/state")))
            .map(|s| match s {
                ProbeSeen::Message { topic, payload, retained } => {
                    format!(
                        "{topic} {}{}",
                        String::from_utf8_lossy(payload),
                        if *retained { " (retained)" } else { "" }
                    )
                }
                other => format!("{other:?}"),
            })
            .collect()
    }
}

/// Starts the daemon for `config` in this process: capture only (no upload leg), no systemd,
/// the real clock.
pub fn capture_only_daemon(config: capture_kiosk::config::Config) -> capture_kiosk::daemon::Daemon {
    use capture_kiosk::daemon::{self, CaptureOnly, Deps, Hooks, Notifier};
    let deps = Deps {
        clock: std::sync::Arc::new(capture_kiosk::clock::SystemClock::new()),
        rig: capture_kiosk::inspection::Rig::open(&config).unwrap(),
        upload: Box::new(CaptureOnly::default()),
        notifier: Notifier::none(),
        watchdog: None,
        config_path: None,
        hooks: Hooks::default(),
    };
    daemon::start(config, deps).unwrap()
}

/// A bay's configuration file in `dir` (state under `dir/state`): one synthetic camera for
/// Front and Rear, and `mqtt` as the body of its `[mqtt]` section.
pub fn bay_config(dir: &Path, bay_id: &str, mqtt: &str) -> PathBuf {
    let path = dir.join("bay.toml");
    std::fs::write(
        &path,
        format!(
            "bay_id = \"{bay_id}\"\nstate_dir = \"{}\"\n\n[inspection]\nangles = [\"Front\", \"Rear\"]\n\n[imaging]\nmax_long_edge = 320\n\n[[cameras]]\nid = \"cam\"\nsource = \"synthetic:320x240\"\nangles = [\"Front\", \"Rear\"]\n\n[mqtt]\nheartbeat = \"5s\"\n{mqtt}\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    path
}
