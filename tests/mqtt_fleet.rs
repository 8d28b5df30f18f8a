//! Bays sharing one real Mosquitto: commands sent while a bay was down reach it when it comes
//! back (a persistent session under a stable client id), two kiosks with the same bay_id stop
//! fighting over the session and say so, and with the example ACL one bay cannot act for
//! another.

mod support;

use std::path::Path;
use std::time::{Duration, SystemTime};

use capture_kiosk::clock::rfc3339_seconds;
use capture_kiosk::store::{Caps, Store};
use support::{Kiosk, Probe};

fn anonymous_broker(dir: &Path) -> (u16, support::Mosquitto) {
    let port = support::free_port();
    let child = support::mosquitto_conf(
        dir,
        &format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        port,
    );
    (port, child)
}

fn inspections(state: &Path) -> usize {
    let store =
        Store::open(state, Caps { max_bytes: u64::MAX, min_free_disk: 0 }, SystemTime::now()).unwrap();
    store.list().unwrap().len()
}

fn started_events(probe: &Probe, root: &str) -> usize {
    probe
        .messages_under(&format!("{root}/events"))
        .iter()
        .filter(|m| m.contains("\"inspection_started\""))
        .count()
}

#[test]
fn a_start_sent_while_the_bay_was_killed_runs_when_it_is_back_and_an_expired_one_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, broker) = anonymous_broker(tmp.path());
    let root = "capture-kiosk/bay-blip";
    let config = support::bay_config(tmp.path(), "bay-blip", &format!("url = \"mqtt://127.0.0.1:{port}\""));
    let mut operator = Probe::connect(port, "operator", None);
    assert!(operator.subscribe(&format!("{root}/#")));

    let mut kiosk = Kiosk::run(&config);
    operator.text(&format!("{root}/status"), "online");
    // The subscription to the commands stands: a ping is answered.
    operator.publish(&format!("{root}/cmd/ping"), r#"{"command_id":"before"}"#);
    operator.json(&format!("{root}/cmd/ping/ack"), |v| v["command_id"] == "before");
    assert!(kiosk.log().contains("client_id=capture-kiosk-bay-blip"), "{}", kiosk.log());

    kiosk.kill();
    operator.text(&format!("{root}/status"), "offline");
    let now = SystemTime::now();
    let ahead = rfc3339_seconds(now + Duration::from_secs(60));
    let past = rfc3339_seconds(now - Duration::from_secs(5));
    operator.publish(
        &format!("{root}/cmd/start"),
        &format!(r#"{{"command_id":"while-down","case_id":"CASE-BLIP","expires_at":"{ahead}"}}"#),
    );
    operator.publish(
        &format!("{root}/cmd/start"),
        &format!(r#"{{"command_id":"too-late","case_id":"CASE-LATE","expires_at":"{past}"}}"#),
    );
    // The operator's own publishes were accepted by the broker before the bay comes back.
    std::thread::sleep(Duration::from_millis(300));

    let mut kiosk = Kiosk::run(&config);
    let ack = operator.json(&format!("{root}/cmd/start/ack"), |v| v["command_id"] == "while-down");
    assert_eq!(ack["status"], "accepted", "{ack}");
    let inspection = ack["inspection_id"].as_i64().expect("the accepted start names its inspection");
    let late = operator.json_any(&format!("{root}/cmd/start/ack"), |v| v["command_id"] == "too-late");
    assert_eq!(
        (late["status"].as_str(), late["reason"].as_str()),
        (Some("rejected"), Some("expired")),
        "{late}"
    );
    let captured = operator.json_any(&format!("{root}/events"), |v| v["type"] == "inspection_captured");
    assert_eq!(
        (captured["inspection_id"].as_i64(), captured["images"].as_u64()),
        (Some(inspection), Some(2))
    );
    assert!(
        kiosk.wait_log(&["MQTT broker connected"], 5).contains("session_present=true"),
        "{}",
        kiosk.log()
    );

    // Killed and started once more: the session holds nothing that runs again, and the same
    // start sent again is answered with its first outcome.
    kiosk.kill();
    operator.text(&format!("{root}/status"), "offline");
    let _kiosk = Kiosk::run(&config);
    operator.text(&format!("{root}/status"), "online");
    operator.publish(
        &format!("{root}/cmd/start"),
        &format!(r#"{{"command_id":"while-down","case_id":"CASE-BLIP","expires_at":"{ahead}"}}"#),
    );
    let again = operator.json(&format!("{root}/cmd/start/ack"), |v| v["command_id"] == "while-down");
    assert_eq!(
        (again["status"].as_str(), again["inspection_id"].as_i64()),
        (Some("accepted"), Some(inspection))
    );
    operator.publish(&format!("{root}/cmd/ping"), r#"{"command_id":"after"}"#);
    operator.json(&format!("{root}/cmd/ping/ack"), |v| v["command_id"] == "after");
    assert_eq!(started_events(&operator, root), 1, "{:#?}", operator.summary());
    drop(_kiosk);
    assert_eq!(inspections(&tmp.path().join("state")), 1, "no command ran twice");
    drop(broker);
}

/// Connections the broker accepted from `client_id`, from its log.
fn connections(dir: &Path, client_id: &str) -> usize {
    let log = std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("New client connected") && l.contains(&format!(" as {client_id} ")))
        .count()
}

#[test]
fn two_kiosks_with_the_same_bay_id_stop_fighting_over_the_session_and_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, broker) = anonymous_broker(tmp.path());
    let root = "capture-kiosk/bay-twin";
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&two).unwrap();
    let url = format!("url = \"mqtt://127.0.0.1:{port}\"");
    let mut operator = Probe::connect(port, "operator", None);
    assert!(operator.subscribe(&format!("{root}/#")));

    let first = Kiosk::run(&support::bay_config(&one, "bay-twin", &url));
    operator.text(&format!("{root}/status"), "online");
    let second = Kiosk::run(&support::bay_config(&two, "bay-twin", &url));
    // Within a few rounds of take-over, one of them (the newcomer, in practice) names the
    // client id it shares and slows down.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let said = loop {
        let said: Vec<String> = [&first, &second]
            .iter()
            .filter_map(|k| k.log().lines().find(|l| l.contains("taken over")).map(str::to_owned))
            .collect();
        if !said.is_empty() {
            break said;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nobody said the session is taken over; first:\n{}\nsecond:\n{}",
            first.log(),
            second.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        said.iter().all(|l| l.starts_with("ERROR") && l.contains("client_id=capture-kiosk-bay-twin")),
        "{said:#?}"
    );
    // No more flapping: the broker sees (almost) no new connection from that id for a while.
    std::thread::sleep(Duration::from_secs(1));
    let before = connections(tmp.path(), "capture-kiosk-bay-twin");
    assert!(before >= 4, "the take-over rounds are in the broker's log ({before})");
    std::thread::sleep(Duration::from_secs(4));
    let after = connections(tmp.path(), "capture-kiosk-bay-twin");
    eprintln!(
        "connections from the shared client id: {before} until one backed off, {after} four seconds later"
    );
    assert!(after <= before + 1, "the two kiosks still flap: {before} then {after} connections");
    // The one that stayed still works.
    operator.publish(&format!("{root}/cmd/ping"), r#"{"command_id":"twin-ping"}"#);
    let ack = operator.json(&format!("{root}/cmd/ping/ack"), |v| v["command_id"] == "twin-ping");
    assert_eq!(ack["status"], "succeeded");
    drop(broker);
}

#[test]
fn a_broker_killed_and_restarted_again_and_again_is_no_twin_and_the_bay_comes_straight_back() {
    let tmp = tempfile::tempdir().unwrap();
    let bay = tmp.path().join("bay");
    std::fs::create_dir_all(&bay).unwrap();
    let port = support::free_port();
    let conf = format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n");
    let mut broker = support::mosquitto_conf(tmp.path(), &conf, port);
    let url = format!("url = \"mqtt://127.0.0.1:{port}\"");
    let kiosk = Kiosk::run(&support::bay_config(&bay, "bay-flap", &url));
    let root = "capture-kiosk/bay-flap";
    let mut operator = Probe::connect(port, "operator-0", None);
    assert!(operator.subscribe(&format!("{root}/#")));
    operator.text(&format!("{root}/status"), "online");
    // The broker is killed and back within moments, more times in a row than a twin needs to
    // be suspected: each time the bay finds its session gone, which no twin would cause.
    for round in 0..8 {
        drop(broker);
        broker = support::mosquitto_conf(tmp.path(), &conf, port);
        let mut operator = Probe::connect(port, &format!("operator-{}", round + 1), None);
        assert!(operator.subscribe(&format!("{root}/#")));
        operator.text(&format!("{root}/status"), "online");
    }
    assert!(!kiosk.log().contains("taken over"), "{}", kiosk.log());
    let mut operator = Probe::connect(port, "operator-last", None);
    assert!(operator.subscribe(&format!("{root}/#")));
    operator.publish(&format!("{root}/cmd/ping"), r#"{"command_id":"flap-ping"}"#);
    let ack = operator.json(&format!("{root}/cmd/ping/ack"), |v| v["command_id"] == "flap-ping");
    assert_eq!(ack["status"], "succeeded");
    drop(broker);
}

/// The example ACL, a password file made with mosquitto_passwd, and a broker using both.
fn acl_broker(dir: &Path, extra_acl: &str, users: &[&str]) -> (u16, support::Mosquitto) {
    let acl = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/mosquitto/acl.example"))
        .unwrap();
    std::fs::write(dir.join("acl"), format!("{acl}\n{extra_acl}")).unwrap();
    let passwd = dir.join("passwd");
    for (i, user) in users.iter().enumerate() {
        let mut cmd = std::process::Command::new("mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let status = cmd.arg("-b").arg(&passwd).arg(user).arg(format!("pw-{user}")).status().unwrap();
        assert!(status.success(), "mosquitto_passwd failed for {user}");
    }
    let port = support::free_port();
    let child = support::mosquitto_conf(
        dir,
        &format!(
            "per_listener_settings false\nallow_anonymous false\npassword_file {}\nacl_file {}\npersistence false\nlistener {port} 127.0.0.1\n",
            passwd.display(),
            dir.join("acl").display()
        ),
        port,
    );
    (port, child)
}

fn bay_with_login(dir: &Path, bay_id: &str, port: u16, user: &str) -> std::path::PathBuf {
    let password = dir.join("mqtt-password");
    std::fs::write(&password, format!("pw-{user}\n")).unwrap();
    // Owner-only, as every secret of the kiosk must be.
    std::fs::set_permissions(&password, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    support::bay_config(
        dir,
        bay_id,
        &format!(
            "url = \"mqtt://127.0.0.1:{port}\"\nusername = \"{user}\"\npassword_file = \"{}\"",
            password.display()
        ),
    )
}

#[test]
fn with_the_example_acl_one_bay_cannot_act_for_another() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, broker) = acl_broker(tmp.path(), "", &["bay-a", "bay-b", "operator"]);
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let mut operator = Probe::connect(port, "operator-console", Some(("operator", "pw-operator")));
    assert!(operator.subscribe("capture-kiosk/#"), "the operator reads every bay");
    let _a = Kiosk::run(&bay_with_login(&dir_a, "bay-a", port, "bay-a"));
    let _b = Kiosk::run(&bay_with_login(&dir_b, "bay-b", port, "bay-b"));
    operator.text_any("capture-kiosk/bay-a/status", "online");
    operator.text_any("capture-kiosk/bay-b/status", "online");

    // An intruder with bay A's login.
    let mut intruder = Probe::connect(port, "intruder", Some(("bay-a", "pw-bay-a")));
    // Mosquitto 2.0 grants any subscription and filters what it delivers by the ACL.
    intruder.subscribe("capture-kiosk/bay-b/cmd/+");
    intruder.subscribe("capture-kiosk/#");
    intruder.publish("capture-kiosk/bay-b/cmd/start", r#"{"command_id":"forged","case_id":"CASE-FORGED"}"#);
    intruder.publish("capture-kiosk/bay-b/state", r#"{"forged":true}"#);
    intruder
        .publish("capture-kiosk/bay-b/cmd/ping/ack", r#"{"command_id":"forged-ack","status":"succeeded"}"#);

    // Each bay still works for the operator.
    for bay in ["bay-a", "bay-b"] {
        operator.publish(
            &format!("capture-kiosk/{bay}/cmd/start"),
            &format!(r#"{{"command_id":"{bay}-1","case_id":"CASE-{bay}"}}"#),
        );
        let ack = operator
            .json(&format!("capture-kiosk/{bay}/cmd/start/ack"), |v| v["command_id"] == format!("{bay}-1"));
        assert_eq!(ack["status"], "accepted", "{ack}");
        operator.json(&format!("capture-kiosk/{bay}/events"), |v| v["type"] == "inspection_captured");
    }
    operator.publish("capture-kiosk/bay-b/cmd/ping", r#"{"command_id":"b-ping"}"#);
    operator.json("capture-kiosk/bay-b/cmd/ping/ack", |v| v["command_id"] == "b-ping");
    operator.publish("capture-kiosk/bay-a/cmd/ping", r#"{"command_id":"a-ping"}"#);
    // Bay A's login reads its own commands (and nothing else): a marker that everything sent
    // before has been delivered to the intruder if it was going to be.
    intruder.json_any("capture-kiosk/bay-a/cmd/ping", |v| v["command_id"] == "a-ping");
    intruder.drain();
    operator.drain();

    let b_seen_by_intruder = intruder.messages_under("capture-kiosk/bay-b/");
    assert!(b_seen_by_intruder.is_empty(), "bay A read B's topics: {b_seen_by_intruder:#?}");
    let forged: Vec<String> = operator
        .messages_under("capture-kiosk/bay-b/")
        .into_iter()
        .filter(|m| m.contains("forged"))
        .collect();
    assert!(forged.is_empty(), "bay A published into B's topics: {forged:#?}");
    assert_eq!(started_events(&operator, "capture-kiosk/bay-b"), 1, "only the operator's start ran on B");
    // A newcomer gets B's own retained state, not the forged one.
    let mut late = Probe::connect(port, "late-operator", Some(("operator", "pw-operator")));
    assert!(late.subscribe("capture-kiosk/bay-b/state"));
    let state = late.json("capture-kiosk/bay-b/state", |_| true);
    assert!(state["boot_id"].is_string(), "{state}");
    drop(broker);
}

/// Runs `mosquitto_ctrl dynsec` with `args` against the broker on `port` as the admin.
fn dynsec(port: u16, args: &[&str]) {
    let out = std::process::Command::new("mosquitto_ctrl")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-u", "admin", "-P", "pw-admin", "dynsec"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "mosquitto_ctrl dynsec {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_bay_whose_command_subscription_is_refused_says_so_in_its_state_and_log() {
    // Mosquitto's own ACL file grants every subscription and filters delivery; its dynamic
    // security plugin refuses a subscription outright (SUBACK 0x80), as EMQX, HiveMQ and
    // AWS IoT Core do. Here the bay's role lets it publish but not subscribe: a broker-side
    // mistake the bay must not hide.
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("dynsec.json");
    let out = std::process::Command::new("mosquitto_ctrl")
        .args(["dynsec", "init"])
        .arg(&json)
        .args(["admin", "pw-admin"])
        .output()
        .unwrap();
    assert!(out.status.success(), "dynsec init: {}", String::from_utf8_lossy(&out.stderr));
    let port = support::free_port();
    let plugin = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib/arm-linux-gnueabihf",
        "/usr/lib",
    ]
    .iter()
    .map(|d| Path::new(d).join("mosquitto_dynamic_security.so"))
    .find(|p| p.exists())
    .expect("Mosquitto's dynamic security plugin (package mosquitto)");
    let broker = support::mosquitto_conf(
        tmp.path(),
        &format!(
            "per_listener_settings false\nallow_anonymous false\nplugin {}\nplugin_opt_config_file {}\nlistener {port} 127.0.0.1\n",
            plugin.display(),
            json.display()
        ),
        port,
    );
    dynsec(port, &["createClient", "bay-m", "-p", "pw-bay-m"]);
    dynsec(port, &["createRole", "publish-only"]);
    dynsec(port, &["addRoleACL", "publish-only", "publishClientSend", "capture-kiosk/bay-m/#", "allow", "5"]);
    dynsec(port, &["addClientRole", "bay-m", "publish-only"]);

    let dir = tmp.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let kiosk = Kiosk::run(&bay_with_login(&dir, "bay-m", port, "bay-m"));
    let line = kiosk.wait_log(&["refused the subscription"], 20);
    assert!(line.starts_with("ERROR") && line.contains("capture-kiosk/bay-m/cmd/+"), "{line}");
    let mut watcher = Probe::connect(port, "watcher", Some(("admin", "pw-admin")));
    assert!(watcher.subscribe("capture-kiosk/bay-m/state"));
    let state = watcher.json("capture-kiosk/bay-m/state", |v| {
        v["alerts"].as_array().is_some_and(|a| a.iter().any(|a| a["type"] == "mqtt_subscription_refused"))
    });
    assert_eq!(state["lifecycle"], "alert", "{state}");
    drop(broker);
}
