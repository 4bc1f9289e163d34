//! The guard of a held lock.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::driver::{EntryKey, Queued};
use crate::keeper::KeptLease;
use crate::lease::{release_in_background, release_with_retries, Lease, LeaseState, LeaseStatus};
use crate::metrics as m;
use crate::session::Reservation;
use crate::{Error, LockMode, LockName, Result};

/// A held lock. Dropping it releases the lock in the background; [`Guard::release`] releases it and
/// reports the outcome.
///
/// While it lives, the client's keeper renews the lease at about a third of the TTL. If renewals stop being
/// confirmed, the guard turns [`LeaseState::Lost`] at its validity deadline — before the store can give
/// the lock to anyone else — and [`Guard::lost`] resolves.
///
/// ```
/// use dlock_core::{Locks, LockMode, MemoryDriver};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> dlock_core::Result<()> {
/// let locks = Locks::new(MemoryDriver::new());
/// let mut guard = locks.lock("jobs/nightly").mode(LockMode::PR).await?;
/// guard.convert(LockMode::EX).await?;
/// tokio::select! {
///     _ = guard.lost() => eprintln!("lock lost: stop writing"),
///     _ = async { /* work, passing guard.fencing_token() to the storage */ } => {}
/// }
/// guard.release().await?;
/// # Ok(()) }
/// ```
pub struct Guard {
    lease: Arc<Lease>,
    keeper: KeptLease,
    mode: LockMode,
    token: u64,
    granted_at: Instant,
    /// The keeper is stopped and the hold time recorded.
    finished: bool,
    /// The store confirmed the release, or [`Guard::release`] gave up on it: nothing is left for a
    /// drop to release. Until then a drop releases in the background — also when a `release` future
    /// is dropped before it ends.
    released: bool,
    /// Brings the store to the fallback mode after a conversion that ended without a definite answer.
    reconcile: Option<JoinHandle<()>>,
    /// The session rank this lock takes, given back when the guard ends.
    _rank: Option<Reservation>,
}

impl Guard {
    pub(crate) fn new(lease: Arc<Lease>, keeper: KeptLease, mode: LockMode, token: u64) -> Self {
        Guard {
            lease,
            keeper,
            mode,
            token,
            granted_at: Instant::now(),
            finished: false,
            released: false,
            reconcile: None,
            _rank: None,
        }
    }

    /// The guard of a lock taken in a session, which keeps `rank` until the guard ends.
    pub(crate) fn holding(mut self, rank: Reservation) -> Self {
        self._rank = Some(rank);
        self
    }

    /// The lock name.
    pub fn name(&self) -> &LockName {
        &self.lease.key.name
    }

    /// The mode held.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The fencing token of the current grant: strictly greater than the token of every earlier
    /// conflicting grant on this name. Pass it to the storage you protect and have it reject writes with
    /// a token lower than the highest it has seen.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// The entry's key in the store (name and owner).
    pub fn entry_key(&self) -> &EntryKey {
        &self.lease.key
    }

    /// The lease's state and validity deadline now.
    pub fn status(&self) -> LeaseStatus {
        self.lease.status()
    }

    /// Whether the lock may still be relied on: not lost, and the validity deadline is ahead.
    pub fn is_valid(&self) -> bool {
        self.lease.is_valid()
    }

    /// A channel that follows the lease's state and validity deadline.
    pub fn watch(&self) -> watch::Receiver<LeaseStatus> {
        self.lease.subscribe()
    }

    /// Resolves once the lock is lost. Use it in `select!` beside the work the lock protects.
    pub async fn lost(&self) {
        self.lease.lost().await
    }

    /// Converts the lock to another mode.
    ///
    /// A weaker mode is granted at once. A stronger one waits until every other holder is compatible
    /// with it, ahead of requests queued later; two up-conversions that would wait on each other fail at
    /// once with [`Error::ConversionDeadlock`]. Wrap the call in `tokio::time::timeout` to bound the
    /// wait.
    ///
    /// If the call is dropped, or fails without a definite answer from the store, the guard cannot
    /// know which mode the store settled on, so it falls back to the [meet](LockMode::meet) of the
    /// mode held and the mode asked for — the strongest mode weaker than both, e.g. `CR` for `PR` and
    /// `CW` ([`Guard::mode`] says which) — and brings the store to that mode in the background,
    /// retrying until the store confirms or the lease ends, before the guard's next conversion. The
    /// guard never claims more than the store grants.
    pub async fn convert(&mut self, mode: LockMode) -> Result<()> {
        let caps = self.lease.driver.capabilities();
        if !caps.conversion || !caps.modes.contains(&mode) {
            return Err(Error::Unsupported {
                driver: caps.driver,
                what: format!("converting a lock to {mode}"),
            });
        }
        if let Some(reconcile) = self.reconcile.take() {
            // An earlier cancelled conversion is still bringing the store to the fallback mode; it must
            // land before this one, or it would undo it.
            let _ = reconcile.await;
        }
        let key = self.lease.key.clone();
        let driver = Arc::clone(&self.lease.driver);
        // Not the older of the two modes: for incomparable ones (PR and CW) the store may settle on
        // either, and only their meet is compatible with whatever a neighbour holds in both cases.
        let fallback = self.mode.meet(mode);
        let pending = PendingConversion {
            lease: &self.lease,
            mode: &mut self.mode,
            reconcile: &mut self.reconcile,
            fallback,
            armed: true,
        };
        let lost = || Error::Lost {
            name: key.name.to_string(),
        };
        let asked = tokio::select! {
            biased;
            _ = pending.lease.lost() => return Err(lost()),
            asked = driver.convert(&key, mode) => asked,
        };
        let grant = match asked {
            Ok(Queued::Granted(grant)) => grant,
            Ok(Queued::Waiting) => pending.lease.wait_granted().await?,
            Err(err @ (Error::ConversionDeadlock { .. } | Error::Unsupported { .. })) => {
                // A definite refusal: the store changed nothing.
                pending.disarm();
                return Err(err);
            }
            Err(err) => return Err(err),
        };
        if grant.mode != mode {
            // Someone withdrew this conversion (a stale settling of an earlier one): the store holds
            // something else than was asked, so settle on the fallback like any unclear outcome.
            return Err(Error::backend_msg(
                caps.driver,
                format!("the conversion of lock {:?} to {mode} was withdrawn; the lock is held in {fallback} now", key.name),
            ));
        }
        if !pending.lease.is_valid() {
            return Err(lost());
        }
        pending.disarm();
        self.mode = grant.mode;
        self.token = grant.token;
        Ok(())
    }

    /// Releases the lock, retrying on store errors for up to one TTL.
    ///
    /// Returns `Ok` once the store no longer has the entry. An error means the release could not be
    /// confirmed; the lease expires anyway.
    ///
    /// Dropping the returned future before it ends leaves the release to the background, as dropping
    /// the guard does.
    pub async fn release(mut self) -> Result<()> {
        if let Some(reconcile) = self.reconcile.take() {
            reconcile.abort();
        }
        self.finish(LeaseState::Released);
        let outcome =
            release_with_retries(&*self.lease.driver, &self.lease.key, self.lease.ttl).await;
        self.released = true;
        outcome
    }

    fn finish(&mut self, state: LeaseState) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.keeper.stop();
        self.lease.set_state(state);
        // A lost lock was held until its validity ended, however long the guard lived after that.
        let status = self.lease.status();
        let held = match status.state {
            LeaseState::Lost => status
                .valid_until
                .saturating_duration_since(self.granted_at),
            _ => self.granted_at.elapsed(),
        };
        metrics::histogram!(m::HOLD_SECONDS, "driver" => self.lease.driver_name)
            .record(held.as_secs_f64());
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(reconcile) = self.reconcile.take() {
            reconcile.abort();
        }
        self.finish(LeaseState::Released);
        if !self.released {
            release_in_background(
                Arc::clone(&self.lease.driver),
                self.lease.key.clone(),
                self.lease.ttl,
            );
        }
    }
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("name", self.name())
            .field("mode", &self.mode)
            .field("fencing_token", &self.token)
            .field("status", &self.status())
            .finish()
    }
}

/// Settles a conversion that ended without a definite answer (the `convert` future was dropped, or the
/// store failed): the guard falls back at once to the weaker of the two modes, and a background task
/// brings the store to that mode — withdrawing a pending up-conversion, or finishing a down-conversion
/// the store may or may not have applied.
struct PendingConversion<'a> {
    lease: &'a Arc<Lease>,
    mode: &'a mut LockMode,
    reconcile: &'a mut Option<JoinHandle<()>>,
    fallback: LockMode,
    armed: bool,
}

impl PendingConversion<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for PendingConversion<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        *self.mode = self.fallback;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            *self.reconcile = Some(handle.spawn(settle(Arc::clone(self.lease), self.fallback)));
        }
    }
}

/// Brings the store to `mode` after a conversion that ended without a definite answer, retrying on
/// store errors until the store confirms it or the lease ends: a pending conversion left in the store
/// would block conflicting waiters (on drivers that grant conversions client-side, for good).
async fn settle(lease: Arc<Lease>, mode: LockMode) {
    let mut backoff = Duration::from_millis(20);
    loop {
        let attempt = async {
            match lease.driver.convert(&lease.key, mode).await? {
                Queued::Granted(grant) => Ok(grant),
                Queued::Waiting => lease.driver.wait(&lease.key).await,
            }
        };
        let outcome = tokio::select! {
            biased;
            _ = lease.lost() => return,
            outcome = tokio::time::timeout(lease.ttl, attempt) => outcome,
        };
        match outcome {
            Ok(Ok(grant)) if grant.mode == mode => return,
            Ok(Err(err)) if err.is_lost() => return,
            Ok(Ok(grant)) => tracing::warn!(
                name = %lease.key.name, held = %grant.mode, wanted = %mode,
                "dlock: settling a cancelled conversion found another mode; retrying"
            ),
            Ok(Err(err)) => tracing::warn!(
                name = %lease.key.name, error = %err,
                "dlock: could not settle a cancelled conversion yet; retrying"
            ),
            Err(_) => tracing::warn!(
                name = %lease.key.name,
                "dlock: the store did not answer the settling of a cancelled conversion; retrying"
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
