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
