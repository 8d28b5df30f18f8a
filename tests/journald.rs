//! The journal fields of an inspection, read as journald reads them: the kiosk runs `inspect`
//! (capture and upload to the stand-in) in a private mount namespace whose
//! `/run/systemd/journal/socket` is a datagram socket this test bound, with `JOURNAL_STREAM`
//! naming its stderr as systemd does. The records are parsed as the native protocol defines
//! them (plain and length-prefixed fields, and records passed as a memfd).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capture_kiosk::clock::SystemClock;
use capture_kiosk::standin::{StandIn, StandInConfig};

const KIOSK: &str = env!("CARGO_BIN_EXE_capture-kiosk");
const VIN: &str = "JN1CV6AR9BM123456";
/// The start of every JWT the stand-in issues (`{"alg":"HS256","typ":"JWT"}`): no token may
/// reach the journal.
const TOKEN_HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

type Record = BTreeMap<String, Vec<u8>>;

#[test]
fn an_inspection_logs_its_case_and_cameras_as_journal_fields_and_no_secret() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!(
            "skipped: the journal socket is laid over /run in a private mount namespace, which needs root"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let journal_dir = work.join("journal");
    std::fs::create_dir(&journal_dir).unwrap();
    let socket = UnixDatagram::bind(journal_dir.join("socket")).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    // The sender blocks when the queue is full, so read while the kiosk runs, and after it
    // exited until the queue is empty.
    let exited = Arc::new(AtomicBool::new(false));
    let reader = std::thread::spawn({
        let exited = exited.clone();
        move || {
            let mut records = Vec::new();
            loop {
                match receive(&socket) {
                    Some(payload) if payload.is_empty() => {} // the logger's hello
                    Some(payload) => records.push(parse_record(&payload)),
                    None if exited.load(Ordering::SeqCst) => return records,
                    None => {}
                }
            }
        }
    });

    let standin =
        StandIn::start(StandInConfig { port: 0, ..StandInConfig::default() }, Arc::new(SystemClock::new()))
            .unwrap();
    let secret = standin.config().api_secret.clone();
    let secret_file = work.join("api-secret");
    std::fs::write(&secret_file, &secret).unwrap();
    std::fs::set_permissions(&secret_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = work.join("bay.toml");
    let defaults = StandInConfig::default();
    std::fs::write(
        &config,
        format!(
            "bay_id = \"bay-j\"\nstate_dir = \"{}\"\n[inspection]\nangles = [\"Front\", \"Front_Left\", \"Rear\"]\n[imaging]\nmax_long_edge = 640\n\
             [[cameras]]\nid = \"cam-front\"\nsource = \"synthetic:1280x960\"\nangles = [\"Front\", \"Front_Left\"]\n\
             [[cameras]]\nid = \"cam-rear\"\nsource = \"synthetic:1280x960\"\nangles = [\"Rear\"]\n\
             [cloud]\nbase_url = \"{}\"\nusername = \"{}\"\napi_key = \"{}\"\nclient_id = \"BAY-J\"\napi_secret_file = \"{}\"\n",
            work.join("state").display(),
            standin.base_url(),
            defaults.username,
            defaults.api_key,
            secret_file.display()
        ),
    )
    .unwrap();

    // systemd's JOURNAL_STREAM: the device and inode of the stderr it gave the service.
    let stderr_path = work.join("stderr");
    let stderr = File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let script = format!(
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && mount --bind {} /run/systemd/journal && exec \"$0\" \"$@\"",
        journal_dir.display()
    );
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script, KIOSK])
        .args(["inspect", "--config"])
        .arg(&config)
        .args(["--case-id", "CASE-J1", "--vin", VIN])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("CAPTURE_KIOSK_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(stderr)
        .status()
        .unwrap();
    exited.store(true, Ordering::SeqCst);
    let records = reader.join().unwrap();
    let stderr_text = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(status.success(), "inspect: {status}\n{stderr_text}");
    // Log records went to the journal, not to stderr (which keeps the command's progress lines).
    let logged_to_stderr: Vec<&str> = stderr_text
        .lines()
        .filter(|l| {
            ["ERROR ", "WARN  ", "INFO  ", "DEBUG ", "TRACE "].iter().any(|level| l.starts_with(level))
        })
        .collect();
    assert!(logged_to_stderr.is_empty(), "log records on stderr beside the journal: {logged_to_stderr:?}");
    assert!(records.len() >= 5, "too few journal records: {records:#?}");
    let fields: std::collections::BTreeSet<&String> = records.iter().flat_map(|r| r.keys()).collect();
    println!("{} journal records, fields {fields:?}", records.len());

    let text = |r: &Record, key: &str| r.get(key).map(|v| String::from_utf8_lossy(v).into_owned());
    for r in &records {
        assert_eq!(text(r, "SYSLOG_IDENTIFIER").as_deref(), Some("capture-kiosk"), "{r:?}");
        assert!(text(r, "MESSAGE").is_some_and(|m| !m.is_empty()), "{r:?}");
        let priority = text(r, "PRIORITY").and_then(|p| p.parse::<u8>().ok());
        assert!(priority.is_some_and(|p| p <= 7), "{r:?}");
    }
    let with = |key: &str, value: &str| -> Vec<&Record> {
        records.iter().filter(|r| text(r, key).as_deref() == Some(value)).collect()
    };
    let messages = |rs: &[&Record]| rs.iter().filter_map(|r| text(r, "MESSAGE")).collect::<Vec<_>>();

    // `journalctl CASE_ID=CASE-J1` finds the inspection from start to the cloud.
    let case = with("CASE_ID", "CASE-J1");
    let case_messages = messages(&case);
    for wanted in ["Inspection started", "Inspection captured", "Cloud session opened"] {
        assert!(case_messages.iter().any(|m| m == wanted), "no {wanted:?} under CASE_ID: {case_messages:?}");
    }
    assert!(case.iter().all(|r| text(r, "INSPECTION_ID").as_deref() == Some("1")), "{case:?}");
    assert!(case.iter().any(|r| r.contains_key("SESSION")), "the session is a field: {case:?}");
    // Values are fields, not words of the message.
    assert!(case_messages.iter().all(|m| !m.contains("CASE-J1")), "{case_messages:?}");
    // Each camera is found by its id.
    for camera in ["cam-front", "cam-rear"] {
        assert!(!with("CAMERA", camera).is_empty(), "no record with CAMERA={camera}");
    }

    // No secret, no token; the VIN only at debug level (PRIORITY 7).
    for r in &records {
        for (key, value) in r {
            let value = String::from_utf8_lossy(value);
            assert!(!value.contains(&secret), "the API secret is in {key}");
            assert!(!value.contains(TOKEN_HEADER), "a token is in {key}");
            if value.contains(VIN) {
                assert_eq!(text(r, "PRIORITY").as_deref(), Some("7"), "the VIN above debug in {key}: {r:?}");
            }
        }
    }
    assert_eq!(standin.secret_leaks(), 0);
}

/// One datagram, or the contents of the memfd passed with it (the native protocol's way for
/// records too large for a datagram). `None` when nothing came for a while.
fn receive(socket: &UnixDatagram) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; every pointer in it outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: the buffers described by msg are live and writable.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    // SAFETY: the CMSG macros walk the control buffer the kernel just filled.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                let mut memfd = File::from_raw_fd(fd);
                memfd.rewind().unwrap();
                buf.clear();
                memfd.read_to_end(&mut buf).unwrap();
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Some(buf)
}

/// The native protocol: `KEY=value\n`, or `KEY\n` + a little-endian u64 length + the bytes
/// + `\n` for values that may hold newlines.
fn parse_record(payload: &[u8]) -> Record {
    let mut record = Record::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let line_end = rest.iter().position(|&b| b == b'\n').expect("every field ends with a newline");
        let line = &rest[..line_end];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            record.insert(String::from_utf8(line[..eq].to_vec()).unwrap(), line[eq + 1..].to_vec());
            rest = &rest[line_end + 1..];
        } else {
            let key = String::from_utf8(line.to_vec()).unwrap();
            let after = &rest[line_end + 1..];
            let len = u64::from_le_bytes(after[..8].try_into().unwrap()) as usize;
            record.insert(key, after[8..8 + len].to_vec());
            assert_eq!(after[8 + len], b'\n', "a length-prefixed field ends with a newline");
            rest = &after[8 + len + 1..];
        }
    }
    for key in record.keys() {
        let valid = !key.is_empty()
            && !key.starts_with('_')
            && key.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        assert!(valid, "journald drops the field name {key:?}");
    }
    record
}
