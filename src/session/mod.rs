//! Sessions: the state machine of one session (no I/O), its mailbox of queued deliveries, the
//! journal its durable state goes through, the registry that owns every session by Client ID,
//! and the timers that expire sessions and publish delayed wills.

pub mod expiry;
pub mod inspect;
pub mod machine;
pub mod mailbox;
pub mod registry;

pub use machine::{
    outbound_publish, InboundQos2, Inflight, OutState, PendingWill, Session, Subscription,
    Subscriptions, EXPIRY_NEVER,
};
