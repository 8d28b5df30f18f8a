//! Upload throughput over loopback: the kiosk's uploader next to `curl` sending the same
//! inspections (authenticate, one multipart upload of the eight images, complete) to the same
//! stand-in of the cloud API, in the same run. Prints MB/s for both and their ratio.
//!
//! `cargo bench --bench upload_throughput` (add `-- --inspections N`; default 12). Run without
//! `--bench` (as `cargo test --all-targets` does) it makes one small pass to prove it works.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use capture_kiosk::clock::{Clock, SystemClock};
use capture_kiosk::standin::{StandIn, StandInConfig};
use capture_kiosk::store::{Caps, NewImage, NewInspection, Store};
use capture_kiosk::upload::credentials::Secret;
use capture_kiosk::upload::drain::{drain, uploader};
use capture_kiosk::upload::signing::sign;
use capture_kiosk::vehicle::{CaseId, PhotoLabel};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let inspections: usize = args
        .iter()
        .position(|a| a == "--inspections")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 12 } else { 1 });
    let kib = if full { 400 } else { 20 };
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let have_curl =
        Command::new("curl").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);

    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let account = StandInConfig::default();
    let standin = StandIn::start(account.clone(), clock.clone()).expect("stand-in");
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = support::cloud(&standin.base_url(), &support::secret_file(dir.path(), &account));
    cloud.request_timeout = Duration::from_secs(60);

    // The same images for both: eight camera-like JPEGs per inspection.
    let images: Vec<Vec<u8>> = (0..8).map(|i| support::jpeg(i, kib)).collect();
    let per_inspection: u64 = images.iter().map(|j| j.len() as u64).sum();
    let total = per_inspection * inspections as u64;
    println!(
        "upload throughput over loopback: {inspections} inspection(s) x 8 images ({:.1} MB each), {cpus} CPUs",
        per_inspection as f64 / 1e6
    );

    // The kiosk: buffered inspections drained by the uploader.
    let mut store = Store::open(
        &dir.path().join("state"),
        Caps { max_bytes: u64::MAX, min_free_disk: 0 },
        SystemTime::now(),
    )
    .unwrap();
    for n in 0..inspections {
        let case = CaseId::parse(&format!("BENCH-K{n}")).unwrap();
        let angles = PhotoLabel::EXTERIOR;
        let id = store
            .begin_inspection(
                &NewInspection { case_id: &case, vehicle: None, angles: &angles, expected_image_bytes: 1 },
                SystemTime::now(),
            )
            .unwrap();
        for (label, jpeg) in angles.iter().zip(&images) {
            let image = NewImage {
                angle: *label,
                camera: "bench",
                captured_at: SystemTime::now(),
                source_width: 1920,
                source_height: 1440,
                source_bytes: jpeg.len() as u64,
                width: 1920,
                height: 1440,
                jpeg,
            };
            store.add_image(id, &image).unwrap();
        }
        store.finish_capture(id, SystemTime::now()).unwrap();
    }
    let mut up = uploader(&cloud, clock.clone()).unwrap();
    let began = Instant::now();
    let drained = drain(&mut up, &mut store, Duration::from_secs(60), &mut std::thread::sleep, &mut |_| {});
    let kiosk = began.elapsed();
    assert_eq!(drained.completed.len(), inspections, "kiosk: {:?}", drained.stopped);
    let kiosk_rate = total as f64 / 1e6 / kiosk.as_secs_f64();
    println!("capture-kiosk: {:>8.3} s  {:>8.1} MB/s", kiosk.as_secs_f64(), kiosk_rate);

    if !have_curl {
        println!("curl is not installed: no reference figure (apt install curl)");
        standin.stop();
        return;
    }
    // curl: the same three calls per inspection, the files from disk as curl users send them.
    let files: Vec<std::path::PathBuf> = PhotoLabel::EXTERIOR
        .iter()
        .zip(&images)
        .map(|(label, jpeg)| {
            let path = dir.path().join(format!("{}.jpg", label.as_str()));
            std::fs::File::create(&path).unwrap().write_all(jpeg).unwrap();
            path
        })
        .collect();
    let secret = Secret::new(account.api_secret.clone());
    let began = Instant::now();
    for n in 0..inspections {
        let case = format!("BENCH-C{n}");
        let signed = |path: &str, body: String| {
            let s = sign(&secret, &account.username, &account.api_key, clock.wall());
            let out = Command::new("curl")
                .args(["-sS", "--fail-with-body", "-X", "POST"])
                .args(["-H", &format!("API-Key: {}", s.api_key)])
                .args(["-H", &format!("API-Timestamp: {}", s.timestamp)])
                .args(["-H", &format!("API-Token: {}", s.token)])
                .args(["-H", "Content-Type: application/json", "--data-binary", &body])
                .arg(format!("{}{path}", standin.base_url()))
                .output()
                .unwrap();
            assert!(out.status.success(), "curl {path}: {}", String::from_utf8_lossy(&out.stdout));
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        };
        let auth = signed(
            "/api/authenticate",
            serde_json::json!({"key": account.api_key, "client_id": "BENCH", "case_id": case}).to_string(),
        );
        let session = auth["session"].as_str().unwrap().to_owned();
        let refresh = auth["refresh_token"].as_str().unwrap().to_owned();
        let mut upload = Command::new("curl");
        upload
            .args(["-sS", "--fail-with-body"])
            .args(["-H", &format!("Authorization: Bearer {refresh}")])
            .args(["-F", "type=file", "-F", &format!("session={session}"), "-F", &format!("case_id={case}")]);
        for f in &files {
            upload.args(["-F", &format!("files=@{};type=image/jpeg", f.display())]);
        }
        let out = upload.arg(format!("{}/api/upload", standin.base_url())).output().unwrap();
        assert!(out.status.success(), "curl upload: {}", String::from_utf8_lossy(&out.stdout));
        let labels: Vec<&str> = PhotoLabel::EXTERIOR.iter().map(|l| l.as_str()).collect();
        signed(
            "/api/complete",
            serde_json::json!({"session": session, "case_id": case, "labels": labels}).to_string(),
        );
    }
    let curl = began.elapsed();
    let curl_rate = total as f64 / 1e6 / curl.as_secs_f64();
    println!("curl:          {:>8.3} s  {:>8.1} MB/s", curl.as_secs_f64(), curl_rate);
    println!("ratio capture-kiosk / curl: {:.2}x (above 1 is faster than curl)", kiosk_rate / curl_rate);
    let completed = standin.sessions().iter().filter(|s| s.completed).count();
    assert_eq!(completed, 2 * inspections, "every session of both runs completed");
    standin.stop();
}
