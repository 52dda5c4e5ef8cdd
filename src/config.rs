//! The configuration: loaded once at start from `keywarden.toml` and
//! `KEYWARDEN_*` environment variables, checked, and turned into typed values.
//!
//! Operators write this file by hand and override it from container
//! environments, so a mistake must fail at start with a message that names
//! the dotted key, where it came from (the file or the environment variable),
//! what was given and what is allowed. Secrets in the config (URLs with
//! passwords, webhook URLs) are never echoed in those messages and are
//! redacted by [`Config::to_redacted_toml`].
//!
//! The core, [`Config::from_sources`], is pure: it takes the file text and the
//! environment as arguments. [`Config::load`] is the thin edge that reads the
//! real file and process environment.
//!
//! How a config is read:
//! 1. the file is parsed into a `toml::Table`;
//! 2. every `KEYWARDEN_<SECTION>__<KEY>` variable is checked against the key
//!    schema and written into that table (so the environment wins);
//! 3. the merged table is walked against the schema, which reports unknown
//!    keys and bad values with their dotted path (`serde` alone cannot say
//!    where in the document a value failed);
//! 4. the table is deserialized into [`Config`] and cross-field rules (unique
//!    target names, distinct columns) are checked on the typed values.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};
use zeroize::Zeroizing;

use crate::duration::Duration;

/// The file read when no `--config` or `KEYWARDEN_CONFIG` is given, relative
/// to the working directory. Its absence is not an error.
pub const DEFAULT_CONFIG_FILE: &str = "keywarden.toml";

/// The prefix of every environment variable keywarden reads.
const ENV_PREFIX: &str = "KEYWARDEN_";
/// Names an explicit config file, like `--config`.
const CONFIG_ENV: &str = "KEYWARDEN_CONFIG";
/// The documented short form of `KEYWARDEN_REDIS__URL`.
const REDIS_URL_ENV: &str = "KEYWARDEN_REDIS_URL";
/// What redacted secrets are replaced with.
const REDACTED: &str = "[redacted]";

// ---------------------------------------------------------------------------
// Typed config
// ---------------------------------------------------------------------------

/// The whole, validated configuration. `Default` is the documented default
/// config (the one `keywarden config default` prints).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Rotation policies per key purpose.
    pub policy: PolicyConfig,
    /// JWT issuing and checking.
    pub tokens: TokensConfig,
    /// Key-change events and snapshot sync.
    pub redis: RedisConfig,
    /// The worker's HTTP endpoint.
    pub http: HttpConfig,
    /// Re-encryption of the application's own tables.
    pub reencrypt: ReencryptConfig,
    /// Where alerts go.
    pub alerts: AlertsConfig,
    /// The tamper-evident audit log.
    pub audit: AuditConfig,
    /// Job definitions.
    pub jobs: JobsConfig,
    /// This worker instance.
    pub worker: WorkerConfig,
}

/// Rotation policies, one section per key purpose.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// JWT signing keys (`[policy.signing]`).
    pub signing: SigningPolicy,
    /// Fernet data keys (`[policy.data]`).
    pub data: DataKeyPolicy,
    /// HMAC temp keys (`[policy.temp]`).
    pub temp: TempKeyPolicy,
    /// The A256GCM key for JWE (`[policy.token_encryption]`).
    pub token_encryption: TokenEncryptionPolicy,
}

/// `[policy.signing]`: how JWT signing keys are made and rotated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SigningPolicy {
    /// The algorithm of the next signing key made; existing keys keep theirs.
    pub algorithm: SigningAlgorithm,
    /// Make a new signing key this long after the active one was activated.
    pub rotate_after: Duration,
    /// A retiring signing key still verifies this long.
    pub grace: Duration,
}

impl Default for SigningPolicy {
    fn default() -> Self {
        SigningPolicy {
            algorithm: SigningAlgorithm::Hs256,
            rotate_after: Duration::from_days(90),
            grace: Duration::from_days(1),
        }
    }
}

/// `[policy.data]`: how often Fernet data keys rotate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataKeyPolicy {
    /// Make a new data key this long after the active one was activated.
    pub rotate_after: Duration,
}

impl Default for DataKeyPolicy {
    fn default() -> Self {
        DataKeyPolicy {
            rotate_after: Duration::from_days(30),
        }
    }
}

/// `[policy.temp]`: how often HMAC temp keys rotate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TempKeyPolicy {
    /// Make a new temp key this long after the active one was activated.
    pub rotate_after: Duration,
}

impl Default for TempKeyPolicy {
    fn default() -> Self {
        TempKeyPolicy {
            rotate_after: Duration::from_days(7),
        }
    }
}

/// `[policy.token_encryption]`: the JWE key rotates like signing keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenEncryptionPolicy {
    /// Make a new token-encryption key this long after the active one.
    pub rotate_after: Duration,
    /// A retiring token-encryption key still decrypts this long.
    pub grace: Duration,
}

impl Default for TokenEncryptionPolicy {
    fn default() -> Self {
        TokenEncryptionPolicy {
            rotate_after: Duration::from_days(90),
            grace: Duration::from_days(1),
        }
    }
}

/// A JWT signing algorithm keywarden can make keys for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum SigningAlgorithm {
    /// HMAC with SHA-256.
    #[default]
    #[serde(rename = "HS256")]
    Hs256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    #[serde(rename = "RS256")]
    Rs256,
    /// ECDSA on P-256 with SHA-256.
    #[serde(rename = "ES256")]
    Es256,
    /// Ed25519.
    #[serde(rename = "EdDSA")]
    EdDsa,
}

impl SigningAlgorithm {
    /// Every algorithm, in the order documentation lists them.
    pub const ALL: [SigningAlgorithm; 4] = [
        SigningAlgorithm::Hs256,
        SigningAlgorithm::Rs256,
        SigningAlgorithm::Es256,
        SigningAlgorithm::EdDsa,
    ];

    /// The JOSE `alg` name (`HS256`, `RS256`, `ES256`, `EdDSA`).
    pub const fn as_str(self) -> &'static str {
        match self {
            SigningAlgorithm::Hs256 => "HS256",
            SigningAlgorithm::Rs256 => "RS256",
            SigningAlgorithm::Es256 => "ES256",
            SigningAlgorithm::EdDsa => "EdDSA",
        }
    }
}

/// The JOSE names, for the schema and error messages.
const SIGNING_ALGORITHM_NAMES: &[&str] = &["HS256", "RS256", "ES256", "EdDSA"];

impl fmt::Display for SigningAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A text that is not one of the JOSE names of [`SigningAlgorithm`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a signing algorithm (use HS256, RS256, ES256 or EdDSA)")]
pub struct UnknownSigningAlgorithm(pub String);

impl std::str::FromStr for SigningAlgorithm {
    type Err = UnknownSigningAlgorithm;

    /// Parses the exact JOSE name; `alg` values are case-sensitive in JWTs,
    /// so `hs256` is refused rather than silently accepted.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SigningAlgorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownSigningAlgorithm(shorten(s)))
    }
}

/// `[tokens]`: JWT issuing and checking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokensConfig {
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// Tokens longer than this many bytes are refused before decoding.
    pub max_size: usize,
    /// When set, issued tokens carry `iss` and verification requires it.
    pub issuer: String,
    /// When set, issued tokens carry `aud` and verification requires it.
    pub audience: String,
    /// Lifetime of tokens made by `token sign`/`token encrypt` without `--ttl`.
    pub default_ttl: Duration,
}

impl Default for TokensConfig {
    fn default() -> Self {
        TokensConfig {
            leeway: Duration::from_secs(60),
            max_size: 8192,
            issuer: String::new(),
            audience: String::new(),
            default_ttl: Duration::from_mins(15),
        }
    }
}

impl TokensConfig {
    /// The issuer to set and require, or `None` when not configured.
    pub fn issuer(&self) -> Option<&str> {
        non_empty(&self.issuer)
    }

    /// The audience to set and require, or `None` when not configured.
    pub fn audience(&self) -> Option<&str> {
        non_empty(&self.audience)
    }
}

/// `[redis]`: where key-change events and snapshots are published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://`, `rediss://` or `unix://` URL, or a Redis Cluster as
    /// `redis+cluster://host:port,host:port` or a comma-separated list of
    /// node URLs (see `sync::redis_conn`); empty means no Redis (events
    /// wait in the outbox). Also set by `KEYWARDEN_REDIS_URL`. May hold a
    /// password, hence a [`SecretString`].
    pub url: SecretString,
    /// Subscribers re-check the epoch this often.
    pub poll_interval: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: SecretString::default(),
            poll_interval: Duration::from_secs(1),
        }
    }
}

impl RedisConfig {
    /// The Redis URL, or `None` when Redis is not configured.
    pub fn url(&self) -> Option<&str> {
        non_empty(self.url.expose())
    }
}

/// `[http]`: the worker's HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address and port to listen on.
    pub bind: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 9187)),
        }
    }
}

/// `[reencrypt]`: re-encryption of stored Fernet tokens under the active key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReencryptConfig {
    /// Rows read and rewritten per batch.
    pub batch_size: usize,
    /// Worker threads for decrypt/encrypt; 0 means one per CPU core.
    pub threads: usize,
    /// The application's own tables (`[[reencrypt.targets]]`).
    pub targets: Vec<ReencryptTarget>,
}

impl Default for ReencryptConfig {
    fn default() -> Self {
        ReencryptConfig {
            batch_size: 1000,
            threads: 0,
            targets: Vec::new(),
        }
    }
}

impl ReencryptConfig {
    /// The target with this name, if configured.
    pub fn target(&self, name: &str) -> Option<&ReencryptTarget> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// The number of threads to use given the machine's core count.
    pub fn effective_threads(&self, cores: usize) -> usize {
        if self.threads == 0 {
            cores.max(1)
        } else {
            self.threads
        }
    }
}

/// One `[[reencrypt.targets]]` entry: a table of the application's whose
/// column holds Fernet tokens. Table and column names are checked to be plain
/// SQL identifiers, so they are safe to interpolate (quoted) into SQL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReencryptTarget {
    /// Unique name, chosen with `reencrypt --target NAME`.
    pub name: String,
    /// Empty: keywarden's own store; else a `sqlite:` or `postgres://` URL.
    /// May hold a password, hence a [`SecretString`].
    #[serde(default)]
    pub database_url: SecretString,
    /// Table name, optionally with one `schema.` prefix.
    pub table: String,
    /// Primary-key column.
    #[serde(default = "default_id_column")]
    pub id_column: String,
    /// Column holding the Fernet token.
    pub ciphertext_column: String,
    /// Optional column holding the key id; empty means keys are tried in
    /// MultiFernet order.
    #[serde(default)]
    pub kid_column: String,
    /// Optional SQL condition limiting the rows visited (without `WHERE`).
    /// It comes from the operator's own config and is used verbatim, so it is
    /// trusted input; it may not contain `;`.
    #[serde(default)]
    pub filter: String,
}

fn default_id_column() -> String {
    "id".to_string()
}

impl ReencryptTarget {
    /// The database URL, or `None` for keywarden's own store.
    pub fn database_url(&self) -> Option<&str> {
        non_empty(self.database_url.expose())
    }

    /// The key-id column, or `None` when keys are tried in order.
    pub fn kid_column(&self) -> Option<&str> {
        non_empty(&self.kid_column)
    }

    /// The row filter, or `None` for all rows.
    pub fn filter(&self) -> Option<&str> {
        non_empty(&self.filter)
    }
}

/// `[alerts]`: alert channels; a channel with empty settings is off.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// `[alerts.email]`.
    pub email: EmailConfig,
    /// `[alerts.slack]`.
    pub slack: SlackConfig,
    /// `[alerts.webhook]`.
    pub webhook: WebhookConfig,
    /// `[alerts.delivery]`: retries, backoff and timeouts for every channel.
    pub delivery: DeliveryConfig,
    /// `[[alerts.rules]]`: overrides of the seed rules (same `name`) and
    /// extra rules; the four seed rules apply without any entry.
    pub rules: Vec<AlertRuleConfig>,
}

/// `[alerts.delivery]`: how hard a channel is tried before its message goes
/// to the dead letters. Milliseconds, so tests can make it quick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Attempts per message and channel, the first included.
    pub attempts: u32,
    /// Delay before the first retry; it doubles on each retry (with jitter).
    pub backoff_ms: u64,
    /// Upper bound of one delay, also for a `Retry-After` the receiver asks for.
    pub max_backoff_ms: u64,
    /// One attempt is abandoned after this long.
    pub timeout_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            attempts: 5,
            backoff_ms: 1000,
            max_backoff_ms: 60_000,
            timeout_ms: 10_000,
        }
    }
}

/// A number in the config that compares equal bit for bit (NaN is refused
/// by the schema check, so `Eq` holds).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Number(pub f64);

impl Eq for Number {}

/// One `[[alerts.rules]]` entry. With the `name` of a seed rule
/// (`verification_failure_rate`, `signing_latency`, `sync_lag`,
/// `rotation_success_rate`) it overrides the keys it gives; with a new name
/// it adds a rule and must give `figure` and `threshold`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRuleConfig {
    /// Unique rule name.
    pub name: String,
    /// What is measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub figure: Option<String>,
    /// `above` or `below` the threshold is bad.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparison: Option<String>,
    /// In the figure's unit (percent, milliseconds, seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<Number>,
    /// How far back the figure looks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Duration>,
    /// `info`, `warning` or `critical`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    /// Where it goes; empty: every configured channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
    /// A still-firing rule reminds this often; 0s: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown: Option<Duration>,
    /// Still firing after this long: also sent to `escalate_channels`; 0s: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalate_after: Option<Duration>,
    /// The escalation channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalate_channels: Option<Vec<String>>,
}

/// Names of the figures a rule can watch.
pub const ALERT_FIGURES: &[&str] = &[
    "verification_failure_rate",
    "signing_latency",
    "sync_lag",
    "rotation_success_rate",
];
/// Names of the alert channels.
pub const ALERT_CHANNELS: &[&str] = &["email", "slack", "webhook"];

/// `[alerts.email]`: SMTP delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmailConfig {
    /// SMTP server; empty turns email alerts off.
    pub smtp_host: String,
    /// SMTP port.
    pub smtp_port: u16,
    /// Transport security.
    pub tls: EmailTls,
    /// SMTP user name; empty means no authentication.
    pub username: String,
    /// Name of the environment variable holding the SMTP password (the
    /// password itself never lives in the config).
    pub password_env: String,
    /// Sender address.
    pub from: String,
    /// Recipient addresses.
    pub to: Vec<String>,
}

impl Default for EmailConfig {
    fn default() -> Self {
        EmailConfig {
            smtp_host: String::new(),
            smtp_port: 587,
            tls: EmailTls::Starttls,
            username: String::new(),
            password_env: String::new(),
            from: String::new(),
            to: Vec::new(),
        }
    }
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmailTls {
    /// Plain text (only for a local relay).
    None,
    /// Upgrade with STARTTLS, required.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Tls,
}

impl EmailTls {
    /// The config spelling: `none`, `starttls` or `tls`.
    pub const fn as_str(self) -> &'static str {
        match self {
            EmailTls::None => "none",
            EmailTls::Starttls => "starttls",
            EmailTls::Tls => "tls",
        }
    }
}

/// `[alerts.slack]`: Slack incoming webhook.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlackConfig {
    /// The incoming-webhook URL; it is a bearer credential, so it is secret.
    /// Empty turns Slack alerts off.
    pub webhook_url: SecretString,
}

/// `[alerts.webhook]`: a generic signed JSON webhook.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where alerts are POSTed; empty turns webhook alerts off. Its query
    /// string may carry a token, so it is secret.
    pub url: SecretString,
    /// Name of the environment variable holding the HMAC signing secret.
    pub secret_env: String,
}

/// `[audit]`: the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Audit rows older than this may be pruned (after a checkpoint).
    pub retention: Duration,
    /// Where chain checkpoints are written; empty means
    /// `<data-dir>/checkpoints`.
    pub checkpoint_dir: PathBuf,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            retention: Duration::from_days(365),
            checkpoint_dir: PathBuf::new(),
        }
    }
}

impl AuditConfig {
    /// The checkpoint directory, resolving the empty default against the
    /// data directory.
    pub fn checkpoint_dir_in(&self, data_dir: &Path) -> PathBuf {
        if self.checkpoint_dir.as_os_str().is_empty() {
            data_dir.join("checkpoints")
        } else {
            self.checkpoint_dir.clone()
        }
    }
}

/// `[jobs]`: where job definitions are read from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Directory of job TOML files; empty means `KEYWARDEN_JOBS_DIR` or the
    /// shipped `jobs/`.
    pub dir: PathBuf,
}

impl JobsConfig {
    /// The jobs directory: this setting, else `KEYWARDEN_JOBS_DIR` (passed in
    /// by the caller), else the shipped directory.
    pub fn resolve_dir(&self, env_dir: Option<&Path>, shipped: &Path) -> PathBuf {
        if !self.dir.as_os_str().is_empty() {
            self.dir.clone()
        } else if let Some(dir) = env_dir.filter(|d| !d.as_os_str().is_empty()) {
            dir.to_path_buf()
        } else {
            shipped.to_path_buf()
        }
    }
}

/// `[worker]`: this worker instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Instance id used for leases and Redis acknowledgements; empty means
    /// `<hostname>-<pid>`.
    pub id: String,
    /// How long a job's lease lasts without renewal: a worker that dies
    /// mid-job blocks that job's next runs at most this long.
    pub lease_ttl: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: String::new(),
            lease_ttl: Duration::from_secs(30),
        }
    }
}

impl WorkerConfig {
    /// The instance id, building the `<hostname>-<pid>` default when unset.
    pub fn resolve_id(&self, hostname: &str, pid: u32) -> String {
        if self.id.is_empty() {
            format!("{hostname}-{pid}")
        } else {
            self.id.clone()
        }
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

// ---------------------------------------------------------------------------
// Secret strings
// ---------------------------------------------------------------------------

/// A config string that may hold a credential (a URL with a password, a
/// webhook URL). It is wiped from memory on drop, prints as `[redacted]` in
/// `Debug`, and compares in constant time. Read it with
/// [`SecretString::expose`] only where it is used.
#[derive(Clone, Default)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        SecretString(Zeroizing::new(value.into()))
    }

    /// The secret value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty (the setting is off).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Saying that a secret is unset helps debugging and reveals nothing.
        if self.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str(REDACTED)
        }
    }
}

impl PartialEq for SecretString {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.expose().as_bytes(), other.expose().as_bytes());
        if a.len() != b.len() {
            return false;
        }
        // Accumulate differences over every byte so the time taken does not
        // depend on where the first difference is.
        let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        std::hint::black_box(diff) == 0
    }
}

impl Eq for SecretString {}

impl Serialize for SecretString {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.expose())
    }
}

impl<'de> Deserialize<'de> for SecretString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(SecretString::new)
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Where a config value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The config file at this path.
    File(PathBuf),
    /// This environment variable.
    Env(String),
    /// Neither: a built-in default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Default => f.write_str("built-in defaults"),
        }
    }
}

/// Why the configuration could not be loaded. Every message names the file
/// or variable at fault; none contains a secret value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read (an explicit file must exist).
    #[error("cannot read config file {}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("{}:{line}:{column}: TOML syntax error: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// The parser's description.
        message: String,
    },
    /// A key that is not part of the schema, usually a typo.
    #[error("unknown config key \"{key}\" in {origin}")]
    UnknownKey {
        /// Dotted path, e.g. `policy.data.rotate_aftr`.
        key: String,
        /// The file or environment variable it came from.
        origin: Origin,
    },
    /// A known key with a value that is not allowed.
    #[error("{origin}: {key}: {problem}")]
    BadValue {
        /// Dotted path, e.g. `policy.data.rotate_after` or
        /// `reencrypt.targets[0].table`.
        key: String,
        /// The file or environment variable it came from.
        origin: Origin,
        /// What was given (unless the key may hold a secret) and what is
        /// allowed.
        problem: String,
    },
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

impl Config {
    /// Reads the config file and the process environment.
    ///
    /// `path` is the `--config` flag; without it `KEYWARDEN_CONFIG` is used,
    /// and without that `keywarden.toml` in the working directory if it
    /// exists. An explicitly named file must exist.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_with_source(path).map(|(config, _)| config)
    }

    /// [`Config::load`], also saying where the config came from: the file's
    /// path, or `defaults` when no file was named and `keywarden.toml` does
    /// not exist (the worker records it in the audit log).
    pub fn load_with_source(path: Option<&Path>) -> Result<(Config, String), ConfigError> {
        let env = process_env()?;
        let from_env = env
            .iter()
            .find(|(name, value)| name == CONFIG_ENV && !value.is_empty())
            .map(|(_, value)| PathBuf::from(value));
        let (path, explicit) = match (path, from_env) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(p)) => (p, true),
            (None, None) => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(ConfigError::Unreadable { path, source }),
        };
        let source = match &text {
            Some(_) => path.display().to_string(),
            None => "defaults".to_string(),
        };
        let config = Config::from_sources(text.as_deref().map(|t| (path.as_path(), t)), &env)?;
        Ok((config, source))
    }

    /// Builds the config from a file's text (with its path, for messages) and
    /// an environment given as name/value pairs. Pure: no IO.
    ///
    /// Environment variables override the file. Only `KEYWARDEN_*` names
    /// containing `__` are config keys, plus `KEYWARDEN_REDIS_URL` which sets
    /// `redis.url` (applied first, so `KEYWARDEN_REDIS__URL` wins if both are
    /// set). Other `KEYWARDEN_*` variables belong to the CLI and are ignored.
    pub fn from_sources(
        file_text: Option<(&Path, &str)>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut origins = Origins {
            file: file_text.map(|(path, _)| path.to_path_buf()),
            env: Vec::new(),
        };
        let mut table = match file_text {
            Some((path, text)) => parse_file(path, text)?,
            None => Table::new(),
        };
        apply_env(&mut table, env, &mut origins)?;
        check_section(&table, SCHEMA, "", &origins)?;
        let config: Config = Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::BadValue {
                // The schema walk above checks everything serde checks, so
                // this is a schema/struct mismatch; report it rather than
                // panic.
                key: "(config)".to_string(),
                origin: origins.of(""),
                problem: e.message().to_string(),
            })?;
        config.check_cross_field(&origins)?;
        Ok(config)
    }

    /// Rules that relate several values, checked on the typed config.
    fn check_cross_field(&self, origins: &Origins) -> Result<(), ConfigError> {
        let rules = &self.alerts.rules;
        for (i, rule) in rules.iter().enumerate() {
            let path = format!("alerts.rules[{i}]");
            if let Some(first) = rules[..i].iter().position(|r| r.name == rule.name) {
                return Err(bad(
                    origins,
                    &format!("{path}.name"),
                    format!(
                        "{:?} is already the name of alerts.rules[{first}]; rule names must be unique",
                        rule.name
                    ),
                ));
            }
            let seed = ALERT_FIGURES.contains(&rule.name.as_str());
            if !seed && (rule.figure.is_none() || rule.threshold.is_none()) {
                return Err(bad(
                    origins,
                    &format!("{path}.name"),
                    format!(
                        "{:?} is not a seed rule ({}), so it must give figure and threshold",
                        rule.name,
                        ALERT_FIGURES.join(", ")
                    ),
                ));
            }
        }
        if self.alerts.delivery.max_backoff_ms < self.alerts.delivery.backoff_ms {
            return Err(bad(
                origins,
                "alerts.delivery.max_backoff_ms",
                "must be at least alerts.delivery.backoff_ms".to_string(),
            ));
        }
        let targets = &self.reencrypt.targets;
        for (i, target) in targets.iter().enumerate() {
            let path = format!("reencrypt.targets[{i}]");
            if let Some(first) = targets[..i].iter().position(|t| t.name == target.name) {
                return Err(bad(
                    origins,
                    &format!("{path}.name"),
                    format!(
                        "{:?} is already the name of reencrypt.targets[{first}]; target names must be unique",
                        target.name
                    ),
                ));
            }
            if target.ciphertext_column == target.id_column {
                return Err(bad(
                    origins,
                    &format!("{path}.ciphertext_column"),
                    format!(
                        "{:?} is also the id_column; the ciphertext needs its own column",
                        target.ciphertext_column
                    ),
                ));
            }
            if !target.kid_column.is_empty()
                && (target.kid_column == target.ciphertext_column
                    || target.kid_column == target.id_column)
            {
                return Err(bad(
                    origins,
                    &format!("{path}.kid_column"),
                    format!(
                        "{:?} is also the id or ciphertext column; the key id needs its own column (or leave it empty)",
                        target.kid_column
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The process environment as UTF-8 pairs. Non-UTF-8 variables that are not
/// ours are skipped; one of ours that is not UTF-8 is an error.
fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Ok(name) = name.into_string() else {
            continue;
        };
        match value.into_string() {
            Ok(value) => env.push((name, value)),
            Err(_) if name.starts_with(ENV_PREFIX) => {
                return Err(ConfigError::BadValue {
                    key: env_path(&name).unwrap_or_default(),
                    origin: Origin::Env(name),
                    problem: "the value is not valid UTF-8".to_string(),
                });
            }
            Err(_) => {}
        }
    }
    Ok(env)
}

fn parse_file(path: &Path, text: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|e| {
        let (line, column) = e.span().map_or((1, 1), |span| line_col(text, span.start));
        ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })
}

/// 1-based line and character column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut line = 1;
    let mut column = 1;
    for (i, c) in text.char_indices() {
        if i >= offset {
            break;
        }
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    (line, column)
}

/// Which environment variable last set which dotted path, so errors can name
/// the variable instead of the file.
struct Origins {
    file: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl Origins {
    fn of(&self, key: &str) -> Origin {
        let set_by_env = self.env.iter().rev().find(|(path, _)| {
            key == path
                || key
                    .strip_prefix(path.as_str())
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        });
        match (set_by_env, &self.file) {
            (Some((_, var)), _) => Origin::Env(var.clone()),
            (None, Some(file)) => Origin::File(file.clone()),
            (None, None) => Origin::Default,
        }
    }
}

fn bad(origins: &Origins, key: &str, problem: String) -> ConfigError {
    ConfigError::BadValue {
        key: key.to_string(),
        origin: origins.of(key),
        problem,
    }
}

/// The dotted key an environment variable names, if it names one:
/// `KEYWARDEN_POLICY__DATA__ROTATE_AFTER` -> `policy.data.rotate_after`.
fn env_path(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    rest.contains("__").then(|| {
        rest.split("__")
            .collect::<Vec<_>>()
            .join(".")
            .to_lowercase()
    })
}

/// The environment variable that sets a dotted key:
/// `policy.data.rotate_after` -> `KEYWARDEN_POLICY__DATA__ROTATE_AFTER`.
pub fn env_var_for(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "__").to_uppercase())
}

fn apply_env(
    table: &mut Table,
    env: &[(String, String)],
    origins: &mut Origins,
) -> Result<(), ConfigError> {
    let mut overrides: Vec<(String, &String, &String)> = env
        .iter()
        .filter_map(|(name, value)| env_path(name).map(|path| (path, name, value)))
        .collect();
    // Sorting makes the result independent of the order the OS lists
    // variables in when two of them name the same key in different case.
    overrides.sort_by(|a, b| a.1.cmp(b.1));
    let redis = env
        .iter()
        .find(|(name, _)| name == REDIS_URL_ENV)
        .map(|(name, value)| ("redis.url".to_string(), name, value));
    for (path, var, raw) in redis.into_iter().chain(overrides) {
        let segments: Vec<&str> = path.split('.').collect();
        let unknown = || ConfigError::UnknownKey {
            key: path.clone(),
            origin: Origin::Env(var.clone()),
        };
        let kind = resolve(&segments).ok_or_else(unknown)?;
        if let Kind::Section(fields) = kind {
            let example = fields.first().map_or(String::new(), |f| {
                format!(", e.g. {}", env_var_for(&format!("{path}.{}", f.name)))
            });
            return Err(ConfigError::BadValue {
                key: path.clone(),
                origin: Origin::Env(var.clone()),
                problem: format!("this names a section; set one of its keys instead{example}"),
            });
        }
        let value = env_value(kind, raw);
        insert(table, &segments, value, origins)?;
        origins.env.push((path.clone(), var.clone()));
    }
    Ok(())
}

/// Finds the schema kind of a dotted key, descending only through sections
/// (a key inside an array of tables cannot be addressed from the
/// environment; the whole array must be given).
fn resolve(segments: &[&str]) -> Option<Kind> {
    let mut fields = SCHEMA;
    let (last, parents) = segments.split_last()?;
    for segment in parents {
        match fields.iter().find(|f| f.name == *segment)?.kind {
            Kind::Section(inner) => fields = inner,
            _ => return None,
        }
    }
    fields.iter().find(|f| f.name == *last).map(|f| f.kind)
}

/// Turns an environment value into a TOML value. Keys whose schema wants a
/// string always get the raw text, so `KEYWARDEN_TOKENS__ISSUER=123` is the
/// string "123"; others take the text as a TOML integer, boolean or array
/// literal when it is one (`["a@x","b@y"]`, `8192`).
fn env_value(kind: Kind, raw: &str) -> Value {
    let literal_allowed = matches!(
        kind,
        Kind::Int { .. } | Kind::Number | Kind::Sections(_) | Kind::EmailList | Kind::ChoiceList(_)
    );
    if literal_allowed
        && let Ok(value) = raw.parse::<Value>()
        && matches!(
            value,
            Value::Integer(_) | Value::Boolean(_) | Value::Array(_)
        )
    {
        return value;
    }
    Value::String(raw.to_string())
}

fn insert(
    table: &mut Table,
    segments: &[&str],
    value: Value,
    origins: &Origins,
) -> Result<(), ConfigError> {
    let Some((last, parents)) = segments.split_last() else {
        return Ok(());
    };
    let mut current = table;
    for (depth, segment) in parents.iter().enumerate() {
        let entry = current
            .entry(segment.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        let path = segments[..=depth].join(".");
        current = match entry {
            Value::Table(inner) => inner,
            other => {
                return Err(bad(
                    origins,
                    &path,
                    format!(
                        "expected a section [{path}], got {}",
                        describe(other, false)
                    ),
                ));
            }
        };
    }
    current.insert(last.to_string(), value);
    Ok(())
}

// ---------------------------------------------------------------------------
// Schema and checks
// ---------------------------------------------------------------------------

/// What a key holds, and so how it is checked and how its errors read.
#[derive(Clone, Copy)]
enum Kind {
    /// A table of further keys.
    Section(&'static [Field]),
    /// An array of tables with these keys.
    Sections(&'static [Field]),
    /// A [`Duration`] string; `nonzero` refuses `0s`.
    Duration { nonzero: bool },
    /// Any string.
    Text,
    /// An integer in an inclusive range.
    Int { min: i64, max: i64 },
    /// One of a fixed set of strings.
    Choice(&'static [&'static str]),
    /// An IP address and port.
    SocketAddr,
    /// Empty, or a URL with one of these prefixes. May hold a secret.
    Url(&'static [&'static str]),
    /// Empty, or the name of an environment variable.
    EnvName,
    /// Empty, or an email address.
    Email,
    /// An array of email addresses.
    EmailList,
    /// A SQL table name with an optional `schema.` prefix.
    TableName,
    /// A SQL column name; `optional` allows empty.
    ColumnName { optional: bool },
    /// A reencrypt target name.
    TargetName,
    /// A SQL condition.
    Filter,
    /// A finite number (integer or float).
    Number,
    /// An array of strings, each one of a fixed set.
    ChoiceList(&'static [&'static str]),
}

impl Kind {
    /// Whether a bad value of this kind must not be echoed. URLs may carry
    /// credentials, and a value that is not an env var name is probably the
    /// secret itself pasted into the wrong key.
    fn secret(self) -> bool {
        matches!(self, Kind::Url(_) | Kind::EnvName)
    }
}

/// One key of the schema.
struct Field {
    name: &'static str,
    kind: Kind,
    required: bool,
}

const fn key(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        required: false,
    }
}

const fn required(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        required: true,
    }
}

const DURATION: Kind = Kind::Duration { nonzero: false };
const INTERVAL: Kind = Kind::Duration { nonzero: true };
const WEB_URL: Kind = Kind::Url(&["https://", "http://"]);

const SCHEMA: &[Field] = &[
    key(
        "policy",
        Kind::Section(&[
            key(
                "signing",
                Kind::Section(&[
                    key("algorithm", Kind::Choice(SIGNING_ALGORITHM_NAMES)),
                    key("rotate_after", INTERVAL),
                    key("grace", DURATION),
                ]),
            ),
            key("data", Kind::Section(&[key("rotate_after", INTERVAL)])),
            key("temp", Kind::Section(&[key("rotate_after", INTERVAL)])),
            key(
                "token_encryption",
                Kind::Section(&[key("rotate_after", INTERVAL), key("grace", DURATION)]),
            ),
        ]),
    ),
    key(
        "tokens",
        Kind::Section(&[
            key("leeway", DURATION),
            key(
                "max_size",
                Kind::Int {
                    min: 1,
                    max: 16 * 1024 * 1024,
                },
            ),
            key("issuer", Kind::Text),
            key("audience", Kind::Text),
            key("default_ttl", INTERVAL),
        ]),
    ),
    key(
        "redis",
        Kind::Section(&[
            key(
                "url",
                Kind::Url(&[
                    "redis://",
                    "rediss://",
                    "redis+unix://",
                    "unix://",
                    "redis+cluster://",
                    "rediss+cluster://",
                ]),
            ),
            key("poll_interval", INTERVAL),
        ]),
    ),
    key("http", Kind::Section(&[key("bind", Kind::SocketAddr)])),
    key(
        "reencrypt",
        Kind::Section(&[
            key(
                "batch_size",
                Kind::Int {
                    min: 1,
                    max: 1_000_000,
                },
            ),
            key("threads", Kind::Int { min: 0, max: 1024 }),
            key(
                "targets",
                Kind::Sections(&[
                    required("name", Kind::TargetName),
                    key(
                        "database_url",
                        Kind::Url(&["sqlite:", "postgres://", "postgresql://"]),
                    ),
                    required("table", Kind::TableName),
                    key("id_column", Kind::ColumnName { optional: false }),
                    required("ciphertext_column", Kind::ColumnName { optional: false }),
                    key("kid_column", Kind::ColumnName { optional: true }),
                    key("filter", Kind::Filter),
                ]),
            ),
        ]),
    ),
    key(
        "alerts",
        Kind::Section(&[
            key(
                "email",
                Kind::Section(&[
                    key("smtp_host", Kind::Text),
                    key("smtp_port", Kind::Int { min: 1, max: 65535 }),
                    key("tls", Kind::Choice(&["none", "starttls", "tls"])),
                    key("username", Kind::Text),
                    key("password_env", Kind::EnvName),
                    key("from", Kind::Email),
                    key("to", Kind::EmailList),
                ]),
            ),
            key("slack", Kind::Section(&[key("webhook_url", WEB_URL)])),
            key(
                "webhook",
                Kind::Section(&[key("url", WEB_URL), key("secret_env", Kind::EnvName)]),
            ),
            key(
                "delivery",
                Kind::Section(&[
                    key("attempts", Kind::Int { min: 1, max: 100 }),
                    key(
                        "backoff_ms",
                        Kind::Int {
                            min: 1,
                            max: 3_600_000,
                        },
                    ),
                    key(
                        "max_backoff_ms",
                        Kind::Int {
                            min: 1,
                            max: 86_400_000,
                        },
                    ),
                    key(
                        "timeout_ms",
                        Kind::Int {
                            min: 1,
                            max: 600_000,
                        },
                    ),
                ]),
            ),
            key(
                "rules",
                Kind::Sections(&[
                    required("name", Kind::TargetName),
                    key("figure", Kind::Choice(ALERT_FIGURES)),
                    key("comparison", Kind::Choice(&["above", "below"])),
                    key("threshold", Kind::Number),
                    key("window", INTERVAL),
                    key("severity", Kind::Choice(&["info", "warning", "critical"])),
                    key("channels", Kind::ChoiceList(ALERT_CHANNELS)),
                    key("cooldown", DURATION),
                    key("escalate_after", DURATION),
                    key("escalate_channels", Kind::ChoiceList(ALERT_CHANNELS)),
                ]),
            ),
        ]),
    ),
    key(
        "audit",
        Kind::Section(&[
            key("retention", INTERVAL),
            key("checkpoint_dir", Kind::Text),
        ]),
    ),
    key("jobs", Kind::Section(&[key("dir", Kind::Text)])),
    key(
        "worker",
        Kind::Section(&[key("id", Kind::Text), key("lease_ttl", INTERVAL)]),
    ),
];

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Shortens text quoted in an error so a pasted blob cannot flood a log line.
fn shorten(text: &str) -> String {
    const LIMIT: usize = 60;
    if text.chars().count() <= LIMIT {
        text.to_string()
    } else {
        let mut s: String = text.chars().take(LIMIT).collect();
        s.push('…');
        s
    }
}

/// "integer 30", "string \"x\"", or only the type when the key is secret.
fn describe(value: &Value, secret: bool) -> String {
    let kind = value.type_str();
    if secret {
        let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        return format!("{article} {kind} (value not shown)");
    }
    match value {
        Value::String(s) => format!("string {:?}", shorten(s)),
        other => format!("{kind} {}", shorten(other.to_string().trim())),
    }
}

fn check_section(
    table: &Table,
    fields: &[Field],
    path: &str,
    origins: &Origins,
) -> Result<(), ConfigError> {
    for (name, value) in table {
        let key_path = join(path, name);
        let Some(field) = fields.iter().find(|f| f.name == name) else {
            return Err(ConfigError::UnknownKey {
                origin: origins.of(&key_path),
                key: key_path,
            });
        };
        check_value(value, field.kind, &key_path, origins)?;
    }
    if let Some(missing) = fields
        .iter()
        .find(|f| f.required && !table.contains_key(f.name))
    {
        let needed: Vec<&str> = fields
            .iter()
            .filter(|f| f.required)
            .map(|f| f.name)
            .collect();
        return Err(bad(
            origins,
            &join(path, missing.name),
            format!("missing; each entry needs {}", needed.join(", ")),
        ));
    }
    Ok(())
}

fn check_value(
    value: &Value,
    kind: Kind,
    path: &str,
    origins: &Origins,
) -> Result<(), ConfigError> {
    let got = || describe(value, kind.secret());
    let fail = |problem: String| Err(bad(origins, path, problem));
    match kind {
        Kind::Section(fields) => match value {
            Value::Table(table) => check_section(table, fields, path, origins),
            _ => fail(format!("expected a section [{path}], got {}", got())),
        },
        Kind::Sections(fields) => {
            let Some(items) = value.as_array() else {
                return fail(format!(
                    "expected an array of tables [[{path}]], got {}",
                    got()
                ));
            };
            for (i, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{i}]");
                match item {
                    Value::Table(table) => check_section(table, fields, &item_path, origins)?,
                    other => {
                        return Err(bad(
                            origins,
                            &item_path,
                            // An entry that is not a table may well be a
                            // database URL written in the wrong place.
                            format!("expected a table, got {}", describe(other, true)),
                        ));
                    }
                }
            }
            Ok(())
        }
        Kind::Duration { nonzero } => {
            let Some(text) = value.as_str() else {
                return fail(format!(
                    "expected a duration such as 30d, 12h, 15m or 30s, got {}",
                    got()
                ));
            };
            match text.parse::<Duration>() {
                Err(e) => fail(e.to_string()),
                Ok(d) if nonzero && d.is_zero() => fail(format!(
                    "{text:?} is too short; this must be longer than 0s"
                )),
                Ok(_) => Ok(()),
            }
        }
        Kind::Text => match value {
            Value::String(_) => Ok(()),
            _ => fail(format!("expected a string, got {}", got())),
        },
        Kind::Int { min, max } => match value.as_integer() {
            Some(n) if (min..=max).contains(&n) => Ok(()),
            Some(n) => fail(format!("{n} is out of range (allowed: {min} to {max})")),
            None => fail(format!(
                "expected an integer from {min} to {max}, got {}",
                got()
            )),
        },
        Kind::Choice(choices) => match value.as_str() {
            Some(s) if choices.contains(&s) => Ok(()),
            Some(s) => fail(format!(
                "{:?} is not one of: {}",
                shorten(s),
                choices.join(", ")
            )),
            None => fail(format!(
                "expected one of: {}, got {}",
                choices.join(", "),
                got()
            )),
        },
        Kind::SocketAddr => match value.as_str() {
            Some(s) if s.parse::<SocketAddr>().is_ok() => Ok(()),
            Some(s) => fail(format!(
                "{:?} is not an IP address and port (use e.g. 127.0.0.1:9187 or [::]:9187)",
                shorten(s)
            )),
            None => fail(format!(
                "expected an address and port such as \"127.0.0.1:9187\", got {}",
                got()
            )),
        },
        Kind::Url(prefixes) => match value.as_str() {
            Some(s) if is_allowed_url(s, prefixes) => Ok(()),
            Some(_) => fail(format!(
                "not a supported URL (value not shown, it may hold a secret); leave it empty or start it with {}",
                prefixes.join(" or ")
            )),
            None => fail(format!("expected a URL string, got {}", got())),
        },
        Kind::EnvName => match value.as_str() {
            Some(s) if s.is_empty() || is_env_name(s) => Ok(()),
            Some(_) => fail(
                "must be the name of an environment variable (letters, digits, underscore), \
                 not the secret itself (value not shown)"
                    .to_string(),
            ),
            None => fail(format!(
                "expected the name of an environment variable, got {}",
                got()
            )),
        },
        Kind::Email => match value.as_str() {
            Some(s) if s.is_empty() || is_email(s) => Ok(()),
            Some(s) => fail(format!(
                "{:?} is not an email address (use e.g. ops@example.com or \"Ops <ops@example.com>\")",
                shorten(s)
            )),
            None => fail(format!("expected an email address, got {}", got())),
        },
        Kind::EmailList => {
            let Some(items) = value.as_array() else {
                return fail(format!(
                    "expected an array of email addresses such as [\"ops@example.com\"], got {}",
                    got()
                ));
            };
            for (i, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{i}]");
                match item.as_str() {
                    Some(s) if is_email(s) => {}
                    Some(s) => {
                        return Err(bad(
                            origins,
                            &item_path,
                            format!(
                                "{:?} is not an email address (use e.g. ops@example.com)",
                                shorten(s)
                            ),
                        ));
                    }
                    None => {
                        return Err(bad(
                            origins,
                            &item_path,
                            format!("expected an email address, got {}", describe(item, false)),
                        ));
                    }
                }
            }
            Ok(())
        }
        Kind::TableName => match value.as_str() {
            Some(s) if is_table_name(s) => Ok(()),
            Some(s) => fail(format!(
                "{:?} is not a SQL table name (letters, digits and underscore, not starting with a digit, at most 63 characters, optionally one schema. prefix)",
                shorten(s)
            )),
            None => fail(format!("expected a table name, got {}", got())),
        },
        Kind::ColumnName { optional } => match value.as_str() {
            Some(s) if (optional && s.is_empty()) || is_sql_identifier(s) => Ok(()),
            Some(s) => fail(format!(
                "{:?} is not a SQL column name (letters, digits and underscore, not starting with a digit, at most 63 characters)",
                shorten(s)
            )),
            None => fail(format!("expected a column name, got {}", got())),
        },
        Kind::TargetName => match value.as_str() {
            Some(s) if is_target_name(s) => Ok(()),
            Some(s) => fail(format!(
                "{:?} is not a target name (1 to 63 letters, digits, '_' or '-')",
                shorten(s)
            )),
            None => fail(format!("expected a target name, got {}", got())),
        },
        Kind::Number => match value {
            Value::Integer(_) => Ok(()),
            Value::Float(f) if f.is_finite() => Ok(()),
            _ => fail(format!("expected a finite number, got {}", got())),
        },
        Kind::ChoiceList(choices) => {
            let Some(items) = value.as_array() else {
                return fail(format!(
                    "expected an array of: {}, got {}",
                    choices.join(", "),
                    got()
                ));
            };
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(s) if choices.contains(&s) => {}
                    _ => {
                        return Err(bad(
                            origins,
                            &format!("{path}[{i}]"),
                            format!(
                                "{} is not one of: {}",
                                describe(item, false),
                                choices.join(", ")
                            ),
                        ));
                    }
                }
            }
            Ok(())
        }
        Kind::Filter => match value.as_str() {
            Some(s) if !s.contains(';') => Ok(()),
            Some(s) => fail(format!(
                "{:?} contains \";\"; a filter is a single SQL condition such as \"tenant_id = 7\"",
                shorten(s)
            )),
            None => fail(format!("expected a SQL condition string, got {}", got())),
        },
    }
}

/// A plain SQL identifier: ASCII letters, digits and underscore, not starting
/// with a digit, 1 to 63 characters (PostgreSQL's limit). Nothing that needs
/// quoting, so nothing that can break out of a quoted identifier.
pub fn is_sql_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    s.len() <= 63
        && (first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A table name: an identifier with at most one `schema.` prefix.
pub fn is_table_name(s: &str) -> bool {
    match s.split_once('.') {
        Some((schema, table)) => is_sql_identifier(schema) && is_sql_identifier(table),
        None => is_sql_identifier(s),
    }
}

fn is_target_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A loose address check (`local@domain`, optionally `Name <local@domain>`):
/// enough to catch a value in the wrong key; the SMTP library does the rest.
fn is_email(s: &str) -> bool {
    let address = match s.rsplit_once('<') {
        Some((_, rest)) => match rest.strip_suffix('>') {
            Some(address) => address,
            None => return false,
        },
        None => s,
    };
    let Some((local, domain)) = address.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.is_empty()
        && !domain.contains('@')
        && !address
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
}

fn is_allowed_url(s: &str, prefixes: &[&str]) -> bool {
    s.is_empty()
        || (prefixes.iter().any(|p| s.starts_with(p))
            && !s.chars().any(|c| c.is_whitespace() || c.is_control()))
}

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

impl Config {
    /// The effective config as TOML for `config show`, with secrets replaced
    /// by `[redacted]`: the Slack webhook URL entirely, the webhook URL's
    /// query string, and any password in the userinfo or a password-like
    /// query parameter of the Redis and database URLs. Names of environment
    /// variables are shown, as they are not secrets.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.redis.url = SecretString::new(redact_url(self.redis.url.expose(), false));
        if !self.alerts.slack.webhook_url.is_empty() {
            shown.alerts.slack.webhook_url = SecretString::new(REDACTED);
        }
        shown.alerts.webhook.url =
            SecretString::new(redact_url(self.alerts.webhook.url.expose(), true));
        for target in &mut shown.reencrypt.targets {
            target.database_url =
                SecretString::new(redact_url(target.database_url.expose(), false));
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render the config: {e}\n"))
    }

    /// An annotated config file with every key, its default and a one-line
    /// comment, for `config default`. It parses to exactly
    /// `Config::default()`.
    pub fn default_annotated() -> &'static str {
        DEFAULT_ANNOTATED
    }
}

/// Redacts the password in a URL's userinfo and the values of password-like
/// query parameters, or the whole query string when `whole_query` is set.
///
/// When in doubt it redacts too much: a malformed URL whose password holds
/// `/` or `?` still has everything up to the last `@` treated as userinfo.
fn redact_url(url: &str, whole_query: bool) -> String {
    let url = redact_userinfo(url);
    match url.split_once('?') {
        None => url,
        Some((base, _)) if whole_query => format!("{base}?{REDACTED}"),
        Some((base, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((name, _)) if is_secret_param(name) => format!("{name}={REDACTED}"),
                    _ => param.to_string(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
    }
}

fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["pass", "secret", "token", "key", "auth"]
        .iter()
        .any(|word| name.contains(word))
}

fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let after_scheme = scheme_end + 3;
    let rest = &url[after_scheme..];
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    match userinfo.split_once(':') {
        Some((user, password)) if !password.is_empty() => {
            format!("{}{user}:{REDACTED}{}", &url[..after_scheme], &rest[at..])
        }
        _ => url.to_string(),
    }
}

const DEFAULT_ANNOTATED: &str = r##"# keywarden configuration (keywarden.toml). Every key is shown with its default;
# delete the ones you do not change. Any key can also be set from the
# environment as KEYWARDEN_<SECTION>__<KEY>, for example
# KEYWARDEN_POLICY__DATA__ROTATE_AFTER=30d or KEYWARDEN_ALERTS__EMAIL__TO='["ops@example.com"]'.
# Durations are written 90d, 12h, 15m, 30s, or combined from largest unit to smallest (1h30m).

[policy.signing]                # JWT signing keys
algorithm = "HS256"             # HS256 | RS256 | ES256 | EdDSA; applies to the next key made
rotate_after = "90d"            # make a new signing key this long after the active one was activated
grace = "1d"                    # a retiring signing key still verifies this long

[policy.data]                   # Fernet data keys
rotate_after = "30d"            # make a new data key this often; old ones still decrypt until re-encrypted

[policy.temp]                   # HMAC temp keys
rotate_after = "7d"             # make a new temp key this often

[policy.token_encryption]       # the A256GCM key for JWE (dir); rotates like signing keys
rotate_after = "90d"            # make a new token-encryption key this often
grace = "1d"                    # a retiring token-encryption key still decrypts this long

[tokens]
leeway = "60s"                  # clock skew tolerated on exp, nbf and iat
max_size = 8192                 # bytes; longer tokens are refused before decoding
issuer = ""                     # set: tokens carry and require this iss
audience = ""                   # set: tokens carry and require this aud
default_ttl = "15m"             # lifetime of token sign / token encrypt without --ttl

[redis]
url = ""                        # redis://, rediss:// or redis+cluster://h:p,h:p; same as KEYWARDEN_REDIS_URL; empty: events wait in the outbox
poll_interval = "1s"            # subscribers re-check the epoch this often

[http]
bind = "127.0.0.1:9187"         # /healthz /readyz /metrics /.well-known/jwks.json and admin routes

[reencrypt]
batch_size = 1000               # rows read and rewritten per batch
threads = 0                     # decrypt/encrypt threads; 0 = one per CPU core

# The application's own tables holding Fernet tokens: one block per table, any
# number, none by default. Remove the leading "# " to use this example.
# [[reencrypt.targets]]
# name = "app_secrets"             # unique; `reencrypt --target app_secrets` picks it
# database_url = ""                # empty: keywarden's own store; else sqlite:... or postgres://...
# table = "user_secrets"           # table name, optionally schema.table
# id_column = "id"                 # primary-key column
# ciphertext_column = "secret_value"  # column holding the Fernet token
# kid_column = ""                  # optional key-id column; empty: keys are tried in MultiFernet order
# filter = ""                      # optional SQL condition limiting the rows, e.g. "tenant_id = 7"

[alerts.email]
smtp_host = ""                  # SMTP server; empty: email alerts off
smtp_port = 587                 # SMTP port
tls = "starttls"                # none | starttls | tls
username = ""                   # SMTP user; empty: no authentication
password_env = ""               # name of the env var holding the SMTP password
from = ""                       # sender address
to = []                         # recipient addresses

[alerts.slack]
webhook_url = ""                # Slack incoming-webhook URL (a secret); empty: Slack alerts off

[alerts.webhook]
url = ""                        # URL alerts are POSTed to as signed JSON; empty: webhook alerts off
secret_env = ""                 # name of the env var holding the HMAC signing secret

[alerts.delivery]               # for every channel: retries with exponential backoff and jitter
attempts = 5                    # attempts per message, the first included; then a dead letter
backoff_ms = 1000               # delay before the first retry; doubles each retry
max_backoff_ms = 60000          # cap of one delay, also of a receiver's Retry-After
timeout_ms = 10000              # one attempt is abandoned after this long

# Alert rules. The seed's four apply without any entry: verification_failure_rate
# (> 1 % over 5m, warning), signing_latency (> 100 ms, critical), sync_lag
# (> 5 s, warning), rotation_success_rate (< 95 % over 30d, critical). An entry
# with one of those names overrides the keys it gives; a new name adds a rule
# (figure and threshold required). Remove the leading "# " to use this example.
# [[alerts.rules]]
# name = "signing_latency"         # unique
# figure = "signing_latency"       # verification_failure_rate | signing_latency | sync_lag | rotation_success_rate
# comparison = "above"             # above | below: which side of the threshold is bad
# threshold = 250                  # in the figure's unit: percent, milliseconds, seconds
# window = "5m"                    # how far back the figure looks
# severity = "critical"            # info | warning | critical
# channels = ["slack"]             # email | slack | webhook; empty: every configured channel
# cooldown = "1h"                  # a still-firing rule reminds this often; 0s: never
# escalate_after = "30m"           # still firing this long: also to escalate_channels; 0s: never
# escalate_channels = ["email", "webhook"]

[audit]
retention = "365d"              # audit rows older than this may be pruned after a checkpoint
checkpoint_dir = ""             # empty: <data-dir>/checkpoints

[jobs]
dir = ""                        # job definitions; empty: KEYWARDEN_JOBS_DIR or the shipped jobs/

[worker]
id = ""                         # instance id for leases and acks; empty: <hostname>-<pid>
lease_ttl = "30s"               # a job's lease lasts this long unrenewed (a dead worker blocks its job at most this long)
"##;

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "keywarden.toml";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn from_file(text: &str) -> Result<Config, ConfigError> {
        Config::from_sources(Some((Path::new(FILE), text)), &[])
    }

    fn from_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_sources(None, &env(pairs))
    }

    fn err_text(result: Result<Config, ConfigError>) -> String {
        result.expect_err("config should be refused").to_string()
    }

    /// The block from CLI.md "Config keys that must exist", verbatim.
    const CLI_CONTRACT_BLOCK: &str = r#"
[policy.signing]            # the seed's "master key": JWT signing
algorithm = "HS256"         # HS256 | RS256 | ES256 | EdDSA; applies to the next key made
rotate_after = "90d"
grace = "1d"                # a retiring signing key still verifies this long
[policy.data]               # Fernet data keys
rotate_after = "30d"
[policy.temp]               # HMAC temp keys
rotate_after = "7d"
[policy.token_encryption]   # the A256GCM key for JWE (dir); rotates like signing keys
rotate_after = "90d"
grace = "1d"

[tokens]
leeway = "60s"
max_size = 8192             # bytes, checked before decoding
issuer = ""                 # set -> tokens carry and require it
audience = ""

[redis]
url = ""                    # same as KEYWARDEN_REDIS_URL
poll_interval = "1s"        # subscribers re-check the epoch this often

[http]
bind = "127.0.0.1:9187"     # /healthz /readyz /metrics /.well-known/jwks.json, admin routes

[[reencrypt.targets]]       # the application's own tables (any number)
name = "app_secrets"
database_url = ""           # empty: keywarden's own store; else sqlite:// or postgres://
table = "user_secrets"
id_column = "id"
ciphertext_column = "secret_value"
kid_column = ""             # optional; without it keys are tried in MultiFernet order

[alerts.email]
smtp_host = ""
smtp_port = 587
tls = "starttls"            # none | starttls | tls
username = ""
password_env = ""           # name of the env var holding the password
from = ""
to = []
[alerts.slack]
webhook_url = ""
[alerts.webhook]
url = ""
secret_env = ""             # name of the env var holding the HMAC signing secret
"#;

    /// Dotted leaf paths of a TOML table; arrays of tables contribute their
    /// elements' keys under `name[]`.
    fn leaf_paths(table: &Table, prefix: &str, out: &mut Vec<String>) {
        for (name, value) in table {
            let path = join(prefix, name);
            match value {
                Value::Table(inner) => leaf_paths(inner, &path, out),
                Value::Array(items) if items.iter().any(Value::is_table) => {
                    for item in items {
                        if let Value::Table(inner) = item {
                            leaf_paths(inner, &format!("{path}[]"), out);
                        }
                    }
                }
                _ => out.push(path),
            }
        }
    }

    fn schema_paths(fields: &[Field], prefix: &str, out: &mut Vec<String>) {
        for field in fields {
            let path = join(prefix, field.name);
            match field.kind {
                Kind::Section(inner) => schema_paths(inner, &path, out),
                Kind::Sections(inner) => schema_paths(inner, &format!("{path}[]"), out),
                _ => out.push(path),
            }
        }
    }

    fn sorted_dedup(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v.dedup();
        v
    }

    fn sample_rule() -> AlertRuleConfig {
        AlertRuleConfig {
            name: "x".into(),
            figure: Some("sync_lag".into()),
            comparison: Some("above".into()),
            threshold: Some(Number(1.5)),
            window: Some(Duration::from_mins(5)),
            severity: Some("warning".into()),
            channels: Some(vec!["slack".into()]),
            cooldown: Some(Duration::from_hours(1)),
            escalate_after: Some(Duration::ZERO),
            escalate_channels: Some(vec!["email".into()]),
        }
    }

    #[test]
    fn alert_rules_are_checked_and_named_in_errors() {
        let c = from_file(
            "[[alerts.rules]]\nname = \"signing_latency\"\nthreshold = 250\n\n[[alerts.rules]]\nname = \"lag2\"\nfigure = \"sync_lag\"\nthreshold = 2.5\nchannels = [\"slack\"]\n",
        )
        .unwrap();
        assert_eq!(c.alerts.rules[0].threshold, Some(Number(250.0)));
        assert_eq!(c.alerts.rules[1].threshold, Some(Number(2.5)));
        assert!(
            err_text(from_file(
                "[[alerts.rules]]\nname = \"new\"\nthreshold = 1\n"
            ))
            .contains("must give figure and threshold")
        );
        assert!(
            err_text(from_file(
                "[[alerts.rules]]\nname = \"sync_lag\"\nchannels = [\"pager\"]\n"
            ))
            .contains(
                "alerts.rules[0].channels[0]: string \"pager\" is not one of: email, slack, webhook"
            )
        );
        assert!(
            err_text(from_file(
                "[[alerts.rules]]\nname = \"sync_lag\"\nthreshold = \"5\"\n"
            ))
            .contains("alerts.rules[0].threshold: expected a finite number")
        );
        assert!(
            err_text(from_file(
                "[[alerts.rules]]\nname = \"sync_lag\"\n[[alerts.rules]]\nname = \"sync_lag\"\n"
            ))
            .contains("rule names must be unique")
        );
        let c = from_env(&[("KEYWARDEN_ALERTS__DELIVERY__ATTEMPTS", "2")]).unwrap();
        assert_eq!(c.alerts.delivery.attempts, 2);
    }

    fn sample_target() -> ReencryptTarget {
        ReencryptTarget {
            name: "app_secrets".into(),
            database_url: SecretString::new("postgres://app:hunter2@db.internal:5432/app"),
            table: "public.user_secrets".into(),
            id_column: "id".into(),
            ciphertext_column: "secret_value".into(),
            kid_column: "kid".into(),
            filter: "tenant_id = 7".into(),
        }
    }

    // --- defaults -------------------------------------------------------

    #[test]
    fn defaults_are_the_documented_values() {
        let c = Config::default();
        assert_eq!(c.policy.signing.algorithm, SigningAlgorithm::Hs256);
        assert_eq!(c.policy.signing.rotate_after.to_string(), "90d");
        assert_eq!(c.policy.signing.grace.to_string(), "1d");
        assert_eq!(c.policy.data.rotate_after.to_string(), "30d");
        assert_eq!(c.policy.temp.rotate_after.to_string(), "7d");
        assert_eq!(c.policy.token_encryption.rotate_after.to_string(), "90d");
        assert_eq!(c.policy.token_encryption.grace.to_string(), "1d");
        assert_eq!(c.tokens.leeway.to_string(), "1m");
        assert_eq!(c.tokens.leeway.as_secs(), 60);
        assert_eq!(c.tokens.max_size, 8192);
        assert_eq!(c.tokens.issuer(), None);
        assert_eq!(c.tokens.audience(), None);
        assert_eq!(c.tokens.default_ttl.to_string(), "15m");
        assert_eq!(c.redis.url(), None);
        assert_eq!(c.redis.poll_interval.to_string(), "1s");
        assert_eq!(c.http.bind.to_string(), "127.0.0.1:9187");
        assert_eq!(c.reencrypt.batch_size, 1000);
        assert_eq!(c.reencrypt.threads, 0);
        assert!(c.reencrypt.targets.is_empty());
        assert_eq!(c.alerts.email.smtp_port, 587);
        assert_eq!(c.alerts.email.tls, EmailTls::Starttls);
        assert!(c.alerts.email.to.is_empty());
        assert!(c.alerts.slack.webhook_url.is_empty());
        assert!(c.alerts.webhook.url.is_empty());
        assert_eq!(c.audit.retention.to_string(), "365d");
        assert!(c.audit.checkpoint_dir.as_os_str().is_empty());
        assert!(c.jobs.dir.as_os_str().is_empty());
        assert!(c.worker.id.is_empty());
    }

    #[test]
    fn no_file_and_no_environment_gives_the_defaults() {
        assert_eq!(Config::from_sources(None, &[]).unwrap(), Config::default());
        assert_eq!(from_file("").unwrap(), Config::default());
    }

    #[test]
    fn partial_sections_keep_the_other_defaults_of_that_section() {
        let c = from_file("[policy.temp]\n[policy.signing]\ngrace = \"2h\"\n").unwrap();
        assert_eq!(c.policy.temp.rotate_after.to_string(), "7d");
        assert_eq!(c.policy.signing.grace.to_string(), "2h");
        assert_eq!(c.policy.signing.rotate_after.to_string(), "90d");
    }

    #[test]
    fn default_annotated_parses_to_exactly_the_defaults() {
        let c = Config::from_sources(
            Some((Path::new("default"), Config::default_annotated())),
            &[],
        )
        .unwrap();
        assert_eq!(c, Config::default());
    }

    /// The annotated file with its commented target example switched on.
    fn annotated_with_example_target() -> String {
        let mut out = String::new();
        let mut in_example = false;
        for line in Config::default_annotated().lines() {
            if line.starts_with("# [[reencrypt.targets]]") || line.starts_with("# [[alerts.rules]]")
            {
                in_example = true;
            }
            if in_example && line.is_empty() {
                in_example = false;
            }
            let line = if in_example {
                line.strip_prefix("# ").unwrap()
            } else {
                line
            };
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    #[test]
    fn default_annotated_shows_every_key_of_the_schema() {
        let text = annotated_with_example_target();
        let table: Table = text.parse().unwrap();
        let mut shown = Vec::new();
        leaf_paths(&table, "", &mut shown);
        let mut schema = Vec::new();
        schema_paths(SCHEMA, "", &mut schema);
        assert_eq!(sorted_dedup(shown), sorted_dedup(schema));
        // The example target is itself a valid config.
        let c = Config::from_sources(Some((Path::new("default"), &text)), &[]).unwrap();
        assert_eq!(c.reencrypt.targets[0].name, "app_secrets");
        assert_eq!(c.alerts.rules[0].name, "signing_latency");
    }

    #[test]
    fn schema_lists_exactly_the_keys_of_the_config_struct() {
        let mut c = Config::default();
        c.reencrypt.targets.push(sample_target());
        c.alerts.rules.push(sample_rule());
        let table = Table::try_from(&c).unwrap();
        let mut from_struct = Vec::new();
        leaf_paths(&table, "", &mut from_struct);
        let mut schema = Vec::new();
        schema_paths(SCHEMA, "", &mut schema);
        assert_eq!(sorted_dedup(from_struct), sorted_dedup(schema));
    }

    #[test]
    fn every_key_in_the_cli_contract_exists_with_the_documented_default() {
        let c = Config::from_sources(Some((Path::new("CLI.md"), CLI_CONTRACT_BLOCK)), &[])
            .expect("CLI.md's config block must be accepted");
        let mut without_targets = c.clone();
        without_targets.reencrypt.targets.clear();
        assert_eq!(without_targets, Config::default());
        let t = &c.reencrypt.targets[0];
        assert_eq!(t.name, "app_secrets");
        assert_eq!(t.table, "user_secrets");
        assert_eq!(t.id_column, "id");
        assert_eq!(t.ciphertext_column, "secret_value");
        assert_eq!(t.kid_column(), None);
        assert_eq!(t.database_url(), None);
    }

    // --- file values ----------------------------------------------------

    #[test]
    fn reads_every_kind_of_value_from_the_file() {
        let c = from_file(
            r#"
[policy.signing]
algorithm = "EdDSA"
rotate_after = "1h30m"
[tokens]
max_size = 4096
issuer = "https://issuer.example"
[http]
bind = "[::]:8080"
[alerts.email]
tls = "tls"
from = "Keywarden <kw@example.com>"
to = ["a@x.example", "b@y.example"]
password_env = "SMTP_PASSWORD"
[[reencrypt.targets]]
name = "a"
table = "public.secrets"
ciphertext_column = "value"
[[reencrypt.targets]]
name = "b"
database_url = "sqlite:///var/app.db"
table = "tokens"
ciphertext_column = "tok"
kid_column = "kid"
filter = "active = 1"
"#,
        )
        .unwrap();
        assert_eq!(c.policy.signing.algorithm, SigningAlgorithm::EdDsa);
        assert_eq!(c.policy.signing.rotate_after.as_secs(), 5_400);
        assert_eq!(c.tokens.max_size, 4096);
        assert_eq!(c.tokens.issuer(), Some("https://issuer.example"));
        assert_eq!(c.http.bind.port(), 8080);
        assert_eq!(c.alerts.email.tls, EmailTls::Tls);
        assert_eq!(c.alerts.email.to, vec!["a@x.example", "b@y.example"]);
        assert_eq!(c.reencrypt.targets.len(), 2);
        assert_eq!(c.reencrypt.targets[0].id_column, "id");
        assert_eq!(c.reencrypt.target("b").unwrap().kid_column(), Some("kid"));
        assert_eq!(
            c.reencrypt.target("b").unwrap().database_url(),
            Some("sqlite:///var/app.db")
        );
        assert_eq!(
            c.reencrypt.target("b").unwrap().filter(),
            Some("active = 1")
        );
    }

    // --- environment overrides ------------------------------------------

    #[test]
    fn env_overrides_a_nested_duration_over_the_file() {
        let c = Config::from_sources(
            Some((Path::new(FILE), "[policy.data]\nrotate_after = \"10d\"\n")),
            &env(&[("KEYWARDEN_POLICY__DATA__ROTATE_AFTER", "2d")]),
        )
        .unwrap();
        assert_eq!(c.policy.data.rotate_after, Duration::from_days(2));
    }

    #[test]
    fn env_overrides_three_levels_deep_and_enums() {
        let c = from_env(&[
            ("KEYWARDEN_POLICY__SIGNING__ALGORITHM", "ES256"),
            ("KEYWARDEN_POLICY__TOKEN_ENCRYPTION__GRACE", "12h"),
            ("KEYWARDEN_ALERTS__EMAIL__TLS", "none"),
        ])
        .unwrap();
        assert_eq!(c.policy.signing.algorithm, SigningAlgorithm::Es256);
        assert_eq!(c.policy.token_encryption.grace, Duration::from_hours(12));
        assert_eq!(c.alerts.email.tls, EmailTls::None);
    }

    #[test]
    fn env_overrides_integers_and_addresses() {
        let c = from_env(&[
            ("KEYWARDEN_TOKENS__MAX_SIZE", "1024"),
            ("KEYWARDEN_ALERTS__EMAIL__SMTP_PORT", "465"),
            ("KEYWARDEN_REENCRYPT__THREADS", "4"),
            ("KEYWARDEN_HTTP__BIND", "0.0.0.0:80"),
        ])
        .unwrap();
        assert_eq!(c.tokens.max_size, 1024);
        assert_eq!(c.alerts.email.smtp_port, 465);
        assert_eq!(c.reencrypt.effective_threads(8), 4);
        assert_eq!(c.http.bind.to_string(), "0.0.0.0:80");
    }

    #[test]
    fn env_sets_an_array_of_strings() {
        let c = from_env(&[("KEYWARDEN_ALERTS__EMAIL__TO", r#"["a@x","b@y"]"#)]).unwrap();
        assert_eq!(c.alerts.email.to, vec!["a@x", "b@y"]);
    }

    #[test]
    fn env_sets_the_whole_target_array() {
        let c = from_env(&[(
            "KEYWARDEN_REENCRYPT__TARGETS",
            r#"[{name = "t1", table = "s.t", ciphertext_column = "c"}]"#,
        )])
        .unwrap();
        assert_eq!(c.reencrypt.targets.len(), 1);
        assert_eq!(c.reencrypt.targets[0].table, "s.t");
    }

    #[test]
    fn env_strings_that_look_like_numbers_stay_strings() {
        let c = from_env(&[
            ("KEYWARDEN_TOKENS__ISSUER", "123"),
            ("KEYWARDEN_WORKER__ID", "true"),
        ])
        .unwrap();
        assert_eq!(c.tokens.issuer, "123");
        assert_eq!(c.worker.id, "true");
    }

    #[test]
    fn keywarden_redis_url_sets_redis_url_and_the_long_form_wins() {
        let c = from_env(&[("KEYWARDEN_REDIS_URL", "redis://cache:6379/0")]).unwrap();
        assert_eq!(c.redis.url(), Some("redis://cache:6379/0"));
        let c = from_env(&[
            ("KEYWARDEN_REDIS__URL", "redis://long:6379"),
            ("KEYWARDEN_REDIS_URL", "redis://short:6379"),
        ])
        .unwrap();
        assert_eq!(c.redis.url(), Some("redis://long:6379"));
    }

    #[test]
    fn cli_variables_without_double_underscore_are_not_config_keys() {
        let c = from_env(&[
            ("KEYWARDEN_CONFIG", "/etc/kw.toml"),
            ("KEYWARDEN_DATA_DIR", "/var/kw"),
            ("KEYWARDEN_DATABASE_URL", "postgres://x"),
            ("KEYWARDEN_ROOT_KEY", "not-a-config-key"),
            ("KEYWARDEN_JOBS_DIR", "/jobs"),
            ("KEYWARDEN_LOG_FORMAT", "json"),
            ("KEYWARDEN_SOMETHING_NEW", "x"),
            ("PATH", "/usr/bin"),
            ("OTHER__THING", "x"),
        ])
        .unwrap();
        assert_eq!(c, Config::default());
    }

    // --- errors ---------------------------------------------------------

    #[test]
    fn unknown_key_in_the_file_names_the_dotted_path_and_the_file() {
        assert_eq!(
            err_text(from_file("[policy.data]\nrotate_aftr = \"30d\"\n")),
            r#"unknown config key "policy.data.rotate_aftr" in keywarden.toml"#
        );
        assert_eq!(
            err_text(from_file("[polcy]\n")),
            r#"unknown config key "polcy" in keywarden.toml"#
        );
        assert_eq!(
            err_text(from_file(
                "[[reencrypt.targets]]\nname=\"a\"\ntable=\"t\"\nciphertext_column=\"c\"\ncolumn=\"x\"\n"
            )),
            r#"unknown config key "reencrypt.targets[0].column" in keywarden.toml"#
        );
    }

    #[test]
    fn unknown_key_in_the_environment_names_the_variable() {
        let err = from_env(&[("KEYWARDEN_POLICY__DATA__ROTATE_AFTR", "30d")]).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownKey { .. }));
        assert_eq!(
            err.to_string(),
            "unknown config key \"policy.data.rotate_aftr\" in environment variable \
             KEYWARDEN_POLICY__DATA__ROTATE_AFTR"
        );
        // Keys inside an array of tables cannot be addressed one by one.
        assert!(
            err_text(from_env(&[("KEYWARDEN_REENCRYPT__TARGETS__0__TABLE", "t")]))
                .contains("unknown config key \"reencrypt.targets.0.table\"")
        );
        // A leaf cannot have children.
        assert!(err_text(from_env(&[("KEYWARDEN_TOKENS__LEEWAY__X", "1")])).contains(
            "unknown config key \"tokens.leeway.x\" in environment variable KEYWARDEN_TOKENS__LEEWAY__X"
        ));
    }

    #[test]
    fn env_naming_a_section_suggests_a_key() {
        let msg = err_text(from_env(&[("KEYWARDEN_POLICY__DATA", "30d")]));
        assert!(msg.contains("policy.data: this names a section"), "{msg}");
        assert!(
            msg.contains("KEYWARDEN_POLICY__DATA__ROTATE_AFTER"),
            "{msg}"
        );
    }

    #[test]
    fn bad_duration_names_the_key_the_value_and_the_allowed_forms() {
        assert_eq!(
            err_text(from_file("[policy.data]\nrotate_after = \"30x\"\n")),
            r#"keywarden.toml: policy.data.rotate_after: "30x" is not a duration (use e.g. 30d, 12h, 15m, 30s)"#
        );
        assert_eq!(
            err_text(from_env(&[("KEYWARDEN_POLICY__DATA__ROTATE_AFTER", "30x")])),
            "environment variable KEYWARDEN_POLICY__DATA__ROTATE_AFTER: policy.data.rotate_after: \
             \"30x\" is not a duration (use e.g. 30d, 12h, 15m, 30s)"
        );
        assert_eq!(
            err_text(from_file("[tokens]\nleeway = 60\n")),
            "keywarden.toml: tokens.leeway: expected a duration such as 30d, 12h, 15m or 30s, got integer 60"
        );
    }

    #[test]
    fn zero_is_refused_for_intervals_but_allowed_for_grace_and_leeway() {
        assert!(
            err_text(from_file("[policy.temp]\nrotate_after = \"0s\"\n"))
                .contains("policy.temp.rotate_after: \"0s\" is too short")
        );
        let c = from_file("[tokens]\nleeway = \"0s\"\n[policy.signing]\ngrace = \"0s\"\n").unwrap();
        assert!(c.tokens.leeway.is_zero());
        assert!(c.policy.signing.grace.is_zero());
    }

    #[test]
    fn bad_integers_say_the_allowed_range() {
        assert_eq!(
            err_text(from_file("[alerts.email]\nsmtp_port = 70000\n")),
            "keywarden.toml: alerts.email.smtp_port: 70000 is out of range (allowed: 1 to 65535)"
        );
        assert_eq!(
            err_text(from_env(&[("KEYWARDEN_REENCRYPT__BATCH_SIZE", "many")])),
            "environment variable KEYWARDEN_REENCRYPT__BATCH_SIZE: reencrypt.batch_size: \
             expected an integer from 1 to 1000000, got string \"many\""
        );
        assert!(
            err_text(from_file("[tokens]\nmax_size = 0\n"))
                .contains("tokens.max_size: 0 is out of range")
        );
    }

    #[test]
    fn bad_choices_list_the_allowed_values() {
        assert_eq!(
            err_text(from_file("[policy.signing]\nalgorithm = \"hs256\"\n")),
            "keywarden.toml: policy.signing.algorithm: \"hs256\" is not one of: HS256, RS256, ES256, EdDSA"
        );
        assert_eq!(
            err_text(from_file("[alerts.email]\ntls = \"ssl\"\n")),
            "keywarden.toml: alerts.email.tls: \"ssl\" is not one of: none, starttls, tls"
        );
    }

    #[test]
    fn bind_must_be_an_ip_address_and_port() {
        assert!(
            err_text(from_file("[http]\nbind = \"localhost:9187\"\n"))
                .contains("http.bind: \"localhost:9187\" is not an IP address and port")
        );
        assert!(err_text(from_file("[http]\nbind = \"127.0.0.1\"\n")).contains("http.bind:"));
    }

    #[test]
    fn wrong_shapes_name_what_was_expected() {
        assert!(
            err_text(from_file("policy = 5\n"))
                .contains("policy: expected a section [policy], got integer 5")
        );
        assert!(
            err_text(from_file("[reencrypt]\ntargets = \"x\"\n"))
                .contains("reencrypt.targets: expected an array of tables [[reencrypt.targets]]")
        );
        assert!(
            err_text(from_file("[alerts.email]\nto = \"ops@example.com\"\n"))
                .contains("alerts.email.to: expected an array of email addresses")
        );
        assert!(
            err_text(from_file(
                "[alerts.email]\nto = [\"ops@example.com\", \"nobody\"]\n"
            ))
            .contains("alerts.email.to[1]: \"nobody\" is not an email address")
        );
        // The file made `policy` a value; an env var cannot descend into it.
        assert!(
            err_text(Config::from_sources(
                Some((Path::new(FILE), "policy = 5\n")),
                &env(&[("KEYWARDEN_POLICY__DATA__ROTATE_AFTER", "1d")]),
            ))
            .contains("keywarden.toml: policy: expected a section [policy], got integer 5")
        );
    }

    #[test]
    fn target_missing_a_required_key_is_named_with_its_index() {
        assert_eq!(
            err_text(from_file(
                "[[reencrypt.targets]]\nname = \"a\"\nciphertext_column = \"c\"\n"
            )),
            "keywarden.toml: reencrypt.targets[0].table: missing; each entry needs name, table, ciphertext_column"
        );
    }

    fn target_with_table(table: &str) -> Result<Config, ConfigError> {
        let mut t = Table::new();
        t.insert("name".into(), Value::String("a".into()));
        t.insert("table".into(), Value::String(table.into()));
        t.insert("ciphertext_column".into(), Value::String("c".into()));
        let text = format!("[[reencrypt.targets]]\n{t}");
        from_file(&text)
    }

    fn target_with_column(column: &str) -> Result<Config, ConfigError> {
        let mut t = Table::new();
        t.insert("name".into(), Value::String("a".into()));
        t.insert("table".into(), Value::String("t".into()));
        t.insert("ciphertext_column".into(), Value::String(column.into()));
        let text = format!("[[reencrypt.targets]]\n{t}");
        from_file(&text)
    }

    #[test]
    fn table_and_column_names_must_be_plain_sql_identifiers() {
        for ok in [
            "users",
            "_t",
            "t1",
            "public.user_secrets",
            "A_B_9",
            &"x".repeat(63),
        ] {
            assert!(target_with_table(ok).is_ok(), "{ok}");
        }
        for bad_name in [
            "users; drop table x",
            "1abc",
            "\"users\"",
            "users'",
            "`users`",
            "a.b.c",
            ".t",
            "t.",
            "",
            "user secrets",
            "users--",
            "täble",
            &"x".repeat(64),
        ] {
            let msg = err_text(target_with_table(bad_name));
            assert!(
                msg.contains("reencrypt.targets[0].table:")
                    && msg.contains("is not a SQL table name"),
                "{bad_name}: {msg}"
            );
        }
        // Columns may not carry a schema prefix.
        for bad_name in ["s.c", "1c", "c;", "\"c\"", ""] {
            let msg = err_text(target_with_column(bad_name));
            assert!(
                msg.contains("reencrypt.targets[0].ciphertext_column:")
                    && msg.contains("is not a SQL column name"),
                "{bad_name}: {msg}"
            );
        }
        assert_eq!(
            err_text(target_with_table("users; drop table x")),
            "keywarden.toml: reencrypt.targets[0].table: \"users; drop table x\" is not a SQL table name \
             (letters, digits and underscore, not starting with a digit, at most 63 characters, \
             optionally one schema. prefix)"
        );
    }

    #[test]
    fn target_names_must_be_unique_and_columns_distinct() {
        let dup = "[[reencrypt.targets]]\nname=\"a\"\ntable=\"t\"\nciphertext_column=\"c\"\n\
                   [[reencrypt.targets]]\nname=\"a\"\ntable=\"u\"\nciphertext_column=\"c\"\n";
        assert_eq!(
            err_text(from_file(dup)),
            "keywarden.toml: reencrypt.targets[1].name: \"a\" is already the name of \
             reencrypt.targets[0]; target names must be unique"
        );
        let same = "[[reencrypt.targets]]\nname=\"a\"\ntable=\"t\"\nciphertext_column=\"id\"\n";
        assert!(err_text(from_file(same)).contains("reencrypt.targets[0].ciphertext_column:"));
        let kid = "[[reencrypt.targets]]\nname=\"a\"\ntable=\"t\"\nciphertext_column=\"c\"\nkid_column=\"c\"\n";
        assert!(err_text(from_file(kid)).contains("reencrypt.targets[0].kid_column:"));
        let bad_name =
            "[[reencrypt.targets]]\nname=\"a b\"\ntable=\"t\"\nciphertext_column=\"c\"\n";
        assert!(err_text(from_file(bad_name)).contains("\"a b\" is not a target name"));
        let filter = "[[reencrypt.targets]]\nname=\"a\"\ntable=\"t\"\nciphertext_column=\"c\"\nfilter=\"1=1; drop table t\"\n";
        assert!(err_text(from_file(filter)).contains("reencrypt.targets[0].filter:"));
    }

    #[test]
    fn errors_for_secret_bearing_keys_do_not_echo_the_value() {
        let cases = [
            ("[redis]\nurl = \"http://:hunter2@cache\"\n", "redis.url"),
            (
                "[alerts.slack]\nwebhook_url = \"hooks.slack.com/services/hunter2\"\n",
                "alerts.slack.webhook_url",
            ),
            (
                "[alerts.webhook]\nurl = \"ftp://x/?token=hunter2\"\n",
                "alerts.webhook.url",
            ),
            (
                "[[reencrypt.targets]]\nname=\"a\"\ntable=\"t\"\nciphertext_column=\"c\"\ndatabase_url=\"mysql://u:hunter2@h/d\"\n",
                "reencrypt.targets[0].database_url",
            ),
            // The secret pasted where the name of its variable belongs.
            (
                "[alerts.email]\npassword_env = \"hunter2!\"\n",
                "alerts.email.password_env",
            ),
            (
                "[alerts.webhook]\nsecret_env = \"hunter2 x\"\n",
                "alerts.webhook.secret_env",
            ),
        ];
        for (text, key) in cases {
            let msg = err_text(from_file(text));
            assert!(msg.contains(key), "{msg}");
            assert!(msg.contains("value not shown"), "{msg}");
            assert!(!msg.contains("hunter2"), "{msg}");
        }
        let msg = err_text(from_file("[redis]\nurl = 12345\n"));
        assert!(
            msg.contains("an integer (value not shown)") && !msg.contains("12345"),
            "{msg}"
        );
    }

    #[test]
    fn syntax_errors_give_file_line_and_column() {
        let err = from_file("[tokens]\nleeway = \"60s\"\nmax_size = = 3\n").unwrap_err();
        match &err {
            ConfigError::Syntax {
                path, line, column, ..
            } => {
                assert_eq!(path, Path::new(FILE));
                assert_eq!(*line, 3);
                assert!(*column > 1, "{err}");
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
        assert!(err.to_string().starts_with("keywarden.toml:3:"), "{err}");
        assert!(err.to_string().contains("TOML syntax error"), "{err}");
    }

    #[test]
    fn line_col_counts_lines_and_characters() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1));
        assert_eq!(line_col("éx", 2), (1, 2));
    }

    #[test]
    fn load_requires_an_explicit_file_to_exist() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let err = Config::load(Some(&missing)).unwrap_err();
        assert!(matches!(err, ConfigError::Unreadable { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.toml"), "{err}");
    }

    #[test]
    fn load_reads_an_explicit_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kw.toml");
        std::fs::write(&path, "[worker]\nid = \"w1\"\n").unwrap();
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(c.worker.id, "w1");
        std::fs::write(&path, "[worker]\nidd = \"w1\"\n").unwrap();
        let msg = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(
            msg.contains("\"worker.idd\"") && msg.contains("kw.toml"),
            "{msg}"
        );
    }

    // --- output ---------------------------------------------------------

    fn config_with_secrets() -> Config {
        let mut c = Config::default();
        c.redis.url = SecretString::new("rediss://default:r3dispass@cache.internal:6380/0");
        c.alerts.slack.webhook_url =
            SecretString::new("https://hooks.slack.com/services/T000/B000/slacksecret");
        c.alerts.webhook.url =
            SecretString::new("https://hooks.example/alert?token=hooksecret&x=1");
        c.alerts.webhook.secret_env = "KW_WEBHOOK_SECRET".into();
        c.alerts.email.password_env = "KW_SMTP_PASSWORD".into();
        c.reencrypt.targets.push(sample_target());
        c.reencrypt.targets.push(ReencryptTarget {
            name: "b".into(),
            database_url: SecretString::new(
                "postgres://db.internal/app?user=app&password=pgsecret",
            ),
            ..sample_target()
        });
        c
    }

    #[test]
    fn redacted_toml_hides_every_secret_and_keeps_the_rest() {
        let text = config_with_secrets().to_redacted_toml();
        for secret in [
            "r3dispass",
            "slacksecret",
            "hooksecret",
            "hunter2",
            "pgsecret",
        ] {
            assert!(!text.contains(secret), "{secret} leaked:\n{text}");
        }
        for shown in [
            "rediss://default:[redacted]@cache.internal:6380/0",
            r#"webhook_url = "[redacted]""#,
            "https://hooks.example/alert?[redacted]",
            "postgres://app:[redacted]@db.internal:5432/app",
            "postgres://db.internal/app?user=app&password=[redacted]",
            "KW_WEBHOOK_SECRET",
            "KW_SMTP_PASSWORD",
            r#"rotate_after = "90d""#,
            r#"bind = "127.0.0.1:9187""#,
        ] {
            assert!(text.contains(shown), "missing {shown}:\n{text}");
        }
        // The redacted output is still a config with the same shape.
        let table: Table = text.parse().unwrap();
        assert!(table["reencrypt"]["targets"].as_array().unwrap().len() == 2);
    }

    #[test]
    fn redacted_toml_of_the_defaults_round_trips() {
        let text = Config::default().to_redacted_toml();
        assert_eq!(from_file(&text).unwrap(), Config::default());
    }

    #[test]
    fn url_redaction_errs_towards_hiding_too_much() {
        assert_eq!(
            redact_url("redis://cache:6379", false),
            "redis://cache:6379"
        );
        assert_eq!(
            redact_url("redis://:pw@cache", false),
            "redis://:[redacted]@cache"
        );
        assert_eq!(
            redact_url("redis://user@cache", false),
            "redis://user@cache"
        );
        // An unescaped `/` or `@` in the password still leaves nothing of it.
        assert_eq!(
            redact_url("postgres://u:p/w@d@host/db", false),
            "postgres://u:[redacted]@host/db"
        );
        assert_eq!(redact_url("", true), "");
        assert_eq!(
            redact_url("https://h/p?a=1", true),
            "https://h/p?[redacted]"
        );
        assert_eq!(
            redact_url("postgres://h/db?sslmode=require&PassWord=x", false),
            "postgres://h/db?sslmode=require&PassWord=[redacted]"
        );
    }

    #[test]
    fn debug_output_redacts_secret_strings() {
        let dbg = format!("{:?}", config_with_secrets());
        for secret in [
            "r3dispass",
            "slacksecret",
            "hooksecret",
            "hunter2",
            "pgsecret",
        ] {
            assert!(!dbg.contains(secret), "{secret} leaked in Debug");
        }
        assert!(dbg.contains("[redacted]"));
        assert_eq!(format!("{:?}", SecretString::default()), "\"\"");
    }

    #[test]
    fn secret_strings_compare_by_value() {
        assert_eq!(SecretString::new("abc"), SecretString::new("abc"));
        assert_ne!(SecretString::new("abc"), SecretString::new("abd"));
        assert_ne!(SecretString::new("abc"), SecretString::new("abcd"));
    }

    // --- small helpers --------------------------------------------------

    #[test]
    fn signing_algorithm_names_round_trip_exactly() {
        for alg in SigningAlgorithm::ALL {
            assert_eq!(alg.as_str().parse::<SigningAlgorithm>().unwrap(), alg);
            assert_eq!(alg.to_string(), alg.as_str());
        }
        assert_eq!(
            SIGNING_ALGORITHM_NAMES,
            SigningAlgorithm::ALL.map(SigningAlgorithm::as_str)
        );
        assert_eq!(
            "hs256".parse::<SigningAlgorithm>().unwrap_err().to_string(),
            "\"hs256\" is not a signing algorithm (use HS256, RS256, ES256 or EdDSA)"
        );
    }

    #[test]
    fn env_var_names_map_to_dotted_keys_and_back() {
        assert_eq!(
            env_var_for("policy.data.rotate_after"),
            "KEYWARDEN_POLICY__DATA__ROTATE_AFTER"
        );
        assert_eq!(
            env_path("KEYWARDEN_POLICY__DATA__ROTATE_AFTER").as_deref(),
            Some("policy.data.rotate_after")
        );
        assert_eq!(env_path("KEYWARDEN_DATA_DIR"), None);
    }

    #[test]
    fn resolution_helpers_apply_the_documented_fallbacks() {
        let c = Config::default();
        assert_eq!(
            c.audit.checkpoint_dir_in(Path::new("/d")),
            Path::new("/d/checkpoints")
        );
        assert_eq!(
            c.jobs
                .resolve_dir(Some(Path::new("/env-jobs")), Path::new("jobs")),
            Path::new("/env-jobs")
        );
        assert_eq!(
            c.jobs.resolve_dir(None, Path::new("jobs")),
            Path::new("jobs")
        );
        assert_eq!(c.worker.resolve_id("host", 42), "host-42");
        assert_eq!(c.reencrypt.effective_threads(0), 1);
        assert_eq!(c.reencrypt.effective_threads(6), 6);
        let c = from_file(
            "[jobs]\ndir = \"/j\"\n[worker]\nid = \"w\"\n[audit]\ncheckpoint_dir = \"/c\"\n",
        )
        .unwrap();
        assert_eq!(
            c.jobs.resolve_dir(Some(Path::new("/e")), Path::new("jobs")),
            Path::new("/j")
        );
        assert_eq!(c.worker.resolve_id("host", 42), "w");
        assert_eq!(c.audit.checkpoint_dir_in(Path::new("/d")), Path::new("/c"));
    }
}
