//! `v4l2:/dev/videoN` or `v4l2:N`: a USB or CSI camera through nokhwa, the only file that
//! names nokhwa. nokhwa's camera is `!Send`, so each device lives on a thread of its own and
//! frames come out through a channel. The device is opened on first use and again after any
//! error, so an unplugged camera comes back when it is plugged in again.

use std::sync::mpsc;
use std::time::Duration;

use nokhwa::pixel_format::RgbFormat;
use nokhwa::utils::{ApiBackend, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType};

use super::{Camera, CaptureError};
use crate::imaging;
use crate::vehicle::PhotoLabel;

/// Quality used when a camera without MJPEG delivers raw frames that must become JPEG.
const RAW_FRAME_QUALITY: u8 = 95;
/// Opening a device and starting its stream can take a few seconds on a cold USB camera.
const OPEN_ALLOWANCE: Duration = Duration::from_secs(5);

/// A V4L2 device the system offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoDevice {
    pub index: String,
    pub name: String,
    pub description: String,
}

/// The V4L2 devices the system offers; empty when there are none.
pub fn list_devices() -> Result<Vec<VideoDevice>, String> {
    let found = nokhwa::query(ApiBackend::Auto).map_err(|e| e.to_string())?;
    Ok(found
        .into_iter()
        .map(|info| VideoDevice {
            index: info.index().as_string(),
            name: info.human_name(),
            description: info.description().to_owned(),
        })
        .collect())
}

pub struct V4l2Camera {
    id: String,
    device: String,
    timeout: Duration,
    requests: mpsc::Sender<mpsc::Sender<Result<Vec<u8>, String>>>,
}

impl V4l2Camera {
    /// Starts the device's thread; the device itself is opened at the first capture.
    pub fn open(id: &str, device: &str, timeout: Duration) -> Result<V4l2Camera, CaptureError> {
        let (requests, inbox) = mpsc::channel::<mpsc::Sender<Result<Vec<u8>, String>>>();
        std::thread::Builder::new()
            .name(format!("camera-{id}"))
            .spawn({
                let device = device.to_owned();
                move || serve(&device, inbox)
            })
            .map_err(|e| CaptureError::NoDevice {
                camera: id.to_owned(),
                device: device.to_owned(),
                reason: format!("no thread for the device: {e}"),
            })?;
        Ok(V4l2Camera { id: id.to_owned(), device: device.to_owned(), timeout, requests })
    }

    fn no_device(&self, reason: String) -> CaptureError {
        CaptureError::NoDevice { camera: self.id.clone(), device: self.device.clone(), reason }
    }
}

impl Camera for V4l2Camera {
    fn capture(&mut self, _angle: PhotoLabel) -> Result<Vec<u8>, CaptureError> {
        let (reply, answer) = mpsc::channel();
        self.requests.send(reply).map_err(|_| self.no_device("the device thread has stopped".to_owned()))?;
        match answer.recv_timeout(self.timeout + OPEN_ALLOWANCE) {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(reason)) => Err(self.no_device(reason)),
            Err(_) => Err(CaptureError::Unreachable {
                camera: self.id.clone(),
                source_desc: format!("v4l2:{}", self.device),
                reason: "no frame before the camera's timeout".to_owned(),
            }),
        }
    }
}

/// `/dev/video3`, `3`, or a udev symlink to a `/dev/videoN` node.
fn device_index(device: &str) -> Result<u32, String> {
    if let Ok(n) = device.parse::<u32>() {
        return Ok(n);
    }
    let resolved = std::fs::canonicalize(device).map_err(|e| format!("{e}"))?;
    resolved
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("video"))
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| format!("{} is not a /dev/videoN device", resolved.display()))
}

/// The device thread: answers each request with one frame, keeping the stream open between
/// requests and reopening it after an error.
fn serve(device: &str, inbox: mpsc::Receiver<mpsc::Sender<Result<Vec<u8>, String>>>) {
    let mut camera: Option<nokhwa::Camera> = None;
    for reply in inbox {
        if camera.is_none() {
            match device_index(device).and_then(open_device) {
                Ok(c) => camera = Some(c),
                Err(e) => {
                    let _ = reply.send(Err(e));
                    continue;
                }
            }
        }
        let result = match camera.as_mut() {
            Some(c) => grab(c),
            None => Err("the device is not open".to_owned()),
        };
        if result.is_err() {
            camera = None;
        }
        let _ = reply.send(result);
    }
}

fn open_device(index: u32) -> Result<nokhwa::Camera, String> {
    let wanted = RequestedFormat::new::<RgbFormat>(RequestedFormatType::AbsoluteHighestResolution);
    let mut camera = nokhwa::Camera::new(CameraIndex::Index(index), wanted).map_err(|e| e.to_string())?;
    camera.open_stream().map_err(|e| e.to_string())?;
    Ok(camera)
}

fn grab(camera: &mut nokhwa::Camera) -> Result<Vec<u8>, String> {
    let frame = camera.frame().map_err(|e| e.to_string())?;
    if frame.source_frame_format() == FrameFormat::MJPEG {
        return Ok(frame.buffer().to_vec());
    }
    let decoded = frame.decode_image::<RgbFormat>().map_err(|e| e.to_string())?;
    let (w, h) = (decoded.width(), decoded.height());
    let rgb = image::RgbImage::from_raw(w, h, decoded.into_raw())
        .ok_or_else(|| "the camera's raw frame has the wrong size".to_owned())?;
    imaging::encode(&rgb, RAW_FRAME_QUALITY).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_gives_an_error_that_names_it() {
        // These machines have no V4L2 device and cannot have one; an unplugged bay camera is
        // the same case. By path (resolved here) and by index (opened through nokhwa):
        for device in ["/dev/video0", "7"] {
            let mut cam = V4l2Camera::open("front", device, Duration::from_secs(1))
                .expect("the device thread starts even without a device");
            let err = cam.capture(PhotoLabel::Front).expect_err("no device exists here");
            let shown = err.to_string();
            assert!(matches!(err, CaptureError::NoDevice { .. }), "{shown}");
            assert!(
                shown.contains(device) && shown.contains("front") && shown.contains("plugged in"),
                "{shown}"
            );
        }
    }

    #[test]
    fn device_names_resolve_to_indices() {
        assert_eq!(device_index("2"), Ok(2));
        assert!(device_index("/dev/no-such-camera").is_err());
    }
}
