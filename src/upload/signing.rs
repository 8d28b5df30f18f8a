//! Request signing as the cloud API defines it: lowercase hex HMAC-SHA256, keyed with the API
//! secret, over `{username}:{api_key}@{timestamp}`, with the timestamp in `YYYY-MM-DDTHH:MM:SSZ`
//! made at send time. Pure: the time is an argument.

use std::time::SystemTime;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::credentials::Secret;

/// The three signing headers of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub api_key: String,
    pub timestamp: String,
    /// Derived from the secret but not the secret; still, it is only ever sent, never logged.
    pub token: String,
}

/// Signs a request sent at `now`.
pub fn sign(secret: &Secret, username: &str, api_key: &str, now: SystemTime) -> Signature {
    let timestamp = api_timestamp(now);
    let token = token(secret, username, api_key, &timestamp);
    Signature { api_key: api_key.to_owned(), timestamp, token }
}

/// `API-Timestamp`: UTC, second precision, literal `Z`.
pub fn api_timestamp(now: SystemTime) -> String {
    crate::clock::rfc3339_seconds(now)
}

/// `API-Token` for a given timestamp string.
pub fn token(secret: &Secret, username: &str, api_key: &str, timestamp: &str) -> String {
    // HMAC accepts a key of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
    };
    mac.update(format!("{username}:{api_key}@{timestamp}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn the_token_is_hmac_sha256_of_the_documented_message() {
        // Reference value computed independently with:
        // printf 'acme:KEY123@2026-11-21T10:00:03Z' | openssl dgst -sha256 -hmac 'topsecret'
        let expected = "dfabd7e4d257ba07f9a1b6bf4a51c932066732c80e1cab0ad084a8feffa09ad3";
        let got = token(&Secret::new("topsecret"), "acme", "KEY123", "2026-11-21T10:00:03Z");
        assert_eq!(got, expected);
    }

    #[test]
    fn the_timestamp_is_made_from_the_send_time() {
        let now = UNIX_EPOCH + Duration::from_secs(1_795_255_203) + Duration::from_millis(999);
        let s = sign(&Secret::new("k"), "u", "a", now);
        assert_eq!(s.timestamp, "2026-11-21T10:00:03Z");
        assert_eq!(s.token, token(&Secret::new("k"), "u", "a", "2026-11-21T10:00:03Z"));
        assert_ne!(s.token, token(&Secret::new("k"), "u", "a", "2026-11-21T10:00:04Z"));
    }
}
