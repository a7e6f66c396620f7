//! The acceptor: a bounded number of connections served at once.
mod common;

use std::time::Duration;

use common::*;
use tether::config::Config;

/// With `listener.max_connections = 2`, a third client is not served (no CONNACK) until one of
/// the first two leaves; then it is.
#[tokio::test]
async fn connections_beyond_the_limit_wait_until_a_slot_frees() {
    let mut cfg = Config::default();
    cfg.listener.max_connections = 2;
    let b = TestBroker::with_config(cfg).await;

    let mut first = b.raw().await;
    first.send(&connect_v311("first", true, 0)).await;
    first.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    let mut second = b.raw().await;
    second.send(&connect_v311("second", true, 0)).await;
    second.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;

    let mut third = b.raw().await;
    third.send(&connect_v311("third", true, 0)).await;
    third.expect_silence(Duration::from_millis(300)).await;

    // DISCONNECT frees a slot; the waiting client is then accepted and answered.
    first.send(&[0xe0, 0x00]).await;
    first.expect_closed().await;
    third.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    b.stop().await;
}

/// `session.max_sessions = 2`: a third Client ID is refused (3.1.1 CONNACK 0x03, counted),
/// while an existing session can still be resumed.
#[tokio::test]
async fn sessions_beyond_the_limit_are_refused_but_resuming_works() {
    let mut cfg = Config::default();
    cfg.session.max_sessions = 2;
    let b = TestBroker::with_config(cfg).await;
    for id in ["s1", "s2"] {
        let mut c = b.raw().await;
        c.send(&connect_v311(id, false, 0)).await;
        c.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
        c.send(&[0xe0, 0x00]).await;
        c.expect_closed().await;
    }
    eventually("both sessions parked", || {
        b.broker.registry.offline_count() == 2
    })
    .await;

    let mut third = b.raw().await;
    third.send(&connect_v311("s3", true, 0)).await;
    third.expect_bytes(&[0x20, 0x02, 0x00, 0x03]).await;
    third.expect_closed().await;
    assert_eq!(
        tether::stats::Stats::get(&b.broker.stats.sessions_refused),
        1
    );

    let mut again = b.raw().await;
    again.send(&connect_v311("s1", false, 0)).await;
    again.expect_bytes(&[0x20, 0x02, 0x01, 0x00]).await;
    b.stop().await;
}
