//! Retained messages: the last retained message per topic, delivered on subscribe.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::time::Instant;

use crate::session::journal::{Journal, NoJournal, RetainedChange};
use crate::stats::Stats;
use crate::wire::message::Message;
use crate::wire::topic;

/// The retained-message store. Owned by the `Broker`; sharded so retained publishes on
/// different topics do not contend.
#[derive(Debug)]
pub struct RetainStore {
    /// Topic name -> last retained message.
    messages: DashMap<String, Arc<Message>>,
    /// Most topics with a retained message; a new topic past it is not stored (counted).
    max_messages: usize,
    /// Most bytes (`Message::size`) held; a retained message that would pass it is not
    /// stored (counted).
    max_bytes: usize,
    /// Bytes held now; updated under the shard lock of the topic that changes.
    bytes: AtomicUsize,
    /// Topics held now. Kept apart from `messages.len()`, which locks every shard and so
    /// would deadlock if called while an entry guard is held.
    count: AtomicUsize,
}

impl RetainStore {
    /// An empty store holding at most `max_messages` topics and `max_bytes` bytes.
    pub fn new(max_messages: usize, max_bytes: usize) -> RetainStore {
        RetainStore {
            messages: DashMap::new(),
            max_messages,
            max_bytes,
            bytes: AtomicUsize::new(0),
            count: AtomicUsize::new(0),
        }
    }

    /// Store, replace, or (empty payload) delete the retained message of `msg.topic`
    /// [MQTT-3.3.1-5, 3.3.1-10, 3.3.1-11].
    pub fn set(&self, msg: &Arc<Message>, stats: &Stats) {
        self.set_journaled(msg, stats, &NoJournal);
    }

    /// `set`, writing the change to `journal` under the topic's shard lock, so two racing
    /// retained publishes reach the journal in the order they reached memory.
    pub fn set_journaled(&self, msg: &Arc<Message>, stats: &Stats, journal: &dyn Journal) {
        if msg.payload.is_empty() {
            // Logged inside `remove_if`, under the shard lock, like the updates below.
            let removed = self.messages.remove_if(&msg.topic, |topic, _| {
                journal.retained(RetainedChange::Cleared(topic));
                true
            });
            if let Some((_, old)) = removed {
                self.forget(&old);
            }
            return;
        }
        let size = msg.size();
        match self.messages.entry(msg.topic.clone()) {
            Entry::Occupied(mut o) => {
                let old = o.get().size();
                if self.bytes.load(Ordering::Relaxed) - old + size > self.max_bytes {
                    Stats::incr(&stats.dropped_retained_full);
                    return;
                }
                o.insert(msg.clone());
                self.bytes.fetch_sub(old, Ordering::Relaxed);
                self.bytes.fetch_add(size, Ordering::Relaxed);
                journal.retained(RetainedChange::Set(msg));
            }
            Entry::Vacant(v) => {
                if self.count.load(Ordering::Relaxed) >= self.max_messages
                    || self.bytes.load(Ordering::Relaxed) + size > self.max_bytes
                {
                    Stats::incr(&stats.dropped_retained_full);
                    return;
                }
                v.insert(msg.clone());
                self.bytes.fetch_add(size, Ordering::Relaxed);
                self.count.fetch_add(1, Ordering::Relaxed);
                journal.retained(RetainedChange::Set(msg));
            }
        }
    }

    fn forget(&self, old: &Message) {
        self.bytes.fetch_sub(old.size(), Ordering::Relaxed);
        self.count.fetch_sub(1, Ordering::Relaxed);
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Retained messages whose topic matches `filter` and which have not expired.
    pub fn matching(&self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        if !topic::has_wildcard(filter) {
            return self
                .messages
                .get(filter)
                .map(|m| m.clone())
                .filter(|m| !m.expired(now))
                .into_iter()
                .collect();
        }
        let mut expired = Vec::new();
        let mut found = Vec::new();
        for entry in self.messages.iter() {
            if topic::matches(filter, entry.key()) {
                if entry.value().expired(now) {
                    expired.push(entry.key().clone());
                } else {
                    found.push(entry.value().clone());
                }
            }
        }
        // Removed after the iteration: removing under an iterator's shard guard deadlocks.
        for topic in expired {
            if let Some((_, old)) = self.messages.remove_if(&topic, |_, m| m.expired(now)) {
                self.forget(&old);
            }
        }
        found
    }

    /// Topics with a retained message.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::packet::QoS;

    fn retained(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(payload),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
            expires_at: None,
            publisher: None,
            stored: Default::default(),
            encoded: Default::default(),
        })
    }

    #[test]
    fn byte_limit_counts_replacements_and_deletions() {
        let stats = Stats::default();
        // Each message: 3-byte topic + payload.
        let store = RetainStore::new(100, 20);
        store.set(&retained("a/1", b"0123456"), &stats); // 10 bytes
        store.set(&retained("a/2", b"0123456"), &stats); // 20 bytes: full
        store.set(&retained("a/3", b"0"), &stats); // would pass the limit
        assert_eq!(Stats::get(&stats.dropped_retained_full), 1);
        assert_eq!((store.len(), store.bytes()), (2, 20));
        // A smaller replacement fits and frees the difference.
        store.set(&retained("a/1", b"0"), &stats);
        assert_eq!(store.bytes(), 14);
        // An empty payload deletes and frees.
        store.set(&retained("a/2", b""), &stats);
        assert_eq!((store.len(), store.bytes()), (1, 4));
        store.set(&retained("a/3", b"0"), &stats);
        assert_eq!(store.len(), 2);
    }
}
