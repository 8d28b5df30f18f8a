//! Trigger-to-durable latency: the time from a trigger to every angle captured, checked,
//! resized and committed, for 8 cameras × 12 MP, with synthetic cameras (frames ready in the
//! camera, as a streaming camera has them) and with HTTP snapshot cameras served on loopback.
//! Also the imaging steps of one frame, to show where the time goes.
//!
//! `cargo bench --bench trigger_to_durable` (add `-- --runs N` for more runs).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use capture_kiosk::capture::testcam::SnapshotServer;
use capture_kiosk::capture::{render_scene, Camera, HttpCamera, SyntheticCamera};
use capture_kiosk::clock::SystemClock;
use capture_kiosk::imaging::{self, ResizeSpec};
use capture_kiosk::inspection::{self, Request, Rig, Settings};
use capture_kiosk::store::{Caps, Store};
use capture_kiosk::vehicle::{CaseId, PhotoLabel};

const WIDTH: u32 = 4032;
const HEIGHT: u32 = 3024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let settings =
        Settings { capture_attempts: 3, resize: ResizeSpec { max_long_edge: 1920, jpeg_quality: 85 } };
    let angles = PhotoLabel::EXTERIOR.to_vec();
    println!("trigger to durable, 8 cameras x {WIDTH}x{HEIGHT}, {cpus} CPUs, {runs} runs each, goal 0.8 s");

    // Synthetic cameras: each has its frame rendered before the trigger.
    let synthetic: Vec<Duration> = (0..runs)
        .map(|run| {
            let cameras = angles
                .iter()
                .map(|a| {
                    let id = format!("syn-{}", a.as_str());
                    let cam: Box<dyn Camera> = Box::new(SyntheticCamera::new(&id, WIDTH, HEIGHT));
                    (id, vec![*a], cam)
                })
                .collect();
            let mut rig = Rig::from_cameras(cameras);
            rig.warm_up(&angles);
            one_inspection(&mut rig, &settings, &angles, run)
        })
        .collect();
    report("synthetic cameras", &synthetic);

    // HTTP snapshot cameras: one commissioning snapshot camera per angle on 127.0.0.1, 12 MP each.
    let frames: Vec<Arc<Vec<u8>>> = angles
        .iter()
        .enumerate()
        .map(|(i, a)| {
            Arc::new(imaging::encode(&render_scene(WIDTH, HEIGHT, *a, i as u64 + 1), 92).expect("encode"))
        })
        .collect();
    let servers: Vec<SnapshotServer> =
        frames.iter().map(|f| SnapshotServer::start(f.to_vec()).expect("snapshot camera")).collect();
    let urls: Vec<String> = servers.iter().map(SnapshotServer::url).collect();
    let http: Vec<Duration> = (0..runs)
        .map(|run| {
            let cameras = angles
                .iter()
                .zip(&urls)
                .map(|(a, url)| {
                    let id = format!("ip-{}", a.as_str());
                    let cam: Box<dyn Camera> =
                        Box::new(HttpCamera::new(&id, url, Duration::from_secs(10), 64 << 20));
                    (id, vec![*a], cam)
                })
                .collect();
            let mut rig = Rig::from_cameras(cameras);
            one_inspection(&mut rig, &settings, &angles, run)
        })
        .collect();
    report("HTTP snapshot cameras on loopback", &http);

    // Where one frame's time goes on the capture path, single-threaded.
    let raw = &frames[0];
    let t = Instant::now();
    let header = imaging::check_complete(raw).expect("complete");
    let (w, h) = imaging::fit(header.width, header.height, settings.resize.max_long_edge);
    let eighths = imaging::decode_scale(header.width, header.height, w, h);
    let decoded = imaging::decode_at(raw, eighths).expect("decode");
    let decode = t.elapsed();
    let (dw, dh) = decoded.image.dimensions();
    let t = Instant::now();
    let upright = imaging::orient(decoded.image, decoded.orientation);
    let small = imaging::resize(&upright, w, h).expect("resize");
    let resize = t.elapsed();
    let t = Instant::now();
    let jpeg = imaging::encode(&small, settings.resize.jpeg_quality).expect("encode");
    let encode = t.elapsed();
    let per_frame = decode + resize + encode;
    println!(
        "one frame ({} bytes, {}x{}): decode at {eighths}/8 to {dw}x{dh} {:.0} ms, resize to {w}x{h} {:.0} ms, \
         encode {:.0} ms ({} bytes); total {:.0} ms",
        raw.len(),
        header.width,
        header.height,
        ms(decode),
        ms(resize),
        ms(encode),
        jpeg.len(),
        ms(per_frame)
    );
    println!(
        "imaging alone for 8 frames on {cpus} CPUs: at least {:.0} ms (8 x {:.0} ms / {cpus}), {:.0} % of the 0.8 s goal",
        ms(per_frame) * 8.0 / cpus as f64,
        ms(per_frame),
        ms(per_frame) * 8.0 / cpus as f64 / 8.0
    );
}

fn one_inspection(rig: &mut Rig, settings: &Settings, angles: &[PhotoLabel], run: usize) -> Duration {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Mutex::new(
        Store::open(dir.path(), Caps { max_bytes: 8 << 30, min_free_disk: 64 << 20 }, SystemTime::now())
            .expect("store"),
    );
    let request = Request {
        case_id: CaseId::parse(&format!("BENCH-{run}")).expect("case id"),
        vehicle: None,
        angles: angles.to_vec(),
    };
    let outcome = inspection::run(
        rig,
        &store,
        &request,
        settings,
        &SystemClock::new(),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .expect("inspection");
    assert_eq!(outcome.captured.len(), angles.len(), "every angle must be stored: {:?}", outcome.failed);
    outcome.trigger_to_durable
}

fn report(what: &str, times: &[Duration]) {
    let mut sorted: Vec<f64> = times.iter().map(|d| d.as_secs_f64()).collect();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[sorted.len() / 2];
    println!(
        "{what}: median {median:.3} s, best {:.3} s, worst {:.3} s ({:.2}x the 0.8 s goal)",
        sorted[0],
        sorted[sorted.len() - 1],
        median / 0.8
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
