//! Aggregated audit events for hot paths.
//!
//! Verifying a token or checking an API key happens per request; one audit
//! row (and one serialised write) per request would make the audit lock the
//! bottleneck and let a flood of bad tokens flood the log. So those call
//! sites only bump an in-memory counter keyed by `(action, reason)`
//! ([`App::audit_bump`]: a mutex and a map insert, no IO), and
//! [`App::flush_audit_counters`] writes one row per key for the interval
//! since the last flush: `details = {reason, count, from_ms, to_ms}`. The
//! worker flushes every minute and on shutdown; a one-shot command flushes
//! before it exits. If a flush cannot be written the counts are put back
//! and go out with the next flush: they are never silently dropped.
//!
//! `reason` must come from a closed set chosen by the caller (a typed error
//! kind such as `expired` or `bad_signature`), never from request data, so
//! the number of rows per interval stays bounded.

use std::collections::BTreeMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use super::Event;
use crate::app::App;

#[derive(Default)]
struct Window {
    from_ms: Option<i64>,
    counts: BTreeMap<(String, String), u64>,
}

/// Counts per `(action, reason)` since the last flush.
#[derive(Default)]
pub struct Counters {
    window: Mutex<Window>,
}

impl Counters {
    /// Adds `n` occurrences.
    pub fn bump(&self, action: &str, reason: &str, n: u64, now_ms: i64) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        w.from_ms.get_or_insert(now_ms);
        *w.counts
            .entry((action.to_string(), reason.to_string()))
            .or_insert(0) += n;
    }

    /// Takes the counts, leaving an empty window.
    fn take(&self) -> (Option<i64>, BTreeMap<(String, String), u64>) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let from = w.from_ms.take();
        (from, std::mem::take(&mut w.counts))
    }

    /// Puts counts back after a failed flush.
    fn restore(&self, from_ms: Option<i64>, counts: BTreeMap<(String, String), u64>) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = from_ms {
            w.from_ms = Some(w.from_ms.map_or(f, |cur| cur.min(f)));
        }
        for (k, n) in counts {
            *w.counts.entry(k).or_insert(0) += n;
        }
    }

    /// Whether anything waits to be flushed.
    pub fn is_empty(&self) -> bool {
        self.window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counts
            .is_empty()
    }
}

impl App {
    /// Counts one hot-path event (e.g. `action::TOKEN_VERIFY_FAILED` with
    /// reason `expired`) for the next flush. No IO.
    pub fn audit_bump(&self, action: &str, reason: &str, now: DateTime<Utc>) {
        self.audit
            .counters
            .bump(action, reason, 1, now.timestamp_millis());
    }

    /// Writes one audit row per `(action, reason)` counted since the last
    /// flush, in one transaction; returns how many rows. On failure the
    /// counts are kept for the next flush.
    pub async fn flush_audit_counters(&self, now: DateTime<Utc>) -> anyhow::Result<usize> {
        let (from_ms, counts) = self.audit.counters.take();
        if counts.is_empty() {
            return Ok(0);
        }
        let to_ms = now.timestamp_millis();
        let events: Vec<Event> = counts
            .iter()
            .map(|((action, reason), n)| {
                Event::new(action)
                    .detail("reason", reason.as_str())
                    .detail("count", *n)
                    .detail("from_ms", from_ms.unwrap_or(to_ms))
                    .detail("to_ms", to_ms)
            })
            .collect();
        match self.audit_now(events, now).await {
            Ok(rows) => Ok(rows.len()),
            Err(e) => {
                self.audit.counters.restore(from_ms, counts);
                Err(e.context("flushing aggregated audit counters (kept for the next flush)"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_merge_per_action_and_reason_and_survive_a_failed_flush() {
        let c = Counters::default();
        c.bump("token.verify_failed", "expired", 1, 10);
        c.bump("token.verify_failed", "expired", 1, 20);
        c.bump("token.verify_failed", "bad_signature", 1, 30);
        let (from, counts) = c.take();
        assert_eq!(from, Some(10));
        assert_eq!(counts.len(), 2);
        assert!(c.is_empty());
        c.bump("token.verify_failed", "expired", 1, 40);
        c.restore(from, counts);
        let (from, counts) = c.take();
        assert_eq!(from, Some(10));
        assert_eq!(
            counts[&("token.verify_failed".to_string(), "expired".to_string())],
            3
        );
    }
}
