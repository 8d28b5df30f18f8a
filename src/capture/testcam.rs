//! A snapshot camera on 127.0.0.1 for tests, benchmarks and commissioning: it serves a JPEG
//! at `/snapshot.jpg` the way an IP bay camera does, and can be switched into the ways real
//! cameras fail (down, hanging, sending garbage or a cut-off frame, asking for credentials).
//! It is a real HTTP server over loopback, not a mock; it is never started by the daemon.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::digest::{self, Algorithm};

/// How the camera answers the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Serves its frame.
    Serve,
    /// Powered off: connections are closed without an answer.
    Off,
    /// Reads the request and never answers (until switched back or stopped).
    Hang,
    /// Reads the request and answers once switched to another behaviour, as that one does: a
    /// camera that takes its time (a slow exposure, a busy encoder).
    Hold,
    /// Answers 200 with bytes that are not a JPEG.
    Garbage,
    /// Answers 200 with the first part of its frame only, correctly framed.
    Truncated,
}

/// The credentials the camera requires.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    Basic { user: String, password: String },
    Digest { user: String, password: String, algorithm: Algorithm },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Basic { user, .. } => write!(f, "Basic {{ user: {user:?}, password: *** }}"),
            Auth::Digest { user, algorithm, .. } => {
                write!(f, "Digest {{ user: {user:?}, password: ***, algorithm: {algorithm:?} }}")
            }
        }
    }
}

const REALM: &str = "bay-camera";

struct State {
    frame: Arc<Vec<u8>>,
    behaviour: Behaviour,
    auth: Auth,
    nonce: String,
}

/// A running snapshot camera; stops when dropped.
pub struct SnapshotServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    frames: Arc<AtomicU64>,
}

impl SnapshotServer {
    /// Starts serving `frame` on a free port of 127.0.0.1.
    pub fn start(frame: Vec<u8>) -> std::io::Result<SnapshotServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let server = SnapshotServer {
            addr,
            state: Arc::new(Mutex::new(State {
                frame: Arc::new(frame),
                behaviour: Behaviour::Serve,
                auth: Auth::None,
                nonce: format!("{:032x}", fastrand::u128(..)),
            })),
            stop: Arc::new(AtomicBool::new(false)),
            requests: Arc::new(AtomicU64::new(0)),
            frames: Arc::new(AtomicU64::new(0)),
        };
        let (state, stop, requests, frames) =
            (server.state.clone(), server.stop.clone(), server.requests.clone(), server.frames.clone());
        std::thread::Builder::new().name(format!("testcam-{}", addr.port())).spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (state, stop, requests, frames) =
                    (state.clone(), stop.clone(), requests.clone(), frames.clone());
                std::thread::spawn(move || {
                    let _ = answer(stream, &state, &stop, &requests, &frames);
                });
            }
        })?;
        Ok(server)
    }

    /// `http://127.0.0.1:PORT/snapshot.jpg`
    pub fn url(&self) -> String {
        format!("http://{}/snapshot.jpg", self.addr)
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        self.lock().behaviour = behaviour;
    }

    pub fn set_auth(&self, auth: Auth) {
        self.lock().auth = auth;
    }

    pub fn set_frame(&self, frame: Vec<u8>) {
        self.lock().frame = Arc::new(frame);
    }

    /// A new nonce: answers under the old one get `stale=true`.
    pub fn rotate_nonce(&self) {
        self.lock().nonce = format!("{:032x}", fastrand::u128(..));
    }

    /// Requests received so far (each connection's request counts once).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Full frames served so far.
    pub fn frames_served(&self) -> u64 {
        self.frames.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for SnapshotServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn answer(
    stream: TcpStream,
    state: &Mutex<State>,
    stop: &AtomicBool,
    requests: &AtomicU64,
    frames: &AtomicU64,
) -> std::io::Result<()> {
    let behaviour = state.lock().unwrap_or_else(|p| p.into_inner()).behaviour;
    if behaviour == Behaviour::Off || stop.load(Ordering::SeqCst) {
        return Ok(()); // dropped: the connection closes without a byte
    }
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorization = None;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_owned());
            }
        }
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let mut out = &stream;
    let (behaviour, auth, nonce, frame) = {
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        (s.behaviour, s.auth.clone(), s.nonce.clone(), s.frame.clone())
    };
    let method = request_line.split(' ').next().unwrap_or("");
    match &auth {
        Auth::None => {}
        Auth::Basic { user, password } => {
            let expected = format!("Basic {}", base64(format!("{user}:{password}").as_bytes()));
            if authorization.as_deref() != Some(expected.as_str()) {
                let head = format!("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"{REALM}\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                return out.write_all(head.as_bytes());
            }
        }
        Auth::Digest { user, password, algorithm } => {
            let ok = authorization
                .as_deref()
                .is_some_and(|h| digest::verify(h, method, REALM, &nonce, user, password));
            if !ok {
                // A well-formed answer under an older nonce is stale, not wrong.
                let stale =
                    authorization.as_deref().is_some_and(|h| h.contains("nonce=") && !h.contains(&nonce));
                let head = format!(
                    "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Digest realm=\"{REALM}\", qop=\"auth\", algorithm={}, nonce=\"{nonce}\", opaque=\"5ccc069c\"{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    algorithm.name(),
                    if stale { ", stale=true" } else { "" }
                );
                return out.write_all(head.as_bytes());
            }
        }
    }
    let behaviour = if behaviour == Behaviour::Hold {
        let since = Instant::now();
        loop {
            let now = state.lock().unwrap_or_else(|p| p.into_inner()).behaviour;
            if now != Behaviour::Hold
                || stop.load(Ordering::SeqCst)
                || since.elapsed() > Duration::from_secs(60)
            {
                break now;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    } else {
        behaviour
    };
    let body: Vec<u8> = match behaviour {
        Behaviour::Hang | Behaviour::Hold => {
            let since = Instant::now();
            while !stop.load(Ordering::SeqCst)
                && state.lock().unwrap_or_else(|p| p.into_inner()).behaviour == Behaviour::Hang
                && since.elapsed() < Duration::from_secs(60)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            return Ok(());
        }
        Behaviour::Garbage => b"<html><body>camera busy, try again</body></html>".repeat(40),
        Behaviour::Truncated => frame[..frame.len() / 2].to_vec(),
        Behaviour::Serve | Behaviour::Off => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                frame.len()
            );
            out.write_all(head.as_bytes())?;
            out.write_all(&frame)?;
            frames.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(&body)
}

/// Standard base64 with padding (for Basic authentication).
pub(crate) fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc_4648() {
        for (input, want) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")]
        {
            assert_eq!(super::base64(input.as_bytes()), want);
        }
    }
}
