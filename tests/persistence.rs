//! Persistence on the built binary: what survives a SIGKILL and restart on the same data
//! directory (in-flight state both ways, expiry and will delay counting the downtime, retained
//! messages), a torn or corrupt tail, a store of another format, and persistence switched off.
mod bin_support;
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tether::wire::packet::{Ack, Packet, ProtocolVersion, QoS, ReasonCode};

use bin_support::{rt, Broker, Dir};
use common::{v5_connect_expiry, v5_publish, v5_session, Raw};

/// A v5 client with Session Expiry `expiry`; asserts the CONNACK and Session Present.
async fn v5(b: &Broker, id: &str, clean: bool, expiry: u32, present: bool) -> Raw {
    v5_session(b.addr(), id, clean, expiry, present).await
}

fn addr(b: &Broker) -> SocketAddr {
    b.addr()
}

fn kill_and_restart(b: &mut Broker, dir: &Dir) -> Broker {
    b.proc.kill();
    let n = Broker::start_with(&["-d", dir.arg()]);
    n.wait_log(&["sessions restored"], bin_support::WAIT);
    n
}

/// Outbound: a v5 subscriber holds a QoS 1 PUBLISH unacknowledged, a QoS 2 one PUBREC'd
/// (PUBREL received, no PUBCOMP) and a QoS 2 one not PUBREC'd. Inbound: a publisher's QoS 2
/// PUBLISH PUBREC'd without PUBREL. After SIGKILL and restart: the subscriber gets the
/// PUBLISHes again with DUP and their ids, and PUBREL for the released one; the publisher's
/// re-sent QoS 2 is not routed again, and its PUBREL completes.
#[test]
fn inflight_state_both_ways_survives_sigkill() {
    let dir = Dir::new("inflight");
    let rt = rt();
    let mut b = Broker::start_with(&["-d", dir.arg()]);
    let (pid1, pid2a, pid2b) = rt.block_on(async {
        let mut sub = v5(&b, "in-sub", true, 600, false).await;
        sub.sub_v5(1, "in/#", QoS::ExactlyOnce).await;
        let mut p = v5(&b, "in-pub", true, 600, false).await;
        p.pub1_v5(v5_publish("in/1", QoS::AtLeastOnce, 1, b"one"))
            .await;
        for (id, payload) in [(2u16, &b"two"[..]), (3, b"three")] {
            p.send_packet(&Packet::Publish(v5_publish(
                "in/2",
                QoS::ExactlyOnce,
                id,
                payload,
            )))
            .await;
            assert!(matches!(p.recv_packet().await, Packet::PubRec(a) if a.packet_id == id));
            p.send_packet(&Packet::PubRel(Ack::new(id))).await;
            assert!(matches!(p.recv_packet().await, Packet::PubComp(a) if a.packet_id == id));
        }
        // Inbound QoS 2 left awaiting PUBREL.
        p.send_packet(&Packet::Publish(v5_publish(
            "in/3",
            QoS::ExactlyOnce,
            9,
            b"inbound",
        )))
        .await;
        assert!(matches!(p.recv_packet().await, Packet::PubRec(a) if a.packet_id == 9));

        let one = sub.recv_publish().await;
        let two = sub.recv_publish().await;
        let three = sub.recv_publish().await;
        let four = sub.recv_publish().await;
        assert_eq!(&one.payload[..], b"one");
        assert_eq!(&four.payload[..], b"inbound");
        sub.send_packet(&Packet::PubRec(Ack::new(two.packet_id)))
            .await;
        assert!(
            matches!(sub.recv_packet().await, Packet::PubRel(a) if a.packet_id == two.packet_id)
        );
        // Let the writer catch up with the QoS 1 in-flight record, which is not waited for.
        tokio::time::sleep(Duration::from_millis(300)).await;
        (one.packet_id, two.packet_id, three.packet_id)
    });
    let b2 = kill_and_restart(&mut b, &dir);
    rt.block_on(async {
        let mut sub = v5(&b2, "in-sub", false, 600, true).await;
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(sub.recv_packet().await);
        }
        match &seen[0] {
            Packet::Publish(p) => {
                assert!(
                    p.dup && p.packet_id == pid1 && &p.payload[..] == b"one",
                    "{p:?}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&seen[1], Packet::PubRel(a) if a.packet_id == pid2a),
            "{:?}",
            seen[1]
        );
        match &seen[2] {
            Packet::Publish(p) => {
                assert!(
                    p.dup && p.packet_id == pid2b && &p.payload[..] == b"three",
                    "{p:?}"
                )
            }
            other => panic!("{other:?}"),
        }
        // The inbound message was routed once, before the crash.
        assert!(matches!(&seen[3], Packet::Publish(p) if &p.payload[..] == b"inbound" && p.dup));

        let mut p = v5(&b2, "in-pub", false, 600, true).await;
        let mut again = v5_publish("in/3", QoS::ExactlyOnce, 9, b"inbound");
        again.dup = true;
        p.send_packet(&Packet::Publish(again)).await;
        assert!(matches!(p.recv_packet().await, Packet::PubRec(a) if a.packet_id == 9));
        p.send_packet(&Packet::PubRel(Ack::new(9))).await;
        match p.recv_packet().await {
            Packet::PubComp(a) => assert_eq!((a.packet_id, a.reason), (9, ReasonCode::SUCCESS)),
            other => panic!("{other:?}"),
        }
        // Not routed a second time.
        let extra = sub.recv_packet_within(Duration::from_millis(500)).await;
        assert!(extra.is_none(), "{extra:?}");
    });
}

/// Session expiry counts the time the broker was down: a 2 s session is gone after 3 s of
/// downtime, a 600 s one is still there.
#[test]
fn session_expiry_counts_downtime() {
    let dir = Dir::new("expiry");
    let rt = rt();
    let mut b = Broker::start_with(&["-d", dir.arg()]);
    rt.block_on(async {
        for (id, e) in [("short", 2u32), ("long", 600)] {
            let mut c = v5(&b, id, true, e, false).await;
            c.sub_v5(1, "x", QoS::AtLeastOnce).await;
            c.disconnect_v5(ReasonCode::SUCCESS, None).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    b.proc.kill();
    std::thread::sleep(Duration::from_secs(3));
    let b2 = Broker::start_with(&["-d", dir.arg()]);
    b2.wait_log(
        &["sessions restored", "sessions=1", "expired=1"],
        bin_support::WAIT,
    );
    rt.block_on(async {
        v5(&b2, "short", false, 2, false).await;
        v5(&b2, "long", false, 600, true).await;
    });
}

/// A persistent "watcher" subscribes to `wills/#` and leaves; then a client "dying" with a
/// persistent session and a will (delay `will_delay` seconds) is still connected when the
/// broker is SIGKILLed.
fn crash_with_will_connected(rt: &tokio::runtime::Runtime, b: &mut Broker, will_delay: u32) {
    rt.block_on(async {
        let mut w = v5(b, "watcher", true, 600, false).await;
        w.sub_v5(1, "wills/#", QoS::AtLeastOnce).await;
        w.disconnect_v5(ReasonCode::SUCCESS, None).await;
        let mut c = Raw::connect(addr(b)).await;
        c.version = ProtocolVersion::V5;
        let mut connect = v5_connect_expiry("dying", true, Some(600));
        connect.will = Some(common::v5_will("wills/dying", b"gone", will_delay));
        c.send_packet(&Packet::Connect(Box::new(connect))).await;
        c.recv_connack().await;
        // `c` stays connected until the broker dies.
        b.proc.kill();
        drop(c);
    });
}

/// A client connected when the broker dies counts as disconnected then: its will (delay 2 s)
/// goes out 2 s after the crash, not at restart, and reaches a persistent subscriber.
#[test]
fn will_delay_runs_across_a_restart() {
    let dir = Dir::new("will");
    let rt = rt();
    let mut b = Broker::start_with(&["-d", dir.arg()]);
    crash_with_will_connected(&rt, &mut b, 2);
    let killed = Instant::now();
    let b2 = Broker::start_with(&["-d", dir.arg()]);
    b2.wait_log(&["sessions restored"], bin_support::WAIT);
    rt.block_on(async {
        let mut w = v5(&b2, "watcher", false, 600, true).await;
        let p = w.recv_packet_within(Duration::from_secs(5)).await;
        let Some(Packet::Publish(p)) = p else {
            panic!("no will: {p:?}\n{}", b2.log())
        };
        assert_eq!(&p.payload[..], b"gone");
        assert!(
            killed.elapsed() >= Duration::from_millis(1500),
            "will published {:?} after the crash",
            killed.elapsed()
        );
    });
}

/// A will that recovery published is written off: after a second crash and restart it is not
/// published again (and the session's expiry clock is not restarted by a stale record).
#[test]
fn will_published_by_recovery_is_not_published_again() {
    let dir = Dir::new("will-once");
    let rt = rt();
    let mut b = Broker::start_with(&["-d", dir.arg()]);
    crash_with_will_connected(&rt, &mut b, 0);
    let mut b2 = Broker::start_with(&["-d", dir.arg()]);
    b2.wait_log(&["sessions restored"], bin_support::WAIT);
    rt.block_on(async {
        let mut w = v5(&b2, "watcher", false, 600, true).await;
        let p = w.recv_publish().await;
        assert_eq!(&p.payload[..], b"gone");
        w.send_packet(&Packet::PubAck(Ack::new(p.packet_id))).await;
        // A SUBACK waits for the session record, and the log is written in order: once it
        // arrives, the acknowledgement handled before it is on disk too (acknowledgements
        // are otherwise written lazily).
        w.sub_v5(2, "other/#", QoS::AtLeastOnce).await;
        w.disconnect_v5(ReasonCode::SUCCESS, None).await;
    });
    let b3 = kill_and_restart(&mut b2, &dir);
    rt.block_on(async {
        assert!(b3.log().contains("wills=0"), "{}", b3.log());
        let mut w = v5(&b3, "watcher", false, 600, true).await;
        // Nothing may come: the delivery was acknowledged and that is on disk, and a new
        // publication of the will would be a new PUBLISH.
        if let Some(p) = w.recv_packet_within(Duration::from_millis(1500)).await {
            panic!("will published again: {p:?}\n{}", b3.log());
        }
    });
}

/// Retained messages (and a retained delete) survive a SIGKILL.
#[test]
fn retained_messages_survive_sigkill() {
    let dir = Dir::new("retain");
    let rt = rt();
    let mut b = Broker::start_with(&["-d", dir.arg()]);
    rt.block_on(async {
        let mut p = v5(&b, "r-pub", true, 0, false).await;
        for (topic, payload, id) in [("r/a", &b"A"[..], 1u16), ("r/b", b"B", 2), ("r/b", b"", 3)] {
            let mut m = v5_publish(topic, QoS::AtLeastOnce, id, payload);
            m.retain = true;
            p.pub1_v5(m).await;
        }
    });
    let b2 = kill_and_restart(&mut b, &dir);
    rt.block_on(async {
        let mut s = v5(&b2, "r-sub", true, 0, false).await;
        s.sub_v5(1, "r/#", QoS::AtLeastOnce).await;
        let m = s.recv_publish().await;
        assert!(
            m.retain && m.topic == "r/a" && &m.payload[..] == b"A",
            "{m:?}"
        );
        let extra = s.recv_packet_within(Duration::from_millis(300)).await;
        assert!(
            extra.is_none(),
            "deleted retained message came back: {extra:?}"
        );
    });
}

fn last_segment(dir: &Path) -> PathBuf {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .filter(|p| std::fs::metadata(p).map(|m| m.len() > 16).unwrap_or(false))
        .collect();
    logs.sort();
    logs.pop().expect("a log file")
}

/// A torn last record (cut in the middle) and a corrupt tail (garbage appended) are cut off
/// and reported; everything before them is recovered and the broker serves.
#[test]
fn torn_or_corrupt_tail_is_cut_off_and_reported() {
    for torn in [true, false] {
        let dir = Dir::new("tail");
        let rt = rt();
        let mut b = Broker::start_with(&["-d", dir.arg()]);
        rt.block_on(async {
            let mut s = v5(&b, "t-sub", true, 600, false).await;
            s.sub_v5(1, "t", QoS::AtLeastOnce).await;
            s.disconnect_v5(ReasonCode::SUCCESS, None).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut p = v5(&b, "t-pub", true, 0, false).await;
            p.pub1_v5(v5_publish("t", QoS::AtLeastOnce, 1, b"first"))
                .await;
            p.pub1_v5(v5_publish("t", QoS::AtLeastOnce, 2, b"last"))
                .await;
        });
        b.proc.kill();
        let seg = last_segment(&dir.0);
        let len = std::fs::metadata(&seg).expect("meta").len();
        if torn {
            // The last record ("last"'s queue entry) loses its final bytes.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&seg)
                .expect("open");
            f.set_len(len - 3).expect("truncate");
        } else {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&seg)
                .expect("open");
            f.write_all(&[0x20, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
                .expect("append");
        }
        let b2 = Broker::start_with(&["-d", dir.arg()]);
        b2.wait_log(&["dropped a torn or corrupt tail"], bin_support::WAIT);
        b2.wait_log(&["sessions restored", "sessions=1"], bin_support::WAIT);
        rt.block_on(async {
            let mut s = v5(&b2, "t-sub", false, 600, true).await;
            assert_eq!(&s.recv_publish().await.payload[..], b"first");
            if !torn {
                assert_eq!(&s.recv_publish().await.payload[..], b"last");
            }
        });
    }
}

/// Files of another store format version are refused with a clear message, not overwritten.
#[test]
fn store_of_another_format_is_refused() {
    let dir = Dir::new("format");
    std::fs::create_dir_all(&dir.0).expect("mkdir");
    let mut header = b"TETHERWL".to_vec();
    header.extend_from_slice(&99u32.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    std::fs::write(dir.0.join("0000000000000001.log"), &header).expect("write");
    let mut cmd = std::process::Command::new(bin_support::TETHER);
    cmd.args(["-b", "127.0.0.1:0", "-d", dir.arg()]);
    let f = bin_support::run("tether", cmd, bin_support::WAIT);
    assert_eq!(f.code(), Some(1), "{f:?}");
    assert!(
        f.stdout.contains("format version 99") && f.stdout.contains("refusing to start"),
        "{}",
        f.stdout
    );
}

/// `persistence.enabled = false`: nothing is written to the data directory and a SIGKILL
/// loses the sessions.
#[test]
fn persistence_off_stores_nothing() {
    let dir = Dir::new("off");
    let rt = rt();
    let cfg = bin_support::TempFile::new("off", "[persistence]\nenabled = false\n");
    let mut b = Broker::start_with(&["-d", dir.arg(), "-c", cfg.arg()]);
    b.wait_log(&["persistence off"], bin_support::WAIT);
    rt.block_on(async {
        let mut c = v5(&b, "off", true, 600, false).await;
        c.sub_v5(1, "x", QoS::AtLeastOnce).await;
        c.disconnect_v5(ReasonCode::SUCCESS, None).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    });
    b.proc.kill();
    assert!(
        !dir.0.exists() || std::fs::read_dir(&dir.0).expect("dir").next().is_none(),
        "data dir written with persistence off"
    );
    let b2 = Broker::start_with(&["-d", dir.arg(), "-c", cfg.arg()]);
    rt.block_on(async {
        v5(&b2, "off", false, 600, false).await;
    });
}

/// SIGTERM writes everything before exiting; a restart has the session and its queue.
#[test]
fn sigterm_flushes_and_restart_resumes() {
    let dir = Dir::new("term");
    let rt = rt();
    let mut b = Broker::start_with(&["-d", dir.arg()]);
    rt.block_on(async {
        let mut s = v5(&b, "term-sub", true, 600, false).await;
        s.sub_v5(1, "term", QoS::AtLeastOnce).await;
        s.disconnect_v5(ReasonCode::SUCCESS, None).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut p = v5(&b, "term-pub", true, 0, false).await;
        p.pub1_v5(v5_publish("term", QoS::AtLeastOnce, 1, b"kept"))
            .await;
    });
    b.proc.sigterm();
    assert!(b.proc.expect_exit(bin_support::WAIT).success());
    b.wait_log(&["store flushed"], bin_support::WAIT);
    let b2 = Broker::start_with(&["-d", dir.arg()]);
    rt.block_on(async {
        let mut s = v5(&b2, "term-sub", false, 600, true).await;
        assert_eq!(&s.recv_publish().await.payload[..], b"kept");
    });
}
