//! keywarden: a key-rotation and audit worker.
//!
//! Crate map (ARCHITECTURE.md has the long form):
//! - `keyring`: PURE domain: purposes, states, transitions, rotation policy.
//! - `crypto`: PURE, CPU-bound: Fernet, the root key envelope, JWS/JWE.
//! - `config`, `duration`: config file + environment into validated types.
//! - `store`: sqlx repositories over SQLite and PostgreSQL.
//! - `reencrypt`: the re-encryption engine, census, quarantine, key import.
//! - `app`: the service that ties config, store and root keys together.
//! - `cli`: the command line (one file per command group).

pub mod app;
pub mod audit;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod duration;
pub mod error;
pub mod keyring;
pub mod reencrypt;
pub mod scheduler;
pub mod store;
