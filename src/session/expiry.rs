//! Deadlines for parked sessions: session expiry and (v5) will delay.
//!
//! One ordered set of `(deadline, generation, client id, kind)` and one task that sleeps until
//! the earliest entry, woken early through a `Notify` when an earlier deadline is armed. Entries
//! are ordered by absolute deadline, never by interval, so a short delay armed later can never
//! hold back an overdue one. "Never" has no entry at all. Each entry carries the registry
//! generation it was armed for; the registry ignores it when the slot has moved on, so a
//! Client ID reused in the meantime is never expired by an old timer.

use std::collections::BTreeSet;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// What a deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerKind {
    /// The session ends (its expiry interval or the 3.1.1 lifetime bound passed).
    SessionExpiry,
    /// The delayed will is published.
    WillDelay,
}

/// A point in time in 8 bytes instead of an `Instant`'s 16, with a free niche so an
/// `Option<Deadline>` is 8 bytes too: a million parked sessions each keep two of them in their
/// registry slot and one per armed timer. Nanoseconds (plus one) since a base fixed on first
/// use, so converting back gives the very same `Instant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(NonZeroU64);

/// The base of every `Deadline`, set on first use a day (or as much as the clock allows)
/// before that moment: a deadline earlier than the base is already past, and is kept as the
/// base itself, which is just as past.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(|| {
        let now = Instant::now();
        [86_400, 3_600, 60, 1]
            .into_iter()
            .find_map(|s| now.checked_sub(Duration::from_secs(s)))
            .unwrap_or(now)
    })
}

impl Deadline {
    /// The deadline at `at`.
    pub fn at(at: Instant) -> Deadline {
        let nanos = at.saturating_duration_since(base()).as_nanos();
        let n = u64::try_from(nanos)
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        Deadline(NonZeroU64::new(n).unwrap_or(NonZeroU64::MIN))
    }

    /// As an `Instant`.
    pub fn instant(self) -> Instant {
        base() + Duration::from_nanos(self.0.get() - 1)
    }
}

impl From<Instant> for Deadline {
    fn from(at: Instant) -> Deadline {
        Deadline::at(at)
    }
}

/// One armed deadline: 32 bytes, fixed size. Ordered by deadline first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timer {
    at: Deadline,
    /// The generation shifted left by one, the kind in the low bit: generations are counted
    /// from 1 and never come near 2^63.
    tag: u64,
    client_id: Arc<str>,
}

impl Timer {
    /// The deadline `at` of `kind` for `client_id`'s session as armed for `generation`.
    pub fn new(
        at: impl Into<Deadline>,
        generation: u64,
        client_id: Arc<str>,
        kind: TimerKind,
    ) -> Timer {
        Timer {
            at: at.into(),
            tag: generation << 1 | u64::from(kind == TimerKind::WillDelay),
            client_id,
        }
    }

    /// When it fires.
    pub fn at(&self) -> Instant {
        self.at.instant()
    }

    /// When it fires, as stored.
    pub fn deadline(&self) -> Deadline {
        self.at
    }

    /// The registry generation it was armed for.
    pub fn generation(&self) -> u64 {
        self.tag >> 1
    }

    /// Whose session.
    pub fn client_id(&self) -> &Arc<str> {
        &self.client_id
    }

    /// What to do.
    pub fn kind(&self) -> TimerKind {
        if self.tag & 1 == 1 {
            TimerKind::WillDelay
        } else {
            TimerKind::SessionExpiry
        }
    }
}

/// The ordered set of deadlines. Shared by the registry (which arms and cancels under its
/// shard locks) and the timer task; the std mutex is held only for a B-tree insert, remove or
/// pop, never across an `.await`.
#[derive(Debug, Default)]
pub struct Timers {
    set: Mutex<BTreeSet<Timer>>,
    notify: Notify,
}

impl Timers {
    fn lock(&self) -> MutexGuard<'_, BTreeSet<Timer>> {
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arm a deadline; wakes the timer task if it is now the earliest.
    pub fn arm(&self, timer: Timer) {
        let earliest = {
            let mut set = self.lock();
            let earlier = set.first().is_none_or(|first| timer < *first);
            set.insert(timer);
            earlier
        };
        if earliest {
            self.notify.notify_one();
        }
    }

    /// Disarm a deadline armed earlier (a session resumed before it expired).
    pub fn cancel(&self, timer: &Timer) {
        self.lock().remove(timer);
    }

    /// Deadlines armed now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nothing is armed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remove and return every deadline at or before `now`, earliest first.
    pub fn take_due(&self, now: Instant) -> Vec<Timer> {
        let mut set = self.lock();
        let mut due = Vec::new();
        let now = Deadline::at(now);
        while set.first().is_some_and(|t| t.at <= now) {
            if let Some(t) = set.pop_first() {
                due.push(t);
            }
        }
        due
    }

    /// The earliest deadline, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock().first().map(Timer::at)
    }

    /// Wait until the earliest deadline passes or a new earliest one is armed. The caller
    /// loops: `wait`, then `take_due`.
    pub async fn wait(&self) {
        let notified = self.notify.notified();
        match self.next_deadline() {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn timer(at: Instant, id: &str, generation: u64) -> Timer {
        Timer::new(at, generation, id.into(), TimerKind::SessionExpiry)
    }

    #[test]
    fn a_deadline_gives_back_its_instant_and_a_timer_its_parts() {
        let t0 = Instant::now();
        for at in [
            t0,
            t0 + Duration::from_nanos(1),
            t0 + Duration::from_secs(600),
        ] {
            assert_eq!(Deadline::at(at).instant(), at);
        }
        assert!(Deadline::at(t0) < Deadline::at(t0 + Duration::from_nanos(1)));
        let t = Timer::new(t0, 7, "c".into(), TimerKind::WillDelay);
        assert_eq!(
            (t.at(), t.generation(), &**t.client_id(), t.kind()),
            (t0, 7, "c", TimerKind::WillDelay)
        );
        assert_eq!(std::mem::size_of::<Timer>(), 32);
        assert_eq!(std::mem::size_of::<Option<Deadline>>(), 8);
    }

    #[test]
    fn due_timers_come_out_in_deadline_order_not_arming_order() {
        let t0 = Instant::now();
        let timers = Timers::default();
        timers.arm(timer(t0 + Duration::from_secs(100), "long", 1));
        timers.arm(timer(t0 + Duration::from_secs(5), "short", 2));
        timers.arm(timer(t0 + Duration::from_secs(50), "mid", 3));
        let due = timers.take_due(t0 + Duration::from_secs(60));
        let ids: Vec<&str> = due.iter().map(|t| &**t.client_id()).collect();
        assert_eq!(ids, ["short", "mid"]);
        assert_eq!(timers.len(), 1);
    }

    #[test]
    fn cancelled_timers_never_fire() {
        let t0 = Instant::now();
        let timers = Timers::default();
        let t = timer(t0, "a", 1);
        timers.arm(t.clone());
        timers.cancel(&t);
        assert!(timers.take_due(t0 + Duration::from_secs(1)).is_empty());
        assert!(timers.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_wakes_for_an_earlier_deadline_armed_later() {
        let timers = Arc::new(Timers::default());
        let t0 = Instant::now();
        timers.arm(timer(t0 + Duration::from_secs(3600), "late", 1));
        let waiter = {
            let timers = timers.clone();
            tokio::spawn(async move {
                loop {
                    timers.wait().await;
                    let due = timers.take_due(Instant::now());
                    if !due.is_empty() {
                        return (Instant::now(), due);
                    }
                }
            })
        };
        tokio::task::yield_now().await;
        timers.arm(timer(t0 + Duration::from_secs(2), "early", 2));
        let (fired_at, due) = waiter.await.unwrap();
        assert_eq!(&**due[0].client_id(), "early");
        assert!(
            fired_at - t0 < Duration::from_secs(3),
            "fired late: {:?}",
            fired_at - t0
        );
    }
}
