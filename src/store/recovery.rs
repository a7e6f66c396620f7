//! What the log held at start, handed over as plain data: the broker rebuilds its sessions and
//! retained messages from a `journal::Recovered` (see `broker::restore`), and the store never
//! reaches into the registry or the broker.

use crate::session::journal::{Recovered, RecoveredEntry, RecoveredSession};

use super::state::State;

/// The replayed `state` as plain data; `last_write` (wall ms) is when the previous process
/// last wrote.
pub fn recovered(state: State, last_write: u64) -> Recovered {
    let sessions = state
        .sessions
        .into_values()
        .map(|stored| RecoveredSession {
            image: stored.meta,
            inbound: stored.inbound.into_iter().collect(),
            queue: stored
                .queue
                .into_values()
                .map(|e| RecoveredEntry {
                    delivery: e.delivery,
                    sent: e.sent,
                })
                .collect(),
        })
        .collect();
    Recovered {
        sessions,
        retained: state.retained.into_values().collect(),
        last_write,
    }
}
