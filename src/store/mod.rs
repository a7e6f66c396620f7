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
//! every lower-numbered file obsolete (see `record::FileKind`).

pub mod record;
pub mod recovery;
pub mod state;
#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{FsyncPolicy, StoreConfig};
use crate::session::journal::{Durable, Event, Journal, JournalFigures, RetainedChange};
use crate::session::OutState;
use crate::wire::message::Delivery;

use record::{Block, FileKind, HeaderError, Record, HEADER_LEN};
use state::State;

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
    /// Records appended without `sync` inside a `Store::batch` scope on this thread, not yet
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

/// A thread's batch of records (see `Store::batch`).
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
    /// by the writer (`record::seal_block`).
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

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io(p.to_path_buf(), e)
}

fn file_name(n: u64) -> String {
    format!("{n:016}.log")
}

/// The numbered log files in `dir`, in order.
fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_suffix(".log")
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((n, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Remove what compactions that did not finish left (`*.tmp`): their inputs are all still
/// there. Only at open: while the store runs, a `.tmp` is a compaction in progress.
fn remove_unfinished(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_str().is_some_and(|n| n.ends_with(".tmp")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Where a file stops being good: byte offset and why.
type BadAt = Option<(u64, String)>;
/// Where a sequence of files stops being good: file index, byte offset and why.
type BadFileAt = Option<(usize, u64, String)>;

/// Read one file's header and records into `state`. Returns the bytes replayed and, if the
/// file has a bad frame, where and why (the file is good up to there).
fn replay_file(path: &Path, state: &mut State) -> Result<(FileKind, u64, BadAt), StoreError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io(path))?;
    let kind = match record::parse_header(&data) {
        Ok(k) => k,
        // A file cut before its header was complete: created just before a crash.
        Err(HeaderError::NotAStore)
            if data.len() < HEADER_LEN && record::MAGIC.starts_with(&data[..data.len().min(8)]) =>
        {
            return Ok((
                FileKind::Segment,
                0,
                Some((0, "file header cut short".into())),
            ))
        }
        Err(HeaderError::NotAStore) => {
            return Err(StoreError::Format(
                path.to_path_buf(),
                "not a tether store file (bad magic); refusing to start rather than overwrite it"
                    .into(),
            ))
        }
        Err(HeaderError::Version(v)) => {
            return Err(StoreError::Format(
                path.to_path_buf(),
                format!(
                    "written in store format version {v}, this tether reads version {}; \
                     refusing to start (use the tether release that wrote it, or move the \
                     data directory away to start empty)",
                    record::FORMAT_VERSION
                ),
            ))
        }
        Err(HeaderError::Kind(k)) => {
            return Err(StoreError::Format(
                path.to_path_buf(),
                format!("unknown file kind {k}; refusing to start"),
            ))
        }
    };
    let mut at = HEADER_LEN;
    let result = loop {
        match record::next_block(&data[at..]) {
            Block::End => break Ok((kind, at as u64, None)),
            Block::Bad(why) => break Ok((kind, at as u64, Some((at as u64, why.to_string())))),
            Block::Ok(body, n) => {
                for rec in record::records(body) {
                    let rec = rec.and_then(|payload| match record::message_record(payload) {
                        // Where the message is in `data`, for `State::end_file`.
                        Some(m) => m.map(|(id, at)| {
                            let start = payload.as_ptr() as usize - data.as_ptr() as usize + at;
                            state.raw_message(id, start, start + payload.len() - at);
                        }),
                        None => record::decode(payload).map(|rec| state.apply(rec)),
                    });
                    match rec {
                        Ok(()) => {}
                        // The checksum holds, so this is no torn write: it is a record of a
                        // format this build does not know (or a bug). Cutting here would
                        // silently discard every acknowledged record after it, so refuse to
                        // start instead.
                        Err(e) => {
                            return Err(StoreError::Format(
                                path.to_path_buf(),
                                format!(
                                    "a record in the block at offset {at} passes its checksum \
                                     but does not decode ({e}); refusing to start rather than \
                                     drop what follows it"
                                ),
                            ))
                        }
                    }
                }
                at += n;
            }
        }
    };
    if let Err(e) = state.end_file(&data) {
        return Err(StoreError::Format(
            path.to_path_buf(),
            format!("a queued message passes its checksum but does not decode ({e})"),
        ));
    }
    result
}

/// Replay files `files` (the newest snapshot first) into a state.
fn replay(files: &[(u64, PathBuf)]) -> Result<(State, u64, BadFileAt), StoreError> {
    let mut state = State::default();
    let mut bytes = 0;
    for (i, (_, path)) in files.iter().enumerate() {
        let (_, n, bad) = replay_file(path, &mut state)?;
        bytes += n;
        if let Some((at, why)) = bad {
            return Ok((state, bytes, Some((i, at, why))));
        }
    }
    Ok((state, bytes, None))
}

/// The index of the newest snapshot among `files` (0 if none: replay from the start).
fn newest_snapshot(files: &[(u64, PathBuf)]) -> usize {
    let mut start = 0;
    for (i, (_, path)) in files.iter().enumerate() {
        let mut h = [0u8; HEADER_LEN];
        if File::open(path)
            .and_then(|mut f| f.read_exact(&mut h))
            .is_ok()
            && record::parse_header(&h) == Ok(FileKind::Snapshot)
        {
            start = i;
        }
    }
    start
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
        if open.is_none_or(|at| p.buf.len() - at >= record::BLOCK_TARGET) {
            let at = record::open_block(&mut p.buf);
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

/// Claim `dir/LOCK` for this process: it holds the owner's pid, and a pid that is alive and
/// not ours means another broker uses the directory. (A pid file rather than `flock`, which
/// std offers only from Rust 1.89 on, above this crate's MSRV; a stale file from a killed
/// broker is recognised because its pid is gone, or is our own after a container restart.)
fn take_lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join("LOCK");
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(pid) = text.trim().parse::<u32>() {
            let alive = Path::new("/proc").join(pid.to_string()).exists();
            if alive && pid != std::process::id() {
                return Err(StoreError::Locked(dir.to_path_buf()));
            }
        }
    }
    let mut f = File::create(&path).map_err(io(&path))?;
    f.write_all(format!("{}\n", std::process::id()).as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io(&path))?;
    Ok(f)
}

fn new_segment(dir: &Path, n: u64) -> Result<File, StoreError> {
    let path = dir.join(file_name(n));
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io(&path))?;
    // Emptied first: a retry after a failed start of this file must not append a second
    // header behind a partial one.
    f.set_len(0)
        .and_then(|_| f.write_all(&record::header(FileKind::Segment)))
        .and_then(|_| f.sync_data())
        .map_err(io(&path))?;
    Ok(f)
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    cfg: StoreConfig,
    file: File,
    number: u64,
    /// Length of the active file that is known good (what a failed write is cut back to).
    len: u64,
    /// A failed write could not be cut back yet: nothing is appended until it is.
    torn: bool,
    /// Closed files, oldest first.
    sealed: Arc<Mutex<Vec<u64>>>,
    compacting: Arc<AtomicBool>,
    /// The compaction thread last started: joined before the writer ends, so that closing
    /// the store (which joins the writer) leaves no thread renaming or deleting its files.
    compaction: Option<std::thread::JoinHandle<()>>,
}

/// Whether a record nobody waits for should still be written without delay. A packet id
/// (`Sent`) should: a crash that loses it makes the next delivery of that message look like a
/// first one (DUP = 0, a new packet id) to a client that already has it. An acknowledgement
/// (`Done`) may wait: losing it re-sends the message as the DUP re-send it is.
fn prompt(rec: &Record) -> bool {
    matches!(rec, Record::Sent { .. } | Record::SentRange { .. })
}

/// Longest that records nobody waits for stay in memory before they are written.
const LAZY_DELAY: Duration = Duration::from_millis(50);
/// Longest that a `prompt` record stays in memory before it is written.
const PROMPT_DELAY: Duration = Duration::from_millis(1);
/// Buffered bytes that are written at once, waited for or not.
const LAZY_BYTES: usize = 1 << 20;

/// How long a failed write waits before it is retried.
const RETRY: Duration = Duration::from_secs(1);

impl Writer {
    fn run(&mut self) {
        self.write_until_closed();
        if let Some(h) = self.compaction.take() {
            let _ = h.join();
        }
    }

    fn write_until_closed(&mut self) {
        let mut batch: Vec<u8> = Vec::new();
        let mut blocks: Vec<usize> = Vec::new();
        let mut batch_lsn = 0u64;
        // The batch holds a record someone waits for: it is fsynced (policy `always`) and
        // reported durable; other batches are only written.
        let mut batch_sync = false;
        let mut unsynced = false;
        let mut last_sync = Instant::now();
        let mut failing = false;
        // The active file must be closed and the next one started before anything more is
        // written: records appended since the roll was decided refer to the next file.
        let mut roll_due = false;
        loop {
            let closing;
            let more;
            {
                let mut p = self.shared.lock();
                // The interval policy's next fsync, counted from the last.
                let tick = match self.cfg.fsync {
                    FsyncPolicy::Interval if unsynced => Some(self.cfg.fsync_interval),
                    _ => None,
                };
                if failing {
                    // Retry no sooner than RETRY, however many records arrive meanwhile.
                    let until = Instant::now() + RETRY;
                    while !p.closing {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        p = self
                            .shared
                            .wake
                            .wait_timeout(p, left)
                            .map(|r| r.0)
                            .unwrap_or_else(|e| e.into_inner().0);
                    }
                } else {
                    // Until something must be written: a record waited for, a full buffer,
                    // a prompt record's or a lazy one's delay out, the interval's fsync, a
                    // shutdown, or a roll to finish.
                    loop {
                        if p.sync || p.full || p.closing || roll_due {
                            break;
                        }
                        let delay = if p.prompt { PROMPT_DELAY } else { LAZY_DELAY };
                        let due = p
                            .since
                            .map(|t| t + delay)
                            .into_iter()
                            .chain(tick.map(|t| last_sync + t))
                            .min();
                        let now = Instant::now();
                        p = match due {
                            Some(due) if due <= now => break,
                            Some(due) => self
                                .shared
                                .wake
                                .wait_timeout(p, due - now)
                                .map(|r| r.0)
                                .unwrap_or_else(|e| e.into_inner().0),
                            None => self.shared.wake.wait(p).unwrap_or_else(|e| e.into_inner()),
                        };
                    }
                }
                closing = p.closing;
                // A failed batch is retried alone; new records wait for the next batch.
                if batch.is_empty() && !roll_due && !p.buf.is_empty() {
                    batch_sync = std::mem::take(&mut p.sync);
                    p.full = false;
                    p.prompt = false;
                    p.since = None;
                    std::mem::swap(&mut batch, &mut p.buf);
                    std::mem::swap(&mut blocks, &mut p.blocks);
                    batch_lsn = p.lsn;
                    if self.len + batch.len() as u64 >= self.cfg.segment_bytes {
                        // This batch closes the file; what is appended from now on goes to
                        // the next one, where no message record is written yet.
                        roll_due = true;
                        p.segment = self.number + 1;
                        p.next_message = 1;
                    }
                    // Checksums are computed here, off the connections' threads.
                    for (i, &at) in blocks.iter().enumerate() {
                        let end = blocks.get(i + 1).copied().unwrap_or(batch.len());
                        record::seal_block(&mut batch, at, end);
                    }
                    blocks.clear();
                }
                more = !p.buf.is_empty();
            }
            let sync_now = match self.cfg.fsync {
                FsyncPolicy::Always => closing || batch_sync,
                FsyncPolicy::Interval => closing || last_sync.elapsed() >= self.cfg.fsync_interval,
                FsyncPolicy::Never => closing,
            };
            let mut result = Ok(());
            if !batch.is_empty() || (sync_now && unsynced) {
                let started = Instant::now();
                result = self.write(&batch, sync_now).map(|()| {
                    if batch_sync {
                        let micros =
                            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                        self.shared.commits.fetch_add(1, Ordering::Relaxed);
                        self.shared
                            .commit_micros
                            .fetch_add(micros, Ordering::Relaxed);
                    }
                    unsynced = !sync_now;
                    if sync_now {
                        last_sync = Instant::now();
                    }
                    batch.clear();
                    // Reported only when someone waits (a batch with no sync record holds
                    // nothing waited for) or to clear a failure: fewer wake-ups. Every sync
                    // record up to `batch_lsn` is durable either way: each was in a batch
                    // fsynced for it.
                    if batch_sync || self.shared.durable.borrow().failed {
                        self.shared.durable.send_replace(Durable {
                            lsn: batch_lsn,
                            failed: false,
                        });
                    }
                });
            }
            if result.is_ok() && batch.is_empty() && roll_due {
                result = self.roll().map(|()| roll_due = false);
            }
            match result {
                Ok(()) if failing => {
                    info!("store writable again; accepting QoS 1/2 messages");
                    failing = false;
                    self.shared.failed.store(false, Ordering::Relaxed);
                    // Also when what succeeded was a roll and no batch reported: waiters
                    // must not keep seeing the failure.
                    self.shared.durable.send_modify(|d| d.failed = false);
                }
                Ok(()) => {}
                Err(e) => {
                    if !failing {
                        error!(
                            dir = %self.cfg.dir.display(),
                            "store write failed: {e}; refusing QoS 1/2 messages until it \
                             succeeds again (retrying every {RETRY:?})"
                        );
                        failing = true;
                        self.shared.failed.store(true, Ordering::Relaxed);
                        self.shared.durable.send_modify(|d| d.failed = true);
                    }
                    if closing {
                        error!("store closed with {} bytes not written", batch.len());
                        return;
                    }
                    continue;
                }
            }
            if closing && !more && batch.is_empty() && !roll_due {
                return;
            }
        }
    }

    /// Append `batch` to the active file (and fsync). On failure the file is cut back to its
    /// last good length, so a retry never leaves a partial frame in the middle of the log.
    fn write(&mut self, batch: &[u8], sync: bool) -> std::io::Result<()> {
        if self.torn {
            // A partial frame may still sit after `len`: appending behind it would hide every
            // later record from recovery. Only write once the cut-back has succeeded.
            self.file.set_len(self.len)?;
            self.torn = false;
        }
        let r =
            self.file
                .write_all(batch)
                .and_then(|_| if sync { self.file.sync_data() } else { Ok(()) });
        match r {
            Ok(()) => {
                self.len += batch.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.torn = self.file.set_len(self.len).is_err();
                Err(e)
            }
        }
    }

    /// Close the active segment (fsynced), start the next, and compact the closed files when
    /// enough has been written since the last snapshot.
    fn roll(&mut self) -> std::io::Result<()> {
        self.file.sync_all()?;
        let next = new_segment(&self.cfg.dir, self.number + 1).map_err(|e| match e {
            StoreError::Io(_, e) => e,
            other => std::io::Error::other(other.to_string()),
        })?;
        sync_dir(&self.cfg.dir);
        self.file = next;
        let closed = self.number;
        self.number += 1;
        self.len = HEADER_LEN as u64;
        self.torn = false;
        let files = {
            let mut s = self.sealed.lock().unwrap_or_else(|e| e.into_inner());
            s.push(closed);
            s.clone()
        };
        // Compaction rewrites the oldest file (the last snapshot: the live state) with what
        // the newer ones changed. Waiting until those hold at least half as many bytes as it
        // keeps the work within three times what is written, however large the live state
        // (a backlog of queued messages) is; rewriting it at every new segment was quadratic.
        let size =
            |n: &u64| std::fs::metadata(self.cfg.dir.join(file_name(*n))).map_or(0, |m| m.len());
        let due = match files.split_first() {
            Some((oldest, newer)) if !newer.is_empty() => {
                newer.iter().map(size).sum::<u64>() >= size(oldest) / 2
            }
            _ => false,
        };
        if due && !self.compacting.swap(true, Ordering::AcqRel) {
            let dir = self.cfg.dir.clone();
            let sealed = self.sealed.clone();
            let flag = self.compacting.clone();
            let spawned = std::thread::Builder::new()
                .name("tether-compact".into())
                .spawn(move || {
                    match compact(&dir, &files) {
                        Ok(()) => {
                            let top = files.last().copied().unwrap_or(0);
                            sealed
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .retain(|n| *n >= top);
                        }
                        Err(e) => warn!("store compaction failed: {e}; will retry"),
                    }
                    flag.store(false, Ordering::Release);
                });
            match spawned {
                Ok(h) => {
                    // The previous one has finished (the flag was clear): reap it.
                    if let Some(old) = self.compaction.replace(h) {
                        let _ = old.join();
                    }
                }
                Err(_) => self.compacting.store(false, Ordering::Release),
            }
        }
        Ok(())
    }
}

/// Replace closed files `numbers` by one snapshot of their live state, numbered like the
/// newest of them. Crash-safe at every step: the snapshot is complete and fsynced before it
/// is renamed into place, and recovery ignores anything numbered below a snapshot.
pub fn compact(dir: &Path, numbers: &[u64]) -> Result<(), StoreError> {
    let Some(&top) = numbers.last() else {
        return Ok(());
    };
    let started = Instant::now();
    let files: Vec<(u64, PathBuf)> = numbers
        .iter()
        .map(|n| (*n, dir.join(file_name(*n))))
        .collect();
    let before: u64 = files
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let start = newest_snapshot(&files);
    let (state, _, bad) = replay(&files[start..])?;
    if let Some((i, at, why)) = bad {
        return Err(StoreError::Format(
            files[start + i].1.clone(),
            format!("bad frame at offset {at} in a closed file ({why}); not compacting"),
        ));
    }
    let tmp = dir.join(format!("{top:016}.tmp"));
    let mut out = Vec::with_capacity(record::BLOCK_TARGET + 4096);
    out.extend_from_slice(&record::header(FileKind::Snapshot));
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    record::encode_blocks(state.records(), &mut out, |full| {
        f.write_all(full).map(|()| full.clear())
    })
    .map_err(io(&tmp))?;
    f.write_all(&out)
        .and_then(|_| f.sync_all())
        .map_err(io(&tmp))?;
    let after = f.metadata().map(|m| m.len()).unwrap_or(0);
    drop(f);
    let target = dir.join(file_name(top));
    std::fs::rename(&tmp, &target).map_err(io(&target))?;
    sync_dir(dir);
    for (n, p) in &files {
        if *n < top {
            let _ = std::fs::remove_file(p);
        }
    }
    info!(
        files = files.len(),
        bytes_before = before,
        bytes_after = after,
        ms = started.elapsed().as_millis() as u64,
        "store compacted"
    );
    Ok(())
}

/// The store as the sessions' journal: every event becomes one log record.
impl Journal for Store {
    fn is_on(&self) -> bool {
        true
    }

    fn new_incarnation(&self) -> u64 {
        self.incarnations.fetch_add(1, Ordering::Relaxed)
    }

    fn session(&self, incarnation: u64, event: Event<'_>) {
        let sync = event.must_sync();
        let rec = match event {
            Event::Image(_, image) => Record::Session(image),
            Event::Enqueued(d) => return self.append_enqueue(incarnation, d),
            Event::InFlight {
                seq,
                packet_id,
                state,
            } => Record::Sent {
                incarnation,
                seq,
                packet_id,
                state,
            },
            Event::PubRecd { seq, packet_id } => Record::Sent {
                incarnation,
                seq,
                packet_id,
                state: OutState::AwaitPubComp,
            },
            Event::Done { seq } => Record::Done { incarnation, seq },
            Event::InboundAdded { packet_id } => Record::Inbound {
                incarnation,
                packet_id,
                added: true,
            },
            Event::InboundReleased { packet_id } => Record::Inbound {
                incarnation,
                packet_id,
                added: false,
            },
            Event::Ended => Record::SessionEnd { incarnation },
        };
        self.append(&rec, sync);
    }

    fn retained(&self, change: RetainedChange<'_>) {
        let rec = match change {
            RetainedChange::Set(m) => Record::RetainSet(m.clone()),
            RetainedChange::Cleared(topic) => Record::RetainDel(topic.to_string()),
        };
        self.append(&rec, true);
    }

    fn take_sync_mark(&self) -> u64 {
        take_sync_mark()
    }

    fn durable(&self) -> Option<watch::Receiver<Durable>> {
        Some(self.durable_rx())
    }

    fn is_failed(&self) -> bool {
        Store::is_failed(self)
    }

    fn begin_batch(&self) {
        self.begin_batch_scope();
    }

    fn end_batch(&self) {
        self.end_batch_scope();
    }

    fn figures(&self) -> Option<JournalFigures> {
        Some(Store::figures(self))
    }

    fn close(&self) {
        Store::close(self);
    }
}
