//! `[persistence]`: whether sessions and retained messages are kept in `data_dir`, and how the
//! log there is written.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[persistence]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PersistenceConfig {
    /// Store persistent sessions, their queues and in-flight messages, and retained messages
    /// in `data_dir`, and acknowledge QoS 1/2 messages only once stored. false = in memory.
    pub enabled: bool,
    /// When the log is fsynced: `always` (before every acknowledgement, shared by all
    /// messages of a group commit), `interval` (every `fsync_interval_ms`) or `never`.
    pub fsync: FsyncPolicy,
    /// Period of `fsync = "interval"`, in milliseconds.
    pub fsync_interval_ms: u64,
    /// Size at which a log segment is closed and becomes eligible for compaction, in bytes.
    pub segment_bytes: u64,
}

impl Default for PersistenceConfig {
    fn default() -> Self {
        PersistenceConfig {
            enabled: true,
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: 100,
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

/// When the log is fsynced, and so what a crash of the machine (not just of tether) may lose.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FsyncPolicy {
    /// fsync every group commit before acknowledging: nothing acknowledged is ever lost.
    #[default]
    Always,
    /// Acknowledge once written to the OS, fsync every `fsync_interval_ms`: a power loss or
    /// kernel crash loses up to that interval of acknowledged messages; a tether crash none.
    Interval,
    /// Acknowledge once written to the OS, never fsync (the kernel writes back when it likes):
    /// a power loss or kernel crash may lose anything not yet written back; a tether crash none.
    Never,
}

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Directory of the log files.
    pub dir: PathBuf,
    /// fsync policy.
    pub fsync: FsyncPolicy,
    /// Period of the `interval` policy.
    pub fsync_interval: Duration,
    /// A segment is closed past this size, which lets compaction reclaim it.
    pub segment_bytes: u64,
}

impl PersistenceConfig {
    /// How the store in `dir` is opened with these settings.
    pub fn store_config(&self, dir: PathBuf) -> StoreConfig {
        StoreConfig {
            dir,
            fsync: self.fsync,
            fsync_interval: Duration::from_millis(self.fsync_interval_ms),
            segment_bytes: self.segment_bytes,
        }
    }
}
