//! Checked primitives for reading and writing MQTT data types (MQTT 5 section 1.5).
//!
//! Every read is bounds-checked: the frame is already complete when these run, so running out
//! of bytes means the packet lies about its own lengths (Malformed), never "read more".

use super::{DecodeError, EncodeError};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest value a Variable Byte Integer can carry (four bytes of seven bits).
pub(crate) const MAX_VBI: usize = 268_435_455;

/// Bytes needed to encode `v` as a Variable Byte Integer (callers keep `v <= MAX_VBI`).
pub(crate) fn vbi_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Result of scanning a Variable Byte Integer from the front of a slice.
pub(crate) enum Vbi {
    /// Value and number of bytes it took.
    Done(usize, usize),
    /// The slice ends inside the integer.
    Incomplete,
}

/// Parses a Variable Byte Integer, rejecting a fifth byte and non-minimal encodings
/// [MQTT-1.5.5-1]: both can only come from a broken or hostile peer.
pub(crate) fn scan_vbi(bytes: &[u8]) -> Result<Vbi, DecodeError> {
    let mut value = 0usize;
    for (i, &b) in bytes.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return Err(DecodeError::Malformed("non-minimal variable byte integer"));
            }
            return Ok(Vbi::Done(value, i + 1));
        }
    }
    if bytes.len() >= 4 {
        Err(DecodeError::Malformed(
            "variable byte integer longer than 4 bytes",
        ))
    } else {
        Ok(Vbi::Incomplete)
    }
}

/// A bounds-checked cursor over one frame's body; slices of it share the frame's memory.
pub(crate) struct Reader {
    buf: Bytes,
}

const TRUNCATED: DecodeError = DecodeError::Malformed("field runs past the end of the packet");

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Reader {
        Reader { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Fails when bytes are left over: a length field that does not match the content is a
    /// Malformed Packet, and accepting it would desynchronise us from the peer's intent.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(
                "unexpected bytes at the end of the packet",
            ))
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(TRUNCATED);
        }
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(TRUNCATED);
        }
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(TRUNCATED);
        }
        Ok(self.buf.get_u32())
    }

    pub(crate) fn vbi(&mut self) -> Result<usize, DecodeError> {
        match scan_vbi(&self.buf)? {
            Vbi::Done(v, n) => {
                self.buf.advance(n);
                Ok(v)
            }
            Vbi::Incomplete => Err(TRUNCATED),
        }
    }

    /// Zero-copy: the returned slice shares the frame's allocation.
    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(TRUNCATED);
        }
        Ok(self.buf.split_to(n))
    }

    /// Everything left, zero-copy (the PUBLISH payload).
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Binary Data: two-byte length then bytes.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }

    /// UTF-8 Encoded String: the one validator of every string field (topic names and
    /// filters, Client ID, User Name, will topic, string properties, User Property pairs).
    /// Rust's decoder rejects ill-formed sequences, over-long forms and surrogates
    /// U+D800..U+DFFF [MQTT-1.5.3-1, MQTT-1.5.4-1]; U+0000 is valid Unicode, so it is refused
    /// here [MQTT-1.5.3-2, MQTT-1.5.4-2]. Both are Malformed: 3.1.1 closes the connection, v5
    /// says 0x81 first.
    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        let s = std::str::from_utf8(&raw)
            .map_err(|_| DecodeError::Malformed("ill-formed UTF-8 string"))?;
        if s.contains('\0') {
            return Err(DecodeError::Malformed("U+0000 in a UTF-8 string"));
        }
        Ok(s.to_owned())
    }
}

/// Appends a Variable Byte Integer.
pub(crate) fn put_vbi(out: &mut BytesMut, mut v: usize) -> Result<(), EncodeError> {
    if v > MAX_VBI {
        return Err(EncodeError::Invalid(
            "value exceeds the variable byte integer range",
        ));
    }
    loop {
        let mut b = (v & 0x7f) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            return Ok(());
        }
    }
}

/// Binary Data; refuses lengths that do not fit the two-byte prefix instead of truncating
/// them into a corrupt frame (mqttbytes gap 8).
pub(crate) fn put_binary(out: &mut BytesMut, data: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(data.len())
        .map_err(|_| EncodeError::Invalid("string or binary field longer than 65535 bytes"))?;
    out.put_u16(len);
    out.put_slice(data);
    Ok(())
}

/// UTF-8 Encoded String (Rust strings are already valid UTF-8).
pub(crate) fn put_str(out: &mut BytesMut, s: &str) -> Result<(), EncodeError> {
    put_binary(out, s.as_bytes())
}

/// Starts a length-prefixed region whose size is not known yet. Writing into the buffer and
/// patching the prefix afterwards avoids a separate sizing pass and any scratch buffer.
pub(crate) fn begin_len(out: &mut BytesMut) -> usize {
    let pos = out.len();
    out.put_bytes(0, 4);
    pos
}

/// Patches the Variable Byte Integer reserved at `pos` with the length of what was written
/// since plus `extra` bytes the caller will append later, moving the content left when the
/// integer needs fewer than four bytes. Returns the encoded length value.
pub(crate) fn end_len(out: &mut BytesMut, pos: usize, extra: usize) -> Result<usize, EncodeError> {
    let end = out.len();
    let written = end - pos - 4;
    let value = written
        .checked_add(extra)
        .filter(|v| *v <= MAX_VBI)
        .ok_or(EncodeError::Invalid("length exceeds 268,435,455 bytes"))?;
    let n = vbi_len(value);
    let mut prefix = [0u8; 4];
    {
        // Encode into a stack array: put_vbi on a BytesMut would allocate.
        let mut v = value;
        for (i, slot) in prefix.iter_mut().enumerate().take(n) {
            let mut b = (v & 0x7f) as u8;
            v >>= 7;
            if i + 1 < n {
                b |= 0x80;
            }
            *slot = b;
        }
    }
    out[pos..pos + n].copy_from_slice(&prefix[..n]);
    out.copy_within(pos + 4..end, pos + n);
    out.truncate(end - (4 - n));
    Ok(value)
}
