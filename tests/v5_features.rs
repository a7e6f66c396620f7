//! MQTT 5.0 features, black box: reason codes, flow control, Maximum Packet Size, topic
//! aliases, message expiry, subscription options and identifiers, shared subscriptions,
//! property pass-through, assigned client identifiers, Server Keep Alive, AUTH and the
//! capabilities CONNACK announces. Our codec on raw sockets for exact flows, rumqttc (an
//! independent v5 client) where a library client is enough.
mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use tether::config::Config;
use tether::stats::Stats;
use tether::wire::packet::{
    Ack, Auth, Packet, Publish, PublishProperties, QoS, ReasonCode, RetainHandling,
    SubscribeFilter, Unsubscribe,
};
use tokio::time::Instant;

/// Short window for "nothing (more) arrives".
const QUIET: Duration = Duration::from_millis(300);

fn with_config(f: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config::default();
    f(&mut c);
    c
}

/// A server DISCONNECT with `reason` and a Reason String, then the close.
async fn expect_server_disconnect(c: &mut Raw, reason: ReasonCode) {
    let d = c.expect_disconnect().await;
    assert_eq!(d.reason, reason, "DISCONNECT reason: {d:?}");
    assert!(
        d.reason_string.as_deref().is_some_and(|s| !s.is_empty()),
        "DISCONNECT 0x{:02x} carries a Reason String: {d:?}",
        reason.0
    );
}

/// Every PUBLISH that arrives until `QUIET` passes with nothing, acknowledging QoS 1 ones.
async fn drain_publishes(c: &mut Raw) -> Vec<Publish> {
    let mut got = Vec::new();
    while let Some(p) = c.recv_packet_within(QUIET).await {
        match p {
            Packet::Publish(p) => {
                if p.qos == QoS::AtLeastOnce {
                    c.send_packet(&Packet::PubAck(Ack::new(p.packet_id))).await;
                }
                got.push(p);
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    got
}

fn payload_str(p: &Publish) -> String {
    String::from_utf8(p.payload.to_vec()).expect("utf-8 payload")
}

// ---------------------------------------------------------------------------------------------
// 7. Reason codes
// ---------------------------------------------------------------------------------------------

/// Section 3.9.3: one SUBACK reason per filter: the granted QoS, 0x8F for an invalid filter
/// (wildcard misuse, empty share name), 0x97 past `max_subscriptions`.
#[tokio::test]
async fn suback_reason_code_per_filter() {
    let b = TestBroker::with_config(with_config(|c| c.session.max_subscriptions = 3)).await;
    let mut c = b.v5_client(v5_connect("sa", true), false).await;
    let ack = c
        .subscribe_v5(
            1,
            vec![
                v5_filter("r/a", QoS::AtMostOnce),
                v5_filter("r/b", QoS::ExactlyOnce),
                v5_filter("r/#/x", QoS::AtLeastOnce),
                v5_filter("$share//r", QoS::AtLeastOnce),
                v5_filter("r/c", QoS::AtLeastOnce),
                v5_filter("r/d", QoS::AtLeastOnce),
            ],
            None,
        )
        .await;
    assert_eq!(
        ack.reasons,
        vec![
            ReasonCode::GRANTED_QOS_0,
            ReasonCode::GRANTED_QOS_2,
            ReasonCode::TOPIC_FILTER_INVALID,
            ReasonCode::TOPIC_FILTER_INVALID,
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::QUOTA_EXCEEDED,
        ]
    );
    // Re-subscribing an existing filter is a replacement, not a new subscription: granted.
    let ack = c
        .subscribe_v5(2, vec![v5_filter("r/a", QoS::AtLeastOnce)], None)
        .await;
    assert_eq!(ack.reasons, vec![ReasonCode::GRANTED_QOS_1]);
    b.stop().await;
}

/// Section 3.11.3: UNSUBACK 0x00 for a removed subscription, 0x11 for none.
#[tokio::test]
async fn unsuback_reason_codes() {
    let b = TestBroker::start().await;
    let mut c = b.v5_client(v5_connect("ua", true), false).await;
    c.sub_v5(1, "u/a", QoS::AtLeastOnce).await;
    c.send_packet(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 2,
        filters: vec!["u/a".into(), "u/none".into()],
        user_properties: vec![],
    }))
    .await;
    match c.recv_packet().await {
        Packet::UnsubAck(a) => {
            assert_eq!(a.packet_id, 2);
            assert_eq!(
                a.reasons,
                vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED]
            );
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    b.stop().await;
}

/// Section 3.7.2.1: PUBREL for an unknown packet id -> PUBCOMP 0x92.
#[tokio::test]
async fn pubrel_for_unknown_id_gets_pubcomp_0x92() {
    let b = TestBroker::start().await;
    let mut c = b.v5_client(v5_connect("prel", true), false).await;
    c.send_packet(&Packet::PubRel(Ack::new(77))).await;
    match c.recv_packet().await {
        Packet::PubComp(a) => {
            assert_eq!(a.packet_id, 77);
            assert_eq!(a.reason, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND);
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    b.stop().await;
}

/// [MQTT-1.5.4-1] / section 4.13: ill-formed UTF-8 in a topic name is a Malformed Packet:
/// DISCONNECT 0x81 with a Reason String.
#[tokio::test]
async fn malformed_utf8_gets_disconnect_0x81() {
    let b = TestBroker::start().await;
    let mut c = b.v5_client(v5_connect("utf", true), false).await;
    // PUBLISH QoS 0, topic bytes ff fe, property length 0, payload "x".
    c.send(&frame(0x30, &[0x00, 0x02, 0xff, 0xfe, 0x00, b'x']))
        .await;
    expect_server_disconnect(&mut c, ReasonCode::MALFORMED_PACKET).await;
    b.stop().await;
}

/// Section 4.12: AUTH without enhanced authentication in progress is a Protocol Error:
/// DISCONNECT 0x82, promptly (no hang).
#[tokio::test]
async fn stray_auth_gets_disconnect_0x82() {
    let b = TestBroker::start().await;
    let mut c = b.v5_client(v5_connect("auth", true), false).await;
    c.send_packet(&Packet::Auth(Auth {
        reason: ReasonCode::CONTINUE_AUTHENTICATION,
        authentication_method: Some("SCRAM-SHA-1".into()),
        authentication_data: None,
    }))
    .await;
    expect_server_disconnect(&mut c, ReasonCode::PROTOCOL_ERROR).await;
    b.stop().await;
}

/// [MQTT-3.1.2-22] Nothing received for 1.5 x Keep Alive: DISCONNECT 0x8D, then close.
#[tokio::test]
async fn keep_alive_timeout_gets_disconnect_0x8d() {
    let b = TestBroker::start().await;
    let mut connect = v5_connect("ka", true);
    connect.keep_alive = 1;
    let mut c = b.v5_client(connect, false).await;
    let t0 = Instant::now();
    let d = c.expect_disconnect().await;
    assert_eq!(d.reason, ReasonCode::KEEP_ALIVE_TIMEOUT);
    assert!(
        t0.elapsed() >= Duration::from_millis(1400),
        "closed after {:?}, before 1.5 x keep-alive",
        t0.elapsed()
    );
    b.stop().await;
}

/// Section 3.3.4 / 4.9: more unreleased QoS 2 PUBLISH than our Receive Maximum (announced in
/// CONNACK) -> DISCONNECT 0x93.
#[tokio::test]
async fn receive_maximum_exceeded_gets_disconnect_0x93() {
    let b = TestBroker::with_config(with_config(|c| c.session.max_inbound_inflight = 2)).await;
    let (mut c, ack) = b.connect_v5(v5_connect("rmx", true)).await;
    assert_eq!(ack.properties.receive_maximum, Some(2));
    for id in 1..=3 {
        c.send_packet(&Packet::Publish(v5_publish(
            "rmx/t",
            QoS::ExactlyOnce,
            id,
            b"q2",
        )))
        .await;
    }
    for id in 1..=2 {
        match c.recv_packet().await {
            Packet::PubRec(a) => assert_eq!(a.packet_id, id),
            other => panic!("expected PUBREC, got {other:?}"),
        }
    }
    expect_server_disconnect(&mut c, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED).await;
    b.stop().await;
}

/// [MQTT-3.3.2-9] / section 3.3.2.3.4: a Topic Alias above the Topic Alias Maximum the Server
/// sent -> DISCONNECT 0x94.
#[tokio::test]
async fn topic_alias_above_maximum_gets_disconnect_0x94() {
    let b = TestBroker::start().await;
    let (mut c, ack) = b.connect_v5(v5_connect("tamax", true)).await;
    assert_eq!(ack.properties.topic_alias_maximum, Some(16));
    let mut p = v5_publish("ta/t", QoS::AtMostOnce, 0, b"x");
    p.properties.topic_alias = Some(17);
    c.send_packet(&Packet::Publish(p)).await;
    expect_server_disconnect(&mut c, ReasonCode::TOPIC_ALIAS_INVALID).await;
    b.stop().await;
}

/// [MQTT-3.3.2-8] A Topic Alias of 0 is not permitted; the receiver reports it with
/// DISCONNECT 0x94 (Topic Alias invalid), as for an alias above the maximum.
#[tokio::test]
async fn topic_alias_zero_gets_disconnect_0x94() {
    let b = TestBroker::start().await;
    let mut c = b.v5_client(v5_connect("ta0", true), false).await;
    // PUBLISH QoS 0, topic "ta/t", properties: Topic Alias (0x23) = 0, payload "x".
    c.send(&frame(
        0x30,
        &[
            0x00, 0x04, b't', b'a', b'/', b't', 0x03, 0x23, 0x00, 0x00, b'x',
        ],
    ))
    .await;
    expect_server_disconnect(&mut c, ReasonCode::TOPIC_ALIAS_INVALID).await;
    b.stop().await;
}

/// [MQTT-3.2.2-15 context] / section 4.13: a packet larger than the Maximum Packet Size the
/// Server announced -> DISCONNECT 0x95.
#[tokio::test]
async fn packet_too_large_gets_disconnect_0x95() {
    let b = TestBroker::with_config(with_config(|c| c.listener.max_packet_size = 128)).await;
    let (mut c, ack) = b.connect_v5(v5_connect("big", true)).await;
    assert_eq!(ack.properties.maximum_packet_size, Some(128));
    c.send_packet(&Packet::Publish(v5_publish(
        "big/t",
        QoS::AtMostOnce,
        0,
        &[0x42; 200],
    )))
    .await;
    expect_server_disconnect(&mut c, ReasonCode::PACKET_TOO_LARGE).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Flow control
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.3.4-9] The client's Receive Maximum 2 bounds the unacknowledged QoS 1 PUBLISH the
/// server sends it; each PUBACK lets the next one through. CONNACK announces our Receive
/// Maximum (section 3.2.2.3.3).
#[tokio::test]
async fn client_receive_maximum_limits_unacked_publishes() {
    let b = TestBroker::start().await;
    let mut connect = v5_connect("rm2", true);
    connect.properties.receive_maximum = Some(2);
    let (mut sub, ack) = b.connect_v5(connect).await;
    assert_eq!(
        ack.properties.receive_maximum,
        Some(Config::default().session.max_inbound_inflight)
    );
    sub.sub_v5(1, "fc/t", QoS::AtLeastOnce).await;
    let mut p = b.v5_client(v5_connect("fc-pub", true), false).await;
    for i in 1..=4u16 {
        p.pub1_v5(v5_publish(
            "fc/t",
            QoS::AtLeastOnce,
            i,
            format!("m{i}").as_bytes(),
        ))
        .await;
    }
    let m1 = sub.recv_publish().await;
    let m2 = sub.recv_publish().await;
    assert_eq!(
        (payload_str(&m1), payload_str(&m2)),
        ("m1".into(), "m2".into())
    );
    sub.expect_silence(QUIET).await;
    sub.send_packet(&Packet::PubAck(Ack::new(m1.packet_id)))
        .await;
    let m3 = sub.recv_publish().await;
    assert_eq!(payload_str(&m3), "m3");
    sub.expect_silence(QUIET).await;
    sub.send_packet(&Packet::PubAck(Ack::new(m2.packet_id)))
        .await;
    assert_eq!(payload_str(&sub.recv_publish().await), "m4");
    b.stop().await;
}

/// [MQTT-3.3.4-9] together with [MQTT-4.4.0-1]: on resume the unacknowledged PUBLISH are
/// re-sent (DUP, original ids), but no more of them are outstanding at once than the new
/// connection's Receive Maximum (section 4.9: the quota is re-initialised per connection).
#[tokio::test]
async fn receive_maximum_bounds_resent_messages_on_resume() {
    let b = TestBroker::start().await;
    let mut sub = b
        .v5_client(v5_connect_expiry("rmr", false, Some(60)), false)
        .await;
    sub.sub_v5(1, "rmr/t", QoS::AtLeastOnce).await;
    let mut p = b.v5_client(v5_connect("rmr-pub", true), false).await;
    for i in 1..=3u16 {
        p.pub1_v5(v5_publish(
            "rmr/t",
            QoS::AtLeastOnce,
            i,
            format!("m{i}").as_bytes(),
        ))
        .await;
    }
    for i in 1..=3 {
        assert_eq!(payload_str(&sub.recv_publish().await), format!("m{i}"));
    }
    drop(sub);
    b.wait_offline("rmr").await;
    let mut connect = v5_connect_expiry("rmr", false, Some(60));
    connect.properties.receive_maximum = Some(1);
    let mut sub = b.v5_client(connect, true).await;
    for i in 1..=3 {
        let m = sub.recv_publish().await;
        assert!(m.dup);
        assert_eq!(payload_str(&m), format!("m{i}"));
        if i < 3 {
            sub.expect_silence(QUIET).await;
        }
        sub.send_packet(&Packet::PubAck(Ack::new(m.packet_id)))
            .await;
    }
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 9. Maximum Packet Size
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.2-24] The server does not send a packet larger than the client's Maximum Packet
/// Size; [MQTT-3.1.2-25] it discards it as if delivered (counted in `dropped_too_large`), and
/// smaller ones after it still arrive. CONNACK announces our own maximum.
#[tokio::test]
async fn client_maximum_packet_size_is_respected() {
    let b = TestBroker::start().await;
    let mut connect = v5_connect("mps", true);
    connect.properties.maximum_packet_size = Some(100);
    let (mut sub, ack) = b.connect_v5(connect).await;
    assert_eq!(
        ack.properties.maximum_packet_size,
        Some(Config::default().listener.max_packet_size as u32)
    );
    sub.subscribe_v5(
        1,
        vec![
            v5_filter("mps/q1/#", QoS::AtLeastOnce),
            v5_filter("mps/q0/#", QoS::AtMostOnce),
        ],
        None,
    )
    .await;
    let mut p = b.v5_client(v5_connect("mps-pub", true), false).await;
    p.pub1_v5(v5_publish("mps/q1/big", QoS::AtLeastOnce, 1, &[0x61; 200]))
        .await;
    p.pub1_v5(v5_publish("mps/q0/big", QoS::AtLeastOnce, 2, &[0x61; 200]))
        .await;
    p.pub1_v5(v5_publish("mps/q1/small", QoS::AtLeastOnce, 3, b"small"))
        .await;
    let m = sub.recv_publish().await;
    assert_eq!(m.topic, "mps/q1/small");
    sub.send_packet(&Packet::PubAck(Ack::new(m.packet_id)))
        .await;
    sub.expect_silence(QUIET).await;
    assert_eq!(Stats::get(&b.broker.stats.dropped_too_large), 2);
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 10. Topic aliases
// ---------------------------------------------------------------------------------------------

/// Section 3.3.2.3.4: topic + alias sets a mapping; empty topic + alias uses it; an alias
/// never mapped with an empty topic is a Protocol Error (DISCONNECT 0x82).
#[tokio::test]
async fn inbound_topic_alias() {
    let b = TestBroker::start().await;
    let mut sub = b.v5_client(v5_connect("ta-sub", true), false).await;
    sub.sub_v5(1, "ta/t", QoS::AtLeastOnce).await;
    let mut p = b.v5_client(v5_connect("ta-pub", true), false).await;
    let mut first = v5_publish("ta/t", QoS::AtLeastOnce, 1, b"one");
    first.properties.topic_alias = Some(1);
    p.pub1_v5(first).await;
    let mut second = v5_publish("", QoS::AtLeastOnce, 2, b"two");
    second.properties.topic_alias = Some(1);
    p.pub1_v5(second).await;
    for want in ["one", "two"] {
        let m = sub.recv_publish().await;
        assert_eq!((m.topic.as_str(), payload_str(&m).as_str()), ("ta/t", want));
        assert_eq!(
            m.properties.topic_alias, None,
            "an inbound alias is never forwarded"
        );
        sub.send_packet(&Packet::PubAck(Ack::new(m.packet_id)))
            .await;
    }
    let mut unknown = v5_publish("", QoS::AtLeastOnce, 3, b"three");
    unknown.properties.topic_alias = Some(2);
    p.send_packet(&Packet::Publish(unknown)).await;
    expect_server_disconnect(&mut p, ReasonCode::PROTOCOL_ERROR).await;
    sub.expect_silence(QUIET).await;
    b.stop().await;
}

/// Section 3.3.2.3.4 outbound: with `outbound_topic_aliases` and a client Topic Alias Maximum
/// of 5, the first delivery on a topic carries topic + alias, the next one empty topic + the
/// same alias. A client announcing no Topic Alias Maximum gets none [MQTT-3.1.2-26].
#[tokio::test]
async fn outbound_topic_alias() {
    let b =
        TestBroker::with_config(with_config(|c| c.listener.outbound_topic_aliases = true)).await;
    let mut connect = v5_connect("oa-sub", true);
    connect.properties.topic_alias_maximum = Some(5);
    let mut sub = b.v5_client(connect, false).await;
    sub.sub_v5(1, "oa/#", QoS::AtMostOnce).await;
    let mut plain = b.v5_client(v5_connect("oa-plain", true), false).await;
    plain.sub_v5(1, "oa/#", QoS::AtMostOnce).await;
    let mut p = b.v5_client(v5_connect("oa-pub", true), false).await;
    for (i, t) in ["oa/x", "oa/x", "oa/y", "oa/x"].iter().enumerate() {
        p.pub1_v5(v5_publish(t, QoS::AtLeastOnce, i as u16 + 1, b"m"))
            .await;
    }
    let mut got: Vec<(String, Option<u16>)> = Vec::new();
    for _ in 0..4 {
        let m = sub.recv_publish().await;
        got.push((m.topic.clone(), m.properties.topic_alias));
    }
    let x = got[0].1.expect("first delivery on oa/x assigns an alias");
    assert_eq!(got[0], ("oa/x".to_string(), Some(x)));
    assert_eq!(
        got[1],
        (String::new(), Some(x)),
        "second on oa/x: alias only"
    );
    let y = got[2].1.expect("first delivery on oa/y assigns an alias");
    assert_ne!(x, y);
    assert!((1..=5).contains(&x) && (1..=5).contains(&y));
    assert_eq!(got[2].0, "oa/y");
    assert_eq!(got[3], (String::new(), Some(x)));
    for _ in 0..4 {
        let m = plain.recv_publish().await;
        assert!(!m.topic.is_empty());
        assert_eq!(m.properties.topic_alias, None);
    }
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 11. Message Expiry Interval
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.3.2-5] A message whose expiry passed while queued for an offline session is not
/// delivered (`dropped_expired`); [MQTT-3.3.2-6] one delivered carries the remaining interval;
/// a retained message past its expiry is not delivered on subscribe. Real time: the test waits
/// 2 s on purpose, for 1 s expiries to pass.
#[tokio::test]
async fn message_expiry() {
    let b = TestBroker::start().await;
    let mut sub = b
        .v5_client(v5_connect_expiry("me", false, Some(60)), false)
        .await;
    sub.sub_v5(1, "me/#", QoS::AtLeastOnce).await;
    sub.disconnect_v5(ReasonCode::NORMAL_DISCONNECTION, None)
        .await;
    b.wait_offline("me").await;

    let mut p = b.v5_client(v5_connect("me-pub", true), false).await;
    let mut short = v5_publish("me/short", QoS::AtLeastOnce, 1, b"short");
    short.properties.message_expiry_interval = Some(1);
    p.pub1_v5(short).await;
    let mut long = v5_publish("me/long", QoS::AtLeastOnce, 2, b"long");
    long.properties.message_expiry_interval = Some(10);
    p.pub1_v5(long).await;
    let mut retained_short = v5_publish("rx/short", QoS::AtLeastOnce, 3, b"rs");
    retained_short.retain = true;
    retained_short.properties.message_expiry_interval = Some(1);
    p.pub1_v5(retained_short).await;
    let mut retained_keep = v5_publish("rx/keep", QoS::AtLeastOnce, 4, b"rk");
    retained_keep.retain = true;
    p.pub1_v5(retained_keep).await;

    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut sub = b
        .v5_client(v5_connect_expiry("me", false, Some(60)), true)
        .await;
    let m = sub.recv_publish().await;
    assert_eq!(m.topic, "me/long", "the expired message must not be sent");
    let left = m
        .properties
        .message_expiry_interval
        .expect("Message Expiry Interval forwarded");
    assert!(
        (1..=8).contains(&left),
        "remaining interval {left}, expected <= 10 - 2"
    );
    sub.send_packet(&Packet::PubAck(Ack::new(m.packet_id)))
        .await;
    sub.expect_silence(QUIET).await;
    assert_eq!(Stats::get(&b.broker.stats.dropped_expired), 1);

    let mut r = b.v5_client(v5_connect("rx-sub", true), false).await;
    r.sub_v5(1, "rx/#", QoS::AtLeastOnce).await;
    let m = r.recv_publish().await;
    assert_eq!(
        m.topic, "rx/keep",
        "an expired retained message must not be sent"
    );
    assert!(m.retain);
    r.send_packet(&Packet::PubAck(Ack::new(m.packet_id))).await;
    r.expect_silence(QUIET).await;
    // Exact-name subscribe takes another path through the retained store.
    r.sub_v5(2, "rx/short", QoS::AtLeastOnce).await;
    r.expect_silence(QUIET).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 12. Subscription options and identifiers
// ---------------------------------------------------------------------------------------------

fn filter_opts(
    filter: &str,
    no_local: bool,
    retain_as_published: bool,
    retain_handling: RetainHandling,
) -> SubscribeFilter {
    SubscribeFilter {
        no_local,
        retain_as_published,
        retain_handling,
        ..v5_filter(filter, QoS::AtLeastOnce)
    }
}

/// [MQTT-3.8.3-3] No Local: the session's own publications are not delivered to it, others'
/// are; a subscriber without No Local gets both.
#[tokio::test]
async fn no_local() {
    let b = TestBroker::start().await;
    let mut me = b.v5_client(v5_connect("nl", true), false).await;
    let ack = me
        .subscribe_v5(
            1,
            vec![filter_opts(
                "nl/t",
                true,
                false,
                RetainHandling::OnSubscribe,
            )],
            None,
        )
        .await;
    assert_eq!(ack.reasons, vec![ReasonCode::GRANTED_QOS_1]);
    let mut other = b.v5_client(v5_connect("nl-other", true), false).await;
    other.sub_v5(1, "nl/t", QoS::AtLeastOnce).await;

    me.pub1_v5(v5_publish("nl/t", QoS::AtLeastOnce, 1, b"mine"))
        .await;
    assert_eq!(payload_str(&other.recv_publish().await), "mine");
    // Our PUBACK was read by pub1_v5; the first PUBLISH to reach us must be the other's.
    other
        .send_packet(&Packet::Publish(v5_publish(
            "nl/t",
            QoS::AtMostOnce,
            0,
            b"theirs",
        )))
        .await;
    assert_eq!(payload_str(&me.recv_publish().await), "theirs");
    b.stop().await;
}

/// [MQTT-3.3.1-12] Retain As Published 1 keeps RETAIN on forwarded messages; with 0 it is
/// cleared [MQTT-3.3.1-13].
#[tokio::test]
async fn retain_as_published() {
    let b = TestBroker::start().await;
    let mut s = b.v5_client(v5_connect("rap", true), false).await;
    s.subscribe_v5(
        1,
        vec![
            filter_opts("rap/yes", false, true, RetainHandling::Never),
            filter_opts("rap/no", false, false, RetainHandling::Never),
        ],
        None,
    )
    .await;
    let mut p = b.v5_client(v5_connect("rap-pub", true), false).await;
    for (i, t) in ["rap/yes", "rap/no"].iter().enumerate() {
        let mut m = v5_publish(t, QoS::AtLeastOnce, i as u16 + 1, b"r");
        m.retain = true;
        p.pub1_v5(m).await;
    }
    let yes = s.recv_publish().await;
    assert_eq!((yes.topic.as_str(), yes.retain), ("rap/yes", true));
    let no = s.recv_publish().await;
    assert_eq!((no.topic.as_str(), no.retain), ("rap/no", false));
    b.stop().await;
}

/// [MQTT-3.3.1-9] Retain Handling 0 sends retained messages on every SUBSCRIBE;
/// [MQTT-3.3.1-10] 1 only when the subscription did not exist; [MQTT-3.3.1-11] 2 never.
#[tokio::test]
async fn retain_handling() {
    let b = TestBroker::start().await;
    let mut p = b.v5_client(v5_connect("rh-pub", true), false).await;
    let mut m = v5_publish("rh/t", QoS::AtLeastOnce, 1, b"kept");
    m.retain = true;
    p.pub1_v5(m).await;

    let mut s = b.v5_client(v5_connect("rh", true), false).await;
    for (pid, rh, expect) in [
        (1u16, RetainHandling::OnSubscribe, true),
        (2, RetainHandling::OnSubscribe, true),
    ] {
        s.subscribe_v5(pid, vec![filter_opts("rh/t", false, false, rh)], None)
            .await;
        assert_eq!(drain_publishes(&mut s).await.len(), usize::from(expect));
    }
    for (pid, rh, expect) in [
        (3u16, RetainHandling::OnNewSubscribe, true),
        (4, RetainHandling::OnNewSubscribe, false),
    ] {
        s.subscribe_v5(pid, vec![filter_opts("rh/+", false, false, rh)], None)
            .await;
        let got = drain_publishes(&mut s).await;
        assert_eq!(got.len(), usize::from(expect), "RH 1, SUBSCRIBE {pid}");
        if expect {
            assert!(got[0].retain);
        }
    }
    s.subscribe_v5(
        5,
        vec![filter_opts("rh/#", false, false, RetainHandling::Never)],
        None,
    )
    .await;
    assert!(drain_publishes(&mut s).await.is_empty(), "RH 2 sends none");
    b.stop().await;
}

/// [MQTT-3.3.4-3, 3.3.4-4] Subscription Identifiers come back in matching PUBLISHes; one copy
/// for two matching subscriptions of the session carries both identifiers.
#[tokio::test]
async fn subscription_identifiers() {
    let b = TestBroker::start().await;
    let mut s = b.v5_client(v5_connect("si", true), false).await;
    s.subscribe_v5(1, vec![v5_filter("si/+", QoS::AtLeastOnce)], Some(7))
        .await;
    s.subscribe_v5(2, vec![v5_filter("si/#", QoS::AtLeastOnce)], Some(9))
        .await;
    s.subscribe_v5(3, vec![v5_filter("si/x/none", QoS::AtLeastOnce)], None)
        .await;
    let mut p = b.v5_client(v5_connect("si-pub", true), false).await;
    p.pub1_v5(v5_publish("si/a", QoS::AtLeastOnce, 1, b"both"))
        .await;
    p.pub1_v5(v5_publish("si/a/b", QoS::AtLeastOnce, 2, b"nine"))
        .await;
    p.pub1_v5(v5_publish("si/x/none", QoS::AtLeastOnce, 3, b"none"))
        .await;
    let got = drain_publishes(&mut s).await;
    let ids: Vec<(String, Vec<u32>)> = got
        .iter()
        .map(|m| {
            let mut ids = m.properties.subscription_identifiers.clone();
            ids.sort_unstable();
            (payload_str(m), ids)
        })
        .collect();
    assert_eq!(
        ids,
        vec![
            ("both".to_string(), vec![7, 9]),
            ("nine".to_string(), vec![9]),
            ("none".to_string(), vec![9]),
        ]
    );
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 13. Shared subscriptions
// ---------------------------------------------------------------------------------------------

/// Section 4.8.2: each message to `$share/g/t` goes to exactly one member; with two online
/// members all messages are delivered once overall and both get some.
#[tokio::test]
async fn shared_subscription_delivers_each_message_to_one_member() {
    let b = TestBroker::start().await;
    let mut m1 = b.v5_client(v5_connect("sh1", true), false).await;
    m1.sub_v5(1, "$share/g/sh/t", QoS::AtLeastOnce).await;
    let mut m2 = b.v5_client(v5_connect("sh2", true), false).await;
    m2.sub_v5(1, "$share/g/sh/t", QoS::AtLeastOnce).await;
    let mut p = b.v5_client(v5_connect("sh-pub", true), false).await;
    for i in 1..=10u16 {
        p.pub1_v5(v5_publish(
            "sh/t",
            QoS::AtLeastOnce,
            i,
            format!("{i}").as_bytes(),
        ))
        .await;
    }
    let a: Vec<String> = drain_publishes(&mut m1)
        .await
        .iter()
        .map(payload_str)
        .collect();
    let c: Vec<String> = drain_publishes(&mut m2)
        .await
        .iter()
        .map(payload_str)
        .collect();
    assert!(
        !a.is_empty() && !c.is_empty(),
        "both members used: {a:?} {c:?}"
    );
    let mut all: Vec<u16> = a.iter().chain(&c).map(|s| s.parse().unwrap()).collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=10).collect::<Vec<_>>(),
        "each message exactly once"
    );
    b.stop().await;
}

/// Section 4.8.2: an offline member (persistent session) is not given messages while an
/// online member can take them.
#[tokio::test]
async fn shared_subscription_prefers_online_members() {
    let b = TestBroker::start().await;
    let mut off = b
        .v5_client(v5_connect_expiry("sh-off", false, Some(60)), false)
        .await;
    off.sub_v5(1, "$share/g/sho/t", QoS::AtLeastOnce).await;
    off.disconnect_v5(ReasonCode::NORMAL_DISCONNECTION, None)
        .await;
    b.wait_offline("sh-off").await;
    let mut on = b.v5_client(v5_connect("sh-on", true), false).await;
    on.sub_v5(1, "$share/g/sho/t", QoS::AtLeastOnce).await;
    let mut p = b.v5_client(v5_connect("sho-pub", true), false).await;
    for i in 1..=6u16 {
        p.pub1_v5(v5_publish("sho/t", QoS::AtLeastOnce, i, b"m"))
            .await;
    }
    assert_eq!(drain_publishes(&mut on).await.len(), 6);
    assert_eq!(
        b.broker
            .registry
            .with_offline("sh-off", |s| s.mailbox.len()),
        Some(0),
        "nothing queued for the offline member"
    );
    b.stop().await;
}

/// [MQTT-3.8.3-4] No Local on a shared subscription is a Protocol Error: DISCONNECT 0x82.
#[tokio::test]
async fn shared_subscription_with_no_local_is_a_protocol_error() {
    let b = TestBroker::start().await;
    let mut c = b.v5_client(v5_connect("sh-nl", true), false).await;
    c.send_packet(&Packet::Subscribe(tether::wire::packet::Subscribe {
        packet_id: 1,
        filters: vec![filter_opts(
            "$share/g/shnl/t",
            true,
            false,
            RetainHandling::OnSubscribe,
        )],
        subscription_identifier: None,
        user_properties: vec![],
    }))
    .await;
    expect_server_disconnect(&mut c, ReasonCode::PROTOCOL_ERROR).await;
    b.stop().await;
}

/// A 3.1.1 client can be a member of a shared group with a 5.0 client.
#[tokio::test]
async fn shared_subscription_mixes_v311_and_v5_members() {
    let b = TestBroker::start().await;
    let mut v3 = b.raw().await;
    v3.send(&connect_v311("sh-v3", true, 60)).await;
    v3.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    v3.send(&subscribe(1, "$share/g/shm/t", 1)).await;
    v3.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x01]).await;
    let mut v5 = b.v5_client(v5_connect("sh-v5", true), false).await;
    v5.sub_v5(1, "$share/g/shm/t", QoS::AtLeastOnce).await;
    let mut p = b.v5_client(v5_connect("shm-pub", true), false).await;
    for i in 1..=6u16 {
        p.pub1_v5(v5_publish(
            "shm/t",
            QoS::AtLeastOnce,
            i,
            format!("{i}").as_bytes(),
        ))
        .await;
    }
    let a = drain_publishes(&mut v3).await;
    let c = drain_publishes(&mut v5).await;
    assert!(!a.is_empty() && !c.is_empty(), "both members used");
    assert_eq!(a.len() + c.len(), 6, "each message exactly once");
    b.stop().await;
}

/// Section 4.8.2: retained messages are not sent to a shared subscription when it is made
/// (an ordinary subscription to the same topic does get it).
#[tokio::test]
async fn shared_subscription_gets_no_retained_messages() {
    let b = TestBroker::start().await;
    let mut p = b.v5_client(v5_connect("shr-pub", true), false).await;
    let mut m = v5_publish("shr/t", QoS::AtLeastOnce, 1, b"kept");
    m.retain = true;
    p.pub1_v5(m).await;
    let mut s = b.v5_client(v5_connect("shr", true), false).await;
    s.sub_v5(1, "$share/g/shr/t", QoS::AtLeastOnce).await;
    s.expect_silence(QUIET).await;
    s.sub_v5(2, "shr/t", QoS::AtLeastOnce).await;
    let got = s.recv_publish().await;
    assert_eq!((got.topic.as_str(), got.retain), ("shr/t", true));
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 14. Property pass-through (rumqttc publisher and subscriber)
// ---------------------------------------------------------------------------------------------

mod rum {
    use super::*;
    pub use rumqttc::v5::mqttbytes::v5::{ConnAck, Packet as RPacket, PublishProperties as RProps};
    pub use rumqttc::v5::mqttbytes::QoS as RQoS;
    pub use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

    pub fn options(b: &TestBroker, id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", b.addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Poll until `pick` returns something, failing after `WAIT`.
    pub async fn poll_until<T>(el: &mut EventLoop, mut pick: impl FnMut(Event) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let ev = tokio::time::timeout_at(deadline, el.poll())
                .await
                .expect("rumqttc event in time")
                .expect("rumqttc connection");
            if let Some(t) = pick(ev) {
                return t;
            }
        }
    }

    pub async fn connect(o: MqttOptions) -> (AsyncClient, EventLoop, ConnAck) {
        let (client, mut el) = AsyncClient::new(o, 10);
        let ack = poll_until(&mut el, |e| match e {
            Event::Incoming(RPacket::ConnAck(a)) => Some(a),
            _ => None,
        })
        .await;
        (client, el, ack)
    }
}

/// Section 3.3.2.3: User Properties (order and repeats kept), Payload Format Indicator,
/// Content Type, Response Topic and Correlation Data reach the subscriber unchanged
/// [MQTT-3.3.2-4, 3.3.2-15, 3.3.2-16, 3.3.2-17, 3.3.2-20]; both directions are checked with
/// an independent client (rumqttc) on one side and our codec on the other.
#[tokio::test]
async fn application_properties_pass_through_unchanged() {
    use rum::*;
    let b = TestBroker::start().await;
    let users = vec![
        ("a".to_string(), "1".to_string()),
        ("b".to_string(), "x".to_string()),
        ("a".to_string(), "2".to_string()),
    ];

    // rumqttc -> raw subscriber.
    let mut raw_sub = b.v5_client(v5_connect("pt-raw", true), false).await;
    raw_sub.sub_v5(1, "pt/#", QoS::AtLeastOnce).await;
    let (client, mut el, _) = connect(options(&b, "pt-rum")).await;
    let props = RProps {
        payload_format_indicator: Some(1),
        content_type: Some("text/plain".into()),
        response_topic: Some("pt/reply".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: users.clone(),
        ..RProps::default()
    };
    client
        .publish_with_properties("pt/a", RQoS::AtLeastOnce, false, "héllo", props)
        .await
        .unwrap();
    poll_until(&mut el, |e| match e {
        Event::Incoming(RPacket::PubAck(_)) => Some(()),
        _ => None,
    })
    .await;
    let m = raw_sub.recv_publish().await;
    raw_sub
        .send_packet(&Packet::PubAck(Ack::new(m.packet_id)))
        .await;
    let expected = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("text/plain".into()),
        response_topic: Some("pt/reply".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: users.clone(),
        ..PublishProperties::default()
    };
    assert_eq!(m.properties, expected);
    assert_eq!(payload_str(&m), "héllo");

    // raw publisher -> rumqttc subscriber.
    client.subscribe("pt/b", RQoS::AtLeastOnce).await.unwrap();
    poll_until(&mut el, |e| match e {
        Event::Incoming(RPacket::SubAck(_)) => Some(()),
        _ => None,
    })
    .await;
    let mut raw_pub = b.v5_client(v5_connect("pt-raw-pub", true), false).await;
    let mut out = v5_publish("pt/b", QoS::AtLeastOnce, 1, b"back");
    out.properties = expected.clone();
    raw_pub.pub1_v5(out).await;
    let got = poll_until(&mut el, |e| match e {
        Event::Incoming(RPacket::Publish(p)) => Some(p),
        _ => None,
    })
    .await;
    let gp = got.properties.expect("properties");
    assert_eq!(gp.payload_format_indicator, Some(1));
    assert_eq!(gp.content_type.as_deref(), Some("text/plain"));
    assert_eq!(gp.response_topic.as_deref(), Some("pt/reply"));
    assert_eq!(gp.correlation_data.as_deref(), Some(&b"\x00\x01corr"[..]));
    assert_eq!(gp.user_properties, users);
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 15. Assigned Client Identifier
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.3-6, 3.1.3-7] An empty Client ID gets a unique identifier, returned as Assigned
/// Client Identifier, with Clean Start 1 and Clean Start 0 (where the session is kept under it).
#[tokio::test]
async fn empty_client_id_gets_an_assigned_identifier() {
    let b = TestBroker::start().await;
    let (_c1, ack) = b.connect_v5(v5_connect("", true)).await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
    let id1 = ack
        .properties
        .assigned_client_identifier
        .expect("Assigned Client Identifier");
    assert!(!id1.is_empty());
    assert!(b.broker.registry.is_online(&id1));

    let (mut c2, ack) = b.connect_v5(v5_connect_expiry("", false, Some(60))).await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
    assert!(!ack.session_present);
    let id2 = ack
        .properties
        .assigned_client_identifier
        .expect("Assigned Client Identifier with Clean Start 0");
    assert!(!id2.is_empty());
    assert_ne!(id1, id2);
    c2.disconnect_v5(ReasonCode::NORMAL_DISCONNECTION, None)
        .await;
    b.wait_offline(&id2).await;
    b.stop().await;
}

/// [MQTT-3.1.3-6] The assigned identifier is unique even for clients whose connections were
/// accepted together: neither takes over the other.
#[tokio::test]
async fn assigned_identifiers_are_unique_for_concurrent_connections() {
    let b = TestBroker::start().await;
    let mut c1 = b.raw().await;
    let mut c2 = b.raw().await;
    c1.version = tether::wire::packet::ProtocolVersion::V5;
    c2.version = tether::wire::packet::ProtocolVersion::V5;
    eventually("both connections accepted", || {
        Stats::get(&b.broker.stats.connections_accepted) == 2
    })
    .await;
    c1.send_packet(&Packet::Connect(Box::new(v5_connect("", true))))
        .await;
    let a1 = c1.recv_connack().await;
    c2.send_packet(&Packet::Connect(Box::new(v5_connect("", true))))
        .await;
    let a2 = c2.recv_connack().await;
    let id1 = a1.properties.assigned_client_identifier.unwrap();
    let id2 = a2.properties.assigned_client_identifier.unwrap();
    assert_ne!(
        id1, id2,
        "two live clients were assigned the same Client ID"
    );
    c1.send_packet(&Packet::PingReq).await;
    assert_eq!(
        c1.recv_packet().await,
        Packet::PingResp,
        "the first client is still connected"
    );
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 16. Server Keep Alive
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.2.2-21 context] With `max_keep_alive_secs = 5`, a client asking 0 or 60 is told
/// Server Keep Alive 5; a client asking 3 keeps its value (no override needed).
#[tokio::test]
async fn server_keep_alive_overrides_client_value() {
    let b = TestBroker::with_config(with_config(|c| c.listener.max_keep_alive_secs = 5)).await;
    for (asked, told) in [(0u16, Some(5u16)), (60, Some(5)), (3, None)] {
        let mut connect = v5_connect(&format!("ska{asked}"), true);
        connect.keep_alive = asked;
        let (_c, ack) = b.connect_v5(connect).await;
        assert_eq!(ack.reason, ReasonCode::SUCCESS);
        assert_eq!(
            ack.properties.server_keep_alive, told,
            "client keep-alive {asked}"
        );
    }
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 17. AUTH
// ---------------------------------------------------------------------------------------------

/// Section 4.12: enhanced authentication is not offered: CONNECT with an Authentication Method
/// -> CONNACK 0x8C and close, promptly.
#[tokio::test]
async fn connect_with_authentication_method_is_refused() {
    let b = TestBroker::start().await;
    let mut connect = v5_connect("am", true);
    connect.properties.authentication_method = Some("SCRAM-SHA-1".into());
    connect.properties.authentication_data = Some(Bytes::from_static(b"client-first"));
    let (mut c, ack) = b.connect_v5(connect).await;
    assert_eq!(ack.reason, ReasonCode::BAD_AUTHENTICATION_METHOD);
    assert!(!ack.session_present);
    c.expect_closed().await;
    assert!(!b.broker.registry.is_online("am"));
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 18. CONNACK capabilities (rumqttc)
// ---------------------------------------------------------------------------------------------

/// Section 3.2.2.3: CONNACK announces Topic Alias Maximum, Receive Maximum and Maximum Packet
/// Size; Retain, Wildcard Subscription, Subscription Identifiers and Shared Subscription
/// Available and Maximum QoS are absent, which means all are supported (1, and QoS 2), as
/// decoded by rumqttc and by our codec.
#[tokio::test]
async fn connack_announces_capabilities() {
    let b = TestBroker::start().await;
    let (_client, _el, ack) = rum::connect(rum::options(&b, "caps")).await;
    let p = ack.properties.expect("CONNACK properties");
    assert_eq!(p.retain_available, None);
    assert_eq!(p.wildcard_subscription_available, None);
    assert_eq!(p.subscription_identifiers_available, None);
    assert_eq!(p.shared_subscription_available, None);
    assert_eq!(p.topic_alias_max, Some(16));
    assert_eq!(p.max_qos, None, "Maximum QoS absent: QoS 2 supported");
    assert_eq!(p.receive_max, Some(64));
    assert_eq!(p.max_packet_size, Some(1024 * 1024));
    assert_eq!(p.assigned_client_identifier, None);

    let (_c, ack) = b.connect_v5(v5_connect("caps-raw", true)).await;
    let q = ack.properties;
    assert_eq!(
        (
            q.retain_available,
            q.wildcard_subscription_available,
            q.subscription_identifiers_available,
            q.shared_subscription_available,
            q.topic_alias_maximum,
            q.maximum_qos
        ),
        (None, None, None, None, Some(16), None)
    );
    b.stop().await;
}
