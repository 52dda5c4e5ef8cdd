//! The worker's scheduling: job definitions as data (`defs`), the claim
//! protocol that runs one tick once (`runner`), and the long-running worker
//! with its cron wiring, back-off and shutdown (`worker`).

pub mod defs;
pub mod runner;
pub mod worker;

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::UsageError;
use defs::JobDef;

/// Names the job directory, like `jobs.dir` in the config.
pub const JOBS_DIR_ENV: &str = "KEYWARDEN_JOBS_DIR";

/// The job definitions in force and where they came from.
#[derive(Clone, Debug)]
pub struct Jobs {
    pub defs: Vec<JobDef>,
    /// A directory, or "built-in defaults".
    pub source: String,
}

impl Jobs {
    /// The definition named `name`, or a usage error listing the known ones.
    pub fn get(&self, name: &str) -> anyhow::Result<&JobDef> {
        self.defs.iter().find(|d| d.name == name).ok_or_else(|| {
            UsageError(format!(
                "unknown job \"{name}\" (known jobs, from {}: {})",
                self.source,
                self.names().join(", ")
            ))
            .into()
        })
    }

    /// Every job name, in file order.
    pub fn names(&self) -> Vec<&str> {
        self.defs.iter().map(|d| d.name.as_str()).collect()
    }
}

/// Loads the job definitions: `jobs.dir` from the config, else
/// `KEYWARDEN_JOBS_DIR`, else `jobs/` in the working directory if there is
/// one, else the built-in defaults (the same files, embedded). A bad file,
/// an empty directory or a `reencrypt-secrets` job naming a target the
/// config does not have is a usage error (exit 2) naming the file.
pub fn load_jobs(config: &Config) -> anyhow::Result<Jobs> {
    let env_dir = std::env::var_os(JOBS_DIR_ENV).map(PathBuf::from);
    let shipped = Path::new("jobs");
    let explicit = !config.jobs.dir.as_os_str().is_empty()
        || env_dir.as_ref().is_some_and(|d| !d.as_os_str().is_empty());
    let jobs = if explicit || shipped.is_dir() {
        let dir = config.jobs.resolve_dir(env_dir.as_deref(), shipped);
        let defs = defs::load_dir(&dir).map_err(|e| UsageError(e.to_string()))?;
        if defs.is_empty() {
            return Err(UsageError(format!(
                "{}: no job definitions (*.toml) in this directory",
                dir.display()
            ))
            .into());
        }
        Jobs {
            defs,
            source: dir.display().to_string(),
        }
    } else {
        Jobs {
            defs: defs::builtin_defaults(),
            source: "built-in defaults".into(),
        }
    };
    for def in &jobs.defs {
        if let defs::JobKind::ReencryptSecrets {
            target: Some(target),
            ..
        } = &def.kind
            && !config.reencrypt.targets.iter().any(|t| &t.name == target)
        {
            let known: Vec<&str> = config
                .reencrypt
                .targets
                .iter()
                .map(|t| t.name.as_str())
                .collect();
            return Err(UsageError(format!(
                "{}: options.target: \"{target}\" is not a [[reencrypt.targets]] entry in the config \
                 (configured: {})",
                def.file.display(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))
            .into());
        }
    }
    Ok(jobs)
}

/// This worker's id: `worker.id` from the config, else `<hostname>-<pid>`.
pub fn worker_id(config: &Config) -> String {
    config.worker.resolve_id(&hostname(), std::process::id())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it on success (and we cap at the buffer's end regardless).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
