//! Fan-out through the shared PUBLISH encoding, black box: one publisher, 50 subscribers of
//! both protocol versions and every QoS, some with Subscription Identifiers, Retain As
//! Published or topic aliases (which take the per-subscriber encoder beside the shared one),
//! messages with and without properties and expiry, short and long payloads (copied, or sent
//! from the message's buffer). Every subscriber gets every message exactly once, in order,
//! with its exact payload, flags and properties. Long payloads also reach TLS, WebSocket and
//! WebSocket-over-TLS subscribers intact (those transports copy them into their own records
//! and frames).
mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tether::config::{Config, ExtraListener, TlsConfig, TransportKind};
use tether::wire::codec;
use tether::wire::packet::{
    Ack, Connect, ConnectProperties, Packet, ProtocolVersion, Publish, PublishProperties, QoS,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const TOPIC: &str = "fan/shared";
const SUBSCRIBERS: usize = 50;
const MESSAGES: usize = 240;
const QOS: [QoS; 3] = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];

/// What subscriber `i` asked for.
#[derive(Clone, Copy, Debug)]
struct Sub {
    v5: bool,
    qos: QoS,
    subscription_id: Option<u32>,
    retain_as_published: bool,
    aliases: bool,
}

fn sub(i: usize) -> Sub {
    let v5 = i % 2 == 1;
    Sub {
        v5,
        qos: QOS[i % 3],
        subscription_id: (v5 && i % 5 == 1).then_some(i as u32 + 100),
        retain_as_published: v5 && i % 4 == 3,
        aliases: v5 && i % 7 == 3,
    }
}

/// Message `n`: its QoS, retain flag, payload and properties.
fn message(n: usize) -> Publish {
    let len = match n % 5 {
        0 => 20,
        1 => 1023,
        2 => 1024,
        3 => 3000,
        _ if n % 40 == 4 => 70_000,
        _ => 600,
    };
    let mut payload = (n as u32).to_be_bytes().to_vec();
    payload.extend((4..len).map(|k| (n * 31 + k * 7) as u8));
    let properties = PublishProperties {
        message_expiry_interval: (n % 3 == 0).then_some(3600),
        user_properties: if n % 2 == 0 {
            vec![("n".into(), n.to_string())]
        } else {
            vec![]
        },
        content_type: (n % 6 == 1).then(|| "application/x-test".into()),
        ..PublishProperties::default()
    };
    Publish {
        dup: false,
        qos: QOS[(n / 2) % 3],
        retain: n % 10 == 7,
        topic: TOPIC.into(),
        packet_id: if QOS[(n / 2) % 3] == QoS::AtMostOnce {
            0
        } else {
            (n % 60_000 + 1) as u16
        },
        payload: Bytes::from(payload),
        properties,
    }
}

async fn subscriber(b: &TestBroker, i: usize, s: Sub) -> Raw {
    let id = format!("fan-sub-{i}");
    if !s.v5 {
        let mut c = b.raw().await;
        c.send(&connect_v311(&id, true, 60)).await;
        c.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
        c.send(&subscribe(1, TOPIC, s.qos as u8)).await;
        c.expect_bytes(&[0x90, 0x03, 0x00, 0x01, s.qos as u8]).await;
        return c;
    }
    let connect = Connect {
        properties: ConnectProperties {
            topic_alias_maximum: s.aliases.then_some(4),
            ..ConnectProperties::default()
        },
        ..v5_connect(&id, true)
    };
    let mut c = b.v5_client(connect, false).await;
    let mut filter = v5_filter(TOPIC, s.qos);
    filter.retain_as_published = s.retain_as_published;
    let ack = c.subscribe_v5(1, vec![filter], s.subscription_id).await;
    assert_eq!(ack.reasons.len(), 1);
    assert!(ack.reasons[0].is_success());
    c
}

/// Read every message, acknowledging each as its QoS asks, and check it against what was
/// published; then nothing more may come.
async fn receive(mut c: Raw, i: usize, s: Sub) {
    let mut aliases: HashMap<u16, String> = HashMap::new();
    let mut next = 0;
    while next < MESSAGES {
        let mut p = match c.recv_packet().await {
            Packet::Publish(p) => p,
            Packet::PubRel(a) => {
                c.send_packet(&Packet::PubComp(Ack::new(a.packet_id))).await;
                continue;
            }
            other => panic!("subscriber {i}: unexpected {other:?}"),
        };
        let sent = message(next);
        let n = u32::from_be_bytes(p.payload[..4].try_into().expect("4 bytes")) as usize;
        assert_eq!(
            n, next,
            "subscriber {i} ({s:?}): lost, duplicated or reordered"
        );
        assert_eq!(p.payload, sent.payload, "subscriber {i}: payload of {n}");
        assert_eq!(p.qos, sent.qos.min(s.qos), "subscriber {i}: QoS of {n}");
        assert!(!p.dup, "subscriber {i}: DUP on a first delivery of {n}");
        assert_eq!(
            p.retain,
            sent.retain && s.retain_as_published,
            "subscriber {i}: RETAIN of {n}"
        );
        if let Some(alias) = p.properties.topic_alias.take() {
            assert!(s.aliases, "subscriber {i}: an alias it did not ask for");
            if p.topic.is_empty() {
                p.topic = aliases.get(&alias).cloned().expect("alias mapped before");
            } else {
                aliases.insert(alias, p.topic.clone());
            }
        }
        assert_eq!(p.topic, TOPIC, "subscriber {i}: topic of {n}");
        let mut props = p.properties.clone();
        if s.v5 {
            assert_eq!(
                props.subscription_identifiers,
                s.subscription_id.into_iter().collect::<Vec<_>>(),
                "subscriber {i}: Subscription Identifiers of {n}"
            );
            props.subscription_identifiers.clear();
            if let Some(left) = props.message_expiry_interval {
                assert!(
                    sent.properties.message_expiry_interval.is_some()
                        && left <= 3600
                        && left > 3500,
                    "subscriber {i}: expiry {left} on {n}"
                );
            }
            props.message_expiry_interval = sent.properties.message_expiry_interval;
            assert_eq!(props, sent.properties, "subscriber {i}: properties of {n}");
        } else {
            assert_eq!(props, PublishProperties::default());
        }
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => c.send_packet(&Packet::PubAck(Ack::new(p.packet_id))).await,
            QoS::ExactlyOnce => c.send_packet(&Packet::PubRec(Ack::new(p.packet_id))).await,
        }
        next += 1;
    }
    // The last QoS 2 flows end with PUBREL; after them nothing but silence.
    loop {
        match c.recv_packet_within(Duration::from_millis(300)).await {
            None => break,
            Some(Packet::PubRel(a)) => c.send_packet(&Packet::PubComp(Ack::new(a.packet_id))).await,
            Some(other) => panic!("subscriber {i}: after the last message, {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_50_mixed_subscribers_loses_duplicates_and_reorders_nothing() {
    let b = TestBroker::start().await;
    let mut readers = Vec::new();
    for i in 0..SUBSCRIBERS {
        let s = sub(i);
        let c = subscriber(&b, i, s).await;
        readers.push(tokio::spawn(receive(c, i, s)));
    }
    let mut publisher = b.v5_client(v5_connect("fan-pub", true), false).await;
    assert_eq!(publisher.version, ProtocolVersion::V5);
    for n in 0..MESSAGES {
        let p = message(n);
        let (qos, id) = (p.qos, p.packet_id);
        publisher.send_packet(&Packet::Publish(p)).await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => match publisher.recv_packet().await {
                Packet::PubAck(a) => assert_eq!(a.packet_id, id),
                other => panic!("expected PUBACK, got {other:?}"),
            },
            QoS::ExactlyOnce => {
                match publisher.recv_packet().await {
                    Packet::PubRec(a) => assert_eq!(a.packet_id, id),
                    other => panic!("expected PUBREC, got {other:?}"),
                }
                publisher.send_packet(&Packet::PubRel(Ack::new(id))).await;
                match publisher.recv_packet().await {
                    Packet::PubComp(a) => assert_eq!(a.packet_id, id),
                    other => panic!("expected PUBCOMP, got {other:?}"),
                }
            }
        }
    }
    for r in readers {
        tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("a subscriber did not get everything in time")
            .expect("subscriber checks");
    }
    b.stop().await;
}

/// A subscriber on any transport: a raw byte stream (TCP, TLS), or WebSocket binary messages.
enum Client {
    Raw(Raw),
    Ws(Box<dyn WsIo>, BytesMut),
}

trait WsIo:
    futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
    + futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
    + Unpin
    + Send
{
}
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> WsIo for WebSocketStream<S> {}

impl Client {
    async fn send(&mut self, bytes: &[u8]) {
        match self {
            Client::Raw(r) => r.send(bytes).await,
            Client::Ws(ws, _) => ws
                .send(Message::Binary(Bytes::copy_from_slice(bytes)))
                .await
                .expect("send"),
        }
    }

    async fn recv_packet(&mut self) -> Packet {
        match self {
            Client::Raw(r) => r.recv_packet().await,
            Client::Ws(ws, buf) => loop {
                if let Some(p) =
                    codec::decode(buf, Some(ProtocolVersion::V311), usize::MAX).expect("decodable")
                {
                    return p;
                }
                match tokio::time::timeout(WAIT, ws.next()).await {
                    Ok(Some(Ok(Message::Binary(b)))) => buf.extend_from_slice(&b),
                    Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                    other => panic!("expected a binary frame, got {other:?}"),
                }
            },
        }
    }
}

async fn ws_client<S>(stream: S, port: u16, scheme: &str) -> Client
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut req = format!("{scheme}://localhost:{port}/mqtt")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let (ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .expect("upgrade");
    Client::Ws(Box::new(ws), BytesMut::new())
}

const LONG: [usize; 4] = [300, 5000, 70_000, 300_000];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_payloads_reach_tls_and_websocket_subscribers_intact() {
    let pki = common::pki::Pki::new("fanout-shared");
    let server = pki.server();
    let tls = TlsConfig {
        cert: server.cert.clone(),
        key: server.key.clone(),
        client_ca: None,
        require_client_cert: false,
        use_identity_as_username: false,
    };
    let mut config = Config::default();
    config.persistence.enabled = false;
    let extra = |transport, tls: Option<TlsConfig>| {
        let mut l = ExtraListener::plain("127.0.0.1:0".into());
        l.transport = transport;
        l.tls = tls;
        l.allow_anonymous = Some(true);
        l
    };
    config.listeners = vec![
        extra(TransportKind::Tcp, Some(tls.clone())),
        extra(TransportKind::Ws, None),
        extra(TransportKind::Ws, Some(tls)),
    ];
    let b = TestBroker::with_listeners(config).await;
    let (tls_addr, ws_addr, wss_addr) = (b.addrs[1], b.addrs[2], b.addrs[3]);

    let tls_stream = || async {
        common::pki::tls_connect(tls_addr, pki.client_config(None))
            .await
            .expect("TLS")
    };
    let mut clients = [
        Client::Raw(Raw::over(tls_stream().await)),
        ws_client(
            TcpStream::connect(ws_addr).await.expect("connect"),
            ws_addr.port(),
            "ws",
        )
        .await,
        ws_client(
            common::pki::tls_connect(wss_addr, pki.client_config(None))
                .await
                .expect("TLS"),
            wss_addr.port(),
            "wss",
        )
        .await,
        Client::Raw(b.raw().await),
    ];
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&connect_v311(&format!("long-{i}"), true, 60)).await;
        assert!(matches!(c.recv_packet().await, Packet::ConnAck(_)));
        c.send(&subscribe(1, "long/t", 1)).await;
        assert!(matches!(c.recv_packet().await, Packet::SubAck(_)));
    }
    let mut publisher = b.raw().await;
    publisher.send(&connect_v311("long-pub", true, 60)).await;
    publisher.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    let payload = |n: usize| -> Vec<u8> {
        (0..LONG[n % LONG.len()])
            .map(|k| (n * 13 + k * 7 + k / 251) as u8)
            .collect()
    };
    const COUNT: usize = 12;
    for n in 0..COUNT {
        publisher
            .send(&publish(
                "long/t",
                1,
                n as u16 + 1,
                false,
                false,
                &payload(n),
            ))
            .await;
        publisher.expect_bytes(&ack(0x40, n as u16 + 1)).await;
    }
    for (i, c) in clients.iter_mut().enumerate() {
        for n in 0..COUNT {
            let Packet::Publish(p) = c.recv_packet().await else {
                panic!("client {i}: expected PUBLISH");
            };
            assert_eq!(p.payload, payload(n), "client {i}: message {n}");
            c.send(&ack(0x40, p.packet_id)).await;
        }
    }
    b.stop().await;
}
