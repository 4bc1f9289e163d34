//! A majority quorum over independent lock stores, itself a [`Driver`].
//!
//! [`Quorum::new`] wraps an odd number (at least three) of drivers of any kind — three standalone
//! Redis servers, or Redis, etcd and NATS side by side — and grants a lock only when a majority of
//! them (`N/2 + 1`) grant it. Two majorities always share a member, and no member grants two
//! incompatible modes at once, so no two incompatible modes ever hold a majority at once: losing,
//! pausing or restarting a minority of the members changes nothing for the locks.
//!
//! # How a request is decided
//!
//! 1. **Fast path.** The request is sent to every member at once as a `try_acquire`. If a majority
//!    grant it, the quorum holds it; what the other members answered is released.
//! 2. **Step back, then go up.** Otherwise everything it took is released at once (nothing is held
//!    on a minority while waiting) and, for a blocking request, the quorum queues at the members one
//!    by one *in member order*: it waits in line at the first member, and only once granted there
//!    moves on to the next, until a majority has granted it. A member that fails or stops answering is
//!    skipped for good, never gone back to.
//!
//! **No deadlock, no livelock.** A request waits at member `k` only while it holds members below `k`,
//! and the fast path never waits while holding. A holder that blocks a waiter at `k` is therefore
//! either not waiting at all or waiting at a member above `k`, and inside one member waiters only wait
//! for earlier entries: every chain of waits climbs, so it ends, and the request at its end is granted
//! (FIFO in every member). With three clients each granted by a different member, all three step back
//! and queue at the first member, whose FIFO order then decides.
//!
//! **Order.** Each member is FIFO. Waiting requests are granted in the order they queued at the first
//! member that answered them; a request that finds a majority free takes it on the fast path even if
//! others wait at the first member (it cannot pass a waiter *at a member where that waiter waits*).
//!
//! # Leases
//!
//! Renewals and releases go to every member that has the entry. A renewal counts from the send time
//! of the renewal that a majority of the holding members confirmed (the majority-th latest), so the
//! guard's validity window ends before a majority of members could drop the entry; with fewer than a
//! majority confirming, the renewal fails and the guard turns Lost at the end of its window. Releases
//! that a member missed are retried in the background on that member for up to one TTL.
//!
//! # Fencing
//!
//! Members' own tokens cannot be compared (a Redis clock, an etcd revision, a NATS sequence), so the
//! quorum keeps its own in the members' *fence registers* ([`Driver::raise_fence`]). Once a majority
//! `S` has granted, it reads the register on every member of `S`, takes one more than the highest
//! value, writes that to every member of `S` and only then returns the grant. A later conflicting
//! grant on a majority `S'` is granted on a member of `S ∩ S'` only after this grant was released
//! there, so after the write, and it reads a value at least as high: **tokens strictly increase
//! along conflicting grants**, whatever members were lost or came back — provided every member keeps
//! its grants and its register across a restart (Redis with `appendfsync always`; etcd and JetStream
//! always do). A member that forgets its state on restart must stay down for one TTL, as with any
//! quorum lock. Compatible grants may share a token. Each grant costs two more round trips to its
//! majority (read the registers, write the token).
//!
//! # Conversion
//!
//! A conversion is asked of every member holding the entry. A down-conversion is granted at once; an
//! up-conversion is granted once a majority granted it (the rest are withdrawn there and keep the old
//! mode). If any member refuses it as a [`ConversionDeadlock`](Error::ConversionDeadlock), it is
//! withdrawn everywhere and refused: through a quorum, *both* of two crossing up-conversions may be
//! refused, since members may disagree on which came second. Every granted conversion gets a new
//! token, as a grant does.
//!
//! # Failures
//!
//! Every member call is bounded by a quarter of the TTL (at least 50 ms). [`Quorum::inspect_members`]
//! shows each member's own view of a name; the counter `dlock_quorum_member_errors_total{member, op}`
//! counts member failures.
//!
//! ```
//! use dlock_core::{Locks, LockMode, MemoryDriver, Quorum};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> dlock_core::Result<()> {
//! let quorum = Quorum::new([MemoryDriver::new(), MemoryDriver::new(), MemoryDriver::new()])?;
//! let locks = Locks::new(quorum);
//! let guard = locks.lock("stock/42").mode(LockMode::PW).await?;
//! let next = locks.lock("stock/42").mode(LockMode::CR).try_acquire().await?;
//! assert!(next.fencing_token() > guard.fencing_token());
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::driver::{
    Capabilities, Driver, Enqueued, EntryInfo, EntryKey, EntryRequest, Grant, OwnerId, Queued,
};
use crate::lease::DequeueOnDrop;
use crate::{Error, LockMode, LockName, Result};

const DRIVER: &str = "quorum";

/// Counter of failed member calls, labelled `member` (its position and driver) and `op`.
pub const MEMBER_ERRORS_TOTAL: &str = "dlock_quorum_member_errors_total";

/// How long [`Quorum::inspect_members`] (and the quorum's `inspect`) waits for a member.
pub const INSPECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A majority quorum over independent drivers; see the [module docs](self).
#[derive(Clone)]
pub struct Quorum {
    inner: Arc<Inner>,
}

struct Inner {
    members: Vec<Member>,
    majority: usize,
    capabilities: Capabilities,
    entries: Mutex<HashMap<EntryKey, Arc<Tracked>>>,
}

struct Member {
    driver: Arc<dyn Driver>,
    label: String,
}

/// What the quorum knows of one entry.
struct Tracked {
    state: Mutex<State>,
    /// Bumped when a member is found failing, so a request waiting there moves on.
    failures: watch::Sender<u64>,
}

struct State {
    request: EntryRequest,
    slots: Vec<Slot>,
    /// Members given up on for this entry (failed or unanswered).
    failed: Vec<bool>,
    /// The next member the ordered phase may queue at; it only grows.
    cursor: usize,
    /// The grant the quorum holds, once it holds one.
    grant: Option<Grant>,
    /// A pending up-conversion's target.
    converting: Option<LockMode>,
}

/// The entry on one member, as far as the quorum knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Absent,
    Queued,
    /// Granted, in at least this mode.
    Held(LockMode),
    /// A call failed: the entry may or may not be there.
    Unknown,
}

impl Slot {
    fn present(self) -> bool {
        self != Slot::Absent
    }
}

/// Each member's own view of one name, from [`Quorum::inspect_members`].
#[derive(Debug)]
pub struct MemberView {
    /// The member's position and driver, e.g. `1:redis`.
    pub member: String,
    /// What it reported.
    pub entries: Result<Vec<EntryInfo>>,
}

impl Quorum {
    /// A quorum over `members`: an odd number, at least three. Its modes are those every member
    /// supports, and it claims fencing only if every member claims it.
    pub fn new<D: Driver>(members: impl IntoIterator<Item = D>) -> Result<Self> {
        Self::from_arcs(
            members
                .into_iter()
                .map(|d| Arc::new(d) as Arc<dyn Driver>)
                .collect(),
        )
    }

    /// A quorum over shared drivers (of any kinds).
    pub fn from_arcs(members: Vec<Arc<dyn Driver>>) -> Result<Self> {
        if members.len() < 3 || members.len().is_multiple_of(2) {
            return Err(Error::Unsupported {
                driver: DRIVER,
                what: format!(
                    "a quorum of {} members; use an odd number, at least three, so that any two majorities share a member",
                    members.len()
                ),
            });
        }
        let member_caps: Vec<Capabilities> = members.iter().map(|m| m.capabilities()).collect();
        let mut caps = Capabilities::new(DRIVER);
        caps.modes = LockMode::ALL
            .into_iter()
            .filter(|m| member_caps.iter().all(|c| c.modes.contains(m)))
            .collect();
        caps.fencing = member_caps.iter().all(|c| c.fencing);
        caps.per_request_ttl = member_caps.iter().all(|c| c.per_request_ttl);
        caps.conversion = member_caps.iter().all(|c| c.conversion);
        caps.shared_between_processes = member_caps.iter().all(|c| c.shared_between_processes);
        caps.min_ttl = member_caps
            .iter()
            .map(|c| c.min_ttl)
            .max()
            .unwrap_or_default();
        let members = members
            .into_iter()
            .zip(&member_caps)
            .enumerate()
            .map(|(i, (driver, c))| Member {
                driver,
                label: format!("{i}:{}", c.driver),
            })
            .collect::<Vec<_>>();
        Ok(Quorum {
            inner: Arc::new(Inner {
                majority: members.len() / 2 + 1,
                members,
                capabilities: caps,
                entries: Mutex::default(),
            }),
        })
    }

    /// How many members must agree.
    pub fn majority(&self) -> usize {
        self.inner.majority
    }

    /// Each member's own view of `name`'s queue, in member order; a member that does not answer
    /// within [`INSPECT_TIMEOUT`] is reported as failed.
    pub async fn inspect_members(&self, name: &LockName) -> Vec<MemberView> {
        let views = join_all(self.inner.members.iter().map(|m| async {
            tokio::time::timeout(INSPECT_TIMEOUT, m.driver.inspect(name))
                .await
                .unwrap_or_else(|_| {
                    Err(Error::backend_msg(
                        DRIVER,
                        format!(
                            "member {} did not answer within {INSPECT_TIMEOUT:?}",
                            m.label
                        ),
                    ))
                })
        }))
        .await;
        self.inner
            .members
            .iter()
            .zip(views)
            .map(|(m, entries)| MemberView {
                member: m.label.clone(),
                entries,
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Updates under these locks are plain assignments, so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn member_timeout(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_millis(50))
}

/// One member call, bounded: a member that does not answer within `limit` is an error like any other.
async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(Error::backend_msg(
            DRIVER,
            format!("the member did not answer within {limit:?}"),
        ))
    })
}

impl Inner {
    fn tracked(&self, key: &EntryKey) -> Option<Arc<Tracked>> {
        lock(&self.entries).get(key).cloned()
    }

    fn count_error(&self, member: usize, op: &'static str, err: &dyn std::fmt::Display) {
        let label = self.members[member].label.clone();
        tracing::debug!(member = %label, op, error = %err, "dlock quorum: a member call failed");
        metrics::counter!(MEMBER_ERRORS_TOTAL, "driver" => DRIVER, "member" => label, "op" => op)
            .increment(1);
    }

    async fn call<T>(
        &self,
        ttl: Duration,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        bounded(member_timeout(ttl), fut).await
    }

    /// Marks `member` failed for `entry` and wakes a request waiting there.
    fn fail(&self, entry: &Tracked, member: usize) {
        lock(&entry.state).failed[member] = true;
        entry.failures.send_modify(|n| *n += 1);
    }

    /// Releases the entry on `members`, returning how many confirmed once `enough` of them did (or
    /// all answered): a frozen member must not hold up the caller. Members that miss it, now or after
    /// the return, are retried in the background for up to one TTL.
    async fn release_on(
        &self,
        key: &EntryKey,
        ttl: Duration,
        members: &[usize],
        enough: usize,
    ) -> usize {
        let limit = member_timeout(ttl);
        let mut calls: FuturesUnordered<_> = members
            .iter()
            .map(|&i| {
                let (driver, key) = (Arc::clone(&self.members[i].driver), key.clone());
                async move { (i, bounded(limit, driver.release(&key)).await) }
            })
            .collect();
        let mut released = 0;
        while released < enough {
            let Some((i, answer)) = calls.next().await else {
                break;
            };
            match answer {
                Ok(()) => released += 1,
                Err(err) => {
                    self.count_error(i, "release", &err);
                    self.release_later(i, key.clone(), ttl);
                }
            }
        }
        if !calls.is_empty() {
            let drivers: Vec<Arc<dyn Driver>> =
                self.members.iter().map(|m| Arc::clone(&m.driver)).collect();
            let key = key.clone();
            tokio::spawn(async move {
                while let Some((i, answer)) = calls.next().await {
                    if !matches!(answer, Ok(())) {
                        release_later(Arc::clone(&drivers[i]), key.clone(), ttl);
                    }
                }
            });
        }
        released
    }

    fn release_later(&self, member: usize, key: EntryKey, ttl: Duration) {
        release_later(Arc::clone(&self.members[member].driver), key, ttl);
    }

    /// Gives `members`, which granted, one token above every fence register among them.
    async fn fence(&self, name: &LockName, ttl: Duration, members: &[usize]) -> Result<u64> {
        if !self.capabilities.fencing {
            return Ok(0);
        }
        let read = join_all(
            members
                .iter()
                .map(|&i| self.call(ttl, self.members[i].driver.raise_fence(name, 0))),
        )
        .await;
        let (mut highest, mut read_from) = (0, 0);
        for (&i, answer) in members.iter().zip(read) {
            match answer {
                Ok(value) => {
                    highest = highest.max(value);
                    read_from += 1;
                }
                Err(err) => self.count_error(i, "fence", &err),
            }
        }
        // Any majority of the members holding this grant shares a member with the majority that
        // wrote the previous conflicting token there, before that grant was released.
        if read_from < self.majority {
            return Err(no_fence(name));
        }
        let token = highest + 1;
        let written = join_all(
            members
                .iter()
                .map(|&i| self.call(ttl, self.members[i].driver.raise_fence(name, token))),
        )
        .await;
        let mut confirmed = 0;
        for (&i, answer) in members.iter().zip(written) {
            match answer {
                Ok(value) if value == token => confirmed += 1,
                Ok(higher) => {
                    // A concurrent compatible grant raised it further: still at least our token.
                    debug_assert!(higher > token);
                    confirmed += 1;
                }
                Err(err) => self.count_error(i, "fence", &err),
            }
        }
        if confirmed < self.majority {
            return Err(no_fence(name));
        }
        Ok(token)
    }
}

/// Retries the release of `key` on one member in the background, for up to one TTL (after which the
/// member's lease has dropped the entry anyway).
fn release_later(driver: Arc<dyn Driver>, key: EntryKey, ttl: Duration) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let give_up = Instant::now() + ttl;
            let mut backoff = Duration::from_millis(20);
            while Instant::now() < give_up {
                match bounded(member_timeout(ttl), driver.release(&key)).await {
                    Ok(()) => return,
                    _ => tokio::time::sleep(backoff).await,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        });
    }
}

fn no_fence(name: &LockName) -> Error {
    Error::backend_msg(
        DRIVER,
        format!(
            "could not write the fencing token of lock {:?} to a majority of the members; the grant was given back",
            name.as_str()
        ),
    )
}

fn no_majority(name: &LockName, answered: usize, of: usize) -> Error {
    Error::backend_msg(
        DRIVER,
        format!(
            "only {answered} of {of} members can still grant lock {:?}, fewer than a majority; check the members' health",
            name.as_str()
        ),
    )
}

impl Quorum {
    fn held_members(state: &State) -> Vec<usize> {
        (0..state.slots.len())
            .filter(|&i| matches!(state.slots[i], Slot::Held(_)))
            .collect()
    }

    /// Completes a grant on `held`: releases the members outside it, writes the token.
    async fn finish_grant(&self, entry: &Tracked, held: Vec<usize>) -> Result<Grant> {
        let inner = &*self.inner;
        let (key, ttl, mode, strays) = {
            let state = lock(&entry.state);
            let strays: Vec<usize> = (0..state.slots.len())
                .filter(|&i| {
                    matches!(state.slots[i], Slot::Queued | Slot::Unknown) && !held.contains(&i)
                })
                .collect();
            (
                state.request.key.clone(),
                state.request.ttl,
                state.request.mode,
                strays,
            )
        };
        for &i in &strays {
            inner.release_later(i, key.clone(), ttl);
            lock(&entry.state).slots[i] = Slot::Absent;
        }
        match inner.fence(&key.name, ttl, &held).await {
            Ok(token) => {
                let grant = Grant { mode, token };
                lock(&entry.state).grant = Some(grant);
                Ok(grant)
            }
            Err(err) => {
                let present = present_members(&entry.state);
                inner.release_on(&key, ttl, &present, present.len()).await;
                lock(&inner.entries).remove(&key);
                Err(err)
            }
        }
    }

    /// The ordered phase: queue at the members one by one, in member order, until a majority grants.
    async fn climb(&self, entry: &Tracked) -> Result<Grant> {
        let inner = &*self.inner;
        let n = inner.members.len();
        loop {
            let held = Self::held_members(&lock(&entry.state));
            if held.len() >= inner.majority {
                return self.finish_grant(entry, held).await;
            }
            let (next, request) = {
                let mut state = lock(&entry.state);
                while state.cursor < n
                    && (state.failed[state.cursor]
                        || matches!(state.slots[state.cursor], Slot::Held(_)))
                {
                    state.cursor += 1;
                }
                let candidates = (state.cursor..n).filter(|&i| !state.failed[i]).count();
                if held.len() + candidates < inner.majority {
                    return Err(no_majority(
                        &state.request.key.name,
                        held.len() + candidates,
                        n,
                    ));
                }
                let request = EntryRequest {
                    wait: true,
                    ..state.request.clone()
                };
                (state.cursor, request)
            };
            let member = &inner.members[next].driver;
            // A cancelled climb must not leave what the member queued behind: the quorum's
            // release only knows the members that answered.
            let mut step = DequeueOnDrop::send(Arc::clone(member), request.clone());
            let answered = inner.call(request.ttl, step.answer()).await;
            step.disarm();
            let queued = match answered {
                Ok(enqueued) => enqueued.queued,
                Err(err) => {
                    inner.count_error(next, "enqueue", &err);
                    lock(&entry.state).slots[next] = Slot::Unknown;
                    inner.fail(entry, next);
                    inner.release_later(next, request.key.clone(), request.ttl);
                    continue;
                }
            };
            let grant = match queued {
                Queued::Granted(grant) => Ok(grant),
                Queued::Waiting => {
                    lock(&entry.state).slots[next] = Slot::Queued;
                    let mut failures = entry.failures.subscribe();
                    let failed_here = async {
                        let _ = failures.wait_for(|_| lock(&entry.state).failed[next]).await;
                    };
                    tokio::select! {
                        grant = member.wait(&request.key) => grant,
                        _ = failed_here => Err(Error::backend_msg(DRIVER, "the member stopped answering renewals")),
                    }
                }
            };
            match grant {
                Ok(grant) => lock(&entry.state).slots[next] = Slot::Held(grant.mode),
                Err(err) => {
                    inner.count_error(next, "wait", &err);
                    lock(&entry.state).slots[next] = Slot::Unknown;
                    inner.fail(entry, next);
                    inner.release_later(next, request.key.clone(), request.ttl);
                }
            }
        }
    }

    /// Waits until a majority granted the pending conversion to `target`, then withdraws it on the
    /// other members.
    async fn await_conversion(&self, entry: &Tracked, target: LockMode) -> Result<Grant> {
        let inner = &*self.inner;
        let (key, ttl, pending) = {
            let state = lock(&entry.state);
            let pending: Vec<usize> = (0..state.slots.len())
                .filter(
                    |&i| matches!(state.slots[i], Slot::Held(m) if !target.is_weaker_or_equal(m)),
                )
                .collect();
            (state.request.key.clone(), state.request.ttl, pending)
        };
        let mut waits: FuturesUnordered<_> = pending
            .iter()
            .map(|&i| {
                let key = key.clone();
                async move { (i, inner.members[i].driver.wait(&key).await) }
            })
            .collect();
        loop {
            let converted = {
                let state = lock(&entry.state);
                (0..state.slots.len())
                    .filter(|&i| matches!(state.slots[i], Slot::Held(m) if target.is_weaker_or_equal(m)))
                    .count()
            };
            if converted >= inner.majority {
                break;
            }
            match waits.next().await {
                Some((i, Ok(grant))) if target.is_weaker_or_equal(grant.mode) => {
                    lock(&entry.state).slots[i] = Slot::Held(grant.mode);
                }
                Some((i, Ok(_))) => {
                    inner.count_error(i, "convert", &"the conversion was withdrawn")
                }
                Some((i, Err(err))) => {
                    inner.count_error(i, "convert", &err);
                    if err.is_lost() {
                        lock(&entry.state).slots[i] = Slot::Absent;
                    }
                }
                None => {
                    return Err(no_majority(&key.name, converted, inner.members.len()));
                }
            }
        }
        drop(waits);
        self.withdraw_pending(entry).await;
        let held: Vec<usize> = {
            let state = lock(&entry.state);
            (0..state.slots.len())
                .filter(
                    |&i| matches!(state.slots[i], Slot::Held(m) if target.is_weaker_or_equal(m)),
                )
                .collect()
        };
        let token = inner.fence(&key.name, ttl, &held).await?;
        let grant = Grant {
            mode: target,
            token,
        };
        let mut state = lock(&entry.state);
        state.grant = Some(grant);
        state.converting = None;
        state.request.mode = target;
        Ok(grant)
    }

    /// Withdraws a pending conversion on the members that have not granted it: they keep the mode
    /// the quorum held before.
    async fn withdraw_pending(&self, entry: &Tracked) {
        let inner = &*self.inner;
        let (key, ttl, old, target, pending) = {
            let state = lock(&entry.state);
            let Some(target) = state.converting else {
                return;
            };
            let old = state.grant.map_or(state.request.mode, |g| g.mode);
            let pending: Vec<usize> = (0..state.slots.len())
                .filter(
                    |&i| matches!(state.slots[i], Slot::Held(m) if !target.is_weaker_or_equal(m)),
                )
                .collect();
            (
                state.request.key.clone(),
                state.request.ttl,
                old,
                target,
                pending,
            )
        };
        let _ = target;
        let answers = join_all(
            pending
                .iter()
                .map(|&i| inner.call(ttl, inner.members[i].driver.convert(&key, old))),
        )
        .await;
        for (&i, answer) in pending.iter().zip(answers) {
            if !matches!(answer, Ok(Queued::Granted(_))) {
                inner.count_error(i, "convert", &"withdrawing a pending conversion failed");
                // The member holds at least the old mode either way; only its renewals tell more.
            }
        }
    }
}

fn present_members(state: &Mutex<State>) -> Vec<usize> {
    let state = lock(state);
    (0..state.slots.len())
        .filter(|&i| state.slots[i].present())
        .collect()
}

#[async_trait]
impl Driver for Quorum {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities.clone()
    }

    async fn enqueue(&self, request: &EntryRequest) -> Result<Enqueued> {
        let inner = &*self.inner;
        let n = inner.members.len();
        if let Some(existing) = inner.tracked(&request.key) {
            // A retried enqueue (its caller lost the first answer): answer from what the quorum
            // already knows. Core never retries one (it gives a failed enqueue back instead), so no
            // lock's validity counts from this answer.
            let state = lock(&existing.state);
            return Ok(state.grant.map_or(Queued::Waiting, Queued::Granted).into());
        }
        let entry = Arc::new(Tracked {
            state: Mutex::new(State {
                request: request.clone(),
                slots: vec![Slot::Absent; n],
                failed: vec![false; n],
                cursor: 0,
                grant: None,
                converting: None,
            }),
            failures: watch::channel(0).0,
        });
        lock(&inner.entries).insert(request.key.clone(), Arc::clone(&entry));
        let attempt = EntryRequest {
            wait: false,
            ..request.clone()
        };
        let limit = member_timeout(request.ttl);
        let mut calls: FuturesUnordered<_> = (0..n)
            .map(|i| {
                let (driver, attempt) = (Arc::clone(&inner.members[i].driver), attempt.clone());
                async move { (i, bounded(limit, driver.enqueue(&attempt)).await) }
            })
            .collect();
        let mut unreachable = 0;
        let mut granted = 0;
        // The earliest instant from which a holding member keeps the entry, where a member keeps
        // it from before its enqueue (see [`Enqueued::kept_from`]).
        let mut kept_from: Option<Instant> = None;
        while granted < inner.majority {
            let Some((i, answer)) = calls.next().await else {
                break;
            };
            if let Ok(Enqueued {
                queued: Queued::Granted(_),
                kept_from: Some(member_kept_from),
            }) = answer
            {
                kept_from = Some(kept_from.map_or(member_kept_from, |k| k.min(member_kept_from)));
            }
            {
                let mut state = lock(&entry.state);
                state.slots[i] = match answer.map(|enqueued| enqueued.queued) {
                    Ok(Queued::Granted(grant)) => Slot::Held(grant.mode),
                    // A driver must not queue a try; treat it as queued so it is released.
                    Ok(Queued::Waiting) => Slot::Queued,
                    Err(Error::WouldBlock { .. }) => Slot::Absent,
                    Err(err) => {
                        inner.count_error(i, "enqueue", &err);
                        unreachable += 1;
                        Slot::Unknown
                    }
                };
                granted += usize::from(matches!(state.slots[i], Slot::Held(_)));
            }
        }
        if !calls.is_empty() {
            // A majority granted before these answered: a slow or frozen member does not hold up the
            // grant. A late grant still joins the holding (it lets the lock survive the loss of
            // another member); anything else it took, or anything taken after the release, is given
            // back.
            let (quorum, entry, key) = (
                Arc::clone(&self.inner),
                Arc::clone(&entry),
                request.key.clone(),
            );
            tokio::spawn(async move {
                while let Some((i, answer)) = calls.next().await {
                    let ttl = lock(&entry.state).request.ttl;
                    let joined = match answer.map(|enqueued| enqueued.queued) {
                        Ok(Queued::Granted(grant)) => {
                            // Under the entries lock, so a release either sees this slot or has
                            // already removed the entry (and the grant is given back below).
                            let entries = lock(&quorum.entries);
                            let tracked = entries.contains_key(&key);
                            if tracked {
                                lock(&entry.state).slots[i] = Slot::Held(grant.mode);
                            }
                            tracked
                        }
                        Err(Error::WouldBlock { .. }) => true,
                        _ => false,
                    };
                    if !joined {
                        quorum.release_later(i, key.clone(), ttl);
                    }
                }
            });
        }
        let held = Self::held_members(&lock(&entry.state));
        if held.len() >= inner.majority {
            let grant = self.finish_grant(&entry, held).await?;
            return Ok(Enqueued {
                queued: Queued::Granted(grant),
                kept_from,
            });
        }
        // Step back: hold nothing on a minority while waiting (see the module docs).
        let present = present_members(&entry.state);
        inner
            .release_on(&request.key, request.ttl, &present, present.len())
            .await;
        {
            let mut state = lock(&entry.state);
            for i in present {
                state.slots[i] = Slot::Absent;
            }
        }
        if !request.wait && n - unreachable < inner.majority {
            lock(&inner.entries).remove(&request.key);
            return Err(no_majority(&request.key.name, n - unreachable, n));
        }
        if !request.wait {
            lock(&inner.entries).remove(&request.key);
            return Err(Error::WouldBlock {
                name: request.key.name.to_string(),
            });
        }
        Ok(Queued::Waiting.into())
    }

    async fn wait(&self, key: &EntryKey) -> Result<Grant> {
        let entry = self.inner.tracked(key).ok_or_else(|| Error::Lost {
            name: key.name.to_string(),
        })?;
        let (grant, converting) = {
            let state = lock(&entry.state);
            (state.grant, state.converting)
        };
        match (grant, converting) {
            (Some(_), Some(target)) => self.await_conversion(&entry, target).await,
            (Some(grant), None) => Ok(grant),
            (None, _) => self.climb(&entry).await,
        }
    }

    async fn renew(&self, key: &EntryKey, ttl: Duration) -> Result<Instant> {
        let inner = &*self.inner;
        let entry = inner.tracked(key).ok_or_else(|| Error::Lost {
            name: key.name.to_string(),
        })?;
        let present = present_members(&entry.state);
        if present.is_empty() {
            // Between stepping back and queueing again: nothing to renew yet, nothing to lose.
            return Ok(Instant::now());
        }
        let answers = join_all(
            present
                .iter()
                .map(|&i| inner.call(ttl, inner.members[i].driver.renew(key, ttl))),
        )
        .await;
        let mut confirmed: Vec<(usize, Instant)> = Vec::new();
        let mut lost = 0;
        for (&i, answer) in present.iter().zip(answers) {
            match answer {
                Ok(sent) => confirmed.push((i, sent)),
                Err(err) if err.is_lost() => {
                    lost += 1;
                    lock(&entry.state).slots[i] = Slot::Absent;
                    inner.fail(&entry, i);
                }
                Err(err) => {
                    inner.count_error(i, "renew", &err);
                    inner.fail(&entry, i);
                }
            }
        }
        let state = lock(&entry.state);
        match state.grant {
            Some(grant) => {
                // Only members holding at least the quorum's mode keep out what that mode keeps out.
                let mut counted: Vec<Instant> = confirmed
                    .iter()
                    .filter(|(i, _)| {
                        matches!(state.slots[*i], Slot::Held(m) if grant.mode.is_weaker_or_equal(m))
                    })
                    .map(|&(_, sent)| sent)
                    .collect();
                if counted.len() >= inner.majority {
                    counted.sort_unstable_by(|a, b| b.cmp(a));
                    return Ok(counted[inner.majority - 1]);
                }
                let n = inner.members.len();
                if lost > n - inner.majority {
                    return Err(Error::Lost {
                        name: key.name.to_string(),
                    });
                }
                Err(Error::backend_msg(
                    DRIVER,
                    format!(
                        "only {} of {n} members confirmed the renewal of lock {:?}, fewer than a majority",
                        counted.len(),
                        key.name.as_str()
                    ),
                ))
            }
            None => match confirmed.iter().map(|&(_, sent)| sent).min() {
                Some(sent) => Ok(sent),
                None if lost == present.len() => Err(Error::Lost {
                    name: key.name.to_string(),
                }),
                None => Err(Error::backend_msg(
                    DRIVER,
                    format!(
                        "no member confirmed the renewal of queued lock {:?}",
                        key.name.as_str()
                    ),
                )),
            },
        }
    }

    async fn release(&self, key: &EntryKey) -> Result<()> {
        let inner = &*self.inner;
        let tracked = lock(&inner.entries).remove(key);
        let (members, ttl) = match &tracked {
            Some(entry) => {
                let state = lock(&entry.state);
                (
                    (0..state.slots.len())
                        .filter(|&i| state.slots[i].present())
                        .collect::<Vec<_>>(),
                    state.request.ttl,
                )
            }
            // Unknown here (released already, or by another client object): ask every member.
            None => ((0..inner.members.len()).collect(), crate::DEFAULT_TTL),
        };
        if let Some(entry) = &tracked {
            // A request climbing the members must stop.
            let mut state = lock(&entry.state);
            state.failed.iter_mut().for_each(|f| *f = true);
            drop(state);
            entry.failures.send_modify(|n| *n += 1);
        }
        // Done once a majority confirmed (or every member asked): a frozen member must not hold up
        // the release; it is retried there in the background.
        let enough = inner.majority.min(members.len());
        let released = inner.release_on(key, ttl, &members, enough).await;
        if released >= enough {
            Ok(())
        } else {
            Err(Error::backend_msg(
                DRIVER,
                format!(
                    "only {released} of the {} members holding lock {:?} confirmed its release; the others are retried",
                    members.len(),
                    key.name.as_str()
                ),
            ))
        }
    }

    async fn convert(&self, key: &EntryKey, mode: LockMode) -> Result<Queued> {
        let inner = &*self.inner;
        let entry = inner.tracked(key).ok_or_else(|| Error::Lost {
            name: key.name.to_string(),
        })?;
        let (held_mode, holders, ttl) = {
            let state = lock(&entry.state);
            let Some(grant) = state.grant else {
                return Err(Error::backend_msg(
                    DRIVER,
                    format!(
                        "cannot convert lock {:?}: it is not granted yet",
                        key.name.as_str()
                    ),
                ));
            };
            let holders: Vec<usize> = (0..state.slots.len())
                .filter(|&i| matches!(state.slots[i], Slot::Held(_)))
                .collect();
            (grant.mode, holders, state.request.ttl)
        };
        let answers = join_all(
            holders
                .iter()
                .map(|&i| inner.call(ttl, inner.members[i].driver.convert(key, mode))),
        )
        .await;
        let mut deadlock = false;
        let mut uncertain = false;
        {
            let mut state = lock(&entry.state);
            for (&i, answer) in holders.iter().zip(answers) {
                match answer {
                    Ok(Queued::Granted(grant)) => state.slots[i] = Slot::Held(grant.mode),
                    Ok(Queued::Waiting) => {}
                    Err(Error::ConversionDeadlock { .. }) => deadlock = true,
                    Err(err) => {
                        inner.count_error(i, "convert", &err);
                        uncertain = true;
                        // Whatever it settled on, it holds at least the meet of the two modes.
                        if let Slot::Held(m) = state.slots[i] {
                            state.slots[i] = Slot::Held(m.meet(mode));
                        }
                    }
                }
            }
            state.converting = (!mode.is_weaker_or_equal(held_mode)).then_some(mode);
        }
        if deadlock {
            self.withdraw_pending(&entry).await;
            let mut state = lock(&entry.state);
            state.converting = None;
            return Err(Error::ConversionDeadlock {
                name: key.name.to_string(),
                from: held_mode,
                to: mode,
            });
        }
        if mode.is_weaker_or_equal(held_mode) {
            let held: Vec<usize> = {
                let state = lock(&entry.state);
                (0..state.slots.len())
                    .filter(
                        |&i| matches!(state.slots[i], Slot::Held(m) if mode.is_weaker_or_equal(m)),
                    )
                    .collect()
            };
            let token = inner.fence(&key.name, ttl, &held).await?;
            let grant = Grant { mode, token };
            {
                let mut state = lock(&entry.state);
                state.grant = Some(grant);
                state.request.mode = mode;
            }
            if uncertain {
                return Err(Error::backend_msg(
                    DRIVER,
                    format!(
                        "some members did not confirm the conversion of lock {:?} to {mode}",
                        key.name.as_str()
                    ),
                ));
            }
            return Ok(Queued::Granted(grant));
        }
        let converted = {
            let state = lock(&entry.state);
            (0..state.slots.len())
                .filter(|&i| matches!(state.slots[i], Slot::Held(m) if mode.is_weaker_or_equal(m)))
                .count()
        };
        if converted >= inner.majority {
            return self
                .await_conversion(&entry, mode)
                .await
                .map(Queued::Granted);
        }
        Ok(Queued::Waiting)
    }

    async fn inspect(&self, name: &LockName) -> Result<Vec<EntryInfo>> {
        let inner = &*self.inner;
        let views = self.inspect_members(name).await;
        let answered = views.iter().filter(|v| v.entries.is_ok()).count();
        if answered < inner.majority {
            return Err(no_majority(name, answered, inner.members.len()));
        }
        // Per owner: where it first appears (member, seq), and what each member says of it.
        let mut merged: HashMap<OwnerId, ((usize, u64), Vec<EntryInfo>)> = HashMap::new();
        for (m, view) in views.into_iter().enumerate() {
            for info in view.entries.into_iter().flatten() {
                merged
                    .entry(info.owner.clone())
                    .or_insert_with(|| ((m, info.seq), Vec::new()))
                    .1
                    .push(info);
            }
        }
        let mut entries: Vec<((usize, u64), EntryInfo)> = merged
            .into_iter()
            .map(|(owner, (first, infos))| {
                let granted: Vec<&EntryInfo> = infos.iter().filter(|i| i.granted).collect();
                let is_granted = granted.len() >= inner.majority;
                let mode = if is_granted {
                    granted.iter().map(|i| i.mode).reduce(LockMode::meet)
                } else {
                    None
                }
                .unwrap_or(infos[0].mode);
                // Members that disagree on the mode held are between two modes (a conversion is
                // being settled on them): the entry surely holds the meet, and may still keep
                // newcomers out as the join does.
                let converting_to = infos.iter().find_map(|i| i.converting_to).or_else(|| {
                    let join = granted.iter().map(|i| i.mode).reduce(LockMode::join)?;
                    (is_granted && join != mode).then_some(join)
                });
                let order = (first.0 as u64) << 48 | (first.1 & ((1 << 48) - 1));
                (
                    first,
                    EntryInfo {
                        owner,
                        seq: order,
                        mode,
                        granted: is_granted,
                        converting_to,
                        token: None,
                    },
                )
            })
            .collect();
        entries.sort_by_key(|(first, _)| *first);
        Ok(entries.into_iter().map(|(_, info)| info).collect())
    }

    async fn raise_fence(&self, name: &LockName, floor: u64) -> Result<u64> {
        let _ = (name, floor);
        Err(Error::Unsupported {
            driver: DRIVER,
            what: "a quorum as a member of another quorum".into(),
        })
    }
}

impl std::fmt::Debug for Quorum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quorum")
            .field(
                "members",
                &self
                    .inner
                    .members
                    .iter()
                    .map(|m| &m.label)
                    .collect::<Vec<_>>(),
            )
            .field("majority", &self.inner.majority)
            .finish()
    }
}
