//! Routing: which sessions get a published message, and at what QoS.
//!
//! A thin layer over the topic-filter index (`index::TopicIndex`): it stores, per (filter,
//! Client ID), the session's mailbox and subscription options, and turns one published message
//! into one delivery per matching session. Routing pushes into mailboxes synchronously, so a
//! publish has reached every matching session's queue before the publisher is acknowledged.

use std::sync::Arc;

use crate::index::TopicIndex;
use crate::mailbox::Mailbox;
use crate::message::{Delivery, Message};
use crate::session::Subscription;
use crate::stats::Stats;

/// What the index stores for one subscription.
#[derive(Debug, Clone)]
pub struct SubEntry {
    /// The subscribing session's queue.
    pub mailbox: Arc<Mailbox>,
    /// Its options.
    pub sub: Subscription,
}

/// The router. Owned by the `Broker`; its index takes concurrent readers (publishers) and
/// short exclusive writers (subscribe/unsubscribe).
#[derive(Default)]
pub struct Router {
    index: TopicIndex<SubEntry>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("subscriptions", &self.index.len())
            .finish()
    }
}

impl Router {
    /// Add or replace `client_id`'s subscription to `filter`.
    pub fn subscribe(&self, client_id: &Arc<str>, filter: &str, entry: SubEntry) {
        self.index.insert(filter, client_id, entry);
    }

    /// Remove `client_id`'s subscription to `filter` if it belongs to the session owning
    /// `mailbox` (a later session of the same Client ID may have subscribed it anew).
    pub fn unsubscribe(&self, client_id: &Arc<str>, filter: &str, mailbox: &Arc<Mailbox>) {
        if let Some(old) = self.index.remove(filter, client_id) {
            if !Arc::ptr_eq(&old.mailbox, mailbox) {
                self.index.insert(filter, client_id, old);
            }
        }
    }

    /// Total (filter, session) subscriptions.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when nobody subscribes to anything.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Deliver `msg` to every matching session. One session with several matching
    /// subscriptions gets one copy at the highest granted QoS, carrying every Subscription
    /// Identifier [MQTT-3.3.5-1]. Returns the number of sessions it was queued for.
    pub fn route(&self, msg: &Arc<Message>, stats: &Stats) -> usize {
        let mut targets: Vec<(Arc<Mailbox>, Subscription)> = Vec::new();
        self.index.for_each_match(&msg.topic, |client_id, e| {
            if e.sub.no_local && msg.publisher.as_deref() == Some(&**client_id) {
                return;
            }
            targets.push((e.mailbox.clone(), e.sub));
        });
        if targets.len() > 1 {
            targets.sort_unstable_by_key(|(mb, _)| Arc::as_ptr(mb) as usize);
        }
        let mut queued = 0;
        let mut i = 0;
        while i < targets.len() {
            let mailbox = &targets[i].0;
            let mut qos = targets[i].1.qos;
            let mut retain_as_published = targets[i].1.retain_as_published;
            let mut ids: Vec<u32> = targets[i].1.identifier.into_iter().collect();
            let mut j = i + 1;
            while j < targets.len() && Arc::ptr_eq(&targets[j].0, mailbox) {
                let s = &targets[j].1;
                qos = qos.max(s.qos);
                retain_as_published |= s.retain_as_published;
                ids.extend(s.identifier);
                j += 1;
            }
            let delivery = Delivery {
                msg: msg.clone(),
                qos: qos.min(msg.qos),
                // Messages forwarded to existing subscriptions carry RETAIN = 0 unless the v5
                // subscription asked for Retain As Published [MQTT-3.3.1-9, 3.3.1-12].
                retain: msg.retain && retain_as_published,
                subscription_ids: ids,
            };
            if matches!(
                mailbox.push(delivery, stats),
                crate::mailbox::Pushed::Queued | crate::mailbox::Pushed::QueuedDroppingOldest(_)
            ) {
                queued += 1;
            }
            i = j;
        }
        queued
    }
}
