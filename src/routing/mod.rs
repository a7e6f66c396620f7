//! Where a message goes: the topic index of subscriptions, the router that pushes a message into
//! every matching session's mailbox, and the retained messages.

pub mod index;
pub mod retain;
pub mod router;
