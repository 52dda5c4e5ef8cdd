//! The keyring's pure domain: key purposes, algorithms, states, the legal
//! state transitions and the rotation policy.
//!
//! Architecture invariant: nothing in this module does IO or reads the
//! clock. Every function that depends on time takes `now` as an argument, so
//! tests decide what time it is and the same rules run in the worker, the
//! one-shot commands and the tests.

pub mod policy;

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;

pub use policy::{ExpiryAction, Policy, PurposePolicy, RotationPlan, plan_expiry, plan_rotation};

/// What a key is for. Exactly one key per purpose is active at any time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Signs JWS tokens (the seed's "master key").
    Signing,
    /// Encrypts JWE tokens (`dir` + A256GCM).
    TokenEncryption,
    /// Encrypts stored secrets (Fernet).
    Data,
    /// Short-lived HMAC-SHA256 session keys.
    Temp,
}

impl Purpose {
    /// Every purpose, in the order commands list them.
    pub const ALL: [Purpose; 4] = [
        Purpose::Signing,
        Purpose::TokenEncryption,
        Purpose::Data,
        Purpose::Temp,
    ];

    /// The name used in the CLI, the store and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Signing => "signing",
            Purpose::TokenEncryption => "token_encryption",
            Purpose::Data => "data",
            Purpose::Temp => "temp",
        }
    }

    /// A short prefix for this purpose's key ids, so an operator can tell
    /// what a kid is at a glance.
    pub fn kid_prefix(self) -> &'static str {
        match self {
            Purpose::Signing => "sig",
            Purpose::TokenEncryption => "enc",
            Purpose::Data => "dat",
            Purpose::Temp => "tmp",
        }
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown purpose name; the message lists the allowed ones.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown key purpose {0:?} (allowed: signing, token_encryption, data, temp)")]
pub struct UnknownPurpose(pub String);

impl FromStr for Purpose {
    type Err = UnknownPurpose;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "signing" => Ok(Purpose::Signing),
            "token_encryption" => Ok(Purpose::TokenEncryption),
            "data" => Ok(Purpose::Data),
            "temp" => Ok(Purpose::Temp),
            other => Err(UnknownPurpose(other.to_string())),
        }
    }
}

/// The algorithm a key is used with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Algorithm {
    HS256,
    RS256,
    ES256,
    EdDSA,
    /// AES-256-GCM, for JWE `dir` + `A256GCM`.
    A256GCM,
    /// Fernet (AES-128-CBC + HMAC-SHA256).
    #[serde(rename = "fernet")]
    Fernet,
    /// HMAC-SHA256 temp keys.
    #[serde(rename = "HMAC-SHA256")]
    HmacSha256,
}

impl Algorithm {
    /// The name used in the store and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::HS256 => "HS256",
            Algorithm::RS256 => "RS256",
            Algorithm::ES256 => "ES256",
            Algorithm::EdDSA => "EdDSA",
            Algorithm::A256GCM => "A256GCM",
            Algorithm::Fernet => "fernet",
            Algorithm::HmacSha256 => "HMAC-SHA256",
        }
    }

    /// Whether a key of `purpose` may use this algorithm.
    pub fn fits(self, purpose: Purpose) -> bool {
        match purpose {
            Purpose::Signing => matches!(
                self,
                Algorithm::HS256 | Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA
            ),
            Purpose::TokenEncryption => self == Algorithm::A256GCM,
            Purpose::Data => self == Algorithm::Fernet,
            Purpose::Temp => self == Algorithm::HmacSha256,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown algorithm name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown algorithm {0:?} (allowed: HS256, RS256, ES256, EdDSA, A256GCM, fernet, HMAC-SHA256)"
)]
pub struct UnknownAlgorithm(pub String);

impl FromStr for Algorithm {
    type Err = UnknownAlgorithm;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "HS256" => Ok(Algorithm::HS256),
            "RS256" => Ok(Algorithm::RS256),
            "ES256" => Ok(Algorithm::ES256),
            "EdDSA" => Ok(Algorithm::EdDSA),
            "A256GCM" => Ok(Algorithm::A256GCM),
            "fernet" => Ok(Algorithm::Fernet),
            "HMAC-SHA256" => Ok(Algorithm::HmacSha256),
            other => Err(UnknownAlgorithm(other.to_string())),
        }
    }
}

/// A key's lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Made but not yet in use.
    Pending,
    /// The one key of its purpose that signs and encrypts.
    Active,
    /// Verifies and decrypts only.
    Retiring,
    /// Kept, unusable.
    Retired,
    /// Never usable again, from any state.
    Revoked,
    /// Material erased; the row stays for the audit trail.
    Destroyed,
}

impl KeyState {
    /// The name used in the CLI, the store and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Pending => "pending",
            KeyState::Active => "active",
            KeyState::Retiring => "retiring",
            KeyState::Retired => "retired",
            KeyState::Revoked => "revoked",
            KeyState::Destroyed => "destroyed",
        }
    }

    /// Whether a key in this state may verify tokens or decrypt data.
    pub fn can_verify_or_decrypt(self) -> bool {
        matches!(self, KeyState::Active | KeyState::Retiring)
    }

    /// Checks a transition against the lifecycle:
    /// `pending -> active -> retiring -> retired -> destroyed`, a retiring key
    /// may be destroyed directly (temp keys on expiry), and `revoked` is
    /// reachable from every state but itself; a revoked key may then be
    /// destroyed. Anything else is an error, never a silent no-op.
    pub fn transition(self, to: KeyState) -> Result<KeyState, IllegalTransition> {
        use KeyState::*;
        let ok = matches!(
            (self, to),
            (Pending, Active)
                | (Active, Retiring)
                | (Retiring, Retired)
                | (Retiring, Destroyed)
                | (Retired, Destroyed)
                | (Revoked, Destroyed)
        ) || (to == Revoked && self != Revoked);
        if ok {
            Ok(to)
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state change the lifecycle does not allow.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
#[error("a key cannot go from {from} to {to}")]
pub struct IllegalTransition {
    pub from: KeyState,
    pub to: KeyState,
}

/// An unknown state name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown key state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for KeyState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(KeyState::Pending),
            "active" => Ok(KeyState::Active),
            "retiring" => Ok(KeyState::Retiring),
            "retired" => Ok(KeyState::Retired),
            "revoked" => Ok(KeyState::Revoked),
            "destroyed" => Ok(KeyState::Destroyed),
            other => Err(UnknownState(other.to_string())),
        }
    }
}

/// Everything about a key except its material. Safe to print and serialise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyMeta {
    pub kid: String,
    pub purpose: Purpose,
    pub algorithm: Algorithm,
    pub state: KeyState,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub activated_at: Option<DateTime<Utc>>,
    /// When this key is due for rotation (active keys).
    pub rotate_after: Option<DateTime<Utc>>,
    /// When a retiring key stops verifying/decrypting (signing,
    /// token-encryption and temp keys). Data keys retire by census instead.
    pub retire_after: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A fresh random key id: the purpose's prefix and 96 random bits.
pub fn new_kid(purpose: Purpose, random: [u8; 12]) -> String {
    use base64::Engine;
    format!(
        "{}_{}",
        purpose.kid_prefix(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
    )
}

/// Whether a user-supplied kid is well formed: the kid is only ever used as
/// a bound parameter, but a clear early error beats a confusing "not found".
pub fn kid_is_well_formed(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= 64
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use KeyState::*;

    const ALL_STATES: [KeyState; 6] = [Pending, Active, Retiring, Retired, Revoked, Destroyed];

    #[test]
    fn every_legal_transition_is_accepted_and_every_other_refused() {
        let legal = [
            (Pending, Active),
            (Active, Retiring),
            (Retiring, Retired),
            (Retiring, Destroyed),
            (Retired, Destroyed),
            (Revoked, Destroyed),
            (Pending, Revoked),
            (Active, Revoked),
            (Retiring, Revoked),
            (Retired, Revoked),
            (Destroyed, Revoked),
        ];
        for from in ALL_STATES {
            for to in ALL_STATES {
                let result = from.transition(to);
                if legal.contains(&(from, to)) {
                    assert_eq!(result, Ok(to), "{from} -> {to} should be legal");
                } else {
                    assert_eq!(
                        result,
                        Err(IllegalTransition { from, to }),
                        "{from} -> {to} should be illegal"
                    );
                }
            }
        }
    }

    #[test]
    fn revoking_twice_is_an_error_not_a_silent_no_op() {
        assert!(Revoked.transition(Revoked).is_err());
    }

    #[test]
    fn only_active_and_retiring_keys_verify_or_decrypt() {
        for s in ALL_STATES {
            assert_eq!(s.can_verify_or_decrypt(), matches!(s, Active | Retiring));
        }
    }

    #[test]
    fn names_round_trip() {
        for p in Purpose::ALL {
            assert_eq!(p.as_str().parse::<Purpose>().unwrap(), p);
        }
        for s in ALL_STATES {
            assert_eq!(s.as_str().parse::<KeyState>().unwrap(), s);
        }
        for a in [
            Algorithm::HS256,
            Algorithm::RS256,
            Algorithm::ES256,
            Algorithm::EdDSA,
            Algorithm::A256GCM,
            Algorithm::Fernet,
            Algorithm::HmacSha256,
        ] {
            assert_eq!(a.as_str().parse::<Algorithm>().unwrap(), a);
        }
        let err = "dta".parse::<Purpose>().unwrap_err().to_string();
        assert!(
            err.contains("dta") && err.contains("token_encryption"),
            "{err}"
        );
    }

    #[test]
    fn algorithms_fit_only_their_purpose() {
        assert!(Algorithm::Fernet.fits(Purpose::Data));
        assert!(!Algorithm::Fernet.fits(Purpose::Signing));
        assert!(Algorithm::EdDSA.fits(Purpose::Signing));
        assert!(!Algorithm::HS256.fits(Purpose::Temp));
        assert!(Algorithm::A256GCM.fits(Purpose::TokenEncryption));
    }

    #[test]
    fn kids_carry_their_purpose_and_are_well_formed() {
        let kid = new_kid(Purpose::Data, [7; 12]);
        assert!(kid.starts_with("dat_"), "{kid}");
        assert!(kid_is_well_formed(&kid));
        assert!(!kid_is_well_formed("../etc/passwd"));
        assert!(!kid_is_well_formed("x' OR 1=1 --"));
        assert!(!kid_is_well_formed(""));
    }
}
