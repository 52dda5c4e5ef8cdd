//! One Redis connection type over the deployments keywarden supports: a
//! single server (`redis://`, `rediss://` with TLS through rustls, `unix://`)
//! and Redis Cluster.
//!
//! A cluster is named either with the scheme `redis+cluster://` (or
//! `rediss+cluster://`) and a comma-separated list of seed nodes,
//! `redis+cluster://:pass@10.0.0.1:7000,10.0.0.2:7000`, or with a
//! comma-separated list of ordinary URLs, `redis://a:7000,redis://b:7000`.
//! Nodes after the first inherit its scheme and credentials when they are
//! written as bare `host:port`. The cluster client talks RESP3 so that it can
//! subscribe (the redis crate's cluster pub/sub needs RESP3 push messages).

use std::time::Duration;

use anyhow::Context;
use redis::aio::ConnectionLike;
use redis::{Cmd, FromRedisValue, RedisResult};

use crate::error::UsageError;

/// How long connecting may take before Redis counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command may take before Redis counts as unreachable.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Where Redis is: parsed from `redis.url` / `KEYWARDEN_REDIS_URL`.
#[derive(Clone)]
pub enum RedisTarget {
    /// One server.
    Single(Box<redis::Client>),
    /// A Redis Cluster, by its seed node URLs.
    Cluster(Vec<String>),
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisTarget({})", self.describe())
    }
}

/// A connection for commands, to a single server or a cluster.
#[derive(Clone)]
pub enum RedisConn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl RedisConn {
    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            RedisConn::Single(c) => cmd.query_async(c).await,
            RedisConn::Cluster(c) => cmd.query_async(c).await,
        }
    }

    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// Hides passwords in a Redis URL (or list of them) for messages.
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|part| {
            let part = part.trim();
            match (part.find("://"), part.rfind('@')) {
                (Some(s), Some(at)) if at > s => {
                    let userinfo = &part[s + 3..at];
                    match userinfo.split_once(':') {
                        Some((user, _)) => {
                            format!("{}{user}:[redacted]{}", &part[..s + 3], &part[at..])
                        }
                        None => part.to_string(),
                    }
                }
                (None, Some(at)) => format!("[redacted]{}", &part[at..]),
                _ => part.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl RedisTarget {
    /// Parses a Redis URL or a cluster node list. A bad URL is a usage
    /// error that never shows a password.
    pub fn parse(url: &str) -> anyhow::Result<RedisTarget> {
        let url = url.trim();
        let bad = |why: &str| -> anyhow::Error {
            UsageError(format!("redis.url {} is not usable: {why}", redact(url))).into()
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("it has no scheme (use redis://, rediss:// or redis+cluster://)"))?;
        let (base_scheme, cluster_scheme) = match scheme {
            "redis+cluster" => ("redis", true),
            "rediss+cluster" => ("rediss", true),
            "redis" | "rediss" | "unix" | "redis+unix" => (scheme, false),
            _ => return Err(bad("unknown scheme")),
        };
        let parts: Vec<&str> = rest.split(',').map(str::trim).collect();
        if !cluster_scheme && parts.len() == 1 {
            let client = redis::Client::open(url).map_err(|e| bad(&e.to_string()))?;
            return Ok(RedisTarget::Single(Box::new(client)));
        }
        // A cluster: build one URL per node.
        let first = parts[0];
        let userinfo = first
            .split('/')
            .next()
            .and_then(|auth| auth.rsplit_once('@'))
            .map(|(u, _)| format!("{u}@"))
            .unwrap_or_default();
        let mut nodes = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            if part.is_empty() {
                return Err(bad("an empty entry in the node list"));
            }
            let node = if i == 0 {
                format!("{base_scheme}://{part}")
            } else if part.contains("://") {
                part.to_string()
            } else if part.contains('@') {
                format!("{base_scheme}://{part}")
            } else {
                format!("{base_scheme}://{userinfo}{part}")
            };
            redis::Client::open(node.as_str()).map_err(|e| bad(&e.to_string()))?;
            nodes.push(node);
        }
        Ok(RedisTarget::Cluster(nodes))
    }

    /// The target from config, or `None` when Redis is not configured.
    pub fn from_config(config: &crate::config::Config) -> anyhow::Result<Option<RedisTarget>> {
        config.redis.url().map(RedisTarget::parse).transpose()
    }

    /// A description for messages, passwords hidden.
    pub fn describe(&self) -> String {
        match self {
            RedisTarget::Single(c) => {
                let info = c.get_connection_info();
                let addr = info.addr().to_string();
                let db = info.redis_settings().db();
                if db == 0 {
                    format!("redis at {addr}")
                } else {
                    format!("redis at {addr} (db {db})")
                }
            }
            RedisTarget::Cluster(nodes) => {
                format!("redis cluster via {}", redact(&nodes.join(",")))
            }
        }
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster(_))
    }

    /// Connects for commands.
    pub async fn connect(&self) -> anyhow::Result<RedisConn> {
        self.connect_with_push(None).await
    }

    /// Connects for commands; on a cluster, push messages (pub/sub and
    /// disconnections) go to `push`.
    pub async fn connect_with_push(
        &self,
        push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
    ) -> anyhow::Result<RedisConn> {
        let what = self.describe();
        let fut = async {
            match self {
                RedisTarget::Single(client) => {
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(CONNECT_TIMEOUT))
                        .set_response_timeout(Some(RESPONSE_TIMEOUT));
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .map(RedisConn::Single)
                }
                RedisTarget::Cluster(nodes) => {
                    let mut builder = redis::cluster::ClusterClient::builder(nodes.clone())
                        .use_protocol(redis::ProtocolVersion::RESP3)
                        .connection_timeout(CONNECT_TIMEOUT)
                        .response_timeout(RESPONSE_TIMEOUT)
                        .retries(2);
                    if let Some(tx) = push {
                        builder = builder.push_sender(tx);
                    }
                    let client = builder.build()?;
                    client.get_async_connection().await.map(RedisConn::Cluster)
                }
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT + RESPONSE_TIMEOUT, fut).await {
            Ok(r) => r.with_context(|| format!("cannot connect to {what}")),
            Err(_) => anyhow::bail!("cannot connect to {what}: timed out"),
        }
    }

    /// A dedicated pub/sub connection to a single server (`None` on a
    /// cluster, which subscribes through its RESP3 command connection).
    pub async fn pubsub(&self) -> anyhow::Result<Option<redis::aio::PubSub>> {
        match self {
            RedisTarget::Single(client) => {
                let what = self.describe();
                match tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await {
                    Ok(r) => Ok(Some(
                        r.with_context(|| format!("cannot subscribe on {what}"))?,
                    )),
                    Err(_) => anyhow::bail!("cannot subscribe on {what}: timed out"),
                }
            }
            RedisTarget::Cluster(_) => Ok(None),
        }
    }
}

/// `PING` with a short timeout: whether Redis answers.
pub async fn ping(conn: &mut RedisConn) -> anyhow::Result<()> {
    let _: String = conn.query(&redis::cmd("PING")).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_server_urls_parse() {
        assert!(matches!(
            RedisTarget::parse("redis://127.0.0.1:6379/3").unwrap(),
            RedisTarget::Single(_)
        ));
        assert!(matches!(
            RedisTarget::parse("rediss://user:pw@redis.example:6380/").unwrap(),
            RedisTarget::Single(_)
        ));
    }

    #[test]
    fn cluster_lists_and_the_cluster_scheme_give_one_url_per_node() {
        let RedisTarget::Cluster(n) =
            RedisTarget::parse("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001").unwrap()
        else {
            panic!("not a cluster")
        };
        assert_eq!(
            n,
            ["redis://:pw@10.0.0.1:7000", "redis://:pw@10.0.0.2:7001"]
        );
        let RedisTarget::Cluster(n) =
            RedisTarget::parse("redis://127.0.0.1:27001,redis://127.0.0.1:27002").unwrap()
        else {
            panic!("not a cluster")
        };
        assert_eq!(n.len(), 2);
        let RedisTarget::Cluster(n) = RedisTarget::parse("rediss+cluster://h:1").unwrap() else {
            panic!("not a cluster")
        };
        assert_eq!(n, ["rediss://h:1"]);
    }

    #[test]
    fn bad_urls_are_usage_errors_without_the_password() {
        let e = RedisTarget::parse("http://:hunter2@x").unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some());
        assert!(!format!("{e:#}").contains("hunter2"));
        assert_eq!(
            redact("redis://:hunter2@a:1,redis://u:p@b:2"),
            "redis://:[redacted]@a:1,redis://u:[redacted]@b:2"
        );
    }
}
