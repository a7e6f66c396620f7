//! QoS 1 throughput to persistent sessions, end to end over TCP on loopback: tether with
//! persistence on (fsync = always), tether with persistence off, and Mosquitto with
//! persistence on (its other settings at their defaults), side by side.
//!
//! Workload: `SUBS` persistent subscribers (3.1.1, Clean Session 0, QoS 1 on `bench/#`,
//! acknowledging every PUBLISH) and one publisher pipelining `MESSAGES` QoS 1 PUBLISHes of 64
//! bytes with up to `WINDOW` unacknowledged. Measured: from the first PUBLISH until the last
//! PUBACK reached the publisher and every subscriber received every message.
//!
//! `cargo build --release && cargo bench --bench persistence` (needs target/release/tether;
//! Mosquitto at /usr/sbin/mosquitto, skipped if absent). Run as a test (`cargo nextest run
//! --all-targets`) it does nothing: it starts brokers and takes seconds.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SUBS: usize = 4;
const MESSAGES: usize = 50_000;
const WINDOW: usize = 100;
const PAYLOAD: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        // cargo-nextest's discovery: one test, not ignored.
        if !args.iter().any(|a| a == "--ignored") {
            println!("smoke: test");
        }
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        println!("persistence bench: run with `cargo bench --bench persistence` (skipped)");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let tether = format!("{root}/target/release/tether");
    let base = std::env::temp_dir().join(format!("tether-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("temp dir");
    println!("{SUBS} persistent QoS 1 subscribers, {MESSAGES} QoS 1 messages of {PAYLOAD} B, publisher window {WINDOW}");
    println!("| broker | messages/s (publisher acked, all delivered) |");
    println!("| --- | --- |");
    let mut results = Vec::new();
    for (name, persist) in [
        ("tether, persistence on (fsync always)", true),
        ("tether, persistence off", false),
    ] {
        let port = free_port();
        let dir = base.join(if persist { "on" } else { "off" });
        let cfg = base.join(format!("{}.toml", if persist { "on" } else { "off" }));
        std::fs::write(
            &cfg,
            format!(
                "[session]\nmax_queued_messages = 1000000\nmax_queued_bytes = 1000000000\n\
                 [persistence]\nenabled = {persist}\n[log]\nlevel = \"warn\"\n"
            ),
        )
        .expect("config");
        let child = Command::new(&tether)
            .args(["-b", &format!("127.0.0.1:{port}"), "-c"])
            .arg(&cfg)
            .arg("-d")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{tether}: {e} (cargo build --release first)"));
        let rate = run(name, port, child);
        results.push((name, rate));
    }
    if std::path::Path::new("/usr/sbin/mosquitto").exists() {
        let port = free_port();
        let dir = base.join("mosquitto");
        std::fs::create_dir_all(&dir).expect("dir");
        let cfg = base.join("mosquitto.conf");
        // persistence on; queue limits raised like tether's so nothing is dropped.
        std::fs::write(
            &cfg,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nmax_queued_messages 1000000\n",
                dir.display()
            ),
        )
        .expect("config");
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto");
        let rate = run("mosquitto", port, child);
        results.push(("mosquitto 2, persistence true", rate));
    }
    let _ = std::fs::remove_dir_all(&base);
    if let [(_, on), (_, off), ..] = results[..] {
        println!("\npersistence on / off: {:.0}%", on / off * 100.0);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

fn connect(port: u16) -> TcpStream {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => {
                s.set_nodelay(true).expect("nodelay");
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .expect("timeout");
                return s;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("connect: {e}"),
        }
    }
}

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn connect_packet(id: &str, clean: bool) -> Vec<u8> {
    let mut body = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        if clean { 2 } else { 0 },
        0,
        60,
    ];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    frame(0x10, &body)
}

/// Read one packet: (first byte, body).
fn read_packet(s: &mut TcpStream, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        if buf.len() >= 2 {
            let (mut len, mut mult, mut i) = (0usize, 1usize, 1);
            let mut complete = false;
            while i < buf.len() && i < 5 {
                len += (buf[i] & 0x7f) as usize * mult;
                mult *= 128;
                i += 1;
                if buf[i - 1] & 0x80 == 0 {
                    complete = true;
                    break;
                }
            }
            if complete && buf.len() >= i + len {
                let first = buf[0];
                let body = buf[i..i + len].to_vec();
                buf.drain(..i + len);
                return (first, body);
            }
        }
        let mut tmp = [0u8; 65536];
        let n = s.read(&mut tmp).expect("read");
        assert!(n > 0, "broker closed the connection");
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn run(name: &str, port: u16, mut child: Child) -> f64 {
    // Subscribers: persistent sessions, subscribed, then reading and acknowledging.
    let mut subs = Vec::new();
    for i in 0..SUBS {
        let mut s = connect(port);
        let mut buf = Vec::new();
        s.write_all(&connect_packet(&format!("bench-sub-{i}"), false))
            .expect("write");
        read_packet(&mut s, &mut buf);
        let mut body = vec![0, 1];
        body.extend_from_slice(&(7u16).to_be_bytes());
        body.extend_from_slice(b"bench/#");
        body.push(1);
        s.write_all(&frame(0x82, &body)).expect("write");
        read_packet(&mut s, &mut buf);
        subs.push(std::thread::spawn(move || {
            let mut got = 0;
            while got < MESSAGES {
                let (first, body) = read_packet(&mut s, &mut buf);
                if first & 0xF0 == 0x30 {
                    got += 1;
                    let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
                    let pid = [body[2 + tlen], body[3 + tlen]];
                    s.write_all(&[0x40, 2, pid[0], pid[1]]).expect("puback");
                }
            }
        }));
    }
    let mut p = connect(port);
    let mut buf = Vec::new();
    p.write_all(&connect_packet("bench-pub", true))
        .expect("write");
    read_packet(&mut p, &mut buf);
    let mut reader = p.try_clone().expect("clone");
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(WINDOW);
    let started = Instant::now();
    let acks = std::thread::spawn(move || {
        for _ in 0..MESSAGES {
            let (first, _) = read_packet(&mut reader, &mut buf);
            assert_eq!(first, 0x40, "expected PUBACK");
            let _ = rx.recv();
        }
    });
    let payload = vec![b'x'; PAYLOAD];
    for i in 0..MESSAGES {
        tx.send(()).expect("window");
        let mut body = Vec::with_capacity(PAYLOAD + 16);
        body.extend_from_slice(&(7u16).to_be_bytes());
        body.extend_from_slice(b"bench/t");
        body.extend_from_slice(&((i % 65535) as u16 + 1).to_be_bytes());
        body.extend_from_slice(&payload);
        p.write_all(&frame(0x32, &body)).expect("publish");
    }
    acks.join().expect("acks");
    for s in subs {
        s.join().expect("subscriber");
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = MESSAGES as f64 / secs;
    println!("| {name} | {rate:.0} |");
    let _ = child.kill();
    let _ = child.wait();
    rate
}
