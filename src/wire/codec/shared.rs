//! The part of a PUBLISH that many deliveries of one message share: everything before the
//! payload, encoded once, with the per-delivery fields (DUP, QoS, RETAIN, packet id) written
//! into each copy. Fan-out then costs a copy of a few dozen header bytes per subscriber, not an
//! encode, and the payload can go to the socket from the message's own buffer.

use bytes::{BufMut, BytesMut};

use super::packets::{encode_publish_fields, first_byte};
use super::wire::{begin_len, end_len, vbi_len};
use super::EncodeError;
use crate::wire::packet::{ProtocolVersion, PublishProperties, QoS};

/// Append one delivery's PUBLISH header straight to `out`, keeping nothing: for a message no
/// other delivery will share (encoding it to keep would cost an allocation for nobody). The
/// same bytes as a `PublishHeader` written with these flags; returns the size of the whole
/// packet. Nothing is appended when it fails, or when the packet would exceed `max`.
#[allow(clippy::too_many_arguments)] // the fields of one PUBLISH, without building one
pub fn write_publish_header(
    topic: &str,
    properties: &PublishProperties,
    payload_len: usize,
    (dup, qos, retain): (bool, QoS, bool),
    packet_id: u16,
    version: ProtocolVersion,
    max: Option<usize>,
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    let start = out.len();
    let written = (|| {
        let id = match qos {
            QoS::AtMostOnce => None,
            _ if packet_id == 0 => return Err(EncodeError::Invalid("packet identifier 0")),
            _ => Some(packet_id),
        };
        out.put_u8(first_byte(dup, qos, retain));
        let len_pos = begin_len(out);
        encode_publish_fields(topic, id, properties, version, out)?;
        end_len(out, len_pos, payload_len)?;
        let size = out.len() - start + payload_len;
        match max {
            Some(max) if size > max => Err(EncodeError::TooLarge { size, max }),
            _ => Ok(size),
        }
    })();
    if written.is_err() {
        out.truncate(start);
    }
    written
}

/// A PUBLISH fixed header, topic, packet id slot and (v5) properties, encoded for one payload
/// length. Which deliveries may share it is the caller's to decide: only those whose PUBLISH
/// would carry exactly these properties (no Subscription Identifiers, no Message Expiry
/// Interval counting down, no Topic Alias of their connection's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishHeader {
    bytes: Box<[u8]>,
    /// Where the packet id goes; 0 when the header has none (QoS 0).
    id_at: u32,
    /// Bytes of the whole packet, payload included.
    size: u32,
}

impl PublishHeader {
    /// Encode the header of a PUBLISH of `topic` with `properties` and a payload of
    /// `payload_len` bytes, for QoS 1/2 (`with_id`, room for a packet id) or QoS 0.
    pub fn encode(
        topic: &str,
        properties: &PublishProperties,
        payload_len: usize,
        with_id: bool,
        version: ProtocolVersion,
    ) -> Result<PublishHeader, EncodeError> {
        let mut out = BytesMut::with_capacity(topic.len() + 16);
        out.put_u8(0x30);
        let len_pos = begin_len(&mut out);
        // Any non-zero id will do: every delivery writes its own over it.
        encode_publish_fields(topic, with_id.then_some(1), properties, version, &mut out)?;
        let remaining = end_len(&mut out, len_pos, payload_len)?;
        let id_at = if with_id {
            1 + vbi_len(remaining) + 2 + topic.len()
        } else {
            0
        };
        let invalid = || EncodeError::Invalid("length exceeds 268,435,455 bytes");
        Ok(PublishHeader {
            size: u32::try_from(out.len() + payload_len).map_err(|_| invalid())?,
            id_at: u32::try_from(id_at).map_err(|_| invalid())?,
            bytes: out.to_vec().into_boxed_slice(),
        })
    }

    /// Bytes of the header alone.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a header has at least its fixed part.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Bytes of the whole packet with its payload: what the peer's Maximum Packet Size bounds.
    pub fn packet_size(&self) -> usize {
        self.size as usize
    }

    /// Append this header to `out` as one delivery's: its flags and packet id written in. The
    /// caller appends the payload (of the length the header was made for) right after it.
    /// Nothing is appended on error: a QoS that does not match the header's packet id slot,
    /// or packet id 0 at QoS 1/2.
    pub fn write(
        &self,
        out: &mut BytesMut,
        dup: bool,
        qos: QoS,
        retain: bool,
        packet_id: u16,
    ) -> Result<(), EncodeError> {
        let with_id = self.id_at != 0;
        if with_id != (qos != QoS::AtMostOnce) {
            return Err(EncodeError::Invalid(
                "shared PUBLISH header used with another QoS",
            ));
        }
        if with_id && packet_id == 0 {
            return Err(EncodeError::Invalid("packet identifier 0"));
        }
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        out[start] = first_byte(dup, qos, retain);
        if with_id {
            let at = start + self.id_at as usize;
            out[at..at + 2].copy_from_slice(&packet_id.to_be_bytes());
        }
        Ok(())
    }
}
