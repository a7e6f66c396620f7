//! The small values a session's state is made of, shared by the state machine, its journal
//! and the router: the options of one subscription, and where an outbound QoS 1/2 flow stands.

use crate::wire::packet::{QoS, RetainHandling, SubscribeFilter};

/// One subscription held by a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// Granted (maximum) QoS.
    pub qos: QoS,
    /// v5 No Local: do not deliver the session's own publications.
    pub no_local: bool,
    /// v5 Retain As Published.
    pub retain_as_published: bool,
    /// v5 Retain Handling.
    pub retain_handling: RetainHandling,
    /// v5 Subscription Identifier.
    pub identifier: Option<u32>,
}

impl Subscription {
    /// The subscription a SUBSCRIBE filter asks for, granted at the QoS requested.
    pub fn from_request(f: &SubscribeFilter, identifier: Option<u32>) -> Subscription {
        Subscription {
            qos: f.qos,
            no_local: f.no_local,
            retain_as_published: f.retain_as_published,
            retain_handling: f.retain_handling,
            identifier,
        }
    }
}

/// Where an outbound QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutState {
    /// QoS 1 PUBLISH sent, waiting for PUBACK.
    AwaitPubAck,
    /// QoS 2 PUBLISH sent, waiting for PUBREC.
    AwaitPubRec,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitPubComp,
}
