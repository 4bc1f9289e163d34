//! The conformance factories on containers: one server of each store and version the suite covers,
//! started by `testcontainers` from the images `scripts/build-test-images` builds (or the images
//! the `DLOCK_IMAGE_*` variables name), each on a private network of its own.

use std::sync::Mutex;
use std::time::Duration;

use dlock::{Capabilities, Locks};

use super::{Factory, Link, ProxyLink, StoreFaults};
use crate::harness::containers::{
    require_launcher, ContainerCluster, Launcher, ServerContainer, ServerImage,
};
use crate::harness::{self, Backend, ServerProcess, TcpProxy};

/// A store of one server in a container.
pub struct ContainerFactory {
    server: ServerImage,
    container: ServerContainer,
    capabilities: Capabilities,
}

/// Redis 7 in a container.
pub async fn setup_redis_7() -> anyhow::Result<Option<ContainerFactory>> {
    setup(ServerImage::Redis7, Backend::Redis).await
}

/// etcd 3.4 in a container.
pub async fn setup_etcd_3_4() -> anyhow::Result<Option<ContainerFactory>> {
    setup(ServerImage::Etcd3_4, Backend::Etcd).await
}

/// etcd 3.5 in a container.
pub async fn setup_etcd_3_5() -> anyhow::Result<Option<ContainerFactory>> {
    setup(ServerImage::Etcd3_5, Backend::Etcd).await
}

/// NATS 2.9 with JetStream in a container.
pub async fn setup_nats_2_9() -> anyhow::Result<Option<ContainerFactory>> {
    setup(ServerImage::Nats2_9, Backend::Nats).await
}

/// NATS 2.11+ with JetStream in a container.
pub async fn setup_nats_2_11() -> anyhow::Result<Option<ContainerFactory>> {
    setup(ServerImage::Nats2_11, Backend::Nats).await
}

async fn setup(server: ServerImage, backend: Backend) -> anyhow::Result<Option<ContainerFactory>> {
    if !harness::require(backend) || !require_launcher(Launcher::Containers) {
        return Ok(None);
    }
    let container = ServerContainer::start(server).await?;
    let capabilities = dlock::connect(&url_for(server, &container.addr().to_string()))
        .await?
        .capabilities()
        .clone();
    Ok(Some(ContainerFactory {
        server,
        container,
        capabilities,
    }))
}

/// The URL of the store `server` runs, reached at `addr`.
fn url_for(server: ServerImage, addr: &str) -> String {
    match server {
        ServerImage::Redis7 => format!("redis://{addr}"),
        ServerImage::Etcd3_4 | ServerImage::Etcd3_5 => format!("etcd://{addr}"),
        // Through a proxy the client must not learn the server's own address and go around it.
        ServerImage::Nats2_9 | ServerImage::Nats2_11 => format!("nats://{addr}?discover=false"),
    }
}

/// Runs a container operation from the synchronous fault interface; the suite's runtimes are
/// multi-threaded, so the other tasks go on meanwhile.
fn blocking<T>(fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(fut))
}

impl StoreFaults for ContainerFactory {
    /// None: the faults act on the container.
    fn processes(&self) -> Vec<&ServerProcess> {
        Vec::new()
    }

    fn pause(&self) -> anyhow::Result<()> {
        blocking(self.container.pause())
    }

    fn resume(&self) -> anyhow::Result<()> {
        blocking(self.container.resume())
    }

    fn crash_and_restart(&self) -> anyhow::Result<()> {
        blocking(self.container.crash_and_restart())
    }
}

impl Factory for ContainerFactory {
    async fn client(&self) -> anyhow::Result<Locks> {
        Ok(dlock::connect(&url_for(self.server, &self.container.addr().to_string())).await?)
    }

    async fn partitionable_client(&self) -> anyhow::Result<(Locks, Box<dyn Link>)> {
        let proxy = TcpProxy::start(self.container.addr()).await?;
        let locks = dlock::connect(&url_for(self.server, &proxy.addr().to_string())).await?;
        Ok((locks, Box::new(ProxyLink(vec![proxy]))))
    }

    fn url(&self) -> Option<String> {
        Some(url_for(self.server, &self.container.addr().to_string()))
    }

    fn faults(&self) -> Option<&dyn StoreFaults> {
        Some(self)
    }

    fn short_ttl(&self) -> Duration {
        // etcd's leases have a minimum TTL (2 s by default), which the driver reports.
        Duration::from_secs(1).max(self.capabilities.min_ttl)
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }
}

/// The faults between the members of a cluster that [`ClusterFactory`] injects, in turn, one per
/// [`StoreFaults::start_fault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberFault {
    /// The leader (etcd's Raft leader, the leader of the driver's JetStream stream) cut off from
    /// both its peers while its clients stay connected to it: the other two elect a new leader,
    /// and the old one must not grant or keep anything meanwhile.
    IsolateLeader,
    /// A follower cut off from its peers (a minority of one against a majority of two).
    IsolateFollower,
    /// One member killed, and started again with its data when the fault ends.
    KillAndRestart,
    /// Every member killed and started again in turn, each once the one before serves again.
    RollingRestart,
}

impl MemberFault {
    /// Every fault, in the order they are injected.
    pub const ALL: [MemberFault; 4] = [
        MemberFault::IsolateLeader,
        MemberFault::IsolateFollower,
        MemberFault::KillAndRestart,
        MemberFault::RollingRestart,
    ];
}

/// A 3-member cluster in containers whose store faults are [`MemberFault`]s.
pub struct ClusterFactory {
    server: ServerImage,
    cluster: ContainerCluster,
    capabilities: Capabilities,
    /// How many faults were started, and the one in force (with the member it struck).
    injected: Mutex<(usize, Option<(MemberFault, usize)>)>,
}

/// A 3-member etcd 3.5 cluster in containers, for the member-fault history.
pub async fn setup_etcd_3_5_cluster() -> anyhow::Result<Option<ClusterFactory>> {
    setup_cluster(ServerImage::Etcd3_5, Backend::Etcd).await
}

/// A 3-node NATS 2.11+ cluster with JetStream (R3) in containers, for the member-fault history.
pub async fn setup_nats_2_11_cluster() -> anyhow::Result<Option<ClusterFactory>> {
    setup_cluster(ServerImage::Nats2_11, Backend::Nats).await
}

async fn setup_cluster(
    server: ServerImage,
    backend: Backend,
) -> anyhow::Result<Option<ClusterFactory>> {
    if !harness::require(backend) || !require_launcher(Launcher::Containers) {
        return Ok(None);
    }
    let cluster = ContainerCluster::start(server).await?;
    let addrs: Vec<String> = (0..3).map(|i| cluster.client_addr(i).to_string()).collect();
    let capabilities = dlock::connect(&cluster_url(server, &addrs))
        .await?
        .capabilities()
        .clone();
    Ok(Some(ClusterFactory {
        server,
        cluster,
        capabilities,
        injected: Mutex::new((0, None)),
    }))
}

/// The URL of a cluster of `server` reached at `addrs`. The driver talks only to the addresses it
/// is given (NATS: `discover=false`), so a client behind proxies can be cut off completely.
fn cluster_url(server: ServerImage, addrs: &[String]) -> String {
    let addrs = addrs.join(",");
    match server {
        ServerImage::Nats2_9 | ServerImage::Nats2_11 => {
            format!("nats://{addrs}?replicas=3&discover=false")
        }
        _ => format!("etcd://{addrs}"),
    }
}

impl ClusterFactory {
    /// How often each fault struck.
    pub fn tally(&self) -> Vec<(MemberFault, usize)> {
        // The faults strike in turn, so the count of each follows from how many struck.
        let struck = self.injected.lock().expect("not poisoned").0;
        let kinds = MemberFault::ALL.len();
        MemberFault::ALL
            .iter()
            .enumerate()
            .map(|(k, &fault)| (fault, struck / kinds + usize::from(k < struck % kinds)))
            .collect()
    }

    fn member_addrs(&self) -> Vec<String> {
        (0..3)
            .map(|i| self.cluster.client_addr(i).to_string())
            .collect()
    }

    async fn start(&self, fault: MemberFault, turn: usize) -> anyhow::Result<usize> {
        let cluster = &self.cluster;
        Ok(match fault {
            MemberFault::IsolateLeader => {
                let leader = cluster.leader(turn % 3).await?;
                cluster.isolate(leader)?;
                leader
            }
            MemberFault::IsolateFollower => {
                let follower = (cluster.leader(turn % 3).await? + 1) % 3;
                cluster.isolate(follower)?;
                follower
            }
            MemberFault::KillAndRestart => {
                let member = turn % 3;
                cluster.kill(member).await?;
                member
            }
            MemberFault::RollingRestart => {
                for member in 0..3 {
                    cluster.kill(member).await?;
                    cluster.restart(member).await?;
                    cluster.wait_serving(member).await?;
                }
                0
            }
        })
    }

    async fn end(&self, fault: MemberFault, member: usize) -> anyhow::Result<()> {
        match fault {
            MemberFault::IsolateLeader | MemberFault::IsolateFollower => {
                self.cluster.rejoin(member)
            }
            MemberFault::KillAndRestart => self.cluster.restart(member).await,
            MemberFault::RollingRestart => Ok(()),
        }
    }
}

impl StoreFaults for ClusterFactory {
    /// None: the faults act on containers and networks.
    fn processes(&self) -> Vec<&ServerProcess> {
        Vec::new()
    }

    /// Every member frozen.
    fn pause(&self) -> anyhow::Result<()> {
        self.cluster
            .members()
            .iter()
            .try_for_each(|m| blocking(m.pause()))
    }

    fn resume(&self) -> anyhow::Result<()> {
        self.cluster
            .members()
            .iter()
            .try_for_each(|m| blocking(m.resume()))
    }

    fn start_fault(&self) -> anyhow::Result<()> {
        let turn = self.injected.lock().expect("not poisoned").0;
        let fault = MemberFault::ALL[turn % MemberFault::ALL.len()];
        let member = blocking(self.start(fault, turn))?;
        *self.injected.lock().expect("not poisoned") = (turn + 1, Some((fault, member)));
        Ok(())
    }

    fn end_fault(&self) -> anyhow::Result<()> {
        let current = self.injected.lock().expect("not poisoned").1.take();
        match current {
            Some((fault, member)) => blocking(self.end(fault, member)),
            None => Ok(()),
        }
    }
}

impl Factory for ClusterFactory {
    async fn client(&self) -> anyhow::Result<Locks> {
        Ok(dlock::connect(&cluster_url(self.server, &self.member_addrs())).await?)
    }

    async fn partitionable_client(&self) -> anyhow::Result<(Locks, Box<dyn Link>)> {
        let mut proxies = Vec::new();
        for i in 0..3 {
            proxies.push(TcpProxy::start(self.cluster.client_addr(i)).await?);
        }
        let addrs: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
        let locks = dlock::connect(&cluster_url(self.server, &addrs)).await?;
        Ok((locks, Box::new(ProxyLink(proxies))))
    }

    fn url(&self) -> Option<String> {
        Some(cluster_url(self.server, &self.member_addrs()))
    }

    fn faults(&self) -> Option<&dyn StoreFaults> {
        Some(self)
    }

    fn short_ttl(&self) -> Duration {
        // etcd's leases have a minimum TTL (2 s by default), which the driver reports.
        Duration::from_secs(1).max(self.capabilities.min_ttl)
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }
}
