//! One pass over the upload queue: the CLI's `upload` and `inspect`, the demo, tests and the
//! benchmark use it. It pumps the [`Uploader`] until nothing waits, waiting where it is told to,
//! and gives up once the waits would exceed a budget; whatever is left stays in the buffer for
//! the next pass (or the daemon).

use std::sync::Arc;
use std::time::Duration;

use super::client::Client;
use super::uploader::{Event, Pump, Uploader};
use crate::clock::Clock;
use crate::config::CloudConfig;
use crate::credentials::CredentialError;
use crate::store::{InspectionId, Store};
use crate::trust::TrustError;

/// Why the uploader of a `[cloud]` section cannot be made. Not retryable: the secret or the
/// roots must be fixed (`capture-kiosk check` names which).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    /// The API secret cannot be loaded (`api_secret_file`, the systemd credential).
    #[error(transparent)]
    Credential(#[from] CredentialError),
    /// The roots the cloud's certificate is checked against (`ca_file`, the system store).
    #[error(transparent)]
    Trust(#[from] TrustError),
}

/// Builds the uploader of a `[cloud]` section, loading the API secret and the roots its
/// certificate is checked against.
pub fn uploader(config: &CloudConfig, clock: Arc<dyn Clock>) -> Result<Uploader, SetupError> {
    let secret = config.secret()?;
    let client = Client::new(config, secret, clock.clone())?;
    Ok(Uploader::new(client, config, clock))
}

/// What a pass achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drained {
    /// Inspections the cloud completed during the pass.
    pub completed: Vec<InspectionId>,
    /// Inspections the cloud refused for good, with the reason.
    pub failed: Vec<(InspectionId, String)>,
    /// Image bytes the cloud confirmed.
    pub bytes_sent: u64,
    /// Why the pass stopped with work left, if it did (offline, clock untrusted…).
    pub stopped: Option<String>,
    /// Time spent waiting on the uploader's say.
    pub waited: Duration,
}

/// Pumps until the queue is empty or the next wait would take the total past `budget`.
/// `sleep` waits (a real sleep, or advancing a test clock); `events` sees every event.
pub fn drain(
    uploader: &mut Uploader,
    store: &mut Store,
    budget: Duration,
    sleep: &mut dyn FnMut(Duration),
    events: &mut dyn FnMut(&Event),
) -> Drained {
    let mut out = Drained::default();
    loop {
        let mut on_event = |e: Event| {
            match &e {
                Event::Uploaded { id, .. } => out.completed.push(*id),
                Event::Failed { id, reason, .. } => out.failed.push((*id, reason.clone())),
                Event::Sent { bytes, .. } => out.bytes_sent += bytes,
                _ => {}
            }
            events(&e);
        };
        match uploader.pump(store, &mut on_event) {
            Pump::Idle => return out,
            Pump::Progress => {}
            Pump::Wait(wait, why) => {
                if out.waited + wait > budget {
                    out.stopped = Some(why);
                    return out;
                }
                sleep(wait);
                out.waited += wait;
            }
        }
    }
}
