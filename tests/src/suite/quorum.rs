//! The conformance factories of the majority quorum: three in-memory stores, three standalone Redis
//! servers, and a mixed quorum of Redis, etcd and NATS JetStream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dlock::{Capabilities, Driver, Locks, MemoryDriver, Quorum};

use super::memory::{CutSwitch, CuttableDriver};
use super::{Factory, Link, ProxyLink, StoreFaults};
use crate::harness::redis::RedisPersistence;
use crate::harness::{
    self, Backend, EtcdServer, EtcdVersion, NatsServer, NatsVersion, RedisServer, ServerProcess,
    TcpProxy,
};

/// One member server of a quorum under test.
enum MemberServer {
    Redis(RedisServer),
    Etcd(EtcdServer),
    Nats(NatsServer),
}

impl MemberServer {
    fn addr(&self) -> SocketAddr {
        match self {
            MemberServer::Redis(s) => s.addr(),
            MemberServer::Etcd(s) => s.addr(),
            MemberServer::Nats(s) => s.addr(),
        }
    }

    /// The member's URL, reaching it through `port` on loopback.
    fn url_via(&self, port: u16) -> String {
        match self {
            MemberServer::Redis(s) => s.url_for(port),
            MemberServer::Etcd(_) => format!("etcd://127.0.0.1:{port}"),
            MemberServer::Nats(_) => format!("nats://127.0.0.1:{port}?discover=false"),
        }
    }

    fn url(&self) -> String {
        self.url_via(self.addr().port())
    }

    fn processes(&self) -> Vec<&ServerProcess> {
        match self {
            MemberServer::Redis(s) => vec![s.process()],
            MemberServer::Etcd(s) => s
                .as_cluster()
                .members()
                .iter()
                .map(|m| m.process())
                .collect(),
            MemberServer::Nats(s) => s.as_cluster().nodes().iter().map(|n| n.process()).collect(),
        }
    }
}

enum Members {
    Memory([MemoryDriver; 3]),
    Servers(Vec<MemberServer>),
}

/// A quorum under test.
pub struct QuorumFactory {
    members: Members,
    capabilities: Capabilities,
}

/// Three in-memory stores.
pub async fn setup_memory() -> anyhow::Result<Option<QuorumFactory>> {
    let members = Members::Memory(Default::default());
    QuorumFactory::new(members).await.map(Some)
}

/// Three standalone Redis servers, each with `appendfsync always` (a quorum member must keep its
/// grants and fence register through a restart).
pub async fn setup_redis() -> anyhow::Result<Option<QuorumFactory>> {
    if !harness::require(Backend::Redis) {
        return Ok(None);
    }
    let servers = RedisServer::builder()
        .persistence(RedisPersistence::AofAlways)
        .start_many(3)
        .await?;
    let members = Members::Servers(servers.into_iter().map(MemberServer::Redis).collect());
    QuorumFactory::new(members).await.map(Some)
}

/// Redis, etcd and NATS JetStream, one of each.
pub async fn setup_mixed() -> anyhow::Result<Option<QuorumFactory>> {
    if !(harness::require(Backend::Redis)
        && harness::require(Backend::Etcd)
        && harness::require(Backend::Nats))
    {
        return Ok(None);
    }
    let (redis, etcd, nats) = tokio::try_join!(
        RedisServer::builder()
            .persistence(RedisPersistence::AofAlways)
            .start(),
        EtcdServer::start(EtcdVersion::V3_5),
        NatsServer::start(NatsVersion::V2_11Plus),
    )?;
    let members = Members::Servers(vec![
        MemberServer::Redis(redis),
        MemberServer::Etcd(etcd),
        MemberServer::Nats(nats),
    ]);
    QuorumFactory::new(members).await.map(Some)
}

impl QuorumFactory {
    async fn new(members: Members) -> anyhow::Result<Self> {
        let mut factory = QuorumFactory {
            members,
            capabilities: Capabilities::new("quorum"),
        };
        factory.capabilities = factory.client().await?.capabilities().clone();
        Ok(factory)
    }

    /// A quorum driver of its own over the members, e.g. for [`Quorum::inspect_members`].
    pub async fn quorum_driver(&self) -> anyhow::Result<Quorum> {
        match &self.members {
            Members::Memory(stores) => Ok(Quorum::new(stores.clone())?),
            Members::Servers(servers) => {
                let mut drivers = Vec::new();
                for server in servers {
                    drivers.push(Arc::clone(dlock::connect(&server.url()).await?.driver()));
                }
                Ok(Quorum::from_arcs(drivers)?)
            }
        }
    }

    /// Starts member `member`'s processes again (after a kill) on their ports and data.
    pub fn restart_member(&self, member: usize) -> anyhow::Result<()> {
        self.member_processes(member)
            .into_iter()
            .try_for_each(|p| p.respawn())
    }

    /// The member servers (none for the in-memory quorum), for faults on single members.
    pub fn member_processes(&self, member: usize) -> Vec<&ServerProcess> {
        match &self.members {
            Members::Memory(_) => Vec::new(),
            Members::Servers(servers) => servers[member].processes(),
        }
    }
}

/// Cuts every member link of one client at once.
struct AllLinks(Vec<CutSwitch>);

impl Link for AllLinks {
    fn set_cut(&self, cut: bool) {
        for link in &self.0 {
            link.set_cut(cut);
        }
    }
}

impl StoreFaults for QuorumFactory {
    fn processes(&self) -> Vec<&ServerProcess> {
        match &self.members {
            Members::Memory(_) => Vec::new(),
            Members::Servers(servers) => servers.iter().flat_map(|s| s.processes()).collect(),
        }
    }
}

impl Factory for QuorumFactory {
    async fn client(&self) -> anyhow::Result<Locks> {
        match &self.members {
            Members::Memory(stores) => Ok(Locks::new(Quorum::new(stores.clone())?)),
            Members::Servers(_) => {
                Ok(dlock::connect(&self.url().expect("servers have URLs")).await?)
            }
        }
    }

    async fn partitionable_client(&self) -> anyhow::Result<(Locks, Box<dyn Link>)> {
        match &self.members {
            Members::Memory(stores) => {
                let mut drivers: Vec<Arc<dyn Driver>> = Vec::new();
                let mut switches = Vec::new();
                for store in stores {
                    let (driver, switch) = CuttableDriver::new(store.clone());
                    drivers.push(Arc::new(driver));
                    switches.push(switch);
                }
                Ok((
                    Locks::new(Quorum::from_arcs(drivers)?),
                    Box::new(AllLinks(switches)),
                ))
            }
            Members::Servers(servers) => {
                let mut proxies = Vec::new();
                let mut urls = Vec::new();
                for server in servers {
                    let proxy = TcpProxy::start(server.addr()).await?;
                    urls.push(server.url_via(proxy.port()));
                    proxies.push(proxy);
                }
                let locks = dlock::connect(&format!("quorum:{}", urls.join(";"))).await?;
                Ok((locks, Box::new(ProxyLink(proxies))))
            }
        }
    }

    fn url(&self) -> Option<String> {
        match &self.members {
            Members::Memory(_) => None,
            Members::Servers(servers) => Some(format!(
                "quorum:{}",
                servers
                    .iter()
                    .map(MemberServer::url)
                    .collect::<Vec<_>>()
                    .join(";")
            )),
        }
    }

    fn faults(&self) -> Option<&dyn StoreFaults> {
        match &self.members {
            Members::Memory(_) => None,
            Members::Servers(_) => Some(self),
        }
    }

    fn short_ttl(&self) -> Duration {
        match &self.members {
            Members::Memory(_) => Duration::from_millis(300),
            Members::Servers(_) => Duration::from_secs(2).max(self.capabilities.min_ttl),
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }
}
