//! A set of topic filters that answers "does any of them match this topic?" by walking a
//! trie of levels, so a client with a thousand ACL rules pays for the levels of the topic, not
//! for the rules. Lookups borrow the topic's levels and allocate nothing.

use std::collections::HashMap;

/// Filters, kept both as written (for the subscribe-time `covers` checks, which are rare) and
/// as a trie (for the per-message `matches`).
#[derive(Debug, Clone, Default)]
pub(crate) struct FilterSet {
    filters: Vec<String>,
    root: Node,
}

/// Past this many literal children a node keeps a hash index; below it a linear scan of
/// short strings is cheaper than hashing the level.
const SCAN_MAX: usize = 8;

#[derive(Debug, Clone, Default)]
struct Node {
    /// Literal next levels.
    children: Vec<(String, Node)>,
    /// Positions in `children` by level, once there are more than `SCAN_MAX`.
    index: Option<HashMap<String, usize>>,
    /// A `+` next level.
    plus: Option<Box<Node>>,
    /// A filter ends here with `#`: it matches this level and everything below.
    hash: bool,
    /// A filter ends exactly here.
    end: bool,
}

impl FilterSet {
    /// Add a (valid) filter.
    pub(crate) fn push(&mut self, filter: String) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            match level {
                "#" => {
                    node.hash = true;
                    self.filters.push(filter);
                    return;
                }
                "+" => node = node.plus.get_or_insert_with(Default::default),
                literal => node = node.child_mut(literal),
            }
        }
        node.end = true;
        self.filters.push(filter);
    }

    /// Whether the set has no filter.
    pub(crate) fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// The filters as written.
    pub(crate) fn iter(&self) -> std::slice::Iter<'_, String> {
        self.filters.iter()
    }

    /// Whether any filter matches the (valid) topic name, with the `$` rule: a filter whose
    /// first level is a wildcard matches no topic starting with `$` [MQTT-4.7.2-1].
    pub(crate) fn matches(&self, topic: &str) -> bool {
        // Recursion follows the trie, so its depth is bounded by the longest filter, not by
        // the topic.
        fn walk(node: &Node, mut levels: std::str::Split<'_, char>, wild_ok: bool) -> bool {
            if node.hash && wild_ok {
                return true;
            }
            let Some(level) = levels.next() else {
                return node.end;
            };
            if let Some(child) = node.child(level) {
                if walk(child, levels.clone(), true) {
                    return true;
                }
            }
            match &node.plus {
                Some(plus) if wild_ok => walk(plus, levels, true),
                _ => false,
            }
        }
        walk(&self.root, topic.split('/'), !topic.starts_with('$'))
    }
}

impl Node {
    fn child(&self, level: &str) -> Option<&Node> {
        match &self.index {
            Some(index) => index.get(level).map(|&i| &self.children[i].1),
            None => self
                .children
                .iter()
                .find(|(l, _)| l == level)
                .map(|(_, n)| n),
        }
    }

    fn child_mut(&mut self, level: &str) -> &mut Node {
        let found = match &self.index {
            Some(index) => index.get(level).copied(),
            None => self.children.iter().position(|(l, _)| l == level),
        };
        let i = match found {
            Some(i) => i,
            None => {
                self.children.push((level.to_string(), Node::default()));
                let i = self.children.len() - 1;
                if let Some(index) = &mut self.index {
                    index.insert(level.to_string(), i);
                } else if self.children.len() > SCAN_MAX {
                    self.index = Some(
                        self.children
                            .iter()
                            .enumerate()
                            .map(|(i, (l, _))| (l.clone(), i))
                            .collect(),
                    );
                }
                i
            }
        };
        &mut self.children[i].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(filters: &[&str]) -> FilterSet {
        let mut s = FilterSet::default();
        for f in filters {
            s.push(f.to_string());
        }
        s
    }

    #[test]
    fn agrees_with_topic_matches_on_a_grid() {
        let filters = [
            "#", "+", "a", "a/#", "a/+", "+/b", "a/b", "a/b/c", "+/+/c", "a/+/#", "/", "+/", "/+",
            "$SYS/#", "$SYS/+", "+/#", "a//b", "a/b/#",
        ];
        let topics = [
            "a", "a/b", "a/b/c", "a/b/c/d", "b", "b/b", "/", "/a", "a/", "a//b", "$SYS", "$SYS/x",
            "$SYS/x/y", "x/y/c", "",
        ];
        for f in filters {
            let s = set(&[f]);
            for t in topics {
                assert_eq!(
                    s.matches(t),
                    crate::wire::topic::matches(f, t),
                    "filter {f:?} topic {t:?}"
                );
            }
        }
        // Any of many (past SCAN_MAX children at a node, so the hash index is used too).
        let mut many: Vec<String> = (0..20).map(|i| format!("n{i}/#")).collect();
        many.push("a/b".into());
        let big = set(&many.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(big.matches("n17/x") && !big.matches("n20/x") && big.matches("a/b"));
        let s = set(&filters);
        for t in topics {
            let any = filters.iter().any(|f| crate::wire::topic::matches(f, t));
            assert_eq!(s.matches(t), any, "topic {t:?}");
        }
    }
}
