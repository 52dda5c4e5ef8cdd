//! The keyring foundation: init, keys, encrypt/decrypt, secrets, root key
//! handling, bad input, and Python interop.

use std::os::unix::fs::PermissionsExt;

use crate::both_backends;
use crate::support::*;

both_backends!(
    init_makes_one_active_key_per_purpose_and_is_safe_to_repeat,
    |env| {
        env.init();
        let keys = env.run(&["keys", "list", "--json"]).ok().json();
        let keys = keys.as_array().unwrap();
        assert_eq!(keys.len(), 4);
        for purpose in ["signing", "token_encryption", "data", "temp"] {
            let active: Vec<_> = keys
                .iter()
                .filter(|k| k["purpose"] == purpose && k["state"] == "active")
                .collect();
            assert_eq!(active.len(), 1, "{purpose}");
            for field in [
                "kid",
                "purpose",
                "algorithm",
                "state",
                "version",
                "created_at",
                "activated_at",
                "rotate_after",
                "retire_after",
                "revoked_at",
            ] {
                assert!(active[0].get(field).is_some(), "missing {field}");
            }
        }
        let again = env.run(&["init", "--json"]).ok().json();
        assert_eq!(again["created"].as_array().unwrap().len(), 0);
        assert_eq!(
            env.run(&["keys", "list", "--json"])
                .ok()
                .json()
                .as_array()
                .unwrap()
                .len(),
            4
        );
        // The key file is private.
        let mode = std::fs::metadata(env.data_dir().join("root.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
);

both_backends!(
    encrypt_and_decrypt_round_trip_across_a_data_key_rotation,
    |env| {
        env.init();
        let old = env
            .run_stdin(&["encrypt"], b"attack at dawn")
            .ok()
            .stdout_str();
        let rot = env.run(&["keys", "rotate", "data", "--json"]).ok().json();
        let old_kid = rot["old_kid"].as_str().unwrap().to_string();
        let new_kid = rot["new_kid"].as_str().unwrap().to_string();
        let shown = env.run(&["keys", "show", &old_kid, "--json"]).ok().json();
        assert_eq!(shown["state"], "retiring");
        assert_eq!(
            env.run(&["keys", "show", &new_kid, "--json"]).ok().json()["state"],
            "active"
        );
        // A token made before the rotation still decrypts (retiring key).
        let plain = env.run_stdin(&["decrypt"], old.as_bytes()).ok();
        assert_eq!(plain.stdout, b"attack at dawn");
        // New tokens are made with the new key.
        let enc = env.run_stdin(&["encrypt", "--json"], b"x").ok().json();
        assert_eq!(enc["kid"], new_kid.as_str());
    }
);

both_backends!(
    decrypt_refuses_tampered_foreign_and_malformed_tokens_with_exit_3,
    |env| {
        env.init();
        let token = env.run_stdin(&["encrypt"], b"hello").ok().stdout_str();
        let token = token.trim();
        // Flip one character in the middle of the token.
        let mut bytes = token.as_bytes().to_vec();
        let i = bytes.len() / 2;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let r = env.run_stdin(&["decrypt"], &bytes).code(3);
        assert!(
            r.stderr.contains("no usable data key") || r.stderr.contains("not a Fernet"),
            "{}",
            r.stderr
        );
        let r = env
            .run_stdin(&["decrypt"], b"definitely not fernet")
            .code(3);
        assert!(r.stderr.contains("not a Fernet token"), "{}", r.stderr);
        // A valid token from another keyring.
        let other = Env::new(Backend::Sqlite).unwrap();
        other.init();
        let foreign = other.run_stdin(&["encrypt"], b"hello").ok().stdout_str();
        env.run_stdin(&["decrypt"], foreign.as_bytes()).code(3);
    }
);

both_backends!(secrets_put_get_list_and_import, |env| {
    env.init();
    env.run_stdin(&["secrets", "put", "db/password"], b"hunter2")
        .ok();
    assert_eq!(
        env.run(&["secrets", "get", "db/password"]).ok().stdout,
        b"hunter2"
    );
    env.run_stdin(&["secrets", "put", "db/password"], b"hunter3")
        .ok();
    assert_eq!(
        env.run(&["secrets", "get", "db/password"]).ok().stdout,
        b"hunter3"
    );
    // An empty value is refused unless allowed.
    let r = env.run_stdin(&["secrets", "put", "empty"], b"").code(2);
    assert!(r.stderr.contains("--allow-empty"), "{}", r.stderr);
    env.run_stdin(&["secrets", "put", "empty", "--allow-empty"], b"")
        .ok();
    let jsonl = env.path().join("in.jsonl");
    let mut text = String::new();
    for i in 0..1200 {
        text.push_str(&format!("{{\"name\": \"imp/{i}\", \"value\": \"v{i}\"}}\n"));
    }
    std::fs::write(&jsonl, text).unwrap();
    let out = env
        .run(&["secrets", "import", jsonl.to_str().unwrap(), "--json"])
        .ok()
        .json();
    assert_eq!(out["rows"], 1200);
    assert_eq!(env.run(&["secrets", "get", "imp/777"]).ok().stdout, b"v777");
    let list = env.run(&["secrets", "list", "--json"]).ok().json();
    assert_eq!(list.as_array().unwrap().len(), 1202);
    assert!(
        !env.run(&["secrets", "list"])
            .ok()
            .stdout_str()
            .contains("hunter")
    );
    let r = env.run(&["secrets", "get", "nope"]).code(2);
    assert!(r.stderr.contains("no secret named"), "{}", r.stderr);
});

both_backends!(
    a_malformed_import_line_is_named_and_imports_nothing,
    |env| {
        env.init();
        let jsonl = env.path().join("bad.jsonl");
        std::fs::write(
        &jsonl,
        "{\"name\": \"a\", \"value\": \"1\"}\n{\"name\": \"b\", \"value\": \"SECRETVALUE\"\n{\"name\": \"c\", \"value\": \"3\"}\n",
    )
    .unwrap();
        let r = env
            .run(&["secrets", "import", jsonl.to_str().unwrap()])
            .code(2);
        assert!(r.stderr.contains("line 2"), "{}", r.stderr);
        assert!(r.stderr.contains("nothing was imported"), "{}", r.stderr);
        assert!(!r.stderr.contains("SECRETVALUE"), "{}", r.stderr);
        let list = env.run(&["secrets", "list", "--json"]).ok().json();
        assert_eq!(list.as_array().unwrap().len(), 0);
        std::fs::write(&jsonl, "{\"name\": \"a\", \"value\": 5}\n").unwrap();
        let r = env
            .run(&["secrets", "import", jsonl.to_str().unwrap()])
            .code(2);
        assert!(r.stderr.contains("line 1"), "{}", r.stderr);
    }
);

both_backends!(
    a_wrong_root_key_is_detected_before_anything_is_written,
    |env| {
        env.init();
        let other = "aGVsbG8gd29ybGQgdGhpcyBpcyAzMiBieXRlcyBrZXk=";
        env.set_env("KEYWARDEN_ROOT_KEY", other);
        let r = env.run(&["keys", "rotate", "data"]).code(2);
        assert!(
            r.stderr.contains("does not belong to this keyring store"),
            "{}",
            r.stderr
        );
        assert!(!r.stderr.contains(other));
        env.set_env("KEYWARDEN_ROOT_KEY", "");
        assert_eq!(
            env.run(&["keys", "list", "--json"])
                .ok()
                .json()
                .as_array()
                .unwrap()
                .len(),
            4
        );
    }
);

both_backends!(bad_input_gets_a_clear_error_and_exit_2, |env| {
    env.init();
    let r = env.run(&["keys", "show", "dat_doesnotexist"]).code(2);
    assert!(
        r.stderr.contains("no key with kid dat_doesnotexist"),
        "{}",
        r.stderr
    );
    let r = env.run(&["keys", "show", "'; drop table keys; --"]).code(2);
    assert!(r.stderr.contains("is not a key id"), "{}", r.stderr);
    let r = env.run(&["keys", "rotate", "dta"]).code(2);
    assert!(
        r.stderr.contains("unknown key purpose \"dta\""),
        "{}",
        r.stderr
    );
    let r = env.run(&["keys", "list", "--purpose", "nope"]).code(2);
    assert!(r.stderr.contains("allowed: signing"), "{}", r.stderr);
    env.run(&["nonsense-command"]).code(2);
});

both_backends!(
    keyring_export_wraps_material_as_fernet_under_the_root_key,
    |env| {
        env.init();
        let snap = env.run(&["keyring", "export"]).ok().json();
        assert_eq!(snap["epoch"].as_i64().unwrap(), 4);
        let keys = snap["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 4);
        for k in keys {
            for field in [
                "kid",
                "purpose",
                "algorithm",
                "state",
                "version",
                "created_at",
                "wrapped",
            ] {
                assert!(k.get(field).is_some(), "missing {field}");
            }
            assert!(k["wrapped"].as_str().unwrap().starts_with("gAAAAA"));
        }
        assert!(snap["root_kid"].as_str().unwrap().starts_with("rk_"));
    }
);

#[test]
fn a_root_key_file_readable_by_others_is_refused() {
    let env = Env::new(Backend::Sqlite).unwrap();
    env.init();
    let file = env.data_dir().join("root.key");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = env.run(&["status"]).code(2);
    assert!(
        r.stderr.contains("readable by group or others"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("0644"), "{}", r.stderr);
}

#[test]
fn a_malformed_root_key_is_named_by_position_never_by_value() {
    let mut env = Env::new(Backend::Sqlite).unwrap();
    let good = "aGVsbG8gd29ybGQgdGhpcyBpcyAzMiBieXRlcyBrZXk=";
    env.set_env("KEYWARDEN_ROOT_KEY", &format!("{good},tooshortSECRET"));
    let r = env.run(&["init"]).code(2);
    assert!(r.stderr.contains("entry 2 of 2"), "{}", r.stderr);
    assert!(!r.stderr.contains("tooshortSECRET"), "{}", r.stderr);
    assert!(!r.stderr.contains(good), "{}", r.stderr);
}

#[test]
fn commands_before_init_say_to_run_init() {
    let env = Env::new(Backend::Sqlite).unwrap();
    let r = env.run(&["keys", "list"]).code(2);
    assert!(r.stderr.contains("keywarden init"), "{}", r.stderr);
}

#[test]
fn an_unreachable_database_fails_with_its_redacted_url() {
    let mut env = Env::new(Backend::Sqlite).unwrap();
    env.set_env(
        "KEYWARDEN_DATABASE_URL",
        "postgres://kw:hunter2@127.0.0.1:1/kw",
    );
    let r = env.run(&["init"]).code(1);
    assert!(
        r.stderr.contains("cannot connect to the database"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("hunter2"), "{}", r.stderr);
}

#[test]
fn a_data_directory_that_cannot_be_made_is_a_clear_error() {
    let env = Env::new(Backend::Sqlite).unwrap();
    std::fs::write(env.path().join("afile"), b"x").unwrap();
    let r = env.run(&["--data-dir", "afile/sub", "init"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("afile/sub"), "{}", r.stderr);
}

both_backends!(two_inits_at_once_make_one_keyring, |env| {
    let children: Vec<_> = (0..4)
        .map(|_| {
            env.cmd(&["init"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let keys = env.run(&["keys", "list", "--json"]).ok().json();
    assert_eq!(keys.as_array().unwrap().len(), 4);
});

#[test]
fn root_key_rotation_rewraps_every_key_and_keeps_secrets_readable() {
    let env = Env::new(Backend::Sqlite).unwrap();
    env.init();
    env.run_stdin(&["secrets", "put", "s"], b"value").ok();
    let before = env.root_key();
    let out = env.run(&["keys", "rotate", "root", "--json"]).ok().json();
    assert_eq!(out["keys_rewrapped"], 4);
    let after = env.root_key();
    assert_ne!(before, after);
    let file = std::fs::read_to_string(env.data_dir().join("root.key")).unwrap();
    assert_eq!(
        file.lines().count(),
        1,
        "the old root key is dropped from the file"
    );
    assert_eq!(env.run(&["secrets", "get", "s"]).ok().stdout, b"value");
    let snap = env.run(&["keyring", "export"]).ok().json();
    for k in snap["keys"].as_array().unwrap() {
        assert_eq!(k["wrapped_root_kid"], snap["root_kid"]);
    }
}

#[test]
fn config_show_redacts_and_config_default_is_complete() {
    let mut env = Env::new(Backend::Sqlite).unwrap();
    env.set_env(
        "KEYWARDEN_ALERTS__SLACK__WEBHOOK_URL",
        "https://hooks.slack.example/T0/B0/SECRETPART",
    );
    env.set_env("KEYWARDEN_POLICY__DATA__ROTATE_AFTER", "10d");
    let shown = env.run(&["config", "show"]).ok().stdout_str();
    assert!(!shown.contains("SECRETPART"), "{shown}");
    assert!(shown.contains("10d"), "{shown}");
    let default = env.run(&["config", "default"]).ok().stdout_str();
    for key in [
        "rotate_after",
        "grace",
        "leeway",
        "max_size",
        "poll_interval",
        "bind",
        "smtp_host",
        "secret_env",
    ] {
        assert!(default.contains(key), "{key} missing from config default");
    }
    env.set_env("KEYWARDEN_POLICY__DATA__ROTATE_AFTER", "30x");
    let r = env.run(&["config", "show"]).code(2);
    assert!(
        r.stderr.contains("policy.data.rotate_after"),
        "{}",
        r.stderr
    );
}

both_backends!(
    python_cryptography_reads_our_tokens_and_we_read_its,
    |env| {
        let Some(py) = python() else { return };
        env.init();
        let token = env.run_stdin(&["encrypt"], b"from rust").ok().stdout_str();
        let snapshot = env.run(&["keyring", "export"]).ok().stdout_str();
        let root = env.root_key();
        let script = r#"
import json, sys
from cryptography.fernet import Fernet
root, snapshot, token = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
data = [k for k in snapshot["keys"] if k["purpose"] == "data" and k["state"] == "active"][0]
data_key = Fernet(root.encode()).decrypt(data["wrapped"].encode())
f = Fernet(data_key)
assert f.decrypt(token.strip().encode()) == b"from rust"
print(f.encrypt(b"from python").decode())
"#;
        let py_token = run_python(&py, script, &[&root, &snapshot, &token]);
        let out = env.run_stdin(&["decrypt"], py_token.as_bytes()).ok();
        assert_eq!(out.stdout, b"from python");
    }
);

both_backends!(
    no_key_material_or_plaintext_reaches_disk_database_or_logs,
    |env| {
        env.set_env("KEYWARDEN_LOG", "trace");
        let mut logs = String::new();
        let mut record = |r: Run| {
            logs.push_str(&r.stderr);
            logs.push_str(&r.stdout_str());
        };
        record(env.run(&["init"]));
        let plaintext = "PLAINTEXT-CANARY-6f1d2c";
        record(env.run_stdin(&["secrets", "put", "canary"], plaintext.as_bytes()));
        let token = env
            .run_stdin(&["encrypt"], plaintext.as_bytes())
            .ok()
            .stdout_str();
        // decrypt's stdout is the plaintext by design: only its stderr counts.
        let mut dec = env.run_stdin(&["decrypt"], token.as_bytes()).ok();
        assert_eq!(dec.stdout, plaintext.as_bytes());
        dec.stdout.clear();
        record(dec);
        record(env.run(&["keys", "rotate", "data"]));
        record(env.run(&["keys", "rotate", "signing"]));
        record(env.run(&["keys", "list"]));
        record(env.run(&["status", "--json"]));
        record(env.run(&["secrets", "list"]));
        record(env.run(&["jwks"]));
        record(env.run(&["config", "show"]));
        let snapshot = env.run(&["keyring", "export"]).ok();
        record(env.run(&["decrypt"]));
        let snapshot = snapshot.json();

        // Unwrap every key to learn the bytes we must never find.
        let root = env.root_key();
        let mut needles: Vec<Vec<u8>> =
            vec![root.as_bytes().to_vec(), plaintext.as_bytes().to_vec()];
        use base64::Engine;
        let root_raw = base64::engine::general_purpose::URL_SAFE
            .decode(&root)
            .unwrap();
        needles.push(root_raw.clone());
        let roots = keywarden::crypto::rootkey::RootKeys::parse_list(&root, "test").unwrap();
        for k in snapshot["keys"].as_array().unwrap() {
            let Some(w) = k["wrapped"].as_str() else {
                continue;
            };
            let material = roots.newest().fernet().decrypt(w).unwrap();
            needles.push(material.to_vec());
            if k["purpose"] == "data" {
                let raw = base64::engine::general_purpose::URL_SAFE
                    .decode(&*material)
                    .unwrap();
                needles.push(raw);
            }
        }
        // Every file in the data directory except the root key file itself.
        let mut haystacks: Vec<(String, Vec<u8>)> = vec![("logs".into(), logs.into_bytes())];
        for entry in walk(&env.data_dir()) {
            if entry.file_name().unwrap() == "root.key" {
                continue;
            }
            haystacks.push((entry.display().to_string(), std::fs::read(&entry).unwrap()));
        }
        if let Some(url) = &env.database_url {
            haystacks.push(("postgres dump".into(), dump_postgres(url)));
        }
        for (name, hay) in &haystacks {
            for needle in &needles {
                assert!(
                    !contains(hay, needle),
                    "{name} contains key material or plaintext ({} bytes)",
                    needle.len()
                );
            }
        }
    }
);

pub(crate) fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Every row of every table, as text.
pub(crate) fn dump_postgres(url: &str) -> Vec<u8> {
    rt().block_on(async {
        use sqlx::{Connection, Row};
        let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
        let tables: Vec<String> = sqlx::query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect();
        let mut out = Vec::new();
        for t in tables {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT row_to_json(t)::text FROM \"{t}\" t"
            )))
            .fetch_all(&mut conn)
            .await
            .unwrap();
            for r in rows {
                out.extend_from_slice(r.get::<String, _>(0).as_bytes());
                out.push(b'\n');
            }
        }
        out
    })
}
