//! The admin listener (off unless `admin.bind` is set): Prometheus metrics at `/metrics`, the
//! session API under `/api/sessions`, `/health`; and the `$SYS/broker/...` publisher, which
//! reports the same figures over MQTT.
//!
//! Online sessions are owned by their connection tasks, so their views and kicks go through
//! the task's control channel (`Control::Snapshot`, `Control::Kick`); offline sessions are read
//! and removed in their registry slot.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, warn};

use crate::broker::Broker;
use crate::ops::http::{self, Request, Response};
use crate::session::inspect::SessionInfo;
use crate::session::registry::{Control, ControlTx, Slot};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::wire::message::Message;
use crate::wire::packet::{PublishProperties, QoS};

/// How long the API waits for connection tasks to answer a snapshot request.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one admin connection may take, request and response together.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections served at once; more wait in the backlog.
const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Pause while a Client ID changes hands (takeover) before looking again.
const SETTLE: Duration = Duration::from_millis(10);

// ----------------------------------------------------------------------------------------------
// Session operations.

/// What a slot looked like at one moment.
enum Probe {
    Offline(SessionInfo),
    Online(ControlTx),
    Changing,
}

fn probe(broker: &Broker, client_id: &str) -> Option<Probe> {
    broker.registry.with_slot(client_id, |slot| match slot {
        Slot::Online { control, .. } => Probe::Online(control.clone()),
        Slot::Offline {
            session, deadline, ..
        } => {
            let mut info = SessionInfo::of(session, false, session.pending_will.is_some());
            info.expires_in_secs = deadline.map(|d| {
                d.instant()
                    .saturating_duration_since(Instant::now())
                    .as_secs()
            });
            Probe::Offline(info)
        }
        Slot::TakingOver { .. } => Probe::Changing,
    })
}

/// The result of looking a session up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<T> {
    /// Found (and done).
    Found(T),
    /// No session with that Client ID.
    NotFound,
    /// The owning connection did not answer in time, or the session kept changing hands.
    Busy,
}

/// Ask an owning connection task for its view, within `deadline`.
async fn ask(control: &ControlTx, deadline: Instant) -> Option<SessionInfo> {
    let (tx, rx) = oneshot::channel();
    timeout_at(deadline, control.send(Control::Snapshot(tx)))
        .await
        .ok()?
        .ok()?;
    timeout_at(deadline, rx).await.ok()?.ok()
}

/// One session's view.
pub async fn session(broker: &Broker, client_id: &str) -> Lookup<SessionInfo> {
    let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
    while Instant::now() < deadline {
        match probe(broker, client_id) {
            None => return Lookup::NotFound,
            Some(Probe::Offline(info)) => return Lookup::Found(info),
            Some(Probe::Online(control)) => {
                // No answer: the connection closed meanwhile (look again) or is stuck.
                if let Some(info) = ask(&control, deadline).await {
                    return Lookup::Found(info);
                }
            }
            Some(Probe::Changing) => tokio::time::sleep(SETTLE).await,
        }
    }
    Lookup::Busy
}

/// Every session's view, sorted by Client ID. Online sessions are asked all at once, so the
/// whole list takes at most about `SNAPSHOT_TIMEOUT`; one that does not answer is left out
/// (and logged).
pub async fn sessions(broker: &Broker) -> Vec<SessionInfo> {
    let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
    let mut out = Vec::new();
    let mut pending = Vec::new();
    for id in broker.registry.client_ids() {
        match probe(broker, &id) {
            None => {}
            Some(Probe::Offline(info)) => out.push(info),
            Some(Probe::Online(control)) => {
                let (tx, rx) = oneshot::channel();
                // A full control channel means the task is busy; it is asked again below.
                match control.try_send(Control::Snapshot(tx)) {
                    Ok(()) => pending.push((id, Some(rx))),
                    Err(_) => pending.push((id, None)),
                }
            }
            Some(Probe::Changing) => pending.push((id, None)),
        }
    }
    for (id, rx) in pending {
        let answered = match rx {
            Some(rx) => timeout_at(deadline, rx).await.ok().and_then(Result::ok),
            None => None,
        };
        match answered {
            Some(info) => out.push(info),
            None => match session(broker, &id).await {
                Lookup::Found(info) => out.push(info),
                Lookup::NotFound => {}
                Lookup::Busy => warn!(client_id = %id, "session did not answer; not listed"),
            },
        }
    }
    out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    out
}

/// Disconnect an online client (v5: DISCONNECT 0x98). `Found(false)`: the session exists but
/// is offline.
pub async fn kick(broker: &Broker, client_id: &str) -> Lookup<bool> {
    let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
    while Instant::now() < deadline {
        match probe(broker, client_id) {
            None => return Lookup::NotFound,
            Some(Probe::Offline(_)) => return Lookup::Found(false),
            Some(Probe::Online(control)) => {
                if let Ok(Ok(())) = timeout_at(deadline, control.send(Control::Kick)).await {
                    info!(client_id, "client disconnected by the admin API");
                    return Lookup::Found(true);
                }
            }
            Some(Probe::Changing) => tokio::time::sleep(SETTLE).await,
        }
    }
    Lookup::Busy
}

/// Delete a session: an online client is kicked first, then its parked session removed. Its
/// subscriptions go and a delayed will still pending is published (the session ends).
pub async fn delete(broker: &Broker, client_id: &str) -> Lookup<()> {
    let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
    let mut kicked = false;
    while Instant::now() < deadline {
        match probe(broker, client_id) {
            None if kicked => return Lookup::Found(()),
            None => return Lookup::NotFound,
            Some(Probe::Offline(_)) => {
                if let Some(session) = broker.registry.remove_offline(client_id) {
                    broker.end_session(session);
                    info!(client_id, "session deleted by the admin API");
                    return Lookup::Found(());
                }
            }
            Some(Probe::Online(control)) => {
                if !kicked {
                    if let Ok(Ok(())) = timeout_at(deadline, control.send(Control::Kick)).await {
                        kicked = true;
                    }
                }
                tokio::time::sleep(SETTLE).await;
            }
            Some(Probe::Changing) => tokio::time::sleep(SETTLE).await,
        }
    }
    Lookup::Busy
}

// ----------------------------------------------------------------------------------------------
// Figures for /metrics and $SYS.

/// Broker-wide figures at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Figures {
    /// Seconds since the broker started.
    pub uptime_secs: u64,
    /// Network connections open now.
    pub connections_current: u64,
    /// Connections accepted since start.
    pub connections_accepted: u64,
    /// Sessions with a connection (or changing hands).
    pub sessions_online: u64,
    /// Sessions parked without a connection.
    pub sessions_offline: u64,
    /// Entries in the subscription index (one per subscription, one per shared group).
    pub subscriptions: u64,
    /// PUBLISH packets received from clients, by QoS.
    pub messages_received: [u64; 3],
    /// PUBLISH packets sent to clients, by QoS.
    pub messages_sent: [u64; 3],
    /// Bytes read from client sockets.
    pub bytes_received: u64,
    /// Bytes written to client sockets.
    pub bytes_sent: u64,
    /// Dropped messages by cause (names as in `Stats`, without `dropped_`).
    pub dropped: Vec<(&'static str, u64)>,
    /// Outbound QoS 1/2 messages in flight, all sessions.
    pub inflight: u64,
    /// Messages queued, all sessions.
    pub queued_messages: u64,
    /// Payload bytes queued, all sessions.
    pub queued_bytes: u64,
    /// Topics holding a retained message.
    pub retained: u64,
    /// Expiry and will-delay timers armed.
    pub expiry_timers: u64,
    /// Sessions ended by expiry since start.
    pub sessions_expired: u64,
    /// CONNECTs refused at `session.max_sessions` since start.
    pub sessions_refused: u64,
    /// Wills published since start.
    pub wills_published: u64,
    /// Connections closed for protocol errors since start.
    pub protocol_errors: u64,
    /// Online sessions marked slow now.
    pub slow_consumers: u64,
    /// Times a subscriber was marked slow since start.
    pub slow_consumers_marked: u64,
    /// Failed transport handshakes by transport (`tls`, `ws`).
    pub handshake_failures: Vec<(&'static str, u64)>,
    /// CONNECTs refused by authentication, by reason (`bad_credentials`, `not_authorized`).
    pub auth_refused: Vec<(&'static str, u64)>,
    /// ACL refusals by action (`publish`, `subscribe`, `delivery`).
    pub acl_denied: Vec<(&'static str, u64)>,
    /// The store's figures; `None` with persistence off.
    pub store: Option<crate::session::journal::JournalFigures>,
}

/// Gather the figures. Inflight and queue totals come from every session's view, so this costs
/// one snapshot request per online session.
pub async fn figures(broker: &Broker) -> Figures {
    let s = &broker.stats;
    let all = sessions(broker).await;
    let total = broker.registry.len() as u64;
    let offline = broker.registry.offline_count() as u64;
    Figures {
        uptime_secs: broker.started.elapsed().as_secs(),
        connections_current: Stats::get(&s.connections_current),
        connections_accepted: Stats::get(&s.connections_accepted),
        sessions_online: total.saturating_sub(offline),
        sessions_offline: offline,
        subscriptions: broker.router.len() as u64,
        messages_received: s.publish_received.each_ref().map(Stats::get),
        messages_sent: s.publish_sent.each_ref().map(Stats::get),
        bytes_received: Stats::get(&s.bytes_received),
        bytes_sent: Stats::get(&s.bytes_sent),
        dropped: vec![
            ("queue_full", Stats::get(&s.dropped_queue_full)),
            ("qos0_offline", Stats::get(&s.dropped_qos0_offline)),
            ("too_large", Stats::get(&s.dropped_too_large)),
            ("expired", Stats::get(&s.dropped_expired)),
            ("retained_full", Stats::get(&s.dropped_retained_full)),
            ("slow_qos0", Stats::get(&s.dropped_slow_qos0)),
        ],
        inflight: all.iter().map(|i| i.inflight as u64).sum(),
        queued_messages: all.iter().map(|i| i.queued_messages as u64).sum(),
        queued_bytes: all.iter().map(|i| i.queued_bytes as u64).sum(),
        retained: broker.retained.len() as u64,
        expiry_timers: broker.registry.timers.len() as u64,
        sessions_expired: Stats::get(&s.sessions_expired),
        sessions_refused: Stats::get(&s.sessions_refused),
        wills_published: Stats::get(&s.wills_published),
        protocol_errors: Stats::get(&s.protocol_errors),
        slow_consumers: all.iter().filter(|i| i.slow).count() as u64,
        slow_consumers_marked: Stats::get(&s.slow_consumers_marked),
        handshake_failures: vec![
            ("tls", Stats::get(&s.tls_handshake_failures)),
            ("ws", Stats::get(&s.ws_handshake_failures)),
        ],
        auth_refused: vec![
            ("bad_credentials", Stats::get(&s.auth_bad_credentials)),
            ("not_authorized", Stats::get(&s.auth_not_authorized)),
        ],
        acl_denied: vec![
            ("publish", Stats::get(&s.acl_denied_publish)),
            ("subscribe", Stats::get(&s.acl_denied_subscribe)),
            ("delivery", Stats::get(&s.acl_denied_delivery)),
        ],
        store: broker.journal.figures(),
    }
}

/// The Prometheus text exposition (format 0.0.4) of `f`.
pub fn prometheus(f: &Figures) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    metric(
        "tether_uptime_seconds",
        "gauge",
        "Seconds since the broker started.",
        &[("", f.uptime_secs)],
    );
    metric(
        "tether_connections",
        "gauge",
        "Network connections open now.",
        &[("", f.connections_current)],
    );
    metric(
        "tether_connections_accepted_total",
        "counter",
        "Connections accepted.",
        &[("", f.connections_accepted)],
    );
    metric(
        "tether_sessions",
        "gauge",
        "Sessions by state.",
        &[
            ("{state=\"online\"}", f.sessions_online),
            ("{state=\"offline\"}", f.sessions_offline),
        ],
    );
    metric(
        "tether_subscriptions",
        "gauge",
        "Subscriptions (one per shared group).",
        &[("", f.subscriptions)],
    );
    let by_qos = |v: &[u64; 3]| -> [(&'static str, u64); 3] {
        [
            ("{qos=\"0\"}", v[0]),
            ("{qos=\"1\"}", v[1]),
            ("{qos=\"2\"}", v[2]),
        ]
    };
    metric(
        "tether_messages_received_total",
        "counter",
        "PUBLISH packets received from clients, by QoS.",
        &by_qos(&f.messages_received),
    );
    metric(
        "tether_messages_sent_total",
        "counter",
        "PUBLISH packets sent to clients, by QoS.",
        &by_qos(&f.messages_sent),
    );
    metric(
        "tether_bytes_received_total",
        "counter",
        "Bytes read from client sockets.",
        &[("", f.bytes_received)],
    );
    metric(
        "tether_bytes_sent_total",
        "counter",
        "Bytes written to client sockets.",
        &[("", f.bytes_sent)],
    );
    let labelled = |key: &str, values: &[(&str, u64)]| -> Vec<(String, u64)> {
        values
            .iter()
            .map(|(v, n)| (format!("{{{key}=\"{v}\"}}"), *n))
            .collect()
    };
    let dropped = labelled("cause", &f.dropped);
    let dropped: Vec<(&str, u64)> = dropped.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    metric(
        "tether_messages_dropped_total",
        "counter",
        "Messages dropped, by cause.",
        &dropped,
    );
    metric(
        "tether_inflight_messages",
        "gauge",
        "Outbound QoS 1/2 messages awaiting acknowledgement.",
        &[("", f.inflight)],
    );
    metric(
        "tether_queued_messages",
        "gauge",
        "Messages queued in sessions.",
        &[("", f.queued_messages)],
    );
    metric(
        "tether_queued_bytes",
        "gauge",
        "Payload bytes queued in sessions.",
        &[("", f.queued_bytes)],
    );
    metric(
        "tether_retained_messages",
        "gauge",
        "Topics holding a retained message.",
        &[("", f.retained)],
    );
    metric(
        "tether_expiry_timers",
        "gauge",
        "Session-expiry and will-delay timers armed.",
        &[("", f.expiry_timers)],
    );
    metric(
        "tether_sessions_expired_total",
        "counter",
        "Sessions ended by expiry.",
        &[("", f.sessions_expired)],
    );
    metric(
        "tether_sessions_refused_total",
        "counter",
        "CONNECTs refused because session.max_sessions sessions exist.",
        &[("", f.sessions_refused)],
    );
    metric(
        "tether_wills_published_total",
        "counter",
        "Will messages published.",
        &[("", f.wills_published)],
    );
    metric(
        "tether_protocol_errors_total",
        "counter",
        "Connections closed for protocol errors.",
        &[("", f.protocol_errors)],
    );
    metric(
        "tether_slow_consumers",
        "gauge",
        "Online sessions marked slow (they hold no publisher back; only their own limits apply).",
        &[("", f.slow_consumers)],
    );
    metric(
        "tether_slow_consumers_marked_total",
        "counter",
        "Times a subscriber was marked slow.",
        &[("", f.slow_consumers_marked)],
    );
    for (name, help, key, values) in [
        (
            "tether_handshake_failures_total",
            "TLS handshakes and WebSocket upgrades that failed or timed out, by transport.",
            "transport",
            &f.handshake_failures,
        ),
        (
            "tether_auth_refused_total",
            "CONNECTs refused by authentication, by reason.",
            "reason",
            &f.auth_refused,
        ),
        (
            "tether_acl_denied_total",
            "ACL refusals, by action.",
            "action",
            &f.acl_denied,
        ),
    ] {
        let samples = labelled(key, values);
        let samples: Vec<(&str, u64)> = samples.iter().map(|(l, n)| (l.as_str(), *n)).collect();
        metric(name, "counter", help, &samples);
    }
    if let Some(st) = &f.store {
        metric(
            "tether_store_bytes",
            "gauge",
            "Bytes of the store's log files in the data directory.",
            &[("", st.bytes)],
        );
        metric(
            "tether_store_failed",
            "gauge",
            "1 while store writes fail (disk full, I/O error) and QoS 1/2 messages are refused.",
            &[("", u64::from(st.failed))],
        );
        // A summary without quantiles: rate(_sum) / rate(_count) is the mean commit latency.
        out.push_str(&format!(
            "# HELP tether_store_commit_seconds Group commits (write, and fsync under \
             fsync = always, of a batch someone waits for) and their duration.\n\
             # TYPE tether_store_commit_seconds summary\n\
             tether_store_commit_seconds_sum {}.{:06}\n\
             tether_store_commit_seconds_count {}\n",
            st.commit_micros / 1_000_000,
            st.commit_micros % 1_000_000,
            st.commits
        ));
    }
    out
}

/// The `$SYS/broker/...` topics and values for `f` (Mosquitto's names where it has one).
pub fn sys_topics(f: &Figures) -> Vec<(String, String)> {
    let mut t: Vec<(String, String)> = vec![
        (
            "version".into(),
            format!("tether {}", env!("CARGO_PKG_VERSION")),
        ),
        ("uptime".into(), format!("{} seconds", f.uptime_secs)),
        ("clients/connected".into(), f.sessions_online.to_string()),
        (
            "clients/disconnected".into(),
            f.sessions_offline.to_string(),
        ),
        (
            "clients/total".into(),
            (f.sessions_online + f.sessions_offline).to_string(),
        ),
        (
            "connections/current".into(),
            f.connections_current.to_string(),
        ),
        (
            "connections/accepted".into(),
            f.connections_accepted.to_string(),
        ),
        ("subscriptions/count".into(), f.subscriptions.to_string()),
        (
            "publish/messages/received".into(),
            f.messages_received.iter().sum::<u64>().to_string(),
        ),
        (
            "publish/messages/sent".into(),
            f.messages_sent.iter().sum::<u64>().to_string(),
        ),
        ("bytes/received".into(), f.bytes_received.to_string()),
        ("bytes/sent".into(), f.bytes_sent.to_string()),
        (
            "publish/messages/dropped".into(),
            f.dropped.iter().map(|(_, n)| n).sum::<u64>().to_string(),
        ),
        ("messages/inflight".into(), f.inflight.to_string()),
        ("store/messages/count".into(), f.queued_messages.to_string()),
        ("store/messages/bytes".into(), f.queued_bytes.to_string()),
        ("retained messages/count".into(), f.retained.to_string()),
        ("sessions/expiry timers".into(), f.expiry_timers.to_string()),
        ("sessions/expired".into(), f.sessions_expired.to_string()),
        ("wills/published".into(), f.wills_published.to_string()),
        ("protocol errors".into(), f.protocol_errors.to_string()),
        ("clients/slow".into(), f.slow_consumers.to_string()),
    ];
    for (cause, n) in &f.dropped {
        t.push((format!("publish/messages/dropped/{cause}"), n.to_string()));
    }
    if let Some(st) = &f.store {
        t.push(("store/bytes".into(), st.bytes.to_string()));
        t.push(("store/commits".into(), st.commits.to_string()));
        t.push((
            "store/commit latency us".into(),
            st.commit_micros
                .checked_div(st.commits)
                .unwrap_or(0)
                .to_string(),
        ));
        t.push(("store/failed".into(), u8::from(st.failed).to_string()));
    }
    t.into_iter()
        .map(|(k, v)| (format!("$SYS/broker/{k}"), v))
        .collect()
}

/// Publish the `$SYS` topics as retained QoS 0 messages every `interval` until shutdown.
pub async fn run_sys(broker: Arc<Broker>, interval: Duration, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tick.tick() => {}
        }
        let f = figures(&broker).await;
        for (topic, value) in sys_topics(&f) {
            broker.publish(Message {
                topic,
                payload: Bytes::from(value),
                qos: QoS::AtMostOnce,
                retain: true,
                properties: PublishProperties::default(),
                expires_at: None,
                publisher: None,
                stored: Default::default(),
                encoded: Default::default(),
            });
        }
    }
}

// ----------------------------------------------------------------------------------------------
// HTTP.

/// Serve the admin API on `listener` until shutdown.
pub async fn serve(listener: TcpListener, broker: Arc<Broker>, mut shutdown: Shutdown) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin API and metrics listening");
    }
    let permits = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.recv() => return,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.recv() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    warn!("admin accept failed: {e}");
                    // Out of descriptors and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let broker = broker.clone();
        tokio::spawn(async move {
            if timeout(REQUEST_TIMEOUT, handle(stream, &broker))
                .await
                .is_err()
            {
                debug!(%peer, "admin request timed out");
            }
            drop(permit);
        });
    }
}

async fn handle(mut stream: TcpStream, broker: &Broker) {
    let response = match http::read_request(&mut stream).await {
        Ok(req) => respond(&req, broker).await,
        Err(e) => match e.status() {
            Some(status) => Response::text(status, format!("{}\n", http::reason(status))),
            None => return,
        },
    };
    let _ = response.write(&mut stream).await;
}

fn json(status: u16, value: &impl Serialize) -> Response {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            Response::new(status, "application/json", body)
        }
        Err(e) => Response::text(500, format!("cannot encode: {e}\n")),
    }
}

fn error(status: u16, message: &str) -> Response {
    json(status, &serde_json::json!({ "error": message }))
}

/// Compare without stopping at the first difference, so timing does not reveal the prefix.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Route one request.
pub async fn respond(req: &Request, broker: &Broker) -> Response {
    if req.path == "/health" {
        return Response::text(200, "ok\n");
    }
    let token = broker.live_config().admin.token.clone();
    if !token.is_empty() {
        let given = req
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same(given.trim().as_bytes(), token.as_bytes()) {
            let mut r = error(401, "missing or wrong bearer token");
            r.headers
                .push(("WWW-Authenticate", "Bearer realm=\"tether\"".to_string()));
            return r;
        }
    }
    let method = req.method.as_str();
    if req.path == "/metrics" {
        return match method {
            "GET" => Response::new(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                prometheus(&figures(broker).await),
            ),
            _ => error(405, "use GET"),
        };
    }
    if req.path == "/api/sessions" || req.path == "/api/sessions/" {
        return match method {
            "GET" => json(200, &sessions(broker).await),
            _ => error(405, "use GET"),
        };
    }
    let Some(rest) = req.path.strip_prefix("/api/sessions/") else {
        return error(404, "no such endpoint");
    };
    let (raw_id, action) = match rest.strip_suffix("/kick") {
        Some(id) => (id, Some("kick")),
        None => (rest, None),
    };
    let Some(id) = http::percent_decode(raw_id) else {
        return error(400, "bad percent-encoding in the client id");
    };
    let busy = || {
        error(
            503,
            "the session's connection did not answer in time; try again",
        )
    };
    let missing = || error(404, &format!("no session for client id {id:?}"));
    match (method, action) {
        ("GET", None) => match session(broker, &id).await {
            Lookup::Found(info) => json(200, &info),
            Lookup::NotFound => missing(),
            Lookup::Busy => busy(),
        },
        ("DELETE", None) => match delete(broker, &id).await {
            Lookup::Found(()) => json(200, &serde_json::json!({ "deleted": id })),
            Lookup::NotFound => missing(),
            Lookup::Busy => busy(),
        },
        ("POST", Some(_)) => match kick(broker, &id).await {
            Lookup::Found(true) => json(200, &serde_json::json!({ "kicked": id })),
            Lookup::Found(false) => error(409, &format!("client {id:?} is not connected")),
            Lookup::NotFound => missing(),
            Lookup::Busy => busy(),
        },
        (_, Some(_)) => error(405, "use POST"),
        (_, None) => error(405, "use GET or DELETE"),
    }
}
