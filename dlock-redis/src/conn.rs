//! Reaching Redis: URL parsing, the command and subscriber connections, and error mapping.

use std::time::Duration;

use dlock_core::url::HostPort;
use dlock_core::{Error, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, ConnectionInfo, ErrorKind, IntoConnectionInfo, ProtocolVersion, PushInfo, RedisError,
    ServerErrorKind, TlsCertificates, Value,
};

pub(crate) const DRIVER: &str = "redis";

/// Our own query parameters; everything else in the query is passed on to the `redis` crate.
const TLS_CA: &str = "tls_ca";
const TLS_CERT: &str = "tls_cert";
const TLS_KEY: &str = "tls_key";
const KEY_PREFIX: &str = "key_prefix";

/// What a URL asks for.
pub(crate) struct Target {
    /// The URL as given, for errors (which redact it).
    pub url: String,
    /// One node, or the seed nodes of a cluster.
    pub nodes: Vec<ConnectionInfo>,
    pub cluster: bool,
    pub certs: Option<TlsCertificates>,
    pub key_prefix: Option<String>,
}

const TLS_PARAMS: [&str; 3] = [TLS_CA, TLS_CERT, TLS_KEY];
const PARAMS: &str = "tls_ca, tls_cert, tls_key, key_prefix, protocol";
const FORM: &str = "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?PARAM=VALUE&…]";

fn invalid(url: &str, reason: impl Into<String>) -> Error {
    Error::invalid_url(url, reason)
}

/// Parses `redis://`, `rediss://`, `redis+cluster://` and `rediss+cluster://` URLs (see the crate docs).
pub(crate) fn parse(url: &str) -> Result<Target> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid(url, "expected redis://HOST:PORT"))?;
    let (tls, cluster) = match scheme {
        "redis" => (false, false),
        "rediss" => (true, false),
        "redis+cluster" => (false, true),
        "rediss+cluster" => (true, true),
        _ => {
            return Err(invalid(
                url,
                format!(
                    "unknown scheme {scheme:?}; use redis, rediss, redis+cluster or rediss+cluster"
                ),
            ))
        }
    };
    let (rest, fragment) = match rest.split_once('#') {
        Some((r, f)) => (r, Some(f)),
        None => (rest, None),
    };
    match fragment {
        None => {}
        Some("insecure") if tls => {}
        Some("insecure") => {
            return Err(invalid(
                url,
                "#insecure only makes sense with TLS (rediss://)",
            ))
        }
        Some(other) => {
            return Err(invalid(
                url,
                format!("unknown URL fragment #{other}; the only one is #insecure"),
            ))
        }
    }
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, q),
        None => (rest, ""),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };

    // Only `protocol` means something to the `redis` crate (it ignores what it does not know), so
    // it is the one parameter passed on; anything else is refused rather than silently dropped.
    let mut passed = Vec::new();
    let (mut ca, mut cert, mut key, mut key_prefix) = (None, None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value = || {
            percent_decode(v).ok_or_else(|| {
                invalid(
                    url,
                    format!("{k}: bad percent-encoding; write a '%' as %25"),
                )
            })
        };
        if !tls && TLS_PARAMS.contains(&k) {
            return Err(invalid(
                url,
                format!("{k} needs TLS: use rediss:// (or rediss+cluster://)"),
            ));
        }
        match k {
            TLS_CA => ca = Some(value()?),
            TLS_CERT => cert = Some(value()?),
            TLS_KEY => key = Some(value()?),
            KEY_PREFIX => key_prefix = Some(value()?),
            "protocol" => match value()?.as_str() {
                "2" | "resp2" | "3" | "resp3" => passed.push(pair),
                other => {
                    return Err(invalid(
                        url,
                        format!("protocol={other:?}: use resp2 or resp3"),
                    ))
                }
            },
            _ => {
                return Err(invalid(
                    url,
                    format!("unknown query parameter {k:?}; known: {PARAMS}"),
                ))
            }
        }
    }
    let certs = match (ca, cert, key) {
        (None, None, None) => None,
        (ca, cert, key) => {
            let read = |param: &str, path: &str| {
                std::fs::read(path)
                    .map_err(|e| invalid(url, format!("{param}: cannot read {path:?}: {e}")))
            };
            let client_tls = match (cert, key) {
                (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                    client_cert: read(TLS_CERT, &c)?,
                    client_key: read(TLS_KEY, &k)?,
                }),
                (None, None) => None,
                _ => return Err(invalid(url, "tls_cert and tls_key go together")),
            };
            let root_cert = ca.map(|p| read(TLS_CA, &p)).transpose()?;
            Some(TlsCertificates {
                client_tls,
                root_cert,
            })
        }
    };

    let hosts: Vec<&str> = hosts.split(',').collect();
    if hosts.iter().any(|h| h.is_empty()) {
        return Err(invalid(
            url,
            format!("no host given; write {FORM} (hosts comma-separated for a cluster)"),
        ));
    }
    if !cluster && hosts.len() > 1 {
        return Err(invalid(
            url,
            "several hosts need the redis+cluster:// (or rediss+cluster://) scheme",
        ));
    }
    for host in &hosts {
        HostPort::parse(url, host, 6379, "Redis")?;
    }
    let db = path.strip_prefix('/').unwrap_or(path);
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return Err(invalid(
            url,
            format!("invalid database {db:?}: the path is a database number, as in /0"),
        ));
    }
    if cluster && !matches!(db, "" | "0") {
        return Err(invalid(url, "Redis Cluster has only database 0"));
    }
    let base = if tls { "rediss" } else { "redis" };
    let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    let query = if passed.is_empty() {
        String::new()
    } else {
        format!("?{}", passed.join("&"))
    };
    let fragment = fragment.map(|f| format!("#{f}")).unwrap_or_default();
    let nodes = hosts
        .iter()
        .map(|host| {
            let node = format!("{base}://{userinfo}{host}{path}{query}{fragment}");
            node.as_str().into_connection_info().map_err(|e| {
                // What the checks above let through (a malformed IPv6 address, a wildcard address,
                // credentials that are not UTF-8), in the crate's words minus its kind's name.
                let why = e.to_string().replace(" - InvalidClientConfig", "");
                invalid(url, format!("{why}; write {FORM}"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Target {
        url: url.to_owned(),
        nodes,
        cluster,
        certs,
        key_prefix,
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                out.push(u8::from_str_radix(s.get(i + 1..i + 3)?, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Timeouts for every connection of a driver.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

fn client(target: &Target, info: ConnectionInfo, timeouts: Timeouts) -> Result<Client> {
    match &target.certs {
        Some(certs) => Client::build_with_tls(info, certs.clone()),
        None => Client::open(info),
    }
    .map_err(|e| connect_error(target, timeouts, e))
}

fn with_protocol(info: &ConnectionInfo, protocol: ProtocolVersion) -> ConnectionInfo {
    info.clone()
        .set_redis_settings(info.redis_settings().clone().set_protocol(protocol))
}

/// The connection scripts run on.
#[derive(Clone)]
pub(crate) enum Commands {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Commands {
    pub(crate) async fn invoke(&self, call: &redis::ScriptInvocation<'_>) -> Result<Value> {
        // A connection the server dropped (it restarted, or its node failed over) fails the next
        // command while the client reconnects. Every dlock script is safe to run twice, so one that
        // failed that way is sent again, a few times, before the caller hears of it.
        let mut pause = Duration::from_millis(20);
        for _ in 0..3 {
            match self.invoke_once(call).await {
                Err(err) if err.is_connection_dropped() => {
                    tracing::debug!(error = %err, "dlock-redis: connection dropped; sending the script again");
                    tokio::time::sleep(pause).await;
                    pause *= 3;
                }
                other => return other.map_err(backend),
            }
        }
        self.invoke_once(call).await.map_err(backend)
    }

    async fn invoke_once(&self, call: &redis::ScriptInvocation<'_>) -> redis::RedisResult<Value> {
        match self {
            Commands::Single(c) => call.invoke_async(&mut c.clone()).await,
            Commands::Cluster(c) => call.invoke_async(&mut c.clone()).await,
        }
    }
}

/// The one RESP3 connection per driver that carries every waiter's subscriptions.
///
/// Standalone uses `SUBSCRIBE`/`PUBLISH`; a cluster uses the sharded `SSUBSCRIBE`/`SPUBLISH` (Redis 7),
/// which keep a name's wake-ups on the shard that owns its slot, where plain `PUBLISH` would be
/// broadcast over the cluster bus to every node.
#[derive(Clone)]
pub(crate) enum Subscriber {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Subscriber {
    pub(crate) async fn subscribe(&self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Subscriber::Single(c) => c.clone().subscribe(channel).await,
            Subscriber::Cluster(c) => c.clone().ssubscribe(channel).await,
        }
    }

    pub(crate) async fn unsubscribe(&self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Subscriber::Single(c) => c.clone().unsubscribe(channel).await,
            Subscriber::Cluster(c) => c.clone().sunsubscribe(channel).await,
        }
    }
}

/// What [`connect`] opened and learned.
pub(crate) struct Connected {
    pub commands: Commands,
    pub subscriber: Subscriber,
    /// `redis_version` from `INFO server` on the first node; `None` when the user may not run `INFO`.
    pub server_version: Option<String>,
}

/// Connects to a single node or a cluster: a command connection, and a subscriber connection whose
/// pushes go to `on_push`.
pub(crate) async fn connect(
    target: &Target,
    timeouts: Timeouts,
    on_push: impl Fn(PushInfo) + Send + Sync + 'static,
) -> Result<Connected> {
    if target.certs.is_some()
        || matches!(target.nodes[0].addr(), redis::ConnectionAddr::TcpTls { .. })
    {
        // The `redis` crate builds rustls configs from the process default provider; make sure one
        // exists. An application that installed its own keeps it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let server_version = probe(target, timeouts).await?;
    let fail = |e| connect_error(target, timeouts, e);
    let push = move |info: PushInfo| {
        on_push(info);
        Ok::<(), std::convert::Infallible>(())
    };
    if target.cluster {
        let build = |builder: ClusterClientBuilder| {
            let builder = builder
                .connection_timeout(timeouts.connect)
                .response_timeout(timeouts.response);
            match &target.certs {
                Some(certs) => builder.certs(certs.clone()),
                None => builder,
            }
        };
        let commands = build(ClusterClientBuilder::new(target.nodes.clone()))
            .build()
            .map_err(fail)?
            .get_async_connection()
            .await
            .map_err(fail)?;
        let subscriber = build(ClusterClientBuilder::new(target.nodes.clone()))
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(push)
            .build()
            .map_err(fail)?
            .get_async_connection()
            .await
            .map_err(fail)?;
        Ok(Connected {
            commands: Commands::Cluster(commands),
            subscriber: Subscriber::Cluster(subscriber),
            server_version,
        })
    } else {
        let info = &target.nodes[0];
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeouts.connect))
            .set_response_timeout(Some(timeouts.response));
        let commands = ConnectionManager::new_with_config(
            client(target, info.clone(), timeouts)?,
            config.clone(),
        )
        .await
        .map_err(fail)?;
        let subscriber = ConnectionManager::new_with_config(
            client(
                target,
                with_protocol(info, ProtocolVersion::RESP3),
                timeouts,
            )?,
            config.set_push_sender(push).set_automatic_resubscription(),
        )
        .await
        .map_err(fail)?;
        Ok(Connected {
            commands: Commands::Single(commands),
            subscriber: Subscriber::Single(subscriber),
            server_version,
        })
    }
}

/// One plain connection to the first node: fails fast and clearly on bad credentials (the managed
/// connections retry with backoff) and refuses servers too old for the scripts. Returns the server's
/// version, unless the user may not run `INFO`.
async fn probe(target: &Target, timeouts: Timeouts) -> Result<Option<String>> {
    let fail = |e| connect_error(target, timeouts, e);
    let client = client(target, target.nodes[0].clone(), timeouts)?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeouts.connect))
        .set_response_timeout(Some(timeouts.response));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(fail)?;
    let info: String = match redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
    {
        Ok(info) => info,
        // An ACL user may lack INFO; the scripts will tell if the server is too old.
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm) => return Ok(None),
        Err(e) => return Err(fail(e)),
    };
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(str::trim);
    let known = version.map(str::to_owned);
    let version = version.unwrap_or("0");
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let needed = if target.cluster { 7 } else { 6 };
    if major < needed {
        return Err(Error::Unsupported {
            driver: DRIVER,
            what: format!(
                "Redis {version} at {}: the driver needs Redis 6.0 or later (RESP3 pub/sub), and 7.0 or later for Redis Cluster (sharded pub/sub)",
                Error::redact_url(&target.url)
            ),
        });
    }
    Ok(known)
}

fn is_auth_failure(err: &RedisError) -> bool {
    err.kind() == ErrorKind::AuthenticationFailed
        || matches!(err.code(), Some("WRONGPASS" | "NOAUTH"))
        || {
            let text = err.to_string();
            text.contains("WRONGPASS") || text.contains("NOAUTH")
        }
}

/// Maps an error met while connecting to [`Error::Connect`]: which node, what went wrong, and what
/// to check.
fn connect_error(target: &Target, timeouts: Timeouts, err: RedisError) -> Error {
    let first = &target.nodes[0];
    let node = first.addr().to_string();
    let tls = matches!(first.addr(), redis::ConnectionAddr::TcpTls { .. });
    // The client keeps its I/O errors behind an `Arc<dyn Error>`, out of reach of a downcast, so
    // a TLS failure (rustls, inside an I/O error) is recognised by its words.
    let text = err.to_string();
    let tls_failure = tls
        && ["certificate", "alert", "handshake", "corrupt message"]
            .iter()
            .any(|w| text.contains(w));
    let (reason, hint) = if is_auth_failure(&err) {
        if err.code() == Some("NOAUTH") || text.contains("NOAUTH") {
            (
                "authentication failed: the server requires a password and the URL gives none"
                    .to_owned(),
                "put it in the URL: redis://:PASSWORD@HOST:PORT for requirepass, redis://USER:PASSWORD@HOST:PORT for an ACL user (percent-encoded)",
            )
        } else {
            let who = first.redis_settings().username().map_or_else(
                || "the password (requirepass, or the default user's)".to_owned(),
                |u| format!("user {u:?} with this password"),
            );
            (
                format!("authentication failed: the server refused {who}"),
                "check the user name and password in the URL (redis://USER:PASSWORD@HOST:PORT, or redis://:PASSWORD@HOST:PORT for requirepass; percent-encoded) and the server's ACL",
            )
        }
    } else if err.is_connection_refusal() {
        (
            format!("connection refused: nothing is listening on {node}"),
            "check that Redis is running there and that the URL's host and port are right",
        )
    } else if err.is_timeout() {
        (
            format!("no answer from {node} within {:?}", timeouts.connect),
            if tls {
                "check that Redis is running there, that no firewall drops the connection, and that the server speaks TLS (for one without, use redis://)"
            } else {
                "check that Redis is running there, that no firewall drops the connection, and that the server does not require TLS (for one that does, use rediss://)"
            },
        )
    } else if tls_failure {
        (
            format!("the TLS handshake with {node} failed ({err})"),
            "for a private CA add ?tls_ca=PATH; for a server without TLS use redis://",
        )
    } else if err.is_io_error() && text.contains("lookup address") {
        (
            format!("the host of {node} does not resolve ({err})"),
            "check the host name in the URL",
        )
    } else if err.kind() == ErrorKind::Server(ServerErrorKind::NoPerm) {
        (
            format!("permission denied ({err})"),
            "give the ACL user the commands, keys and channels of its key prefix (see the dlock-redis docs)",
        )
    } else {
        (
            text,
            "check that the URL names a Redis server, 6.0 or later",
        )
    };
    Error::connect(DRIVER, &target.url, reason, hint)
}

/// Maps a client error to [`Error::Backend`], saying plainly when the credentials were refused or the
/// ACL user lacks a permission.
pub(crate) fn backend(err: RedisError) -> Error {
    let message = if is_auth_failure(&err) {
        format!(
            "authentication failed: Redis rejected the username/password given in the URL (redis://USER:PASSWORD@HOST:PORT); check them and the server's ACL ({err})"
        )
    } else if err.kind() == ErrorKind::Server(ServerErrorKind::NoPerm) {
        format!(
            "permission denied: the Redis ACL user may not run a command, key or channel the driver needs (EVALSHA/EVAL/SCRIPT LOAD, PUBLISH or SPUBLISH, SUBSCRIBE or SSUBSCRIBE, on the keys and channels of its key prefix) ({err})"
        )
    } else {
        err.to_string()
    };
    Error::Backend {
        driver: DRIVER,
        message,
        source: Some(Box::new(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_cluster_urls() {
        let t = parse("redis://u:p%40ss@127.0.0.1:7000/2?key_prefix=app").unwrap();
        assert!(!t.cluster);
        assert_eq!(t.nodes.len(), 1);
        assert_eq!(t.key_prefix.as_deref(), Some("app"));
        assert_eq!(t.nodes[0].redis_settings().password(), Some("p@ss"));
        assert_eq!(t.nodes[0].redis_settings().username(), Some("u"));
        assert_eq!(t.nodes[0].redis_settings().db(), 2);

        let t = parse("redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001").unwrap();
        assert!(t.cluster);
        assert_eq!(t.nodes.len(), 2);
        assert!(t
            .nodes
            .iter()
            .all(|n| n.redis_settings().password() == Some("pw")));
    }

    #[test]
    fn rejects_bad_urls_with_reasons_and_no_password() {
        let msg = |u: &str| parse(u).err().expect(u).to_string();
        assert!(msg("redis://a:1,b:2").contains("redis+cluster"));
        assert!(msg("redis://h:1?tls_ca=/x").contains("rediss://"));
        assert!(msg("redis://h:1#insecure").contains("TLS"));
        assert!(msg("rediss://h:1#nope").contains("#insecure"));
        assert!(msg("redis+cluster://h:1/3").contains("database 0"));
        assert!(msg("redis://u:s3cret@h:63799x").contains("invalid port \"63799x\""));
        assert!(msg("redis://h:0").contains("invalid port \"0\""));
        assert!(msg("redis://[::1:1").contains("unclosed"));
        assert!(msg("redis://h:1/x").contains("invalid database \"x\""));
        assert!(msg("redis://h:1?protocol=resp9").contains("use resp2 or resp3"));
        let m = msg("redis://h:1?colour=red");
        assert!(m.contains("unknown query parameter \"colour\""), "{m}");
        assert!(m.contains("key_prefix"), "{m}");
        assert!(parse("redis://h:1/0?protocol=resp3").is_ok());
        assert!(parse("redis://[::1]:6379").is_ok());
        let m = msg("rediss://u:topsecret@h:1?tls_ca=/does/not/exist");
        assert!(m.contains("cannot read"), "{m}");
        assert!(!m.contains("topsecret"), "{m}");
    }
}
