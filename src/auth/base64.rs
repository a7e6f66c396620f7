//! Standard base64 (RFC 4648 section 4 alphabet, `=` padding), just enough for password hashes.
//!
//! Our own rather than a crate: the password file needs a few dozen bytes encoded and decoded,
//! not worth a dependency.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// `data` in base64 with `=` padding.
pub(crate) fn encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b0 = chunk[0];
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let n = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 0x3f) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

fn value(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// Decodes base64 with or without trailing `=` padding; `None` for any other character, padding
/// anywhere but the end, or a length no encoder produces.
///
/// Unused low bits of the last character are ignored rather than checked, as OpenSSL (which
/// Mosquitto uses) does, so any file Mosquitto reads we read too.
pub(crate) fn decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let body = match bytes.iter().position(|&b| b == b'=') {
        Some(pad_at) => {
            let padding = &bytes[pad_at..];
            // Padding only ever completes the final group of four, with one or two '='.
            if padding.len() > 2 || padding.iter().any(|&b| b != b'=') || bytes.len() % 4 != 0 {
                return None;
            }
            &bytes[..pad_at]
        }
        None => bytes,
    };
    // One character left over carries only 6 bits, less than a byte: no encoder makes that.
    if body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for group in body.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in group.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i as u32);
        }
        out.push((n >> 16) as u8);
        if group.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if group.len() > 3 {
            out.push(n as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(encode(plain.as_bytes()), encoded);
            assert_eq!(decode(encoded).unwrap(), plain.as_bytes());
            let unpadded = encoded.trim_end_matches('=');
            assert_eq!(decode(unpadded).unwrap(), plain.as_bytes(), "{unpadded}");
        }
    }

    #[test]
    fn round_trips_every_length_and_byte() {
        let data: Vec<u8> = (0..=255u8).collect();
        for len in 0..data.len() {
            let slice = &data[..len];
            let encoded = encode(slice);
            assert_eq!(decode(&encoded).unwrap(), slice);
            assert_eq!(decode(encoded.trim_end_matches('=')).unwrap(), slice);
        }
        // Uses both non-alphanumeric characters of the alphabet.
        assert_eq!(encode(&[0xfb, 0xff]), "+/8=");
        assert_eq!(decode("+/8=").unwrap(), [0xfb, 0xff]);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "Z", "Zm9vY", "Zg=", "Z===", "Zg==Zg==", "Zm=v", "Zm9v-A==", "Zm 9v", "====",
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}
