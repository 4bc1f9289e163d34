//! The user-facing client: [`Locks`] and its request builders.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use crate::driver::{
    Capabilities, Driver, Enqueued, EntryInfo, EntryKey, EntryRequest, OwnerId, Queued,
};
use crate::guard::Guard;
use crate::keeper::Keeper;
use crate::lease::{drift_margin, DequeueOnDrop, Lease, Stamp};
use crate::metrics as m;
use crate::{Error, LockMode, LockName, Result};

/// The lease TTL used when a request does not set one.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// A lock client over one driver. Cheap to clone; clones share the driver and the owner-id sequence.
///
/// ```
/// use std::time::Duration;
/// use dlock_core::{Locks, LockMode, MemoryDriver};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> dlock_core::Result<()> {
/// let locks = Locks::new(MemoryDriver::new());
/// let guard = locks
///     .lock("stock/42")
///     .mode(LockMode::PW)
///     .ttl(Duration::from_secs(10))
///     .timeout(Duration::from_secs(3))
///     .await?;
/// println!("fencing token {}", guard.fencing_token());
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Locks {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    driver: Arc<dyn Driver>,
    capabilities: Capabilities,
    client_id: String,
    next_owner: AtomicU64,
    keeper: Keeper,
}

impl Locks {
    /// A client over `driver`.
    pub fn new(driver: impl Driver) -> Self {
        Self::from_arc(Arc::new(driver))
    }

    /// A client over a shared driver.
    pub fn from_arc(driver: Arc<dyn Driver>) -> Self {
        let capabilities = driver.capabilities();
        Locks {
            inner: Arc::new(ClientInner {
                keeper: Keeper::new(Arc::clone(&driver)),
                driver,
                capabilities,
                client_id: format!("{:016x}", rand::random::<u64>()),
                next_owner: AtomicU64::new(1),
            }),
        }
    }

    /// A request for the lock `name`, in mode `EX` with a [`DEFAULT_TTL`] lease and no timeout unless
    /// set otherwise. Await it to wait in line, or call [`LockRequest::try_acquire`].
    pub fn lock(&self, name: impl Into<String>) -> LockRequest {
        LockRequest {
            locks: self.clone(),
            name: name.into(),
            options: Options::default(),
        }
    }

    /// A request for several locks at once, taken one by one in canonical (sorted) order so that two
    /// callers asking for overlapping sets cannot deadlock. Each name is a plain name (taken in the
    /// request's [mode](LockAllRequest::mode)) or a `(name, mode)` pair; a name listed twice is taken
    /// once, in the [join](LockMode::join) of its modes.
    ///
    /// ```
    /// use dlock_core::{LockMode, Locks, MemoryDriver};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> dlock_core::Result<()> {
    /// let locks = Locks::new(MemoryDriver::new());
    /// let guards = locks.lock_all(["account/b", "account/a"]).await?;
    /// assert_eq!(guards[0].name().as_str(), "account/a");
    /// drop(guards);
    /// let mixed = locks.lock_all([("ledger", LockMode::PR), ("account/a", LockMode::EX)]).await?;
    /// assert_eq!(mixed[1].mode(), LockMode::PR);
    /// # Ok(()) }
    /// ```
    pub fn lock_all<I, S>(&self, names: I) -> LockAllRequest
    where
        I: IntoIterator<Item = S>,
        S: Into<LockSpec>,
    {
        LockAllRequest {
            locks: self.clone(),
            specs: names.into_iter().map(Into::into).collect(),
            options: Options::default(),
        }
    }

    /// What the driver promises.
    pub fn capabilities(&self) -> &Capabilities {
        &self.inner.capabilities
    }

    /// The driver behind this client.
    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.inner.driver
    }

    /// The live entries of a lock's queue, in queue order: who holds it and who waits.
    pub async fn inspect(&self, name: &str) -> Result<Vec<EntryInfo>> {
        self.inner.driver.inspect(&LockName::new(name)?).await
    }

    fn next_owner(&self) -> OwnerId {
        OwnerId::new(
            &self.inner.client_id,
            self.inner.next_owner.fetch_add(1, Ordering::Relaxed),
        )
    }
}

impl std::fmt::Debug for Locks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locks")
            .field("driver", &self.inner.capabilities.driver)
            .field("client_id", &self.inner.client_id)
            .finish()
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Options {
    pub(crate) mode: LockMode,
    pub(crate) ttl: Duration,
    pub(crate) timeout: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: LockMode::EX,
            ttl: DEFAULT_TTL,
            timeout: None,
        }
    }
}

impl Options {
    fn check(&self, caps: &Capabilities) -> Result<()> {
        if self.ttl.is_zero() {
            return Err(Error::InvalidTtl {
                ttl: self.ttl,
                reason: "a lease needs a TTL above zero".into(),
            });
        }
        if self.ttl < caps.min_ttl {
            return Err(Error::InvalidTtl {
                ttl: self.ttl,
                reason: format!(
                    "the {} driver needs at least {:?}",
                    caps.driver, caps.min_ttl
                ),
            });
        }
        if !caps.modes.contains(&self.mode) {
            return Err(Error::Unsupported {
                driver: caps.driver,
                what: format!("lock mode {}", self.mode),
            });
        }
        Ok(())
    }
}

/// A request for one lock, built by [`Locks::lock`]. Await it to acquire (waiting in FIFO order), or
/// call [`LockRequest::try_acquire`] to take it only if it is free now.
#[must_use = "a lock request does nothing until awaited or try_acquire()d"]
pub struct LockRequest {
    pub(crate) locks: Locks,
    pub(crate) name: String,
    pub(crate) options: Options,
}

impl LockRequest {
    /// The mode to hold (default `EX`).
    pub fn mode(mut self, mode: LockMode) -> Self {
        self.options.mode = mode;
        self
    }

    /// The lease TTL (default [`DEFAULT_TTL`]). The lease renews itself at about a third of it while the
    /// guard lives; a crashed holder's lock is free again at most this long after its last renewal.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options.ttl = ttl;
        self
    }

    /// How long a blocking acquire may wait before failing with [`Error::Timeout`] (default: no limit).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = Some(timeout);
        self
    }

    /// Takes the lock only if it can be granted at once; otherwise [`Error::WouldBlock`], leaving
    /// nothing queued.
    pub async fn try_acquire(self) -> Result<Guard> {
        acquire(self.locks, self.name, self.options, false).await
    }
}

impl IntoFuture for LockRequest {
    type Output = Result<Guard>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Guard>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(acquire(self.locks, self.name, self.options, true))
    }
}

/// Records the acquire outcome; an acquire dropped before it finished counts as `cancelled`.
struct Outcome {
    driver: &'static str,
    label: &'static str,
}

impl Drop for Outcome {
    fn drop(&mut self) {
        metrics::counter!(m::ACQUIRE_TOTAL, "driver" => self.driver, "outcome" => self.label)
            .increment(1);
    }
}

fn outcome_label(result: &Result<Guard>) -> &'static str {
    match result {
        Ok(_) => "granted",
        Err(Error::WouldBlock { .. }) => "would_block",
        Err(Error::Timeout { .. }) => "timeout",
        Err(Error::Lost { .. }) => "lost",
        Err(_) => "error",
    }
}

pub(crate) async fn acquire(
    locks: Locks,
    name: String,
    options: Options,
    wait: bool,
) -> Result<Guard> {
    let caps = &locks.inner.capabilities;
    let span = tracing::debug_span!("dlock.acquire", name = %name, mode = %options.mode, wait);
    let mut outcome = Outcome {
        driver: caps.driver,
        label: "cancelled",
    };
    let started = Instant::now();
    let result = async {
        let name = LockName::new(name)?;
        options.check(caps)?;
        enqueue_and_wait(&locks, name, options, wait, started).await
    }
    .instrument(span)
    .await;
    outcome.label = outcome_label(&result);
    if result.is_ok() {
        metrics::histogram!(m::ACQUIRE_WAIT_SECONDS, "driver" => caps.driver)
            .record(started.elapsed().as_secs_f64());
    }
    result
}

async fn enqueue_and_wait(
    locks: &Locks,
    name: LockName,
    options: Options,
    wait: bool,
    started: Instant,
) -> Result<Guard> {
    let driver = Arc::clone(&locks.inner.driver);
    let key = EntryKey {
        name,
        owner: locks.next_owner(),
    };
    let request = EntryRequest {
        key: key.clone(),
        mode: options.mode,
        ttl: options.ttl,
        wait,
    };
    let sent_stamp = Stamp::now();
    let sent = sent_stamp.at;
    let deadline = options.timeout.map(|t| started + t);
    // A grant that arrives after the lease's first validity window is worthless, so an unanswered
    // enqueue is abandoned then (or at the caller's deadline, if earlier).
    let useless_after = sent + options.ttl - drift_margin(options.ttl);
    let enqueue_deadline = deadline.map_or(useless_after, |d| d.min(useless_after));
    let mut dequeue = DequeueOnDrop::send(Arc::clone(&driver), request);
    let answered = tokio::time::timeout_at(enqueue_deadline, dequeue.answer()).await;
    let queued = match answered {
        Ok(queued) => queued,
        Err(_) if deadline.is_some_and(|d| d <= useless_after) => Err(Error::Timeout {
            name: key.name.to_string(),
            waited: started.elapsed(),
        }),
        Err(_) => Err(Error::backend_msg(
            locks.inner.capabilities.driver,
            format!(
                "the store did not answer the request for lock {:?} within its lease TTL ({:?})",
                key.name, options.ttl
            ),
        )),
    };
    if matches!(queued, Err(Error::WouldBlock { .. })) {
        // The driver left nothing queued.
        dequeue.disarm();
    }
    let Enqueued { queued, kept_from } = queued?;
    if !wait && queued == Queued::Waiting {
        // A driver must not queue a try_acquire; clean up rather than wait without end.
        return Err(Error::WouldBlock {
            name: key.name.to_string(),
        });
    }
    // A store whose entries share a lease keeps this one from that lease's last renewal on.
    let valid_from = match kept_from {
        Some(kept_from) if kept_from < sent => Stamp::now().back_to(kept_from),
        _ => sent_stamp,
    };
    let lease = Lease::new(
        Arc::clone(&driver),
        locks.inner.capabilities.driver,
        key.clone(),
        options.ttl,
        valid_from,
    );
    // From here on, a failed acquire drops `kept`, which ends the renewals.
    let kept = locks.inner.keeper.keep(&lease, valid_from);
    let grant = match queued {
        Queued::Granted(grant) => grant,
        Queued::Waiting => {
            let waited = lease.wait_granted();
            match deadline {
                Some(deadline) => {
                    tokio::time::timeout_at(deadline, waited)
                        .await
                        .map_err(|_| Error::Timeout {
                            name: key.name.to_string(),
                            waited: started.elapsed(),
                        })??
                }
                None => waited.await?,
            }
        }
    };
    if !lease.is_valid() {
        return Err(Error::Lost {
            name: key.name.to_string(),
        });
    }
    dequeue.disarm();
    Ok(Guard::new(lease, kept, grant.mode, grant.token))
}

/// One name of a [`Locks::lock_all`] request: a name alone (taken in the request's mode), or a name with
/// its own mode.
///
/// ```
/// use dlock_core::{LockMode, LockSpec};
/// let plain: LockSpec = "account/a".into();
/// let read: LockSpec = ("account/b", LockMode::PR).into();
/// assert_eq!(read.mode(), Some(LockMode::PR));
/// assert_eq!(plain.mode(), None);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockSpec {
    name: String,
    mode: Option<LockMode>,
}

impl LockSpec {
    /// The lock name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The mode asked for this name, if it has its own.
    pub fn mode(&self) -> Option<LockMode> {
        self.mode
    }
}

impl From<&str> for LockSpec {
    fn from(name: &str) -> Self {
        LockSpec {
            name: name.to_owned(),
            mode: None,
        }
    }
}

impl From<String> for LockSpec {
    fn from(name: String) -> Self {
        LockSpec { name, mode: None }
    }
}

impl From<&String> for LockSpec {
    fn from(name: &String) -> Self {
        name.as_str().into()
    }
}

impl<S: Into<String>> From<(S, LockMode)> for LockSpec {
    fn from((name, mode): (S, LockMode)) -> Self {
        LockSpec {
            name: name.into(),
            mode: Some(mode),
        }
    }
}

/// A request for several locks, built by [`Locks::lock_all`]. Awaiting it yields the [`Guards`] in
/// canonical order, every one of them valid; if any lock cannot be taken, or one taken early was lost
/// while waiting for a later one, the ones already taken are released.
#[must_use = "a lock request does nothing until awaited"]
pub struct LockAllRequest {
    pub(crate) locks: Locks,
    pub(crate) specs: Vec<LockSpec>,
    pub(crate) options: Options,
}

impl LockAllRequest {
    /// The mode of every name that does not name its own (default `EX`).
    pub fn mode(mut self, mode: LockMode) -> Self {
        self.options.mode = mode;
        self
    }

    /// The lease TTL of every lock (default [`DEFAULT_TTL`]).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options.ttl = ttl;
        self
    }

    /// How long the whole request may wait (default: no limit).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = Some(timeout);
        self
    }

    /// The names in canonical (sorted) order, each once, in the join of the modes it was asked in.
    pub(crate) fn canonical(&self) -> Result<Vec<(LockName, LockMode)>> {
        let mut wanted = std::collections::BTreeMap::<LockName, LockMode>::new();
        for spec in &self.specs {
            let name = LockName::new(&spec.name)?;
            let mode = spec.mode.unwrap_or(self.options.mode);
            wanted
                .entry(name)
                .and_modify(|m| *m = m.join(mode))
                .or_insert(mode);
        }
        Ok(wanted.into_iter().collect())
    }
}

impl IntoFuture for LockAllRequest {
    type Output = Result<Guards>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Guards>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let wanted = self.canonical()?;
            let started = Instant::now();
            let mut guards = Vec::with_capacity(wanted.len());
            for (name, mode) in wanted {
                let mut options = self.options;
                options.mode = mode;
                if let Some(timeout) = options.timeout {
                    options.timeout = Some(timeout.saturating_sub(started.elapsed()));
                }
                // On error the guards taken so far drop and release in the background.
                guards.push(acquire(self.locks.clone(), name.to_string(), options, true).await?);
            }
            // A long wait for a later name can outlast an earlier lease whose renewals failed: a
            // dead guard handed back would be relied on, so the whole request fails instead.
            if let Some(dead) = guards.iter().find(|g| !g.is_valid()) {
                return Err(Error::Lost {
                    name: dead.name().to_string(),
                });
            }
            Ok(Guards(guards))
        })
    }
}

/// The guards of a [`Locks::lock_all`] request, in canonical order. Dropping the set releases every
/// lock in the background; [`Guards::lost`] fires when any of them is lost.
///
/// ```
/// use dlock_core::{LockMode, Locks, MemoryDriver};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> dlock_core::Result<()> {
/// let locks = Locks::new(MemoryDriver::new());
/// let all = locks
///     .lock_all([("account/b", LockMode::EX), ("account/a", LockMode::PR)])
///     .await?;
/// assert_eq!(all[0].name().as_str(), "account/a");
/// assert_eq!(all[0].mode(), LockMode::PR);
/// tokio::select! {
///     _ = all.lost() => eprintln!("a lock was lost: stop the transfer"),
///     _ = async { /* move money from a to b */ } => {}
/// }
/// all.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Guards(Vec<Guard>);

impl Guards {
    /// Resolves once any of the locks is lost (never, for an empty set).
    pub async fn lost(&self) {
        if self.0.is_empty() {
            return std::future::pending().await;
        }
        futures::future::select_all(self.0.iter().map(|g| Box::pin(g.lost()))).await;
    }

    /// Whether every lock may still be relied on.
    pub fn is_valid(&self) -> bool {
        self.0.iter().all(Guard::is_valid)
    }

    /// Releases every lock; the first error, if any, after trying them all.
    pub async fn release(self) -> Result<()> {
        let outcomes = futures::future::join_all(self.0.into_iter().map(Guard::release)).await;
        outcomes.into_iter().collect()
    }

    /// The guards, in canonical order.
    pub fn into_vec(self) -> Vec<Guard> {
        self.0
    }
}

impl std::ops::Deref for Guards {
    type Target = [Guard];

    fn deref(&self) -> &[Guard] {
        &self.0
    }
}

impl IntoIterator for Guards {
    type Item = Guard;
    type IntoIter = std::vec::IntoIter<Guard>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}
