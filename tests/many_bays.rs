//! A fleet on one broker: 20 `capture-kiosk run` processes (synthetic cameras, small frames,
//! each its own bay id, buffer and configuration) on one Mosquitto and one stand-in of the
//! cloud. Every bay gets a `start` at once; every ack, every upload (exactly once, by the
//! stand-in's record) and every bay's retained state are checked. It prints the broker's
//! message rate (everything on `#`, as one subscriber sees it) and the slowest bay's time from
//! the `start` to `inspection_uploaded`: the figures of `docs/fleet.md`.
//!
//! `CAPTURE_KIOSK_BAYS=N` runs another fleet size (the suite runs 20).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_kiosk::clock::SystemClock;
use capture_kiosk::standin::{StandIn, StandInConfig};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

const PREFIX: &str = "fleet";
const DEADLINE: Duration = Duration::from_secs(45);

/// One message as the subscriber on `#` saw it.
struct Seen {
    at: Instant,
    topic: String,
    payload: Vec<u8>,
    retained: bool,
}

/// A subscriber to `filter` that also publishes; every message goes to a channel.
struct Watcher {
    client: Client,
    messages: Receiver<Seen>,
}

impl Watcher {
    fn connect(port: u16, filter: &str) -> Watcher {
        let mut options = MqttOptions::new(format!("fleet-watcher-{}", fastrand::u32(..)), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(10));
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = Client::new(options, 1024);
        client.subscribe(filter, QoS::AtLeastOnce).unwrap();
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let seen = Seen {
                            at: Instant::now(),
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retained: p.retain,
                        };
                        if tx.send(seen).is_err() {
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

    /// The next message, or `None` once `deadline` passed.
    fn next(&self, deadline: Instant) -> Option<Seen> {
        self.messages.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok()
    }
}

/// `{PREFIX}/{bay}/{rest}` split into the bay and the rest.
fn split(topic: &str) -> Option<(&str, &str)> {
    topic.strip_prefix(PREFIX)?.strip_prefix('/')?.split_once('/')
}

fn bay_id(i: usize) -> String {
    format!("bay-{i:03}")
}

/// Writes bay `i`'s configuration in its own directory.
fn bay_config(dir: &Path, i: usize, broker_port: u16, standin: &StandIn) -> PathBuf {
    let secret = support::secret_file(dir, standin.config());
    let account = StandInConfig::default();
    let config = dir.join("bay.toml");
    std::fs::write(
        &config,
        format!(
            r#"bay_id = "{bay}"
state_dir = "{state}"
[inspection]
angles = ["Front", "Rear"]
[imaging]
max_long_edge = 320
[[cameras]]
id = "cam"
source = "synthetic:320x240"
angles = ["Front", "Rear"]
[mqtt]
url = "mqtt://127.0.0.1:{broker_port}"
topic_prefix = "{PREFIX}"
[cloud]
base_url = "{url}"
username = "{user}"
api_key = "{key}"
client_id = "{bay}"
api_secret_file = "{secret}"
request_timeout = "10s"
"#,
            bay = bay_id(i),
            state = dir.join("state").display(),
            url = standin.base_url(),
            user = account.username,
            key = account.api_key,
            secret = secret.display(),
        ),
    )
    .unwrap();
    config
}

/// The running daemons; each is stopped with SIGTERM (then killed) on drop.
struct Fleet(Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &self.0 {
            // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for child in &mut self.0 {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn twenty_bays_on_one_broker_each_ack_upload_once_and_keep_their_own_retained_state() {
    let bays: usize = std::env::var("CAPTURE_KIOSK_BAYS").ok().and_then(|n| n.parse().ok()).unwrap_or(20);
    let tmp = tempfile::tempdir().unwrap();
    let (broker_port, mut broker) = support::mosquitto(tmp.path(), "allow_anonymous true\n");
    let standin = StandIn::start(StandInConfig::default(), Arc::new(SystemClock::new())).unwrap();
    let watcher = Watcher::connect(broker_port, "#");

    let mut fleet = Fleet(Vec::new());
    for i in 0..bays {
        let dir = tmp.path().join(bay_id(i));
        std::fs::create_dir_all(&dir).unwrap();
        let config = bay_config(&dir, i, broker_port, &standin);
        let log = std::fs::File::create(dir.join("kiosk.log")).unwrap();
        fleet.0.push(
            Command::new(env!("CARGO_BIN_EXE_capture-kiosk"))
                .env_remove("CAPTURE_KIOSK_LOG")
                .args(["run", "--config"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }
    let logs =
        |bay: &str| std::fs::read_to_string(tmp.path().join(bay).join("kiosk.log")).unwrap_or_default();

    // Every bay online.
    let launched = Instant::now();
    let deadline = launched + DEADLINE;
    let mut online = BTreeSet::new();
    while online.len() < bays {
        let Some(m) = watcher.next(deadline) else {
            let missing: Vec<String> = (0..bays).map(bay_id).filter(|b| !online.contains(b)).collect();
            panic!("bays never said online: {missing:?}; first log: {}", logs(&missing[0]));
        };
        if let Some((bay, "status")) = split(&m.topic) {
            if m.payload == b"online" {
                online.insert(bay.to_owned());
            }
        }
    }
    let ready_after = launched.elapsed();

    // A start to every bay at once.
    let triggered = Instant::now();
    for i in 0..bays {
        let bay = bay_id(i);
        let payload = format!(r#"{{"command_id":"go-{bay}","case_id":"CASE-{bay}"}}"#);
        watcher
            .client
            .publish(format!("{PREFIX}/{bay}/cmd/start"), QoS::AtLeastOnce, false, payload)
            .unwrap();
    }

    let mut acks: BTreeMap<String, Value> = BTreeMap::new();
    let mut uploaded: BTreeMap<String, Duration> = BTreeMap::new();
    let mut messages = 0u64;
    let mut last = triggered;
    let deadline = triggered + DEADLINE;
    while uploaded.len() < bays || acks.len() < bays {
        let Some(m) = watcher.next(deadline) else {
            let missing: Vec<String> = (0..bays).map(bay_id).filter(|b| !uploaded.contains_key(b)).collect();
            panic!(
                "within {DEADLINE:?}: {} acks, {} uploads; not uploaded: {missing:?}; log of {}: {}",
                acks.len(),
                uploaded.len(),
                missing.first().cloned().unwrap_or_default(),
                missing.first().map(|b| logs(b)).unwrap_or_default()
            );
        };
        messages += 1;
        last = m.at;
        let Some((bay, rest)) = split(&m.topic) else { continue };
        let json = || serde_json::from_slice::<Value>(&m.payload).unwrap_or(Value::Null);
        match rest {
            "cmd/start/ack" => {
                let ack = json();
                assert_eq!(ack["command_id"], format!("go-{bay}"), "{bay} answers its own command");
                assert!(acks.insert(bay.to_owned(), ack).is_none(), "{bay} acked twice");
            }
            "events" => {
                let event = json();
                if event["type"] == "inspection_uploaded" {
                    assert_eq!(event["case_id"], format!("CASE-{bay}"), "{event}");
                    let took = m.at.duration_since(triggered);
                    assert!(uploaded.insert(bay.to_owned(), took).is_none(), "{bay} uploaded twice");
                }
                assert_ne!(event["type"], "inspection_failed", "{bay}: {event}");
            }
            _ => {}
        }
    }
    let busy = last.duration_since(triggered);
    for (bay, ack) in &acks {
        assert_eq!(ack["status"], "accepted", "{bay}: {ack}");
    }

    // The stand-in's record: one completed session per bay, every image stored once.
    let sessions = standin.sessions();
    assert_eq!(sessions.len(), bays, "one session per bay, none opened twice");
    for i in 0..bays {
        let bay = bay_id(i);
        let mine: Vec<_> = sessions.iter().filter(|s| s.case_id == format!("CASE-{bay}")).collect();
        assert_eq!(mine.len(), 1, "{bay}: {mine:#?}");
        let s = mine[0];
        assert_eq!(s.client_id, bay, "the session belongs to the bay that asked");
        assert!(s.completed && s.completions == 1, "{bay} completed once: {s:#?}");
        assert_eq!(s.labels(), vec!["Front", "Rear"]);
        assert!(s.photos.iter().all(|p| p.stores == 1), "{bay} stored every image once: {s:#?}");
    }
    assert_eq!(standin.completes_after_consumed(), 0);
    assert_eq!(standin.secret_leaks(), 0);

    // Each bay's retained state, as a newcomer reads it: idle, nothing waiting, reachable.
    let late = Watcher::connect(broker_port, &format!("{PREFIX}/+/state"));
    // The first state a newcomer gets from each bay is the retained one; a bay whose retained
    // state predates the upload by a moment settles with its next state.
    let mut settled = BTreeSet::new();
    let mut latest: BTreeMap<String, Value> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while settled.len() < bays {
        let Some(m) = late.next(deadline) else {
            panic!("retained states not settled: {latest:#?}");
        };
        let Some((bay, "state")) = split(&m.topic) else { continue };
        let state: Value = serde_json::from_slice(&m.payload).unwrap();
        if !latest.contains_key(bay) {
            assert!(m.retained, "{bay}: the first state a newcomer gets is retained");
            assert_eq!(state["lifecycle"], "ready", "{bay}: {state}");
        }
        if state["stage"] == "idle"
            && state["buffer"]["awaiting_upload"] == 0
            && state["cloud"]["reachable"] == true
        {
            settled.insert(bay.to_owned());
        }
        latest.insert(bay.to_owned(), state);
    }
    assert_eq!(latest.len(), bays, "exactly the fleet's bays hold a state: {:?}", latest.keys());

    let slowest = uploaded.iter().max_by_key(|(_, t)| **t).map(|(b, t)| (b.clone(), *t)).unwrap();
    let mut times: Vec<Duration> = uploaded.values().copied().collect();
    times.sort();
    let median = times[times.len() / 2];
    let rate = messages as f64 / busy.as_secs_f64().max(0.001);
    println!(
        "many bays: {bays} bays online {:.2} s after launch; start to every bay at once: {messages} messages on '#' in {:.2} s ({rate:.0} msg/s); trigger to inspection_uploaded: median {:.2} s, slowest {:.2} s ({})",
        ready_after.as_secs_f64(),
        busy.as_secs_f64(),
        median.as_secs_f64(),
        slowest.1.as_secs_f64(),
        slowest.0
    );
    drop(fleet);
    let _ = broker.kill();
    let _ = broker.wait();
}
