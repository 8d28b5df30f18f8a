//! The HTTP client of the cloud API: one method per call of the contract, each one request with
//! a deadline. It decides nothing about retries (that is [`super::uploader`]); it reports what
//! the server said as a [`Failure`] carrying the [`Verdict`], and it learns the server's clock
//! from the `Date` header of every answer.
//!
//! Trust: the cloud's certificate must chain to the roots `[cloud] trust` names (the bundled
//! Mozilla set by default, the system's store, or both) or to a certificate of `[cloud] ca_file`.
//! A certificate refused is a network failure like any other: nothing is lost, the images wait
//! in the buffer, and the message names the host and what was wrong with its certificate.
//!
//! Secrets: the API secret signs but never travels; the tokens travel only in the
//! `Authorization` header of `/api/upload`. Neither is ever put in an error, a log line or a
//! `Debug` output: [`Tokens`] redacts itself, and errors carry the server's `message` only.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::credentials::Secret;
use super::policy::{classify, judge_clock, ClockTrust, Verdict};
use super::signing::sign;
use crate::clock::Clock;
use crate::config::CloudConfig;
use crate::trust::Roots;
use crate::vehicle::PhotoLabel;

/// The largest answer body read; the API's answers are small JSON documents.
const MAX_ANSWER_BYTES: u64 = 1 << 20;

/// Told that the client is working: before each request with the request's deadline (the
/// client may be silent that long, waiting is progress), and with zero once the answer is in.
/// The daemon feeds its watchdog from it, so a long upload is not taken for a wedge.
pub type Alive = Arc<dyn Fn(Duration) + Send + Sync>;

/// The tokens of one session, from `/api/authenticate`. Only the refresh token is ever sent
/// (as the upload bearer); `Debug` shows neither.
#[derive(Clone)]
pub struct Tokens {
    pub session: String,
    refresh_token: Secret,
    /// When the tokens were issued, on the client's monotonic clock.
    pub issued_at: Duration,
    /// `expires_in` of the answer.
    pub expires_in: Duration,
}

impl Tokens {
    /// Whether the tokens may still be used at monotonic time `now` (renewed a margin early).
    pub fn fresh(&self, now: Duration) -> bool {
        super::policy::token_is_fresh(self.issued_at, self.expires_in, now)
    }
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("session", &self.session)
            .field("refresh_token", &"<redacted>")
            .field("issued_at", &self.issued_at)
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// Why a call did not succeed: what to do about it, and the words to show a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub verdict: Verdict,
    /// One line: the call, then the server's status and message, or the network error.
    pub detail: String,
    /// For a `422` from `/api/complete`: the labels the server says it never received.
    pub missing: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// What `GET /v1/sessions/{session}` says.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SessionInfo {
    pub session_key: String,
    #[serde(default)]
    pub case_id: String,
    pub status: String,
    #[serde(default)]
    pub photos: Vec<SessionPhoto>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SessionPhoto {
    pub photo_label: String,
    #[serde(default)]
    pub sha256: String,
    #[serde(default)]
    pub bytes: u64,
}

/// One image of an upload request.
pub struct Part<'a> {
    pub label: PhotoLabel,
    pub jpeg: &'a [u8],
    pub sha256: &'a str,
}

/// The cloud account and an HTTP agent with the request deadline.
pub struct Client {
    base_url: String,
    username: String,
    api_key: String,
    client_id: String,
    secret: Secret,
    agent: ureq::Agent,
    clock: Arc<dyn Clock>,
    clock_trust: ClockTrust,
    request_timeout: Duration,
    alive: Option<Alive>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.base_url)
            .field("username", &self.username)
            .field("client_id", &self.client_id)
            .field("clock_trust", &self.clock_trust)
            .finish_non_exhaustive()
    }
}

/// A successful answer's body.
struct Answer {
    body: Vec<u8>,
}

pub use crate::trust::TrustError;

/// Loads every root the configuration names, to tell `check` (and the daemon at start) about a
/// bad `ca_file` or an empty system store before any upload is tried. Returns how many roots
/// the cloud's certificate may chain to (0 for the bundled set alone, which needs no loading).
pub fn check_trust(config: &CloudConfig) -> Result<usize, TrustError> {
    crate::trust::check(config.trust, config.ca_file.as_deref())
}

/// The roots of the cloud agent: the bundled set alone is ureq's own default; anything else is
/// one explicit list.
fn roots(config: &CloudConfig) -> Result<ureq::tls::RootCerts, TrustError> {
    Ok(match crate::trust::roots(config.trust, config.ca_file.as_deref())? {
        Roots::Bundled => ureq::tls::RootCerts::WebPki,
        Roots::Specific(certs) => ureq::tls::RootCerts::Specific(Arc::new(
            certs.iter().map(|der| ureq::tls::Certificate::from_der(der).to_owned()).collect(),
        )),
    })
}

impl Client {
    /// Fails only when the roots cannot be loaded (see [`TrustError`]).
    pub fn new(config: &CloudConfig, secret: Secret, clock: Arc<dyn Clock>) -> Result<Client, TrustError> {
        let tls = ureq::tls::TlsConfig::builder().root_certs(roots(config)?).build();
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.request_timeout))
            .http_status_as_error(false)
            .user_agent(concat!("capture-kiosk/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls)
            .build()
            .into();
        Ok(Client {
            base_url: config.base_url.trim_end_matches('/').to_owned(),
            username: config.username.clone(),
            api_key: config.api_key.clone(),
            client_id: config.client_id.clone(),
            secret,
            agent,
            clock,
            clock_trust: ClockTrust::Unknown,
            request_timeout: config.request_timeout,
            alive: None,
        })
    }

    /// A second client of the same account on the same agent, so on the same pool of kept-alive
    /// connections (ureq's agent keeps idle connections per host and reuses them across calls
    /// and inspections). It reports nothing to `alive`: that is the first client's, which covers
    /// the wait for the twin with [`Client::while_waiting`].
    pub fn twin(&self) -> Client {
        Client {
            base_url: self.base_url.clone(),
            username: self.username.clone(),
            api_key: self.api_key.clone(),
            client_id: self.client_id.clone(),
            secret: self.secret.clone(),
            agent: self.agent.clone(),
            clock: self.clock.clone(),
            clock_trust: self.clock_trust,
            request_timeout: self.request_timeout,
            alive: None,
        }
    }

    /// Runs `wait` (joining a twin's request) reported to `alive` as a request in flight.
    pub fn while_waiting<T>(&self, wait: impl FnOnce() -> T) -> T {
        self.in_flight();
        let out = wait();
        self.landed();
        out
    }

    /// Reports every request to `alive` (see [`Alive`]).
    pub fn set_alive(&mut self, alive: Alive) {
        self.alive = Some(alive);
    }

    /// What the last server `Date` said about the kiosk's clock.
    pub fn clock_trust(&self) -> ClockTrust {
        self.clock_trust
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Asks the server for nothing but its `Date` (any answer carries one), to judge the clock
    /// before anything is signed. Fails only when the server cannot be reached.
    pub fn probe_clock(&mut self) -> Result<ClockTrust, Failure> {
        let url = format!("{}/", self.base_url);
        let what = "reach the cloud";
        self.in_flight();
        let result = match self.agent.get(&url).call() {
            Ok(mut response) => {
                self.learn_clock(&response);
                let _ = response.body_mut().with_config().limit(MAX_ANSWER_BYTES).read_to_vec();
                Ok(self.clock_trust)
            }
            Err(e) => Err(network_failure(&self.base_url, what, &e)),
        };
        self.landed();
        result
    }

    /// `POST /api/authenticate`: a new single-use session for one inspection. `vehicle` is the
    /// vehicle object as JSON, sent as stored.
    pub fn authenticate(
        &mut self,
        case_id: &str,
        vehicle: Option<&serde_json::Value>,
    ) -> Result<Tokens, Failure> {
        let mut body = serde_json::json!({
            "key": self.api_key,
            "client_id": self.client_id,
            "case_id": case_id,
        });
        if let Some(vehicle) = vehicle {
            body["vehicle"] = vehicle.clone();
        }
        let what = format!("authenticate case {case_id}");
        let answer = self.signed_post("/api/authenticate", &body, &what)?;
        #[derive(Deserialize)]
        struct Authenticated {
            session: String,
            refresh_token: String,
            expires_in: u64,
        }
        let parsed: Authenticated = serde_json::from_slice(&answer.body)
            .map_err(|e| malformed(&what, &format!("its answer is not the documented JSON ({e})")))?;
        Ok(Tokens {
            session: parsed.session,
            refresh_token: Secret::new(parsed.refresh_token),
            issued_at: self.clock.monotonic(),
            expires_in: Duration::from_secs(parsed.expires_in),
        })
    }

    /// `POST /api/upload` with the refresh token as bearer. Returns the labels the server
    /// says it received.
    pub fn upload(
        &mut self,
        tokens: &Tokens,
        case_id: &str,
        parts: &[Part<'_>],
    ) -> Result<Vec<PhotoLabel>, Failure> {
        self.upload_announcing(tokens, case_id, parts, None)
    }

    /// [`upload`](Self::upload) that drops `written` once the whole body is handed to the
    /// connection (or the request ended without it), before the answer is in: another request
    /// may then start without the link going idle.
    pub fn upload_announcing(
        &mut self,
        tokens: &Tokens,
        case_id: &str,
        parts: &[Part<'_>],
        written: Option<std::sync::mpsc::Sender<()>>,
    ) -> Result<Vec<PhotoLabel>, Failure> {
        let labels: Vec<&str> = parts.iter().map(|p| p.label.as_str()).collect();
        let what = format!("upload {} to session {}", labels.join(","), tokens.session);
        let boundary = format!("capture-kiosk-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let body = multipart(&boundary, &tokens.session, case_id, parts);
        let url = format!("{}/api/upload", self.base_url);
        self.in_flight();
        let sent = self
            .agent
            .post(&url)
            .header("Authorization", &format!("Bearer {}", tokens.refresh_token.expose()))
            .header("Idempotency-Key", &idempotency_key(&tokens.session, parts))
            .header("Content-Type", &format!("multipart/form-data; boundary={boundary}"))
            .header("Content-Length", &body.len().to_string())
            .send(ureq::SendBody::from_reader(&mut Announcing { body: &body, at: 0, written }));
        let answer = self.read(sent, &what, false)?;
        #[derive(Deserialize)]
        struct Received {
            received: Vec<String>,
        }
        let parsed: Received = serde_json::from_slice(&answer.body)
            .map_err(|e| malformed(&what, &format!("its answer is not the documented JSON ({e})")))?;
        Ok(parsed
            .received
            .iter()
            .filter_map(|name| PhotoLabel::parse(name.strip_suffix(".jpg").unwrap_or(name)).ok())
            .collect())
    }

    /// `POST /api/complete`: ends the inspection and consumes the session.
    pub fn complete(&mut self, session: &str, case_id: &str, labels: &[PhotoLabel]) -> Result<(), Failure> {
        let labels: Vec<&str> = labels.iter().map(|l| l.as_str()).collect();
        let body = serde_json::json!({ "session": session, "case_id": case_id, "labels": labels });
        let what = format!("complete session {session}");
        self.signed_post("/api/complete", &body, &what).map(|_| ())
    }

    /// `GET /v1/sessions/{session}`: what the server holds.
    pub fn session(&mut self, session: &str) -> Result<SessionInfo, Failure> {
        let what = format!("look up session {session}");
        let url = format!("{}/v1/sessions/{}", self.base_url, session);
        let signature = sign(&self.secret, &self.username, &self.api_key, self.clock.wall());
        self.in_flight();
        let sent = self
            .agent
            .get(&url)
            .header("API-Key", &signature.api_key)
            .header("API-Timestamp", &signature.timestamp)
            .header("API-Token", &signature.token)
            .call();
        let answer = self.read(sent, &what, true)?;
        serde_json::from_slice(&answer.body)
            .map_err(|e| malformed(&what, &format!("its answer is not the documented JSON ({e})")))
    }

    fn signed_post(&mut self, path: &str, body: &serde_json::Value, what: &str) -> Result<Answer, Failure> {
        let url = format!("{}{}", self.base_url, path);
        // Signed at send time: the timestamp is taken just before the request leaves.
        let signature = sign(&self.secret, &self.username, &self.api_key, self.clock.wall());
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        self.in_flight();
        let sent = self
            .agent
            .post(&url)
            .header("API-Key", &signature.api_key)
            .header("API-Timestamp", &signature.timestamp)
            .header("API-Token", &signature.token)
            .header("Content-Type", "application/json")
            .send(&bytes[..]);
        self.read(sent, what, true)
    }

    /// A request is about to leave: it may take up to its deadline.
    fn in_flight(&self) {
        if let Some(alive) = &self.alive {
            alive(self.request_timeout);
        }
    }

    /// The answer is in (or the request failed).
    fn landed(&self) {
        if let Some(alive) = &self.alive {
            alive(Duration::ZERO);
        }
    }

    fn read(
        &mut self,
        sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        what: &str,
        signed: bool,
    ) -> Result<Answer, Failure> {
        let answer = self.read_answer(sent, what, signed);
        self.landed();
        answer
    }

    fn read_answer(
        &mut self,
        sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        what: &str,
        signed: bool,
    ) -> Result<Answer, Failure> {
        let mut response = sent.map_err(|e| network_failure(&self.base_url, what, &e))?;
        self.learn_clock(&response);
        let status = response.status().as_u16();
        let retry_after =
            response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_vec()
            .map_err(|e| network_failure(&self.base_url, what, &e))?;
        if (200..300).contains(&status) {
            return Ok(Answer { body });
        }
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        let message = json.get("message").and_then(|m| m.as_str()).unwrap_or("").to_owned();
        let verdict = classify(status, signed, &message, retry_after.as_deref(), self.clock.wall());
        let mut detail = format!("{what}: the cloud answered HTTP {status}");
        if !message.is_empty() {
            detail.push_str(": ");
            detail.push_str(&message.chars().take(300).collect::<String>());
        }
        if let Some(errors) = json.get("errors").and_then(|e| e.as_object()) {
            let each: Vec<String> = errors
                .iter()
                .map(|(field, why)| {
                    let why = why
                        .as_array()
                        .map(|a| a.iter().filter_map(|w| w.as_str()).collect::<Vec<_>>().join("; "))
                        .unwrap_or_else(|| why.to_string());
                    format!("{field}: {why}")
                })
                .collect();
            detail.push_str(&format!(" ({})", each.join(", ").chars().take(500).collect::<String>()));
        }
        let missing = json
            .get("missing")
            .and_then(|m| m.as_array())
            .map(|a| a.iter().filter_map(|l| l.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        Err(Failure { verdict, detail, missing })
    }

    fn learn_clock(&mut self, response: &ureq::http::Response<ureq::Body>) {
        let Some(date) = response.headers().get("date").and_then(|v| v.to_str().ok()) else {
            return;
        };
        if let Some(trust) = judge_clock(date, self.clock.wall()) {
            if trust != self.clock_trust {
                match trust {
                    ClockTrust::Untrusted { skew_secs } => log::warn!(
                        skew_secs = skew_secs;
                        "The kiosk's clock is away from the cloud's; nothing is signed until it is set right (check NTP: timedatectl status)"
                    ),
                    ClockTrust::Trusted { skew_secs } => {
                        log::debug!(skew_secs = skew_secs; "Clock agrees with the cloud's")
                    }
                    ClockTrust::Unknown => {}
                }
            }
            self.clock_trust = trust;
        }
    }
}

/// The `Idempotency-Key` of an upload request: a digest of the session and of each file's
/// label and sha256, so that a retry of the same request carries the same key and a different
/// request never does.
pub fn idempotency_key(session: &str, parts: &[Part<'_>]) -> String {
    let mut h = Sha256::new();
    h.update(session.as_bytes());
    for p in parts {
        h.update(b"\n");
        h.update(p.label.as_str().as_bytes());
        h.update(b":");
        h.update(p.sha256.as_bytes());
    }
    format!("ck-{}", &hex::encode(h.finalize())[..40])
}

/// A request body read out to the connection that says when it has all been read.
struct Announcing<'a> {
    body: &'a [u8],
    at: usize,
    written: Option<std::sync::mpsc::Sender<()>>,
}

impl std::io::Read for Announcing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.body.len() - self.at);
        buf[..n].copy_from_slice(&self.body[self.at..self.at + n]);
        self.at += n;
        if self.at == self.body.len() {
            self.written = None;
        }
        Ok(n)
    }
}

/// The `multipart/form-data` body of an upload: `type`, `session`, `case_id`, then one `files`
/// part per image, named `{label}.jpg`.
pub fn multipart(boundary: &str, session: &str, case_id: &str, parts: &[Part<'_>]) -> Vec<u8> {
    let size: usize = parts.iter().map(|p| p.jpeg.len() + 160).sum::<usize>() + 512;
    let mut body = Vec::with_capacity(size);
    for (name, value) in [("type", "file"), ("session", session), ("case_id", case_id)] {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    for p in parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{}.jpg\"\r\n\
                 Content-Type: image/jpeg\r\n\r\n",
                p.label.as_str()
            )
            .as_bytes(),
        );
        body.extend_from_slice(p.jpeg);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

/// The bytes a request of these images adds to the body beyond the images themselves.
pub const PART_OVERHEAD: u64 = 160;

fn network_failure(base_url: &str, what: &str, e: &ureq::Error) -> Failure {
    let tls = match e {
        ureq::Error::Rustls(tls) => Some(tls),
        ureq::Error::Io(io) => io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    let why = match (e, tls) {
        (_, Some(tls)) => tls_refusal(base_url, tls),
        (ureq::Error::Timeout(_), None) => {
            "no answer before the request deadline (cloud.request_timeout)".to_owned()
        }
        (ureq::Error::Io(io), None) => format!("network error: {io}"),
        (other, None) => format!("network error: {other}"),
    };
    Failure { verdict: Verdict::Backoff, detail: format!("{what}: {why}"), missing: Vec::new() }
}

/// Words for a TLS failure with the cloud: the host, what was wrong, and where the fix lies.
fn tls_refusal(base_url: &str, e: &rustls::Error) -> String {
    let host = base_url.split_once("://").map_or(base_url, |(_, rest)| rest);
    let fix = match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
        | rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. }) => {
            "the certificate was issued for another name: check cloud.base_url"
        }
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
        ) => "the certificate has expired, or the kiosk's clock is wrong",
        rustls::Error::InvalidCertificate(_) => {
            "behind a private CA or a TLS-inspecting proxy, set cloud.ca_file to its CA certificate"
        }
        _ => "check that cloud.base_url speaks HTTPS",
    };
    format!("the TLS connection to {host} was refused: {e}; {fix}")
}

fn malformed(what: &str, why: &str) -> Failure {
    // A 2xx we cannot read is the server's fault and may be transient (a proxy page, say).
    Failure { verdict: Verdict::Backoff, detail: format!("{what}: {why}"), missing: Vec::new() }
}

/// The kiosk's clock against the cloud's, in words for log lines and `queue`.
pub fn describe_trust(trust: ClockTrust) -> String {
    match trust {
        ClockTrust::Unknown => "not yet compared with the cloud's".to_owned(),
        ClockTrust::Trusted { skew_secs } => format!("within {} s of the cloud's", skew_secs.abs()),
        ClockTrust::Untrusted { skew_secs } if skew_secs > 0 => {
            format!(
                "{skew_secs} s ahead of the cloud's: set the time right (NTP) before anything can be sent"
            )
        }
        ClockTrust::Untrusted { skew_secs } => {
            format!(
                "{} s behind the cloud's: set the time right (NTP) before anything can be sent",
                -skew_secs
            )
        }
    }
}

/// What the kernel says of its clock: `Some(true)` when NTP (or another source) keeps it
/// synchronised, `Some(false)` when the kernel marks it unsynchronised, `None` when it cannot
/// be asked: under the unit's `ProtectClock=yes` the kernel refuses the query with EPERM, and
/// that is read as unknown, not as an error. Informational: the server's `Date` decides
/// whether the kiosk signs.
pub fn kernel_clock_synchronised() -> Option<bool> {
    // SAFETY: adjtimex with `modes = 0` only reads the kernel's state into the zeroed struct.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state < 0 {
        return None;
    }
    Some(state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0)
}
