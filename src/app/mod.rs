//! The application service: config, store and root keys opened together,
//! and the keyring operations every command and job shares.
//!
//! This is the edge where IO meets the pure core: it reads the environment
//! and the key file, talks to the store, and passes `now` into `keyring`.

pub mod keyring;
pub mod restore;
pub mod revoke;
pub mod secrets;
pub mod tokens;

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::Config;
use crate::crypto::rootkey::{RootKey, RootKeys};
use crate::error::UsageError;
use crate::keyring::{Policy, PurposePolicy};
use crate::store::Store;

/// Where things live, resolved from flags, environment and defaults
/// (CLI.md, "Where things live").
#[derive(Clone, Debug)]
pub struct Paths {
    pub data_dir: PathBuf,
    pub database_url: String,
    pub key_file: PathBuf,
}

impl Paths {
    /// Resolves the paths: `data_dir` from the flag or `KEYWARDEN_DATA_DIR`
    /// (clap reads both), else `.keywarden`; the database from
    /// `KEYWARDEN_DATABASE_URL`, else SQLite in the data directory.
    pub fn resolve(data_dir: Option<&Path>) -> Paths {
        let data_dir = data_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".keywarden"));
        let database_url = std::env::var("KEYWARDEN_DATABASE_URL")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("keywarden.db").display()));
        let key_file = data_dir.join("root.key");
        Paths {
            data_dir,
            database_url,
            key_file,
        }
    }
}

/// Where the root keys came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootKeySource {
    Env,
    File(PathBuf),
    Generated(PathBuf),
}

impl std::fmt::Display for RootKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RootKeySource::Env => f.write_str("KEYWARDEN_ROOT_KEY"),
            RootKeySource::File(p) => write!(f, "key file {}", p.display()),
            RootKeySource::Generated(p) => write!(f, "key file {} (generated now)", p.display()),
        }
    }
}

/// Whether opening may create a new keyring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// The store must exist and be initialised.
    Existing,
    /// Create the store, the root key and the canary when missing.
    Create,
}

/// Config, store and root keys, opened and checked against each other.
pub struct App {
    pub config: Config,
    pub paths: Paths,
    pub store: Store,
    pub roots: RootKeys,
    pub root_source: RootKeySource,
    pub policy: Policy,
    /// Audit keys, default actor and hot-path counters (`crate::audit`).
    pub audit: crate::audit::AuditState,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("paths", &self.paths)
            .field("root_source", &self.root_source)
            .finish_non_exhaustive()
    }
}

/// Reads the root keys from `KEYWARDEN_ROOT_KEY` or the key file; `None`
/// when neither exists.
pub fn load_root_keys(key_file: &Path) -> anyhow::Result<Option<(RootKeys, RootKeySource)>> {
    if let Ok(value) = std::env::var("KEYWARDEN_ROOT_KEY")
        && !value.trim().is_empty()
    {
        let keys = RootKeys::parse_list(&value, "KEYWARDEN_ROOT_KEY").map_err(UsageError)?;
        return Ok(Some((keys, RootKeySource::Env)));
    }
    let meta = match std::fs::metadata(key_file) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(UsageError(format!(
                "cannot read the root key file {}: {e}",
                key_file.display()
            ))
            .into());
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(UsageError(format!(
            "the root key file {} is readable by group or others (mode {mode:04o}); \
             run `chmod 600 {}`",
            key_file.display(),
            key_file.display()
        ))
        .into());
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(key_file).map_err(|e| {
        UsageError(format!(
            "cannot read the root key file {}: {e}",
            key_file.display()
        ))
    })?);
    let what = format!("root key file {}", key_file.display());
    let keys = RootKeys::parse_list(&text, &what).map_err(UsageError)?;
    Ok(Some((keys, RootKeySource::File(key_file.to_path_buf()))))
}

/// Writes a fresh root key to `key_file` (mode 0600, never overwriting);
/// when another process made the file first, its key is used instead.
fn generate_root_key_file(key_file: &Path) -> anyhow::Result<(RootKeys, RootKeySource)> {
    if let Some(dir) = key_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    }
    let key = RootKey::generate();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key_file);
    match file {
        Ok(mut f) => {
            let line = zeroize::Zeroizing::new(format!("{}\n", &*key.to_base64()));
            f.write_all(line.as_bytes())
                .and_then(|()| f.sync_all())
                .with_context(|| {
                    format!("cannot write the root key file {}", key_file.display())
                })?;
            Ok((
                RootKeys::new(vec![key]),
                RootKeySource::Generated(key_file.to_path_buf()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Another `init` won the race: use its key.
            load_root_keys(key_file)?
                .with_context(|| format!("root key file {} vanished", key_file.display()))
        }
        Err(e) => Err(UsageError(format!(
            "cannot create the root key file {}: {e}",
            key_file.display()
        ))
        .into()),
    }
}

/// The keyring policy from config.
pub fn policy_from_config(config: &Config) -> Policy {
    let p = &config.policy;
    Policy {
        signing: PurposePolicy {
            rotate_after: p.signing.rotate_after.to_chrono(),
            grace: p.signing.grace.to_chrono(),
        },
        token_encryption: PurposePolicy {
            rotate_after: p.token_encryption.rotate_after.to_chrono(),
            grace: p.token_encryption.grace.to_chrono(),
        },
        data: PurposePolicy {
            rotate_after: p.data.rotate_after.to_chrono(),
            grace: chrono::TimeDelta::zero(),
        },
        temp: PurposePolicy {
            rotate_after: p.temp.rotate_after.to_chrono(),
            grace: chrono::TimeDelta::zero(),
        },
    }
}

const CANARY: &str = "root_canary";

impl App {
    /// Opens config, store and root keys and checks the root keys against
    /// the store's canary before anything is written.
    pub async fn open(config: Config, paths: Paths, mode: OpenMode) -> anyhow::Result<App> {
        let mut roots = load_root_keys(&paths.key_file)?;
        let store = Store::connect(&paths.database_url, mode == OpenMode::Create).await?;
        let canary = store.meta(CANARY).await?;
        if canary.is_some() && roots.is_none() && mode == OpenMode::Create {
            // A concurrent `init` wrote the key file before the canary.
            roots = load_root_keys(&paths.key_file)?;
        }
        let (roots, root_source) = match (canary, roots, mode) {
            (Some(canary), Some((roots, source)), _) => {
                if !roots.opens_canary(&canary) {
                    return Err(UsageError(format!(
                        "the root key from {source} does not belong to this keyring store \
                         (its canary does not decrypt): check KEYWARDEN_ROOT_KEY and the data directory"
                    ))
                    .into());
                }
                (roots, source)
            }
            (Some(_), None, _) => {
                return Err(UsageError(format!(
                    "this keyring store was made with a root key, but none was found: \
                     set KEYWARDEN_ROOT_KEY or restore {}",
                    paths.key_file.display()
                ))
                .into());
            }
            (None, _, OpenMode::Existing) => {
                return Err(UsageError(
                    "this keyring is not initialised: run `keywarden init` first".into(),
                )
                .into());
            }
            (None, found, OpenMode::Create) => {
                let (roots, source) = match found {
                    Some(found) => found,
                    None => generate_root_key_file(&paths.key_file)?,
                };
                let now = chrono::Utc::now().timestamp() as u64;
                let canary = store
                    .meta_insert_once(CANARY, &roots.make_canary(now))
                    .await?;
                if !roots.opens_canary(&canary) {
                    return Err(UsageError(format!(
                        "another process initialised this store with a different root key than the one from {source}"
                    ))
                    .into());
                }
                (roots, source)
            }
        };
        let policy = policy_from_config(&config);
        Ok(App {
            config,
            paths,
            store,
            roots,
            root_source,
            policy,
            audit: crate::audit::AuditState::new(crate::audit::Actor::operator_from_env()),
        })
    }
}
