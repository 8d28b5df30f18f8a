//! `v4l2:/dev/videoN` or `v4l2:N`: a USB or CSI camera through nokhwa, the only file that
//! names nokhwa. nokhwa's camera is `!Send`, so each device lives on a thread of its own and
//! frames come out through a channel.
//!
//! The mode is the configured `resolution` and `format`, else the highest-resolution MJPEG
//! mode, else the highest-resolution raw mode (whose frames are encoded to JPEG here). With
//! `keep_warm` the thread keeps the stream running and drains it between requests, so a capture
//! takes the next frame that arrives after the trigger (nothing buffered before it) instead of
//! opening the device; without it the stream is opened for each capture and closed after. The
//! device is opened again after any error, so an unplugged camera comes back when it is
//! plugged in again.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use nokhwa::pixel_format::RgbFormat;
use nokhwa::utils::{
    ApiBackend, CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType,
};

use super::{Camera, CaptureError, PixelFormat};
use crate::imaging::{self, FrameError};
use crate::vehicle::PhotoLabel;

/// Quality used when a camera without MJPEG delivers raw frames that must become JPEG.
const RAW_FRAME_QUALITY: u8 = 95;
/// Opening a device and starting its stream can take a few seconds on a cold USB camera.
const OPEN_ALLOWANCE: Duration = Duration::from_secs(5);
/// Raw formats this kiosk can turn into JPEG, in order of preference.
const RAW_FORMATS: [FrameFormat; 3] = [FrameFormat::YUYV, FrameFormat::NV12, FrameFormat::GRAY];

/// A V4L2 device the system offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoDevice {
    pub index: String,
    pub name: String,
    pub description: String,
    /// Its modes; empty when the device could not be asked.
    pub modes: Vec<VideoMode>,
}

/// One mode of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoMode {
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    pub fps: u32,
}

impl std::fmt::Display for VideoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{} {:?} {} fps", self.width, self.height, self.format, self.fps)
    }
}

/// Why the device thread could not answer a request, or the devices could not be listed. The
/// messages are the device layer's own words or ours; [`V4l2Camera`] reports them as
/// [`CaptureError::NoDevice`], after which the device is opened anew at the next request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The device path does not lead to a device node (a udev link that is gone while the camera
    /// is unplugged). A retry helps once it is plugged in.
    #[error("{reason}")]
    Unresolved { reason: String },
    /// The path leads to something that is not a `/dev/videoN` node. Not retryable: the
    /// configured `source` must change.
    #[error("{path} is not a /dev/videoN device")]
    NotVideoDevice { path: String },
    /// nokhwa (the V4L2 layer) failed to open, query, start or read the device, in its own
    /// words. A retry helps when the camera was unplugged, busy or slow to start.
    #[error("{0}")]
    Device(String),
    /// No mode of the device fits the configured `resolution` and `format`. Not retryable: the
    /// configuration must name a mode the device offers.
    #[error("the device offers no mode that fits (resolution {resolution:?}, format {format:?}); it offers: {offered}")]
    NoFittingMode { resolution: Option<(u32, u32)>, format: Option<PixelFormat>, offered: String },
    /// The stream gave nothing, or a raw frame of the wrong size. A retry can help.
    #[error("{0}")]
    BadFrame(&'static str),
    /// A raw frame could not be encoded to JPEG. A retry can help.
    #[error(transparent)]
    Encode(#[from] FrameError),
}

impl DeviceError {
    fn device(e: nokhwa::NokhwaError) -> DeviceError {
        DeviceError::Device(e.to_string())
    }
}

/// The V4L2 devices the system offers, with their modes; empty when there are none.
pub fn list_devices() -> Result<Vec<VideoDevice>, DeviceError> {
    let found = nokhwa::query(ApiBackend::Auto).map_err(DeviceError::device)?;
    Ok(found
        .into_iter()
        .map(|info| {
            let modes = nokhwa::Camera::new(info.index().clone(), any_format())
                .and_then(|mut c| c.compatible_camera_formats())
                .map(|formats| formats.iter().filter_map(mode_of).collect())
                .unwrap_or_default();
            VideoDevice {
                index: info.index().as_string(),
                name: info.human_name(),
                description: info.description().to_owned(),
                modes,
            }
        })
        .collect())
}

/// The mode to use among `modes`: the configured resolution and/or format when given, else
/// the highest-resolution MJPEG mode, else the highest-resolution raw mode; the highest frame
/// rate among equals.
pub fn choose_mode(
    modes: &[VideoMode],
    resolution: Option<(u32, u32)>,
    format: Option<PixelFormat>,
) -> Option<VideoMode> {
    let fits = |m: &&VideoMode| {
        resolution.is_none_or(|(w, h)| m.width == w && m.height == h) && format.is_none_or(|f| m.format == f)
    };
    let best = |candidates: Vec<&VideoMode>| {
        candidates.into_iter().max_by_key(|m| (u64::from(m.width) * u64::from(m.height), m.fps)).copied()
    };
    let fitting: Vec<&VideoMode> = modes.iter().filter(fits).collect();
    if format.is_some() {
        return best(fitting);
    }
    let mjpeg: Vec<&VideoMode> = fitting.iter().copied().filter(|m| m.format == PixelFormat::Mjpeg).collect();
    if mjpeg.is_empty() {
        best(fitting)
    } else {
        best(mjpeg)
    }
}

/// How to run a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V4l2Options {
    /// Longest wait for one frame once the stream runs.
    pub timeout: Duration,
    pub resolution: Option<(u32, u32)>,
    pub format: Option<PixelFormat>,
    pub keep_warm: bool,
}

enum Ask {
    Frame,
    Probe,
}

type Reply = mpsc::Sender<Result<Vec<u8>, DeviceError>>;

pub struct V4l2Camera {
    id: String,
    device: String,
    timeout: Duration,
    requests: mpsc::Sender<(Ask, Reply)>,
}

impl V4l2Camera {
    /// Starts the device's thread; the device itself is opened at the first capture or probe.
    pub fn open(id: &str, device: &str, options: V4l2Options) -> Result<V4l2Camera, CaptureError> {
        let (requests, inbox) = mpsc::channel::<(Ask, Reply)>();
        std::thread::Builder::new()
            .name(format!("camera-{id}"))
            .spawn({
                let device = device.to_owned();
                move || Device { path: device, options, camera: None }.serve(inbox)
            })
            .map_err(|e| CaptureError::Thread {
                camera: id.to_owned(),
                device: device.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(V4l2Camera { id: id.to_owned(), device: device.to_owned(), timeout: options.timeout, requests })
    }

    fn no_device(&self, reason: String) -> CaptureError {
        CaptureError::NoDevice { camera: self.id.clone(), device: self.device.clone(), reason }
    }

    fn ask(&mut self, ask: Ask) -> Result<Vec<u8>, CaptureError> {
        let (reply, answer) = mpsc::channel();
        self.requests
            .send((ask, reply))
            .map_err(|_| self.no_device("the device thread has stopped".to_owned()))?;
        match answer.recv_timeout(self.timeout + OPEN_ALLOWANCE) {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(e)) => Err(self.no_device(e.to_string())),
            Err(_) => Err(CaptureError::Unreachable {
                camera: self.id.clone(),
                source_desc: format!("v4l2:{}", self.device),
                reason: "no frame before the camera's timeout".to_owned(),
            }),
        }
    }
}

impl Camera for V4l2Camera {
    fn capture(&mut self, _angle: PhotoLabel) -> Result<Vec<u8>, CaptureError> {
        self.ask(Ask::Frame)
    }

    /// Opens the stream now (with `keep_warm`) so that the first capture does not wait for it.
    fn warm_up(&mut self, _angles: &[PhotoLabel]) -> Result<(), CaptureError> {
        self.ask(Ask::Probe).map(|_| ())
    }

    /// With a warm stream: that frames keep arriving (no decode, no encode). Otherwise: that
    /// the device can be opened, without streaming.
    fn probe(&mut self) -> Result<(), CaptureError> {
        self.ask(Ask::Probe).map(|_| ())
    }
}

/// `/dev/video3`, `3`, or a udev symlink to a `/dev/videoN` node.
fn device_index(device: &str) -> Result<u32, DeviceError> {
    if let Ok(n) = device.parse::<u32>() {
        return Ok(n);
    }
    let resolved =
        std::fs::canonicalize(device).map_err(|e| DeviceError::Unresolved { reason: e.to_string() })?;
    resolved
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("video"))
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| DeviceError::NotVideoDevice { path: resolved.display().to_string() })
}

/// The device thread's state.
struct Device {
    path: String,
    options: V4l2Options,
    camera: Option<nokhwa::Camera>,
}

impl Device {
    /// Answers requests; between them, with `keep_warm`, drains the stream so that no stale
    /// frame waits in the driver's queue.
    fn serve(mut self, inbox: mpsc::Receiver<(Ask, Reply)>) {
        loop {
            let streaming =
                self.options.keep_warm && self.camera.as_ref().is_some_and(|c| c.is_stream_open());
            let next = if streaming {
                match inbox.try_recv() {
                    Ok(r) => Some(r),
                    Err(mpsc::TryRecvError::Empty) => {
                        if let Some(c) = self.camera.as_mut() {
                            if c.frame_raw().is_err() {
                                self.camera = None; // unplugged: reopened at the next request
                            }
                        }
                        continue;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            } else {
                match inbox.recv_timeout(Duration::from_secs(3600)) {
                    Ok(r) => Some(r),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            let Some((ask, reply)) = next else { continue };
            let result = self.answer(ask);
            if result.is_err() {
                self.camera = None;
            }
            if !self.options.keep_warm {
                if let Some(c) = self.camera.as_mut() {
                    let _ = c.stop_stream();
                }
                self.camera = None;
            }
            let _ = reply.send(result);
        }
    }

    fn answer(&mut self, ask: Ask) -> Result<Vec<u8>, DeviceError> {
        let camera = match self.camera.take() {
            Some(open) => open,
            None => self.open()?,
        };
        let camera = self.camera.insert(camera);
        match ask {
            Ask::Probe if !self.options.keep_warm => Ok(Vec::new()),
            Ask::Probe => {
                camera.frame_raw().map_err(DeviceError::device)?;
                Ok(Vec::new())
            }
            Ask::Frame => grab(camera),
        }
    }

    fn open(&self) -> Result<nokhwa::Camera, DeviceError> {
        let index = device_index(&self.path)?;
        let mut camera =
            nokhwa::Camera::new(CameraIndex::Index(index), any_format()).map_err(DeviceError::device)?;
        let modes: Vec<VideoMode> = camera
            .compatible_camera_formats()
            .map_err(DeviceError::device)?
            .iter()
            .filter_map(mode_of)
            .collect();
        let mode = choose_mode(&modes, self.options.resolution, self.options.format).ok_or_else(|| {
            DeviceError::NoFittingMode {
                resolution: self.options.resolution,
                format: self.options.format,
                offered: modes.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(", "),
            }
        })?;
        let wanted = camera_format(mode);
        let formats = [wanted.format()];
        camera
            .set_camera_requset(RequestedFormat::with_formats(RequestedFormatType::Exact(wanted), &formats))
            .map_err(DeviceError::device)?;
        camera.open_stream().map_err(DeviceError::device)?;
        Ok(camera)
    }
}

/// The next frame that arrives after now: with a running stream, frames the driver had already
/// queued come back at once and are dropped; the first one that had to be waited for was
/// exposed after the trigger.
fn grab(camera: &mut nokhwa::Camera) -> Result<Vec<u8>, DeviceError> {
    let interval = Duration::from_secs(1) / camera.frame_rate().max(1);
    let mut frame = None;
    // At most the driver's queue plus one: a frame that had to be waited for ends the loop.
    for _ in 0..8 {
        let asked = Instant::now();
        frame = Some(camera.frame().map_err(DeviceError::device)?);
        if asked.elapsed() >= interval / 4 {
            break;
        }
    }
    let frame = frame.ok_or(DeviceError::BadFrame("the device gave no frame"))?;
    if frame.source_frame_format() == FrameFormat::MJPEG {
        return Ok(frame.buffer().to_vec());
    }
    let decoded = frame.decode_image::<RgbFormat>().map_err(DeviceError::device)?;
    let (w, h) = (decoded.width(), decoded.height());
    let rgb = image::RgbImage::from_raw(w, h, decoded.into_raw())
        .ok_or(DeviceError::BadFrame("the camera's raw frame has the wrong size"))?;
    Ok(imaging::encode(&rgb, RAW_FRAME_QUALITY)?)
}

fn any_format() -> RequestedFormat<'static> {
    const ALL: [FrameFormat; 4] =
        [FrameFormat::MJPEG, FrameFormat::YUYV, FrameFormat::NV12, FrameFormat::GRAY];
    RequestedFormat::with_formats(RequestedFormatType::AbsoluteHighestResolution, &ALL)
}

fn mode_of(f: &CameraFormat) -> Option<VideoMode> {
    let format = match f.format() {
        FrameFormat::MJPEG => PixelFormat::Mjpeg,
        FrameFormat::YUYV => PixelFormat::Yuyv,
        FrameFormat::NV12 => PixelFormat::Nv12,
        FrameFormat::GRAY => PixelFormat::Gray,
        _ => return None,
    };
    Some(VideoMode {
        width: f.resolution().width(),
        height: f.resolution().height(),
        format,
        fps: f.frame_rate(),
    })
}

fn camera_format(m: VideoMode) -> CameraFormat {
    let format = match m.format {
        PixelFormat::Mjpeg => FrameFormat::MJPEG,
        PixelFormat::Yuyv => RAW_FORMATS[0],
        PixelFormat::Nv12 => RAW_FORMATS[1],
        PixelFormat::Gray => RAW_FORMATS[2],
    };
    CameraFormat::new_from(m.width, m.height, format, m.fps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> V4l2Options {
        V4l2Options { timeout: Duration::from_secs(1), resolution: None, format: None, keep_warm: true }
    }

    #[test]
    fn a_missing_device_gives_an_error_that_names_it() {
        // These machines have no V4L2 device and cannot have one; an unplugged bay camera is
        // the same case. By path (resolved here) and by index (opened through nokhwa), for a
        // capture, a warm-up and an idle probe:
        for device in ["/dev/video0", "7"] {
            let mut cam = V4l2Camera::open("front", device, options())
                .expect("the device thread starts without a device");
            for err in [
                cam.capture(PhotoLabel::Front).expect_err("no device exists here"),
                cam.probe().expect_err("no device to probe"),
                cam.warm_up(&[PhotoLabel::Front]).expect_err("no device to warm up"),
            ] {
                let shown = err.to_string();
                assert!(matches!(err, CaptureError::NoDevice { .. }), "{shown}");
                assert!(
                    shown.contains(device) && shown.contains("front") && shown.contains("plugged in"),
                    "{shown}"
                );
            }
        }
    }

    #[test]
    fn device_names_resolve_to_indices() {
        assert_eq!(device_index("2"), Ok(2));
        assert!(device_index("/dev/no-such-camera").is_err());
    }

    #[test]
    fn listing_devices_on_a_machine_without_any_is_empty_not_an_error() {
        let devices = list_devices().unwrap_or_default();
        assert!(devices.iter().all(|d| !d.index.is_empty()), "{devices:?}");
        if !std::path::Path::new("/dev/video0").exists() {
            assert!(devices.is_empty(), "{devices:?}");
        }
    }

    #[test]
    fn the_mode_is_the_configured_one_else_the_largest_mjpeg_else_the_largest_raw() {
        let m = |width, height, format, fps| VideoMode { width, height, format, fps };
        let modes = [
            m(1920, 1080, PixelFormat::Mjpeg, 30),
            m(3840, 2160, PixelFormat::Mjpeg, 15),
            m(3840, 2160, PixelFormat::Mjpeg, 30),
            m(4208, 3120, PixelFormat::Yuyv, 5),
            m(640, 480, PixelFormat::Yuyv, 30),
        ];
        assert_eq!(choose_mode(&modes, None, None), Some(modes[2]), "MJPEG before a larger raw mode");
        assert_eq!(choose_mode(&modes, None, Some(PixelFormat::Yuyv)), Some(modes[3]));
        assert_eq!(choose_mode(&modes, Some((1920, 1080)), None), Some(modes[0]));
        assert_eq!(
            choose_mode(&modes, Some((640, 480)), None),
            Some(modes[4]),
            "raw when that size has no MJPEG"
        );
        assert_eq!(choose_mode(&modes, Some((1280, 720)), None), None);
        assert_eq!(choose_mode(&modes[3..], None, None), Some(modes[3]), "no MJPEG at all");
    }
}
