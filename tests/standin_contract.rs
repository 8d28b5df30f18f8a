//! The stand-in cloud API against the spec (`shared/spec/cloud-api.md`), through real HTTP on
//! 127.0.0.1: ureq as a plain client, raw sockets for what a client library would not send, and
//! a `ManualClock` for every minute that passes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use capture_kiosk::clock::{rfc3339_seconds, Clock, ManualClock};
use capture_kiosk::standin::{expected_token, FaultKind, SessionStatus, StandIn, StandInConfig};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use ureq::unversioned::multipart::{Form, Part};

/// 2026-11-21T10:00:00Z.
const START_SECS: u64 = 1_795_255_200;
const EXTERIOR: [&str; 8] =
    ["Front", "Front_Left", "Left", "Rear_Left", "Rear", "Rear_Right", "Right", "Front_Right"];
const VIN: &str = "JN1CV6AR9BM123456";

struct Bay {
    standin: StandIn,
    clock: ManualClock,
    config: StandInConfig,
    agent: ureq::Agent,
}

struct Answer {
    status: u16,
    body: Value,
    date: Option<String>,
    retry_after: Option<String>,
}

struct Session {
    id: String,
    case_id: String,
    access_token: String,
    refresh_token: String,
}

fn bay() -> Bay {
    bay_with(StandInConfig::default())
}

fn bay_with(config: StandInConfig) -> Bay {
    let clock = ManualClock::starting_at(UNIX_EPOCH + Duration::from_secs(START_SECS));
    let shared: Arc<dyn Clock> = Arc::new(clock.clone());
    let standin = StandIn::start(config.clone(), shared).expect("the stand-in starts on 127.0.0.1");
    Bay { standin, clock, config, agent: agent(Duration::from_secs(10)) }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(timeout)).build().into()
}

fn answer(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut response = result.expect("the stand-in answers");
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (date, retry_after) = (header("date"), header("retry-after"));
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().expect("a readable body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"));
    Answer { status, body, date, retry_after }
}

/// A small valid JPEG; `seed` makes each one different.
fn jpeg(seed: u8) -> Vec<u8> {
    let image = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([seed, (x * 16) as u8, (y * 16) as u8]));
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
        .encode_image(&image)
        .expect("a tiny JPEG encodes");
    out
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

impl Bay {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.standin.base_url())
    }

    fn timestamp(&self) -> String {
        rfc3339_seconds(self.clock.wall())
    }

    fn token(&self, timestamp: &str) -> String {
        expected_token(
            self.config.api_secret.as_bytes(),
            &self.config.username,
            &self.config.api_key,
            timestamp,
        )
    }

    fn post_json_signed_as(
        &self,
        path: &str,
        body: &Value,
        key: &str,
        timestamp: &str,
        token: &str,
    ) -> Answer {
        answer(
            self.agent
                .post(self.url(path))
                .header("API-Key", key)
                .header("API-Timestamp", timestamp)
                .header("API-Token", token)
                .content_type("application/json")
                .send(serde_json::to_vec(body).expect("JSON")),
        )
    }

    fn post_json_at(&self, path: &str, body: &Value, timestamp: &str) -> Answer {
        self.post_json_signed_as(path, body, &self.config.api_key, timestamp, &self.token(timestamp))
    }

    fn post_json(&self, path: &str, body: &Value) -> Answer {
        self.post_json_at(path, body, &self.timestamp())
    }

    fn get_session(&self, id: &str) -> Answer {
        let ts = self.timestamp();
        answer(
            self.agent
                .get(self.url(&format!("/v1/sessions/{id}")))
                .header("API-Key", &self.config.api_key)
                .header("API-Timestamp", &ts)
                .header("API-Token", &self.token(&ts))
                .call(),
        )
    }

    fn authenticate_body(&self, case_id: &str) -> Value {
        json!({
            "key": self.config.api_key,
            "client_id": "BAY-07",
            "case_id": case_id,
            "vehicle": { "vin": VIN, "year": 2011, "make": "Infiniti", "model": "G37",
                         "body_type": "Sedan", "odom_reading": 330477, "odom_unit": "KILOMETRES" },
        })
    }

    fn authenticate(&self, case_id: &str) -> Session {
        let a = self.post_json("/api/authenticate", &self.authenticate_body(case_id));
        assert_eq!(a.status, 200, "{}", a.body);
        Session {
            id: a.body["session"].as_str().expect("session").to_owned(),
            case_id: case_id.to_owned(),
            access_token: a.body["access_token"].as_str().expect("access_token").to_owned(),
            refresh_token: a.body["refresh_token"].as_str().expect("refresh_token").to_owned(),
        }
    }

    fn upload_raw(
        &self,
        agent: &ureq::Agent,
        bearer: &str,
        fields: &[(&str, &str)],
        files: &[(String, Vec<u8>)],
        idempotency_key: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut form = Form::new();
        for (name, value) in fields {
            form = form.text(name, value);
        }
        for (filename, data) in files {
            form = form.part(
                "files",
                Part::bytes(data).file_name(filename).mime_str("image/jpeg").expect("a MIME type"),
            );
        }
        let mut request =
            agent.post(self.url("/api/upload")).header("Authorization", format!("Bearer {bearer}"));
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        request.send(form)
    }

    fn upload_with(
        &self,
        bearer: &str,
        session: &Session,
        files: &[(String, Vec<u8>)],
        key: Option<&str>,
    ) -> Answer {
        let fields =
            [("type", "file"), ("session", session.id.as_str()), ("case_id", session.case_id.as_str())];
        answer(self.upload_raw(&self.agent, bearer, &fields, files, key))
    }

    fn upload(&self, session: &Session, files: &[(String, Vec<u8>)]) -> Answer {
        self.upload_with(&session.refresh_token, session, files, None)
    }

    fn complete(&self, session: &Session, labels: &[&str]) -> Answer {
        self.post_json(
            "/api/complete",
            &json!({ "session": session.id, "case_id": session.case_id, "labels": labels }),
        )
    }
}

fn files(labels: &[&str], seed: u8) -> Vec<(String, Vec<u8>)> {
    labels
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("{l}.jpg"), jpeg(seed.wrapping_add(i as u8 * 7))))
        .collect()
}

fn message(a: &Answer) -> &str {
    a.body["message"].as_str().unwrap_or("")
}

/// Sends raw bytes and returns whatever comes back until the stand-in closes.
fn raw_exchange(bay: &Bay, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(bay.standin.addr()).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = stream.write_all(request);
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_whole_inspection_authenticates_uploads_in_two_requests_and_completes_exactly_once() {
    let bay = bay();
    let auth = bay.post_json("/api/authenticate", &bay.authenticate_body("CASE-12345"));
    assert_eq!(auth.status, 200, "{}", auth.body);
    assert_eq!(auth.date.as_deref(), Some("Sat, 21 Nov 2026 10:00:00 GMT"));
    assert_eq!(auth.body["expires_in"], 900);
    let session = Session {
        id: auth.body["session"].as_str().unwrap().to_owned(),
        case_id: "CASE-12345".to_owned(),
        access_token: auth.body["access_token"].as_str().unwrap().to_owned(),
        refresh_token: auth.body["refresh_token"].as_str().unwrap().to_owned(),
    };
    assert!(session.id.starts_with("S-"), "{}", session.id);
    assert_ne!(session.access_token, session.refresh_token);
    assert_eq!(session.refresh_token.split('.').count(), 3, "tokens are JWT-shaped");

    let idle = bay.get_session(&session.id);
    assert_eq!((idle.status, idle.body["status"].as_str()), (200, Some("IDLE")));

    let sent = files(&EXTERIOR, 1);
    let first = bay.upload(&session, &sent[..4]);
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(
        first.body,
        json!({ "session": session.id, "received": ["Front.jpg", "Front_Left.jpg", "Left.jpg", "Rear_Left.jpg"] })
    );
    let second = bay.upload(&session, &sent[4..]);
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.body["received"].as_array().map(Vec::len), Some(4));

    bay.clock.advance(Duration::from_secs(60));
    let held = bay.get_session(&session.id);
    assert_eq!(held.status, 200, "{}", held.body);
    assert_eq!(held.body["session_key"], session.id.as_str());
    assert_eq!(held.body["case_id"], "CASE-12345");
    assert_eq!(held.body["status"], "STARTED");
    assert_eq!(held.body["created_at"], "2026-11-21T10:00:00Z");
    assert_eq!(held.body["expires_at"], "2026-11-21T11:00:00Z");
    let photos = held.body["photos"].as_array().expect("photos");
    assert_eq!(photos.len(), 8);
    for (filename, data) in &sent {
        let label = filename.trim_end_matches(".jpg");
        let photo =
            photos.iter().find(|p| p["photo_label"] == label).unwrap_or_else(|| panic!("{label} is listed"));
        assert_eq!(photo["sha256"], sha256_hex(data).as_str());
        assert_eq!(photo["bytes"], data.len());
    }

    let done = bay.complete(&session, &EXTERIOR);
    assert_eq!(
        (done.status, done.body.clone()),
        (200, json!({ "session": session.id, "status": "PROCESS" }))
    );
    assert_eq!(bay.get_session(&session.id).body["status"], "PROCESS");
    let again = bay.complete(&session, &EXTERIOR);
    assert_eq!((again.status, message(&again)), (409, "Session already consumed"));

    let record = bay.standin.session(&session.id).expect("the session is recorded");
    assert_eq!(record.case_id, "CASE-12345");
    assert_eq!(record.client_id, "BAY-07");
    assert_eq!(record.vehicle.as_ref().and_then(|v| v["vin"].as_str()), Some(VIN));
    assert_eq!(record.status, SessionStatus::Process);
    assert!(record.completed);
    assert_eq!(record.completions, 1);
    assert_eq!(record.upload_requests, 2);
    assert_eq!(record.labels(), EXTERIOR.to_vec());
    assert!(record.photos.iter().all(|p| p.stores == 1));
    assert_eq!(bay.standin.authenticate_calls(), 1);
    assert_eq!(bay.standin.secret_leaks(), 0);
    let statuses: Vec<Option<u16>> = bay.standin.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 200, 409].map(Some).to_vec());
}

#[test]
fn a_wrong_signature_an_unknown_key_or_missing_headers_get_401_api_key_not_valid() {
    let bay = bay();
    let body = bay.authenticate_body("CASE-1");
    let ts = bay.timestamp();
    let good = bay.token(&ts);
    let wrong_secret = expected_token(b"not-the-secret", &bay.config.username, &bay.config.api_key, &ts);
    let wrong_user =
        expected_token(bay.config.api_secret.as_bytes(), "someone-else", &bay.config.api_key, &ts);
    let millis = "2026-11-21T10:00:00.000Z";
    let cases = [
        (bay.config.api_key.as_str(), ts.as_str(), wrong_secret.as_str()),
        (bay.config.api_key.as_str(), ts.as_str(), wrong_user.as_str()),
        ("unknown-key", ts.as_str(), good.as_str()),
        (bay.config.api_key.as_str(), ts.as_str(), &good.to_uppercase()),
        (bay.config.api_key.as_str(), millis, &bay.token(millis)),
        (bay.config.api_key.as_str(), ts.as_str(), ""),
    ];
    for (key, timestamp, token) in cases {
        let a = bay.post_json_signed_as("/api/authenticate", &body, key, timestamp, token);
        assert_eq!((a.status, message(&a)), (401, "API Key not valid"), "key {key} timestamp {timestamp}");
    }
    let unsigned = answer(bay.agent.get(bay.url("/v1/sessions/S-00000000")).call());
    assert_eq!((unsigned.status, message(&unsigned)), (401, "API Key not valid"));
    let wrong_key_in_body =
        bay.post_json("/api/authenticate", &json!({ "key": "other", "client_id": "B", "case_id": "C" }));
    assert_eq!(wrong_key_in_body.status, 401);
    assert!(bay.standin.sessions().is_empty());
    assert_eq!(bay.standin.authenticate_calls(), cases.len() + 1);
}

#[test]
fn a_clock_skew_over_300_seconds_gets_the_skew_401_and_299_seconds_passes() {
    let bay = bay();
    let body = bay.authenticate_body("CASE-1");
    let signed_at = bay.timestamp();

    bay.clock.advance(Duration::from_secs(299));
    assert_eq!(
        bay.post_json_at("/api/authenticate", &body, &signed_at).status,
        200,
        "299 s behind is accepted"
    );
    bay.clock.advance(Duration::from_secs(1));
    assert_eq!(
        bay.post_json_at("/api/authenticate", &body, &signed_at).status,
        200,
        "300 s behind is accepted"
    );
    bay.clock.advance(Duration::from_secs(1));
    let late = bay.post_json_at("/api/authenticate", &body, &signed_at);
    assert_eq!((late.status, message(&late)), (401, "API-Token expired or clock skew too large"));

    let ahead = |secs: u64| rfc3339_seconds(bay.clock.wall() + Duration::from_secs(secs));
    assert_eq!(
        bay.post_json_at("/api/authenticate", &body, &ahead(299)).status,
        200,
        "299 s ahead is accepted"
    );
    let early = bay.post_json_at("/api/authenticate", &body, &ahead(301));
    assert_eq!((early.status, message(&early)), (401, "API-Token expired or clock skew too large"));

    // The stand-in's offset moves its now like a clock step would; the Date header follows.
    bay.standin.set_clock_offset(-400);
    let stepped = bay.post_json("/api/authenticate", &body);
    assert_eq!(stepped.status, 401);
    let shown = httpdate_secs(stepped.date.as_deref().expect("Date"));
    let expected = bay.clock.wall().duration_since(UNIX_EPOCH).unwrap().as_secs() - 400;
    assert_eq!(shown, expected);
}

/// Seconds since the epoch of an IMF-fixdate, enough to check the Date header.
fn httpdate_secs(date: &str) -> u64 {
    let parts: Vec<&str> = date.split([' ', ':']).collect();
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .iter()
        .position(|m| *m == parts[2])
        .expect("a month")
        + 1;
    let text = format!("{}-{:02}-{}T{}:{}:{}Z", parts[3], month, parts[1], parts[4], parts[5], parts[6]);
    humantime::parse_rfc3339(&text).expect("a date").duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn an_upload_with_the_access_token_or_another_sessions_token_gets_401() {
    let bay = bay();
    let session = bay.authenticate("CASE-1");
    let other = bay.authenticate("CASE-2");
    let sent = files(&["Front"], 3);

    let access = bay.upload_with(&session.access_token, &session, &sent, None);
    assert_eq!((access.status, message(&access)), (401, "Token expired"));
    let foreign = bay.upload_with(&other.refresh_token, &session, &sent, None);
    assert_eq!((foreign.status, message(&foreign)), (401, "Token expired"));
    let made_up = bay.upload_with("eyJhbGciOiJIUzI1NiJ9.e30.x", &session, &sent, None);
    assert_eq!(made_up.status, 401);
    let form = Form::new().text("type", "file").text("session", &session.id).text("case_id", "CASE-1");
    let missing = answer(bay.agent.post(bay.url("/api/upload")).send(form));
    assert_eq!((missing.status, message(&missing)), (401, "Token expired"));
    assert!(bay.standin.session(&session.id).unwrap().photos.is_empty());
}

#[test]
fn the_refresh_token_expires_after_token_ttl_and_when_all_tokens_are_expired() {
    let bay = bay();
    let session = bay.authenticate("CASE-1");
    bay.clock.advance(Duration::from_secs(899));
    assert_eq!(bay.upload(&session, &files(&["Front"], 1)).status, 200);
    bay.clock.advance(Duration::from_secs(2));
    let late = bay.upload(&session, &files(&["Rear"], 2));
    assert_eq!((late.status, message(&late)), (401, "Token expired"));

    let fresh = bay.authenticate("CASE-1");
    assert_eq!(bay.upload(&fresh, &files(&["Front"], 1)).status, 200);
    bay.standin.expire_all_tokens();
    let revoked = bay.upload(&fresh, &files(&["Rear"], 2));
    assert_eq!((revoked.status, message(&revoked)), (401, "Token expired"));
    let newest = bay.authenticate("CASE-1");
    assert_eq!(bay.upload(&newest, &files(&["Rear"], 2)).status, 200, "tokens issued later are valid");
}

#[test]
fn an_expired_session_gets_410_everywhere_and_shows_expired() {
    let bay = bay();
    let session = bay.authenticate("CASE-1");
    assert_eq!(bay.upload(&session, &files(&["Front"], 1)).status, 200);
    bay.clock.advance(Duration::from_secs(3600));
    let upload = bay.upload(&session, &files(&["Rear"], 2));
    assert_eq!((upload.status, message(&upload)), (410, "The requested Session Key has already expired"));
    let complete = bay.complete(&session, &["Front"]);
    assert_eq!((complete.status, message(&complete)), (410, "The requested Session Key has already expired"));
    assert_eq!(bay.get_session(&session.id).body["status"], "EXPIRED");
    assert_eq!(bay.standin.session(&session.id).unwrap().status, SessionStatus::Expired);

    let second = bay.authenticate("CASE-1");
    assert!(bay.standin.expire_session(&second.id));
    assert!(!bay.standin.expire_session("S-unknown"));
    assert_eq!(bay.upload(&second, &files(&["Front"], 1)).status, 410);
    assert_eq!(bay.get_session(&second.id).body["status"], "EXPIRED");
}

#[test]
fn a_consumed_session_refuses_uploads_with_409() {
    let bay = bay();
    let session = bay.authenticate("CASE-1");
    assert_eq!(bay.upload(&session, &files(&["Front"], 1)).status, 200);
    assert_eq!(bay.complete(&session, &["Front"]).status, 200);
    let late = bay.upload(&session, &files(&["Rear"], 2));
    assert_eq!((late.status, message(&late)), (409, "Session already consumed"));
    assert_eq!(bay.standin.session(&session.id).unwrap().labels(), ["Front"]);
}

#[test]
fn a_vin_that_is_too_short_gets_400_with_errors_under_vehicle_vin() {
    let bay = bay();
    let mut body = bay.authenticate_body("CASE-1");
    body["vehicle"]["vin"] = json!("JN1CV6AR9BM12345");
    let a = bay.post_json("/api/authenticate", &body);
    assert_eq!((a.status, message(&a)), (400, "Required fields are missing or invalid."));
    assert_eq!(a.body["errors"]["vehicle.vin"], json!(["VIN is too short, it must be 17 characters"]));

    for (vin, why) in
        [("JN1CV6AR9BM1234567", "too long"), ("JN1CV6AR9BMI23456", "I, O or Q"), ("jn1cv6ar9bm123456", "A-Z")]
    {
        body["vehicle"]["vin"] = json!(vin);
        let a = bay.post_json("/api/authenticate", &body);
        assert_eq!(a.status, 400, "{vin}");
        assert!(a.body["errors"]["vehicle.vin"][0].as_str().unwrap().contains(why), "{vin}: {}", a.body);
    }
    body["vehicle"] = json!({ "vin": VIN, "odom_unit": "FURLONGS", "colour": "red" });
    let a = bay.post_json("/api/authenticate", &body);
    assert_eq!(a.status, 400);
    assert!(
        a.body["errors"]["vehicle.odom_unit"].is_array() && a.body["errors"]["vehicle.colour"].is_array(),
        "{}",
        a.body
    );
    body["vehicle"] = json!({ "vin": VIN, "odom_unit": "MILES" });
    assert_eq!(bay.post_json("/api/authenticate", &body).status, 200);
    let without_vehicle = json!({ "key": bay.config.api_key, "client_id": "BAY-07", "case_id": "CASE-1" });
    assert_eq!(bay.post_json("/api/authenticate", &without_vehicle).status, 200);
    assert_eq!(bay.standin.sessions().len(), 2);
}

#[test]
fn an_invalid_case_id_gets_400_at_authenticate_and_a_mismatched_one_at_upload() {
    let bay = bay();
    for case_id in ["", "CASE 1", "CASE_1", "CASÉ", &"x".repeat(65)] {
        let a = bay.post_json("/api/authenticate", &bay.authenticate_body(case_id));
        assert_eq!(a.status, 400, "{case_id:?}");
        assert!(a.body["errors"]["case_id"].is_array(), "{}", a.body);
    }
    assert_eq!(bay.post_json("/api/authenticate", &bay.authenticate_body(&"x".repeat(64))).status, 200);
    let session = bay.authenticate("CASE-1");
    let fields = [("type", "file"), ("session", session.id.as_str()), ("case_id", "CASE-2")];
    let a = answer(bay.upload_raw(&bay.agent, &session.refresh_token, &fields, &files(&["Front"], 1), None));
    assert_eq!(a.status, 400);
    assert!(a.body["errors"]["case_id"].is_array(), "{}", a.body);
}

#[test]
fn an_upload_of_100_files_or_of_none_gets_400() {
    let bay = bay();
    let session = bay.authenticate("CASE-1");
    let hundred: Vec<(String, Vec<u8>)> = (0..100).map(|_| ("Front.jpg".to_owned(), jpeg(1))).collect();
    let too_many = bay.upload(&session, &hundred);
    assert_eq!(too_many.status, 400);
    assert!(message(&too_many).contains("99"), "{}", too_many.body);
    let none = bay.upload(&session, &[]);
    assert_eq!(none.status, 400, "{}", none.body);

    let wrong_name = bay.upload(&session, &[("front.jpg".to_owned(), jpeg(1))]);
    assert_eq!(wrong_name.status, 400, "labels are spelt exactly as the spec spells them");
    let twice = bay.upload(&session, &[("Front.jpg".to_owned(), jpeg(1)), ("Front.jpg".to_owned(), jpeg(2))]);
    assert_eq!(twice.status, 400);
    let fields = [("type", "files"), ("session", session.id.as_str()), ("case_id", "CASE-1")];
    let bad_type =
        answer(bay.upload_raw(&bay.agent, &session.refresh_token, &fields, &files(&["Front"], 1), None));
    assert_eq!(bad_type.status, 400);
    assert!(bay.standin.session(&session.id).unwrap().photos.is_empty());
}

#[test]
fn a_part_that_is_not_a_jpeg_gets_415_and_nothing_of_the_request_is_stored() {
    let bay = bay();
    let session = bay.authenticate("CASE-1");
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    let a = bay.upload(&session, &[("Front.jpg".to_owned(), jpeg(1)), ("Rear.jpg".to_owned(), png)]);
    assert_eq!(a.status, 415, "{}", a.body);
    assert_eq!(a.body["files"], json!(["Rear.jpg"]));
    let mut cut = jpeg(2);
    cut.truncate(cut.len() - 2);
    assert_eq!(bay.upload(&session, &[("Front.jpg".to_owned(), cut)]).status, 415, "a JPEG without EOI");
    let mut padded = jpeg(3);
    padded.extend_from_slice(&[0; 16]);
    assert_eq!(
        bay.upload(&session, &[("Front.jpg".to_owned(), padded)]).status,
        200,
        "zero padding after EOI is fine"
    );
    assert_eq!(bay.standin.session(&session.id).unwrap().labels(), ["Front"]);
}

#[test]
fn a_request_over_max_request_bytes_gets_413_and_the_client_reads_it() {
    let bay = bay_with(StandInConfig { max_request_bytes: 64 * 1024, ..StandInConfig::default() });
    let session = bay.authenticate("CASE-1");
    let mut big = jpeg(1);
    big.splice(2..2, std::iter::repeat_n(0u8, 200 * 1024));
    let a = bay.upload(&session, &[("Front.jpg".to_owned(), big)]);
    assert_eq!(a.status, 413, "{}", a.body);
    assert!(bay.standin.session(&session.id).unwrap().photos.is_empty());
    assert_eq!(bay.upload(&session, &files(&["Front"], 1)).status, 200);
}

#[test]
fn an_idempotent_replay_stores_once_and_gets_the_same_answer() {
    let bay = bay();
    let session = bay.authenticate("CASE-1");
    let sent = files(&["Front", "Rear"], 1);
    let first = bay.upload_with(&session.refresh_token, &session, &sent, Some("upload-0001"));
    assert_eq!(first.status, 200);
    let replay = bay.upload_with(&session.refresh_token, &session, &sent, Some("upload-0001"));
    assert_eq!((replay.status, &replay.body), (200, &first.body));
    let record = bay.standin.session(&session.id).unwrap();
    assert!(record.photos.iter().all(|p| p.stores == 1), "{record:?}");
    assert_eq!((record.upload_requests, record.idempotent_replays), (1, 1));

    let different =
        bay.upload_with(&session.refresh_token, &session, &files(&["Front", "Rear"], 9), Some("upload-0001"));
    assert_eq!(different.status, 422, "{}", different.body);
    let too_long = bay.upload_with(&session.refresh_token, &session, &sent, Some(&"k".repeat(129)));
    assert_eq!(too_long.status, 400);
    assert_eq!(bay.upload_with(&session.refresh_token, &session, &sent, Some(&"k".repeat(128))).status, 200);

    // Without a key, sending a label again replaces it and counts a second store.
    let replaced = files(&["Front"], 42);
    assert_eq!(bay.upload(&session, &replaced).status, 200);
    let front = bay.standin.session(&session.id).unwrap().photo("Front").cloned().unwrap();
    assert_eq!((front.sha256, front.stores), (sha256_hex(&replaced[0].1), 3));
}

#[test]
fn complete_with_a_label_never_received_gets_422_listing_it() {
    let bay = bay();
    let session = bay.authenticate("CASE-1");
    assert_eq!(bay.upload(&session, &files(&["Front", "Left"], 1)).status, 200);
    let a = bay.complete(&session, &["Front", "Rear", "Left", "Roof"]);
    assert_eq!(a.status, 422);
    assert_eq!(a.body, json!({ "message": "Missing photos", "missing": ["Rear", "Roof"] }));
    assert!(!bay.standin.session(&session.id).unwrap().completed);
    assert_eq!(bay.complete(&session, &["Front", "Sideways"]).status, 400);
    assert_eq!(bay.complete(&session, &[]).status, 400);
    let unknown = bay.post_json(
        "/api/complete",
        &json!({ "session": "S-00000000", "case_id": "CASE-1", "labels": ["Front"] }),
    );
    assert_eq!((unknown.status, message(&unknown)), (404, "Session S-00000000 cannot be found."));
    assert_eq!(bay.complete(&session, &["Front", "Left"]).status, 200);
}

#[test]
fn an_unknown_session_path_method_or_malformed_json_gets_the_spec_error() {
    let bay = bay();
    let a = bay.get_session("S-deadbeef");
    assert_eq!((a.status, message(&a)), (404, "Session S-deadbeef cannot be found."));
    assert_eq!(answer(bay.agent.get(bay.url("/api/nothing")).call()).status, 404);
    let wrong_method = answer(bay.agent.get(bay.url("/api/upload")).call());
    assert_eq!(wrong_method.status, 405);
    let ts = bay.timestamp();
    let malformed = answer(
        bay.agent
            .post(bay.url("/api/authenticate"))
            .header("API-Key", &bay.config.api_key)
            .header("API-Timestamp", &ts)
            .header("API-Token", &bay.token(&ts))
            .content_type("application/json")
            .send(&b"{\"key\": "[..]),
    );
    assert_eq!(malformed.status, 400);
    assert!(message(&malformed).starts_with("Malformed JSON"), "{}", malformed.body);
    assert!(malformed.date.is_some(), "every answer carries a Date header");
}

#[test]
fn an_injected_503_or_429_carries_retry_after_and_has_no_effect() {
    let bay = bay();
    let session = bay.authenticate("CASE-1");
    bay.standin.fail_next_uploads(1, 503, Duration::from_secs(7));
    bay.standin.fail_next_uploads(1, 429, Duration::from_secs(2));
    let unavailable = bay.upload(&session, &files(&["Front"], 1));
    assert_eq!((unavailable.status, unavailable.retry_after.as_deref()), (503, Some("7")));
    let limited = bay.upload(&session, &files(&["Front"], 1));
    assert_eq!((limited.status, limited.retry_after.as_deref()), (429, Some("2")));
    assert!(bay.standin.session(&session.id).unwrap().photos.is_empty());
    assert_eq!(bay.upload(&session, &files(&["Front"], 1)).status, 200);
    let faults: Vec<Option<FaultKind>> = bay.standin.requests().iter().map(|r| r.fault).collect();
    assert_eq!(faults.iter().filter(|f| **f == Some(FaultKind::Failed)).count(), 2);
}

#[test]
fn an_injected_reset_is_a_transport_error_and_the_next_request_is_answered() {
    let bay = bay();
    let session = bay.authenticate("CASE-1");
    bay.standin.reset_next_requests(1, Some("/api/upload"));
    let fields = [("type", "file"), ("session", session.id.as_str()), ("case_id", "CASE-1")];
    let reset = bay.upload_raw(&bay.agent, &session.refresh_token, &fields, &files(&["Front"], 1), None);
    assert!(reset.is_err(), "a reset connection is an error, not an answer");
    assert!(bay.standin.session(&session.id).unwrap().photos.is_empty());
    assert_eq!(bay.upload(&session, &files(&["Front"], 1)).status, 200);

    bay.standin.reset_next_requests(1, None);
    let ts = bay.timestamp();
    let any = bay
        .agent
        .get(bay.url(&format!("/v1/sessions/{}", session.id)))
        .header("API-Key", &bay.config.api_key)
        .header("API-Timestamp", &ts)
        .header("API-Token", &bay.token(&ts))
        .call();
    assert!(any.is_err());
    assert_eq!(bay.get_session(&session.id).status, 200);
    let resets = bay.standin.requests().iter().filter(|r| r.fault == Some(FaultKind::Reset)).count();
    assert_eq!(resets, 2);
}

#[test]
fn accept_then_drop_stores_the_files_but_the_client_sees_an_error_and_a_keyed_retry_stores_nothing_twice() {
    let bay = bay();
    let session = bay.authenticate("CASE-1");
    let sent = files(&["Front", "Rear"], 5);
    let fields = [("type", "file"), ("session", session.id.as_str()), ("case_id", "CASE-1")];
    bay.standin.drop_after_accepting_next_uploads(1);
    let lost = bay.upload_raw(&bay.agent, &session.refresh_token, &fields, &sent, Some("retry-me"));
    assert!(lost.is_err(), "the answer never arrives");
    let record = bay.standin.session(&session.id).unwrap();
    assert_eq!(record.labels(), ["Front", "Rear"]);

    let retry = bay.upload_with(&session.refresh_token, &session, &sent, Some("retry-me"));
    assert_eq!(retry.status, 200);
    assert_eq!(retry.body["received"], json!(["Front.jpg", "Rear.jpg"]));
    let record = bay.standin.session(&session.id).unwrap();
    assert!(record.photos.iter().all(|p| p.stores == 1), "{record:?}");
    let dropped =
        bay.standin.requests().iter().filter(|r| r.fault == Some(FaultKind::DroppedAfterAccepting)).count();
    assert_eq!(dropped, 1);
}

#[test]
fn a_stalled_request_times_out_its_client_while_another_request_is_answered() {
    let bay = bay();
    let session = bay.authenticate("CASE-1");
    bay.standin.stall_next_requests(1, Duration::from_secs(30), Some("/api/upload"));
    let impatient = agent(Duration::from_millis(400));
    let started = Instant::now();
    std::thread::scope(|scope| {
        let stalled = scope.spawn(|| {
            let fields = [("type", "file"), ("session", session.id.as_str()), ("case_id", "CASE-1")];
            bay.upload_raw(&impatient, &session.refresh_token, &fields, &files(&["Front"], 1), None)
        });
        // Meanwhile the stand-in answers others.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(bay.get_session(&session.id).status, 200);
        let result = stalled.join().expect("the client thread ends");
        assert!(matches!(result, Err(ureq::Error::Timeout(_))), "{:?}", result.map(|r| r.status()));
    });
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(bay.standin.session(&session.id).unwrap().photos.is_empty());
    assert_eq!(bay.upload(&session, &files(&["Front"], 1)).status, 200, "the stall applied once");
}

#[test]
fn stopping_the_stand_in_ends_stalled_connections_promptly() {
    let bay = bay();
    bay.standin.stall_next_requests(3, Duration::from_secs(600), None);
    let clients: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(bay.standin.addr()).expect("connect");
            s.write_all(b"GET /v1/sessions/S-1 HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
            s
        })
        .collect();
    // A stalled request is recorded as soon as the stall begins.
    let deadline = Instant::now() + Duration::from_secs(5);
    while bay.standin.requests().len() < 3 {
        assert!(Instant::now() < deadline, "three requests are held");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(bay.standin.requests().iter().all(|r| (r.status, r.fault) == (None, Some(FaultKind::Stalled))));
    let started = Instant::now();
    bay.standin.stop();
    assert!(started.elapsed() < Duration::from_secs(3), "stop took {:?}", started.elapsed());
    for mut client in clients {
        client.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let read = client.read(&mut [0u8; 64]);
        let still_open = matches!(&read, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
        assert!(
            !still_open && !matches!(read, Ok(n) if n > 0),
            "the client sees the connection end, unanswered: {read:?}"
        );
    }
}

#[test]
fn the_secret_never_crosses_the_wire_for_a_correct_client_and_any_leak_is_counted() {
    let bay = bay();
    let session = bay.authenticate("CASE-1");
    assert_eq!(bay.upload(&session, &files(&["Front"], 1)).status, 200);
    assert_eq!(bay.complete(&session, &["Front"]).status, 200);
    assert_eq!(bay.standin.secret_leaks(), 0);

    let secret = bay.config.api_secret.clone();
    let sloppy = bay.post_json_signed_as(
        "/api/authenticate",
        &bay.authenticate_body("CASE-2"),
        &bay.config.api_key,
        &secret,
        "x",
    );
    assert_eq!(sloppy.status, 401);
    assert_eq!(bay.standin.secret_leaks(), 1);

    // In a body, cut across TCP segments, twice.
    let body = format!("{{\"a\":\"{secret}\",\"b\":\"{secret}\"}}");
    let head = format!("POST /api/complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    let mut stream = TcpStream::connect(bay.standin.addr()).expect("connect");
    stream.write_all(head.as_bytes()).expect("head");
    stream.set_nodelay(true).expect("nodelay");
    for piece in body.as_bytes().chunks(5) {
        stream.write_all(piece).expect("body");
        stream.flush().expect("flush");
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    assert_eq!(bay.standin.secret_leaks(), 3);
    let last = bay.standin.requests().last().cloned().unwrap();
    assert_eq!((last.path.as_str(), last.secret_leaks), ("/api/complete", 2));
}

#[test]
fn hostile_raw_requests_are_refused_and_the_stand_in_keeps_serving() {
    let bay = bay();
    let chunked = raw_exchange(
        &bay,
        b"POST /api/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert!(chunked.starts_with("HTTP/1.1 411"), "{chunked}");
    let no_length = raw_exchange(&bay, b"POST /api/complete HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(no_length.starts_with("HTTP/1.1 411"), "{no_length}");
    let two_lengths = raw_exchange(
        &bay,
        b"POST /api/complete HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    );
    assert!(two_lengths.starts_with("HTTP/1.1 400"), "{two_lengths}");
    let huge_head = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let refused = raw_exchange(&bay, huge_head.as_bytes());
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
    let garbage = raw_exchange(&bay, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    let lying_length =
        raw_exchange(&bay, b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n");
    assert!(lying_length.starts_with("HTTP/1.1 413"), "{lying_length}");
    assert!(lying_length.contains("\r\nDate: "), "{lying_length}");

    let session = bay.authenticate("CASE-1");
    let body = "--b\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\nfile\r\n--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"Front.jpg\"\r\n\r\n\u{ff}";
    let request = format!(
        "POST /api/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {}\r\n\r\n{body}",
        session.refresh_token,
        body.len()
    );
    let truncated = raw_exchange(&bay, request.as_bytes());
    assert!(truncated.starts_with("HTTP/1.1 400"), "{truncated}");
    assert_eq!(bay.upload(&session, &files(&["Front"], 1)).status, 200);
}
