//! The systemd unit stays hardened: `systemd-analyze security` scores it at most 1.5, every
//! directive says why it is there, `systemd-analyze verify` has nothing to say about it, and
//! every system call the daemon makes (demo, `run` with a broker and the stand-in, a V4L2 open
//! attempt) is inside the unit's `SystemCallFilter=`, checked under strace.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_kiosk::clock::SystemClock;
use capture_kiosk::standin::{StandIn, StandInConfig};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/capture-kiosk.service");
const KIOSK: &str = env!("CARGO_BIN_EXE_capture-kiosk");

/// The exposure score the unit must not exceed (systemd's own timesyncd scores 2.3).
const MAX_EXPOSURE: f64 = 1.5;

/// System calls the daemon makes that the filter refuses, each with why that is safe.
const EXPECTED_OUTSIDE_THE_FILTER: &[(&str, &str)] = &[
    ("adjtimex", "the kernel's clock-sync query; refused under ProtectClock, and read as unknown"),
    ("clock_adjtime", "glibc's adjtimex; refused under ProtectClock, and read as unknown"),
];

#[test]
fn systemd_analyze_security_scores_the_unit_at_most_1_5() {
    let out = run(Command::new("systemd-analyze").args(["security", "--offline=true", "--no-pager", UNIT]));
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|line| line.split("Overall exposure level for capture-kiosk.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    println!("systemd-analyze security: capture-kiosk.service scores {score}");
    let exposed: Vec<&str> = text.lines().filter(|l| l.starts_with('✗')).collect();
    assert!(
        score <= MAX_EXPOSURE,
        "the unit scores {score}, above {MAX_EXPOSURE}; still exposed:\n{}",
        exposed.join("\n")
    );
}

#[test]
fn every_directive_of_the_unit_is_explained_by_a_comment() {
    let text = std::fs::read_to_string(UNIT).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut unexplained = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        // A directive is explained by the comment above it, or above the block of directives
        // it belongs to (no blank line or section header in between).
        let explained = lines[..i]
            .iter()
            .rev()
            .find(|l| l.is_empty() || l.starts_with('#') || l.starts_with('['))
            .is_some_and(|l| l.starts_with('#'));
        if !explained {
            unexplained.push(format!("line {}: {line}", i + 1));
        }
    }
    assert!(unexplained.is_empty(), "directives without a comment saying why:\n{}", unexplained.join("\n"));
}

#[test]
fn systemd_analyze_verify_has_nothing_to_say_about_the_unit() {
    if !is_root() {
        println!("skipped: verify needs /usr/bin/capture-kiosk, which only root can lay over /usr/bin (in a private mount namespace)");
        return;
    }
    // verify checks that ExecStart's program exists: lay the built binary over /usr/bin in a
    // private mount namespace, so the machine itself is untouched.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(KIOSK, bin.join("capture-kiosk")).unwrap();
    let script = format!(
        "mount -t overlay overlay -o lowerdir={}:/usr/bin /usr/bin && exec systemd-analyze verify {UNIT}",
        bin.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

#[test]
fn the_daemon_makes_no_system_call_outside_the_units_filter() {
    if Command::new("strace").arg("-V").output().is_err() {
        panic!("strace is missing: run scripts/setup-debian");
    }
    let allowed = allowed_system_calls();
    assert!(allowed.contains("openat") && !allowed.contains("setuid"), "the filter was read wrong");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    // The unit runs the daemon as its own unprivileged user; as root, trace it as `nobody`
    // (SQLite, for one, behaves differently for root).
    let user = is_root().then_some("nobody");
    let broker = Broker::start(work);
    let mut used = BTreeMap::<String, BTreeSet<&str>>::new();
    let mut record = |what: &'static str, trace: &Path| {
        for call in traced_calls(trace) {
            used.entry(call).or_default().insert(what);
        }
    };

    // 1. The demo: capture, the SQLite buffer, upload to its in-process stand-in, MQTT.
    let trace = work.join("demo.trace");
    let state = writable_dir(work, "demo-state", user);
    let out = run(strace(&trace, user, &[])
        .args(["demo", "--frame", "1280x960", "--mqtt", &broker.url(), "--state-dir"])
        .arg(&state));
    assert!(String::from_utf8_lossy(&out.stdout).contains("completed at the stand-in"));
    record("demo", &trace);

    // 2. A V4L2 camera that is not there, through `check` and `cameras`.
    let config = work.join("v4l2.toml");
    let v4l2_state = writable_dir(work, "v4l2-state", user);
    std::fs::write(
        &config,
        format!(
            "bay_id = \"bay-s\"\nstate_dir = \"{}\"\n[inspection]\nangles = [\"Front\"]\n[[cameras]]\nid = \"usb\"\nsource = \"v4l2:/dev/video0\"\nangles = [\"Front\"]\n",
            v4l2_state.display()
        ),
    )
    .unwrap();
    make_readable(&config);
    let trace = work.join("check.trace");
    run(strace(&trace, user, &[]).args(["check", "--config"]).arg(&config));
    record("check", &trace);
    let trace = work.join("cameras.trace");
    let out = strace(&trace, user, &[]).args(["cameras", "--config"]).arg(&config).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the missing camera is offline: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    record("cameras (V4L2)", &trace);

    // 3. The daemon: MQTT commands, capture, upload to the stand-in, sd_notify, SIGTERM. The
    // kernel's clock-sync query is refused as ProtectClock refuses it, and the upload must
    // still go through.
    let standin =
        StandIn::start(StandInConfig { port: 0, ..StandInConfig::default() }, Arc::new(SystemClock::new()))
            .unwrap();
    let secret = work.join("api-secret");
    std::fs::write(&secret, &standin.config().api_secret).unwrap();
    owned_by(&secret, user, 0o600);
    let notify_dir = writable_dir(work, "notify", user);
    let notify = UnixDatagram::bind(notify_dir.join("socket")).unwrap();
    make_world_writable(&notify_dir.join("socket"));
    notify.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let run_state = writable_dir(work, "run-state", user);
    let config = work.join("run.toml");
    let defaults = StandInConfig::default();
    std::fs::write(
        &config,
        format!(
            "bay_id = \"bay-s\"\nstate_dir = \"{}\"\n[inspection]\nangles = [\"Front\", \"Rear\"]\n[imaging]\nmax_long_edge = 640\n\
             [[cameras]]\nid = \"cam\"\nsource = \"synthetic:1280x960\"\nangles = [\"Front\", \"Rear\"]\n\
             [mqtt]\nurl = \"{}\"\n\
             [cloud]\nbase_url = \"{}\"\nusername = \"{}\"\napi_key = \"{}\"\nclient_id = \"BAY-S\"\napi_secret_file = \"{}\"\n",
            run_state.display(),
            broker.url(),
            standin.base_url(),
            defaults.username,
            defaults.api_key,
            secret.display()
        ),
    )
    .unwrap();
    make_readable(&config);
    let watcher = Watcher::connect(&broker);
    let trace = work.join("run.trace");
    let stderr_path = work.join("run.stderr");
    let tracer = strace(&trace, user, &["-e", "inject=adjtimex,clock_adjtime:error=EPERM"])
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", notify_dir.join("socket"))
        .env("WATCHDOG_USEC", "2000000")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let mut tracer = KillOnDrop(tracer);
    watcher.wait("status", |v| v == "online");
    watcher.send("cmd/start", r#"{"command_id":"strace-1","case_id":"CASE-S1"}"#);
    let uploaded =
        watcher.wait("events", |v| v["type"] == "inspection_uploaded" || v["type"] == "inspection_failed");
    assert_eq!(uploaded["type"], "inspection_uploaded", "{uploaded}");
    let mut ready = false;
    let mut buf = [0u8; 512];
    while let Ok(n) = notify.recv(&mut buf) {
        ready |= String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1");
    }
    assert!(ready, "the daemon said READY=1 on the notify socket");
    let daemon = traced_child(&tracer.0);
    // SAFETY: kill has no memory preconditions; the pid is the traced daemon's.
    unsafe { libc::kill(daemon, libc::SIGTERM) };
    let status = tracer.0.wait().unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(status.success(), "the daemon stops cleanly on SIGTERM: {status}\n{stderr}");
    record("run", &trace);

    let outside: BTreeMap<&String, &BTreeSet<&str>> =
        used.iter().filter(|(call, _)| !allowed.contains(call.as_str())).collect();
    println!("system calls made ({}): {:?}", used.len(), used.keys().collect::<Vec<_>>());
    for (call, by) in &outside {
        let why = EXPECTED_OUTSIDE_THE_FILTER
            .iter()
            .find(|(name, _)| *name == call.as_str())
            .map_or("UNEXPECTED", |(_, why)| why);
        println!("outside the filter: {call} (by {by:?}): {why}");
    }
    let unexpected: Vec<_> = outside
        .keys()
        .filter(|call| !EXPECTED_OUTSIDE_THE_FILTER.iter().any(|(name, _)| *name == call.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "system calls outside SystemCallFilter= (they would fail with EPERM under systemd): {unexpected:?}"
    );
}

// ---------------------------------------------------------------------------------------------

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(command: &mut Command) -> Output {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e} (run scripts/setup-debian)"));
    assert!(
        out.status.success(),
        "{command:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The kiosk under `strace -f` with strace's `options`, writing the trace to `trace`, as
/// `user` when given; the kiosk's arguments follow.
fn strace(trace: &Path, user: Option<&str>, options: &[&str]) -> Command {
    let mut c = Command::new("strace");
    c.args(["-f", "-qq", "-o"]).arg(trace);
    if let Some(user) = user {
        c.args(["-u", user]);
    }
    c.args(options).arg("--").arg(KIOSK);
    c.env("CAPTURE_KIOSK_LOG", "debug");
    c
}

/// The names of the system calls in an strace log (`-f -o`).
fn traced_calls(trace: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(trace).unwrap();
    let mut calls = BTreeSet::new();
    for line in text.lines() {
        let rest = line.split_once(' ').map_or(line, |(_, r)| r).trim_start();
        let rest = rest.strip_prefix("<... ").unwrap_or(rest);
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let called = rest[name.len()..].starts_with('(') || rest[name.len()..].starts_with(" resumed>");
        if !name.is_empty() && called {
            calls.insert(name);
        }
    }
    assert!(calls.contains("execve") && calls.len() > 20, "the trace {} is too short", trace.display());
    calls
}

/// `SystemCallFilter=` of the unit as a set of names: the allowed groups, less the refused
/// ones, less `@clock` for `ProtectClock=yes`; groups expanded by `systemd-analyze syscall-filter`.
fn allowed_system_calls() -> BTreeSet<String> {
    let out = run(Command::new("systemd-analyze").args(["syscall-filter", "--no-pager"]));
    let mut groups = BTreeMap::<String, Vec<String>>::new();
    let mut current: Option<String> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let item = line.trim();
        if !line.starts_with(' ') {
            current = item.starts_with('@').then(|| item.to_owned());
            if let Some(group) = &current {
                groups.insert(group.clone(), Vec::new());
            }
        } else if let Some(group) = &current {
            if !item.is_empty() && !item.starts_with('#') {
                groups.entry(group.clone()).or_default().push(item.to_owned());
            }
        }
    }
    fn expand(item: &str, groups: &BTreeMap<String, Vec<String>>, into: &mut BTreeSet<String>) {
        match groups.get(item) {
            Some(members) => members.iter().for_each(|m| expand(m, groups, into)),
            None => {
                assert!(!item.starts_with('@'), "unknown system call group {item}");
                into.insert(item.to_owned());
            }
        }
    }
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let (mut allowed, mut refused) = (BTreeSet::new(), BTreeSet::new());
    for line in unit.lines() {
        if let Some(value) = line.trim().strip_prefix("SystemCallFilter=") {
            let (into, list) = match value.strip_prefix('~') {
                Some(list) => (&mut refused, list),
                None => (&mut allowed, value),
            };
            list.split_whitespace().for_each(|item| expand(item, &groups, into));
        }
        if line.trim() == "ProtectClock=yes" {
            expand("@clock", &groups, &mut refused);
        }
    }
    assert!(!allowed.is_empty(), "the unit has no SystemCallFilter= allow list");
    allowed.difference(&refused).cloned().collect()
}

/// strace and the daemon it runs, stopped if the test fails on the way.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            if let Ok(children) = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.0.id()))
            {
                for pid in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                    // SAFETY: kill has no memory preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The pid of the process strace started.
fn traced_child(tracer: &Child) -> i32 {
    let path = format!("/proc/{0}/task/{0}/children", tracer.id());
    let text = std::fs::read_to_string(&path).unwrap();
    text.split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no child in {path}"))
}

fn writable_dir(work: &Path, name: &str, user: Option<&str>) -> PathBuf {
    let dir = work.join(name);
    std::fs::create_dir(&dir).unwrap();
    owned_by(&dir, user, 0o700);
    dir
}

/// Gives `path` to `user` (when tracing as another user) with `mode`; the work directory
/// itself is opened for traversal.
fn owned_by(path: &Path, user: Option<&str>, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    if let Some(user) = user {
        let out = run(Command::new("id").args(["-u", user]));
        let uid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        std::os::unix::fs::chown(path, Some(uid), None).unwrap();
        if let Some(parent) = path.parent() {
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn make_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn make_world_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).unwrap();
}

/// A Mosquitto of this test's own on a free port, killed on drop.
struct Broker {
    port: u16,
    child: Child,
}

impl Broker {
    fn start(work: &Path) -> Broker {
        let (port, child) = support::mosquitto(work, "allow_anonymous true\n");
        Broker { port, child }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything under the bay's topics, and a way to send commands.
struct Watcher {
    client: Client,
    messages: Receiver<(String, Vec<u8>)>,
}

const ROOT: &str = "capture-kiosk/bay-s";

impl Watcher {
    fn connect(broker: &Broker) -> Watcher {
        let options = MqttOptions::new(format!("hardening-{}", fastrand::u32(..)), "127.0.0.1", broker.port);
        let (client, mut connection) = Client::new(options, 64);
        client.subscribe(format!("{ROOT}/#"), QoS::AtLeastOnce).unwrap();
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        Watcher { client, messages }
    }

    fn send(&self, topic: &str, payload: &str) {
        self.client.publish(format!("{ROOT}/{topic}"), QoS::AtLeastOnce, false, payload.as_bytes()).unwrap();
    }

    /// The first message on `topic` (as JSON, or as a JSON string when it is not JSON) that
    /// `want` accepts.
    fn wait(&self, topic: &str, want: impl Fn(&Value) -> bool) -> Value {
        let topic = format!("{ROOT}/{topic}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (t, payload) =
                self.messages.recv_timeout(left).unwrap_or_else(|_| panic!("nothing wanted on {topic}"));
            let value = serde_json::from_slice(&payload)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&payload).into_owned()));
            if t == topic && want(&value) {
                return value;
            }
        }
    }
}
