//! Test harness: runs the real `keywarden` binary against a fresh store.
//!
//! Every test gets its own temporary working directory (data dir, key file)
//! and its own database: a new SQLite file, or a freshly created PostgreSQL
//! database on the server named by `KEYWARDEN_TEST_POSTGRES_URL`. Without
//! that variable PostgreSQL variants are skipped locally and fail in CI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use std::io::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[allow(dead_code)]
pub struct Env {
    pub dir: tempfile::TempDir,
    pub backend: Backend,
    pub database_url: Option<String>,
    pub extra_env: Vec<(String, String)>,
}

/// The result of one command.
pub struct Run {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout_str(),
                self.stderr
            )
        })
    }
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code,
            0,
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout_str(),
            self.stderr
        );
        self
    }
    #[track_caller]
    pub fn code(self, expected: i32) -> Self {
        assert_eq!(
            self.code,
            expected,
            "unexpected exit status\nstdout:\n{}\nstderr:\n{}",
            self.stdout_str(),
            self.stderr
        );
        self
    }
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keywarden"))
}

/// A tokio runtime for the few tests that talk to a database directly.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn postgres_admin_url() -> Option<String> {
    std::env::var("KEYWARDEN_TEST_POSTGRES_URL")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Creates a fresh PostgreSQL database and returns its URL.
pub fn fresh_postgres_database() -> Option<String> {
    let Some(admin) = postgres_admin_url() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("KEYWARDEN_TEST_POSTGRES_URL must be set in CI");
        }
        eprintln!("skipping: KEYWARDEN_TEST_POSTGRES_URL is not set");
        return None;
    };
    let name = format!("kw_test_{}", uuid::Uuid::new_v4().simple());
    rt().block_on(async {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&admin).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
    });
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap();
    Some(format!("{base}/{name}"))
}

impl Env {
    /// A fresh environment on `backend`, or `None` when that backend is not
    /// available here (PostgreSQL outside CI).
    pub fn new(backend: Backend) -> Option<Env> {
        let dir = tempfile::tempdir().unwrap();
        let database_url = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(fresh_postgres_database()?),
        };
        Some(Env {
            dir,
            backend,
            database_url,
            extra_env: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join(".keywarden")
    }

    pub fn set_env(&mut self, k: &str, v: &str) {
        self.extra_env.retain(|(key, _)| key != k);
        self.extra_env.push((k.to_string(), v.to_string()));
    }

    /// The command, with a clean environment: only what this test sets.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args).current_dir(self.dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("KEYWARDEN_") || k == "RUST_LOG" {
                c.env_remove(k);
            }
        }
        if let Some(url) = &self.database_url {
            c.env("KEYWARDEN_DATABASE_URL", url);
        }
        for (k, v) in &self.extra_env {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.run_stdin(args, b"")
    }

    pub fn run_stdin(&self, args: &[&str], stdin: &[u8]) -> Run {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start keywarden");
        {
            let mut input = child.stdin.take().unwrap();
            let _ = input.write_all(stdin);
        }
        let out: Output = child.wait_with_output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `init`, asserting success.
    pub fn init(&self) -> Run {
        self.run(&["init"]).ok()
    }

    /// The root key as written in the key file.
    pub fn root_key(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("root.key"))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_string()
    }
}

/// Runs `$body` once per backend: `NAME_sqlite` and `NAME_postgres`.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, |$env:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[allow(unused_mut)]
            fn body(mut $env: $crate::support::Env) $body
            #[test]
            fn sqlite() {
                body($crate::support::Env::new($crate::support::Backend::Sqlite).unwrap());
            }
            #[test]
            fn postgres() {
                if let Some(env) = $crate::support::Env::new($crate::support::Backend::Postgres) {
                    body(env);
                }
            }
        }
    };
}

/// The Python interpreter with cryptography, PyJWT and friends, if any.
pub fn python() -> Option<PathBuf> {
    match std::env::var("KEYWARDEN_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("KEYWARDEN_TEST_PYTHON must be set in CI");
            }
            eprintln!("skipping: KEYWARDEN_TEST_PYTHON is not set");
            None
        }
    }
}

/// Runs a Python snippet with arguments; returns stdout, asserting success.
pub fn run_python(py: &Path, script: &str, args: &[&str]) -> String {
    let out = Command::new(py)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("cannot run python");
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

// ---------------------------------------------------------------------------
// Services shared by several test modules: a private Redis, an HTTP receiver
// for Slack/webhook calls, an SMTP sink, and the alert channel config.

use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A free TCP port on the loopback interface (closed again at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private redis-server for one test: acknowledgements of other tests'
/// instances never mix in, and the test may stop and start it.
pub struct PrivateRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one, or `None` (skip) when redis-server is missing outside CI.
    pub fn start() -> Option<PrivateRedis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("redis-server must be installed in CI");
            }
            eprintln!("skipping: redis-server is not installed");
            return None;
        }
        let mut r = PrivateRedis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.up();
        Some(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server process and waits (bounded) until it answers PING.
    pub fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(c) = redis::Client::open(self.url().as_str())
                && let Ok(mut conn) = c.get_connection()
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("private redis-server on {} did not start", self.port);
    }

    /// Stops the server process (SIGKILL: the real process is gone).
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.down();
    }
}

/// One request a [`Receiver`] got.
#[derive(Clone, Debug)]
pub struct Got {
    pub path: String,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

/// A local HTTP receiver standing in for Slack and a webhook receiver. Paths
/// decide the answer: `/ok*` 200, `/fail*` 500, `/busy*` 429 with
/// `Retry-After: 1` on the first call then 200, `/hang*` never answers,
/// `/bad*` 400.
pub struct Receiver {
    pub rt: tokio::runtime::Runtime,
    pub base: String,
    pub got: Arc<Mutex<Vec<Got>>>,
}

impl Receiver {
    pub fn start() -> Receiver {
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let g = got.clone();
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: HeaderMap, body: axum::body::Bytes| {
                let g = g.clone();
                async move {
                    let path = uri.path().to_string();
                    let seen = {
                        let mut v = g.lock().unwrap();
                        v.push(Got {
                            path: path.clone(),
                            headers,
                            body: body.to_vec(),
                        });
                        v.iter().filter(|x| x.path == path).count()
                    };
                    if path.starts_with("/fail") {
                        StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    } else if path.starts_with("/bad") {
                        StatusCode::BAD_REQUEST.into_response()
                    } else if path.starts_with("/busy") && seen == 1 {
                        (
                            StatusCode::TOO_MANY_REQUESTS,
                            [("Retry-After", "1")],
                            "slow down",
                        )
                            .into_response()
                    } else if path.starts_with("/hang") {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        StatusCode::OK.into_response()
                    } else {
                        (StatusCode::OK, "ok").into_response()
                    }
                }
            },
        );
        rt.spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { rt, base, got }
    }

    pub fn requests(&self, prefix: &str) -> Vec<Got> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.path.starts_with(prefix))
            .cloned()
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let rt = std::mem::replace(
            &mut self.rt,
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
        );
        rt.shutdown_background();
    }
}

/// A real SMTP server (Python aiosmtpd) writing every message it accepts
/// into a Maildir.
pub struct SmtpSink {
    pub port: u16,
    pub maildir: PathBuf,
    child: Child,
}

impl SmtpSink {
    /// Starts aiosmtpd on a free port under `dir` and waits (bounded) until
    /// it accepts connections.
    pub fn start(py: &Path, dir: &Path) -> SmtpSink {
        let port = free_port();
        let maildir = dir.join("maildir");
        let child = Command::new(py)
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let sink = SmtpSink {
            port,
            maildir,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "aiosmtpd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        sink
    }

    /// Every message delivered so far, as raw text.
    pub fn messages(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(self.maildir.join("new")) else {
            return Vec::new();
        };
        dir.map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The secret the webhook channel signs with in tests.
pub const WEBHOOK_SECRET: &str = "test-webhook-secret";

/// Writes the alert channel config to the env's `keywarden.toml`; an empty
/// URL or a zero SMTP port turns that channel off.
pub fn write_alert_config(
    env: &mut Env,
    slack: &str,
    webhook: &str,
    smtp_port: u16,
    attempts: u32,
) {
    let smtp_host = if smtp_port == 0 { "" } else { "127.0.0.1" };
    let smtp_port = smtp_port.max(1);
    let text = format!(
        r#"
[alerts.email]
smtp_host = "{smtp_host}"
smtp_port = {smtp_port}
tls = "none"
from = "keywarden@example.com"
to = ["ops@example.com", "oncall@example.com"]
[alerts.slack]
webhook_url = "{slack}"
[alerts.webhook]
url = "{webhook}"
secret_env = "KW_TEST_WEBHOOK_SECRET"
[alerts.delivery]
attempts = {attempts}
backoff_ms = 50
max_backoff_ms = 3000
timeout_ms = 400
"#
    );
    std::fs::write(env.path().join("keywarden.toml"), text).unwrap();
    env.set_env("KW_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET);
}

/// Lowercase hex HMAC-SHA256.
pub fn hmac_hex(secret: &[u8], msg: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    hex::encode(aws_lc_rs::hmac::sign(&key, msg).as_ref())
}

/// Checks a webhook call's signature headers the way a receiver must.
pub fn assert_webhook_signed(g: &Got) {
    let ts = g.headers["x-keywarden-timestamp"].to_str().unwrap();
    let sig = g.headers["x-keywarden-signature"].to_str().unwrap();
    let ts_n: i64 = ts.parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - ts_n).abs() < 300, "stale");
    let mut msg = ts.as_bytes().to_vec();
    msg.push(b'.');
    msg.extend_from_slice(&g.body);
    assert_eq!(sig, hmac_hex(WEBHOOK_SECRET.as_bytes(), &msg));
    // A forgery: the same signature over another body does not match.
    let mut forged = msg.clone();
    forged.extend_from_slice(b" ");
    assert_ne!(sig, hmac_hex(WEBHOOK_SECRET.as_bytes(), &forged));
}
