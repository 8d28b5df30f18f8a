//! The `capture-kiosk` binary as an installer uses it: exit codes, messages, the demo, and a
//! process killed at random moments while it captures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

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
id = "front"
source = "dir:{photos}"
angles = ["Front"]
[[cameras]]
id = "back"
source = "dir:{photos}"
angles = ["Rear", "Left"]
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

#[test]
fn a_capture_killed_at_random_moments_leaves_no_half_inspection() {
    let tmp = tempfile::tempdir().unwrap();
    let config = bay(tmp.path());
    let config = config.to_str().unwrap();
    // Kill `inspect` at different moments: during start-up, capture, resizing and commits.
    for (round, delay_ms) in [40u64, 90, 150, 220, 300].into_iter().enumerate() {
        let mut child = bin()
            .args(["inspect", "--config", config, "--case-id", &format!("KILL-{round}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();

        let out = run(&["queue", "--config", config, "--json"]);
        assert!(out.status.success(), "round {round}: {}", text(&out));
        let q: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let list = q["inspections"].as_array().unwrap();
        let mut images = 0;
        for i in list {
            assert_ne!(
                i["state"], "capturing",
                "round {round}: a dead capture must be closed on reopen: {i}"
            );
            images += i["images"].as_u64().unwrap();
        }
        assert_eq!(
            q["totals"]["images"].as_u64().unwrap(),
            images,
            "round {round}: totals agree with the list"
        );
    }
    // The buffer still takes a complete inspection afterwards.
    let out = run(&["inspect", "--config", config, "--case-id", "AFTER"]);
    assert!(out.status.success(), "{}", text(&out));
}
