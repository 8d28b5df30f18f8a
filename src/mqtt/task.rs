//! The link's loop, run by a current-thread tokio runtime on the link's one thread: a
//! `tokio::select!` over the connection (rumqttc's `poll()`, preceded after a failure by the
//! reconnect delay, a `tokio::time::sleep`), the outbox (woken by `set_state`, `event`, `ack`
//! and `stop` through a `Notify`) and the next state deadline (coalescing). The poll future
//! lives across turns of the loop, so a wake-up never cancels a read or a write half done.
//! What a CONNACK, a SUBACK or a failure means is [`Connection`]'s decision, what to publish
//! and when is the outbox's (`super::outbox`); this file only does what they say, logs
//! and tells the owner.

use std::pin::pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{ConnectionError, Event, Outgoing, Packet, Publish, SubscribeReasonCode};
use tokio::time::Instant;

use super::connection::{Accepted, Connection, Failure, Report, Subscription};
use super::outbox::Left;
use super::wire::{Requests, Wire};
use super::{
    refusal_hint, Incoming, Link, LinkEvent, Topics, ALERT_CLIENT_ID_IN_USE, ALERT_SUBSCRIPTION_REFUSED,
    MAX_COMMAND_BYTES, MAX_READ_PAYLOAD,
};

/// How long the loop waits, once its DISCONNECT is out, for the broker to close the connection.
/// Closing first, with the broker's acks still unread, would reset the connection, and a broker
/// that sees a reset may drop what it had not read yet (the last state, `offline`) and publish
/// the Last Will instead.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Runs `link` over `wire` and `requests` until it is stopped; `on_event` hears connections,
/// losses, alerts and commands, and `unit` draws the jitter of reconnect delays (in 0..1).
pub(crate) async fn run(
    link: &Link,
    wire: impl Wire,
    requests: impl Requests,
    on_event: &dyn Fn(LinkEvent),
    mut unit: impl FnMut() -> f64,
) {
    let shared = &*link.shared;
    let topics = &link.topics;
    let (broker, client_id) = (shared.broker.as_str(), shared.client_id.as_str());
    let epoch = Instant::now();
    let mut connection = Connection::default();
    let mut next = pin!(poll_after(wire, Duration::ZERO));
    let mut state_due: Option<Instant> = None;
    let mut goodbye: Option<Goodbye> = None;
    let mut closed_by: Option<Instant> = None;
    loop {
        tokio::select! {
            (mut wire, polled) = &mut next => {
                let since = Instant::now() - epoch;
                let delay = match polled {
                    Ok(event) => {
                        if connection.still_connected(since) {
                            log::info!(broker = broker, client_id = client_id; "MQTT session held long enough; no other client seems to use this client id any more");
                            on_event(LinkEvent::AlertCleared { kind: ALERT_CLIENT_ID_IN_USE });
                        }
                        match event {
                            Event::Incoming(Packet::ConnAck(connack)) => {
                                match connection.accepted(since, connack.session_present) {
                                    Accepted::SessionDiscarded => {
                                        wire.set_clean_session(false);
                                        wire.drop_connection();
                                        log::info!(broker = broker, client_id = client_id; "MQTT session with the oversized message discarded; connecting again with a persistent one");
                                    }
                                    Accepted::Connected => {
                                        // A subscription refused here comes back as a SUBACK.
                                        requests.subscribe(&topics.commands());
                                        link.outbox().connected();
                                        shared.connected.store(true, Ordering::SeqCst);
                                        log::info!(broker = broker, client_id = client_id, session_present = connack.session_present, topic = topics.status().as_str(); "MQTT broker connected");
                                        on_event(LinkEvent::Connected);
                                    }
                                }
                            }
                            Event::Incoming(Packet::SubAck(suback)) => {
                                let refused =
                                    suback.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure));
                                subscription(connection.subscribed(refused), topics, broker, client_id, on_event);
                            }
                            Event::Incoming(Packet::Publish(publish)) => command(&publish, topics, on_event),
                            Event::Outgoing(Outgoing::Disconnect) => {
                                // The broker closes the connection once it has read everything
                                // before the DISCONNECT; the loop ends then (below, on the error).
                                shared.connected.store(false, Ordering::SeqCst);
                                closed_by = Some(Instant::now() + CLOSE_WAIT);
                            }
                            _ => {}
                        }
                        Duration::ZERO
                    }
                    Err(error) => {
                        shared.connected.store(false, Ordering::SeqCst);
                        if goodbye.is_some() || shared.stopping.load(Ordering::SeqCst) {
                            return;
                        }
                        let failure = connection.failed(since, &error, unit());
                        if failure.oversized.is_some() {
                            wire.set_clean_session(true);
                        }
                        tell(&failure, &error, link, on_event);
                        failure.delay
                    }
                };
                next.set(poll_after(wire, delay));
            }
            () = shared.wake.notified() => {}
            () = until(state_due) => {}
            () = until(closed_by) => return,
        }
        let now = Instant::now();
        if shared.stopping.load(Ordering::SeqCst) {
            if goodbye.is_none() && !connection.is_connected() {
                // Nobody to say goodbye to: the Last Will says `offline`.
                return;
            }
            goodbye.get_or_insert(Goodbye::Outbox).advance(link, now, &requests);
            // The goodbye hands the state over without waiting for its turn.
            state_due = None;
            continue;
        }
        if connection.is_connected() {
            state_due = match link.outbox().hand_over(now, topics, &requests) {
                Left::StateDueAt(at) => Some(at),
                // A blocked outbox is handed over again after the next event of the
                // connection, which is what frees room in the client's queue.
                Left::Nothing | Left::Blocked => None,
            };
        }
    }
}

/// The next event of `wire`, `delay` from now.
async fn poll_after<W: Wire>(mut wire: W, delay: Duration) -> (W, Result<Event, ConnectionError>) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let polled = wire.poll().await;
    (wire, polled)
}

/// Completes at `deadline`, or never.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How far the goodbye of a stopping link got; each step is queued once the client takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goodbye {
    /// What the outbox holds, the latest state at once.
    Outbox,
    /// Retained `offline`.
    Offline,
    /// MQTT `DISCONNECT`; the loop ends when the broker has closed the connection after it.
    Disconnect,
    Queued,
}

impl Goodbye {
    fn advance(&mut self, link: &Link, now: Instant, requests: &impl Requests) {
        loop {
            let done = match self {
                Goodbye::Outbox => link.outbox().flush(now, &link.topics, requests) == Left::Nothing,
                Goodbye::Offline => requests.publish(&link.topics.status(), true, b"offline"),
                Goodbye::Disconnect => requests.disconnect(),
                Goodbye::Queued => return,
            };
            if !done {
                return;
            }
            *self = match self {
                Goodbye::Outbox => Goodbye::Offline,
                Goodbye::Offline => Goodbye::Disconnect,
                Goodbye::Disconnect | Goodbye::Queued => Goodbye::Queued,
            };
        }
    }
}

/// Hands a command to the owner; retained ones and other topics are not commands.
fn command(publish: &Publish, topics: &Topics, on_event: &dyn Fn(LinkEvent)) {
    let Some(name) = topics.command_name(&publish.topic) else { return };
    if publish.retain {
        log::warn!(command = name; "Retained MQTT command ignored");
        return;
    }
    // An oversized payload is left for the parser to refuse with a reason; its beginning is
    // enough to find the command id.
    let size = publish.payload.len();
    let payload = publish.payload[..size.min(MAX_COMMAND_BYTES + 1)].to_vec();
    on_event(LinkEvent::Command(Incoming { name: name.to_owned(), payload, size }));
}

/// Says a change of the command subscription.
fn subscription(
    change: Option<Subscription>,
    topics: &Topics,
    broker: &str,
    client_id: &str,
    on_event: &dyn Fn(LinkEvent),
) {
    match change {
        Some(Subscription::Refused) => {
            log::error!(broker = broker, client_id = client_id, topic = topics.commands().as_str(); "MQTT broker refused the subscription to the bay's commands; check the broker's ACL for this bay's user");
            on_event(LinkEvent::Alert {
                kind: ALERT_SUBSCRIPTION_REFUSED,
                reason: format!(
                    "the broker {broker} refused the subscription to {}: no command reaches this bay; let this bay's user read its cmd/+ topics in the broker's ACL",
                    topics.commands()
                ),
            });
        }
        Some(Subscription::AcceptedAgain) => {
            log::info!(broker = broker, topic = topics.commands().as_str(); "MQTT broker accepted the subscription to the bay's commands");
            on_event(LinkEvent::AlertCleared { kind: ALERT_SUBSCRIPTION_REFUSED });
        }
        None => {}
    }
}

/// Says a failure as [`Connection::failed`] judged it.
fn tell(failure: &Failure, error: &ConnectionError, link: &Link, on_event: &dyn Fn(LinkEvent)) {
    let (broker, client_id) = (link.shared.broker.as_str(), link.shared.client_id.as_str());
    let reason = error.to_string();
    let retry_in_ms = failure.delay.as_millis() as u64;
    if let Some(bytes) = failure.oversized {
        log::warn!(bytes = bytes, limit = MAX_READ_PAYLOAD; "MQTT message over the size the kiosk reads; the connection is made again (set the broker's message_size_limit to refuse such messages)");
        on_event(LinkEvent::Oversized { bytes });
    }
    if failure.report == Report::Lost {
        log::warn!(broker = broker, reason = reason.as_str(); "MQTT broker connection lost");
        on_event(LinkEvent::Disconnected { reason: reason.clone() });
    }
    if failure.takeover_suspected {
        log::error!(broker = broker, client_id = client_id, retry_in_s = failure.delay.as_secs(); "MQTT session taken over again and again right after connecting: another client uses this client id (a second kiosk with the same bay_id?); reconnecting only every 10-20 s until it is gone");
        on_event(LinkEvent::Alert {
            kind: ALERT_CLIENT_ID_IN_USE,
            reason: format!(
                "another client keeps taking over the MQTT session of client id {client_id} at {broker} (a second kiosk with the same bay_id?); this bay reconnects only every 10-20 s: stop the other one or give it its own bay_id"
            ),
        });
    }
    match (failure.report, refusal_hint(&reason)) {
        (Report::Refused, Some(hint)) => {
            log::warn!(broker = broker, reason = reason.as_str(), hint = hint, retry_in_ms = retry_in_ms; "MQTT broker connection refused; retrying")
        }
        (Report::Refused, None) => {
            log::warn!(broker = broker, reason = reason.as_str(), retry_in_ms = retry_in_ms; "MQTT broker connection attempt failed; retrying")
        }
        (Report::Again, _) => {
            log::debug!(broker = broker, reason = reason.as_str(), retry_in_ms = retry_in_ms; "MQTT connection attempt failed")
        }
        (Report::Lost, _) => {}
    }
}

#[cfg(test)]
mod tests {
    //! The loop against a scripted connection under paused tokio time: every instant below is
    //! exact, and hours pass in microseconds.

    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::future::Future;
    use std::io;
    use std::pin::Pin;
    use std::rc::Rc;

    use rumqttc::{ConnAck, ConnectReturnCode, QoS, StateError, SubAck};
    use tokio::sync::Notify;

    use super::*;
    use crate::mqtt::takeover::{STABLE_SESSION, SUSPECTED_RETRY};
    use crate::mqtt::STATE_MIN_INTERVAL;

    const MS: fn(u64) -> Duration = Duration::from_millis;
    const S: fn(u64) -> Duration = Duration::from_secs;

    /// What the scripted connection does when polled, in order.
    enum Step {
        /// The broker accepts the connection.
        Accept { session_present: bool },
        /// The attempt, or the connection, fails.
        Fail(ConnectionError),
        /// A packet arrives.
        Receive(Packet),
        /// The connection took requests from the client's queue: room for this many more.
        Took(usize),
        /// Nothing happens for this long.
        Quiet(Duration),
    }

    /// What the link did to the connection.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Did {
        Poll,
        Subscribe(String),
        /// `topic=payload`, topic without the bay's root, `(retained)` when retained.
        Publish(String),
        Disconnect,
        CleanSession(bool),
        DropConnection,
    }

    #[derive(Default)]
    struct Script {
        steps: VecDeque<Step>,
        did: Vec<(u64, Did)>,
        /// Requests the client's queue still takes; `None`: any number.
        room: Option<usize>,
        disconnect_queued: bool,
        /// The DISCONNECT went out: the broker closes the connection, unless it `lingers`.
        disconnected: bool,
        lingers: bool,
    }

    /// The scripted connection and client queue (one script behind both), and a clock.
    #[derive(Clone)]
    struct Broker {
        script: Rc<RefCell<Script>>,
        more: Rc<Notify>,
        start: Instant,
    }

    impl Broker {
        fn new() -> Broker {
            Broker { script: Rc::default(), more: Rc::default(), start: Instant::now() }
        }

        /// Adds steps to the script.
        fn then(&self, steps: impl IntoIterator<Item = Step>) {
            self.script.borrow_mut().steps.extend(steps);
            self.more.notify_one();
        }

        fn record(&self, did: Did) {
            let at = (Instant::now() - self.start).as_millis() as u64;
            self.script.borrow_mut().did.push((at, did));
        }

        /// What the link did so far besides polling (milliseconds since the start), once.
        fn did(&self) -> Vec<(u64, Did)> {
            let did = std::mem::take(&mut self.script.borrow_mut().did);
            did.into_iter().filter(|(_, d)| *d != Did::Poll).collect()
        }

        /// When the link polled (milliseconds since the start), leaving the rest for `did`.
        fn polls(&self) -> Vec<u64> {
            let did = &mut self.script.borrow_mut().did;
            let polls = did.iter().filter(|(_, d)| *d == Did::Poll).map(|(at, _)| *at).collect();
            did.retain(|(_, d)| *d != Did::Poll);
            polls
        }

        fn now(&self) -> u64 {
            (Instant::now() - self.start).as_millis() as u64
        }
    }

    impl Wire for Broker {
        async fn poll(&mut self) -> Result<Event, ConnectionError> {
            self.record(Did::Poll);
            loop {
                let step = {
                    let mut script = self.script.borrow_mut();
                    if std::mem::take(&mut script.disconnect_queued) {
                        script.disconnected = true;
                        return Ok(Event::Outgoing(Outgoing::Disconnect));
                    }
                    if script.disconnected && !script.lingers {
                        return Err(closed_by_broker());
                    }
                    script.steps.pop_front()
                };
                match step {
                    Some(Step::Accept { session_present }) => {
                        let connack = ConnAck::new(ConnectReturnCode::Success, session_present);
                        return Ok(Event::Incoming(Packet::ConnAck(connack)));
                    }
                    Some(Step::Fail(error)) => return Err(error),
                    Some(Step::Receive(packet)) => return Ok(Event::Incoming(packet)),
                    Some(Step::Took(n)) => {
                        let mut script = self.script.borrow_mut();
                        script.room = script.room.map(|room| room + n);
                        return Ok(Event::Outgoing(Outgoing::Publish(1)));
                    }
                    Some(Step::Quiet(span)) => tokio::time::sleep(span).await,
                    None => self.more.notified().await,
                }
            }
        }

        fn set_clean_session(&mut self, clean: bool) {
            self.record(Did::CleanSession(clean));
        }

        fn drop_connection(&mut self) {
            self.record(Did::DropConnection);
        }
    }

    impl Requests for Broker {
        fn publish(&self, topic: &str, retain: bool, payload: &[u8]) -> bool {
            {
                let mut script = self.script.borrow_mut();
                match &mut script.room {
                    Some(0) => return false,
                    Some(room) => *room -= 1,
                    None => {}
                }
            }
            let topic = topic.strip_prefix("kiosk/bay-1/").unwrap_or(topic);
            let flag = if retain { "(retained)" } else { "" };
            self.record(Did::Publish(format!("{topic}{flag}={}", String::from_utf8_lossy(payload))));
            true
        }

        fn subscribe(&self, filter: &str) -> bool {
            self.record(Did::Subscribe(filter.to_owned()));
            true
        }

        fn disconnect(&self) -> bool {
            self.record(Did::Disconnect);
            self.script.borrow_mut().disconnect_queued = true;
            self.more.notify_one();
            true
        }
    }

    fn link() -> Link {
        Link::new(Topics::new("kiosk", "bay-1"), "kiosk-bay-1".into(), "127.0.0.1:1883".into())
    }

    /// The owner's ear: what the link told, in short.
    #[derive(Default)]
    struct Heard(RefCell<Vec<String>>);

    impl Heard {
        fn hear(&self, event: LinkEvent) {
            let said = match event {
                LinkEvent::Connected => "connected".to_owned(),
                LinkEvent::Disconnected { .. } => "disconnected".to_owned(),
                LinkEvent::Oversized { bytes } => format!("oversized {bytes}"),
                LinkEvent::Command(c) => {
                    format!("command {} {} of {}", c.name, String::from_utf8_lossy(&c.payload).len(), c.size)
                }
                LinkEvent::Alert { kind, .. } => format!("alert {kind}"),
                LinkEvent::AlertCleared { kind } => format!("cleared {kind}"),
            };
            self.0.borrow_mut().push(said);
        }
        fn take(&self) -> Vec<String> {
            self.0.take()
        }
    }

    /// Runs the loop for `span` of (paused) time; `true` when it ended.
    async fn run_for(run: Pin<&mut impl Future<Output = ()>>, span: Duration) -> bool {
        tokio::select! {
            biased;
            () = run => true,
            () = tokio::time::sleep(span) => false,
        }
    }

    fn publish(topic: &str) -> Did {
        Did::Publish(topic.to_owned())
    }
    fn refused() -> ConnectionError {
        ConnectionError::Io(io::Error::from(io::ErrorKind::ConnectionRefused))
    }
    fn reset() -> ConnectionError {
        ConnectionError::Io(io::Error::from(io::ErrorKind::ConnectionReset))
    }
    fn closed_by_broker() -> ConnectionError {
        ConnectionError::MqttState(StateError::ConnectionAborted)
    }

    #[tokio::test(start_paused = true)]
    async fn failed_attempts_wait_a_growing_capped_delay_and_a_connack_starts_over() {
        let (link, broker, heard) = (link(), Broker::new(), Heard::default());
        broker.then((0..9).map(|_| Step::Fail(refused())));
        broker.then([Step::Accept { session_present: false }, Step::Quiet(S(60)), Step::Fail(reset())]);
        broker.then([Step::Fail(refused())]);
        let on_event = |e| heard.hear(e);
        let mut run = pin!(run(&link, broker.clone(), broker.clone(), &on_event, || 1.0));
        assert!(!run_for(run.as_mut(), S(600)).await);
        // 500 ms doubling to the 30 s cap, then at once after the CONNACK (the connection's
        // next packet), and 500 ms again after the first failure that follows it.
        #[rustfmt::skip]
        let expected = [
            0, 500, 1_500, 3_500, 7_500, 15_500, 31_500, 61_500, 91_500,
            121_500, 121_500,
            182_000, 183_000,
        ];
        assert_eq!(broker.polls(), expected);
        assert_eq!(heard.take(), ["connected", "disconnected"]);
        assert!(!link.is_connected());
    }

    #[tokio::test(start_paused = true)]
    async fn every_connack_re_subscribes_and_re_announces_online_and_the_last_state() {
        let (link, broker, heard) = (link(), Broker::new(), Heard::default());
        link.set_state(b"s1".to_vec());
        link.event(b"before any connection".to_vec());
        assert_eq!(link.dropped(), 1, "an event with the broker away is dropped");
        broker.then([Step::Accept { session_present: true }]);
        let on_event = |e| heard.hear(e);
        let mut run = pin!(run(&link, broker.clone(), broker.clone(), &on_event, || 1.0));
        run_for(run.as_mut(), S(1)).await;
        assert!(link.is_connected());
        link.event(b"e1".to_vec());
        run_for(run.as_mut(), S(1)).await;
        broker.then([Step::Fail(reset())]);
        run_for(run.as_mut(), MS(100)).await;
        assert!(!link.is_connected());
        link.event(b"while away".to_vec());
        assert_eq!(link.dropped(), 2);
        broker.then([Step::Accept { session_present: true }]);
        run_for(run.as_mut(), S(1)).await;
        assert_eq!(
            broker.did(),
            [
                (0, Did::Subscribe("kiosk/bay-1/cmd/+".into())),
                (0, publish("status(retained)=online")),
                (0, publish("state(retained)=s1")),
                (1_000, publish("events=e1")),
                // Lost at 2 s, back 500 ms later.
                (2_500, Did::Subscribe("kiosk/bay-1/cmd/+".into())),
                (2_500, publish("status(retained)=online")),
                (2_500, publish("state(retained)=s1")),
            ]
        );
        assert_eq!(heard.take(), ["connected", "disconnected", "connected"]);
    }

    #[tokio::test(start_paused = true)]
    async fn state_changes_are_coalesced_to_the_latest_one_per_min_interval() {
        let (link, broker, heard) = (link(), Broker::new(), Heard::default());
        broker.then([Step::Accept { session_present: false }]);
        let on_event = |e| heard.hear(e);
        let mut run = pin!(run(&link, broker.clone(), broker.clone(), &on_event, || 1.0));
        run_for(run.as_mut(), S(1)).await;
        broker.did();
        link.set_state(b"a".to_vec());
        run_for(run.as_mut(), MS(10)).await;
        link.set_state(b"b".to_vec());
        link.set_state(b"c".to_vec());
        run_for(run.as_mut(), MS(50)).await;
        link.set_state(b"d".to_vec());
        run_for(run.as_mut(), MS(440)).await;
        link.set_state(b"e".to_vec());
        run_for(run.as_mut(), S(1)).await;
        let interval = STATE_MIN_INTERVAL.as_millis() as u64;
        assert_eq!(interval, 200, "the times below are written for 200 ms");
        assert_eq!(
            broker.did(),
            [
                (1_000, publish("state(retained)=a")),
                (1_200, publish("state(retained)=d")),
                // Quiet for longer than the interval: at once.
                (1_500, publish("state(retained)=e")),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn events_and_acks_go_before_the_state_that_counts_them_even_when_the_client_is_full() {
        let (link, broker, heard) = (link(), Broker::new(), Heard::default());
        broker.then([Step::Accept { session_present: false }]);
        let on_event = |e| heard.hear(e);
        let mut run = pin!(run(&link, broker.clone(), broker.clone(), &on_event, || 1.0));
        run_for(run.as_mut(), S(1)).await;
        broker.did();
        link.event(b"e1".to_vec());
        link.ack("start", b"a1".to_vec());
        link.set_state(b"s1".to_vec());
        run_for(run.as_mut(), MS(50)).await;
        link.event(b"e2".to_vec());
        link.set_state(b"s2".to_vec());
        run_for(run.as_mut(), S(1)).await;
        // rumqttc's request queue takes one more: the rest waits for it to take requests.
        broker.script.borrow_mut().room = Some(1);
        link.event(b"e3".to_vec());
        link.event(b"e4".to_vec());
        link.set_state(b"s3".to_vec());
        run_for(run.as_mut(), S(1)).await;
        broker.then([Step::Took(5)]);
        run_for(run.as_mut(), S(1)).await;
        assert_eq!(
            broker.did(),
            [
                (1_000, publish("events=e1")),
                (1_000, publish("cmd/start/ack=a1")),
                (1_000, publish("state(retained)=s1")),
                (1_050, publish("events=e2")),
                (1_200, publish("state(retained)=s2")),
                (2_050, publish("events=e3")),
                (3_050, publish("events=e4")),
                (3_050, publish("state(retained)=s3")),
            ]
        );
        assert_eq!(link.dropped(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_oversized_message_costs_one_clean_session_then_the_link_is_persistent_again() {
        let (link, broker, heard) = (link(), Broker::new(), Heard::default());
        let too_big = ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(5 << 20),
        ));
        broker.then([Step::Accept { session_present: true }, Step::Quiet(S(1)), Step::Fail(too_big)]);
        broker.then([Step::Accept { session_present: false }, Step::Accept { session_present: false }]);
        let on_event = |e| heard.hear(e);
        let mut run = pin!(run(&link, broker.clone(), broker.clone(), &on_event, || 1.0));
        run_for(run.as_mut(), S(5)).await;
        assert_eq!(
            broker.did(),
            [
                (0, Did::Subscribe("kiosk/bay-1/cmd/+".into())),
                (0, publish("status(retained)=online")),
                (1_000, Did::CleanSession(true)),
                // The clean session is taken only to discard the message.
                (1_500, Did::CleanSession(false)),
                (1_500, Did::DropConnection),
                (1_500, Did::Subscribe("kiosk/bay-1/cmd/+".into())),
                (1_500, publish("status(retained)=online")),
            ]
        );
        let oversized = format!("oversized {}", 5 << 20);
        assert_eq!(heard.take(), ["connected", oversized.as_str(), "disconnected", "connected"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_taken_over_again_and_again_slows_reconnecting_until_one_lasts() {
        let (link, broker, heard) = (link(), Broker::new(), Heard::default());
        for _ in 0..6 {
            broker.then([
                Step::Accept { session_present: true },
                Step::Quiet(MS(100)),
                Step::Fail(closed_by_broker()),
            ]);
        }
        let on_event = |e| heard.hear(e);
        let mut run = pin!(run(&link, broker.clone(), broker.clone(), &on_event, || 1.0));
        run_for(run.as_mut(), S(60)).await;
        let connects: Vec<u64> = broker.polls().into_iter().step_by(2).collect();
        let gaps: Vec<u64> = connects.windows(2).map(|w| w[1] - w[0]).collect();
        let suspected = SUSPECTED_RETRY.as_millis() as u64;
        assert_eq!(gaps, [600, 600, 600, 600, 100 + suspected, 100 + suspected], "{connects:?}");
        let alert = format!("alert {ALERT_CLIENT_ID_IN_USE}");
        assert_eq!(heard.take().iter().filter(|h| **h == alert).count(), 1);
        // A connection that lasts clears it.
        broker.then([Step::Accept { session_present: true }, Step::Quiet(STABLE_SESSION)]);
        broker.then([Step::Receive(Packet::PingResp)]);
        run_for(run.as_mut(), STABLE_SESSION + S(60)).await;
        assert_eq!(heard.take(), ["connected".to_owned(), format!("cleared {ALERT_CLIENT_ID_IN_USE}")]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_subscription_raises_the_alert_and_an_accepted_one_clears_it() {
        let (link, broker, heard) = (link(), Broker::new(), Heard::default());
        let suback = |code| Step::Receive(Packet::SubAck(SubAck::new(1, vec![code])));
        broker.then([Step::Accept { session_present: false }, suback(SubscribeReasonCode::Failure)]);
        broker.then([Step::Fail(reset()), Step::Accept { session_present: false }]);
        broker.then([suback(SubscribeReasonCode::Failure)]);
        broker.then([Step::Fail(reset()), Step::Accept { session_present: false }]);
        broker.then([suback(SubscribeReasonCode::Success(QoS::AtLeastOnce))]);
        let on_event = |e| heard.hear(e);
        let mut run = pin!(run(&link, broker.clone(), broker.clone(), &on_event, || 1.0));
        run_for(run.as_mut(), S(10)).await;
        let (alert, cleared) =
            (format!("alert {ALERT_SUBSCRIPTION_REFUSED}"), format!("cleared {ALERT_SUBSCRIPTION_REFUSED}"));
        let expected = [
            "connected",
            alert.as_str(),
            "disconnected",
            "connected",
            "disconnected",
            "connected",
            cleared.as_str(),
        ];
        assert_eq!(heard.take(), expected);
        let subscribed = broker.did().iter().filter(|(_, d)| matches!(d, Did::Subscribe(_))).count();
        assert_eq!(subscribed, 3, "once per CONNACK");
    }

    #[tokio::test(start_paused = true)]
    async fn commands_reach_the_owner_cut_to_what_the_parser_needs_and_retained_ones_do_not() {
        let (link, broker, heard) = (link(), Broker::new(), Heard::default());
        let command = |topic: &str, size: usize, retain: bool| {
            let mut publish = Publish::new(topic, QoS::AtLeastOnce, vec![b'x'; size]);
            publish.retain = retain;
            Step::Receive(Packet::Publish(publish))
        };
        broker.then([
            Step::Accept { session_present: true },
            command("kiosk/bay-1/cmd/ping", 20, false),
            command("kiosk/bay-1/cmd/start", 20, true),
            command("kiosk/bay-2/cmd/start", 20, false),
            command("kiosk/bay-1/cmd/start/ack", 20, false),
            command("kiosk/bay-1/cmd/start", 100_000, false),
        ]);
        let on_event = |e| heard.hear(e);
        let mut run = pin!(run(&link, broker.clone(), broker.clone(), &on_event, || 1.0));
        run_for(run.as_mut(), S(1)).await;
        let cut = MAX_COMMAND_BYTES + 1;
        assert_eq!(
            heard.take(),
            [
                "connected".to_owned(),
                "command ping 20 of 20".into(),
                format!("command start {cut} of 100000")
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stop_hands_over_the_latest_state_at_once_then_offline_then_disconnects() {
        let (link, broker, heard) = (link(), Broker::new(), Heard::default());
        broker.then([Step::Accept { session_present: true }]);
        let on_event = |e| heard.hear(e);
        let mut run = pin!(run(&link, broker.clone(), broker.clone(), &on_event, || 1.0));
        link.set_state(b"s1".to_vec());
        run_for(run.as_mut(), MS(50)).await;
        link.event(b"e1".to_vec());
        link.set_state(b"s2".to_vec());
        run_for(run.as_mut(), MS(50)).await;
        link.request_stop();
        assert!(run_for(run.as_mut(), S(1)).await, "the loop ends");
        assert_eq!(broker.now(), 100, "at once");
        assert_eq!(
            broker.did(),
            [
                (0, Did::Subscribe("kiosk/bay-1/cmd/+".into())),
                (0, publish("status(retained)=online")),
                (0, publish("state(retained)=s1")),
                (50, publish("events=e1")),
                (100, publish("state(retained)=s2")),
                (100, publish("status(retained)=offline")),
                (100, Did::Disconnect),
            ]
        );
        assert!(!link.is_connected());
    }

    #[tokio::test(start_paused = true)]
    async fn after_its_disconnect_the_link_waits_for_the_broker_to_close_but_not_forever() {
        let (link, broker, heard) = (link(), Broker::new(), Heard::default());
        broker.then([Step::Accept { session_present: true }]);
        broker.script.borrow_mut().lingers = true;
        let on_event = |e| heard.hear(e);
        let mut run = pin!(run(&link, broker.clone(), broker.clone(), &on_event, || 1.0));
        run_for(run.as_mut(), S(1)).await;
        link.set_state(b"s1".to_vec());
        run_for(run.as_mut(), MS(50)).await;
        // A state waiting for its turn when the stop comes: its deadline passes during the wait.
        link.set_state(b"s2".to_vec());
        link.set_state(b"s3".to_vec());
        run_for(run.as_mut(), MS(50)).await;
        link.request_stop();
        assert!(!run_for(run.as_mut(), CLOSE_WAIT - MS(1)).await, "waits for the broker to close");
        assert!(!link.is_connected(), "nothing more is queued once the DISCONNECT is out");
        assert!(run_for(run.as_mut(), MS(1)).await, "then ends");
        assert_eq!(broker.now(), 1_100 + CLOSE_WAIT.as_millis() as u64);
        let goodbye: Vec<(u64, Did)> = broker.did().into_iter().skip(3).collect();
        assert_eq!(
            goodbye,
            [
                (1_100, publish("state(retained)=s3")),
                (1_100, publish("status(retained)=offline")),
                (1_100, Did::Disconnect),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stop_while_the_broker_is_away_ends_at_once_without_waiting_out_the_delay() {
        let (link, broker, heard) = (link(), Broker::new(), Heard::default());
        broker.then((0..20).map(|_| Step::Fail(refused())));
        let on_event = |e| heard.hear(e);
        let mut run = pin!(run(&link, broker.clone(), broker.clone(), &on_event, || 1.0));
        run_for(run.as_mut(), S(20)).await;
        link.request_stop();
        assert!(run_for(run.as_mut(), S(60)).await, "the loop ends");
        assert_eq!(broker.now(), 20_000);
        assert!(broker.did().is_empty(), "nothing to say goodbye to");
        assert!(heard.take().is_empty());
    }
}
