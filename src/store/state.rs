//! The stored state as replaying the log builds it, used by recovery (to rebuild sessions) and
//! by compaction (to write it back as a snapshot without the dead records).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::session::OutState;
use crate::wire::message::{Delivery, Message};

use super::record::Record;
use crate::session::journal::SessionImage;

/// One queued or in-flight message of a stored session.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The `Message` record it refers to (meaningful only while its file is replayed).
    pub msg_id: u64,
    /// The delivery, with its queue number in `seq`.
    pub delivery: Delivery,
    /// Packet id and flow state once it was sent.
    pub sent: Option<(u16, OutState)>,
}

/// One stored session.
#[derive(Debug, Clone)]
pub struct StoredSession {
    /// Everything but the messages.
    pub meta: SessionImage,
    /// Queue number -> message, oldest first.
    pub queue: BTreeMap<u64, Entry>,
    /// Inbound QoS 2 packet ids awaiting PUBREL.
    pub inbound: BTreeSet<u16>,
}

/// Hashes the store's own numbers (incarnations, message ids), which no client chooses, with
/// one multiplication: replay and compaction look one up for nearly every record, and SipHash
/// was a fifth of compaction's time.
#[derive(Default, Clone, Copy)]
pub struct NumberHasher(u64);

impl std::hash::Hasher for NumberHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type NumberMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<NumberHasher>>;

/// A `Message` record met in the file being replayed.
#[derive(Debug)]
enum Slot {
    /// Where its message is in the file's bytes (decoded only if still needed at the end).
    Raw(usize, usize),
    /// Decoded.
    Decoded(Arc<Message>),
}

/// Stands for the message of an entry until its file ends (`State::end_file`).
fn placeholder() -> Arc<Message> {
    static P: std::sync::OnceLock<Arc<Message>> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        Arc::new(Message {
            topic: String::new(),
            payload: bytes::Bytes::new(),
            qos: crate::wire::packet::QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            publisher: None,
            stored: Default::default(),
            encoded: Default::default(),
        })
    })
    .clone()
}

/// Everything stored.
#[derive(Debug, Default)]
pub struct State {
    /// Incarnation -> session.
    pub sessions: NumberMap<StoredSession>,
    /// Client ID -> incarnation of its session in `sessions`.
    clients: HashMap<Arc<str>, u64>,
    /// `Message` records of the file being replayed (a file only refers to its own).
    messages: NumberMap<Slot>,
    /// Sessions with entries of the file being replayed that hold the placeholder for their
    /// message, which `end_file` decodes if the entry is still queued then: incarnation ->
    /// the first such entry (later ones of the session are all of this file). Most are
    /// finished before their file ends, and their messages are never decoded.
    undecoded: NumberMap<u64>,
    /// Topic -> retained message.
    pub retained: HashMap<String, Arc<Message>>,
    /// Highest session incarnation seen, so new ones never reuse a number.
    pub max_incarnation: u64,
    /// Records applied.
    pub records: u64,
    /// `Enqueue` records whose message was not in their file (a writer bug; they are
    /// skipped and reported rather than refusing to start).
    pub missing_messages: u64,
}

impl State {
    fn session(&mut self, incarnation: u64) -> Option<&mut StoredSession> {
        self.sessions.get_mut(&incarnation)
    }

    /// The stored session of a Client ID.
    pub fn by_client(&self, client_id: &str) -> Option<&StoredSession> {
        self.sessions.get(self.clients.get(client_id)?)
    }

    /// Apply one record. Records naming an ended or replaced session are ignored.
    pub fn apply(&mut self, rec: Record) {
        self.records += 1;
        match rec {
            Record::Session(meta) => {
                let meta = *meta;
                self.max_incarnation = self.max_incarnation.max(meta.incarnation);
                if let Some(s) = self.sessions.get_mut(&meta.incarnation) {
                    s.meta = meta;
                    return;
                }
                // A new incarnation replaces the Client ID's previous session entirely.
                if let Some(old) = self
                    .clients
                    .insert(meta.client_id.clone(), meta.incarnation)
                {
                    self.sessions.remove(&old);
                }
                self.sessions.insert(
                    meta.incarnation,
                    StoredSession {
                        meta,
                        queue: BTreeMap::new(),
                        inbound: BTreeSet::new(),
                    },
                );
            }
            Record::SessionEnd { incarnation } => {
                if let Some(s) = self.sessions.remove(&incarnation) {
                    self.clients.remove(&s.meta.client_id);
                }
            }
            Record::Message { id, msg } => {
                self.messages.insert(id, Slot::Decoded(msg));
            }
            Record::Enqueue {
                incarnation,
                seq,
                msg,
                qos,
                retain,
                subscription_ids,
            } => {
                let message = match self.messages.get(&msg) {
                    None => {
                        self.missing_messages += 1;
                        return;
                    }
                    Some(Slot::Decoded(m)) => m.clone(),
                    Some(Slot::Raw(..)) => placeholder(),
                };
                let lazy = Arc::ptr_eq(&message, &placeholder());
                if let Some(s) = self.session(incarnation) {
                    s.queue.insert(
                        seq,
                        Entry {
                            msg_id: msg,
                            delivery: Delivery {
                                msg: message,
                                qos,
                                retain,
                                subscription_ids,
                                seq,
                                acl_epoch: 0,
                            },
                            sent: None,
                        },
                    );
                    if lazy {
                        self.undecoded.entry(incarnation).or_insert(seq);
                    }
                }
            }
            Record::Sent {
                incarnation,
                seq,
                packet_id,
                state,
            } => {
                if let Some(e) = self
                    .session(incarnation)
                    .and_then(|s| s.queue.get_mut(&seq))
                {
                    e.sent = Some((packet_id, state));
                }
            }
            Record::SentRange {
                incarnation,
                first,
                count,
                packet_id,
                state,
            } => {
                if let Some(s) = self.session(incarnation) {
                    for (i, e) in s.queue.range_mut(first..first.saturating_add(count)) {
                        let pid = super::record::packet_id_after(packet_id, i - first);
                        e.sent = Some((pid, state));
                    }
                }
            }
            Record::DoneRange {
                incarnation,
                first,
                count,
            } => {
                if let Some(s) = self.session(incarnation) {
                    // Steps over the entries there are, however large the range says it is.
                    let end = first.saturating_add(count);
                    while let Some((&seq, _)) = s.queue.range(first..end).next() {
                        s.queue.remove(&seq);
                    }
                }
            }
            Record::Done { incarnation, seq } => {
                if let Some(s) = self.session(incarnation) {
                    s.queue.remove(&seq);
                }
            }
            Record::Inbound {
                incarnation,
                packet_id,
                added,
            } => {
                if let Some(s) = self.session(incarnation) {
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

    /// A `Message` record `id` whose message is `data[start..end]` of the file being replayed.
    pub fn raw_message(&mut self, id: u64, start: usize, end: usize) {
        self.records += 1;
        self.messages.insert(id, Slot::Raw(start, end));
    }

    /// The end of a file whose bytes are `data`: the messages of its entries still queued are
    /// decoded, and the file's `Message` records forgotten (later files never refer to them).
    pub fn end_file(&mut self, data: &[u8]) -> Result<(), super::record::DecodeError> {
        let placeholder = placeholder();
        let mut decoded: NumberMap<Arc<Message>> = NumberMap::default();
        for (incarnation, first) in std::mem::take(&mut self.undecoded) {
            let Some(s) = self.sessions.get_mut(&incarnation) else {
                continue;
            };
            for e in s.queue.range_mut(first..).map(|(_, e)| e) {
                if !Arc::ptr_eq(&e.delivery.msg, &placeholder) {
                    continue;
                }
                let id = e.msg_id;
                let msg = match decoded.get(&id) {
                    Some(m) => m.clone(),
                    None => {
                        let m = match self.messages.get(&id) {
                            Some(Slot::Raw(start, end)) => Arc::new(super::record::decode_message(
                                data.get(*start..*end)
                                    .ok_or(super::record::DecodeError("message out of range"))?,
                            )?),
                            Some(Slot::Decoded(m)) => m.clone(),
                            None => return Err(super::record::DecodeError("message lost")),
                        };
                        decoded.insert(id, m.clone());
                        m
                    }
                };
                e.delivery.msg = msg;
            }
        }
        self.messages.clear();
        Ok(())
    }

    /// The records that rebuild this state, without what has expired: the content of a
    /// snapshot. Messages whose Message Expiry passed are left out (they could never be
    /// delivered); sessions are kept, their expiry is the broker's to decide. Each message is
    /// written once, before the first entry that refers to it, numbered anew: ids are only
    /// unique within the file that wrote them, and a snapshot merges several files.
    pub fn records(&self) -> impl Iterator<Item = Record> + '_ {
        let now = tokio::time::Instant::now();
        let mut ids: HashMap<*const Message, u64> = HashMap::new();
        let sessions = self.sessions.values().flat_map(move |s| {
            let inc = s.meta.incarnation;
            let queue: Vec<Record> = s
                .queue
                .iter()
                // In-flight ones stay even when expired: the client may hold them.
                .filter(|(_, e)| e.sent.is_some() || !e.delivery.msg.expired(now))
                .flat_map(|(seq, e)| {
                    let next = ids.len() as u64 + 1;
                    let id = *ids.entry(Arc::as_ptr(&e.delivery.msg)).or_insert(next);
                    let msg = (id == next).then(|| Record::Message {
                        id,
                        msg: e.delivery.msg.clone(),
                    });
                    let enq = Record::Enqueue {
                        incarnation: inc,
                        seq: *seq,
                        msg: id,
                        qos: e.delivery.qos,
                        retain: e.delivery.retain,
                        subscription_ids: e.delivery.subscription_ids.clone(),
                    };
                    let sent = e.sent.map(|(packet_id, state)| Record::Sent {
                        incarnation: inc,
                        seq: *seq,
                        packet_id,
                        state,
                    });
                    msg.into_iter().chain(std::iter::once(enq)).chain(sent)
                })
                .collect();
            std::iter::once(Record::Session(Box::new(s.meta.clone())))
                .chain(queue)
                .chain(s.inbound.iter().map(move |p| Record::Inbound {
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
