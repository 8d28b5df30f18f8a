//! The cloud over HTTPS with a private CA: the stand-in serves TLS with a certificate the test
//! makes with the `openssl` command line, and the kiosk trusts it only through `[cloud] ca_file`
//! (or the system store, `trust = "system"`). Without the CA, with a certificate for another
//! name or with an expired one, the upload is refused with the host and the certificate problem named, and the images
//! stay buffered for a later pass.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use capture_kiosk::clock::SystemClock;
use capture_kiosk::config::{CloudConfig, CloudTrust};
use capture_kiosk::standin::{StandIn, StandInConfig, StandInTls};
use capture_kiosk::store::{InspectionId, InspectionState, Store};
use capture_kiosk::upload::drain::{drain, uploader, Drained};
use capture_kiosk::upload::Event;
use capture_kiosk::vehicle::PhotoLabel;
use support::{captured, cloud, secret_file, CAPS};

/// A CA and a server certificate it signed, as PEM files in a directory.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl must be installed (scripts/setup-debian)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Makes a CA and a leaf certificate for `san` (e.g. `IP:127.0.0.1`) in `dir`.
fn pki(dir: &Path, san: &str) -> Pki {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca_args = vec!["req", "-x509"];
    ca_args.extend(ec);
    ca_args.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=capture-kiosk test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca_args);
    let mut csr_args = vec!["req"];
    csr_args.extend(ec);
    csr_args.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=stand-in"]);
    openssl(dir, &csr_args);
    std::fs::write(
        dir.join("server.ext"),
        format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName={san}\n"
        ),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "4242",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
    Pki { ca: dir.join("ca.pem"), cert: dir.join("server.pem"), key: dir.join("server.key") }
}

/// A certificate for 127.0.0.1 from the CA of `pki` that expired years ago (`openssl ca` sets
/// the dates); returns it and its key.
fn expired(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("serial"), "1000\n").unwrap();
    std::fs::write(
        dir.join("ca.cnf"),
        "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n\
         default_md = sha256\npolicy = any\ncopy_extensions = none\nx509_extensions = leaf\n\
         [any]\ncommonName = supplied\n[leaf]\nbasicConstraints = CA:FALSE\n\
         keyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-cert",
            "ca.pem",
            "-keyfile",
            "ca.key",
            "-in",
            "server.csr",
            "-out",
            "expired.pem",
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200102000000Z",
        ],
    );
    (dir.join("expired.pem"), dir.join("server.key"))
}

/// A stand-in serving HTTPS with the certificate of `pki`.
fn https_standin(pki: &Pki) -> StandIn {
    let config = StandInConfig {
        tls: Some(StandInTls { cert_file: pki.cert.clone(), key_file: pki.key.clone() }),
        ..StandInConfig::default()
    };
    StandIn::start(config, Arc::new(SystemClock::new())).unwrap()
}

struct Bay {
    store: Store,
    secret: PathBuf,
    _dir: tempfile::TempDir,
}

fn bay() -> Bay {
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path(), &StandInConfig::default());
    let store = Store::open(&dir.path().join("state"), CAPS, SystemTime::now()).unwrap();
    Bay { store, secret, _dir: dir }
}

impl Bay {
    fn cloud(&self, standin: &StandIn, ca_file: Option<&Path>) -> CloudConfig {
        let mut c = cloud(&standin.base_url(), &self.secret);
        c.ca_file = ca_file.map(Path::to_owned);
        c
    }

    /// One pass that waits for nothing: a refusal leaves the rest buffered at once.
    fn drain(&mut self, cloud: &CloudConfig) -> (Drained, Vec<Event>) {
        let mut uploader = uploader(cloud, Arc::new(SystemClock::new())).unwrap();
        let mut events = Vec::new();
        let drained = drain(&mut uploader, &mut self.store, Duration::ZERO, &mut |_| {}, &mut |e| {
            events.push(e.clone())
        });
        (drained, events)
    }

    fn state(&self, id: InspectionId) -> InspectionState {
        self.store.inspection(id).unwrap().unwrap().state
    }
}

const ANGLES: [PhotoLabel; 3] = [PhotoLabel::Front, PhotoLabel::Rear, PhotoLabel::Left];

/// Every word a refused pass left for a person: why it stopped and the link's last error.
fn refusal_words(drained: &Drained, events: &[Event]) -> String {
    let mut words = drained.stopped.clone().unwrap_or_default();
    for e in events {
        if let Event::Link(link) = e {
            if let Some(error) = &link.last_error {
                words.push('\n');
                words.push_str(error);
            }
        }
    }
    words
}

#[test]
fn an_inspection_reaches_the_standin_over_https_when_ca_file_names_the_private_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), "IP:127.0.0.1");
    let standin = https_standin(&pki);
    assert!(standin.base_url().starts_with("https://127.0.0.1:"), "{}", standin.base_url());
    let mut bay = bay();
    let id = captured(&mut bay.store, "CASE-TLS-1", &ANGLES, 40, SystemTime::now());
    let cloud = bay.cloud(&standin, Some(&pki.ca));
    let (drained, events) = bay.drain(&cloud);
    assert_eq!(drained.completed, vec![id], "{drained:?} {events:?}");
    assert_eq!(bay.state(id), InspectionState::Completed);
    let sessions = standin.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].completions, 1);
    let images = bay.store.images(id).unwrap();
    assert_eq!(sessions[0].photos.len(), images.len());
    for meta in &images {
        let photo = sessions[0].photo(meta.angle.as_str()).unwrap();
        assert_eq!(photo.sha256, meta.sha256, "{} arrived intact over TLS", meta.angle);
        assert_eq!(photo.stores, 1);
    }
    assert_eq!(standin.secret_leaks(), 0);
}

#[test]
fn without_the_private_ca_the_upload_is_refused_naming_the_host_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), "IP:127.0.0.1");
    let standin = https_standin(&pki);
    let mut bay = bay();
    let id = captured(&mut bay.store, "CASE-TLS-2", &ANGLES, 40, SystemTime::now());
    let hashes: Vec<String> = bay.store.images(id).unwrap().into_iter().map(|m| m.sha256).collect();

    // The bundled public roots alone: the stand-in's private CA is unknown.
    let (drained, events) = bay.drain(&bay.cloud(&standin, None));
    assert!(drained.completed.is_empty() && drained.failed.is_empty(), "{drained:?}");
    let words = refusal_words(&drained, &events);
    let host = standin.addr().to_string();
    assert!(words.contains(&host), "the message names the cloud's host {host}: {words}");
    assert!(words.contains("UnknownIssuer"), "the message says what is wrong: {words}");
    assert!(words.contains("cloud.ca_file"), "the message says where the fix lies: {words}");
    assert_eq!(standin.authenticate_calls(), 0, "nothing reached the API");
    assert!(standin.requests().is_empty(), "no request got past the handshake");
    assert_eq!(bay.state(id), InspectionState::Captured, "still waiting in the buffer");

    // The system store knows nothing of the private CA either.
    let mut system = bay.cloud(&standin, None);
    system.trust = CloudTrust::System;
    let (drained, events) = bay.drain(&system);
    assert!(drained.completed.is_empty(), "{drained:?}");
    assert!(refusal_words(&drained, &events).contains("UnknownIssuer"));

    // A later pass with the CA configured delivers exactly what was buffered.
    let (drained, _) = bay.drain(&bay.cloud(&standin, Some(&pki.ca)));
    assert_eq!(drained.completed, vec![id]);
    let sessions = standin.sessions();
    assert_eq!(sessions.len(), 1, "one session: the refused passes opened none");
    let mut delivered: Vec<String> = sessions[0].photos.iter().map(|p| p.sha256.clone()).collect();
    let mut kept = hashes;
    delivered.sort();
    kept.sort();
    assert_eq!(delivered, kept);
}

#[test]
fn a_certificate_for_another_name_is_refused_naming_the_host_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), "DNS:cloud.example.com");
    let standin = https_standin(&pki);
    let mut bay = bay();
    let id = captured(&mut bay.store, "CASE-TLS-3", &ANGLES, 40, SystemTime::now());
    let (drained, events) = bay.drain(&bay.cloud(&standin, Some(&pki.ca)));
    assert!(drained.completed.is_empty(), "{drained:?}");
    let words = refusal_words(&drained, &events);
    assert!(words.contains(&standin.addr().to_string()), "{words}");
    assert!(words.contains("not valid for name"), "{words}");
    assert!(words.contains("issued for another name"), "{words}");
    assert_eq!(standin.authenticate_calls(), 0);
    assert_eq!(bay.state(id), InspectionState::Captured);
    assert_eq!(bay.store.images(id).unwrap().len(), ANGLES.len());
}

#[test]
fn an_expired_certificate_is_refused_naming_the_host_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pki = pki(tmp.path(), "IP:127.0.0.1");
    (pki.cert, pki.key) = expired(tmp.path());
    let standin = https_standin(&pki);
    let mut bay = bay();
    let id = captured(&mut bay.store, "CASE-TLS-4", &ANGLES, 40, SystemTime::now());
    let (drained, events) = bay.drain(&bay.cloud(&standin, Some(&pki.ca)));
    assert!(drained.completed.is_empty(), "{drained:?}");
    let words = refusal_words(&drained, &events);
    assert!(words.contains(&standin.addr().to_string()), "{words}");
    assert!(words.contains("expired"), "{words}");
    assert!(words.contains("or the kiosk's clock is wrong"), "{words}");
    assert_eq!(standin.authenticate_calls(), 0);
    assert_eq!(bay.state(id), InspectionState::Captured);
}

// --- The binary: `standin --tls-cert/--tls-key`, `check`, `trust = "system"` -----------------

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capture-kiosk"));
    c.env_remove("CAPTURE_KIOSK_LOG").env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
    c.stdin(Stdio::null());
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A bay with one small synthetic camera and a `[cloud]` section for `base_url` plus `extra`.
fn bay_config(dir: &Path, base_url: &str, extra: &str) -> PathBuf {
    let secret = secret_file(dir, &StandInConfig::default());
    let config = dir.join("bay.toml");
    std::fs::write(
        &config,
        format!(
            "bay_id = \"bay-tls\"\nstate_dir = \"{}\"\n[inspection]\nangles = [\"Front\", \"Rear\"]\n\
             [imaging]\nmax_long_edge = 320\n[[cameras]]\nid = \"cam\"\nsource = \"synthetic:320x240\"\n\
             angles = [\"Front\", \"Rear\"]\n{}{extra}",
            dir.join("state").display(),
            support::cloud_toml(base_url, &secret)
        ),
    )
    .unwrap();
    config
}

/// Runs `capture-kiosk standin` over HTTPS on a free port; returns it and its URL.
fn standin_process(pki: &Pki) -> (Child, String) {
    let mut child = bin()
        .args(["standin", "--port", "0", "--tls-cert"])
        .arg(&pki.cert)
        .arg("--tls-key")
        .arg(&pki.key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut first).unwrap();
    // Keep reading what it prints next: a closed pipe would kill it at its next line (as seen
    // under qemu, where it prints more slowly than the test reads).
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let url = first.trim().rsplit(' ').next().unwrap_or("").to_owned();
    assert!(url.starts_with("https://127.0.0.1:"), "the stand-in says it serves HTTPS: {first}");
    (child, url)
}

#[test]
fn the_standin_command_serves_https_and_trust_system_takes_the_system_store() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), "IP:127.0.0.1");
    let (mut standin, url) = standin_process(&pki);
    let config = bay_config(tmp.path(), &url, "trust = \"system\"\n");
    let config = config.to_str().unwrap();

    // The test CA is not in the machine's store: refused, named, buffered (exit 5).
    let out = bin()
        .args(["inspect", "--config", config, "--case-id", "CASE-SYS-1", "--upload-wait", "0s"])
        .output()
        .unwrap();
    let host = url.trim_start_matches("https://");
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(text(&out).contains(host) && text(&out).contains("UnknownIssuer"), "{}", text(&out));

    // A system store that holds the CA (OpenSSL's SSL_CERT_FILE, as rustls-native-certs reads it).
    let out = bin()
        .env("SSL_CERT_FILE", &pki.ca)
        .args(["upload", "--config", config, "--max-wait", "0s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = bin().args(["queue", "--config", config, "--json"]).output().unwrap();
    let queue: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(queue["inspections"][0]["case_id"], "CASE-SYS-1", "{queue}");
    assert_eq!(queue["inspections"][0]["state"], "completed", "{queue}");
    let _ = standin.kill();
    let _ = standin.wait();
}

#[test]
fn check_names_the_key_and_the_file_of_a_bad_ca_file() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), "IP:127.0.0.1");
    let check = |extra: &str| {
        let config = bay_config(tmp.path(), "https://127.0.0.1:9", extra);
        bin().args(["check", "--config", config.to_str().unwrap()]).output().unwrap()
    };
    let quoted = |p: &Path| format!("ca_file = \"{}\"\n", p.display());

    let out = check(&quoted(&pki.ca));
    assert!(out.status.success(), "a good CA file passes: {}", text(&out));
    assert!(
        text(&out).contains("checked against the bundled roots and the certificates of")
            && text(&out).contains("ca.pem"),
        "check says what the cloud's certificate is checked against: {}",
        text(&out)
    );

    let missing = tmp.path().join("no-such-ca.pem");
    let out = check(&quoted(&missing));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("cloud.ca_file") && text(&out).contains("no-such-ca.pem"), "{}", text(&out));
    assert!(text(&out).contains("cannot be read"), "{}", text(&out));

    // A key is PEM but no certificate.
    let out = check(&quoted(&pki.key));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("server.key") && text(&out).contains("holds no certificate"),
        "{}",
        text(&out)
    );

    let out = check(&quoted(tmp.path()));
    assert_eq!(out.status.code(), Some(2), "a directory cannot be read: {}", text(&out));
    assert!(text(&out).contains("cloud.ca_file"), "{}", text(&out));

    let damaged = tmp.path().join("damaged.pem");
    std::fs::write(&damaged, "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n")
        .unwrap();
    let out = check(&quoted(&damaged));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("damaged.pem"), "{}", text(&out));

    // A system store with nothing in it (the OpenSSL variables point at empty places).
    let empty_file = tmp.path().join("empty-bundle.pem");
    std::fs::write(&empty_file, "").unwrap();
    let empty_dir = tmp.path().join("empty-certs");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let config = bay_config(tmp.path(), "https://127.0.0.1:9", "trust = \"system\"\n");
    let out = bin()
        .env("SSL_CERT_FILE", &empty_file)
        .env("SSL_CERT_DIR", &empty_dir)
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("cloud.trust") && text(&out).contains("system trust store holds no certificate"),
        "{}",
        text(&out)
    );

    let out = check("trust = \"everything\"\n");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("cloud.trust"), "{}", text(&out));
}
