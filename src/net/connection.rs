//! One task per network connection: the CONNECT handshake, then one `select!` loop over reads,
//! writes, the session's mailbox, keep-alive, takeover requests and shutdown, then an orderly
//! end (will, parking or hand-over). Packet handling itself lives in `protocol`.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::{timeout, Instant};
use tracing::{debug, field, info, info_span, warn, Instrument};

use crate::auth::gate::Verdict;
use crate::broker::Broker;
use crate::net::protocol::{Conn, Exit};
use crate::session::inspect::SessionInfo;
use crate::session::journal::{self, Durable, ImageKind, Journal, SessionJournal};
use crate::session::mailbox::{Mailbox, MailboxAcl};
use crate::session::registry::{control_channel, Claim, Control, ControlRx, ControlTx, Parked};
use crate::session::{Session, EXPIRY_NEVER};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::transport::{Endpoint, HandshakeError, Io, OutBuf, Stream};
use crate::wire::codec::{self, DecodeError};
use crate::wire::packet::{
    Ack, ConnAck, ConnAckProperties, Connect, Disconnect, Packet, ProtocolVersion, QoS, ReasonCode,
};
use crate::wire::topic;

/// How long a closing connection may spend flushing its last bytes (a final DISCONNECT, acks).
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a closing connection keeps reading, and discarding, what the client still sends
/// after the server's last bytes. Closing a socket with unread input makes the kernel send a
/// reset, which fails the client's next write and can discard the final DISCONNECT still on its
/// way; bounded so a client that never stops writing cannot hold the connection slot.
pub const LINGER: Duration = Duration::from_secs(2);
/// The same for a connection refused before it had a session (CONNACK failure, bad first
/// packet): shorter, since a client hammering the broker with bad CONNECTs (say, guessing
/// passwords) would otherwise hold a connection slot for the whole `LINGER` each time.
pub const REFUSE_LINGER: Duration = Duration::from_millis(500);
/// Pause between two claims of a Client ID whose takeover is already in progress.
const BUSY_RETRY: Duration = Duration::from_millis(5);
/// How long a connection ending while its slot is being taken over waits for the taker's
/// request before it looks at the slot again.
const HANDOVER_RECHECK: Duration = Duration::from_millis(50);
/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;

/// Serve one accepted connection until it closes. Never panics on input; logs once at the end.
/// `permit` (its listener's connection slot) is given back when it ends.
///
/// A plain function building the task's future, not an `async fn`: an async fn's arguments
/// (and an async block's captures) stay in its state for the task's whole life, and what
/// only the handshake needs would otherwise sit in every idle connection. Here they go into
/// the handshake's own box, freed once the client is connected.
pub fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    shutdown: Shutdown,
    endpoint: Arc<Endpoint>,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send + 'static {
    let span = info_span!("conn", %peer, client_id = field::Empty, proto = field::Empty);
    let stats = broker.clone();
    let handshake = Box::pin(async move {
        // Small MQTT packets must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        start(stream, &broker, shutdown, &endpoint).await
    });
    async move {
        Stats::incr(&stats.stats.connections_accepted);
        stats
            .stats
            .connections_current
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        run(handshake).await;
        stats
            .stats
            .connections_current
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        drop(permit);
    }
    .instrument(span)
}

/// The connection until its session is attached and the CONNACK queued: transport handshake,
/// CONNECT, authentication, claim. `None` when it ended there.
async fn start(
    tcp: TcpStream,
    broker: &Arc<Broker>,
    mut shutdown: Shutdown,
    endpoint: &Endpoint,
) -> Option<Ready> {
    let config = &broker.config;
    // The transport handshake and the CONNECT share one deadline.
    let deadline = Instant::now() + config.connect_timeout();
    let handshake = if endpoint.is_plain() {
        // Nothing to negotiate, and nothing allocated for it: a boxed handshake freed right
        // away would leave a hole in the heap under each plain connection's long-lived state.
        Ok(Ok(Stream::Tcp(tcp)))
    } else {
        tokio::select! {
            _ = shutdown.recv() => return None,
            // Boxed: the TLS / WebSocket handshake state is kilobytes, and inline it would
            // size every connection task's future for its whole life.
            r = tokio::time::timeout_at(deadline, Box::pin(endpoint.handshake(tcp, config.listener.max_packet_size))) => r,
        }
    };
    let mut stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let counter = match e {
                HandshakeError::Tls(_) => &broker.stats.tls_handshake_failures,
                HandshakeError::Ws(_) => &broker.stats.ws_handshake_failures,
            };
            Stats::incr(counter);
            debug!(scheme = endpoint.spec.scheme(), "{e}");
            return None;
        }
        Err(_) => {
            let counter = if endpoint.tls.is_some() {
                &broker.stats.tls_handshake_failures
            } else {
                &broker.stats.ws_handshake_failures
            };
            Stats::incr(counter);
            debug!(
                scheme = endpoint.spec.scheme(),
                "handshake not done within {:?}; closing",
                config.connect_timeout()
            );
            return None;
        }
    };
    let mut inbuf = BytesMut::with_capacity(READ_CHUNK);

    let connect = tokio::select! {
        _ = shutdown.recv() => return None,
        // The futures awaited before the main loop are boxed (`refuse`, `finish` too): each
        // await's state is part of the task's size, which idle connections pay for.
        r = tokio::time::timeout_at(deadline, Box::pin(read_connect(&mut stream, &mut inbuf, config.listener.max_packet_size))) => match r {
            Err(_) => {
                debug!("no CONNECT within {:?}; closing", config.connect_timeout());
                return None;
            }
            Ok(Err(ConnectError::Closed)) => {
                debug!("closed before CONNECT");
                return None;
            }
            Ok(Err(ConnectError::Io(e))) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    // A WebSocket text or oversize frame, a corrupt TLS record.
                    Stats::incr(&broker.stats.protocol_errors);
                }
                debug!("read error before CONNECT: {e}");
                return None;
            }
            Ok(Err(ConnectError::Decode(DecodeError::UnsupportedProtocolVersion(level)))) => {
                // [MQTT-3.1.2-2]: CONNACK 0x01 in the 3.1.1 format, then close.
                warn!(level, "unsupported protocol level; refusing");
                let ack = connack(false, ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
                let mut out = BytesMut::new();
                let _ = codec::encode(&ack, ProtocolVersion::V311, None, &mut out);
                let _ = timeout(CLOSE_FLUSH_TIMEOUT, stream.write_all(&out)).await;
                Box::pin(linger_close(&mut stream, &mut shutdown, REFUSE_LINGER)).await;
                return None;
            }
            Ok(Err(ConnectError::Decode(e))) => {
                Stats::incr(&broker.stats.protocol_errors);
                warn!("bad CONNECT: {e}");
                // v5 may say why before closing (section 4.13); 3.1.1 just closes
                // [MQTT-3.1.4-1].
                if codec::connect_version(&inbuf).is_some_and(|v| v.is_v5()) {
                    refuse(&mut stream, ProtocolVersion::V5, e.reason_code(), &mut shutdown).await;
                } else {
                    Box::pin(linger_close(&mut stream, &mut shutdown, REFUSE_LINGER)).await;
                }
                return None;
            }
            // Boxed: the decoded CONNECT is dropped before the main loop, but its bytes in
            // this task's state would stay reserved for the connection's whole life.
            Ok(Ok(c)) => Box::new(c),
        }
    };

    let span = tracing::Span::current();
    span.record("proto", connect.protocol.level());
    let protocol = connect.protocol;

    let Some((client_id, assigned)) = client_identifier(&connect, broker) else {
        info!(client_id = %connect.client_id, "client identifier rejected");
        refuse(
            &mut stream,
            protocol,
            ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            &mut shutdown,
        )
        .await;
        return None;
    };
    span.record("client_id", &*client_id);
    if let Some(will) = &connect.will {
        if !topic::valid_topic_name(&will.topic) {
            warn!(topic = %will.topic, "invalid will topic");
            Stats::incr(&broker.stats.protocol_errors);
            if protocol.is_v5() {
                refuse(
                    &mut stream,
                    protocol,
                    ReasonCode::TOPIC_NAME_INVALID,
                    &mut shutdown,
                )
                .await;
            } else {
                linger_close(&mut stream, &mut shutdown, REFUSE_LINGER).await;
            }
            return None;
        }
    }
    if protocol.is_v5() && connect.properties.authentication_method.is_some() {
        // Enhanced authentication is not offered.
        refuse(
            &mut stream,
            protocol,
            ReasonCode::BAD_AUTHENTICATION_METHOD,
            &mut shutdown,
        )
        .await;
        return None;
    }

    // Who the client is, before any session state is touched: the CONNECT's username and
    // password, or the TLS certificate's CN on a `use_identity_as_username` listener.
    let identity = endpoint
        .spec
        .tls
        .as_ref()
        .is_some_and(|t| t.use_identity_as_username);
    let username = if identity {
        stream.peer_common_name()
    } else {
        connect.username.clone()
    };
    // Bounded by the CONNECT deadline: a queue of slow hashes must not hold connection
    // slots past it.
    let verdict = tokio::select! {
        _ = shutdown.recv() => return None,
        v = tokio::time::timeout_at(deadline, Box::pin(broker.auth.authenticate(
            username.as_deref(),
            connect.password.as_ref(),
            identity,
            endpoint.spec.allow_anonymous,
        ))) => v,
    };
    let Ok(verdict) = verdict else {
        warn!("password check not done within the CONNECT timeout; refusing");
        refuse(
            &mut stream,
            protocol,
            ReasonCode::SERVER_UNAVAILABLE,
            &mut shutdown,
        )
        .await;
        return None;
    };
    // A name nobody checked is not an identity: without a password file (and no
    // certificate) the client is anonymous to the ACL too.
    let username = match verdict {
        Verdict::Allowed { verified: true } => username,
        _ => None,
    };
    let refused = match verdict {
        Verdict::Allowed { .. } => None,
        Verdict::BadCredentials => {
            Stats::incr(&broker.stats.auth_bad_credentials);
            Some(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
        }
        Verdict::NotAuthorized => {
            Stats::incr(&broker.stats.auth_not_authorized);
            Some(ReasonCode::NOT_AUTHORIZED)
        }
    };
    if let Some(reason) = refused {
        warn!(username = ?username, ?verdict, "authentication failed; refusing");
        refuse(&mut stream, protocol, reason, &mut shutdown).await;
        return None;
    }
    let acl_generation = broker.auth.acl_generation();
    let acl = broker.auth.client_acl(username.as_deref(), &client_id);
    if let (Some(acl), Some(will)) = (&acl, &connect.will) {
        if !acl.can_publish(&will.topic) {
            Stats::incr(&broker.stats.auth_not_authorized);
            warn!(topic = %will.topic, "will topic not allowed by the ACL; refusing");
            refuse(
                &mut stream,
                protocol,
                ReasonCode::NOT_AUTHORIZED,
                &mut shutdown,
            )
            .await;
            return None;
        }
    }

    // While the store cannot write, a session that outlives its connection could never get
    // its CONNACK (which waits for the session's record): say so at once, before anything
    // of the existing session is touched, rather than close without a word.
    if broker.journal.is_failed() && session_expiry(&connect, broker).0 > 0 {
        warn!("store not writable; refusing a persistent session until it is");
        refuse(
            &mut stream,
            protocol,
            ReasonCode::SERVER_UNAVAILABLE,
            &mut shutdown,
        )
        .await;
        return None;
    }

    let (keep_alive, keep_alive_overridden) = keep_alive(&connect, broker);
    if keep_alive_overridden && !protocol.is_v5() {
        // 3.1.1 has no way to tell the client a different keep-alive: refuse it, as
        // Mosquitto does with max_keepalive. Before the claim: a refused client must not
        // take over (and lose) the session of its Client ID.
        info!(
            keep_alive = connect.keep_alive,
            "keep-alive above listener.max_keep_alive_secs"
        );
        refuse(
            &mut stream,
            protocol,
            ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            &mut shutdown,
        )
        .await;
        return None;
    }

    // The registry is the one map every client can grow (3.1.1 persistent sessions never
    // expire by default), so it has a bound. Checked before the claim: `len` locks every
    // shard, which must not happen under an entry guard; concurrent CONNECTs may overshoot
    // the bound by a few.
    if !broker.registry.contains(&client_id) && broker.registry.len() >= config.session.max_sessions
    {
        warn!(
            max = config.session.max_sessions,
            "session limit reached; refusing"
        );
        Stats::incr(&broker.stats.sessions_refused);
        refuse(
            &mut stream,
            protocol,
            ReasonCode::QUOTA_EXCEEDED,
            &mut shutdown,
        )
        .await;
        return None;
    }

    let (control_tx, control_rx) = control_channel();
    let Some((generation, old)) = Box::pin(claim(broker, &client_id, &control_tx)).await else {
        warn!("takeover of the existing session did not complete in time; refusing");
        refuse(
            &mut stream,
            protocol,
            ReasonCode::SERVER_UNAVAILABLE,
            &mut shutdown,
        )
        .await;
        return None;
    };

    let (expiry, expiry_capped) = session_expiry(&connect, broker);
    // From here on, store appends count for the CONNACK: a discarded old session's
    // SessionEnd must be durable before the client hears Session Present = 0.
    broker.journal.take_sync_mark();
    let (mut session, present) = match old {
        // A session taken over from a Clean Session 1 / Session Expiry 0 connection ended
        // with that connection: it is discarded like one that Clean Start discards
        // [MQTT-3.1.2-6] (v5 section 3.1.2.11.2).
        Some(s) if !connect.clean_start && s.expiry_interval > 0 => (s, true),
        Some(s) => {
            // Clean Start discards the old session [MQTT-3.1.2-4, MQTT-3.1.2-6].
            broker.end_session(s);
            (
                broker.new_session(client_id.clone(), protocol, expiry),
                false,
            )
        }
        None => (
            broker.new_session(client_id.clone(), protocol, expiry),
            false,
        ),
    };
    session.protocol = protocol;
    session.expiry_interval = expiry;
    // A reconnect before the will delay passed cancels the delayed will [MQTT-3.1.3-9].
    session.pending_will.clear();
    session.mailbox.set_online(true);
    // Durable or not is decided here, for this connection's lifetime: a session that outlives
    // its connection is written to the store (with the will, which a crash must publish).
    if expiry > 0 {
        // The image goes out before the mailbox (which publishers write through) gets the
        // journal: an Enqueued event that replay meets before the image of its incarnation
        // would be dropped.
        if session.journal.is_attached() {
            session.journal_image(ImageKind::Changed, connect.will.as_ref(), None);
        } else {
            let handle = SessionJournal::attach(&broker.journal);
            if handle.is_attached() {
                session.journal = handle.clone();
                session.journal_image(ImageKind::Created, connect.will.as_ref(), None);
                session.set_journal(handle, 1);
            }
        }
    } else if session.journal.is_attached() {
        // Resumed by a connection that ends it: it no longer needs the journal. Its queue
        // numbers belonged to that incarnation and must not be mistaken for a later one's.
        std::mem::take(&mut session.journal).ended();
        session.set_journal(SessionJournal::default(), 0);
        session.clear_seqs();
    }
    let mut held = Held::new(broker);
    // The CONNACK waits for the session record.
    held.mark(0);

    info!(
        clean_start = connect.clean_start,
        session_present = present,
        keep_alive,
        session_expiry = expiry,
        "client connected"
    );

    let mut conn = Conn::new(broker.clone(), &connect, client_id.clone(), generation);
    conn.username = username.map(Arc::from);
    session.mailbox.set_acl(acl.clone().map(|rules| MailboxAcl {
        generation: acl_generation,
        current: broker.auth.acl_generation_counter(),
        rules,
    }));
    conn.acl = acl;
    conn.acl_generation = acl_generation;
    conn.keep_alive = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    conn.connect_expiry = expiry;
    let mut props = ConnAckProperties::default();
    if protocol.is_v5() {
        props.assigned_client_identifier = assigned.then(|| client_id.to_string());
        props.session_expiry_interval = expiry_capped.then_some(expiry);
        props.server_keep_alive = keep_alive_overridden.then_some(keep_alive);
        props.receive_maximum = Some(config.session.max_inbound_inflight);
        props.maximum_packet_size = u32::try_from(config.listener.max_packet_size).ok();
        props.topic_alias_maximum = (config.listener.topic_alias_maximum > 0)
            .then_some(config.listener.topic_alias_maximum);
        // Retain, Wildcard, Subscription Identifier and Shared Subscription Available and
        // Maximum QoS are left out: absent means supported, which they all are, and every
        // byte counts against a small client Maximum Packet Size.
    }
    if !conn.send(&Packet::ConnAck(ConnAck {
        session_present: present,
        reason: ReasonCode::SUCCESS,
        properties: props,
    })) {
        // Not even the trimmed CONNACK fits the client's Maximum Packet Size [MQTT-3.1.2-24]:
        // the connection can never start, so close it rather than leave the client waiting.
        // The client never learnt it was connected: its will is not published.
        warn!(
            max = ?conn.peer_max_packet,
            "CONNACK exceeds the client's Maximum Packet Size; closing"
        );
        conn.will.clear();
        finish(
            conn,
            stream,
            session,
            Exit::PeerClosed,
            control_rx,
            held,
            shutdown,
        )
        .await;
        return None;
    }
    held.connack_queued(conn.out.len());
    // Everything in flight goes out again, as the window allows (`Conn::pump`).
    session.begin_resume();

    // Everything needed from the CONNECT has been taken (the will is in `conn`): its
    // heap copy (client id, username, password, will, properties) must not live as long as
    // the connection.
    drop(connect);
    Some(Ready {
        conn,
        control_tx,
        stream,
        inbuf,
        session,
        control_rx,
        held,
        shutdown,
    })
}

/// What `start` hands to the main loop.
struct Ready {
    conn: Conn,
    /// Kept for the connection's life, as before the split: the registry's copy may go
    /// (a takeover replaces it) while this task still reads its requests.
    control_tx: ControlTx,
    stream: Stream,
    inbuf: BytesMut,
    session: Box<Session>,
    control_rx: ControlRx,
    held: Held,
    shutdown: Shutdown,
}

/// The connected part of a connection's life, once `handshake` (`start`, boxed) is done.
async fn run(handshake: Pin<Box<impl Future<Output = Option<Ready>>>>) {
    // The handshake is boxed and gone once the client is connected: every local and await of
    // it would otherwise stay reserved in the task of every idle connection (2.5 KiB of
    // future before, with the main loop's state beside it).
    let Some(Ready {
        mut conn,
        control_tx,
        mut stream,
        mut inbuf,
        mut session,
        mut control_rx,
        mut held,
        mut shutdown,
    }) = handshake.await
    else {
        return;
    };
    let exit = main_loop(
        &mut conn,
        &mut stream,
        &mut inbuf,
        &mut session,
        &mut control_rx,
        &mut shutdown,
        &mut held,
    )
    .await;

    finish(conn, stream, session, exit, control_rx, held, shutdown).await;
    drop(control_tx);
}

/// Output held back until the store reports durable what it acknowledges: `marks` are
/// (offset in `Conn::out` where held bytes start, LSN they wait for), in order. Bytes before
/// the first unresolved mark may be written; everything after waits, so one connection's
/// packets keep their order.
struct Held {
    marks: VecDeque<(usize, u64)>,
    durable: Option<watch::Receiver<Durable>>,
    journal: Arc<dyn Journal>,
    /// Bytes of the CONNACK (the first packet of `Conn::out`) not yet written; set by
    /// `connack_queued`.
    connack_left: usize,
}

impl Held {
    fn new(broker: &Broker) -> Held {
        Held {
            marks: VecDeque::new(),
            durable: broker.journal.durable(),
            journal: broker.journal.clone(),
            connack_left: 0,
        }
    }

    /// The CONNACK is the first `len` bytes of the output.
    fn connack_queued(&mut self, len: usize) {
        self.connack_left = len;
    }

    /// How many bytes of the CONNACK, at the front of the output, are not written yet.
    fn connack_unsent(&self) -> usize {
        self.connack_left
    }

    /// Bytes from `offset` on wait for what this thread appended with `sync` since the last
    /// `take_sync_mark`.
    fn mark(&mut self, offset: usize) {
        let lsn = self.journal.take_sync_mark();
        if lsn == 0 || self.durable.is_none() {
            return;
        }
        if self.marks.back().is_some_and(|m| m.1 >= lsn) {
            return;
        }
        self.marks.push_back((offset, lsn));
    }

    /// How many bytes of `out` (of `len`) may be written now.
    fn writable(&mut self, len: usize) -> usize {
        if let Some(rx) = &self.durable {
            let durable = rx.borrow().lsn;
            while self.marks.front().is_some_and(|m| m.1 <= durable) {
                self.marks.pop_front();
            }
        }
        self.marks.front().map_or(len, |m| m.0.min(len))
    }

    /// `n` bytes were written from the front of `out`.
    fn wrote(&mut self, n: usize) {
        self.connack_left = self.connack_left.saturating_sub(n);
        for m in &mut self.marks {
            m.0 = m.0.saturating_sub(n);
        }
    }

    /// The LSN the first held byte waits for.
    fn waiting_for(&self) -> Option<u64> {
        self.marks.front().map(|m| m.1)
    }

    /// Resolves when the first held LSN is durable (true) or the store failed (false).
    async fn wait(&mut self) -> bool {
        match (self.waiting_for(), &mut self.durable) {
            (Some(lsn), Some(rx)) => journal::wait_durable(rx, lsn).await,
            _ => true,
        }
    }

    fn store_failed(&self) -> bool {
        self.journal.is_failed()
    }
}

/// Why no CONNECT could be read.
enum ConnectError {
    Closed,
    Io(std::io::Error),
    Decode(DecodeError),
}

async fn read_connect(
    stream: &mut Stream,
    inbuf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Box<Connect>, ConnectError> {
    loop {
        match codec::decode(inbuf, None, max_packet_size) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            // The codec only yields CONNECT before the version is known.
            Ok(Some(_)) => {
                return Err(ConnectError::Decode(DecodeError::Protocol(
                    "first packet is not CONNECT",
                )))
            }
            Ok(None) => {
                inbuf.reserve(READ_CHUNK);
                match stream.read_buf(inbuf).await {
                    Ok(0) => return Err(ConnectError::Closed),
                    Ok(_) => {}
                    Err(e) => return Err(ConnectError::Io(e)),
                }
            }
            Err(e) => return Err(ConnectError::Decode(e)),
        }
    }
}

/// The Client ID to use and whether the broker assigned it; `None` when it must be refused.
fn client_identifier(connect: &Connect, broker: &Broker) -> Option<(Arc<str>, bool)> {
    if connect.client_id.is_empty() {
        // 3.1.1: an empty id is only allowed with Clean Session = 1 [MQTT-3.1.3-7, 3.1.3-8];
        // v5 allows it either way and returns the assigned id.
        if !connect.clean_start && !connect.protocol.is_v5() {
            return None;
        }
        return Some((broker.assign_client_id(), true));
    }
    if connect.client_id.len() > broker.config.session.max_client_id_len {
        return None;
    }
    Some((connect.client_id.as_str().into(), false))
}

/// The session's lifetime after the connection closes, in seconds, and whether the server's
/// cap lowered what the client asked for (v5 then reports it in CONNACK).
fn session_expiry(connect: &Connect, broker: &Broker) -> (u32, bool) {
    match connect.protocol {
        ProtocolVersion::V5 => {
            let asked = connect.properties.session_expiry_interval.unwrap_or(0);
            let cap = broker.config.session.max_session_expiry_secs;
            (asked.min(cap), asked > cap)
        }
        // 3.1.1 Clean Session 1 is Clean Start 1 with expiry 0; Clean Session 0 is Clean
        // Start 0 with expiry "never", or the configured lifetime bound.
        _ if connect.clean_start => (0, false),
        _ => match broker.config.session.persistent_lifetime() {
            None => (EXPIRY_NEVER, false),
            Some(d) => (
                u32::try_from(d.as_secs()).unwrap_or(EXPIRY_NEVER - 1),
                false,
            ),
        },
    }
}

/// The keep-alive to enforce, and whether it overrides the client's (a configured maximum
/// replaces a larger or zero value; v5 clients are told through Server Keep Alive).
fn keep_alive(connect: &Connect, broker: &Broker) -> (u16, bool) {
    let max = broker.config.listener.max_keep_alive_secs;
    if max > 0 && (connect.keep_alive == 0 || connect.keep_alive > max) {
        (max, true)
    } else {
        (connect.keep_alive, false)
    }
}

/// Claim the Client ID, taking the session over from a live connection if needed.
/// `None` when the takeover did not complete within the configured time.
async fn claim(
    broker: &Broker,
    client_id: &Arc<str>,
    control: &ControlTx,
) -> Option<(u64, Option<Box<Session>>)> {
    let deadline =
        Instant::now() + Duration::from_secs(broker.config.session.takeover_timeout_secs);
    loop {
        match broker.registry.claim(client_id, control) {
            Claim::Fresh { generation } => return Some((generation, None)),
            Claim::Resumed {
                generation,
                session,
            } => return Some((generation, Some(session))),
            Claim::Wait {
                generation,
                mut reply,
            } => {
                let session = match tokio::time::timeout_at(deadline, &mut reply).await {
                    Ok(Ok(session)) => Some(session),
                    Ok(Err(_)) => None,
                    Err(_) => {
                        // The owner may have sent it just as time ran out: close the channel
                        // and look once more, so a session in flight is never dropped.
                        reply.close();
                        reply.try_recv().ok()
                    }
                };
                let Some(session) = session else {
                    broker.registry.abandon(client_id, generation);
                    return None;
                };
                if broker.registry.install(client_id, generation, control) {
                    return Some((generation, Some(session)));
                }
                if let Parked::Ended(s) | Parked::Stale(s) =
                    broker.registry.park_orphan(session, Instant::now())
                {
                    broker.end_session(s);
                }
                return None;
            }
            Claim::Busy => {
                if Instant::now() >= deadline {
                    return None;
                }
                tokio::time::sleep(BUSY_RETRY).await;
            }
        }
    }
}

fn connack(session_present: bool, reason: ReasonCode) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        reason,
        properties: ConnAckProperties::default(),
    })
}

/// Answer CONNECT with a failure CONNACK and close. Boxed, like `finish`: awaited inline, its
/// state would be part of every connection task's future for the connection's whole life.
fn refuse<'a>(
    stream: &'a mut Stream,
    protocol: ProtocolVersion,
    reason: ReasonCode,
    shutdown: &'a mut Shutdown,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    Box::pin(refuse_now(stream, protocol, reason, shutdown))
}

async fn refuse_now(
    stream: &mut Stream,
    protocol: ProtocolVersion,
    reason: ReasonCode,
    shutdown: &mut Shutdown,
) {
    let mut out = BytesMut::new();
    if codec::encode(&connack(false, reason), protocol, None, &mut out).is_ok() {
        let _ = timeout(CLOSE_FLUSH_TIMEOUT, stream.write_all(&out)).await;
    }
    linger_close(stream, shutdown, REFUSE_LINGER).await;
}

/// Write everything in `out` (and flush it out of a TLS or WebSocket buffer).
async fn write_all(stream: &mut Stream, out: &mut OutBuf) -> std::io::Result<()> {
    while !out.is_empty() {
        let n = stream.write(out.first_chunk()).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        out.advance(n);
    }
    stream.flush().await
}

/// End the output (FIN; TLS close_notify; a WebSocket Close frame), then read and discard
/// input until the client closes too, for at most `LINGER`, so what was written reaches the
/// client rather than being cut off by a reset. Broker shutdown ends the wait at once: the
/// drain must not wait on clients.
async fn linger_close(stream: &mut Stream, shutdown: &mut Shutdown, bound: Duration) {
    // One deadline for ending the output and for the linger after it.
    let deadline = Instant::now() + bound;
    let ended = tokio::select! {
        biased;
        _ = shutdown.recv() => return,
        r = tokio::time::timeout_at(deadline, stream.shutdown()) => matches!(r, Ok(Ok(()))),
    };
    if !ended {
        // The output cannot even be ended: nothing more will reach this client anyway.
        return;
    }
    // Allocated only now: idle connections must not carry it.
    let mut discard = vec![0u8; READ_CHUNK];
    loop {
        // `timeout_at` alone would never fire for a client that always has input ready: it
        // polls the read first.
        if Instant::now() >= deadline {
            debug!("client still sending {bound:?} after the close; cutting it off");
            return;
        }
        tokio::select! {
            biased;
            _ = shutdown.recv() => return,
            r = tokio::time::timeout_at(deadline, stream.read(&mut discard)) => match r {
                // More input, or the deadline (reported above).
                Ok(Ok(1..)) | Err(_) => {}
                // EOF (the client closed too) or a socket error.
                Ok(_) => return,
            },
        }
    }
}

async fn main_loop(
    conn: &mut Conn,
    stream: &mut Stream,
    inbuf: &mut BytesMut,
    session: &mut Session,
    control_rx: &mut ControlRx,
    shutdown: &mut Shutdown,
    held: &mut Held,
) -> Exit {
    let max_packet = conn.broker.config.listener.max_packet_size;
    let max_write = conn.broker.config.listener.max_write_buffer;
    let keep_alive = conn.keep_alive;
    // A zero keep-alive disables the timer; the sleep is then never polled.
    let sleep = tokio::time::sleep(keep_alive.unwrap_or(Duration::from_secs(3600)));
    tokio::pin!(sleep);
    // TLS and WebSocket keep written bytes in a buffer of their own until flushed.
    let buffers = stream.buffers_writes();
    let mut unflushed = false;
    let journal = conn.broker.journal.clone();
    let slow_after = conn.broker.config.session.slow_consumer_after();
    // The queues holding this publisher back in the current episode, with their progress
    // when it began.
    let mut episode: Vec<(Arc<Mailbox>, u32)> = Vec::new();

    loop {
        // The records of this pass (one per PUBLISH sent, one per acknowledgement) reach the
        // journal together when it ends, before the task waits (see `journal::batch`).
        let batch = journal::batch(&*journal);
        // Handle every complete packet buffered, but stop while the write buffer is over its
        // limit: what is left is handled once the client reads.
        let mut got_packet = false;
        while conn.out.len() < max_write && conn.blocked.is_empty() {
            match codec::decode(inbuf, Some(conn.protocol), max_packet) {
                Ok(Some(p)) => {
                    got_packet = true;
                    if let Packet::Publish(publish) = &p {
                        if publish.qos != QoS::AtMostOnce && held.store_failed() {
                            // Never acknowledge what cannot be stored. v5 refuses the one
                            // message; 3.1.1 has no negative acknowledgement.
                            if !conn.protocol.is_v5() {
                                return Exit::StoreFailed;
                            }
                            let ack = Ack {
                                reason: ReasonCode::QUOTA_EXCEEDED,
                                ..Ack::new(publish.packet_id)
                            };
                            conn.send(&if publish.qos == QoS::AtLeastOnce {
                                Packet::PubAck(ack)
                            } else {
                                Packet::PubRec(ack)
                            });
                            continue;
                        }
                    }
                    let changes_subscriptions =
                        matches!(p, Packet::Subscribe(_) | Packet::Unsubscribe(_));
                    let offset = conn.out.len();
                    journal.take_sync_mark();
                    if let Err(exit) = conn.on_packet(session, p, Instant::now()) {
                        return exit;
                    }
                    if changes_subscriptions {
                        session.journal_image(ImageKind::Changed, conn.will.as_ref(), None);
                    }
                    held.mark(offset);
                }
                Ok(None) => break,
                Err(e) => return Exit::Decode(e),
            }
        }
        if got_packet {
            if let Some(ka) = keep_alive {
                sleep.as_mut().reset(Instant::now() + ka);
            }
        }
        let offset = conn.out.len();
        journal.take_sync_mark();
        conn.pump(session, Instant::now());
        held.mark(offset);
        drop(batch);

        let room = conn.out.len() < max_write;
        // Back-pressure: while a subscriber queue this client published into is congested,
        // read nothing more from it (up to BACKPRESSURE_MAX_WAIT per wait).
        let blocked = std::mem::take(&mut conn.blocked);
        let blocked_until = if blocked.is_empty() {
            conn.blocked_until = None;
            episode.clear();
            Instant::now()
        } else {
            if conn.blocked_until.is_none() {
                // A new episode: note each queue's progress, to tell slow from stuck at its end.
                episode.clear();
                episode.extend(blocked.iter().map(|m| (m.clone(), m.progress())));
            }
            *conn
                .blocked_until
                .get_or_insert_with(|| Instant::now() + slow_after)
        };
        // An idle connection holds no read buffer: it waits for readiness, and the buffer is
        // allocated only to read (thousands of idle clients would otherwise keep 8 KiB each).
        if inbuf.is_empty() && inbuf.capacity() > 0 {
            *inbuf = BytesMut::new();
        }
        // Nor a write buffer: everything written, the next packet allocates a fresh one (an
        // allocation per burst, next to a system call per write).
        conn.out.release_if_empty();
        // The back-pressure and durability waits only exist while they are needed: boxed, so
        // the idle task does not carry their timers and channel waits.
        let mut drain = (!blocked.is_empty()).then(|| Box::pin(drained(&blocked, blocked_until)));
        // Output behind an acknowledgement that is not durable yet stays in the buffer.
        let writable = held.writable(conn.out.len());
        let mut durable = held.waiting_for().is_some().then(|| Box::pin(held.wait()));
        let read = room && blocked.is_empty();
        let keep_alive_on = keep_alive.is_some() && blocked.is_empty();
        // One poll over everything the task waits for, in this order, rather than `select!`:
        // select! keeps a future per branch in the task's state (nearly 900 bytes in every
        // idle connection); these are polls on the sources themselves.
        let wake = std::future::poll_fn(|cx| {
            if shutdown.poll_signalled(cx).is_ready() {
                return Poll::Ready(Wake::Shutdown);
            }
            // `None` (every sender gone) never happens while this task holds its own sender.
            if let Poll::Ready(Some(c)) = control_rx.poll_recv(cx) {
                return Poll::Ready(Wake::Control(c));
            }
            if writable > 0 || unflushed || read {
                let input = read.then_some((&mut *inbuf, READ_CHUNK.min(max_packet)));
                if let Poll::Ready(r) = stream.poll_io(cx, &conn.out, writable, unflushed, input) {
                    return Poll::Ready(Wake::Io(r));
                }
            }
            if let Some(Poll::Ready(ok)) = durable.as_mut().map(|d| d.as_mut().poll(cx)) {
                return Poll::Ready(Wake::Durable(ok));
            }
            if room && session.mailbox.poll_notified(cx).is_ready() {
                return Poll::Ready(Wake::Queued);
            }
            if let Some(Poll::Ready(())) = drain.as_mut().map(|d| d.as_mut().poll(cx)) {
                return Poll::Ready(Wake::Drained);
            }
            if keep_alive_on && sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::KeepAlive);
            }
            Poll::Pending
        })
        .await;
        drop(durable);
        match wake {
            Wake::Shutdown => return Exit::Shutdown,
            // An asker that already gave up (and restored our slot) is ignored: the client
            // keeps its connection.
            Wake::Control(Control::TakeOver(reply)) if reply.is_closed() => {}
            Wake::Control(Control::TakeOver(reply)) => return Exit::TakenOver(reply),
            Wake::Control(Control::Snapshot(reply)) => {
                let _ = reply.send(SessionInfo::of(session, true, conn.will.is_some()));
            }
            Wake::Control(Control::Kick) => return Exit::Kicked,
            Wake::Io(r) => match r {
                Ok(Io::Wrote(0) | Io::Read(0)) => return Exit::PeerClosed,
                Ok(Io::Wrote(n)) => {
                    conn.out.advance(n);
                    held.wrote(n);
                    unflushed = buffers;
                    Stats::add(&conn.broker.stats.bytes_sent, n);
                }
                Ok(Io::Read(n)) => Stats::add(&conn.broker.stats.bytes_received, n),
                Ok(Io::Flushed) => unflushed = false,
                Err(e) => return Exit::Io(e),
            },
            Wake::Durable(ok) => {
                if !ok {
                    return Exit::StoreFailed;
                }
            }
            Wake::Queued => {}
            Wake::Drained => {
                drop(drain);
                conn.blocked_until = None;
                if Instant::now() >= blocked_until {
                    Stats::incr(&conn.broker.stats.backpressure_timeouts);
                    mark_stalled(&conn.broker, &episode);
                }
                episode.clear();
                continue;
            }
            Wake::KeepAlive => return Exit::KeepAliveTimeout,
        }
        drop(drain);
        conn.blocked = blocked;
        conn.blocked.retain(|m| m.congested());
    }
}

/// What ended one wait of the main loop.
enum Wake {
    Shutdown,
    Control(Control),
    Io(std::io::Result<Io>),
    /// The first held acknowledgement is durable (true), or the store failed (false).
    Durable(bool),
    /// Something was pushed to the session's queue.
    Queued,
    /// The back-pressure episode ended (drained or at its bound).
    Drained,
    KeepAlive,
}

/// A back-pressure episode ran to its bound (`session.slow_consumer_after_ms`): every queue
/// of it whose connection took nothing meanwhile is marked slow, so it holds no publisher back
/// again until it drains (a stuck subscriber costs each publisher one bound, not one per
/// message).
fn mark_stalled(broker: &Broker, episode: &[(Arc<Mailbox>, u32)]) {
    for (m, since) in episode {
        if m.mark_slow_if_stalled(*since) {
            Stats::incr(&broker.stats.slow_consumers_marked);
            debug!(
                queued = m.len(),
                "subscriber marked slow: no progress while holding a publisher back"
            );
        }
    }
}

/// Resolves when every queue in `blocked` has drained, or at `until` (the end of this
/// back-pressure episode, `session.slow_consumer_after_ms` after it began).
async fn drained(blocked: &[Arc<Mailbox>], until: Instant) {
    let _ = tokio::time::timeout_at(until, async {
        for m in blocked {
            m.drained().await;
        }
    })
    .await;
}

/// The end of a connection: final DISCONNECT (v5), the will, and the session parked, ended
/// or handed to the connection taking it over. Boxed, allocated only when the connection
/// ends: inline, this state (about 1.9 KiB) would size every idle connection's task.
fn finish(
    conn: Conn,
    stream: Stream,
    session: Box<Session>,
    exit: Exit,
    control_rx: ControlRx,
    held: Held,
    shutdown: Shutdown,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(finish_now(
        conn, stream, session, exit, control_rx, held, shutdown,
    ))
}

async fn finish_now(
    mut conn: Conn,
    mut stream: Stream,
    mut session: Box<Session>,
    exit: Exit,
    mut control_rx: ControlRx,
    mut held: Held,
    mut shutdown: Shutdown,
) {
    let broker = conn.broker.clone();
    let now = Instant::now();
    match &exit {
        Exit::ClientDisconnect { .. } | Exit::TakenOver(_) | Exit::Shutdown => {
            debug!(reason = %exit, "connection closed")
        }
        Exit::Kicked => info!(reason = %exit, "connection closed"),
        // Bad input below MQTT: a WebSocket text or oversize frame, a corrupt TLS record.
        Exit::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            Stats::incr(&broker.stats.protocol_errors);
            warn!(reason = %exit, "closing connection")
        }
        Exit::PeerClosed | Exit::Io(_) | Exit::KeepAliveTimeout => {
            info!(reason = %exit, "connection lost")
        }
        Exit::Decode(_) | Exit::Violation(..) => {
            Stats::incr(&broker.stats.protocol_errors);
            warn!(reason = %exit, "closing connection")
        }
        Exit::StoreFailed => warn!(reason = %exit, "closing connection"),
    }
    // Where the final DISCONNECT starts: it acknowledges nothing, so it goes out even when
    // held acknowledgements before it never become durable (they are dropped, below).
    let final_at = conn.out.len();
    if conn.protocol.is_v5() {
        if let Some(reason) = exit.server_reason() {
            // The reason string explains protocol errors; it is dropped if the client's
            // Maximum Packet Size has no room for it.
            let reason_string = match &exit {
                Exit::Violation(_, why) => Some(why.to_string()),
                Exit::Decode(e) => Some(e.to_string()),
                _ => None,
            };
            let with_string = Packet::Disconnect(Disconnect {
                reason,
                reason_string,
                ..Disconnect::default()
            });
            if !conn.send(&with_string) {
                conn.send(&Packet::Disconnect(Disconnect {
                    reason,
                    ..Disconnect::default()
                }));
            }
        }
    }
    if let Exit::ClientDisconnect {
        session_expiry: Some(expiry),
        ..
    } = exit
    {
        // Validated in `protocol` (not from 0 to non-zero); capped like the CONNECT value.
        session.expiry_interval = expiry.min(broker.config.session.max_session_expiry_secs);
    }
    if exit.publishes_will() {
        if let Some(will) = conn.will.take() {
            let ends_now = session.expiry_interval == 0;
            if will.delay_interval == 0 || ends_now {
                broker.publish_will(&conn.client_id, will, now);
            } else {
                // Published when the delay or the session ends, unless a connection resumes
                // the session first (a takeover counts) [MQTT-3.1.3-9].
                session.pending_will.set(will);
            }
        }
    }

    if !matches!(exit, Exit::TakenOver(_)) && session.expiry_interval > 0 {
        // The disconnect time starts the expiry clock, also across a restart; the will
        // still waiting for its delay goes with it.
        session.journal_image(
            ImageKind::Parked,
            session.pending_will.as_ref(),
            Some(journal::to_wall(now)),
        );
    }

    // Hand the session to the connection taking it over, or park it. A taker that gave up
    // waiting has restored our slot (`Registry::abandon`), so we then park it ourselves.
    let mut reply = match exit {
        Exit::TakenOver(reply) => Some(reply),
        _ => None,
    };
    loop {
        if let Some(r) = reply.take() {
            match r.send(session) {
                Ok(()) => break,
                Err(s) => session = s,
            }
        }
        match broker.registry.park(conn.generation, session, now) {
            Parked::Offline => break,
            Parked::Ended(s) | Parked::Stale(s) => {
                broker.end_session(s);
                break;
            }
            Parked::HandOver(s) => {
                // The request was queued before the slot changed, so it is there to take
                // (behind any admin requests, which are dropped unanswered).
                session = s;
                // Bounded: the request may already have been taken by the main loop and
                // ignored there (its asker had given up), and the asker may not yet have
                // restored our slot. Then the slot is asked again after a short wait, which
                // finds it restored (or handed to yet another taker).
                let mut ask_again = false;
                loop {
                    match timeout(HANDOVER_RECHECK, control_rx.recv()).await {
                        Ok(Some(Control::TakeOver(r))) => {
                            reply = Some(r);
                            break;
                        }
                        Ok(Some(Control::Snapshot(_) | Control::Kick)) => continue,
                        Ok(None) => break,
                        Err(_) => {
                            ask_again = true;
                            break;
                        }
                    }
                }
                if ask_again {
                    continue;
                }
                if reply.is_none() {
                    if let Parked::Ended(s) | Parked::Stale(s) =
                        broker.registry.park_orphan(session, now)
                    {
                        broker.end_session(s);
                    }
                    break;
                }
            }
        }
    }

    if held.waiting_for().is_some() {
        // Acknowledgements still held are sent only once durable; not worth a long wait.
        let _ = timeout(CLOSE_FLUSH_TIMEOUT, held.wait()).await;
    }
    // Held bytes that are still not durable are never sent (the store failed, or was too
    // slow): everything before the first of them goes out, then the final DISCONNECT. But a
    // DISCONNECT may not precede the CONNACK [MQTT-3.2.0-1]: a client whose CONNACK is held
    // (its session record never became durable) is closed without either.
    let last = conn.out.split_off(final_at);
    let writable = held.writable(conn.out.len());
    conn.out.truncate(writable);
    if held.connack_unsent() <= writable {
        conn.out.append(last);
    }
    if !conn.out.is_empty() {
        let _ = timeout(CLOSE_FLUSH_TIMEOUT, write_all(&mut stream, &mut conn.out)).await;
    }
    // The session is parked or handed over already: lingering delays nobody but this task,
    // which still holds its slot of the listener's connection limit.
    linger_close(&mut stream, &mut shutdown, LINGER).await;
}

/// The sizes the README's memory table states (section "Memory per session and per
/// connection"). A change that grows one fails here and has to update the README on purpose.
#[cfg(test)]
mod sizes {
    use std::mem::{size_of, size_of_val};

    use super::*;
    use crate::routing::router::SubEntry;
    use crate::session::expiry::Timer;
    use crate::session::registry::Slot;
    use crate::wire::packet::ProtocolVersion;

    /// Bytes the README states, with the serve future as this (test) build lays it out; the
    /// release layout is smaller (README).
    const SESSION: usize = 96;
    const MAILBOX: usize = 104;
    const SLOT: usize = 32;
    const TIMER: usize = 32;
    const SUB_ENTRY: usize = 24;
    const CONN: usize = 248;
    const SERVE_FUTURE_DEBUG: usize = 1064;
    const SERVE_FUTURE_RELEASE: usize = 1056;

    #[tokio::test]
    async fn parked_session_mailbox_and_connection_stay_as_small_as_the_readme_says() {
        assert!(
            size_of::<Session>() <= SESSION,
            "Session {}",
            size_of::<Session>()
        );
        assert!(
            size_of::<Mailbox>() <= MAILBOX,
            "Mailbox {}",
            size_of::<Mailbox>()
        );
        assert!(size_of::<Slot>() <= SLOT, "Slot {}", size_of::<Slot>());
        assert!(size_of::<Timer>() <= TIMER, "Timer {}", size_of::<Timer>());
        assert!(
            size_of::<SubEntry>() <= SUB_ENTRY,
            "SubEntry {}",
            size_of::<SubEntry>()
        );
        assert!(size_of::<Conn>() <= CONN, "Conn {}", size_of::<Conn>());

        // A parked session holds no window, no queue and no will on the heap.
        let broker = Broker::new(Arc::new(crate::config::Config::default()));
        let mut s = broker.new_session("c".into(), ProtocolVersion::V5, 60);
        s.shrink();
        assert_eq!(s.inflight_len() + s.inbound_qos2_len() + s.mailbox.len(), 0);

        // The task of one connection: what `serve` is, as the acceptor spawns it.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let _client = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (tcp, peer) = l.accept().await.expect("accept");
        let spec = broker.config.listener_specs().remove(0);
        let endpoint = Arc::new(Endpoint::new(spec).expect("plain endpoint"));
        let (_stop, shutdown) = Shutdown::new();
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .expect("a free permit");
        let serve = serve(tcp, peer, broker.clone(), shutdown, endpoint, permit);
        let limit = if cfg!(debug_assertions) {
            SERVE_FUTURE_DEBUG
        } else {
            SERVE_FUTURE_RELEASE
        };
        assert!(
            size_of_val(&serve) <= limit,
            "serve future {}",
            size_of_val(&serve)
        );
    }
}
