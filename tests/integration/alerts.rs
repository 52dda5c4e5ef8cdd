//! Alerts against real receivers: an SMTP server (Python aiosmtpd writing a
//! Maildir), and an HTTP server in the test process standing in for Slack
//! and a webhook receiver (and for receivers that fail, throttle or hang).
//! Plus the HTTP endpoint: credentials table, metrics through Python's
//! prometheus_client parser.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::both_backends;
use crate::support::{Env, SmtpSink, assert_webhook_signed, python, rt, write_alert_config};
// The receiver moved to support.rs; the old path stays for callers of
// `crate::alerts::Receiver`.
pub(crate) use crate::support::Receiver;

both_backends!(
    alerts_test_reaches_slack_and_the_webhook_with_documented_payloads,
    |env| {
        let recv = Receiver::start();
        write_alert_config(
            &mut env,
            &format!("{}/ok-slack", recv.base),
            &format!("{}/ok-hook", recv.base),
            0,
            3,
        );
        env.init();
        let out = env.run(&["--json", "alerts", "test", "slack"]).ok().json();
        assert_eq!(out["delivered"], true);
        assert_eq!(out["attempts"], 1);
        let slack = recv.requests("/ok-slack");
        assert_eq!(slack.len(), 1);
        let body: Value = serde_json::from_slice(&slack[0].body).unwrap();
        assert!(body["text"].as_str().unwrap().contains("TEST"));
        let blocks = body["blocks"].as_array().unwrap();
        assert_eq!(blocks[0]["type"], "header");
        assert_eq!(blocks[0]["text"]["type"], "plain_text");
        assert!(blocks.iter().any(|b| b["type"] == "section"));

        env.run(&["alerts", "test", "webhook"]).ok();
        let hook = recv.requests("/ok-hook");
        assert_eq!(hook.len(), 1);
        assert_webhook_signed(&hook[0]);
        let body: Value = serde_json::from_slice(&hook[0].body).unwrap();
        for field in [
            "version", "source", "id", "kind", "rule", "severity", "summary", "since", "at",
            "runbook",
        ] {
            assert!(
                body.get(field).is_some(),
                "webhook body lacks {field}: {body}"
            );
        }
        assert_eq!(body["version"], 1);
        assert_eq!(body["kind"], "test");

        let history = env.run(&["--json", "alerts", "history"]).ok().json();
        let rows = history.as_array().unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r["status"] == "delivered"));
        assert_eq!(rows[0]["channel"], "webhook");

        // An unknown channel is bad usage.
        env.run(&["alerts", "test", "pager"]).code(2);
    }
);

#[test]
fn alerts_test_email_reaches_a_real_smtp_server() {
    let Some(py) = python() else { return };
    let mut env = Env::new(crate::support::Backend::Sqlite).unwrap();
    let smtp = SmtpSink::start(&py, env.path());
    let port = smtp.port;
    write_alert_config(&mut env, "", "", port, 2);
    env.init();
    let run = env.run(&["--json", "alerts", "test", "email"]);
    let files = smtp.messages();
    drop(smtp);
    let out = run.ok().json();
    assert_eq!(out["delivered"], true, "{out}");
    assert_eq!(files.len(), 1);
    let text = &files[0];
    assert!(
        text.contains("Subject: [keywarden] TEST keywarden alert through email"),
        "{text}"
    );
    assert!(text.contains("ops@example.com") && text.contains("oncall@example.com"));
    assert!(text.contains("How bad:   info"), "{text}");
    assert!(text.contains("Runbook:"), "{text}");
}

#[test]
fn a_failing_receiver_is_retried_then_dead_lettered_and_exit_is_1() {
    let recv = Receiver::start();
    let mut env = Env::new(crate::support::Backend::Sqlite).unwrap();
    write_alert_config(
        &mut env,
        &format!("{}/fail-slack", recv.base),
        &format!("{}/bad-hook", recv.base),
        0,
        3,
    );
    env.init();
    let run = env.run(&["--json", "alerts", "test", "slack"]).code(1);
    assert!(run.stderr.contains("dead letter"), "{}", run.stderr);
    assert!(
        !run.stderr.contains(&recv.base),
        "the URL (a secret) leaked: {}",
        run.stderr
    );
    assert_eq!(run.json()["attempts"], 3);
    assert_eq!(recv.requests("/fail-slack").len(), 3);
    // A 400 is permanent: one attempt, no retries.
    env.run(&["alerts", "test", "webhook"]).code(1);
    assert_eq!(recv.requests("/bad-hook").len(), 1);
    let history = env.run(&["--json", "alerts", "history"]).ok().json();
    let rows = history.as_array().unwrap();
    assert!(
        rows.iter().all(|r| r["status"] == "dead_letter"),
        "{history}"
    );
    assert_eq!(rows[1]["attempts"], 3);
    assert!(rows[1]["error"].as_str().unwrap().contains("HTTP 500"));
}

#[test]
fn a_429_with_retry_after_is_honoured_and_then_delivered() {
    let recv = Receiver::start();
    let mut env = Env::new(crate::support::Backend::Sqlite).unwrap();
    write_alert_config(&mut env, &format!("{}/busy-slack", recv.base), "", 0, 3);
    env.init();
    let started = Instant::now();
    let out = env.run(&["--json", "alerts", "test", "slack"]).ok().json();
    assert_eq!(out["attempts"], 2);
    assert!(out["seconds"].as_f64().unwrap() >= 1.0, "{out}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(recv.requests("/busy-slack").len(), 2);
    // A channel that is not configured is bad usage, with the key to set.
    let run = env.run(&["alerts", "test", "webhook"]).code(2);
    assert!(run.stderr.contains("alerts.webhook.url"), "{}", run.stderr);
}

/// A TCP port that accepts connections and never says a word (an SMTP
/// server that hangs before its greeting).
fn silent_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in l.incoming() {
            held.push(conn);
        }
    });
    port
}

#[test]
fn a_receiver_that_never_answers_is_timed_out_and_dead_lettered_quickly() {
    let recv = Receiver::start();
    let mut env = Env::new(crate::support::Backend::Sqlite).unwrap();
    write_alert_config(&mut env, "", &format!("{}/hang-hook", recv.base), 0, 2);
    env.init();
    let started = Instant::now();
    let run = env.run(&["--json", "alerts", "test", "webhook"]).code(1);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(run.json()["attempts"], 2);
    assert_eq!(recv.requests("/hang-hook").len(), 2);
}

/// Opens the test's store in process.
pub async fn open_app(env: &Env) -> keywarden::app::App {
    let mut config_text = String::new();
    if let Ok(t) = std::fs::read_to_string(env.path().join("keywarden.toml")) {
        config_text = t;
    }
    let config = keywarden::config::Config::from_sources(
        Some((&env.path().join("keywarden.toml"), &config_text)),
        &[],
    )
    .unwrap();
    let mut paths = keywarden::app::Paths::resolve(Some(&env.data_dir()));
    if let Some(url) = &env.database_url {
        paths.database_url = url.clone();
    }
    keywarden::app::App::open(config, paths, keywarden::app::OpenMode::Existing)
        .await
        .unwrap()
}

fn from_cell(cell: Arc<Mutex<f64>>) -> keywarden::alerts::FigureFn {
    Arc::new(move |_, _| {
        let v = *cell.lock().unwrap();
        Box::pin(async move { Ok(Some(v)) })
    })
}

both_backends!(
    each_rule_over_its_threshold_fires_once_then_resolves_and_survives_a_restart,
    |env| {
        let recv = Receiver::start();
        write_alert_config(&mut env, &format!("{}/ok-slack", recv.base), "", 0, 2);
        env.init();
        let lag = Arc::new(Mutex::new(0.2));
        let fail = Arc::new(Mutex::new(0.0));
        let latency = Arc::new(Mutex::new(2.0));
        let success = Arc::new(Mutex::new(100.0));
        let hooks = keywarden::alerts::FigureHooks {
            verification_failure_rate: Some(from_cell(fail.clone())),
            sync_lag: Some(from_cell(lag.clone())),
            rotation_success_rate: Some(from_cell(success.clone())),
            signing_latency: Some(from_cell(latency.clone())),
        };
        let t0 = chrono::Utc::now();
        let step = |i: i64| t0 + chrono::TimeDelta::minutes(i);
        rt().block_on(async {
            let app = open_app(&env).await;
            let s = keywarden::alerts::check_alerts_with(&app, &hooks, step(0))
                .await
                .unwrap();
            assert_eq!(s.notified(), 0);
            *fail.lock().unwrap() = 3.0;
            *lag.lock().unwrap() = 12.0;
            *latency.lock().unwrap() = 250.0;
            *success.lock().unwrap() = 50.0;
            // Two evaluations at once (a worker tick and a manual run): the
            // state's compare-and-set lets one of them notify.
            let (a, b) = tokio::join!(
                keywarden::alerts::check_alerts_with(&app, &hooks, step(1)),
                keywarden::alerts::check_alerts_with(&app, &hooks, step(1)),
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            assert_eq!(a.notified() + b.notified(), 4, "{a:?} {b:?}");
            let s = if a.notified() > 0 { a } else { b };
            assert!(s.deliveries.iter().all(|d| d.delivered));
            for i in 2..5 {
                let s = keywarden::alerts::check_alerts_with(&app, &hooks, step(i))
                    .await
                    .unwrap();
                assert_eq!(s.notified(), 0);
            }
            app.store.close().await;
            // A restarted worker reads the state back and stays quiet.
            let app = open_app(&env).await;
            let s = keywarden::alerts::check_alerts_with(&app, &hooks, step(5))
                .await
                .unwrap();
            assert_eq!(s.notified(), 0);
            let views = keywarden::alerts::rule_views(&app).await.unwrap();
            assert!(
                views
                    .iter()
                    .all(|v| v.status == keywarden::alerts::rules::Status::Firing)
            );
            *fail.lock().unwrap() = 0.1;
            *lag.lock().unwrap() = 0.3;
            *latency.lock().unwrap() = 3.0;
            *success.lock().unwrap() = 100.0;
            let s = keywarden::alerts::check_alerts_with(&app, &hooks, step(6))
                .await
                .unwrap();
            let kinds: Vec<_> = s
                .rules
                .iter()
                .flat_map(|r| r.notifications.clone())
                .collect();
            assert_eq!(kinds, vec!["resolved"; 4]);
        });
        let got = recv.requests("/ok-slack");
        assert_eq!(got.len(), 8);
        let texts: Vec<String> = got
            .iter()
            .map(|g| {
                serde_json::from_slice::<Value>(&g.body).unwrap()["text"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert!(
            texts[..4].iter().all(|t| !t.starts_with("RESOLVED")),
            "{texts:?}"
        );
        assert!(
            texts[4..].iter().all(|t| t.starts_with("RESOLVED")),
            "{texts:?}"
        );
        assert!(
            texts
                .iter()
                .any(|t| t.contains("JWT signing latency is 250ms (alert when > 100ms)")),
            "{texts:?}"
        );
        let list = env.run(&["--json", "alerts", "list"]).ok().json();
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 4);
        assert!(
            list.iter()
                .all(|r| r["status"] == "ok" && !r["last_fired"].is_null())
        );
    }
);

#[test]
fn the_real_signing_canary_and_rotation_figures_measure_this_store() {
    let env = Env::new(crate::support::Backend::Sqlite).unwrap();
    env.init();
    rt().block_on(async {
        let app = open_app(&env).await;
        let now = chrono::Utc::now();
        let ms = keywarden::alerts::signing_canary_ms(&app, now)
            .await
            .unwrap();
        assert!(ms > 0.0 && ms < 5000.0);
        // init activated four keys: 100 %.
        let rate = keywarden::alerts::rotation_success_rate(&app, now, chrono::TimeDelta::days(30))
            .await
            .unwrap();
        assert_eq!(rate, Some(100.0));
        let ev = keywarden::alerts::rules::Event::RotationFailed {
            purpose: "data".into(),
            error: "boom".into(),
        };
        keywarden::alerts::raise_event(&app, &ev, now)
            .await
            .unwrap()
            .wait()
            .await;
        let rate = keywarden::alerts::rotation_success_rate(&app, now, chrono::TimeDelta::days(30))
            .await
            .unwrap();
        assert_eq!(rate, Some(80.0));
        // With no hooks: the canary is fast, rotations are at 80 % -> one
        // critical firing, sync lag and failure rate have no data.
        let s = keywarden::alerts::check_alerts(&app, now).await.unwrap();
        let fired: Vec<_> = s
            .rules
            .iter()
            .filter(|r| !r.notifications.is_empty())
            .map(|r| r.rule.as_str())
            .collect();
        assert_eq!(fired, vec!["rotation_success_rate"]);
    });
}

#[test]
fn a_hanging_channel_does_not_hold_up_another_channel_or_a_rotation() {
    let recv = Receiver::start();
    let mut env = Env::new(crate::support::Backend::Sqlite).unwrap();
    write_alert_config(
        &mut env,
        &format!("{}/ok-slack", recv.base),
        "",
        silent_port(),
        3,
    );
    env.init();
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    multi.block_on(async {
        let app = open_app(&env).await;
        let now = chrono::Utc::now();
        let ev = keywarden::alerts::rules::Event::KeyRevoked {
            kid: "k-test".into(),
            reason: "drill".into(),
        };
        let started = Instant::now();
        let pending = keywarden::alerts::raise_event(&app, &ev, now)
            .await
            .unwrap();
        assert_eq!(pending.len(), 2);
        // Raising returned at once; a rotation now takes its usual time.
        let rotated = app
            .rotate(keywarden::keyring::Purpose::Data, now, false, None)
            .await
            .unwrap();
        assert!(rotated.is_some());
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        let outcomes = pending.wait().await;
        let slack = outcomes
            .iter()
            .find(|o| o.channel.as_str() == "slack")
            .unwrap();
        let hook = outcomes
            .iter()
            .find(|o| o.channel.as_str() == "email")
            .unwrap();
        assert!(slack.delivered && slack.seconds < 1.0, "{slack:?}");
        assert!(!hook.delivered && hook.attempts == 3, "{hook:?}");
    });
    let history = env.run(&["--json", "alerts", "history"]).ok().json();
    let statuses: Vec<_> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["channel"].as_str().unwrap().to_string(),
                r["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(statuses.contains(&("slack".into(), "delivered".into())));
    assert!(statuses.contains(&("email".into(), "dead_letter".into())));
}
