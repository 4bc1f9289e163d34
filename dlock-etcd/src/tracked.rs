//! What the driver knows about the entries it created, and the reaper that ends the ones their own
//! guard no longer renews.
//!
//! Entries share their client's lease (see `lease`), and a keepalive sent for any lock on it keeps
//! every entry on it alive. An entry whose guard was leaked, dropped outside a runtime (its `Drop`
//! cannot spawn the release), or whose release gave up would then block its name for as long as the
//! client holds any other lock with that TTL. So the driver records, per entry, the instant its own
//! guard last renewed it — when `renew` returned, or when the transaction that created it answered —
//! and each lease has a reaper that deletes the entries whose own renewal is older than their TTL.
//!
//! That is never too early: core's guard counts its validity window from the *send* time of its
//! renewal, which is before `renew` returned, and ends it a drift margin short of the TTL. A
//! renewal and the reaper meet under the table's lock, so either the renewal is recorded first (and
//! the entry is not overdue) or the reaper claims the entry first (and the renewal answers `Lost`).
//!
//! The reaper costs no store calls for entries that are renewed: it sleeps until the earliest
//! deadline among its lease's entries, and only an overdue entry costs a (guarded) delete. It runs
//! as long as its lease is not lost; every renewal makes sure it is running, so a reaper that died
//! with the runtime it was spawned on is started again on the runtime of whoever renews the lease
//! next — that is, whenever the lease is kept alive at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use dlock_core::{EntryKey, LockMode};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::driver::delete_entry;
use crate::entry::entry_key;
use crate::lease::Lease;
use crate::pool::Pool;

/// How many overdue entries the reaper deletes at once.
const PARALLEL_DELETES: usize = 16;

/// What the driver knows about one entry it created.
struct Tracked {
    lease: Arc<Lease>,
    /// `None` until the transaction that created the entry has answered.
    create_revision: Option<i64>,
    /// The mode last reported to core as granted; `None` while the entry waits.
    granted: Option<LockMode>,
    /// When its own guard last renewed it, or its enqueue answered.
    renewed: Instant,
    /// The TTL its guard asked for (the lease's may be longer: etcd counts whole seconds).
    ttl: Duration,
    state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Its guard may renew it.
    Live,
    /// Its owner released it; etcd has not confirmed the delete yet.
    Released,
    /// It outlived its own renewal by a TTL: the reaper deletes it, and renewals are refused.
    Overdue,
}

impl Tracked {
    /// When the reaper deletes it unless its guard renews it before.
    fn deadline(&self) -> Instant {
        self.renewed + self.ttl
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a few assignments that cannot panic halfway.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The driver's entries.
pub(crate) struct Table {
    pool: Arc<Pool>,
    prefix: String,
    entries: Mutex<HashMap<EntryKey, Tracked>>,
}

impl Table {
    pub fn new(pool: Arc<Pool>, prefix: String) -> Arc<Self> {
        Arc::new(Table {
            pool,
            prefix,
            entries: Mutex::new(HashMap::new()),
        })
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<EntryKey, Tracked>> {
        lock(&self.entries)
    }

    /// Tracks an entry that is about to be created on `lease` (before it can exist, so that it is
    /// never mistaken for a leftover). Its deadline runs from now until the creating transaction
    /// answers.
    pub fn track(self: &Arc<Self>, key: &EntryKey, lease: &Arc<Lease>, ttl: Duration) {
        let mut entries = self.entries();
        let tracked = entries.entry(key.clone()).or_insert_with(|| Tracked {
            lease: Arc::clone(lease),
            create_revision: None,
            granted: None,
            renewed: Instant::now(),
            ttl,
            state: State::Live,
        });
        lease.reaper.schedule(tracked.deadline());
        drop(entries);
        self.ensure_reaper(lease);
    }

    /// The transaction that created the entry answered (or a repeated enqueue found it): records
    /// its revision and mode, and counts the answer as the entry's first renewal.
    pub fn created(&self, key: &EntryKey, create_revision: i64, granted: Option<LockMode>) {
        if let Some(tracked) = self.entries().get_mut(key) {
            if tracked.state == State::Live {
                tracked.create_revision = Some(create_revision);
                tracked.granted = granted;
                tracked.renewed = tracked.renewed.max(Instant::now());
                tracked.lease.reaper.schedule(tracked.deadline());
            }
        }
    }

    /// The entry is granted `mode` (as reported to core).
    pub fn granted(&self, key: &EntryKey, mode: LockMode) {
        if let Some(tracked) = self.entries().get_mut(key) {
            tracked.granted = Some(mode);
        }
    }

    /// The entry is attached to `lease` from now on (its old lease was lost before the entry was
    /// written).
    pub fn moved(self: &Arc<Self>, key: &EntryKey, lease: &Arc<Lease>) {
        if let Some(tracked) = self.entries().get_mut(key) {
            tracked.lease = Arc::clone(lease);
            lease.reaper.schedule(tracked.deadline());
        }
        self.ensure_reaper(lease);
    }

    /// Forgets the entry: it is gone from the store, or was never created.
    pub fn forget(&self, key: &EntryKey) {
        self.entries().remove(key);
    }

    /// The lease of an entry that its guard may still renew and wait on.
    pub fn live_lease(&self, key: &EntryKey) -> Option<Arc<Lease>> {
        self.entries()
            .get(key)
            .filter(|t| t.state == State::Live)
            .map(|t| Arc::clone(&t.lease))
    }

    /// Records a renewal by the entry's own guard, now. `false` when the entry is no longer live:
    /// the reaper took it, its owner released it, or it is unknown.
    pub fn renewed(self: &Arc<Self>, key: &EntryKey, ttl: Duration) -> bool {
        let lease = {
            let mut entries = self.entries();
            let Some(tracked) = entries.get_mut(key).filter(|t| t.state == State::Live) else {
                return false;
            };
            tracked.renewed = tracked.renewed.max(Instant::now());
            tracked.ttl = ttl;
            Arc::clone(&tracked.lease)
        };
        self.ensure_reaper(&lease);
        true
    }

    /// Starts the release of an entry: its guard no longer renews it. Returns its create revision
    /// when known. The entry stays tracked until the delete is confirmed ([`Table::forget`]), so
    /// that if the release gives up, the reaper still deletes it a TTL after its last renewal.
    pub fn release(&self, key: &EntryKey) -> Option<i64> {
        let mut entries = self.entries();
        let tracked = entries.get_mut(key)?;
        if tracked.state == State::Live {
            tracked.state = State::Released;
        }
        tracked.create_revision
    }

    /// Whether an entry found on one of this driver's leases belongs to no guard: unknown (a
    /// creating transaction that landed after its caller gave up) or released without a confirmed
    /// delete.
    pub fn is_leftover(&self, key: &EntryKey) -> bool {
        self.entries()
            .get(key)
            .is_none_or(|t| t.state == State::Released)
    }

    /// The create revision and granted mode of a live, granted entry: what a fence compares.
    pub fn fence(&self, key: &EntryKey) -> Option<(i64, LockMode)> {
        let entries = self.entries();
        let tracked = entries.get(key).filter(|t| t.state == State::Live)?;
        Some((tracked.create_revision?, tracked.granted?))
    }

    /// Makes sure `lease` has a running reaper, on this runtime if it needs a new one.
    fn ensure_reaper(self: &Arc<Self>, lease: &Arc<Lease>) {
        let mut state = lock(&lease.reaper.state);
        if state.task.as_ref().is_some_and(|t| !t.is_finished()) || lease.is_lost() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if state.task.is_some() {
            tracing::debug!(
                lease = lease.id,
                "dlock-etcd: the reaper of a lease ended with its runtime; starting it again"
            );
        }
        state.wake_at = Wake::Now;
        state.task = Some(runtime.spawn(reap(
            Arc::downgrade(self),
            Arc::downgrade(lease),
            Arc::clone(&lease.reaper.wake),
        )));
    }

    /// Claims the entries on `lease` that outlived their own renewal by their TTL: from now on
    /// their renewals are refused. Returns their keys, etcd keys and create revisions (when known).
    fn claim_overdue(
        &self,
        lease: &Arc<Lease>,
        now: Instant,
    ) -> Vec<(EntryKey, String, Option<i64>)> {
        let mut entries = self.entries();
        lease.reaper.looking();
        entries
            .iter_mut()
            .filter(|(_, t)| Arc::ptr_eq(&t.lease, lease) && t.deadline() <= now)
            .map(|(key, tracked)| {
                if tracked.state != State::Overdue {
                    tracing::warn!(
                        name = %key.name,
                        owner = %key.owner,
                        was = ?tracked.state,
                        "dlock-etcd: deleting a lock entry its guard stopped renewing a TTL ago (the guard was dropped without a runtime to release it, or its release gave up)"
                    );
                    tracked.state = State::Overdue;
                }
                (
                    key.clone(),
                    entry_key(&self.prefix, key),
                    tracked.create_revision,
                )
            })
            .collect()
    }

    /// Plans the reaper's next look at `lease`: the earliest deadline among the entries on it, or
    /// `retry_at` if earlier (some delete failed).
    fn plan(&self, lease: &Arc<Lease>, retry_at: Option<Instant>) {
        let entries = self.entries();
        let next = entries
            .values()
            .filter(|t| Arc::ptr_eq(&t.lease, lease) && t.state != State::Overdue)
            .map(Tracked::deadline)
            .chain(retry_at)
            .min();
        lease.reaper.plan(next);
    }

    /// The lease is lost: etcd drops its entries with it. Forgets the ones no guard renews any more
    /// (guards of live ones hear `Lost` on their next renewal, which forgets them).
    fn lease_lost(&self, lease: &Arc<Lease>) {
        self.entries()
            .retain(|_, t| !Arc::ptr_eq(&t.lease, lease) || t.state == State::Live);
    }
}

/// When a reaper looks next.
#[derive(Clone, Copy, Debug)]
enum Wake {
    /// It is looking now (or about to): whatever changes, it sees.
    Now,
    /// At this instant, or when woken.
    At(Instant),
    /// Only when woken: its lease has no entries.
    Woken,
}

/// The reaper of one lease: the task's handle and when it looks next.
#[derive(Default)]
pub(crate) struct Reaper {
    state: Mutex<ReaperState>,
    wake: Arc<Notify>,
}

struct ReaperState {
    task: Option<JoinHandle<()>>,
    wake_at: Wake,
}

impl Default for ReaperState {
    fn default() -> Self {
        ReaperState {
            task: None,
            wake_at: Wake::Now,
        }
    }
}

impl Reaper {
    /// An entry's deadline is now `deadline`: wakes the reaper if it would look later than that.
    /// Called under the table's lock, so it cannot slip between the reaper's plan and its sleep.
    fn schedule(&self, deadline: Instant) {
        let later = match lock(&self.state).wake_at {
            Wake::Now => false,
            Wake::At(at) => deadline < at,
            Wake::Woken => true,
        };
        if later {
            self.wake.notify_one();
        }
    }

    fn looking(&self) {
        lock(&self.state).wake_at = Wake::Now;
    }

    fn plan(&self, next: Option<Instant>) {
        lock(&self.state).wake_at = next.map_or(Wake::Woken, Wake::At);
    }

    /// Wakes the reaper (its lease was lost: it forgets the lease's dead entries and ends).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Ends the reaper (the driver is going away).
    pub fn stop(&self) {
        if let Some(task) = lock(&self.state).task.take() {
            task.abort();
        }
    }
}

/// The reaper of one lease: deletes the entries on it that outlived their own renewal by a TTL, each
/// by a transaction guarded on the entry's create revision (so it never deletes a newer entry; the
/// delete wakes the entry's waiters like any release), and forgets them. Sleeps until the earliest
/// deadline in between. Ends when the lease is lost or lapsed (etcd drops its entries with it) or
/// the driver is gone, holding neither while it sleeps.
async fn reap(table: Weak<Table>, lease: Weak<Lease>, wake: Arc<Notify>) {
    let mut retry = Duration::from_millis(50);
    loop {
        let (Some(table), Some(lease)) = (table.upgrade(), lease.upgrade()) else {
            return;
        };
        if lease.lapsed() {
            table.lease_lost(&lease);
            return;
        }
        let now = Instant::now();
        let overdue = table.claim_overdue(&lease, now);
        let failed = futures::stream::iter(overdue)
            .map(|(key, path, create_revision)| {
                let table = &table;
                async move {
                    match delete_entry(&table.pool, path, create_revision).await {
                        Ok(()) => {
                            table.forget(&key);
                            false
                        }
                        Err(err) => {
                            tracing::debug!(name = %key.name, error = ?err, "dlock-etcd: could not delete an overdue entry; retrying");
                            true
                        }
                    }
                }
            })
            .buffer_unordered(PARALLEL_DELETES)
            .fold(false, |any, failed| async move { any || failed })
            .await;
        let retry_at = if failed {
            let at = Instant::now() + retry;
            retry = (retry * 2).min(Duration::from_secs(1));
            Some(at)
        } else {
            retry = Duration::from_millis(50);
            None
        };
        table.plan(&lease, retry_at);
        let wake_at = lock(&lease.reaper.state).wake_at;
        drop((table, lease));
        match wake_at {
            Wake::Now => {}
            Wake::At(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = wake.notified() => {}
                }
            }
            Wake::Woken => wake.notified().await,
        }
    }
}
