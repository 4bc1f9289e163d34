//! The dlock bench tool: measures a driver side by side with a baseline in the same run, and prints
//! medians and ratios (machines here are small and noisy: never trust one absolute time).
//!
//! ```text
//! cargo run --release -p dlock-tests --bin dlock-bench -- --driver memory
//! cargo run --release -p dlock-tests --bin dlock-bench -- --driver redis --rounds 5
//! cargo run --release -p dlock-tests --bin dlock-bench -- --driver etcd --rounds 5
//! cargo run --release -p dlock-tests --bin dlock-bench -- --driver jetstream --rounds 5
//! ```
//!
//! Scenarios, each run `--rounds` times (median reported):
//! - **uncontended**: acquire + release cycles/s on one name, against the raw floor: two store round
//!   trips done with raw calls (the driver's own enqueue + release for the in-memory store; a
//!   `SET NX PX` + `DEL` pair for Redis; a put + delete for etcd; two acknowledged publishes for
//!   JetStream).
//! - **handoff**: waiters in line for one `EX` lock; latency from a holder's release to the next grant,
//!   p50 and p99, against the store's raw round trip (`PING`; a linearizable etcd get; an
//!   acknowledged JetStream publish; in memory, the same handoff on a tokio Mutex).
//! - **many names**: 16 tasks cycling over 1000 names, acquires/s.
//! - **round trips per handoff** (Redis): scripts run per acquire + release as the number of waiters
//!   grows; flat means no thundering herd.
//! - **renewal cost**: driver renewals per held lock per second with 1000 locks held.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use dlock::{
    Capabilities, Driver, EntryInfo, EntryKey, EntryRequest, Grant, LockMode, LockName, Locks,
    MemoryDriver, OwnerId, Queued,
};
use dlock_etcd::etcd_client;
use dlock_tests::harness::{
    EtcdServer, EtcdVersion, NatsServer, NatsVersion, RedisServer, RespConnection,
};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Memory,
    Redis,
    Etcd,
    JetStream,
}

struct Options {
    target: Target,
    rounds: usize,
    scale: f64,
}

fn parse() -> Result<Options> {
    let mut options = Options {
        target: Target::Memory,
        rounds: 5,
        scale: 1.0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--driver" => {
                options.target = match value()?.as_str() {
                    "memory" => Target::Memory,
                    "redis" => Target::Redis,
                    "etcd" => Target::Etcd,
                    "jetstream" => Target::JetStream,
                    other => bail!("unknown driver {other:?}; use memory, redis, etcd or jetstream"),
                }
            }
            "--rounds" => options.rounds = value()?.parse().context("--rounds")?,
            "--scale" => options.scale = value()?.parse().context("--scale")?,
            other => bail!("unknown flag {other}; usage: dlock-bench [--driver memory|redis|etcd|jetstream] [--rounds N] [--scale F]"),
        }
    }
    if options.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    Ok(options)
}

/// Counts driver calls, to report renewals per lock.
struct Counting<D> {
    inner: D,
    renewals: Arc<AtomicU64>,
}

#[async_trait]
impl<D: Driver> Driver for Counting<D> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn enqueue(&self, request: &EntryRequest) -> dlock::Result<Queued> {
        self.inner.enqueue(request).await
    }
    async fn wait(&self, key: &EntryKey) -> dlock::Result<Grant> {
        self.inner.wait(key).await
    }
    async fn renew(&self, key: &EntryKey, ttl: Duration) -> dlock::Result<Instant> {
        self.renewals.fetch_add(1, Ordering::Relaxed);
        self.inner.renew(key, ttl).await
    }
    async fn release(&self, key: &EntryKey) -> dlock::Result<()> {
        self.inner.release(key).await
    }
    async fn convert(&self, key: &EntryKey, mode: LockMode) -> dlock::Result<Queued> {
        self.inner.convert(key, mode).await
    }
    async fn inspect(&self, name: &LockName) -> dlock::Result<Vec<EntryInfo>> {
        self.inner.inspect(name).await
    }
    async fn raise_fence(&self, name: &LockName, floor: u64) -> dlock::Result<u64> {
        self.inner.raise_fence(name, floor).await
    }
}

/// The store under test and how to reach it raw.
struct Store {
    memory: MemoryDriver,
    redis: Option<RedisServer>,
    etcd: Option<(EtcdServer, etcd_client::Client)>,
    nats: Option<(NatsServer, async_nats::jetstream::Context)>,
}

impl Store {
    async fn start(target: Target) -> Result<Self> {
        let mut store = Store {
            memory: MemoryDriver::new(),
            redis: None,
            etcd: None,
            nats: None,
        };
        match target {
            Target::Memory => {}
            Target::Redis => store.redis = Some(RedisServer::start().await?),
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

    async fn driver(&self) -> Result<Arc<dyn Driver>> {
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

    async fn locks(&self) -> Result<Locks> {
        Ok(Locks::from_arc(self.driver().await?))
    }

    /// One acknowledged JetStream publish: the store's raw round trip.
    async fn publish(js: &async_nats::jetstream::Context, i: usize) -> Result<()> {
        js.publish(format!("benchraw.{}", i % 64), "x".into())
            .await?
            .await?;
        Ok(())
    }

    /// Lua scripts run so far (Redis `INFO commandstats`): every driver operation is one script, so
    /// this counts the driver's round trips, not the commands scripts run inside.
    async fn scripts_run(&self) -> Result<Option<u64>> {
        let Some(server) = &self.redis else {
            return Ok(None);
        };
        let info = server.command(&["INFO", "commandstats"]).await?.as_text()?;
        let mut total = 0;
        for line in info.lines() {
            let Some((command, stats)) = line.split_once(':') else {
                continue;
            };
            if matches!(
                command,
                "cmdstat_evalsha" | "cmdstat_eval" | "cmdstat_evalsha_ro" | "cmdstat_eval_ro"
            ) {
                let calls = stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))
                    .context("commandstats has calls=")?;
                total += calls.parse::<u64>()?;
            }
        }
        Ok(Some(total))
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn percentile(xs: &mut [Duration], p: f64) -> Duration {
    xs.sort_unstable();
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

async fn uncontended(store: &Store, cycles: usize) -> Result<(f64, f64)> {
    let locks = store.locks().await?;
    let start = Instant::now();
    for _ in 0..cycles {
        locks
            .lock("bench/uncontended")
            .ttl(TTL)
            .await?
            .release()
            .await?;
    }
    let dlock_rate = cycles as f64 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    match (&store.redis, &store.etcd, &store.nats) {
        (_, Some((_, client)), _) => {
            let mut client = client.clone();
            for _ in 0..cycles {
                client.put("bench/raw", "x", None).await?;
                client.delete("bench/raw", None).await?;
            }
        }
        (Some(server), ..) => {
            let mut raw = RespConnection::connect(server.addr(), None).await?;
            for i in 0..cycles {
                let value = i.to_string();
                raw.command(&["SET", "bench/raw", value.as_str(), "NX", "PX", "10000"])
                    .await?;
                raw.command(&["DEL", "bench/raw"]).await?;
            }
        }
        (.., Some((_, js))) => {
            for i in 0..cycles {
                Store::publish(js, 2 * i).await?;
                Store::publish(js, 2 * i + 1).await?;
            }
        }
        _ => {
            let driver = store.driver().await?;
            let name = LockName::new("bench/raw")?;
            for i in 0..cycles {
                let key = EntryKey {
                    name: name.clone(),
                    owner: OwnerId::parse(&format!("raw-{i}")).context("owner id")?,
                };
                driver
                    .enqueue(&EntryRequest {
                        key: key.clone(),
                        mode: LockMode::EX,
                        ttl: TTL,
                        wait: false,
                    })
                    .await?;
                driver.release(&key).await?;
            }
        }
    }
    let raw_rate = cycles as f64 / start.elapsed().as_secs_f64();
    Ok((dlock_rate, raw_rate))
}

/// Latencies from a release to the next waiter's grant, with `waiters` tasks in line.
async fn handoffs(
    store: &Store,
    waiters: usize,
    per_waiter: usize,
) -> Result<(Vec<Duration>, u64)> {
    let released_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let before = store.scripts_run().await?;
    let mut tasks = Vec::new();
    for _ in 0..waiters {
        let locks = store.locks().await?;
        let (released_at, samples) = (released_at.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_waiter {
                let guard = locks.lock("bench/handoff").ttl(TTL).await?;
                if let Some(at) = released_at.lock().expect("not poisoned").take() {
                    samples.lock().expect("not poisoned").push(at.elapsed());
                }
                tokio::task::yield_now().await;
                *released_at.lock().expect("not poisoned") = Some(Instant::now());
                guard.release().await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let after = store.scripts_run().await?;
    let samples = std::mem::take(&mut *samples.lock().expect("not poisoned"));
    let commands = match (before, after) {
        (Some(b), Some(a)) => a - b,
        _ => 0,
    };
    Ok((samples, commands))
}

/// The baseline for handoffs: Redis's raw round trip (`PING`) — a handoff needs at least one — or, in
/// memory, the same handoff measured on a `tokio::sync::Mutex`.
async fn baseline_handoffs(store: &Store, n: usize) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    match (&store.redis, &store.etcd, &store.nats) {
        (_, Some((_, client)), _) => {
            let mut client = client.clone();
            for _ in 0..n {
                let start = Instant::now();
                client.get("bench/raw", None).await?;
                out.push(start.elapsed());
            }
        }
        (Some(server), ..) => {
            let mut raw = RespConnection::connect(server.addr(), None).await?;
            for _ in 0..n {
                let start = Instant::now();
                raw.command(&["PING"]).await?;
                out.push(start.elapsed());
            }
        }
        (.., Some((_, js))) => {
            for i in 0..n {
                let start = Instant::now();
                Store::publish(js, i).await?;
                out.push(start.elapsed());
            }
        }
        _ => {
            let mutex = Arc::new(tokio::sync::Mutex::new(()));
            let released_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
            let samples = Arc::new(Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let (mutex, released_at, samples) =
                    (mutex.clone(), released_at.clone(), samples.clone());
                tasks.push(tokio::spawn(async move {
                    for _ in 0..n / 8 + 1 {
                        let guard = mutex.lock().await;
                        if let Some(at) = released_at.lock().expect("not poisoned").take() {
                            samples.lock().expect("not poisoned").push(at.elapsed());
                        }
                        tokio::task::yield_now().await;
                        *released_at.lock().expect("not poisoned") = Some(Instant::now());
                        drop(guard);
                    }
                }));
            }
            for task in tasks {
                task.await?;
            }
            out = std::mem::take(&mut *samples.lock().expect("not poisoned"));
        }
    }
    Ok(out)
}

async fn many_names(store: &Store, tasks: usize, per_task: usize) -> Result<f64> {
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let locks = store.locks().await?;
        handles.push(tokio::spawn(async move {
            for i in 0..per_task {
                let name = format!("bench/many/{}", (t * per_task + i) % 1000);
                locks
                    .lock(name)
                    .mode(LockMode::PW)
                    .ttl(TTL)
                    .await?
                    .release()
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for handle in handles {
        handle.await??;
    }
    Ok((tasks * per_task) as f64 / start.elapsed().as_secs_f64())
}

async fn renewal_cost(store: &Store, held: usize, ttl: Duration) -> Result<f64> {
    let renewals = Arc::new(AtomicU64::new(0));
    let driver = Counting {
        inner: store.driver().await?,
        renewals: renewals.clone(),
    };
    let locks = Locks::new(driver);
    let mut guards = Vec::with_capacity(held);
    for i in 0..held {
        guards.push(
            locks
                .lock(format!("bench/held/{i}"))
                .mode(LockMode::PR)
                .ttl(ttl)
                .await?,
        );
    }
    let before = renewals.load(Ordering::Relaxed);
    let window = ttl * 2;
    tokio::time::sleep(window).await;
    let count = renewals.load(Ordering::Relaxed) - before;
    let lost = guards.iter().filter(|g| !g.is_valid()).count();
    if lost > 0 {
        bail!("{lost} of {held} held locks were lost during the renewal bench");
    }
    drop(guards);
    Ok(count as f64 / held as f64 / window.as_secs_f64())
}

fn scaled(n: usize, scale: f64) -> usize {
    ((n as f64 * scale).round() as usize).max(1)
}

#[tokio::main]
async fn main() -> Result<()> {
    let options = parse()?;
    let store = Store::start(options.target).await?;
    let (cycles, per_waiter, per_task) = match options.target {
        Target::Memory => (20_000, 2_000, 2_000),
        Target::Redis | Target::Etcd | Target::JetStream => (2_000, 200, 200),
    };
    let (cycles, per_waiter, per_task) = (
        scaled(cycles, options.scale),
        scaled(per_waiter, options.scale),
        scaled(per_task, options.scale),
    );
    println!(
        "dlock-bench: driver {:?}, {} rounds, medians; ratios are dlock / baseline in the same round",
        options.target, options.rounds
    );

    let mut dlock_rates = Vec::new();
    let mut raw_rates = Vec::new();
    let mut ratios = Vec::new();
    for _ in 0..options.rounds {
        let (d, r) = uncontended(&store, cycles).await?;
        dlock_rates.push(d);
        raw_rates.push(r);
        ratios.push(d / r);
    }
    println!(
        "| uncontended acquire+release | {:.0} cycles/s | raw floor {:.0} cycles/s | ratio {:.2} |",
        median(dlock_rates),
        median(raw_rates),
        median(ratios)
    );

    let (mut p50, mut p99, mut base50, mut base99, mut r50, mut r99) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for _ in 0..options.rounds {
        let (mut samples, _) = handoffs(&store, 8, per_waiter).await?;
        let mut base = baseline_handoffs(&store, samples.len().max(100)).await?;
        let (d50, d99) = (
            percentile(&mut samples, 0.5),
            percentile(&mut samples, 0.99),
        );
        let (b50, b99) = (percentile(&mut base, 0.5), percentile(&mut base, 0.99));
        p50.push(d50.as_secs_f64() * 1e6);
        p99.push(d99.as_secs_f64() * 1e6);
        base50.push(b50.as_secs_f64() * 1e6);
        base99.push(b99.as_secs_f64() * 1e6);
        r50.push(d50.as_secs_f64() / b50.as_secs_f64().max(1e-9));
        r99.push(d99.as_secs_f64() / b99.as_secs_f64().max(1e-9));
    }
    let baseline = match options.target {
        Target::Memory => "tokio Mutex handoff",
        Target::Redis => "raw PING round trip",
        Target::Etcd => "raw linearizable get",
        Target::JetStream => "raw acknowledged publish",
    };
    println!(
        "| handoff latency, 8 waiters | p50 {:.0} µs, p99 {:.0} µs | {baseline} p50 {:.1} µs, p99 {:.1} µs | ratio p50 {:.1}, p99 {:.1} |",
        median(p50),
        median(p99),
        median(base50),
        median(base99),
        median(r50),
        median(r99)
    );

    let mut rates = Vec::new();
    let mut ratios = Vec::new();
    for _ in 0..options.rounds {
        let many = many_names(&store, 16, per_task).await?;
        let (single, _) = uncontended(&store, cycles / 4).await?;
        rates.push(many);
        ratios.push(many / single);
    }
    println!(
        "| many names, 16 tasks × 1000 names | {:.0} acquires/s | {:.2}× one task on one name |",
        median(rates),
        median(ratios)
    );

    if options.target == Target::Redis {
        for waiters in [1, 4, 16, 64] {
            let mut per = Vec::new();
            for _ in 0..options.rounds {
                let rounds = (per_waiter * 8 / waiters).max(4);
                let (_, commands) = handoffs(&store, waiters, rounds).await?;
                per.push(commands as f64 / (waiters * rounds) as f64);
            }
            println!(
                "| scripts (round trips) per acquire+release, {waiters} waiters | {:.1} |",
                median(per)
            );
        }
    }

    let ttl = Duration::from_secs(3);
    let mut per_lock = Vec::new();
    for _ in 0..options.rounds.min(3) {
        per_lock.push(renewal_cost(&store, 1000, ttl).await?);
    }
    println!(
        "| renewal cost, 1000 locks held, TTL {ttl:?} | {:.2} renewals per lock per second (keeper target {:.2}) |",
        median(per_lock),
        3.0 / ttl.as_secs_f64()
    );
    Ok(())
}
