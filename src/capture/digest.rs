//! HTTP Digest access authentication (RFC 7616) as bay cameras use it: `qop=auth` with MD5 or
//! SHA-256, a client nonce and a request counter. Both sides live here, the client's answer for
//! [`super::HttpCamera`] and the check for the commissioning camera in [`super::testcam`].

use md5::Md5;
use sha2::{Digest as _, Sha256};

/// The hash a challenge asks for. SHA-256 is preferred when a camera offers both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    fn parse(name: &str) -> Option<Algorithm> {
        match name.to_ascii_uppercase().as_str() {
            "MD5" => Some(Algorithm::Md5),
            "SHA-256" => Some(Algorithm::Sha256),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    fn hash(self, text: &str) -> String {
        match self {
            Algorithm::Md5 => hex::encode(Md5::digest(text.as_bytes())),
            Algorithm::Sha256 => hex::encode(Sha256::digest(text.as_bytes())),
        }
    }
}

/// A `WWW-Authenticate: Digest …` challenge this client can answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub opaque: Option<String>,
    pub algorithm: Algorithm,
    /// The server said the last nonce expired; the credentials themselves were fine.
    pub stale: bool,
}

impl Challenge {
    /// The best challenge among a response's `WWW-Authenticate` headers: SHA-256 before MD5,
    /// and only those that offer `qop=auth` (the legacy mode without it is not supported).
    pub fn pick<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<Challenge> {
        let mut found: Vec<Challenge> = headers.into_iter().filter_map(Challenge::parse).collect();
        found.sort_by_key(|c| c.algorithm != Algorithm::Sha256);
        found.into_iter().next()
    }

    pub fn parse(header: &str) -> Option<Challenge> {
        let (scheme, rest) = header.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("digest") {
            return None;
        }
        let params = parse_params(rest);
        let get = |k: &str| params.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
        let qop_auth =
            get("qop").is_some_and(|q| q.split(',').any(|q| q.trim().eq_ignore_ascii_case("auth")));
        if !qop_auth {
            return None;
        }
        let algorithm = match get("algorithm") {
            None => Algorithm::Md5,
            Some(a) => Algorithm::parse(&a)?,
        };
        Some(Challenge {
            realm: get("realm")?,
            nonce: get("nonce")?,
            opaque: get("opaque"),
            algorithm,
            stale: get("stale").is_some_and(|s| s.eq_ignore_ascii_case("true")),
        })
    }

    /// The `Authorization` header value for request number `nc` under this challenge.
    pub fn authorization(
        &self,
        user: &str,
        password: &str,
        method: &str,
        uri: &str,
        nc: u32,
        cnonce: &str,
    ) -> String {
        let nc = format!("{nc:08x}");
        let response =
            response(self.algorithm, user, &self.realm, password, method, uri, &self.nonce, &nc, cnonce);
        let mut header = format!(
            "Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{}\", algorithm={}, qop=auth, nc={nc}, cnonce=\"{cnonce}\", response=\"{response}\"",
            quote(user),
            quote(&self.realm),
            quote(&self.nonce),
            quote(uri),
            self.algorithm.name()
        );
        if let Some(opaque) = &self.opaque {
            header.push_str(&format!(", opaque=\"{}\"", quote(opaque)));
        }
        header
    }
}

/// The `response` value of RFC 7616 section 3.4.1 for `qop=auth`.
#[allow(clippy::too_many_arguments)]
pub fn response(
    algorithm: Algorithm,
    user: &str,
    realm: &str,
    password: &str,
    method: &str,
    uri: &str,
    nonce: &str,
    nc: &str,
    cnonce: &str,
) -> String {
    let ha1 = algorithm.hash(&format!("{user}:{realm}:{password}"));
    let ha2 = algorithm.hash(&format!("{method}:{uri}"));
    algorithm.hash(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"))
}

/// A server's check of an `Authorization: Digest …` header against the one user it knows.
#[allow(clippy::too_many_arguments)]
pub fn verify(header: &str, method: &str, realm: &str, nonce: &str, user: &str, password: &str) -> bool {
    let Some((scheme, rest)) = header.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("digest") {
        return false;
    }
    let params = parse_params(rest);
    let get = |k: &str| params.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.as_str());
    let (Some(u), Some(r), Some(n), Some(uri), Some(nc), Some(cnonce), Some(given)) =
        (get("username"), get("realm"), get("nonce"), get("uri"), get("nc"), get("cnonce"), get("response"))
    else {
        return false;
    };
    let Some(algorithm) = Algorithm::parse(get("algorithm").unwrap_or("MD5")) else {
        return false;
    };
    if u != user || r != realm || n != nonce || get("qop") != Some("auth") {
        return false;
    }
    response(algorithm, user, realm, password, method, uri, nonce, nc, cnonce) == given
}

fn quote(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// `a=b, c="d, e"` into pairs, honouring quoted strings and backslash escapes.
fn parse_params(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut name = String::new();
        while let Some(c) = chars.peek().copied() {
            if c == '=' || c == ',' {
                break;
            }
            name.push(c);
            chars.next();
        }
        if name.trim().is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next()),
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(c) = chars.peek().copied() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        out.push((name.trim().to_owned(), value.trim().to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_7616_examples_give_the_published_responses() {
        // RFC 7616 section 3.9.1: user Mufasa, password "Circle of Life".
        let nonce = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v";
        let cnonce = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";
        let md5 = response(
            Algorithm::Md5,
            "Mufasa",
            "http-auth@example.org",
            "Circle of Life",
            "GET",
            "/dir/index.html",
            nonce,
            "00000001",
            cnonce,
        );
        assert_eq!(md5, "8ca523f5e9506fed4657c9700eebdbec");
        let sha = response(
            Algorithm::Sha256,
            "Mufasa",
            "http-auth@example.org",
            "Circle of Life",
            "GET",
            "/dir/index.html",
            nonce,
            "00000001",
            cnonce,
        );
        assert_eq!(sha, "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1");
    }

    #[test]
    fn challenges_parse_and_sha256_is_preferred() {
        let md5 = r#"Digest realm="bay", qop="auth,auth-int", nonce="abc, def", opaque="xyz""#;
        let sha = r#"Digest realm="bay", qop="auth", algorithm=SHA-256, nonce="n2", stale=TRUE"#;
        let c = Challenge::parse(md5).expect("md5 challenge");
        assert_eq!(
            (c.algorithm, c.nonce.as_str(), c.opaque.as_deref()),
            (Algorithm::Md5, "abc, def", Some("xyz"))
        );
        let picked = Challenge::pick([md5, sha, "Basic realm=\"bay\""]).expect("a challenge");
        assert_eq!((picked.algorithm, picked.stale), (Algorithm::Sha256, true));
        assert!(Challenge::parse(r#"Digest realm="bay", nonce="n""#).is_none(), "no qop=auth");
        assert!(
            Challenge::parse(r#"Digest realm="bay", qop="auth", nonce="n", algorithm=SHA-512-256"#).is_none()
        );
    }

    #[test]
    fn an_answer_verifies_only_with_the_right_password() {
        let c = Challenge::parse(r#"Digest realm="bay", qop="auth", algorithm=SHA-256, nonce="n1""#).unwrap();
        let header = c.authorization("admin", "pa\"ss", "GET", "/snap.jpg?ch=1", 1, "c0ffee");
        assert!(verify(&header, "GET", "bay", "n1", "admin", "pa\"ss"));
        assert!(!verify(&header, "GET", "bay", "n1", "admin", "wrong"));
        assert!(!verify(&header, "GET", "bay", "n2", "admin", "pa\"ss"));
    }
}
