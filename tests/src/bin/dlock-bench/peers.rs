//! The peers dlock is measured against in the same rounds: `rslock` (Redlock) on Redis, and etcd's
//! own Lock service on etcd.

use std::time::Duration;

use anyhow::{Context, Result};
use dlock_etcd::etcd_client::{self, LockOptions};
use rslock::LockManager;
use tokio::time::Instant;

use crate::workloads::{HandoffClock, Handoffs, Laps, Timed, MAX_CYCLES, WAIT_BOUND};
use crate::TTL;

/// etcd leases for the Lock RPC outlive any one timed run, so no keepalive competes with it.
const ETCD_LEASE_SECS: i64 = 60;

pub enum Peer {
    Rslock(Vec<LockManager>),
    EtcdLock(Vec<etcd_client::Client>),
}

impl Peer {
    /// `clients` separate clients, each with its connection open.
    pub async fn rslock(url: &str, clients: usize) -> Result<Self> {
        let mut managers = Vec::new();
        for i in 0..clients {
            let manager = LockManager::new(vec![url.to_owned()]);
            // rslock connects on first use; pay that outside the timed runs.
            let lock = manager
                .lock(format!("bench/rslock-warm/{i}").as_str(), TTL)
                .await?;
            manager.unlock(&lock).await;
            managers.push(manager);
        }
        Ok(Peer::Rslock(managers))
    }

    pub async fn etcd_lock(endpoint: &str, clients: usize) -> Result<Self> {
        let mut out = Vec::new();
        for _ in 0..clients {
            let mut client = etcd_client::Client::connect([endpoint], None).await?;
            client.get("bench/warm", None).await?;
            out.push(client);
        }
        Ok(Peer::EtcdLock(out))
    }

    pub fn uncontended_label(&self) -> &'static str {
        match self {
            Peer::Rslock(_) => "rslock 0.10 lock + unlock",
            Peer::EtcdLock(_) => "etcd Lock + Unlock RPC, one shared lease",
        }
    }

    pub fn handoff_label(&self) -> &'static str {
        match self {
            Peer::Rslock(_) => "rslock 0.10, waiters retrying lock() as acquire() does",
            Peer::EtcdLock(_) => "etcd Lock RPC, a lease per client",
        }
    }

    /// Lock + unlock cycles on one name by the first client for about `run`.
    pub async fn uncontended(&self, run: Duration) -> Result<Timed> {
        let deadline = Instant::now() + run;
        let more = |done: usize| done < MAX_CYCLES && (done < 3 || Instant::now() < deadline);
        match self {
            Peer::Rslock(managers) => {
                let manager = &managers[0];
                let mut laps = Laps::start();
                while more(laps.count()) {
                    let lock = manager.lock("bench/rslock", TTL).await?;
                    manager.unlock(&lock).await;
                    laps.lap();
                }
                Ok(laps.finish())
            }
            Peer::EtcdLock(clients) => {
                let mut client = clients[0].clone();
                let lease = client.lease_grant(ETCD_LEASE_SECS, None).await?.id();
                let mut laps = Laps::start();
                while more(laps.count()) {
                    let held = client
                        .lock("bench/etcdlock", Some(LockOptions::new().with_lease(lease)))
                        .await?;
                    client.unlock(held.key().to_vec()).await?;
                    laps.lap();
                }
                let timed = laps.finish();
                client.lease_revoke(lease).await?;
                Ok(timed)
            }
        }
    }

    /// Every client in line for one lock until `deadline`, as in dlock's handoff scenario.
    pub async fn handoffs(&self, deadline: Instant) -> Result<Handoffs> {
        let clock = HandoffClock::default();
        match self {
            Peer::Rslock(managers) => rslock_handoffs(managers, &clock, deadline).await?,
            Peer::EtcdLock(clients) => etcd_handoffs(clients, &clock, deadline).await?,
        }
        Ok(clock.finish())
    }
}

/// rslock has no queue: a waiter calls `acquire`, which retries `lock` (3 tries 0–200 ms apart, then
/// again at once) until it wins. A holder that has just released would win its own lock back at once
/// and starve the pollers; that is not a handoff, so it steps out until someone else has taken the
/// lock, as a FIFO queue would have put it behind them.
async fn rslock_handoffs(
    managers: &[LockManager],
    clock: &HandoffClock,
    deadline: Instant,
) -> Result<()> {
    let (generation, _) = tokio::sync::watch::channel(0u64);
    let mut tasks = Vec::new();
    for manager in managers {
        let (manager, clock, generation) = (manager.clone(), clock.clone(), generation.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = generation.subscribe();
            let mut done = 0;
            while done < MAX_CYCLES && Instant::now() < deadline {
                let guard =
                    tokio::time::timeout(WAIT_BOUND, manager.acquire("bench/rslock-handoff", TTL))
                        .await
                        .context("rslock acquire took over the wait bound")??;
                clock.granted();
                let mut mine = 0;
                generation.send_modify(|g| {
                    *g += 1;
                    mine = *g;
                });
                tokio::task::yield_now().await;
                clock.releasing();
                guard.release().await;
                done += 1;
                let _ = tokio::time::timeout_at(deadline, seen.wait_for(|g| *g > mine)).await;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// etcd's Lock RPC queues waiters by revision inside the server; each client has its own lease (the
/// RPC treats two locks on one lease as the same holder).
async fn etcd_handoffs(
    clients: &[etcd_client::Client],
    clock: &HandoffClock,
    deadline: Instant,
) -> Result<()> {
    let mut tasks = Vec::new();
    for client in clients {
        let (mut client, clock) = (client.clone(), clock.clone());
        tasks.push(tokio::spawn(async move {
            let lease = client.lease_grant(ETCD_LEASE_SECS, None).await?.id();
            let mut done = 0;
            while done < MAX_CYCLES && Instant::now() < deadline {
                let held = tokio::time::timeout(
                    WAIT_BOUND,
                    client.lock(
                        "bench/etcdlock-handoff",
                        Some(LockOptions::new().with_lease(lease)),
                    ),
                )
                .await
                .context("etcd Lock took over the wait bound")??;
                clock.granted();
                tokio::task::yield_now().await;
                clock.releasing();
                client.unlock(held.key().to_vec()).await?;
                done += 1;
            }
            client.lease_revoke(lease).await?;
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}
