//! The listener tables (`[listener]`, `[[listeners]]`) and `[auth]`: where clients connect,
//! over which transport, and who may.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The WebSocket path when `ws_path` is not set (Mosquitto and mqtt.js use `/mqtt` too).
pub const DEFAULT_WS_PATH: &str = "/mqtt";

/// What carries the MQTT byte stream on a listener. TLS is orthogonal: a `tls` table turns
/// `tcp` into MQTT over TLS (port 8883 by custom) and `ws` into `wss`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    /// MQTT directly on the TCP (or TLS) stream.
    #[default]
    Tcp,
    /// MQTT in binary WebSocket frames after an HTTP upgrade on `ws_path`.
    Ws,
}

/// `tls = { ... }` on a listener: certificate and key, and optionally client certificates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key: PathBuf,
    /// PEM file with the CA certificates client certificates must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Refuse the handshake of a client without a certificate from `client_ca` (mutual TLS).
    #[serde(default)]
    pub require_client_cert: bool,
    /// Take the username from the client certificate's subject CN (its password is not
    /// checked: the certificate is the credential), as Mosquitto's option of that name.
    #[serde(default)]
    pub use_identity_as_username: bool,
}

/// `[auth]`: files read at start and again on SIGHUP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Mosquitto-format password file (`user:$7$...`); `tether passwd FILE USER` edits it.
    /// Unset: usernames and passwords are not checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Mosquitto-format ACL file (`user`, `topic`, `pattern` lines). Unset: every client may
    /// publish and subscribe to every topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acl_file: Option<PathBuf>,
}

/// `[[listeners]]`: an MQTT listener besides `[listener]`. Packet, keep-alive and buffer limits
/// are those of `[listener]`; the connection limit, transport and security are per listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExtraListener {
    /// Address it binds, `HOST:PORT`.
    pub bind: String,
    /// Connections served at once on this listener; absent = `listener.max_connections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// `tcp` or `ws`.
    #[serde(default)]
    pub transport: TransportKind,
    /// HTTP path of the WebSocket upgrade (`transport = "ws"`).
    #[serde(default = "default_ws_path")]
    pub ws_path: String,
    /// Accept clients without a username; absent = only on a loopback address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
    /// TLS on this listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

impl ExtraListener {
    /// A plain TCP listener on `bind` with every other setting at its default.
    pub fn plain(bind: String) -> ExtraListener {
        ExtraListener {
            bind,
            max_connections: None,
            transport: TransportKind::Tcp,
            ws_path: default_ws_path(),
            allow_anonymous: None,
            tls: None,
        }
    }
}

fn default_ws_path() -> String {
    DEFAULT_WS_PATH.to_string()
}

/// One MQTT listener as the acceptor sees it, after defaults are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    /// Address to bind.
    pub bind: SocketAddr,
    /// Connections served at once.
    pub max_connections: usize,
    /// `tcp` or `ws`.
    pub transport: TransportKind,
    /// HTTP path of the WebSocket upgrade.
    pub ws_path: String,
    /// Whether clients without a username are accepted (default resolved from `bind`).
    pub allow_anonymous: bool,
    /// TLS settings, if the listener speaks TLS.
    pub tls: Option<TlsConfig>,
}

impl ListenerSpec {
    /// Resolve a listener's settings; `allow_anonymous` defaults to "only on loopback", so a
    /// broker opened to the network never takes anonymous clients unless told to. (A
    /// WebSocket listener on loopback is reachable by any page a local browser opens: the
    /// documentation says to set `allow_anonymous = false` there when that matters.)
    pub fn new(
        bind: SocketAddr,
        max_connections: usize,
        transport: TransportKind,
        ws_path: &str,
        allow_anonymous: Option<bool>,
        tls: Option<TlsConfig>,
    ) -> ListenerSpec {
        ListenerSpec {
            bind,
            max_connections,
            transport,
            ws_path: ws_path.to_string(),
            allow_anonymous: allow_anonymous.unwrap_or(bind.ip().is_loopback()),
            tls,
        }
    }

    /// A name for logs and metrics: `mqtt`, `mqtts`, `ws` or `wss`.
    pub fn scheme(&self) -> &'static str {
        match (self.transport, self.tls.is_some()) {
            (TransportKind::Tcp, false) => "mqtt",
            (TransportKind::Tcp, true) => "mqtts",
            (TransportKind::Ws, false) => "ws",
            (TransportKind::Ws, true) => "wss",
        }
    }
}

/// `[listener]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// Address the MQTT listener binds, `HOST:PORT`.
    pub bind: String,
    /// Connections served at once; further ones wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// Seconds a new connection has to send CONNECT before it is closed (the TLS handshake
    /// and WebSocket upgrade included).
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
    /// Use topic aliases towards v5 clients that ask for them (Topic Alias Maximum in CONNECT).
    pub outbound_topic_aliases: bool,
    /// `tcp` or `ws`.
    pub transport: TransportKind,
    /// HTTP path of the WebSocket upgrade (`transport = "ws"`).
    pub ws_path: String,
    /// Accept clients without a username; absent = only on a loopback address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
    /// TLS on this listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
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
            outbound_topic_aliases: true,
            transport: TransportKind::Tcp,
            ws_path: default_ws_path(),
            allow_anonymous: None,
            tls: None,
        }
    }
}

/// Checks of one listener's transport settings; `key` is its dotted prefix.
pub(super) fn validate_transport(
    key: &str,
    ws_path: &str,
    tls: Option<&TlsConfig>,
) -> Result<(), (String, String)> {
    if !ws_path.starts_with('/') {
        return Err((format!("{key}.ws_path"), "must start with /".into()));
    }
    if let Some(tls) = tls {
        if tls.require_client_cert && tls.client_ca.is_none() {
            return Err((
                format!("{key}.tls.client_ca"),
                "required with require_client_cert".into(),
            ));
        }
        if tls.use_identity_as_username && !tls.require_client_cert {
            return Err((
                format!("{key}.tls.use_identity_as_username"),
                "needs require_client_cert = true".into(),
            ));
        }
    }
    Ok(())
}
