//! Cameras: the [`Camera`] trait every source implements, a camera's configuration and its
//! checks ([`config`]: the source strings, the V4L2 mode, quality thresholds and masks), and
//! opening a camera from its configuration. A camera is blocking and owned by one thread at a
//! time; it returns raw frames and knows nothing about resizing or storage.

pub mod config;
pub mod digest;
mod directory;
pub mod health;
mod http;
mod synthetic;
pub mod testcam;
mod v4l2;

use std::path::PathBuf;

use crate::credentials::CredentialError;
use crate::trust::CaFileError;
use crate::vehicle::PhotoLabel;

pub use self::config::{BadSource, CameraConfig, CameraSource, PixelFormat};
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

    #[test]
    fn urls_lose_their_credentials_when_shown() {
        assert_eq!(redact_url("http://admin:hunter2@10.0.0.5/snap.jpg"), "http://***@10.0.0.5/snap.jpg");
        assert_eq!(redact_url("http://10.0.0.5/a@b.jpg"), "http://10.0.0.5/a@b.jpg");
        let shown = CameraSource::Http("http://admin:hunter2@cam/x".into()).to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
