//! The durability promise on the built binary: once tether has acknowledged a QoS 1/2
//! message (PUBACK / PUBREC sent), every persistent session it was routed to gets it, even if
//! the broker is SIGKILLed the next moment and restarted on the same data directory.
//!
//! Persistent subscribers (3.1.1 Clean Session 0 and v5 with Session Expiry) go offline; a
//! publisher pipelines thousands of alternating QoS 1 / QoS 2 messages and records every
//! acknowledgement; the broker is SIGKILLed at a random number of acknowledgements (while
//! publishing goes on); it is restarted on the same directory, the subscribers reconnect:
//! every acknowledged message arrives, QoS 2 ones exactly once. Several kill points. Segments
//! are small (64 KiB), so compaction runs while publishing and recovery starts from snapshots.
mod bin_support;
mod common;
mod crash_support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tether::wire::packet::{Ack, Disconnect, Packet, ProtocolVersion, QoS, ReasonCode};

use bin_support::{temp_dir, TempFile};
use common::Raw;
use crash_support::{encode, publish_until_killed, Pipeline};

/// Messages the publisher may send in one round (it is normally cut short by the kill).
const MAX_MESSAGES: u32 = 30_000;
/// Publisher's window of unacknowledged messages.
const WINDOW: usize = 256;
/// Silence that ends a subscriber's drain.
const QUIET: Duration = Duration::from_millis(1500);

fn config() -> TempFile {
    TempFile::new(
        "crash",
        "[session]\nmax_queued_messages = 1000000\nmax_queued_bytes = 1000000000\nmax_inbound_inflight = 1000\n\
         [persistence]\nsegment_bytes = 65536\n",
    )
}

/// Connect the two persistent subscribers, subscribe at QoS 2, and disconnect them.
async fn prepare_subscribers(port: u16) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = Raw::connect(addr).await;
    s.send(&common::connect_v311("crash-311", false, 60)).await;
    s.read_exact(4).await;
    s.send(&common::subscribe(1, "crash/#", 2)).await;
    s.read_exact(5).await;
    s.send(&[0xE0, 0x00]).await;

    let mut v = Raw::connect(addr).await;
    v.version = ProtocolVersion::V5;
    v.send_packet(&Packet::Connect(Box::new(common::v5_connect_expiry(
        "crash-v5",
        true,
        Some(3600),
    ))))
    .await;
    v.recv_connack().await;
    v.sub_v5(1, "crash/#", QoS::ExactlyOnce).await;
    v.disconnect_v5(ReasonCode::SUCCESS, None).await;
    // Both DISCONNECTs are handled (and the sessions parked) before anything is published.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Reconnect a subscriber and take everything it is sent until `QUIET`, acknowledging like a
/// real client (QoS 2: delivered on first PUBLISH of a packet id, not again until PUBREL).
/// Returns payload index -> times delivered.
async fn drain(port: u16, v5: bool) -> HashMap<u32, u32> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut c = Raw::connect(addr).await;
    let v = if v5 {
        c.version = ProtocolVersion::V5;
        c.send_packet(&Packet::Connect(Box::new(common::v5_connect_expiry(
            "crash-v5",
            false,
            Some(3600),
        ))))
        .await;
        ProtocolVersion::V5
    } else {
        c.send(&common::connect_v311("crash-311", false, 60)).await;
        ProtocolVersion::V311
    };
    let Packet::ConnAck(ack) = c.recv_packet().await else {
        panic!("expected CONNACK")
    };
    assert!(ack.session_present, "v5={v5}: session lost: {ack:?}");
    let mut got: HashMap<u32, u32> = HashMap::new();
    let mut pending_rel: HashSet<u16> = HashSet::new();
    while let Some(p) = c.recv_packet_within(QUIET).await {
        match p {
            Packet::Publish(p) => {
                let i: u32 = std::str::from_utf8(&p.payload)
                    .expect("utf-8")
                    .parse()
                    .expect("index");
                match p.qos {
                    QoS::AtLeastOnce => {
                        *got.entry(i).or_default() += 1;
                        c.send(&encode(&Packet::PubAck(Ack::new(p.packet_id)), v))
                            .await;
                    }
                    QoS::ExactlyOnce => {
                        if pending_rel.insert(p.packet_id) {
                            *got.entry(i).or_default() += 1;
                        }
                        c.send(&encode(&Packet::PubRec(Ack::new(p.packet_id)), v))
                            .await;
                    }
                    QoS::AtMostOnce => panic!("QoS 0 delivery of {i}"),
                }
            }
            Packet::PubRel(a) => {
                pending_rel.remove(&a.packet_id);
                c.send(&encode(&Packet::PubComp(Ack::new(a.packet_id)), v))
                    .await;
            }
            other => panic!("subscriber got {other:?}"),
        }
    }
    if v5 {
        c.send_packet(&Packet::Disconnect(Disconnect::default()))
            .await;
    } else {
        c.send(&[0xE0, 0x00]).await;
    }
    got
}

fn round(kill_at: usize) {
    let dir = temp_dir("crash");
    let d = dir.to_str().expect("utf-8").to_string();
    let cfg = config();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let mut first = bin_support::Broker::start_with(&["-d", &d, "-c", cfg.arg()]);
    let port = first.port;
    rt.block_on(prepare_subscribers(port));
    // Past 2,000 messages (64 KiB segments) the kill waits for a compaction to have finished,
    // so that recovery starts from a snapshot at some kill points; it runs in the background.
    let pipeline = Pipeline {
        client_id: "crash-pub",
        topic: "crash",
        topics: 7,
        messages: MAX_MESSAGES,
        window: WINDOW,
        kill_at,
    };
    let (acked, killed) = rt.block_on(publish_until_killed(port, first.pid(), &pipeline, || {
        kill_at <= 2000 || first.log().contains("store compacted")
    }));
    assert!(
        killed,
        "the broker closed the publisher before the kill point\n{}",
        first.log()
    );
    let st = first.proc.kill();
    assert!(!st.success(), "killed, not exited: {st:?}");
    if kill_at > 2000 {
        // Recovery below starts from a compaction snapshot.
        assert!(
            first.log().contains("store compacted"),
            "no compaction ran\n{}",
            first.log()
        );
    }
    let qos2 = acked.values().filter(|q| **q == QoS::ExactlyOnce).count();
    eprintln!(
        "kill at {kill_at}: {} acknowledged ({} QoS 2)",
        acked.len(),
        qos2
    );

    let second = bin_support::Broker::start_with(&["-d", &d, "-c", cfg.arg()]);
    second.wait_log(&["sessions restored"], bin_support::WAIT);
    for v5 in [false, true] {
        let got = rt.block_on(drain(second.port, v5));
        let missing: Vec<u32> = {
            let mut m: Vec<u32> = acked
                .keys()
                .filter(|i| !got.contains_key(i))
                .copied()
                .collect();
            m.sort();
            m
        };
        assert!(
            missing.is_empty(),
            "v5={v5}: {} of {} acknowledged messages lost, first {:?}\n{}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(10)],
            second.log()
        );
        for (i, n) in &got {
            if i % 2 == 1 {
                assert_eq!(*n, 1, "v5={v5}: QoS 2 message {i} delivered {n} times");
            }
        }
    }
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn acknowledged_messages_survive_sigkill_at_random_points() {
    // Kill points spread over the run, varied per run from the clock.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as usize)
        .unwrap_or(7);
    for (k, base) in [150usize, 1200, 4000].into_iter().enumerate() {
        let kill_at = base + (seed >> (k * 5)) % (base / 2 + 1);
        round(kill_at);
    }
}
