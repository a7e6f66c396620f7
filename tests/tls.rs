//! TLS listeners over real sockets, with a CA made in the test: MQTT over TLS in both
//! protocol versions, TLS 1.1 and wrong CAs refused, mutual TLS with the certificate CN as
//! username, certificate reload, and bad input on TLS and plain ports.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::pki::{self, Pair, Pki};
use common::*;
use tether::config::{Config, TlsConfig};
use tether::wire::packet::{Packet, ProtocolVersion, QoS, ReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn tls_config(server: &Pair) -> TlsConfig {
    TlsConfig {
        cert: server.cert.clone(),
        key: server.key.clone(),
        client_ca: None,
        require_client_cert: false,
        use_identity_as_username: false,
    }
}

async fn tls_broker(tls: TlsConfig) -> TestBroker {
    let mut config = Config::default();
    config.persistence.enabled = false;
    config.listener.tls = Some(tls);
    TestBroker::with_config(config).await
}

async fn tls_raw(b: &TestBroker, pki: &Pki, identity: Option<&Pair>) -> Raw {
    let s = pki::tls_connect(b.addr, pki.client_config(identity))
        .await
        .expect("TLS handshake");
    Raw::over(s)
}

fn tls_failures(b: &TestBroker) -> u64 {
    b.broker
        .stats
        .tls_handshake_failures
        .load(Ordering::Relaxed)
}

#[tokio::test]
async fn mqtt_over_tls_in_both_versions() {
    let pki = Pki::new("tls-basic");
    let b = tls_broker(tls_config(&pki.server())).await;

    let mut sub = tls_raw(&b, &pki, None).await;
    sub.send(&connect_v311("sub", true, 60)).await;
    sub.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    sub.send(&subscribe(1, "tls/#", 1)).await;
    sub.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x01]).await;

    let mut publisher = tls_raw(&b, &pki, None).await;
    publisher.version = ProtocolVersion::V5;
    publisher
        .send_packet(&Packet::Connect(Box::new(v5_connect("pub", true))))
        .await;
    assert_eq!(publisher.recv_connack().await.reason, ReasonCode::SUCCESS);
    publisher
        .pub1_v5(v5_publish("tls/a", QoS::AtLeastOnce, 7, b"over tls"))
        .await;

    let Packet::Publish(p) = sub.recv_packet().await else {
        panic!("expected PUBLISH");
    };
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("tls/a", &b"over tls"[..])
    );
    b.stop().await;
}

#[tokio::test]
async fn persistent_session_over_tls_gets_what_was_published_while_away() {
    let pki = Pki::new("tls-session");
    let b = tls_broker(tls_config(&pki.server())).await;
    let mut dev = tls_raw(&b, &pki, None).await;
    dev.send(&connect_v311("device", false, 60)).await;
    dev.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    dev.send(&subscribe(1, "cmd/device", 1)).await;
    dev.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x01]).await;
    drop(dev);
    b.wait_offline("device").await;

    let mut p = tls_raw(&b, &pki, None).await;
    p.send(&connect_v311("controller", true, 60)).await;
    p.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    for i in 1..=20u16 {
        p.send(&publish("cmd/device", 1, i, false, false, &i.to_be_bytes()))
            .await;
        p.expect_bytes(&ack(0x40, i)).await;
    }

    // [MQTT-3.1.2-4]: the session resumes with everything queued while it was away.
    let mut dev = tls_raw(&b, &pki, None).await;
    dev.send(&connect_v311("device", false, 60)).await;
    dev.expect_bytes(&[0x20, 0x02, 0x01, 0x00]).await;
    for i in 1..=20u16 {
        let Packet::Publish(m) = dev.recv_packet().await else {
            panic!("expected PUBLISH {i}");
        };
        assert_eq!(&m.payload[..], &i.to_be_bytes());
        dev.send(&ack(0x40, m.packet_id)).await;
    }
    b.stop().await;
}

#[tokio::test]
async fn a_client_that_trusts_another_ca_is_refused_and_others_are_served() {
    let pki = Pki::new("tls-ca");
    let other = Pki::new("tls-other-ca");
    let b = tls_broker(tls_config(&pki.server())).await;
    let err = pki::tls_connect(b.addr, other.client_config(None))
        .await
        .expect_err("certificate from an unknown CA accepted");
    assert!(err.to_string().contains("certificate"), "{err}");
    eventually("the failed handshake is counted", || tls_failures(&b) >= 1).await;
    let mut ok = tls_raw(&b, &pki, None).await;
    ok.send(&connect_v311("fine", true, 60)).await;
    ok.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    b.stop().await;
}

/// A TLS 1.1 ClientHello (no extensions, one TLS 1.1-era suite).
fn client_hello_tls11() -> Vec<u8> {
    let mut hello = vec![0x03, 0x02]; // client_version TLS 1.1
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x02, 0x00, 0x2f]); // TLS_RSA_WITH_AES_128_CBC_SHA
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut hs = vec![0x01, 0x00];
    hs.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    hs.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x02];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

#[tokio::test]
async fn tls_1_1_is_refused_with_an_alert() {
    let pki = Pki::new("tls-old");
    let b = tls_broker(tls_config(&pki.server())).await;
    let mut s = TcpStream::connect(b.addr).await.expect("connect");
    s.write_all(&client_hello_tls11()).await.expect("write");
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut reply)).await;
    // An alert record (content type 21), then the close: no handshake continues.
    assert_eq!(reply.first(), Some(&0x15), "reply {reply:?}");
    eventually("counted", || tls_failures(&b) >= 1).await;
    b.stop().await;
}

#[tokio::test]
async fn bad_input_on_tls_and_plain_ports_closes_only_that_connection() {
    let pki = Pki::new("tls-bad");
    let b = tls_broker(tls_config(&pki.server())).await;
    let plain = TestBroker::start().await;

    // Someone we keep serving meanwhile.
    let mut bystander = tls_raw(&b, &pki, None).await;
    bystander.send(&connect_v311("bystander", true, 60)).await;
    bystander.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    bystander.send(&subscribe(1, "still/here", 0)).await;
    bystander
        .expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x00])
        .await;

    // A plain MQTT client on the TLS port.
    let mut c = Raw::connect(b.addr).await;
    c.send(&connect_v311("plain-on-tls", true, 60)).await;
    c.expect_closed().await;
    // Garbage where a ClientHello belongs.
    let mut c = Raw::connect(b.addr).await;
    c.send(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00])
        .await;
    c.expect_closed().await;
    eventually("both counted", || tls_failures(&b) >= 2).await;
    let metrics = tether::ops::admin::prometheus(&tether::ops::admin::figures(&b.broker).await);
    assert!(
        metrics.contains("tether_handshake_failures_total{transport=\"tls\"} 2\n"),
        "{metrics}"
    );

    // A TLS client on a plain port: its ClientHello is not a CONNECT.
    let err = pki::tls_connect(plain.addr, pki.client_config(None)).await;
    assert!(err.is_err(), "TLS handshake succeeded against a plain port");
    eventually("plain port counts a protocol error", || {
        plain.broker.stats.protocol_errors.load(Ordering::Relaxed) >= 1
    })
    .await;

    let mut p = tls_raw(&b, &pki, None).await;
    p.send(&connect_v311("p", true, 60)).await;
    p.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    p.send(&publish("still/here", 0, 0, false, false, b"yes"))
        .await;
    let Packet::Publish(m) = bystander.recv_packet().await else {
        panic!("expected PUBLISH");
    };
    assert_eq!(&m.payload[..], b"yes");
    plain.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_stalled_handshake_is_bounded_by_the_connect_timeout() {
    let pki = Pki::new("tls-stall");
    let mut config = Config::default();
    config.persistence.enabled = false;
    config.listener.connect_timeout_secs = 1;
    config.listener.tls = Some(tls_config(&pki.server()));
    let b = TestBroker::with_config(config).await;
    let mut c = Raw::connect(b.addr).await;
    // Half a record header, then nothing.
    c.send(&[0x16, 0x03]).await;
    let started = std::time::Instant::now();
    c.expect_closed().await;
    assert!(started.elapsed() < Duration::from_secs(4));
    eventually("counted", || tls_failures(&b) >= 1).await;
    b.stop().await;
}

fn mtls_config(pki: &Pki, server: &Pair, identity: bool) -> TlsConfig {
    TlsConfig {
        client_ca: Some(pki.ca.clone()),
        require_client_cert: true,
        use_identity_as_username: identity,
        ..tls_config(server)
    }
}

#[tokio::test]
async fn mutual_tls_requires_a_certificate_from_the_client_ca() {
    let pki = Pki::new("mtls");
    let other = Pki::new("mtls-other");
    let b = tls_broker(mtls_config(&pki, &pki.server(), false)).await;

    // Without a certificate: the handshake fails (TLS 1.3 reports it on the first read).
    match pki::tls_connect(b.addr, pki.client_config(None)).await {
        Err(_) => {}
        Ok(s) => {
            let mut c = Raw::over(s);
            c.send(&connect_v311("nocert", true, 60)).await;
            c.expect_closed().await;
        }
    }
    // A certificate from another CA: refused too.
    let foreign = other.client("intruder");
    match pki::tls_connect(b.addr, pki.client_config(Some(&foreign))).await {
        Err(_) => {}
        Ok(s) => {
            let mut c = Raw::over(s);
            c.send(&connect_v311("intruder", true, 60)).await;
            c.expect_closed().await;
        }
    }
    eventually("both counted", || tls_failures(&b) >= 2).await;

    let mut c = tls_raw(&b, &pki, Some(&pki.client("device-1"))).await;
    c.send(&connect_v311("device-1", true, 60)).await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    b.stop().await;
}

#[tokio::test]
async fn certificate_cn_becomes_the_username_for_acl_patterns() {
    let pki = Pki::new("mtls-cn");
    let acl = pki.dir.join("acl");
    std::fs::write(&acl, "pattern readwrite devices/%u/#\n").expect("acl");
    let mut config = Config::default();
    config.persistence.enabled = false;
    config.listener.tls = Some(mtls_config(&pki, &pki.server(), true));
    config.auth.acl_file = Some(acl);
    let b = TestBroker::with_config(config).await;

    let mut c = tls_raw(&b, &pki, Some(&pki.client("sensor-9"))).await;
    // The CONNECT's username is ignored: the certificate says who this is.
    c.version = ProtocolVersion::V5;
    let mut connect = v5_connect("anything", true);
    connect.username = Some("someone-else".into());
    c.send_packet(&Packet::Connect(Box::new(connect))).await;
    assert_eq!(c.recv_connack().await.reason, ReasonCode::SUCCESS);
    let ack = c
        .subscribe_v5(
            1,
            vec![
                v5_filter("devices/sensor-9/#", QoS::AtMostOnce),
                v5_filter("devices/someone-else/#", QoS::AtMostOnce),
            ],
            None,
        )
        .await;
    assert_eq!(
        ack.reasons,
        vec![ReasonCode::SUCCESS, ReasonCode::NOT_AUTHORIZED]
    );
    b.stop().await;
}

#[tokio::test]
async fn sighup_reload_serves_the_new_certificate_and_keeps_open_connections() {
    let first = Pki::new("reload-1");
    let second = Pki::new("reload-2");
    let server = first.server();
    // The broker reads these paths; the reload replaces their contents.
    let live = Pair {
        cert: first.dir.join("live.crt"),
        key: first.dir.join("live.key"),
    };
    std::fs::copy(&server.cert, &live.cert).expect("copy");
    std::fs::copy(&server.key, &live.key).expect("copy");
    let b = tls_broker(tls_config(&live)).await;

    let mut old = pki::tls_connect(b.addr, first.client_config(None))
        .await
        .map(Raw::over)
        .expect("first CA");
    old.send(&connect_v311("old", true, 60)).await;
    old.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    old.send(&subscribe(1, "r", 0)).await;
    old.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x00]).await;

    // A bad file keeps the running certificate.
    std::fs::write(&live.cert, "not a certificate").expect("write");
    b.broker.reload_files(&b.broker.config.auth);
    pki::tls_connect(b.addr, first.client_config(None))
        .await
        .expect("old certificate kept after a bad reload");

    let next = second.server();
    std::fs::copy(&next.cert, &live.cert).expect("copy");
    std::fs::copy(&next.key, &live.key).expect("copy");
    b.broker.reload_files(&b.broker.config.auth);

    assert!(
        pki::tls_connect(b.addr, first.client_config(None))
            .await
            .is_err(),
        "old certificate still served after reload"
    );
    let mut new = pki::tls_connect(b.addr, second.client_config(None))
        .await
        .map(Raw::over)
        .expect("new certificate");
    new.send(&connect_v311("new", true, 60)).await;
    new.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    new.send(&publish("r", 0, 0, false, false, b"after reload"))
        .await;
    let Packet::Publish(m) = old.recv_packet().await else {
        panic!("expected PUBLISH");
    };
    assert_eq!(&m.payload[..], b"after reload");
    b.stop().await;
}
