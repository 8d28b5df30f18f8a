//! The `capture-kiosk` binary as an installer uses it: exit codes, messages, the demo, a
//! process killed at random moments while it captures (and what the next start makes of it),
//! and a disk that fills up under it.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_kiosk::clock::SystemClock;
use capture_kiosk::standin::StandIn;
use capture_kiosk::store::{images_digest, InspectionId, Store};
use serde_json::Value;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capture-kiosk"));
    c.env_remove("CAPTURE_KIOSK_LOG").stdin(Stdio::null());
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn testdata() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata");
    assert!(dir.is_dir(), "the real photos are missing: expected them in {}", dir.display());
    dir
}

/// A bay whose two cameras replay real photos from a folder.
fn bay(dir: &Path) -> PathBuf {
    let photos = dir.join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for (name, file) in [
        ("Front.jpg", "orientation/Landscape_1.jpg"),
        ("Rear.jpg", "orientation/Portrait_6.jpg"),
        ("Left.jpg", "orientation/Landscape_3.jpg"),
    ] {
        std::fs::copy(testdata().join(file), photos.join(name)).unwrap();
    }
    let config = dir.join("bay.toml");
    std::fs::write(
        &config,
        format!(
            r#"
bay_id = "bay-test"
state_dir = "{state}"
[inspection]
angles = ["Front", "Rear", "Left"]
[imaging]
max_long_edge = 640
[[cameras]]
id = "all-round"
source = "dir:{photos}"
angles = ["Front", "Rear", "Left"]
"#,
            state = dir.join("state").display(),
            photos = photos.display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn check_accepts_the_shipped_example_and_names_the_key_of_a_mistake() {
    let tmp = tempfile::tempdir().unwrap();
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/bay.example.toml"))
            .unwrap();
    let good = tmp.path().join("good.toml");
    std::fs::write(
        &good,
        example.replace("/var/lib/capture-kiosk", &tmp.path().join("s").display().to_string()),
    )
    .unwrap();
    let out = run(&["check", "--config", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));

    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, example.replace("jpeg_quality = 85", "jpeg_quality = 150")).unwrap();
    let out = run(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("imaging.jpeg_quality"), "{}", text(&out));

    let out = run(&["check", "--config", tmp.path().join("missing.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("missing.toml"), "{}", text(&out));
}

#[test]
fn every_command_that_reads_a_config_explains_it_and_defaults_to_the_installed_one() {
    for command in ["check", "inspect", "upload", "retry", "queue", "cameras", "run"] {
        let out = run(&[command, "--help"]);
        assert!(out.status.success(), "{command}: {}", text(&out));
        let help = text(&out);
        let line = help.lines().find(|l| l.contains("--config")).unwrap_or_default();
        assert!(
            line.contains("--config <FILE>")
                && line.contains("configuration file")
                && line.contains("[default: /etc/capture-kiosk/bay.toml]"),
            "{command}: {help}"
        );
    }
}

#[test]
fn inspect_stores_every_angle_and_queue_shows_it() {
    let tmp = tempfile::tempdir().unwrap();
    let config = bay(tmp.path());
    let config = config.to_str().unwrap();
    let out = run(&["inspect", "--config", config, "--case-id", "CASE-100", "--vin", "JN1CV6AR9BM123456"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("3 of 3 angles stored"), "{}", text(&out));

    let out = run(&["queue", "--config", config, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let q: serde_json::Value = serde_json::from_slice(&out.stdout).expect("queue --json prints JSON");
    assert_eq!(q["totals"]["inspections"], 1);
    assert_eq!(q["totals"]["images"], 3);
    assert_eq!(q["inspections"][0]["case_id"], "CASE-100");
    assert_eq!(q["inspections"][0]["state"], "captured");
    let text_queue = run(&["queue", "--config", config]);
    assert!(text(&text_queue).contains("CASE-100"), "{}", text(&text_queue));
}

#[test]
fn bad_operator_input_is_refused_before_any_camera_is_touched() {
    let tmp = tempfile::tempdir().unwrap();
    let config = bay(tmp.path());
    let config = config.to_str().unwrap();
    for (args, words) in [
        (vec!["--case-id", "CASE 1"], "case_id"),
        (vec!["--case-id", "CASE-1", "--vin", "JN1CV6AR9BM12345"], "too short"),
        (vec!["--case-id", "CASE-1", "--angles", "Front,Sideways"], "Sideways"),
        (vec!["--case-id", "CASE-1", "--angles", "Front,Roof"], "Roof"),
    ] {
        let mut full = vec!["inspect", "--config", config];
        full.extend(args);
        let out = run(&full);
        assert_eq!(out.status.code(), Some(2), "{full:?}: {}", text(&out));
        assert!(text(&out).contains(words), "{full:?}: {}", text(&out));
    }
    let out = run(&["queue", "--config", config, "--json"]);
    let q: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(q["totals"]["inspections"], 0, "nothing was stored");
}

#[test]
fn the_demo_runs_on_embedded_defaults() {
    let out = run(&["demo", "--frame", "640x480"]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("8 of 8 angles durable"), "{shown}");
    assert!(shown.contains("trigger to all frames durable"), "{shown}");
    assert!(shown.contains("completed at the stand-in: 8 image(s)"), "{shown}");
}

/// The JSON `queue --json` prints (it must succeed).
#[test]
fn retry_puts_a_failed_inspection_back_and_queue_shows_the_alert_and_the_oldest_pending_age() {
    let tmp = tempfile::tempdir().unwrap();
    let config = bay(tmp.path());
    let config = config.to_str().unwrap();
    let out = run(&["inspect", "--config", config, "--case-id", "CASE-200", "--no-upload"]);
    assert!(out.status.success(), "{}", text(&out));
    {
        let caps = capture_kiosk::store::Caps { max_bytes: 1 << 30, min_free_disk: 0 };
        let mut store = Store::open(&tmp.path().join("state"), caps, std::time::SystemTime::now()).unwrap();
        store
            .set_state(
                InspectionId(1),
                capture_kiosk::store::InspectionState::Failed,
                Some("the cloud refused case CASE-200"),
                std::time::SystemTime::now(),
            )
            .unwrap();
    }
    let q = queue_json(config);
    assert!(q["oldest_pending_age_s"].is_u64(), "{q:#}");
    assert_eq!(q["alerts"][0]["type"], "inspection_failed", "{q:#}");
    let shown = text(&run(&["queue", "--config", config]));
    assert!(shown.contains("alert: 1 inspection(s) failed for good (1)"), "{shown}");
    assert!(shown.contains("oldest inspection not yet in the cloud"), "{shown}");

    let out = run(&["retry", "--config", config, "--inspection", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("inspection 1 (case CASE-200) was failed; it is queued for upload again"),
        "{}",
        text(&out)
    );
    let q = queue_json(config);
    assert_eq!(q["inspections"][0]["state"], "captured", "{q:#}");
    assert_eq!(q["alerts"], serde_json::json!([]), "{q:#}");

    // The cloud's verdict on the clock, as the uploader notes it beside the buffer.
    use capture_kiosk::upload::{clock_note, policy::ClockTrust};
    let note =
        clock_note::ClockNote::of(ClockTrust::Untrusted { skew_secs: 420 }, std::time::SystemTime::now());
    clock_note::write(&tmp.path().join("state"), &note.unwrap()).unwrap();
    let q = queue_json(config);
    assert_eq!(q["alerts"][0]["type"], "clock_untrusted", "{q:#}");
    let shown = text(&run(&["queue", "--config", config]));
    assert!(shown.contains("alert: the bay's clock was 420 s ahead of the cloud's"), "{shown}");

    let again = run(&["retry", "--config", config, "--inspection", "1"]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(
        text(&again).contains("only a failed or cancelled inspection can be retried"),
        "{}",
        text(&again)
    );
    let unknown = run(&["retry", "--config", config, "--inspection", "99"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown));
    assert!(text(&unknown).contains("there is no inspection 99"), "{}", text(&unknown));
}

fn queue_json(config: &str) -> Value {
    let out = run(&["queue", "--config", config, "--json"]);
    assert!(out.status.success(), "queue: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("queue --json prints JSON")
}

/// Appends a `[cloud]` section for `standin` to the config at `config`.
fn add_cloud(config: &Path, standin: &StandIn) {
    let secret = support::secret_file(config.parent().unwrap(), standin.config());
    let mut text = std::fs::read_to_string(config).unwrap();
    text.push_str(&support::cloud_toml(&standin.base_url(), &secret));
    std::fs::write(config, text).unwrap();
}

/// The sha256s of an inspection's images, read from the buffer without writing.
fn stored_hashes(state_dir: &Path, id: i64) -> Vec<(String, String)> {
    Store::read_only(state_dir, support::CAPS, |s| s.images(InspectionId(id)))
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|m| (m.angle.as_str().to_owned(), m.sha256))
        .collect()
}

#[test]
fn inspect_killed_at_random_moments_strands_nothing_and_an_upload_delivers_everything_stored() {
    let standin = StandIn::start(Default::default(), Arc::new(SystemClock::new())).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config_path = bay(tmp.path());
    add_cloud(&config_path, &standin);
    let config = config_path.to_str().unwrap();
    let state = tmp.path().join("state");
    // The first start makes the buffer (a kill mid-way through that is another test's). Its
    // length sets the kills' moments, so that they land as well under qemu as on a fast PC.
    let started = Instant::now();
    let out = run(&["inspect", "--config", config, "--no-upload", "--case-id", "FIRST"]);
    assert!(out.status.success(), "{}", text(&out));
    let span = (started.elapsed().as_millis() as u64).max(60);
    // Kill `inspect` at random moments: during start-up, capture, resizing and commits. Each
    // next start (the next `inspect`, finally `upload`) finds what the kill left.
    let mut cut_with_images = Vec::new();
    let mut rng = fastrand::Rng::new();
    for round in 0..60 {
        if round >= 12 && cut_with_images.len() >= 2 {
            break;
        }
        let mut child = bin()
            .args(["inspect", "--config", config, "--no-upload", "--case-id", &format!("KILL-{round}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.u64(span / 8..span)));
        let _ = child.kill();
        let _ = child.wait();
        // `queue` only reads: a capture cut short shows as it was left (a build whose `queue`
        // repaired the buffer would show it cancelled).
        let q = queue_json(config);
        for i in q["inspections"].as_array().unwrap() {
            let cut = i["state"] == "capturing" || i["state"] == "cancelled";
            let id = i["id"].as_i64().unwrap();
            let images = i["images"].as_u64().unwrap();
            if cut && (1..3).contains(&images) && !cut_with_images.contains(&id) {
                cut_with_images.push(id);
            }
        }
    }
    assert!(!cut_with_images.is_empty(), "no kill landed mid-capture in 60 rounds");

    // The next start closes what the kills left, and an upload delivers all of it.
    let out = run(&["upload", "--config", config, "--max-wait", "30s"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let q = queue_json(config);
    let list = q["inspections"].as_array().unwrap();
    for i in list {
        if i["images"].as_u64().unwrap() == 0 {
            // Nothing to deliver: failed, saying why.
            assert_eq!(i["state"], "failed", "{i}");
            assert!(i["reason"].as_str().unwrap().contains("the kiosk stopped during capture"), "{i}");
        } else {
            assert_eq!(i["state"], "completed", "stranded: {i}");
        }
    }
    let mut delivered = 0;
    for i in list.iter().filter(|i| i["images"].as_u64().unwrap() > 0) {
        let (id, case_id) = (i["id"].as_i64().unwrap(), i["case_id"].as_str().unwrap());
        let images = i["images"].as_u64().unwrap();
        let sessions: Vec<_> =
            standin.sessions().into_iter().filter(|s| s.case_id == case_id && s.completed).collect();
        assert_eq!(sessions.len(), 1, "{case_id} completed once");
        let mut received: Vec<(String, String)> =
            sessions[0].photos.iter().map(|p| (p.label.clone(), p.sha256.clone())).collect();
        let mut stored = stored_hashes(&state, id);
        received.sort();
        stored.sort();
        assert_eq!(received, stored, "{case_id}: the cloud has exactly what was stored");
        delivered += images;
    }
    assert_eq!(delivered, q["totals"]["images"].as_u64().unwrap(), "every stored image was delivered");
    for id in &cut_with_images {
        let i = list.iter().find(|i| i["id"] == *id).expect("a cut capture is kept");
        let failed = i["failed_angles"].as_array().unwrap();
        assert_eq!(failed.len() as u64 + i["images"].as_u64().unwrap(), 3, "{i}");
        assert!(failed.iter().all(|f| f[1] == "the kiosk stopped during capture"), "{i}");
    }
    // The buffer still takes a complete inspection afterwards.
    let out = run(&["inspect", "--config", config, "--case-id", "AFTER"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Every file in `dir` with its length and content hash.
fn files(dir: &Path) -> BTreeMap<String, (u64, String)> {
    use sha2::{Digest, Sha256};
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                (bytes.len() as u64, hex::encode(Sha256::digest(&bytes))),
            )
        })
        .collect()
}

#[test]
fn a_full_disk_refuses_with_the_reason_queue_still_reads_and_upload_and_pruning_make_room() {
    let Some(fs) = support::Tmpfs::mount(48 << 20, "a_full_disk_refuses_with_the_reason…") else {
        return;
    };
    let standin = StandIn::start(Default::default(), Arc::new(SystemClock::new())).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Large, finely encoded frames: each image is bigger than the estimate the caps use.
    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for (name, file) in [
        ("Front.jpg", "vehicles/canon_eos450d_red_car_12mp.jpg"),
        ("Rear.jpg", "vehicles/minolta_dimage7hi_vintage_car_5mp.jpg"),
        ("Left.jpg", "vehicles/canon_eos1d_mark3_race_car_lightroom.jpg"),
    ] {
        std::fs::copy(testdata().join(file), photos.join(name)).unwrap();
    }
    let state = fs.path().join("state");
    let config_path = tmp.path().join("bay.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"
bay_id = "bay-full"
state_dir = "{state}"
[inspection]
angles = ["Front", "Rear", "Left"]
[imaging]
max_long_edge = 1920
jpeg_quality = 100
[buffer]
min_free_disk = "0"
[[cameras]]
id = "all-round"
source = "dir:{photos}"
angles = ["Front", "Rear", "Left"]
"#,
            state = state.display(),
            photos = photos.display()
        ),
    )
    .unwrap();
    add_cloud(&config_path, &standin);
    let config = config_path.to_str().unwrap();
    let inspect = |case_id: &str, extra: &[&str]| {
        let mut args = vec!["inspect", "--config", config, "--no-upload", "--case-id", case_id];
        args.extend(extra);
        run(&args)
    };
    let out = inspect("CASE-1", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // The disk fills during a capture: room for the estimate, not for the real images. One
    // camera shoots the angles in order, so the first image is the one that still fits.
    let estimate = 1920 * 1920 * 3 / 4 * 3 / 10;
    fs.fill("filler", 3 * estimate + (256 << 10));
    let out = inspect("CASE-2", &[]);
    assert_eq!(out.status.code(), Some(4), "a full disk is exit 4: {}", text(&out));
    assert!(text(&out).contains("the disk was full"), "{}", text(&out));
    let q = queue_json(config);
    let case2 =
        q["inspections"].as_array().unwrap().iter().find(|i| i["case_id"] == "CASE-2").unwrap().clone();
    assert_eq!(case2["state"], "captured", "what fitted is kept for upload: {case2}");
    let failed = case2["failed_angles"].as_array().unwrap();
    assert!(!failed.is_empty(), "{case2}");
    assert!(failed.iter().all(|f| f[1].as_str().unwrap().contains("the disk was full")), "{case2}");

    // Full to the last byte: a new inspection is refused with the reason, exit 4.
    fs.fill("filler", 0);
    let out = inspect("CASE-3", &[]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("min_free_disk") && text(&out).contains("CASE-3"), "{}", text(&out));

    // `queue` still answers, and writes nothing.
    let before = files(&state);
    let q = queue_json(config);
    let cases: Vec<&str> =
        q["inspections"].as_array().unwrap().iter().map(|i| i["case_id"].as_str().unwrap()).collect();
    assert_eq!(cases, vec!["CASE-1", "CASE-2"]);
    let out = run(&["queue", "--config", config]);
    assert!(out.status.success() && text(&out).contains("CASE-2"), "{}", text(&out));
    assert_eq!(files(&state), before, "queue created or changed nothing");

    // Upload on the full disk delivers both.
    let out = run(&["upload", "--config", config, "--max-wait", "30s"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let received = |case_id: &str| -> Vec<String> {
        let done: Vec<_> =
            standin.sessions().into_iter().filter(|s| s.case_id == case_id && s.completed).collect();
        assert_eq!(done.len(), 1, "{case_id} completed once");
        done[0].photos.iter().map(|p| p.sha256.clone()).collect()
    };
    assert_eq!(received("CASE-1").len(), 3);

    // The next car is accepted on a disk with less room than its image: the oldest delivered
    // inspection gives its space and the file shrinks (its pages went back to the file system).
    fs.fill("filler", 512 << 10);
    let size_before = std::fs::metadata(state.join("buffer.sqlite3")).unwrap().len();
    let out = inspect("CASE-4", &["--angles", "Front"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let size_after = std::fs::metadata(state.join("buffer.sqlite3")).unwrap().len();
    assert!(size_after < size_before, "the buffer shrank: {size_before} -> {size_after}");
    let q = queue_json(config);
    let cases: Vec<&str> =
        q["inspections"].as_array().unwrap().iter().map(|i| i["case_id"].as_str().unwrap()).collect();
    assert_eq!(cases, vec!["CASE-2", "CASE-4"], "only the oldest delivered one went");

    // The audit trail says what left, and its digest matches what the cloud received.
    let out = run(&["queue", "--config", config, "--history", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let h: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pruned = h["pruned"].as_array().unwrap();
    assert_eq!(pruned.len(), 1, "{h}");
    assert_eq!((pruned[0]["case_id"].as_str(), pruned[0]["rule"].as_str()), (Some("CASE-1"), Some("space")));
    assert_eq!(pruned[0]["images"], 3);
    assert!(pruned[0]["session"].is_string() && pruned[0]["completed_at"].is_string(), "{h}");
    assert_eq!(pruned[0]["images_sha256"].as_str(), Some(images_digest(&received("CASE-1")).as_str()));
    let out = run(&["queue", "--config", config, "--history"]);
    assert!(
        out.status.success() && text(&out).contains("CASE-1") && text(&out).contains("space"),
        "{}",
        text(&out)
    );
}
