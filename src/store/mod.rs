//! Durable sessions: an append-only write-ahead log of session state in `data_dir`, written
//! by one thread with group commit, replayed at start, compacted in the background.
//!
//! Why a log of our own rather than an embedded database: see README, "Persistence" (the
//! measurement is in `benches/engine-compare`). What the broker needs is exactly a WAL of
//! queue appends and acknowledgements with one fsync shared by every connection's writes.
//!
//! How durability reaches the wire. Every change that must be on disk before the client hears
//! about it is appended with `sync = true`; the append returns its log sequence number (LSN)
//! and also remembers it in a thread-local mark. Packet handling is synchronous, so the
//! connection task reads the mark after handling a packet (`take_sync_mark`) and holds every
//! byte it produced from then on (the PUBACK, PUBREC, SUBACK, ...) until the writer reports
//! that LSN durable. Other connections are not blocked, and the order of one connection's
//! output is kept. The log is a prefix: once an LSN is durable, so is everything before it.
//!
//! Files: `NNNNNNNNNNNNNNNN.log`, numbered in write order. A segment is rolled past
//! `segment_bytes`; when two or more closed files exist, a compaction thread replays them and
//! writes their live state as one snapshot file with the number of the newest, which makes
//! every lower-numbered file obsolete (see `frame::FileKind`).

mod compact;
mod files;
pub mod frame;
mod journal;
pub mod record;
pub mod recovery;
pub mod state;
#[cfg(test)]
mod tests;
mod writer;

use std::cell::Cell;
use std::fs::{File, OpenOptions};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;

use crate::config::StoreConfig;
use crate::session::journal::{Durable, JournalFigures};
use crate::wire::message::Delivery;

use files::{
    io, list, new_segment, newest_snapshot, remove_unfinished, replay, sync_dir, take_lock,
};
use frame::HEADER_LEN;
use record::Record;
use state::State;
use writer::{prompt, Writer, LAZY_BYTES};

/// Why the store cannot be opened.
#[derive(Debug)]
pub enum StoreError {
    /// An I/O error on a path.
    Io(PathBuf, std::io::Error),
    /// Another process holds the directory.
    Locked(PathBuf),
    /// The files were written by another format version, or are not tether's.
    Format(PathBuf, String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            StoreError::Locked(p) => write!(
                f,
                "{} is in use by another running tether process (see its LOCK file)",
                p.display()
            ),
            StoreError::Format(p, why) => write!(f, "{}: {why}", p.display()),
        }
    }
}

impl std::error::Error for StoreError {}

/// Stores opened in this process so far (see `Pending::generation`).
static STORES: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Highest LSN appended with `sync = true` by this thread since the last `take_sync_mark`.
    static SYNC_MARK: Cell<u64> = const { Cell::new(0) };
    /// Records appended without `sync` inside a `journal::batch` scope on this thread, not yet
    /// in the shared buffer.
    static LOCAL: std::cell::RefCell<Local> = const {
        std::cell::RefCell::new(Local { depth: 0, store: std::ptr::null(), buf: Vec::new(), count: 0, prompt: false, run: None })
    };
}

/// The highest LSN this thread appended with `sync = true` since the last call (0 if none):
/// output produced since must wait until it is durable.
pub fn take_sync_mark() -> u64 {
    SYNC_MARK.with(|m| m.replace(0))
}

/// A thread's batch of records (see `journal::batch`).
struct Local {
    /// Nesting of `Batch` guards.
    depth: u32,
    /// The store of the outermost guard (only compared, never dereferenced).
    store: *const Store,
    /// Encoded records.
    buf: Vec<u8>,
    /// How many.
    count: u64,
    /// A record in `buf` or `run` should be written soon (see `prompt`).
    prompt: bool,
    /// Consecutive `Sent` or `Done` records of one session, not yet encoded: they become
    /// one `SentRange` / `DoneRange` record (a session sends and is acknowledged in order).
    run: Option<Record>,
}

impl Local {
    /// Add `rec` to the open run if it continues it.
    fn extend(&mut self, rec: &Record) -> bool {
        match (&mut self.run, rec) {
            (
                Some(Record::DoneRange {
                    incarnation,
                    first,
                    count,
                }),
                Record::Done {
                    incarnation: i,
                    seq,
                },
            ) if i == incarnation && *seq == *first + *count => {
                *count += 1;
                true
            }
            (
                Some(Record::SentRange {
                    incarnation,
                    first,
                    count,
                    packet_id,
                    state,
                }),
                Record::Sent {
                    incarnation: i,
                    seq,
                    packet_id: p,
                    state: st,
                },
            ) if i == incarnation
                && st == state
                && *seq == *first + *count
                && *p == record::packet_id_after(*packet_id, *count) =>
            {
                *count += 1;
                true
            }
            _ => false,
        }
    }

    /// Encode the open run, if any (a run of one as the plain record).
    fn close_run(&mut self) {
        let Some(run) = self.run.take() else { return };
        let rec = match run {
            Record::DoneRange {
                incarnation,
                first,
                count: 1,
            } => Record::Done {
                incarnation,
                seq: first,
            },
            Record::SentRange {
                incarnation,
                first,
                count: 1,
                packet_id,
                state,
            } => Record::Sent {
                incarnation,
                seq: first,
                packet_id,
                state,
            },
            run => run,
        };
        record::encode_record(&rec, &mut self.buf);
        self.count += 1;
    }

    /// Batch `rec`: extend the open run, start one, or encode it.
    fn add(&mut self, rec: &Record) {
        self.prompt |= prompt(rec);
        if self.extend(rec) {
            return;
        }
        self.close_run();
        match *rec {
            Record::Done { incarnation, seq } => {
                self.run = Some(Record::DoneRange {
                    incarnation,
                    first: seq,
                    count: 1,
                })
            }
            Record::Sent {
                incarnation,
                seq,
                packet_id,
                state,
            } => {
                self.run = Some(Record::SentRange {
                    incarnation,
                    first: seq,
                    count: 1,
                    packet_id,
                    state,
                })
            }
            _ => {
                record::encode_record(rec, &mut self.buf);
                self.count += 1;
            }
        }
    }
}

#[derive(Debug, Default)]
struct Pending {
    /// Blocks of encoded records not yet handed to the writer; their headers are filled in
    /// by the writer (`frame::seal_block`).
    buf: Vec<u8>,
    /// Offsets in `buf` of its blocks' headers.
    blocks: Vec<usize>,
    /// LSN of the last appended record.
    lsn: u64,
    /// The log file that what is appended now will be written to: `Message` records are
    /// shared only within one file (see `Record::Message`).
    segment: u64,
    /// The next `Message` record id.
    next_message: u64,
    /// This store's number in the process (see `STORES`): a message's note of where its
    /// record is names the store too, since one message can reach two stores in a process.
    generation: u64,
    /// `buf` holds a record appended with `sync` (someone waits for it): the writer has been
    /// woken to write and fsync it now.
    sync: bool,
    /// `buf` is over `LAZY_BYTES`: the writer has been woken to write it now.
    full: bool,
    /// `buf` holds a record that should be written soon though nobody waits for it (see
    /// `prompt`): within `PROMPT_DELAY`, without an fsync of its own.
    prompt: bool,
    /// When `buf` last went from empty to not: what it holds otherwise waits for up to
    /// `LAZY_DELAY` (acknowledgements of deliveries): a batch of only those would cost a
    /// write, and an fsync, that nothing needs yet.
    since: Option<Instant>,
    /// Ask the writer to finish.
    closing: bool,
}

#[derive(Debug)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    durable: watch::Sender<Durable>,
    failed: AtomicBool,
    /// Group commits: batches written (and fsynced, policy `always`) for someone waiting.
    commits: AtomicU64,
    /// Microseconds those took to write and fsync, summed.
    commit_micros: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The store. Shared (`Arc`) by the broker, every durable session and mailbox.
#[derive(Debug)]
pub struct Store {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    incarnations: AtomicU64,
    dir: PathBuf,
    /// Held for the life of the store: one process per directory.
    _lock: File,
}

/// What opening found.
#[derive(Debug)]
pub struct Opened {
    /// The store, ready for appends.
    pub store: Arc<Store>,
    /// The replayed state, to rebuild sessions from.
    pub state: State,
    /// When the previous process last wrote (wall ms): sessions connected then are treated
    /// as disconnected at this moment.
    pub last_write: u64,
    /// Files read and bytes replayed.
    pub files: usize,
    /// Bytes replayed.
    pub bytes: u64,
    /// What was cut off as torn or corrupt, one description per file.
    pub dropped: Vec<String>,
}

impl Store {
    /// Open (creating if needed) the store in `cfg.dir`, replay it, and start the writer.
    /// A torn or corrupt tail is cut off and reported in `Opened::dropped`; files of another
    /// format are refused.
    pub fn open(cfg: StoreConfig) -> Result<Opened, StoreError> {
        let dir = cfg.dir.clone();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let lock = take_lock(&dir)?;

        remove_unfinished(&dir);
        let mut files = list(&dir)?;
        let start = newest_snapshot(&files);
        // Files before the newest snapshot are covered by it: a compaction stopped before
        // deleting them.
        for (_, p) in files.drain(..start) {
            let _ = std::fs::remove_file(p);
        }
        let (state, bytes, bad) = replay(&files)?;
        let mut dropped = Vec::new();
        if state.missing_messages > 0 {
            dropped.push(format!(
                "{} queued messages whose message record was missing",
                state.missing_messages
            ));
        }
        if let Some((i, at, why)) = bad {
            // Keep the good prefix: cut the bad file there and set every later file aside.
            let (_, path) = &files[i];
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            dropped.push(format!(
                "{}: {} bytes from offset {at} ({why})",
                path.display(),
                len.saturating_sub(at)
            ));
            if at == 0 {
                let _ = std::fs::remove_file(path);
            } else {
                OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(at).and_then(|_| f.sync_all()))
                    .map_err(io(path))?;
            }
            for (_, later) in files.drain(i + 1..) {
                let len = std::fs::metadata(&later).map(|m| m.len()).unwrap_or(0);
                let aside = later.with_extension("log.dropped");
                dropped.push(format!(
                    "{}: {len} bytes after the corruption, moved to {}",
                    later.display(),
                    aside.display()
                ));
                let _ = std::fs::rename(&later, &aside);
            }
            if at == 0 {
                files.truncate(i);
            }
        }
        let last_write = files
            .last()
            .and_then(|(_, p)| std::fs::metadata(p).ok())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or_else(crate::session::journal::wall_now);

        let next = files.last().map_or(1, |(n, _)| n + 1);
        let sealed: Vec<u64> = files.iter().map(|(n, _)| *n).collect();
        let active = new_segment(&dir, next)?;
        sync_dir(&dir);

        let (durable, _) = watch::channel(Durable::default());
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                segment: next,
                next_message: 1,
                generation: STORES.fetch_add(1, Ordering::Relaxed),
                ..Pending::default()
            }),
            wake: Condvar::new(),
            durable,
            failed: AtomicBool::new(false),
            commits: AtomicU64::new(0),
            commit_micros: AtomicU64::new(0),
        });
        let mut writer = Writer {
            shared: shared.clone(),
            cfg: cfg.clone(),
            file: active,
            number: next,
            len: HEADER_LEN as u64,
            torn: false,
            sealed: Arc::new(Mutex::new(sealed)),
            compacting: Arc::new(AtomicBool::new(false)),
            compaction: None,
        };
        let handle = std::thread::Builder::new()
            .name("tether-store".into())
            .spawn(move || writer.run())
            .map_err(io(&dir))?;
        // Incarnations only need to differ from every one on disk; starting from the clock
        // keeps them increasing across restarts even after compaction forgot old ones.
        let first = state
            .max_incarnation
            .max(crate::session::journal::wall_now().saturating_mul(1000))
            + 1;
        let files_read = files.len();
        Ok(Opened {
            store: Arc::new(Store {
                shared,
                writer: Mutex::new(Some(handle)),
                incarnations: AtomicU64::new(first),
                dir,
                _lock: lock,
            }),
            state,
            last_write,
            files: files_read,
            bytes,
            dropped,
        })
    }

    /// The directory of the store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Start a batch scope on this thread (see `journal::batch`): appends without `sync` are
    /// collected and handed to the writer in one go when it ends (or before the next `sync`
    /// append, which keeps the log in the order of the appends). One connection's pass over
    /// its input (PUBACKs and PUBLISHes sent, each with a record) then takes the shared lock
    /// once instead of once per record. Scopes nest.
    fn begin_batch_scope(&self) {
        LOCAL.with_borrow_mut(|l| {
            if l.depth == 0 {
                l.store = self;
            }
            l.depth += 1;
        });
    }

    /// End a scope started by `begin_batch_scope`; the outermost hands the batch over.
    fn end_batch_scope(&self) {
        let flush = LOCAL.with_borrow_mut(|l| {
            l.depth = l.depth.saturating_sub(1);
            l.depth == 0 && (l.count > 0 || l.run.is_some())
        });
        if flush {
            let mut p = self.shared.lock();
            self.flush_local(&mut p);
        }
        LOCAL.with_borrow_mut(|l| {
            if l.depth == 0 {
                l.store = std::ptr::null();
            }
        });
    }

    /// Queue a record for the writer. With `sync`, the calling thread's sync mark is raised
    /// to its LSN (see `take_sync_mark`); without, inside a `Batch` scope, it waits in the
    /// scope's batch.
    pub fn append(&self, rec: &Record, sync: bool) {
        if !sync {
            let batched = LOCAL.with_borrow_mut(|l| {
                if l.depth == 0 || !std::ptr::eq(l.store, self) {
                    return false;
                }
                l.add(rec);
                true
            });
            if batched {
                return;
            }
        }
        let mut p = self.shared.lock();
        self.flush_local(&mut p);
        self.push(&mut p, rec);
        self.wake(&mut p, sync, prompt(rec));
        let lsn = p.lsn;
        drop(p);
        if sync {
            SYNC_MARK.with(|m| m.set(m.get().max(lsn)));
        }
    }

    /// Queue delivery `d` into the session `incarnation` as queue entry `d.seq`, preceded by
    /// its message unless that was already written to the same file. The publisher's
    /// acknowledgement waits for it (sync).
    pub fn append_enqueue(&self, incarnation: u64, d: &Delivery) {
        let mut p = self.shared.lock();
        self.flush_local(&mut p);
        // The file in this store: segment numbers stay far below 2^40.
        let segment = p.generation << 40 | p.segment;
        let id = match d.msg.stored.id_in(segment) {
            Some(id) => id,
            None => {
                let id = p.next_message;
                p.next_message += 1;
                d.msg.stored.set(id, segment);
                self.open_block(&mut p);
                record::encode_message_record(id, &d.msg, &mut p.buf);
                p.lsn += 1;
                id
            }
        };
        self.open_block(&mut p);
        record::encode_enqueue_record(incarnation, id, d, &mut p.buf);
        p.lsn += 1;
        self.wake(&mut p, true, false);
        let lsn = p.lsn;
        drop(p);
        SYNC_MARK.with(|m| m.set(m.get().max(lsn)));
    }

    /// Move this thread's batched records (if they are for this store) into the buffer,
    /// ahead of whatever it appends next.
    fn flush_local(&self, p: &mut Pending) {
        let Some((mut buf, count, prompt)) = LOCAL.with_borrow_mut(|l| {
            if !std::ptr::eq(l.store, self) {
                return None;
            }
            l.close_run();
            (l.count > 0).then(|| {
                (
                    std::mem::take(&mut l.buf),
                    std::mem::take(&mut l.count),
                    std::mem::take(&mut l.prompt),
                )
            })
        }) else {
            return;
        };
        self.open_block(p);
        p.buf.extend_from_slice(&buf);
        p.lsn += count;
        self.wake(p, false, prompt);
        buf.clear();
        // The buffer goes back for the next batch, keeping its capacity.
        LOCAL.with_borrow_mut(|l| l.buf = buf);
    }

    /// Make sure a block is open in the buffer that has room for more.
    fn open_block(&self, p: &mut Pending) {
        let open = p.blocks.last().copied();
        if open.is_none_or(|at| p.buf.len() - at >= frame::BLOCK_TARGET) {
            let at = frame::open_block(&mut p.buf);
            p.blocks.push(at);
        }
    }

    /// Tell the writer what the buffer now holds, waking it only when that changes when it
    /// must write: `sync` for a record waited for, `prompt` for one to write soon.
    fn wake(&self, p: &mut Pending, sync: bool, prompt: bool) {
        let mut wake = false;
        if p.since.is_none() {
            p.since = Some(Instant::now());
            wake = true;
        }
        if sync && !p.sync {
            p.sync = true;
            wake = true;
        }
        if prompt && !p.prompt {
            p.prompt = true;
            wake = true;
        }
        if !p.full && p.buf.len() >= LAZY_BYTES {
            p.full = true;
            wake = true;
        }
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Encode `rec` into the pending buffer. Records are encoded under the lock, straight
    /// into the buffer: they are small, and one copy fewer than encoding outside costs less
    /// than the lock is held.
    fn push(&self, p: &mut Pending, rec: &Record) {
        self.open_block(p);
        record::encode_record(rec, &mut p.buf);
        p.lsn += 1;
    }

    /// Figures for /metrics and `$SYS`. The size is read from the directory (a few files).
    pub fn figures(&self) -> JournalFigures {
        let bytes = list(&self.dir)
            .map(|files| {
                files
                    .iter()
                    .filter_map(|(_, p)| std::fs::metadata(p).ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        JournalFigures {
            bytes,
            commits: self.shared.commits.load(Ordering::Relaxed),
            commit_micros: self.shared.commit_micros.load(Ordering::Relaxed),
            failed: self.is_failed(),
        }
    }

    /// True while writes fail (disk full, I/O error): new QoS 1/2 messages must be refused.
    pub fn is_failed(&self) -> bool {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Watch durability progress.
    pub fn durable_rx(&self) -> watch::Receiver<Durable> {
        self.shared.durable.subscribe()
    }

    /// The highest durable LSN now.
    pub fn durable_lsn(&self) -> u64 {
        self.shared.durable.borrow().lsn
    }

    /// Write and fsync everything appended so far, stop the writer and wait for it
    /// (graceful shutdown). Appends after this are dropped.
    pub fn close(&self) {
        {
            let mut p = self.shared.lock();
            p.closing = true;
            self.shared.wake.notify_one();
        }
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
            let _ = std::fs::remove_file(self.dir.join("LOCK"));
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}
