//! Home Assistant's MQTT discovery against a real Mosquitto: the bay announces itself as one
//! device whose every entity reads a field that its real `state` messages have, and a camera
//! taken out of the configuration loses its entity at the next start.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use capture_kiosk::daemon::{Daemon, Signal};
use serde_json::Value;
use support::{Probe, ProbeSeen};

fn config(dir: &Path, port: u16, cameras: &[&str]) -> String {
    let mut text = format!(
        "bay_id = \"bay-h\"\nstate_dir = \"{}\"\n\n[inspection]\nangles = [\"Front\"]\n\n[imaging]\nmax_long_edge = 320\n\n[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\nheartbeat = \"2s\"\nhome_assistant = true\n\n[display]\nlisten = \"127.0.0.1:0\"\npublic_url = \"http://bay-h.local:8080/\"\n",
        dir.join("state").display()
    );
    let angles = ["Front", "Rear"];
    for (i, camera) in cameras.iter().enumerate() {
        text.push_str(&format!(
            "\n[[cameras]]\nid = \"{camera}\"\nsource = \"synthetic:320x240\"\nangles = [\"{}\"]\n",
            angles[i]
        ));
    }
    text
}

fn start(text: &str) -> Daemon {
    support::capture_only_daemon(capture_kiosk::config::parse(text, "t").unwrap())
}

/// The retained messages a new subscriber to `homeassistant/#` gets, read for `wait`.
fn retained_configs(port: u16, name: &str, wait: Duration) -> Vec<(String, Vec<u8>)> {
    let mut probe = Probe::connect(port, name, None);
    assert!(probe.subscribe("homeassistant/#"));
    let until = Instant::now() + wait;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
        probe.drain();
    }
    probe
        .seen
        .iter()
        .filter_map(|s| match s {
            ProbeSeen::Message { topic, payload, retained: true } => Some((topic.clone(), payload.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn the_bay_announces_entities_that_read_its_real_state_and_a_removed_camera_loses_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (port, mut broker) = support::mosquitto(dir.path(), "allow_anonymous true\n");
    let bay = start(&config(dir.path(), port, &["cam-a", "cam-b"]));
    let mut watcher = Probe::connect(port, "watcher", None);
    assert!(watcher.subscribe("capture-kiosk/bay-h/state"));
    let state = watcher.json_any("capture-kiosk/bay-h/state", |v| v["lifecycle"] == "ready");

    let configs = retained_configs(port, "ha-1", Duration::from_secs(1));
    assert_eq!(configs.len(), 11 + 2, "{:?}", configs.iter().map(|c| &c.0).collect::<Vec<_>>());
    for (topic, payload) in &configs {
        let v: Value = serde_json::from_slice(payload).unwrap_or_else(|e| panic!("{topic}: {e}"));
        assert!(v["unique_id"].as_str().is_some_and(|u| u.contains("bay-h")), "{topic}: {v}");
        assert_eq!(v["state_topic"], "capture-kiosk/bay-h/state", "{topic}");
        assert_eq!(v["availability"][0]["topic"], "capture-kiosk/bay-h/status", "{topic}");
        assert_eq!(v["device"]["identifiers"][0], "capture-kiosk-bay-h", "{topic}");
        assert_eq!(v["device"]["configuration_url"], "http://bay-h.local:8080/cameras", "{topic}");
        let template = v["value_template"].as_str().expect("a template");
        for path in capture_kiosk::home_assistant::fields_read(template) {
            let mut at = &state;
            for part in &path {
                at = at
                    .get(part)
                    .unwrap_or_else(|| panic!("{topic}: {template} reads {path:?}; the state is {state}"));
            }
        }
    }
    let camera_b = "homeassistant/binary_sensor/capture_kiosk_bay-h/camera_cam-b/config";
    assert!(configs.iter().any(|(t, _)| t == camera_b), "cam-b is announced");
    bay.signal(Signal::Terminate);
    bay.wait().unwrap();

    // cam-b taken out of the configuration: at the next start its entity goes.
    let bay = start(&config(dir.path(), port, &["cam-a"]));
    let mut watcher = Probe::connect(port, "watcher-2", None);
    assert!(watcher.subscribe("capture-kiosk/bay-h/status"));
    watcher.text_any("capture-kiosk/bay-h/status", "online");
    let configs = retained_configs(port, "ha-2", Duration::from_secs(1));
    let topics: Vec<&String> = configs.iter().map(|(t, _)| t).collect();
    assert!(!topics.iter().any(|t| *t == camera_b), "cam-b's entity is gone: {topics:?}");
    assert!(topics.iter().any(|t| t.ends_with("/camera_cam-a/config")), "{topics:?}");
    assert_eq!(configs.len(), 11 + 1, "{topics:?}");
    bay.signal(Signal::Terminate);
    bay.wait().unwrap();
    let _ = broker.kill();
}
