//! Connection URLs: `nats://` and `tls://`, parsed into connection and stream settings.

use std::path::PathBuf;
use std::time::Duration;

use dlock_core::url::HostPort;
use dlock_core::{Error, Result};
use percent_encoding::percent_decode_str;

/// How leases are kept; see the crate docs, [Leases](crate#leases).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaseMode {
    /// NATS 2.11+: every entry message carries a `Nats-TTL`; the server removes it when it runs out and
    /// leaves a subject delete marker that wakes the waiters.
    ServerTtl,
    /// NATS 2.9/2.10: entries carry their TTL in the payload, and clients judge expiry by the stream's own
    /// timestamps (the server's clock), never by their local clocks.
    ClientClock,
}

impl LeaseMode {
    /// `"ttl"` or `"clock"`, as in the `lease=` URL parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseMode::ServerTtl => "ttl",
            LeaseMode::ClientClock => "clock",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Auth {
    None,
    UserPassword(String, String),
    Token(String),
    Creds(PathBuf),
}

/// Everything a `nats://` URL says.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// `host:port` of each seed server.
    pub servers: Vec<String>,
    pub tls: bool,
    pub ca: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub auth: Auth,
    pub stream: String,
    pub prefix: String,
    /// `None`: keep whatever an existing stream has, create with 1.
    pub replicas: Option<usize>,
    /// `None`: pick by server version (and by what an existing stream has).
    pub lease: Option<LeaseMode>,
    pub clock_skew: Duration,
    pub timeout: Duration,
    pub recheck: Duration,
    pub discover: bool,
    /// The URL with credentials removed, for errors and logs.
    pub redacted: String,
}

const DEFAULT_PORT: u16 = 4222;

fn invalid(url: &str, reason: impl Into<String>) -> Error {
    Error::invalid_url(url, reason)
}

fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn millis(url: &str, key: &str, value: &str) -> Result<Duration> {
    value
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| {
            invalid(
                url,
                format!("{key}={value:?} is not a number; write a whole number of milliseconds"),
            )
        })
}

fn boolean(url: &str, key: &str, value: &str) -> Result<bool> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(invalid(url, format!("{key}={value:?}: use true or false"))),
    }
}

/// A stream name: what JetStream accepts in API subjects.
fn valid_stream(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A subject prefix: one or more plain tokens.
fn valid_prefix(prefix: &str) -> bool {
    prefix.len() <= 64
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl Settings {
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid(url, "expected nats://HOST:PORT or tls://HOST:PORT"))?;
        let tls_scheme = match scheme {
            "nats" => false,
            "tls" => true,
            other => {
                return Err(invalid(
                    url,
                    format!("scheme {other:?} is not for NATS; use nats:// or tls://"),
                ))
            }
        };
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = before_query.trim_end_matches('/');
        if authority.contains('/') {
            return Err(invalid(
                url,
                "a NATS URL has no path; put options in ?key=value",
            ));
        }
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let auth = match userinfo {
            None => Auth::None,
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => Auth::UserPassword(decode(user), decode(pass)),
                None if !u.is_empty() => Auth::Token(decode(u)),
                None => return Err(invalid(url, "empty credentials before '@'")),
            },
        };
        let mut servers = Vec::new();
        for host in hosts.split(',') {
            let host = host.trim();
            if host.is_empty() {
                return Err(invalid(url, "an empty server address in the host list"));
            }
            servers.push(HostPort::parse(url, host, DEFAULT_PORT, "NATS")?.to_string());
        }
        let mut settings = Settings {
            servers,
            tls: tls_scheme,
            ca: None,
            client_cert: None,
            auth,
            stream: "DLOCK".into(),
            prefix: "dlock".into(),
            replicas: None,
            lease: None,
            clock_skew: Duration::from_millis(250),
            timeout: Duration::from_secs(5),
            recheck: Duration::from_secs(5),
            discover: true,
            redacted: Error::redact_url(url),
        };
        let mut cert = None;
        let mut key = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v);
            match k {
                "stream" => {
                    if !valid_stream(&v) {
                        return Err(invalid(
                            url,
                            format!("stream={v:?}: use up to 64 ASCII letters, digits, '-' or '_'"),
                        ));
                    }
                    settings.stream = v;
                }
                "prefix" => {
                    if !valid_prefix(&v) {
                        return Err(invalid(
                            url,
                            format!("prefix={v:?}: use dot-separated tokens of ASCII letters, digits, '-' or '_'"),
                        ));
                    }
                    settings.prefix = v;
                }
                "replicas" => {
                    let n: usize = v.parse().map_err(|_| {
                        invalid(url, format!("replicas={v:?} is not a number; use 1 to 5"))
                    })?;
                    if !(1..=5).contains(&n) {
                        return Err(invalid(url, format!("replicas={n}: JetStream allows 1 to 5")));
                    }
                    settings.replicas = Some(n);
                }
                "lease" => {
                    settings.lease = match v.as_str() {
                        "auto" => None,
                        "ttl" => Some(LeaseMode::ServerTtl),
                        "clock" => Some(LeaseMode::ClientClock),
                        _ => {
                            return Err(invalid(
                                url,
                                format!("lease={v:?}: use auto, ttl (NATS 2.11+) or clock"),
                            ))
                        }
                    }
                }
                "clock_skew_ms" => settings.clock_skew = millis(url, k, &v)?,
                "timeout_ms" => {
                    settings.timeout = millis(url, k, &v)?;
                    if settings.timeout.is_zero() {
                        return Err(invalid(url, "timeout_ms must be above 0"));
                    }
                }
                "recheck_ms" => {
                    settings.recheck = millis(url, k, &v)?;
                    if settings.recheck < Duration::from_millis(10) {
                        return Err(invalid(url, "recheck_ms must be at least 10"));
                    }
                }
                "discover" => settings.discover = boolean(url, k, &v)?,
                "tls" => settings.tls |= boolean(url, k, &v)?,
                "ca" => {
                    settings.ca = Some(PathBuf::from(v));
                    settings.tls = true;
                }
                "cert" => cert = Some(PathBuf::from(v)),
                "key" => key = Some(PathBuf::from(v)),
                "creds" => {
                    if settings.auth != Auth::None {
                        return Err(invalid(
                            url,
                            "creds= and credentials before '@' exclude each other",
                        ));
                    }
                    settings.auth = Auth::Creds(PathBuf::from(v));
                }
                other => {
                    return Err(invalid(
                        url,
                        format!(
                            "unknown parameter {other:?}; known: stream, prefix, replicas, lease, clock_skew_ms, \
                             timeout_ms, recheck_ms, discover, tls, ca, cert, key, creds"
                        ),
                    ))
                }
            }
        }
        match (cert, key) {
            (Some(c), Some(k)) => {
                settings.client_cert = Some((c, k));
                settings.tls = true;
            }
            (None, None) => {}
            _ => return Err(invalid(url, "cert= and key= go together")),
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_auth_and_options() {
        let s = Settings::parse(
            "nats://u%40x:p%3Aw@127.0.0.1:4333,127.0.0.1?replicas=3&stream=LOCKS&lease=clock&discover=false",
        )
        .unwrap();
        assert_eq!(s.servers, ["127.0.0.1:4333", "127.0.0.1:4222"]);
        assert_eq!(s.auth, Auth::UserPassword("u@x".into(), "p:w".into()));
        assert_eq!(s.replicas, Some(3));
        assert_eq!(s.stream, "LOCKS");
        assert_eq!(s.lease, Some(LeaseMode::ClientClock));
        assert!(!s.discover && !s.tls);
        assert_eq!(
            s.redacted,
            "nats://u%40x:***@127.0.0.1:4333,127.0.0.1?replicas=3&stream=LOCKS&lease=clock&discover=false"
        );

        let s = Settings::parse("tls://s3cret@localhost:4443?ca=/tmp/ca.pem").unwrap();
        assert!(s.tls);
        assert_eq!(s.auth, Auth::Token("s3cret".into()));
        assert_eq!(s.ca, Some(PathBuf::from("/tmp/ca.pem")));
        assert!(!s.redacted.contains("s3cret"));

        let s = Settings::parse("nats://h:1?creds=/etc/nats/app.creds").unwrap();
        assert_eq!(s.auth, Auth::Creds("/etc/nats/app.creds".into()));
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, says) in [
            ("redis://h", "not for NATS"),
            ("nats://h?replicas=7", "1 to 5"),
            ("nats://h?lease=forever", "lease="),
            ("nats://h?stream=a.b", "stream="),
            ("nats://h?colour=blue", "unknown parameter \"colour\""),
            ("nats://h?cert=/c", "go together"),
            ("nats://h/path", "no path"),
            ("nats://h:42x", "invalid port \"42x\""),
            ("nats://h:0", "invalid port \"0\""),
            ("nats://[::1]:x", "invalid port \"x\""),
        ] {
            let msg = Settings::parse(url).unwrap_err().to_string();
            assert!(msg.contains(says), "{url}: {msg}");
        }
        for url in [
            "natsx://app:s3cret@h",
            "nats://app:s3cret@h?replicas=x",
            "nats://s3cret@h:1?colour=blue",
        ] {
            let msg = Settings::parse(url).unwrap_err().to_string();
            assert!(!msg.contains("s3cret"), "the secret leaked: {msg}");
        }
    }
}
