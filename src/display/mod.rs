//! The bay's own web server: the driver's screen (`/`, live through Server-Sent Events on
//! `/events`) and the installer's camera page (`/cameras`, behind a bearer token).
//!
//! It runs axum on a current-thread tokio runtime in a thread of its own and reads what the
//! daemon publishes: the shell hands it every [`State`] and [`Event`] it gives the MQTT link.
//! What the screen says is decided by the pure [`screen::Board`]. Frames for the camera page
//! come from the capture thread ([`PreviewJob`]), one at a time and never while an inspection
//! is captured; they are kept in memory only as long as the response takes, never stored and
//! never uploaded. The pages need nothing from the internet: HTML, CSS and script are built in.

pub mod config;
pub mod screen;
mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::credentials::{self, CredentialError, Secret};
use crate::status::{Event, State};

pub use config::{DisplayConfig, RawDisplay};
pub use screen::{Board, Mode, Screen, Texts};

/// The systemd credential that holds the camera page's token.
pub const TOKEN_CREDENTIAL: &str = "display-token";
/// The token the kiosk makes itself when none is configured, in its state directory.
pub const TOKEN_FILE: &str = "display-token";

/// A request for one frame of `camera` for the camera page.
#[derive(Debug)]
pub struct PreviewJob {
    pub camera: String,
    pub reply: tokio::sync::oneshot::Sender<Result<Preview, String>>,
}

/// A frame for the camera page: downscaled, masks outlined, a dotted grid for aiming.
#[derive(Debug, Clone)]
pub struct Preview {
    pub jpeg: Vec<u8>,
    /// The camera's frame as delivered (upright).
    pub source_width: u32,
    pub source_height: u32,
    pub quality: crate::imaging::quality::QualityScores,
    /// The thresholds the frame breaks, in words (`None` when it passes).
    pub problems: Option<String>,
}

/// What the camera page lists about each camera besides its health.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CameraInfo {
    pub id: String,
    pub angles: Vec<String>,
    /// `v4l2`, `http`, `dir` or `synthetic`; the address is not shown (it may hold a password).
    pub kind: String,
}

impl CameraInfo {
    /// The cameras of `cameras`, as the page lists them.
    pub fn of(cameras: &[crate::capture::CameraConfig]) -> Vec<CameraInfo> {
        cameras
            .iter()
            .map(|c| CameraInfo {
                id: c.id.clone(),
                angles: c.angles.iter().map(|a| a.as_str().to_owned()).collect(),
                kind: c.source.kind().to_owned(),
            })
            .collect()
    }
}

/// Why the pages cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum DisplayError {
    #[error("the display cannot listen on {addr}: {reason}; free the port or set [display] listen to another address (or enabled = false)")]
    Listen { addr: SocketAddr, reason: String },
    #[error("the camera page's token: {0}")]
    Token(#[from] CredentialError),
    #[error("the camera page's token cannot be made at {path}: {reason}; make the state directory writable or set [display] token_file")]
    TokenNotWritten { path: PathBuf, reason: String },
    #[error("the display's thread cannot start: {0}")]
    Thread(String),
}

/// Where the camera page's token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    File(PathBuf),
    Credential,
    /// Made by the kiosk at first start.
    Made(PathBuf),
}

impl TokenSource {
    /// How a person gets the token, for the page and the log.
    pub fn how_to_read(&self) -> String {
        match self {
            TokenSource::File(p) | TokenSource::Made(p) => format!("sudo cat {}", p.display()),
            TokenSource::Credential => {
                format!("it is the service's systemd credential {TOKEN_CREDENTIAL} (LoadCredential=)")
            }
        }
    }
}

/// The camera page's token: `[display] token_file`, else the systemd credential
/// `display-token`, else `display-token` in the state directory, made on first use (random,
/// owner-only).
pub fn token(config: &DisplayConfig, state_dir: &Path) -> Result<(Secret, TokenSource), DisplayError> {
    token_from(config, state_dir, credentials::credentials_dir().as_deref())
}

fn token_from(
    config: &DisplayConfig,
    state_dir: &Path,
    credentials_dir: Option<&Path>,
) -> Result<(Secret, TokenSource), DisplayError> {
    if let Some(path) = &config.token_file {
        return Ok((credentials::load_file(path)?, TokenSource::File(path.clone())));
    }
    if let Some(secret) = credentials::load_optional_from(None, TOKEN_CREDENTIAL, credentials_dir)? {
        return Ok((secret, TokenSource::Credential));
    }
    let path = state_dir.join(TOKEN_FILE);
    // A token file left empty (the disk filled up as it was made) is made again.
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
        let _ = std::fs::remove_file(&path);
    }
    if !path.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let made: String = (0..4).map(|_| format!("{:016x}", fastrand::u64(..))).collect();
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(made.as_bytes()).and_then(|()| f.sync_all()));
        match written {
            Ok(()) => log::info!(path:% = path.display(); "Made a token for the camera page"),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(DisplayError::TokenNotWritten { path, reason: e.to_string() });
            }
        }
    }
    Ok((credentials::load_file(&path)?, TokenSource::Made(path)))
}

/// The bay as the pages show it.
#[derive(Debug, Clone)]
pub struct BayInfo {
    pub bay_id: String,
    pub cameras: Vec<CameraInfo>,
}

/// What the display learns from the daemon.
#[derive(Debug)]
enum Input {
    State(Box<State>),
    Event(Box<Event>),
}

/// The running server. Dropping it (or [`Display::stop`]) closes every connection; an open
/// driver's page reconnects by itself once a daemon serves again.
pub struct Display {
    inputs: tokio::sync::mpsc::UnboundedSender<Input>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl Display {
    /// Listens on `config.listen` and serves from a thread of its own. `previews` reaches the
    /// capture thread for the camera page's frames.
    pub fn start(
        config: &DisplayConfig,
        bay: BayInfo,
        token: (Secret, TokenSource),
        previews: mpsc::Sender<PreviewJob>,
    ) -> Result<Display, DisplayError> {
        let listener = std::net::TcpListener::bind(config.listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| DisplayError::Listen { addr: config.listen, reason: e.to_string() })?;
        let addr = listener.local_addr().unwrap_or(config.listen);
        let (inputs, inbox) = tokio::sync::mpsc::unbounded_channel();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let board =
            Board::new(config.texts.clone(), config.lang.clone(), config.done_for, config.attention_for);
        let app = server::App::new(bay, token, previews, board.screen(std::time::Duration::ZERO));
        let thread = std::thread::Builder::new()
            .name("display".to_owned())
            .spawn(move || server::run(listener, app, board, inbox, stopped))
            .map_err(|e| DisplayError::Thread(e.to_string()))?;
        Ok(Display { inputs, stop: Some(stop), addr, thread: Some(thread) })
    }

    /// The address it listens on (the port, when `listen` asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The daemon published `state`.
    pub fn state(&self, state: &State) {
        let _ = self.inputs.send(Input::State(Box::new(state.clone())));
    }

    /// The daemon emitted `event`.
    pub fn event(&self, event: &Event) {
        let _ = self.inputs.send(Input::Event(Box::new(event.clone())));
    }

    /// Closes every connection and waits for the thread.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Display {
    fn drop(&mut self) {
        self.shut();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn without_a_configured_token_one_is_made_once_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let config = DisplayConfig::default();
        let (first, source) = token_from(&config, dir.path(), None).unwrap();
        let path = dir.path().join(TOKEN_FILE);
        assert_eq!(source, TokenSource::Made(path.clone()));
        assert_eq!(first.expose().len(), 64);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (again, _) = token_from(&config, dir.path(), None).unwrap();
        assert_eq!(first, again, "the token survives a restart");
        std::fs::write(&path, "").unwrap();
        let (remade, _) = token_from(&config, dir.path(), None).unwrap();
        assert_eq!(remade.expose().len(), 64, "a token file left empty is made again");
        assert!(source.how_to_read().contains(&path.display().to_string()));
    }

    #[test]
    fn a_port_already_taken_is_refused_with_the_address_and_the_fix() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = DisplayConfig { listen: taken.local_addr().unwrap(), ..DisplayConfig::default() };
        let bay = BayInfo { bay_id: "b".to_owned(), cameras: Vec::new() };
        let token = (Secret::new("t"), TokenSource::Credential);
        let Err(e) = Display::start(&config, bay, token, mpsc::channel().0) else {
            panic!("started on a taken port")
        };
        let e = e.to_string();
        assert!(e.contains(&config.listen.to_string()) && e.contains("[display] listen"), "{e}");
    }

    #[test]
    fn a_configured_token_file_others_can_read_is_refused_and_a_credential_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret-token\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = DisplayConfig { token_file: Some(file.clone()), ..DisplayConfig::default() };
        let e = token_from(&config, dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        std::fs::write(creds.join(TOKEN_CREDENTIAL), "from-systemd").unwrap();
        let (secret, source) = token_from(&DisplayConfig::default(), dir.path(), Some(&creds)).unwrap();
        assert_eq!((secret.expose(), source), ("from-systemd", TokenSource::Credential));
    }
}
