//! MQTT topic names and filters as NATS subjects, for routing between cluster nodes.
//!
//! A topic's levels become subject tokens (`/` -> `.`) under a root token: `t` for ordinary
//! topics, `s` for topics starting with `$`, so that a filter starting with a wildcard, which
//! must not match `$` topics [MQTT-4.7.2-1], subscribes under `t` only. Inside a level the
//! characters NATS gives a meaning to (`.`, `*`, `>`, whitespace and other control characters)
//! and the escape character `%` itself are written `%XX` (two hex digits); an empty level,
//! which NATS does not allow as a token, is `%`. The mapping is reversible, so a node can give
//! a message arriving from NATS its exact topic back.
//!
//! Filters: `+` -> `*`, and a trailing `#` -> `>`; since `#` also matches its parent level
//! [MQTT-4.7.1-2], `a/#` needs the subject `t.a` as well as `t.a.>`, so a filter maps to one or
//! two subjects.

use std::fmt::Write;

/// Root token of topics that do not start with `$`.
const ROOT: &str = "t";
/// Root token of topics starting with `$`.
const DOLLAR_ROOT: &str = "s";
/// The escape character.
const ESCAPE: char = '%';

fn needs_escape(c: char) -> bool {
    matches!(c, '.' | '*' | '>' | ESCAPE) || c.is_whitespace() || c.is_control()
}

fn push_level(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push(ESCAPE);
        return;
    }
    for c in level.chars() {
        if needs_escape(c) {
            let mut b = [0u8; 4];
            for byte in c.encode_utf8(&mut b).bytes() {
                let _ = write!(out, "{ESCAPE}{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

fn root_of(first_level: &str) -> &'static str {
    if first_level.starts_with('$') {
        DOLLAR_ROOT
    } else {
        ROOT
    }
}

/// The subject a message on topic `topic` (a valid topic name: no wildcards) is published to.
pub fn topic_subject(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len() + 8);
    let first = topic.split('/').next().unwrap_or("");
    out.push_str(root_of(first));
    for level in topic.split('/') {
        out.push('.');
        push_level(&mut out, level);
    }
    out
}

/// The topic a subject made by [`topic_subject`] stands for; `None` for a subject that is not
/// one (another root, a bad escape, a wildcard token).
pub fn subject_topic(subject: &str) -> Option<String> {
    let mut tokens = subject.split('.');
    let root = tokens.next()?;
    if root != ROOT && root != DOLLAR_ROOT {
        return None;
    }
    let mut out = String::with_capacity(subject.len());
    let mut first = true;
    for token in tokens {
        if !first {
            out.push('/');
        }
        let level_start = out.len();
        if token == "%" {
            // An empty level.
        } else if token == "*" || token == ">" || token.is_empty() {
            return None;
        } else {
            let mut bytes = Vec::with_capacity(token.len());
            let raw = token.as_bytes();
            let mut i = 0;
            while i < raw.len() {
                if raw[i] == b'%' {
                    let hex = token.get(i + 1..i + 3)?;
                    bytes.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 3;
                } else {
                    bytes.push(raw[i]);
                    i += 1;
                }
            }
            out.push_str(&String::from_utf8(bytes).ok()?);
        }
        if first && (root == DOLLAR_ROOT) != out[level_start..].starts_with('$') {
            return None;
        }
        first = false;
    }
    if first {
        return None;
    }
    Some(out)
}

/// The subjects a node subscribes to for the topic filter `filter` (a valid filter, without a
/// `$share/group/` prefix): one, or two for a filter ending in `#`.
pub fn filter_subjects(filter: &str) -> Vec<String> {
    let levels: Vec<&str> = filter.split('/').collect();
    let first = levels.first().copied().unwrap_or("");
    let root = if first == "+" || first == "#" {
        ROOT
    } else {
        root_of(first)
    };
    let mut base = String::from(root);
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "#" if i + 1 == levels.len() => {
                let mut out = Vec::with_capacity(2);
                if i > 0 {
                    // `a/#` matches `a` itself [MQTT-4.7.1-2].
                    out.push(base.clone());
                }
                out.push(format!("{base}.>"));
                return out;
            }
            "+" => base.push_str(".*"),
            level => {
                base.push('.');
                push_level(&mut base, level);
            }
        }
    }
    vec![base]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::topic;

    /// A NATS subject matcher, as the server applies it, for the cross-check below.
    fn nats_matches(pattern: &str, subject: &str) -> bool {
        let p: Vec<&str> = pattern.split('.').collect();
        let s: Vec<&str> = subject.split('.').collect();
        for (i, t) in p.iter().enumerate() {
            match *t {
                ">" => return s.len() > i,
                "*" if i < s.len() => {}
                t if i < s.len() && s[i] == t => {}
                _ => return false,
            }
        }
        p.len() == s.len()
    }

    #[test]
    fn topics_map_to_subjects_and_back() {
        for (t, want) in [
            ("a/b", "t.a.b"),
            ("a", "t.a"),
            ("/a/", "t.%.a.%"),
            ("a.b/c d", "t.a%2Eb.c%20d"),
            ("x*/y>", "t.x%2A.y%3E"),
            ("100%", "t.100%25"),
            ("$SYS/broker", "s.$SYS.broker"),
            ("é/ü", "t.é.ü"),
        ] {
            assert_eq!(topic_subject(t), want, "{t}");
            assert_eq!(subject_topic(want).as_deref(), Some(t), "{want}");
        }
        for bad in [
            "x.a", "t", "t.*", "t.a.>", "t.%2", "t.%ZZ", "s.a", "t.$a", "t..a",
        ] {
            assert_eq!(subject_topic(bad), None, "{bad}");
        }
    }

    #[test]
    fn filters_map_to_one_or_two_subjects() {
        assert_eq!(filter_subjects("a/+/c"), vec!["t.a.*.c"]);
        assert_eq!(filter_subjects("a/#"), vec!["t.a", "t.a.>"]);
        assert_eq!(filter_subjects("#"), vec!["t.>"]);
        assert_eq!(filter_subjects("+"), vec!["t.*"]);
        assert_eq!(filter_subjects("$SYS/#"), vec!["s.$SYS", "s.$SYS.>"]);
        assert_eq!(filter_subjects("a.b/ /+"), vec!["t.a%2Eb.%20.*"]);
    }

    /// The NATS match of the mapped subjects agrees with MQTT matching for every pair of a
    /// set of topics and filters, `$` topics and empty levels included.
    #[test]
    fn nats_matching_of_mapped_subjects_is_mqtt_matching() {
        let topics = [
            "a", "a/b", "a/b/c", "/a", "a/", "/", "$SYS", "$SYS/x", "a.b", "a*", "b/a", "a/%",
        ];
        let filters = [
            "#", "+", "a/#", "a/+", "+/b", "+/+", "/+", "+/", "$SYS/#", "$SYS", "a", "a.b", "+/#",
            "a/b/#", "a*", "/#",
        ];
        for t in topics {
            let s = topic_subject(t);
            for f in filters {
                let nats = filter_subjects(f).iter().any(|p| nats_matches(p, &s));
                assert_eq!(nats, topic::matches(f, t), "filter {f} topic {t}");
            }
        }
    }
}
