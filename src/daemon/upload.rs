//! The seam between the daemon and the upload leg. The daemon runs a [`UploadLeg`] on a thread
//! of its own and turns its [`UploadEvent`]s into `state` and `events` on MQTT; the leg reads
//! and updates the buffer itself, through a handle the daemon gives it once the buffer is open
//! ([`UploadLeg::attach`]). [`CaptureOnly`] is the leg of a bay without `[cloud]`, [`CloudLeg`]
//! the real one.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::config::Config;
use crate::store::Store;
use crate::upload::client::Alive;
use crate::upload::{Event, Pump, Uploader};

/// What the daemon needs from the upload leg; it runs on its own thread.
pub trait UploadLeg: Send {
    /// Called once by the daemon, after it opened the buffer (it is the only open of the file
    /// as its owner) and before the leg's thread starts: the leg takes its own handle from
    /// `buffer` ([`Store::another_handle`]) and reports requests in flight to `alive`, which
    /// feeds the watchdog. A leg that needs neither ignores them.
    fn attach(&mut self, buffer: &Store, alive: Alive) -> anyhow::Result<()> {
        let _ = (buffer, alive);
        Ok(())
    }

    /// Does the upload work that is due now (possibly several requests) and returns how long
    /// the caller may sleep before calling again; a wake (new capture, `retry`) cuts the sleep
    /// short. Must come back, or report to `alive`, within half the watchdog interval: every
    /// request has a deadline, and `alive` covers the time up to it.
    fn pump(&mut self, events: &mut dyn FnMut(UploadEvent)) -> Duration;

    /// Forgets any wait (a new capture, an operator's retry); the next pump tries at once.
    fn wake(&mut self) {}
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

/// The leg of a bay with `[cloud]`: the [`Uploader`] on its own connection to the buffer.
/// Its events are turned into the daemon's as they happen.
pub struct CloudLeg {
    uploader: Uploader,
    /// The leg's handle on the buffer, from [`UploadLeg::attach`].
    store: Option<Store>,
}

impl CloudLeg {
    /// Makes the leg from `[cloud]` and the account secret. It touches no buffer: the daemon
    /// opens that first (after asking systemd for the time a check may take) and hands the leg
    /// its handle in [`UploadLeg::attach`].
    pub fn open(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Option<CloudLeg>> {
        let Some(cloud) = &config.cloud else {
            return Ok(None);
        };
        let uploader = crate::upload::drain::uploader(cloud, clock)?;
        Ok(Some(CloudLeg { uploader, store: None }))
    }

    fn translate(event: Event) -> UploadEvent {
        match event {
            Event::Started { id, case_id } => UploadEvent::Started { inspection_id: id.0, case_id },
            Event::Sent { id, case_id, bytes, images_sent, images_total, .. } => UploadEvent::Progress {
                inspection_id: id.0,
                case_id,
                images_sent: images_sent as u32,
                images_total: images_total as u32,
                bytes,
            },
            Event::Uploaded { id, case_id, images, bytes, .. } => {
                UploadEvent::Uploaded { inspection_id: id.0, case_id, images: images as u32, bytes }
            }
            Event::SessionGivenUp { id, case_id, .. } => {
                UploadEvent::SessionExpired { inspection_id: id.0, case_id }
            }
            Event::Failed { id, case_id, reason } => {
                UploadEvent::Failed { inspection_id: id.0, case_id, reason }
            }
            Event::Link(link) => UploadEvent::Link {
                online: link.online.unwrap_or(false),
                clock_trusted: link.clock.may_sign(),
                detail: link.last_error,
            },
        }
    }
}

impl UploadLeg for CloudLeg {
    fn attach(&mut self, buffer: &Store, alive: Alive) -> anyhow::Result<()> {
        let store = buffer.another_handle().map_err(|e| {
            anyhow::anyhow!("the upload leg cannot open its handle on {}: {e}", buffer.path().display())
        })?;
        self.store = Some(store);
        self.uploader.set_alive(alive);
        Ok(())
    }

    fn pump(&mut self, events: &mut dyn FnMut(UploadEvent)) -> Duration {
        let Some(store) = self.store.as_mut() else {
            log::error!("The upload leg was started without a handle on the buffer; nothing is uploaded");
            return Duration::from_secs(3600);
        };
        // Each event goes out as it happens: `upload_progress` as every request is confirmed.
        let next = self.uploader.pump(store, &mut |e| events(Self::translate(e)));
        match next {
            Pump::Progress => Duration::ZERO,
            Pump::Wait(wait, _) => wait,
            // A capture or a retry wakes the leg; this is only a safety net.
            Pump::Idle => Duration::from_secs(60),
        }
    }

    fn wake(&mut self) {
        self.uploader.wake();
    }
}
