//! The routed application message and a per-subscriber delivery of it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::time::Instant;

use crate::wire::codec::PublishHeader;
use crate::wire::packet::{ProtocolVersion, PublishProperties, QoS};

/// An application message as it travels from one publisher to every matching session.
/// Shared (`Arc<Message>`) by all deliveries of it, so fan-out copies a pointer, not the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name the message was published to.
    pub topic: String,
    /// Payload; `Bytes` so every delivery and the retained store share one buffer.
    pub payload: Bytes,
    /// QoS the publisher used: the upper bound of every delivery's QoS.
    pub qos: QoS,
    /// RETAIN flag as published.
    pub retain: bool,
    /// Application properties (v5), without topic alias or subscription identifiers, which
    /// belong to one connection or one delivery.
    pub properties: PublishProperties,
    /// When the Message Expiry Interval runs out, if one was set.
    pub expires_at: Option<Instant>,
    /// Client ID of the publisher, for the No Local option; `None` for wills and system messages.
    pub publisher: Option<Arc<str>>,
    /// Where the store wrote this message's record, so that every durable copy of it in the
    /// same log segment refers to one record instead of repeating the payload.
    pub stored: StoredAt,
    /// Its PUBLISH headers as encoded for the deliveries that share them (see
    /// `Delivery::shared_header`); filled on first use.
    pub encoded: EncodedHeaders,
}

/// A message's PUBLISH header per variant that changes its bytes beyond the flags and packet
/// id: protocol (3.1/3.1.1 vs 5.0) and whether it has a packet id (QoS 0 vs 1/2). One pointer
/// until the message is first delivered, so queued and retained messages pay 16 bytes for it.
/// Like `StoredAt`, no part of a message's value: a clone starts empty (its content may be
/// changed before it is shared) and equality ignores it.
#[derive(Default)]
pub struct EncodedHeaders {
    /// `None` in a slot: that variant could not be encoded (a field past an encoding limit);
    /// its deliveries take the per-delivery encoder, which reports why.
    slots: OnceLock<Box<[OnceLock<Option<PublishHeader>>; 4]>>,
}

impl EncodedHeaders {
    fn get(
        &self,
        msg: &Message,
        version: ProtocolVersion,
        with_id: bool,
    ) -> Option<&PublishHeader> {
        let slot = usize::from(version.is_v5()) * 2 + usize::from(with_id);
        let slots = self.slots.get_or_init(Default::default);
        slots[slot]
            .get_or_init(|| {
                // 3.1.1 headers have no properties: the encoder leaves them out.
                let (topic, len) = (&msg.topic, msg.payload.len());
                PublishHeader::encode(topic, &msg.properties, len, with_id, version).ok()
            })
            .as_ref()
    }
}

impl Clone for EncodedHeaders {
    fn clone(&self) -> EncodedHeaders {
        EncodedHeaders::default()
    }
}

impl PartialEq for EncodedHeaders {
    fn eq(&self, _: &EncodedHeaders) -> bool {
        true
    }
}

impl Eq for EncodedHeaders {}

impl std::fmt::Debug for EncodedHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self
            .slots
            .get()
            .map_or(0, |s| s.iter().filter(|s| s.get().is_some()).count());
        write!(f, "EncodedHeaders({n} encoded)")
    }
}

/// The store's note of where a message's record is: its id and the log file it is in, as a
/// key naming the store and the file's number (0, 0 = not written). Only the store reads or writes it, under its append lock, hence
/// relaxed atomics rather than a lock of its own. A copy of a message is a new message to the
/// store (its content may differ), and the note is no part of a message's value.
#[derive(Default)]
pub struct StoredAt {
    id: AtomicU64,
    segment: AtomicU64,
}

impl StoredAt {
    /// The record id if the message was written to the file `segment` (a key, see above).
    pub fn id_in(&self, segment: u64) -> Option<u64> {
        let id = self.id.load(Ordering::Relaxed);
        (id != 0 && self.segment.load(Ordering::Relaxed) == segment).then_some(id)
    }

    /// The message was written as record `id` in `segment`.
    pub fn set(&self, id: u64, segment: u64) {
        self.id.store(id, Ordering::Relaxed);
        self.segment.store(segment, Ordering::Relaxed);
    }
}

impl Clone for StoredAt {
    fn clone(&self) -> StoredAt {
        StoredAt::default()
    }
}

impl PartialEq for StoredAt {
    fn eq(&self, _: &StoredAt) -> bool {
        true
    }
}

impl Eq for StoredAt {}

impl std::fmt::Debug for StoredAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StoredAt({}@{})",
            self.id.load(Ordering::Relaxed),
            self.segment.load(Ordering::Relaxed)
        )
    }
}

impl Message {
    /// Has the Message Expiry Interval passed at `now`?
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Bytes this message holds: topic, payload and variable-size properties. Queue and
    /// retained-store byte limits count this, so a message cannot dodge them with an empty
    /// payload and a huge topic or user properties.
    pub fn size(&self) -> usize {
        let p = &self.properties;
        let strings = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        self.topic.len()
            + self.payload.len()
            + strings(&p.response_topic)
            + strings(&p.content_type)
            + p.correlation_data.as_ref().map_or(0, |d| d.len())
            + p.user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// The largest topic and properties (bytes, as `Message::size` counts them) whose PUBLISH
/// header a message keeps for sharing among its deliveries.
pub const SHARED_HEADER_MAX: usize = 1024;

/// One message on its way to one session: the shared message plus what differs per subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The shared message.
    pub msg: Arc<Message>,
    /// min(published QoS, granted QoS).
    pub qos: QoS,
    /// RETAIN flag to send: 1 for retained messages sent at subscribe time, 0 otherwise unless
    /// the v5 subscription asked for Retain As Published.
    pub retain: bool,
    /// Subscription Identifiers of every matching subscription of this session (v5).
    pub subscription_ids: Vec<u32>,
    /// Its number in a durable session's stored queue (assigned by the mailbox when it is
    /// written to the store); 0 = not stored.
    pub seq: u64,
    /// The ACL epoch (low 32 bits, never 0) in which the mailbox found the session may read
    /// this topic; 0 = not checked. The connection skips its own check while the epoch holds.
    pub acl_epoch: u32,
}

impl Delivery {
    /// Bytes the queue byte limit counts for it (see `Message::size`).
    pub fn size(&self) -> usize {
        self.msg.size()
    }

    /// The message's PUBLISH header shared by every delivery whose bytes differ only in the
    /// flags and the packet id, for a client speaking `version`; `None` when this one's
    /// differ in more (v5: Subscription Identifiers of its own, or a Message Expiry Interval,
    /// which shows the time left when it is sent), so it must be encoded by itself. A Topic
    /// Alias belongs to the connection, which checks for it.
    pub fn shared_header(&self, version: ProtocolVersion) -> Option<&PublishHeader> {
        if !self.shares_header(version) {
            return None;
        }
        self.msg
            .encoded
            .get(&self.msg, version, self.qos != QoS::AtMostOnce)
    }

    /// Whether this delivery's PUBLISH is the message's shared header with its own flags and
    /// packet id, followed by the payload (see `shared_header`).
    pub fn shares_header(&self, version: ProtocolVersion) -> bool {
        let p = &self.msg.properties;
        // A kept header is memory no limit counts (queues and the retained store charge
        // `Message::size` once): only small ones are kept, larger ones encoded per delivery.
        self.msg.size() - self.msg.payload.len() <= SHARED_HEADER_MAX
            && !(version.is_v5()
                && (!self.subscription_ids.is_empty()
                    || self.msg.expires_at.is_some()
                    || !p.subscription_identifiers.is_empty()
                    || p.topic_alias.is_some()))
    }
}
