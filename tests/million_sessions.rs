//! Scale: a million sessions parked offline with expiry deadlines (in the registry, no sockets)
//! all expire, none before its deadline, and everything they held is freed: registry slots,
//! timers, router entries, mailboxes and Client IDs. Prints the memory used and the time taken
//! (run with `--no-capture` to see the figures when the test passes).
//!
//! The real timer task (`Broker::run_timers`) fires the deadlines, under tokio's paused clock:
//! the runtime jumps from one deadline to the next, so 600 s of session lifetimes take only the
//! CPU time of the expiry work itself. The broker gives the memory back by itself (it trims
//! after a mass expiry); the test only waits for that, up to 10 s of wall time.
//!
//! A second test parks a million sessions that all subscribe to one command topic and queues
//! ten 64-byte QoS 1 messages for each (a broadcast to a sleeping fleet: the messages are
//! shared, each session queues its ten deliveries).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant as WallClock};

use tether::broker::Broker;
use tether::config::Config;
use tether::session::mailbox::Mailbox;
use tether::session::Subscription;
use tether::shutdown::Shutdown;
use tether::stats::Stats;
use tether::wire::message::Message;
use tether::wire::packet::{ProtocolVersion, QoS, RetainHandling};
use tokio::time::Instant;

const SESSIONS: u64 = 1_000_000;
/// Expiry intervals are spread evenly over 1..=MAX_EXPIRY seconds.
const MAX_EXPIRY: u64 = 600;
/// One session in this many keeps weak references, to prove its memory is released.
const SAMPLE_EVERY: u64 = 1000;
const MIB: f64 = 1024.0 * 1024.0;
/// RSS must be back under this within `GIVE_BACK` of the last expiry, the broker trimming.
const RSS_AFTER_EXPIRY: u64 = 50 * 1024 * 1024;
const GIVE_BACK: Duration = Duration::from_secs(10);
/// Messages queued per session in the second test.
const QUEUED: usize = 10;

fn expiry_of(i: u64) -> u32 {
    u32::try_from(1 + i % MAX_EXPIRY).expect("small")
}

/// One subscription per session: every fourth a wildcard filter (trie), the rest exact
/// (hash map), all distinct so the index really holds a million entries.
fn filter_of(i: u64) -> String {
    if i % 4 == 0 {
        format!("fleet/{i}/+/cmd")
    } else {
        format!("fleet/{i}/inbox")
    }
}

/// Sessions whose deadline is at or before `secs` after parking.
fn due_by(secs: u64) -> u64 {
    let secs = secs.min(MAX_EXPIRY);
    (SESSIONS / MAX_EXPIRY) * secs + (SESSIONS % MAX_EXPIRY).min(secs)
}

/// Resident set size of this process, from /proc/self/status (Linux); None elsewhere.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "n/a".to_string(),
        |b| format!("{:.1} MiB", b as f64 / MIB),
    )
}

/// Hand freed heap back to the kernel so the RSS after expiry shows what is really still
/// allocated, not what glibc's malloc keeps cached in its arenas.
fn trim_heap() {
    tether::memory::trim();
}

fn assert_live(broker: &Broker, live: u64, at: &str) {
    let live = usize::try_from(live).expect("fits");
    assert_eq!(broker.registry.len(), live, "sessions in the registry {at}");
    assert_eq!(broker.registry.timers.len(), live, "armed timers {at}");
    assert_eq!(broker.router.len(), live, "router entries {at}");
}

#[tokio::test(start_paused = true)]
async fn a_million_parked_sessions_all_expire_on_time_and_are_freed() {
    let rss_start = rss_bytes();
    let broker = Broker::new(Arc::new(Config::default()));
    let sub = Subscription {
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: RetainHandling::OnSubscribe,
        identifier: None,
    };

    // Park: each session gets one subscription, in the session and in the router, as
    // `Protocol::on_subscribe` does, then goes offline with its expiry armed.
    let t0 = Instant::now();
    let wall = WallClock::now();
    let mut samples: Vec<(u64, Weak<str>, Weak<Mailbox>)> = Vec::new();
    for i in 0..SESSIONS {
        let client_id: Arc<str> = format!("c{i}").into();
        let mut session = broker.new_session(client_id.clone(), ProtocolVersion::V5, expiry_of(i));
        let filter = filter_of(i);
        broker.subscribe(&mut session, filter, sub);
        if i % SAMPLE_EVERY == 0 {
            samples.push((
                i,
                Arc::downgrade(&client_id),
                Arc::downgrade(&session.mailbox),
            ));
        }
        assert!(broker.registry.insert_offline(session, t0), "c{i} is free");
    }
    let park_time = wall.elapsed();
    let rss_parked = rss_bytes();
    assert_live(&broker, SESSIONS, "after parking");
    assert_eq!(broker.registry.offline_count() as u64, SESSIONS);

    // Expire: the timer task runs; the test wakes half a second after every deadline (they
    // are whole seconds) and checks that exactly the sessions due by then are gone: none
    // early, none late.
    let (stop, shutdown) = Shutdown::new();
    let timers = tokio::spawn(broker.clone().run_timers(shutdown));
    let mut checkpoints: Vec<u64> = (0..=MAX_EXPIRY).collect();
    checkpoints.push(MAX_EXPIRY + 60);
    // At these, every single Client ID is looked up, not just counted.
    let full_checks = [1, MAX_EXPIRY / 2, MAX_EXPIRY - 1];
    let wall = WallClock::now();
    let mut check_time = Duration::ZERO;
    for &secs in &checkpoints {
        tokio::time::sleep_until(t0 + Duration::from_secs(secs) + Duration::from_millis(500)).await;
        let checking = WallClock::now();
        let gone = due_by(secs);
        let at = format!("at t0 + {secs}.5 s");
        assert_live(&broker, SESSIONS - gone, &at);
        assert_eq!(
            Stats::get(&broker.stats.sessions_expired),
            gone,
            "sessions expired {at}"
        );
        if full_checks.contains(&secs) {
            for i in 0..SESSIONS {
                let parked = broker
                    .registry
                    .with_offline(&format!("c{i}"), |_| ())
                    .is_some();
                assert_eq!(
                    parked,
                    u64::from(expiry_of(i)) > secs,
                    "c{i} (expiry {} s) {at}",
                    expiry_of(i)
                );
            }
        }
        check_time += checking.elapsed();
    }
    let expire_time = wall.elapsed() - check_time;
    stop.send(true).expect("timer task listening");
    timers.await.expect("timer task ends cleanly");

    assert_live(&broker, 0, "at the end");
    assert!(broker.registry.is_empty());
    assert!(broker.router.is_empty());
    assert!(broker.registry.timers.is_empty());
    assert_eq!(Stats::get(&broker.stats.sessions_expired), SESSIONS);
    // Nothing still holds a sampled session's Client ID (registry key, timer, router key,
    // session) or its mailbox (session, router entry).
    for (i, client_id, mailbox) in &samples {
        assert_eq!(
            client_id.strong_count(),
            0,
            "c{i}'s Client ID is still held"
        );
        assert_eq!(mailbox.strong_count(), 0, "c{i}'s mailbox is still held");
    }

    let secs = |d: Duration| d.as_secs_f64();
    // The broker's own trims run on the blocking pool in wall time: wait for them.
    let waiting = WallClock::now();
    let mut rss_expired = rss_bytes();
    while rss_expired.is_some_and(|b| b >= RSS_AFTER_EXPIRY) && waiting.elapsed() < GIVE_BACK {
        std::thread::sleep(Duration::from_millis(100));
        rss_expired = rss_bytes();
    }
    let give_back_time = waiting.elapsed();
    if let Some(b) = rss_expired {
        assert!(
            b < RSS_AFTER_EXPIRY,
            "RSS still {} {} s after the last expiry",
            mib(Some(b)),
            GIVE_BACK.as_secs()
        );
    }
    trim_heap();
    let rss_trimmed = rss_bytes();
    let per_session = match (rss_start, rss_parked) {
        (Some(a), Some(b)) => format!("{:.0} B", b.saturating_sub(a) as f64 / SESSIONS as f64),
        _ => "n/a".to_string(),
    };
    println!(
        "million_sessions: {SESSIONS} sessions, 1 subscription each, expiry 1..={MAX_EXPIRY} s"
    );
    println!("  RSS at start                  {}", mib(rss_start));
    println!(
        "  RSS with all parked           {} ({per_session} per session)",
        mib(rss_parked)
    );
    println!(
        "  RSS after expiry              {} (broker's trims, {:.1} s of waiting)",
        mib(rss_expired),
        secs(give_back_time)
    );
    println!("  RSS after expiry, malloc_trim {}", mib(rss_trimmed));
    println!(
        "  park all                      {:.2} s ({:.0} sessions/s)",
        secs(park_time),
        SESSIONS as f64 / secs(park_time)
    );
    println!(
        "  expire all (timer task)       {:.2} s ({:.0} sessions/s)",
        secs(expire_time),
        SESSIONS as f64 / secs(expire_time)
    );
    println!(
        "  checks at {} checkpoints     {:.2} s (not counted above)",
        checkpoints.len(),
        secs(check_time)
    );
}

#[tokio::test(start_paused = true)]
async fn a_million_parked_sessions_with_ten_queued_messages_each() {
    let rss_start = rss_bytes();
    let broker = Broker::new(Arc::new(Config::default()));
    let sub = Subscription {
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: RetainHandling::OnSubscribe,
        identifier: None,
    };
    let t0 = Instant::now();
    let wall = WallClock::now();
    for i in 0..SESSIONS {
        let client_id: Arc<str> = format!("c{i}").into();
        let mut session = broker.new_session(client_id, ProtocolVersion::V5, expiry_of(i));
        broker.subscribe(&mut session, "fleet/cmd".to_string(), sub);
        assert!(broker.registry.insert_offline(session, t0), "c{i} is free");
    }
    let park_time = wall.elapsed();
    let rss_parked = rss_bytes();

    let wall = WallClock::now();
    for n in 0..QUEUED {
        let msg = Message {
            topic: "fleet/cmd".to_string(),
            payload: bytes::Bytes::from(vec![u8::try_from(n).expect("small"); 64]),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            publisher: None,
            stored: Default::default(),
            encoded: Default::default(),
        };
        assert_eq!(
            broker.publish(msg),
            SESSIONS as usize,
            "every session matches"
        );
    }
    let queue_time = wall.elapsed();
    let rss_queued = rss_bytes();
    for i in (0..SESSIONS).step_by(usize::try_from(SAMPLE_EVERY).expect("fits")) {
        let queued = broker
            .registry
            .with_offline(&format!("c{i}"), |s| s.mailbox.len())
            .expect("parked");
        assert_eq!(queued, QUEUED, "c{i}'s queue");
    }
    let per = |b: Option<u64>| match (rss_start, b) {
        (Some(a), Some(b)) => format!("{:.0} B", b.saturating_sub(a) as f64 / SESSIONS as f64),
        _ => "n/a".to_string(),
    };
    println!(
        "million_sessions: {SESSIONS} sessions on one filter, {QUEUED} queued QoS 1 messages of 64 B each"
    );
    println!("  RSS at start                  {}", mib(rss_start));
    println!(
        "  RSS with all parked           {} ({} per session)",
        mib(rss_parked),
        per(rss_parked)
    );
    println!(
        "  RSS with {QUEUED} queued each      {} ({} per session)",
        mib(rss_queued),
        per(rss_queued)
    );
    println!(
        "  park all {:.2} s, queue all {:.2} s",
        park_time.as_secs_f64(),
        queue_time.as_secs_f64()
    );
    if let Some(b) = rss_queued {
        assert!(b <= 2 << 30, "{} is over 2 GiB", mib(Some(b)));
    }
}
