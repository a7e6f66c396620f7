//! A connection's output: packets encoded in place, with large payloads kept as references to
//! the message's own buffer rather than copied, written to the socket with vectored writes.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

/// Payloads shorter than this are copied into the output: below it a copy costs less than
/// a chunk of its own (the write buffer split, a reference count on the message's buffer that
/// every subscriber's task takes and drops, a slot in the write vector). Measured in fan-out
/// 1->50 QoS 1 (5.0): referencing 64-byte payloads cost 20% of the throughput, 300-byte ones
/// 9%; at 1 KiB both ways were even, at 8 KiB referencing won by 14%.
pub const SHARE_PAYLOAD_FROM: usize = 1024;

/// Most slices one vectored write takes (the kernel's limit, `IOV_MAX`, is 1024; a write this
/// wide already moves tens of packets).
pub const MAX_SLICES: usize = 64;

/// Bytes waiting to be written, in order: the sealed `chunks`, then `tail`, which packets are
/// encoded into. Offsets and lengths count bytes of the whole sequence, so what the
/// connection holds back (output behind an acknowledgement not yet durable) is marked the
/// same as in one contiguous buffer.
#[derive(Debug, Default)]
pub struct OutBuf {
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    sealed: usize,
    tail: BytesMut,
}

impl OutBuf {
    /// An empty output; nothing is allocated until something is written.
    pub fn new() -> OutBuf {
        OutBuf::default()
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.sealed + self.tail.len()
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Give the buffers back while nothing waits, so an idle connection holds no write
    /// buffer (the next packet allocates a fresh one: an allocation per burst).
    pub fn release_if_empty(&mut self) {
        if self.is_empty() && (self.tail.capacity() > 0 || self.chunks.capacity() > 0) {
            *self = OutBuf::default();
        }
    }

    /// Where the next packet is encoded: the end of the output.
    pub fn buf_mut(&mut self) -> &mut BytesMut {
        &mut self.tail
    }

    /// Bytes `put_payload` copies into the output for a payload of `len` bytes.
    pub fn copied_len(len: usize) -> usize {
        if len < SHARE_PAYLOAD_FROM {
            len
        } else {
            0
        }
    }

    /// Append a payload: a short one is copied, a long one is referenced (no copy).
    pub fn put_payload(&mut self, payload: &Bytes) {
        if payload.len() < SHARE_PAYLOAD_FROM {
            self.tail.extend_from_slice(payload);
        } else {
            self.push_chunk(payload.clone());
        }
    }

    /// Append `chunk` by reference.
    pub fn push_chunk(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.seal();
        self.sealed += chunk.len();
        self.chunks.push_back(chunk);
    }

    /// Move what is in `tail` to the chunks; `tail` keeps its spare capacity for what follows.
    fn seal(&mut self) {
        if !self.tail.is_empty() {
            let head = self.tail.split().freeze();
            self.sealed += head.len();
            self.chunks.push_back(head);
        }
    }

    /// The first bytes waiting, as one slice (empty when nothing is).
    pub fn first_chunk(&self) -> &[u8] {
        match self.chunks.front() {
            Some(c) => c,
            None => &self.tail,
        }
    }

    /// The first `limit` bytes (or fewer) as one slice when nothing is referenced, the common
    /// case (short payloads, acknowledgements): a plain write then needs no slice vector.
    pub fn contiguous(&self, limit: usize) -> Option<&[u8]> {
        self.chunks
            .is_empty()
            .then(|| &self.tail[..limit.min(self.tail.len())])
    }

    /// Fill `slices` with the first `limit` bytes (or fewer); returns how many it filled.
    pub fn io_slices<'a>(&'a self, limit: usize, slices: &mut [IoSlice<'a>]) -> usize {
        let mut left = limit;
        let mut n = 0;
        let parts = self
            .chunks
            .iter()
            .map(|c| &c[..])
            .chain(std::iter::once(&self.tail[..]));
        for part in parts {
            if left == 0 || n == slices.len() {
                break;
            }
            if part.is_empty() {
                continue;
            }
            let take = part.len().min(left);
            slices[n] = IoSlice::new(&part[..take]);
            n += 1;
            left -= take;
        }
        n
    }

    /// `n` bytes from the front were written.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let take = n.min(front.len());
            front.advance(take);
            self.sealed -= take;
            n -= take;
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        let take = n.min(self.tail.len());
        self.tail.advance(take);
        if self.chunks.is_empty() && self.chunks.capacity() > 0 {
            // An idle connection keeps no chunk list: only connections sent large payloads
            // ever have one, and most of them go idle again.
            self.chunks = VecDeque::new();
        }
    }

    /// Everything from byte `at` on, taken out (`self` keeps the first `at` bytes).
    pub fn split_off(&mut self, at: usize) -> OutBuf {
        let mut rest = OutBuf::new();
        if at >= self.sealed {
            let at = (at - self.sealed).min(self.tail.len());
            rest.tail = self.tail.split_off(at);
            return rest;
        }
        // `at` falls in chunk `i`, `offset` bytes into it.
        let mut start = 0;
        let mut split = None;
        for (i, c) in self.chunks.iter().enumerate() {
            if at < start + c.len() {
                split = Some((i, at - start));
                break;
            }
            start += c.len();
        }
        let Some((i, offset)) = split else {
            return rest;
        };
        let mut moved = self.chunks.split_off(i);
        if offset > 0 {
            if let Some(first) = moved.front_mut() {
                let kept = first.split_to(offset);
                self.chunks.push_back(kept);
            }
        }
        rest.sealed = self.sealed - at;
        rest.chunks = moved;
        rest.tail = std::mem::take(&mut self.tail);
        self.sealed = at;
        rest
    }

    /// Keep only the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        drop(self.split_off(len));
    }

    /// Append everything in `other`.
    pub fn append(&mut self, mut other: OutBuf) {
        for c in other.chunks.drain(..) {
            self.push_chunk(c);
        }
        if !other.tail.is_empty() {
            if self.chunks.is_empty() {
                self.tail.unsplit(other.tail);
            } else {
                self.push_chunk(other.tail.freeze());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(o: &OutBuf) -> Vec<u8> {
        let mut slices = [IoSlice::new(&[]); 16];
        let n = o.io_slices(usize::MAX, &mut slices);
        slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    fn sample() -> OutBuf {
        let mut o = OutBuf::new();
        o.buf_mut().extend_from_slice(b"ab");
        o.put_payload(&Bytes::from(vec![b'x'; SHARE_PAYLOAD_FROM]));
        o.buf_mut().extend_from_slice(b"cd");
        o.put_payload(&Bytes::from_static(b"short"));
        o.push_chunk(Bytes::from_static(b"EF"));
        o.buf_mut().extend_from_slice(b"gh");
        assert!(o.contiguous(usize::MAX).is_none());
        o
    }

    #[test]
    fn without_chunks_the_output_is_one_slice() {
        let mut o = OutBuf::new();
        o.buf_mut().extend_from_slice(b"abc");
        o.put_payload(&Bytes::from_static(b"short"));
        assert_eq!(o.contiguous(4), Some(&b"abcs"[..]));
        assert_eq!(o.contiguous(100), Some(&b"abcshort"[..]));
    }

    fn expected() -> Vec<u8> {
        let mut v = b"ab".to_vec();
        v.extend(std::iter::repeat_n(b'x', SHARE_PAYLOAD_FROM));
        v.extend_from_slice(b"cdshortEFgh");
        v
    }

    #[test]
    fn keeps_order_and_length_across_chunks() {
        let o = sample();
        assert_eq!(o.len(), expected().len());
        assert_eq!(contents(&o), expected());
    }

    #[test]
    fn a_long_payload_is_referenced_not_copied() {
        let payload = Bytes::from(vec![7u8; SHARE_PAYLOAD_FROM]);
        let mut o = OutBuf::new();
        o.buf_mut().extend_from_slice(b"hdr");
        o.put_payload(&payload);
        let mut slices = [IoSlice::new(&[]); 4];
        assert_eq!(o.io_slices(usize::MAX, &mut slices), 2);
        assert_eq!(slices[1].as_ptr(), payload.as_ptr());
    }

    #[test]
    fn io_slices_stop_at_the_limit() {
        let o = sample();
        for limit in [
            0,
            1,
            2,
            3,
            100,
            SHARE_PAYLOAD_FROM + 2,
            SHARE_PAYLOAD_FROM + 5,
        ] {
            let mut slices = [IoSlice::new(&[]); 16];
            let n = o.io_slices(limit, &mut slices);
            let got: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
            assert_eq!(got, expected()[..limit]);
        }
    }

    #[test]
    fn advance_by_any_step_yields_the_rest() {
        let all = expected();
        for step in [1, 3, 7, 100, 1000] {
            let mut o = sample();
            let mut done = 0;
            while !o.is_empty() {
                let n = step.min(o.len());
                assert_eq!(o.first_chunk().first(), all.get(done));
                o.advance(n);
                done += n;
                assert_eq!(contents(&o), all[done..]);
            }
            assert_eq!(done, all.len());
        }
    }

    #[test]
    fn split_off_truncate_and_append_at_every_offset() {
        let all = expected();
        for at in 0..=all.len() {
            let mut o = sample();
            let rest = o.split_off(at);
            assert_eq!(contents(&o), all[..at], "at {at}");
            assert_eq!(contents(&rest), all[at..], "at {at}");
            assert_eq!(o.len() + rest.len(), all.len());
            o.append(rest);
            assert_eq!(contents(&o), all);
            o.truncate(at);
            assert_eq!(o.len(), at);
            assert_eq!(contents(&o), all[..at]);
            o.buf_mut().extend_from_slice(b"!");
            assert_eq!(contents(&o).last(), Some(&b'!'));
        }
    }
}
