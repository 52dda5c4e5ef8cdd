//! Rotation policy: how old a key may grow and how long a demoted key keeps
//! working. Jobs decide *when to look*; this module decides *what is due*,
//! from the keys and `now` alone, so a missed tick is caught up and a
//! repeated tick does nothing.

use chrono::{DateTime, TimeDelta, Utc};

use super::{KeyMeta, KeyState, Purpose};

/// The policy of one purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PurposePolicy {
    /// An active key is due for rotation this long after activation.
    pub rotate_after: TimeDelta,
    /// A demoted key keeps verifying/decrypting this long (signing and
    /// token-encryption keys). Data keys ignore it: they retire by census.
    pub grace: TimeDelta,
}

/// The keyring policy: one entry per purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub signing: PurposePolicy,
    pub token_encryption: PurposePolicy,
    pub data: PurposePolicy,
    pub temp: PurposePolicy,
}

impl Default for Policy {
    /// The seed's schedule: 90 days for signing keys, 30 for data keys, 7 for
    /// temp keys; one day of grace for demoted token keys.
    fn default() -> Self {
        let day = TimeDelta::days(1);
        Policy {
            signing: PurposePolicy {
                rotate_after: TimeDelta::days(90),
                grace: day,
            },
            token_encryption: PurposePolicy {
                rotate_after: TimeDelta::days(90),
                grace: day,
            },
            data: PurposePolicy {
                rotate_after: TimeDelta::days(30),
                grace: TimeDelta::zero(),
            },
            temp: PurposePolicy {
                rotate_after: TimeDelta::days(7),
                grace: TimeDelta::zero(),
            },
        }
    }
}

impl Policy {
    /// The policy of one purpose.
    pub fn of(&self, purpose: Purpose) -> PurposePolicy {
        match purpose {
            Purpose::Signing => self.signing,
            Purpose::TokenEncryption => self.token_encryption,
            Purpose::Data => self.data,
            Purpose::Temp => self.temp,
        }
    }

    /// When a key of `purpose` activated at `activated_at` falls due.
    pub fn rotate_at(&self, purpose: Purpose, activated_at: DateTime<Utc>) -> DateTime<Utc> {
        activated_at + self.of(purpose).rotate_after
    }

    /// When a key of `purpose` demoted at `now` stops working, if its
    /// purpose retires by time. Data keys retire by census: `None`.
    pub fn retire_at(&self, purpose: Purpose, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match purpose {
            Purpose::Data => None,
            // A replaced temp key has expired: it is destroyed at once.
            Purpose::Temp => Some(now),
            _ => Some(now + self.of(purpose).grace),
        }
    }
}

/// What a rotation tick should do for one purpose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RotationPlan {
    /// No active key exists: make the first one.
    Create,
    /// The active key is due: replace it.
    Rotate { old_kid: String },
    /// Nothing to do until `next_at`.
    NotDue { kid: String, next_at: DateTime<Utc> },
}

/// Decides whether `purpose` needs rotating at `now`. A key is due when
/// `now >= rotate_after` (so it rotates exactly at 30 days, not one second
/// before); the stored `rotate_after` wins over the policy so that a
/// shortened policy applies from the next activation, and an active key
/// without one is judged by its activation time under today's policy.
pub fn plan_rotation(
    keys: &[KeyMeta],
    purpose: Purpose,
    policy: &Policy,
    now: DateTime<Utc>,
) -> RotationPlan {
    let Some(active) = keys
        .iter()
        .find(|k| k.purpose == purpose && k.state == KeyState::Active)
    else {
        return RotationPlan::Create;
    };
    let activated = active.activated_at.unwrap_or(active.created_at);
    let by_policy = policy.rotate_at(purpose, activated);
    // The earlier of the stored due date and today's policy: shortening the
    // policy in config takes effect without waiting out the old period.
    let due = active.rotate_after.map_or(by_policy, |r| r.min(by_policy));
    if now >= due {
        RotationPlan::Rotate {
            old_kid: active.kid.clone(),
        }
    } else {
        RotationPlan::NotDue {
            kid: active.kid.clone(),
            next_at: due,
        }
    }
}

/// One state change that expiry calls for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiryAction {
    pub kid: String,
    pub purpose: Purpose,
    pub from: KeyState,
    pub to: KeyState,
}

/// Decides which demoted keys have run out their time at `now`:
/// signing and token-encryption keys past their grace retire, temp keys past
/// expiry are destroyed, and a retiring data key retires only when
/// `rows_under(kid)` says, from a real count, that it protects no row
/// (`None` means "not counted": such a key is left alone).
pub fn plan_expiry(
    keys: &[KeyMeta],
    now: DateTime<Utc>,
    rows_under: impl Fn(&str) -> Option<u64>,
) -> Vec<ExpiryAction> {
    keys.iter()
        .filter(|k| k.state == KeyState::Retiring)
        .filter_map(|k| {
            let to = match k.purpose {
                Purpose::Data => {
                    if rows_under(&k.kid) == Some(0) {
                        KeyState::Retired
                    } else {
                        return None;
                    }
                }
                _ if k.retire_after.is_none_or(|t| now < t) => return None,
                Purpose::Temp => KeyState::Destroyed,
                Purpose::Signing | Purpose::TokenEncryption => KeyState::Retired,
            };
            Some(ExpiryAction {
                kid: k.kid.clone(),
                purpose: k.purpose,
                from: k.state,
                to,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::Algorithm;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    fn key(purpose: Purpose, state: KeyState, activated: DateTime<Utc>) -> KeyMeta {
        KeyMeta {
            kid: format!("{}_{}", purpose.kid_prefix(), state.as_str()),
            purpose,
            algorithm: match purpose {
                Purpose::Signing => Algorithm::HS256,
                Purpose::TokenEncryption => Algorithm::A256GCM,
                Purpose::Data => Algorithm::Fernet,
                Purpose::Temp => Algorithm::HmacSha256,
            },
            state,
            version: 1,
            created_at: activated,
            activated_at: Some(activated),
            rotate_after: Some(Policy::default().rotate_at(purpose, activated)),
            retire_after: None,
            revoked_at: None,
        }
    }

    #[test]
    fn a_data_key_rotates_at_thirty_days_and_not_one_second_before() {
        let p = Policy::default();
        let keys = [key(Purpose::Data, KeyState::Active, t0())];
        let almost = t0() + TimeDelta::days(30) - TimeDelta::seconds(1);
        assert!(matches!(
            plan_rotation(&keys, Purpose::Data, &p, almost),
            RotationPlan::NotDue { .. }
        ));
        let later = t0() + TimeDelta::days(29) + TimeDelta::hours(23);
        assert!(matches!(
            plan_rotation(&keys, Purpose::Data, &p, later),
            RotationPlan::NotDue { .. }
        ));
        assert_eq!(
            plan_rotation(&keys, Purpose::Data, &p, t0() + TimeDelta::days(30)),
            RotationPlan::Rotate {
                old_kid: "dat_active".into()
            }
        );
    }

    #[test]
    fn signing_keys_rotate_at_ninety_days_and_temp_keys_at_seven() {
        let p = Policy::default();
        let keys = [
            key(Purpose::Signing, KeyState::Active, t0()),
            key(Purpose::Temp, KeyState::Active, t0()),
        ];
        let day = |d| t0() + TimeDelta::days(d);
        assert!(matches!(
            plan_rotation(&keys, Purpose::Signing, &p, day(89)),
            RotationPlan::NotDue { .. }
        ));
        assert!(matches!(
            plan_rotation(&keys, Purpose::Signing, &p, day(90)),
            RotationPlan::Rotate { .. }
        ));
        assert!(matches!(
            plan_rotation(&keys, Purpose::Temp, &p, day(6)),
            RotationPlan::NotDue { .. }
        ));
        assert!(matches!(
            plan_rotation(&keys, Purpose::Temp, &p, day(7)),
            RotationPlan::Rotate { .. }
        ));
    }

    #[test]
    fn a_missed_tick_is_caught_up_later() {
        let p = Policy::default();
        let keys = [key(Purpose::Data, KeyState::Active, t0())];
        assert!(matches!(
            plan_rotation(&keys, Purpose::Data, &p, t0() + TimeDelta::days(45)),
            RotationPlan::Rotate { .. }
        ));
    }

    #[test]
    fn a_missing_active_key_is_created() {
        let keys = [key(Purpose::Data, KeyState::Retiring, t0())];
        assert_eq!(
            plan_rotation(&keys, Purpose::Data, &Policy::default(), t0()),
            RotationPlan::Create
        );
    }

    #[test]
    fn a_shortened_policy_applies_to_the_current_key() {
        let mut p = Policy::default();
        p.data.rotate_after = TimeDelta::days(10);
        let keys = [key(Purpose::Data, KeyState::Active, t0())];
        assert!(matches!(
            plan_rotation(&keys, Purpose::Data, &p, t0() + TimeDelta::days(10)),
            RotationPlan::Rotate { .. }
        ));
    }

    #[test]
    fn a_retiring_signing_key_keeps_verifying_through_its_grace_and_retires_at_its_end() {
        let p = Policy::default();
        let demoted_at = t0() + TimeDelta::days(90);
        let mut k = key(Purpose::Signing, KeyState::Retiring, t0());
        k.retire_after = p.retire_at(Purpose::Signing, demoted_at);
        let keys = [k];
        let end = demoted_at + TimeDelta::days(1);
        assert!(plan_expiry(&keys, end - TimeDelta::seconds(1), |_| None).is_empty());
        let actions = plan_expiry(&keys, end, |_| None);
        assert_eq!(actions.len(), 1);
        assert_eq!(actions[0].to, KeyState::Retired);
    }

    #[test]
    fn a_replaced_temp_key_is_destroyed() {
        let p = Policy::default();
        let at = t0() + TimeDelta::days(7);
        let mut k = key(Purpose::Temp, KeyState::Retiring, t0());
        k.retire_after = p.retire_at(Purpose::Temp, at);
        let actions = plan_expiry(&[k], at, |_| None);
        assert_eq!(actions[0].to, KeyState::Destroyed);
    }

    #[test]
    fn a_retiring_data_key_retires_only_when_counted_at_zero_rows() {
        let k = key(Purpose::Data, KeyState::Retiring, t0());
        let far = t0() + TimeDelta::days(3650);
        assert!(plan_expiry(std::slice::from_ref(&k), far, |_| None).is_empty());
        assert!(plan_expiry(std::slice::from_ref(&k), far, |_| Some(1)).is_empty());
        let actions = plan_expiry(&[k], far, |_| Some(0));
        assert_eq!(actions[0].to, KeyState::Retired);
    }

    #[test]
    fn active_and_revoked_keys_never_expire() {
        let keys = [
            key(Purpose::Signing, KeyState::Active, t0()),
            key(Purpose::Data, KeyState::Revoked, t0()),
        ];
        assert!(plan_expiry(&keys, t0() + TimeDelta::days(9999), |_| Some(0)).is_empty());
    }
}
