//! The audit trail: every key operation as a hash-chained row.
//!
//! `chain` is the pure core (canonical form, hashing, verification,
//! checkpoints); the store and the write path build on it.

pub mod chain;
