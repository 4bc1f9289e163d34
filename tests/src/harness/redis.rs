//! Redis: single servers, N independent servers, and a 3-master Redis Cluster, with optional
//! password, ACL user, TLS, persistence (AOF) and a steppable wall clock.
//!
//! # Persistence
//! By default a server keeps nothing across a restart ([`RedisPersistence::None`]), like a crashed
//! cache node. [`RedisPersistence::AofAlways`] runs it with `appendonly yes` and `appendfsync always`
//! in its own data directory, which outlives [`RedisServer::restart`], `kill -9` and respawn: the
//! settings the driver's documentation asks lock stores to run with.
//!
//! # A steppable clock
//! [`RedisBuilder::fake_clock`] starts `redis-server` under libfaketime (Debian package `faketime`,
//! or `DLOCK_LIBFAKETIME=/path/libfaketime.so.1`) with an offset the test changes at run time
//! ([`RedisServer::step_clock`]): `FAKETIME_TIMESTAMP_FILE` names a file in the server's directory,
//! `FAKETIME_NO_CACHE=1` makes every clock read consult it, and `FAKETIME_DONT_FAKE_MONOTONIC=1`
//! leaves `CLOCK_MONOTONIC` alone, so a step moves the wall clock (`CLOCK_REALTIME`,
//! `gettimeofday`, `time`) and nothing else, as `date -s` on the server's host would.
//!
//! Debian's libfaketime 0.9.10 cannot start Debian's `redis-server` as it is: the server allocates
//! with jemalloc, which reads the clock (and calls `pthread_cond_init`, also wrapped) while it
//! initialises under its own lock; libfaketime, initialising on that first call, looks up three
//! symbols glibc 2.34+ no longer has (`__ftime`, `timer_settime@GLIBC_2.2`,
//! `timer_gettime@GLIBC_2.2`), and the failed look-ups — and its semaphore set-up — allocate, so the
//! process deadlocks before `main` (libfaketime issue #130; later releases add
//! `FAKETIME_IGNORE_SYMBOLS`). Two things avoid it, both found by experiment and checked by the
//! clock tests:
//! - a stub library preloaded after libfaketime defines those three symbols, so its look-ups succeed
//!   without allocating. It is compiled once per machine with `cc` (present wherever cargo links)
//!   into `$TMPDIR/dlock-harness-faketime/`; its functions are never called;
//! - every library the server links is preloaded *before* libfaketime, which puts libfaketime's
//!   constructor ahead of theirs: it then finishes its symbol look-ups before anything has allocated,
//!   and jemalloc initialises inside libfaketime's semaphore set-up, where the clock wrappers already
//!   work.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

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

/// Whether a server keeps its data across a restart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RedisPersistence {
    /// Nothing on disk (`save ""`, `appendonly no`): a restart comes back empty.
    #[default]
    None,
    /// The append-only file, written and fsynced before each reply (`appendonly yes`,
    /// `appendfsync always`; no RDB snapshots): a restart, also after `kill -9`, comes back with every
    /// write the server acknowledged.
    AofAlways,
}

/// A step of a server's wall clock, for [`RedisServer::step_clock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockStep {
    /// The clock jumps ahead by this much.
    Forward(Duration),
    /// The clock jumps back by this much.
    Back(Duration),
}

impl ClockStep {
    fn micros(self) -> i64 {
        match self {
            ClockStep::Forward(d) => micros(d),
            ClockStep::Back(d) => -micros(d),
        }
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Settings shared by every node started from one builder.
#[derive(Debug)]
struct Settings {
    binary: ServerBinary,
    password: Option<String>,
    user: Option<(String, String)>,
    tls: Option<TlsFiles>,
    persistence: RedisPersistence,
    fake_clock: Option<FakeClockKit>,
}

/// Configures and starts Redis servers. Obtained from [`RedisServer::builder`].
#[derive(Clone, Debug, Default)]
pub struct RedisBuilder {
    version: RedisVersion,
    password: Option<String>,
    user: Option<(String, String)>,
    tls: bool,
    persistence: RedisPersistence,
    fake_clock: bool,
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

    /// What the servers keep across a restart (default [`RedisPersistence::None`]).
    pub fn persistence(mut self, persistence: RedisPersistence) -> Self {
        self.persistence = persistence;
        self
    }

    /// Runs every server under libfaketime with its own wall-clock offset, starting at zero, which
    /// [`RedisServer::step_clock`] changes while it runs (see the [module docs](self)). Starting
    /// fails, naming the install command, when libfaketime or a C compiler is missing.
    pub fn fake_clock(mut self, on: bool) -> Self {
        self.fake_clock = on;
        self
    }

    fn settings(&self, cert_dir: &Path) -> Result<Arc<Settings>> {
        let binary = self.version.binary()?;
        let fake_clock = if self.fake_clock {
            Some(FakeClockKit::prepare(&binary.path)?)
        } else {
            None
        };
        Ok(Arc::new(Settings {
            binary,
            password: self.password.clone(),
            user: self.user.clone(),
            tls: if self.tls {
                Some(TlsFiles::generate(cert_dir)?)
            } else {
                None
            },
            persistence: self.persistence,
            fake_clock,
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
/// By default no persistence (`save ""`, no AOF): a [`restart`](Self::restart) comes back empty,
/// like a crashed cache node; with [`RedisPersistence::AofAlways`] it comes back with every
/// acknowledged write. Cluster nodes keep their `nodes.conf`, so they rejoin with their slots.
#[derive(Debug)]
pub struct RedisServer {
    process: ServerProcess,
    port: u16,
    cluster_bus_port: Option<u16>,
    settings: Arc<Settings>,
    dir: ServerDir,
    /// After `process`, so that it is dropped (and cleans up) once the process is dead. Boxed: most
    /// servers have none.
    clock: Option<Box<FakeClock>>,
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
            let clock = match &settings.fake_clock {
                Some(_) => Some(Box::new(FakeClock::new(dir.path())?)),
                None => None,
            };
            let (program, args, faked) = match (&settings.fake_clock, &clock) {
                (Some(kit), Some(clock)) => {
                    let (program, args) = kit.wrap(&settings.binary.path, args, &clock.file);
                    (program, args, ", faked clock")
                }
                _ => (settings.binary.path.clone(), args, ""),
            };
            let process = ServerProcess::spawn(
                format!(
                    "redis-server {}{role} (port {port}{faked})",
                    settings.binary.version
                ),
                &program,
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
                clock,
            };
            server.note_pid();
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
        self.note_pid();
        self.wait_ready().await
    }

    /// The server's clock now (`TIME`), in microseconds since the Unix epoch.
    pub async fn time_micros(&self) -> Result<i64> {
        let reply = self.command(&["TIME"]).await?;
        let RespValue::Array(Some(parts)) = &reply else {
            bail!("TIME replied {reply:?}");
        };
        let [secs, us] = &parts[..] else {
            bail!("TIME replied {reply:?}");
        };
        let secs: i64 = secs.as_text()?.parse().context("TIME seconds")?;
        let us: i64 = us.as_text()?.parse().context("TIME microseconds")?;
        Ok(secs * 1_000_000 + us)
    }

    /// How far the server's wall clock is ahead of the real one (negative: behind), in
    /// microseconds; `None` unless it was started with [`RedisBuilder::fake_clock`].
    pub fn clock_offset_micros(&self) -> Option<i64> {
        self.clock.as_deref().map(FakeClock::offset)
    }

    /// Steps the server's wall clock, as `date -s` on its host would: from its next clock read on,
    /// `TIME` and key expiry see the new time; its monotonic clock does not move. The offset stays
    /// across restarts. Checks with `TIME`, before and after, that the server's clock moved by the
    /// step (plus the real time between the two reads), so a server on which libfaketime is not in
    /// effect fails here. Only for servers started with [`RedisBuilder::fake_clock`].
    pub async fn step_clock(&self, step: ClockStep) -> Result<()> {
        let clock = self.clock.as_ref().ok_or_else(|| {
            anyhow!(
                "{} was not started with RedisBuilder::fake_clock",
                self.process.label()
            )
        })?;
        let delta = step.micros();
        let started = Instant::now();
        let before = self.time_micros().await?;
        clock.set(clock.offset().saturating_add(delta))?;
        let after = self.time_micros().await?;
        let elapsed = micros(started.elapsed());
        // One millisecond for the real clock's slewing and the rounding of TIME.
        const SLACK: i64 = 1_000;
        let moved = after - before;
        ensure!(
            moved >= delta - SLACK && moved <= delta + elapsed + SLACK,
            "{}: stepping the clock by {delta} µs moved TIME by {moved} µs (real time between the reads: {elapsed} µs); is libfaketime in effect?\n{}",
            self.process.label(),
            self.process.log_tail(20)
        );
        Ok(())
    }

    /// Remembers the pid of a process running under libfaketime, whose shared-memory files are
    /// removed once it is dead.
    fn note_pid(&self) {
        if let (Some(clock), Some(pid)) = (&self.clock, self.process.pid()) {
            clock.note_pid(pid);
        }
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
        "--protected-mode".into(),
        "no".into(),
        "--daemonize".into(),
        "no".into(),
        "--logfile".into(),
        String::new(),
    ];
    match s.persistence {
        RedisPersistence::None => a.extend(["--appendonly".into(), "no".into()]),
        RedisPersistence::AofAlways => a.extend([
            "--appendonly".into(),
            "yes".into(),
            "--appendfsync".into(),
            "always".into(),
        ]),
    }
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

// ---------------------------------------------------------------------------------------------
// The fake clock (see the module docs)
// ---------------------------------------------------------------------------------------------

/// Where libfaketime is looked for, after `DLOCK_LIBFAKETIME`.
fn libfaketime_candidates() -> Vec<PathBuf> {
    vec![
        PathBuf::from(format!(
            "/usr/lib/{}-linux-gnu/faketime/libfaketime.so.1",
            std::env::consts::ARCH
        )),
        PathBuf::from("/usr/lib/faketime/libfaketime.so.1"),
        PathBuf::from("/usr/local/lib/faketime/libfaketime.so.1"),
    ]
}

const LIBFAKETIME_ENV: &str = "DLOCK_LIBFAKETIME";

fn libfaketime() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(LIBFAKETIME_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        ensure!(
            path.is_file(),
            "{LIBFAKETIME_ENV}={} does not exist; unset it or point it at libfaketime.so.1",
            path.display()
        );
        return Ok(path);
    }
    let candidates = libfaketime_candidates();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    bail!(
        "libfaketime not found (looked for {}): the Redis clock-step tests need it. Install it with \
         `apt-get install -y faketime`, or set {LIBFAKETIME_ENV} to its path; set \
         DLOCK_SKIP_SERVER_TESTS=redis to skip the Redis tests",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Definitions libfaketime 0.9.10 looks up when it starts and glibc 2.34+ no longer has. Found with
/// `RTLD_NEXT` in this library, the look-ups succeed without allocating; nothing calls them.
const STUB_C: &str = r#"/* dlock test harness: see tests/src/harness/redis.rs */
int __ftime(void *tp) { (void)tp; return -1; }
int dlock_stub_timer_settime(void) { return -1; }
int dlock_stub_timer_gettime(void) { return -1; }
__asm__(".symver dlock_stub_timer_settime,timer_settime@GLIBC_2.2");
__asm__(".symver dlock_stub_timer_gettime,timer_gettime@GLIBC_2.2");
"#;
const STUB_VERSIONS: &str = "GLIBC_2.2 { local: dlock_stub_*; };\n";

/// The stub library, compiled once per machine (cached by a hash of its source).
fn faketime_stub() -> Result<PathBuf> {
    static STUB: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    STUB.get_or_init(|| build_stub().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_stub() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join("dlock-harness-faketime");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // FNV-1a: stable across Rust versions, unlike DefaultHasher.
    let tag = format!("{STUB_C}{STUB_VERSIONS}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let out = dir.join(format!("stub-{tag:016x}.so"));
    if out.is_file() {
        return Ok(out);
    }
    let unique = format!("stub-{tag:016x}-{}", std::process::id());
    let (src, map, tmp) = (
        dir.join(format!("{unique}.c")),
        dir.join(format!("{unique}.map")),
        dir.join(format!("{unique}.so")),
    );
    std::fs::write(&src, STUB_C)?;
    std::fs::write(&map, STUB_VERSIONS)?;
    let cc = std::env::var_os("CC")
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "cc".into());
    let mut version_script = OsString::from("-Wl,--version-script=");
    version_script.push(&map);
    let result = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&tmp)
        .arg(version_script)
        .arg(&src)
        .stdin(Stdio::null())
        .output();
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&map);
    let output = match result {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "running Redis under libfaketime needs a small stub library, built with a C compiler, \
             and `{}` was not found: install one with `apt-get install -y gcc`, or set CC",
            cc.to_string_lossy()
        ),
        Err(e) => return Err(e).with_context(|| format!("running {}", cc.to_string_lossy())),
    };
    if !output.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "{} failed to build the libfaketime stub ({}):\n{}",
            cc.to_string_lossy(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Atomic, so a parallel test process sees either no stub or a whole one.
    std::fs::rename(&tmp, &out).with_context(|| format!("installing {}", out.display()))?;
    Ok(out)
}

/// The libraries `binary` links, in the loader's order, as `LD_TRACE_LOADED_OBJECTS` lists them —
/// without those libfaketime itself needs (it must come after them).
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new(binary)
        .env("LD_TRACE_LOADED_OBJECTS", "1")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("listing the libraries of {}", binary.display()))?;
    ensure!(
        output.status.success(),
        "listing the libraries of {} failed: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    const LIBFAKETIMES_OWN: [&str; 5] = [
        "libc.so",
        "libm.so",
        "libdl.so",
        "libpthread.so",
        "librt.so",
    ];
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        // "\tlibssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x...)"
        .filter_map(|l| l.split_once("=>"))
        .filter(|(name, _)| {
            !LIBFAKETIMES_OWN
                .iter()
                .any(|own| name.trim().starts_with(own))
        })
        .filter_map(|(_, rest)| rest.split_whitespace().next())
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}

/// How to start one kind of server under libfaketime.
#[derive(Debug)]
struct FakeClockKit {
    env: PathBuf,
    preload: String,
}

impl FakeClockKit {
    fn prepare(binary: &Path) -> Result<Self> {
        let libfaketime = libfaketime()?;
        let stub = faketime_stub()?;
        let env = ["/usr/bin/env", "/bin/env"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .context("no env(1) in /usr/bin or /bin")?;
        let mut preload = linked_libraries(binary)?;
        preload.push(libfaketime);
        preload.push(stub);
        let preload = preload
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        Ok(FakeClockKit { env, preload })
    }

    /// `env … redis-server ARGS`: `env` execs the server, so the pid the harness signals is the
    /// server's own.
    fn wrap(
        &self,
        binary: &Path,
        args: Vec<OsString>,
        clock_file: &Path,
    ) -> (PathBuf, Vec<OsString>) {
        let mut a: Vec<OsString> = Vec::new();
        // A developer's libfaketime settings must not change the server under test.
        for var in [
            "FAKETIME",
            "FAKETIME_SHARED",
            "FAKETIME_FMT",
            "FAKETIME_DONT_RESET",
            "FAKETIME_XRESET",
            "FAKETIME_ONLY_CMDS",
            "FAKETIME_SKIP_CMDS",
            "FAKETIME_CACHE_DURATION",
        ] {
            a.push("-u".into());
            a.push(var.into());
        }
        a.push(format!("LD_PRELOAD={}", self.preload).into());
        let mut file = OsString::from("FAKETIME_TIMESTAMP_FILE=");
        file.push(clock_file);
        a.push(file);
        a.push("FAKETIME_NO_CACHE=1".into());
        a.push("FAKETIME_DONT_FAKE_MONOTONIC=1".into());
        a.push(binary.into());
        a.extend(args);
        (self.env.clone(), a)
    }
}

/// One server's clock offset: the libfaketime timestamp file in its directory.
#[derive(Debug)]
struct FakeClock {
    file: PathBuf,
    offset_us: Mutex<i64>,
    /// Processes started under libfaketime; it leaves shared-memory files behind when killed.
    pids: Mutex<Vec<u32>>,
}

impl FakeClock {
    fn new(dir: &Path) -> Result<Self> {
        let clock = FakeClock {
            file: dir.join("faketime.rc"),
            offset_us: Mutex::new(0),
            pids: Mutex::new(Vec::new()),
        };
        clock.set(0)?;
        Ok(clock)
    }

    fn offset(&self) -> i64 {
        *self.offset_us.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the offset as libfaketime reads it (`+S.UUUUUU` / `-S.UUUUUU` seconds), atomically:
    /// the server reads the file on every clock read and must never see half of it.
    fn set(&self, offset_us: i64) -> Result<()> {
        let mut current = self.offset_us.lock().unwrap_or_else(|e| e.into_inner());
        let sign = if offset_us < 0 { '-' } else { '+' };
        let abs = offset_us.unsigned_abs();
        let text = format!("{sign}{}.{:06}\n", abs / 1_000_000, abs % 1_000_000);
        let tmp = self.file.with_extension("rc.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.file)
            .with_context(|| format!("replacing {}", self.file.display()))?;
        *current = offset_us;
        Ok(())
    }

    fn note_pid(&self, pid: u32) {
        self.pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pid);
    }
}

impl Drop for FakeClock {
    fn drop(&mut self) {
        // The process is dead by now (see the field order of RedisServer). libfaketime removes
        // these on a clean exit only; the harness always kills.
        for pid in self
            .pids
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = std::fs::remove_file(format!("/dev/shm/faketime_shm_{pid}"));
            let _ = std::fs::remove_file(format!("/dev/shm/sem.faketime_sem_{pid}"));
        }
    }
}
