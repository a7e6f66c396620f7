//! Configuration: a serde tree with a default for every key, unknown keys refused, then
//! `validate()`, then shared read-only (`Arc<Config>`) by every task.
//!
//! `config/tether.toml` is the annotated reference; a test parses it and checks that it equals
//! the embedded defaults, so the file and the code cannot drift apart.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The MQTT listener and connection-level limits.
    pub listener: ListenerConfig,
    /// Session state limits and lifetimes.
    pub session: SessionConfig,
    /// Retained messages.
    pub retain: RetainConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[listener]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// Address the MQTT listener binds, `HOST:PORT`.
    pub bind: String,
    /// Connections served at once; further ones wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// Seconds a new connection has to send CONNECT before it is closed.
    pub connect_timeout_secs: u64,
    /// Largest packet accepted from a client, in bytes, fixed header included.
    pub max_packet_size: usize,
    /// Per-connection write buffer size, in bytes, past which the broker stops moving queued
    /// messages to the socket until the client reads.
    pub max_write_buffer: usize,
    /// Largest keep-alive accepted, in seconds; a larger or zero client value is replaced by it
    /// (v5: returned as Server Keep Alive). 0 = no maximum.
    pub max_keep_alive_secs: u16,
    /// Topic aliases a v5 client may use towards the broker (Topic Alias Maximum in CONNACK).
    pub topic_alias_maximum: u16,
    /// Use topic aliases towards v5 clients that accept them.
    pub outbound_topic_aliases: bool,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            bind: "127.0.0.1:1883".to_string(),
            max_connections: 10_000,
            connect_timeout_secs: 10,
            max_packet_size: 1024 * 1024,
            max_write_buffer: 256 * 1024,
            max_keep_alive_secs: 0,
            topic_alias_maximum: 16,
            outbound_topic_aliases: false,
        }
    }
}

/// What to drop when a session's queue is full.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OverflowPolicy {
    /// Keep what is queued, drop the arriving message (Mosquitto's behaviour).
    #[default]
    DropNew,
    /// Drop the oldest queued message to make room for the arriving one.
    DropOldest,
}

/// `[session]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Outbound QoS 1/2 messages in flight to one client (sent, not yet acknowledged).
    pub max_inflight: u16,
    /// Inbound QoS 2 messages from one client awaiting PUBREL; past it the connection is closed.
    pub max_inbound_inflight: u16,
    /// Messages queued for one session (online or offline, not counting in-flight ones).
    pub max_queued_messages: usize,
    /// Payload bytes queued for one session.
    pub max_queued_bytes: usize,
    /// What happens when a queue limit is reached.
    pub queue_overflow: OverflowPolicy,
    /// Queue QoS 0 messages for offline persistent sessions (Mosquitto's `queue_qos0_messages`).
    pub queue_qos0_offline: bool,
    /// Subscriptions one session may hold; a SUBSCRIBE past it gets failure for the new filters.
    pub max_subscriptions: usize,
    /// Upper bound, in seconds, on how long a 3.1.1 persistent session (Clean Session = 0)
    /// lives after its connection closes. The specification keeps them forever; 0 = forever.
    pub persistent_session_max_lifetime_secs: u64,
    /// Upper bound on a v5 Session Expiry Interval, in seconds; a larger request is capped and
    /// the capped value returned in CONNACK. 4294967295 = no cap (sessions may never expire).
    pub max_session_expiry_secs: u32,
    /// Longest Client Identifier accepted, in bytes.
    pub max_client_id_len: usize,
    /// Seconds a taking-over connection waits for the old connection to hand its session back.
    pub takeover_timeout_secs: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_inflight: 32,
            max_inbound_inflight: 64,
            max_queued_messages: 1000,
            max_queued_bytes: 16 * 1024 * 1024,
            queue_overflow: OverflowPolicy::DropNew,
            queue_qos0_offline: false,
            max_subscriptions: 1000,
            persistent_session_max_lifetime_secs: 0,
            max_session_expiry_secs: u32::MAX,
            max_client_id_len: 256,
            takeover_timeout_secs: 5,
        }
    }
}

impl SessionConfig {
    /// The configured bound on a 3.1.1 persistent session's offline lifetime, if any.
    pub fn persistent_lifetime(&self) -> Option<Duration> {
        match self.persistent_session_max_lifetime_secs {
            0 => None,
            s => Some(Duration::from_secs(s)),
        }
    }
}

/// `[retain]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RetainConfig {
    /// Most topics holding a retained message; a retained PUBLISH to a new topic past it is
    /// delivered but not retained (counted as `dropped_retained_full`).
    pub max_messages: usize,
}

impl Default for RetainConfig {
    fn default() -> Self {
        RetainConfig {
            max_messages: 100_000,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// One of error, warn, info, debug, trace.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
        }
    }
}

/// A configuration that could not be loaded, with the key or line at fault.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read(String, std::io::Error),
    /// TOML syntax, an unknown key or a value of the wrong type (toml names key and line).
    Parse(String),
    /// A value of the right type outside what the broker accepts.
    Invalid {
        /// Dotted key, e.g. `session.max_inflight`.
        key: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Read(path, e) => write!(f, "cannot read {path}: {e}"),
            ConfigError::Parse(msg) => write!(f, "{msg}"),
            ConfigError::Invalid { key, why } => write!(f, "invalid value for `{key}`: {why}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The annotated reference configuration, embedded so `--print-default-config` and tests see
/// exactly what ships.
pub const REFERENCE_TOML: &str = include_str!("../config/tether.toml");

impl Config {
    /// Parse and validate TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read(path.display().to_string(), e))?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse(msg) => ConfigError::Parse(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Check values that serde's types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, why: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                why: why.into(),
            })
        }
        if self.listener.bind.parse::<SocketAddr>().is_err() {
            return bad(
                "listener.bind",
                "expected HOST:PORT with a numeric IP address",
            );
        }
        if self.listener.max_connections == 0 {
            return bad("listener.max_connections", "must be at least 1");
        }
        if self.listener.connect_timeout_secs == 0 {
            return bad("listener.connect_timeout_secs", "must be at least 1");
        }
        // 268,435,460 is the largest packet the remaining-length encoding can describe.
        if !(64..=268_435_460).contains(&self.listener.max_packet_size) {
            return bad(
                "listener.max_packet_size",
                "must be between 64 and 268435460",
            );
        }
        if self.listener.max_write_buffer < 4096 {
            return bad("listener.max_write_buffer", "must be at least 4096");
        }
        if self.session.max_inflight == 0 {
            return bad("session.max_inflight", "must be at least 1");
        }
        if self.session.max_inbound_inflight == 0 {
            return bad("session.max_inbound_inflight", "must be at least 1");
        }
        if self.session.max_queued_messages == 0 {
            return bad("session.max_queued_messages", "must be at least 1");
        }
        if self.session.max_queued_bytes == 0 {
            return bad("session.max_queued_bytes", "must be at least 1");
        }
        if self.session.max_subscriptions == 0 {
            return bad("session.max_subscriptions", "must be at least 1");
        }
        if !(23..=65_535).contains(&self.session.max_client_id_len) {
            return bad("session.max_client_id_len", "must be between 23 and 65535");
        }
        if self.session.takeover_timeout_secs == 0 {
            return bad("session.takeover_timeout_secs", "must be at least 1");
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&self.log.level.as_str()) {
            return bad(
                "log.level",
                "expected one of error, warn, info, debug, trace",
            );
        }
        Ok(())
    }

    /// The CONNECT deadline.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.listener.connect_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_reference_file_parses_and_equals_the_defaults() {
        let parsed = Config::from_toml(REFERENCE_TOML).expect("reference config must parse");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_refused_with_its_name() {
        let err = Config::from_toml("[session]\nmax_inflihgt = 3\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("max_inflihgt"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn invalid_value_names_the_key() {
        let err = Config::from_toml("[session]\nmax_inflight = 0\n").unwrap_err();
        assert!(err.to_string().contains("session.max_inflight"), "{err}");
        let err = Config::from_toml("[listener]\nbind = \"nowhere\"\n").unwrap_err();
        assert!(err.to_string().contains("listener.bind"), "{err}");
    }

    #[test]
    fn overflow_policy_parses_kebab_case() {
        let c = Config::from_toml("[session]\nqueue_overflow = \"drop-oldest\"\n").unwrap();
        assert_eq!(c.session.queue_overflow, OverflowPolicy::DropOldest);
    }
}
