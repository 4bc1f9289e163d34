//! The conformance factories of the JetStream driver: a single server (R1 stream) and a 3-node cluster
//! (R3 stream), each on NATS 2.9 (client-clock leases) and 2.11+ (server TTL leases).

use std::time::Duration;

use dlock::{Capabilities, Locks};

use super::{Factory, Link, ProxyLink, StoreFaults};
use crate::harness::containers::{require_launcher, Launcher};
use crate::harness::{
    self, Backend, NatsCluster, NatsServer, NatsVersion, ServerProcess, TcpProxy,
};

enum Topology {
    Single(NatsServer),
    Cluster(NatsCluster),
}

/// NATS with JetStream under test, started by the harness.
pub struct JetStreamFactory {
    topology: Topology,
    capabilities: Capabilities,
}

/// A single NATS 2.9 server (the `setup` of the 2.9 single-server suite).
pub async fn setup_single_2_9() -> anyhow::Result<Option<JetStreamFactory>> {
    setup(NatsVersion::V2_9, false).await
}

/// A 3-node NATS 2.9 cluster with an R3 stream.
pub async fn setup_cluster_2_9() -> anyhow::Result<Option<JetStreamFactory>> {
    setup(NatsVersion::V2_9, true).await
}

/// A single NATS 2.11+ server.
pub async fn setup_single_2_11() -> anyhow::Result<Option<JetStreamFactory>> {
    setup(NatsVersion::V2_11Plus, false).await
}

/// A 3-node NATS 2.11+ cluster with an R3 stream.
pub async fn setup_cluster_2_11() -> anyhow::Result<Option<JetStreamFactory>> {
    setup(NatsVersion::V2_11Plus, true).await
}

async fn setup(version: NatsVersion, cluster: bool) -> anyhow::Result<Option<JetStreamFactory>> {
    if !harness::require(Backend::Nats) || !require_launcher(Launcher::Processes) {
        return Ok(None);
    }
    let topology = if cluster {
        Topology::Cluster(NatsCluster::start(version).await?)
    } else {
        Topology::Single(NatsServer::start(version).await?)
    };
    JetStreamFactory::new(topology).await.map(Some)
}

impl JetStreamFactory {
    async fn new(topology: Topology) -> anyhow::Result<Self> {
        // The first client creates the stream; every later one finds it.
        let capabilities = dlock::connect(&url_of(&topology))
            .await?
            .capabilities()
            .clone();
        Ok(JetStreamFactory {
            topology,
            capabilities,
        })
    }

    /// The single server, if this is the single-server topology.
    pub fn server(&self) -> Option<&NatsServer> {
        match &self.topology {
            Topology::Single(s) => Some(s),
            Topology::Cluster(_) => None,
        }
    }

    /// The cluster, if this is the cluster topology.
    pub fn cluster(&self) -> Option<&NatsCluster> {
        match &self.topology {
            Topology::Single(_) => None,
            Topology::Cluster(c) => Some(c),
        }
    }
}

fn url_of(topology: &Topology) -> String {
    match topology {
        Topology::Single(server) => server.url(),
        Topology::Cluster(cluster) => format!(
            "nats://{}?replicas=3",
            cluster
                .nodes()
                .iter()
                .map(|n| n.addr().to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

impl StoreFaults for JetStreamFactory {
    fn processes(&self) -> Vec<&ServerProcess> {
        match &self.topology {
            Topology::Single(server) => vec![server.process()],
            Topology::Cluster(cluster) => cluster.nodes().iter().map(|n| n.process()).collect(),
        }
    }
}

impl Factory for JetStreamFactory {
    async fn client(&self) -> anyhow::Result<Locks> {
        Ok(dlock::connect(&url_of(&self.topology)).await?)
    }

    async fn partitionable_client(&self) -> anyhow::Result<(Locks, Box<dyn Link>)> {
        // One server behind a proxy, and the client told not to learn other servers (the cluster's
        // nodes do not advertise them either), so every byte it exchanges passes the proxy.
        let target = match &self.topology {
            Topology::Single(server) => server.addr(),
            Topology::Cluster(cluster) => cluster.node(0).addr(),
        };
        let proxy = TcpProxy::start(target).await?;
        let replicas = match &self.topology {
            Topology::Single(_) => "",
            Topology::Cluster(_) => "&replicas=3",
        };
        let url = format!("nats://{}?discover=false{replicas}", proxy.addr());
        let locks = dlock::connect(&url).await?;
        Ok((locks, Box::new(ProxyLink(vec![proxy]))))
    }

    fn url(&self) -> Option<String> {
        Some(url_of(&self.topology))
    }

    fn faults(&self) -> Option<&dyn StoreFaults> {
        Some(self)
    }

    fn short_ttl(&self) -> Duration {
        Duration::from_secs(1).max(self.capabilities.min_ttl)
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }
}
