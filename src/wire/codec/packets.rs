//! PUBLISH, the acknowledgements, (UN)SUBSCRIBE and their acks, DISCONNECT and AUTH.

use super::properties::{self as props, PropWriter};
use super::wire::{put_str, Reader};
use super::{DecodeError, EncodeError};
use crate::wire::packet::{
    Ack, Auth, Disconnect, ProtocolVersion, Publish, PublishProperties, QoS, ReasonCode,
    RetainHandling, SubAck, Subscribe, SubscribeFilter, UnsubAck, Unsubscribe,
};
use bytes::{BufMut, BytesMut};

/// Packet Identifiers must be non-zero [MQTT-2.2.1-3]. Zero is a well-formed field with a
/// forbidden value, so it is reported as a Protocol Error.
fn packet_id(r: &mut Reader) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::Protocol("packet identifier 0 [MQTT-2.2.1-3]")),
        id => Ok(id),
    }
}

fn check_id(id: u16) -> Result<(), EncodeError> {
    if id == 0 {
        Err(EncodeError::Invalid("packet identifier 0"))
    } else {
        Ok(())
    }
}

/// Decodes a PUBLISH body; `flags` are the low four bits of the fixed header, already checked
/// for QoS 3 by the framing code.
pub(crate) fn decode_publish(
    mut r: Reader,
    flags: u8,
    version: ProtocolVersion,
) -> Result<Publish, DecodeError> {
    let qos = QoS::from_u8((flags >> 1) & 3)
        .ok_or(DecodeError::Malformed("PUBLISH QoS 3 [MQTT-3.3.1-4]"))?;
    let dup = flags & 0b1000 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::Malformed(
            "DUP set on a QoS 0 PUBLISH [MQTT-3.3.1-2]",
        ));
    }
    // Wildcards in topic names are the topic module's to reject.
    let topic = r.string()?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        packet_id(&mut r)?
    };
    let properties = if version.is_v5() {
        props::decode(&mut r, props::PUBLISH_PROPS, true)?.take_publish()
    } else {
        Default::default()
    };
    Ok(Publish {
        dup,
        qos,
        retain: flags & 1 != 0,
        topic,
        packet_id,
        payload: r.rest(),
        properties,
    })
}

/// The first byte of a PUBLISH.
pub(crate) fn publish_first_byte(p: &Publish) -> u8 {
    first_byte(p.dup, p.qos, p.retain)
}

/// DUP is cleared for QoS 0 because the spec forbids it there [MQTT-3.3.1-2] and a
/// QoS-downgraded redelivery would otherwise carry it.
pub(crate) fn first_byte(dup: bool, qos: QoS, retain: bool) -> u8 {
    let dup = dup && qos != QoS::AtMostOnce;
    0x30 | (u8::from(dup) << 3) | ((qos as u8) << 1) | u8::from(retain)
}

/// Writes the PUBLISH variable header; the caller appends the payload after the length is
/// patched, so the payload is copied exactly once.
pub(crate) fn encode_publish_header(
    p: &Publish,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let id = if p.qos == QoS::AtMostOnce {
        None
    } else {
        check_id(p.packet_id)?;
        Some(p.packet_id)
    };
    encode_publish_fields(&p.topic, id, &p.properties, version, out)
}

/// The variable header from its parts, so that a header shared by many deliveries can be
/// written without building a `Publish` (and cloning its topic and properties) for it.
pub(crate) fn encode_publish_fields(
    topic: &str,
    packet_id: Option<u16>,
    properties: &PublishProperties,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    put_str(out, topic)?;
    if let Some(id) = packet_id {
        out.put_u16(id);
    }
    if version.is_v5() {
        let mut w = PropWriter::begin(out);
        w.publish(properties)?;
        w.finish()?;
    }
    Ok(())
}

/// Reason codes each v5 packet may carry (sections 3.4.2.1 to 3.15.2.1). Anything else is a
/// value outside the field's defined range, which we treat as Malformed.
pub(crate) const PUBACK_REASONS: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
pub(crate) const PUBREL_REASONS: &[u8] = &[0x00, 0x92];
const SUBACK_REASONS: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const UNSUBACK_REASONS: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_REASONS: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH_REASONS: &[u8] = &[0x00, 0x18, 0x19];

fn reason(r: &mut Reader, valid: &[u8]) -> Result<ReasonCode, DecodeError> {
    let code = r.u8()?;
    if valid.contains(&code) {
        Ok(ReasonCode(code))
    } else {
        Err(DecodeError::Malformed(
            "reason code not valid for this packet",
        ))
    }
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP. v5 allows dropping the reason (length 2) and the
/// property length (length 3).
pub(crate) fn decode_ack(
    mut r: Reader,
    version: ProtocolVersion,
    valid: &[u8],
) -> Result<Ack, DecodeError> {
    let mut ack = Ack::new(packet_id(&mut r)?);
    if version.is_v5() && !r.is_empty() {
        ack.reason = reason(&mut r, valid)?;
        if !r.is_empty() {
            let p = props::decode(&mut r, props::ACK_PROPS, false)?;
            ack.reason_string = p.reason_string;
            ack.user_properties = p.user_properties;
        }
    }
    r.finish()?;
    Ok(ack)
}

pub(crate) fn encode_ack(
    a: &Ack,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_id(a.packet_id)?;
    out.put_u16(a.packet_id);
    if !version.is_v5() {
        return Ok(());
    }
    let no_props = a.reason_string.is_none() && a.user_properties.is_empty();
    if no_props && a.reason == ReasonCode::SUCCESS {
        return Ok(());
    }
    // Once a reason code is written the Property Length follows even when it is 0: the spec
    // lets it be omitted, but common clients (rumqttc 0.25) cannot decode that short form.
    out.put_u8(a.reason.0);
    let mut w = PropWriter::begin(out);
    w.str(props::REASON_STRING, a.reason_string.as_deref())?;
    w.users(&a.user_properties)?;
    w.finish()
}

pub(crate) fn decode_subscribe(
    mut r: Reader,
    version: ProtocolVersion,
) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(&mut r)?;
    let (subscription_identifier, user_properties) = if version.is_v5() {
        let p = props::decode(&mut r, props::SUBSCRIBE_PROPS, false)?;
        (
            p.subscription_identifiers.first().copied(),
            p.user_properties,
        )
    } else {
        (None, Vec::new())
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let opts = r.u8()?;
        // The versions disagree on QoS 3: 3.1.1 calls it malformed [MQTT-3-8.3-4], v5 a
        // Protocol Error (section 3.8.3.1), like Retain Handling 3.
        let qos = match QoS::from_u8(opts & 3) {
            Some(q) => q,
            None if version.is_v5() => {
                return Err(DecodeError::Protocol(
                    "subscription Maximum QoS 3 (section 3.8.3.1)",
                ))
            }
            None => return Err(DecodeError::Malformed("subscription QoS 3 [MQTT-3-8.3-4]")),
        };
        let f = if version.is_v5() {
            if opts & 0b1100_0000 != 0 {
                return Err(DecodeError::Malformed(
                    "reserved subscription option bits set [MQTT-3.8.3-5]",
                ));
            }
            let retain_handling = match (opts >> 4) & 3 {
                0 => RetainHandling::OnSubscribe,
                1 => RetainHandling::OnNewSubscribe,
                2 => RetainHandling::Never,
                _ => return Err(DecodeError::Protocol("retain handling 3 (section 3.8.3.1)")),
            };
            SubscribeFilter {
                filter,
                qos,
                no_local: opts & 0b0100 != 0,
                retain_as_published: opts & 0b1000 != 0,
                retain_handling,
            }
        } else {
            if opts & 0b1111_1100 != 0 {
                return Err(DecodeError::Malformed(
                    "reserved subscription option bits set [MQTT-3-8.3-4]",
                ));
            }
            SubscribeFilter {
                filter,
                qos,
                no_local: false,
                retain_as_published: false,
                retain_handling: RetainHandling::OnSubscribe,
            }
        };
        filters.push(f);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol(
            "SUBSCRIBE without filters [MQTT-3.8.3-2]",
        ));
    }
    Ok(Subscribe {
        packet_id,
        filters,
        subscription_identifier,
        user_properties,
    })
}

pub(crate) fn encode_subscribe(
    s: &Subscribe,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_id(s.packet_id)?;
    if s.filters.is_empty() {
        return Err(EncodeError::Invalid("SUBSCRIBE without filters"));
    }
    out.put_u16(s.packet_id);
    if version.is_v5() {
        let mut w = PropWriter::begin(out);
        if let Some(id) = s.subscription_identifier {
            w.sub_id(id)?;
        }
        w.users(&s.user_properties)?;
        w.finish()?;
    }
    for f in &s.filters {
        put_str(out, &f.filter)?;
        let mut opts = f.qos as u8;
        if version.is_v5() {
            let rh = match f.retain_handling {
                RetainHandling::OnSubscribe => 0,
                RetainHandling::OnNewSubscribe => 1,
                RetainHandling::Never => 2,
            };
            opts |=
                (u8::from(f.no_local) << 2) | (u8::from(f.retain_as_published) << 3) | (rh << 4);
        }
        out.put_u8(opts);
    }
    Ok(())
}

pub(crate) fn decode_suback(
    mut r: Reader,
    version: ProtocolVersion,
) -> Result<SubAck, DecodeError> {
    let packet_id = packet_id(&mut r)?;
    let reason_string = if version.is_v5() {
        props::decode(&mut r, props::ACK_PROPS, false)?.reason_string
    } else {
        None
    };
    let valid: &[u8] = if version.is_v5() {
        SUBACK_REASONS
    } else {
        &[0x00, 0x01, 0x02, 0x80]
    };
    let mut reasons = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        reasons.push(reason(&mut r, valid)?);
    }
    if reasons.is_empty() {
        return Err(DecodeError::Protocol("SUBACK without reason codes"));
    }
    Ok(SubAck {
        packet_id,
        reasons,
        reason_string,
    })
}

pub(crate) fn encode_suback(
    s: &SubAck,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_id(s.packet_id)?;
    if s.reasons.is_empty() {
        return Err(EncodeError::Invalid("SUBACK without reason codes"));
    }
    out.put_u16(s.packet_id);
    if version.is_v5() {
        let mut w = PropWriter::begin(out);
        w.str(props::REASON_STRING, s.reason_string.as_deref())?;
        w.finish()?;
        for r in &s.reasons {
            out.put_u8(r.0);
        }
    } else {
        // 3.1.1 knows granted QoS 0..2 and the single failure code 0x80.
        for r in &s.reasons {
            out.put_u8(if r.0 <= 2 { r.0 } else { 0x80 });
        }
    }
    Ok(())
}

pub(crate) fn decode_unsubscribe(
    mut r: Reader,
    version: ProtocolVersion,
) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(&mut r)?;
    let user_properties = if version.is_v5() {
        props::decode(&mut r, props::UNSUBSCRIBE_PROPS, false)?.user_properties
    } else {
        Vec::new()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol(
            "UNSUBSCRIBE without filters [MQTT-3.10.3-2]",
        ));
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        user_properties,
    })
}

pub(crate) fn encode_unsubscribe(
    u: &Unsubscribe,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_id(u.packet_id)?;
    if u.filters.is_empty() {
        return Err(EncodeError::Invalid("UNSUBSCRIBE without filters"));
    }
    out.put_u16(u.packet_id);
    if version.is_v5() {
        let mut w = PropWriter::begin(out);
        w.users(&u.user_properties)?;
        w.finish()?;
    }
    for f in &u.filters {
        put_str(out, f)?;
    }
    Ok(())
}

pub(crate) fn decode_unsuback(
    mut r: Reader,
    version: ProtocolVersion,
) -> Result<UnsubAck, DecodeError> {
    let packet_id = packet_id(&mut r)?;
    let mut reasons = Vec::new();
    if version.is_v5() {
        // Reason String and user properties are accepted but the model has no place for them.
        props::decode(&mut r, props::ACK_PROPS, false)?;
        while !r.is_empty() {
            reasons.push(reason(&mut r, UNSUBACK_REASONS)?);
        }
        if reasons.is_empty() {
            return Err(DecodeError::Protocol("UNSUBACK without reason codes"));
        }
    }
    r.finish()?;
    Ok(UnsubAck { packet_id, reasons })
}

pub(crate) fn encode_unsuback(
    u: &UnsubAck,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_id(u.packet_id)?;
    out.put_u16(u.packet_id);
    if version.is_v5() {
        if u.reasons.is_empty() {
            return Err(EncodeError::Invalid("v5 UNSUBACK without reason codes"));
        }
        out.put_u8(0); // empty properties
        for r in &u.reasons {
            out.put_u8(r.0);
        }
    }
    Ok(())
}

/// DISCONNECT; v5 short forms (gap 2): length 0 is a normal disconnection, length 1 carries
/// only the reason code. Misreading either publishes or swallows the will [MQTT-3.14.4-3].
pub(crate) fn decode_disconnect(
    mut r: Reader,
    version: ProtocolVersion,
) -> Result<Disconnect, DecodeError> {
    let mut d = Disconnect::default();
    if version.is_v5() && !r.is_empty() {
        d.reason = reason(&mut r, DISCONNECT_REASONS)?;
        if !r.is_empty() {
            let p = props::decode(&mut r, props::DISCONNECT_PROPS, false)?;
            d.session_expiry_interval = p.session_expiry_interval;
            d.reason_string = p.reason_string;
            d.server_reference = p.server_reference;
            d.user_properties = p.user_properties;
        }
    }
    r.finish()?;
    Ok(d)
}

pub(crate) fn encode_disconnect(
    d: &Disconnect,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if !version.is_v5() {
        return Ok(());
    }
    let no_props = d.session_expiry_interval.is_none()
        && d.reason_string.is_none()
        && d.server_reference.is_none()
        && d.user_properties.is_empty();
    if no_props && d.reason == ReasonCode::NORMAL_DISCONNECTION {
        return Ok(());
    }
    // As for acks: with a reason code, always write the Property Length (see `encode_ack`).
    out.put_u8(d.reason.0);
    let mut w = PropWriter::begin(out);
    w.u32(props::SESSION_EXPIRY_INTERVAL, d.session_expiry_interval);
    w.str(props::REASON_STRING, d.reason_string.as_deref())?;
    w.str(props::SERVER_REFERENCE, d.server_reference.as_deref())?;
    w.users(&d.user_properties)?;
    w.finish()
}

/// AUTH (v5 only; mqttbytes 0.6 does not know it, gap 3). Length 0 means Success with no
/// properties; length 1 (reason only) is accepted too, as DISCONNECT allows it.
pub(crate) fn decode_auth(mut r: Reader) -> Result<Auth, DecodeError> {
    let mut a = Auth::default();
    if !r.is_empty() {
        a.reason = reason(&mut r, AUTH_REASONS)?;
        if !r.is_empty() {
            let p = props::decode(&mut r, props::AUTH_PROPS, false)?;
            a.authentication_method = p.authentication_method;
            a.authentication_data = p.authentication_data;
        }
    }
    r.finish()?;
    Ok(a)
}

pub(crate) fn encode_auth(a: &Auth, out: &mut BytesMut) -> Result<(), EncodeError> {
    if a.reason == ReasonCode::SUCCESS
        && a.authentication_method.is_none()
        && a.authentication_data.is_none()
    {
        return Ok(());
    }
    out.put_u8(a.reason.0);
    let mut w = PropWriter::begin(out);
    w.str(
        props::AUTHENTICATION_METHOD,
        a.authentication_method.as_deref(),
    )?;
    w.bin(props::AUTHENTICATION_DATA, a.authentication_data.as_deref())?;
    w.finish()
}
