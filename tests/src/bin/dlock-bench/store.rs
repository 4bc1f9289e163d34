//! The store under test: started from the harness, reached through the driver, raw (the floors), and
//! through its own counters (how many operations a scenario cost the store).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use dlock::{
    Capabilities, Driver, Enqueued, EntryInfo, EntryKey, EntryRequest, Grant, LockMode, LockName,
    Locks, MemoryDriver, OwnerId, Queued, Renewal,
};
use dlock_etcd::etcd_client;
use dlock_tests::harness::net::http_get;
use dlock_tests::harness::{
    EtcdServer, EtcdVersion, NatsServer, NatsVersion, RedisServer, RespConnection,
};
use tokio::time::Instant;

use crate::workloads::{Laps, Timed};
use crate::TTL;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target {
    Memory,
    Redis,
    Etcd,
    JetStream,
}

impl Target {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "memory" => Target::Memory,
            "redis" => Target::Redis,
            "etcd" => Target::Etcd,
            "jetstream" => Target::JetStream,
            other => bail!("unknown driver {other:?}; use memory, redis, etcd or jetstream"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Memory => "memory",
            Target::Redis => "redis",
            Target::Etcd => "etcd",
            Target::JetStream => "jetstream",
        }
    }
}

/// Counts driver calls: all of them (the in-memory store has no counters of its own) and renewal
/// calls (what the client's keeper asks of the driver — a batch is one call — before any sharing
/// inside it).
pub struct Counting {
    inner: Arc<dyn Driver>,
    calls: Arc<AtomicU64>,
    renewals: Arc<AtomicU64>,
}

impl Counting {
    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl Driver for Counting {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn enqueue(&self, request: &EntryRequest) -> dlock::Result<Enqueued> {
        self.count();
        self.inner.enqueue(request).await
    }
    async fn wait(&self, key: &EntryKey) -> dlock::Result<Grant> {
        self.count();
        self.inner.wait(key).await
    }
    async fn renew(&self, key: &EntryKey, ttl: Duration) -> dlock::Result<Instant> {
        self.count();
        self.renewals.fetch_add(1, Ordering::Relaxed);
        self.inner.renew(key, ttl).await
    }
    async fn renew_many(&self, renewals: &[Renewal<'_>]) -> Vec<dlock::Result<Instant>> {
        self.count();
        self.renewals.fetch_add(1, Ordering::Relaxed);
        self.inner.renew_many(renewals).await
    }
    async fn release(&self, key: &EntryKey) -> dlock::Result<()> {
        self.count();
        self.inner.release(key).await
    }
    async fn convert(&self, key: &EntryKey, mode: LockMode) -> dlock::Result<Queued> {
        self.count();
        self.inner.convert(key, mode).await
    }
    async fn inspect(&self, name: &LockName) -> dlock::Result<Vec<EntryInfo>> {
        self.count();
        self.inner.inspect(name).await
    }
    async fn raise_fence(&self, name: &LockName, floor: u64) -> dlock::Result<u64> {
        self.count();
        self.inner.raise_fence(name, floor).await
    }
}

/// What the store itself counted. `primary` is the figure the targets are judged on; `secondary`
/// shows the same work from another side (see [`Store::counter_labels`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub primary: f64,
    pub secondary: f64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, before: Counters) -> Counters {
        Counters {
            primary: self.primary - before.primary,
            secondary: self.secondary - before.secondary,
        }
    }
}

pub struct Store {
    pub target: Target,
    memory: MemoryDriver,
    pub redis: Option<RedisServer>,
    /// Kept open, so reading the counters does not itself add connection commands.
    redis_info: Option<tokio::sync::Mutex<RespConnection>>,
    /// The raw floor's connection, opened once so no timed run pays for a connect.
    redis_raw: Option<tokio::sync::Mutex<RespConnection>>,
    pub etcd: Option<(EtcdServer, etcd_client::Client)>,
    pub nats: Option<(NatsServer, async_nats::jetstream::Context)>,
    calls: Arc<AtomicU64>,
}

impl Store {
    pub async fn start(target: Target) -> Result<Self> {
        let mut store = Store {
            target,
            memory: MemoryDriver::new(),
            redis: None,
            redis_info: None,
            redis_raw: None,
            etcd: None,
            nats: None,
            calls: Arc::new(AtomicU64::new(0)),
        };
        match target {
            Target::Memory => {}
            Target::Redis => {
                let server = RedisServer::start().await?;
                store.redis_info = Some(tokio::sync::Mutex::new(server.connect().await?));
                store.redis_raw = Some(tokio::sync::Mutex::new(server.connect().await?));
                store.redis = Some(server);
            }
            Target::Etcd => {
                let server = EtcdServer::start(EtcdVersion::V3_5).await?;
                let client = etcd_client::Client::connect([server.endpoint()], None).await?;
                store.etcd = Some((server, client));
            }
            Target::JetStream => {
                let server = NatsServer::start(NatsVersion::V2_11Plus).await?;
                let js = async_nats::jetstream::new(async_nats::connect(server.url()).await?);
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: "BENCHRAW".into(),
                    subjects: vec!["benchraw.>".into()],
                    max_messages_per_subject: 1,
                    ..Default::default()
                })
                .await?;
                store.nats = Some((server, js));
            }
        }
        Ok(store)
    }

    /// A new driver: its own connections to the store, as a separate client process would have.
    pub async fn driver(&self) -> Result<Arc<dyn Driver>> {
        Ok(match (&self.redis, &self.etcd, &self.nats) {
            (Some(server), ..) => Arc::new(dlock_redis::RedisDriver::connect(&server.url()).await?),
            (_, Some((server, _)), _) => Arc::new(
                dlock_etcd::EtcdDriver::connect(&format!("etcd://{}", server.addr())).await?,
            ),
            (.., Some((server, _))) => {
                Arc::new(dlock_jetstream::JetStreamDriver::connect(&server.url()).await?)
            }
            _ => Arc::new(self.memory.clone()),
        })
    }

    pub async fn locks(&self) -> Result<Locks> {
        Ok(Locks::from_arc(self.driver().await?))
    }

    /// A client whose driver calls are counted; `renewals` counts its renewals alone.
    pub async fn counted_locks(&self, renewals: Arc<AtomicU64>) -> Result<Locks> {
        Ok(Locks::new(Counting {
            inner: self.driver().await?,
            calls: self.calls.clone(),
            renewals,
        }))
    }

    /// What [`Counters::primary`] and [`Counters::secondary`] count on this store.
    pub fn counter_labels(&self) -> (&'static str, Option<&'static str>) {
        match self.target {
            Target::Memory => ("driver calls", None),
            // The brief's measure is every command the server ran; a script's own commands count,
            // so "round trips" (script calls and the requests scripts cannot make) is shown beside it.
            Target::Redis => ("store commands", Some("store round trips")),
            Target::Etcd => ("store requests", Some("MVCC operations")),
            Target::JetStream => (
                "messages into the server",
                Some("messages out of the server"),
            ),
        }
    }

    /// The store's own counters: Redis `INFO commandstats`, etcd's `/metrics` on its client port,
    /// NATS's `/varz` on its monitoring port; for the in-memory store, calls through counted clients.
    pub async fn counters(&self) -> Result<Counters> {
        match self.target {
            Target::Memory => Ok(Counters {
                primary: self.calls.load(Ordering::Relaxed) as f64,
                secondary: 0.0,
            }),
            Target::Redis => {
                let info = self
                    .redis_info
                    .as_ref()
                    .context("redis counters")?
                    .lock()
                    .await
                    .command(&["INFO", "commandstats"])
                    .await?
                    .as_text()?;
                redis_counters(&info)
            }
            Target::Etcd => {
                let (server, _) = self.etcd.as_ref().context("etcd counters")?;
                let metrics = http_get(server.addr(), "/metrics").await?.ok()?;
                Ok(etcd_counters(&metrics.body))
            }
            Target::JetStream => {
                let (server, _) = self.nats.as_ref().context("nats counters")?;
                let addr = SocketAddr::from(([127, 0, 0, 1], server.node().monitor_port()));
                let varz = http_get(addr, "/varz").await?.ok()?.json()?;
                Ok(Counters {
                    primary: varz["in_msgs"].as_f64().context("/varz in_msgs")?,
                    secondary: varz["out_msgs"].as_f64().context("/varz out_msgs")?,
                })
            }
        }
    }

    /// Waits (bounded) until the store's counters stand still: work left over from the last run —
    /// background releases, an abandoned acquire's enqueue still retrying — must not be counted in
    /// the next one. "Still" is at most 20 operations in half a second, which idle clients' lease
    /// keepalives stay under.
    pub async fn quiesce(&self) -> Result<()> {
        let give_up = Instant::now() + Duration::from_secs(60);
        let mut last = self.counters().await?;
        while Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = self.counters().await?;
            if (now - last).primary <= 20.0 {
                return Ok(());
            }
            last = now;
        }
        eprintln!("warning: the store was still busy after 60 s; counting anyway");
        Ok(())
    }

    /// What the raw floor of an uncontended cycle is on this store.
    pub fn floor_label(&self) -> &'static str {
        match self.target {
            Target::Memory => "raw driver enqueue + release",
            Target::Redis => "raw floor, SET NX PX + DEL",
            Target::Etcd => "raw floor, a put + a delete",
            Target::JetStream => "raw floor, two acknowledged publishes",
        }
    }

    /// What one store round trip is here.
    pub fn round_trip_label(&self) -> &'static str {
        match self.target {
            Target::Memory => "one raw driver call (enqueue)",
            Target::Redis => "raw PING round trip",
            Target::Etcd => "one linearizable get",
            Target::JetStream => "one acknowledged publish",
        }
    }

    /// Raw-floor cycles for about `run` (at least `min`, at most `max` cycles).
    pub async fn raw_floor(&self, run: Duration, min: usize, max: usize) -> Result<Timed> {
        // Called through `dyn Driver`, as the client calls it.
        let memory: Arc<dyn Driver> = Arc::new(self.memory.clone());
        let deadline = Instant::now() + run;
        let mut laps = Laps::start();
        let more = |done: usize| done < max && (done < min || Instant::now() < deadline);
        match (&self.redis, &self.etcd, &self.nats) {
            (_, Some((_, client)), _) => {
                let mut client = client.clone();
                while more(laps.count()) {
                    client.put("bench/raw", "x", None).await?;
                    client.delete("bench/raw", None).await?;
                    laps.lap();
                }
            }
            (Some(_), ..) => {
                let mut raw = self
                    .redis_raw
                    .as_ref()
                    .context("raw connection")?
                    .lock()
                    .await;
                while more(laps.count()) {
                    let value = laps.count().to_string();
                    raw.command(&["SET", "bench/raw", value.as_str(), "NX", "PX", "10000"])
                        .await?;
                    raw.command(&["DEL", "bench/raw"]).await?;
                    laps.lap();
                }
            }
            (.., Some((_, js))) => {
                while more(laps.count()) {
                    let i = laps.count();
                    publish(js, 2 * i).await?;
                    publish(js, 2 * i + 1).await?;
                    laps.lap();
                }
            }
            _ => {
                let name = LockName::new("bench/raw")?;
                while more(laps.count()) {
                    let key = raw_key(&name, laps.count())?;
                    memory.enqueue(&raw_request(&key)).await?;
                    memory.release(&key).await?;
                    laps.lap();
                }
            }
        }
        Ok(laps.finish())
    }

    /// `n` timed store round trips.
    pub async fn round_trips(&self, n: usize) -> Result<Vec<Duration>> {
        let mut out = Vec::with_capacity(n);
        match (&self.redis, &self.etcd, &self.nats) {
            (_, Some((_, client)), _) => {
                let mut client = client.clone();
                for _ in 0..n {
                    let start = Instant::now();
                    client.get("bench/raw", None).await?;
                    out.push(start.elapsed());
                }
            }
            (Some(_), ..) => {
                let mut raw = self
                    .redis_raw
                    .as_ref()
                    .context("raw connection")?
                    .lock()
                    .await;
                for _ in 0..n {
                    let start = Instant::now();
                    raw.command(&["PING"]).await?;
                    out.push(start.elapsed());
                }
            }
            (.., Some((_, js))) => {
                for i in 0..n {
                    let start = Instant::now();
                    publish(js, i).await?;
                    out.push(start.elapsed());
                }
            }
            _ => {
                let driver = self.driver().await?;
                let name = LockName::new("bench/raw-rtt")?;
                for i in 0..n {
                    let key = raw_key(&name, i)?;
                    let start = Instant::now();
                    driver.enqueue(&raw_request(&key)).await?;
                    out.push(start.elapsed());
                    driver.release(&key).await?;
                }
            }
        }
        Ok(out)
    }
}

fn raw_key(name: &LockName, i: usize) -> Result<EntryKey> {
    Ok(EntryKey {
        name: name.clone(),
        owner: OwnerId::parse(&format!("raw-{i}")).context("owner id")?,
    })
}

fn raw_request(key: &EntryKey) -> EntryRequest {
    EntryRequest {
        key: key.clone(),
        mode: LockMode::EX,
        ttl: TTL,
        wait: false,
    }
}

/// One acknowledged JetStream publish: the store's raw round trip.
async fn publish(js: &async_nats::jetstream::Context, i: usize) -> Result<()> {
    js.publish(format!("benchraw.{}", i % 64), "x".into())
        .await?
        .await?;
    Ok(())
}

/// Commands a client must send itself: a script cannot subscribe, authenticate or run a script.
fn is_round_trip(command: &str) -> bool {
    command.starts_with("eval")
        || command.starts_with("fcall")
        || command.starts_with("client|")
        || command.starts_with("script|")
        || matches!(
            command,
            "subscribe"
                | "unsubscribe"
                | "psubscribe"
                | "punsubscribe"
                | "ssubscribe"
                | "sunsubscribe"
                | "ping"
                | "hello"
                | "auth"
                | "select"
                | "readonly"
        )
}

fn redis_counters(info: &str) -> Result<Counters> {
    let mut counters = Counters::default();
    for line in info.lines() {
        let Some((command, stats)) = line.trim().split_once(':') else {
            continue;
        };
        let Some(command) = command.strip_prefix("cmdstat_") else {
            continue;
        };
        // Our own probes are not the scenario's work.
        if command == "info" {
            continue;
        }
        let calls: f64 = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .context("commandstats has calls=")?
            .parse()?;
        counters.primary += calls;
        if is_round_trip(command) {
            counters.secondary += calls;
        }
    }
    Ok(counters)
}

fn etcd_counters(metrics: &str) -> Counters {
    let mut counters = Counters::default();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        match name {
            // Every unary call is one message; on a stream (watch, keepalive) every request is one.
            "grpc_server_msg_received_total" => counters.primary += value,
            "etcd_mvcc_put_total"
            | "etcd_mvcc_delete_total"
            | "etcd_mvcc_range_total"
            | "etcd_mvcc_txn_total" => counters.secondary += value,
            _ => {}
        }
    }
    counters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_counters_skip_info_and_split_round_trips() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=1\r\ncmdstat_zadd:calls=5,usec=1\r\ncmdstat_info:calls=3,usec=1\r\ncmdstat_subscribe:calls=2,usec=1\r\n";
        let c = redis_counters(info).unwrap();
        assert_eq!((c.primary, c.secondary), (17.0, 12.0));
    }

    #[test]
    fn etcd_counters_sum_labelled_series() {
        let m = "# HELP x\ngrpc_server_msg_received_total{grpc_method=\"Range\"} 3\ngrpc_server_msg_received_total{grpc_method=\"Put\"} 1e+01\netcd_mvcc_put_total 4\n";
        let c = etcd_counters(m);
        assert_eq!((c.primary, c.secondary), (13.0, 4.0));
    }
}
