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
