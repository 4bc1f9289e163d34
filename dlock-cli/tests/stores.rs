//! The `dlock` binary against real Redis, etcd and NATS JetStream servers started by the harness
//! (one single server each: Redis 7, etcd 3.5, NATS 2.11+). Every case runs on every store.
//!
//! The commands run under the lock append stamps to a log and wait for a "go" file, so the tests
//! decide when a holder finishes and check who was inside when: nothing here sleeps in place of an
//! event. The only timing claim is the kill -9 bound (TTL + 1 s).

mod common;

use std::future::IntoFuture;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use dlock::{LockMode, Locks};
use dlock_tests::harness::etcd::EtcdSecurity;
use dlock_tests::harness::{
    self, Backend, EtcdServer, EtcdVersion, NatsOptions, NatsServer, NatsVersion, RedisServer,
};
use tokio::time::Instant;

use common::*;

/// A running store and how to reach it.
enum Server {
    Redis(RedisServer),
    Etcd(EtcdServer),
    Nats(NatsServer),
}

struct Store {
    server: Server,
    url: String,
}

impl Store {
    async fn start(backend: Backend) -> Result<Store> {
        let server = match backend {
            Backend::Redis => Server::Redis(RedisServer::start().await?),
            Backend::Etcd => Server::Etcd(EtcdServer::start(EtcdVersion::V3_5).await?),
            Backend::Nats => Server::Nats(NatsServer::start(NatsVersion::V2_11Plus).await?),
        };
        let url = match &server {
            Server::Redis(s) => s.url(),
            Server::Etcd(s) => format!("etcd://127.0.0.1:{}", s.port()),
            Server::Nats(s) => s.url(),
        };
        Ok(Store { server, url })
    }

    /// A short lease that every store accepts (etcd's minimum is 2 s, JetStream's 1 s).
    fn short_ttl(&self) -> Duration {
        Duration::from_secs(2)
    }

    fn short_ttl_arg(&self) -> String {
        format!("{}s", self.short_ttl().as_secs())
    }

    fn pause(&self) -> Result<()> {
        match &self.server {
            Server::Redis(s) => s.pause(),
            Server::Etcd(s) => s.pause(),
            Server::Nats(s) => s.pause(),
        }
    }

    fn resume(&self) -> Result<()> {
        match &self.server {
            Server::Redis(s) => s.resume(),
            Server::Etcd(s) => s.resume(),
            Server::Nats(s) => s.resume(),
        }
    }

    /// What `dlock check` prints as the server.
    fn server_prefix(&self) -> &'static str {
        match &self.server {
            Server::Redis(_) => "Redis 7.",
            Server::Etcd(_) => "etcd 3.5.",
            Server::Nats(_) => "NATS 2.",
        }
    }

    fn driver(&self) -> &'static str {
        match &self.server {
            Server::Redis(_) => "redis",
            Server::Etcd(_) => "etcd",
            Server::Nats(_) => "jetstream",
        }
    }

    async fn client(&self) -> Result<Locks> {
        Ok(dlock::connect(&self.url).await?)
    }
}

/// Waits until `name`'s queue has `n` entries.
async fn queued(locks: &Locks, name: &str, n: usize) -> Result<()> {
    until(&format!("{n} entries queued on {name:?}"), || async {
        Ok(locks.inspect(name).await?.len() == n)
    })
    .await
}

// ---- the cases ----

/// Two EX `dlock exec` on one name: the second waits in the queue, and starts only after the first
/// ended; each command saw its lock in its environment, and the second's token is higher.
async fn exclusive_execs_never_overlap(store: &Store) -> Result<()> {
    let scene = Scene::new()?;
    let locks = store.client().await?;
    let a = scene.exec(&store.url, "A", &["jobs/nightly"], OnSignal::Default)?;
    scene.wait_for("start", 1).await?;
    let b = scene.exec(&store.url, "B", &["jobs/nightly"], OnSignal::Default)?;
    queued(&locks, "jobs/nightly", 2).await?;
    let queue = locks.inspect("jobs/nightly").await?;
    ensure!(
        queue[0].granted && !queue[1].granted,
        "the second exec should wait: {queue:?}"
    );
    ensure!(
        scene.stamps("start")?.len() == 1,
        "the second command started while the first held the lock: {:?}",
        scene.lines()?
    );
    scene.release_commands()?;
    let (a, b) = (finish(a).await?, finish(b).await?);
    ensure!(code(&a) == 0 && code(&b) == 0, "exit statuses: {a:?} {b:?}");
    let words: Vec<String> = scene
        .lines()?
        .iter()
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    ensure!(
        words == ["start A", "end A", "start B", "end B"],
        "the commands overlapped: {:?}",
        scene.lines()?
    );
    let starts = scene.stamps("start")?;
    for s in starts.iter().chain(&scene.stamps("end")?) {
        ensure!(
            s.name == "jobs/nightly" && s.mode == "EX",
            "environment: {s:?}"
        );
    }
    ensure!(
        starts[1].token > starts[0].token,
        "tokens must grow: {starts:?}"
    );
    ensure!(locks.inspect("jobs/nightly").await?.is_empty());
    Ok(())
}

/// Two PR `dlock exec` on one name are inside at once.
async fn protected_readers_overlap(store: &Store) -> Result<()> {
    let scene = Scene::new()?;
    let a = scene.exec(
        &store.url,
        "A",
        &["shared", "--mode", "PR"],
        OnSignal::Default,
    )?;
    let b = scene.exec(
        &store.url,
        "B",
        &["shared", "-m", "protected-read"],
        OnSignal::Default,
    )?;
    // Neither can finish before the go file exists, so two starts mean both held the lock at once.
    scene.wait_for("start", 2).await?;
    ensure!(scene.stamps("end")?.is_empty());
    scene.release_commands()?;
    let (a, b) = (finish(a).await?, finish(b).await?);
    ensure!(code(&a) == 0 && code(&b) == 0, "{a:?} {b:?}");
    ensure!(scene.stamps("start")?.iter().all(|s| s.mode == "PR"));
    Ok(())
}

/// On a held name, `--no-wait` exits with the busy status and `--timeout` with the timeout status,
/// without running the command, and the timed-out request leaves nothing queued.
async fn no_wait_is_busy_and_timeout_times_out(store: &Store) -> Result<()> {
    let scene = Scene::new()?;
    let locks = store.client().await?;
    let holder = locks.lock("held").mode(LockMode::PW).await?;
    let ran = scene.path("ran");
    let ran_arg = ran.to_str().context("temp path")?;

    let busy = run(&[
        "--url",
        &store.url,
        "exec",
        "held",
        "--no-wait",
        "--",
        "touch",
        ran_arg,
    ])
    .await?;
    ensure!(code(&busy) == 75, "--no-wait: {busy:?}");
    let line = one_line_error(&busy)?;
    ensure!(line.contains("busy") && line.contains("\"held\""), "{line}");

    let timed_out = run(&[
        "--url",
        &store.url,
        "exec",
        "held",
        "--timeout",
        "1500ms",
        "--",
        "touch",
        ran_arg,
    ])
    .await?;
    ensure!(code(&timed_out) == 76, "--timeout: {timed_out:?}");
    let line = one_line_error(&timed_out)?;
    ensure!(line.contains("timed out"), "{line}");
    ensure!(!exists(&ran), "the command ran without the lock");
    // dlock removed its queue entry before exiting: only the holder is left.
    let queue = locks.inspect("held").await?;
    ensure!(queue.len() == 1 && queue[0].granted, "{queue:?}");

    // A compatible mode is not busy.
    let reader = run(&[
        "--url",
        &store.url,
        "exec",
        "held",
        "--no-wait",
        "--mode",
        "CR",
        "--",
        "touch",
        ran_arg,
    ])
    .await?;
    ensure!(code(&reader) == 0, "CR beside PW: {reader:?}");
    ensure!(exists(&ran));
    holder.release().await?;
    Ok(())
}

/// SIGTERM to a `dlock exec` that waits in line: it gives up with 128 + 15 without running the
/// command, and its queue entry is gone when it exits.
async fn a_signal_while_waiting_gives_up_and_leaves_nothing_queued(store: &Store) -> Result<()> {
    let scene = Scene::new()?;
    let locks = store.client().await?;
    let holder = locks.lock("waiting").await?;
    let ran = scene.path("ran");
    let waiter = dlock()
        .env("DLOCK_URL", &store.url)
        .args(["exec", "waiting", "--"])
        .arg("touch")
        .arg(&ran)
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    queued(&locks, "waiting", 2).await?;
    let pid = waiter.id().context("dlock's pid")? as i32;
    // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child's.
    ensure!(unsafe { libc::kill(pid, libc::SIGTERM) } == 0);
    let out = finish(waiter).await?;
    ensure!(code(&out) == 128 + 15, "{out:?}");
    let line = one_line_error(&out)?;
    ensure!(
        line.contains("SIGTERM") && line.contains("waiting"),
        "{line}"
    );
    ensure!(!exists(&ran), "the command ran without the lock");
    let queue = locks.inspect("waiting").await?;
    ensure!(queue.len() == 1 && queue[0].granted, "{queue:?}");
    holder.release().await?;
    Ok(())
}

/// `kill -9` of a `dlock exec`: its command dies with it, and a waiter is granted within TTL + 1 s.
async fn kill_9_frees_the_lock_within_ttl_and_stops_the_command(store: &Store) -> Result<()> {
    let scene = Scene::new()?;
    let ttl = store.short_ttl();
    let locks = store.client().await?;
    let mut holder = scene.exec(
        &store.url,
        "A",
        &["crash", "--ttl", &store.short_ttl_arg()],
        OnSignal::Default,
    )?;
    scene.wait_for("start", 1).await?;
    let started = scene.stamps("start")?.remove(0);
    let waiter = tokio::spawn(locks.lock("crash").ttl(ttl).into_future());
    queued(&locks, "crash", 2).await?;
    holder.start_kill()?;
    let killed_at = Instant::now();
    holder.wait().await?;
    let guard = tokio::time::timeout(HANG, waiter)
        .await
        .context("the waiter is never granted")???;
    let waited = killed_at.elapsed();
    ensure!(
        waited <= ttl + Duration::from_secs(1),
        "granted {waited:?} after kill -9; the bound is TTL ({ttl:?}) + 1 s"
    );
    ensure!(guard.fencing_token() > started.token);
    until("the command dies with dlock", || async {
        Ok(process_gone(started.pid))
    })
    .await?;
    ensure!(scene.stamps("end")?.is_empty());
    guard.release().await?;
    Ok(())
}

/// SIGTERM to `dlock exec` reaches the command; dlock exits with the command's status and has
/// released the lock when it exits (the lease, 60 s, cannot explain it).
async fn sigterm_reaches_the_command_and_releases_at_once(store: &Store) -> Result<()> {
    let scene = Scene::new()?;
    let locks = store.client().await?;
    let holder = scene.exec(
        &store.url,
        "A",
        &["term", "--ttl", "60s"],
        OnSignal::LogAndExit("TERM"),
    )?;
    scene.wait_for("start", 1).await?;
    let waiter = tokio::spawn(locks.lock("term").into_future());
    queued(&locks, "term", 2).await?;
    let pid = holder.id().context("dlock's pid")? as i32;
    // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child's.
    ensure!(unsafe { libc::kill(pid, libc::SIGTERM) } == 0);
    let out = finish(holder).await?;
    let queue = locks.inspect("term").await?;
    ensure!(
        code(&out) == 143,
        "dlock passes on the command's status: {out:?}"
    );
    ensure!(
        scene.stamps("term")?.len() == 1,
        "the command did not get SIGTERM: {:?}",
        scene.lines()?
    );
    // Before the signal the queue held dlock's entry and the waiter's; the waiter cannot have left.
    ensure!(
        queue.len() == 1,
        "dlock's entry is still queued after it exited: {queue:?}"
    );
    let guard = tokio::time::timeout(HANG, waiter)
        .await
        .context("the waiter is never granted")???;
    guard.release().await?;
    Ok(())
}

/// With the store frozen past the TTL the lock is lost: the command gets SIGTERM and dlock exits with
/// the lost status.
async fn a_lost_lease_stops_the_command_with_the_lost_status(store: &Store) -> Result<()> {
    let scene = Scene::new()?;
    let holder = scene.exec(
        &store.url,
        "A",
        &["lost", "--ttl", &store.short_ttl_arg()],
        OnSignal::LogAndExit("TERM"),
    )?;
    scene.wait_for("start", 1).await?;
    store.pause()?;
    let out = finish(holder).await;
    store.resume()?;
    let out = out?;
    ensure!(code(&out) == 77, "expected the lost status: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("lost lock \"lost\"") && err.contains("SIGTERM"),
        "{err}"
    );
    ensure!(scene.stamps("term")?.len() == 1, "{:?}", scene.lines()?);
    ensure!(scene.stamps("end")?.is_empty());
    Ok(())
}

/// A command that ignores the configured signal is killed after the grace period.
async fn a_command_that_ignores_the_signal_is_killed_after_the_grace(store: &Store) -> Result<()> {
    let scene = Scene::new()?;
    let holder = scene.exec(
        &store.url,
        "A",
        &[
            "stubborn",
            "--ttl",
            &store.short_ttl_arg(),
            "--signal",
            "INT",
            "--grace",
            "500ms",
        ],
        OnSignal::LogAndIgnore("INT"),
    )?;
    scene.wait_for("start", 1).await?;
    let pid = scene.stamps("start")?[0].pid;
    store.pause()?;
    let out = finish(holder).await;
    store.resume()?;
    let out = out?;
    ensure!(code(&out) == 77, "expected the lost status: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("SIGINT") && err.contains("SIGKILL"), "{err}");
    ensure!(scene.stamps("int")?.len() == 1, "{:?}", scene.lines()?);
    ensure!(scene.stamps("end")?.is_empty() && process_gone(pid));
    Ok(())
}

/// `status` lists holders, a pending conversion and a waiter, in queue order, with their modes and
/// the holders' fencing tokens, as a table and as JSON; a name nobody uses shows as free.
async fn status_shows_holders_and_waiters(store: &Store) -> Result<()> {
    let (c1, c2, c3) = (
        store.client().await?,
        store.client().await?,
        store.client().await?,
    );
    let mut a = c1.lock("queue").mode(LockMode::PR).await?;
    let b = c2.lock("queue").mode(LockMode::PR).await?;
    let (a_token, b_token) = (a.fencing_token(), b.fencing_token());
    let converting = tokio::spawn(async move {
        let converted = a.convert(LockMode::EX).await;
        (a, converted)
    });
    until("the conversion is pending", || async {
        Ok(c3
            .inspect("queue")
            .await?
            .first()
            .and_then(|e| e.converting_to)
            == Some(LockMode::EX))
    })
    .await?;
    let waiter = tokio::spawn(c3.lock("queue").mode(LockMode::CW).into_future());
    queued(&c3, "queue", 3).await?;

    let out = run(&["--url", &store.url, "status", "queue", "unused"]).await?;
    ensure!(code(&out) == 0, "{out:?}");
    let text = String::from_utf8(out.stdout)?;
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    ensure!(rows.len() == 5 && rows[0][0] == "NAME", "{text}");
    let a_token = a_token.to_string();
    let b_token = b_token.to_string();
    ensure!(
        rows[1][..7] == ["queue", "1", "granted", "PR", "->", "EX", a_token.as_str()],
        "{text}"
    );
    ensure!(
        rows[2][..6] == ["queue", "2", "granted", "PR", "-", b_token.as_str()],
        "{text}"
    );
    ensure!(
        rows[3][..6] == ["queue", "3", "waiting", "CW", "-", "-"],
        "{text}"
    );
    ensure!(rows[4][..3] == ["unused", "-", "free"], "{text}");

    let out = run(&["--url", &store.url, "status", "--json", "queue"]).await?;
    ensure!(code(&out) == 0, "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("status --json")?;
    ensure!(json["driver"] == store.driver(), "{json}");
    let entries = json["locks"][0]["entries"].as_array().context("entries")?;
    ensure!(
        json["locks"][0]["name"] == "queue" && entries.len() == 3,
        "{json}"
    );
    ensure!(
        entries[0]["state"] == "granted" && entries[0]["mode"] == "PR",
        "{json}"
    );
    ensure!(entries[0]["converting_to"] == "EX", "{json}");
    ensure!(
        entries[0]["fencing_token"].as_u64() == Some(a_token.parse()?),
        "{json}"
    );
    ensure!(
        entries[1]["fencing_token"].as_u64() == Some(b_token.parse()?),
        "{json}"
    );
    ensure!(
        entries[2]["state"] == "waiting" && entries[2]["mode"] == "CW",
        "{json}"
    );
    ensure!(entries[2]["fencing_token"].is_null(), "{json}");
    ensure!(entries[2]["position"] == 3, "{json}");

    b.release().await?;
    let (a, converted) = tokio::time::timeout(HANG, converting).await??;
    converted?;
    a.release().await?;
    tokio::time::timeout(HANG, waiter)
        .await???
        .release()
        .await?;
    Ok(())
}

/// `check` names the driver, the server version and the capabilities, and times a lock.
async fn check_reports_the_store(store: &Store) -> Result<()> {
    let out = run(&["--url", &store.url, "check"]).await?;
    ensure!(code(&out) == 0, "{out:?}");
    let text = String::from_utf8(out.stdout)?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).map(str::trim))
            .map(str::to_owned)
    };
    ensure!(field("driver").as_deref() == Some(store.driver()), "{text}");
    ensure!(
        field("server").is_some_and(|s| s.starts_with(store.server_prefix())),
        "{text}"
    );
    ensure!(
        field("modes").as_deref() == Some("NL CR CW PR PW EX"),
        "{text}"
    );
    ensure!(
        field("shared between processes").as_deref() == Some("yes"),
        "{text}"
    );
    ensure!(
        field("acquire").is_some_and(|s| s.contains("fencing token")),
        "{text}"
    );
    ensure!(field("check").as_deref() == Some("ok"), "{text}");
    Ok(())
}

/// `check` with a wrong password fails with the unavailable status and one line that says so.
async fn check_fails_cleanly_on_wrong_credentials(backend: Backend) -> Result<()> {
    let (url, _server): (String, Box<dyn std::any::Any>) = match backend {
        Backend::Redis => {
            let s = RedisServer::builder().password("right").start().await?;
            (
                format!("redis://:wrong@127.0.0.1:{}", s.port()),
                Box::new(s),
            )
        }
        Backend::Etcd => {
            let security = EtcdSecurity {
                auth: Some(("root".into(), "right".into())),
                ..EtcdSecurity::default()
            };
            let s = EtcdServer::start_secured(EtcdVersion::V3_5, &security).await?;
            (
                format!("etcd://root:wrong@127.0.0.1:{}", s.port()),
                Box::new(s),
            )
        }
        Backend::Nats => {
            let s =
                NatsServer::start_with(NatsVersion::V2_11Plus, &NatsOptions::user("app", "right"))
                    .await?;
            (
                format!("nats://app:wrong@127.0.0.1:{}", s.port()),
                Box::new(s),
            )
        }
    };
    let out = run(&["--url", &url, "check"]).await?;
    ensure!(code(&out) == 69, "{out:?}");
    let line = one_line_error(&out)?;
    ensure!(line.contains("authentication failed"), "{line}");
    ensure!(
        !line.contains("wrong"),
        "the password leaked into the message: {line}"
    );
    ensure!(out.stdout.is_empty(), "{out:?}");
    Ok(())
}

/// Stamps every case out once per store, each its own named test.
macro_rules! on_every_store {
    (on_a_server: [$($case:ident),* $(,)?], own_servers: [$($own:ident),* $(,)?]) => {
        on_every_store!(@store redis, Backend::Redis, [$($case),*], [$($own),*]);
        on_every_store!(@store etcd, Backend::Etcd, [$($case),*], [$($own),*]);
        on_every_store!(@store jetstream, Backend::Nats, [$($case),*], [$($own),*]);
    };
    (@store $module:ident, $backend:expr, [$($case:ident),*], [$($own:ident),*]) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> Result<()> {
                    if !harness::require($backend) {
                        return Ok(());
                    }
                    let store = Store::start($backend).await?;
                    super::$case(&store).await
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $own() -> Result<()> {
                    if !harness::require($backend) {
                        return Ok(());
                    }
                    super::$own($backend).await
                }
            )*
        }
    };
}

on_every_store!(
    on_a_server: [
        exclusive_execs_never_overlap,
        protected_readers_overlap,
        no_wait_is_busy_and_timeout_times_out,
        a_signal_while_waiting_gives_up_and_leaves_nothing_queued,
        kill_9_frees_the_lock_within_ttl_and_stops_the_command,
        sigterm_reaches_the_command_and_releases_at_once,
        a_lost_lease_stops_the_command_with_the_lost_status,
        a_command_that_ignores_the_signal_is_killed_after_the_grace,
        status_shows_holders_and_waiters,
        check_reports_the_store,
    ],
    own_servers: [check_fails_cleanly_on_wrong_credentials]
);
