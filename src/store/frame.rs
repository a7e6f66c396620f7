//! How log files are framed: the 16-byte file header (magic, format version, kind) and
//! blocks `[len: u32 LE][crc32c: u32 LE][body: len bytes]`; the CRC-32C covers the body, so a
//! torn or overwritten tail is detected and cut off at the last whole block. What a body holds
//! is `record`'s business.

/// First bytes of every store file.
pub const MAGIC: &[u8; 8] = b"TETHERWL";
/// The format this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 2;
/// Header length: magic, version, kind.
pub const HEADER_LEN: usize = 16;
/// Block header length: length and CRC.
pub const BLOCK_HEADER: usize = 8;
/// Largest block accepted when reading; a larger length field means a corrupt block.
pub const MAX_BLOCK: usize = 1 << 30;
/// Blocks are closed past this size (a record larger than it gets a block of its own).
pub const BLOCK_TARGET: usize = 1 << 20;

/// What a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Records appended as they happened.
    Segment = 0,
    /// The compacted state of every file numbered up to and including it: replay starts here
    /// and files numbered below it are obsolete.
    Snapshot = 1,
}

/// The 16-byte file header.
pub fn header(kind: FileKind) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(kind as u32).to_le_bytes());
    h
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Not a tether store file (or cut before its header was complete).
    NotAStore,
    /// Written by a different format version.
    Version(u32),
    /// An unknown file kind.
    Kind(u32),
}

/// Parse a file header.
pub fn parse_header(b: &[u8]) -> Result<FileKind, HeaderError> {
    if b.len() < HEADER_LEN || &b[..8] != MAGIC {
        return Err(HeaderError::NotAStore);
    }
    let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if version != FORMAT_VERSION {
        return Err(HeaderError::Version(version));
    }
    match u32::from_le_bytes([b[12], b[13], b[14], b[15]]) {
        0 => Ok(FileKind::Segment),
        1 => Ok(FileKind::Snapshot),
        k => Err(HeaderError::Kind(k)),
    }
}

/// The reflected CRC-32C (Castagnoli) polynomial: the one x86-64 computes in hardware.
const CRC32C_POLY: u32 = 0x82F6_3B78;

/// CRC-32C of `data`: with the SSE 4.2 instruction where the CPU has it (every x86-64 server
/// of the last fifteen years), else slicing-by-8 tables. Every byte the writer writes and
/// every byte replay reads is checksummed, so this is on the store's hot path; a dependency
/// for 60 lines is not worth it.
pub fn crc32c(data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU supports SSE 4.2, checked just above.
        return unsafe { crc32c_sse42(data) };
    }
    crc32c_tables(data)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_sse42(data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut c = u64::from(!0u32);
    let mut chunks = data.chunks_exact(8);
    for b in &mut chunks {
        let v = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        c = _mm_crc32_u64(c, v);
    }
    let mut c = c as u32;
    for &b in chunks.remainder() {
        c = _mm_crc32_u8(c, b);
    }
    !c
}

/// CRC-32C in software, slicing-by-8: eight table lookups per 8 bytes instead of one per byte.
fn crc32c_tables(data: &[u8]) -> u32 {
    const fn tables() -> [[u32; 256]; 8] {
        let mut t = [[0u32; 256]; 8];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    CRC32C_POLY ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[0][i] = c;
            i += 1;
        }
        let mut i = 0;
        while i < 256 {
            let mut j = 1;
            while j < 8 {
                let prev = t[j - 1][i];
                t[j][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
                j += 1;
            }
            i += 1;
        }
        t
    }
    static T: [[u32; 256]; 8] = tables();
    let mut c = !0u32;
    let mut chunks = data.chunks_exact(8);
    for b in &mut chunks {
        let lo = c ^ u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let hi = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        c = T[7][(lo & 0xFF) as usize]
            ^ T[6][((lo >> 8) & 0xFF) as usize]
            ^ T[5][((lo >> 16) & 0xFF) as usize]
            ^ T[4][(lo >> 24) as usize]
            ^ T[3][(hi & 0xFF) as usize]
            ^ T[2][((hi >> 8) & 0xFF) as usize]
            ^ T[1][((hi >> 16) & 0xFF) as usize]
            ^ T[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = T[0][((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// Start a block at the end of `out`: a header to be filled by `seal_block` once the block's
/// records follow it. Returns the header's offset.
pub fn open_block(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0u8; BLOCK_HEADER]);
    at
}

/// Fill in the header of the block at `at`, whose records run to `end`.
pub fn seal_block(buf: &mut [u8], at: usize, end: usize) {
    let body = &buf[at + BLOCK_HEADER..end];
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let crc = crc32c(body);
    buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
    buf[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One block read from a buffer.
#[derive(Debug)]
pub enum Block<'a> {
    /// A whole block whose CRC matches: its body and total length.
    Ok(&'a [u8], usize),
    /// Nothing left.
    End,
    /// A torn or corrupt block starts here.
    Bad(&'static str),
}

/// Read the block at the start of `b`.
pub fn next_block(b: &[u8]) -> Block<'_> {
    if b.is_empty() {
        return Block::End;
    }
    if b.len() < BLOCK_HEADER {
        return Block::Bad("partial block header");
    }
    let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let crc = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    if len > MAX_BLOCK {
        return Block::Bad("block length out of range");
    }
    if b.len() - BLOCK_HEADER < len {
        return Block::Bad("block cut short");
    }
    let body = &b[BLOCK_HEADER..BLOCK_HEADER + len];
    if crc32c(body) != crc {
        return Block::Bad("checksum mismatch");
    }
    Block::Ok(body, BLOCK_HEADER + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c_tables(b"123456789"), 0xE306_9283);
        // Both implementations agree with the plain bytewise definition at every length and
        // alignment of the 8-byte chunks.
        let bytewise = |data: &[u8]| {
            let mut c = !0u32;
            for &b in data {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        CRC32C_POLY ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        };
        let data: Vec<u8> = (0..100u32).map(|i| (i * 37 + 11) as u8).collect();
        for start in 0..8 {
            for end in start..data.len() {
                let want = bytewise(&data[start..end]);
                assert_eq!(crc32c(&data[start..end]), want);
                assert_eq!(crc32c_tables(&data[start..end]), want);
            }
        }
    }
}
