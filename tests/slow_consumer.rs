//! Slow consumers: a subscriber that stops draining its queue pays alone. It holds a publisher
//! back for at most one back-pressure bound (`session.slow_consumer_after_ms`), is then marked
//! slow, and from there on only its own queue limits apply; every other subscriber of the same
//! topic gets every message.
mod common;

use std::time::Duration;

use common::*;
use tether::config::Config;
use tether::ops::admin;
use tether::stats::Stats;
use tether::wire::packet::Packet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MESSAGES: usize = 20_000;
const PAYLOAD: usize = 1024;

fn config() -> Config {
    let mut cfg = Config::default();
    // A short bound keeps the test quick; the rule is the same at the default 1 s.
    cfg.session.slow_consumer_after_ms = 300;
    cfg
}

/// A subscriber that reads every PUBLISH (acknowledging QoS 1) and counts them, checking the
/// order of the 4-byte sequence numbers at the start of each payload.
fn healthy(mut c: Raw) -> tokio::task::JoinHandle<(Vec<u32>, Raw)> {
    tokio::spawn(async move {
        let mut seen = Vec::with_capacity(MESSAGES);
        while seen.len() < MESSAGES {
            match c.recv_packet().await {
                Packet::Publish(p) => {
                    if p.qos as u8 == 1 {
                        c.send(&ack(0x40, p.packet_id)).await;
                    }
                    seen.push(u32::from_be_bytes([
                        p.payload[0],
                        p.payload[1],
                        p.payload[2],
                        p.payload[3],
                    ]));
                }
                other => panic!("healthy subscriber got {other:?}"),
            }
        }
        (seen, c)
    })
}

async fn subscriber(b: &TestBroker, id: &str, qos: u8) -> Raw {
    let mut c = b.raw().await;
    c.send(&connect_v311(id, true, 0)).await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    c.send(&subscribe(1, "sc/t", qos)).await;
    c.expect_bytes(&[0x90, 0x03, 0x00, 0x01, qos]).await;
    c
}

/// Publish MESSAGES at `qos` from one raw client as fast as the broker reads them; for QoS 1,
/// read the PUBACKs alongside and return how many came back.
async fn publish_all(b: &TestBroker, qos: u8) -> usize {
    let stream = tokio::net::TcpStream::connect(b.addr)
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(&connect_v311("sc-pub", true, 0))
        .await
        .expect("write");
    let acks = tokio::spawn(async move {
        let mut n = 0;
        // CONNACK first; then each PUBACK (4 bytes); the PINGRESP at the end closes the count.
        loop {
            let first = rd.read_u8().await.expect("read");
            let len = rd.read_u8().await.expect("read");
            let mut body = vec![0u8; len as usize];
            rd.read_exact(&mut body).await.expect("read");
            match first {
                0x20 => assert_eq!(body, [0, 0], "CONNACK accepted"),
                0x40 => n += 1,
                0xd0 => return n,
                other => panic!("publisher got packet type {other:#x}"),
            }
        }
    });
    let mut batch = Vec::new();
    for i in 0..MESSAGES {
        let mut payload = vec![0u8; PAYLOAD];
        payload[..4].copy_from_slice(&(i as u32).to_be_bytes());
        let id = (i % 60000 + 1) as u16;
        batch.extend(publish("sc/t", qos, id, false, false, &payload));
        if batch.len() >= 64 * 1024 {
            wr.write_all(&batch).await.expect("write");
            batch.clear();
        }
    }
    batch.extend([0xc0, 0x00]); // PINGREQ: answered once everything before it is handled
    wr.write_all(&batch).await.expect("write");
    acks.await.expect("ack reader")
}

async fn check(qos: u8) {
    let b = TestBroker::with_config(config()).await;
    // Subscribes, then never reads its socket again (and, at QoS 1, never acknowledges).
    let stuck = subscriber(&b, "sc-stuck", qos).await;
    let healthy = healthy(subscriber(&b, "sc-healthy", qos).await);

    let acked = publish_all(&b, qos).await;
    let (seen, healthy_conn) = tokio::time::timeout(Duration::from_secs(60), healthy)
        .await
        .expect("healthy subscriber got everything in time")
        .expect("healthy task");
    if qos == 1 {
        assert_eq!(acked, MESSAGES, "every QoS 1 PUBLISH acknowledged");
    }
    assert_eq!(
        seen,
        (0..MESSAGES as u32).collect::<Vec<_>>(),
        "the healthy subscriber gets every message, in order"
    );

    let stats = &b.broker.stats;
    assert_eq!(Stats::get(&stats.slow_consumers_marked), 1, "marked once");
    // Held back by the stuck queue until it was marked (an episode or two while its socket
    // buffers still took data), never again afterwards: without the mark it would be one
    // bound per PUBLISH.
    let timeouts = Stats::get(&stats.backpressure_timeouts);
    assert!(
        (1..=3).contains(&timeouts),
        "publisher held back to the bound {timeouts} times"
    );
    let info = match admin::session(&b.broker, "sc-stuck").await {
        admin::Lookup::Found(i) => i,
        _ => panic!("stuck session is still there"),
    };
    assert!(info.slow, "the admin API shows the stuck session as slow");
    assert!(info.dropped_messages > 0, "its drops are counted");
    let healthy_info = match admin::session(&b.broker, "sc-healthy").await {
        admin::Lookup::Found(i) => i,
        _ => panic!("healthy session is still there"),
    };
    assert!(!healthy_info.slow);
    assert_eq!(healthy_info.dropped_messages, 0);
    if qos == 0 {
        assert!(Stats::get(&stats.dropped_slow_qos0) > 0);
    } else {
        assert_eq!(Stats::get(&stats.dropped_slow_qos0), 0);
        assert!(Stats::get(&stats.dropped_queue_full) > 0);
    }
    let metrics = admin::prometheus(&admin::figures(&b.broker).await);
    assert!(metrics.contains("tether_slow_consumers 1\n"), "{metrics}");
    drop((stuck, healthy_conn));
    b.stop().await;
}

/// The scenario of the issue: a stuck QoS 0 subscriber, a healthy one, a publisher of 1 KiB
/// QoS 0 messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_qos0_subscriber_costs_only_itself() {
    check(0).await;
}

/// The same with QoS 1: the stuck subscriber never sends PUBACK. Every message acknowledged to
/// the publisher reaches the healthy subscriber; the stuck one's drops are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_qos1_subscriber_costs_only_itself() {
    check(1).await;
}
