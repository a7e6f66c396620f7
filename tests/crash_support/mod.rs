//! A pipelined QoS 1/2 publisher that SIGKILLs the broker in the middle of its stream, shared
//! by the crash tests (`persistence_crash.rs`, `persistence_faults.rs`). Needs the including
//! test crate's `bin_support` and `common` modules.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tether::wire::codec;
use tether::wire::packet::{Ack, Packet, ProtocolVersion, Publish, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::bin_support::signal;
use crate::common;

/// What `publish_until_killed` sends, and when it kills.
pub struct Pipeline<'a> {
    /// Its Client ID (Clean Session 1).
    pub client_id: &'a str,
    /// Topic prefix: message `i` goes to `{topic}/{i % topics}`.
    pub topic: &'a str,
    /// How many topics the messages are spread over.
    pub topics: u32,
    /// Most messages sent (the kill normally cuts the stream short).
    pub messages: u32,
    /// Unacknowledged messages at most.
    pub window: usize,
    /// Acknowledgements before the kill.
    pub kill_at: usize,
}

/// `p` in the wire format of `v`.
pub fn encode(p: &Packet, v: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    codec::encode(p, v, None, &mut out).expect("encode");
    out
}

/// A 3.1.1 publisher pipelining alternate QoS 1 / QoS 2 messages (payload: their index) to
/// `{topic}/{i % topics}`, at most `window` unacknowledged: publishes until the connection
/// dies, and SIGKILLs `pid` once `kill_at` acknowledgements were received and `ready()`
/// (checked every 10 ms from then on) says so; publishing goes on meanwhile, so the moment is
/// not tied to its reads. Returns index -> QoS of every acknowledged message, and whether the
/// kill was sent.
pub async fn publish_until_killed(
    port: u16,
    pid: u32,
    p: &Pipeline<'_>,
    ready: impl Fn() -> bool,
) -> (HashMap<u32, QoS>, bool) {
    let (kill_at, messages, window_size, topic, topics) = (
        p.kill_at,
        p.messages,
        p.window,
        p.topic.to_string(),
        p.topics,
    );
    let mut checked = std::time::Instant::now() - Duration::from_secs(1);
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (mut rd, wr) = stream.into_split();
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    let v = ProtocolVersion::V311;
    wr.lock()
        .await
        .write_all(&common::connect_v311(p.client_id, true, 60))
        .await
        .expect("send CONNECT");
    let mut buf = BytesMut::new();
    loop {
        if let Some(p) = codec::decode(&mut buf, Some(v), usize::MAX).expect("decode") {
            assert!(matches!(p, Packet::ConnAck(_)), "{p:?}");
            break;
        }
        assert!(rd.read_buf(&mut buf).await.expect("read") > 0);
    }

    let window = Arc::new(tokio::sync::Semaphore::new(window_size));
    let ids: Arc<Mutex<HashMap<u16, (u32, QoS)>>> = Arc::default();
    let writer = {
        let (wr, window, ids) = (wr.clone(), window.clone(), ids.clone());
        tokio::spawn(async move {
            for i in 0..messages {
                let Ok(permit) = window.clone().acquire_owned().await else {
                    return;
                };
                permit.forget();
                let qos = if i % 2 == 0 {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                };
                let packet_id = (i % 60_000) as u16 + 1;
                ids.lock().expect("ids").insert(packet_id, (i, qos));
                let p = Packet::Publish(Publish {
                    dup: false,
                    qos,
                    retain: false,
                    topic: format!("{topic}/{}", i % topics),
                    packet_id,
                    payload: i.to_string().into(),
                    properties: Default::default(),
                });
                if wr.lock().await.write_all(&encode(&p, v)).await.is_err() {
                    return;
                }
            }
        })
    };

    let mut acked = HashMap::new();
    let mut killed = false;
    loop {
        while let Ok(Some(p)) = codec::decode(&mut buf, Some(v), usize::MAX) {
            match p {
                Packet::PubAck(a) => {
                    if let Some((i, q)) = ids.lock().expect("ids").remove(&a.packet_id) {
                        acked.insert(i, q);
                    }
                    window.add_permits(1);
                }
                Packet::PubRec(a) => {
                    if let Some(&(i, q)) = ids.lock().expect("ids").get(&a.packet_id) {
                        acked.insert(i, q);
                    }
                    let rel = encode(&Packet::PubRel(Ack::new(a.packet_id)), v);
                    let _ = wr.lock().await.write_all(&rel).await;
                }
                Packet::PubComp(a) => {
                    ids.lock().expect("ids").remove(&a.packet_id);
                    window.add_permits(1);
                }
                other => panic!("publisher got {other:?}"),
            }
        }
        if !killed && acked.len() >= kill_at && checked.elapsed() >= Duration::from_millis(10) && {
            checked = std::time::Instant::now();
            assert!(
                acked.len() < kill_at + 200_000,
                "not ready to be killed after 200,000 more messages"
            );
            ready()
        } {
            killed = true;
            // Publishing goes on while kill(1) runs: the moment is not tied to our reads.
            tokio::task::spawn_blocking(move || signal(pid, "-KILL"));
        }
        match tokio::time::timeout(Duration::from_secs(20), rd.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => break,
            Err(_) => panic!("publisher: no progress for 20 s (acked {})", acked.len()),
        }
    }
    window.close();
    writer.abort();
    (acked, killed)
}
