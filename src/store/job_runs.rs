//! The `job_runs` and `leases` tables: how one tick of one job runs once,
//! however many workers share the store.
//!
//! A run is *claimed* in one transaction that inserts its `job_runs` row
//! (unique on `(job, scheduled_at)` for scheduled ticks, so a second worker's
//! insert does nothing) and takes the job's lease (an upsert that succeeds
//! only when the lease is free or expired, and bumps its fencing token). A
//! worker whose lease expired (it died, or lost the database) is fenced out:
//! the next holder gets a larger token and marks the old run `failed`, and
//! the old worker's late `finish_run` no longer matches its row.
//!
//! Lease expiry is measured on the database's clock, so workers with skewed
//! clocks still agree on when a lease ran out.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Backend, Store, from_unix, to_unix};

/// What started a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A cron tick (from `run`, or caught up by `run --once`): one run per tick.
    Schedule,
    /// `job run NAME`: its own row, never a tick's.
    Manual,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Schedule => "schedule",
            Origin::Manual => "manual",
        }
    }
}

/// The outcome of a run, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Ok,
    Failed,
    Skipped,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Ok => "ok",
            RunStatus::Failed => "failed",
            RunStatus::Skipped => "skipped",
        }
    }

    fn parse(s: &str) -> RunStatus {
        match s {
            "running" => RunStatus::Running,
            "ok" => RunStatus::Ok,
            "skipped" => RunStatus::Skipped,
            _ => RunStatus::Failed,
        }
    }
}

/// A held lease: its name and the fencing token this holder got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub token: i64,
}

/// The lease name that keeps runs of one job from overlapping.
pub fn job_lease_name(job: &str) -> String {
    format!("job:{job}")
}

/// A run about to be claimed.
#[derive(Clone, Debug)]
pub struct NewRun<'a> {
    pub job: &'a str,
    pub origin: Origin,
    /// The cron tick (whole seconds), or the start of a manual run.
    pub scheduled_at: DateTime<Utc>,
    pub worker_id: &'a str,
    pub started_at: DateTime<Utc>,
}

/// The result of a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This worker runs it: the row is `running` and the lease is held.
    Claimed {
        run_id: i64,
        lease: Lease,
        /// Runs of this job left `running` by a worker whose lease ran out,
        /// now marked failed.
        reaped: u64,
    },
    /// Another worker claimed this tick first.
    AlreadyClaimed,
    /// A previous run of the job still holds the lease. For a scheduled tick
    /// the tick is recorded as `skipped` (`run_id`); a manual run records
    /// nothing and may try again.
    Busy {
        holder: String,
        expires_at: Option<DateTime<Utc>>,
        run_id: Option<i64>,
    },
}

/// One row of `job_runs`.
#[derive(Clone, Debug, Serialize)]
pub struct JobRun {
    pub id: i64,
    pub job: String,
    pub origin: String,
    pub scheduled_at: DateTime<Utc>,
    pub worker_id: String,
    pub status: RunStatus,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    pub error: Option<String>,
    pub actions: serde_json::Value,
    pub lease_token: Option<i64>,
}

/// One row of `leases`.
#[derive(Clone, Debug, Serialize)]
pub struct LeaseRow {
    pub name: String,
    pub holder: String,
    pub token: i64,
    /// Unix milliseconds on the database's clock.
    pub expires_at_ms: i64,
}

const RUN_COLUMNS: &str = "id, job, origin, scheduled_at, worker_id, status, started_at, \
     finished_at, duration_ms, error, actions, lease_token";

/// The error recorded on a run whose worker stopped before finishing it.
pub const ABANDONED: &str = "the run did not finish: its worker stopped or lost the database \
     before recording a result, and its lease expired";

fn row_to_run(row: &AnyRow) -> anyhow::Result<JobRun> {
    let actions: String = row.try_get("actions")?;
    let status: String = row.try_get("status")?;
    Ok(JobRun {
        id: row.try_get("id")?,
        job: row.try_get("job")?,
        origin: row.try_get("origin")?,
        scheduled_at: from_unix(row.try_get("scheduled_at")?),
        worker_id: row.try_get("worker_id")?,
        status: RunStatus::parse(&status),
        started_at: from_unix(row.try_get("started_at")?),
        finished_at: row.try_get::<Option<i64>, _>("finished_at")?.map(from_unix),
        duration_ms: row.try_get("duration_ms")?,
        error: row.try_get("error")?,
        actions: serde_json::from_str(&actions).unwrap_or(serde_json::Value::Null),
        lease_token: row.try_get("lease_token")?,
    })
}

impl Store {
    /// The database's clock in unix milliseconds, as an SQL expression.
    fn now_ms_sql(&self) -> &'static str {
        match self.backend() {
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        }
    }

    /// Takes the lease `name` for `ttl` if it is free or expired; returns the
    /// new fencing token, or `None` when someone else holds it.
    async fn take_lease(
        &self,
        conn: &mut sqlx::AnyConnection,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> anyhow::Result<Option<i64>> {
        let now = self.now_ms_sql();
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO leases (name, holder, token, expires_at) VALUES ($1, $2, 1, {now} + $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, token = leases.token + 1, \
             expires_at = excluded.expires_at WHERE leases.expires_at <= {now} RETURNING token"
        )))
        .bind(name)
        .bind(holder)
        .bind(ttl.as_millis() as i64)
        .fetch_optional(&mut *conn)
        .await
        .with_context(|| format!("taking the lease {name}"))?;
        row.map(|r| r.try_get::<i64, _>(0))
            .transpose()
            .map_err(Into::into)
    }

    /// Marks runs of `job` that hold an older lease token and are still
    /// `running` as failed: their worker lost the lease without finishing.
    async fn reap(
        conn: &mut sqlx::AnyConnection,
        job: &str,
        token: i64,
        at: DateTime<Utc>,
    ) -> anyhow::Result<u64> {
        let done = sqlx::query(
            "UPDATE job_runs SET status = 'failed', finished_at = $1, error = $2 \
             WHERE job = $3 AND status = 'running' AND lease_token < $4",
        )
        .bind(to_unix(at))
        .bind(ABANDONED)
        .bind(job)
        .bind(token)
        .execute(&mut *conn)
        .await
        .context("marking abandoned runs as failed")?;
        Ok(done.rows_affected())
    }

    /// Claims a run: see the module comment. One transaction, so a crash
    /// leaves either nothing or a `running` row whose lease will expire.
    pub async fn claim_run(
        &self,
        run: &NewRun<'_>,
        lease_ttl: std::time::Duration,
    ) -> anyhow::Result<Claim> {
        let lease_name = job_lease_name(run.job);
        let mut tx = self.begin().await?;
        let insert = "INSERT INTO job_runs (job, origin, scheduled_at, worker_id, started_at, \
             status, actions, lease_token) VALUES ($1, $2, $3, $4, $5, 'running', '[]', $6) \
             ON CONFLICT DO NOTHING RETURNING id";
        let claim = match run.origin {
            Origin::Schedule => {
                let row = sqlx::query(insert)
                    .bind(run.job)
                    .bind(run.origin.as_str())
                    .bind(to_unix(run.scheduled_at))
                    .bind(run.worker_id)
                    .bind(to_unix(run.started_at))
                    .bind(None::<i64>)
                    .fetch_optional(&mut *tx)
                    .await
                    .with_context(|| format!("claiming a tick of job {}", run.job))?;
                let Some(row) = row else {
                    tx.commit().await.context("committing a claim")?;
                    return Ok(Claim::AlreadyClaimed);
                };
                let run_id: i64 = row.try_get(0)?;
                match self
                    .take_lease(&mut tx, &lease_name, run.worker_id, lease_ttl)
                    .await?
                {
                    Some(token) => {
                        sqlx::query("UPDATE job_runs SET lease_token = $1 WHERE id = $2")
                            .bind(token)
                            .bind(run_id)
                            .execute(&mut *tx)
                            .await
                            .context("recording the lease token")?;
                        let reaped = Self::reap(&mut tx, run.job, token, run.started_at).await?;
                        Claim::Claimed {
                            run_id,
                            lease: Lease {
                                name: lease_name,
                                token,
                            },
                            reaped,
                        }
                    }
                    None => {
                        let (holder, expires_at) = self.lease_holder(&mut tx, &lease_name).await?;
                        sqlx::query(
                            "UPDATE job_runs SET status = 'skipped', finished_at = $1, \
                             duration_ms = 0, error = $2 WHERE id = $3",
                        )
                        .bind(to_unix(run.started_at))
                        .bind(format!(
                            "a previous run of {} still holds its lease (worker {holder})",
                            run.job
                        ))
                        .bind(run_id)
                        .execute(&mut *tx)
                        .await
                        .context("recording a skipped tick")?;
                        Claim::Busy {
                            holder,
                            expires_at,
                            run_id: Some(run_id),
                        }
                    }
                }
            }
            Origin::Manual => {
                match self
                    .take_lease(&mut tx, &lease_name, run.worker_id, lease_ttl)
                    .await?
                {
                    None => {
                        let (holder, expires_at) = self.lease_holder(&mut tx, &lease_name).await?;
                        tx.rollback().await.context("ending a claim")?;
                        return Ok(Claim::Busy {
                            holder,
                            expires_at,
                            run_id: None,
                        });
                    }
                    Some(token) => {
                        let row = sqlx::query(insert)
                            .bind(run.job)
                            .bind(run.origin.as_str())
                            .bind(to_unix(run.scheduled_at))
                            .bind(run.worker_id)
                            .bind(to_unix(run.started_at))
                            .bind(Some(token))
                            .fetch_one(&mut *tx)
                            .await
                            .with_context(|| format!("recording a run of job {}", run.job))?;
                        let run_id: i64 = row.try_get(0)?;
                        let reaped = Self::reap(&mut tx, run.job, token, run.started_at).await?;
                        Claim::Claimed {
                            run_id,
                            lease: Lease {
                                name: lease_name,
                                token,
                            },
                            reaped,
                        }
                    }
                }
            }
        };
        tx.commit().await.context("committing a claim")?;
        Ok(claim)
    }

    async fn lease_holder(
        &self,
        conn: &mut sqlx::AnyConnection,
        name: &str,
    ) -> anyhow::Result<(String, Option<DateTime<Utc>>)> {
        let row = sqlx::query("SELECT holder, expires_at FROM leases WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await
            .context("reading a lease")?;
        Ok(match row {
            Some(r) => (
                r.try_get("holder")?,
                DateTime::from_timestamp_millis(r.try_get("expires_at")?),
            ),
            None => ("(unknown)".into(), None),
        })
    }

    /// Extends a held lease; `false` when it is no longer this holder's
    /// (another worker took it over after it expired).
    pub async fn renew_lease(
        &self,
        lease: &Lease,
        ttl: std::time::Duration,
    ) -> anyhow::Result<bool> {
        let now = self.now_ms_sql();
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE leases SET expires_at = {now} + $1 WHERE name = $2 AND token = $3"
        )))
        .bind(ttl.as_millis() as i64)
        .bind(&lease.name)
        .bind(lease.token)
        .execute(self.pool())
        .await
        .with_context(|| format!("renewing the lease {}", lease.name))?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives a lease back at once (the row stays, so tokens keep growing).
    pub async fn release_lease(&self, lease: &Lease) -> anyhow::Result<()> {
        sqlx::query("UPDATE leases SET expires_at = 0 WHERE name = $1 AND token = $2")
            .bind(&lease.name)
            .bind(lease.token)
            .execute(self.pool())
            .await
            .with_context(|| format!("releasing the lease {}", lease.name))?;
        Ok(())
    }

    /// Records a claimed run's result; `false` when the run was fenced out
    /// (reaped by a newer lease holder) and nothing was written.
    #[allow(clippy::too_many_arguments)]
    pub async fn finish_run(
        &self,
        run_id: i64,
        lease: &Lease,
        status: RunStatus,
        error: Option<&str>,
        actions: &serde_json::Value,
        finished_at: DateTime<Utc>,
        duration_ms: i64,
    ) -> anyhow::Result<bool> {
        let done = sqlx::query(
            "UPDATE job_runs SET status = $1, error = $2, actions = $3, finished_at = $4, \
             duration_ms = $5 WHERE id = $6 AND status = 'running' AND lease_token = $7",
        )
        .bind(status.as_str())
        .bind(error.map(str::to_string))
        .bind(actions.to_string())
        .bind(to_unix(finished_at))
        .bind(duration_ms)
        .bind(run_id)
        .bind(lease.token)
        .execute(self.pool())
        .await
        .context("recording a job run's result")?;
        Ok(done.rows_affected() == 1)
    }

    /// Runs, newest first, of one job or of all.
    /// Finished runs of rotation jobs (`rotate-*`) started since `since`:
    /// (succeeded, failed). Skipped ticks are neither.
    pub async fn rotation_run_counts(&self, since: DateTime<Utc>) -> anyhow::Result<(i64, i64)> {
        let rows = sqlx::query(
            "SELECT status, COUNT(*) FROM job_runs WHERE job LIKE 'rotate-%' AND started_at >= $1 \
             AND status IN ('ok', 'failed') GROUP BY status",
        )
        .bind(since.timestamp())
        .fetch_all(self.pool())
        .await
        .context("counting rotation runs")?;
        let (mut ok, mut failed) = (0, 0);
        for r in rows {
            let status: String = r.try_get(0)?;
            let n: i64 = r.try_get(1)?;
            if status == "ok" {
                ok = n;
            } else {
                failed = n;
            }
        }
        Ok((ok, failed))
    }

    pub async fn job_runs(&self, job: Option<&str>, limit: i64) -> anyhow::Result<Vec<JobRun>> {
        let rows =
            match job {
                Some(job) => sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {RUN_COLUMNS} FROM job_runs WHERE job = $1 ORDER BY id DESC LIMIT $2"
                )))
                .bind(job)
                .bind(limit)
                .fetch_all(self.pool())
                .await,
                None => {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "SELECT {RUN_COLUMNS} FROM job_runs ORDER BY id DESC LIMIT $1"
                    )))
                    .bind(limit)
                    .fetch_all(self.pool())
                    .await
                }
            }
            .context("reading job runs")?;
        rows.iter().map(row_to_run).collect()
    }

    /// The newest run of `job`, if any.
    pub async fn last_run(&self, job: &str) -> anyhow::Result<Option<JobRun>> {
        Ok(self.job_runs(Some(job), 1).await?.into_iter().next())
    }

    /// The lease with this name, if it was ever taken.
    pub async fn lease(&self, name: &str) -> anyhow::Result<Option<LeaseRow>> {
        let row = sqlx::query("SELECT name, holder, token, expires_at FROM leases WHERE name = $1")
            .bind(name)
            .fetch_optional(self.pool())
            .await
            .context("reading a lease")?;
        row.map(|r| {
            Ok(LeaseRow {
                name: r.try_get("name")?,
                holder: r.try_get("holder")?,
                token: r.try_get("token")?,
                expires_at_ms: r.try_get("expires_at")?,
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("kw.db").display());
        let store = Store::connect(&url, true).await.unwrap();
        (dir, store)
    }

    fn run<'a>(origin: Origin, worker: &'a str, tick: i64) -> NewRun<'a> {
        let t = Utc.timestamp_opt(tick, 0).unwrap();
        NewRun {
            job: "rot",
            origin,
            scheduled_at: t,
            worker_id: worker,
            started_at: t,
        }
    }

    #[tokio::test]
    async fn a_tick_is_claimed_once_and_a_held_lease_skips_the_next() {
        let (_dir, s) = store().await;
        let ttl = std::time::Duration::from_secs(30);
        let Claim::Claimed { run_id, lease, .. } = s
            .claim_run(&run(Origin::Schedule, "a", 100), ttl)
            .await
            .unwrap()
        else {
            panic!("first claim")
        };
        assert_eq!(
            s.claim_run(&run(Origin::Schedule, "b", 100), ttl)
                .await
                .unwrap(),
            Claim::AlreadyClaimed
        );
        // The next tick comes while run 1 still holds the lease: recorded skipped.
        let next = s
            .claim_run(&run(Origin::Schedule, "b", 101), ttl)
            .await
            .unwrap();
        assert!(matches!(next, Claim::Busy { ref holder, run_id: Some(_), .. } if holder == "a"));
        // A manual run waits (records nothing) while the lease is held.
        let manual = s
            .claim_run(&run(Origin::Manual, "c", 101), ttl)
            .await
            .unwrap();
        assert!(matches!(manual, Claim::Busy { run_id: None, .. }));
        assert!(
            s.finish_run(
                run_id,
                &lease,
                RunStatus::Ok,
                None,
                &serde_json::json!([]),
                Utc::now(),
                1
            )
            .await
            .unwrap()
        );
        s.release_lease(&lease).await.unwrap();
        let runs = s.job_runs(Some("rot"), 10).await.unwrap();
        let statuses: Vec<RunStatus> = runs.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [RunStatus::Skipped, RunStatus::Ok]);
        // Released: the manual run gets the lease with a larger token.
        let Claim::Claimed { lease: l2, .. } = s
            .claim_run(&run(Origin::Manual, "c", 102), ttl)
            .await
            .unwrap()
        else {
            panic!("manual claim after release")
        };
        assert!(l2.token > lease.token);
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_and_the_old_holder_is_fenced_out() {
        let (_dir, s) = store().await;
        let short = std::time::Duration::from_millis(200);
        let Claim::Claimed {
            run_id: dead_run,
            lease: dead,
            ..
        } = s
            .claim_run(&run(Origin::Schedule, "dead", 100), short)
            .await
            .unwrap()
        else {
            panic!("first claim")
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let Claim::Claimed { lease, reaped, .. } = s
            .claim_run(&run(Origin::Schedule, "live", 101), short)
            .await
            .unwrap()
        else {
            panic!("the expired lease was not taken over")
        };
        assert_eq!(reaped, 1);
        assert!(lease.token > dead.token);
        // The old holder can neither renew nor record a result.
        assert!(!s.renew_lease(&dead, short).await.unwrap());
        assert!(
            !s.finish_run(
                dead_run,
                &dead,
                RunStatus::Ok,
                None,
                &serde_json::json!([]),
                Utc::now(),
                1
            )
            .await
            .unwrap()
        );
        assert!(s.renew_lease(&lease, short).await.unwrap());
        let runs = s.job_runs(Some("rot"), 10).await.unwrap();
        let dead_row = runs.iter().find(|r| r.id == dead_run).unwrap();
        assert_eq!(dead_row.status, RunStatus::Failed);
        assert_eq!(dead_row.error.as_deref(), Some(ABANDONED));
        let row = s.lease("job:rot").await.unwrap().unwrap();
        assert_eq!((row.holder.as_str(), row.token), ("live", lease.token));
    }
}
