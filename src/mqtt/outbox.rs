//! What waits to be published and when it may go, as decisions over `now`: retained `online`
//! after every connect, a bounded queue of events and acks, and the latest `state` only,
//! coalesced to one message per [`STATE_MIN_INTERVAL`] and re-sent after a reconnect. Events
//! and acks always go before the state that counts them, so a reader sees `seq` in order.

use std::collections::VecDeque;

use tokio::time::Instant;

use super::wire::Requests;
use super::{Topics, OUTBOX_CAPACITY, STATE_MIN_INTERVAL};

/// The messages the link still has to hand to the client.
#[derive(Debug)]
pub(crate) struct Outbox {
    /// The latest state not yet handed to the client.
    state: Option<Vec<u8>>,
    /// The latest state handed over, re-sent after a reconnect.
    last_state: Option<Vec<u8>>,
    /// When the last state was handed over.
    last_state_at: Option<Instant>,
    /// `online` must be (re-)published.
    announce: bool,
    /// Events and acks, oldest first: (topic, payload).
    queue: VecDeque<(String, Vec<u8>)>,
    /// Retained messages of the bay's own choosing (Home Assistant's discovery configs),
    /// published after every connect.
    retained: Vec<(String, Vec<u8>)>,
    /// Those of `retained` still to publish since the last connect or change.
    retained_due: VecDeque<(String, Vec<u8>)>,
}

/// What [`Outbox::hand_over`] had to leave behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Left {
    /// Nothing: everything due went to the client.
    Nothing,
    /// A state held back by coalescing, due at this instant.
    StateDueAt(Instant),
    /// The client's queue is full: hand over again once the connection took a request.
    Blocked,
}

impl Outbox {
    pub(crate) fn new() -> Outbox {
        Outbox {
            state: None,
            last_state: None,
            last_state_at: None,
            announce: true,
            queue: VecDeque::new(),
            retained: Vec::new(),
            retained_due: VecDeque::new(),
        }
    }

    /// Replaces the retained messages published after every connect; they go now too.
    pub(crate) fn set_retained(&mut self, messages: Vec<(String, Vec<u8>)>) {
        self.retained_due = messages.iter().cloned().collect();
        self.retained = messages;
    }

    /// Replaces the state waiting to go; only the latest one is ever sent.
    pub(crate) fn set_state(&mut self, payload: Vec<u8>) {
        self.state = Some(payload);
    }

    /// Queues an event or ack; `false` when [`OUTBOX_CAPACITY`] are waiting already.
    pub(crate) fn push(&mut self, topic: String, payload: Vec<u8>) -> bool {
        if self.queue.len() >= OUTBOX_CAPACITY {
            return false;
        }
        self.queue.push_back((topic, payload));
        true
    }

    /// The broker accepted a connection: `online` goes again, and so does the latest state
    /// (retained messages vanish with a broker that restarts). Events and acks queued before
    /// a loss stay queued and go out now.
    pub(crate) fn connected(&mut self) {
        self.announce = true;
        self.retained_due = self.retained.iter().cloned().collect();
        if self.state.is_none() {
            self.state = self.last_state.clone();
        }
    }

    /// Hands to `requests` what is due at `now`, in order: `online`, events and acks, then the
    /// state once [`STATE_MIN_INTERVAL`] has passed since the last one.
    pub(crate) fn hand_over(&mut self, now: Instant, topics: &Topics, requests: &impl Requests) -> Left {
        self.hand_over_at(now, topics, requests, false)
    }

    /// Hands over everything, the state without waiting for the interval: the link is
    /// stopping and this is the last chance.
    pub(crate) fn flush(&mut self, now: Instant, topics: &Topics, requests: &impl Requests) -> Left {
        self.hand_over_at(now, topics, requests, true)
    }

    fn hand_over_at(&mut self, now: Instant, topics: &Topics, requests: &impl Requests, last: bool) -> Left {
        if self.announce {
            if !requests.publish(&topics.status(), true, b"online") {
                return Left::Blocked;
            }
            self.announce = false;
        }
        while let Some((topic, payload)) = self.retained_due.front() {
            if !requests.publish(topic, true, payload) {
                return Left::Blocked;
            }
            self.retained_due.pop_front();
        }
        while let Some((topic, payload)) = self.queue.front() {
            if !requests.publish(topic, false, payload) {
                // The state counts what is still queued: it waits for them.
                return Left::Blocked;
            }
            self.queue.pop_front();
        }
        let Some(state) = &self.state else { return Left::Nothing };
        if let Some(due) = self.last_state_at.map(|at| at + STATE_MIN_INTERVAL) {
            if now < due && !last {
                return Left::StateDueAt(due);
            }
        }
        if !requests.publish(&topics.state(), true, state) {
            return Left::Blocked;
        }
        self.last_state = self.state.take();
        self.last_state_at = Some(now);
        Left::Nothing
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::time::Duration;

    use super::*;

    /// A client queue that takes `room` more requests and records them as `topic=payload`.
    struct Client {
        room: RefCell<usize>,
        taken: RefCell<Vec<String>>,
    }

    impl Client {
        fn with_room(room: usize) -> Client {
            Client { room: RefCell::new(room), taken: RefCell::default() }
        }
        fn taken(&self) -> Vec<String> {
            self.taken.take()
        }
    }

    impl Requests for Client {
        fn publish(&self, topic: &str, retain: bool, payload: &[u8]) -> bool {
            let mut room = self.room.borrow_mut();
            if *room == 0 {
                return false;
            }
            *room -= 1;
            let name = topic.rsplit('/').next().unwrap_or(topic);
            let flag = if retain { "(retained)" } else { "" };
            self.taken.borrow_mut().push(format!("{name}{flag}={}", String::from_utf8_lossy(payload)));
            true
        }
        fn subscribe(&self, _: &str) -> bool {
            true
        }
        fn disconnect(&self) -> bool {
            true
        }
    }

    fn topics() -> Topics {
        Topics::new("capture-kiosk", "bay-1")
    }

    #[test]
    fn online_then_events_and_acks_then_the_state_that_counts_them() {
        let (t, client, now) = (topics(), Client::with_room(usize::MAX), Instant::now());
        let mut outbox = Outbox::new();
        outbox.set_state(b"s1".to_vec());
        assert!(outbox.push(t.events(), b"e1".to_vec()));
        assert!(outbox.push(t.ack("start"), b"a1".to_vec()));
        assert_eq!(outbox.hand_over(now, &t, &client), Left::Nothing);
        assert_eq!(client.taken(), ["status(retained)=online", "events=e1", "ack=a1", "state(retained)=s1"]);
        assert_eq!(outbox.hand_over(now, &t, &client), Left::Nothing);
        assert!(client.taken().is_empty(), "nothing is sent twice");
    }

    #[test]
    fn the_state_is_coalesced_to_the_latest_one_per_interval() {
        let (t, client, start) = (topics(), Client::with_room(usize::MAX), Instant::now());
        let mut outbox = Outbox::new();
        outbox.set_state(b"s1".to_vec());
        outbox.hand_over(start, &t, &client);
        outbox.set_state(b"s2".to_vec());
        outbox.set_state(b"s3".to_vec());
        let due = start + STATE_MIN_INTERVAL;
        assert_eq!(outbox.hand_over(start + Duration::from_millis(50), &t, &client), Left::StateDueAt(due));
        // An event is not held back by a state that waits.
        outbox.push(t.events(), b"e1".to_vec());
        assert_eq!(outbox.hand_over(due - Duration::from_millis(1), &t, &client), Left::StateDueAt(due));
        assert_eq!(outbox.hand_over(due, &t, &client), Left::Nothing);
        assert_eq!(
            client.taken(),
            ["status(retained)=online", "state(retained)=s1", "events=e1", "state(retained)=s3"]
        );
        // A stop hands the latest state over at once.
        outbox.set_state(b"s4".to_vec());
        assert_eq!(outbox.flush(due, &t, &client), Left::Nothing);
        assert_eq!(client.taken(), ["state(retained)=s4"]);
    }

    #[test]
    fn a_full_client_queue_holds_the_state_back_behind_the_events() {
        let (t, client, now) = (topics(), Client::with_room(2), Instant::now());
        let mut outbox = Outbox::new();
        for e in ["e1", "e2", "e3"] {
            outbox.push(t.events(), e.as_bytes().to_vec());
        }
        outbox.set_state(b"s1".to_vec());
        assert_eq!(outbox.hand_over(now, &t, &client), Left::Blocked);
        assert_eq!(client.taken(), ["status(retained)=online", "events=e1"]);
        *client.room.borrow_mut() = 1;
        assert_eq!(outbox.hand_over(now, &t, &client), Left::Blocked);
        assert_eq!(client.taken(), ["events=e2"]);
        *client.room.borrow_mut() = 5;
        assert_eq!(outbox.hand_over(now, &t, &client), Left::Nothing);
        assert_eq!(client.taken(), ["events=e3", "state(retained)=s1"]);
    }

    #[test]
    fn a_reconnect_announces_again_and_re_sends_the_last_state_unless_a_newer_one_waits() {
        let (t, client, start) = (topics(), Client::with_room(usize::MAX), Instant::now());
        let mut outbox = Outbox::new();
        outbox.connected();
        outbox.set_state(b"s1".to_vec());
        outbox.hand_over(start, &t, &client);
        client.taken();
        let later = start + Duration::from_secs(5);
        outbox.connected();
        outbox.hand_over(later, &t, &client);
        assert_eq!(client.taken(), ["status(retained)=online", "state(retained)=s1"]);
        outbox.set_state(b"s2".to_vec());
        outbox.connected();
        outbox.hand_over(later + Duration::from_secs(5), &t, &client);
        assert_eq!(client.taken(), ["status(retained)=online", "state(retained)=s2"]);
    }

    #[test]
    fn retained_messages_of_the_bays_choosing_go_after_online_and_again_after_every_connect() {
        let mut outbox = Outbox::new();
        outbox.set_retained(vec![("ha/a/config".into(), b"A".to_vec()), ("ha/b/config".into(), Vec::new())]);
        outbox.push("t/events".into(), b"e".to_vec());
        let client = Client::with_room(10);
        outbox.hand_over(Instant::now(), &topics(), &client);
        let taken = client.taken();
        assert_eq!(taken, ["status(retained)=online", "config(retained)=A", "config(retained)=", "events=e"]);
        let again = Client::with_room(10);
        outbox.hand_over(Instant::now(), &topics(), &again);
        assert!(again.taken().is_empty(), "once per connect: {:?}", again.taken());
        outbox.connected();
        let after = Client::with_room(10);
        outbox.hand_over(Instant::now(), &topics(), &after);
        assert_eq!(
            after.taken()[..3],
            ["status(retained)=online", "config(retained)=A", "config(retained)="]
        );
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut outbox = Outbox::new();
        for n in 0..OUTBOX_CAPACITY {
            assert!(outbox.push("t".into(), n.to_string().into_bytes()), "message {n}");
        }
        assert!(!outbox.push("t".into(), b"one too many".to_vec()));
    }
}
