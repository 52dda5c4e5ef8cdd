//! Exit statuses (CLI.md): 0 success, 1 the operation failed, 2 bad usage,
//! config or input, 3 a verification said no. Commands return
//! `anyhow::Error`; these marker types, found anywhere in its chain, pick
//! the status once, at the top.

/// Bad usage, bad config or bad input: exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A verification said no (invalid token, broken audit chain, rejected API
/// key): exit 3.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// The exit status for an error.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.is::<Rejected>() {
            return 3;
        }
        if cause.is::<UsageError>() || cause.is::<crate::config::ConfigError>() {
            return 2;
        }
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn the_status_survives_added_context() {
        let e: anyhow::Result<()> = Err(UsageError("bad".into()).into());
        assert_eq!(exit_code(&e.context("while doing x").unwrap_err()), 2);
        let e: anyhow::Result<()> = Err(Rejected("no".into()).into());
        assert_eq!(exit_code(&e.context("verifying").unwrap_err()), 3);
        assert_eq!(exit_code(&anyhow::anyhow!("db down")), 1);
    }
}
