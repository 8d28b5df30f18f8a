//! Peak memory of one inspection on the board: the peak resident set (getrusage
//! `RUSAGE_CHILDREN` maxrss) of a child `capture-kiosk inspect` whose bay has 8 `dir:` cameras
//! replaying real photos, with 20 MP frames (goal at most 80 MiB) and 12 MP frames (goal at most
//! 64 MiB), and of a child `capture-kiosk demo` (8 synthetic 12 MP cameras and the upload leg;
//! goal at most 160 MiB).
//!
//! The 20 MP frame is the largest real photo of the shared test set, a 5760x3840 (22.1 MP)
//! camera original, and the 12 MP one a 4272x2848 (12.2 MP) original; every camera replays its
//! own copy. Each figure is measured in a process of its own: the bench runs itself as a go-between
//! that starts the command, waits for it and reads `RUSAGE_CHILDREN`, so that one measurement
//! cannot raise the next.
//!
//! `cargo bench --bench peak_memory` (the kiosk's release build). Run without `--bench` (as
//! `cargo test --all-targets` does) it makes one small pass: 2 cameras and a small demo.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The argument that makes this binary the go-between of one measurement.
const MEASURE: &str = "--peak-rss-of";

const MIB: f64 = 1024.0 * 1024.0;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == MEASURE) {
        measure_child(&args[i + 1..]);
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let kiosk = Path::new(env!("CARGO_BIN_EXE_capture-kiosk"));
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cameras = if full { 8 } else { 2 };
    println!(
        "peak RSS of one run of the kiosk as a child process, {cpus} CPUs (imaging workers: one per CPU)"
    );

    let frames: [(&str, &str, f64); 2] = [
        ("20 MP (a 5760x3840, 22.1 MP photo)", "camera/canon_eos5d_mark3_22mp_photoshop.jpg", 80.0),
        ("12 MP (a 4272x2848, 12.2 MP photo)", "vehicles/canon_eos450d_red_car_12mp.jpg", 64.0),
    ];
    for (what, photo, goal) in frames {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = bay(dir.path(), &testdata().join(photo), cameras);
        let peak = peak_rss(
            Command::new(kiosk)
                .args(["inspect", "--no-upload", "--case-id", "PEAK-1", "--config"])
                .arg(&config),
        );
        report(&format!("inspect, {cameras} dir: cameras x {what}"), peak, full.then_some(goal));
    }

    let dir = tempfile::tempdir().expect("a temporary directory");
    let frame = if full { "4032x3024" } else { "640x480" };
    let peak = peak_rss(Command::new(kiosk).args(["demo", "--frame", frame, "--state-dir"]).arg(dir.path()));
    report(&format!("demo, 8 synthetic cameras x {frame} and the upload leg"), peak, full.then_some(160.0));
}

/// The go-between: runs `command`, waits for it, and prints the peak resident set of its
/// children (the command) in KiB, as the kernel counted it.
fn measure_child(command: &[String]) {
    let (program, args) = command.split_first().expect("a command to measure");
    let status = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .expect("the measured command starts");
    assert!(status.success(), "the measured command failed: {status}");
    // SAFETY: an all-zero rusage is a valid value; getrusage fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, exclusively borrowed rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0, "getrusage failed");
    // Linux counts ru_maxrss in KiB.
    println!("{}", usage.ru_maxrss);
}

/// Runs `command` under a go-between of its own and returns its peak resident set in bytes.
fn peak_rss(command: &mut Command) -> u64 {
    let mut go_between = Command::new(std::env::current_exe().expect("this bench's own path"));
    go_between.arg(MEASURE).arg(command.get_program()).args(command.get_args());
    let output = go_between.stderr(Stdio::inherit()).output().expect("the go-between runs");
    assert!(output.status.success(), "the measurement failed: {}", output.status);
    let kib: u64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("the go-between prints the peak in KiB");
    kib * 1024
}

fn report(what: &str, peak: u64, goal_mib: Option<f64>) {
    let mib = peak as f64 / MIB;
    match goal_mib {
        Some(goal) => println!(
            "{what}: peak RSS {mib:.1} MiB, goal at most {goal:.0} MiB ({})",
            if mib <= goal { "met" } else { "MISSED" }
        ),
        None => println!("{what}: peak RSS {mib:.1} MiB (small pass, no goal)"),
    }
}

fn testdata() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata");
    assert!(dir.is_dir(), "the real photos are missing: expected them in {}", dir.display());
    dir
}

/// A bay of `cameras` `dir:` cameras, one exterior angle each, every one replaying its own copy
/// of `photo`; returns the config's path.
fn bay(dir: &Path, photo: &Path, cameras: usize) -> PathBuf {
    const ANGLES: [&str; 8] =
        ["Front", "Front_Left", "Left", "Rear_Left", "Rear", "Rear_Right", "Right", "Front_Right"];
    let angles = &ANGLES[..cameras];
    let mut text = format!(
        "bay_id = \"bay-bench\"\nstate_dir = \"{}\"\n[inspection]\nangles = [{}]\n",
        dir.join("state").display(),
        angles.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ")
    );
    for angle in angles {
        let folder = dir.join(angle);
        std::fs::create_dir_all(&folder).expect("a camera folder");
        std::fs::copy(photo, folder.join(format!("{angle}.jpg"))).expect("the photo is copied");
        text.push_str(&format!(
            "[[cameras]]\nid = \"cam-{}\"\nsource = \"dir:{}\"\nangles = [\"{angle}\"]\n",
            angle.to_ascii_lowercase().replace('_', "-"),
            folder.display()
        ));
    }
    let config = dir.join("bay.toml");
    std::fs::write(&config, text).expect("the config is written");
    config
}
