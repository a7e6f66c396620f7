//! Load generator for MQTT brokers: tether, Mosquitto, anything on a TCP port.
//!
//! It speaks MQTT 3.1.1 and 5.0 itself over raw tokio sockets (a few dozen lines of encoding
//! below, independent of tether's codec), so what it measures is the broker, not a client
//! library. Every published payload carries a stream id, a sequence number and a send
//! timestamp; subscribers count loss, duplicates and reordering exactly and measure latency.
//!
//!     cargo bench --bench load -- SCENARIO [options]
//!     cargo bench --bench load -- --help
//!
//! Scenarios: `fan-in` (P publishers -> 1 wildcard subscriber), `pairs` (P publisher /
//! subscriber pairs), `fan-out` (1 publisher -> S subscribers), `latency` (1 -> 1 at a fixed
//! rate), `connections` (C idle connections, each with a persistent session and one
//! subscription; broker RSS per connection), `sessions` (C persistent sessions go offline, get
//! M QoS 1 messages each, reconnect and drain). Each prints a human line and a `RESULT k=v ...`
//! line that `benches/compare.sh` parses. Everything is bounded in time: the process exits by
//! itself at the latest `--duration` + setup and drain limits.
//!
//! Without `--bench` on the command line (`cargo test`, `cargo nextest run --all-targets`) the
//! binary runs a smoke test instead: a few tiny scenarios against an in-process tether.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use clap::{Parser, ValueEnum};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

// ---------------------------------------------------------------------------------------------
// Command line

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    FanIn,
    Pairs,
    FanOut,
    Latency,
    Connections,
    Sessions,
}

/// Which filter each client of the `connections` scenario subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FilterMode {
    /// A topic of its own (`load/RUN/c/I`): as many filters in the broker as clients; the
    /// final delivery publishes one message to each client's topic.
    Own,
    /// One topic for all (`load/RUN/all`): the final delivery is one message to everyone.
    Shared,
}

#[derive(Debug, Clone, Parser)]
#[command(name = "load", about = "MQTT load generator (raw sockets)")]
struct Opts {
    /// What to run.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    addr: SocketAddr,
    /// MQTT protocol version: 3 (3.1.1) or 5.
    #[arg(long, default_value_t = 3)]
    proto: u8,
    /// QoS of publications and subscriptions.
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// Payload bytes (at least 20: stream id, sequence number, timestamp).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Seconds of publishing (ignored when --count is given).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Messages per publisher instead of a duration (sessions: messages per session).
    #[arg(long)]
    count: Option<u64>,
    /// Publishers (fan-in, pairs).
    #[arg(long, default_value_t = 8)]
    publishers: usize,
    /// Subscribers (fan-out).
    #[arg(long, default_value_t = 50)]
    subscribers: usize,
    /// Stuck subscribers beside the normal ones (fan-in, fan-out, pairs, latency): each
    /// subscribes to the first subscriber's filter and then never reads its socket again (a
    /// frozen device that kept its TCP connection). Not counted in the results.
    #[arg(long, default_value_t = 0)]
    stuck: usize,
    /// Connections / sessions (connections, sessions).
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Total publish rate in msg/s over all publishers; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// QoS 1/2 messages a publisher keeps unacknowledged.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Connection attempts in progress at once (connections, sessions).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Keep Alive in CONNECT, seconds (0 = none; some brokers, e.g. rumqttd, refuse 0). The
    /// clients never send PINGREQ, so a broker may close idle ones after 1.5 times this.
    #[arg(long, default_value_t = 0)]
    keep_alive: u16,
    /// connections: loopback source addresses to spread the clients over (127.0.0.2,
    /// 127.0.0.3, ...; each address has its own ephemeral port range towards the broker).
    /// Default: one per 20,000 clients; 1 = the kernel's choice (127.0.0.1 towards a
    /// loopback broker).
    #[arg(long)]
    source_addrs: Option<usize>,
    /// connections: the clients' subscriptions (see the scenario's description).
    #[arg(long, value_enum, default_value_t = FilterMode::Own)]
    filter: FilterMode,
    /// connections: seconds of idling, all connected, over which the broker's CPU is read
    /// (0 = none).
    #[arg(long, default_value_t = 5.0)]
    idle: f64,
    /// Broker pid: its CPU time (utime+stime) and RSS are read from /proc.
    #[arg(long)]
    pid: Option<u32>,
    /// Seconds subscribers may take to drain after publishing stopped.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Label printed in the RESULT line (e.g. the broker's name).
    #[arg(long, default_value = "broker")]
    label: String,
    /// Worker threads of the generator's runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Connect over TLS, trusting the CA certificate(s) in this PEM file; the broker's
    /// certificate must name `localhost`.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
}

impl Opts {
    fn v5(&self) -> bool {
        self.proto == 5
    }
    fn check(&self) -> Result<(), String> {
        if self.proto != 3 && self.proto != 5 {
            return Err("--proto must be 3 or 5".into());
        }
        if self.qos > 2 {
            return Err("--qos must be 0, 1 or 2".into());
        }
        if self.payload < HEADER {
            return Err(format!("--payload must be at least {HEADER}"));
        }
        if self.window == 0 || self.window > 60_000 {
            return Err("--window must be 1..=60000".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal MQTT encoding (client side)

/// Payload header: stream id (u32), sequence number (u64), send time in ns since `base()` (u64).
const HEADER: usize = 20;
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn encode_connect(
    out: &mut BytesMut,
    v5: bool,
    client_id: &str,
    clean: bool,
    expiry: u32,
    keep_alive: u16,
) {
    let mut body = BytesMut::new();
    put_str(&mut body, "MQTT");
    body.put_u8(if v5 { 5 } else { 4 });
    body.put_u8(if clean { 0x02 } else { 0 });
    body.put_u16(keep_alive);
    if v5 {
        if expiry > 0 {
            body.put_u8(5);
            body.put_u8(0x11); // Session Expiry Interval
            body.put_u32(expiry);
        } else {
            body.put_u8(0);
        }
    }
    put_str(&mut body, client_id);
    out.put_u8(0x10);
    put_varint(out, body.len());
    out.put_slice(&body);
}

fn encode_subscribe(out: &mut BytesMut, v5: bool, packet_id: u16, filter: &str, qos: u8) {
    let len = 2 + usize::from(v5) + 2 + filter.len() + 1;
    out.put_u8(0x82);
    put_varint(out, len);
    out.put_u16(packet_id);
    if v5 {
        out.put_u8(0);
    }
    put_str(out, filter);
    out.put_u8(qos);
}

#[allow(clippy::too_many_arguments)] // one flat call on the hot path
fn encode_publish(
    out: &mut BytesMut,
    v5: bool,
    topic: &str,
    qos: u8,
    packet_id: u16,
    stream: u32,
    seq: u64,
    payload: usize,
) {
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + usize::from(v5) + payload;
    out.put_u8(0x30 | (qos << 1));
    put_varint(out, len);
    put_str(out, topic);
    if qos > 0 {
        out.put_u16(packet_id);
    }
    if v5 {
        out.put_u8(0);
    }
    out.put_u32(stream);
    out.put_u64(seq);
    out.put_u64(now_ns());
    out.put_bytes(0xA5, payload - HEADER);
}

fn encode_ack(out: &mut BytesMut, kind: u8, packet_id: u16) {
    // PUBACK 4, PUBREC 5, PUBREL 6 (flags 0b0010), PUBCOMP 7; success without properties.
    let flags = if kind == 6 { 0x02 } else { 0 };
    out.put_u8((kind << 4) | flags);
    out.put_u8(2);
    out.put_u16(packet_id);
}

/// One complete frame at the front of `buf`: (first byte, header length, remaining length).
fn frame(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let mut len = 0usize;
    let mut mult = 1usize;
    for i in 1..5 {
        let b = *buf.get(i)?;
        len += usize::from(b & 0x7f) * mult;
        mult *= 128;
        if b & 0x80 == 0 {
            return (buf.len() >= i + 1 + len).then_some((buf[0], i + 1, len));
        }
    }
    None
}

/// A received PUBLISH, payload header decoded.
struct Rx {
    qos: u8,
    packet_id: u16,
    stream: u32,
    seq: u64,
    sent_ns: u64,
}

fn parse_publish(first: u8, body: &[u8], v5: bool) -> Result<Rx, String> {
    let qos = (first >> 1) & 3;
    let mut b = body;
    if b.len() < 2 {
        return Err("short PUBLISH".into());
    }
    let tlen = usize::from(b.get_u16());
    if b.len() < tlen {
        return Err("short PUBLISH topic".into());
    }
    b.advance(tlen);
    let packet_id = if qos > 0 { b.get_u16() } else { 0 };
    if v5 {
        let (plen, n) = read_varint(b).ok_or("bad property length")?;
        b.advance(n + plen);
    }
    if b.len() < HEADER {
        return Err(format!("payload of {} bytes is not ours", b.len()));
    }
    Ok(Rx {
        qos,
        packet_id,
        stream: b.get_u32(),
        seq: b.get_u64(),
        sent_ns: b.get_u64(),
    })
}

fn read_varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut v = 0usize;
    let mut mult = 1usize;
    for (i, &byte) in b.iter().take(4).enumerate() {
        v += usize::from(byte & 0x7f) * mult;
        mult *= 128;
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn ack_id(body: &[u8]) -> u16 {
    u16::from_be_bytes([body[0], body[1]])
}

/// Read until one whole frame is buffered; returns (first byte, body).
async fn read_frame(s: &mut Link, buf: &mut BytesMut) -> Result<(u8, BytesMut), String> {
    loop {
        if let Some((first, hl, len)) = frame(buf) {
            buf.advance(hl);
            return Ok((first, buf.split_to(len)));
        }
        buf.reserve(4096);
        match s.read_buf(buf).await {
            Ok(0) => return Err("connection closed by broker".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Keep Alive every CONNECT carries (`--keep-alive`).
static KEEP_ALIVE: OnceLock<u16> = OnceLock::new();

/// Connect and wait for CONNACK; returns the stream, leftover bytes and Session Present.
async fn connect(
    addr: SocketAddr,
    v5: bool,
    client_id: &str,
    clean: bool,
    expiry: u32,
) -> Result<(Link, BytesMut, bool), String> {
    connect_from(addr, None, v5, client_id, clean, expiry).await
}

/// [`connect`] from the local address `src` (port chosen by the kernel at connect time).
async fn connect_from(
    addr: SocketAddr,
    src: Option<IpAddr>,
    v5: bool,
    client_id: &str,
    clean: bool,
    expiry: u32,
) -> Result<(Link, BytesMut, bool), String> {
    let tcp = match src {
        None => TcpStream::connect(addr).await,
        Some(ip) => tcp_from(ip, addr).await,
    }
    .map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut s = match TLS.get().and_then(Option::as_ref) {
        None => Link::Tcp(tcp),
        Some(tls) => {
            let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
            Link::Tls(Box::new(
                tls.connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {addr}: {e}"))?,
            ))
        }
    };
    let mut out = BytesMut::new();
    let keep_alive = KEEP_ALIVE.get().copied().unwrap_or(0);
    encode_connect(&mut out, v5, client_id, clean, expiry, keep_alive);
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(4096);
    let (first, body) = read_frame(&mut s, &mut buf).await?;
    if first >> 4 != 2 || body.len() < 2 {
        return Err(format!("expected CONNACK, got type {}", first >> 4));
    }
    if body[1] != 0 {
        return Err(format!("CONNACK refused: 0x{:02x}", body[1]));
    }
    Ok((s, buf, body[0] & 1 == 1))
}

/// Subscribe and wait for a successful SUBACK (PUBLISHes arriving first are an error: the
/// scenarios subscribe before anything is published).
async fn subscribe(
    s: &mut Link,
    buf: &mut BytesMut,
    v5: bool,
    filter: &str,
    qos: u8,
) -> Result<(), String> {
    let mut out = BytesMut::new();
    encode_subscribe(&mut out, v5, 1, filter, qos);
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let (first, body) = read_frame(s, buf).await?;
    if first >> 4 != 9 {
        return Err(format!("expected SUBACK, got type {}", first >> 4));
    }
    let code = *body.last().ok_or("empty SUBACK")?;
    if code >= 0x80 {
        return Err(format!("SUBACK refused: 0x{code:02x}"));
    }
    Ok(())
}

/// A TCP connection to `addr` from `src`. The socket is bound with IP_BIND_ADDRESS_NO_PORT,
/// so the port is picked at connect time, per (source, destination) pair: each source
/// address gets the whole ephemeral range towards the broker, and bind does not search it.
async fn tcp_from(src: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = if src.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sys::bind_address_no_port(&sock);
    sock.bind(SocketAddr::new(src, 0))?;
    sock.connect(addr).await
}

async fn disconnect(mut s: Link) {
    let _ = s.write_all(&[0xE0, 0]).await;
    let _ = s.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Transport: plain TCP, or TLS when `--tls-ca` is given (same certificate for every broker).

/// The TLS client every connection uses, set once from `--tls-ca`; `None` = plain TCP.
static TLS: OnceLock<Option<TlsConnector>> = OnceLock::new();

fn tls_connector(ca: &std::path::Path) -> Result<TlsConnector, String> {
    use tokio_rustls::rustls::crypto::ring::default_provider;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// One client connection.
enum Link {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

type ReadSide<'a> = Box<dyn AsyncRead + Unpin + Send + 'a>;
type WriteSide<'a> = Box<dyn AsyncWrite + Unpin + Send + 'a>;

impl Link {
    /// Read and write halves used at the same time: free for TCP, a lock for TLS.
    fn split(&mut self) -> (ReadSide<'_>, WriteSide<'_>) {
        match self {
            Link::Tcp(s) => {
                let (r, w) = s.split();
                (Box::new(r), Box::new(w))
            }
            Link::Tls(s) => {
                let (r, w) = tokio::io::split(s);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

impl AsyncRead for Link {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Link::Tls(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Link::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Link::Tls(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Link::Tls(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Link::Tls(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Accounting

/// What one subscriber saw of one stream.
#[derive(Default)]
struct Track {
    seen: Vec<u64>,
    max: Option<u64>,
    unique: u64,
    dup: u64,
    reordered: u64,
}

impl Track {
    fn record(&mut self, seq: u64) {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if self.seen.len() <= w {
            self.seen.resize(w + 1, 0);
        }
        if self.seen[w] & (1 << b) != 0 {
            self.dup += 1;
            return;
        }
        self.seen[w] |= 1 << b;
        self.unique += 1;
        match self.max {
            Some(m) if seq < m => self.reordered += 1,
            _ => self.max = Some(seq),
        }
    }
}

/// Latency histogram: log2 buckets with 32 linear sub-buckets (~3% resolution), in ns.
struct Hist {
    counts: Vec<u64>,
    n: u64,
}

impl Hist {
    fn new() -> Hist {
        Hist {
            counts: vec![0; 64 * 32],
            n: 0,
        }
    }
    fn bucket(v: u64) -> usize {
        if v < 32 {
            return v as usize;
        }
        let lg = 63 - v.leading_zeros() as usize; // >= 5
        let sub = ((v >> (lg - 5)) & 31) as usize;
        (lg - 4) * 32 + sub
    }
    fn value(i: usize) -> u64 {
        if i < 32 {
            return i as u64;
        }
        let lg = i / 32 + 4;
        let sub = (i % 32) as u64;
        (32 + sub) << (lg - 5)
    }
    fn add(&mut self, v: u64) {
        self.counts[Hist::bucket(v)] += 1;
        self.n += 1;
    }
    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.n += o.n;
    }
    fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let want = ((self.n as f64) * q).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= want {
                return Hist::value(i);
            }
        }
        0
    }
}

/// What a subscriber hands back.
struct SubReport {
    streams: HashMap<u32, Track>,
    received: u64,
    hist: Hist,
    last_rx: Option<Instant>,
    error: Option<String>,
}

/// What a publisher hands back.
struct PubReport {
    stream: u32,
    sent: u64,
    acked: u64,
    error: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Publisher and subscriber tasks

struct PubCfg {
    v5: bool,
    qos: u8,
    payload: usize,
    window: usize,
    /// msg/s for this publisher; 0 = unlimited.
    rate: f64,
    /// Stop publishing at this time...
    deadline: Instant,
    /// ... or after this many messages.
    count: u64,
    /// Give up waiting for acks at this time.
    hard_deadline: Instant,
}

/// Publish to `topics` in turn (stream id `stream + index`, each topic its own sequence) until
/// the deadline or the count; keeps up to `window` QoS 1/2 messages unacknowledged.
async fn publisher(
    mut s: Link,
    mut inbuf: BytesMut,
    topics: Vec<String>,
    stream: u32,
    cfg: Arc<PubCfg>,
) -> Vec<PubReport> {
    let n = topics.len();
    let mut reports: Vec<PubReport> = (0..n)
        .map(|i| PubReport {
            stream: stream + i as u32,
            sent: 0,
            acked: 0,
            error: None,
        })
        .collect();
    let total_count = cfg.count.saturating_mul(n as u64);
    let mut out = BytesMut::with_capacity(64 * 1024);
    // packet id -> topic index (QoS 1/2); 0 = free.
    let mut inflight_ids: Vec<u32> = vec![0; 65536];
    let mut inflight = 0usize;
    let mut next_id: u16 = 1;
    let mut sent_total = 0u64;
    let started = Instant::now();
    let (mut rd, mut wr) = s.split();
    let mut err = None;
    loop {
        let now = Instant::now();
        let stopping = now >= cfg.deadline || sent_total >= total_count;
        if !stopping {
            let allowed = if cfg.rate > 0.0 {
                ((now - started).as_secs_f64() * cfg.rate) as u64 + 1
            } else {
                u64::MAX
            };
            while sent_total < allowed.min(total_count)
                && out.len() < 64 * 1024
                && (cfg.qos == 0 || inflight < cfg.window)
            {
                let i = (sent_total % n as u64) as usize;
                let mut id = 0;
                if cfg.qos > 0 {
                    while inflight_ids[usize::from(next_id)] != 0 {
                        next_id = next_id.checked_add(1).unwrap_or(1);
                    }
                    id = next_id;
                    next_id = next_id.checked_add(1).unwrap_or(1);
                    inflight_ids[usize::from(id)] = i as u32 + 1;
                    inflight += 1;
                }
                let seq = reports[i].sent;
                encode_publish(
                    &mut out,
                    cfg.v5,
                    &topics[i],
                    cfg.qos,
                    id,
                    reports[i].stream,
                    seq,
                    cfg.payload,
                );
                reports[i].sent += 1;
                sent_total += 1;
            }
        } else if out.is_empty() && inflight == 0 {
            break;
        }
        if now >= cfg.hard_deadline {
            err = Some(format!("{inflight} messages never acknowledged"));
            break;
        }
        // Wake for the next paced message, or to notice the deadline.
        let wake = if stopping {
            cfg.hard_deadline
        } else if cfg.rate > 0.0 {
            let next = started + Duration::from_secs_f64((sent_total as f64) / cfg.rate);
            next.min(cfg.deadline)
        } else {
            cfg.deadline
        };
        let can_send_more = !stopping
            && cfg.rate == 0.0
            && (cfg.qos == 0 || inflight < cfg.window)
            && out.len() < 64 * 1024;
        if can_send_more && out.is_empty() {
            continue;
        }
        inbuf.reserve(4096);
        tokio::select! {
            r = wr.write_buf(&mut out), if !out.is_empty() => {
                if let Err(e) = r { err = Some(format!("write: {e}")); break; }
            }
            r = rd.read_buf(&mut inbuf) => match r {
                Ok(0) => { err = Some("closed by broker".into()); break; }
                Err(e) => { err = Some(format!("read: {e}")); break; }
                Ok(_) => {
                    while let Some((first, hl, len)) = frame(&inbuf) {
                        let body = &inbuf[hl..hl + len];
                        let id = ack_id(body);
                        match first >> 4 {
                            4 | 7 => {
                                let t = inflight_ids[usize::from(id)];
                                if t != 0 {
                                    inflight_ids[usize::from(id)] = 0;
                                    inflight -= 1;
                                    reports[t as usize - 1].acked += 1;
                                }
                            }
                            5 => encode_ack(&mut out, 6, id),
                            _ => {}
                        }
                        inbuf.advance(hl + len);
                    }
                }
            },
            _ = tokio::time::sleep_until(wake.into()), if !can_send_more => {}
        }
    }
    if cfg.qos == 0 {
        for r in &mut reports {
            r.acked = r.sent;
        }
    }
    if let Some(e) = err {
        reports[0].error = Some(e);
    }
    drop((rd, wr));
    disconnect(s).await;
    reports
}

struct SubCfg {
    v5: bool,
    record_latency: bool,
}

/// Receive until told to stop; acknowledges QoS 1/2 and accounts every message.
/// `done_at`: stop by itself once this many messages arrived (sessions scenario).
async fn subscriber(
    mut s: Link,
    mut inbuf: BytesMut,
    cfg: Arc<SubCfg>,
    mut stop: watch::Receiver<bool>,
    progress: Arc<AtomicU64>,
    done_at: Option<u64>,
) -> SubReport {
    let mut rep = SubReport {
        streams: HashMap::new(),
        received: 0,
        hist: Hist::new(),
        last_rx: None,
        error: None,
    };
    let mut out = BytesMut::with_capacity(4096);
    let (mut rd, mut wr) = s.split();
    loop {
        if done_at.is_some_and(|n| rep.received >= n) && out.is_empty() {
            break;
        }
        // Whatever is already buffered first (bytes left over from the handshake).
        let mut got = false;
        while let Some((first, hl, len)) = frame(&inbuf) {
            got = true;
            let body = &inbuf[hl..hl + len];
            match first >> 4 {
                3 => match parse_publish(first, body, cfg.v5) {
                    Ok(m) => {
                        rep.received += 1;
                        if cfg.record_latency {
                            rep.hist.add(now_ns().saturating_sub(m.sent_ns));
                        }
                        rep.streams.entry(m.stream).or_default().record(m.seq);
                        match m.qos {
                            1 => encode_ack(&mut out, 4, m.packet_id),
                            2 => encode_ack(&mut out, 5, m.packet_id),
                            _ => {}
                        }
                    }
                    Err(e) => rep.error = Some(e),
                },
                6 => encode_ack(&mut out, 7, ack_id(body)),
                _ => {}
            }
            inbuf.advance(hl + len);
        }
        if got {
            rep.last_rx = Some(Instant::now());
            progress.store(rep.received, Ordering::Relaxed);
            continue;
        }
        inbuf.reserve(16 * 1024);
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            r = wr.write_buf(&mut out), if !out.is_empty() => {
                if let Err(e) = r { rep.error = Some(format!("write: {e}")); break; }
            }
            r = rd.read_buf(&mut inbuf) => match r {
                Ok(0) => { rep.error = Some("closed by broker".into()); break; }
                Err(e) => { rep.error = Some(format!("read: {e}")); break; }
                Ok(_) => {}
            },
        }
    }
    // Acks still buffered go out before the DISCONNECT.
    if !out.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&out)).await;
    }
    drop((rd, wr));
    disconnect(s).await;
    rep
}

// ---------------------------------------------------------------------------------------------
// System limits: file descriptors, listen backlog, ephemeral ports

/// The few libc calls the generator needs (no `libc` crate among the dependencies; these
/// symbols are in the C library every Rust program on Linux links).
mod sys {
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    mod ffi {
        /// `struct rlimit` (rlim_t is 64 bits on 64-bit Linux).
        #[repr(C)]
        pub struct RLimit {
            pub cur: u64,
            pub max: u64,
        }
        pub const RLIMIT_NOFILE: i32 = 7;
        pub const IPPROTO_IP: i32 = 0;
        pub const IP_BIND_ADDRESS_NO_PORT: i32 = 24;
        extern "C" {
            pub fn getrlimit(resource: i32, rlim: *mut RLimit) -> i32;
            pub fn setrlimit(resource: i32, rlim: *const RLimit) -> i32;
            pub fn setsockopt(fd: i32, level: i32, name: i32, val: *const i32, len: u32) -> i32;
        }
    }

    /// Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) afterwards.
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    pub fn raise_nofile() -> Option<(u64, u64)> {
        let mut l = ffi::RLimit { cur: 0, max: 0 };
        // SAFETY: `l` is a valid, writable `struct rlimit`.
        if unsafe { ffi::getrlimit(ffi::RLIMIT_NOFILE, &mut l) } != 0 {
            return None;
        }
        if l.cur < l.max {
            let want = ffi::RLimit {
                cur: l.max,
                max: l.max,
            };
            // SAFETY: `want` is a valid `struct rlimit`; raising the soft limit up to the
            // hard one needs no privilege.
            if unsafe { ffi::setrlimit(ffi::RLIMIT_NOFILE, &want) } == 0 {
                l.cur = l.max;
            }
        }
        Some((l.cur, l.max))
    }

    #[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
    pub fn raise_nofile() -> Option<(u64, u64)> {
        None
    }

    /// IP_BIND_ADDRESS_NO_PORT on `sock` (best effort: without it bind picks the port, from
    /// one range shared by all destinations).
    pub fn bind_address_no_port(sock: &tokio::net::TcpSocket) {
        #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
        {
            use std::os::fd::AsRawFd;
            let one: i32 = 1;
            // SAFETY: a valid socket descriptor and a 4-byte int option value.
            unsafe {
                ffi::setsockopt(
                    sock.as_raw_fd(),
                    ffi::IPPROTO_IP,
                    ffi::IP_BIND_ADDRESS_NO_PORT,
                    &one,
                    4,
                );
            }
        }
        #[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
        let _ = sock;
    }
}

/// A number from a /proc/sys file (first field).
fn proc_sys(path: &str) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(path).ok()?;
    s.split_whitespace().map(|f| f.parse().ok()).collect()
}

/// Descriptors a scenario holds at once (its connections plus a margin).
fn fds_needed(o: &Opts) -> u64 {
    let conns = match o.scenario {
        Scenario::Connections | Scenario::Sessions => o.clients + 8,
        Scenario::FanOut => o.subscribers + o.stuck + 1,
        _ => 2 * o.publishers + o.stuck + 1,
    };
    conns as u64 + 64
}

/// Raise RLIMIT_NOFILE and check the kernel settings a run of many connections depends on:
/// an error when the descriptors cannot suffice, warnings for the rest.
fn check_limits(o: &Opts) -> Result<(), String> {
    let need = fds_needed(o);
    if let Some((soft, hard)) = sys::raise_nofile() {
        if soft < need {
            return Err(format!(
                "{} connections need about {need} file descriptors, but the limit is {soft} \
                 (hard limit {hard}; this tool raised the soft limit to the hard one). Raise \
                 the hard limit, e.g. as root `ulimit -Hn {need}` in the shell that starts \
                 this tool and the broker (which needs as many), or LimitNOFILE= / \
                 /etc/security/limits.conf; see README, \"Scale test\"",
                need - 72,
            ));
        }
    }
    let burst = o.concurrency.max(1) as u64;
    if matches!(o.scenario, Scenario::Connections | Scenario::Sessions) {
        if let Some(m) = proc_sys("/proc/sys/net/core/somaxconn").and_then(|v| v.first().copied()) {
            if m < burst.max(1024) {
                eprintln!(
                    "load: warning: net.core.somaxconn is {m}, low for {burst} connection attempts \
                     at once (and caps the broker's listen backlog): expect SYN retries and 1 s \
                     stalls; `sysctl -w net.core.somaxconn=4096`"
                );
            }
        }
    }
    Ok(())
}

/// The source addresses for `--source-addrs` (empty = let the kernel choose).
fn sources(o: &Opts) -> Result<Vec<IpAddr>, String> {
    const PER_SOURCE: usize = 20_000;
    let n = o
        .source_addrs
        .unwrap_or_else(|| o.clients.div_ceil(PER_SOURCE))
        .max(1);
    let ports = proc_sys("/proc/sys/net/ipv4/ip_local_port_range")
        .and_then(|v| Some(v.get(1)?.saturating_sub(*v.first()?) + 1))
        .unwrap_or(28_232) as usize;
    let per = o.clients.div_ceil(n);
    if per > ports * 9 / 10 {
        return Err(format!(
            "{per} connections per source address, but net.ipv4.ip_local_port_range has only \
             {ports} ports: use more --source-addrs (e.g. {})",
            o.clients.div_ceil(ports * 7 / 10)
        ));
    }
    if n == 1 {
        return Ok(Vec::new());
    }
    match o.addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {}
        _ => {
            return Err(format!(
                "--source-addrs {n} needs a broker on an IPv4 loopback address (127.x.x.x), \
                 not {}",
                o.addr
            ))
        }
    }
    if n > 250 {
        return Err("--source-addrs must be at most 250".into());
    }
    Ok((0..n)
        .map(|k| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + k as u8)))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Broker-side figures from /proc

/// utime + stime of the broker in seconds (clock ticks at the usual 100 Hz).
fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the parenthesised command name, which may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// VmRSS of the broker in KiB.
fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// Key=value pairs of the RESULT line, in order.
#[derive(Default)]
struct Out(Vec<(String, String)>);

impl Out {
    fn set(&mut self, k: &str, v: impl std::fmt::Display) {
        self.0.push((k.to_string(), v.to_string()));
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
    }
    fn line(&self) -> String {
        let kv: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("RESULT {}", kv.join(" "))
    }
}

fn run_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}", t % 0xffff_ffff)
}

/// A topology of publishers and subscribers: which topics each publisher cycles through and
/// which filter each subscriber takes, and how many streams each subscriber should see.
struct Topology {
    pub_topics: Vec<Vec<String>>,
    sub_filters: Vec<String>,
    /// For each subscriber, the stream ids it should receive.
    sub_streams: Vec<Vec<u32>>,
}

fn topology(o: &Opts, run: &str) -> Topology {
    match o.scenario {
        Scenario::FanIn => Topology {
            pub_topics: (0..o.publishers)
                .map(|p| vec![format!("load/{run}/in/{p}")])
                .collect(),
            sub_filters: vec![format!("load/{run}/in/+")],
            sub_streams: vec![(0..o.publishers as u32).collect()],
        },
        Scenario::Pairs => Topology {
            pub_topics: (0..o.publishers)
                .map(|p| vec![format!("load/{run}/pair/{p}")])
                .collect(),
            sub_filters: (0..o.publishers)
                .map(|p| format!("load/{run}/pair/{p}"))
                .collect(),
            sub_streams: (0..o.publishers as u32).map(|p| vec![p]).collect(),
        },
        Scenario::FanOut => Topology {
            pub_topics: vec![vec![format!("load/{run}/out")]],
            sub_filters: (0..o.subscribers)
                .map(|_| format!("load/{run}/out"))
                .collect(),
            sub_streams: (0..o.subscribers).map(|_| vec![0]).collect(),
        },
        Scenario::Latency => Topology {
            pub_topics: vec![vec![format!("load/{run}/lat")]],
            sub_filters: vec![format!("load/{run}/lat")],
            sub_streams: vec![vec![0]],
        },
        Scenario::Connections | Scenario::Sessions => unreachable!(),
    }
}

/// fan-in, pairs, fan-out, latency: publish for the duration (or count), drain, account.
async fn run_flow(o: &Opts) -> Result<Out, String> {
    let run = run_id();
    let t = topology(o, &run);
    let v5 = o.v5();
    let (stop_tx, stop_rx) = watch::channel(false);
    let sub_cfg = Arc::new(SubCfg {
        v5,
        record_latency: true,
    });

    // Subscribers first, each subscribed before anything is published.
    let mut subs = Vec::new();
    let mut progress = Vec::new();
    for (i, f) in t.sub_filters.iter().enumerate() {
        let (mut s, mut buf, _) = connect(o.addr, v5, &format!("ld-{run}-s{i}"), true, 0).await?;
        subscribe(&mut s, &mut buf, v5, f, o.qos).await?;
        let p = Arc::new(AtomicU64::new(0));
        progress.push(p.clone());
        subs.push(tokio::spawn(subscriber(
            s,
            buf,
            sub_cfg.clone(),
            stop_rx.clone(),
            p,
            None,
        )));
    }
    // Held (unread) until the run ends.
    let mut stuck = Vec::new();
    for i in 0..o.stuck {
        let (mut s, mut buf, _) =
            connect(o.addr, v5, &format!("ld-{run}-stuck{i}"), true, 0).await?;
        subscribe(&mut s, &mut buf, v5, &t.sub_filters[0], o.qos).await?;
        stuck.push(s);
    }
    let mut conns = Vec::new();
    for (i, _) in t.pub_topics.iter().enumerate() {
        conns.push(connect(o.addr, v5, &format!("ld-{run}-p{i}"), true, 0).await?);
    }

    let count = o.count.unwrap_or(u64::MAX);
    let duration = if o.count.is_some() {
        Duration::from_secs(600)
    } else {
        Duration::from_secs_f64(o.duration)
    };
    let cpu0 = cpu_secs(o.pid);
    let start = Instant::now();
    let deadline = start + duration;
    let cfg = Arc::new(PubCfg {
        v5,
        qos: o.qos,
        payload: o.payload,
        window: o.window,
        rate: o.rate / t.pub_topics.len() as f64,
        deadline,
        count,
        hard_deadline: deadline + Duration::from_secs_f64(o.drain),
    });
    let mut pubs = Vec::new();
    for (i, ((s, buf, _), topics)) in conns.into_iter().zip(t.pub_topics.clone()).enumerate() {
        pubs.push(tokio::spawn(publisher(
            s,
            buf,
            topics,
            i as u32,
            cfg.clone(),
        )));
    }
    let mut sent: HashMap<u32, u64> = HashMap::new();
    let mut acked_total = 0;
    let mut sent_total = 0;
    let mut errors = Vec::new();
    for p in pubs {
        for r in p.await.map_err(|e| e.to_string())? {
            sent.insert(r.stream, r.sent);
            sent_total += r.sent;
            acked_total += r.acked;
            errors.extend(r.error);
        }
    }
    let published_at = Instant::now();

    // Drain: until every subscriber has everything, or nothing moved for 2 s, or the limit.
    let expected: Vec<u64> = t
        .sub_streams
        .iter()
        .map(|ss| ss.iter().map(|s| sent.get(s).copied().unwrap_or(0)).sum())
        .collect();
    let drain_limit = published_at + Duration::from_secs_f64(o.drain);
    let mut last_total = 0;
    let mut last_move = Instant::now();
    loop {
        let got: Vec<u64> = progress.iter().map(|p| p.load(Ordering::Relaxed)).collect();
        if got.iter().zip(&expected).all(|(g, e)| g >= e) {
            break;
        }
        let total: u64 = got.iter().sum();
        if total != last_total {
            last_total = total;
            last_move = Instant::now();
        }
        if Instant::now() >= drain_limit || last_move.elapsed() > Duration::from_secs(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu1 = cpu_secs(o.pid);
    let _ = stop_tx.send(true);

    let mut hist = Hist::new();
    let (mut received, mut unique, mut dup, mut reordered) = (0u64, 0u64, 0u64, 0u64);
    let mut last_rx = start;
    let mut lost = 0u64;
    for (i, h) in subs.into_iter().enumerate() {
        let r = h.await.map_err(|e| e.to_string())?;
        received += r.received;
        hist.merge(&r.hist);
        if let Some(t) = r.last_rx {
            last_rx = last_rx.max(t);
        }
        errors.extend(r.error);
        for st in &t.sub_streams[i] {
            let tr = r.streams.get(st);
            let u = tr.map_or(0, |t| t.unique);
            unique += u;
            lost += sent.get(st).copied().unwrap_or(0).saturating_sub(u);
            dup += tr.map_or(0, |t| t.dup);
            reordered += tr.map_or(0, |t| t.reordered);
        }
    }
    let elapsed = (last_rx - start).as_secs_f64().max(1e-9);
    let mut out = Out::default();
    out.set("published", sent_total);
    out.set("acked", acked_total);
    out.set("delivered", received);
    out.set("expected", expected.iter().sum::<u64>());
    out.set("lost", lost);
    out.set("dup", dup);
    out.set("reordered", reordered);
    out.set("secs", format!("{elapsed:.3}"));
    out.set("msgs_per_s", format!("{:.0}", received as f64 / elapsed));
    out.set("pub_per_s", format!("{:.0}", sent_total as f64 / elapsed));
    out.set("p50_us", format!("{:.1}", hist.quantile(0.50) as f64 / 1e3));
    out.set("p99_us", format!("{:.1}", hist.quantile(0.99) as f64 / 1e3));
    out.set(
        "p999_us",
        format!("{:.1}", hist.quantile(0.999) as f64 / 1e3),
    );
    cpu_fields(&mut out, cpu0, cpu1, unique + dup);
    if let Some(r) = rss_kib(o.pid) {
        out.set("rss_kib", r);
    }
    out.set("errors", errors.len());
    out.set("stuck", stuck.len());
    drop(stuck);
    for e in errors.iter().take(3) {
        eprintln!("load: error: {e}");
    }
    Ok(out)
}

fn cpu_fields(out: &mut Out, cpu0: Option<f64>, cpu1: Option<f64>, delivered: u64) {
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        let cpu = b - a;
        out.set("broker_cpu_s", format!("{cpu:.2}"));
        if cpu > 0.0 {
            out.set("msgs_per_cpu_s", format!("{:.0}", delivered as f64 / cpu));
        }
    }
}

/// What the client tasks of `connections` report as they go.
struct Tally {
    /// Clients connected and subscribed / given up.
    connected: AtomicUsize,
    failed: AtomicUsize,
    /// When the last one was done (connected or failed), ns since `base()`.
    setup_done_ns: AtomicU64,
    /// Clients that got the final delivery, and when the last one did.
    received: AtomicUsize,
    last_rx_ns: AtomicU64,
    /// Time from the first SYN to the SUBACK, per client.
    setup: Mutex<Hist>,
    /// The first few errors, and how many there were.
    errors: Mutex<Vec<String>>,
    error_count: AtomicUsize,
}

impl Tally {
    fn error(&self, e: String) {
        self.error_count.fetch_add(1, Ordering::Relaxed);
        let mut v = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < 10 {
            v.push(e);
        }
    }
}

/// One idle client of `connections`: connect (persistent session) and subscribe, then wait
/// for one message (acknowledged), then hold the connection until `stop`.
#[allow(clippy::too_many_arguments)] // the scenario's settings, passed once per client
async fn idle_client(
    addr: SocketAddr,
    src: Option<IpAddr>,
    v5: bool,
    client_id: String,
    filter: String,
    qos: u8,
    permit: tokio::sync::OwnedSemaphorePermit,
    tally: Arc<Tally>,
    mut stop: watch::Receiver<bool>,
) {
    let t0 = Instant::now();
    let r = tokio::time::timeout(SETUP_TIMEOUT, async {
        let (mut s, mut buf, _) = connect_from(addr, src, v5, &client_id, false, u32::MAX).await?;
        subscribe(&mut s, &mut buf, v5, &filter, qos).await?;
        Ok::<_, String>((s, buf))
    })
    .await
    .unwrap_or_else(|_| Err(format!("{client_id}: timed out")));
    drop(permit);
    let (mut s, mut buf) = match r {
        Ok(c) => {
            let us = t0.elapsed().as_nanos() as u64;
            tally
                .setup
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .add(us);
            tally.setup_done_ns.fetch_max(now_ns(), Ordering::Relaxed);
            tally.connected.fetch_add(1, Ordering::Release);
            c
        }
        Err(e) => {
            tally.setup_done_ns.fetch_max(now_ns(), Ordering::Relaxed);
            tally.failed.fetch_add(1, Ordering::Release);
            tally.error(e);
            return;
        }
    };
    tokio::select! {
        r = read_frame(&mut s, &mut buf) => match r {
            Ok((first, body)) if first >> 4 == 3 => match parse_publish(first, &body, v5) {
                Ok(m) => {
                    tally.last_rx_ns.fetch_max(now_ns(), Ordering::Relaxed);
                    tally.received.fetch_add(1, Ordering::Release);
                    if m.qos > 0 {
                        let mut out = BytesMut::new();
                        encode_ack(&mut out, if m.qos == 1 { 4 } else { 5 }, m.packet_id);
                        let _ = s.write_all(&out).await;
                    }
                }
                Err(e) => tally.error(format!("{client_id}: {e}")),
            },
            Ok((first, _)) => tally.error(format!("{client_id}: unexpected packet type {}", first >> 4)),
            Err(e) => tally.error(format!("{client_id}: {e}")),
        },
        _ = stop.changed() => return,
    }
    let _ = stop.changed().await;
}

/// C idle connections, each with a persistent session and one subscription: time to set them
/// all up, broker RSS per connection, broker CPU while they idle, then one message to each
/// (`--filter own`: one publish per client topic; `shared`: one publish for all) and the time
/// until the last one has it.
async fn run_connections(o: &Opts) -> Result<Out, String> {
    let run = run_id();
    let v5 = o.v5();
    let srcs = sources(o)?;
    let rss0 = rss_kib(o.pid);
    let cpu0 = cpu_secs(o.pid);
    let tally = Arc::new(Tally {
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        setup_done_ns: AtomicU64::new(0),
        received: AtomicUsize::new(0),
        last_rx_ns: AtomicU64::new(0),
        setup: Mutex::new(Hist::new()),
        errors: Mutex::new(Vec::new()),
        error_count: AtomicUsize::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let topic = |i: usize| match o.filter {
        FilterMode::Own => format!("load/{run}/c/{i}"),
        FilterMode::Shared => format!("load/{run}/all"),
    };
    let sem = Arc::new(Semaphore::new(o.concurrency.max(1)));
    let start_ns = now_ns();
    for i in 0..o.clients {
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let src = (!srcs.is_empty()).then(|| srcs[i % srcs.len()]);
        tokio::spawn(idle_client(
            o.addr,
            src,
            v5,
            format!("ld-{run}-c{i}"),
            topic(i),
            o.qos,
            permit,
            tally.clone(),
            stop_rx.clone(),
        ));
    }
    // Every attempt is bounded by SETUP_TIMEOUT.
    let setup_limit = Instant::now() + SETUP_TIMEOUT + Duration::from_secs(1);
    while tally.connected.load(Ordering::Acquire) + tally.failed.load(Ordering::Acquire) < o.clients
        && Instant::now() < setup_limit
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = tally
        .setup_done_ns
        .load(Ordering::Relaxed)
        .saturating_sub(start_ns) as f64
        / 1e9;
    let cpu1 = cpu_secs(o.pid);
    let connected = tally.connected.load(Ordering::Acquire);
    // Let the broker settle (allocator, lazily grown buffers) before reading its RSS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = rss_kib(o.pid);
    let mut out = Out::default();
    out.set("connected", connected);
    out.set("sources", srcs.len().max(1));
    out.set("filter", format!("{:?}", o.filter).to_lowercase());
    out.set("secs", format!("{elapsed:.3}"));
    out.set(
        "conn_per_s",
        format!("{:.0}", connected as f64 / elapsed.max(1e-9)),
    );
    {
        let h = tally.setup.lock().unwrap_or_else(|p| p.into_inner());
        for (k, q) in [
            ("setup_p50_ms", 0.5),
            ("setup_p99_ms", 0.99),
            ("setup_max_ms", 1.0),
        ] {
            out.set(k, format!("{:.2}", h.quantile(q) as f64 / 1e6));
        }
    }
    if let (Some(a), Some(b)) = (rss0, rss1) {
        out.set("rss_before_kib", a);
        out.set("rss_after_kib", b);
        let n = connected.max(1) as f64;
        out.set(
            "rss_per_conn_b",
            format!("{:.0}", (b.saturating_sub(a) * 1024) as f64 / n),
        );
        out.set(
            "rss_total_per_conn_b",
            format!("{:.0}", (b * 1024) as f64 / n),
        );
    }
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        out.set("broker_cpu_s", format!("{:.2}", b - a));
        if connected > 0 {
            out.set(
                "cpu_us_per_conn",
                format!("{:.0}", (b - a) * 1e6 / connected as f64),
            );
        }
    }

    // Idle: nothing happens on any connection; what does the broker burn?
    if o.idle > 0.0 {
        let a = cpu_secs(o.pid);
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(o.idle)).await;
        if let (Some(a), Some(b)) = (a, cpu_secs(o.pid)) {
            let secs = t.elapsed().as_secs_f64();
            out.set("idle_s", format!("{secs:.1}"));
            out.set("idle_cpu_pct", format!("{:.2}", (b - a) * 100.0 / secs));
        }
    }

    // One message to every client: QoS >= 1, from 1 publisher (shared) or 4 (own topics).
    let qos = o.qos.max(1);
    let deliver_limit = Duration::from_secs_f64(o.drain.max(1.0) + o.clients as f64 / 10_000.0);
    let cfg = Arc::new(PubCfg {
        v5,
        qos,
        payload: o.payload,
        window: o.window,
        rate: 0.0,
        deadline: Instant::now() + Duration::from_secs(600),
        count: 1,
        hard_deadline: Instant::now() + SETUP_TIMEOUT + deliver_limit,
    });
    let pubs: Vec<Vec<String>> = match o.filter {
        FilterMode::Shared => vec![vec![topic(0)]],
        FilterMode::Own => {
            let n = 4.min(o.clients).max(1);
            (0..n)
                .map(|p| {
                    (p * o.clients / n..(p + 1) * o.clients / n)
                        .map(topic)
                        .collect()
                })
                .collect()
        }
    };
    // The publishers connect after the idle clients (the broker's RSS and CPU figures above
    // are theirs alone), so a broker at its connection limit keeps them waiting: bounded.
    let mut links = Vec::new();
    for p in 0..pubs.len() {
        let c = tokio::time::timeout(
            SETUP_TIMEOUT,
            connect(o.addr, v5, &format!("ld-{run}-q{p}"), true, 0),
        )
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the broker did not accept the publisher's connection in {SETUP_TIMEOUT:?} \
                 (at its connection limit? it needs {} or more)",
                o.clients + pubs.len()
            ))
        });
        match c {
            Ok(c) => links.push(c),
            Err(e) => {
                tally.error(format!("publisher: {e}"));
                break;
            }
        }
    }
    if links.len() < pubs.len() {
        links.clear();
    }
    let t0 = now_ns();
    let mut handles = Vec::new();
    for (p, ((s, buf, _), topics)) in links.into_iter().zip(pubs).enumerate() {
        handles.push(tokio::spawn(publisher(
            s,
            buf,
            topics,
            p as u32,
            cfg.clone(),
        )));
    }
    let limit = Instant::now()
        + if handles.is_empty() {
            Duration::ZERO
        } else {
            deliver_limit
        };
    while tally.received.load(Ordering::Acquire) < connected && Instant::now() < limit {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let received = tally.received.load(Ordering::Acquire);
    for h in handles {
        for r in h.await.map_err(|e| e.to_string())? {
            if let Some(e) = r.error {
                tally.error(format!("publisher: {e}"));
            }
        }
    }
    out.set("delivered", received);
    out.set("lost", connected.saturating_sub(received));
    if received > 0 {
        let last = tally.last_rx_ns.load(Ordering::Relaxed);
        out.set(
            "deliver_s",
            format!("{:.3}", last.saturating_sub(t0) as f64 / 1e9),
        );
    }
    let errors = tally.error_count.load(Ordering::Relaxed);
    out.set("errors", errors);
    for e in tally
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .take(3)
    {
        eprintln!("load: error: {e}");
    }
    // Close them all; the sessions stay in the broker (persistent), which the comparison
    // script throws away by restarting it.
    let _ = stop_tx.send(true);
    Ok(out)
}

/// C persistent sessions go offline, M QoS 1 messages are published to each, they reconnect
/// and drain.
async fn run_sessions(o: &Opts) -> Result<Out, String> {
    let run = run_id();
    let v5 = o.v5();
    let m = o.count.unwrap_or(10);
    let qos = o.qos.max(1);
    let sem = Arc::new(Semaphore::new(o.concurrency.max(1)));
    let id = |i: usize| format!("ld-{run}-x{i}");
    let topic = |i: usize| format!("load/{run}/x/{i}");

    // 1. Create the sessions and their subscriptions, then go offline.
    let mut tasks = Vec::new();
    for i in 0..o.clients {
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (addr, cid, t) = (o.addr, id(i), topic(i));
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(SETUP_TIMEOUT, async {
                // Clean first (no leftovers of an earlier run), then the persistent session.
                let (s, _, _) = connect(addr, v5, &cid, true, 0).await?;
                disconnect(s).await;
                let (mut s, mut buf, _) = connect(addr, v5, &cid, false, u32::MAX).await?;
                subscribe(&mut s, &mut buf, v5, &t, qos).await?;
                disconnect(s).await;
                Ok::<_, String>(())
            })
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            drop(permit);
            r
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    // The broker notices the DISCONNECTs asynchronously; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 2. Publish M messages to each session's topic, QoS 1 with a window, all acknowledged.
    let pubs_n = 4.min(o.clients).max(1);
    let cfg = Arc::new(PubCfg {
        v5,
        qos,
        payload: o.payload,
        window: o.window,
        rate: 0.0,
        deadline: Instant::now() + Duration::from_secs(600),
        count: m,
        hard_deadline: Instant::now() + SETUP_TIMEOUT,
    });
    let mut handles = Vec::new();
    for p in 0..pubs_n {
        let (s, buf, _) = connect(o.addr, v5, &format!("ld-{run}-q{p}"), true, 0).await?;
        // Each publisher takes a contiguous range of sessions: it numbers its topics'
        // streams from `lo`, so stream id = session index.
        let lo = p * o.clients / pubs_n;
        let hi = (p + 1) * o.clients / pubs_n;
        let topics: Vec<String> = (lo..hi).map(topic).collect();
        handles.push(tokio::spawn(publisher(
            s,
            buf,
            topics,
            lo as u32,
            cfg.clone(),
        )));
    }
    let mut acked = 0;
    let mut errors = Vec::new();
    for h in handles {
        for r in h.await.map_err(|e| e.to_string())? {
            acked += r.acked;
            errors.extend(r.error);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 3. Reconnect and drain.
    let cpu0 = cpu_secs(o.pid);
    let sub_cfg = Arc::new(SubCfg {
        v5,
        record_latency: false,
    });
    let (_stop_tx, stop_rx) = watch::channel(false);
    let start = Instant::now();
    let drain = Duration::from_secs_f64(o.drain.max(1.0));
    let mut tasks = Vec::new();
    for i in 0..o.clients {
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (addr, cid, cfg, stop) = (o.addr, id(i), sub_cfg.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let conn =
                tokio::time::timeout(SETUP_TIMEOUT, connect(addr, v5, &cid, false, u32::MAX))
                    .await
                    .unwrap_or_else(|_| Err("connect timed out".into()));
            drop(permit);
            let (s, buf, present) = conn?;
            if !present {
                return Err(format!("{cid}: session not present"));
            }
            let r = tokio::time::timeout(
                drain,
                subscriber(s, buf, cfg, stop, Arc::new(AtomicU64::new(0)), Some(m)),
            )
            .await
            .map_err(|_| format!("{cid}: drain timed out"))?;
            Ok::<_, String>((r, Instant::now()))
        }));
    }
    let (mut unique, mut dup, mut reordered, mut received) = (0u64, 0u64, 0u64, 0u64);
    let mut last = start;
    for t in tasks {
        match t.await.map_err(|e| e.to_string())? {
            Ok((r, at)) => {
                last = last.max(at);
                received += r.received;
                errors.extend(r.error);
                for tr in r.streams.values() {
                    unique += tr.unique;
                    dup += tr.dup;
                    reordered += tr.reordered;
                }
            }
            Err(e) => errors.push(e),
        }
    }
    let cpu1 = cpu_secs(o.pid);
    let elapsed = (last - start).as_secs_f64().max(1e-9);
    let expected = (o.clients as u64) * m;
    let mut out = Out::default();
    out.set("sessions", o.clients);
    out.set("per_session", m);
    out.set("acked", acked);
    out.set("expected", expected);
    out.set("delivered", received);
    out.set("lost", expected.saturating_sub(unique));
    out.set("dup", dup);
    out.set("reordered", reordered);
    out.set("secs", format!("{elapsed:.3}"));
    out.set("msgs_per_s", format!("{:.0}", received as f64 / elapsed));
    cpu_fields(&mut out, cpu0, cpu1, received);
    out.set("errors", errors.len());
    for e in errors.iter().take(3) {
        eprintln!("load: error: {e}");
    }
    Ok(out)
}

async fn run(o: &Opts) -> Result<Out, String> {
    let mut out = match o.scenario {
        Scenario::Connections => run_connections(o).await?,
        Scenario::Sessions => run_sessions(o).await?,
        _ => run_flow(o).await?,
    };
    let mut head = Out::default();
    head.set("label", &o.label);
    head.set("scenario", format!("{:?}", o.scenario).to_lowercase());
    head.set("proto", o.proto);
    head.set("qos", o.qos);
    head.set("payload", o.payload);
    head.0.append(&mut out.0);
    Ok(head)
}

fn human(o: &Out) -> String {
    let g = |k| o.get(k).unwrap_or("-");
    format!(
        "{} {} v{} qos{}: {} msg/s delivered, lost {}, dup {}, reordered {}, p50/p99/p99.9 {}/{}/{} us, {} msg per broker CPU-s",
        g("label"),
        g("scenario"),
        g("proto"),
        g("qos"),
        g("msgs_per_s"),
        g("lost"),
        g("dup"),
        g("reordered"),
        g("p50_us"),
        g("p99_us"),
        g("p999_us"),
        g("msgs_per_cpu_s"),
    )
}

fn human_connections(o: &Out) -> String {
    let g = |k| o.get(k).unwrap_or("-");
    format!(
        "{} connections v{}: {} connected and subscribed in {} s ({} conn/s, p99 {} ms each, \
         broker CPU {} us each), broker RSS {} B per connection, broker CPU {}% while idle for \
         {} s; one message to each ({} filter) reached the last of {} in {} s, {} missing",
        g("label"),
        g("proto"),
        g("connected"),
        g("secs"),
        g("conn_per_s"),
        g("setup_p99_ms"),
        g("cpu_us_per_conn"),
        g("rss_per_conn_b"),
        g("idle_cpu_pct"),
        g("idle_s"),
        g("filter"),
        g("delivered"),
        g("deliver_s"),
        g("lost"),
    )
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        // cargo-nextest discovery: one test, the smoke run.
        if !args.iter().any(|a| a == "--ignored") {
            println!("smoke: test");
        }
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        smoke();
        return;
    }
    if args.iter().skip(1).all(|a| a == "--bench") {
        // Plain `cargo bench` runs every bench target: without a scenario there is nothing
        // to measure here, and failing would stop the micro-benchmarks after this one.
        println!("load: no scenario given, skipped (cargo bench --bench load -- --help)");
        return;
    }
    let opts = match Opts::try_parse_from(args.iter().filter(|a| *a != "--bench")) {
        Ok(o) => o,
        Err(e) => e.exit(),
    };
    if let Err(e) = opts.check() {
        eprintln!("load: {e}");
        std::process::exit(2);
    }
    if let Err(e) = check_limits(&opts) {
        eprintln!("load: {e}");
        std::process::exit(2);
    }
    let _ = KEEP_ALIVE.set(opts.keep_alive);
    base();
    let tls = match &opts.tls_ca {
        Some(ca) => match tls_connector(ca) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("load: --tls-ca: {e}");
                std::process::exit(2);
            }
        },
        None => None,
    };
    let _ = TLS.set(tls);
    // The whole run is bounded: a watchdog ends the process if anything hangs.
    let limit = Duration::from_secs_f64(
        opts.duration + opts.drain + 2.0 * SETUP_TIMEOUT.as_secs_f64() + 30.0,
    ) + match opts.scenario {
        // Idling, and the final delivery's allowance (see run_connections).
        Scenario::Connections => {
            Duration::from_secs_f64(opts.idle.max(0.0) + opts.clients as f64 / 10_000.0)
        }
        _ => Duration::ZERO,
    };
    let watchdog_limit = if opts.count.is_some() {
        Duration::from_secs(900)
    } else {
        limit
    };
    let finished = Arc::new(AtomicBool::new(false));
    {
        let finished = finished.clone();
        std::thread::spawn(move || {
            std::thread::sleep(watchdog_limit);
            if !finished.load(Ordering::Relaxed) {
                eprintln!("load: time limit of {watchdog_limit:?} reached; exiting");
                std::process::exit(3);
            }
        });
    }
    let rt = runtime(opts.threads);
    let result = rt.block_on(run(&opts));
    finished.store(true, Ordering::Relaxed);
    match result {
        Ok(out) => {
            match opts.scenario {
                Scenario::Connections => println!("{}", human_connections(&out)),
                Scenario::Sessions => {}
                _ => println!("{}", human(&out)),
            }
            println!("{}", out.line());
            // Leave sockets and tasks behind without waiting for them.
            rt.shutdown_timeout(Duration::from_millis(100));
        }
        Err(e) => {
            eprintln!("load: {e}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Smoke test (cargo test / nextest): tiny runs of every scenario against an in-process tether.

fn smoke() {
    use tether::broker::Broker;
    use tether::config::Config;

    let rt = runtime(2);
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let broker = Broker::new(Arc::new(Config::default()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tether::net::server::run_with(listener, broker, async {
            let _ = rx.await;
        }));
        let pid = Some(std::process::id());
        let cases: &[(&[&str], bool)] = &[
            (
                &[
                    "fan-in",
                    "--qos",
                    "1",
                    "--count",
                    "200",
                    "--publishers",
                    "3",
                ],
                true,
            ),
            (
                &[
                    "pairs",
                    "--proto",
                    "5",
                    "--qos",
                    "2",
                    "--count",
                    "100",
                    "--publishers",
                    "2",
                ],
                true,
            ),
            (
                &[
                    "fan-out",
                    "--qos",
                    "1",
                    "--count",
                    "100",
                    "--subscribers",
                    "4",
                ],
                true,
            ),
            (&["latency", "--rate", "2000", "--duration", "0.2"], false),
            (
                &[
                    "connections",
                    "--clients",
                    "20",
                    "--proto",
                    "5",
                    "--idle",
                    "0.1",
                ],
                true,
            ),
            (
                &[
                    "connections",
                    "--clients",
                    "20",
                    "--filter",
                    "shared",
                    "--source-addrs",
                    "3",
                    "--idle",
                    "0",
                ],
                true,
            ),
            (&["sessions", "--clients", "10", "--count", "5"], true),
        ];
        for (args, exact) in cases {
            let mut o = Opts::try_parse_from(std::iter::once("load").chain(args.iter().copied()))
                .expect("smoke options");
            o.addr = addr;
            o.pid = pid;
            o.check().expect("valid");
            let out = tokio::time::timeout(Duration::from_secs(60), run(&o))
                .await
                .expect("smoke case finished in time")
                .expect("smoke case ran");
            println!("{}", out.line());
            assert_eq!(out.get("errors"), Some("0"), "{args:?}");
            if *exact {
                let keys: &[&str] = if o.scenario == Scenario::Connections {
                    &["lost"]
                } else {
                    &["lost", "dup", "reordered"]
                };
                for &k in keys {
                    assert_eq!(out.get(k), Some("0"), "{k} in {args:?}");
                }
            }
        }
        let _ = tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    });
    println!("load: smoke run passed (`cargo bench --bench load -- SCENARIO` measures)");
}
