//! The emergency response end to end (issue 9's "done when"): a real Redis
//! (a private redis-server, so the acknowledgements are exactly this test's
//! instances), three subscriber instances (in-process `KeyringCache`s, each
//! with its own Redis connections), an SMTP sink (aiosmtpd) and a signed
//! webhook receiver as the store's alert channels. Revoking the active data
//! key moves every row; revoking the active signing key makes its token fail
//! in every instance within a second of the revocation's commit; the alert
//! reaches both channels without key bytes; the audit chain verifies and
//! holds every step.

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use keywarden::crypto::jose::VerifyOptions;
use keywarden::crypto::rootkey::RootKeys;
use keywarden::sync::{CacheOptions, KeyringCache};
use serde_json::Value;
use sqlx::{Connection, Row};

use crate::both_backends;
use crate::revoke::{
    active_kid, all_data_keys, audit_actions, rows_under, seed_secrets, store_url,
};
use crate::support::*;

const ROWS: usize = 10_000;

/// Every secret row: (name, kid, token).
fn named_rows(env: &Env) -> Vec<(String, String, String)> {
    let url = store_url(env);
    rt().block_on(async {
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        sqlx::query("SELECT name, kid, token FROM secrets")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    })
}

/// The value `seed_secrets` gave `secret/{i}`.
fn seeded_value(name: &str) -> String {
    let i: usize = name.strip_prefix("secret/").unwrap().parse().unwrap();
    format!("{i:08}-{}", "x".repeat(90))
}

/// Strings that would betray a key's material in an alert: for every key of
/// the export, its wrapped token and its unwrapped material as text, base64,
/// base64url and hex (and each line of a PEM).
fn key_byte_forms(env: &Env) -> Vec<String> {
    let export = env.run(&["keyring", "export"]).ok().json();
    let roots = RootKeys::parse_list(&env.root_key(), "test").unwrap();
    let mut out = Vec::new();
    for k in export["keys"].as_array().unwrap() {
        let Some(w) = k["wrapped"].as_str() else {
            continue;
        };
        out.push(w.to_string());
        let m = roots.newest().fernet().decrypt(w).unwrap();
        out.push(base64::engine::general_purpose::STANDARD.encode(&m[..]));
        out.push(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&m[..]));
        out.push(hex::encode(&m[..]));
        if let Ok(text) = std::str::from_utf8(&m) {
            out.push(text.to_string());
            out.extend(
                text.lines()
                    .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
                    .map(str::to_string),
            );
        }
    }
    out
}

/// The mails in the sink, decoded by Python's email package: (subject, body).
fn mails(py: &std::path::Path, smtp: &SmtpSink) -> Vec<(String, String)> {
    const SCRIPT: &str = r#"
import email, email.policy, json, os, sys
new = os.path.join(sys.argv[1], "new")
out = []
for f in sorted(os.listdir(new)) if os.path.isdir(new) else []:
    with open(os.path.join(new, f), "rb") as fh:
        m = email.message_from_binary_file(fh, policy=email.policy.default)
    out.append([str(m["subject"]), m.get_body(("plain",)).get_content()])
print(json.dumps(out))
"#;
    let out = run_python(py, SCRIPT, &[smtp.maildir.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap()
}

/// Waits (bounded) until `f` returns `Some`.
fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `revoke KID` while polling `token` in every cache: returns the
/// command's JSON report, when the command reported its commit (the
/// `[revoke]` step line on stderr, printed right after the commit), and when
/// each cache first refused the token, with the error it gave.
struct Timed {
    report: Value,
    started: Instant,
    committed: Instant,
    returned: Instant,
    /// Per instance: when it first refused the token (and the wall clock
    /// then, in unix milliseconds), and the error.
    refused: Vec<(Instant, i64, keywarden::crypto::jose::VerifyError)>,
}

fn revoke_while_polling(env: &Env, kid: &str, token: &str, caches: &[KeyringCache]) -> Timed {
    let started = Instant::now();
    let mut child = env
        .cmd(&[
            "revoke",
            kid,
            "--reason",
            "signing key pasted in a public chat",
            "--yes",
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let committed: Arc<Mutex<Option<Instant>>> = Arc::default();
    let stderr = {
        let committed = committed.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(pipe).lines() {
                let line = line.unwrap();
                if line.starts_with("[revoke") {
                    committed.lock().unwrap().get_or_insert_with(Instant::now);
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        })
    };
    let stdout = {
        let mut pipe = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            pipe.read_to_end(&mut out).unwrap();
            out
        })
    };
    // Poll every instance until each refuses the token (bounded).
    let mut refused: Vec<Option<(Instant, i64, keywarden::crypto::jose::VerifyError)>> =
        caches.iter().map(|_| None).collect();
    let mut returned = None;
    let deadline = started + Duration::from_secs(20);
    while refused.iter().any(Option::is_none) || returned.is_none() {
        assert!(
            Instant::now() < deadline,
            "not every instance refused the token within 20 s: {refused:?}"
        );
        let opts = VerifyOptions::new(chrono::Utc::now().timestamp());
        for (c, slot) in caches.iter().zip(refused.iter_mut()) {
            if slot.is_none()
                && let Err(e) = c.verify_token(token, &opts).unwrap()
            {
                *slot = Some((Instant::now(), chrono::Utc::now().timestamp_millis(), e));
            }
        }
        if returned.is_none() && child.try_wait().unwrap().is_some() {
            returned = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let status = child.wait().unwrap();
    let stderr = stderr.join().unwrap();
    let stdout = stdout.join().unwrap();
    assert!(status.success(), "revoke failed: {status}\n{stderr}");
    let committed = committed
        .lock()
        .unwrap()
        .unwrap_or_else(|| panic!("no [revoke] step line:\n{stderr}"));
    Timed {
        report: serde_json::from_slice(&stdout).unwrap(),
        started,
        committed,
        returned: returned.unwrap(),
        refused: refused.into_iter().map(Option::unwrap).collect(),
    }
}

fn assert_three_acknowledged(report: &Value) {
    let mut acked: Vec<&str> = report["instances_acknowledged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    acked.sort();
    assert_eq!(acked, ["app-1", "app-2", "app-3"], "{report}");
    assert_eq!(
        report["instances_missing"],
        serde_json::json!([]),
        "{report}"
    );
    assert_eq!(report["redis_configured"], true);
    assert_eq!(report["complete"], true, "{report}");
}

both_backends!(
    revoke_end_to_end_with_redis_three_instances_smtp_and_webhook,
    |env| {
        let Some(redis) = PrivateRedis::start() else {
            return;
        };
        let Some(py) = python() else { return };
        let smtp = SmtpSink::start(&py, env.path());
        let hook = Receiver::start();
        write_alert_config(
            &mut env,
            "",
            &format!("{}/ok-hook", hook.base),
            smtp.port,
            3,
        );
        env.set_env("KEYWARDEN_REDIS_URL", &redis.url());
        // A public-key algorithm, so the JWKS has the kid to drop.
        env.set_env("KEYWARDEN_POLICY__SIGNING__ALGORITHM", "ES256");
        env.init();
        env.run(&["sync", "publish"]).ok();

        // Three application instances, each its own cache and connections.
        // Their poll interval is long: the revocation must reach them by
        // the pub/sub event, not by the next poll.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let roots = RootKeys::parse_list(&env.root_key(), "test").unwrap();
        let caches: Vec<KeyringCache> = (1..=3)
            .map(|i| {
                rt.block_on(KeyringCache::connect(
                    CacheOptions::new(redis.url(), roots.clone())
                        .poll_interval(Duration::from_secs(5))
                        .instance_id(format!("app-{i}")),
                ))
                .unwrap()
            })
            .collect();

        // (a) The data key: 10,000 rows.
        seed_secrets(&env, ROWS);
        let old_data = active_kid(&env, "data");
        let before = named_rows(&env);
        assert_eq!(before.len(), ROWS);
        assert!(before.iter().all(|r| r.1 == old_data));
        let old_token = before[0].2.clone();
        for c in &caches {
            assert_eq!(
                *c.decrypt(&old_token).unwrap(),
                *seeded_value(&before[0].0).as_bytes()
            );
        }
        let t = Instant::now();
        let r = env
            .run(&[
                "revoke",
                &old_data,
                "--reason",
                "data key printed in a CI log",
                "--yes",
                "--json",
            ])
            .ok()
            .json();
        eprintln!("revoke of the data key over {ROWS} rows: {:?}", t.elapsed());
        assert_eq!(r["previous_state"], "active");
        assert_eq!(r["rows_moved"], ROWS as u64, "{r}");
        assert_eq!(r["rows_remaining"], 0);
        assert_three_acknowledged(&r);
        let new_data = r["new_kid"].as_str().unwrap().to_string();
        assert_ne!(new_data, old_data);
        assert_eq!(active_kid(&env, "data"), new_data);
        assert_eq!(rows_under(&env, &old_data), 0, "census after the revoke");
        for e in r["census"].as_array().unwrap() {
            if e["kid"] == old_data.as_str() {
                assert_eq!(e["rows"], 0, "{r}");
            }
        }
        let keys = all_data_keys(&env);
        let after = named_rows(&env);
        assert_eq!(after.len(), ROWS, "no row may be lost");
        for (name, kid, token) in &after {
            assert_eq!(kid, &new_data, "{name} is still under {kid}");
            let p = keys[&new_data]
                .decrypt(token)
                .unwrap_or_else(|e| panic!("{name} does not decrypt: {e}"));
            assert_eq!(*p, *seeded_value(name).as_bytes(), "{name}");
        }
        // Every instance holds the new keyring: the old ciphertext is
        // refused, the moved row decrypts.
        let moved = &after.iter().find(|r| r.0 == before[0].0).unwrap().2;
        for c in &caches {
            assert!(c.decrypt(&old_token).is_err(), "{}", c.instance_id());
            assert_eq!(
                *c.decrypt(moved).unwrap(),
                *seeded_value(&before[0].0).as_bytes()
            );
        }

        // (b) The signing key.
        let old_sig = active_kid(&env, "signing");
        let token = env
            .run(&["token", "sign", "--claims", r#"{"sub":"alice"}"#])
            .ok()
            .stdout_str()
            .trim()
            .to_string();
        let opts = VerifyOptions::new(chrono::Utc::now().timestamp());
        for c in &caches {
            let v = c.verify_token(&token, &opts).unwrap();
            assert_eq!(&*v.unwrap().kid, old_sig, "{}", c.instance_id());
        }
        env.run(&["token", "verify", &token]).ok();
        let jwks_kids = |env: &Env| -> Vec<String> {
            env.run(&["jwks"]).ok().json()["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["kid"].as_str().unwrap().to_string())
                .collect()
        };
        assert!(jwks_kids(&env).contains(&old_sig));

        let timed = revoke_while_polling(&env, &old_sig, &token, &caches);
        let r = &timed.report;
        assert_eq!(r["previous_state"], "active");
        assert_three_acknowledged(r);
        let new_sig = r["new_kid"].as_str().unwrap().to_string();
        let published_ms: i64 = {
            let client = redis::Client::open(redis.url().as_str()).unwrap();
            let mut conn = client.get_connection().unwrap();
            redis::cmd("HGET")
                .arg("keywarden:published")
                .arg(r["epoch"].as_i64().unwrap())
                .query(&mut conn)
                .unwrap()
        };
        eprintln!(
            "revoke of the signing key: commit reported {:?} and the command returned {:?} after it started",
            timed.committed.duration_since(timed.started),
            timed.returned.duration_since(timed.started)
        );
        for ((at, wall_ms, e), c) in timed.refused.iter().zip(&caches) {
            let after_commit = at.saturating_duration_since(timed.committed);
            eprintln!(
                "{}: refused {:?} after the commit was reported, {} ms after the epoch was published ({:?} after the command started)",
                c.instance_id(),
                after_commit,
                wall_ms - published_ms,
                at.duration_since(timed.started)
            );
            assert!(
                after_commit < Duration::from_secs(1),
                "{} refused the token only {after_commit:?} after the commit",
                c.instance_id()
            );
            assert_eq!(e.code(), "key_not_usable", "{}: {e}", c.instance_id());
            assert!(
                e.to_string().contains("revoked"),
                "{}: {e}",
                c.instance_id()
            );
        }
        let cli = env
            .run(&["token", "verify", &token, "--json"])
            .code(3)
            .json();
        assert_eq!(cli["valid"], false);
        assert_eq!(cli["error"]["code"], "key_not_usable", "{cli}");
        assert!(
            cli["error"]["message"].to_string().contains("revoked"),
            "{cli}"
        );
        let kids = jwks_kids(&env);
        assert!(!kids.contains(&old_sig), "{kids:?}");
        assert!(kids.contains(&new_sig), "{kids:?}");
        // A token of the new key verifies everywhere.
        let fresh = env.run(&["token", "sign"]).ok().stdout_str();
        let opts = VerifyOptions::new(chrono::Utc::now().timestamp());
        for c in &caches {
            assert_eq!(
                &*c.verify_token(fresh.trim(), &opts).unwrap().unwrap().kid,
                new_sig
            );
        }

        // (c) The critical alert reached both channels, once per key,
        // naming the kid and the revocation and never key bytes.
        let forbidden = key_byte_forms(&env);
        let hooks = hook.requests("/ok-hook");
        assert_eq!(hooks.len(), 2, "one webhook call per revoked key");
        let got = poll("two mails", Duration::from_secs(5), || {
            let m = mails(&py, &smtp);
            (m.len() >= 2).then_some(m)
        });
        assert_eq!(got.len(), 2, "one mail per revoked key");
        for kid in [&old_data, &old_sig] {
            let call = hooks
                .iter()
                .find(|g| String::from_utf8_lossy(&g.body).contains(kid.as_str()))
                .unwrap_or_else(|| panic!("no webhook call names {kid}"));
            assert_webhook_signed(call);
            let body: Value = serde_json::from_slice(&call.body).unwrap();
            assert_eq!(body["rule"], "key_revoked", "{body}");
            assert_eq!(body["severity"], "critical", "{body}");
            assert_eq!(body["kind"], "event", "{body}");
            assert!(
                body["summary"].as_str().unwrap().contains("revoked"),
                "{body}"
            );
            let (subject, text) = got
                .iter()
                .find(|(s, b)| s.contains(kid.as_str()) || b.contains(kid.as_str()))
                .unwrap_or_else(|| panic!("no mail names {kid}: {got:?}"));
            assert!(subject.contains("revoked"), "{subject}");
            assert!(
                text.contains(kid.as_str()) && text.contains("revoked"),
                "{text}"
            );
            for f in &forbidden {
                let raw = String::from_utf8_lossy(&call.body);
                assert!(!raw.contains(f.as_str()), "key bytes in the webhook");
                assert!(
                    !subject.contains(f.as_str()) && !text.contains(f.as_str()),
                    "key bytes in the mail"
                );
            }
        }
        let history = env.run(&["--json", "alerts", "history"]).ok().json();
        let delivered = history
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["status"] == "delivered")
            .count();
        assert_eq!(delivered, 4, "{history}");

        // (d) The audit chain verifies and holds every step for both kids.
        let v = env.run(&["audit", "verify", "--json"]).ok().json();
        assert_eq!(v["ok"], true, "{v}");
        let actions = audit_actions(&env);
        let has = |a: &str, t: &str| actions.iter().any(|(x, y)| x == a && y == t);
        for (old, new) in [(&old_data, &new_data), (&old_sig, &new_sig)] {
            for (a, t) in [
                ("key.revoked", old),
                ("key.generated", new),
                ("key.activated", new),
                ("revoke.step", old),
                ("revoke.alerted", old),
            ] {
                assert!(has(a, t), "no {a} row for {t}: {actions:?}");
            }
        }
        let steps = |kid: &str| -> Vec<String> {
            env.run(&["audit", "export", "--kid", kid])
                .ok()
                .stdout_str()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .filter(|v| v["action"] == "revoke.step")
                .map(|v| {
                    assert_eq!(v["outcome"], "ok", "{v}");
                    v["details"]["step"].as_str().unwrap().to_string()
                })
                .collect()
        };
        assert_eq!(steps(&old_data), ["reencrypt", "publish"]);
        assert_eq!(steps(&old_sig), ["publish"]);

        for c in caches {
            rt.block_on(c.close());
        }
    }
);
