//! Expiry timers and the session registry's offline path.
//!
//! * `Timers::arm` / `Timers::cancel` with 100k and 1M deadlines already armed;
//! * `Timers::take_due` draining 100k / 1M deadlines, 1000 due per call (the timer task's
//!   pattern), reported per timer taken;
//! * registry churn with no takeover: a parked session resumed and parked again (claim +
//!   park, which disarms and re-arms its expiry), on one thread and on both cores; a new
//!   persistent client connecting and parking; a clean-session connect and disconnect.
//!
//! `cargo bench --bench timers [-- <filter>]`

#[path = "harness/mod.rs"]
mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant as WallClock};

use harness::{black_box, count_label, Harness, Rng};
use tether::broker::Broker;
use tether::config::Config;
use tether::session::expiry::{Timer, TimerKind, Timers};
use tether::session::registry::{Claim, Parked, Registry};
use tether::wire::packet::ProtocolVersion;
use tokio::time::Instant;

/// Session expiry used for parked sessions: long enough never to fire during a run.
const EXPIRY_SECS: u32 = 3600;

fn client_ids(prefix: &str, n: usize) -> Vec<Arc<str>> {
    (0..n).map(|i| Arc::from(format!("{prefix}{i}"))).collect()
}

/// A deadline somewhere in the next hour, to the nanosecond, so inserts land all over the set.
fn timer(base: Instant, rng: &mut Rng, client_id: &Arc<str>, generation: u64) -> Timer {
    Timer::new(
        base + Duration::from_nanos(rng.next() % 3_600_000_000_000),
        generation,
        client_id.clone(),
        TimerKind::SessionExpiry,
    )
}

fn bench_arm_cancel(h: &mut Harness, armed: usize) {
    let label = count_label(armed);
    let (arm, cancel) = (
        format!("Timers::arm, {label} armed"),
        format!("Timers::cancel, {label} armed"),
    );
    if !h.wants(&arm) && !h.wants(&cancel) {
        return;
    }
    let base = Instant::now();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let ids = client_ids("t", armed);
    let timers = Timers::default();
    for (g, id) in ids.iter().enumerate() {
        timers.arm(timer(base, &mut rng, id, g as u64));
    }
    let extra = client_ids("x", 10_000);
    let mut generation = armed as u64;
    let mut batch: Vec<Timer> = Vec::new();
    let mut make_batch = |n: u64, batch: &mut Vec<Timer>| {
        batch.clear();
        for i in 0..n as usize {
            generation += 1;
            batch.push(timer(base, &mut rng, &extra[i % extra.len()], generation));
        }
    };

    // Arm a batch on top of `armed` (timed), then cancel it again (untimed): the set stays
    // between `armed` and `armed` + 10k.
    h.bench_custom(&arm, 10_000, |n| {
        make_batch(n, &mut batch);
        let start = WallClock::now();
        for t in batch.iter().cloned() {
            timers.arm(t);
        }
        let elapsed = start.elapsed();
        for t in &batch {
            timers.cancel(t);
        }
        elapsed
    });
    h.bench_custom(&cancel, 10_000, |n| {
        make_batch(n, &mut batch);
        for t in batch.iter().cloned() {
            timers.arm(t);
        }
        let start = WallClock::now();
        for t in &batch {
            timers.cancel(black_box(t));
        }
        start.elapsed()
    });
    assert_eq!(timers.len(), armed);
}

/// Arm `armed` deadlines 1 ms apart, then drain them with `take_due` advancing 1 s a call.
fn bench_take_due(h: &mut Harness, armed: usize, rounds: usize) {
    let label = count_label(armed);
    let ids = client_ids("t", armed);
    let name = format!("Timers::take_due, drain {label}, 1000/call (per timer)");
    if !h.wants(&name) {
        return;
    }
    let mut total = Duration::ZERO;
    let mut taken = 0u64;
    for _ in 0..rounds {
        let timers = Timers::default();
        let base = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            timers.arm(Timer::new(
                base + Duration::from_millis(i as u64),
                i as u64,
                id.clone(),
                TimerKind::SessionExpiry,
            ));
        }
        let start = WallClock::now();
        let mut now = base;
        while !timers.is_empty() {
            now += Duration::from_secs(1);
            let due = timers.take_due(now);
            taken += due.len() as u64;
            black_box(due);
        }
        total += start.elapsed();
    }
    assert_eq!(taken, (armed * rounds) as u64);
    h.record(&name, taken, total);
}

/// A registry with `parked` offline sessions, each with its expiry armed.
fn parked_registry(broker: &Broker, registry: &Registry, ids: &[Arc<str>]) {
    let now = Instant::now();
    for id in ids {
        let s = broker.new_session(id.clone(), ProtocolVersion::V5, EXPIRY_SECS);
        assert!(registry.insert_offline(s, now));
    }
}

/// Claim (resume) a parked session and park it again: one reconnect of a persistent client
/// without a takeover, as the registry sees it.
fn resume_and_park(
    registry: &Registry,
    id: &Arc<str>,
    control: &tether::session::registry::ControlTx,
) {
    let Claim::Resumed {
        generation,
        session,
    } = registry.claim(id, control)
    else {
        panic!("{id} should be parked")
    };
    let parked = registry.park(generation, session, Instant::now());
    assert!(matches!(parked, Parked::Offline));
}

fn bench_registry(h: &mut Harness, parked: usize) {
    let label = count_label(parked);
    let names = [
        format!("registry resume+park (claim, park), {label} parked"),
        format!("registry resume+park, 2 threads, {label} parked"),
        format!("registry connect+park new session, {label} parked"),
    ];
    if !names.iter().any(|n| h.wants(n)) {
        return;
    }
    let broker = Broker::new(Arc::new(Config::default()));
    let registry = Registry::new();
    let ids = client_ids("c", parked);
    parked_registry(&broker, &registry, &ids);
    let (control, _rx) = tether::session::registry::control_channel();

    let mut rng = Rng(0x5151_5151_5151_5151);
    h.bench(&names[0], || {
        let id = &ids[(rng.next() % ids.len() as u64) as usize];
        resume_and_park(&registry, id, &control);
    });

    // Both cores, each on its own half of the Client IDs (no takeovers); ns/op is wall time
    // per cycle of the pair, so ops/s is the aggregate.
    let (left, right) = ids.split_at(ids.len() / 2);
    h.bench_custom(&names[1], u64::MAX, |n| {
        let start = WallClock::now();
        std::thread::scope(|s| {
            for (half, seed, cycles) in [(left, 1u64, n - n / 2), (right, 2u64, n / 2)] {
                let registry = &registry;
                let control = control.clone();
                s.spawn(move || {
                    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    for _ in 0..cycles {
                        let id = &half[(rng.next() % half.len() as u64) as usize];
                        resume_and_park(registry, id, &control);
                    }
                });
            }
        });
        start.elapsed()
    });

    // A new persistent client: claim a free Client ID, park its new session (arms expiry).
    // The batch is removed again untimed, so the registry stays at `parked`.
    let fresh = client_ids("new", 10_000);
    h.bench_custom(&names[2], fresh.len() as u64, |n| {
        let batch = &fresh[..n as usize];
        let sessions: Vec<_> = batch
            .iter()
            .map(|id| broker.new_session(id.clone(), ProtocolVersion::V5, EXPIRY_SECS))
            .collect();
        let start = WallClock::now();
        for (id, session) in batch.iter().zip(sessions) {
            let Claim::Fresh { generation } = registry.claim(id, &control) else {
                panic!("{id} should be free")
            };
            let parked = registry.park(generation, session, Instant::now());
            assert!(matches!(parked, Parked::Offline));
        }
        let elapsed = start.elapsed();
        for id in batch {
            let session = registry.remove_offline(id).expect("parked");
            broker.end_session(session);
        }
        elapsed
    });
    assert_eq!(registry.len(), parked);
    assert_eq!(registry.timers.len(), parked);
}

/// Clean session (expiry 0): claim, new session, park (which ends it), end_session.
fn bench_clean_cycle(h: &mut Harness) {
    let broker = Broker::new(Arc::new(Config::default()));
    let (control, _rx) = tether::session::registry::control_channel();
    let id: Arc<str> = Arc::from("clean");
    h.bench(
        "broker clean connect+disconnect (claim..end_session)",
        || {
            let Claim::Fresh { generation } = broker.registry.claim(&id, &control) else {
                panic!("clean session left behind")
            };
            let session = broker.new_session(id.clone(), ProtocolVersion::V311, 0);
            match broker.registry.park(generation, session, Instant::now()) {
                Parked::Ended(session) => broker.end_session(session),
                other => panic!("expected Ended, got {other:?}"),
            }
        },
    );
    assert!(broker.registry.is_empty());
}

fn main() {
    let Some(mut h) = Harness::from_args("timers") else {
        return;
    };
    let (k100, m1) = (h.size(100_000), h.size(1_000_000));
    bench_arm_cancel(&mut h, k100);
    bench_arm_cancel(&mut h, m1);
    bench_take_due(&mut h, k100, 10);
    bench_take_due(&mut h, m1, 2);
    bench_registry(&mut h, k100);
    bench_registry(&mut h, m1);
    bench_clean_cycle(&mut h);
    h.note("registry cases use v5 sessions with a 3600 s expiry, so every park arms a timer");
    h.note("\"2 threads\": ns/op is wall time per cycle with both threads running (aggregate)");
    h.finish();
}
