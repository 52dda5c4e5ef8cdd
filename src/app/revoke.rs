//! The emergency response (`keywarden revoke KID --reason TEXT`): from
//! "this key leaked" to "nothing depends on it any more", in order:
//!
//! 1. mark the key revoked (from any state), with the reason; the audit row
//!    carries the actor;
//! 2. if it was the active key of its purpose, activate a fresh key in the
//!    SAME transaction (so no crash leaves a purpose without an active key);
//! 3. data key: re-encrypt every row it protects (the revoked key decrypts
//!    only), then a census proving zero rows remain under it;
//! 4. signing key: nothing more than 1 (verification maps `revoked` to the
//!    typed `key_not_usable` error; the JWKS publishes only active/retiring);
//! 5. publish the outbox now and wait, bounded, for every live instance to
//!    acknowledge the new epoch;
//! 6. raise the critical `key_revoked` alert on every channel (once);
//! 7. the report.
//!
//! Every step is idempotent: running the command again on a revoked key
//! skips what is done (the key is revoked, an active key exists, the census
//! is zero, the alert's audit row exists) and finishes the rest.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::App;
use super::keyring::generated;
use crate::alerts::channels::DeliveryOutcome;
use crate::audit::{self, Event, action, events};
use crate::crypto;
use crate::keyring::{KeyState, Purpose};
use crate::reencrypt::{self, CensusEntry, Progress};
use crate::store::keys as keystore;

/// Test-only: exit the process (as a kill would) once this many rows were
/// re-encrypted, or with `0` right after the revocation commit.
pub const TEST_EXIT_AFTER_ROWS_ENV: &str = "KEYWARDEN_TEST_REVOKE_EXIT_AFTER_ROWS";

/// What to revoke and how.
#[derive(Clone, Debug)]
pub struct RevokeOptions {
    pub kid: String,
    pub reason: String,
    pub dry_run: bool,
    /// How long to wait for instances to acknowledge the new epoch.
    pub wait: Duration,
    /// Live re-encryption counters (for a progress display).
    pub progress: Option<Arc<Progress>>,
}

/// One step as reported.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    /// `revoke`, `rotate`, `reencrypt`, `tokens`, `publish`, `alert`.
    pub step: &'static str,
    /// `done`, `already_done`, `skipped` (does not apply), `would_do` (dry
    /// run), `incomplete`.
    pub status: &'static str,
    pub seconds: f64,
    pub detail: String,
}

/// The `revoke --json` document.
#[derive(Clone, Debug, Serialize)]
pub struct RevokeReport {
    pub kid: String,
    pub purpose: Purpose,
    pub algorithm: String,
    /// The state before this command (`revoked` on a re-run).
    pub previous_state: KeyState,
    pub reason: String,
    /// The actor as the audit trail records it.
    pub actor: String,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The fresh active key made by this command (None when none was needed).
    pub new_kid: Option<String>,
    /// The active key of the purpose after the command.
    pub active_kid: Option<String>,
    pub epoch: i64,
    pub rows_moved: u64,
    /// Rows still under the revoked key (census after the re-encryption; in
    /// a dry run, before). None for keys that protect no rows.
    pub rows_remaining: Option<u64>,
    pub census: Vec<CensusEntry>,
    pub redis_configured: bool,
    pub instances_acknowledged: Vec<String>,
    pub instances_missing: Vec<String>,
    /// Instances not seen for a while (not waited for).
    pub instances_stale: Vec<String>,
    pub alert_deliveries: Vec<DeliveryOutcome>,
    pub steps: Vec<StepReport>,
    pub follow_ups: Vec<String>,
    pub dry_run: bool,
    /// Every step finished: zero rows remain and every live instance has
    /// the new epoch.
    pub complete: bool,
}

fn follow_ups(purpose: Purpose) -> Vec<String> {
    let mut out = Vec::new();
    match purpose {
        Purpose::Signing | Purpose::TokenEncryption => out.push(
            "notify users to re-authenticate: every token made with this key is now refused".into(),
        ),
        Purpose::Data => out.push(
            "treat every secret that was under this key as disclosed: rotate the secrets themselves where the leak may have included the ciphertexts".into(),
        ),
        Purpose::Temp => {}
    }
    out.push(
        "root-cause analysis: how did the key leak, and since when (see `keywarden audit export`)"
            .into(),
    );
    out.push("scan for other leaks: repositories, logs, backups and hosts that held the keyring or the root key".into());
    out.push("if the root key itself may have leaked: `keywarden keys rotate root`".into());
    out
}

impl App {
    /// Runs the emergency flow; `on_step` sees each step as it finishes.
    pub async fn revoke_key(
        &self,
        opts: &RevokeOptions,
        now: DateTime<Utc>,
        on_step: &(dyn Fn(&StepReport) + Sync),
    ) -> anyhow::Result<RevokeReport> {
        let key = self.key_by_kid(&opts.kid).await?;
        let purpose = key.meta.purpose;
        let kid = key.meta.kid.clone();
        let previous_state = key.meta.state;
        if opts.reason.trim().is_empty() {
            return Err(crate::error::UsageError(
                "--reason must say why the key is revoked (it goes to the audit trail and the alert)"
                    .into(),
            )
            .into());
        }
        let actor = self
            .audit_keys()
            .await
            .map(|k| audit::Actor::operator_from_env().render(k))
            .unwrap_or_else(|_| "cli:unknown".into());
        let mut steps: Vec<StepReport> = Vec::new();
        let mut step = |s: StepReport| {
            on_step(&s);
            steps.push(s);
        };

        // Steps 1 and 2: one transaction.
        let t = Instant::now();
        let others = self.store.list_keys(Some(purpose)).await?;
        let other_active = others
            .iter()
            .find(|k| k.meta.kid != kid && k.meta.state == KeyState::Active)
            .map(|k| k.meta.kid.clone());
        let needs_key = other_active.is_none();
        let mut new_kid = None;
        let mut epoch = self.store.epoch().await?;
        if opts.dry_run {
            step(StepReport {
                step: "revoke",
                status: if previous_state == KeyState::Revoked {
                    "already_done"
                } else {
                    "would_do"
                },
                seconds: 0.0,
                detail: format!("{kid} ({purpose}) is {previous_state}"),
            });
            step(StepReport {
                step: "rotate",
                status: if needs_key { "would_do" } else { "skipped" },
                seconds: 0.0,
                detail: if needs_key {
                    format!("a fresh {purpose} key would become active")
                } else {
                    format!(
                        "{} stays the active {purpose} key",
                        other_active.clone().unwrap_or_default()
                    )
                },
            });
        } else {
            let material = if needs_key {
                Some(crypto::generate_material(
                    purpose,
                    self.algorithm_for(purpose),
                )?)
            } else {
                None
            };
            let mut tx = self.store.begin().await?;
            let keys = keystore::keys_of_purpose(&mut tx, purpose).await?;
            let cur = keys
                .iter()
                .find(|k| k.meta.kid == kid)
                .context("the key vanished")?;
            let mut outbox: Vec<(&str, &str, Purpose)> = Vec::new();
            let mut audit_events = Vec::new();
            if cur.meta.state != KeyState::Revoked {
                let changed = keystore::set_state(
                    &mut tx,
                    &kid,
                    cur.meta.state,
                    KeyState::Revoked,
                    now,
                    None,
                    Some(&opts.reason),
                )
                .await?;
                anyhow::ensure!(changed, "key {kid} changed under us: run the command again");
                outbox.push(("revoke", &kid, purpose));
                audit_events.push(events::key_revoked(
                    &kid,
                    purpose.as_str(),
                    cur.meta.state.as_str(),
                    &opts.reason,
                ));
            }
            let active_now = keys
                .iter()
                .any(|k| k.meta.kid != kid && k.meta.state == KeyState::Active);
            let new = match (&material, active_now) {
                (Some(m), false) => {
                    let version = keystore::next_version(&mut tx, purpose).await?;
                    let new = self.new_key(purpose, version, m, now);
                    keystore::insert_key(&mut tx, &new).await?;
                    Some(new)
                }
                _ => None,
            };
            if let Some(new) = &new {
                outbox.push(("activate", &new.meta.kid, purpose));
                audit_events.push(generated(&new.meta));
            }
            if !outbox.is_empty() {
                epoch = keystore::announce(&mut tx, &outbox, now).await?;
                if let Some(new) = &new {
                    audit_events.push(
                        Event::new(action::KEY_ACTIVATED)
                            .target(new.meta.kid.as_str())
                            .detail("purpose", purpose.as_str())
                            .detail("version", new.meta.version)
                            .detail("replaces", kid.as_str())
                            .detail("emergency", true)
                            .detail("epoch", epoch),
                    );
                }
                audit::commit(self, tx, audit_events, now)
                    .await
                    .with_context(|| format!("committing the revocation of {kid}"))?;
            }
            new_kid = new.map(|n| n.meta.kid);
            let secs = t.elapsed().as_secs_f64();
            step(StepReport {
                step: "revoke",
                status: if previous_state == KeyState::Revoked {
                    "already_done"
                } else {
                    "done"
                },
                seconds: secs,
                detail: format!(
                    "{kid} ({purpose}) is revoked (was {previous_state}): nothing signs, encrypts, decrypts or verifies with it"
                ),
            });
            step(StepReport {
                step: "rotate",
                status: if new_kid.is_some() { "done" } else { "skipped" },
                seconds: secs,
                detail: match (&new_kid, &other_active) {
                    (Some(n), _) => format!("{n} is the new active {purpose} key (epoch {epoch})"),
                    (None, Some(a)) => format!("{a} stays the active {purpose} key"),
                    (None, None) => format!("an active {purpose} key already exists"),
                },
            });
            if let Ok(v) = std::env::var(TEST_EXIT_AFTER_ROWS_ENV)
                && v == "0"
            {
                std::process::exit(137);
            }
        }

        // Step 3: the rows a data key protects.
        let mut rows_moved = 0;
        let mut rows_remaining = None;
        let mut census = Vec::new();
        if purpose == Purpose::Data {
            let t = Instant::now();
            // The named key decrypts only once revoked; before (dry run on a
            // live key) the ordinary census counts it.
            let decrypt_with = if opts.dry_run && previous_state != KeyState::Revoked {
                None
            } else {
                Some(kid.as_str())
            };
            let before = reencrypt::census::census_with(self, decrypt_with).await?;
            let remaining = before.rows_under(&kid);
            if opts.dry_run {
                rows_remaining = Some(remaining);
                census = before.lines();
                step(StepReport {
                    step: "reencrypt",
                    status: if remaining == 0 {
                        "already_done"
                    } else {
                        "would_do"
                    },
                    seconds: t.elapsed().as_secs_f64(),
                    detail: format!("{remaining} rows are under {kid}"),
                });
            } else if remaining == 0 {
                rows_remaining = Some(0);
                census = before.lines();
                step(StepReport {
                    step: "reencrypt",
                    status: "already_done",
                    seconds: t.elapsed().as_secs_f64(),
                    detail: format!("census: 0 rows under {kid}"),
                });
            } else {
                let progress = opts.progress.clone().unwrap_or_default();
                let killer = test_exit_watch(&progress);
                let ropts = reencrypt::Options {
                    retry_quarantined: true,
                    progress: Some(progress),
                    decrypt_with_revoked: Some(kid.clone()),
                    ..reencrypt::Options::default()
                };
                let summary = reencrypt::run_reencrypt(self, &ropts, now).await;
                if let Some(k) = killer {
                    k.abort();
                }
                let summary = summary.context("re-encrypting the rows under the revoked key")?;
                let after = reencrypt::census::census_with(self, Some(&kid)).await?;
                let left = after.rows_under(&kid);
                rows_moved = summary.rows_reencrypted;
                rows_remaining = Some(left);
                census = after.lines();
                let tx = self.store.begin().await?;
                let ev = Event::new(action::REVOKE_STEP)
                    .target(kid.as_str())
                    .outcome(if left == 0 { "ok" } else { "failed" })
                    .detail("step", "reencrypt")
                    .detail("rows_moved", rows_moved)
                    .detail("rows_remaining", left)
                    .detail("to_kid", summary.active_kid.as_str())
                    .detail("elapsed_ms", t.elapsed().as_millis() as i64);
                audit::commit(self, tx, vec![ev], now).await?;
                step(StepReport {
                    step: "reencrypt",
                    status: if left == 0 { "done" } else { "incomplete" },
                    seconds: t.elapsed().as_secs_f64(),
                    detail: format!(
                        "moved {rows_moved} rows to {}; census: {left} rows under {kid}",
                        summary.active_kid
                    ),
                });
            }
        } else {
            step(StepReport {
                step: "reencrypt",
                status: "skipped",
                seconds: 0.0,
                detail: format!("a {purpose} key protects no stored rows"),
            });
        }

        // Step 4: tokens.
        if matches!(purpose, Purpose::Signing | Purpose::TokenEncryption) {
            let state = if opts.dry_run {
                previous_state
            } else {
                self.key_by_kid(&kid).await?.meta.state
            };
            step(StepReport {
                step: "tokens",
                status: if opts.dry_run && state != KeyState::Revoked {
                    "would_do"
                } else {
                    "done"
                },
                seconds: 0.0,
                detail: format!(
                    "tokens made with {kid} fail with key_not_usable (revoked); the JWKS no longer lists it"
                ),
            });
        }

        // Step 5: publish and wait for acknowledgements.
        let redis_configured = self.config.redis.url().is_some();
        let mut acknowledged = Vec::new();
        let mut missing = Vec::new();
        let mut stale = Vec::new();
        if opts.dry_run {
            step(StepReport {
                step: "publish",
                status: if redis_configured {
                    "would_do"
                } else {
                    "skipped"
                },
                seconds: 0.0,
                detail: if redis_configured {
                    format!(
                        "would publish and wait up to {:?} for acknowledgements",
                        opts.wait
                    )
                } else {
                    "redis.url is not set: nothing to publish".into()
                },
            });
        } else if !redis_configured {
            step(StepReport {
                step: "publish",
                status: "skipped",
                seconds: 0.0,
                detail: "redis.url is not set: nothing to publish".into(),
            });
        } else {
            let t = Instant::now();
            let published = crate::sync::publisher::publish_pending(self).await;
            let target_epoch = self.store.epoch().await?;
            let deadline = Instant::now() + opts.wait;
            let mut error = published.as_ref().err().map(|e| format!("{e:#}"));
            loop {
                let lag = crate::sync::lag::sync_lag_with(
                    self,
                    Utc::now(),
                    crate::sync::lag::DEFAULT_LAG_THRESHOLD,
                )
                .await?;
                if let Some(e) = lag.error {
                    error = Some(e);
                }
                acknowledged.clear();
                missing.clear();
                stale.clear();
                for i in &lag.instances {
                    if i.stale {
                        stale.push(i.instance.clone());
                    } else if i.epoch >= target_epoch {
                        acknowledged.push(i.instance.clone());
                    } else {
                        missing.push(i.instance.clone());
                    }
                }
                let published_ok = lag.redis_epoch.is_some_and(|e| e >= target_epoch);
                if (published_ok && missing.is_empty()) || Instant::now() >= deadline {
                    if !published_ok && error.is_none() {
                        error = Some(format!(
                            "Redis still publishes epoch {:?}, not {target_epoch}",
                            lag.redis_epoch
                        ));
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let tx = self.store.begin().await?;
            let ev = Event::new(action::REVOKE_STEP)
                .target(kid.as_str())
                .outcome(if error.is_none() && missing.is_empty() {
                    "ok"
                } else {
                    "failed"
                })
                .detail("step", "publish")
                .detail("epoch", target_epoch)
                .detail("acknowledged", acknowledged.len() as i64)
                .detail("missing", missing.clone());
            audit::commit(self, tx, vec![ev], now).await?;
            step(StepReport {
                step: "publish",
                status: if error.is_none() && missing.is_empty() {
                    "done"
                } else {
                    "incomplete"
                },
                seconds: t.elapsed().as_secs_f64(),
                detail: match &error {
                    Some(e) => format!("epoch {target_epoch}: {e}"),
                    None => format!(
                        "epoch {target_epoch} published; {} instances acknowledged, {} missing",
                        acknowledged.len(),
                        missing.len()
                    ),
                },
            });
        }
        epoch = epoch.max(self.store.epoch().await?);

        // Step 6: the critical alert, once.
        let mut deliveries = Vec::new();
        if opts.dry_run {
            step(StepReport {
                step: "alert",
                status: "would_do",
                seconds: 0.0,
                detail: "would raise the critical key_revoked alert on every channel".into(),
            });
        } else if self.revoke_alerted(&kid).await? {
            step(StepReport {
                step: "alert",
                status: "already_done",
                seconds: 0.0,
                detail: "the key_revoked alert was raised by an earlier run".into(),
            });
        } else {
            let t = Instant::now();
            let event = crate::alerts::rules::Event::KeyRevoked {
                kid: kid.clone(),
                reason: opts.reason.clone(),
            };
            let pending = crate::alerts::raise_event(self, &event, now).await?;
            deliveries = pending.wait().await;
            let delivered = deliveries.iter().filter(|d| d.delivered).count();
            let tx = self.store.begin().await?;
            let ev = Event::new(action::REVOKE_ALERTED)
                .target(kid.as_str())
                .detail("channels", deliveries.len() as i64)
                .detail("delivered", delivered as i64);
            audit::commit(self, tx, vec![ev], now).await?;
            step(StepReport {
                step: "alert",
                status: "done",
                seconds: t.elapsed().as_secs_f64(),
                detail: format!(
                    "critical key_revoked alert: {delivered} of {} channels delivered",
                    deliveries.len()
                ),
            });
        }

        let after = self.key_by_kid(&kid).await?;
        let active_kid = self
            .store
            .list_keys(Some(purpose))
            .await?
            .into_iter()
            .find(|k| k.meta.state == KeyState::Active)
            .map(|k| k.meta.kid);
        let complete = !opts.dry_run
            && after.meta.state == KeyState::Revoked
            && active_kid.is_some()
            && rows_remaining.unwrap_or(0) == 0
            && missing.is_empty()
            && steps.iter().all(|s| s.status != "incomplete");
        Ok(RevokeReport {
            kid,
            purpose,
            algorithm: key.meta.algorithm.as_str().into(),
            previous_state,
            reason: after.revoked_reason.clone().unwrap_or(opts.reason.clone()),
            actor,
            revoked_at: after.meta.revoked_at,
            new_kid,
            active_kid,
            epoch,
            rows_moved,
            rows_remaining,
            census,
            redis_configured,
            instances_acknowledged: acknowledged,
            instances_missing: missing,
            instances_stale: stale,
            alert_deliveries: deliveries,
            steps,
            follow_ups: follow_ups(purpose),
            dry_run: opts.dry_run,
            complete,
        })
    }

    /// Whether an earlier run raised the alert for `kid`.
    async fn revoke_alerted(&self, kid: &str) -> anyhow::Result<bool> {
        use sqlx::Row;
        let row = sqlx::query("SELECT COUNT(*) FROM audit_log WHERE action = $1 AND target = $2")
            .bind(action::REVOKE_ALERTED)
            .bind(kid)
            .fetch_one(self.store.pool())
            .await
            .context("reading the audit log")?;
        Ok(row.try_get::<i64, _>(0)? > 0)
    }
}

/// Test-only: a task that exits the process once the re-encryption moved
/// the number of rows in [`TEST_EXIT_AFTER_ROWS_ENV`].
fn test_exit_watch(progress: &Arc<Progress>) -> Option<tokio::task::JoinHandle<()>> {
    let n: u64 = std::env::var(TEST_EXIT_AFTER_ROWS_ENV).ok()?.parse().ok()?;
    if n == 0 {
        return None;
    }
    let progress = progress.clone();
    Some(tokio::spawn(async move {
        loop {
            if progress.reencrypted.load(Ordering::Relaxed) >= n {
                std::process::exit(137);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }))
}
