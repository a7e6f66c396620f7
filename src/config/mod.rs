//! Configuration: a serde tree with a default for every key, unknown keys refused, then
//! `validate()`, then shared read-only (`Arc<Config>`) by every task.
//!
//! `config/tether.toml` is the annotated reference; a test parses it and checks that it equals
//! the embedded defaults, so the file and the code cannot drift apart.
//!
//! Layers, later ones winning: embedded defaults, the file (`-c`), `TETHER_...` environment
//! variables ([`Config::apply_env`]), then command-line flags (in `main.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod listener;
mod load;
mod persistence;
pub use listener::{
    AuthConfig, ExtraListener, ListenerConfig, ListenerSpec, TlsConfig, TransportKind,
    DEFAULT_WS_PATH,
};
pub use persistence::{FsyncPolicy, PersistenceConfig, StoreConfig};

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for persistent state (`[persistence]`); unset = `tether-data` in the working
    /// directory.
    pub data_dir: Option<PathBuf>,
    /// Seconds between publications of the `$SYS/broker/...` topics; 0 = not published.
    pub sys_interval_secs: u64,
    /// The default MQTT listener and the connection-level limits every listener uses.
    pub listener: ListenerConfig,
    /// Further MQTT listeners (`[[listeners]]`), each with its own connection limit.
    pub listeners: Vec<ExtraListener>,
    /// Session state limits and lifetimes.
    pub session: SessionConfig,
    /// Retained messages.
    pub retain: RetainConfig,
    /// Logging.
    pub log: LogConfig,
    /// The HTTP admin listener: Prometheus metrics and the session API.
    pub admin: AdminConfig,
    /// Durable sessions and retained messages in `data_dir`.
    pub persistence: PersistenceConfig,
    /// Who may connect (password file) and what they may do (ACL file).
    pub auth: AuthConfig,
}

/// Where `data_dir` points when it is not set: beside the working directory.
pub const DEFAULT_DATA_DIR: &str = "tether-data";

/// What to drop when a session's queue is full.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OverflowPolicy {
    /// Keep what is queued, drop the arriving message (Mosquitto's behaviour).
    #[default]
    DropNew,
    /// Drop the oldest queued message to make room for the arriving one.
    DropOldest,
}

/// `[session]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Outbound QoS 1/2 messages in flight to one client (sent, not yet acknowledged).
    pub max_inflight: u16,
    /// Inbound QoS 2 messages from one client awaiting PUBREL; past it the connection is closed.
    pub max_inbound_inflight: u16,
    /// Messages queued for one session (online or offline, not counting in-flight ones).
    pub max_queued_messages: usize,
    /// Bytes queued for one session: topic, payload and properties of each message.
    pub max_queued_bytes: usize,
    /// What happens when a queue limit is reached.
    pub queue_overflow: OverflowPolicy,
    /// Queue QoS 0 messages for offline persistent sessions (Mosquitto's `queue_qos0_messages`).
    pub queue_qos0_offline: bool,
    /// Milliseconds a publisher is held back by one congested subscriber queue per episode;
    /// a queue whose connection took nothing during such a wait is marked slow and holds
    /// nobody back until it drains below half.
    pub slow_consumer_after_ms: u64,
    /// While a queue is marked slow, drop QoS 0 messages for it instead of queuing them
    /// (QoS 1/2 are queued up to the limits, then `queue_overflow` applies).
    pub slow_consumer_drop_qos0: bool,
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
    /// Sessions the broker holds at once, online and offline. A CONNECT that would create
    /// another is refused (CONNACK 0x03 / v5 0x97 Quota exceeded); resuming one is not.
    pub max_sessions: usize,
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
            slow_consumer_after_ms: 1000,
            slow_consumer_drop_qos0: true,
            max_subscriptions: 1000,
            persistent_session_max_lifetime_secs: 0,
            max_session_expiry_secs: u32::MAX,
            max_client_id_len: 256,
            max_sessions: 1_000_000,
            takeover_timeout_secs: 5,
        }
    }
}

impl SessionConfig {
    /// The back-pressure bound (`slow_consumer_after_ms`).
    pub fn slow_consumer_after(&self) -> Duration {
        Duration::from_millis(self.slow_consumer_after_ms)
    }

    /// The configured bound on a 3.1.1 persistent session's offline lifetime, if any.
    pub fn persistent_lifetime(&self) -> Option<Duration> {
        match self.persistent_session_max_lifetime_secs {
            0 => None,
            s => Some(Duration::from_secs(s)),
        }
    }
}

/// `[retain]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RetainConfig {
    /// Most topics holding a retained message; a retained PUBLISH to a new topic past it is
    /// delivered but not retained (counted as `dropped_retained_full`).
    pub max_messages: usize,
    /// Most bytes (topic, payload and properties) held by retained messages; a retained
    /// PUBLISH that would pass it is delivered but not retained (counted).
    pub max_bytes: usize,
}

impl Default for RetainConfig {
    fn default() -> Self {
        RetainConfig {
            max_messages: 100_000,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// One of error, warn, info, debug, trace. Changed live by SIGHUP.
    pub level: String,
    /// Line format: plain text or one JSON object per line.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Text,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines (colour only on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `[admin]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the HTTP admin listener (metrics and session API), `HOST:PORT`; empty = off.
    pub bind: String,
    /// Bearer token every admin request must carry (`Authorization: Bearer ...`); empty = none.
    /// Required when `bind` is not a loopback address. Changed live by SIGHUP.
    pub token: String,
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
        /// Dotted key, e.g. `session.max_inflight` or `listeners[1].bind`.
        key: String,
        /// What is wrong with it.
        why: String,
        /// Where the value came from, e.g. `line 3 of /etc/tether.toml` or an environment
        /// variable; `None` when it is a default or a command-line flag.
        at: Option<String>,
    },
    /// A `TETHER_...` environment variable that names no key or holds a bad value.
    Env {
        /// The variable's name.
        var: String,
        /// What is wrong with it.
        why: String,
    },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Read(path, e) => write!(f, "cannot read {path}: {e}"),
            ConfigError::Parse(msg) => write!(f, "{msg}"),
            ConfigError::Invalid { key, why, at } => {
                write!(f, "invalid value for `{key}`")?;
                if let Some(at) = at {
                    write!(f, " ({at})")?;
                }
                write!(f, ": {why}")
            }
            ConfigError::Env { var, why } => write!(f, "environment variable {var}: {why}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The annotated reference configuration, embedded so `--print-default-config` and tests see
/// exactly what ships.
pub const REFERENCE_TOML: &str = include_str!("../../config/tether.toml");

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "TETHER_";

/// Keys that SIGHUP applies to the running broker; every other changed key needs a restart.
/// Queue limits apply to sessions created after the reload (existing queues keep theirs).
pub const LIVE_KEYS: &[&str] = &[
    "log.level",
    "admin.token",
    "session.max_queued_messages",
    "session.max_queued_bytes",
    "session.queue_overflow",
    "session.queue_qos0_offline",
    "session.slow_consumer_drop_qos0",
    "auth.password_file",
    "auth.acl_file",
];

impl Config {
    /// Check values that serde's types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &str, why: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key: key.to_string(),
                why: why.into(),
                at: None,
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
        let mut binds = vec![self.listener.bind.parse::<SocketAddr>().ok()];
        for (i, l) in self.listeners.iter().enumerate() {
            let Ok(addr) = l.bind.parse::<SocketAddr>() else {
                return bad(
                    &format!("listeners[{i}].bind"),
                    "expected HOST:PORT with a numeric IP address",
                );
            };
            // Port 0 (any free port) may repeat; a fixed address twice cannot be bound.
            if addr.port() != 0 && binds.contains(&Some(addr)) {
                return bad(
                    &format!("listeners[{i}].bind"),
                    format!("{addr} is already a listener"),
                );
            }
            binds.push(Some(addr));
            if l.max_connections == Some(0) {
                return bad(
                    &format!("listeners[{i}].max_connections"),
                    "must be at least 1",
                );
            }
            if let Err((key, why)) =
                listener::validate_transport(&format!("listeners[{i}]"), &l.ws_path, l.tls.as_ref())
            {
                return bad(&key, why);
            }
        }
        if let Err((key, why)) = listener::validate_transport(
            "listener",
            &self.listener.ws_path,
            self.listener.tls.as_ref(),
        ) {
            return bad(&key, why);
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
        if self.session.max_sessions == 0 {
            return bad("session.max_sessions", "must be at least 1");
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
        if self.persistence.fsync_interval_ms == 0 {
            return bad("persistence.fsync_interval_ms", "must be at least 1");
        }
        if self.persistence.segment_bytes < 4096 {
            return bad("persistence.segment_bytes", "must be at least 4096");
        }
        if let Some(dir) = &self.data_dir {
            if dir.as_os_str().is_empty() {
                return bad("data_dir", "must not be empty (leave it out instead)");
            }
        }
        if !self.admin.bind.is_empty() {
            let Ok(addr) = self.admin.bind.parse::<SocketAddr>() else {
                return bad(
                    "admin.bind",
                    "expected HOST:PORT with a numeric IP address, or \"\" for off",
                );
            };
            // The admin API can disconnect clients and delete sessions: off the loopback
            // interface it must not be open to anyone who can reach the port.
            if !addr.ip().is_loopback() && self.admin.token.is_empty() {
                return bad(
                    "admin.token",
                    format!("required when admin.bind ({addr}) is not a loopback address"),
                );
            }
        }
        if self
            .admin
            .token
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return bad(
                "admin.token",
                "must not contain spaces or control characters",
            );
        }
        Ok(())
    }

    /// The directory of the store: `data_dir`, or `tether-data` in the working directory.
    pub fn data_dir_or_default(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
    }

    /// How the store is opened, from `data_dir` and `[persistence]`.
    pub fn store_config(&self) -> StoreConfig {
        self.persistence.store_config(self.data_dir_or_default())
    }

    /// The CONNECT deadline.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.listener.connect_timeout_secs)
    }

    /// Every MQTT listener: `[listener]` first, then `[[listeners]]` in file order. Entries
    /// whose address does not parse are left out (`validate` refuses them).
    pub fn listener_specs(&self) -> Vec<ListenerSpec> {
        let l = &self.listener;
        let first = l.bind.parse().ok().map(|bind| {
            ListenerSpec::new(
                bind,
                l.max_connections,
                l.transport,
                &l.ws_path,
                l.allow_anonymous,
                l.tls.clone(),
            )
        });
        first
            .into_iter()
            .chain(self.listeners.iter().filter_map(|x| {
                Some(ListenerSpec::new(
                    x.bind.parse().ok()?,
                    x.max_connections.unwrap_or(l.max_connections),
                    x.transport,
                    &x.ws_path,
                    x.allow_anonymous,
                    x.tls.clone(),
                ))
            }))
            .collect()
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

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn invalid_value_names_the_line() {
        let err = Config::from_toml("# c\n[session]\n\nmax_inflight = 0\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("session.max_inflight"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
    }

    #[test]
    fn extra_listeners_are_listed_after_the_default_one() {
        let c = Config::from_toml(
            "[listener]\nbind = \"127.0.0.1:1000\"\nmax_connections = 5\n\n\
             [[listeners]]\nbind = \"127.0.0.1:1001\"\n\n\
             [[listeners]]\nbind = \"127.0.0.1:1002\"\nmax_connections = 2\n",
        )
        .unwrap();
        let specs = c.listener_specs();
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[1].bind.port(), 1001);
        assert_eq!(
            specs[1].max_connections, 5,
            "inherits listener.max_connections"
        );
        assert_eq!(specs[2].max_connections, 2);
    }

    #[test]
    fn bad_extra_listener_names_its_index_and_line() {
        let err = Config::from_toml(
            "[[listeners]]\nbind = \"127.0.0.1:1001\"\n[[listeners]]\nbind = \"x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("listeners[1].bind"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn env_overrides_keys_with_double_underscore_between_table_and_key() {
        let mut c = Config::default();
        let applied = c
            .apply_env(env(&[
                ("TETHER_SESSION__MAX_INFLIGHT", "10"),
                ("TETHER_LOG__LEVEL", "debug"),
                ("TETHER_SESSION__QUEUE_QOS0_OFFLINE", "true"),
                ("TETHER_DATA_DIR", "/var/lib/tether"),
                ("TETHER_ADMIN__TOKEN", "\"s3cret\""),
                ("PATH", "/bin"),
            ]))
            .unwrap();
        assert_eq!(applied.len(), 5);
        assert_eq!(c.session.max_inflight, 10);
        assert_eq!(c.log.level, "debug");
        assert!(c.session.queue_qos0_offline);
        assert_eq!(c.data_dir, Some(PathBuf::from("/var/lib/tether")));
        assert_eq!(c.admin.token, "s3cret");
    }

    #[test]
    fn unknown_env_variable_is_an_error_naming_it() {
        for var in [
            "TETHER_SESSION_MAX_INFLIGHT",
            "TETHER_SESSION__NOPE",
            "TETHER_LISTENERS",
            "TETHER_SESSION",
        ] {
            let err = Config::default()
                .apply_env(env(&[(var, "1")]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(var), "{err}");
        }
    }

    #[test]
    fn env_value_of_the_wrong_type_or_range_names_the_variable() {
        let err = Config::default()
            .apply_env(env(&[("TETHER_SESSION__MAX_INFLIGHT", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("TETHER_SESSION__MAX_INFLIGHT"), "{err}");
        let err = Config::default()
            .apply_env(env(&[("TETHER_SESSION__MAX_INFLIGHT", "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("session.max_inflight"), "{err}");
        assert!(err.contains("TETHER_SESSION__MAX_INFLIGHT"), "{err}");
    }

    #[test]
    fn admin_off_loopback_requires_a_token() {
        let err = Config::from_toml("[admin]\nbind = \"0.0.0.0:8080\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.token"), "{err}");
        Config::from_toml("[admin]\nbind = \"0.0.0.0:8080\"\ntoken = \"t\"\n").unwrap();
        Config::from_toml("[admin]\nbind = \"127.0.0.1:8080\"\n").unwrap();
    }

    #[test]
    fn changed_keys_lists_dotted_names() {
        let a = Config::default();
        let mut b = a.clone();
        b.log.level = "debug".into();
        b.listener.max_connections = 3;
        b.sys_interval_secs = 5;
        assert_eq!(
            a.changed_keys(&b),
            vec!["listener.max_connections", "log.level", "sys_interval_secs"]
        );
    }
}
