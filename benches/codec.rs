//! The wire codec on the hot path: decode and encode one PUBLISH (QoS 1, short topic, 64-byte
//! payload) for MQTT 3.1.1 and 5.0, plus a v5 PUBLISH carrying two properties.
//!
//! `cargo bench --bench codec [-- <filter>]`

#[path = "harness/mod.rs"]
mod harness;

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use harness::{black_box, Harness};
use tether::wire::codec;
use tether::wire::packet::{Packet, ProtocolVersion, Publish, PublishProperties, QoS};

const MAX_PACKET: usize = 1024 * 1024;

fn publish(properties: PublishProperties) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "sensors/room1/temp".to_string(),
        packet_id: 42,
        payload: Bytes::from((0..64u8).collect::<Vec<u8>>()),
        properties,
    })
}

fn encoded(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::encode(packet, version, None, &mut out).expect("encodes");
    out.to_vec()
}

fn bench_publish(h: &mut Harness, label: &str, packet: &Packet, version: ProtocolVersion) {
    let frame = encoded(packet, version);
    // The bench decodes what it encodes, and gets the same packet back.
    let mut check = BytesMut::from(&frame[..]);
    assert_eq!(
        codec::decode(&mut check, Some(version), MAX_PACKET).expect("decodes"),
        Some(packet.clone())
    );
    h.note(format!("{label}: {} bytes on the wire", frame.len()));

    let mut out = BytesMut::with_capacity(256);
    h.bench(&format!("encode {label}"), || {
        out.clear();
        codec::encode(black_box(packet), version, None, &mut out).expect("encodes")
    });

    // Frames back to back in one buffer, as a socket read leaves them; decode splits each
    // off (zero-copy payload) and the packet is dropped inside the timed loop.
    h.bench_custom(&format!("decode {label}"), 100_000, |n| {
        let mut buf = BytesMut::with_capacity(frame.len() * n as usize);
        for _ in 0..n {
            buf.extend_from_slice(&frame);
        }
        let start = Instant::now();
        for _ in 0..n {
            let packet = codec::decode(&mut buf, Some(version), MAX_PACKET).expect("decodes");
            black_box(packet.expect("complete frame"));
        }
        let elapsed = start.elapsed();
        assert!(buf.is_empty());
        elapsed
    });
}

fn main() {
    let Some(mut h) = Harness::from_args("codec") else {
        return;
    };
    let plain = publish(PublishProperties::default());
    bench_publish(
        &mut h,
        "3.1.1 PUBLISH qos1 64B",
        &plain,
        ProtocolVersion::V311,
    );
    bench_publish(&mut h, "5.0 PUBLISH qos1 64B", &plain, ProtocolVersion::V5);
    let with_props = publish(PublishProperties {
        message_expiry_interval: Some(300),
        content_type: Some("application/json".to_string()),
        ..Default::default()
    });
    bench_publish(
        &mut h,
        "5.0 PUBLISH qos1 64B +expiry +content-type",
        &with_props,
        ProtocolVersion::V5,
    );
    h.finish();
}
