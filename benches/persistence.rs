//! QoS 1 throughput to persistent sessions, end to end over TCP on loopback: tether with
//! persistence on (fsync = always), tether with persistence off, and Mosquitto with
//! persistence on (its other settings at their defaults), side by side.
//!
//! Workload: `SUBS` persistent subscribers (3.1.1, Clean Session 0, QoS 1 on `bench/#`,
//! acknowledging every PUBLISH) and `PUBLISHERS` publishers (default 1) pipelining `MESSAGES`
//! (default 200,000) QoS 1 PUBLISHes of 64 bytes between them, each with up to a window
//! (`WINDOWS`) unacknowledged. Measured: from the first PUBLISH until the last PUBACK reached
//! its publisher and every subscriber received every message. Each broker runs `REPEAT` times
//! (default 1) in turn and the median is reported; `ONLY=on,off,mosquitto` picks brokers.
//!
//! `cargo bench --bench persistence` (cargo builds the tether binary it starts;
//! Mosquitto at /usr/sbin/mosquitto, skipped if absent). Run as a test (`cargo nextest run
//! --all-targets`) it does nothing: it starts brokers and takes seconds.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SUBS: usize = 4;
/// Messages per run (`MESSAGES` in the environment overrides it).
const DEFAULT_MESSAGES: usize = 200_000;
/// Publisher windows measured: group commit can only share an fsync among the messages in
/// flight, so a small window measures fsync latency and a large one throughput.
const WINDOWS: [usize; 2] = [100, 1000];
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
    // Cargo builds the binary for benches and names its path.
    let tether = env!("CARGO_BIN_EXE_tether").to_string();
    let base = std::env::temp_dir().join(format!("tether-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("temp dir");
    for window in WINDOWS {
        measure(&tether, &base, window);
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// One table: tether with persistence on and off, and Mosquitto, at one publisher window,
/// each run `REPEAT` times in turn (on, off, Mosquitto, on, ...) and reported by its median:
/// on a shared 2-core machine single runs vary by a quarter.
fn measure(tether: &str, base: &std::path::Path, window: usize) {
    let n = messages();
    let repeat = env_number("REPEAT").unwrap_or(1);
    println!(
        "{SUBS} persistent QoS 1 subscribers, {} publisher(s), {n} QoS 1 messages of {PAYLOAD} B, \
         publisher window {window}, median of {repeat}",
        publishers()
    );
    println!("| broker | messages/s (publisher acked, all delivered) | runs |");
    println!("| --- | --- | --- |");
    let brokers: Vec<&str> = ["on", "off", "mosquitto"]
        .into_iter()
        .filter(|b| wanted(b))
        .filter(|b| *b != "mosquitto" || std::path::Path::new("/usr/sbin/mosquitto").exists())
        .collect();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); brokers.len()];
    for _ in 0..repeat {
        for (i, b) in brokers.iter().enumerate() {
            let port = free_port();
            let child = match *b {
                "mosquitto" => start_mosquitto(base, port),
                b => start_tether(tether, base, port, b == "on"),
            };
            rates[i].push(run(port, child, window));
        }
    }
    let median = |r: &[f64]| {
        let mut r = r.to_vec();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    for (b, r) in brokers.iter().zip(&rates) {
        let name = match *b {
            "on" => "tether, persistence on (fsync always)",
            "off" => "tether, persistence off",
            _ => "mosquitto 2, persistence true",
        };
        let runs: Vec<String> = r.iter().map(|x| format!("{x:.0}")).collect();
        println!("| {name} | {:.0} | {} |", median(r), runs.join(", "));
    }
    if let (Some(on), Some(off)) = (
        brokers.iter().position(|b| *b == "on"),
        brokers.iter().position(|b| *b == "off"),
    ) {
        let ratios: Vec<f64> = rates[on]
            .iter()
            .zip(&rates[off])
            .map(|(a, b)| a / b)
            .collect();
        println!(
            "\npersistence on / off: {:.0}% (median of the runs' ratios)\n",
            median(&ratios) * 100.0
        );
    }
}

fn start_tether(tether: &str, base: &std::path::Path, port: u16, persist: bool) -> Child {
    let dir = base.join(if persist { "on" } else { "off" });
    // Every run starts empty: no recovery of the last run's log.
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = base.join(format!("{}.toml", if persist { "on" } else { "off" }));
    std::fs::write(
        &cfg,
        format!(
            "[session]\nmax_queued_messages = 1000000\nmax_queued_bytes = 1000000000\n\
             [persistence]\nenabled = {persist}\n[log]\nlevel = \"warn\"\n"
        ),
    )
    .expect("config");
    Command::new(tether)
        .args(["-b", &format!("127.0.0.1:{port}"), "-c"])
        .arg(&cfg)
        .arg("-d")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{tether}: {e}"))
}

fn start_mosquitto(base: &std::path::Path, port: u16) -> Child {
    let dir = base.join("mosquitto");
    let _ = std::fs::remove_dir_all(&dir);
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
    Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto")
}

/// A positive number from the environment.
fn env_number(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
}

/// Messages per run.
fn messages() -> usize {
    env_number("MESSAGES").unwrap_or(DEFAULT_MESSAGES)
}

/// Publisher connections (`PUBLISHERS` in the environment; default 1), sharing the messages.
fn publishers() -> usize {
    env_number("PUBLISHERS").unwrap_or(1)
}

/// Whether broker `name` (`on`, `off`, `mosquitto`) is measured: all unless `ONLY` lists some.
fn wanted(name: &str) -> bool {
    std::env::var("ONLY").map_or(true, |v| v.split(',').any(|x| x == name))
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
/// Bytes read from a socket and not yet parsed. The consumed prefix is dropped only once per
/// read, not per packet: shifting a 64 KiB buffer for every 80-byte packet made this client,
/// not the broker, the bottleneck.
#[derive(Default)]
struct Buf {
    data: Vec<u8>,
    start: usize,
}

impl Buf {
    /// Header length and body length of the packet at the front, if it is complete.
    fn complete(&self) -> Option<(usize, usize)> {
        let b = &self.data[self.start..];
        let (mut len, mut mult, mut i) = (0usize, 1usize, 1);
        while i < b.len() && i < 5 {
            len += (b[i] & 0x7f) as usize * mult;
            mult *= 128;
            i += 1;
            if b[i - 1] & 0x80 == 0 {
                return (b.len() >= i + len).then_some((i, len));
            }
        }
        None
    }
}

fn read_packet(s: &mut TcpStream, buf: &mut Buf) -> (u8, Vec<u8>) {
    loop {
        if let Some((head, len)) = buf.complete() {
            let at = buf.start;
            let first = buf.data[at];
            let body = buf.data[at + head..at + head + len].to_vec();
            buf.start += head + len;
            return (first, body);
        }
        buf.data.drain(..buf.start);
        buf.start = 0;
        let mut tmp = [0u8; 65536];
        let n = s.read(&mut tmp).expect("read");
        assert!(n > 0, "broker closed the connection");
        buf.data.extend_from_slice(&tmp[..n]);
    }
}

/// Send `count` QoS 1 PUBLISHes on `p`, at most `window` unacknowledged, and read every
/// PUBACK.
fn publish(mut p: TcpStream, mut buf: Buf, count: usize, window: usize) {
    let mut reader = p.try_clone().expect("clone");
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(window);
    let acks = std::thread::spawn(move || {
        for _ in 0..count {
            let (first, _) = read_packet(&mut reader, &mut buf);
            assert_eq!(first, 0x40, "expected PUBACK");
            let _ = rx.recv();
        }
    });
    let payload = vec![b'x'; PAYLOAD];
    // PUBLISHes are written in batches: as many as the window admits right now (up to 64),
    // then one write; the batch is flushed before blocking on a full window.
    let mut batch = Vec::new();
    for i in 0..count {
        if tx.try_send(()).is_err() {
            p.write_all(&batch).expect("publish");
            batch.clear();
            tx.send(()).expect("window");
        }
        let mut body = Vec::with_capacity(PAYLOAD + 16);
        body.extend_from_slice(&(7u16).to_be_bytes());
        body.extend_from_slice(b"bench/t");
        body.extend_from_slice(&((i % 65535) as u16 + 1).to_be_bytes());
        body.extend_from_slice(&payload);
        batch.extend_from_slice(&frame(0x32, &body));
        if batch.len() >= 64 * (PAYLOAD + 16) {
            p.write_all(&batch).expect("publish");
            batch.clear();
        }
    }
    p.write_all(&batch).expect("publish");
    acks.join().expect("acks");
}

/// The broker of one run, killed (by its own pid) when the run ends, also when it panics.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(port: u16, child: Child, window: usize) -> f64 {
    let _broker = Running(child);
    let n = messages();
    // Subscribers: persistent sessions, subscribed, then reading and acknowledging.
    let mut subs = Vec::new();
    for i in 0..SUBS {
        let mut s = connect(port);
        let mut buf = Buf::default();
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
            let mut acks = Vec::new();
            while got < n {
                let (first, body) = read_packet(&mut s, &mut buf);
                if first & 0xF0 == 0x30 {
                    got += 1;
                    let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
                    acks.extend_from_slice(&[0x40, 2, body[2 + tlen], body[3 + tlen]]);
                }
                // PUBACKs go out in one write once nothing complete is buffered (before
                // blocking on the socket again), as a real client's event loop would.
                if buf.complete().is_none() && !acks.is_empty() {
                    s.write_all(&acks).expect("puback");
                    acks.clear();
                }
            }
        }));
    }
    // Publishers: connected first, then all started together.
    let publishers = publishers();
    let go = std::sync::Arc::new(std::sync::Barrier::new(publishers + 1));
    let pubs: Vec<_> = (0..publishers)
        .map(|k| {
            let count = n / publishers + usize::from(k < n % publishers);
            let go = go.clone();
            let mut p = connect(port);
            let mut buf = Buf::default();
            p.write_all(&connect_packet(&format!("bench-pub-{k}"), true))
                .expect("write");
            read_packet(&mut p, &mut buf);
            std::thread::spawn(move || {
                go.wait();
                publish(p, buf, count, window)
            })
        })
        .collect();
    go.wait();
    let started = Instant::now();
    for p in pubs {
        p.join().expect("publisher");
    }
    if std::env::var_os("TIMES").is_some() {
        eprintln!("  publishers acked all after {:?}", started.elapsed());
    }
    for s in subs {
        s.join().expect("subscriber");
    }
    let secs = started.elapsed().as_secs_f64();
    n as f64 / secs
}
