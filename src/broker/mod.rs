//! The broker's shared state and the operations that span several parts of it; `restore`
//! rebuilds it from what a journal recovered at start.

pub mod restore;
#[cfg(test)]
mod tests;

use std::sync::{Arc, RwLock};

use tokio::time::Instant;
use tracing::{debug, info};

use crate::auth::gate::Gate;
use crate::config::Config;
use crate::routing::retain::RetainStore;
use crate::routing::router::{Router, SubEntry};
use crate::session::expiry::TimerKind;
use crate::session::journal::{Journal, NoJournal};
use crate::session::mailbox::{Mailbox, QueueLimits};
use crate::session::registry::Registry;
use crate::session::{Session, Subscription};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::transport::tls::Certs;
use crate::wire::message::Message;
use crate::wire::packet::{ProtocolVersion, Will};

/// Sessions the timer task ends (and at least a quarter of those still held) before it asks
/// the allocator to return free memory to the system (`memory::trim`).
const TRIM_AFTER_SESSIONS: usize = 10_000;

/// Everything the connection tasks share. Built once by `server::run`, then handed to each
/// task as `Arc<Broker>`; dropped when the last task ends.
#[derive(Debug)]
pub struct Broker {
    /// The validated configuration the broker started with; read-only. Settings that SIGHUP
    /// can change are read from [`Broker::live_config`] instead.
    pub config: Arc<Config>,
    /// The configuration as last reloaded (SIGHUP). A lock around an `Arc` rather than a new
    /// crate: readers clone the `Arc` (a short read lock) at the moment a setting is needed.
    live: RwLock<Arc<Config>>,
    /// When the broker was built, for uptime in metrics and `$SYS`.
    pub started: std::time::Instant,
    /// Client ID -> session slot.
    pub registry: Registry,
    /// Topic filter index.
    pub router: Router,
    /// Retained messages.
    pub retained: RetainStore,
    /// Counters.
    pub stats: Stats,
    /// Where durable sessions and retained messages are journaled: the store with
    /// persistence on, [`NoJournal`] with it off.
    pub journal: Arc<dyn Journal>,
    /// Source of server-assigned Client IDs: a counter hashed with this process's random
    /// SipHash keys, so assigned IDs are unique and cannot be guessed to hijack a session.
    assigned_ids: (
        std::sync::atomic::AtomicU64,
        std::collections::hash_map::RandomState,
    ),
    /// The certificates of every TLS listener, registered when the listener starts, so SIGHUP
    /// can re-read them all ([`Broker::reload_certs`]).
    certs: std::sync::Mutex<Vec<Arc<Certs>>>,
    /// Password file and ACL (`[auth]`), reloaded on SIGHUP.
    pub auth: Gate,
}

impl Broker {
    /// A broker with nothing in it, keeping everything in memory.
    pub fn new(config: Arc<Config>) -> Arc<Broker> {
        Broker::with_journal(config, Arc::new(NoJournal))
    }

    /// A broker journaling durable sessions and retained messages to `journal` (see
    /// [`Broker::restore`] to load what it held first).
    pub fn with_journal(config: Arc<Config>, journal: Arc<dyn Journal>) -> Arc<Broker> {
        Arc::new(Broker {
            journal,
            retained: RetainStore::new(config.retain.max_messages, config.retain.max_bytes),
            live: RwLock::new(config.clone()),
            started: std::time::Instant::now(),
            config: config.clone(),
            registry: Registry::new(),
            router: Router::default(),
            stats: Stats::default(),
            assigned_ids: Default::default(),
            certs: Default::default(),
            auth: Gate::load(&config.auth).unwrap_or_else(|e| {
                // `main` checks the files before it builds the broker; failing closed here
                // covers anything that builds one otherwise.
                tracing::error!("cannot load [auth] files, refusing every client: {e}");
                Gate::deny_all()
            }),
        })
    }

    /// A fresh Client ID for a client that sent an empty one [MQTT-3.1.3-6], never one that is
    /// in use.
    pub fn assign_client_id(&self) -> Arc<str> {
        use std::hash::BuildHasher;
        loop {
            let n = self
                .assigned_ids
                .0
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id: Arc<str> = format!("tether-{:016x}", self.assigned_ids.1.hash_one(n)).into();
            if !self.registry.contains(&id) {
                return id;
            }
        }
    }

    /// The configuration as last reloaded (the start configuration until a reload).
    pub fn live_config(&self) -> Arc<Config> {
        // A poisoned lock still holds a valid Arc: a panic cannot leave it half-written.
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Install a reloaded configuration. Only the keys in `config::LIVE_KEYS` take effect.
    pub fn set_live_config(&self, config: Arc<Config>) {
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    /// Register a TLS listener's certificates for SIGHUP reloads.
    pub fn add_certs(&self, certs: Arc<Certs>) {
        self.certs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(certs);
    }

    /// Re-read every TLS listener's certificate, key and client CA. A file that fails keeps
    /// that listener's running certificate; the failure is logged with the file named.
    /// New connections see the new certificate, open ones keep their session.
    pub fn reload_certs(&self) {
        let certs = self.certs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for c in certs {
            match c.reload() {
                Ok(()) => info!(cert = %c.cert_path().display(), "TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!("TLS reload failed, keeping the running certificate: {e}")
                }
            }
        }
    }

    /// SIGHUP: re-read the TLS certificates and the `[auth]` files `auth` names. Whatever
    /// fails to load keeps running as it was, and is logged.
    pub fn reload_files(&self, auth: &crate::config::AuthConfig) {
        self.reload_certs();
        match self.auth.reload(auth) {
            Ok(()) => info!("password and ACL files reloaded"),
            Err(e) => tracing::error!("[auth] reload failed, keeping the running files: {e}"),
        }
    }

    /// A new empty session with the queue limits of the live configuration (so a reload
    /// applies to sessions created after it).
    pub fn new_session(
        &self,
        client_id: Arc<str>,
        protocol: ProtocolVersion,
        expiry_interval: u32,
    ) -> Box<Session> {
        let limits = QueueLimits::from(&self.live_config().session);
        let mailbox = Arc::new(Mailbox::new(limits));
        Box::new(Session::new(client_id, protocol, mailbox, expiry_interval))
    }

    /// Publish an application message: update the retained store if it is retained, then queue
    /// it for every matching session. Returns the number of matching sessions, counting those
    /// whose queue limits dropped it (see `Router::route`): 0 means no subscriber at all.
    pub fn publish(&self, msg: Message) -> usize {
        self.publish_into(msg, None)
    }

    /// `publish`, also collecting the queues it left congested (back-pressure, see
    /// `Mailbox::congested`): the publishing connection waits for them before reading more.
    pub fn publish_into(&self, msg: Message, congested: Option<&mut Vec<Arc<Mailbox>>>) -> usize {
        let msg = Arc::new(msg);
        if msg.retain {
            if self.journal.is_failed() {
                // The store cannot take the change: refusing it keeps memory and disk in step,
                // and stops a client publishing retained messages in a loop (QoS 0 included)
                // from growing the store's pending buffer without bound during an outage.
                // The message is still delivered to current subscribers.
                Stats::incr(&self.stats.dropped_retained_full);
            } else {
                self.retained
                    .set_journaled(&msg, &self.stats, &*self.journal);
            }
        }
        self.router.route_into(&msg, &self.stats, congested)
    }

    /// Publish a will message on behalf of `client_id`.
    pub fn publish_will(&self, client_id: &Arc<str>, will: Will, now: Instant) {
        debug!(client_id = %client_id, topic = %will.topic, "publishing will");
        Stats::incr(&self.stats.wills_published);
        let expires_at = will
            .properties
            .message_expiry_interval
            .map(|s| now + std::time::Duration::from_secs(u64::from(s)));
        self.publish(Message {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties: will.properties,
            expires_at,
            publisher: Some(client_id.clone()),
            stored: Default::default(),
            encoded: Default::default(),
        });
    }

    /// Subscribe `session` to `filter` (which may be `$share/...`): the session's own map and
    /// the router's entry always change together. True if the session had that filter already
    /// (its options are replaced).
    pub fn subscribe(&self, session: &mut Session, filter: String, sub: Subscription) -> bool {
        self.router.subscribe(
            &session.client_id,
            &filter,
            SubEntry {
                mailbox: session.mailbox.clone(),
                sub,
            },
        );
        session.subscriptions.insert(filter, sub).is_some()
    }

    /// Remove `session`'s subscription to `filter`; false if it had none.
    pub fn unsubscribe(&self, session: &mut Session, filter: &str) -> bool {
        if session.subscriptions.remove(filter).is_none() {
            return false;
        }
        self.router
            .unsubscribe(&session.client_id, filter, &session.mailbox);
        true
    }

    /// A session's lifetime is over: publish a will still waiting for its delay (the session
    /// ending comes first, section 3.1.3.2.2), remove its subscriptions from the router and
    /// close its queue, so nothing it held keeps memory alive.
    // Sessions live boxed in the registry and come out of it boxed; unboxing here would only
    // move them once more.
    #[allow(clippy::boxed_local)]
    pub fn end_session(&self, mut session: Box<Session>) {
        if let Some(will) = session.pending_will.take() {
            self.publish_will(&session.client_id, will, Instant::now());
        }
        std::mem::take(&mut session.journal).ended();
        for filter in session.subscriptions.keys() {
            self.router
                .unsubscribe(&session.client_id, filter, &session.mailbox);
        }
        session.mailbox.close();
    }

    /// The timer task: fires session-expiry (and will-delay) deadlines until shutdown.
    pub async fn run_timers(self: Arc<Self>, mut shutdown: Shutdown) {
        // Sessions ended since the allocator was last asked to give memory back.
        let mut freed = 0usize;
        let trimming = Arc::new(std::sync::atomic::AtomicBool::new(false));
        loop {
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = self.registry.timers.wait() => {}
            }
            let mut expired = 0usize;
            for timer in self.registry.timers.take_due(Instant::now()) {
                match timer.kind() {
                    TimerKind::SessionExpiry => {
                        if let Some(session) = self.registry.expire(&timer) {
                            debug!(client_id = %timer.client_id(), "session expired");
                            Stats::incr(&self.stats.sessions_expired);
                            self.end_session(session);
                            expired += 1;
                        }
                    }
                    TimerKind::WillDelay => {
                        if let Some(will) = self.registry.take_pending_will(&timer) {
                            self.publish_will(timer.client_id(), will, Instant::now());
                        }
                    }
                }
            }
            if expired > 0 {
                if expired >= 1000 {
                    info!(expired, "sessions expired");
                }
                self.registry.compact();
                self.router.compact();
                freed += expired;
                // Relative to what is left, so a mass expiry trims a dozen times, not once per
                // ten thousand sessions (each trim walks the whole heap).
                if freed >= TRIM_AFTER_SESSIONS
                    && freed >= self.registry.len() / 4
                    && !trimming.swap(true, std::sync::atomic::Ordering::AcqRel)
                {
                    // glibc keeps freed memory for reuse; after a mass expiry an operator
                    // would see RSS stay at its peak. Trimming walks the heap: not on the
                    // async threads, and one at a time.
                    freed = 0;
                    let trimming = trimming.clone();
                    tokio::task::spawn_blocking(move || {
                        crate::memory::trim();
                        trimming.store(false, std::sync::atomic::Ordering::Release);
                    });
                }
            }
        }
    }
}
