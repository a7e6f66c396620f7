//! CONNECT and CONNACK for every version. CONNECT is parsed here rather than by mqttbytes
//! because it decides the version (gap 4: each mqttbytes module misreads the other's CONNECT and
//! neither knows MQTT 3.1) and because passwords are binary data (gap 10).

use super::properties::{self as props, PropWriter};
use super::wire::{put_binary, put_str, Reader};
use super::{DecodeError, EncodeError};
use crate::wire::packet::{
    ConnAck, ConnAckProperties, Connect, ConnectProperties, ProtocolVersion, QoS, ReasonCode, Will,
};
use bytes::{BufMut, BytesMut};

const FLAG_RESERVED: u8 = 0b0000_0001;
const FLAG_CLEAN: u8 = 0b0000_0010;
const FLAG_WILL: u8 = 0b0000_0100;
const FLAG_WILL_QOS: u8 = 0b0001_1000;
const FLAG_WILL_RETAIN: u8 = 0b0010_0000;
const FLAG_PASSWORD: u8 = 0b0100_0000;
const FLAG_USERNAME: u8 = 0b1000_0000;

/// The version a CONNECT's protocol name and level choose.
pub(crate) fn protocol_of(name: &[u8], level: u8) -> Result<ProtocolVersion, DecodeError> {
    match (name, level) {
        (b"MQTT", 4) => Ok(ProtocolVersion::V311),
        (b"MQTT", 5) => Ok(ProtocolVersion::V5),
        (b"MQIsdp", 3) => Ok(ProtocolVersion::V31),
        (b"MQTT", _) | (b"MQIsdp", _) => Err(DecodeError::UnsupportedProtocolVersion(level)),
        _ => Err(DecodeError::Protocol("unknown protocol name")),
    }
}

/// Decodes a CONNECT body; the protocol name and level choose the version.
pub(crate) fn decode_connect(mut r: Reader) -> Result<Connect, DecodeError> {
    // Read the name as raw bytes: an unknown name is a Protocol Error, not a UTF-8 question.
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = protocol_of(&name, level)?;
    let flags = r.u8()?;
    if flags & FLAG_RESERVED != 0 {
        return Err(DecodeError::Malformed(
            "CONNECT reserved flag set [MQTT-3.1.2-3]",
        ));
    }
    let will_flag = flags & FLAG_WILL != 0;
    let will_qos_bits = (flags & FLAG_WILL_QOS) >> 3;
    let will_retain = flags & FLAG_WILL_RETAIN != 0;
    if !will_flag && (will_qos_bits != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS/retain without will flag [MQTT-3.1.2-11, MQTT-3.1.2-13]",
        ));
    }
    let will_qos =
        QoS::from_u8(will_qos_bits).ok_or(DecodeError::Malformed("will QoS 3 [MQTT-3.1.2-12]"))?;
    let has_user = flags & FLAG_USERNAME != 0;
    let has_pass = flags & FLAG_PASSWORD != 0;
    if has_pass && !has_user && !protocol.is_v5() {
        return Err(DecodeError::Malformed(
            "password without user name [MQTT-3.1.2-22]",
        ));
    }
    let keep_alive = r.u16()?;

    let mut properties = ConnectProperties::default();
    if protocol.is_v5() {
        let p = props::decode(&mut r, props::CONNECT_PROPS, false)?;
        properties = ConnectProperties {
            session_expiry_interval: p.session_expiry_interval,
            receive_maximum: p.receive_maximum,
            maximum_packet_size: p.maximum_packet_size,
            topic_alias_maximum: p.topic_alias_maximum,
            request_response_information: p.request_response_information,
            request_problem_information: p.request_problem_information,
            user_properties: p.user_properties,
            authentication_method: p.authentication_method,
            authentication_data: p.authentication_data,
        };
    }

    let client_id = r.string()?;
    let will = if will_flag {
        let (delay_interval, properties) = if protocol.is_v5() {
            let mut p = props::decode(&mut r, props::WILL_PROPS, false)?;
            (p.will_delay_interval.unwrap_or(0), p.take_publish())
        } else {
            (0, Default::default())
        };
        let topic = r.string()?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            delay_interval,
            properties,
        })
    } else {
        None
    };
    let username = if has_user { Some(r.string()?) } else { None };
    // Binary in every version (gap 10): 3.1.1 and 5.0 both define the password as Binary Data.
    let password = if has_pass { Some(r.binary()?) } else { None };
    r.finish()?;
    Ok(Connect {
        protocol,
        client_id,
        clean_start: flags & FLAG_CLEAN != 0,
        keep_alive,
        username,
        password,
        will,
        properties,
    })
}

pub(crate) fn encode_connect(
    c: &Connect,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if c.protocol != version {
        return Err(EncodeError::Invalid(
            "CONNECT protocol differs from the encoding version",
        ));
    }
    let name: &[u8] = if version == ProtocolVersion::V31 {
        b"MQIsdp"
    } else {
        b"MQTT"
    };
    if c.password.is_some() && c.username.is_none() && !version.is_v5() {
        return Err(EncodeError::Invalid(
            "password without user name before MQTT 5",
        ));
    }
    let mut flags = 0u8;
    if c.clean_start {
        flags |= FLAG_CLEAN;
    }
    if let Some(w) = &c.will {
        flags |= FLAG_WILL | ((w.qos as u8) << 3);
        if w.retain {
            flags |= FLAG_WILL_RETAIN;
        }
    }
    if c.username.is_some() {
        flags |= FLAG_USERNAME;
    }
    if c.password.is_some() {
        flags |= FLAG_PASSWORD;
    }
    put_binary(out, name)?;
    out.put_u8(version.level());
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    if version.is_v5() {
        let p = &c.properties;
        let mut w = PropWriter::begin(out);
        w.u32(props::SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
        if p.receive_maximum == Some(0) || p.maximum_packet_size == Some(0) {
            return Err(EncodeError::Invalid(
                "receive maximum or maximum packet size 0",
            ));
        }
        w.u16(props::RECEIVE_MAXIMUM, p.receive_maximum);
        w.u32(props::MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
        w.u16(props::TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
        w.u8(
            props::REQUEST_RESPONSE_INFORMATION,
            p.request_response_information,
        );
        w.u8(
            props::REQUEST_PROBLEM_INFORMATION,
            p.request_problem_information,
        );
        w.users(&p.user_properties)?;
        w.str(
            props::AUTHENTICATION_METHOD,
            p.authentication_method.as_deref(),
        )?;
        w.bin(props::AUTHENTICATION_DATA, p.authentication_data.as_deref())?;
        w.finish()?;
    }
    put_str(out, &c.client_id)?;
    if let Some(will) = &c.will {
        if version.is_v5() {
            if will.properties.topic_alias.is_some()
                || !will.properties.subscription_identifiers.is_empty()
            {
                return Err(EncodeError::Invalid(
                    "topic alias or subscription id in a will",
                ));
            }
            let mut w = PropWriter::begin(out);
            // 0 is the default: omit it to save bytes.
            w.u32(
                props::WILL_DELAY_INTERVAL,
                Some(will.delay_interval).filter(|d| *d != 0),
            );
            w.publish(&will.properties)?;
            w.finish()?;
        }
        put_str(out, &will.topic)?;
        put_binary(out, &will.payload)?;
    }
    if let Some(u) = &c.username {
        put_str(out, u)?;
    }
    if let Some(p) = &c.password {
        put_binary(out, p)?;
    }
    Ok(())
}

/// 3.1.1 CONNACK return codes 1..=5 expressed as the v5 reason codes they correspond to.
fn v3_return_code_to_reason(code: u8) -> Option<ReasonCode> {
    Some(match code {
        0 => ReasonCode::SUCCESS,
        1 => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
        2 => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
        3 => ReasonCode::SERVER_UNAVAILABLE,
        4 => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        5 => ReasonCode::NOT_AUTHORIZED,
        _ => return None,
    })
}

/// The v5 reason code mapped onto the six 3.1.1 return codes; failures without a 3.1.1
/// counterpart become "server unavailable" (3), the only generic failure 3.1.1 has.
pub(crate) fn reason_to_v3_return_code(reason: ReasonCode) -> u8 {
    match reason.0 {
        0x00 => 0,
        0x84 => 1,
        0x85 => 2,
        0x88 | 0x89 => 3,
        0x86 => 4,
        0x87 => 5,
        _ => 3,
    }
}

/// CONNACK reason codes valid in MQTT 5 (section 3.2.2.2).
const CONNACK_REASONS: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];

pub(crate) fn decode_connack(
    mut r: Reader,
    version: ProtocolVersion,
) -> Result<ConnAck, DecodeError> {
    let ack_flags = r.u8()?;
    if ack_flags & 0xFE != 0 {
        return Err(DecodeError::Malformed(
            "CONNACK reserved flags set [MQTT-3.2.2-1]",
        ));
    }
    let code = r.u8()?;
    let mut properties = ConnAckProperties::default();
    let reason = if version.is_v5() {
        if !CONNACK_REASONS.contains(&code) {
            return Err(DecodeError::Malformed("invalid CONNACK reason code"));
        }
        // The Property Length is mandatory (gap 6): a missing one is Malformed.
        let p = props::decode(&mut r, props::CONNACK_PROPS, false)?;
        properties = ConnAckProperties {
            session_expiry_interval: p.session_expiry_interval,
            receive_maximum: p.receive_maximum,
            maximum_qos: p.maximum_qos,
            retain_available: p.retain_available,
            maximum_packet_size: p.maximum_packet_size,
            assigned_client_identifier: p.assigned_client_identifier,
            topic_alias_maximum: p.topic_alias_maximum,
            reason_string: p.reason_string,
            user_properties: p.user_properties,
            wildcard_subscription_available: p.wildcard_subscription_available,
            subscription_identifiers_available: p.subscription_identifier_available,
            shared_subscription_available: p.shared_subscription_available,
            server_keep_alive: p.server_keep_alive,
            response_information: p.response_information,
            server_reference: p.server_reference,
            authentication_method: p.authentication_method,
            authentication_data: p.authentication_data,
        };
        ReasonCode(code)
    } else {
        v3_return_code_to_reason(code)
            .ok_or(DecodeError::Malformed("invalid CONNACK return code"))?
    };
    r.finish()?;
    Ok(ConnAck {
        // 3.1 has no such flag (the byte is reserved).
        session_present: ack_flags & 1 != 0 && version != ProtocolVersion::V31,
        reason,
        properties,
    })
}

pub(crate) fn encode_connack(
    c: &ConnAck,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    // MQTT 3.1 has no Session Present flag: its first CONNACK byte is reserved and must be 0.
    out.put_u8(u8::from(
        c.session_present && version != ProtocolVersion::V31,
    ));
    if !version.is_v5() {
        out.put_u8(reason_to_v3_return_code(c.reason));
        return Ok(());
    }
    out.put_u8(c.reason.0);
    let p = &c.properties;
    if p.receive_maximum == Some(0) || p.maximum_packet_size == Some(0) {
        return Err(EncodeError::Invalid(
            "receive maximum or maximum packet size 0",
        ));
    }
    // Always written, even when empty (gap 6).
    let mut w = PropWriter::begin(out);
    w.u32(props::SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
    w.u16(props::RECEIVE_MAXIMUM, p.receive_maximum);
    w.u8(props::MAXIMUM_QOS, p.maximum_qos);
    w.u8(props::RETAIN_AVAILABLE, p.retain_available);
    w.u32(props::MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    w.str(
        props::ASSIGNED_CLIENT_IDENTIFIER,
        p.assigned_client_identifier.as_deref(),
    )?;
    w.u16(props::TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    w.str(props::REASON_STRING, p.reason_string.as_deref())?;
    w.users(&p.user_properties)?;
    w.u8(
        props::WILDCARD_SUBSCRIPTION_AVAILABLE,
        p.wildcard_subscription_available,
    );
    w.u8(
        props::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        p.subscription_identifiers_available,
    );
    w.u8(
        props::SHARED_SUBSCRIPTION_AVAILABLE,
        p.shared_subscription_available,
    );
    w.u16(props::SERVER_KEEP_ALIVE, p.server_keep_alive);
    w.str(
        props::RESPONSE_INFORMATION,
        p.response_information.as_deref(),
    )?;
    w.str(props::SERVER_REFERENCE, p.server_reference.as_deref())?;
    w.str(
        props::AUTHENTICATION_METHOD,
        p.authentication_method.as_deref(),
    )?;
    w.bin(props::AUTHENTICATION_DATA, p.authentication_data.as_deref())?;
    w.finish()
}
