//! The Debian package: cargo-deb packs the binary these tests use (as `scripts/package` packs
//! the release build), lintian finds no error in it, and `dpkg -i` installs it into a
//! throw-away root (its own admin directory, maintainer scripts run against that root as
//! dpkg's `DPKG_ROOT`), where the files, the service user, the unit and the binary are
//! checked; `dpkg -P` then removes it again.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const KIOSK: &str = env!("CARGO_BIN_EXE_capture-kiosk");

#[test]
fn the_package_installs_the_binary_unit_user_and_example_and_purges_cleanly() {
    if std::env::consts::ARCH != "x86_64" {
        println!(
            "skipped: the package test builds the amd64 package on an x86-64 machine (this is {})",
            std::env::consts::ARCH
        );
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: dpkg installs only as root, even into a throw-away root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let deb = build_package(dir.path());
    println!("package: {} ({} bytes)", deb.display(), std::fs::metadata(&deb).unwrap().len());

    // lintian: warnings are information, errors fail.
    let lint = run(Command::new("lintian").args(["--tag-display-limit", "0"]).arg(&deb));
    let lint_text = String::from_utf8_lossy(&lint.stdout);
    let errors: Vec<&str> = lint_text.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));

    // What the package holds.
    let listing = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let listing = String::from_utf8_lossy(&listing.stdout);
    for path in [
        "./usr/bin/capture-kiosk",
        "./usr/lib/systemd/system/capture-kiosk.service",
        "./usr/lib/sysusers.d/capture-kiosk.conf",
        "./usr/share/doc/capture-kiosk/examples/bay.example.toml",
        "./usr/share/doc/capture-kiosk/examples/capture-kiosk-screen.service",
        "./usr/share/doc/capture-kiosk/README.md",
        "./usr/share/doc/capture-kiosk/copyright",
        "./usr/share/doc/capture-kiosk/changelog.Debian.gz",
    ] {
        assert!(listing.lines().any(|l| l.ends_with(path)), "{path} is not in the package:\n{listing}");
    }
    assert!(
        !listing.contains("./etc/"),
        "the package ships nothing under /etc (the bay's config is the installer's):\n{listing}"
    );

    // A throw-away root with what a Debian system has before the package: the base users
    // and groups (`video` among them) and an empty dpkg database.
    let root = dir.path().join("root");
    for sub in ["etc", "var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nvideo:x:44:\n").unwrap();
    let dpkg = |args: &[&str]| {
        let mut c = Command::new("dpkg");
        // Scripts run outside a chroot (the root has no shell), told the root by DPKG_ROOT;
        // the dependencies (libc6, systemd) are the machine's, not the empty root's.
        c.arg(format!("--root={}", root.display()))
            .args(["--force-script-chrootless", "--force-depends"])
            .args(args);
        c
    };
    let install =
        run(dpkg(&["--install", deb.to_str().unwrap()]).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"));
    println!("{}", String::from_utf8_lossy(&install.stdout));

    // The files, where an installer expects them.
    let installed = |path: &str| root.join(path.trim_start_matches('/'));
    let binary = installed("/usr/bin/capture-kiosk");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&binary).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o755);
    let sections = run(Command::new("readelf").args(["--section-headers", "--wide"]).arg(&binary));
    let sections = String::from_utf8_lossy(&sections.stdout);
    assert!(
        !sections.contains(".symtab") && !sections.contains(".debug_info"),
        "the installed binary is not stripped"
    );
    let same = |installed_path: &str, source: &str| {
        assert_eq!(
            std::fs::read(installed(installed_path)).unwrap(),
            std::fs::read(Path::new(MANIFEST_DIR).join(source)).unwrap(),
            "{installed_path} is not {source}"
        );
    };
    same("/usr/lib/systemd/system/capture-kiosk.service", "systemd/capture-kiosk.service");
    same("/usr/lib/sysusers.d/capture-kiosk.conf", "assets/capture-kiosk.sysusers");
    same("/usr/share/doc/capture-kiosk/examples/bay.example.toml", "assets/bay.example.toml");

    // The unit is installed, not enabled (its `check` fails until a config exists).
    let wants = walk(&installed("/etc/systemd/system"));
    assert!(wants.is_empty(), "the package enabled the unit: {wants:?}");

    // The service user: a system user whose home is the buffer, no login, in `video`.
    let passwd = std::fs::read_to_string(installed("/etc/passwd")).unwrap();
    let user: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("capture-kiosk:"))
        .unwrap_or_else(|| panic!("no capture-kiosk user in {passwd}"))
        .split(':')
        .collect();
    let uid: u32 = user[2].parse().unwrap();
    assert!((1..1000).contains(&uid), "a system user: {user:?}");
    assert_eq!((user[5], user[6]), ("/var/lib/capture-kiosk", "/usr/sbin/nologin"));
    let group = std::fs::read_to_string(installed("/etc/group")).unwrap();
    let video = group.lines().find(|l| l.starts_with("video:")).unwrap();
    assert!(video.split(':').nth(3).unwrap().split(',').any(|m| m == "capture-kiosk"), "{video}");
    assert!(group.lines().any(|l| l.starts_with(&format!("capture-kiosk:x:{}:", user[3]))), "{group}");

    // The installed binary runs.
    let version = run(Command::new(&binary).arg("--version"));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("capture-kiosk {}", env!("CARGO_PKG_VERSION"))
    );

    // Purge takes every file back.
    run(dpkg(&["--purge", "capture-kiosk"]).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"));
    let left: Vec<PathBuf> = walk(&root.join("usr"));
    assert!(left.is_empty(), "left after purge: {left:?}");
}

/// Packs the binary the tests were built with, with the package metadata of Cargo.toml.
fn build_package(out: &Path) -> PathBuf {
    // target/<profile dir>/capture-kiosk; cargo-deb names the dev profile's directory `debug`.
    let profile_dir = Path::new(KIOSK).parent().unwrap();
    let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => "dev".to_owned(),
        other => other.to_owned(),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(&cargo)
        .args([
            "deb",
            "--no-build",
            "--profile",
            &profile,
            "--fast",
            "--compress-type",
            "gz",
            "--quiet",
            "--output",
        ])
        .arg(out)
        .current_dir(MANIFEST_DIR)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "cargo deb failed ({}); scripts/setup-debian installs cargo-deb:\n{stderr}",
        output.status
    );
    let debs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one package: {debs:?}");
    assert!(debs[0].file_name().unwrap().to_str().unwrap().ends_with("_amd64.deb"), "{debs:?}");
    debs[0].clone()
}

fn run(command: &mut Command) -> Output {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e} (run scripts/setup-debian)"));
    assert!(
        out.status.success(),
        "{command:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every file and symlink under `dir` (none when it does not exist).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.is_symlink() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}
