//! The certificates a peer's certificate must chain to: the public roots `[cloud] trust` names
//! (the Mozilla set built into the program, the system's store, or both) and the PEM CA files of
//! the configuration (`[cloud] ca_file`, a camera's `ca_file`). Loading them is plain file and
//! PEM reading, with no HTTP client: `config` checks them when it loads a file, and the cloud's
//! and the cameras' HTTP clients make their root stores from what is read here.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// `[cloud] trust`: the public roots the cloud's certificate may chain to. `ca_file` adds to
/// whichever is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudTrust {
    /// The Mozilla roots built into the program (the default): the same on every bay, whatever
    /// the image's `ca-certificates`.
    Bundled,
    /// The operating system's store (`/etc/ssl/certs`), where a site's IT adds its own CAs.
    System,
    /// Both of the above.
    Both,
}

impl CloudTrust {
    /// As written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            CloudTrust::Bundled => "bundled",
            CloudTrust::System => "system",
            CloudTrust::Both => "both",
        }
    }

    /// The choice written as `text`, if it is one.
    pub fn parse(text: &str) -> Option<CloudTrust> {
        match text.trim() {
            "bundled" => Some(CloudTrust::Bundled),
            "system" => Some(CloudTrust::System),
            "both" => Some(CloudTrust::Both),
            _ => None,
        }
    }
}

/// Why the roots the cloud's certificate is checked against could not be loaded. Retrying does
/// not help: the configuration or the file must be fixed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// `ca_file` is missing or cannot be read.
    #[error("CA file {path} cannot be read: {reason}; point cloud.ca_file at the PEM file of the private CA (or of the TLS-inspecting proxy)")]
    CaFileUnreadable { path: PathBuf, reason: String },
    /// `ca_file` is not PEM, or a certificate in it is damaged.
    #[error("CA file {path} is not valid PEM: {reason}; give the CA certificates in PEM (-----BEGIN CERTIFICATE-----)")]
    CaFileNotPem { path: PathBuf, reason: String },
    /// `ca_file` holds no certificate (a key alone, or nothing).
    #[error("CA file {path} holds no certificate; give the PEM file of the CA that signed the cloud's certificate")]
    CaFileEmpty { path: PathBuf },
    /// `trust = "system"` but the system's store gave nothing.
    #[error("the system trust store holds no certificate ({reason}); install the ca-certificates package or set cloud.trust = \"bundled\"")]
    SystemStoreEmpty { reason: String },
}

impl TrustError {
    /// The configuration key at fault.
    pub fn key(&self) -> &'static str {
        match self {
            TrustError::SystemStoreEmpty { .. } => "cloud.trust",
            _ => "cloud.ca_file",
        }
    }
}

/// Why a PEM file of CA certificates cannot be used. Not retryable: the file must be fixed.
/// The messages name the file; the caller adds which key names it and what to put in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaFileError {
    /// The file is missing or cannot be read.
    #[error("CA file {path} cannot be read: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    /// A PEM section of the file is damaged.
    #[error("CA file {path} is not valid PEM: {reason}")]
    NotPem { path: PathBuf, reason: String },
    /// The file holds no certificate (a key alone, or nothing).
    #[error("CA file {path} holds no certificate")]
    Empty { path: PathBuf },
}

impl From<CaFileError> for TrustError {
    fn from(e: CaFileError) -> TrustError {
        match e {
            CaFileError::Unreadable { path, reason } => TrustError::CaFileUnreadable { path, reason },
            CaFileError::NotPem { path, reason } => TrustError::CaFileNotPem { path, reason },
            CaFileError::Empty { path } => TrustError::CaFileEmpty { path },
        }
    }
}

/// The roots a client checks the cloud's certificate against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// The bundled Mozilla set alone, which every client carries and needs no loading.
    Bundled,
    /// An explicit list: the bundled set, the system's store and/or a CA file, as configured.
    Specific(Vec<CertificateDer<'static>>),
}

/// Loads every root that `trust` and `ca_file` name. Parts of the system store that cannot be
/// read are logged and skipped, as long as some certificate was found.
pub fn roots(trust: CloudTrust, ca_file: Option<&Path>) -> Result<Roots, TrustError> {
    if trust == CloudTrust::Bundled && ca_file.is_none() {
        return Ok(Roots::Bundled);
    }
    let mut certs: Vec<CertificateDer<'static>> = Vec::new();
    if matches!(trust, CloudTrust::Bundled | CloudTrust::Both) {
        certs.extend(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
    }
    if matches!(trust, CloudTrust::System | CloudTrust::Both) {
        let found = rustls_native_certs::load_native_certs();
        if found.certs.is_empty() {
            let reason = found
                .errors
                .first()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "no certificate found in the usual places".to_owned());
            return Err(TrustError::SystemStoreEmpty { reason });
        }
        for e in &found.errors {
            log::warn!(error:% = e; "Part of the system trust store could not be read");
        }
        certs.extend(found.certs);
    }
    if let Some(path) = ca_file {
        certs.extend(ca_certificates(path)?);
    }
    Ok(Roots::Specific(certs))
}

/// Loads the roots as [`roots`] does, to tell `check` (and the daemon at start and at a reload)
/// about a bad `ca_file` or an empty system store before any upload is tried. Returns how many
/// roots the cloud's certificate may chain to (0 for the bundled set alone, which needs no
/// loading).
pub fn check(trust: CloudTrust, ca_file: Option<&Path>) -> Result<usize, TrustError> {
    match roots(trust, ca_file)? {
        Roots::Specific(certs) => Ok(certs.len()),
        Roots::Bundled => Ok(0),
    }
}

/// The certificates of a PEM file (other PEM sections, such as a key, are skipped).
pub fn ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let pem = std::fs::read(path)
        .map_err(|e| CaFileError::Unreadable { path: path.to_owned(), reason: e.to_string() })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CaFileError::NotPem { path: path.to_owned(), reason: format!("PEM: {e:?}") })?;
    if certs.is_empty() {
        return Err(CaFileError::Empty { path: path.to_owned() });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_roots_alone_need_no_loading() {
        assert_eq!(roots(CloudTrust::Bundled, None), Ok(Roots::Bundled));
        assert_eq!(check(CloudTrust::Bundled, None), Ok(0));
        for trust in [CloudTrust::Bundled, CloudTrust::System, CloudTrust::Both] {
            assert_eq!(CloudTrust::parse(trust.as_str()), Some(trust));
        }
        assert_eq!(CloudTrust::parse("mozilla"), None);
    }

    #[test]
    fn a_ca_file_must_hold_a_certificate_in_pem() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing.pem");
        let err = roots(CloudTrust::Bundled, Some(&missing)).unwrap_err();
        assert!(matches!(err, TrustError::CaFileUnreadable { .. }) && err.key() == "cloud.ca_file", "{err}");
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let key_only = tmp.path().join("key.pem");
        std::fs::write(&key_only, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        let err = ca_certificates(&key_only).unwrap_err();
        assert_eq!(err, CaFileError::Empty { path: key_only.clone() });
        let err = TrustError::from(err);
        assert!(err.to_string().contains("holds no certificate; give the PEM file"), "{err}");

        let broken = tmp.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        assert!(matches!(ca_certificates(&broken), Err(CaFileError::NotPem { .. })));
    }
}
