//! The store on a real directory: how `Message` records are shared within a log file and
//! written again in the next one, and that compaction and recovery keep every queued message.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::frame::{self, Block, FileKind};
use super::record::{self, Record};
use super::{Opened, Store};
use crate::config::{FsyncPolicy, StoreConfig};
use crate::session::journal::{self, ImageKind, Journal, SessionImage, SessionJournal};
use crate::testutil::delivery;
use crate::wire::message::{Delivery, Message};
use crate::wire::packet::{ProtocolVersion, QoS};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        TempDir(
            std::env::temp_dir().join(format!("tether-store-{tag}-{}-{nanos}", std::process::id())),
        )
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(dir: &Path) -> Opened {
    Store::open(StoreConfig {
        dir: dir.to_path_buf(),
        fsync: FsyncPolicy::Never,
        fsync_interval: Duration::from_millis(100),
        segment_bytes: 4096,
    })
    .expect("open")
}

fn session(store: &Arc<Store>, id: &str) -> SessionJournal {
    let j: Arc<dyn Journal> = store.clone();
    let log = SessionJournal::attach(&j);
    log.image(
        ImageKind::Created,
        SessionImage {
            client_id: id.into(),
            incarnation: log.incarnation().expect("attached"),
            protocol: ProtocolVersion::V311,
            expiry_interval: 3600,
            disconnected_at: Some(1),
            will: None,
            subscriptions: vec![],
        },
    );
    log
}

fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every record of every log file in `dir`, by file number and kind.
fn files(dir: &Path) -> Vec<(u64, FileKind, Vec<Record>)> {
    let mut out = Vec::new();
    for (n, path) in super::list(dir).expect("list") {
        let data = std::fs::read(path).expect("read");
        let kind = frame::parse_header(&data).expect("header");
        let mut recs = Vec::new();
        let mut at = frame::HEADER_LEN;
        while let Block::Ok(body, len) = frame::next_block(&data[at..]) {
            for r in record::records(body) {
                recs.push(record::decode(r.expect("record")).expect("decode"));
            }
            at += len;
        }
        out.push((n, kind, recs));
    }
    out
}

fn message_records(recs: &[Record]) -> usize {
    recs.iter()
        .filter(|r| matches!(r, Record::Message { .. }))
        .count()
}

/// Appends small records until the writer has started a new file.
fn roll(store: &Arc<Store>, dir: &Path, filler: &SessionJournal) {
    let before = super::list(dir).expect("list").len();
    let mut seq = 1_000_000;
    until("a new log file", || {
        for _ in 0..100 {
            filler.done(seq);
            seq += 1;
        }
        let lsn = synced(store);
        until("durable", || store.durable_lsn() >= lsn);
        super::list(dir).expect("list").len() > before
            || files(dir).iter().any(|f| f.1 == FileKind::Snapshot)
    });
}

/// Appends a record with `sync` and returns its LSN.
fn synced(store: &Store) -> u64 {
    super::take_sync_mark();
    store.append(&Record::RetainDel("x".into()), true);
    super::take_sync_mark()
}

fn queued(d: &Delivery, seq: u64) -> Delivery {
    Delivery { seq, ..d.clone() }
}

#[test]
fn a_message_is_written_once_per_file_and_survives_compaction() {
    let dir = TempDir::new("shared");
    let opened = open(&dir.0);
    let store = opened.store;
    let (a, b, c) = (
        session(&store, "a"),
        session(&store, "b"),
        session(&store, "c"),
    );
    let filler = session(&store, "filler");
    let d = Delivery {
        msg: Arc::new(Message {
            payload: Bytes::from(vec![b'p'; 200]),
            ..(*delivery(QoS::AtLeastOnce, b"").msg).clone()
        }),
        ..delivery(QoS::AtLeastOnce, b"")
    };
    // Two sessions in one file: one message record, two entries referring to it.
    a.enqueued(&queued(&d, 1));
    b.enqueued(&queued(&d, 1));
    roll(&store, &dir.0, &filler);
    // The same message in the next file is written there again.
    c.enqueued(&queued(&d, 1));
    let lsn = synced(&store);
    until("durable", || store.durable_lsn() >= lsn);
    let logs = files(&dir.0);
    assert_eq!(message_records(&logs[0].2), 1, "{:?}", logs[0].2);
    assert_eq!(message_records(&logs[1].2), 1, "{:?}", logs[1].2);

    // a and b finish; more files make the writer compact the closed ones into a snapshot,
    // which keeps only c's entry (and its message).
    a.done(1);
    b.done(1);
    for _ in 0..3 {
        roll(&store, &dir.0, &filler);
    }
    until("a snapshot", || {
        files(&dir.0).iter().any(|f| f.1 == FileKind::Snapshot)
    });
    store.close();
    drop(store);

    let reopened = open(&dir.0);
    let s = |id| reopened.state.by_client(id).expect("session");
    assert!(s("a").queue.is_empty() && s("b").queue.is_empty());
    let entry = &s("c").queue[&1];
    assert_eq!(entry.delivery.msg.payload, d.msg.payload);
    assert_eq!(entry.delivery.qos, QoS::AtLeastOnce);
    assert_eq!(reopened.state.missing_messages, 0);
    assert!(reopened.dropped.is_empty(), "{:?}", reopened.dropped);
}

/// A snapshot numbers the messages it holds anew: two files may use the same id for
/// different messages (ids restart in every file), and both must come back intact.
#[test]
fn snapshot_keeps_messages_of_equal_ids_from_different_files_apart() {
    let dir = TempDir::new("ids");
    let first = Delivery {
        msg: Arc::new(Message {
            payload: Bytes::from_static(b"first"),
            ..(*delivery(QoS::AtLeastOnce, b"").msg).clone()
        }),
        ..delivery(QoS::AtLeastOnce, b"")
    };
    let second = Delivery {
        msg: Arc::new(Message {
            payload: Bytes::from_static(b"second"),
            ..(*first.msg).clone()
        }),
        ..first.clone()
    };
    {
        let store = open(&dir.0).store;
        session(&store, "a").enqueued(&queued(&first, 1));
        store.close();
    }
    {
        // A restart writes to a new file, whose ids start again at 1.
        let opened = open(&dir.0);
        let store = opened.store;
        let b = session(&store, "b");
        b.enqueued(&queued(&second, 1));
        let filler = session(&store, "filler");
        for _ in 0..3 {
            roll(&store, &dir.0, &filler);
        }
        until("a snapshot", || {
            files(&dir.0).iter().any(|f| f.1 == FileKind::Snapshot)
        });
        store.close();
    }
    let state = open(&dir.0).state;
    assert_eq!(
        &state.by_client("a").expect("a").queue[&1]
            .delivery
            .msg
            .payload[..],
        b"first"
    );
    assert_eq!(
        &state.by_client("b").expect("b").queue[&1]
            .delivery
            .msg
            .payload[..],
        b"second"
    );
}

/// Inside a batch scope, appends without sync wait in the thread's batch (consecutive Done
/// records as one range); a sync append and the end of the scope hand them over, so the log
/// keeps the order of the appends.
#[test]
fn a_batch_keeps_the_order_of_appends() {
    let dir = TempDir::new("batch");
    let store = open(&dir.0).store;
    let a = session(&store, "a");
    let before = synced(&store);
    {
        let _batch = journal::batch(&*store);
        a.done(1);
        a.done(2);
        until("durable", || store.durable_lsn() >= before);
        assert_eq!(store.shared.lock().lsn, before, "batched, not yet appended");
        a.inbound(5, true);
        assert_eq!(
            store.shared.lock().lsn,
            before + 2,
            "one range, one inbound"
        );
        a.done(3);
    }
    let lsn = synced(&store);
    until("durable", || store.durable_lsn() >= lsn);
    let recs: Vec<Record> = files(&dir.0).into_iter().flat_map(|f| f.2).collect();
    let tail: Vec<&Record> = recs
        .iter()
        .filter(|r| !matches!(r, Record::Session(_) | Record::RetainDel(_)))
        .collect();
    let inc = a.incarnation().expect("attached");
    assert_eq!(
        tail,
        [
            &Record::DoneRange {
                incarnation: inc,
                first: 1,
                count: 2
            },
            &Record::Inbound {
                incarnation: inc,
                packet_id: 5,
                added: true
            },
            &Record::Done {
                incarnation: inc,
                seq: 3
            },
        ]
    );
}

fn meta(client_id: &str, incarnation: u64) -> Record {
    Record::Session(Box::new(SessionImage {
        client_id: client_id.into(),
        incarnation,
        protocol: ProtocolVersion::V5,
        expiry_interval: 60,
        disconnected_at: None,
        will: None,
        subscriptions: vec![],
    }))
}

fn enqueue(incarnation: u64, seq: u64, msg: u64) -> Record {
    Record::Enqueue {
        incarnation,
        seq,
        msg,
        qos: QoS::ExactlyOnce,
        retain: false,
        subscription_ids: vec![3],
    }
}

/// Replay follows sessions by incarnation: a new one replaces the Client ID's old session,
/// records of the old one are ignored, and an entry whose message is not in its file is
/// counted, not invented.
#[test]
fn replay_follows_incarnations() {
    let mut st = super::state::State::default();
    st.apply(meta("a", 1));
    st.apply(Record::Message {
        id: 1,
        msg: delivery(QoS::ExactlyOnce, b"m").msg,
    });
    st.apply(enqueue(1, 1, 1));
    assert_eq!(st.by_client("a").expect("a").queue.len(), 1);
    st.apply(meta("a", 2));
    st.apply(enqueue(1, 2, 1));
    let a = st.by_client("a").expect("a");
    assert_eq!(a.meta.incarnation, 2);
    assert!(a.queue.is_empty(), "the new incarnation starts empty");
    st.apply(enqueue(2, 7, 1));
    st.apply(Record::Sent {
        incarnation: 2,
        seq: 7,
        packet_id: 9,
        state: crate::session::OutState::AwaitPubRec,
    });
    let e = &st.by_client("a").expect("a").queue[&7];
    assert_eq!(e.sent, Some((9, crate::session::OutState::AwaitPubRec)));
    assert_eq!(e.delivery.subscription_ids, [3]);
    st.apply(Record::SessionEnd { incarnation: 1 });
    assert!(
        st.by_client("a").is_some(),
        "an old incarnation's end is ignored"
    );
    st.apply(enqueue(2, 8, 42));
    assert_eq!(st.missing_messages, 1);
    st.end_file(&[]).expect("end of file");
    st.apply(enqueue(2, 9, 1));
    assert_eq!(
        st.missing_messages, 2,
        "messages do not carry over to the next file"
    );
    st.apply(Record::SessionEnd { incarnation: 2 });
    assert!(st.by_client("a").is_none() && st.sessions.is_empty());
}

/// A message is decoded at the end of its file, and only if an entry still holds it: a
/// finished one is never decoded, an undecodable one still queued is an error.
#[test]
fn messages_are_decoded_only_for_entries_still_queued() {
    let mut good = Vec::new();
    record::encode_record(
        &Record::Message {
            id: 1,
            msg: delivery(QoS::AtLeastOnce, b"kept").msg,
        },
        &mut good,
    );
    let data = [&good[..], b"\xff\xff garbage"].concat();
    let body = |payload_at: usize, len: usize| {
        let (id, at) = record::message_record(&data[payload_at..payload_at + len])
            .expect("a message record")
            .expect("id");
        (id, payload_at + at, payload_at + len)
    };
    // `good` is [len][payload]; its payload starts at 1 (short record).
    let (id, start, end) = body(1, good.len() - 1);
    let mut st = super::state::State::default();
    st.apply(meta("a", 1));
    st.raw_message(id, start, end);
    st.raw_message(2, good.len(), data.len());
    st.apply(enqueue(1, 1, 1));
    st.apply(enqueue(1, 2, 2));
    st.apply(Record::Done {
        incarnation: 1,
        seq: 2,
    });
    st.end_file(&data)
        .expect("the garbage one is finished, never decoded");
    let e = &st.by_client("a").expect("a").queue[&1];
    assert_eq!(&e.delivery.msg.payload[..], b"kept");

    st.raw_message(2, good.len(), data.len());
    st.apply(enqueue(1, 3, 2));
    assert!(st.end_file(&data).is_err(), "a queued message must decode");
}

/// Consecutive Sent records of one session (ids wrapping past 65,535) and consecutive Done
/// records become ranges; a gap, another session or another state starts a new record; and
/// replaying the ranges gives what the single records would.
#[test]
fn runs_of_sent_and_done_become_ranges() {
    use crate::session::OutState::{AwaitPubAck, AwaitPubRec};
    let dir = TempDir::new("runs");
    let store = open(&dir.0).store;
    let (a, b) = (session(&store, "a"), session(&store, "b"));
    let d = delivery(QoS::AtLeastOnce, b"m");
    {
        let _batch = journal::batch(&*store);
        for seq in 1..=6 {
            a.enqueued(&queued(&d, seq));
        }
        b.enqueued(&queued(&d, 1));
    }
    {
        let _batch = journal::batch(&*store);
        a.in_flight(1, 65_534, AwaitPubAck);
        a.in_flight(2, 65_535, AwaitPubAck);
        a.in_flight(3, 1, AwaitPubAck);
        a.in_flight(4, 2, AwaitPubRec); // another state
        b.in_flight(1, 3, AwaitPubAck); // another session
        a.in_flight(5, 9, AwaitPubAck); // not the next id
        a.done(1);
        a.done(2);
        a.done(4); // a gap
    }
    let lsn = synced(&store);
    until("durable", || store.durable_lsn() >= lsn);
    let recs: Vec<Record> = files(&dir.0).into_iter().flat_map(|f| f.2).collect();
    let (ia, ib) = (
        a.incarnation().expect("attached"),
        b.incarnation().expect("attached"),
    );
    let runs: Vec<&Record> = recs
        .iter()
        .filter(|r| {
            matches!(
                r,
                Record::Sent { .. }
                    | Record::SentRange { .. }
                    | Record::Done { .. }
                    | Record::DoneRange { .. }
            )
        })
        .collect();
    assert_eq!(
        runs,
        [
            &Record::SentRange {
                incarnation: ia,
                first: 1,
                count: 3,
                packet_id: 65_534,
                state: AwaitPubAck
            },
            &Record::Sent {
                incarnation: ia,
                seq: 4,
                packet_id: 2,
                state: AwaitPubRec
            },
            &Record::Sent {
                incarnation: ib,
                seq: 1,
                packet_id: 3,
                state: AwaitPubAck
            },
            &Record::Sent {
                incarnation: ia,
                seq: 5,
                packet_id: 9,
                state: AwaitPubAck
            },
            &Record::DoneRange {
                incarnation: ia,
                first: 1,
                count: 2
            },
            &Record::Done {
                incarnation: ia,
                seq: 4
            },
        ]
    );
    store.close();
    drop(store);
    let state = open(&dir.0).state;
    let q = &state.by_client("a").expect("a").queue;
    let sent: Vec<(u64, Option<(u16, crate::session::OutState)>)> =
        q.iter().map(|(seq, e)| (*seq, e.sent)).collect();
    assert_eq!(
        sent,
        [
            (3, Some((1, AwaitPubAck))),
            (5, Some((9, AwaitPubAck))),
            (6, None)
        ]
    );
}

fn active_len(dir: &Path) -> u64 {
    super::list(dir)
        .expect("list")
        .last()
        .and_then(|(_, p)| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len())
}

/// A record someone waits for is written at once; an acknowledgement nobody waits for is
/// left to gather for up to LAZY_DELAY, then written without being asked.
#[test]
fn acknowledgements_are_written_lazily_and_sync_records_at_once() {
    let dir = TempDir::new("lazy");
    let store = open(&dir.0).store;
    let a = session(&store, "a");
    let lsn = synced(&store);
    until("durable", || store.durable_lsn() >= lsn);
    let before = active_len(&dir.0);
    let appended = Instant::now();
    a.done(1);
    std::thread::sleep(Duration::from_millis(5));
    // Only meaningful if this thread was not held up past the delay.
    if appended.elapsed() < super::writer::LAZY_DELAY * 4 / 5 {
        assert_eq!(active_len(&dir.0), before, "written before its delay");
    }
    until("the lazy write", || active_len(&dir.0) > before);

    let before = active_len(&dir.0);
    a.done(2);
    let lsn = synced(&store);
    until("durable", || store.durable_lsn() >= lsn);
    assert!(active_len(&dir.0) > before, "durable means written");
}

/// One message reaching two stores of one process is written to each: the note of where its
/// record is names the store, not only the file number (both stores are at file 1).
#[test]
fn a_message_shared_by_two_stores_is_written_to_each() {
    let (d1, d2) = (TempDir::new("two1"), TempDir::new("two2"));
    let (s1, s2) = (open(&d1.0).store, open(&d2.0).store);
    let (a, b) = (session(&s1, "a"), session(&s2, "b"));
    let shared = delivery(QoS::AtLeastOnce, b"shared");
    a.enqueued(&queued(&shared, 1));
    b.enqueued(&queued(&delivery(QoS::AtLeastOnce, b"other"), 1));
    b.enqueued(&queued(&shared, 2));
    s1.close();
    s2.close();
    drop((s1, s2));
    let st = open(&d2.0).state;
    let q = &st.by_client("b").expect("b").queue;
    assert_eq!(&q[&1].delivery.msg.payload[..], b"other");
    assert_eq!(&q[&2].delivery.msg.payload[..], b"shared");
}

/// A new file that cannot be started (its name is taken by a directory) is a write failure;
/// once it can, the store recovers, and connections waiting for durability no longer see
/// the failure.
#[test]
fn a_failed_roll_fails_the_store_until_it_succeeds() {
    let dir = TempDir::new("rollfail");
    let store = open(&dir.0).store;
    let filler = session(&store, "filler");
    let next = super::list(&dir.0).expect("list").last().expect("a file").0 + 1;
    let blocker = dir.0.join(super::files::file_name(next));
    std::fs::create_dir(&blocker).expect("blocker");
    for seq in 1..400 {
        filler.done(seq);
    }
    synced(&store);
    until("the failure", || store.is_failed());
    std::fs::remove_dir(&blocker).expect("remove blocker");
    until("recovery", || !store.is_failed());
    let lsn = synced(&store);
    let mut rx = store.durable_rx();
    let durable = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(journal::wait_durable(&mut rx, lsn));
    assert!(durable, "still failed for waiters: {:?}", *rx.borrow());
}

/// Figures for /metrics read the directory without touching it: a compaction's `.tmp` in
/// progress stays.
#[test]
fn figures_leave_a_compaction_in_progress_alone() {
    let dir = TempDir::new("figures");
    let store = open(&dir.0).store;
    let tmp = dir.0.join("0000000000000009.tmp");
    std::fs::write(&tmp, b"x").expect("tmp");
    assert!(store.figures().bytes > 0);
    assert!(tmp.exists());
}

/// Six threads append queue entries sharing eight messages, with packet ids and completions,
/// through batches, over many 4 KiB files (rolls and compactions under way); the store is
/// closed and reopened at once: every entry still queued comes back with its own message,
/// none finished comes back.
#[test]
fn concurrent_appends_across_rolls_replay_exactly() {
    use crate::session::OutState::AwaitPubAck;
    let dir = TempDir::new("stress");
    let store = open(&dir.0).store;
    let msgs: Arc<Vec<Delivery>> = Arc::new(
        (0..8u8)
            .map(|i| Delivery {
                msg: Arc::new(Message {
                    payload: Bytes::from(vec![b'a' + i; 100]),
                    ..(*delivery(QoS::AtLeastOnce, b"").msg).clone()
                }),
                ..delivery(QoS::AtLeastOnce, b"")
            })
            .collect(),
    );
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let (store, msgs) = (store.clone(), msgs.clone());
            std::thread::spawn(move || {
                let s = session(&store, &format!("c{t}"));
                let mut expect = std::collections::BTreeMap::new();
                let (mut seq, mut pid) = (1u64, 1u16);
                for round in 0..400u64 {
                    let _batch = journal::batch(&*store);
                    for k in 0..5 {
                        let m = &msgs[((round + k + t) % 8) as usize];
                        s.enqueued(&queued(m, seq));
                        expect.insert(seq, m.msg.payload.clone());
                        if seq % 3 == 0 {
                            s.in_flight(seq, pid, AwaitPubAck);
                            pid = record::packet_id_after(pid, 1);
                        }
                        if seq % 2 == 0 {
                            s.done(seq);
                            expect.remove(&seq);
                        }
                        seq += 1;
                    }
                }
                (format!("c{t}"), expect)
            })
        })
        .collect();
    let results: Vec<_> = threads
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    store.close();
    drop(store);
    let reopened = open(&dir.0);
    assert!(reopened.dropped.is_empty(), "{:?}", reopened.dropped);
    for (id, expect) in results {
        let got: std::collections::BTreeMap<u64, Bytes> = reopened
            .state
            .by_client(&id)
            .expect("session")
            .queue
            .iter()
            .map(|(seq, e)| (*seq, e.delivery.msg.payload.clone()))
            .collect();
        assert_eq!(got, expect, "{id}");
    }
}
