//! `keywarden token sign|verify|encrypt|decrypt|revoke`.

use clap::Subcommand;
use serde_json::json;

use super::{Ctx, print_json};
use crate::app::OpenMode;
use crate::app::tokens::parse_claims_arg;
use crate::duration::Duration;
use crate::error::{Rejected, UsageError};
use crate::keyring::Algorithm;

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Sign a JWT (JWS) with the active signing key; the token goes to stdout.
    Sign {
        /// Require the active key to be this algorithm (HS256 | RS256 | ES256 | EdDSA).
        #[arg(long)]
        alg: Option<String>,
        /// Claims as a JSON object; iat, exp, jti (and iss/aud from config) are added.
        #[arg(long)]
        claims: Option<String>,
        /// Lifetime (default: tokens.default_ttl).
        #[arg(long, value_name = "DURATION")]
        ttl: Option<Duration>,
    },
    /// Verify a JWT: exit 0 when valid, 3 when not (the reason says why).
    Verify {
        /// The token (`-` reads it from standard input).
        token: String,
        /// Require this issuer (default: tokens.issuer).
        #[arg(long)]
        iss: Option<String>,
        /// Require this audience (default: tokens.audience).
        #[arg(long)]
        aud: Option<String>,
    },
    /// Encrypt claims as a JWE (dir + A256GCM) with the token-encryption key.
    Encrypt {
        #[arg(long)]
        claims: Option<String>,
        #[arg(long, value_name = "DURATION")]
        ttl: Option<Duration>,
    },
    /// Decrypt a JWE and check its claims; exit 3 when it does not.
    Decrypt {
        /// The token (`-` reads it from standard input).
        token: String,
    },
    /// Deny a token (or a bare jti) until its expiry.
    Revoke {
        /// A jti, or a whole token (`-` reads it from standard input).
        #[arg(value_name = "JTI|TOKEN")]
        target: String,
    },
}

fn token_arg(t: String) -> anyhow::Result<String> {
    if t == "-" {
        let input = super::read_stdin("token", "keywarden token verify - < token.txt")?;
        Ok(String::from_utf8_lossy(&input).trim().to_string())
    } else {
        Ok(t)
    }
}

fn ttl_or_default(ttl: Option<Duration>, default: Duration) -> anyhow::Result<chrono::TimeDelta> {
    let ttl = ttl.unwrap_or(default);
    if ttl.is_zero() {
        return Err(UsageError("--ttl must be longer than 0s".into()).into());
    }
    Ok(ttl.to_chrono())
}

pub async fn run(ctx: &Ctx, cmd: TokenCmd) -> anyhow::Result<()> {
    let now = super::now();
    match cmd {
        TokenCmd::Sign { alg, claims, ttl } => {
            let alg = alg
                .map(|a| {
                    a.parse::<Algorithm>()
                        .ok()
                        .filter(|a| a.fits(crate::keyring::Purpose::Signing))
                        .ok_or_else(|| {
                            UsageError(format!(
                                "--alg {a:?} is not a signing algorithm (allowed: HS256, RS256, ES256, EdDSA)"
                            ))
                        })
                })
                .transpose()?;
            let claims = parse_claims_arg(claims.as_deref())?;
            let app = ctx.open(OpenMode::Existing).await?;
            let ttl = ttl_or_default(ttl, app.config.tokens.default_ttl)?;
            let issued = app.sign_token(claims, ttl, alg, now).await?;
            app.audit_bump(crate::audit::action::TOKEN_ISSUED, "jws", now);
            app.flush_audit_counters(now).await?;
            if ctx.json {
                print_json(&issued)
            } else {
                println!("{}", issued.token);
                Ok(())
            }
        }
        TokenCmd::Verify { token, iss, aud } => {
            let token = token_arg(token)?;
            let app = ctx.open(OpenMode::Existing).await?;
            let opts = app.verify_options(now, iss.as_deref(), aud.as_deref());
            let result = app.verify_token(&token, &opts).await?;
            record_outcome(&app, now, result.as_ref().err()).await;
            report_verification(
                ctx,
                result.map(|v| {
                    (
                        v.kid.to_string(),
                        Some(v.alg.as_str()),
                        v.claims.into_value(),
                    )
                }),
            )
        }
        TokenCmd::Encrypt { claims, ttl } => {
            let claims = parse_claims_arg(claims.as_deref())?;
            let app = ctx.open(OpenMode::Existing).await?;
            let ttl = ttl_or_default(ttl, app.config.tokens.default_ttl)?;
            let issued = app.encrypt_token(claims, ttl, now).await?;
            app.audit_bump(crate::audit::action::TOKEN_ISSUED, "jwe", now);
            app.flush_audit_counters(now).await?;
            if ctx.json {
                print_json(&issued)
            } else {
                println!("{}", issued.token);
                Ok(())
            }
        }
        TokenCmd::Decrypt { token } => {
            let token = token_arg(token)?;
            let app = ctx.open(OpenMode::Existing).await?;
            let opts = app.verify_options(now, None, None);
            let result = app.decrypt_jwe(&token, &opts).await?;
            record_outcome(&app, now, result.as_ref().err()).await;
            report_verification(
                ctx,
                result.map(|(kid, claims)| (kid, Some("dir+A256GCM"), claims)),
            )
        }
        TokenCmd::Revoke { target } => {
            let target = token_arg(target)?;
            let app = ctx.open(OpenMode::Existing).await?;
            let (jti, until) = app.revoke_token(&target, now).await?;
            if ctx.json {
                print_json(&json!({ "jti": jti, "denied_until": until }))
            } else {
                println!(
                    "revoked token {jti} (denied until {})",
                    super::show_time(Some(until))
                );
                Ok(())
            }
        }
    }
}

/// Counts the outcome for the alert rules (Redis, when configured) and, for
/// a failure, in the audit log (aggregated per reason, as on the hot path).
async fn record_outcome(
    app: &crate::app::App,
    now: chrono::DateTime<chrono::Utc>,
    failure: Option<&crate::crypto::jose::VerifyError>,
) {
    crate::sync::lag::record_verification_now(app, now, failure.map(|e| e.code())).await;
    if let Some(e) = failure {
        app.audit_bump(crate::audit::action::TOKEN_VERIFY_FAILED, e.code(), now);
        if let Err(err) = app.flush_audit_counters(now).await {
            tracing::warn!(error = %format!("{err:#}"), "could not write the audit row for a failed verification");
        }
    }
}

/// Prints `{valid, kid, alg, claims, error}` (CLI.md) and exits 3 when
/// the token did not verify.
fn report_verification(
    ctx: &Ctx,
    result: Result<(String, Option<&str>, serde_json::Value), crate::crypto::jose::VerifyError>,
) -> anyhow::Result<()> {
    match result {
        Ok((kid, alg, claims)) => {
            if ctx.json {
                print_json(&json!({
                    "valid": true, "kid": kid, "alg": alg, "claims": claims, "error": null,
                }))
            } else {
                println!("{}", serde_json::to_string_pretty(&claims)?);
                eprintln!("valid: signed by {kid}");
                Ok(())
            }
        }
        Err(e) => {
            if ctx.json {
                print_json(&json!({
                    "valid": false, "kid": null, "alg": null, "claims": null,
                    "error": { "code": e.code(), "message": e.to_string() },
                }))?;
            }
            Err(Rejected(format!("token rejected: {e} ({})", e.code())).into())
        }
    }
}
