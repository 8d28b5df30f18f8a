//! The shell's side of Home Assistant's discovery: which cameras this bay ever announced (a
//! small file in the state directory, so that a camera taken out of the configuration loses
//! its entity at the next start) and the retained messages handed to the MQTT link.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::home_assistant::{self, Device};

/// The file, in the state directory, listing every camera id announced so far.
const ANNOUNCED: &str = "home-assistant-cameras.json";

/// The retained messages for `config`: every entity's config, and an empty one for each camera
/// announced before but no longer configured. `None` when discovery is off.
pub fn retained(config: &Config) -> Option<Vec<(String, Vec<u8>)>> {
    let mqtt = config.mqtt.as_ref().filter(|m| m.home_assistant)?;
    let cameras: Vec<String> = config.cameras.iter().map(|c| c.id.clone()).collect();
    let device = Device {
        bay_id: config.bay_id.clone(),
        root: format!("{}/{}", mqtt.topic_prefix, config.bay_id),
        prefix: mqtt.discovery_prefix.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        configuration_url: config
            .display
            .public_url
            .as_ref()
            .filter(|_| config.display.enabled)
            .map(|url| format!("{url}/cameras")),
        cameras: cameras.clone(),
    };
    let path = config.state_dir.join(ANNOUNCED);
    let mut announced = read(&path);
    let gone: Vec<String> = announced.iter().filter(|c| !cameras.contains(c)).cloned().collect();
    announced.extend(cameras.iter().cloned());
    write(&path, &announced);
    let mut messages: Vec<(String, Vec<u8>)> =
        home_assistant::announcements(&device).into_iter().map(|a| (a.topic, a.payload)).collect();
    messages.extend(home_assistant::removals(&device, &gone).into_iter().map(|a| (a.topic, a.payload)));
    if !gone.is_empty() {
        log::info!(cameras = gone.join(", ").as_str(); "Home Assistant entities of cameras no longer configured are removed");
    }
    Some(messages)
}

fn read(path: &Path) -> BTreeSet<String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            log::warn!(path:% = path.display(), error:% = e; "Ignoring an unreadable list of cameras announced to Home Assistant");
            BTreeSet::new()
        }),
        Err(_) => BTreeSet::new(),
    }
}

/// Writes the list whole (a temporary file renamed over it). A failure costs only the removal
/// of an entity later, and is logged.
fn write(path: &Path, announced: &BTreeSet<String>) {
    let temp = PathBuf::from(format!("{}.tmp", path.display()));
    let written = serde_json::to_vec(announced)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&temp, bytes))
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = written {
        log::warn!(path:% = path.display(), error:% = e; "Could not record the cameras announced to Home Assistant; a camera removed later keeps its entity");
    }
}
