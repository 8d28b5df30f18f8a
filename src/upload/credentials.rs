//! The account secret: read from a file only its owner can read, or from systemd's credential
//! directory, and held in a [`Secret`] that never shows itself in `Debug`, `Display` or a panic.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A secret value (API secret, token). `Debug` prints `Secret(***)`; the bytes leave only through
/// [`Secret::expose`], at the one place that must use them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for signing or an `Authorization` header. Never log what this returns.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Why the secret could not be loaded. Messages name the file, never its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("secret file {path} cannot be read: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("secret file {path} can be read by group or others (mode {mode:o}); run `chmod 600 {path}` (or 400) and make the kiosk's user its owner")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("secret file {path} is empty; put the account's API secret in it")]
    Empty { path: PathBuf },
    #[error(
        "no API secret: set [cloud] api_secret_file, or give the service a systemd credential named {name}"
    )]
    Missing { name: String },
    /// The roots the cloud's certificate is checked against (`ca_file`, the system store).
    #[error(transparent)]
    Trust(#[from] super::client::TrustError),
}

/// The name of the systemd credential that holds the API secret.
pub const CREDENTIAL_NAME: &str = "api-secret";

/// Loads the secret from `file` when given, otherwise from `$CREDENTIALS_DIRECTORY/api-secret`
/// (systemd's `LoadCredential=`), which systemd makes readable only by the service.
pub fn load_secret(file: Option<&Path>, credentials_dir: Option<&Path>) -> Result<Secret, CredentialError> {
    match (file, credentials_dir) {
        (Some(path), _) => read_private(path, true),
        (None, Some(dir)) => read_private(&dir.join(CREDENTIAL_NAME), false),
        (None, None) => Err(CredentialError::Missing { name: CREDENTIAL_NAME.to_owned() }),
    }
}

fn read_private(path: &Path, check_mode: bool) -> Result<Secret, CredentialError> {
    let unreadable =
        |e: std::io::Error| CredentialError::Unreadable { path: path.to_owned(), reason: e.to_string() };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    let mode = meta.permissions().mode() & 0o777;
    if check_mode && mode & 0o077 != 0 {
        return Err(CredentialError::TooOpen { path: path.to_owned(), mode });
    }
    let text = std::fs::read_to_string(path).map_err(unreadable)?;
    let value = text.trim();
    if value.is_empty() {
        return Err(CredentialError::Empty { path: path.to_owned() });
    }
    Ok(Secret(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_themselves() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(Secret(***))");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }

    #[test]
    fn a_secret_file_others_can_read_is_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("api-secret");
        std::fs::write(&path, "s3cr3t-value\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_secret(Some(&path), None).unwrap_err();
        let shown = err.to_string();
        assert!(matches!(err, CredentialError::TooOpen { mode: 0o644, .. }), "{shown}");
        assert!(shown.contains("chmod 600") && !shown.contains("s3cr3t"), "{shown}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_secret(Some(&path), None).unwrap().expose(), "s3cr3t-value");
    }

    #[test]
    fn the_systemd_credential_is_used_when_no_file_is_configured() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(CREDENTIAL_NAME), "from-systemd").unwrap();
        assert_eq!(load_secret(None, Some(tmp.path())).unwrap().expose(), "from-systemd");
        assert!(matches!(load_secret(None, None), Err(CredentialError::Missing { .. })));
        std::fs::write(tmp.path().join(CREDENTIAL_NAME), "  \n").unwrap();
        assert!(matches!(load_secret(None, Some(tmp.path())), Err(CredentialError::Empty { .. })));
    }
}
