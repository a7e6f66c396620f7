//! Codec tests: exact bytes for each mqttbytes gap and each normative rule, round trips,
//! split-point framing, a cross-check against mqttbytes' own decoder, and a small fuzz loop.

use super::*;
use crate::testutil::XorShift;
use crate::wire::packet::*;
use bytes::Bytes;

const MAX: usize = 1 << 20;
use ProtocolVersion::{V31, V311, V5};

/// Wraps a body in a fixed header so tests can write bodies by hand.
fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u8(byte1);
    wire::put_vbi(&mut out, body.len()).unwrap();
    out.extend_from_slice(body);
    out.to_vec()
}

fn dec(bytes: &[u8], v: Option<ProtocolVersion>) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    decode(&mut buf, v, MAX)
}

/// Decodes exactly one complete packet that must consume the whole input.
fn dec1(bytes: &[u8], v: Option<ProtocolVersion>) -> Packet {
    let mut buf = BytesMut::from(bytes);
    let p = decode(&mut buf, v, MAX).unwrap().expect("complete frame");
    assert!(buf.is_empty(), "frame not fully consumed");
    p
}

fn enc(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    let n = encode(p, v, None, &mut out).unwrap();
    assert_eq!(n, out.len());
    out.to_vec()
}

fn malformed(r: Result<Option<Packet>, DecodeError>) {
    assert!(
        matches!(r, Err(DecodeError::Malformed(_))),
        "expected Malformed, got {r:?}"
    );
}

fn protocol(r: Result<Option<Packet>, DecodeError>) {
    assert!(
        matches!(r, Err(DecodeError::Protocol(_))),
        "expected Protocol, got {r:?}"
    );
}

fn roundtrip(p: &Packet, v: ProtocolVersion) {
    let bytes = enc(p, v);
    let ver = if matches!(p, Packet::Connect(_)) {
        None
    } else {
        Some(v)
    };
    assert_eq!(&dec1(&bytes, ver), p, "round trip of {} in {v:?}", p.name());
}

fn users() -> Vec<UserProperty> {
    vec![("k".into(), "v".into()), ("k".into(), "v2".into())]
}

fn full_publish_props() -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        topic_alias: Some(7),
        response_topic: Some("resp/t".into()),
        correlation_data: Some(Bytes::from_static(&[0, 1, 0xff])),
        user_properties: users(),
        subscription_identifiers: vec![1, 268_435_455],
        content_type: Some("text/plain".into()),
    }
}

fn connect(v: ProtocolVersion) -> Connect {
    let v5 = v.is_v5();
    Connect {
        protocol: v,
        client_id: "client-é".into(),
        clean_start: true,
        keep_alive: 30,
        username: Some("user".into()),
        password: Some(Bytes::from_static(&[0xff, 0x00, 0xfe])),
        will: Some(Will {
            topic: "will/t".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::ExactlyOnce,
            retain: true,
            delay_interval: if v5 { 10 } else { 0 },
            properties: if v5 {
                PublishProperties {
                    topic_alias: None,
                    subscription_identifiers: vec![],
                    ..full_publish_props()
                }
            } else {
                PublishProperties::default()
            },
        }),
        properties: if v5 {
            ConnectProperties {
                session_expiry_interval: Some(u32::MAX),
                receive_maximum: Some(20),
                maximum_packet_size: Some(1024),
                topic_alias_maximum: Some(5),
                request_response_information: Some(1),
                request_problem_information: Some(0),
                user_properties: users(),
                authentication_method: Some("SCRAM".into()),
                authentication_data: Some(Bytes::from_static(b"\x00data")),
            }
        } else {
            ConnectProperties::default()
        },
    }
}

fn full_connack_props() -> ConnAckProperties {
    ConnAckProperties {
        session_expiry_interval: Some(60),
        receive_maximum: Some(100),
        maximum_qos: Some(1),
        retain_available: Some(0),
        maximum_packet_size: Some(65536),
        assigned_client_identifier: Some("auto-1".into()),
        topic_alias_maximum: Some(10),
        reason_string: Some("welcome".into()),
        user_properties: users(),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(1),
        shared_subscription_available: Some(0),
        server_keep_alive: Some(45),
        response_information: Some("resp/".into()),
        server_reference: Some("other:1883".into()),
        authentication_method: Some("SCRAM".into()),
        authentication_data: Some(Bytes::from_static(b"x")),
    }
}

fn publish(qos: QoS, props: PublishProperties) -> Publish {
    Publish {
        dup: qos != QoS::AtMostOnce,
        qos,
        retain: true,
        topic: "a/b/é".into(),
        packet_id: if qos == QoS::AtMostOnce { 0 } else { 4242 },
        payload: Bytes::from_static(b"hello \x00 world"),
        properties: props,
    }
}

fn full_ack() -> Ack {
    Ack {
        packet_id: 9,
        reason: ReasonCode::NO_MATCHING_SUBSCRIBERS,
        reason_string: Some("nobody".into()),
        user_properties: users(),
    }
}

fn subscribe(v5: bool) -> Subscribe {
    let filters = vec![
        SubscribeFilter {
            filter: "a/+/c".into(),
            qos: QoS::AtLeastOnce,
            no_local: v5,
            retain_as_published: v5,
            retain_handling: if v5 {
                RetainHandling::Never
            } else {
                RetainHandling::OnSubscribe
            },
        },
        SubscribeFilter {
            filter: "#".into(),
            qos: QoS::ExactlyOnce,
            no_local: false,
            retain_as_published: false,
            retain_handling: if v5 {
                RetainHandling::OnNewSubscribe
            } else {
                RetainHandling::OnSubscribe
            },
        },
    ];
    Subscribe {
        packet_id: 77,
        filters,
        subscription_identifier: v5.then_some(300),
        user_properties: if v5 { users() } else { vec![] },
    }
}

fn full_disconnect() -> Disconnect {
    Disconnect {
        reason: ReasonCode::SESSION_TAKEN_OVER,
        session_expiry_interval: Some(0),
        reason_string: Some("bye".into()),
        server_reference: Some("elsewhere".into()),
        user_properties: users(),
    }
}

/// Every packet type with non-default v5 fields.
fn all_v5_packets() -> Vec<Packet> {
    vec![
        Packet::Connect(Box::new(connect(V5))),
        Packet::ConnAck(ConnAck {
            session_present: true,
            reason: ReasonCode::SUCCESS,
            properties: full_connack_props(),
        }),
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason: ReasonCode::BANNED,
            properties: ConnAckProperties::default(),
        }),
        Packet::Publish(publish(QoS::AtMostOnce, full_publish_props())),
        Packet::Publish(publish(QoS::AtLeastOnce, full_publish_props())),
        Packet::Publish(publish(QoS::ExactlyOnce, PublishProperties::default())),
        Packet::PubAck(full_ack()),
        Packet::PubAck(Ack::new(1)),
        Packet::PubRec(Ack {
            reason: ReasonCode::QUOTA_EXCEEDED,
            ..Ack::new(2)
        }),
        Packet::PubRel(Ack {
            reason: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            reason_string: Some("?".into()),
            ..Ack::new(3)
        }),
        Packet::PubComp(Ack {
            user_properties: users(),
            ..Ack::new(u16::MAX)
        }),
        Packet::Subscribe(subscribe(true)),
        Packet::SubAck(SubAck {
            packet_id: 77,
            reasons: vec![ReasonCode::GRANTED_QOS_1, ReasonCode::NOT_AUTHORIZED],
            reason_string: Some("partly".into()),
        }),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 78,
            filters: vec!["a/+/c".into(), "#".into()],
            user_properties: users(),
        }),
        Packet::UnsubAck(UnsubAck {
            packet_id: 78,
            reasons: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
        }),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(full_disconnect()),
        Packet::Disconnect(Disconnect::default()),
        Packet::Disconnect(Disconnect {
            reason: ReasonCode::DISCONNECT_WITH_WILL,
            ..Disconnect::default()
        }),
        Packet::Auth(Auth {
            reason: ReasonCode::CONTINUE_AUTHENTICATION,
            authentication_method: Some("SCRAM".into()),
            authentication_data: Some(Bytes::from_static(b"\x01\x02")),
        }),
        Packet::Auth(Auth::default()),
    ]
}

/// Every packet type as 3.1.1 can carry it (v5-only fields at their defaults).
fn all_v311_packets(v: ProtocolVersion) -> Vec<Packet> {
    vec![
        Packet::Connect(Box::new(connect(v))),
        Packet::ConnAck(ConnAck {
            // 3.1 cannot carry it (see connack_session_present_only_from_311_on).
            session_present: v != V31,
            reason: ReasonCode::SUCCESS,
            properties: ConnAckProperties::default(),
        }),
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason: ReasonCode::NOT_AUTHORIZED,
            properties: ConnAckProperties::default(),
        }),
        Packet::Publish(publish(QoS::AtMostOnce, PublishProperties::default())),
        Packet::Publish(publish(QoS::AtLeastOnce, PublishProperties::default())),
        Packet::Publish(publish(QoS::ExactlyOnce, PublishProperties::default())),
        Packet::PubAck(Ack::new(1)),
        Packet::PubRec(Ack::new(2)),
        Packet::PubRel(Ack::new(3)),
        Packet::PubComp(Ack::new(u16::MAX)),
        Packet::Subscribe(subscribe(false)),
        Packet::SubAck(SubAck {
            packet_id: 77,
            reasons: vec![ReasonCode::GRANTED_QOS_2, ReasonCode::UNSPECIFIED_ERROR],
            reason_string: None,
        }),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 78,
            filters: vec!["a/+/c".into()],
            user_properties: vec![],
        }),
        Packet::UnsubAck(UnsubAck {
            packet_id: 78,
            reasons: vec![],
        }),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(Disconnect::default()),
    ]
}

// ---------------------------------------------------------------- round trips

#[test]
fn roundtrip_every_packet_v5() {
    for p in all_v5_packets() {
        roundtrip(&p, V5);
    }
}

#[test]
fn roundtrip_every_packet_v311_and_v31() {
    for v in [V311, V31] {
        for p in all_v311_packets(v) {
            roundtrip(&p, v);
        }
    }
}

#[test]
fn encode_returns_size_and_appends() {
    let mut out = BytesMut::from(&b"prefix"[..]);
    let n = encode(&Packet::PingReq, V311, None, &mut out).unwrap();
    assert_eq!(n, 2);
    assert_eq!(&out[..], b"prefix\xc0\x00");
}

#[test]
fn several_frames_in_one_buffer() {
    let mut buf = BytesMut::new();
    for p in all_v5_packets().iter().skip(1) {
        encode(p, V5, None, &mut buf).unwrap();
    }
    for p in all_v5_packets().iter().skip(1) {
        assert_eq!(&decode(&mut buf, Some(V5), MAX).unwrap().unwrap(), p);
    }
    assert!(buf.is_empty());
    assert_eq!(decode(&mut buf, Some(V5), MAX), Ok(None));
}

#[test]
fn publish_payload_is_zero_copy_slice_of_frame() {
    let bytes = enc(
        &Packet::Publish(publish(QoS::AtLeastOnce, full_publish_props())),
        V5,
    );
    let mut buf = BytesMut::from(&bytes[..]);
    let base = buf.as_ptr() as usize;
    let Some(Packet::Publish(p)) = decode(&mut buf, Some(V5), MAX).unwrap() else {
        panic!("not a publish")
    };
    let at = p.payload.as_ptr() as usize;
    assert!(at >= base && at < base + bytes.len(), "payload was copied");
}

// ---------------------------------------------------------------- framing (gap 1)

#[test]
fn incomplete_at_every_split_point_consumes_nothing() {
    let mut samples: Vec<(Vec<u8>, Option<ProtocolVersion>)> = vec![
        (enc(&Packet::Connect(Box::new(connect(V5))), V5), None),
        (enc(&Packet::Connect(Box::new(connect(V311))), V311), None),
    ];
    for p in all_v5_packets().iter().skip(1) {
        samples.push((enc(p, V5), Some(V5)));
    }
    // A frame whose remaining length needs 2 bytes.
    let big = Packet::Publish(Publish {
        payload: Bytes::from(vec![7u8; 300]),
        ..publish(QoS::AtLeastOnce, PublishProperties::default())
    });
    samples.push((enc(&big, V311), Some(V311)));
    for (bytes, v) in samples {
        for k in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..k]);
            assert_eq!(
                decode(&mut buf, v, MAX),
                Ok(None),
                "split at {k} of {bytes:02x?}"
            );
            assert_eq!(&buf[..], &bytes[..k], "consumed bytes at split {k}");
        }
        assert!(dec(&bytes, v).unwrap().is_some());
    }
}

#[test]
fn remaining_length_longer_than_4_bytes_is_malformed() {
    malformed(dec(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], Some(V311)));
    // The 4th byte with a continuation bit is enough to know.
    malformed(dec(&[0x30, 0xff, 0xff, 0xff, 0x80], Some(V311)));
    // Three continuation bytes: could still be valid, read more.
    assert_eq!(dec(&[0x30, 0xff, 0xff, 0xff], Some(V311)), Ok(None));
}

#[test]
fn non_minimal_remaining_length_is_malformed_mqtt_1_5_5_1() {
    malformed(dec(&[0xc0, 0x80, 0x00], Some(V311)));
}

#[test]
fn max_packet_size_counts_the_whole_packet_and_fires_on_the_header() {
    // PUBACK: 2 header bytes + 2 body bytes = 4.
    let bytes = [0x40, 0x02, 0x00, 0x01];
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(decode(&mut buf, Some(V311), 4).unwrap().is_some());
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(
        decode(&mut buf, Some(V311), 3),
        Err(DecodeError::TooLarge { size: 4, max: 3 })
    );
    // Only the fixed header of a 1 MB PUBLISH has arrived: refuse it now.
    let mut buf = BytesMut::from(&[0x30, 0x80, 0x80, 0x40][..]);
    assert_eq!(
        decode(&mut buf, Some(V5), 1000),
        Err(DecodeError::TooLarge {
            size: 1_048_580,
            max: 1000
        })
    );
    assert_eq!(
        DecodeError::TooLarge { size: 1, max: 0 }.reason_code(),
        ReasonCode::PACKET_TOO_LARGE
    );
}

#[test]
fn reserved_fixed_header_flags_mqtt_2_2_2_1_and_2_2_2_2() {
    assert!(dec(&[0x40, 0x02, 0x00, 0x01], Some(V311))
        .unwrap()
        .is_some());
    malformed(dec(&[0x41, 0x02, 0x00, 0x01], Some(V311)));
    assert!(dec(&[0x62, 0x02, 0x00, 0x01], Some(V311))
        .unwrap()
        .is_some());
    malformed(dec(&[0x60, 0x02, 0x00, 0x01], Some(V311)));
    malformed(dec(
        &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        Some(V311),
    ));
    malformed(dec(&[0xa0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'], Some(V311)));
    malformed(dec(&[0xc1, 0x00], Some(V311)));
    malformed(dec(&[0xd8, 0x00], Some(V311)));
    malformed(dec(&[0xe2, 0x00], Some(V5)));
    malformed(dec(&[0x20 | 0x04, 0x02, 0x00, 0x00], Some(V311)));
    // Checked on the first byte alone, before any length arrives.
    malformed(dec(&[0x61], Some(V311)));
}

#[test]
fn publish_qos_3_is_malformed_mqtt_3_3_1_4() {
    malformed(dec(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01], Some(V311)));
    malformed(dec(&[0x36], Some(V5)));
}

#[test]
fn dup_on_qos0_is_malformed_and_never_encoded_mqtt_3_3_1_2() {
    malformed(dec(&[0x38, 0x03, 0x00, 0x01, b'a'], Some(V311)));
    let p = Publish {
        dup: true,
        ..publish(QoS::AtMostOnce, PublishProperties::default())
    };
    assert_eq!(enc(&Packet::Publish(p), V311)[0], 0x31);
}

#[test]
fn packet_type_0_and_auth_before_v5_are_malformed() {
    malformed(dec(&[0x00, 0x00], Some(V311)));
    malformed(dec(&[0x00, 0x00], None));
    malformed(dec(&[0xf0, 0x00], Some(V311)));
    malformed(dec(&[0xf0, 0x00], Some(V31)));
    assert_eq!(
        encode(
            &Packet::Auth(Auth::default()),
            V311,
            None,
            &mut BytesMut::new()
        ),
        Err(EncodeError::Invalid("AUTH does not exist before MQTT 5"))
    );
}

#[test]
fn truncated_field_inside_complete_frame_is_malformed_not_incomplete() {
    // Topic length 5 but the frame holds one byte of it.
    malformed(dec(&[0x30, 0x03, 0x00, 0x05, b'a'], Some(V311)));
    // v5 property length runs past the frame.
    malformed(dec(&[0x30, 0x04, 0x00, 0x01, b'a', 0x05], Some(V5)));
    // A property that runs past the Property Length into the payload.
    malformed(dec(
        &[0x30, 0x0a, 0x00, 0x01, b'a', 0x02, 0x02, 0, 0, 0, 1, 9],
        Some(V5),
    ));
    // PUBACK one byte short.
    malformed(dec(&[0x40, 0x01, 0x00], Some(V311)));
}

#[test]
fn trailing_bytes_are_malformed() {
    malformed(dec(&[0x40, 0x03, 0x00, 0x01, 0x00], Some(V311)));
    malformed(dec(&[0xc0, 0x01, 0x00], Some(V5)));
    malformed(dec(&[0xe0, 0x01, 0x00], Some(V311)));
    malformed(dec(&[0x20, 0x03, 0x00, 0x00, 0x00], Some(V311)));
}

#[test]
fn first_packet_must_be_connect_and_only_once_mqtt_3_1_0_1_and_3_1_0_2() {
    protocol(dec(&[0xc0, 0x00], None));
    protocol(dec(&[0x30], None));
    let c = enc(&Packet::Connect(Box::new(connect(V311))), V311);
    assert_eq!(
        dec(&c, Some(V311)),
        Err(DecodeError::Protocol("second CONNECT [MQTT-3.1.0-2]"))
    );
}

// ---------------------------------------------------------------- CONNECT (gaps 4, 10)

/// CONNECT with the given protocol name, level, flags, and the bytes after Keep Alive.
fn connect_frame(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    let mut body = vec![0, name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(&[level, flags, 0, 60]);
    body.extend_from_slice(rest);
    frame(0x10, &body)
}

fn as_connect(p: Packet) -> Connect {
    match p {
        Packet::Connect(c) => *c,
        other => panic!("not a CONNECT: {other:?}"),
    }
}

#[test]
fn version_detection_gap_4() {
    let c = as_connect(dec1(&connect_frame(b"MQIsdp", 3, 0x02, b"\x00\x01a"), None));
    assert_eq!(
        (c.protocol, c.client_id.as_str(), c.keep_alive),
        (V31, "a", 60)
    );
    let c = as_connect(dec1(&connect_frame(b"MQTT", 4, 0x02, b"\x00\x01a"), None));
    assert_eq!(c.protocol, V311);
    let c = as_connect(dec1(
        &connect_frame(b"MQTT", 5, 0x02, b"\x00\x00\x01a"),
        None,
    ));
    assert_eq!(c.protocol, V5);
    assert_eq!(
        dec(&connect_frame(b"MQTT", 6, 0x02, b"\x00\x01a"), None),
        Err(DecodeError::UnsupportedProtocolVersion(6))
    );
    assert_eq!(
        dec(&connect_frame(b"MQIsdp", 4, 0x02, b"\x00\x01a"), None),
        Err(DecodeError::UnsupportedProtocolVersion(4))
    );
    assert_eq!(
        DecodeError::UnsupportedProtocolVersion(6).reason_code(),
        ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
    );
    protocol(dec(&connect_frame(b"HTTP", 4, 0x02, b"\x00\x01a"), None));
    protocol(dec(
        &connect_frame(b"\xff\xfe", 4, 0x02, b"\x00\x01a"),
        None,
    ));
}

#[test]
fn v311_connect_with_will_is_not_read_as_v5_gap_4() {
    // Will flag, QoS 1: will topic follows the client id directly (no will properties).
    let c = as_connect(dec1(
        &connect_frame(b"MQTT", 4, 0x0e, b"\x00\x01a\x00\x01w\x00\x02hi"),
        None,
    ));
    let w = c.will.unwrap();
    assert_eq!(
        (w.topic.as_str(), &w.payload[..], w.qos),
        ("w", &b"hi"[..], QoS::AtLeastOnce)
    );
}

#[test]
fn mqtt31_connect_encodes_mqisdp_level_3() {
    let c = Connect {
        will: None,
        username: None,
        password: None,
        ..connect(V31)
    };
    let bytes = enc(&Packet::Connect(Box::new(c)), V31);
    assert_eq!(&bytes[2..11], b"\x00\x06MQIsdp\x03");
}

#[test]
fn connect_protocol_must_match_encoding_version() {
    let r = encode(
        &Packet::Connect(Box::new(connect(V311))),
        V5,
        None,
        &mut BytesMut::new(),
    );
    assert!(matches!(r, Err(EncodeError::Invalid(_))));
}

#[test]
fn connect_reserved_flag_is_malformed_mqtt_3_1_2_3() {
    malformed(dec(&connect_frame(b"MQTT", 4, 0x03, b"\x00\x01a"), None));
    malformed(dec(
        &connect_frame(b"MQTT", 5, 0x03, b"\x00\x00\x01a"),
        None,
    ));
}

#[test]
fn will_qos_or_retain_without_will_flag_mqtt_3_1_2_11_13_15() {
    malformed(dec(&connect_frame(b"MQTT", 4, 0x0a, b"\x00\x01a"), None));
    malformed(dec(&connect_frame(b"MQTT", 4, 0x22, b"\x00\x01a"), None));
}

#[test]
fn will_qos_3_is_malformed_mqtt_3_1_2_14() {
    malformed(dec(
        &connect_frame(b"MQTT", 4, 0x1e, b"\x00\x01a\x00\x01w\x00\x00"),
        None,
    ));
}

#[test]
fn password_without_user_name_mqtt_3_1_2_22() {
    malformed(dec(
        &connect_frame(b"MQTT", 4, 0x42, b"\x00\x01a\x00\x01p"),
        None,
    ));
    malformed(dec(
        &connect_frame(b"MQIsdp", 3, 0x42, b"\x00\x01a\x00\x01p"),
        None,
    ));
    // MQTT 5 allows it (section 3.1.2.9).
    let c = as_connect(dec1(
        &connect_frame(b"MQTT", 5, 0x42, b"\x00\x00\x01a\x00\x01p"),
        None,
    ));
    assert_eq!(
        (c.username, c.password),
        (None, Some(Bytes::from_static(b"p")))
    );
    let c = Connect {
        username: None,
        ..connect(V311)
    };
    let r = encode(
        &Packet::Connect(Box::new(c)),
        V311,
        None,
        &mut BytesMut::new(),
    );
    assert!(matches!(r, Err(EncodeError::Invalid(_))));
}

#[test]
fn binary_password_gap_10() {
    let c = as_connect(dec1(
        &connect_frame(b"MQTT", 4, 0xc2, b"\x00\x01a\x00\x01u\x00\x03\xff\x00\xfe"),
        None,
    ));
    assert_eq!(c.password.as_deref(), Some(&b"\xff\x00\xfe"[..]));
}

#[test]
fn connect_strings_must_be_utf8_without_nul_mqtt_1_5_4_1_and_1_5_4_2() {
    malformed(dec(&connect_frame(b"MQTT", 4, 0x02, b"\x00\x01\x00"), None));
    malformed(dec(&connect_frame(b"MQTT", 4, 0x02, b"\x00\x01\xff"), None));
    malformed(dec(
        &connect_frame(b"MQTT", 4, 0x82, b"\x00\x01a\x00\x02\xc3\x28"),
        None,
    ));
    malformed(dec(
        &connect_frame(b"MQTT", 4, 0x06, b"\x00\x01a\x00\x01\x00\x00\x00"),
        None,
    ));
    // An encoded surrogate (U+D800) is ill-formed UTF-8.
    malformed(dec(
        &connect_frame(b"MQTT", 4, 0x02, b"\x00\x03\xed\xa0\x80"),
        None,
    ));
}

#[test]
fn v5_connect_properties_and_will_properties() {
    let c = connect(V5);
    let got = as_connect(dec1(&enc(&Packet::Connect(Box::new(c.clone())), V5), None));
    assert_eq!(got.properties, c.properties);
    let w = got.will.unwrap();
    assert_eq!(w.delay_interval, 10);
    assert_eq!(w.properties.content_type.as_deref(), Some("text/plain"));
    // Will Delay Interval is not a CONNECT property.
    malformed(dec(
        &connect_frame(b"MQTT", 5, 0x02, b"\x05\x18\x00\x00\x00\x01\x00\x01a"),
        None,
    ));
    // Topic Alias is not a will property.
    malformed(dec(
        &connect_frame(
            b"MQTT",
            5,
            0x06,
            b"\x00\x00\x01a\x03\x23\x00\x01\x00\x01w\x00\x00",
        ),
        None,
    ));
}

// ---------------------------------------------------------------- DISCONNECT / AUTH (gaps 2, 3)

#[test]
fn v5_disconnect_short_forms_gap_2_mqtt_3_14_4_3() {
    assert_eq!(
        dec1(&[0xe0, 0x00], Some(V5)),
        Packet::Disconnect(Disconnect::default())
    );
    assert_eq!(
        dec1(&[0xe0, 0x01, 0x04], Some(V5)),
        Packet::Disconnect(Disconnect {
            reason: ReasonCode::DISCONNECT_WITH_WILL,
            ..Disconnect::default()
        })
    );
    assert_eq!(
        dec1(
            &[0xe0, 0x07, 0x00, 0x05, 0x11, 0x00, 0x00, 0x00, 0x0a],
            Some(V5)
        ),
        Packet::Disconnect(Disconnect {
            session_expiry_interval: Some(10),
            ..Disconnect::default()
        })
    );
    assert_eq!(
        dec1(&[0xe0, 0x00], Some(V311)),
        Packet::Disconnect(Disconnect::default())
    );
    // Reason 0x03 does not exist for DISCONNECT.
    malformed(dec(&[0xe0, 0x01, 0x03], Some(V5)));
}

#[test]
fn v5_disconnect_encoding_omits_what_it_can_safely() {
    assert_eq!(
        enc(&Packet::Disconnect(Disconnect::default()), V5),
        [0xe0, 0x00]
    );
    let d = Disconnect {
        reason: ReasonCode::DISCONNECT_WITH_WILL,
        ..Disconnect::default()
    };
    // With a reason code the Property Length is written too (0): rumqttc 0.25 cannot decode
    // the shorter form the spec allows.
    assert_eq!(enc(&Packet::Disconnect(d), V5), [0xe0, 0x02, 0x04, 0x00]);
    // 3.1.1 has no reason: dropped.
    assert_eq!(
        enc(&Packet::Disconnect(full_disconnect()), V311),
        [0xe0, 0x00]
    );
}

#[test]
fn auth_gap_3() {
    assert_eq!(dec1(&[0xf0, 0x00], Some(V5)), Packet::Auth(Auth::default()));
    assert_eq!(
        dec1(
            &[0xf0, 0x09, 0x18, 0x07, 0x15, 0x00, 0x01, b'M', 0x16, 0x00, 0x00],
            Some(V5)
        ),
        Packet::Auth(Auth {
            reason: ReasonCode::CONTINUE_AUTHENTICATION,
            authentication_method: Some("M".into()),
            authentication_data: Some(Bytes::new()),
        })
    );
    assert_eq!(enc(&Packet::Auth(Auth::default()), V5), [0xf0, 0x00]);
    malformed(dec(&[0xf0, 0x01, 0x80], Some(V5)));
}

// ---------------------------------------------------------------- UNSUBSCRIBE / CONNACK (gaps 5, 6)

#[test]
fn v5_unsubscribe_decoded_without_mqttbytes_gap_5() {
    assert_eq!(
        dec1(
            &[0xa2, 0x08, 0x00, 0x0a, 0x00, 0x00, 0x03, b'a', b'/', b'b'],
            Some(V5)
        ),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 10,
            filters: vec!["a/b".into()],
            user_properties: vec![],
        })
    );
}

#[test]
fn v5_connack_always_has_property_length_gap_6() {
    let c = ConnAck {
        session_present: false,
        reason: ReasonCode::SUCCESS,
        properties: ConnAckProperties::default(),
    };
    assert_eq!(enc(&Packet::ConnAck(c), V5), [0x20, 0x03, 0x00, 0x00, 0x00]);
    malformed(dec(&[0x20, 0x02, 0x00, 0x00], Some(V5)));
    // Reserved acknowledge flags [MQTT-3.2.2-1].
    malformed(dec(&[0x20, 0x03, 0x02, 0x00, 0x00], Some(V5)));
}

#[test]
fn v311_connack_return_code_mapping() {
    let cases = [
        (0x00, 0),
        (0x84, 1),
        (0x85, 2),
        (0x88, 3),
        (0x89, 3),
        (0x86, 4),
        (0x87, 5),
        (0x80, 3),
        (0x8A, 3),
        (0x9F, 3),
    ];
    for (reason, code) in cases {
        let c = ConnAck {
            session_present: false,
            reason: ReasonCode(reason),
            properties: full_connack_props(),
        };
        assert_eq!(
            enc(&Packet::ConnAck(c), V311),
            [0x20, 0x02, 0x00, code],
            "reason {reason:#x}"
        );
    }
    let p = dec1(&[0x20, 0x02, 0x01, 0x04], Some(V311));
    assert_eq!(
        p,
        Packet::ConnAck(ConnAck {
            session_present: true,
            reason: ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            properties: ConnAckProperties::default(),
        })
    );
    malformed(dec(&[0x20, 0x02, 0x00, 0x06], Some(V311)));
}

// ---------------------------------------------------------------- acks

#[test]
fn v5_ack_short_forms() {
    assert_eq!(
        enc(&Packet::PubAck(Ack::new(7)), V5),
        [0x40, 0x02, 0x00, 0x07]
    );
    let a = Ack {
        reason: ReasonCode::NO_MATCHING_SUBSCRIBERS,
        ..Ack::new(7)
    };
    assert_eq!(
        enc(&Packet::PubAck(a.clone()), V5),
        [0x40, 0x04, 0x00, 0x07, 0x10, 0x00]
    );
    assert_eq!(
        dec1(&[0x40, 0x03, 0x00, 0x07, 0x10], Some(V5)),
        Packet::PubAck(a)
    );
    assert_eq!(
        dec1(&[0x62, 0x04, 0x00, 0x07, 0x00, 0x00], Some(V5)),
        Packet::PubRel(Ack::new(7))
    );
    // 0x10 is a PUBACK reason, not a PUBREL one.
    malformed(dec(&[0x62, 0x03, 0x00, 0x07, 0x10], Some(V5)));
}

#[test]
fn v311_publish_drops_v5_properties() {
    let p = publish(QoS::AtLeastOnce, full_publish_props());
    let Packet::Publish(got) = dec1(&enc(&Packet::Publish(p.clone()), V311), Some(V311)) else {
        panic!("not a publish")
    };
    assert_eq!(got.properties, PublishProperties::default());
    assert_eq!((got.topic, got.payload), (p.topic, p.payload));
}

#[test]
fn v311_acks_drop_reason_and_properties() {
    assert_eq!(
        enc(&Packet::PubAck(full_ack()), V311),
        [0x40, 0x02, 0x00, 0x09]
    );
    assert_eq!(
        enc(&Packet::PubRel(full_ack()), V311),
        [0x62, 0x02, 0x00, 0x09]
    );
}

#[test]
fn v311_suback_mapping_and_unsuback_without_reasons() {
    let s = SubAck {
        packet_id: 5,
        reasons: vec![
            ReasonCode(0),
            ReasonCode(1),
            ReasonCode(2),
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode::TOPIC_FILTER_INVALID,
        ],
        reason_string: Some("dropped".into()),
    };
    assert_eq!(
        enc(&Packet::SubAck(s), V311),
        [0x90, 0x07, 0x00, 0x05, 0, 1, 2, 0x80, 0x80]
    );
    malformed(dec(&[0x90, 0x03, 0x00, 0x05, 0x87], Some(V311)));
    let u = UnsubAck {
        packet_id: 7,
        reasons: vec![ReasonCode::NO_SUBSCRIPTION_EXISTED],
    };
    assert_eq!(enc(&Packet::UnsubAck(u), V311), [0xb0, 0x02, 0x00, 0x07]);
}

#[test]
fn packet_id_zero_is_a_protocol_error_mqtt_2_2_1_3() {
    protocol(dec(&[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00], Some(V311)));
    protocol(dec(&[0x40, 0x02, 0x00, 0x00], Some(V311)));
    protocol(dec(&[0x50, 0x02, 0x00, 0x00], Some(V5)));
    protocol(dec(
        &[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00],
        Some(V311),
    ));
    protocol(dec(&[0xa2, 0x05, 0x00, 0x00, 0x00, 0x01, b'a'], Some(V311)));
    let p = Publish {
        packet_id: 0,
        ..publish(QoS::AtLeastOnce, PublishProperties::default())
    };
    let mut out = BytesMut::new();
    assert!(matches!(
        encode(&Packet::Publish(p), V311, None, &mut out),
        Err(EncodeError::Invalid(_))
    ));
    assert!(out.is_empty());
    // QoS 0 carries no packet identifier at all.
    let p = dec1(&[0x30, 0x04, 0x00, 0x01, b'a', b'x'], Some(V311));
    assert!(matches!(p, Packet::Publish(Publish { packet_id: 0, .. })));
}

// ---------------------------------------------------------------- SUBSCRIBE / UNSUBSCRIBE (gap 9)

#[test]
fn empty_subscribe_and_unsubscribe_mqtt_3_8_3_3_and_3_10_3_2() {
    protocol(dec(&[0x82, 0x02, 0x00, 0x01], Some(V311)));
    protocol(dec(&[0x82, 0x03, 0x00, 0x01, 0x00], Some(V5)));
    protocol(dec(&[0xa2, 0x02, 0x00, 0x01], Some(V311)));
    protocol(dec(&[0xa2, 0x03, 0x00, 0x01, 0x00], Some(V5)));
}

#[test]
fn subscription_options() {
    // [MQTT-3.8.3-4] 3.1.1: upper six bits reserved.
    malformed(dec(
        &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x04],
        Some(V311),
    ));
    // QoS 3: malformed in 3.1.1 [MQTT-3-8.3-4], a Protocol Error in v5 (section 3.8.3.1).
    malformed(dec(
        &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03],
        Some(V311),
    ));
    protocol(dec(
        &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x03],
        Some(V5),
    ));
    // [MQTT-3.8.3-5] v5: bits 6-7 reserved.
    malformed(dec(
        &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x40],
        Some(V5),
    ));
    // Section 3.8.3.1: Retain Handling 3 is a Protocol Error.
    protocol(dec(
        &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x30],
        Some(V5),
    ));
    // All v5 options at once: QoS 2, No Local, RAP, Retain Handling 2.
    let p = dec1(
        &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x2e],
        Some(V5),
    );
    let Packet::Subscribe(s) = p else { panic!() };
    assert_eq!(
        s.filters[0],
        SubscribeFilter {
            filter: "a".into(),
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainHandling::Never,
        }
    );
}

// ---------------------------------------------------------------- v5 properties (gap 9)

/// A v5 PUBLISH "a" QoS 0 with the given raw property block.
fn publish_with_props(props: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, 0x01, b'a', props.len() as u8];
    body.extend_from_slice(props);
    body.extend_from_slice(b"pl");
    frame(0x30, &body)
}

#[test]
fn v5_property_rules() {
    // Topic Alias 0 [MQTT-3.3.2-8] decodes; the connection refuses it with 0x94, which
    // needs the negotiated maximum the codec does not know.
    match dec1(&publish_with_props(&[0x23, 0x00, 0x00]), Some(V5)) {
        Packet::Publish(p) => assert_eq!(p.properties.topic_alias, Some(0)),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    // Subscription Identifier 0 (section 3.8.2.1.2), in PUBLISH and SUBSCRIBE.
    protocol(dec(&publish_with_props(&[0x0b, 0x00]), Some(V5)));
    protocol(dec(
        &[0x82, 0x08, 0x00, 0x01, 0x02, 0x0b, 0x00, 0x00, 0x01, b'a'],
        Some(V5),
    ));
    // Duplicate single-use property.
    protocol(dec(
        &publish_with_props(&[0x01, 0x00, 0x01, 0x01]),
        Some(V5),
    ));
    // Repeatable: user properties everywhere, subscription ids in PUBLISH only.
    assert!(
        dec(&publish_with_props(&[0x0b, 0x01, 0x0b, 0x02]), Some(V5))
            .unwrap()
            .is_some()
    );
    let two_ids = [
        0x82, 0x0a, 0x00, 0x01, 0x04, 0x0b, 0x01, 0x0b, 0x02, 0x00, 0x01, b'a', 0x00,
    ];
    protocol(dec(&two_ids, Some(V5)));
    // Property not allowed in this packet (section 2.2.2.2: Malformed).
    malformed(dec(&publish_with_props(&[0x11, 0, 0, 0, 1]), Some(V5)));
    malformed(dec(&publish_with_props(&[0x7f]), Some(V5)));
    // Receive Maximum 0, Maximum Packet Size 0 in CONNECT and CONNACK.
    protocol(dec(
        &connect_frame(b"MQTT", 5, 0x02, b"\x03\x21\x00\x00\x00\x01a"),
        None,
    ));
    protocol(dec(
        &connect_frame(b"MQTT", 5, 0x02, b"\x05\x27\x00\x00\x00\x00\x00\x01a"),
        None,
    ));
    protocol(dec(
        &[0x20, 0x06, 0x00, 0x00, 0x03, 0x21, 0x00, 0x00],
        Some(V5),
    ));
    // Byte properties limited to 0/1.
    protocol(dec(
        &connect_frame(b"MQTT", 5, 0x02, b"\x02\x17\x02\x00\x01a"),
        None,
    ));
    protocol(dec(&[0x20, 0x05, 0x00, 0x00, 0x02, 0x24, 0x02], Some(V5)));
    // Non-UTF-8 user property.
    malformed(dec(
        &publish_with_props(&[0x26, 0x00, 0x01, 0xff, 0x00, 0x00]),
        Some(V5),
    ));
}

#[test]
fn publish_topic_only_needs_a_utf8_string_the_topic_module_checks_the_rest() {
    let p = dec1(
        &[0x30, 0x06, 0x00, 0x03, b'a', b'/', b'+', b'x'],
        Some(V311),
    );
    assert!(matches!(p, Packet::Publish(Publish { ref topic, .. }) if topic == "a/+"));
    malformed(dec(&[0x30, 0x04, 0x00, 0x01, 0xff, b'x'], Some(V311)));
    // Empty topic: legal on the wire in v5 with a Topic Alias.
    let p = dec1(&[0x30, 0x06, 0x00, 0x00, 0x03, 0x23, 0x00, 0x05], Some(V5));
    assert!(matches!(p, Packet::Publish(Publish { ref topic, .. }) if topic.is_empty()));
}

/// [MQTT-1.5.3-1, MQTT-1.5.3-2, MQTT-1.5.4-1, MQTT-1.5.4-2]: topic names and filters are
/// UTF-8 strings like any other: U+0000 and surrogates in them are Malformed, in both versions.
#[test]
fn topics_and_filters_refuse_nul_and_surrogates_mqtt_1_5_3_and_1_5_4() {
    for bad in [
        &b"a\x00b"[..],
        b"\xed\xa0\x80",
        b"\xed\xbf\xbf",
        b"\xc0\xaf",
    ] {
        let mut s = vec![0x00, bad.len() as u8];
        s.extend_from_slice(bad);
        for v in [V311, V5] {
            let props: &[u8] = if v == V5 { &[0x00] } else { &[] };
            let mut publish = s.clone();
            publish.extend_from_slice(props);
            publish.push(b'x');
            malformed(dec(&frame(0x30, &publish), Some(v)));
            let mut sub = vec![0x00, 0x01];
            sub.extend_from_slice(props);
            sub.extend_from_slice(&s);
            sub.push(0x00);
            malformed(dec(&frame(0x82, &sub), Some(v)));
            let mut unsub = vec![0x00, 0x01];
            unsub.extend_from_slice(props);
            unsub.extend_from_slice(&s);
            malformed(dec(&frame(0xa2, &unsub), Some(v)));
        }
    }
}

/// A CONNECT that does not decode stays in the buffer, and `connect_version` reads its version
/// from the name and level alone (the caller answers a v5 client with a CONNACK).
#[test]
fn refused_connect_stays_buffered_and_names_its_version() {
    for (level, v) in [(4, V311), (5, V5)] {
        let bytes = connect_frame(b"MQTT", level, 0x02, b"\x00\x01\x00");
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(decode(&mut buf, None, MAX).is_err());
        assert_eq!(&buf[..], &bytes[..]);
        assert_eq!(connect_version(&buf), Some(v));
    }
    let good = enc(&Packet::Connect(Box::new(connect(V5))), V5);
    let mut buf = BytesMut::from(&good[..]);
    assert!(matches!(
        decode(&mut buf, None, MAX),
        Ok(Some(Packet::Connect(_)))
    ));
    assert!(buf.is_empty());
    // Fixed header (2 bytes), name (6), level: known once 9 bytes are in.
    let small = connect_frame(b"MQTT", 5, 0x02, b"\x00\x00\x01a");
    assert_eq!(connect_version(&small[..8]), None, "level not buffered yet");
    assert_eq!(connect_version(&small[..9]), Some(V5));
    assert_eq!(connect_version(&connect_frame(b"MQTT", 9, 0x02, b"")), None);
    assert_eq!(
        connect_version(&connect_frame(b"MQIsdp", 3, 0x02, b"")),
        Some(V31)
    );
    assert_eq!(connect_version(&[0x30, 0x00]), None);
}

// ---------------------------------------------------------------- encoder limits (gap 8)

#[test]
fn encoder_refuses_oversized_strings_and_leaves_nothing_mqtt_1_5_4() {
    let long = "x".repeat(70_000);
    let cases = vec![
        Packet::Publish(Publish {
            topic: long.clone(),
            ..publish(QoS::AtMostOnce, PublishProperties::default())
        }),
        Packet::Subscribe(Subscribe {
            filters: vec![SubscribeFilter {
                filter: long.clone(),
                ..subscribe(true).filters[0].clone()
            }],
            ..subscribe(true)
        }),
        Packet::Connect(Box::new(Connect {
            password: Some(Bytes::from(vec![0u8; 70_000])),
            ..connect(V5)
        })),
        Packet::PubAck(Ack {
            user_properties: vec![("k".into(), long.clone())],
            ..Ack::new(1)
        }),
    ];
    for p in cases {
        let mut out = BytesMut::from(&b"keep"[..]);
        let r = encode(&p, V5, None, &mut out);
        assert!(
            matches!(r, Err(EncodeError::Invalid(_))),
            "{}: {r:?}",
            p.name()
        );
        assert_eq!(&out[..], b"keep");
    }
}

#[test]
fn encoder_enforces_peer_maximum_packet_size_mqtt_3_1_2_24() {
    let p = Packet::Publish(Publish {
        payload: Bytes::from(vec![1u8; 200]),
        ..publish(QoS::AtLeastOnce, PublishProperties::default())
    });
    let size = enc(&p, V5).len();
    let mut out = BytesMut::from(&b"keep"[..]);
    assert_eq!(encode(&p, V5, Some(size), &mut out), Ok(size));
    let mut out = BytesMut::from(&b"keep"[..]);
    assert_eq!(
        encode(&p, V5, Some(size - 1), &mut out),
        Err(EncodeError::TooLarge {
            size,
            max: size - 1
        })
    );
    assert_eq!(&out[..], b"keep");
}

/// [MQTT-3.2.2-19, MQTT-3.2.2-20, MQTT-3.4.2-2, MQTT-3.4.2-3, MQTT-3.14.2-3, MQTT-3.14.2-4]:
/// over the peer's maximum, the Reason String goes first, then the User Properties; the
/// rest of the packet is kept, and what still does not fit is refused.
#[test]
fn encoder_drops_reason_string_then_user_properties_to_fit_the_peer_maximum() {
    let ack = full_ack();
    let no_reason = Ack {
        reason_string: None,
        ..ack.clone()
    };
    let bare = Ack {
        user_properties: vec![],
        ..no_reason.clone()
    };
    let connack = ConnAck {
        session_present: true,
        reason: ReasonCode::SUCCESS,
        properties: full_connack_props(),
    };
    let mut connack_no_reason = connack.clone();
    connack_no_reason.properties.reason_string = None;
    let mut connack_bare = connack_no_reason.clone();
    connack_bare.properties.user_properties.clear();
    let disconnect = full_disconnect();
    let disconnect_bare = Disconnect {
        reason_string: None,
        user_properties: vec![],
        ..disconnect.clone()
    };
    let suback = SubAck {
        packet_id: 3,
        reasons: vec![ReasonCode(1)],
        reason_string: Some("granted".into()),
    };
    let suback_bare = SubAck {
        reason_string: None,
        ..suback.clone()
    };
    // (packet, what fits a maximum of exactly its size, whether nothing is left to drop)
    let cases = [
        (
            Packet::PubAck(ack.clone()),
            Packet::PubAck(no_reason),
            false,
        ),
        (
            Packet::PubAck(ack.clone()),
            Packet::PubAck(bare.clone()),
            true,
        ),
        (Packet::PubRel(ack), Packet::PubRel(bare), true),
        (
            Packet::ConnAck(connack.clone()),
            Packet::ConnAck(connack_no_reason),
            false,
        ),
        (
            Packet::ConnAck(connack),
            Packet::ConnAck(connack_bare),
            true,
        ),
        (
            Packet::Disconnect(disconnect),
            Packet::Disconnect(disconnect_bare),
            true,
        ),
        (Packet::SubAck(suback), Packet::SubAck(suback_bare), true),
    ];
    for (full, fitting, smallest) in cases {
        let expected = enc(&fitting, V5);
        let mut out = BytesMut::from(&b"keep"[..]);
        assert_eq!(
            encode(&full, V5, Some(expected.len()), &mut out),
            Ok(expected.len()),
            "{full:?}"
        );
        assert_eq!(&out[4..], &expected[..], "{full:?}");
        if smallest {
            let mut out = BytesMut::from(&b"keep"[..]);
            assert!(matches!(
                encode(&full, V5, Some(expected.len() - 1), &mut out),
                Err(EncodeError::TooLarge { .. })
            ));
            assert_eq!(&out[..], b"keep");
        }
    }
    // A PUBLISH is never trimmed: its User Properties are part of the message.
    let p = Packet::Publish(publish(QoS::AtMostOnce, full_publish_props()));
    let size = enc(&p, V5).len();
    assert!(matches!(
        encode(&p, V5, Some(size - 1), &mut BytesMut::new()),
        Err(EncodeError::TooLarge { .. })
    ));
}

#[test]
fn encoder_refuses_remaining_length_beyond_protocol_limit() {
    let p = Packet::Publish(Publish {
        payload: Bytes::from(vec![0u8; wire::MAX_VBI]),
        ..publish(QoS::AtMostOnce, PublishProperties::default())
    });
    let mut out = BytesMut::new();
    assert!(matches!(
        encode(&p, V311, None, &mut out),
        Err(EncodeError::Invalid(_))
    ));
    assert!(out.is_empty());
}

#[test]
fn encoder_refuses_unrepresentable_values() {
    let bad = [
        Packet::Subscribe(Subscribe {
            filters: vec![],
            ..subscribe(true)
        }),
        Packet::Subscribe(Subscribe {
            subscription_identifier: Some(0),
            ..subscribe(true)
        }),
        Packet::Publish(publish(
            QoS::AtMostOnce,
            PublishProperties {
                topic_alias: Some(0),
                ..PublishProperties::default()
            },
        )),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 1,
            filters: vec![],
            user_properties: vec![],
        }),
        Packet::SubAck(SubAck {
            packet_id: 0,
            reasons: vec![ReasonCode(0)],
            reason_string: None,
        }),
    ];
    for p in bad {
        let r = encode(&p, V5, None, &mut BytesMut::new());
        assert!(
            matches!(r, Err(EncodeError::Invalid(_))),
            "{}: {r:?}",
            p.name()
        );
    }
}

#[test]
fn variable_byte_integer_boundaries() {
    for v in [
        0,
        127,
        128,
        16_383,
        16_384,
        2_097_151,
        2_097_152,
        wire::MAX_VBI,
    ] {
        let mut out = BytesMut::new();
        wire::put_vbi(&mut out, v).unwrap();
        assert_eq!(out.len(), wire::vbi_len(v));
        assert!(
            matches!(wire::scan_vbi(&out), Ok(wire::Vbi::Done(x, n)) if x == v && n == out.len())
        );
    }
    assert!(wire::put_vbi(&mut BytesMut::new(), wire::MAX_VBI + 1).is_err());
}

#[test]
fn errors_display_and_map_to_reason_codes() {
    assert_eq!(
        DecodeError::Malformed("x").reason_code(),
        ReasonCode::MALFORMED_PACKET
    );
    assert_eq!(
        DecodeError::Protocol("x").reason_code(),
        ReasonCode::PROTOCOL_ERROR
    );
    assert_eq!(DecodeError::Protocol("x").to_string(), "protocol error: x");
    assert!(EncodeError::TooLarge { size: 2, max: 1 }
        .to_string()
        .contains("2 bytes"));
}

// ---------------------------------------------------------------- cross-check with mqttbytes

#[test]
fn mqttbytes_decodes_what_we_encode() {
    use mqttbytes::{v4, v5};
    let p = publish(QoS::AtLeastOnce, full_publish_props());
    let mut buf = BytesMut::from(&enc(&Packet::Publish(p.clone()), V5)[..]);
    let Ok(v5::Packet::Publish(theirs)) = v5::read(&mut buf, MAX) else {
        panic!("mqttbytes rejected our v5 PUBLISH")
    };
    assert_eq!(
        (theirs.topic.as_str(), theirs.pkid, &theirs.payload),
        (p.topic.as_str(), p.packet_id, &p.payload)
    );
    let tp = theirs.properties.unwrap();
    assert_eq!(tp.subscription_identifiers, vec![1, 268_435_455]);
    assert_eq!(tp.user_properties, users());
    assert_eq!(tp.topic_alias, Some(7));

    let ack = ConnAck {
        session_present: true,
        reason: ReasonCode::SUCCESS,
        properties: full_connack_props(),
    };
    let mut buf = BytesMut::from(&enc(&Packet::ConnAck(ack), V5)[..]);
    let Ok(v5::Packet::ConnAck(theirs)) = v5::read(&mut buf, MAX) else {
        panic!("mqttbytes rejected our v5 CONNACK")
    };
    assert!(theirs.session_present);
    assert_eq!(
        theirs
            .properties
            .unwrap()
            .assigned_client_identifier
            .as_deref(),
        Some("auto-1")
    );

    let mut buf = BytesMut::from(&enc(&Packet::Subscribe(subscribe(true)), V5)[..]);
    let Ok(v5::Packet::Subscribe(theirs)) = v5::read(&mut buf, MAX) else {
        panic!("mqttbytes rejected our v5 SUBSCRIBE")
    };
    assert_eq!(theirs.properties.unwrap().id, Some(300));
    assert!(theirs.filters[0].nolocal && theirs.filters[0].preserve_retain);

    let c = Connect {
        password: Some(Bytes::from_static(b"secret")),
        ..connect(V311)
    };
    let mut buf = BytesMut::from(&enc(&Packet::Connect(Box::new(c)), V311)[..]);
    let Ok(v4::Packet::Connect(theirs)) = v4::read(&mut buf, MAX) else {
        panic!("mqttbytes rejected our 3.1.1 CONNECT")
    };
    let login = theirs.login.unwrap();
    assert_eq!(
        (login.username.as_str(), login.password.as_str()),
        ("user", "secret")
    );
    assert_eq!(theirs.last_will.unwrap().topic, "will/t");
}

#[test]
fn we_decode_what_mqttbytes_encodes() {
    use mqttbytes::v5;
    let mut theirs = v5::Publish::new("t/1", mqttbytes::QoS::ExactlyOnce, b"data".to_vec());
    theirs.pkid = 12;
    theirs.properties = Some(v5::PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(5),
        topic_alias: None,
        response_topic: Some("r".into()),
        correlation_data: None,
        user_properties: users(),
        subscription_identifiers: vec![3],
        content_type: None,
    });
    let mut buf = BytesMut::new();
    theirs.write(&mut buf).unwrap();
    let Packet::Publish(p) = dec1(&buf, Some(V5)) else {
        panic!()
    };
    assert_eq!(
        (p.topic.as_str(), p.packet_id, &p.payload[..]),
        ("t/1", 12, &b"data"[..])
    );
    assert_eq!(p.properties.subscription_identifiers, vec![3]);
    assert_eq!(p.properties.response_topic.as_deref(), Some("r"));
}

// ---------------------------------------------------------------- fuzz

/// Decodes everything in `bytes`; whatever decodes must re-encode and decode to itself.
/// Returns how many packets decoded.
fn decode_all(bytes: &[u8], v: Option<ProtocolVersion>) -> usize {
    let mut buf = BytesMut::from(bytes);
    let mut version = v;
    let mut decoded = 0;
    while let Ok(Some(p)) = decode(&mut buf, version, MAX) {
        decoded += 1;
        let ver = match (&p, version) {
            (Packet::Connect(c), _) => c.protocol,
            (_, Some(v)) => v,
            (_, None) => unreachable!("only CONNECT decodes without a version"),
        };
        let again = enc(&p, ver);
        let back_ver = if version.is_none() { None } else { Some(ver) };
        assert_eq!(dec1(&again, back_ver), p, "re-encoding changed {p:?}");
        version = Some(ver);
    }
    decoded
}

#[test]
fn fuzz_random_and_mutated_frames_never_panic() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut corpus: Vec<(Vec<u8>, Option<ProtocolVersion>)> = Vec::new();
    for p in all_v5_packets() {
        let v = if matches!(p, Packet::Connect(_)) {
            None
        } else {
            Some(V5)
        };
        corpus.push((enc(&p, V5), v));
    }
    for ver in [V311, V31] {
        for p in all_v311_packets(ver) {
            let v = if matches!(p, Packet::Connect(_)) {
                None
            } else {
                Some(ver)
            };
            corpus.push((enc(&p, ver), v));
        }
    }
    let versions = [None, Some(V31), Some(V311), Some(V5)];
    let mut decoded = 0;
    for i in 0..200_000 {
        let (mut bytes, mut v) = corpus[rng.below(corpus.len())].clone();
        if i % 4 == 0 {
            // Pure noise.
            let n = rng.below(48);
            bytes = (0..n).map(|_| rng.next() as u8).collect();
            v = versions[rng.below(versions.len())];
        } else {
            for _ in 0..=rng.below(4) {
                match rng.below(5) {
                    0 if !bytes.is_empty() => {
                        let at = rng.below(bytes.len());
                        bytes[at] = rng.next() as u8;
                    }
                    1 if !bytes.is_empty() => {
                        let at = rng.below(bytes.len());
                        bytes[at] ^= 1 << rng.below(8);
                    }
                    2 => {
                        let at = rng.below(bytes.len() + 1);
                        bytes.insert(at, rng.next() as u8);
                    }
                    3 if !bytes.is_empty() => {
                        let at = rng.below(bytes.len());
                        bytes.remove(at);
                    }
                    _ => bytes.truncate(rng.below(bytes.len() + 1)),
                }
            }
            if rng.below(8) == 0 {
                v = versions[rng.below(versions.len())];
            }
        }
        decoded += decode_all(&bytes, v);
    }
    // Mutations must leave enough valid frames for the re-encode check to mean something.
    assert!(decoded > 10_000, "only {decoded} frames decoded");
}

/// MQTT 3.1 (protocol level 3) CONNACK: the first byte is reserved and must be 0, so a resumed
/// session is not announced to a 3.1 client; 3.1.1 sets Session Present [MQTT-3.2.2-2].
#[test]
fn connack_session_present_only_from_311_on() {
    let ack = Packet::ConnAck(ConnAck {
        session_present: true,
        reason: ReasonCode::SUCCESS,
        properties: ConnAckProperties::default(),
    });
    let mut out = BytesMut::new();
    encode(&ack, ProtocolVersion::V31, None, &mut out).expect("encode");
    assert_eq!(&out[..], &[0x20, 0x02, 0x00, 0x00]);
    out.clear();
    encode(&ack, ProtocolVersion::V311, None, &mut out).expect("encode");
    assert_eq!(&out[..], &[0x20, 0x02, 0x01, 0x00]);
}
