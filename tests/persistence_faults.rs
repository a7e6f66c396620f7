//! The persistence layer under faults, on the built binary.
//!
//! Disk full: tether is started through `sh` with SIGXFSZ ignored, and the test lowers its
//! RLIMIT_FSIZE below the size of the active log segment with `prlimit(1)` (segments are made
//! larger than anything written, so the writer keeps appending to one file): from then on
//! every write of the store fails with EFBIG, as on a full disk. Raising the limit again is
//! "space returns". What tether must do meanwhile (README, "Persistence", disk full): refuse
//! new QoS 1/2 PUBLISHes (v5: PUBACK / PUBREC 0x97 Quota exceeded; 3.1.1: close the
//! connection), keep serving everything else, log the error once, recover by itself (it
//! retries every second), refuse retained updates, and never acknowledge what it did not
//! store.
//!
//! fsync = "never" / "interval": acknowledgements wait only for the write to the OS, so a
//! SIGKILL of tether alone must still lose nothing acknowledged.
mod bin_support;
mod common;
mod crash_support;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tether::wire::packet::{Ack, Packet, ProtocolVersion, QoS, ReasonCode};

use bin_support::{rt, set_fsize_limit, Broker, Dir, TempFile, WAIT};
use common::{v5_connect_expiry, v5_publish, v5_session, Raw, Recv};
use crash_support::{publish_until_killed, Pipeline};

/// QoS 1 for even message numbers, QoS 2 for odd ones.
fn alternating(i: u32) -> QoS {
    if i % 2 == 0 {
        QoS::AtLeastOnce
    } else {
        QoS::ExactlyOnce
    }
}

/// A v5 client with Session Expiry `expiry`; asserts the CONNACK and Session Present.
async fn v5(b: &Broker, id: &str, clean: bool, expiry: u32, present: bool) -> Raw {
    v5_session(b.addr(), id, clean, expiry, present).await
}

/// Starts tether with SIGXFSZ ignored (an ignored signal stays ignored across exec), so a
/// write past RLIMIT_FSIZE fails with EFBIG instead of killing the process. `sh` execs
/// tether: the child's pid is tether's, which `prlimit --pid` needs.
const IGNORE_XFSZ: [&str; 3] = ["sh", "-c", "trap '' XFSZ; exec \"$0\" \"$@\""];

/// Segments far larger than anything these tests write: one active file, never rolled.
const BIG_SEGMENTS: &str = "[persistence]\nsegment_bytes = 1073741824\n";

/// Silence that ends a subscriber's drain.
const QUIET: Duration = Duration::from_millis(700);

/// The store's error line, which must appear once per outage.
const WRITE_FAILED: &str = "store write failed";
/// The store's recovery line.
const WRITABLE_AGAIN: &str = "store writable again";

/// Length of the active (highest-numbered) log segment in `dir`.
fn active_segment_len(dir: &Path) -> u64 {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read data dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    let last = logs.pop().expect("a log segment");
    std::fs::metadata(&last).expect("segment metadata").len()
}

/// Wait until the active segment has not grown for 150 ms (records that are not waited for,
/// such as delivery acknowledgements, are written shortly after the fact); return its length.
async fn settled_segment_len(dir: &Path) -> u64 {
    let deadline = Instant::now() + WAIT;
    let mut last = active_segment_len(dir);
    let mut stable = 0;
    while stable < 3 {
        assert!(
            Instant::now() < deadline,
            "the store kept writing for {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = active_segment_len(dir);
        if now == last {
            stable += 1;
        } else {
            (last, stable) = (now, 0);
        }
    }
    last
}

/// How many lines of the broker's log contain `what`.
fn log_count(b: &Broker, what: &str) -> usize {
    b.log().lines().filter(|l| l.contains(what)).count()
}

/// A 3.1.1 client; asserts CONNACK accepted with `present`.
async fn v311(b: &Broker, id: &str, clean: bool, present: bool) -> Raw {
    let mut c = Raw::connect(b.addr()).await;
    c.send(&common::connect_v311(id, clean, 60)).await;
    match c.recv_packet().await {
        Packet::ConnAck(a) => {
            assert_eq!(a.reason, ReasonCode::SUCCESS, "{id}: {a:?}");
            assert_eq!(a.session_present, present, "{id}: {a:?}");
        }
        other => panic!("{id}: expected CONNACK, got {other:?}"),
    }
    c
}

/// A durable v5 session subscribed to `filter` at `qos`, left offline.
async fn offline_v5_subscriber(b: &Broker, id: &str, filter: &str, qos: QoS) {
    let mut s = v5(b, id, true, 3600, false).await;
    s.sub_v5(1, filter, qos).await;
    s.disconnect_v5(ReasonCode::SUCCESS, None).await;
    s.expect_closed().await;
}

/// Publish from a v5 client and return the reason code of its acknowledgement: the PUBACK
/// (QoS 1) or the PUBREC (QoS 2; a successful one is completed with PUBREL / PUBCOMP);
/// SUCCESS for QoS 0, which has none. Fails the test if no acknowledgement comes.
async fn pub_v5(c: &mut Raw, topic: &str, qos: QoS, id: u16, payload: &str, retain: bool) -> u8 {
    let mut p = v5_publish(topic, qos, id, payload.as_bytes());
    p.retain = retain;
    c.send_packet(&Packet::Publish(p)).await;
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => match c.recv_packet().await {
            Packet::PubAck(a) if a.packet_id == id => a.reason.0,
            other => panic!("{payload}: expected PUBACK {id}, got {other:?}"),
        },
        QoS::ExactlyOnce => match c.recv_packet().await {
            Packet::PubRec(a) if a.packet_id == id => {
                if a.reason.0 < 0x80 {
                    c.send_packet(&Packet::PubRel(Ack::new(id))).await;
                    match c.recv_packet().await {
                        Packet::PubComp(a) if a.packet_id == id => {}
                        other => panic!("{payload}: expected PUBCOMP {id}, got {other:?}"),
                    }
                }
                a.reason.0
            }
            other => panic!("{payload}: expected PUBREC {id}, got {other:?}"),
        },
    }
}

/// Payload index of the message that provokes the first failed write.
const TRIGGER: u32 = 9999;

/// Make the store's next write fail and provoke it. Every later write fails too until the
/// limit is lifted. The provoking message (`TRIGGER`) goes to the durable session
/// `trigger-sink` (which must exist) from a connection of its own: its acknowledgement waits
/// for the write that fails, so it must never come; the v5 publisher is told DISCONNECT 0x80
/// instead (README).
async fn fill_the_disk(b: &Broker, dir: &Dir) {
    let len = settled_segment_len(&dir.0).await;
    set_fsize_limit(b.pid(), Some(len));
    let mut t = v5(b, "trigger-pub", true, 0, false).await;
    t.send_packet(&Packet::Publish(v5_publish(
        "trigger",
        QoS::AtLeastOnce,
        1,
        TRIGGER.to_string().as_bytes(),
    )))
    .await;
    match t.recv_within(WAIT).await {
        Recv::Packet(Packet::Disconnect(d)) => {
            assert_eq!(
                d.reason,
                ReasonCode::UNSPECIFIED_ERROR,
                "DISCONNECT {d:?}\n{}",
                b.log()
            );
            t.expect_closed().await;
        }
        other => panic!(
            "a PUBLISH whose record could not be written: expected DISCONNECT 0x80 and no \
             PUBACK, got {other:?}\n{}",
            b.log()
        ),
    }
    b.wait_log(&[WRITE_FAILED], WAIT);
}

/// Space returns: lift the limit; tether's next retry (within a second) must succeed.
fn free_the_disk(b: &Broker) {
    set_fsize_limit(b.pid(), None);
}

/// Read what `c` is sent, acknowledging like a real client (QoS 2: delivered on the first
/// PUBLISH of a packet id, not again until its PUBREL), until `done` holds for what arrived
/// or nothing arrives for `QUIET`. Returns payload index -> times delivered, and the QoS of
/// every delivery by index.
async fn take(
    c: &mut Raw,
    got: &mut HashMap<u32, u32>,
    qos_seen: &mut HashMap<u32, QoS>,
    done: impl Fn(&HashMap<u32, u32>) -> bool,
) {
    let mut pending_rel: HashSet<u16> = HashSet::new();
    while !done(got) {
        let Some(p) = c.recv_packet_within(QUIET).await else {
            return;
        };
        match p {
            Packet::Publish(p) => {
                let i: u32 = std::str::from_utf8(&p.payload)
                    .expect("utf-8")
                    .parse()
                    .expect("index payload");
                qos_seen.insert(i, p.qos);
                match p.qos {
                    QoS::AtMostOnce => *got.entry(i).or_default() += 1,
                    QoS::AtLeastOnce => {
                        *got.entry(i).or_default() += 1;
                        c.send_packet(&Packet::PubAck(Ack::new(p.packet_id))).await;
                    }
                    QoS::ExactlyOnce => {
                        if pending_rel.insert(p.packet_id) {
                            *got.entry(i).or_default() += 1;
                        }
                        c.send_packet(&Packet::PubRec(Ack::new(p.packet_id))).await;
                    }
                }
            }
            Packet::PubRel(a) => {
                pending_rel.remove(&a.packet_id);
                c.send_packet(&Packet::PubComp(Ack::new(a.packet_id))).await;
            }
            other => panic!("subscriber got {other:?}"),
        }
    }
}

/// Everything a resumed session is sent until `QUIET`.
async fn drain(c: &mut Raw) -> HashMap<u32, u32> {
    let mut got = HashMap::new();
    take(c, &mut got, &mut HashMap::new(), |_| false).await;
    got
}

fn sorted(s: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut v: Vec<u32> = s.into_iter().collect();
    v.sort();
    v
}

/// Every message acknowledged with success reaches `got`, QoS 2 ones exactly once; none that
/// was refused does.
fn check_delivered(
    who: &str,
    got: &HashMap<u32, u32>,
    acked: &HashMap<u32, QoS>,
    refused: &[u32],
    log: &str,
) {
    let missing = sorted(acked.keys().filter(|i| !got.contains_key(i)).copied());
    assert!(
        missing.is_empty(),
        "{who}: acknowledged messages lost: {missing:?} (got {:?})\n{log}",
        sorted(got.keys().copied())
    );
    for (i, q) in acked {
        if *q == QoS::ExactlyOnce {
            assert_eq!(
                got[i], 1,
                "{who}: QoS 2 message {i} delivered {} times",
                got[i]
            );
        }
    }
    let leaked = sorted(refused.iter().filter(|i| got.contains_key(i)).copied());
    assert!(
        leaked.is_empty(),
        "{who}: messages refused with 0x97 (never stored) were delivered: {leaked:?}\n{log}"
    );
}

/// Disk full with MQTT 5.0 clients. Before: QoS 1/2 acknowledged with success. During: QoS 1
/// gets PUBACK 0x97 and QoS 2 PUBREC 0x97 (Quota exceeded, sections 3.4.2.1 / 3.5.2.1; a
/// reason code of 0x80 or above means the message was not accepted), nothing refused is
/// routed, QoS 0 still reaches an online subscriber, the error is logged once however many
/// publishes fail and however many retries run. After the limit is lifted: success again
/// within a few seconds, logged once. After SIGKILL and restart: the offline persistent
/// subscriber gets every message acknowledged with success (QoS 2 once) and none refused.
#[test]
fn disk_full_v5_refuses_with_quota_exceeded_and_recovers() {
    let dir = Dir::new("full-v5");
    let cfg = TempFile::new("full-v5", BIG_SEGMENTS);
    let rt = rt();
    let mut b = Broker::start_wrapped(&IGNORE_XFSZ, &["-d", dir.arg(), "-c", cfg.arg()]);
    let mut acked: HashMap<u32, QoS> = HashMap::new();
    let mut refused: Vec<u32> = Vec::new();
    rt.block_on(async {
        offline_v5_subscriber(&b, "trigger-sink", "trigger", QoS::AtLeastOnce).await;
        offline_v5_subscriber(&b, "fv5-off", "f/#", QoS::ExactlyOnce).await;
        let mut on = v5(&b, "fv5-on", true, 3600, false).await;
        on.sub_v5(1, "f/#", QoS::AtLeastOnce).await;
        let (mut on_got, mut on_qos) = (HashMap::new(), HashMap::new());
        // A persistent session connected before the fault, to subscribe during it.
        let mut late = v5(&b, "fv5-late", true, 3600, false).await;
        let mut p = v5(&b, "fv5-pub", true, 0, false).await;
        let mut id = 0u16;
        let mut next_id = || {
            id += 1;
            id
        };

        // Before the fault.
        for i in 0..10u32 {
            let qos = alternating(i);
            let r = pub_v5(&mut p, "f/a", qos, next_id(), &i.to_string(), false).await;
            assert_eq!(r, 0, "message {i} before the fault\n{}", b.log());
            acked.insert(i, qos);
        }
        take(&mut on, &mut on_got, &mut on_qos, |g| g.len() >= 10).await;

        fill_the_disk(&b, &dir).await;
        let failed_at = Instant::now();

        // During the fault: refused, the publisher keeps its connection.
        for (ids, qos) in [
            (100..106u32, QoS::AtLeastOnce),
            (200..204, QoS::ExactlyOnce),
        ] {
            for i in ids {
                let r = pub_v5(&mut p, "f/a", qos, next_id(), &i.to_string(), false).await;
                assert_eq!(
                    r,
                    0x97,
                    "{qos:?} message {i} while the disk is full\n{}",
                    b.log()
                );
                refused.push(i);
            }
        }
        // QoS 0 still flows to the online subscriber.
        pub_v5(&mut p, "f/a", QoS::AtMostOnce, 0, "300", false).await;
        take(&mut on, &mut on_got, &mut on_qos, |g| g.contains_key(&300)).await;
        assert!(
            on_got.contains_key(&300),
            "QoS 0 message not delivered while the disk is full\n{}",
            b.log()
        );
        assert_eq!(on_qos[&300], QoS::AtMostOnce);

        // SUBSCRIBE of a persistent session: its SUBACK waits for the session record, which
        // cannot be written: no SUBACK, the connection is closed with DISCONNECT 0x80.
        late.send_packet(&Packet::Subscribe(tether::wire::packet::Subscribe {
            packet_id: 1,
            filters: vec![common::v5_filter("f/late", QoS::AtLeastOnce)],
            subscription_identifier: None,
            user_properties: vec![],
        }))
        .await;
        match late.recv_within(WAIT).await {
            Recv::Packet(Packet::Disconnect(d)) if d.reason == ReasonCode::UNSPECIFIED_ERROR => {
                late.expect_closed().await
            }
            other => panic!(
                "SUBSCRIBE of a persistent session while the disk is full: expected \
                 DISCONNECT 0x80 and no SUBACK, got {other:?}\n{}",
                b.log()
            ),
        }

        // The offline persistent session reconnecting now: its session record cannot be
        // written, so it is refused with CONNACK 0x88 Server unavailable, and no other
        // packet comes before a CONNACK [MQTT-3.2.0-1]. (Its stored messages stay queued:
        // checked after the restart.)
        let mut c = Raw::connect(b.addr()).await;
        c.version = ProtocolVersion::V5;
        c.send_packet(&Packet::Connect(Box::new(v5_connect_expiry(
            "fv5-off",
            false,
            Some(3600),
        ))))
        .await;
        match c.recv_within(WAIT).await {
            Recv::Packet(Packet::ConnAck(a)) if a.reason == ReasonCode::SERVER_UNAVAILABLE => {}
            other => panic!(
                "persistent session reconnecting while the disk is full: {other:?}\n{}",
                b.log()
            ),
        }

        // At least one retry fails too (they run every second); still one error line.
        while failed_at.elapsed() < Duration::from_millis(1300) {
            let r = pub_v5(&mut p, "f/a", QoS::AtLeastOnce, next_id(), "301", false).await;
            assert_eq!(r, 0x97, "QoS 1 message 301 while the disk is full");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        refused.push(301);
        assert_eq!(log_count(&b, WRITE_FAILED), 1, "{}", b.log());
        assert_eq!(log_count(&b, WRITABLE_AGAIN), 0, "{}", b.log());

        // Space returns: accepted again within a few seconds, without a restart.
        free_the_disk(&b);
        let freed_at = Instant::now();
        let mut i = 400u32;
        loop {
            let r = pub_v5(
                &mut p,
                "f/a",
                QoS::AtLeastOnce,
                next_id(),
                &i.to_string(),
                false,
            )
            .await;
            if r == 0 {
                acked.insert(i, QoS::AtLeastOnce);
                break;
            }
            assert_eq!(r, 0x97, "message {i} while recovering");
            refused.push(i);
            assert!(
                freed_at.elapsed() < Duration::from_secs(5),
                "not accepting QoS 1 again 5 s after space returned\n{}",
                b.log()
            );
            i += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b.wait_log(&[WRITABLE_AGAIN], WAIT);
        for i in 500..504u32 {
            let qos = alternating(i);
            let r = pub_v5(&mut p, "f/a", qos, next_id(), &i.to_string(), false).await;
            assert_eq!(r, 0, "message {i} after recovery\n{}", b.log());
            acked.insert(i, qos);
        }
        take(&mut on, &mut on_got, &mut on_qos, |g| g.contains_key(&503)).await;
        check_delivered("online subscriber", &on_got, &acked, &refused, &b.log());
        assert_eq!(log_count(&b, WRITE_FAILED), 1, "{}", b.log());
        assert_eq!(log_count(&b, WRITABLE_AGAIN), 1, "{}", b.log());
    });

    b.proc.kill();
    let b2 = Broker::start_with(&["-d", dir.arg(), "-c", cfg.arg()]);
    b2.wait_log(&["sessions restored"], WAIT);
    // The failed writes were cut back to whole records: nothing torn to drop at replay.
    assert!(!b2.log().contains("dropped"), "{}", b2.log());
    rt.block_on(async {
        let mut off = v5(&b2, "fv5-off", false, 3600, true).await;
        let got = drain(&mut off).await;
        check_delivered(
            "offline subscriber after restart",
            &got,
            &acked,
            &refused,
            &b2.log(),
        );
        // The batch that failed was kept and written by the retry that succeeded, not
        // dropped: the message that met the failure (never acknowledged) is queued, once.
        let mut t = v5(&b2, "trigger-sink", false, 3600, true).await;
        let got = drain(&mut t).await;
        assert_eq!(got, HashMap::from([(TRIGGER, 1)]), "{}", b2.log());
    });
}

/// Disk full with MQTT 3.1.1 clients, which have no negative acknowledgement: a QoS 1
/// PUBLISH gets no PUBACK and its connection is closed (a PUBACK says the receiver has
/// accepted ownership of the message [MQTT-4.3.2-2], which tether cannot while it cannot
/// store it). After space returns, a new 3.1.1 connection publishes with PUBACK; the
/// persistent subscriber gets everything acknowledged and nothing refused.
#[test]
fn disk_full_v311_closes_the_publisher_and_recovers() {
    let dir = Dir::new("full-311");
    let cfg = TempFile::new("full-311", BIG_SEGMENTS);
    let rt = rt();
    let b = Broker::start_wrapped(&IGNORE_XFSZ, &["-d", dir.arg(), "-c", cfg.arg()]);
    rt.block_on(async {
        offline_v5_subscriber(&b, "trigger-sink", "trigger", QoS::AtLeastOnce).await;
        let mut s = v311(&b, "f311-sub", false, false).await;
        s.send(&common::subscribe(1, "g/#", 1)).await;
        s.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x01]).await;
        s.send(&[0xE0, 0x00]).await;
        s.expect_closed().await;

        let mut acked: HashMap<u32, QoS> = HashMap::new();
        let mut refused: Vec<u32> = Vec::new();
        let mut p = v311(&b, "f311-pub", true, false).await;
        for i in 0..5u32 {
            let id = i as u16 + 1;
            p.send(&common::publish(
                "g/a",
                1,
                id,
                false,
                false,
                i.to_string().as_bytes(),
            ))
            .await;
            p.expect_bytes(&common::ack(0x40, id)).await;
            acked.insert(i, QoS::AtLeastOnce);
        }

        fill_the_disk(&b, &dir).await;
        p.send(&common::publish("g/a", 1, 100, false, false, b"100"))
            .await;
        refused.push(100);
        match p.recv_within(WAIT).await {
            Recv::Closed { leftover: 0, .. } => {}
            other => panic!(
                "3.1.1 QoS 1 PUBLISH while the disk is full: expected the connection closed \
                 with no PUBACK, got {other:?}\n{}",
                b.log()
            ),
        }

        // A persistent session cannot be written now either: refused at once with return
        // code 3, Server unavailable (3.1.1 section 3.2.2.3), not closed without a word.
        let mut c = Raw::connect(b.addr()).await;
        c.send(&common::connect_v311("f311-sub", false, 60)).await;
        c.expect_bytes(&[0x20, 0x02, 0x00, 0x03]).await;

        free_the_disk(&b);
        let freed_at = Instant::now();
        let mut i = 200u32;
        loop {
            let mut c = v311(&b, "f311-pub2", true, false).await;
            c.send(&common::publish(
                "g/a",
                1,
                7,
                false,
                false,
                i.to_string().as_bytes(),
            ))
            .await;
            match c.recv_within(WAIT).await {
                Recv::Packet(Packet::PubAck(a)) if a.packet_id == 7 => {
                    acked.insert(i, QoS::AtLeastOnce);
                    break;
                }
                Recv::Closed { leftover: 0, .. } => refused.push(i),
                other => panic!("3.1.1 QoS 1 PUBLISH while recovering: {other:?}"),
            }
            assert!(
                freed_at.elapsed() < Duration::from_secs(5),
                "not accepting QoS 1 again 5 s after space returned\n{}",
                b.log()
            );
            i += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b.wait_log(&[WRITABLE_AGAIN], WAIT);

        let mut s = v311(&b, "f311-sub", false, true).await;
        let got = drain(&mut s).await;
        check_delivered("3.1.1 subscriber", &got, &acked, &refused, &b.log());
        assert_eq!(log_count(&b, WRITE_FAILED), 1, "{}", b.log());
    });
}

/// A retained update while the disk is full is refused: v5 QoS 1 / QoS 2 with PUBACK /
/// PUBREC 0x97; a QoS 0 one is delivered to current subscribers but not retained. A new
/// subscriber still gets the old retained value, before and after recovery, and after SIGKILL
/// and restart; a retained update after recovery is kept.
#[test]
fn retained_update_refused_while_the_disk_is_full() {
    let dir = Dir::new("full-retain");
    let cfg = TempFile::new("full-retain", BIG_SEGMENTS);
    let rt = rt();
    let mut b = Broker::start_wrapped(&IGNORE_XFSZ, &["-d", dir.arg(), "-c", cfg.arg()]);

    /// A new non-persistent subscriber to `filter`: the retained messages it is sent,
    /// topic -> payload.
    async fn retained(b: &Broker, filter: &str) -> HashMap<String, String> {
        let mut c = v5(b, "r-probe", true, 0, false).await;
        c.sub_v5(1, filter, QoS::AtLeastOnce).await;
        let mut out = HashMap::new();
        while let Some(p) = c.recv_packet_within(Duration::from_millis(300)).await {
            match p {
                Packet::Publish(m) => {
                    assert!(m.retain, "{m:?}");
                    if m.qos != QoS::AtMostOnce {
                        c.send_packet(&Packet::PubAck(Ack::new(m.packet_id))).await;
                    }
                    out.insert(
                        m.topic.clone(),
                        String::from_utf8_lossy(&m.payload).into_owned(),
                    );
                }
                other => panic!("probe got {other:?}"),
            }
        }
        c.disconnect_v5(ReasonCode::SUCCESS, None).await;
        out
    }
    let old = HashMap::from([("r/t".to_string(), "old".to_string())]);

    rt.block_on(async {
        offline_v5_subscriber(&b, "trigger-sink", "trigger", QoS::AtLeastOnce).await;
        let mut live = v5(&b, "r-live", true, 0, false).await;
        live.sub_v5(1, "r/t", QoS::AtLeastOnce).await;
        let mut p = v5(&b, "r-pub", true, 0, false).await;
        assert_eq!(
            pub_v5(&mut p, "r/t", QoS::AtLeastOnce, 1, "old", true).await,
            0
        );
        assert_eq!(&live.recv_publish().await.payload[..], b"old");
        assert_eq!(retained(&b, "r/#").await, old);

        fill_the_disk(&b, &dir).await;
        let r = pub_v5(&mut p, "r/t", QoS::AtLeastOnce, 2, "new1", true).await;
        assert_eq!(r, 0x97, "retained QoS 1 update while the disk is full");
        let r = pub_v5(&mut p, "r/t", QoS::ExactlyOnce, 3, "new2", true).await;
        assert_eq!(r, 0x97, "retained QoS 2 update while the disk is full");
        pub_v5(&mut p, "r/t", QoS::AtMostOnce, 0, "new0", true).await;
        let m = live.recv_publish().await;
        assert_eq!(
            &m.payload[..],
            b"new0",
            "QoS 0 retained message still delivered"
        );
        assert_eq!(
            retained(&b, "r/#").await,
            old,
            "retained value while the disk is full"
        );

        free_the_disk(&b);
        b.wait_log(&[WRITABLE_AGAIN], WAIT);
        assert_eq!(
            retained(&b, "r/#").await,
            old,
            "retained value after recovery"
        );
        // A success: 0x10 No matching subscribers, or 0x00 while the last `retained` probe's
        // subscription to r/# is still being removed (it ends with its connection).
        let r = pub_v5(&mut p, "r/u", QoS::AtLeastOnce, 4, "after", true).await;
        assert!(
            r == 0 || r == 0x10,
            "retained update after recovery: {r:#x}"
        );
    });

    b.proc.kill();
    let b2 = Broker::start_with(&["-d", dir.arg(), "-c", cfg.arg()]);
    b2.wait_log(&["sessions restored"], WAIT);
    rt.block_on(async {
        let mut want = old.clone();
        want.insert("r/u".into(), "after".into());
        assert_eq!(
            retained(&b2, "r/#").await,
            want,
            "retained values after restart\n{}",
            b2.log()
        );
    });
}

// ---------------------------------------------------------------------------------------------
// fsync = "never" / "interval": a SIGKILL of tether alone loses nothing acknowledged.

/// Messages the publisher sends; the broker is killed once `KILL_AT` are acknowledged, while
/// the rest are still being sent.
const MESSAGES: u32 = 600;
const KILL_AT: usize = 300;
/// Publisher's window of unacknowledged messages.
const WINDOW: usize = 64;

/// Persistent 3.1.1 and v5 subscribers (QoS 2, offline), a pipelined publisher, SIGKILL
/// after `KILL_AT` acknowledgements under `fsync = policy`, restart: every acknowledged
/// message reaches both, QoS 2 exactly once.
fn acknowledged_survive_sigkill(policy: &str, extra: &str, logged: &str) {
    let dir = Dir::new(policy);
    let cfg = TempFile::new(
        policy,
        &format!(
            "[session]\nmax_inbound_inflight = 1000\n\
             [persistence]\nfsync = \"{policy}\"\n{extra}"
        ),
    );
    let rt = rt();
    let mut b = Broker::start_with(&["-d", dir.arg(), "-c", cfg.arg()]);
    b.wait_log(&["data directory ready", logged], WAIT);
    let (acked, killed) = rt.block_on(async {
        let mut s = v311(&b, "fs-311", false, false).await;
        s.send(&common::subscribe(1, "s/#", 2)).await;
        s.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x02]).await;
        s.send(&[0xE0, 0x00]).await;
        s.expect_closed().await;
        offline_v5_subscriber(&b, "fs-v5", "s/#", QoS::ExactlyOnce).await;
        let pipeline = Pipeline {
            client_id: "fs-pub",
            topic: "s",
            topics: 5,
            messages: MESSAGES,
            window: WINDOW,
            kill_at: KILL_AT,
        };
        publish_until_killed(b.port, b.pid(), &pipeline, || true).await
    });
    assert!(
        killed,
        "the broker closed the publisher before the kill point (acked {})\n{}",
        acked.len(),
        b.log()
    );
    let st = b.proc.kill();
    assert!(!st.success(), "killed, not exited: {st:?}");
    let qos2 = acked.values().filter(|q| **q == QoS::ExactlyOnce).count();
    eprintln!(
        "fsync = {policy}: {} of {MESSAGES} acknowledged ({qos2} QoS 2) at the kill",
        acked.len()
    );
    assert!(
        !b.log().contains("store flushed"),
        "the broker flushed: it was not killed\n{}",
        b.log()
    );

    let b2 = Broker::start_with(&["-d", dir.arg(), "-c", cfg.arg()]);
    b2.wait_log(&["sessions restored"], WAIT);
    rt.block_on(async {
        let mut s = v311(&b2, "fs-311", false, true).await;
        let got = drain(&mut s).await;
        check_delivered("3.1.1 subscriber", &got, &acked, &[], &b2.log());
        let mut v = v5(&b2, "fs-v5", false, 3600, true).await;
        let got = drain(&mut v).await;
        check_delivered("v5 subscriber", &got, &acked, &[], &b2.log());
    });
}

/// fsync = "never": acknowledged once written to the OS, never fsynced.
#[test]
fn fsync_never_loses_nothing_acknowledged_on_sigkill() {
    acknowledged_survive_sigkill("never", "", "fsync=Never");
}

/// fsync = "interval" (every 50 ms): acknowledged once written to the OS.
#[test]
fn fsync_interval_loses_nothing_acknowledged_on_sigkill() {
    acknowledged_survive_sigkill("interval", "fsync_interval_ms = 50\n", "fsync=Interval");
}
