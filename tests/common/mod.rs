//! Shared test harness: start the broker in-process on 127.0.0.1:0, and a raw-bytes client for
//! the flows a client library hides.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tether::broker::Broker;
use tether::config::Config;
use tether::wire::codec;
use tether::wire::packet::{Packet, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod outside;
pub mod pki;

/// Generous upper bound for anything a test waits on; a failing test fails, it does not hang.
pub const WAIT: Duration = Duration::from_secs(5);

/// A broker running in-process on an ephemeral loopback port.
pub struct TestBroker {
    pub addr: SocketAddr,
    /// Every listener's address, in `Config::listener_specs` order (`addr` is the first).
    pub addrs: Vec<SocketAddr>,
    pub broker: Arc<Broker>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestBroker {
    /// Start with the default configuration.
    pub async fn start() -> TestBroker {
        TestBroker::with_config(Config::default()).await
    }

    /// Start with `config` (its `listener.bind` is ignored: the broker binds 127.0.0.1:0).
    pub async fn with_config(config: Config) -> TestBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let broker = Broker::new(Arc::new(config));
        TestBroker::running(vec![addr], broker, |b, stopped| {
            tether::net::server::run_with(listener, b, stopped)
        })
    }

    /// Start with the default configuration, journaling to `journal` (e.g. a recording).
    pub async fn with_journal(journal: Arc<dyn tether::session::journal::Journal>) -> TestBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let broker = Broker::with_journal(Arc::new(Config::default()), journal);
        TestBroker::running(vec![addr], broker, |b, stopped| {
            tether::net::server::run_with(listener, b, stopped)
        })
    }

    /// Spawn `run(broker, stopped)`, where `stopped` completes when the test stops it.
    fn running<F>(
        addrs: Vec<SocketAddr>,
        broker: Arc<Broker>,
        run: impl FnOnce(Arc<Broker>, futures_util::future::BoxFuture<'static, ()>) -> F,
    ) -> TestBroker
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let stopped = Box::pin(async move {
            let _ = rx.await;
        });
        let task = tokio::spawn(run(broker.clone(), stopped));
        TestBroker {
            addr: addrs[0],
            addrs,
            broker,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Start with every listener of `config` (`[listener]` and `[[listeners]]`, each with its
    /// transport and TLS settings), each bound to a free port on 127.0.0.1.
    pub async fn with_listeners(config: Config) -> TestBroker {
        let broker = Broker::new(Arc::new(config.clone()));
        let mut sockets = tether::net::server::Sockets::default();
        let mut addrs = Vec::new();
        for mut spec in config.listener_specs() {
            spec.bind = "127.0.0.1:0".parse().expect("addr");
            let socket = TcpListener::bind(spec.bind).await.expect("bind");
            addrs.push(socket.local_addr().expect("local addr"));
            sockets
                .mqtt
                .push(tether::net::server::Listener::new(socket, spec).expect("listener"));
        }
        TestBroker::running(addrs, broker, |b, stopped| {
            tether::net::server::run_sockets(sockets, b, stopped)
        })
    }

    /// Shut down and wait for the broker to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// A raw-bytes client connected to this broker.
    pub async fn raw(&self) -> Raw {
        Raw::connect(self.addr).await
    }

    /// rumqttc 3.1.1 options for this broker.
    pub fn options(&self, client_id: &str) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", self.addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Any byte stream a test client talks over: TCP, TLS, a WebSocket adapter.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A client that sends exact bytes and reads exact bytes.
pub struct Raw {
    pub stream: Box<dyn Io>,
    buf: BytesMut,
    /// Protocol used to decode what the broker sends (for `recv_packet`).
    pub version: ProtocolVersion,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw::over(stream)
    }

    /// A client over an already connected stream (TLS, WebSocket).
    pub fn over(stream: impl Io + 'static) -> Raw {
        Raw {
            stream: Box::new(stream),
            buf: BytesMut::new(),
            version: ProtocolVersion::V311,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Send a packet encoded with our codec for `self.version`.
    pub async fn send_packet(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        codec::encode(p, self.version, None, &mut out).expect("encode");
        self.send(&out).await;
    }

    /// Read exactly `n` bytes, failing the test after `WAIT`.
    pub async fn expect_bytes(&mut self, expected: &[u8]) {
        let got = self.read_exact(expected.len()).await;
        assert_eq!(got, expected, "unexpected bytes from broker");
    }

    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let read = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("timed out waiting for bytes")
                .expect("read");
            assert!(
                read > 0,
                "connection closed while expecting {n} bytes, had {:?}",
                &self.buf[..]
            );
        }
        self.buf.split_to(n).to_vec()
    }

    /// Decode the next packet the broker sends (using our codec as a client-side decoder).
    pub async fn recv_packet(&mut self) -> Packet {
        loop {
            if let Some(p) =
                codec::decode(&mut self.buf, Some(self.version), usize::MAX).expect("decodable")
            {
                return p;
            }
            let read = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("timed out waiting for a packet")
                .expect("read");
            assert!(read > 0, "connection closed while waiting for a packet");
        }
    }

    /// The next packet within `d`, or what happened instead (nothing, or the connection
    /// ended). Unlike `recv_packet` it does not fail the test on a timeout or a close, for
    /// flows where either is a legitimate outcome. Undecodable bytes still fail the test.
    pub async fn recv_within(&mut self, d: Duration) -> Recv {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match codec::decode(&mut self.buf, Some(self.version), usize::MAX) {
                Ok(Some(p)) => return Recv::Packet(p),
                Ok(None) => {}
                Err(e) => panic!("undecodable bytes from broker: {e:?}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Recv::Timeout,
                Ok(Ok(0)) => {
                    return Recv::Closed {
                        error: None,
                        leftover: self.buf.len(),
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Recv::Closed {
                        error: Some(e.kind()),
                        leftover: self.buf.len(),
                    }
                }
            }
        }
    }

    /// The broker closes the connection (EOF or reset) within `WAIT`, with nothing else
    /// pending first except what `allow_before` bytes describe.
    pub async fn expect_closed(&mut self) {
        loop {
            match tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => panic!("connection not closed; buffered {:?}", &self.buf[..]),
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Nothing arrives within `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if !self.buf.is_empty() {
            panic!("unexpected buffered bytes {:?}", &self.buf[..]);
        }
        match tokio::time::timeout(d, self.stream.read_buf(&mut self.buf)).await {
            Err(_) => {}
            Ok(Ok(0)) => panic!("connection closed"),
            Ok(Ok(_)) => panic!("unexpected bytes {:?}", &self.buf[..]),
            Ok(Err(e)) => panic!("read error {e}"),
        }
    }
}

/// Outcome of `Raw::recv_within`.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // short-lived test value
pub enum Recv {
    /// A whole packet.
    Packet(Packet),
    /// Nothing complete arrived in time.
    Timeout,
    /// EOF (`error: None`) or a socket error such as a reset; `leftover` bytes of an
    /// incomplete packet were buffered.
    Closed {
        error: Option<std::io::ErrorKind>,
        leftover: usize,
    },
}

/// A 3.1.1 CONNECT frame.
pub fn connect_v311(client_id: &str, clean: bool, keep_alive: u16) -> Vec<u8> {
    let mut body = vec![
        0x00,
        0x04,
        b'M',
        b'Q',
        b'T',
        b'T',
        0x04,
        if clean { 0x02 } else { 0x00 },
    ];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    frame(0x10, &body)
}

/// A 3.1.1 CONNECT frame with a will.
pub fn connect_v311_will(
    client_id: &str,
    clean: bool,
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
) -> Vec<u8> {
    let mut flags = 0x04 | (qos << 3);
    if clean {
        flags |= 0x02;
    }
    if retain {
        flags |= 0x20;
    }
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags, 0x00, 0x3c];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    body.extend_from_slice(payload);
    frame(0x10, &body)
}

/// A fixed header (type/flags byte and remaining length) followed by `body`.
pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// A 3.1.1 PUBLISH frame.
pub fn publish(
    topic: &str,
    qos: u8,
    packet_id: u16,
    dup: bool,
    retain: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&packet_id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    let first = 0x30 | (u8::from(dup) << 3) | (qos << 1) | u8::from(retain);
    frame(first, &body)
}

/// A 3.1.1 SUBSCRIBE frame for one filter.
pub fn subscribe(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(qos);
    frame(0x82, &body)
}

/// A two-byte-id acknowledgement frame (PUBACK 0x40, PUBREC 0x50, PUBREL 0x62, PUBCOMP 0x70).
pub fn ack(first: u8, packet_id: u16) -> Vec<u8> {
    let [a, b] = packet_id.to_be_bytes();
    vec![first, 0x02, a, b]
}

/// Wait until `cond` holds, polling; fails the test after `WAIT`.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT 5.0 helpers (our codec as the client-side encoder/decoder).
// ---------------------------------------------------------------------------------------------

use tether::wire::packet::{
    ConnAck, Connect, ConnectProperties, Disconnect, Publish, PublishProperties, QoS, ReasonCode,
    RetainHandling, SubAck, Subscribe, SubscribeFilter, Will,
};

/// A v5 CONNECT with keep-alive 60 and no properties; adjust fields as needed.
pub fn v5_connect(client_id: &str, clean_start: bool) -> Connect {
    Connect {
        protocol: ProtocolVersion::V5,
        client_id: client_id.to_string(),
        clean_start,
        keep_alive: 60,
        username: None,
        password: None,
        will: None,
        properties: ConnectProperties::default(),
    }
}

/// A v5 CONNECT with a Session Expiry Interval.
pub fn v5_connect_expiry(client_id: &str, clean_start: bool, expiry: Option<u32>) -> Connect {
    let mut c = v5_connect(client_id, clean_start);
    c.properties.session_expiry_interval = expiry;
    c
}

/// A v5 will (QoS 1, not retained) with a Will Delay Interval.
pub fn v5_will(topic: &str, payload: &'static [u8], delay_interval: u32) -> Will {
    Will {
        topic: topic.to_string(),
        payload: bytes::Bytes::from_static(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        delay_interval,
        properties: PublishProperties::default(),
    }
}

/// A v5 subscription option set: the given QoS, all other options at their defaults.
pub fn v5_filter(filter: &str, qos: QoS) -> SubscribeFilter {
    SubscribeFilter {
        filter: filter.to_string(),
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: RetainHandling::OnSubscribe,
    }
}

/// A v5 PUBLISH with no properties.
pub fn v5_publish(topic: &str, qos: QoS, packet_id: u16, payload: &[u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.to_string(),
        packet_id,
        payload: bytes::Bytes::copy_from_slice(payload),
        properties: PublishProperties::default(),
    }
}

impl TestBroker {
    /// A v5 raw client that sent `connect`; returns it with the CONNACK it received.
    pub async fn connect_v5(&self, connect: Connect) -> (Raw, ConnAck) {
        let mut c = self.raw().await;
        c.version = ProtocolVersion::V5;
        c.send_packet(&Packet::Connect(Box::new(connect))).await;
        let ack = c.recv_connack().await;
        (c, ack)
    }

    /// A v5 raw client whose CONNECT was accepted with `session_present`.
    pub async fn v5_client(&self, connect: Connect, session_present: bool) -> Raw {
        let id = connect.client_id.clone();
        let (c, ack) = self.connect_v5(connect).await;
        assert_eq!(ack.reason, ReasonCode::SUCCESS, "CONNACK for {id}: {ack:?}");
        assert_eq!(
            ack.session_present, session_present,
            "Session Present for {id}: {ack:?}"
        );
        c
    }

    /// Wait until the session of `id` is parked offline.
    pub async fn wait_offline(&self, id: &str) {
        eventually(&format!("session {id} parked offline"), || {
            self.broker.registry.with_offline(id, |_| ()).is_some()
        })
        .await;
    }

    /// Wait until no session (online or offline) exists for anyone.
    pub async fn wait_registry_empty(&self) {
        eventually("registry empty", || self.broker.registry.is_empty()).await;
    }
}

impl Raw {
    /// The next packet must be a CONNACK.
    pub async fn recv_connack(&mut self) -> ConnAck {
        match self.recv_packet().await {
            Packet::ConnAck(a) => a,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// The next packet must be a PUBLISH.
    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv_packet().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// The next packet must be a SUBACK.
    pub async fn recv_suback(&mut self) -> SubAck {
        match self.recv_packet().await {
            Packet::SubAck(a) => a,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// The next packet must be a server DISCONNECT, followed by the connection closing with
    /// nothing after it.
    pub async fn expect_disconnect(&mut self) -> Disconnect {
        let d = match self.recv_packet().await {
            Packet::Disconnect(d) => d,
            other => panic!("expected DISCONNECT, got {other:?}"),
        };
        self.expect_closed().await;
        assert!(
            self.buf.is_empty(),
            "bytes after DISCONNECT: {:?}",
            &self.buf[..]
        );
        d
    }

    /// v5 SUBSCRIBE; returns the SUBACK (asserting it answers `packet_id`).
    pub async fn subscribe_v5(
        &mut self,
        packet_id: u16,
        filters: Vec<SubscribeFilter>,
        subscription_identifier: Option<u32>,
    ) -> SubAck {
        self.send_packet(&Packet::Subscribe(Subscribe {
            packet_id,
            filters,
            subscription_identifier,
            user_properties: vec![],
        }))
        .await;
        let ack = self.recv_suback().await;
        assert_eq!(ack.packet_id, packet_id);
        ack
    }

    /// v5 SUBSCRIBE to one filter, asserting the granted QoS.
    pub async fn sub_v5(&mut self, packet_id: u16, filter: &str, qos: QoS) {
        let ack = self
            .subscribe_v5(packet_id, vec![v5_filter(filter, qos)], None)
            .await;
        assert_eq!(ack.reasons, vec![ReasonCode(qos as u8)], "SUBACK {filter}");
    }

    /// v5 QoS 1 PUBLISH, waiting for its PUBACK.
    pub async fn pub1_v5(&mut self, p: Publish) {
        assert_eq!(p.qos, QoS::AtLeastOnce);
        let id = p.packet_id;
        self.send_packet(&Packet::Publish(p)).await;
        match self.recv_packet().await {
            Packet::PubAck(a) => assert_eq!(a.packet_id, id),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }

    /// Normal DISCONNECT (v5 reason 0x00) with an optional new Session Expiry Interval.
    pub async fn disconnect_v5(&mut self, reason: ReasonCode, session_expiry: Option<u32>) {
        self.send_packet(&Packet::Disconnect(Disconnect {
            reason,
            session_expiry_interval: session_expiry,
            ..Disconnect::default()
        }))
        .await;
    }
}

impl Raw {
    /// The next packet if one arrives within `d`; `None` on silence. Fails on a close.
    pub async fn recv_packet_within(&mut self, d: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            if let Some(p) =
                codec::decode(&mut self.buf, Some(self.version), usize::MAX).expect("decodable")
            {
                return Some(p);
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                .await
                .ok()?
                .expect("read");
            assert!(read > 0, "connection closed while waiting for a packet");
        }
    }
}

/// A v5 client on `addr` with Session Expiry `expiry`; asserts a successful CONNACK with
/// Session Present = `present`.
pub async fn v5_session(
    addr: SocketAddr,
    id: &str,
    clean: bool,
    expiry: u32,
    present: bool,
) -> Raw {
    let mut c = Raw::connect(addr).await;
    c.version = ProtocolVersion::V5;
    c.send_packet(&Packet::Connect(Box::new(v5_connect_expiry(
        id,
        clean,
        Some(expiry),
    ))))
    .await;
    let ack = c.recv_connack().await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS, "{id}: {ack:?}");
    assert_eq!(ack.session_present, present, "{id}: {ack:?}");
    c
}
