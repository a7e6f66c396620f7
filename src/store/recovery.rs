//! Rebuilding the broker from the store at start, and the metadata record of a live session.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::{debug, info};

use crate::broker::Broker;
use crate::session::registry::Parked;
use crate::session::{Inflight, Session, EXPIRY_NEVER};
use crate::stats::Stats;
use crate::wire::packet::Will;

use super::record::{self, SessionMeta};
use super::state::State;
use super::SessionLog;

/// The metadata record of a durable session: `will` is the connection's will while connected
/// (`disconnected_at` = None), or the delayed will still pending once disconnected.
pub fn session_meta(
    s: &Session,
    will: Option<&Will>,
    disconnected_at: Option<u64>,
) -> Option<SessionMeta> {
    let log = s.log.as_ref()?;
    let mut subscriptions: Vec<_> = s
        .subscriptions
        .iter()
        .map(|(f, sub)| (f.clone(), *sub))
        .collect();
    subscriptions.sort_by(|a, b| a.0.cmp(&b.0));
    Some(SessionMeta {
        client_id: s.client_id.clone(),
        incarnation: log.incarnation,
        protocol: s.protocol,
        expiry_interval: s.expiry_interval,
        disconnected_at,
        will: will.cloned(),
        subscriptions,
    })
}

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

/// Rebuild sessions and retained messages from `state` into `broker` (whose store is the one
/// the state came from). `last_write` (wall ms) stands for the moment sessions that were
/// connected lost their connection. Downtime counts: a session whose expiry passed is ended
/// (its pending will published), a will whose delay passed is published, and the others are
/// parked with what is left of their expiry and will delay.
pub fn restore(broker: &Arc<Broker>, state: State, last_write: u64) -> Restored {
    let started = std::time::Instant::now();
    let mut out = Restored::default();
    let Some(store) = broker.store.clone() else {
        return out;
    };
    let now_wall = record::wall_now();
    let now = Instant::now();
    for m in state.retained.into_values() {
        if !m.expired(now) {
            broker.retained.set(&m, &broker.stats);
            out.retained += 1;
        }
    }
    // Published once every session is back, so that they reach all of them.
    let mut due_wills = Vec::new();
    for stored in state.sessions.into_values() {
        let meta = stored.meta;
        let client_id = meta.client_id.clone();
        let log = Arc::new(SessionLog {
            store: store.clone(),
            client_id: client_id.clone(),
            incarnation: meta.incarnation,
        });
        let was_connected = meta.disconnected_at.is_none();
        let gone_at = meta.disconnected_at.unwrap_or(last_write);
        let down_ms = now_wall.saturating_sub(gone_at);
        // Seconds of life left; 0 = over.
        let left = match meta.expiry_interval {
            0 => 0,
            EXPIRY_NEVER => EXPIRY_NEVER,
            e => ceil_secs((u64::from(e) * 1000).saturating_sub(down_ms)),
        };
        // A connected client's will is due as after any abnormal close; a pending one keeps
        // what is left of its delay.
        let mut will = meta.will;
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
            log.end();
            out.expired += 1;
            Stats::incr(&broker.stats.sessions_expired);
            continue;
        }

        let mut session =
            broker.new_session(client_id.clone(), meta.protocol, meta.expiry_interval);
        for (filter, sub) in meta.subscriptions {
            broker.subscribe(&mut session, filter, sub);
        }
        for id in &stored.inbound {
            session.restore_inbound(*id);
        }
        let mut next_seq = 1;
        for (seq, e) in stored.queue {
            next_seq = seq + 1;
            out.messages += 1;
            match e.sent {
                Some((packet_id, state)) => session.restore_inflight(Inflight {
                    packet_id,
                    delivery: e.delivery,
                    state,
                    sent: false,
                }),
                None => {
                    // Before the log is attached: already stored, not written again.
                    session.mailbox.push(e.delivery, &broker.stats);
                }
            }
        }
        session.set_log(Some(log.clone()), next_seq);
        // Parked with what is left of its lifetime: the registry arms its timers from the
        // interval. The stored record keeps the original interval and disconnect time, so a
        // second restart computes from them again; a reconnect sets the interval anew.
        session.expiry_interval = left;
        if was_connected || had_will != will.is_some() {
            // What recovery decided must be on disk before the next restart: the crash time
            // as the disconnect time, and no will once it has been published. Otherwise every
            // restart would publish the will again and restart the expiry clock. Rebased to
            // now: `left` and the will's remaining delay count from here.
            if let Some(m) = session_meta(&session, will.as_ref(), Some(now_wall)) {
                log.meta(m);
            }
        }
        session.pending_will = will.into();
        match broker.registry.park_orphan(session, now) {
            Parked::Offline => out.sessions += 1,
            Parked::Ended(s) | Parked::Stale(s) | Parked::HandOver(s) => broker.end_session(s),
        }
    }
    for (client_id, w) in due_wills {
        broker.publish_will(&client_id, w, now);
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
