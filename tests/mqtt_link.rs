//! `mqtt::Link` through its API against a real Mosquitto on 127.0.0.1: what it publishes and
//! in which order, what a stop leaves retained, a broker that restarts (the subscription,
//! `online` and the state come back), and a stop with no broker at all.

mod support;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use capture_kiosk::config::MqttConfig;
use capture_kiosk::mqtt::{Link, LinkEvent};
use support::{Probe, ProbeSeen};

const ROOT: &str = "capture-kiosk/bay-link";

fn broker(dir: &std::path::Path, port: u16) -> support::Mosquitto {
    let conf = format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n");
    support::mosquitto_conf(dir, &conf, port)
}

/// Starts a link to 127.0.0.1:`port`; what it tells its owner comes out of the receiver.
fn link(port: u16) -> (Link, mpsc::Receiver<LinkEvent>) {
    let config = MqttConfig::from_url(&format!("mqtt://127.0.0.1:{port}")).unwrap();
    let (tx, heard) = mpsc::channel();
    let link = Link::start(&config, "bay-link", Box::new(move |e| drop(tx.send(e)))).unwrap();
    (link, heard)
}

/// Waits (up to 20 s) for the next event `want` accepts.
fn wait(heard: &mpsc::Receiver<LinkEvent>, want: impl Fn(&LinkEvent) -> bool) -> LinkEvent {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match heard.recv_timeout(left) {
            Ok(event) if want(&event) => return event,
            Ok(_) => {}
            Err(e) => panic!("the link did not tell what was awaited: {e}"),
        }
    }
}

fn operator(port: u16, name: &str) -> Probe {
    let mut operator = Probe::connect(port, name, None);
    assert!(operator.subscribe(&format!("{ROOT}/#")));
    operator
}

/// The messages `probe` received on `state` and `events`, as `topic payload`.
fn state_and_events(probe: &mut Probe) -> Vec<String> {
    probe.drain();
    probe
        .messages_under(ROOT)
        .into_iter()
        .filter_map(|m| m.strip_prefix(&format!("{ROOT}/")).map(str::to_owned))
        .filter(|m| m.starts_with("state ") || m.starts_with("events "))
        .collect()
}

#[test]
fn mqtt_link_puts_events_before_their_state_and_a_stop_leaves_the_last_state_and_offline_retained() {
    let tmp = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let _broker = broker(tmp.path(), port);
    let mut watcher = operator(port, "watcher");
    let (link, heard) = link(port);
    wait(&heard, |e| matches!(e, LinkEvent::Connected));
    watcher.text_any(&format!("{ROOT}/status"), "online");

    // As the daemon does it: each event, then the state that counts it.
    for seq in 1..=21 {
        if seq % 4 == 0 {
            link.event(format!("{seq}").into_bytes());
        } else {
            link.set_state(format!("{seq}").into_bytes());
        }
    }
    let started = Instant::now();
    link.stop(Duration::from_secs(5));
    assert!(started.elapsed() < Duration::from_secs(2), "stop took {:?}", started.elapsed());
    assert!(!link.is_connected());
    watcher.text_any(&format!("{ROOT}/status"), "offline");

    let seen = state_and_events(&mut watcher);
    let seq = |m: &String| -> u32 { m.split(' ').nth(1).unwrap().parse().unwrap() };
    let events: Vec<&String> = seen.iter().filter(|m| m.starts_with("events ")).collect();
    assert_eq!(events, ["events 4", "events 8", "events 12", "events 16", "events 20"], "{seen:?}");
    // No state goes out before an event it counts.
    for (at, state) in seen.iter().enumerate().filter(|(_, m)| m.starts_with("state ")) {
        let late = seen[at..].iter().find(|m| m.starts_with("events ") && seq(m) < seq(state));
        assert_eq!(late, None, "{state} went out before the event: {seen:?}");
    }
    // Coalesced, and the latest one went out at the stop without waiting for its turn.
    assert!(seen.iter().filter(|m| m.starts_with("state ")).count() < 16, "{seen:?}");
    assert_eq!(seen.last().unwrap(), "state 21", "{seen:?}");
    assert_eq!(link.dropped(), 0);

    // What a newcomer finds retained.
    let mut newcomer = operator(port, "newcomer");
    newcomer.text_any(&format!("{ROOT}/status"), "offline");
    let is_state = |s: &ProbeSeen| matches!(s, ProbeSeen::Message { topic, .. } if topic.ends_with("/state"));
    newcomer.drain();
    let retained_state = match newcomer.seen.iter().find(|s| is_state(s)) {
        Some(seen) => seen.clone(),
        None => newcomer.next(is_state),
    };
    assert!(
        matches!(&retained_state, ProbeSeen::Message { payload, retained: true, .. } if payload == b"21"),
        "{retained_state:?}"
    );
}

#[test]
fn mqtt_link_after_a_broker_restart_subscribes_again_and_re_announces_online_and_the_state() {
    let tmp = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let broker_before = broker(tmp.path(), port);
    let (link, heard) = link(port);
    wait(&heard, |e| matches!(e, LinkEvent::Connected));
    link.set_state(b"before the restart".to_vec());
    let mut watcher = operator(port, "watcher");
    watcher.text_any(&format!("{ROOT}/state"), "before the restart");

    // A broker without persistence forgets the session, the subscription and the retained
    // messages.
    drop(broker_before);
    wait(&heard, |e| matches!(e, LinkEvent::Disconnected { .. }));
    assert!(!link.is_connected());
    link.event(b"while away".to_vec());
    assert_eq!(link.dropped(), 1, "an event with the broker away is dropped and counted");
    let _broker = broker(tmp.path(), port);
    wait(&heard, |e| matches!(e, LinkEvent::Connected));

    let mut operator = operator(port, "operator");
    operator.text_any(&format!("{ROOT}/status"), "online");
    operator.text_any(&format!("{ROOT}/state"), "before the restart");
    operator.publish(&format!("{ROOT}/cmd/ping"), r#"{"command_id":"after-restart"}"#);
    let LinkEvent::Command(command) = wait(&heard, |e| matches!(e, LinkEvent::Command(_))) else {
        unreachable!()
    };
    assert_eq!(command.name, "ping");
    assert_eq!(command.payload, br#"{"command_id":"after-restart"}"#);
    link.ack("ping", b"pong".to_vec());
    operator.text(&format!("{ROOT}/cmd/ping/ack"), "pong");
    link.stop(Duration::from_secs(5));
}

#[test]
fn mqtt_link_stop_with_no_broker_returns_at_once() {
    let (link, heard) = link(support::free_port());
    let started = Instant::now();
    link.stop(Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(1), "stop took {:?}", started.elapsed());
    assert!(!link.is_connected());
    assert!(
        heard.try_iter().all(|e| !matches!(e, LinkEvent::Connected)),
        "nothing listens on the port: no connection"
    );
    // A second stop finds the link ended.
    link.stop(Duration::from_secs(10));
}
