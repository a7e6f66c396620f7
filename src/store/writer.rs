//! The writer thread: takes what connections appended, writes it in group commits (fsynced as
//! the policy says), publishes durability progress, rolls segments and starts compactions.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::config::{FsyncPolicy, StoreConfig};
use crate::session::journal::Durable;

use super::compact::compact;
use super::files::{file_name, new_segment, sync_dir};
use super::frame::{self, HEADER_LEN};
use super::record::Record;
use super::{Shared, StoreError};

/// The writer thread's state.
pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) cfg: StoreConfig,
    pub(super) file: File,
    pub(super) number: u64,
    /// Length of the active file that is known good (what a failed write is cut back to).
    pub(super) len: u64,
    /// A failed write could not be cut back yet: nothing is appended until it is.
    pub(super) torn: bool,
    /// Closed files, oldest first.
    pub(super) sealed: Arc<Mutex<Vec<u64>>>,
    pub(super) compacting: Arc<AtomicBool>,
    /// The compaction thread last started: joined before the writer ends, so that closing
    /// the store (which joins the writer) leaves no thread renaming or deleting its files.
    pub(super) compaction: Option<std::thread::JoinHandle<()>>,
}

/// Whether a record nobody waits for should still be written without delay. A packet id
/// (`Sent`) should: a crash that loses it makes the next delivery of that message look like a
/// first one (DUP = 0, a new packet id) to a client that already has it. An acknowledgement
/// (`Done`) may wait: losing it re-sends the message as the DUP re-send it is.
pub(super) fn prompt(rec: &Record) -> bool {
    matches!(rec, Record::Sent { .. } | Record::SentRange { .. })
}

/// Longest that records nobody waits for stay in memory before they are written.
pub(super) const LAZY_DELAY: Duration = Duration::from_millis(50);
/// Longest that a `prompt` record stays in memory before it is written.
pub(super) const PROMPT_DELAY: Duration = Duration::from_millis(1);
/// Buffered bytes that are written at once, waited for or not.
pub(super) const LAZY_BYTES: usize = 1 << 20;

/// How long a failed write waits before it is retried.
pub(super) const RETRY: Duration = Duration::from_secs(1);

impl Writer {
    pub(super) fn run(&mut self) {
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
                        frame::seal_block(&mut batch, at, end);
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
