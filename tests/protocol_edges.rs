//! Protocol edges of issue #12, black box over real sockets with exact bytes: packets that must
//! fit the client's Maximum Packet Size (CONNACK above all), UTF-8 strings that must close the
//! connection wherever they appear, and a takeover of a session that ended with its connection.
mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use tether::codec;
use tether::packet::{ConnAck, Packet, ProtocolVersion, Publish, QoS, ReasonCode};
use tether::stats::Stats;
use tokio::io::AsyncReadExt;

/// Short window for "nothing (more) arrives".
const QUIET: Duration = Duration::from_millis(300);

/// Every byte the broker sends until it closes the connection (EOF or reset), failing after
/// `WAIT`. Only for a client with nothing buffered.
async fn read_to_close(c: &mut Raw) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, c.stream.read(&mut chunk)).await {
            Err(_) => panic!("connection not closed; received {got:02x?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One whole packet as the broker sent it (a remaining length below 128 bytes).
async fn read_small_packet(c: &mut Raw) -> Vec<u8> {
    let mut bytes = c.read_exact(2).await;
    assert!(bytes[1] < 0x80, "unexpectedly long packet: {bytes:02x?}");
    bytes.extend(c.read_exact(usize::from(bytes[1])).await);
    bytes
}

fn decode_connack(bytes: &[u8]) -> ConnAck {
    let mut buf = BytesMut::from(bytes);
    match codec::decode(&mut buf, Some(ProtocolVersion::V5), usize::MAX) {
        Ok(Some(Packet::ConnAck(a))) => a,
        other => panic!("expected a CONNACK, got {other:?}"),
    }
}

/// The CONNACK the default configuration sends a new v5 session: Receive Maximum 64, Maximum
/// Packet Size 1 MiB and Topic Alias Maximum 16, nothing else.
const V5_CONNACK: [u8; 16] = [
    0x20, 0x0e, 0x00, 0x00, 0x0b, // session present 0, success, 11 bytes of properties
    0x21, 0x00, 0x40, // Receive Maximum 64
    0x27, 0x00, 0x10, 0x00, 0x00, // Maximum Packet Size 1,048,576
    0x22, 0x00, 0x10, // Topic Alias Maximum 16
];

// ---------------------------------------------------------------------------------------------
// 1. Packets the client's Maximum Packet Size admits
// ---------------------------------------------------------------------------------------------

/// Properties whose value is the default when absent are not sent: Retain Available,
/// Wildcard, Subscription Identifier and Shared Subscription Available (absent = 1) and
/// Maximum QoS (absent = 2) (section 3.2.2.3).
fn assert_no_default_valued_properties(a: &ConnAck) {
    let p = &a.properties;
    assert_eq!(p.retain_available, None, "{a:?}");
    assert_eq!(p.wildcard_subscription_available, None, "{a:?}");
    assert_eq!(p.subscription_identifiers_available, None, "{a:?}");
    assert_eq!(p.shared_subscription_available, None, "{a:?}");
    assert_eq!(p.maximum_qos, None, "{a:?}");
}

/// [MQTT-3.1.2-24, MQTT-3.1.2-25]: a client with Maximum Packet Size 20 gets a CONNACK of at
/// most 20 bytes (here 16), without default-valued properties, and can go on using the
/// connection.
#[tokio::test]
async fn v5_connack_fits_a_maximum_packet_size_of_20_mqtt_3_1_2_24() {
    let b = TestBroker::start().await;
    let mut connect = v5_connect("small", true);
    connect.properties.maximum_packet_size = Some(20);
    let mut c = b.raw().await;
    c.version = ProtocolVersion::V5;
    c.send_packet(&Packet::Connect(Box::new(connect))).await;
    let bytes = read_small_packet(&mut c).await;
    assert!(bytes.len() <= 20, "CONNACK of {} bytes", bytes.len());
    assert_eq!(bytes, V5_CONNACK);
    let ack = decode_connack(&bytes);
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
    assert_no_default_valued_properties(&ack);

    c.sub_v5(1, "small/t", QoS::AtMostOnce).await;
    c.send(&[0xc0, 0x00]).await;
    c.expect_bytes(&[0xd0, 0x00]).await;
    b.stop().await;
}

/// Section 3.2.2.3: an ordinary CONNACK carries none of the default-valued properties either.
#[tokio::test]
async fn v5_connack_carries_no_default_valued_properties() {
    let b = TestBroker::start().await;
    let mut c = b.raw().await;
    c.version = ProtocolVersion::V5;
    c.send_packet(&Packet::Connect(Box::new(v5_connect("plain", true))))
        .await;
    let bytes = read_small_packet(&mut c).await;
    assert_eq!(bytes, V5_CONNACK);
    assert_no_default_valued_properties(&decode_connack(&bytes));
    b.stop().await;
}

/// [MQTT-3.1.2-24]: when not even the smallest CONNACK fits (Maximum Packet Size 10 < 16), the
/// broker sends nothing and closes the connection instead of leaving the client waiting; the
/// session it would have had is not left behind.
#[tokio::test]
async fn v5_connack_that_cannot_fit_closes_the_connection() {
    let b = TestBroker::start().await;
    let mut connect = v5_connect("tiny", true);
    connect.properties.maximum_packet_size = Some(10);
    let mut c = b.raw().await;
    c.version = ProtocolVersion::V5;
    c.send_packet(&Packet::Connect(Box::new(connect))).await;
    assert_eq!(read_to_close(&mut c).await, b"");
    eventually("no session left for tiny", || {
        !b.broker.registry.contains("tiny")
    })
    .await;
    b.stop().await;
}

/// [MQTT-3.14.2-3, MQTT-3.1.2-24]: a server DISCONNECT leaves out its Reason String when the
/// client's Maximum Packet Size has no room for it (topic alias 0 -> 0x94).
#[tokio::test]
async fn v5_disconnect_drops_its_reason_string_to_fit() {
    let b = TestBroker::start().await;
    let mut connect = v5_connect("small-dc", true);
    connect.properties.maximum_packet_size = Some(20);
    let (mut c, ack) = b.connect_v5(connect).await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
    // Topic "t", properties: Topic Alias 0; payload "x".
    c.send(&frame(
        0x30,
        &[0x00, 0x01, b't', 0x03, 0x23, 0x00, 0x00, b'x'],
    ))
    .await;
    assert_eq!(read_to_close(&mut c).await, [0xe0, 0x02, 0x94, 0x00]);
    b.stop().await;
}

/// [MQTT-3.1.2-25]: a PUBLISH larger than the client's maximum is not sent (and counted);
/// what comes after it still is.
#[tokio::test]
async fn v5_publish_above_the_clients_maximum_is_dropped_and_counted() {
    let b = TestBroker::start().await;
    let mut connect = v5_connect("small-pub", true);
    connect.properties.maximum_packet_size = Some(20);
    let (mut c, _) = b.connect_v5(connect).await;
    c.sub_v5(1, "s/p", QoS::AtMostOnce).await;
    let mut p = b.v5_client(v5_connect("small-pub-src", true), false).await;
    p.send_packet(&Packet::Publish(v5_publish(
        "s/p",
        QoS::AtMostOnce,
        0,
        &[b'x'; 32],
    )))
    .await;
    p.send_packet(&Packet::Publish(v5_publish(
        "s/p",
        QoS::AtMostOnce,
        0,
        b"ok",
    )))
    .await;
    let got: Publish = c.recv_publish().await;
    assert_eq!(&got.payload[..], b"ok");
    assert_eq!(Stats::get(&b.broker.stats.dropped_too_large), 1);
    c.expect_silence(QUIET).await;
    b.stop().await;
}
