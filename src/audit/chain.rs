//! The tamper-evident core of the audit trail: canonical form, hash chain,
//! chain verification with a precise diagnosis, and signed checkpoints.
//!
//! This module exists so that "was the audit log altered?" has one pure,
//! independently re-implementable answer. It does no IO: the store layer maps
//! `audit_log` rows to [`AuditRecord`] and streams them in, the
//! `audit-checkpoint` job persists [`Checkpoint`]s outside the database, and
//! the CLI turns a [`VerifyReport`] into output and an exit code.
//!
//! # Canonical form (version 1)
//!
//! The hash of a row is `lowercase_hex(SHA-256(canonical))`, where
//! `canonical` is the concatenation of the following items, in this order.
//! `u64be(n)` is `n` as 8 bytes big-endian; `i64be(n)` is `n` as 8 bytes
//! big-endian two's complement; `lp(bytes)` is `u64be(len(bytes)) || bytes`.
//!
//! 1. `lp("keywarden.audit.v1")` (a domain tag, so the bytes can never be
//!    confused with another structure hashed by this program);
//! 2. `i64be(seq)`;
//! 3. `i64be(at_ms)` (milliseconds since the Unix epoch, UTC);
//! 4. `lp(utf8(actor))`;
//! 5. `lp(utf8(action))`;
//! 6. the target: the single byte `0x00` when absent, otherwise the byte
//!    `0x01` followed by `lp(utf8(target))` (so "absent" and "empty" differ);
//! 7. `lp(utf8(outcome))`;
//! 8. `lp(canonical_json(details))`;
//! 9. `lp(ascii(prev_hash))`, the previous row's hash exactly as stored (64
//!    lowercase hex characters; [`GENESIS_HASH`] for the first row).
//!
//! `canonical_json` writes JSON without any whitespace:
//!
//! - `null`, `true`, `false` as those literals;
//! - integers in plain decimal (`-12`, `0`, `18446744073709551615`); other
//!   numbers the way `serde_json` prints them (shortest round-trip form such
//!   as `1.5` or `1e20`). Writers should put only integers, strings, booleans,
//!   arrays and objects in `details`: a float read back from a database's JSON
//!   column is not guaranteed to be bit-identical, and the row would then no
//!   longer verify;
//! - strings in double quotes; `"` and `\` are escaped as `\"` and `\\`;
//!   U+0008, U+0009, U+000A, U+000C and U+000D as `\b`, `\t`, `\n`, `\f`,
//!   `\r`; every other code point below U+0020 as `\u00xx` (lowercase hex);
//!   everything else, including non-ASCII, as raw UTF-8;
//! - arrays as `[` elements joined by `,` `]`;
//! - objects as `{` `"key":value` pairs joined by `,` `}`, with keys sorted
//!   by their UTF-8 bytes, ascending, at every depth.
//!
//! # The chain
//!
//! Rows have contiguous sequence numbers. Without retention the chain starts
//! at seq 1 whose `prev_hash` is [`GENESIS_HASH`]; row `n + 1` stores row
//! `n`'s hash as its `prev_hash`. The store must therefore assign
//! `seq = head.seq + 1` inside the writing transaction (not from a database
//! sequence, which leaves gaps on rollback). After retention deleted the rows
//! up to seq `k`, verification resumes from an [`Anchor`] holding `k` and the
//! hash of row `k`.
//!
//! # Checkpoints
//!
//! A [`Checkpoint`] pins `(seq, head_hash, at_ms)` with
//! `lowercase_hex(HMAC-SHA256(key, mac_input))`, where `mac_input` is
//! `lp("keywarden.audit.checkpoint.v1") || i64be(seq) || lp(ascii(head_hash))
//! || i64be(at_ms)` and the key is `derive_key(root, CHECKPOINT_KEY_LABEL)`.
//! It lets verification detect what the chain alone cannot: a truncated tail
//! and a chain rewritten consistently from some row onwards.
//!
//! # Diagnosis
//!
//! [`verify`] walks the rows in the order given, accepts every row that is
//! the proper successor of the last accepted one, and stops at the first row
//! that is not. It then reads the remaining rows once, keeping a constant
//! number of facts about them, and names the breakage. "Row N" always means
//! sequence number N:
//!
//! - [`Breakage::Changed`]: a row's content no longer hashes to its `hash`
//!   (any field, including `prev_hash` and `hash`); names that row. When only
//!   the `seq` field was altered (the content hashes correctly under another
//!   seq that the surrounding rows confirm), names the original seq, even if
//!   the database now returns the row elsewhere in the order. A row that
//!   hashes correctly, has the expected seq, but does not chain to its
//!   predecessor is also reported as changed ("replaced").
//! - [`Breakage::Deleted`]: the seq jumps and nothing explains the gap; names
//!   the first missing seq (always known: it is the last good seq + 1).
//! - [`Breakage::Reordered`]: the rows are present but out of place; names the
//!   first position where the order breaks, that is the seq that belongs
//!   there. Two shapes are recognised: rows returned out of seq order (for
//!   example an export whose lines were swapped), and two rows whose contents
//!   were swapped while the `seq` column stayed in place.
//! - [`Breakage::Inserted`]: a row that hashes correctly over its own content
//!   but has no place in the chain (its seq is already taken, or the chain
//!   continues without it); names the seq the inserted row claims. A forged
//!   row appended after the head with seq `head + 1` and the head's hash as
//!   `prev_hash` is indistinguishable from a genuine new event; so is one at
//!   the very end that claims a far-off seq (it reads as a deletion).
//! - [`Breakage::Truncated`]: the rows end before the checkpoint's seq; names
//!   the last seq present + 1.
//! - [`Breakage::Rewritten`]: the row at the checkpoint's seq verifies in the
//!   chain but its hash differs from the checkpoint's head hash. A checkpoint
//!   pins only the head, so the rewrite started at or before that row and the
//!   report names the checkpoint's seq.
//! - [`Breakage::BadCheckpoint`]: the checkpoint's MAC does not verify. This
//!   is checked before any row is read; no row is named.
//! - [`Breakage::StaleCheckpoint`]: the checkpoint pins a seq before the
//!   retention anchor, so it vouches for nothing that remains. This fails
//!   closed: otherwise moving the anchor past the checkpoint would disarm it.

use aws_lc_rs::{digest, hkdf, hmac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroize::Zeroizing;

/// The `prev_hash` of the first row of a chain: 64 hex zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The domain tag that starts every row's canonical bytes.
pub const ROW_TAG: &str = "keywarden.audit.v1";

/// The domain tag that starts every checkpoint's MAC input.
pub const CHECKPOINT_TAG: &str = "keywarden.audit.checkpoint.v1";

/// The [`derive_key`] label of the key that signs checkpoints.
pub const CHECKPOINT_KEY_LABEL: &str = "keywarden/audit/checkpoint/v1";

/// The [`derive_key`] label of the key that redacts identifiers.
pub const IDENTIFIER_KEY_LABEL: &str = "keywarden/audit/identifier/v1";

/// The fixed HKDF salt used by [`derive_key`].
pub const KDF_SALT: &str = "keywarden.kdf.v1";

/// One audit event as stored (the store layer maps DB rows to this).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain; contiguous, starting at 1.
    pub seq: i64,
    /// When the event happened, in milliseconds since the Unix epoch (UTC).
    pub at_ms: i64,
    /// Who acted: operator and host, worker id, or API key id.
    pub actor: String,
    /// What happened, e.g. `key.rotated`.
    pub action: String,
    /// The kid or object acted on, if any.
    pub target: Option<String>,
    /// How it ended, e.g. `ok`, `denied`, `failed`.
    pub outcome: String,
    /// Structured extras; identifiers of secrets and people only as [`redact_identifier`] output.
    pub details: Value,
    /// The previous row's `hash` (hex), or [`GENESIS_HASH`].
    pub prev_hash: String,
    /// `hex(SHA-256(canonical))` of this row.
    pub hash: String,
}

/// An event about to be appended; [`seal`] turns it into an [`AuditRecord`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// When the event happened, in milliseconds since the Unix epoch (UTC).
    pub at_ms: i64,
    /// Who acted.
    pub actor: String,
    /// What happened.
    pub action: String,
    /// The kid or object acted on, if any.
    pub target: Option<String>,
    /// How it ended.
    pub outcome: String,
    /// Structured extras.
    pub details: Value,
}

/// Where verification starts: after retention deleted older rows, the chain
/// resumes from an anchor (the seq and hash of the last deleted row).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// Seq of the last deleted row (0 for the start of the chain).
    pub seq: i64,
    /// Hash of the last deleted row ([`GENESIS_HASH`] for the start of the chain).
    pub hash: String,
}

impl Anchor {
    /// The start of a chain that never lost a row: seq 0 and [`GENESIS_HASH`].
    pub fn genesis() -> Self {
        Anchor {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    }

    /// The anchor to record when `last_deleted` is the newest row retention removes.
    pub fn after(last_deleted: &AuditRecord) -> Self {
        Anchor {
            seq: last_deleted.seq,
            hash: last_deleted.hash.clone(),
        }
    }
}

/// A checkpoint written outside the database by the audit-checkpoint job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Seq of the head row when the checkpoint was taken.
    pub seq: i64,
    /// Hash of that row.
    pub head_hash: String,
    /// When the checkpoint was taken, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// `hex(HMAC-SHA256(key, mac_input))`; see the module documentation.
    pub mac: String,
}

impl Checkpoint {
    /// Signs `(seq, head_hash, at_ms)` with HMAC-SHA256 under `key`
    /// (normally `derive_key(root, CHECKPOINT_KEY_LABEL)`).
    pub fn sign(seq: i64, head_hash: &str, at_ms: i64, key: &[u8]) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, key);
        let tag = hmac::sign(&key, &Self::mac_input(seq, head_hash, at_ms));
        Checkpoint {
            seq,
            head_hash: head_hash.to_owned(),
            at_ms,
            mac: hex::encode(tag.as_ref()),
        }
    }

    /// Whether the MAC matches the other fields under `key`; the comparison
    /// is constant-time (aws-lc-rs `hmac::verify`).
    pub fn verify_mac(&self, key: &[u8]) -> bool {
        let Ok(tag) = hex::decode(&self.mac) else {
            return false;
        };
        let key = hmac::Key::new(hmac::HMAC_SHA256, key);
        hmac::verify(
            &key,
            &Self::mac_input(self.seq, &self.head_hash, self.at_ms),
            &tag,
        )
        .is_ok()
    }

    fn mac_input(seq: i64, head_hash: &str, at_ms: i64) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + head_hash.len());
        put_lp(&mut out, CHECKPOINT_TAG.as_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        put_lp(&mut out, head_hash.as_bytes());
        out.extend_from_slice(&at_ms.to_be_bytes());
        out
    }
}

/// What kind of tampering [`verify`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Breakage {
    /// A row's content or seq was altered, or the row was replaced.
    Changed,
    /// One or more rows are missing from the middle (or start) of the chain.
    Deleted,
    /// Rows are present but out of place.
    Reordered,
    /// A row with no place in the chain was added.
    Inserted,
    /// The rows end before the checkpoint's seq.
    Truncated,
    /// The chain was rewritten consistently; only the checkpoint shows it.
    Rewritten,
    /// The checkpoint's MAC does not verify.
    BadCheckpoint,
    /// The checkpoint predates the retention anchor and pins nothing that remains.
    StaleCheckpoint,
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VerifyReport {
    /// True when the chain (and the checkpoint, if given) verified.
    pub ok: bool,
    /// How many rows verified as an unbroken chain before the first breakage
    /// (all of them when `ok`).
    pub rows: u64,
    /// The seq the breakage names (see the module documentation per kind).
    pub first_bad_row: Option<i64>,
    /// A sentence naming the breakage, e.g. "row 17 was changed: ...".
    pub reason: Option<String>,
    /// The kind of breakage, when not `ok`.
    pub breakage: Option<Breakage>,
    /// The last row that verified (the anchor, or seq 0 with
    /// [`GENESIS_HASH`], when none did). When `ok`, this is the head a new
    /// checkpoint may pin.
    pub head: Anchor,
}

/// The exact bytes hashed for a row with this `seq`, event and `prev_hash`;
/// the format is specified in the module documentation.
pub fn canonical_bytes(seq: i64, ev: &NewEvent, prev_hash: &str) -> Vec<u8> {
    canonical(seq, &Fields::of_event(ev), prev_hash)
}

/// Turns an event into the record that follows a row with hash `prev_hash`,
/// computing `hash = hex(SHA-256(canonical_bytes(seq, &ev, prev_hash)))`.
pub fn seal(seq: i64, prev_hash: &str, ev: NewEvent) -> AuditRecord {
    let hash = hex::encode(digest_of(seq, &Fields::of_event(&ev), prev_hash));
    AuditRecord {
        seq,
        at_ms: ev.at_ms,
        actor: ev.actor,
        action: ev.action,
        target: ev.target,
        outcome: ev.outcome,
        details: ev.details,
        prev_hash: prev_hash.to_owned(),
        hash,
    }
}

impl AuditRecord {
    /// The canonical bytes of this row's content (everything but `hash`).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        canonical(self.seq, &Fields::of_record(self), &self.prev_hash)
    }

    /// The hash this row's content should have, as lowercase hex.
    pub fn computed_hash(&self) -> String {
        hex::encode(digest_of(
            self.seq,
            &Fields::of_record(self),
            &self.prev_hash,
        ))
    }

    /// Whether the stored `hash` matches the row's content.
    pub fn content_matches_hash(&self) -> bool {
        self.matches_hash_as(self.seq)
    }

    /// Whether the stored `hash` would match if the row's seq were `seq`;
    /// the diagnosis uses this to tell an altered seq from altered content.
    fn matches_hash_as(&self, seq: i64) -> bool {
        let digest = digest_of(seq, &Fields::of_record(self), &self.prev_hash);
        let mut hex_buf = [0u8; 64];
        // Encoding 32 bytes into 64 always fits.
        hex::encode_to_slice(digest, &mut hex_buf).expect("64 bytes hold 32 bytes as hex");
        hex_buf.as_slice() == self.hash.as_bytes()
    }

    /// Whether this row is the proper successor of `prev` (seq, link and hash).
    fn follows(&self, prev: &Anchor) -> bool {
        self.seq == prev.seq.wrapping_add(1)
            && self.prev_hash == prev.hash
            && self.content_matches_hash()
    }
}

/// Derives a 32-byte purpose key from the root key with HKDF-SHA256
/// (salt [`KDF_SALT`], info `label`), so one root key yields independent keys
/// for checkpoints ([`CHECKPOINT_KEY_LABEL`]) and identifiers
/// ([`IDENTIFIER_KEY_LABEL`]).
pub fn derive_key(root_key_bytes: &[u8], label: &str) -> Zeroizing<[u8; 32]> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT.as_bytes()).extract(root_key_bytes);
    let mut out = Zeroizing::new([0u8; 32]);
    // HKDF-SHA256 can expand to 255 * 32 bytes, so asking for 32 cannot fail.
    prk.expand(&[label.as_bytes()], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(out.as_mut()))
        .expect("HKDF-SHA256 always yields 32 bytes");
    out
}

/// How names of secrets and people appear in the audit log:
/// `"hmac:"` + the first 32 hex characters of `HMAC-SHA256(key, value)`.
/// An auditor holding the key can check whether a given name was touched;
/// the log alone does not reveal it.
pub fn redact_identifier(key: &[u8], value: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let tag = hmac::sign(&key, value.as_bytes());
    format!("hmac:{}", hex::encode(&tag.as_ref()[..16]))
}

/// Verifies rows given in the order the database returns them (by seq),
/// starting from `anchor` (or the genesis) and checking `checkpoint` (if
/// any) with `checkpoint_key`. Memory use is constant apart from a few rows
/// kept for the diagnosis. See the module documentation for what each
/// breakage names.
pub fn verify(
    rows: impl IntoIterator<Item = AuditRecord>,
    anchor: Option<&Anchor>,
    checkpoint: Option<&Checkpoint>,
    checkpoint_key: &[u8],
) -> VerifyReport {
    let mut verifier = ChainVerifier::new(anchor, checkpoint, checkpoint_key);
    for row in rows {
        if verifier.is_decided() {
            break;
        }
        verifier.push(row);
    }
    verifier.finish()
}

/// The push-based form of [`verify`], for callers that receive rows from an
/// async stream: create it, [`push`](Self::push) every row in order, then
/// [`finish`](Self::finish). It holds no key material: the checkpoint's MAC
/// is checked in [`new`](Self::new).
pub struct ChainVerifier {
    checkpoint: Option<Checkpoint>,
    prev: Anchor,
    /// The `prev_hash` of the last accepted row (None at the anchor).
    prev_link: Option<String>,
    accepted: u64,
    phase: Phase,
}

enum Phase {
    /// Every row so far extended the chain.
    Walking,
    /// The row at the checkpoint's seq extended the chain but differs from
    /// the checkpoint's head. Reported as a rewrite unless the next row shows
    /// that the accepted row was an inserted twin of the genuine one.
    HeadMismatch,
    /// The chain broke; the rest of the rows are read to name the breakage.
    Diagnosing(Box<Diagnosis>),
    /// The answer is known without reading further rows.
    Decided(VerifyReport),
}

impl ChainVerifier {
    /// Starts a verification from `anchor` (or the genesis), checking the
    /// checkpoint's MAC under `checkpoint_key` right away.
    pub fn new(
        anchor: Option<&Anchor>,
        checkpoint: Option<&Checkpoint>,
        checkpoint_key: &[u8],
    ) -> Self {
        let base = anchor.cloned().unwrap_or_else(Anchor::genesis);
        let mut verifier = ChainVerifier {
            checkpoint: checkpoint.cloned(),
            prev: base.clone(),
            prev_link: None,
            accepted: 0,
            phase: Phase::Walking,
        };
        let Some(cp) = checkpoint else {
            return verifier;
        };
        if !cp.verify_mac(checkpoint_key) {
            verifier.phase = Phase::Decided(verifier.failure(
                Breakage::BadCheckpoint,
                None,
                format!(
                    "the checkpoint for row {} is not genuine: its MAC does not verify \
                     (it was altered or signed with another key)",
                    cp.seq
                ),
            ));
        } else if cp.seq < base.seq {
            verifier.phase = Phase::Decided(verifier.failure(
                Breakage::StaleCheckpoint,
                None,
                format!(
                    "the checkpoint pins row {} but the chain resumes after the retention \
                     anchor at row {}, so the checkpoint vouches for none of the remaining \
                     rows (write a fresh checkpoint, or the anchor was moved)",
                    cp.seq, base.seq
                ),
            ));
        } else if cp.seq == base.seq && cp.head_hash != base.hash {
            verifier.phase = Phase::Decided(verifier.failure(
                Breakage::Rewritten,
                Some(cp.seq),
                format!(
                    "the chain was rewritten: the retention anchor at row {} differs from \
                     the signed checkpoint's head hash",
                    cp.seq
                ),
            ));
        }
        verifier
    }

    /// Whether further rows can no longer change the report.
    pub fn is_decided(&self) -> bool {
        matches!(self.phase, Phase::Decided(_))
    }

    /// Feeds the next row, in the order the database returns them.
    pub fn push(&mut self, row: AuditRecord) {
        match &mut self.phase {
            Phase::Decided(_) => {}
            Phase::Diagnosing(diagnosis) => diagnosis.observe(&row),
            Phase::Walking | Phase::HeadMismatch => {
                let head_mismatch = matches!(self.phase, Phase::HeadMismatch);
                if !row.follows(&self.prev) {
                    self.phase = Phase::Diagnosing(Box::new(Diagnosis::new(
                        self.prev.clone(),
                        self.prev_link.clone(),
                        row,
                        head_mismatch,
                    )));
                    return;
                }
                if head_mismatch {
                    // The chain goes on normally past the checkpoint's row, so
                    // that row was not a twin: the chain was rewritten.
                    self.phase = Phase::Decided(self.rewritten());
                    return;
                }
                self.prev = Anchor::after(&row);
                self.prev_link = Some(row.prev_hash.clone());
                self.accepted += 1;
                if let Some(cp) = &self.checkpoint
                    && cp.seq == row.seq
                    && cp.head_hash != row.hash
                {
                    self.phase = Phase::HeadMismatch;
                }
            }
        }
    }

    /// Ends the verification and reports.
    pub fn finish(self) -> VerifyReport {
        match self.phase {
            Phase::Decided(ref report) => report.clone(),
            Phase::HeadMismatch => self.rewritten(),
            Phase::Diagnosing(ref diagnosis) => {
                let (kind, seq, reason) = diagnosis.classify();
                let twin_of_head = kind == Breakage::Inserted
                    && self.checkpoint.as_ref().is_some_and(|cp| cp.seq == seq);
                if diagnosis.head_mismatch && !twin_of_head {
                    self.rewritten()
                } else {
                    self.failure(kind, Some(seq), reason)
                }
            }
            Phase::Walking => match &self.checkpoint {
                Some(cp) if self.prev.seq < cp.seq => {
                    let missing = self.prev.seq + 1;
                    self.failure(
                        Breakage::Truncated,
                        Some(missing),
                        format!(
                            "the log was truncated: the signed checkpoint pins row {} but the \
                             rows end at {}, so rows from {missing} on are missing",
                            cp.seq,
                            describe(self.prev.seq),
                        ),
                    )
                }
                _ => VerifyReport {
                    ok: true,
                    rows: self.accepted,
                    first_bad_row: None,
                    reason: None,
                    breakage: None,
                    head: self.prev,
                },
            },
        }
    }

    fn rewritten(&self) -> VerifyReport {
        let seq = self.checkpoint.as_ref().map_or(self.prev.seq, |cp| cp.seq);
        self.failure(
            Breakage::Rewritten,
            Some(seq),
            format!(
                "the chain was rewritten: row {seq} links up consistently but its hash differs \
                 from the signed checkpoint's head hash, so the rows were rewritten at or \
                 before row {seq}"
            ),
        )
    }

    fn failure(&self, kind: Breakage, seq: Option<i64>, reason: String) -> VerifyReport {
        VerifyReport {
            ok: false,
            rows: self.accepted,
            first_bad_row: seq,
            reason: Some(reason),
            breakage: Some(kind),
            head: self.prev.clone(),
        }
    }
}

/// "row N", or "the start of the chain" for seq 0.
fn describe(seq: i64) -> String {
    if seq == 0 {
        "the start of the chain".to_owned()
    } else {
        format!("row {seq}")
    }
}

/// Facts gathered after the first row that does not extend the chain. Every
/// field is a fixed number of rows or scalars, so memory stays constant
/// however long the rest of the log is.
struct Diagnosis {
    /// The last row that verified (or the anchor): "P".
    prev: Anchor,
    /// P's `prev_hash` (None when P is the anchor).
    prev_link: Option<String>,
    /// The first row that did not extend the chain: "R".
    row: AuditRecord,
    row_ok: bool,
    head_mismatch: bool,
    /// The row right after R.
    next: Option<AuditRecord>,
    /// Whether a later row carries the seq that belongs right after P.
    expected_seq_later: bool,
    /// The first later row whose `prev_hash` is P's hash: P's true successor.
    claims_prev: Option<AuditRecord>,
    /// Seq of the first later row whose `prev_hash` is R's hash.
    follower_seq: Option<i64>,
    /// Seq of the first later row whose hash is R's `prev_hash`.
    predecessor_seq: Option<i64>,
    /// A second walk over the later rows as if R were not there, which may
    /// slot R into one gap: tells an extra row from a misplaced one.
    sub_head: Anchor,
    sub_broken: bool,
    row_fits: bool,
}

impl Diagnosis {
    fn new(prev: Anchor, prev_link: Option<String>, row: AuditRecord, head_mismatch: bool) -> Self {
        Diagnosis {
            sub_head: prev.clone(),
            prev,
            prev_link,
            row_ok: row.content_matches_hash(),
            row,
            head_mismatch,
            next: None,
            expected_seq_later: false,
            claims_prev: None,
            follower_seq: None,
            predecessor_seq: None,
            sub_broken: false,
            row_fits: false,
        }
    }

    fn expected(&self) -> i64 {
        // Wrapping keeps a hostile anchor at i64::MAX from panicking; such a
        // chain simply fails to verify.
        self.prev.seq.wrapping_add(1)
    }

    fn observe(&mut self, x: &AuditRecord) {
        if self.next.is_none() {
            self.next = Some(x.clone());
        }
        if x.seq == self.expected() {
            self.expected_seq_later = true;
        }
        if self.claims_prev.is_none() && x.prev_hash == self.prev.hash {
            self.claims_prev = Some(x.clone());
        }
        if self.follower_seq.is_none() && x.prev_hash == self.row.hash {
            self.follower_seq = Some(x.seq);
        }
        if self.predecessor_seq.is_none() && x.hash == self.row.prev_hash {
            self.predecessor_seq = Some(x.seq);
        }
        if !self.sub_broken {
            if x.follows(&self.sub_head) {
                self.sub_head = Anchor::after(x);
            } else if !self.row_fits
                && self.row_ok
                && self.row.seq == self.sub_head.seq.wrapping_add(1)
                && self.row.prev_hash == self.sub_head.hash
                && x.follows(&Anchor::after(&self.row))
            {
                self.row_fits = true;
                self.sub_head = Anchor::after(x);
            } else {
                self.sub_broken = true;
            }
        }
    }

    /// Whether R would fit as the next row of the second walk, either in the
    /// gap already found or at its end.
    fn row_fits(&self) -> bool {
        self.row_fits
            || (!self.sub_broken
                && self.row_ok
                && self.row.seq == self.sub_head.seq.wrapping_add(1)
                && self.row.prev_hash == self.sub_head.hash)
    }

    fn classify(&self) -> (Breakage, i64, String) {
        let r = &self.row;
        let p = self.prev.seq;
        let e = self.expected();
        let after_p = describe(p);

        if !self.row_ok {
            // R is the genuine row P (same content under P's seq, same
            // predecessor) moved one seq down: the accepted P is a forged row
            // that took its place, as when rows are renumbered to make room
            // for an insertion under a unique seq column.
            if r.seq > p
                && self.prev_link.as_deref() == Some(r.prev_hash.as_str())
                && r.matches_hash_as(p)
            {
                return (
                    Breakage::Inserted,
                    p,
                    format!(
                        "a row was inserted: row {p} is not the original, which follows it \
                         renumbered as row {}",
                        r.seq
                    ),
                );
            }
            if r.seq != e && r.matches_hash_as(e) {
                return seq_altered(e, r.seq);
            }
            if let Some(x) = &self.claims_prev
                && x.seq != e
                && x.matches_hash_as(e)
                && r.matches_hash_as(x.seq)
            {
                return (
                    Breakage::Reordered,
                    e,
                    format!(
                        "rows {e} and {} were swapped: each holds the other's content",
                        x.seq
                    ),
                );
            }
            let candidates = [
                self.follower_seq.and_then(|s| s.checked_sub(1)),
                self.predecessor_seq.and_then(|s| s.checked_add(1)),
            ];
            for seq in candidates.into_iter().flatten() {
                if seq != r.seq && r.matches_hash_as(seq) {
                    return seq_altered(seq, r.seq);
                }
            }
            return (
                Breakage::Changed,
                r.seq,
                format!(
                    "row {} was changed: its content does not match its hash",
                    r.seq
                ),
            );
        }

        if r.seq <= p {
            return (
                Breakage::Inserted,
                r.seq,
                format!(
                    "a row was inserted: a row claiming seq {} appears after {after_p}, \
                     but seq {} is already taken",
                    r.seq, r.seq
                ),
            );
        }

        if r.seq == e {
            // R has the right seq and a consistent hash but does not chain to P.
            return if self.claims_prev.is_some() {
                (
                    Breakage::Inserted,
                    e,
                    format!(
                        "a row was inserted: a row claiming seq {e} does not chain to \
                         {after_p}, while another row {e} does"
                    ),
                )
            } else {
                (
                    Breakage::Changed,
                    e,
                    format!(
                        "row {e} was replaced: it matches its own hash but does not chain \
                         to {after_p}"
                    ),
                )
            };
        }

        // R's seq jumps ahead of the expected one.
        let next_follows_prev = self.next.as_ref().is_some_and(|n| n.follows(&self.prev));
        if next_follows_prev {
            return if self.row_fits() {
                out_of_order(e, r.seq)
            } else {
                (
                    Breakage::Inserted,
                    r.seq,
                    format!(
                        "a row was inserted: a row claiming seq {} sits after {after_p}, \
                         and the chain continues from {after_p} without it",
                        r.seq
                    ),
                )
            };
        }
        if self.expected_seq_later {
            return out_of_order(e, r.seq);
        }
        if let Some(x) = &self.claims_prev
            && x.seq != e
            && x.matches_hash_as(e)
        {
            return seq_altered(e, x.seq);
        }
        let reason = if r.prev_hash == self.prev.hash {
            format!(
                "row {e} is missing: row {} chains directly to {after_p}, so it was \
                 re-sealed after a deletion or its seq was skipped",
                r.seq
            )
        } else if r.seq - 1 == e {
            format!("row {e} was deleted: row {} follows {after_p}", r.seq)
        } else {
            format!(
                "rows {e} to {} were deleted: row {} follows {after_p}",
                r.seq - 1,
                r.seq
            )
        };
        (Breakage::Deleted, e, reason)
    }
}

fn seq_altered(original: i64, now: i64) -> (Breakage, i64, String) {
    (
        Breakage::Changed,
        original,
        format!(
            "row {original} was changed: its seq field was altered to {now} \
             (its content matches its hash only as row {original})"
        ),
    )
}

fn out_of_order(expected: i64, found: i64) -> (Breakage, i64, String) {
    (
        Breakage::Reordered,
        expected,
        format!("row {expected} is out of order: row {found} appears where row {expected} belongs"),
    )
}

/// The hashed fields of a row, borrowed from either an event or a record.
struct Fields<'a> {
    at_ms: i64,
    actor: &'a str,
    action: &'a str,
    target: Option<&'a str>,
    outcome: &'a str,
    details: &'a Value,
}

impl<'a> Fields<'a> {
    fn of_event(ev: &'a NewEvent) -> Self {
        Fields {
            at_ms: ev.at_ms,
            actor: &ev.actor,
            action: &ev.action,
            target: ev.target.as_deref(),
            outcome: &ev.outcome,
            details: &ev.details,
        }
    }

    fn of_record(rec: &'a AuditRecord) -> Self {
        Fields {
            at_ms: rec.at_ms,
            actor: &rec.actor,
            action: &rec.action,
            target: rec.target.as_deref(),
            outcome: &rec.outcome,
            details: &rec.details,
        }
    }
}

fn digest_of(seq: i64, fields: &Fields<'_>, prev_hash: &str) -> [u8; 32] {
    let bytes = canonical(seq, fields, prev_hash);
    let digest = digest::digest(&digest::SHA256, &bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn canonical(seq: i64, f: &Fields<'_>, prev_hash: &str) -> Vec<u8> {
    let mut json = Vec::with_capacity(128);
    write_canonical_json(f.details, &mut json);
    let mut out = Vec::with_capacity(
        128 + f.actor.len() + f.action.len() + f.outcome.len() + json.len() + prev_hash.len(),
    );
    put_lp(&mut out, ROW_TAG.as_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&f.at_ms.to_be_bytes());
    put_lp(&mut out, f.actor.as_bytes());
    put_lp(&mut out, f.action.as_bytes());
    match f.target {
        None => out.push(0x00),
        Some(target) => {
            out.push(0x01);
            put_lp(&mut out, target.as_bytes());
        }
    }
    put_lp(&mut out, f.outcome.as_bytes());
    put_lp(&mut out, &json);
    put_lp(&mut out, prev_hash.as_bytes());
    out
}

/// Appends `u64be(len) || bytes`.
fn put_lp(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Writes `value` as canonical JSON (see the module documentation). Keys are
/// sorted here rather than trusting the map's order, because serde_json's
/// `preserve_order` feature may be switched on by any crate in the build.
fn write_canonical_json(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_json_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical_json(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_string(key, out);
                out.push(b':');
                write_canonical_json(item, out);
            }
            out.push(b'}');
        }
    }
}

fn write_json_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for ch in s.chars() {
        match ch {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{08}' => out.extend_from_slice(b"\\b"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\u{0C}' => out.extend_from_slice(b"\\f"),
            '\r' => out.extend_from_slice(b"\\r"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    use super::*;

    const KEY: &[u8] = b"checkpoint key for tests only, 32";
    const T0: i64 = 1_767_225_600_000;

    fn event(i: usize) -> NewEvent {
        const ACTIONS: [&str; 8] = [
            "key.generated",
            "key.activated",
            "key.rotated",
            "key.revoked",
            "token.issued",
            "token.verify_failed",
            "apikey.used",
            "job.finished",
        ];
        let who = redact_identifier(b"identifier key", &format!("person-{}", i % 7));
        NewEvent {
            at_ms: T0 + i as i64 * 1_000,
            actor: match i % 3 {
                0 => format!("cli:{who}@host-{}", i % 2),
                1 => format!("worker:w-{}", i % 4),
                _ => format!("apikey:ak_{:03}", i % 11),
            },
            action: ACTIONS[i % ACTIONS.len()].to_owned(),
            target: (!i.is_multiple_of(5)).then(|| format!("kid-{:04}", i / 3)),
            outcome: if i % 9 == 4 { "denied" } else { "ok" }.to_owned(),
            details: json!({
                "count": i,
                "secret": redact_identifier(b"identifier key", &format!("db/password-{i}")),
                "note": if i.is_multiple_of(4) { "Schlüssel \"rotiert\"\n" } else { "ok" },
                "nested": { "z": -(i as i64), "a": [1, "zwei", null, true, { "y": 2, "b": 1 }] },
            }),
        }
    }

    fn chain(n: usize) -> Vec<AuditRecord> {
        let mut rows: Vec<AuditRecord> = Vec::with_capacity(n);
        for i in 0..n {
            let prev = rows
                .last()
                .map_or(GENESIS_HASH, |r| r.hash.as_str())
                .to_owned();
            rows.push(seal(i as i64 + 1, &prev, event(i)));
        }
        rows
    }

    fn head_checkpoint(rows: &[AuditRecord]) -> Checkpoint {
        let head = rows.last().expect("non-empty chain");
        Checkpoint::sign(head.seq, &head.hash, T0 + 9_999_999, KEY)
    }

    fn forged(seq: i64, prev_hash: &str) -> AuditRecord {
        let mut ev = event(seq as usize);
        ev.actor = "cli:intruder@elsewhere".to_owned();
        ev.details = json!({ "forged": true, "seq": seq });
        seal(seq, prev_hash, ev)
    }

    fn verify_plain(rows: &[AuditRecord]) -> VerifyReport {
        verify(rows.to_vec(), None, None, KEY)
    }

    #[track_caller]
    fn assert_broken(report: &VerifyReport, kind: Breakage, seq: i64) {
        assert!(!report.ok, "expected {kind:?} at {seq}, got ok: {report:?}");
        assert_eq!(
            (report.breakage, report.first_bad_row),
            (Some(kind), Some(seq)),
            "report: {report:?}"
        );
        let reason = report.reason.as_deref().expect("a failure has a reason");
        assert!(
            reason.contains(&seq.to_string()),
            "reason should name row {seq}: {reason}"
        );
    }

    // ---- canonical form -------------------------------------------------

    #[test]
    fn canonical_bytes_follow_the_documented_layout() {
        let ev = NewEvent {
            at_ms: 258,
            actor: "op".to_owned(),
            action: "key.rotated".to_owned(),
            target: Some("kid-1".to_owned()),
            outcome: "ok".to_owned(),
            details: json!({ "b": [1, true, null], "a": "x\u{1}\"" }),
        };
        let lp = |b: &[u8]| [(b.len() as u64).to_be_bytes().as_slice(), b].concat();
        let expected = [
            lp(b"keywarden.audit.v1"),
            7i64.to_be_bytes().to_vec(),
            258i64.to_be_bytes().to_vec(),
            lp(b"op"),
            lp(b"key.rotated"),
            vec![1u8],
            lp(b"kid-1"),
            lp(b"ok"),
            lp(br#"{"a":"x\u0001\"","b":[1,true,null]}"#),
            lp(GENESIS_HASH.as_bytes()),
        ]
        .concat();
        assert_eq!(canonical_bytes(7, &ev, GENESIS_HASH), expected);
        let record = seal(7, GENESIS_HASH, ev);
        assert_eq!(record.canonical_bytes(), expected);
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth_and_escapes_controls() {
        let mut out = Vec::new();
        let value = json!({
            "zeta": { "b": 1, "a": [ { "d": 0, "c": -5 } ] },
            "Alpha": "tab\there\u{8}\u{c}\r\n\\ é ✓",
            "": 18446744073709551615u64,
        });
        write_canonical_json(&value, &mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            r#"{"":18446744073709551615,"Alpha":"tab\there\b\f\r\n\\ é ✓","zeta":{"a":[{"c":-5,"d":0}],"b":1}}"#
        );
    }

    #[test]
    fn hash_of_a_fixed_event_is_pinned() {
        // Pinned from an independent Python implementation of the module
        // documentation; a change here breaks every stored chain.
        let record = seal(1, GENESIS_HASH, event(4));
        assert_eq!(
            record.hash,
            "79408da1817b47dfec4dd6cafc1a9dad0e6e6d590beea981b3ad5ce6b8e2e57c"
        );
    }

    #[test]
    fn absent_and_empty_target_hash_differently() {
        let mut ev = event(0);
        ev.target = None;
        let absent = seal(1, GENESIS_HASH, ev.clone());
        ev.target = Some(String::new());
        let empty = seal(1, GENESIS_HASH, ev);
        assert_ne!(absent.hash, empty.hash);
    }

    #[test]
    fn moving_bytes_between_fields_changes_the_hash() {
        let mut ev = event(1);
        ev.actor = "ab".to_owned();
        ev.action = "c".to_owned();
        let first = seal(1, GENESIS_HASH, ev.clone());
        ev.actor = "a".to_owned();
        ev.action = "bc".to_owned();
        let second = seal(1, GENESIS_HASH, ev);
        assert_ne!(first.hash, second.hash);
    }

    #[test]
    fn records_round_tripped_through_json_still_verify() {
        let rows = chain(30);
        let lines: Vec<String> = rows
            .iter()
            .map(|r| serde_json::to_string(r).expect("serialize"))
            .collect();
        let back: Vec<AuditRecord> = lines
            .iter()
            .map(|l| serde_json::from_str(l).expect("parse"))
            .collect();
        let cp = head_checkpoint(&rows);
        assert!(verify(back, None, Some(&cp), KEY).ok);
    }

    // ---- keys -----------------------------------------------------------

    #[test]
    fn derive_key_is_plain_hkdf_sha256() {
        // HKDF from RFC 5869 written out with HMAC, so an auditor's own
        // implementation can reproduce the key.
        let hmac = |key: &[u8], data: &[u8]| {
            let key = hmac::Key::new(hmac::HMAC_SHA256, key);
            hmac::sign(&key, data).as_ref().to_vec()
        };
        let root = [7u8; 32];
        let prk = hmac(KDF_SALT.as_bytes(), &root);
        let okm = hmac(&prk, &[CHECKPOINT_KEY_LABEL.as_bytes(), &[1u8]].concat());
        assert_eq!(derive_key(&root, CHECKPOINT_KEY_LABEL).as_slice(), okm);
        assert_ne!(
            *derive_key(&root, CHECKPOINT_KEY_LABEL),
            *derive_key(&root, IDENTIFIER_KEY_LABEL)
        );
    }

    #[test]
    fn redacted_identifier_is_a_keyed_prefix_that_hides_the_value() {
        let key = derive_key(b"root", IDENTIFIER_KEY_LABEL);
        let id = redact_identifier(key.as_slice(), "alice@example.com");
        assert_eq!(id.len(), "hmac:".len() + 32);
        assert!(id.starts_with("hmac:"));
        assert!(!id.contains("alice"));
        assert_eq!(id, redact_identifier(key.as_slice(), "alice@example.com"));
        assert_ne!(id, redact_identifier(key.as_slice(), "bob@example.com"));
        assert_ne!(id, redact_identifier(b"other key", "alice@example.com"));
    }

    // ---- checkpoints ----------------------------------------------------

    #[test]
    fn checkpoint_mac_is_pinned() {
        // Pinned from the same independent Python implementation.
        let cp = Checkpoint::sign(42, GENESIS_HASH, T0, KEY);
        assert_eq!(
            cp.mac,
            "1af9efc79a1c912d7d6e763bcc1236c630467a30884f263a30407454430fa293"
        );
    }

    #[test]
    fn checkpoint_mac_rejects_wrong_key_altered_fields_and_garbage() {
        let cp = Checkpoint::sign(42, GENESIS_HASH, T0, KEY);
        assert!(cp.verify_mac(KEY));
        assert!(!cp.verify_mac(b"another key"));
        let mut altered = cp.clone();
        altered.seq = 43;
        assert!(!altered.verify_mac(KEY));
        let mut altered = cp.clone();
        altered.at_ms += 1;
        assert!(!altered.verify_mac(KEY));
        let mut altered = cp.clone();
        altered.head_hash.replace_range(0..1, "1");
        assert!(!altered.verify_mac(KEY));
        let mut altered = cp.clone();
        altered.mac = "not hex".to_owned();
        assert!(!altered.verify_mac(KEY));
        let mut altered = cp;
        altered.mac.truncate(10);
        assert!(!altered.verify_mac(KEY));
    }

    #[test]
    fn forged_checkpoint_is_reported_before_reading_rows() {
        let rows = chain(10);
        let forged = Checkpoint::sign(10, &rows[9].hash, T0, b"attacker key");
        let report = verify(rows, None, Some(&forged), KEY);
        assert!(!report.ok);
        assert_eq!(report.breakage, Some(Breakage::BadCheckpoint));
        assert_eq!((report.first_bad_row, report.rows), (None, 0));
    }

    #[test]
    fn checkpoint_older_than_the_anchor_fails_closed() {
        let rows = chain(10);
        let cp = Checkpoint::sign(3, &rows[2].hash, T0, KEY);
        let anchor = Anchor::after(&rows[4]);
        let report = verify(rows[5..].to_vec(), Some(&anchor), Some(&cp), KEY);
        assert_eq!(report.breakage, Some(Breakage::StaleCheckpoint));
    }

    #[test]
    fn checkpoint_at_the_anchor_pins_the_anchor_hash() {
        let rows = chain(10);
        let cp = Checkpoint::sign(5, &rows[4].hash, T0, KEY);
        let anchor = Anchor::after(&rows[4]);
        assert!(verify(rows[5..].to_vec(), Some(&anchor), Some(&cp), KEY).ok);
        let moved = Anchor {
            seq: 5,
            hash: rows[3].hash.clone(),
        };
        let report = verify(rows[5..].to_vec(), Some(&moved), Some(&cp), KEY);
        assert_broken(&report, Breakage::Rewritten, 5);
    }

    // ---- intact chains --------------------------------------------------

    #[test]
    fn intact_chain_verifies_with_and_without_checkpoint() {
        let rows = chain(12);
        let report = verify_plain(&rows);
        assert!(report.ok, "{report:?}");
        assert_eq!(report.rows, 12);
        assert_eq!(report.head, Anchor::after(&rows[11]));
        let cp = head_checkpoint(&rows);
        assert!(verify(rows.clone(), None, Some(&cp), KEY).ok);
        // Rows appended after the checkpoint are legitimate new events.
        let older = Checkpoint::sign(6, &rows[5].hash, T0, KEY);
        assert!(verify(rows, None, Some(&older), KEY).ok);
    }

    #[test]
    fn empty_log_verifies_and_reports_the_genesis_head() {
        let report = verify(Vec::new(), None, None, KEY);
        assert!(report.ok);
        assert_eq!(report.head, Anchor::genesis());
    }

    #[test]
    fn chain_after_retention_verifies_from_its_anchor_only() {
        let rows = chain(20);
        let anchor = Anchor::after(&rows[6]);
        let kept = rows[7..].to_vec();
        let cp = head_checkpoint(&rows);
        let report = verify(kept.clone(), Some(&anchor), Some(&cp), KEY);
        assert!(report.ok, "{report:?}");
        assert_eq!(report.rows, 13);
        // Without the anchor the first kept row looks like rows 1..7 vanished.
        assert_broken(&verify(kept, None, None, KEY), Breakage::Deleted, 1);
    }

    #[test]
    fn verifier_accepts_rows_pushed_one_by_one() {
        let rows = chain(8);
        let mut verifier = ChainVerifier::new(None, None, KEY);
        for row in rows {
            verifier.push(row);
        }
        assert!(verifier.finish().ok);
    }

    // ---- one test per breakage ------------------------------------------

    #[test]
    fn changed_field_names_that_row() {
        let mut rows = chain(10);
        rows[4].outcome = "failed".to_owned();
        let report = verify_plain(&rows);
        assert_broken(&report, Breakage::Changed, 5);
        assert_eq!(
            report.reason.as_deref(),
            Some("row 5 was changed: its content does not match its hash")
        );
        assert_eq!(report.rows, 4);
    }

    #[test]
    fn changed_stored_hash_names_that_row_not_the_next() {
        let mut rows = chain(10);
        rows[6].hash = rows[6].hash.replace(|c: char| c.is_ascii_digit(), "f");
        assert_broken(&verify_plain(&rows), Breakage::Changed, 7);
    }

    #[test]
    fn altered_seq_names_the_original_row_wherever_the_database_sorts_it() {
        for new_seq in [-3, 0, 3, 9, 10, 500] {
            let mut rows = chain(10);
            rows[5].seq = new_seq;
            // As returned unsorted, and as `ORDER BY seq` returns it.
            assert_broken(&verify_plain(&rows), Breakage::Changed, 6);
            rows.sort_by_key(|r| r.seq);
            assert_broken(&verify_plain(&rows), Breakage::Changed, 6);
        }
    }

    #[test]
    fn deleted_rows_name_the_first_missing_seq() {
        let mut rows = chain(10);
        rows.remove(4);
        let report = verify_plain(&rows);
        assert_broken(&report, Breakage::Deleted, 5);
        assert_eq!(
            report.reason.as_deref(),
            Some("row 5 was deleted: row 6 follows row 4")
        );
        let mut rows = chain(10);
        rows.drain(4..7);
        let report = verify_plain(&rows);
        assert_broken(&report, Breakage::Deleted, 5);
        assert!(report.reason.expect("reason").contains("rows 5 to 7"));
        let mut rows = chain(10);
        rows.remove(0);
        assert_broken(&verify_plain(&rows), Breakage::Deleted, 1);
    }

    #[test]
    fn deleting_after_retention_names_the_row_after_the_anchor() {
        let rows = chain(10);
        let anchor = Anchor::after(&rows[2]);
        let report = verify(rows[4..].to_vec(), Some(&anchor), None, KEY);
        assert_broken(&report, Breakage::Deleted, 4);
    }

    #[test]
    fn rows_swapped_in_the_stream_are_reordered_at_the_first_misplaced_seq() {
        for (i, j) in [(2, 3), (2, 7), (0, 9), (8, 9)] {
            let mut rows = chain(10);
            rows.swap(i, j);
            let report = verify_plain(&rows);
            assert_broken(&report, Breakage::Reordered, i as i64 + 1);
        }
        let mut rows = chain(10);
        let moved = rows.remove(7);
        rows.insert(2, moved);
        assert_broken(&verify_plain(&rows), Breakage::Reordered, 3);
    }

    #[test]
    fn contents_swapped_under_fixed_seqs_are_reordered() {
        for (i, j) in [(2, 3), (2, 7), (0, 9)] {
            let mut rows = chain(10);
            rows.swap(i, j);
            let (si, sj) = (rows[i].seq, rows[j].seq);
            rows[i].seq = sj;
            rows[j].seq = si;
            let report = verify_plain(&rows);
            assert_broken(&report, Breakage::Reordered, i as i64 + 1);
            assert!(report.reason.expect("reason").contains("swapped"));
        }
    }

    #[test]
    fn forged_twin_of_a_row_is_inserted_at_its_seq() {
        let rows = chain(10);
        let cp = head_checkpoint(&rows);
        for (at, place_before) in [(4usize, true), (4, false), (9, true), (9, false)] {
            let twin = forged(rows[at].seq, &rows[at].prev_hash);
            let mut tampered = rows.clone();
            tampered.insert(if place_before { at } else { at + 1 }, twin);
            let report = verify(tampered, None, Some(&cp), KEY);
            assert_broken(&report, Breakage::Inserted, at as i64 + 1);
        }
    }

    #[test]
    fn forged_row_inserted_by_renumbering_the_rest_is_inserted_at_its_seq() {
        let rows = chain(10);
        for k in [1usize, 5, 10] {
            let mut tampered = rows.clone();
            for r in tampered.iter_mut().skip(k - 1) {
                r.seq += 1;
            }
            tampered.insert(k - 1, forged(k as i64, &rows[k - 1].prev_hash));
            assert_broken(&verify_plain(&tampered), Breakage::Inserted, k as i64);
        }
    }

    #[test]
    fn forged_row_with_an_unused_seq_is_inserted_at_the_seq_it_claims() {
        let mut rows = chain(10);
        let prev = rows[3].hash.clone();
        rows.insert(4, forged(777, &prev));
        assert_broken(&verify_plain(&rows), Breakage::Inserted, 777);
    }

    #[test]
    fn self_consistent_row_that_does_not_chain_is_reported_replaced() {
        let mut rows = chain(10);
        rows[4] = forged(5, GENESIS_HASH);
        // Also re-link the next row so that only row 5 is out of place.
        let mut next = rows[5].clone();
        next.prev_hash = rows[4].hash.clone();
        next.hash = next.computed_hash();
        rows[5] = next;
        let report = verify_plain(&rows[..6]);
        assert_broken(&report, Breakage::Changed, 5);
        assert!(report.reason.expect("reason").contains("replaced"));
    }

    #[test]
    fn truncated_tail_is_caught_only_with_a_checkpoint() {
        let rows = chain(10);
        let cp = head_checkpoint(&rows);
        let report = verify(rows[..6].to_vec(), None, Some(&cp), KEY);
        assert_broken(&report, Breakage::Truncated, 7);
        assert_eq!(report.rows, 6);
        assert_broken(
            &verify(Vec::new(), None, Some(&cp), KEY),
            Breakage::Truncated,
            1,
        );
        // The chain alone cannot tell a truncated log from a shorter one.
        assert!(verify_plain(&rows[..6]).ok);
    }

    #[test]
    fn consistent_rewrite_is_caught_at_the_checkpoint_seq() {
        let rows = chain(10);
        let cp = head_checkpoint(&rows);
        let mut rewritten = rows[..3].to_vec();
        for row in &rows[3..] {
            let prev = rewritten.last().expect("prefix").hash.clone();
            rewritten.push(forged(row.seq, &prev));
        }
        assert!(verify_plain(&rewritten).ok, "the chain alone is consistent");
        let report = verify(rewritten.clone(), None, Some(&cp), KEY);
        assert_broken(&report, Breakage::Rewritten, 10);
        // A checkpoint in the middle names its own seq, even with more rows after it.
        let mid = Checkpoint::sign(6, &rows[5].hash, T0, KEY);
        assert_broken(
            &verify(rewritten, None, Some(&mid), KEY),
            Breakage::Rewritten,
            6,
        );
    }

    #[test]
    fn hostile_extreme_seqs_do_not_panic() {
        let mut rows = chain(6);
        rows[2].seq = i64::MIN;
        rows[3].seq = i64::MAX;
        assert!(!verify_plain(&rows).ok);
        let anchor = Anchor {
            seq: i64::MAX,
            hash: GENESIS_HASH.to_owned(),
        };
        assert!(!verify(chain(3), Some(&anchor), None, KEY).ok);
    }

    // ---- the tamper test from issue 7 -------------------------------------

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Tamper {
        Flip,
        Delete,
        Swap,
        Insert,
        Truncate,
        Rewrite,
    }

    const TAMPERS: [Tamper; 6] = [
        Tamper::Flip,
        Tamper::Delete,
        Tamper::Swap,
        Tamper::Insert,
        Tamper::Truncate,
        Tamper::Rewrite,
    ];

    fn random_hash(rng: &mut StdRng) -> String {
        hex::encode(rng.random::<[u8; 32]>())
    }

    /// Flips one bit (below 0x80, so ASCII stays ASCII) of a random byte,
    /// retrying until the result is still UTF-8.
    fn flip_string(s: &mut String, rng: &mut StdRng) {
        assert!(!s.is_empty());
        loop {
            let mut bytes = s.clone().into_bytes();
            let at = rng.random_range(0..bytes.len());
            bytes[at] ^= 1 << rng.random_range(0..7);
            if let Ok(flipped) = String::from_utf8(bytes) {
                *s = flipped;
                return;
            }
        }
    }

    fn flip_i64(v: &mut i64, rng: &mut StdRng) {
        let mut bytes = v.to_be_bytes();
        bytes[rng.random_range(0..8)] ^= rng.random_range(1..=255u8);
        *v = i64::from_be_bytes(bytes);
    }

    /// Flips a byte in a random field of `row`; returns the field's name.
    fn flip_field(row: &mut AuditRecord, rng: &mut StdRng) -> &'static str {
        match rng.random_range(0..9) {
            0 => {
                flip_i64(&mut row.seq, rng);
                "seq"
            }
            1 => {
                flip_i64(&mut row.at_ms, rng);
                "at_ms"
            }
            2 => {
                flip_string(&mut row.actor, rng);
                "actor"
            }
            3 => {
                flip_string(&mut row.action, rng);
                "action"
            }
            4 => {
                match &mut row.target {
                    Some(t) => flip_string(t, rng),
                    None => row.target = Some(String::new()),
                }
                "target"
            }
            5 => {
                flip_string(&mut row.outcome, rng);
                "outcome"
            }
            6 => {
                let text = serde_json::to_vec(&row.details).expect("serialize");
                loop {
                    let mut bytes = text.clone();
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..7);
                    if let Ok(value) = serde_json::from_slice::<Value>(&bytes)
                        && value != row.details
                    {
                        row.details = value;
                        break;
                    }
                }
                "details"
            }
            7 => {
                flip_string(&mut row.prev_hash, rng);
                "prev_hash"
            }
            _ => {
                flip_string(&mut row.hash, rng);
                "hash"
            }
        }
    }

    struct Trial {
        rows: Vec<AuditRecord>,
        use_checkpoint: bool,
        expect: (Breakage, i64),
        what: String,
    }

    /// Applies one random modification of kind `tamper` to a fresh copy of
    /// `base` and says what verify must report.
    fn tamper(base: &[AuditRecord], cp_seq: i64, tamper: Tamper, rng: &mut StdRng) -> Trial {
        let mut rows = base.to_vec();
        let len = rows.len();
        let seq_at = |i: usize| base[i].seq;
        let use_checkpoint = rng.random_bool(0.5);
        match tamper {
            Tamper::Flip => {
                let i = rng.random_range(0..len);
                let field = flip_field(&mut rows[i], rng);
                let sorted = rng.random_bool(0.5);
                if sorted {
                    rows.sort_by_key(|r| r.seq);
                }
                Trial {
                    rows,
                    use_checkpoint,
                    expect: (Breakage::Changed, seq_at(i)),
                    what: format!("flip {field} of row {} (sorted: {sorted})", seq_at(i)),
                }
            }
            Tamper::Delete => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=3).min(len - i);
                rows.drain(i..i + n);
                let at_tail = i + n == len;
                Trial {
                    rows,
                    use_checkpoint: use_checkpoint || at_tail,
                    expect: if at_tail {
                        (Breakage::Truncated, seq_at(i))
                    } else {
                        (Breakage::Deleted, seq_at(i))
                    },
                    what: format!("delete {n} rows from row {}", seq_at(i)),
                }
            }
            Tamper::Swap => {
                let i = rng.random_range(0..len - 1);
                let j = rng.random_range(i + 1..len);
                rows.swap(i, j);
                let in_place = rng.random_bool(0.5);
                if in_place {
                    rows[i].seq = seq_at(i);
                    rows[j].seq = seq_at(j);
                }
                Trial {
                    rows,
                    use_checkpoint,
                    expect: (Breakage::Reordered, seq_at(i)),
                    what: format!(
                        "swap rows {} and {} (contents only: {in_place})",
                        seq_at(i),
                        seq_at(j)
                    ),
                }
            }
            Tamper::Insert => {
                let i = rng.random_range(0..len);
                let (row, at, what) = match rng.random_range(0..3) {
                    0 => {
                        let before = rng.random_bool(0.5);
                        let twin = forged(seq_at(i), &base[i].prev_hash);
                        (twin, if before { i } else { i + 1 }, "linked twin")
                    }
                    1 => {
                        let before = rng.random_bool(0.5);
                        let twin = forged(seq_at(i), &random_hash(rng));
                        (twin, if before { i } else { i + 1 }, "unlinked twin")
                    }
                    _ => {
                        let prev = if rng.random_bool(0.5) {
                            base[i].prev_hash.clone()
                        } else {
                            random_hash(rng)
                        };
                        let seq = rng.random_range(10_000..1_000_000);
                        (forged(seq, &prev), i, "row with an unused seq")
                    }
                };
                let claimed = row.seq;
                rows.insert(at, row);
                Trial {
                    rows,
                    use_checkpoint,
                    expect: (Breakage::Inserted, claimed),
                    what: format!("insert {what} claiming seq {claimed} at position {at}"),
                }
            }
            Tamper::Truncate => {
                let keep = rng.random_range(0..len);
                rows.truncate(keep);
                Trial {
                    rows,
                    use_checkpoint: true,
                    expect: (Breakage::Truncated, seq_at(keep)),
                    what: format!("truncate from row {}", seq_at(keep)),
                }
            }
            Tamper::Rewrite => {
                let from = rng.random_range(0..len);
                for i in from..len {
                    let prev = if i == from {
                        base[i].prev_hash.clone()
                    } else {
                        rows[i - 1].hash.clone()
                    };
                    rows[i] = forged(seq_at(i), &prev);
                }
                Trial {
                    rows,
                    use_checkpoint: true,
                    expect: (Breakage::Rewritten, cp_seq),
                    what: format!("rewrite from row {}", seq_at(from)),
                }
            }
        }
    }

    #[test]
    fn every_one_of_1000_random_modifications_is_detected_and_names_the_right_row() {
        const SEED: u64 = 0x6b65_7977_6172_6465;
        let started = Instant::now();
        let full = chain(200);
        let checkpoint = head_checkpoint(&full);
        let mut rng = StdRng::seed_from_u64(SEED);
        let mut per_kind = [0usize; 6];
        for trial_no in 0..1000 {
            // A third of the trials run on a log that retention already cut.
            let (base, anchor) = if rng.random_bool(0.3) {
                let k = rng.random_range(1..=60);
                (&full[k..], Some(Anchor::after(&full[k - 1])))
            } else {
                (&full[..], None)
            };
            let kind = TAMPERS[trial_no % TAMPERS.len()];
            let trial = tamper(base, checkpoint.seq, kind, &mut rng);
            let cp = trial.use_checkpoint.then_some(&checkpoint);
            let report = verify(trial.rows, anchor.as_ref(), cp, KEY);
            let (breakage, seq) = trial.expect;
            assert!(
                !report.ok
                    && report.breakage == Some(breakage)
                    && report.first_bad_row == Some(seq)
                    && report
                        .reason
                        .as_deref()
                        .is_some_and(|r| r.contains(&seq.to_string())),
                "trial {trial_no} (seed {SEED:#x}): {} with anchor {:?}, checkpoint {}: \
                 expected {breakage:?} at {seq}, got {report:?}",
                trial.what,
                anchor.as_ref().map(|a| a.seq),
                trial.use_checkpoint,
            );
            per_kind[trial_no % TAMPERS.len()] += 1;
        }
        assert_eq!(per_kind.iter().sum::<usize>(), 1000);
        // The untouched log still verifies, in full and after retention.
        assert!(verify(full.clone(), None, Some(&checkpoint), KEY).ok);
        for k in [1, 50, 199] {
            let anchor = Anchor::after(&full[k - 1]);
            let report = verify(full[k..].to_vec(), Some(&anchor), Some(&checkpoint), KEY);
            assert!(report.ok, "retention of {k} rows: {report:?}");
        }
        eprintln!("tamper test: 1000 trials in {:?}", started.elapsed());
    }
}
