//! The seam between the daemon and the upload leg. The daemon runs a [`UploadLeg`] on a thread
//! of its own and turns its [`UploadEvent`]s into `state` and `events` on MQTT; the leg reads
//! and updates the buffer itself. [`CaptureOnly`] is the leg of a bay without `[cloud]`.

use std::time::Duration;

/// What the daemon needs from the upload leg; it runs on its own thread.
pub trait UploadLeg: Send {
    /// Does the upload work that is due now (possibly several requests) and returns how long
    /// the caller may sleep before calling again; a wake (new capture, `retry`) cuts the sleep
    /// short. Must return within a few seconds even when the network stalls (the daemon's
    /// watchdog is fed only while this loop comes back).
    fn pump(&mut self, events: &mut dyn FnMut(UploadEvent)) -> Duration;
}

/// What the upload leg reports. Each variant but `Link` is one MQTT event type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadEvent {
    /// The leg began sending an inspection (`stage` becomes `uploading`). No event of its own.
    Started { inspection_id: i64, case_id: String },
    /// `upload_progress`: images of the inspection accepted by the cloud so far.
    Progress { inspection_id: i64, case_id: String, images_sent: u32, images_total: u32, bytes: u64 },
    /// `inspection_uploaded`: the cloud has all of it and the buffer marked it completed.
    Uploaded { inspection_id: i64, case_id: String, images: u32, bytes: u64 },
    /// `session_expired`: the cloud session ended before the upload did; images go to a new one.
    SessionExpired { inspection_id: i64, case_id: String },
    /// `inspection_failed`: given up for good (the buffer marked it failed); `retry` re-queues it.
    Failed { inspection_id: i64, case_id: String, reason: String },
    /// The state of the way to the cloud (`state.cloud`); never an event.
    Link { online: bool, clock_trusted: bool, detail: Option<String> },
}

/// The leg of a bay with no `[cloud]` section: uploads nothing; inspections stay `captured`.
#[derive(Debug, Default)]
pub struct CaptureOnly {
    told: bool,
}

impl UploadLeg for CaptureOnly {
    fn pump(&mut self, events: &mut dyn FnMut(UploadEvent)) -> Duration {
        if !self.told {
            self.told = true;
            events(UploadEvent::Link {
                online: false,
                clock_trusted: true,
                detail: Some("no [cloud] section: capture only, inspections stay captured".to_owned()),
            });
        }
        Duration::from_secs(3600)
    }
}
