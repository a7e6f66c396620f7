//! Broker-wide counters. Relaxed atomics: they are statistics, read for reports and tests, and
//! never order any other memory access.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every task through `Arc<Broker>`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted since start.
    pub connections_accepted: AtomicU64,
    /// Connections open now.
    pub connections_current: AtomicU64,
    /// PUBLISH packets received from clients, by QoS.
    pub publish_received: [AtomicU64; 3],
    /// PUBLISH packets sent to clients, by QoS.
    pub publish_sent: [AtomicU64; 3],
    /// Bytes read from client sockets (counted per read, not per packet).
    pub bytes_received: AtomicU64,
    /// Bytes written to client sockets (counted per write).
    pub bytes_sent: AtomicU64,
    /// Messages dropped because a session queue hit `max_queued_messages` or `max_queued_bytes`.
    pub dropped_queue_full: AtomicU64,
    /// QoS 0 messages not queued for an offline session (`queue_qos0_offline = false`).
    pub dropped_qos0_offline: AtomicU64,
    /// QoS 0 messages not queued for a session marked slow (`slow_consumer_drop_qos0`).
    pub dropped_slow_qos0: AtomicU64,
    /// Times a subscriber queue was marked slow (no progress for `slow_consumer_after_ms`
    /// while holding a publisher back).
    pub slow_consumers_marked: AtomicU64,
    /// Back-pressure episodes that ran to the bound (`slow_consumer_after_ms`) instead of
    /// ending with the subscriber queues drained.
    pub backpressure_timeouts: AtomicU64,
    /// Messages not sent because they exceed the client's Maximum Packet Size [MQTT-3.1.2-24].
    pub dropped_too_large: AtomicU64,
    /// Retained messages not stored because `retain.max_messages` topics already hold one.
    pub dropped_retained_full: AtomicU64,
    /// Messages whose Message Expiry Interval passed before delivery.
    pub dropped_expired: AtomicU64,
    /// CONNECTs refused because `session.max_sessions` sessions exist.
    pub sessions_refused: AtomicU64,
    /// Sessions ended by expiry (lifetime or Session Expiry Interval).
    pub sessions_expired: AtomicU64,
    /// Will messages published.
    pub wills_published: AtomicU64,
    /// Connections closed for a protocol violation or malformed input.
    pub protocol_errors: AtomicU64,
    /// TLS handshakes that failed or did not finish within the CONNECT timeout (not TLS,
    /// TLS 1.1 or older, a missing or untrusted client certificate, garbage).
    pub tls_handshake_failures: AtomicU64,
    /// WebSocket upgrades that failed or did not finish within the CONNECT timeout (not an
    /// upgrade, another path, no `mqtt` subprotocol).
    pub ws_handshake_failures: AtomicU64,
    /// CONNECTs refused for a bad username or password.
    pub auth_bad_credentials: AtomicU64,
    /// CONNECTs refused as not authorized (anonymous where not allowed, a will the ACL
    /// does not allow).
    pub auth_not_authorized: AtomicU64,
    /// PUBLISHes the ACL refused (3.1.1: acknowledged and dropped; v5: 0x87).
    pub acl_denied_publish: AtomicU64,
    /// SUBSCRIBE topic filters the ACL refused (0x80 / 0x87 in SUBACK).
    pub acl_denied_subscribe: AtomicU64,
    /// Messages not delivered because the ACL no longer lets the subscriber read the topic.
    pub acl_denied_delivery: AtomicU64,
}

impl Stats {
    /// Add one to a counter.
    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
