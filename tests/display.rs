//! The bay's web server over real HTTP on 127.0.0.1, with the daemon running in this process:
//! the camera page's token guards every frame, a frame is taken on demand and never kept, none
//! is taken while a car is photographed, and the driver's screen streams each change.
//! (`display_browser.rs` renders the pages in Chromium.)

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capture_kiosk::capture::testcam::{Behaviour, SnapshotServer};
use capture_kiosk::daemon::{Event, Signal};
use capture_kiosk::mqtt::{Incoming, LinkEvent};
use capture_kiosk::store::Store;

fn photo() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/testdata/vehicles/canon_eos450d_red_car_12mp.jpg");
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (the real photos are in ../shared/testdata)", path.display()))
}

fn bay(dir: &Path, camera_url: &str) -> PathBuf {
    let path = dir.join("bay.toml");
    std::fs::write(
        &path,
        format!(
            r#"bay_id = "bay-d"
state_dir = "{state}"
[inspection]
angles = ["Front", "Rear"]
capture_attempts = 1
# One health probe at start, then none while the test counts the camera's frames.
camera_probe_interval = "1h"
[imaging]
max_long_edge = 640
[[cameras]]
id = "front"
source = "{camera_url}"
angles = ["Front", "Rear"]
timeout = "20s"
[display]
listen = "127.0.0.1:0"
"#,
            state = dir.join("state").display()
        ),
    )
    .unwrap();
    path
}

/// One GET: (status, content type, WWW-Authenticate, body).
struct Answer {
    status: u16,
    content_type: String,
    challenge: Option<String>,
    body: Vec<u8>,
}

fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Answer {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut request = agent.get(format!("http://{addr}{path}"));
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request.call().unwrap();
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (content_type, challenge) = (header("content-type").unwrap_or_default(), header("www-authenticate"));
    Answer {
        status: response.status().as_u16(),
        content_type,
        challenge,
        body: response.body_mut().with_config().limit(64 << 20).read_to_vec().unwrap(),
    }
}

fn command(name: &str, payload: &str) -> Event {
    Event::Mqtt(LinkEvent::Command(Incoming {
        name: name.to_owned(),
        payload: payload.as_bytes().to_vec(),
        size: payload.len(),
    }))
}

fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the daemon's first health probe found every camera online.
fn first_probe_answered(addr: SocketAddr, dir: &Path) {
    let token = std::fs::read_to_string(dir.join("state/display-token")).unwrap();
    wait_for("the first health probe", 60, || {
        let list: serde_json::Value =
            serde_json::from_slice(&get(addr, "/api/cameras", Some(&token)).body).unwrap_or_default();
        list["cameras"].as_array().is_some_and(|c| c.iter().all(|c| c["status"] == "online"))
    });
}

fn mode(addr: SocketAddr) -> String {
    let screen: serde_json::Value = serde_json::from_slice(&get(addr, "/screen", None).body).unwrap();
    screen["mode"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn the_camera_page_needs_the_token_and_its_frames_are_never_kept_nor_taken_during_a_capture() {
    let dir = tempfile::tempdir().unwrap();
    let camera = SnapshotServer::start(photo()).unwrap();
    let config = capture_kiosk::config::load(&bay(dir.path(), &camera.url())).unwrap();
    let daemon = support::capture_only_daemon(config);
    let addr = daemon.display_addr().expect("the display is served by default");
    let token = std::fs::read_to_string(dir.path().join("state/display-token")).unwrap();

    // The driver's page and its stream are for everyone: they hold no image.
    let page = get(addr, "/", None);
    assert_eq!((page.status, page.content_type.as_str()), (200, "text/html; charset=utf-8"));
    assert!(String::from_utf8_lossy(&page.body).contains("EventSource"));
    assert!(!String::from_utf8_lossy(&page.body).contains("http"), "the page fetches nothing from elsewhere");

    // Everything else: 401 and no image bytes without the token, or with another one.
    first_probe_answered(addr, dir.path());
    let served = camera.frames_served();
    for path in ["/cameras", "/api/cameras", "/api/cameras/front/frame"] {
        for wrong in [None, Some("not-the-token"), Some(&token[..token.len() - 1])] {
            let a = get(addr, path, wrong);
            assert_eq!(a.status, 401, "{path} with {wrong:?}");
            assert!(a.challenge.as_deref().is_some_and(|c| c.starts_with("Bearer")), "{path}");
            assert!(!a.content_type.starts_with("image/") && !a.body.starts_with(&[0xFF, 0xD8]), "{path}");
            assert!(!String::from_utf8_lossy(&a.body).contains(token.trim()), "{path} shows the token");
        }
    }
    let login = String::from_utf8_lossy(&get(addr, "/cameras", None).body).into_owned();
    assert!(
        login.contains(&format!("sudo cat {}", dir.path().join("state/display-token").display())),
        "the page says how to get the token"
    );
    assert_eq!(camera.frames_served(), served, "no frame was taken for a request without the token");

    // With it: the list, and a fresh frame on demand.
    assert_eq!(get(addr, "/cameras", Some(&token)).status, 200);
    let list: serde_json::Value =
        serde_json::from_slice(&get(addr, "/api/cameras", Some(&token)).body).unwrap();
    assert_eq!(list["cameras"][0]["id"], "front");
    assert_eq!(list["cameras"][0]["angles"], serde_json::json!(["Front", "Rear"]));
    for round in 1..=2 {
        let frame = get(addr, "/api/cameras/front/frame", Some(&token));
        assert_eq!(
            (frame.status, frame.content_type.as_str()),
            (200, "image/jpeg"),
            "{}",
            String::from_utf8_lossy(&frame.body)
        );
        let image = image::load_from_memory(&frame.body).unwrap();
        assert_eq!(image.width().max(image.height()), 960, "downscaled for the page");
        assert_eq!(camera.frames_served(), served + round, "each request takes one fresh frame");
    }
    let list: serde_json::Value =
        serde_json::from_slice(&get(addr, "/api/cameras", Some(&token)).body).unwrap();
    assert_eq!(
        (list["cameras"][0]["width"].as_u64(), list["cameras"][0]["status"].as_str()),
        (Some(4272), Some("online"))
    );
    assert_eq!(get(addr, "/api/cameras/rear/frame", Some(&token)).status, 404);

    // While a car is photographed the page takes no frame: a camera that hangs keeps the
    // capture running, and the page is told to wait.
    camera.set_behaviour(Behaviour::Hold);
    daemon.sender().send(command("start", r#"{"command_id":"c1","case_id":"CASE-1"}"#)).unwrap();
    wait_for("the screen says capturing", 10, || mode(addr) == "capturing");
    let requests = camera.requests();
    let refused = get(addr, "/api/cameras/front/frame", Some(&token));
    assert_eq!(refused.status, 409, "{}", String::from_utf8_lossy(&refused.body));
    assert!(String::from_utf8_lossy(&refused.body).contains("inspection is being captured"));
    assert_eq!(camera.requests(), requests, "the refused request did not reach the camera");
    camera.set_behaviour(Behaviour::Serve);
    wait_for("the screen says done", 30, || mode(addr) == "done");

    daemon.signal(Signal::Terminate);
    daemon.wait().unwrap();
    // The buffer holds the inspection's two images and nothing of the page's frames.
    let store = Store::open(&dir.path().join("state"), support::CAPS, std::time::SystemTime::now()).unwrap();
    let totals = store.totals().unwrap();
    assert_eq!((totals.inspections, totals.images), (1, 2));
    let files: Vec<String> = std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("buffer.sqlite3") && n != "display-token")
        .collect();
    assert!(files.iter().all(|f| !f.ends_with(".jpg")), "no frame written: {files:?}");
}

/// Reads Server-Sent Events from `addr` and hands each `data:` line to the caller.
struct Stream(BufReader<TcpStream>);

impl Stream {
    fn open(addr: SocketAddr) -> Stream {
        let mut socket = TcpStream::connect(addr).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(socket, "GET /events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n").unwrap();
        let mut reader = BufReader::new(socket);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.contains(" 200 "), "{status}");
        Stream(reader)
    }

    /// The next screen sent.
    fn next(&mut self) -> serde_json::Value {
        loop {
            let mut line = String::new();
            assert!(self.0.read_line(&mut line).unwrap() > 0, "the stream ended");
            // Chunked framing puts sizes on lines of their own; the events are whole lines.
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                return serde_json::from_str(data).unwrap();
            }
        }
    }
}

#[test]
fn the_drivers_screen_streams_every_stage_of_an_inspection() {
    let dir = tempfile::tempdir().unwrap();
    let camera = SnapshotServer::start(photo()).unwrap();
    let config = capture_kiosk::config::load(&bay(dir.path(), &camera.url())).unwrap();
    let daemon = support::capture_only_daemon(config);
    let addr = daemon.display_addr().unwrap();
    // The health probe at start must be answered before the camera is made to hold its
    // frames, or it would hold the probe (and the capture behind it).
    first_probe_answered(addr, dir.path());
    let mut stream = Stream::open(addr);
    let mut screen = stream.next();
    while screen["mode"] == "opening" {
        screen = stream.next();
    }
    assert_eq!(
        (screen["mode"].as_str(), screen["text"].as_str()),
        (Some("waiting"), Some("Drive in slowly"))
    );

    camera.set_behaviour(Behaviour::Hold);
    daemon.sender().send(command("start", r#"{"command_id":"c1","case_id":"CASE-1"}"#)).unwrap();
    let mut seen = Vec::new();
    let mut rows = Vec::new();
    let mut released = false;
    loop {
        let screen = stream.next();
        let mode = screen["mode"].as_str().unwrap().to_owned();
        rows.push(
            screen["angles"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["state"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>(),
        );
        if seen.last() != Some(&mode) {
            seen.push(mode.clone());
        }
        if mode == "capturing" && !released && !rows.last().unwrap().is_empty() {
            released = true;
            camera.set_behaviour(Behaviour::Serve);
        }
        if mode == "done" {
            break;
        }
        assert!(mode == "capturing", "the screen went {mode} before done: {seen:?} {rows:?}");
    }
    assert_eq!(seen, ["capturing", "done"]);
    assert!(rows.contains(&vec!["pending".to_owned(), "pending".to_owned()]), "{rows:?}");
    assert!(
        rows.contains(&vec!["stored".to_owned(), "pending".to_owned()]),
        "angles fill in one by one: {rows:?}"
    );
    assert_eq!(rows.last().unwrap(), &["stored", "stored"]);
    daemon.signal(Signal::Terminate);
    daemon.wait().unwrap();
}
