//! WebSocket listeners over real sockets: MQTT in both versions through tungstenite's client
//! (an independent WebSocket implementation), a packet split across frames and several packets
//! in one frame [MQTT-6.0.0-2], the refusals (path, subprotocol, no upgrade, text frames
//! [MQTT-6.0.0-1], oversize frames), mqtt.js under Node, and a page in headless Chromium.

mod common;

use std::process::Stdio;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use common::pki;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tether::config::{Config, ExtraListener, TransportKind};
use tether::wire::codec;
use tether::wire::packet::{Packet, ProtocolVersion, QoS, ReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

fn ws_config() -> Config {
    let mut config = Config::default();
    config.persistence.enabled = false;
    config.listener.transport = TransportKind::Ws;
    config.listener.allow_anonymous = Some(true);
    config.listener.max_packet_size = 4096;
    config
}

struct WsClient {
    ws: WebSocketStream<TcpStream>,
    buf: BytesMut,
    version: ProtocolVersion,
}

async fn ws_open(
    addr: std::net::SocketAddr,
    path: &str,
    protocol: Option<&str>,
) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    if let Some(p) = protocol {
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(p).expect("header"),
        );
    }
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await?;
    // [MQTT-6.0.0-4]: the server selects the mqtt subprotocol.
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok()),
        Some("mqtt")
    );
    Ok(WsClient {
        ws,
        buf: BytesMut::new(),
        version: ProtocolVersion::V311,
    })
}

impl WsClient {
    /// Send each slice as one binary frame.
    async fn frames(&mut self, frames: &[&[u8]]) {
        for f in frames {
            self.ws
                .send(Message::Binary(Bytes::copy_from_slice(f)))
                .await
                .expect("send");
        }
    }

    fn encode(&self, p: &Packet) -> Vec<u8> {
        let mut out = BytesMut::new();
        codec::encode(p, self.version, None, &mut out).expect("encode");
        out.to_vec()
    }

    async fn recv_packet(&mut self) -> Packet {
        loop {
            if let Some(p) =
                codec::decode(&mut self.buf, Some(self.version), usize::MAX).expect("decodable")
            {
                return p;
            }
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => self.buf.extend_from_slice(&b),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                other => panic!("expected a binary frame, got {other:?}"),
            }
        }
    }

    /// The broker ends the WebSocket (close frame, EOF or reset) within WAIT.
    async fn expect_closed(&mut self) {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Err(_) => panic!("WebSocket not closed"),
                Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return,
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

#[tokio::test]
async fn mqtt_over_websocket_with_split_and_coalesced_frames() {
    let b = TestBroker::with_config(ws_config()).await;
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut c = ws_open(b.addr, "/mqtt", Some("mqtt"))
            .await
            .expect("upgrade");
        c.version = version;
        let id = format!("ws-{version:?}");
        let connect = c.encode(&Packet::Connect(Box::new({
            let mut x = v5_connect(&id, true);
            x.protocol = version;
            x
        })));
        // One packet across three frames.
        let (a, rest) = connect.split_at(3);
        let (m, z) = rest.split_at(rest.len() / 2);
        c.frames(&[a, m, z]).await;
        let Packet::ConnAck(ack) = c.recv_packet().await else {
            panic!("expected CONNACK");
        };
        assert_eq!(ack.reason, ReasonCode::SUCCESS);

        // SUBSCRIBE and two PUBLISHes in one frame.
        let mut both = c.encode(&Packet::Subscribe(tether::wire::packet::Subscribe {
            packet_id: 1,
            filters: vec![v5_filter("ws/t", QoS::AtLeastOnce)],
            subscription_identifier: None,
            user_properties: vec![],
        }));
        both.extend(c.encode(&Packet::Publish(v5_publish(
            "ws/t",
            QoS::AtLeastOnce,
            2,
            b"one",
        ))));
        both.extend(c.encode(&Packet::Publish(v5_publish(
            "ws/t",
            QoS::AtMostOnce,
            0,
            b"two",
        ))));
        c.frames(&[&both]).await;
        let mut got = Vec::new();
        while got.len() < 2 {
            match c.recv_packet().await {
                Packet::Publish(p) => got.push(p.payload.clone()),
                Packet::SubAck(_) | Packet::PubAck(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            got,
            vec![Bytes::from_static(b"one"), Bytes::from_static(b"two")]
        );
    }
    b.stop().await;
}

fn ws_failures(b: &TestBroker) -> u64 {
    b.broker.stats.ws_handshake_failures.load(Ordering::Relaxed)
}

#[tokio::test]
async fn bad_upgrades_and_frames_close_only_that_connection() {
    let b = TestBroker::with_config(ws_config()).await;
    let mut bystander = ws_open(b.addr, "/mqtt", Some("mqtt"))
        .await
        .expect("upgrade");
    let connect = connect_v311("bystander", true, 60);
    bystander.frames(&[&connect]).await;
    assert!(matches!(bystander.recv_packet().await, Packet::ConnAck(_)));
    bystander.frames(&[&subscribe(1, "still/here", 0)]).await;
    assert!(matches!(bystander.recv_packet().await, Packet::SubAck(_)));

    // Wrong subprotocol, none at all, another path: HTTP errors, no upgrade.
    for (path, proto) in [
        ("/mqtt", Some("chat")),
        ("/mqtt", None),
        ("/other", Some("mqtt")),
    ] {
        let r = ws_open(b.addr, path, proto).await;
        assert!(r.is_err(), "upgrade accepted for {path} {proto:?}");
    }
    // "mqttv3.1" (MQTT 3.1 clients) is accepted too, answered as such.
    let mut req = format!("ws://{}/mqtt", b.addr)
        .into_client_request()
        .expect("req");
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("mqttv3.1"),
    );
    let tcp = TcpStream::connect(b.addr).await.expect("connect");
    let (_, resp) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("mqttv3.1");
    assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], "mqttv3.1");

    // An HTTP request that is not an upgrade.
    let mut s = TcpStream::connect(b.addr).await.expect("connect");
    s.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut reply))
        .await
        .expect("a request that is not an upgrade must be closed")
        .expect("read");
    eventually("4 failed upgrades counted", || ws_failures(&b) >= 4).await;

    let errors_before = b.broker.stats.protocol_errors.load(Ordering::Relaxed);
    // A text frame [MQTT-6.0.0-1].
    let mut c = ws_open(b.addr, "/mqtt", Some("mqtt"))
        .await
        .expect("upgrade");
    c.ws.send(Message::text("hello")).await.expect("send");
    c.expect_closed().await;
    // A frame over the packet size limit (4096 here).
    let mut c = ws_open(b.addr, "/mqtt", Some("mqtt"))
        .await
        .expect("upgrade");
    c.frames(&[&connect_v311("big", true, 60)]).await;
    assert!(matches!(c.recv_packet().await, Packet::ConnAck(_)));
    c.frames(&[&publish("still/here", 0, 0, false, false, &[7u8; 8000])])
        .await;
    c.expect_closed().await;
    eventually(
        "text and oversize frames counted as protocol errors",
        || b.broker.stats.protocol_errors.load(Ordering::Relaxed) >= errors_before + 2,
    )
    .await;

    // The bystander is still served.
    let mut p = ws_open(b.addr, "/mqtt", Some("mqtt"))
        .await
        .expect("upgrade");
    p.frames(&[&connect_v311("p", true, 60)]).await;
    assert!(matches!(p.recv_packet().await, Packet::ConnAck(_)));
    p.frames(&[&publish("still/here", 0, 0, false, false, b"yes")])
        .await;
    let Packet::Publish(m) = bystander.recv_packet().await else {
        panic!("expected PUBLISH");
    };
    assert_eq!(&m.payload[..], b"yes");
    b.stop().await;
}

fn browser_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

#[tokio::test]
async fn mqtt_js_under_node_over_websocket_in_both_versions() {
    if !outside::require(
        "mqtt_js_under_node_over_websocket_in_both_versions",
        "node",
        "Debian package nodejs",
    ) {
        return;
    }
    if !outside::require_browser_packages("mqtt_js_under_node_over_websocket_in_both_versions") {
        return;
    }
    assert!(
        browser_dir().join("node_modules/mqtt").exists(),
        "run `npm install --prefix tests/browser` (.ci/run does)"
    );
    let b = TestBroker::with_config(ws_config()).await;
    for version in ["4", "5"] {
        let out = tokio::process::Command::new("node")
            .arg(browser_dir().join("node_client.mjs"))
            .arg(b.addr.port().to_string())
            .arg(version)
            .output()
            .await
            .expect("node");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "mqtt.js v{version}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("RECEIVED node/{version} hello over websocket")),
            "{stdout}"
        );
    }
    b.stop().await;
}

#[tokio::test]
async fn a_page_in_headless_chromium_gets_a_message_from_mosquitto_pub() {
    if !outside::require(
        "a_page_in_headless_chromium_gets_a_message_from_mosquitto_pub",
        "node",
        "Debian package nodejs",
    ) {
        return;
    }
    if !outside::require(
        "a_page_in_headless_chromium_gets_a_message_from_mosquitto_pub",
        "chromium",
        "Debian package chromium",
    ) {
        return;
    }
    if !outside::require(
        "a_page_in_headless_chromium_gets_a_message_from_mosquitto_pub",
        "mosquitto_pub",
        "Debian package mosquitto-clients",
    ) {
        return;
    }
    if !outside::require_browser_packages(
        "a_page_in_headless_chromium_gets_a_message_from_mosquitto_pub",
    ) {
        return;
    }
    assert!(
        browser_dir().join("node_modules/playwright-core").exists(),
        "run `npm install --prefix tests/browser` (.ci/run does)"
    );
    let mut config = ws_config();
    let mut tcp = ExtraListener::plain("127.0.0.1:0".into());
    tcp.transport = TransportKind::Tcp;
    config.listeners.push(tcp);
    let b = TestBroker::with_listeners(config).await;
    let (ws_port, tcp_port) = (b.addrs[0].port(), b.addrs[1].port());

    let mut page = tokio::process::Command::new("node")
        .arg(browser_dir().join("run_browser.mjs"))
        .arg(ws_port.to_string())
        .arg("browser/test")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node");
    let stdout = page.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    use tokio::io::AsyncBufReadExt;
    let first = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
        .await
        .expect("page did not subscribe in time")
        .expect("read");
    assert_eq!(first.as_deref(), Some("SUBSCRIBED"), "{first:?}");

    // Async: the broker runs on this test's thread.
    let status = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &tcp_port.to_string()])
        .args([
            "-q",
            "1",
            "-t",
            "browser/test",
            "-m",
            "hello from mosquitto_pub",
        ])
        .status()
        .await
        .expect("mosquitto_pub (mosquitto-clients) must be installed");
    assert!(status.success());

    let result = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
        .await
        .expect("page showed no message in time")
        .expect("read");
    assert_eq!(
        result.as_deref(),
        Some("RESULT browser/test hello from mosquitto_pub")
    );
    assert!(page.wait().await.expect("wait").success());
    b.stop().await;
}

#[tokio::test]
async fn mqtt_over_websocket_over_tls() {
    let pki = pki::Pki::new("wss");
    let server = pki.server();
    let mut config = ws_config();
    config.listener.tls = Some(tether::config::TlsConfig {
        cert: server.cert.clone(),
        key: server.key.clone(),
        client_ca: None,
        require_client_cert: false,
        use_identity_as_username: false,
    });
    let b = TestBroker::with_config(config).await;
    let tls = pki::tls_connect(b.addr, pki.client_config(None))
        .await
        .expect("TLS");
    let mut req = format!("wss://localhost:{}/mqtt", b.addr.port())
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("upgrade over TLS");
    assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], "mqtt");
    ws.send(Message::Binary(Bytes::from(connect_v311("wss", true, 60))))
        .await
        .expect("send");
    ws.send(Message::Binary(Bytes::from(subscribe(1, "wss/t", 0))))
        .await
        .expect("send");
    ws.send(Message::Binary(Bytes::from(publish(
        "wss/t",
        0,
        0,
        false,
        false,
        b"secure ws",
    ))))
    .await
    .expect("send");
    let mut buf = BytesMut::new();
    let mut got = None;
    while got.is_none() {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Binary(m)))) => buf.extend_from_slice(&m),
            other => panic!("expected a binary frame, got {other:?}"),
        }
        while let Some(p) =
            codec::decode(&mut buf, Some(ProtocolVersion::V311), usize::MAX).expect("decodable")
        {
            if let Packet::Publish(p) = p {
                got = Some(p.payload);
            }
        }
    }
    assert_eq!(got.as_deref(), Some(&b"secure ws"[..]));
    b.stop().await;
}

#[tokio::test]
async fn anonymous_websocket_clients_follow_allow_anonymous() {
    for (allow, expected) in [
        // Unset on loopback: allowed, as for any listener.
        (None, ReasonCode::SUCCESS),
        (Some(false), ReasonCode::NOT_AUTHORIZED),
    ] {
        let mut config = ws_config();
        config.listener.allow_anonymous = allow;
        let b = TestBroker::with_config(config).await;
        let mut c = ws_open(b.addr, "/mqtt", Some("mqtt"))
            .await
            .expect("upgrade");
        c.frames(&[&connect_v311("page", true, 60)]).await;
        let Packet::ConnAck(ack) = c.recv_packet().await else {
            panic!("expected CONNACK");
        };
        assert_eq!(ack.reason, expected, "allow_anonymous = {allow:?}");
        b.stop().await;
    }
}

/// A client-to-server frame, masked as RFC 6455 section 5.3 requires; payloads under 126.
fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![(u8::from(fin) << 7) | opcode, 0x80 | payload.len() as u8];
    f.extend(mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[tokio::test]
async fn a_packet_in_a_fragmented_websocket_message_is_read() {
    let b = TestBroker::with_config(ws_config()).await;
    let mut s = TcpStream::connect(b.addr).await.expect("connect");
    s.write_all(
        b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(WAIT, s.read_exact(&mut byte))
            .await
            .expect("upgrade answer in time")
            .expect("read");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // CONNECT in one message of three frames: binary without FIN, two continuations.
    let connect = connect_v311("fragmented", true, 60);
    s.write_all(&masked_frame(false, 0x2, &connect[..4]))
        .await
        .expect("write");
    s.write_all(&masked_frame(false, 0x0, &connect[4..9]))
        .await
        .expect("write");
    s.write_all(&masked_frame(true, 0x0, &connect[9..]))
        .await
        .expect("write");
    let mut frame = [0u8; 6];
    tokio::time::timeout(WAIT, s.read_exact(&mut frame))
        .await
        .expect("CONNACK in time")
        .expect("read");
    // An unmasked binary frame of 4 bytes holding CONNACK, accepted.
    assert_eq!(frame, [0x82, 0x04, 0x20, 0x02, 0x00, 0x00]);
    b.stop().await;
}
