//! Session takeover under concurrency: connections for one Client ID racing each other while
//! messages are published to the session, and pairs of simultaneous CONNECTs for one id.
//! No message may be lost, no connection may fail for any reason but being taken over, and
//! the registry must end with exactly one session per id and no takeover left hanging.
mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tether::config::Config;
use tether::stats::Stats;
use tether::wire::packet::{Packet, ReasonCode};
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, Barrier};

/// Messages published per scenario.
const N: u32 = 300;
/// Racing connections per scenario.
const ROUNDS: usize = 30;
/// How long a racer waits for one more PUBLISH before it moves on.
const READ_GAP: Duration = Duration::from_millis(200);
/// Silence that ends the final drain.
const QUIET: Duration = Duration::from_millis(500);
const DISCONNECT: [u8; 2] = [0xE0, 0x00];
const PINGREQ: [u8; 2] = [0xC0, 0x00];

#[derive(Default)]
struct Log {
    /// Message numbers some connection received.
    received: HashSet<u32>,
    /// Message numbers some connection sent PUBACK for.
    acked: HashSet<u32>,
    /// Everything that is not "closed because a new connection took the session over".
    errors: Vec<String>,
    /// Connections closed by the broker (taken over).
    taken_over: usize,
}

fn number(payload: &[u8]) -> u32 {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected payload {payload:?}"))
}

/// Connect `id` with Clean Session 0 and read the CONNACK; `Err` describes anything else.
async fn connect_persistent(addr: SocketAddr, id: &str, tag: &str) -> Result<Raw, String> {
    let mut c = Raw::connect(addr).await;
    c.send(&connect_v311(id, false, 30)).await;
    match c.recv_within(WAIT).await {
        Recv::Packet(Packet::ConnAck(a)) if a.reason == ReasonCode::SUCCESS => {
            if a.session_present {
                Ok(c)
            } else {
                Err(format!("{tag}: Session Present 0 for an existing session"))
            }
        }
        other => Err(format!("{tag}: expected CONNACK, got {other:?}")),
    }
}

/// Whether racer `round` stays until the next one takes its session over (otherwise it closes
/// the socket itself after a few reads).
fn waits_for_takeover(round: usize) -> bool {
    round % 3 != 0 && round != ROUNDS - 1
}

/// One racing connection: connect, read a few PUBLISHes acknowledging some, then either close
/// the socket itself or stay until the next racer takes the session over. `connected` fires
/// once the CONNACK (or a failure) arrived.
async fn racer(
    addr: SocketAddr,
    id: String,
    round: usize,
    connected: oneshot::Sender<()>,
    log: Arc<Mutex<Log>>,
) {
    let tag = format!("{id} round {round}");
    let connection = connect_persistent(addr, &id, &tag).await;
    let _ = connected.send(());
    let mut c = match connection {
        Ok(c) => c,
        Err(e) => {
            log.lock().unwrap().errors.push(e);
            return;
        }
    };
    let want = 1 + round % 4;
    let mut seen = 0;
    let wait_for_takeover = waits_for_takeover(round);
    loop {
        let gap = if seen < want {
            READ_GAP
        } else if wait_for_takeover {
            WAIT
        } else {
            // Leave on our own: the client closes the socket without DISCONNECT.
            return;
        };
        match c.recv_within(gap).await {
            Recv::Packet(Packet::Publish(p)) => {
                seen += 1;
                let n = number(&p.payload);
                let ack_it = (round + seen) % 3 != 0;
                {
                    let mut log = log.lock().unwrap();
                    log.received.insert(n);
                    if ack_it {
                        log.acked.insert(n);
                    }
                }
                if ack_it {
                    // The broker may already be closing this connection: a failed write is
                    // the takeover, seen on the next read.
                    let _ = c.stream.write_all(&ack(0x40, p.packet_id)).await;
                }
            }
            Recv::Packet(other) => {
                log.lock()
                    .unwrap()
                    .errors
                    .push(format!("{tag}: unexpected {other:?}"));
                return;
            }
            Recv::Timeout if seen < want => seen = want,
            Recv::Timeout => {
                log.lock()
                    .unwrap()
                    .errors
                    .push(format!("{tag}: not taken over within {WAIT:?}"));
                return;
            }
            Recv::Closed { leftover, .. } => {
                let mut log = log.lock().unwrap();
                if leftover > 0 {
                    log.errors
                        .push(format!("{tag}: closed inside a packet ({leftover} bytes)"));
                }
                log.taken_over += 1;
                return;
            }
        }
    }
}

/// Publish 0..N at QoS 1 to race/t in small pipelined batches, checking every PUBACK.
async fn publisher(addr: SocketAddr, id: String) -> Raw {
    let mut p = Raw::connect(addr).await;
    p.send(&connect_v311(&id, true, 30)).await;
    p.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    let batch = 5;
    let mut n = 0;
    while n < N {
        let end = (n + batch).min(N);
        let mut frames = Vec::new();
        for i in n..end {
            frames.extend(publish(
                "race/t",
                1,
                i as u16 + 1,
                false,
                false,
                i.to_string().as_bytes(),
            ));
        }
        p.send(&frames).await;
        for i in n..end {
            match p.recv_packet().await {
                Packet::PubAck(a) => assert_eq!(a.packet_id, i as u16 + 1),
                other => panic!("publisher: expected PUBACK, got {other:?}"),
            }
        }
        n = end;
        // Pacing only (spreads the publishes over the racing), not synchronisation.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    p
}

async fn takeover_scenario(b: &TestBroker, id: &str) {
    let addr = b.addr;
    // The persistent subscriber.
    let mut s = Raw::connect(addr).await;
    s.send(&connect_v311(id, false, 30)).await;
    s.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    s.send(&subscribe(1, "race/t", 1)).await;
    s.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x01]).await;
    drop(s);

    let log = Arc::new(Mutex::new(Log::default()));
    let pub_id = format!("{id}-pub");
    let publishing = tokio::spawn(publisher(addr, pub_id.clone()));

    let mut running: Option<tokio::task::JoinHandle<()>> = None;
    for round in 0..ROUNDS {
        // Vary how far the previous racer got before the next one connects.
        tokio::time::sleep(Duration::from_millis((round % 4) as u64)).await;
        let (connected_tx, connected) = oneshot::channel();
        let next = tokio::spawn(racer(
            addr,
            id.to_string(),
            round,
            connected_tx,
            log.clone(),
        ));
        if waits_for_takeover(round) {
            // Only a CONNECT claimed after this racer's can be expected to take it over, so
            // its successor starts once it is accepted (while it is reading and acking).
            // A racer that leaves by itself races its successor's CONNECT head-on instead.
            let _ = tokio::time::timeout(2 * WAIT, connected).await;
        }
        if let Some(prev) = running.replace(next) {
            tokio::time::timeout(2 * WAIT, prev)
                .await
                .expect("racer hung")
                .expect("racer panicked");
        }
    }
    tokio::time::timeout(2 * WAIT, running.take().unwrap())
        .await
        .expect("last racer hung")
        .expect("last racer panicked");

    let mut p = tokio::time::timeout(4 * WAIT, publishing)
        .await
        .expect("publisher hung")
        .expect("publisher panicked");
    p.send(&DISCONNECT).await;
    p.expect_closed().await;

    // Drain what is left, acknowledging everything.
    let mut c = match connect_persistent(addr, id, "final").await {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    loop {
        match c.recv_within(QUIET).await {
            Recv::Packet(Packet::Publish(p)) => {
                let n = number(&p.payload);
                {
                    let mut log = log.lock().unwrap();
                    log.received.insert(n);
                    log.acked.insert(n);
                }
                c.send(&ack(0x40, p.packet_id)).await;
            }
            Recv::Timeout => break,
            other => panic!("final drain: unexpected {other:?}"),
        }
    }

    {
        let log = log.lock().unwrap();
        assert!(
            log.errors.is_empty(),
            "connection errors: {:#?}",
            log.errors
        );
        let missing: Vec<u32> = (0..N).filter(|n| !log.received.contains(n)).collect();
        assert!(missing.is_empty(), "never delivered: {missing:?}");
        let unacked: Vec<u32> = (0..N).filter(|n| !log.acked.contains(n)).collect();
        assert!(
            unacked.is_empty(),
            "delivered but never acknowledged (not redelivered): {unacked:?}"
        );
    }

    eventually("publisher gone", || !b.broker.registry.is_online(&pub_id)).await;
    assert!(b.broker.registry.is_online(id));
    assert_eq!(b.broker.router.len(), 1, "one subscription, held once");
    c.send(&DISCONNECT).await;
    c.expect_closed().await;
    eventually("final connection parked", || {
        b.broker.registry.with_offline(id, |_| ()).is_some()
    })
    .await;
    assert_eq!(
        b.broker
            .registry
            .with_offline(id, |s| (s.mailbox.len(), s.inflight_len())),
        Some((0, 0)),
        "everything acknowledged, nothing left queued or in flight"
    );
    // Clean up so the next scenario starts from an empty broker.
    let mut c = Raw::connect(addr).await;
    c.send(&connect_v311(id, true, 30)).await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    c.send(&DISCONNECT).await;
    c.expect_closed().await;
    eventually("scenario state freed", || {
        b.broker.registry.is_empty() && b.broker.router.is_empty()
    })
    .await;
}

/// Racing takeovers of one persistent session while 300 QoS 1 messages are published to it:
/// every message is delivered and acknowledged at least once [MQTT-4.3.3 / 4.4.0-1: unacked
/// messages are resent on resume], every racer gets an accepting CONNACK with Session Present
/// 1 [MQTT-3.2.2-2] and is closed only by the next takeover [MQTT-3.1.4-2], and the broker
/// ends with one session and one subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_takeovers_lose_nothing() {
    let b = TestBroker::start().await;
    for i in 0..3 {
        takeover_scenario(&b, &format!("s{i}")).await;
    }
    assert_eq!(Stats::get(&b.broker.stats.dropped_queue_full), 0);
    b.stop().await;
}

/// Two CONNECTs for one Client ID at the same instant, 100 times: both are accepted, the
/// first is then closed by the takeover [MQTT-3.1.4-2], exactly one stays live, and a third
/// CONNECT is answered promptly (no slot left stuck in the middle of a takeover).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_connects_leave_one_live_connection() {
    let mut config = Config::default();
    // A takeover stuck for good makes the third CONNECT fail (CONNACK 3) well within WAIT.
    config.session.takeover_timeout_secs = 2;
    let b = TestBroker::with_config(config).await;
    let addr = b.addr;
    let mut persistent = 0;
    for i in 0..100 {
        let id = format!("dup{i}");
        let clean = i % 2 == 0;
        let barrier = Arc::new(Barrier::new(2));
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let barrier = barrier.clone();
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = Raw::connect(addr).await;
                barrier.wait().await;
                c.send(&connect_v311(&id, clean, 30)).await;
                match c.recv_within(WAIT).await {
                    Recv::Packet(Packet::ConnAck(a)) if a.reason == ReasonCode::SUCCESS => {
                        (c, a.session_present)
                    }
                    other => panic!("{id}: expected an accepting CONNACK, got {other:?}"),
                }
            }));
        }
        let mut conns = Vec::new();
        for t in tasks {
            conns.push(tokio::time::timeout(2 * WAIT, t).await.unwrap().unwrap());
        }
        let mut flags: Vec<bool> = conns.iter().map(|(_, p)| *p).collect();
        flags.sort();
        if clean {
            assert_eq!(flags, [false, false], "{id}: Clean Session 1 never resumes");
        } else {
            assert_eq!(
                flags,
                [false, true],
                "{id}: exactly the second claimer resumes the first one's session"
            );
        }

        // Exactly one of them is still live: it answers PINGREQ; the other is closed.
        let mut live = Vec::new();
        for (k, (mut c, _)) in conns.into_iter().enumerate() {
            let _ = c.stream.write_all(&PINGREQ).await;
            match c.recv_within(WAIT).await {
                Recv::Packet(Packet::PingResp) => live.push(c),
                Recv::Closed { .. } => {}
                other => panic!("{id} conn {k}: expected PINGRESP or close, got {other:?}"),
            }
        }
        assert_eq!(live.len(), 1, "{id}: live connections after the race");
        let mut winner = live.pop().unwrap();

        // A third CONNECT takes over promptly.
        let mut third = Raw::connect(addr).await;
        third.send(&connect_v311(&id, clean, 30)).await;
        match third.recv_within(WAIT).await {
            Recv::Packet(Packet::ConnAck(a)) => {
                assert_eq!(a.reason, ReasonCode::SUCCESS, "{id}: third CONNACK");
                assert_eq!(a.session_present, !clean, "{id}: third Session Present");
            }
            other => panic!("{id}: third CONNECT: expected CONNACK, got {other:?}"),
        }
        winner.expect_closed().await;
        third.send(&DISCONNECT).await;
        third.expect_closed().await;
        if !clean {
            persistent += 1;
        }
        eventually(&format!("{id} settled"), || {
            !b.broker.registry.is_online(&id)
                && b.broker.registry.len() == persistent
                && b.broker.registry.offline_count() == persistent
        })
        .await;
    }
    eventually("no connection left", || {
        Stats::get(&b.broker.stats.connections_current) == 0
    })
    .await;
    b.stop().await;
}
