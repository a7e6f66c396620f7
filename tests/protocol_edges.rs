//! Protocol edges of issue #12, black box over real sockets with exact bytes: packets that must
//! fit the client's Maximum Packet Size (CONNACK above all), UTF-8 strings that must close the
//! connection wherever they appear, a takeover of a session that ended with its connection, and
//! a server close that reaches a client still sending (no reset).
mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use tether::net::connection::LINGER;
use tether::net::protocol::MAX_OUTBOUND_ALIASES;
use tether::stats::Stats;
use tether::wire::codec;
use tether::wire::packet::{
    Ack, ConnAck, Connect, Packet, ProtocolVersion, Publish, QoS, ReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

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

// ---------------------------------------------------------------------------------------------
// 2. UTF-8 strings
// ---------------------------------------------------------------------------------------------

/// Strings no MQTT UTF-8 field may carry: U+0000 [MQTT-1.5.3-2, MQTT-1.5.4-2], encoded
/// surrogates U+D800 and U+DFFF, a lead byte without its continuation and an over-long form
/// (ill-formed UTF-8) [MQTT-1.5.3-1, MQTT-1.5.4-1].
const BAD_STRINGS: [(&str, &[u8]); 5] = [
    ("U+0000", b"a\x00b"),
    ("U+D800", b"a/\xed\xa0\x80"),
    ("U+DFFF", b"\xed\xbf\xbf"),
    ("truncated sequence", b"a\xc3(b"),
    ("over-long '/'", b"a\xc0\xafb"),
];

/// A control string every field accepts, to show the frames themselves are right.
const GOOD_STRING: &[u8] = "ok/é".as_bytes();

fn protocol_errors(b: &TestBroker) -> u64 {
    Stats::get(&b.broker.stats.protocol_errors)
}

/// A UTF-8 Encoded String field: two-byte length, then the bytes as given.
fn string(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// A v5 User Property (identifier 0x26 and the string pair).
fn user_property(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x26];
    out.extend(string(key));
    out.extend(string(value));
    out
}

/// A v5 property block: its length (below 128 here) and the properties.
fn props(p: &[u8]) -> Vec<u8> {
    assert!(p.len() < 0x80);
    let mut out = vec![p.len() as u8];
    out.extend_from_slice(p);
    out
}

/// The strings and properties of a CONNECT, as raw bytes.
struct RawConnect<'a> {
    client_id: &'a [u8],
    /// v5 only.
    properties: Vec<u8>,
    /// (topic, v5 will properties); payload "w".
    will: Option<(&'a [u8], Vec<u8>)>,
    username: Option<&'a [u8]>,
}

impl<'a> RawConnect<'a> {
    fn new(client_id: &'a [u8]) -> RawConnect<'a> {
        RawConnect {
            client_id,
            properties: Vec::new(),
            will: None,
            username: None,
        }
    }

    /// The CONNECT frame for protocol level 4 (3.1.1) or 5, Clean Session / Start 1.
    fn frame(&self, level: u8) -> Vec<u8> {
        let v5 = level == 5;
        let mut flags = 0x02;
        if self.will.is_some() {
            flags |= 0x04;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', level, flags, 0x00, 0x3c];
        if v5 {
            body.extend(props(&self.properties));
        }
        body.extend(string(self.client_id));
        if let Some((topic, will_props)) = &self.will {
            if v5 {
                body.extend(props(will_props));
            }
            body.extend(string(topic));
            body.extend(string(b"w"));
        }
        if let Some(u) = self.username {
            body.extend(string(u));
        }
        frame(0x10, &body)
    }
}

/// SUBSCRIBE (packet id 1, QoS 0), UNSUBSCRIBE (packet id 2) and QoS 0 PUBLISH frames for
/// `s` as the filter or topic; v5 ones carry `properties`.
fn packets_with_string(v5: bool, s: &[u8], properties: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut sub = vec![0x00, 0x01];
    let mut unsub = vec![0x00, 0x02];
    let mut publ = string(s);
    if v5 {
        sub.extend(props(properties));
        unsub.extend(props(properties));
        publ.extend(props(properties));
    }
    sub.extend(string(s));
    sub.push(0x00);
    unsub.extend(string(s));
    publ.extend_from_slice(b"payload");
    vec![
        ("SUBSCRIBE", frame(0x82, &sub)),
        ("UNSUBSCRIBE", frame(0xa2, &unsub)),
        ("PUBLISH", frame(0x30, &publ)),
    ]
}

/// The reply a valid string gets, per packet name: SUBACK granting QoS 0, UNSUBACK, and for
/// the QoS 0 PUBLISH nothing (checked with a PINGREQ behind it).
async fn expect_accepted(c: &mut Raw, v5: bool, what: &str) {
    match (what, v5) {
        ("SUBSCRIBE", false) => c.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x00]).await,
        ("SUBSCRIBE", true) => c.expect_bytes(&[0x90, 0x04, 0x00, 0x01, 0x00, 0x00]).await,
        ("UNSUBSCRIBE", false) => c.expect_bytes(&[0xb0, 0x02, 0x00, 0x02]).await,
        // v5: No Subscription Existed (0x11) for a filter never subscribed.
        ("UNSUBSCRIBE", true) => c.expect_bytes(&[0xb0, 0x04, 0x00, 0x02, 0x00, 0x11]).await,
        _ => {
            c.send(&[0xc0, 0x00]).await;
            c.expect_bytes(&[0xd0, 0x00]).await;
        }
    }
}

/// A 3.1.1 connection with Clean Session 1 whose CONNACK has been read.
async fn v311_client(b: &TestBroker, id: &str) -> Raw {
    let mut c = b.raw().await;
    c.send(&connect_v311(id, true, 60)).await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    c
}

/// [MQTT-1.5.3-1, MQTT-1.5.3-2]: ill-formed UTF-8, surrogates or U+0000 in a 3.1.1 topic
/// filter (SUBSCRIBE, UNSUBSCRIBE) or topic name (PUBLISH) close the connection with nothing
/// sent back, and nothing is delivered.
#[tokio::test]
async fn v311_bad_utf8_in_filters_and_topics_closes_the_connection_mqtt_1_5_3_1_and_1_5_3_2() {
    let b = TestBroker::start().await;
    let mut watcher = v311_client(&b, "utf8-watch").await;
    watcher.send(&subscribe(1, "#", 0)).await;
    watcher.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x00]).await;

    for (what, bytes) in packets_with_string(false, GOOD_STRING, &[]) {
        let mut c = v311_client(&b, "utf8-good").await;
        c.send(&bytes).await;
        expect_accepted(&mut c, false, what).await;
    }
    let _ = watcher.recv_packet().await; // the control PUBLISH

    for (name, bad) in BAD_STRINGS {
        for (what, bytes) in packets_with_string(false, bad, &[]) {
            let before = protocol_errors(&b);
            let mut c = v311_client(&b, "utf8-bad").await;
            c.send(&bytes).await;
            assert_eq!(read_to_close(&mut c).await, b"", "{what} with {name}");
            assert_eq!(protocol_errors(&b), before + 1, "{what} with {name}");
        }
    }
    watcher.expect_silence(QUIET).await;
    b.stop().await;
}

/// [MQTT-1.5.3-1, MQTT-1.5.3-2]: the same in a 3.1.1 CONNECT's Client ID, Will Topic or User
/// Name: the connection is closed without a CONNACK and no session is created.
#[tokio::test]
async fn v311_bad_utf8_in_connect_closes_without_connack_mqtt_1_5_3_1_and_1_5_3_2() {
    let b = TestBroker::start().await;
    let fields = |s: &'static [u8]| {
        vec![
            ("client id", RawConnect::new(s)),
            (
                "will topic",
                RawConnect {
                    will: Some((s, Vec::new())),
                    ..RawConnect::new(b"utf8-will")
                },
            ),
            (
                "user name",
                RawConnect {
                    username: Some(s),
                    ..RawConnect::new(b"utf8-user")
                },
            ),
        ]
    };
    for (what, connect) in fields(GOOD_STRING) {
        let mut c = b.raw().await;
        c.send(&connect.frame(4)).await;
        c.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
        c.send(&[0xe0, 0x00]).await;
        assert_eq!(read_to_close(&mut c).await, b"", "control {what}");
    }
    b.wait_registry_empty().await;
    for (name, bad) in BAD_STRINGS {
        for (what, connect) in fields(bad) {
            let mut c = b.raw().await;
            c.send(&connect.frame(4)).await;
            assert_eq!(read_to_close(&mut c).await, b"", "{what} with {name}");
        }
    }
    assert!(b.broker.registry.is_empty());
    b.stop().await;
}

/// [MQTT-1.5.4-1, MQTT-1.5.4-2]: in v5, ill-formed UTF-8, surrogates or U+0000 in a topic
/// filter, topic name, or a User Property of SUBSCRIBE, UNSUBSCRIBE or PUBLISH (key or value)
/// make a Malformed Packet: DISCONNECT 0x81, then the close. Nothing is delivered.
#[tokio::test]
async fn v5_bad_utf8_after_connect_is_disconnect_0x81_mqtt_1_5_4_1_and_1_5_4_2() {
    let b = TestBroker::start().await;
    let mut watcher = b.v5_client(v5_connect("utf8-watch5", true), false).await;
    watcher.sub_v5(1, "#", QoS::AtMostOnce).await;

    let good_user = user_property(b"k", GOOD_STRING);
    for (what, bytes) in packets_with_string(true, GOOD_STRING, &good_user) {
        let mut c = b.v5_client(v5_connect("utf8-good5", true), false).await;
        c.send(&bytes).await;
        expect_accepted(&mut c, true, what).await;
    }
    let _ = watcher.recv_publish().await; // the control PUBLISH

    for (name, bad) in BAD_STRINGS {
        let cases = [
            ("string", packets_with_string(true, bad, &[])),
            (
                "user property key",
                packets_with_string(true, b"u/t", &user_property(bad, b"v")),
            ),
            (
                "user property value",
                packets_with_string(true, b"u/t", &user_property(b"k", bad)),
            ),
        ];
        for (field, packets) in cases {
            for (what, bytes) in packets {
                let mut c = b.v5_client(v5_connect("utf8-bad5", true), false).await;
                c.send(&bytes).await;
                let d = c.expect_disconnect().await;
                assert_eq!(
                    d.reason,
                    ReasonCode::MALFORMED_PACKET,
                    "{what} {field} with {name}: {d:?}"
                );
            }
        }
    }
    watcher.expect_silence(QUIET).await;
    b.stop().await;
}

/// [MQTT-1.5.4-1, MQTT-1.5.4-2, MQTT-3.1.4-1]: in a v5 CONNECT (Client ID, Will Topic, User
/// Name, a User Property of CONNECT or of the will) they get CONNACK 0x81 Malformed Packet,
/// then the close; no session is created.
#[tokio::test]
async fn v5_bad_utf8_in_connect_is_connack_0x81_mqtt_1_5_4_1_and_1_5_4_2() {
    let b = TestBroker::start().await;
    let fields = |s: &'static [u8]| {
        vec![
            ("client id", RawConnect::new(s)),
            (
                "will topic",
                RawConnect {
                    will: Some((s, Vec::new())),
                    ..RawConnect::new(b"utf8-will5")
                },
            ),
            (
                "user name",
                RawConnect {
                    username: Some(s),
                    ..RawConnect::new(b"utf8-user5")
                },
            ),
            (
                "CONNECT user property",
                RawConnect {
                    properties: user_property(b"k", s),
                    ..RawConnect::new(b"utf8-prop5")
                },
            ),
            (
                "will user property",
                RawConnect {
                    will: Some((b"will/t", user_property(s, b"v"))),
                    ..RawConnect::new(b"utf8-wprop5")
                },
            ),
        ]
    };
    for (what, connect) in fields(GOOD_STRING) {
        let mut c = b.raw().await;
        c.version = ProtocolVersion::V5;
        c.send(&connect.frame(5)).await;
        assert_eq!(c.recv_connack().await.reason, ReasonCode::SUCCESS, "{what}");
        c.send(&[0xe0, 0x00]).await;
        c.expect_closed().await;
    }
    b.wait_registry_empty().await;
    for (name, bad) in BAD_STRINGS {
        for (what, connect) in fields(bad) {
            let mut c = b.raw().await;
            c.send(&connect.frame(5)).await;
            assert_eq!(
                read_to_close(&mut c).await,
                [0x20, 0x03, 0x00, 0x81, 0x00],
                "{what} with {name}"
            );
        }
    }
    assert!(b.broker.registry.is_empty());
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Takeover of a session that ends with its connection
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.2-6, MQTT-3.1.4-3, MQTT-3.1.2-8]: A connected with Clean Session = 1, so its
/// session lasts only as long as its connection. B taking over with Clean Session = 0 closes
/// A (its will is published: a takeover is no DISCONNECT) and gets a new, empty session:
/// Session Present 0, and A's subscription does not deliver to B.
#[tokio::test]
async fn v311_takeover_of_a_clean_session_does_not_resume_it_mqtt_3_1_2_6() {
    let b = TestBroker::start().await;
    let mut w = v311_client(&b, "tko-watch").await;
    w.send(&subscribe(1, "tko/will", 0)).await;
    w.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x00]).await;

    let mut a = b.raw().await;
    a.send(&connect_v311_will(
        "tko", true, "tko/will", b"a-gone", 0, false,
    ))
    .await;
    a.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    a.send(&subscribe(1, "tko/t", 1)).await;
    a.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x01]).await;

    let mut bc = b.raw().await;
    bc.send(&connect_v311("tko", false, 60)).await;
    bc.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    assert_eq!(read_to_close(&mut a).await, b"");
    w.expect_bytes(&publish("tko/will", 0, 0, false, false, b"a-gone"))
        .await;

    let mut p = v311_client(&b, "tko-pub").await;
    p.send(&publish("tko/t", 1, 1, false, false, b"for-a"))
        .await;
    p.expect_bytes(&ack(0x40, 1)).await;
    bc.expect_silence(QUIET).await;

    // B's session is its own and persistent: resumed by B's next connection, still empty.
    bc.send(&[0xe0, 0x00]).await;
    assert_eq!(read_to_close(&mut bc).await, b"");
    let mut again = b.raw().await;
    again.send(&connect_v311("tko", false, 60)).await;
    again.expect_bytes(&[0x20, 0x02, 0x01, 0x00]).await;
    p.send(&publish("tko/t", 1, 2, false, false, b"still-not"))
        .await;
    p.expect_bytes(&ack(0x40, 2)).await;
    again.expect_silence(QUIET).await;
    b.stop().await;
}

/// Section 3.1.2.11.2 (Session Expiry Interval 0: the session ends when the network connection
/// closes), [MQTT-3.1.4-3]: A with Session Expiry 0 is taken over by B with Clean Start 0 and
/// Session Expiry 60. A gets DISCONNECT 0x8E and its will is published (A's session ends, so
/// no delay applies); B gets Session Present 0 and none of A's subscriptions.
#[tokio::test]
async fn v5_takeover_of_a_session_with_expiry_0_does_not_resume_it() {
    let b = TestBroker::start().await;
    let mut w = b.v5_client(v5_connect("tko5-watch", true), false).await;
    w.sub_v5(1, "tko5/will", QoS::AtMostOnce).await;

    let mut connect = v5_connect_expiry("tko5", true, Some(0));
    connect.will = Some(v5_will("tko5/will", b"a-gone", 0));
    let mut a = b.v5_client(connect, false).await;
    a.sub_v5(1, "tko5/t", QoS::AtLeastOnce).await;

    let mut bc = b
        .v5_client(v5_connect_expiry("tko5", false, Some(60)), false)
        .await;
    assert_eq!(
        a.expect_disconnect().await.reason,
        ReasonCode::SESSION_TAKEN_OVER
    );
    let will = w.recv_publish().await;
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        ("tko5/will", &b"a-gone"[..])
    );

    let mut p = b.v5_client(v5_connect("tko5-pub", true), false).await;
    p.pub1_v5(v5_publish("tko5/t", QoS::AtLeastOnce, 1, b"for-a"))
        .await;
    bc.expect_silence(QUIET).await;

    // The same with a will delay: A's session ends with the takeover, so its will goes at once
    // (section 3.1.3.2.2: at the delay or the end of the session, whichever is first).
    let mut connect = v5_connect("tko5d", true);
    connect.will = Some(v5_will("tko5/will", b"a-delayed", 30));
    let mut a = b.v5_client(connect, false).await;
    let _bc = b
        .v5_client(v5_connect_expiry("tko5d", false, Some(60)), false)
        .await;
    assert_eq!(
        a.expect_disconnect().await.reason,
        ReasonCode::SESSION_TAKEN_OVER
    );
    assert_eq!(&w.recv_publish().await.payload[..], b"a-delayed");
    b.stop().await;
}

/// The takeover rules across versions: a 3.1.1 Clean Session = 1 connection taken over by a
/// v5 Clean Start 0 client, and a v5 Session Expiry 0 one by a 3.1.1 Clean Session 0 client,
/// both start new sessions (Session Present 0).
#[tokio::test]
async fn cross_version_takeover_of_a_connection_bound_session_does_not_resume_it() {
    let b = TestBroker::start().await;
    let mut a = v311_client(&b, "tkx").await;
    a.send(&subscribe(1, "tkx/t", 0)).await;
    a.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x00]).await;
    let mut bc = b
        .v5_client(v5_connect_expiry("tkx", false, Some(60)), false)
        .await;
    assert_eq!(read_to_close(&mut a).await, b"");
    let mut p = v311_client(&b, "tkx-pub").await;
    p.send(&publish("tkx/t", 0, 0, false, false, b"x")).await;
    bc.expect_silence(QUIET).await;

    let mut a = b.v5_client(v5_connect("tkx5", true), false).await;
    a.sub_v5(1, "tkx5/t", QoS::AtMostOnce).await;
    let mut bc = b.raw().await;
    bc.send(&connect_v311("tkx5", false, 60)).await;
    bc.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    assert_eq!(
        a.expect_disconnect().await.reason,
        ReasonCode::SESSION_TAKEN_OVER
    );
    p.send(&publish("tkx5/t", 0, 0, false, false, b"x")).await;
    bc.expect_silence(QUIET).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. A server close reaches a client that is still sending (lingering close)
// ---------------------------------------------------------------------------------------------

/// A plain TCP connection whose CONNECT (`connect`, encoded for `version`) was accepted, split
/// so one task can keep writing while the test reads.
async fn split_client(b: &TestBroker, version: ProtocolVersion, connect: Packet) -> Split {
    let tcp = TcpStream::connect(b.addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let (r, mut w) = tcp.into_split();
    w.write_all(&encode(&connect, version))
        .await
        .expect("write");
    let mut s = Split {
        r,
        w: Some(w),
        buf: BytesMut::new(),
        version,
    };
    match s.next().await {
        Ok(Some(Packet::ConnAck(a))) if a.reason == ReasonCode::SUCCESS => s,
        other => panic!("expected a successful CONNACK, got {other:?}"),
    }
}

fn encode(p: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::encode(p, version, None, &mut out).expect("encode");
    out.to_vec()
}

/// The read half of a split client, decoding what the broker sends.
struct Split {
    r: OwnedReadHalf,
    w: Option<OwnedWriteHalf>,
    buf: BytesMut,
    version: ProtocolVersion,
}

impl Split {
    /// The next packet; `Ok(None)` on a clean EOF, `Err` on a socket error such as a reset.
    /// Fails the test after `WAIT`.
    async fn next(&mut self) -> Result<Option<Packet>, std::io::ErrorKind> {
        loop {
            if let Some(p) =
                codec::decode(&mut self.buf, Some(self.version), usize::MAX).expect("decodable")
            {
                return Ok(Some(p));
            }
            match tokio::time::timeout(WAIT, self.r.read_buf(&mut self.buf)).await {
                Err(_) => panic!("neither a packet nor the close within {WAIT:?}"),
                Ok(Ok(0)) => {
                    assert!(self.buf.is_empty(), "EOF inside a packet: {:?}", self.buf);
                    return Ok(None);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.kind()),
            }
        }
    }

    /// Every packet until the connection ends, and how it ended (`None` = clean EOF).
    async fn until_end(&mut self) -> (Vec<Packet>, Option<std::io::ErrorKind>) {
        let mut got = Vec::new();
        loop {
            match self.next().await {
                Ok(Some(p)) => got.push(p),
                Ok(None) => return (got, None),
                Err(e) => return (got, Some(e)),
            }
        }
    }

    /// Start writing `first`, then `filler` again and again, until `stop` fires (or its sender
    /// is dropped) or a write fails: the task returns the failure and when it happened.
    fn keep_writing(
        &mut self,
        first: Vec<u8>,
        filler: Vec<u8>,
        mut stop: oneshot::Receiver<()>,
    ) -> JoinHandle<Option<(std::io::ErrorKind, Instant)>> {
        let mut w = self.w.take().expect("write half");
        tokio::spawn(async move {
            if let Err(e) = w.write_all(&first).await {
                return Some((e.kind(), Instant::now()));
            }
            loop {
                tokio::select! {
                    _ = &mut stop => return None,
                    r = w.write_all(&filler) => if let Err(e) = r {
                        return Some((e.kind(), Instant::now()));
                    },
                }
            }
        })
    }
}

/// About 64 KiB of QoS 0 PUBLISHes to a topic nobody subscribes to: what a busy client keeps
/// sending after the packet that gets it disconnected.
fn filler(version: ProtocolVersion) -> Vec<u8> {
    let p = Packet::Publish(v5_publish("linger/fill", QoS::AtMostOnce, 0, &[b'f'; 1000]));
    encode(&p, version).repeat(64)
}

/// 65 QoS 2 PUBLISHes without PUBREL: one more than Receive Maximum 64 (`max_inbound_inflight`).
fn receive_maximum_plus_one() -> Vec<u8> {
    (1..=65u16)
        .flat_map(|id| {
            let p = v5_publish("linger/q2", QoS::ExactlyOnce, id, b"x");
            encode(&Packet::Publish(p), ProtocolVersion::V5)
        })
        .collect()
}

/// What a v5 client must read after `receive_maximum_plus_one`: PUBREC for the first 64, then
/// DISCONNECT 0x93, then a clean EOF.
fn assert_receive_maximum_exceeded(
    attempt: usize,
    got: &[Packet],
    end: Option<std::io::ErrorKind>,
) {
    let disconnect = got.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.reason),
        _ => None,
    });
    assert_eq!(
        disconnect,
        Some(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED),
        "attempt {attempt}: no DISCONNECT 0x93 ({} packets, then {end:?})",
        got.len()
    );
    let pubrecs = got
        .iter()
        .filter(|p| matches!(p, Packet::PubRec(_)))
        .count();
    assert_eq!(pubrecs, 64, "attempt {attempt}");
    assert!(
        matches!(got.last(), Some(Packet::Disconnect(_))),
        "attempt {attempt}: nothing may follow DISCONNECT [MQTT-3.14.4-1]"
    );
    assert_eq!(
        end, None,
        "attempt {attempt}: the close after DISCONNECT must be an orderly EOF"
    );
}

/// [MQTT-3.3.4-7, MQTT-3.14.4-1, MQTT-3.14.4-2, MQTT-4.13.2-1]: a v5 client that sends 65 QoS 2
/// PUBLISHes against Receive Maximum 64 and keeps on writing reads DISCONNECT 0x93 and then an
/// orderly EOF, and its writes keep succeeding until then: the broker ends its output and reads
/// what the client still sends before it closes. Closing with unread input would send a reset,
/// which fails the client's next write (a client that writes before it reads never sees the
/// DISCONNECT) and drops whatever the broker had not transmitted yet. A hundred times in a row,
/// each on a fresh connection, because the reset is a race the client loses only sometimes.
#[tokio::test]
async fn v5_disconnect_0x93_reaches_a_client_that_keeps_writing_mqtt_3_14_4_2() {
    let b = TestBroker::start().await;
    let (first, filler) = (receive_maximum_plus_one(), filler(ProtocolVersion::V5));
    for attempt in 0..100 {
        let id = format!("linger5-{attempt}");
        let connect = Packet::Connect(Box::new(v5_connect(&id, true)));
        let mut c = split_client(&b, ProtocolVersion::V5, connect).await;
        let (stop, stopped) = oneshot::channel();
        let writer = c.keep_writing(first.clone(), filler.clone(), stopped);
        let (got, end) = c.until_end().await;
        let _ = stop.send(());
        let write_failed = writer.await.expect("writer task");
        assert_eq!(
            write_failed.map(|(kind, _)| kind),
            None,
            "attempt {attempt}: the client's writes failed before it had read everything \
             (a reset: what a client that writes before it reads sees as broken pipe)"
        );
        assert_receive_maximum_exceeded(attempt, &got, end);
    }
    b.stop().await;
}

/// [MQTT-4.8.0-1, MQTT-3.3.2-2]: a 3.1.1 client that breaks the protocol (a wildcard in a
/// PUBLISH topic) while it keeps writing is closed with an orderly EOF, after every PUBACK the
/// broker owed it, not with a reset that would discard them.
#[tokio::test]
async fn v311_violation_closes_with_eof_for_a_client_that_keeps_writing_mqtt_4_8_0_1() {
    let b = TestBroker::start().await;
    let mut first: Vec<u8> = (1..=10u16)
        .flat_map(|id| publish("linger/q1", 1, id, false, false, b"x"))
        .collect();
    first.extend(publish("linger/+", 0, 0, false, false, b"bad"));
    let filler = filler(ProtocolVersion::V311);
    for attempt in 0..100 {
        let connect = Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V311,
            ..v5_connect(&format!("linger4-{attempt}"), true)
        }));
        let mut c = split_client(&b, ProtocolVersion::V311, connect).await;
        let (stop, stopped) = oneshot::channel();
        let writer = c.keep_writing(first.clone(), filler.clone(), stopped);
        let (got, end) = c.until_end().await;
        let _ = stop.send(());
        let write_failed = writer.await.expect("writer task");
        assert_eq!(
            write_failed.map(|(kind, _)| kind),
            None,
            "attempt {attempt}: the client's writes failed before it had read everything \
             (a reset: what a client that writes before it reads sees as broken pipe)"
        );
        let pubacks: Vec<u16> = got
            .iter()
            .map(|p| match p {
                Packet::PubAck(a) => a.packet_id,
                other => panic!("attempt {attempt}: expected only PUBACKs, got {other:?}"),
            })
            .collect();
        assert_eq!(pubacks, (1..=10).collect::<Vec<_>>(), "attempt {attempt}");
        assert_eq!(end, None, "attempt {attempt}: orderly EOF, not a reset");
    }
    b.stop().await;
}

/// The lingering close is bounded: a client that never stops writing and never closes after
/// its DISCONNECT 0x93 still holds a connection slot for a while (the broker reads and discards
/// its input), then is cut off `LINGER` (2 s) later, and the connection no longer counts.
#[tokio::test]
async fn a_client_that_never_stops_writing_is_cut_off_after_the_linger_bound() {
    let b = TestBroker::start().await;
    let connect = Packet::Connect(Box::new(v5_connect("linger-hog", true)));
    let mut c = split_client(&b, ProtocolVersion::V5, connect).await;
    let (_never, stopped) = oneshot::channel();
    let writer = c.keep_writing(
        receive_maximum_plus_one(),
        filler(ProtocolVersion::V5),
        stopped,
    );
    let (got, end) = c.until_end().await;
    let disconnected = Instant::now();
    assert_receive_maximum_exceeded(0, &got, end);
    assert_eq!(
        Stats::get(&b.broker.stats.connections_current),
        1,
        "the lingering connection still counts against the connection limit"
    );
    let (kind, at) = tokio::time::timeout(LINGER + WAIT, writer)
        .await
        .expect("the broker never cut the writer off")
        .expect("writer task")
        .expect("a write fails once the broker closes");
    let lingered = at - disconnected;
    assert!(
        lingered >= LINGER - Duration::from_millis(500) && lingered < LINGER + WAIT,
        "cut off {lingered:?} after the DISCONNECT ({kind:?})"
    );
    eventually("the connection no longer counts", || {
        Stats::get(&b.broker.stats.connections_current) == 0
    })
    .await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. PUBACK / PUBREC 0x10 No matching subscribers
// ---------------------------------------------------------------------------------------------

/// The packet id and reason code of the next packet, which must be a PUBACK or PUBREC.
async fn ack_of(c: &mut Raw) -> (&'static str, u16, ReasonCode) {
    match c.recv_packet().await {
        Packet::PubAck(a) => ("PUBACK", a.packet_id, a.reason),
        Packet::PubRec(a) => ("PUBREC", a.packet_id, a.reason),
        other => panic!("expected PUBACK or PUBREC, got {other:?}"),
    }
}

fn v5_pub(topic: &str, qos: QoS, packet_id: u16, retain: bool) -> Packet {
    Packet::Publish(Publish {
        retain,
        ..v5_publish(topic, qos, packet_id, b"m")
    })
}

/// Section 3.4.2.1 (0x10 No matching subscribers: "If the Server knows that there are no
/// matching subscribers, it MAY use this Reason Code instead of 0x00"), [MQTT-3.4.2-1]: a v5
/// QoS 1 PUBLISH that matches no subscription gets PUBACK 0x10; once a subscription matches,
/// 0x00 and the message is delivered.
#[tokio::test]
async fn v5_qos1_publish_without_subscribers_gets_puback_0x10_mqtt_3_4_2_1() {
    let b = TestBroker::start().await;
    let mut p = b.v5_client(v5_connect("nms-pub", true), false).await;
    p.send_packet(&v5_pub("nms/t", QoS::AtLeastOnce, 1, false))
        .await;
    assert_eq!(
        ack_of(&mut p).await,
        ("PUBACK", 1, ReasonCode::NO_MATCHING_SUBSCRIBERS)
    );

    let mut s = b.v5_client(v5_connect("nms-sub", true), false).await;
    s.sub_v5(1, "nms/#", QoS::AtLeastOnce).await;
    p.send_packet(&v5_pub("nms/t", QoS::AtLeastOnce, 2, false))
        .await;
    assert_eq!(ack_of(&mut p).await, ("PUBACK", 2, ReasonCode::SUCCESS));
    assert_eq!(s.recv_publish().await.topic, "nms/t");
    b.stop().await;
}

/// [MQTT-3.5.2-1, MQTT-4.3.3-4, MQTT-4.3.3-11]: the same for QoS 2. PUBREC 0x10 is below 0x80,
/// so the flow goes on: PUBREL gets PUBCOMP 0x00. With a matching subscription PUBREC is 0x00.
#[tokio::test]
async fn v5_qos2_publish_without_subscribers_gets_pubrec_0x10_and_completes_mqtt_3_5_2_1() {
    let b = TestBroker::start().await;
    let mut p = b.v5_client(v5_connect("nms2-pub", true), false).await;
    p.send_packet(&v5_pub("nms2/t", QoS::ExactlyOnce, 7, false))
        .await;
    assert_eq!(
        ack_of(&mut p).await,
        ("PUBREC", 7, ReasonCode::NO_MATCHING_SUBSCRIBERS)
    );
    p.send_packet(&Packet::PubRel(Ack::new(7))).await;
    match p.recv_packet().await {
        Packet::PubComp(a) => assert_eq!((a.packet_id, a.reason), (7, ReasonCode::SUCCESS)),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }

    let mut s = b.v5_client(v5_connect("nms2-sub", true), false).await;
    s.sub_v5(1, "nms2/t", QoS::ExactlyOnce).await;
    p.send_packet(&v5_pub("nms2/t", QoS::ExactlyOnce, 8, false))
        .await;
    assert_eq!(ack_of(&mut p).await, ("PUBREC", 8, ReasonCode::SUCCESS));
    p.send_packet(&Packet::PubRel(Ack::new(8))).await;
    assert!(matches!(p.recv_packet().await, Packet::PubComp(a) if a.packet_id == 8));
    assert_eq!(s.recv_publish().await.topic, "nms2/t");
    b.stop().await;
}

/// [MQTT-3.3.1-5]: 0x10 says only that nobody got the message now: a retained QoS 1 PUBLISH
/// without subscribers gets PUBACK 0x10 and is still stored for later subscribers.
#[tokio::test]
async fn v5_retained_publish_without_subscribers_gets_0x10_and_is_still_retained_mqtt_3_3_1_5() {
    let b = TestBroker::start().await;
    let mut p = b.v5_client(v5_connect("nmr-pub", true), false).await;
    p.send_packet(&v5_pub("nmr/t", QoS::AtLeastOnce, 1, true))
        .await;
    assert_eq!(
        ack_of(&mut p).await,
        ("PUBACK", 1, ReasonCode::NO_MATCHING_SUBSCRIBERS)
    );
    let mut s = b.v5_client(v5_connect("nmr-sub", true), false).await;
    s.sub_v5(1, "nmr/#", QoS::AtLeastOnce).await;
    let m = s.recv_publish().await;
    assert_eq!((m.topic.as_str(), m.retain), ("nmr/t", true));
    b.stop().await;
}

/// A subscriber whose queue is full still matches: the message is dropped for it (and
/// counted), but the publisher hears 0x00, not 0x10. The subscriber here is an offline
/// session with room for one queued message.
#[tokio::test]
async fn v5_a_match_with_a_full_queue_is_still_a_matching_subscriber() {
    let mut config = tether::config::Config::default();
    config.session.max_queued_messages = 1;
    let b = TestBroker::with_config(config).await;
    let mut s = v5_session(b.addr, "nmf-sub", true, 60, false).await;
    s.sub_v5(1, "nmf/t", QoS::AtLeastOnce).await;
    s.disconnect_v5(ReasonCode::SUCCESS, None).await;
    b.wait_offline("nmf-sub").await;

    let mut p = b.v5_client(v5_connect("nmf-pub", true), false).await;
    for id in 1..=2 {
        p.send_packet(&v5_pub("nmf/t", QoS::AtLeastOnce, id, false))
            .await;
        assert_eq!(ack_of(&mut p).await, ("PUBACK", id, ReasonCode::SUCCESS));
    }
    assert_eq!(Stats::get(&b.broker.stats.dropped_queue_full), 1);
    b.stop().await;
}

/// 3.1.1 PUBACK and PUBREC carry only the packet id (sections 3.4 and 3.5): a QoS 1 or QoS 2
/// PUBLISH nobody subscribes to gets the plain acknowledgement, and QoS 2 completes.
#[tokio::test]
async fn v311_publish_without_subscribers_gets_the_plain_acknowledgement() {
    let b = TestBroker::start().await;
    let mut p = v311_client(&b, "nms4-pub").await;
    p.send(&publish("nms4/t", 1, 1, false, false, b"m")).await;
    p.expect_bytes(&ack(0x40, 1)).await;
    p.send(&publish("nms4/t", 2, 2, false, false, b"m")).await;
    p.expect_bytes(&ack(0x50, 2)).await;
    p.send(&ack(0x62, 2)).await;
    p.expect_bytes(&ack(0x70, 2)).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Outbound topic aliases
// ---------------------------------------------------------------------------------------------

/// What a client does with an incoming PUBLISH's topic alias (section 3.3.2.3.4): topic + alias
/// (re)maps the alias, an empty topic + alias uses the mapping. Returns the topic and whether
/// it came from the alias alone; fails on an alias outside 1..=`max` [MQTT-3.3.2-8,
/// MQTT-3.3.2-11] or one never mapped.
fn resolve(
    map: &mut std::collections::HashMap<u16, String>,
    max: u16,
    p: &Publish,
) -> (String, bool) {
    let Some(alias) = p.properties.topic_alias else {
        assert!(!p.topic.is_empty(), "empty topic without alias: {p:?}");
        return (p.topic.clone(), false);
    };
    assert!(
        (1..=max).contains(&alias),
        "alias {alias} outside 1..={max}"
    );
    if p.topic.is_empty() {
        let topic = map.get(&alias).expect("alias used before it was mapped");
        (topic.clone(), true)
    } else {
        map.insert(alias, p.topic.clone());
        (p.topic.clone(), false)
    }
}

/// A v5 client announcing Topic Alias Maximum `max`, subscribed to `filter` at QoS 0.
async fn alias_subscriber(b: &TestBroker, id: &str, max: Option<u16>, filter: &str) -> Raw {
    let mut connect = v5_connect(id, true);
    connect.properties.topic_alias_maximum = max;
    let mut c = b.v5_client(connect, false).await;
    c.sub_v5(1, filter, QoS::AtMostOnce).await;
    c
}

/// Publish one QoS 1 message per topic, in order, each acknowledged before the next.
async fn publish_all(b: &TestBroker, id: &str, topics: &[&str]) {
    let mut p = b.v5_client(v5_connect(id, true), false).await;
    for (i, t) in topics.iter().enumerate() {
        p.pub1_v5(v5_publish(t, QoS::AtLeastOnce, i as u16 + 1, b"m"))
            .await;
    }
}

/// [MQTT-3.3.2-11, MQTT-3.1.2-27]: by default, a client that announced Topic Alias Maximum 5
/// gets topic + alias on the first PUBLISH of a topic and an empty topic + the same alias on the
/// next; a client that announced none gets full topics and no alias.
#[tokio::test]
async fn v5_outbound_topic_aliases_are_on_by_default_mqtt_3_3_2_11() {
    let b = TestBroker::start().await;
    let mut sub = alias_subscriber(&b, "oad-sub", Some(5), "oad/#").await;
    let mut plain = alias_subscriber(&b, "oad-plain", None, "oad/#").await;
    publish_all(&b, "oad-pub", &["oad/t", "oad/t"]).await;

    let first = sub.recv_publish().await;
    let alias = first
        .properties
        .topic_alias
        .expect("the first PUBLISH maps an alias");
    assert!((1..=5).contains(&alias), "alias {alias}");
    assert_eq!(first.topic, "oad/t");
    let second = sub.recv_publish().await;
    assert_eq!(
        (second.topic.as_str(), second.properties.topic_alias),
        ("", Some(alias))
    );
    for _ in 0..2 {
        let m = plain.recv_publish().await;
        assert_eq!(
            (m.topic.as_str(), m.properties.topic_alias),
            ("oad/t", None)
        );
    }
    b.stop().await;
}

/// `listener.outbound_topic_aliases = false` turns them off even for a client that accepts
/// them.
#[tokio::test]
async fn v5_outbound_topic_aliases_can_be_turned_off() {
    let mut config = tether::config::Config::default();
    config.listener.outbound_topic_aliases = false;
    let b = TestBroker::with_config(config).await;
    let mut sub = alias_subscriber(&b, "oaf-sub", Some(5), "oaf/#").await;
    publish_all(&b, "oaf-pub", &["oaf/t", "oaf/t"]).await;
    for _ in 0..2 {
        let m = sub.recv_publish().await;
        assert_eq!(
            (m.topic.as_str(), m.properties.topic_alias),
            ("oaf/t", None)
        );
    }
    b.stop().await;
}

/// [MQTT-3.1.2-25, MQTT-3.3.2-11]: a PUBLISH dropped because it exceeds the client's Maximum
/// Packet Size never reached the client, so the alias it would have mapped is not relied on:
/// the next PUBLISH of that topic carries the topic again.
#[tokio::test]
async fn v5_an_outbound_alias_is_not_relied_on_when_its_publish_was_dropped() {
    let b = TestBroker::start().await;
    let mut connect = v5_connect("oab-sub", true);
    connect.properties.topic_alias_maximum = Some(5);
    connect.properties.maximum_packet_size = Some(40);
    let mut sub = b.v5_client(connect, false).await;
    sub.sub_v5(1, "oab/#", QoS::AtMostOnce).await;
    let mut p = b.v5_client(v5_connect("oab-pub", true), false).await;
    p.pub1_v5(v5_publish("oab/t", QoS::AtLeastOnce, 1, &[b'x'; 64]))
        .await;
    for id in 2..=3 {
        p.pub1_v5(v5_publish("oab/t", QoS::AtLeastOnce, id, b"ok"))
            .await;
    }
    let mut map = std::collections::HashMap::new();
    let first = sub.recv_publish().await;
    assert_eq!(&first.payload[..], b"ok");
    assert_eq!(
        resolve(&mut map, 5, &first),
        ("oab/t".to_string(), false),
        "{first:?}"
    );
    assert!(first.properties.topic_alias.is_some());
    let second = sub.recv_publish().await;
    assert_eq!(resolve(&mut map, 5, &second), ("oab/t".to_string(), true));
    assert_eq!(Stats::get(&b.broker.stats.dropped_too_large), 1);
    b.stop().await;
}

/// [MQTT-3.3.2-7]: aliases belong to one network connection. A persistent session's
/// unacknowledged messages, resent on the next connection, carry their topic, and the first new
/// PUBLISH of that topic maps an alias afresh.
#[tokio::test]
async fn v5_outbound_aliases_start_fresh_on_each_connection_mqtt_3_3_2_7() {
    let b = TestBroker::start().await;
    let connect = |clean| {
        let mut c = v5_connect_expiry("oac-sub", clean, Some(60));
        c.properties.topic_alias_maximum = Some(5);
        c
    };
    let mut sub = b.v5_client(connect(true), false).await;
    sub.sub_v5(1, "oac/t", QoS::AtLeastOnce).await;
    let mut p = b.v5_client(v5_connect("oac-pub", true), false).await;
    for id in 1..=2 {
        p.pub1_v5(v5_publish("oac/t", QoS::AtLeastOnce, id, b"old"))
            .await;
    }
    let mut map = std::collections::HashMap::new();
    for alias_only in [false, true] {
        let m = sub.recv_publish().await;
        assert_eq!(resolve(&mut map, 5, &m), ("oac/t".to_string(), alias_only));
    }
    // Neither is acknowledged: both are resent on the next connection.
    drop(sub);
    b.wait_offline("oac-sub").await;

    let mut sub = b.v5_client(connect(false), true).await;
    let mut map = std::collections::HashMap::new();
    for _ in 0..2 {
        let m = sub.recv_publish().await;
        assert!(m.dup, "{m:?}");
        assert_eq!(resolve(&mut map, 5, &m), ("oac/t".to_string(), false));
        sub.send_packet(&Packet::PubAck(Ack::new(m.packet_id)))
            .await;
    }
    p.pub1_v5(v5_publish("oac/t", QoS::AtLeastOnce, 3, b"new"))
        .await;
    let m = sub.recv_publish().await;
    assert_eq!(resolve(&mut map, 5, &m), ("oac/t".to_string(), false));
    assert!(m.properties.topic_alias.is_some(), "{m:?}");
    b.stop().await;
}

/// Section 3.3.2.3.4 (a sender may change a mapping by sending the topic with an alias already
/// used): with Topic Alias Maximum 2 and a third topic, the least recently used alias is
/// reassigned; the topic used more recently keeps its alias.
#[tokio::test]
async fn v5_outbound_aliases_reassign_the_least_recently_used_one() {
    let b = TestBroker::start().await;
    let mut sub = alias_subscriber(&b, "oal-sub", Some(2), "oal/#").await;
    let sent = [
        "oal/a", "oal/b", "oal/a", "oal/c", "oal/a", "oal/b", "oal/b",
    ];
    publish_all(&b, "oal-pub", &sent).await;
    // (topic, from the alias alone, carries an alias)
    let want = [
        ("oal/a", false, true),
        ("oal/b", false, true),
        ("oal/a", true, true),
        ("oal/c", false, true), // b's alias, least recently used, now means oal/c
        ("oal/a", true, true),
        ("oal/b", false, true), // c's alias (a was used after c)
        ("oal/b", true, true),
    ];
    let mut map = std::collections::HashMap::new();
    for (i, (topic, alias_only, aliased)) in want.into_iter().enumerate() {
        let m = sub.recv_publish().await;
        let got = resolve(&mut map, 2, &m);
        assert_eq!(
            (got.0.as_str(), got.1, m.properties.topic_alias.is_some()),
            (topic, alias_only, aliased),
            "PUBLISH {i}: {m:?}"
        );
    }
    b.stop().await;
}

/// However many aliases the client accepts, one connection uses at most
/// `MAX_OUTBOUND_ALIASES` (64), each holding a topic name in memory: the 65th topic takes over
/// the least recently used alias, so the first topic, when it comes again, carries its topic.
#[tokio::test]
async fn v5_outbound_aliases_are_capped_per_connection() {
    let b = TestBroker::start().await;
    let mut sub = alias_subscriber(&b, "oam-sub", Some(1000), "oam/#").await;
    let mut topics: Vec<String> = (1..=65).map(|i| format!("oam/{i}")).collect();
    topics.push("oam/1".into());
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    publish_all(&b, "oam-pub", &refs).await;
    let max = MAX_OUTBOUND_ALIASES;
    let mut map = std::collections::HashMap::new();
    let mut aliases = Vec::new();
    for t in &topics {
        let m = sub.recv_publish().await;
        assert_eq!(resolve(&mut map, max, &m), (t.clone(), false), "{m:?}");
        aliases.push(m.properties.topic_alias.expect("every topic gets an alias"));
    }
    assert_eq!(aliases[64], aliases[0], "oam/65 takes over oam/1's alias");
    assert_ne!(
        aliases[65], aliases[64],
        "oam/1 comes back under another alias"
    );
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Malformed Packet or Protocol Error, site by site (section 4.13)
// ---------------------------------------------------------------------------------------------

/// A v5 CONNECT frame (protocol name "MQTT", level 5, keep-alive 60) with the given Connect
/// Flags, the CONNECT properties (without their length) and the payload as raw bytes.
fn v5_connect_raw(flags: u8, properties: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 5, flags, 0x00, 0x3c];
    body.extend(props(properties));
    body.extend_from_slice(payload);
    frame(0x10, &body)
}

/// Each packet after a v5 CONNECT that cannot be parsed is a Malformed Packet (0x81); one
/// that parses but breaks a rule is a Protocol Error (0x82), unless the spec names another
/// code for it (section 4.13.1, and each packet's section as quoted). The client (Session
/// Expiry 0, defaults otherwise: Topic Alias Maximum 16, Maximum Packet Size 1 MiB) gets a
/// DISCONNECT with that reason, then the close.
#[tokio::test]
async fn v5_each_server_disconnect_site_sends_the_code_the_spec_names_section_4_13() {
    const MALFORMED: ReasonCode = ReasonCode::MALFORMED_PACKET;
    const PROTOCOL: ReasonCode = ReasonCode::PROTOCOL_ERROR;
    let mut second_connect = BytesMut::new();
    codec::encode(
        &Packet::Connect(Box::new(v5_connect("site-again", true))),
        ProtocolVersion::V5,
        None,
        &mut second_connect,
    )
    .expect("encode");
    let cases: Vec<(&str, Vec<u8>, ReasonCode)> = vec![
        // ---- cannot be parsed: Malformed Packet
        (
            "packet type 0 (2.1.2: reserved)",
            vec![0x00, 0x00],
            MALFORMED,
        ),
        (
            "PUBLISH QoS 3 [MQTT-3.3.1-4]",
            frame(0x36, &[0x00, 0x01, b't', 0x00, 0x01, 0x00]),
            MALFORMED,
        ),
        (
            "PUBLISH DUP with QoS 0 [MQTT-3.3.1-2] (2.1.3: invalid flags are Malformed)",
            frame(0x38, &[0x00, 0x01, b't', 0x00]),
            MALFORMED,
        ),
        (
            "PUBREL flags 0000 [MQTT-3.6.1-1]",
            frame(0x60, &[0x00, 0x01]),
            MALFORMED,
        ),
        (
            "SUBSCRIBE flags 0000 [MQTT-3.8.1-1]",
            frame(0x80, &[0x00, 0x01, 0x00, 0x00, 0x01, b't', 0x00]),
            MALFORMED,
        ),
        (
            "UNSUBSCRIBE flags 0000 [MQTT-3.10.1-1]",
            frame(0xa0, &[0x00, 0x01, 0x00, 0x00, 0x01, b't']),
            MALFORMED,
        ),
        (
            "PINGREQ flags 0001 [MQTT-2.1.3-1]",
            vec![0xc1, 0x00],
            MALFORMED,
        ),
        (
            "remaining length not minimally encoded [MQTT-1.5.5-1]",
            vec![0xc0, 0x80, 0x00],
            MALFORMED,
        ),
        (
            "remaining length of five bytes (1.5.5)",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x7f],
            MALFORMED,
        ),
        (
            "PINGREQ with a body: the remaining length runs beyond the packet (3.12.1)",
            vec![0xc0, 0x01, 0x00],
            MALFORMED,
        ),
        (
            "PUBACK with bytes after its properties (3.4.1)",
            frame(0x40, &[0x00, 0x01, 0x00, 0x00, 0xff]),
            MALFORMED,
        ),
        (
            "PUBLISH cut inside its Topic Name length (3.3.2.1)",
            vec![0x30, 0x01, 0x00],
            MALFORMED,
        ),
        (
            "Topic Name runs past the packet (1.5.4)",
            vec![0x30, 0x04, 0x00, 0x05, b'a', b'b'],
            MALFORMED,
        ),
        (
            "QoS 1 PUBLISH without its Packet Identifier (3.3.2.2)",
            frame(0x32, &[0x00, 0x01, b't']),
            MALFORMED,
        ),
        (
            "Property Length beyond the packet (2.2.2.1)",
            frame(0x30, &[0x00, 0x01, b't', 0x05]),
            MALFORMED,
        ),
        (
            "a property running past its Property Length (2.2.2.1)",
            frame(0x30, &[0x00, 0x01, b't', 0x02, 0x02, 0x00, 0x00]),
            MALFORMED,
        ),
        (
            "Session Expiry Interval in PUBLISH (2.2.2.2: not valid for the packet type)",
            frame(0x30, &[0x00, 0x01, b't', 0x05, 0x11, 0, 0, 0, 1]),
            MALFORMED,
        ),
        (
            "unknown property identifier 0x00 (2.2.2.2)",
            frame(0x30, &[0x00, 0x01, b't', 0x01, 0x00]),
            MALFORMED,
        ),
        (
            "Topic Alias in SUBSCRIBE (2.2.2.2)",
            frame(
                0x82,
                &[0x00, 0x01, 0x03, 0x23, 0x00, 0x01, 0x00, 0x01, b't', 0x00],
            ),
            MALFORMED,
        ),
        (
            "Subscription Identifier in UNSUBSCRIBE (2.2.2.2)",
            frame(0xa2, &[0x00, 0x01, 0x02, 0x0b, 0x01, 0x00, 0x01, b't']),
            MALFORMED,
        ),
        (
            "Subscription Options bits 6-7 set [MQTT-3.8.3-5]",
            frame(0x82, &[0x00, 0x01, 0x00, 0x00, 0x01, b't', 0x40]),
            MALFORMED,
        ),
        (
            "DISCONNECT reason code 0x05, not defined for it (3.14.2.1)",
            frame(0xe0, &[0x05]),
            MALFORMED,
        ),
        (
            "AUTH reason code 0x05, not defined for it (3.15.2.1)",
            frame(0xf0, &[0x05]),
            MALFORMED,
        ),
        // ---- parses, breaks a rule: Protocol Error
        (
            "second CONNECT [MQTT-3.1.0-2]",
            second_connect.to_vec(),
            PROTOCOL,
        ),
        (
            "SUBSCRIBE without a Topic Filter [MQTT-3.8.3-2]",
            frame(0x82, &[0x00, 0x01, 0x00]),
            PROTOCOL,
        ),
        (
            "UNSUBSCRIBE without a Topic Filter [MQTT-3.10.3-2]",
            frame(0xa2, &[0x00, 0x01, 0x00]),
            PROTOCOL,
        ),
        (
            "Maximum QoS 3 in Subscription Options (3.8.3.1)",
            frame(0x82, &[0x00, 0x01, 0x00, 0x00, 0x01, b't', 0x03]),
            PROTOCOL,
        ),
        (
            "Retain Handling 3 (3.8.3.1)",
            frame(0x82, &[0x00, 0x01, 0x00, 0x00, 0x01, b't', 0x30]),
            PROTOCOL,
        ),
        (
            "No Local on a Shared Subscription [MQTT-3.8.3-4]",
            frame(
                0x82,
                &[&[0x00, 0x01, 0x00][..], &string(b"$share/g/t"), &[0x04]].concat(),
            ),
            PROTOCOL,
        ),
        (
            "Subscription Identifier 0 in SUBSCRIBE (3.8.2.1.2)",
            frame(
                0x82,
                &[0x00, 0x01, 0x02, 0x0b, 0x00, 0x00, 0x01, b't', 0x00],
            ),
            PROTOCOL,
        ),
        (
            "Subscription Identifier twice in SUBSCRIBE (3.8.2.1.2)",
            frame(
                0x82,
                &[
                    0x00, 0x01, 0x04, 0x0b, 0x01, 0x0b, 0x02, 0x00, 0x01, b't', 0x00,
                ],
            ),
            PROTOCOL,
        ),
        (
            "Message Expiry Interval twice in PUBLISH (3.3.2.3.3)",
            frame(
                0x30,
                &[0x00, 0x01, b't', 0x0a, 0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 1],
            ),
            PROTOCOL,
        ),
        (
            "Payload Format Indicator 2 (3.3.2.3.2 defines 0 and 1)",
            frame(0x30, &[0x00, 0x01, b't', 0x02, 0x01, 0x02]),
            PROTOCOL,
        ),
        (
            "Packet Identifier 0 in a QoS 1 PUBLISH [MQTT-2.2.1-3]",
            frame(0x32, &[0x00, 0x01, b't', 0x00, 0x00, 0x00]),
            PROTOCOL,
        ),
        (
            "Packet Identifier 0 in SUBSCRIBE [MQTT-2.2.1-3]",
            frame(0x82, &[0x00, 0x00, 0x00, 0x00, 0x01, b't', 0x00]),
            PROTOCOL,
        ),
        (
            "Packet Identifier 0 in PUBACK [MQTT-2.2.1-3]",
            frame(0x40, &[0x00, 0x00]),
            PROTOCOL,
        ),
        (
            "Subscription Identifier in a PUBLISH from the client [MQTT-3.3.4-6]",
            frame(0x30, &[0x00, 0x01, b't', 0x02, 0x0b, 0x01]),
            PROTOCOL,
        ),
        (
            "zero-length Topic Name without a Topic Alias (3.3.2.1)",
            frame(0x30, &[0x00, 0x00, 0x00]),
            PROTOCOL,
        ),
        (
            "Topic Alias never mapped on this connection (3.3.2.3.4)",
            frame(0x30, &[0x00, 0x00, 0x03, 0x23, 0x00, 0x01]),
            PROTOCOL,
        ),
        (
            "AUTH without enhanced authentication [MQTT-3.15.2-1, section 4.12]",
            vec![0xf0, 0x00],
            PROTOCOL,
        ),
        (
            "DISCONNECT raising a Session Expiry Interval of 0 (3.14.2.2.2)",
            frame(0xe0, &[0x00, 0x05, 0x11, 0, 0, 0, 10]),
            PROTOCOL,
        ),
        (
            "CONNACK from the client (3.2: server to client only)",
            frame(0x20, &[0x00, 0x00, 0x00]),
            PROTOCOL,
        ),
        (
            "SUBACK from the client (3.9)",
            frame(0x90, &[0x00, 0x01, 0x00, 0x00]),
            PROTOCOL,
        ),
        (
            "UNSUBACK from the client (3.11)",
            frame(0xb0, &[0x00, 0x01, 0x00, 0x00]),
            PROTOCOL,
        ),
        (
            "PINGRESP from the client (3.13)",
            vec![0xd0, 0x00],
            PROTOCOL,
        ),
        // ---- the specific codes the spec names
        (
            "Topic Alias 0 [MQTT-3.3.2-8] (3.3.2.3.4: 0x94)",
            frame(0x30, &[0x00, 0x01, b't', 0x03, 0x23, 0x00, 0x00]),
            ReasonCode::TOPIC_ALIAS_INVALID,
        ),
        (
            "Topic Alias 17 above the Topic Alias Maximum 16 [MQTT-3.3.2-9] (3.3.2.3.4: 0x94)",
            frame(0x30, &[0x00, 0x01, b't', 0x03, 0x23, 0x00, 17]),
            ReasonCode::TOPIC_ALIAS_INVALID,
        ),
        (
            "wildcard in a Topic Name [MQTT-3.3.2-2] (0x90)",
            frame(0x30, &[0x00, 0x01, b'#', 0x00]),
            ReasonCode::TOPIC_NAME_INVALID,
        ),
        (
            "a packet beyond the server's Maximum Packet Size (3.2.2.3.6: 0x95)",
            vec![0x30, 0x80, 0x80, 0x80, 0x01],
            ReasonCode::PACKET_TOO_LARGE,
        ),
    ];
    let b = TestBroker::start().await;
    let mut wrong = Vec::new();
    for (i, (what, bytes, expected)) in cases.iter().enumerate() {
        let mut c = b
            .v5_client(v5_connect(&format!("site-{i}"), true), false)
            .await;
        c.send(bytes).await;
        let d = c.expect_disconnect().await;
        if d.reason != *expected {
            wrong.push(format!(
                "{what}: got 0x{:02x}, expected 0x{:02x} ({:?})",
                d.reason.0, expected.0, d.reason_string
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "wrong reason codes:\n{}",
        wrong.join("\n")
    );
    b.stop().await;
}

/// The same for errors in a v5 CONNECT: the CONNACK that refuses it carries the code (section
/// 4.13.1, [MQTT-3.2.2-8]), then the connection closes. Where the server cannot tell that the
/// client speaks v5 (an unknown protocol name, a first packet that is not CONNECT) it closes
/// without a word [MQTT-3.1.2-1, MQTT-3.1.0-1]; an unknown level gets the 3.1.1 CONNACK 0x01
/// [MQTT-3.1.2-2].
#[tokio::test]
async fn v5_each_connect_refusal_site_sends_the_code_the_spec_names_section_4_13() {
    let refused = |code: u8| vec![0x20, 0x03, 0x00, code, 0x00];
    let client = string(b"site-c");
    let will = [&[0x00][..], &string(b"w/t"), &string(b"w")].concat();
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        // ---- Malformed Packet
        (
            "reserved Connect Flag set [MQTT-3.1.2-3]",
            v5_connect_raw(0x03, &[], &client),
            refused(0x81),
        ),
        (
            "Will QoS 3 (3.1.2.6)",
            v5_connect_raw(0x1e, &[], &[&client[..], &will].concat()),
            refused(0x81),
        ),
        (
            "Will QoS without the Will Flag [MQTT-3.1.2-11]",
            v5_connect_raw(0x0a, &[], &client),
            refused(0x81),
        ),
        (
            "Will Retain without the Will Flag [MQTT-3.1.2-13]",
            v5_connect_raw(0x22, &[], &client),
            refused(0x81),
        ),
        (
            "Topic Alias in CONNECT (2.2.2.2)",
            v5_connect_raw(0x02, &[0x23, 0x00, 0x01], &client),
            refused(0x81),
        ),
        (
            "Session Expiry Interval among the will properties (2.2.2.2)",
            v5_connect_raw(
                0x06,
                &[],
                &[
                    &client[..],
                    &[0x05, 0x11, 0, 0, 0, 1],
                    &string(b"w/t"),
                    &string(b"w"),
                ]
                .concat(),
            ),
            refused(0x81),
        ),
        (
            "Client Identifier runs past the packet (1.5.4)",
            v5_connect_raw(0x02, &[], &[0x00, 0x09, b's']),
            refused(0x81),
        ),
        (
            "bytes after the CONNECT payload (3.1.3)",
            v5_connect_raw(0x02, &[], &[&client[..], &[0xff]].concat()),
            refused(0x81),
        ),
        // ---- Protocol Error
        (
            "Receive Maximum 0 (3.1.2.11.3)",
            v5_connect_raw(0x02, &[0x21, 0x00, 0x00], &client),
            refused(0x82),
        ),
        (
            "Maximum Packet Size 0 (3.1.2.11.4)",
            v5_connect_raw(0x02, &[0x27, 0, 0, 0, 0], &client),
            refused(0x82),
        ),
        (
            "Session Expiry Interval twice (3.1.2.11.2)",
            v5_connect_raw(0x02, &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 1], &client),
            refused(0x82),
        ),
        (
            "Request Problem Information 2 (3.1.2.11.7)",
            v5_connect_raw(0x02, &[0x17, 0x02], &client),
            refused(0x82),
        ),
        // ---- specific codes
        (
            "Authentication Method, enhanced authentication not offered (4.12: 0x8C)",
            v5_connect_raw(0x02, &[&[0x15][..], &string(b"SCRAM")].concat(), &client),
            refused(0x8c),
        ),
        (
            "wildcard in the Will Topic (3.2.2.2: 0x90)",
            v5_connect_raw(
                0x06,
                &[],
                &[&client[..], &[0x00], &string(b"w/#"), &string(b"w")].concat(),
            ),
            refused(0x90),
        ),
        (
            "CONNECT beyond the server's Maximum Packet Size (3.2.2.2: 0x95)",
            vec![
                0x10, 0x80, 0x80, 0x80, 0x01, 0x00, 0x04, b'M', b'Q', b'T', b'T', 5,
            ],
            refused(0x95),
        ),
        (
            "protocol level 6 [MQTT-3.1.2-2]: 3.1.1 CONNACK 0x01",
            {
                let mut f = v5_connect_raw(0x02, &[], &client);
                f[8] = 6;
                f
            },
            vec![0x20, 0x02, 0x00, 0x01],
        ),
        // ---- no CONNACK at all
        (
            "unknown protocol name [MQTT-3.1.2-1]",
            {
                let mut f = v5_connect_raw(0x02, &[], &client);
                f[7] = b'X';
                f
            },
            vec![],
        ),
        (
            "first packet not CONNECT [MQTT-3.1.0-1]",
            vec![0xc0, 0x00],
            vec![],
        ),
    ];
    let b = TestBroker::start().await;
    let mut wrong = Vec::new();
    for (what, bytes, expected) in &cases {
        let mut c = b.raw().await;
        c.send(bytes).await;
        let got = read_to_close(&mut c).await;
        if got != *expected {
            wrong.push(format!("{what}: got {got:02x?}, expected {expected:02x?}"));
        }
    }
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    assert!(b.broker.registry.is_empty());
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. What a subscriber sees of a PUBLISH from another connection around its SUBACK
// ---------------------------------------------------------------------------------------------

/// A 3.1.1 client with Clean Session 1 whose CONNACK has been read.
async fn clean_v311(b: &TestBroker, id: &str) -> Raw {
    let mut c = b.raw().await;
    c.send(&connect_v311(id, true, 60)).await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    c
}

/// No spec promise covers a PUBLISH routed before the subscriber's SUBACK, but one routed
/// after it must reach the subscriber: the subscription is in the router before the SUBACK is
/// written [MQTT-3.8.4-1, MQTT-3.8.4-3 "new Subscription"]. B subscribes and reads its SUBACK,
/// then A publishes; 200 times over with fresh clients, every message is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_read_after_the_subscribers_suback_is_always_delivered() {
    let b = TestBroker::start().await;
    for i in 0..200u16 {
        let topic = format!("order/after/{i}");
        let mut sub = clean_v311(&b, &format!("oa-sub-{i}")).await;
        let mut publ = clean_v311(&b, &format!("oa-pub-{i}")).await;
        sub.send(&subscribe(1, &topic, 0)).await;
        sub.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x00]).await;
        let msg = publish(&topic, 0, 0, false, false, b"m");
        publ.send(&msg).await;
        sub.expect_bytes(&msg).await;
        publ.send(&[0xe0, 0x00]).await;
        sub.send(&[0xe0, 0x00]).await;
    }
    b.stop().await;
}

/// The moment before the SUBACK, measured: B sends SUBSCRIBE and A, without waiting for B's
/// SUBACK, publishes "early" at once. Whether B gets it depends on which connection the broker
/// reads first; the hit rate is printed (run with `--nocapture`), not asserted. What is
/// asserted is the SUBACK guarantee: "late", published once B has its SUBACK, always arrives.
///
/// The broker runs on a runtime of its own with two workers, as `tether` does on two cores,
/// so that the clients' writes do not share its scheduler.
#[tokio::test]
async fn subscribe_racing_a_publish_from_another_connection_measured() {
    const TRIES: u16 = 160;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("broker runtime");
    let b = rt.spawn(TestBroker::start()).await.expect("broker started");
    let mut hits = 0;
    for i in 0..TRIES {
        let topic = format!("order/race/{i}");
        let mut sub = clean_v311(&b, &format!("or-sub-{i}")).await;
        let mut publ = clean_v311(&b, &format!("or-pub-{i}")).await;
        let early = publish(&topic, 0, 0, false, false, b"early");
        let late = publish(&topic, 0, 0, false, false, b"late");
        sub.send(&subscribe(1, &topic, 0)).await;
        publ.send(&early).await;
        sub.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x00]).await;
        publ.send(&late).await;
        let first = sub.read_exact(late.len()).await;
        if first == early[..late.len()] {
            hits += 1;
            sub.expect_bytes(&early[late.len()..]).await;
            sub.expect_bytes(&late).await;
        } else {
            assert_eq!(first, late, "only `early` or `late` can arrive");
        }
        publ.send(&[0xe0, 0x00]).await;
        sub.send(&[0xe0, 0x00]).await;
    }
    println!("SUBSCRIBE racing a PUBLISH: delivered {hits} of {TRIES}");
    b.stop().await;
    rt.shutdown_background();
}
