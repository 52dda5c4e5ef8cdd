//! Alert rule state, delivery records (including dead letters) and
//! event-raised alerts.

use std::collections::HashMap;

use anyhow::Context;
use sqlx::Row;

use super::{Store, from_unix, to_unix};
use crate::alerts::rules::{RuleState, Status};

/// One delivery outcome as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeliveryRow {
    pub id: i64,
    pub notification_id: String,
    pub rule: String,
    pub kind: String,
    pub severity: String,
    pub channel: String,
    /// `delivered` or `dead_letter`.
    pub status: String,
    pub attempts: i64,
    pub error: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: chrono::DateTime<chrono::Utc>,
}

/// What to record for one delivery.
pub struct NewDelivery<'a> {
    pub notification_id: &'a str,
    pub rule: &'a str,
    pub kind: &'a str,
    pub severity: &'a str,
    pub channel: &'a str,
    pub status: &'a str,
    pub attempts: i64,
    pub error: Option<&'a str>,
    pub payload: &'a str,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: chrono::DateTime<chrono::Utc>,
}

fn opt_time(v: Option<i64>) -> Option<chrono::DateTime<chrono::Utc>> {
    v.map(from_unix)
}

impl Store {
    /// Every stored rule state, by rule name.
    pub async fn alert_states(&self) -> anyhow::Result<HashMap<String, RuleState>> {
        let rows = sqlx::query(
            "SELECT rule, status, since, last_notified, escalated, last_value, last_fired FROM alert_state",
        )
        .fetch_all(self.pool())
        .await
        .context("reading alert rule state")?;
        let mut out = HashMap::new();
        for r in rows {
            let state = RuleState {
                status: Status::parse(&r.get::<String, _>(1)),
                since: opt_time(r.get(2)),
                last_notified: opt_time(r.get(3)),
                escalated: r.get::<i64, _>(4) != 0,
                last_value: r.get(5),
                last_fired: opt_time(r.get(6)),
            };
            out.insert(r.get::<String, _>(0), state);
        }
        Ok(out)
    }

    /// Writes a rule's state if it is still `old` (compare-and-set on the
    /// fields that change when a notification is sent; `None`: no row yet).
    /// Returns whether this write won: a concurrent evaluation that got
    /// there first makes it return false, and the caller sends nothing.
    pub async fn save_alert_state(
        &self,
        rule: &str,
        old: Option<&RuleState>,
        new: &RuleState,
        now: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<bool> {
        let t = |v: Option<chrono::DateTime<chrono::Utc>>| v.map(to_unix);
        let done = match old {
            None => sqlx::query(
                "INSERT INTO alert_state (rule, status, since, last_notified, escalated, last_value, last_fired, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (rule) DO NOTHING",
            )
            .bind(rule)
            .bind(new.status.as_str())
            .bind(t(new.since))
            .bind(t(new.last_notified))
            .bind(i64::from(new.escalated))
            .bind(new.last_value)
            .bind(t(new.last_fired))
            .bind(to_unix(now))
            .execute(self.pool())
            .await,
            Some(old) => sqlx::query(
                "UPDATE alert_state SET status = $2, since = $3, last_notified = $4, escalated = $5, \
                 last_value = $6, last_fired = $7, updated_at = $8 \
                 WHERE rule = $1 AND status = $9 AND COALESCE(since, -1) = $10 \
                 AND COALESCE(last_notified, -1) = $11 AND escalated = $12",
            )
            .bind(rule)
            .bind(new.status.as_str())
            .bind(t(new.since))
            .bind(t(new.last_notified))
            .bind(i64::from(new.escalated))
            .bind(new.last_value)
            .bind(t(new.last_fired))
            .bind(to_unix(now))
            .bind(old.status.as_str())
            .bind(t(old.since).unwrap_or(-1))
            .bind(t(old.last_notified).unwrap_or(-1))
            .bind(i64::from(old.escalated))
            .execute(self.pool())
            .await,
        }
        .with_context(|| format!("saving the state of alert rule {rule}"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Records one delivery outcome.
    pub async fn record_delivery(&self, d: &NewDelivery<'_>) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO alert_deliveries (notification_id, rule, kind, severity, channel, status, attempts, \
             last_error, payload, created_at, finished_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(d.notification_id)
        .bind(d.rule)
        .bind(d.kind)
        .bind(d.severity)
        .bind(d.channel)
        .bind(d.status)
        .bind(d.attempts)
        .bind(d.error.map(str::to_string))
        .bind(d.payload)
        .bind(to_unix(d.created_at))
        .bind(to_unix(d.finished_at))
        .execute(self.pool())
        .await
        .context("recording an alert delivery")?;
        Ok(())
    }

    /// The most recent deliveries, newest first.
    pub async fn deliveries(&self, limit: i64) -> anyhow::Result<Vec<DeliveryRow>> {
        let rows = sqlx::query(
            "SELECT id, notification_id, rule, kind, severity, channel, status, attempts, last_error, \
             created_at, finished_at FROM alert_deliveries ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .context("reading alert deliveries")?;
        Ok(rows
            .into_iter()
            .map(|r| DeliveryRow {
                id: r.get(0),
                notification_id: r.get(1),
                rule: r.get(2),
                kind: r.get(3),
                severity: r.get(4),
                channel: r.get(5),
                status: r.get(6),
                attempts: r.get(7),
                error: r.get(8),
                created_at: from_unix(r.get(9)),
                finished_at: from_unix(r.get(10)),
            })
            .collect())
    }

    /// Records an event-raised alert.
    pub async fn record_alert_event(
        &self,
        name: &str,
        subject: &str,
        summary: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO alert_events (name, subject, summary, at) VALUES ($1, $2, $3, $4)",
        )
        .bind(name)
        .bind(subject)
        .bind(summary)
        .bind(to_unix(at))
        .execute(self.pool())
        .await
        .context("recording an alert event")?;
        Ok(())
    }

    /// How many events of `name` happened at or after `since`.
    pub async fn count_alert_events(
        &self,
        name: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) FROM alert_events WHERE name = $1 AND at >= $2")
            .bind(name)
            .bind(to_unix(since))
            .fetch_one(self.pool())
            .await
            .context("counting alert events")?;
        Ok(row.get(0))
    }

    /// How many outbox events with `action` were written at or after `since`.
    pub async fn count_outbox_actions(
        &self,
        action: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) FROM outbox WHERE action = $1 AND created_at >= $2")
            .bind(action)
            .bind(to_unix(since))
            .fetch_one(self.pool())
            .await
            .context("counting outbox events")?;
        Ok(row.get(0))
    }

    /// Activations (successful rotations and first keys) per purpose.
    pub async fn activations_by_purpose(&self) -> anyhow::Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT purpose, COUNT(*) FROM outbox WHERE action = 'activate' GROUP BY purpose ORDER BY purpose",
        )
        .fetch_all(self.pool())
        .await
        .context("counting rotations")?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}

impl Store {
    /// Failed rotations of a purpose, from the recorded events.
    pub async fn count_rotation_failures(&self, purpose: &str) -> anyhow::Result<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) FROM alert_events WHERE name = 'rotation_failed' AND subject = $1",
        )
        .bind(purpose)
        .fetch_one(self.pool())
        .await
        .context("counting failed rotations")?;
        Ok(row.get(0))
    }

    /// Deliveries by channel and status.
    pub async fn delivery_counts(&self) -> anyhow::Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT channel, status, COUNT(*) FROM alert_deliveries GROUP BY channel, status ORDER BY channel, status",
        )
        .fetch_all(self.pool())
        .await
        .context("counting alert deliveries")?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }
}
