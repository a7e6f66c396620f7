//! The acceptor: binds nothing itself (the caller passes a bound listener, so tests use port
//! 0), serves each connection in its own task, bounds how many run at once, and shuts down in
//! order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::broker::Broker;
use crate::config::Config;
use crate::connection;
use crate::shutdown::Shutdown;

/// How long shutdown waits for connection tasks to finish (flush, park, wills) before it
/// stops waiting.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// First pause after a failed accept (e.g. out of file descriptors); doubles up to the max.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Run the broker on `listener` until `shutdown` completes.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) {
    let broker = Broker::new(Arc::new(config));
    run_with(listener, broker, shutdown).await
}

/// Run with a broker built by the caller (tests inspect its registry and counters).
pub async fn run_with(
    listener: TcpListener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()>,
) {
    let (notify_tx, shutdown_rx) = Shutdown::new();
    let mut tasks = JoinSet::new();
    tasks.spawn(broker.clone().run_timers(shutdown_rx.clone()));
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "listening for MQTT");
    }
    tokio::select! {
        _ = accept_loop(&listener, &broker, &shutdown_rx, &mut tasks) => {}
        _ = shutdown => info!("shutting down"),
    }
    drop(listener);
    stop(notify_tx, tasks).await;
}

async fn stop(notify_tx: watch::Sender<bool>, mut tasks: JoinSet<()>) {
    let _ = notify_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            left = tasks.len(),
            "connections still closing after {DRAIN_TIMEOUT:?}; aborting them"
        );
        tasks.abort_all();
    }
}

async fn accept_loop(
    listener: &TcpListener,
    broker: &Arc<Broker>,
    shutdown: &Shutdown,
    tasks: &mut JoinSet<()>,
) {
    let permits = Arc::new(Semaphore::new(broker.config.listener.max_connections));
    let mut backoff = ACCEPT_BACKOFF_START;
    loop {
        // Wait for a free slot before accepting, so excess clients wait in the backlog
        // instead of costing memory here.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        // Reap finished tasks so the set does not grow with every connection ever served.
        while tasks.try_join_next().is_some() {}
        let (stream, peer): (_, SocketAddr) = match listener.accept().await {
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
        tasks.spawn(async move {
            connection::serve(stream, peer, broker, shutdown).await;
            drop(permit);
        });
    }
}
