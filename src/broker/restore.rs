//! Rebuilding the broker at start from what its journal recovered (plain data, see
//! `journal::Recovered`). Downtime counts: a session whose expiry passed is ended (its pending
//! will published), a will whose delay passed is published, and the others are parked with
//! what is left of their expiry and will delay.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::{debug, info};

use crate::session::journal::{self, ImageKind, Recovered, SessionJournal};
use crate::session::registry::Parked;
use crate::session::{Inflight, EXPIRY_NEVER};
use crate::stats::Stats;

use super::Broker;

/// What recovery did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Sessions parked again.
    pub sessions: usize,
    /// Sessions whose expiry passed while the broker was down.
    pub expired: usize,
    /// Wills published because their delay passed while the broker was down.
    pub wills: usize,
    /// Messages queued or in flight, over all sessions.
    pub messages: usize,
    /// Retained messages.
    pub retained: usize,
}

/// Milliseconds -> whole seconds, rounded up (a deadline is never brought forward).
fn ceil_secs(ms: u64) -> u32 {
    u32::try_from(ms.div_ceil(1000)).unwrap_or(EXPIRY_NEVER - 1)
}

impl Broker {
    /// Rebuild sessions and retained messages from `recovered`, which came from this broker's
    /// journal. Sessions that were connected when the previous process stopped count as
    /// disconnected at `recovered.last_write`.
    pub fn restore(self: &Arc<Broker>, recovered: Recovered) -> Restored {
        let started = std::time::Instant::now();
        let mut out = Restored::default();
        let now_wall = journal::wall_now();
        let now = Instant::now();
        for m in recovered.retained {
            if !m.expired(now) {
                self.retained.set(&m, &self.stats);
                out.retained += 1;
            }
        }
        // Published once every session is back, so that they reach all of them.
        let mut due_wills = Vec::new();
        for stored in recovered.sessions {
            let image = stored.image;
            let client_id = image.client_id.clone();
            let handle = SessionJournal::resume(&self.journal, image.incarnation);
            let was_connected = image.disconnected_at.is_none();
            let gone_at = image.disconnected_at.unwrap_or(recovered.last_write);
            let down_ms = now_wall.saturating_sub(gone_at);
            // Seconds of life left; 0 = over.
            let left = match image.expiry_interval {
                0 => 0,
                EXPIRY_NEVER => EXPIRY_NEVER,
                e => ceil_secs((u64::from(e) * 1000).saturating_sub(down_ms)),
            };
            // A connected client's will is due as after any abnormal close; a pending one
            // keeps what is left of its delay.
            let mut will = image.will;
            let had_will = will.is_some();
            if let Some(w) = &mut will {
                let delay_left = (u64::from(w.delay_interval) * 1000).saturating_sub(down_ms);
                if delay_left == 0 || left == 0 {
                    if let Some(w) = will.take() {
                        debug!(client_id = %client_id, connected = was_connected, "will due after restart");
                        due_wills.push((client_id.clone(), w));
                    }
                } else {
                    w.delay_interval = ceil_secs(delay_left);
                }
            }
            if left == 0 {
                handle.ended();
                out.expired += 1;
                Stats::incr(&self.stats.sessions_expired);
                continue;
            }

            let mut session =
                self.new_session(client_id.clone(), image.protocol, image.expiry_interval);
            for (filter, sub) in image.subscriptions {
                self.subscribe(&mut session, filter, sub);
            }
            for id in &stored.inbound {
                session.restore_inbound(*id);
            }
            let mut next_seq = 1;
            for e in stored.queue {
                next_seq = e.delivery.seq + 1;
                out.messages += 1;
                match e.sent {
                    Some((packet_id, state)) => session.restore_inflight(Inflight {
                        packet_id,
                        delivery: e.delivery,
                        state,
                        sent: false,
                    }),
                    None => {
                        // Before the journal is attached: already stored, not written again.
                        session.mailbox.push(e.delivery, &self.stats);
                    }
                }
            }
            session.set_journal(handle, next_seq);
            // Parked with what is left of its lifetime: the registry arms its timers from the
            // interval. The stored image keeps the original interval and disconnect time, so a
            // second restart computes from them again; a reconnect sets the interval anew.
            session.expiry_interval = left;
            if was_connected || had_will != will.is_some() {
                // What recovery decided must be durable before the next restart: the crash
                // time as the disconnect time, and no will once it has been published.
                // Otherwise every restart would publish the will again and restart the expiry
                // clock. Rebased to now: `left` and the will's remaining delay count from here.
                session.journal_image(ImageKind::Changed, will.as_ref(), Some(now_wall));
            }
            session.pending_will = will.into();
            match self.registry.park_orphan(session, now) {
                Parked::Offline => out.sessions += 1,
                Parked::Ended(s) | Parked::Stale(s) | Parked::HandOver(s) => self.end_session(s),
            }
        }
        for (client_id, w) in due_wills {
            self.publish_will(&client_id, w, now);
            out.wills += 1;
        }
        info!(
            sessions = out.sessions,
            expired = out.expired,
            wills = out.wills,
            messages = out.messages,
            retained = out.retained,
            ms = started.elapsed().as_millis() as u64,
            "sessions restored"
        );
        out
    }
}
