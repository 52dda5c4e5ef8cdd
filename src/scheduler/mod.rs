//! The worker's scheduling: job definitions as data (`defs`), and the cron
//! wiring, leases and shutdown that run them.

pub mod defs;
