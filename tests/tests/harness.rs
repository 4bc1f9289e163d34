//! Tests of the real-server harness itself: every topology on every version starts and
//! answers, faults do what they say, and the proxy cuts and blackholes as documented.
//!
//! Silence can only be observed by waiting: where a test checks that a paused server or a
//! blackholed proxy does *not* answer, it waits for a fixed window ([`SILENCE`]) and then
//! checks that the held request is answered once the fault is lifted.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use dlock_tests::harness::{
    self, Backend, EtcdCluster, EtcdServer, EtcdVersion, NatsCluster, NatsServer, NatsVersion,
    RedisCluster, RedisServer, RedisVersion, RespConnection, RespValue, TcpProxy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long a test listens for an answer that must not come.
const SILENCE: Duration = Duration::from_millis(300);
/// Upper bound for anything that should happen promptly (a reply after resume, an echo).
const PROMPTLY: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(PROMPTLY, fut)
        .await
        .map_err(|_| anyhow!("{what}: nothing within {PROMPTLY:?}"))
}

/// The harness types are shared between the code under test and fault injectors.
#[test]
fn servers_and_proxy_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<RedisServer>();
    check::<RedisCluster>();
    check::<EtcdServer>();
    check::<EtcdCluster>();
    check::<NatsServer>();
    check::<NatsCluster>();
    check::<TcpProxy>();
}

/// Retries a request that may fail transiently right after a fault (an election in
/// progress, a leader change under a loaded machine), as a client would; bounded.
async fn retry<T, F, Fut>(what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        match tokio::time::timeout(PROMPTLY, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if tokio::time::Instant::now() >= deadline => {
                return Err(e).context(format!("{what} (retried for {PROMPTLY:?})"))
            }
            Err(_) => bail!("{what}: no answer within {PROMPTLY:?}"),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
}

// ---------------------------------------------------------------------------------------
// Binaries

#[test]
fn binaries_are_picked_by_the_version_they_print() -> Result<()> {
    let mut checked = 0;
    if harness::require(Backend::Redis) {
        let b = RedisVersion::V7.binary()?;
        ensure!(b.version.starts_with("7."), "{b:?}");
        checked += 1;
    }
    if harness::require(Backend::Etcd) {
        let b = EtcdVersion::V3_4.binary()?;
        ensure!(b.version.starts_with("3.4."), "{b:?}");
        let b = EtcdVersion::V3_5.binary()?;
        ensure!(b.version.starts_with("3.5."), "{b:?}");
        checked += 2;
    }
    if harness::require(Backend::Nats) {
        let b = NatsVersion::V2_9.binary()?;
        ensure!(b.version.starts_with("2.9."), "{b:?}");
        let b = NatsVersion::V2_11Plus.binary()?;
        let minor: u32 = b.version.split('.').nth(1).unwrap_or("0").parse()?;
        ensure!(b.version.starts_with("2.") && minor >= 11, "{b:?}");
        checked += 2;
    }
    eprintln!("checked {checked} binaries");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Redis

async fn set_get(server: &RedisServer, key: &str, value: &str) -> Result<()> {
    server
        .connect()
        .await?
        .command_ok(&["SET", key, value])
        .await?;
    let got = server.command(&["GET", key]).await?;
    ensure!(
        got == RespValue::Bulk(Some(value.as_bytes().to_vec())),
        "GET {key} = {got:?}"
    );
    Ok(())
}

#[tokio::test]
async fn redis_single_starts_answers_and_dies_with_its_handle() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = RedisServer::start().await?;
    ensure!(server.url() == format!("redis://127.0.0.1:{}", server.port()));
    set_get(&server, "k", "v").await?;
    let pid = server.process().pid().context("no pid")?;
    ensure!(pid_alive(pid));
    drop(server);
    ensure!(!pid_alive(pid), "redis pid {pid} survived its handle");
    Ok(())
}

#[tokio::test]
async fn redis_many_are_independent() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let servers = RedisServer::builder().start_many(3).await?;
    let mut ports: Vec<u16> = servers.iter().map(RedisServer::port).collect();
    ports.sort_unstable();
    ports.dedup();
    ensure!(ports.len() == 3, "ports not distinct: {ports:?}");
    set_get(&servers[0], "only-here", "1").await?;
    for s in &servers[1..] {
        ensure!(s.command(&["GET", "only-here"]).await? == RespValue::Bulk(None));
    }
    Ok(())
}

#[tokio::test]
async fn redis_pause_resume_kill_restart() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = RedisServer::start().await?;
    let port = server.port();
    set_get(&server, "before", "1").await?;

    // Paused: a PING sent now gets no answer, and is answered once resumed.
    let mut conn = server.connect().await?;
    server.pause()?;
    ensure!(server.process().is_paused());
    let pending = conn.command(&["PING"]);
    tokio::pin!(pending);
    ensure!(
        tokio::time::timeout(SILENCE, &mut pending).await.is_err(),
        "a paused server answered"
    );
    server.resume()?;
    let reply = within("PING held across pause", pending).await??;
    ensure!(reply == RespValue::Simple("PONG".into()), "{reply:?}");

    // Killed: connections are refused; restarted: same port, empty (no persistence).
    server.kill()?;
    ensure!(!server.process().is_running());
    ensure!(TcpStream::connect(server.addr()).await.is_err());
    server.restart().await?;
    ensure!(server.port() == port);
    server.ping().await?;
    ensure!(server.command(&["GET", "before"]).await? == RespValue::Bulk(None));
    Ok(())
}

#[tokio::test]
async fn redis_password_and_acl_user_are_enforced() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let with_password = RedisServer::builder()
        .password("s3cret pass")
        .start()
        .await?;
    ensure!(with_password
        .url()
        .starts_with("redis://:s3cret%20pass@127.0.0.1:"));
    let mut anon = RespConnection::connect(with_password.addr(), None).await?;
    match anon.command(&["GET", "x"]).await? {
        RespValue::Error(e) if e.starts_with("NOAUTH") => {}
        other => bail!("unauthenticated GET answered {other:?}"),
    }
    set_get(&with_password, "x", "1").await?;

    let with_user = RedisServer::builder()
        .acl_user("locker", "pw")
        .start()
        .await?;
    ensure!(with_user.url().starts_with("redis://locker:pw@127.0.0.1:"));
    let mut conn = RespConnection::connect(with_user.addr(), None).await?;
    match conn.command(&["AUTH", "default", ""]).await? {
        RespValue::Error(_) => {}
        other => bail!("default user is on: {other:?}"),
    }
    set_get(&with_user, "y", "2").await?;
    Ok(())
}

#[tokio::test]
async fn redis_tls_serves_tls_only() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = RedisServer::builder()
        .tls(true)
        .password("pw")
        .start()
        .await?;
    ensure!(server.url().starts_with("rediss://"));
    let tls = server.tls().context("no TLS files")?;
    ensure!(tls.ca_cert_pem()?.contains("BEGIN CERTIFICATE"));
    set_get(&server, "t", "1").await?;
    // A plaintext client gets no PONG from the TLS port.
    let mut plain = RespConnection::connect(server.addr(), None).await?;
    let reply = tokio::time::timeout(PROMPTLY, plain.command(&["PING"])).await;
    ensure!(
        !matches!(reply, Ok(Ok(RespValue::Simple(ref s))) if s == "PONG"),
        "plaintext PING on the TLS port answered PONG"
    );
    Ok(())
}

/// Walks every slot owner by following `MOVED` from node 0, writing one key per owner.
async fn write_key_on_every_master(cluster: &RedisCluster) -> Result<()> {
    let mut owners = std::collections::BTreeSet::new();
    for i in 0..64 {
        let key = format!("key-{i}");
        let mut node = cluster.node(0);
        let mut stored = false;
        for _hop in 0..3 {
            match node.command(&["SET", &key, "v"]).await? {
                RespValue::Simple(ok) if ok == "OK" => {
                    owners.insert(node.port());
                    stored = true;
                    break;
                }
                RespValue::Error(e) if e.starts_with("MOVED") => {
                    let target = e.split_whitespace().nth(2).unwrap_or_default();
                    let addr: SocketAddr = target.parse()?;
                    node = cluster
                        .nodes()
                        .iter()
                        .find(|n| n.addr() == addr)
                        .with_context(|| format!("MOVED to unknown {target}"))?;
                }
                other => bail!("SET {key}: {other:?}"),
            }
        }
        ensure!(stored, "SET {key}: still MOVED after 3 hops");
    }
    ensure!(
        owners.len() == 3,
        "keys landed on {owners:?}, expected 3 masters"
    );
    Ok(())
}

/// `CLUSTER SLOTS` ranges from one node cover 0..=16383 exactly once.
async fn all_slots_covered(cluster: &RedisCluster) -> Result<()> {
    let RespValue::Array(Some(ranges)) = cluster.node(0).command(&["CLUSTER", "SLOTS"]).await?
    else {
        bail!("CLUSTER SLOTS: not an array");
    };
    let mut spans: Vec<(i64, i64)> = ranges
        .iter()
        .map(|r| match r {
            RespValue::Array(Some(v)) => match (&v[0], &v[1]) {
                (RespValue::Integer(a), RespValue::Integer(b)) => Ok((*a, *b)),
                _ => bail!("bad range {r:?}"),
            },
            _ => bail!("bad range {r:?}"),
        })
        .collect::<Result<_>>()?;
    spans.sort_unstable();
    let mut next = 0;
    for (a, b) in spans {
        ensure!(a == next, "slots gap or overlap at {next}");
        next = b + 1;
    }
    ensure!(next == 16384, "slots end at {next}");
    Ok(())
}

#[tokio::test]
async fn redis_cluster_serves_all_slots_and_restarts_members() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let cluster = RedisCluster::start().await?;
    ensure!(cluster.len() == 3 && cluster.urls().len() == 3);
    all_slots_covered(&cluster).await?;
    write_key_on_every_master(&cluster).await?;

    cluster.kill_member(1)?;
    ensure!(TcpStream::connect(cluster.node(1).addr()).await.is_err());
    let port = cluster.node(1).port();
    cluster.restart_member(1).await?;
    ensure!(cluster.node(1).port() == port);
    write_key_on_every_master(&cluster).await?;
    Ok(())
}

#[tokio::test]
async fn redis_cluster_with_tls_and_acl_user() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let cluster = RedisServer::builder()
        .tls(true)
        .acl_user("locker", "pw")
        .start_cluster()
        .await?;
    ensure!(cluster
        .urls()
        .iter()
        .all(|u| u.starts_with("rediss://locker:pw@")));
    all_slots_covered(&cluster).await?;
    write_key_on_every_master(&cluster).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// etcd

async fn etcd_single(version: EtcdVersion) -> Result<()> {
    let server = EtcdServer::start(version).await?;
    ensure!(server.endpoint() == format!("http://127.0.0.1:{}", server.port()));
    ensure!(server.endpoints() == vec![server.endpoint()]);
    ensure!(server.as_cluster().leader_index().await? == 0);
    let m = server.member();
    m.kv_put("dlock/harness", "1").await?;
    ensure!(m.kv_get("dlock/harness").await?.as_deref() == Some("1"));

    // Paused: a health request sent now is answered only after resume.
    server.pause()?;
    let pending = m.health();
    tokio::pin!(pending);
    ensure!(tokio::time::timeout(SILENCE, &mut pending).await.is_err());
    server.resume()?;
    m.health().await?;

    // Killed then restarted on the same port and data dir: the data survives.
    server.kill()?;
    ensure!(m.health().await.is_err());
    let port = server.port();
    server.restart().await?;
    ensure!(server.port() == port);
    ensure!(m.kv_get("dlock/harness").await?.as_deref() == Some("1"));
    Ok(())
}

async fn etcd_cluster(version: EtcdVersion) -> Result<()> {
    let cluster = EtcdCluster::start(version).await?;
    ensure!(cluster.endpoints().len() == 3);
    let leader = cluster.kill_leader().await?;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let new_leader = cluster.leader_index().await?;
    ensure!(new_leader != leader, "killed leader {leader} still leads");

    // Written through one survivor, read (linearizably) through the other.
    let (a, b) = (cluster.member(survivors[0]), cluster.member(survivors[1]));
    retry("put after leader loss", || a.kv_put("after-kill", "yes")).await?;
    let got = retry("get after leader loss", || b.kv_get("after-kill")).await?;
    ensure!(got.as_deref() == Some("yes"), "{got:?}");

    // The restarted member catches up on what it missed.
    cluster.restart_member(leader).await?;
    let restarted = cluster.member(leader);
    let got = retry("get on restarted member", || restarted.kv_get("after-kill")).await?;
    ensure!(got.as_deref() == Some("yes"), "{got:?}");
    cluster.wait_healthy().await?;

    // A paused leader is replaced; once resumed it rejoins as a follower.
    let paused = cluster.pause_leader().await?;
    let replacement = cluster.leader_index().await?;
    ensure!(replacement != paused, "paused leader {paused} still leads");
    cluster.resume_member(paused)?;
    cluster.wait_healthy().await?;
    let resumed = cluster.member(paused);
    retry("put on resumed member", || {
        resumed.kv_put("after-pause", "yes")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn etcd_3_4_single_member() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    etcd_single(EtcdVersion::V3_4).await
}

#[tokio::test]
async fn etcd_3_5_single_member() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    etcd_single(EtcdVersion::V3_5).await
}

#[tokio::test]
async fn etcd_3_4_cluster_survives_leader_loss() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    etcd_cluster(EtcdVersion::V3_4).await
}

#[tokio::test]
async fn etcd_3_5_cluster_survives_leader_loss() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    etcd_cluster(EtcdVersion::V3_5).await
}

// ---------------------------------------------------------------------------------------
// NATS JetStream

async fn js_publish_retrying(
    js: &async_nats::jetstream::Context,
    subject: &str,
    payload: &'static str,
) -> Result<()> {
    // A publish racing a stream-leader election fails; the client retries, bounded.
    let mut last = None;
    for _ in 0..50 {
        let attempt = async {
            js.publish(subject.to_string(), payload.into())
                .await?
                .await
                .map_err(anyhow::Error::from)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(_ack)) => return Ok(()),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(anyhow!("publish timed out")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.unwrap_or_else(|| anyhow!("no attempt"))).context("publishing after member loss")
}

async fn nats_single(version: NatsVersion) -> Result<()> {
    let server = NatsServer::start(version).await?;
    ensure!(server.url() == format!("nats://127.0.0.1:{}", server.port()));
    let client = async_nats::connect(server.url()).await?;
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "HARNESS".into(),
        subjects: vec!["harness.>".into()],
        ..Default::default()
    })
    .await?;
    js_publish_retrying(&js, "harness.a", "1").await?;
    ensure!(server.as_cluster().stream_leader_index("HARNESS").await? == 0);

    // Paused: the monitoring endpoint answers only after resume.
    server.pause()?;
    let pending = server.node().healthz();
    tokio::pin!(pending);
    ensure!(tokio::time::timeout(SILENCE, &mut pending).await.is_err());
    server.resume()?;
    server.node().healthz().await?;

    // Restarted on the same ports and store dir: the stream and its message survive.
    server.kill()?;
    let port = server.port();
    server.restart().await?;
    ensure!(server.port() == port);
    let client = async_nats::connect(server.url()).await?;
    let js = async_nats::jetstream::new(client);
    let info = retry("stream info after restart", || async {
        Ok(js.get_stream("HARNESS").await?.get_info().await?)
    })
    .await?;
    ensure!(info.state.messages == 1, "{:?}", info.state);
    Ok(())
}

async fn nats_cluster(version: NatsVersion) -> Result<()> {
    let cluster = NatsCluster::start(version).await?;
    ensure!(cluster.client_urls().len() == 3);
    let meta = cluster.meta_leader_index().await?;
    ensure!(meta < 3);

    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(cluster.client_urls())
        .await?;
    let js = async_nats::jetstream::new(client);
    let config = async_nats::jetstream::stream::Config {
        name: "R3".into(),
        subjects: vec!["r3.>".into()],
        num_replicas: 3,
        ..Default::default()
    };
    retry("create R3 stream", || async {
        Ok(js.get_or_create_stream(config.clone()).await?)
    })
    .await?;
    js_publish_retrying(&js, "r3.before", "1").await?;

    // Waiting for the new leader first spares the publish an ack timeout on the dead one.
    let killed = cluster.kill_stream_leader("R3").await?;
    let new_leader = cluster.stream_leader_index("R3").await?;
    ensure!(
        new_leader != killed,
        "killed stream leader {killed} still leads"
    );
    js_publish_retrying(&js, "r3.after", "2").await?;
    let info = retry("stream info after leader loss", || async {
        Ok(js.get_stream("R3").await?.get_info().await?)
    })
    .await?;
    ensure!(info.state.messages == 2, "{:?}", info.state);

    cluster.restart_member(killed).await?;
    cluster.wait_healthy().await?;
    cluster.meta_leader_index().await?;
    Ok(())
}

#[tokio::test]
async fn nats_2_9_single_server() -> Result<()> {
    if !harness::require(Backend::Nats) {
        return Ok(());
    }
    nats_single(NatsVersion::V2_9).await
}

#[tokio::test]
async fn nats_2_11_plus_single_server() -> Result<()> {
    if !harness::require(Backend::Nats) {
        return Ok(());
    }
    nats_single(NatsVersion::V2_11Plus).await
}

#[tokio::test]
async fn nats_2_9_cluster_survives_stream_leader_loss() -> Result<()> {
    if !harness::require(Backend::Nats) {
        return Ok(());
    }
    nats_cluster(NatsVersion::V2_9).await
}

#[tokio::test]
async fn nats_2_11_plus_cluster_survives_stream_leader_loss() -> Result<()> {
    if !harness::require(Backend::Nats) {
        return Ok(());
    }
    nats_cluster(NatsVersion::V2_11Plus).await
}

// ---------------------------------------------------------------------------------------
// TcpProxy

/// An echo server that reports each accepted connection on a channel.
async fn echo_server() -> Result<(SocketAddr, mpsc::UnboundedReceiver<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let _ = tx.send(());
            tokio::spawn(async move {
                let (mut r, mut w) = sock.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok((addr, rx))
}

async fn echo_roundtrip(conn: &mut TcpStream, msg: &[u8]) -> Result<()> {
    conn.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    within("echo", conn.read_exact(&mut buf)).await??;
    ensure!(buf == msg, "echoed {buf:?}");
    Ok(())
}

#[tokio::test]
async fn proxy_forwards_and_cut_drops_open_connections() -> Result<()> {
    let (echo, mut accepted) = echo_server().await?;
    let proxy = TcpProxy::start(echo).await?;
    ensure!(proxy.addr().port() == proxy.port() && proxy.target() == echo);

    let mut a = TcpStream::connect(proxy.addr()).await?;
    let mut b = TcpStream::connect(proxy.addr()).await?;
    echo_roundtrip(&mut a, b"hello").await?;
    echo_roundtrip(&mut b, b"world").await?;
    within("two upstream connections", async {
        accepted.recv().await;
        accepted.recv().await;
    })
    .await?;

    ensure!(proxy.cut().await == 2);
    ensure!(proxy.connection_count() == 0);
    for conn in [&mut a, &mut b] {
        let mut buf = [0u8; 1];
        // Reset: the read fails (or, if the RST raced a FIN, sees EOF); no data either way.
        match within("cut connection closes", conn.read(&mut buf)).await? {
            Ok(0) | Err(_) => {}
            Ok(n) => bail!("read {n} bytes from a cut connection"),
        }
    }

    // The proxy keeps accepting after a cut.
    let mut c = TcpStream::connect(proxy.addr()).await?;
    echo_roundtrip(&mut c, b"again").await?;
    Ok(())
}

#[tokio::test]
async fn proxy_blackhole_holds_traffic_and_new_connections_until_lifted() -> Result<()> {
    let (echo, mut accepted) = echo_server().await?;
    let proxy = TcpProxy::start(echo).await?;
    let mut open = TcpStream::connect(proxy.addr()).await?;
    echo_roundtrip(&mut open, b"warm").await?;
    within("upstream connection", accepted.recv()).await?;

    proxy.set_blackhole(true);
    ensure!(proxy.is_blackholed());
    open.write_all(b"held").await?;
    let mut buf = [0u8; 4];
    let read = tokio::time::timeout(SILENCE, open.read_exact(&mut buf)).await;
    ensure!(read.is_err(), "bytes passed a blackhole");

    // A new connection is accepted by the proxy but does not reach the target.
    let mut late = TcpStream::connect(proxy.addr()).await?;
    late.write_all(b"late").await?;
    ensure!(
        tokio::time::timeout(SILENCE, accepted.recv())
            .await
            .is_err(),
        "a connection reached the target through a blackhole"
    );

    // Lifted: the held bytes arrive, and the waiting connection is forwarded.
    proxy.set_blackhole(false);
    within("held bytes", open.read_exact(&mut buf)).await??;
    ensure!(&buf == b"held");
    within("late upstream connection", accepted.recv()).await?;
    let mut buf = [0u8; 4];
    within("late echo", late.read_exact(&mut buf)).await??;
    ensure!(&buf == b"late");
    Ok(())
}

#[tokio::test]
async fn proxy_in_front_of_redis() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = RedisServer::start().await?;
    let proxy = TcpProxy::start(server.addr()).await?;
    let mut conn = RespConnection::connect(proxy.addr(), None).await?;
    ensure!(conn.command(&["PING"]).await? == RespValue::Simple("PONG".into()));
    ensure!(server.url_for(proxy.port()) == format!("redis://127.0.0.1:{}", proxy.port()));
    proxy.cut().await;
    ensure!(
        conn.command(&["PING"]).await.is_err(),
        "PING on a cut connection"
    );
    Ok(())
}
