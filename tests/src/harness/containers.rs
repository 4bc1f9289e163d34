//! Servers as containers, started through `testcontainers`, each on a private Docker network of
//! its own and reached at its own address there (the host routes to the network's bridge; nothing
//! is published on the host's ports).
//!
//! No registry is reachable on the test machines, so the images are local ones that
//! `scripts/build-test-images` builds from this machine's server binaries. Each image name can be
//! overridden by environment (`DLOCK_IMAGE_REDIS_7=redis:7`, …), so the same suite runs on the
//! official images where they can be pulled.
//!
//! Which launcher runs is picked by `DLOCK_TEST_SERVERS`: `processes`, `containers`, or unset for
//! both. A launcher left out shows as a `SKIPPED` line, as a backend opted out does.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use testcontainers::core::WaitFor;
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};
use testcontainers_modules::nats::Nats;
use testcontainers_modules::redis::Redis;

/// The environment variable that picks the launchers.
pub const LAUNCHER_ENV: &str = "DLOCK_TEST_SERVERS";

/// How the harness starts servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// Local processes on loopback ports.
    Processes,
    /// Containers on private Docker networks.
    Containers,
}

impl Launcher {
    fn name(self) -> &'static str {
        match self {
            Launcher::Processes => "processes",
            Launcher::Containers => "containers",
        }
    }
}

/// Whether `launcher` runs (per [`LAUNCHER_ENV`]); prints a `SKIPPED` line for the current test when
/// it does not. An unknown value fails the test, naming the accepted ones.
pub fn require_launcher(launcher: Launcher) -> bool {
    let value = std::env::var(LAUNCHER_ENV).unwrap_or_default();
    let runs = match value.trim().to_ascii_lowercase().as_str() {
        "" | "all" | "both" => true,
        "processes" => launcher == Launcher::Processes,
        "containers" => launcher == Launcher::Containers,
        _ => panic!(
            "{LAUNCHER_ENV}={value:?}: use processes, containers, or leave it unset for both"
        ),
    };
    if !runs {
        let thread = std::thread::current();
        let test = thread.name().unwrap_or("<unnamed test>");
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: {LAUNCHER_ENV}={value} leaves out the {} launcher",
            launcher.name()
        );
    }
    runs
}

/// A server image the suite runs as a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerImage {
    /// Redis 7, stand-alone.
    Redis7,
    /// etcd 3.4, one member.
    Etcd3_4,
    /// etcd 3.5, one member.
    Etcd3_5,
    /// NATS 2.9 with JetStream.
    Nats2_9,
    /// NATS 2.11 or later with JetStream (per-message TTL).
    Nats2_11,
}

impl ServerImage {
    /// The variable that overrides the image, and the local image `scripts/build-test-images`
    /// builds.
    fn env_and_default(self) -> (&'static str, &'static str) {
        match self {
            ServerImage::Redis7 => ("DLOCK_IMAGE_REDIS_7", "dlock-test/redis:7"),
            ServerImage::Etcd3_4 => ("DLOCK_IMAGE_ETCD_3_4", "dlock-test/etcd:3.4"),
            ServerImage::Etcd3_5 => ("DLOCK_IMAGE_ETCD_3_5", "dlock-test/etcd:3.5"),
            ServerImage::Nats2_9 => ("DLOCK_IMAGE_NATS_2_9", "dlock-test/nats:2.9"),
            ServerImage::Nats2_11 => ("DLOCK_IMAGE_NATS_2_11", "dlock-test/nats:2.11"),
        }
    }

    /// `name:tag` of the image to run.
    pub fn image(self) -> String {
        let (env, default) = self.env_and_default();
        std::env::var(env)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| default.to_string())
    }

    fn client_port(self) -> u16 {
        match self {
            ServerImage::Redis7 => 6379,
            ServerImage::Etcd3_4 | ServerImage::Etcd3_5 => 2379,
            ServerImage::Nats2_9 | ServerImage::Nats2_11 => 4222,
        }
    }
}

/// The running container, by the image type `testcontainers` started it with.
enum Running {
    Redis(ContainerAsync<Redis>),
    Nats(ContainerAsync<Nats>),
    Etcd(ContainerAsync<GenericImage>),
}

/// Runs `$body` with `$c` bound to the container, whichever image type started it.
macro_rules! on_container {
    ($running:expr, $c:ident => $body:expr) => {
        match $running {
            Running::Redis($c) => $body,
            Running::Nats($c) => $body,
            Running::Etcd($c) => $body,
        }
    };
}

/// One server in a container of its own, on a private network of its own. Removed (with its
/// network) when dropped.
pub struct ServerContainer {
    running: Running,
    image: String,
    addr: SocketAddr,
}

/// Names a private network per container, unique within this test process and across processes.
fn network_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "dlock-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// Splits `name:tag` (a registry host may carry a port: the tag is after the last `:` that
/// follows the last `/`).
fn split_image(image: &str) -> Result<(String, String)> {
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[slash..].rfind(':') {
        Some(i) if i + 1 < image.len() - slash => Ok((
            image[..slash + i].to_string(),
            image[slash + i + 1..].to_string(),
        )),
        _ => bail!("image {image:?} has no tag; write it as name:tag"),
    }
}

impl ServerContainer {
    /// Starts `server` on a new private network and waits until it serves.
    pub async fn start(server: ServerImage) -> Result<ServerContainer> {
        let image = server.image();
        let (name, tag) = split_image(&image)?;
        let network = network_name();
        let startup = Duration::from_secs(60);
        let hint = || {
            format!(
                "starting a container from {image} (build the local images with scripts/build-test-images, or set {} to an image you can pull)",
                server.env_and_default().0
            )
        };
        let running = match server {
            ServerImage::Redis7 => Running::Redis(
                Redis::default()
                    .with_name(name)
                    .with_tag(tag)
                    .with_network(network)
                    .with_startup_timeout(startup)
                    // Protected mode refuses clients from other addresses when no password is
                    // set; the official image turns it off at build time, Debian's binary does not.
                    // Every write is on disk before its reply, so a restart loses nothing.
                    .with_cmd([
                        "--protected-mode",
                        "no",
                        "--save",
                        "",
                        "--appendonly",
                        "yes",
                        "--appendfsync",
                        "always",
                    ])
                    .start()
                    .await
                    .with_context(hint)?,
            ),
            ServerImage::Nats2_9 | ServerImage::Nats2_11 => Running::Nats(
                Nats::default()
                    .with_name(name)
                    .with_tag(tag)
                    .with_network(network)
                    .with_startup_timeout(startup)
                    .with_cmd(["--jetstream", "--store_dir", "/nats-data"])
                    .start()
                    .await
                    .with_context(hint)?,
            ),
            ServerImage::Etcd3_4 | ServerImage::Etcd3_5 => Running::Etcd(
                GenericImage::new(name, tag)
                    .with_wait_for(WaitFor::message_on_stderr("serving client traffic"))
                    .with_network(network)
                    .with_startup_timeout(startup)
                    .with_cmd(etcd_cmd("m0"))
                    .start()
                    .await
                    .with_context(hint)?,
            ),
        };
        let ip = on_container!(&running, c => c.get_bridge_ip_address().await)
            .with_context(|| format!("the address of the {image} container"))?;
        let addr = SocketAddr::new(ip, server.client_port());
        let container = ServerContainer {
            running,
            image,
            addr,
        };
        eprintln!(
            "launcher: containers ({} as {} at {})",
            container.image,
            container.id(),
            container.addr
        );
        Ok(container)
    }

    /// The server's client address on its private network.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The container's IP address.
    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }

    fn id(&self) -> &str {
        on_container!(&self.running, c => c.id())
    }

    /// Freezes every process in the container (the cgroup freezer, as `docker pause`).
    pub async fn pause(&self) -> Result<()> {
        on_container!(&self.running, c => c.pause().await)
            .with_context(|| format!("pausing {}", self.id()))
    }

    /// Thaws a paused container.
    pub async fn resume(&self) -> Result<()> {
        on_container!(&self.running, c => c.unpause().await)
            .with_context(|| format!("resuming {}", self.id()))
    }

    /// Stops the server with no grace period (Docker's stop with a zero timeout: SIGKILL right after
    /// the stop signal) and starts the same container again, with its data. Fails if it comes back
    /// on another address, which its clients could not follow.
    pub async fn crash_and_restart(&self) -> Result<()> {
        let (stopped, started, ip) = on_container!(&self.running, c => (
            c.stop_with_timeout(Some(0)).await,
            c.start().await,
            c.get_bridge_ip_address().await,
        ));
        stopped.with_context(|| format!("killing {}", self.id()))?;
        started.with_context(|| format!("starting {} again", self.id()))?;
        let ip = ip.with_context(|| format!("the address of {} after its restart", self.id()))?;
        if ip != self.ip() {
            bail!(
                "{} came back on {ip}, not {}: its clients cannot follow",
                self.id(),
                self.ip()
            );
        }
        Ok(())
    }
}

/// Runs the `docker` command line: `testcontainers` starts and stops containers but has no calls
/// for networks with a subnet of their own or for moving a running container between networks.
fn docker(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .context("running docker (is the Docker engine installed?)")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A private Docker network with a /24 subnet of its own, so a member that leaves it comes back on
/// the same address. Removed when dropped (after the containers on it).
pub struct DockerNetwork {
    name: String,
    /// The first three octets of the subnet.
    prefix: [u8; 3],
}

impl DockerNetwork {
    /// Creates a network named after `role`, on the first free subnet of 10.213.0.0/16 counting
    /// from one this process picks.
    pub fn create(role: &str) -> Result<DockerNetwork> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("{}-{role}", network_name());
        let start = std::process::id() % 200;
        let mut last_error = None;
        for _ in 0..256 {
            let third = ((start + NEXT.fetch_add(1, Ordering::SeqCst)) % 256) as u8;
            let prefix = [10, 213, third];
            let subnet = format!("10.213.{third}.0/24");
            match docker(&["network", "create", "--subnet", &subnet, &name]) {
                Ok(_) => return Ok(DockerNetwork { name, prefix }),
                // Another network (of this run or another) holds the subnet: try the next one.
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("tried at least once"))
            .with_context(|| format!("no free subnet in 10.213.0.0/16 for network {name}"))
    }

    /// The network's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address `.host` of the subnet.
    pub fn ip(&self, host: u8) -> IpAddr {
        let [a, b, c] = self.prefix;
        IpAddr::from([a, b, c, host])
    }

    /// Attaches `container` at `ip`.
    pub fn connect(&self, container: &str, ip: IpAddr) -> Result<()> {
        docker(&[
            "network",
            "connect",
            "--ip",
            &ip.to_string(),
            &self.name,
            container,
        ])
        .map(drop)
    }

    /// Detaches `container`: nothing on this network reaches it any more, nor it them.
    pub fn disconnect(&self, container: &str) -> Result<()> {
        docker(&["network", "disconnect", "--force", &self.name, container]).map(drop)
    }
}

impl Drop for DockerNetwork {
    fn drop(&mut self) {
        if let Err(e) = docker(&["network", "rm", &self.name]) {
            eprintln!("could not remove network {}: {e:#}", self.name);
        }
    }
}

/// One member of a [`ContainerCluster`].
pub struct ClusterMember {
    container: ContainerAsync<GenericImage>,
    peer_ip: IpAddr,
    client_ip: IpAddr,
}

impl ClusterMember {
    /// Its container's id.
    pub fn id(&self) -> &str {
        self.container.id()
    }

    /// Freezes the member.
    pub async fn pause(&self) -> Result<()> {
        self.container
            .pause()
            .await
            .with_context(|| format!("pausing {}", self.id()))
    }

    /// Thaws a paused member.
    pub async fn resume(&self) -> Result<()> {
        self.container
            .unpause()
            .await
            .with_context(|| format!("resuming {}", self.id()))
    }
}

/// The store a [`ContainerCluster`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClusterKind {
    Etcd,
    Nats,
}

/// A 3-member cluster (etcd, or NATS with JetStream) in containers on two private networks: the
/// members talk to each other on the peers' network only, and clients reach them on the clients'
/// network only, so a member cut off from its peers still serves (or refuses) the clients connected
/// to it, as a partitioned member in the field does.
///
/// The members are `GenericImage`s for both stores: a member serves only once its peers are up,
/// so none is waited for until all three run (the module images would wait for each).
pub struct ContainerCluster {
    kind: ClusterKind,
    // Dropped before the networks they are on.
    members: Vec<ClusterMember>,
    peers: DockerNetwork,
    _clients: DockerNetwork,
    image: String,
}

/// The JetStream stream the driver uses unless told otherwise.
const NATS_STREAM: &str = "DLOCK";

impl ContainerCluster {
    /// Starts a 3-member cluster of `server` (an etcd or a NATS image) and waits until every
    /// member serves.
    pub async fn start(server: ServerImage) -> Result<ContainerCluster> {
        let kind = match server {
            ServerImage::Etcd3_4 | ServerImage::Etcd3_5 => ClusterKind::Etcd,
            ServerImage::Nats2_9 | ServerImage::Nats2_11 => ClusterKind::Nats,
            ServerImage::Redis7 => bail!("the container clusters are etcd and NATS"),
        };
        let image = server.image();
        let (name, tag) = split_image(&image)?;
        let peers = DockerNetwork::create("peers")?;
        let clients = DockerNetwork::create("clients")?;
        let peer_ips: Vec<IpAddr> = (0..3).map(|i| peers.ip(10 + i)).collect();
        let mut members = Vec::new();
        for (i, peer_ip) in peer_ips.iter().enumerate() {
            let cmd = match kind {
                ClusterKind::Etcd => etcd_member_cmd(i, &peer_ips, peers.name()),
                ClusterKind::Nats => nats_node_cmd(i, &peer_ips),
            };
            let container = GenericImage::new(name.clone(), tag.clone())
                .with_network(clients.name())
                .with_cmd(cmd)
                .start()
                .await
                .with_context(|| {
                    format!(
                        "starting cluster member {i} from {image} (build the local images with scripts/build-test-images, or set {})",
                        server.env_and_default().0
                    )
                })?;
            peers.connect(container.id(), *peer_ip)?;
            let client_ip = container
                .get_bridge_ip_address()
                .await
                .with_context(|| format!("the address of cluster member {i}"))?;
            members.push(ClusterMember {
                container,
                peer_ip: *peer_ip,
                client_ip,
            });
        }
        let cluster = ContainerCluster {
            kind,
            members,
            peers,
            _clients: clients,
            image,
        };
        for i in 0..3 {
            cluster.wait_serving(i).await?;
        }
        eprintln!(
            "launcher: containers (cluster of {} at {})",
            cluster.image,
            (0..3)
                .map(|i| cluster.client_addr(i).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(cluster)
    }

    /// The members, in the order of their names (etcd's m0..m2, NATS's n0..n2).
    pub fn members(&self) -> &[ClusterMember] {
        &self.members
    }

    /// Where clients reach member `i` (on the clients' network).
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        let port = match self.kind {
            ClusterKind::Etcd => 2379,
            ClusterKind::Nats => 4222,
        };
        SocketAddr::new(self.members[i].client_ip, port)
    }

    /// Member `i`'s monitoring address: etcd serves it on the client port, NATS on 8222.
    fn monitor_addr(&self, i: usize) -> SocketAddr {
        match self.kind {
            ClusterKind::Etcd => self.client_addr(i),
            ClusterKind::Nats => SocketAddr::new(self.members[i].client_ip, 8222),
        }
    }

    /// Waits (bounded) until member `i` is healthy: in a cluster with a leader (for NATS: a
    /// JetStream meta leader).
    pub async fn wait_serving(&self, i: usize) -> Result<()> {
        let mut last = String::new();
        for _ in 0..600 {
            match self.serving(i).await {
                Ok(()) => return Ok(()),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("cluster member {i} is not healthy after 60 s: {last}")
    }

    async fn serving(&self, i: usize) -> Result<()> {
        let addr = self.monitor_addr(i);
        match self.kind {
            ClusterKind::Etcd => {
                let r = super::net::http_get(addr, "/health").await?;
                if r.status != 200 || !r.body.contains("\"true\"") {
                    bail!("/health: HTTP {}: {}", r.status, r.body.trim());
                }
            }
            ClusterKind::Nats => {
                let r = super::net::http_get(addr, "/healthz").await?;
                if r.json().ok().is_none_or(|v| v["status"] != "ok") {
                    bail!("/healthz: HTTP {}: {}", r.status, r.body.trim());
                }
                let jsz = super::net::http_get(addr, "/jsz").await?.ok()?.json()?;
                if jsz["meta_cluster"]["leader"]
                    .as_str()
                    .is_none_or(str::is_empty)
                {
                    bail!("no JetStream meta leader yet");
                }
            }
        }
        Ok(())
    }

    /// The index of the member that leads, as member `asked` sees it: etcd's Raft leader; for
    /// NATS the leader of the driver's stream once it exists (the meta leader before).
    pub async fn leader(&self, asked: usize) -> Result<usize> {
        match self.kind {
            ClusterKind::Etcd => {
                let status = |i: usize| async move {
                    super::net::http_post_json(
                        self.monitor_addr(i),
                        "/v3/maintenance/status",
                        &serde_json::json!({}),
                    )
                    .await?
                    .ok()?
                    .json()
                };
                let seen = status(asked).await?;
                let leader = seen["leader"]
                    .as_str()
                    .with_context(|| format!("no leader in {seen}"))?
                    .to_string();
                for i in 0..self.members.len() {
                    if status(i).await?["header"]["member_id"].as_str() == Some(leader.as_str()) {
                        return Ok(i);
                    }
                }
                bail!("no member has the id of the leader {leader}")
            }
            ClusterKind::Nats => {
                let addr = self.monitor_addr(asked);
                let jsz = super::net::http_get(addr, "/jsz?accounts=true&streams=true")
                    .await?
                    .ok()?
                    .json()?;
                let stream_leader = jsz["account_details"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
                    .find(|s| s["name"] == NATS_STREAM)
                    .and_then(|s| s["cluster"]["leader"].as_str().map(str::to_string));
                let leader = stream_leader
                    .or_else(|| jsz["meta_cluster"]["leader"].as_str().map(str::to_string))
                    .filter(|l| !l.is_empty())
                    .with_context(|| format!("member {asked} knows no leader"))?;
                leader
                    .strip_prefix('n')
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|&n| n < self.members.len())
                    .with_context(|| format!("the leader {leader:?} is not one of n0..n2"))
            }
        }
    }

    /// Cuts member `i` off from its peers (its clients still reach it).
    pub fn isolate(&self, i: usize) -> Result<()> {
        self.peers.disconnect(self.members[i].id())
    }

    /// Joins member `i` to its peers again, on its address.
    pub fn rejoin(&self, i: usize) -> Result<()> {
        let member = &self.members[i];
        self.peers.connect(member.id(), member.peer_ip)
    }

    /// Stops member `i` with no grace period.
    pub async fn kill(&self, i: usize) -> Result<()> {
        self.members[i]
            .container
            .stop_with_timeout(Some(0))
            .await
            .with_context(|| format!("killing cluster member {i}"))
    }

    /// Starts a killed member `i` again with its data, on both its addresses.
    pub async fn restart(&self, i: usize) -> Result<()> {
        let member = &self.members[i];
        member
            .container
            .start()
            .await
            .with_context(|| format!("starting cluster member {i} again"))?;
        let client_ip = member.container.get_bridge_ip_address().await?;
        if client_ip != member.client_ip {
            bail!(
                "cluster member {i} came back on {client_ip}, not {}: its clients cannot follow",
                member.client_ip
            );
        }
        Ok(())
    }
}

/// An etcd member named `name` serving clients on every interface. The official image has no
/// entrypoint, so the command names the binary. Clients are given every member's address; nothing
/// discovers the advertised client URL.
fn etcd_cmd(name: &str) -> Vec<String> {
    [
        "/usr/local/bin/etcd",
        "--name",
        name,
        "--data-dir",
        "/etcd-data",
        "--listen-client-urls",
        "http://0.0.0.0:2379",
        "--advertise-client-urls",
        "http://127.0.0.1:2379",
        "--logger",
        "zap",
    ]
    .map(str::to_string)
    .to_vec()
}

/// etcd member `i` of three whose peers are at `peer_ips`.
fn etcd_member_cmd(i: usize, peer_ips: &[IpAddr], token: &str) -> Vec<String> {
    let initial_cluster = peer_ips
        .iter()
        .enumerate()
        .map(|(j, ip)| format!("m{j}=http://{ip}:2380"))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = etcd_cmd(&format!("m{i}"));
    cmd.extend(
        [
            "--listen-peer-urls",
            "http://0.0.0.0:2380",
            "--initial-advertise-peer-urls",
            &format!("http://{}:2380", peer_ips[i]),
            "--initial-cluster",
            &initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            token,
        ]
        .map(str::to_string),
    );
    cmd
}

/// NATS node `i` of three with JetStream, routes to the others at `peer_ips`, monitoring on 8222.
/// Clients connect with `discover=false`, so the client addresses servers gossip (which include
/// the peers' network) are never used.
fn nats_node_cmd(i: usize, peer_ips: &[IpAddr]) -> Vec<String> {
    let routes = peer_ips
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != i)
        .map(|(_, ip)| format!("nats://{ip}:6222"))
        .collect::<Vec<_>>()
        .join(",");
    [
        "--server_name",
        &format!("n{i}"),
        "--jetstream",
        "--store_dir",
        "/nats-data",
        "--http_port",
        "8222",
        "--cluster_name",
        "dlock",
        // On every interface: the peers' network is attached only once the container runs.
        "--cluster",
        "nats://0.0.0.0:6222",
        "--cluster_advertise",
        &format!("{}:6222", peer_ips[i]),
        "--routes",
        &routes,
    ]
    .map(str::to_string)
    .to_vec()
}

#[cfg(test)]
mod tests {
    use super::split_image;

    #[test]
    fn image_names_split_at_the_tag() {
        assert_eq!(
            split_image("redis:7").unwrap(),
            ("redis".into(), "7".into())
        );
        assert_eq!(
            split_image("quay.io/coreos/etcd:v3.5.17").unwrap(),
            ("quay.io/coreos/etcd".into(), "v3.5.17".into())
        );
        assert_eq!(
            split_image("localhost:5000/dlock-test/nats:2.11").unwrap(),
            ("localhost:5000/dlock-test/nats".into(), "2.11".into())
        );
        let err = split_image("localhost:5000/redis").unwrap_err().to_string();
        assert!(err.contains("no tag"), "{err}");
    }
}
