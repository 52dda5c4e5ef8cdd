//! The HTTP endpoint in process on 127.0.0.1:0: health, readiness, JWKS,
//! Prometheus text checked by Python's prometheus_client parser, and every
//! admin route refusing every bad credential.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::alerts::open_app;
use crate::both_backends;
use crate::support::{Env, python, run_python};

struct Server {
    rt: tokio::runtime::Runtime,
    base: String,
    app: Arc<keywarden::app::App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    fn start(env: &Env) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let app = Arc::new(rt.block_on(open_app(env)));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let a = app.clone();
        rt.spawn(async move {
            keywarden::http::serve_on(listener, a, Default::default(), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Server {
            rt,
            base,
            app,
            stop: Some(tx),
        }
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<Value>,
    ) -> (u16, String) {
        let url = format!("{}{path}", self.base);
        self.rt.block_on(async {
            let client = reqwest::Client::new();
            let mut req = match method {
                "GET" => client.get(url),
                _ => client.post(url),
            };
            if let Some(a) = auth {
                req = req.header("Authorization", a);
            }
            if let Some(b) = body {
                req = req
                    .header("Content-Type", "application/json")
                    .body(b.to_string());
            }
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        })
    }

    fn key(
        &self,
        scopes: &[&str],
        ttl: Option<chrono::TimeDelta>,
        at: chrono::DateTime<chrono::Utc>,
    ) -> (String, String) {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        let (row, key) = self
            .rt
            .block_on(self.app.create_api_key("test", &scopes, ttl, at))
            .unwrap();
        (row.id, key.to_string())
    }

    fn keys_snapshot(&self) -> Vec<(String, String)> {
        self.rt
            .block_on(self.app.key_metas(None))
            .unwrap()
            .into_iter()
            .map(|k| (k.kid, k.state.as_str().to_string()))
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

both_backends!(
    admin_routes_refuse_every_bad_credential_and_change_nothing,
    |env| {
        env.init();
        let s = Server::start(&env);
        let now = chrono::Utc::now();
        let (_, all) = s.key(
            &["jobs:run", "keys:rotate", "keys:revoke", "audit:read"],
            None,
            now,
        );
        let (_, read_only) = s.key(&["audit:read"], None, now);
        let (revoked_id, revoked) = s.key(&["*"], None, now);
        s.rt.block_on(s.app.store.revoke_api_key(&revoked_id, now.timestamp()))
            .unwrap();
        let (_, expired) = s.key(
            &["*"],
            Some(chrono::TimeDelta::minutes(1)),
            now - chrono::TimeDelta::hours(1),
        );
        let mut tampered = all.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        let data_kid =
            s.rt.block_on(s.app.key_metas(Some(keywarden::keyring::Purpose::Data)))
                .unwrap()
                .into_iter()
                .find(|k| k.state == keywarden::keyring::KeyState::Active)
                .unwrap()
                .kid;

        let routes = [
            (
                "POST",
                "/v1/jobs/rotate-data-keys/run".to_string(),
                "jobs:run",
            ),
            ("POST", "/v1/keys/data/rotate".to_string(), "keys:rotate"),
            ("POST", format!("/v1/keys/{data_kid}/revoke"), "keys:revoke"),
            ("GET", "/v1/audit?n=5".to_string(), "audit:read"),
        ];
        let unauthorized: Vec<(&str, Option<String>)> = vec![
            ("no header", None),
            ("not bearer", Some(format!("Basic {all}"))),
            ("empty bearer", Some("Bearer ".into())),
            ("not a key", Some("Bearer hunter2".into())),
            ("unknown id", Some("Bearer kw_000000000000_abcdef".into())),
            ("wrong secret", Some(format!("Bearer {tampered}"))),
            ("revoked", Some(format!("Bearer {revoked}"))),
            ("expired", Some(format!("Bearer {expired}"))),
        ];
        let before = s.keys_snapshot();
        for (method, path, scope) in &routes {
            for (case, auth) in &unauthorized {
                let (status, body) =
                    s.call(method, path, auth.as_deref(), Some(json!({"reason": "x"})));
                assert_eq!(status, 401, "{method} {path} with {case}: {body}");
                assert!(!body.contains(&all), "the key was echoed");
            }
            if *scope != "audit:read" {
                let (status, body) = s.call(
                    method,
                    path,
                    Some(&format!("Bearer {read_only}")),
                    Some(json!({"reason": "x"})),
                );
                assert_eq!(status, 403, "{method} {path} without {scope}: {body}");
                assert!(body.contains(scope), "{body}");
            }
        }
        assert_eq!(
            s.keys_snapshot(),
            before,
            "a refused request changed the keyring"
        );

        // With the right scopes.
        let bearer = format!("Bearer {all}");
        let (status, body) = s.call("POST", "/v1/jobs/rotate-data-keys/run", Some(&bearer), None);
        assert_eq!(status, 501, "{body}");
        let (status, body) = s.call("GET", "/v1/audit?n=5", Some(&bearer), None);
        assert_eq!(status, 501, "{body}");
        let (status, body) = s.call("POST", "/v1/keys/nope/rotate", Some(&bearer), None);
        assert_eq!(status, 400, "{body}");
        let (status, body) = s.call("POST", "/v1/keys/data/rotate", Some(&bearer), None);
        assert_eq!(status, 200, "{body}");
        let rotated: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(rotated["old_kid"], data_kid.as_str());
        let (status, body) = s.call(
            "POST",
            &format!("/v1/keys/{data_kid}/revoke"),
            Some(&bearer),
            None,
        );
        assert_eq!(status, 400, "a reason is required: {body}");
        let (status, body) = s.call(
            "POST",
            &format!("/v1/keys/{data_kid}/revoke"),
            Some(&bearer),
            Some(json!({"reason": "drill"})),
        );
        assert_eq!(status, 200, "{body}");
        let after = s.keys_snapshot();
        assert!(after.contains(&(data_kid.clone(), "revoked".to_string())));
        let (status, _) = s.call(
            "POST",
            "/v1/keys/no-such-kid/revoke",
            Some(&bearer),
            Some(json!({"reason": "x"})),
        );
        assert_eq!(status, 400);
    }
);

#[test]
fn health_jwks_and_metrics_in_prometheus_text() {
    let Some(py) = python() else { return };
    let env = Env::new(crate::support::Backend::Sqlite).unwrap();
    env.init();
    if let Ok(url) = std::env::var("KEYWARDEN_TEST_REDIS_URL") {
        std::fs::write(
            env.path().join("keywarden.toml"),
            format!("[redis]\nurl = \"{url}\"\n"),
        )
        .unwrap();
    }
    let s = Server::start(&env);
    assert_eq!(s.call("GET", "/healthz", None, None).0, 200);
    let (status, body) = s.call("GET", "/readyz", None, None);
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.call("GET", "/.well-known/jwks.json", None, None);
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["keys"].is_array());
    s.call("GET", "/metrics", None, None);
    let (status, text) = s.call("GET", "/metrics", None, None);
    assert_eq!(status, 200);
    let file = env.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let parsed = run_python(
        &py,
        r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(open(sys.argv[1]).read()):
    out[f.name] = {"type": f.type, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
print(json.dumps(out))
"#,
        &[file.to_str().unwrap()],
    );
    let families: Value = serde_json::from_str(&parsed).unwrap();
    for (name, kind) in [
        ("keywarden_rotations", "counter"),
        ("keywarden_keys", "gauge"),
        ("keywarden_outbox_backlog", "gauge"),
        ("keywarden_alert_firing", "gauge"),
        ("keywarden_signing_latency_seconds", "histogram"),
    ] {
        assert_eq!(families[name]["type"], kind, "{name} in {parsed}");
    }
    // init activated one key per purpose; two scrapes ran the canary twice.
    let success: f64 = families["keywarden_rotations"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s[1]["outcome"] == "success")
        .map(|s| s[2].as_f64().unwrap())
        .sum();
    assert_eq!(success, 4.0);
    let count = families["keywarden_signing_latency_seconds"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s[0] == "keywarden_signing_latency_seconds_count")
        .unwrap()[2]
        .as_f64()
        .unwrap();
    assert_eq!(count, 2.0);
    let backlog = &families["keywarden_outbox_backlog"]["samples"][0][2];
    assert_eq!(backlog.as_f64().unwrap(), 4.0);
}

#[test]
fn readyz_says_503_when_redis_is_unreachable() {
    let env = Env::new(crate::support::Backend::Sqlite).unwrap();
    env.init();
    std::fs::write(
        env.path().join("keywarden.toml"),
        "[redis]\nurl = \"redis://127.0.0.1:1/\"\n",
    )
    .unwrap();
    let s = Server::start(&env);
    let (status, body) = s.call("GET", "/readyz", None, None);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("unreachable"));
}

#[test]
fn keywarden_serve_answers_curl_style_requests_and_stops_on_sigterm() {
    let env = Env::new(crate::support::Backend::Sqlite).unwrap();
    env.init();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = env
        .cmd(&["serve", "--bind", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "serve did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let body = crate::support::rt().block_on(async {
        reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert!(
        body.contains("# TYPE keywarden_outbox_backlog gauge"),
        "{body}"
    );
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
