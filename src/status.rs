//! The payloads the kiosk publishes (`shared/spec/mqtt.md`), as types: the retained [`State`],
//! the [`Event`]s (an enum tagged by `type`) and, re-exported, the command [`Ack`]. The daemon
//! and the demo both build these, so what a consumer reads cannot drift between them; only
//! `serde` turns them into JSON.

use std::collections::BTreeMap;

use serde::Serialize;

pub use crate::capture::health::Status as CameraState;
pub use crate::daemon::command::{Ack, AckStatus};
use crate::store::ImageQuality;

/// The retained `{root}/state`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct State {
    pub ts: String,
    /// Grows by one per message (state or event) within a `boot_id`.
    pub seq: u64,
    pub boot_id: String,
    pub version: String,
    pub lifecycle: Lifecycle,
    /// Every condition a person must act on; empty when `lifecycle` is not `alert`.
    pub alerts: Vec<Alert>,
    pub stage: Stage,
    pub inspection: Option<InspectionStatus>,
    pub cameras: BTreeMap<String, CameraStatus>,
    pub buffer: BufferStatus,
    pub cloud: CloudStatus,
    pub uptime_s: u64,
}

/// Whether the bay can take cars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Starting: the buffer is not open yet, or nothing about it is known.
    Init,
    Ready,
    /// A person must act: `alerts` says on what.
    Alert,
}

/// What the bay is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Idle,
    Capturing,
    Uploading,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Idle => "idle",
            Stage::Capturing => "capturing",
            Stage::Uploading => "uploading",
        }
    }
}

/// One condition a person must act on, in `state.alerts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    #[serde(rename = "type")]
    pub kind: AlertKind,
    pub reason: String,
}

/// The kinds of [`Alert`]: the conditions `shared/spec/mqtt.md` names, and the MQTT link's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The buffer refuses new inspections, or holds more than 90 % of what it may.
    BufferFull,
    /// A camera of the bay is offline.
    CameraOffline,
    /// The bay's clock cannot be trusted to sign requests (and to date images).
    ClockUntrusted,
    /// Inspections the cloud refused for good wait for an operator's `retry`.
    InspectionFailed,
    /// The buffer was salvaged from a damaged file; `check --ack-recovery` acknowledges it.
    BufferRecovered,
    /// Damage was found in the buffer while running; a restart salvages it.
    BufferDamaged,
    /// The buffer cannot be read.
    BufferUnreadable,
    /// Another MQTT client keeps taking the bay's session over.
    MqttClientIdInUse,
    /// The broker refused the subscription to the bay's commands.
    MqttSubscriptionRefused,
}

impl AlertKind {
    /// The kind of an alert the MQTT link raises (its `ALERT_*` names).
    pub fn of_link(kind: &str) -> Option<AlertKind> {
        match kind {
            crate::mqtt::ALERT_CLIENT_ID_IN_USE => Some(AlertKind::MqttClientIdInUse),
            crate::mqtt::ALERT_SUBSCRIPTION_REFUSED => Some(AlertKind::MqttSubscriptionRefused),
            _ => None,
        }
    }
}

/// The inspection being captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InspectionStatus {
    pub inspection_id: Option<i64>,
    pub case_id: String,
    pub angles: usize,
    pub done: usize,
}

/// One camera in `state.cameras`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CameraStatus {
    pub status: CameraState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_frame_age_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `state.buffer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BufferStatus {
    pub inspections: u64,
    pub images: u64,
    pub bytes: u64,
    /// Inspections `captured` or `uploading`.
    pub awaiting_upload: u64,
    /// Age of the oldest inspection not yet completed by the cloud.
    pub oldest_age_s: Option<u64>,
    pub disk_free_bytes: Option<u64>,
    /// A `start` would be refused for want of room.
    pub full: bool,
    /// Why the buffer could not be read, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl BufferStatus {
    /// The buffer as `facts` show it at `now`, `full` when an inspection of `angles` images of
    /// about `expected_image_bytes` each would be refused.
    pub fn of(
        facts: &crate::store::BufferFacts,
        now: std::time::SystemTime,
        angles: usize,
        expected_image_bytes: u64,
    ) -> BufferStatus {
        use crate::clock::unix_millis;
        BufferStatus {
            inspections: facts.totals.inspections,
            images: facts.totals.images,
            bytes: facts.totals.bytes,
            awaiting_upload: facts.totals.awaiting_upload,
            oldest_age_s: facts
                .totals
                .oldest_created_at
                .map(|o| ((unix_millis(now) - unix_millis(o)).max(0) / 1000) as u64),
            disk_free_bytes: Some(facts.disk_free),
            full: facts.would_refuse(angles, expected_image_bytes).is_some(),
            error: None,
        }
    }

    /// A buffer that cannot be shown, and why.
    pub fn unknown(error: String, full: bool) -> BufferStatus {
        BufferStatus {
            inspections: 0,
            images: 0,
            bytes: 0,
            awaiting_upload: 0,
            oldest_age_s: None,
            disk_free_bytes: None,
            full,
            error: Some(error),
        }
    }
}

/// `state.cloud`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct CloudStatus {
    pub reachable: bool,
    /// `None` until the cloud has answered once.
    pub clock_synced: Option<bool>,
    pub last_upload_at: Option<String>,
    pub last_error: Option<String>,
}

/// One message on `{root}/events`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub ts: String,
    pub seq: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened, with the fields its `type` needs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    InspectionStarted {
        inspection_id: i64,
        case_id: String,
        angles: Vec<String>,
    },
    AngleCaptured {
        inspection_id: Option<i64>,
        case_id: String,
        angle: String,
        camera: String,
        bytes: u64,
        width: u32,
        height: u32,
        quality: ImageQuality,
    },
    AngleFailed {
        inspection_id: Option<i64>,
        case_id: String,
        angle: String,
        camera: String,
        reason: String,
    },
    InspectionCaptured {
        inspection_id: i64,
        case_id: String,
        state: String,
        images: u64,
        bytes: u64,
    },
    /// The capture ended failed or cancelled (`state` set), or the cloud refused the
    /// inspection for good (`state` absent).
    InspectionFailed {
        inspection_id: i64,
        case_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        state: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        images: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    UploadProgress {
        inspection_id: i64,
        case_id: String,
        images_sent: u32,
        images_total: u32,
        bytes: u64,
    },
    InspectionUploaded {
        inspection_id: i64,
        case_id: String,
        images: u32,
        bytes: u64,
    },
    SessionExpired {
        inspection_id: i64,
        case_id: String,
    },
    CameraOffline {
        camera: String,
        reason: String,
    },
    CameraOnline {
        camera: String,
    },
    BufferFull {
        reason: String,
    },
    BufferRecovered {
        recovery_id: i64,
        at: String,
        moved_to: std::path::PathBuf,
        damage: String,
        reason: String,
        report: crate::store::SalvageReport,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        case_id: Option<String>,
        reason: String,
    },
}

impl EventKind {
    /// The `type` field.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::InspectionStarted { .. } => "inspection_started",
            EventKind::AngleCaptured { .. } => "angle_captured",
            EventKind::AngleFailed { .. } => "angle_failed",
            EventKind::InspectionCaptured { .. } => "inspection_captured",
            EventKind::InspectionFailed { .. } => "inspection_failed",
            EventKind::UploadProgress { .. } => "upload_progress",
            EventKind::InspectionUploaded { .. } => "inspection_uploaded",
            EventKind::SessionExpired { .. } => "session_expired",
            EventKind::CameraOffline { .. } => "camera_offline",
            EventKind::CameraOnline { .. } => "camera_online",
            EventKind::BufferFull { .. } => "buffer_full",
            EventKind::BufferRecovered { .. } => "buffer_recovered",
            EventKind::Error { .. } => "error",
        }
    }

    /// The event of an inspection's capture progress, for the inspection of `case_id`
    /// (`inspection_id` once known); `None` for steps that are not events (a retry).
    pub fn of_progress(
        progress: &crate::inspection::Progress,
        case_id: &str,
        inspection_id: Option<i64>,
    ) -> Option<EventKind> {
        use crate::inspection::Progress;
        let case_id = case_id.to_owned();
        Some(match progress {
            Progress::Started { inspection_id, angles } => EventKind::InspectionStarted {
                inspection_id: inspection_id.0,
                case_id,
                angles: angles.iter().map(|a| a.as_str().to_owned()).collect(),
            },
            Progress::Captured { angle, camera, bytes, width, height, quality, .. } => {
                EventKind::AngleCaptured {
                    inspection_id,
                    case_id,
                    angle: angle.as_str().to_owned(),
                    camera: camera.clone(),
                    bytes: *bytes,
                    width: *width,
                    height: *height,
                    quality: quality.clone(),
                }
            }
            Progress::Failed { angle, camera, reason } => EventKind::AngleFailed {
                inspection_id,
                case_id,
                angle: angle.as_str().to_owned(),
                camera: camera.clone(),
                reason: reason.clone(),
            },
            Progress::Retrying { .. } => return None,
        })
    }

    /// The event that closes a capture that ended in `state` with `images` of `bytes` stored.
    pub fn of_capture_end(
        inspection_id: i64,
        case_id: &str,
        state: crate::store::InspectionState,
        images: u64,
        bytes: u64,
    ) -> EventKind {
        use crate::store::InspectionState;
        match state {
            InspectionState::Failed | InspectionState::Cancelled => EventKind::InspectionFailed {
                inspection_id,
                case_id: case_id.to_owned(),
                state: Some(state.as_str().to_owned()),
                images: Some(images),
                bytes: Some(bytes),
                reason: (state == InspectionState::Cancelled).then(|| "cancelled while capturing".to_owned()),
            },
            _ => EventKind::InspectionCaptured {
                inspection_id,
                case_id: case_id.to_owned(),
                state: state.as_str().to_owned(),
                images,
                bytes,
            },
        }
    }
}

/// Serialises a payload for the wire. The types here hold only strings, numbers and maps with
/// string keys, which always serialise.
pub fn to_bytes<T: Serialize>(payload: &T) -> Vec<u8> {
    serde_json::to_vec(payload).unwrap_or_default()
}
