//! Audit overhead, measured in-process: rotations per second with the audit
//! row (the real `App::rotate`) against the same rotation transaction
//! without it, and audit rows written per second. Replaced temp keys are
//! deleted between rounds of 50 so the keyring stays the size of a real one.
//!
//! ```sh
//! cargo run --release --example audit_bench -- [ROTATIONS] [DATABASE_URL]
//! ```
//!
//! Without a URL it runs on a fresh SQLite file in a temporary directory;
//! with a `postgres://` URL it uses that (empty, throwaway) database. The
//! two kinds of rotation are interleaved in rounds so machine noise weighs
//! on both alike.

use std::time::{Duration, Instant};

use chrono::Utc;
use keywarden::app::{App, OpenMode, Paths};
use keywarden::audit::{Event, action};
use keywarden::crypto;
use keywarden::keyring::{self, Algorithm, KeyMeta, KeyState, Purpose};
use keywarden::store::keys::{self as keystore, StoredKey};

/// The rotation of `App::rotate` minus its audit row.
async fn rotate_without_audit(app: &App) -> anyhow::Result<()> {
    let now = Utc::now();
    let purpose = Purpose::Temp;
    let material = crypto::generate_material(purpose, Algorithm::HmacSha256)?;
    let mut tx = app.store.begin().await?;
    let keys = keystore::keys_of_purpose(&mut tx, purpose).await?;
    let active = keys.iter().find(|k| k.meta.state == KeyState::Active);
    let version = keystore::next_version(&mut tx, purpose).await?;
    let kid = keyring::new_kid(purpose, crypto::random_array());
    let wrapped = app.roots.wrap(
        &kid,
        purpose.as_str(),
        Algorithm::HmacSha256.as_str(),
        &material,
        now.timestamp() as u64,
    );
    let mut events = Vec::new();
    if let Some(old) = active {
        keystore::set_state(
            &mut tx,
            &old.meta.kid,
            KeyState::Active,
            KeyState::Retiring,
            now,
            None,
            None,
        )
        .await?;
        events.push(("demote", old.meta.kid.clone(), purpose));
    }
    let new = StoredKey {
        meta: KeyMeta {
            kid: kid.clone(),
            purpose,
            algorithm: Algorithm::HmacSha256,
            state: KeyState::Active,
            version,
            created_at: now,
            activated_at: Some(now),
            rotate_after: Some(app.policy.rotate_at(purpose, now)),
            retire_after: None,
            revoked_at: None,
        },
        wrapped,
        revoked_reason: None,
    };
    keystore::insert_key(&mut tx, &new).await?;
    events.push(("activate", kid, purpose));
    let refs: Vec<(&str, &str, Purpose)> = events
        .iter()
        .map(|(a, k, p)| (*a, k.as_str(), *p))
        .collect();
    keystore::announce(&mut tx, &refs, now).await?;
    tx.commit().await?;
    Ok(())
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(1000), |s| s.parse())?;
    let dir = tempfile_dir()?;
    let database_url = args
        .next()
        .unwrap_or_else(|| format!("sqlite://{}/keywarden.db", dir.display()));
    let paths = Paths {
        data_dir: dir.clone(),
        database_url: database_url.clone(),
        key_file: dir.join("root.key"),
    };
    let app = App::open(Default::default(), paths, OpenMode::Create).await?;
    app.ensure_active_keys(Utc::now()).await?;
    let backend = format!("{:?}", app.store.backend());
    if std::env::var_os("BENCH_DROP_INDEXES").is_some() {
        for i in ["audit_log_by_time"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX {i}")))
                .execute(app.store.pool())
                .await?;
        }
    }

    let per_round = 50;
    let rounds = n.div_ceil(per_round);
    let (mut on, mut off) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        // Keep the number of temp keys steady (a real keyring destroys
        // replaced temp keys), so the figure does not drift with N.
        sqlx::query("DELETE FROM keys WHERE purpose = 'temp' AND state <> 'active'")
            .execute(app.store.pool())
            .await?;
        let t = Instant::now();
        for _ in 0..per_round {
            rotate_without_audit(&app).await?;
        }
        off += t.elapsed();
        let t = Instant::now();
        for _ in 0..per_round {
            app.rotate(Purpose::Temp, Utc::now(), false, None).await?;
        }
        on += t.elapsed();
    }
    let total = per_round * rounds;

    // Audit rows alone: one row per transaction, then 100 per transaction.
    let t = Instant::now();
    for i in 0..n {
        app.audit_now(
            vec![Event::new(action::ACCESS_DENIED).target(format!("bench/{i}"))],
            Utc::now(),
        )
        .await?;
    }
    let single = t.elapsed();
    let t = Instant::now();
    for b in 0..n.div_ceil(100) {
        let events = (0..100)
            .map(|i| Event::new(action::ACCESS_DENIED).target(format!("bench/{b}/{i}")))
            .collect();
        app.audit_now(events, Utc::now()).await?;
    }
    let batched = t.elapsed();
    let verify_started = Instant::now();
    let report = keywarden::audit::checkpoint::verify_store(&app).await?;
    let verify_time = verify_started.elapsed();
    anyhow::ensure!(report.ok, "the chain must verify: {:?}", report.reason);

    println!("backend:                       {backend}");
    println!("rotations (each way):          {total}");
    println!("rotations/s without audit:     {:.0}", rate(total, off));
    println!("rotations/s with audit:        {:.0}", rate(total, on));
    println!(
        "audit overhead per rotation:   {:.2} ms ({:.0}%)",
        (on.as_secs_f64() - off.as_secs_f64()) * 1000.0 / total as f64,
        (on.as_secs_f64() / off.as_secs_f64() - 1.0) * 100.0
    );
    println!("audit rows/s, 1 per tx:        {:.0}", rate(n, single));
    println!(
        "audit rows/s, 100 per tx:      {:.0}",
        rate(n.div_ceil(100) * 100, batched)
    );
    println!(
        "audit verify:                  {} rows in {:.2}s ({:.0} rows/s)",
        report.rows,
        verify_time.as_secs_f64(),
        rate(report.rows as usize, verify_time)
    );
    app.store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("keywarden-audit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
