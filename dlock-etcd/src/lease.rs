//! The driver's leases: one per distinct TTL, shared by every entry with that TTL, kept alive on
//! demand with coalesced keepalives.
//!
//! Core's keeper calls `renew` for every held lock at about TTL/3. Here those calls meet: a renewal
//! reuses the last confirmed keepalive when it was sent recently (within TTL/6), joins the keepalive
//! in flight when there is one, and sends a new one otherwise. So a client holding a thousand locks
//! with one TTL sends one keepalive every TTL/6 to TTL/3, the same as with one lock.
//!
//! What a renewal reports is when the confirmed keepalive was *sent*: etcd's leader restarts the
//! lease's TTL when it receives the keepalive, which is never earlier, so the lease lasts at least
//! TTL past that instant.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::time::Instant;

use crate::pool::{CallError, Pool};
use crate::tracked::Reaper;

/// Why a lease is given up.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Why {
    /// No keepalive was confirmed within its TTL (idle, or the store was unreachable).
    NotRenewed,
    /// etcd says it does not exist.
    Gone,
}

/// Why a lease could not be renewed.
#[derive(Clone, Debug)]
pub(crate) enum RefreshError {
    /// The lease is gone (etcd says so), or may be (no keepalive was confirmed within its TTL).
    Lost,
    /// No member confirmed the keepalive; the lease may still be fine.
    Unavailable(String),
}

type Keepalive = Shared<BoxFuture<'static, Result<Instant, RefreshError>>>;

/// One etcd lease.
pub(crate) struct Lease {
    pub id: i64,
    /// The TTL etcd granted (at least the TTL asked for: etcd raises TTLs below its minimum).
    pub ttl: Duration,
    pool: Arc<Pool>,
    state: Mutex<State>,
    /// Deletes the entries on this lease that their own guards stopped renewing, which the
    /// keepalives sent for the other entries would otherwise keep alive (see `tracked`).
    pub reaper: Reaper,
}

struct State {
    lost: bool,
    /// When the last confirmed keepalive (or the grant) was sent.
    confirmed: Instant,
    in_flight: Option<(Instant, Keepalive)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single assignment; a panic cannot leave them half-done.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Lease {
    fn new(id: i64, ttl: Duration, pool: Arc<Pool>, sent: Instant) -> Arc<Self> {
        Arc::new(Lease {
            id,
            ttl,
            pool,
            state: Mutex::new(State {
                lost: false,
                confirmed: sent,
                in_flight: None,
            }),
            reaper: Reaper::default(),
        })
    }

    /// When the last confirmed keepalive (or the grant) was sent.
    pub fn confirmed(&self) -> Instant {
        lock(&self.state).confirmed
    }

    pub fn is_lost(&self) -> bool {
        lock(&self.state).lost
    }

    /// Marks the lease lost (its entries are unusable) and revokes it in the background, so that
    /// entries the store still has vanish now instead of at expiry.
    pub fn mark_lost(self: &Arc<Self>, why: Why) {
        let was_lost = std::mem::replace(&mut lock(&self.state).lost, true);
        if was_lost {
            return;
        }
        match why {
            // Core reports each lock that was on it as lost; an idle lease simply ran out.
            Why::NotRenewed => tracing::debug!(
                lease = self.id,
                "dlock-etcd: lease not renewed within its TTL; replacing it"
            ),
            Why::Gone => tracing::warn!(
                lease = self.id,
                "dlock-etcd: etcd no longer has the lease; the locks on it are lost"
            ),
        }
        self.reaper.wake();
        self.revoke_in_background();
    }

    /// Whether the lease is given up: lost, or no keepalive was confirmed for a whole TTL (then
    /// etcd may have expired it, and it is marked lost here as [`Lease::refresh`] would).
    pub fn lapsed(self: &Arc<Self>) -> bool {
        let state = lock(&self.state);
        if state.lost {
            return true;
        }
        if Instant::now() < state.confirmed + self.ttl {
            return false;
        }
        drop(state);
        self.mark_lost(Why::NotRenewed);
        true
    }

    /// How long one keepalive attempt may take on one member before the next member is tried: short
    /// enough that a dead member leaves time for another within the validity window.
    fn attempt_timeout(&self) -> Duration {
        (self.ttl / 4)
            .max(Duration::from_millis(200))
            .min(self.pool.timeout())
    }

    /// Resolves with the send time of a confirmed keepalive sent at or after `min_sent`.
    pub async fn refresh(self: &Arc<Self>, min_sent: Instant) -> Result<Instant, RefreshError> {
        let keepalive = {
            let mut state = lock(&self.state);
            if state.lost {
                return Err(RefreshError::Lost);
            }
            if state.confirmed >= min_sent {
                return Ok(state.confirmed);
            }
            let now = Instant::now();
            if now >= state.confirmed + self.ttl {
                // etcd may have expired the lease already; every entry's validity window has ended
                // (they all started at or before `confirmed`), so none is worth saving.
                drop(state);
                self.mark_lost(Why::NotRenewed);
                return Err(RefreshError::Lost);
            }
            match &state.in_flight {
                Some((sent, keepalive)) if *sent >= min_sent => keepalive.clone(),
                _ => {
                    let keepalive = Arc::clone(self).keepalive(now).boxed().shared();
                    state.in_flight = Some((now, keepalive.clone()));
                    keepalive
                }
            }
        };
        keepalive.await
    }

    async fn keepalive(self: Arc<Self>, sent: Instant) -> Result<Instant, RefreshError> {
        let id = self.id;
        let result = self
            .pool
            .call(
                "lease keepalive",
                self.attempt_timeout(),
                |client| async move {
                    // One keepalive per stream: the stream is bound to one member, and a fresh one per
                    // call lets every keepalive go to whichever member answers.
                    client.lease_client().keep_alive(id).await.map(|_| ())
                },
            )
            .await;
        let mut state = lock(&self.state);
        if state.in_flight.as_ref().is_some_and(|(s, _)| *s == sent) {
            state.in_flight = None;
        }
        match result {
            Ok(()) => {
                state.confirmed = state.confirmed.max(sent);
                Ok(sent)
            }
            Err(e) if e.is_lease_not_found() => {
                drop(state);
                self.mark_lost(Why::Gone);
                Err(RefreshError::Lost)
            }
            Err(CallError::Unavailable(message)) => Err(RefreshError::Unavailable(message)),
            Err(CallError::Refused(e)) => Err(RefreshError::Unavailable(e.to_string())),
        }
    }

    fn revoke_in_background(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (pool, id, give_up) = (
            Arc::clone(&self.pool),
            self.id,
            Instant::now() + self.ttl * 3,
        );
        runtime.spawn(revoke(pool, id, give_up));
    }
}

/// Revokes a lease, retrying until etcd confirms, says it is gone, or `give_up` (by then it has
/// expired anyway unless something still renews it, which this driver no longer does).
async fn revoke(pool: Arc<Pool>, id: i64, give_up: Instant) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let result = pool
            .call("lease revoke", pool.timeout(), |client| async move {
                client.lease_client().revoke(id).await.map(|_| ())
            })
            .await;
        match result {
            Ok(()) => return,
            Err(e) if e.is_lease_not_found() => return,
            Err(e) if Instant::now() + backoff >= give_up => {
                tracing::debug!(lease = id, error = ?e, "dlock-etcd: giving up revoking a lease; it expires by itself");
                return;
            }
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// The lease of one TTL; locked while it is renewed or replaced for a new entry, so concurrent
/// requests never grant two leases for one TTL.
type Slot = tokio::sync::Mutex<Option<Arc<Lease>>>;

/// The driver's leases by TTL (in whole seconds, as etcd counts).
pub(crate) struct Leases {
    pool: Arc<Pool>,
    /// etcd's shortest lease TTL, learned at connect time.
    min_secs: i64,
    slots: Mutex<HashMap<i64, Arc<Slot>>>,
    /// Every lease this driver was granted: an entry on one of them that the driver does not track is
    /// a leftover (see `Inner::read_view`).
    ids: Mutex<HashSet<i64>>,
    live: Mutex<Vec<Arc<Lease>>>,
}

impl Leases {
    pub fn new(pool: Arc<Pool>, min_secs: i64) -> Self {
        Leases {
            pool,
            min_secs,
            slots: Mutex::new(HashMap::new()),
            ids: Mutex::new(HashSet::new()),
            live: Mutex::new(Vec::new()),
        }
    }

    pub fn is_ours(&self, lease: i64) -> bool {
        lock(&self.ids).contains(&lease)
    }

    /// The lease for entries with `ttl`, renewed by a keepalive sent at or after `min_sent`, or
    /// granted after it: an entry attached now then lives at least `ttl` past `min_sent`.
    pub async fn acquire(&self, ttl: Duration, min_sent: Instant) -> Result<Arc<Lease>, CallError> {
        // Rounded up: the store must never drop an entry before the TTL asked for.
        let secs = (ttl.as_nanos().div_ceil(1_000_000_000) as i64).max(self.min_secs);
        let slot = Arc::clone(lock(&self.slots).entry(secs).or_default());
        let mut current = slot.lock().await;
        if let Some(lease) = &*current {
            match lease.refresh(min_sent).await {
                Ok(_) => return Ok(Arc::clone(lease)),
                Err(RefreshError::Lost) => {}
                Err(RefreshError::Unavailable(message)) => {
                    return Err(CallError::Unavailable(message))
                }
            }
        }
        let sent = Instant::now();
        let granted = self
            .pool
            .call("lease grant", self.pool.timeout(), |client| async move {
                client.lease_client().grant(secs, None).await
            })
            .await?;
        let lease = Lease::new(
            granted.id(),
            Duration::from_secs(granted.ttl().max(0) as u64),
            Arc::clone(&self.pool),
            sent,
        );
        if granted.ttl() < secs {
            // Never seen from etcd, but validity windows assume the lease lasts at least `ttl`.
            lease.mark_lost(Why::Gone);
            return Err(CallError::Unavailable(format!(
                "etcd granted a lease of {} s when {secs} s were asked for",
                granted.ttl()
            )));
        }
        tracing::debug!(
            lease = lease.id,
            ttl_secs = granted.ttl(),
            "dlock-etcd: lease granted"
        );
        lock(&self.ids).insert(lease.id);
        let mut live = lock(&self.live);
        live.retain(|l| !l.is_lost());
        live.push(Arc::clone(&lease));
        *current = Some(Arc::clone(&lease));
        Ok(lease)
    }

    /// Revokes every live lease in the background (the driver is going away: its entries should not
    /// wait for expiry).
    pub fn revoke_all_in_background(&self) {
        for lease in lock(&self.live).drain(..) {
            lease.reaper.stop();
            if !lease.is_lost() {
                lease.revoke_in_background();
            }
        }
    }
}
