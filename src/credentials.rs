//! The kiosk's secrets (the cloud's API secret, IP cameras' passwords, the MQTT password, the
//! MQTT client key): read from a file only its owner can read, or from systemd's credential
//! directory, and held in a [`Secret`] that never shows itself in `Debug`, `Display` or a panic.
//!
//! A file the configuration names must exist and be readable by its owner alone (mode 600 or
//! 400). Without one, the systemd credential of the same purpose is used: the file `NAME` in
//! `$CREDENTIALS_DIRECTORY`, which systemd fills from `LoadCredential=NAME:…` and makes
//! readable only by the service, so its mode is not checked.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A secret value (API secret, password, private key, token). `Debug` prints `Secret(***)` and
/// `Display` prints `***`; the bytes leave only through [`Secret::expose`], at the one place
/// that must use them. It is deliberately not `Serialize`.
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

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Why a secret could not be loaded. Messages name the file, never its content. No variant is
/// helped by retrying: a person must fix the file or the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// The file is missing, or the kiosk's user may not read it.
    #[error("secret file {path} cannot be read: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    /// A configured file that others than its owner can read: refused before it is read.
    #[error("secret file {path} can be read by group or others (mode {mode:o}); run `chmod 600 {path}` (or 400) and make the kiosk's user its owner")]
    TooOpen { path: PathBuf, mode: u32 },
    /// The file holds nothing but white space.
    #[error("secret file {path} is empty; put the secret in it")]
    Empty { path: PathBuf },
    /// The API secret is required, and neither a file nor a systemd credential gives it.
    #[error(
        "no API secret: set [cloud] api_secret_file, or give the service a systemd credential named {name}"
    )]
    Missing { name: String },
}

/// The name of the systemd credential that holds the cloud's API secret.
pub const CREDENTIAL_NAME: &str = "api-secret";

/// The name of the systemd credential that holds the MQTT password.
pub const MQTT_PASSWORD_CREDENTIAL: &str = "mqtt-password";

/// The name of the systemd credential that holds IP camera `camera_id`'s `user:password`.
pub fn camera_credential_name(camera_id: &str) -> String {
    format!("camera-{camera_id}")
}

/// systemd's credential directory of this process (`$CREDENTIALS_DIRECTORY`), when it has one.
pub fn credentials_dir() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
}

/// Loads the API secret from `file` when given, otherwise from `$CREDENTIALS_DIRECTORY/api-secret`
/// (systemd's `LoadCredential=`), which systemd makes readable only by the service. Unlike
/// [`load_optional`], the secret is required: without either, [`CredentialError::Missing`].
pub fn load_secret(file: Option<&Path>, credentials_dir: Option<&Path>) -> Result<Secret, CredentialError> {
    match (file, credentials_dir) {
        (Some(path), _) => load_file(path),
        (None, Some(dir)) => read(&dir.join(CREDENTIAL_NAME), false),
        (None, None) => Err(CredentialError::Missing { name: CREDENTIAL_NAME.to_owned() }),
    }
}

/// Loads a secret that may be absent: the configured `path` (which must exist and be owner-only),
/// else the systemd credential `credential_name` of this process when it exists, else `None`.
/// The MQTT password is `load_optional(mqtt.password_file, MQTT_PASSWORD_CREDENTIAL)`.
pub fn load_optional(path: Option<&Path>, credential_name: &str) -> Result<Option<Secret>, CredentialError> {
    load_optional_from(path, credential_name, credentials_dir().as_deref())
}

/// [`load_optional`] with the credential directory given instead of read from the environment.
pub fn load_optional_from(
    path: Option<&Path>,
    credential_name: &str,
    credentials_dir: Option<&Path>,
) -> Result<Option<Secret>, CredentialError> {
    match (path, credentials_dir) {
        (Some(path), _) => load_file(path).map(Some),
        (None, Some(dir)) if dir.join(credential_name).is_file() => {
            read(&dir.join(credential_name), false).map(Some)
        }
        _ => Ok(None),
    }
}

/// Reads a configured secret file, which only its owner may read (mode 600 or 400).
pub fn load_file(path: &Path) -> Result<Secret, CredentialError> {
    read(path, true)
}

/// Reads `path`, refusing it first when `check_mode` and group or others may read it. Leading
/// and trailing white space (the final newline of an editor) is not part of the secret.
fn read(path: &Path, check_mode: bool) -> Result<Secret, CredentialError> {
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

    fn private(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn secrets_never_show_themselves() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s:#?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(Secret(***))");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }

    #[test]
    fn a_secret_file_others_can_read_is_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("api-secret");
        for mode in [0o644, 0o640, 0o604, 0o660] {
            private(&path, "s3cr3t-value\n", mode);
            for err in [
                load_secret(Some(&path), None).unwrap_err(),
                load_optional_from(Some(&path), "x", None).unwrap_err(),
                load_file(&path).unwrap_err(),
            ] {
                let shown = err.to_string();
                assert_eq!(err, CredentialError::TooOpen { path: path.clone(), mode }, "{shown}");
                assert!(shown.contains(&path.display().to_string()), "{shown}");
                assert!(shown.contains("chmod 600") && !shown.contains("s3cr3t"), "{shown}");
            }
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(load_secret(Some(&path), None).unwrap().expose(), "s3cr3t-value");
            assert_eq!(load_optional_from(Some(&path), "x", None).unwrap().unwrap().expose(), "s3cr3t-value");
        }
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

    #[test]
    fn an_optional_secret_comes_from_the_file_else_the_credential_else_nowhere() {
        let tmp = tempfile::tempdir().unwrap();
        let creds = tmp.path().join("credentials");
        std::fs::create_dir(&creds).unwrap();
        // systemd makes the directory private to the service; the mode of its files is its own.
        private(&creds.join(MQTT_PASSWORD_CREDENTIAL), "from-systemd\n", 0o644);
        let found = load_optional_from(None, MQTT_PASSWORD_CREDENTIAL, Some(&creds)).unwrap();
        assert_eq!(found.unwrap().expose(), "from-systemd");
        assert_eq!(load_optional_from(None, "camera-rear", Some(&creds)), Ok(None), "no such credential");
        assert_eq!(load_optional_from(None, MQTT_PASSWORD_CREDENTIAL, None), Ok(None), "not under systemd");

        // A configured file wins over the credential, and must exist.
        let file = tmp.path().join("mqtt-password");
        private(&file, "from-file", 0o600);
        let found = load_optional_from(Some(&file), MQTT_PASSWORD_CREDENTIAL, Some(&creds)).unwrap();
        assert_eq!(found.unwrap().expose(), "from-file");
        let missing = tmp.path().join("nowhere");
        let err = load_optional_from(Some(&missing), MQTT_PASSWORD_CREDENTIAL, Some(&creds)).unwrap_err();
        assert!(matches!(err, CredentialError::Unreadable { .. }), "{err}");
        assert!(err.to_string().contains("nowhere"), "{err}");
        assert_eq!(camera_credential_name("rear"), "camera-rear");
    }
}
