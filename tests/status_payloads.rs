//! What the kiosk publishes, held to `shared/spec/mqtt.md`: every `state` field of the spec's
//! example is there with the same JSON type, every event type the spec lists exists and carries
//! what its type needs, and the demo and the daemon, published to a real Mosquitto, send the
//! same fields for the same messages.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use capture_kiosk::daemon::Signal;
use capture_kiosk::status::{
    Ack, AckStatus, Alert, AlertKind, BufferStatus, CameraState, CameraStatus, CloudStatus, Event, EventKind,
    InspectionStatus, Lifecycle, Stage, State,
};
use serde_json::Value;
use support::{Probe, ProbeSeen};

fn spec() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/spec/mqtt.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The JSON example of `state` in the spec.
fn spec_state() -> Value {
    let spec = spec();
    let start = spec.find("```json").expect("the spec shows state as JSON") + "```json".len();
    let end = start + spec[start..].find("```").expect("the block ends");
    serde_json::from_str(&spec[start..end]).expect("the spec's example is JSON")
}

/// The backquoted words of the spec's line that starts with `prefix`.
fn spec_words(prefix: &str) -> Vec<String> {
    let spec = spec();
    let at = spec.find(prefix).unwrap_or_else(|| panic!("the spec has {prefix:?}"));
    let line = &spec[at + prefix.len()..];
    let line = &line[..line.find("\n\n").unwrap_or(line.len())];
    // The event types end where the fields they carry begin.
    let line = &line[..line.find("plus the fields").unwrap_or(line.len())];
    line.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

fn sample_state() -> State {
    State {
        ts: "2026-11-21T10:00:03Z".into(),
        seq: 1842,
        boot_id: "0123456789abcdef".into(),
        version: "0.1.0".into(),
        lifecycle: Lifecycle::Alert,
        alerts: vec![Alert { kind: AlertKind::CameraOffline, reason: "camera cam-front is offline".into() }],
        stage: Stage::Capturing,
        inspection: Some(InspectionStatus {
            inspection_id: Some(3),
            case_id: "CASE-1".into(),
            angles: 8,
            done: 2,
        }),
        cameras: BTreeMap::from([(
            "cam-front".to_owned(),
            CameraStatus { status: CameraState::Online, last_frame_age_s: Some(0), reason: None },
        )]),
        buffer: BufferStatus {
            inspections: 3,
            images: 24,
            bytes: 9_437_184,
            awaiting_upload: 2,
            oldest_age_s: Some(5400),
            disk_free_bytes: Some(1_234_567_890),
            full: false,
            error: None,
        },
        cloud: CloudStatus {
            reachable: false,
            clock_synced: Some(true),
            last_upload_at: None,
            last_error: Some("connection refused".into()),
        },
        uptime_s: 86_400,
    }
}

/// Every key of `spec` is in `ours`, with the same JSON type where the spec's is not null (and
/// a number where the spec's is one); nested objects alike.
fn check_shape(path: &str, spec: &Value, ours: &Value) {
    let (Value::Object(spec), Value::Object(ours)) = (spec, ours) else {
        panic!("{path}: not an object: {ours}");
    };
    for (key, want) in spec {
        let here = format!("{path}.{key}");
        let got = ours.get(key).unwrap_or_else(|| panic!("{here} is missing from {ours:?}"));
        match (want, got) {
            (Value::Null, _) | (_, Value::Null) => {}
            (Value::Object(_), Value::Object(_)) if path == "state" && key == "cameras" => {
                let (sample, mine) = (want.as_object().unwrap(), got.as_object().unwrap());
                for (camera, value) in sample {
                    check_shape(&format!("{here}.{camera}"), value, &mine[camera]);
                }
            }
            (Value::Object(_), Value::Object(_)) => check_shape(&here, want, got),
            (a, b) => assert_eq!(
                std::mem::discriminant(a),
                std::mem::discriminant(b),
                "{here}: the spec has {a}, we publish {b}"
            ),
        }
    }
}

#[test]
fn the_state_has_every_field_of_the_spec_with_its_type() {
    let ours = serde_json::to_value(sample_state()).unwrap();
    check_shape("state", &spec_state(), &ours);
    assert_eq!(ours["alerts"][0]["type"], "camera_offline");
    // Nothing published is outside the values the spec allows.
    let lifecycles = spec_words("`lifecycle` ∈");
    let stages = spec_words("`stage` ∈");
    for lifecycle in [Lifecycle::Init, Lifecycle::Ready, Lifecycle::Alert] {
        let v = serde_json::to_value(lifecycle).unwrap();
        assert!(lifecycles.iter().any(|l| v == l.as_str()), "{v} not in {lifecycles:?}");
    }
    for stage in [Stage::Idle, Stage::Capturing, Stage::Uploading] {
        let v = serde_json::to_value(stage).unwrap();
        assert!(stages.iter().any(|s| v == s.as_str()), "{v} not in {stages:?}");
    }
}

fn sample_events() -> Vec<EventKind> {
    let q = capture_kiosk::store::ImageQuality { scores: Default::default(), poor: None };
    vec![
        EventKind::InspectionStarted { inspection_id: 1, case_id: "C".into(), angles: vec!["Front".into()] },
        EventKind::AngleCaptured {
            inspection_id: Some(1),
            case_id: "C".into(),
            angle: "Front".into(),
            camera: "cam".into(),
            bytes: 10,
            width: 4,
            height: 3,
            quality: q,
        },
        EventKind::AngleFailed {
            inspection_id: Some(1),
            case_id: "C".into(),
            angle: "Rear".into(),
            camera: "cam".into(),
            reason: "blank".into(),
        },
        EventKind::InspectionCaptured {
            inspection_id: 1,
            case_id: "C".into(),
            state: "captured".into(),
            images: 1,
            bytes: 10,
        },
        EventKind::UploadProgress {
            inspection_id: 1,
            case_id: "C".into(),
            images_sent: 1,
            images_total: 2,
            bytes: 10,
        },
        EventKind::InspectionUploaded { inspection_id: 1, case_id: "C".into(), images: 1, bytes: 10 },
        EventKind::InspectionFailed {
            inspection_id: 1,
            case_id: "C".into(),
            state: None,
            images: None,
            bytes: None,
            reason: Some("refused".into()),
        },
        EventKind::SessionExpired { inspection_id: 1, case_id: "C".into() },
        EventKind::CameraOffline { camera: "cam".into(), reason: "gone".into() },
        EventKind::CameraOnline { camera: "cam".into() },
        EventKind::BufferFull { reason: "full".into() },
        EventKind::Error { case_id: None, reason: "oops".into() },
    ]
}

#[test]
fn every_event_type_of_the_spec_exists_and_carries_what_its_type_needs() {
    let types = spec_words("with `type` ∈");
    assert_eq!(types.len(), 12, "{types:?}");
    let events = sample_events();
    for t in &types {
        assert!(events.iter().any(|e| e.name() == t.as_str()), "no event of type {t}");
    }
    for (seq, kind) in events.into_iter().enumerate() {
        let name = kind.name();
        let v =
            serde_json::to_value(Event { ts: "2026-11-21T10:00:03Z".into(), seq: seq as u64, kind }).unwrap();
        assert_eq!(v["type"], name, "{v}");
        assert!(v["ts"].is_string() && v["seq"].is_u64(), "{v}");
        let needs: &[&str] = match name {
            "camera_offline" => &["camera", "reason"],
            "camera_online" => &["camera"],
            "buffer_full" | "error" => &["reason"],
            "angle_captured" => &["inspection_id", "case_id", "angle", "camera", "bytes", "width", "height"],
            "angle_failed" => &["inspection_id", "case_id", "angle", "camera", "reason"],
            "inspection_failed" => &["inspection_id", "case_id", "reason"],
            _ => &["inspection_id", "case_id"],
        };
        for field in needs {
            assert!(!v[field].is_null(), "{name} lacks {field}: {v}");
        }
    }
}

#[test]
fn the_ack_has_the_spec_shape() {
    let ack = Ack::rejected(Some("c-1"), "expired");
    let v: Value = serde_json::from_slice(&ack.to_json()).unwrap();
    assert_eq!(v, serde_json::json!({"command_id": "c-1", "status": "rejected", "reason": "expired"}));
    let ack =
        Ack::new(Some("c-2"), AckStatus::Accepted).with_inspection(capture_kiosk::store::InspectionId(4));
    let v: Value = serde_json::from_slice(&ack.to_json()).unwrap();
    assert_eq!(v, serde_json::json!({"command_id": "c-2", "status": "accepted", "inspection_id": 4}));
}

/// The field names of a JSON object, nested objects as `outer.inner` (a camera's by its
/// place, not its id).
fn fields(v: &Value, path: &str, out: &mut BTreeSet<String>) {
    if let Value::Object(map) = v {
        for (key, value) in map {
            let key = if path.ends_with("cameras") { "*" } else { key.as_str() };
            let here = if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
            out.insert(here.clone());
            fields(value, &here, out);
        }
    }
}

/// Fields of every message per kind (`state`, or the event's type) under `root`.
fn published(probe: &Probe, root: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut kinds: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for seen in &probe.seen {
        let ProbeSeen::Message { topic, payload, .. } = seen else { continue };
        let Ok(v) = serde_json::from_slice::<Value>(payload) else { continue };
        let kind = if topic == &format!("{root}/state") {
            "state".to_owned()
        } else if topic == &format!("{root}/events") {
            v["type"].as_str().unwrap_or("?").to_owned()
        } else {
            continue;
        };
        let mut set = BTreeSet::new();
        fields(&v, "", &mut set);
        // Optional parts appear in some messages only: what is compared is their union.
        kinds.entry(kind).or_default().extend(set);
    }
    kinds
}

#[test]
fn the_demo_and_the_daemon_publish_the_same_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (port, mut broker) = support::mosquitto(dir.path(), "allow_anonymous true\n");
    let mut probe = Probe::connect(port, "watcher", None);
    assert!(probe.subscribe("capture-kiosk/#"));

    // The daemon: one inspection of two angles.
    let config_path = support::bay_config(dir.path(), "bay-d", &format!("url = \"mqtt://127.0.0.1:{port}\""));
    let bay = support::capture_only_daemon(capture_kiosk::config::load(&config_path).unwrap());
    probe.text_any("capture-kiosk/bay-d/status", "online");
    probe.publish("capture-kiosk/bay-d/cmd/start", r#"{"command_id": "s-1", "case_id": "CASE-1"}"#);
    probe.json("capture-kiosk/bay-d/events", |v| v["type"] == "inspection_captured");
    probe.json("capture-kiosk/bay-d/state", |v| v["stage"] == "idle");

    // The demo, on small frames.
    let options = capture_kiosk::demo::DemoOptions {
        mqtt: Some(format!("mqtt://127.0.0.1:{port}")),
        width: 640,
        height: 480,
        ..Default::default()
    };
    capture_kiosk::demo::run(&options, &mut |_| {}).unwrap();
    probe.json_any("capture-kiosk/demo/events", |v| v["type"] == "inspection_captured");
    std::thread::sleep(Duration::from_millis(300));
    probe.drain();
    bay.signal(Signal::Terminate);
    bay.wait().unwrap();
    let _ = broker.kill();

    let daemon = published(&probe, "capture-kiosk/bay-d");
    let demo = published(&probe, "capture-kiosk/demo");
    for kind in ["state", "inspection_started", "angle_captured", "inspection_captured"] {
        let (a, b) = (daemon.get(kind), demo.get(kind));
        assert!(a.is_some() && b.is_some(), "{kind}: daemon {a:?}, demo {b:?}");
        assert_eq!(a, b, "{kind}: the daemon and the demo differ");
    }
    for kind in demo.keys() {
        assert!(daemon.contains_key(kind), "the demo publishes {kind}, which the daemon never does");
    }
}
