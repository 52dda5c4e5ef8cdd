//! Human-written durations such as `90d`, `12h`, `15m`, `30s` and `1h30m`.
//!
//! Rotation policies, token lifetimes, leeways and poll intervals are all
//! written by operators in config files, environment variables and `--ttl`
//! flags. This module gives them one spelling, one parser with errors that
//! say what was given and what is allowed, and one canonical printed form, so
//! that `config show` prints back what `config default` documents.
//!
//! The resolution is whole seconds: nothing in keywarden needs finer
//! granularity, and whole seconds keep the text form exact.

use std::fmt;
use std::str::FromStr;

/// A non-negative span of whole seconds, written as `90d`, `12h`, `15m`,
/// `30s`, or a combination from largest to smallest unit such as `1d12h` or
/// `1h30m`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration {
    secs: u64,
}

/// Seconds per unit, largest first, with the letter that writes the unit.
const UNITS: [(char, u64); 4] = [('d', 86_400), ('h', 3_600), ('m', 60), ('s', 1)];

impl Duration {
    /// The empty duration, written `0s`.
    pub const ZERO: Duration = Duration { secs: 0 };

    /// The longest duration accepted: 100 years of 365 days.
    ///
    /// The cap keeps every duration representable as a `chrono::TimeDelta`
    /// and as an offset from any realistic timestamp, so callers never have
    /// to handle overflow when they add a policy interval to `now`.
    pub const MAX: Duration = Duration {
        secs: 36_500 * 86_400,
    };

    /// A duration of `secs` seconds, capped at [`Duration::MAX`].
    pub const fn from_secs(secs: u64) -> Duration {
        if secs > Self::MAX.secs {
            Self::MAX
        } else {
            Duration { secs }
        }
    }

    /// A duration of `mins` minutes, capped at [`Duration::MAX`].
    pub const fn from_mins(mins: u64) -> Duration {
        Self::from_secs(mins.saturating_mul(60))
    }

    /// A duration of `hours` hours, capped at [`Duration::MAX`].
    pub const fn from_hours(hours: u64) -> Duration {
        Self::from_secs(hours.saturating_mul(3_600))
    }

    /// A duration of `days` days of 24 hours, capped at [`Duration::MAX`].
    pub const fn from_days(days: u64) -> Duration {
        Self::from_secs(days.saturating_mul(86_400))
    }

    /// The length in whole seconds.
    pub const fn as_secs(self) -> u64 {
        self.secs
    }

    /// Whether this is `0s`.
    pub const fn is_zero(self) -> bool {
        self.secs == 0
    }

    /// The same length as a `std::time::Duration`, for sleeps and timeouts.
    pub const fn as_std(self) -> std::time::Duration {
        std::time::Duration::from_secs(self.secs)
    }

    /// The same length as a `chrono::TimeDelta`, for arithmetic on timestamps.
    pub fn to_chrono(self) -> chrono::TimeDelta {
        // `MAX` is far below `i64::MAX` seconds, so the conversion cannot fail.
        chrono::TimeDelta::seconds(i64::try_from(self.secs).unwrap_or(i64::MAX))
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.as_std()
    }
}

/// Why a text is not a duration. Each message quotes what was given and shows
/// what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseDurationError {
    /// The text is not numbers followed by the unit letters `d`, `h`, `m`, `s`.
    #[error("{given:?} is not a duration (use e.g. 30d, 12h, 15m, 30s)")]
    Malformed {
        /// The text as given, shortened if it was very long.
        given: String,
    },
    /// Units repeat or go from smaller to larger, as in `30m1h`, which is
    /// more likely a typo than a deliberate spelling.
    #[error(
        "{given:?} is not a duration: combine units from largest to smallest, each once (e.g. 1h30m)"
    )]
    UnitOrder {
        /// The text as given, shortened if it was very long.
        given: String,
    },
    /// The duration is longer than [`Duration::MAX`].
    #[error("{given:?} is too long a duration (at most 36500d)")]
    TooLong {
        /// The text as given, shortened if it was very long.
        given: String,
    },
}

/// Shortens text quoted in an error so a pasted blob cannot flood a log line.
fn quoted(given: &str) -> String {
    const LIMIT: usize = 40;
    if given.chars().count() <= LIMIT {
        given.to_string()
    } else {
        let mut s: String = given.chars().take(LIMIT).collect();
        s.push('…');
        s
    }
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let malformed = || ParseDurationError::Malformed {
            given: quoted(text),
        };
        if text.is_empty() {
            return Err(malformed());
        }
        let mut total: u64 = 0;
        // Index into `UNITS` of the next unit that may still appear; units
        // must strictly descend, so each one can be used at most once.
        let mut next_unit = 0;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(malformed());
            }
            let (number, tail) = rest.split_at(digits);
            let mut chars = tail.chars();
            let unit = chars.next().ok_or_else(malformed)?;
            rest = chars.as_str();
            let position = UNITS
                .iter()
                .position(|(letter, _)| *letter == unit)
                .ok_or_else(malformed)?;
            if position < next_unit {
                return Err(ParseDurationError::UnitOrder {
                    given: quoted(text),
                });
            }
            next_unit = position + 1;
            let too_long = || ParseDurationError::TooLong {
                given: quoted(text),
            };
            // A number too large for u64 is certainly too long a duration.
            let value: u64 = number.parse().map_err(|_| too_long())?;
            total = value
                .checked_mul(UNITS[position].1)
                .and_then(|secs| total.checked_add(secs))
                .filter(|secs| *secs <= Duration::MAX.secs)
                .ok_or_else(too_long)?;
        }
        Ok(Duration { secs: total })
    }
}

impl fmt::Display for Duration {
    /// Writes the canonical form: the largest units first, zero parts left
    /// out (`1d12h`, `90d`, `1h30m`), and `0s` for the empty duration.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.secs == 0 {
            return f.write_str("0s");
        }
        let mut rest = self.secs;
        for (letter, size) in UNITS {
            let count = rest / size;
            if count > 0 {
                write!(f, "{count}{letter}")?;
                rest %= size;
            }
        }
        Ok(())
    }
}

impl serde::Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 30d, 12h, 15m or 30s")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Duration, ParseDurationError> {
        text.parse()
    }

    #[test]
    fn parses_each_single_unit() {
        assert_eq!(parse("90d").unwrap(), Duration::from_days(90));
        assert_eq!(parse("12h").unwrap(), Duration::from_hours(12));
        assert_eq!(parse("15m").unwrap(), Duration::from_mins(15));
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn parses_combined_units_from_largest_to_smallest() {
        assert_eq!(parse("1h30m").unwrap().as_secs(), 5_400);
        assert_eq!(parse("1d2h3m4s").unwrap().as_secs(), 93_784);
        assert_eq!(parse("2d30s").unwrap().as_secs(), 172_830);
    }

    #[test]
    fn rejects_units_out_of_order_or_repeated() {
        for text in ["30m1h", "1h1h", "5s1d"] {
            let err = parse(text).unwrap_err();
            assert!(
                matches!(err, ParseDurationError::UnitOrder { .. }),
                "{text}: {err:?}"
            );
        }
    }

    #[test]
    fn rejects_malformed_text_quoting_it_and_showing_the_allowed_forms() {
        for text in [
            "", "30", "30x", "d", "h30", "1.5h", "-1d", "+1d", " 1d", "1d ", "1 d", "1D", "1d2",
            "1w", "１d",
        ] {
            let err = parse(text).unwrap_err();
            assert!(
                matches!(err, ParseDurationError::Malformed { .. }),
                "{text:?}: {err:?}"
            );
        }
        assert_eq!(
            parse("30x").unwrap_err().to_string(),
            r#""30x" is not a duration (use e.g. 30d, 12h, 15m, 30s)"#
        );
    }

    #[test]
    fn rejects_durations_longer_than_the_cap_without_overflowing() {
        assert_eq!(parse("36500d").unwrap(), Duration::MAX);
        for text in [
            "36500d1s",
            "36501d",
            "99999999999999999999999s",
            "18446744073709551615d",
        ] {
            assert!(
                matches!(parse(text), Err(ParseDurationError::TooLong { .. })),
                "{text}"
            );
        }
    }

    #[test]
    fn error_messages_shorten_very_long_input() {
        let long = "x".repeat(10_000);
        let msg = parse(&long).unwrap_err().to_string();
        assert!(msg.len() < 120, "{msg}");
    }

    #[test]
    fn prints_the_canonical_combined_form() {
        assert_eq!(Duration::ZERO.to_string(), "0s");
        assert_eq!(Duration::from_days(90).to_string(), "90d");
        assert_eq!(Duration::from_secs(5_400).to_string(), "1h30m");
        assert_eq!(Duration::from_hours(36).to_string(), "1d12h");
        assert_eq!(Duration::from_secs(93_784).to_string(), "1d2h3m4s");
    }

    #[test]
    fn printed_form_parses_back_to_the_same_duration() {
        for secs in [
            0, 1, 59, 60, 61, 3_599, 3_600, 86_399, 86_400, 93_784, 7_776_000,
        ] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse(&d.to_string()).unwrap(), d);
        }
    }

    #[test]
    fn constructors_saturate_at_the_cap() {
        assert_eq!(Duration::from_days(u64::MAX), Duration::MAX);
        assert_eq!(Duration::from_secs(u64::MAX), Duration::MAX);
    }

    #[test]
    fn converts_to_std_and_chrono() {
        let d = Duration::from_mins(15);
        assert_eq!(d.as_std(), std::time::Duration::from_secs(900));
        assert_eq!(std::time::Duration::from(d).as_secs(), 900);
        assert_eq!(d.to_chrono(), chrono::TimeDelta::minutes(15));
        assert_eq!(Duration::MAX.to_chrono(), chrono::TimeDelta::days(36_500));
    }

    #[test]
    fn serde_uses_the_string_form() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Holder {
            d: Duration,
        }
        let h: Holder = toml::from_str(r#"d = "1h30m""#).unwrap();
        assert_eq!(h.d.as_secs(), 5_400);
        assert_eq!(toml::to_string(&h).unwrap().trim(), r#"d = "1h30m""#);
        let err = toml::from_str::<Holder>(r#"d = "30x""#).unwrap_err();
        assert!(err.message().contains("is not a duration"), "{err}");
        let err = toml::from_str::<Holder>("d = 30").unwrap_err();
        assert!(err.message().contains("a duration such as 30d"), "{err}");
    }
}
