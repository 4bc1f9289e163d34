//! The conformance factory of the in-memory driver, and a cuttable link usable in front of any driver.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dlock::{
    Capabilities, Driver, Enqueued, EntryInfo, EntryKey, EntryRequest, Grant, LockMode, LockName,
    Locks, MemoryDriver, Queued, Result,
};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Factory, Link, StoreFaults};

/// The in-memory store under test: clients share one [`MemoryDriver`].
pub struct MemoryFactory {
    store: MemoryDriver,
}

/// Starts a fresh in-memory store (the `setup` of the memory driver's stamped suite).
pub async fn setup() -> anyhow::Result<Option<MemoryFactory>> {
    Ok(Some(MemoryFactory {
        store: MemoryDriver::new(),
    }))
}

impl Factory for MemoryFactory {
    async fn client(&self) -> anyhow::Result<Locks> {
        Ok(Locks::new(self.store.clone()))
    }

    async fn partitionable_client(&self) -> anyhow::Result<(Locks, Box<dyn Link>)> {
        let (driver, link) = CuttableDriver::new(self.store.clone());
        Ok((Locks::new(driver), Box::new(link)))
    }

    fn url(&self) -> Option<String> {
        None
    }

    fn faults(&self) -> Option<&dyn StoreFaults> {
        None
    }

    fn short_ttl(&self) -> Duration {
        Duration::from_millis(300)
    }

    fn capabilities(&self) -> Capabilities {
        self.store.capabilities()
    }
}

/// A driver behind a link that can be cut: while cut, requests wait before reaching the store and
/// answers wait before reaching the caller, as over a partitioned network; the store (and its clock)
/// goes on. For drivers whose store is a server, prefer a TCP proxy; this works in front of any driver.
pub struct CuttableDriver<D> {
    inner: D,
    cut: watch::Receiver<bool>,
}

/// The switch of a [`CuttableDriver`].
pub struct CutSwitch(Arc<watch::Sender<bool>>);

impl Link for CutSwitch {
    fn set_cut(&self, cut: bool) {
        self.0.send_replace(cut);
    }
}

impl<D: Driver> CuttableDriver<D> {
    /// Puts `inner` behind a cuttable link.
    pub fn new(inner: D) -> (Self, CutSwitch) {
        let (tx, rx) = watch::channel(false);
        (CuttableDriver { inner, cut: rx }, CutSwitch(Arc::new(tx)))
    }

    async fn open(&self) {
        let mut cut = self.cut.clone();
        // The sender lives in the switch; if it is gone the link stays as it was last set.
        let _ = cut.wait_for(|cut| !cut).await;
    }

    async fn through<T>(&self, call: impl std::future::Future<Output = T>) -> T {
        self.open().await;
        let answer = call.await;
        self.open().await;
        answer
    }
}

#[async_trait]
impl<D: Driver> Driver for CuttableDriver<D> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn enqueue(&self, request: &EntryRequest) -> Result<Enqueued> {
        self.through(self.inner.enqueue(request)).await
    }
    async fn wait(&self, key: &EntryKey) -> Result<Grant> {
        self.through(self.inner.wait(key)).await
    }
    async fn renew(&self, key: &EntryKey, ttl: Duration) -> Result<Instant> {
        self.through(self.inner.renew(key, ttl)).await
    }
    async fn release(&self, key: &EntryKey) -> Result<()> {
        self.through(self.inner.release(key)).await
    }
    async fn convert(&self, key: &EntryKey, mode: LockMode) -> Result<Queued> {
        self.through(self.inner.convert(key, mode)).await
    }
    async fn inspect(&self, name: &LockName) -> Result<Vec<EntryInfo>> {
        self.through(self.inner.inspect(name)).await
    }
    async fn raise_fence(&self, name: &LockName, floor: u64) -> Result<u64> {
        self.through(self.inner.raise_fence(name, floor)).await
    }
}
