//! Storage engine comparison for tether's write-ahead needs: a queue of message records
//! appended by many publishers, each batch made durable with one fsync (group commit), and
//! removed again when acknowledged. Each engine gets the same workload:
//! insert `batch` records of `RECORD` bytes, make them durable, delete the previous batch.
//!
//! `cargo run --release` (from benches/engine-compare). Writes to a temp directory.

use std::io::Write;
use std::time::{Duration, Instant};

const RECORD: usize = 120; // a small QoS 1 message: topic, 64-byte payload, header
const RUN: Duration = Duration::from_secs(3);

fn main() {
    let base = std::env::temp_dir().join(format!("engine-compare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let value = vec![7u8; RECORD];
    println!("| engine | batch (records per fsync) | records/s | fsyncs/s |");
    println!("| --- | --- | --- | --- |");
    for batch in [1usize, 16, 128, 1024] {
        for (name, f) in [
            ("append-only log", log as fn(&std::path::Path, usize, &[u8]) -> (u64, u64)),
            ("redb 2.6", redb_run),
            ("fjall 2.11", fjall_run),
        ] {
            let dir = base.join(format!("{name}-{batch}").replace(' ', "_"));
            std::fs::create_dir_all(&dir).unwrap();
            let (n, commits) = f(&dir, batch, &value);
            println!(
                "| {name} | {batch} | {:.0} | {:.0} |",
                n as f64 / RUN.as_secs_f64(),
                commits as f64 / RUN.as_secs_f64()
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}

fn log(dir: &std::path::Path, batch: usize, value: &[u8]) -> (u64, u64) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .unwrap();
    let (mut n, mut commits, mut key) = (0u64, 0u64, 0u64);
    let mut buf = Vec::with_capacity(batch * (RECORD + 32));
    let start = Instant::now();
    while start.elapsed() < RUN {
        buf.clear();
        for _ in 0..batch {
            // enqueue record: len, crc, key, value ...
            buf.extend_from_slice(&(value.len() as u32 + 8).to_le_bytes());
            buf.extend_from_slice(&0u32.to_le_bytes());
            buf.extend_from_slice(&key.to_le_bytes());
            buf.extend_from_slice(value);
            // ... and the ack of the previous batch's record
            buf.extend_from_slice(&8u32.to_le_bytes());
            buf.extend_from_slice(&0u32.to_le_bytes());
            buf.extend_from_slice(&key.wrapping_sub(batch as u64).to_le_bytes());
            key += 1;
        }
        f.write_all(&buf).unwrap();
        f.sync_data().unwrap();
        n += batch as u64;
        commits += 1;
    }
    (n, commits)
}

const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("q");

fn redb_run(dir: &std::path::Path, batch: usize, value: &[u8]) -> (u64, u64) {
    let db = redb::Database::create(dir.join("db")).unwrap();
    let (mut n, mut commits, mut key) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < RUN {
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(T).unwrap();
            for _ in 0..batch {
                t.insert(key, value).unwrap();
                if key >= batch as u64 {
                    t.remove(key - batch as u64).unwrap();
                }
                key += 1;
            }
        }
        txn.commit().unwrap();
        n += batch as u64;
        commits += 1;
    }
    (n, commits)
}

fn fjall_run(dir: &std::path::Path, batch: usize, value: &[u8]) -> (u64, u64) {
    let ks = fjall::Config::new(dir.join("ks")).open().unwrap();
    let p = ks
        .open_partition("q", fjall::PartitionCreateOptions::default())
        .unwrap();
    let (mut n, mut commits, mut key) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < RUN {
        for _ in 0..batch {
            p.insert(key.to_be_bytes(), value).unwrap();
            if key >= batch as u64 {
                p.remove((key - batch as u64).to_be_bytes()).unwrap();
            }
            key += 1;
        }
        ks.persist(fjall::PersistMode::SyncData).unwrap();
        n += batch as u64;
        commits += 1;
    }
    (n, commits)
}
