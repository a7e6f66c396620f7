//! MQTT 3.1.1 sessions, black-box: persistent and clean sessions, offline queues and their
//! limits, delivered QoS, overlapping subscriptions, `$` topics, retained messages, wills and
//! the persistent-session lifetime bound. Raw-bytes clients where the exact flags matter,
//! rumqttc (an independent client) where a real client library is the point.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tether::broker::Broker;
use tether::config::{Config, OverflowPolicy};
use tether::session::registry::{Claim, Parked};
use tether::session::EXPIRY_NEVER;
use tether::stats::Stats;
use tether::wire::packet::{Packet, ProtocolVersion, Publish, QoS, ReasonCode};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long a drain waits for one more packet before deciding the broker has nothing more.
const QUIET: Duration = Duration::from_millis(300);

const DISCONNECT: [u8; 2] = [0xE0, 0x00];

// ---------------------------------------------------------------------------------------------
// Raw-client helpers
// ---------------------------------------------------------------------------------------------

/// Connect `id` and return the client and the CONNACK's Session Present flag. Fails the test
/// unless the CONNACK accepts the connection.
async fn connect(b: &TestBroker, id: &str, clean: bool) -> (Raw, bool) {
    let mut c = b.raw().await;
    c.send(&connect_v311(id, clean, 30)).await;
    match c.recv_packet().await {
        Packet::ConnAck(a) => {
            assert_eq!(a.reason, ReasonCode::SUCCESS, "CONNACK for {id} refused");
            (c, a.session_present)
        }
        other => panic!("expected CONNACK for {id}, got {other:?}"),
    }
}

/// SUBSCRIBE to one filter and wait for its SUBACK granting `qos`.
async fn sub(c: &mut Raw, packet_id: u16, filter: &str, qos: u8) {
    c.send(&subscribe(packet_id, filter, qos)).await;
    match c.recv_packet().await {
        Packet::SubAck(a) => {
            assert_eq!(a.packet_id, packet_id);
            assert_eq!(a.reasons, vec![ReasonCode(qos)], "SUBACK for {filter}");
        }
        other => panic!("expected SUBACK for {filter}, got {other:?}"),
    }
}

/// Publish from a connection that subscribes to nothing, completing the QoS flow, so the
/// message has been routed when this returns (QoS 1/2). QoS 0 has no acknowledgement: use
/// `leave` on the publisher to know it was routed.
async fn pub_msg(c: &mut Raw, topic: &str, qos: u8, packet_id: u16, retain: bool, payload: &[u8]) {
    c.send(&publish(topic, qos, packet_id, false, retain, payload))
        .await;
    match qos {
        0 => {}
        1 => match c.recv_packet().await {
            Packet::PubAck(a) => assert_eq!(a.packet_id, packet_id),
            other => panic!("expected PUBACK, got {other:?}"),
        },
        _ => {
            match c.recv_packet().await {
                Packet::PubRec(a) => assert_eq!(a.packet_id, packet_id),
                other => panic!("expected PUBREC, got {other:?}"),
            }
            c.send(&ack(0x62, packet_id)).await;
            match c.recv_packet().await {
                Packet::PubComp(a) => assert_eq!(a.packet_id, packet_id),
                other => panic!("expected PUBCOMP, got {other:?}"),
            }
        }
    }
}

/// Send DISCONNECT and wait until the broker has finished with `id`'s connection (so every
/// packet it sent before has been handled).
async fn leave(b: &TestBroker, mut c: Raw, id: &str) {
    c.send(&DISCONNECT).await;
    c.expect_closed().await;
    eventually(&format!("{id} is no longer online"), || {
        !b.broker.registry.is_online(id)
    })
    .await;
}

/// The next packet, which must be a PUBLISH.
async fn recv_publish(c: &mut Raw) -> Publish {
    match c.recv_packet().await {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// Complete the subscriber side of a delivery's QoS flow.
async fn ack_delivery(c: &mut Raw, p: &Publish) {
    match p.qos {
        QoS::AtMostOnce => {}
        QoS::AtLeastOnce => c.send(&ack(0x40, p.packet_id)).await,
        QoS::ExactlyOnce => {
            c.send(&ack(0x50, p.packet_id)).await;
            match c.recv_packet().await {
                Packet::PubRel(a) => assert_eq!(a.packet_id, p.packet_id),
                other => panic!("expected PUBREL, got {other:?}"),
            }
            c.send(&ack(0x70, p.packet_id)).await;
        }
    }
}

/// Read and acknowledge PUBLISHes until nothing arrives for `QUIET`.
async fn drain(c: &mut Raw) -> Vec<Publish> {
    let mut got = Vec::new();
    loop {
        match c.recv_within(QUIET).await {
            Recv::Packet(Packet::Publish(p)) => {
                ack_delivery(c, &p).await;
                got.push(p);
            }
            Recv::Packet(other) => panic!("expected PUBLISH, got {other:?}"),
            Recv::Timeout => return got,
            Recv::Closed { error, .. } => panic!("connection closed while draining: {error:?}"),
        }
    }
}

fn payloads(ps: &[Publish]) -> Vec<String> {
    ps.iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

/// Connect `id` with Clean Session 0, subscribe `filter`, disconnect, and wait until the
/// session is parked offline.
async fn park_subscriber(b: &TestBroker, id: &str, filter: &str, qos: u8) {
    let (mut c, _) = connect(b, id, false).await;
    sub(&mut c, 1, filter, qos).await;
    leave(b, c, id).await;
    assert!(b.broker.registry.with_offline(id, |_| ()).is_some());
}

// ---------------------------------------------------------------------------------------------
// rumqttc helpers
// ---------------------------------------------------------------------------------------------

/// A rumqttc client whose event loop runs in a task until the first error (no automatic
/// reconnect). Aborting `task` drops the event loop and so closes the socket without
/// DISCONNECT.
struct Lib {
    client: rumqttc::AsyncClient,
    events: mpsc::UnboundedReceiver<rumqttc::Event>,
    task: JoinHandle<()>,
}

fn spawn_lib(opts: rumqttc::MqttOptions) -> Lib {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
    let (tx, events) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    Lib {
        client,
        events,
        task,
    }
}

impl Lib {
    /// The next incoming packet, failing the test after `WAIT`.
    async fn incoming(&mut self) -> rumqttc::Packet {
        let deadline = Instant::now() + WAIT;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("timed out waiting for an incoming packet")
                .expect("rumqttc event loop ended");
            if let rumqttc::Event::Incoming(p) = ev {
                return p;
            }
        }
    }

    async fn connack(&mut self) -> rumqttc::ConnAck {
        match self.incoming().await {
            rumqttc::Packet::ConnAck(a) => {
                assert_eq!(a.code, rumqttc::ConnectReturnCode::Success);
                a
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Persistent sessions
// ---------------------------------------------------------------------------------------------

/// Clean Session 0 keeps the subscription and the QoS 1 messages published while the client
/// was away: on reconnect the CONNACK says Session Present [MQTT-3.2.2-2] and the 50 queued
/// messages arrive in order without subscribing again [MQTT-3.1.2-4, MQTT-4.6.0-6].
#[tokio::test]
async fn persistent_session_keeps_subscription_and_queued_messages() {
    let b = TestBroker::start().await;
    let mut opts = b.options("keeper");
    opts.set_clean_session(false);

    let mut sub1 = spawn_lib(opts.clone());
    assert!(!sub1.connack().await.session_present, "first connect");
    sub1.client
        .subscribe("persist/t", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    match sub1.incoming().await {
        rumqttc::Packet::SubAck(a) => assert_eq!(
            a.return_codes,
            vec![rumqttc::SubscribeReasonCode::Success(
                rumqttc::QoS::AtLeastOnce
            )]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // Offline without DISCONNECT: drop the event loop.
    sub1.task.abort();
    eventually("keeper parked offline", || {
        b.broker.registry.with_offline("keeper", |_| ()).is_some()
    })
    .await;

    let (mut p, _) = connect(&b, "pub", true).await;
    for i in 0..50u16 {
        pub_msg(
            &mut p,
            "persist/t",
            1,
            i + 1,
            false,
            format!("{i}").as_bytes(),
        )
        .await;
    }
    assert_eq!(
        b.broker
            .registry
            .with_offline("keeper", |s| s.mailbox.len()),
        Some(50)
    );

    let mut sub2 = spawn_lib(opts);
    assert!(
        sub2.connack().await.session_present,
        "Session Present must be 1 when a session is resumed [MQTT-3.2.2-2]"
    );
    let mut got = Vec::new();
    while got.len() < 50 {
        match sub2.incoming().await {
            rumqttc::Packet::Publish(p) => {
                assert_eq!(p.topic, "persist/t");
                assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    let want: Vec<String> = (0..50).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "queued messages out of order or missing");
    // rumqttc acknowledged each one: after a clean disconnect nothing is left in the session.
    sub2.client.disconnect().await.unwrap();
    eventually("keeper parked again", || {
        b.broker.registry.with_offline("keeper", |_| ()).is_some()
    })
    .await;
    assert_eq!(
        b.broker
            .registry
            .with_offline("keeper", |s| (s.mailbox.len(), s.inflight_len())),
        Some((0, 0)),
        "every delivery was acknowledged"
    );
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Clean sessions
// ---------------------------------------------------------------------------------------------

/// Clean Session 1: the session lasts as long as the network connection [MQTT-3.1.2-6]; the
/// subscription leaves the router, the registry forgets the client, and the next connection
/// starts with Session Present 0 [MQTT-3.2.2-1] and receives nothing published meanwhile.
#[tokio::test]
async fn clean_session_state_ends_with_the_connection() {
    let b = TestBroker::start().await;
    let (mut c, present) = connect(&b, "clean", true).await;
    assert!(!present);
    sub(&mut c, 1, "cs/t", 1).await;
    assert_eq!(b.broker.registry.len(), 1);
    assert_eq!(b.broker.router.len(), 1);
    leave(&b, c, "clean").await;
    eventually("registry and router empty", || {
        b.broker.registry.is_empty() && b.broker.router.is_empty()
    })
    .await;

    let (mut p, _) = connect(&b, "pub", true).await;
    pub_msg(&mut p, "cs/t", 1, 1, false, b"while away").await;
    leave(&b, p, "pub").await;

    // Even asking for a persistent session now finds nothing left.
    let (mut c, present) = connect(&b, "clean", false).await;
    assert!(!present, "no session survived the clean-session connection");
    c.expect_silence(QUIET).await;
    leave(&b, c, "clean").await;

    // Same when the connection is lost rather than closed with DISCONNECT.
    let (mut c, _) = connect(&b, "clean2", true).await;
    sub(&mut c, 1, "cs/u", 1).await;
    drop(c);
    eventually("clean2 forgotten after an abrupt close", || {
        b.broker.registry.with_offline("clean2", |_| ()).is_none()
            && !b.broker.registry.is_online("clean2")
            && b.broker.router.is_empty()
    })
    .await;
    b.stop().await;
}

/// Clean Session 1 discards an existing persistent session, its subscriptions and queued
/// messages [MQTT-3.1.2-6]; Session Present is 0 [MQTT-3.2.2-1].
#[tokio::test]
async fn clean_session_discards_a_previous_persistent_session() {
    let b = TestBroker::start().await;
    park_subscriber(&b, "disc", "d/t", 1).await;
    let (mut p, _) = connect(&b, "pub", true).await;
    pub_msg(&mut p, "d/t", 1, 1, false, b"queued").await;
    assert_eq!(
        b.broker.registry.with_offline("disc", |s| s.mailbox.len()),
        Some(1)
    );
    let (mut c, present) = connect(&b, "disc", true).await;
    assert!(!present, "Session Present must be 0 with Clean Session 1");
    c.expect_silence(QUIET).await;
    assert_eq!(b.broker.router.len(), 0, "old subscription removed");
    // And the old subscription no longer routes.
    pub_msg(&mut p, "d/t", 1, 2, false, b"after").await;
    c.expect_silence(QUIET).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Offline queue limits
// ---------------------------------------------------------------------------------------------

/// Park "q" subscribed to q/t, publish `msgs` at QoS 1 while it is away, resume and drain.
async fn offline_queue_run(config: Config, msgs: &[&str]) -> (Vec<String>, u64) {
    let b = TestBroker::with_config(config).await;
    park_subscriber(&b, "q", "q/t", 1).await;
    let (mut p, _) = connect(&b, "pub", true).await;
    for (i, m) in msgs.iter().enumerate() {
        pub_msg(&mut p, "q/t", 1, i as u16 + 1, false, m.as_bytes()).await;
    }
    let (mut c, present) = connect(&b, "q", false).await;
    assert!(present);
    let got = drain(&mut c).await;
    assert!(got.iter().all(|p| p.qos == QoS::AtLeastOnce));
    let dropped = Stats::get(&b.broker.stats.dropped_queue_full);
    b.stop().await;
    (payloads(&got), dropped)
}

fn queue_config(max_messages: usize, max_bytes: usize, overflow: OverflowPolicy) -> Config {
    let mut c = Config::default();
    c.session.max_queued_messages = max_messages;
    c.session.max_queued_bytes = max_bytes;
    c.session.queue_overflow = overflow;
    c
}

/// `max_queued_messages = 5`: drop-new keeps 1..5, drop-oldest keeps 4..8; 3 counted either way.
#[tokio::test]
async fn offline_queue_message_limit() {
    let msgs = ["1", "2", "3", "4", "5", "6", "7", "8"];
    let (got, dropped) =
        offline_queue_run(queue_config(5, 1 << 20, OverflowPolicy::DropNew), &msgs).await;
    assert_eq!(got, ["1", "2", "3", "4", "5"], "drop-new");
    assert_eq!(dropped, 3, "drop-new counter");

    let (got, dropped) =
        offline_queue_run(queue_config(5, 1 << 20, OverflowPolicy::DropOldest), &msgs).await;
    assert_eq!(got, ["4", "5", "6", "7", "8"], "drop-oldest");
    assert_eq!(dropped, 3, "drop-oldest counter");
}

/// `max_queued_bytes = 14` with 7-byte messages (topic "q/t" + 4-byte payload): two fit; the
/// rest are dropped and counted.
#[tokio::test]
async fn offline_queue_byte_limit() {
    let msgs = ["m001", "m002", "m003", "m004", "m005"];
    let (got, dropped) =
        offline_queue_run(queue_config(1000, 14, OverflowPolicy::DropNew), &msgs).await;
    assert_eq!(got, ["m001", "m002"], "drop-new");
    assert_eq!(dropped, 3, "drop-new counter");

    let (got, dropped) =
        offline_queue_run(queue_config(1000, 14, OverflowPolicy::DropOldest), &msgs).await;
    assert_eq!(got, ["m004", "m005"], "drop-oldest");
    assert_eq!(dropped, 3, "drop-oldest counter");
}

// ---------------------------------------------------------------------------------------------
// 4. QoS 0 while offline
// ---------------------------------------------------------------------------------------------

async fn qos0_offline_run(queue_qos0_offline: bool) -> (Vec<(String, QoS)>, u64) {
    let mut config = Config::default();
    config.session.queue_qos0_offline = queue_qos0_offline;
    let b = TestBroker::with_config(config).await;
    park_subscriber(&b, "z", "z/t", 1).await;
    let (mut p, _) = connect(&b, "pub", true).await;
    pub_msg(&mut p, "z/t", 0, 0, false, b"zero").await;
    pub_msg(&mut p, "z/t", 1, 1, false, b"one").await;
    leave(&b, p, "pub").await;
    let (mut c, present) = connect(&b, "z", false).await;
    assert!(present);
    let got = drain(&mut c)
        .await
        .into_iter()
        .map(|p| (String::from_utf8_lossy(&p.payload).into_owned(), p.qos))
        .collect();
    let dropped = Stats::get(&b.broker.stats.dropped_qos0_offline);
    b.stop().await;
    (got, dropped)
}

/// QoS 0 messages for an offline session are not queued by default (3.1.1 section 3.1.2.4
/// makes it optional) and are counted; with `queue_qos0_offline` they are queued in order.
#[tokio::test]
async fn qos0_for_offline_session_is_optional() {
    let (got, dropped) = qos0_offline_run(false).await;
    assert_eq!(got, [("one".to_string(), QoS::AtLeastOnce)]);
    assert_eq!(dropped, 1);

    let (got, dropped) = qos0_offline_run(true).await;
    assert_eq!(
        got,
        [
            ("zero".to_string(), QoS::AtMostOnce),
            ("one".to_string(), QoS::AtLeastOnce)
        ]
    );
    assert_eq!(dropped, 0);
}

// ---------------------------------------------------------------------------------------------
// 5. Delivered QoS
// ---------------------------------------------------------------------------------------------

/// Every (granted, published) pair: the delivery uses min(published, granted) [MQTT-3.8.4-6
/// and section 3.8.4: "the QoS of the message delivered is the minimum"], with a packet
/// identifier exactly when that QoS is above 0 [MQTT-2.3.1-5].
#[tokio::test]
async fn delivered_qos_is_min_of_published_and_granted() {
    let b = TestBroker::start().await;
    let (mut s, _) = connect(&b, "sub", true).await;
    for g in 0..3u8 {
        sub(&mut s, u16::from(g) + 1, &format!("qos/{g}"), g).await;
    }
    let (mut p, _) = connect(&b, "pub", true).await;
    let mut pid = 1;
    for g in 0..3u8 {
        for q in 0..3u8 {
            let payload = format!("g{g}p{q}");
            pub_msg(
                &mut p,
                &format!("qos/{g}"),
                q,
                pid,
                false,
                payload.as_bytes(),
            )
            .await;
            pid += 1;
            let d = recv_publish(&mut s).await;
            assert_eq!(&d.payload[..], payload.as_bytes());
            assert_eq!(
                d.qos as u8,
                g.min(q),
                "granted {g}, published {q}: delivered at {:?}",
                d.qos
            );
            assert_eq!(d.packet_id != 0, g.min(q) > 0);
            assert!(!d.retain && !d.dup);
            ack_delivery(&mut s, &d).await;
        }
    }
    s.expect_silence(QUIET).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Overlapping subscriptions
// ---------------------------------------------------------------------------------------------

/// One client, `a/#` at QoS 0 and `a/b` at QoS 2: a message to a/b is delivered once, at the
/// maximum QoS of the matching subscriptions [MQTT-3.3.5-1]; a/c only matches `a/#` (QoS 0).
#[tokio::test]
async fn overlapping_subscriptions_deliver_one_copy_at_max_qos() {
    let b = TestBroker::start().await;
    let (mut s, _) = connect(&b, "over", true).await;
    sub(&mut s, 1, "a/#", 0).await;
    sub(&mut s, 2, "a/b", 2).await;
    let (mut p, _) = connect(&b, "pub", true).await;

    pub_msg(&mut p, "a/b", 2, 1, false, b"two").await;
    let d = recv_publish(&mut s).await;
    assert_eq!((&d.payload[..], d.qos), (&b"two"[..], QoS::ExactlyOnce));
    ack_delivery(&mut s, &d).await;

    pub_msg(&mut p, "a/b", 1, 2, false, b"one").await;
    let d = recv_publish(&mut s).await;
    assert_eq!((&d.payload[..], d.qos), (&b"one"[..], QoS::AtLeastOnce));
    ack_delivery(&mut s, &d).await;

    pub_msg(&mut p, "a/c", 2, 3, false, b"other").await;
    let d = recv_publish(&mut s).await;
    assert_eq!((&d.payload[..], d.qos), (&b"other"[..], QoS::AtMostOnce));

    s.expect_silence(QUIET).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. `$` topics
// ---------------------------------------------------------------------------------------------

/// Filters starting with a wildcard do not match topic names starting with `$`
/// [MQTT-4.7.2-1]; `$SYS/#` does.
#[tokio::test]
async fn wildcards_do_not_match_dollar_topics() {
    let b = TestBroker::start().await;
    let (mut all, _) = connect(&b, "all", true).await;
    sub(&mut all, 1, "#", 1).await;
    sub(&mut all, 2, "+/x", 1).await;
    let (mut sys, _) = connect(&b, "sys", true).await;
    sub(&mut sys, 1, "$SYS/#", 1).await;
    let (mut p, _) = connect(&b, "pub", true).await;
    pub_msg(&mut p, "$SYS/x", 1, 1, false, b"dollar").await;
    pub_msg(&mut p, "n/x", 1, 2, false, b"plain").await;

    let d = recv_publish(&mut all).await;
    assert_eq!(
        (d.topic.as_str(), &d.payload[..]),
        ("n/x", &b"plain"[..]),
        "`#` and `+/x` must not match $SYS/x"
    );
    ack_delivery(&mut all, &d).await;
    all.expect_silence(QUIET).await;

    let d = recv_publish(&mut sys).await;
    assert_eq!(
        (d.topic.as_str(), &d.payload[..]),
        ("$SYS/x", &b"dollar"[..])
    );
    ack_delivery(&mut sys, &d).await;
    sys.expect_silence(QUIET).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Retained messages
// ---------------------------------------------------------------------------------------------

/// Stored and sent to new subscribers with RETAIN 1 [MQTT-3.3.1-5, 3.3.1-6, 3.3.1-8]; replaced
/// by a newer one; forwarded to existing subscribers with RETAIN 0 [MQTT-3.3.1-9]; an empty
/// retained payload is forwarded as usual and deletes the retained message [MQTT-3.3.1-10,
/// 3.3.1-11].
#[tokio::test]
async fn retained_store_replace_delete() {
    let b = TestBroker::start().await;
    let (mut p, _) = connect(&b, "pub", true).await;
    pub_msg(&mut p, "r/t", 1, 1, true, b"v1").await;
    assert_eq!(b.broker.retained.len(), 1);

    let (mut s1, _) = connect(&b, "s1", true).await;
    sub(&mut s1, 1, "r/t", 1).await;
    let d = recv_publish(&mut s1).await;
    assert_eq!(&d.payload[..], b"v1");
    assert!(
        d.retain,
        "retained message on subscribe has RETAIN 1 [MQTT-3.3.1-8]"
    );
    ack_delivery(&mut s1, &d).await;
    s1.expect_silence(QUIET).await;

    pub_msg(&mut p, "r/t", 1, 2, true, b"v2").await;
    let d = recv_publish(&mut s1).await;
    assert_eq!(&d.payload[..], b"v2");
    assert!(
        !d.retain,
        "forwarded to an existing subscription: RETAIN 0 [MQTT-3.3.1-9]"
    );
    ack_delivery(&mut s1, &d).await;

    let (mut s2, _) = connect(&b, "s2", true).await;
    sub(&mut s2, 1, "r/#", 1).await;
    let d = recv_publish(&mut s2).await;
    assert_eq!(
        &d.payload[..],
        b"v2",
        "replaced by the newer retained message"
    );
    assert!(d.retain);
    ack_delivery(&mut s2, &d).await;
    s2.expect_silence(QUIET).await;

    pub_msg(&mut p, "r/t", 1, 3, true, b"").await;
    for s in [&mut s1, &mut s2] {
        let d = recv_publish(s).await;
        assert!(
            d.payload.is_empty(),
            "empty retained message forwarded [MQTT-3.3.1-10]"
        );
        assert!(!d.retain);
        ack_delivery(s, &d).await;
    }
    assert_eq!(b.broker.retained.len(), 0, "not stored [MQTT-3.3.1-11]");
    let (mut s3, _) = connect(&b, "s3", true).await;
    sub(&mut s3, 1, "r/t", 1).await;
    s3.expect_silence(QUIET).await;
    b.stop().await;
}

/// `retain.max_messages = 2`: a retained message to a third topic is delivered but not stored
/// (counted in `dropped_retained_full`); replacing an existing topic is still allowed.
#[tokio::test]
async fn retained_store_limit() {
    let mut config = Config::default();
    config.retain.max_messages = 2;
    let b = TestBroker::with_config(config).await;
    let (mut live, _) = connect(&b, "live", true).await;
    sub(&mut live, 1, "m/#", 1).await;
    let (mut p, _) = connect(&b, "pub", true).await;
    pub_msg(&mut p, "m/1", 1, 1, true, b"one").await;
    pub_msg(&mut p, "m/2", 1, 2, true, b"two").await;
    pub_msg(&mut p, "m/3", 1, 3, true, b"three").await;
    assert_eq!(b.broker.retained.len(), 2);
    assert_eq!(Stats::get(&b.broker.stats.dropped_retained_full), 1);
    let got = drain(&mut live).await;
    assert_eq!(
        payloads(&got),
        ["one", "two", "three"],
        "all still delivered"
    );

    pub_msg(&mut p, "m/1", 1, 4, true, b"uno").await;
    assert_eq!(Stats::get(&b.broker.stats.dropped_retained_full), 1);

    let (mut late, _) = connect(&b, "late", true).await;
    sub(&mut late, 1, "m/#", 1).await;
    let mut got = payloads(&drain(&mut late).await);
    got.sort();
    assert_eq!(got, ["two", "uno"]);
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 9. Wills
// ---------------------------------------------------------------------------------------------

/// The will is published with its QoS (and RETAIN) when the network connection closes without
/// DISCONNECT [MQTT-3.1.2-8], and not after a DISCONNECT [MQTT-3.1.2-10].
#[tokio::test]
async fn will_on_abrupt_close_not_on_disconnect() {
    let b = TestBroker::start().await;
    let (mut watch, _) = connect(&b, "watch", true).await;
    sub(&mut watch, 1, "will/#", 2).await;

    for (id, qos, want) in [
        ("w1", rumqttc::QoS::AtLeastOnce, QoS::AtLeastOnce),
        ("w2", rumqttc::QoS::ExactlyOnce, QoS::ExactlyOnce),
        ("w0", rumqttc::QoS::AtMostOnce, QoS::AtMostOnce),
    ] {
        let mut opts = b.options(id);
        opts.set_last_will(rumqttc::LastWill::new(
            format!("will/{id}"),
            "gone",
            qos,
            false,
        ));
        let mut c = spawn_lib(opts);
        c.connack().await;
        c.task.abort();
        let d = recv_publish(&mut watch).await;
        assert_eq!(d.topic, format!("will/{id}"));
        assert_eq!(&d.payload[..], b"gone");
        assert_eq!(d.qos, want, "will delivered with its own QoS");
        assert!(!d.retain);
        ack_delivery(&mut watch, &d).await;
    }
    assert_eq!(Stats::get(&b.broker.stats.wills_published), 3);

    // A retained will is stored [MQTT-3.1.2-17].
    let mut opts = b.options("wr");
    opts.set_last_will(rumqttc::LastWill::new(
        "will/wr",
        "kept",
        rumqttc::QoS::AtLeastOnce,
        true,
    ));
    let mut c = spawn_lib(opts);
    c.connack().await;
    c.task.abort();
    let d = recv_publish(&mut watch).await;
    assert_eq!(&d.payload[..], b"kept");
    ack_delivery(&mut watch, &d).await;
    let (mut late, _) = connect(&b, "late", true).await;
    sub(&mut late, 1, "will/wr", 1).await;
    let d = recv_publish(&mut late).await;
    assert_eq!((&d.payload[..], d.retain), (&b"kept"[..], true));

    // DISCONNECT: the will is discarded.
    let mut opts = b.options("wd");
    opts.set_last_will(rumqttc::LastWill::new(
        "will/wd",
        "must not appear",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let mut c = spawn_lib(opts);
    c.connack().await;
    eventually("wd online", || b.broker.registry.is_online("wd")).await;
    c.client.disconnect().await.unwrap();
    eventually("wd gone", || {
        !b.broker.registry.is_online("wd") && b.broker.registry.with_offline("wd", |_| ()).is_none()
    })
    .await;
    assert_eq!(Stats::get(&b.broker.stats.wills_published), 4);
    watch.expect_silence(QUIET).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 10. Persistent-session lifetime bound
// ---------------------------------------------------------------------------------------------

/// `persistent_session_max_lifetime_secs = 1`: a parked 3.1.1 session ends about a second
/// after its connection, not before; its subscription goes with it and a reconnect starts
/// fresh.
#[tokio::test]
async fn persistent_session_lifetime_real_time() {
    let mut config = Config::default();
    config.session.persistent_session_max_lifetime_secs = 1;
    let b = TestBroker::with_config(config).await;
    let (mut c, _) = connect(&b, "life", false).await;
    sub(&mut c, 1, "life/t", 1).await;
    drop(c);
    eventually("life parked", || {
        b.broker.registry.with_offline("life", |_| ()).is_some()
    })
    .await;
    let parked = std::time::Instant::now();
    assert_eq!(b.broker.router.len(), 1);
    assert_eq!(Stats::get(&b.broker.stats.sessions_expired), 0);

    let deadline = parked + Duration::from_secs(3);
    while !(b.broker.registry.is_empty()
        && b.broker.router.is_empty()
        && Stats::get(&b.broker.stats.sessions_expired) == 1)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "session not expired within 3 s: registry {}, router {}, expired {}",
            b.broker.registry.len(),
            b.broker.router.len(),
            Stats::get(&b.broker.stats.sessions_expired)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = parked.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "expired after {took:?}, before its 1 s lifetime"
    );
    let (c, present) = connect(&b, "life", false).await;
    assert!(!present, "the expired session is not resumed");
    leave(&b, c, "life").await;
    b.stop().await;
}

/// Let every ready task run (paused clock: no time passes).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// The timer task on a paused clock: sessions expire exactly at their deadline and not a
/// millisecond before; a session resumed and parked again expires from its new deadline, not
/// its old one; `EXPIRY_NEVER` arms no timer and never expires.
#[tokio::test(start_paused = true)]
async fn persistent_session_lifetime_paused_time() {
    let broker = Broker::new(Arc::new(Config::default()));
    let t0 = Instant::now();
    for (id, secs) in [("a", 10), ("b", 30), ("c", 10), ("never", EXPIRY_NEVER)] {
        assert!(broker.registry.insert_offline(
            broker.new_session(id.into(), ProtocolVersion::V311, secs),
            t0
        ));
    }
    assert_eq!(
        broker.registry.timers.len(),
        3,
        "EXPIRY_NEVER arms no timer"
    );
    let (stop, shutdown) = tether::shutdown::Shutdown::new();
    let timers = tokio::spawn(broker.clone().run_timers(shutdown));
    settle().await;

    let expired = || Stats::get(&broker.stats.sessions_expired);
    let present = |id: &str| broker.registry.with_offline(id, |_| ()).is_some();

    // At t0+5 "c" is resumed and parked again: its deadline moves to t0+15.
    tokio::time::advance(Duration::from_secs(5)).await;
    settle().await;
    let (tx, _rx) = tether::session::registry::control_channel();
    let Claim::Resumed {
        generation,
        session,
    } = broker.registry.claim(&"c".into(), &tx)
    else {
        panic!("expected to resume c");
    };
    assert_eq!(broker.registry.timers.len(), 2, "resume cancels c's timer");
    assert!(matches!(
        broker.registry.park(generation, session, Instant::now()),
        Parked::Offline
    ));
    assert_eq!(broker.registry.timers.len(), 3);

    let at = |secs: u64, ms: u64| t0 + Duration::from_secs(secs) + Duration::from_millis(ms);
    let advance_to = |to: Instant| async move {
        let now = Instant::now();
        assert!(to >= now);
        tokio::time::advance(to - now).await;
        settle().await;
    };

    advance_to(at(9, 999)).await;
    assert!(present("a") && present("b") && present("c") && present("never"));
    assert_eq!(expired(), 0, "nothing expires before its deadline");

    advance_to(at(10, 0)).await;
    assert!(!present("a"), "a expires at 10 s");
    assert!(present("c"), "c's old deadline (10 s) no longer applies");
    assert_eq!(expired(), 1);

    advance_to(at(14, 999)).await;
    assert!(present("c"));
    advance_to(at(15, 0)).await;
    assert!(!present("c"), "c expires 10 s after it was parked again");
    assert_eq!(expired(), 2);

    advance_to(at(29, 999)).await;
    assert!(present("b"));
    advance_to(at(30, 0)).await;
    assert!(!present("b"));
    assert_eq!(expired(), 3);

    advance_to(at(10 * 365 * 24 * 3600, 0)).await;
    assert!(present("never"), "EXPIRY_NEVER never expires");
    assert_eq!(expired(), 3);
    assert_eq!(broker.registry.len(), 1);
    assert!(broker.registry.timers.is_empty());

    stop.send(true).unwrap();
    timers.await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 11. Session end frees state
// ---------------------------------------------------------------------------------------------

/// 100 subscriptions of a clean session leave the router when it disconnects; those of a
/// persistent session stay until a Clean Session 1 connect discards it [MQTT-3.1.2-6].
#[tokio::test]
async fn session_end_frees_router_and_registry() {
    let b = TestBroker::start().await;
    let (mut c, _) = connect(&b, "many", true).await;
    for i in 0..100u16 {
        sub(&mut c, i + 1, &format!("f/{i}"), (i % 3) as u8).await;
    }
    assert_eq!(b.broker.router.len(), 100);
    assert_eq!(b.broker.registry.len(), 1);
    leave(&b, c, "many").await;
    eventually("router and registry empty after a clean session", || {
        b.broker.router.is_empty() && b.broker.registry.is_empty()
    })
    .await;

    let (mut c, _) = connect(&b, "many", false).await;
    for i in 0..100u16 {
        sub(&mut c, i + 1, &format!("g/{i}"), 1).await;
    }
    leave(&b, c, "many").await;
    assert_eq!(
        b.broker.router.len(),
        100,
        "a parked session keeps its subscriptions"
    );
    assert_eq!(b.broker.registry.len(), 1);
    let (c, present) = connect(&b, "many", true).await;
    assert!(!present);
    assert_eq!(b.broker.router.len(), 0, "discarded with the old session");
    leave(&b, c, "many").await;
    eventually("registry empty", || b.broker.registry.is_empty()).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Extras: resend on resume, re-subscribe
// ---------------------------------------------------------------------------------------------

/// Deliveries unacknowledged when the connection dropped are re-sent on resume with their
/// original packet identifiers, PUBLISH with DUP 1 and PUBREL for a QoS 2 message already
/// PUBREC'd, in their original order [MQTT-4.4.0-1, MQTT-3.3.1-1, MQTT-4.6.0-2/3].
#[tokio::test]
async fn unacknowledged_deliveries_are_resent_on_resume() {
    let b = TestBroker::start().await;
    let (mut s, _) = connect(&b, "resend", false).await;
    sub(&mut s, 1, "rs/1", 1).await;
    sub(&mut s, 2, "rs/2", 2).await;
    let (mut p, _) = connect(&b, "pub", true).await;
    pub_msg(&mut p, "rs/1", 1, 1, false, b"a").await;
    pub_msg(&mut p, "rs/2", 2, 2, false, b"b").await;
    pub_msg(&mut p, "rs/2", 2, 3, false, b"c").await;
    let a = recv_publish(&mut s).await;
    let bb = recv_publish(&mut s).await;
    let c = recv_publish(&mut s).await;
    assert_eq!(
        payloads(&[a.clone(), bb.clone(), c.clone()]),
        ["a", "b", "c"]
    );
    // PUBREC for "b" only; nothing else acknowledged.
    s.send(&ack(0x50, bb.packet_id)).await;
    match s.recv_packet().await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, bb.packet_id),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    drop(s);
    eventually("resend parked", || {
        b.broker.registry.with_offline("resend", |_| ()).is_some()
    })
    .await;
    assert_eq!(
        b.broker
            .registry
            .with_offline("resend", |s| s.inflight_len()),
        Some(3)
    );

    let (mut s, present) = connect(&b, "resend", false).await;
    assert!(present);
    let r = recv_publish(&mut s).await;
    assert_eq!(
        (r.packet_id, r.dup, &r.payload[..]),
        (a.packet_id, true, &b"a"[..])
    );
    assert_eq!(r.qos, QoS::AtLeastOnce);
    match s.recv_packet().await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, bb.packet_id, "PUBREL re-sent"),
        other => panic!("expected PUBREL for b, got {other:?}"),
    }
    let r = recv_publish(&mut s).await;
    assert_eq!(
        (r.packet_id, r.dup, &r.payload[..]),
        (c.packet_id, true, &b"c"[..])
    );
    assert_eq!(r.qos, QoS::ExactlyOnce);
    s.send(&ack(0x40, a.packet_id)).await;
    s.send(&ack(0x70, bb.packet_id)).await;
    ack_delivery(&mut s, &r).await;
    s.expect_silence(QUIET).await;
    leave(&b, s, "resend").await;
    assert_eq!(
        b.broker
            .registry
            .with_offline("resend", |s| (s.inflight_len(), s.mailbox.len())),
        Some((0, 0))
    );
    b.stop().await;
}

/// A SUBSCRIBE to an existing filter replaces the subscription (new QoS, still one entry) and
/// re-sends the matching retained messages [MQTT-3.8.4-3].
#[tokio::test]
async fn resubscribe_replaces_and_resends_retained() {
    let b = TestBroker::start().await;
    let (mut p, _) = connect(&b, "pub", true).await;
    pub_msg(&mut p, "re/t", 1, 1, true, b"keep").await;
    let (mut s, _) = connect(&b, "re", true).await;
    sub(&mut s, 1, "re/t", 2).await;
    let d = recv_publish(&mut s).await;
    assert_eq!(
        (&d.payload[..], d.qos, d.retain),
        (&b"keep"[..], QoS::AtLeastOnce, true)
    );
    ack_delivery(&mut s, &d).await;

    sub(&mut s, 2, "re/t", 0).await;
    assert_eq!(b.broker.router.len(), 1, "replaced, not added");
    let d = recv_publish(&mut s).await;
    assert_eq!(
        (&d.payload[..], d.qos, d.retain),
        (&b"keep"[..], QoS::AtMostOnce, true)
    );

    pub_msg(&mut p, "re/t", 2, 2, false, b"new").await;
    let d = recv_publish(&mut s).await;
    assert_eq!((&d.payload[..], d.qos), (&b"new"[..], QoS::AtMostOnce));
    s.expect_silence(QUIET).await;
    b.stop().await;
}
