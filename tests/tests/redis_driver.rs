//! Redis driver specifics, on real servers: the Lua twin of the grant rule, a contract smoke set on a
//! single server and on a 3-master cluster, ACL and TLS, owner isolation, no keys left behind,
//! wake-ups by pub/sub and by lease expiry, restarts with and without persistence, and steps of the
//! server's wall clock (under libfaketime).
//!
//! Waits for conditions are bounded loops; the only timeouts are hang guards far above what any step
//! needs, never assertions about how fast something happened.

use std::future::IntoFuture;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use dlock::{Error, LockMode, Locks};
use dlock_core::grant::{self, QueueEntry};
use dlock_core::lease::drift_margin;
use dlock_core::{
    Driver, EntryKey, EntryRequest, Grant, Guard, LeaseState, LockName, OwnerId, Queued, Renewal,
};
use dlock_redis::RedisDriver;
use dlock_tests::harness::redis::{ClockStep, RedisPersistence};
use dlock_tests::harness::{self, Backend, RedisCluster, RedisServer, RespValue};
use dlock_tests::suite::eventually;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use LockMode::*;

/// Hang guard for anything that must happen eventually.
const GUARD: Duration = Duration::from_secs(60);
/// A lease no test outlives, so only an explicit release (never expiry) frees the lock.
const LONG_TTL: Duration = Duration::from_secs(600);

async fn within<T>(what: &str, fut: impl IntoFuture<Output = T>) -> Result<T> {
    tokio::time::timeout(GUARD, fut)
        .await
        .map_err(|_| anyhow!("{what}: nothing within {GUARD:?}"))
}

fn name(s: &str) -> LockName {
    LockName::new(s).expect("valid name")
}

fn key(lock: &str, owner: &str) -> EntryKey {
    EntryKey {
        name: name(lock),
        owner: OwnerId::parse(owner).expect("valid owner id"),
    }
}

fn request(key: &EntryKey, mode: LockMode, ttl: Duration) -> EntryRequest {
    EntryRequest {
        key: key.clone(),
        mode,
        ttl,
        wait: true,
    }
}

fn granted(q: Queued) -> Result<Grant> {
    match q {
        Queued::Granted(g) => Ok(g),
        Queued::Waiting => bail!("expected a grant, the entry waits"),
    }
}

/// A single server or a cluster, seen the same way by the checks.
enum Topology {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Topology {
    fn url(&self) -> String {
        match self {
            Topology::Single(s) => s.url(),
            Topology::Cluster(c) => cluster_url(c, ""),
        }
    }

    fn nodes(&self) -> Vec<&RedisServer> {
        match self {
            Topology::Single(s) => vec![s],
            Topology::Cluster(c) => c.nodes().iter().collect(),
        }
    }

    /// Every key on every node.
    async fn all_keys(&self) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        for node in self.nodes() {
            let mut conn = node.connect().await?;
            let mut cursor = "0".to_owned();
            for _ in 0..10_000 {
                let reply = conn
                    .command_ok(&["SCAN", &cursor, "MATCH", "*", "COUNT", "1000"])
                    .await?;
                let RespValue::Array(Some(parts)) = reply else {
                    bail!("SCAN replied {reply:?}");
                };
                let [next, RespValue::Array(Some(batch))] = &parts[..] else {
                    bail!("SCAN replied {parts:?}");
                };
                for k in batch {
                    keys.push(k.as_text()?);
                }
                cursor = next.as_text()?;
                if cursor == "0" {
                    break;
                }
            }
        }
        Ok(keys)
    }

    /// Runs a single-key command on the node that serves the key.
    async fn key_command(&self, args: &[&str]) -> Result<RespValue> {
        for node in self.nodes() {
            match node.command(args).await? {
                RespValue::Error(e) if e.starts_with("MOVED") => continue,
                RespValue::Error(e) => bail!("{args:?}: {e}"),
                v => return Ok(v),
            }
        }
        bail!("{args:?}: no node serves the key")
    }
}

fn cluster_url(c: &RedisCluster, query: &str) -> String {
    let hosts: Vec<String> = c.addrs().iter().map(|a| a.to_string()).collect();
    let scheme = if c.tls().is_some() {
        "rediss+cluster"
    } else {
        "redis+cluster"
    };
    format!("{scheme}://{}{query}", hosts.join(","))
}

// ---------------------------------------------------------------------------------------------
// The Lua twin of dlock_core::grant
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Enqueue(LockMode),
    Release(usize),
    Convert(usize, LockMode),
}

fn arb_mode() -> impl Strategy<Value = LockMode> {
    prop::sample::select(LockMode::ALL.to_vec())
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => arb_mode().prop_map(Op::Enqueue),
        2 => any::<usize>().prop_map(Op::Release),
        2 => (any::<usize>(), arb_mode()).prop_map(|(i, m)| Op::Convert(i, m)),
    ]
}

/// Replays `ops` with core's rule, and after every operation asks both core and the Lua twin what to
/// grant in the (not yet settled) queue; every attempted conversion is also checked for deadlock by
/// both. Only states reachable under the rule are produced.
async fn twin_agrees(driver: &RedisDriver, ops: &[Op]) -> Result<()> {
    let mut q: Vec<QueueEntry> = Vec::new();
    let mut next_seq = 0;
    for op in ops {
        match *op {
            Op::Enqueue(m) => {
                q.push(QueueEntry::waiting(next_seq, m));
                next_seq += 1;
            }
            Op::Release(i) if !q.is_empty() => {
                q.remove(i % q.len());
            }
            Op::Convert(i, m) if !q.is_empty() => {
                let i = i % q.len();
                if q[i].granted {
                    let rust = grant::conversion_deadlocks(&q, i, m);
                    let lua = driver.lua_conversion_deadlocks(&q, i, m).await?;
                    ensure!(
                        rust == lua,
                        "conversion_deadlocks({q:?}, {i}, {m}): core {rust}, lua {lua}"
                    );
                    if !rust {
                        q[i].converting_to = (q[i].mode != m).then_some(m);
                    }
                }
            }
            _ => {}
        }
        let rust = grant::decide(&q);
        let lua = driver.lua_decide(&q).await?;
        ensure!(rust == lua, "decide({q:?}): core {rust:?}, lua {lua:?}");
        grant::apply(&mut q, &rust);
    }
    // Every possible conversion request in the final state.
    for i in 0..q.len() {
        if !q[i].granted {
            continue;
        }
        for m in LockMode::ALL {
            let rust = grant::conversion_deadlocks(&q, i, m);
            let lua = driver.lua_conversion_deadlocks(&q, i, m).await?;
            ensure!(
                rust == lua,
                "conversion_deadlocks({q:?}, {i}, {m}): core {rust}, lua {lua}"
            );
        }
    }
    Ok(())
}

#[test]
fn lua_grant_rule_is_a_twin_of_core() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = rt.block_on(RedisServer::start())?;
    let driver = rt.block_on(RedisDriver::connect(&server.url()))?;

    // The documented examples first, so a broken twin fails with a readable case.
    let example = [
        QueueEntry::waiting(1, PR),
        QueueEntry::waiting(2, PR),
        QueueEntry::waiting(3, EX),
    ];
    assert_eq!(
        rt.block_on(driver.lua_decide(&example))?,
        grant::decide(&example)
    );

    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&prop::collection::vec(arb_op(), 1..40), |ops| {
            rt.block_on(twin_agrees(&driver, &ops))
                .map_err(|e| TestCaseError::fail(format!("{e:#}")))
        })
        .map_err(|e| anyhow!("{e}"))
}

// ---------------------------------------------------------------------------------------------
// Contract smoke set, single server and cluster
// ---------------------------------------------------------------------------------------------

async fn exclusion_and_sharing(locks: &Locks) -> Result<()> {
    let ex = locks.lock("smoke/ex").mode(EX).await?;
    let err = locks
        .lock("smoke/ex")
        .mode(EX)
        .try_acquire()
        .await
        .unwrap_err();
    ensure!(err.is_would_block(), "EX beside EX: {err}");
    let err = locks
        .lock("smoke/ex")
        .mode(CR)
        .try_acquire()
        .await
        .unwrap_err();
    ensure!(err.is_would_block(), "CR beside EX: {err}");
    // WouldBlock leaves nothing queued.
    let queue = locks.driver().inspect(&name("smoke/ex")).await?;
    ensure!(queue.len() == 1, "only the holder is queued: {queue:?}");
    ex.release().await?;
    locks
        .lock("smoke/ex")
        .mode(EX)
        .try_acquire()
        .await?
        .release()
        .await?;

    let a = locks.lock("smoke/pr").mode(PR).await?;
    let b = locks.lock("smoke/pr").mode(PR).try_acquire().await?;
    let err = locks
        .lock("smoke/pr")
        .mode(PW)
        .try_acquire()
        .await
        .unwrap_err();
    ensure!(err.is_would_block(), "PW beside PR: {err}");
    a.release().await?;
    b.release().await?;
    Ok(())
}

async fn fifo_steps(driver: &RedisDriver) -> Result<()> {
    let modes = [EX, PR, PR, PR, EX, EX, PR, PR];
    let lock = "smoke/fifo ü*>";
    let keys: Vec<EntryKey> = (0..modes.len())
        .map(|i| key(lock, &format!("fifo-{i}")))
        .collect();
    for (k, m) in keys.iter().zip(modes) {
        driver.enqueue(&request(k, m, LONG_TTL)).await?;
    }
    let mut steps = Vec::new();
    let mut last_token = 0;
    for _ in 0..modes.len() {
        let queue = driver.inspect(&name(lock)).await?;
        if queue.is_empty() {
            break;
        }
        let step: Vec<usize> = queue
            .iter()
            .filter(|e| e.granted)
            .map(|e| {
                keys.iter()
                    .position(|k| k.owner == e.owner)
                    .expect("known owner")
            })
            .collect();
        let mut tokens = Vec::new();
        for &i in &step {
            let g = within("wait of a granted entry", driver.wait(&keys[i])).await??;
            ensure!(g.mode == modes[i], "entry {i} holds {}", g.mode);
            tokens.push(g.token);
        }
        ensure!(
            tokens.iter().all(|&t| t > last_token),
            "tokens {tokens:?} after {last_token}"
        );
        last_token = tokens.into_iter().max().unwrap_or(last_token);
        for &i in &step {
            driver.release(&keys[i]).await?;
        }
        steps.push(step);
    }
    let expected: Vec<Vec<usize>> = vec![vec![0], vec![1, 2, 3], vec![4], vec![5], vec![6, 7]];
    ensure!(steps == expected, "grant steps {steps:?}");
    Ok(())
}

async fn fencing_tokens_increase(
    locks: &Locks,
    topo: &Topology,
    driver: &RedisDriver,
) -> Result<()> {
    let mut last = 0;
    for _ in 0..5 {
        let g = locks.lock("smoke/fence").mode(EX).await?;
        ensure!(
            g.fencing_token() > last,
            "{} after {last}",
            g.fencing_token()
        );
        last = g.fencing_token();
        // Held: the queue hash exists and carries an expiry.
        let key = driver.queue_key(&name("smoke/fence"));
        let pttl = topo.key_command(&["PTTL", &key]).await?;
        ensure!(
            matches!(pttl, RespValue::Integer(ms) if ms > 0),
            "PTTL {key}: {pttl:?}"
        );
        g.release().await?;
        // Idle: no key at all, yet the next token is still higher.
        let exists = topo.key_command(&["EXISTS", &key]).await?;
        ensure!(exists == RespValue::Integer(0), "{key} left behind");
    }
    // Compatible holders get distinct, increasing tokens too (total order).
    let r1 = locks.lock("smoke/fence").mode(PR).await?;
    let r2 = locks.lock("smoke/fence").mode(PR).await?;
    ensure!(r1.fencing_token() > last && r2.fencing_token() > r1.fencing_token());
    r1.release().await?;
    r2.release().await?;
    Ok(())
}

async fn conversions(driver: &RedisDriver, locks: &Locks) -> Result<()> {
    let lock = "smoke/convert";
    let (a, b) = (key(lock, "conv-a"), key(lock, "conv-b"));
    let ga = granted(driver.enqueue(&request(&a, PR, LONG_TTL)).await?.queued)?;
    granted(driver.enqueue(&request(&b, PR, LONG_TTL)).await?.queued)?;

    // Up-conversion waits for the other reader.
    ensure!(driver.convert(&a, EX).await? == Queued::Waiting);
    // The other reader asking for EX too would wait on a, which waits on it: refused, nothing changed.
    match driver.convert(&b, EX).await {
        Err(Error::ConversionDeadlock { from, to, .. }) => {
            ensure!(from == PR && to == EX, "deadlock reported {from} -> {to}");
        }
        other => bail!("expected ConversionDeadlock, got {other:?}"),
    }
    let queue = driver.inspect(&name(lock)).await?;
    ensure!(
        queue[1].mode == PR
            && queue[1].converting_to.is_none()
            && queue[0].converting_to == Some(EX),
        "{queue:?}"
    );
    // b leaves: a's conversion is granted, with a new token.
    let waiting = tokio::spawn({
        let (driver, a) = (driver.clone(), a.clone());
        async move { driver.wait(&a).await }
    });
    driver.release(&b).await?;
    let up = within("up-conversion", waiting).await???;
    ensure!(up.mode == EX && up.token > ga.token, "{up:?} after {ga:?}");

    // Down-conversion is granted at once.
    let down = granted(driver.convert(&a, CR).await?)?;
    ensure!(down.mode == CR && down.token > up.token, "{down:?}");
    // Converting to the mode held is a no-op grant.
    ensure!(granted(driver.convert(&a, CR).await?)?.mode == CR);
    driver.release(&a).await?;

    // The same through guards.
    let mut w = locks.lock(lock).mode(EX).await?;
    ensure!(locks.lock(lock).mode(PR).try_acquire().await.is_err());
    w.convert(PR).await?;
    ensure!(w.mode() == PR);
    let r = locks.lock(lock).mode(PR).try_acquire().await?;
    r.release().await?;
    w.release().await?;

    // Renew or convert of a gone entry is Lost; release of a gone entry succeeds.
    ensure!(driver.renew(&a, LONG_TTL).await.unwrap_err().is_lost());
    ensure!(driver.convert(&a, EX).await.unwrap_err().is_lost());
    driver.release(&a).await?;
    Ok(())
}

async fn smoke(topo: &Topology) -> Result<()> {
    let driver = RedisDriver::connect(&topo.url()).await?;
    let locks = Locks::new(driver.clone());
    let caps = locks.capabilities();
    ensure!(caps.driver == "redis" && caps.fencing_total_order && caps.shared_between_processes);
    exclusion_and_sharing(&locks)
        .await
        .context("exclusion and sharing")?;
    fifo_steps(&driver).await.context("FIFO grant steps")?;
    fencing_tokens_increase(&locks, topo, &driver)
        .await
        .context("fencing tokens")?;
    conversions(&driver, &locks).await.context("conversions")?;
    // The facade reaches the same store by URL.
    let via_facade = dlock::connect(&topo.url()).await?;
    let held = via_facade.lock("smoke/facade").await?;
    ensure!(locks
        .lock("smoke/facade")
        .try_acquire()
        .await
        .unwrap_err()
        .is_would_block());
    held.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_smoke_on_single_server() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    smoke(&Topology::Single(RedisServer::start().await?)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_smoke_on_cluster() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    smoke(&Topology::Cluster(RedisCluster::start().await?)).await
}

// ---------------------------------------------------------------------------------------------
// Owner isolation
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_cannot_renew_convert_or_release_another_owners_entry() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = RedisServer::start().await?;
    let driver = RedisDriver::connect(&server.url()).await?;
    let holder = key("isolated", "client1-7");
    let forged = key("isolated", "client2-7");
    let g = granted(
        driver
            .enqueue(&request(&holder, EX, LONG_TTL))
            .await?
            .queued,
    )?;

    ensure!(driver.renew(&forged, LONG_TTL).await.unwrap_err().is_lost());
    ensure!(driver.convert(&forged, NL).await.unwrap_err().is_lost());
    driver.release(&forged).await?; // succeeds, as for any gone entry …
    let queue = driver.inspect(&holder.name).await?;
    ensure!(
        queue.len() == 1 && queue[0].owner == holder.owner && queue[0].granted,
        "… but removes nothing: {queue:?}"
    );
    ensure!(driver.wait(&forged).await.unwrap_err().is_lost());
    // The holder's own entry still works.
    driver.renew(&holder, LONG_TTL).await?;
    ensure!(driver.wait(&holder).await? == g);
    driver.release(&holder).await?;
    ensure!(driver.inspect(&holder.name).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_prefixes_separate_applications() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = RedisServer::start().await?;
    let topo = Topology::Single(server);
    let url = topo.url();
    let a = RedisDriver::connect(&format!("{url}?key_prefix=app-a")).await?;
    let b = RedisDriver::builder(&url)
        .key_prefix("app.b")
        .connect()
        .await?;
    ensure!(a.queue_key(&name("stock/1")) == "{app-a:stock%2F1}:q");
    ensure!(b.channel(&name("stock/1")) == "{app.b:stock%2F1}:w");
    let ga = Locks::new(a).lock("stock/1").mode(EX).await?;
    let gb = Locks::new(b).lock("stock/1").mode(EX).try_acquire().await?;
    let mut keys = topo.all_keys().await?;
    keys.sort();
    ensure!(
        keys == ["{app-a:stock%2F1}:q", "{app.b:stock%2F1}:q"],
        "{keys:?}"
    );
    ga.release().await?;
    gb.release().await?;
    let err = RedisDriver::builder(&url)
        .key_prefix("a}b")
        .connect()
        .await
        .unwrap_err();
    ensure!(matches!(err, Error::InvalidUrl { .. }), "{err}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Nothing left behind
// ---------------------------------------------------------------------------------------------

async fn queue_len(driver: &RedisDriver, lock: &str) -> Result<usize> {
    Ok(driver.inspect(&name(lock)).await?.len())
}

async fn leaves_no_keys(topo: &Topology) -> Result<()> {
    let driver = RedisDriver::connect(&topo.url()).await?;
    let locks = Locks::new(driver.clone());

    // Plain acquire and release, several names.
    for i in 0..5 {
        locks
            .lock(format!("mem/plain/{i}"))
            .await?
            .release()
            .await?;
    }
    // A waiter granted after a release.
    let holder = locks.lock("mem/handoff").mode(EX).await?;
    let waiter = tokio::spawn({
        let locks = locks.clone();
        async move { locks.lock("mem/handoff").mode(EX).await }
    });
    eventually("waiter queued", || async {
        Ok(queue_len(&driver, "mem/handoff").await? == 2)
    })
    .await?;
    holder.release().await?;
    within("handoff", waiter).await???.release().await?;

    // An acquire that times out, and one whose future is dropped: both clean up in the background.
    let holder = locks.lock("mem/cancel").mode(EX).await?;
    let err = locks
        .lock("mem/cancel")
        .mode(EX)
        .timeout(Duration::from_millis(50))
        .await
        .unwrap_err();
    ensure!(err.is_timeout(), "{err}");
    {
        let pending = locks.lock("mem/cancel").mode(PR).into_future();
        tokio::pin!(pending);
        let queued = eventually("second waiter queued", || async {
            Ok(queue_len(&driver, "mem/cancel").await? >= 2)
        });
        tokio::select! {
            r = &mut pending => bail!("acquired while the holder holds: {:?}", r.map(|g| g.mode())),
            r = queued => r?,
        }
    } // dropped here
    eventually("cancelled waiters removed", || async {
        Ok(queue_len(&driver, "mem/cancel").await? == 1)
    })
    .await?;
    holder.release().await?;

    // try_acquire refused; a conversion; a guard dropped without release.
    let holder = locks.lock("mem/misc").mode(PW).await?;
    ensure!(locks.lock("mem/misc").mode(PW).try_acquire().await.is_err());
    let mut holder = holder;
    holder.convert(EX).await?;
    drop(holder);
    eventually("dropped guard released", || async {
        Ok(queue_len(&driver, "mem/misc").await? == 0)
    })
    .await?;

    let keys = topo.all_keys().await?;
    ensure!(keys.is_empty(), "keys left behind: {keys:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_locks_leave_no_keys_on_single_server() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    leaves_no_keys(&Topology::Single(RedisServer::start().await?)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_locks_leave_no_keys_on_cluster() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    leaves_no_keys(&Topology::Cluster(RedisCluster::start().await?)).await
}

// ---------------------------------------------------------------------------------------------
// Wake-ups
// ---------------------------------------------------------------------------------------------

/// A driver that never polls within a test's lifetime: any wake-up it gets comes by pub/sub or by a
/// lease running out.
async fn no_poll_driver(url: &str) -> Result<RedisDriver> {
    Ok(RedisDriver::builder(url)
        .poll_interval(Duration::from_secs(3600))
        .connect()
        .await?)
}

async fn waiter_woken_by_pubsub(topo: &Topology) -> Result<()> {
    let driver = no_poll_driver(&topo.url()).await?;
    let other = no_poll_driver(&topo.url()).await?;
    let (locks, other_locks) = (Locks::new(driver.clone()), Locks::new(other.clone()));
    for lock in ["wake/a", "wake/b/ü", "wake/c"] {
        // The holder's lease is far longer than the hang guard: only the release message can wake
        // the waiter in time.
        let holder = locks.lock(lock).mode(EX).ttl(LONG_TTL).await?;
        let waiter = tokio::spawn({
            let (other_locks, lock) = (other_locks.clone(), lock.to_owned());
            async move { other_locks.lock(lock).mode(PR).ttl(LONG_TTL).await }
        });
        eventually("waiter queued", || async {
            Ok(queue_len(&driver, lock).await? == 2)
        })
        .await?;
        let token = holder.fencing_token();
        holder.release().await?;
        let got = within("waiter woken by pub/sub", waiter).await???;
        ensure!(got.fencing_token() > token);
        got.release().await?;
    }

    // A pending conversion is woken the same way.
    let lock = "wake/convert";
    let (a, b) = (key(lock, "wake-a"), key(lock, "wake-b"));
    granted(driver.enqueue(&request(&a, PR, LONG_TTL)).await?.queued)?;
    granted(other.enqueue(&request(&b, PR, LONG_TTL)).await?.queued)?;
    ensure!(driver.convert(&a, EX).await? == Queued::Waiting);
    let waiting = tokio::spawn({
        let (driver, a) = (driver.clone(), a.clone());
        async move { driver.wait(&a).await }
    });
    other.release(&b).await?;
    ensure!(within("conversion woken by pub/sub", waiting).await???.mode == EX);
    driver.release(&a).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_by_pubsub_on_single_server() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    waiter_woken_by_pubsub(&Topology::Single(RedisServer::start().await?)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_by_sharded_pubsub_on_cluster() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    waiter_woken_by_pubsub(&Topology::Cluster(RedisCluster::start().await?)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_behind_a_crashed_holder_is_granted_when_its_lease_lapses() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = RedisServer::start().await?;
    let driver = no_poll_driver(&server.url()).await?;
    let locks = Locks::new(driver.clone());
    for (i, mode) in [EX, PW, PR].into_iter().enumerate() {
        let lock = format!("crash/{i}");
        // A holder that never renews: its entry is left to expire, as after kill -9.
        let crashed = key(&lock, &format!("crashed-{i}"));
        let dead = granted(
            driver
                .enqueue(&request(&crashed, mode, Duration::from_millis(300)))
                .await?
                .queued,
        )?;
        // No poll within the test's lifetime and no release message: only the expiry wake-up
        // (the wait-check's "earliest blocker expiry") can grant the waiter.
        let guard = within(
            "waiter granted after the crashed holder's lease",
            locks.lock(&lock).mode(EX).ttl(LONG_TTL),
        )
        .await??;
        ensure!(guard.fencing_token() > dead.token);
        let queue = driver.inspect(&name(&lock)).await?;
        ensure!(
            queue.len() == 1 && queue[0].owner != crashed.owner,
            "crashed entry purged: {queue:?}"
        );
        ensure!(driver
            .renew(&crashed, LONG_TTL)
            .await
            .unwrap_err()
            .is_lost());
        guard.release().await?;
    }
    Ok(())
}

/// `calls=` of `cmdstat_evalsha` in `INFO commandstats`.
async fn evalsha_calls(server: &RedisServer) -> Result<u64> {
    let info = server.command(&["INFO", "commandstats"]).await?.as_text()?;
    let line = info
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .context("no EVALSHA counted yet")?;
    let calls = line
        .split([':', ','])
        .find_map(|kv| kv.strip_prefix("calls="))
        .context("calls= in commandstats")?;
    Ok(calls.parse()?)
}

/// Renews held entries on several names, one of them gone, as the client's keeper does. With a
/// `server`, also says how many scripts the batch ran there.
async fn renew_many_answers_each_renewal(
    driver: &RedisDriver,
    server: Option<&RedisServer>,
) -> Result<(Vec<EntryKey>, u64)> {
    let held: Vec<EntryKey> = (0..4)
        .map(|i| key(&format!("batch/{i}"), &format!("client1-{i}")))
        .collect();
    for k in &held {
        granted(
            driver
                .enqueue(&request(k, EX, Duration::from_secs(2)))
                .await?
                .queued,
        )?;
    }
    driver.release(&held[2]).await?;
    let renewals: Vec<Renewal<'_>> = held
        .iter()
        .map(|key| Renewal { key, ttl: LONG_TTL })
        .collect();
    let before = match server {
        Some(server) => evalsha_calls(server).await?,
        None => 0,
    };
    let answers = driver.renew_many(&renewals).await;
    let scripts = match server {
        Some(server) => evalsha_calls(server).await? - before,
        None => 0,
    };
    ensure!(answers.len() == held.len(), "{answers:?}");
    for (i, answer) in answers.iter().enumerate() {
        match (i, answer) {
            (2, Err(err)) => ensure!(err.is_lost(), "the released entry: {err}"),
            (2, Ok(_)) => bail!("renewed an entry that was released"),
            (_, Err(err)) => bail!("renewal {i}: {err}"),
            (_, Ok(_)) => {}
        }
    }
    Ok((held, scripts))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_renewals_is_one_script_on_a_single_server() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = RedisServer::start().await?;
    let driver = RedisDriver::connect(&server.url()).await?;
    // Warm the script cache, so the count below is not a NOSCRIPT retry.
    let warm = key("batch/warm", "client1-99");
    granted(driver.enqueue(&request(&warm, EX, LONG_TTL)).await?.queued)?;
    let pair = [
        Renewal {
            key: &warm,
            ttl: LONG_TTL,
        },
        Renewal {
            key: &warm,
            ttl: LONG_TTL,
        },
    ];
    ensure!(driver.renew_many(&pair).await.iter().all(|a| a.is_ok()));
    let (held, scripts) = renew_many_answers_each_renewal(&driver, Some(&server)).await?;
    ensure!(scripts == 1, "{scripts} scripts for one batch");
    // The renewed entries outlive the TTL they were queued with.
    let pttl = server
        .command(&["PTTL", &driver.queue_key(&held[0].name)])
        .await?;
    ensure!(
        matches!(pttl, RespValue::Integer(ms) if ms > 10_000),
        "expiry after the renewal: {pttl:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_renewals_over_a_cluster_answers_each_renewal() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let cluster = RedisCluster::start().await?;
    let driver = RedisDriver::connect(&cluster_url(&cluster, "")).await?;
    renew_many_answers_each_renewal(&driver, None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_wakes_only_the_next_holder() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    const WAITERS: u64 = 16;
    let server = RedisServer::start().await?;
    let holder_driver = no_poll_driver(&server.url()).await?;
    // One driver for all waiters: they share its subscriber and the name's channel, so a wake-up
    // must reach only the owner it names.
    let waiter_driver = no_poll_driver(&server.url()).await?;
    let (holders, waiters) = (Locks::new(holder_driver.clone()), Locks::new(waiter_driver));
    // Load every script once, so no NOSCRIPT retry is counted below.
    let warm = key("herd/warm-up", "warm-1");
    holder_driver.enqueue(&request(&warm, EX, LONG_TTL)).await?;
    holder_driver.wait(&warm).await?;
    holder_driver.release(&warm).await?;
    let holder = holders.lock("herd").mode(EX).ttl(LONG_TTL).await?;
    let mut chain = Vec::new();
    for _ in 0..WAITERS {
        let waiters = waiters.clone();
        chain.push(tokio::spawn(async move {
            let g = waiters.lock("herd").mode(EX).ttl(LONG_TTL).await?;
            let token = g.fencing_token();
            g.release().await?;
            Ok::<u64, Error>(token)
        }));
    }
    eventually("all waiters queued", || async {
        Ok(queue_len(&holder_driver, "herd").await? == WAITERS as usize + 1)
    })
    .await?;
    // Queued waiters run one check each right after queueing; counting starts once those are done
    // (the count stands still: nothing else runs a script while every waiter waits).
    let mut before = evalsha_calls(&server).await?;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = evalsha_calls(&server).await?;
        if now == before {
            break;
        }
        before = now;
    }
    holder.release().await?;
    let mut tokens = Vec::new();
    for waiter in chain {
        tokens.push(within("chain of handoffs", waiter).await???);
    }
    let calls = evalsha_calls(&server).await? - before;
    // Per handoff one script, the release: its message carries the next holder's grant, so the
    // woken waiter runs no check. Waking every waiter per release would take
    // WAITERS * (WAITERS + 1) / 2 checks, and a check per wake-up WAITERS more.
    ensure!(
        calls <= WAITERS + 1,
        "{calls} script runs for {WAITERS} handoffs"
    );
    tokens.sort_unstable();
    tokens.dedup();
    ensure!(
        tokens.len() == WAITERS as usize,
        "distinct tokens: {tokens:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_survive_a_lost_subscriber_connection() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = RedisServer::start().await?;
    let driver = no_poll_driver(&server.url()).await?;
    let locks = Locks::new(driver.clone());
    for round in 0..3 {
        let lock = format!("resubscribe/{round}");
        let holder = locks.lock(&lock).mode(EX).ttl(LONG_TTL).await?;
        let waiter = tokio::spawn({
            let (locks, lock) = (locks.clone(), lock.clone());
            async move { locks.lock(lock).mode(EX).ttl(LONG_TTL).await }
        });
        eventually("waiter queued", || async {
            Ok(queue_len(&driver, &lock).await? == 2)
        })
        .await?;
        // The waiter is queued before it subscribes (and, after a kill, before the subscriber
        // connection is back): kill it only once it carries the waiter's subscription.
        let channel = driver.channel(&name(&lock));
        eventually("the waiter is subscribed", || async {
            let numsub = server.command(&["PUBSUB", "NUMSUB", &channel]).await?;
            Ok(matches!(numsub, RespValue::Array(Some(ref v)) if v.get(1) == Some(&RespValue::Integer(1))))
        })
        .await?;
        // Drop the subscriber connection server-side; whatever is published until it is back is lost.
        let killed = server
            .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
            .await?;
        ensure!(
            matches!(killed, RespValue::Integer(n) if n >= 1),
            "CLIENT KILL: {killed:?}"
        );
        holder.release().await?;
        within("waiter after reconnect", waiter)
            .await???
            .release()
            .await?;
    }
    // Later waiters are woken by pub/sub again on the new connection.
    let holder = locks
        .lock("resubscribe/after")
        .mode(EX)
        .ttl(LONG_TTL)
        .await?;
    let waiter = tokio::spawn({
        let locks = locks.clone();
        async move { locks.lock("resubscribe/after").mode(EX).ttl(LONG_TTL).await }
    });
    eventually("waiter queued", || async {
        Ok(queue_len(&driver, "resubscribe/after").await? == 2)
    })
    .await?;
    holder.release().await?;
    within("waiter woken on the new connection", waiter)
        .await???
        .release()
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_poll_when_subscribing_is_refused() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = RedisServer::start().await?;
    // A user that may do everything but subscribe: no wake-up message can ever arrive.
    let created = server
        .command(&[
            "ACL",
            "SETUSER",
            "nosub",
            "on",
            ">pw",
            "~*",
            "&*",
            "+@all",
            "-subscribe",
            "-ssubscribe",
        ])
        .await?;
    ensure!(created == RespValue::Simple("OK".into()), "{created:?}");
    let url = format!("redis://nosub:pw@127.0.0.1:{}", server.port());
    let driver = RedisDriver::builder(&url)
        .poll_interval(Duration::from_millis(200))
        .connect()
        .await?;
    let locks = Locks::new(driver.clone());
    let holder = locks.lock("nosub").mode(EX).ttl(LONG_TTL).await?;
    let waiter = tokio::spawn({
        let locks = locks.clone();
        async move { locks.lock("nosub").mode(EX).ttl(LONG_TTL).await }
    });
    eventually("waiter queued", || async {
        Ok(queue_len(&driver, "nosub").await? == 2)
    })
    .await?;
    holder.release().await?;
    within("waiter granted by polling", waiter)
        .await???
        .release()
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ACL and TLS
// ---------------------------------------------------------------------------------------------

async fn lock_and_handoff(url: &str) -> Result<()> {
    let a = Locks::new(no_poll_driver(url).await?);
    let b = Locks::new(no_poll_driver(url).await?);
    let held = a.lock("auth/x").mode(EX).ttl(LONG_TTL).await?;
    ensure!(b
        .lock("auth/x")
        .try_acquire()
        .await
        .unwrap_err()
        .is_would_block());
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.lock("auth/x").mode(EX).ttl(LONG_TTL).await }
    });
    eventually("waiter queued", || async {
        Ok(a.driver().inspect(&name("auth/x")).await?.len() == 2)
    })
    .await?;
    held.release().await?;
    within("handoff", waiter).await???.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_and_password_from_the_url() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = RedisServer::builder()
        .acl_user("locker", "s3cret/pw")
        .start()
        .await?;
    let port = server.port();
    for (url, what) in [
        (
            format!("redis://locker:wrong@127.0.0.1:{port}"),
            "wrong password",
        ),
        (
            format!("redis://nobody:s3cret%2Fpw@127.0.0.1:{port}"),
            "unknown user",
        ),
        (format!("redis://127.0.0.1:{port}"), "no credentials"),
    ] {
        let err = RedisDriver::connect(&url).await.unwrap_err();
        let msg = err.to_string();
        ensure!(msg.contains("authentication failed"), "{what}: {msg}");
        ensure!(!msg.contains("wrong@"), "{what}: password leaked: {msg}");
        // Through the facade too.
        let msg = dlock::connect(&url).await.unwrap_err().to_string();
        ensure!(
            msg.contains("authentication failed"),
            "{what} via facade: {msg}"
        );
    }
    lock_and_handoff(&server.url()).await?;

    // `requirepass` alone: `redis://:PASSWORD@`.
    let server = RedisServer::builder().password("pa ss").start().await?;
    ensure!(server.url().contains(":pa%20ss@"), "{}", server.url());
    lock_and_handoff(&server.url()).await?;
    let msg = RedisDriver::connect(&format!("redis://:nope@127.0.0.1:{}", server.port()))
        .await
        .unwrap_err()
        .to_string();
    ensure!(msg.contains("authentication failed"), "{msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = RedisServer::builder()
        .tls(true)
        .acl_user("locker", "s3cret")
        .start()
        .await?;
    let tls = server.tls().context("TLS files")?;
    let url = server.url();
    ensure!(url.starts_with("rediss://"), "{url}");

    // Verified against the test CA.
    lock_and_handoff(&format!("{url}?tls_ca={}", tls.ca_cert.display())).await?;
    // Mutual TLS: with a client certificate.
    lock_and_handoff(&format!(
        "{url}?tls_ca={}&tls_cert={}&tls_key={}",
        tls.ca_cert.display(),
        tls.client_cert.display(),
        tls.client_key.display()
    ))
    .await?;
    // Without the CA the server's certificate is not trusted …
    let msg = RedisDriver::connect(&url).await.unwrap_err().to_string();
    ensure!(!msg.contains("authentication failed"), "{msg}");
    // … unless verification is explicitly switched off.
    lock_and_handoff(&format!("{url}#insecure")).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let cluster = RedisServer::builder().tls(true).start_cluster().await?;
    let tls = cluster.tls().context("TLS files")?;
    let url = cluster_url(&cluster, &format!("?tls_ca={}", tls.ca_cert.display()));
    lock_and_handoff(&url).await
}

// ---------------------------------------------------------------------------------------------
// Restarts: with and without persistence
// ---------------------------------------------------------------------------------------------

/// Waits until `guard` either confirms a renewal sent at or after `since` (Held, with a validity
/// deadline only such a renewal gives) or turns Lost; `true` for the renewal.
async fn renewed_since(guard: &Guard, ttl: Duration, since: Instant) -> Result<bool> {
    let fresh = since + ttl - drift_margin(ttl);
    let mut status = guard.watch();
    let seen = within(
        "a renewal after the restart, or Lost",
        status.wait_for(|s| {
            (s.state == LeaseState::Held && s.valid_until >= fresh) || s.state == LeaseState::Lost
        }),
    )
    .await??
    .state;
    Ok(seen == LeaseState::Held)
}

/// Waits until each client's command connection works again after a server restart: the first
/// command on a connection the server dropped fails (transiently) and reconnects.
async fn reconnected(clients: &[&Locks]) -> Result<()> {
    for locks in clients {
        eventually("client reconnected after the restart", || async {
            Ok(locks
                .driver()
                .inspect(&name("reconnect-probe"))
                .await
                .is_ok())
        })
        .await?;
    }
    Ok(())
}

/// `try_acquire` by another client must not succeed while `holder` may still rely on its lock.
async fn no_second_holder(other: &Locks, lock: &str, holder: &Guard) -> Result<()> {
    match other.lock(lock).mode(EX).ttl(LONG_TTL).try_acquire().await {
        Err(e) if e.is_would_block() => Ok(()),
        Err(e) => Err(e.into()),
        Ok(second) => {
            let valid = holder.is_valid();
            second.release().await?;
            ensure!(
                !valid,
                "{lock}: granted to a second client while the holder's guard is valid"
            );
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_aof_always_keeps_every_grant() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    const TTL: Duration = Duration::from_secs(5);
    let server = RedisServer::builder()
        .persistence(RedisPersistence::AofAlways)
        .start()
        .await?;
    let a = Locks::new(RedisDriver::connect(&server.url()).await?);
    let b = Locks::new(RedisDriver::connect(&server.url()).await?);
    let lock = "restart/aof";
    let held = a.lock(lock).mode(EX).ttl(TTL).await?;
    // A reader queued behind it is persisted too, in its place.
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.lock(lock).mode(PR).ttl(LONG_TTL).await }
    });
    eventually("reader queued", || async {
        Ok(a.driver().inspect(&name(lock)).await?.len() == 2)
    })
    .await?;

    server.kill()?; // SIGKILL: no shutdown, no final fsync
    server.restart().await?; // same data directory: the AOF is loaded before PING answers
    let back = Instant::now();
    reconnected(&[&a, &b]).await?;
    no_second_holder(&b, lock, &held).await?;
    let queue = a.driver().inspect(&name(lock)).await?;
    ensure!(
        queue.len() == 2
            && queue[0].owner == held.entry_key().owner
            && queue[0].granted
            && queue[0].mode == EX
            && queue[1].mode == PR
            && !queue[1].granted,
        "the queue after the restart: {queue:?}"
    );

    if renewed_since(&held, TTL, back).await? {
        // The holder's renewals succeed again; the lock is still its own.
        no_second_holder(&b, lock, &held).await?;
        ensure!(held.is_valid());
    } else {
        // The restart outlasted the lease: the holder saw Lost first, only then may others get it.
        ensure!(!held.is_valid());
    }
    let token = held.fencing_token();
    held.release().await?;
    // The queued reader, whose wait spanned the restart, is granted next.
    let reader = within("the reader queued before the restart", waiter).await???;
    ensure!(reader.mode() == PR && reader.fencing_token() > token);
    reader.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_persistence_forgets_grants_as_documented() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = RedisServer::start().await?; // no RDB, no AOF
    let a_driver = RedisDriver::connect(&server.url()).await?;
    let a = Locks::new(a_driver.clone());
    let b = Locks::new(RedisDriver::connect(&server.url()).await?);
    let lock = "restart/none";
    // Its keeper renews at TTL/3: not before the second grant below.
    let held = a.lock(lock).mode(EX).ttl(LONG_TTL).await?;

    server.kill()?;
    server.restart().await?;
    reconnected(&[&a, &b]).await?;
    // The store has forgotten the grant: a second client gets the lock at once …
    let second = b.lock(lock).mode(EX).ttl(LONG_TTL).try_acquire().await?;
    // … while the first guard still reports it valid: two EX holders. This is the weakening the
    // driver documents for a restart without persistence.
    ensure!(
        held.is_valid() && held.status().state == LeaseState::Held,
        "the first guard: {:?}",
        held.status()
    );
    // Fencing still orders them: tokens restart from the server clock, above the old ones, so a
    // resource that checks tokens rejects the first holder's writes from now on.
    ensure!(
        second.fencing_token() > held.fencing_token(),
        "token {} after the restart, {} before",
        second.fencing_token(),
        held.fencing_token()
    );
    // The first holder learns at its next renewal, which finds its entry gone.
    ensure!(a_driver
        .renew(held.entry_key(), LONG_TTL)
        .await
        .unwrap_err()
        .is_lost());
    second.release().await?;
    drop(held);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Clock steps on the Redis host (libfaketime)
// ---------------------------------------------------------------------------------------------

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).expect("a test-sized duration")
}

async fn fake_clock_server() -> Result<RedisServer> {
    RedisServer::builder().fake_clock(true).start().await
}

/// The entry's lease expiry as stored (µs of server time); see the `lua` module's storage format.
async fn stored_expiry(server: &RedisServer, driver: &RedisDriver, key: &EntryKey) -> Result<i64> {
    let reply = server
        .command(&["HGET", &driver.queue_key(&key.name), key.owner.as_str()])
        .await?;
    let entry = reply.as_text()?;
    let expiry = entry
        .split(' ')
        .nth(4)
        .with_context(|| format!("entry {entry:?}"))?;
    Ok(expiry.parse()?)
}

/// What Redis 7 reads its time from: `TIME`, `TIME` inside a script and key expiry (passive and
/// active) all follow the wall clock (`CLOCK_REALTIME`), which libfaketime steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_time_and_key_expiry_follow_the_wall_clock() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = fake_clock_server().await?;
    let script_time = || async {
        let reply = server
            .command(&[
                "EVAL",
                "local t = redis.call('TIME') return t[1] * 1000000 + t[2]",
                "0",
            ])
            .await?;
        match reply {
            RespValue::Integer(us) => Ok::<i64, anyhow::Error>(us),
            other => bail!("EVAL TIME replied {other:?}"),
        }
    };

    // Forward: TIME (also a script's) jumps, and a key with 10 s left expires at once — read or not.
    ensure!(
        server
            .command(&["SET", "ten-seconds", "1", "PX", "10000"])
            .await?
            == RespValue::Simple("OK".into())
    );
    ensure!(
        server
            .command(&["SET", "untouched", "1", "PX", "10000"])
            .await?
            == RespValue::Simple("OK".into())
    );
    let before = script_time().await?;
    server
        .step_clock(ClockStep::Forward(Duration::from_secs(60)))
        .await?;
    ensure!(script_time().await? - before >= 60_000_000);
    ensure!(server.command(&["PTTL", "ten-seconds"]).await? == RespValue::Integer(-2));
    // Active expiry (serverCron) removes the other one without anyone reading it.
    eventually("active expiry after the forward step", || async {
        Ok(server.command(&["DBSIZE"]).await? == RespValue::Integer(0))
    })
    .await?;

    // Backward: a key's remaining time grows by the step.
    ensure!(
        server
            .command(&["SET", "stretched", "1", "PX", "10000"])
            .await?
            == RespValue::Simple("OK".into())
    );
    server
        .step_clock(ClockStep::Back(Duration::from_secs(100)))
        .await?;
    match server.command(&["PTTL", "stretched"]).await? {
        RespValue::Integer(ms) if ms > 100_000 => {}
        other => bail!("PTTL after stepping back 100 s: {other:?}"),
    }
    ensure!(server.clock_offset_micros() == Some(-40_000_000));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_clock_step_beyond_the_lease_grants_a_second_holder_as_documented() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = fake_clock_server().await?;
    let a_driver = RedisDriver::connect(&server.url()).await?;
    let a = Locks::new(a_driver.clone());
    let b = Locks::new(RedisDriver::connect(&server.url()).await?);
    let lock = "clock/forward";
    let ttl = Duration::from_secs(60); // renewed at 20 s: not within this test's steps
    let held = a.lock(lock).mode(EX).ttl(ttl).await?;

    // The server's clock jumps past the whole lease: the entry counts as expired at once.
    server.step_clock(ClockStep::Forward(ttl * 2)).await?;
    let second = b.lock(lock).mode(EX).ttl(ttl).try_acquire().await?;
    ensure!(
        held.is_valid() && held.status().state == LeaseState::Held,
        "two EX holders expected, the first guard is {:?}",
        held.status()
    );
    // Tokens go on increasing: the clock moved forward.
    ensure!(second.fencing_token() > held.fencing_token());
    // The first holder finds out at its next renewal, after the second was granted.
    ensure!(a_driver
        .renew(held.entry_key(), ttl)
        .await
        .unwrap_err()
        .is_lost());
    second.release().await?;
    drop(held);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_clock_step_within_the_lease_is_absorbed_by_the_next_renewal() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = fake_clock_server().await?;
    let a_driver = RedisDriver::connect(&server.url()).await?;
    let a = Locks::new(a_driver.clone());
    let b = Locks::new(RedisDriver::connect(&server.url()).await?);
    let lock = "clock/forward-small";
    // Renewed every 2 s, so at least ~4 s of the lease is always left in the store.
    let ttl = Duration::from_secs(6);
    let step = Duration::from_secs(1);
    let held = a.lock(lock).mode(EX).ttl(ttl).await?;

    let before = stored_expiry(&server, &a_driver, held.entry_key()).await?;
    let stepped = Instant::now();
    server.step_clock(ClockStep::Forward(step)).await?;
    no_second_holder(&b, lock, &held).await?;
    ensure!(held.is_valid());
    // The next renewal counts from the stepped clock: the lease is whole again.
    ensure!(
        renewed_since(&held, ttl, stepped).await?,
        "lost after a {step:?} step: {:?}",
        held.status()
    );
    let after = stored_expiry(&server, &a_driver, held.entry_key()).await?;
    ensure!(after >= before + micros(step), "expiry {before} → {after}");
    no_second_holder(&b, lock, &held).await?;
    held.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backward_clock_step_lets_an_idle_names_token_go_back_as_documented() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = fake_clock_server().await?;
    let driver = RedisDriver::connect(&server.url()).await?;
    let locks = Locks::new(driver.clone());
    let lock = "clock/back-idle";

    let first = locks.lock(lock).mode(EX).await?;
    let t1 = first.fencing_token();
    first.release().await?;
    // Idle: nothing is left that remembers t1 …
    let key = driver.queue_key(&name(lock));
    ensure!(server.command(&["EXISTS", &key]).await? == RespValue::Integer(0));
    // … so after the clock steps back, the next grant's token comes from the earlier clock.
    server
        .step_clock(ClockStep::Back(Duration::from_secs(100)))
        .await?;
    let second = locks.lock(lock).mode(EX).await?;
    let t2 = second.fencing_token();
    ensure!(
        t2 < t1,
        "token {t2} after {t1}: expected the documented break (a token lower than an earlier one)"
    );
    second.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backward_clock_step_while_held_keeps_exclusion_and_tokens() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = fake_clock_server().await?;
    let driver = RedisDriver::connect(&server.url()).await?;
    let a = Locks::new(driver.clone());
    let b = Locks::new(RedisDriver::connect(&server.url()).await?);
    let lock = "clock/back-held";
    let ttl = Duration::from_secs(3);
    let held = a.lock(lock).mode(EX).ttl(ttl).await?;
    let t1 = held.fencing_token();

    let stepped = Instant::now();
    server
        .step_clock(ClockStep::Back(Duration::from_secs(100)))
        .await?;
    no_second_holder(&b, lock, &held).await?;
    ensure!(
        renewed_since(&held, ttl, stepped).await?,
        "{:?}",
        held.status()
    );
    no_second_holder(&b, lock, &held).await?;
    held.release().await?;
    // The queue is empty but its counters are ahead of the stepped-back clock: the hash keeps them
    // (until the clock passes them) instead of being deleted …
    let key = driver.queue_key(&name(lock));
    ensure!(server.command(&["EXISTS", &key]).await? == RespValue::Integer(1));
    // … so the next token is still above every earlier one.
    let next = b.lock(lock).mode(EX).ttl(ttl).await?;
    ensure!(
        next.fencing_token() > t1,
        "{} after {t1}",
        next.fencing_token()
    );
    next.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backward_clock_step_stretches_a_crashed_holders_lease_as_documented() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = fake_clock_server().await?;
    let driver = RedisDriver::connect(&server.url()).await?;
    let lock = "clock/back-crashed";
    let ttl = Duration::from_millis(500);
    let step = Duration::from_secs(100);
    // A holder that never renews, as after kill -9.
    let crashed = key(lock, "crashed-1");
    granted(driver.enqueue(&request(&crashed, EX, ttl)).await?.queued)?;
    server.step_clock(ClockStep::Back(step)).await?;
    // By the server's clock the lease now ends a whole step later than it would have: the next
    // waiter is granted after TTL + step, not TTL + ε (Liveness A is stretched by the step).
    let left = stored_expiry(&server, &driver, &crashed).await? - server.time_micros().await?;
    ensure!(left > micros(step), "{left} µs of the lease left");
    let waiter = key(lock, "waiter-1");
    ensure!(
        driver
            .enqueue(&request(&waiter, EX, LONG_TTL))
            .await?
            .queued
            == Queued::Waiting
    );
    // Stepping the clock forward again (here: back to real time) ends the stretched lease at once.
    server.step_clock(ClockStep::Forward(step)).await?;
    let g = within("waiter after the clock came back", driver.wait(&waiter)).await??;
    ensure!(g.mode == EX);
    driver.release(&waiter).await?;
    Ok(())
}
