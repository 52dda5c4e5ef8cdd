//! Token throughput: keywarden's JWS/JWE layer beside the raw aws-lc-rs primitive, same run.
//!
//! For each signing algorithm this measures single-threaded sign and verify operations per
//! second through `keywarden::crypto::jose`, and the bare primitive on the same bytes (HMAC-SHA256
//! over the signing input; RSA, ECDSA or Ed25519 sign/verify alone), so the ratio reads as the
//! overhead of JOSE framing, JSON and claim checks. Two references sit beside them: the "floor"
//! (raw verify plus decoding and parsing the payload into `serde_json::Value`, the least work a
//! verifier that returns claims must do) and `jsonwebtoken::decode` with a prebuilt `DecodingKey`. The JWE rows compare `jwe::encrypt`/`decrypt` with a
//! bare AES-256-GCM seal/open of the same claims. The target is verify >= 80% of raw verify.
//!
//! Each figure is the best of several interleaved rounds, which damps noise from other processes
//! on a shared machine. `KEYWARDEN_BENCH_MS` (default 300) sets a round's length and
//! `KEYWARDEN_BENCH_ROUNDS` (default 5) the number of rounds. `KEYWARDEN_BENCH_ONLY` (for
//! example `HS256,JWE`) limits the rows, for profiling one of them.
//!
//! Run with `cargo bench --bench tokens`.

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{AES_256_GCM, Aad, Nonce, RandomizedNonceKey};
use aws_lc_rs::hmac;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, ED25519, EcdsaKeyPair,
    Ed25519KeyPair, KeyPair as _, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256,
    RsaKeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use keywarden::crypto::jose::{
    KeyUse, SigningAlg, SigningKey, VerifierSet, VerifyOptions, generate_signing_material,
    public_jwk,
};
use keywarden::crypto::jwe;
use serde_json::{Value, json};

/// One operation measured in interleaved rounds.
struct Op<'a> {
    run: Box<dyn FnMut() + 'a>,
    batch: u64,
    best: f64,
}

impl<'a> Op<'a> {
    fn new(mut run: impl FnMut() + 'a) -> Self {
        // Calibrate a batch of about a millisecond so that reading the clock costs nothing.
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_millis(20) {
            run();
            n += 1;
        }
        let per_op = start.elapsed().as_secs_f64() / n as f64;
        let batch = ((0.001 / per_op) as u64).max(1);
        Op {
            run: Box::new(run),
            batch,
            best: 0.0,
        }
    }

    fn round(&mut self, budget: Duration) {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < budget {
            for _ in 0..self.batch {
                (self.run)();
            }
            n += self.batch;
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        self.best = self.best.max(rate);
    }
}

/// Runs every op for `rounds` interleaved rounds and returns the best rate of each.
fn measure(ops: &mut [Op<'_>], rounds: u32, budget: Duration) -> Vec<f64> {
    for _ in 0..rounds {
        for op in ops.iter_mut() {
            op.round(budget);
        }
    }
    ops.iter().map(|op| op.best).collect()
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(pem).expect("PEM is ASCII");
    let body: String = text
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    STANDARD.decode(body).expect("PEM body is base64")
}

/// The raw primitive for one algorithm, keyed from the same material as keywarden's key.
enum Raw {
    Hmac(Box<hmac::Key>),
    Rsa(RsaKeyPair, ParsedPublicKey),
    Ec(EcdsaKeyPair, ParsedPublicKey),
    Ed(Ed25519KeyPair, ParsedPublicKey),
}

impl Raw {
    fn new(alg: SigningAlg, material: &[u8]) -> Raw {
        match alg {
            SigningAlg::HS256 => Raw::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA256, material))),
            SigningAlg::RS256 => {
                let pair = RsaKeyPair::from_pkcs8(&pem_to_der(material)).unwrap();
                let public =
                    ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, pair.public_key().as_ref())
                        .unwrap();
                Raw::Rsa(pair, public)
            }
            SigningAlg::ES256 => {
                let pair = EcdsaKeyPair::from_pkcs8(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    &pem_to_der(material),
                )
                .unwrap();
                let public =
                    ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, pair.public_key().as_ref())
                        .unwrap();
                Raw::Ec(pair, public)
            }
            SigningAlg::EdDSA => {
                let pair = Ed25519KeyPair::from_pkcs8(&pem_to_der(material)).unwrap();
                let public = ParsedPublicKey::new(&ED25519, pair.public_key().as_ref()).unwrap();
                Raw::Ed(pair, public)
            }
        }
    }

    fn sign(&self, rng: &SystemRandom, input: &[u8], out: &mut [u8]) -> usize {
        match self {
            Raw::Hmac(key) => {
                let tag = hmac::sign(key, input);
                out[..tag.as_ref().len()].copy_from_slice(tag.as_ref());
                tag.as_ref().len()
            }
            Raw::Rsa(pair, _) => {
                let len = pair.public_modulus_len();
                pair.sign(&RSA_PKCS1_SHA256, rng, input, &mut out[..len])
                    .unwrap();
                len
            }
            Raw::Ec(pair, _) => {
                let sig = pair.sign(rng, input).unwrap();
                out[..sig.as_ref().len()].copy_from_slice(sig.as_ref());
                sig.as_ref().len()
            }
            Raw::Ed(pair, _) => {
                let sig = pair.sign(input);
                out[..sig.as_ref().len()].copy_from_slice(sig.as_ref());
                sig.as_ref().len()
            }
        }
    }

    fn verify(&self, input: &[u8], sig: &[u8]) -> bool {
        match self {
            Raw::Hmac(key) => hmac::verify(key, input, sig).is_ok(),
            Raw::Rsa(_, public) | Raw::Ec(_, public) | Raw::Ed(_, public) => {
                public.verify_sig(input, sig).is_ok()
            }
        }
    }
}

fn jsonwebtoken_reference(
    alg: SigningAlg,
    kid: &str,
    material: &[u8],
) -> (jsonwebtoken::DecodingKey, jsonwebtoken::Validation) {
    let (key, jwt_alg) = match alg {
        SigningAlg::HS256 => (
            jsonwebtoken::DecodingKey::from_secret(material),
            jsonwebtoken::Algorithm::HS256,
        ),
        _ => {
            let jwk: jsonwebtoken::jwk::Jwk =
                serde_json::from_value(public_jwk(kid, alg, material).unwrap().unwrap()).unwrap();
            let jwt_alg = match alg {
                SigningAlg::RS256 => jsonwebtoken::Algorithm::RS256,
                SigningAlg::ES256 => jsonwebtoken::Algorithm::ES256,
                _ => jsonwebtoken::Algorithm::EdDSA,
            };
            (jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(), jwt_alg)
        }
    };
    // Same work as ours minus the clock: the claim checks stay in our code, as in the library.
    let mut validation = jsonwebtoken::Validation::new(jwt_alg);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    (key, validation)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it, as a quick smoke test of the same code paths.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let budget = Duration::from_millis(env_number(
        "KEYWARDEN_BENCH_MS",
        if smoke { 5 } else { 300 },
    ));
    let rounds = env_number("KEYWARDEN_BENCH_ROUNDS", if smoke { 1 } else { 5 }) as u32;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = json!({
        "iss": "keywarden", "sub": "user-1234", "aud": "api",
        "iat": now, "nbf": now, "exp": now + 900,
        "jti": "6f1c2f0e-8a51-4c1b-9d1e-0f4b8e2f6a11", "scope": "secrets:read",
    });
    let opts = VerifyOptions {
        issuer: Some("keywarden".into()),
        audience: Some("api".into()),
        ..VerifyOptions::new(now)
    };
    let rng = SystemRandom::new();

    println!(
        "single-threaded, best of {rounds} rounds x {} ms; ops/s (ratio = keywarden / raw)",
        budget.as_millis()
    );
    println!("floor = raw verify + base64url-decode + serde_json parse of the payload");
    println!(
        "{:<7} {:>10} {:>10} {:>6}  {:>10} {:>10} {:>6}  {:>10} {:>6}  {:>11} {:>6}",
        "alg",
        "sign",
        "raw sign",
        "ratio",
        "verify",
        "raw verify",
        "ratio",
        "floor",
        "/floor",
        "jwt::decode",
        "/raw"
    );
    let only = std::env::var("KEYWARDEN_BENCH_ONLY").unwrap_or_default();
    let selected = |name: &str| only.is_empty() || only.split(',').any(|n| n.trim() == name);
    let mut misses = Vec::new();
    for alg in SigningAlg::ALL
        .into_iter()
        .filter(|alg| selected(alg.as_str()))
    {
        let kid = format!("bench-{}", alg.as_str().to_lowercase());
        let material = generate_signing_material(alg);
        let signer = SigningKey::new(&kid, alg, &material).unwrap();
        let set = VerifierSet::new([(kid.clone(), alg, KeyUse::Active, &material[..])]).unwrap();
        let raw = Raw::new(alg, &material);
        let token = signer.sign(&claims).unwrap();
        let (input, sig_b64) = token.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig_b64).unwrap();
        let payload_b64 = input.split('.').nth(1).unwrap();
        assert!(set.verify(&token, &opts).is_ok() && raw.verify(input.as_bytes(), &sig));
        let (decoding_key, validation) = jsonwebtoken_reference(alg, &kid, &material);

        let mut out = vec![0u8; 1024];
        let mut ops = vec![
            Op::new(|| {
                black_box(signer.sign(black_box(&claims)).unwrap());
            }),
            Op::new(|| {
                black_box(raw.sign(&rng, black_box(input.as_bytes()), &mut out));
            }),
            Op::new(|| {
                black_box(set.verify(black_box(&token), &opts).unwrap());
            }),
            Op::new(|| {
                assert!(raw.verify(black_box(input.as_bytes()), black_box(&sig)));
            }),
            Op::new(|| {
                // The least any verifier that returns the claims as JSON must do.
                assert!(raw.verify(black_box(input.as_bytes()), black_box(&sig)));
                let payload = URL_SAFE_NO_PAD.decode(black_box(payload_b64)).unwrap();
                black_box(serde_json::from_slice::<Value>(&payload).unwrap());
            }),
            Op::new(|| {
                black_box(
                    jsonwebtoken::decode::<Value>(black_box(&token), &decoding_key, &validation)
                        .unwrap(),
                );
            }),
        ];
        let r = measure(&mut ops, rounds, budget);
        let verify_ratio = r[2] / r[3];
        if verify_ratio < 0.8 {
            misses.push(format!(
                "{} at {:.0}% (the floor alone is {:.0}% of raw)",
                alg.as_str(),
                100.0 * verify_ratio,
                100.0 * r[4] / r[3]
            ));
        }
        println!(
            "{:<7} {:>10.0} {:>10.0} {:>5.0}%  {:>10.0} {:>10.0} {:>5.0}%  {:>10.0} {:>5.0}%  {:>11.0} {:>5.0}%",
            alg.as_str(),
            r[0],
            r[1],
            100.0 * r[0] / r[1],
            r[2],
            r[3],
            100.0 * verify_ratio,
            r[4],
            100.0 * r[2] / r[4],
            r[5],
            100.0 * r[5] / r[3],
        );
    }

    if selected("JWE") {
        jwe_row(&claims, &opts, rounds, budget);
    }
    if smoke {
        // `cargo test` builds without optimisation and runs 5 ms rounds: the rows above show
        // the code paths work, not how fast they are.
        println!(
            "smoke run (test build, 5 ms rounds): not a measurement; run `cargo bench --bench tokens`"
        );
    } else if misses.is_empty() {
        println!("target verify >= 80% of raw verify: met for every signing alg measured");
    } else {
        println!(
            "target verify >= 80% of raw verify: missed by {}",
            misses.join(", ")
        );
    }
}

/// JWE: keywarden's framing against a bare AES-256-GCM seal/open of the same claims.
fn jwe_row(claims: &Value, opts: &VerifyOptions, rounds: u32, budget: Duration) {
    let claims = claims.clone();
    let opts = opts.clone();
    let key = generate_signing_material(SigningAlg::HS256);
    let lookup = |kid: &str| (kid == "enc-1").then_some((KeyUse::Active, &key[..]));
    let token = jwe::encrypt("enc-1", &key, &claims).unwrap();
    let plaintext = serde_json::to_vec(&claims).unwrap();
    let aead = RandomizedNonceKey::new(&AES_256_GCM, &key).unwrap();
    let aad = b"eyJhbGciOiJkaXIiLCJlbmMiOiJBMjU2R0NNIiwia2lkIjoiZW5jLTEiLCJ0eXAiOiJKV1QifQ";
    let mut sealed = plaintext.clone();
    let (nonce, tag) = aead
        .seal_in_place_separate_tag(Aad::from(aad), &mut sealed)
        .unwrap();
    let nonce_bytes = *nonce.as_ref();
    sealed.extend_from_slice(tag.as_ref());
    let mut seal_buf = plaintext.clone();
    let mut open_buf = sealed.clone();
    let mut ops = vec![
        Op::new(|| {
            black_box(jwe::encrypt("enc-1", &key, black_box(&claims)).unwrap());
        }),
        Op::new(|| {
            seal_buf.copy_from_slice(&plaintext);
            let sealed = aead.seal_in_place_separate_tag(Aad::from(aad), &mut seal_buf);
            let _tag = black_box(sealed.unwrap().1);
        }),
        Op::new(|| {
            black_box(jwe::decrypt_and_check(black_box(&token), lookup, &opts).unwrap());
        }),
        Op::new(|| {
            open_buf.copy_from_slice(&sealed);
            let nonce = Nonce::assume_unique_for_key(nonce_bytes);
            black_box(
                aead.open_in_place(nonce, Aad::from(aad), &mut open_buf)
                    .unwrap(),
            );
        }),
    ];
    let r = measure(&mut ops, rounds, budget);
    println!(
        "{:<7} {:>10.0} {:>10.0} {:>5.0}%  {:>10.0} {:>10.0} {:>5.0}%  (encrypt, decrypt+check vs AES-256-GCM)",
        "JWE",
        r[0],
        r[1],
        100.0 * r[0] / r[1],
        r[2],
        r[3],
        100.0 * r[2] / r[3],
    );
}
