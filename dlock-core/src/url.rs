//! What every driver's URL parser shares: one `HOST[:PORT]` of a host list, checked so that a typo
//! gets a reason a client library's own parser does not give.

use crate::{Error, Result};

/// One server address of a lock store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// The host as written: a name, an IPv4 address, or an IPv6 address in brackets (`[::1]`).
    pub host: String,
    /// The port written, or the store's default.
    pub port: u16,
}

impl HostPort {
    /// Parses `hostport` (one entry of `url`'s host list) for a store `service` that listens on
    /// `default_port` when none is written. Errors are [`Error::InvalidUrl`] for `url`, redacted.
    ///
    /// ```
    /// use dlock_core::url::HostPort;
    /// let url = "redis://[::1]:7000";
    /// let addr = HostPort::parse(url, "[::1]:7000", 6379, "Redis").unwrap();
    /// assert_eq!((addr.host.as_str(), addr.port), ("[::1]", 7000));
    /// assert_eq!(HostPort::parse(url, "db", 6379, "Redis").unwrap().port, 6379);
    /// let err = HostPort::parse(url, "db:63799x", 6379, "Redis").unwrap_err();
    /// assert!(err.to_string().contains("invalid port \"63799x\""), "{err}");
    /// ```
    pub fn parse(url: &str, hostport: &str, default_port: u16, service: &str) -> Result<Self> {
        let invalid = |reason: String| Error::invalid_url(url, reason);
        let (host, port) = match hostport.strip_prefix('[') {
            Some(v6) => {
                let (addr, after) = v6
                    .split_once(']')
                    .ok_or_else(|| invalid(format!("unclosed '[' in host {hostport:?}")))?;
                let port = match after {
                    "" => None,
                    p => Some(p.strip_prefix(':').ok_or_else(|| {
                        invalid(format!("expected ':PORT' after ']' in {hostport:?}"))
                    })?),
                };
                (format!("[{addr}]"), port)
            }
            None => match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (hostport.to_owned(), None),
            },
        };
        if host.is_empty() || host == "[]" {
            return Err(invalid(format!("no host name in {hostport:?}")));
        }
        if !host.starts_with('[') && host.contains(':') {
            return Err(invalid(format!(
                "invalid host name {host:?} in {hostport:?}; an IPv6 address goes in brackets, as in [::1]:{default_port}"
            )));
        }
        let inner = host.trim_start_matches('[').trim_end_matches(']');
        if inner.chars().any(|c| {
            c.is_whitespace() || matches!(c, '/' | '@' | '%' | '?' | '#' | '[' | ']' | ',')
        }) {
            return Err(invalid(format!(
                "invalid host name {host:?} in {hostport:?}"
            )));
        }
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(invalid(format!(
                        "invalid port {p:?} in {hostport:?}; ports are 1 to 65535 \
                         ({service} listens on {default_port} by default)"
                    )))
                }
            },
        };
        Ok(HostPort { host, port })
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::HostPort;

    fn reason(hostport: &str) -> String {
        HostPort::parse("x://h", hostport, 1, "X")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn hosts_and_ports_are_checked() {
        let ok = |s| HostPort::parse("x://h", s, 4222, "X").unwrap().to_string();
        assert_eq!(ok("example.org"), "example.org:4222");
        assert_eq!(ok("10.0.0.1:5"), "10.0.0.1:5");
        assert_eq!(ok("[::1]"), "[::1]:4222");
        assert_eq!(ok("[fe80::1]:65535"), "[fe80::1]:65535");
        assert!(reason("h:0").contains("invalid port \"0\""));
        assert!(reason("h:65536").contains("invalid port \"65536\""));
        assert!(reason("h:").contains("invalid port \"\""));
        assert!(reason("[::1").contains("unclosed '['"));
        assert!(reason("[::1]7").contains("expected ':PORT'"));
        assert!(reason(":80").contains("no host name"));
        assert!(reason("[]:80").contains("no host name"));
        assert!(reason("a b:80").contains("invalid host name"));
        assert!(reason("a/b").contains("invalid host name"));
        assert!(reason("::1").contains("in brackets"));
    }
}
