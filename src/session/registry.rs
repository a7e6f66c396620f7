//! The session registry: Client ID -> slot, sharded (dashmap) so connects, takeovers and
//! disconnects of different clients run on both cores without contending.
//!
//! Every critical section here is short and synchronous: no `.await` while a map reference is
//! held (dashmap can deadlock if a shard guard crosses an await). Waiting for a takeover
//! happens outside, on a oneshot channel, with the slot marked `TakingOver` meanwhile.
//!
//! Each slot carries a generation, fresh for every connection that claims the slot. Deferred
//! actions (expiry timers, a parking connection) name the generation they were made for and do
//! nothing when the slot has moved on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::session::expiry::{Deadline, Timer, TimerKind, Timers};
use crate::session::inspect::SessionInfo;
use crate::session::journal::{self, ImageKind};
use crate::session::{Session, EXPIRY_NEVER};

/// A request to the connection task that currently owns a session.
#[derive(Debug)]
pub enum Control {
    /// Another connection claimed the Client ID: close (v5: DISCONNECT 0x8E) and hand the
    /// session over through the sender.
    TakeOver(oneshot::Sender<Box<Session>>),
    /// The admin API asks for a view of the session (answered from the main loop).
    Snapshot(oneshot::Sender<SessionInfo>),
    /// The admin API disconnects the client (v5: DISCONNECT 0x98); the session is parked as
    /// after any other server-side close.
    Kick,
}

/// Requests a connection task takes at once; a takeover, an admin view and a kick all fit.
const CONTROL_CAPACITY: usize = 4;

/// A connection task's control channel: at most `CONTROL_CAPACITY` queued requests, for a task
/// that hardly ever gets one. One small allocation; a tokio mpsc channel would allocate its
/// first block of 32 slots and a cache-padded shared state, about 1 KiB per connection.
pub fn control_channel() -> (ControlTx, ControlRx) {
    let shared = Arc::new(Mutex::new(ControlState {
        queue: VecDeque::new(),
        senders: 1,
        receiving: true,
        waiter: None,
    }));
    (ControlTx(shared.clone()), ControlRx(shared))
}

#[derive(Debug)]
struct ControlState {
    queue: VecDeque<Control>,
    senders: usize,
    receiving: bool,
    waiter: Option<Waker>,
}

fn lock_control(m: &Mutex<ControlState>) -> MutexGuard<'_, ControlState> {
    // Every critical section is a push or a pop: a panic inside cannot leave it half done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a request was not queued.
#[derive(Debug)]
pub enum TrySendError {
    /// The task has `CONTROL_CAPACITY` requests waiting already.
    Full(Control),
    /// The task is gone.
    Closed(Control),
}

/// The sending side, kept in the registry slot (and by the admin API while it asks).
#[derive(Debug)]
pub struct ControlTx(Arc<Mutex<ControlState>>);

impl Clone for ControlTx {
    fn clone(&self) -> ControlTx {
        lock_control(&self.0).senders += 1;
        ControlTx(self.0.clone())
    }
}

impl Drop for ControlTx {
    fn drop(&mut self) {
        let waiter = {
            let mut s = lock_control(&self.0);
            s.senders -= 1;
            if s.senders == 0 {
                s.waiter.take()
            } else {
                None
            }
        };
        if let Some(w) = waiter {
            w.wake();
        }
    }
}

impl ControlTx {
    /// Queue `c` if there is room.
    pub fn try_send(&self, c: Control) -> Result<(), TrySendError> {
        let waiter = {
            let mut s = lock_control(&self.0);
            if !s.receiving {
                return Err(TrySendError::Closed(c));
            }
            if s.queue.len() >= CONTROL_CAPACITY {
                return Err(TrySendError::Full(c));
            }
            s.queue.push_back(c);
            s.waiter.take()
        };
        if let Some(w) = waiter {
            w.wake();
        }
        Ok(())
    }

    /// Queue `c`, waiting for room; `Err` gives it back when the task is gone. Only the admin
    /// API waits (under its own deadline), and a full channel is rare: it polls for room
    /// rather than keeping a waiter list in every channel.
    pub async fn send(&self, mut c: Control) -> Result<(), Control> {
        loop {
            match self.try_send(c) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(back)) => return Err(back),
                Err(TrySendError::Full(back)) => {
                    c = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
}

/// The receiving side, kept by the connection task.
#[derive(Debug)]
pub struct ControlRx(Arc<Mutex<ControlState>>);

impl ControlRx {
    /// The next request; `None` once every sender is gone and nothing is queued.
    pub async fn recv(&mut self) -> Option<Control> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`ControlRx::recv`] as a poll, for a task that waits on several things in one poll
    /// (no future of its own to keep).
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<Control>> {
        let mut s = lock_control(&self.0);
        if let Some(c) = s.queue.pop_front() {
            return Poll::Ready(Some(c));
        }
        if s.senders == 0 {
            return Poll::Ready(None);
        }
        if !s.waiter.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waiter = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for ControlRx {
    fn drop(&mut self) {
        // Queued requests go with the task, as with a dropped mpsc receiver: their askers see
        // their reply channels closed.
        let queued = {
            let mut s = lock_control(&self.0);
            s.receiving = false;
            s.waiter = None;
            std::mem::take(&mut s.queue)
        };
        drop(queued);
    }
}

/// Who holds a Client ID's session.
#[derive(Debug)]
pub enum Slot {
    /// A connection task owns the session; reach it through `control`.
    Online {
        /// Generation of the owning connection.
        generation: u64,
        /// The owning task's control channel.
        control: ControlTx,
    },
    /// No connection: the session is parked here as plain data until it is resumed or expires.
    Offline {
        /// Generation of the connection that parked it.
        generation: u64,
        /// The parked session.
        session: Box<Session>,
        /// When it expires; `None` = never (no timer armed). When its delayed will goes out
        /// is kept with the will (`PendingWill::armed_at`): few sessions have one, and every
        /// slot is a bucket of the registry's table.
        deadline: Option<Deadline>,
    },
    /// A new connection asked the owner to hand the session over and is waiting for it.
    TakingOver {
        /// Generation of the waiting connection.
        generation: u64,
        /// The owner being asked, restored if the takeover is abandoned.
        previous: (u64, ControlTx),
    },
}

/// The outcome of a CONNECT's claim on a Client ID.
#[derive(Debug)]
pub enum Claim {
    /// No session existed; the slot is now ours.
    Fresh {
        /// Our generation.
        generation: u64,
    },
    /// A parked session is now ours.
    Resumed {
        /// Our generation.
        generation: u64,
        /// The session.
        session: Box<Session>,
    },
    /// Another connection owns the session; it has been asked to hand it over. Wait on
    /// `reply`, then call `Registry::install`.
    Wait {
        /// Our generation.
        generation: u64,
        /// Where the old owner sends the session.
        reply: oneshot::Receiver<Box<Session>>,
    },
    /// A takeover of this Client ID is already in progress; retry shortly.
    Busy,
}

/// What became of a session whose connection closed.
#[derive(Debug)]
pub enum Parked {
    /// Parked offline, expiry armed.
    Offline,
    /// Its lifetime is over (expiry interval 0): the caller frees its subscriptions.
    Ended(Box<Session>),
    /// A new connection is taking it over: answer the `Control::TakeOver` waiting in the
    /// control channel with it.
    HandOver(Box<Session>),
    /// The slot belongs to a later connection already; this session is obsolete.
    Stale(Box<Session>),
}

/// The registry. Owned by the `Broker`, shared by every connection task and the timer task.
#[derive(Debug, Default)]
pub struct Registry {
    /// Client ID -> slot. `Arc<str>` keys are shared with sessions, router entries and timers.
    slots: DashMap<Arc<str>, Slot>,
    /// Source of generations; starts at 1 so 0 never names a live slot.
    next_generation: AtomicU64,
    /// Expiry and will-delay deadlines of parked sessions.
    pub timers: Timers,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    fn generation(&self) -> u64 {
        self.next_generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Claim `client_id` for a new connection whose control channel is `control`.
    pub fn claim(&self, client_id: &Arc<str>, control: &ControlTx) -> Claim {
        let generation = self.generation();
        match self.slots.entry(client_id.clone()) {
            Entry::Vacant(v) => {
                v.insert(Slot::Online {
                    generation,
                    control: control.clone(),
                });
                Claim::Fresh { generation }
            }
            Entry::Occupied(mut o) => match o.get() {
                Slot::TakingOver { .. } => Claim::Busy,
                Slot::Online {
                    control: old,
                    generation: old_generation,
                } => {
                    let (tx, rx) = oneshot::channel();
                    // Sent while the shard is locked: once the slot reads TakingOver, the
                    // request is already in the old owner's channel, so an owner that parks
                    // concurrently finds it there.
                    match old.try_send(Control::TakeOver(tx)) {
                        Ok(()) => {
                            let previous = (*old_generation, old.clone());
                            o.insert(Slot::TakingOver {
                                generation,
                                previous,
                            });
                            Claim::Wait {
                                generation,
                                reply: rx,
                            }
                        }
                        Err(TrySendError::Full(_)) => Claim::Busy,
                        Err(TrySendError::Closed(_)) => {
                            // The owner is gone without parking (it cannot, short of a
                            // panic): its session state is lost with it.
                            o.insert(Slot::Online {
                                generation,
                                control: control.clone(),
                            });
                            Claim::Fresh { generation }
                        }
                    }
                }
                Slot::Offline { .. } => {
                    let old = o.insert(Slot::Online {
                        generation,
                        control: control.clone(),
                    });
                    let Slot::Offline {
                        session,
                        deadline,
                        generation: old_gen,
                    } = old
                    else {
                        unreachable!("matched Offline above")
                    };
                    self.disarm(
                        client_id,
                        old_gen,
                        deadline,
                        session.pending_will.armed_at(),
                    );
                    Claim::Resumed {
                        generation,
                        session,
                    }
                }
            },
        }
    }

    /// After a `Claim::Wait` delivered the session: make the slot ours. False when the slot
    /// no longer names our takeover (cannot happen while we hold it TakingOver, but checked).
    pub fn install(&self, client_id: &Arc<str>, generation: u64, control: &ControlTx) -> bool {
        match self.slots.get_mut(client_id) {
            Some(mut slot) if matches!(*slot, Slot::TakingOver { generation: g, .. } if g == generation) =>
            {
                *slot = Slot::Online {
                    generation,
                    control: control.clone(),
                };
                true
            }
            _ => false,
        }
    }

    /// Give up a takeover that timed out: the slot goes back to the connection that was asked,
    /// which still owns the session (it ignores a request whose asker is gone, or parks the
    /// session itself if it had already started closing).
    pub fn abandon(&self, client_id: &Arc<str>, generation: u64) {
        if let Some(mut slot) = self.slots.get_mut(client_id) {
            if let Slot::TakingOver {
                generation: g,
                previous,
            } = &*slot
            {
                if *g == generation {
                    let (generation, control) = previous.clone();
                    *slot = Slot::Online {
                        generation,
                        control,
                    };
                }
            }
        }
    }

    /// The slot a session parks in: `Offline` with its expiry armed, or `Err` when its
    /// lifetime ends with the connection (expiry interval 0).
    fn offline_slot(
        &self,
        generation: u64,
        mut session: Box<Session>,
        now: Instant,
    ) -> Result<Slot, Box<Session>> {
        if session.expiry_interval == 0 {
            return Err(session);
        }
        session.mailbox.set_online(false);
        session.shrink();
        let deadline = (session.expiry_interval != EXPIRY_NEVER)
            .then(|| Deadline::at(now + Duration::from_secs(u64::from(session.expiry_interval))));
        // A will delay that outlasts the session needs no timer of its own: the will goes out
        // when the session ends [MQTT-3.1.3-9 context, section 3.1.3.2.2].
        let will_at = session
            .pending_will
            .as_ref()
            .map(|w| Deadline::at(now + Duration::from_secs(u64::from(w.delay_interval))))
            .filter(|at| deadline.is_none_or(|d| *at < d));
        session.pending_will.set_armed_at(will_at);
        for (at, kind) in [
            (deadline, TimerKind::SessionExpiry),
            (will_at, TimerKind::WillDelay),
        ] {
            if let Some(at) = at {
                self.timers
                    .arm(Timer::new(at, generation, session.client_id.clone(), kind));
            }
        }
        Ok(Slot::Offline {
            generation,
            session,
            deadline,
        })
    }

    /// Cancel the timers of an Offline slot that is being resumed or removed.
    fn disarm(
        &self,
        client_id: &Arc<str>,
        generation: u64,
        deadline: Option<Deadline>,
        will_at: Option<Deadline>,
    ) {
        for (at, kind) in [
            (deadline, TimerKind::SessionExpiry),
            (will_at, TimerKind::WillDelay),
        ] {
            if let Some(at) = at {
                self.timers
                    .cancel(&Timer::new(at, generation, client_id.clone(), kind));
            }
        }
    }

    /// The connection of `generation` closed: park its session, end it, or hand it over.
    pub fn park(&self, generation: u64, session: Box<Session>, now: Instant) -> Parked {
        let Entry::Occupied(mut o) = self.slots.entry(session.client_id.clone()) else {
            return Parked::Stale(session);
        };
        match o.get() {
            Slot::Online { generation: g, .. } if *g == generation => {
                match self.offline_slot(generation, session, now) {
                    Ok(slot) => {
                        o.insert(slot);
                        Parked::Offline
                    }
                    Err(session) => {
                        o.remove();
                        Parked::Ended(session)
                    }
                }
            }
            Slot::TakingOver { .. } => Parked::HandOver(session),
            _ => Parked::Stale(session),
        }
    }

    /// Park a session that no connection owns (a takeover gave up waiting for it, or a test
    /// builds one) if its Client ID is free; otherwise it is returned for cleanup.
    pub fn park_orphan(&self, session: Box<Session>, now: Instant) -> Parked {
        let Entry::Vacant(v) = self.slots.entry(session.client_id.clone()) else {
            return Parked::Stale(session);
        };
        match self.offline_slot(self.generation(), session, now) {
            Ok(slot) => {
                v.insert(slot);
                Parked::Offline
            }
            Err(session) => Parked::Ended(session),
        }
    }

    /// A session-expiry deadline fired: remove the session if the slot is still the parked
    /// session it was armed for. Returns it for cleanup (which publishes a pending will).
    pub fn expire(&self, timer: &Timer) -> Option<Box<Session>> {
        let (key, slot) = self.slots.remove_if(timer.client_id(), |_, slot| {
            matches!(slot, Slot::Offline { generation, deadline: Some(at), .. }
                if *generation == timer.generation() && *at <= timer.deadline())
        })?;
        match slot {
            Slot::Offline {
                session,
                generation,
                ..
            } => {
                self.disarm(&key, generation, None, session.pending_will.armed_at());
                Some(session)
            }
            _ => None,
        }
    }

    /// A will-delay deadline fired: take the pending will of the parked session it was armed
    /// for, if the session is still parked and has not been resumed since.
    pub fn take_pending_will(&self, timer: &Timer) -> Option<crate::wire::packet::Will> {
        let mut slot = self.slots.get_mut(timer.client_id())?;
        match &mut *slot {
            Slot::Offline {
                generation,
                session,
                deadline,
            } if *generation == timer.generation()
                && session.pending_will.armed_at() == Some(timer.deadline()) =>
            {
                let will = session.pending_will.take();
                // A durable session records that its will is gone, or a restart would
                // publish it again. Rebased to now: the remaining lifetime counts from here.
                if session.journal.is_attached() {
                    let now = Instant::now();
                    let left = deadline.map_or(EXPIRY_NEVER, |d| {
                        let ms = d.instant().saturating_duration_since(now).as_millis();
                        u32::try_from(ms.div_ceil(1000))
                            .unwrap_or(EXPIRY_NEVER - 1)
                            .max(1)
                    });
                    let saved = std::mem::replace(&mut session.expiry_interval, left);
                    session.journal_image(ImageKind::Changed, None, Some(journal::to_wall(now)));
                    session.expiry_interval = saved;
                }
                will
            }
            _ => None,
        }
    }

    /// Remove an offline session now (administrative delete). Returns it for cleanup.
    pub fn remove_offline(&self, client_id: &str) -> Option<Box<Session>> {
        let (key, slot) = self
            .slots
            .remove_if(client_id, |_, slot| matches!(slot, Slot::Offline { .. }))?;
        match slot {
            Slot::Offline {
                session,
                deadline,
                generation,
            } => {
                self.disarm(&key, generation, deadline, session.pending_will.armed_at());
                Some(session)
            }
            _ => None,
        }
    }

    /// Sessions known (online, offline or changing hands).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no session exists.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Give memory back after many sessions ended: a hash map keeps its capacity when it
    /// empties, so a burst of a million expired sessions would otherwise pin ~200 MiB.
    /// Shrinks only when less than a quarter is used, so repeated calls cost little.
    pub fn compact(&self) {
        if self.slots.len() < self.slots.capacity() / 4 {
            self.slots.shrink_to_fit();
        }
    }

    /// Does a slot exist for `client_id`?
    pub fn contains(&self, client_id: &str) -> bool {
        self.slots.contains_key(client_id)
    }

    /// Sessions parked offline.
    pub fn offline_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s.value(), Slot::Offline { .. }))
            .count()
    }

    /// Is a connection attached to `client_id` right now?
    pub fn is_online(&self, client_id: &str) -> bool {
        self.slots
            .get(client_id)
            .is_some_and(|s| !matches!(*s, Slot::Offline { .. }))
    }

    /// Client IDs of every slot, in no particular order (admin listing).
    pub fn client_ids(&self) -> Vec<Arc<str>> {
        self.slots.iter().map(|s| s.key().clone()).collect()
    }

    /// Run `f` on the slot of `client_id` (admin inspection). `f` runs under the shard lock:
    /// it must be short and must not block.
    pub fn with_slot<R>(&self, client_id: &str, f: impl FnOnce(&Slot) -> R) -> Option<R> {
        self.slots.get(client_id).map(|s| f(s.value()))
    }

    /// Run `f` on the parked session of `client_id`, if it is offline (inspection, tests).
    pub fn with_offline<R>(&self, client_id: &str, f: impl FnOnce(&Session) -> R) -> Option<R> {
        match self.slots.get(client_id)?.value() {
            Slot::Offline { session, .. } => Some(f(session)),
            _ => None,
        }
    }

    /// Park a ready-made session directly, for tests and benchmarks of the offline path
    /// (no connection involved). Returns false if the Client ID is taken.
    pub fn insert_offline(&self, session: Box<Session>, now: Instant) -> bool {
        matches!(self.park_orphan(session, now), Parked::Offline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OverflowPolicy;
    use crate::session::mailbox::{Mailbox, QueueLimits};
    use crate::wire::packet::ProtocolVersion;

    fn session(id: &str, expiry: u32) -> Box<Session> {
        let mb = Arc::new(Mailbox::new(QueueLimits {
            max_messages: 10,
            max_bytes: 1000,
            overflow: OverflowPolicy::DropNew,
            queue_qos0_offline: false,
            slow_drop_qos0: true,
        }));
        Box::new(Session::new(id.into(), ProtocolVersion::V311, mb, expiry))
    }

    fn control() -> (ControlTx, ControlRx) {
        control_channel()
    }

    #[tokio::test]
    async fn control_channel_queues_four_wakes_the_reader_and_closes_both_ways() {
        let (tx, mut rx) = control_channel();
        let reader = tokio::spawn(async move {
            let first = rx.recv().await;
            (first, rx)
        });
        tokio::task::yield_now().await;
        assert!(tx.try_send(Control::Kick).is_ok());
        let (first, mut rx) = reader.await.unwrap();
        assert!(matches!(first, Some(Control::Kick)));
        for _ in 0..CONTROL_CAPACITY {
            assert!(tx.try_send(Control::Kick).is_ok());
        }
        assert!(matches!(
            tx.try_send(Control::Kick),
            Err(TrySendError::Full(_))
        ));
        let other = tx.clone();
        drop(tx);
        for _ in 0..CONTROL_CAPACITY {
            assert!(matches!(rx.recv().await, Some(Control::Kick)));
        }
        drop(other);
        assert!(rx.recv().await.is_none(), "every sender gone");
        let (tx, rx) = control_channel();
        drop(rx);
        assert!(matches!(
            tx.try_send(Control::Kick),
            Err(TrySendError::Closed(_))
        ));
        assert!(tx.send(Control::Kick).await.is_err());
    }

    #[tokio::test]
    async fn fresh_then_park_then_resume() {
        let reg = Registry::new();
        let id: Arc<str> = "c1".into();
        let (tx, _rx) = control();
        let Claim::Fresh { generation } = reg.claim(&id, &tx) else {
            panic!("expected fresh")
        };
        assert!(matches!(
            reg.park(generation, session("c1", EXPIRY_NEVER), Instant::now()),
            Parked::Offline
        ));
        assert_eq!(reg.offline_count(), 1);
        assert!(
            reg.timers.is_empty(),
            "never-expiring sessions arm no timer"
        );
        let (tx2, _rx2) = control();
        match reg.claim(&id, &tx2) {
            Claim::Resumed { session, .. } => assert_eq!(&*session.client_id, "c1"),
            other => panic!("expected resumed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn session_with_zero_expiry_ends_with_its_connection() {
        let reg = Registry::new();
        let (tx, _rx) = control();
        let Claim::Fresh { generation } = reg.claim(&"c".into(), &tx) else {
            panic!()
        };
        assert!(matches!(
            reg.park(generation, session("c", 0), Instant::now()),
            Parked::Ended(_)
        ));
        assert!(reg.is_empty());
    }

    #[tokio::test]
    async fn takeover_asks_the_owner_and_blocks_a_third_claim() {
        let reg = Registry::new();
        let id: Arc<str> = "c".into();
        let (tx1, mut rx1) = control();
        let Claim::Fresh { generation: g1 } = reg.claim(&id, &tx1) else {
            panic!()
        };
        let (tx2, _rx2) = control();
        let Claim::Wait {
            generation: g2,
            reply,
        } = reg.claim(&id, &tx2)
        else {
            panic!("expected wait")
        };
        let (tx3, _rx3) = control();
        assert!(matches!(reg.claim(&id, &tx3), Claim::Busy));
        // The old owner parks concurrently: it is told to hand over instead.
        let s = match reg.park(g1, session("c", EXPIRY_NEVER), Instant::now()) {
            Parked::HandOver(s) => s,
            other => panic!("expected hand-over, got {other:?}"),
        };
        let Some(Control::TakeOver(back)) = rx1.recv().await else {
            panic!("no takeover request")
        };
        back.send(s).unwrap();
        let s = reply.await.unwrap();
        assert!(reg.install(&id, g2, &tx2));
        // The old generation can no longer park.
        assert!(matches!(reg.park(g1, s, Instant::now()), Parked::Stale(_)));
    }

    /// A taker that gives up restores the owner, which then parks its session normally
    /// instead of finding its slot gone and dropping the session as stale.
    #[tokio::test]
    async fn abandoned_takeover_gives_the_slot_back_to_the_owner() {
        let reg = Registry::new();
        let id: Arc<str> = "c".into();
        let (tx1, _rx1) = control();
        let Claim::Fresh { generation: g1 } = reg.claim(&id, &tx1) else {
            panic!()
        };
        let (tx2, _rx2) = control();
        let Claim::Wait { generation: g2, .. } = reg.claim(&id, &tx2) else {
            panic!("expected wait")
        };
        reg.abandon(&id, g2);
        assert!(reg.is_online("c"));
        assert!(matches!(
            reg.park(g1, session("c", EXPIRY_NEVER), Instant::now()),
            Parked::Offline
        ));
        assert_eq!(reg.offline_count(), 1);
    }

    #[tokio::test]
    async fn expiry_timer_of_an_old_generation_does_nothing() {
        let reg = Registry::new();
        let id: Arc<str> = "c".into();
        let t0 = Instant::now();
        let (tx, _rx) = control();
        let Claim::Fresh { generation } = reg.claim(&id, &tx) else {
            panic!()
        };
        reg.park(generation, session("c", 10), t0);
        assert_eq!(reg.timers.len(), 1);
        // Resume: the timer is cancelled; park again with a new generation.
        let Claim::Resumed {
            generation: g2,
            session: s,
        } = reg.claim(&id, &tx)
        else {
            panic!()
        };
        assert!(reg.timers.is_empty());
        reg.park(g2, s, t0 + Duration::from_secs(5));
        let stale = Timer::new(
            t0 + Duration::from_secs(10),
            generation,
            id.clone(),
            TimerKind::SessionExpiry,
        );
        assert!(reg.expire(&stale).is_none());
        let due = reg.timers.take_due(t0 + Duration::from_secs(15));
        assert_eq!(due.len(), 1);
        assert!(reg.expire(&due[0]).is_some());
        assert!(reg.is_empty());
    }
}
