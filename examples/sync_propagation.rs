//! Propagation benchmark (prints figures; not a test).
//!
//! N `KeyringCache` instances (tasks) follow one keyring through Redis while
//! R rotations happen; for every rotation and instance it measures the time
//! from the rotation's commit to the instance holding the new epoch, with
//! the publish done as a one-shot command does it (`publish_pending` right
//! after the commit, on a fresh connection).
//!
//! ```sh
//! cargo run --release --example sync_propagation -- \
//!     --redis redis://127.0.0.1:56379/15 --instances 50 --rotations 100
//! cargo run --release --example sync_propagation -- \
//!     --redis redis+cluster://127.0.0.1:27001,127.0.0.1:27002,127.0.0.1:27003
//! ```
//!
//! It deletes the keywarden keys in that Redis first: point it at a
//! scratch database.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use keywarden::app::{App, OpenMode, Paths};
use keywarden::keyring::Purpose;
use keywarden::sync::{CacheOptions, KeyringCache, RedisTarget, publish_pending};

struct Args {
    redis: String,
    instances: usize,
    rotations: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        redis: "redis://127.0.0.1:56379/15".into(),
        instances: 50,
        rotations: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--redis" => a.redis = value,
            "--instances" => a.instances = value.parse()?,
            "--rotations" => a.rotations = value.parse()?,
            _ => anyhow::bail!("unknown flag {flag} (--redis URL --instances N --rotations R)"),
        }
    }
    Ok(a)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let target = RedisTarget::parse(&args.redis)?;
    let mut conn = target.connect().await?;
    for key in [
        keywarden::sync::EPOCH_KEY,
        keywarden::sync::KEYRING_KEY,
        keywarden::sync::PUBLISHED_KEY,
        keywarden::sync::ACKS_KEY,
    ] {
        let _: i64 = conn.query(redis::cmd("DEL").arg(key)).await?;
    }

    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let paths = Paths {
        database_url: format!("sqlite://{}", data_dir.join("keywarden.db").display()),
        key_file: data_dir.join("root.key"),
        data_dir,
    };
    let mut config = keywarden::config::Config::default();
    config.redis.url = keywarden::config::SecretString::new(args.redis.clone());
    let app = App::open(config, paths, OpenMode::Create).await?;
    app.ensure_active_keys(chrono::Utc::now()).await?;
    publish_pending(&app).await?;

    eprintln!(
        "{}: starting {} instances",
        target.describe(),
        args.instances
    );
    let mut caches = Vec::with_capacity(args.instances);
    for i in 0..args.instances {
        let opts = CacheOptions::new(args.redis.clone(), app.roots.clone())
            .poll_interval(Duration::from_secs(1))
            .instance_id(format!("bench-{i}"));
        caches.push(KeyringCache::connect(opts).await?);
    }
    // Each instance's watcher stamps the moment it holds a new epoch.
    let stamps: Arc<Mutex<Vec<(usize, i64, Instant)>>> = Arc::default();
    for (i, cache) in caches.iter().enumerate() {
        let mut rx = cache.watch_epoch();
        let stamps = stamps.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let e = *rx.borrow_and_update();
                stamps.lock().unwrap().push((i, e, Instant::now()));
            }
        });
    }
    // Let subscriptions settle.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut lat = Vec::with_capacity(args.instances * args.rotations);
    let mut publish = Vec::with_capacity(args.rotations);
    let mut missed = 0;
    for r in 0..args.rotations {
        let purpose = if r % 2 == 0 {
            Purpose::Data
        } else {
            Purpose::Temp
        };
        let outcome = app
            .rotate(purpose, chrono::Utc::now(), false, None)
            .await?
            .context("rotation skipped")?;
        let committed = Instant::now();
        let epoch = outcome.epoch.context("no epoch")?;
        publish_pending(&app).await?;
        publish.push(committed.elapsed());
        for c in &caches {
            if !c.wait_for_epoch(epoch, Duration::from_secs(5)).await {
                missed += 1;
            }
        }
        // The watchers stamp on their own tasks: let them run first.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let stamps = stamps.lock().unwrap();
        for i in 0..args.instances {
            if let Some((_, _, t)) = stamps
                .iter()
                .filter(|(who, e, _)| *who == i && *e >= epoch)
                .min_by_key(|(_, _, t)| *t)
            {
                lat.push(t.saturating_duration_since(committed));
            }
        }
    }
    lat.sort();
    publish.sort();
    let reconnects: u64 = caches.iter().map(|c| c.stats().reconnects).sum();
    println!("target: {}", target.describe());
    println!(
        "instances: {}, rotations: {}, samples: {}, missed: {missed}, reconnects: {reconnects}",
        args.instances,
        args.rotations,
        lat.len()
    );
    println!("| measure | p50 ms | p99 ms | max ms |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| commit -> published (one-shot publish) | {} | {} | {} |",
        ms(percentile(&publish, 0.5)),
        ms(percentile(&publish, 0.99)),
        ms(*publish.last().unwrap())
    );
    println!(
        "| commit -> instance holds new epoch | {} | {} | {} |",
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(*lat.last().unwrap())
    );
    let lag = keywarden::sync::sync_lag(&app).await?;
    println!(
        "sync status: max lag {} ms, behind {}, over threshold {}",
        lag.max_lag_ms.unwrap_or(-1),
        lag.behind.len(),
        lag.over_threshold
    );
    Ok(())
}
