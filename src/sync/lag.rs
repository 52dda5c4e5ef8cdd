//! Measured sync lag: how long after a publish each application instance
//! held the new keyring epoch, and which instances are behind.
//!
//! Inputs are the publish time of every epoch (`keywarden:published`,
//! written by the publisher) and each instance's acknowledgement
//! (`keywarden:acks`: the epoch it holds, when it first held it, when it
//! last checked in). The arithmetic is pure ([`compute`]); [`sync_lag`]
//! reads Redis and the store around it.
//!
//! - An instance that holds the newest epoch has lag = (when it first held
//!   it) - (when that epoch was published).
//! - An instance that is behind has lag = now - (publish time of the first
//!   epoch it has not got): it grows until the instance catches up.
//! - An instance not seen for `stale_after` is reported as stale and left
//!   out of the figures (a stopped app should not page anyone).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::redis_conn::{RedisTarget, redact};
use super::{ACKS_KEY, Ack, EPOCH_KEY, PUBLISHED_KEY};
use crate::app::App;
use crate::store::outbox::Backlog;

/// The alert threshold of the seed: sync lag above 5 s is a warning.
pub const DEFAULT_LAG_THRESHOLD: Duration = Duration::from_secs(5);

/// One instance's acknowledgement and its lag.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstanceLag {
    pub instance: String,
    /// The epoch it holds.
    pub epoch: i64,
    /// When it first held that epoch.
    pub at: Option<DateTime<Utc>>,
    /// When it last checked in.
    pub seen: Option<DateTime<Utc>>,
    /// See the module docs; `None` when the publish time is unknown.
    pub lag_ms: Option<i64>,
    /// It holds an older epoch than Redis publishes.
    pub behind: bool,
    /// Not seen for a while: left out of `max_lag_ms` and `behind`.
    pub stale: bool,
}

/// The sync figures `status`, `sync status` and the alert rules use.
#[derive(Clone, Debug, Serialize)]
pub struct SyncLag {
    /// Whether `redis.url` is set.
    pub configured: bool,
    /// Where Redis is (passwords hidden).
    pub redis: Option<String>,
    pub reachable: bool,
    /// Why Redis could not be read, when it could not.
    pub error: Option<String>,
    /// The store's keyring epoch.
    pub store_epoch: i64,
    /// The epoch published in Redis.
    pub redis_epoch: Option<i64>,
    /// Events waiting in the outbox.
    pub outbox: Backlog,
    /// How long the oldest waiting event has waited.
    pub outbox_age_ms: Option<i64>,
    pub instances: Vec<InstanceLag>,
    /// Live instances that hold an older epoch than Redis.
    pub behind: Vec<String>,
    /// The largest lag among live instances.
    pub max_lag_ms: Option<i64>,
    pub threshold_ms: i64,
    /// `max_lag_ms` or the outbox age is above the threshold.
    pub over_threshold: bool,
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The lag of every instance (pure).
///
/// `acks`: instance id -> ack JSON as stored; `published`: epoch -> unix
/// ms; `latest`: the epoch Redis publishes.
pub fn compute(
    acks: &BTreeMap<String, String>,
    published: &BTreeMap<i64, i64>,
    latest: i64,
    now: DateTime<Utc>,
    stale_after: Duration,
) -> Vec<InstanceLag> {
    let now_ms = now.timestamp_millis();
    acks.iter()
        .map(|(instance, raw)| {
            let ack: Option<Ack> = serde_json::from_str(raw).ok();
            let epoch = ack.as_ref().map_or(0, |a| a.epoch);
            let at = ack.as_ref().and_then(|a| parse_time(&a.at));
            let seen = ack
                .as_ref()
                .and_then(|a| a.seen.as_deref().and_then(parse_time))
                .or(at);
            let stale =
                seen.is_none_or(|s| now_ms - s.timestamp_millis() > stale_after.as_millis() as i64);
            let behind = epoch < latest;
            let lag_ms = if behind {
                published
                    .range(epoch + 1..)
                    .next()
                    .map(|(_, &ms)| (now_ms - ms).max(0))
            } else {
                match (at, published.get(&epoch)) {
                    (Some(at), Some(&ms)) => Some((at.timestamp_millis() - ms).max(0)),
                    _ => None,
                }
            };
            InstanceLag {
                instance: instance.clone(),
                epoch,
                at,
                seen,
                lag_ms,
                behind,
                stale,
            }
        })
        .collect()
}

/// Reads the sync figures with the default threshold (5 s).
pub async fn sync_lag(app: &App) -> anyhow::Result<SyncLag> {
    sync_lag_with(app, Utc::now(), DEFAULT_LAG_THRESHOLD).await
}

/// Reads the sync figures at `now` against `threshold`. A Redis that
/// cannot be reached is reported in the result (`reachable: false`), not
/// as an error; only the store failing is an error.
pub async fn sync_lag_with(
    app: &App,
    now: DateTime<Utc>,
    threshold: Duration,
) -> anyhow::Result<SyncLag> {
    let store_epoch = app.store.epoch().await?;
    let outbox = app.store.outbox_backlog().await?;
    let outbox_age_ms = outbox
        .oldest_created_at
        .map(|t| (now - t).num_milliseconds().max(0));
    let threshold_ms = threshold.as_millis() as i64;
    let mut lag = SyncLag {
        configured: app.config.redis.url().is_some(),
        redis: app.config.redis.url().map(redact),
        reachable: false,
        error: None,
        store_epoch,
        redis_epoch: None,
        outbox_age_ms,
        outbox,
        instances: Vec::new(),
        behind: Vec::new(),
        max_lag_ms: None,
        threshold_ms,
        over_threshold: outbox_age_ms.is_some_and(|a| a > threshold_ms),
    };
    let target = match RedisTarget::from_config(&app.config) {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(lag),
        Err(e) => {
            lag.error = Some(format!("{e:#}"));
            return Ok(lag);
        }
    };
    lag.redis = Some(target.describe());
    let read = async {
        let mut conn = target.connect().await?;
        let epoch: Option<i64> = conn.query(redis::cmd("GET").arg(EPOCH_KEY)).await?;
        let acks: BTreeMap<String, String> =
            conn.query(redis::cmd("HGETALL").arg(ACKS_KEY)).await?;
        let published: BTreeMap<i64, i64> =
            conn.query(redis::cmd("HGETALL").arg(PUBLISHED_KEY)).await?;
        anyhow::Ok((epoch, acks, published))
    };
    match read.await {
        Err(e) => lag.error = Some(format!("{e:#}")),
        Ok((epoch, acks, published)) => {
            lag.reachable = true;
            lag.redis_epoch = epoch;
            let stale_after =
                (app.config.redis.poll_interval.as_std() * 10).max(Duration::from_secs(30));
            lag.instances = compute(&acks, &published, epoch.unwrap_or(0), now, stale_after);
            let live = || lag.instances.iter().filter(|i| !i.stale);
            lag.behind = live()
                .filter(|i| i.behind)
                .map(|i| i.instance.clone())
                .collect();
            lag.max_lag_ms = live().filter_map(|i| i.lag_ms).max();
            lag.over_threshold |= lag.max_lag_ms.is_some_and(|m| m > threshold_ms);
        }
    }
    Ok(lag)
}

/// Token verifications counted by the instances over a window of minutes
/// (from the `keywarden:verify:{minute}` hashes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyCounts {
    pub minutes: i64,
    pub ok: i64,
    pub fail: i64,
    /// Failures per reason.
    pub by_reason: BTreeMap<String, i64>,
}

impl VerifyCounts {
    /// The failure rate (0 when nothing was verified).
    pub fn failure_rate(&self) -> f64 {
        let total = self.ok + self.fail;
        if total == 0 {
            0.0
        } else {
            self.fail as f64 / total as f64
        }
    }
}

/// Sums the verification counters of the `minutes` whole minutes up to
/// and including the one of `now` (for the failure-rate alert rule).
/// Returns `Ok(None)` when Redis is not configured.
pub async fn verification_counts(
    app: &App,
    now: DateTime<Utc>,
    minutes: i64,
) -> anyhow::Result<Option<VerifyCounts>> {
    let Some(target) = RedisTarget::from_config(&app.config)? else {
        return Ok(None);
    };
    let mut conn = target.connect().await?;
    let this = now.timestamp().div_euclid(60);
    let mut counts = VerifyCounts {
        minutes,
        ..VerifyCounts::default()
    };
    for minute in (this - minutes + 1)..=this {
        let fields: BTreeMap<String, i64> = conn
            .query(redis::cmd("HGETALL").arg(format!("{}{minute}", super::VERIFY_PREFIX)))
            .await?;
        for (field, n) in fields {
            match field.as_str() {
                "ok" => counts.ok += n,
                "fail" => counts.fail += n,
                other => {
                    if let Some(reason) = other.strip_prefix("fail:") {
                        *counts.by_reason.entry(reason.to_string()).or_default() += n;
                    }
                }
            }
        }
    }
    Ok(Some(counts))
}

/// Counts one verification outcome in Redis for the alert rules (the same
/// per-minute hash `KeyringCache::record_verification` writes), for
/// one-shot commands such as `token verify`. Best effort: without Redis, or
/// when it is down, nothing is recorded and nothing fails.
pub async fn record_verification_now(app: &App, now: DateTime<Utc>, failure: Option<&str>) {
    let Ok(Some(target)) = RedisTarget::from_config(&app.config) else {
        return;
    };
    let Ok(mut conn) = target.connect().await else {
        return;
    };
    let key = format!("{}{}", super::VERIFY_PREFIX, now.timestamp().div_euclid(60));
    let mut fields = vec![if failure.is_some() { "fail" } else { "ok" }.to_string()];
    if let Some(reason) = failure {
        fields.push(format!("fail:{reason}"));
    }
    for field in fields {
        let _: redis::RedisResult<i64> = conn
            .query(redis::cmd("HINCRBY").arg(&key).arg(field).arg(1))
            .await;
    }
    let _: redis::RedisResult<i64> = conn
        .query(redis::cmd("EXPIRE").arg(&key).arg(super::VERIFY_TTL_SECS))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    fn ack(epoch: i64, at_ms: i64, seen_ms: i64) -> String {
        serde_json::to_string(&Ack {
            epoch,
            at: super::super::rfc3339_ms(t(at_ms)),
            seen: Some(super::super::rfc3339_ms(t(seen_ms))),
        })
        .unwrap()
    }

    #[test]
    fn lag_is_hold_time_minus_publish_time_or_time_behind() {
        let base = 1_800_000_000_000;
        let published = BTreeMap::from([(4, base), (5, base + 10_000)]);
        let acks = BTreeMap::from([
            ("a".to_string(), ack(5, base + 10_040, base + 19_000)),
            ("b".to_string(), ack(4, base + 30, base + 19_500)),
            ("gone".to_string(), ack(3, base - 900_000, base - 900_000)),
            ("junk".to_string(), "not json".to_string()),
        ]);
        let now = t(base + 20_000);
        let lags = compute(&acks, &published, 5, now, Duration::from_secs(30));
        let by = |id: &str| lags.iter().find(|l| l.instance == id).unwrap().clone();
        assert_eq!(by("a").lag_ms, Some(40));
        assert!(!by("a").behind && !by("a").stale);
        assert_eq!(by("b").lag_ms, Some(10_000));
        assert!(by("b").behind && !by("b").stale);
        assert!(by("gone").stale && by("gone").behind);
        assert!(by("junk").stale);
    }

    #[test]
    fn an_unknown_publish_time_gives_no_lag_figure() {
        let acks = BTreeMap::from([("a".to_string(), ack(7, 1000, 1000))]);
        let lags = compute(&acks, &BTreeMap::new(), 7, t(2000), Duration::from_secs(30));
        assert_eq!(lags[0].lag_ms, None);
        assert!(!lags[0].behind);
    }
}
