//! The conformance factories of the etcd driver: a single member and a 3-member cluster, on etcd 3.4
//! and 3.5.

use std::time::Duration;

use dlock::{Capabilities, Locks};

use super::{Factory, Link, ProxyLink, StoreFaults};
use crate::harness::containers::{require_launcher, Launcher};
use crate::harness::{
    self, Backend, EtcdCluster, EtcdServer, EtcdVersion, ServerProcess, TcpProxy,
};

enum Topology {
    Single(EtcdServer),
    Cluster(EtcdCluster),
}

impl Topology {
    fn cluster(&self) -> &EtcdCluster {
        match self {
            Topology::Single(server) => server.as_cluster(),
            Topology::Cluster(cluster) => cluster,
        }
    }
}

/// etcd under test, started by the harness.
pub struct EtcdFactory {
    topology: Topology,
    capabilities: Capabilities,
}

/// Starts a single etcd 3.4 member.
pub async fn setup_single_3_4() -> anyhow::Result<Option<EtcdFactory>> {
    setup(EtcdVersion::V3_4, false).await
}

/// Starts a 3-member etcd 3.4 cluster.
pub async fn setup_cluster_3_4() -> anyhow::Result<Option<EtcdFactory>> {
    setup(EtcdVersion::V3_4, true).await
}

/// Starts a single etcd 3.5 member.
pub async fn setup_single_3_5() -> anyhow::Result<Option<EtcdFactory>> {
    setup(EtcdVersion::V3_5, false).await
}

/// Starts a 3-member etcd 3.5 cluster.
pub async fn setup_cluster_3_5() -> anyhow::Result<Option<EtcdFactory>> {
    setup(EtcdVersion::V3_5, true).await
}

async fn setup(version: EtcdVersion, cluster: bool) -> anyhow::Result<Option<EtcdFactory>> {
    if !harness::require(Backend::Etcd) || !require_launcher(Launcher::Processes) {
        return Ok(None);
    }
    let topology = if cluster {
        Topology::Cluster(EtcdCluster::start(version).await?)
    } else {
        Topology::Single(EtcdServer::start(version).await?)
    };
    let capabilities = dlock::connect(&url_of(topology.cluster()))
        .await?
        .capabilities()
        .clone();
    Ok(Some(EtcdFactory {
        topology,
        capabilities,
    }))
}

/// `etcd://127.0.0.1:P1,127.0.0.1:P2,…` for every member.
pub fn url_of(cluster: &EtcdCluster) -> String {
    url_for_ports(cluster.members().iter().map(|m| m.client_port()))
}

fn url_for_ports(ports: impl Iterator<Item = u16>) -> String {
    format!(
        "etcd://{}",
        ports
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    )
}

impl StoreFaults for EtcdFactory {
    fn processes(&self) -> Vec<&ServerProcess> {
        self.topology
            .cluster()
            .members()
            .iter()
            .map(|m| m.process())
            .collect()
    }
}

impl Factory for EtcdFactory {
    async fn client(&self) -> anyhow::Result<Locks> {
        Ok(dlock::connect(&url_of(self.topology.cluster())).await?)
    }

    async fn partitionable_client(&self) -> anyhow::Result<(Locks, Box<dyn Link>)> {
        // The driver talks only to the endpoints it is given (no member discovery), so proxies in
        // front of every member cut it off completely.
        let mut proxies = Vec::new();
        for member in self.topology.cluster().members() {
            proxies.push(TcpProxy::start(member.client_addr()).await?);
        }
        let locks = dlock::connect(&url_for_ports(proxies.iter().map(TcpProxy::port))).await?;
        Ok((locks, Box::new(ProxyLink(proxies))))
    }

    fn url(&self) -> Option<String> {
        Some(url_of(self.topology.cluster()))
    }

    fn faults(&self) -> Option<&dyn StoreFaults> {
        Some(self)
    }

    fn short_ttl(&self) -> Duration {
        // etcd's leases have a minimum TTL (2 s with default settings); the driver reports it.
        self.capabilities.min_ttl.max(Duration::from_secs(2))
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }
}
