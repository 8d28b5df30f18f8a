//! No secret at any log level: the binary runs `cameras`, `inspect` and `run` at `-vv` and
//! `-vvv` against a Basic-auth and a Digest camera, the stand-in cloud with a known secret and a
//! Mosquitto that wants a password, and everything it writes to stderr is searched for each
//! secret, in plain text and inside the hex dumps HTTP libraries print at trace level.

mod support;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_kiosk::capture::digest::Algorithm;
use capture_kiosk::capture::testcam::{Auth, SnapshotServer};
use capture_kiosk::clock::SystemClock;
use capture_kiosk::standin::{StandIn, StandInConfig};

const BASIC_USER: &str = "bay-basic";
const BASIC_PASSWORD: &str = "Basic-Pa55word-7f3e9a";
const DIGEST_USER: &str = "bay-digest";
const DIGEST_PASSWORD: &str = "Digest-Pa55word-c41d07";
const API_SECRET: &str = "cloud-account-secret-5b2e8d1f";
const MQTT_USER: &str = "kiosk";
const MQTT_PASSWORD: &str = "Mqtt-Pa55word-9e6a42";

/// A Mosquitto of this test's own that wants `MQTT_USER` and `MQTT_PASSWORD`, killed on drop.
struct Broker {
    _dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl Broker {
    fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let passwords = dir.path().join("passwords");
        let made = Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(&passwords)
            .args([MQTT_USER, MQTT_PASSWORD])
            .output()
            .expect("mosquitto_passwd must be installed (scripts/setup-debian)");
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let (port, child) = support::mosquitto(
            dir.path(),
            &format!("allow_anonymous false\npassword_file {}\n", passwords.display()),
        );
        Broker { _dir: dir, port, child }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn private_file(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_owned()
}

struct Bay {
    _dir: tempfile::TempDir,
    config: PathBuf,
    standin: StandIn,
    basic: SnapshotServer,
    digest: SnapshotServer,
    _broker: Broker,
}

fn bay() -> Bay {
    let dir = tempfile::tempdir().unwrap();
    let basic = SnapshotServer::start(support::jpeg(1, 60)).unwrap();
    basic.set_auth(Auth::Basic { user: BASIC_USER.into(), password: BASIC_PASSWORD.into() });
    let digest = SnapshotServer::start(support::jpeg(2, 60)).unwrap();
    digest.set_auth(Auth::Digest {
        user: DIGEST_USER.into(),
        password: DIGEST_PASSWORD.into(),
        algorithm: Algorithm::Sha256,
    });
    let standin_config = StandInConfig { api_secret: API_SECRET.to_owned(), ..StandInConfig::default() };
    let standin = StandIn::start(standin_config.clone(), Arc::new(SystemClock::new())).unwrap();
    let broker = Broker::start();
    let basic_file =
        private_file(&dir.path().join("basic.cred"), &format!("{BASIC_USER}:{BASIC_PASSWORD}\n"));
    let digest_file =
        private_file(&dir.path().join("digest.cred"), &format!("{DIGEST_USER}:{DIGEST_PASSWORD}\n"));
    let mqtt_file = private_file(&dir.path().join("mqtt.password"), &format!("{MQTT_PASSWORD}\n"));
    let secret = support::secret_file(dir.path(), &standin_config);
    let text = format!(
        r#"
bay_id = "bay-s"
state_dir = "{state}"

[inspection]
angles = ["Front", "Rear"]
camera_probe_interval = "1s"

[imaging]
max_long_edge = 640

[[cameras]]
id = "cam-basic"
source = "{basic}"
angles = ["Front"]
credentials_file = "{basic_file}"

[[cameras]]
id = "cam-digest"
source = "{digest}"
angles = ["Rear"]
credentials_file = "{digest_file}"

[mqtt]
url = "mqtt://127.0.0.1:{port}"
username = "{MQTT_USER}"
password_file = "{mqtt_file}"

{cloud}
"#,
        state = dir.path().join("state").display(),
        basic = basic.url(),
        digest = digest.url(),
        basic_file = basic_file.display(),
        digest_file = digest_file.display(),
        port = broker.port,
        mqtt_file = mqtt_file.display(),
        cloud = support::cloud_toml(&standin.base_url(), &secret),
    );
    let config = dir.path().join("bay.toml");
    std::fs::write(&config, text).unwrap();
    Bay { _dir: dir, config, standin, basic, digest, _broker: broker }
}

fn kiosk(bay: &Bay, verbosity: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capture-kiosk"));
    command
        .arg(verbosity)
        .args(args)
        .arg("--config")
        .arg(&bay.config)
        .env_remove("CAPTURE_KIOSK_LOG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET");
    command
}

fn stderr_of(output: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{what}: {}\n{stderr}", output.status);
    stderr
}

/// Runs the daemon until the stand-in has completed `case_id`'s session and both cameras were
/// asked again by the daemon's own probes, then stops it with SIGTERM and returns its stderr.
fn run_daemon(bay: &Bay, verbosity: &str, case_id: &str) -> String {
    let (basic_before, digest_before) = (bay.basic.requests(), bay.digest.requests());
    let mut child =
        kiosk(bay, verbosity, &["run"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let uploaded = bay.standin.sessions().iter().any(|s| s.case_id == case_id && s.completed);
        let probed = bay.basic.requests() > basic_before + 1 && bay.digest.requests() > digest_before + 1;
        if uploaded && probed {
            break;
        }
        assert!(Instant::now() < deadline, "the daemon did not upload {case_id} and probe both cameras");
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let text = reader.join().unwrap();
    assert!(status.success(), "run: {status}\n{text}");
    text
}

/// Bytes printed as hex-dump rows (`4745 5420 2f73 ... GET /s`, as HTTP libraries log the
/// wire at trace level), joined in order, so that a secret split across rows is found too.
fn hex_dumped(log: &str) -> String {
    let mut bytes = Vec::new();
    for line in log.lines() {
        let Some((_, rest)) = line.split_once(' ') else { continue };
        let groups: Vec<&str> = rest.split_whitespace().take(8).collect();
        let is_row = groups.len() == 8
            && groups.iter().all(|g| g.len() == 4 && g.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
        if !is_row {
            continue;
        }
        for group in groups {
            for pair in [&group[..2], &group[2..]] {
                if let Ok(b) = u8::from_str_radix(pair, 16) {
                    bytes.push(b);
                }
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Every secret the test knows, with its name, as it could appear: plain, and the Basic
/// credentials in base64 as their `Authorization` header carries them.
fn secrets(standin: &StandIn) -> Vec<(String, String)> {
    let basic = base64(format!("{BASIC_USER}:{BASIC_PASSWORD}").as_bytes());
    let mut all = vec![
        ("camera Basic password".to_owned(), BASIC_PASSWORD.to_owned()),
        ("camera Basic credentials in base64".to_owned(), basic),
        ("camera Digest password".to_owned(), DIGEST_PASSWORD.to_owned()),
        ("cloud API secret".to_owned(), API_SECRET.to_owned()),
        ("MQTT password".to_owned(), MQTT_PASSWORD.to_owned()),
    ];
    for token in standin.issued_tokens() {
        all.push(("a bearer token the cloud issued".to_owned(), token));
    }
    all
}

/// Standard base64 with padding, as `Authorization: Basic` carries credentials.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn assert_no_secret(what: &str, log: &str, secrets: &[(String, String)]) {
    let dumped = hex_dumped(log);
    for (name, secret) in secrets {
        assert!(!log.contains(secret.as_str()), "{what} logged the {name}");
        assert!(!dumped.contains(secret.as_str()), "{what} logged the {name} in a hex dump of the wire");
        assert!(!log.contains(&hex::encode(secret)), "{what} logged the {name} in hex");
    }
}

#[test]
fn no_secret_reaches_the_logs_of_cameras_inspect_or_run_at_any_verbosity() {
    let bay = bay();
    let mut logs = Vec::new();
    for verbosity in ["-vv", "-vvv"] {
        let cameras = kiosk(&bay, verbosity, &["cameras"]).output().unwrap();
        logs.push((format!("cameras {verbosity}"), stderr_of(&cameras, "cameras")));
        let case_id = format!("CASE-SEC{}", verbosity.len());
        let inspect = kiosk(&bay, verbosity, &["inspect", "--case-id", &case_id]).output().unwrap();
        logs.push((format!("inspect {verbosity}"), stderr_of(&inspect, "inspect")));
        assert!(
            bay.standin.sessions().iter().any(|s| s.case_id == case_id && s.completed),
            "inspect uploaded {case_id}"
        );
        // Left for the daemon to upload.
        let later = format!("CASE-RUN{}", verbosity.len());
        let buffered =
            kiosk(&bay, verbosity, &["inspect", "--no-upload", "--case-id", &later]).output().unwrap();
        logs.push((format!("inspect --no-upload {verbosity}"), stderr_of(&buffered, "inspect --no-upload")));
        logs.push((format!("run {verbosity}"), run_daemon(&bay, verbosity, &later)));
    }
    // The work was done with every secret in use.
    assert!(bay.basic.frames_served() >= 4 && bay.digest.frames_served() >= 4);
    assert_eq!(bay.standin.secret_leaks(), 0, "the secret never travels");
    let secrets = secrets(&bay.standin);
    assert!(secrets.len() >= 5 + 4 * 2, "every session's tokens are known: {}", secrets.len());
    // The verbose levels were on: the kiosk's own debug lines are there.
    assert!(
        logs.iter().filter(|(what, _)| what.starts_with("run")).all(|(_, log)| log.contains("DEBUG")),
        "the daemon logged nothing verbose: {logs:#?}"
    );
    for (what, log) in &logs {
        assert_no_secret(what, log, &secrets);
    }
}

#[test]
fn base64_is_the_one_basic_auth_uses() {
    assert_eq!(base64(b"Aladdin:open sesame"), "QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
    assert_eq!(base64(b"ab"), "YWI=");
    assert_eq!(base64(b"abc"), "YWJj");
}
