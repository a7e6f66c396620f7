//! The store as the sessions' journal (`session::journal::Journal`).

use std::sync::atomic::Ordering;

use tokio::sync::watch;

use crate::session::journal::{Durable, Event, Journal, JournalFigures, RetainedChange};
use crate::session::OutState;

use super::record::Record;
use super::{take_sync_mark, Store};

/// The store as the sessions' journal: every event becomes one log record.
impl Journal for Store {
    fn is_on(&self) -> bool {
        true
    }

    fn new_incarnation(&self) -> u64 {
        self.incarnations.fetch_add(1, Ordering::Relaxed)
    }

    fn session(&self, incarnation: u64, event: Event<'_>) {
        let sync = event.must_sync();
        let rec = match event {
            Event::Image(_, image) => Record::Session(image),
            Event::Enqueued(d) => return self.append_enqueue(incarnation, d),
            Event::InFlight {
                seq,
                packet_id,
                state,
            } => Record::Sent {
                incarnation,
                seq,
                packet_id,
                state,
            },
            Event::PubRecd { seq, packet_id } => Record::Sent {
                incarnation,
                seq,
                packet_id,
                state: OutState::AwaitPubComp,
            },
            Event::Done { seq } => Record::Done { incarnation, seq },
            Event::InboundAdded { packet_id } => Record::Inbound {
                incarnation,
                packet_id,
                added: true,
            },
            Event::InboundReleased { packet_id } => Record::Inbound {
                incarnation,
                packet_id,
                added: false,
            },
            Event::Ended => Record::SessionEnd { incarnation },
        };
        self.append(&rec, sync);
    }

    fn retained(&self, change: RetainedChange<'_>) {
        let rec = match change {
            RetainedChange::Set(m) => Record::RetainSet(m.clone()),
            RetainedChange::Cleared(topic) => Record::RetainDel(topic.to_string()),
        };
        self.append(&rec, true);
    }

    fn take_sync_mark(&self) -> u64 {
        take_sync_mark()
    }

    fn durable(&self) -> Option<watch::Receiver<Durable>> {
        Some(self.durable_rx())
    }

    fn is_failed(&self) -> bool {
        Store::is_failed(self)
    }

    fn begin_batch(&self) {
        self.begin_batch_scope();
    }

    fn end_batch(&self) {
        self.end_batch_scope();
    }

    fn figures(&self) -> Option<JournalFigures> {
        Some(Store::figures(self))
    }

    fn close(&self) {
        Store::close(self);
    }
}
