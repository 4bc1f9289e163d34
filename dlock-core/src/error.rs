//! The one error type of dlock.

use std::time::Duration;

use crate::LockMode;

/// Any error a dlock operation can return. Each message says what went wrong and what to do about it.
///
/// ```
/// use dlock_core::Error;
/// let err = Error::WouldBlock { name: "stock/42".into() };
/// assert!(err.to_string().contains("stock/42"));
/// assert!(err.is_would_block());
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A blocking acquire or conversion did not get the lock before its timeout.
    #[error(
        "timed out after {waited:?} waiting for lock {name:?}; retry later or raise the timeout"
    )]
    Timeout {
        /// The lock name.
        name: String,
        /// How long the caller waited.
        waited: Duration,
    },

    /// `try_acquire` found the lock held in an incompatible mode (or queued behind an incompatible waiter).
    #[error(
        "lock {name:?} is held in an incompatible mode; use a blocking acquire to wait in line"
    )]
    WouldBlock {
        /// The lock name.
        name: String,
    },

    /// The lease behind a lock ran out, or its entry vanished from the store: the lock is no longer held.
    #[error("lock {name:?} was lost: its lease could not be renewed in time; stop using the resource it protects and acquire again")]
    Lost {
        /// The lock name.
        name: String,
    },

    /// The lock name breaks the name rules.
    #[error("invalid lock name {name:?}: {reason}")]
    InvalidName {
        /// The name as given (shortened to its first 64 characters when it is longer).
        name: String,
        /// Which rule it breaks.
        reason: String,
    },

    /// The lease TTL is unusable.
    #[error("invalid lease ttl {ttl:?}: {reason}")]
    InvalidTtl {
        /// The TTL as given.
        ttl: Duration,
        /// Which rule it breaks.
        reason: String,
    },

    /// A mode string names no lock mode.
    #[error("unknown lock mode {given:?}; use one of NL, CR, CW, PR, PW, EX (or null, concurrent-read, concurrent-write, protected-read, protected-write, exclusive)")]
    InvalidMode {
        /// The string as given.
        given: String,
    },

    /// A connection URL could not be used.
    #[error("invalid lock store url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given, with passwords and tokens replaced by `***` (see [`Error::redact_url`]).
        url: String,
        /// What is wrong with it, and how to write it instead.
        reason: String,
    },

    /// Connecting to the store failed: it could not be reached, refused the credentials, or cannot
    /// serve as a lock store. Only `connect` returns this; a store lost later fails with
    /// [`Error::Backend`].
    ///
    /// The message is complete on its own: `reason` already carries what the store's client said,
    /// so this error has no [`source`](std::error::Error::source) that would print it a second time
    /// in a chain of causes.
    #[error("cannot connect to {url}: {reason}; {hint}")]
    Connect {
        /// The driver's name.
        driver: &'static str,
        /// The URL as given, with passwords and tokens replaced by `***` (see [`Error::redact_url`]).
        url: String,
        /// What went wrong.
        reason: String,
        /// What to do about it.
        hint: String,
    },

    /// The driver does not support the requested feature.
    #[error("unsupported by the {driver} driver: {what}")]
    Unsupported {
        /// The driver's name.
        driver: &'static str,
        /// What is unsupported.
        what: String,
    },

    /// Two up-conversions on one name would wait on each other forever; this one was refused.
    #[error("converting lock {name:?} from {from} to {to} would deadlock with another holder's pending conversion; release or convert down, then retry")]
    ConversionDeadlock {
        /// The lock name.
        name: String,
        /// The mode held.
        from: LockMode,
        /// The mode requested.
        to: LockMode,
    },

    /// A session refused a request that could deadlock: the lock asked for does not rank above every
    /// lock the session holds or is taking. Nothing was queued.
    #[error("lock {requested:?} (rank {requested_rank}) was asked for while this session holds {held:?} (rank {held_rank}); a session takes locks in rising rank only: release {held:?} first, or take both at once with lock_all")]
    OrderViolation {
        /// The lock asked for.
        requested: String,
        /// Its rank in the session's order.
        requested_rank: String,
        /// The held lock of the highest rank.
        held: String,
        /// Its rank.
        held_rank: String,
    },

    /// The store failed or could not be reached.
    #[error("lock store error ({driver}): {message}")]
    Backend {
        /// The driver's name.
        driver: &'static str,
        /// What failed, in the store's words.
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
}

impl Error {
    /// An [`Error::InvalidUrl`] for `url`, which is redacted here (see [`Error::redact_url`]).
    pub fn invalid_url(url: &str, reason: impl Into<String>) -> Self {
        Error::InvalidUrl {
            url: Error::redact_url(url),
            reason: reason.into(),
        }
    }

    /// An [`Error::Connect`] for `url`, which is redacted here (see [`Error::redact_url`]).
    pub fn connect(
        driver: &'static str,
        url: &str,
        reason: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Error::Connect {
            driver,
            url: Error::redact_url(url),
            reason: reason.into(),
            hint: hint.into(),
        }
    }

    /// `url` as errors show it: the user name stays, a password or a lone token (`nats://TOKEN@…`)
    /// becomes `***`. Each member of a `quorum:URL;URL;…` is redacted on its own; redacting twice
    /// changes nothing.
    ///
    /// ```
    /// use dlock_core::Error;
    /// assert_eq!(
    ///     Error::redact_url("redis://app:s3cret@10.0.0.1:6379/2"),
    ///     "redis://app:***@10.0.0.1:6379/2"
    /// );
    /// assert_eq!(Error::redact_url("nats://s3cret@10.0.0.1:4222"), "nats://***@10.0.0.1:4222");
    /// assert_eq!(
    ///     Error::redact_url("quorum:etcd://a:pw@h1;redis://h2;redis://:pw@h3"),
    ///     "quorum:etcd://a:***@h1;redis://h2;redis://:***@h3"
    /// );
    /// ```
    pub fn redact_url(url: &str) -> String {
        match url.strip_prefix("quorum:") {
            Some(members) => {
                let members: Vec<String> = members.split(';').map(redact_one).collect();
                format!("quorum:{}", members.join(";"))
            }
            None => redact_one(url),
        }
    }

    /// A [`Error::Backend`] wrapping a store client's error.
    pub fn backend(
        driver: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Backend {
            driver,
            message: source.to_string(),
            source: Some(Box::new(source)),
        }
    }

    /// A [`Error::Backend`] with a message only.
    pub fn backend_msg(driver: &'static str, message: impl Into<String>) -> Self {
        Error::Backend {
            driver,
            message: message.into(),
            source: None,
        }
    }

    /// Whether this is [`Error::WouldBlock`].
    pub fn is_would_block(&self) -> bool {
        matches!(self, Error::WouldBlock { .. })
    }

    /// Whether this is [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// Whether this is [`Error::Lost`].
    pub fn is_lost(&self) -> bool {
        matches!(self, Error::Lost { .. })
    }

    /// Whether retrying the same call later may succeed (store trouble rather than a definite answer).
    ///
    /// [`Error::Connect`] is not counted: a store that is down may come up, but refused credentials
    /// or a TLS mismatch stay; its reason says which.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Backend { .. })
    }
}

/// Redacts one store URL. The credentials end at the last `@` before the query or fragment, so a
/// password with an unencoded `/` or `@` is hidden whole rather than shown in part; a `@` inside a
/// query value (a file path) is not taken for the end of credentials.
fn redact_one(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let head_end = rest.find(['?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..head_end].rfind('@') else {
        return url.to_owned();
    };
    let shown = match rest[..at].split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    let tail = &rest[at..];
    match scheme {
        Some(scheme) => format!("{scheme}://{shown}{tail}"),
        None => format!("{shown}{tail}"),
    }
}

/// `Result` with dlock's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_every_secret_and_keeps_the_rest() {
        for (url, shown) in [
            ("redis://h:1?x=@", "redis://h:1?x=@"),
            ("redis://u@h:1", "redis://***@h:1"),
            ("redis://u:pa/ss@h:1/0", "redis://u:***@h:1/0"),
            ("redis://u:p@ss@h:1", "redis://u:***@h:1"),
            (
                "nats://h:1?creds=/home/me@corp/a.creds",
                "nats://h:1?creds=/home/me@corp/a.creds",
            ),
            ("u:s3cret@h:1", "u:***@h:1"),
            ("etcd://h1,h2", "etcd://h1,h2"),
            ("mem://", "mem://"),
            ("quorum:mem://a;;nats://t@h", "quorum:mem://a;;nats://***@h"),
        ] {
            assert_eq!(Error::redact_url(url), shown, "{url}");
            assert_eq!(Error::redact_url(shown), shown, "twice: {url}");
        }
    }

    #[test]
    fn connect_errors_are_one_line_without_a_source() {
        let err = Error::connect(
            "redis",
            "redis://app:s3cret@h:1",
            "connection refused",
            "start it",
        );
        assert_eq!(
            err.to_string(),
            "cannot connect to redis://app:***@h:1: connection refused; start it"
        );
        assert!(std::error::Error::source(&err).is_none());
        assert!(!err.is_transient());
    }
}
