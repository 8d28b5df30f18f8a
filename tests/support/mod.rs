//! Fixtures shared by the upload tests: a buffer with real JPEGs in it, and a `[cloud]`
//! section pointing at a stand-in of the cloud API on 127.0.0.1.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use capture_kiosk::config::CloudConfig;
use capture_kiosk::standin::StandInConfig;
use capture_kiosk::store::{Caps, InspectionId, NewImage, NewInspection, Store};
use capture_kiosk::vehicle::{CaseId, PhotoLabel, Vehicle, Vin};

pub const CAPS: Caps = Caps { max_bytes: u64::MAX, min_free_disk: 0 };

/// A camera-like JPEG of about `kib` KiB: noise compresses badly, like a real frame.
pub fn jpeg(seed: u64, kib: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    // Noise at quality 90 costs about 2.2 bytes per pixel.
    let pixels = (kib * 1024) as f64 / 2.2;
    let width = (pixels * 4.0 / 3.0).sqrt().max(16.0) as u32;
    let height = (width * 3 / 4).max(16);
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        let base = ((x + y) % 256) as u8;
        image::Rgb([base.wrapping_add(rng.u8(..)), rng.u8(..), base ^ rng.u8(..)])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
    out
}

/// Stores a captured inspection of `case_id` with one image per label; returns its id and
/// each label's sha256.
pub fn captured(
    store: &mut Store,
    case_id: &str,
    labels: &[PhotoLabel],
    kib: usize,
    now: SystemTime,
) -> InspectionId {
    let case = CaseId::parse(case_id).unwrap();
    let vehicle = Vehicle::with_vin(Vin::parse("JN1CV6AR9BM123456").unwrap());
    let id = store
        .begin_inspection(
            &NewInspection {
                case_id: &case,
                vehicle: Some(&vehicle),
                angles: labels,
                expected_image_bytes: (kib * 1024) as u64,
            },
            now,
        )
        .unwrap();
    for (i, label) in labels.iter().enumerate() {
        let bytes = jpeg(id.0 as u64 * 100 + i as u64, kib);
        store
            .add_image(
                id,
                &NewImage {
                    angle: *label,
                    camera: "cam",
                    captured_at: now,
                    source_width: 4032,
                    source_height: 3024,
                    source_bytes: 4 << 20,
                    width: 1920,
                    height: 1440,
                    jpeg: &bytes,
                },
            )
            .unwrap();
    }
    store.finish_capture(id, now).unwrap();
    id
}

/// Writes the stand-in's API secret to an owner-only file in `dir`.
pub fn secret_file(dir: &Path, standin: &StandInConfig) -> PathBuf {
    let path = dir.join("api-secret");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(standin.api_secret.as_bytes()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A `[cloud]` section for the stand-in at `base_url`.
pub fn cloud(base_url: &str, secret: &Path) -> CloudConfig {
    let standin = StandInConfig::default();
    CloudConfig {
        base_url: base_url.to_owned(),
        username: standin.username,
        api_key: standin.api_key,
        client_id: "BAY-TEST".to_owned(),
        api_secret_file: Some(secret.to_owned()),
        max_request_bytes: 32 << 20,
        request_timeout: Duration::from_secs(10),
        require_clock_sync: true,
        trust: capture_kiosk::config::CloudTrust::Bundled,
        ca_file: None,
    }
}

/// The same `[cloud]` section as TOML, for configuration files.
pub fn cloud_toml(base_url: &str, secret: &Path) -> String {
    let standin = StandInConfig::default();
    format!(
        "[cloud]\nbase_url = \"{base_url}\"\nusername = \"{}\"\napi_key = \"{}\"\nclient_id = \"BAY-TEST\"\napi_secret_file = \"{}\"\nrequest_timeout = \"10s\"\n",
        standin.username,
        standin.api_key,
        secret.display()
    )
}

/// A small tmpfs mounted on a temporary directory for one test (a real file system that
/// fills up), unmounted when dropped. Mounting needs root: without it, [`Tmpfs::mount`] prints
/// why the test is skipped and returns `None`.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(bytes: u64, test: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("{test}: skipped: mounting a tmpfs needs root (the test suite runs as root in CI)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=0755"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs on {} failed: {status}", dir.path().display());
        Some(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes an unprivileged writer may still use (statvfs `f_bavail * f_frsize`).
    pub fn free(&self) -> u64 {
        let c_path = std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes()).unwrap();
        let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: a valid C string and a writable statvfs.
        assert_eq!(unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) }, 0);
        // SAFETY: statvfs returned 0, so it filled the struct.
        let stat = unsafe { stat.assume_init() };
        #[allow(clippy::useless_conversion)]
        let free = u64::from(stat.f_bavail) * u64::from(stat.f_frsize);
        free
    }

    /// Grows the file `name` until at most `leave` bytes are free (0: until the disk is full).
    pub fn fill(&self, name: &str, leave: u64) {
        let mut file =
            std::fs::OpenOptions::new().create(true).append(true).open(self.path().join(name)).unwrap();
        let chunk = vec![0xA5u8; 64 << 10];
        loop {
            let free = self.free();
            if free <= leave {
                break;
            }
            let n = (free - leave).min(chunk.len() as u64) as usize;
            if file.write_all(&chunk[..n]).and_then(|()| file.sync_all()).is_err() {
                break;
            }
        }
    }

    /// Shrinks the file `name` by `bytes` (or deletes it when that is all of it).
    pub fn free_up(&self, name: &str, bytes: u64) {
        let path = self.path().join(name);
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len <= bytes {
            let _ = std::fs::remove_file(&path);
        } else {
            std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - bytes).unwrap();
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Starts Mosquitto on a free port of 127.0.0.1 with `settings` (lines of mosquitto.conf) and
/// waits until it listens. The configuration is written in `dir`. Returns the port and the
/// process, which the caller kills.
pub fn mosquitto(dir: &Path, settings: &str) -> (u16, std::process::Child) {
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, format!("listener {port} 127.0.0.1\npersistence false\n{settings}")).unwrap();
    let child = std::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto must be installed (scripts/setup-debian)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    (port, child)
}
