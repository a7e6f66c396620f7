//! Mosquitto's ACL file and the per-client decisions made from it.
//!
//! Lines, after trimming; blank lines and lines starting with `#` are ignored:
//!
//! - `user <name>`: the following `topic` lines belong to that user (the name is the rest of
//!   the line). `topic` lines before the first `user` line belong to anonymous clients (no
//!   username) only.
//! - `topic [read|write|readwrite|deny] <filter>`: access omitted means `readwrite`; the filter
//!   is the rest of the line and may contain spaces.
//! - `pattern [read|write|readwrite|deny] <filter>`: applies to every client wherever it
//!   appears, with `%u` replaced by the username and `%c` by the client id.
//!
//! Once an ACL file is configured everything is denied unless a rule grants it, and a `deny`
//! rule beats any grant. [`AclFile::for_client`] resolves the rules for one connection so that
//! the per-message checks on [`ClientAcl`] only scan short lists and never allocate.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use super::filters::FilterSet;
use crate::wire::topic;

/// What a rule line grants, or `Deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn from_keyword(word: &str) -> Option<Access> {
        match word {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            "readwrite" => Some(Access::ReadWrite),
            "deny" => Some(Access::Deny),
            _ => None,
        }
    }
}

/// One `topic` or `pattern` line: for a pattern, the filter still holds `%u` / `%c`.
#[derive(Debug, Clone)]
struct Rule {
    access: Access,
    filter: String,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default)]
pub struct AclFile {
    /// `topic` lines before the first `user` line.
    anonymous: Vec<Rule>,
    /// `topic` lines per user; a user's sections, if there are several, are merged.
    users: HashMap<String, Vec<Rule>>,
    /// `pattern` lines, wherever they appear.
    patterns: Vec<Rule>,
    /// `anonymous` and `users` compiled once, shared by every client they apply to: a
    /// thousand-rule section costs its memory once, not once per connection.
    compiled_anonymous: Arc<Rules>,
    compiled_users: HashMap<String, Arc<Rules>>,
}

/// Why an ACL file could not be read or parsed.
#[derive(Debug)]
pub struct AclError {
    /// The 1-based line at fault; 0 for I/O errors.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl AclError {
    fn new(line: usize, message: impl Into<String>) -> Self {
        AclError {
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for AclError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "ACL file: {}", self.message)
        } else {
            write!(f, "ACL file line {}: {}", self.line, self.message)
        }
    }
}

impl std::error::Error for AclError {}

/// `[access] <filter>` after `topic` or `pattern`.
///
/// A lone access keyword (`topic read`) is an error rather than a rule for a topic named
/// "read": that line is far more likely a rule with its filter forgotten.
fn parse_rule(rest: &str) -> Result<Rule, String> {
    let (first, after) = match rest.split_once(char::is_whitespace) {
        Some((first, after)) => (first, after.trim()),
        None => (rest, ""),
    };
    let (access, filter) = match Access::from_keyword(first) {
        Some(access) => (access, after),
        None => (Access::ReadWrite, rest),
    };
    if filter.is_empty() {
        return Err("missing topic filter".into());
    }
    if !topic::valid_topic_filter(filter) {
        return Err(format!("invalid topic filter {filter:?}"));
    }
    Ok(Rule {
        access,
        filter: filter.to_owned(),
    })
}

impl AclFile {
    /// Parses the text of an ACL file; an unknown keyword or an invalid filter is an error.
    pub fn parse(text: &str) -> Result<AclFile, AclError> {
        let mut acl = AclFile::default();
        // None while still in the anonymous part before the first `user` line.
        let mut section: Option<String> = None;
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = match line.split_once(char::is_whitespace) {
                Some((keyword, rest)) => (keyword, rest.trim()),
                None => (line, ""),
            };
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(AclError::new(number, "missing username after \"user\""));
                    }
                    acl.users.entry(rest.to_owned()).or_default();
                    section = Some(rest.to_owned());
                }
                "topic" => {
                    let rule = parse_rule(rest).map_err(|m| AclError::new(number, m))?;
                    match &section {
                        Some(user) => acl.users.entry(user.clone()).or_default().push(rule),
                        None => acl.anonymous.push(rule),
                    }
                }
                "pattern" => {
                    let rule = parse_rule(rest).map_err(|m| AclError::new(number, m))?;
                    acl.patterns.push(rule);
                }
                other => {
                    return Err(AclError::new(number, format!("unknown keyword {other:?}")));
                }
            }
        }
        acl.compiled_anonymous = Arc::new(Rules::of(&acl.anonymous));
        acl.compiled_users = acl
            .users
            .iter()
            .map(|(user, rules)| (user.clone(), Arc::new(Rules::of(rules))))
            .collect();
        Ok(acl)
    }

    /// Reads and parses the ACL file at `path`.
    pub fn load(path: &Path) -> Result<AclFile, AclError> {
        let text = fs::read_to_string(path)
            .map_err(|e| AclError::new(0, format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// The number of `topic` and `pattern` rules in the file.
    pub fn rule_count(&self) -> usize {
        self.anonymous.len()
            + self.users.values().map(Vec::len).sum::<usize>()
            + self.patterns.len()
    }

    /// The rules that apply to one client, patterns substituted: computed once per connection
    /// (allocates), so that the per-message checks below allocate nothing.
    ///
    /// A pattern is left out when the value it needs contains `+`, `#` or `/` (substituting it
    /// would widen the rule beyond the client's own topics), and a `%u` pattern is left out for
    /// an anonymous client.
    pub fn for_client(&self, username: Option<&str>, client_id: &str) -> ClientAcl {
        let section = match username {
            Some(user) => self.compiled_users.get(user).cloned(),
            None => Some(self.compiled_anonymous.clone()),
        };
        let mut patterns = Rules::default();
        for rule in &self.patterns {
            if let Some(filter) = substitute(&rule.filter, username, client_id) {
                patterns.add(rule.access, filter);
            }
        }
        ClientAcl { section, patterns }
    }
}

/// A value that may stand in for `%u` or `%c`: one that cannot add levels or wildcards.
fn safe_value(value: &str) -> bool {
    !value.contains(['+', '#', '/'])
}

/// `pattern` with `%u` and `%c` replaced, or `None` when the pattern does not apply.
fn substitute(pattern: &str, username: Option<&str>, client_id: &str) -> Option<String> {
    let mut out = String::with_capacity(pattern.len() + client_id.len());
    let mut rest = pattern;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("%u") {
            out.push_str(username.filter(|u| safe_value(u))?);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("%c") {
            if !safe_value(client_id) {
                return None;
            }
            out.push_str(client_id);
            rest = after;
        } else {
            // A '%' not starting a placeholder is a literal character of the filter.
            out.push('%');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    // An empty value can still make a filter invalid (`%c` alone becomes ""); such a rule
    // matches nothing, so dropping it changes no decision.
    topic::valid_topic_filter(&out).then_some(out)
}

/// Does rule filter `rule` cover subscription filter `filter`, that is, does `rule` match
/// every topic `filter` matches?
///
/// Both must be valid filters. Level by level: `#` in `rule` covers whatever is left of
/// `filter`, the parent level included (`a/#` covers `a` and `a/b/#`); `+` covers `+` or one
/// literal level; a literal covers only the same literal, so `+` or `#` in `filter` need a
/// wildcard in `rule` at that position. A rule starting with a wildcard does not cover a filter
/// starting with a `$` level, since it matches no `$` topic [MQTT-4.7.2-1].
pub(crate) fn covers(rule: &str, filter: &str) -> bool {
    let mut rule_levels = rule.split('/');
    let mut filter_levels = filter.split('/');
    if filter.starts_with('$') && matches!(rule.split('/').next(), Some("+" | "#")) {
        return false;
    }
    for r in rule_levels.by_ref() {
        if r == "#" {
            return true;
        }
        match filter_levels.next() {
            Some("#") | None => return false,
            Some(f) if r == "+" || r == f => {}
            Some(_) => return false,
        }
    }
    filter_levels.next().is_none()
}

/// The ACL rules that apply to one connected client, resolved by [`AclFile::for_client`].
///
/// Topics and filters passed in must already be valid (the codec checks them). For a shared
/// subscription the caller strips `$share/<group>/` and asks about the filter that follows,
/// since that is what decides which topics the client receives.
#[derive(Debug, Clone, Default)]
pub struct ClientAcl {
    /// The client's own section (the anonymous one, or its user's), shared with every other
    /// client it applies to; `None` for a user without a section.
    section: Option<Arc<Rules>>,
    /// The `pattern` rules with this client's values substituted.
    patterns: Rules,
}

/// Rules split by what they decide.
#[derive(Debug, Clone, Default)]
struct Rules {
    /// Filters of `deny` rules, kept apart: they are asked first.
    deny: FilterSet,
    /// Filters of `read` and `readwrite` rules.
    read: FilterSet,
    /// Filters of `write` and `readwrite` rules.
    write: FilterSet,
}

impl Rules {
    fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.read.is_empty() && self.write.is_empty()
    }

    fn of(rules: &[Rule]) -> Rules {
        let mut out = Rules::default();
        for r in rules {
            out.add(r.access, r.filter.clone());
        }
        out
    }

    fn add(&mut self, access: Access, filter: String) {
        match access {
            Access::Deny => self.deny.push(filter),
            Access::Read => self.read.push(filter),
            Access::Write => self.write.push(filter),
            Access::ReadWrite => {
                self.read.push(filter.clone());
                self.write.push(filter);
            }
        }
    }
}

impl ClientAcl {
    /// Both rule sets that apply, own section first.
    fn sets(&self) -> impl Iterator<Item = &Rules> {
        // Most files have no patterns: skip their empty set rather than walk it per message.
        let patterns = (!self.patterns.is_empty()).then_some(&self.patterns);
        self.section.as_deref().into_iter().chain(patterns)
    }

    /// May this client publish to `topic`? Yes iff no deny rule matches it and some
    /// `write`/`readwrite` rule does.
    pub fn can_publish(&self, topic: &str) -> bool {
        !self.sets().any(|r| r.deny.matches(topic)) && self.sets().any(|r| r.write.matches(topic))
    }

    /// May a message on `topic` be delivered to this client? Yes iff no deny rule matches it
    /// and some `read`/`readwrite` rule does. Runs once per delivered message, so it never
    /// allocates.
    pub fn can_receive(&self, topic: &str) -> bool {
        !self.sets().any(|r| r.deny.matches(topic)) && self.sets().any(|r| r.read.matches(topic))
    }

    /// May this client subscribe to `filter`? Yes iff no deny rule covers it and some
    /// `read`/`readwrite` rule covers it (see [`covers`]).
    ///
    /// A deny rule that only overlaps the filter (deny `a/b`, subscribe `a/#`) does not refuse
    /// the subscription; [`can_receive`](Self::can_receive) then withholds the denied topics.
    pub fn can_subscribe(&self, filter: &str) -> bool {
        !self
            .sets()
            .any(|r| r.deny.iter().any(|f| covers(f, filter)))
            && self
                .sets()
                .any(|r| r.read.iter().any(|f| covers(f, filter)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(text: &str) -> AclFile {
        AclFile::parse(text).unwrap()
    }

    #[test]
    fn anonymous_section_is_for_anonymous_clients_only() {
        let file = acl("topic read public/#\n\nuser alice\ntopic alice/#\n");
        let anon = file.for_client(None, "c1");
        assert!(anon.can_receive("public/news"));
        assert!(anon.can_subscribe("public/#"));
        assert!(!anon.can_publish("public/news"));
        assert!(!anon.can_receive("alice/x"));

        let alice = file.for_client(Some("alice"), "c2");
        assert!(!alice.can_receive("public/news"));
        assert!(alice.can_publish("alice/x"));
        assert!(alice.can_receive("alice/x"));

        // A user with no section gets nothing at all: default deny.
        let bob = file.for_client(Some("bob"), "c3");
        assert!(!bob.can_receive("public/news"));
        assert!(!bob.can_publish("alice/x"));
        assert!(!bob.can_subscribe("#"));
    }

    #[test]
    fn user_sections_are_per_user_and_merge() {
        let file =
            acl("user alice\ntopic write a\nuser bob\ntopic read b\nuser alice\ntopic read c\n");
        let alice = file.for_client(Some("alice"), "x");
        assert!(alice.can_publish("a"));
        assert!(alice.can_receive("c"));
        assert!(!alice.can_receive("b"));
        let bob = file.for_client(Some("bob"), "x");
        assert!(bob.can_receive("b"));
        assert!(!bob.can_publish("a"));
        assert_eq!(file.rule_count(), 3);
    }

    #[test]
    fn user_name_is_rest_of_line() {
        let file = acl("user  john smith  \ntopic x\n");
        assert!(file.for_client(Some("john smith"), "c").can_publish("x"));
        assert!(!file.for_client(Some("john"), "c").can_publish("x"));
    }

    #[test]
    fn read_write_readwrite() {
        let file = acl("topic read r\ntopic write w\ntopic readwrite rw\ntopic both\n");
        let c = file.for_client(None, "c");
        assert!(c.can_receive("r") && !c.can_publish("r") && c.can_subscribe("r"));
        assert!(!c.can_receive("w") && c.can_publish("w") && !c.can_subscribe("w"));
        assert!(c.can_receive("rw") && c.can_publish("rw") && c.can_subscribe("rw"));
        assert!(c.can_receive("both") && c.can_publish("both"));
    }

    #[test]
    fn deny_beats_grant() {
        let file = acl("topic #\ntopic deny secret/#\ntopic deny a/b\n");
        let c = file.for_client(None, "c");
        assert!(c.can_publish("open"));
        assert!(c.can_receive("open"));
        assert!(!c.can_publish("secret"));
        assert!(!c.can_publish("secret/x"));
        assert!(!c.can_receive("secret/x"));
        assert!(!c.can_subscribe("secret/#"));
        assert!(!c.can_subscribe("secret/+/y"));
        assert!(!c.can_subscribe("a/b"));
        // Only overlapping a deny rule is allowed; delivery then withholds the denied topic.
        assert!(c.can_subscribe("a/+"));
        assert!(c.can_receive("a/c"));
        assert!(!c.can_receive("a/b"));
        // A pattern deny applies to every client too, even one with its own grants.
        let file = acl("user alice\ntopic #\npattern deny %u/private\n");
        let alice = file.for_client(Some("alice"), "c");
        assert!(alice.can_publish("alice/public"));
        assert!(!alice.can_publish("alice/private"));
    }

    #[test]
    fn patterns_substitute_username_and_client_id() {
        // Placed inside a user section on purpose: patterns apply to everyone anyway.
        let file = acl("user alice\npattern write devices/%c/up\npattern read users/%u/#\n");
        let alice = file.for_client(Some("alice"), "dev1");
        assert!(alice.can_publish("devices/dev1/up"));
        assert!(!alice.can_publish("devices/dev2/up"));
        assert!(alice.can_receive("users/alice/inbox"));
        assert!(alice.can_subscribe("users/alice/#"));
        assert!(!alice.can_subscribe("users/+/#"));

        let bob = file.for_client(Some("bob"), "dev2");
        assert!(bob.can_publish("devices/dev2/up"));
        assert!(bob.can_receive("users/bob/inbox"));
        assert!(!bob.can_receive("users/alice/inbox"));

        // Both placeholders in one level, and a literal '%' kept as it is.
        let file = acl("pattern a/%u-%c/100%\n");
        assert!(file.for_client(Some("u"), "c").can_publish("a/u-c/100%"));
    }

    #[test]
    fn patterns_skipped_for_unsafe_values_and_anonymous() {
        let file = acl("pattern devices/%c/#\npattern users/%u/#\n");
        for bad in ["+", "#", "a/b", "x+", "#y"] {
            let by_client = file.for_client(Some("ok"), bad);
            assert!(!by_client.can_publish("devices/a/b/x"), "{bad}");
            assert!(!by_client.can_subscribe("devices/#"), "{bad}");
            // The other pattern still applies.
            assert!(by_client.can_publish("users/ok/x"), "{bad}");

            let by_user = file.for_client(Some(bad), "dev");
            assert!(!by_user.can_publish("users/a/b/x"), "{bad}");
            assert!(!by_user.can_subscribe("users/#"), "{bad}");
            assert!(by_user.can_publish("devices/dev/x"), "{bad}");
        }
        let anon = file.for_client(None, "dev");
        assert!(anon.can_publish("devices/dev/x"));
        assert!(!anon.can_subscribe("users/#"));
        assert!(!anon.can_publish("users//x"));
        assert!(!anon.can_publish("users/%u/x"));
    }

    #[test]
    fn covers_cases() {
        let yes = [
            ("#", "a"),
            ("#", "#"),
            ("#", "a/+/#"),
            ("a/#", "a"),
            ("a/#", "a/#"),
            ("a/#", "a/b/#"),
            ("a/#", "a/+"),
            ("a/+", "a/b"),
            ("a/+", "a/+"),
            ("+/+", "a/+"),
            ("a/b", "a/b"),
            ("$SYS/#", "$SYS/broker/load"),
            ("$SYS/+", "$SYS/x"),
            ("a//b", "a//b"),
            ("+/b", "/b"),
        ];
        for (rule, filter) in yes {
            assert!(covers(rule, filter), "{rule} should cover {filter}");
        }
        let no = [
            ("a/+", "a/#"),
            ("a/+", "a"),
            ("a/+", "a/b/c"),
            ("a/b", "a/+"),
            ("a/b", "a/#"),
            ("a/b", "a"),
            ("a", "a/b"),
            ("a/b/#", "a/#"),
            ("+", "#"),
            ("#", "$SYS/x"),
            ("#", "$SYS"),
            ("+/#", "$SYS/#"),
            ("+/x", "$SYS/x"),
            ("a/#", "b"),
        ];
        for (rule, filter) in no {
            assert!(!covers(rule, filter), "{rule} should not cover {filter}");
        }
    }

    #[test]
    fn sys_topics_need_explicit_rules() {
        let file = acl("topic read #\n");
        let c = file.for_client(None, "c");
        assert!(!c.can_receive("$SYS/broker/uptime"));
        assert!(!c.can_subscribe("$SYS/#"));
        let file = acl("topic read $SYS/#\n");
        let c = file.for_client(None, "c");
        assert!(c.can_receive("$SYS/broker/uptime"));
        assert!(c.can_subscribe("$SYS/broker/+"));
        assert!(!c.can_subscribe("#"));
    }

    #[test]
    fn filter_may_contain_spaces() {
        let file = acl("topic read living room/lamp 1\ntopic my topic\n");
        let c = file.for_client(None, "c");
        assert!(c.can_receive("living room/lamp 1"));
        assert!(!c.can_publish("living room/lamp 1"));
        assert!(c.can_publish("my topic"));
        assert!(c.can_subscribe("my topic"));
    }

    #[test]
    fn comments_blanks_and_crlf() {
        let file = acl("# header\r\n\r\n  # indented\r\ntopic read a \r\n");
        assert_eq!(file.rule_count(), 1);
        assert!(file.for_client(None, "c").can_receive("a"));
    }

    #[test]
    fn parse_errors_carry_line_numbers() {
        let cases = [
            ("topic a\nbogus x\n", 2),
            ("topic a\n\ntopic a/#/b\n", 3),
            ("# c\npattern read a+\n", 2),
            ("user\n", 1),
            ("topic\n", 1),
            ("topic read\n", 1),
            ("topic deny   \n", 1),
            ("user a\ntopic ok\nTopic x\n", 3),
        ];
        for (text, line) in cases {
            let err = AclFile::parse(text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
            assert!(err
                .to_string()
                .starts_with(&format!("ACL file line {line}: ")));
        }
    }

    #[test]
    fn load_reports_missing_file_as_line_zero() {
        let err = AclFile::load(Path::new("/nonexistent/tether/acl")).unwrap_err();
        assert_eq!(err.line, 0);
    }
}
