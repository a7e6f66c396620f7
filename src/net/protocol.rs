//! The protocol state machine of one connection after CONNECT: what each inbound packet does
//! to the session and the broker, and what goes back. Synchronous: routing pushes into
//! mailboxes, and replies are encoded into the connection's write buffer, which the connection
//! task flushes once per wake-up.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::debug;

use crate::auth::acl::ClientAcl;
use crate::auth::gate::epoch_tag;
use crate::broker::Broker;
use crate::session::mailbox::{Mailbox, MailboxAcl, Pushed};
use crate::session::{outbound_publish, InboundQos2, PendingWill, Session, Subscription};
use crate::stats::Stats;
use crate::transport::OutBuf;
use crate::wire::codec::{self, DecodeError, EncodeError};
use crate::wire::message::{Delivery, Message};
use crate::wire::packet::{
    Ack, Connect, Packet, ProtocolVersion, Publish, QoS, ReasonCode, RetainHandling, SubAck,
    Subscribe, UnsubAck, Unsubscribe,
};
use crate::wire::topic;

/// Most topic aliases one connection uses towards its client, whatever Topic Alias Maximum the
/// client announced: each one keeps a topic name in memory for the connection's lifetime.
pub const MAX_OUTBOUND_ALIASES: u16 = 64;

/// Why a connection's main loop ended.
#[derive(Debug)]
pub enum Exit {
    /// The client sent DISCONNECT.
    ClientDisconnect {
        /// v5 reason 0x04: publish the will anyway.
        with_will: bool,
        /// v5: a new Session Expiry Interval set by DISCONNECT.
        session_expiry: Option<u32>,
    },
    /// The client broke the protocol; v5 clients are told why.
    Violation(ReasonCode, &'static str),
    /// A frame could not be decoded.
    Decode(DecodeError),
    /// Nothing received for 1.5 x keep-alive [MQTT-3.1.2-24].
    KeepAliveTimeout,
    /// The client closed the socket.
    PeerClosed,
    /// A socket error.
    Io(std::io::Error),
    /// Another connection claimed the Client ID; the session goes to it.
    TakenOver(oneshot::Sender<Box<Session>>),
    /// The broker is shutting down.
    Shutdown,
    /// An administrator disconnected the client (admin API).
    Kicked,
    /// The store cannot write: a QoS 1/2 message cannot be acknowledged (3.1.1 has no way
    /// to refuse one but closing), or acknowledgements already held will never be durable.
    StoreFailed,
}

impl Exit {
    /// The reason code of the DISCONNECT the server sends a v5 client, if it sends one.
    pub fn server_reason(&self) -> Option<ReasonCode> {
        match self {
            Exit::Violation(code, _) => Some(*code),
            Exit::Decode(e) => Some(e.reason_code()),
            Exit::KeepAliveTimeout => Some(ReasonCode::KEEP_ALIVE_TIMEOUT),
            Exit::TakenOver(_) => Some(ReasonCode::SESSION_TAKEN_OVER),
            Exit::Shutdown => Some(ReasonCode::SERVER_SHUTTING_DOWN),
            Exit::Kicked => Some(ReasonCode::ADMINISTRATIVE_ACTION),
            Exit::StoreFailed => Some(ReasonCode::UNSPECIFIED_ERROR),
            Exit::ClientDisconnect { .. } | Exit::PeerClosed | Exit::Io(_) => None,
        }
    }

    /// Everything but a normal DISCONNECT publishes the will [MQTT-3.1.2-8, 3.1.2-10].
    pub fn publishes_will(&self) -> bool {
        match self {
            Exit::ClientDisconnect { with_will, .. } => *with_will,
            _ => true,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::ClientDisconnect { with_will, .. } => {
                write!(f, "client disconnected")?;
                if *with_will {
                    write!(f, " (with will)")?;
                }
                Ok(())
            }
            Exit::Violation(code, why) => write!(f, "protocol violation (0x{:02x}): {why}", code.0),
            Exit::Decode(e) => write!(f, "undecodable packet: {e}"),
            Exit::KeepAliveTimeout => write!(f, "keep-alive timeout"),
            Exit::PeerClosed => write!(f, "closed by peer"),
            Exit::Io(e) => write!(f, "socket error: {e}"),
            Exit::TakenOver(_) => write!(f, "session taken over by a new connection"),
            Exit::Shutdown => write!(f, "server shutting down"),
            Exit::Kicked => write!(f, "disconnected by an administrator"),
            Exit::StoreFailed => write!(f, "the store cannot write"),
        }
    }
}

/// Per-connection protocol state that is not session state: it ends with the connection.
#[derive(Debug)]
pub struct Conn {
    /// Shared broker state.
    pub broker: Arc<Broker>,
    /// Protocol the client speaks; picks the encoder.
    pub protocol: ProtocolVersion,
    /// The session's Client ID.
    pub client_id: Arc<str>,
    /// Registry generation of this connection.
    pub generation: u64,
    /// The will, published unless the client disconnects normally; boxed (a will is about
    /// 200 bytes, most clients have none).
    pub will: PendingWill,
    /// 1.5 x the client's keep-alive; `None` when disabled.
    pub keep_alive: Option<Duration>,
    /// Outbound QoS 1/2 messages allowed in flight: our limit, lowered by the client's
    /// Receive Maximum [MQTT-3.3.4-9].
    pub window: usize,
    /// The client's Maximum Packet Size, if it announced one.
    pub peer_max_packet: Option<usize>,
    /// Encoded packets waiting to be written; flushed once per wake-up.
    pub out: OutBuf,
    /// Session Expiry Interval set at CONNECT: a DISCONNECT may not raise it from 0.
    pub connect_expiry: u32,
    /// The client asked for reason strings (v5 Request Problem Information, default 1).
    pub problem_info: bool,
    /// Back-pressure: subscriber queues the last PUBLISH left congested. While any is, the
    /// connection reads nothing more from its client (see `connection::main_loop`).
    pub blocked: Vec<Arc<Mailbox>>,
    /// When the current back-pressure episode ends at the latest: fixed when it starts, so
    /// other wake-ups (own deliveries, writes, group commits) cannot extend it.
    pub blocked_until: Option<Instant>,
    /// Inbound topic aliases (v5): alias -> topic; at most `listener.topic_alias_maximum`.
    /// Boxed and made on the first alias: most clients use none, and an empty map is 48
    /// bytes in every connection (clippy's `box_collection` does not weigh that).
    #[allow(clippy::box_collection)]
    aliases_in: Option<Box<HashMap<u16, String>>>,
    /// Outbound topic aliases (v5), per connection [MQTT-3.3.2-7]; `None` when the client
    /// accepts none or configuration turns them off (boxed for the same reason).
    aliases_out: Option<Box<OutboundAliases>>,
    /// The authenticated username (CONNECT's, or the certificate CN), for the ACL's `%u`.
    pub username: Option<Arc<str>>,
    /// This client's ACL rules; `None` when no ACL file is configured. Shared, read-only.
    pub acl: Option<Arc<ClientAcl>>,
    /// The `Gate` ACL generation `acl` was computed from.
    pub acl_generation: u64,
}

impl Conn {
    /// Connection state for an accepted CONNECT.
    pub fn new(broker: Arc<Broker>, c: &Connect, client_id: Arc<str>, generation: u64) -> Conn {
        let window = usize::from(
            c.properties
                .receive_maximum
                .unwrap_or(u16::MAX)
                .min(broker.config.session.max_inflight),
        );
        Conn {
            protocol: c.protocol,
            client_id,
            generation,
            will: c.will.clone().into(),
            keep_alive: (c.keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(c.keep_alive) * 1500)),
            window,
            peer_max_packet: c
                .properties
                .maximum_packet_size
                .and_then(|m| usize::try_from(m).ok()),
            // Grows to what the connection needs; idle connections keep it small.
            out: OutBuf::new(),
            connect_expiry: 0,
            problem_info: c.properties.request_problem_information != Some(0),
            blocked: Vec::new(),
            blocked_until: None,
            aliases_in: None,
            aliases_out: Some(OutboundAliases::new(
                if broker.config.listener.outbound_topic_aliases {
                    c.properties.topic_alias_maximum.unwrap_or(0)
                } else {
                    0
                },
            ))
            .filter(|a| a.max > 0)
            .map(Box::new),
            username: None,
            acl: None,
            acl_generation: 0,
            broker,
        }
    }

    /// Take this client's rules from the ACL as loaded now, if it changed since (SIGHUP):
    /// new rules apply to the next PUBLISH, SUBSCRIBE and delivery.
    pub fn refresh_acl(&mut self, mailbox: &Mailbox) {
        let generation = self.broker.auth.acl_generation();
        if generation != self.acl_generation {
            self.acl = self
                .broker
                .auth
                .client_acl(self.username.as_deref(), &self.client_id);
            self.acl_generation = generation;
            mailbox.set_acl(self.acl.clone().map(|rules| MailboxAcl {
                generation,
                current: self.broker.auth.acl_generation_counter(),
                rules,
            }));
        }
    }

    /// Encode a packet into the write buffer. A packet the client's Maximum Packet Size does
    /// not admit is dropped and counted; an unencodable one is dropped and logged.
    pub fn send(&mut self, p: &Packet) -> bool {
        match codec::encode(p, self.protocol, self.peer_max_packet, self.out.buf_mut()) {
            Ok(_) => true,
            Err(EncodeError::TooLarge { size, max }) => {
                debug!(
                    size,
                    max,
                    packet = p.name(),
                    "not sent: larger than the client's maximum"
                );
                if matches!(p, Packet::Publish(_)) {
                    Stats::incr(&self.broker.stats.dropped_too_large);
                }
                false
            }
            Err(e) => {
                // Only a field past a length limit of the encoding gets here: for a PUBLISH
                // that is a message too large for this client, and counted as such.
                debug!(packet = p.name(), "not sent: cannot encode: {e:?}");
                if matches!(p, Packet::Publish(_)) {
                    Stats::incr(&self.broker.stats.dropped_too_large);
                }
                false
            }
        }
    }

    /// Move queued messages into the write buffer while the inflight window and the write
    /// buffer have room, oldest first (QoS 0 messages need no window slot but keep their
    /// place in the order).
    pub fn pump(&mut self, s: &mut Session, now: Instant) {
        self.refresh_acl(&s.mailbox);
        let max_write = self.broker.config.listener.max_write_buffer;
        // Re-sends after a resume come first, within the window.
        while self.out.len() < max_write {
            let Some(p) = s.next_resend(self.window, self.protocol, now) else {
                break;
            };
            if let Packet::Publish(publish) = &p {
                // A resumed session's messages are re-checked: the rules may have changed
                // (SIGHUP) since they were first sent.
                if self
                    .acl
                    .as_ref()
                    .is_some_and(|a| !a.can_receive(&publish.topic))
                {
                    Stats::incr(&self.broker.stats.acl_denied_delivery);
                    s.forget(publish.packet_id);
                    continue;
                }
                if !self.send(&p) {
                    // It can never reach this client (say, it now announces a smaller
                    // Maximum Packet Size): end its flow instead of blocking the window.
                    s.forget(publish.packet_id);
                }
            } else {
                self.send(&p);
            }
        }
        if s.resend_pending() > 0 {
            return;
        }
        while self.out.len() < max_write {
            let window_full = s.inflight_len() >= self.window;
            let Some(d) = s
                .mailbox
                .pop_if(|d| d.qos == QoS::AtMostOnce || !window_full)
            else {
                break;
            };
            if d.msg.expired(now) {
                Stats::incr(&self.broker.stats.dropped_expired);
                discarded(s, &d);
                continue;
            }
            // A wildcard subscription may match topics the client may not read, and a reload
            // may have taken away what it subscribed to. The mailbox already checked what was
            // queued under the rules still current.
            if d.acl_epoch != epoch_tag(self.acl_generation)
                && self
                    .acl
                    .as_ref()
                    .is_some_and(|a| !a.can_receive(&d.msg.topic))
            {
                Stats::incr(&self.broker.stats.acl_denied_delivery);
                discarded(s, &d);
                continue;
            }
            // Counted before the inflight window takes its copy of a QoS 1/2 delivery.
            let solo = Arc::strong_count(&d.msg) == 1;
            let (packet_id, d) = s.begin_delivery(d);
            let qos = d.qos;
            let sent = match self.send_shared(&d, packet_id, solo) {
                Some(sent) => sent,
                None => {
                    let mut publish = outbound_publish(&d, packet_id, false, self.protocol, now);
                    let new_alias = self
                        .aliases_out
                        .as_mut()
                        .and_then(|a| a.apply(&mut publish));
                    let sent = self.send(&Packet::Publish(publish));
                    // Only a mapping the client has actually received may be relied on later.
                    if let (true, Some(new), Some(a)) = (sent, new_alias, self.aliases_out.as_mut())
                    {
                        a.record(new);
                    }
                    sent
                }
            };
            if sent {
                Stats::incr(&self.broker.stats.publish_sent[qos as usize]);
            } else if packet_id != 0 {
                // Never sent, so it must not wait for an acknowledgement.
                s.forget(packet_id);
            }
        }
    }

    /// Write `d` (first sent, with `packet_id`) from the message's shared PUBLISH header and
    /// its payload buffer, so that a message going to many clients is encoded once and its
    /// payload copied by nobody (`OutBuf::put_payload`). `None` when this delivery's bytes
    /// differ from the shared ones beyond the flags and packet id (see
    /// `Delivery::shared_header`; a connection using topic aliases changes the topic too): the
    /// caller encodes it by itself. Otherwise whether it was written, as for `send`. `solo`:
    /// no other delivery held the message when this one was taken from the queue.
    fn send_shared(&mut self, d: &Delivery, packet_id: u16, solo: bool) -> Option<bool> {
        if self.aliases_out.is_some() || !d.shares_header(self.protocol) {
            return None;
        }
        // One allocation for what follows, not a doubling from nothing when the buffer was
        // given back (an idle connection holds none): the header's fields, and the payload
        // when it is copied.
        let m = &d.msg;
        self.out
            .buf_mut()
            .reserve(m.size() - m.payload.len() + OutBuf::copied_len(m.payload.len()) + 16);
        let written = if solo {
            // No other delivery holds the message (fan-in, one subscriber): a kept header
            // would serve nobody, so this one is written straight into the output.
            let m = &d.msg;
            codec::write_publish_header(
                &m.topic,
                &m.properties,
                m.payload.len(),
                (false, d.qos, d.retain),
                packet_id,
                self.protocol,
                self.peer_max_packet,
                self.out.buf_mut(),
            )
            .map(|_| ())
        } else {
            let header = d.shared_header(self.protocol)?;
            let (size, max) = (header.packet_size(), self.peer_max_packet);
            match max.filter(|max| size > *max) {
                Some(max) => Err(EncodeError::TooLarge { size, max }),
                None => header.write(self.out.buf_mut(), false, d.qos, d.retain, packet_id),
            }
        };
        match written {
            Ok(()) => {
                self.out.put_payload(&d.msg.payload);
                Some(true)
            }
            Err(EncodeError::TooLarge { size, max }) => {
                debug!(
                    size,
                    max,
                    packet = "PUBLISH",
                    "not sent: larger than the client's maximum"
                );
                Stats::incr(&self.broker.stats.dropped_too_large);
                Some(false)
            }
            Err(e) => {
                debug!(packet = "PUBLISH", "not sent: cannot encode: {e:?}");
                Stats::incr(&self.broker.stats.dropped_too_large);
                Some(false)
            }
        }
    }

    /// Resolve an inbound topic alias into the topic name (v5 section 3.3.2.3.4).
    fn resolve_alias(&mut self, p: &mut Publish) -> Result<(), Exit> {
        let Some(alias) = p.properties.topic_alias.take() else {
            if p.topic.is_empty() {
                // Section 3.3.2.1 names this a Protocol Error, not 0x90 Topic Name invalid:
                // the name is missing rather than refused.
                return Err(Exit::Violation(
                    ReasonCode::PROTOCOL_ERROR,
                    "zero-length Topic Name without a Topic Alias (section 3.3.2.1)",
                ));
            }
            return Ok(());
        };
        if alias == 0 || alias > self.broker.config.listener.topic_alias_maximum {
            return Err(Exit::Violation(
                ReasonCode::TOPIC_ALIAS_INVALID,
                "topic alias is 0 or above the Topic Alias Maximum",
            ));
        }
        if p.topic.is_empty() {
            match self.aliases_in.as_ref().and_then(|m| m.get(&alias)) {
                Some(topic) => p.topic = topic.clone(),
                None => {
                    return Err(Exit::Violation(
                        ReasonCode::PROTOCOL_ERROR,
                        "topic alias not yet mapped",
                    ))
                }
            }
        } else {
            self.aliases_in
                .get_or_insert_with(Default::default)
                .insert(alias, p.topic.clone());
        }
        Ok(())
    }

    /// Handle one packet from the client.
    pub fn on_packet(&mut self, s: &mut Session, p: Packet, now: Instant) -> Result<(), Exit> {
        match p {
            Packet::Publish(p) => self.on_publish(s, p, now),
            Packet::PubAck(a) => {
                if !s.on_puback(a.packet_id) {
                    debug!(packet_id = a.packet_id, "PUBACK for no message in flight");
                }
                Ok(())
            }
            Packet::PubRec(a) => {
                if let Some(rel) = s.on_pubrec(a.packet_id, a.reason) {
                    self.send(&Packet::PubRel(rel));
                }
                Ok(())
            }
            Packet::PubRel(a) => {
                let mut comp = Ack::new(a.packet_id);
                if !s.release_inbound_qos2(a.packet_id) {
                    comp.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                }
                self.send(&Packet::PubComp(comp));
                Ok(())
            }
            Packet::PubComp(a) => {
                if !s.on_pubcomp(a.packet_id) {
                    debug!(packet_id = a.packet_id, "PUBCOMP for no message in flight");
                }
                Ok(())
            }
            Packet::Subscribe(sub) => self.on_subscribe(s, sub, now),
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(s, u);
                Ok(())
            }
            Packet::PingReq => {
                self.send(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => {
                if self.connect_expiry == 0 && d.session_expiry_interval.is_some_and(|e| e > 0) {
                    // Not a valid DISCONNECT: the session ends as set at CONNECT, and the
                    // will is published (section 3.14.2.2.2).
                    return Err(Exit::Violation(
                        ReasonCode::PROTOCOL_ERROR,
                        "DISCONNECT raised a zero Session Expiry Interval",
                    ));
                }
                Err(Exit::ClientDisconnect {
                    with_will: d.reason == ReasonCode::DISCONNECT_WITH_WILL,
                    session_expiry: d.session_expiry_interval,
                })
            }
            Packet::Auth(_) => Err(Exit::Violation(
                ReasonCode::PROTOCOL_ERROR,
                "AUTH without enhanced authentication",
            )),
            Packet::Connect(_) => Err(Exit::Violation(
                ReasonCode::PROTOCOL_ERROR,
                "second CONNECT [MQTT-3.1.0-2]",
            )),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Err(Exit::Violation(
                    ReasonCode::PROTOCOL_ERROR,
                    "server-to-client packet from client",
                ))
            }
        }
    }

    fn on_publish(&mut self, s: &mut Session, mut p: Publish, now: Instant) -> Result<(), Exit> {
        Stats::incr(&self.broker.stats.publish_received[p.qos as usize]);
        self.resolve_alias(&mut p)?;
        if !topic::valid_topic_name(&p.topic) {
            return Err(Exit::Violation(
                ReasonCode::TOPIC_NAME_INVALID,
                "invalid topic name in PUBLISH [MQTT-3.3.2-2]",
            ));
        }
        if !p.properties.subscription_identifiers.is_empty() {
            return Err(Exit::Violation(
                ReasonCode::PROTOCOL_ERROR,
                "subscription identifier in PUBLISH from a client [MQTT-3.3.4-6]",
            ));
        }
        let packet_id = p.packet_id;
        if p.qos == QoS::ExactlyOnce {
            let max = usize::from(self.broker.config.session.max_inbound_inflight);
            match s.begin_inbound_qos2(packet_id, max) {
                InboundQos2::New => {}
                InboundQos2::Duplicate => {
                    // Already routed once: acknowledge again, deliver nothing. Whether it
                    // matched anyone was not kept; 0x00 is as true a success as 0x10.
                    self.send(&Packet::PubRec(Ack::new(packet_id)));
                    return Ok(());
                }
                InboundQos2::Full => {
                    return Err(Exit::Violation(
                        ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                        "too many QoS 2 messages awaiting PUBREL",
                    ))
                }
            }
        }
        // After the QoS 2 duplicate check: a retransmission of a message already routed is
        // acknowledged as before, whatever a reload did to the rules meanwhile.
        self.refresh_acl(&s.mailbox);
        if self.acl.as_ref().is_some_and(|a| !a.can_publish(&p.topic)) {
            Stats::incr(&self.broker.stats.acl_denied_publish);
            debug!(topic = %p.topic, "PUBLISH not allowed by the ACL; dropped");
            // 3.1.1 has no negative acknowledgement: the message is acknowledged and dropped,
            // as Mosquitto does. v5 says 0x87, which also ends a QoS 2 flow [MQTT-4.3.3-4].
            let ack = Ack {
                reason: if self.protocol.is_v5() {
                    ReasonCode::NOT_AUTHORIZED
                } else {
                    ReasonCode::SUCCESS
                },
                ..Ack::new(packet_id)
            };
            match p.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => {
                    self.send(&Packet::PubAck(ack));
                }
                QoS::ExactlyOnce => {
                    // v5's 0x87 ends the flow, so no PUBREL will release the id; a 3.1.1
                    // client goes on with PUBREL, which releases it.
                    if self.protocol.is_v5() {
                        s.release_inbound_qos2(packet_id);
                    }
                    self.send(&Packet::PubRec(ack));
                }
            }
            return Ok(());
        }
        let properties = p.properties;
        let expires_at = properties
            .message_expiry_interval
            .map(|secs| now + Duration::from_secs(u64::from(secs)));
        let qos = p.qos;
        let matched = self.broker.publish_into(
            Message {
                topic: p.topic,
                payload: p.payload,
                qos,
                retain: p.retain,
                properties,
                expires_at,
                publisher: Some(self.client_id.clone()),
                stored: Default::default(),
                encoded: Default::default(),
            },
            Some(&mut self.blocked),
        );
        // Never wait for our own queue: it drains only once we read the client's acks.
        self.blocked.retain(|m| !Arc::ptr_eq(m, &s.mailbox));
        // v5 lets the server say nobody got it (0x10, still a success: a retained message is
        // stored all the same and a QoS 2 flow goes on to PUBREL); Mosquitto says so too.
        let ack = Ack {
            reason: if matched == 0 && self.protocol.is_v5() {
                ReasonCode::NO_MATCHING_SUBSCRIBERS
            } else {
                ReasonCode::SUCCESS
            },
            ..Ack::new(packet_id)
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.send(&Packet::PubAck(ack));
            }
            QoS::ExactlyOnce => {
                self.send(&Packet::PubRec(ack));
            }
        }
        Ok(())
    }

    fn on_subscribe(&mut self, s: &mut Session, sub: Subscribe, now: Instant) -> Result<(), Exit> {
        self.refresh_acl(&s.mailbox);
        let mut reasons = Vec::with_capacity(sub.filters.len());
        let mut retained = Vec::new();
        for f in &sub.filters {
            let (inner, shared) = match topic::parse_shared(&f.filter) {
                Ok(None) => (f.filter.as_str(), false),
                Ok(Some((_, inner))) => (inner, true),
                Err(_) => {
                    reasons.push(self.filter_invalid());
                    continue;
                }
            };
            if !topic::valid_topic_filter(inner) {
                reasons.push(self.filter_invalid());
                continue;
            }
            if shared && f.no_local {
                return Err(Exit::Violation(
                    ReasonCode::PROTOCOL_ERROR,
                    "No Local on a shared subscription [MQTT-3.8.3-4]",
                ));
            }
            if self.acl.as_ref().is_some_and(|a| !a.can_subscribe(inner)) {
                Stats::incr(&self.broker.stats.acl_denied_subscribe);
                debug!(filter = %f.filter, "SUBSCRIBE not allowed by the ACL");
                reasons.push(if self.protocol.is_v5() {
                    ReasonCode::NOT_AUTHORIZED
                } else {
                    ReasonCode::UNSPECIFIED_ERROR
                });
                continue;
            }
            // The session keeps the filter as subscribed, `$share/` prefix included: that is
            // what UNSUBSCRIBE names and what the router parses.
            let filter = f.filter.as_str();
            if !s.subscriptions.contains_key(filter)
                && s.subscriptions.len() >= self.broker.config.session.max_subscriptions
            {
                reasons.push(ReasonCode::QUOTA_EXCEEDED);
                continue;
            }
            let subscription = Subscription::from_request(f, sub.subscription_identifier);
            let existed = self.broker.subscribe(s, filter.to_string(), subscription);
            reasons.push(ReasonCode(subscription.qos as u8));
            // No retained messages for shared subscriptions (section 4.8.2).
            let send_retained = !shared
                && match subscription.retain_handling {
                    RetainHandling::OnSubscribe => true,
                    RetainHandling::OnNewSubscribe => !existed,
                    RetainHandling::Never => false,
                };
            if send_retained {
                retained.push((filter.to_string(), subscription));
            }
        }
        self.send(&Packet::SubAck(SubAck {
            packet_id: sub.packet_id,
            reasons,
            reason_string: None,
        }));
        // Retained messages follow the SUBACK through the session's own queue, so they obey
        // its inflight window and limits like any other delivery [MQTT-3.3.1-6, 3.3.1-8].
        for (filter, subscription) in retained {
            for msg in self.broker.retained.matching(&filter, now) {
                let qos = msg.qos.min(subscription.qos);
                let pushed = s.mailbox.push(
                    Delivery {
                        msg,
                        qos,
                        retain: true,
                        subscription_ids: subscription.identifier.into_iter().collect(),
                        seq: 0,
                        acl_epoch: 0,
                    },
                    &self.broker.stats,
                );
                if pushed == Pushed::Denied {
                    Stats::incr(&self.broker.stats.acl_denied_delivery);
                }
            }
        }
        Ok(())
    }

    /// SUBACK code for a filter that is not valid: 0x8F in v5, 0x80 in 3.1.1.
    fn filter_invalid(&self) -> ReasonCode {
        if self.protocol.is_v5() {
            ReasonCode::TOPIC_FILTER_INVALID
        } else {
            ReasonCode::UNSPECIFIED_ERROR
        }
    }

    fn on_unsubscribe(&mut self, s: &mut Session, u: Unsubscribe) {
        let reasons = u
            .filters
            .iter()
            .map(|filter| {
                if self.broker.unsubscribe(s, filter) {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::NO_SUBSCRIPTION_EXISTED
                }
            })
            .collect();
        self.send(&Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            reasons,
        }));
    }
}

/// The topic aliases a connection uses towards a v5 client that asked for them (Topic Alias
/// Maximum in CONNECT, section 3.3.2.3.4). Policy: the first PUBLISH of a topic carries the
/// topic and a new alias, later ones an empty topic and the alias. Once every alias is taken
/// (the client's maximum, at most `MAX_OUTBOUND_ALIASES`), a new topic takes over the least
/// recently used alias, sending its topic with it, which the client must accept as a new
/// mapping. Resends after a reconnect carry their topic and no alias: a new connection starts
/// with no mappings [MQTT-3.3.2-7].
#[derive(Debug, Default)]
struct OutboundAliases {
    /// Aliases usable: 0 when the client accepts none or configuration turns them off.
    max: u16,
    /// Topic -> alias, for the mappings the client has received.
    by_topic: HashMap<String, u16>,
    /// When alias `n` was last used, at index `n - 1` (one entry per alias handed out).
    last_used: Vec<u64>,
    /// Counts PUBLISHes that use an alias: the recency clock.
    clock: u64,
}

/// A mapping a PUBLISH announces, to record once that PUBLISH is out (see `OutboundAliases`).
#[derive(Debug)]
struct NewAlias {
    alias: u16,
    topic: String,
}

impl OutboundAliases {
    fn new(client_max: u16) -> OutboundAliases {
        OutboundAliases {
            max: client_max.min(MAX_OUTBOUND_ALIASES),
            ..OutboundAliases::default()
        }
    }

    /// Replace the topic by the alias the client knows for it, or give the PUBLISH a new (or
    /// the least recently used) alias next to its topic; that new mapping is returned and holds
    /// only once `record`ed, so a PUBLISH that is never sent changes nothing the client knows.
    fn apply(&mut self, p: &mut Publish) -> Option<NewAlias> {
        if self.max == 0 {
            return None;
        }
        self.clock += 1;
        if let Some(&alias) = self.by_topic.get(&p.topic) {
            if let Some(t) = self.last_used.get_mut(usize::from(alias) - 1) {
                *t = self.clock;
            }
            p.properties.topic_alias = Some(alias);
            p.topic.clear();
            return None;
        }
        let index = if self.last_used.len() < usize::from(self.max) {
            self.last_used.len()
        } else {
            let (lru, _) = self.last_used.iter().enumerate().min_by_key(|(_, t)| **t)?;
            lru
        };
        let alias = u16::try_from(index + 1).ok()?;
        p.properties.topic_alias = Some(alias);
        Some(NewAlias {
            alias,
            topic: p.topic.clone(),
        })
    }

    /// The PUBLISH carrying `new` was sent: the client now maps its alias to its topic.
    fn record(&mut self, new: NewAlias) {
        let index = usize::from(new.alias) - 1;
        match self.last_used.get_mut(index) {
            Some(t) => {
                *t = self.clock;
                // At most MAX_OUTBOUND_ALIASES entries: a scan is cheaper than a reverse map.
                self.by_topic.retain(|_, a| *a != new.alias);
            }
            None => self.last_used.push(self.clock),
        }
        self.by_topic.insert(new.topic, new.alias);
    }
}

/// A queued delivery dropped without being sent (expired, or refused by the ACL): its stored
/// copy is done too, so a restart does not queue it again.
fn discarded(s: &Session, d: &Delivery) {
    s.journal.done(d.seq);
}

#[cfg(test)]
mod tests {
    use std::io::IoSlice;

    use bytes::{Bytes, BytesMut};

    use super::*;
    use crate::config::Config;
    use crate::wire::packet::{ConnectProperties, PublishProperties};

    const VERSIONS: [ProtocolVersion; 3] = [
        ProtocolVersion::V31,
        ProtocolVersion::V311,
        ProtocolVersion::V5,
    ];
    const QOS: [QoS; 3] = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];

    fn properties() -> PublishProperties {
        PublishProperties {
            payload_format_indicator: Some(1),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"\x00corr")),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            content_type: Some("text/plain".into()),
            ..PublishProperties::default()
        }
    }

    fn message(properties: PublishProperties, payload_len: usize, now: Instant) -> Arc<Message> {
        let expires_at = properties
            .message_expiry_interval
            .map(|s| now + Duration::from_millis(u64::from(s) * 1000 - 300));
        Arc::new(Message {
            topic: "fan/out/topic".into(),
            payload: Bytes::from((0..payload_len).map(|i| i as u8).collect::<Vec<u8>>()),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties,
            expires_at,
            publisher: None,
            stored: Default::default(),
            encoded: Default::default(),
        })
    }

    fn delivery(msg: &Arc<Message>, qos: QoS, retain: bool, ids: Vec<u32>) -> Delivery {
        Delivery {
            msg: msg.clone(),
            qos,
            retain,
            subscription_ids: ids,
            seq: 0,
            acl_epoch: 0,
        }
    }

    fn encoded(p: &Publish, version: ProtocolVersion) -> BytesMut {
        let mut out = BytesMut::new();
        codec::encode(&Packet::Publish(p.clone()), version, None, &mut out).expect("encodes");
        out
    }

    fn flat(out: &OutBuf) -> BytesMut {
        let mut slices = [IoSlice::new(&[]); 64];
        let n = out.io_slices(usize::MAX, &mut slices);
        let mut b = BytesMut::new();
        for s in &slices[..n] {
            b.extend_from_slice(s);
        }
        b
    }

    /// Every PUBLISH in `bytes`, decoded as a client speaking `version` would.
    fn decode_all(mut bytes: BytesMut, version: ProtocolVersion) -> Vec<Publish> {
        let mut all = Vec::new();
        while let Some(p) = codec::decode(&mut bytes, Some(version), usize::MAX).expect("valid") {
            match p {
                Packet::Publish(p) => all.push(p),
                other => panic!("not a PUBLISH: {other:?}"),
            }
        }
        assert!(bytes.is_empty());
        all
    }

    #[test]
    fn shared_header_with_its_flags_and_packet_id_equals_the_own_encoding() {
        let now = Instant::now();
        let mut checked = 0;
        for props in [PublishProperties::default(), properties()] {
            for payload_len in [0, 20, SHARE_FROM_TEST, 70_000] {
                // One message for every variant: its cache is shared by all of them, as it
                // is by every subscriber of a fan-out.
                let msg = message(props.clone(), payload_len, now);
                for version in VERSIONS {
                    for qos in QOS {
                        for (dup, retain, packet_id) in [
                            (false, false, 1),
                            (true, true, 0xABCD),
                            (true, false, 65535),
                        ] {
                            let d = delivery(&msg, qos, retain, vec![]);
                            let id = if qos == QoS::AtMostOnce { 0 } else { packet_id };
                            let header = d.shared_header(version).expect("shareable");
                            let mut out = OutBuf::new();
                            header
                                .write(out.buf_mut(), dup, qos, retain, id)
                                .expect("writes");
                            out.put_payload(&msg.payload);
                            let own = outbound_publish(&d, id, dup, version, now);
                            let shared = flat(&out);
                            assert_eq!(shared, encoded(&own, version), "{version:?} {qos:?}");
                            // Written straight, for a message no other delivery shares.
                            let mut direct = BytesMut::new();
                            let size = codec::write_publish_header(
                                &msg.topic,
                                &msg.properties,
                                msg.payload.len(),
                                (dup, qos, retain),
                                id,
                                version,
                                Some(shared.len()),
                                &mut direct,
                            )
                            .expect("fits");
                            direct.extend_from_slice(&msg.payload);
                            assert_eq!((size, &direct), (shared.len(), &shared));
                            assert_eq!(header.packet_size(), shared.len());
                            let decoded = decode_all(shared, version);
                            assert_eq!(decoded.len(), 1);
                            assert_eq!(decoded[0].dup, dup && qos != QoS::AtMostOnce);
                            assert_eq!(decoded[0].retain, retain);
                            assert_eq!(decoded[0].packet_id, id);
                            assert_eq!(decoded[0].payload, msg.payload);
                            if version.is_v5() {
                                assert_eq!(decoded[0].properties, props);
                            }
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 2 * 4 * 3 * 3 * 3);
    }

    /// Long enough to be sent from the message's own buffer.
    const SHARE_FROM_TEST: usize = crate::transport::out::SHARE_PAYLOAD_FROM;

    #[test]
    fn v5_deliveries_with_their_own_properties_are_encoded_by_themselves() {
        let now = Instant::now();
        let expiring = PublishProperties {
            message_expiry_interval: Some(60),
            ..properties()
        };
        let msg = message(expiring, 10, now);
        let plain = message(properties(), 10, now);
        for qos in QOS {
            // The remaining expiry time and Subscription Identifiers are per delivery in v5.
            assert!(delivery(&msg, qos, false, vec![])
                .shared_header(ProtocolVersion::V5)
                .is_none());
            assert!(delivery(&plain, qos, false, vec![7])
                .shared_header(ProtocolVersion::V5)
                .is_none());
            // 3.1.1 sends neither, so its deliveries share one header all the same.
            for (m, ids) in [(&msg, vec![]), (&plain, vec![7, 9])] {
                let d = delivery(m, qos, true, ids);
                let header = d.shared_header(ProtocolVersion::V311).expect("shareable");
                let id = if qos == QoS::AtMostOnce { 0 } else { 3 };
                let mut out = OutBuf::new();
                header
                    .write(out.buf_mut(), false, qos, true, id)
                    .expect("writes");
                out.put_payload(&m.payload);
                let own = outbound_publish(&d, id, false, ProtocolVersion::V311, now);
                assert_eq!(flat(&out), encoded(&own, ProtocolVersion::V311));
            }
        }
    }

    #[test]
    fn remaining_expiry_never_exceeds_what_the_publisher_gave() {
        let published = Instant::now();
        let msg = Arc::new(Message {
            expires_at: Some(published + Duration::from_secs(60)),
            ..(*message(
                PublishProperties {
                    message_expiry_interval: Some(60),
                    ..PublishProperties::default()
                },
                4,
                published,
            ))
            .clone()
        });
        let d = delivery(&msg, QoS::AtLeastOnce, false, vec![]);
        // A subscriber's clock read on another thread just before the message was published.
        let earlier = published - Duration::from_millis(1);
        let p = outbound_publish(&d, 1, false, ProtocolVersion::V5, earlier);
        assert_eq!(p.properties.message_expiry_interval, Some(60));
        let later = published + Duration::from_millis(10_500);
        let p = outbound_publish(&d, 1, false, ProtocolVersion::V5, later);
        assert_eq!(p.properties.message_expiry_interval, Some(50));
    }

    #[test]
    fn a_header_refuses_a_qos_it_has_no_packet_id_slot_for() {
        let msg = message(PublishProperties::default(), 5, Instant::now());
        let q1 = delivery(&msg, QoS::AtLeastOnce, false, vec![]);
        let header = q1.shared_header(ProtocolVersion::V5).expect("shareable");
        let mut out = BytesMut::new();
        assert!(header
            .write(&mut out, false, QoS::AtMostOnce, false, 0)
            .is_err());
        assert!(header
            .write(&mut out, false, QoS::AtLeastOnce, false, 0)
            .is_err());
        assert!(out.is_empty(), "nothing written on error");
    }

    fn conn(version: ProtocolVersion, props: ConnectProperties) -> (Conn, Session) {
        let broker = Broker::new(Arc::new(Config::default()));
        let connect = Connect {
            protocol: version,
            client_id: "sub".into(),
            clean_start: true,
            keep_alive: 0,
            username: None,
            password: None,
            will: None,
            properties: props,
        };
        let session = *broker.new_session("sub".into(), version, 0);
        session.mailbox.set_online(true);
        (Conn::new(broker, &connect, "sub".into(), 1), session)
    }

    fn queue(s: &Session, d: Delivery, stats: &Stats) {
        assert!(matches!(s.mailbox.push(d, stats), Pushed::Queued));
    }

    /// A message only its delivery holds (fan-in) is written without keeping a header for
    /// nobody, at QoS 1/2 too, where the inflight window takes a copy of the delivery; and
    /// a message whose topic and properties are over `SHARED_HEADER_MAX` keeps none even when
    /// it goes to several clients (a kept header is memory no limit counts).
    #[test]
    fn solo_deliveries_and_large_headers_keep_no_shared_header() {
        let now = Instant::now();
        for version in VERSIONS {
            let (mut c, mut s) = conn(version, ConnectProperties::default());
            let stats = Stats::default();
            for qos in QOS {
                let solo = message(properties(), 40, now);
                let d = delivery(&solo, qos, false, vec![]);
                drop(solo);
                queue(&s, d, &stats);
            }
            c.pump(&mut s, now);
            assert_eq!(decode_all(flat(&c.out), version).len(), 3);
            let kept: Vec<String> = s
                .inflight()
                .map(|i| format!("{:?}", i.delivery.msg.encoded))
                .collect();
            assert_eq!(kept, ["EncodedHeaders(0 encoded)"; 2], "{version:?}");

            let (mut c, mut s) = conn(version, ConnectProperties::default());
            let large = message(
                PublishProperties {
                    user_properties: vec![(
                        "k".into(),
                        "v".repeat(crate::wire::message::SHARED_HEADER_MAX),
                    )],
                    ..properties()
                },
                40,
                now,
            );
            queue(
                &s,
                delivery(&large, QoS::AtLeastOnce, false, vec![]),
                &stats,
            );
            c.pump(&mut s, now);
            let got = decode_all(flat(&c.out), version);
            assert_eq!(got.len(), 1);
            assert_eq!(format!("{:?}", large.encoded), "EncodedHeaders(0 encoded)");
        }
    }

    /// What a client receives through `pump`, compared with the PUBLISH each delivery would be
    /// encoded as by itself (`outbound_publish`), in order; the expiry interval is re-read at
    /// `now` as pump does.
    fn pump_matches_own_encoding(version: ProtocolVersion, props: ConnectProperties) {
        let now = Instant::now();
        let (mut c, mut s) = conn(version, props);
        let expiring = message(
            PublishProperties {
                message_expiry_interval: Some(30),
                ..properties()
            },
            SHARE_FROM_TEST + 1,
            now,
        );
        let plain = message(properties(), 40, now);
        let big = message(PublishProperties::default(), 5000, now);
        let stats = Stats::default();
        let mut want = Vec::new();
        for round in 0..3u32 {
            for (m, ids) in [
                (&plain, vec![]),
                (&expiring, vec![]),
                (&big, vec![round + 1]),
            ] {
                for qos in QOS {
                    let d = delivery(m, qos, round == 1, ids.clone());
                    want.push(outbound_publish(&d, 0, false, version, now));
                    queue(&s, d, &stats);
                }
            }
            // Messages only their delivery holds are written without a kept header.
            for (qos, len) in QOS.into_iter().zip([0, 33, SHARE_FROM_TEST]) {
                let props = if round == 0 {
                    properties()
                } else {
                    Default::default()
                };
                let solo = message(props, len, now);
                let d = delivery(&solo, qos, round == 2, vec![]);
                want.push(outbound_publish(&d, 0, false, version, now));
                drop(solo);
                queue(&s, d, &stats);
            }
        }
        c.pump(&mut s, now);
        let got = decode_all(flat(&c.out), version);
        assert_eq!(got.len(), want.len());
        let mut aliases = HashMap::new();
        for (p, own) in got.iter().zip(&want) {
            let mut p = p.clone();
            if let Some(alias) = p.properties.topic_alias.take() {
                // A client resolves aliases: do the same before comparing.
                if p.topic.is_empty() {
                    p.topic = aliases.get(&alias).cloned().expect("known alias");
                } else {
                    aliases.insert(alias, p.topic.clone());
                }
            }
            let own = Publish {
                packet_id: p.packet_id,
                ..own.clone()
            };
            assert_eq!(p, own);
        }
        // The plain message went through its shared headers (QoS 0 and QoS 1/2) unless the
        // connection uses topic aliases.
        let shared = if c.aliases_out.is_some() { 0 } else { 2 };
        assert_eq!(
            format!("{:?}", plain.encoded),
            format!("EncodedHeaders({shared} encoded)")
        );
    }

    #[test]
    fn pump_sends_what_each_delivery_would_be_encoded_as() {
        for version in VERSIONS {
            pump_matches_own_encoding(version, ConnectProperties::default());
        }
        // With outbound topic aliases, every PUBLISH is this connection's own.
        pump_matches_own_encoding(
            ProtocolVersion::V5,
            ConnectProperties {
                topic_alias_maximum: Some(2),
                ..ConnectProperties::default()
            },
        );
    }

    #[test]
    fn shared_publish_over_the_clients_maximum_is_dropped_and_counted() {
        let now = Instant::now();
        let (mut c, mut s) = conn(
            ProtocolVersion::V5,
            ConnectProperties {
                maximum_packet_size: Some(100),
                ..ConnectProperties::default()
            },
        );
        let stats = Stats::default();
        let small = message(PublishProperties::default(), 20, now);
        let large = message(PublishProperties::default(), 200, now);
        queue(
            &s,
            delivery(&large, QoS::AtLeastOnce, false, vec![]),
            &stats,
        );
        queue(
            &s,
            delivery(&small, QoS::AtLeastOnce, false, vec![]),
            &stats,
        );
        // The same for a message only its delivery holds (written without a kept header).
        let solo = message(PublishProperties::default(), 200, now);
        queue(&s, delivery(&solo, QoS::AtLeastOnce, false, vec![]), &stats);
        drop(solo);
        c.pump(&mut s, now);
        let got = decode_all(flat(&c.out), ProtocolVersion::V5);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].payload, small.payload);
        assert_eq!(Stats::get(&c.broker.stats.dropped_too_large), 2);
        // The dropped ones wait for no acknowledgement.
        assert_eq!(s.inflight_len(), 1);
    }
}
