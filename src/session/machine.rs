//! The server-side session state of MQTT section 4.1, as plain data and a state machine with no
//! I/O and no clock reads: callers pass `now` and send what the methods return. That keeps every
//! QoS flow unit-testable without sockets or timers.
//!
//! Ownership: while a client is connected its connection task owns the `Session` by value (no
//! lock around the inflight window). While it is offline the session is parked by value in its
//! registry slot. Only the queue of not-yet-sent messages (`Mailbox`) is shared, because
//! publishers on other tasks must reach it in both states.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

use crate::session::mailbox::Mailbox;
use crate::store::SessionLog;
use crate::wire::message::Delivery;
use crate::wire::packet::{
    Ack, Packet, ProtocolVersion, Publish, QoS, ReasonCode, RetainHandling, SubscribeFilter, Will,
};

/// Session Expiry Interval value meaning "never expires" [MQTT-3.1.2-23 context].
pub const EXPIRY_NEVER: u32 = u32::MAX;

/// One subscription held by a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// Granted (maximum) QoS.
    pub qos: QoS,
    /// v5 No Local: do not deliver the session's own publications.
    pub no_local: bool,
    /// v5 Retain As Published.
    pub retain_as_published: bool,
    /// v5 Retain Handling.
    pub retain_handling: RetainHandling,
    /// v5 Subscription Identifier.
    pub identifier: Option<u32>,
}

impl Subscription {
    /// The subscription a SUBSCRIBE filter asks for, granted at the QoS requested.
    pub fn from_request(f: &SubscribeFilter, identifier: Option<u32>) -> Subscription {
        Subscription {
            qos: f.qos,
            no_local: f.no_local,
            retain_as_published: f.retain_as_published,
            retain_handling: f.retain_handling,
            identifier,
        }
    }
}

/// Where an outbound QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutState {
    /// QoS 1 PUBLISH sent, waiting for PUBACK.
    AwaitPubAck,
    /// QoS 2 PUBLISH sent, waiting for PUBREC.
    AwaitPubRec,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitPubComp,
}

/// One outbound message in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inflight {
    /// Packet identifier it was first sent with; reused on every resend [MQTT-4.4.0-1].
    pub packet_id: u16,
    /// What is being delivered.
    pub delivery: Delivery,
    /// Progress of its QoS flow.
    pub state: OutState,
    /// Sent on the current connection. False after a resume until it is re-sent, which
    /// happens only while the client's Receive Maximum allows [MQTT-3.3.4-9].
    pub sent: bool,
}

/// Result of an inbound QoS 2 PUBLISH for the session's packet-id set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundQos2 {
    /// First time this id is seen: route the message, then PUBREC.
    New,
    /// The id is already awaiting PUBREL: a resend; PUBREC again without routing, so the
    /// message reaches subscribers exactly once.
    Duplicate,
    /// The client has more unreleased QoS 2 messages than allowed.
    Full,
}

/// The state of one session.
#[derive(Debug)]
pub struct Session {
    /// Client Identifier; `Arc<str>` because the registry, the router and timers key on it.
    pub client_id: Arc<str>,
    /// Protocol of the connection that last attached, for encoding resends.
    pub protocol: ProtocolVersion,
    /// Messages waiting for a free slot in the inflight window; shared with publishers.
    pub mailbox: Arc<Mailbox>,
    /// Topic filter -> options; mirrored in the router's index.
    pub subscriptions: HashMap<String, Subscription>,
    /// Outbound QoS 1/2 messages in flight, in the order they were first sent.
    inflight: VecDeque<Inflight>,
    /// Inbound QoS 2 packet ids PUBREC'd and awaiting PUBREL.
    inbound_qos2: HashSet<u16>,
    /// Next packet identifier to try.
    next_packet_id: u16,
    /// Seconds the session outlives its connection: 0 ends it with the connection,
    /// `EXPIRY_NEVER` keeps it forever.
    pub expiry_interval: u32,
    /// A will waiting for its delay to pass while the session is offline (v5 Will Delay).
    pub pending_will: Option<Will>,
    /// Where its changes are written, when the session is durable (it outlives its
    /// connection and the broker has a store); `None` keeps it in memory only.
    pub log: Option<Arc<SessionLog>>,
}

impl Session {
    /// A new, empty session.
    pub fn new(
        client_id: Arc<str>,
        protocol: ProtocolVersion,
        mailbox: Arc<Mailbox>,
        expiry_interval: u32,
    ) -> Session {
        Session {
            client_id,
            protocol,
            mailbox,
            subscriptions: HashMap::new(),
            inflight: VecDeque::new(),
            inbound_qos2: HashSet::new(),
            next_packet_id: 1,
            expiry_interval,
            pending_will: None,
            log: None,
        }
    }

    /// Make the session durable through `log` (or memory-only with `None`); its mailbox
    /// numbers stored messages from `next_seq` on.
    pub fn set_log(&mut self, log: Option<Arc<SessionLog>>, next_seq: u64) {
        self.mailbox.set_log(log.clone(), next_seq);
        self.log = log;
    }

    /// Forget the store sequence numbers of everything queued or in flight: the log they
    /// referred to has ended, and a later log numbers its entries from 1 again.
    pub fn clear_seqs(&mut self) {
        for i in &mut self.inflight {
            i.delivery.seq = 0;
        }
        self.mailbox.clear_seqs();
    }

    /// Put back an in-flight message recovered from the store (re-sent on resume).
    pub fn restore_inflight(&mut self, i: Inflight) {
        self.inflight.push_back(i);
    }

    /// Put back an inbound QoS 2 id awaiting PUBREL recovered from the store.
    pub fn restore_inbound(&mut self, packet_id: u16) {
        self.inbound_qos2.insert(packet_id);
    }

    /// Record that the stored message `seq` is finished.
    fn log_done(&self, seq: u64) {
        if let (Some(log), true) = (&self.log, seq != 0) {
            log.done(seq);
        }
    }

    /// Outbound messages in flight.
    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// Inbound QoS 2 ids awaiting PUBREL.
    pub fn inbound_qos2_len(&self) -> usize {
        self.inbound_qos2.len()
    }

    /// Iterate over the inflight window (for inspection and persistence).
    pub fn inflight(&self) -> impl Iterator<Item = &Inflight> {
        self.inflight.iter()
    }

    fn allocate_packet_id(&mut self) -> u16 {
        // The window is far smaller than 65,535, so a free id is always found quickly.
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.iter().any(|i| i.packet_id == id) {
                return id;
            }
        }
    }

    /// Start delivering `d`, and build its PUBLISH (see `begin_delivery`).
    pub fn start_delivery(&mut self, d: Delivery, now: Instant) -> Publish {
        let (packet_id, d) = self.begin_delivery(d);
        outbound_publish(&d, packet_id, false, self.protocol, now)
    }

    /// Start delivering `d`: a QoS 0 message needs nothing more; a QoS 1/2 message gets a
    /// packet id and enters the inflight window. The caller has checked the window has room,
    /// and encodes the PUBLISH, with the packet id returned (0 for QoS 0), from the delivery
    /// handed back.
    pub fn begin_delivery(&mut self, d: Delivery) -> (u16, Delivery) {
        let packet_id = match d.qos {
            QoS::AtMostOnce => 0,
            qos => {
                let id = self.allocate_packet_id();
                let state = if qos == QoS::AtLeastOnce {
                    OutState::AwaitPubAck
                } else {
                    OutState::AwaitPubRec
                };
                if let (Some(log), true) = (&self.log, d.seq != 0) {
                    // QoS 2 ids must be on disk before the PUBLISH leaves: re-sent under
                    // another id after a crash, it would be delivered twice.
                    log.sent(d.seq, id, state, qos == QoS::ExactlyOnce);
                }
                self.inflight.push_back(Inflight {
                    packet_id: id,
                    delivery: d.clone(),
                    state,
                    sent: true,
                });
                id
            }
        };
        (packet_id, d)
    }

    fn position(&self, packet_id: u16, state: OutState) -> Option<usize> {
        self.inflight
            .iter()
            .position(|i| i.packet_id == packet_id && i.state == state)
    }

    /// PUBACK received: the QoS 1 flow is complete. False when the id was not awaiting one.
    pub fn on_puback(&mut self, packet_id: u16) -> bool {
        match self.position(packet_id, OutState::AwaitPubAck) {
            Some(i) => {
                if let Some(done) = self.inflight.remove(i) {
                    self.log_done(done.delivery.seq);
                }
                true
            }
            None => false,
        }
    }

    /// PUBREC received: the message is now the client's; answer PUBREL. A PUBREC for an id
    /// already released is answered again (our PUBREL was lost); for an unknown id a v5 client
    /// gets reason 0x92 so it can free its state. A v5 PUBREC with a failure reason ends the
    /// flow with no PUBREL (section 4.3.3).
    pub fn on_pubrec(&mut self, packet_id: u16, reason: ReasonCode) -> Option<Ack> {
        if let Some(i) = self.position(packet_id, OutState::AwaitPubRec) {
            if !reason.is_success() {
                if let Some(done) = self.inflight.remove(i) {
                    self.log_done(done.delivery.seq);
                }
                return None;
            }
            self.inflight[i].state = OutState::AwaitPubComp;
            let seq = self.inflight[i].delivery.seq;
            if let (Some(log), true) = (&self.log, seq != 0) {
                // After PUBREL the PUBLISH must never be re-sent: durable before it leaves.
                log.sent(seq, packet_id, OutState::AwaitPubComp, true);
            }
            return Some(Ack::new(packet_id));
        }
        if self.position(packet_id, OutState::AwaitPubComp).is_some() {
            return Some(Ack::new(packet_id));
        }
        Some(Ack {
            reason: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            ..Ack::new(packet_id)
        })
    }

    /// Drop an inflight entry whose PUBLISH could not be sent at all (larger than the
    /// client's Maximum Packet Size), so it does not wait for an acknowledgement forever.
    pub fn forget(&mut self, packet_id: u16) {
        if let Some(pos) = self.inflight.iter().position(|i| i.packet_id == packet_id) {
            if let Some(done) = self.inflight.remove(pos) {
                self.log_done(done.delivery.seq);
            }
        }
    }

    /// PUBCOMP received: the QoS 2 flow is complete. False when the id was not awaiting one.
    pub fn on_pubcomp(&mut self, packet_id: u16) -> bool {
        match self.position(packet_id, OutState::AwaitPubComp) {
            Some(i) => {
                if let Some(done) = self.inflight.remove(i) {
                    self.log_done(done.delivery.seq);
                }
                true
            }
            None => false,
        }
    }

    /// A connection resumed this session: everything in flight must be sent again
    /// [MQTT-4.4.0-1]; `next_resend` hands the packets out as the window allows.
    pub fn begin_resume(&mut self) {
        for i in &mut self.inflight {
            i.sent = false;
        }
    }

    /// Messages waiting to be re-sent on this connection.
    pub fn resend_pending(&self) -> usize {
        self.inflight.iter().filter(|i| !i.sent).count()
    }

    /// The next packet to re-send after a resume, in original order, while fewer than
    /// `window` are out: unacknowledged PUBLISH with DUP = 1 and their original ids, or
    /// PUBREL for messages already PUBREC'd. Re-sent ones sit at the front of the window, so
    /// new messages wait until all re-sends are out.
    pub fn next_resend(
        &mut self,
        window: usize,
        protocol: ProtocolVersion,
        now: Instant,
    ) -> Option<Packet> {
        let out = self.inflight.iter().filter(|i| i.sent).count();
        if out >= window {
            return None;
        }
        let i = self.inflight.iter_mut().find(|i| !i.sent)?;
        i.sent = true;
        Some(match i.state {
            OutState::AwaitPubAck | OutState::AwaitPubRec => Packet::Publish(outbound_publish(
                &i.delivery,
                i.packet_id,
                true,
                protocol,
                now,
            )),
            OutState::AwaitPubComp => Packet::PubRel(Ack::new(i.packet_id)),
        })
    }

    /// An inbound QoS 2 PUBLISH with `packet_id` arrived.
    pub fn begin_inbound_qos2(&mut self, packet_id: u16, max: usize) -> InboundQos2 {
        if self.inbound_qos2.contains(&packet_id) {
            InboundQos2::Duplicate
        } else if self.inbound_qos2.len() >= max {
            InboundQos2::Full
        } else {
            self.inbound_qos2.insert(packet_id);
            if let Some(log) = &self.log {
                log.inbound(packet_id, true);
            }
            InboundQos2::New
        }
    }

    /// PUBREL received: the id may be reused by the client. False when it was not pending
    /// (a PUBCOMP is due either way; v5 adds reason 0x92).
    pub fn release_inbound_qos2(&mut self, packet_id: u16) -> bool {
        let released = self.inbound_qos2.remove(&packet_id);
        if let (Some(log), true) = (&self.log, released) {
            log.inbound(packet_id, false);
        }
        released
    }
}

/// Build the PUBLISH for one delivery. Properties are only filled for v5 peers, so 3.1.1
/// deliveries do not pay for cloning what their encoder would drop.
pub fn outbound_publish(
    d: &Delivery,
    packet_id: u16,
    dup: bool,
    protocol: ProtocolVersion,
    now: Instant,
) -> Publish {
    let properties = if protocol.is_v5() {
        let mut p = d.msg.properties.clone();
        if let Some(at) = d.msg.expires_at {
            // The remaining lifetime, rounded up so a message is never shown as already
            // expired while it is still deliverable [MQTT-3.3.2-6]. Never more than the
            // publisher gave: a subscriber's `now` may be read on another thread just before
            // the message was published, and rounding up would then add a second.
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            let secs = u32::try_from(secs).unwrap_or(u32::MAX);
            p.message_expiry_interval = Some(
                p.message_expiry_interval
                    .map_or(secs, |given| secs.min(given)),
            );
        }
        p.subscription_identifiers = d.subscription_ids.clone();
        p
    } else {
        Default::default()
    };
    Publish {
        dup,
        qos: d.qos,
        retain: d.retain,
        topic: d.msg.topic.clone(),
        packet_id,
        payload: d.msg.payload.clone(),
        properties,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OverflowPolicy;
    use crate::session::mailbox::QueueLimits;
    use crate::testutil::delivery;

    fn session() -> Session {
        let mb = Arc::new(Mailbox::new(QueueLimits {
            max_messages: 10,
            max_bytes: 1000,
            overflow: OverflowPolicy::DropNew,
            queue_qos0_offline: false,
            slow_drop_qos0: true,
        }));
        Session::new("c".into(), ProtocolVersion::V311, mb, EXPIRY_NEVER)
    }

    #[test]
    fn qos1_flow_allocates_ids_and_completes_on_puback() {
        let now = Instant::now();
        let mut s = session();
        let p1 = s.start_delivery(delivery(QoS::AtLeastOnce, b"1"), now);
        let p2 = s.start_delivery(delivery(QoS::AtLeastOnce, b"2"), now);
        assert_ne!(p1.packet_id, 0);
        assert_ne!(p1.packet_id, p2.packet_id);
        assert_eq!(s.inflight_len(), 2);
        assert!(s.on_puback(p1.packet_id));
        assert!(
            !s.on_puback(p1.packet_id),
            "a second PUBACK matches nothing"
        );
        assert_eq!(s.inflight_len(), 1);
    }

    #[test]
    fn qos0_never_enters_the_window() {
        let mut s = session();
        let p = s.start_delivery(delivery(QoS::AtMostOnce, b"x"), Instant::now());
        assert_eq!(p.packet_id, 0);
        assert_eq!(s.inflight_len(), 0);
    }

    #[test]
    fn qos2_flow_pubrec_pubrel_pubcomp() {
        let mut s = session();
        let p = s.start_delivery(delivery(QoS::ExactlyOnce, b"x"), Instant::now());
        assert!(
            !s.on_pubcomp(p.packet_id),
            "PUBCOMP before PUBREC is not accepted"
        );
        let rel = s.on_pubrec(p.packet_id, ReasonCode::SUCCESS).unwrap();
        assert_eq!(rel.packet_id, p.packet_id);
        assert_eq!(rel.reason, ReasonCode::SUCCESS);
        // A repeated PUBREC gets the PUBREL again.
        assert_eq!(
            s.on_pubrec(p.packet_id, ReasonCode::SUCCESS)
                .unwrap()
                .reason,
            ReasonCode::SUCCESS
        );
        assert!(s.on_pubcomp(p.packet_id));
        assert_eq!(s.inflight_len(), 0);
        assert_eq!(
            s.on_pubrec(p.packet_id, ReasonCode::SUCCESS)
                .unwrap()
                .reason,
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
        );
        // A v5 refusal ends the flow without PUBREL.
        let q = s.start_delivery(delivery(QoS::ExactlyOnce, b"y"), Instant::now());
        assert_eq!(s.on_pubrec(q.packet_id, ReasonCode::QUOTA_EXCEEDED), None);
        assert_eq!(s.inflight_len(), 0);
    }

    /// [MQTT-4.4.0-1]: on resume, unacknowledged PUBLISH are re-sent with DUP and their
    /// original ids, and PUBREL for messages already PUBREC'd, in order.
    #[test]
    fn resend_uses_original_ids_dup_and_pubrel() {
        let now = Instant::now();
        let mut s = session();
        let a = s.start_delivery(delivery(QoS::AtLeastOnce, b"a"), now);
        let b = s.start_delivery(delivery(QoS::ExactlyOnce, b"b"), now);
        let c = s.start_delivery(delivery(QoS::ExactlyOnce, b"c"), now);
        s.on_pubrec(b.packet_id, ReasonCode::SUCCESS);
        s.begin_resume();
        let mut again = Vec::new();
        while let Some(p) = s.next_resend(10, ProtocolVersion::V311, now) {
            again.push(p);
        }
        assert_eq!(again.len(), 3);
        match &again[0] {
            Packet::Publish(p) => {
                assert!(p.dup);
                assert_eq!(p.packet_id, a.packet_id);
                assert_eq!(&p.payload[..], b"a");
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
        assert_eq!(again[1], Packet::PubRel(Ack::new(b.packet_id)));
        match &again[2] {
            Packet::Publish(p) => {
                assert!(p.dup);
                assert_eq!(p.packet_id, c.packet_id);
                assert_eq!(p.qos, QoS::ExactlyOnce);
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// [MQTT-3.3.4-9]: a client resuming with a smaller Receive Maximum gets only that many
    /// re-sends at once; the next follows each acknowledgement.
    #[test]
    fn resend_respects_the_new_window() {
        let now = Instant::now();
        let mut s = session();
        let ids: Vec<u16> = (0..3)
            .map(|_| {
                s.start_delivery(delivery(QoS::AtLeastOnce, b"x"), now)
                    .packet_id
            })
            .collect();
        s.begin_resume();
        assert!(s.next_resend(1, ProtocolVersion::V5, now).is_some());
        assert!(s.next_resend(1, ProtocolVersion::V5, now).is_none());
        assert_eq!(s.resend_pending(), 2);
        assert!(s.on_puback(ids[0]));
        match s.next_resend(1, ProtocolVersion::V5, now) {
            Some(Packet::Publish(p)) => assert_eq!(p.packet_id, ids[1]),
            other => panic!("expected the second re-send, got {other:?}"),
        }
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap() {
        let now = Instant::now();
        let mut s = session();
        s.next_packet_id = u16::MAX;
        let a = s.start_delivery(delivery(QoS::AtLeastOnce, b"a"), now);
        assert_eq!(a.packet_id, u16::MAX);
        let b = s.start_delivery(delivery(QoS::AtLeastOnce, b"b"), now);
        assert_eq!(b.packet_id, 1, "ids wrap to 1, never 0");
        s.next_packet_id = u16::MAX;
        let c = s.start_delivery(delivery(QoS::AtLeastOnce, b"c"), now);
        assert_eq!(c.packet_id, 2, "ids in flight are skipped");
    }

    #[test]
    fn inbound_qos2_is_routed_once() {
        let mut s = session();
        assert_eq!(s.begin_inbound_qos2(7, 2), InboundQos2::New);
        assert_eq!(s.begin_inbound_qos2(7, 2), InboundQos2::Duplicate);
        assert_eq!(s.begin_inbound_qos2(8, 2), InboundQos2::New);
        assert_eq!(s.begin_inbound_qos2(9, 2), InboundQos2::Full);
        assert!(s.release_inbound_qos2(7));
        assert!(!s.release_inbound_qos2(7));
        assert_eq!(
            s.begin_inbound_qos2(7, 2),
            InboundQos2::New,
            "id reusable after PUBREL"
        );
    }

    #[test]
    fn v5_delivery_carries_remaining_expiry_and_subscription_ids() {
        let now = Instant::now();
        let mut d = delivery(QoS::AtMostOnce, b"x");
        Arc::make_mut(&mut d.msg).expires_at = Some(now + std::time::Duration::from_millis(2500));
        d.subscription_ids = vec![3, 9];
        let p = outbound_publish(&d, 0, false, ProtocolVersion::V5, now);
        assert_eq!(p.properties.message_expiry_interval, Some(3));
        assert_eq!(p.properties.subscription_identifiers, vec![3, 9]);
        let p = outbound_publish(&d, 0, false, ProtocolVersion::V311, now);
        assert!(p.properties.is_empty());
    }
}
