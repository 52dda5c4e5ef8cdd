//! The outbox publisher: carries key changes from the store to Redis.
//!
//! One drain, under the publisher lease, repeats until the outbox is empty:
//! read the unpublished events in id order, take a keyring snapshot, then
//! 1. replace `keywarden:keyring` with the snapshot (unless Redis holds a
//!    newer one),
//! 2. raise `keywarden:epoch` to the snapshot's epoch (never lowers it),
//! 3. record the publish time of each epoch in `keywarden:published`,
//! 4. `PUBLISH` each event on `keywarden:events`, in order,
//! 5. mark the events published in the store.
//!
//! The snapshot goes out before the events, so a subscriber that reacts to
//! an event always finds a snapshot at least that new. A crash after step 4
//! publishes the same events again (at-least-once); subscribers act on the
//! epoch, so a repeated event is harmless.
//!
//! Ordering with several publishers (workers and one-shot commands): the
//! lease (a compare-and-set row in `kw_meta`) lets one drain at a time, so
//! events go out in id order; the epoch and the snapshot are also written
//! with compare-and-set Lua scripts, so even a publisher that lost its lease
//! while stalled can never move them backwards.
//!
//! Redis being down never blocks or fails a key change: the change is
//! committed before any of this runs, and the events wait in the outbox.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Notify;

use super::redis_conn::{RedisConn, RedisTarget};
use super::{
    CHANNEL, EPOCH_KEY, Event, KEYRING_KEY, PUBLISHED_KEEP, PUBLISHED_KEY, SET_IF_GREATER,
    SET_SNAPSHOT_IF_NOT_OLDER, rfc3339_ms,
};
use crate::app::App;

/// How long a publisher lease lasts without renewal.
const LEASE_MS: i64 = 15_000;
/// How many events one pass of a drain reads.
const BATCH: i64 = 500;
/// How long a one-shot command waits for another publisher's lease.
const ONE_SHOT_LEASE_WAIT: Duration = Duration::from_secs(5);

static WAKE: Notify = Notify::const_new();

/// Wakes the worker's publisher now (after a key change made in the worker
/// process), instead of at its next poll.
pub fn wake_publisher() {
    WAKE.notify_one();
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Holds the publisher lease for one drain.
struct Lease<'a> {
    app: &'a App,
    holder: String,
}

impl<'a> Lease<'a> {
    /// Takes the lease, waiting up to `wait` for another holder.
    async fn acquire(app: &'a App, wait: Duration) -> anyhow::Result<Option<Lease<'a>>> {
        let holder = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let now = now_ms();
            if app
                .store
                .try_publisher_lease(&holder, now, now + LEASE_MS)
                .await?
            {
                return Ok(Some(Lease { app, holder }));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn renew(&self) -> anyhow::Result<()> {
        let now = now_ms();
        anyhow::ensure!(
            self.app
                .store
                .try_publisher_lease(&self.holder, now, now + LEASE_MS)
                .await?,
            "lost the publisher lease (a drain took longer than {LEASE_MS} ms)"
        );
        Ok(())
    }

    async fn release(self) -> anyhow::Result<()> {
        self.app.store.release_publisher_lease(&self.holder).await
    }
}

/// Publishes every waiting outbox event to Redis; returns how many went
/// out. `Ok(0)` when Redis is not configured, when the outbox is empty, or
/// when another publisher holds the lease past a short wait (it publishes
/// them). With nothing to publish it puts the snapshot back if Redis lost
/// it. An error means Redis (or the store) failed: the events stay in
/// the outbox for the next try.
///
/// Every one-shot command that changed keys calls this at its end (through
/// `publish_after_change`, which turns an error into a warning).
pub async fn publish_pending(app: &App) -> anyhow::Result<usize> {
    let Some(target) = RedisTarget::from_config(&app.config)? else {
        return Ok(0);
    };
    let mut conn = target.connect().await?;
    let n = drain(app, &mut conn, ONE_SHOT_LEASE_WAIT).await?;
    if n == 0 {
        repair(app, &mut conn).await?;
    }
    Ok(n)
}

/// The last step of a one-shot command that changed keys: publish, and on
/// failure warn (the events wait in the outbox) without failing the
/// command. Returns how many events went out.
pub async fn publish_after_change(app: &App) -> usize {
    if app.config.redis.url().is_none() {
        return 0;
    }
    match publish_pending(app).await {
        Ok(n) => {
            if n > 0 {
                tracing::info!(events = n, "published key changes to Redis");
            } else if let Ok(b) = app.store.outbox_backlog().await
                && b.events > 0
            {
                tracing::warn!(
                    outbox.events = b.events,
                    "another publisher holds the lease: its events wait in the outbox                      (the worker publishes them, or run `keywarden sync publish`)"
                );
            }
            n
        }
        Err(e) => {
            let waiting = app
                .store
                .outbox_backlog()
                .await
                .map(|b| b.events)
                .unwrap_or(-1);
            tracing::warn!(
                error = %format!("{e:#}"),
                outbox.events = waiting,
                "Redis is unreachable: the change is saved and its events wait in the outbox \
                 (the worker or the next command publishes them)"
            );
            0
        }
    }
}

/// One drain under the lease (see the module docs for the steps).
async fn drain(app: &App, conn: &mut RedisConn, lease_wait: Duration) -> anyhow::Result<usize> {
    let Some(lease) = Lease::acquire(app, lease_wait).await? else {
        tracing::debug!("another publisher holds the lease; it publishes the outbox");
        return Ok(0);
    };
    let result = drain_locked(app, conn, &lease).await;
    let released = lease.release().await;
    let n = result?;
    released?;
    Ok(n)
}

async fn drain_locked(app: &App, conn: &mut RedisConn, lease: &Lease<'_>) -> anyhow::Result<usize> {
    let mut total = 0;
    loop {
        let rows = app.store.outbox_unpublished(BATCH).await?;
        if rows.is_empty() {
            break;
        }
        lease.renew().await?;
        let snapshot = app.snapshot().await?;
        let now = chrono::Utc::now();
        let mut epochs: BTreeSet<i64> = rows.iter().map(|r| r.epoch).collect();
        epochs.insert(snapshot.epoch);
        put_snapshot(conn, &snapshot, &epochs, now).await?;
        let published_at = rfc3339_ms(now);
        for row in &rows {
            let event = Event {
                epoch: row.epoch,
                action: row.action.clone(),
                kid: row.kid.clone(),
                purpose: row.purpose.clone(),
                published_at: published_at.clone(),
            };
            let _: i64 = conn
                .query(
                    redis::cmd("PUBLISH")
                        .arg(CHANNEL)
                        .arg(serde_json::to_string(&event)?),
                )
                .await
                .context("publishing an event")?;
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        app.store.outbox_mark_published(&ids, now).await?;
        tracing::debug!(
            events = rows.len(),
            epoch = snapshot.epoch,
            "published outbox events"
        );
        total += rows.len();
    }
    Ok(total)
}

/// Writes the snapshot, the epoch and the publish times (steps 1-3).
async fn put_snapshot(
    conn: &mut RedisConn,
    snapshot: &crate::app::keyring::Snapshot,
    epochs: &BTreeSet<i64>,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
    let doc = serde_json::to_string(snapshot)?;
    let _: i64 = conn
        .query(
            redis::cmd("EVAL")
                .arg(SET_SNAPSHOT_IF_NOT_OLDER)
                .arg(1)
                .arg(KEYRING_KEY)
                .arg(doc)
                .arg(snapshot.epoch),
        )
        .await
        .context("storing the keyring snapshot in Redis")?;
    let _: i64 = conn
        .query(
            redis::cmd("EVAL")
                .arg(SET_IF_GREATER)
                .arg(1)
                .arg(EPOCH_KEY)
                .arg(snapshot.epoch),
        )
        .await
        .context("setting the keyring epoch in Redis")?;
    let ms = now.timestamp_millis();
    for epoch in epochs {
        // The first publish time counts: a repeated publish keeps it.
        let _: i64 = conn
            .query(redis::cmd("HSETNX").arg(PUBLISHED_KEY).arg(*epoch).arg(ms))
            .await
            .context("recording the publish time")?;
        if *epoch > PUBLISHED_KEEP {
            let _: i64 = conn
                .query(
                    redis::cmd("HDEL")
                        .arg(PUBLISHED_KEY)
                        .arg(*epoch - PUBLISHED_KEEP),
                )
                .await
                .context("trimming publish times")?;
        }
    }
    Ok(())
}

/// Puts the current snapshot back when Redis lost it (a restart without
/// persistence, a flush) or holds an older epoch than the store, with no
/// events waiting to do it. Returns whether it wrote.
async fn repair(app: &App, conn: &mut RedisConn) -> anyhow::Result<bool> {
    let store_epoch = app.store.epoch().await?;
    let redis_epoch: Option<i64> = conn.query(redis::cmd("GET").arg(EPOCH_KEY)).await?;
    let has_keyring: bool = conn.query(redis::cmd("EXISTS").arg(KEYRING_KEY)).await?;
    if has_keyring && redis_epoch.unwrap_or(0) >= store_epoch {
        return Ok(false);
    }
    let Some(lease) = Lease::acquire(app, Duration::ZERO).await? else {
        return Ok(false);
    };
    let result = async {
        let snapshot = app.snapshot().await?;
        let epochs = BTreeSet::from([snapshot.epoch]);
        put_snapshot(conn, &snapshot, &epochs, chrono::Utc::now()).await?;
        tracing::info!(
            epoch = snapshot.epoch,
            "Redis had no current keyring snapshot: published it again"
        );
        anyhow::Ok(true)
    }
    .await;
    lease.release().await?;
    result
}

/// The publisher task of `keywarden run`: drains the outbox whenever woken
/// ([`wake_publisher`]) and at least every `redis.poll_interval`, repairs a
/// Redis that lost the snapshot, and returns when `shutdown` completes.
/// Redis being down is logged once per outage (not every tick); events wait
/// and go out in order when it is back.
pub async fn run_publisher(app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let target = match RedisTarget::from_config(&app.config) {
        Ok(Some(t)) => t,
        Ok(None) => {
            tracing::info!(
                "redis.url is not set: the publisher is idle, events wait in the outbox"
            );
            shutdown.await;
            return;
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the publisher cannot start");
            shutdown.await;
            return;
        }
    };
    let interval = app
        .config
        .redis
        .poll_interval
        .as_std()
        .max(Duration::from_millis(50));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut conn: Option<RedisConn> = None;
    let mut down_since: Option<tokio::time::Instant> = None;
    loop {
        let outcome = async {
            if conn.is_none() {
                conn = Some(target.connect().await?);
            }
            let c = conn.as_mut().expect("connected above");
            let n = drain(&app, c, Duration::ZERO).await?;
            if n == 0 {
                repair(&app, c).await?;
            }
            anyhow::Ok(n)
        }
        .await;
        match outcome {
            Ok(_) => {
                if let Some(since) = down_since.take() {
                    tracing::info!(
                        down_ms = since.elapsed().as_millis() as u64,
                        "{} is reachable again; the outbox is drained",
                        target.describe()
                    );
                }
            }
            Err(e) => {
                conn = None;
                if down_since.is_none() {
                    down_since = Some(tokio::time::Instant::now());
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        "publishing to Redis failed: events wait in the outbox and go out when it is back"
                    );
                } else {
                    tracing::debug!(error = %format!("{e:#}"), "Redis still unreachable");
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = WAKE.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
