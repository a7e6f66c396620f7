//! MQTT 5 properties (section 2.2.2): one decoder for every packet, driven by the set of
//! identifiers each packet allows, so duplicate and misplaced properties are caught in one place
//! (mqttbytes silently keeps the last duplicate and lets a property run past the block).

use super::wire::{begin_len, end_len, put_binary, put_str, put_vbi, Reader, MAX_VBI};
use super::{DecodeError, EncodeError};
use crate::wire::packet::{PublishProperties, UserProperty};
use bytes::{BufMut, Bytes, BytesMut};

pub(crate) const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
pub(crate) const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
pub(crate) const CONTENT_TYPE: u8 = 0x03;
pub(crate) const RESPONSE_TOPIC: u8 = 0x08;
pub(crate) const CORRELATION_DATA: u8 = 0x09;
pub(crate) const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
pub(crate) const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
pub(crate) const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
pub(crate) const SERVER_KEEP_ALIVE: u8 = 0x13;
pub(crate) const AUTHENTICATION_METHOD: u8 = 0x15;
pub(crate) const AUTHENTICATION_DATA: u8 = 0x16;
pub(crate) const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
pub(crate) const WILL_DELAY_INTERVAL: u8 = 0x18;
pub(crate) const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
pub(crate) const RESPONSE_INFORMATION: u8 = 0x1A;
pub(crate) const SERVER_REFERENCE: u8 = 0x1C;
pub(crate) const REASON_STRING: u8 = 0x1F;
pub(crate) const RECEIVE_MAXIMUM: u8 = 0x21;
pub(crate) const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub(crate) const TOPIC_ALIAS: u8 = 0x23;
pub(crate) const MAXIMUM_QOS: u8 = 0x24;
pub(crate) const RETAIN_AVAILABLE: u8 = 0x25;
pub(crate) const USER_PROPERTY: u8 = 0x26;
pub(crate) const MAXIMUM_PACKET_SIZE: u8 = 0x27;
pub(crate) const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
pub(crate) const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
pub(crate) const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

/// A set of property identifiers (all are below 64).
#[derive(Clone, Copy)]
pub(crate) struct Allowed(u64);

const fn set(ids: &[u8]) -> Allowed {
    let mut m = 0u64;
    let mut i = 0;
    while i < ids.len() {
        m |= 1u64 << ids[i];
        i += 1;
    }
    Allowed(m)
}

impl Allowed {
    fn has(self, id: u8) -> bool {
        id < 64 && self.0 & (1u64 << id) != 0
    }
}

// Which packet may carry which property: MQTT 5 table 2-4.
pub(crate) const CONNECT_PROPS: Allowed = set(&[
    SESSION_EXPIRY_INTERVAL,
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
    REQUEST_PROBLEM_INFORMATION,
    REQUEST_RESPONSE_INFORMATION,
    RECEIVE_MAXIMUM,
    TOPIC_ALIAS_MAXIMUM,
    USER_PROPERTY,
    MAXIMUM_PACKET_SIZE,
]);
pub(crate) const WILL_PROPS: Allowed = set(&[
    PAYLOAD_FORMAT_INDICATOR,
    MESSAGE_EXPIRY_INTERVAL,
    CONTENT_TYPE,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
    WILL_DELAY_INTERVAL,
    USER_PROPERTY,
]);
pub(crate) const CONNACK_PROPS: Allowed = set(&[
    SESSION_EXPIRY_INTERVAL,
    ASSIGNED_CLIENT_IDENTIFIER,
    SERVER_KEEP_ALIVE,
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
    RESPONSE_INFORMATION,
    SERVER_REFERENCE,
    REASON_STRING,
    RECEIVE_MAXIMUM,
    TOPIC_ALIAS_MAXIMUM,
    MAXIMUM_QOS,
    RETAIN_AVAILABLE,
    USER_PROPERTY,
    MAXIMUM_PACKET_SIZE,
    WILDCARD_SUBSCRIPTION_AVAILABLE,
    SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    SHARED_SUBSCRIPTION_AVAILABLE,
]);
pub(crate) const PUBLISH_PROPS: Allowed = set(&[
    PAYLOAD_FORMAT_INDICATOR,
    MESSAGE_EXPIRY_INTERVAL,
    CONTENT_TYPE,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
    SUBSCRIPTION_IDENTIFIER,
    TOPIC_ALIAS,
    USER_PROPERTY,
]);
pub(crate) const ACK_PROPS: Allowed = set(&[REASON_STRING, USER_PROPERTY]);
pub(crate) const SUBSCRIBE_PROPS: Allowed = set(&[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY]);
pub(crate) const UNSUBSCRIBE_PROPS: Allowed = set(&[USER_PROPERTY]);
pub(crate) const DISCONNECT_PROPS: Allowed = set(&[
    SESSION_EXPIRY_INTERVAL,
    SERVER_REFERENCE,
    REASON_STRING,
    USER_PROPERTY,
]);
pub(crate) const AUTH_PROPS: Allowed = set(&[
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
    REASON_STRING,
    USER_PROPERTY,
]);

/// Every property any packet can carry; each packet's decoder moves out what its model holds.
#[derive(Default)]
pub(crate) struct Props {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<UserProperty>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

/// The spec makes these byte properties Protocol Errors for any value but 0 or 1.
fn flag(v: u8) -> Result<u8, DecodeError> {
    if v > 1 {
        Err(DecodeError::Protocol("property value must be 0 or 1"))
    } else {
        Ok(v)
    }
}

/// Reads a Property Length and the properties it covers.
///
/// An identifier not defined for this packet is a Malformed Packet (section 2.2.2.2); a
/// repeated single-use property, and the zero values the spec forbids, are Protocol Errors.
/// `multi_sub_id` allows repeated Subscription Identifiers (only PUBLISH may repeat them).
pub(crate) fn decode(
    r: &mut Reader,
    allowed: Allowed,
    multi_sub_id: bool,
) -> Result<Props, DecodeError> {
    let len = r.vbi()?;
    if len > r.remaining() {
        return Err(DecodeError::Malformed("property length exceeds the packet"));
    }
    // A sub-reader bounded by the Property Length, so a property cannot run into the payload.
    let mut p = Reader::new(r.take(len)?);
    let mut props = Props::default();
    let mut seen = 0u64;
    while !p.is_empty() {
        let id = p.u8()?;
        if !allowed.has(id) {
            return Err(DecodeError::Malformed(
                "property not allowed in this packet",
            ));
        }
        let repeatable = id == USER_PROPERTY || (id == SUBSCRIPTION_IDENTIFIER && multi_sub_id);
        if !repeatable && seen & (1u64 << id) != 0 {
            return Err(DecodeError::Protocol("property included more than once"));
        }
        seen |= 1u64 << id;
        match id {
            PAYLOAD_FORMAT_INDICATOR => props.payload_format_indicator = Some(flag(p.u8()?)?),
            MESSAGE_EXPIRY_INTERVAL => props.message_expiry_interval = Some(p.u32()?),
            CONTENT_TYPE => props.content_type = Some(p.string()?),
            RESPONSE_TOPIC => props.response_topic = Some(p.string()?),
            CORRELATION_DATA => props.correlation_data = Some(p.binary()?),
            SUBSCRIPTION_IDENTIFIER => {
                let v = p.vbi()?;
                if v == 0 {
                    return Err(DecodeError::Protocol("subscription identifier 0"));
                }
                // vbi() caps values at MAX_VBI, which fits u32.
                props.subscription_identifiers.push(v as u32);
            }
            SESSION_EXPIRY_INTERVAL => props.session_expiry_interval = Some(p.u32()?),
            ASSIGNED_CLIENT_IDENTIFIER => props.assigned_client_identifier = Some(p.string()?),
            SERVER_KEEP_ALIVE => props.server_keep_alive = Some(p.u16()?),
            AUTHENTICATION_METHOD => props.authentication_method = Some(p.string()?),
            AUTHENTICATION_DATA => props.authentication_data = Some(p.binary()?),
            REQUEST_PROBLEM_INFORMATION => props.request_problem_information = Some(flag(p.u8()?)?),
            WILL_DELAY_INTERVAL => props.will_delay_interval = Some(p.u32()?),
            REQUEST_RESPONSE_INFORMATION => {
                props.request_response_information = Some(flag(p.u8()?)?)
            }
            RESPONSE_INFORMATION => props.response_information = Some(p.string()?),
            SERVER_REFERENCE => props.server_reference = Some(p.string()?),
            REASON_STRING => props.reason_string = Some(p.string()?),
            RECEIVE_MAXIMUM => {
                let v = p.u16()?;
                if v == 0 {
                    return Err(DecodeError::Protocol("receive maximum 0"));
                }
                props.receive_maximum = Some(v);
            }
            TOPIC_ALIAS_MAXIMUM => props.topic_alias_maximum = Some(p.u16()?),
            // Alias 0 is refused by the connection with DISCONNECT 0x94 (Topic Alias
            // invalid), like an alias above the maximum [MQTT-3.3.2-8].
            TOPIC_ALIAS => props.topic_alias = Some(p.u16()?),
            MAXIMUM_QOS => props.maximum_qos = Some(flag(p.u8()?)?),
            RETAIN_AVAILABLE => props.retain_available = Some(flag(p.u8()?)?),
            USER_PROPERTY => {
                let k = p.string()?;
                let v = p.string()?;
                props.user_properties.push((k, v));
            }
            MAXIMUM_PACKET_SIZE => {
                let v = p.u32()?;
                if v == 0 {
                    return Err(DecodeError::Protocol("maximum packet size 0"));
                }
                props.maximum_packet_size = Some(v);
            }
            WILDCARD_SUBSCRIPTION_AVAILABLE => {
                props.wildcard_subscription_available = Some(flag(p.u8()?)?)
            }
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                props.subscription_identifier_available = Some(flag(p.u8()?)?)
            }
            SHARED_SUBSCRIPTION_AVAILABLE => {
                props.shared_subscription_available = Some(flag(p.u8()?)?)
            }
            _ => return Err(DecodeError::Malformed("unknown property identifier")),
        }
    }
    Ok(props)
}

impl Props {
    /// The application-message subset (PUBLISH and will properties).
    pub(crate) fn take_publish(&mut self) -> PublishProperties {
        PublishProperties {
            payload_format_indicator: self.payload_format_indicator.take(),
            message_expiry_interval: self.message_expiry_interval.take(),
            topic_alias: self.topic_alias.take(),
            response_topic: self.response_topic.take(),
            correlation_data: self.correlation_data.take(),
            user_properties: std::mem::take(&mut self.user_properties),
            subscription_identifiers: std::mem::take(&mut self.subscription_identifiers),
            content_type: self.content_type.take(),
        }
    }
}

/// Writes properties into a length-prefixed block. Each method is a no-op for `None`, so
/// encoders can pass model fields straight through.
pub(crate) struct PropWriter<'a> {
    out: &'a mut BytesMut,
    pos: usize,
}

impl<'a> PropWriter<'a> {
    pub(crate) fn begin(out: &'a mut BytesMut) -> PropWriter<'a> {
        let pos = begin_len(out);
        PropWriter { out, pos }
    }

    pub(crate) fn finish(self) -> Result<(), EncodeError> {
        end_len(self.out, self.pos, 0).map(|_| ())
    }

    pub(crate) fn u8(&mut self, id: u8, v: Option<u8>) {
        if let Some(v) = v {
            self.out.put_u8(id);
            self.out.put_u8(v);
        }
    }

    pub(crate) fn u16(&mut self, id: u8, v: Option<u16>) {
        if let Some(v) = v {
            self.out.put_u8(id);
            self.out.put_u16(v);
        }
    }

    pub(crate) fn u32(&mut self, id: u8, v: Option<u32>) {
        if let Some(v) = v {
            self.out.put_u8(id);
            self.out.put_u32(v);
        }
    }

    pub(crate) fn str(&mut self, id: u8, v: Option<&str>) -> Result<(), EncodeError> {
        if let Some(v) = v {
            self.out.put_u8(id);
            put_str(self.out, v)?;
        }
        Ok(())
    }

    pub(crate) fn bin(&mut self, id: u8, v: Option<&[u8]>) -> Result<(), EncodeError> {
        if let Some(v) = v {
            self.out.put_u8(id);
            put_binary(self.out, v)?;
        }
        Ok(())
    }

    /// Subscription Identifier: 1..=268,435,455; 0 would be a Protocol Error at the peer.
    pub(crate) fn sub_id(&mut self, v: u32) -> Result<(), EncodeError> {
        let v = v as usize;
        if v == 0 || v > MAX_VBI {
            return Err(EncodeError::Invalid("subscription identifier out of range"));
        }
        self.out.put_u8(SUBSCRIPTION_IDENTIFIER);
        put_vbi(self.out, v)
    }

    pub(crate) fn users(&mut self, users: &[UserProperty]) -> Result<(), EncodeError> {
        for (k, v) in users {
            self.out.put_u8(USER_PROPERTY);
            put_str(self.out, k)?;
            put_str(self.out, v)?;
        }
        Ok(())
    }

    /// PUBLISH / will application-message properties (without Will Delay Interval).
    pub(crate) fn publish(&mut self, p: &PublishProperties) -> Result<(), EncodeError> {
        self.u8(PAYLOAD_FORMAT_INDICATOR, p.payload_format_indicator);
        self.u32(MESSAGE_EXPIRY_INTERVAL, p.message_expiry_interval);
        if p.topic_alias == Some(0) {
            return Err(EncodeError::Invalid("topic alias 0"));
        }
        self.u16(TOPIC_ALIAS, p.topic_alias);
        self.str(RESPONSE_TOPIC, p.response_topic.as_deref())?;
        self.bin(CORRELATION_DATA, p.correlation_data.as_deref())?;
        self.users(&p.user_properties)?;
        for id in &p.subscription_identifiers {
            self.sub_id(*id)?;
        }
        self.str(CONTENT_TYPE, p.content_type.as_deref())
    }
}
