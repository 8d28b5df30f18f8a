//! The wire side of the stand-in: a deliberately small HTTP/1.1 server written on plain sockets,
//! so that fault injection can hold, drop or reset a connection at any byte. It parses a
//! request head (bounded), writes a JSON response with a `Date` header, and closes every
//! connection after one exchange (`Connection: close`).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The request line and headers may not exceed this many bytes (431 beyond).
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;
/// At most this many header lines (431 beyond).
const MAX_HEADERS: usize = 100;
/// How long a client may take to send the request head in full.
pub(crate) const HEAD_DEADLINE: Duration = Duration::from_secs(60);
/// How long a single read or write may wait before the connection is given up.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// After a response that left part of the request unread, keep reading (and discarding) for
/// this long without data, at most [`LINGER_TOTAL`] in all, so that the client can finish
/// sending and then read the response instead of being reset (nginx's `lingering_timeout`).
const LINGER_IDLE: Duration = Duration::from_secs(5);
/// nginx's `lingering_time`.
const LINGER_TOTAL: Duration = Duration::from_secs(30);

/// A parsed request line and header block.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The value of a header that must appear at most once; `Err` when it appears twice.
    pub fn unique(&self, name: &str) -> Result<Option<&str>, ()> {
        let mut found = None;
        for (n, v) in &self.headers {
            if n.eq_ignore_ascii_case(name) {
                if found.is_some() {
                    return Err(());
                }
                found = Some(v.as_str());
            }
        }
        Ok(found)
    }

    /// Whether the header appears at all.
    pub fn has(&self, name: &str) -> bool {
        self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }
}

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// The head is larger than [`MAX_HEAD_BYTES`] or has more than [`MAX_HEADERS`] lines: 431.
    TooLarge,
    /// The head breaks HTTP/1.1 syntax: 400 with the reason.
    Malformed(&'static str),
    /// A protocol version other than HTTP/1.0 or HTTP/1.1: 505.
    Version,
}

/// Where the head ends (just after the blank line), if it is complete.
pub(crate) fn head_end(buf: &[u8], searched_from: usize) -> Option<usize> {
    let start = searched_from.saturating_sub(3);
    buf.get(start..)?.windows(4).position(|w| w == b"\r\n\r\n").map(|p| start + p + 4)
}

/// Parses a complete head, including the final blank line.
pub(crate) fn parse_head(raw: &[u8]) -> Result<Head, HeadError> {
    let text = raw
        .strip_suffix(b"\r\n\r\n")
        .ok_or(HeadError::Malformed("the request head does not end with CRLF CRLF"))?;
    let mut lines = split_crlf(text)?;
    let request_line = lines.next().ok_or(HeadError::Malformed("the request line is missing"))?;
    let (method, path) = parse_request_line(request_line)?;
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() == MAX_HEADERS {
            return Err(HeadError::TooLarge);
        }
        headers.push(parse_header_line(line)?);
    }
    Ok(Head { method, path, headers })
}

fn split_crlf(text: &[u8]) -> Result<impl Iterator<Item = &[u8]>, HeadError> {
    // A bare CR or LF inside a line is refused: it is how request smuggling starts.
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'\r' if text.get(i + 1) == Some(&b'\n') => i += 2,
            b'\r' | b'\n' => {
                return Err(HeadError::Malformed("a line of the request head ends without CRLF"))
            }
            _ => i += 1,
        }
    }
    Ok(SplitCrlf { rest: Some(text) })
}

struct SplitCrlf<'a> {
    rest: Option<&'a [u8]>,
}

impl<'a> Iterator for SplitCrlf<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = self.rest?;
        match rest.windows(2).position(|w| w == b"\r\n") {
            Some(p) => {
                self.rest = Some(&rest[p + 2..]);
                Some(&rest[..p])
            }
            None => {
                self.rest = None;
                Some(rest)
            }
        }
    }
}

fn parse_request_line(line: &[u8]) -> Result<(String, String), HeadError> {
    let line =
        std::str::from_utf8(line).map_err(|_| HeadError::Malformed("the request line is not ASCII"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed("the request line is not METHOD SP TARGET SP VERSION"));
    };
    if method.is_empty() || method.len() > 16 || !method.bytes().all(is_token_byte) {
        return Err(HeadError::Malformed("the method is not a token"));
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        v if v.starts_with("HTTP/") => return Err(HeadError::Version),
        _ => return Err(HeadError::Malformed("the protocol is not HTTP")),
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(HeadError::Malformed("the request target is not an absolute path"));
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Ok((method.to_owned(), path.to_owned()))
}

fn parse_header_line(line: &[u8]) -> Result<(String, String), HeadError> {
    if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
        return Err(HeadError::Malformed("folded header lines are not accepted"));
    }
    let colon =
        line.iter().position(|b| *b == b':').ok_or(HeadError::Malformed("a header line has no colon"))?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().copied().all(is_token_byte) {
        return Err(HeadError::Malformed("a header name is not a token"));
    }
    let value = line[colon + 1..].trim_ascii();
    if value.iter().any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f) {
        return Err(HeadError::Malformed("a header value has a control character"));
    }
    // Names are tokens, hence ASCII. Values are kept as text; bytes above 0x7f become U+FFFD.
    Ok((String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(value).into_owned()))
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A response: a status, a JSON body and the few headers the API uses.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Response {
    pub status: u16,
    pub body: serde_json::Value,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
    /// `Allow`, for 405.
    pub allow: Option<&'static str>,
}

impl Response {
    pub fn json(status: u16, body: serde_json::Value) -> Response {
        Response { status, body, retry_after: None, allow: None }
    }

    /// The usual error shape: `{"message": "..."}`.
    pub fn message(status: u16, message: impl Into<String>) -> Response {
        Response::json(status, serde_json::json!({ "message": message.into() }))
    }
}

/// The byte stream of one exchange: plain TCP, or TLS over TCP.
pub(crate) trait Wire: Read + Write {
    /// The socket underneath, for timeouts and shutdown.
    fn tcp(&self) -> &TcpStream;
    /// No more writes (TLS sends its `close_notify` first), then FIN.
    fn end_writes(&mut self);
}

impl Wire for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }

    fn end_writes(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

/// Writes the whole response, with `Date` taken from the stand-in's clock.
pub(crate) fn write_response<W: Write + ?Sized>(
    stream: &mut W,
    response: &Response,
    now: SystemTime,
) -> io::Result<()> {
    let body = serde_json::to_vec(&response.body).unwrap_or_else(|_| b"{}".to_vec());
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nDate: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        response.status,
        reason(response.status),
        imf_fixdate(now),
        body.len()
    );
    if let Some(seconds) = response.retry_after {
        head.push_str(&format!("Retry-After: {seconds}\r\n"));
    }
    if let Some(allow) = response.allow {
        head.push_str(&format!("Allow: {allow}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    stream.write_all(&out)?;
    stream.flush()
}

/// `100 Continue`, for a client that sent `Expect: 100-continue` and whose body is wanted.
pub(crate) fn write_continue<W: Write + ?Sized>(stream: &mut W) -> io::Result<()> {
    stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
}

/// Ends the exchange politely: no more writes, then read and discard what the client still
/// sends (bounded in time) so that closing does not reset a response it has not read yet.
/// `sink` sees every discarded byte (the secret-leak scanner).
pub(crate) fn close_gracefully(stream: &mut dyn Wire, sink: &mut dyn FnMut(&[u8])) {
    stream.end_writes();
    let _ = stream.tcp().set_read_timeout(Some(LINGER_IDLE));
    let started = Instant::now();
    let mut buf = [0u8; 16 * 1024];
    while started.elapsed() < LINGER_TOTAL {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => sink(&buf[..n]),
        }
    }
}

/// Closes the connection with a TCP RST instead of a FIN: the client sees "connection reset".
/// The caller must hold the last handle to the socket, or the RST waits for the others.
pub(crate) fn reset(stream: TcpStream) {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: the descriptor belongs to `stream`, which is alive for the whole call, and the
        // pointer and length describe a live `linger` value of exactly the size passed.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast::<libc::c_void>(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            log::debug!("Stand-in could not arm a connection reset; closing normally");
        }
    }
    drop(stream);
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110 IMF-fixdate), whole seconds.
pub(crate) fn imf_fixdate(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs_f64().ceil() as u64).unwrap_or(i64::MAX),
    };
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[days.rem_euclid(7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month 1-12, day 1-31).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_head(raw: &str, expected: Result<(&str, &str), HeadError>) {
        let got = parse_head(raw.as_bytes()).map(|h| (h.method, h.path));
        let expected = expected.map(|(m, p)| (m.to_owned(), p.to_owned()));
        assert_eq!(got, expected, "{raw:?}");
    }

    #[test]
    fn request_heads_are_parsed_strictly() {
        check_head("GET /v1/sessions/S-1?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", Ok(("GET", "/v1/sessions/S-1")));
        check_head("POST /api/upload HTTP/1.0\r\n\r\n", Ok(("POST", "/api/upload")));
        check_head("GET / HTTP/2.0\r\n\r\n", Err(HeadError::Version));
        check_head(
            "GET  / HTTP/1.1\r\n\r\n",
            Err(HeadError::Malformed("the request line is not METHOD SP TARGET SP VERSION")),
        );
        check_head(
            "GET http://x/ HTTP/1.1\r\n\r\n",
            Err(HeadError::Malformed("the request target is not an absolute path")),
        );
        check_head(
            "GET / HTTP/1.1\r\nA: b\nC: d\r\n\r\n",
            Err(HeadError::Malformed("a line of the request head ends without CRLF")),
        );
        check_head(
            "GET / HTTP/1.1\r\nA: b\r\n  folded\r\n\r\n",
            Err(HeadError::Malformed("folded header lines are not accepted")),
        );
        check_head("GET / HTTP/1.1\r\nA b\r\n\r\n", Err(HeadError::Malformed("a header line has no colon")));
        check_head(
            "GET / HTTP/1.1\r\nA : b\r\n\r\n",
            Err(HeadError::Malformed("a header name is not a token")),
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        check_head(&format!("GET / HTTP/1.1\r\n{many}\r\n"), Err(HeadError::TooLarge));
    }

    #[test]
    fn headers_are_found_case_insensitively_and_duplicates_are_seen() {
        let head = parse_head(b"GET / HTTP/1.1\r\napi-key:  k1 \r\nX: 1\r\nx: 2\r\n\r\n").unwrap();
        assert_eq!(head.unique("API-Key"), Ok(Some("k1")));
        assert_eq!(head.unique("x"), Err(()));
        assert_eq!(head.unique("missing"), Ok(None));
    }

    #[test]
    fn head_end_is_found_across_reads() {
        let buf = b"GET / HTTP/1.1\r\n\r\nbody";
        assert_eq!(head_end(buf, 0), Some(18));
        assert_eq!(head_end(buf, 17), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n", 0), None);
    }

    #[test]
    fn dates_are_imf_fixdate() {
        assert_eq!(
            imf_fixdate(UNIX_EPOCH + Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            imf_fixdate(UNIX_EPOCH + Duration::from_millis(1_795_255_203_900)),
            "Sat, 21 Nov 2026 10:00:03 GMT"
        );
        assert_eq!(
            imf_fixdate(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "Tue, 29 Feb 2000 00:00:00 GMT"
        );
        assert_eq!(imf_fixdate(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
    }
}
