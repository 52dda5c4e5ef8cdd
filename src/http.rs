//! The worker's HTTP endpoint (axum): liveness, readiness, Prometheus
//! metrics, the JWKS, and admin routes guarded by keywarden's own API keys.
//!
//! `serve` runs inside `keywarden run` until its shutdown future resolves;
//! `serve_on` takes a bound listener so tests run it on 127.0.0.1:0. Work
//! that lands in other branches plugs in through [`HttpHooks`]: the job
//! runner (`POST /v1/jobs/{name}/run` answers 501 until wired), the audit
//! tail (`GET /v1/audit` likewise), extra metric families (sync lag per
//! instance, verification failures by reason), and the access-denied audit
//! record (until then a structured log event).

use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};

use crate::alerts::rules::Event;
use crate::app::App;
use crate::keyring::{KeyState, Purpose};

/// Runs a job by name; returns its report as JSON.
pub type JobRunner = Arc<dyn Fn(String) -> BoxFuture<'static, anyhow::Result<Value>> + Send + Sync>;
/// Returns the last `n` audit rows as JSON.
pub type AuditTail = Arc<dyn Fn(usize) -> BoxFuture<'static, anyhow::Result<Value>> + Send + Sync>;
/// Returns extra Prometheus text (whole metric families, HELP/TYPE included).
pub type MetricsFn = Arc<dyn Fn() -> BoxFuture<'static, anyhow::Result<String>> + Send + Sync>;
/// Records a refused admin request in the audit log: (route, reason, key id if any).
pub type DeniedFn =
    Arc<dyn Fn(String, String, Option<String>) -> BoxFuture<'static, ()> + Send + Sync>;

/// What other parts of the worker plug into the endpoint.
#[derive(Clone, Default)]
pub struct HttpHooks {
    pub run_job: Option<JobRunner>,
    pub audit_tail: Option<AuditTail>,
    pub extra_metrics: Vec<MetricsFn>,
    pub access_denied: Option<DeniedFn>,
}

/// Signing-latency histogram buckets, seconds.
const LATENCY_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}

struct Shared {
    app: Arc<App>,
    hooks: HttpHooks,
    latency: Mutex<Histogram>,
}

type St = State<Arc<Shared>>;

/// The router, for `serve_on` and tests.
pub fn router(app: Arc<App>, hooks: HttpHooks) -> Router {
    let shared = Arc::new(Shared {
        app,
        hooks,
        latency: Mutex::new(Histogram::default()),
    });
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/v1/jobs/{name}/run", post(run_job))
        .route("/v1/keys/{purpose}/rotate", post(rotate))
        .route("/v1/keys/{kid}/revoke", post(revoke))
        .route("/v1/audit", get(audit))
        .with_state(shared)
}

/// Binds `http.bind` and serves until `shutdown` resolves.
pub async fn serve(
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(app, HttpHooks::default(), shutdown).await
}

/// [`serve`] with hooks.
pub async fn serve_with(
    app: Arc<App>,
    hooks: HttpHooks,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let bind = app.config.http.bind;
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on http.bind = {bind}: {e}"))?;
    tracing::info!(http.bind = %bind, "HTTP endpoint listening");
    serve_on(listener, app, hooks, shutdown).await
}

/// Serves on an already bound listener.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    hooks: HttpHooks,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, router(app, hooks))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

fn internal(e: anyhow::Error) -> Response {
    tracing::error!(error = format!("{e:#}"), "HTTP request failed");
    error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): St) -> Response {
    let store = sqlx::query("SELECT 1").execute(s.app.store.pool()).await;
    let store_ok = store.is_ok();
    let redis = match s.app.config.redis.url() {
        None => "not configured".to_string(),
        Some(url) => match ping_redis(url).await {
            Ok(()) => "ok".into(),
            Err(e) => format!("unreachable: {e}"),
        },
    };
    let ready = store_ok && (redis == "ok" || redis == "not configured");
    let body = json!({
        "ready": ready,
        "store": if store_ok { "ok" } else { "unreachable" },
        "redis": redis,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn ping_redis(url: &str) -> anyhow::Result<()> {
    let fut = async {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        anyhow::Ok(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), fut)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 2s"))?
}

async fn jwks(State(s): St) -> Response {
    match s.app.jwks().await {
        Ok(v) => (
            [(header::CACHE_CONTROL, "public, max-age=60")],
            axum::Json(v),
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
}

async fn metrics(State(s): St) -> Response {
    match render_metrics(&s).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

async fn render_metrics(s: &Shared) -> anyhow::Result<String> {
    let app = &s.app;
    let mut out = String::new();

    family(
        &mut out,
        "keywarden_rotations_total",
        "counter",
        "Key activations (rotations and first keys) by purpose and outcome.",
    );
    let activations = app.store.activations_by_purpose().await?;
    for p in Purpose::ALL {
        let n = activations
            .iter()
            .find(|(purpose, _)| purpose == p.as_str())
            .map_or(0, |(_, n)| *n);
        out.push_str(&format!(
            "keywarden_rotations_total{{purpose=\"{}\",outcome=\"success\"}} {n}\n",
            p.as_str()
        ));
        let failed = app.store.count_rotation_failures(p.as_str()).await?;
        out.push_str(&format!(
            "keywarden_rotations_total{{purpose=\"{}\",outcome=\"failure\"}} {failed}\n",
            p.as_str()
        ));
    }

    family(
        &mut out,
        "keywarden_keys",
        "gauge",
        "Keys by purpose and state.",
    );
    let keys = app.key_metas(None).await?;
    for p in Purpose::ALL {
        for st in [
            KeyState::Pending,
            KeyState::Active,
            KeyState::Retiring,
            KeyState::Retired,
            KeyState::Revoked,
            KeyState::Destroyed,
        ] {
            let n = keys
                .iter()
                .filter(|k| k.purpose == p && k.state == st)
                .count();
            out.push_str(&format!(
                "keywarden_keys{{purpose=\"{}\",state=\"{}\"}} {n}\n",
                p.as_str(),
                st.as_str()
            ));
        }
    }

    family(
        &mut out,
        "keywarden_outbox_backlog",
        "gauge",
        "Key-change events not yet published to Redis.",
    );
    out.push_str(&format!(
        "keywarden_outbox_backlog {}\n",
        app.store.outbox_backlog().await?.events
    ));

    family(
        &mut out,
        "keywarden_alert_firing",
        "gauge",
        "1 while an alert rule is firing, else 0.",
    );
    let views = crate::alerts::rule_views(app).await?;
    for v in &views {
        out.push_str(&format!(
            "keywarden_alert_firing{{rule=\"{}\",severity=\"{}\"}} {}\n",
            label(&v.rule.name),
            v.rule.severity.as_str(),
            u8::from(v.status == crate::alerts::rules::Status::Firing)
        ));
    }
    family(
        &mut out,
        "keywarden_alert_last_value",
        "gauge",
        "The last value each alert rule measured, in its figure's unit.",
    );
    for v in &views {
        if let Some(x) = v.last_value {
            out.push_str(&format!(
                "keywarden_alert_last_value{{rule=\"{}\",unit=\"{}\"}} {x}\n",
                label(&v.rule.name),
                label(v.unit)
            ));
        }
    }

    family(
        &mut out,
        "keywarden_alert_deliveries_total",
        "counter",
        "Alert deliveries by channel and status (delivered, dead_letter).",
    );
    for (channel, status, n) in app.store.delivery_counts().await? {
        out.push_str(&format!(
            "keywarden_alert_deliveries_total{{channel=\"{}\",status=\"{}\"}} {n}\n",
            label(&channel),
            label(&status)
        ));
    }

    // The signing canary: one sign+verify per scrape, into a histogram.
    match crate::alerts::signing_canary_ms(app, Utc::now()).await {
        Ok(ms) => s
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(ms / 1000.0),
        Err(e) => tracing::warn!(error = format!("{e:#}"), "signing canary failed"),
    }
    family(
        &mut out,
        "keywarden_signing_latency_seconds",
        "histogram",
        "Sign and verify with the active signing key (the canary), seconds.",
    );
    {
        let h = s.latency.lock().unwrap_or_else(|p| p.into_inner());
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            out.push_str(&format!(
                "keywarden_signing_latency_seconds_bucket{{le=\"{le}\"}} {}\n",
                h.counts[i]
            ));
        }
        out.push_str(&format!(
            "keywarden_signing_latency_seconds_bucket{{le=\"+Inf\"}} {}\n",
            h.count
        ));
        out.push_str(&format!(
            "keywarden_signing_latency_seconds_sum {}\n",
            h.sum
        ));
        out.push_str(&format!(
            "keywarden_signing_latency_seconds_count {}\n",
            h.count
        ));
    }

    // Sync lag per instance, verification failures by reason, job
    // durations, re-encrypted rows: the branches that own them add their
    // families here.
    for f in &s.hooks.extra_metrics {
        match f().await {
            Ok(text) => {
                out.push_str(&text);
                if !text.ends_with('\n') {
                    out.push('\n');
                }
            }
            Err(e) => tracing::warn!(error = format!("{e:#}"), "a metrics hook failed"),
        }
    }
    Ok(out)
}

/// Why an admin request was refused.
enum Denied {
    Unauthorized(String),
    /// With the id of the key that lacked the scope.
    Forbidden(String, String),
}

/// Checks the bearer key and its scope. A key with scope `*` may do
/// everything.
async fn authorize(
    s: &Shared,
    headers: &HeaderMap,
    scope: &str,
    route: &str,
) -> Result<String, Response> {
    let now = Utc::now();
    let denied = match headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        None => Denied::Unauthorized("missing Authorization: Bearer <API key>".into()),
        Some(v) => match v.strip_prefix("Bearer ") {
            None => {
                Denied::Unauthorized("the Authorization header must be `Bearer <API key>`".into())
            }
            Some(key) => match s.app.verify_api_key(key.trim(), now).await {
                Err(e) => return Err(internal(e)),
                Ok(Err(e)) => Denied::Unauthorized(e.to_string()),
                Ok(Ok(row)) => {
                    if row.scopes.iter().any(|s| s == scope || s == "*") {
                        return Ok(row.id);
                    }
                    Denied::Forbidden(
                        format!(
                            "API key {} lacks the scope {scope} this route needs",
                            row.id
                        ),
                        row.id,
                    )
                }
            },
        },
    };
    let (status, reason, key_id) = match denied {
        Denied::Unauthorized(r) => (StatusCode::UNAUTHORIZED, r, None),
        Denied::Forbidden(r, id) => (StatusCode::FORBIDDEN, r, Some(id)),
    };
    tracing::warn!(
        http.route = route,
        http.status = status.as_u16(),
        reason = reason.as_str(),
        "access denied"
    );
    if let Some(f) = &s.hooks.access_denied {
        f(route.to_string(), reason.clone(), key_id).await;
    }
    let mut resp = error(status, reason);
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    Err(resp)
}

async fn run_job(State(s): St, Path(name): Path<String>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers, "jobs:run", "/v1/jobs/{name}/run").await {
        return r;
    }
    match &s.hooks.run_job {
        None => error(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "running jobs over HTTP needs the worker's job runner (keywarden run); \
                 use `keywarden job run {name}` meanwhile"
            ),
        ),
        Some(f) => match f(name).await {
            Ok(v) => axum::Json(v).into_response(),
            Err(e) => internal(e),
        },
    }
}

async fn rotate(State(s): St, Path(purpose): Path<String>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers, "keys:rotate", "/v1/keys/{purpose}/rotate").await {
        return r;
    }
    let Ok(purpose) = purpose.parse::<Purpose>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown purpose {purpose:?}: use signing, token_encryption, data or temp"),
        );
    };
    match s.app.rotate(purpose, Utc::now(), false, None).await {
        Ok(outcome) => axum::Json(json!(outcome)).into_response(),
        Err(e) => {
            let now = Utc::now();
            let ev = Event::RotationFailed {
                purpose: purpose.as_str().into(),
                error: format!("{e:#}"),
            };
            if let Err(e2) = crate::alerts::raise_event(&s.app, &ev, now).await {
                tracing::warn!(error = format!("{e2:#}"), "cannot raise the rotation alert");
            }
            internal(e)
        }
    }
}

#[derive(serde::Deserialize, Default)]
struct RevokeBody {
    #[serde(default)]
    reason: String,
}

async fn revoke(
    State(s): St,
    Path(kid): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize(&s, &headers, "keys:revoke", "/v1/keys/{kid}/revoke").await {
        return r;
    }
    let body: RevokeBody = if body.is_empty() {
        RevokeBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e}")),
        }
    };
    if body.reason.trim().is_empty() || body.reason.len() > 500 {
        return error(
            StatusCode::BAD_REQUEST,
            "a reason of 1 to 500 characters is required: {\"reason\": \"...\"}",
        );
    }
    match revoke_key(&s.app, &kid, &body.reason).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) if e.is::<crate::error::UsageError>() => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e) => internal(e),
    }
}

/// Runs the emergency flow of `keywarden revoke` (revoke and rotate in one
/// audited transaction, re-encrypt the key's rows, publish, alert), waiting
/// at most a few seconds for acknowledgements; the report is the response.
async fn revoke_key(app: &App, kid: &str, reason: &str) -> anyhow::Result<Value> {
    let opts = crate::app::revoke::RevokeOptions {
        kid: kid.to_string(),
        reason: reason.to_string(),
        dry_run: false,
        wait: std::time::Duration::from_secs(5),
        progress: None,
    };
    let report = app.revoke_key(&opts, Utc::now(), &|_| {}).await?;
    Ok(serde_json::to_value(report)?)
}

#[derive(serde::Deserialize)]
struct AuditQuery {
    n: Option<usize>,
}

async fn audit(State(s): St, Query(q): Query<AuditQuery>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers, "audit:read", "/v1/audit").await {
        return r;
    }
    let n = q.n.unwrap_or(100).clamp(1, 10_000);
    match &s.hooks.audit_tail {
        None => error(
            StatusCode::NOT_IMPLEMENTED,
            "the audit log is not wired into this build yet",
        ),
        Some(f) => match f(n).await {
            Ok(v) => axum::Json(v).into_response(),
            Err(e) => internal(e),
        },
    }
}
