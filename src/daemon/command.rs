//! Operator commands (`shared/spec/mqtt.md`): parsing untrusted bytes into a [`Command`],
//! expiry, the memory of command ids already answered, and the ack payload. Pure: no I/O, no
//! clock reads; `now` is an argument.

use std::collections::{HashMap, VecDeque};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::mqtt::MAX_COMMAND_BYTES;
use crate::store::InspectionId;
use crate::vehicle::{CaseId, PhotoLabel, Vehicle};

/// Longest command id accepted.
pub const MAX_COMMAND_ID: usize = 64;
/// Command ids remembered for duplicate detection, here and in the buffer (so across restarts);
/// the oldest are forgotten first.
pub use crate::store::REMEMBERED_COMMANDS;

/// A command that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub id: String,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start { case_id: CaseId, vehicle: Option<Box<Vehicle>>, angles: Option<Vec<PhotoLabel>> },
    Cancel { inspection_id: Option<InspectionId> },
    Retry { inspection_id: InspectionId },
    Ping,
}

/// A command that cannot be run: answered `rejected` with `reason`, under `command_id` when
/// one could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub command_id: Option<String>,
    pub reason: String,
}

/// The outcome of a command, as published on `cmd/{name}/ack` (and kept in the buffer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub command_id: Option<String>,
    pub status: AckStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inspection_id: Option<InspectionId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    Accepted,
    Succeeded,
    Rejected,
    Failed,
}

impl Ack {
    pub fn new(command_id: Option<&str>, status: AckStatus) -> Ack {
        Ack { command_id: command_id.map(str::to_owned), status, reason: None, inspection_id: None }
    }
    pub fn rejected(command_id: Option<&str>, reason: impl Into<String>) -> Ack {
        Ack { reason: Some(reason.into()), ..Ack::new(command_id, AckStatus::Rejected) }
    }
    pub fn with_inspection(mut self, id: InspectionId) -> Ack {
        self.inspection_id = Some(id);
        self
    }
    pub fn with_reason(mut self, reason: impl Into<String>) -> Ack {
        self.reason = Some(reason.into());
        self
    }
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Parses command `name` from untrusted `payload`, checking expiry against `now`.
pub fn parse(name: &str, payload: &[u8], now: SystemTime) -> Result<Command, Refused> {
    let refuse = |id: Option<&str>, reason: String| Refused { command_id: id.map(str::to_owned), reason };
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(oversized(payload, payload.len()));
    }
    let value: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| refuse(None, format!("the payload is not JSON ({e}); send a JSON object")))?;
    let Some(object) = value.as_object() else {
        return Err(refuse(None, "the payload is not a JSON object; send {\"command_id\": …}".to_owned()));
    };
    let id = match object.get("command_id") {
        Some(serde_json::Value::String(id)) => id.as_str(),
        Some(_) => return Err(refuse(None, "command_id must be a string".to_owned())),
        None => return Err(refuse(None, "command_id is missing; give every command a unique id".to_owned())),
    };
    if id.is_empty() || id.chars().count() > MAX_COMMAND_ID || id.chars().any(char::is_control) {
        return Err(refuse(
            None,
            format!("command_id must be 1 to {MAX_COMMAND_ID} characters without control characters"),
        ));
    }
    let some = Some(id);
    if let Some(expires) = object.get("expires_at") {
        let Some(text) = expires.as_str() else {
            return Err(refuse(
                some,
                "expires_at must be an RFC 3339 string such as 2026-11-21T10:00:03Z".into(),
            ));
        };
        let at = crate::clock::parse_rfc3339_utc(text).map_err(|e| {
            refuse(
                some,
                format!(
                    "expires_at {text:?} is not an RFC 3339 UTC time: {e}; write e.g. 2026-11-21T10:00:03Z"
                ),
            )
        })?;
        if at <= now {
            return Err(refuse(some, "expired".to_owned()));
        }
    }
    let fields = |e: serde_json::Error| refuse(some, format!("{name}: {e}"));
    let action = match name {
        "start" => {
            let raw: RawStart = serde_json::from_value(value.clone()).map_err(fields)?;
            let case_id = CaseId::parse(&raw.case_id).map_err(|e| refuse(some, format!("case_id: {e}")))?;
            let angles = match raw.angles {
                None => None,
                Some(names) => Some(
                    names
                        .iter()
                        .map(|n| PhotoLabel::parse(n).map_err(|e| refuse(some, format!("angles: {e}"))))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            if angles.as_ref().is_some_and(Vec::is_empty) {
                return Err(refuse(
                    some,
                    "angles is empty; leave it out to capture the bay's usual angles".into(),
                ));
            }
            Action::Start { case_id, vehicle: raw.vehicle.map(Box::new), angles }
        }
        "cancel" => {
            let raw: RawCancel = serde_json::from_value(value.clone()).map_err(fields)?;
            Action::Cancel { inspection_id: raw.inspection_id.map(InspectionId) }
        }
        "retry" => {
            let raw: RawRetry = serde_json::from_value(value.clone()).map_err(fields)?;
            Action::Retry { inspection_id: InspectionId(raw.inspection_id) }
        }
        "ping" => {
            let _: RawPing = serde_json::from_value(value.clone()).map_err(fields)?;
            Action::Ping
        }
        _ => {
            return Err(refuse(
                some,
                format!("unknown command {name:?}; the kiosk knows start, cancel, retry and ping"),
            ))
        }
    };
    Ok(Command { id: id.to_owned(), action })
}

/// The refusal of a payload of `size` bytes, over [`MAX_COMMAND_BYTES`], of which `start` is the
/// beginning: unread, but answered under its `command_id` when the beginning holds one.
pub fn oversized(start: &[u8], size: usize) -> Refused {
    Refused {
        command_id: leading_command_id(start),
        reason: format!(
            "the command is {size} bytes, over the limit of {MAX_COMMAND_BYTES} bytes; send a smaller one"
        ),
    }
}

/// The `command_id` of a JSON object whose beginning is `start`, when that beginning holds it
/// as a member of the object itself (not of a nested value) and it is a usable id. Reads only
/// as far as needed, without parsing the rest, and never fails: anything unexpected is `None`.
pub fn leading_command_id(start: &[u8]) -> Option<String> {
    let mut at = skip_space(start, 0);
    if start.get(at) != Some(&b'{') {
        return None;
    }
    at += 1;
    loop {
        at = skip_space(start, at);
        let (key, next) = json_string(start, at)?;
        at = skip_space(start, next);
        if start.get(at) != Some(&b':') {
            return None;
        }
        at = skip_space(start, at + 1);
        if key == "command_id" {
            let (id, _) = json_string(start, at)?;
            let usable =
                !id.is_empty() && id.chars().count() <= MAX_COMMAND_ID && !id.chars().any(char::is_control);
            return usable.then_some(id);
        }
        at = skip_space(start, skip_value(start, at)?);
        if start.get(at) != Some(&b',') {
            return None;
        }
        at += 1;
    }
}

fn skip_space(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at).is_some_and(|b| b.is_ascii_whitespace()) {
        at += 1;
    }
    at
}

/// The string starting at `at` (its opening quote) and the index after its closing quote.
fn json_string(bytes: &[u8], at: usize) -> Option<(String, usize)> {
    let end = string_end(bytes, at)?;
    let text = serde_json::from_slice::<String>(&bytes[at..end]).ok()?;
    Some((text, end))
}

/// The index after the closing quote of the string whose opening quote is at `at`.
fn string_end(bytes: &[u8], at: usize) -> Option<usize> {
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let mut i = at + 1;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The index after the JSON value starting at `at`: a string, an object or array (nesting
/// counted, strings inside skipped whole), or a scalar.
fn skip_value(bytes: &[u8], at: usize) -> Option<usize> {
    match bytes.get(at)? {
        b'"' => string_end(bytes, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            while let Some(&b) = bytes.get(i) {
                match b {
                    b'"' => {
                        i = string_end(bytes, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let mut i = at;
            while bytes.get(i).is_some_and(|b| !matches!(b, b',' | b'}' | b']') && !b.is_ascii_whitespace()) {
                i += 1;
            }
            (i > at && i < bytes.len()).then_some(i)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStart {
    #[allow(dead_code)]
    command_id: String,
    #[allow(dead_code)]
    expires_at: Option<String>,
    case_id: String,
    vehicle: Option<Vehicle>,
    angles: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCancel {
    #[allow(dead_code)]
    command_id: String,
    #[allow(dead_code)]
    expires_at: Option<String>,
    inspection_id: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[allow(dead_code)]
    command_id: String,
    #[allow(dead_code)]
    expires_at: Option<String>,
    inspection_id: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPing {
    #[allow(dead_code)]
    command_id: String,
    #[allow(dead_code)]
    expires_at: Option<String>,
}

/// The command ids already answered, with their first outcome.
#[derive(Debug, Default)]
pub struct Answered {
    outcomes: HashMap<String, Ack>,
    order: VecDeque<String>,
}

impl Answered {
    /// The first outcome of `command_id`, if it was seen.
    pub fn get(&self, command_id: &str) -> Option<&Ack> {
        self.outcomes.get(command_id)
    }

    /// Remembers the first outcome of a command; later calls for the same id change nothing.
    pub fn remember(&mut self, ack: &Ack) {
        let Some(id) = &ack.command_id else { return };
        if self.outcomes.contains_key(id) {
            return;
        }
        if self.order.len() >= REMEMBERED_COMMANDS {
            if let Some(old) = self.order.pop_front() {
                self.outcomes.remove(&old);
            }
        }
        self.order.push_back(id.clone());
        self.outcomes.insert(id.clone(), ack.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000)
    }

    fn check_refused(name: &str, payload: &str, id: Option<&str>, words: &str) {
        let err = parse(name, payload.as_bytes(), now()).expect_err(payload);
        assert_eq!(err.command_id.as_deref(), id, "{payload}");
        assert!(err.reason.contains(words), "{payload}: {:?} lacks {words:?}", err.reason);
    }

    #[test]
    fn good_commands_parse() {
        let c = parse(
            "start",
            br#"{"command_id":"c1","case_id":"CASE-1","vehicle":{"vin":"JN1CV6AR9BM123456"},"angles":["Front","Rear"]}"#,
            now(),
        )
        .unwrap();
        assert_eq!(c.id, "c1");
        assert!(matches!(c.action, Action::Start { ref angles, .. } if angles.as_ref().unwrap().len() == 2));
        assert_eq!(parse("ping", br#"{"command_id":"p"}"#, now()).unwrap().action, Action::Ping);
        assert_eq!(
            parse("retry", br#"{"command_id":"r","inspection_id":4}"#, now()).unwrap().action,
            Action::Retry { inspection_id: InspectionId(4) }
        );
        assert_eq!(
            parse("cancel", br#"{"command_id":"x","expires_at":"2099-01-01T00:00:00Z"}"#, now())
                .unwrap()
                .action,
            Action::Cancel { inspection_id: None }
        );
    }

    #[test]
    fn bad_commands_are_refused_with_a_reason() {
        check_refused("ping", "{not json", None, "not JSON");
        check_refused("ping", "[1]", None, "not a JSON object");
        check_refused("ping", "{}", None, "command_id is missing");
        check_refused("ping", r#"{"command_id":""}"#, None, "1 to 64");
        check_refused("ping", &format!(r#"{{"command_id":"{}"}}"#, "x".repeat(65)), None, "1 to 64");
        check_refused("ping", r#"{"command_id":"a","extra":1}"#, Some("a"), "unknown field");
        check_refused("start", r#"{"command_id":"a","case_id":"../etc"}"#, Some("a"), "case_id");
        check_refused("start", r#"{"command_id":"a"}"#, Some("a"), "case_id");
        check_refused(
            "start",
            r#"{"command_id":"a","case_id":"C1","vehicle":{"vin":"123"}}"#,
            Some("a"),
            "start",
        );
        check_refused(
            "start",
            r#"{"command_id":"a","case_id":"C1","angles":["Underside"]}"#,
            Some("a"),
            "angles",
        );
        check_refused("retry", r#"{"command_id":"a"}"#, Some("a"), "inspection_id");
        check_refused("reboot", r#"{"command_id":"a"}"#, Some("a"), "unknown command");
        check_refused(
            "ping",
            r#"{"command_id":"a","expires_at":"2020-01-01T00:00:00Z"}"#,
            Some("a"),
            "expired",
        );
        check_refused("ping", r#"{"command_id":"a","expires_at":"soon"}"#, Some("a"), "RFC 3339");
    }

    #[test]
    fn an_oversized_command_is_refused_naming_its_size_and_under_its_id_when_it_leads() {
        let padding = "x".repeat(70 * 1024);
        let big = format!(r#"{{"command_id":"big-1","case_id":"C1","pad":"{padding}"}}"#);
        let err = parse("start", big.as_bytes(), now()).unwrap_err();
        assert_eq!(err.command_id.as_deref(), Some("big-1"));
        assert!(
            err.reason.contains(&big.len().to_string()) && err.reason.contains("16384"),
            "{}",
            err.reason
        );
        // The link hands over only the beginning, with the real size.
        let cut = &big.as_bytes()[..MAX_COMMAND_BYTES + 1];
        let err = oversized(cut, 500 * 1024);
        assert_eq!(err.command_id.as_deref(), Some("big-1"));
        assert!(err.reason.contains("512000"), "{}", err.reason);
    }

    fn check_leading_id(payload: &str, expected: Option<&str>) {
        assert_eq!(leading_command_id(payload.as_bytes()).as_deref(), expected, "{payload}");
    }

    #[test]
    fn the_command_id_is_found_only_where_a_json_parser_would_find_it() {
        check_leading_id(r#"{"command_id":"a"}"#, Some("a"));
        check_leading_id(r#" { "command_id" : "a\u0062" , "x": 1"#, Some("ab"));
        check_leading_id(
            r#"{"n":-1.5e3,"ok":true,"v":{"command_id":"inner"},"command_id":"outer""#,
            Some("outer"),
        );
        check_leading_id(r#"{"s":"\"command_id\":\"fake\"","command_id":"real"}"#, Some("real"));
        check_leading_id(r#"{"list":["]",{"}":"{"}],"command_id":"after"}"#, Some("after"));
        check_leading_id(r#"{"pad":"xxxx"#, None);
        check_leading_id(r#"{"command_id":7}"#, None);
        check_leading_id(r#"{"command_id":""}"#, None);
        check_leading_id(r#"{"command_id":"line\nbreak"}"#, None);
        check_leading_id(&format!(r#"{{"command_id":"{}"}}"#, "x".repeat(65)), None);
        check_leading_id(r#"["command_id","a"]"#, None);
        check_leading_id("", None);
        check_leading_id(r#"{"a" 1, "command_id":"a"}"#, None);
        check_leading_id(r#"{"a":]]],"command_id":"a"}"#, None);
    }

    #[test]
    fn expiry_dates_after_2038_are_read_on_32_bit_boards_too() {
        let ping = |expires_at: &str, now: SystemTime| {
            parse("ping", format!(r#"{{"command_id":"p","expires_at":"{expires_at}"}}"#).as_bytes(), now)
        };
        for late in ["2038-01-19T03:14:08Z", "2050-06-01T12:00:00Z", "2106-02-07T06:28:17.5Z"] {
            assert_eq!(ping(late, now()).map(|c| c.action), Ok(Action::Ping), "{late}");
        }
        // A bay whose clock is already past 2038 still sees what has expired.
        let in_2040 = SystemTime::UNIX_EPOCH + Duration::from_secs(2_208_988_800);
        assert_eq!(ping("2039-12-31T23:59:59Z", in_2040).unwrap_err().reason, "expired");
        assert_eq!(ping("2040-01-01T00:00:01Z", in_2040).map(|c| c.action), Ok(Action::Ping));
        check_refused(
            "ping",
            r#"{"command_id":"a","expires_at":"2050-06-01T12:00:00+02:00"}"#,
            Some("a"),
            "UTC",
        );
        check_refused("ping", r#"{"command_id":"a","expires_at":"2050-02-30T12:00:00Z"}"#, Some("a"), "day");
    }

    #[test]
    fn an_answered_command_keeps_its_first_outcome() {
        let mut answered = Answered::default();
        answered.remember(&Ack::new(Some("a"), AckStatus::Succeeded));
        answered.remember(&Ack::rejected(Some("a"), "later"));
        assert_eq!(answered.get("a").unwrap().status, AckStatus::Succeeded);
        for i in 0..REMEMBERED_COMMANDS {
            answered.remember(&Ack::new(Some(&format!("n{i}")), AckStatus::Succeeded));
        }
        assert!(answered.get("a").is_none(), "the oldest id is forgotten first");
        assert!(answered.get("n5").is_some());
    }

    proptest::proptest! {
        #[test]
        fn no_bytes_crash_the_parser(name in "[a-z]{0,8}", payload in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse(&name, &payload, now());
            let _ = leading_command_id(&payload);
        }

        #[test]
        fn the_leading_id_agrees_with_a_json_parser(id in "\\PC{1,64}", other in "\\PC{0,40}", first in proptest::bool::ANY) {
            let payload = if first {
                serde_json::json!({"command_id": id, "x": {"command_id": other}}).to_string()
            } else {
                format!(r#"{{"x":{},"command_id":{}}}"#, serde_json::json!([other, {"command_id": other}]), serde_json::json!(id))
            };
            let expected = (!id.chars().any(char::is_control)).then(|| id.clone());
            proptest::prop_assert_eq!(leading_command_id(payload.as_bytes()), expected);
        }

        #[test]
        fn json_shaped_garbage_is_refused_or_valid(id in "\\PC{0,70}", case in "\\PC{0,70}", n in proptest::num::i64::ANY) {
            let payload = serde_json::json!({"command_id": id, "case_id": case, "inspection_id": n}).to_string();
            for name in ["start", "cancel", "retry", "ping"] {
                if let Ok(c) = parse(name, payload.as_bytes(), now()) {
                    proptest::prop_assert!(c.id.chars().count() <= MAX_COMMAND_ID);
                    if let Action::Start { case_id, .. } = c.action {
                        proptest::prop_assert!(!case_id.as_str().contains(['/', '.']));
                    }
                }
            }
        }
    }
}
