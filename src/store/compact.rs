//! Compaction: closed log files replaced by one snapshot of their live state.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::info;

use super::files::{file_name, io, newest_snapshot, replay, sync_dir};
use super::frame::{self, FileKind};
use super::record;
use super::StoreError;

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
    let mut out = Vec::with_capacity(frame::BLOCK_TARGET + 4096);
    out.extend_from_slice(&frame::header(FileKind::Snapshot));
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
