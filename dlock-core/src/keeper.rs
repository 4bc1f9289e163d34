//! The client's lease keeper: one task per client renews every held lease that is due, many at a
//! time through [`Driver::renew_many`], and turns a lease Lost at its validity deadline — before the
//! store can hand the lock to anyone else — when no renewal was confirmed in time.
//!
//! A lease is renewed at about a third of its TTL; one that falls due within a quarter of that
//! interval of another joins the other's batch, so a client holding many locks sends a few batches
//! per renewal interval instead of one request per lock, and no task or timer exists per lock.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::driver::{Driver, Renewal};
use crate::lease::{Lease, LeaseState, Stamp};
use crate::metrics as m;

/// The most renewals one [`Driver::renew_many`] call carries; a bigger batch is split.
const BATCH_LIMIT: usize = 1000;

/// Renews the leases of one client: one task per runtime the client acquires locks on, so that a
/// lock lives no longer than the runtime it was taken on (as a task of its own would), while the
/// client's locks on other runtimes go on being renewed.
pub(crate) struct Keeper {
    driver: Arc<dyn Driver>,
    runtimes: Mutex<HashMap<tokio::runtime::Id, Arc<Shared>>>,
}

struct Shared {
    driver: Arc<dyn Driver>,
    schedule: Mutex<Schedule>,
    /// Wakes the task when a lease falls due before the instant it sleeps until.
    woken: Notify,
}

#[derive(Default)]
struct Schedule {
    kept: HashMap<u64, Kept>,
    /// Every kept lease's next wake-up, with its id: its renewal, or while a renewal is out, its
    /// validity deadline.
    wakes: BTreeSet<(Instant, u64)>,
    next_id: u64,
    /// The task, while one runs (it ends when no lease is kept, or with its runtime).
    task: Option<JoinHandle<()>>,
    /// When the running task next wakes by itself.
    asleep_until: Option<Instant>,
    /// The longest head start a renewal may take (see [`slack`]) among the leases ever kept.
    max_slack: Duration,
}

struct Kept {
    lease: Arc<Lease>,
    wake: Instant,
    next_renewal: Instant,
    renewing: bool,
}

/// How long between renewals of a lease with this TTL.
fn interval(ttl: Duration) -> Duration {
    ttl / 3
}

/// How early a renewal may go out to share a batch: a quarter of the interval, so renewals of one
/// lease stay between 3/4 and 1 interval apart.
fn slack(ttl: Duration) -> Duration {
    interval(ttl) / 4
}

/// How soon a renewal that failed is tried again.
fn retry(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(5), Duration::from_secs(1))
}

impl Schedule {
    /// No lease kept, and no task running (it ended, or its runtime did).
    fn is_idle(&self) -> bool {
        self.kept.is_empty() && self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    fn reschedule(&mut self, id: u64, wake: Instant) {
        if let Some(kept) = self.kept.get_mut(&id) {
            self.wakes.remove(&(kept.wake, id));
            kept.wake = wake;
            self.wakes.insert((wake, id));
        }
    }

    fn forget(&mut self, id: u64) {
        if let Some(kept) = self.kept.remove(&id) {
            self.wakes.remove(&(kept.wake, id));
        }
    }
}

/// A lease in the keeper's care; dropping (or [stopping](KeptLease::stop)) it ends the renewals.
pub(crate) struct KeptLease {
    shared: Arc<Shared>,
    id: u64,
}

impl KeptLease {
    /// Stops renewing the lease. Idempotent.
    pub(crate) fn stop(&self) {
        self.shared.lock().forget(self.id);
    }
}

impl Drop for KeptLease {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Keeper {
    pub(crate) fn new(driver: Arc<dyn Driver>) -> Self {
        Keeper {
            driver,
            runtimes: Mutex::default(),
        }
    }

    /// Keeps `lease` alive from now on; `sent` is when the request that created its entry was sent.
    pub(crate) fn keep(&self, lease: &Arc<Lease>, sent: Stamp) -> KeptLease {
        let runtime = tokio::runtime::Handle::current().id();
        let shared = {
            let mut runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
            // The keepers of runtimes that are gone, once their guards are gone too.
            runtimes.retain(|id, shared| *id == runtime || !shared.lock().is_idle());
            Arc::clone(runtimes.entry(runtime).or_insert_with(|| {
                Arc::new(Shared {
                    driver: Arc::clone(&self.driver),
                    schedule: Mutex::default(),
                    woken: Notify::new(),
                })
            }))
        };
        shared.keep(lease, sent)
    }
}

impl Shared {
    fn keep(self: &Arc<Self>, lease: &Arc<Lease>, sent: Stamp) -> KeptLease {
        let next_renewal = sent.at + interval(lease.ttl);
        let mut schedule = self.lock();
        let id = schedule.next_id;
        schedule.next_id += 1;
        schedule.kept.insert(
            id,
            Kept {
                lease: Arc::clone(lease),
                wake: next_renewal,
                next_renewal,
                renewing: false,
            },
        );
        schedule.wakes.insert((next_renewal, id));
        schedule.max_slack = schedule.max_slack.max(slack(lease.ttl));
        let running = schedule.task.as_ref().is_some_and(|t| !t.is_finished());
        if !running {
            schedule.asleep_until = None;
            schedule.task = Some(tokio::spawn(run(Arc::clone(self))));
        } else if schedule.asleep_until.is_some_and(|at| next_renewal < at) {
            self.woken.notify_one();
        }
        KeptLease {
            shared: Arc::clone(self),
            id,
        }
    }
}

async fn run(shared: Arc<Shared>) {
    while let Some(next) = shared.scan() {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shared.woken.notified() => {}
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Schedule> {
        // The schedule is consistent after every statement that can panic, so a poisoned lock is
        // still usable.
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Declares the leases whose deadline passed lost, sends the renewals that are due (with those
    /// due soon), and says when to look again; `None` when no lease is kept, and the task ends.
    fn scan(self: &Arc<Self>) -> Option<Instant> {
        let now = Instant::now();
        let mut schedule = self.lock();
        let horizon = now + schedule.max_slack;
        let candidates: Vec<(Instant, u64)> = schedule
            .wakes
            .range(..=(horizon, u64::MAX))
            .copied()
            .collect();
        let mut batch = Vec::new();
        for (wake, id) in candidates {
            let Some(kept) = schedule.kept.get_mut(&id) else {
                continue;
            };
            let lease = Arc::clone(&kept.lease);
            let valid_until = lease.status().valid_until;
            if now >= valid_until {
                lease.declare_lost("no renewal was confirmed before the validity deadline");
                schedule.forget(id);
                continue;
            }
            if !lease.boot_window_open() {
                lease.declare_lost("the host was suspended past the validity deadline");
                schedule.forget(id);
                continue;
            }
            if kept.renewing {
                if wake <= now {
                    schedule.reschedule(id, valid_until);
                }
                continue;
            }
            if kept.next_renewal <= now + slack(lease.ttl) {
                kept.renewing = true;
                schedule.reschedule(id, valid_until);
                batch.push((id, lease));
            }
        }
        for chunk in batch.chunks(BATCH_LIMIT) {
            tokio::spawn(Arc::clone(self).renew(chunk.to_vec()));
        }
        if schedule.kept.is_empty() {
            schedule.task = None;
            schedule.asleep_until = None;
            return None;
        }
        let next = schedule.wakes.first().map(|&(at, _)| at)?;
        schedule.asleep_until = Some(next);
        Some(next)
    }

    /// Renews one batch and schedules what follows for each of its leases.
    async fn renew(self: Arc<Self>, batch: Vec<(u64, Arc<Lease>)>) {
        let attempt = Stamp::now();
        let sent = attempt.at;
        // One attempt may take until the next renewal would be due: a reply that never comes (lost on
        // the way) then costs a retry, not the lock.
        let deadline = batch
            .iter()
            .map(|(_, lease)| lease.status().valid_until.min(sent + interval(lease.ttl)))
            .min()
            .unwrap_or(sent);
        let renewals: Vec<Renewal<'_>> = batch
            .iter()
            .map(|(_, lease)| Renewal {
                key: &lease.key,
                ttl: lease.ttl,
            })
            .collect();
        let answers = tokio::time::timeout_at(deadline, self.driver.renew_many(&renewals)).await;
        drop(renewals);
        let now = Instant::now();
        let mut failed = 0usize;
        let mut first_error = None;
        let mut schedule = self.lock();
        for (i, (id, lease)) in batch.iter().enumerate() {
            if !schedule.kept.contains_key(id) {
                continue;
            }
            let driver = lease.driver_name;
            let next = match answers.as_ref().map(|answers| answers.get(i)) {
                Ok(Some(Ok(store_sent))) => {
                    metrics::counter!(m::RENEWALS_TOTAL, "driver" => driver, "outcome" => "ok")
                        .increment(1);
                    let from = (*store_sent).min(sent);
                    lease.confirm(attempt, from);
                    from + interval(lease.ttl)
                }
                Ok(Some(Err(err))) if err.is_lost() => {
                    lease.declare_lost("the store no longer has the entry");
                    schedule.forget(*id);
                    continue;
                }
                Ok(answer) => {
                    metrics::counter!(m::RENEWALS_TOTAL, "driver" => driver, "outcome" => "error")
                        .increment(1);
                    failed += 1;
                    if first_error.is_none() {
                        first_error = Some(match answer {
                            Some(Err(err)) => err.to_string(),
                            _ => format!(
                                "the driver answered {} of {} renewals",
                                answers.as_ref().map_or(0, Vec::len),
                                batch.len()
                            ),
                        });
                    }
                    lease.set_state(LeaseState::Suspect);
                    now + retry(lease.ttl)
                }
                Err(_) if now >= lease.status().valid_until => {
                    lease.declare_lost(
                        "the store did not confirm a renewal before the validity deadline",
                    );
                    schedule.forget(*id);
                    continue;
                }
                Err(_) => {
                    metrics::counter!(m::RENEWALS_TOTAL, "driver" => driver, "outcome" => "timeout")
                        .increment(1);
                    lease.set_state(LeaseState::Suspect);
                    now
                }
            };
            if let Some(kept) = schedule.kept.get_mut(id) {
                kept.renewing = false;
                kept.next_renewal = next;
            }
            schedule.reschedule(*id, next.min(lease.status().valid_until));
        }
        let earliest = schedule.wakes.first().map(|&(at, _)| at);
        let wake_task = match (earliest, schedule.asleep_until) {
            (Some(earliest), Some(asleep_until)) => earliest < asleep_until,
            _ => false,
        };
        drop(schedule);
        if let Some(error) = first_error {
            tracing::warn!(failed, of = batch.len(), %error, "dlock: lease renewals failed; retrying");
        }
        if answers.is_err() {
            tracing::warn!(
                of = batch.len(),
                "dlock: lease renewals went unanswered; retrying"
            );
        }
        if wake_task {
            self.woken.notify_one();
        }
    }
}
