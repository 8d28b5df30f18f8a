//! `http://…` / `https://…`: an IP camera's snapshot URL, where one GET returns one JPEG.
//! Every request has a deadline and the body a size cap, so a hung or hostile camera can
//! neither stall an inspection nor exhaust memory. Cameras that ask for credentials get Basic
//! or Digest (RFC 7616, MD5 or SHA-256) answers; a Digest nonce is reused with a rising counter
//! so that a capture costs one request, not two.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::digest::Challenge;
use super::{redact_url, Camera, CameraFileError, CaptureError};
use crate::credentials::{self, Secret};
use crate::vehicle::PhotoLabel;

/// A camera's user and password. The password is a [`Secret`]: it never appears in `Debug`
/// output or messages.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    password: Secret,
    /// Where they came from, for messages.
    pub origin: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials {{ user: {:?}, password: ***, origin: {:?} }}", self.user, self.origin)
    }
}

impl Credentials {
    pub fn new(user: &str, password: &str, origin: &str) -> Credentials {
        Credentials { user: user.to_owned(), password: Secret::new(password), origin: origin.to_owned() }
    }

    /// The credentials of camera `id`: `file` when configured, else the systemd credential
    /// `camera-<id>` in `credentials_dir` (`$CREDENTIALS_DIRECTORY`) when it exists, else none.
    /// The file holds one line `user:password` and must be readable by its owner only
    /// ([`crate::credentials`] reads it).
    pub fn load(
        id: &str,
        file: Option<&Path>,
        credentials_dir: Option<&Path>,
    ) -> Result<Option<Credentials>, CameraFileError> {
        let name = credentials::camera_credential_name(id);
        let Some(secret) = credentials::load_optional_from(file, &name, credentials_dir)? else {
            return Ok(None);
        };
        // Where the secret was found, for messages: the file, else the systemd credential.
        let path = match (file, credentials_dir) {
            (Some(f), _) => f.to_owned(),
            (None, Some(dir)) => dir.join(&name),
            (None, None) => Path::new(&name).to_owned(),
        };
        let line = secret.expose().lines().next().unwrap_or("").trim_end_matches('\r');
        match line.split_once(':') {
            Some((user, password)) if !user.is_empty() && !password.is_empty() => {
                Ok(Some(Credentials::new(user, password, &path.display().to_string())))
            }
            _ => Err(CameraFileError::NotUserPassword { path }),
        }
    }
}

/// Reads PEM certificates that the camera's HTTPS certificate must chain to.
pub fn load_ca_file(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>, CameraFileError> {
    let certs = crate::trust::ca_certificates(path)?;
    Ok(certs.iter().map(|der| ureq::tls::Certificate::from_der(der).to_owned()).collect())
}

enum Scheme {
    /// No challenge seen yet: requests go without credentials.
    Unknown,
    Basic,
    Digest {
        challenge: Challenge,
        nc: u32,
    },
}

pub struct HttpCamera {
    id: String,
    url: String,
    max_frame_bytes: u64,
    agent: ureq::Agent,
    credentials: Option<Credentials>,
    scheme: Scheme,
}

impl HttpCamera {
    pub fn new(id: &str, url: &str, timeout: Duration, max_frame_bytes: u64) -> HttpCamera {
        HttpCamera {
            id: id.to_owned(),
            url: url.to_owned(),
            max_frame_bytes,
            agent: agent(timeout, None),
            credentials: None,
            scheme: Scheme::Unknown,
        }
    }

    pub fn with_credentials(mut self, credentials: Option<Credentials>) -> HttpCamera {
        self.credentials = credentials;
        self
    }

    /// Trusts only `certs` for HTTPS (a bay camera's own CA or self-signed certificate).
    pub fn with_ca_certs(
        mut self,
        certs: Vec<ureq::tls::Certificate<'static>>,
        timeout: Duration,
    ) -> HttpCamera {
        self.agent = agent(timeout, Some(certs));
        self
    }

    fn unreachable(&self, reason: String) -> CaptureError {
        CaptureError::Unreachable { camera: self.id.clone(), source_desc: redact_url(&self.url), reason }
    }

    fn no_frame(&self, reason: String) -> CaptureError {
        CaptureError::NoFrame { camera: self.id.clone(), source_desc: redact_url(&self.url), reason }
    }

    fn too_large(&self) -> CaptureError {
        CaptureError::TooLarge {
            camera: self.id.clone(),
            source_desc: redact_url(&self.url),
            limit: self.max_frame_bytes,
        }
    }

    fn authorization(&mut self) -> Option<String> {
        let creds = self.credentials.as_ref()?;
        match &mut self.scheme {
            Scheme::Unknown => None,
            Scheme::Basic => Some(format!(
                "Basic {}",
                super::testcam::base64(format!("{}:{}", creds.user, creds.password.expose()).as_bytes())
            )),
            Scheme::Digest { challenge, nc } => {
                *nc += 1;
                let uri = request_uri(&self.url);
                let cnonce = format!("{:016x}", fastrand::u64(..));
                Some(challenge.authorization(&creds.user, creds.password.expose(), "GET", &uri, *nc, &cnonce))
            }
        }
    }

    /// One GET answered with 200, after at most one credentials round trip.
    fn get(&mut self) -> Result<ureq::http::Response<ureq::Body>, CaptureError> {
        for _round in 0..3 {
            let mut request = self.agent.get(&self.url);
            let sent_auth = self.authorization();
            if let Some(h) = &sent_auth {
                request = request.header("Authorization", h);
            }
            let response = request.call().map_err(|e| self.unreachable(describe(&e)))?;
            let status = response.status().as_u16();
            if status == 200 {
                return Ok(response);
            }
            if status != 401 {
                return Err(self.no_frame(format!("HTTP status {status}")));
            }
            let Some(creds) = &self.credentials else {
                return Err(self.no_frame(
                    "HTTP status 401: the camera asks for credentials; set credentials_file for it"
                        .to_owned(),
                ));
            };
            let refused = || {
                format!(
                    "HTTP status 401: the camera refused the credentials of user {:?} from {}; check user and password",
                    creds.user, creds.origin
                )
            };
            let offered: Vec<&str> = response
                .headers()
                .get_all("www-authenticate")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if let Some(challenge) = Challenge::pick(offered.iter().copied()) {
                if sent_auth.is_some() && matches!(self.scheme, Scheme::Digest { .. }) && !challenge.stale {
                    return Err(self.no_frame(refused()));
                }
                self.scheme = Scheme::Digest { challenge, nc: 0 };
            } else if offered.iter().any(|h| h.trim_start().to_ascii_lowercase().starts_with("basic")) {
                if sent_auth.is_some() && matches!(self.scheme, Scheme::Basic) {
                    return Err(self.no_frame(refused()));
                }
                self.scheme = Scheme::Basic;
            } else {
                return Err(self.no_frame(format!(
                    "HTTP status 401 with no authentication scheme this kiosk speaks (offered: {}); set the camera to Basic or Digest (qop=auth, MD5 or SHA-256)",
                    offered.iter().map(|h| h.split(' ').next().unwrap_or("")).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        Err(self.no_frame("HTTP status 401 after answering the camera's challenge".to_owned()))
    }
}

impl Camera for HttpCamera {
    fn capture(&mut self, _angle: PhotoLabel) -> Result<Vec<u8>, CaptureError> {
        let mut response = self.get()?;
        // One byte over the cap is enough to know the frame is too large.
        match response.body_mut().with_config().limit(self.max_frame_bytes.saturating_add(1)).read_to_vec() {
            Ok(body) if body.len() as u64 > self.max_frame_bytes => Err(self.too_large()),
            Ok(body) => Ok(body),
            Err(ureq::Error::BodyExceedsLimit(_)) => Err(self.too_large()),
            Err(e) => Err(self.unreachable(format!("the frame was cut off: {}", describe(&e)))),
        }
    }

    /// Asks for a snapshot but reads only its first bytes: the camera answers, with a JPEG.
    fn probe(&mut self) -> Result<(), CaptureError> {
        let mut response = self.get()?;
        let mut head = [0u8; 3];
        let mut reader = response.body_mut().as_reader();
        reader.read_exact(&mut head).map_err(|e| self.unreachable(format!("the answer was cut off: {e}")))?;
        if head != [0xFF, 0xD8, 0xFF] {
            return Err(
                self.no_frame(format!("the answer is not a JPEG (it starts with {})", hex::encode(head)))
            );
        }
        Ok(())
    }
}

fn agent(timeout: Duration, ca: Option<Vec<ureq::tls::Certificate<'static>>>) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .user_agent(concat!("capture-kiosk/", env!("CARGO_PKG_VERSION")));
    if let Some(certs) = ca {
        config = config.tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)))
                .build(),
        );
    }
    config.build().into()
}

/// The request target of `url` (path and query), as Digest signs it.
fn request_uri(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    match rest.find('/') {
        Some(i) => rest[i..].split('#').next().unwrap_or("/").to_owned(),
        None => "/".to_owned(),
    }
}

fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(_) => "no answer before the camera's timeout".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signed_uri_is_the_path_and_query() {
        assert_eq!(request_uri("http://cam:8080/cgi-bin/snap.cgi?ch=1#x"), "/cgi-bin/snap.cgi?ch=1");
        assert_eq!(request_uri("http://cam"), "/");
    }

    #[test]
    fn credentials_files_must_be_private_and_well_formed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cam");
        std::fs::write(&file, "admin:s3cret-pw\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Credentials::load("front", Some(&file), None).unwrap_err().to_string();
        assert!(err.contains("chmod 600") && err.contains("cam") && !err.contains("s3cret"), "{err}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Credentials::load("front", Some(&file), None).unwrap().unwrap();
        assert_eq!((c.user.as_str(), c.password.expose()), ("admin", "s3cret-pw"));
        assert!(!format!("{c:?}").contains("s3cret"));
        std::fs::write(&file, "no-colon\n").unwrap();
        let err = Credentials::load("front", Some(&file), None).unwrap_err();
        assert_eq!(err.key(), "credentials_file");
        assert!(err.to_string().contains("user:password"), "{err}");
        // The systemd credential is found by the camera's id, and its absence is no error.
        std::fs::write(dir.path().join("camera-rear"), "op:pw:with:colons").unwrap();
        let c = Credentials::load("rear", None, Some(dir.path())).unwrap().unwrap();
        assert_eq!((c.user.as_str(), c.password.expose()), ("op", "pw:with:colons"));
        assert!(c.origin.ends_with("camera-rear"), "{c:?}");
        assert_eq!(Credentials::load("side", None, Some(dir.path())).unwrap(), None);
    }
}
