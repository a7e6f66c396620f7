//! Read-only views of sessions for the admin API and metrics. A view is plain data built from a
//! `Session` by whoever owns it at that moment: the connection task for an online session
//! (asked through `registry::Control::Snapshot`), the registry slot for an offline one.

use serde::{Deserialize, Serialize};

use crate::session::{Session, EXPIRY_NEVER};
use crate::wire::packet::ProtocolVersion;

/// One session as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionInfo {
    /// Client Identifier.
    pub client_id: String,
    /// A connection is attached now.
    pub online: bool,
    /// Protocol of the connection that last attached: "3.1", "3.1.1" or "5.0".
    pub protocol: String,
    /// Seconds the session outlives its connection; `None` = never expires.
    pub expiry_interval_secs: Option<u32>,
    /// For an offline session that will expire: seconds left. `None` while online or when it
    /// never expires.
    pub expires_in_secs: Option<u64>,
    /// Subscriptions, sorted by filter.
    pub subscriptions: Vec<SubscriptionInfo>,
    /// Messages queued, not yet in flight.
    pub queued_messages: usize,
    /// Payload bytes queued.
    pub queued_bytes: usize,
    /// Outbound QoS 1/2 messages sent and not yet acknowledged.
    pub inflight: usize,
    /// A will is waiting: the connection's will while online, a delayed will while offline.
    pub will: bool,
    /// Marked slow now: it took nothing while holding a publisher back for the whole
    /// `session.slow_consumer_after_ms`, so it holds nobody back and only its limits apply.
    #[serde(default)]
    pub slow: bool,
    /// Messages this session's queue has dropped (queue limits, or QoS 0 while slow).
    #[serde(default)]
    pub dropped_messages: u64,
}

/// One subscription in a [`SessionInfo`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubscriptionInfo {
    /// Topic filter as subscribed (with `$share/group/` for shared subscriptions).
    pub filter: String,
    /// Granted QoS.
    pub qos: u8,
    /// v5 No Local.
    pub no_local: bool,
    /// v5 Retain As Published.
    pub retain_as_published: bool,
    /// v5 Subscription Identifier.
    pub identifier: Option<u32>,
}

/// "3.1", "3.1.1" or "5.0".
pub fn protocol_name(p: ProtocolVersion) -> &'static str {
    match p {
        ProtocolVersion::V31 => "3.1",
        ProtocolVersion::V311 => "3.1.1",
        ProtocolVersion::V5 => "5.0",
    }
}

impl SessionInfo {
    /// The view of `session`; the caller fills in what only the owner knows (`expires_in_secs`
    /// of a parked session).
    pub fn of(session: &Session, online: bool, will: bool) -> SessionInfo {
        let mut subscriptions: Vec<SubscriptionInfo> = session
            .subscriptions
            .iter()
            .map(|(filter, s)| SubscriptionInfo {
                filter: filter.clone(),
                qos: s.qos as u8,
                no_local: s.no_local,
                retain_as_published: s.retain_as_published,
                identifier: s.identifier,
            })
            .collect();
        subscriptions.sort_by(|a, b| a.filter.cmp(&b.filter));
        SessionInfo {
            client_id: session.client_id.to_string(),
            online,
            protocol: protocol_name(session.protocol).to_string(),
            expiry_interval_secs: (session.expiry_interval != EXPIRY_NEVER)
                .then_some(session.expiry_interval),
            expires_in_secs: None,
            subscriptions,
            queued_messages: session.mailbox.len(),
            queued_bytes: session.mailbox.bytes(),
            inflight: session.inflight_len(),
            will,
            slow: session.mailbox.is_slow(),
            dropped_messages: session.mailbox.dropped(),
        }
    }
}
