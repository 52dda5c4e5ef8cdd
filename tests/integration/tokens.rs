//! Tokens and API keys through the binary: every signing algorithm, JWE,
//! rotation without downtime, revocation, API keys, and interop with PyJWT
//! and jwcrypto in both directions.

use std::path::PathBuf;

use crate::both_backends;
use crate::support::*;

const ALGS: [&str; 4] = ["HS256", "RS256", "ES256", "EdDSA"];

fn with_alg(mut env: Env, alg: &str) -> Env {
    env.set_env("KEYWARDEN_POLICY__SIGNING__ALGORITHM", alg);
    env.init();
    env
}

fn interop_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/jose_interop.py")
}

fn py(py: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(py)
        .arg(interop_script())
        .args(args)
        .output()
        .unwrap()
}

both_backends!(
    every_algorithm_signs_and_verifies_and_tampering_is_caught,
    |env| {
        for alg in ALGS {
            let env = with_alg(Env::new(env.backend).unwrap(), alg);
            let token = env
                .run(&["token", "sign", "--claims", r#"{"sub":"alice"}"#])
                .ok()
                .stdout_str();
            let token = token.trim();
            let out = env.run(&["token", "verify", token, "--json"]).ok().json();
            assert_eq!(out["valid"], true, "{alg}");
            assert_eq!(out["alg"], alg);
            assert_eq!(out["claims"]["sub"], "alice");
            for c in ["iat", "exp", "jti"] {
                assert!(out["claims"].get(c).is_some(), "{alg}: {c}");
            }
            // Flip one character in the middle of the signature (the last
            // character may carry only padding bits).
            let sig_start = token.rfind('.').unwrap() + 1;
            let i = sig_start + (token.len() - sig_start) / 2;
            let mut t = token.as_bytes().to_vec();
            t[i] = if t[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(t).unwrap();
            let out = env.run(&["token", "verify", &t, "--json"]).code(3).json();
            assert_eq!(out["valid"], false);
            assert_eq!(out["error"]["code"], "bad_signature", "{alg}");
            let jwks = env.run(&["jwks"]).ok().json();
            let keys = jwks["keys"].as_array().unwrap();
            if alg == "HS256" {
                assert!(keys.is_empty(), "an HMAC secret must never be in the JWKS");
            } else {
                assert_eq!(keys.len(), 1);
                assert_eq!(keys[0]["alg"], alg);
                assert!(keys[0].get("d").is_none(), "private part in JWKS");
            }
        }
        drop(env);
    }
);

both_backends!(tokens_keep_verifying_across_a_signing_key_rotation, |env| {
    env.init();
    let old = env.run(&["token", "sign"]).ok().stdout_str();
    let rot = env
        .run(&["keys", "rotate", "signing", "--json"])
        .ok()
        .json();
    let new = env.run(&["token", "sign", "--json"]).ok().json();
    assert_eq!(new["kid"], rot["new_kid"]);
    let out = env
        .run(&["token", "verify", old.trim(), "--json"])
        .ok()
        .json();
    assert_eq!(
        out["kid"], rot["old_kid"],
        "the retiring key still verifies"
    );
    env.run(&["token", "verify", new["token"].as_str().unwrap()])
        .ok();
});

both_backends!(
    expired_wrong_audience_and_revoked_tokens_fail_with_their_reason,
    |env| {
        env.set_env("KEYWARDEN_TOKENS__LEEWAY", "0s");
        env.init();
        let t = env
            .run(&["token", "sign", "--claims", r#"{"exp": 1000}"#])
            .ok()
            .stdout_str();
        let out = env
            .run(&["token", "verify", t.trim(), "--json"])
            .code(3)
            .json();
        assert_eq!(out["error"]["code"], "expired");
        let t = env.run(&["token", "sign"]).ok().stdout_str();
        let out = env
            .run(&["token", "verify", t.trim(), "--aud", "billing", "--json"])
            .code(3)
            .json();
        assert_eq!(out["error"]["code"], "missing_claim");
        let r = env.run(&["token", "revoke", t.trim()]).ok();
        assert!(r.stdout_str().contains("revoked token"));
        let out = env
            .run(&["token", "verify", t.trim(), "--json"])
            .code(3)
            .json();
        assert_eq!(out["error"]["code"], "revoked");
        // A bare jti works too.
        let signed = env.run(&["token", "sign", "--json"]).ok().json();
        env.run(&["token", "revoke", signed["jti"].as_str().unwrap()])
            .ok();
        let out = env
            .run(&[
                "token",
                "verify",
                signed["token"].as_str().unwrap(),
                "--json",
            ])
            .code(3)
            .json();
        assert_eq!(out["error"]["code"], "revoked");
        // A forged token cannot be "revoked".
        env.run(&["token", "revoke", "a.b.c"]).code(2);
        let out = env
            .run(&["token", "verify", "not-a-token", "--json"])
            .code(3)
            .json();
        assert_eq!(out["error"]["code"], "malformed");
    }
);

both_backends!(jwe_tokens_round_trip_and_tampering_is_caught, |env| {
    env.init();
    let t = env
        .run(&["token", "encrypt", "--claims", r#"{"sub":"bob"}"#])
        .ok()
        .stdout_str();
    let t = t.trim();
    assert_eq!(t.split('.').count(), 5);
    assert_eq!(
        t.split('.').nth(1),
        Some(""),
        "dir has an empty encrypted key"
    );
    let out = env.run(&["token", "decrypt", t, "--json"]).ok().json();
    assert_eq!(out["claims"]["sub"], "bob");
    let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
    let ct = &mut parts[3];
    let c = ct.pop().unwrap();
    ct.push(if c == 'A' { 'B' } else { 'A' });
    let out = env
        .run(&["token", "decrypt", &parts.join("."), "--json"])
        .code(3)
        .json();
    assert_eq!(out["valid"], false);
});

both_backends!(
    api_keys_are_shown_once_stored_hashed_and_refused_with_distinct_reasons,
    |env| {
        env.init();
        let created = env
            .run(&[
                "apikey",
                "create",
                "--name",
                "ci",
                "--scopes",
                "jobs:run,keys:rotate",
                "--json",
            ])
            .ok()
            .json();
        let key = created["key"].as_str().unwrap().to_string();
        let id = created["id"].as_str().unwrap().to_string();
        assert!(key.starts_with(&format!("kw_{id}_")));
        let r = env.run_stdin(&["apikey", "verify"], key.as_bytes()).ok();
        assert_eq!(r.stdout_str().trim(), "jobs:run,keys:rotate");
        let list = env.run(&["apikey", "list", "--json"]).ok();
        assert!(
            !list.stdout_str().contains(&key[10..]),
            "list shows the key"
        );
        // A wrong secret with a real id is refused.
        let forged = format!("kw_{id}_{}", "A".repeat(43));
        let r = env
            .run_stdin(&["apikey", "verify"], forged.as_bytes())
            .code(3);
        assert!(r.stderr.contains("unknown API key"), "{}", r.stderr);
        env.run(&["apikey", "revoke", &id]).ok();
        let r = env.run_stdin(&["apikey", "verify"], key.as_bytes()).code(3);
        assert!(r.stderr.contains("revoked"), "{}", r.stderr);
        env.run(&["apikey", "revoke", &id]).code(2);
        let short = env
            .run(&[
                "apikey",
                "create",
                "--name",
                "tmp",
                "--scopes",
                "audit:read",
                "--ttl",
                "1s",
                "--json",
            ])
            .ok()
            .json();
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let r = env
            .run_stdin(
                &["apikey", "verify"],
                short["key"].as_str().unwrap().as_bytes(),
            )
            .code(3);
        assert!(r.stderr.contains("expired"), "{}", r.stderr);
        env.run_stdin(&["apikey", "verify"], b"nonsense").code(3);
    }
);

/// Key material of the active signing key, unwrapped from the export.
fn active_material(env: &Env, purpose: &str) -> (String, Vec<u8>) {
    let snap = env.run(&["keyring", "export"]).ok().json();
    let roots = keywarden::crypto::rootkey::RootKeys::parse_list(&env.root_key(), "t").unwrap();
    let k = snap["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["purpose"] == purpose && k["state"] == "active")
        .unwrap();
    let material = roots
        .newest()
        .fernet()
        .decrypt(k["wrapped"].as_str().unwrap())
        .unwrap();
    (k["kid"].as_str().unwrap().to_string(), material.to_vec())
}

#[test]
fn pyjwt_and_jwcrypto_verify_our_tokens_and_we_verify_theirs() {
    use base64::Engine;
    let Some(python) = python() else { return };
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    for alg in ALGS {
        let env = with_alg(Env::new(Backend::Sqlite).unwrap(), alg);
        let token = env
            .run(&["token", "sign", "--claims", r#"{"sub":"interop"}"#])
            .ok()
            .stdout_str();
        let (kid, material) = active_material(&env, "signing");
        let jwks_file = env.path().join("jwks.json");
        std::fs::write(&jwks_file, env.run(&["jwks"]).ok().stdout).unwrap();
        let secret = b64(&material);
        for lib in ["pyjwt", "jwcrypto"] {
            let mut args = vec!["verify-jws", "--lib", lib, "--token", token.trim()];
            if alg == "HS256" {
                args.extend(["--secret-b64", &secret]);
            } else {
                args.extend(["--jwks", jwks_file.to_str().unwrap()]);
            }
            let out = py(&python, &args);
            assert!(
                out.status.success(),
                "{alg}/{lib}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains("\"sub\":\"interop\""));
            // Python signs with the keyring's key; we verify.
            let exp = (chrono::Utc::now().timestamp() + 300).to_string();
            let claims = format!(r#"{{"sub":"from-python","exp":{exp}}}"#);
            let pem_file = env.path().join("key.pem");
            let mut args = vec![
                "sign-jws", "--lib", lib, "--alg", alg, "--kid", &kid, "--claims", &claims,
            ];
            if alg == "HS256" {
                args.extend(["--secret-b64", &secret]);
            } else {
                std::fs::write(&pem_file, &material).unwrap();
                args.extend(["--pem-file", pem_file.to_str().unwrap()]);
            }
            let out = py(&python, &args);
            assert!(
                out.status.success(),
                "{alg}/{lib}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let theirs = String::from_utf8(out.stdout).unwrap();
            let v = env
                .run(&["token", "verify", theirs.trim(), "--json"])
                .ok()
                .json();
            assert_eq!(v["claims"]["sub"], "from-python", "{alg}/{lib}");
        }
    }
}

#[test]
fn jwcrypto_reads_our_jwe_and_we_read_its() {
    use base64::Engine;
    let Some(python) = python() else { return };
    let env = Env::new(Backend::Sqlite).unwrap();
    env.init();
    let (kid, key) = active_material(&env, "token_encryption");
    let key_b64 = base64::engine::general_purpose::STANDARD.encode(&key);
    let ours = env
        .run(&["token", "encrypt", "--claims", r#"{"sub":"jwe"}"#])
        .ok()
        .stdout_str();
    let out = py(
        &python,
        &["jwe-decrypt", "--key-b64", &key_b64, "--token", ours.trim()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"sub\":\"jwe\""));
    let exp = (chrono::Utc::now().timestamp() + 300).to_string();
    let claims = format!(r#"{{"sub":"from-jwcrypto","exp":{exp}}}"#);
    let out = py(
        &python,
        &[
            "jwe-encrypt",
            "--key-b64",
            &key_b64,
            "--kid",
            &kid,
            "--claims",
            &claims,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = String::from_utf8(out.stdout).unwrap();
    let v = env
        .run(&["token", "decrypt", theirs.trim(), "--json"])
        .ok()
        .json();
    assert_eq!(v["claims"]["sub"], "from-jwcrypto");
}
