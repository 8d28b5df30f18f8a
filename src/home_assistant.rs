//! Home Assistant's MQTT discovery: the retained configs that announce a bay as one device
//! with sensors and binary sensors read from its retained `state`, and the empty configs that
//! remove the entity of a camera no longer configured. Pure: it builds topics and payloads; the
//! MQTT link publishes them after every connect.

use serde::Serialize;

/// The bay as Home Assistant shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub bay_id: String,
    /// `{topic_prefix}/{bay_id}`: where `status` and `state` are.
    pub root: String,
    /// The discovery prefix Home Assistant listens on (`homeassistant` by default).
    pub prefix: String,
    pub version: String,
    /// The bay's camera page, when it serves one.
    pub configuration_url: Option<String>,
    /// The configured cameras' ids.
    pub cameras: Vec<String>,
}

/// One retained message: a discovery config, or an empty payload that removes an entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Every discovery config of `device`: its sensors, its binary sensors, one per camera.
pub fn announcements(device: &Device) -> Vec<Announcement> {
    let sensor =
        |id: &str, name: &str, template: String, class: Option<&'static str>, unit: Option<&'static str>| {
            let measured = matches!(class, Some("data_size") | Some("duration")) || id == "inspections";
            Entity {
                component: "sensor",
                object_id: id.to_owned(),
                name: name.to_owned(),
                value_template: template,
                device_class: class,
                unit_of_measurement: unit,
                state_class: measured.then_some("measurement"),
                payload_on: None,
                payload_off: None,
                entity_category: None,
                icon: None,
            }
        };
    let binary = |id: String, name: String, condition: String, class: Option<&'static str>| Entity {
        component: "binary_sensor",
        object_id: id,
        name,
        value_template: format!("{{{{ 'ON' if {condition} else 'OFF' }}}}"),
        device_class: class,
        unit_of_measurement: None,
        state_class: None,
        payload_on: Some("ON"),
        payload_off: Some("OFF"),
        entity_category: None,
        icon: None,
    };
    let or_none =
        |path: &str| format!("{{{{ value_json.{path} if value_json.{path} is not none else None }}}}");
    let mut entities = vec![
        sensor("stage", "Stage", "{{ value_json.stage }}".into(), None, None),
        sensor("lifecycle", "Lifecycle", "{{ value_json.lifecycle }}".into(), None, None),
        sensor(
            "inspections",
            "Inspections buffered",
            "{{ value_json.buffer.inspections }}".into(),
            None,
            None,
        ),
        sensor(
            "buffer_bytes",
            "Buffer size",
            "{{ value_json.buffer.bytes }}".into(),
            Some("data_size"),
            Some("B"),
        ),
        sensor(
            "oldest_pending",
            "Oldest pending upload",
            or_none("buffer.oldest_age_s"),
            Some("duration"),
            Some("s"),
        ),
        sensor("disk_free", "Disk free", or_none("buffer.disk_free_bytes"), Some("data_size"), Some("B")),
        sensor("last_upload", "Last upload", or_none("cloud.last_upload_at"), Some("timestamp"), None),
        sensor("last_error", "Last cloud error", or_none("cloud.last_error"), None, None),
        binary(
            "cloud".into(),
            "Cloud reachable".into(),
            "value_json.cloud.reachable".into(),
            Some("connectivity"),
        ),
        binary("clock".into(), "Clock trusted".into(), "value_json.cloud.clock_synced".into(), None),
        binary("buffer_full".into(), "Buffer full".into(), "value_json.buffer.full".into(), Some("problem")),
    ];
    for e in
        entities.iter_mut().filter(|e| matches!(e.object_id.as_str(), "last_error" | "disk_free" | "clock"))
    {
        e.entity_category = Some("diagnostic");
    }
    for camera in &device.cameras {
        entities.push(binary(
            camera_object_id(camera),
            format!("Camera {camera}"),
            format!("value_json.cameras['{camera}'].status == 'online'"),
            Some("connectivity"),
        ));
    }
    entities.iter().map(|e| e.announce(device)).collect()
}

/// The fields of `state` a value template reads: each `value_json.a.b` or `value_json.a['b']`
/// as its path of keys. The tests hold every template to a real `state` with it.
pub fn fields_read(template: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (at, _) in template.match_indices("value_json") {
        let mut rest = &template[at + "value_json".len()..];
        let mut path = Vec::new();
        loop {
            if let Some(r) = rest.strip_prefix('.') {
                let end = r.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(r.len());
                path.push(r[..end].to_owned());
                rest = &r[end..];
            } else if let Some((key, r)) = rest.strip_prefix("['").and_then(|r| r.split_once("']")) {
                path.push(key.to_owned());
                rest = r;
            } else {
                break;
            }
        }
        out.push(path);
    }
    out
}

/// The empty retained configs that remove the entities of `cameras` (no longer configured).
pub fn removals(device: &Device, cameras: &[String]) -> Vec<Announcement> {
    cameras
        .iter()
        .map(|c| Announcement {
            topic: topic(device, "binary_sensor", &camera_object_id(c)),
            payload: Vec::new(),
        })
        .collect()
}

/// The object id of a camera's entity: its id, with anything Home Assistant does not take in
/// an id made `_`.
fn camera_object_id(camera: &str) -> String {
    let clean: String = camera
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .collect();
    format!("camera_{clean}")
}

/// The node id of a bay: `capture_kiosk_{bay_id}` (a bay id is letters, digits, `-` and `_`).
fn node_id(device: &Device) -> String {
    format!("capture_kiosk_{}", device.bay_id)
}

fn topic(device: &Device, component: &str, object_id: &str) -> String {
    format!("{}/{component}/{}/{object_id}/config", device.prefix, node_id(device))
}

struct Entity {
    component: &'static str,
    object_id: String,
    name: String,
    value_template: String,
    device_class: Option<&'static str>,
    unit_of_measurement: Option<&'static str>,
    state_class: Option<&'static str>,
    payload_on: Option<&'static str>,
    payload_off: Option<&'static str>,
    entity_category: Option<&'static str>,
    icon: Option<&'static str>,
}

/// A discovery config, in Home Assistant's own keys.
#[derive(Serialize)]
struct Config<'a> {
    name: &'a str,
    unique_id: String,
    object_id: String,
    state_topic: String,
    value_template: &'a str,
    availability: [Availability; 1],
    device: DeviceConfig<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_class: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unit_of_measurement: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_class: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_on: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_off: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entity_category: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    icon: Option<&'a str>,
}

#[derive(Serialize)]
struct Availability {
    topic: String,
    payload_available: &'static str,
    payload_not_available: &'static str,
}

#[derive(Serialize)]
struct DeviceConfig<'a> {
    identifiers: [String; 1],
    name: String,
    manufacturer: &'static str,
    model: &'static str,
    sw_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    configuration_url: Option<&'a str>,
}

impl Entity {
    fn announce(&self, device: &Device) -> Announcement {
        let node = node_id(device);
        let config = Config {
            name: &self.name,
            unique_id: format!("{node}_{}", self.object_id),
            object_id: format!("{node}_{}", self.object_id),
            state_topic: format!("{}/state", device.root),
            value_template: &self.value_template,
            availability: [Availability {
                topic: format!("{}/status", device.root),
                payload_available: "online",
                payload_not_available: "offline",
            }],
            device: DeviceConfig {
                identifiers: [format!("capture-kiosk-{}", device.bay_id)],
                name: format!("Inspection bay {}", device.bay_id),
                manufacturer: "capture-kiosk",
                model: "capture-kiosk inspection bay",
                sw_version: &device.version,
                configuration_url: device.configuration_url.as_deref(),
            },
            device_class: self.device_class,
            unit_of_measurement: self.unit_of_measurement,
            state_class: self.state_class,
            payload_on: self.payload_on,
            payload_off: self.payload_off,
            entity_category: self.entity_category,
            icon: self.icon,
        };
        Announcement {
            topic: topic(device, self.component, &self.object_id),
            payload: serde_json::to_vec(&config).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::status::{BufferStatus, CameraState, CameraStatus, CloudStatus, Lifecycle, Stage, State};

    fn device() -> Device {
        Device {
            bay_id: "bay-07".into(),
            root: "capture-kiosk/bay-07".into(),
            prefix: "homeassistant".into(),
            version: "0.1.0".into(),
            configuration_url: Some("http://10.0.0.7:8080/cameras".into()),
            cameras: vec!["front".into(), "rear cam".into()],
        }
    }

    /// A state as the daemon publishes it, every optional field filled.
    fn state() -> serde_json::Value {
        let camera = CameraStatus { status: CameraState::Online, last_frame_age_s: Some(1), reason: None };
        let state = State {
            ts: "2026-12-01T10:00:00Z".into(),
            seq: 1,
            boot_id: "b".into(),
            version: "0.1.0".into(),
            lifecycle: Lifecycle::Ready,
            alerts: Vec::new(),
            stage: Stage::Idle,
            inspection: None,
            cameras: BTreeMap::from([("front".to_owned(), camera.clone()), ("rear cam".to_owned(), camera)]),
            buffer: BufferStatus {
                inspections: 1,
                images: 8,
                bytes: 1,
                awaiting_upload: 1,
                oldest_age_s: Some(5),
                disk_free_bytes: Some(9),
                full: false,
                error: None,
            },
            cloud: CloudStatus {
                reachable: true,
                clock_synced: Some(true),
                last_upload_at: Some("2026-12-01T09:59:00Z".into()),
                last_error: Some("x".into()),
            },
            uptime_s: 3,
        };
        serde_json::to_value(state).unwrap()
    }

    /// Home Assistant's own keys for MQTT sensors and binary sensors (and their device and
    /// availability parts), as its documentation lists them.
    const HA_KEYS: &[&str] = &[
        "availability",
        "availability_mode",
        "availability_template",
        "availability_topic",
        "device",
        "device_class",
        "enabled_by_default",
        "encoding",
        "entity_category",
        "expire_after",
        "force_update",
        "icon",
        "json_attributes_template",
        "json_attributes_topic",
        "name",
        "object_id",
        "off_delay",
        "payload_available",
        "payload_not_available",
        "payload_off",
        "payload_on",
        "qos",
        "state_class",
        "state_topic",
        "unique_id",
        "unit_of_measurement",
        "value_template",
        "suggested_display_precision",
    ];
    const DEVICE_KEYS: &[&str] = &[
        "identifiers",
        "name",
        "manufacturer",
        "model",
        "sw_version",
        "hw_version",
        "configuration_url",
        "connections",
        "suggested_area",
        "via_device",
    ];

    #[test]
    fn every_config_is_complete_in_home_assistants_keys_and_reads_fields_the_state_has() {
        let state = state();
        let all = announcements(&device());
        assert_eq!(all.len(), 11 + 2, "eight sensors, three binary sensors, one per camera");
        let mut unique = std::collections::BTreeSet::new();
        for a in &all {
            let v: serde_json::Value = serde_json::from_slice(&a.payload).expect("JSON");
            let object = v.as_object().expect("an object");
            for key in object.keys() {
                assert!(HA_KEYS.contains(&key.as_str()), "{}: {key} is not a Home Assistant key", a.topic);
            }
            for key in v["device"].as_object().expect("a device").keys() {
                assert!(DEVICE_KEYS.contains(&key.as_str()), "{}: device.{key}", a.topic);
            }
            for key in ["unique_id", "state_topic", "availability", "value_template", "name"] {
                assert!(!v[key].is_null(), "{} lacks {key}", a.topic);
            }
            assert!(unique.insert(v["unique_id"].as_str().unwrap().to_owned()), "unique ids differ");
            assert_eq!(v["state_topic"], "capture-kiosk/bay-07/state");
            assert_eq!(v["availability"][0]["topic"], "capture-kiosk/bay-07/status");
            assert_eq!(v["device"]["identifiers"][0], "capture-kiosk-bay-07");
            assert!(a.topic.starts_with("homeassistant/") && a.topic.ends_with("/config"), "{}", a.topic);
            let template = v["value_template"].as_str().unwrap();
            let paths = fields_read(template);
            assert!(!paths.is_empty(), "{template}");
            for path in paths {
                let mut at = &state;
                for part in &path {
                    at = at
                        .get(part)
                        .unwrap_or_else(|| panic!("{}: {template} reads {path:?}, not in {state}", a.topic));
                }
            }
        }
        let cam = all.iter().find(|a| a.topic.contains("camera_rear_cam")).expect("the camera's entity");
        assert_eq!(cam.topic, "homeassistant/binary_sensor/capture_kiosk_bay-07/camera_rear_cam/config");
    }

    #[test]
    fn a_camera_taken_out_of_the_configuration_loses_its_entity() {
        let gone = removals(&device(), &["side".to_owned()]);
        assert_eq!(
            gone,
            vec![Announcement {
                topic: "homeassistant/binary_sensor/capture_kiosk_bay-07/camera_side/config".into(),
                payload: Vec::new()
            }]
        );
    }
}
