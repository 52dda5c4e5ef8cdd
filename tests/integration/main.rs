//! The integration suite: one binary, one module per area. Every test runs
//! the real `keywarden` binary on a fresh store, on SQLite and PostgreSQL.

mod support;

mod alerts;
mod audit;
mod http;
mod keyring;
mod reencrypt;
mod revoke;
mod revoke_e2e;
mod sync;
mod tokens;
mod worker;
