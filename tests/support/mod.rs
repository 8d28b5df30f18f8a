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
