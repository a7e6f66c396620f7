//! The files in the data directory: their names and listing, the lock, new segments, and
//! replaying them into the stored state at open.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::frame::{self, Block, FileKind, HeaderError, HEADER_LEN};
use super::record;
use super::state::State;
use super::StoreError;

pub(super) fn io(p: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io(p.to_path_buf(), e)
}

pub(super) fn file_name(n: u64) -> String {
    format!("{n:016}.log")
}

/// The numbered log files in `dir`, in order.
pub(super) fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
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
pub(super) fn remove_unfinished(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_str().is_some_and(|n| n.ends_with(".tmp")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

pub(super) fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Where a file stops being good: byte offset and why.
pub(super) type BadAt = Option<(u64, String)>;
/// Where a sequence of files stops being good: file index, byte offset and why.
pub(super) type BadFileAt = Option<(usize, u64, String)>;

/// Read one file's header and records into `state`. Returns the bytes replayed and, if the
/// file has a bad frame, where and why (the file is good up to there).
pub(super) fn replay_file(
    path: &Path,
    state: &mut State,
) -> Result<(FileKind, u64, BadAt), StoreError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io(path))?;
    let kind = match frame::parse_header(&data) {
        Ok(k) => k,
        // A file cut before its header was complete: created just before a crash.
        Err(HeaderError::NotAStore)
            if data.len() < HEADER_LEN && frame::MAGIC.starts_with(&data[..data.len().min(8)]) =>
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
                    frame::FORMAT_VERSION
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
        match frame::next_block(&data[at..]) {
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
pub(super) fn replay(files: &[(u64, PathBuf)]) -> Result<(State, u64, BadFileAt), StoreError> {
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
pub(super) fn newest_snapshot(files: &[(u64, PathBuf)]) -> usize {
    let mut start = 0;
    for (i, (_, path)) in files.iter().enumerate() {
        let mut h = [0u8; HEADER_LEN];
        if File::open(path)
            .and_then(|mut f| f.read_exact(&mut h))
            .is_ok()
            && frame::parse_header(&h) == Ok(FileKind::Snapshot)
        {
            start = i;
        }
    }
    start
}

/// Claim `dir/LOCK` for this process: it holds the owner's pid, and a pid that is alive and
/// not ours means another broker uses the directory. (A pid file rather than `flock`, which
/// std offers only from Rust 1.89 on, above this crate's MSRV; a stale file from a killed
/// broker is recognised because its pid is gone, or is our own after a container restart.)
pub(super) fn take_lock(dir: &Path) -> Result<File, StoreError> {
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

pub(super) fn new_segment(dir: &Path, n: u64) -> Result<File, StoreError> {
    let path = dir.join(file_name(n));
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io(&path))?;
    // Emptied first: a retry after a failed start of this file must not append a second
    // header behind a partial one.
    f.set_len(0)
        .and_then(|_| f.write_all(&frame::header(FileKind::Segment)))
        .and_then(|_| f.sync_data())
        .map_err(io(&path))?;
    Ok(f)
}
