//! The audit trail on a real store: every key operation leaves its row,
//! tampering with the stored rows is detected and the right row named,
//! an unwritable audit table stops the key operation, and no secret reaches
//! the log.

use keywarden::audit::chain::{self, AuditRecord};
use serde_json::Value;

use crate::both_backends;
use crate::keyring::{contains, dump_postgres, walk};
use crate::support::*;

/// The store's URL as the test process reaches it.
fn db_url(env: &Env) -> String {
    match &env.database_url {
        Some(u) => u.clone(),
        None => format!(
            "sqlite://{}?mode=rw",
            env.data_dir().join("keywarden.db").display()
        ),
    }
}

/// Runs statements against the store directly (what an intruder with
/// database access can do).
fn exec(env: &Env, statements: &[&str]) {
    let url = db_url(env);
    rt().block_on(async {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        for s in statements {
            sqlx::query(sqlx::AssertSqlSafe(s.to_string()))
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    })
}

/// Every audit row, by seq, with `details` as stored (raw text).
fn rows(env: &Env) -> Vec<(AuditRecord, String)> {
    let url = db_url(env);
    rt().block_on(async {
        use sqlx::{Connection, Row};
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        sqlx::query(
            "SELECT seq, at_ms, actor, action, target, outcome, details, prev_hash, hash \
             FROM audit_log ORDER BY seq",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let raw: String = r.get(6);
            (
                AuditRecord {
                    seq: r.get(0),
                    at_ms: r.get(1),
                    actor: r.get(2),
                    action: r.get(3),
                    target: r.get(4),
                    outcome: r.get(5),
                    details: serde_json::from_str(&raw).unwrap(),
                    prev_hash: r.get(7),
                    hash: r.get(8),
                },
                raw,
            )
        })
        .collect()
    })
}

/// Replaces the whole table with `rows` (details given as raw text).
fn write_rows(env: &Env, rows: &[(AuditRecord, String)]) {
    let url = db_url(env);
    rt().block_on(async {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("DELETE FROM audit_log")
            .execute(&mut *tx)
            .await
            .unwrap();
        for (r, raw) in rows {
            sqlx::query(
                "INSERT INTO audit_log (seq, at_ms, actor, action, target, outcome, details, prev_hash, hash) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(r.seq)
            .bind(r.at_ms)
            .bind(r.actor.as_str())
            .bind(r.action.as_str())
            .bind(r.target.as_deref())
            .bind(r.outcome.as_str())
            .bind(raw.as_str())
            .bind(r.prev_hash.as_str())
            .bind(r.hash.as_str())
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
    })
}

fn verify(env: &Env) -> Value {
    let r = env.run(&["audit", "verify", "--json"]);
    let v = r.json();
    assert_eq!(r.code, if v["ok"] == true { 0 } else { 3 }, "{}", r.stderr);
    v
}

#[track_caller]
fn assert_broken(v: &Value, kind: &str, row: i64, what: &str) {
    assert_eq!(v["ok"], false, "{what}: not detected: {v}");
    assert_eq!(v["breakage"], kind, "{what}: {v}");
    assert_eq!(v["first_bad_row"], row, "{what}: {v}");
    assert!(
        v["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{what}: {v}"
    );
}

fn actions(env: &Env) -> Vec<String> {
    rows(env).into_iter().map(|(r, _)| r.action).collect()
}

/// Opens the store in this process (for operations with no command yet).
/// The app's pool lives on `rt`: use the same runtime for everything done
/// with it (a pool used from another runtime fails once its own shuts down).
fn open_app(rt: &tokio::runtime::Runtime, env: &Env) -> keywarden::app::App {
    let paths = keywarden::app::Paths {
        data_dir: env.data_dir(),
        database_url: db_url(env).replace("?mode=rw", ""),
        key_file: env.data_dir().join("root.key"),
    };
    rt.block_on(keywarden::app::App::open(
        keywarden::config::Config::default(),
        paths,
        keywarden::app::OpenMode::Existing,
    ))
    .unwrap()
}

both_backends!(every_key_operation_leaves_its_audit_row, |env| {
    env.init();
    assert_eq!(
        actions(&env),
        [
            "key.generated",
            "key.activated",
            "key.generated",
            "key.activated",
            "key.generated",
            "key.activated",
            "key.generated",
            "key.activated"
        ]
    );
    let old_data = env
        .run(&["keys", "list", "--purpose", "data", "--json"])
        .ok()
        .json()[0]["kid"]
        .as_str()
        .unwrap()
        .to_string();
    let rotated = env.run(&["keys", "rotate", "data", "--json"]).ok().json();
    let new_data = rotated["new_kid"].as_str().unwrap().to_string();
    let tail: Vec<AuditRecord> =
        serde_json::from_value(env.run(&["audit", "tail", "-n", "3", "--json"]).ok().json())
            .unwrap();
    assert_eq!(
        tail.iter()
            .map(|r| (r.action.as_str(), r.target.as_deref().unwrap()))
            .collect::<Vec<_>>(),
        [
            ("key.generated", new_data.as_str()),
            ("key.rotated", old_data.as_str()),
            ("key.activated", new_data.as_str()),
        ]
    );
    assert_eq!(tail[1].details["to"], "retiring");
    assert!(tail[0].actor.starts_with("cli:hmac:"), "{}", tail[0].actor);
    // A dry run changes nothing and records nothing.
    let before = rows(&env).len();
    env.run(&["keys", "rotate", "signing", "--dry-run"]).ok();
    assert_eq!(rows(&env).len(), before);
    for p in ["signing", "token_encryption", "temp"] {
        env.run(&["keys", "rotate", p]).ok();
    }

    // Secrets: the name only as its keyed HMAC, which `audit hmac` reproduces.
    env.run_stdin(&["secrets", "put", "db/password"], b"pw")
        .ok();
    let h = env
        .run_stdin(&["audit", "hmac"], b"db/password\n")
        .ok()
        .stdout_str()
        .trim()
        .to_string();
    assert!(h.starts_with("hmac:"), "{h}");
    let touched = env.run(&["audit", "export", "--kid", &h]).ok().stdout_str();
    assert_eq!(touched.lines().count(), 1, "{touched}");
    assert!(touched.contains("secret.written"));
    let import: String = (0..7)
        .map(|i| format!("{{\"name\": \"n{i}\", \"value\": \"v{i}\"}}\n"))
        .collect();
    std::fs::write(env.path().join("in.jsonl"), import).unwrap();
    env.run(&["secrets", "import", "in.jsonl"]).ok();
    let imported = env
        .run(&["audit", "export", "--action", "secrets.imported"])
        .ok()
        .stdout_str();
    assert_eq!(
        imported.lines().count(),
        1,
        "one row per import, not per secret"
    );
    let v: Value = serde_json::from_str(imported.lines().next().unwrap()).unwrap();
    assert_eq!(v["details"]["rows"], 7);

    // Expiry and the aggregated counters run in-process (their commands
    // belong to the worker and token issues).
    let rt = rt();
    let app = open_app(&rt, &env);
    let later = chrono::Utc::now() + chrono::TimeDelta::days(400);
    let expired = rt.block_on(app.expire(later, false, |_| Some(0))).unwrap();
    assert!(!expired.is_empty());
    use keywarden::audit::action;
    for _ in 0..3 {
        app.audit_bump(action::TOKEN_VERIFY_FAILED, "expired", later);
    }
    app.audit_bump(action::TOKEN_VERIFY_FAILED, "bad_signature", later);
    assert_eq!(rt.block_on(app.flush_audit_counters(later)).unwrap(), 2);
    assert_eq!(rt.block_on(app.flush_audit_counters(later)).unwrap(), 0);
    rt.block_on(app.store.close());
    let all = actions(&env);
    for a in ["key.retired", "key.destroyed", "token.verify_failed"] {
        assert!(all.iter().any(|x| x == a), "{a} missing from {all:?}");
    }
    let failed = env
        .run(&["audit", "export", "--action", "token.", "--json"])
        .ok()
        .stdout_str();
    assert!(
        failed.contains("\"count\":3") && failed.contains("\"reason\":\"expired\""),
        "{failed}"
    );

    // A checkpoint, then a root key rotation: the audit key moves with the
    // keyring, so the old checkpoint still verifies under the new root.
    env.run(&["audit", "checkpoint"]).ok();
    env.run(&["keys", "rotate", "root"]).ok();
    assert!(actions(&env).iter().any(|a| a == "key.rewrapped"));
    let v = verify(&env);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["rows"], rows(&env).len() as u64);
    assert!(v["checkpoint_seq"].as_i64().is_some());
    // The same name still redacts the same way after the root rotation.
    let h2 = env
        .run_stdin(&["audit", "hmac"], b"db/password")
        .ok()
        .stdout_str();
    assert_eq!(h2.trim(), h);
    let status = env.run(&["status", "--json"]).ok().json();
    assert!(status["audit"]["rows"].as_i64().unwrap() > 20, "{status}");
    assert!(status["audit"]["last_checkpoint_seq"].as_i64().is_some());
});

both_backends!(
    worker_runs_reencryption_and_config_loads_are_audited,
    |env| {
        env.init();
        let import: String = (0..40)
            .map(|i| format!("{{\"name\": \"n{i}\", \"value\": \"v{i}\"}}\n"))
            .collect();
        std::fs::write(env.path().join("in.jsonl"), import).unwrap();
        env.run(&["secrets", "import", "in.jsonl"]).ok();
        let new_kid = env.run(&["keys", "rotate", "data", "--json"]).ok().json()["new_kid"]
            .as_str()
            .unwrap()
            .to_string();

        // One worker pass over every job, as an external cron would run it.
        let out = env
            .cmd(&["run", "--once", "--json"])
            .env("KEYWARDEN_WORKER__ID", "w-audit")
            .env("KEYWARDEN_NOW", chrono::Utc::now().to_rfc3339())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reports: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        let ran: Vec<&str> = reports
            .iter()
            .filter(|r| r["status"] == "ok")
            .map(|r| r["job"].as_str().unwrap())
            .collect();
        assert!(ran.contains(&"reencrypt-secrets"), "{reports:?}");

        let export = |action: &str| -> Vec<Value> {
            env.run(&["audit", "export", "--action", action])
                .ok()
                .stdout_str()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let loaded = export("config.loaded");
        assert_eq!(loaded.len(), 1, "{loaded:?}");
        assert_eq!(loaded[0]["actor"], "worker:w-audit");
        assert_eq!(loaded[0]["target"], "defaults");
        assert_eq!(loaded[0]["details"]["sha256"].as_str().unwrap().len(), 64);
        let started = export("job.started");
        let finished = export("job.finished");
        for job in &ran {
            for (what, rows) in [("started", &started), ("finished", &finished)] {
                let mine: Vec<&Value> = rows.iter().filter(|r| r["target"] == *job).collect();
                assert_eq!(mine.len(), 1, "job {job} {what}: {rows:?}");
                assert_eq!(mine[0]["actor"], "worker:w-audit");
            }
        }
        let re = export("reencrypt.");
        assert_eq!(re.len(), 2, "{re:?}");
        assert_eq!(re[0]["action"], "reencrypt.started");
        assert_eq!(re[0]["details"]["to_kid"], new_kid.as_str());
        assert_eq!(re[0]["details"]["rows_planned"], 40);
        assert_eq!(re[1]["action"], "reencrypt.finished");
        assert_eq!(re[1]["outcome"], "ok");
        assert_eq!(re[1]["details"]["rows_reencrypted"], 40);
        assert_eq!(re[1]["actor"], "worker:w-audit");

        // An operator's run is the operator's; a run with nothing to do adds
        // no re-encryption rows.
        env.run(&["keys", "rotate", "data"]).ok();
        env.run(&["reencrypt"]).ok();
        env.run(&["reencrypt"]).ok();
        let re = export("reencrypt.");
        assert_eq!(re.len(), 4, "{re:?}");
        assert!(
            re[3]["actor"].as_str().unwrap().starts_with("cli:"),
            "{re:?}"
        );
        assert_eq!(verify(&env)["ok"], true);
    }
);

/// A log of a few dozen rows with a checkpoint in the middle.
fn build_log(env: &Env) -> i64 {
    env.init();
    for p in ["data", "signing", "temp", "data", "token_encryption"] {
        env.run(&["keys", "rotate", p]).ok();
    }
    env.run_stdin(&["secrets", "put", "a"], b"1").ok();
    let cp = env.run(&["audit", "checkpoint", "--json"]).ok().json();
    env.run(&["keys", "rotate", "data"]).ok();
    assert_eq!(verify(env)["ok"], true);
    cp["seq"].as_i64().unwrap()
}

fn flip(s: &str, at: usize) -> String {
    let mut b = s.as_bytes().to_vec();
    let i = at % b.len();
    // Stay ASCII (valid UTF-8) but change the byte.
    b[i] = if b[i] == b'a' { b'b' } else { b'a' };
    String::from_utf8(b).unwrap()
}

both_backends!(
    tampering_with_stored_rows_is_detected_and_the_row_named,
    |env| {
        let cp_seq = build_log(&env);
        let original = rows(&env);
        let n = original.len() as i64;
        assert!(cp_seq > 10 && n > cp_seq, "{cp_seq} {n}");
        let check = |what: &str, tampered: Vec<(AuditRecord, String)>, kind: &str, row: i64| {
            write_rows(&env, &tampered);
            assert_broken(&verify(&env), kind, row, what);
        };
        let at = |seq: i64| (seq - 1) as usize;

        // Flip a byte in each kind of field.
        for (seq, field) in [
            (3, "actor"),
            (5, "action"),
            (7, "target"),
            (9, "outcome"),
            (2, "details"),
            (11, "prev_hash"),
            (4, "hash"),
            (6, "at_ms"),
        ] {
            let mut t = original.clone();
            let (r, raw) = &mut t[at(seq)];
            match field {
                "actor" => r.actor = flip(&r.actor, 7),
                "action" => r.action = flip(&r.action, 1),
                "target" => r.target = Some(flip(r.target.as_deref().unwrap(), 5)),
                "outcome" => r.outcome = "denied".into(),
                "details" => {
                    *raw = raw
                        .replacen("\"data\"", "\"temp\"", 1)
                        .replacen("signing", "signinG", 1)
                }
                "prev_hash" => r.prev_hash = flip(&r.prev_hash, 10),
                "hash" => r.hash = flip(&r.hash, 20),
                "at_ms" => r.at_ms += 1,
                _ => unreachable!(),
            }
            assert_ne!(t[at(seq)], original[at(seq)], "{field} was not changed");
            check(&format!("flip {field} of row {seq}"), t, "changed", seq);
        }

        // Delete a row in the middle, and the first row.
        for seq in [6, 1] {
            let mut t = original.clone();
            t.remove(at(seq));
            check(&format!("delete row {seq}"), t, "deleted", seq);
        }

        // Swap the contents of two rows (the seq column stays in place).
        for (i, j) in [(4, 5), (3, 12)] {
            let mut t = original.clone();
            let (a, b) = (t[at(i)].clone(), t[at(j)].clone());
            t[at(i)] = b;
            t[at(j)] = a;
            t[at(i)].0.seq = i;
            t[at(j)].0.seq = j;
            check(&format!("swap rows {i} and {j}"), t, "reordered", i);
        }

        // Insert a forged row: renumber the rows after it to make room (the seq
        // column is a primary key), the forged row linked to its predecessor.
        for k in [5, cp_seq + 1] {
            let mut t = original.clone();
            for (r, _) in t.iter_mut().skip(at(k)) {
                r.seq += 1;
            }
            let prev = t[at(k) - 1].0.hash.clone();
            let forged = chain::seal(
                k,
                &prev,
                chain::NewEvent {
                    at_ms: t[at(k)].0.at_ms,
                    actor: "cli:intruder@elsewhere".into(),
                    action: "key.activated".into(),
                    target: Some("dat_forged".into()),
                    outcome: "ok".into(),
                    details: serde_json::json!({"forged": true}),
                },
            );
            let raw = serde_json::to_string(&forged.details).unwrap();
            t.insert(at(k), (forged, raw));
            check(&format!("insert a forged row at {k}"), t, "inserted", k);
        }
        // A forged row claiming an unused seq in the middle of the order.
        {
            let mut t = original.clone();
            let mut forged = t[at(8)].clone();
            forged.0.actor = "cli:intruder@elsewhere".into();
            forged.0.seq = n + 500;
            forged.0.hash = forged.0.computed_hash();
            // Put it where the database would list it: after the head.
            t.push(forged);
            let v = {
                write_rows(&env, &t);
                verify(&env)
            };
            assert_eq!(v["ok"], false, "a far-off forged row went unnoticed: {v}");
        }

        // Truncate the tail (only the checkpoint shows it).
        for from in [cp_seq - 3, cp_seq] {
            let t = original[..at(from)].to_vec();
            check(&format!("truncate from row {from}"), t, "truncated", from);
        }

        // Rewrite the chain consistently from some row on (only the checkpoint
        // shows it).
        for from in [2, cp_seq - 1] {
            let mut t = original.clone();
            for i in at(from)..t.len() {
                let prev = if i == 0 {
                    chain::GENESIS_HASH.to_string()
                } else {
                    t[i - 1].0.hash.clone()
                };
                let mut r = t[i].0.clone();
                r.actor = "cli:rewriter@elsewhere".into();
                r.prev_hash = prev;
                r.hash = r.computed_hash();
                t[i] = (r, t[i].1.clone());
            }
            check(&format!("rewrite from row {from}"), t, "rewritten", cp_seq);
        }

        // The untouched log still verifies.
        write_rows(&env, &original);
        assert_eq!(verify(&env)["ok"], true);

        // A forged checkpoint file and a moved retention anchor.
        let dir = env.data_dir().join("checkpoints");
        let file = walk(&dir).into_iter().next().unwrap();
        let saved = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, saved.replacen("\"seq\": ", "\"seq\": 1", 1)).unwrap();
        let v = verify(&env);
        assert_eq!(v["breakage"], "bad_checkpoint", "{v}");
        std::fs::write(&file, &saved).unwrap();
        let fake_anchor = serde_json::json!({
            "seq": 5, "head_hash": original[4].0.hash, "at_ms": 0, "mac": "00"
        });
        exec(
            &env,
            &[
                "DELETE FROM audit_log WHERE seq <= 5",
                &format!(
                    "INSERT INTO kw_meta (name, value) VALUES ('audit_anchor', '{fake_anchor}')"
                ),
            ],
        );
        let v = verify(&env);
        assert_eq!(v["ok"], false, "{v}");
        assert!(v["reason"].as_str().unwrap().contains("anchor"), "{v}");
    }
);

both_backends!(
    retention_prunes_old_rows_and_the_rest_still_verifies,
    |env| {
        let cp_seq = build_log(&env);
        let n = rows(&env).len();
        // Everything is older than one second by the time it runs; retention
        // stops at the latest checkpoint, which the command writes first.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        env.set_env("KEYWARDEN_AUDIT__RETENTION", "1s");
        let dry = env
            .run(&["audit", "checkpoint", "--dry-run", "--json"])
            .ok()
            .json();
        assert_eq!(rows(&env).len(), n, "a dry run deletes nothing");
        let out = env.run(&["audit", "checkpoint", "--json"]).ok().json();
        assert_eq!(dry["pruned_rows"], out["pruned_rows"]);
        let head = out["seq"].as_i64().unwrap();
        assert!(head > cp_seq);
        assert_eq!(out["anchor_seq"], head, "{out}");
        let left = rows(&env);
        assert_eq!(left.len(), 1, "only the checkpoint's own row is left");
        assert_eq!(left[0].0.seq, head + 1);
        let v = verify(&env);
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["anchor_seq"], head);
        // The chain goes on from the anchor.
        env.run(&["keys", "rotate", "temp"]).ok();
        assert_eq!(verify(&env)["ok"], true);
        // With a fresh checkpoint, deleting the remaining rows is a
        // truncation.
        env.run(&["audit", "checkpoint"]).ok();
        exec(&env, &["DELETE FROM audit_log"]);
        assert_eq!(verify(&env)["breakage"], "truncated");
        env.run(&["audit", "checkpoint"]).code(3);
    }
);

both_backends!(
    concurrent_writers_keep_the_chain_linear_and_gap_free,
    |env| {
        env.init();
        std::fs::write(env.path().join("v.txt"), "value").unwrap();
        let children: Vec<_> = ["data", "signing", "temp", "token_encryption"]
            .iter()
            .map(|p| env.cmd(&["keys", "rotate", p]))
            .chain((0..4).map(|i| {
                let mut c = env.cmd(&["secrets", "put", &format!("s{i}"), "--from-file", "v.txt"]);
                c.stdin(std::process::Stdio::null());
                c
            }))
            .map(|mut c| {
                c.stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect::<Vec<_>>();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let all = rows(&env);
        assert_eq!(all.len(), 8 + 4 * 3 + 4);
        for (i, (r, _)) in all.iter().enumerate() {
            assert_eq!(r.seq, i as i64 + 1);
        }
        assert_eq!(verify(&env)["ok"], true);
    }
);

both_backends!(an_unwritable_audit_log_stops_the_key_operation, |env| {
    env.init();
    let before = env.run(&["keys", "list", "--json"]).ok().json();
    let epoch = env.run(&["status", "--json"]).ok().json()["epoch"].clone();
    exec(&env, &["ALTER TABLE audit_log RENAME TO audit_log_gone"]);
    let r = env.run(&["keys", "rotate", "data"]).code(1);
    assert!(r.stderr.contains("audit"), "{}", r.stderr);
    let r = env.run_stdin(&["secrets", "put", "x"], b"v").code(1);
    assert!(r.stderr.contains("audit"), "{}", r.stderr);
    exec(&env, &["ALTER TABLE audit_log_gone RENAME TO audit_log"]);
    assert_eq!(env.run(&["keys", "list", "--json"]).ok().json(), before);
    assert_eq!(env.run(&["status", "--json"]).ok().json()["epoch"], epoch);
    assert_eq!(
        env.run(&["secrets", "list", "--json"]).ok().json(),
        serde_json::json!([])
    );
    assert_eq!(verify(&env)["ok"], true);
    // Same with a trigger that refuses inserts.
    let trigger: &[&str] = match env.backend {
        Backend::Sqlite => &["CREATE TRIGGER audit_ro BEFORE INSERT ON audit_log \
             BEGIN SELECT RAISE(ABORT, 'audit log is read-only'); END"],
        Backend::Postgres => &[
            "CREATE FUNCTION audit_ro() RETURNS trigger AS $$ BEGIN \
             RAISE EXCEPTION 'audit log is read-only'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER audit_ro BEFORE INSERT ON audit_log \
             FOR EACH ROW EXECUTE FUNCTION audit_ro()",
        ],
    };
    exec(&env, trigger);
    env.run(&["keys", "rotate", "signing"]).code(1);
    env.run(&["keys", "rotate", "root"]).code(1);
    assert_eq!(env.run(&["keys", "list", "--json"]).ok().json(), before);
    assert_eq!(env.run(&["status", "--json"]).ok().json()["epoch"], epoch);
    // The root key file still opens the store.
    env.run(&["secrets", "list"]).ok();

    // A worker's job that cannot write its audit rows does not run, fails
    // its run, and raises the audit_write_failed alert.
    let receiver = crate::support::Receiver::start();
    write_alert_config(&mut env, "", &format!("{}/ok-audit", receiver.base), 0, 3);
    let r = env
        .run(&["job", "run", "rotate-temp-keys", "--json"])
        .code(1);
    assert!(r.stdout_str().contains("audit"), "{}", r.stdout_str());
    let got = receiver.requests("/ok-audit");
    assert_eq!(got.len(), 1, "one alert");
    let body: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["rule"], "audit_write_failed", "{body}");
    assert_eq!(body["severity"], "critical", "{body}");
    assert_eq!(env.run(&["keys", "list", "--json"]).ok().json(), before);
});

both_backends!(no_secret_reaches_logs_audit_rows_or_checkpoints, |env| {
    env.set_env("KEYWARDEN_LOG", "trace");
    let mut logs = String::new();
    let mut record = |r: Run| {
        logs.push_str(&r.stderr);
        logs.push_str(&r.stdout_str());
    };
    let name = "NAME-CANARY-91c3e7";
    let plaintext = "PLAINTEXT-CANARY-2b8f0a";
    let imported = "IMPORTED-CANARY-77d1e4";
    record(env.run(&["init"]));
    record(env.run_stdin(&["secrets", "put", name], plaintext.as_bytes()));
    std::fs::write(
        env.path().join("in.jsonl"),
        format!("{{\"name\": \"{name}-2\", \"value\": \"{imported}\"}}\n"),
    )
    .unwrap();
    record(env.run(&["secrets", "import", "in.jsonl"]));
    let token = env
        .run_stdin(&["encrypt"], plaintext.as_bytes())
        .ok()
        .stdout_str();
    let mut dec = env.run_stdin(&["decrypt"], token.as_bytes()).ok();
    dec.stdout.clear();
    record(dec);
    for p in ["data", "signing", "temp", "token_encryption"] {
        record(env.run(&["keys", "rotate", p]));
        record(env.run(&["keys", "rotate", p, "--dry-run"]));
    }
    record(env.run(&["keys", "list"]));
    record(env.run(&["status"]));
    record(env.run(&["status", "--json"]));
    record(env.run(&["secrets", "list"]));
    record(env.run(&["jwks"]));
    record(env.run(&["config", "show"]));
    record(env.run(&["audit", "checkpoint"]));
    record(env.run(&["audit", "verify"]));
    record(env.run(&["audit", "tail", "-n", "100"]));
    record(env.run(&["audit", "tail", "--json"]));
    record(env.run_stdin(&["audit", "hmac"], name.as_bytes()));
    record(env.run(&["audit", "export", "--since", "1h"]));
    record(env.run(&["audit", "bogus"]));
    record(env.run(&["audit", "export", "--since", "yesterday"]));
    let audit_rows = env.run(&["audit", "export"]).ok().stdout_str();
    record(env.run(&["keys", "rotate", "root"]));
    record(env.run(&["audit", "verify", "--json"]));
    let snapshot = env.run(&["keyring", "export"]).ok().json();

    // The bytes we must never find: root key, every key's material, the
    // audit key and its derived keys, the secrets' plaintexts.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE;
    let root = env.root_key();
    let roots = keywarden::crypto::rootkey::RootKeys::parse_list(&root, "test").unwrap();
    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("root key".into(), root.as_bytes().to_vec()),
        ("root key bytes".into(), b64.decode(&root).unwrap()),
        ("plaintext".into(), plaintext.as_bytes().to_vec()),
        ("imported plaintext".into(), imported.as_bytes().to_vec()),
    ];
    for k in snapshot["keys"].as_array().unwrap() {
        let Some(w) = k["wrapped"].as_str() else {
            continue;
        };
        let material = roots.newest().fernet().decrypt(w).unwrap();
        needles.push((format!("material of {}", k["kid"]), material.to_vec()));
        if k["purpose"] == "data" {
            needles.push((
                format!("raw data key {}", k["kid"]),
                b64.decode(&*material).unwrap(),
            ));
        }
        needles.push((
            format!("hex material of {}", k["kid"]),
            hex::encode(&*material).into_bytes(),
        ));
    }
    let audit_key: Value = {
        let url = db_url(&env);
        rt().block_on(async {
            use sqlx::{Connection, Row};
            sqlx::any::install_default_drivers();
            let mut c = sqlx::AnyConnection::connect(&url).await.unwrap();
            let v: String = sqlx::query("SELECT value FROM kw_meta WHERE name = 'audit_key'")
                .fetch_one(&mut c)
                .await
                .unwrap()
                .get(0);
            serde_json::from_str(&v).unwrap()
        })
    };
    let secret = roots
        .newest()
        .fernet()
        .decrypt(audit_key["token"].as_str().unwrap())
        .unwrap();
    needles.push(("audit key".into(), secret.to_vec()));
    needles.push(("audit key hex".into(), hex::encode(&*secret).into_bytes()));
    for label in [
        chain::CHECKPOINT_KEY_LABEL,
        chain::IDENTIFIER_KEY_LABEL,
        keywarden::audit::keys::ANCHOR_KEY_LABEL,
    ] {
        let k = chain::derive_key(&secret, label);
        needles.push((label.to_string(), k.to_vec()));
        needles.push((format!("{label} hex"), hex::encode(&k[..]).into_bytes()));
    }

    let mut haystacks: Vec<(String, Vec<u8>)> = vec![
        ("logs and output".into(), logs.clone().into_bytes()),
        ("audit rows".into(), audit_rows.clone().into_bytes()),
    ];
    for entry in walk(&env.data_dir()) {
        if entry.file_name().unwrap() == "root.key" {
            continue;
        }
        haystacks.push((entry.display().to_string(), std::fs::read(&entry).unwrap()));
    }
    if let Some(url) = &env.database_url {
        haystacks.push(("postgres dump".into(), dump_postgres(url)));
    }
    for (hay_name, hay) in &haystacks {
        for (needle_name, needle) in &needles {
            assert!(
                !contains(hay, needle),
                "{hay_name} contains the {needle_name}"
            );
        }
    }
    // Names of secrets appear in the audit trail only as keyed HMACs: not
    // in the rows, not in the audit tracing events.
    assert!(!audit_rows.contains(name), "{audit_rows}");
    assert!(audit_rows.contains("hmac:"));
    for line in logs.lines().filter(|l| l.contains("audit.seq")) {
        assert!(!line.contains(name), "{line}");
    }
    // The operator's user name is redacted in the actor too.
    if let Ok(user) = std::env::var("USER")
        && user.len() >= 4
    {
        assert!(!audit_rows.contains(&format!("cli:{user}")), "{audit_rows}");
    }
});

/// The key that signs this store's checkpoints, derived as `audit verify`
/// derives it (from the audit key, unwrapped with the root key).
fn checkpoint_key(env: &Env) -> zeroize::Zeroizing<[u8; 32]> {
    let url = db_url(env);
    let stored: Value = rt().block_on(async {
        use sqlx::{Connection, Row};
        sqlx::any::install_default_drivers();
        let mut c = sqlx::AnyConnection::connect(&url).await.unwrap();
        let v: String = sqlx::query("SELECT value FROM kw_meta WHERE name = 'audit_key'")
            .fetch_one(&mut c)
            .await
            .unwrap()
            .get(0);
        serde_json::from_str(&v).unwrap()
    });
    let roots = keywarden::crypto::rootkey::RootKeys::parse_list(&env.root_key(), "test").unwrap();
    let secret = roots
        .newest()
        .fernet()
        .decrypt(stored["token"].as_str().unwrap())
        .unwrap();
    chain::derive_key(&secret, chain::CHECKPOINT_KEY_LABEL)
}

/// Changes one field of a row so that it surely differs.
fn flip_field(r: &mut AuditRecord, raw: &mut String, rng: &mut impl rand::Rng) -> &'static str {
    fn flip_str(s: &str, rng: &mut impl rand::Rng) -> String {
        let at = rng.random_range(0..s.len());
        flip(s, at)
    }
    match rng.random_range(0..8) {
        0 => {
            r.actor = flip_str(&r.actor, rng);
            "actor"
        }
        1 => {
            r.action = flip_str(&r.action, rng);
            "action"
        }
        2 => {
            r.target = match &r.target {
                Some(t) => Some(flip_str(t, rng)),
                None => Some("dat_x".into()),
            };
            "target"
        }
        3 => {
            r.outcome = flip_str(&r.outcome, rng);
            "outcome"
        }
        4 => {
            r.details["tampered"] = Value::from(rng.random_range(0..1000));
            *raw = serde_json::to_string(&r.details).unwrap();
            "details"
        }
        5 => {
            r.prev_hash = flip_str(&r.prev_hash, rng);
            "prev_hash"
        }
        6 => {
            r.hash = flip_str(&r.hash, rng);
            "hash"
        }
        _ => {
            r.at_ms += rng.random_range(1..100_000);
            "at_ms"
        }
    }
}

both_backends!(
    a_thousand_random_modifications_of_a_real_log_are_all_detected,
    |env| {
        use rand::{Rng, SeedableRng};
        let cp_seq = build_log(&env);
        // The log as it stood at the checkpoint, made by the binary.
        let real: Vec<(AuditRecord, String)> =
            rows(&env).into_iter().take(cp_seq as usize).collect();
        let len = real.len();
        let file = walk(&env.data_dir().join("checkpoints")).remove(0);
        let checkpoint: chain::Checkpoint =
            serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        assert_eq!(checkpoint.seq, cp_seq);
        let key = checkpoint_key(&env);
        let plain: Vec<AuditRecord> = real.iter().map(|(r, _)| r.clone()).collect();
        assert!(chain::verify(plain, None, Some(&checkpoint), &key[..]).ok);

        const SEED: u64 = 0x6175_6469_7421;
        let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
        let seq_at = |i: usize| i as i64 + 1;
        for trial in 0..1000 {
            let mut t = real.clone();
            let (what, kind, row) = match trial % 6 {
                0 => {
                    let i = rng.random_range(0..len);
                    let (r, raw) = &mut t[i];
                    let field = flip_field(r, raw, &mut rng);
                    (
                        format!("flip {field} of row {}", seq_at(i)),
                        "changed",
                        seq_at(i),
                    )
                }
                1 => {
                    let i = rng.random_range(0..len);
                    let n = rng.random_range(1..=3).min(len - i);
                    t.drain(i..i + n);
                    let kind = if i + n == len { "truncated" } else { "deleted" };
                    (
                        format!("delete {n} rows from row {}", seq_at(i)),
                        kind,
                        seq_at(i),
                    )
                }
                2 => {
                    let i = rng.random_range(0..len - 1);
                    let j = rng.random_range(i + 1..len);
                    t.swap(i, j);
                    t[i].0.seq = seq_at(i);
                    t[j].0.seq = seq_at(j);
                    (
                        format!("swap rows {} and {}", seq_at(i), seq_at(j)),
                        "reordered",
                        seq_at(i),
                    )
                }
                3 => {
                    let i = rng.random_range(0..len);
                    for (r, _) in t.iter_mut().skip(i) {
                        r.seq += 1;
                    }
                    let prev = real[i].0.prev_hash.clone();
                    let forged = chain::seal(
                        seq_at(i),
                        &prev,
                        chain::NewEvent {
                            at_ms: real[i].0.at_ms,
                            actor: "cli:intruder@elsewhere".into(),
                            action: "key.activated".into(),
                            target: Some(format!("dat_forged{trial}")),
                            outcome: "ok".into(),
                            details: serde_json::json!({ "trial": trial }),
                        },
                    );
                    let raw = serde_json::to_string(&forged.details).unwrap();
                    t.insert(i, (forged, raw));
                    (
                        format!("insert a forged row at {}", seq_at(i)),
                        "inserted",
                        seq_at(i),
                    )
                }
                4 => {
                    let keep = rng.random_range(0..len);
                    t.truncate(keep);
                    (
                        format!("truncate from row {}", seq_at(keep)),
                        "truncated",
                        seq_at(keep),
                    )
                }
                _ => {
                    let from = rng.random_range(0..len);
                    for i in from..len {
                        let prev = if i == from {
                            real[i].0.prev_hash.clone()
                        } else {
                            t[i - 1].0.hash.clone()
                        };
                        let mut r = t[i].0.clone();
                        r.actor = format!("cli:rewriter{trial}@elsewhere");
                        r.prev_hash = prev;
                        r.hash = r.computed_hash();
                        t[i].0 = r;
                    }
                    (
                        format!("rewrite from row {}", seq_at(from)),
                        "rewritten",
                        cp_seq,
                    )
                }
            };
            let report = chain::verify(
                t.iter().map(|(r, _)| r.clone()),
                None,
                Some(&checkpoint),
                &key[..],
            );
            let got = serde_json::to_value(&report).unwrap();
            assert!(
                got["ok"] == false
                    && got["breakage"] == kind
                    && got["first_bad_row"] == row
                    && report
                        .reason
                        .as_deref()
                        .is_some_and(|r| r.contains(&row.to_string())),
                "trial {trial} (seed {SEED:#x}): {what}: expected {kind} at {row}, got {got}"
            );
            // Every 50th copy also goes into the database and through the binary.
            if trial % 50 == 0 {
                write_rows(&env, &t);
                assert_broken(&verify(&env), kind, row, &what);
            }
        }
        write_rows(&env, &real);
        assert_eq!(verify(&env)["ok"], true);
    }
);
