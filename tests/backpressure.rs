//! Back-pressure on publishers: a publisher is held back by a congested subscriber queue for
//! at most one bounded episode, and never by its own queue.
mod common;

use std::time::{Duration, Instant};

use common::*;
use tether::config::Config;
use tether::wire::packet::Packet;

/// A client subscribed to its own topic publishes faster than its (small) inflight window lets
/// the deliveries out. Its own queue fills past half its limit, but that queue only drains when
/// the connection reads the client's PUBACKs: waiting for it would stall the publisher for the
/// whole back-pressure bound (1 s) on every PUBLISH. All PUBACKs must come back promptly and
/// every message be delivered once.
#[tokio::test]
async fn a_publisher_never_waits_for_its_own_queue() {
    let mut cfg = Config::default();
    cfg.session.max_inflight = 2;
    cfg.session.max_queued_messages = 10;
    let b = TestBroker::with_config(cfg).await;
    let mut c = b.raw().await;
    c.send(&connect_v311("loop", true, 0)).await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    c.send(&subscribe(1, "self/t", 1)).await;
    c.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x01]).await;

    let started = Instant::now();
    let mut all = Vec::new();
    for i in 1..=10u16 {
        all.extend(publish("self/t", 1, i, false, false, &i.to_be_bytes()));
    }
    c.send(&all).await;
    let (mut acks, mut delivered) = (0, Vec::new());
    while acks < 10 || delivered.len() < 10 {
        match c.recv_packet().await {
            Packet::PubAck(_) => acks += 1,
            Packet::Publish(p) => {
                c.send(&ack(0x40, p.packet_id)).await;
                delivered.push(u16::from_be_bytes([p.payload[0], p.payload[1]]));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // One back-pressure episode alone lasts 1 s; the whole exchange takes milliseconds.
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "publisher stalled: {:?}",
        started.elapsed()
    );
    assert_eq!(delivered, (1..=10).collect::<Vec<u16>>());
    b.stop().await;
}
