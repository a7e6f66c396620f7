//! The harness itself works: a 3.1.1 client connects, subscribes, and gets its own message.
mod common;

use common::*;

#[tokio::test]
async fn connect_subscribe_publish_round_trip() {
    let b = TestBroker::start().await;
    let mut c = b.raw().await;
    c.send(&connect_v311("smoke", true, 30)).await;
    // CONNACK, session present 0, accepted [MQTT-3.2.2-1].
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    c.send(&subscribe(1, "a/+", 1)).await;
    c.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x01]).await;
    c.send(&publish("a/b", 1, 7, false, false, b"hi")).await;
    // PUBACK for our publish and the delivery, in either order.
    let mut got = [c.recv_packet().await, c.recv_packet().await];
    got.sort_by_key(|p| p.name());
    assert_eq!(got[0].name(), "PUBACK");
    assert_eq!(got[1].name(), "PUBLISH");
    b.stop().await;
}
