//! The driver trait: how a store performs the lock operations. Everything users touch lives in core.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::{LockMode, LockName, Result};

/// Identifies the owner of one queue entry: unique per acquire, so a retried or stale release can only
/// ever remove the entry it was made for.
///
/// Owner ids consist of ASCII letters, digits and `-` only, so drivers may use them in keys as they are.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerId(Arc<str>);

impl OwnerId {
    /// Builds an owner id from a client id and a per-client counter.
    pub(crate) fn new(client: &str, counter: u64) -> Self {
        OwnerId(Arc::from(format!("{client}-{counter}")))
    }

    /// Wraps an id read back from a store. `None` unless it consists of ASCII letters, digits and `-`.
    pub fn parse(id: &str) -> Option<Self> {
        (!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
            .then(|| OwnerId(Arc::from(id)))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// The address of one queue entry: a lock name and the owner of the entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EntryKey {
    /// The lock name.
    pub name: LockName,
    /// The entry's owner.
    pub owner: OwnerId,
}

/// A request to queue an entry.
#[derive(Clone, Debug)]
pub struct EntryRequest {
    /// Where the entry goes.
    pub key: EntryKey,
    /// The requested mode.
    pub mode: LockMode,
    /// The lease: the store drops the entry this long after the last request that created or renewed it
    /// arrived, unless renewed again.
    pub ttl: Duration,
    /// When `false`, an entry that cannot be granted at once must not stay queued: the driver answers
    /// [`Error::WouldBlock`](crate::Error::WouldBlock) and leaves no trace.
    pub wait: bool,
}

/// The answer to [`Driver::enqueue`] and [`Driver::convert`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queued {
    /// Granted at once.
    Granted(Grant),
    /// Queued; [`Driver::wait`] resolves when it is granted.
    Waiting,
}

/// The answer to [`Driver::enqueue`]: where the entry stands, and since when the store keeps it.
///
/// A driver whose store keeps the entry its TTL from when the enqueue arrived answers with
/// `Queued::into()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enqueued {
    /// Granted at once, or waiting.
    pub queued: Queued,
    /// For a store whose entries live on a lease renewed apart from them (etcd's lease per client):
    /// the send time of the last confirmed renewal of the lease the entry went on, from which the
    /// store keeps the entry at least its TTL. The lock's validity counts from the earlier of this
    /// and the enqueue's send time, so the enqueue need not renew the lease when it was renewed
    /// recently. `None`: the store keeps the entry its TTL from when it received the enqueue.
    pub kept_from: Option<Instant>,
}

impl From<Queued> for Enqueued {
    fn from(queued: Queued) -> Self {
        Enqueued {
            queued,
            kept_from: None,
        }
    }
}

/// A granted mode and its fencing token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The mode now held.
    pub mode: LockMode,
    /// Strictly greater than the token of every earlier grant that this one conflicts with on the same
    /// name and store (see [`Capabilities::fencing`]).
    pub token: u64,
}

/// One entry of a name's queue, as [`Driver::inspect`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryInfo {
    /// The entry's owner.
    pub owner: OwnerId,
    /// Arrival order in the store.
    pub seq: u64,
    /// Held or requested mode.
    pub mode: LockMode,
    /// Whether the mode is held.
    pub granted: bool,
    /// A pending conversion.
    pub converting_to: Option<LockMode>,
    /// The fencing token of the entry's current grant, as [`Grant::token`] gave it to the holder
    /// (while a conversion is pending, the token of the mode still held). `None` for an entry that is
    /// not granted yet, and for a driver whose store does not keep the token where `inspect` can read
    /// it.
    pub token: Option<u64>,
}

/// One entry to renew in a [`Driver::renew_many`] batch.
#[derive(Clone, Copy, Debug)]
pub struct Renewal<'a> {
    /// The entry.
    pub key: &'a EntryKey,
    /// Its lease TTL, as in [`Driver::renew`].
    pub ttl: Duration,
}

/// What a driver promises. Conformance tests skip, visibly, only what a driver does not claim.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The driver's name, used in errors, metrics and logs.
    pub driver: &'static str,
    /// Modes the driver supports.
    pub modes: Vec<LockMode>,
    /// Grants come with fencing tokens that increase along every chain of conflicting holders.
    pub fencing: bool,
    /// Tokens increase with every grant on a name, conflicting or not.
    pub fencing_total_order: bool,
    /// Waiters are granted in FIFO order ([`crate::grant`]).
    pub fair: bool,
    /// Each entry keeps its own TTL. When `false`, the driver keeps one lease per client and `ttl` in
    /// requests is that lease's TTL.
    pub per_request_ttl: bool,
    /// Conversions (`Guard::convert`) are supported.
    pub conversion: bool,
    /// Locks are shared between processes (every real store; not the in-memory driver).
    pub shared_between_processes: bool,
    /// The shortest TTL the driver accepts.
    pub min_ttl: Duration,
}

impl Capabilities {
    /// The capabilities of a driver named `driver` that claims nothing yet: no modes, no fencing, no
    /// fairness, no per-request TTL, no conversion, not shared between processes, a 1 ms minimum TTL.
    /// Drivers set the fields they honour, so nothing is claimed by accident.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dlock_core::{Capabilities, LockMode};
    /// let mut caps = Capabilities::new("my-store");
    /// caps.modes = LockMode::ALL.to_vec();
    /// caps.fencing = true;
    /// caps.min_ttl = Duration::from_millis(100);
    /// assert!(!caps.fair);
    /// ```
    pub fn new(driver: &'static str) -> Self {
        Capabilities {
            driver,
            modes: Vec::new(),
            fencing: false,
            fencing_total_order: false,
            fair: false,
            per_request_ttl: false,
            conversion: false,
            shared_between_processes: false,
            min_ttl: Duration::from_millis(1),
        }
    }
}

/// How a store performs the lock operations.
///
/// Implementations hold no client-facing logic: queueing, timeouts, cancellation, the lease keeper and
/// the lost signal are core's. Every method must be safe to retry, and `wait` must be safe to drop
/// (cancellation).
///
/// The grant decision follows [`crate::grant`]; drivers deciding client-side call it directly.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// What the driver promises.
    fn capabilities(&self) -> Capabilities;

    /// Appends an entry for `request.key` to the name's queue and grants it if the grant rule allows.
    ///
    /// With `request.wait == false` and no immediate grant, returns
    /// [`Error::WouldBlock`](crate::Error::WouldBlock) and leaves nothing queued.
    async fn enqueue(&self, request: &EntryRequest) -> Result<Enqueued>;

    /// Resolves once the entry is granted, or once its pending conversion is granted. Returns
    /// [`Error::Lost`](crate::Error::Lost) when the entry is gone (expired or released).
    async fn wait(&self, key: &EntryKey) -> Result<Grant>;

    /// Extends the entry's lease by `ttl` from when the store receives the request. Returns the local
    /// instant at or before which the request that extended the lease was sent (drivers sharing one lease
    /// between entries return when that lease's confirmed renewal was sent; the in-memory driver, with
    /// no network in between, returns when it extended the lease).
    /// [`Error::Lost`](crate::Error::Lost) when the entry is gone.
    async fn renew(&self, key: &EntryKey, ttl: Duration) -> Result<Instant>;

    /// Renews many entries at once: one answer per renewal, in order, each as [`Driver::renew`] would
    /// give it. The client's one keeper renews every lease that is due through this call, so a store
    /// that can renew many entries in one round trip should say so here; the default sends every
    /// renewal at once and waits for all of them.
    async fn renew_many(&self, renewals: &[Renewal<'_>]) -> Vec<Result<Instant>> {
        futures::future::join_all(renewals.iter().map(|r| self.renew(r.key, r.ttl))).await
    }

    /// Removes the entry, granted or waiting. Removing an entry that is already gone succeeds.
    async fn release(&self, key: &EntryKey) -> Result<()>;

    /// Asks for the granted entry to hold `mode` instead. Granted at once when the rule allows (always
    /// when `mode` is weaker); otherwise the conversion is pending and [`Driver::wait`] resolves when it
    /// is granted. Converting to the mode held cancels a pending conversion.
    /// [`Error::ConversionDeadlock`](crate::Error::ConversionDeadlock) when it would deadlock (nothing is
    /// changed then).
    async fn convert(&self, key: &EntryKey, mode: LockMode) -> Result<Queued>;

    /// The live entries of a name's queue, in queue order.
    async fn inspect(&self, name: &LockName) -> Result<Vec<EntryInfo>>;

    /// Raises the name's *fence register* to at least `floor` and returns its value afterwards (`0`
    /// for a register never raised; `raise_fence(name, 0)` reads it).
    ///
    /// The register is a number kept per name, apart from the queue, that only ever grows and is
    /// never expired: [`Quorum`](crate::Quorum) writes it on a majority of its members to make
    /// fencing tokens comparable across stores whose own tokens are not.
    ///
    /// Atomic: a concurrent raise never lowers it, and the answer is at least `floor` (a driver whose
    /// store weakens this says where). Durable as far as the store persists data. Kept where no lock
    /// name's keys can be, so it neither shows in [`Driver::inspect`] nor changes a grant. Required of
    /// every driver, wrappers included (a wrapper forwards it): a store that cannot keep one answers
    /// [`Error::Unsupported`](crate::Error::Unsupported), and cannot be a quorum member with
    /// fencing.
    async fn raise_fence(&self, name: &LockName, floor: u64) -> Result<u64>;
}

#[async_trait]
impl<D: Driver + ?Sized> Driver for Arc<D> {
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    async fn enqueue(&self, request: &EntryRequest) -> Result<Enqueued> {
        (**self).enqueue(request).await
    }
    async fn wait(&self, key: &EntryKey) -> Result<Grant> {
        (**self).wait(key).await
    }
    async fn renew(&self, key: &EntryKey, ttl: Duration) -> Result<Instant> {
        (**self).renew(key, ttl).await
    }
    async fn renew_many(&self, renewals: &[Renewal<'_>]) -> Vec<Result<Instant>> {
        (**self).renew_many(renewals).await
    }
    async fn release(&self, key: &EntryKey) -> Result<()> {
        (**self).release(key).await
    }
    async fn convert(&self, key: &EntryKey, mode: LockMode) -> Result<Queued> {
        (**self).convert(key, mode).await
    }
    async fn inspect(&self, name: &LockName) -> Result<Vec<EntryInfo>> {
        (**self).inspect(name).await
    }
    async fn raise_fence(&self, name: &LockName, floor: u64) -> Result<u64> {
        (**self).raise_fence(name, floor).await
    }
}
