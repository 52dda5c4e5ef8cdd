//! The emergency response `keywarden revoke`: data keys (every row moved,
//! census zero), signing keys (tokens refused, JWKS drops it), idempotence,
//! a kill mid-response, the audit trail, and acknowledgements through Redis.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use keywarden::crypto::fernet::FernetKey;
use keywarden::crypto::rootkey::RootKeys;
use sqlx::{Connection, Row};

use crate::both_backends;
use crate::support::*;

pub(crate) fn store_url(env: &Env) -> String {
    match &env.database_url {
        Some(url) => url.clone(),
        None => format!(
            "sqlite://{}?mode=rw",
            env.data_dir().join("keywarden.db").display()
        ),
    }
}

/// Every secret row: (id, kid, token).
fn secret_rows(env: &Env) -> Vec<(i64, String, String)> {
    let url = store_url(env);
    rt().block_on(async {
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        sqlx::query("SELECT id, kid, token FROM secrets")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<i64, _>(0), r.get(1), r.get(2)))
            .collect()
    })
}

/// Every data key with material (whatever its state): kid -> key.
pub(crate) fn all_data_keys(env: &Env) -> HashMap<String, FernetKey> {
    let snapshot = env.run(&["keyring", "export"]).ok().json();
    let roots = RootKeys::parse_list(&env.root_key(), "test").unwrap();
    let mut out = HashMap::new();
    for k in snapshot["keys"].as_array().unwrap() {
        if k["purpose"] != "data" {
            continue;
        }
        let Some(w) = k["wrapped"].as_str() else {
            continue;
        };
        let material = roots.newest().fernet().decrypt(w).unwrap();
        let key = FernetKey::from_base64(std::str::from_utf8(&material).unwrap()).unwrap();
        out.insert(k["kid"].as_str().unwrap().to_string(), key);
    }
    out
}

/// Checks every secret decrypts under the key its row names, that key is
/// `kid`, and the plaintext is the seeded one; returns the row count.
fn check_all_under(env: &Env, kid: &str, n: usize) {
    let keys = all_data_keys(env);
    let key = &keys[kid];
    let rows = secret_rows(env);
    assert_eq!(rows.len(), n, "no row may be lost");
    for (id, row_kid, token) in rows {
        assert_eq!(row_kid, kid, "row {id} is still under {row_kid}");
        let p = key
            .decrypt(&token)
            .unwrap_or_else(|e| panic!("row {id} does not decrypt: {e}"));
        let p = String::from_utf8(p.to_vec()).unwrap();
        assert!(p.ends_with(&"x".repeat(50)), "row {id}: wrong plaintext");
    }
}

pub(crate) fn seed_secrets(env: &Env, n: usize) {
    let mut lines = Vec::new();
    for i in 0..n {
        let value = format!("{i:08}-{}", "x".repeat(90));
        writeln!(
            lines,
            "{}",
            serde_json::json!({"name": format!("secret/{i}"), "value": value})
        )
        .unwrap();
    }
    let file = env.path().join("seed.jsonl");
    std::fs::write(&file, lines).unwrap();
    env.run(&["secrets", "import", file.to_str().unwrap()]).ok();
}

pub(crate) fn active_kid(env: &Env, purpose: &str) -> String {
    let keys = env.run(&["keys", "list", "--json"]).ok().json();
    keys.as_array()
        .unwrap()
        .iter()
        .find(|k| k["purpose"] == purpose && k["state"] == "active")
        .unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string()
}

pub(crate) fn rows_under(env: &Env, kid: &str) -> u64 {
    let census = env.run(&["keys", "census", "--json"]).ok().json();
    census
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kid"] == kid)
        .map(|e| e["rows"].as_u64().unwrap())
        .sum()
}

pub(crate) fn audit_actions(env: &Env) -> Vec<(String, String)> {
    let out = env.run(&["audit", "export"]).ok().stdout_str();
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["action"].as_str().unwrap_or_default().to_string(),
                v["target"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

both_backends!(revoking_the_active_data_key_moves_every_row, |env| {
    env.init();
    const N: usize = 2000;
    seed_secrets(&env, N);
    let old = active_kid(&env, "data");

    // A dry run changes nothing and counts the rows.
    let dry = env
        .run(&["revoke", &old, "--reason", "leaked", "--dry-run", "--json"])
        .ok()
        .json();
    assert_eq!(dry["rows_remaining"], N as u64);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(active_kid(&env, "data"), old);

    // Without a terminal and without --yes: exit 2, nothing changed.
    let refused = env.run(&["revoke", &old, "--reason", "leaked"]).code(2);
    assert!(refused.stderr.contains("--yes"), "{}", refused.stderr);
    assert_eq!(active_kid(&env, "data"), old);

    let started = Instant::now();
    let r = env
        .run(&[
            "revoke",
            &old,
            "--reason",
            "leaked in a log",
            "--yes",
            "--json",
        ])
        .ok();
    eprintln!("revoke of {N} rows took {:?}", started.elapsed());
    let r = r.json();
    assert_eq!(r["complete"], true, "{r}");
    assert_eq!(r["previous_state"], "active");
    assert_eq!(r["rows_moved"], N as u64);
    assert_eq!(r["rows_remaining"], 0);
    let new = r["new_kid"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(active_kid(&env, "data"), new);
    assert_eq!(rows_under(&env, &old), 0);
    let shown = env.run(&["keys", "show", &old, "--json"]).ok().json();
    assert_eq!(shown["state"], "revoked");
    assert_eq!(shown["revoked_reason"], "leaked in a log");
    check_all_under(&env, &new, N);
    // The CLI decrypts through the keyring too.
    assert!(
        env.run(&["secrets", "get", "secret/7"])
            .ok()
            .stdout_str()
            .starts_with("00000007-")
    );

    // Again: nothing changes.
    let epoch = env.run(&["keyring", "export"]).ok().json()["epoch"].clone();
    let audit_rows = audit_actions(&env).len();
    let again = env
        .run(&[
            "revoke",
            &old,
            "--reason",
            "leaked in a log",
            "--yes",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(again["complete"], true);
    assert_eq!(again["previous_state"], "revoked");
    assert_eq!(again["new_kid"], serde_json::Value::Null);
    assert_eq!(again["rows_moved"], 0);
    assert_eq!(again["active_kid"], new.as_str());
    assert_eq!(env.run(&["keyring", "export"]).ok().json()["epoch"], epoch);
    assert_eq!(audit_actions(&env).len(), audit_rows);

    // The audit chain verifies and holds the steps.
    assert_eq!(
        env.run(&["audit", "verify", "--json"]).ok().json()["ok"],
        true
    );
    let actions = audit_actions(&env);
    for (action, target) in [
        ("key.revoked", old.as_str()),
        ("key.activated", new.as_str()),
        ("revoke.step", old.as_str()),
        ("revoke.alerted", old.as_str()),
    ] {
        assert!(
            actions.iter().any(|(a, t)| a == action && t == target),
            "no {action} row for {target}: {actions:?}"
        );
    }
});

both_backends!(
    revoking_the_signing_key_refuses_its_tokens_and_drops_it_from_jwks,
    |env| {
        env.set_env("KEYWARDEN_POLICY__SIGNING__ALGORITHM", "RS256");
        env.init();
        let old = active_kid(&env, "signing");
        let token = env
            .run(&["token", "sign", "--claims", r#"{"sub":"alice"}"#])
            .ok()
            .stdout_str();
        let token = token.trim();
        env.run(&["token", "verify", token]).ok();
        let jwks = env.run(&["jwks"]).ok().json();
        assert!(
            jwks["keys"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kid"] == old)
        );

        let r = env
            .run(&[
                "revoke",
                &old,
                "--reason",
                "private key in a repo",
                "--yes",
                "--json",
            ])
            .ok()
            .json();
        assert_eq!(r["complete"], true, "{r}");
        let new = r["new_kid"].as_str().unwrap();
        assert!(r["follow_ups"].to_string().contains("re-authenticate"));

        let out = env
            .run(&["token", "verify", token, "--json"])
            .code(3)
            .json();
        assert_eq!(out["valid"], false);
        assert_eq!(out["error"]["code"], "key_not_usable", "{out}");
        assert!(
            out["error"]["message"].to_string().contains("revoked"),
            "{out}"
        );
        let jwks = env.run(&["jwks"]).ok().json();
        let kids: Vec<&str> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap())
            .collect();
        assert!(!kids.contains(&old.as_str()), "{kids:?}");
        assert!(kids.contains(&new));
        // New tokens are signed by the new key and verify.
        let fresh = env.run(&["token", "sign"]).ok().stdout_str();
        env.run(&["token", "verify", fresh.trim()]).ok();
    }
);

both_backends!(a_killed_revoke_is_finished_by_running_it_again, |env| {
    env.init();
    const N: usize = 3000;
    seed_secrets(&env, N);
    let old = active_kid(&env, "data");
    // Killed right after the revocation committed: a new key is active (same
    // transaction), no row moved yet.
    env.set_env("KEYWARDEN_TEST_REVOKE_EXIT_AFTER_ROWS", "0");
    let r = env.run(&["revoke", &old, "--reason", "leak", "--yes"]);
    assert_ne!(r.code, 0);
    let new = active_kid(&env, "data");
    assert_ne!(new, old);
    assert_eq!(
        env.run(&["keys", "show", &old, "--json"]).ok().json()["state"],
        "revoked"
    );
    // Killed again in the middle of the re-encryption.
    env.set_env("KEYWARDEN_REENCRYPT__BATCH_SIZE", "250");
    env.set_env("KEYWARDEN_TEST_REVOKE_EXIT_AFTER_ROWS", "1000");
    let r = env.run(&["revoke", &old, "--reason", "leak", "--yes"]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    let moved = secret_rows(&env).iter().filter(|r| r.1 == new).count();
    assert!(
        (1000..N).contains(&moved),
        "{moved} rows moved before the kill"
    );
    // Every row still decrypts with the key it names.
    let keys = all_data_keys(&env);
    for (id, kid, token) in secret_rows(&env) {
        keys[&kid]
            .decrypt(&token)
            .unwrap_or_else(|e| panic!("row {id} under {kid}: {e}"));
    }
    // Run again: it finishes.
    env.set_env("KEYWARDEN_TEST_REVOKE_EXIT_AFTER_ROWS", "");
    let r = env
        .run(&["revoke", &old, "--reason", "leak", "--yes", "--json"])
        .ok()
        .json();
    assert_eq!(r["complete"], true, "{r}");
    assert_eq!(r["new_kid"], serde_json::Value::Null);
    assert_eq!(r["rows_remaining"], 0);
    assert_eq!(r["rows_moved"].as_u64().unwrap() as usize, N - moved);
    check_all_under(&env, &new, N);
    assert_eq!(
        env.run(&["audit", "verify", "--json"]).ok().json()["ok"],
        true
    );
});

both_backends!(
    the_report_lists_instances_that_acknowledged_and_those_that_did_not,
    |env| {
        use keywarden::sync::{CacheOptions, KeyringCache};
        let Some(redis) = PrivateRedis::start() else {
            return;
        };
        env.set_env("KEYWARDEN_REDIS_URL", &redis.url());
        env.init();
        env.run(&["sync", "publish"]).ok();
        let signing = active_kid(&env, "signing");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let roots = RootKeys::parse_list(&env.root_key(), "test").unwrap();
        let cache = rt
            .block_on(KeyringCache::connect(
                CacheOptions::new(redis.url(), roots)
                    .poll_interval(Duration::from_millis(200))
                    .instance_id("app-1"),
            ))
            .unwrap();
        // An instance that stopped following (acknowledged an old epoch,
        // seen just now): it must be listed as missing.
        let client = redis::Client::open(redis.url().as_str()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let now = chrono::Utc::now().to_rfc3339();
        let _: () = redis::cmd("HSET")
            .arg("keywarden:acks")
            .arg("app-stuck")
            .arg(serde_json::json!({"epoch": 1, "at": now, "seen": now}).to_string())
            .query(&mut conn)
            .unwrap();

        let r = env
            .run(&[
                "revoke", &signing, "--reason", "leak", "--yes", "--wait", "2s", "--json",
            ])
            .json();
        assert_eq!(r["redis_configured"], true);
        assert_eq!(
            r["instances_acknowledged"],
            serde_json::json!(["app-1"]),
            "{r}"
        );
        assert_eq!(
            r["instances_missing"],
            serde_json::json!(["app-stuck"]),
            "{r}"
        );
        assert_eq!(r["complete"], false);
        // The subscriber no longer holds the revoked key as usable.
        let keyring = cache.keyring();
        assert!(
            !keyring
                .usable(keywarden::keyring::Purpose::Signing)
                .iter()
                .any(|k| k.kid == signing)
        );
        // Once the stuck instance is gone, a re-run completes.
        let _: () = redis::cmd("HDEL")
            .arg("keywarden:acks")
            .arg("app-stuck")
            .query(&mut conn)
            .unwrap();
        let again = env
            .run(&["revoke", &signing, "--reason", "leak", "--yes", "--json"])
            .ok()
            .json();
        assert_eq!(again["complete"], true, "{again}");
        assert_eq!(again["instances_missing"], serde_json::json!([]));
        rt.block_on(cache.close());
    }
);

/// Every column of every row of the `keys` table, as text, by kid; fails
/// when the table has a column this list does not name (so a new column is
/// not silently left out of the export).
fn key_rows(env: &Env) -> Vec<Vec<Option<String>>> {
    const COLUMNS: [&str; 15] = [
        "kid",
        "purpose",
        "algorithm",
        "state",
        "version",
        "wrapped",
        "root_kid",
        "row_mac",
        "created_at",
        "activated_at",
        "rotate_after",
        "retire_after",
        "revoked_at",
        "revoked_reason",
        "destroyed_at",
    ];
    const INTEGERS: [&str; 7] = [
        "version",
        "created_at",
        "activated_at",
        "rotate_after",
        "retire_after",
        "revoked_at",
        "destroyed_at",
    ];
    let url = store_url(env);
    rt().block_on(async {
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        let any = sqlx::query("SELECT * FROM keys")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            any[0].columns().len(),
            COLUMNS.len(),
            "the keys table has a column the export round trip does not check"
        );
        let sql = format!("SELECT {} FROM keys ORDER BY kid", COLUMNS.join(", "));
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                COLUMNS
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        if INTEGERS.contains(c) {
                            r.get::<Option<i64>, _>(i).map(|v| v.to_string())
                        } else {
                            r.get::<Option<String>, _>(i)
                        }
                    })
                    .collect()
            })
            .collect()
    })
}

both_backends!(an_export_restores_into_a_fresh_store, |env| {
    env.init();
    seed_secrets(&env, 50);
    let old_data = active_kid(&env, "data");
    env.run(&["keys", "rotate", "data"]).ok();
    // A destroyed key (the replaced temp key) and a revoked one with its
    // reason: both must come back exactly as they were.
    let old_temp = active_kid(&env, "temp");
    env.run(&["keys", "rotate", "temp"]).ok();
    env.run(&["job", "run", "expire-keys"]).ok();
    assert_eq!(
        env.run(&["keys", "show", &old_temp, "--json"]).ok().json()["state"],
        "destroyed"
    );
    let old_enc = active_kid(&env, "token_encryption");
    env.run(&["revoke", &old_enc, "--reason", "laptop stolen", "--yes"])
        .ok();
    let token = env.run(&["token", "sign"]).ok().stdout_str();
    let token = token.trim().to_string();
    let rows = secret_rows(&env);
    assert!(rows.iter().all(|r| r.1 == old_data));
    let export = env.path().join("keyring.json");
    std::fs::write(&export, env.run(&["keyring", "export"]).ok().stdout).unwrap();
    let before = env.run(&["keys", "list", "--json"]).ok().json();

    // The store is lost; the export and the root key are kept.
    let mut fresh = Env::new(env.backend).unwrap();
    let file = export.to_str().unwrap();
    let r = fresh.run(&["keyring", "import", file]).code(2);
    assert!(r.stderr.contains("root key"), "{}", r.stderr);
    fresh.set_env("KEYWARDEN_ROOT_KEY", &env.root_key());
    // A wrong root key is refused by name.
    let mut wrong = Env::new(env.backend).unwrap();
    wrong.set_env(
        "KEYWARDEN_ROOT_KEY",
        &keywarden::crypto::rootkey::RootKey::generate().to_base64(),
    );
    let r = wrong.run(&["keyring", "import", file]).code(2);
    assert!(r.stderr.contains("does not unwrap"), "{}", r.stderr);

    let out = fresh
        .run(&["keyring", "import", file, "--json"])
        .ok()
        .json();
    assert_eq!(out["imported"].as_array().unwrap().len(), 7);
    let after = fresh.run(&["keys", "list", "--json"]).ok().json();
    assert_eq!(before, after);
    // Every column of every key row survives the round trip.
    assert_eq!(key_rows(&fresh), key_rows(&env));
    let shown = fresh.run(&["keys", "show", &old_enc, "--json"]).ok().json();
    assert_eq!(shown["state"], "revoked");
    assert_eq!(shown["revoked_reason"], "laptop stolen");
    // A document written before `revoked_reason` and `destroyed_at` were
    // exported still imports (with no reason).
    let mut legacy: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&export).unwrap()).unwrap();
    for k in legacy["keys"].as_array_mut().unwrap() {
        let k = k.as_object_mut().unwrap();
        k.remove("revoked_reason");
        k.remove("destroyed_at");
    }
    let legacy_file = env.path().join("legacy.json");
    std::fs::write(&legacy_file, legacy.to_string()).unwrap();
    let mut older = Env::new(env.backend).unwrap();
    older.set_env("KEYWARDEN_ROOT_KEY", &env.root_key());
    older
        .run(&["keyring", "import", legacy_file.to_str().unwrap()])
        .ok();
    assert_eq!(older.run(&["keys", "list", "--json"]).ok().json(), before);
    // Every secret of the old table decrypts; the token verifies.
    for (id, _, t) in &rows {
        let p = fresh
            .run_stdin(&["decrypt"], t.as_bytes())
            .ok()
            .stdout_str();
        assert!(p.ends_with(&"x".repeat(90)), "row {id}");
    }
    fresh.run(&["token", "verify", &token]).ok();
    // Not into a non-empty store; --merge keeps what is there.
    fresh.run(&["keyring", "import", file]).code(2);
    let merged = fresh
        .run(&["keyring", "import", file, "--merge", "--json"])
        .ok()
        .json();
    assert_eq!(merged["imported"].as_array().unwrap().len(), 0);
    assert_eq!(merged["kept"].as_array().unwrap().len(), 7);
    assert_eq!(
        fresh.run(&["audit", "verify", "--json"]).ok().json()["ok"],
        true
    );
});
