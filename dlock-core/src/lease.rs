//! The lease keeper: renews an entry at about TTL/3, keeps the local validity deadline and turns the
//! lease Lost before the store can hand the lock to anyone else.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::driver::{Driver, EntryKey};
use crate::metrics as m;

/// The state of a held lock's lease.
///
/// `Held` → (renewal failing) `Suspect` → `Held` again or `Lost`; any → `Released`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// The last renewal was confirmed; the lock is valid until [`LeaseStatus::valid_until`].
    Held,
    /// Renewals are failing; the lock is still valid until [`LeaseStatus::valid_until`].
    Suspect,
    /// The lease ran out without a confirmed renewal. Stop using the protected resource.
    Lost,
    /// The holder released the lock.
    Released,
}

/// A lease's state and its local validity deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseStatus {
    /// Where the lease stands.
    pub state: LeaseState,
    /// Until when the holder may rely on the lock: the send time of the last confirmed renewal (or of the
    /// request that queued the entry) plus the TTL, less [`drift_margin`]. The store keeps the entry at
    /// least that long, because it counts the TTL from when it received the request.
    pub valid_until: Instant,
}

/// The safety margin taken off every validity window for clock-rate drift between this process and the
/// store: 1% of the TTL plus 2 ms.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(dlock_core::lease::drift_margin(Duration::from_secs(10)), Duration::from_millis(102));
/// ```
pub fn drift_margin(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
}

/// Shared by a guard (or an acquire in progress) and its keeper task.
pub(crate) struct Lease {
    pub(crate) driver: Arc<dyn Driver>,
    pub(crate) key: EntryKey,
    pub(crate) ttl: Duration,
    pub(crate) driver_name: &'static str,
    status: watch::Sender<LeaseStatus>,
}

impl Lease {
    /// A lease whose entry was created (or last renewed) by a request sent at `sent`. `driver_name`
    /// labels metrics and logs (the client knows it; asking the driver would cost a call per acquire).
    pub(crate) fn new(
        driver: Arc<dyn Driver>,
        driver_name: &'static str,
        key: EntryKey,
        ttl: Duration,
        sent: Instant,
    ) -> Arc<Self> {
        let (status, _) = watch::channel(LeaseStatus {
            state: LeaseState::Held,
            valid_until: sent + ttl - drift_margin(ttl),
        });
        Arc::new(Lease {
            driver,
            key,
            ttl,
            driver_name,
            status,
        })
    }

    pub(crate) fn status(&self) -> LeaseStatus {
        *self.status.borrow()
    }

    /// Not lost, and the validity deadline is ahead.
    pub(crate) fn is_valid(&self) -> bool {
        let status = self.status();
        matches!(status.state, LeaseState::Held | LeaseState::Suspect)
            && Instant::now() < status.valid_until
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<LeaseStatus> {
        self.status.subscribe()
    }

    /// Resolves once the lease is Lost; never when it is released instead.
    pub(crate) async fn lost(&self) {
        let mut rx = self.status.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail while we borrow it.
        let _ = rx.wait_for(|s| s.state == LeaseState::Lost).await;
    }

    pub(crate) fn set_state(&self, state: LeaseState) {
        self.status.send_modify(|s| {
            if s.state != LeaseState::Lost && s.state != LeaseState::Released {
                s.state = state;
            }
        });
    }

    fn confirm(&self, sent: Instant) {
        let valid_until = sent + self.ttl - drift_margin(self.ttl);
        self.status.send_modify(|s| {
            if s.state == LeaseState::Held || s.state == LeaseState::Suspect {
                s.state = LeaseState::Held;
                s.valid_until = s.valid_until.max(valid_until);
            }
        });
    }

    fn declare_lost(&self, why: &str) {
        let was_live = self.status.send_if_modified(|s| {
            let live = matches!(s.state, LeaseState::Held | LeaseState::Suspect);
            if live {
                s.state = LeaseState::Lost;
            }
            live
        });
        if was_live {
            metrics::counter!(m::LOST_TOTAL, "driver" => self.driver_name).increment(1);
            tracing::warn!(name = %self.key.name, owner = %self.key.owner, why, "dlock: lock lost");
        }
    }

    /// Starts the task that keeps this lease alive until it is aborted or the lease is lost.
    /// `sent` is when the request that created the entry was sent.
    pub(crate) fn spawn_keeper(self: &Arc<Self>, sent: Instant) -> JoinHandle<()> {
        let lease = Arc::clone(self);
        tokio::spawn(async move { lease.keep(sent).await })
    }

    async fn keep(&self, sent: Instant) {
        let interval = self.ttl / 3;
        let retry = (self.ttl / 10).clamp(Duration::from_millis(5), Duration::from_secs(1));
        let mut next_renewal = sent + interval;
        loop {
            // Wake at the deadline even when the next retry is later: lost() must fire before the
            // store may expire the entry, not at the next attempt.
            tokio::time::sleep_until(next_renewal.min(self.status().valid_until)).await;
            let valid_until = self.status().valid_until;
            let sent = Instant::now();
            if sent >= valid_until {
                self.declare_lost("no renewal was confirmed before the validity deadline");
                return;
            }
            // One attempt may take until the next renewal would be due: a reply that never comes
            // (lost on the way) then costs a retry, not the lock.
            let attempt_deadline = valid_until.min(sent + interval);
            match tokio::time::timeout_at(attempt_deadline, self.driver.renew(&self.key, self.ttl))
                .await
            {
                Ok(Ok(store_sent)) => {
                    metrics::counter!(m::RENEWALS_TOTAL, "driver" => self.driver_name, "outcome" => "ok")
                        .increment(1);
                    let from = store_sent.min(sent);
                    self.confirm(from);
                    next_renewal = from + interval;
                }
                Ok(Err(err)) if err.is_lost() => {
                    self.declare_lost("the store no longer has the entry");
                    return;
                }
                Ok(Err(err)) => {
                    metrics::counter!(m::RENEWALS_TOTAL, "driver" => self.driver_name, "outcome" => "error")
                        .increment(1);
                    tracing::warn!(name = %self.key.name, error = %err, "dlock: lease renewal failed; retrying");
                    self.set_state(LeaseState::Suspect);
                    next_renewal = Instant::now() + retry;
                }
                Err(_) if attempt_deadline >= valid_until => {
                    self.declare_lost(
                        "the store did not confirm a renewal before the validity deadline",
                    );
                    return;
                }
                Err(_) => {
                    metrics::counter!(m::RENEWALS_TOTAL, "driver" => self.driver_name, "outcome" => "timeout")
                        .increment(1);
                    tracing::warn!(name = %self.key.name, "dlock: a lease renewal went unanswered; retrying");
                    self.set_state(LeaseState::Suspect);
                    next_renewal = Instant::now();
                }
            }
        }
    }
}

/// Removes an entry in the background, retrying for up to one TTL (after which the store has dropped it
/// anyway). Used for releases from `Drop` and for cleaning up after cancelled or failed acquires.
pub(crate) fn release_in_background(driver: Arc<dyn Driver>, key: EntryKey, ttl: Duration) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(async move {
                if let Err(err) = release_with_retries(&*driver, &key, ttl).await {
                    tracing::warn!(name = %key.name, error = %err, "dlock: background release failed; the lease will expire");
                }
            });
        }
        Err(_) => tracing::warn!(
            name = %key.name,
            "dlock: lock dropped outside a tokio runtime; its lease will expire instead of being released"
        ),
    }
}

/// Releases with retries on transient errors, for at most `ttl`.
pub(crate) async fn release_with_retries(
    driver: &dyn Driver,
    key: &EntryKey,
    ttl: Duration,
) -> crate::Result<()> {
    let give_up = Instant::now() + ttl;
    // A release whose reply is lost is retried (a repeated release is harmless) instead of holding
    // the caller for the whole TTL.
    let per_attempt = (ttl / 4).max(Duration::from_millis(50));
    let mut backoff = Duration::from_millis(20);
    loop {
        let attempt_deadline = give_up.min(Instant::now() + per_attempt);
        let attempt = match tokio::time::timeout_at(attempt_deadline, driver.release(key)).await {
            Ok(attempt) => attempt,
            Err(_) if attempt_deadline < give_up => continue,
            Err(_) => Err(crate::Error::backend_msg(
                driver.capabilities().driver,
                format!(
                    "the store did not confirm the release of lock {:?} within the lease TTL",
                    key.name
                ),
            )),
        };
        match attempt {
            Ok(()) => return Ok(()),
            Err(err) if err.is_transient() && Instant::now() + backoff < give_up => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(err) => {
                metrics::counter!(m::RELEASE_FAILURES_TOTAL, "driver" => driver.capabilities().driver)
                    .increment(1);
                return Err(err);
            }
        }
    }
}
