//! Matching a published topic against the topic-filter index, and routing a message to its
//! subscribers' queues.
//!
//! * `TopicIndex::for_each_match` with 10k and 100k filters, 80 % exact and 20 % wildcard
//!   (`+` at the end, `+` in the middle, `#`, `+` first), each held by its own client; and
//!   with 100k exact filters only (the index skips the trie then). Reported per match call.
//! * `Router::route` of one message to 1 and to 50 subscribers (queued into their mailboxes).
//!
//! `cargo bench --bench topic_match [-- <filter>]`

#[path = "harness/mod.rs"]
mod harness;

use std::sync::Arc;
use std::time::Instant as WallClock;

use bytes::Bytes;
use harness::{black_box, count_label, Harness, Rng};
use tether::config::OverflowPolicy;
use tether::routing::index::TopicIndex;
use tether::routing::router::{Router, SubEntry};
use tether::session::mailbox::{Mailbox, QueueLimits};
use tether::session::Subscription;
use tether::stats::Stats;
use tether::wire::message::Message;
use tether::wire::packet::{QoS, RetainHandling};

/// Devices per tenant; filter `i` belongs to tenant `i / DEVICES`, device `i % DEVICES`.
const DEVICES: usize = 100;

/// The filter of client `i`: exact for 8 in 10, otherwise one of five wildcard shapes.
fn filter_of(i: usize, wildcards: bool) -> String {
    let (t, d) = (i / DEVICES, i % DEVICES);
    if !wildcards || i % 10 < 8 {
        return format!("tenant/{t}/device/{d}/telemetry");
    }
    match (i % 10, (i / 10) % 4) {
        (8, _) => format!("tenant/{t}/device/{d}/+"),
        (_, 0) => format!("tenant/{t}/device/+/alerts"),
        (_, 1) => format!("tenant/{t}/#"),
        (_, 2) => format!("+/{t}/device/{d}/telemetry"),
        _ => format!("tenant/{t}/+/{d}/#"),
    }
}

fn bench_index(h: &mut Harness, filters: usize, wildcards: bool) {
    let label = format!(
        "{} filters, {}",
        count_label(filters),
        if wildcards {
            "20% wildcard"
        } else {
            "exact only"
        }
    );
    let index: TopicIndex<u32> = TopicIndex::new();
    for i in 0..filters {
        let key: Arc<str> = Arc::from(format!("c{i}"));
        index.insert(&filter_of(i, wildcards), &key, i as u32);
    }
    assert_eq!(index.len(), filters);
    // Publishes to existing devices: 3 in 4 telemetry, 1 in 4 alerts.
    let tenants = filters.div_ceil(DEVICES);
    let mut rng = Rng(0xDEAD_BEEF_CAFE_F00D);
    let topics: Vec<String> = (0..4096)
        .map(|k| {
            let t = rng.next() as usize % tenants;
            let d = rng.next() as usize % DEVICES;
            let leaf = if k % 4 == 3 { "alerts" } else { "telemetry" };
            format!("tenant/{t}/device/{d}/{leaf}")
        })
        .collect();
    let mut hits = 0u64;
    for topic in &topics {
        index.for_each_match(topic, |_, _| hits += 1);
    }
    h.note(format!(
        "{label}: {:.2} matching entries per publish on average",
        hits as f64 / topics.len() as f64
    ));
    let mut k = 0;
    h.bench(&format!("TopicIndex match, {label}"), || {
        k = (k + 1) % topics.len();
        let mut n = 0u32;
        index.for_each_match(black_box(&topics[k]), |_, v| n = n.wrapping_add(*v));
        n
    });
}

fn bench_route(h: &mut Harness, subscribers: usize) {
    let router = Router::default();
    let stats = Stats::default();
    let limits = QueueLimits {
        max_messages: usize::MAX,
        max_bytes: usize::MAX,
        overflow: OverflowPolicy::DropNew,
        queue_qos0_offline: true,
        slow_drop_qos0: true,
    };
    let sub = Subscription {
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: RetainHandling::OnSubscribe,
        identifier: None,
    };
    let mailboxes: Vec<Arc<Mailbox>> = (0..subscribers)
        .map(|i| {
            let mailbox = Arc::new(Mailbox::new(limits));
            mailbox.set_online(true);
            let client_id: Arc<str> = Arc::from(format!("sub{i}"));
            router.subscribe(
                &client_id,
                "bench/route/topic",
                SubEntry {
                    mailbox: mailbox.clone(),
                    sub,
                },
            );
            mailbox
        })
        .collect();
    let msg = Arc::new(Message {
        topic: "bench/route/topic".to_string(),
        payload: Bytes::from(vec![7u8; 64]),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
        expires_at: None,
        publisher: None,
        stored: Default::default(),
        encoded: Default::default(),
    });
    // Route a batch (timed), then empty the queues (untimed) so they do not grow unbounded.
    h.bench_custom(
        &format!("Router::route to {subscribers} subscriber(s)"),
        10_000,
        |n| {
            let start = WallClock::now();
            for _ in 0..n {
                let queued = router.route(black_box(&msg), &stats);
                debug_assert_eq!(queued, subscribers);
            }
            let elapsed = start.elapsed();
            for mailbox in &mailboxes {
                let mut popped = 0;
                while mailbox.pop().is_some() {
                    popped += 1;
                }
                assert_eq!(popped, n);
            }
            elapsed
        },
    );
}

fn main() {
    let Some(mut h) = Harness::from_args("topic_match") else {
        return;
    };
    let (k10, k100) = (h.size(10_000), h.size(100_000));
    bench_index(&mut h, k10, true);
    bench_index(&mut h, k100, true);
    bench_index(&mut h, k100, false);
    bench_route(&mut h, 1);
    bench_route(&mut h, 50);
    h.note("route: QoS 1 message, 64-byte payload, subscribers on one exact filter, online queues");
    h.finish();
}
