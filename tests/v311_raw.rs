//! MQTT 3.1.1 black-box tests at the byte level: CONNACK flags, client identifiers, session
//! resumption (QoS 1/2 resends, ordering), handshake limits, malformed and forbidden input,
//! keep-alive, wills, takeover, unsubscribe and ping. Every expectation is exact bytes.
mod common;

use std::time::Duration;

use common::*;
use tether::config::Config;
use tether::stats::Stats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Short window for "nothing (more) arrives".
const QUIET: Duration = Duration::from_millis(300);

/// CONNACK, return code 0, with the given Session Present flag.
fn connack(present: bool) -> [u8; 4] {
    [0x20, 0x02, u8::from(present), 0x00]
}

/// A will for `connect_frame`.
struct WillSpec<'a> {
    topic: &'a str,
    payload: &'a [u8],
    qos: u8,
    retain: bool,
}

/// A CONNECT with any protocol name/level, keep-alive and optional will.
fn connect_frame(
    name: &str,
    level: u8,
    client_id: &str,
    clean: bool,
    keep_alive: u16,
    will: Option<WillSpec<'_>>,
) -> Vec<u8> {
    let mut body = (name.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(name.as_bytes());
    body.push(level);
    let mut flags = if clean { 0x02 } else { 0x00 };
    if let Some(w) = &will {
        flags |= 0x04 | (w.qos << 3);
        if w.retain {
            flags |= 0x20;
        }
    }
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    if let Some(w) = &will {
        body.extend_from_slice(&(w.topic.len() as u16).to_be_bytes());
        body.extend_from_slice(w.topic.as_bytes());
        body.extend_from_slice(&(w.payload.len() as u16).to_be_bytes());
        body.extend_from_slice(w.payload);
    }
    frame(0x10, &body)
}

/// A 3.1.1 UNSUBSCRIBE for one filter.
fn unsubscribe(packet_id: u16, filter: &str) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    frame(0xa2, &body)
}

/// A connected 3.1.1 client; asserts the CONNACK (accepted, `present`).
async fn client(b: &TestBroker, id: &str, clean: bool, present: bool) -> Raw {
    let mut c = b.raw().await;
    c.send(&connect_v311(id, clean, 60)).await;
    c.expect_bytes(&connack(present)).await;
    c
}

/// Subscribe to one filter and assert the SUBACK grants `qos`.
async fn sub(c: &mut Raw, packet_id: u16, filter: &str, qos: u8) {
    c.send(&subscribe(packet_id, filter, qos)).await;
    let [a, b] = packet_id.to_be_bytes();
    c.expect_bytes(&[0x90, 0x03, a, b, qos]).await;
}

/// Publish at QoS 1 and wait for the PUBACK.
async fn pub1(c: &mut Raw, topic: &str, packet_id: u16, payload: &[u8]) {
    c.send(&publish(topic, 1, packet_id, false, false, payload))
        .await;
    c.expect_bytes(&ack(0x40, packet_id)).await;
}

/// Every byte the broker sends until it closes the connection (EOF or reset), failing after
/// `WAIT`. Reads the socket directly: only use it when nothing is buffered in `c` (every
/// earlier expectation consumed exactly what the broker had sent by then).
async fn read_to_close(c: &mut Raw) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, c.stream.read(&mut chunk)).await {
            Err(_) => panic!("connection not closed; received {got:02x?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Wait until the session of `id` is parked offline (its connection has been fully handled).
async fn wait_offline(b: &TestBroker, id: &str) {
    eventually(&format!("session {id} parked offline"), || {
        b.broker.registry.with_offline(id, |_| ()).is_some()
    })
    .await;
}

/// Wait until `id` has no connection attached any more.
async fn wait_not_online(b: &TestBroker, id: &str) {
    eventually(&format!("{id} no longer online"), || {
        !b.broker.registry.is_online(id)
    })
    .await;
}

fn protocol_errors(b: &TestBroker) -> u64 {
    Stats::get(&b.broker.stats.protocol_errors)
}

fn wills(b: &TestBroker) -> u64 {
    Stats::get(&b.broker.stats.wills_published)
}

// ---------------------------------------------------------------------------------------------
// 1. CONNACK flags
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.2.2-1] clean 1 -> session present 0; [MQTT-3.2.2-3] clean 0 without a stored
/// session -> session present 0; [MQTT-3.2.2-2] clean 0 with a stored session -> 1.
#[tokio::test]
async fn connack_session_present_flag() {
    let b = TestBroker::start().await;
    let mut c = b.raw().await;
    c.send(&connect_v311("flags-clean", true, 60)).await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;

    let mut p = b.raw().await;
    p.send(&connect_v311("flags-persist", false, 60)).await;
    // [MQTT-3.2.2-3]: no session stored yet.
    p.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    sub(&mut p, 1, "flags/t", 1).await;
    drop(p);
    wait_offline(&b, "flags-persist").await;

    let mut p = b.raw().await;
    p.send(&connect_v311("flags-persist", false, 60)).await;
    // [MQTT-3.2.2-2]: the stored session is resumed.
    p.expect_bytes(&[0x20, 0x02, 0x01, 0x00]).await;
    p.expect_silence(QUIET).await;
    b.stop().await;
}

/// [MQTT-3.1.2-6]: Clean Session = 1 discards a stored session: the subscription made in it is
/// gone (a matching publish is not delivered), Session Present is 0, and the state is not
/// reused by a later Clean Session = 0 connection either.
#[tokio::test]
async fn clean_session_discards_stored_session() {
    let b = TestBroker::start().await;
    let mut s = client(&b, "discard", false, false).await;
    sub(&mut s, 1, "discard/t", 1).await;
    drop(s);
    wait_offline(&b, "discard").await;

    let mut s = b.raw().await;
    s.send(&connect_v311("discard", true, 60)).await;
    s.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    let mut p = client(&b, "discard-pub", true, false).await;
    pub1(&mut p, "discard/t", 1, b"gone").await;
    s.expect_silence(QUIET).await;

    // End the clean session; a persistent reconnect finds nothing stored.
    s.send(&[0xe0, 0x00]).await;
    assert_eq!(read_to_close(&mut s).await, b"");
    eventually("clean session removed", || {
        !b.broker.registry.is_online("discard")
            && b.broker.registry.with_offline("discard", |_| ()).is_none()
    })
    .await;
    let mut s = b.raw().await;
    s.send(&connect_v311("discard", false, 60)).await;
    s.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    pub1(&mut p, "discard/t", 2, b"still gone").await;
    s.expect_silence(QUIET).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Empty Client ID
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.3-7] an empty Client ID requires Clean Session = 1 (accepted, and usable);
/// [MQTT-3.1.3-8] with Clean Session = 0 the Server answers CONNACK 0x02 and closes.
#[tokio::test]
async fn empty_client_id() {
    let b = TestBroker::start().await;
    let mut c = b.raw().await;
    c.send(&connect_v311("", true, 60)).await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    c.send(&[0xc0, 0x00]).await;
    c.expect_bytes(&[0xd0, 0x00]).await;

    let mut d = b.raw().await;
    d.send(&connect_v311("", false, 60)).await;
    assert_eq!(read_to_close(&mut d).await, [0x20, 0x02, 0x00, 0x02]);
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3-6. Session resumption
// ---------------------------------------------------------------------------------------------

/// [MQTT-4.4.0-1]: an unacknowledged QoS 1 PUBLISH is re-sent on resume with DUP = 1 and the
/// same packet id; after the PUBACK nothing more comes.
#[tokio::test]
async fn unacked_qos1_resent_with_dup_on_resume() {
    let b = TestBroker::start().await;
    let mut s = client(&b, "q1-sub", false, false).await;
    sub(&mut s, 1, "q1/t", 1).await;
    let mut p = client(&b, "q1-pub", true, false).await;
    pub1(&mut p, "q1/t", 10, b"payload").await;
    s.expect_bytes(&publish("q1/t", 1, 1, false, false, b"payload"))
        .await;
    // No PUBACK: the socket just goes away.
    drop(s);
    wait_offline(&b, "q1-sub").await;

    let mut s = b.raw().await;
    s.send(&connect_v311("q1-sub", false, 60)).await;
    s.expect_bytes(&[0x20, 0x02, 0x01, 0x00]).await;
    // First byte 0x3a: PUBLISH, DUP, QoS 1.
    s.expect_bytes(&publish("q1/t", 1, 1, true, false, b"payload"))
        .await;
    s.send(&ack(0x40, 1)).await;
    s.expect_silence(QUIET).await;
    b.stop().await;
}

/// [MQTT-4.4.0-1]: a QoS 2 delivery that reached PUBREL is resumed with PUBREL (same id), not
/// with the PUBLISH; PUBCOMP completes it.
#[tokio::test]
async fn pubrel_resent_on_resume() {
    let b = TestBroker::start().await;
    let mut s = client(&b, "q2-sub", false, false).await;
    sub(&mut s, 1, "q2/t", 2).await;
    let mut p = client(&b, "q2-pub", true, false).await;
    p.send(&publish("q2/t", 2, 11, false, false, b"exactly"))
        .await;
    p.expect_bytes(&ack(0x50, 11)).await;
    s.expect_bytes(&publish("q2/t", 2, 1, false, false, b"exactly"))
        .await;
    s.send(&ack(0x50, 1)).await;
    s.expect_bytes(&[0x62, 0x02, 0x00, 0x01]).await;
    drop(s);
    wait_offline(&b, "q2-sub").await;

    let mut s = b.raw().await;
    s.send(&connect_v311("q2-sub", false, 60)).await;
    s.expect_bytes(&[0x20, 0x02, 0x01, 0x00]).await;
    s.expect_bytes(&[0x62, 0x02, 0x00, 0x01]).await;
    s.expect_silence(QUIET).await;
    s.send(&[0x70, 0x02, 0x00, 0x01]).await;
    s.expect_silence(QUIET).await;
    s.send(&[0xe0, 0x00]).await;
    assert_eq!(read_to_close(&mut s).await, b"");
    wait_offline(&b, "q2-sub").await;
    assert_eq!(
        b.broker
            .registry
            .with_offline("q2-sub", |s| s.inflight_len()),
        Some(0),
        "the QoS 2 flow is complete"
    );
    b.stop().await;
}

/// [MQTT-4.3.3-2, MQTT-4.4.0-1]: an inbound QoS 2 flow interrupted after PUBREC is resumed on
/// the new connection: the re-sent PUBLISH (DUP = 1, same id) gets PUBREC again without being
/// routed a second time, PUBREL gets PUBCOMP, and subscribers see the message exactly once.
#[tokio::test]
async fn inbound_qos2_resumed_after_reconnect() {
    let b = TestBroker::start().await;
    let mut s = client(&b, "in2-sub", true, false).await;
    sub(&mut s, 1, "in2/t", 0).await;

    let mut p = client(&b, "in2-pub", false, false).await;
    p.send(&publish("in2/t", 2, 5, false, false, b"once")).await;
    p.expect_bytes(&[0x50, 0x02, 0x00, 0x05]).await;
    s.expect_bytes(&publish("in2/t", 0, 0, false, false, b"once"))
        .await;
    drop(p);
    wait_offline(&b, "in2-pub").await;

    let mut p = b.raw().await;
    p.send(&connect_v311("in2-pub", false, 60)).await;
    p.expect_bytes(&[0x20, 0x02, 0x01, 0x00]).await;
    p.send(&publish("in2/t", 2, 5, true, false, b"once")).await;
    p.expect_bytes(&[0x50, 0x02, 0x00, 0x05]).await;
    p.send(&ack(0x62, 5)).await;
    p.expect_bytes(&[0x70, 0x02, 0x00, 0x05]).await;
    // Exactly once: no second copy.
    s.expect_silence(QUIET).await;
    p.send(&[0xe0, 0x00]).await;
    assert_eq!(read_to_close(&mut p).await, b"");
    wait_offline(&b, "in2-pub").await;
    assert_eq!(
        b.broker
            .registry
            .with_offline("in2-pub", |s| s.inbound_qos2_len()),
        Some(0)
    );
    b.stop().await;
}

/// [MQTT-4.4.0-1, MQTT-4.6.0-6 ordering]: on resume the inflight messages are re-sent first
/// (DUP, original ids, original order), then the queued ones in publish order as the window
/// (session.max_inflight = 2) frees up.
#[tokio::test]
async fn resume_order_inflight_then_queued() {
    let mut cfg = Config::default();
    cfg.session.max_inflight = 2;
    let b = TestBroker::with_config(cfg).await;
    let mut s = client(&b, "ord-sub", false, false).await;
    sub(&mut s, 1, "ord/t", 1).await;
    let mut p = client(&b, "ord-pub", true, false).await;
    for i in 1..=5u16 {
        pub1(&mut p, "ord/t", i, format!("m{i}").as_bytes()).await;
    }
    s.expect_bytes(&publish("ord/t", 1, 1, false, false, b"m1"))
        .await;
    s.expect_bytes(&publish("ord/t", 1, 2, false, false, b"m2"))
        .await;
    // Window full: m3..m5 stay queued.
    s.expect_silence(QUIET).await;
    drop(s);
    wait_offline(&b, "ord-sub").await;
    pub1(&mut p, "ord/t", 6, b"m6").await;

    let mut s = b.raw().await;
    s.send(&connect_v311("ord-sub", false, 60)).await;
    s.expect_bytes(&[0x20, 0x02, 0x01, 0x00]).await;
    s.expect_bytes(&publish("ord/t", 1, 1, true, false, b"m1"))
        .await;
    s.expect_bytes(&publish("ord/t", 1, 2, true, false, b"m2"))
        .await;
    s.expect_silence(QUIET).await;
    for (acked, next) in [(1u16, 3u16), (2, 4), (3, 5), (4, 6)] {
        s.send(&ack(0x40, acked)).await;
        s.expect_bytes(&publish(
            "ord/t",
            1,
            next,
            false,
            false,
            format!("m{next}").as_bytes(),
        ))
        .await;
    }
    s.send(&ack(0x40, 5)).await;
    s.send(&ack(0x40, 6)).await;
    s.expect_silence(QUIET).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7-12. Handshake and malformed input
// ---------------------------------------------------------------------------------------------

/// A connection that sends no CONNECT, or half of one, is closed after
/// `listener.connect_timeout_secs`, without a response.
#[tokio::test]
async fn connect_timeout() {
    let mut cfg = Config::default();
    cfg.listener.connect_timeout_secs = 1;
    let b = TestBroker::with_config(cfg).await;

    let start = Instant::now();
    let mut silent = b.raw().await;
    let mut half = b.raw().await;
    let connect = connect_v311("half", true, 60);
    half.send(&connect[..connect.len() / 2]).await;
    half.expect_silence(Duration::from_millis(500)).await;

    assert_eq!(read_to_close(&mut silent).await, b"");
    assert_eq!(read_to_close(&mut half).await, b"");
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "closed after {elapsed:?}, expected about 1 s"
    );
    b.stop().await;
}

/// [MQTT-3.1.0-1]: the first packet must be CONNECT; PINGREQ first -> closed, no response.
#[tokio::test]
async fn first_packet_not_connect() {
    let b = TestBroker::start().await;
    let before = protocol_errors(&b);
    let mut c = b.raw().await;
    c.send(&[0xc0, 0x00]).await;
    assert_eq!(read_to_close(&mut c).await, b"");
    assert_eq!(protocol_errors(&b), before + 1);
    b.stop().await;
}

/// [MQTT-3.1.0-2]: a second CONNECT is a protocol violation: the connection is closed.
#[tokio::test]
async fn second_connect_closes() {
    let b = TestBroker::start().await;
    let mut c = client(&b, "twice", true, false).await;
    let before = protocol_errors(&b);
    c.send(&connect_v311("twice", true, 60)).await;
    assert_eq!(read_to_close(&mut c).await, b"");
    assert_eq!(protocol_errors(&b), before + 1);
    b.stop().await;
}

/// Section 2.2.3: a remaining length longer than four bytes is malformed -> closed.
#[tokio::test]
async fn malformed_remaining_length_closes() {
    let b = TestBroker::start().await;
    let mut c = client(&b, "badlen", true, false).await;
    let before = protocol_errors(&b);
    c.send(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).await;
    assert_eq!(read_to_close(&mut c).await, b"");
    assert_eq!(protocol_errors(&b), before + 1);
    b.stop().await;
}

/// A packet over `listener.max_packet_size` closes that connection; another client on the
/// same broker keeps working.
#[tokio::test]
async fn oversized_packet_closes_only_that_connection() {
    let mut cfg = Config::default();
    cfg.listener.max_packet_size = 1024;
    let b = TestBroker::with_config(cfg).await;
    let mut other = client(&b, "big-other", true, false).await;
    sub(&mut other, 1, "big/ok", 1).await;

    let mut c = client(&b, "big", true, false).await;
    let before = protocol_errors(&b);
    let frame = publish("big/t", 0, 0, false, false, &[0x55; 2000]);
    assert!(frame.len() > 2000);
    c.send(&frame).await;
    c.expect_closed().await;
    assert_eq!(protocol_errors(&b), before + 1);

    pub1(&mut other, "big/ok", 7, b"fine").await;
    other
        .expect_bytes(&publish("big/ok", 1, 1, false, false, b"fine"))
        .await;
    b.stop().await;
}

/// Bad input on one connection closes only that connection: a persistent subscriber keeps its
/// session and receives a message published afterwards, and `protocol_errors` counts it.
#[tokio::test]
async fn bad_input_never_harms_others() {
    let b = TestBroker::start().await;
    let mut watcher = client(&b, "watcher", false, false).await;
    sub(&mut watcher, 1, "w/#", 1).await;
    let mut p = client(&b, "w-pub", true, false).await;

    let mut bad_flags = subscribe(3, "a", 0);
    bad_flags[0] = 0x80; // SUBSCRIBE flags must be 0010 [MQTT-3.8.1-1, MQTT-2.2.2-2]
    let cases: Vec<(&str, bool, Vec<u8>)> = vec![
        // Not MQTT at all, before CONNECT.
        (
            "http request",
            false,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        // Garbage after a valid CONNECT (0xff = type 15 with flags 1111).
        ("garbage", true, vec![0xff, 0x13, 0x37, 0x00, 0x42, 0x99]),
        // Reserved packet type 0.
        ("type 0", true, vec![0x00, 0x00]),
        // Packet type 15 is reserved in 3.1.1 (AUTH only exists in 5.0).
        ("type 15", true, vec![0xf0, 0x00]),
        // [MQTT-2.2.2-2] invalid fixed-header flags.
        ("subscribe flags 0000", true, bad_flags),
        // [MQTT-3.3.1-4] PUBLISH QoS 3.
        ("qos 3", true, {
            let mut f = publish("w/x", 1, 9, false, false, b"q3");
            f[0] = 0x36;
            f
        }),
        // [MQTT-3.3.2-2] a PUBLISH topic name must not contain wildcards.
        (
            "wildcard topic",
            true,
            publish("a/+", 0, 0, false, false, b"x"),
        ),
        // [MQTT-3.8.3-3] SUBSCRIBE needs at least one filter.
        ("empty subscribe", true, frame(0x82, &[0x00, 0x04])),
    ];
    let mut delivered: u16 = 0;
    for (i, (what, connect, bytes)) in cases.into_iter().enumerate() {
        let before = protocol_errors(&b);
        let mut bad = b.raw().await;
        if connect {
            bad.send(&connect_v311(&format!("bad-{i}"), true, 60)).await;
            bad.expect_bytes(&connack(false)).await;
        }
        bad.send(&bytes).await;
        assert_eq!(read_to_close(&mut bad).await, b"", "case {what}");
        assert_eq!(protocol_errors(&b), before + 1, "case {what}");

        delivered += 1;
        let payload = format!("after {what}");
        pub1(&mut p, "w/x", delivered, payload.as_bytes()).await;
        watcher
            .expect_bytes(&publish(
                "w/x",
                1,
                delivered,
                false,
                false,
                payload.as_bytes(),
            ))
            .await;
        watcher.send(&ack(0x40, delivered)).await;
    }

    // A truncated packet followed by the client's close: the broker just ends that connection
    // (a network close, not a protocol error).
    let mut t = client(&b, "truncated", true, false).await;
    t.send(&[0x30, 0x0a, 0x00, 0x03, b'w']).await;
    t.stream.shutdown().await.expect("shutdown");
    assert_eq!(read_to_close(&mut t).await, b"");
    eventually("truncated client gone", || {
        !b.broker.registry.is_online("truncated")
    })
    .await;
    pub1(&mut p, "w/x", 100, b"after truncated").await;
    delivered += 1;
    watcher
        .expect_bytes(&publish(
            "w/x",
            1,
            delivered,
            false,
            false,
            b"after truncated",
        ))
        .await;
    watcher.send(&ack(0x40, delivered)).await;

    assert!(b.broker.registry.is_online("watcher"));
    watcher.expect_silence(QUIET).await;
    b.stop().await;
}

/// [MQTT-3.1.2-2]: protocol level 6 with name "MQTT" -> CONNACK 0x01, then close; MQTT 3.1
/// ("MQIsdp", level 3) is accepted.
#[tokio::test]
async fn protocol_level() {
    let b = TestBroker::start().await;
    let mut c = b.raw().await;
    c.send(&connect_frame("MQTT", 6, "lvl6", true, 60, None))
        .await;
    assert_eq!(read_to_close(&mut c).await, [0x20, 0x02, 0x00, 0x01]);

    let mut c = b.raw().await;
    c.send(&connect_frame("MQIsdp", 3, "lvl3", true, 60, None))
        .await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    c.send(&[0xc0, 0x00]).await;
    c.expect_bytes(&[0xd0, 0x00]).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 13. Keep-alive
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.2-24]: nothing received for 1.5 x keep-alive -> the Server closes the connection,
/// and the will is published [MQTT-3.1.2-8].
#[tokio::test]
async fn keep_alive_timeout_closes_and_publishes_will() {
    let b = TestBroker::start().await;
    let mut w = client(&b, "ka-watch", true, false).await;
    sub(&mut w, 1, "ka/will", 0).await;

    let mut c = b.raw().await;
    let will = WillSpec {
        topic: "ka/will",
        payload: b"timed out",
        qos: 0,
        retain: false,
    };
    c.send(&connect_frame("MQTT", 4, "ka", true, 1, Some(will)))
        .await;
    c.expect_bytes(&connack(false)).await;
    let start = Instant::now();
    assert_eq!(read_to_close(&mut c).await, b"");
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1400) && elapsed < Duration::from_millis(2500),
        "closed after {elapsed:?}, expected about 1.5 s"
    );
    w.expect_bytes(&publish("ka/will", 0, 0, false, false, b"timed out"))
        .await;
    b.stop().await;
}

/// [MQTT-3.12.4-1]: PINGREQ every 500 ms with keep-alive 1 keeps the
/// connection open past 3 s, each answered with PINGRESP.
#[tokio::test]
async fn pings_keep_the_connection_alive() {
    let b = TestBroker::start().await;
    let mut c = b.raw().await;
    c.send(&connect_v311("pinger", true, 1)).await;
    c.expect_bytes(&connack(false)).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(3500) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.send(&[0xc0, 0x00]).await;
        c.expect_bytes(&[0xd0, 0x00]).await;
    }
    assert!(b.broker.registry.is_online("pinger"));
    b.stop().await;
}

/// Section 3.1.2.10: keep-alive 0 turns the mechanism off (no close within 2 s).
#[tokio::test]
async fn keep_alive_zero_disables_timeout() {
    let b = TestBroker::start().await;
    let mut c = b.raw().await;
    c.send(&connect_v311("ka0", true, 0)).await;
    c.expect_bytes(&connack(false)).await;
    c.expect_silence(Duration::from_secs(2)).await;
    c.send(&[0xc0, 0x00]).await;
    c.expect_bytes(&[0xd0, 0x00]).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 14. Wills
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.2-8]: a connection closed without DISCONNECT publishes its will with the will
/// QoS; a retained will is stored and a later subscriber gets it with RETAIN = 1
/// [MQTT-3.1.2-17, MQTT-3.3.1-8], while the established subscriber got RETAIN = 0
/// [MQTT-3.3.1-9].
#[tokio::test]
async fn will_on_abrupt_close_with_qos_and_retain() {
    let b = TestBroker::start().await;
    let mut w = client(&b, "will-watch", true, false).await;
    sub(&mut w, 1, "will/a", 2).await;
    let wills_before = wills(&b);

    let mut c = b.raw().await;
    c.send(&connect_v311_will(
        "will-a", true, "will/a", b"bye", 1, true,
    ))
    .await;
    c.expect_bytes(&connack(false)).await;
    drop(c);
    w.expect_bytes(&publish("will/a", 1, 1, false, false, b"bye"))
        .await;
    w.send(&ack(0x40, 1)).await;
    assert_eq!(wills(&b), wills_before + 1);

    let mut late = client(&b, "will-late", true, false).await;
    sub(&mut late, 1, "will/a", 1).await;
    late.expect_bytes(&publish("will/a", 1, 1, false, true, b"bye"))
        .await;
    b.stop().await;
}

/// [MQTT-3.1.2-10]: DISCONNECT removes the will: it is not published.
#[tokio::test]
async fn no_will_after_disconnect() {
    let b = TestBroker::start().await;
    let mut w = client(&b, "nowill-watch", true, false).await;
    sub(&mut w, 1, "will/d", 0).await;
    let wills_before = wills(&b);

    let mut c = b.raw().await;
    c.send(&connect_v311_will(
        "will-d", true, "will/d", b"bye", 0, false,
    ))
    .await;
    c.expect_bytes(&connack(false)).await;
    c.send(&[0xe0, 0x00]).await;
    assert_eq!(read_to_close(&mut c).await, b"");
    wait_not_online(&b, "will-d").await;
    w.expect_silence(QUIET).await;
    assert_eq!(wills(&b), wills_before);
    b.stop().await;
}

/// [MQTT-3.1.2-8]: a connection closed by the Server for a protocol error publishes the will.
#[tokio::test]
async fn will_on_protocol_error() {
    let b = TestBroker::start().await;
    let mut w = client(&b, "errwill-watch", true, false).await;
    sub(&mut w, 1, "will/e", 0).await;

    let mut c = b.raw().await;
    c.send(&connect_v311_will(
        "will-e", true, "will/e", b"broken", 0, false,
    ))
    .await;
    c.expect_bytes(&connack(false)).await;
    c.send(&[0x00, 0x00]).await;
    assert_eq!(read_to_close(&mut c).await, b"");
    w.expect_bytes(&publish("will/e", 0, 0, false, false, b"broken"))
        .await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 15. Takeover
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.4-2]: a second CONNECT with the same Client ID closes the first connection (its
/// will is published); with Clean Session = 0 the session - subscription, inflight and queued
/// messages - moves to the new connection.
#[tokio::test]
async fn takeover_moves_session_and_publishes_will() {
    let mut cfg = Config::default();
    cfg.session.max_inflight = 1;
    let b = TestBroker::with_config(cfg).await;
    let mut w = client(&b, "tk-watch", true, false).await;
    sub(&mut w, 1, "tk/will", 0).await;

    let mut old = b.raw().await;
    old.send(&connect_v311_will(
        "tk", false, "tk/will", b"taken", 0, false,
    ))
    .await;
    old.expect_bytes(&connack(false)).await;
    sub(&mut old, 1, "tk/data", 1).await;
    let mut p = client(&b, "tk-pub", true, false).await;
    pub1(&mut p, "tk/data", 1, b"d1").await;
    pub1(&mut p, "tk/data", 2, b"d2").await;
    old.expect_bytes(&publish("tk/data", 1, 1, false, false, b"d1"))
        .await;
    // d2 waits in the queue: the window (max_inflight = 1) is full.
    old.expect_silence(QUIET).await;

    let mut new = b.raw().await;
    new.send(&connect_v311("tk", false, 60)).await;
    new.expect_bytes(&[0x20, 0x02, 0x01, 0x00]).await;
    new.expect_bytes(&publish("tk/data", 1, 1, true, false, b"d1"))
        .await;
    assert_eq!(read_to_close(&mut old).await, b"");
    w.expect_bytes(&publish("tk/will", 0, 0, false, false, b"taken"))
        .await;

    new.send(&ack(0x40, 1)).await;
    new.expect_bytes(&publish("tk/data", 1, 2, false, false, b"d2"))
        .await;
    new.send(&ack(0x40, 2)).await;
    // The subscription moved too.
    pub1(&mut p, "tk/data", 3, b"d3").await;
    new.expect_bytes(&publish("tk/data", 1, 3, false, false, b"d3"))
        .await;
    new.send(&ack(0x40, 3)).await;
    new.expect_silence(QUIET).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 16. Unsubscribe, ping
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.10.4-4, MQTT-3.10.4-5]: UNSUBACK `b0 02 <id>` with the UNSUBSCRIBE's id, and
/// delivery stops [MQTT-3.10.4-2]; [MQTT-3.12.4-1] PINGREQ -> PINGRESP `d0 00`.
#[tokio::test]
async fn unsubscribe_stops_delivery_and_ping() {
    let b = TestBroker::start().await;
    let mut c = client(&b, "unsub", true, false).await;
    sub(&mut c, 1, "u/t", 0).await;
    c.send(&publish("u/t", 0, 0, false, false, b"one")).await;
    c.expect_bytes(&publish("u/t", 0, 0, false, false, b"one"))
        .await;
    c.send(&unsubscribe(9, "u/t")).await;
    c.expect_bytes(&[0xb0, 0x02, 0x00, 0x09]).await;
    c.send(&publish("u/t", 0, 0, false, false, b"two")).await;
    c.send(&[0xc0, 0x00]).await;
    // The PINGRESP comes with nothing before it: "two" was not delivered.
    c.expect_bytes(&[0xd0, 0x00]).await;
    c.expect_silence(QUIET).await;
    b.stop().await;
}

/// [MQTT-3.1.4-2, MQTT-3.1.2-6]: a takeover with Clean Session = 1 still closes the first
/// connection and publishes its will, but starts a fresh session: Session Present 0, and the
/// old subscription no longer delivers.
#[tokio::test]
async fn takeover_with_clean_session_discards_old_session() {
    let b = TestBroker::start().await;
    let mut w = client(&b, "tkc-watch", true, false).await;
    sub(&mut w, 1, "tkc/will", 0).await;

    let mut old = b.raw().await;
    old.send(&connect_v311_will(
        "tkc", false, "tkc/will", b"gone", 0, false,
    ))
    .await;
    old.expect_bytes(&connack(false)).await;
    sub(&mut old, 1, "tkc/data", 1).await;

    let mut new = b.raw().await;
    new.send(&connect_v311("tkc", true, 60)).await;
    new.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    assert_eq!(read_to_close(&mut old).await, b"");
    w.expect_bytes(&publish("tkc/will", 0, 0, false, false, b"gone"))
        .await;

    let mut p = client(&b, "tkc-pub", true, false).await;
    pub1(&mut p, "tkc/data", 1, b"lost").await;
    new.expect_silence(QUIET).await;
    b.stop().await;
}
