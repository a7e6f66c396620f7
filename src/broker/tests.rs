//! The broker's timers against a recording journal: what expiry and a delayed will write, on
//! paused time.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Broker;
use crate::config::Config;
use crate::session::journal::recording::{Rec, Recording};
use crate::session::journal::{ImageKind, SessionJournal};
use crate::session::registry::Parked;
use crate::session::Subscription;
use crate::shutdown::Shutdown;
use crate::wire::packet::{ProtocolVersion, QoS, RetainHandling, Will};

/// A broker journaling to a recording, and its timer task running.
fn broker() -> (Arc<Broker>, Arc<Recording>, crate::shutdown::Trigger) {
    let rec = Recording::new();
    let broker = Broker::with_journal(Arc::new(Config::default()), rec.clone());
    let (stop, shutdown) = Shutdown::new();
    tokio::spawn(broker.clone().run_timers(shutdown));
    (broker, rec, stop)
}

/// Park a durable session of `id` with one subscription, `expiry` seconds and `will`, as a
/// connection ending would (image first, then the registry).
fn park(broker: &Arc<Broker>, id: &str, expiry: u32, will: Option<Will>) {
    let mut s = broker.new_session(id.into(), ProtocolVersion::V5, expiry);
    let handle = SessionJournal::attach(&broker.journal);
    s.journal = handle.clone();
    s.set_journal(handle, 1);
    let sub = Subscription {
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: RetainHandling::OnSubscribe,
        identifier: None,
    };
    broker.subscribe(&mut s, "a/#".into(), sub);
    s.journal_image(ImageKind::Parked, will.as_ref(), Some(1));
    s.pending_will = will.into();
    assert!(matches!(
        broker.registry.park_orphan(s, Instant::now()),
        Parked::Offline
    ));
}

/// Let the timer task run until `rec` holds `n` events (or fail after a generous bound).
async fn events(rec: &Recording, n: usize) -> Vec<Rec> {
    let mut got = Vec::new();
    for _ in 0..1000 {
        got.extend(rec.take_events());
        if got.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    got
}

#[tokio::test(start_paused = true)]
async fn expiry_ends_the_session_in_the_journal_once() {
    let (broker, rec, _stop) = broker();
    park(&broker, "c", 2, None);
    assert_eq!(
        rec.take_events(),
        vec![Rec::Image(
            ImageKind::Parked,
            "c".into(),
            true,
            vec!["a/#".into()]
        )]
    );
    tokio::time::sleep(Duration::from_millis(1900)).await;
    assert_eq!(rec.take_events(), vec![], "not before its expiry");
    // [MQTT-3.1.2-23]: the session is kept for the interval, then deleted.
    assert_eq!(events(&rec, 1).await, vec![Rec::Ended]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(rec.take_events(), vec![], "ended once");
    assert!(!broker.registry.contains("c"));
}

#[tokio::test(start_paused = true)]
async fn a_delayed_will_is_journaled_gone_before_the_session_ends() {
    let (broker, rec, _stop) = broker();
    let will = Will {
        topic: "will/c".into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        delay_interval: 1,
        properties: Default::default(),
    };
    park(&broker, "c", 5, Some(will));
    rec.take_events();
    // The will delay passes first: the image without the will is journaled (a restart must
    // not publish it again), then the session expires.
    let got = events(&rec, 2).await;
    assert_eq!(
        got,
        vec![
            Rec::Image(ImageKind::Changed, "c".into(), true, vec!["a/#".into()]),
            Rec::Ended
        ]
    );
}
