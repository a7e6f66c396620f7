//! Retained messages: the last retained message per topic, delivered on subscribe.

use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::time::Instant;

use crate::message::Message;
use crate::stats::Stats;
use crate::store::record::Record;
use crate::store::Store;
use crate::topic;

/// The retained-message store. Owned by the `Broker`; sharded so retained publishes on
/// different topics do not contend.
#[derive(Debug)]
pub struct RetainStore {
    /// Topic name -> last retained message.
    messages: DashMap<String, Arc<Message>>,
    /// Most topics with a retained message; a new topic past it is not stored (counted).
    max_messages: usize,
}

impl RetainStore {
    /// An empty store holding at most `max_messages` topics.
    pub fn new(max_messages: usize) -> RetainStore {
        RetainStore {
            messages: DashMap::new(),
            max_messages,
        }
    }

    /// Store, replace, or (empty payload) delete the retained message of `msg.topic`
    /// [MQTT-3.3.1-5, 3.3.1-10, 3.3.1-11].
    pub fn set(&self, msg: &Arc<Message>, stats: &Stats) {
        self.set_logged(msg, stats, None);
    }

    /// `set`, writing the change to `store` (when given) under the topic's shard lock, so two
    /// racing retained publishes reach the store in the order they reached memory.
    pub fn set_logged(&self, msg: &Arc<Message>, stats: &Stats, store: Option<&Store>) {
        if msg.payload.is_empty() {
            if let Some((topic, _)) = self.messages.remove(&msg.topic) {
                if let Some(store) = store {
                    store.append(&Record::RetainDel(topic), true);
                }
            }
            return;
        }
        if self.messages.len() >= self.max_messages && !self.messages.contains_key(&msg.topic) {
            Stats::incr(&stats.dropped_retained_full);
            return;
        }
        match self.messages.entry(msg.topic.clone()) {
            Entry::Occupied(mut o) => {
                o.insert(msg.clone());
                if let Some(store) = store {
                    store.append(&Record::RetainSet(msg.clone()), true);
                }
            }
            Entry::Vacant(v) => {
                v.insert(msg.clone());
                if let Some(store) = store {
                    store.append(&Record::RetainSet(msg.clone()), true);
                }
            }
        }
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
            self.messages.remove_if(&topic, |_, m| m.expired(now));
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
