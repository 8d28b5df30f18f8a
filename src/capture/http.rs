//! `http://…` / `https://…`: an IP camera's snapshot URL, where one GET returns one JPEG.
//! Every request has a deadline and the body a size cap, so a hung or hostile camera can
//! neither stall an inspection nor exhaust memory.

use std::time::Duration;

use super::{redact_url, Camera, CaptureError};
use crate::vehicle::PhotoLabel;

pub struct HttpCamera {
    id: String,
    url: String,
    max_frame_bytes: u64,
    agent: ureq::Agent,
}

impl HttpCamera {
    pub fn new(id: &str, url: &str, timeout: Duration, max_frame_bytes: u64) -> HttpCamera {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .user_agent(concat!("capture-kiosk/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        HttpCamera { id: id.to_owned(), url: url.to_owned(), max_frame_bytes, agent }
    }

    fn unreachable(&self, reason: String) -> CaptureError {
        CaptureError::Unreachable { camera: self.id.clone(), source_desc: redact_url(&self.url), reason }
    }
}

impl Camera for HttpCamera {
    fn capture(&mut self, _angle: PhotoLabel) -> Result<Vec<u8>, CaptureError> {
        let mut response = self.agent.get(&self.url).call().map_err(|e| self.unreachable(describe(&e)))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(CaptureError::NoFrame {
                camera: self.id.clone(),
                source_desc: redact_url(&self.url),
                reason: format!("HTTP status {status}"),
            });
        }
        // One byte over the cap is enough to know the frame is too large.
        match response.body_mut().with_config().limit(self.max_frame_bytes.saturating_add(1)).read_to_vec() {
            Ok(body) if body.len() as u64 > self.max_frame_bytes => Err(self.too_large()),
            Ok(body) => Ok(body),
            Err(ureq::Error::BodyExceedsLimit(_)) => Err(self.too_large()),
            Err(e) => Err(self.unreachable(format!("the frame was cut off: {}", describe(&e)))),
        }
    }
}

impl HttpCamera {
    fn too_large(&self) -> CaptureError {
        CaptureError::TooLarge {
            camera: self.id.clone(),
            source_desc: redact_url(&self.url),
            limit: self.max_frame_bytes,
        }
    }
}

fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(_) => "no answer before the camera's timeout".to_owned(),
        other => other.to_string(),
    }
}
