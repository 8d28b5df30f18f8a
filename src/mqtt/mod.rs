//! The kiosk's MQTT link (`shared/spec/mqtt.md`): retained `status` with a Last Will, retained
//! `state`, `events`, commands in and acks out. The only module that names rumqttc.
//!
//! Nothing outside this module ever waits for the broker. [`Link`] hands messages to an
//! outbox (`outbox::Outbox`) that never blocks: `state` is kept as the latest value only (a
//! broker that comes back gets the current state, not a backlog) and coalesced to one message
//! per [`STATE_MIN_INTERVAL`]; events and acks go to a bounded queue, ahead of the state that
//! counts them, and are dropped, counted, when it is full or the broker is away.
//!
//! One thread does the I/O. It owns a current-thread tokio runtime that runs rumqttc's
//! `AsyncClient` and `EventLoop` in one `tokio::select!` loop (`task::run`) over: the event
//! loop's `poll()` (after a failure, preceded by the reconnect delay, a `tokio::time::sleep`,
//! since rumqttc would retry in a hot loop), the outbox (a tokio `Notify` woken by
//! `set_state`, `event`, `ack` and `stop`) and the next state deadline. What a CONNACK, a SUBACK
//! or a failure means and how long to wait is decided by `connection::Connection`, pure over
//! monotonic time; `wire` is the seam that lets the loop run against a script under paused
//! tokio time in tests.
//!
//! The session is persistent: the client id is stable (`capture-kiosk-{bay_id}` unless
//! configured) and the clean-session flag is off (MQTT 3.1.1), so the broker keeps the
//! subscription and queues the QoS 1 commands sent while the bay is away, and delivers them when
//! it connects again; a command's `expires_at` keeps a late one from running. A second client
//! with the same id throws the bay off the broker: [`takeover::TakeoverWatch`] notices the
//! pattern and slows reconnecting down instead of fighting for the session forever.

mod connection;
mod outbox;
pub mod takeover;
mod task;
mod wire;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{AsyncClient, LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use tokio::sync::Notify;

use crate::config::MqttConfig;
use outbox::Outbox;

/// Most events and acks waiting for the broker; more are dropped.
pub const OUTBOX_CAPACITY: usize = 256;
/// The shortest gap between two `state` messages (coalescing).
pub const STATE_MIN_INTERVAL: Duration = Duration::from_millis(200);
/// Largest command payload accepted; bigger ones are answered `rejected` unread.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;
/// Largest payload the link reads whole from the broker, so that an oversized command is
/// answered (`rejected`, naming the limit) instead of costing the connection. A bigger packet
/// breaks the connection (the client cannot skip it): the broker should refuse those first,
/// with `message_size_limit 1048576` in `mosquitto.conf` (see the README).
pub const MAX_READ_PAYLOAD: usize = 1 << 20;
/// The client's incoming packet limit: [`MAX_READ_PAYLOAD`] under the longest topic MQTT allows
/// (its 2-byte length, 65 535 bytes of name, the 2-byte packet id).
const MAX_INCOMING_PACKET: usize = MAX_READ_PAYLOAD + 2 + 65_535 + 2;
/// The client's outgoing packet limit: `state`, events and acks are a few KiB.
const MAX_OUTGOING_PACKET: usize = 64 * 1024;

/// The topics of one bay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    root: String,
}

impl Topics {
    pub fn new(prefix: &str, bay_id: &str) -> Topics {
        Topics { root: format!("{prefix}/{bay_id}") }
    }
    pub fn status(&self) -> String {
        format!("{}/status", self.root)
    }
    pub fn state(&self) -> String {
        format!("{}/state", self.root)
    }
    pub fn events(&self) -> String {
        format!("{}/events", self.root)
    }
    /// The filter the kiosk subscribes to.
    pub fn commands(&self) -> String {
        format!("{}/cmd/+", self.root)
    }
    pub fn ack(&self, command: &str) -> String {
        format!("{}/cmd/{command}/ack", self.root)
    }
    /// The command name of a topic under `cmd/`, or `None` for any other topic (an ack included).
    pub fn command_name<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let rest = topic.strip_prefix(self.root.as_str())?.strip_prefix("/cmd/")?;
        (!rest.is_empty() && !rest.contains('/')).then_some(rest)
    }
}

/// A command as it arrived; the daemon parses it.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub name: String,
    /// The payload, cut after `MAX_COMMAND_BYTES + 1` bytes (enough to refuse it and find its
    /// `command_id`).
    pub payload: Vec<u8>,
    /// The payload's real length.
    pub size: usize,
}

/// What the link tells its owner.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// Connected (again): subscriptions, `online` and the latest `state` are being re-sent.
    Connected,
    /// The connection was lost; `reason` says why.
    Disconnected {
        reason: String,
    },
    /// The broker sent a packet of `bytes`, over what the link reads ([`MAX_READ_PAYLOAD`]); the
    /// connection was lost over it and is being made again. Nothing can answer that message.
    Oversized {
        bytes: usize,
    },
    Command(Incoming),
    /// Something a person must act on (`kind` is one of the `ALERT_*` names): it belongs in
    /// `state.alerts` until [`LinkEvent::AlertCleared`].
    Alert {
        kind: &'static str,
        reason: String,
    },
    AlertCleared {
        kind: &'static str,
    },
}

/// Alert: another client keeps taking the bay's session over (the same client id).
pub const ALERT_CLIENT_ID_IN_USE: &str = "mqtt_client_id_in_use";
/// Alert: the broker refused the subscription to the bay's commands (its ACL).
pub const ALERT_SUBSCRIPTION_REFUSED: &str = "mqtt_subscription_refused";

/// Why the link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The CA file for `mqtts` could not be read or holds no usable certificate. A retry after
    /// fixing the file helps.
    #[error("mqtt.ca_file {path}: {reason}; point it at the PEM file of the CA that signed the broker's certificate")]
    Ca { path: String, reason: String },
    /// The password file could not be read.
    #[error("mqtt password: {reason}")]
    Password { reason: String },
    /// The client certificate or its key (`mqtt.client_cert_file`, `client_key_file`) could not
    /// be used. A retry after fixing the file helps.
    #[error("{key} {path}: {reason}; {fix}")]
    ClientCert { key: &'static str, path: String, reason: String, fix: &'static str },
    /// The link's thread or its tokio runtime could not be started (the system is out of
    /// resources).
    #[error("the MQTT link's thread cannot be started: {reason}")]
    Thread { reason: String },
}

/// Delay before reconnect attempt `attempt` (0 after the first failure): exponential from
/// 500 ms, capped at 30 s, with full jitter from `unit` (a number in 0..1), never under 100 ms.
pub fn reconnect_delay(attempt: u32, unit: f64) -> Duration {
    let ceiling = 500f64 * 2f64.powi(attempt.min(16) as i32);
    let ceiling = ceiling.min(30_000.0);
    let millis = (ceiling * unit.clamp(0.0, 1.0)).max(100.0);
    Duration::from_millis(millis as u64)
}

/// The handle the daemon (or the demo) publishes through. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
    topics: Topics,
}

/// What the handles and the link's thread share.
struct Shared {
    outbox: Mutex<Outbox>,
    /// Wakes the link's loop: something was queued, or `stop` was asked for.
    wake: Notify,
    connected: AtomicBool,
    stopping: AtomicBool,
    dropped: AtomicU64,
    /// The link's loop has ended (its connection is closed); `stop` waits for it.
    ended: Mutex<bool>,
    ended_signal: Condvar,
    client_id: String,
    /// `host:port`, for messages.
    broker: String,
}

impl Link {
    /// Starts the link's thread; `on_event` receives connections, losses and commands (on that
    /// thread: it must not block).
    pub fn start(
        config: &MqttConfig,
        bay_id: &str,
        on_event: Box<dyn Fn(LinkEvent) + Send>,
    ) -> Result<Link, LinkError> {
        let topics = Topics::new(&config.topic_prefix, bay_id);
        let client_id = config.client_id(bay_id);
        let mut options = MqttOptions::new(client_id.clone(), config.host.clone(), config.port);
        options.set_keep_alive(Duration::from_secs(10));
        // A persistent session: what is sent to the bay while it is away waits at the broker.
        options.set_clean_session(false);
        options.set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
        options.set_last_will(LastWill::new(topics.status(), "offline", QoS::AtLeastOnce, true));
        if let Some(user) = &config.username {
            let password = password(config)?;
            options.set_credentials(user.clone(), password.as_ref().map_or("", |p| p.expose()));
        }
        if config.tls {
            options.set_transport(Transport::tls_with_config(tls_config(config)?));
        }
        let (client, event_loop) = AsyncClient::new(options, 64);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| LinkError::Thread { reason: format!("its tokio runtime: {e}") })?;
        let link = Link::new(topics, client_id, format!("{}:{}", config.host, config.port));
        let owner = link.clone();
        std::thread::Builder::new()
            .name("mqtt-link".to_owned())
            .spawn(move || {
                let _ended = Ended(&owner.shared);
                runtime.block_on(task::run(&owner, event_loop, client, &*on_event, fastrand::f64));
                // A name lookup may still be running on the runtime's blocking pool: not
                // waited for.
                runtime.shutdown_background();
            })
            .map_err(|e| LinkError::Thread { reason: e.to_string() })?;
        Ok(link)
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Whether the broker is connected right now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// Events and acks dropped so far because the broker was away or slow.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Replaces the state to publish (retained); only the latest one is ever sent.
    pub fn set_state(&self, payload: Vec<u8>) {
        self.outbox().set_state(payload);
        self.shared.wake.notify_one();
    }

    /// Retained messages published after every connect (and now), before events and state:
    /// Home Assistant's discovery configs. An empty payload removes a retained message.
    pub fn set_retained(&self, messages: Vec<(String, Vec<u8>)>) {
        self.outbox().set_retained(messages);
        self.shared.wake.notify_one();
    }

    /// Queues an event; dropped when the broker is away or the queue is full.
    pub fn event(&self, payload: Vec<u8>) {
        self.enqueue(self.topics.events(), payload);
    }

    /// Queues the ack of command `name`.
    pub fn ack(&self, name: &str, payload: Vec<u8>) {
        self.enqueue(self.topics.ack(name), payload);
    }

    /// Hands over what waits (the latest state at once), publishes retained `offline`,
    /// disconnects and waits up to `grace` for the link's thread to have closed the connection.
    /// Must not be called from `on_event`.
    pub fn stop(&self, grace: Duration) {
        self.request_stop();
        let ended = self.shared.ended.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.shared.ended_signal.wait_timeout_while(ended, grace, |ended| !*ended);
    }

    fn new(topics: Topics, client_id: String, broker: String) -> Link {
        let shared = Arc::new(Shared {
            outbox: Mutex::new(Outbox::new()),
            wake: Notify::new(),
            connected: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            ended: Mutex::new(false),
            ended_signal: Condvar::new(),
            client_id,
            broker,
        });
        Link { shared, topics }
    }

    /// Tells the link's loop to say goodbye and end, without waiting for it.
    fn request_stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }

    fn enqueue(&self, topic: String, payload: Vec<u8>) {
        if !self.is_connected() || !self.outbox().push(topic, payload) {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.shared.wake.notify_one();
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.shared.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Marks the link's loop as ended when its thread leaves it, however it leaves.
struct Ended<'s>(&'s Shared);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.connected.store(false, Ordering::SeqCst);
        *self.0.ended.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.0.ended_signal.notify_all();
    }
}

/// What a person should check for a connection refused with `reason` (rumqttc's and rustls'
/// words), when the reason is a known one.
pub fn refusal_hint(reason: &str) -> Option<&'static str> {
    const HINTS: &[(&str, &str)] = &[
        ("UnknownIssuer", "the broker's certificate is not signed by the CA in mqtt.ca_file"),
        ("expired", "the broker's certificate has expired (or the bay's clock is wrong)"),
        ("Expired", "the broker's certificate has expired (or the bay's clock is wrong)"),
        ("not valid for name", "the broker's certificate does not name the host in mqtt.url"),
        ("NotValidForName", "the broker's certificate does not name the host in mqtt.url"),
        (
            "CertificateRequired",
            "the broker requires a client certificate: set mqtt.client_cert_file and client_key_file",
        ),
        ("UnknownCA", "the broker does not trust the client certificate's CA"),
        ("BadCertificate", "the broker refused the client certificate"),
        ("NotAuthorized", "the broker refused the user name, password or certificate"),
        ("BadUserNamePassword", "the broker refused the user name or password"),
        ("Connection refused", "nothing listens at the broker's address"),
    ];
    HINTS.iter().find(|(words, _)| reason.contains(words)).map(|(_, hint)| *hint)
}

/// The broker password: `mqtt.password_file` (owner-only), else systemd's credential
/// `mqtt-password` when there is one; read through the kiosk's one loader of secrets.
fn password(config: &MqttConfig) -> Result<Option<crate::credentials::Secret>, LinkError> {
    crate::credentials::load_optional(
        config.password_file.as_deref(),
        crate::credentials::MQTT_PASSWORD_CREDENTIAL,
    )
    .map_err(|e| LinkError::Password { reason: e.to_string() })
}

fn tls_config(config: &MqttConfig) -> Result<TlsConfiguration, LinkError> {
    use rustls_pki_types::pem::PemObject;
    let Some(ca) = &config.ca_file else {
        return Err(LinkError::Ca { path: "(none)".into(), reason: "no CA file is configured".into() });
    };
    let err = |reason: String| LinkError::Ca { path: ca.display().to_string(), reason };
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| err(e.to_string()))?;
    for cert in certs {
        roots.add(cert.map_err(|e| err(e.to_string()))?).map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(roots);
    let client = match (&config.client_cert_file, &config.client_key_file) {
        (Some(cert), Some(key)) => {
            let (chain, key) = client_identity(cert, key)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| LinkError::ClientCert {
                key: "mqtt.client_cert_file",
                path: cert.display().to_string(),
                reason: e.to_string(),
                fix: "the certificate and client_key_file must be a pair",
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(TlsConfiguration::Rustls(Arc::new(client)))
}

/// The client certificate chain and its key, for mutual TLS. The key file must be owner-only,
/// like every secret of the kiosk.
fn client_identity(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<
    (Vec<rustls_pki_types::CertificateDer<'static>>, rustls_pki_types::PrivateKeyDer<'static>),
    LinkError,
> {
    use rustls_pki_types::pem::PemObject;
    let cert_err = |reason: String| LinkError::ClientCert {
        key: "mqtt.client_cert_file",
        path: cert.display().to_string(),
        reason,
        fix: "point it at the PEM certificate issued to this bay",
    };
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("holds no certificate".into()));
    }
    let key_err = |reason: String| LinkError::ClientCert {
        key: "mqtt.client_key_file",
        path: key.display().to_string(),
        reason,
        fix: "point it at the PEM private key of client_cert_file, owned by the kiosk's user, mode 600",
    };
    // The same owner-only rule and reading as the cloud's secret; the text stays redacted.
    let text = crate::credentials::load_file(key).map_err(|e| key_err(e.to_string()))?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(text.expose().as_bytes())
        .map_err(|e| key_err(format!("holds no usable private key ({e})")))?;
    Ok((chain, key))
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("topics", &self.topics).field("connected", &self.is_connected()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_grows_is_capped_and_never_spins() {
        assert_eq!(reconnect_delay(0, 1.0), Duration::from_millis(500));
        assert_eq!(reconnect_delay(3, 1.0), Duration::from_millis(4000));
        assert_eq!(reconnect_delay(30, 1.0), Duration::from_secs(30));
        assert_eq!(reconnect_delay(u32::MAX, 1.0), Duration::from_secs(30));
        for attempt in 0..40 {
            assert!(reconnect_delay(attempt, 0.0) >= Duration::from_millis(100));
            assert!(reconnect_delay(attempt, 0.5) <= Duration::from_secs(15));
        }
    }

    #[test]
    fn refusals_get_a_hint_a_person_can_act_on() {
        let check = |reason: &str, words: Option<&str>| {
            let hint = refusal_hint(reason);
            match words {
                Some(w) => assert!(hint.is_some_and(|h| h.contains(w)), "{reason}: {hint:?}"),
                None => assert_eq!(hint, None, "{reason}"),
            }
        };
        check("TLS: I/O: invalid peer certificate: UnknownIssuer", Some("mqtt.ca_file"));
        check("TLS: I/O: invalid peer certificate: certificate expired: verification time 1, but certificate is not valid after 0", Some("expired"));
        check(
            "TLS: I/O: invalid peer certificate: certificate not valid for name \"127.0.0.1\"",
            Some("mqtt.url"),
        );
        check("I/O: received fatal alert: CertificateRequired", Some("client_cert_file"));
        check("Connection refused, return code: `NotAuthorized`", Some("user name"));
        check("I/O: Connection refused (os error 111)", Some("nothing listens"));
        check("Network timeout", None);
    }

    #[test]
    fn a_password_file_others_can_read_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mqtt-password");
        std::fs::write(&file, "pw\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut config = MqttConfig::from_url("mqtt://127.0.0.1:1").unwrap();
        config.username = Some("bay".into());
        config.password_file = Some(file.clone());
        let refused = Link::start(&config, "bay-07", Box::new(|_| {})).map(|_| ()).unwrap_err();
        let text = refused.to_string();
        assert!(matches!(refused, LinkError::Password { .. }), "{text}");
        assert!(text.contains(&file.display().to_string()) && text.contains("chmod 600"), "{text}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = Link::start(&config, "bay-07", Box::new(|_| {})).expect("an owner-only file is taken");
        link.stop(Duration::from_millis(100));
    }

    #[test]
    fn command_names_come_only_from_command_topics() {
        let t = Topics::new("capture-kiosk", "bay-07");
        assert_eq!(t.command_name("capture-kiosk/bay-07/cmd/start"), Some("start"));
        assert_eq!(t.command_name("capture-kiosk/bay-07/cmd/start/ack"), None);
        assert_eq!(t.command_name("capture-kiosk/bay-08/cmd/start"), None);
        assert_eq!(t.command_name("capture-kiosk/bay-07/cmd/"), None);
        assert_eq!(t.command_name("capture-kiosk/bay-07/state"), None);
    }
}
