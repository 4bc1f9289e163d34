//! The connection URL: parsing, validation and what it turns into.

use std::time::Duration;

use dlock_core::url::HostPort;
use dlock_core::{Error, Result};
use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

/// The port etcd serves clients on unless told otherwise.
const DEFAULT_PORT: u16 = 2379;
/// The key prefix unless `prefix=` says otherwise.
pub(crate) const DEFAULT_PREFIX: &str = "dlock";
/// How long one request to one member may take before the driver tries the next member. Generous:
/// a leader election stalls writes for about a second, and a loaded machine adds fsync delays.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

const PARAMS: &str =
    "tls_ca, tls_cert, tls_key, tls_domain, prefix, timeout_ms, connect_timeout_ms";

/// Everything a URL says.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// `http://host:port` or `https://host:port`, one per member, in the URL's order.
    pub endpoints: Vec<String>,
    pub user: Option<(String, String)>,
    pub tls: Option<TlsFiles>,
    pub prefix: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// The URL with the password replaced, for messages.
    pub redacted: String,
}

/// File paths from the query; read at connect time.
#[derive(Clone, Debug, Default)]
pub(crate) struct TlsFiles {
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub domain: Option<String>,
}

fn invalid(url: &str, reason: impl Into<String>) -> Error {
    Error::invalid_url(url, reason)
}

/// Decodes `%XX` escapes; `None` on a malformed escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn parse_host(url: &str, hostport: &str) -> Result<(String, u16)> {
    if hostport.is_empty() {
        return Err(invalid(
            url,
            "an empty host in the host list (write etcd://HOST:PORT,HOST:PORT)",
        ));
    }
    let addr = HostPort::parse(url, hostport, DEFAULT_PORT, "etcd")?;
    Ok((addr.host, addr.port))
}

fn millis(url: &str, name: &str, value: &str) -> Result<Duration> {
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(invalid(
            url,
            format!("{name} must be a whole number of milliseconds above zero, got {value:?}"),
        )),
    }
}

impl Config {
    /// Parses `etcd://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]…][/][?PARAM=VALUE&…]` (or `etcds://`).
    pub fn parse(url: &str) -> Result<Self> {
        let redacted = Error::redact_url(url);
        let shown = redacted.as_str();
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid(shown, "expected etcd://HOST:PORT or etcds://HOST:PORT"))?;
        let tls = match scheme {
            "etcd" => false,
            "etcds" => true,
            other => {
                return Err(invalid(
                    shown,
                    format!("the etcd driver takes etcd:// or etcds:// URLs, not {other}://"),
                ))
            }
        };
        if rest.contains('#') {
            return Err(invalid(shown, "a fragment ('#…') has no meaning here"));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let authority = match before_query.split_once('/') {
            Some((a, "")) => a,
            Some((_, path)) => {
                return Err(invalid(
                    shown,
                    format!("unexpected path /{path:?}; use ?prefix=NAME to choose the key prefix"),
                ))
            }
            None => before_query,
        };
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let user = match userinfo {
            None => None,
            Some(info) => {
                let (name, password) = info.split_once(':').ok_or_else(|| {
                    invalid(
                        shown,
                        "credentials need both parts: etcd://USER:PASSWORD@HOST (percent-encode ':' and '@' in them)",
                    )
                })?;
                let name = percent_decode(name)
                    .ok_or_else(|| invalid(shown, "the user name has a malformed %-escape"))?;
                let password = percent_decode(password)
                    .ok_or_else(|| invalid(shown, "the password has a malformed %-escape"))?;
                if name.is_empty() {
                    return Err(invalid(shown, "the user name is empty"));
                }
                Some((name, password))
            }
        };
        if hosts.is_empty() {
            return Err(invalid(
                shown,
                "no host given; write etcd://HOST:PORT[,HOST:PORT…]",
            ));
        }
        let http = if tls { "https" } else { "http" };
        let mut endpoints = Vec::new();
        for hostport in hosts.split(',') {
            let (host, port) = parse_host(shown, hostport)?;
            let endpoint = format!("{http}://{host}:{port}");
            if endpoints.contains(&endpoint) {
                return Err(invalid(shown, format!("{host}:{port} is listed twice")));
            }
            endpoints.push(endpoint);
        }

        let mut files = TlsFiles::default();
        let mut prefix = DEFAULT_PREFIX.to_owned();
        let mut timeout = DEFAULT_TIMEOUT;
        let mut connect_timeout = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').ok_or_else(|| {
                invalid(shown, format!("query parameter {pair:?} has no '=VALUE'"))
            })?;
            let value = percent_decode(value).ok_or_else(|| {
                invalid(
                    shown,
                    format!("the value of {name} has a malformed %-escape"),
                )
            })?;
            if value.is_empty() {
                return Err(invalid(shown, format!("query parameter {name} is empty")));
            }
            let slot = match name {
                "tls_ca" => &mut files.ca,
                "tls_cert" => &mut files.cert,
                "tls_key" => &mut files.key,
                "tls_domain" => &mut files.domain,
                "prefix" => {
                    if value.ends_with('/')
                        || value
                            .chars()
                            .any(|c| c.is_whitespace() || c.is_control() || !c.is_ascii())
                    {
                        return Err(invalid(
                            shown,
                            format!("prefix {value:?} must be printable ASCII without spaces and must not end with '/'"),
                        ));
                    }
                    prefix = value;
                    continue;
                }
                "timeout_ms" => {
                    timeout = millis(shown, name, &value)?;
                    continue;
                }
                "connect_timeout_ms" => {
                    connect_timeout = Some(millis(shown, name, &value)?);
                    continue;
                }
                other => {
                    return Err(invalid(
                        shown,
                        format!("unknown query parameter {other:?}; known: {PARAMS}"),
                    ))
                }
            };
            *slot = Some(value);
        }
        let any_tls_param = files.ca.is_some()
            || files.cert.is_some()
            || files.key.is_some()
            || files.domain.is_some();
        if !tls && any_tls_param {
            return Err(invalid(
                shown,
                "tls_* parameters need the etcds:// scheme (etcd:// is plain TCP)",
            ));
        }
        if files.cert.is_some() != files.key.is_some() {
            return Err(invalid(
                shown,
                "a client certificate needs both tls_cert and tls_key",
            ));
        }
        Ok(Config {
            endpoints,
            user,
            tls: tls.then_some(files),
            prefix,
            timeout,
            connect_timeout: connect_timeout.unwrap_or(timeout),
            redacted,
        })
    }

    /// The options every member's client is built with. Reads the TLS files.
    pub fn connect_options(&self) -> Result<ConnectOptions> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            // etcd refuses HTTP/2 pings more often than every 5 s (`--grpc-keepalive-min-time`) and
            // pings on idle connections altogether, so ping only under open streams (watches), and
            // slowly: this only serves to notice a frozen member under a watch.
            .with_keep_alive(Duration::from_secs(6), Duration::from_secs(4))
            .with_keep_alive_while_idle(false)
            // A member cut off from the quorum then refuses requests instead of serving stale
            // watches, so the driver moves on to another member.
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        if let Some((user, password)) = &self.user {
            options = options.with_user(user.clone(), password.clone());
        }
        if let Some(files) = &self.tls {
            let read = |what: &str, path: &str| {
                std::fs::read(path).map_err(|e| {
                    invalid(
                        &self.redacted,
                        format!("cannot read the {what} file {path:?}: {e}"),
                    )
                })
            };
            let mut tls = TlsOptions::new();
            tls = match &files.ca {
                Some(path) => tls.ca_certificate(Certificate::from_pem(read("tls_ca", path)?)),
                None => tls.with_native_roots(),
            };
            if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
                tls = tls.identity(Identity::from_pem(
                    read("tls_cert", cert)?,
                    read("tls_key", key)?,
                ));
            }
            if let Some(domain) = &files.domain {
                tls = tls.domain_name(domain.clone());
            }
            options = options.with_tls(tls);
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(url: &str) -> String {
        match Config::parse(url) {
            Err(Error::InvalidUrl { reason, url: shown }) => {
                assert!(!shown.contains("s3cret"), "password leaked: {shown}");
                reason
            }
            other => panic!("{url}: expected InvalidUrl, got {other:?}"),
        }
    }

    #[test]
    fn full_url_parses() {
        let c = Config::parse(
            "etcds://alice:p%40ss@a:1,b,[::1]:3/?tls_ca=/ca.pem&tls_cert=/c&tls_key=/k&tls_domain=etcd.local&prefix=app/locks&timeout_ms=500",
        )
        .unwrap();
        assert_eq!(
            c.endpoints,
            ["https://a:1", "https://b:2379", "https://[::1]:3"]
        );
        assert_eq!(c.user, Some(("alice".into(), "p@ss".into())));
        let tls = c.tls.unwrap();
        assert_eq!(tls.ca.as_deref(), Some("/ca.pem"));
        assert_eq!(tls.domain.as_deref(), Some("etcd.local"));
        assert_eq!(c.prefix, "app/locks");
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert!(!c.redacted.contains("p%40ss"));
    }

    #[test]
    fn plain_url_defaults() {
        let c = Config::parse("etcd://127.0.0.1:2379,127.0.0.1:22379").unwrap();
        assert_eq!(
            c.endpoints,
            ["http://127.0.0.1:2379", "http://127.0.0.1:22379"]
        );
        assert!(c.user.is_none() && c.tls.is_none());
        assert_eq!(c.prefix, DEFAULT_PREFIX);
    }

    #[test]
    fn bad_urls_name_the_problem() {
        assert!(reason("etcd://").contains("no host"));
        assert!(reason("etcd://a:1,,b:2").contains("empty host"));
        assert!(reason("etcd://a:99999").contains("invalid port"));
        assert!(reason("etcd://a:x").contains("invalid port"));
        assert!(reason("etcd://a:0").contains("invalid port"));
        assert!(reason("etcd://a:1/locks").contains("unexpected path"));
        assert!(reason("etcd://a:1?tls_ca=/x").contains("etcds://"));
        assert!(reason("etcds://a:1?tls_cert=/x").contains("both tls_cert and tls_key"));
        assert!(reason("etcd://a:1?colour=red").contains("unknown query parameter"));
        assert!(reason("etcd://a:1?timeout_ms=soon").contains("timeout_ms"));
        assert!(reason("etcd://alice@a:1").contains("USER:PASSWORD"));
        assert!(reason("etcd://:s3cret@a:1").contains("user name is empty"));
        assert!(reason("etcd://a:1,a:1").contains("listed twice"));
        assert!(reason("etcd://a:1?prefix=x/").contains("prefix"));
        assert!(reason("redis://a:1").contains("etcd://"));
        assert!(reason("etcd://[::1:1").contains("unclosed"));
        assert!(reason("etcd://a:1#frag").contains("fragment"));
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert!(reason("etcd://bob:s3cret@a:1?x=1").contains("unknown"));
        assert!(reason("etcd://s3cret@a:1").contains("USER:PASSWORD"));
        let c = Config::parse("etcd://bob:s3cret@h:1").unwrap();
        assert_eq!(c.redacted, "etcd://bob:***@h:1");
    }
}
