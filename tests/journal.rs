//! What a session's life writes to the journal, seen from outside: a broker running on a real
//! socket journals to a recording, and raw clients drive it through connect, subscribe, QoS 1
//! and QoS 2 in both directions, disconnect, resume with re-sends and takeover. Each test
//! asserts the exact sequence of events.
mod common;

use std::sync::Arc;

use common::*;
use tether::session::journal::recording::{Rec, Recording};
use tether::session::journal::ImageKind;
use tether::session::OutState;
use tether::wire::packet::{Disconnect, Packet, QoS, ReasonCode, Subscribe};

async fn started() -> (TestBroker, Arc<Recording>) {
    let rec = Recording::new();
    (TestBroker::with_journal(rec.clone()).await, rec)
}

fn image(kind: ImageKind, id: &str, parked: bool, subs: &[&str]) -> Rec {
    Rec::Image(
        kind,
        id.into(),
        parked,
        subs.iter().map(|s| s.to_string()).collect(),
    )
}

/// Wait until the recording holds `n` events, and take them.
async fn take(rec: &Recording, n: usize) -> Vec<Rec> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < n && tokio::time::Instant::now() < deadline {
        got.extend(rec.take_events());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    got.extend(rec.take_events());
    got
}

/// A 3.1.1 persistent subscriber to `t/#` at QoS 2, ready.
async fn subscriber(b: &TestBroker, id: &str, present: bool) -> Raw {
    let mut c = b.raw().await;
    c.send(&connect_v311(id, false, 30)).await;
    c.expect_bytes(&[0x20, 0x02, u8::from(present), 0x00]).await;
    c
}

#[tokio::test]
async fn qos1_and_qos2_deliveries_and_their_acks() {
    let (b, rec) = started().await;
    let mut sub = subscriber(&b, "s", false).await;
    sub.send(&subscribe(1, "t/#", 2)).await;
    sub.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x02]).await;
    assert_eq!(
        take(&rec, 2).await,
        vec![
            // Clean Session 0 makes the session durable at CONNECT [MQTT-3.1.2-4]...
            image(ImageKind::Created, "s", false, &[]),
            // ...and its subscriptions are part of its state [MQTT-3.1.2-4].
            image(ImageKind::Changed, "s", false, &["t/#"]),
        ]
    );

    let mut publisher = b.raw().await;
    publisher.send(&connect_v311("p", true, 30)).await;
    publisher.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    publisher
        .send(&publish("t/1", 1, 10, false, false, b"one"))
        .await;
    publisher.expect_bytes(&ack(0x40, 10)).await;
    let Packet::Publish(p1) = sub.recv_packet().await else {
        panic!("expected PUBLISH")
    };
    sub.send(&ack(0x40, p1.packet_id)).await;
    assert_eq!(
        take(&rec, 3).await,
        vec![
            Rec::Enqueued(1),
            Rec::InFlight(1, p1.packet_id, OutState::AwaitPubAck),
            Rec::Done(1),
        ]
    );

    // QoS 2 in from the publisher: the id is journaled before PUBREC, released before
    // PUBCOMP; but the publisher's session ends with its connection, so nothing of it is
    // journaled. Out to the subscriber: in flight, PUBREC'd, done.
    publisher
        .send(&publish("t/2", 2, 11, false, false, b"two"))
        .await;
    publisher.expect_bytes(&ack(0x50, 11)).await;
    let Packet::Publish(p2) = sub.recv_packet().await else {
        panic!("expected PUBLISH")
    };
    sub.send(&ack(0x50, p2.packet_id)).await;
    sub.expect_bytes(&ack(0x62, p2.packet_id)).await;
    sub.send(&ack(0x70, p2.packet_id)).await;
    publisher.send(&ack(0x62, 11)).await;
    publisher.expect_bytes(&ack(0x70, 11)).await;
    assert_eq!(
        take(&rec, 4).await,
        vec![
            Rec::Enqueued(2),
            Rec::InFlight(2, p2.packet_id, OutState::AwaitPubRec),
            Rec::PubRecd(2, p2.packet_id),
            Rec::Done(2),
        ]
    );
    b.stop().await;
}

#[tokio::test]
async fn inbound_qos2_of_a_durable_session() {
    let (b, rec) = started().await;
    let mut c = subscriber(&b, "in", false).await;
    c.send(&publish("x/1", 2, 5, false, false, b"q2")).await;
    c.expect_bytes(&ack(0x50, 5)).await;
    // A resend of the same id before PUBREL is not journaled again [MQTT-4.3.3-10].
    c.send(&publish("x/1", 2, 5, true, false, b"q2")).await;
    c.expect_bytes(&ack(0x50, 5)).await;
    c.send(&ack(0x62, 5)).await;
    c.expect_bytes(&ack(0x70, 5)).await;
    assert_eq!(
        take(&rec, 3).await,
        vec![
            image(ImageKind::Created, "in", false, &[]),
            Rec::InboundAdded(5),
            Rec::InboundReleased(5),
        ]
    );
    b.stop().await;
}

#[tokio::test]
async fn park_and_resume_with_resends() {
    let (b, rec) = started().await;
    let mut sub = subscriber(&b, "r", false).await;
    sub.send(&subscribe(1, "t/#", 1)).await;
    sub.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x01]).await;
    b.broker.publish(tether_message("t/a", b"a"));
    let Packet::Publish(first) = sub.recv_packet().await else {
        panic!("expected PUBLISH")
    };
    // Gone without acknowledging; one more message arrives while it is away.
    drop(sub);
    eventually("parked", || b.broker.registry.offline_count() == 1).await;
    b.broker.publish(tether_message("t/b", b"b"));
    assert_eq!(
        take(&rec, 6).await,
        vec![
            image(ImageKind::Created, "r", false, &[]),
            image(ImageKind::Changed, "r", false, &["t/#"]),
            Rec::Enqueued(1),
            Rec::InFlight(1, first.packet_id, OutState::AwaitPubAck),
            image(ImageKind::Parked, "r", true, &["t/#"]),
            Rec::Enqueued(2),
        ]
    );

    // Resumed [MQTT-3.1.2-4]: the unacknowledged PUBLISH again with DUP and its id
    // [MQTT-4.4.0-1] (journaled when first sent, not again), then the queued one.
    let mut sub = subscriber(&b, "r", true).await;
    let Packet::Publish(again) = sub.recv_packet().await else {
        panic!("expected the re-send")
    };
    assert!(again.dup && again.packet_id == first.packet_id);
    let Packet::Publish(second) = sub.recv_packet().await else {
        panic!("expected the queued message")
    };
    sub.send(&ack(0x40, again.packet_id)).await;
    sub.send(&ack(0x40, second.packet_id)).await;
    assert_eq!(
        take(&rec, 4).await,
        vec![
            image(ImageKind::Changed, "r", false, &["t/#"]),
            Rec::InFlight(2, second.packet_id, OutState::AwaitPubAck),
            Rec::Done(1),
            Rec::Done(2),
        ]
    );
    // Clean Session 1 discards it [MQTT-3.1.2-6]: the journal ends it.
    drop(sub);
    eventually("parked again", || b.broker.registry.offline_count() == 1).await;
    rec.take_events();
    let mut clean = b.raw().await;
    clean.send(&connect_v311("r", true, 30)).await;
    clean.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    assert_eq!(take(&rec, 1).await, vec![Rec::Ended]);
    b.stop().await;
}

#[tokio::test]
async fn takeover_moves_the_session_without_parking_it() {
    let (b, rec) = started().await;
    let mut a = v5_session(b.addr, "t", false, 600, false).await;
    a.send_packet(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![v5_filter("t/#", QoS::AtLeastOnce)],
        subscription_identifier: None,
        user_properties: vec![],
    }))
    .await;
    let _ = a.recv_packet().await;
    rec.take_events();
    // The same Client ID connects again: the first connection is closed with 0x8E
    // [MQTT-3.1.4-3] and the session moves over, present [MQTT-3.2.2-2].
    let mut c = v5_session(b.addr, "t", false, 600, true).await;
    match a.recv_packet().await {
        Packet::Disconnect(Disconnect { reason, .. }) => {
            assert_eq!(reason, ReasonCode::SESSION_TAKEN_OVER)
        }
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    // No Parked image between the two connections: the session never waited offline.
    assert_eq!(
        take(&rec, 1).await,
        vec![image(ImageKind::Changed, "t", false, &["t/#"])]
    );
    c.send_packet(&Packet::Disconnect(Disconnect::default()))
        .await;
    assert_eq!(
        take(&rec, 1).await,
        vec![image(ImageKind::Parked, "t", true, &["t/#"])]
    );
    b.stop().await;
}

fn tether_message(topic: &str, payload: &'static [u8]) -> tether::wire::message::Message {
    tether::wire::message::Message {
        topic: topic.into(),
        payload: bytes::Bytes::from_static(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
        expires_at: None,
        publisher: None,
        stored: Default::default(),
        encoded: Default::default(),
    }
}
