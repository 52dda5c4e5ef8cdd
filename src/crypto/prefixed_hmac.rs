//! HMAC-SHA256 keyed once and resumed after a fixed prefix: the HS256 fast path.
//!
//! Every token one of our own HS256 keys signs starts with the same bytes: the encoded header
//! and the dot after it. HMAC (RFC 2104) is `H((K ^ opad) || H((K ^ ipad) || message))`, and
//! SHA-256 reads its input in 64-byte blocks, so the compression-function state after the
//! `K ^ ipad` block and the whole blocks of that prefix is the same for every such token, and so
//! is the state after the `K ^ opad` block. [`PrefixedHmac`] computes both once; a verification
//! then hashes only the rest of the signing input (the payload) and the one block of the outer
//! hash. The two states are exactly what the `hmac` crate or aws-lc keep between calls; keeping
//! them here as plain arrays means a verification copies 64 bytes instead of cloning a keyed MAC
//! object, and the final blocks are built on the stack.
//!
//! Only the HMAC construction is ours (a dozen lines: the key block, the two pads, SHA-256's
//! length padding); the compression function is `sha2`'s, which uses the CPU's SHA extensions.
//! A unit test compares tags with aws-lc-rs's HMAC for every prefix and message length across
//! three blocks and for keys shorter than, equal to and longer than a block. The states are
//! derived from the key, so they are wiped on drop and never printed.

use std::fmt;

use aws_lc_rs::constant_time::verify_slices_are_equal;
use sha2::block_api::compress256;
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

/// SHA-256's block size, in bytes.
const BLOCK: usize = 64;

/// SHA-256's initial state (FIPS 180-4 §5.3.3).
const IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// The length of an HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;

/// An HMAC-SHA256 key with a message prefix already absorbed.
pub struct PrefixedHmac {
    /// The inner hash's state after `K ^ ipad` and every whole block of the prefix.
    inner: [u32; 8],
    /// The outer hash's state after `K ^ opad`.
    outer: [u32; 8],
    /// The prefix's bytes past its last whole block (`pending_len` of them).
    pending: [u8; BLOCK],
    pending_len: usize,
    /// Bytes absorbed by the inner hash before `pending`, the ipad block included.
    absorbed: u64,
}

impl fmt::Debug for PrefixedHmac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrefixedHmac([redacted])")
    }
}

impl Drop for PrefixedHmac {
    fn drop(&mut self) {
        // The states are as good as the key for computing tags; `pending` is the public prefix.
        self.inner.zeroize();
        self.outer.zeroize();
    }
}

impl PrefixedHmac {
    /// Keys the HMAC with `key` (any length, as RFC 2104 allows) and absorbs `prefix`.
    pub fn new(key: &[u8], prefix: &[u8]) -> Self {
        let mut block = [0u8; BLOCK];
        if key.len() > BLOCK {
            let mut digest = Sha256::digest(key);
            block[..TAG_LEN].copy_from_slice(&digest);
            digest.zeroize();
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let pad = |byte: u8| {
            let mut padded = block.map(|b| b ^ byte);
            let mut state = IV;
            compress256(&mut state, &[padded]);
            padded.zeroize();
            state
        };
        let mut inner = pad(0x36);
        let outer = pad(0x5c);
        block.zeroize();

        let (whole, rest) = prefix.as_chunks::<BLOCK>();
        compress256(&mut inner, whole);
        let mut pending = [0u8; BLOCK];
        pending[..rest.len()].copy_from_slice(rest);
        PrefixedHmac {
            inner,
            outer,
            pending,
            pending_len: rest.len(),
            absorbed: (BLOCK + whole.len() * BLOCK) as u64,
        }
    }

    /// The tag of the prefix followed by `rest`.
    pub fn tag(&self, rest: &[u8]) -> [u8; TAG_LEN] {
        let mut state = self.inner;
        let total = self.absorbed + (self.pending_len + rest.len()) as u64;
        // The last one or two blocks: the unabsorbed bytes, 0x80, zeros, the length in bits.
        let mut last = [0u8; 2 * BLOCK];
        let tail = if self.pending_len == 0 {
            let (whole, tail) = rest.as_chunks::<BLOCK>();
            compress256(&mut state, whole);
            last[..tail.len()].copy_from_slice(tail);
            tail.len()
        } else {
            let fill = BLOCK - self.pending_len;
            if rest.len() < fill {
                last[..self.pending_len].copy_from_slice(&self.pending[..self.pending_len]);
                last[self.pending_len..self.pending_len + rest.len()].copy_from_slice(rest);
                self.pending_len + rest.len()
            } else {
                let mut first = self.pending;
                first[self.pending_len..].copy_from_slice(&rest[..fill]);
                compress256(&mut state, &[first]);
                let (whole, tail) = rest[fill..].as_chunks::<BLOCK>();
                compress256(&mut state, whole);
                last[..tail.len()].copy_from_slice(tail);
                tail.len()
            }
        };
        last[tail] = 0x80;
        let blocks = if tail + 9 <= BLOCK { 1 } else { 2 };
        last[blocks * BLOCK - 8..blocks * BLOCK].copy_from_slice(&(total * 8).to_be_bytes());
        compress256(&mut state, &last.as_chunks::<BLOCK>().0[..blocks]);

        // The outer hash: `K ^ opad` (absorbed), the inner digest, then its padding; 96 bytes.
        let mut block = [0u8; BLOCK];
        for (word, out) in state.iter().zip(block.chunks_exact_mut(4)) {
            out.copy_from_slice(&word.to_be_bytes());
        }
        block[TAG_LEN] = 0x80;
        block[BLOCK - 8..].copy_from_slice(&((BLOCK + TAG_LEN) as u64 * 8).to_be_bytes());
        let mut outer = self.outer;
        compress256(&mut outer, &[block]);
        let mut tag = [0u8; TAG_LEN];
        for (word, out) in outer.iter().zip(tag.chunks_exact_mut(4)) {
            out.copy_from_slice(&word.to_be_bytes());
        }
        tag
    }

    /// Whether `tag` is the tag of the prefix followed by `rest`, compared in constant time
    /// (a tag of another length is refused without comparing).
    pub fn verify(&self, rest: &[u8], tag: &[u8]) -> bool {
        verify_slices_are_equal(&self.tag(rest), tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::hmac;

    use super::*;

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn agrees_with_aws_lc_for_every_split_across_three_blocks() {
        for key_len in [0, 1, 32, 63, 64, 65, 100, 200] {
            let key = bytes(key_len, 7);
            let reference = hmac::Key::new(hmac::HMAC_SHA256, &key);
            let message = bytes(3 * BLOCK + 9, 101);
            for prefix_len in 0..=message.len() {
                let prefixed = PrefixedHmac::new(&key, &message[..prefix_len]);
                // Every rest length for a few prefixes, every prefix for a few rests.
                let rest_lens: Vec<usize> = if prefix_len % 61 == 0 || prefix_len == 64 {
                    (0..=message.len() - prefix_len).collect()
                } else {
                    vec![0, message.len() - prefix_len]
                };
                for rest_len in rest_lens {
                    let whole = &message[..prefix_len + rest_len];
                    let expected = hmac::sign(&reference, whole);
                    let rest = &message[prefix_len..prefix_len + rest_len];
                    assert_eq!(
                        prefixed.tag(rest).as_slice(),
                        expected.as_ref(),
                        "key {key_len}, prefix {prefix_len}, rest {rest_len}"
                    );
                    assert!(prefixed.verify(rest, expected.as_ref()));
                }
            }
        }
    }

    #[test]
    fn refuses_any_other_tag() {
        let prefixed = PrefixedHmac::new(b"key", b"header.");
        let tag = prefixed.tag(b"payload");
        assert!(prefixed.verify(b"payload", &tag));
        assert!(!prefixed.verify(b"payload!", &tag));
        assert!(!prefixed.verify(b"payload", &tag[..31]));
        assert!(!prefixed.verify(b"payload", &[tag.as_slice(), &[0]].concat()));
        for i in 0..TAG_LEN {
            let mut bad = tag;
            bad[i] ^= 1;
            assert!(!prefixed.verify(b"payload", &bad));
        }
    }

    #[test]
    fn debug_shows_no_state() {
        let prefixed = PrefixedHmac::new(b"key", b"");
        assert_eq!(format!("{prefixed:?}"), "PrefixedHmac([redacted])");
    }
}
