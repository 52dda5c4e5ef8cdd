//! The claims of a verified JWS, checked without building a JSON tree on the common path.
//!
//! Why this exists: an HMAC-SHA256 over a typical token costs well under a microsecond, and
//! parsing the payload into a `serde_json::Value` (a map, a `String` per name and per string
//! value) cost several times that, so HS256 verification ran at a quarter of the raw primitive's
//! rate. The registered claims that verification checks (`exp`, `nbf`, `iss`, `aud`) and the
//! `jti` the denylist needs are a handful of scalars; everything else only has to be valid JSON.
//!
//! Two readers, one set of rules:
//! - [`scan`] is a strict single-pass scanner for the shape every JWT library writes: one JSON
//!   object, no backslash escapes, no control characters, integer NumericDates, a bounded depth
//!   and number of names. It checks the grammar of the whole payload and records where the
//!   registered claims are. It is *sound but not complete*: it never rejects anything itself.
//!   Whenever it meets anything outside that shape (an escape, an exponent, a duplicate name,
//!   invalid JSON...) it gives up, and the payload is parsed by serde_json exactly as before
//!   ([`super::jose::parse_claims`]), which then accepts or rejects it with the same errors as
//!   ever. So an accepted payload is one serde_json accepts too, with the same claim values; a
//!   unit test compares the two readers over mutated payloads.
//! - [`check`] holds the RFC 7519 rules once, over a [`ClaimSource`] that both readers implement.

use std::fmt;
use std::mem::MaybeUninit;

use serde_json::{Map, Value};

use super::jose::{VerifyError, VerifyOptions, parse_claims_object};

/// Deepest nesting of arrays and objects the scanner follows (the claims object is depth 1);
/// anything deeper goes to serde_json, which has its own limit.
const MAX_DEPTH: u32 = 32;

/// Most top-level names the scanner tracks for the distinct-names rule.
const MAX_NAMES: usize = 32;

/// Integers with more digits than this are left to serde_json (they may not fit an `i64`).
const MAX_INT_DIGITS: usize = 18;

/// Integers with more digits than this could overflow an `f64`, which serde_json rejects.
const MAX_NUMBER_DIGITS: usize = 300;

/// The claims of a token that verified: the JSON object, readable as a `serde_json::Value`.
#[derive(Clone)]
pub struct Claims(Repr);

#[derive(Clone)]
enum Repr {
    /// Accepted by [`scan`]: the payload bytes and where the registered claims are in them.
    Scanned {
        json: Vec<u8>,
        registered: Registered,
    },
    /// Parsed by serde_json.
    Parsed(Map<String, Value>),
}

impl Claims {
    /// Reads a decoded payload: the scanner when it can, serde_json otherwise. Fails with
    /// [`VerifyError::Malformed`] when the payload is not a JSON object with distinct names.
    pub fn from_json(json: Vec<u8>) -> Result<Claims, VerifyError> {
        match scan(&json) {
            Some(registered) => Ok(Claims(Repr::Scanned { json, registered })),
            None => parse_claims_object(&json).map(|map| Claims(Repr::Parsed(map))),
        }
    }

    /// Checks the registered claims against `opts` (see [`super::jose::check_claims`]).
    pub fn check(&self, opts: &VerifyOptions) -> Result<(), VerifyError> {
        match &self.0 {
            Repr::Scanned { json, registered } => check(&Scanned { json, registered }, opts),
            Repr::Parsed(map) => check(map, opts),
        }
    }

    /// The `jti` claim, when it is a string.
    pub fn jti(&self) -> Option<&str> {
        match &self.0 {
            Repr::Scanned { json, registered } => match registered.jti {
                Slot::Str(start, end) => {
                    std::str::from_utf8(&json[start as usize..end as usize]).ok()
                }
                _ => None,
            },
            Repr::Parsed(map) => map.get("jti").and_then(Value::as_str),
        }
    }

    /// The claims as a JSON object.
    pub fn to_value(&self) -> Value {
        self.clone().into_value()
    }

    /// The claims as a JSON object.
    pub fn into_value(self) -> Value {
        match self.0 {
            Repr::Scanned { json, .. } => Value::Object(
                parse_claims_object(&json)
                    .expect("the scanner accepts only payloads that serde_json accepts"),
            ),
            Repr::Parsed(map) => Value::Object(map),
        }
    }

    /// Whether the scanner read these claims (false: serde_json did). For tests and benchmarks.
    pub fn was_scanned(&self) -> bool {
        matches!(self.0, Repr::Scanned { .. })
    }
}

impl fmt::Debug for Claims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_value(), f)
    }
}

impl PartialEq for Claims {
    fn eq(&self, other: &Self) -> bool {
        self.to_value() == other.to_value()
    }
}

impl PartialEq<Value> for Claims {
    fn eq(&self, other: &Value) -> bool {
        self.to_value() == *other
    }
}

/// A registered claim as a checking rule sees it.
pub(crate) enum Found<'a> {
    Absent,
    Number(f64),
    /// A string, as its UTF-8 bytes (compared, never displayed).
    Str(&'a [u8]),
    /// Present, of any other type.
    Other,
}

/// What `aud` says about one expected audience.
pub(crate) enum Aud {
    Absent,
    /// A string, or an array of strings; whether it names the expected audience.
    Present(bool),
    /// An array with a non-string element.
    NonStringElement,
    /// Neither a string nor an array.
    WrongType,
}

/// Read access to the registered claims, whichever reader produced them.
pub(crate) trait ClaimSource {
    /// `exp`, `nbf` or `iss`.
    fn get(&self, name: &'static str) -> Found<'_>;
    /// `aud` against `expected`.
    fn aud(&self, expected: &str) -> Aud;
}

impl ClaimSource for Map<String, Value> {
    fn get(&self, name: &'static str) -> Found<'_> {
        match self.get(name) {
            None => Found::Absent,
            // `as_f64` is always `Some` without serde_json's arbitrary_precision; treating `None`
            // as absent is what verification did before the scanner.
            Some(Value::Number(n)) => n.as_f64().map_or(Found::Absent, Found::Number),
            Some(Value::String(s)) => Found::Str(s.as_bytes()),
            Some(_) => Found::Other,
        }
    }

    fn aud(&self, expected: &str) -> Aud {
        match self.get("aud") {
            None => Aud::Absent,
            Some(Value::String(aud)) => Aud::Present(aud == expected),
            Some(Value::Array(auds)) => {
                let mut found = false;
                for aud in auds {
                    match aud {
                        Value::String(aud) => found |= aud == expected,
                        _ => return Aud::NonStringElement,
                    }
                }
                Aud::Present(found)
            }
            Some(_) => Aud::WrongType,
        }
    }
}

/// The registered claims, by the rules of RFC 7519 §4.1 and RFC 8725. The first failing rule
/// decides the error, in this order: `exp` (required), `nbf`, `iss`, `aud`.
pub(crate) fn check(claims: &impl ClaimSource, opts: &VerifyOptions) -> Result<(), VerifyError> {
    let leeway = opts.leeway_secs.max(0);
    let exp = numeric_date(claims, "exp")?.ok_or(VerifyError::MissingClaim("exp"))?;
    if exp <= opts.now_unix.saturating_sub(leeway) as f64 {
        return Err(VerifyError::Expired);
    }
    if let Some(nbf) = numeric_date(claims, "nbf")?
        && nbf > opts.now_unix.saturating_add(leeway) as f64
    {
        return Err(VerifyError::NotYetValid);
    }

    if let Some(expected) = opts.issuer.as_deref() {
        match claims.get("iss") {
            Found::Absent => return Err(VerifyError::MissingClaim("iss")),
            Found::Str(iss) if iss == expected.as_bytes() => {}
            Found::Str(_) => return Err(VerifyError::WrongIssuer),
            Found::Number(_) | Found::Other => {
                return Err(VerifyError::Malformed("iss is not a string".into()));
            }
        }
    }

    match (
        opts.audience.as_deref(),
        claims.aud(opts.audience.as_deref().unwrap_or("")),
    ) {
        (None, Aud::Absent) => Ok(()),
        (None, _) => Err(VerifyError::WrongAudience),
        (Some(_), Aud::Absent) => Err(VerifyError::MissingClaim("aud")),
        (Some(_), Aud::Present(true)) => Ok(()),
        (Some(_), Aud::Present(false)) => Err(VerifyError::WrongAudience),
        (Some(_), Aud::NonStringElement) => {
            Err(VerifyError::Malformed("aud holds a non-string".into()))
        }
        (Some(_), Aud::WrongType) => Err(VerifyError::Malformed(
            "aud is neither a string nor an array".into(),
        )),
    }
}

fn numeric_date(claims: &impl ClaimSource, name: &'static str) -> Result<Option<f64>, VerifyError> {
    match claims.get(name) {
        Found::Absent => Ok(None),
        Found::Number(n) => Ok(Some(n)),
        Found::Str(_) | Found::Other => Err(VerifyError::Malformed(format!(
            "{name} is not a NumericDate"
        ))),
    }
}

/// Where a registered claim is in a scanned payload (byte offsets).
#[derive(Clone, Copy, Default)]
enum Slot {
    #[default]
    Absent,
    /// An integer that fits an `i64`.
    Int(i64),
    /// A string without escapes: the range of its content, quotes excluded.
    Str(u32, u32),
    /// An array: the range of its text, brackets included.
    Array(u32, u32),
    /// Any other value.
    Other,
}

#[derive(Clone, Copy, Default)]
struct Registered {
    exp: Slot,
    nbf: Slot,
    iss: Slot,
    aud: Slot,
    jti: Slot,
}

struct Scanned<'a> {
    json: &'a [u8],
    registered: &'a Registered,
}

impl Scanned<'_> {
    /// The content of a string without escapes: its UTF-8 bytes (the scanner checked that the
    /// whole payload is UTF-8, and the range starts and ends at ASCII quotes).
    fn text(&self, start: u32, end: u32) -> &[u8] {
        &self.json[start as usize..end as usize]
    }
}

impl ClaimSource for Scanned<'_> {
    fn get(&self, name: &'static str) -> Found<'_> {
        let slot = match name {
            "exp" => self.registered.exp,
            "nbf" => self.registered.nbf,
            "iss" => self.registered.iss,
            _ => unreachable!("only exp, nbf and iss are read through get"),
        };
        match slot {
            Slot::Absent => Found::Absent,
            Slot::Int(n) => Found::Number(n as f64),
            Slot::Str(start, end) => Found::Str(self.text(start, end)),
            Slot::Array(..) | Slot::Other => Found::Other,
        }
    }

    fn aud(&self, expected: &str) -> Aud {
        match self.registered.aud {
            Slot::Absent => Aud::Absent,
            Slot::Str(start, end) => Aud::Present(self.text(start, end) == expected.as_bytes()),
            Slot::Array(start, end) => {
                // The scanner validated this array and it holds no backslash, so every string
                // element runs from a quote to the next quote.
                let text = &self.json[start as usize + 1..end as usize - 1];
                let mut found = false;
                let mut i = skip_ws(text, 0);
                while i < text.len() {
                    if text[i] != b'"' {
                        return Aud::NonStringElement;
                    }
                    let Some(len) = text[i + 1..].iter().position(|&b| b == b'"') else {
                        return Aud::NonStringElement;
                    };
                    found |= &text[i + 1..i + 1 + len] == expected.as_bytes();
                    i = skip_ws(text, i + len + 2);
                    // A comma, then the next element; or the end.
                    if i < text.len() {
                        i = skip_ws(text, i + 1);
                    }
                }
                Aud::Present(found)
            }
            Slot::Int(_) | Slot::Other => Aud::WrongType,
        }
    }
}

#[inline(always)]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    // Compact JSON has no whitespace: one comparison decides the common case.
    if b.get(i).is_none_or(|&c| c > b' ') {
        return i;
    }
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The position of the first `"` in `b` at or after `from`: sixteen bytes at a time with SSE2,
/// then eight at a time.
#[inline(always)]
fn find_quote(b: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const QUOTES: u64 = 0x2222_2222_2222_2222;
    let mut i = from;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8,
        };
        while i + 16 <= b.len() {
            // SAFETY: SSE2 is part of the x86_64 baseline, and the load reads sixteen bytes at
            // `i` with `i + 16 <= b.len()` (unaligned loads have no other requirement).
            let mask = unsafe {
                let chunk = _mm_loadu_si128(b.as_ptr().add(i).cast::<__m128i>());
                _mm_movemask_epi8(_mm_cmpeq_epi8(chunk, _mm_set1_epi8(b'"' as i8)))
            };
            if mask != 0 {
                return Some(i + mask.trailing_zeros() as usize);
            }
            i += 16;
        }
    }
    while let Some(word) = b.get(i..i + 8) {
        let x = u64::from_le_bytes(word.try_into().expect("8 bytes")) ^ QUOTES;
        // Sets the high bit of the first zero byte of `x` (a quote), and only spuriously above
        // it, so the lowest set bit marks the first quote.
        let found = x.wrapping_sub(ONES) & !x & HIGHS;
        if found != 0 {
            return Some(i + (found.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    b.get(i..)?.iter().position(|&c| c == b'"').map(|at| i + at)
}

/// A name as a cheap comparison key: its length, first 8 and last 8 bytes. Names of 8 bytes or
/// fewer are equal exactly when their keys are. `json[start..end]` is the name; reading a whole
/// word of `json` and masking it is cheaper than copying a short name into a zeroed word.
fn name_key(json: &[u8], start: usize, end: usize) -> (u32, u64, u64) {
    let len = end - start;
    let first = match json.get(start..start + 8) {
        Some(word) => {
            let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            if len >= 8 {
                word
            } else {
                word & ((1u64 << (8 * len)) - 1)
            }
        }
        None => {
            let mut first = [0u8; 8];
            let head = len.min(8);
            first[..head].copy_from_slice(&json[start..start + head]);
            u64::from_le_bytes(first)
        }
    };
    let last = match len {
        0..=8 => 0,
        _ => u64::from_le_bytes(json[end - 8..end].try_into().expect("8 bytes")),
    };
    (len as u32, first, last)
}

/// Whether `json` holds a backslash or a control character (`special`), and whether it holds a
/// byte above 0x7F (`high`, when UTF-8 must be checked): one pass, sixteen bytes at a time.
fn special_and_high(json: &[u8]) -> (bool, bool) {
    #[cfg(target_arch = "x86_64")]
    let (i, mut special, mut high) = {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8,
            _mm_or_si128, _mm_set1_epi8, _mm_setzero_si128,
        };
        let mut i = 0;
        // SAFETY: SSE2 is part of the x86_64 baseline, and every load reads sixteen bytes at
        // `i` with `i + 16 <= json.len()` (unaligned loads have no other requirement).
        unsafe {
            let backslash = _mm_set1_epi8(b'\\' as i8);
            let below_space = _mm_set1_epi8(0x1F);
            let (mut specials, mut highs) = (_mm_setzero_si128(), _mm_setzero_si128());
            while i + 16 <= json.len() {
                let chunk = _mm_loadu_si128(json.as_ptr().add(i).cast::<__m128i>());
                // A byte is below 0x20 exactly when min(byte, 0x1F) is the byte itself.
                let control = _mm_cmpeq_epi8(_mm_min_epu8(chunk, below_space), chunk);
                let slash = _mm_cmpeq_epi8(chunk, backslash);
                specials = _mm_or_si128(specials, _mm_or_si128(control, slash));
                highs = _mm_or_si128(highs, chunk);
                i += 16;
            }
            let high = if _mm_movemask_epi8(highs) != 0 {
                0x80
            } else {
                0
            };
            (i, _mm_movemask_epi8(specials) != 0, high)
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (i, mut special, mut high) = (0, false, 0u8);
    for &b in &json[i..] {
        special |= (b == b'\\') | (b < 0x20);
        high |= b;
    }
    (special, high >= 0x80)
}

/// The value of the eight ASCII digits in `word` (first digit in the lowest byte), or `None`
/// when any of its bytes is not a digit.
fn eight_digits(word: u64) -> Option<u64> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let digits = word.wrapping_sub(0x30 * ONES);
    // A byte of `digits` is a digit value exactly when it is below 10: then neither it nor it
    // plus 0x76 reaches 0x80 (and no byte borrowed, since the original bytes were >= 0x30).
    if (word | digits | digits.wrapping_add(0x76 * ONES)) & (0x80 * ONES) != 0
        || (word & (0xF0 * ONES)) != 0x30 * ONES
    {
        return None;
    }
    // Pairs, then quads, then the eight digits (most significant digit first in memory).
    let pairs = (digits.wrapping_mul(10) + (digits >> 8)) & 0x00FF_00FF_00FF_00FF;
    let quads = (pairs.wrapping_mul(100) + (pairs >> 16)) & 0x0000_FFFF_0000_FFFF;
    Some((quads.wrapping_mul(10_000) + (quads >> 32)) & 0xFFFF_FFFF)
}

/// Scans a payload of the common shape (see the module comment). `None` means "not sure": the
/// caller must parse with serde_json, which decides.
///
/// The top level walks the payload's quotes as a stream ([`Quotes`]): with no backslash anywhere,
/// every string runs from one quote to the next, so each name and each string value is the next
/// pair of quotes, and the scanner only checks that each pair starts where the grammar expects a
/// string. Finding a string's end is then a bit scan of a mask already in a register instead of a
/// load and a compare at a position that the previous string's end decided, so the members no
/// longer form one long chain of dependent loads and the CPU works on several at once. Nested
/// arrays and objects are read by [`Scanner::value`], after which the stream skips their quotes.
fn scan(json: &[u8]) -> Option<Registered> {
    if json.len() >= u32::MAX as usize {
        return None;
    }
    // One branch-free pass: a backslash or a control character anywhere sends the payload to
    // serde_json, so strings below only need their closing quote; full UTF-8 validation runs
    // only for payloads that are not plain ASCII.
    let (special, high) = special_and_high(json);
    if special || high && std::str::from_utf8(json).is_err() {
        return None;
    }
    let mut quotes = Quotes::new(json);
    let mut registered = Registered::default();
    // The names seen so far, and a 64-bit filter of their keys: a name whose filter bit is
    // clear is new without comparing it with each earlier one. Left uninitialised (zeroing the
    // array cost more than the whole duplicate check); entries below `count` are written.
    let mut names = [const { MaybeUninit::<(u32, u64, u64, u32)>::uninit() }; MAX_NAMES];
    let mut seen = 0u64;
    let mut count = 0;
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(json, i + 1);
    if json.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            // The name: the next pair of quotes, the first exactly here.
            if quotes.next()? != i {
                return None;
            }
            let (start, end) = (i + 1, quotes.next()?);
            let name = &json[start..end];
            let key = name_key(json, start, end);
            let bit = 1u64
                << ((key.1 ^ key.2.rotate_left(29) ^ u64::from(key.0))
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    >> 58);
            if seen & bit != 0 {
                for name_seen in &names[..count] {
                    // SAFETY: every entry below `count` was written below.
                    let (len, first, last, at) = unsafe { name_seen.assume_init() };
                    if (len, first, last) == key
                        && (len <= 8 || &json[at as usize..at as usize + len as usize] == name)
                    {
                        // A repeated name: serde_json's strict reader rejects it.
                        return None;
                    }
                }
            }
            if count == MAX_NAMES {
                return None;
            }
            seen |= bit;
            names[count].write((key.0, key.1, key.2, start as u32));
            count += 1;
            i = skip_ws(json, end + 1);
            if json.get(i) != Some(&b':') {
                return None;
            }
            i = skip_ws(json, i + 1);
            let slot = match name {
                b"exp" => Some(&mut registered.exp),
                b"nbf" => Some(&mut registered.nbf),
                b"iss" => Some(&mut registered.iss),
                b"aud" => Some(&mut registered.aud),
                b"jti" => Some(&mut registered.jti),
                _ => None,
            };
            let value = match *json.get(i)? {
                b'"' => {
                    // The value string: the next pair of quotes. Only whitespace and the colon
                    // lie between the name's closing quote and `i`, so the first is at `i`.
                    let (open, close) = (quotes.next()?, quotes.next()?);
                    debug_assert_eq!(open, i);
                    i = close + 1;
                    Slot::Str(open as u32 + 1, close as u32)
                }
                b'-' | b'0'..=b'9' => {
                    let mut s = Scanner { b: json, i };
                    let number = s.number()?;
                    i = s.i;
                    match (number, &slot) {
                        (Some(n), _) => Slot::Int(n),
                        // A registered claim that is a number but not a plain integer goes to
                        // serde_json, so that NumericDates compare exactly as it reads them.
                        (None, Some(_)) => return None,
                        (None, None) => Slot::Other,
                    }
                }
                c => {
                    let mut s = Scanner { b: json, i };
                    s.value(1)?;
                    let from = i;
                    i = s.i;
                    if matches!(c, b'[' | b'{') {
                        quotes.skip_to(i);
                    }
                    if c == b'[' {
                        Slot::Array(from as u32, i as u32)
                    } else {
                        Slot::Other
                    }
                }
            };
            if let Some(slot) = slot {
                *slot = value;
            }
            i = skip_ws(json, i);
            match json.get(i) {
                Some(b',') => i = skip_ws(json, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (skip_ws(json, i) == json.len()).then_some(registered)
}

/// The positions of the quotes of a payload, in order, read from one 64-bit mask per 64 bytes.
/// Each mask depends only on its chunk's place, never on where a string ended, so computing the
/// next one does not wait for the scanner.
struct Quotes<'a> {
    json: &'a [u8],
    /// The start of the chunk `bits` describes (a multiple of 64).
    base: usize,
    /// The quotes of that chunk not yet returned, one bit per byte.
    bits: u64,
}

impl<'a> Quotes<'a> {
    fn new(json: &'a [u8]) -> Self {
        Quotes {
            json,
            base: 0,
            bits: quote_mask(json, 0),
        }
    }

    /// The position of the next quote.
    #[inline(always)]
    fn next(&mut self) -> Option<usize> {
        while self.bits == 0 {
            self.base += 64;
            if self.base >= self.json.len() {
                return None;
            }
            self.bits = quote_mask(self.json, self.base);
        }
        let at = self.base + self.bits.trailing_zeros() as usize;
        self.bits &= self.bits - 1;
        Some(at)
    }

    /// Forgets the quotes before `pos` (those of a nested value read by [`Scanner::value`]).
    fn skip_to(&mut self, pos: usize) {
        if pos >= self.base + 64 {
            self.base = pos & !63;
            self.bits = quote_mask(self.json, self.base);
        }
        self.bits &= !0u64 << (pos - self.base);
    }
}

/// One bit per byte of `json[base..base + 64]` (fewer at the end), set at each `"`.
#[inline(always)]
fn quote_mask(json: &[u8], base: usize) -> u64 {
    let mut padded = [0u8; 64];
    let chunk: &[u8; 64] = match json.get(base..base + 64) {
        Some(chunk) => chunk.try_into().expect("64 bytes"),
        None => {
            let tail = json.get(base..).unwrap_or_default();
            padded[..tail.len()].copy_from_slice(tail);
            &padded
        }
    };
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8,
        };
        let mut mask = 0u64;
        for part in 0..4 {
            // SAFETY: SSE2 is part of the x86_64 baseline, and the load reads sixteen of the
            // chunk's 64 bytes (unaligned loads have no other requirement).
            let bits = unsafe {
                let v = _mm_loadu_si128(chunk.as_ptr().add(16 * part).cast::<__m128i>());
                _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8))) as u16
            };
            mask |= u64::from(bits) << (16 * part);
        }
        mask
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        chunk
            .iter()
            .enumerate()
            .fold(0u64, |mask, (at, &b)| mask | (u64::from(b == b'"') << at))
    }
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    fn skip_ws(&mut self) {
        self.i = skip_ws(self.b, self.i);
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i.checked_add(word.len())?;
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// After an opening quote: the content range of a string, consuming the closing quote.
    /// [`scan`] has checked that the payload holds no backslash and no control character, so the
    /// next quote closes the string.
    #[inline(always)]
    fn string_body(&mut self) -> Option<(usize, usize)> {
        let start = self.i;
        let end = find_quote(self.b, start)?;
        self.i = end + 1;
        Some((start, end))
    }

    /// A number in JSON grammar without an exponent; its value when it is an integer that fits
    /// an `i64` (and is not `-0`).
    #[inline(always)]
    fn number(&mut self) -> Option<Option<i64>> {
        let negative = self.peek()? == b'-';
        if negative {
            self.i += 1;
        }
        let digits_start = self.i;
        let mut value: i64 = 0;
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                // Eight digits at a time while they last (a NumericDate has ten).
                while let Some(word) = self.b.get(self.i..self.i + 8) {
                    let Some(eight) = eight_digits(u64::from_le_bytes(word.try_into().ok()?))
                    else {
                        break;
                    };
                    value = value.wrapping_mul(100_000_000).wrapping_add(eight as i64);
                    self.i += 8;
                }
                while let Some(d @ b'0'..=b'9') = self.peek() {
                    value = value.wrapping_mul(10).wrapping_add(i64::from(d - b'0'));
                    self.i += 1;
                }
            }
            _ => return None,
        }
        let digits = self.i - digits_start;
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.i += 1;
            }
            integer = false;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) || digits > MAX_NUMBER_DIGITS {
            return None;
        }
        if !integer || digits > MAX_INT_DIGITS {
            return Some(None);
        }
        if negative && value == 0 {
            // serde_json reads `-0` as a float; leave it to it.
            return None;
        }
        Some(Some(if negative { -value } else { value }))
    }

    /// Any JSON value at nesting `depth` (the claims object is depth 1).
    fn value(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.i += 1;
                self.string_body()?;
            }
            b'-' | b'0'..=b'9' => {
                self.number()?;
            }
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'n' => self.literal(b"null")?,
            open @ (b'{' | b'[') => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                let close = if open == b'{' { b'}' } else { b']' };
                self.i += 1;
                self.skip_ws();
                if self.peek()? == close {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.skip_ws();
                    if open == b'{' {
                        self.eat(b'"')?;
                        self.string_body()?;
                        self.skip_ws();
                        self.eat(b':')?;
                        self.skip_ws();
                    }
                    self.value(depth + 1)?;
                    self.skip_ws();
                    match self.next()? {
                        b',' => {}
                        c if c == close => break,
                        _ => return None,
                    }
                }
            }
            _ => return None,
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_750_000_000;

    fn opts_list() -> Vec<VerifyOptions> {
        let base = VerifyOptions::new(NOW);
        vec![
            base.clone(),
            VerifyOptions {
                issuer: Some("keywarden".into()),
                audience: Some("api".into()),
                ..base.clone()
            },
            VerifyOptions {
                audience: Some("api".into()),
                ..base
            },
        ]
    }

    /// Both readers must agree: accept the same payloads with the same claims and the same
    /// verdicts, and reject the same payloads.
    fn assert_same(json: &[u8]) {
        let slow = parse_claims_object(json);
        let fast = Claims::from_json(json.to_vec());
        match (&slow, &fast) {
            (Err(VerifyError::Malformed(_)), Err(VerifyError::Malformed(_))) => {}
            (Ok(map), Ok(claims)) => {
                assert_eq!(claims.to_value(), Value::Object(map.clone()));
                for opts in opts_list() {
                    assert_eq!(
                        claims.check(&opts),
                        check(map, &opts),
                        "{}",
                        String::from_utf8_lossy(json)
                    );
                }
                assert_eq!(
                    claims.jti(),
                    map.get("jti").and_then(Value::as_str),
                    "{}",
                    String::from_utf8_lossy(json)
                );
            }
            _ => panic!(
                "readers disagree on {:?}: serde {:?}, scanner {:?}",
                String::from_utf8_lossy(json),
                slow.is_ok(),
                fast.is_ok()
            ),
        }
    }

    #[test]
    fn typical_payloads_take_the_scanner() {
        for value in [
            json!({ "iss": "keywarden", "sub": "u", "aud": "api", "iat": NOW, "nbf": NOW,
                    "exp": NOW + 900, "jti": "6f1c", "scope": "secrets:read" }),
            json!({ "exp": NOW, "aud": ["billing", "api"], "nested": { "a": [1, 2.5, null] } }),
            json!({ "exp": NOW, "name": "Zoë ✓", "flag": true, "n": -12 }),
            json!({}),
        ] {
            let json = serde_json::to_vec(&value).unwrap();
            let claims = Claims::from_json(json.clone()).unwrap();
            assert!(claims.was_scanned(), "{value}");
            assert_eq!(claims, value);
            assert_same(&json);
        }
    }

    #[test]
    fn unusual_payloads_fall_back_to_serde_json_with_the_same_result() {
        let cases: &[&[u8]] = &[
            br#"{"exp":1750000600,"exp":1}"#,
            br#"{"exp":1750000600,"\u0065xp":1}"#,
            br#"{"exp":"1750000600"}"#,
            br#"{"exp":1.7500006e9}"#,
            br#"{"exp":1750000600.5}"#,
            br#"{"exp":-0}"#,
            br#"{"exp":01}"#,
            br#"{"exp":1750000600,}"#,
            br#"{"exp":1750000600} x"#,
            br#"{"exp":1750000600}  "#,
            b" \t\n{\r\"exp\" : 1750000600 } \n",
            br#"{"exp":1750000600,"x":1e999}"#,
            br#"{"exp":1750000600,"x":12345678901234567890123}"#,
            br#"{"exp":99999999999999999999}"#,
            br#"{"exp":1750000600,"jti":"a\"b"}"#,
            br#"{"exp":1750000600,"jti":"\ud800"}"#,
            br#"{"exp":1750000600,"jti":5}"#,
            b"{\"exp\":1750000600,\"jti\":\"a\tb\"}",
            b"{\"exp\":1750000600,\"jti\":\"\xff\"}",
            br#"{"exp":1750000600,"aud":["api",1]}"#,
            br#"{"exp":1750000600,"aud":[]}"#,
            br#"{"exp":1750000600,"aud":[ "api" , "x" ]}"#,
            br#"{"exp":1750000600,"aud":{"api":1}}"#,
            br#"{"exp":1750000600,"iss":["keywarden"]}"#,
            br#"{"exp":1750000600,"iss":"keywarden","aud":"api"}"#,
            br#"{"exp":1750000600,"x":{"a":1,"a":2}}"#,
            br#"{"exp":1750000600,"x":[1,]}"#,
            br#"{"exp":1750000600,"x":tru}"#,
            br#"{"exp":1750000600,"x":-}"#,
            br#"{"exp":1750000600,"x":1.}"#,
            br#"{"exp":1750000600,"x":.5}"#,
            br#"[1,2]"#,
            br#""exp""#,
            b"",
            b"{",
            b"{}",
            br#"{"exp":1750000600,"nbf":null}"#,
        ];
        for case in cases {
            assert_same(case);
        }
    }

    #[test]
    fn nesting_deeper_than_serde_allows_is_rejected_either_way() {
        for depth in [30, 31, 32, 33, 126, 127, 128, 129] {
            let json = format!(
                r#"{{"exp":1750000600,"x":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            assert_same(json.as_bytes());
        }
    }

    #[test]
    fn eight_digits_reads_digits_only() {
        let read = |text: &[u8; 8]| eight_digits(u64::from_le_bytes(*text));
        assert_eq!(read(b"17500006"), Some(17_500_006));
        assert_eq!(read(b"00000000"), Some(0));
        assert_eq!(read(b"99999999"), Some(99_999_999));
        for at in 0..8 {
            for bad in [
                b'/',
                b':',
                b' ',
                b'.',
                b'e',
                0x30 + 0x80,
                0xB9,
                0x3A,
                0x20,
                0,
            ] {
                let mut text = *b"12345678";
                text[at] = bad;
                assert_eq!(read(&text), None, "{text:?}");
            }
        }
    }

    #[test]
    fn long_and_short_numbers_and_names_read_like_serde_json() {
        // Integers of every length around the eight-digit steps, at the end of the payload too,
        // and names of every length around the eight-byte keys.
        for digits in 1..=21 {
            let n: String = "1234567890".chars().cycle().take(digits).collect();
            for json in [
                format!(r#"{{"exp":{n}}}"#),
                format!(r#"{{"exp":{n},"iat":{n}}}"#),
                format!(r#"{{"exp":-{n},"x":[{n}]}}"#),
                format!(r#"{{"exp":{n}.5}}"#),
                format!(r#"{{"exp":1750000600,"x":{n}}}"#),
            ] {
                assert_same(json.as_bytes());
            }
        }
        for len in 0..20 {
            let name = "n".repeat(len);
            let other = format!("{}m", "n".repeat(len.saturating_sub(1)));
            for json in [
                format!(r#"{{"exp":1750000600,"{name}":1}}"#),
                format!(r#"{{"{name}":1,"exp":1750000600,"{name}":2}}"#),
                format!(r#"{{"{name}":1,"{other}":2,"exp":1750000600}}"#),
                format!(r#"{{"exp":1750000600,"{name}":1,"{other}":2}}"#),
            ] {
                assert_same(json.as_bytes());
            }
        }
    }

    #[test]
    fn strings_and_nested_values_read_alike_wherever_the_64_byte_masks_split_them() {
        // Every offset of the members after a filler: names, string values, an array and an
        // object (whose quotes the stream skips) and a long string, on both sides of the quote
        // masks' 64-byte boundaries.
        for filler in 0..200 {
            let value = json!({
                // Named to sort first (serde_json's map is ordered by name).
                "a": "x".repeat(filler),
                "aud": ["billing", "api"],
                "n": { "k": "v", "l": ["m", { "o": "p" }] },
                "exp": NOW + 900,
                "iss": "keywarden",
                "s": "y".repeat(70),
                "jti": "j-1",
            });
            let json = serde_json::to_vec(&value).unwrap();
            let claims = Claims::from_json(json.clone()).unwrap();
            assert!(claims.was_scanned(), "filler {filler}");
            assert_eq!(claims.jti(), Some("j-1"));
            assert_same(&json);
        }
    }

    #[test]
    fn mutated_payloads_get_the_same_verdict_from_both_readers() {
        let seeds = [
            br#"{"iss":"keywarden","sub":"user-1234","aud":["api","x"],"iat":1750000000,"nbf":1750000000,"exp":1750000900,"jti":"6f1c","n":{"a":[true,false,null,-1.25]}}"#.to_vec(),
            br#"{"exp":1750000600,"aud":"api","iss":"keywarden"}"#.to_vec(),
            // A string longer than a 64-byte quote mask, and nested values across two.
            format!(
                r#"{{"a":[{{"b":"c"}}],"long":"{}","exp":1750000600,"z":{{"q":["r","s"]}},"iss":"k"}}"#,
                "x".repeat(150)
            )
            .into_bytes(),
        ];
        let alphabet = b"{}[]\":,.-+eE0123456789 \\tnulfasr\x01\xc3\xa9";
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut json = seeds[(next() % seeds.len() as u64) as usize].clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() as usize) % (json.len() + 1);
                let byte = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 if at < json.len() => json[at] = byte,
                    1 if at < json.len() => {
                        json.remove(at);
                    }
                    _ => json.insert(at, byte),
                }
            }
            assert_same(&json);
        }
    }
}
