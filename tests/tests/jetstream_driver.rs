//! JetStream driver tests beyond the conformance suite: stream-leader failover under load, auth and
//! TLS, digest names, lease modes by server version, and delete-marker wake-ups.

use std::future::IntoFuture;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use dlock::{Error, LockMode, LockName, Locks};
use dlock_jetstream::{JetStreamDriver, LeaseMode};
use dlock_tests::harness::{self, Backend, NatsOptions, NatsServer, NatsVersion};
use dlock_tests::history::{self, Workload};
use dlock_tests::suite::eventually;
use dlock_tests::suite::{jetstream, within, Factory, Link, StoreFaults};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A hang guard for steps that should finish; never a speed assertion.
const HANG: Duration = Duration::from_secs(60);

async fn single(version: NatsVersion, options: &NatsOptions) -> Result<Option<NatsServer>> {
    if !harness::require(Backend::Nats) {
        return Ok(None);
    }
    Ok(Some(NatsServer::start_with(version, options).await?))
}

/// The cluster factory without store-wide pauses: the failover test kills a node itself, and a
/// pause of every node would stall the leader probes that watch the election.
struct LinkFaultsOnly<'a>(&'a jetstream::JetStreamFactory);

impl Factory for LinkFaultsOnly<'_> {
    async fn client(&self) -> Result<Locks> {
        self.0.client().await
    }
    async fn partitionable_client(&self) -> Result<(Locks, Box<dyn Link>)> {
        self.0.partitionable_client().await
    }
    fn url(&self) -> Option<String> {
        self.0.url()
    }
    fn faults(&self) -> Option<&dyn StoreFaults> {
        None
    }
    fn short_ttl(&self) -> Duration {
        self.0.short_ttl()
    }
    fn capabilities(&self) -> dlock::Capabilities {
        self.0.capabilities()
    }
}

/// Kills the leader of the R3 lock stream while locks are held and waited on and while a random
/// history runs: after the re-election operations go on, holders keep their locks or see `lost()`,
/// and the history checker finds no overlap of incompatible holders and no fencing inversion.
async fn leader_failover(version: NatsVersion) -> Result<()> {
    let setup = match version {
        NatsVersion::V2_9 => jetstream::setup_cluster_2_9().await?,
        NatsVersion::V2_11Plus => jetstream::setup_cluster_2_11().await?,
    };
    let Some(factory) = setup else {
        return Ok(());
    };
    let cluster = factory.cluster().context("a cluster topology")?;
    let url = factory.url().context("url")?;
    let (a, b) = (dlock::connect(&url).await?, dlock::connect(&url).await?);
    // Long enough to ride out most elections; a holder that still loses must see lost().
    let ttl = Duration::from_secs(10);
    let holder = a.lock("failover").mode(LockMode::EX).ttl(ttl).await?;
    let waiter = tokio::spawn(b.lock("failover").ttl(ttl).into_future());
    let links_only = LinkFaultsOnly(&factory);
    let history = history::run(
        &links_only,
        Workload {
            clients: 4,
            ops_per_client: 150,
            names: 2,
            faults: 6,
            ..Workload::default()
        },
    );
    let failover = async {
        // Kill only once the history's clients are connected and working (they reach the cluster
        // through node 0, which may be the leader killed next): their entries show in the queues.
        eventually("the history's clients queue entries", || async {
            for name in ["h/0", "h/1"] {
                if !a.inspect(name).await?.is_empty() {
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .await?;
        let killed = cluster.kill_stream_leader("DLOCK").await?;
        let new_leader = cluster.wait_stream_leader_change("DLOCK", killed).await?;
        ensure!(new_leader != killed);
        cluster.restart_member(killed).await?;
        anyhow::Ok(killed)
    };
    let (report, killed) = tokio::join!(history, failover);
    let killed = killed?;
    let report = report?;
    println!("stream leader n{killed} killed; {report}");
    report.check()?;

    // The holder either kept its lock through the election or knows it lost it; either way the
    // waiter is granted, after the holder's validity, with a greater token.
    let held_until = holder.status().valid_until;
    let kept = holder.is_valid();
    let token = holder.fencing_token();
    if kept {
        holder.release().await?;
    } else {
        drop(holder);
    }
    // A waiter whose own lease ran out during the election fails with Lost; it asks again.
    let next = match within(HANG, "the waiter is granted after the failover", waiter).await?? {
        Err(Error::Lost { .. }) => {
            within(
                HANG,
                "a new request is granted",
                b.lock("failover").ttl(ttl),
            )
            .await??
        }
        other => other?,
    };
    ensure!(next.fencing_token() > token, "token went backwards");
    ensure!(
        kept || held_until <= tokio::time::Instant::now(),
        "granted while the lost holder was still valid"
    );
    next.release().await?;
    // And the store keeps working for new clients.
    let c = dlock::connect(&url).await?;
    c.lock("after").try_acquire().await?.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_2_9_stream_leader_failover_keeps_locks_safe() -> Result<()> {
    leader_failover(NatsVersion::V2_9).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_2_11_stream_leader_failover_keeps_locks_safe() -> Result<()> {
    leader_failover(NatsVersion::V2_11Plus).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_credentials_fail_with_an_authentication_error() -> Result<()> {
    let Some(server) = single(NatsVersion::V2_11Plus, &NatsOptions::user("app", "right")).await?
    else {
        return Ok(());
    };
    let port = server.port();
    for url in [
        format!("nats://app:wrong@127.0.0.1:{port}"),
        format!("nats://127.0.0.1:{port}"),
        format!("nats://some-token@127.0.0.1:{port}"),
    ] {
        let err = dlock::connect(&url)
            .await
            .err()
            .context("connecting with bad credentials must fail")?;
        let msg = err.to_string();
        ensure!(
            msg.contains("authentication failed"),
            "{url}: the error does not name authentication: {msg}"
        );
        ensure!(
            !msg.contains("wrong"),
            "the error leaks the password: {msg}"
        );
    }
    Ok(())
}

async fn lock_round_trip(url: &str) -> Result<()> {
    let locks = dlock::connect(url).await?;
    let guard = locks.lock("auth/ok").try_acquire().await?;
    ensure!(guard.fencing_token() > 0);
    guard.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_password_token_and_tls_connections_work() -> Result<()> {
    let Some(server) = single(NatsVersion::V2_11Plus, &NatsOptions::user("app", "p@ss:w")).await?
    else {
        return Ok(());
    };
    lock_round_trip(&format!(
        "nats://app:p%40ss%3Aw@127.0.0.1:{}",
        server.port()
    ))
    .await?;

    let server = NatsServer::start_with(NatsVersion::V2_9, &NatsOptions::token("s3cret")).await?;
    lock_round_trip(&format!("nats://s3cret@127.0.0.1:{}", server.port())).await?;

    for version in NatsVersion::ALL {
        let server = NatsServer::start_with(version, &NatsOptions::tls()).await?;
        let ca = server.tls_files().context("tls files")?.ca_cert.clone();
        let url = format!("tls://127.0.0.1:{}?ca={}", server.port(), ca.display());
        lock_round_trip(&url).await?;
        // Without the CA the server's certificate is not trusted: a clear TLS error, not a hang.
        let err = dlock::connect(&format!("tls://127.0.0.1:{}", server.port()))
            .await
            .err()
            .context("an untrusted certificate must fail")?;
        ensure!(err.to_string().contains("TLS"), "{err}");
    }
    Ok(())
}

/// Names whose encoding is too long for a subject get a digest token; names differing only at the
/// end stay distinct locks, and the stored full name is what `inspect` checks against.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn names_that_need_the_digest_are_distinct() -> Result<()> {
    let Some(server) = single(NatsVersion::V2_11Plus, &NatsOptions::default()).await? else {
        return Ok(());
    };
    let (a, b) = (
        dlock::connect(&server.url()).await?,
        dlock::connect(&server.url()).await?,
    );
    let stem = "ü".repeat(1000);
    let names = [
        format!("{stem}a"),
        format!("{stem}b"),
        "x".repeat(LockName::MAX_LEN),
        format!("{}.", "x".repeat(LockName::MAX_LEN - 1)),
    ];
    let mut guards = Vec::new();
    for name in &names {
        guards.push(a.lock(name).try_acquire().await?);
    }
    for name in &names {
        let err = b.lock(name).try_acquire().await.err();
        ensure!(
            err.as_ref().is_some_and(Error::is_would_block),
            "{:.12}…: {err:?}",
            name
        );
        let q = a.inspect(name).await?;
        ensure!(q.len() == 1 && q[0].granted, "{:.12}…: {q:?}", name);
    }
    let tokens: std::collections::HashSet<u64> = guards.iter().map(|g| g.fencing_token()).collect();
    ensure!(tokens.len() == names.len(), "two names shared a grant");
    for g in guards {
        g.release().await?;
    }
    Ok(())
}

/// The lease mode follows the server: client clock on 2.9, per-message TTL on 2.11+; `lease=clock`
/// forces the client-clock mode on a new stream, and a URL asking for the other mode of an existing
/// stream is refused, as is a stream whose config would break the locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_mode_follows_the_server_and_the_stream() -> Result<()> {
    let Some(old) = single(NatsVersion::V2_9, &NatsOptions::default()).await? else {
        return Ok(());
    };
    let d = JetStreamDriver::connect(&old.url()).await?;
    ensure!(d.lease_mode() == LeaseMode::ClientClock, "{d:?}");
    ensure!(d.server_version().starts_with("2.9"), "{d:?}");
    let err = JetStreamDriver::connect(&format!("{}?lease=ttl&stream=OTHER", old.url()))
        .await
        .err()
        .context("lease=ttl on 2.9")?;
    ensure!(err.to_string().contains("2.11"), "{err}");

    let new = NatsServer::start(NatsVersion::V2_11Plus).await?;
    let d = JetStreamDriver::connect(&new.url()).await?;
    ensure!(d.lease_mode() == LeaseMode::ServerTtl, "{d:?}");
    let err = JetStreamDriver::connect(&format!("{}?lease=clock", new.url()))
        .await
        .err()
        .context("lease=clock on a TTL stream")?;
    ensure!(err.to_string().contains("cannot hold locks"), "{err}");

    let clock_url = format!("{}?lease=clock&stream=CLOCK&prefix=clocklocks", new.url());
    let d = JetStreamDriver::connect(&clock_url).await?;
    ensure!(d.lease_mode() == LeaseMode::ClientClock);
    let locks = Locks::new(d);
    locks.lock("c").try_acquire().await?.release().await?;

    // A stream that lets followers answer reads is refused.
    let client = async_nats::connect(new.url()).await?;
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "DIRECT".into(),
        subjects: vec!["direct.>".into()],
        max_messages_per_subject: 1,
        allow_direct: true,
        ..Default::default()
    })
    .await?;
    let err = JetStreamDriver::connect(&format!("{}?stream=DIRECT&prefix=direct", new.url()))
        .await
        .err()
        .context("an allow_direct stream")?;
    ensure!(err.to_string().contains("allow_direct"), "{err}");
    Ok(())
}

async fn crashed_holder_frees_the_lock(
    version: NatsVersion,
    waiter_url_params: &str,
) -> Result<()> {
    let Some(server) = single(version, &NatsOptions::default()).await? else {
        return Ok(());
    };
    let ttl = Duration::from_secs(2);
    let mut holder = tokio::process::Command::new(env!("CARGO_BIN_EXE_dlock-holder"))
        .args([
            "--url",
            &server.url(),
            "--name",
            "crash",
            "--ttl-ms",
            &ttl.as_millis().to_string(),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(holder.stdout.take().context("stdout")?).lines();
    let line = within(HANG, "the holder reports HELD", lines.next_line())
        .await??
        .context("holder exited early")?;
    let held: u64 = line.strip_prefix("HELD ").context("HELD")?.parse()?;
    let b = dlock::connect(&format!("{}{waiter_url_params}", server.url())).await?;
    let waiter = tokio::spawn(b.lock("crash").ttl(ttl).into_future());
    eventually("the waiter queues", || async {
        Ok(b.inspect("crash").await?.len() >= 2)
    })
    .await?;
    holder.start_kill()?;
    holder.wait().await?;
    let guard = within(HANG, "the waiter is granted after the crash", waiter).await???;
    ensure!(guard.fencing_token() > held);
    Ok(())
}

/// On 2.11+ the server removes a crashed holder's entry when its `Nats-TTL` runs out and leaves a
/// subject delete marker; the waiter's watch sees the marker and is granted. The waiter re-reads the
/// queue on its own only every 10 minutes here (`recheck_ms`), far beyond the hang guard, so only
/// the marker can have woken it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashed_holder_expiry_wakes_the_waiter_through_the_delete_marker() -> Result<()> {
    crashed_holder_frees_the_lock(NatsVersion::V2_11Plus, "?recheck_ms=600000").await
}

/// On 2.9 the waiter wakes at the crashed holder's expiry as computed from the stream's own
/// timestamps, with the same 10-minute recheck: only that timer can have woken it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashed_holder_expiry_wakes_the_waiter_at_the_computed_expiry_on_2_9() -> Result<()> {
    crashed_holder_frees_the_lock(NatsVersion::V2_9, "?recheck_ms=600000").await
}
