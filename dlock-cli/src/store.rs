//! Connecting to the store named by `--url`, and keeping track of the entries this process queued.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use dlock::{
    Capabilities, Driver, Enqueued, EntryInfo, EntryKey, EntryRequest, Error, Grant, LockMode,
    LockName, Locks, Queued, Renewal, Result,
};
use dlock_etcd::EtcdDriver;
use dlock_jetstream::JetStreamDriver;
use dlock_redis::RedisDriver;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A connected store.
pub struct Store {
    /// The client every subcommand uses; its driver is [`Store::tracking`].
    pub locks: Locks,
    pub tracking: Arc<Tracking>,
    server: Server,
}

/// The concrete driver, for what only it can tell (the server version).
enum Server {
    Redis(RedisDriver),
    Etcd(EtcdDriver),
    JetStream(JetStreamDriver),
    InProcess,
    Other,
}

/// Connects to `url`.
///
/// The Redis, etcd and NATS schemes are connected with their drivers' own types, so that
/// [`Store::server_version`] can ask them; every other URL (`mem://`, and whatever the facade learns
/// later) goes through [`dlock::connect`], which also turns unknown schemes into errors.
pub async fn connect(url: &str) -> Result<Store> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    let (driver, server): (Arc<dyn Driver>, Server) = match scheme {
        Some("redis" | "rediss" | "redis+cluster" | "rediss+cluster") => {
            let driver = RedisDriver::connect(url).await?;
            (Arc::new(driver.clone()), Server::Redis(driver))
        }
        Some("etcd" | "etcds") => {
            let driver = EtcdDriver::connect(url).await?;
            (Arc::new(driver.clone()), Server::Etcd(driver))
        }
        Some("nats" | "tls") => {
            let driver = JetStreamDriver::connect(url).await?;
            (Arc::new(driver.clone()), Server::JetStream(driver))
        }
        _ => {
            let locks = dlock::connect(url).await?;
            let server = if scheme == Some("mem") {
                Server::InProcess
            } else {
                Server::Other
            };
            (Arc::clone(locks.driver()), server)
        }
    };
    let tracking = Arc::new(Tracking::new(driver));
    Ok(Store {
        locks: Locks::from_arc(tracking.clone()),
        tracking,
        server,
    })
}

impl Store {
    /// The store's server software and version, as the driver learns it: Redis from `INFO server`
    /// at connect time, etcd from a `Status` call now, NATS from the server's greeting.
    pub async fn server_version(&self) -> String {
        match &self.server {
            Server::Redis(d) => d.server_version().map_or_else(
                || "Redis, version unknown (the user may not run INFO)".to_owned(),
                |v| format!("Redis {v}"),
            ),
            Server::Etcd(d) => match d.server_version().await {
                Ok(v) => format!("etcd {v}"),
                Err(e) => format!("etcd, version unknown ({e})"),
            },
            Server::JetStream(d) => format!("NATS {}", d.server_version()),
            Server::InProcess => "none: the in-process store of this dlock process".to_owned(),
            Server::Other => "unknown".to_owned(),
        }
    }
}

/// `url` with its password or token replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    dlock::Error::redact_url(url)
}

/// The store's driver, remembering which queue entries this process made and has not removed.
///
/// A cancelled, timed-out or failed acquire removes its entry from a background task, which a
/// short-lived process would cut off by exiting: `dlock` calls [`Tracking::remove_leftovers`] before
/// it exits, so nobody waits behind its ghost until the lease runs out.
pub struct Tracking {
    driver: Arc<dyn Driver>,
    /// Every entry this process may have in the store, with the number of its enqueues in flight.
    entries: Mutex<HashMap<EntryKey, usize>>,
    changed: Notify,
}

impl Tracking {
    fn new(driver: Arc<dyn Driver>) -> Self {
        Tracking {
            driver,
            entries: Mutex::default(),
            changed: Notify::new(),
        }
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<EntryKey, usize>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes, within `within`, every entry this client queued and did not release: first waits
    /// for enqueues still in flight (an entry must not be created after its removal), then releases
    /// what is left. Gives up quietly at the deadline; the leases expire anyway.
    ///
    /// For the way out: a guard still alive counts as not released, and loses its lock.
    pub async fn remove_leftovers(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let changed = self.changed.notified();
            if self.entries().values().all(|&in_flight| in_flight == 0) {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
        let left: Vec<EntryKey> = self.entries().keys().cloned().collect();
        let releases = left.iter().map(|key| self.release(key));
        let _ = tokio::time::timeout_at(deadline, futures::future::join_all(releases)).await;
    }

    /// Stops tracking `key`: its removal was tried and failed, and is left to its lease.
    pub fn abandon(&self, key: &EntryKey) {
        self.forget(key);
    }

    fn forget(&self, key: &EntryKey) {
        self.entries().remove(key);
        self.changed.notify_waiters();
    }
}

/// Counts an enqueue in flight until dropped (finished or cancelled).
struct InFlight<'a> {
    tracking: &'a Tracking,
    key: &'a EntryKey,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.tracking.entries().get_mut(self.key) {
            *n = n.saturating_sub(1);
        }
        self.tracking.changed.notify_waiters();
    }
}

#[async_trait]
impl Driver for Tracking {
    fn capabilities(&self) -> Capabilities {
        self.driver.capabilities()
    }

    async fn enqueue(&self, request: &EntryRequest) -> Result<Enqueued> {
        *self.entries().entry(request.key.clone()).or_insert(0) += 1;
        let in_flight = InFlight {
            tracking: self,
            key: &request.key,
        };
        let result = self.driver.enqueue(request).await;
        drop(in_flight);
        if matches!(result, Err(Error::WouldBlock { .. })) {
            // The driver left nothing queued.
            self.forget(&request.key);
        }
        result
    }

    async fn wait(&self, key: &EntryKey) -> Result<Grant> {
        self.driver.wait(key).await
    }

    async fn renew(&self, key: &EntryKey, ttl: Duration) -> Result<Instant> {
        self.driver.renew(key, ttl).await
    }

    async fn renew_many(&self, renewals: &[Renewal<'_>]) -> Vec<Result<Instant>> {
        self.driver.renew_many(renewals).await
    }
    async fn release(&self, key: &EntryKey) -> Result<()> {
        let result = self.driver.release(key).await;
        if result.is_ok() {
            self.forget(key);
        }
        result
    }

    async fn convert(&self, key: &EntryKey, mode: LockMode) -> Result<Queued> {
        self.driver.convert(key, mode).await
    }

    async fn inspect(&self, name: &LockName) -> Result<Vec<EntryInfo>> {
        self.driver.inspect(name).await
    }

    async fn raise_fence(&self, name: &LockName, floor: u64) -> Result<u64> {
        self.driver.raise_fence(name, floor).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_passwords_and_tokens() {
        assert_eq!(
            redact("redis://app:secret@127.0.0.1:6379/0"),
            "redis://app:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact("nats://s3cr3t@127.0.0.1:4222"),
            "nats://***@127.0.0.1:4222"
        );
        assert_eq!(redact("etcd://h1:2379,h2:2379"), "etcd://h1:2379,h2:2379");
        assert_eq!(redact("mem://"), "mem://");
        assert_eq!(
            redact("quorum:redis://:a@h1;redis://:b@h2;redis://:c@h3"),
            "quorum:redis://:***@h1;redis://:***@h2;redis://:***@h3"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_timed_out_acquire_leaves_nothing_queued_after_remove_leftovers() {
        let holder = connect("mem://tracking-test").await.unwrap();
        let waiter = connect("mem://tracking-test").await.unwrap();
        let held = holder.locks.lock("x").await.unwrap();
        let err = waiter
            .locks
            .lock("x")
            .timeout(Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(err.is_timeout());
        waiter
            .tracking
            .remove_leftovers(Duration::from_secs(5))
            .await;
        assert!(waiter.tracking.entries().is_empty());
        let queue = holder.locks.inspect("x").await.unwrap();
        assert_eq!(queue.len(), 1);
        assert_eq!(&queue[0].owner, &held.entry_key().owner);
        held.release().await.unwrap();
        assert!(holder.tracking.entries().is_empty());
    }
}
