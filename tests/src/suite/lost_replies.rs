//! A driver wrapper that loses replies: it forwards a call to the real driver — so the store applies
//! it — and then hands the caller an error, or no answer at all, instead of the store's reply. This is
//! the fault a timeout or a reset connection makes in the field, and the one where a client can least
//! know what the store did.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dlock::{
    Capabilities, Driver, Enqueued, EntryInfo, EntryKey, EntryRequest, Error, Grant, LockMode,
    LockName, Queued, Result,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

/// A driver call whose reply can be lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    /// [`Driver::enqueue`].
    Enqueue,
    /// [`Driver::convert`].
    Convert,
    /// [`Driver::release`].
    Release,
    /// [`Driver::renew`].
    Renew,
}

/// What the caller gets instead of the reply of a call the store applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostReply {
    /// A store error, as after a connection reset.
    Error,
    /// Nothing, ever: the caller's own deadline must end the wait.
    Dropped,
}

/// Which replies a [`LostReplies`] driver loses: one-shot faults armed per call, and optionally a
/// seeded random share of every call.
pub struct ReplyFaults {
    armed: Mutex<HashMap<Call, VecDeque<LostReply>>>,
    random: Mutex<Option<(StdRng, f64)>>,
    injected: AtomicUsize,
}

impl ReplyFaults {
    /// Loses no reply until armed.
    pub fn new() -> Arc<Self> {
        Arc::new(ReplyFaults {
            armed: Mutex::default(),
            random: Mutex::new(None),
            injected: AtomicUsize::new(0),
        })
    }

    /// Loses each reply with probability `share`, half of them as errors and half dropped, with
    /// choices drawn from `seed` (so a failing history can be replayed).
    pub fn random(seed: u64, share: f64) -> Arc<Self> {
        let faults = Self::new();
        *faults.random.lock().expect("not poisoned") = Some((StdRng::seed_from_u64(seed), share));
        faults
    }

    /// The next `call` the store applies loses its reply as `reply`.
    pub fn arm(&self, call: Call, reply: LostReply) {
        self.armed
            .lock()
            .expect("not poisoned")
            .entry(call)
            .or_default()
            .push_back(reply);
    }

    /// How many replies were lost so far.
    pub fn injected(&self) -> usize {
        self.injected.load(Ordering::SeqCst)
    }

    fn take(&self, call: Call) -> Option<LostReply> {
        let armed = self
            .armed
            .lock()
            .expect("not poisoned")
            .get_mut(&call)
            .and_then(VecDeque::pop_front);
        let lost = armed.or_else(|| {
            let mut random = self.random.lock().expect("not poisoned");
            let (rng, share) = random.as_mut()?;
            rng.random_bool(*share).then(|| {
                if rng.random_bool(0.5) {
                    LostReply::Error
                } else {
                    LostReply::Dropped
                }
            })
        });
        if lost.is_some() {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        lost
    }
}

impl fmt::Debug for ReplyFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyFaults")
            .field("injected", &self.injected())
            .finish_non_exhaustive()
    }
}

/// A driver in front of `D` whose replies [`ReplyFaults`] may lose after `D` applied the call.
pub struct LostReplies<D> {
    inner: D,
    faults: Arc<ReplyFaults>,
}

impl<D: Driver> LostReplies<D> {
    /// Puts `inner` behind `faults`.
    pub fn new(inner: D, faults: Arc<ReplyFaults>) -> Self {
        LostReplies { inner, faults }
    }

    async fn forward<T>(
        &self,
        call: Call,
        applied: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let reply = applied.await;
        match self.faults.take(call) {
            None => reply,
            Some(LostReply::Error) => Err(Error::backend_msg(
                self.inner.capabilities().driver,
                format!("injected fault: the store applied {call:?}, and its reply was lost"),
            )),
            Some(LostReply::Dropped) => std::future::pending().await,
        }
    }
}

#[async_trait]
impl<D: Driver> Driver for LostReplies<D> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn enqueue(&self, request: &EntryRequest) -> Result<Enqueued> {
        self.forward(Call::Enqueue, self.inner.enqueue(request))
            .await
    }
    async fn wait(&self, key: &EntryKey) -> Result<Grant> {
        self.inner.wait(key).await
    }
    async fn renew(&self, key: &EntryKey, ttl: Duration) -> Result<Instant> {
        self.forward(Call::Renew, self.inner.renew(key, ttl)).await
    }
    async fn release(&self, key: &EntryKey) -> Result<()> {
        self.forward(Call::Release, self.inner.release(key)).await
    }
    async fn convert(&self, key: &EntryKey, mode: LockMode) -> Result<Queued> {
        self.forward(Call::Convert, self.inner.convert(key, mode))
            .await
    }
    async fn inspect(&self, name: &LockName) -> Result<Vec<EntryInfo>> {
        self.inner.inspect(name).await
    }
    async fn raise_fence(&self, name: &LockName, floor: u64) -> Result<u64> {
        self.inner.raise_fence(name, floor).await
    }
}
