//! The daemon against a real Mosquitto that each test starts on its own free port: retained
//! status and the Last Will, state, events of an inspection, every command answered, the broker
//! going away mid-inspection, and systemd's READY / WATCHDOG on a datagram socket.

mod support;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_kiosk::clock::SystemClock;
use capture_kiosk::config::{self, Config};
use capture_kiosk::daemon::{self, CaptureOnly, CloudLeg, Daemon, Deps, Hooks, Notifier, Signal};
use capture_kiosk::inspection::Rig;
use capture_kiosk::standin::StandIn;
use capture_kiosk::store::{Caps, InspectionState, Store};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

const ROOT: &str = "capture-kiosk/bay-t";

/// A Mosquitto of this test's own, killed on drop.
struct Broker {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    fn start() -> Broker {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut broker = Broker { dir: tempfile::tempdir().unwrap(), port, child: None };
        broker.restart();
        broker
    }

    fn restart(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {} 127.0.0.1\nallow_anonymous true\npersistence false\n", self.port),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (scripts/setup-debian)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A subscriber to everything under the bay, which also sends commands.
struct Watcher {
    client: Client,
    messages: Receiver<(String, Vec<u8>, bool)>,
    seen: Vec<(String, Vec<u8>, bool)>,
}

impl Watcher {
    fn connect(broker: &Broker) -> Watcher {
        let mut options =
            MqttOptions::new(format!("watcher-{}", fastrand::u32(..)), "127.0.0.1", broker.port);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut connection) = Client::new(options, 64);
        client.subscribe(format!("{ROOT}/#"), QoS::AtLeastOnce).unwrap();
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec(), p.retain)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        Watcher { client, messages, seen: Vec::new() }
    }

    /// Waits for the first message (from now on) on `topic` that `want` accepts.
    fn wait(&mut self, topic: &str, want: impl Fn(&[u8], bool) -> bool) -> Vec<u8> {
        let topic = format!("{ROOT}/{topic}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok(m) => {
                    self.seen.push(m.clone());
                    if m.0 == topic && want(&m.1, m.2) {
                        return m.1;
                    }
                }
                Err(_) => panic!("no message on {topic} as wanted; seen: {:#?}", self.summary()),
            }
        }
    }

    fn wait_json(&mut self, topic: &str, want: impl Fn(&Value) -> bool) -> Value {
        let payload = self.wait(topic, |p, _| serde_json::from_slice(p).is_ok_and(|v: Value| want(&v)));
        serde_json::from_slice(&payload).unwrap()
    }

    /// Whether a message on `topic` that `want` accepts has already arrived (and was read past).
    fn has_seen_json(&self, topic: &str, want: impl Fn(&Value) -> bool) -> bool {
        let topic = format!("{ROOT}/{topic}");
        self.seen
            .iter()
            .any(|(t, p, _)| *t == topic && serde_json::from_slice(p).is_ok_and(|v: Value| want(&v)))
    }

    fn event(&mut self, kind: &str) -> Value {
        self.wait_json("events", |v| v["type"] == kind)
    }

    /// Sends command `name` and returns its ack.
    fn command(&mut self, name: &str, payload: &str) -> Value {
        self.client
            .publish(format!("{ROOT}/cmd/{name}"), QoS::AtLeastOnce, false, payload.as_bytes())
            .unwrap();
        let id = serde_json::from_str::<Value>(payload).ok().map(|v| v["command_id"].clone());
        self.wait_json(&format!("cmd/{name}/ack"), |v| id.as_ref().is_none_or(|id| &v["command_id"] == id))
    }

    fn summary(&self) -> Vec<String> {
        self.seen
            .iter()
            .map(|(t, p, r)| {
                format!("{t} {} {}", String::from_utf8_lossy(p), if *r { "(retained)" } else { "" })
            })
            .collect()
    }
}

fn config_text(state_dir: &Path, mqtt: Option<&str>, frame: &str) -> String {
    let mut text = format!(
        r#"
bay_id = "bay-t"
state_dir = "{}"

[inspection]
angles = ["Front", "Rear", "Left", "Right"]

[imaging]
max_long_edge = 640

[[cameras]]
id = "cam-a"
source = "synthetic:{frame}"
angles = ["Front", "Rear"]

[[cameras]]
id = "cam-b"
source = "synthetic:{frame}"
angles = ["Left", "Right"]
"#,
        state_dir.display()
    );
    if let Some(url) = mqtt {
        text.push_str(&format!("\n[mqtt]\nurl = \"{url}\"\nheartbeat = \"5s\"\n"));
    }
    text
}

fn start_daemon(config: Config, notifier: Notifier, watchdog: Option<Duration>, hooks: Hooks) -> Daemon {
    let rig = Rig::open(&config).unwrap();
    let deps = Deps {
        clock: Arc::new(SystemClock::new()),
        rig,
        upload: Box::new(CaptureOnly::default()),
        notifier,
        watchdog,
        config_path: None,
        hooks,
    };
    daemon::start(config, deps).unwrap()
}

fn stop(daemon: Daemon) {
    daemon.signal(Signal::Terminate);
    daemon.wait().unwrap();
}

#[test]
fn start_runs_from_inspection_started_to_inspection_uploaded() {
    let broker = Broker::start();
    let standin = StandIn::start(Default::default(), Arc::new(SystemClock::new())).unwrap();
    let state = tempfile::tempdir().unwrap();
    let secret = support::secret_file(state.path(), standin.config());
    let text = format!(
        "{}\n{}",
        config_text(&state.path().join("buffer"), Some(&broker.url()), "1600x1200"),
        support::cloud_toml(&standin.base_url(), &secret)
    );
    let config = config::parse(&text, "t").unwrap();
    let clock: Arc<dyn capture_kiosk::clock::Clock> = Arc::new(SystemClock::new());
    let leg = CloudLeg::open(&config, clock.clone()).unwrap().expect("a [cloud] section");
    let deps = Deps {
        clock,
        rig: Rig::open(&config).unwrap(),
        upload: Box::new(leg),
        notifier: Notifier::none(),
        watchdog: None,
        config_path: None,
        hooks: Hooks::default(),
    };
    let daemon = daemon::start(config, deps).unwrap();
    let mut w = Watcher::connect(&broker);
    w.wait("status", |p, _| p == b"online");
    let ack = w.command(
        "start",
        r#"{"command_id":"up-1","case_id":"CASE-UP","vehicle":{"vin":"JN1CV6AR9BM123456"}}"#,
    );
    assert_eq!(ack["status"], "accepted", "{ack}");
    let id = ack["inspection_id"].as_i64().unwrap();
    assert_eq!(w.event("inspection_started")["inspection_id"].as_i64(), Some(id));
    assert_eq!(w.event("inspection_captured")["images"], 4);
    let progress = w.event("upload_progress");
    assert_eq!((progress["images_sent"].as_u64(), progress["images_total"].as_u64()), (Some(4), Some(4)));
    let uploaded = w.event("inspection_uploaded");
    assert_eq!(
        (uploaded["inspection_id"].as_i64(), uploaded["case_id"].as_str()),
        (Some(id), Some("CASE-UP"))
    );
    assert_eq!(uploaded["images"], 4);
    let after = w.wait_json("state", |v| v["stage"] == "idle" && v["cloud"]["reachable"] == true);
    assert_eq!(after["buffer"]["awaiting_upload"], 0, "{after}");
    assert!(after["cloud"]["last_upload_at"].is_string(), "{after}");
    stop(daemon);

    let done: Vec<_> = standin.sessions().into_iter().filter(|s| s.completed).collect();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].case_id, "CASE-UP");
    assert_eq!(done[0].photos.len(), 4);
    assert_eq!(standin.secret_leaks(), 0);
    let text = w.summary().join("\n");
    assert!(!text.contains(&standin.config().api_secret), "the secret never reaches MQTT");
    let store = Store::open(
        &state.path().join("buffer"),
        Caps { max_bytes: 1 << 30, min_free_disk: 0 },
        std::time::SystemTime::now(),
    )
    .unwrap();
    assert_eq!(
        store.inspection(capture_kiosk::store::InspectionId(id)).unwrap().unwrap().state,
        InspectionState::Completed
    );
    standin.stop();
}

#[test]
fn a_camera_that_goes_away_is_reported_offline_then_online_again() {
    use capture_kiosk::capture::testcam::{Behaviour, SnapshotServer};
    let broker = Broker::start();
    let camera = SnapshotServer::start(support::jpeg(7, 60)).unwrap();
    let state = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
bay_id = "bay-t"
state_dir = "{}"

[inspection]
angles = ["Front"]
camera_probe_interval = "1s"

[[cameras]]
id = "ipcam"
source = "{}"
angles = ["Front"]
timeout = "1s"

[mqtt]
url = "{}"
"#,
        state.path().display(),
        camera.url(),
        broker.url()
    );
    let config = config::parse(&text, "t").unwrap();
    let daemon = start_daemon(config, Notifier::none(), None, Hooks::default());
    let mut w = Watcher::connect(&broker);
    w.wait_json("state", |v| v["cameras"]["ipcam"]["status"] == "online");
    camera.set_behaviour(Behaviour::Off);
    let offline = w.event("camera_offline");
    assert_eq!(offline["camera"], "ipcam");
    assert!(offline["reason"].as_str().is_some_and(|r| !r.is_empty()), "{offline}");
    w.wait_json("state", |v| v["cameras"]["ipcam"]["status"] == "offline");
    camera.set_behaviour(Behaviour::Serve);
    assert_eq!(w.event("camera_online")["camera"], "ipcam");
    // The next inspection uses it again.
    let ack = w.command("start", r#"{"command_id":"cam-1","case_id":"CASE-CAM"}"#);
    assert_eq!(ack["status"], "accepted", "{ack}");
    assert_eq!(w.event("inspection_captured")["images"], 1);
    stop(daemon);
}

#[test]
fn status_state_events_and_every_command_answered() {
    let broker = Broker::start();
    let state = tempfile::tempdir().unwrap();
    let config = config::parse(&config_text(state.path(), Some(&broker.url()), "1600x1200"), "t").unwrap();
    let daemon = start_daemon(config, Notifier::none(), None, Hooks::default());

    // A watcher connecting after the daemon gets the retained online and state.
    let mut w = Watcher::connect(&broker);
    w.wait("status", |p, _| p == b"online");
    // Retained: a newcomer gets it from the broker.
    Watcher::connect(&broker).wait("status", |p, retained| p == b"online" && retained);
    let idle = w.wait_json("state", |v| v["stage"] == "idle");
    assert_eq!(idle["buffer"]["inspections"], 0);
    assert_eq!(idle["lifecycle"], "ready");
    assert_eq!(idle["cloud"]["reachable"], false, "no [cloud]: capture only");
    assert!(idle["boot_id"].is_string() && idle["seq"].is_u64());

    // ping, and the same command id again: one answer, repeated.
    let ack = w.command("ping", r#"{"command_id":"p-1"}"#);
    assert_eq!(ack["status"], "succeeded");
    assert_eq!(w.command("ping", r#"{"command_id":"p-1"}"#), ack);

    // Refusals, each with a reason.
    let rejected = |ack: &Value, words: &str| {
        assert_eq!(ack["status"], "rejected", "{ack}");
        assert!(ack["reason"].as_str().unwrap().contains(words), "{ack} lacks {words:?}");
    };
    rejected(&w.command("ping", r#"{"command_id":"p-2","expires_at":"2020-01-01T00:00:00Z"}"#), "expired");
    rejected(&w.command("ping", r#"{"command_id":"p-3","colour":"red"}"#), "unknown field");
    rejected(&w.command("start", r#"{"command_id":"s-0","case_id":"../../etc/passwd"}"#), "case_id");
    rejected(
        &w.command("start", r#"{"command_id":"s-0b","case_id":"C-1","vehicle":{"vin":"NOPE"}}"#),
        "start",
    );
    rejected(
        &w.command("start", r#"{"command_id":"s-0c","case_id":"C-1","angles":["Roof"]}"#),
        "not shot by any camera",
    );
    rejected(&w.command("cancel", r#"{"command_id":"c-0"}"#), "no capture is running");
    rejected(&w.command("retry", r#"{"command_id":"r-0","inspection_id":99}"#), "no inspection 99");
    rejected(&w.command("reboot", r#"{"command_id":"x-0"}"#), "unknown command");
    w.client.publish(format!("{ROOT}/cmd/ping"), QoS::AtLeastOnce, false, &b"\xff{{not json"[..]).unwrap();
    let ack = w.wait_json("cmd/ping/ack", |v| v["command_id"].is_null());
    rejected(&ack, "not JSON");

    // Two starts in a row: the first captures, the second is refused while it runs.
    w.client
        .publish(
            format!("{ROOT}/cmd/start"),
            QoS::AtLeastOnce,
            false,
            &br#"{"command_id":"s-1","case_id":"CASE-12345","vehicle":{"vin":"JN1CV6AR9BM123456"}}"#[..],
        )
        .unwrap();
    rejected(&w.command("start", r#"{"command_id":"s-2","case_id":"CASE-2"}"#), "a capture is running");
    let ack = w.wait_json("cmd/start/ack", |v| v["command_id"] == "s-1");
    assert_eq!(ack["status"], "accepted");
    let id = ack["inspection_id"].as_i64().unwrap();
    let started = w.event("inspection_started");
    assert_eq!(
        (started["inspection_id"].as_i64(), started["case_id"].as_str()),
        (Some(id), Some("CASE-12345"))
    );
    // The state says capturing; it may have gone out before the ack (it is published as soon as
    // the job is handed to the capture thread), so earlier messages count.
    let capturing = |v: &Value| v["stage"] == "capturing" && v["inspection"]["case_id"] == "CASE-12345";
    if !w.has_seen_json("state", capturing) {
        w.wait_json("state", capturing);
    }
    let captured = w.event("inspection_captured");
    assert_eq!(captured["inspection_id"].as_i64(), Some(id));
    assert_eq!(captured["images"], 4);
    assert_eq!(captured["state"], "captured");
    let angle_events = w
        .seen
        .iter()
        .filter(|(t, p, _)| t.ends_with("/events") && String::from_utf8_lossy(p).contains("angle_captured"))
        .count();
    assert_eq!(angle_events, 4, "{:#?}", w.summary());
    // Each carries the image's quality scores (kept on the bay; the cloud has no field for them).
    for (_, payload, _) in w
        .seen
        .iter()
        .filter(|(t, p, _)| t.ends_with("/events") && String::from_utf8_lossy(p).contains("angle_captured"))
    {
        let event: Value = serde_json::from_slice(payload).unwrap();
        assert!(event["quality"]["sharpness"].as_f64().is_some(), "{event}");
        assert!(event["quality"].get("poor").is_some(), "{event}");
    }
    let after = w.wait_json("state", |v| v["stage"] == "idle" && v["buffer"]["inspections"] == 1);
    assert_eq!(after["buffer"]["images"], 4);
    assert!(after["seq"].as_u64() > idle["seq"].as_u64());

    // A repeated start is answered with its first outcome and captures nothing more.
    assert_eq!(w.command("start", r#"{"command_id":"s-1","case_id":"CASE-12345"}"#), ack);
    rejected(
        &w.command("retry", &json!({"command_id": "r-1", "inspection_id": id}).to_string()),
        "only a failed",
    );

    // SIGTERM: a clean stop says offline itself.
    stop(daemon);
    w.wait("status", |p, _| p == b"offline");
    Watcher::connect(&broker).wait("status", |p, retained| p == b"offline" && retained);
    let store = Store::open(
        state.path(),
        Caps { max_bytes: 1 << 30, min_free_disk: 0 },
        std::time::SystemTime::now(),
    )
    .unwrap();
    assert_eq!(store.list().unwrap().len(), 1, "the repeated start captured nothing");
}

#[test]
fn the_last_will_says_offline_when_the_daemon_is_killed_and_a_restart_says_online() {
    let broker = Broker::start();
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("bay.toml");
    std::fs::write(&file, config_text(&state.path().join("state"), Some(&broker.url()), "320x240")).unwrap();
    let mut w = Watcher::connect(&broker);
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_capture-kiosk"))
            .args(["run", "--config"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut kiosk = run();
    w.wait("status", |p, _| p == b"online");
    let start = r#"{"command_id":"before-kill","case_id":"CASE-K","angles":["Front"]}"#;
    let first = w.command("start", start);
    assert_eq!(first["status"], "accepted", "{first}");
    let inspection = first["inspection_id"].as_i64().expect("the accepted start names its inspection");
    w.event("inspection_captured");
    kiosk.kill().unwrap();
    kiosk.wait().unwrap();
    // Live subscribers get the will without the retain flag (MQTT 3.1.1).
    w.wait("status", |p, _| p == b"offline");
    // Retained: a newcomer learns it too.
    let mut late = Watcher::connect(&broker);
    late.wait("status", |p, retained| p == b"offline" && retained);

    let mut kiosk = run();
    w.wait("status", |p, _| p == b"online");
    // The same start after the restart: its first answer again, and no second inspection.
    let seen_before = w.seen.len();
    let again = w.command("start", start);
    assert_eq!(
        (&again["status"], again["inspection_id"].as_i64()),
        (&first["status"], Some(inspection)),
        "{again}"
    );
    assert_eq!(w.command("ping", r#"{"command_id":"after-restart"}"#)["status"], "succeeded");
    let started: Vec<_> = w.seen[seen_before..]
        .iter()
        .filter(|(t, p, _)| {
            t.ends_with("/events") && String::from_utf8_lossy(p).contains("inspection_started")
        })
        .collect();
    assert!(started.is_empty(), "the repeated start ran again: {started:?}");
    // SIGTERM through the real signal handler.
    unsafe { libc::kill(kiosk.id() as i32, libc::SIGTERM) };
    let status = kiosk.wait().unwrap();
    let mut stderr = String::new();
    kiosk.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    w.wait("status", |p, _| p == b"offline");
}

#[test]
fn an_inspection_survives_the_broker_going_away_and_status_resumes() {
    let mut broker = Broker::start();
    let state = tempfile::tempdir().unwrap();
    // Big frames so that the capture outlasts the broker's absence.
    let config = config::parse(&config_text(state.path(), Some(&broker.url()), "4032x3024"), "t").unwrap();
    let daemon = start_daemon(config, Notifier::none(), None, Hooks::default());
    let mut w = Watcher::connect(&broker);
    w.wait("status", |p, _| p == b"online");
    w.client
        .publish(
            format!("{ROOT}/cmd/start"),
            QoS::AtLeastOnce,
            false,
            &br#"{"command_id":"s-1","case_id":"CASE-7"}"#[..],
        )
        .unwrap();
    let started = w.event("inspection_started");
    let id = started["inspection_id"].as_i64().unwrap();
    let trigger = std::time::SystemTime::now();
    broker.kill();
    std::thread::sleep(Duration::from_millis(300));
    broker.restart();

    // The kiosk comes back by itself, says online again and publishes the current state.
    let mut w = Watcher::connect(&broker);
    w.wait("status", |p, _| p == b"online");
    w.wait_json("state", |v| {
        v["stage"] == "idle" && v["buffer"]["inspections"] == 1 && v["buffer"]["images"] == 4
    });
    assert_eq!(w.command("ping", r#"{"command_id":"back"}"#)["status"], "succeeded");
    let ack = w.command("start", r#"{"command_id":"s-2","case_id":"CASE-8","angles":["Front"]}"#);
    assert_eq!(ack["status"], "accepted", "{ack}");
    w.event("inspection_captured");
    stop(daemon);

    let store = Store::open(
        state.path(),
        Caps { max_bytes: 1 << 30, min_free_disk: 0 },
        std::time::SystemTime::now(),
    )
    .unwrap();
    let first = store.inspection(capture_kiosk::store::InspectionId(id)).unwrap().unwrap();
    assert_eq!(first.state, InspectionState::Captured);
    assert_eq!(first.images, 4);
    // Capture times are the cameras' moments, untouched by the broker's absence.
    for image in store.images(first.id).unwrap() {
        let lag = image.captured_at.duration_since(trigger).unwrap_or_default();
        assert!(lag < Duration::from_secs(60), "{:?}", image.angle);
    }
}

#[test]
fn ready_and_watchdog_reach_the_notify_socket_and_a_wedged_loop_stops_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path: PathBuf = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let config = config::parse(&config_text(&dir.path().join("state"), None, "320x240"), "t").unwrap();
    let hooks = Hooks::default();
    let daemon = start_daemon(
        config,
        Notifier::to(socket_path.to_str().unwrap()),
        Some(Duration::from_secs(1)),
        hooks.clone(),
    );
    let watch = |period: Duration| {
        let deadline = Instant::now() + period;
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        got
    };
    let first = watch(Duration::from_millis(1500));
    assert!(first.iter().any(|m| m == "READY=1"), "{first:?}");
    // The start timeout is extended before the buffer is opened (and checked), not after.
    let extend = first.iter().position(|m| m.starts_with("EXTEND_TIMEOUT_USEC="));
    let ready = first.iter().position(|m| m == "READY=1");
    assert!(extend.is_some_and(|e| Some(e) < ready), "{first:?}");
    assert!(first.iter().any(|m| m == "WATCHDOG=1"), "{first:?}");
    assert!(first.iter().any(|m| m.starts_with("STATUS=stage idle, 0 inspections buffered")), "{first:?}");

    hooks.wedge_capture.store(true, Ordering::SeqCst);
    watch(Duration::from_millis(700));
    let wedged = watch(Duration::from_millis(1500));
    assert!(!wedged.iter().any(|m| m == "WATCHDOG=1"), "fed while wedged: {wedged:?}");

    hooks.wedge_capture.store(false, Ordering::SeqCst);
    let freed = watch(Duration::from_millis(1500));
    assert!(freed.iter().any(|m| m == "WATCHDOG=1"), "{freed:?}");
    stop(daemon);
    let last = watch(Duration::from_millis(200));
    assert!(last.iter().any(|m| m == "STOPPING=1"), "{last:?}");
}
