//! The seam between the link's select loop and rumqttc: its `EventLoop` (the connection) and
//! its `AsyncClient` (the request queue into it) behind two small traits, so that the loop's
//! reconnecting, re-subscribing and publishing run against a script under paused tokio time
//! in tests.

use std::future::Future;

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, QoS};

/// The connection side: what `poll()` yields, and the two things the link changes on it.
pub(crate) trait Wire {
    /// The next event of the connection, connecting first when there is none. Returns at once
    /// after a failure: waiting before the next attempt is the caller's.
    fn poll(&mut self) -> impl Future<Output = Result<Event, ConnectionError>>;
    /// Whether the next connection asks for a clean session (MQTT 3.1.1's flag).
    fn set_clean_session(&mut self, clean: bool);
    /// Drops the connection without an error; the next `poll` connects again.
    fn drop_connection(&mut self);
}

/// The request side: non-blocking hand-overs to the connection, `false` when its queue is full.
pub(crate) trait Requests {
    /// Queues a QoS 1 publish.
    fn publish(&self, topic: &str, retain: bool, payload: &[u8]) -> bool;
    /// Queues a QoS 1 subscription.
    fn subscribe(&self, filter: &str) -> bool;
    /// Queues a clean MQTT `DISCONNECT`.
    fn disconnect(&self) -> bool;
}

impl Wire for EventLoop {
    fn poll(&mut self) -> impl Future<Output = Result<Event, ConnectionError>> {
        EventLoop::poll(self)
    }

    fn set_clean_session(&mut self, clean: bool) {
        self.mqtt_options.set_clean_session(clean);
    }

    fn drop_connection(&mut self) {
        self.clean();
    }
}

impl Requests for AsyncClient {
    fn publish(&self, topic: &str, retain: bool, payload: &[u8]) -> bool {
        self.try_publish(topic, QoS::AtLeastOnce, retain, payload.to_vec()).is_ok()
    }

    fn subscribe(&self, filter: &str) -> bool {
        self.try_subscribe(filter, QoS::AtLeastOnce).is_ok()
    }

    fn disconnect(&self) -> bool {
        self.try_disconnect().is_ok()
    }
}
