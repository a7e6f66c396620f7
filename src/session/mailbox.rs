//! A session's queue of messages not yet in flight, shared with every publisher.
//!
//! Publishers push into it from their own tasks (through the router, which holds an
//! `Arc<Mailbox>` per subscription); the session's connection task, while one is attached, pops
//! from it as its inflight window allows. The queue outlives connections: while the session is
//! offline it simply keeps filling, up to its limits, and a resuming connection drains it.
//! One object for both states means nothing routed during a takeover or a disconnect can fall
//! between two places.
//!
//! The lock is a std mutex: every critical section is a push or a pop of a few words, never
//! across an `.await`, and an async mutex would cost more than it could save.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;

use crate::auth::acl::ClientAcl;
use crate::auth::gate::epoch_tag;
use crate::config::{OverflowPolicy, SessionConfig};
use crate::session::journal::SessionJournal;
use crate::stats::Stats;
use crate::wire::message::Delivery;
use crate::wire::packet::QoS;

/// The limits of one queue, copied from the configuration when the session is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most messages queued.
    pub max_messages: usize,
    /// Most payload bytes queued.
    pub max_bytes: usize,
    /// What to drop at a limit.
    pub overflow: OverflowPolicy,
    /// Whether QoS 0 messages are queued while the session is offline.
    pub queue_qos0_offline: bool,
    /// Whether QoS 0 messages are dropped, not queued, while the queue is marked slow.
    pub slow_drop_qos0: bool,
}

impl From<&SessionConfig> for QueueLimits {
    fn from(c: &SessionConfig) -> Self {
        QueueLimits {
            max_messages: c.max_queued_messages,
            max_bytes: c.max_queued_bytes,
            overflow: c.queue_overflow,
            queue_qos0_offline: c.queue_qos0_offline,
            slow_drop_qos0: c.slow_consumer_drop_qos0,
        }
    }
}

/// `QueueLimits` as a queue keeps them: a million parked queues each carry a copy, so counts
/// are 32 bits (a limit above 4 G messages or 4 GiB is no limit at all for one queue).
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_messages: u32,
    max_bytes: u32,
    overflow: OverflowPolicy,
    queue_qos0_offline: bool,
    slow_drop_qos0: bool,
}

impl Limits {
    fn new(l: QueueLimits) -> Limits {
        let cap = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Limits {
            max_messages: cap(l.max_messages),
            max_bytes: cap(l.max_bytes),
            overflow: l.overflow,
            queue_qos0_offline: l.queue_qos0_offline,
            slow_drop_qos0: l.slow_drop_qos0,
        }
    }

    fn max_messages(&self) -> usize {
        self.max_messages as usize
    }

    fn max_bytes(&self) -> usize {
        self.max_bytes as usize
    }
}

/// The queued deliveries. Boxed, and given back when a session parks with nothing queued: an
/// empty queue then costs one pointer instead of a deque's four words.
// Boxed on purpose: that is what makes the empty queue one word.
#[allow(clippy::box_collection)]
#[derive(Debug, Default)]
struct Queue(Option<Box<VecDeque<Delivery>>>);

impl Queue {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn front(&self) -> Option<&Delivery> {
        self.0.as_ref()?.front()
    }

    fn push_back(&mut self, d: Delivery) {
        self.0.get_or_insert_with(Box::default).push_back(d);
    }

    fn pop_front(&mut self) -> Option<Delivery> {
        self.0.as_mut()?.pop_front()
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Delivery> {
        self.0.iter_mut().flat_map(|q| q.iter_mut())
    }

    fn clear(&mut self) {
        self.0 = None;
    }

    /// Free the deque if it is empty, or its spare capacity if not.
    fn release(&mut self) {
        match &mut self.0 {
            Some(q) if q.is_empty() => self.0 = None,
            Some(q) => q.shrink_to_fit(),
            None => {}
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    queue: Queue,
    bytes: usize,
    online: bool,
    closed: bool,
    /// Durable session: QoS 1/2 messages are written to the store as they are queued.
    journal: SessionJournal,
    /// Next stored-queue number.
    next_seq: u64,
    /// Deliveries taken by the connection so far: its progress, compared by a held-back
    /// publisher before and after its wait (see `mark_slow_if_stalled`). Wrapping 32 bits:
    /// only compared for equality across one wait, and the parked session stays small.
    pops: u32,
    /// Marked slow: a publisher waited the whole bound for this queue and it took nothing.
    /// A slow queue holds nobody back; cleared once it drains below half or (re)attaches.
    slow: bool,
    /// Messages this queue dropped at its limits or while slow (per-session counter).
    dropped: u64,
    /// The session's ACL rules as its last connection had them, with the ACL epoch they were
    /// made in: a message the client may not read is not queued, so it takes no queue space
    /// (and a shared group gives it to a member who may). Set by the connection task.
    acl: Option<Box<MailboxAcl>>,
    /// The attached connection task waiting in `notified`, woken by the next push.
    waiter: Option<Waker>,
    /// A push happened that no `notified` has seen yet (a permit, like `Notify::notify_one`).
    pushed: bool,
    /// Wakes publishers held back by this queue (`drained`); made when the first one waits,
    /// since most queues never hold anybody back.
    space: Option<Arc<Notify>>,
}

/// A session's ACL rules as its queue uses them while routing.
#[derive(Debug)]
pub struct MailboxAcl {
    /// The gate's ACL generation the rules were made in.
    pub generation: u64,
    /// The gate's generation counter: once it moves on, these rules are stale and routing
    /// stops applying them (the connection checks at delivery until it installs new ones).
    pub current: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The client's rules.
    pub rules: std::sync::Arc<ClientAcl>,
}

/// What happened to a pushed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Queued after dropping that many older messages (drop-oldest policy).
    QueuedDroppingOldest(usize),
    /// Dropped: queue full under the drop-new policy, or larger than the whole byte limit.
    DroppedFull,
    /// Dropped: QoS 0 for an offline session with `queue_qos0_offline = false`.
    DroppedQos0Offline,
    /// Dropped: QoS 0 for a queue marked slow (`slow_consumer_drop_qos0 = true`).
    DroppedSlow,
    /// Dropped: the session has ended.
    Closed,
    /// Not queued: the session's ACL does not let it read the topic.
    Denied,
}

/// The queue itself. Owned jointly (`Arc`) by the session, by each of its router entries, and
/// by whoever is delivering to it at the moment; freed when the last of them lets go.
#[derive(Debug)]
pub struct Mailbox {
    /// The queue and its state. The wake-ups live inside it too (`waiter`, `space`) rather
    /// than in two `Notify` beside it: they are taken under this lock anyway, and a parked
    /// queue then costs 104 bytes instead of 176.
    inner: Mutex<Inner>,
    limits: Limits,
}

impl Mailbox {
    /// An empty, offline queue.
    pub fn new(limits: QueueLimits) -> Mailbox {
        Mailbox {
            inner: Mutex::new(Inner::default()),
            limits: Limits::new(limits),
        }
    }

    /// Wake every publisher held back by this queue.
    fn wake_publishers(&self, q: MutexGuard<'_, Inner>) {
        let space = q.space.clone();
        drop(q);
        if let Some(space) = space {
            space.notify_waiters();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the queue half-updated in a way that
        // matters more than losing the broker, so recover the guard.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a delivery, applying the limits and counting what is dropped.
    pub fn push(&self, mut d: Delivery, stats: &Stats) -> Pushed {
        let size = d.size();
        let (outcome, waiter) = {
            let mut q = self.lock();
            if q.closed {
                return Pushed::Closed;
            }
            if let Some(acl) = q.acl.as_deref() {
                if acl.generation == acl.current.load(std::sync::atomic::Ordering::Acquire) {
                    if !acl.rules.can_receive(&d.msg.topic) {
                        // Counted by the caller: a shared group may still give it to another
                        // member, and then nothing was refused.
                        return Pushed::Denied;
                    }
                    // Checked under the installed rules, still current: the connection that
                    // installed them need not check again.
                    d.acl_epoch = epoch_tag(acl.generation);
                }
            }
            let outcome =
                if !q.online && d.qos == QoS::AtMostOnce && !self.limits.queue_qos0_offline {
                    Pushed::DroppedQos0Offline
                } else if q.slow && d.qos == QoS::AtMostOnce && self.limits.slow_drop_qos0 {
                    Pushed::DroppedSlow
                } else if size > self.limits.max_bytes() {
                    Pushed::DroppedFull
                } else {
                    let full = |q: &Inner| {
                        q.queue.len() >= self.limits.max_messages()
                            || q.bytes + size > self.limits.max_bytes()
                    };
                    let mut dropped = 0;
                    match self.limits.overflow {
                        OverflowPolicy::DropNew if full(&q) => Pushed::DroppedFull,
                        _ => {
                            while full(&q) {
                                let Some(old) = q.queue.pop_front() else {
                                    break;
                                };
                                q.bytes -= old.size();
                                dropped += 1;
                                q.journal.done(old.seq);
                            }
                            if d.qos != QoS::AtMostOnce && q.journal.is_attached() {
                                // Written under the queue lock, so the store sees a queue's
                                // messages in queue order and before anyone can pop them.
                                d.seq = q.next_seq;
                                q.next_seq += 1;
                                q.journal.enqueued(&d);
                            }
                            q.bytes += size;
                            q.dropped += dropped as u64;
                            q.queue.push_back(d);
                            if dropped > 0 {
                                Pushed::QueuedDroppingOldest(dropped)
                            } else {
                                Pushed::Queued
                            }
                        }
                    }
                };
            if matches!(outcome, Pushed::DroppedFull | Pushed::DroppedSlow) {
                q.dropped += 1;
            }
            let queued = matches!(outcome, Pushed::Queued | Pushed::QueuedDroppingOldest(_));
            // The permit is set under the same lock as the push, so the reader cannot miss it.
            q.pushed |= queued;
            let waiter = if queued { q.waiter.take() } else { None };
            (outcome, waiter)
        };
        if let Some(w) = waiter {
            w.wake();
        }
        match outcome {
            Pushed::Queued => {}
            Pushed::QueuedDroppingOldest(n) => {
                stats
                    .dropped_queue_full
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            Pushed::DroppedFull => Stats::incr(&stats.dropped_queue_full),
            Pushed::DroppedQos0Offline => Stats::incr(&stats.dropped_qos0_offline),
            Pushed::DroppedSlow => Stats::incr(&stats.dropped_slow_qos0),
            Pushed::Closed | Pushed::Denied => {}
        }
        outcome
    }

    /// Use `acl` to refuse messages while routing (`None`: no ACL configured), installed by
    /// the connection that owns the session now.
    pub fn set_acl(&self, acl: Option<MailboxAcl>) {
        let mut q = self.lock();
        // What is queued was checked against the previous rules (maybe another user's, before
        // a resume): the connection must check it again against its own.
        for d in q.queue.iter_mut() {
            d.acl_epoch = 0;
        }
        q.acl = acl.map(Box::new);
    }

    /// Take the oldest queued delivery.
    pub fn pop(&self) -> Option<Delivery> {
        let mut q = self.lock();
        let d = q.queue.pop_front()?;
        q.bytes -= d.size();
        q.pops = q.pops.wrapping_add(1);
        self.wake_if_drained(q, d.size());
        Some(d)
    }

    /// Take the oldest queued delivery if `accept` says the caller can handle it now (for
    /// instance: a QoS 1/2 message only while the inflight window has room). One lock for the
    /// look and the take.
    pub fn pop_if(&self, accept: impl FnOnce(&Delivery) -> bool) -> Option<Delivery> {
        let mut q = self.lock();
        if !accept(q.queue.front()?) {
            return None;
        }
        let d = q.queue.pop_front()?;
        q.bytes -= d.size();
        q.pops = q.pops.wrapping_add(1);
        self.wake_if_drained(q, d.size());
        Some(d)
    }

    /// Back-pressure: is this queue at least half full (messages or bytes) while a connection
    /// drains it? A publisher that just queued into such a queue stops reading until it
    /// drains (`drained`), so a slow subscriber slows its publishers instead of losing their
    /// messages at the limit. Offline, closed and slow queues never hold anyone back.
    pub fn congested(&self) -> bool {
        self.holds_back(&self.lock())
    }

    /// `congested` on a locked queue.
    fn holds_back(&self, q: &Inner) -> bool {
        q.online && !q.closed && !q.slow && self.over_half(q.queue.len(), q.bytes)
    }

    /// The connection's progress so far: how many deliveries it has taken. A publisher
    /// notes it when it starts waiting for this queue.
    pub fn progress(&self) -> u32 {
        self.lock().pops
    }

    /// A publisher waited the whole back-pressure bound for this queue: if the connection has
    /// taken nothing since `since` (its `progress` when the wait began) and the queue is still
    /// congested, mark it slow, so it holds nobody back from now on and only its own limits
    /// apply. True when this call marked it.
    pub fn mark_slow_if_stalled(&self, since: u32) -> bool {
        let mut q = self.lock();
        let stalled = q.pops == since && self.holds_back(&q);
        if stalled {
            q.slow = true;
        }
        stalled
    }

    /// Marked slow now (see `mark_slow_if_stalled`).
    pub fn is_slow(&self) -> bool {
        self.lock().slow
    }

    /// Messages this queue has dropped at its limits or while slow.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn over_half(&self, len: usize, bytes: usize) -> bool {
        len >= self.limits.max_messages().div_ceil(2)
            || bytes >= self.limits.max_bytes().div_ceil(2)
    }

    /// After a pop of `size` bytes: wake held-back publishers when that crossed below half.
    /// A slow queue that drains below half is normal again.
    fn wake_if_drained(&self, mut q: MutexGuard<'_, Inner>, size: usize) {
        let crossed = self.over_half(q.queue.len() + 1, q.bytes + size)
            && !self.over_half(q.queue.len(), q.bytes);
        if crossed || q.queue.is_empty() {
            q.slow = false;
        }
        if crossed {
            self.wake_publishers(q);
        }
    }

    /// Resolves once the queue is no longer `congested`.
    pub async fn drained(&self) {
        loop {
            let space = {
                let mut q = self.lock();
                if !self.holds_back(&q) {
                    return;
                }
                q.space.get_or_insert_with(Arc::default).clone()
            };
            let notified = space.notified();
            tokio::pin!(notified);
            // Registered before the check, so a drain in between is not missed.
            notified.as_mut().enable();
            if !self.congested() {
                return;
            }
            notified.await;
        }
    }

    /// Could this queue take a message right now without dropping anything, with a
    /// connection attached to drain it? (Shared subscriptions prefer such members.)
    pub fn can_take_now(&self) -> bool {
        let q = self.lock();
        q.online && !q.closed && q.queue.len() < self.limits.max_messages()
    }

    /// Journal QoS 1/2 messages queued from now on to `journal` (numbered from `next_seq`),
    /// or stop journaling them with a detached one.
    pub fn set_journal(&self, journal: SessionJournal, next_seq: u64) {
        let mut q = self.lock();
        q.journal = journal;
        q.next_seq = next_seq.max(1);
    }

    /// Forget the store sequence numbers of the queued deliveries (see
    /// `Session::clear_seqs`).
    pub fn clear_seqs(&self) {
        for d in self.lock().queue.iter_mut() {
            d.seq = 0;
        }
    }

    /// Mark the session attached to a connection (queue QoS 0) or not.
    pub fn set_online(&self, online: bool) {
        let mut q = self.lock();
        q.online = online;
        // A new connection (or none) starts with a clean record.
        q.slow = false;
        if !online {
            // Parked: keep only what is queued.
            q.queue.release();
            q.waiter = None;
            self.wake_publishers(q);
        }
    }

    /// The session has ended: drop everything and refuse further pushes, so a publisher that
    /// matched the session just before it ended cannot grow a queue nobody will read.
    pub fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        q.queue.clear();
        q.bytes = 0;
        self.wake_publishers(q);
    }

    /// Messages queued now.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Payload bytes queued now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Resolves when a push happened since the last call (or right away if one is pending).
    pub async fn notified(&self) {
        std::future::poll_fn(|cx| self.poll_notified(cx)).await
    }

    /// [`Mailbox::notified`] as a poll, for the owning connection task's one wait.
    pub fn poll_notified(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut q = self.lock();
        if std::mem::take(&mut q.pushed) {
            return Poll::Ready(());
        }
        // One reader (the owning connection task): its waker replaces any earlier one.
        if !q.waiter.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            q.waiter = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testutil::delivery;
    use crate::wire::message::Message;

    fn limits(max_messages: usize, max_bytes: usize, overflow: OverflowPolicy) -> QueueLimits {
        QueueLimits {
            max_messages,
            max_bytes,
            overflow,
            queue_qos0_offline: false,
            slow_drop_qos0: true,
        }
    }

    #[test]
    fn stalled_queue_is_marked_slow_and_stops_holding_back() {
        let stats = Stats::default();
        let mb = Mailbox::new(limits(4, 1000, OverflowPolicy::DropNew));
        mb.set_online(true);
        for _ in 0..2 {
            mb.push(delivery(QoS::AtLeastOnce, b"x"), &stats);
        }
        assert!(mb.congested());
        let since = mb.progress();
        // The connection took one message meanwhile: slower, not stuck.
        mb.push(delivery(QoS::AtLeastOnce, b"x"), &stats);
        assert!(mb.pop().is_some());
        assert!(!mb.mark_slow_if_stalled(since));
        assert!(mb.congested());
        // Nothing taken during the next wait: slow, and nobody is held back by it.
        let since = mb.progress();
        assert!(mb.mark_slow_if_stalled(since));
        assert!(!mb.mark_slow_if_stalled(since), "marked once");
        assert!(mb.is_slow());
        assert!(!mb.congested());
        // QoS 0 is dropped while slow; QoS 1 still queued up to the limit, then dropped.
        assert_eq!(
            mb.push(delivery(QoS::AtMostOnce, b"x"), &stats),
            Pushed::DroppedSlow
        );
        for _ in 0..2 {
            assert_eq!(
                mb.push(delivery(QoS::AtLeastOnce, b"x"), &stats),
                Pushed::Queued
            );
        }
        assert_eq!(
            mb.push(delivery(QoS::AtLeastOnce, b"x"), &stats),
            Pushed::DroppedFull
        );
        assert_eq!(Stats::get(&stats.dropped_slow_qos0), 1);
        assert_eq!(mb.dropped(), 2);
        // Draining below half (2 of 4) makes it normal again.
        mb.pop();
        mb.pop();
        assert!(mb.is_slow());
        mb.pop();
        assert!(!mb.is_slow());
        mb.push(delivery(QoS::AtLeastOnce, b"x"), &stats);
        assert!(mb.congested());
    }

    #[test]
    fn attaching_clears_slow() {
        let stats = Stats::default();
        let mb = Mailbox::new(limits(2, 1000, OverflowPolicy::DropNew));
        mb.set_online(true);
        mb.push(delivery(QoS::AtLeastOnce, b"x"), &stats);
        assert!(mb.mark_slow_if_stalled(mb.progress()));
        mb.set_online(false);
        mb.set_online(true);
        assert!(!mb.is_slow());
        assert!(mb.congested());
    }

    #[test]
    fn drop_new_keeps_the_oldest_and_counts() {
        let stats = Stats::default();
        let mb = Mailbox::new(limits(2, 100, OverflowPolicy::DropNew));
        assert_eq!(
            mb.push(delivery(QoS::AtLeastOnce, b"a"), &stats),
            Pushed::Queued
        );
        assert_eq!(
            mb.push(delivery(QoS::AtLeastOnce, b"b"), &stats),
            Pushed::Queued
        );
        assert_eq!(
            mb.push(delivery(QoS::AtLeastOnce, b"c"), &stats),
            Pushed::DroppedFull
        );
        assert_eq!(Stats::get(&stats.dropped_queue_full), 1);
        assert_eq!(&mb.pop().unwrap().msg.payload[..], b"a");
        assert_eq!(&mb.pop().unwrap().msg.payload[..], b"b");
        assert!(mb.pop().is_none());
    }

    #[test]
    fn drop_oldest_keeps_the_newest_and_counts() {
        let stats = Stats::default();
        let mb = Mailbox::new(limits(2, 100, OverflowPolicy::DropOldest));
        for p in [&b"a"[..], b"b", b"c"] {
            let d = Delivery {
                msg: Arc::new(Message {
                    payload: bytes::Bytes::copy_from_slice(p),
                    ..(*delivery(QoS::AtLeastOnce, b"").msg).clone()
                }),
                ..delivery(QoS::AtLeastOnce, b"")
            };
            mb.push(d, &stats);
        }
        assert_eq!(Stats::get(&stats.dropped_queue_full), 1);
        assert_eq!(&mb.pop().unwrap().msg.payload[..], b"b");
        assert_eq!(&mb.pop().unwrap().msg.payload[..], b"c");
    }

    #[test]
    fn byte_limit_applies() {
        // Each delivery counts topic "a/b" + payload: 6 bytes for "abc".
        let stats = Stats::default();
        let mb = Mailbox::new(limits(100, 8, OverflowPolicy::DropNew));
        assert_eq!(
            mb.push(delivery(QoS::AtLeastOnce, b"abc"), &stats),
            Pushed::Queued
        );
        assert_eq!(
            mb.push(delivery(QoS::AtLeastOnce, b"abc"), &stats),
            Pushed::DroppedFull
        );
        assert_eq!(mb.bytes(), 6);
        // Larger than the whole limit: dropped even under drop-oldest.
        let mb = Mailbox::new(limits(100, 8, OverflowPolicy::DropOldest));
        assert_eq!(
            mb.push(delivery(QoS::AtLeastOnce, b"abcdef"), &stats),
            Pushed::DroppedFull
        );
    }

    /// A message cannot dodge the byte limit with an empty payload: topic and properties
    /// count too.
    #[test]
    fn byte_limit_counts_topic_and_properties() {
        let stats = Stats::default();
        let mb = Mailbox::new(limits(100, 64, OverflowPolicy::DropNew));
        let mut d = delivery(QoS::AtLeastOnce, b"");
        Arc::make_mut(&mut d.msg)
            .properties
            .user_properties
            .push(("k".repeat(40), "v".repeat(40)));
        assert_eq!(mb.push(d, &stats), Pushed::DroppedFull);
        assert_eq!(Stats::get(&stats.dropped_queue_full), 1);
    }

    #[test]
    fn qos0_is_not_queued_offline_unless_configured() {
        let stats = Stats::default();
        let mb = Mailbox::new(limits(10, 100, OverflowPolicy::DropNew));
        assert_eq!(
            mb.push(delivery(QoS::AtMostOnce, b"a"), &stats),
            Pushed::DroppedQos0Offline
        );
        assert_eq!(Stats::get(&stats.dropped_qos0_offline), 1);
        mb.set_online(true);
        assert_eq!(
            mb.push(delivery(QoS::AtMostOnce, b"a"), &stats),
            Pushed::Queued
        );
        let mb = Mailbox::new(QueueLimits {
            queue_qos0_offline: true,
            ..limits(10, 100, OverflowPolicy::DropNew)
        });
        assert_eq!(
            mb.push(delivery(QoS::AtMostOnce, b"a"), &stats),
            Pushed::Queued
        );
    }

    #[tokio::test]
    async fn congestion_at_half_and_drained_wakes() {
        let stats = Stats::default();
        let mb = Arc::new(Mailbox::new(limits(4, 100, OverflowPolicy::DropNew)));
        mb.push(delivery(QoS::AtLeastOnce, b"a"), &stats);
        mb.push(delivery(QoS::AtLeastOnce, b"b"), &stats);
        // Offline queues never hold publishers back.
        assert!(!mb.congested());
        mb.set_online(true);
        assert!(mb.congested());
        let waiter = tokio::spawn({
            let mb = mb.clone();
            async move { mb.drained().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        mb.pop();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken when below half")
            .expect("joined");
        assert!(!mb.congested());
    }

    #[test]
    fn closed_queue_refuses_and_frees() {
        let stats = Stats::default();
        let mb = Mailbox::new(limits(10, 100, OverflowPolicy::DropNew));
        mb.push(delivery(QoS::AtLeastOnce, b"a"), &stats);
        mb.close();
        assert!(mb.is_empty());
        assert_eq!(
            mb.push(delivery(QoS::AtLeastOnce, b"a"), &stats),
            Pushed::Closed
        );
    }
}
