//! The worker: jobs through the real binary with a controlled clock
//! (`KEYWARDEN_NOW`), one-shot runs, `run` and its shutdown, and several
//! `keywarden run` processes sharing one PostgreSQL.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::Row;

use crate::both_backends;
use crate::support::*;

/// Runs a one-shot command with `KEYWARDEN_NOW` set.
fn run_at(env: &Env, now: DateTime<Utc>, args: &[&str]) -> Run {
    let out = env
        .cmd(args)
        .env("KEYWARDEN_NOW", now.to_rfc3339())
        .stdin(Stdio::null())
        .output()
        .expect("cannot start keywarden");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn db_url(env: &Env) -> String {
    env.database_url.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}",
            env.data_dir().join("keywarden.db").to_string_lossy()
        )
    })
}

/// Runs `sql` against the test's store and maps every row with `f`.
fn query<T>(env: &Env, sql: &str, f: impl Fn(&sqlx::any::AnyRow) -> T) -> Vec<T> {
    let url = db_url(env);
    rt().block_on(async {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_all(&mut conn)
            .await
            .unwrap();
        rows.iter().map(f).collect()
    })
}

fn active_key(env: &Env, purpose: &str) -> serde_json::Value {
    let keys = env
        .run(&["keys", "list", "--purpose", purpose, "--json"])
        .ok()
        .json();
    keys.as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == "active")
        .cloned()
        .unwrap()
}

fn time_of(v: &serde_json::Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

fn actions(report: &serde_json::Value) -> Vec<String> {
    report["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap().to_string())
        .collect()
}

both_backends!(
    a_data_key_rotates_at_thirty_days_and_not_at_29_days_23_hours,
    |env| {
        env.init();
        let key = active_key(&env, "data");
        let activated = time_of(&key["activated_at"]);
        let almost = activated + TimeDelta::days(29) + TimeDelta::hours(23);
        let r = run_at(&env, almost, &["job", "run", "rotate-data-keys", "--json"])
            .ok()
            .json();
        assert_eq!(r["status"], "ok");
        assert_eq!(actions(&r), ["not_due"]);
        assert_eq!(active_key(&env, "data")["kid"], key["kid"]);

        // A dry run at 30 days says which key would rotate and changes nothing.
        let at = activated + TimeDelta::days(30);
        let dry = run_at(
            &env,
            at,
            &["job", "run", "rotate-data-keys", "--dry-run", "--json"],
        )
        .ok()
        .json();
        assert_eq!(actions(&dry), ["would_rotate"]);
        assert_eq!(dry["actions"][0]["old_kid"], key["kid"]);
        assert_eq!(active_key(&env, "data")["kid"], key["kid"]);

        let r = run_at(&env, at, &["job", "run", "rotate-data-keys", "--json"])
            .ok()
            .json();
        for field in ["job", "status", "started_at", "finished_at", "actions"] {
            assert!(r.get(field).is_some(), "missing {field}");
        }
        assert_eq!(actions(&r), ["rotate"]);
        assert_eq!(r["actions"][0]["old_kid"], key["kid"]);
        let new = active_key(&env, "data");
        assert_eq!(r["actions"][0]["new_kid"], new["kid"]);
        assert_eq!(new["version"], 2);
        let old = env
            .run(&["keys", "show", key["kid"].as_str().unwrap(), "--json"])
            .ok()
            .json();
        assert_eq!(old["state"], "retiring");

        // A repeated run at the same moment finds nothing due.
        let again = run_at(&env, at, &["job", "run", "rotate-data-keys", "--json"])
            .ok()
            .json();
        assert_eq!(actions(&again), ["not_due"]);
        let history = env
            .run(&["job", "history", "rotate-data-keys", "--json"])
            .ok()
            .json();
        let history = history.as_array().unwrap();
        assert_eq!(history.len(), 3, "dry runs are not recorded");
        assert!(
            history
                .iter()
                .all(|h| h["status"] == "ok" && h["origin"] == "manual")
        );
    }
);

both_backends!(
    a_signing_key_rotates_at_ninety_days_and_stays_verifying_through_its_grace,
    |env| {
        env.init();
        let key = active_key(&env, "signing");
        let kid = key["kid"].as_str().unwrap().to_string();
        let activated = time_of(&key["activated_at"]);
        let r = run_at(
            &env,
            activated + TimeDelta::days(89),
            &["job", "run", "rotate-signing-keys", "--json"],
        )
        .ok()
        .json();
        assert_eq!(actions(&r), ["not_due", "not_due"]);

        let rotated_at = activated + TimeDelta::days(90);
        let r = run_at(
            &env,
            rotated_at,
            &["job", "run", "rotate-signing-keys", "--json"],
        )
        .ok()
        .json();
        // The token-encryption key rotates with the signing key.
        assert_eq!(actions(&r), ["rotate", "rotate"]);
        let old = env.run(&["keys", "show", &kid, "--json"]).ok().json();
        assert_eq!(old["state"], "retiring");
        assert_eq!(
            time_of(&old["retire_after"]),
            rotated_at + TimeDelta::days(1),
            "grace is [policy.signing] grace = 1d"
        );

        // Within the grace, expiry leaves it verifying; at its end it retires.
        let r = run_at(
            &env,
            rotated_at + TimeDelta::hours(23),
            &["job", "run", "expire-keys", "--json"],
        )
        .ok()
        .json();
        assert!(!actions(&r).contains(&"retire".to_string()), "{r}");
        assert_eq!(
            env.run(&["keys", "show", &kid, "--json"]).ok().json()["state"],
            "retiring"
        );
        let r = run_at(
            &env,
            rotated_at + TimeDelta::days(1),
            &["job", "run", "expire-keys", "--json"],
        )
        .ok()
        .json();
        let retired: Vec<&serde_json::Value> = r["actions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["action"] == "retire")
            .collect();
        assert_eq!(retired.len(), 2, "signing and token-encryption: {r}");
        assert!(retired.iter().any(|a| a["kid"] == kid.as_str()));
        assert_eq!(
            env.run(&["keys", "show", &kid, "--json"]).ok().json()["state"],
            "retired"
        );
    }
);

both_backends!(a_temp_key_is_destroyed_at_seven_days, |env| {
    env.init();
    let key = active_key(&env, "temp");
    let kid = key["kid"].as_str().unwrap().to_string();
    let activated = time_of(&key["activated_at"]);
    let r = run_at(
        &env,
        activated + TimeDelta::days(6) + TimeDelta::hours(23),
        &["job", "run", "rotate-temp-keys", "--json"],
    )
    .ok()
    .json();
    assert_eq!(actions(&r), ["not_due"]);
    let seven = activated + TimeDelta::days(7);
    let r = run_at(&env, seven, &["job", "run", "rotate-temp-keys", "--json"])
        .ok()
        .json();
    assert_eq!(actions(&r), ["rotate"]);
    let r = run_at(&env, seven, &["job", "run", "expire-keys", "--json"])
        .ok()
        .json();
    assert!(
        r["actions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "destroy" && a["kid"] == kid.as_str()),
        "{r}"
    );
    let shown = env.run(&["keys", "show", &kid, "--json"]).ok().json();
    assert_eq!(shown["state"], "destroyed");
    let wrapped: Vec<Option<String>> = query(
        &env,
        &format!("SELECT wrapped FROM keys WHERE kid = '{kid}'"),
        |r| r.get(0),
    );
    assert_eq!(wrapped, [None], "the material is erased, the row kept");
});

both_backends!(
    a_failed_job_exits_1_is_recorded_and_succeeds_at_its_next_run,
    |env| {
        env.init();
        // A corrupt key row makes the temp rotation fail before it changes anything.
        query(
            &env,
            "UPDATE keys SET algorithm = 'bogus' WHERE purpose = 'temp'",
            |_| (),
        );
        let r = env
            .run(&["job", "run", "rotate-temp-keys", "--json"])
            .code(1);
        let report = r.json();
        assert_eq!(report["status"], "failed");
        assert!(
            r.stderr.contains("job rotate-temp-keys failed"),
            "{}",
            r.stderr
        );
        let history = env
            .run(&["job", "history", "rotate-temp-keys", "--json"])
            .ok()
            .json();
        assert_eq!(history[0]["status"], "failed");
        assert!(
            history[0]["error"]
                .as_str()
                .unwrap()
                .contains("unreadable algorithm"),
            "{history}"
        );
        query(
            &env,
            "UPDATE keys SET algorithm = 'HMAC-SHA256' WHERE purpose = 'temp'",
            |_| (),
        );
        let r = env
            .run(&["job", "run", "rotate-temp-keys", "--json"])
            .ok()
            .json();
        assert_eq!(r["status"], "ok");
        let keys = env
            .run(&["keys", "list", "--purpose", "temp", "--json"])
            .ok()
            .json();
        assert_eq!(keys.as_array().unwrap().len(), 1, "no half rotation");
    }
);

#[test]
fn unknown_jobs_and_bad_job_files_exit_2_naming_what_is_known_and_wrong() {
    let env = Env::new(Backend::Sqlite).unwrap();
    env.init();
    let r = env.run(&["job", "run", "rotate-everything"]).code(2);
    assert!(
        r.stderr.contains("unknown job \"rotate-everything\"")
            && r.stderr.contains("rotate-data-keys, rotate-signing-keys"),
        "{}",
        r.stderr
    );
    let jobs = env.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    std::fs::write(
        jobs.join("rot.toml"),
        "name = \"rot\"\nkind = \"rotate\"\nschedule = \"0 3 * * * * *\"\n[options]\npurposes = [\"data\"]\n",
    )
    .unwrap();
    let r = env.run(&["job", "list"]).code(2);
    assert!(
        r.stderr.contains("rot.toml: schedule:") && r.stderr.contains("7 fields"),
        "{}",
        r.stderr
    );
    let r = env.run(&["run", "--once"]).code(2);
    assert!(r.stderr.contains("rot.toml"), "{}", r.stderr);
}

both_backends!(
    run_once_runs_each_latest_tick_once_from_a_fresh_store,
    |env| {
        // No init: `run` makes the store and keys itself.
        let first = env.run(&["run", "--once", "--json"]).ok().json();
        let first = first.as_array().unwrap();
        assert_eq!(first.len(), 7, "every default job: {first:?}");
        assert!(first.iter().all(|r| r["status"] == "ok"), "{first:?}");
        let again = env.run(&["run", "--once", "--json"]).ok().json();
        assert!(
            again
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["status"] == "claimed_elsewhere"),
            "{again}"
        );
        let list = env.run(&["job", "list", "--json"]).ok().json();
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 7);
        for j in list {
            for field in ["name", "schedule", "enabled", "next_run", "last_status"] {
                assert!(j.get(field).is_some(), "missing {field}: {j}");
            }
            assert_eq!(j["last_status"], "ok");
        }
        let history = env.run(&["job", "history", "--json"]).ok().json();
        assert_eq!(history.as_array().unwrap().len(), 7);
        assert!(
            history
                .as_array()
                .unwrap()
                .iter()
                .all(|h| h["origin"] == "schedule")
        );
    }
);

fn spawn_worker(env: &Env, extra: &[(&str, &str)]) -> Child {
    let mut cmd = env.cmd(&["run"]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("cannot start keywarden run")
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: plain kill(2) on a child we started and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Waits up to `limit` for the child to exit; its exit code, or None.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn run_works_with_no_config_and_stops_on_sigterm_with_exit_0() {
    let env = Env::new(Backend::Sqlite).unwrap();
    let mut child = spawn_worker(&env, &[]);
    // The store and keys appear without `init`.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.data_dir().join("keywarden.db").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(700));
    assert!(child.try_wait().unwrap().is_none(), "run exited early");
    let stopped = Instant::now();
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(5)), Some(0));
    assert!(stopped.elapsed() < Duration::from_secs(3));
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

/// Three workers on one PostgreSQL, a rotate job every second and a 2 s data
/// key policy: every tick runs once, every due tick rotates once, and a
/// worker killed mid-job leaves no duplicate and no stuck lease.
#[test]
fn three_workers_run_each_tick_once_and_survive_one_killed_mid_job() {
    let Some(mut env) = Env::new(Backend::Postgres) else {
        return;
    };
    env.init();
    let jobs = env.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    std::fs::write(
        jobs.join("rot.toml"),
        "name = \"rot\"\nkind = \"rotate\"\nschedule = \"* * * * * *\"\n[options]\npurposes = [\"data\"]\n",
    )
    .unwrap();
    env.set_env("KEYWARDEN_POLICY__DATA__ROTATE_AFTER", "2s");
    env.set_env("KEYWARDEN_WORKER__LEASE_TTL", "2s");
    env.set_env("KEYWARDEN_TEST_JOB_DELAY_MS", "300");
    env.set_env("KEYWARDEN_LOG", "warn");
    let mut workers: Vec<(String, Child)> = (1..=3)
        .map(|i| {
            let id = format!("w{i}");
            let child = spawn_worker(&env, &[("KEYWARDEN_WORKER__ID", &id)]);
            (id, child)
        })
        .collect();

    // At least 20 ticks, then kill whichever worker is mid-job.
    std::thread::sleep(Duration::from_secs(21));
    let deadline = Instant::now() + Duration::from_secs(5);
    let (victim, killed_run) = loop {
        let running: Vec<(String, i64)> = query(
            &env,
            "SELECT worker_id, id FROM job_runs WHERE status = 'running'",
            |r| (r.get(0), r.get(1)),
        );
        if let Some(found) = running.into_iter().next() {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no run was ever seen in progress"
        );
        std::thread::sleep(Duration::from_millis(30));
    };
    let index = workers.iter().position(|(id, _)| *id == victim).unwrap();
    let (_, mut child) = workers.remove(index);
    signal(&child, libc::SIGKILL);
    child.wait().unwrap();
    let killed_at = Utc::now();

    // Lease TTL (2 s) plus a few ticks for the others to take over.
    std::thread::sleep(Duration::from_secs(5));
    for (_, child) in &workers {
        signal(child, libc::SIGTERM);
    }
    for (id, child) in &mut workers {
        assert_eq!(
            wait_exit(child, Duration::from_secs(5)),
            Some(0),
            "worker {id} did not stop cleanly on SIGTERM"
        );
    }

    let runs: Vec<(i64, String, String, i64, Option<String>, String)> = query(
        &env,
        "SELECT id, status, worker_id, scheduled_at, error, actions FROM job_runs \
         WHERE job = 'rot' AND origin = 'schedule' ORDER BY scheduled_at",
        |r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)),
    );
    let ticks: Vec<i64> = runs.iter().map(|r| r.3).collect();
    let mut distinct = ticks.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), ticks.len(), "a tick ran twice");
    let span = ticks.last().unwrap() - ticks.first().unwrap() + 1;
    assert!(span >= 25, "only {span} ticks");
    // Every second has its row; a scheduler firing more than a second late on
    // every worker at once (a loaded CI machine) is the only excuse for a gap.
    let gaps = span - ticks.len() as i64;
    assert!(gaps <= 2, "{gaps} ticks without a row: {ticks:?}");
    assert!(
        runs.iter().any(|r| r.2 != victim) && {
            let mut ids: Vec<&String> = runs.iter().map(|r| &r.2).collect();
            ids.sort();
            ids.dedup();
            ids.len() >= 2
        },
        "the ticks were shared among workers"
    );

    // The killed run was taken over and marked failed; nothing is left running.
    let killed = runs.iter().find(|r| r.0 == killed_run).unwrap();
    assert_eq!(killed.1, "failed", "{killed:?}");
    assert!(killed.4.as_deref().unwrap().contains("did not finish"));
    assert!(runs.iter().all(|r| r.1 != "running"), "a run is stuck");
    let after_kill = runs
        .iter()
        .filter(|r| r.1 == "ok" && r.3 > killed_at.timestamp() + 2)
        .count();
    assert!(after_kill >= 1, "no tick ran after the lease expired");
    let leases: Vec<(String, i64)> = query(
        &env,
        "SELECT holder, expires_at FROM leases WHERE name = 'job:rot'",
        |r| (r.get(0), r.get(1)),
    );
    assert_eq!(leases.len(), 1);
    assert!(
        leases[0].1 <= Utc::now().timestamp_millis(),
        "the lease is still held: {leases:?}"
    );

    // Exactly one rotation per due tick: every recorded rotation made one
    // key version, rotations are at least the 2 s policy apart, and a due
    // tick never passes without one (at most every 3 ticks with the delay).
    let rotation_ticks: Vec<i64> = runs
        .iter()
        .filter(|r| r.1 == "ok" && r.5.contains("\"action\":\"rotate\""))
        .map(|r| r.3)
        .collect();
    let versions: Vec<(i64, i64)> = query(
        &env,
        "SELECT version, activated_at FROM keys WHERE purpose = 'data' ORDER BY version",
        |r| (r.get(0), r.get(1)),
    );
    // The killed worker may have committed its rotation just before dying,
    // without recording it: at most one version more than recorded rotations.
    let unrecorded = versions.len() as i64 - 1 - rotation_ticks.len() as i64;
    assert!(
        (0..=1).contains(&unrecorded),
        "key versions {versions:?} vs rotation ticks {rotation_ticks:?}"
    );
    for pair in versions[1..].windows(2) {
        assert!(
            pair[1].1 - pair[0].1 >= 2,
            "two rotations within the 2 s policy: {versions:?}"
        );
    }
    for pair in rotation_ticks.windows(2) {
        assert!(
            pair[1] - pair[0] >= 2,
            "rotated before due: {rotation_ticks:?}"
        );
    }
    assert!(
        rotation_ticks.len() as i64 >= (span - 8) / 3,
        "too few rotations: {rotation_ticks:?} over {span} ticks"
    );
    let count = |status: &str| runs.iter().filter(|r| r.1 == status).count();
    eprintln!(
        "{span} ticks, {} rows ({} ok, {} skipped, {} failed), {gaps} gaps, {} rotations, \
         {} data key versions, killed {victim} in run {killed_run}",
        runs.len(),
        count("ok"),
        count("skipped"),
        count("failed"),
        rotation_ticks.len(),
        versions.len()
    );
    let active: Vec<i64> = query(
        &env,
        "SELECT COUNT(*) FROM keys WHERE purpose = 'data' AND state = 'active'",
        |r| r.get(0),
    );
    assert_eq!(active, [1]);
}

/// A TCP proxy to PostgreSQL that the test can cut: down, it drops every
/// open connection and every new one, as a database that went away.
struct Proxy {
    addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn start(target: String) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            up: Default::default(),
            open: Default::default(),
        };
        proxy.up.store(true, Ordering::SeqCst);
        let (up, open) = (proxy.up.clone(), proxy.open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !up.load(Ordering::SeqCst) {
                    continue; // dropped: the connection closes at once
                }
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                {
                    let mut open = open.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        proxy
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            for s in self.open.lock().unwrap().drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

#[test]
fn run_backs_off_while_the_database_is_gone_and_carries_on_when_it_returns() {
    let Some(mut env) = Env::new(Backend::Postgres) else {
        return;
    };
    env.init();
    let direct = env.database_url.clone().unwrap();
    // postgres://user@HOST:PORT/db -> the proxy in place of HOST:PORT.
    let (scheme_user, rest) = direct.split_once('@').unwrap();
    let (target, db) = rest.split_once('/').unwrap();
    let proxy = Proxy::start(target.to_string());
    let proxied = format!("{scheme_user}@{}/{db}", proxy.addr);

    let jobs = env.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    std::fs::write(
        jobs.join("rot.toml"),
        "name = \"rot\"\nkind = \"rotate\"\nschedule = \"* * * * * *\"\n[options]\npurposes = [\"data\"]\n",
    )
    .unwrap();
    env.set_env("KEYWARDEN_POLICY__DATA__ROTATE_AFTER", "2s");
    env.set_env("KEYWARDEN_WORKER__LEASE_TTL", "2s");
    env.set_env("KEYWARDEN_LOG", "warn,keywarden=info");
    let log_path = env.path().join("worker.log");
    let mut cmd = env.cmd(&["run"]);
    cmd.env("KEYWARDEN_DATABASE_URL", &proxied)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    let mut child = cmd.spawn().unwrap();
    let ok_runs_since = |t: i64| -> i64 {
        query(
            &env,
            &format!("SELECT COUNT(*) FROM job_runs WHERE status = 'ok' AND started_at >= {t}"),
            |r| r.get(0),
        )[0]
    };
    std::thread::sleep(Duration::from_secs(3));
    assert!(ok_runs_since(0) > 0, "no run before the outage");

    proxy.set_up(false);
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        child.try_wait().unwrap().is_none(),
        "run exited while the database was gone"
    );
    let back = Utc::now().timestamp();
    proxy.set_up(true);
    let deadline = Instant::now() + Duration::from_secs(15);
    while ok_runs_since(back) == 0 {
        assert!(
            Instant::now() < deadline,
            "no run after the database came back:\n{}",
            std::fs::read_to_string(&log_path).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(5)), Some(0));
    let log = std::fs::read_to_string(&log_path).unwrap();
    let retries = log.matches("trying the store again").count();
    assert!(retries >= 1, "the outage was not logged:\n{log}");
    assert!(
        retries <= 6,
        "the worker did not back off ({retries} attempts):\n{log}"
    );
    assert!(log.contains("the store answers again"), "{log}");
}

both_backends!(
    two_manual_runs_of_one_job_at_once_do_not_overlap_or_rotate_twice,
    |env| {
        env.init();
        let key = active_key(&env, "data");
        let at = time_of(&key["activated_at"]) + TimeDelta::days(30);
        let spawn = || {
            env.cmd(&["job", "run", "rotate-data-keys", "--json"])
                .env("KEYWARDEN_NOW", at.to_rfc3339())
                .env("KEYWARDEN_TEST_JOB_DELAY_MS", "400")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(), spawn());
        let mut done = Vec::new();
        for child in [a, b] {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            done.push(actions(&report).join(","));
        }
        done.sort();
        assert_eq!(
            done,
            ["not_due", "rotate"],
            "the second waited for the first"
        );
        let runs: Vec<(i64, i64)> = query(
            &env,
            "SELECT lease_token, duration_ms FROM job_runs ORDER BY id",
            |r| (r.get(0), r.get(1)),
        );
        assert_eq!(runs.len(), 2);
        assert_ne!(runs[0].0, runs[1].0, "each run held its own lease");
        let keys = env
            .run(&["keys", "list", "--purpose", "data", "--json"])
            .ok()
            .json();
        assert_eq!(keys.as_array().unwrap().len(), 2);
    }
);
