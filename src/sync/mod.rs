//! Sync through Redis: every application instance learns about a key change.
//!
//! The store writes an outbox row and bumps the keyring epoch in the same
//! transaction as every key change (`store::keys::announce`). This module
//! carries those changes to Redis and back out to applications:
//!
//! - `publisher`: drains the outbox in order to Redis (snapshot, epoch,
//!   publish times, events), from the worker (`run_publisher`) and at the end
//!   of every one-shot command that changed keys (`publish_pending`).
//! - `cache`: [`KeyringCache`], the subscriber library for Rust apps: the
//!   keyring unwrapped in memory, kept current by pub/sub plus polling.
//! - `lag`: the measured sync lag from the subscribers' acknowledgements.
//! - `redis_conn`: one connection type over a single server and a Cluster.
//!
//! The Redis names are a contract with apps in any language (CLI.md, "Redis
//! names"); they live here as constants. Nothing published holds key
//! material except inside the root-wrapped snapshot.

pub mod cache;
pub mod lag;
pub mod publisher;
pub mod redis_conn;

pub use cache::{CacheOptions, CachedKey, Keyring, KeyringCache, SigningKey};
pub use lag::{InstanceLag, SyncLag, VerifyCounts, sync_lag, verification_counts};
pub use publisher::{publish_pending, run_publisher, wake_publisher};
pub use redis_conn::{RedisConn, RedisTarget};

use serde::{Deserialize, Serialize};

/// The pub/sub channel events are published on.
pub const CHANNEL: &str = "keywarden:events";
/// String key: the newest published keyring epoch (never goes down).
pub const EPOCH_KEY: &str = "keywarden:epoch";
/// String key: the current keyring snapshot (the `keyring export` document).
pub const KEYRING_KEY: &str = "keywarden:keyring";
/// Hash: instance id -> JSON `{epoch, at, seen}` (the epoch an instance holds).
pub const ACKS_KEY: &str = "keywarden:acks";
/// Hash: epoch -> unix milliseconds when it was first published.
pub const PUBLISHED_KEY: &str = "keywarden:published";
/// Prefix of the per-minute verification counter hashes
/// (`keywarden:verify:{unix_minute}`, fields `ok`, `fail`, `fail:{reason}`).
pub const VERIFY_PREFIX: &str = "keywarden:verify:";
/// How long a per-minute verification counter hash is kept.
pub const VERIFY_TTL_SECS: i64 = 2 * 24 * 3600;
/// How many epochs of publish times `keywarden:published` keeps.
pub const PUBLISHED_KEEP: i64 = 1000;

/// One event on [`CHANNEL`]. Carries no key material.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub epoch: i64,
    /// `activate`, `demote`, `retire`, `revoke`, `destroy`, `rewrap`, ...
    pub action: String,
    pub kid: String,
    pub purpose: String,
    /// RFC 3339 with milliseconds.
    pub published_at: String,
}

/// One acknowledgement in [`ACKS_KEY`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The keyring epoch the instance holds.
    pub epoch: i64,
    /// When the instance first held that epoch (RFC 3339, milliseconds).
    pub at: String,
    /// When the instance last checked in (RFC 3339, milliseconds); absent in
    /// acks written by minimal clients, which then count as seen at `at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<String>,
}

/// A time as the sync protocol writes it: RFC 3339, UTC, milliseconds.
pub fn rfc3339_ms(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The Lua script that sets a string key holding an integer only if the new
/// value is greater: the epoch never goes down, whoever publishes.
pub const SET_IF_GREATER: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local new = tonumber(ARGV[1])
if new > cur then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
"#;

/// The Lua script that replaces the snapshot unless the stored one has a
/// greater epoch: a slow publisher never puts an older keyring back.
pub const SET_SNAPSHOT_IF_NOT_OLDER: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, doc = pcall(cjson.decode, cur)
  if ok and type(doc) == 'table' and tonumber(doc['epoch']) and tonumber(doc['epoch']) > tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_acks_have_the_contract_fields() {
        let e = Event {
            epoch: 3,
            action: "activate".into(),
            kid: "dat_x".into(),
            purpose: "data".into(),
            published_at: "2026-01-01T00:00:00.000Z".into(),
        };
        let v = serde_json::to_value(&e).unwrap();
        for f in ["epoch", "action", "kid", "purpose", "published_at"] {
            assert!(v.get(f).is_some(), "{f}");
        }
        let a: Ack = serde_json::from_str(r#"{"epoch": 4, "at": "2026-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!(a.epoch, 4);
        assert!(a.seen.is_none());
    }
}
