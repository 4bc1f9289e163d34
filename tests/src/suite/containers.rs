//! The conformance factories on containers: one server of each store and version the suite covers,
//! started by `testcontainers` from the images `scripts/build-test-images` builds (or the images
//! the `DLOCK_IMAGE_*` variables name), each on a private network of its own.

use std::time::Duration;

use dlock::{Capabilities, Locks};

use super::{Factory, Link, ProxyLink, StoreFaults};
use crate::harness::containers::{require_launcher, Launcher, ServerContainer, ServerImage};
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
