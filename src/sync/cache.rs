//! [`KeyringCache`]: the keyring of a Rust application, unwrapped in memory
//! and kept current from Redis.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use keywarden::crypto::rootkey::RootKeys;
//! use keywarden::sync::{CacheOptions, KeyringCache};
//!
//! let roots = RootKeys::parse_list(&std::env::var("KEYWARDEN_ROOT_KEY")?, "KEYWARDEN_ROOT_KEY")
//!     .map_err(anyhow::Error::msg)?;
//! let cache = KeyringCache::connect(CacheOptions::new("redis://127.0.0.1:6379/", roots)).await?;
//! let token = cache.encrypt(b"card number")?;
//! assert_eq!(&*cache.decrypt(&token)?, b"card number");
//! # Ok(()) }
//! ```
//!
//! How it stays current, and why it is never stale for long:
//! - It loads the snapshot (`keywarden:keyring`) and unwraps every usable
//!   key with the root key(s); a snapshot that does not fully unwrap is
//!   refused and the keyring in use is kept.
//! - It subscribes to `keywarden:events` and reloads when an event names a
//!   newer epoch. Pub/sub is at-most-once, so it also reads `keywarden:epoch`
//!   every poll interval: a lost message costs at most one interval.
//! - After every reconnect (of the subscription or of the command
//!   connection) it *flushes*: drops its cache of unwrapped material and
//!   reloads the snapshot in full. The keyring in use is replaced only by a
//!   snapshot whose epoch is at least the one held, so an app keeps working
//!   with its last good keyring while Redis is down, and a Redis restored
//!   from an old backup never rolls it back.
//! - It acknowledges the epoch it holds in `keywarden:acks` (field = its
//!   instance id, value = `{epoch, at, seen}`), from which the worker
//!   measures sync lag.
//! - [`KeyringCache::record_verification`] counts token verification
//!   results per minute in Redis for the failure-rate alert.
//!
//! On a Redis Cluster the subscription rides the cluster connection (RESP3
//! push messages, resubscribed by the redis crate after a reconnect); if
//! subscribing fails there, the cache says so once and relies on polling.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, watch};
use zeroize::Zeroizing;

use super::redis_conn::{RedisConn, RedisTarget};
use super::{
    ACKS_KEY, Ack, CHANNEL, EPOCH_KEY, Event, KEYRING_KEY, VERIFY_PREFIX, VERIFY_TTL_SECS,
    rfc3339_ms,
};
use crate::app::keyring::{DataKeys, DecryptError, Snapshot};
use crate::crypto::KeyMaterial;
use crate::crypto::fernet::FernetKey;
use crate::crypto::rootkey::{RootKeys, Wrapped};
use crate::keyring::{Algorithm, KeyState, Purpose};

/// How a [`KeyringCache`] connects and behaves.
#[derive(Clone)]
pub struct CacheOptions {
    /// Redis URL (or cluster node list), as for `KEYWARDEN_REDIS_URL`.
    pub redis_url: String,
    /// The root key(s) that unwrap the snapshot, newest first.
    pub roots: RootKeys,
    /// How often the epoch is polled (the most a lost event costs).
    pub poll_interval: Duration,
    /// This instance's id in `keywarden:acks`.
    pub instance_id: String,
    /// Subscribe to events (true by default); false polls only.
    pub subscribe: bool,
}

impl std::fmt::Debug for CacheOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheOptions")
            .field("redis_url", &super::redis_conn::redact(&self.redis_url))
            .field("poll_interval", &self.poll_interval)
            .field("instance_id", &self.instance_id)
            .field("subscribe", &self.subscribe)
            .finish_non_exhaustive()
    }
}

impl CacheOptions {
    /// Options with the defaults: poll every second, subscribe, instance id
    /// `<hostname>-<pid>-<random>`.
    pub fn new(redis_url: impl Into<String>, roots: RootKeys) -> CacheOptions {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "app".into());
        let random = uuid::Uuid::new_v4().simple().to_string();
        CacheOptions {
            redis_url: redis_url.into(),
            roots,
            poll_interval: Duration::from_secs(1),
            instance_id: format!("{host}-{}-{}", std::process::id(), &random[..8]),
            subscribe: true,
        }
    }

    /// Sets the poll interval.
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }

    /// Sets the instance id.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = id.into();
        self
    }

    /// Turns the subscription off (polling only) or on.
    pub fn subscribe(mut self, on: bool) -> Self {
        self.subscribe = on;
        self
    }
}

/// One key of the cached keyring: metadata, and the unwrapped material when
/// the key is usable (active or retiring). `Debug` never shows material.
#[derive(Clone, Debug)]
pub struct CachedKey {
    pub kid: String,
    pub purpose: Purpose,
    pub algorithm: Algorithm,
    pub state: KeyState,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub activated_at: Option<DateTime<Utc>>,
    pub rotate_after: Option<DateTime<Utc>>,
    pub retire_after: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The key material; `None` for keys that may not be used.
    pub material: Option<KeyMaterial>,
    wrapped: Option<String>,
    row_mac: String,
}

/// A key a verifier (or signer) can use: the material of an active or
/// retiring signing key. Token verification builds on this.
#[derive(Clone, Debug)]
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    pub state: KeyState,
    /// The material as wrapped: raw secret bytes for HS256, PKCS#8 PEM for
    /// RS256/ES256/EdDSA.
    pub material: KeyMaterial,
}

/// One consistent keyring, as of one epoch.
#[derive(Debug)]
pub struct Keyring {
    pub epoch: i64,
    pub root_kid: String,
    keys: Vec<CachedKey>,
    data: Option<DataKeys>,
    /// The token verifier over this snapshot's signing keys, built on first use: parsing the
    /// keys (an RSA private key in particular) costs far more than verifying a token.
    verifier: std::sync::OnceLock<Result<crate::crypto::jose::VerifierSet, String>>,
}

impl Keyring {
    /// Every key, as in the snapshot (purpose, then newest version first).
    pub fn keys(&self) -> &[CachedKey] {
        &self.keys
    }

    /// One key by kid.
    pub fn key(&self, kid: &str) -> Option<&CachedKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// The active key of a purpose.
    pub fn active(&self, purpose: Purpose) -> Option<&CachedKey> {
        self.keys
            .iter()
            .find(|k| k.purpose == purpose && k.state == KeyState::Active)
    }

    /// Keys of `purpose` in `state`.
    pub fn by_state(&self, purpose: Purpose, state: KeyState) -> Vec<&CachedKey> {
        self.keys
            .iter()
            .filter(|k| k.purpose == purpose && k.state == state)
            .collect()
    }

    /// A token verifier over every signing key of this keyring: active and
    /// retiring keys verify; revoked, retired and destroyed ones are named so
    /// their tokens fail with "key is revoked" (or retired...), not "unknown".
    /// Built once per snapshot; a new epoch brings a new snapshot and so a new verifier.
    pub fn verifier(&self) -> anyhow::Result<&crate::crypto::jose::VerifierSet> {
        self.verifier
            .get_or_init(|| self.build_verifier().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn build_verifier(&self) -> anyhow::Result<crate::crypto::jose::VerifierSet> {
        let mut entries = Vec::new();
        for k in self.keys.iter().filter(|k| k.purpose == Purpose::Signing) {
            let material = match (&k.material, k.state.can_verify_or_decrypt()) {
                (Some(m), true) => m.expose(),
                (None, true) => continue,
                (_, false) => &[][..],
            };
            entries.push((
                k.kid.clone(),
                crate::crypto::signing_alg(k.algorithm)?,
                crate::app::tokens::key_use(k.state),
                material,
            ));
        }
        Ok(crate::crypto::jose::VerifierSet::new(entries)?)
    }

    /// The usable keys of a purpose (active first, then retiring, newest
    /// first), with their material.
    pub fn usable(&self, purpose: Purpose) -> Vec<&CachedKey> {
        let mut out: Vec<&CachedKey> = self
            .keys
            .iter()
            .filter(|k| k.purpose == purpose && k.state.can_verify_or_decrypt())
            .filter(|k| k.material.is_some())
            .collect();
        out.sort_by_key(|k| (k.state != KeyState::Active, -k.version));
        out
    }

    /// The signing keys a verifier may use (active and retiring), active
    /// first: `(kid, alg, state, material)`.
    pub fn signing_keys(&self) -> Vec<SigningKey> {
        self.usable(Purpose::Signing)
            .into_iter()
            .filter_map(|k| {
                Some(SigningKey {
                    kid: k.kid.clone(),
                    alg: k.algorithm,
                    state: k.state,
                    material: k.material.clone()?,
                })
            })
            .collect()
    }

    /// The data keys that decrypt (active first), if there is an active one.
    pub fn data_keys(&self) -> Option<&DataKeys> {
        self.data.as_ref()
    }
}

fn opt_parse<T: std::str::FromStr>(kid: &str, what: &str, s: &str) -> anyhow::Result<T> {
    s.parse::<T>()
        .map_err(|_| anyhow::anyhow!("snapshot key {kid}: unknown {what} {s:?}"))
}

/// Builds a keyring from a snapshot, unwrapping every usable key (reusing
/// material from `previous` for keys whose wrapping did not change).
pub fn build_keyring(
    snapshot: Snapshot,
    roots: &RootKeys,
    previous: Option<&Keyring>,
) -> anyhow::Result<Keyring> {
    let mut keys = Vec::with_capacity(snapshot.keys.len());
    for k in snapshot.keys {
        let purpose: Purpose = opt_parse(&k.kid, "purpose", &k.purpose)?;
        let algorithm: Algorithm = opt_parse(&k.kid, "algorithm", &k.algorithm)?;
        let state: KeyState = opt_parse(&k.kid, "state", &k.state)?;
        let material = if state.can_verify_or_decrypt() {
            let reused = previous
                .and_then(|p| p.key(&k.kid))
                .filter(|p| p.row_mac == k.row_mac && p.wrapped == k.wrapped)
                .and_then(|p| p.material.clone());
            match reused {
                Some(m) => Some(m),
                None => Some(
                    roots
                        .unwrap(
                            &k.kid,
                            &k.purpose,
                            &k.algorithm,
                            &Wrapped {
                                token: k.wrapped.clone(),
                                root_kid: k.wrapped_root_kid.clone(),
                                row_mac: k.row_mac.clone(),
                            },
                        )
                        .with_context(|| format!("unwrapping key {} from the snapshot", k.kid))?,
                ),
            }
        } else {
            None
        };
        keys.push(CachedKey {
            kid: k.kid,
            purpose,
            algorithm,
            state,
            version: k.version,
            created_at: k.created_at,
            activated_at: k.activated_at,
            rotate_after: k.rotate_after,
            retire_after: k.retire_after,
            revoked_at: k.revoked_at,
            material,
            wrapped: k.wrapped,
            row_mac: k.row_mac,
        });
    }
    let mut keyring = Keyring {
        epoch: snapshot.epoch,
        root_kid: snapshot.root_kid,
        keys,
        data: None,
        verifier: std::sync::OnceLock::new(),
    };
    let usable = keyring.usable(Purpose::Data);
    if let Some(active) = usable.first().filter(|k| k.state == KeyState::Active) {
        let mut data = Vec::with_capacity(usable.len());
        for k in &usable {
            let m = k.material.as_ref().expect("usable keys have material");
            let text = std::str::from_utf8(m.expose())
                .ok()
                .with_context(|| format!("data key {} holds no Fernet key", k.kid))?;
            let key = FernetKey::from_base64(text)
                .map_err(|_| anyhow::anyhow!("data key {} holds no Fernet key", k.kid))?;
            data.push((k.kid.clone(), key));
        }
        keyring.data = Some(DataKeys {
            active_kid: active.kid.clone(),
            keys: data,
        });
    }
    Ok(keyring)
}

/// Counters a cache keeps (for tests, benchmarks and health pages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Snapshots loaded (each a newer epoch, or a full reload).
    pub reloads: u64,
    /// Reconnects seen (each followed by a flush and full reload).
    pub reconnects: u64,
    /// Snapshots refused (not parseable or not unwrappable).
    pub refused: u64,
}

struct Shared {
    opts: CacheOptions,
    target: RedisTarget,
    keyring: RwLock<Arc<Keyring>>,
    held_at: Mutex<DateTime<Utc>>,
    epoch_tx: watch::Sender<i64>,
    counters: Mutex<BTreeMap<(i64, String), i64>>,
    reloads: AtomicU64,
    reconnects: AtomicU64,
    refused: AtomicU64,
    stop: Notify,
}

/// The application's keyring, in memory, kept current from Redis. Cheap to
/// share (`Arc<KeyringCache>`); reading the keyring never waits on Redis.
pub struct KeyringCache {
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for KeyringCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyringCache")
            .field("instance_id", &self.shared.opts.instance_id)
            .field("epoch", &self.epoch())
            .finish_non_exhaustive()
    }
}

enum Signal {
    /// An event for this epoch arrived.
    Event(i64),
    /// The subscription was re-established after a drop.
    Reconnected,
    /// A connection dropped.
    Disconnected,
}

impl KeyringCache {
    /// Connects, loads and unwraps the current snapshot, then follows
    /// changes in a background task. Fails when Redis cannot be reached,
    /// holds no snapshot yet, or the snapshot does not unwrap with the root
    /// keys given.
    pub async fn connect(opts: CacheOptions) -> anyhow::Result<KeyringCache> {
        let target = RedisTarget::parse(&opts.redis_url)?;
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let mut conn = target
            .connect_with_push(target.is_cluster().then_some(push_tx))
            .await?;
        let raw: Option<String> = conn
            .query(redis::cmd("GET").arg(KEYRING_KEY))
            .await
            .context("reading the keyring snapshot")?;
        let raw = raw.with_context(|| {
            format!(
                "{} holds no keyring snapshot at {KEYRING_KEY}: start `keywarden run` \
                 or run `keywarden sync publish`",
                target.describe()
            )
        })?;
        let snapshot: Snapshot =
            serde_json::from_str(&raw).context("the keyring snapshot in Redis is not valid")?;
        let keyring = build_keyring(snapshot, &opts.roots, None)?;
        let epoch = keyring.epoch;
        let (epoch_tx, _) = watch::channel(epoch);
        let shared = Arc::new(Shared {
            target,
            opts,
            keyring: RwLock::new(Arc::new(keyring)),
            held_at: Mutex::new(Utc::now()),
            epoch_tx,
            counters: Mutex::new(BTreeMap::new()),
            reloads: AtomicU64::new(1),
            reconnects: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            stop: Notify::new(),
        });
        shared.ack(&mut conn).await;
        let task = tokio::spawn(run(shared.clone(), conn, push_rx));
        Ok(KeyringCache {
            shared,
            task: Some(task),
        })
    }

    /// The keyring as of now (a consistent view of one epoch).
    pub fn keyring(&self) -> Arc<Keyring> {
        self.shared.current()
    }

    /// The epoch held.
    pub fn epoch(&self) -> i64 {
        *self.shared.epoch_tx.borrow()
    }

    /// A receiver that changes whenever a newer epoch is held.
    pub fn watch_epoch(&self) -> watch::Receiver<i64> {
        self.shared.epoch_tx.subscribe()
    }

    /// Waits until the cache holds `epoch` or newer; false on timeout.
    pub async fn wait_for_epoch(&self, epoch: i64, timeout: Duration) -> bool {
        let mut rx = self.watch_epoch();
        tokio::time::timeout(timeout, rx.wait_for(|e| *e >= epoch))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// This instance's id in `keywarden:acks`.
    pub fn instance_id(&self) -> &str {
        &self.shared.opts.instance_id
    }

    /// Reload and reconnect counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            reloads: self.shared.reloads.load(Ordering::Relaxed),
            reconnects: self.shared.reconnects.load(Ordering::Relaxed),
            refused: self.shared.refused.load(Ordering::Relaxed),
        }
    }

    /// Encrypts with the active data key; returns the Fernet token.
    pub fn encrypt(&self, plaintext: &[u8]) -> anyhow::Result<String> {
        let keyring = self.keyring();
        let data = keyring
            .data_keys()
            .context("the keyring has no active data key")?;
        Ok(data.encrypt(plaintext, Utc::now().timestamp() as u64).1)
    }

    /// Decrypts a Fernet token with the active or a retiring data key.
    pub fn decrypt(&self, token: &str) -> Result<Zeroizing<Vec<u8>>, DecryptError> {
        let keyring = self.keyring();
        let data = keyring.data_keys().ok_or(DecryptError::NoKey)?;
        data.decrypt(token).map(|(_, p)| p)
    }

    /// The signing keys a verifier may use, active first.
    pub fn signing_keys(&self) -> Vec<SigningKey> {
        self.keyring().signing_keys()
    }

    /// Verifies a JWS against the keyring this instance holds now (the same
    /// RFC 8725 rules as `keywarden token verify`, without the store's
    /// denylist), and counts the outcome for the alert rules.
    pub fn verify_token(
        &self,
        token: &str,
        opts: &crate::crypto::jose::VerifyOptions,
    ) -> anyhow::Result<Result<crate::crypto::jose::Verified, crate::crypto::jose::VerifyError>>
    {
        let result = self.keyring().verifier()?.verify(token, opts);
        match &result {
            Ok(_) => self.record_verification(true, ""),
            Err(e) => self.record_verification(false, e.code()),
        }
        Ok(result)
    }

    /// Counts one token verification: `ok`, or a failure with a short
    /// reason (`expired`, `bad_signature`, ...). Counted in memory and added
    /// to the per-minute hash `keywarden:verify:{unix_minute}` (fields `ok`,
    /// `fail`, `fail:{reason}`) at the next poll; never waits on Redis.
    pub fn record_verification(&self, ok: bool, reason: &str) {
        let minute = Utc::now().timestamp().div_euclid(60);
        let mut counters = self.shared.counters.lock().expect("counter lock");
        if ok {
            *counters.entry((minute, "ok".into())).or_default() += 1;
        } else {
            *counters.entry((minute, "fail".into())).or_default() += 1;
            let reason: String = reason
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                        c.to_ascii_lowercase()
                    } else {
                        '_'
                    }
                })
                .take(64)
                .collect();
            let reason = if reason.is_empty() {
                "unknown".into()
            } else {
                reason
            };
            *counters
                .entry((minute, format!("fail:{reason}")))
                .or_default() += 1;
        }
    }

    /// Writes the counted verifications to Redis now.
    pub async fn flush_verifications(&self) -> anyhow::Result<()> {
        let mut conn = self.shared.target.connect().await?;
        self.shared.flush_counters(&mut conn).await
    }

    /// Stops following changes, writing the counted verifications first.
    pub async fn close(mut self) {
        self.shared.stop.notify_one();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for KeyringCache {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Shared {
    fn current(&self) -> Arc<Keyring> {
        self.keyring.read().expect("keyring lock").clone()
    }

    fn held(&self) -> i64 {
        *self.epoch_tx.borrow()
    }

    /// Loads the snapshot if it is newer than the epoch held (or, with
    /// `full`, at least as new, unwrapping everything afresh). Returns
    /// whether the keyring changed.
    async fn reload(&self, conn: &mut RedisConn, full: bool) -> anyhow::Result<bool> {
        let raw: Option<String> = conn.query(redis::cmd("GET").arg(KEYRING_KEY)).await?;
        let Some(raw) = raw else {
            tracing::debug!("Redis holds no keyring snapshot (yet); keeping the keyring held");
            return Ok(false);
        };
        let snapshot: Snapshot = match serde_json::from_str(&raw) {
            Ok(s) => s,
            Err(e) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "the keyring snapshot in Redis is not valid; keeping the keyring held");
                return Ok(false);
            }
        };
        let held = self.held();
        if snapshot.epoch < held || (snapshot.epoch == held && !full) {
            return Ok(false);
        }
        let previous = self.current();
        let previous = (!full).then_some(&*previous);
        let keyring = match build_keyring(snapshot, &self.opts.roots, previous) {
            Ok(k) => k,
            Err(e) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    error = %format!("{e:#}"),
                    "the keyring snapshot in Redis does not unwrap with the root keys given; keeping the keyring held"
                );
                return Ok(false);
            }
        };
        let epoch = keyring.epoch;
        *self.keyring.write().expect("keyring lock") = Arc::new(keyring);
        if epoch > held {
            *self.held_at.lock().expect("held_at lock") = Utc::now();
        }
        self.reloads.fetch_add(1, Ordering::Relaxed);
        self.epoch_tx.send_replace(epoch);
        tracing::debug!(epoch, "keyring reloaded from Redis");
        self.ack(conn).await;
        Ok(true)
    }

    /// Writes this instance's acknowledgement (best effort).
    async fn ack(&self, conn: &mut RedisConn) {
        let ack = Ack {
            epoch: self.held(),
            at: rfc3339_ms(*self.held_at.lock().expect("held_at lock")),
            seen: Some(rfc3339_ms(Utc::now())),
        };
        let json = serde_json::to_string(&ack).expect("an ack serialises");
        let r: redis::RedisResult<i64> = conn
            .query(
                redis::cmd("HSET")
                    .arg(ACKS_KEY)
                    .arg(&self.opts.instance_id)
                    .arg(json),
            )
            .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "cannot acknowledge the epoch");
        }
    }

    async fn flush_counters(&self, conn: &mut RedisConn) -> anyhow::Result<()> {
        let pending = std::mem::take(&mut *self.counters.lock().expect("counter lock"));
        let mut failed = BTreeMap::new();
        let mut error = None;
        let mut expired = std::collections::BTreeSet::new();
        for ((minute, field), n) in pending {
            let key = format!("{VERIFY_PREFIX}{minute}");
            let r: redis::RedisResult<i64> = conn
                .query(redis::cmd("HINCRBY").arg(&key).arg(&field).arg(n))
                .await;
            match r {
                Ok(_) => {
                    if expired.insert(key.clone()) {
                        let _: redis::RedisResult<i64> = conn
                            .query(redis::cmd("EXPIRE").arg(&key).arg(VERIFY_TTL_SECS))
                            .await;
                    }
                }
                Err(e) => {
                    failed.insert((minute, field), n);
                    error = Some(e);
                }
            }
        }
        if !failed.is_empty() {
            // Keep what did not go out for the next flush.
            let mut counters = self.counters.lock().expect("counter lock");
            for (k, n) in failed {
                *counters.entry(k).or_default() += n;
            }
        }
        match error {
            Some(e) => Err(e).context("counting verifications in Redis"),
            None => Ok(()),
        }
    }
}

/// Subscribes on a single server with a dedicated pub/sub connection and
/// reconnects forever; reports events and reconnects as signals.
async fn pubsub_loop(
    target: RedisTarget,
    tx: mpsc::UnboundedSender<Signal>,
    max_backoff: Duration,
) {
    let mut first = true;
    let mut backoff = Duration::from_millis(20);
    loop {
        let subscribed = async {
            let mut ps = target.pubsub().await?.context("not a single server")?;
            ps.subscribe(CHANNEL).await?;
            anyhow::Ok(ps)
        }
        .await;
        match subscribed {
            Ok(mut ps) => {
                let since = tokio::time::Instant::now();
                if !first && tx.send(Signal::Reconnected).is_err() {
                    return;
                }
                first = false;
                let mut stream = ps.on_message();
                while let Some(msg) = stream.next().await {
                    let epoch = msg
                        .get_payload::<String>()
                        .ok()
                        .and_then(|p| serde_json::from_str::<Event>(&p).ok())
                        .map_or(i64::MAX, |e| e.epoch);
                    if tx.send(Signal::Event(epoch)).is_err() {
                        return;
                    }
                }
                if tx.send(Signal::Disconnected).is_err() {
                    return;
                }
                // A subscription that held a while reconnects at once; one
                // that drops as soon as it is made backs off.
                if since.elapsed() > max_backoff {
                    backoff = Duration::from_millis(20);
                } else {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "cannot subscribe; retrying");
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

/// The background task: signals, polling, acks, counters.
async fn run(
    shared: Arc<Shared>,
    conn: RedisConn,
    mut push_rx: mpsc::UnboundedReceiver<redis::PushInfo>,
) {
    let poll = shared.opts.poll_interval.max(Duration::from_millis(10));
    let (sig_tx, mut sig_rx) = mpsc::unbounded_channel::<Signal>();
    let mut conn = Some(conn);
    if shared.opts.subscribe {
        match &shared.target {
            RedisTarget::Single(_) => {
                tokio::spawn(pubsub_loop(shared.target.clone(), sig_tx.clone(), poll));
            }
            RedisTarget::Cluster(_) => {
                let subscribed = match conn.as_mut() {
                    Some(RedisConn::Cluster(c)) => c.subscribe(CHANNEL).await.map_err(Into::into),
                    _ => Err(anyhow::anyhow!("not a cluster connection")),
                };
                if let Err(e) = subscribed {
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        "cannot subscribe on the Redis Cluster; following the keyring by polling only"
                    );
                }
                let tx = sig_tx.clone();
                tokio::spawn(async move {
                    while let Some(push) = push_rx.recv().await {
                        let signal = match push.kind {
                            redis::PushKind::Disconnection => Signal::Disconnected,
                            redis::PushKind::Message => {
                                let epoch = redis::Msg::from_push_info(push)
                                    .and_then(|m| m.get_payload::<String>().ok())
                                    .and_then(|p| serde_json::from_str::<Event>(&p).ok())
                                    .map_or(i64::MAX, |e| e.epoch);
                                Signal::Event(epoch)
                            }
                            _ => continue,
                        };
                        if tx.send(signal).is_err() {
                            return;
                        }
                    }
                });
            }
        }
    }
    drop(sig_tx);
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    // After a drop the next successful read flushes and reloads in full.
    let mut need_full = false;
    loop {
        tokio::select! {
            _ = shared.stop.notified() => {
                if let Some(c) = conn.as_mut() {
                    let _ = shared.flush_counters(c).await;
                }
                return;
            }
            Some(signal) = sig_rx.recv() => match signal {
                Signal::Event(epoch) => {
                    if epoch > shared.held() && let Some(c) = conn.as_mut() {
                        if let Err(e) = shared.reload(c, need_full).await {
                            tracing::debug!(error = %e, "reload after an event failed; polling retries");
                        } else {
                            need_full = false;
                        }
                    }
                }
                Signal::Reconnected => {
                    shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    need_full = true;
                    if let Some(c) = conn.as_mut()
                        && shared.reload(c, true).await.is_ok()
                    {
                        need_full = false;
                    }
                }
                Signal::Disconnected => {
                    if shared.target.is_cluster() {
                        shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    need_full = true;
                }
            },
            _ = ticker.tick() => {
                if conn.is_none() {
                    match shared.target.connect().await {
                        Ok(c) => {
                            conn = Some(c);
                            shared.reconnects.fetch_add(1, Ordering::Relaxed);
                            need_full = true;
                        }
                        Err(e) => {
                            tracing::debug!(error = %format!("{e:#}"), "Redis unreachable; keeping the keyring held");
                            continue;
                        }
                    }
                }
                let c = conn.as_mut().expect("connected above");
                let polled = async {
                    let epoch: Option<i64> = c.query(redis::cmd("GET").arg(EPOCH_KEY)).await?;
                    if need_full || epoch.unwrap_or(0) > shared.held() {
                        shared.reload(c, need_full).await?;
                    }
                    shared.ack(c).await;
                    shared.flush_counters(c).await?;
                    anyhow::Ok(())
                }
                .await;
                match polled {
                    Ok(()) => need_full = false,
                    Err(e) => {
                        tracing::debug!(error = %format!("{e:#}"), "polling Redis failed; reconnecting");
                        if !shared.target.is_cluster() {
                            conn = None;
                        }
                        need_full = true;
                    }
                }
            }
        }
    }
}
