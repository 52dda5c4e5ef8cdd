//! keywarden: a key-rotation and audit worker.
//!
//! Crate map (ARCHITECTURE.md has the long form):
//! - `keyring`: PURE domain: purposes, states, transitions, rotation policy.
//! - `crypto`: PURE, CPU-bound: Fernet, the root key envelope, JWS/JWE.
//! - `config`, `duration`: config file + environment into validated types.
//! - `store`: sqlx repositories over SQLite and PostgreSQL.
//! - `reencrypt`: the re-encryption engine, census, quarantine, key import.
//! - `app`: the service that ties config, store and root keys together.
//! - `scheduler`: job definitions, the one-run-per-tick claim, the worker loop.
//! - `jobs`: what each job kind does (one module per kind).
//! - `sync`: the outbox publisher to Redis, the `KeyringCache` subscriber, sync lag.
//! - `alerts`: rules (pure) and the email/Slack/webhook channels.
//! - `http`: the worker's HTTP endpoint (health, metrics, JWKS, admin).
//! - `cli`: the command line (one file per command group).

pub mod alerts;
pub mod app;
pub mod audit;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod duration;
pub mod error;
pub mod http;
pub mod jobs;
pub mod keyring;
pub mod reencrypt;
pub mod scheduler;
pub mod store;
pub mod sync;
