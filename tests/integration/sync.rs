//! Sync through Redis: the outbox publisher, `KeyringCache`, lost messages,
//! Redis outages, the Python example and Redis Cluster.
//!
//! Tests on the shared test Redis (`KEYWARDEN_TEST_REDIS_URL`) each take
//! their own database number (1..=15) and flush it first. Tests that stop
//! Redis or kill its clients start a private `redis-server` on a free port.
//! Pub/sub channels are server-wide, so a subscriber may see another test's
//! events: harmless, as subscribers act on the epoch in their own database.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use keywarden::crypto::rootkey::RootKeys;
use keywarden::sync::{CacheOptions, KeyringCache};

use crate::both_backends;
use crate::support::*;

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// A fresh database on the shared test Redis, or `None` (skip) outside CI.
fn redis_db() -> Option<String> {
    let base = match std::env::var("KEYWARDEN_TEST_REDIS_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("KEYWARDEN_TEST_REDIS_URL must be set in CI");
            }
            eprintln!("skipping: KEYWARDEN_TEST_REDIS_URL is not set");
            return None;
        }
    };
    let n = NEXT_DB.fetch_add(1, Ordering::SeqCst) % 15 + 1;
    let url = format!("{}/{n}", base.trim_end_matches('/'));
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let _: () = redis::cmd("FLUSHDB").query(&mut conn).unwrap();
    Some(url)
}

/// A multi-threaded runtime: caches keep running while the test blocks on
/// a command.
fn rt_mt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn get<T: redis::FromRedisValue>(url: &str, cmd: &mut redis::Cmd) -> T {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_connection().unwrap();
    cmd.query(&mut conn).unwrap()
}

fn roots_of(env: &Env) -> RootKeys {
    RootKeys::parse_list(&env.root_key(), "test root key").unwrap()
}

fn store_epoch(env: &Env) -> i64 {
    env.run(&["keyring", "export"]).ok().json()["epoch"]
        .as_i64()
        .unwrap()
}

/// Collects events from the channel in a background thread.
fn collect_events(url: &str) -> std::sync::mpsc::Receiver<serde_json::Value> {
    let (tx, rx) = std::sync::mpsc::channel();
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_connection().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ps = conn.as_pubsub();
        ps.subscribe("keywarden:events").unwrap();
        ready_tx.send(()).unwrap();
        while let Ok(msg) = ps.get_message() {
            let payload: String = msg.get_payload().unwrap();
            if tx.send(serde_json::from_str(&payload).unwrap()).is_err() {
                return;
            }
        }
    });
    ready_rx.recv().unwrap();
    rx
}

both_backends!(a_rotation_publishes_snapshot_epoch_and_events, |env| {
    let Some(url) = redis_db() else { return };
    env.set_env("KEYWARDEN_REDIS_URL", &url);
    env.init();
    let epoch0: i64 = get::<String>(&url, redis::cmd("GET").arg("keywarden:epoch"))
        .parse()
        .unwrap();
    assert_eq!(epoch0, store_epoch(&env));
    let events = collect_events(&url);
    let out = env.run(&["keys", "rotate", "data", "--json"]).ok().json();
    let new_kid = out["new_kid"].as_str().unwrap().to_string();
    let epoch = out["epoch"].as_i64().unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let e = events.recv_timeout(Duration::from_secs(5)).unwrap();
        if e["kid"] == new_kid.as_str() || e["kid"] == out["old_kid"] {
            seen.push(e);
        }
    }
    for e in &seen {
        for f in ["epoch", "action", "kid", "purpose", "published_at"] {
            assert!(e.get(f).is_some(), "event lacks {f}: {e}");
        }
        assert_eq!(e["epoch"].as_i64(), Some(epoch));
        assert_eq!(e["purpose"], "data");
    }
    let actions: Vec<&str> = seen.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["demote", "activate"]);
    let redis_epoch: String = get(&url, redis::cmd("GET").arg("keywarden:epoch"));
    assert_eq!(redis_epoch, epoch.to_string());
    let snapshot: String = get(&url, redis::cmd("GET").arg("keywarden:keyring"));
    let snapshot: serde_json::Value = serde_json::from_str(&snapshot).unwrap();
    let export = env.run(&["keyring", "export"]).ok().json();
    assert_eq!(snapshot, export);
    let published: BTreeMap<i64, i64> = get(&url, redis::cmd("HGETALL").arg("keywarden:published"));
    assert!(published.contains_key(&epoch));
    let status = env.run(&["status", "--json"]).ok().json();
    assert_eq!(status["outbox_backlog"], 0);
    assert_eq!(status["sync"]["reachable"], true);
    assert_eq!(status["sync"]["redis_epoch"].as_i64(), Some(epoch));
});

both_backends!(
    outbox_waits_while_redis_is_down_then_drains_in_order,
    |env| {
        let Some(url) = redis_db() else { return };
        // A closed port: connection refused at once.
        let closed = format!("redis://127.0.0.1:{}/", free_port());
        env.set_env("KEYWARDEN_REDIS_URL", &closed);
        env.init();
        for purpose in ["data", "temp", "signing", "data"] {
            let r = env.run(&["keys", "rotate", purpose]).ok();
            assert!(r.stderr.contains("wait in the outbox"), "{}", r.stderr);
        }
        let status = env.run(&["status", "--json"]).ok().json();
        let backlog = status["outbox_backlog"].as_i64().unwrap();
        assert_eq!(
            backlog,
            4 + 4 * 2,
            "4 first keys, then 4 rotations of 2 events"
        );
        assert_eq!(status["sync"]["reachable"], false);
        assert!(status["sync"]["outbox"]["oldest_created_at"].is_string());
        let human = env.run(&["sync", "status"]).ok();
        assert!(
            human.stdout_str().contains("12 events waiting"),
            "{}",
            human.stdout_str()
        );

        env.set_env("KEYWARDEN_REDIS_URL", &url);
        let events = collect_events(&url);
        let out = env.run(&["sync", "publish", "--json"]).ok().json();
        assert_eq!(out["published"].as_i64(), Some(backlog));
        assert_eq!(out["waiting"], 0);
        // Other tests publish on the same server-wide channel: keep ours.
        let kids: Vec<serde_json::Value> = env
            .run(&["keys", "list", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].clone())
            .collect();
        let mut epochs = Vec::new();
        while epochs.len() < backlog as usize {
            let e = events.recv_timeout(Duration::from_secs(5)).unwrap();
            if kids.contains(&e["kid"]) {
                epochs.push(e["epoch"].as_i64().unwrap());
            }
        }
        assert!(
            epochs.windows(2).all(|w| w[0] <= w[1]),
            "out of order: {epochs:?}"
        );
        let epoch = store_epoch(&env);
        assert_eq!(*epochs.last().unwrap(), epoch);
        let redis_epoch: String = get(&url, redis::cmd("GET").arg("keywarden:epoch"));
        assert_eq!(redis_epoch, epoch.to_string());
        let status = env.run(&["sync", "status", "--json"]).ok().json();
        assert_eq!(status["outbox"]["events"], 0);
    }
);

both_backends!(keyring_cache_follows_rotations_and_acknowledges, |env| {
    let Some(url) = redis_db() else { return };
    env.set_env("KEYWARDEN_REDIS_URL", &url);
    env.init();
    let rt = rt_mt();
    let opts = CacheOptions::new(url.clone(), roots_of(&env))
        .poll_interval(Duration::from_millis(500))
        .instance_id("app-1");
    let cache = rt.block_on(KeyringCache::connect(opts)).unwrap();
    assert_eq!(cache.epoch(), store_epoch(&env));
    let before = cache.encrypt(b"before").unwrap();
    assert_eq!(
        env.run_stdin(&["decrypt"], before.as_bytes()).ok().stdout,
        b"before"
    );
    let hs = cache.signing_keys();
    assert_eq!(hs.len(), 1, "one signing key before the rotation");
    assert_eq!(hs[0].alg.as_str(), "HS256");
    assert!(!format!("{:?}", hs[0]).contains(&format!("{:?}", hs[0].material.expose())));

    // A token signed before a signing-key rotation verifies in the cache
    // before and after it; one signed after carries the new kid.
    let opts = || keywarden::crypto::jose::VerifyOptions::new(chrono::Utc::now().timestamp());
    let old_token = env.run(&["token", "sign"]).ok().stdout_str();
    assert!(
        cache
            .verify_token(old_token.trim(), &opts())
            .unwrap()
            .is_ok()
    );
    let sig = env
        .run(&["keys", "rotate", "signing", "--json"])
        .ok()
        .json();
    assert!(
        rt.block_on(cache.wait_for_epoch(sig["epoch"].as_i64().unwrap(), Duration::from_secs(3)))
    );
    let verified = cache
        .verify_token(old_token.trim(), &opts())
        .unwrap()
        .unwrap();
    assert_eq!(&*verified.kid, sig["old_kid"].as_str().unwrap());
    let new_token = env.run(&["token", "sign"]).ok().stdout_str();
    let verified = cache
        .verify_token(new_token.trim(), &opts())
        .unwrap()
        .unwrap();
    assert_eq!(&*verified.kid, sig["new_kid"].as_str().unwrap());
    // Those verifications were counted; start the counters below afresh.
    rt.block_on(cache.flush_verifications()).unwrap();
    let stale: Vec<String> = get(&url, redis::cmd("KEYS").arg("keywarden:verify:*"));
    for k in stale {
        let _: i64 = get(&url, redis::cmd("DEL").arg(k));
    }

    let out = env.run(&["keys", "rotate", "data", "--json"]).ok().json();
    let epoch = out["epoch"].as_i64().unwrap();
    assert!(rt.block_on(cache.wait_for_epoch(epoch, Duration::from_secs(3))));
    let keyring = cache.keyring();
    assert_eq!(
        keyring
            .active(keywarden::keyring::Purpose::Data)
            .unwrap()
            .kid,
        out["new_kid"].as_str().unwrap()
    );
    assert_eq!(&*cache.decrypt(&before).unwrap(), b"before");
    let after = cache.encrypt(b"after").unwrap();
    assert_eq!(
        env.run_stdin(&["decrypt"], after.as_bytes()).ok().stdout,
        b"after"
    );
    let cli_token = env.run_stdin(&["encrypt"], b"from cli").ok().stdout_str();
    assert_eq!(&*cache.decrypt(cli_token.trim()).unwrap(), b"from cli");

    // Acknowledged, and measured by `sync status`.
    let acks: BTreeMap<String, String> = get(&url, redis::cmd("HGETALL").arg("keywarden:acks"));
    let ack: serde_json::Value = serde_json::from_str(&acks["app-1"]).unwrap();
    assert_eq!(ack["epoch"].as_i64(), Some(epoch));
    assert!(ack["at"].is_string());
    let status = env.run(&["sync", "status", "--json"]).ok().json();
    let me = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["instance"] == "app-1")
        .unwrap()
        .clone();
    assert_eq!(me["behind"], false);
    assert!(me["lag_ms"].as_i64().unwrap() < 3000, "{me}");
    assert!(status["behind"].as_array().unwrap().is_empty());

    // Verification counts reach Redis per minute.
    cache.record_verification(true, "");
    cache.record_verification(false, "expired");
    cache.record_verification(false, "bad signature");
    rt.block_on(cache.flush_verifications()).unwrap();
    let keys: Vec<String> = get(&url, redis::cmd("KEYS").arg("keywarden:verify:*"));
    assert_eq!(keys.len(), 1, "{keys:?}");
    let counts: BTreeMap<String, i64> = get(&url, redis::cmd("HGETALL").arg(&keys[0]));
    assert_eq!(counts["ok"], 1);
    assert_eq!(counts["fail"], 2);
    assert_eq!(counts["fail:expired"], 1);
    assert_eq!(counts["fail:bad_signature"], 1);
    let ttl: i64 = get(&url, redis::cmd("TTL").arg(&keys[0]));
    assert!(ttl > 0);
    let app = rt.block_on(open_app(&env, &url));
    let summed = rt
        .block_on(keywarden::sync::verification_counts(
            &app,
            chrono::Utc::now(),
            5,
        ))
        .unwrap()
        .unwrap();
    assert_eq!((summed.ok, summed.fail), (1, 2));
    assert_eq!(summed.by_reason["expired"], 1);
    assert!((summed.failure_rate() - 2.0 / 3.0).abs() < 1e-9);
    rt.block_on(cache.close());
});

#[test]
fn a_keyring_cache_refuses_a_snapshot_it_cannot_unwrap() {
    let Some(url) = redis_db() else { return };
    let mut env = Env::new(Backend::Sqlite).unwrap();
    env.set_env("KEYWARDEN_REDIS_URL", &url);
    env.init();
    let wrong = RootKeys::new(vec![keywarden::crypto::rootkey::RootKey::generate()]);
    let err = rt_mt()
        .block_on(KeyringCache::connect(CacheOptions::new(url, wrong)))
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("not among the root keys"),
        "{err:#}"
    );
}

#[test]
fn dropped_pubsub_messages_are_recovered_within_one_poll_interval() {
    let Some(redis) = PrivateRedis::start() else {
        return;
    };
    let mut env = Env::new(Backend::Sqlite).unwrap();
    env.set_env("KEYWARDEN_REDIS_URL", &redis.url());
    env.init();
    let rt = rt_mt();
    let poll = Duration::from_millis(1000);
    let cache = rt
        .block_on(KeyringCache::connect(
            CacheOptions::new(redis.url(), roots_of(&env)).poll_interval(poll),
        ))
        .unwrap();
    let polling_only = rt
        .block_on(KeyringCache::connect(
            CacheOptions::new(redis.url(), roots_of(&env))
                .poll_interval(poll)
                .subscribe(false),
        ))
        .unwrap();
    for round in 0..3 {
        // Drop every subscriber connection, then change keys at once: the
        // event is lost for the dropped subscriber.
        let killed: i64 = get(
            &redis.url(),
            redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"),
        );
        assert!(killed >= 1 || round > 0, "no pubsub client to kill");
        let out = env.run(&["keys", "rotate", "temp", "--json"]).ok().json();
        let epoch = out["epoch"].as_i64().unwrap();
        let started = Instant::now();
        let limit = poll + Duration::from_millis(900);
        assert!(
            rt.block_on(cache.wait_for_epoch(epoch, limit)),
            "round {round}: not recovered within {limit:?}"
        );
        assert!(
            rt.block_on(polling_only.wait_for_epoch(epoch, limit)),
            "round {round}: polling alone did not catch up within {limit:?}"
        );
        eprintln!("round {round}: recovered in {:?}", started.elapsed());
    }
    assert!(cache.stats().reconnects >= 1, "{:?}", cache.stats());
}

#[test]
fn rotations_survive_a_redis_outage_and_every_instance_converges_in_order() {
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    let mut env = Env::new(Backend::Sqlite).unwrap();
    env.set_env("KEYWARDEN_REDIS_URL", &redis.url());
    env.init();
    let rt = rt_mt();
    let poll = Duration::from_millis(1000);
    let caches: Vec<KeyringCache> = (0..5)
        .map(|i| {
            rt.block_on(KeyringCache::connect(
                CacheOptions::new(redis.url(), roots_of(&env))
                    .poll_interval(poll)
                    .instance_id(format!("fault-{i}")),
            ))
            .unwrap()
        })
        .collect();
    // The worker's publisher, in process.
    let app = rt.block_on(open_app(&env, &redis.url()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let publisher = rt.spawn(keywarden::sync::run_publisher(
        std::sync::Arc::new(app),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let mut tokens = vec![(caches[0].encrypt(b"before").unwrap(), "before".to_string())];
    let sign = |env: &Env| {
        env.run(&["token", "sign"])
            .ok()
            .stdout_str()
            .trim()
            .to_string()
    };
    let mut signed = vec![sign(&env)];

    // CI-sized by default; KEYWARDEN_FAULT_OUTAGE_SECS=30 is the full size.
    let outage_len = Duration::from_secs(
        std::env::var("KEYWARDEN_FAULT_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    );
    redis.down();
    let outage = Instant::now();
    let mut i = 0;
    while outage.elapsed() < outage_len {
        let purpose = ["data", "signing", "temp"][i % 3];
        env.run(&["keys", "rotate", purpose]).ok();
        // Apps keep working on the keyring they hold.
        let text = format!("during-{i}");
        tokens.push((caches[i % 5].encrypt(text.as_bytes()).unwrap(), text));
        signed.push(sign(&env));
        i += 1;
    }
    let latest = store_epoch(&env);
    let waiting = env.run(&["status", "--json"]).ok().json()["outbox_backlog"]
        .as_i64()
        .unwrap();
    assert!(
        waiting >= 2 * i as i64,
        "{waiting} events waiting after {i} rotations"
    );

    // Redis comes back empty (no persistence): the publisher drains the
    // outbox in order and puts the snapshot back.
    redis.up();
    let events = collect_events(&redis.url());
    let back = Instant::now();
    for c in &caches {
        let left = (poll + Duration::from_secs(5)).saturating_sub(back.elapsed());
        assert!(
            rt.block_on(c.wait_for_epoch(latest, left)),
            "{} did not converge within one poll interval + 5 s",
            c.instance_id()
        );
    }
    eprintln!(
        "{i} rotations during a {outage_len:?} outage; all converged {:?} after Redis returned",
        back.elapsed()
    );
    let mut epochs: Vec<i64> = Vec::new();
    while let Ok(e) = events.recv_timeout(Duration::from_millis(300)) {
        epochs.push(e["epoch"].as_i64().unwrap());
    }
    assert!(
        epochs.windows(2).all(|w| w[0] <= w[1]),
        "out of order: {epochs:?}"
    );
    let status = env.run(&["status", "--json"]).ok().json();
    assert_eq!(status["outbox_backlog"], 0);
    tokens.push((caches[1].encrypt(b"after").unwrap(), "after".to_string()));
    for (token, text) in &tokens {
        for c in &caches {
            assert_eq!(&*c.decrypt(token).unwrap(), text.as_bytes());
        }
        assert_eq!(
            env.run_stdin(&["decrypt"], token.as_bytes()).ok().stdout,
            text.as_bytes()
        );
    }
    // Tokens signed before, during and after the outage verify in every
    // instance (their keys are active or retiring within their grace).
    signed.push(sign(&env));
    let opts = keywarden::crypto::jose::VerifyOptions::new(chrono::Utc::now().timestamp());
    for token in &signed {
        for c in &caches {
            let v = c.verify_token(token, &opts).unwrap();
            assert!(v.is_ok(), "{}: {v:?}", c.instance_id());
        }
        env.run(&["token", "verify", token]).ok();
    }
    let _ = stop_tx.send(());
    rt.block_on(publisher).unwrap();
}

/// Opens the env's keyring in process, as the worker would.
async fn open_app(env: &Env, redis_url: &str) -> keywarden::app::App {
    let mut config = keywarden::config::Config::default();
    config.redis.url = keywarden::config::SecretString::new(redis_url);
    let data_dir = env.data_dir();
    let paths = keywarden::app::Paths {
        database_url: env
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("keywarden.db").display())),
        key_file: data_dir.join("root.key"),
        data_dir,
    };
    keywarden::app::App::open(config, paths, keywarden::app::OpenMode::Existing)
        .await
        .unwrap()
}

#[test]
fn the_python_example_follows_a_rotation_end_to_end() {
    // A server of its own: pub/sub channels are not per database, so on the
    // shared server another test's events would reach this subscriber.
    let Some(redis) = PrivateRedis::start() else {
        return;
    };
    let url = redis.url();
    let Some(py) = python() else { return };
    let mut env = Env::new(Backend::Sqlite).unwrap();
    env.set_env("KEYWARDEN_REDIS_URL", &url);
    env.init();
    let before = env.run_stdin(&["encrypt"], b"before").ok().stdout_str();
    let epoch = store_epoch(&env);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python_subscriber.py");
    let mut child = Command::new(py)
        .arg(script)
        .args(["--redis-url", &url, "--root-key", &env.root_key()])
        .args(["--instance-id", "python-1", "--poll-interval", "0.5"])
        .args(["--until-epoch", &(epoch + 1).to_string(), "--timeout", "20"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = child.stderr.take().unwrap();
    // The next line the script prints, or a failure that shows its stderr.
    let mut next_line = move || -> serde_json::Value {
        match stdout.next() {
            Some(Ok(line)) => serde_json::from_str(&line).unwrap(),
            _ => {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
                panic!("the Python subscriber printed nothing more; its stderr:\n{err}");
            }
        }
    };
    let first = next_line();
    assert_eq!(first["epoch"].as_i64(), Some(epoch));
    let out = env.run(&["keys", "rotate", "data", "--json"]).ok().json();
    let after = env.run_stdin(&["encrypt"], b"after").ok().stdout_str();
    let second = next_line();
    assert_eq!(second["epoch"].as_i64(), Some(epoch + 1));
    assert_eq!(second["active"]["data"], out["new_kid"]);
    {
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{}", before.trim()).unwrap();
        writeln!(stdin, "{}", after.trim()).unwrap();
    }
    let last = next_line();
    assert_eq!(last["decrypted"], serde_json::json!(["before", "after"]));
    let status = child.wait().unwrap();
    assert!(status.success());
    let acks: BTreeMap<String, String> = get(&url, redis::cmd("HGETALL").arg("keywarden:acks"));
    let ack: serde_json::Value = serde_json::from_str(&acks["python-1"]).unwrap();
    assert_eq!(ack["epoch"].as_i64(), Some(epoch + 1));
}

/// The three-master cluster of scripts/test-services.sh, started once.
fn cluster_url() -> Option<String> {
    static STARTED: std::sync::Mutex<Option<bool>> = std::sync::Mutex::new(None);
    let mut started = STARTED.lock().unwrap();
    if started.is_none() {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-services.sh");
        let ok = Command::new("bash")
            .arg(script)
            .arg("start-cluster")
            .status()
            .is_ok_and(|s| s.success());
        *started = Some(ok);
    }
    if *started != Some(true) {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("the Redis Cluster did not start in CI");
        }
        eprintln!("skipping: cannot start the Redis Cluster");
        return None;
    }
    for port in [27001, 27002, 27003] {
        let url = format!("redis://127.0.0.1:{port}/");
        let _: () = get(&url, &mut redis::cmd("FLUSHALL"));
    }
    Some("redis+cluster://127.0.0.1:27001,127.0.0.1:27002,127.0.0.1:27003".into())
}

#[test]
fn a_redis_cluster_carries_events_snapshot_and_subscriptions() {
    let Some(url) = cluster_url() else { return };
    let mut env = Env::new(Backend::Sqlite).unwrap();
    env.set_env("KEYWARDEN_REDIS_URL", &url);
    env.init();
    let rt = rt_mt();
    let cache = rt
        .block_on(KeyringCache::connect(
            CacheOptions::new(url.clone(), roots_of(&env))
                .poll_interval(Duration::from_secs(5))
                .instance_id("cluster-app"),
        ))
        .unwrap();
    // A plain subscriber on one node sees events published through the cluster.
    let events = rt.block_on(async {
        let client = redis::Client::open("redis://127.0.0.1:27002/").unwrap();
        let mut ps = client.get_async_pubsub().await.unwrap();
        ps.subscribe("keywarden:events").await.unwrap();
        ps
    });
    let out = env.run(&["keys", "rotate", "data", "--json"]).ok().json();
    let epoch = out["epoch"].as_i64().unwrap();
    // Within well under the 5 s poll: the subscription carried it.
    let t = Instant::now();
    assert!(rt.block_on(cache.wait_for_epoch(epoch, Duration::from_secs(3))));
    assert!(t.elapsed() < Duration::from_secs(3));
    let mut stream = events.into_on_message();
    let msg = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(3), stream.next()).await })
        .unwrap()
        .unwrap();
    let event: serde_json::Value =
        serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap();
    assert_eq!(event["epoch"].as_i64(), Some(epoch));
    let token = cache.encrypt(b"on a cluster").unwrap();
    assert_eq!(
        env.run_stdin(&["decrypt"], token.as_bytes()).ok().stdout,
        b"on a cluster"
    );
    let status = env.run(&["sync", "status", "--json"]).ok().json();
    assert_eq!(status["reachable"], true, "{status}");
    assert_eq!(status["redis_epoch"].as_i64(), Some(epoch));
    assert!(
        status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["instance"] == "cluster-app")
    );
}

#[test]
fn concurrent_publishers_keep_events_in_order_and_never_lower_the_epoch() {
    let Some(url) = redis_db() else { return };
    let mut env = Env::new(Backend::Sqlite).unwrap();
    // The commands themselves cannot publish: only the three publishers do.
    env.set_env(
        "KEYWARDEN_REDIS_URL",
        &format!("redis://127.0.0.1:{}/", free_port()),
    );
    env.init();
    let rt = rt_mt();
    let events = collect_events(&url);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishers: Vec<_> = (0..3)
        .map(|_| {
            let app = rt.block_on(open_app(&env, &url));
            let stop = stop.clone();
            rt.spawn(async move {
                let mut total = 0;
                while !stop.load(Ordering::SeqCst) {
                    total += keywarden::sync::publish_pending(&app).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                total += keywarden::sync::publish_pending(&app).await.unwrap();
                total
            })
        })
        .collect();
    for purpose in ["data", "temp", "signing", "data", "temp", "data"] {
        env.run(&["keys", "rotate", purpose]).ok();
    }
    stop.store(true, Ordering::SeqCst);
    let published: usize = publishers
        .into_iter()
        .map(|p| rt.block_on(p).unwrap())
        .sum();
    assert_eq!(published, 4 + 6 * 2, "each event published once");
    let kids: Vec<serde_json::Value> = env
        .run(&["keys", "list", "--json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].clone())
        .collect();
    let mut epochs = Vec::new();
    while epochs.len() < published {
        let e = events.recv_timeout(Duration::from_secs(5)).unwrap();
        if kids.contains(&e["kid"]) {
            epochs.push(e["epoch"].as_i64().unwrap());
        }
    }
    assert!(
        epochs.windows(2).all(|w| w[0] <= w[1]),
        "out of order: {epochs:?}"
    );
    let epoch = store_epoch(&env);
    let in_redis: String = get(&url, redis::cmd("GET").arg("keywarden:epoch"));
    assert_eq!(in_redis, epoch.to_string());
    // A stale publisher's writes cannot move the epoch or snapshot back.
    let app = rt.block_on(open_app(&env, &url));
    let mut old = rt.block_on(app.snapshot()).unwrap();
    old.epoch = 1;
    let doc = serde_json::to_string(&old).unwrap();
    let target = keywarden::sync::RedisTarget::parse(&url).unwrap();
    rt.block_on(async {
        let mut c = target.connect().await.unwrap();
        let _: i64 = c
            .query(
                redis::cmd("EVAL")
                    .arg(keywarden::sync::SET_IF_GREATER)
                    .arg(1)
                    .arg("keywarden:epoch")
                    .arg(1),
            )
            .await
            .unwrap();
        let _: i64 = c
            .query(
                redis::cmd("EVAL")
                    .arg(keywarden::sync::SET_SNAPSHOT_IF_NOT_OLDER)
                    .arg(1)
                    .arg("keywarden:keyring")
                    .arg(doc)
                    .arg(1),
            )
            .await
            .unwrap();
    });
    let in_redis: String = get(&url, redis::cmd("GET").arg("keywarden:epoch"));
    assert_eq!(in_redis, epoch.to_string());
    let snap: String = get(&url, redis::cmd("GET").arg("keywarden:keyring"));
    let snap: serde_json::Value = serde_json::from_str(&snap).unwrap();
    assert_eq!(snap["epoch"].as_i64(), Some(epoch));
}
