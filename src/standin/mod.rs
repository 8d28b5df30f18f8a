//! A stand-in of the cloud inspection API (`shared/spec/cloud-api.md`) on 127.0.0.1: the whole
//! contract, enforced strictly, with records of what arrived and faults on demand. It is the
//! judge of the kiosk's upload client in tests (in-process, with a `ManualClock`), the far end
//! of `capture-kiosk demo`, and, through [`serve`], the `capture-kiosk standin` subcommand.
//!
//! The HTTP/1.1 server is written by hand on `std::net::TcpListener`, one thread per
//! connection and one exchange per connection (`Connection: close`), so that a fault can stall,
//! drop or reset a connection at any point. With [`StandInConfig::tls`] it speaks HTTPS only
//! (rustls, the given certificate and key), to test the kiosk's trust settings; a client that
//! refuses the certificate ends the connection in the handshake, before any request. Every response carries a `Date` header from the
//! stand-in's clock and a JSON body in the spec's shapes.
//!
//! Where the spec is silent the stand-in decides, strictly:
//! - Reusing an `Idempotency-Key` with a different request (other session, case id or files)
//!   gets `422`; a replay of the same request gets the first answer again and stores nothing.
//!   Keys are global, are remembered only for answered `200`s, and a replay passes the token and
//!   session checks first (a replay to a completed session gets `409`).
//! - Upload checks run in this order: bearer present, `Idempotency-Key` shape, multipart syntax,
//!   fields (`400`), file count (1–99) and filenames (`400`), JPEG content (`415`), then the token
//!   (unknown, access token, other session: `401`), the session (consumed `409`, expired `410`),
//!   token expiry (`401`), `case_id` match (`400`), the idempotency key, and storing.
//! - A label twice in one upload is a `400`; unknown multipart fields are a `400`.
//! - `client_id` is required (1–64 characters); unknown JSON fields are `400`s in PAVE's
//!   `errors` shape; JSON endpoints want `Content-Type: application/json` (`415` otherwise).
//! - A completed session stays `PROCESS` for good (it never expires and never reaches
//!   `COMPLETE`); `/api/complete` may list fewer labels than were uploaded, but not none.
//!   A second complete of a consumed session gets `409` and is counted
//!   ([`StandIn::completes_after_consumed`]): the spec forbids it, so tests can insist on zero.
//! - The size cap counts the body (`Content-Length`); chunked bodies get `411`.
//! - `401` bodies carry the spec's `message` plus a `detail` saying which check failed.
//!
//! **Architecture Invariant:** the stand-in never logs a token or the secret; the requests it
//! records hold method, path and status only.

mod api;
mod connection;
mod faults;
mod http;
mod multipart;
mod tls;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime};

use crate::clock::Clock;

pub use api::expected_token;
pub use tls::StandInTls;

/// Connections served at once; more are answered `503` and closed.
const MAX_CONNECTIONS: usize = 256;

/// The account and limits of a stand-in.
#[derive(Clone)]
pub struct StandInConfig {
    pub username: String,
    pub api_key: String,
    /// Signs requests; it must never appear in a request (see [`StandIn::secret_leaks`]).
    pub api_secret: String,
    /// Lifetime of access and refresh tokens from their issue (the spec's 900 s).
    pub token_ttl: Duration,
    /// Lifetime of a session from its creation (the spec's default 60 min).
    pub session_ttl: Duration,
    /// Largest accepted upload body (the spec's 64 MiB); larger gets `413`.
    pub max_request_bytes: u64,
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Serve HTTPS with this certificate and key instead of plain HTTP.
    pub tls: Option<StandInTls>,
}

impl Default for StandInConfig {
    /// The fixed test account, with the spec's limits.
    fn default() -> Self {
        StandInConfig {
            username: "kiosk-test".to_owned(),
            api_key: "test-api-key-0001".to_owned(),
            api_secret: "standin-secret-do-not-send".to_owned(),
            token_ttl: Duration::from_secs(900),
            session_ttl: Duration::from_secs(3600),
            max_request_bytes: 64 * 1024 * 1024,
            port: 0,
            tls: None,
        }
    }
}

/// The secret stays out of `Debug`.
impl fmt::Debug for StandInConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandInConfig")
            .field("username", &self.username)
            .field("api_key", &self.api_key)
            .field("api_secret", &"<redacted>")
            .field("token_ttl", &self.token_ttl)
            .field("session_ttl", &self.session_ttl)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .finish()
    }
}

/// A session's status as `GET /v1/sessions/{session}` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionStatus {
    /// No photo yet.
    Idle,
    /// Photos arriving.
    Started,
    /// Completed; the stand-in keeps completed sessions here.
    Process,
    /// Results ready; the stand-in never gets here (it analyses nothing).
    Complete,
    /// Not completed within the session's lifetime, or expired by [`StandIn::expire_session`].
    Expired,
}

impl SessionStatus {
    /// As the API spells it: `IDLE`, `STARTED`, `PROCESS`, `COMPLETE`, `EXPIRED`.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Idle => "IDLE",
            SessionStatus::Started => "STARTED",
            SessionStatus::Process => "PROCESS",
            SessionStatus::Complete => "COMPLETE",
            SessionStatus::Expired => "EXPIRED",
        }
    }
}

/// What the stand-in holds for one session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub session: String,
    pub case_id: String,
    pub client_id: String,
    /// The vehicle object exactly as sent to `/api/authenticate`.
    pub vehicle: Option<serde_json::Value>,
    /// The status at the moment the record was taken.
    pub status: SessionStatus,
    /// One entry per label received, in the spec's label order.
    pub photos: Vec<PhotoRecord>,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    pub completed: bool,
    /// How many `/api/complete` calls succeeded (more than 1 is impossible by the rules).
    pub completions: usize,
    /// `/api/complete` calls that came after the session was consumed (answered `409`). The
    /// spec forbids them: a client that lost the answer to its complete must ask
    /// `GET /v1/sessions/{s}`, not complete again.
    pub completes_after_consumed: usize,
    /// The labels the successful `/api/complete` listed.
    pub completed_labels: Vec<String>,
    /// Upload requests that stored files (idempotent replays not counted).
    pub upload_requests: usize,
    /// Upload requests answered from an `Idempotency-Key` without storing anything.
    pub idempotent_replays: usize,
}

impl SessionRecord {
    /// The photo stored under this label (`"Front_Left"`), if any.
    pub fn photo(&self, label: &str) -> Option<&PhotoRecord> {
        self.photos.iter().find(|p| p.label == label)
    }

    /// The labels received, in the spec's order.
    pub fn labels(&self) -> Vec<&str> {
        self.photos.iter().map(|p| p.label.as_str()).collect()
    }
}

/// The latest image of one label in one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhotoRecord {
    pub label: String,
    /// Lowercase hex SHA-256 of the latest image.
    pub sha256: String,
    pub bytes: u64,
    /// How many times an image was stored under this label (replays not counted).
    pub stores: usize,
}

/// One request the stand-in saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// `-` when the request line could not be read.
    pub method: String,
    /// Without the query string; `-` when the request line could not be read.
    pub path: String,
    /// The status answered (recorded just before it is written), or `None` when the stand-in
    /// sent no answer (a fault, or a client that went away mid-request).
    pub status: Option<u16>,
    /// The injected fault that shaped this exchange, if any.
    pub fault: Option<FaultKind>,
    /// Occurrences of the API secret in this request's bytes.
    pub secret_leaks: usize,
}

/// Which injected fault applied to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// Answered with the armed status and `Retry-After`; nothing happened.
    Failed,
    /// The connection was reset without an answer; nothing happened.
    Reset,
    /// The connection was held without an answer, then closed; nothing happened.
    Stalled,
    /// The upload was stored (or the complete took effect), then the connection was reset
    /// without an answer.
    DroppedAfterAccepting,
    /// The request took effect, then the connection was held without an answer and closed.
    HeldAfterAccepting,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Failed => "failed",
            FaultKind::Reset => "reset",
            FaultKind::Stalled => "stalled",
            FaultKind::DroppedAfterAccepting => "dropped-after-accepting",
            FaultKind::HeldAfterAccepting => "held-after-accepting",
        }
    }
}

/// A running stand-in. Stops when dropped.
pub struct StandIn {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Mutex<Option<JoinHandle<()>>>,
    stopped: AtomicBool,
}

impl StandIn {
    /// Listens on 127.0.0.1 (`config.port`, 0 for any) and serves in background threads.
    /// `clock` is the stand-in's idea of now: token and session expiry, the signing window and
    /// the `Date` header all follow it.
    pub fn start(config: StandInConfig, clock: Arc<dyn Clock>) -> io::Result<StandIn> {
        for (name, value) in
            [("username", &config.username), ("api_key", &config.api_key), ("api_secret", &config.api_secret)]
        {
            if value.is_empty() {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("stand-in {name} is empty")));
            }
        }
        let tls = config.tls.as_ref().map(tls::server_config).transpose()?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, config.port))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            tls,
            clock,
            offset_secs: AtomicI64::new(0),
            state: Mutex::new(api::State::new()),
            faults: Mutex::new(faults::Faults::default()),
            stopping: Mutex::new(false),
            stop_signal: Condvar::new(),
            connections: Mutex::new(Connections::default()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("standin-accept".to_owned())
            .spawn(move || accept_loop(&accept_shared, &listener))?;
        Ok(StandIn { shared, addr, accept: Mutex::new(Some(accept)), stopped: AtomicBool::new(false) })
    }

    /// `http://127.0.0.1:PORT` (`https://` in TLS mode), without a trailing slash.
    pub fn base_url(&self) -> String {
        let scheme = if self.shared.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn config(&self) -> &StandInConfig {
        &self.shared.config
    }

    /// The stand-in's now: its clock plus the offset of [`StandIn::set_clock_offset`].
    pub fn now(&self) -> SystemTime {
        self.shared.now()
    }

    /// Stops listening, wakes stalled exchanges, closes open connections and waits for every
    /// thread of the stand-in to end. Idempotent.
    /// Blocks until the stand-in stops (for a stand-in that serves until the process ends).
    pub fn wait(&self) -> io::Result<()> {
        let accept = lock(&self.accept).take();
        if let Some(accept) = accept {
            accept.join().map_err(|_| io::Error::other("the stand-in's accept loop panicked"))?;
        }
        Ok(())
    }

    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        *lock(&self.shared.stopping) = true;
        self.shared.stop_signal.notify_all();
        let accept = lock(&self.accept).take();
        if let Some(accept) = accept {
            // The accept loop sees the flag once accept() returns: connect to make it return.
            if TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok() {
                let _ = accept.join();
            }
        }
        let threads = {
            let mut connections = lock(&self.shared.connections);
            for stream in connections.open.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut connections.threads)
        };
        for thread in threads {
            let _ = thread.join();
        }
    }

    // --- Records ------------------------------------------------------------------------------

    /// What the stand-in holds for a session.
    pub fn session(&self, session: &str) -> Option<SessionRecord> {
        api::lock(&self.shared.state).session(session, self.shared.now())
    }

    /// Every session, in creation order.
    pub fn sessions(&self) -> Vec<SessionRecord> {
        api::lock(&self.shared.state).sessions(self.shared.now())
    }

    /// Requests that reached `POST /api/authenticate`'s handler, whatever their answer
    /// (successes are `sessions().len()`).
    pub fn authenticate_calls(&self) -> usize {
        api::lock(&self.shared.state).authenticate_calls
    }

    /// Every request seen, oldest first (the latest 10 000).
    pub fn requests(&self) -> Vec<RequestRecord> {
        api::lock(&self.shared.state).requests.iter().cloned().collect()
    }

    /// Occurrences of the API secret in any byte any client sent, in any request.
    pub fn secret_leaks(&self) -> usize {
        api::lock(&self.shared.state).secret_leaks
    }

    /// `/api/complete` calls, over every session, on a session already consumed: the spec
    /// forbids them, so a correct client keeps this at zero (see
    /// [`SessionRecord::completes_after_consumed`]).
    pub fn completes_after_consumed(&self) -> usize {
        self.sessions().iter().map(|s| s.completes_after_consumed).sum()
    }

    /// Every bearer token the stand-in issued (access and refresh), so that a test can look
    /// for them where they must never be (logs, MQTT). Secrets: for tests only.
    pub fn issued_tokens(&self) -> Vec<String> {
        api::lock(&self.shared.state).issued_tokens()
    }

    // --- Faults -------------------------------------------------------------------------------

    /// The next `count` uploads are answered `status` (meant for 429 or 503) with
    /// `Retry-After` in whole seconds, after their body is read, and have no effect.
    pub fn fail_next_uploads(&self, count: usize, status: u16, retry_after: Duration) {
        let action = faults::Action::Fail { status, retry_after_secs: retry_after.as_secs() };
        lock(&self.shared.faults).arm(action, count, Some("/api/upload"));
    }

    /// The next `count` requests (to `path`, or to any path) are reset (TCP RST) as soon as
    /// their head is read, without an answer and without effect.
    pub fn reset_next_requests(&self, count: usize, path: Option<&str>) {
        lock(&self.shared.faults).arm(faults::Action::Reset, count, path);
    }

    /// The next `count` uploads that succeed are stored in full, then their connection is reset
    /// instead of answered. An upload that fails is answered and does not use up the fault.
    pub fn drop_after_accepting_next_uploads(&self, count: usize) {
        self.drop_after_accepting_next(count, "/api/upload");
    }

    /// The next `count` requests to `path` (`/api/upload` or `/api/complete`) that succeed take
    /// effect in full, then their connection is reset instead of answered. One that fails is
    /// answered and does not use up the fault.
    pub fn drop_after_accepting_next(&self, count: usize, path: &str) {
        lock(&self.shared.faults).arm(faults::Action::DropAfterAccepting, count, Some(path));
    }

    /// The next `count` requests (to `path`, or to any path) are held open without an answer
    /// for `stall` (or until the stand-in stops), then closed without effect. Other
    /// connections are served meanwhile.
    pub fn stall_next_requests(&self, count: usize, stall: Duration, path: Option<&str>) {
        lock(&self.shared.faults).arm(faults::Action::Stall(stall), count, path);
    }

    /// The next `count` requests to `path` (`/api/upload` or `/api/complete`) that succeed
    /// take effect in full, then their connection is held without an answer for `hold` (or
    /// until the stand-in stops) and closed. One that fails is answered and does not use up
    /// the fault.
    pub fn hold_after_accepting_next(&self, count: usize, hold: Duration, path: &str) {
        lock(&self.shared.faults).arm(faults::Action::HoldAfterAccepting(hold), count, Some(path));
    }

    /// Disarms every fault not yet applied.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// Every token issued so far is expired from now on (uploads get `401 Token expired`).
    pub fn expire_all_tokens(&self) {
        api::lock(&self.shared.state).expire_all_tokens();
    }

    /// The session is expired from now on (unless already completed). False if unknown.
    pub fn expire_session(&self, session: &str) -> bool {
        api::lock(&self.shared.state).expire_session(session)
    }

    /// Shifts the stand-in's now by `seconds` (negative: behind) relative to its clock.
    pub fn set_clock_offset(&self, seconds: i64) {
        self.shared.offset_secs.store(seconds, Ordering::SeqCst);
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop();
    }
}

impl fmt::Debug for StandIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandIn").field("addr", &self.addr).field("config", &self.shared.config).finish()
    }
}

/// Runs a stand-in until the process ends (the `capture-kiosk standin` subcommand). Returns
/// only if it cannot listen or its accept loop dies.
pub fn serve(config: StandInConfig, clock: Arc<dyn Clock>) -> io::Result<()> {
    let standin = StandIn::start(config, clock)?;
    log::info!(url = standin.base_url().as_str(), username = standin.config().username.as_str(); "Stand-in cloud API is listening");
    standin.wait()
}

/// What the threads of one stand-in share.
pub(crate) struct Shared {
    config: StandInConfig,
    /// The HTTPS settings in TLS mode.
    tls: Option<Arc<rustls::ServerConfig>>,
    clock: Arc<dyn Clock>,
    offset_secs: AtomicI64,
    state: Mutex<api::State>,
    faults: Mutex<faults::Faults>,
    stopping: Mutex<bool>,
    stop_signal: Condvar,
    connections: Mutex<Connections>,
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    /// A handle to each open connection, so that stopping can shut them down.
    open: HashMap<u64, TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

impl Shared {
    fn now(&self) -> SystemTime {
        let wall = self.clock.wall();
        let offset = self.offset_secs.load(Ordering::SeqCst);
        let shifted = if offset >= 0 {
            wall.checked_add(Duration::from_secs(offset.unsigned_abs()))
        } else {
            wall.checked_sub(Duration::from_secs(offset.unsigned_abs()))
        };
        shifted.unwrap_or(wall)
    }

    fn is_stopping(&self) -> bool {
        *lock(&self.stopping)
    }

    fn sleep_unless_stopped(&self, how_long: Duration) {
        let stopping = lock(&self.stopping);
        let _ = self.stop_signal.wait_timeout_while(stopping, how_long, |stopping| !*stopping);
    }

    fn take_fault(&self, phase: faults::Phase, path: &str) -> Option<faults::Action> {
        lock(&self.faults).take(phase, path)
    }

    fn give_back_fault(&self, action: faults::Action, path: &str) {
        lock(&self.faults).give_back(action, path);
    }

    fn add_leaks(&self, leaks: usize) {
        if leaks > 0 {
            api::lock(&self.state).secret_leaks += leaks;
            log::warn!(leaks = leaks; "Stand-in received the API secret on the wire");
        }
    }

    fn record(&self, line: &connection::Line, status: Option<u16>, fault: Option<FaultKind>, leaks: usize) {
        log::debug!(
            method = line.method.as_str(),
            path = line.path.as_str(),
            status = status.unwrap_or(0),
            fault = fault.map_or("none", FaultKind::as_str);
            "Stand-in handled a request"
        );
        self.add_leaks(leaks);
        api::lock(&self.state).push_request(RequestRecord {
            method: line.method.clone(),
            path: line.path.clone(),
            status,
            fault,
            secret_leaks: leaks,
        });
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent; a panic elsewhere must not wedge tests.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    loop {
        let accepted = listener.accept();
        if shared.is_stopping() {
            return;
        }
        match accepted {
            Ok((stream, _)) => spawn_connection(shared, stream),
            Err(e) => {
                log::warn!(error = e.to_string().as_str(); "Stand-in could not accept a connection");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: TcpStream) {
    let mut connections = lock(&shared.connections);
    connections.threads.retain(|t| !t.is_finished());
    if connections.open.len() >= MAX_CONNECTIONS {
        drop(connections);
        refuse_busy(shared, stream);
        return;
    }
    let Ok(handle) = stream.try_clone() else {
        return;
    };
    let id = connections.next_id;
    connections.next_id += 1;
    connections.open.insert(id, handle);
    let worker = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name("standin-conn".to_owned())
        .spawn(move || run_connection(&worker, id, stream));
    match spawned {
        Ok(thread) => connections.threads.push(thread),
        Err(_) => {
            connections.open.remove(&id);
        }
    }
}

fn run_connection(shared: &Shared, id: u64, stream: TcpStream) {
    let guarded = |wire: &mut dyn http::Wire| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| connection::exchange(shared, wire)))
            .unwrap_or_else(|_| {
                log::error!("Stand-in connection handler panicked; closing the connection");
                connection::Ending::Close
            })
    };
    let (ending, stream) = match &shared.tls {
        None => {
            let mut stream = stream;
            (guarded(&mut stream), stream)
        }
        Some(config) => match rustls::ServerConnection::new(Arc::clone(config)) {
            Ok(conn) => {
                let mut wire: tls::TlsStream = rustls::StreamOwned::new(conn, stream);
                (guarded(&mut wire), wire.sock)
            }
            Err(e) => {
                log::warn!(error = e.to_string().as_str(); "Stand-in could not start a TLS connection");
                (connection::Ending::Close, stream)
            }
        },
    };
    // Drop the shared handle first: a reset only happens when the last handle closes.
    lock(&shared.connections).open.remove(&id);
    match ending {
        connection::Ending::Reset => http::reset(stream),
        connection::Ending::Close => drop(stream),
    }
}

fn refuse_busy(shared: &Shared, mut stream: TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let mut busy = http::Response::message(503, "Too many connections, retry later");
    busy.retry_after = Some(1);
    let _ = http::write_response(&mut stream, &busy, shared.now());
}
