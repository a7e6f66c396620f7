//! Sessions, in layers: the values a session is made of (`parts`), the journal its durable
//! state goes through, its mailbox of queued deliveries, the state machine of one session (no
//! I/O), and above them the registry that owns every session by Client ID, the timers that
//! expire sessions and publish delayed wills, and read-only views for the admin API.

pub mod expiry;
pub mod inspect;
pub mod journal;
pub mod machine;
pub mod mailbox;
pub mod parts;
pub mod registry;

pub use machine::{
    outbound_publish, InboundQos2, Inflight, PendingWill, Session, Subscriptions, EXPIRY_NEVER,
};
pub use parts::{OutState, Subscription};
