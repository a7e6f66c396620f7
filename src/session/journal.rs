//! The journal: the events a session's durable state goes through, as the session side defines
//! them. A session, its mailbox, the registry and the retained messages report their changes
//! here and never know what keeps them; `store/` (the write-ahead log) is one implementation,
//! [`NoJournal`] (persistence off) another, and the tests record the events in order.
//!
//! Durability reaches the wire through a sync mark: an event that must be durable before the
//! client hears about it (a queued QoS 1/2 message, a QoS 2 id, a session image) raises the
//! calling thread's mark, and the connection task holds the output it produced from then on
//! until [`Journal::durable`] reports that mark reached (see `net::connection`).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::session::parts::{OutState, Subscription};
use crate::wire::message::{Delivery, Message};
use crate::wire::packet::{ProtocolVersion, Will};

/// Everything about a durable session except its messages: what a restart, or another node,
/// rebuilds it from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionImage {
    /// Client Identifier.
    pub client_id: Arc<str>,
    /// Which session of this Client ID: a fresh number per session, so events of an ended
    /// session can never apply to its successor.
    pub incarnation: u64,
    /// Protocol of the last connection.
    pub protocol: ProtocolVersion,
    /// Session Expiry Interval.
    pub expiry_interval: u32,
    /// When its connection closed (wall ms, see [`wall_now`]); `None` while connected.
    pub disconnected_at: Option<u64>,
    /// While connected: the connection's will (published if the broker dies, as for any
    /// abnormal close). While disconnected: the will still waiting for its delay.
    pub will: Option<Will>,
    /// Filter -> options, sorted by filter.
    pub subscriptions: Vec<(String, Subscription)>,
}

/// Why a session image is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// A new durable session (a fresh incarnation).
    Created,
    /// Its subscriptions, expiry, protocol or will changed (also: resumed by a connection,
    /// or rebased by recovery or a fired will delay).
    Changed,
    /// Its connection closed and it waits offline; `disconnected_at` starts its expiry clock.
    Parked,
}

/// One change of one session's durable state. Borrowed where the journal only reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// The session's image, written as `kind` says.
    Image(ImageKind, Box<SessionImage>),
    /// Delivery `d` entered the queue as entry `d.seq`.
    Enqueued(&'a Delivery),
    /// Queue entry `seq` was sent as `packet_id` and waits for PUBACK or PUBREC (`state`).
    InFlight {
        /// Queue entry.
        seq: u64,
        /// Packet identifier it was sent with.
        packet_id: u16,
        /// `AwaitPubAck` or `AwaitPubRec`.
        state: OutState,
    },
    /// Queue entry `seq` (QoS 2) was PUBREC'd: only the PUBREL is re-sent from now on.
    PubRecd {
        /// Queue entry.
        seq: u64,
        /// Its packet identifier.
        packet_id: u16,
    },
    /// Queue entry `seq` is finished (acknowledged, dropped or expired).
    Done {
        /// Queue entry.
        seq: u64,
    },
    /// An inbound QoS 2 packet id was PUBREC'd (the message was routed once).
    InboundAdded {
        /// Its packet identifier.
        packet_id: u16,
    },
    /// An inbound QoS 2 packet id was released by PUBREL.
    InboundReleased {
        /// Its packet identifier.
        packet_id: u16,
    },
    /// The session ended; its state is gone.
    Ended,
}

impl Event<'_> {
    /// Must the client wait for this event before hearing what follows it? A lost `Done` only
    /// re-sends a QoS 1 message or a PUBREL, which the protocol allows; a lost QoS 1
    /// `InFlight` re-sends under a new id, also allowed. Everything else would lose or
    /// duplicate a message after a crash.
    pub fn must_sync(&self) -> bool {
        match self {
            Event::Done { .. } => false,
            Event::InFlight { state, .. } => *state != OutState::AwaitPubAck,
            _ => true,
        }
    }
}

/// A retained message changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainedChange<'a> {
    /// The topic's retained message is now this one.
    Set(&'a Arc<Message>),
    /// The topic no longer has a retained message.
    Cleared(&'a str),
}

/// Durability progress as connections see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Durable {
    /// Every event up to this sync mark is durable (per the backend's policy).
    pub lsn: u64,
    /// The last write failed: nothing newer is durable until a retry succeeds.
    pub failed: bool,
}

/// The journal's figures at one moment, for `/metrics` and `$SYS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JournalFigures {
    /// Bytes of log files in the data directory.
    pub bytes: u64,
    /// Group commits since start (batches written, and fsynced under `always`, for someone
    /// waiting for them).
    pub commits: u64,
    /// Their write + fsync time, summed, in microseconds.
    pub commit_micros: u64,
    /// Writes are failing (disk full, I/O error).
    pub failed: bool,
}

/// A backend keeping sessions' durable state. Shared by every connection task through the
/// broker (`Arc<dyn Journal>`); calls come from any thread and must not block for long (the
/// store only appends to a buffer; its writer thread does the I/O).
pub trait Journal: Send + Sync + fmt::Debug {
    /// Does this journal keep anything? False for [`NoJournal`]: sessions then stay in memory
    /// only, and nothing waits for durability.
    fn is_on(&self) -> bool;
    /// A number for a new session, never used before in this journal.
    fn new_incarnation(&self) -> u64;
    /// Record `event` of session `incarnation`. Events that [`Event::must_sync`] raise the
    /// calling thread's sync mark.
    fn session(&self, incarnation: u64, event: Event<'_>);
    /// Record a retained message change (raises the sync mark).
    fn retained(&self, change: RetainedChange<'_>);
    /// The highest sync mark this thread raised since the last call (0 if none): output
    /// produced since must wait until [`Journal::durable`] reaches it. The defaults of this
    /// and the methods below are those of a journal with nothing to wait for.
    fn take_sync_mark(&self) -> u64 {
        0
    }
    /// Durability progress; `None` when nothing ever needs waiting for.
    fn durable(&self) -> Option<watch::Receiver<Durable>> {
        None
    }
    /// Writes are failing: refuse what would need them.
    fn is_failed(&self) -> bool {
        false
    }
    /// Start collecting this thread's events that need no sync (see [`batch`]).
    fn begin_batch(&self) {}
    /// Hand the events collected since the matching `begin_batch` to the backend.
    fn end_batch(&self) {}
    /// Figures for reports; `None` with persistence off.
    fn figures(&self) -> Option<JournalFigures> {
        None
    }
    /// Make everything recorded so far durable and stop (graceful shutdown).
    fn close(&self) {}
}

/// A scope in which this thread's events that need no sync are handed over together when it
/// ends, so one connection's pass over its input takes the backend's lock once. Must not be
/// held across an `.await`.
pub struct Batch<'a>(&'a dyn Journal);

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.0.end_batch();
    }
}

/// Start a [`Batch`] on `journal`.
pub fn batch(journal: &dyn Journal) -> Batch<'_> {
    journal.begin_batch();
    Batch(journal)
}

/// Wait until `rx` reports `lsn` durable (true) or a write failure (false).
pub async fn wait_durable(rx: &mut watch::Receiver<Durable>, lsn: u64) -> bool {
    match rx.wait_for(|d| d.lsn >= lsn || d.failed).await {
        Ok(d) => d.lsn >= lsn,
        Err(_) => false,
    }
}

/// Persistence off: keeps nothing, and nothing waits for it.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoJournal;

impl Journal for NoJournal {
    fn is_on(&self) -> bool {
        false
    }
    fn new_incarnation(&self) -> u64 {
        0
    }
    fn session(&self, _: u64, _: Event<'_>) {}
    fn retained(&self, _: RetainedChange<'_>) {}
}

/// One session's handle on the journal, held by the `Session` and its `Mailbox`. Detached (the
/// default) for a session that is kept in memory only: one that ends with its connection, or
/// any session with persistence off. Every method of a detached handle does nothing, so the
/// callers never ask which it is; queue entries numbered 0 were never journaled and are
/// skipped likewise. One pointer wide: parked sessions are many.
#[derive(Debug, Clone, Default)]
pub struct SessionJournal(Option<Arc<Attached>>);

#[derive(Debug)]
struct Attached {
    journal: Arc<dyn Journal>,
    incarnation: u64,
}

impl SessionJournal {
    /// A handle for a new session (a fresh incarnation) in `journal`; detached when the
    /// journal keeps nothing.
    pub fn attach(journal: &Arc<dyn Journal>) -> SessionJournal {
        if !journal.is_on() {
            return SessionJournal::default();
        }
        let incarnation = journal.new_incarnation();
        SessionJournal::resume(journal, incarnation)
    }

    /// A handle for the existing session `incarnation` (recovery).
    pub fn resume(journal: &Arc<dyn Journal>, incarnation: u64) -> SessionJournal {
        SessionJournal(Some(Arc::new(Attached {
            journal: journal.clone(),
            incarnation,
        })))
    }

    /// Is the session journaled?
    pub fn is_attached(&self) -> bool {
        self.0.is_some()
    }

    /// Its incarnation, when journaled.
    pub fn incarnation(&self) -> Option<u64> {
        self.0.as_ref().map(|a| a.incarnation)
    }

    fn record(&self, event: Event<'_>) {
        if let Some(a) = &self.0 {
            a.journal.session(a.incarnation, event);
        }
    }

    /// The session's image (see `Session::image`).
    pub fn image(&self, kind: ImageKind, image: SessionImage) {
        self.record(Event::Image(kind, Box::new(image)));
    }

    /// `d` entered the queue as entry `d.seq`.
    pub fn enqueued(&self, d: &Delivery) {
        if d.seq != 0 {
            self.record(Event::Enqueued(d));
        }
    }

    /// Entry `seq` was sent as `packet_id`, now in `state` (waiting for PUBACK or PUBREC).
    pub fn in_flight(&self, seq: u64, packet_id: u16, state: OutState) {
        if seq != 0 {
            self.record(Event::InFlight {
                seq,
                packet_id,
                state,
            });
        }
    }

    /// Entry `seq` was PUBREC'd.
    pub fn pub_recd(&self, seq: u64, packet_id: u16) {
        if seq != 0 {
            self.record(Event::PubRecd { seq, packet_id });
        }
    }

    /// Entry `seq` is finished.
    pub fn done(&self, seq: u64) {
        if seq != 0 {
            self.record(Event::Done { seq });
        }
    }

    /// An inbound QoS 2 id was added (`true`, PUBREC follows) or released (PUBCOMP follows).
    pub fn inbound(&self, packet_id: u16, added: bool) {
        self.record(if added {
            Event::InboundAdded { packet_id }
        } else {
            Event::InboundReleased { packet_id }
        });
    }

    /// The session ended. The handle is spent: detach it afterwards (`std::mem::take`).
    pub fn ended(&self) {
        self.record(Event::Ended);
    }
}

/// What a journal held at start, as plain data for the broker to rebuild from.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Durable sessions.
    pub sessions: Vec<RecoveredSession>,
    /// Retained messages.
    pub retained: Vec<Arc<Message>>,
    /// When the previous process last wrote (wall ms): sessions connected then are treated
    /// as disconnected at this moment.
    pub last_write: u64,
}

/// One durable session as recovered.
#[derive(Debug, Clone)]
pub struct RecoveredSession {
    /// Everything but its messages.
    pub image: SessionImage,
    /// Inbound QoS 2 packet ids awaiting PUBREL.
    pub inbound: Vec<u16>,
    /// Its queue, oldest first: in flight (with packet id and state) or not yet sent.
    pub queue: Vec<RecoveredEntry>,
}

/// One queued or in-flight message of a recovered session.
#[derive(Debug, Clone)]
pub struct RecoveredEntry {
    /// The delivery, with its queue number in `seq`.
    pub delivery: Delivery,
    /// Packet id and flow state once it was sent.
    pub sent: Option<(u16, OutState)>,
}

/// Wall-clock milliseconds since the Unix epoch: the journal's times, because monotonic
/// instants mean nothing to the next process (or another node).
pub fn wall_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A monotonic instant as wall-clock milliseconds.
pub fn to_wall(at: Instant) -> u64 {
    let now = Instant::now();
    let wall = wall_now();
    if at >= now {
        wall.saturating_add(u64::try_from((at - now).as_millis()).unwrap_or(u64::MAX))
    } else {
        wall.saturating_sub(u64::try_from((now - at).as_millis()).unwrap_or(u64::MAX))
    }
}

/// Wall-clock milliseconds as a monotonic instant (a past time becomes a past instant, as far
/// back as the clock allows).
pub fn from_wall(ms: u64) -> Instant {
    let now = Instant::now();
    let wall = wall_now();
    if ms >= wall {
        now + Duration::from_millis(ms - wall)
    } else {
        let back = Duration::from_millis(wall - ms);
        now.checked_sub(back)
            .unwrap_or(now - Duration::from_secs(0))
    }
}

pub mod recording {
    //! A journal that keeps the events in order, for tests of the session state machine, the
    //! registry and the broker (unit tests and in-process black-box tests alike). Not for
    //! production: it grows without bound.

    use std::sync::Mutex;

    use super::*;

    /// One recorded event, owned.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Rec {
        /// `Event::Image`: kind, Client ID, disconnected (parked) or not, subscription filters.
        Image(ImageKind, String, bool, Vec<String>),
        /// `Event::Enqueued`: seq.
        Enqueued(u64),
        /// `Event::InFlight`: seq, packet id, state.
        InFlight(u64, u16, OutState),
        /// `Event::PubRecd`: seq, packet id.
        PubRecd(u64, u16),
        /// `Event::Done`: seq.
        Done(u64),
        /// `Event::InboundAdded`.
        InboundAdded(u16),
        /// `Event::InboundReleased`.
        InboundReleased(u16),
        /// `Event::Ended`.
        Ended,
        /// A retained message set (topic) or cleared (topic, `None`).
        Retained(String, bool),
    }

    /// Records every event with its incarnation.
    #[derive(Debug, Default)]
    pub struct Recording {
        events: Mutex<Vec<(u64, Rec)>>,
        next: std::sync::atomic::AtomicU64,
    }

    impl Recording {
        /// A new recording journal, as the broker holds it.
        pub fn new() -> Arc<Recording> {
            Arc::new(Recording::default())
        }

        /// Everything recorded so far, emptying the record.
        pub fn take(&self) -> Vec<(u64, Rec)> {
            std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
        }

        /// The events so far without incarnations, emptying the record.
        pub fn take_events(&self) -> Vec<Rec> {
            self.take().into_iter().map(|(_, e)| e).collect()
        }

        fn push(&self, incarnation: u64, r: Rec) {
            self.events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((incarnation, r));
        }
    }

    impl Journal for Recording {
        fn is_on(&self) -> bool {
            true
        }
        fn new_incarnation(&self) -> u64 {
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
        }
        fn session(&self, incarnation: u64, event: Event<'_>) {
            let r = match event {
                Event::Image(kind, img) => Rec::Image(
                    kind,
                    img.client_id.to_string(),
                    img.disconnected_at.is_some(),
                    img.subscriptions.into_iter().map(|(f, _)| f).collect(),
                ),
                Event::Enqueued(d) => Rec::Enqueued(d.seq),
                Event::InFlight {
                    seq,
                    packet_id,
                    state,
                } => Rec::InFlight(seq, packet_id, state),
                Event::PubRecd { seq, packet_id } => Rec::PubRecd(seq, packet_id),
                Event::Done { seq } => Rec::Done(seq),
                Event::InboundAdded { packet_id } => Rec::InboundAdded(packet_id),
                Event::InboundReleased { packet_id } => Rec::InboundReleased(packet_id),
                Event::Ended => Rec::Ended,
            };
            self.push(incarnation, r);
        }
        fn retained(&self, change: RetainedChange<'_>) {
            let r = match change {
                RetainedChange::Set(m) => Rec::Retained(m.topic.clone(), true),
                RetainedChange::Cleared(t) => Rec::Retained(t.to_string(), false),
            };
            self.push(0, r);
        }
    }
}
