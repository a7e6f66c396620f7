//! Builders shared by the unit tests of several modules.

use std::sync::Arc;

use crate::wire::message::{Delivery, Message};
use crate::wire::packet::QoS;

/// xorshift64: a deterministic generator, so a failing randomized test reproduces.
pub struct XorShift(pub u64);

impl XorShift {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A delivery of a fresh message on topic `a/b` at `qos`.
pub fn delivery(qos: QoS, payload: &'static [u8]) -> Delivery {
    Delivery {
        msg: Arc::new(Message {
            topic: "a/b".into(),
            payload: bytes::Bytes::from_static(payload),
            qos,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            publisher: None,
            stored: Default::default(),
            encoded: Default::default(),
        }),
        qos,
        retain: false,
        subscription_ids: vec![],
        seq: 0,
        acl_epoch: 0,
    }
}
