//! etcd v3 driver for [dlock](https://docs.rs/dlock-rs): the six DLM lock modes, fair FIFO queues
//! without a thundering herd, fencing tokens from etcd revisions, and one lease per client.
//! Works with etcd 3.4 and 3.5, a single member or a cluster.
//!
//! ```no_run
//! # async fn demo() -> dlock_core::Result<()> {
//! let driver = dlock_etcd::EtcdDriver::connect("etcd://127.0.0.1:2379").await?;
//! let locks = dlock_core::Locks::new(driver);
//! let guard = locks.lock("stock/42").await?;
//! # drop(guard); Ok(()) }
//! ```
//!
//! With the `dlock` facade (feature `etcd`), `dlock::connect(url)` picks this driver for `etcd://`
//! and `etcds://` URLs.
//!
//! # URLs
//!
//! ```text
//! etcd://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]…][/][?PARAM=VALUE[&PARAM=VALUE…]]
//! etcds://…   the same over TLS
//! ```
//!
//! - `HOST` is a name, an IPv4 address or a bracketed IPv6 address (`[::1]`); `PORT` defaults to 2379.
//!   List every member of a cluster: the driver talks to one at a time and moves to the next when one
//!   fails (see [Members](#members)). The list is used as given; members are not discovered.
//! - `USER:PASSWORD` logs in with etcd's authentication; percent-encode `:`, `@` and `%` in them. A
//!   wrong user name or password fails [`EtcdDriver::connect`] with an error that says
//!   "authentication failed".
//!
//! Query parameters (values percent-encoded):
//!
//! | parameter | meaning |
//! |---|---|
//! | `tls_ca=PATH` | `etcds://` only: trust the CA certificate(s) in this PEM file instead of the system's trust store |
//! | `tls_cert=PATH&tls_key=PATH` | `etcds://` only: a client certificate and its key (PEM), for servers that run with `--client-cert-auth` |
//! | `tls_domain=NAME` | `etcds://` only: the name the server certificate must carry, when it is not the host as written |
//! | `prefix=NAME` | the first part of every key (default `dlock`), to keep applications apart; printable ASCII, no spaces, no trailing `/` |
//! | `timeout_ms=N` | how long one request to one member may take before the next member is tried (default 3000) |
//! | `connect_timeout_ms=N` | how long connecting to one member may take (default: `timeout_ms`) |
//!
//! Anything else is refused with [`Error::InvalidUrl`] naming the problem (unknown parameter, bad
//! port, TLS parameter on `etcd://`, certificate without key, …).
//!
//! # Storage
//!
//! One key per queue entry: `<prefix>/<name>/<owner>`, where `<name>` is
//! [`LockName::encoded`](dlock_core::LockName::encoded) (which never contains `/`, so no name's keys
//! fall inside another's range) and `<owner>` the entry's [`OwnerId`](dlock_core::OwnerId). Each entry
//! key is attached to the client's lease. Its value is a few bytes: the mode, whether it is granted, the
//! fencing token when it differs from the key's `mod_revision`, and a pending conversion — `EX` (waiting),
//! `PR!` (granted), `PR!1207>EX` (granted PR with token 1207, converting to EX). Keys under the prefix
//! that do not look like this (a deeper path, an invalid owner, another value, no lease) are ignored.
//!
//! A released lock leaves no entry key, and the entries of a crashed client vanish with its lease.
//!
//! A name used through a [`Quorum`](dlock_core::Quorum) also has a *fence register*
//! ([`Driver::raise_fence`]), the key `<prefix>/<name>.fence`: a decimal number that only ever
//! grows, attached to no lease (it never expires, and etcd keeps it across restarts like any key). Encoded names contain neither `.` nor `/`, so it lies outside
//! every name's range `<prefix>/<name>/`: queue reads and the grant transactions' guards never see
//! it. It is raised by a linearizable read and a put guarded on its mod revision (version 0 while
//! absent), repeated when another client raised it in between, so a concurrent raise is never
//! undone. It is the one key an idle name keeps. Nothing else is stored.
//!
//! # Operations
//!
//! Grants are decided by the client with [`dlock_core::grant`] on a linearizable read of the name's
//! range, and written by a transaction guarded on that read: it applies only if no key in the range
//! was created or modified after the read's revision (`mod_revision < rev + 1` over the whole range).
//! Two clients deciding on stale views therefore cannot both grant conflicting entries: the second
//! transaction fails and its client reads again. (Deletions do not fail the guard, and need not:
//! an entry leaving never makes a grant wrong.)
//!
//! - **enqueue**: read the queue; if the new entry would be granted, create it granted in one guarded
//!   transaction, else create it waiting (`try_acquire` creates nothing and answers `WouldBlock`).
//! - **wait**: read the queue; if the entry is grantable now, the waiter grants itself (a guarded
//!   transaction); else it watches one key (below) and reads again when that key changes or the watch
//!   breaks. Waiters write their own grant, so a release is one guarded delete and nothing more.
//!   Conversions take priority over waiting entries because the grant rule makes waiting entries
//!   respect pending conversions' target modes.
//! - **convert**: read, check [`grant::conversion_deadlocks`](dlock_core::grant::conversion_deadlocks),
//!   then in one guarded transaction either grant the conversion (when it is the next one
//!   [`grant::decide`](dlock_core::grant::decide) would settle) or record it as pending.
//! - **release**: delete the key if its `create_revision` is still the entry's own, so a repeated or
//!   late release can never remove anything else.
//!
//! Every request is safe to repeat, which is what lets the driver retry it on another member (a
//! repeated lease grant at worst leaves an unused lease behind, which expires by itself).
//!
//! # Cost model
//!
//! Round trips (RTT) and etcd requests per driver operation, as this driver performs them:
//!
//! | operation | round trips | etcd requests |
//! |---|---|---|
//! | acquire on a free name | 1 | one transaction: if the name has no entry, put this one granted, else read the queue |
//! | acquire granted beside other holders | 2 | that transaction, then one guarded transaction |
//! | acquire that waits | 2, then 1 read + a watch, and 1 transaction when granted | as above; the waiter grants itself |
//! | the client's lease | a keepalive on the acquire path only when none was confirmed in the last TTL/6 (or a grant, for the first lock with a TTL) | one `LeaseKeepAlive` or `LeaseGrant` |
//! | release | 1 | one guarded delete transaction |
//! | handoff (release → next holder runs) | 1 (release) + ½ (watch event) + 2 (read, grant transaction) | a delete, a watch event, a read and a transaction |
//! | renewal | one keepalive per **lease** (per client and TTL) every TTL/6 to TTL/3, whatever the number of locks | one `LeaseKeepAlive` |
//! | conversion | 2 (read, transaction), then as a waiting acquire | a read and a transaction |
//! | inspect | 1 | one range read |
//!
//! A lost compare (another client wrote to the name between the read and the transaction) costs one
//! more read and transaction. Each waiter watches one key, so a release wakes one waiter, not all.
//!
//! # Waiting without a herd
//!
//! A waiting entry watches only its newest conflicting predecessor (or, when a later holder converted
//! up, that holder); a pending conversion watches the newest conflicting holder. The watch starts at
//! the store's current revision (etcd serves a watch that starts in the past from a catch-up loop
//! that runs every 100 ms, which would delay the wake-up); when the store moved on since the read,
//! the watched entry is read once more after the watch is in place, so nothing in between is
//! missed. A release therefore wakes only the waiters directly behind it: in a line of `EX`
//! waiters, exactly one. Updates of the watched entry that leave it blocking (say, the predecessor
//! itself being granted) are skipped without a read. Watches run with `require_leader`, so a member
//! cut off from the quorum ends them, and the waiter reads again through another member.
//!
//! # Leases
//!
//! One lease per client and TTL (rounded up to whole seconds, as etcd counts). Entries with the same
//! TTL share it, so renewal costs the same whatever the number of locks held: renewals from core's
//! keeper reuse a keepalive sent within the last sixth of the TTL, join the one in flight, or send
//! one — one keepalive per lease every TTL/6 to TTL/3. `renew` reports when the confirmed keepalive was
//! *sent*; etcd restarts the TTL when it receives it, never earlier. Queueing an entry first renews
//! (or grants) its lease with a keepalive sent after the request started, so the new entry's
//! validity window is covered too.
//!
//! When etcd answers a keepalive with "lease not found", or no keepalive was confirmed for a whole
//! TTL, the lease is lost: every lock on it reports [`Lost`](dlock_core::Error::Lost) on its next
//! renewal, the driver revokes the lease in the background, and new requests get a new lease.
//!
//! etcd has a minimum lease TTL (1.5 × its election timeout, rounded up: 2 s by default) and silently
//! raises shorter TTLs. The driver learns it at connect time from a `LeaseGrant` answer and reports it
//! as [`Capabilities::min_ttl`](dlock_core::Capabilities::min_ttl), so shorter TTLs are refused
//! instead of being stretched behind the caller's back.
//!
//! [`Capabilities::per_request_ttl`](dlock_core::Capabilities::per_request_ttl) is `false`: entries
//! with the same TTL share a lease, and the lease is what etcd expires when a client dies. An entry
//! still ends within its own TTL of its own guard's last renewal, whatever the client's other locks
//! do (next section).
//!
//! # Entries nobody renews
//!
//! **Rule: every entry ends one TTL after its last renewal by its own guard** (or after the enqueue
//! that created it, if never renewed), **plus one delete's round trip — even while the client's
//! other locks keep the shared lease alive.** Without it, an entry whose guard was leaked, dropped
//! outside a tokio runtime (its `Drop` cannot spawn the release), or whose release gave up, would
//! block its name for as long as the client holds any other lock with that TTL.
//!
//! The driver records, per entry, the instant its own guard's renewal returned (the enqueue's
//! answer, to begin with). Each lease has a reaper task that sleeps until the earliest of
//! (recorded instant + the entry's TTL) over the entries on the lease, then deletes the entries
//! past it — each by a transaction guarded on the entry's create revision, like a release, so it
//! never removes a newer entry, and its waiters wake as on any release — and forgets them; a
//! renewal that comes back after that answers [`Lost`](dlock_core::Error::Lost). This is never
//! before the guard's validity window ends: the guard counts from when its renewal was *sent*,
//! which is earlier, and stops a drift margin short of the TTL.
//!
//! Renewals stay one keepalive per lease (the reaper costs no store call for entries that are
//! renewed; an overdue entry costs one delete). The reaper lives as long as its lease is kept
//! alive: every renewal checks that it runs, and starts it again on the renewing task's runtime if
//! it ended with the runtime it ran on. A release that fails leaves the entry known to the driver,
//! so the reaper deletes it at the same deadline (or sooner, when this client next reads that
//! lock's queue). A guard that is leaked with [`std::mem::forget`] keeps its keeper task, which
//! goes on renewing the entry: that lock stays held, as for any guard that is alive.
//!
//! # Fencing tokens
//!
//! A grant's token is the revision of the transaction that made it: the entry's create revision when
//! it was granted on arrival, the revision of the waiter's own grant transaction otherwise, and the
//! revision of the converting transaction for a conversion. Every grant is its own transaction, and
//! etcd revisions only grow, so tokens increase with every grant on a name, conflicting or not
//! ([`Capabilities::fencing_total_order`](dlock_core::Capabilities::fencing_total_order)).
//!
//! (The create revision alone would not do for waiters: an entry may wait while a later entry that
//! was granted a compatible mode converts up to a conflicting one; that holder's conversion token is
//! newer than the waiter's create revision, and the waiter is granted after it.)
//!
//! To make your own etcd writes conditional on holding the lock, take a [`Fence`] with
//! [`EtcdDriver::fence`] and write with [`EtcdDriver::fenced_txn`]. A fence compares the entry's
//! create revision *and* its value, so it holds only while the lock is held in the mode it was
//! held in when the fence was taken: converting a lock down (say `EX` to `NL`) ends its fences,
//! and a write fenced by the `EX` grant cannot land beside another client's new `EX`.
//!
//! # Members
//!
//! `etcd-client` balances over all endpoints and keeps sending a share of the calls to a member that
//! has died or hangs. This driver instead keeps one client per member, sends every call to one
//! member (the first one listed, to begin with), and on a transport error, a "no leader"/timeout
//! answer or no answer within `timeout_ms` moves to the next member and repeats the call there
//! (every member twice at most). Each member's client authenticates with that member, so etcd's
//! per-member simple tokens work too.
//!
//! # Guarantees
//!
//! - **Atomicity** (no two incompatible holders; tokens increase along conflicting holders): holds on
//!   any etcd, through member crashes, leader changes and partitions. Every grant is a linearizable,
//!   guarded write, and an entry leaves the store only by its owner's delete, by its lease expiring,
//!   which etcd's leader measures from the *receipt* of the last keepalive, or by the reaper one TTL
//!   after its guard's last renewal returned — never before the holder's validity window (counted
//!   from the *send*) has ended.
//! - **Loss of a minority** of members (crashed, killed or partitioned): locks stay held and waiters
//!   are granted; requests to a dead member fail over to the others. While a majority is lost, nothing
//!   is granted or renewed, and holders turn Lost at the end of their validity windows.
//! - **Leader failover**: requests stall for the election (about a second with default settings) and
//!   are retried. A new leader restarts every lease's TTL from its election, so locks of a crashed
//!   client can be freed up to one TTL later than usual after a leader change (the Liveness A bound of
//!   TTL + ε then stretches by up to one TTL); this never shortens a lease.
//! - **A partitioned client** sees its renewals fail: its guards turn Suspect, then Lost when their
//!   validity windows end, before etcd can expire the lease. Other clients are granted only after
//!   that. A request the client sent into the partition may still arrive later; every such write is
//!   guarded, and entries left behind this way are deleted by the client when it next reads that
//!   lock's queue (or expire with the lease).
//! - **A paused store** (all members frozen) behaves like a partition for every client.
//!
//! # Caveats
//!
//! - etcd raises a TTL below its minimum lease TTL (2 s by default); the driver refuses such TTLs
//!   instead ([Leases](#leases)).
//! - After a leader change, a crashed client's locks may be freed up to one TTL later than usual
//!   ([Guarantees](#guarantees)).
//! - Members are used as listed, not discovered ([Members](#members)).
//! - Fencing tokens are etcd revisions: they are ordered within one etcd cluster only, and a
//!   restored backup with a lower revision would restart them.
#![warn(missing_docs)]

mod config;
mod driver;
mod entry;
mod lease;
mod pool;
mod tracked;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dlock_core::{
    Capabilities, Driver, Enqueued, EntryInfo, EntryKey, EntryRequest, Error, Grant, LockMode,
    LockName, Queued, Result,
};
use tokio::time::Instant;

/// The `etcd-client` crate this driver is built on, for building the operations of
/// [`EtcdDriver::fenced_txn`] and for [`EtcdDriver::client`].
pub use etcd_client;

pub(crate) const DRIVER: &str = "etcd";

/// Locks on an etcd cluster. Cheap to clone: clones share the connections, the leases and the
/// entries (so a clone can serve [`EtcdDriver::fenced_txn`] for guards of a `Locks` built on another
/// clone).
#[derive(Clone)]
pub struct EtcdDriver {
    inner: Arc<driver::Inner>,
}

impl std::fmt::Debug for EtcdDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDriver")
            .field("endpoints", &self.inner.pool.endpoints())
            .field("prefix", &self.inner.prefix)
            .finish()
    }
}

impl EtcdDriver {
    /// Connects to the etcd members named by `url` (see [URLs](crate#urls)).
    ///
    /// Before returning, it asks one member for a lease (to learn etcd's minimum TTL; the lease is
    /// revoked at once) and reads the key prefix, so a wrong password, a missing permission or an
    /// unreachable cluster fails here rather than on the first lock.
    ///
    /// ```no_run
    /// use dlock_core::{Locks, LockMode};
    /// use dlock_etcd::EtcdDriver;
    /// # async fn demo() -> dlock_core::Result<()> {
    /// let driver = EtcdDriver::connect(
    ///     "etcds://locker:secret@10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379?tls_ca=/etc/etcd/ca.pem",
    /// )
    /// .await?;
    /// let locks = Locks::new(driver);
    /// let guard = locks.lock("stock/42").mode(LockMode::PW).await?;
    /// println!("fencing token {}", guard.fencing_token());
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self> {
        let config = config::Config::parse(url)?;
        let options = config.connect_options()?;
        let pool = Arc::new(pool::Pool::new(
            config.endpoints.clone(),
            options,
            config.timeout,
        ));
        let user = config.user.as_ref().map(|(u, _)| u.clone());
        let range = format!("{}/", config.prefix);
        let fail =
            |e: pool::Failed| pool::connect_error(e, &config.redacted, user.as_deref(), &range);
        // A lease asked for 1 s comes back with etcd's minimum TTL.
        let probe = pool
            .first_call("lease grant", config.timeout, |client| async move {
                client.lease_client().grant(1, None).await
            })
            .await
            .map_err(fail)?;
        let (probe_id, min_secs) = (probe.id(), probe.ttl().max(1));
        let _ = pool
            .call("lease revoke", config.timeout, |client| async move {
                client.lease_client().revoke(probe_id).await
            })
            .await;
        pool.first_call("read the key prefix", config.timeout, |client| {
            let range = range.clone();
            async move {
                client
                    .kv_client()
                    .get(
                        range,
                        Some(
                            etcd_client::GetOptions::new()
                                .with_prefix()
                                .with_count_only(),
                        ),
                    )
                    .await
            }
        })
        .await
        .map_err(fail)?;
        let leases = lease::Leases::new(Arc::clone(&pool), min_secs);
        tracing::debug!(endpoints = ?config.endpoints, min_ttl_secs = min_secs, "dlock-etcd: connected");
        Ok(EtcdDriver {
            inner: Arc::new(driver::Inner::new(
                pool,
                leases,
                config.prefix,
                Duration::from_secs(min_secs as u64),
                user,
            )),
        })
    }

    /// A fence for the lock behind a [`Guard`](dlock_core::Guard) from this driver (`guard` is its
    /// [`Guard::entry_key`](dlock_core::Guard::entry_key)): a condition for etcd transactions that
    /// holds while the lock is still held in etcd in the mode it is held in now. Use it with
    /// [`EtcdDriver::fenced_txn`], or put its [`compares`](Fence::compares) first in a transaction of
    /// your own.
    ///
    /// Take the fence while holding the mode your writes need. It compares the entry's create
    /// revision (so it ends when the lock is released, expires or is deleted as an
    /// [orphan](crate#entries-nobody-renews)) and its value (so it ends when the mode changes). A
    /// pending conversion leaves it in force, as the mode is still held; a completed conversion ends
    /// it, in either direction. After a conversion down, another client may hold a mode the old one
    /// excluded, so a write fenced by the old mode must not apply; after a conversion up, take a new
    /// fence (an etcd transaction cannot compare a value with a set of modes, "this one or any
    /// stronger").
    ///
    /// The mode is the one this driver last granted the entry. When a conversion ended without a
    /// definite answer, the guard falls back to a weaker mode while etcd may still hold the old
    /// one; a fence for the old one then holds exactly as long as etcd says the entry holds it.
    ///
    /// [`Error::Lost`] when this driver does not hold that entry (released, lost, not granted yet,
    /// or another driver's).
    pub fn fence(&self, guard: &EntryKey) -> Result<Fence> {
        let (create_revision, mode) =
            self.inner.entries.fence(guard).ok_or_else(|| Error::Lost {
                name: guard.name.to_string(),
            })?;
        let key = self.inner.key_of(guard);
        let mut compares = vec![etcd_client::Compare::create_revision(
            key.as_str(),
            etcd_client::CompareOp::Equal,
            create_revision,
        )];
        compares.extend(entry::granted_in(&key, mode));
        Ok(Fence {
            name: guard.name.clone(),
            mode,
            compares,
        })
    }

    /// Runs `ops` in one etcd transaction that applies only while `fence` holds: while the lock it
    /// was taken from is held in etcd in the mode it was held in then (see [`EtcdDriver::fence`]).
    /// Returns the transaction's answer when it applied, and [`Error::Lost`] when it did not —
    /// the lock was released, expired with the lease after this client lost contact, or was
    /// converted since. Unlike a check of [`Guard::is_valid`](dlock_core::Guard::is_valid) before
    /// writing, the check and the writes happen atomically in etcd, so no delay between them can
    /// let a write in after the lock was lost.
    ///
    /// Like any etcd request of this driver, the transaction is sent again to another member if the
    /// first one fails without an answer. So it may apply twice, and an answer of `Lost` may follow a
    /// first attempt that did apply (before the lock was lost); when that matters, build the
    /// transaction yourself with [`Fence::compares`], a compare of your own, and
    /// [`EtcdDriver::client`].
    ///
    /// ```no_run
    /// use dlock_core::{Locks, LockMode};
    /// use dlock_etcd::{etcd_client::TxnOp, EtcdDriver};
    /// # async fn demo() -> dlock_core::Result<()> {
    /// let driver = EtcdDriver::connect("etcd://127.0.0.1:2379").await?;
    /// let locks = Locks::new(driver.clone());
    /// let guard = locks.lock("stock/42").mode(LockMode::PW).await?;
    /// let fence = driver.fence(guard.entry_key())?;
    /// match driver
    ///     .fenced_txn(&fence, [TxnOp::put("stock/42/count", "41", None)])
    ///     .await
    /// {
    ///     Ok(_) => println!("written while holding the lock in {}", fence.mode()),
    ///     Err(e) if e.is_lost() => println!("lock lost or converted; nothing written"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn fenced_txn(
        &self,
        fence: &Fence,
        ops: impl Into<Vec<etcd_client::TxnOp>>,
    ) -> Result<etcd_client::TxnResponse> {
        let txn = etcd_client::Txn::new().when(fence.compares()).and_then(ops);
        let inner = &self.inner;
        let resp = inner
            .pool
            .call("fenced transaction", inner.pool.timeout(), |client| {
                let txn = txn.clone();
                async move { client.kv_client().txn(txn).await }
            })
            .await
            .map_err(|e| pool::to_error(e, inner.user.as_deref()))?;
        if resp.succeeded() {
            Ok(resp)
        } else {
            tracing::debug!(name = %fence.name, mode = %fence.mode, "dlock-etcd: a fenced transaction was refused: the lock is no longer held in the fence's mode");
            Err(Error::Lost {
                name: fence.name.to_string(),
            })
        }
    }

    /// A client connected to the member this driver currently talks to, for requests of your own (it
    /// carries the URL's credentials and TLS settings).
    pub async fn client(&self) -> Result<etcd_client::Client> {
        self.inner
            .pool
            .any_client()
            .await
            .map_err(|e| pool::to_error(e, self.inner.user.as_deref()))
    }

    /// The version of the etcd member this driver currently talks to, as its `Status` call reports
    /// it (for example `3.5.17`). Asked anew on every call: one request to that member.
    pub async fn server_version(&self) -> Result<String> {
        let status = self
            .inner
            .pool
            .call("status", self.inner.pool.timeout(), |client| async move {
                client.maintenance_client().status().await
            })
            .await
            .map_err(|e| pool::to_error(e, self.inner.user.as_deref()))?;
        Ok(status.version().to_owned())
    }

    /// The key prefix (`prefix=` in the URL; `dlock` by default).
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }
}

/// A condition for etcd transactions: it holds while one lock is held in etcd in the mode it was
/// held in when [`EtcdDriver::fence`] made the fence. See there for when it ends.
#[derive(Clone, Debug)]
pub struct Fence {
    name: LockName,
    mode: LockMode,
    compares: Vec<etcd_client::Compare>,
}

impl Fence {
    /// The lock the fence was taken from.
    pub fn name(&self) -> &LockName {
        &self.name
    }

    /// The mode the lock must still be held in.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The comparisons to put first in a transaction of your own (all of them: each alone holds
    /// in cases where the fence does not).
    pub fn compares(&self) -> Vec<etcd_client::Compare> {
        self.compares.clone()
    }
}

impl From<Fence> for Vec<etcd_client::Compare> {
    fn from(fence: Fence) -> Self {
        fence.compares
    }
}

#[async_trait]
impl Driver for EtcdDriver {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(DRIVER);
        caps.modes = LockMode::ALL.to_vec();
        caps.fencing = true;
        caps.fencing_total_order = true;
        caps.fair = true;
        caps.per_request_ttl = false;
        caps.conversion = true;
        caps.shared_between_processes = true;
        caps.min_ttl = self.inner.min_ttl;
        caps
    }

    async fn enqueue(&self, request: &EntryRequest) -> Result<Enqueued> {
        self.inner.enqueue(request).await
    }

    async fn wait(&self, key: &EntryKey) -> Result<Grant> {
        self.inner.wait(key).await
    }

    async fn renew(&self, key: &EntryKey, ttl: Duration) -> Result<Instant> {
        self.inner.renew(key, ttl).await
    }

    async fn release(&self, key: &EntryKey) -> Result<()> {
        self.inner.release(key).await
    }

    async fn convert(&self, key: &EntryKey, mode: LockMode) -> Result<Queued> {
        self.inner.convert(key, mode).await
    }

    async fn inspect(&self, name: &LockName) -> Result<Vec<EntryInfo>> {
        self.inner.inspect(name).await
    }

    async fn raise_fence(&self, name: &LockName, floor: u64) -> Result<u64> {
        self.inner.raise_fence(name, floor).await
    }
}
