//! Operating the broker: the admin HTTP API and Prometheus metrics, the small HTTP server under
//! them, and the client the `tether` command line uses to talk to a running broker.

pub mod admin;
pub mod admin_client;
pub mod http;
