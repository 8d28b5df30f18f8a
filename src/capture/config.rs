//! A camera's configuration, the `[[cameras]]` tables of the bay's file: the serde [`RawCamera`]
//! (unknown keys refused) and its check into a [`CameraConfig`], with everything that is a
//! camera's own: the source string ([`CameraSource`]), the V4L2 mode and format, the files of
//! an IP camera, the quality gate's thresholds and the privacy masks. `config` reads the file
//! and calls [`RawCamera::check`] for each table; this module knows nothing of the other
//! sections.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::redact_url;
use crate::imaging::{CameraImaging, Fill, Mask, QualityThresholds};
use crate::setting::{self, in_range, invalid, ByteSize, Invalid};
use crate::vehicle::PhotoLabel;

/// A camera that passed every check.
#[derive(Debug, Clone)]
pub struct CameraConfig {
    pub id: String,
    pub source: CameraSource,
    /// The angles this camera shoots, in the order it is driven through them.
    pub angles: Vec<PhotoLabel>,
    /// Deadline for one frame (network and device sources).
    pub timeout: Duration,
    /// Largest frame accepted from the source.
    pub max_frame_bytes: u64,
    /// V4L2: the mode to ask for (`None`: the highest resolution).
    pub resolution: Option<(u32, u32)>,
    /// V4L2: the pixel format to ask for (`None`: MJPEG when offered).
    pub format: Option<PixelFormat>,
    /// V4L2: keep the stream open between inspections.
    pub keep_warm: bool,
    /// HTTP: a file with `user:password` (else the systemd credential `camera-<id>`).
    pub credentials_file: Option<PathBuf>,
    /// HTTPS: PEM certificates the camera's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// The quality gate's thresholds for this camera's frames.
    pub quality: QualityThresholds,
    /// Privacy masks filled into this camera's images before they are stored.
    pub masks: Vec<Mask>,
}

impl CameraConfig {
    /// What this camera's frames get besides the bay-wide resize.
    pub fn imaging(&self) -> CameraImaging {
        CameraImaging { quality: self.quality, masks: self.masks.clone() }
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
    /// The source's kind as written before the colon (`http` for both schemes); never the
    /// address, which may hold a password.
    pub fn kind(&self) -> &'static str {
        match self {
            CameraSource::Synthetic { .. } => "synthetic",
            CameraSource::Directory(_) => "dir",
            CameraSource::Http(_) => "http",
            CameraSource::V4l2(_) => "v4l2",
        }
    }

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

/// One `[[cameras]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCamera {
    id: String,
    source: String,
    angles: Vec<String>,
    #[serde(default = "default_timeout")]
    timeout: String,
    #[serde(default = "default_max_frame")]
    max_frame_bytes: String,
    resolution: Option<String>,
    format: Option<String>,
    #[serde(default = "default_true")]
    keep_warm: bool,
    credentials_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    quality: RawQuality,
    #[serde(default)]
    masks: Vec<RawMask>,
}

/// `[[cameras]] quality = { … }`: any threshold left out keeps its default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuality {
    min_sharpness: Option<f64>,
    max_dark_clipped: Option<f64>,
    max_bright_clipped: Option<f64>,
    min_mean_luma: Option<f64>,
    max_mean_luma: Option<f64>,
    max_glare: Option<f64>,
}

/// `[[cameras]] masks = [{ polygon = [[x, y], …], fill = "black" }]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMask {
    name: Option<String>,
    polygon: Vec<Vec<f64>>,
    #[serde(default = "default_fill")]
    fill: String,
}

fn default_timeout() -> String {
    "5s".to_owned()
}
fn default_max_frame() -> String {
    "32 MiB".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_fill() -> String {
    "black".to_owned()
}

impl RawCamera {
    /// Checks the table whose keys start with `key` (`cameras[2]`), given the cameras checked
    /// before it: its id must be its own and no angle may be another camera's.
    pub fn check(self, key: &str, before: &[CameraConfig]) -> Result<CameraConfig, Invalid> {
        let at = |field: &str| format!("{key}.{field}");
        if !setting::is_plain_id(&self.id) {
            return Err(invalid(
                at("id"),
                format!("{:?} is not a usable camera id", self.id),
                "use 1-64 characters of A-Z, a-z, 0-9, '-' and '_'",
            ));
        }
        if before.iter().any(|c| c.id == self.id) {
            return Err(invalid(
                at("id"),
                format!("{:?} is used by two cameras", self.id),
                "give every camera its own id",
            ));
        }
        let source =
            CameraSource::parse(&self.source).map_err(|e| invalid(at("source"), e.problem, e.fix))?;
        let angles = self.check_angles(&at("angles"), before)?;
        let timeout = setting::duration_in_range(
            &at("timeout"),
            &self.timeout,
            Duration::from_nanos(1),
            Duration::from_secs(120),
            "use between \"100ms\" and \"120s\"",
        )?;
        let max_frame_bytes = in_range(
            &at("max_frame_bytes"),
            setting::size(&at("max_frame_bytes"), &self.max_frame_bytes)?,
            ByteSize(64 * 1024),
            ByteSize::MAX,
            "use at least \"1 MiB\" (32 MiB is the default); less is too small for a camera frame",
        )?
        .0;
        let is_v4l2 = matches!(source, CameraSource::V4l2(_));
        let is_http = matches!(source, CameraSource::Http(_));
        let resolution = match &self.resolution {
            None => None,
            Some(_) if !is_v4l2 => {
                return Err(invalid(
                    at("resolution"),
                    "is set for a camera that is not v4l2:",
                    "remove it; only V4L2 cameras have modes",
                ))
            }
            Some(text) => Some(resolution(&at("resolution"), text)?),
        };
        let format = match &self.format {
            None => None,
            Some(_) if !is_v4l2 => {
                return Err(invalid(
                    at("format"),
                    "is set for a camera that is not v4l2:",
                    "remove it; only V4L2 cameras have pixel formats",
                ))
            }
            Some(text) => Some(PixelFormat::parse(text).ok_or_else(|| {
                invalid(
                    at("format"),
                    format!("{text:?} is not a known pixel format"),
                    "use \"mjpeg\", \"yuyv\", \"nv12\" or \"gray\"",
                )
            })?),
        };
        for (field, set) in
            [("credentials_file", self.credentials_file.is_some()), ("ca_file", self.ca_file.is_some())]
        {
            if set && !is_http {
                return Err(invalid(
                    at(field),
                    "is set for a camera that is not http(s)://",
                    "remove it; only IP cameras take credentials and CA files",
                ));
            }
        }
        if self.ca_file.is_some() && !self.source.to_ascii_lowercase().starts_with("https://") {
            return Err(invalid(
                at("ca_file"),
                "is set but the source is plain http://",
                "use an https:// source, or remove ca_file",
            ));
        }
        if is_http && self.source.contains('@') {
            return Err(invalid(
                at("source"),
                "contains credentials",
                "remove user:password@ from the URL and put them in credentials_file (mode 600)",
            ));
        }
        let quality = self.quality.check(&at)?;
        let mut masks = Vec::with_capacity(self.masks.len());
        for (m, mask) in self.masks.into_iter().enumerate() {
            masks.push(mask.check(&self.id, m, at(&format!("masks[{m}]")))?);
        }
        Ok(CameraConfig {
            quality,
            masks,
            id: self.id,
            source,
            angles,
            timeout,
            max_frame_bytes,
            resolution,
            format,
            keep_warm: self.keep_warm,
            credentials_file: self.credentials_file,
            ca_file: self.ca_file,
        })
    }

    /// The camera's angles (key `key`): at least one, none another camera shoots.
    fn check_angles(&self, key: &str, before: &[CameraConfig]) -> Result<Vec<PhotoLabel>, Invalid> {
        let angles = setting::labels(key, &self.angles)?;
        if angles.is_empty() {
            return Err(invalid(key, "is empty", "list the angles this camera shoots, e.g. [\"Front\"]"));
        }
        for (i, angle) in angles.iter().enumerate() {
            let other = before.iter().find(|c| c.angles.contains(angle)).map(|c| c.id.as_str());
            let other = other.or_else(|| angles[..i].contains(angle).then_some(self.id.as_str()));
            if let Some(other) = other {
                return Err(invalid(
                    key,
                    format!("{angle} is covered twice (cameras {other:?} and {:?})", self.id),
                    "give each angle to exactly one camera",
                ));
            }
        }
        Ok(angles)
    }
}

/// `resolution = "WIDTHxHEIGHT"` (key `key`), 16 to 16384 pixels a side.
fn resolution(key: &str, text: &str) -> Result<(u32, u32), Invalid> {
    let (w, h) = text
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.trim().parse::<u32>().ok()?, h.trim().parse::<u32>().ok()?)))
        .ok_or_else(|| {
            invalid(
                key,
                format!("{text:?} is not WIDTHxHEIGHT"),
                "write e.g. \"3840x2160\"; capture-kiosk cameras lists the modes",
            )
        })?;
    let fix = "use 16 to 16384 pixels a side, e.g. \"3840x2160\"; capture-kiosk cameras lists the modes";
    Ok((in_range(key, w, 16, 16384, fix)?, in_range(key, h, 16, 16384, fix)?))
}

impl RawQuality {
    /// `at` makes a key of a field name (`cameras[0].quality.min_sharpness`).
    fn check(&self, at: &dyn Fn(&str) -> String) -> Result<QualityThresholds, Invalid> {
        let d = QualityThresholds::DEFAULT;
        let value = |field: &str, v: Option<f64>, default: f64, max: f64, fix: &str| {
            in_range(&at(&format!("quality.{field}")), v.unwrap_or(default), 0.0, max, fix)
        };
        let share = "use a fraction from 0.0 to 1.0 (0.2 is 20 %)";
        let luma = "use a mean luma from 0 to 255";
        let t = QualityThresholds {
            min_sharpness: value(
                "min_sharpness",
                self.min_sharpness,
                d.min_sharpness,
                1e9,
                "use 0 (off) or more; capture-kiosk cameras prints each camera's sharpness",
            )?,
            max_dark_clipped: value(
                "max_dark_clipped",
                self.max_dark_clipped,
                d.max_dark_clipped,
                1.0,
                share,
            )?,
            max_bright_clipped: value(
                "max_bright_clipped",
                self.max_bright_clipped,
                d.max_bright_clipped,
                1.0,
                share,
            )?,
            min_mean_luma: value("min_mean_luma", self.min_mean_luma, d.min_mean_luma, 255.0, luma)?,
            max_mean_luma: value("max_mean_luma", self.max_mean_luma, d.max_mean_luma, 255.0, luma)?,
            max_glare: value("max_glare", self.max_glare, d.max_glare, 1.0, share)?,
        };
        if t.min_mean_luma >= t.max_mean_luma {
            return Err(invalid(
                at("quality.min_mean_luma"),
                format!("{} is not below max_mean_luma {}", t.min_mean_luma, t.max_mean_luma),
                "make min_mean_luma smaller than max_mean_luma",
            ));
        }
        Ok(t)
    }
}

impl RawMask {
    /// Checks mask `index` of camera `camera` (key `key`).
    fn check(self, camera: &str, index: usize, key: String) -> Result<Mask, Invalid> {
        let named = match &self.name {
            Some(name) => format!("mask {} ({name:?}) of camera {camera:?}", index + 1),
            None => format!("mask {} of camera {camera:?}", index + 1),
        };
        let fix = "list 3 or more [x, y] points, x and y from 0.0 to 1.0 as fractions of the upright \
                   picture's width and height (capture-kiosk cameras writes a preview with a grid every 0.1)";
        let fill = Fill::parse(&self.fill).ok_or_else(|| {
            invalid(
                format!("{key}.fill"),
                format!("{named}: {:?} is not a fill", self.fill),
                "use \"black\" or \"pixelate\"",
            )
        })?;
        let mut polygon = Vec::with_capacity(self.polygon.len());
        for (i, point) in self.polygon.iter().enumerate() {
            match point.as_slice() {
                &[x, y] => polygon.push([x, y]),
                other => {
                    return Err(invalid(
                        format!("{key}.polygon"),
                        format!("{named}: point {} has {} number(s), not 2", i + 1, other.len()),
                        fix,
                    ))
                }
            }
        }
        Mask::new(self.name, polygon, fill)
            .map_err(|e| invalid(format!("{key}.polygon"), format!("{named} {e}"), fix))
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

    /// Checks one `[[cameras]]` table written in TOML, after the cameras `before`.
    fn camera(table: &str, before: &[CameraConfig]) -> Result<CameraConfig, Invalid> {
        let raw: RawCamera = toml::from_str(table).expect("the table parses");
        raw.check("cameras[1]", before)
    }

    fn refused(table: &str, before: &[CameraConfig], key: &str, words: &[&str]) {
        let err = camera(table, before).expect_err("the camera should be refused");
        assert_eq!(err.key, key, "{err:?}");
        let shown = format!("{}; {}", err.problem, err.fix);
        for w in words {
            assert!(shown.contains(w), "{shown:?} should mention {w:?}");
        }
    }

    #[test]
    fn a_camera_is_checked_on_its_own_keys_and_against_the_cameras_before_it() {
        let front =
            camera("id = \"front\"\nsource = \"synthetic:640x480\"\nangles = [\"Front\"]", &[]).unwrap();
        assert_eq!((front.timeout, front.max_frame_bytes), (Duration::from_secs(5), 32 << 20));
        assert!(front.keep_warm && front.masks.is_empty());
        let before = [front];
        let usb = "id = \"usb\"\nsource = \"v4l2:/dev/video0\"\nangles = [\"Rear\"]";
        let c = camera(&format!("{usb}\nresolution = \"1920x1080\"\nformat = \"mjpg\""), &before).unwrap();
        assert_eq!((c.resolution, c.format), (Some((1920, 1080)), Some(PixelFormat::Mjpeg)));

        refused(&usb.replace("\"usb\"", "\"front\""), &before, "cameras[1].id", &["two cameras"]);
        refused(&usb.replace("\"usb\"", "\"us b\""), &before, "cameras[1].id", &["1-64 characters"]);
        refused(
            &usb.replace("[\"Rear\"]", "[\"Rear\", \"Front\"]"),
            &before,
            "cameras[1].angles",
            &["Front is covered twice", "\"front\" and \"usb\""],
        );
        refused(
            &usb.replace("[\"Rear\"]", "[\"Rear\", \"Rear\"]"),
            &before,
            "cameras[1].angles",
            &["Rear is covered twice"],
        );
        refused(&usb.replace("[\"Rear\"]", "[]"), &before, "cameras[1].angles", &["is empty"]);
        refused(&format!("{usb}\ntimeout = \"0s\""), &before, "cameras[1].timeout", &["0s is out of range"]);
        refused(&format!("{usb}\ntimeout = \"3 min\""), &before, "cameras[1].timeout", &["120s"]);
        refused(
            &format!("{usb}\nmax_frame_bytes = \"1 KiB\""),
            &before,
            "cameras[1].max_frame_bytes",
            &["1.0 KiB is out of range", "1 MiB", "too small for a camera frame"],
        );
        refused(
            &format!("{usb}\nresolution = \"20000x10\""),
            &before,
            "cameras[1].resolution",
            &["20000 is out of range", "16 to 16384"],
        );
        refused(&format!("{usb}\nresolution = \"4k\""), &before, "cameras[1].resolution", &["WIDTHxHEIGHT"]);
    }
}
