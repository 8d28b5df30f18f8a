//! One connection, one exchange: read a bounded head, apply any armed fault, frame the body by
//! `Content-Length`, hand the request to the API rules, write the answer and close. Every byte
//! read passes through the secret-leak scanner.

use std::io;
use std::time::Instant;

use super::api::{self, Route};
use super::faults::{Action, Phase};
use super::http::{self, Head, HeadError, Response, Wire, HEAD_DEADLINE, IO_TIMEOUT, MAX_HEAD_BYTES};
use super::multipart::find;
use super::{FaultKind, Shared};

/// How the connection ends.
pub(crate) enum Ending {
    /// Closed normally (FIN).
    Close,
    /// Closed with a TCP RST.
    Reset,
}

/// Serves the one exchange of a connection.
pub(crate) fn exchange(shared: &Shared, stream: &mut dyn Wire) -> Ending {
    let _ = stream.tcp().set_nodelay(true);
    let _ = stream.tcp().set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.tcp().set_write_timeout(Some(IO_TIMEOUT));
    let mut conn = Conn { stream, scanner: LeakScanner::new(shared.config.api_secret.as_bytes()) };
    let ending = conn.run(shared);
    shared.add_leaks(conn.scanner.take_new());
    ending
}

struct Conn<'a> {
    stream: &'a mut dyn Wire,
    scanner: LeakScanner,
}

/// The method and path of a request, as far as they are known, for the request log.
pub(crate) struct Line {
    pub method: String,
    pub path: String,
}

impl Conn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.scanner.feed(&buf[..n]);
        Ok(n)
    }

    fn run(&mut self, shared: &Shared) -> Ending {
        let unknown = || Line { method: "-".to_owned(), path: "-".to_owned() };
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = vec![0u8; 64 * 1024];
        let started = Instant::now();
        let mut searched = 0;
        let head_len = loop {
            if let Some(end) = http::head_end(&buf, searched) {
                if end > MAX_HEAD_BYTES {
                    return self.respond(shared, unknown(), head_error(HeadError::TooLarge));
                }
                break end;
            }
            if buf.len() > MAX_HEAD_BYTES {
                return self.respond(shared, unknown(), head_error(HeadError::TooLarge));
            }
            if started.elapsed() > HEAD_DEADLINE {
                return Ending::Close;
            }
            searched = buf.len();
            match self.read(&mut chunk[..4096]) {
                // A connection closed before a head (a port probe, the stand-in waking itself).
                Ok(0) => return Ending::Close,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Ending::Close,
            }
        };
        let head = match http::parse_head(&buf[..head_len]) {
            Ok(head) => head,
            Err(e) => return self.respond(shared, unknown(), head_error(e)),
        };
        let line = Line { method: head.method.clone(), path: head.path.clone() };

        match shared.take_fault(Phase::Head, &head.path) {
            Some(Action::Reset) => {
                shared.record(&line, None, Some(FaultKind::Reset), self.scanner.take_new());
                return Ending::Reset;
            }
            Some(Action::Stall(how_long)) => {
                // Recorded when the stall begins, so that a test can see it is being held.
                shared.record(&line, None, Some(FaultKind::Stalled), self.scanner.take_new());
                shared.sleep_unless_stopped(how_long);
                return Ending::Close;
            }
            Some(other) => shared.give_back_fault(other, &head.path),
            None => {}
        }

        let route = match api::route(&head.method, &head.path) {
            Ok(route) => route,
            Err(refusal) => return self.respond(shared, line, refusal),
        };
        let length = match body_length(&head, route.body_cap(&shared.config)) {
            Ok(length) => length,
            Err(refusal) => return self.respond(shared, line, refusal),
        };
        if length > 0 && buf.len() == head_len && expects_continue(&head) {
            let _ = http::write_continue(self.stream);
        }
        let mut body = Vec::with_capacity(length.min(1 << 20));
        body.extend_from_slice(&buf[head_len..buf.len().min(head_len + length)]);
        drop(buf);
        while body.len() < length {
            let want = chunk.len().min(length - body.len());
            match self.read(&mut chunk[..want]) {
                Ok(0) => {
                    let refusal =
                        Response::message(400, "the body ended before Content-Length bytes arrived");
                    return self.respond(shared, line, refusal);
                }
                Ok(n) => body.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    shared.record(&line, None, None, self.scanner.take_new());
                    return Ending::Close;
                }
            }
        }

        let fault = if matches!(route, Route::Upload | Route::Complete) {
            shared.take_fault(Phase::Body, &head.path)
        } else {
            None
        };
        match fault {
            Some(Action::Fail { status, retry_after_secs }) => {
                let message = if status == 429 {
                    "Too many requests, retry later"
                } else {
                    "Service unavailable, retry later"
                };
                let mut refusal = Response::message(status, message);
                refusal.retry_after = Some(retry_after_secs);
                self.respond_with_fault(shared, line, refusal, Some(FaultKind::Failed))
            }
            Some(Action::DropAfterAccepting) => {
                let response = api::handle(&shared.state, &shared.config, &route, &head, &body, shared.now());
                if response.status == 200 {
                    shared.record(
                        &line,
                        None,
                        Some(FaultKind::DroppedAfterAccepting),
                        self.scanner.take_new(),
                    );
                    Ending::Reset
                } else {
                    shared.give_back_fault(Action::DropAfterAccepting, &head.path);
                    self.respond(shared, line, response)
                }
            }
            Some(Action::HoldAfterAccepting(how_long)) => {
                let response = api::handle(&shared.state, &shared.config, &route, &head, &body, shared.now());
                if response.status == 200 {
                    // Recorded when the hold begins, so that a test can see the request took effect.
                    shared.record(&line, None, Some(FaultKind::HeldAfterAccepting), self.scanner.take_new());
                    shared.sleep_unless_stopped(how_long);
                    Ending::Close
                } else {
                    shared.give_back_fault(Action::HoldAfterAccepting(how_long), &head.path);
                    self.respond(shared, line, response)
                }
            }
            Some(other) => {
                shared.give_back_fault(other, &head.path);
                let response = api::handle(&shared.state, &shared.config, &route, &head, &body, shared.now());
                self.respond(shared, line, response)
            }
            None => {
                let response = api::handle(&shared.state, &shared.config, &route, &head, &body, shared.now());
                self.respond(shared, line, response)
            }
        }
    }

    fn respond(&mut self, shared: &Shared, line: Line, response: Response) -> Ending {
        self.respond_with_fault(shared, line, response, None)
    }

    /// Writes the answer, records it, then closes without resetting what the client still sends.
    fn respond_with_fault(
        &mut self,
        shared: &Shared,
        line: Line,
        response: Response,
        fault: Option<FaultKind>,
    ) -> Ending {
        // Recorded before it is written, so that a client that has the answer finds the record.
        shared.record(&line, Some(response.status), fault, self.scanner.take_new());
        let _ = http::write_response(self.stream, &response, shared.now());
        let scanner = &mut self.scanner;
        http::close_gracefully(self.stream, &mut |bytes| scanner.feed(bytes));
        Ending::Close
    }
}

/// The body length the head announces, or the refusal: 411 without a length (or with
/// `Transfer-Encoding`), 400 for a malformed or repeated length, 413 above the cap.
fn body_length(head: &Head, cap: u64) -> Result<usize, Response> {
    if head.has("Transfer-Encoding") {
        return Err(Response::message(
            411,
            "Transfer-Encoding is not accepted; send the body with a Content-Length",
        ));
    }
    let length = match head.unique("Content-Length") {
        Ok(None) if head.method == "POST" => {
            return Err(Response::message(411, "Content-Length is required"));
        }
        Ok(None) => 0,
        Ok(Some(value))
            if !value.is_empty() && value.len() <= 19 && value.bytes().all(|b| b.is_ascii_digit()) =>
        {
            value.parse::<u64>().map_err(|_| Response::message(400, "Content-Length is malformed"))?
        }
        Ok(Some(_)) => return Err(Response::message(400, "Content-Length is malformed")),
        Err(()) => return Err(Response::message(400, "Content-Length appears more than once")),
    };
    if length > cap {
        return Err(Response::message(
            413,
            format!("Request body too large: {length} bytes, the limit is {cap}"),
        ));
    }
    usize::try_from(length).map_err(|_| Response::message(413, "Request body too large"))
}

fn expects_continue(head: &Head) -> bool {
    matches!(head.unique("Expect"), Ok(Some(v)) if v.eq_ignore_ascii_case("100-continue"))
}

fn head_error(e: HeadError) -> Response {
    match e {
        HeadError::TooLarge => Response::message(431, "The request head is too large"),
        HeadError::Malformed(why) => Response::message(400, format!("Malformed request: {why}")),
        HeadError::Version => Response::message(505, "Only HTTP/1.1 is served"),
    }
}

/// Counts occurrences of the secret in a byte stream fed in arbitrary pieces.
pub(crate) struct LeakScanner {
    secret: Vec<u8>,
    /// The last `secret.len() - 1` bytes seen, to catch an occurrence split across pieces.
    tail: Vec<u8>,
    found: usize,
    reported: usize,
}

impl LeakScanner {
    pub fn new(secret: &[u8]) -> LeakScanner {
        LeakScanner { secret: secret.to_vec(), tail: Vec::new(), found: 0, reported: 0 }
    }

    pub fn feed(&mut self, piece: &[u8]) {
        let n = self.secret.len();
        if n == 0 || piece.is_empty() {
            return;
        }
        // Occurrences that start in the tail and end in this piece.
        if !self.tail.is_empty() {
            let mut joint = self.tail.clone();
            joint.extend_from_slice(&piece[..piece.len().min(n - 1)]);
            let mut from = 0;
            while let Some(at) = find(&joint, &self.secret, from) {
                if at >= self.tail.len() {
                    break;
                }
                self.found += 1;
                from = at + 1;
            }
        }
        let mut from = 0;
        while let Some(at) = find(piece, &self.secret, from) {
            self.found += 1;
            from = at + 1;
        }
        let keep = n - 1;
        if piece.len() >= keep {
            self.tail = piece[piece.len() - keep..].to_vec();
        } else {
            self.tail.extend_from_slice(piece);
            let excess = self.tail.len().saturating_sub(keep);
            self.tail.drain(..excess);
        }
    }

    /// Occurrences found since the last call.
    pub fn take_new(&mut self) -> usize {
        let new = self.found - self.reported;
        self.reported = self.found;
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaks_when_split(stream: &[u8], secret: &[u8]) -> Vec<usize> {
        (1..=stream.len().max(1))
            .map(|piece| {
                let mut scanner = LeakScanner::new(secret);
                for chunk in stream.chunks(piece) {
                    scanner.feed(chunk);
                }
                scanner.take_new()
            })
            .collect()
    }

    #[test]
    fn the_secret_is_found_however_the_stream_is_cut() {
        let stream = b"xxSECRETyySECRETSECRETzSECRE";
        assert!(leaks_when_split(stream, b"SECRET").iter().all(|n| *n == 3));
        assert!(leaks_when_split(b"aaaa", b"aa").iter().all(|n| *n == 3));
        assert!(leaks_when_split(b"no secret here", b"SECRET").iter().all(|n| *n == 0));
    }
}
