//! The daemon against a real Mosquitto that each test starts on its own free port: retained
//! status and the Last Will, state, events of an inspection, every command answered, the broker
//! going away mid-inspection, and systemd's READY / WATCHDOG on a datagram socket.

mod support;

use std::io::Read;
use std::net::TcpStream;
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
    /// Lines added to the configuration.
    extra: String,
}

impl Broker {
    fn start() -> Broker {
        Broker::start_with("")
    }

    fn start_with(extra: &str) -> Broker {
        let port = support::free_port();
        let mut broker =
            Broker { dir: tempfile::tempdir().unwrap(), port, child: None, extra: extra.to_owned() };
        broker.restart();
        broker
    }

    fn restart(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\n{}",
                self.port, self.extra
            ),
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
        // Room for the oversized commands the tests send (and see again on the bay's topics).
        options.set_max_packet_size(16 << 20, 16 << 20);
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
        // Generous: under qemu, with the other tests of this file running, four 12 MP frames
        // have taken more than 20 s. A message that arrives ends the wait at once.
        let deadline = Instant::now() + Duration::from_secs(90);
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
    let offline_state = |v: &Value| v["cameras"]["ipcam"]["status"] == "offline";
    if !w.has_seen_json("state", offline_state) {
        w.wait_json("state", offline_state);
    }
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

#[test]
fn status_and_answers_never_wait_for_the_captures_hold_on_the_buffer() {
    let broker = Broker::start();
    let state = tempfile::tempdir().unwrap();
    let config = config::parse(&config_text(state.path(), Some(&broker.url()), "320x240"), "t").unwrap();
    let hooks = Hooks::default();
    let daemon = start_daemon(config, Notifier::none(), None, hooks.clone());
    let mut w = Watcher::connect(&broker);
    w.wait("status", |p, _| p == b"online");
    let ack = w.command("start", r#"{"command_id":"h-1","case_id":"CASE-HOLD"}"#);
    assert_eq!(ack["status"], "accepted", "{ack}");
    w.event("inspection_captured");
    // The capture thread holds its handle on the buffer, as a commit in a stuck fsync would.
    hooks.hold_buffer.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(600));
    let asked = Instant::now();
    let ack = w.command("ping", r#"{"command_id":"h-2"}"#);
    assert_eq!(ack["status"], "succeeded", "{ack}");
    // A state still goes out, with the buffer read as it is, and a retry is still answered.
    let seen = w.wait_json("state", |v| v["buffer"]["inspections"] == 1 && v["seq"].as_u64().is_some());
    assert_eq!(seen["buffer"]["images"], 4, "{seen}");
    let ack = w.command("retry", r#"{"command_id":"h-3","inspection_id":1}"#);
    assert_eq!(ack["status"], "rejected", "{ack}");
    assert!(ack["reason"].as_str().is_some_and(|r| r.contains("only a failed or cancelled")), "{ack}");
    assert!(asked.elapsed() < Duration::from_secs(8), "answers waited {:?}", asked.elapsed());
    hooks.hold_buffer.store(false, Ordering::SeqCst);
    stop(daemon);
}

/// A command padded to about `kib` KiB, its `command_id` first.
fn padded(id: &str, kib: usize) -> String {
    format!(r#"{{"command_id":"{id}","pad":"{}"}}"#, "x".repeat(kib * 1024))
}

/// Waits until every id in `ids` has an ack on `cmd/{name}/ack` (seen before or now) and returns
/// them by id.
fn acks_for(w: &mut Watcher, name: &str, ids: &[String]) -> std::collections::HashMap<String, Value> {
    let topic = format!("{ROOT}/cmd/{name}/ack");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found: std::collections::HashMap<String, Value> = w
            .seen
            .iter()
            .filter(|(t, _, _)| *t == topic)
            .filter_map(|(_, p, _)| serde_json::from_slice::<Value>(p).ok())
            .filter_map(|v| v["command_id"].as_str().map(|id| (id.to_owned(), v.clone())))
            .filter(|(id, _)| ids.contains(id))
            .collect();
        if found.len() == ids.len() {
            return found;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match w.messages.recv_timeout(left) {
            Ok(m) => w.seen.push(m),
            Err(_) => {
                let missing: Vec<_> = ids.iter().filter(|id| !found.contains_key(*id)).collect();
                panic!("no ack for {missing:?}; seen: {:#?}", w.summary().len());
            }
        }
    }
}

/// How many acks on any `cmd/*/ack` topic carry `id`.
fn ack_count(w: &Watcher, id: &str) -> usize {
    w.seen
        .iter()
        .filter(|(t, _, _)| t.ends_with("/ack"))
        .filter(|(_, p, _)| serde_json::from_slice::<Value>(p).is_ok_and(|v| v["command_id"] == id))
        .count()
}

fn status_went_offline(w: &Watcher) -> bool {
    w.seen.iter().any(|(t, p, _)| *t == format!("{ROOT}/status") && p == b"offline")
}

#[test]
fn oversized_commands_are_refused_and_answered_without_losing_the_connection() {
    let broker = Broker::start();
    let state = tempfile::tempdir().unwrap();
    let config = config::parse(&config_text(state.path(), Some(&broker.url()), "320x240"), "t").unwrap();
    let daemon = start_daemon(config, Notifier::none(), None, Hooks::default());
    let mut w = Watcher::connect(&broker);
    w.wait("status", |p, _| p == b"online");

    let refused_for_size = |ack: &Value, size: usize| {
        assert_eq!(ack["status"], "rejected", "{ack}");
        let reason = ack["reason"].as_str().unwrap_or("");
        assert!(reason.contains(&size.to_string()) && reason.contains("16384"), "{ack}");
    };
    for (id, kib) in [("big-70", 70), ("big-500", 500)] {
        let payload = padded(id, kib);
        refused_for_size(&w.command("start", &payload), payload.len());
    }

    // A burst: good commands interleaved with oversized ones, sent without waiting.
    let mut good = Vec::new();
    let mut big = Vec::new();
    for i in 0..60 {
        let id = format!("burst-{i}");
        let payload = format!(r#"{{"command_id":"{id}"}}"#);
        w.client.publish(format!("{ROOT}/cmd/ping"), QoS::AtLeastOnce, false, payload.as_bytes()).unwrap();
        good.push(id);
        if i % 5 == 0 {
            let id = format!("burst-big-{i}");
            let payload = padded(&id, 20 + i * 15);
            w.client
                .publish(format!("{ROOT}/cmd/ping"), QoS::AtLeastOnce, false, payload.into_bytes())
                .unwrap();
            big.push(id);
        }
    }
    let all: Vec<String> = good.iter().chain(&big).cloned().collect();
    let acks = acks_for(&mut w, "ping", &all);
    for id in &good {
        assert_eq!(acks[id]["status"], "succeeded", "{}", acks[id]);
    }
    for id in &big {
        assert_eq!(acks[id]["status"], "rejected", "{}", acks[id]);
        assert!(
            acks[id]["reason"].as_str().unwrap().contains("over the limit of 16384 bytes"),
            "{}",
            acks[id]
        );
    }
    // A last command behind everything: once it is answered, nothing else is on its way.
    assert_eq!(w.command("ping", r#"{"command_id":"last"}"#)["status"], "succeeded");
    for id in &all {
        assert_eq!(ack_count(&w, id), 1, "{id} answered once");
    }
    assert!(!status_went_offline(&w), "the status flapped: {:#?}", w.summary().len());
    stop(daemon);
}

#[test]
fn a_message_over_what_the_kiosk_reads_costs_one_reconnect_and_nothing_is_answered_twice() {
    let broker = Broker::start();
    let state = tempfile::tempdir().unwrap();
    let config = config::parse(&config_text(state.path(), Some(&broker.url()), "320x240"), "t").unwrap();
    let daemon = start_daemon(config, Notifier::none(), None, Hooks::default());
    let mut w = Watcher::connect(&broker);
    w.wait("status", |p, _| p == b"online");
    assert_eq!(w.command("ping", r#"{"command_id":"before"}"#)["status"], "succeeded");

    // 5 MiB: more than the client reads. The connection goes, and comes back by itself.
    let huge = padded("huge", 5 * 1024);
    w.client.publish(format!("{ROOT}/cmd/ping"), QoS::AtLeastOnce, false, huge.into_bytes()).unwrap();
    w.wait("status", |p, _| p == b"offline");
    w.wait("status", |p, _| p == b"online");
    let error = w.event("error");
    let reason = error["reason"].as_str().unwrap_or("");
    assert!(reason.contains("message_size_limit"), "{error}");
    assert_eq!(w.command("ping", r#"{"command_id":"after"}"#)["status"], "succeeded");
    assert_eq!(w.command("ping", r#"{"command_id":"last"}"#)["status"], "succeeded");
    for id in ["before", "after", "last"] {
        assert_eq!(ack_count(&w, id), 1, "{id} answered once");
    }
    assert_eq!(ack_count(&w, "huge"), 0, "a message that was never read cannot be answered");
    stop(daemon);
}

#[test]
fn with_the_recommended_broker_limit_a_huge_message_costs_nothing() {
    // The README's recommendation: the broker refuses what the kiosk would not read.
    let broker = Broker::start_with("message_size_limit 1048576\n");
    let state = tempfile::tempdir().unwrap();
    let config = config::parse(&config_text(state.path(), Some(&broker.url()), "320x240"), "t").unwrap();
    let daemon = start_daemon(config, Notifier::none(), None, Hooks::default());
    let mut w = Watcher::connect(&broker);
    w.wait("status", |p, _| p == b"online");
    let huge = padded("huge", 5 * 1024);
    w.client.publish(format!("{ROOT}/cmd/ping"), QoS::AtLeastOnce, false, huge.into_bytes()).unwrap();
    let near = padded("near-limit", 900);
    let ack = w.command("ping", &near);
    assert_eq!(ack["status"], "rejected", "{ack}");
    assert_eq!(w.command("ping", r#"{"command_id":"after"}"#)["status"], "succeeded");
    assert!(!status_went_offline(&w), "the status flapped: {:#?}", w.summary().len());
    assert_eq!(ack_count(&w, "huge"), 0);
    stop(daemon);
}

#[test]
fn the_daemon_prunes_completed_inspections_past_retention_on_its_own_clock() {
    use capture_kiosk::clock::ManualClock;
    use capture_kiosk::vehicle::PhotoLabel;
    let broker = Broker::start();
    let state = tempfile::tempdir().unwrap();
    let day = Duration::from_secs(86_400);
    let now = std::time::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let caps = Caps { max_bytes: 1 << 30, min_free_disk: 0 };
    let (old, recent, waiting) = {
        let mut store = Store::open(state.path(), caps, now - 30 * day).unwrap();
        let mut completed_at = |case: &str, at| {
            let id = support::captured(&mut store, case, &[PhotoLabel::Front], 20, now - 30 * day);
            store.set_state(id, InspectionState::Uploading, None, at).unwrap();
            store.set_state(id, InspectionState::Completed, None, at).unwrap();
            id
        };
        let old = completed_at("CASE-OLD", now - 8 * day);
        let recent = completed_at("CASE-RECENT", now - day);
        let waiting = support::captured(&mut store, "CASE-WAITING", &[PhotoLabel::Front], 20, now - 30 * day);
        (old, recent, waiting)
    };
    let text = format!(
        "{}\n[buffer]\ncompleted_retention = \"7 days\"\n",
        config_text(state.path(), Some(&broker.url()), "320x240")
    );
    let config = config::parse(&text, "t").unwrap();
    let clock = ManualClock::starting_at(now);
    let deps = Deps {
        clock: Arc::new(clock.clone()),
        rig: Rig::open(&config).unwrap(),
        upload: Box::new(CaptureOnly::default()),
        notifier: Notifier::none(),
        watchdog: None,
        config_path: None,
        hooks: Hooks::default(),
    };
    let daemon = daemon::start(config, deps).unwrap();
    let mut w = Watcher::connect(&broker);
    // At start: the inspection completed eight days ago goes, the rest stays.
    w.wait_json("state", |v| v["buffer"]["inspections"] == 2);
    // Seven days later on the daemon's clock, the next run of the rule takes the other one.
    clock.advance(7 * day);
    w.wait_json("state", |v| v["buffer"]["inspections"] == 1);
    stop(daemon);

    let store = Store::open(state.path(), caps, now).unwrap();
    let left: Vec<_> = store.list().unwrap().into_iter().map(|i| i.id).collect();
    assert_eq!(left, vec![waiting], "only what was never uploaded stays");
    assert!(store.inspection(old).unwrap().is_none() && store.inspection(recent).unwrap().is_none());
}

/// Reads a child's stderr on a thread (a full pipe would stall it) until it closes.
fn collect_stderr(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    })
}

#[test]
fn run_asks_for_start_time_before_opening_the_buffer_and_opens_it_as_one_owner() {
    let standin = StandIn::start(Default::default(), Arc::new(SystemClock::new())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = support::secret_file(dir.path(), standin.config());
    let file = dir.path().join("bay.toml");
    // A fresh state directory: its first open creates the buffer and logs the migration.
    std::fs::write(
        &file,
        format!(
            "{}\n{}",
            config_text(&dir.path().join("state"), None, "320x240"),
            support::cloud_toml(&standin.base_url(), &secret)
        ),
    )
    .unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut kiosk = Command::new(env!("CARGO_BIN_EXE_capture-kiosk"))
        .args(["run", "-v", "--config"])
        .arg(&file)
        .env("NOTIFY_SOCKET", &socket_path)
        .env_remove("CAPTURE_KIOSK_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = collect_stderr(&mut kiosk);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 512];
    while !got.iter().any(|m| m == "READY=1") {
        assert!(Instant::now() < deadline, "no READY=1: {got:?}");
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    unsafe { libc::kill(kiosk.id() as i32, libc::SIGTERM) };
    let status = kiosk.wait().unwrap();
    let log = stderr.join().unwrap();
    assert!(status.success(), "{status}: {log}");
    let extend = got.iter().position(|m| m.starts_with("EXTEND_TIMEOUT_USEC="));
    let ready = got.iter().position(|m| m == "READY=1");
    assert!(extend.is_some_and(|e| Some(e) < ready), "{got:?}");
    // The request for more time comes before anything opens the buffer, upload side included.
    let asked = log.find("More start time asked of systemd").expect("the request for time is logged at -v");
    let created = log.find("Buffer schema migrated").expect("the fresh buffer's creation is logged");
    assert!(asked < created, "the buffer was opened before systemd was asked for time:\n{log}");
    assert!(!log.contains("held by another process"), "the daemon took itself for another process:\n{log}");
    standin.stop();
}

#[test]
fn the_watchdog_is_fed_while_an_upload_waits_on_a_slow_request() {
    use capture_kiosk::standin::FaultKind;
    use capture_kiosk::vehicle::PhotoLabel;
    let standin = StandIn::start(Default::default(), Arc::new(SystemClock::new())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = support::secret_file(dir.path(), standin.config());
    let state_dir = dir.path().join("state");
    {
        let caps = Caps { max_bytes: 1 << 30, min_free_disk: 0 };
        let mut store = Store::open(&state_dir, caps, std::time::SystemTime::now()).unwrap();
        support::captured(
            &mut store,
            "CASE-SLOW",
            &[PhotoLabel::Front, PhotoLabel::Rear],
            100,
            std::time::SystemTime::now(),
        );
    }
    let text = format!(
        "{}\n{}",
        config_text(&state_dir, None, "320x240"),
        support::cloud_toml(&standin.base_url(), &secret)
    );
    let config = config::parse(&text, "t").unwrap();
    // The upload is held three seconds without a byte of answer (well within the request
    // deadline of ten), six times the half-interval a loop may stay silent.
    standin.stall_next_requests(1, Duration::from_secs(3), Some("/api/upload"));
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let clock: Arc<dyn capture_kiosk::clock::Clock> = Arc::new(SystemClock::new());
    let leg = CloudLeg::open(&config, clock.clone()).unwrap().expect("a [cloud] section");
    let deps = Deps {
        clock,
        rig: Rig::open(&config).unwrap(),
        upload: Box::new(leg),
        notifier: Notifier::to(socket_path.to_str().unwrap()),
        watchdog: Some(Duration::from_secs(1)),
        config_path: None,
        hooks: Hooks::default(),
    };
    let daemon = daemon::start(config, deps).unwrap();
    let mut feeds = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 512];
    while !standin.sessions().iter().any(|s| s.completed) {
        assert!(Instant::now() < deadline, "the upload did not finish: {:#?}", standin.requests());
        if let Ok(n) = socket.recv(&mut buf) {
            if &buf[..n] == b"WATCHDOG=1" {
                feeds.push(Instant::now());
            }
        }
    }
    let finished = Instant::now();
    stop(daemon);
    assert!(standin.requests().iter().any(|r| r.fault == Some(FaultKind::Stalled)), "the stall happened");
    // Fed every half interval or so all along, stall included.
    let mut gaps: Vec<Duration> = feeds.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.push(finished - *feeds.last().expect("the watchdog was fed"));
    let longest = gaps.iter().max().copied().unwrap_or_default();
    assert!(longest < Duration::from_millis(1600), "the watchdog went unfed for {longest:?}: {gaps:?}");
    standin.stop();
}
