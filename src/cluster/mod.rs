//! Groundwork for a cluster of tether nodes on NATS JetStream (issue #11): how topics and
//! filters map to NATS subjects. Nothing here runs yet; without a `[cluster]` section tether is
//! one self-contained process.

pub mod subject;
