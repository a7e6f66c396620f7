//! The on-disk record format: what one log record says, and its byte encoding.
//!
//! Files and blocks are framed by `frame`. A block body is a sequence
//! of records `[len: varint][payload]`, and a payload starts with a tag byte naming the record
//! kind. A block is what the writer wrote in one go (one group commit, or up to
//! `BLOCK_TARGET`), so the checksum is computed once per write, on the writer thread, not per
//! record on the connections' threads. Integers in records are LEB128 varints; strings and
//! byte strings carry a varint length. Times are wall-clock milliseconds since the Unix epoch,
//! because monotonic instants mean nothing to the next process.

use std::sync::Arc;

use bytes::Bytes;

use super::frame::{open_block, seal_block, BLOCK_HEADER, BLOCK_TARGET};
use crate::session::journal::{from_wall, to_wall, SessionImage};
use crate::session::{OutState, Subscription};
use crate::wire::message::{Delivery, Message};
use crate::wire::packet::{ProtocolVersion, PublishProperties, QoS, RetainHandling, Will};

/// One log record. Sessions are named by their incarnation, which is unique in the store:
/// the `Session` record maps it to the Client ID, so the records written per message and per
/// delivery do not repeat the Client ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Create or update a session (a new incarnation replaces the old session entirely).
    Session(Box<SessionImage>),
    /// The session ended; its state is gone.
    SessionEnd {
        /// Which session.
        incarnation: u64,
    },
    /// An application message, written once per log segment however many durable sessions
    /// it is queued for: their `Enqueue` records refer to it by `id`, and always in the same
    /// segment, so a segment never depends on an older one that compaction may have dropped.
    Message {
        /// Its number, unique in the store.
        id: u64,
        /// The message.
        msg: Arc<Message>,
    },
    /// Message `msg` entered the session's queue as number `seq`.
    Enqueue {
        /// Which session.
        incarnation: u64,
        /// Position in the session's queue, increasing.
        seq: u64,
        /// The `Message` record (earlier in the same segment).
        msg: u64,
        /// QoS of this delivery.
        qos: QoS,
        /// RETAIN flag of this delivery.
        retain: bool,
        /// Subscription Identifiers of this delivery.
        subscription_ids: Vec<u32>,
    },
    /// Message `seq` is in flight with this packet id and state.
    Sent {
        /// Which session.
        incarnation: u64,
        /// The queue entry.
        seq: u64,
        /// Its packet identifier.
        packet_id: u16,
        /// Its QoS flow state.
        state: OutState,
    },
    /// Message `seq` is finished (acknowledged, refused, dropped).
    Done {
        /// Which session.
        incarnation: u64,
        /// The queue entry.
        seq: u64,
    },
    /// Entries `first .. first + count` are in flight as consecutive packet ids from
    /// `packet_id` (wrapping from 65,535 to 1), all in `state`: what `count` `Sent` records in
    /// a row would say, as a session sends its queue in order.
    SentRange {
        /// Which session.
        incarnation: u64,
        /// The first queue entry.
        first: u64,
        /// How many entries.
        count: u64,
        /// The packet identifier of the first.
        packet_id: u16,
        /// Their QoS flow state.
        state: OutState,
    },
    /// Entries `first .. first + count` are finished: what `count` `Done` records in a row
    /// would say, as a client acknowledges in order.
    DoneRange {
        /// Which session.
        incarnation: u64,
        /// The first queue entry.
        first: u64,
        /// How many entries.
        count: u64,
    },
    /// An inbound QoS 2 packet id was PUBREC'd (or, `added = false`, released by PUBREL).
    Inbound {
        /// Which session.
        incarnation: u64,
        /// The packet id.
        packet_id: u16,
        /// Added (PUBREC) or removed (PUBREL).
        added: bool,
    },
    /// A retained message set (the message's topic).
    RetainSet(Arc<Message>),
    /// The retained message of a topic deleted.
    RetainDel(String),
}

const T_SESSION: u8 = 1;
const T_SESSION_END: u8 = 2;
const T_ENQUEUE: u8 = 3;
const T_SENT: u8 = 4;
const T_DONE: u8 = 5;
const T_INBOUND: u8 = 6;
const T_RETAIN_SET: u8 = 7;
const T_RETAIN_DEL: u8 = 8;
const T_MESSAGE: u8 = 9;
const T_SENT_RANGE: u8 = 10;
const T_DONE_RANGE: u8 = 11;

/// The packet identifier `i` places after `first`, wrapping from 65,535 to 1 as a session
/// allocates them.
pub fn packet_id_after(first: u16, i: u64) -> u16 {
    let zero_based = (u64::from(first.max(1)) - 1 + i) % 65_535;
    zero_based as u16 + 1
}

/// A record that does not decode: the frame passed its CRC, so this means a bug or a
/// different format, not a torn write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "undecodable record: {}", self.0)
    }
}

/// Append `rec` to `out` as one record of a block: its length (varint), then its payload.
pub fn encode_record(rec: &Record, out: &mut Vec<u8>) {
    framed(out, |o| encode(rec, o));
}

/// A `Message` record of `msg` as `encode_record` writes it, without building the record.
pub fn encode_message_record(id: u64, msg: &Message, out: &mut Vec<u8>) {
    framed(out, |o| put_message_record(o, id, msg));
}

/// An `Enqueue` record of delivery `d` as `encode_record` writes it, without building the
/// record (no copy of its subscription identifiers).
pub fn encode_enqueue_record(incarnation: u64, msg: u64, d: &Delivery, out: &mut Vec<u8>) {
    framed(out, |o| {
        put_enqueue_record(
            o,
            incarnation,
            d.seq,
            msg,
            d.qos,
            d.retain,
            &d.subscription_ids,
        )
    });
}

/// Write a payload with `payload` behind its length.
fn framed(out: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    // One byte is reserved for the length, which is all that records under 128 bytes (most
    // of them) need; a longer one moves its payload up to make room.
    out.push(0);
    payload(out);
    let len = out.len() - at - 1;
    if len < 0x80 {
        out[at] = len as u8;
    } else {
        let mut v = Vec::with_capacity(5);
        put_u64(&mut v, len as u64);
        out.splice(at..at + 1, v);
    }
}

/// Append `records` to `out` as sealed blocks of about `BLOCK_TARGET` bytes: what
/// compaction writes. `spill` is handed `out` after each full block (compaction writes it to
/// the file and clears it, so the snapshot never sits whole in memory); the last block is
/// left in `out`.
pub fn encode_blocks<E>(
    records: impl IntoIterator<Item = Record>,
    out: &mut Vec<u8>,
    mut spill: impl FnMut(&mut Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    let mut at = open_block(out);
    for rec in records {
        encode_record(&rec, out);
        if out.len() - at >= BLOCK_TARGET {
            let end = out.len();
            seal_block(out, at, end);
            spill(out)?;
            at = open_block(out);
        }
    }
    let end = out.len();
    if end == at + BLOCK_HEADER {
        out.truncate(at);
    } else {
        seal_block(out, at, end);
    }
    Ok(())
}

fn put_u16(o: &mut Vec<u8>, v: u16) {
    o.extend_from_slice(&v.to_le_bytes());
}
// Integers inside records are LEB128 varints: sequence numbers, incarnations and lengths are
// mostly small, and every delivery writes three records, so fixed 8-byte fields were a fifth of
// the bytes the log (and its fsyncs) had to carry.
fn put_u32(o: &mut Vec<u8>, v: u32) {
    put_u64(o, u64::from(v));
}
fn put_u64(o: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        o.push((v as u8) | 0x80);
        v >>= 7;
    }
    o.push(v as u8);
}
fn put_bytes(o: &mut Vec<u8>, b: &[u8]) {
    put_u32(o, u32::try_from(b.len()).unwrap_or(u32::MAX));
    o.extend_from_slice(b);
}
fn put_opt_bytes(o: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => o.push(0),
        Some(b) => {
            o.push(1);
            put_bytes(o, b);
        }
    }
}
fn put_opt_u32(o: &mut Vec<u8>, v: Option<u32>) {
    match v {
        None => o.push(0),
        Some(v) => {
            o.push(1);
            put_u32(o, v);
        }
    }
}

fn put_props(o: &mut Vec<u8>, p: &PublishProperties) {
    put_opt_u32(o, p.payload_format_indicator.map(u32::from));
    put_opt_u32(o, p.message_expiry_interval);
    put_opt_bytes(o, p.response_topic.as_deref().map(str::as_bytes));
    put_opt_bytes(o, p.correlation_data.as_deref());
    put_u32(o, u32::try_from(p.user_properties.len()).unwrap_or(0));
    for (k, v) in &p.user_properties {
        put_bytes(o, k.as_bytes());
        put_bytes(o, v.as_bytes());
    }
    put_opt_bytes(o, p.content_type.as_deref().map(str::as_bytes));
}

fn put_message(o: &mut Vec<u8>, m: &Message) {
    put_bytes(o, m.topic.as_bytes());
    put_bytes(o, &m.payload);
    o.push(m.qos as u8);
    o.push(u8::from(m.retain));
    put_props(o, &m.properties);
    // 0 = no expiry; a real expiry time is never the epoch.
    put_u64(o, m.expires_at.map(to_wall).map_or(0, |w| w.max(1)));
    put_opt_bytes(o, m.publisher.as_deref().map(str::as_bytes));
}

fn put_will(o: &mut Vec<u8>, w: &Will) {
    put_bytes(o, w.topic.as_bytes());
    put_bytes(o, &w.payload);
    o.push(w.qos as u8);
    o.push(u8::from(w.retain));
    put_u32(o, w.delay_interval);
    put_props(o, &w.properties);
}

fn put_message_record(o: &mut Vec<u8>, id: u64, msg: &Message) {
    o.push(T_MESSAGE);
    put_u64(o, id);
    put_message(o, msg);
}

fn put_enqueue_record(
    o: &mut Vec<u8>,
    incarnation: u64,
    seq: u64,
    msg: u64,
    qos: QoS,
    retain: bool,
    subscription_ids: &[u32],
) {
    o.push(T_ENQUEUE);
    put_u64(o, incarnation);
    put_u64(o, seq);
    put_u64(o, msg);
    o.push(qos as u8 | u8::from(retain) << 2);
    put_u32(o, u32::try_from(subscription_ids.len()).unwrap_or(0));
    for id in subscription_ids {
        put_u32(o, *id);
    }
}

fn state_byte(s: OutState) -> u8 {
    match s {
        OutState::AwaitPubAck => 0,
        OutState::AwaitPubRec => 1,
        OutState::AwaitPubComp => 2,
    }
}

fn encode(rec: &Record, o: &mut Vec<u8>) {
    match rec {
        Record::Session(m) => {
            o.push(T_SESSION);
            put_bytes(o, m.client_id.as_bytes());
            put_u64(o, m.incarnation);
            o.push(m.protocol.level());
            put_u32(o, m.expiry_interval);
            put_u64(o, m.disconnected_at.map_or(0, |w| w.max(1)));
            match &m.will {
                None => o.push(0),
                Some(w) => {
                    o.push(1);
                    put_will(o, w);
                }
            }
            put_u32(o, u32::try_from(m.subscriptions.len()).unwrap_or(0));
            for (filter, s) in &m.subscriptions {
                put_bytes(o, filter.as_bytes());
                o.push(s.qos as u8);
                let handling = match s.retain_handling {
                    RetainHandling::OnSubscribe => 0,
                    RetainHandling::OnNewSubscribe => 1,
                    RetainHandling::Never => 2,
                };
                o.push(u8::from(s.no_local) | u8::from(s.retain_as_published) << 1 | handling << 2);
                put_opt_u32(o, s.identifier);
            }
        }
        Record::SessionEnd { incarnation } => {
            o.push(T_SESSION_END);
            put_u64(o, *incarnation);
        }
        Record::Message { id, msg } => put_message_record(o, *id, msg),
        Record::Enqueue {
            incarnation,
            seq,
            msg,
            qos,
            retain,
            subscription_ids,
        } => put_enqueue_record(o, *incarnation, *seq, *msg, *qos, *retain, subscription_ids),
        Record::Sent {
            incarnation,
            seq,
            packet_id,
            state,
        } => {
            o.push(T_SENT);
            put_u64(o, *incarnation);
            put_u64(o, *seq);
            put_u16(o, *packet_id);
            o.push(state_byte(*state));
        }
        Record::SentRange {
            incarnation,
            first,
            count,
            packet_id,
            state,
        } => {
            o.push(T_SENT_RANGE);
            put_u64(o, *incarnation);
            put_u64(o, *first);
            put_u64(o, *count);
            put_u16(o, *packet_id);
            o.push(state_byte(*state));
        }
        Record::DoneRange {
            incarnation,
            first,
            count,
        } => {
            o.push(T_DONE_RANGE);
            put_u64(o, *incarnation);
            put_u64(o, *first);
            put_u64(o, *count);
        }
        Record::Done { incarnation, seq } => {
            o.push(T_DONE);
            put_u64(o, *incarnation);
            put_u64(o, *seq);
        }
        Record::Inbound {
            incarnation,
            packet_id,
            added,
        } => {
            o.push(T_INBOUND);
            put_u64(o, *incarnation);
            put_u16(o, *packet_id);
            o.push(u8::from(*added));
        }
        Record::RetainSet(m) => {
            o.push(T_RETAIN_SET);
            put_message(o, m);
        }
        Record::RetainDel(topic) => {
            o.push(T_RETAIN_DEL);
            put_bytes(o, topic.as_bytes());
        }
    }
}

/// A cursor over a record payload; every read checks bounds.
struct Rd<'a> {
    b: &'a [u8],
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError("truncated field"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        u32::try_from(self.u64()?).map_err(|_| DecodeError("integer out of range"))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError("varint too long"))
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| DecodeError("invalid UTF-8"))
    }
    fn opt_bytes(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.bytes()?)),
            _ => Err(DecodeError("bad option tag")),
        }
    }
    fn opt_string(&mut self) -> Result<Option<String>, DecodeError> {
        self.opt_bytes()?
            .map(|b| String::from_utf8(b.to_vec()).map_err(|_| DecodeError("invalid UTF-8")))
            .transpose()
    }
    fn opt_u32(&mut self) -> Result<Option<u32>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u32()?)),
            _ => Err(DecodeError("bad option tag")),
        }
    }
    fn qos(&mut self) -> Result<QoS, DecodeError> {
        QoS::from_u8(self.u8()?).ok_or(DecodeError("bad QoS"))
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError("bad boolean")),
        }
    }
    fn out_state(&mut self) -> Result<OutState, DecodeError> {
        match self.u8()? {
            0 => Ok(OutState::AwaitPubAck),
            1 => Ok(OutState::AwaitPubRec),
            2 => Ok(OutState::AwaitPubComp),
            _ => Err(DecodeError("bad inflight state")),
        }
    }
    fn client(&mut self) -> Result<Arc<str>, DecodeError> {
        Ok(self.string()?.into())
    }
    fn props(&mut self) -> Result<PublishProperties, DecodeError> {
        let payload_format_indicator = self
            .opt_u32()?
            .map(|v| u8::try_from(v).map_err(|_| DecodeError("bad format indicator")))
            .transpose()?;
        let message_expiry_interval = self.opt_u32()?;
        let response_topic = self.opt_string()?;
        let correlation_data = self.opt_bytes()?.map(Bytes::copy_from_slice);
        let n = self.u32()? as usize;
        let mut user_properties = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            user_properties.push((self.string()?, self.string()?));
        }
        let content_type = self.opt_string()?;
        Ok(PublishProperties {
            payload_format_indicator,
            message_expiry_interval,
            topic_alias: None,
            response_topic,
            correlation_data,
            user_properties,
            subscription_identifiers: Vec::new(),
            content_type,
        })
    }
    fn message(&mut self) -> Result<Message, DecodeError> {
        let topic = self.string()?;
        let payload = Bytes::copy_from_slice(self.bytes()?);
        let qos = self.qos()?;
        let retain = self.bool()?;
        let properties = self.props()?;
        let expires = self.u64()?;
        let publisher = self.opt_string()?.map(Arc::from);
        Ok(Message {
            topic,
            payload,
            qos,
            retain,
            properties,
            expires_at: (expires != 0).then(|| from_wall(expires)),
            publisher,
            stored: Default::default(),
            encoded: Default::default(),
        })
    }
    fn will(&mut self) -> Result<Will, DecodeError> {
        Ok(Will {
            topic: self.string()?,
            payload: Bytes::copy_from_slice(self.bytes()?),
            qos: self.qos()?,
            retain: self.bool()?,
            delay_interval: self.u32()?,
            properties: self.props()?,
        })
    }
}

/// If `payload` is a `Message` record: its id and where its message starts in `payload`
/// (replay decodes a message only if an entry still needs it at the end of its file).
pub fn message_record(payload: &[u8]) -> Option<Result<(u64, usize), DecodeError>> {
    if payload.first() != Some(&T_MESSAGE) {
        return None;
    }
    let mut r = Rd { b: &payload[1..] };
    Some(r.u64().map(|id| (id, payload.len() - r.b.len())))
}

/// Decode the message of a `Message` record (from the offset `message_record` gave).
pub fn decode_message(b: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Rd { b };
    let m = r.message()?;
    if !r.b.is_empty() {
        return Err(DecodeError("trailing bytes"));
    }
    Ok(m)
}

/// Decode one record payload (the CRC was checked by the caller).
pub fn decode(payload: &[u8]) -> Result<Record, DecodeError> {
    let mut r = Rd { b: payload };
    let rec = match r.u8()? {
        T_SESSION => {
            let client_id = r.client()?;
            let incarnation = r.u64()?;
            let protocol = match r.u8()? {
                3 => ProtocolVersion::V31,
                4 => ProtocolVersion::V311,
                5 => ProtocolVersion::V5,
                _ => return Err(DecodeError("bad protocol level")),
            };
            let expiry_interval = r.u32()?;
            let disc = r.u64()?;
            let will = match r.u8()? {
                0 => None,
                1 => Some(r.will()?),
                _ => return Err(DecodeError("bad option tag")),
            };
            let n = r.u32()? as usize;
            let mut subscriptions = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let filter = r.string()?;
                let qos = r.qos()?;
                let flags = r.u8()?;
                let retain_handling = match flags >> 2 {
                    0 => RetainHandling::OnSubscribe,
                    1 => RetainHandling::OnNewSubscribe,
                    2 => RetainHandling::Never,
                    _ => return Err(DecodeError("bad retain handling")),
                };
                let identifier = r.opt_u32()?;
                subscriptions.push((
                    filter,
                    Subscription {
                        qos,
                        no_local: flags & 1 != 0,
                        retain_as_published: flags & 2 != 0,
                        retain_handling,
                        identifier,
                    },
                ));
            }
            Record::Session(Box::new(SessionImage {
                client_id,
                incarnation,
                protocol,
                expiry_interval,
                disconnected_at: (disc != 0).then_some(disc),
                will,
                subscriptions,
            }))
        }
        T_SESSION_END => Record::SessionEnd {
            incarnation: r.u64()?,
        },
        T_MESSAGE => Record::Message {
            id: r.u64()?,
            msg: Arc::new(r.message()?),
        },
        T_ENQUEUE => {
            let incarnation = r.u64()?;
            let seq = r.u64()?;
            let msg = r.u64()?;
            let flags = r.u8()?;
            if flags & !0b111 != 0 {
                return Err(DecodeError("bad delivery flags"));
            }
            let qos = QoS::from_u8(flags & 0b11).ok_or(DecodeError("bad QoS"))?;
            let n = r.u32()? as usize;
            let mut subscription_ids = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                subscription_ids.push(r.u32()?);
            }
            Record::Enqueue {
                incarnation,
                seq,
                msg,
                qos,
                retain: flags & 0b100 != 0,
                subscription_ids,
            }
        }
        T_SENT => Record::Sent {
            incarnation: r.u64()?,
            seq: r.u64()?,
            packet_id: r.u16()?,
            state: r.out_state()?,
        },
        T_DONE => Record::Done {
            incarnation: r.u64()?,
            seq: r.u64()?,
        },
        T_INBOUND => Record::Inbound {
            incarnation: r.u64()?,
            packet_id: r.u16()?,
            added: r.bool()?,
        },
        T_RETAIN_SET => Record::RetainSet(Arc::new(r.message()?)),
        T_RETAIN_DEL => Record::RetainDel(r.string()?),
        T_SENT_RANGE => Record::SentRange {
            incarnation: r.u64()?,
            first: r.u64()?,
            count: r.u64()?,
            packet_id: r.u16()?,
            state: r.out_state()?,
        },
        T_DONE_RANGE => Record::DoneRange {
            incarnation: r.u64()?,
            first: r.u64()?,
            count: r.u64()?,
        },
        _ => return Err(DecodeError("unknown record tag")),
    };
    if !r.b.is_empty() {
        return Err(DecodeError("trailing bytes"));
    }
    Ok(rec)
}

/// The record payloads of a block body (whose CRC was checked). A length that overruns the
/// body is an error: the checksum held, so this is no torn write.
pub fn records(body: &[u8]) -> impl Iterator<Item = Result<&[u8], DecodeError>> {
    let mut r = Rd { b: body };
    std::iter::from_fn(move || {
        if r.b.is_empty() {
            return None;
        }
        let rec = r.u64().and_then(|n| {
            usize::try_from(n)
                .map_err(|_| DecodeError("record length out of range"))
                .and_then(|n| r.take(n))
        });
        if rec.is_err() {
            r.b = &[];
        }
        Some(rec)
    })
}

#[cfg(test)]
mod tests {
    use super::super::frame::{next_block, Block};
    use super::*;
    use crate::testutil::delivery;

    /// Varint edges: 0, the one- and two-byte boundary, and the largest values.
    #[test]
    fn integers_round_trip_at_their_edges() {
        for v in [0, 127, 128, 16_383, 16_384, u64::from(u32::MAX), u64::MAX] {
            let rec = Record::Done {
                incarnation: v,
                seq: u64::MAX - v,
            };
            let mut o = Vec::new();
            encode(&rec, &mut o);
            match decode(&o) {
                Ok(Record::Done { incarnation, seq }) => {
                    assert_eq!((incarnation, seq), (v, u64::MAX - v))
                }
                other => panic!("{other:?}"),
            }
        }
        // Eleven continuation bytes are not a u64.
        let mut o = vec![T_DONE];
        o.extend_from_slice(&[0xff; 11]);
        assert!(decode(&o).is_err());
    }

    fn sample_records() -> Vec<Record> {
        let mut d = delivery(QoS::ExactlyOnce, b"payload");
        {
            let m = Arc::make_mut(&mut d.msg);
            m.properties.user_properties = vec![("k".into(), "v".into())];
            m.properties.content_type = Some("text/plain".into());
            m.properties.correlation_data = Some(Bytes::from_static(b"\x00\x01"));
            m.publisher = Some("pub".into());
        }
        vec![
            Record::Session(Box::new(SessionImage {
                client_id: "c".into(),
                incarnation: 3,
                protocol: ProtocolVersion::V5,
                expiry_interval: 60,
                disconnected_at: Some(1234),
                will: Some(Will {
                    topic: "w".into(),
                    payload: Bytes::from_static(b"bye"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    delay_interval: 5,
                    properties: PublishProperties::default(),
                }),
                subscriptions: vec![(
                    "a/#".into(),
                    Subscription {
                        qos: QoS::ExactlyOnce,
                        no_local: true,
                        retain_as_published: false,
                        retain_handling: RetainHandling::Never,
                        identifier: Some(7),
                    },
                )],
            })),
            Record::Message {
                id: 1 << 50,
                msg: d.msg.clone(),
            },
            Record::Enqueue {
                incarnation: 3,
                seq: 17,
                msg: 1 << 50,
                qos: QoS::ExactlyOnce,
                retain: true,
                subscription_ids: vec![4, 9],
            },
            Record::Sent {
                incarnation: 3,
                seq: 17,
                packet_id: 9,
                state: OutState::AwaitPubComp,
            },
            Record::Done {
                incarnation: 3,
                seq: 17,
            },
            Record::SentRange {
                incarnation: 3,
                first: 18,
                count: 40,
                packet_id: 65_530,
                state: OutState::AwaitPubAck,
            },
            Record::DoneRange {
                incarnation: 3,
                first: 18,
                count: 40,
            },
            Record::Inbound {
                incarnation: 3,
                packet_id: 5,
                added: true,
            },
            Record::RetainSet(Arc::new(Message {
                payload: Bytes::from(vec![7u8; 300]),
                ..(*d.msg).clone()
            })),
            Record::RetainDel("a/b".into()),
            Record::SessionEnd { incarnation: 3 },
        ]
    }

    fn read_all(mut buf: &[u8]) -> Result<Vec<Record>, String> {
        let mut out = Vec::new();
        loop {
            match next_block(buf) {
                Block::End => return Ok(out),
                Block::Bad(why) => return Err(why.to_string()),
                Block::Ok(body, n) => {
                    for rec in records(body) {
                        out.push(
                            decode(rec.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?,
                        );
                    }
                    buf = &buf[n..];
                }
            }
        }
    }

    /// Every record kind survives encoding, including one long enough (the 300-byte retained
    /// payload) for a multi-byte length.
    #[test]
    fn records_round_trip() {
        let recs = sample_records();
        let mut buf = Vec::new();
        encode_blocks(recs.clone(), &mut buf, |_| Ok::<(), ()>(())).expect("no spill error");
        assert_eq!(read_all(&buf).unwrap(), recs);
    }

    /// Blocks close past BLOCK_TARGET, and a flipped bit or a cut anywhere is detected.
    #[test]
    fn blocks_split_and_detect_damage() {
        let big = Record::RetainSet(Arc::new(Message {
            payload: Bytes::from(vec![1u8; BLOCK_TARGET / 3]),
            ..(*delivery(QoS::AtLeastOnce, b"").msg).clone()
        }));
        let recs: Vec<Record> = (0..7).map(|_| big.clone()).collect();
        let mut buf = Vec::new();
        encode_blocks(recs.clone(), &mut buf, |_| Ok::<(), ()>(())).expect("no spill error");
        let mut blocks = 0;
        let mut at = 0;
        while let Block::Ok(_, n) = next_block(&buf[at..]) {
            blocks += 1;
            at += n;
        }
        assert_eq!(
            blocks, 3,
            "three records of a third of the target per block, then a fourth"
        );
        assert_eq!(read_all(&buf).unwrap(), recs);

        let mut small = Vec::new();
        encode_blocks(sample_records(), &mut small, |_| Ok::<(), ()>(())).expect("no spill error");
        let mut bad = small.clone();
        bad[BLOCK_HEADER + 3] ^= 1;
        assert_eq!(read_all(&bad).unwrap_err(), "checksum mismatch");
        assert_eq!(read_all(&small[..5]).unwrap_err(), "partial block header");
        assert_eq!(
            read_all(&small[..small.len() - 1]).unwrap_err(),
            "block cut short"
        );
        // A checksum-valid body whose record length overruns it is an error, not a tear.
        let mut body = vec![0u8; BLOCK_HEADER];
        body.extend_from_slice(&[5, T_DONE, 1]);
        let end = body.len();
        seal_block(&mut body, 0, end);
        assert!(read_all(&body).is_err());
    }
}
