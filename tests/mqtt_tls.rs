//! mqtts against a real Mosquitto TLS listener, with a CA and certificates the test makes with
//! the `openssl` command: the right CA connects and commands work; a wrong CA, an expired
//! certificate and a wrong host name are refused with the broker and the reason in the log,
//! and the kiosk keeps trying until the broker is fixed; mutual TLS with a client certificate.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{Kiosk, Probe};

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl must be installed (scripts/setup-debian)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A key and a certificate signing request for `cn`, as `{name}.key` and `{name}.csr`.
fn request(dir: &Path, name: &str, cn: &str) {
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
}

/// Signs `{name}.csr` with `{ca}` into `{out}.pem`, with the extensions `ext`.
fn sign(dir: &Path, ca: &str, name: &str, out: &str, ext: &str) {
    std::fs::write(dir.join(format!("{out}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "30",
            "-out",
            &format!("{out}.pem"),
            "-extfile",
            &format!("{out}.ext"),
        ],
    );
}

/// A self-signed CA `{name}.pem` / `{name}.key`.
fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "30",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

const SERVER_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n";

/// The test's certificates: `ca`, `other-ca`, `server` (for 127.0.0.1 and localhost),
/// `expired` (the same, valid only in 2020), `wrong-host` (for wrong.example only) and
/// `client` (client authentication, CN bay-tls), each key beside its certificate.
fn pki() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ca(dir, "ca");
    ca(dir, "other-ca");
    request(dir, "server", "localhost");
    sign(dir, "ca", "server", "server", SERVER_EXT);
    sign(
        dir,
        "ca",
        "server",
        "wrong-host",
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:wrong.example\n",
    );
    // `openssl x509` cannot backdate: `openssl ca` can.
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("serial"), "1000\n").unwrap();
    std::fs::write(
        dir.join("ca.cnf"),
        format!(
            "[ca]\ndefault_ca = test\n[test]\ndatabase = {d}/index.txt\nnew_certs_dir = {d}\nserial = {d}/serial\ndefault_md = sha256\npolicy = any\nx509_extensions = ext\nunique_subject = no\n[any]\ncommonName = supplied\n[ext]\n{SERVER_EXT}",
            d = dir.display()
        ),
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
            "-notext",
        ],
    );
    request(dir, "client", "bay-tls");
    sign(
        dir,
        "ca",
        "client",
        "client",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    );
    std::fs::set_permissions(dir.join("client.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    tmp
}

/// A Mosquitto with a TLS listener on `tls` serving `cert` (with `server.key`) and a plain one
/// on `plain` for the operator's probe.
fn tls_broker(
    pki: &Path,
    dir: &Path,
    tls: u16,
    plain: u16,
    cert: &str,
    require_certificate: bool,
) -> support::Mosquitto {
    support::mosquitto_conf(
        dir,
        &format!(
            "allow_anonymous true\npersistence false\nlistener {plain} 127.0.0.1\nlistener {tls} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_certificate}\n",
            pki.join("ca.pem").display(),
            pki.join(format!("{cert}.pem")).display(),
            pki.join("server.key").display(),
        ),
        tls,
    )
}

fn kiosk_config(dir: &Path, tls: u16, ca: &Path, client: Option<(&Path, &Path)>) -> PathBuf {
    let mut mqtt = format!("url = \"mqtts://127.0.0.1:{tls}\"\nca_file = \"{}\"", ca.display());
    if let Some((cert, key)) = client {
        mqtt.push_str(&format!(
            "\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
            cert.display(),
            key.display()
        ));
    }
    support::bay_config(dir, "bay-tls", &mqtt)
}

const ROOT: &str = "capture-kiosk/bay-tls";

/// The kiosk is online and answers a ping and a start.
fn works(operator: &mut Probe, id: &str) {
    operator.text_any(&format!("{ROOT}/status"), "online");
    operator
        .publish(&format!("{ROOT}/cmd/start"), &format!(r#"{{"command_id":"{id}","case_id":"CASE-TLS"}}"#));
    let ack = operator.json_any(&format!("{ROOT}/cmd/start/ack"), |v| v["command_id"] == id);
    assert_eq!(ack["status"], "accepted", "{ack}");
}

#[test]
fn mqtts_with_the_right_ca_connects_and_takes_commands() {
    let pki = pki();
    let run = tempfile::tempdir().unwrap();
    let (tls, plain) = (support::free_port(), support::free_port());
    let broker = tls_broker(pki.path(), run.path(), tls, plain, "server", false);
    let mut operator = Probe::connect(plain, "operator", None);
    assert!(operator.subscribe(&format!("{ROOT}/#")));
    let kiosk = Kiosk::run(&kiosk_config(run.path(), tls, &pki.path().join("ca.pem"), None));
    works(&mut operator, "tls-1");
    assert!(kiosk.log().contains(&format!("broker=127.0.0.1:{tls}")), "{}", kiosk.log());
    drop(broker);
}

#[test]
fn a_wrong_ca_an_expired_certificate_and_a_wrong_host_are_refused_by_name_and_retried() {
    let pki = pki();
    // (case, the CA the kiosk trusts, the certificate the broker shows, words of the reason and
    // of the hint, whether fixing the broker lets the kiosk in)
    let cases = [
        ("wrong CA", "other-ca", "server", ["UnknownIssuer", "not signed by the CA in mqtt.ca_file"], false),
        ("expired", "ca", "expired", ["expired", "has expired"], true),
        ("wrong host", "ca", "wrong-host", ["not valid for name", "does not name the host"], true),
    ];
    for (case, trusted, shown, words, fixable) in cases {
        let run = tempfile::tempdir().unwrap();
        let (tls, plain) = (support::free_port(), support::free_port());
        let mut broker = tls_broker(pki.path(), run.path(), tls, plain, shown, false);
        let mut kiosk =
            Kiosk::run(&kiosk_config(run.path(), tls, &pki.path().join(format!("{trusted}.pem")), None));
        let broker_words = format!("broker=127.0.0.1:{tls}");
        let line = kiosk.wait_log(&["MQTT broker connection refused", &broker_words, words[0], words[1]], 20);
        assert!(line.starts_with("WARN"), "{case}: {line}");
        // Still running, still trying (the second attempt comes within a second).
        std::thread::sleep(Duration::from_millis(1500));
        assert!(kiosk.is_running(), "{case}: the kiosk stopped: {}", kiosk.log());
        assert!(!kiosk.log().contains("MQTT broker connected"), "{case}: {}", kiosk.log());
        if fixable {
            // The broker gets its right certificate back on the same port: the kiosk comes in.
            drop(broker);
            broker = tls_broker(pki.path(), run.path(), tls, plain, "server", false);
            let mut operator = Probe::connect(plain, "operator", None);
            assert!(operator.subscribe(&format!("{ROOT}/#")));
            kiosk.wait_log(&["MQTT broker connected", &broker_words], 40);
            works(&mut operator, &format!("fixed-{}", case.replace(' ', "-")));
        }
        drop(broker);
    }
}

#[test]
fn mutual_tls_works_with_the_client_certificate_and_is_refused_without_it() {
    let pki = pki();
    let run = tempfile::tempdir().unwrap();
    let (tls, plain) = (support::free_port(), support::free_port());
    let broker = tls_broker(pki.path(), run.path(), tls, plain, "server", true);
    let mut operator = Probe::connect(plain, "operator", None);
    assert!(operator.subscribe(&format!("{ROOT}/#")));

    let without = tempfile::tempdir().unwrap();
    let mut refused = Kiosk::run(&kiosk_config(without.path(), tls, &pki.path().join("ca.pem"), None));
    let line = refused.wait_log(&["MQTT broker connection refused", &format!("broker=127.0.0.1:{tls}")], 20);
    assert!(line.contains("client_cert_file"), "{line}");
    assert!(refused.is_running());
    refused.kill();

    let client = (pki.path().join("client.pem"), pki.path().join("client.key"));
    let kiosk =
        Kiosk::run(&kiosk_config(run.path(), tls, &pki.path().join("ca.pem"), Some((&client.0, &client.1))));
    works(&mut operator, "mtls-1");
    drop(kiosk);
    drop(broker);
}

#[test]
fn a_client_key_others_can_read_is_refused_by_name_before_anything_starts() {
    let pki = pki();
    let run = tempfile::tempdir().unwrap();
    let key = pki.path().join("client.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = kiosk_config(
        run.path(),
        8883,
        &pki.path().join("ca.pem"),
        Some((&pki.path().join("client.pem"), &key)),
    );
    let err = capture_kiosk::config::load(&config).unwrap_err();
    assert_eq!(err.key(), Some("mqtt.client_key_file"), "{err}");
    assert!(err.to_string().contains("chmod 600"), "{err}");
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(!err.to_string().contains(text.lines().nth(1).unwrap()), "the key never shows: {err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let loaded = capture_kiosk::config::load(&config).unwrap().mqtt.unwrap();
    assert_eq!(loaded.client_key_file.as_deref(), Some(key.as_path()));
    // Not a key at all: refused by name when the link starts.
    std::fs::write(&key, "not a key\n").unwrap();
    let err = capture_kiosk::mqtt::Link::start(&loaded, "bay-tls", Box::new(|_| {})).unwrap_err();
    assert!(err.to_string().starts_with("mqtt.client_key_file"), "{err}");
}
