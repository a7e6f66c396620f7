//! The stored state as replaying the log builds it, used by recovery (to rebuild sessions) and
//! by compaction (to write it back as a snapshot without the dead records).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::message::{Delivery, Message};
use crate::session::OutState;

use super::record::{Record, SessionMeta};

/// One queued or in-flight message of a stored session.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The delivery, with its queue number in `seq`.
    pub delivery: Delivery,
    /// Packet id and flow state once it was sent.
    pub sent: Option<(u16, OutState)>,
}

/// One stored session.
#[derive(Debug, Clone)]
pub struct StoredSession {
    /// Everything but the messages.
    pub meta: SessionMeta,
    /// Queue number -> message, oldest first.
    pub queue: BTreeMap<u64, Entry>,
    /// Inbound QoS 2 packet ids awaiting PUBREL.
    pub inbound: BTreeSet<u16>,
}

/// Everything stored.
#[derive(Debug, Default)]
pub struct State {
    /// Client ID -> session.
    pub sessions: HashMap<Arc<str>, StoredSession>,
    /// Topic -> retained message.
    pub retained: HashMap<String, Arc<Message>>,
    /// Highest session incarnation seen, so new ones never reuse a number.
    pub max_incarnation: u64,
    /// Records applied.
    pub records: u64,
}

impl State {
    fn session(&mut self, client_id: &str, incarnation: u64) -> Option<&mut StoredSession> {
        self.sessions
            .get_mut(client_id)
            .filter(|s| s.meta.incarnation == incarnation)
    }

    /// Apply one record. Records naming an ended or replaced session are ignored.
    pub fn apply(&mut self, rec: Record) {
        self.records += 1;
        match rec {
            Record::Session(meta) => {
                self.max_incarnation = self.max_incarnation.max(meta.incarnation);
                match self.sessions.get_mut(&meta.client_id) {
                    Some(s) if s.meta.incarnation == meta.incarnation => s.meta = meta,
                    _ => {
                        self.sessions.insert(
                            meta.client_id.clone(),
                            StoredSession {
                                meta,
                                queue: BTreeMap::new(),
                                inbound: BTreeSet::new(),
                            },
                        );
                    }
                }
            }
            Record::SessionEnd {
                client_id,
                incarnation,
            } => {
                if self.session(&client_id, incarnation).is_some() {
                    self.sessions.remove(&client_id);
                }
            }
            Record::Enqueue {
                client_id,
                incarnation,
                seq,
                delivery,
            } => {
                if let Some(s) = self.session(&client_id, incarnation) {
                    s.queue.insert(
                        seq,
                        Entry {
                            delivery,
                            sent: None,
                        },
                    );
                }
            }
            Record::Sent {
                client_id,
                incarnation,
                seq,
                packet_id,
                state,
            } => {
                if let Some(e) = self
                    .session(&client_id, incarnation)
                    .and_then(|s| s.queue.get_mut(&seq))
                {
                    e.sent = Some((packet_id, state));
                }
            }
            Record::Done {
                client_id,
                incarnation,
                seq,
            } => {
                if let Some(s) = self.session(&client_id, incarnation) {
                    s.queue.remove(&seq);
                }
            }
            Record::Inbound {
                client_id,
                incarnation,
                packet_id,
                added,
            } => {
                if let Some(s) = self.session(&client_id, incarnation) {
                    if added {
                        s.inbound.insert(packet_id);
                    } else {
                        s.inbound.remove(&packet_id);
                    }
                }
            }
            Record::RetainSet(m) => {
                self.retained.insert(m.topic.clone(), m);
            }
            Record::RetainDel(topic) => {
                self.retained.remove(&topic);
            }
        }
    }

    /// The records that rebuild this state, without what has expired: the content of a
    /// snapshot. Messages whose Message Expiry passed are left out (they could never be
    /// delivered); sessions are kept, their expiry is the broker's to decide.
    pub fn records(&self) -> impl Iterator<Item = Record> + '_ {
        let now = tokio::time::Instant::now();
        let sessions = self.sessions.values().flat_map(move |s| {
            let c = &s.meta.client_id;
            let inc = s.meta.incarnation;
            std::iter::once(Record::Session(s.meta.clone()))
                .chain(
                    s.queue
                        .iter()
                        // In-flight ones stay even when expired: the client may hold them.
                        .filter(move |(_, e)| e.sent.is_some() || !e.delivery.msg.expired(now))
                        .flat_map(move |(seq, e)| {
                            let enq = Record::Enqueue {
                                client_id: c.clone(),
                                incarnation: inc,
                                seq: *seq,
                                delivery: e.delivery.clone(),
                            };
                            let sent = e.sent.map(|(packet_id, state)| Record::Sent {
                                client_id: c.clone(),
                                incarnation: inc,
                                seq: *seq,
                                packet_id,
                                state,
                            });
                            std::iter::once(enq).chain(sent)
                        }),
                )
                .chain(s.inbound.iter().map(move |p| Record::Inbound {
                    client_id: c.clone(),
                    incarnation: inc,
                    packet_id: *p,
                    added: true,
                }))
        });
        let retained = self
            .retained
            .values()
            .filter(move |m| !m.expired(now))
            .map(|m| Record::RetainSet(m.clone()));
        sessions.chain(retained)
    }
}
