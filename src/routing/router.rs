//! Routing: which sessions get a published message, and at what QoS.
//!
//! A thin layer over the topic-filter index (`index::TopicIndex`): it stores, per (filter,
//! Client ID), the session's mailbox and subscription options, and turns one published message
//! into one delivery per matching session. Routing pushes into mailboxes synchronously, so a
//! publish has reached every matching session's queue before the publisher is acknowledged.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;

use crate::routing::index::TopicIndex;
use crate::session::mailbox::{Mailbox, Pushed};
use crate::session::Subscription;
use crate::stats::Stats;
use crate::wire::message::{Delivery, Message};
use crate::wire::packet::QoS;
use crate::wire::topic;

/// What the index stores for one subscription.
#[derive(Debug, Clone)]
pub struct SubEntry {
    /// The subscribing session's queue.
    pub mailbox: Arc<Mailbox>,
    /// Its options.
    pub sub: Subscription,
}

/// One member of a shared subscription group.
#[derive(Debug, Clone)]
struct Member {
    client_id: Arc<str>,
    entry: SubEntry,
}

/// A shared subscription `$share/{group}/{filter}`: each message goes to one member.
#[derive(Debug, Default)]
pub struct SharedGroup {
    /// Members in subscription order; a std mutex held only to pick or edit a member.
    members: Mutex<Vec<Member>>,
    /// Round-robin cursor.
    next: AtomicUsize,
}

impl SharedGroup {
    fn len(&self) -> usize {
        self.members().len()
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Vec<Member>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pick the member for the next message: round-robin over members that are connected and
    /// whose queue has room, so an offline or slow member is not a black hole; when none
    /// can take it now, the next member in turn queues it (its queue limits apply).
    fn pick(&self) -> Option<SubEntry> {
        let members = self.members();
        let n = members.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let ready = (0..n)
            .map(|i| &members[(start + i) % n])
            .find(|m| m.entry.mailbox.can_take_now());
        Some(ready.unwrap_or(&members[start]).entry.clone())
    }
}

/// What the index stores under one (filter, key).
#[derive(Debug, Clone)]
enum Target {
    /// An ordinary subscription of the session named by the key.
    Direct(SubEntry),
    /// A shared subscription group; the key is the group's reserved name.
    Shared(Arc<SharedGroup>),
}

/// The router. Owned by the `Broker`; its index takes concurrent readers (publishers) and
/// short exclusive writers (subscribe/unsubscribe).
#[derive(Default)]
pub struct Router {
    index: TopicIndex<Target>,
    /// (share name, filter) -> group. Its shard lock also serialises the index insert and
    /// remove of that group, so a group is in the index exactly while it has members.
    groups: DashMap<(Box<str>, Box<str>), Arc<SharedGroup>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("subscriptions", &self.index.len())
            .finish()
    }
}

/// The index key of a shared group. Client IDs cannot contain U+0000, so it never collides.
fn group_key(share: &str) -> Arc<str> {
    format!("\0{share}").into()
}

impl Router {
    /// Add or replace `client_id`'s subscription to `filter` (which may be a
    /// `$share/{group}/{filter}` shared subscription; the caller validated it).
    pub fn subscribe(&self, client_id: &Arc<str>, filter: &str, entry: SubEntry) {
        match topic::parse_shared(filter) {
            Ok(Some((share, inner))) => {
                let group = self
                    .groups
                    .entry((share.into(), inner.into()))
                    .or_insert_with(|| {
                        let g = Arc::new(SharedGroup::default());
                        self.index
                            .insert(inner, &group_key(share), Target::Shared(g.clone()));
                        g
                    });
                let mut members = group.members();
                members.retain(|m| m.client_id != *client_id);
                members.push(Member {
                    client_id: client_id.clone(),
                    entry,
                });
            }
            _ => {
                self.index.insert(filter, client_id, Target::Direct(entry));
            }
        }
    }

    /// Remove `client_id`'s subscription to `filter` if it belongs to the session owning
    /// `mailbox` (a later session of the same Client ID may have subscribed it anew).
    pub fn unsubscribe(&self, client_id: &Arc<str>, filter: &str, mailbox: &Arc<Mailbox>) {
        match topic::parse_shared(filter) {
            Ok(Some((share, inner))) => {
                let key = (Box::<str>::from(share), Box::<str>::from(inner));
                self.groups.remove_if(&key, |_, group| {
                    // The members lock is released before the index write lock is taken:
                    // routing holds the index read lock while it takes a members lock.
                    let empty = {
                        let mut members = group.members();
                        members.retain(|m| {
                            !(m.client_id == *client_id && Arc::ptr_eq(&m.entry.mailbox, mailbox))
                        });
                        members.is_empty()
                    };
                    if empty {
                        self.index.remove(inner, &group_key(share));
                    }
                    empty
                });
            }
            _ => {
                self.index.remove_if(
                    filter,
                    client_id,
                    |old| matches!(old, Target::Direct(e) if Arc::ptr_eq(&e.mailbox, mailbox)),
                );
            }
        }
    }

    /// Give back memory after many subscriptions were removed.
    pub fn compact(&self) {
        self.index.compact();
    }

    /// Entries in the index: one per ordinary subscription, one per shared group.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when nobody subscribes to anything.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Deliver `msg` to every matching session. One session with several matching
    /// subscriptions gets one copy at the highest granted QoS, carrying every Subscription
    /// Identifier [MQTT-3.3.5-1]. Returns the number of matching sessions: those it was queued
    /// for and those whose queue limits dropped it (they are subscribers all the same; only a
    /// session that has ended is not counted).
    pub fn route(&self, msg: &Arc<Message>, stats: &Stats) -> usize {
        self.route_into(msg, stats, None)
    }

    /// `route`, also collecting into `congested` the queues this message left `congested`
    /// (back-pressure for the publisher, see `Mailbox::congested`).
    pub fn route_into(
        &self,
        msg: &Arc<Message>,
        stats: &Stats,
        mut congested: Option<&mut Vec<Arc<Mailbox>>>,
    ) -> usize {
        let mut targets: Vec<(Arc<Mailbox>, Subscription)> = Vec::new();
        let mut shared: Vec<Arc<SharedGroup>> = Vec::new();
        self.index
            .for_each_match(&msg.topic, |client_id, target| match target {
                Target::Direct(e) => {
                    if e.sub.no_local && msg.publisher.as_deref() == Some(&**client_id) {
                        return;
                    }
                    targets.push((e.mailbox.clone(), e.sub));
                }
                Target::Shared(group) => shared.push(group.clone()),
            });
        let mut matched = 0;
        // A shared delivery is separate from the session's ordinary subscriptions. A member
        // whose session ended a moment ago is skipped for the next one in turn.
        for group in shared {
            let mut refused = false;
            let mut taken = false;
            for _ in 0..group.len() {
                let Some(e) = group.pick() else { break };
                let ids = e.sub.identifier.into_iter().collect();
                match deliver(
                    &e.mailbox,
                    msg,
                    e.sub.qos,
                    e.sub.retain_as_published,
                    ids,
                    stats,
                ) {
                    // Gone, or not allowed to read it: the next member in turn.
                    Pushed::Closed => continue,
                    Pushed::Denied => {
                        refused = true;
                        continue;
                    }
                    _ => {
                        matched += 1;
                        taken = true;
                        if let Some(c) = congested.as_deref_mut() {
                            if e.mailbox.congested() {
                                c.push(e.mailbox.clone());
                            }
                        }
                        break;
                    }
                }
            }
            if refused && !taken {
                // No member may read it: one refusal for the group, not one per member.
                Stats::incr(&stats.acl_denied_delivery);
            }
        }
        if targets.len() > 1 {
            targets.sort_unstable_by_key(|(mb, _)| Arc::as_ptr(mb) as usize);
        }
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
            let pushed = deliver(mailbox, msg, qos, retain_as_published, ids, stats);
            matched += usize::from(!matches!(pushed, Pushed::Closed | Pushed::Denied));
            if pushed == Pushed::Denied {
                Stats::incr(&stats.acl_denied_delivery);
            }
            if let Some(c) = congested.as_deref_mut() {
                if mailbox.congested() {
                    c.push(mailbox.clone());
                }
            }
            i = j;
        }
        matched
    }
}

/// Queue one delivery of `msg` granted at `granted`.
fn deliver(
    mailbox: &Mailbox,
    msg: &Arc<Message>,
    granted: QoS,
    retain_as_published: bool,
    subscription_ids: Vec<u32>,
    stats: &Stats,
) -> Pushed {
    mailbox.push(
        Delivery {
            msg: msg.clone(),
            qos: granted.min(msg.qos),
            // Messages forwarded to existing subscriptions carry RETAIN = 0 unless the v5
            // subscription asked for Retain As Published [MQTT-3.3.1-9, 3.3.1-12].
            retain: msg.retain && retain_as_published,
            subscription_ids,
            seq: 0,
            acl_epoch: 0,
        },
        stats,
    )
}
