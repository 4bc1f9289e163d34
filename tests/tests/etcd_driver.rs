//! etcd driver specifics, on real servers: losing the leader or a member while locks are held and
//! waited on, no herd on release (counted by etcd itself), one lease per TTL, TLS, authentication,
//! the fenced transaction helper, foreign keys, and no keys left behind.
//!
//! Waits for conditions are bounded loops or signals; the only timeouts are hang guards far above what
//! any step needs, never assertions about how fast something happened.

use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use dlock::lease::drift_margin;
use dlock::{Capabilities, Error, Guard, LeaseState, LockMode, Locks};
use dlock_etcd::etcd_client::{GetOptions, Txn, TxnOp};
use dlock_etcd::{EtcdDriver, Fence};
use dlock_tests::harness::etcd::EtcdSecurity;
use dlock_tests::harness::net::http_get;
use dlock_tests::harness::{
    self, Backend, EtcdCluster, EtcdMember, EtcdServer, EtcdVersion, TcpProxy,
};
use dlock_tests::history::{self, Workload};
use dlock_tests::suite::etcd::url_of;
use dlock_tests::suite::eventually;
use dlock_tests::suite::lost_replies::{LostReplies, ReplyFaults};
use dlock_tests::suite::{Factory, Link, ProxyLink, StoreFaults};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

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

async fn queue_len(locks: &Locks, name: &str) -> Result<usize> {
    Ok(locks.inspect(name).await?.len())
}

fn url_for_ports(ports: impl IntoIterator<Item = u16>) -> String {
    let hosts: Vec<String> = ports
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    format!("etcd://{}", hosts.join(","))
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `grpc_server_started_total` for an etcd KV/Watch/Lease method, from the member's `/metrics`.
async fn rpcs_started(member: &EtcdMember, method: &str) -> Result<u64> {
    let body = http_get(member.client_addr(), "/metrics").await?.ok()?.body;
    let wanted = format!("grpc_method=\"{method}\"");
    let mut total = 0;
    for line in body.lines().filter(|l| {
        l.starts_with("grpc_server_started_total{")
            && l.contains(&wanted)
            && l.contains("grpc_service=\"etcdserverpb.")
    }) {
        let value = line.rsplit(' ').next().context("metric value")?;
        total += value.parse::<f64>().with_context(|| line.to_owned())? as u64;
    }
    Ok(total)
}

/// A counter from the member's `/metrics`.
async fn counter(member: &EtcdMember, name: &str) -> Result<u64> {
    let body = http_get(member.client_addr(), "/metrics").await?.ok()?.body;
    let line = body
        .lines()
        .find(|l| l.split(' ').next() == Some(name))
        .with_context(|| format!("no metric {name}"))?;
    Ok(line.rsplit(' ').next().context("value")?.parse::<f64>()? as u64)
}

/// Every key under `prefix` in the store, read with a raw client.
async fn keys_under(driver: &EtcdDriver, prefix: &str) -> Result<Vec<String>> {
    let resp = driver
        .client()
        .await?
        .kv_client()
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Member and leader loss

/// A history factory over a cluster whose leader the test kills: clients reach every member through
/// their own proxies (cuttable), and `started` fires once the last history client exists.
struct KillFactory<'a> {
    cluster: &'a EtcdCluster,
    capabilities: Capabilities,
    clients: usize,
    created: AtomicUsize,
    started: Notify,
}

impl Factory for KillFactory<'_> {
    async fn client(&self) -> Result<Locks> {
        Ok(dlock::connect(&url_of(self.cluster)).await?)
    }

    async fn partitionable_client(&self) -> Result<(Locks, Box<dyn Link>)> {
        let mut proxies = Vec::new();
        for member in self.cluster.members() {
            proxies.push(TcpProxy::start(member.client_addr()).await?);
        }
        let locks = dlock::connect(&url_for_ports(proxies.iter().map(TcpProxy::port))).await?;
        if self.created.fetch_add(1, Ordering::SeqCst) + 1 == self.clients {
            self.started.notify_one();
        }
        Ok((locks, Box::new(ProxyLink(proxies))))
    }

    fn url(&self) -> Option<String> {
        Some(url_of(self.cluster))
    }

    fn faults(&self) -> Option<&dyn StoreFaults> {
        // The fault here is the leader kill; the history adds link cuts on top.
        None
    }

    fn short_ttl(&self) -> Duration {
        self.capabilities.min_ttl.max(Duration::from_secs(2))
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }
}

/// Waits until a renewal sent after `after` is confirmed, or the lease is lost; returns the state.
async fn renewed_after(guard: &dlock::Guard, after: Instant, ttl: Duration) -> Result<LeaseState> {
    let mut status = guard.watch();
    let seen = within(
        "a renewal sent after the fault is confirmed (or the lock is lost)",
        status.wait_for(|s| {
            s.state == LeaseState::Lost || s.valid_until > after + ttl - drift_margin(ttl)
        }),
    )
    .await??;
    Ok(seen.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_keeps_holders_grants_waiters_and_history_stays_linearizable(
) -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let cluster = EtcdCluster::start(EtcdVersion::V3_5).await?;
    let url = url_of(&cluster);
    let (holders, waiters, observer) = (
        dlock::connect(&url).await?,
        dlock::connect(&url).await?,
        dlock::connect(&url).await?,
    );
    let ttl = Duration::from_secs(4);
    let held_ex = holders.lock("kill/ex").ttl(ttl).await?;
    let held_pr = holders.lock("kill/pr").mode(PR).ttl(ttl).await?;
    let waiting_ex = tokio::spawn(waiters.lock("kill/ex").ttl(ttl).into_future());
    let waiting_pw = tokio::spawn(waiters.lock("kill/pr").mode(PW).ttl(ttl).into_future());
    eventually("both waiters are queued", || async {
        Ok(queue_len(&observer, "kill/ex").await? == 2
            && queue_len(&observer, "kill/pr").await? == 2)
    })
    .await?;

    let workload = Workload {
        clients: 4,
        ops_per_client: 250,
        names: 3,
        faults: 8,
        ..Workload::default()
    };
    let factory = KillFactory {
        cluster: &cluster,
        capabilities: observer.capabilities().clone(),
        clients: workload.clients,
        created: AtomicUsize::new(0),
        started: Notify::new(),
    };
    let kill = async {
        // The history's clients exist and are about to run: kill the leader under them.
        factory.started.notified().await;
        let killed_at = Instant::now();
        let leader = cluster.kill_leader().await?;
        anyhow::Ok((leader, killed_at))
    };
    let (report, killed) = tokio::join!(history::run(&factory, workload), kill);
    let (leader, killed_at) = killed?;
    let report = report?;
    println!(
        "killed member {leader}; the history went on for {:?} after the kill; {report}",
        killed_at.elapsed()
    );
    println!("{}", report.check()?);
    ensure!(
        cluster.leader_index().await? != leader,
        "a new leader was elected"
    );

    // Holders keep their locks through the failover, or learn they lost them.
    for guard in [&held_ex, &held_pr] {
        let state = renewed_after(guard, killed_at, ttl).await?;
        ensure!(
            matches!(state, LeaseState::Held | LeaseState::Lost),
            "{state:?}"
        );
        if state == LeaseState::Held {
            let queue = observer.inspect(guard.name().as_str()).await?;
            ensure!(
                queue[0].owner == guard.entry_key().owner && queue[0].granted && !queue[1].granted,
                "a held lock must stay held and its waiter waiting: {queue:?}"
            );
        }
    }
    ensure!(!waiting_ex.is_finished() || held_ex.status().state == LeaseState::Lost);
    // Waiters are granted once the holders leave.
    let _ = held_ex.release().await;
    let _ = held_pr.release().await;
    within("the EX waiter is granted", waiting_ex)
        .await???
        .release()
        .await?;
    within("the PW waiter is granted", waiting_pw)
        .await???
        .release()
        .await?;
    // And the surviving majority serves new locks.
    holders
        .lock("kill/after")
        .try_acquire()
        .await?
        .release()
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_member_a_client_talks_to_keeps_the_client_working() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let cluster = EtcdCluster::start(EtcdVersion::V3_4).await?;
    let follower = cluster.follower_index().await?;
    // The driver talks to the first member listed: put the doomed follower first.
    let mut ports = vec![cluster.member(follower).client_port()];
    ports.extend(
        (0..cluster.len())
            .filter(|&i| i != follower)
            .map(|i| cluster.member(i).client_port()),
    );
    let locks = dlock::connect(&url_for_ports(ports)).await?;
    let other = dlock::connect(&url_of(&cluster)).await?;
    let ttl = Duration::from_secs(3);
    let mut held = locks.lock("member/held").mode(PR).ttl(ttl).await?;
    let waiter = tokio::spawn(other.lock("member/held").mode(EX).ttl(ttl).into_future());
    eventually("the waiter is queued", || async {
        Ok(queue_len(&other, "member/held").await? == 2)
    })
    .await?;

    let killed_at = Instant::now();
    cluster.kill_member(follower)?;
    // Renewals go on through the other members: the lock is not lost.
    let state = renewed_after(&held, killed_at, ttl).await?;
    ensure!(
        state == LeaseState::Held,
        "the holder lost its lock when one follower died"
    );
    // Every operation works through the survivors.
    let extra = locks.lock("member/extra").ttl(ttl).try_acquire().await?;
    held.convert(CR).await?;
    ensure!(held.mode() == CR);
    let err = locks.lock("member/extra").try_acquire().await.err();
    ensure!(err.as_ref().is_some_and(Error::is_would_block), "{err:?}");
    extra.release().await?;
    ensure!(!waiter.is_finished(), "EX granted beside a held CR");
    held.release().await?;
    within("the waiter is granted after the release", waiter)
        .await???
        .release()
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// No herd, one lease per TTL

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_one_waiter_not_all() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    const WAITERS: usize = 10;
    let server = EtcdServer::start(EtcdVersion::V3_5).await?;
    let url = url_of(server.as_cluster());
    let (holder, waiters) = (dlock::connect(&url).await?, dlock::connect(&url).await?);
    let held = holder.lock("herd").ttl(LONG_TTL).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    for i in 0..WAITERS {
        let (locks, tx) = (waiters.clone(), tx.clone());
        tokio::spawn(async move {
            let guard = locks.lock("herd").ttl(LONG_TTL).await;
            let _ = tx.send((i, guard));
        });
        eventually("the next waiter is queued", || async {
            Ok(queue_len(&holder, "herd").await? == i + 2)
        })
        .await?;
    }
    let member = server.member();
    let (ranges_before, watches_before) = (
        rpcs_started(member, "Range").await?,
        rpcs_started(member, "Watch").await?,
    );
    held.release().await?;
    for expected in 0..WAITERS {
        let (i, guard) = within("the next waiter is granted", rx.recv())
            .await?
            .context("waiter tasks ended early")?;
        ensure!(
            i == expected,
            "granted waiter {i}, expected {expected} (FIFO)"
        );
        guard?.release().await?;
    }
    // Every waiter has been granted and released: nothing is left to wake, so the counts are final.
    let ranges = rpcs_started(member, "Range").await? - ranges_before;
    let watches = rpcs_started(member, "Watch").await? - watches_before;
    println!(
        "{WAITERS} handoffs cost {ranges} range reads and {watches} new watches (a herd would read {} times)",
        WAITERS * (WAITERS + 1) / 2
    );
    // Each handoff wakes exactly the next waiter, which reads the queue once and grants itself.
    ensure!(
        ranges as usize <= WAITERS + 2,
        "{ranges} reads for {WAITERS} handoffs: releases woke more than the next waiter"
    );
    ensure!(
        watches == 0,
        "{watches} watches were re-created: waiters woke without being next"
    );
    Ok(())
}

/// On etcd 3.4 and 3.5 (the empty-prefix compare it relies on is the server's): an acquire on a
/// free name is one transaction, with no read and no keepalive of the lease a recent lock renewed.
async fn uncontended_acquire_costs_one_transaction(version: EtcdVersion) -> Result<()> {
    let server = EtcdServer::start(version).await?;
    let driver = EtcdDriver::connect(&url_of(server.as_cluster())).await?;
    let locks = Locks::new(driver);
    let ttl = Duration::from_secs(60);
    // The first lock with this TTL grants the client's lease.
    locks.lock("free/warm").ttl(ttl).await?.release().await?;
    let member = server.member();
    let txns = rpcs_started(member, "Txn").await?;
    let reads = rpcs_started(member, "Range").await?;
    let keepalives = counter(member, "etcd_debugging_lease_renewed_total").await?;
    let mut guards = Vec::new();
    for i in 0..5 {
        guards.push(locks.lock(format!("free/{i}")).ttl(ttl).await?);
    }
    let txns = rpcs_started(member, "Txn").await? - txns;
    let reads = rpcs_started(member, "Range").await? - reads;
    let keepalives = counter(member, "etcd_debugging_lease_renewed_total").await? - keepalives;
    ensure!(
        (txns, reads, keepalives) == (5, 0, 0),
        "5 acquires on free names cost {txns} transactions, {reads} reads, {keepalives} keepalives"
    );
    // A name with a holder is read in the same transaction and granted beside it.
    let beside = locks.lock("free/0").mode(LockMode::PR).try_acquire().await;
    ensure!(
        beside.unwrap_err().is_would_block(),
        "EX held: PR must wait"
    );
    for guard in guards {
        guard.release().await?;
    }
    let shared = [
        locks.lock("free/shared").mode(LockMode::PR).await?,
        locks.lock("free/shared").mode(LockMode::PR).await?,
    ];
    ensure!(shared.iter().all(Guard::is_valid));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncontended_acquire_is_one_transaction_on_etcd_3_4() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    uncontended_acquire_costs_one_transaction(EtcdVersion::V3_4).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncontended_acquire_is_one_transaction_on_etcd_3_5() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    uncontended_acquire_costs_one_transaction(EtcdVersion::V3_5).await
}

/// A lock whose acquire sent no keepalive (one went out recently) is valid from that keepalive on,
/// not from the acquire: the store drops the entry with the lease. Through a wrapper, which is how
/// the history suite's clients (and a user's instrumented driver) reach the store: wrappers once
/// had to forward this instant by hand, and the suite's did not (an EX was granted while a PR
/// holder still counted itself valid, on the 3-member cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_is_valid_no_longer_than_the_lease_it_shares_even_through_a_wrapper() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let server = EtcdServer::start(EtcdVersion::V3_5).await?;
    let driver = EtcdDriver::connect(&url_of(server.as_cluster())).await?;
    let locks = Locks::from_arc(Arc::new(LostReplies::new(
        driver.clone(),
        ReplyFaults::new(),
    )));
    // The acquire skips the keepalive within a sixth of the TTL of the last one, and the keeper
    // renews a third of the TTL on: the second acquire below lands between the two.
    let ttl = Duration::from_secs(6);
    let member = server.member();
    for attempt in 0..3 {
        let first = locks.lock(format!("kept/{attempt}/a")).ttl(ttl).await?;
        // The lease was granted or last renewed by now.
        let lease_renewed_by = Instant::now();
        let renewals = counter(member, "etcd_debugging_lease_renewed_total").await?;
        // Time passing is what this test is about: the lease ages while no keepalive is due.
        tokio::time::sleep(ttl / 20).await;
        let second = locks.lock(format!("kept/{attempt}/b")).ttl(ttl).await?;
        if counter(member, "etcd_debugging_lease_renewed_total").await? != renewals {
            // The machine stalled past the keepalive window: the lease was renewed, try again.
            continue;
        }
        let valid_until = second.status().valid_until;
        ensure!(
            valid_until <= lease_renewed_by + ttl,
            "the second lock counts itself valid {:?} past the end of the lease it shares",
            valid_until - (lease_renewed_by + ttl)
        );
        first.release().await?;
        second.release().await?;
        return Ok(());
    }
    Err(anyhow!(
        "every attempt saw a keepalive between the two acquires"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_with_one_ttl_share_one_lease_and_one_keepalive() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let server = EtcdServer::start(EtcdVersion::V3_4).await?;
    let url = url_of(server.as_cluster());
    let driver = EtcdDriver::connect(&url).await?;
    let locks = Locks::new(driver.clone());
    let caps = locks.capabilities().clone();
    ensure!(
        caps.min_ttl == Duration::from_secs(2),
        "etcd's default minimum lease TTL is 2 s; the driver reports {:?}",
        caps.min_ttl
    );
    ensure!(!caps.per_request_ttl && caps.fencing_total_order && caps.shared_between_processes);
    let err = locks.lock("short").ttl(Duration::from_secs(1)).await.err();
    ensure!(
        matches!(err, Some(Error::InvalidTtl { .. })),
        "a TTL below etcd's minimum must be refused: {err:?}"
    );

    let (short, long) = (Duration::from_secs(2), Duration::from_secs(5));
    let mut guards = Vec::new();
    for i in 0..30 {
        guards.push(locks.lock(format!("many/{i}")).ttl(short).await?);
    }
    for i in 0..5 {
        guards.push(locks.lock(format!("long/{i}")).ttl(long).await?);
    }
    let leases = driver.client().await?.leases().await?;
    ensure!(
        leases.leases().len() == 2,
        "35 locks with two TTLs must use two leases, found {}",
        leases.leases().len()
    );
    let member = server.member();
    let renewed_before = counter(member, "etcd_debugging_lease_renewed_total").await?;
    let started = Instant::now();
    // Time passing is what this test measures, so it sleeps: three short TTLs.
    tokio::time::sleep(short * 3).await;
    let elapsed = started.elapsed();
    let renewed = counter(member, "etcd_debugging_lease_renewed_total").await? - renewed_before;
    // Each lease is renewed at most once per sixth of its TTL (plus one in flight at each end);
    // renewing per lock would cost 30 times more.
    let bound = (elapsed.as_secs_f64() / (short.as_secs_f64() / 6.0)).ceil() as u64
        + (elapsed.as_secs_f64() / (long.as_secs_f64() / 6.0)).ceil() as u64
        + 4;
    println!("{renewed} keepalives in {elapsed:?} for 35 locks (bound {bound})");
    ensure!(
        renewed <= bound,
        "{renewed} keepalives in {elapsed:?}: renewal cost grows with the locks held"
    );
    for guard in &guards {
        ensure!(guard.is_valid(), "{:?}", guard.status());
    }
    for guard in guards {
        guard.release().await?;
    }
    Ok(())
}

/// Why a waiter's token is its grant's revision and not its create revision: a later holder that
/// converts up past a waiting entry holds a newer token than the waiter's create revision, and the
/// waiter is granted after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_increase_when_a_later_holder_converts_up_past_a_waiter() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let server = EtcdServer::start(EtcdVersion::V3_4).await?;
    let url = url_of(server.as_cluster());
    let (a, b, c) = (
        dlock::connect(&url).await?,
        dlock::connect(&url).await?,
        dlock::connect(&url).await?,
    );
    let reader = a.lock("t").mode(PR).ttl(LONG_TTL).await?;
    let writer = tokio::spawn(b.lock("t").mode(PW).ttl(LONG_TTL).into_future());
    eventually("the PW waiter is queued", || async {
        Ok(queue_len(&a, "t").await? == 2)
    })
    .await?;
    // NL is granted beside anything, then asks for EX: it waits for the PR holder only, not for
    // the waiting PW (conversions need only the other *granted* entries to be compatible).
    let mut late = c.lock("t").mode(NL).ttl(LONG_TTL).try_acquire().await?;
    let converting = tokio::spawn(async move {
        late.convert(EX).await?;
        anyhow::Ok(late)
    });
    eventually("the EX conversion is pending", || async {
        Ok(a.inspect("t")
            .await?
            .iter()
            .any(|e| e.converting_to == Some(EX)))
    })
    .await?;
    let writer_seq = a.inspect("t").await?[1].seq;
    reader.release().await?;
    let late = within("the conversion is granted", converting).await???;
    ensure!(late.mode() == EX && late.fencing_token() > writer_seq);
    ensure!(!writer.is_finished(), "PW granted beside EX");
    let late_token = late.fencing_token();
    late.release().await?;
    let writer = within("the PW waiter is granted", writer).await???;
    ensure!(
        writer.fencing_token() > late_token,
        "token {} after the EX holder's {late_token} (the waiter's create revision is {writer_seq})",
        writer.fencing_token()
    );
    writer.release().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// TLS and authentication

async fn lock_and_handoff(url: &str) -> Result<()> {
    let (a, b) = (dlock::connect(url).await?, dlock::connect(url).await?);
    let held = a.lock("secure").ttl(LONG_TTL).await?;
    let waiter = tokio::spawn(b.lock("secure").ttl(LONG_TTL).into_future());
    eventually("the waiter is queued", || async {
        Ok(queue_len(&a, "secure").await? == 2)
    })
    .await?;
    let token = held.fencing_token();
    held.release().await?;
    let next = within("the waiter is granted", waiter).await???;
    ensure!(next.fencing_token() > token);
    next.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_client_certificates() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let security = EtcdSecurity {
        tls: true,
        client_cert_auth: true,
        auth: None,
    };
    let server = EtcdServer::start_secured(EtcdVersion::V3_5, &security).await?;
    let files = server.tls().context("TLS files")?;
    let port = server.member().tls_port().context("TLS port")?;
    let ca = enc(&files.ca_cert.display().to_string());
    let (cert, key) = (
        enc(&files.client_cert.display().to_string()),
        enc(&files.client_key.display().to_string()),
    );
    let url = format!("etcds://127.0.0.1:{port}?tls_ca={ca}&tls_cert={cert}&tls_key={key}");
    lock_and_handoff(&url).await?;

    let refused = |what: &'static str, url: String| async move {
        let err = dlock::connect(&url)
            .await
            .err()
            .with_context(|| format!("{what}: connected"))?;
        println!("{what}: {err}");
        ensure!(
            matches!(err, Error::Connect { .. }),
            "{what}: expected a connect error, got {err:?}"
        );
        anyhow::Ok(())
    };
    refused(
        "no client certificate",
        format!("etcds://127.0.0.1:{port}?tls_ca={ca}&timeout_ms=2000"),
    )
    .await?;
    refused(
        "the server's CA is not trusted",
        format!("etcds://127.0.0.1:{port}?tls_cert={cert}&tls_key={key}&timeout_ms=2000"),
    )
    .await?;
    refused(
        "plain TCP to the TLS port",
        format!("etcd://127.0.0.1:{port}?timeout_ms=2000"),
    )
    .await?;
    let err = dlock::connect(&format!(
        "etcds://127.0.0.1:{port}?tls_ca=/nonexistent/ca.pem"
    ))
    .await
    .err();
    ensure!(
        matches!(&err, Some(Error::InvalidUrl { reason, .. }) if reason.contains("cannot read the tls_ca file")),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_with_user_and_password() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let security = EtcdSecurity {
        auth: Some(("locker".into(), "s3cret:@%".into())),
        ..EtcdSecurity::default()
    };
    let server = EtcdServer::start_secured(EtcdVersion::V3_4, &security).await?;
    let port = server.port();
    // `:`, `@` and `%` in the password are percent-encoded in the URL.
    lock_and_handoff(&format!("etcd://locker:s3cret%3A%40%25@127.0.0.1:{port}")).await?;

    let message = |url: String| async move {
        let err = dlock::connect(&url).await.err().context("connected")?;
        anyhow::Ok(err.to_string())
    };
    let wrong = message(format!("etcd://locker:wrong-pw@127.0.0.1:{port}")).await?;
    println!("wrong password: {wrong}");
    ensure!(wrong.contains("authentication failed"), "{wrong}");
    ensure!(!wrong.contains("wrong-pw"), "the password leaked: {wrong}");
    let unknown = message(format!("etcd://nobody:x@127.0.0.1:{port}")).await?;
    ensure!(unknown.contains("authentication failed"), "{unknown}");
    let anonymous = message(format!("etcd://127.0.0.1:{port}")).await?;
    println!("no credentials: {anonymous}");
    ensure!(
        anonymous.contains("authentication failed") && anonymous.contains("USER:PASSWORD"),
        "{anonymous}"
    );
    // The user may only touch keys under `dlock/`.
    let denied = message(format!(
        "etcd://locker:s3cret%3A%40%25@127.0.0.1:{port}?prefix=elsewhere"
    ))
    .await?;
    ensure!(denied.contains("permission denied"), "{denied}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Fenced writes, foreign keys, no leftovers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_txn_writes_while_held_and_refuses_once_the_lock_is_lost() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let server = EtcdServer::start(EtcdVersion::V3_4).await?;
    let proxy = TcpProxy::start(server.addr()).await?;
    let driver = EtcdDriver::connect(&url_for_ports([proxy.port()])).await?;
    let locks = Locks::new(driver.clone());
    let direct = EtcdDriver::connect(&url_of(server.as_cluster())).await?;
    let other = Locks::new(direct.clone());
    let value = |d: EtcdDriver| async move {
        let resp = d.client().await?.kv_client().get("app/stock", None).await?;
        anyhow::Ok(
            resp.kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
        )
    };

    let ttl = Duration::from_secs(2);
    let guard = locks.lock("stock").ttl(ttl).await?;
    let fence = driver.fence(guard.entry_key())?;
    ensure!(fence.mode() == EX && fence.name() == guard.name());
    driver
        .fenced_txn(&fence, [TxnOp::put("app/stock", "41", None)])
        .await?;
    ensure!(value(direct.clone()).await?.as_deref() == Some("41"));

    // Cut off, the holder loses the lock and another client takes it (so etcd dropped the entry).
    proxy.set_blackhole(true);
    within("the cut-off holder sees lost()", guard.lost()).await?;
    let next = within(
        "another client takes the lock",
        other.lock("stock").ttl(LONG_TTL),
    )
    .await??;
    proxy.set_blackhole(false);
    let err = driver
        .fenced_txn(&fence, [TxnOp::put("app/stock", "40", None)])
        .await
        .err();
    ensure!(
        err.as_ref().is_some_and(Error::is_lost),
        "a write fenced by a lost lock must be refused: {err:?}"
    );
    ensure!(
        value(direct.clone()).await?.as_deref() == Some("41"),
        "the refused write must not apply"
    );
    // The new holder writes under its own fence.
    let next_fence = direct.fence(next.entry_key())?;
    direct
        .fenced_txn(&next_fence, [TxnOp::put("app/stock", "39", None)])
        .await?;
    ensure!(value(direct.clone()).await?.as_deref() == Some("39"));

    // After a release the fence refuses too.
    let key = next.entry_key().clone();
    next.release().await?;
    let err = direct
        .fenced_txn(&next_fence, [TxnOp::put("app/stock", "0", None)])
        .await
        .err();
    ensure!(err.as_ref().is_some_and(Error::is_lost), "{err:?}");
    ensure!(direct.fence(&key).is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_keys_under_the_prefix_are_ignored() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let server = EtcdServer::start(EtcdVersion::V3_5).await?;
    let driver = EtcdDriver::connect(&url_of(server.as_cluster())).await?;
    let mut kv = driver.client().await?.kv_client();
    // A value this driver never writes, an entry without a lease (it would never go away), a
    // deeper path, and an invalid owner id — all under the range of the lock "x".
    kv.put("dlock/x/intruder-1", "garbage", None).await?;
    kv.put("dlock/x/intruder-2", "EX!", None).await?;
    kv.put("dlock/x/a/b", "EX", None).await?;
    kv.put("dlock/x/bad owner", "EX", None).await?;
    let locks = Locks::new(driver.clone());
    ensure!(locks.inspect("x").await?.is_empty());
    let guard = locks.lock("x").try_acquire().await?;
    ensure!(locks.inspect("x").await?.len() == 1);
    guard.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_locks_leave_no_keys() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let server = EtcdServer::start(EtcdVersion::V3_5).await?;
    let url = url_of(server.as_cluster());
    let driver = EtcdDriver::connect(&url).await?;
    let (a, b) = (Locks::new(driver.clone()), dlock::connect(&url).await?);
    for mode in LockMode::ALL {
        a.lock(format!("idle/{mode}"))
            .mode(mode)
            .ttl(LONG_TTL)
            .await?
            .release()
            .await?;
    }
    let mut held = a.lock("idle/busy").mode(PR).ttl(LONG_TTL).await?;
    held.convert(EX).await?;
    held.convert(CR).await?;
    let err = b.lock("idle/busy").try_acquire().await.err();
    ensure!(err.as_ref().is_some_and(Error::is_would_block), "{err:?}");
    let err = b
        .lock("idle/busy")
        .ttl(LONG_TTL)
        .timeout(Duration::from_millis(100))
        .await
        .err();
    ensure!(err.as_ref().is_some_and(Error::is_timeout), "{err:?}");
    let cancelled = tokio::spawn(b.lock("idle/busy").ttl(LONG_TTL).into_future());
    eventually("the doomed waiter is queued", || async {
        Ok(queue_len(&a, "idle/busy").await? == 2)
    })
    .await?;
    cancelled.abort();
    let waiter = tokio::spawn(b.lock("idle/busy").ttl(LONG_TTL).into_future());
    eventually("the waiter is queued", || async {
        Ok(queue_len(&a, "idle/busy").await? == 2)
    })
    .await?;
    drop(held);
    drop(within("the waiter is granted", waiter).await???);
    // Dropped guards release in the background; the leases (600 s) cannot be what removes keys.
    eventually("no key is left under the prefix", || async {
        Ok(keys_under(&driver, "dlock/").await?.is_empty())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn bad_urls_are_refused_with_the_reason() -> Result<()> {
    for (url, says) in [
        ("etcd://", "no host"),
        ("etcd://127.0.0.1:70000", "invalid port"),
        ("etcd://127.0.0.1:2379?tls_ca=/x", "etcds://"),
        (
            "etcds://127.0.0.1:2379?tls_key=/k",
            "both tls_cert and tls_key",
        ),
        ("etcd://127.0.0.1:2379?wat=1", "unknown query parameter"),
        ("etcd://user@127.0.0.1:2379", "USER:PASSWORD"),
    ] {
        let err = dlock::connect(url).await.err();
        ensure!(
            matches!(&err, Some(Error::InvalidUrl { reason, .. }) if reason.contains(says)),
            "{url}: {err:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Orphaned entries: no lease other locks renew may keep an entry alive past its own guard

/// A TTL at etcd's minimum, so each case waits as little as the store allows.
fn orphan_ttl(locks: &Locks) -> Duration {
    locks.capabilities().min_ttl.max(Duration::from_secs(2))
}

/// Awaits a waiter that must be granted once an orphaned entry ahead of it ends: within 2×TTL of
/// the orphan's last renewal (which is no later than `orphaned_at`). This bound is the guarantee
/// under test, not a hang guard.
async fn granted_within_two_ttls(
    waiter: tokio::task::JoinHandle<dlock::Result<dlock::Guard>>,
    orphaned_at: Instant,
    ttl: Duration,
) -> Result<dlock::Guard> {
    let guard = tokio::time::timeout_at(orphaned_at + 2 * ttl, waiter)
        .await
        .map_err(|_| {
            anyhow!(
                "the orphaned entry still blocks its lock {:?} after it was orphaned (TTL {ttl:?})",
                orphaned_at.elapsed()
            )
        })???;
    println!(
        "the orphan's lock was granted to the next waiter {:?} after it was orphaned (TTL {ttl:?})",
        orphaned_at.elapsed()
    );
    Ok(guard)
}

/// The client's other lock on the same lease is still held, valid, and first in its queue.
async fn still_held(locks: &Locks, guard: &dlock::Guard) -> Result<()> {
    ensure!(
        guard.is_valid() && guard.status().state == LeaseState::Held,
        "the client's other lock must stay held: {:?}",
        guard.status()
    );
    let queue = locks.inspect(guard.name().as_str()).await?;
    ensure!(
        queue
            .first()
            .is_some_and(|e| e.owner == guard.entry_key().owner && e.granted),
        "the client's other lock lost its entry: {queue:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_dropped_outside_a_runtime_frees_its_lock_while_the_client_renews_others(
) -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let server = EtcdServer::start(EtcdVersion::V3_5).await?;
    let url = url_of(server.as_cluster());
    let (locks, other) = (dlock::connect(&url).await?, dlock::connect(&url).await?);
    let ttl = orphan_ttl(&locks);
    // Same client, same TTL: both entries are on one lease, which `kept`'s keeper renews.
    let kept = locks.lock("orphan/kept").ttl(ttl).await?;
    let orphan = locks.lock("orphan/dropped").ttl(ttl).await?;
    let waiter = tokio::spawn(other.lock("orphan/dropped").ttl(LONG_TTL).into_future());
    eventually("the waiter is queued behind the doomed guard", || async {
        Ok(queue_len(&other, "orphan/dropped").await? == 2)
    })
    .await?;

    // Dropped on a plain thread, the guard's Drop finds no runtime to release on.
    let orphaned_at = Instant::now();
    std::thread::spawn(move || drop(orphan))
        .join()
        .map_err(|_| anyhow!("the thread dropping the guard panicked"))?;
    let next = granted_within_two_ttls(waiter, orphaned_at, ttl).await?;
    still_held(&locks, &kept).await?;
    next.release().await?;
    kept.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_whose_runtime_shut_down_free_their_locks_while_the_client_renews_others(
) -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let server = EtcdServer::start(EtcdVersion::V3_5).await?;
    let url = url_of(server.as_cluster());
    // One driver, connected on the test's runtime, serves a client on a second runtime too.
    let driver = EtcdDriver::connect(&url).await?;
    let locks = Locks::new(driver.clone());
    let other = dlock::connect(&url).await?;
    let ttl = orphan_ttl(&locks);

    // The second runtime takes two locks first, so the shared lease starts out there: one on the
    // shared driver, one on a client of its own that goes away with that runtime. Each guard is
    // parked in a task, and the runtime is shut down under them.
    let (granted_tx, granted_rx) = tokio::sync::oneshot::channel();
    let (shut_tx, shut_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn({
        let (locks, url) = (locks.clone(), url.clone());
        move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let own = dlock::connect(&url).await?;
                for guard in [
                    locks.lock("rt/shared-driver").ttl(ttl).await?,
                    own.lock("rt/own-client").ttl(ttl).await?,
                ] {
                    tokio::spawn(async move {
                        let _parked = guard;
                        std::future::pending::<()>().await
                    });
                }
                anyhow::Ok(())
            })?;
            let _ = granted_tx.send(());
            shut_rx.recv()?;
            drop(runtime);
            Ok(())
        }
    });
    within("the second runtime holds its locks", granted_rx).await??;
    let kept = locks.lock("rt/kept").ttl(ttl).await?;
    let mut waiters = Vec::new();
    for name in ["rt/shared-driver", "rt/own-client"] {
        waiters.push(tokio::spawn(other.lock(name).ttl(LONG_TTL).into_future()));
        eventually("the waiter is queued", || async {
            Ok(queue_len(&other, name).await? == 2)
        })
        .await?;
    }

    let orphaned_at = Instant::now();
    shut_tx.send(())?;
    tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| anyhow!("the second runtime's thread panicked"))??;
    for waiter in waiters {
        granted_within_two_ttls(waiter, orphaned_at, ttl)
            .await?
            .release()
            .await?;
    }
    still_held(&locks, &kept).await?;
    kept.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_taken_in_ex_refuses_writes_once_the_lock_is_converted_down() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let server = EtcdServer::start(EtcdVersion::V3_4).await?;
    let url = url_of(server.as_cluster());
    let driver = EtcdDriver::connect(&url).await?;
    let locks = Locks::new(driver.clone());
    let direct = EtcdDriver::connect(&url).await?;
    let other = Locks::new(direct.clone());
    let value = || async {
        let resp = direct
            .client()
            .await?
            .kv_client()
            .get("app/ledger", None)
            .await?;
        anyhow::Ok(
            resp.kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
        )
    };
    // The fence's compares in a transaction of one's own, sent once.
    let own_txn = |fence: &Fence, value: &'static str| {
        let (driver, compares) = (driver.clone(), fence.compares());
        async move {
            let txn = Txn::new()
                .when(compares)
                .and_then([TxnOp::put("app/ledger", value, None)]);
            anyhow::Ok(
                driver
                    .client()
                    .await?
                    .kv_client()
                    .txn(txn)
                    .await?
                    .succeeded(),
            )
        }
    };

    let mut guard = locks.lock("ledger").mode(EX).ttl(LONG_TTL).await?;
    let fence = driver.fence(guard.entry_key())?;
    ensure!(fence.mode() == EX);
    driver
        .fenced_txn(&fence, [TxnOp::put("app/ledger", "1", None)])
        .await?;
    ensure!(value().await?.as_deref() == Some("1"));
    ensure!(
        own_txn(&fence, "2").await?,
        "a transaction of one's own fenced by a held EX lock must apply"
    );

    guard.convert(NL).await?;
    let next = within(
        "another client takes EX",
        other.lock("ledger").mode(EX).ttl(LONG_TTL),
    )
    .await??;
    let next_fence = direct.fence(next.entry_key())?;
    direct
        .fenced_txn(&next_fence, [TxnOp::put("app/ledger", "3", None)])
        .await?;
    let err = driver
        .fenced_txn(&fence, [TxnOp::put("app/ledger", "4", None)])
        .await
        .err();
    ensure!(
        err.as_ref().is_some_and(Error::is_lost),
        "a write fenced by the EX grant must be refused once the lock is NL and another client holds EX: {err:?}"
    );
    ensure!(
        !own_txn(&fence, "5").await?,
        "a transaction of one's own fenced by the EX grant applied beside another client's EX"
    );
    ensure!(
        value().await?.as_deref() == Some("3"),
        "the refused writes must not apply"
    );
    // A fence taken now is for what the guard holds now.
    ensure!(driver.fence(guard.entry_key())?.mode() == NL);
    next.release().await?;

    // A pending conversion leaves a fence in force (the mode is still held); the conversion, once
    // granted, ends it (a completed conversion ends fences in either direction).
    guard.convert(PR).await?;
    let reader = other.lock("ledger").mode(PR).ttl(LONG_TTL).await?;
    let pr_fence = driver.fence(guard.entry_key())?;
    ensure!(pr_fence.mode() == PR);
    let converting = tokio::spawn(async move {
        guard.convert(EX).await?;
        anyhow::Ok(guard)
    });
    eventually("the EX conversion is pending", || async {
        Ok(other
            .inspect("ledger")
            .await?
            .iter()
            .any(|e| e.converting_to == Some(EX)))
    })
    .await?;
    driver
        .fenced_txn(&pr_fence, [TxnOp::put("app/ledger", "6", None)])
        .await?;
    reader.release().await?;
    let guard = within("the conversion is granted", converting).await???;
    let err = driver
        .fenced_txn(&pr_fence, [TxnOp::put("app/ledger", "7", None)])
        .await
        .err();
    ensure!(err.as_ref().is_some_and(Error::is_lost), "{err:?}");
    driver
        .fenced_txn(
            &driver.fence(guard.entry_key())?,
            [TxnOp::put("app/ledger", "8", None)],
        )
        .await?;
    ensure!(value().await?.as_deref() == Some("8"));
    guard.release().await?;
    Ok(())
}
