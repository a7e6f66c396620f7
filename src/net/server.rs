//! The acceptor: binds nothing itself (the caller passes a bound listener, so tests use port
//! 0), serves each connection in its own task, bounds how many run at once, and shuts down in
//! order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::broker::Broker;
use crate::config::{Config, ListenerSpec};
use crate::net::connection;
use crate::shutdown::{Shutdown, Trigger};
use crate::transport::tls::TlsError;
use crate::transport::Endpoint;

/// How long shutdown waits for connection tasks to finish (flush, park, wills) before it
/// stops waiting.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// First pause after a failed accept (e.g. out of file descriptors); doubles up to the max.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A bound MQTT listener, its transport and how many connections it serves at once.
#[derive(Debug)]
pub struct Listener {
    /// The bound socket.
    pub socket: TcpListener,
    /// Transport, TLS certificate and settings; shared by the listener's connection tasks.
    pub endpoint: Arc<Endpoint>,
}

impl Listener {
    /// A listener on `socket` with `spec`'s settings; fails when its TLS files do not load.
    pub fn new(socket: TcpListener, spec: ListenerSpec) -> Result<Listener, TlsError> {
        Ok(Listener {
            socket,
            endpoint: Arc::new(Endpoint::new(spec)?),
        })
    }
}

/// Everything the broker serves: MQTT listeners and, optionally, the admin HTTP listener.
#[derive(Debug, Default)]
pub struct Sockets {
    /// MQTT listeners (at least one, normally).
    pub mqtt: Vec<Listener>,
    /// The admin API and metrics listener (`admin.bind`), if configured.
    pub admin: Option<TcpListener>,
}

/// Run the broker on `listener` until `shutdown` completes.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) {
    let broker = Broker::new(Arc::new(config));
    run_with(listener, broker, shutdown).await
}

/// Run with a broker built by the caller (tests inspect its registry and counters), on one
/// socket with the settings of `[listener]` (its `bind` aside).
pub async fn run_with(
    listener: TcpListener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()>,
) {
    let Ok(addr) = listener.local_addr() else {
        return;
    };
    let mut config = (*broker.config).clone();
    config.listener.bind = addr.to_string();
    config.listeners.clear();
    let Some(spec) = config.listener_specs().pop() else {
        return;
    };
    let listener = match Listener::new(listener, spec) {
        Ok(l) => l,
        Err(e) => {
            error!("cannot listen: {e}");
            return;
        }
    };
    let sockets = Sockets {
        mqtt: vec![listener],
        admin: None,
    };
    run_sockets(sockets, broker, shutdown).await
}

/// Run every listener in `sockets` (and the `$SYS` publisher when `sys_interval_secs` > 0)
/// until `shutdown` completes; then stop accepting everywhere and drain the connections.
pub async fn run_sockets(
    sockets: Sockets,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()>,
) {
    let (notify_tx, shutdown_rx) = Shutdown::new();
    let mut tasks = JoinSet::new();
    tasks.spawn(broker.clone().run_timers(shutdown_rx.clone()));
    for listener in sockets.mqtt {
        if let Some(certs) = &listener.endpoint.tls {
            broker.add_certs(certs.clone());
        }
        if let Ok(addr) = listener.socket.local_addr() {
            let spec = &listener.endpoint.spec;
            info!(
                %addr,
                scheme = spec.scheme(),
                max_connections = spec.max_connections,
                allow_anonymous = spec.allow_anonymous,
                "listening for MQTT"
            );
        }
        tasks.spawn(serve_listener(
            listener,
            broker.clone(),
            shutdown_rx.clone(),
        ));
    }
    if let Some(admin) = sockets.admin {
        tasks.spawn(crate::ops::admin::serve(
            admin,
            broker.clone(),
            shutdown_rx.clone(),
        ));
    }
    if broker.config.sys_interval_secs > 0 {
        let every = Duration::from_secs(broker.config.sys_interval_secs);
        tasks.spawn(crate::ops::admin::run_sys(
            broker.clone(),
            every,
            shutdown_rx.clone(),
        ));
    }
    shutdown.await;
    info!("shutting down");
    stop(notify_tx, tasks).await;
}

/// One MQTT listener: accept until shutdown, then close the socket and wait for its
/// connections (the caller bounds that wait; aborting this task aborts them).
async fn serve_listener(listener: Listener, broker: Arc<Broker>, mut shutdown: Shutdown) {
    let mut tasks = JoinSet::new();
    let for_connections = shutdown.clone();
    tokio::select! {
        _ = accept_loop(&listener, &broker, &for_connections, &mut tasks) => {}
        _ = shutdown.recv() => {}
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

async fn stop(notify_tx: Trigger, mut tasks: JoinSet<()>) {
    let _ = notify_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("connections still closing after {DRAIN_TIMEOUT:?}; aborting them");
        tasks.abort_all();
    }
}

async fn accept_loop(
    listener: &Listener,
    broker: &Arc<Broker>,
    shutdown: &Shutdown,
    tasks: &mut JoinSet<()>,
) {
    let permits = Arc::new(Semaphore::new(listener.endpoint.spec.max_connections));
    let mut backoff = ACCEPT_BACKOFF_START;
    loop {
        // Wait for a free slot before accepting, so excess clients wait in the backlog
        // instead of costing memory here.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        // Reap finished tasks so the set does not grow with every connection ever served.
        while tasks.try_join_next().is_some() {}
        let (stream, peer): (_, SocketAddr) = match listener.socket.accept().await {
            Ok(s) => {
                backoff = ACCEPT_BACKOFF_START;
                s
            }
            Err(e) => {
                error!("accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let broker = broker.clone();
        let shutdown = shutdown.clone();
        let endpoint = listener.endpoint.clone();
        tasks.spawn(connection::serve(
            stream, peer, broker, shutdown, endpoint, permit,
        ));
    }
}
