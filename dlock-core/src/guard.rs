//! The guard of a held lock.

use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::driver::{EntryKey, Queued};
use crate::lease::{release_in_background, release_with_retries, Lease, LeaseState, LeaseStatus};
use crate::metrics as m;
use crate::{Error, LockMode, LockName, Result};

/// A held lock. Dropping it releases the lock in the background; [`Guard::release`] releases it and
/// reports the outcome.
///
/// While it lives, a keeper task renews the lease at about a third of the TTL. If renewals stop being
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
    keeper: JoinHandle<()>,
    mode: LockMode,
    token: u64,
    granted_at: Instant,
    released: bool,
}

impl Guard {
    pub(crate) fn new(
        lease: Arc<Lease>,
        keeper: JoinHandle<()>,
        mode: LockMode,
        token: u64,
    ) -> Self {
        Guard {
            lease,
            keeper,
            mode,
            token,
            granted_at: Instant::now(),
            released: false,
        }
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
        let status = self.status();
        matches!(status.state, LeaseState::Held | LeaseState::Suspect)
            && Instant::now() < status.valid_until
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
    /// wait: dropping the future withdraws the pending conversion and keeps the mode held.
    pub async fn convert(&mut self, mode: LockMode) -> Result<()> {
        let caps = self.lease.driver.capabilities();
        if !caps.conversion || !caps.modes.contains(&mode) {
            return Err(Error::Unsupported {
                driver: caps.driver,
                what: format!("converting a lock to {mode}"),
            });
        }
        let key = self.lease.key.clone();
        let driver = Arc::clone(&self.lease.driver);
        let held = self.mode;
        let lost = || Error::Lost {
            name: key.name.to_string(),
        };
        let asked = tokio::select! {
            asked = driver.convert(&key, mode) => asked?,
            _ = self.lease.lost() => return Err(lost()),
        };
        let grant = match asked {
            Queued::Granted(grant) => grant,
            Queued::Waiting => {
                let withdraw = WithdrawOnDrop {
                    lease: &self.lease,
                    held,
                    armed: true,
                };
                let grant = tokio::select! {
                    grant = driver.wait(&key) => grant?,
                    _ = self.lease.lost() => return Err(lost()),
                };
                withdraw.disarm();
                grant
            }
        };
        self.mode = grant.mode;
        self.token = grant.token;
        Ok(())
    }

    /// Releases the lock, retrying on store errors for up to one TTL.
    ///
    /// Returns `Ok` once the store no longer has the entry. An error means the release could not be
    /// confirmed; the lease expires anyway.
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        self.finish(LeaseState::Released);
        release_with_retries(&*self.lease.driver, &self.lease.key, self.lease.ttl).await
    }

    fn finish(&self, state: LeaseState) {
        self.keeper.abort();
        self.lease.set_state(state);
        metrics::histogram!(m::HOLD_SECONDS, "driver" => self.lease.driver_name)
            .record(self.granted_at.elapsed().as_secs_f64());
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.released {
            self.finish(LeaseState::Released);
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

/// Withdraws a pending conversion when the `convert` future is dropped, so nobody waits behind it.
struct WithdrawOnDrop<'a> {
    lease: &'a Arc<Lease>,
    held: LockMode,
    armed: bool,
}

impl WithdrawOnDrop<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for WithdrawOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (driver, key, held) = (
            Arc::clone(&self.lease.driver),
            self.lease.key.clone(),
            self.held,
        );
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(err) = driver.convert(&key, held).await {
                    tracing::warn!(name = %key.name, error = %err, "dlock: could not withdraw a pending conversion");
                }
            });
        }
    }
}
