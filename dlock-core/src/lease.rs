//! A held lock's lease: its state, its local validity deadline on both clocks, and how a renewal
//! confirmed by the store extends it. The client's keeper (`keeper.rs`) does the renewing.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::driver::{Driver, Enqueued, EntryKey, EntryRequest, Grant};
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
    ///
    /// This instant is on tokio's monotonic clock, which stops while the host is suspended. On Linux the
    /// same window is also kept on `CLOCK_BOOTTIME`, which does not stop, and
    /// [`Guard::is_valid`](crate::Guard::is_valid) checks both: right after a resume it is `false` if
    /// the window ended during the suspension, and `lost()` follows at the keeper's next wake-up (at
    /// most a third of the TTL later). On other systems only the monotonic clock is used.
    pub valid_until: Instant,
}

/// One moment on both clocks: tokio's monotonic clock, and the clock that keeps counting while the
/// host is suspended (where the system has one).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stamp {
    pub(crate) at: Instant,
    boot: Option<Duration>,
}

impl Stamp {
    pub(crate) fn now() -> Self {
        Stamp {
            at: Instant::now(),
            boot: boot_clock(),
        }
    }

    /// The same moment as `earlier`, an instant at or before this stamp, on both clocks.
    pub(crate) fn back_to(self, earlier: Instant) -> Self {
        Stamp {
            at: earlier,
            boot: self.boot_at(earlier),
        }
    }

    /// The boot-clock reading at `earlier`, an instant at or before this stamp.
    fn boot_at(&self, earlier: Instant) -> Option<Duration> {
        let before = self.at.saturating_duration_since(earlier);
        self.boot.map(|boot| boot.saturating_sub(before))
    }
}

#[cfg(target_os = "linux")]
fn boot_clock() -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the valid pointer it is given.
    let read = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) } == 0;
    read.then(|| Duration::new(now.tv_sec as u64, now.tv_nsec as u32) + simulated_suspension())
}

#[cfg(not(target_os = "linux"))]
fn boot_clock() -> Option<Duration> {
    None
}

#[cfg(all(target_os = "linux", not(test)))]
fn simulated_suspension() -> Duration {
    Duration::ZERO
}

#[cfg(all(target_os = "linux", test))]
use tests::simulated_suspension;

/// No boot-clock deadline known.
const NO_BOOT_DEADLINE: u64 = u64::MAX;

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
    /// The validity deadline on the boot clock, in nanoseconds ([`NO_BOOT_DEADLINE`] if unknown).
    boot_valid_until: AtomicU64,
}

impl Lease {
    /// A lease whose entry was created (or last renewed) by a request sent at `sent`. `driver_name`
    /// labels metrics and logs (the client knows it; asking the driver would cost a call per acquire).
    pub(crate) fn new(
        driver: Arc<dyn Driver>,
        driver_name: &'static str,
        key: EntryKey,
        ttl: Duration,
        sent: Stamp,
    ) -> Arc<Self> {
        let (status, _) = watch::channel(LeaseStatus {
            state: LeaseState::Held,
            valid_until: sent.at + ttl - drift_margin(ttl),
        });
        let lease = Lease {
            driver,
            key,
            ttl,
            driver_name,
            status,
            boot_valid_until: AtomicU64::new(NO_BOOT_DEADLINE),
        };
        lease.extend_boot_deadline(sent.boot);
        Arc::new(lease)
    }

    fn extend_boot_deadline(&self, sent_boot: Option<Duration>) {
        if let Some(boot) = sent_boot {
            let deadline = boot + self.ttl - drift_margin(self.ttl);
            let nanos = u64::try_from(deadline.as_nanos()).unwrap_or(NO_BOOT_DEADLINE - 1);
            let _ = self
                .boot_valid_until
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |old| {
                    (old == NO_BOOT_DEADLINE || nanos > old).then_some(nanos)
                });
        }
    }

    /// Whether the validity window is still open on the boot clock (always, where it is unknown).
    pub(crate) fn boot_window_open(&self) -> bool {
        let deadline = self.boot_valid_until.load(Ordering::SeqCst);
        match boot_clock() {
            Some(now) if deadline != NO_BOOT_DEADLINE => now < Duration::from_nanos(deadline),
            _ => true,
        }
    }

    pub(crate) fn status(&self) -> LeaseStatus {
        *self.status.borrow()
    }

    /// Not lost, and the validity deadline is ahead.
    pub(crate) fn is_valid(&self) -> bool {
        let status = self.status();
        matches!(status.state, LeaseState::Held | LeaseState::Suspect)
            && Instant::now() < status.valid_until
            && self.boot_window_open()
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

    /// Waits for the store to grant the entry (or its pending conversion), as long as the lease
    /// lives. A waiting entry stays queued while its keeper renews it, so a store error on the way
    /// (an election, a restart, a dropped connection) does not end the wait: asking again is safe,
    /// and only the loss of the lease, or the caller's deadline, does.
    pub(crate) async fn wait_granted(&self) -> crate::Result<Grant> {
        let lost = || crate::Error::Lost {
            name: self.key.name.to_string(),
        };
        let mut backoff = Duration::from_millis(20);
        loop {
            let waited = tokio::select! {
                biased;
                _ = self.lost() => return Err(lost()),
                waited = self.driver.wait(&self.key) => waited,
            };
            match waited {
                Err(err) if err.is_transient() => {
                    tracing::warn!(
                        name = %self.key.name,
                        error = %err,
                        "dlock: the store failed while the lock was waited for; waiting again"
                    );
                    metrics::counter!(m::WAIT_ERRORS_TOTAL, "driver" => self.driver_name)
                        .increment(1);
                    tokio::select! {
                        biased;
                        _ = self.lost() => return Err(lost()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    pub(crate) fn set_state(&self, state: LeaseState) {
        self.status.send_modify(|s| {
            if s.state != LeaseState::Lost && s.state != LeaseState::Released {
                s.state = state;
            }
        });
    }

    /// A renewal confirmed by the store, counted from `from`: the send time of the request that
    /// extended the lease, at or before the attempt stamped `attempt`.
    pub(crate) fn confirm(&self, attempt: Stamp, from: Instant) {
        self.extend_boot_deadline(attempt.boot_at(from));
        let valid_until = from + self.ttl - drift_margin(self.ttl);
        self.status.send_modify(|s| {
            if s.state == LeaseState::Held || s.state == LeaseState::Suspect {
                s.state = LeaseState::Held;
                s.valid_until = s.valid_until.max(valid_until);
            }
        });
    }

    pub(crate) fn declare_lost(&self, why: &str) {
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
}

/// An enqueue request in flight, polled where its sender runs.
type EnqueueFuture = Pin<Box<dyn Future<Output = crate::Result<Enqueued>> + Send>>;

/// An enqueue, and the removal of its entry (in the background) when its sender goes away without
/// a use for it — an acquire dropped, timed out or failed, a quorum's climb cancelled — until
/// [`DequeueOnDrop::disarm`]. The lease TTL is the backstop.
///
/// An enqueue still in flight is finished first: a release sent at once could overtake it on a store
/// reached over several connections, find nothing, and leave the entry behind. So the sender polls
/// the enqueue in place (no task of its own on the way to a grant), and only a dropped one hands it
/// to a task.
pub(crate) struct DequeueOnDrop {
    driver: Arc<dyn Driver>,
    key: EntryKey,
    ttl: Duration,
    enqueue: Option<EnqueueFuture>,
    armed: bool,
}

impl DequeueOnDrop {
    /// Prepares `request` on `driver`; it is sent when [`DequeueOnDrop::answer`] is first polled.
    pub(crate) fn send(driver: Arc<dyn Driver>, request: EntryRequest) -> Self {
        let (key, ttl) = (request.key.clone(), request.ttl);
        let enqueue: EnqueueFuture = Box::pin({
            let driver = Arc::clone(&driver);
            async move { driver.enqueue(&request).await }
        });
        DequeueOnDrop {
            driver,
            key,
            ttl,
            enqueue: Some(enqueue),
            armed: true,
        }
    }

    /// The store's answer. Bound it with a timeout: if it is dropped before the answer, the enqueue
    /// stays in flight, and the cleanup waits for it. The store may hold the entry even after an
    /// answer (only the reply may have been lost), so the cleanup stays armed.
    pub(crate) async fn answer(&mut self) -> crate::Result<Enqueued> {
        let Some(enqueue) = self.enqueue.as_mut() else {
            return Err(crate::Error::backend_msg(
                self.driver.capabilities().driver,
                format!(
                    "the enqueue for lock {:?} was answered already",
                    self.key.name
                ),
            ));
        };
        let answer = enqueue.await;
        self.enqueue = None;
        answer
    }

    /// The entry is in use (or the store left none): nothing to remove.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for DequeueOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (driver, key, ttl) = (Arc::clone(&self.driver), self.key.clone(), self.ttl);
        match (self.enqueue.take(), tokio::runtime::Handle::try_current()) {
            (Some(enqueue), Ok(handle)) => {
                handle.spawn(async move {
                    let _ = enqueue.await;
                    release_in_background(driver, key, ttl);
                });
            }
            _ => release_in_background(driver, key, ttl),
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

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use crate::{LeaseState, Locks, MemoryDriver};

    static SUSPENDED_NANOS: AtomicU64 = AtomicU64::new(0);

    /// How far the boot clock has been moved ahead of the monotonic one, as a suspension would.
    pub(crate) fn simulated_suspension() -> Duration {
        Duration::from_nanos(SUSPENDED_NANOS.load(Ordering::SeqCst))
    }

    #[cfg(target_os = "linux")]
    #[tokio::test(start_paused = true)]
    async fn a_suspension_past_the_window_invalidates_the_guard_at_once() {
        let ttl = Duration::from_secs(3);
        let locks = Locks::new(MemoryDriver::new());
        let guard = locks.lock("x").ttl(ttl).await.unwrap();
        assert!(guard.is_valid());
        // The host sleeps for a TTL: the boot clock moves on, the monotonic clock does not.
        SUSPENDED_NANOS.store(ttl.as_nanos() as u64, Ordering::SeqCst);
        assert!(!guard.is_valid(), "the window ended during the suspension");
        tokio::time::timeout(ttl / 3 + Duration::from_millis(1), guard.lost())
            .await
            .expect("lost() fires at the keeper's next wake-up");
        assert_eq!(guard.status().state, LeaseState::Lost);
    }
}
