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
        /// The URL as given (credentials removed).
        url: String,
        /// What is wrong with it.
        reason: String,
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
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Backend { .. })
    }
}

/// `Result` with dlock's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
