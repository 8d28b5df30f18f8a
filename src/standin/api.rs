//! The rules of the cloud API (`shared/spec/cloud-api.md`), as the stand-in enforces them:
//! routing, request signing, the three POST endpoints and the session query, over a state of
//! sessions, tokens and idempotency keys. No sockets here: a handler takes the parsed head,
//! the body and `now`, and returns a response.
//!
//! The checks are written from the spec, independently of the kiosk's own types in
//! `vehicle`, so that the stand-in and the client cross-check each other.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::http::{Head, Response};
use super::multipart;
use super::{PhotoRecord, RequestRecord, SessionRecord, SessionStatus, StandInConfig};

/// The photo labels of the spec, in the spec's order (GET lists photos in this order).
pub(crate) const LABELS: [&str; 15] = [
    "Front",
    "Front_Left",
    "Left",
    "Rear_Left",
    "Rear",
    "Rear_Right",
    "Right",
    "Front_Right",
    "VIN",
    "Odometer",
    "Interior",
    "Tires",
    "Windshield",
    "Undercarriage",
    "Roof",
];

/// Largest accepted clock difference between `API-Timestamp` and the stand-in's clock.
pub(crate) const MAX_SKEW: Duration = Duration::from_secs(300);
/// Bodies of the JSON endpoints are capped lower than uploads.
pub(crate) const JSON_BODY_CAP: u64 = 1024 * 1024;
/// Files per upload request.
const MAX_FILES: usize = 99;
/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 128;
/// Longest accepted text field of an upload.
const MAX_TEXT_FIELD: usize = 256;
/// How many request records are kept (the oldest go first).
const MAX_REQUEST_RECORDS: usize = 10_000;

const KEY_NOT_VALID: &str = "API Key not valid";
const SKEW: &str = "API-Token expired or clock skew too large";
const TOKEN_EXPIRED: &str = "Token expired";
const SESSION_EXPIRED: &str = "The requested Session Key has already expired";
const SESSION_CONSUMED: &str = "Session already consumed";
const INVALID_FIELDS: &str = "Required fields are missing or invalid.";

type HmacSha256 = Hmac<Sha256>;

/// What a request is for, once its method and path are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Authenticate,
    Upload,
    Complete,
    Session(String),
}

impl Route {
    /// The largest body this route accepts.
    pub fn body_cap(&self, config: &StandInConfig) -> u64 {
        match self {
            Route::Upload => config.max_request_bytes,
            _ => config.max_request_bytes.min(JSON_BODY_CAP),
        }
    }
}

/// Finds the route, or answers 404 (unknown path) or 405 (known path, wrong method).
pub(crate) fn route(method: &str, path: &str) -> Result<Route, Response> {
    let (route, allow) = match path {
        "/api/authenticate" => (Route::Authenticate, "POST"),
        "/api/upload" => (Route::Upload, "POST"),
        "/api/complete" => (Route::Complete, "POST"),
        _ => match path.strip_prefix("/v1/sessions/") {
            Some(id) if !id.is_empty() && !id.contains('/') => (Route::Session(id.to_owned()), "GET"),
            _ => return Err(Response::message(404, format!("No such endpoint: {}", shorten(path)))),
        },
    };
    if method == allow {
        Ok(route)
    } else {
        let mut response = Response::message(405, format!("{} takes {allow}, not {}", path, shorten(method)));
        response.allow = Some(allow);
        Err(response)
    }
}

/// Lowercase hex of HMAC-SHA256(key = api_secret, message = `"{username}:{api_key}@{timestamp}"`):
/// the `API-Token` the stand-in expects (spec section 1).
pub fn expected_token(api_secret: &[u8], username: &str, api_key: &str, timestamp: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(api_secret).expect("HMAC accepts keys of any length");
    mac.update(format!("{username}:{api_key}@{timestamp}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Everything the stand-in remembers.
pub(crate) struct State {
    sessions: HashMap<String, Session>,
    /// Session ids in creation order.
    order: Vec<String>,
    tokens: HashMap<String, Token>,
    idempotency: HashMap<String, Remembered>,
    pub authenticate_calls: usize,
    pub requests: VecDeque<RequestRecord>,
    pub secret_leaks: usize,
    entropy: Entropy,
}

struct Session {
    id: String,
    case_id: String,
    client_id: String,
    vehicle: Option<Value>,
    created_at: SystemTime,
    expires_at: SystemTime,
    expired_by_hand: bool,
    /// By index into [`LABELS`].
    photos: BTreeMap<usize, Photo>,
    completions: usize,
    /// `/api/complete` calls refused `409` because the session was already consumed.
    completes_after_consumed: usize,
    completed_labels: Vec<String>,
    upload_requests: usize,
    replays: usize,
}

struct Photo {
    sha256: String,
    bytes: u64,
    stores: usize,
}

#[derive(Clone)]
struct Token {
    session: String,
    refresh: bool,
    expires_at: SystemTime,
    revoked: bool,
}

/// An answered upload, kept under its `Idempotency-Key`.
struct Remembered {
    digest: [u8; 32],
    response: Response,
}

impl Session {
    fn completed(&self) -> bool {
        self.completions > 0
    }

    /// A completed session stays `PROCESS`; only an open one expires.
    fn expired(&self, now: SystemTime) -> bool {
        !self.completed() && (self.expired_by_hand || now >= self.expires_at)
    }

    fn status(&self, now: SystemTime) -> SessionStatus {
        if self.completed() {
            SessionStatus::Process
        } else if self.expired(now) {
            SessionStatus::Expired
        } else if self.photos.is_empty() {
            SessionStatus::Idle
        } else {
            SessionStatus::Started
        }
    }

    fn record(&self, now: SystemTime) -> SessionRecord {
        SessionRecord {
            session: self.id.clone(),
            case_id: self.case_id.clone(),
            client_id: self.client_id.clone(),
            vehicle: self.vehicle.clone(),
            status: self.status(now),
            photos: self
                .photos
                .iter()
                .map(|(i, p)| PhotoRecord {
                    label: LABELS[*i].to_owned(),
                    sha256: p.sha256.clone(),
                    bytes: p.bytes,
                    stores: p.stores,
                })
                .collect(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            completed: self.completed(),
            completions: self.completions,
            completes_after_consumed: self.completes_after_consumed,
            completed_labels: self.completed_labels.clone(),
            upload_requests: self.upload_requests,
            idempotent_replays: self.replays,
        }
    }
}

impl State {
    pub fn new() -> State {
        State {
            sessions: HashMap::new(),
            order: Vec::new(),
            tokens: HashMap::new(),
            idempotency: HashMap::new(),
            authenticate_calls: 0,
            requests: VecDeque::new(),
            secret_leaks: 0,
            entropy: Entropy::new(),
        }
    }

    pub fn session(&self, id: &str, now: SystemTime) -> Option<SessionRecord> {
        self.sessions.get(id).map(|s| s.record(now))
    }

    pub fn sessions(&self, now: SystemTime) -> Vec<SessionRecord> {
        self.order.iter().filter_map(|id| self.sessions.get(id)).map(|s| s.record(now)).collect()
    }

    pub fn push_request(&mut self, record: RequestRecord) {
        if self.requests.len() == MAX_REQUEST_RECORDS {
            self.requests.pop_front();
        }
        self.requests.push_back(record);
    }

    /// Every token issued so far (access and refresh), in no order.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.tokens.keys().cloned().collect()
    }

    pub fn expire_all_tokens(&mut self) {
        for token in self.tokens.values_mut() {
            token.revoked = true;
        }
    }

    pub fn expire_session(&mut self, id: &str) -> bool {
        match self.sessions.get_mut(id) {
            Some(session) => {
                session.expired_by_hand = true;
                true
            }
            None => false,
        }
    }
}

/// Answers one routed request.
pub(crate) fn handle(
    state: &Mutex<State>,
    config: &StandInConfig,
    route: &Route,
    head: &Head,
    body: &[u8],
    now: SystemTime,
) -> Response {
    let answer = match route {
        Route::Authenticate => authenticate(state, config, head, body, now),
        Route::Upload => upload(state, head, body, now),
        Route::Complete => complete(state, config, head, body, now),
        Route::Session(id) => query_session(state, config, head, id, now),
    };
    answer.unwrap_or_else(|refusal| refusal)
}

pub(crate) fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every mutation completes before the guard drops; a panic elsewhere leaves a usable state.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Signing (spec section 1)

fn check_signature(config: &StandInConfig, head: &Head, now: SystemTime) -> Result<(), Response> {
    let not_valid = |detail: &str| Response::json(401, json!({ "message": KEY_NOT_VALID, "detail": detail }));
    let (Ok(Some(key)), Ok(Some(timestamp)), Ok(Some(token))) =
        (head.unique("API-Key"), head.unique("API-Timestamp"), head.unique("API-Token"))
    else {
        return Err(not_valid("API-Key, API-Timestamp and API-Token are each required exactly once"));
    };
    if !constant_time_eq(key.as_bytes(), config.api_key.as_bytes()) {
        return Err(not_valid("unknown API-Key"));
    }
    let Some(stamp) = parse_api_timestamp(timestamp) else {
        return Err(not_valid("API-Timestamp must be YYYY-MM-DDTHH:MM:SSZ"));
    };
    let Some(provided) = decode_lowercase_hex(token) else {
        return Err(not_valid("API-Token must be 64 lowercase hex digits"));
    };
    let mut mac =
        HmacSha256::new_from_slice(config.api_secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(format!("{}:{}@{}", config.username, config.api_key, timestamp).as_bytes());
    // `verify_slice` compares in constant time.
    if mac.verify_slice(&provided).is_err() {
        return Err(not_valid("API-Token does not match"));
    }
    let skew = match now.duration_since(stamp) {
        Ok(behind) => behind,
        Err(ahead) => ahead.duration(),
    };
    if skew > MAX_SKEW {
        return Err(Response::message(401, SKEW));
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SSZ` exactly, and a real instant.
fn parse_api_timestamp(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    let shape_ok = b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    if !shape_ok {
        return None;
    }
    crate::clock::parse_rfc3339_utc(text).ok()
}

fn decode_lowercase_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    hex::decode(text).ok()
}

/// Equal length and equal bytes, in time that depends only on the length.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------------------------
// POST /api/authenticate (spec section 2)

fn authenticate(
    state: &Mutex<State>,
    config: &StandInConfig,
    head: &Head,
    body: &[u8],
    now: SystemTime,
) -> Result<Response, Response> {
    lock(state).authenticate_calls += 1;
    check_signature(config, head, now)?;
    let object = json_object(head, body)?;
    let mut errors = Errors::default();
    for key in object.keys() {
        if !["key", "client_id", "case_id", "vehicle"].contains(&key.as_str()) {
            errors.add(key, "unknown field");
        }
    }
    match object.get("key") {
        None | Some(Value::Null) => errors.add("key", "key is required"),
        Some(Value::String(key)) if !constant_time_eq(key.as_bytes(), config.api_key.as_bytes()) => {
            return Err(Response::json(
                401,
                json!({ "message": KEY_NOT_VALID, "detail": "the body's key is not the account's API key" }),
            ));
        }
        Some(Value::String(_)) => {}
        Some(_) => errors.add("key", "key must be a string"),
    }
    let client_id = required_string(&object, "client_id", &mut errors);
    if let Some(id) = &client_id {
        if id.is_empty() || id.chars().count() > 64 || id.chars().any(char::is_control) {
            errors.add("client_id", "client_id must be 1-64 characters without control characters");
        }
    }
    let case_id = required_string(&object, "case_id", &mut errors);
    if let Some(case_id) = &case_id {
        if let Err(why) = check_case_id(case_id) {
            errors.add("case_id", why);
        }
    }
    let vehicle = match object.get("vehicle") {
        None | Some(Value::Null) => None,
        Some(Value::Object(v)) => {
            check_vehicle(v, &mut errors);
            Some(Value::Object(v.clone()))
        }
        Some(_) => {
            errors.add("vehicle", "vehicle must be an object");
            None
        }
    };
    errors.into_result()?;
    let (Some(client_id), Some(case_id)) = (client_id, case_id) else {
        return Err(Response::message(400, INVALID_FIELDS));
    };

    let mut st = lock(state);
    let id = loop {
        let candidate = format!("S-{}", hex::encode(&st.entropy.next()[..4]));
        if !st.sessions.contains_key(&candidate) {
            break candidate;
        }
    };
    let token_expiry = now + config.token_ttl;
    let access_token = st.entropy.jwt("access", &id, now, token_expiry);
    let refresh_token = st.entropy.jwt("refresh", &id, now, token_expiry);
    for (token, refresh) in [(&access_token, false), (&refresh_token, true)] {
        st.tokens.insert(
            token.clone(),
            Token { session: id.clone(), refresh, expires_at: token_expiry, revoked: false },
        );
    }
    st.sessions.insert(
        id.clone(),
        Session {
            id: id.clone(),
            case_id,
            client_id,
            vehicle,
            created_at: now,
            expires_at: now + config.session_ttl,
            expired_by_hand: false,
            photos: BTreeMap::new(),
            completions: 0,
            completes_after_consumed: 0,
            completed_labels: Vec::new(),
            upload_requests: 0,
            replays: 0,
        },
    );
    st.order.push(id.clone());
    Ok(Response::json(
        200,
        json!({
            "session": id,
            "access_token": access_token,
            "refresh_token": refresh_token,
            "expires_in": config.token_ttl.as_secs(),
        }),
    ))
}

fn check_case_id(case_id: &str) -> Result<(), &'static str> {
    let ok = !case_id.is_empty()
        && case_id.len() <= 64
        && case_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err("case_id must be 1-64 characters of A-Z, a-z, 0-9 and -")
    }
}

fn check_vehicle(vehicle: &Map<String, Value>, errors: &mut Errors) {
    const TEXTS: [&str; 7] = ["make", "model", "body_type", "trim", "transmission", "ext_col", "int_col"];
    for key in vehicle.keys() {
        let known = ["vin", "year", "odom_reading", "odom_unit"].contains(&key.as_str())
            || TEXTS.contains(&key.as_str());
        if !known {
            errors.add(&format!("vehicle.{key}"), "unknown vehicle attribute");
        }
    }
    match vehicle.get("vin") {
        None | Some(Value::Null) => errors.add("vehicle.vin", "VIN is required when a vehicle is given"),
        Some(Value::String(vin)) => {
            let len = vin.chars().count();
            if len < 17 {
                errors.add("vehicle.vin", "VIN is too short, it must be 17 characters");
            } else if len > 17 {
                errors.add("vehicle.vin", "VIN is too long, it must be 17 characters");
            } else if !vin
                .bytes()
                .all(|b| (b.is_ascii_uppercase() && !b"IOQ".contains(&b)) || b.is_ascii_digit())
            {
                errors.add("vehicle.vin", "VIN may only contain A-Z and 0-9, without I, O or Q");
            }
        }
        Some(_) => errors.add("vehicle.vin", "VIN must be a string"),
    }
    match vehicle.get("year") {
        None | Some(Value::Null) => {}
        Some(year) => {
            if !year.as_u64().is_some_and(|y| (1886..=2100).contains(&y)) {
                errors.add("vehicle.year", "year must be a whole number from 1886 to 2100");
            }
        }
    }
    for key in TEXTS {
        match vehicle.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(text))
                if text.chars().count() <= 128 && !text.chars().any(char::is_control) => {}
            Some(_) => {
                errors.add(&format!("vehicle.{key}"), "must be a string of at most 128 printable characters")
            }
        }
    }
    match vehicle.get("odom_reading") {
        None | Some(Value::Null) => {}
        Some(reading) if reading.as_u64().is_some() => {}
        Some(_) => errors.add("vehicle.odom_reading", "odom_reading must be a non-negative whole number"),
    }
    match vehicle.get("odom_unit") {
        None | Some(Value::Null) => {}
        Some(Value::String(unit)) if unit == "KILOMETRES" || unit == "MILES" => {}
        Some(_) => errors.add("vehicle.odom_unit", "odom_unit must be KILOMETRES or MILES"),
    }
}

// ---------------------------------------------------------------------------------------------
// POST /api/upload (spec section 3)

/// One checked file of an upload.
struct File {
    label: usize,
    filename: String,
    sha256: String,
    bytes: u64,
}

fn upload(state: &Mutex<State>, head: &Head, body: &[u8], now: SystemTime) -> Result<Response, Response> {
    let token_refused =
        |detail: &str| Response::json(401, json!({ "message": TOKEN_EXPIRED, "detail": detail }));
    let bearer = match head.unique("Authorization") {
        Ok(Some(value)) => value
            .split_once(' ')
            .filter(|(scheme, token)| scheme.eq_ignore_ascii_case("Bearer") && !token.trim().is_empty())
            .map(|(_, token)| token.trim().to_owned()),
        _ => None,
    };
    let Some(bearer) = bearer else {
        return Err(token_refused("Authorization: Bearer <refresh_token> is required exactly once"));
    };
    let idempotency_key = match head.unique("Idempotency-Key") {
        Ok(None) => None,
        Ok(Some(key))
            if !key.is_empty()
                && key.len() <= MAX_IDEMPOTENCY_KEY
                && key.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Some(key.to_owned())
        }
        _ => {
            return Err(Response::message(
                400,
                format!("Idempotency-Key must appear at most once and be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
            ));
        }
    };
    let content_type = match head.unique("Content-Type") {
        Ok(Some(ct)) => ct,
        _ => return Err(Response::message(400, "Content-Type must be multipart/form-data with a boundary")),
    };
    let boundary = multipart::boundary(content_type).map_err(|why| Response::message(400, why))?;
    let parts = multipart::parse(body, &boundary).map_err(|why| Response::message(400, why))?;

    let mut fields: BTreeMap<&str, String> = BTreeMap::new();
    let mut raw_files = Vec::new();
    for part in &parts {
        match (part.name.as_str(), &part.filename) {
            ("files", Some(filename)) => raw_files.push((filename.clone(), part.data)),
            ("files", None) => return Err(Response::message(400, "every files part needs a filename")),
            (name @ ("type" | "session" | "case_id"), None) => {
                let value = std::str::from_utf8(part.data)
                    .ok()
                    .filter(|v| v.len() <= MAX_TEXT_FIELD)
                    .ok_or_else(|| {
                        Response::message(
                            400,
                            format!("{name} must be UTF-8 text of at most {MAX_TEXT_FIELD} bytes"),
                        )
                    })?;
                if fields.insert(name, value.to_owned()).is_some() {
                    return Err(Response::message(400, format!("the field {name} appears twice")));
                }
            }
            (name @ ("type" | "session" | "case_id"), Some(_)) => {
                return Err(Response::message(400, format!("{name} must be a text field, not a file")));
            }
            (other, _) => return Err(Response::message(400, format!("unknown field {}", shorten(other)))),
        }
    }
    let mut errors = Errors::default();
    match fields.get("type").map(String::as_str) {
        Some("file") => {}
        Some(_) => errors.add("type", "type must be file"),
        None => errors.add("type", "type is required"),
    }
    let session_id = fields.get("session").cloned().unwrap_or_default();
    if session_id.is_empty() {
        errors.add("session", "session is required");
    }
    let case_id = fields.get("case_id").cloned().unwrap_or_default();
    if let Err(why) = check_case_id(&case_id) {
        errors.add("case_id", why);
    }
    errors.into_result()?;
    if raw_files.is_empty() {
        return Err(Response::message(400, "at least one files part is required"));
    }
    if raw_files.len() > MAX_FILES {
        return Err(Response::message(
            400,
            format!("at most {MAX_FILES} files per request, got {}", raw_files.len()),
        ));
    }
    let mut files = Vec::with_capacity(raw_files.len());
    let mut not_jpeg = Vec::new();
    for (filename, data) in raw_files {
        let label = filename
            .strip_suffix(".jpg")
            .and_then(|l| LABELS.iter().position(|known| *known == l))
            .ok_or_else(|| {
            Response::message(
                400,
                format!("filename {} is not {{photo_label}}.jpg with a spec label", shorten(&filename)),
            )
        })?;
        if files.iter().any(|f: &File| f.label == label) {
            return Err(Response::message(400, format!("{filename} appears twice in one request")));
        }
        if !is_jpeg(data) {
            not_jpeg.push(filename.clone());
        }
        let sha256 = hex::encode(Sha256::digest(data));
        files.push(File { label, filename, sha256, bytes: data.len() as u64 });
    }
    if !not_jpeg.is_empty() {
        return Err(Response::json(
            415,
            json!({ "message": format!("Not a JPEG image: {}", not_jpeg.join(", ")), "files": not_jpeg }),
        ));
    }
    let digest = request_digest(&session_id, &case_id, &files);

    let mut st = lock(state);
    let st = &mut *st;
    let token = st.tokens.get(&bearer).cloned().ok_or_else(|| token_refused("unknown token"))?;
    if !token.refresh {
        return Err(token_refused(
            "this is an access token; /api/upload takes the refresh token as its bearer",
        ));
    }
    if token.session != session_id {
        return Err(token_refused("the token belongs to another session"));
    }
    let session = st.sessions.get_mut(&session_id).ok_or_else(|| token_refused("unknown session"))?;
    if session.completed() {
        return Err(Response::message(409, SESSION_CONSUMED));
    }
    if session.expired(now) {
        return Err(Response::message(410, SESSION_EXPIRED));
    }
    if token.revoked || now >= token.expires_at {
        return Err(token_refused("the refresh token has expired"));
    }
    if case_id != session.case_id {
        let mut errors = Errors::default();
        errors.add("case_id", "case_id does not match the session's case_id");
        errors.into_result()?;
    }
    if let Some(key) = &idempotency_key {
        if let Some(earlier) = st.idempotency.get(key) {
            if earlier.digest != digest {
                return Err(Response::message(
                    422,
                    "Idempotency-Key was already used for a different request (other session, case_id or files)",
                ));
            }
            session.replays += 1;
            return Ok(earlier.response.clone());
        }
    }
    for file in &files {
        let photo =
            session.photos.entry(file.label).or_insert(Photo { sha256: String::new(), bytes: 0, stores: 0 });
        photo.sha256.clone_from(&file.sha256);
        photo.bytes = file.bytes;
        photo.stores += 1;
    }
    session.upload_requests += 1;
    let received: Vec<&str> = files.iter().map(|f| f.filename.as_str()).collect();
    let response = Response::json(200, json!({ "session": session_id, "received": received }));
    if let Some(key) = idempotency_key {
        st.idempotency.insert(key, Remembered { digest, response: response.clone() });
    }
    Ok(response)
}

/// Starts with SOI and a marker, ends with EOI (trailing zero padding allowed).
fn is_jpeg(data: &[u8]) -> bool {
    let end = data.len() - data.iter().rev().take_while(|b| **b == 0).count();
    let trimmed = &data[..end];
    trimmed.len() >= 5 && trimmed.starts_with(&[0xFF, 0xD8, 0xFF]) && trimmed.ends_with(&[0xFF, 0xD9])
}

/// What makes two uploads "the same request" for an idempotency key.
fn request_digest(session: &str, case_id: &str, files: &[File]) -> [u8; 32] {
    let mut h = Sha256::new();
    for piece in [session, case_id] {
        h.update(piece.as_bytes());
        h.update([0]);
    }
    for file in files {
        h.update(file.filename.as_bytes());
        h.update([0]);
        h.update(file.sha256.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

// ---------------------------------------------------------------------------------------------
// POST /api/complete (spec section 4)

fn complete(
    state: &Mutex<State>,
    config: &StandInConfig,
    head: &Head,
    body: &[u8],
    now: SystemTime,
) -> Result<Response, Response> {
    check_signature(config, head, now)?;
    let object = json_object(head, body)?;
    let mut errors = Errors::default();
    for key in object.keys() {
        if !["session", "case_id", "labels"].contains(&key.as_str()) {
            errors.add(key, "unknown field");
        }
    }
    let session_id = required_string(&object, "session", &mut errors);
    let case_id = required_string(&object, "case_id", &mut errors);
    let mut labels: Vec<(usize, String)> = Vec::new();
    match object.get("labels") {
        Some(Value::Array(items)) if !items.is_empty() => {
            for item in items {
                let found = item.as_str().and_then(|l| LABELS.iter().position(|known| *known == l));
                match found {
                    Some(i) if labels.iter().any(|(j, _)| *j == i) => {
                        errors.add("labels", &format!("{} is listed twice", LABELS[i]));
                    }
                    Some(i) => labels.push((i, LABELS[i].to_owned())),
                    None => {
                        errors.add("labels", &format!("{} is not a photo label", shorten(&item.to_string())))
                    }
                }
            }
        }
        Some(Value::Array(_)) => errors.add("labels", "labels must not be empty"),
        None | Some(Value::Null) => errors.add("labels", "labels is required"),
        Some(_) => errors.add("labels", "labels must be an array of photo labels"),
    }
    errors.into_result()?;
    let (Some(session_id), Some(case_id)) = (session_id, case_id) else {
        return Err(Response::message(400, INVALID_FIELDS));
    };

    let mut st = lock(state);
    let session = st.sessions.get_mut(&session_id).ok_or_else(|| not_found(&session_id))?;
    if case_id != session.case_id {
        let mut errors = Errors::default();
        errors.add("case_id", "case_id does not match the session's case_id");
        errors.into_result()?;
    }
    if session.completed() {
        session.completes_after_consumed += 1;
        return Err(Response::message(409, SESSION_CONSUMED));
    }
    if session.expired(now) {
        return Err(Response::message(410, SESSION_EXPIRED));
    }
    let missing: Vec<&str> =
        labels.iter().filter(|(i, _)| !session.photos.contains_key(i)).map(|(_, l)| l.as_str()).collect();
    if !missing.is_empty() {
        return Err(Response::json(422, json!({ "message": "Missing photos", "missing": missing })));
    }
    session.completions += 1;
    session.completed_labels = labels.into_iter().map(|(_, l)| l).collect();
    Ok(Response::json(200, json!({ "session": session_id, "status": "PROCESS" })))
}

// ---------------------------------------------------------------------------------------------
// GET /v1/sessions/{session} (spec section 5)

fn query_session(
    state: &Mutex<State>,
    config: &StandInConfig,
    head: &Head,
    id: &str,
    now: SystemTime,
) -> Result<Response, Response> {
    check_signature(config, head, now)?;
    let st = lock(state);
    let session = st.sessions.get(id).ok_or_else(|| not_found(id))?;
    let photos: Vec<Value> = session
        .photos
        .iter()
        .map(|(i, p)| json!({ "photo_label": LABELS[*i], "sha256": p.sha256, "bytes": p.bytes }))
        .collect();
    Ok(Response::json(
        200,
        json!({
            "session_key": session.id,
            "case_id": session.case_id,
            "status": session.status(now).as_str(),
            "photos": photos,
            "created_at": crate::clock::rfc3339_seconds(session.created_at),
            "expires_at": crate::clock::rfc3339_seconds(session.expires_at),
        }),
    ))
}

fn not_found(id: &str) -> Response {
    Response::message(404, format!("Session {} cannot be found.", shorten(id)))
}

// ---------------------------------------------------------------------------------------------
// Shared pieces

/// The body as a JSON object, or 415 (not `application/json`) or 400 (not a JSON object).
fn json_object(head: &Head, body: &[u8]) -> Result<Map<String, Value>, Response> {
    let is_json = matches!(
        head.unique("Content-Type"),
        Ok(Some(ct)) if ct.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    );
    if !is_json {
        return Err(Response::message(415, "Content-Type must be application/json"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(Response::message(400, "Malformed JSON: the body must be a JSON object")),
        Err(e) => Err(Response::message(400, format!("Malformed JSON: {e}"))),
    }
}

fn required_string(object: &Map<String, Value>, key: &str, errors: &mut Errors) -> Option<String> {
    match object.get(key) {
        Some(Value::String(s)) => Some(s.clone()),
        None | Some(Value::Null) => {
            errors.add(key, &format!("{key} is required"));
            None
        }
        Some(_) => {
            errors.add(key, &format!("{key} must be a string"));
            None
        }
    }
}

/// PAVE's validation errors: field name to messages.
#[derive(Default)]
struct Errors(BTreeMap<String, Vec<String>>);

impl Errors {
    fn add(&mut self, field: &str, message: &str) {
        self.0.entry(shorten(field)).or_default().push(message.to_owned());
    }

    fn into_result(self) -> Result<(), Response> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Response::json(400, json!({ "message": INVALID_FIELDS, "errors": self.0 })))
        }
    }
}

fn shorten(value: &str) -> String {
    let mut out: String = value.chars().take(80).collect();
    if out.len() < value.len() {
        out.push('…');
    }
    out
}

/// Unpredictable ids and tokens without a random-number crate: SHA-256 over a seed drawn
/// from the standard library's randomly keyed hasher, and a counter.
struct Entropy {
    seed: [u8; 32],
    counter: u64,
}

impl Entropy {
    fn new() -> Entropy {
        let mut h = Sha256::new();
        for i in 0u64..4 {
            let mut hasher = RandomState::new().build_hasher();
            hasher.write_u64(i);
            h.update(hasher.finish().to_le_bytes());
        }
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        h.update(since_epoch.as_nanos().to_le_bytes());
        h.update(std::process::id().to_le_bytes());
        Entropy { seed: h.finalize().into(), counter: 0 }
    }

    fn next(&mut self) -> [u8; 32] {
        self.counter += 1;
        let mut h = Sha256::new();
        h.update(self.seed);
        h.update(self.counter.to_le_bytes());
        h.finalize().into()
    }

    /// A JWT-shaped opaque token (HS256 over the stand-in's own seed). Only the stand-in's
    /// table decides whether it is valid; the claims are for people reading logs of tests.
    fn jwt(&mut self, kind: &str, session: &str, issued: SystemTime, expires: SystemTime) -> String {
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let header = base64url(br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = json!({
            "sub": session,
            "typ": kind,
            "iat": secs(issued),
            "exp": secs(expires),
            "jti": hex::encode(&self.next()[..12]),
        });
        let payload = base64url(claims.to_string().as_bytes());
        let signing_input = format!("{header}.{payload}");
        let mut mac = HmacSha256::new_from_slice(&self.seed).expect("HMAC accepts keys of any length");
        mac.update(signing_input.as_bytes());
        format!("{signing_input}.{}", base64url(&mac.finalize().into_bytes()))
    }
}

fn base64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_matches_an_independent_hmac_vector() {
        // `printf %s 'kiosk-test:test-api-key-0001@2026-11-21T10:00:03Z' | openssl dgst -sha256 -hmac SECRET`
        assert_eq!(
            expected_token(
                b"standin-secret-do-not-send",
                "kiosk-test",
                "test-api-key-0001",
                "2026-11-21T10:00:03Z"
            ),
            "bbd0e598c03e6e4be89f643622f62d081e38b16fcbebf93465853c18dd13a184"
        );
    }

    fn check_timestamp(text: &str, ok: bool) {
        assert_eq!(parse_api_timestamp(text).is_some(), ok, "{text:?}");
    }

    #[test]
    fn api_timestamps_must_have_exactly_the_spec_shape() {
        check_timestamp("2026-11-21T10:00:03Z", true);
        check_timestamp("2026-11-21T10:00:03.000Z", false);
        check_timestamp("2026-11-21T10:00:03+00:00", false);
        check_timestamp("2026-11-21 10:00:03Z", false);
        check_timestamp("2026-11-21t10:00:03z", false);
        check_timestamp("2026-13-21T10:00:03Z", false);
        check_timestamp("2026-02-30T10:00:03Z", false);
        check_timestamp("", false);
        // Past the end of a 32-bit time_t: a 32-bit board running the stand-in reads them too.
        check_timestamp("2038-01-19T03:14:08Z", true);
        check_timestamp("2099-12-31T23:59:59Z", true);
    }

    #[test]
    fn a_request_signed_after_2038_is_judged_like_any_other() {
        let config = StandInConfig::default();
        let secret = crate::upload::credentials::Secret::new(config.api_secret.clone());
        let sent = UNIX_EPOCH + Duration::from_secs(2_208_988_800); // 2040-01-01T00:00:00Z
        let signature = crate::upload::signing::sign(&secret, &config.username, &config.api_key, sent);
        let head = Head {
            method: "POST".into(),
            path: "/api/authenticate".into(),
            headers: vec![
                ("API-Key".into(), signature.api_key),
                ("API-Timestamp".into(), signature.timestamp),
                ("API-Token".into(), signature.token),
            ],
        };
        assert!(check_signature(&config, &head, sent + Duration::from_secs(5)).is_ok());
        let late = check_signature(&config, &head, sent + Duration::from_secs(600)).unwrap_err();
        assert_eq!((late.status, late.body["message"].as_str()), (401, Some(SKEW)));
    }

    #[test]
    fn routes_know_404_from_405() {
        assert_eq!(route("POST", "/api/upload"), Ok(Route::Upload));
        assert_eq!(route("GET", "/v1/sessions/S-1"), Ok(Route::Session("S-1".into())));
        assert_eq!(route("GET", "/api/upload").unwrap_err().status, 405);
        assert_eq!(route("POST", "/v1/sessions/S-1").unwrap_err().allow, Some("GET"));
        assert_eq!(route("GET", "/v1/sessions/").unwrap_err().status, 404);
        assert_eq!(route("GET", "/v1/sessions/S-1/x").unwrap_err().status, 404);
        assert_eq!(route("POST", "/api/upload/").unwrap_err().status, 404);
    }

    #[test]
    fn jpeg_sniffing_wants_soi_and_eoi() {
        assert!(is_jpeg(&[0xFF, 0xD8, 0xFF, 0xE0, 0xFF, 0xD9]));
        assert!(is_jpeg(&[0xFF, 0xD8, 0xFF, 0xE0, 0xFF, 0xD9, 0, 0, 0]));
        assert!(!is_jpeg(&[0xFF, 0xD8, 0xFF, 0xE0, 0xFF]));
        assert!(!is_jpeg(b"\x89PNG\r\n\x1a\n"));
        assert!(!is_jpeg(&[]));
        assert!(!is_jpeg(&[0, 0, 0]));
    }

    #[test]
    fn base64url_has_no_padding() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
