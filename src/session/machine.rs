//! The server-side session state of MQTT section 4.1, as plain data and a state machine with no
//! I/O and no clock reads: callers pass `now` and send what the methods return. That keeps every
//! QoS flow unit-testable without sockets or timers.
//!
//! Ownership: while a client is connected its connection task owns the `Session` by value (no
//! lock around the inflight window). While it is offline the session is parked by value in its
//! registry slot. Only the queue of not-yet-sent messages (`Mailbox`) is shared, because
//! publishers on other tasks must reach it in both states.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use tokio::time::Instant;

use crate::session::expiry::Deadline;
use crate::session::journal::{ImageKind, SessionImage, SessionJournal};
use crate::session::mailbox::Mailbox;
use crate::session::parts::{OutState, Subscription};
use crate::wire::message::Delivery;
use crate::wire::packet::{Ack, Packet, ProtocolVersion, Publish, QoS, ReasonCode, Will};

/// Session Expiry Interval value meaning "never expires" [MQTT-3.1.2-23 context].
pub const EXPIRY_NEVER: u32 = u32::MAX;

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

/// A session's subscriptions: topic filter -> options, mirrored in the router's index.
///
/// Most devices hold one or two subscriptions, and a parked session keeps its set for as long
/// as it lives, so the first one sits inline (no allocation besides its filter) and only a
/// second one brings a hash map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscriptions(SubSet);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum SubSet {
    #[default]
    Empty,
    One(String, Subscription),
    // Boxed on purpose: a bare map would make every session's set 48 bytes, used or not.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<String, Subscription>>),
}

impl Subscriptions {
    /// Add or replace the subscription to `filter`; returns the options it replaced.
    pub fn insert(&mut self, filter: String, sub: Subscription) -> Option<Subscription> {
        match &mut self.0 {
            SubSet::Empty => {
                self.0 = SubSet::One(filter, sub);
                None
            }
            SubSet::One(f, s) if *f == filter => Some(std::mem::replace(s, sub)),
            SubSet::One(..) => {
                let SubSet::One(f, s) = std::mem::take(&mut self.0) else {
                    unreachable!("matched One above")
                };
                let mut map = HashMap::with_capacity(2);
                map.insert(f, s);
                map.insert(filter, sub);
                self.0 = SubSet::Many(Box::new(map));
                None
            }
            SubSet::Many(map) => map.insert(filter, sub),
        }
    }

    /// Remove the subscription to `filter`; returns its options.
    pub fn remove(&mut self, filter: &str) -> Option<Subscription> {
        match &mut self.0 {
            SubSet::Empty => None,
            SubSet::One(f, _) if f != filter => None,
            SubSet::One(..) => match std::mem::take(&mut self.0) {
                SubSet::One(_, s) => Some(s),
                _ => None,
            },
            SubSet::Many(map) => {
                let removed = map.remove(filter);
                if map.is_empty() {
                    self.0 = SubSet::Empty;
                }
                removed
            }
        }
    }

    /// The options of the subscription to `filter`, if any.
    pub fn get(&self, filter: &str) -> Option<&Subscription> {
        match &self.0 {
            SubSet::Empty => None,
            SubSet::One(f, s) => (f == filter).then_some(s),
            SubSet::Many(map) => map.get(filter),
        }
    }

    /// Is there a subscription to `filter`?
    pub fn contains_key(&self, filter: &str) -> bool {
        self.get(filter).is_some()
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        match &self.0 {
            SubSet::Empty => 0,
            SubSet::One(..) => 1,
            SubSet::Many(map) => map.len(),
        }
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every (filter, options), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Subscription)> {
        let (one, many) = match &self.0 {
            SubSet::Empty => (None, None),
            SubSet::One(f, s) => (Some((f, s)), None),
            SubSet::Many(map) => (None, Some(map.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    /// Every filter, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.iter().map(|(f, _)| f)
    }
}

/// A delayed will waiting while the session is offline (v5 Will Delay). Boxed: a will is
/// about 200 bytes and almost every parked session has none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingWill(Option<Box<ArmedWill>>);

/// A pending will and, while its session is parked, the deadline of its timer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ArmedWill {
    will: Will,
    at: Option<Deadline>,
}

impl PendingWill {
    /// The will, if one is pending.
    pub fn as_ref(&self) -> Option<&Will> {
        self.0.as_deref().map(|a| &a.will)
    }

    /// Take the will out, leaving none pending.
    pub fn take(&mut self) -> Option<Will> {
        self.0.take().map(|a| a.will)
    }

    /// Make `will` the pending one.
    pub fn set(&mut self, will: Will) {
        self.0 = Some(Box::new(ArmedWill { will, at: None }));
    }

    /// The deadline its timer was armed with (the registry's business, kept here so that the
    /// slot of every parked session without a will does not carry room for one).
    pub fn armed_at(&self) -> Option<Deadline> {
        self.0.as_ref().and_then(|a| a.at)
    }

    /// Note the deadline its timer was armed with; nothing without a will.
    pub fn set_armed_at(&mut self, at: Option<Deadline>) {
        if let Some(a) = &mut self.0 {
            a.at = at;
        }
    }

    /// Drop the pending will, if any.
    pub fn clear(&mut self) {
        self.0 = None;
    }

    /// Is a will pending?
    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// Is no will pending?
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }
}

impl From<Option<Will>> for PendingWill {
    fn from(will: Option<Will>) -> Self {
        PendingWill(will.map(|will| Box::new(ArmedWill { will, at: None })))
    }
}

/// Hashes a packet id with one multiplication: ids are small integers the session chooses
/// itself, so SipHash's protection against chosen keys buys nothing and costs a PUBACK's
/// lookup several times over.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u16(&mut self, id: u16) {
        self.0 = u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// The QoS flows of a session that is moving messages: the outbound inflight window and the
/// inbound QoS 2 ids awaiting PUBREL. Allocated when the first flow starts and dropped when a
/// session parks with none open, so an idle parked session pays one pointer for all of it.
#[derive(Debug, Default)]
struct Flows {
    /// Outbound messages in the order they were first sent. `None` marks one completed out of
    /// order; such holes are dropped when they reach the front (or by `compact`).
    order: VecDeque<Option<Inflight>>,
    /// Position of `order[0]`, counted from the window's creation, so the positions in `ids`
    /// stay valid as the front is popped.
    front: u64,
    /// Packet id -> position of its entry: an acknowledgement finds its message without a
    /// walk through the window.
    ids: HashMap<u16, u64, BuildHasherDefault<IdHasher>>,
    /// Entries not yet (re)sent on this connection.
    unsent: usize,
    /// Every entry before this position has been sent (where `next_resend` resumes its walk).
    resend_from: u64,
    /// Inbound QoS 2 ids awaiting PUBREL, sorted (a client keeps few unreleased).
    inbound: Vec<u16>,
}

impl Flows {
    fn is_idle(&self) -> bool {
        self.ids.is_empty() && self.inbound.is_empty()
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn push(&mut self, i: Inflight) {
        let at = self.front + self.order.len() as u64;
        self.unsent += usize::from(!i.sent);
        self.ids.insert(i.packet_id, at);
        self.order.push_back(Some(i));
    }

    fn slot(&self, at: u64) -> usize {
        // Positions in `ids` are never below `front` nor past the end of `order`.
        usize::try_from(at - self.front).unwrap_or(usize::MAX)
    }

    fn get_mut(&mut self, packet_id: u16) -> Option<&mut Inflight> {
        let at = *self.ids.get(&packet_id)?;
        let slot = self.slot(at);
        self.order.get_mut(slot)?.as_mut()
    }

    fn get(&self, packet_id: u16) -> Option<&Inflight> {
        let at = *self.ids.get(&packet_id)?;
        self.order.get(self.slot(at))?.as_ref()
    }

    fn remove(&mut self, packet_id: u16) -> Option<Inflight> {
        let at = self.ids.remove(&packet_id)?;
        let slot = self.slot(at);
        let removed = self.order.get_mut(slot)?.take()?;
        self.unsent -= usize::from(!removed.sent);
        while matches!(self.order.front(), Some(None)) {
            self.order.pop_front();
            self.front += 1;
        }
        // A client that never acknowledges one old message while acknowledging every later
        // one would otherwise leave an ever longer run of holes behind it.
        if self.order.len() > 2 * self.ids.len() + 16 {
            self.compact();
        }
        Some(removed)
    }

    /// Close the holes and renumber the positions.
    fn compact(&mut self) {
        self.order.retain(Option::is_some);
        for (k, i) in self.order.iter().flatten().enumerate() {
            self.ids.insert(i.packet_id, self.front + k as u64);
        }
        self.resend_from = self.front;
    }

    fn iter(&self) -> impl Iterator<Item = &Inflight> {
        self.order.iter().flatten()
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Inflight> {
        self.order.iter_mut().flatten()
    }

    /// The first entry not yet re-sent, marked sent.
    fn next_unsent(&mut self) -> Option<&mut Inflight> {
        let start = self.slot(self.resend_from.max(self.front));
        let (k, i) = self
            .order
            .iter_mut()
            .enumerate()
            .skip(start)
            .find_map(|(k, e)| e.as_mut().filter(|i| !i.sent).map(|i| (k, i)))?;
        self.resend_from = self.front + k as u64 + 1;
        self.unsent -= 1;
        i.sent = true;
        Some(i)
    }
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
    pub subscriptions: Subscriptions,
    /// Outbound QoS 1/2 messages in flight and inbound QoS 2 ids awaiting PUBREL; `None` while
    /// there are none (see `Flows`).
    flows: Option<Box<Flows>>,
    /// Next packet identifier to try.
    next_packet_id: u16,
    /// Seconds the session outlives its connection: 0 ends it with the connection,
    /// `EXPIRY_NEVER` keeps it forever.
    pub expiry_interval: u32,
    /// A will waiting for its delay to pass while the session is offline (v5 Will Delay).
    pub pending_will: PendingWill,
    /// Where its durable state goes: attached while the session outlives its connection and
    /// the broker journals; detached (does nothing) otherwise.
    pub journal: SessionJournal,
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
            subscriptions: Subscriptions::default(),
            flows: None,
            next_packet_id: 1,
            expiry_interval,
            pending_will: PendingWill::default(),
            journal: SessionJournal::default(),
        }
    }

    /// Make the session durable through `journal` (or memory-only with a detached one); its
    /// mailbox numbers journaled messages from `next_seq` on.
    pub fn set_journal(&mut self, journal: SessionJournal, next_seq: u64) {
        self.mailbox.set_journal(journal.clone(), next_seq);
        self.journal = journal;
    }

    /// The session's durable image with `will` (the connection's will while connected, the
    /// delayed will once parked) and `disconnected_at` (wall ms; `None` while connected).
    /// `None` when the session is not journaled.
    pub fn image(&self, will: Option<&Will>, disconnected_at: Option<u64>) -> Option<SessionImage> {
        let incarnation = self.journal.incarnation()?;
        let mut subscriptions: Vec<_> = self
            .subscriptions
            .iter()
            .map(|(f, sub)| (f.clone(), *sub))
            .collect();
        subscriptions.sort_by(|a, b| a.0.cmp(&b.0));
        Some(SessionImage {
            client_id: self.client_id.clone(),
            incarnation,
            protocol: self.protocol,
            expiry_interval: self.expiry_interval,
            disconnected_at,
            will: will.cloned(),
            subscriptions,
        })
    }

    /// Journal the session's image (see [`Session::image`]) as `kind`.
    pub fn journal_image(
        &self,
        kind: ImageKind,
        will: Option<&Will>,
        disconnected_at: Option<u64>,
    ) {
        if let Some(image) = self.image(will, disconnected_at) {
            self.journal.image(kind, image);
        }
    }

    /// Forget the store sequence numbers of everything queued or in flight: the log they
    /// referred to has ended, and a later log numbers its entries from 1 again.
    pub fn clear_seqs(&mut self) {
        for i in self.flows.iter_mut().flat_map(|f| f.iter_mut()) {
            i.delivery.seq = 0;
        }
        self.mailbox.clear_seqs();
    }

    /// Put back an in-flight message recovered from the store (re-sent on resume).
    pub fn restore_inflight(&mut self, i: Inflight) {
        self.flows_mut().push(i);
    }

    /// Put back an inbound QoS 2 id awaiting PUBREL recovered from the store.
    pub fn restore_inbound(&mut self, packet_id: u16) {
        let inbound = &mut self.flows_mut().inbound;
        if let Err(at) = inbound.binary_search(&packet_id) {
            inbound.insert(at, packet_id);
        }
    }

    fn flows_mut(&mut self) -> &mut Flows {
        self.flows.get_or_insert_with(Box::default)
    }

    /// The session is being parked: give back what only a moving session needs (an empty
    /// window, spare capacity), so a parked session holds only what it has.
    pub fn shrink(&mut self) {
        match &mut self.flows {
            Some(f) if f.is_idle() => self.flows = None,
            Some(f) => {
                f.compact();
                f.order.shrink_to_fit();
                f.ids.shrink_to_fit();
                f.inbound.shrink_to_fit();
            }
            None => {}
        }
    }

    /// Outbound messages in flight.
    pub fn inflight_len(&self) -> usize {
        self.flows.as_ref().map_or(0, |f| f.len())
    }

    /// Inbound QoS 2 ids awaiting PUBREL.
    pub fn inbound_qos2_len(&self) -> usize {
        self.flows.as_ref().map_or(0, |f| f.inbound.len())
    }

    /// Iterate over the inflight window (for inspection and persistence).
    pub fn inflight(&self) -> impl Iterator<Item = &Inflight> {
        self.flows.iter().flat_map(|f| f.iter())
    }

    fn allocate_packet_id(&mut self) -> u16 {
        // The window is far smaller than 65,535, so a free id is always found quickly.
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.flows.as_ref().is_some_and(|f| f.ids.contains_key(&id)) {
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
                // QoS 2 ids must be durable before the PUBLISH leaves: re-sent under another
                // id after a crash, it would be delivered twice (`Event::must_sync`).
                self.journal.in_flight(d.seq, id, state);
                self.flows_mut().push(Inflight {
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

    /// Is `packet_id` in flight in `state`?
    fn awaits(&self, packet_id: u16, state: OutState) -> bool {
        self.flows
            .as_ref()
            .and_then(|f| f.get(packet_id))
            .is_some_and(|i| i.state == state)
    }

    /// Take `packet_id` out of the window if it is in `state`.
    fn complete(&mut self, packet_id: u16, state: OutState) -> Option<Inflight> {
        if !self.awaits(packet_id, state) {
            return None;
        }
        self.flows.as_mut()?.remove(packet_id)
    }

    /// PUBACK received: the QoS 1 flow is complete. False when the id was not awaiting one.
    pub fn on_puback(&mut self, packet_id: u16) -> bool {
        match self.complete(packet_id, OutState::AwaitPubAck) {
            Some(done) => {
                self.journal.done(done.delivery.seq);
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
        if self.awaits(packet_id, OutState::AwaitPubRec) {
            if !reason.is_success() {
                if let Some(done) = self.complete(packet_id, OutState::AwaitPubRec) {
                    self.journal.done(done.delivery.seq);
                }
                return None;
            }
            let i = self.flows.as_mut().and_then(|f| f.get_mut(packet_id))?;
            i.state = OutState::AwaitPubComp;
            let seq = i.delivery.seq;
            // After PUBREL the PUBLISH must never be re-sent: durable before it leaves.
            self.journal.pub_recd(seq, packet_id);
            return Some(Ack::new(packet_id));
        }
        if self.awaits(packet_id, OutState::AwaitPubComp) {
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
        if let Some(done) = self.flows.as_mut().and_then(|f| f.remove(packet_id)) {
            self.journal.done(done.delivery.seq);
        }
    }

    /// PUBCOMP received: the QoS 2 flow is complete. False when the id was not awaiting one.
    pub fn on_pubcomp(&mut self, packet_id: u16) -> bool {
        match self.complete(packet_id, OutState::AwaitPubComp) {
            Some(done) => {
                self.journal.done(done.delivery.seq);
                true
            }
            None => false,
        }
    }

    /// A connection resumed this session: everything in flight must be sent again
    /// [MQTT-4.4.0-1]; `next_resend` hands the packets out as the window allows.
    pub fn begin_resume(&mut self) {
        if let Some(f) = &mut self.flows {
            for i in f.order.iter_mut().flatten() {
                i.sent = false;
            }
            f.unsent = f.len();
            f.resend_from = f.front;
        }
    }

    /// Messages waiting to be re-sent on this connection.
    pub fn resend_pending(&self) -> usize {
        self.flows.as_ref().map_or(0, |f| f.unsent)
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
        let f = self.flows.as_mut()?;
        if f.len() - f.unsent >= window {
            return None;
        }
        let i = f.next_unsent()?;
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
        let inbound = &mut self.flows_mut().inbound;
        let at = match inbound.binary_search(&packet_id) {
            Ok(_) => return InboundQos2::Duplicate,
            Err(at) => at,
        };
        if inbound.len() >= max {
            InboundQos2::Full
        } else {
            inbound.insert(at, packet_id);
            self.journal.inbound(packet_id, true);
            InboundQos2::New
        }
    }

    /// PUBREL received: the id may be reused by the client. False when it was not pending
    /// (a PUBCOMP is due either way; v5 adds reason 0x92).
    pub fn release_inbound_qos2(&mut self, packet_id: u16) -> bool {
        let released = match &mut self.flows {
            Some(f) => match f.inbound.binary_search(&packet_id) {
                Ok(at) => {
                    f.inbound.remove(at);
                    true
                }
                Err(_) => false,
            },
            None => false,
        };
        if released {
            self.journal.inbound(packet_id, false);
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
    use crate::wire::packet::RetainHandling;

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

    /// Acknowledgements in any order find their message by id; the holes they leave never
    /// let the window grow, and a resume re-sends the rest in the original order.
    #[test]
    fn out_of_order_acks_and_resend_keep_the_order() {
        let now = Instant::now();
        let mut s = session();
        let first = s
            .start_delivery(delivery(QoS::AtLeastOnce, b"first"), now)
            .packet_id;
        // The first message is never acknowledged while thousands after it are.
        let mut kept = Vec::new();
        for n in 0..5000u32 {
            let id = s
                .start_delivery(delivery(QoS::AtLeastOnce, b"x"), now)
                .packet_id;
            if n % 1000 == 999 {
                kept.push(id);
            } else {
                assert!(s.on_puback(id));
            }
        }
        assert_eq!(s.inflight_len(), 1 + kept.len());
        let f = s.flows.as_ref().unwrap();
        assert!(f.order.len() <= 2 * f.ids.len() + 16, "holes are closed");
        s.begin_resume();
        assert_eq!(s.resend_pending(), 1 + kept.len());
        let mut again = Vec::new();
        while let Some(Packet::Publish(p)) = s.next_resend(100, ProtocolVersion::V311, now) {
            assert!(p.dup);
            again.push(p.packet_id);
        }
        let mut expected = vec![first];
        expected.extend(&kept);
        assert_eq!(again, expected);
        assert_eq!(s.resend_pending(), 0);
        assert!(!s.on_pubcomp(first), "a QoS 1 id does not take PUBCOMP");
        for id in expected {
            assert!(s.on_puback(id));
        }
        assert_eq!(s.inflight_len(), 0);
        s.shrink();
        assert!(s.flows.is_none(), "an idle parked session keeps no window");
    }

    #[test]
    fn subscriptions_go_from_one_inline_to_many_and_back() {
        let sub = |qos| Subscription {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::OnSubscribe,
            identifier: None,
        };
        let mut subs = Subscriptions::default();
        assert!(subs.is_empty());
        assert_eq!(subs.insert("a".into(), sub(QoS::AtMostOnce)), None);
        assert_eq!(
            subs.insert("a".into(), sub(QoS::AtLeastOnce)),
            Some(sub(QoS::AtMostOnce))
        );
        assert_eq!(subs.insert("b".into(), sub(QoS::ExactlyOnce)), None);
        assert_eq!(subs.len(), 2);
        assert_eq!(subs.get("a"), Some(&sub(QoS::AtLeastOnce)));
        let mut keys: Vec<&String> = subs.keys().collect();
        keys.sort();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(subs.remove("c"), None);
        assert_eq!(subs.remove("a"), Some(sub(QoS::AtLeastOnce)));
        assert_eq!(subs.remove("b"), Some(sub(QoS::ExactlyOnce)));
        assert!(subs.is_empty());
        assert!(!subs.contains_key("b"));
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

    /// The exact journal events of each flow, against a recording journal.
    mod journaled {
        use super::*;
        use crate::session::journal::recording::{Rec, Recording};
        use crate::session::journal::Journal;
        use crate::stats::Stats;
        use crate::wire::packet::ReasonCode;

        /// A durable session whose journal records, and the recording (emptied of the image
        /// written at creation).
        fn durable() -> (Session, Arc<Recording>) {
            let rec = Recording::new();
            let j: Arc<dyn Journal> = rec.clone();
            let mut s = session();
            let handle = SessionJournal::attach(&j);
            s.journal = handle.clone();
            s.journal_image(ImageKind::Created, None, None);
            s.set_journal(handle, 1);
            s.mailbox.set_online(true);
            assert_eq!(
                rec.take_events(),
                vec![Rec::Image(ImageKind::Created, "c".into(), false, vec![])]
            );
            (s, rec)
        }

        /// What the connection task does with a queued delivery: take it from the mailbox
        /// into the inflight window.
        fn send_next(s: &mut Session) -> Publish {
            let d = s.mailbox.pop().expect("queued");
            s.start_delivery(d, Instant::now())
        }

        #[test]
        fn qos1_delivery_and_ack() {
            let (mut s, rec) = durable();
            let stats = Stats::default();
            s.mailbox.push(delivery(QoS::AtLeastOnce, b"1"), &stats);
            // QoS 0 is never journaled.
            s.mailbox.push(delivery(QoS::AtMostOnce, b"0"), &stats);
            let p = send_next(&mut s);
            send_next(&mut s);
            assert!(s.on_puback(p.packet_id));
            assert_eq!(
                rec.take_events(),
                vec![
                    Rec::Enqueued(1),
                    Rec::InFlight(1, p.packet_id, OutState::AwaitPubAck),
                    Rec::Done(1),
                ]
            );
        }

        #[test]
        fn qos2_outbound_and_inbound() {
            let (mut s, rec) = durable();
            let stats = Stats::default();
            s.mailbox.push(delivery(QoS::ExactlyOnce, b"2"), &stats);
            let p = send_next(&mut s);
            let id = p.packet_id;
            assert!(s.on_pubrec(id, ReasonCode::SUCCESS).is_some());
            // A PUBREC repeated (our PUBREL was lost) changes nothing durable.
            assert!(s.on_pubrec(id, ReasonCode::SUCCESS).is_some());
            assert!(s.on_pubcomp(id));
            assert_eq!(
                rec.take_events(),
                vec![
                    Rec::Enqueued(1),
                    Rec::InFlight(1, id, OutState::AwaitPubRec),
                    Rec::PubRecd(1, id),
                    Rec::Done(1),
                ]
            );

            // Inbound: the id is journaled when first seen, not for a resend, and released
            // once by PUBREL.
            assert_eq!(s.begin_inbound_qos2(7, 10), InboundQos2::New);
            assert_eq!(s.begin_inbound_qos2(7, 10), InboundQos2::Duplicate);
            assert!(s.release_inbound_qos2(7));
            assert!(!s.release_inbound_qos2(7));
            assert_eq!(
                rec.take_events(),
                vec![Rec::InboundAdded(7), Rec::InboundReleased(7)]
            );
        }

        #[test]
        fn resume_resends_without_journaling_again() {
            let (mut s, rec) = durable();
            let stats = Stats::default();
            s.mailbox.push(delivery(QoS::AtLeastOnce, b"1"), &stats);
            s.mailbox.push(delivery(QoS::ExactlyOnce, b"2"), &stats);
            let p1 = send_next(&mut s);
            let p2 = send_next(&mut s);
            assert!(s.on_pubrec(p2.packet_id, ReasonCode::SUCCESS).is_some());
            rec.take_events();

            // The connection is gone; a new one resumes [MQTT-4.4.0-1]: the PUBLISH again
            // with DUP and its id, the PUBREL again. Both were journaled when first sent.
            s.begin_resume();
            let now = Instant::now();
            match s.next_resend(10, ProtocolVersion::V311, now) {
                Some(Packet::Publish(p)) => assert!(p.dup && p.packet_id == p1.packet_id),
                other => panic!("expected the PUBLISH again, got {other:?}"),
            }
            match s.next_resend(10, ProtocolVersion::V311, now) {
                Some(Packet::PubRel(a)) => assert_eq!(a.packet_id, p2.packet_id),
                other => panic!("expected the PUBREL again, got {other:?}"),
            }
            assert_eq!(rec.take_events(), vec![]);
            assert!(s.on_puback(p1.packet_id));
            assert!(s.on_pubcomp(p2.packet_id));
            assert_eq!(rec.take_events(), vec![Rec::Done(1), Rec::Done(2)]);
        }

        #[test]
        fn a_detached_session_numbers_nothing_and_has_no_image() {
            let s = session();
            s.mailbox.set_online(true);
            s.mailbox
                .push(delivery(QoS::AtLeastOnce, b"1"), &Stats::default());
            let d = s.mailbox.pop().expect("queued");
            assert_eq!(d.seq, 0, "not journaled, so not numbered");
            assert!(s.image(None, None).is_none());
        }
    }
}
