//! The integration suite: one binary, one module per area. Every test runs
//! the real `keywarden` binary on a fresh store, on SQLite and PostgreSQL.

mod support;

mod keyring;

mod reencrypt;
