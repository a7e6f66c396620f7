//! The topic-filter index consulted for every PUBLISH.
//!
//! Two structures, because real subscription sets are dominated by plain names:
//!
//! * filters without wildcards live in a sharded `DashMap` keyed by the filter itself, so routing
//!   to them is one hash lookup that only contends with writers on the same shard;
//! * wildcard filters live in a level trie behind a `std::sync::RwLock`: publishers share the read
//!   guard, SUBSCRIBE/UNSUBSCRIBE take the write guard for the length of one walk down a filter.
//!
//! Filters can be up to 65,535 bytes, i.e. up to 32,768 levels of `+`, and clients choose them.
//! Nothing here recurses over levels (walks use loops or an explicit stack, and `Node` has an
//! iterative `Drop`) so a hostile filter cannot overflow a task's stack.
//!
//! Both the index and its callers treat filters as already validated by
//! [`crate::wire::topic::valid_topic_filter`], with any `$share/{name}/` prefix already stripped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use dashmap::DashMap;

use crate::wire::topic::has_wildcard;

/// Subscribers of one filter, keyed by Client ID. Nearly every filter has one subscriber (a
/// device's own topics), so that one sits inline and only a second brings a hash map.
#[derive(Default)]
enum Entries<V> {
    #[default]
    Empty,
    One(Arc<str>, V),
    // Boxed on purpose: a bare map would make every filter's entry 48 bytes, however few
    // subscribers it has.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<Arc<str>, V>>),
}

impl<V> Entries<V> {
    fn insert(&mut self, key: Arc<str>, value: V) -> Option<V> {
        match self {
            Entries::Empty => {
                *self = Entries::One(key, value);
                None
            }
            Entries::One(k, v) if *k == key => Some(std::mem::replace(v, value)),
            Entries::One(..) => {
                let Entries::One(k, v) = std::mem::take(self) else {
                    unreachable!("matched One above")
                };
                let mut map = HashMap::with_capacity(2);
                map.insert(k, v);
                map.insert(key, value);
                *self = Entries::Many(Box::new(map));
                None
            }
            Entries::Many(map) => map.insert(key, value),
        }
    }

    fn get(&self, key: &str) -> Option<&V> {
        match self {
            Entries::Empty => None,
            Entries::One(k, v) => (**k == *key).then_some(v),
            Entries::Many(map) => map.get(key),
        }
    }

    fn remove(&mut self, key: &str) -> Option<V> {
        match self {
            Entries::Empty => None,
            Entries::One(k, _) if **k != *key => None,
            Entries::One(..) => match std::mem::take(self) {
                Entries::One(_, v) => Some(v),
                _ => None,
            },
            Entries::Many(map) => {
                let removed = map.remove(key);
                if map.is_empty() {
                    *self = Entries::Empty;
                }
                removed
            }
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Entries::Empty)
    }

    fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &V)> {
        let (one, many) = match self {
            Entries::Empty => (None, None),
            Entries::One(k, v) => (Some((k, v)), None),
            Entries::Many(map) => (None, Some(map.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

/// The entries of a trie node, boxed apart from the node: most nodes are inner levels of
/// longer filters and hold none.
struct NodeEntries<V> {
    /// Entries whose filter ends exactly at this node.
    here: Entries<V>,
    /// Entries whose filter is this node's prefix followed by `/#` (or is `#` at the root).
    hash: Entries<V>,
}

/// Literal next levels of a node. Few levels have more than a handful of children (the wide
/// ones are levels like a device id), and a short list compares a few strings faster than it
/// hashes one, with no table allocated.
enum Children<V> {
    Few(Vec<(Box<str>, Node<V>)>),
    // Boxed on purpose, as `Entries::Many`.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<Box<str>, Node<V>>>),
}

/// Children beyond this many go into a hash map.
const FEW_CHILDREN: usize = 8;

impl<V> Children<V> {
    fn get(&self, level: &str) -> Option<&Node<V>> {
        match self {
            Children::Few(v) => v.iter().find(|(k, _)| **k == *level).map(|(_, n)| n),
            Children::Many(map) => map.get(level),
        }
    }

    fn get_mut(&mut self, level: &str) -> Option<&mut Node<V>> {
        match self {
            Children::Few(v) => v.iter_mut().find(|(k, _)| **k == *level).map(|(_, n)| n),
            Children::Many(map) => map.get_mut(level),
        }
    }

    fn get_or_insert(&mut self, level: &str) -> &mut Node<V> {
        if let Children::Few(v) = self {
            if v.len() >= FEW_CHILDREN && !v.iter().any(|(k, _)| **k == *level) {
                let map: HashMap<_, _> = std::mem::take(v).into_iter().collect();
                *self = Children::Many(Box::new(map));
            }
        }
        match self {
            Children::Few(v) => {
                let at = match v.iter().position(|(k, _)| **k == *level) {
                    Some(at) => at,
                    None => {
                        v.push((Box::from(level), Node::default()));
                        v.len() - 1
                    }
                };
                &mut v[at].1
            }
            Children::Many(map) => {
                // `entry` needs an owned key, so look up first to avoid allocating on a hit.
                if !map.contains_key(level) {
                    map.insert(Box::from(level), Node::default());
                }
                map.get_mut(level)
                    .unwrap_or_else(|| unreachable!("inserted above"))
            }
        }
    }

    fn remove(&mut self, level: &str) -> Option<Node<V>> {
        match self {
            Children::Few(v) => {
                let at = v.iter().position(|(k, _)| **k == *level)?;
                Some(v.swap_remove(at).1)
            }
            // Not shrunk as it empties: reallocating a wide table again and again while a mass
            // expiry frees everything around it left 30 MiB of fragments that no trim returned.
            Children::Many(map) => map.remove(level),
        }
    }

    fn len(&self) -> usize {
        match self {
            Children::Few(v) => v.len(),
            Children::Many(map) => map.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take every child out (for the iterative drop).
    fn drain_into(&mut self, out: &mut Vec<Node<V>>) {
        match std::mem::replace(self, Children::Few(Vec::new())) {
            Children::Few(v) => out.extend(v.into_iter().map(|(_, n)| n)),
            Children::Many(map) => out.extend(map.into_values()),
        }
    }

    #[cfg(test)]
    fn values(&self) -> Vec<&Node<V>> {
        match self {
            Children::Few(v) => v.iter().map(|(_, n)| n).collect(),
            Children::Many(map) => map.values().collect(),
        }
    }
}

/// One level of the wildcard trie. The node's position in the trie is the filter prefix.
struct Node<V> {
    /// Its entries, if any.
    entries: Option<Box<NodeEntries<V>>>,
    /// Literal next levels (including the empty level).
    children: Children<V>,
    /// The `+` next level.
    plus: Option<Box<Node<V>>>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            entries: None,
            children: Children::Few(Vec::new()),
            plus: None,
        }
    }
}

impl<V> Node<V> {
    fn child(&self, level: &str) -> Option<&Node<V>> {
        if level == "+" {
            self.plus.as_deref()
        } else {
            self.children.get(level)
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<V>> {
        if level == "+" {
            self.plus.as_deref_mut()
        } else {
            self.children.get_mut(level)
        }
    }

    fn entries_mut(&mut self, hash: bool) -> &mut Entries<V> {
        let e = self.entries.get_or_insert_with(|| {
            Box::new(NodeEntries {
                here: Entries::Empty,
                hash: Entries::Empty,
            })
        });
        if hash {
            &mut e.hash
        } else {
            &mut e.here
        }
    }

    /// Drop the entries box once both sets are empty.
    fn tidy(&mut self) {
        if self
            .entries
            .as_ref()
            .is_some_and(|e| e.here.is_empty() && e.hash.is_empty())
        {
            self.entries = None;
        }
    }

    fn has_entries(&self) -> bool {
        self.entries.is_some()
    }
}

impl<V> Drop for Node<V> {
    /// Dismantles the subtree with an explicit stack: the derived drop would recurse once per
    /// level and a client-chosen filter can be tens of thousands of levels deep.
    fn drop(&mut self) {
        if self.children.is_empty() && self.plus.is_none() {
            return;
        }
        let mut pending: Vec<Node<V>> = Vec::new();
        self.children.drain_into(&mut pending);
        pending.extend(self.plus.take().map(|b| *b));
        while let Some(mut node) = pending.pop() {
            node.children.drain_into(&mut pending);
            pending.extend(node.plus.take().map(|b| *b));
            // `node` is now childless, so its own drop returns immediately.
        }
    }
}

/// The trie levels of a wildcard filter and whether it ends in `#`.
///
/// A trailing `#` is not a trie level: its entries sit in the `hash` map of the node for the
/// prefix, so `"a/#"` is reached by the same walk that reaches `"a"`, which is how `#` comes to
/// match the parent level.
fn trie_path(filter: &str) -> (impl Iterator<Item = &str> + Clone, bool) {
    let (prefix, hash) = match filter.strip_suffix('#') {
        Some("") => (None, true),
        Some(p) => match p.strip_suffix('/') {
            Some(p) => (Some(p), true),
            // Not reachable for valid filters ("a#" is invalid); treat it literally.
            None => (Some(filter), false),
        },
        None => (Some(filter), false),
    };
    (prefix.into_iter().flat_map(|p| p.split('/')), hash)
}

/// Marks "no topic levels left" in a match frame.
const END: usize = usize::MAX;

/// Pending branches of a match walk stay on the stack up to this many; deeper walks spill.
const INLINE_FRAMES: usize = 16;

/// LIFO of (node, byte offset of the next topic level) that avoids a heap allocation per
/// publish for the common case of shallow tries.
struct FrameStack<'a, V> {
    inline: [Option<(&'a Node<V>, usize)>; INLINE_FRAMES],
    len: usize,
    spill: Vec<(&'a Node<V>, usize)>,
}

impl<'a, V> FrameStack<'a, V> {
    fn new() -> Self {
        FrameStack {
            inline: [None; INLINE_FRAMES],
            len: 0,
            spill: Vec::new(),
        }
    }

    fn push(&mut self, frame: (&'a Node<V>, usize)) {
        if self.len < INLINE_FRAMES {
            self.inline[self.len] = Some(frame);
        } else {
            self.spill.push(frame);
        }
        self.len += 1;
    }

    fn pop(&mut self) -> Option<(&'a Node<V>, usize)> {
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        if self.len < INLINE_FRAMES {
            self.inline[self.len].take()
        } else {
            self.spill.pop()
        }
    }
}

/// Maps topic filters to subscriber entries and answers "which entries match this topic?".
///
/// Generic over the stored value `V`; entries are keyed by (filter, subscriber key), the key
/// being the session's Client ID. Shared by reference between all connection tasks.
pub struct TopicIndex<V> {
    exact: DashMap<Box<str>, Entries<V>>,
    wild: RwLock<Node<V>>,
    len: AtomicUsize,
    /// Wildcard entries only: lets publishes skip the trie lock when nobody uses wildcards.
    wild_len: AtomicUsize,
}

impl<V: Clone + Send + Sync> Default for TopicIndex<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Clone + Send + Sync> TopicIndex<V> {
    /// An empty index.
    pub fn new() -> Self {
        TopicIndex {
            exact: DashMap::new(),
            wild: RwLock::new(Node::default()),
            len: AtomicUsize::new(0),
            wild_len: AtomicUsize::new(0),
        }
    }

    /// Insert or replace the entry for (`filter`, `key`). Returns the previous value for that
    /// pair. `filter` must be valid and must not carry a `$share/` prefix.
    pub fn insert(&self, filter: &str, key: &Arc<str>, value: V) -> Option<V> {
        let previous = if has_wildcard(filter) {
            let mut root = self.wild.write().unwrap_or_else(|e| e.into_inner());
            let (path, hash) = trie_path(filter);
            let mut node = &mut *root;
            for level in path {
                node = if level == "+" {
                    node.plus.get_or_insert_with(Box::default)
                } else {
                    node.children.get_or_insert(level)
                };
            }
            let previous = node.entries_mut(hash).insert(Arc::clone(key), value);
            if previous.is_none() {
                self.wild_len.fetch_add(1, Ordering::Relaxed);
            }
            previous
        } else {
            // `entry` needs an owned key, so look up first to avoid allocating on a replace.
            match self.exact.get_mut(filter) {
                Some(mut entries) => entries.insert(Arc::clone(key), value),
                None => self
                    .exact
                    .entry(Box::from(filter))
                    .or_default()
                    .insert(Arc::clone(key), value),
            }
        };
        if previous.is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        previous
    }

    /// Remove the entry for (`filter`, `key`) and return it. Nodes and map slots left empty are
    /// pruned, so subscribe/unsubscribe churn never grows the index.
    pub fn remove(&self, filter: &str, key: &str) -> Option<V> {
        self.remove_if(filter, key, |_| true)
    }

    /// Remove the entry for (`filter`, `key`) only if `pred` accepts its value, checked under
    /// the same lock as the removal, so an entry replaced concurrently by a newer owner is
    /// never taken out by the old one.
    pub fn remove_if(&self, filter: &str, key: &str, pred: impl FnOnce(&V) -> bool) -> Option<V> {
        let removed = if has_wildcard(filter) {
            let mut root = self.wild.write().unwrap_or_else(|e| e.into_inner());
            let removed = Self::remove_wild(&mut root, filter, key, pred);
            if removed.is_some() {
                self.wild_len.fetch_sub(1, Ordering::Relaxed);
            }
            removed
        } else {
            let removed =
                self.exact
                    .get_mut(filter)
                    .and_then(|mut entries| match entries.get(key) {
                        Some(v) if pred(v) => entries.remove(key),
                        _ => None,
                    });
            if removed.is_some() {
                // Re-checked under the shard lock: a concurrent insert may have refilled it.
                self.exact
                    .remove_if(filter, |_, entries| entries.is_empty());
            }
            removed
        };
        if removed.is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// Remove from the trie in three loops instead of one recursion (see the module docs):
    /// take the entry out, find the shallowest node from which the rest of the path is now
    /// useless, and cut that edge.
    fn remove_wild(
        root: &mut Node<V>,
        filter: &str,
        key: &str,
        pred: impl FnOnce(&V) -> bool,
    ) -> Option<V> {
        let (path, hash) = trie_path(filter);

        let mut node = &mut *root;
        for level in path.clone() {
            node = node.child_mut(level)?;
        }
        // Not `entries_mut`: a miss must not leave an empty entries box behind.
        let e = node.entries.as_deref_mut()?;
        let entries = if hash { &mut e.hash } else { &mut e.here };
        if !entries.get(key).is_some_and(pred) {
            return None;
        }
        let removed = entries.remove(key)?;
        node.tidy();

        // A node can go if it holds no entries and its only child is the next node on the
        // path, which can go as well. `cut` is the depth of the first such node in a run that
        // reaches the end of the path.
        let mut cut = None;
        let mut node = &*root;
        let mut depth = 0;
        let mut levels = path.clone().peekable();
        while let Some(level) = levels.next() {
            let Some(next) = node.child(level) else {
                break;
            };
            node = next;
            depth += 1;
            let fan_out = node.children.len() + usize::from(node.plus.is_some());
            let last = levels.peek().is_none();
            let removable = !node.has_entries() && fan_out == usize::from(!last);
            match (removable, cut) {
                (true, None) => cut = Some(depth),
                (false, _) => cut = None,
                (true, Some(_)) => {}
            }
        }

        if let Some(cut) = cut {
            let mut node = &mut *root;
            let mut levels = path;
            for _ in 1..cut {
                match levels.next().and_then(|level| node.child_mut(level)) {
                    Some(next) => node = next,
                    None => return Some(removed),
                }
            }
            match levels.next() {
                Some("+") => node.plus = None,
                Some(level) => drop(node.children.remove(level)),
                None => {}
            }
        }
        Some(removed)
    }

    /// Give back the capacity of the exact-filter map when less than a quarter is used (see
    /// `Registry::compact`).
    pub fn compact(&self) {
        if self.exact.len() < self.exact.capacity() / 4 {
            self.exact.shrink_to_fit();
        }
    }

    /// Call `f` once per (filter, key) entry whose filter matches `topic` (a valid topic name),
    /// honouring the `$` rule [MQTT-4.7.2-1].
    ///
    /// `f` runs while a read guard is held (a `DashMap` shard guard for exact filters, the trie
    /// read lock for wildcard filters). It must not call back into this index, `insert` and
    /// `remove` in particular: taking a write guard under our own read guard deadlocks, and even
    /// a nested read can block behind a queued writer. Keep `f` short (e.g. a non-blocking
    /// channel send or collecting into a buffer), since writers wait for it.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&Arc<str>, &V)) {
        if let Some(entries) = self.exact.get(topic) {
            for (key, value) in entries.iter() {
                f(key, value);
            }
        }
        if self.wild_len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let root = self.wild.read().unwrap_or_else(|e| e.into_inner());
        let dollar = topic.starts_with('$');
        let mut stack = FrameStack::new();
        stack.push((&*root, 0));
        // Each filter is one path through the trie, and a topic can follow each path in only
        // one way, so every entry is reached at most once.
        while let Some((node, pos)) = stack.pop() {
            // Only the root frame starts at offset 0; every later frame is past a separator.
            let wildcards_allowed = !(dollar && pos == 0);
            let entries = node.entries.as_deref();
            if wildcards_allowed {
                for (key, value) in entries.into_iter().flat_map(|e| e.hash.iter()) {
                    f(key, value);
                }
            }
            if pos == END {
                for (key, value) in entries.into_iter().flat_map(|e| e.here.iter()) {
                    f(key, value);
                }
                continue;
            }
            let rest = topic.get(pos..).unwrap_or_default();
            let (level, next) = match rest.find('/') {
                Some(i) => (&rest[..i], pos + i + 1),
                None => (rest, END),
            };
            if let Some(child) = node.children.get(level) {
                stack.push((child, next));
            }
            if wildcards_allowed {
                if let Some(plus) = node.plus.as_deref() {
                    stack.push((plus, next));
                }
            }
        }
    }

    /// Number of (filter, key) entries.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// True when the index holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Trie nodes below the root plus occupied exact-filter slots: zero once everything has
    /// been removed, which is what the pruning tests check.
    #[cfg(test)]
    fn node_count(&self) -> usize {
        let root = self.wild.read().unwrap_or_else(|e| e.into_inner());
        let mut count = 0;
        let mut pending: Vec<&Node<V>> = vec![&root];
        while let Some(node) = pending.pop() {
            count += 1;
            pending.extend(node.children.values());
            pending.extend(node.plus.as_deref());
        }
        count - 1 + self.exact.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::XorShift;
    use crate::wire::topic::matches;
    use std::collections::BTreeSet;

    fn key(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn collect(index: &TopicIndex<u32>, topic: &str) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        index.for_each_match(topic, |k, v| out.push((k.to_string(), *v)));
        out.sort();
        out
    }

    #[test]
    fn insert_replace_remove() {
        let index = TopicIndex::new();
        let (a, b) = (key("a"), key("b"));
        assert!(index.is_empty());
        assert_eq!(index.insert("x/y", &a, 1), None);
        assert_eq!(index.insert("x/y", &a, 2), Some(1));
        assert_eq!(index.insert("x/y", &b, 3), None);
        assert_eq!(index.insert("x/+", &a, 4), None);
        assert_eq!(index.insert("x/+", &a, 5), Some(4));
        assert_eq!(index.insert("x/#", &b, 6), None);
        assert_eq!(index.insert("#", &a, 7), None);
        assert_eq!(index.len(), 5);
        assert_eq!(
            collect(&index, "x/y"),
            vec![
                ("a".into(), 2),
                ("a".into(), 5),
                ("a".into(), 7),
                ("b".into(), 3),
                ("b".into(), 6)
            ]
        );
        assert_eq!(collect(&index, "x"), vec![("a".into(), 7), ("b".into(), 6)]);
        assert_eq!(collect(&index, "$SYS/x"), vec![]);

        assert_eq!(index.remove("x/y", "a"), Some(2));
        assert_eq!(index.remove("x/y", "a"), None);
        assert_eq!(index.remove("x/+", "b"), None);
        assert_eq!(index.remove("nope/+", "a"), None);
        assert_eq!(index.remove("x/+", "a"), Some(5));
        assert_eq!(index.remove("x/#", "b"), Some(6));
        assert_eq!(index.remove("#", "a"), Some(7));
        assert_eq!(index.len(), 1);
        assert_eq!(collect(&index, "x/y"), vec![("b".into(), 3)]);
        assert_eq!(index.remove("x/y", "b"), Some(3));
        assert!(index.is_empty());
        assert_eq!(index.node_count(), 0);
    }

    #[test]
    fn dollar_rule_in_the_trie() {
        let index = TopicIndex::new();
        let k = key("k");
        for (i, f) in ["#", "+/x", "+", "$SYS/#", "$SYS/+", "a/+"]
            .iter()
            .enumerate()
        {
            index.insert(f, &k, i as u32);
        }
        let got: Vec<u32> = collect(&index, "$SYS/x").into_iter().map(|e| e.1).collect();
        assert_eq!(got, vec![3, 4]);
        let got: Vec<u32> = collect(&index, "a/$x").into_iter().map(|e| e.1).collect();
        assert_eq!(got, vec![0, 5]);
    }

    #[test]
    fn pruning_keeps_shared_prefixes() {
        let index = TopicIndex::new();
        let k = key("k");
        index.insert("a/+/c/d", &k, 1);
        index.insert("a/+", &k, 2);
        index.insert("a/#", &k, 3);
        index.insert("a/+/c/#", &k, 4);
        let full = index.node_count();
        assert_eq!(index.remove("a/+/c/d", "k"), Some(1));
        assert_eq!(index.node_count(), full - 1);
        assert_eq!(index.remove("a/+", "k"), Some(2));
        assert_eq!(index.node_count(), full - 1);
        assert_eq!(
            collect(&index, "a/b/c"),
            vec![("k".into(), 3), ("k".into(), 4)]
        );
        assert_eq!(index.remove("a/+/c/#", "k"), Some(4));
        assert_eq!(index.node_count(), 1);
        assert_eq!(index.remove("a/#", "k"), Some(3));
        assert_eq!(index.node_count(), 0);
    }

    #[test]
    fn deep_filters_do_not_overflow_the_stack() {
        let index = TopicIndex::new();
        let k = key("k");
        let plus = format!("{}#", "+/".repeat(30_000));
        let empty = format!("{}#", "/".repeat(60_000));
        let topic = "/".repeat(40_000);
        index.insert(&plus, &k, 1);
        index.insert(&empty, &k, 2);
        assert_eq!(collect(&index, &topic), vec![("k".into(), 1)]);
        assert_eq!(
            collect(&index, &"/".repeat(60_001)),
            vec![("k".into(), 1), ("k".into(), 2)]
        );
        assert_eq!(index.remove(&plus, "k"), Some(1));
        assert_eq!(index.node_count(), 60_000);
        // Dropping the index with a deep chain still in place exercises `Node::drop`.
        drop(index);
    }

    const LEVELS: [&str; 6] = ["a", "b", "c", "", "$SYS", "é"];

    fn random_filter(rng: &mut XorShift) -> String {
        let depth = 1 + rng.below(4);
        let mut levels: Vec<&str> = (0..depth)
            .map(|_| match rng.below(4) {
                0 => "+",
                _ => LEVELS[rng.below(LEVELS.len())],
            })
            .collect();
        if rng.below(3) == 0 {
            if rng.below(2) == 0 {
                levels.push("#");
            } else {
                if let Some(last) = levels.last_mut() {
                    *last = "#";
                }
            }
        }
        non_empty(levels.join("/"))
    }

    fn random_topic(rng: &mut XorShift) -> String {
        let depth = 1 + rng.below(5);
        let levels: Vec<&str> = (0..depth)
            .map(|_| LEVELS[rng.below(LEVELS.len())])
            .collect();
        non_empty(levels.join("/"))
    }

    /// A lone empty level joins to "", which is neither a valid name nor a valid filter.
    fn non_empty(s: String) -> String {
        if s.is_empty() {
            "/".to_string()
        } else {
            s
        }
    }

    fn check_against_matches(
        index: &TopicIndex<u32>,
        entries: &BTreeSet<(String, String, u32)>,
        topics: &[String],
    ) {
        for topic in topics {
            let mut got = Vec::new();
            index.for_each_match(topic, |k, v| got.push((k.to_string(), *v)));
            got.sort();
            let mut want: Vec<(String, u32)> = entries
                .iter()
                .filter(|(f, _, _)| matches(f, topic))
                .map(|(_, k, v)| (k.clone(), *v))
                .collect();
            want.sort();
            assert_eq!(got, want, "topic {topic:?}");
        }
    }

    #[test]
    fn randomized_cross_check_with_matches() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let index = TopicIndex::new();
        // (filter, key, value); value is unique per entry so the comparison is exact.
        let mut entries = BTreeSet::new();
        let mut by_pair: HashMap<(String, String), u32> = HashMap::new();
        for value in 0..3_000u32 {
            let filter = random_filter(&mut rng);
            assert!(
                crate::wire::topic::valid_topic_filter(&filter),
                "{filter:?}"
            );
            let client = format!("c{}", rng.below(5));
            let previous = index.insert(&filter, &key(&client), value);
            let old = by_pair.insert((filter.clone(), client.clone()), value);
            assert_eq!(previous, old);
            if let Some(old) = old {
                entries.remove(&(filter.clone(), client.clone(), old));
            }
            entries.insert((filter, client, value));
        }
        assert_eq!(index.len(), entries.len());
        let topics: Vec<String> = (0..2_000).map(|_| random_topic(&mut rng)).collect();
        check_against_matches(&index, &entries, &topics);

        let all: Vec<_> = entries.iter().cloned().collect();
        for (filter, client, value) in &all {
            if rng.below(2) == 0 {
                assert_eq!(index.remove(filter, client), Some(*value));
                entries.remove(&(filter.clone(), client.clone(), *value));
            }
        }
        assert_eq!(index.len(), entries.len());
        check_against_matches(&index, &entries, &topics);

        for (filter, client, value) in &entries {
            assert_eq!(index.remove(filter, client), Some(*value));
        }
        assert!(index.is_empty());
        assert_eq!(index.node_count(), 0);
    }

    #[test]
    fn concurrent_readers_and_writers() {
        let index: TopicIndex<u32> = TopicIndex::new();
        let filters = ["a/b", "a/+", "a/#", "#", "+/b", "a/b/c", "+/+/+"];
        let topics = ["a/b", "a", "a/b/c", "x/b", "$SYS/b"];
        std::thread::scope(|s| {
            for w in 0..3u32 {
                let index = &index;
                s.spawn(move || {
                    let k = key(&format!("writer{w}"));
                    for i in 0..2_000u32 {
                        let f = filters[(i as usize + w as usize) % filters.len()];
                        index.insert(f, &k, i);
                        if i % 3 != 0 {
                            assert_eq!(index.remove(f, &k), Some(i));
                        }
                    }
                    for f in filters {
                        index.remove(f, &k);
                    }
                });
            }
            for r in 0..3usize {
                let index = &index;
                s.spawn(move || {
                    let mut seen = 0usize;
                    for i in 0..5_000usize {
                        index.for_each_match(topics[(i + r) % topics.len()], |_, _| seen += 1);
                    }
                    seen
                });
            }
        });
        assert!(index.is_empty());
        assert_eq!(index.node_count(), 0);
    }
}
