//! tether: an MQTT 3.1.1 / 5.0 broker daemon with sessions done right.
//!
//! The library holds the whole broker; `src/main.rs` is a thin command line over
//! [`net::server::run`], which takes an already bound listener so tests can bind port 0.
//!
//! The folders are the layers, each using only those listed before it (the README's
//! Architecture section has the module graph):
//! `config`, `stats`, `shutdown`, `memory` (leaves) < [`wire`] (the packet model, codec, topic
//! names, messages) < [`auth`], [`transport`] < [`session`] (the session state machine, its
//! mailbox and journal, the registry, expiry) < [`routing`] (topic index, router, retained) <
//! [`store`] (the log, one implementation of the journal) < [`broker`] < [`cluster`] < [`net`] (acceptor,
//! connection task, protocol) < [`ops`] (admin API, metrics, admin client) < `main`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod memory;
pub mod net;
pub mod ops;
pub mod routing;
pub mod session;
pub mod shutdown;
pub mod stats;
pub mod store;
#[cfg(test)]
mod testutil;
pub mod transport;
pub mod wire;
