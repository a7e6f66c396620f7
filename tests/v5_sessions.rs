//! MQTT 5.0 sessions, black box: Clean Start, Session Expiry Interval (CONNECT, server cap,
//! DISCONNECT), 3.1.1 <-> 5.0 takeovers, Will Delay Interval and the takeover DISCONNECT.
//!
//! Expiry and will-delay deadlines are checked twice: on paused tokio time without sockets
//! (the registry, timer task and router driven directly, so the exact instant is asserted), and
//! in real time over sockets with 1-2 s intervals.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tether::broker::Broker;
use tether::config::Config;
use tether::routing::router::SubEntry;
use tether::session::registry::Claim;
use tether::session::{Session, Subscription, EXPIRY_NEVER};
use tether::shutdown::Shutdown;
use tether::stats::Stats;
use tether::wire::packet::{Packet, ProtocolVersion, QoS, ReasonCode, RetainHandling};
use tokio::time::{timeout, Instant};

/// Short window for "nothing (more) arrives".
const QUIET: Duration = Duration::from_millis(300);

fn wills(b: &TestBroker) -> u64 {
    Stats::get(&b.broker.stats.wills_published)
}

/// Seconds until the earliest armed deadline (session expiry or will delay).
fn secs_to_next_deadline(broker: &Broker) -> Option<f64> {
    broker
        .registry
        .timers
        .next_deadline()
        .map(|at| at.saturating_duration_since(Instant::now()).as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// Paused-time rig: a broker with its timer task and an observer session, no sockets.
// ---------------------------------------------------------------------------------------------

struct Rig {
    broker: Arc<Broker>,
    observer: Box<Session>,
    _stop: tether::shutdown::Trigger,
}

impl Rig {
    /// A broker whose timer task runs, and an online observer subscribed to `will/#` (QoS 1).
    fn new() -> Rig {
        let broker = Broker::new(Arc::new(Config::default()));
        let (stop, shutdown) = Shutdown::new();
        tokio::spawn(broker.clone().run_timers(shutdown));
        let observer = broker.new_session("observer".into(), ProtocolVersion::V5, EXPIRY_NEVER);
        observer.mailbox.set_online(true);
        broker.router.subscribe(
            &observer.client_id,
            "will/#",
            SubEntry {
                mailbox: observer.mailbox.clone(),
                sub: Subscription {
                    qos: QoS::AtLeastOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: RetainHandling::OnSubscribe,
                    identifier: None,
                },
            },
        );
        Rig {
            broker,
            observer,
            _stop: stop,
        }
    }

    /// Park a session `id` (v5) with `expiry` and optionally a pending will with `delay`.
    fn park(&self, id: &str, expiry: u32, will_delay: Option<u32>, now: Instant) {
        let mut s = self
            .broker
            .new_session(id.into(), ProtocolVersion::V5, expiry);
        s.pending_will = will_delay
            .map(|d| v5_will(&format!("will/{id}"), b"gone", d))
            .into();
        assert!(self.broker.registry.insert_offline(s, now), "{id} parked");
    }

    /// Wait (paused clock: it jumps to the next deadline) for the observer to get a message;
    /// `None` when nothing comes within `limit`.
    async fn next_will(&self, limit: Duration) -> Option<(Instant, String)> {
        timeout(limit, self.observer.mailbox.notified())
            .await
            .ok()?;
        let at = Instant::now();
        let d = self.observer.mailbox.pop().expect("a queued will");
        assert_eq!(&d.msg.payload[..], b"gone");
        Some((at, d.msg.topic.clone()))
    }

    fn wills(&self) -> u64 {
        Stats::get(&self.broker.stats.wills_published)
    }
}

/// Let every task that is ready (the timer task after a deadline) run.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// The paused clock fires at millisecond granularity; accept up to 2 ms past a deadline.
fn assert_at(at: Instant, expected: Instant, what: &str) {
    assert!(
        at >= expected && at <= expected + Duration::from_millis(2),
        "{what}: fired {:?} after the expected instant (negative = early: {})",
        at.saturating_duration_since(expected),
        at < expected
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Clean Start
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.2-4] Clean Start 1 discards an existing session and starts a new one;
/// [MQTT-3.1.2-5] Clean Start 0 resumes an existing session; [MQTT-3.2.2-2]/[MQTT-3.1.2-6]
/// Session Present reports which happened.
#[tokio::test]
async fn clean_start_discards_or_resumes_the_session() {
    let b = TestBroker::start().await;
    // No session yet: Clean Start 0 creates one, Session Present 0.
    let mut c = b
        .v5_client(v5_connect_expiry("cs", false, Some(60)), false)
        .await;
    c.sub_v5(1, "cs/t", QoS::AtLeastOnce).await;
    c.disconnect_v5(ReasonCode::NORMAL_DISCONNECTION, None)
        .await;
    b.wait_offline("cs").await;

    let mut p = b.v5_client(v5_connect("pub", true), false).await;
    p.pub1_v5(v5_publish("cs/t", QoS::AtLeastOnce, 1, b"queued"))
        .await;

    // Clean Start 0 resumes: Session Present 1, the queued message and the subscription.
    let mut c = b
        .v5_client(v5_connect_expiry("cs", false, Some(60)), true)
        .await;
    let m = c.recv_publish().await;
    assert_eq!(&m.payload[..], b"queued");
    c.send_packet(&Packet::PubAck(tether::wire::packet::Ack::new(m.packet_id)))
        .await;
    c.disconnect_v5(ReasonCode::NORMAL_DISCONNECTION, None)
        .await;
    b.wait_offline("cs").await;
    p.pub1_v5(v5_publish("cs/t", QoS::AtLeastOnce, 2, b"dropped"))
        .await;

    // Clean Start 1 discards it: Session Present 0, no subscription, nothing queued.
    let mut c = b
        .v5_client(v5_connect_expiry("cs", true, Some(60)), false)
        .await;
    c.expect_silence(QUIET).await;
    p.pub1_v5(v5_publish("cs/t", QoS::AtLeastOnce, 3, b"after"))
        .await;
    c.expect_silence(QUIET).await;
    c.disconnect_v5(ReasonCode::NORMAL_DISCONNECTION, None)
        .await;
    b.wait_offline("cs").await;
    let (subs, queued) = b
        .broker
        .registry
        .with_offline("cs", |s| (s.subscriptions.len(), s.mailbox.len()))
        .unwrap();
    assert_eq!((subs, queued), (0, 0), "the new session starts empty");
    // ... and a Clean Start 0 now resumes that (empty) new session.
    let _c = b
        .v5_client(v5_connect_expiry("cs", false, Some(60)), true)
        .await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Session Expiry Interval
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.2-23 context] An absent Session Expiry Interval is 0: the session ends when the
/// Network Connection closes, whether by DISCONNECT or abruptly, even with Clean Start 0.
#[tokio::test]
async fn absent_session_expiry_ends_session_with_the_connection() {
    let b = TestBroker::start().await;
    let mut c = b.v5_client(v5_connect("e0", false), false).await;
    c.sub_v5(1, "e0/t", QoS::AtLeastOnce).await;
    drop(c);
    b.wait_registry_empty().await;
    assert_eq!(b.broker.router.len(), 0, "its subscriptions are gone too");

    let mut c = b.v5_client(v5_connect("e0", false), false).await;
    c.sub_v5(1, "e0/t", QoS::AtLeastOnce).await;
    c.disconnect_v5(ReasonCode::NORMAL_DISCONNECTION, None)
        .await;
    b.wait_registry_empty().await;
    assert!(b.broker.registry.timers.is_empty());
    let _c = b.v5_client(v5_connect("e0", false), false).await;
    b.stop().await;
}

/// [MQTT-3.1.2-23] Session Expiry Interval N: the session outlives the connection by N
/// seconds, then is gone. Real time, N = 1.
#[tokio::test]
async fn session_expiry_keeps_session_then_removes_it_real_time() {
    let b = TestBroker::start().await;
    let mut c = b
        .v5_client(v5_connect_expiry("e1", false, Some(1)), false)
        .await;
    c.sub_v5(1, "e1/t", QoS::AtLeastOnce).await;
    drop(c);
    let closed = Instant::now();
    b.wait_offline("e1").await;
    let left = secs_to_next_deadline(&b.broker).expect("an expiry deadline is armed");
    assert!(
        left > 0.5 && left <= 1.0,
        "deadline in {left} s, expected ~1 s"
    );
    eventually("session e1 expired", || b.broker.registry.is_empty()).await;
    assert!(
        closed.elapsed() >= Duration::from_secs(1),
        "expired after {:?}, before its interval",
        closed.elapsed()
    );
    assert_eq!(Stats::get(&b.broker.stats.sessions_expired), 1);
    assert_eq!(b.broker.router.len(), 0);
    let _c = b
        .v5_client(v5_connect_expiry("e1", false, Some(1)), false)
        .await;
    b.stop().await;
}

/// [MQTT-3.1.2-23] Paused time: a session parked with expiry 10 s is there at 9.999 s and
/// gone at 10 s.
#[tokio::test(start_paused = true)]
async fn session_expiry_fires_exactly_at_the_deadline_paused() {
    let rig = Rig::new();
    let t0 = Instant::now();
    rig.park("p10", 10, None, t0);
    assert_eq!(rig.broker.registry.timers.len(), 1);
    tokio::time::sleep_until(t0 + Duration::from_millis(9_999)).await;
    settle().await;
    assert!(
        rig.broker.registry.with_offline("p10", |_| ()).is_some(),
        "expired before 10 s"
    );
    tokio::time::sleep_until(t0 + Duration::from_secs(10)).await;
    settle().await;
    assert!(
        rig.broker.registry.with_offline("p10", |_| ()).is_none(),
        "not expired at 10 s"
    );
    assert_eq!(Stats::get(&rig.broker.stats.sessions_expired), 1);
    assert!(rig.broker.registry.timers.is_empty());
}

/// [MQTT-3.1.2-23 context] 0xFFFFFFFF: the session never expires and no timer is armed.
/// Over sockets (no timer after parking), then on paused time (ten years later still there).
#[tokio::test]
async fn session_expiry_max_never_expires() {
    let b = TestBroker::start().await;
    let mut c = b
        .v5_client(v5_connect_expiry("forever", false, Some(u32::MAX)), false)
        .await;
    c.sub_v5(1, "f/t", QoS::AtLeastOnce).await;
    drop(c);
    b.wait_offline("forever").await;
    assert!(
        b.broker.registry.timers.is_empty(),
        "a never-expiring session arms no timer"
    );
    let _c = b
        .v5_client(v5_connect_expiry("forever", false, Some(u32::MAX)), true)
        .await;
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn session_expiry_max_never_expires_paused() {
    let rig = Rig::new();
    rig.park("forever", EXPIRY_NEVER, None, Instant::now());
    assert!(rig.broker.registry.timers.is_empty());
    tokio::time::sleep(Duration::from_secs(10 * 365 * 24 * 3600)).await;
    settle().await;
    assert!(rig
        .broker
        .registry
        .with_offline("forever", |_| ())
        .is_some());
}

/// A server cap below the requested interval is applied and returned in CONNACK
/// (section 3.2.2.3.2: the Server uses its own value and tells the Client).
#[tokio::test]
async fn server_caps_session_expiry_and_says_so_in_connack() {
    let mut config = Config::default();
    config.session.max_session_expiry_secs = 10;
    let b = TestBroker::with_config(config).await;
    let (c, ack) = b
        .connect_v5(v5_connect_expiry("capped", false, Some(100)))
        .await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
    assert_eq!(ack.properties.session_expiry_interval, Some(10));
    drop(c);
    b.wait_offline("capped").await;
    let left = secs_to_next_deadline(&b.broker).expect("expiry armed");
    assert!(left > 9.0 && left <= 10.0, "expires in {left} s, not 10");
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. 3.1.1 <-> 5.0
// ---------------------------------------------------------------------------------------------

/// A 3.1.1 persistent session is resumed by a 5.0 client (Clean Start 0, expiry > 0) and the
/// 5.0 session by a 3.1.1 client (Clean Session 0); queued messages arrive in each protocol.
#[tokio::test]
async fn v311_and_v5_clients_take_over_each_others_session() {
    let b = TestBroker::start().await;
    let mut pubr = b.v5_client(v5_connect("x-pub", true), false).await;

    // 3.1.1 persistent session with a subscription.
    let mut v3 = b.raw().await;
    v3.send(&connect_v311("mixed", false, 60)).await;
    v3.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    v3.send(&subscribe(1, "mixed/t", 1)).await;
    v3.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x01]).await;
    v3.send(&[0xe0, 0x00]).await;
    b.wait_offline("mixed").await;
    pubr.pub1_v5(v5_publish("mixed/t", QoS::AtLeastOnce, 1, b"for-v5"))
        .await;

    // 5.0 resumes it.
    let mut v5 = b
        .v5_client(v5_connect_expiry("mixed", false, Some(60)), true)
        .await;
    let m = v5.recv_publish().await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("mixed/t", &b"for-v5"[..])
    );
    assert_eq!(m.qos, QoS::AtLeastOnce);
    v5.send_packet(&Packet::PubAck(tether::wire::packet::Ack::new(m.packet_id)))
        .await;
    v5.disconnect_v5(ReasonCode::NORMAL_DISCONNECTION, None)
        .await;
    b.wait_offline("mixed").await;
    pubr.pub1_v5(v5_publish("mixed/t", QoS::AtLeastOnce, 2, b"for-v3"))
        .await;

    // 3.1.1 resumes the 5.0 session; the message arrives as a 3.1.1 PUBLISH (no properties).
    let mut v3 = b.raw().await;
    v3.send(&connect_v311("mixed", false, 60)).await;
    v3.expect_bytes(&[0x20, 0x02, 0x01, 0x00]).await;
    let got = v3.read_exact(2 + 2 + 7 + 2 + 6).await;
    let mut expected = publish("mixed/t", 1, 0, false, false, b"for-v3");
    // The packet id is the broker's choice: copy it.
    expected[11] = got[11];
    expected[12] = got[12];
    assert_eq!(got, expected, "3.1.1 PUBLISH of the queued message");
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. DISCONNECT and the Session Expiry Interval
// ---------------------------------------------------------------------------------------------

/// Section 3.14.2.2.2: DISCONNECT may lower the interval: 60 -> 0 ends the session at once.
#[tokio::test]
async fn disconnect_lowering_expiry_to_zero_ends_the_session() {
    let b = TestBroker::start().await;
    let mut c = b
        .v5_client(v5_connect_expiry("lower", false, Some(60)), false)
        .await;
    c.sub_v5(1, "lower/t", QoS::AtLeastOnce).await;
    c.disconnect_v5(ReasonCode::NORMAL_DISCONNECTION, Some(0))
        .await;
    c.expect_closed().await;
    b.wait_registry_empty().await;
    assert!(b.broker.registry.timers.is_empty());
    assert_eq!(b.broker.router.len(), 0);
    b.stop().await;
}

/// Section 3.14.2.2.2: DISCONNECT may raise a non-zero interval: 1 -> 100 keeps it 100 s.
#[tokio::test]
async fn disconnect_raising_nonzero_expiry_keeps_the_session() {
    let b = TestBroker::start().await;
    let mut c = b
        .v5_client(v5_connect_expiry("raise", false, Some(1)), false)
        .await;
    c.disconnect_v5(ReasonCode::NORMAL_DISCONNECTION, Some(100))
        .await;
    c.expect_closed().await;
    b.wait_offline("raise").await;
    let left = secs_to_next_deadline(&b.broker).expect("expiry armed");
    assert!(left > 99.0 && left <= 100.0, "expires in {left} s, not 100");
    b.stop().await;
}

/// Section 3.14.2.2.2: a CONNECT interval of 0 cannot be raised by DISCONNECT: the Server
/// answers DISCONNECT 0x82, the DISCONNECT is not valid (the will is published) and the
/// session ends as set at CONNECT.
#[tokio::test]
async fn disconnect_raising_zero_expiry_is_a_protocol_error() {
    let b = TestBroker::start().await;
    let mut obs = b.v5_client(v5_connect("obs", true), false).await;
    obs.sub_v5(1, "will/#", QoS::AtLeastOnce).await;
    let mut connect = v5_connect("zero", false);
    connect.will = Some(v5_will("will/zero", b"gone", 0));
    let mut c = b.v5_client(connect, false).await;
    c.disconnect_v5(ReasonCode::NORMAL_DISCONNECTION, Some(100))
        .await;
    let d = c.expect_disconnect().await;
    assert_eq!(d.reason, ReasonCode::PROTOCOL_ERROR);
    eventually("session zero ended", || {
        !b.broker.registry.is_online("zero") && b.broker.registry.len() == 1
    })
    .await;
    assert!(b.broker.registry.with_offline("zero", |_| ()).is_none());
    let w = obs.recv_publish().await;
    assert_eq!(w.topic, "will/zero");
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Will Delay Interval, paused time (no sockets)
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.3-9] context: will delay 2 s, session expiry 10 s: the will is published 2 s after
/// the session was parked, not a millisecond earlier, and the session stays.
#[tokio::test(start_paused = true)]
async fn will_delay_publishes_after_the_delay_paused() {
    let rig = Rig::new();
    let t0 = Instant::now();
    rig.park("wd", 10, Some(2), t0);
    assert_eq!(rig.broker.registry.timers.len(), 2, "expiry + will delay");
    tokio::time::sleep_until(t0 + Duration::from_millis(1_999)).await;
    settle().await;
    assert!(rig.observer.mailbox.is_empty(), "will published early");
    assert_eq!(rig.wills(), 0);
    let (at, topic) = rig
        .next_will(Duration::from_secs(60))
        .await
        .expect("will published");
    assert_at(at, t0 + Duration::from_secs(2), "will");
    assert_eq!(topic, "will/wd");
    assert_eq!(rig.wills(), 1);
    assert_eq!(
        rig.broker
            .registry
            .with_offline("wd", |s| s.pending_will.is_none()),
        Some(true),
        "session still parked, will consumed"
    );
    // Nothing more, not even when the session expires.
    assert!(rig.next_will(Duration::from_secs(60)).await.is_none());
    assert_eq!(rig.wills(), 1);
}

/// [MQTT-3.1.3-9] A new connection to the session before the delay passed: the will is never
/// published (the resume disarms the will timer).
#[tokio::test(start_paused = true)]
async fn will_delay_resume_before_delay_cancels_the_will_paused() {
    let rig = Rig::new();
    let t0 = Instant::now();
    rig.park("wr", 10, Some(2), t0);
    tokio::time::sleep_until(t0 + Duration::from_secs(1)).await;
    settle().await;
    let (tx, _rx) = tether::session::registry::control_channel();
    let session = match rig.broker.registry.claim(&"wr".into(), &tx) {
        Claim::Resumed { session, .. } => session,
        other => panic!("expected the parked session, got {other:?}"),
    };
    assert!(
        rig.broker.registry.timers.is_empty(),
        "resume disarms both timers"
    );
    assert!(rig.next_will(Duration::from_secs(3600)).await.is_none());
    assert_eq!(rig.wills(), 0);
    drop(session);
}

/// Section 3.1.3.2.2: the will is published when the delay passes or the session ends,
/// whichever comes first: expiry 1 s < delay 5 s -> published at 1 s, session gone.
#[tokio::test(start_paused = true)]
async fn will_published_when_session_ends_before_delay_paused() {
    let rig = Rig::new();
    let t0 = Instant::now();
    rig.park("we", 1, Some(5), t0);
    let (at, topic) = rig
        .next_will(Duration::from_secs(60))
        .await
        .expect("will published at session end");
    assert_at(at, t0 + Duration::from_secs(1), "will at session end");
    assert_eq!(topic, "will/we");
    settle().await;
    assert!(rig.broker.registry.with_offline("we", |_| ()).is_none());
    assert!(rig.next_will(Duration::from_secs(60)).await.is_none());
    assert_eq!(rig.wills(), 1);
}

// ---------------------------------------------------------------------------------------------
// 5. Will Delay Interval, real time over sockets
// ---------------------------------------------------------------------------------------------

async fn will_observer(b: &TestBroker) -> Raw {
    let mut obs = b.v5_client(v5_connect("obs", true), false).await;
    obs.sub_v5(1, "will/#", QoS::AtLeastOnce).await;
    obs
}

/// Will delay 2 s, session expiry 10 s, abrupt close: the will arrives after 2 s, not before.
#[tokio::test]
async fn will_delay_real_time() {
    let b = TestBroker::start().await;
    let mut obs = will_observer(&b).await;
    let mut connect = v5_connect_expiry("wd", true, Some(10));
    connect.will = Some(v5_will("will/wd", b"gone", 2));
    let c = b.v5_client(connect, false).await;
    drop(c);
    let closed = Instant::now();
    let w = obs.recv_publish().await;
    let after = closed.elapsed();
    assert_eq!(
        (w.topic.as_str(), &w.payload[..]),
        ("will/wd", &b"gone"[..])
    );
    assert!(
        after >= Duration::from_secs(2) && after < Duration::from_millis(3500),
        "will after {after:?}, expected ~2 s"
    );
    assert_eq!(wills(&b), 1);
    assert!(b.broker.registry.with_offline("wd", |_| ()).is_some());
    b.stop().await;
}

/// [MQTT-3.1.3-9] Reconnecting (Clean Start 0) within the delay: the will is never published,
/// and the resumed session does not carry it any more.
#[tokio::test]
async fn will_delay_reconnect_within_delay_cancels_the_will() {
    let b = TestBroker::start().await;
    let mut obs = will_observer(&b).await;
    let mut connect = v5_connect_expiry("wr", true, Some(10));
    connect.will = Some(v5_will("will/wr", b"gone", 2));
    drop(b.v5_client(connect, false).await);
    b.wait_offline("wr").await;
    assert_eq!(b.broker.registry.timers.len(), 2, "expiry + will delay");
    let mut c = b
        .v5_client(v5_connect_expiry("wr", false, Some(10)), true)
        .await;
    assert!(b.broker.registry.timers.is_empty());
    c.disconnect_v5(ReasonCode::NORMAL_DISCONNECTION, None)
        .await;
    b.wait_offline("wr").await;
    assert_eq!(
        b.broker
            .registry
            .with_offline("wr", |s| s.pending_will.is_none()),
        Some(true),
        "the delayed will was cancelled by the reconnect"
    );
    assert_eq!(b.broker.registry.timers.len(), 1, "expiry only");
    obs.expect_silence(Duration::from_millis(2500)).await;
    assert_eq!(wills(&b), 0);
    b.stop().await;
}

/// Section 3.1.3.2.2 over sockets: expiry 1 s < delay 5 s: the will comes with the session's
/// end (~1 s); expiry 0 (absent) < delay: the will comes at once.
#[tokio::test]
async fn will_published_at_session_end_real_time() {
    let b = TestBroker::start().await;
    let mut obs = will_observer(&b).await;
    let mut connect = v5_connect_expiry("we", true, Some(1));
    connect.will = Some(v5_will("will/we", b"gone", 5));
    drop(b.v5_client(connect, false).await);
    let closed = Instant::now();
    let w = obs.recv_publish().await;
    let after = closed.elapsed();
    assert_eq!(w.topic, "will/we");
    assert!(
        after >= Duration::from_secs(1) && after < Duration::from_millis(2500),
        "will after {after:?}, expected ~1 s"
    );
    eventually("session we ended", || {
        b.broker.registry.with_offline("we", |_| ()).is_none()
    })
    .await;

    let mut connect = v5_connect("w0", true);
    connect.will = Some(v5_will("will/w0", b"gone", 5));
    drop(b.v5_client(connect, false).await);
    let closed = Instant::now();
    let w = obs.recv_publish().await;
    assert_eq!(w.topic, "will/w0");
    assert!(closed.elapsed() < Duration::from_millis(900));
    b.stop().await;
}

/// A takeover by a new connection (Clean Start 0) counts as a reconnect: a will with a delay
/// is not published [MQTT-3.1.3-9]. (With delay 0 the old connection's will goes at once.)
#[tokio::test]
async fn takeover_counts_as_reconnect_for_will_delay() {
    let b = TestBroker::start().await;
    let mut obs = will_observer(&b).await;
    let mut connect = v5_connect_expiry("wt", true, Some(60));
    connect.will = Some(v5_will("will/wt", b"gone", 2));
    let mut old = b.v5_client(connect, false).await;
    let mut new = b
        .v5_client(v5_connect_expiry("wt", false, Some(60)), true)
        .await;
    assert_eq!(
        old.expect_disconnect().await.reason,
        ReasonCode::SESSION_TAKEN_OVER
    );
    assert!(b.broker.registry.timers.is_empty());
    new.disconnect_v5(ReasonCode::NORMAL_DISCONNECTION, None)
        .await;
    b.wait_offline("wt").await;
    assert_eq!(
        b.broker
            .registry
            .with_offline("wt", |s| s.pending_will.is_none()),
        Some(true)
    );
    obs.expect_silence(Duration::from_millis(2500)).await;
    assert_eq!(wills(&b), 0);

    // Control: the same with delay 0 publishes the old connection's will at the takeover.
    let mut connect = v5_connect_expiry("wt0", true, Some(60));
    connect.will = Some(v5_will("will/wt0", b"gone", 0));
    let mut old = b.v5_client(connect, false).await;
    let _new = b
        .v5_client(v5_connect_expiry("wt0", false, Some(60)), true)
        .await;
    assert_eq!(
        old.expect_disconnect().await.reason,
        ReasonCode::SESSION_TAKEN_OVER
    );
    assert_eq!(obs.recv_publish().await.topic, "will/wt0");
    b.stop().await;
}

/// [MQTT-3.1.2-8] / section 3.14.2.1: DISCONNECT 0x04 publishes the will, 0x00 deletes it.
#[tokio::test]
async fn disconnect_with_will_message_publishes_it_normal_does_not() {
    let b = TestBroker::start().await;
    let mut obs = will_observer(&b).await;

    let mut connect = v5_connect("normal", true);
    connect.will = Some(v5_will("will/normal", b"gone", 0));
    let mut c = b.v5_client(connect, false).await;
    c.disconnect_v5(ReasonCode::NORMAL_DISCONNECTION, None)
        .await;
    c.expect_closed().await;
    eventually("normal ended", || !b.broker.registry.is_online("normal")).await;

    let mut connect = v5_connect("withwill", true);
    connect.will = Some(v5_will("will/withwill", b"gone", 0));
    let mut c = b.v5_client(connect, false).await;
    c.disconnect_v5(ReasonCode::DISCONNECT_WITH_WILL, None)
        .await;
    c.expect_closed().await;
    // The first will to arrive must be the 0x04 one: the 0x00 one was deleted.
    let w = obs.recv_publish().await;
    assert_eq!(w.topic, "will/withwill");
    obs.expect_silence(QUIET).await;
    assert_eq!(wills(&b), 1);
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Takeover DISCONNECT
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.4-3] The connected v5 client receives DISCONNECT 0x8E before its connection is
/// closed, whether a 5.0 or a 3.1.1 client takes over. (rumqttc 0.25.1 is not used here: it
/// cannot decode the legal 3-byte DISCONNECT `e0 01 8e`, section 3.14.2.2.1, and reports
/// ConnectionAborted.)
#[tokio::test]
async fn takeover_sends_session_taken_over_to_the_old_client() {
    let b = TestBroker::start().await;
    let mut old = b
        .v5_client(v5_connect_expiry("victim", false, Some(60)), false)
        .await;
    old.sub_v5(1, "victim/t", QoS::AtLeastOnce).await;
    let _new = b
        .v5_client(v5_connect_expiry("victim", false, Some(60)), true)
        .await;
    let d = old.expect_disconnect().await;
    assert_eq!(d.reason, ReasonCode::SESSION_TAKEN_OVER);

    // A 3.1.1 client taking over a v5 one: the v5 client still gets 0x8E.
    let mut v5 = b
        .v5_client(v5_connect_expiry("mixed-to", false, Some(60)), false)
        .await;
    let mut v3 = b.raw().await;
    v3.send(&connect_v311("mixed-to", false, 60)).await;
    v3.expect_bytes(&[0x20, 0x02, 0x01, 0x00]).await;
    assert_eq!(
        v5.expect_disconnect().await.reason,
        ReasonCode::SESSION_TAKEN_OVER
    );
    b.stop().await;
}
