//! tether: an MQTT 3.1.1 / 5.0 broker daemon with sessions done right.
//!
//! The library holds the whole broker; `src/main.rs` is a thin command line over
//! [`server::run`], which takes an already bound listener so tests can bind port 0.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod admin_client;
pub mod auth;
pub mod broker;
pub mod codec;
pub mod config;
pub mod connection;
pub mod expiry;
pub mod http;
pub mod index;
pub mod inspect;
pub mod mailbox;
pub mod memory;
pub mod message;
pub mod packet;
pub mod protocol;
pub mod registry;
pub mod retain;
pub mod router;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod stats;
pub mod store;
#[cfg(test)]
mod testutil;
pub mod topic;
pub mod transport;
