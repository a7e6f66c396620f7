//! Topic names and topic filters: validity, wildcard matching and shared subscriptions.
//!
//! MQTT 3.1.1 section 4.7, MQTT 5.0 sections 4.7 and 4.8.2. Everything here works on `&str`
//! slices and never indexes by byte position inside a level, so no input (multi-byte UTF-8,
//! empty levels, lone separators) can make it panic. We deliberately do not use mqttbytes'
//! topic helpers: they slice by byte offsets and panic on inputs such as `"é/x"` against `"#"`.

use std::fmt;

/// The longest topic name or filter the wire format can carry: a two-byte length prefix.
pub const MAX_TOPIC_LEN: usize = 65_535;

/// The prefix that marks a shared subscription filter [MQTT-4.8.2].
pub const SHARE_PREFIX: &str = "$share/";

/// A topic name a client may PUBLISH to: non-empty [MQTT-4.7.3-1], no '+' or '#'
/// [MQTT-3.3.2-2], no U+0000 [MQTT-1.5.3-2 / 1.5.4-2], at most 65,535 bytes.
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_TOPIC_LEN && !name.contains(['+', '#', '\0'])
}

/// A topic filter a client may SUBSCRIBE to: non-empty, '#' only as the whole last level
/// [MQTT-4.7.1-2], '+' only as a whole level [MQTT-4.7.1-3], no U+0000, at most 65,535 bytes.
///
/// Empty levels are legal (`"a//b"`, `"/"`, `"+/"`): the specification treats the empty string
/// between two separators as a level like any other.
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_TOPIC_LEN || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/');
    while let Some(level) = levels.next() {
        match level {
            "#" => return levels.next().is_none(),
            "+" => {}
            other if other.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// True when `filter` has a wildcard level (`+` or `#` as a whole level).
///
/// Decides whether a filter can be served by an exact-name lookup or needs the wildcard trie.
pub fn has_wildcard(filter: &str) -> bool {
    filter.split('/').any(|level| level == "+" || level == "#")
}

/// Does `topic` (a valid name) match `filter` (a valid filter)?
///
/// `#` also matches the parent level (`"a/#"` matches `"a"`) [MQTT-4.7.1-2]. A filter whose
/// first level is a wildcard does not match a topic starting with `$` [MQTT-4.7.2-1], so `"#"`
/// and `"+/x"` do not match `"$SYS/x"` while `"$SYS/#"` does. Never panics, whatever the input.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && matches!(filter.split('/').next(), Some("+" | "#")) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        if level == "#" {
            // Whatever is left of the topic, including nothing at all, is covered.
            return true;
        }
        match topic_levels.next() {
            Some(t) if level == "+" || level == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// A `$share/...` filter that breaks the rules of MQTT 5.0 section 4.8.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidSharedFilter;

impl fmt::Display for InvalidSharedFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid shared subscription filter")
    }
}

impl std::error::Error for InvalidSharedFilter {}

/// A shared subscription `"$share/{ShareName}/{filter}"` split into `(share name, filter)`.
///
/// `Ok(None)` for an ordinary filter (including `"$share"` without a separator, which is just a
/// literal level). `Err` when it starts with `"$share/"` but the share name is empty or contains
/// `+`, `#` or `/` [MQTT-4.8.2-2], or the filter part is missing or invalid [MQTT-4.8.2-1].
pub fn parse_shared(filter: &str) -> Result<Option<(&str, &str)>, InvalidSharedFilter> {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        return Ok(None);
    };
    // Splitting at the first '/' means the share name can never contain one; a share name
    // "containing '/'" is read as a shorter name followed by a filter.
    let (share, inner) = rest.split_once('/').ok_or(InvalidSharedFilter)?;
    if share.is_empty() || share.contains(['+', '#', '\0']) || !valid_topic_filter(inner) {
        return Err(InvalidSharedFilter);
    }
    Ok(Some((share, inner)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_name_validity() {
        let valid = [
            "a",
            "/",
            "//",
            "a//b",
            "/finance",
            "sport/tennis/player1",
            "$SYS/broker/load",
            "é/x",
            "日本/語",
            " ",
            "a/",
        ];
        for name in valid {
            assert!(valid_topic_name(name), "{name:?} should be a valid name");
        }
        let invalid = [
            "",
            "+",
            "#",
            "a/+",
            "a/#",
            "sport/tennis#",
            "a+b",
            "a\0b",
            "\0",
        ];
        for name in invalid {
            assert!(
                !valid_topic_name(name),
                "{name:?} should be an invalid name"
            );
        }
        assert!(valid_topic_name(&"x".repeat(MAX_TOPIC_LEN)));
        assert!(!valid_topic_name(&"x".repeat(MAX_TOPIC_LEN + 1)));
    }

    #[test]
    fn topic_filter_validity() {
        let valid = [
            "a",
            "#",
            "+",
            "/",
            "/#",
            "+/",
            "/+",
            "a//b",
            "+/+/#",
            "+/tennis/#",
            "sport/#",
            "sport/+/player1",
            "sport/tennis/player1/#",
            "$SYS/#",
            "é/x",
            "é/+/#",
            "$share",
        ];
        for filter in valid {
            assert!(valid_topic_filter(filter), "{filter:?} should be valid");
        }
        let invalid = [
            "",
            "sport/tennis#",
            "sport/tennis/#/ranking",
            "#/a",
            "##",
            "a+/b",
            "a/+b",
            "sport+",
            "++",
            "a\0",
            "+/\0",
        ];
        for filter in invalid {
            assert!(!valid_topic_filter(filter), "{filter:?} should be invalid");
        }
        assert!(valid_topic_filter(&"+/".repeat(MAX_TOPIC_LEN / 2)));
        assert!(!valid_topic_filter(&"x".repeat(MAX_TOPIC_LEN + 1)));
    }

    #[test]
    fn wildcard_detection() {
        for f in ["#", "+", "a/+", "a/#", "+/", "/#", "a/+/b"] {
            assert!(has_wildcard(f), "{f:?}");
        }
        for f in ["a", "a/b", "/", "a//b", "$SYS/x", "é"] {
            assert!(!has_wildcard(f), "{f:?}");
        }
    }

    #[test]
    fn spec_matching_examples() {
        // 4.7.1.2: "sport/tennis/player1/#" would receive messages published using any of
        // these topic names.
        for topic in [
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/tennis/player1/score/wimbledon",
        ] {
            assert!(matches("sport/tennis/player1/#", topic), "{topic}");
        }
        assert!(!matches("sport/tennis/player1/#", "sport/tennis/player2"));
        assert!(!matches("sport/tennis/player1/#", "sport/tennis"));
        // 4.7.1.2: "sport/#" also matches the singular "sport", since '#' includes the parent.
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/#", "sport/"));
        assert!(matches("#", "sport/tennis"));
        // 4.7.1.3: "sport/tennis/+" matches "sport/tennis/player1" but not
        // "sport/tennis/player1/ranking"; "sport/+" does not match "sport" but does match
        // "sport/".
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(matches("sport/tennis/+", "sport/tennis/player2"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        // 4.7.1.3: "+/+" and "/+" match "/finance"; "+" does not.
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("+/tennis/#", "sport/tennis/player1"));
        // Exact and empty levels are compared literally.
        assert!(matches("a//b", "a//b"));
        assert!(!matches("a//b", "a/b"));
        assert!(matches("a/+/b", "a//b"));
        assert!(matches("+", ""));
        assert!(!matches("a/b", "a"));
        assert!(!matches("a", "a/b"));
        assert!(matches("/", "/"));
        assert!(matches("+/", "x/"));
        assert!(!matches("+/", "x"));
    }

    #[test]
    fn dollar_topics_and_leading_wildcards() {
        // [MQTT-4.7.2-1] "The Server MUST NOT match Topic Filters starting with a wildcard
        // character (# or +) with Topic Names beginning with a $ character."
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(!matches("+", "$"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/x", "$SYS/x"));
        // Only the first level of the topic matters: '$' deeper down is an ordinary character.
        assert!(matches("#", "a/$SYS"));
        assert!(matches("+/$x", "a/$x"));
        assert!(matches("a/+", "a/$x"));
    }

    #[test]
    fn no_panic_on_multibyte_input() {
        let samples = [
            "é/x",
            "é",
            "x/é",
            "日本/語/+",
            "#",
            "+",
            "é/#",
            "/é/",
            "🦀/🦀",
            "$é",
        ];
        for filter in samples {
            for topic in samples {
                let _ = matches(filter, topic);
                let _ = valid_topic_filter(filter);
                let _ = valid_topic_name(topic);
                let _ = parse_shared(filter);
            }
        }
        assert!(matches("#", "é/x"));
        assert!(matches("é/+", "é/x"));
        assert!(matches("+/x", "é/x"));
        assert!(!matches("è/x", "é/x"));
    }

    #[test]
    fn shared_subscriptions() {
        assert_eq!(parse_shared("a/b"), Ok(None));
        assert_eq!(parse_shared("$share"), Ok(None));
        assert_eq!(parse_shared("$SHARE/g/a"), Ok(None));
        assert_eq!(parse_shared("$share/g/a/b"), Ok(Some(("g", "a/b"))));
        assert_eq!(parse_shared("$share/g/#"), Ok(Some(("g", "#"))));
        assert_eq!(parse_shared("$share/g/+/x"), Ok(Some(("g", "+/x"))));
        assert_eq!(parse_shared("$share/g//"), Ok(Some(("g", "/"))));
        assert_eq!(parse_shared("$share/é/x"), Ok(Some(("é", "x"))));
        for bad in [
            "$share/",
            "$share/g",
            "$share/g/",
            "$share//a",
            "$share/+/a",
            "$share/#/a",
            "$share/g+/a",
            "$share/g#/a",
            "$share/g/a+",
            "$share/g/#/a",
            "$share/g/a\0",
        ] {
            assert_eq!(parse_shared(bad), Err(InvalidSharedFilter), "{bad:?}");
        }
    }
}
