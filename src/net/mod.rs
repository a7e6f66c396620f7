//! The network side: the acceptor, one task per connection (handshake, CONNECT, the session
//! claim, the read/write loop), and the per-packet protocol handling inside that task.

pub mod connection;
pub mod protocol;
pub mod server;
