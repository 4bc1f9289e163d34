//! Order-enforcing sessions: every lock name has a rank, and a session only ever goes up.
//!
//! Two jobs that take the same two locks in opposite orders can deadlock: job 1 holds `account/a`
//! and waits for `account/b`, job 2 holds `account/b` and waits for `account/a`, forever. A session
//! makes that impossible by design: it refuses, at once and with [`Error::OrderViolation`], any
//! request for a lock that does not rank above every lock it holds (or is taking), before anything
//! is queued. If every job goes up the same ranking, no job can wait for one that waits for it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::{acquire, LockRequest};
use crate::{Error, Guard, LockMode, LockName, Locks, Result};

/// How a session ranks lock names. Ranks are unique: two names never share one.
///
/// ```
/// use dlock_core::LockOrder;
/// // By name: "account/a" < "account/b" < "ledger".
/// let by_name = LockOrder::by_name();
/// // Explicit: the ledger first, whatever its name.
/// let explicit = LockOrder::explicit([("ledger", 1), ("account/a", 2), ("account/b", 3)]).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct LockOrder(Order);

#[derive(Clone, Debug)]
enum Order {
    ByName,
    Explicit(Arc<HashMap<LockName, u64>>),
}

impl LockOrder {
    /// Names rank in their byte order, the canonical order of [`Locks::lock_all`].
    pub fn by_name() -> Self {
        LockOrder(Order::ByName)
    }

    /// Each listed name has the given rank; a name not listed cannot be taken in the session.
    /// Fails on an invalid name, or on two names with one rank.
    pub fn explicit<I, S>(ranks: I) -> Result<Self>
    where
        I: IntoIterator<Item = (S, u64)>,
        S: Into<String>,
    {
        let mut by_name = HashMap::new();
        let mut by_rank: HashMap<u64, LockName> = HashMap::new();
        for (name, rank) in ranks {
            let name = LockName::new(name.into())?;
            if let Some(other) = by_rank.get(&rank).filter(|other| **other != name) {
                return Err(Error::InvalidName {
                    name: name.to_string(),
                    reason: format!(
                        "it has rank {rank}, which {other:?} has already; ranks must be unique"
                    ),
                });
            }
            by_rank.insert(rank, name.clone());
            by_name.insert(name, rank);
        }
        Ok(LockOrder(Order::Explicit(Arc::new(by_name))))
    }

    fn rank(&self, name: &LockName) -> Result<Rank> {
        match &self.0 {
            Order::ByName => Ok(Rank::Name(name.clone())),
            Order::Explicit(ranks) => {
                ranks
                    .get(name)
                    .map(|&r| Rank::Explicit(r))
                    .ok_or_else(|| {
                        Error::InvalidName {
                    name: name.to_string(),
                    reason:
                        "it has no rank in this session's LockOrder; list it in LockOrder::explicit"
                            .into(),
                }
                    })
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    Explicit(u64),
    Name(LockName),
}

impl fmt::Display for Rank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rank::Explicit(rank) => write!(f, "{rank}"),
            Rank::Name(name) => write!(f, "{:?} by name", name.as_str()),
        }
    }
}

type Held = Arc<Mutex<BTreeMap<Rank, LockName>>>;

/// A job's view of the locks: it takes locks in rising rank only, so jobs that share a
/// [`LockOrder`] cannot deadlock. Made by [`Locks::session`]; cheap to clone (clones share what the
/// session holds).
///
/// ```
/// use dlock_core::{Error, LockOrder, Locks, MemoryDriver};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> dlock_core::Result<()> {
/// let locks = Locks::new(MemoryDriver::new());
/// let job = locks.session(LockOrder::by_name());
/// let b = job.lock("account/b").await?;
/// // Going down while holding "account/b" could deadlock with a job going up: refused at once.
/// let err = job.lock("account/a").await.unwrap_err();
/// assert!(matches!(err, Error::OrderViolation { .. }));
/// drop(b);
/// let a = job.lock("account/a").await?;
/// let b = job.lock("account/b").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Session {
    locks: Locks,
    order: LockOrder,
    held: Held,
}

impl Locks {
    /// A session that takes locks in the rising `order` only (see [`Session`]).
    pub fn session(&self, order: LockOrder) -> Session {
        Session {
            locks: self.clone(),
            order,
            held: Held::default(),
        }
    }
}

impl Session {
    /// A request for the lock `name`, refused with [`Error::OrderViolation`] unless `name` ranks above
    /// every lock this session holds or is taking. Builds like [`Locks::lock`].
    pub fn lock(&self, name: impl Into<String>) -> SessionLockRequest {
        SessionLockRequest {
            session: self.clone(),
            request: self.locks.lock(name),
        }
    }

    /// The locks this session holds or is taking, lowest rank first.
    pub fn held(&self) -> Vec<LockName> {
        lock(&self.held).values().cloned().collect()
    }

    /// Reserves `name`'s rank, or refuses it naming the highest lock held.
    fn reserve(&self, name: &str) -> Result<Reservation> {
        let name = LockName::new(name)?;
        let rank = self.order.rank(&name)?;
        let mut held = lock(&self.held);
        if let Some((top, top_name)) = held.last_key_value() {
            if *top >= rank {
                return Err(Error::OrderViolation {
                    requested: name.to_string(),
                    requested_rank: rank.to_string(),
                    held: top_name.to_string(),
                    held_rank: top.to_string(),
                });
            }
        }
        held.insert(rank.clone(), name);
        Ok(Reservation {
            held: Arc::clone(&self.held),
            rank: Some(rank),
        })
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("order", &self.order)
            .field("held", &self.held())
            .finish()
    }
}

fn lock(held: &Held) -> std::sync::MutexGuard<'_, BTreeMap<Rank, LockName>> {
    // Updates are single inserts and removes, so a poisoned map is still consistent.
    held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A rank a session holds: given back when the request fails or the guard that carries it ends.
pub(crate) struct Reservation {
    held: Held,
    rank: Option<Rank>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(rank) = self.rank.take() {
            lock(&self.held).remove(&rank);
        }
    }
}

/// A request for one lock in a [`Session`], built by [`Session::lock`].
#[must_use = "a lock request does nothing until awaited or try_acquire()d"]
pub struct SessionLockRequest {
    session: Session,
    request: LockRequest,
}

impl SessionLockRequest {
    /// The mode to hold (default `EX`).
    pub fn mode(mut self, mode: LockMode) -> Self {
        self.request = self.request.mode(mode);
        self
    }

    /// The lease TTL (see [`LockRequest::ttl`]).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.request = self.request.ttl(ttl);
        self
    }

    /// How long a blocking acquire may wait (see [`LockRequest::timeout`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.request = self.request.timeout(timeout);
        self
    }

    /// Takes the lock only if it can be granted at once (see [`LockRequest::try_acquire`]).
    pub async fn try_acquire(self) -> Result<Guard> {
        self.run(false).await
    }

    async fn run(self, wait: bool) -> Result<Guard> {
        let reservation = self.session.reserve(&self.request.name)?;
        let LockRequest {
            locks,
            name,
            options,
        } = self.request;
        let guard = acquire(locks, name, options, wait).await?;
        Ok(guard.holding(reservation))
    }
}

impl IntoFuture for SessionLockRequest {
    type Output = Result<Guard>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Guard>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run(true))
    }
}
