//! The errors a new user meets first: connecting with a malformed URL, to a port nothing listens on,
//! to a port that never answers, with credentials the server refuses, and with TLS to a server
//! without it — through `dlock::connect` and each driver's own `connect`.
//!
//! Every message must name the URL with its secret replaced by `***`, say what is wrong and what to
//! do, on one line, with the cause said once: in `{}`, and in anyhow's `{:#}` and `{:?}`, which add
//! the chain of `source()`s.
//!
//! A connect that gets no answer must give up within its driver's bound, stated with each case;
//! [`SLACK`] on top of it is for a loaded machine, not part of the bound.

use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use dlock::Error;
use dlock_etcd::EtcdDriver;
use dlock_jetstream::JetStreamDriver;
use dlock_redis::RedisDriver;
use dlock_tests::harness::etcd::EtcdSecurity;
use dlock_tests::harness::process::free_port;
use dlock_tests::harness::{
    self, Backend, EtcdServer, EtcdVersion, NatsOptions, NatsServer, NatsVersion, RedisServer,
};
use tokio::time::Instant;

/// What a connect may take beyond its driver's bound on a busy machine.
const SLACK: Duration = Duration::from_secs(2);
/// Hang guard, far above every bound here.
const HANG: Duration = Duration::from_secs(60);
/// The password or token in the URLs below; no message may show it.
const SECRET: &str = "s3cret";
/// What a malformed URL may take: no store is asked.
const AT_ONCE: Duration = Duration::ZERO;
/// `RedisDriver`'s default connection timeout: one attempt on the first node.
const REDIS_BOUND: Duration = Duration::from_secs(2);
/// `EtcdDriver` with its default `timeout_ms` (3 s): a member that does not answer is tried once,
/// one that refuses twice, 100 ms apart.
const ETCD_BOUND: Duration = Duration::from_millis(3100);
/// `JetStreamDriver` with `timeout_ms=2000`: one attempt per server.
const NATS_BOUND: Duration = Duration::from_secs(2);

/// Which error a case must be.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// [`Error::InvalidUrl`]: the URL is wrong, nothing was asked.
    Url,
    /// [`Error::Connect`]: the store was asked and the connect failed.
    Connect,
}

/// What one failed connect must say.
struct Expect {
    kind: Kind,
    /// The URL as the message must show it.
    url: String,
    /// What went wrong; must appear exactly once in every rendering.
    cause: String,
    /// What to do.
    hint: &'static str,
}

impl Expect {
    /// The URL to connect with: the shown one with the secret put back.
    fn given(&self) -> String {
        self.url.replace("***", SECRET)
    }
}

/// A malformed URL.
fn url(shown: &str, cause: &str, hint: &'static str) -> Expect {
    Expect {
        kind: Kind::Url,
        url: shown.to_owned(),
        cause: cause.to_owned(),
        hint,
    }
}

/// A connect the store (or the network) turned down.
fn refused(shown: &str, cause: &str, hint: &'static str) -> Expect {
    Expect {
        kind: Kind::Connect,
        url: shown.to_owned(),
        cause: cause.to_owned(),
        hint,
    }
}

/// Awaits a connect, expects it to fail within `bound` (+ [`SLACK`]), and checks the message.
async fn fails<T>(
    connect: impl Future<Output = dlock::Result<T>>,
    bound: Duration,
    expect: &Expect,
) -> Result<()> {
    let started = Instant::now();
    let outcome = tokio::time::timeout(HANG, connect)
        .await
        .with_context(|| format!("{}: no answer within {HANG:?}", expect.url))?;
    let took = started.elapsed();
    let Err(err) = outcome else {
        bail!("{}: connected, expected an error", expect.url);
    };
    let display = err.to_string();
    println!("{:.1?}: {display}", took);
    ensure!(
        took <= bound + SLACK,
        "took {took:?}, beyond the bound of {bound:?}: {display}"
    );
    let kind = match err {
        Error::InvalidUrl { .. } => Some(Kind::Url),
        Error::Connect { .. } => Some(Kind::Connect),
        _ => None,
    };
    ensure!(
        kind == Some(expect.kind),
        "expected {:?}, got {err:?}",
        expect.kind
    );
    let chained = anyhow::Error::from(err);
    let alternate = format!("{chained:#}");
    let debug = format!("{chained:?}");
    // anyhow adds a backtrace after the chain when RUST_BACKTRACE is set.
    let debug = debug.split("\n\nStack backtrace:").next().unwrap_or("");
    for (how, text) in [
        ("{}", display.as_str()),
        ("{:#}", &alternate),
        ("{:?}", debug),
    ] {
        ensure!(!text.contains(SECRET), "{how} shows the secret: {text}");
        ensure!(
            text.contains(&expect.url),
            "{how} lacks the URL {:?}: {text}",
            expect.url
        );
        ensure!(
            text.matches(expect.cause.as_str()).count() == 1,
            "{how} must say {:?} once: {text}",
            expect.cause
        );
        ensure!(
            text.contains(expect.hint),
            "{how} lacks the hint {:?}: {text}",
            expect.hint
        );
        ensure!(!text.contains('\n'), "{how} is not one line: {text}");
    }
    Ok(())
}

/// A loopback port that accepts connections (the kernel completes the handshake) and never
/// answers: a frozen server, or a firewall that swallows the replies.
fn silent_port() -> Result<(TcpListener, u16)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    Ok((listener, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connect_errors_name_the_url_the_cause_and_what_to_do() -> Result<()> {
    let malformed = [
        url(
            "redis://app:***@127.0.0.1:63799x",
            "invalid port \"63799x\"",
            "ports are 1 to 65535",
        ),
        url(
            "redis://app:***@127.0.0.1:6379?protocol=resp9",
            "protocol=\"resp9\"",
            "use resp2 or resp3",
        ),
        url(
            "redis://app:***@127.0.0.1:6379?colour=red",
            "unknown query parameter \"colour\"",
            "known: tls_ca, tls_cert, tls_key, key_prefix, protocol",
        ),
        url(
            "redis://app:***@127.0.0.1:6379/x",
            "invalid database \"x\"",
            "as in /0",
        ),
    ];
    for expect in &malformed {
        let given = expect.given();
        fails(RedisDriver::connect(&given), AT_ONCE, expect).await?;
        fails(dlock::connect(&given), AT_ONCE, expect).await?;
    }
    let scheme = url(
        "redis+tls://app:***@127.0.0.1:6379",
        "unknown scheme \"redis+tls\"",
        "use redis, rediss, redis+cluster or rediss+cluster",
    );
    fails(RedisDriver::connect(&scheme.given()), AT_ONCE, &scheme).await?;

    let closed = free_port()?;
    let shown = format!("redis://app:***@127.0.0.1:{closed}");
    let cause = format!("connection refused: nothing is listening on 127.0.0.1:{closed}");
    let expect = refused(
        &shown,
        &cause,
        "check that Redis is running there and that the URL's host and port are right",
    );
    let given = expect.given();
    fails(RedisDriver::connect(&given), REDIS_BOUND, &expect).await?;
    fails(dlock::connect(&given), REDIS_BOUND, &expect).await?;

    let (_listener, silent) = silent_port()?;
    let shown = format!("redis://127.0.0.1:{silent}");
    let cause = format!("no answer from 127.0.0.1:{silent} within 2s");
    let expect = refused(&shown, &cause, "that no firewall drops the connection");
    fails(dlock::connect(&shown), REDIS_BOUND, &expect).await?;

    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let server = RedisServer::builder().password("right").start().await?;
    let port = server.port();
    let shown = format!("redis://:***@127.0.0.1:{port}");
    let expect = refused(
        &shown,
        "authentication failed",
        "check the user name and password in the URL",
    );
    let given = expect.given();
    fails(RedisDriver::connect(&given), REDIS_BOUND, &expect).await?;
    fails(dlock::connect(&given), REDIS_BOUND, &expect).await?;
    let shown = format!("redis://127.0.0.1:{port}");
    let expect = refused(
        &shown,
        "the server requires a password and the URL gives none",
        "put it in the URL: redis://:PASSWORD@HOST:PORT",
    );
    fails(dlock::connect(&shown), REDIS_BOUND, &expect).await?;

    // TLS to a server without it: Redis waits for the rest of what it takes for a command.
    let shown = format!("rediss://:***@127.0.0.1:{port}");
    let cause = format!("no answer from 127.0.0.1:{port} within 2s");
    let expect = refused(&shown, &cause, "for one without, use redis://");
    fails(
        dlock::connect(&format!("rediss://:right@127.0.0.1:{port}")),
        REDIS_BOUND,
        &expect,
    )
    .await?;

    // A server certificate from a private CA, and no tls_ca to trust it.
    let private = RedisServer::builder().tls(true).start().await?;
    let shown = format!("rediss://127.0.0.1:{}", private.port());
    let expect = refused(
        &shown,
        "invalid peer certificate",
        "for a private CA add ?tls_ca=PATH",
    );
    fails(dlock::connect(&shown), REDIS_BOUND, &expect).await?;

    let acl = RedisServer::builder()
        .acl_user("locker", "right")
        .start()
        .await?;
    let shown = format!("redis://locker:***@127.0.0.1:{}", acl.port());
    let expect = refused(
        &shown,
        "authentication failed: the server refused user \"locker\"",
        "and the server's ACL",
    );
    fails(dlock::connect(&expect.given()), REDIS_BOUND, &expect).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_connect_errors_name_the_url_the_cause_and_what_to_do() -> Result<()> {
    let malformed = [
        url(
            "etcd://app:***@127.0.0.1:23x",
            "invalid port \"23x\"",
            "ports are 1 to 65535",
        ),
        url(
            "etcd://app:***@127.0.0.1:2379?timeout_ms=soon",
            "got \"soon\"",
            "must be a whole number of milliseconds",
        ),
        url(
            "etcd://app:***@127.0.0.1:2379?colour=red",
            "unknown query parameter \"colour\"",
            "known: tls_ca",
        ),
        url(
            "etcd://***@127.0.0.1:2379",
            "credentials need both parts",
            "etcd://USER:PASSWORD@HOST",
        ),
    ];
    for expect in &malformed {
        let given = expect.given();
        fails(EtcdDriver::connect(&given), AT_ONCE, expect).await?;
        fails(dlock::connect(&given), AT_ONCE, expect).await?;
    }
    let scheme = url(
        "etcdx://app:***@127.0.0.1:2379",
        "not etcdx://",
        "the etcd driver takes etcd:// or etcds://",
    );
    fails(EtcdDriver::connect(&scheme.given()), AT_ONCE, &scheme).await?;

    let closed = free_port()?;
    let shown = format!("etcd://app:***@127.0.0.1:{closed}");
    let cause = format!("connection refused at 127.0.0.1:{closed}");
    let expect = refused(
        &shown,
        &cause,
        "check that etcd is running there and that the URL's hosts and ports are right",
    );
    let given = expect.given();
    fails(EtcdDriver::connect(&given), ETCD_BOUND, &expect).await?;
    fails(dlock::connect(&given), ETCD_BOUND, &expect).await?;
    let (a, b) = (free_port()?, free_port()?);
    let shown = format!("etcd://127.0.0.1:{closed},127.0.0.1:{a},127.0.0.1:{b}");
    let cause = format!(
        "connection refused at every member (127.0.0.1:{closed}, 127.0.0.1:{a}, 127.0.0.1:{b})"
    );
    let expect = refused(&shown, &cause, "check that etcd is running there");
    fails(dlock::connect(&shown), ETCD_BOUND, &expect).await?;

    let (_listener, silent) = silent_port()?;
    let shown = format!("etcd://127.0.0.1:{silent}");
    let cause = format!("no answer within 3s at 127.0.0.1:{silent}");
    let expect = refused(&shown, &cause, "?timeout_ms=N waits longer");
    fails(dlock::connect(&shown), ETCD_BOUND, &expect).await?;

    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let security = EtcdSecurity {
        auth: Some(("root".into(), "right".into())),
        ..EtcdSecurity::default()
    };
    let server = EtcdServer::start_secured(EtcdVersion::V3_5, &security).await?;
    let port = server.port();
    let shown = format!("etcd://root:***@127.0.0.1:{port}");
    let expect = refused(
        &shown,
        "authentication failed",
        "check the user name and password in the URL",
    );
    let given = expect.given();
    fails(EtcdDriver::connect(&given), ETCD_BOUND, &expect).await?;
    fails(dlock::connect(&given), ETCD_BOUND, &expect).await?;
    let shown = format!("etcd://127.0.0.1:{port}");
    let expect = refused(
        &shown,
        "the server requires a user name and password, and the URL gives none",
        "put them in the URL: etcd://USER:PASSWORD@HOST:PORT",
    );
    fails(dlock::connect(&shown), ETCD_BOUND, &expect).await?;

    let shown = format!("etcds://root:***@127.0.0.1:{port}");
    let expect = refused(
        &shown,
        "TLS handshake failed",
        "for one without, write etcd://",
    );
    fails(
        dlock::connect(&format!("etcds://root:right@127.0.0.1:{port}")),
        ETCD_BOUND,
        &expect,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_connect_errors_name_the_url_the_cause_and_what_to_do() -> Result<()> {
    let malformed = [
        url(
            "nats://app:***@127.0.0.1:42x",
            "invalid port \"42x\"",
            "ports are 1 to 65535",
        ),
        url(
            "nats://app:***@127.0.0.1:4222?replicas=x",
            "replicas=\"x\" is not a number",
            "use 1 to 5",
        ),
        url(
            "nats://***@127.0.0.1:4222?colour=red",
            "unknown parameter \"colour\"",
            "known: stream",
        ),
    ];
    for expect in &malformed {
        let given = expect.given();
        fails(JetStreamDriver::connect(&given), AT_ONCE, expect).await?;
        fails(dlock::connect(&given), AT_ONCE, expect).await?;
    }
    let scheme = url(
        "natsx://app:***@127.0.0.1:4222",
        "scheme \"natsx\" is not for NATS",
        "use nats:// or tls://",
    );
    fails(JetStreamDriver::connect(&scheme.given()), AT_ONCE, &scheme).await?;

    let closed = free_port()?;
    let shown = format!("nats://app:***@127.0.0.1:{closed}?timeout_ms=2000");
    let cause = format!("connection refused at 127.0.0.1:{closed}");
    let expect = refused(
        &shown,
        &cause,
        "check that nats-server is running there and that the URL's hosts and ports are right",
    );
    let given = expect.given();
    fails(JetStreamDriver::connect(&given), NATS_BOUND, &expect).await?;
    fails(dlock::connect(&given), NATS_BOUND, &expect).await?;

    let (_listener, silent) = silent_port()?;
    let shown = format!("nats://127.0.0.1:{silent}?timeout_ms=2000");
    let cause = format!("no answer from 127.0.0.1:{silent} within 2s");
    let expect = refused(&shown, &cause, "?timeout_ms=N waits longer");
    fails(dlock::connect(&shown), NATS_BOUND, &expect).await?;

    if !harness::require(Backend::Nats) {
        return Ok(());
    }
    let server =
        NatsServer::start_with(NatsVersion::V2_11Plus, &NatsOptions::user("app", "right")).await?;
    let port = server.port();
    let shown = format!("nats://app:***@127.0.0.1:{port}?timeout_ms=2000");
    let expect = refused(
        &shown,
        "authentication failed",
        "check the user name and password in the URL",
    );
    let given = expect.given();
    fails(JetStreamDriver::connect(&given), NATS_BOUND, &expect).await?;
    fails(dlock::connect(&given), NATS_BOUND, &expect).await?;
    let shown = format!("nats://127.0.0.1:{port}?timeout_ms=2000");
    let expect = refused(
        &shown,
        "the server requires credentials and the URL gives none",
        "put them in the URL",
    );
    fails(dlock::connect(&shown), NATS_BOUND, &expect).await?;

    let shown = format!("tls://app:***@127.0.0.1:{port}?timeout_ms=2000");
    let expect = refused(&shown, "TLS handshake", "for one without, use nats://");
    fails(
        dlock::connect(&format!("tls://app:right@127.0.0.1:{port}?timeout_ms=2000")),
        NATS_BOUND,
        &expect,
    )
    .await?;

    let private = NatsServer::start_with(NatsVersion::V2_11Plus, &NatsOptions::tls()).await?;
    let shown = format!("tls://127.0.0.1:{}?timeout_ms=2000", private.port());
    let expect = refused(&shown, "invalid peer certificate", "check ca=");
    fails(dlock::connect(&shown), NATS_BOUND, &expect).await?;

    let token = NatsServer::start_with(NatsVersion::V2_9, &NatsOptions::token("right")).await?;
    let shown = format!("nats://***@127.0.0.1:{}?timeout_ms=2000", token.port());
    let expect = refused(
        &shown,
        "authentication failed: the server refused the token",
        "check the token in the URL",
    );
    fails(dlock::connect(&expect.given()), NATS_BOUND, &expect).await
}

/// A quorum URL's errors name the member at fault; none needs a server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_connect_errors_name_the_member_at_fault() -> Result<()> {
    for expect in [
        url(
            "quorum:mem://qa;mem://qb",
            "a quorum of 2 members",
            "list an odd number of stores, at least three",
        ),
        url(
            "quorum:mem://qa;;redis://:***@127.0.0.1:1",
            "separated by ';'",
            "quorum:redis://10.0.0.1:6379;",
        ),
        url(
            "quorum:mem://qa;quorum:mem://qb;redis://:***@127.0.0.1:1",
            "separated by ';'",
            "a member cannot itself be a quorum",
        ),
    ] {
        fails(dlock::connect(&expect.given()), AT_ONCE, &expect).await?;
    }
    let expect = url(
        "redis://:***@127.0.0.1:x",
        "quorum member 2 of 3: invalid port \"x\"",
        "ports are 1 to 65535",
    );
    fails(
        dlock::connect("quorum:mem://qa;redis://:s3cret@127.0.0.1:x;mem://qb"),
        AT_ONCE,
        &expect,
    )
    .await?;

    let closed = free_port()?;
    let shown = format!("redis://:***@127.0.0.1:{closed}");
    let cause = format!(
        "quorum member 3 of 3: connection refused: nothing is listening on 127.0.0.1:{closed}"
    );
    let expect = refused(
        &shown,
        &cause,
        "(a quorum connects to every member before it returns)",
    );
    fails(
        dlock::connect(&format!(
            "quorum:mem://qa;mem://qb;redis://:{SECRET}@127.0.0.1:{closed}"
        )),
        REDIS_BOUND,
        &expect,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_unknown_urls_say_how_to_write_them() -> Result<()> {
    for expect in [
        url(
            "mem://a/b",
            "in-memory store name \"a/b\"",
            "as in mem://NAME",
        ),
        url(
            "mem://a?shared=1",
            "in-memory store name \"a?shared=1\"",
            "as in mem://NAME",
        ),
        url("mem:", "expected SCHEME://", "for example mem://"),
        url(
            "zk://app:***@127.0.0.1:2181",
            "unknown scheme \"zk\"",
            "or quorum:URL;URL;URL",
        ),
        url(
            "app:***@127.0.0.1:6379",
            "expected SCHEME://",
            "redis://127.0.0.1:6379",
        ),
    ] {
        fails(dlock::connect(&expect.given()), AT_ONCE, &expect).await?;
    }
    Ok(())
}
