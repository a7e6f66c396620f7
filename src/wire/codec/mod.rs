//! The wire codec: translates between [`Packet`] and MQTT 3.1, 3.1.1 and 5.0 bytes.
//!
//! This is the only module allowed to know about mqttbytes. After probing mqttbytes 0.6.0 (see
//! `docs/mqttbytes-0.6-notes.md`), the codec reads and writes every packet itself: the crate's v5
//! property parser keeps the last of duplicated properties and lets a property run past the
//! Property Length, its v4 SUBSCRIBE ignores reserved option bits, and its CONNECT, DISCONNECT,
//! UNSUBSCRIBE and CONNACK have the gaps listed in the notes. Fixing these after the fact would
//! mean re-parsing every packet anyway. mqttbytes stays in the test suite as an independent
//! decoder that our encodings must satisfy.
//!
//! Both directions are supported for every packet so that tests and test clients can round-trip.

mod connect;
mod packets;
mod properties;
mod shared;
mod wire;

#[cfg(test)]
mod tests;

pub use shared::{write_publish_header, PublishHeader};

use crate::wire::packet::{Packet, ProtocolVersion, ReasonCode};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;
use wire::{begin_len, end_len, scan_vbi, Reader, Vbi};

/// Why a frame could not be decoded; every variant closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Malformed Packet (v5 0x81): bad remaining length, bad flags, truncated fields, invalid
    /// UTF-8, QoS 3, ...
    Malformed(&'static str),
    /// Protocol Error (v5 0x82): well-formed but not allowed (e.g. empty SUBSCRIBE, a second
    /// CONNECT, duplicate property, subscription id 0, topic alias 0, first packet not CONNECT).
    Protocol(&'static str),
    /// The whole packet (fixed header + remaining length) exceeds the limit (v5 0x95). Raised as
    /// soon as the fixed header is readable, before the body arrives.
    TooLarge {
        /// Size of the whole packet as announced by its fixed header.
        size: usize,
        /// The limit it exceeded.
        max: usize,
    },
    /// CONNECT with protocol name "MQTT"/"MQIsdp" but a level we do not speak. The caller
    /// answers CONNACK 0x01 in 3.1.1 format.
    UnsupportedProtocolVersion(u8),
}

impl DecodeError {
    /// The v5 reason code for the DISCONNECT (or CONNACK) that reports it.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::Malformed(_) => ReasonCode::MALFORMED_PACKET,
            DecodeError::Protocol(_) => ReasonCode::PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocolVersion(_) => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Malformed(why) => write!(f, "malformed packet: {why}"),
            DecodeError::Protocol(why) => write!(f, "protocol error: {why}"),
            DecodeError::TooLarge { size, max } => {
                write!(f, "packet of {size} bytes exceeds the maximum of {max}")
            }
            DecodeError::UnsupportedProtocolVersion(level) => {
                write!(f, "unsupported protocol level {level}")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Why a packet could not be encoded; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// The encoded packet would exceed the peer's Maximum Packet Size (the caller drops it and
    /// counts it) [MQTT-3.1.2-24].
    TooLarge {
        /// Size the encoded packet would have.
        size: usize,
        /// The peer's limit.
        max: usize,
    },
    /// A string or binary field is longer than 65,535 bytes, or a value cannot be represented
    /// (remaining length > 268,435,455, QoS>0 with packet id 0, ...).
    Invalid(&'static str),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::TooLarge { size, max } => {
                write!(
                    f,
                    "packet of {size} bytes exceeds the peer's maximum of {max}"
                )
            }
            EncodeError::Invalid(why) => write!(f, "cannot encode packet: {why}"),
        }
    }
}

impl std::error::Error for EncodeError {}

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

/// Checks what the first byte alone can tell, so a bad stream is refused before its body is
/// buffered.
fn check_first_byte(byte1: u8, version: Option<ProtocolVersion>) -> Result<(), DecodeError> {
    let kind = byte1 >> 4;
    let flags = byte1 & 0x0F;
    match kind {
        0 => return Err(DecodeError::Malformed("packet type 0 is reserved")),
        AUTH if version.is_some_and(|v| !v.is_v5()) => {
            return Err(DecodeError::Malformed("AUTH does not exist before MQTT 5"))
        }
        PUBLISH => {
            if flags & 0b0110 == 0b0110 {
                return Err(DecodeError::Malformed("PUBLISH QoS 3 [MQTT-3.3.1-4]"));
            }
        }
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => {
            if flags != 0b0010 {
                return Err(DecodeError::Malformed(
                    "reserved header flags must be 0010 [MQTT-2.2.2-2]",
                ));
            }
        }
        _ => {
            if flags != 0 {
                return Err(DecodeError::Malformed(
                    "reserved header flags must be 0000 [MQTT-2.2.2-2]",
                ));
            }
        }
    }
    match (version, kind == CONNECT) {
        (None, true) | (Some(_), false) => Ok(()),
        (None, false) => Err(DecodeError::Protocol("first packet is not CONNECT")),
        (Some(_), true) => Err(DecodeError::Protocol("second CONNECT [MQTT-3.1.0-2]")),
    }
}

/// Decode one packet from the front of `buf`.
/// - Ok(None): the frame is incomplete; nothing consumed; the caller reads more bytes and calls
///   again.
/// - Ok(Some(p)): one complete frame consumed from `buf`.
/// - Err(e): the connection must be closed. Before CONNECT (`version` None) the frame is left
///   in `buf`, so that [`connect_version`] can still tell which version to answer in.
///
/// `version` is None until the client's CONNECT has been decoded: then the only acceptable
/// packet is CONNECT (anything else -> DecodeError::Protocol) and its protocol name and level
/// pick the version ("MQIsdp"/3 -> V31, "MQTT"/4 -> V311, "MQTT"/5 -> V5; other level with a
/// valid name -> UnsupportedProtocolVersion; any other name -> Protocol). When `version` is
/// Some(v), a CONNECT is DecodeError::Protocol("second CONNECT") [MQTT-3.1.0-2].
/// `max_packet_size` bounds the WHOLE packet size (fixed header included).
pub fn decode(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    check_first_byte(byte1, version)?;
    let (remaining, len_len) = match scan_vbi(&buf[1..])? {
        Vbi::Done(value, n) => (value, n),
        Vbi::Incomplete => return Ok(None),
    };
    let header = 1 + len_len;
    let size = header + remaining;
    if size > max_packet_size {
        return Err(DecodeError::TooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buf.len() < size {
        // No reserve for the announced size here: a peer could then make us allocate up to
        // the limit per connection with five bytes. Growing the buffer is the reader's policy.
        return Ok(None);
    }
    // From here the frame is complete: any shortfall inside it is Malformed (gap 1).
    let Some(v) = version else {
        // check_first_byte let only CONNECT through. Decoded from a copy (once per
        // connection) and consumed only when valid: see `connect_version`.
        let c = connect::decode_connect(Reader::new(Bytes::copy_from_slice(&buf[header..size])))?;
        buf.advance(size);
        return Ok(Some(Packet::Connect(Box::new(c))));
    };
    // The body is frozen so that the PUBLISH payload is a zero-copy slice of it.
    buf.advance(header);
    let body = Reader::new(buf.split_to(remaining).freeze());
    let flags = byte1 & 0x0F;
    let packet = match byte1 >> 4 {
        CONNACK => Packet::ConnAck(connect::decode_connack(body, v)?),
        PUBLISH => Packet::Publish(packets::decode_publish(body, flags, v)?),
        PUBACK => Packet::PubAck(packets::decode_ack(body, v, packets::PUBACK_REASONS)?),
        PUBREC => Packet::PubRec(packets::decode_ack(body, v, packets::PUBACK_REASONS)?),
        PUBREL => Packet::PubRel(packets::decode_ack(body, v, packets::PUBREL_REASONS)?),
        PUBCOMP => Packet::PubComp(packets::decode_ack(body, v, packets::PUBREL_REASONS)?),
        SUBSCRIBE => Packet::Subscribe(packets::decode_subscribe(body, v)?),
        SUBACK => Packet::SubAck(packets::decode_suback(body, v)?),
        UNSUBSCRIBE => Packet::Unsubscribe(packets::decode_unsubscribe(body, v)?),
        UNSUBACK => Packet::UnsubAck(packets::decode_unsuback(body, v)?),
        PINGREQ => {
            body.finish()?;
            Packet::PingReq
        }
        PINGRESP => {
            body.finish()?;
            Packet::PingResp
        }
        DISCONNECT => Packet::Disconnect(packets::decode_disconnect(body, v)?),
        AUTH => Packet::Auth(packets::decode_auth(body)?),
        // CONNECT and type 0 were refused by check_first_byte.
        _ => return Err(DecodeError::Protocol("unexpected packet type")),
    };
    Ok(Some(packet))
}

/// The version of the CONNECT at the front of `buf`, read from its protocol name and level
/// alone; `None` when those bytes are not there or name no version tether speaks.
///
/// After `decode` refused a CONNECT (which it leaves in `buf`), this tells whether the client
/// speaks v5 and may be told why in a CONNACK (section 4.13) rather than just disconnected.
pub fn connect_version(buf: &[u8]) -> Option<ProtocolVersion> {
    if buf.first()? >> 4 != CONNECT {
        return None;
    }
    let Ok(Vbi::Done(_, n)) = scan_vbi(buf.get(1..)?) else {
        return None;
    };
    let rest = buf.get(1 + n..)?;
    let name_len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    let name = rest.get(2..2 + name_len)?;
    let level = *rest.get(2 + name_len)?;
    connect::protocol_of(name, level).ok()
}

/// Append the encoding of `packet` for a peer speaking `version` to `out`. On error NOTHING is
/// appended. `max_packet_size` is the peer's maximum (None = protocol maximum). Returns the
/// number of bytes written.
///
/// A packet over the peer's maximum is encoded again without its Reason String, then also
/// without its User Properties: the spec forbids sending either when it would make the packet
/// exceed the maximum (CONNACK [MQTT-3.2.2-19, MQTT-3.2.2-20], PUBACK to PUBCOMP, SUBACK,
/// DISCONNECT likewise), while the rest of the packet carries what the receiver needs. A PUBLISH
/// is never trimmed (its User Properties belong to the message): it stays `TooLarge`, for the
/// caller to drop [MQTT-3.1.2-25].
///
/// Version-specific fields are dropped or mapped where the older protocol has no room for them
/// (3.1.1 CONNACK return codes and SUBACK failure codes, no properties or ack reasons). For
/// CONNECT, `Connect::protocol` must equal `version`.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    max_packet_size: Option<usize>,
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    let start = out.len();
    let max = max_packet_size.unwrap_or(usize::MAX);
    let mut result = encode_unchecked(packet, version, max, out);
    for drop_users in [false, true] {
        if !matches!(result, Err(EncodeError::TooLarge { .. })) {
            break;
        }
        if let Some(smaller) = without_optional(packet, drop_users) {
            out.truncate(start);
            result = encode_unchecked(&smaller, version, max, out);
        }
    }
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// `packet` without its Reason String (and, with `drop_users`, without its User Properties
/// too); `None` when it has nothing of the kind to leave out.
fn without_optional(packet: &Packet, drop_users: bool) -> Option<Packet> {
    if !matches!(
        packet,
        Packet::ConnAck(_)
            | Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubRel(_)
            | Packet::PubComp(_)
            | Packet::SubAck(_)
            | Packet::Disconnect(_)
    ) {
        return None;
    }
    let mut p = packet.clone();
    let (reason_string, users) = match &mut p {
        Packet::ConnAck(c) => (
            &mut c.properties.reason_string,
            Some(&mut c.properties.user_properties),
        ),
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            (&mut a.reason_string, Some(&mut a.user_properties))
        }
        Packet::SubAck(s) => (&mut s.reason_string, None),
        Packet::Disconnect(d) => (&mut d.reason_string, Some(&mut d.user_properties)),
        _ => return None,
    };
    let mut changed = reason_string.take().is_some();
    if let (true, Some(users)) = (drop_users, users) {
        changed |= !users.is_empty();
        users.clear();
    }
    changed.then_some(p)
}

/// Writes the packet, possibly leaving a partial frame behind on error (`encode` truncates).
fn encode_unchecked(
    packet: &Packet,
    version: ProtocolVersion,
    max: usize,
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    let start = out.len();
    let byte1 = match packet {
        Packet::Connect(_) => CONNECT << 4,
        Packet::ConnAck(_) => CONNACK << 4,
        Packet::Publish(p) => packets::publish_first_byte(p),
        Packet::PubAck(_) => PUBACK << 4,
        Packet::PubRec(_) => PUBREC << 4,
        Packet::PubRel(_) => (PUBREL << 4) | 0b0010,
        Packet::PubComp(_) => PUBCOMP << 4,
        Packet::Subscribe(_) => (SUBSCRIBE << 4) | 0b0010,
        Packet::SubAck(_) => SUBACK << 4,
        Packet::Unsubscribe(_) => (UNSUBSCRIBE << 4) | 0b0010,
        Packet::UnsubAck(_) => UNSUBACK << 4,
        Packet::PingReq => PINGREQ << 4,
        Packet::PingResp => PINGRESP << 4,
        Packet::Disconnect(_) => DISCONNECT << 4,
        Packet::Auth(_) => AUTH << 4,
    };
    // The payload is appended after the length is known and checked, so an oversized PUBLISH
    // costs no copy of its payload.
    let mut payload: &[u8] = &[];
    if let Packet::Publish(p) = packet {
        out.reserve(p.topic.len() + p.payload.len() + 16);
    }
    out.put_u8(byte1);
    let len_pos = begin_len(out);
    match packet {
        Packet::Connect(c) => connect::encode_connect(c, version, out)?,
        Packet::ConnAck(c) => connect::encode_connack(c, version, out)?,
        Packet::Publish(p) => {
            packets::encode_publish_header(p, version, out)?;
            payload = &p.payload;
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            packets::encode_ack(a, version, out)?
        }
        Packet::Subscribe(s) => packets::encode_subscribe(s, version, out)?,
        Packet::SubAck(s) => packets::encode_suback(s, version, out)?,
        Packet::Unsubscribe(u) => packets::encode_unsubscribe(u, version, out)?,
        Packet::UnsubAck(u) => packets::encode_unsuback(u, version, out)?,
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => packets::encode_disconnect(d, version, out)?,
        Packet::Auth(a) => {
            if !version.is_v5() {
                return Err(EncodeError::Invalid("AUTH does not exist before MQTT 5"));
            }
            packets::encode_auth(a, out)?
        }
    }
    end_len(out, len_pos, payload.len())?;
    let size = out.len() - start + payload.len();
    if size > max {
        return Err(EncodeError::TooLarge { size, max });
    }
    out.extend_from_slice(payload);
    Ok(size)
}
