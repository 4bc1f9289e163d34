//! The conformance factories of the Redis driver: a single server, and a 3-master Redis Cluster.
//!
//! Both run with the settings the driver's documentation asks lock stores to run with: the
//! append-only file fsynced before every reply (`appendonly yes`, `appendfsync always`), so a store
//! that is killed and restarted comes back with every grant it acknowledged. Without it a restart
//! forgets every lock while their holders' guards are still valid, which the driver's own tests show
//! (`restart_without_persistence_forgets_grants_as_documented`).

use std::time::Duration;

use dlock::{Capabilities, Locks};
use dlock_redis::RedisDriver;

use super::memory::CuttableDriver;
use super::{Factory, Link, ProxyLink, StoreFaults};
use crate::harness::containers::{require_launcher, Launcher};
use crate::harness::redis::RedisPersistence;
use crate::harness::{self, Backend, RedisCluster, RedisServer, ServerProcess, TcpProxy};

enum Topology {
    Single(RedisServer),
    Cluster(RedisCluster),
}

/// Redis under test, started by the harness.
pub struct RedisFactory {
    topology: Topology,
    capabilities: Capabilities,
}

/// Starts a single Redis server (the `setup` of the single-server suite).
pub async fn setup_single() -> anyhow::Result<Option<RedisFactory>> {
    if !harness::require(Backend::Redis) || !require_launcher(Launcher::Processes) {
        return Ok(None);
    }
    let server = RedisServer::builder()
        .persistence(RedisPersistence::AofAlways)
        .start()
        .await?;
    RedisFactory::new(Topology::Single(server)).await.map(Some)
}

/// Starts a 3-master Redis Cluster (the `setup` of the cluster suite).
pub async fn setup_cluster() -> anyhow::Result<Option<RedisFactory>> {
    if !harness::require(Backend::Redis) || !require_launcher(Launcher::Processes) {
        return Ok(None);
    }
    let cluster = RedisServer::builder()
        .persistence(RedisPersistence::AofAlways)
        .start_cluster()
        .await?;
    RedisFactory::new(Topology::Cluster(cluster))
        .await
        .map(Some)
}

impl RedisFactory {
    async fn new(topology: Topology) -> anyhow::Result<Self> {
        let capabilities = dlock::connect(&url_of(&topology))
            .await?
            .capabilities()
            .clone();
        Ok(RedisFactory {
            topology,
            capabilities,
        })
    }
}

fn url_of(topology: &Topology) -> String {
    match topology {
        Topology::Single(server) => server.url(),
        Topology::Cluster(cluster) => format!(
            "redis+cluster://{}",
            cluster
                .addrs()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

impl StoreFaults for RedisFactory {
    fn processes(&self) -> Vec<&ServerProcess> {
        match &self.topology {
            Topology::Single(server) => vec![server.process()],
            Topology::Cluster(cluster) => cluster.nodes().iter().map(|n| n.process()).collect(),
        }
    }
}

impl Factory for RedisFactory {
    async fn client(&self) -> anyhow::Result<Locks> {
        Ok(dlock::connect(&url_of(&self.topology)).await?)
    }

    async fn partitionable_client(&self) -> anyhow::Result<(Locks, Box<dyn Link>)> {
        match &self.topology {
            Topology::Single(server) => {
                let proxy = TcpProxy::start(server.addr()).await?;
                let locks = dlock::connect(&server.url_for(proxy.port())).await?;
                Ok((locks, Box::new(ProxyLink(vec![proxy]))))
            }
            // Cluster clients learn node addresses from the cluster itself and would bypass a proxy,
            // so the cluster's clients are cut in-process, in front of the driver.
            Topology::Cluster(_) => {
                let driver = RedisDriver::connect(&url_of(&self.topology)).await?;
                let (driver, switch) = CuttableDriver::new(driver);
                Ok((Locks::new(driver), Box::new(switch)))
            }
        }
    }

    fn url(&self) -> Option<String> {
        Some(url_of(&self.topology))
    }

    fn faults(&self) -> Option<&dyn StoreFaults> {
        Some(self)
    }

    fn short_ttl(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }
}
