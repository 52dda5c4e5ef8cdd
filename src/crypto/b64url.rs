//! Strict unpadded base64url decoding (RFC 4648 §5, RFC 7515 §2) into a caller's buffer.
//!
//! Token verification decodes two parts of every token it checks (signature and payload). The
//! `base64` crate is correct but sized for general use; for an HS256 token the decode was a
//! visible share of the whole verification, whose target is 80% of a bare HMAC. This decoder does
//! one table lookup per character, writes into a buffer the caller owns, and checks validity once
//! per part instead of once per character.
//!
//! It accepts exactly what `base64::engine::general_purpose::URL_SAFE_NO_PAD` accepts (a unit test
//! compares the two): the URL-safe alphabet, no padding, no whitespace, a length that is not 1
//! modulo 4, and zero bits in the unused low bits of the last character (canonical encoding).

/// Marks a byte that is not in the base64url alphabet.
const INVALID: u8 = 0xFF;

/// Maps each byte to its 6-bit value, or [`INVALID`].
static DECODE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut i = 0;
    while i < alphabet.len() {
        table[alphabet[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// The decoded length of `encoded_len` base64url characters, or `None` when no unpadded encoding
/// has that length.
pub fn decoded_len(encoded_len: usize) -> Option<usize> {
    let tail = match encoded_len % 4 {
        0 => 0,
        1 => return None,
        2 => 1,
        _ => 2,
    };
    Some(encoded_len / 4 * 3 + tail)
}

/// Decodes `input` into the start of `out` and returns the decoded length, or `None` when
/// `input` is not canonical unpadded base64url or `out` is too short. On `None` the contents of
/// `out` are unspecified.
pub fn decode_into(input: &[u8], out: &mut [u8]) -> Option<usize> {
    let len = decoded_len(input.len())?;
    let out = out.get_mut(..len)?;
    let full = input.len() / 4;
    // Every table entry of a valid character is below 64, so OR-ing them all and testing the
    // high bit once at the end tells whether any character was invalid.
    let mut seen = 0u8;
    for (chunk, dst) in input.chunks_exact(4).zip(out.chunks_exact_mut(3)) {
        let a = DECODE[chunk[0] as usize];
        let b = DECODE[chunk[1] as usize];
        let c = DECODE[chunk[2] as usize];
        let d = DECODE[chunk[3] as usize];
        seen |= a | b | c | d;
        let word = (u32::from(a) << 18) | (u32::from(b) << 12) | (u32::from(c) << 6) | u32::from(d);
        dst[0] = (word >> 16) as u8;
        dst[1] = (word >> 8) as u8;
        dst[2] = word as u8;
    }
    let rest = &input[full * 4..];
    let dst = &mut out[full * 3..];
    match *rest {
        [] => {}
        [a, b] => {
            let (a, b) = (DECODE[a as usize], DECODE[b as usize]);
            seen |= a | b;
            // The low 4 bits of the last character carry no data and must be zero.
            if b & 0x0F != 0 {
                return None;
            }
            dst[0] = (a << 2) | (b >> 4);
        }
        [a, b, c] => {
            let (a, b, c) = (DECODE[a as usize], DECODE[b as usize], DECODE[c as usize]);
            seen |= a | b | c;
            if c & 0x03 != 0 {
                return None;
            }
            dst[0] = (a << 2) | (b >> 4);
            dst[1] = (b << 4) | (c >> 2);
        }
        _ => unreachable!("decoded_len refused a remainder of 1"),
    }
    (seen & 0x80 == 0).then_some(len)
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;

    fn decode(input: &[u8]) -> Option<Vec<u8>> {
        let mut out = vec![0u8; decoded_len(input.len())?];
        let len = decode_into(input, &mut out)?;
        out.truncate(len);
        Some(out)
    }

    #[test]
    fn round_trips_every_length_and_byte() {
        let bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for len in 0..bytes.len() {
            let encoded = URL_SAFE_NO_PAD.encode(&bytes[..len]);
            assert_eq!(decode(encoded.as_bytes()).as_deref(), Some(&bytes[..len]));
        }
    }

    #[test]
    fn accepts_exactly_what_the_base64_crate_accepts() {
        // A deterministic xorshift stream over an alphabet of valid, near-miss and padding
        // characters; every input is judged by both decoders.
        let alphabet = b"AQgw_-zZ09+/= .\n\xC3";
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..50_000 {
            let len = (next() % 12) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    // Mostly valid characters, so that the trailing-bits rules are exercised.
                    if r % 8 == 0 {
                        alphabet[(r >> 8) as usize % alphabet.len()]
                    } else {
                        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                            [(r >> 8) as usize % 64]
                    }
                })
                .collect();
            assert_eq!(
                decode(&input),
                URL_SAFE_NO_PAD.decode(&input).ok(),
                "input {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    #[test]
    fn refuses_a_short_output_buffer() {
        let mut out = [0u8; 2];
        assert_eq!(decode_into(b"AAAA", &mut out), None);
    }
}
