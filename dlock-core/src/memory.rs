//! The in-process driver: complete semantics, no store. The embedded default and the reference the other
//! drivers are tested against.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::driver::{
    Capabilities, Driver, Enqueued, EntryInfo, EntryKey, EntryRequest, Grant, OwnerId, Queued,
};
use crate::grant::{self, Decision, QueueEntry};
use crate::{Error, LockMode, LockName, Result};

const DRIVER: &str = "memory";

/// Locks shared by the tasks of one process. Cheap to clone: clones share the same locks.
///
/// Time is tokio's clock, so tests may pause and advance it.
///
/// ```
/// use dlock_core::{Locks, LockMode, MemoryDriver};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> dlock_core::Result<()> {
/// let locks = Locks::new(MemoryDriver::new());
/// let writer = locks.lock("stock/42").mode(LockMode::PW).await?;
/// assert!(locks.lock("stock/42").mode(LockMode::PR).try_acquire().await.unwrap_err().is_would_block());
/// let reader = locks.lock("stock/42").mode(LockMode::CR).try_acquire().await?;
/// assert!(reader.fencing_token() > writer.fencing_token());
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct MemoryDriver {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    resources: HashMap<LockName, Resource>,
    next_seq: u64,
    /// One counter for every name: tokens then increase with every grant, conflicting or not.
    last_token: u64,
    /// The fence registers ([`Driver::raise_fence`]).
    fences: HashMap<LockName, u64>,
}

#[derive(Default)]
struct Resource {
    entries: Vec<MemEntry>,
    changed: Arc<Notify>,
}

struct MemEntry {
    owner: OwnerId,
    queue: QueueEntry,
    expires_at: Instant,
    token: u64,
}

impl MemoryDriver {
    /// A new, empty set of locks.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the queue half-updated (updates are single
        // assignments), so a poisoned lock is still consistent.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Drops expired entries and grants what the rule allows, waking the name's waiters on any change.
    fn settle(&mut self, name: &LockName, now: Instant) {
        let Some(res) = self.resources.get_mut(name) else {
            return;
        };
        let before = res.entries.len();
        res.entries.retain(|e| e.expires_at > now);
        let mut changed = res.entries.len() != before;
        let mut view: Vec<QueueEntry> = res.entries.iter().map(|e| e.queue).collect();
        let decisions = grant::decide(&view);
        grant::apply(&mut view, &decisions);
        for (entry, queue) in res.entries.iter_mut().zip(view) {
            entry.queue = queue;
        }
        for decision in &decisions {
            let (Decision::Grant(i) | Decision::Convert(i)) = *decision;
            self.last_token += 1;
            res.entries[i].token = self.last_token;
        }
        changed |= !decisions.is_empty();
        if changed {
            res.changed.notify_waiters();
        }
        if res.entries.is_empty() {
            self.resources.remove(name);
        }
    }

    fn find(&self, key: &EntryKey) -> Option<&MemEntry> {
        self.resources
            .get(&key.name)?
            .entries
            .iter()
            .find(|e| e.owner == key.owner)
    }

    fn find_mut(&mut self, key: &EntryKey) -> Option<(usize, &mut Resource)> {
        let res = self.resources.get_mut(&key.name)?;
        let index = res.entries.iter().position(|e| e.owner == key.owner)?;
        Some((index, res))
    }
}

fn lost(key: &EntryKey) -> Error {
    Error::Lost {
        name: key.name.to_string(),
    }
}

fn granted(entry: &MemEntry) -> Option<Grant> {
    (entry.queue.granted && entry.queue.converting_to.is_none()).then_some(Grant {
        mode: entry.queue.mode,
        token: entry.token,
    })
}

#[async_trait]
impl Driver for MemoryDriver {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(DRIVER);
        caps.modes = LockMode::ALL.to_vec();
        caps.fencing = true;
        caps.fencing_total_order = true;
        caps.fair = true;
        caps.per_request_ttl = true;
        caps.conversion = true;
        caps.min_ttl = Duration::from_millis(10);
        caps
    }

    async fn enqueue(&self, request: &EntryRequest) -> Result<Enqueued> {
        let now = Instant::now();
        let mut state = self.lock_state();
        let name = &request.key.name;
        state.settle(name, now);
        if let Some(existing) = state.find(&request.key) {
            // A retried enqueue must not queue a second entry for the same owner.
            return Ok(granted(existing)
                .map_or(Queued::Waiting, Queued::Granted)
                .into());
        }
        state.next_seq += 1;
        let seq = state.next_seq;
        let res = state.resources.entry(name.clone()).or_default();
        res.entries.push(MemEntry {
            owner: request.key.owner.clone(),
            queue: QueueEntry::waiting(seq, request.mode),
            expires_at: now + request.ttl,
            token: 0,
        });
        let view: Vec<QueueEntry> = res.entries.iter().map(|e| e.queue).collect();
        if !request.wait && !grant::grantable(&view, view.len() - 1) {
            res.entries.pop();
            if res.entries.is_empty() {
                state.resources.remove(name);
            }
            return Err(Error::WouldBlock {
                name: name.to_string(),
            });
        }
        state.settle(name, now);
        let entry = state.find(&request.key).expect("entry was just queued");
        Ok(granted(entry)
            .map_or(Queued::Waiting, Queued::Granted)
            .into())
    }

    async fn wait(&self, key: &EntryKey) -> Result<Grant> {
        loop {
            let (changed, next_expiry) = {
                let mut state = self.lock_state();
                state.settle(&key.name, Instant::now());
                let entry = state.find(key).ok_or_else(|| lost(key))?;
                if let Some(grant) = granted(entry) {
                    return Ok(grant);
                }
                let res = &state.resources[&key.name];
                let next_expiry = res.entries.iter().map(|e| e.expires_at).min();
                (res.changed.clone(), next_expiry)
            };
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Changes between releasing the lock and enabling the notification are caught by checking
            // again before sleeping.
            {
                let mut state = self.lock_state();
                state.settle(&key.name, Instant::now());
                let entry = state.find(key).ok_or_else(|| lost(key))?;
                if let Some(grant) = granted(entry) {
                    return Ok(grant);
                }
            }
            match next_expiry {
                Some(at) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn renew(&self, key: &EntryKey, ttl: Duration) -> Result<Instant> {
        let now = Instant::now();
        let mut state = self.lock_state();
        state.settle(&key.name, now);
        let (index, res) = state.find_mut(key).ok_or_else(|| lost(key))?;
        res.entries[index].expires_at = now + ttl;
        Ok(now)
    }

    async fn release(&self, key: &EntryKey) -> Result<()> {
        let now = Instant::now();
        let mut state = self.lock_state();
        if let Some((index, res)) = state.find_mut(key) {
            res.entries.remove(index);
            res.changed.notify_waiters();
        }
        state.settle(&key.name, now);
        Ok(())
    }

    async fn convert(&self, key: &EntryKey, mode: LockMode) -> Result<Queued> {
        let now = Instant::now();
        let mut state = self.lock_state();
        state.settle(&key.name, now);
        let (index, res) = state.find_mut(key).ok_or_else(|| lost(key))?;
        let entry = &res.entries[index];
        if !entry.queue.granted {
            return Err(Error::backend_msg(
                DRIVER,
                format!("cannot convert lock {:?}: it is not granted yet", key.name),
            ));
        }
        let held = entry.queue.mode;
        if mode == held {
            res.entries[index].queue.converting_to = None;
            res.changed.notify_waiters();
        } else {
            let view: Vec<QueueEntry> = res.entries.iter().map(|e| e.queue).collect();
            if grant::conversion_deadlocks(&view, index, mode) {
                return Err(Error::ConversionDeadlock {
                    name: key.name.to_string(),
                    from: held,
                    to: mode,
                });
            }
            res.entries[index].queue.converting_to = Some(mode);
        }
        state.settle(&key.name, now);
        let entry = state.find(key).expect("a granted entry stays queued");
        Ok(granted(entry).map_or(Queued::Waiting, Queued::Granted))
    }

    async fn raise_fence(&self, name: &LockName, floor: u64) -> Result<u64> {
        let mut state = self.lock_state();
        let register = state.fences.entry(name.clone()).or_default();
        *register = (*register).max(floor);
        Ok(*register)
    }

    async fn inspect(&self, name: &LockName) -> Result<Vec<EntryInfo>> {
        let mut state = self.lock_state();
        state.settle(name, Instant::now());
        Ok(state
            .resources
            .get(name)
            .map(|res| {
                res.entries
                    .iter()
                    .map(|e| EntryInfo {
                        owner: e.owner.clone(),
                        seq: e.queue.seq,
                        mode: e.queue.mode,
                        granted: e.queue.granted,
                        converting_to: e.queue.converting_to,
                        token: e.queue.granted.then_some(e.token),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}
