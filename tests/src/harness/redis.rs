//! Redis: single servers, N independent servers, and a 3-master Redis Cluster, with optional
//! password, ACL user and TLS.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

use super::binaries::{self, os_args, ServerBinary, Tool, Wanted};
use super::dirs::ServerDir;
use super::net::{RespConnection, RespValue};
use super::process::{
    free_port, port_clash, run_helper, wait_until, ServerProcess, CLUSTER_TIMEOUT,
    PORT_CLASH_RETRIES, START_TIMEOUT,
};
use super::tls::TlsFiles;

/// Redis versions under test.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RedisVersion {
    /// Redis 7.x (Debian `redis-server`).
    #[default]
    V7,
}

impl RedisVersion {
    /// Every version under test.
    pub const ALL: [RedisVersion; 1] = [RedisVersion::V7];

    fn wanted(self) -> Wanted {
        match self {
            RedisVersion::V7 => Wanted {
                tool: Tool::RedisServer,
                label: "redis-server 7",
                env: "DLOCK_REDIS_BIN",
                install: "apt-get install -y redis-server",
                accepts: |major, _| major == 7,
            },
        }
    }

    /// The `redis-server` binary for this version, or an error naming the install command.
    pub fn binary(self) -> Result<ServerBinary> {
        binaries::find(&self.wanted())
    }
}

/// `redis-cli`, needed only to create clusters.
fn redis_cli() -> Result<ServerBinary> {
    binaries::find(&Wanted {
        tool: Tool::RedisCli,
        label: "redis-cli 7",
        env: "DLOCK_REDIS_CLI_BIN",
        install: "apt-get install -y redis-server",
        accepts: |major, _| major >= 7,
    })
}

/// Settings shared by every node started from one builder.
#[derive(Debug)]
struct Settings {
    binary: ServerBinary,
    password: Option<String>,
    user: Option<(String, String)>,
    tls: Option<TlsFiles>,
}

/// Configures and starts Redis servers. Obtained from [`RedisServer::builder`].
#[derive(Clone, Debug, Default)]
pub struct RedisBuilder {
    version: RedisVersion,
    password: Option<String>,
    user: Option<(String, String)>,
    tls: bool,
}

impl RedisBuilder {
    /// Which Redis version to run (default: [`RedisVersion::V7`]).
    pub fn version(mut self, version: RedisVersion) -> Self {
        self.version = version;
        self
    }

    /// Sets `requirepass`: the `default` user's password.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Adds an ACL user with every permission (`~* &* +@all`).
    ///
    /// Unless [`password`](Self::password) is also set, the `default` user is switched off,
    /// so only a client that authenticates as this user gets in.
    pub fn acl_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((user.into(), password.into()));
        self
    }

    /// Serves TLS only (`--port 0 --tls-port ...`), with certificates from [`TlsFiles`].
    /// Client certificates are accepted but not required.
    pub fn tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }

    fn settings(&self, cert_dir: &Path) -> Result<Arc<Settings>> {
        Ok(Arc::new(Settings {
            binary: self.version.binary()?,
            password: self.password.clone(),
            user: self.user.clone(),
            tls: if self.tls {
                Some(TlsFiles::generate(cert_dir)?)
            } else {
                None
            },
        }))
    }

    /// Starts one server and waits until it answers `PING`.
    pub async fn start(self) -> Result<RedisServer> {
        let dir = ServerDir::new("redis")?;
        let settings = self.settings(dir.path())?;
        RedisServer::start_node(settings, dir, "", false).await
    }

    /// Starts `n` independent servers (e.g. for a quorum of stores), each like
    /// [`start`](Self::start).
    pub async fn start_many(self, n: usize) -> Result<Vec<RedisServer>> {
        let starts = (0..n).map(|_| self.clone().start());
        futures::future::try_join_all(starts).await
    }

    /// Starts a 3-master Redis Cluster (no replicas) and waits until every node reports
    /// `cluster_state:ok` with all 16384 slots served.
    pub async fn start_cluster(self) -> Result<RedisCluster> {
        let dir = ServerDir::new("redis-cluster")?;
        let settings = self.settings(dir.path())?;
        let starts = (0..3).map(|i| {
            let settings = settings.clone();
            async move {
                let node_dir = ServerDir::new(&format!("redis-cluster-node{i}"))?;
                RedisServer::start_node(settings, node_dir, &format!(" cluster node {i}"), true)
                    .await
            }
        });
        let nodes = futures::future::try_join_all(starts).await?;
        let cluster = RedisCluster {
            nodes,
            settings,
            _dir: dir,
        };
        cluster.create().await?;
        cluster.wait_healthy().await?;
        Ok(cluster)
    }
}

/// A `redis-server` process on a free loopback port with its own temp directory.
///
/// No persistence (`save ""`, no AOF): a [`restart`](Self::restart) comes back empty, like a
/// crashed cache node. Cluster nodes keep their `nodes.conf`, so they rejoin with their slots.
#[derive(Debug)]
pub struct RedisServer {
    process: ServerProcess,
    port: u16,
    cluster_bus_port: Option<u16>,
    settings: Arc<Settings>,
    dir: ServerDir,
}

impl RedisServer {
    /// Starts a plain single server (no auth, no TLS).
    pub async fn start() -> Result<Self> {
        Self::builder().start().await
    }

    /// Options: version, password, ACL user, TLS; single server, N servers, or a cluster.
    pub fn builder() -> RedisBuilder {
        RedisBuilder::default()
    }

    async fn start_node(
        settings: Arc<Settings>,
        mut dir: ServerDir,
        role: &str,
        cluster: bool,
    ) -> Result<Self> {
        let mut tries = 0;
        loop {
            let port = free_port()?;
            let cluster_bus_port = if cluster { Some(free_port()?) } else { None };
            let args = node_args(&settings, port, cluster_bus_port, dir.path());
            let process = ServerProcess::spawn(
                format!(
                    "redis-server {}{role} (port {port})",
                    settings.binary.version
                ),
                &settings.binary.path,
                args,
                dir.path(),
                &dir.path().join("server.log"),
            )?;
            let server = RedisServer {
                process,
                port,
                cluster_bus_port,
                settings: settings.clone(),
                dir,
            };
            match server.wait_ready().await {
                Ok(()) => return Ok(server),
                Err(e) if port_clash(&e) && tries < PORT_CLASH_RETRIES => {
                    tries += 1;
                    dir = server.into_dir();
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn into_dir(self) -> ServerDir {
        let RedisServer { process, dir, .. } = self;
        drop(process);
        dir
    }

    async fn wait_ready(&self) -> Result<()> {
        wait_until(
            &format!("{} answers PING", self.process.label()),
            &[&self.process],
            START_TIMEOUT,
            || self.ping(),
        )
        .await
    }

    /// The port clients connect to (the TLS port when TLS is on).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The cluster bus port, for cluster nodes.
    pub fn cluster_bus_port(&self) -> Option<u16> {
        self.cluster_bus_port
    }

    /// A connection URL with credentials: `redis://[user:pass@]127.0.0.1:port`, or
    /// `rediss://...` with TLS (the client must trust [`tls`](Self::tls)`().ca_cert`).
    pub fn url(&self) -> String {
        self.url_for(self.port)
    }

    /// Like [`url`](Self::url) but for another port on the same host, e.g. a [`TcpProxy`]
    /// placed in front of this server.
    ///
    /// [`TcpProxy`]: super::TcpProxy
    pub fn url_for(&self, port: u16) -> String {
        let scheme = if self.settings.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = match (&self.settings.user, &self.settings.password) {
            (Some((u, p)), _) => format!("{}:{}@", pct(u), pct(p)),
            (None, Some(p)) => format!(":{}@", pct(p)),
            (None, None) => String::new(),
        };
        format!("{scheme}://{auth}127.0.0.1:{port}")
    }

    /// The ACL user name, if one was configured.
    pub fn username(&self) -> Option<&str> {
        self.settings.user.as_ref().map(|(u, _)| u.as_str())
    }

    /// The password clients must send: the ACL user's if one is configured, else
    /// `requirepass`.
    pub fn password(&self) -> Option<&str> {
        match (&self.settings.user, &self.settings.password) {
            (Some((_, p)), _) => Some(p),
            (None, p) => p.as_deref(),
        }
    }

    /// Certificates, when TLS is on.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.settings.tls.as_ref()
    }

    /// The process, for its pid, log and state.
    pub fn process(&self) -> &ServerProcess {
        &self.process
    }

    /// The server's temp directory (data, `server.log`, certificates of a single server).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An authenticated connection (TLS when on).
    pub async fn connect(&self) -> Result<RespConnection> {
        let mut conn = RespConnection::connect(self.addr(), self.tls()).await?;
        let auth = match (&self.settings.user, &self.settings.password) {
            (Some((u, p)), _) => Some(vec![u.as_str(), p.as_str()]),
            (None, Some(p)) => Some(vec![p.as_str()]),
            (None, None) => None,
        };
        if let Some(creds) = auth {
            let mut args = vec!["AUTH"];
            args.extend(creds);
            conn.command_ok(&args).await.context("AUTH")?;
        }
        Ok(conn)
    }

    /// Runs one command on a fresh authenticated connection.
    pub async fn command<S: AsRef<[u8]>>(&self, args: &[S]) -> Result<RespValue> {
        self.connect().await?.command(args).await
    }

    /// `Ok` when the server answers `PING` with `PONG`.
    pub async fn ping(&self) -> Result<()> {
        match self.command(&["PING"]).await? {
            RespValue::Simple(s) if s == "PONG" => Ok(()),
            other => bail!("PING answered {other:?}"),
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&self) -> Result<()> {
        self.process.kill()
    }

    /// SIGSTOP: the server holds its connections but answers nothing.
    pub fn pause(&self) -> Result<()> {
        self.process.pause()
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) -> Result<()> {
        self.process.resume()
    }

    /// Kills the server if it runs, starts it again on the same port and directory, and
    /// waits until it answers `PING`. (Cluster nodes: use [`RedisCluster::restart_member`],
    /// which also waits for the cluster to heal.)
    pub async fn restart(&self) -> Result<()> {
        self.process.respawn()?;
        self.wait_ready().await
    }

    /// `CLUSTER INFO` as `key -> value` lines.
    async fn cluster_info(&self) -> Result<Vec<(String, String)>> {
        let text = self.command(&["CLUSTER", "INFO"]).await?.as_text()?;
        Ok(text
            .lines()
            .filter_map(|l| l.trim().split_once(':'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }
}

fn node_args(
    s: &Settings,
    port: u16,
    bus_port: Option<u16>,
    dir: &Path,
) -> Vec<std::ffi::OsString> {
    let mut a: Vec<String> = vec![
        "--bind".into(),
        "127.0.0.1".into(),
        "--dir".into(),
        dir.display().to_string(),
        "--save".into(),
        String::new(),
        "--appendonly".into(),
        "no".into(),
        "--protected-mode".into(),
        "no".into(),
        "--daemonize".into(),
        "no".into(),
        "--logfile".into(),
        String::new(),
    ];
    match &s.tls {
        None => a.extend(["--port".into(), port.to_string()]),
        Some(t) => a.extend([
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            t.server_cert.display().to_string(),
            "--tls-key-file".into(),
            t.server_key.display().to_string(),
            "--tls-ca-cert-file".into(),
            t.ca_cert.display().to_string(),
            "--tls-auth-clients".into(),
            "optional".into(),
        ]),
    }
    if let Some(p) = &s.password {
        a.extend(["--requirepass".into(), p.clone()]);
    }
    if let Some((u, p)) = &s.user {
        a.extend(
            ["--user", u, "on", &format!(">{p}"), "~*", "&*", "+@all"]
                .iter()
                .map(|x| x.to_string()),
        );
        if s.password.is_none() {
            a.extend(["--user", "default", "off"].iter().map(|x| x.to_string()));
        }
    }
    if let Some(bus) = bus_port {
        a.extend([
            "--cluster-enabled".into(),
            "yes".into(),
            "--cluster-config-file".into(),
            dir.join("nodes.conf").display().to_string(),
            "--cluster-port".into(),
            bus.to_string(),
            // Short enough that a killed or paused node is noticed within a test.
            "--cluster-node-timeout".into(),
            "5000".into(),
        ]);
        if s.tls.is_some() {
            a.extend(["--tls-cluster".into(), "yes".into()]);
        }
    }
    os_args(a)
}

/// Percent-encodes a URL userinfo part.
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A 3-master Redis Cluster without replicas, every node on loopback.
///
/// With no replicas there is no failover: while a member is down or paused its slots are not
/// served and, after the node timeout (5 s), the others report `cluster_state:fail`.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    settings: Arc<Settings>,
    _dir: ServerDir,
}

impl RedisCluster {
    /// Starts a plain 3-master cluster (no auth, no TLS).
    pub async fn start() -> Result<Self> {
        RedisServer::builder().start_cluster().await
    }

    /// All members.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Member `i`.
    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always `false`; clusters have members.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Seed URLs of every member (with credentials, `rediss://` under TLS).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// `127.0.0.1:port` of every member.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(RedisServer::addr).collect()
    }

    /// Certificates, when TLS is on.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.settings.tls.as_ref()
    }

    /// SIGKILL member `i`.
    pub fn kill_member(&self, i: usize) -> Result<()> {
        self.node(i).kill()
    }

    /// SIGSTOP member `i`.
    pub fn pause_member(&self, i: usize) -> Result<()> {
        self.node(i).pause()
    }

    /// SIGCONT member `i`.
    pub fn resume_member(&self, i: usize) -> Result<()> {
        self.node(i).resume()
    }

    /// Restarts member `i` on its ports and `nodes.conf`, then waits until every member
    /// reports the cluster healthy again.
    pub async fn restart_member(&self, i: usize) -> Result<()> {
        self.node(i).restart().await?;
        self.wait_healthy().await
    }

    async fn create(&self) -> Result<()> {
        let cli = redis_cli()?;
        let mut cmd = tokio::process::Command::new(&cli.path);
        if let Some(t) = &self.settings.tls {
            cmd.arg("--tls").arg("--cacert").arg(&t.ca_cert);
        }
        match (&self.settings.user, &self.settings.password) {
            (Some((u, p)), _) => {
                cmd.args(["--user", u, "--pass", p, "--no-auth-warning"]);
            }
            (None, Some(p)) => {
                cmd.args(["-a", p, "--no-auth-warning"]);
            }
            (None, None) => {}
        }
        cmd.args(["--cluster", "create"]);
        for n in &self.nodes {
            cmd.arg(n.addr().to_string());
        }
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"]);
        run_helper(cmd, CLUSTER_TIMEOUT)
            .await
            .context("creating the Redis Cluster")?;
        Ok(())
    }

    /// Waits until every member that is running and not paused reports `cluster_state:ok`,
    /// all 16384 slots ok, and knows every other member.
    pub async fn wait_healthy(&self) -> Result<()> {
        let procs: Vec<&ServerProcess> = self
            .nodes
            .iter()
            .map(|n| &n.process)
            .filter(|p| p.is_running())
            .collect();
        let total = self.nodes.len().to_string();
        wait_until(
            "every Redis Cluster member reports cluster_state:ok with 16384 slots",
            &procs,
            CLUSTER_TIMEOUT,
            || async {
                for n in self.nodes.iter().filter(|n| n.process.is_serving()) {
                    let info = n.cluster_info().await?;
                    let get = |k: &str| {
                        info.iter()
                            .find(|(key, _)| key == k)
                            .map(|(_, v)| v.as_str())
                            .unwrap_or("?")
                    };
                    let (state, slots, known) = (
                        get("cluster_state"),
                        get("cluster_slots_ok"),
                        get("cluster_known_nodes"),
                    );
                    if state != "ok" || slots != "16384" || known != total {
                        return Err(anyhow!(
                            "{}: cluster_state:{state} cluster_slots_ok:{slots} cluster_known_nodes:{known}",
                            n.process.label()
                        ));
                    }
                }
                Ok(())
            },
        )
        .await
    }
}
