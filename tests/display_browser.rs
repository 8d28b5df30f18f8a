//! The bay's pages in a real browser: Debian's headless Chromium, driven over the DevTools
//! protocol, renders the driver's screen while the kiosk (the binary, with a real Mosquitto
//! and two IP cameras on 127.0.0.1) goes through every stage; at each the test reads the text
//! on the screen, checks that nothing is cut off at 1920×1080 and 1280×720, takes a screenshot
//! and times the update from the MQTT event to the screen. Then it kills the kiosk, sees the
//! screen close by itself and come back with the next kiosk, and shows the camera page.
//!
//! Screenshots go to `target/…/screenshots/`; with `CAPTURE_KIOSK_SCREENSHOTS=DIR` also to
//! DIR (`scripts/screenshots` refreshes `assets/screenshots/` that way).

mod support;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use capture_kiosk::capture::testcam::{Behaviour, SnapshotServer};
use serde_json::{json, Value};
use support::{Kiosk, Probe};

type Socket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

/// A headless Chromium with one page, driven over the DevTools protocol.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    page: Socket,
    next_id: u64,
}

impl Browser {
    fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--force-color-profile=srgb",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium must be installed (scripts/setup-debian --test installs Debian's package)");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let endpoint = loop {
            let line = lines.next().expect("chromium exited before it listened").unwrap();
            if let Some(url) = line.strip_prefix("DevTools listening on ") {
                break url.trim().to_owned();
            }
        };
        // Chromium's own chatter is drained so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let port = endpoint.trim_start_matches("ws://127.0.0.1:").split('/').next().unwrap().to_owned();
        let list = ureq::get(format!("http://127.0.0.1:{port}/json/list"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        let targets: Value = serde_json::from_str(&list).unwrap();
        let page_url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_owned();
        let (page, _) = tungstenite::connect(page_url).unwrap();
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = page.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        }
        let mut browser = Browser { child, _profile: profile, page, next_id: 0 };
        browser.call("Page.enable", json!({}));
        browser.call("Runtime.enable", json!({}));
        browser
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({ "id": id, "method": method, "params": params }).to_string();
        self.page.send(tungstenite::Message::text(message)).unwrap();
        loop {
            let reply = self.page.read().unwrap();
            let Ok(text) = reply.to_text() else { continue };
            let value: Value = serde_json::from_str(text).unwrap_or_default();
            if value["id"] == id {
                assert!(value.get("error").is_none(), "{method}: {value}");
                return value["result"].clone();
            }
        }
    }

    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        assert!(result.get("exceptionDetails").is_none(), "{expression}: {result}");
        result["result"]["value"].clone()
    }

    fn viewport(&mut self, width: u32, height: u32) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        // Let the page lay itself out again.
        self.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))");
    }

    fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
        self.until("the page loaded", 20, |b| b.eval("document.readyState") == "complete");
    }

    fn screenshot(&mut self, path: &Path) -> image::RgbImage {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, &png).unwrap();
        if let Some(dir) = std::env::var_os("CAPTURE_KIOSK_SCREENSHOTS") {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(Path::new(&dir).join(path.file_name().unwrap()), &png).unwrap();
        }
        image::load_from_memory(&png).unwrap().to_rgb8()
    }

    /// Polls `done` every 10 ms for up to `secs`; returns how long it took.
    fn until(&mut self, what: &str, secs: u64, mut done: impl FnMut(&mut Browser) -> bool) -> Duration {
        let start = Instant::now();
        while !done(self) {
            assert!(start.elapsed() < Duration::from_secs(secs), "{what}: not within {secs} s");
            std::thread::sleep(Duration::from_millis(10));
        }
        start.elapsed()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the driver's page shows: mode, instruction, the angles' states, and whatever is cut
/// off or outside the window.
const LOOK: &str = r#"(() => {
  const vw = innerWidth, vh = innerHeight, bad = [];
  const text = document.getElementById("instruction");
  for (const el of [text, ...document.querySelectorAll(".angle .name"), ...document.querySelectorAll(".angle")]) {
    if (el.scrollWidth > el.clientWidth + 1 || el.scrollHeight > el.clientHeight + 1) bad.push("cut off: " + el.textContent);
    const r = el.getBoundingClientRect();
    if (r.left < 0 || r.top < 0 || r.right > vw + 0.5 || r.bottom > vh + 0.5) bad.push("outside the window: " + el.textContent);
  }
  return {
    mode: document.body.dataset.mode,
    text: text.textContent,
    size: parseFloat(getComputedStyle(text).fontSize),
    font: getComputedStyle(text).fontFamily,
    angles: [...document.querySelectorAll(".angle")].map(t => t.dataset.state),
    updates: window.screenUpdates || 0,
    bad,
  };
})()"#;

/// The page's background colour in each mode (`assets/display/driver.html`) and its text colour.
fn colours(mode: &str) -> ([u8; 3], [u8; 3]) {
    match mode {
        "closed" => ([0x8e, 0, 0], [255; 3]),
        "waiting" => ([0, 0x47, 0x1b], [255; 3]),
        "capturing" => ([0xc0, 0, 0], [255; 3]),
        "done" => ([0, 0x6b, 0x2e], [255; 3]),
        "attention" => ([0xff, 0xb0, 0], [0; 3]),
        other => panic!("no colours for {other}"),
    }
}

fn shots_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots")
}

/// At both screen sizes: the page's text is `text`, nothing is cut off or outside, the type is
/// large enough to read from 3 m; a screenshot shows the mode's colours with text on them.
fn check_stage(browser: &mut Browser, stage: &str, text: &str) {
    for (width, height) in [(1920, 1080), (1280, 720)] {
        browser.viewport(width, height);
        let look = browser.eval(LOOK);
        assert_eq!(look["text"], text, "{stage} at {width}x{height}: {look}");
        assert_eq!(look["bad"], json!([]), "{stage} at {width}x{height}");
        // About 6 cm capitals on a 1 m wide screen: readable from a driver's seat.
        assert!(
            look["size"].as_f64().unwrap() >= f64::from(height) * 0.07,
            "{stage}: type too small: {look}"
        );
        let shot = browser.screenshot(&shots_dir().join(format!("driver-{stage}-{width}x{height}.png")));
        assert_eq!(shot.dimensions(), (width, height));
        let (background, ink) = colours(stage);
        let near = |p: &image::Rgb<u8>, c: [u8; 3]| p.0.iter().zip(c).all(|(a, b)| a.abs_diff(b) < 40);
        assert!(near(shot.get_pixel(3, 3), background), "{stage}: background {:?}", shot.get_pixel(3, 3));
        let inked = shot.pixels().filter(|p| near(p, ink)).count() as f64 / f64::from(width * height);
        assert!(
            (0.01..0.6).contains(&inked),
            "{stage} at {width}x{height}: {inked:.3} of the screen is text"
        );
    }
    browser.viewport(1920, 1080);
}

fn photo(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata/vehicles").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_drivers_screen_follows_every_stage_in_a_real_browser_within_a_second() {
    // The page names its fonts; the machine must have them, the tick mark included.
    for (query, what) in [("DejaVu Sans:bold", "DejaVu Sans Bold"), (":charset=2713", "a font with ✓")] {
        let found = Command::new("fc-list")
            .arg(query)
            .output()
            .expect("fontconfig (fc-list) is installed with chromium");
        assert!(
            !found.stdout.is_empty(),
            "{what} is not installed: scripts/setup-debian --test installs fonts-dejavu-core"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (broker, mut mosquitto) = support::mosquitto(dir.path(), "allow_anonymous true\n");
    let front = SnapshotServer::start(photo("canon_eos450d_red_car_12mp.jpg")).unwrap();
    let side = SnapshotServer::start(photo("canon_powershot_s40_car_rear_plate.jpg")).unwrap();
    let port = support::free_port();
    let config = dir.path().join("bay.toml");
    std::fs::write(
        &config,
        format!(
            r#"bay_id = "bay-07"
state_dir = "{state}"
[inspection]
angles = ["Front", "Rear", "Left", "Right"]
capture_attempts = 1
# One health probe at start: a probe would wait on the camera the test holds.
camera_probe_interval = "1h"
[imaging]
max_long_edge = 640
[[cameras]]
id = "front"
source = "{front}"
angles = ["Front", "Rear"]
timeout = "20s"
masks = [{{ name = "office window", polygon = [[0.72, 0.05], [0.97, 0.05], [0.97, 0.3], [0.72, 0.3]] }}]
[[cameras]]
id = "side"
source = "{side}"
angles = ["Left", "Right"]
timeout = "20s"
[mqtt]
url = "mqtt://127.0.0.1:{broker}"
[display]
listen = "127.0.0.1:{port}"
done_for = "6s"
attention_for = "6s"
"#,
            state = dir.path().join("state").display(),
            front = front.url(),
            side = side.url(),
        ),
    )
    .unwrap();
    let mut kiosk = Kiosk::run(&config);
    kiosk.wait_log(&["Serving the driver's screen"], 30);
    let mut operator = Probe::connect(broker, "operator", None);
    assert!(operator.subscribe("capture-kiosk/bay-07/#"));
    let events = "capture-kiosk/bay-07/events";
    let commands = "capture-kiosk/bay-07/cmd/start";

    let mut browser = Browser::launch();
    browser.viewport(1920, 1080);
    browser.open(&format!("http://127.0.0.1:{port}/"));
    let mode = |b: &mut Browser| b.eval(LOOK)["mode"].as_str().unwrap_or_default().to_owned();
    browser.until("waiting", 20, |b| mode(b) == "waiting");
    check_stage(&mut browser, "waiting", "Drive in slowly");

    // Capturing: the side camera holds its frame, so the car is in the bay with two of four
    // angles stored.
    // (The health probe at start was answered: a held probe would hold the capture too.)
    operator.json_any("capture-kiosk/bay-07/state", |s| s["cameras"]["side"]["status"] == "online");
    side.set_behaviour(Behaviour::Hold);
    operator.publish(commands, r#"{"command_id":"d-1","case_id":"CASE-D1"}"#);
    operator.json(events, |e| e["type"] == "angle_captured" && e["angle"] == "Rear");
    let stored = |b: &mut Browser| {
        b.eval(LOOK)["angles"].as_array().map_or(0, |a| a.iter().filter(|s| *s == "stored").count())
    };
    let lag = browser.until("the second angle on the screen", 5, |b| stored(b) == 2);
    eprintln!("angle stored -> on the screen: {lag:?}");
    assert!(lag < Duration::from_secs(1), "the screen showed the stored angle after {lag:?}");
    assert_eq!(browser.eval(LOOK)["angles"], json!(["stored", "stored", "pending", "pending"]));
    check_stage(&mut browser, "capturing", "Stop \u{2014} hold still");

    side.set_behaviour(Behaviour::Serve);
    operator.json(events, |e| e["type"] == "inspection_captured");
    let lag = browser.until("done", 5, |b| mode(b) == "done");
    eprintln!("inspection captured -> done on the screen: {lag:?}");
    assert!(lag < Duration::from_secs(1), "the screen said done after {lag:?}");
    assert_eq!(browser.eval(LOOK)["angles"], json!(["stored", "stored", "stored", "stored"]));
    check_stage(&mut browser, "done", "Done \u{2014} please drive on");

    // A failed angle calls an attendant.
    side.set_behaviour(Behaviour::Garbage);
    operator.publish(commands, r#"{"command_id":"d-2","case_id":"CASE-D2"}"#);
    operator.json(events, |e| e["type"] == "angle_failed");
    let lag = browser.until("attention", 5, |b| mode(b) == "attention");
    eprintln!("angle failed -> attention on the screen: {lag:?}");
    assert!(lag < Duration::from_secs(1), "the screen called an attendant after {lag:?}");
    operator.json(events, |e| e["type"] == "inspection_captured" || e["type"] == "inspection_failed");
    check_stage(&mut browser, "attention", "Please wait, an attendant is coming");

    // The kiosk dies: the screen closes the bay by itself, and follows the next kiosk.
    browser.until("waiting after the call ran out", 20, |b| mode(b) == "waiting");
    let updates = browser.eval(LOOK)["updates"].as_u64().unwrap();
    kiosk.kill();
    browser.until("closed without a kiosk", 15, |b| mode(b) == "closed");
    assert_eq!(browser.eval(LOOK)["text"], "Bay closed");
    kiosk = Kiosk::run(&config);
    kiosk.wait_log(&["Serving the driver's screen"], 30);
    browser.until("the page reconnected", 15, |b| {
        let look = b.eval(LOOK);
        look["mode"] == "waiting" && look["updates"].as_u64().unwrap() > updates
    });

    // A camera unplugged: the car in the bay is told to wait, then the bay is closed.
    side.set_behaviour(Behaviour::Off);
    operator.publish(commands, r#"{"command_id":"d-3","case_id":"CASE-D3"}"#);
    operator.json(events, |e| e["type"] == "camera_offline");
    browser.until("closed", 20, |b| mode(b) == "closed");
    check_stage(&mut browser, "closed", "Bay closed");
    side.set_behaviour(Behaviour::Serve);

    // The camera page: asks for the token, then shows each camera with a fresh frame.
    browser.viewport(1280, 900);
    browser.open(&format!("http://127.0.0.1:{port}/cameras"));
    let login =
        browser.eval(r#"document.getElementById("login").hidden === false && document.body.innerText"#);
    assert!(login.as_str().unwrap_or_default().contains("display-token"), "{login}");
    assert_eq!(browser.eval("document.querySelectorAll('img').length"), 0);
    browser.screenshot(&shots_dir().join("cameras-token.png"));
    let token = std::fs::read_to_string(dir.path().join("state/display-token")).unwrap();
    browser.eval(&format!(
        "document.getElementById('token').value = {}; document.querySelector('#login button').click(); true",
        json!(token.trim())
    ));
    browser.until("both frames shown and both cameras online", 30, |b| {
        b.eval("[...document.querySelectorAll('.frame img')].filter(i => i.complete && i.naturalWidth > 0).length")
            == 2
            && b.eval("[...document.querySelectorAll('.badge')].every(e => e.textContent === 'online')") == true
    });
    let cards = browser.eval(
        "[...document.querySelectorAll('.camera')].map(c => [c.dataset.camera, c.querySelector('.badge').textContent, c.querySelector('.size').textContent])",
    );
    assert_eq!(
        cards,
        json!([["front", "online", "4272 \u{d7} 2848"], ["side", "online", "2272 \u{d7} 1704"]]),
        "{cards}"
    );
    browser.screenshot(&shots_dir().join("cameras.png"));
    drop(kiosk);
    let _ = mosquitto.kill();
}
