//! Cameras: the [`Camera`] trait every source implements, the source strings of the
//! configuration, and opening a camera from its configuration. A camera is blocking and owned
//! by one thread at a time; it returns raw frames and knows nothing about resizing or storage.

pub mod digest;
mod directory;
pub mod health;
mod http;
mod synthetic;
pub mod testcam;
mod v4l2;

use std::path::PathBuf;

use crate::config::CameraConfig;
use crate::credentials::CredentialError;
use crate::trust::CaFileError;
use crate::vehicle::PhotoLabel;

pub use directory::DirectoryCamera;
pub use http::{load_ca_file, Credentials, HttpCamera};
pub use synthetic::{render_scene, SyntheticCamera};
pub use v4l2::{list_devices, DeviceError, V4l2Camera, V4l2Options, VideoDevice, VideoMode};

/// A source of JPEG frames. `capture` blocks until a frame arrives or the camera's deadline
/// passes. Implementations that wrap a `!Send` device run it on a thread of their own.
pub trait Camera: Send {
    /// One frame for `angle`, as the camera delivered it (not yet validated).
    fn capture(&mut self, angle: PhotoLabel) -> Result<Vec<u8>, CaptureError>;

    /// Gets ready to deliver `angles` quickly (opens a stream, fills a frame buffer), so that
    /// the time from a trigger to a frame is the camera's frame interval, not its start-up.
    fn warm_up(&mut self, _angles: &[PhotoLabel]) -> Result<(), CaptureError> {
        Ok(())
    }

    /// A cheap check, while idle, that the camera is there and answering; reattaches a camera
    /// that came back. No full-resolution capture where the source allows it.
    fn probe(&mut self) -> Result<(), CaptureError> {
        Ok(())
    }
}

/// A V4L2 pixel format a camera can be asked for (`format` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    Mjpeg,
    Yuyv,
    Nv12,
    Gray,
}

impl PixelFormat {
    pub fn parse(text: &str) -> Option<PixelFormat> {
        match text.trim().to_ascii_lowercase().as_str() {
            "mjpeg" | "mjpg" | "jpeg" => Some(PixelFormat::Mjpeg),
            "yuyv" | "yuy2" => Some(PixelFormat::Yuyv),
            "nv12" => Some(PixelFormat::Nv12),
            "gray" | "grey" => Some(PixelFormat::Gray),
            _ => None,
        }
    }
}

/// Where a camera's frames come from, as written in `[[cameras]] source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CameraSource {
    /// `synthetic:WxH`: generated camera-like frames.
    Synthetic { width: u32, height: u32 },
    /// `dir:PATH`: real JPEGs replayed from a folder.
    Directory(PathBuf),
    /// `http://…` or `https://…`: an IP camera's snapshot URL.
    Http(String),
    /// `v4l2:/dev/videoN` or `v4l2:N`: a V4L2 device.
    V4l2(String),
}

/// Why a source string was refused: (problem, fix), for the configuration's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadSource {
    pub problem: String,
    pub fix: String,
}

const SOURCE_FIX: &str =
    "use \"synthetic:WxH\", \"dir:/path/to/jpegs\", \"http://host/snapshot.jpg\" or \"v4l2:/dev/video0\"";

impl CameraSource {
    pub fn parse(text: &str) -> Result<CameraSource, BadSource> {
        let bad = |problem: String| BadSource { problem, fix: SOURCE_FIX.to_owned() };
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            let host = text.split_once("://").map(|(_, rest)| rest).unwrap_or("");
            if host.is_empty() || host.starts_with('/') {
                return Err(bad(format!("{text:?} has no host")));
            }
            return Ok(CameraSource::Http(text.to_owned()));
        }
        let Some((scheme, rest)) = text.split_once(':') else {
            return Err(bad(format!("{text:?} has no scheme")));
        };
        match scheme {
            "synthetic" => {
                let size = rest
                    .split_once(['x', 'X'])
                    .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)));
                match size {
                    Some((width, height))
                        if (16..=16384).contains(&width) && (16..=16384).contains(&height) =>
                    {
                        Ok(CameraSource::Synthetic { width, height })
                    }
                    _ => Err(BadSource {
                        problem: format!("{text:?} does not give a size of 16 to 16384 pixels a side"),
                        fix: "write e.g. \"synthetic:4032x3024\"".to_owned(),
                    }),
                }
            }
            "dir" if !rest.is_empty() => Ok(CameraSource::Directory(PathBuf::from(rest))),
            "dir" => Err(bad(format!("{text:?} names no folder"))),
            "v4l2" if !rest.is_empty() => Ok(CameraSource::V4l2(rest.to_owned())),
            "v4l2" => Err(bad(format!("{text:?} names no device"))),
            other => Err(bad(format!("{other:?} in {text:?} is not a known source scheme"))),
        }
    }
}

impl std::fmt::Display for CameraSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CameraSource::Synthetic { width, height } => write!(f, "synthetic:{width}x{height}"),
            CameraSource::Directory(p) => write!(f, "dir:{}", p.display()),
            CameraSource::Http(url) => f.write_str(&redact_url(url)),
            CameraSource::V4l2(dev) => write!(f, "v4l2:{dev}"),
        }
    }
}

/// Why a camera gave no frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    /// The device does not exist or cannot be opened. Retrying helps only once it is plugged in.
    #[error("camera {camera}: device {device} cannot be opened: {reason}; check that it is plugged in and that the kiosk's user may open it (group video)")]
    NoDevice { camera: String, device: String, reason: String },
    /// The source answered, but not with a frame (HTTP error status, empty folder…).
    #[error("camera {camera}: {source_desc} gave no frame: {reason}")]
    NoFrame { camera: String, source_desc: String, reason: String },
    /// The source could not be reached or did not answer in time. A retry can help.
    #[error("camera {camera}: {source_desc} is unreachable: {reason}")]
    Unreachable { camera: String, source_desc: String, reason: String },
    /// The frame is larger than `max_frame_bytes`.
    #[error("camera {camera}: frame from {source_desc} is larger than the {limit}-byte cap; raise max_frame_bytes if the camera really sends such frames")]
    TooLarge { camera: String, source_desc: String, limit: u64 },
    /// The camera's configuration cannot work (credentials or CA file). Not retryable.
    #[error("camera {camera} cannot be set up: {problem}")]
    Setup { camera: String, problem: CameraFileError },
    /// The thread that owns the device could not be started: the system is out of threads or
    /// memory. Not retryable by asking the camera again; the camera must be opened anew.
    #[error("camera {camera}: the thread for device {device} cannot be started: {reason}; the system is short of memory or threads")]
    Thread { camera: String, device: String, reason: String },
    /// The camera is not configured for this angle.
    #[error("camera {camera} does not shoot {angle}")]
    WrongAngle { camera: String, angle: PhotoLabel },
}

/// Why a file that an IP camera's configuration names cannot be used (`credentials_file`, the
/// systemd credential `camera-<id>`, `ca_file`). Not retryable: the file must be fixed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CameraFileError {
    /// The credentials cannot be read, are readable by others, or are empty.
    #[error("{0}; it holds the camera's user:password on one line")]
    Credentials(#[from] CredentialError),
    /// The credentials are not one line `user:password`.
    #[error("credentials file {path} does not hold a line user:password; write it as admin:secret")]
    NotUserPassword { path: PathBuf },
    /// The CA file cannot be read, is not PEM, or holds no certificate.
    #[error("{0}; give the PEM file of the camera's CA")]
    CaFile(#[from] CaFileError),
}

impl CameraFileError {
    /// The key of the camera's table that names the file.
    pub fn key(&self) -> &'static str {
        match self {
            CameraFileError::Credentials(_) | CameraFileError::NotUserPassword { .. } => "credentials_file",
            CameraFileError::CaFile(_) => "ca_file",
        }
    }
}

impl CaptureError {
    /// Whether asking the same camera again soon can give a frame.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CaptureError::Unreachable { .. } | CaptureError::NoFrame { .. } | CaptureError::TooLarge { .. }
        )
    }
}

/// Opens the camera a configuration describes. Network and device cameras connect lazily, so
/// this only fails for configurations that can never work.
pub fn open(config: &CameraConfig) -> Result<Box<dyn Camera>, CaptureError> {
    Ok(match &config.source {
        CameraSource::Synthetic { width, height } => {
            Box::new(SyntheticCamera::new(&config.id, *width, *height))
        }
        CameraSource::Directory(dir) => Box::new(DirectoryCamera::new(&config.id, dir.clone())),
        CameraSource::Http(url) => {
            let setup = |problem| CaptureError::Setup { camera: config.id.clone(), problem };
            let (credentials, ca) = http_files(config).map_err(setup)?;
            let camera = HttpCamera::new(&config.id, url, config.timeout, config.max_frame_bytes)
                .with_credentials(credentials);
            match ca {
                Some(certs) => Box::new(camera.with_ca_certs(certs, config.timeout)),
                None => Box::new(camera),
            }
        }
        CameraSource::V4l2(device) => Box::new(V4l2Camera::open(
            &config.id,
            device,
            V4l2Options {
                timeout: config.timeout,
                resolution: config.resolution,
                format: config.format,
                keep_warm: config.keep_warm,
            },
        )?),
    })
}

type HttpFiles = (Option<Credentials>, Option<Vec<ureq::tls::Certificate<'static>>>);

fn http_files(config: &CameraConfig) -> Result<HttpFiles, CameraFileError> {
    let credentials = Credentials::load(
        &config.id,
        config.credentials_file.as_deref(),
        crate::credentials::credentials_dir().as_deref(),
    )?;
    let ca = config.ca_file.as_deref().map(load_ca_file).transpose()?;
    Ok((credentials, ca))
}

/// Reads the files a camera's configuration names (credentials, CA), for `check`: the error
/// names the key ([`CameraFileError::key`]) and the problem when one cannot be used.
pub fn check_files(config: &CameraConfig) -> Result<(), CameraFileError> {
    if matches!(config.source, CameraSource::Http(_)) {
        http_files(config)?;
    }
    Ok(())
}

/// A URL with any `user:password@` removed, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}{path}"),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Result<CameraSource, &str>) {
        match (CameraSource::parse(text), expected) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{text}"),
            (Err(got), Err(words)) => assert!(got.problem.contains(words), "{text}: {got:?}"),
            (got, want) => panic!("{text}: got {got:?}, expected {want:?}"),
        }
    }

    #[test]
    fn source_strings_parse_or_say_what_is_wrong() {
        check("synthetic:4032x3024", Ok(CameraSource::Synthetic { width: 4032, height: 3024 }));
        check("synthetic:4032", Err("size"));
        check("synthetic:99999x10", Err("size"));
        check("dir:/srv/photos", Ok(CameraSource::Directory(PathBuf::from("/srv/photos"))));
        check("dir:", Err("no folder"));
        check("http://10.0.0.5/snapshot.jpg", Ok(CameraSource::Http("http://10.0.0.5/snapshot.jpg".into())));
        check("HTTPS://cam.local/a.jpg", Ok(CameraSource::Http("HTTPS://cam.local/a.jpg".into())));
        check("http:///a.jpg", Err("no host"));
        check("v4l2:/dev/video0", Ok(CameraSource::V4l2("/dev/video0".into())));
        check("v4l2:2", Ok(CameraSource::V4l2("2".into())));
        check("rtsp://cam/stream", Err("not a known source scheme"));
        check("/dev/video0", Err("no scheme"));
    }

    #[test]
    fn urls_lose_their_credentials_when_shown() {
        assert_eq!(redact_url("http://admin:hunter2@10.0.0.5/snap.jpg"), "http://***@10.0.0.5/snap.jpg");
        assert_eq!(redact_url("http://10.0.0.5/a@b.jpg"), "http://10.0.0.5/a@b.jpg");
        let shown = CameraSource::Http("http://admin:hunter2@cam/x".into()).to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
