//! The conformance cases. Each takes the factory of the driver under test and returns an error that
//! says what broke.

use std::future::IntoFuture;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use dlock::lease::drift_margin;
use dlock::{Error, Guard, LeaseState, LockMode, LockName, Locks};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::lost_replies::{Call, LostReply, ReplyFaults};
use super::{within, Factory};
use crate::history;

/// A hang guard for steps that should finish promptly; never a speed assertion.
const HANG: Duration = Duration::from_secs(30);
/// A TTL long enough that a lock freed within [`HANG`] was freed by a release, not by expiry.
const LONG_TTL: Duration = Duration::from_secs(120);

static HOLDER_BINARY: OnceLock<String> = OnceLock::new();

/// Tells the crash case where the out-of-process holder binary is (the stamped tests know it through
/// `env!("CARGO_BIN_EXE_dlock-holder")`, which only integration tests can see).
pub fn set_holder_binary(path: &str) {
    let _ = HOLDER_BINARY.set(path.to_owned());
}

async fn queue(locks: &Locks, name: &str) -> Result<Vec<dlock::EntryInfo>> {
    Ok(locks.inspect(name).await?)
}

/// Polls the store until `pred` holds for `name`'s queue. Queue changes have no signal a test can
/// subscribe to across drivers, so this is a bounded poll.
async fn queue_until(
    locks: &Locks,
    name: &str,
    what: &str,
    pred: impl Fn(&[dlock::EntryInfo]) -> bool,
) -> Result<Vec<dlock::EntryInfo>> {
    let give_up = Instant::now() + HANG;
    loop {
        let entries = queue(locks, name).await?;
        if pred(&entries) {
            return Ok(entries);
        }
        if Instant::now() >= give_up {
            bail!("queue of {name:?} never reached: {what}; last seen {entries:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn modes<F: Factory>(f: &F) -> Vec<LockMode> {
    f.capabilities().modes
}

/// Compatible pairs coexist; incompatible pairs block until the holder leaves — all 36 pairs, across
/// two clients.
pub async fn mode_pairs_coexist_or_block_per_the_matrix<F: Factory>(f: &F) -> Result<()> {
    let (a, b) = (f.client().await?, f.client().await?);
    let mut checked = 0;
    for held_mode in modes(f) {
        for asked in modes(f) {
            let name = format!("pair/{held_mode}/{asked}");
            let held = a.lock(&name).mode(held_mode).ttl(LONG_TTL).await?;
            if held_mode.compatible_with(asked) {
                let second = b
                    .lock(&name)
                    .mode(asked)
                    .try_acquire()
                    .await
                    .with_context(|| format!("{asked} must coexist with a held {held_mode}"))?;
                second.release().await?;
                held.release().await?;
            } else {
                let err = b.lock(&name).mode(asked).try_acquire().await.err();
                ensure!(
                    err.as_ref().is_some_and(Error::is_would_block),
                    "{asked} must not coexist with a held {held_mode}, got {err:?}"
                );
                let waiter = tokio::spawn(b.lock(&name).mode(asked).ttl(LONG_TTL).into_future());
                queue_until(&a, &name, "the blocked request is queued", |q| q.len() == 2).await?;
                ensure!(
                    !waiter.is_finished(),
                    "{asked} was granted beside {held_mode}"
                );
                held.release().await?;
                let granted = within(HANG, "the blocked request is granted after release", waiter)
                    .await??
                    .with_context(|| format!("{asked} after {held_mode} left"))?;
                granted.release().await?;
            }
            checked += 1;
        }
    }
    ensure!(checked == 36, "checked {checked} pairs");
    Ok(())
}

/// The queue `[EX, PR, PR, PR, EX, EX, PR, PR]` is granted in the steps `{0}`, `{1,2,3}`, `{4}`, `{5}`,
/// `{6,7}` as holders release in order.
pub async fn fifo_grants_ex_pr_sequence_in_steps<F: Factory>(f: &F) -> Result<()> {
    use LockMode::*;
    let clients = [f.client().await?, f.client().await?];
    let sequence = [EX, PR, PR, PR, EX, EX, PR, PR];
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (i, mode) in sequence.into_iter().enumerate() {
        let (locks, tx) = (clients[i % 2].clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let guard = locks.lock("fifo").mode(mode).ttl(LONG_TTL).await;
            let _ = tx.send((i, guard));
        }));
        // Wait for each entry to be queued so the arrival order is the listed order.
        queue_until(&clients[0], "fifo", "the next request is queued", |q| {
            q.len() == i + 1
        })
        .await?;
    }
    let steps: [&[usize]; 5] = [&[0], &[1, 2, 3], &[4], &[5], &[6, 7]];
    for step in steps {
        let mut got = Vec::new();
        let mut guards: Vec<Guard> = Vec::new();
        while got.len() < step.len() {
            let (i, guard) = within(HANG, "the next grant step", rx.recv())
                .await?
                .context("all requests finished early")?;
            got.push(i);
            guards.push(guard.with_context(|| format!("request {i}"))?);
        }
        got.sort_unstable();
        ensure!(got == step, "granted {got:?}, expected {step:?}");
        let granted = queue(&clients[0], "fifo")
            .await?
            .iter()
            .filter(|e| e.granted)
            .count();
        ensure!(
            granted == step.len(),
            "{granted} granted in the store during step {step:?}"
        );
        for guard in guards {
            guard.release().await?;
        }
    }
    for task in tasks {
        task.await?;
    }
    Ok(())
}

/// `try_acquire` on a conflicting lock fails with `WouldBlock` and queues nothing.
pub async fn try_acquire_would_block_leaves_nothing_queued<F: Factory>(f: &F) -> Result<()> {
    let (a, b) = (f.client().await?, f.client().await?);
    let held = a.lock("try").mode(LockMode::PW).ttl(LONG_TTL).await?;
    for mode in [LockMode::CW, LockMode::PR, LockMode::PW, LockMode::EX] {
        let err = b.lock("try").mode(mode).try_acquire().await.err();
        ensure!(
            err.as_ref().is_some_and(Error::is_would_block),
            "{mode}: {err:?}"
        );
    }
    let entries = queue(&a, "try").await?;
    ensure!(
        entries.len() == 1,
        "try_acquire left entries behind: {entries:?}"
    );
    b.lock("try")
        .mode(LockMode::CR)
        .try_acquire()
        .await?
        .release()
        .await?;
    held.release().await?;
    b.lock("try").try_acquire().await?.release().await?;
    Ok(())
}

/// A blocking acquire with a timeout fails with `Timeout` and its entry leaves the queue.
pub async fn blocking_acquire_times_out_and_leaves_the_queue<F: Factory>(f: &F) -> Result<()> {
    let (a, b) = (f.client().await?, f.client().await?);
    let held = a.lock("timeout").ttl(LONG_TTL).await?;
    let err = b
        .lock("timeout")
        .ttl(LONG_TTL)
        .timeout(Duration::from_millis(200))
        .await
        .err();
    ensure!(
        err.as_ref().is_some_and(Error::is_timeout),
        "expected Timeout, got {err:?}"
    );
    queue_until(&a, "timeout", "the timed-out entry leaves", |q| {
        q.len() == 1
    })
    .await?;
    held.release().await?;
    Ok(())
}

/// Dropping a waiting acquire removes its entry, so the next waiter is granted without waiting for the
/// ghost's lease.
pub async fn cancelled_acquire_leaves_the_queue<F: Factory>(f: &F) -> Result<()> {
    let (a, b, c) = (f.client().await?, f.client().await?, f.client().await?);
    let held = a.lock("cancel").ttl(LONG_TTL).await?;
    let cancelled = tokio::spawn(b.lock("cancel").ttl(LONG_TTL).into_future());
    queue_until(&a, "cancel", "the doomed request is queued", |q| {
        q.len() == 2
    })
    .await?;
    cancelled.abort();
    queue_until(&a, "cancel", "the cancelled entry leaves", |q| q.len() == 1).await?;
    let next = tokio::spawn(c.lock("cancel").ttl(LONG_TTL).into_future());
    queue_until(&a, "cancel", "the next request is queued", |q| q.len() == 2).await?;
    held.release().await?;
    within(
        HANG,
        "the next waiter is granted (a ghost would hold it for LONG_TTL)",
        next,
    )
    .await???
    .release()
    .await?;
    Ok(())
}

/// Dropping a guard releases the lock (well before its lease could run out).
pub async fn dropping_a_guard_releases_the_lock<F: Factory>(f: &F) -> Result<()> {
    let (a, b) = (f.client().await?, f.client().await?);
    let held = a.lock("drop").ttl(LONG_TTL).await?;
    let waiter = tokio::spawn(b.lock("drop").ttl(LONG_TTL).into_future());
    queue_until(&a, "drop", "the waiter is queued", |q| q.len() == 2).await?;
    drop(held);
    within(HANG, "the waiter is granted after the drop", waiter).await???;
    Ok(())
}

/// Releasing an entry twice (and again after someone else holds the lock) succeeds and harms nobody.
pub async fn release_twice_is_harmless<F: Factory>(f: &F) -> Result<()> {
    let (a, b) = (f.client().await?, f.client().await?);
    let guard = a.lock("twice").ttl(LONG_TTL).await?;
    let key = guard.entry_key().clone();
    guard.release().await?;
    a.driver().release(&key).await?;
    let next = b.lock("twice").ttl(LONG_TTL).try_acquire().await?;
    a.driver().release(&key).await?;
    // A quorum confirms a release once a majority did; a slower member's copy goes a moment later.
    let next_owner = next.entry_key().owner.clone();
    queue_until(
        &a,
        "twice",
        "only the next holder is left, still granted",
        |q| q.len() == 1 && q[0].granted && q[0].owner == next_owner,
    )
    .await
    .with_context(|| {
        format!(
            "a repeated release of {} touched the next holder",
            key.owner
        )
    })?;
    next.release().await?;
    Ok(())
}

/// Fencing tokens strictly increase along conflicting holders, whichever client holds.
pub async fn fencing_tokens_increase_across_holders_and_clients<F: Factory>(f: &F) -> Result<()> {
    let clients = [f.client().await?, f.client().await?, f.client().await?];
    let mut last = 0;
    for round in 0..12 {
        let g = clients[round % 3].lock("fence").ttl(LONG_TTL).await?;
        ensure!(
            g.fencing_token() > last,
            "round {round}: token {} after {last}",
            g.fencing_token()
        );
        last = g.fencing_token();
        g.release().await?;
    }
    let r1 = clients[0].lock("fence").mode(LockMode::PR).await?;
    let r2 = clients[1].lock("fence").mode(LockMode::PR).await?;
    let writer = tokio::spawn(
        clients[2]
            .lock("fence")
            .mode(LockMode::EX)
            .ttl(LONG_TTL)
            .into_future(),
    );
    queue_until(&clients[0], "fence", "the writer is queued", |q| {
        q.len() == 3
    })
    .await?;
    let readers_max = r1.fencing_token().max(r2.fencing_token());
    ensure!(
        r1.fencing_token() > last && r2.fencing_token() > last,
        "readers after writers"
    );
    r1.release().await?;
    r2.release().await?;
    let writer = within(HANG, "the writer is granted", writer).await???;
    ensure!(
        writer.fencing_token() > readers_max,
        "writer token must pass both readers'"
    );
    Ok(())
}

/// The keeper renews the lease: the lock is still held, and still exclusive, after three TTLs.
pub async fn renewal_keeps_the_lock_for_three_ttls<F: Factory>(f: &F) -> Result<()> {
    let (a, b) = (f.client().await?, f.client().await?);
    let ttl = f.short_ttl();
    let guard = a.lock("renew").ttl(ttl).await?;
    // Time passing is what this case tests, so it sleeps.
    tokio::time::sleep(ttl * 3 + ttl / 2).await;
    ensure!(
        guard.is_valid(),
        "lease not valid after 3.5 TTLs: {:?}",
        guard.status()
    );
    ensure!(guard.status().state == LeaseState::Held);
    let err = b.lock("renew").ttl(ttl).try_acquire().await.err();
    ensure!(
        err.as_ref().is_some_and(Error::is_would_block),
        "lock free after 3.5 TTLs: {err:?}"
    );
    guard.release().await?;
    Ok(())
}

/// An out-of-process holder (`dlock-holder`) of `name`, started and past its `HELD` line.
struct Holder {
    process: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    token: u64,
}

impl Holder {
    /// Starts the holder on the factory's URL; with `commands` it also serves `WRITE` on its stdin.
    async fn start<F: Factory>(f: &F, name: &str, ttl: Duration, commands: bool) -> Result<Self> {
        let url = f.url().context("a shared store has a URL")?;
        let binary = HOLDER_BINARY
            .get()
            .context("set_holder_binary was not called")?;
        let mut command = tokio::process::Command::new(binary);
        command
            .args(["--url", &url, "--name", name])
            .args(["--ttl-ms", &ttl.as_millis().to_string()])
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if commands {
            command.arg("--commands").stdin(Stdio::piped());
        }
        let mut process = command.spawn().context("starting the holder process")?;
        let stdout = process.stdout.take().context("holder stdout")?;
        let mut holder = Holder {
            process,
            lines: BufReader::new(stdout).lines(),
            token: 0,
        };
        let line = holder.next_line().await?;
        holder.token = line
            .strip_prefix("HELD ")
            .with_context(|| format!("unexpected holder output {line:?}"))?
            .parse()?;
        Ok(holder)
    }

    async fn next_line(&mut self) -> Result<String> {
        within(HANG, "the holder answers", self.lines.next_line())
            .await??
            .context("the holder exited early")
    }
}

/// A holder in another process killed with SIGKILL: the next waiter is granted within TTL + 1 s.
pub async fn holder_crash_frees_the_lock_within_ttl<F: Factory>(f: &F) -> Result<()> {
    let ttl = f.short_ttl().max(Duration::from_secs(2));
    let holder = Holder::start(f, "crash", ttl, false).await?;
    let holder_token = holder.token;
    let mut holder = holder.process;
    let b = f.client().await?;
    let waiter = tokio::spawn(b.lock("crash").ttl(ttl).into_future());
    queue_until(&b, "crash", "the waiter is queued", |q| q.len() == 2).await?;
    holder.start_kill()?;
    let killed_at = Instant::now();
    holder.wait().await?;
    let guard = within(HANG, "the waiter is granted after the crash", waiter).await???;
    let waited = killed_at.elapsed();
    ensure!(
        waited <= ttl + Duration::from_secs(1),
        "granted {waited:?} after the crash; the guarantee is TTL ({ttl:?}) + 1 s"
    );
    ensure!(guard.fencing_token() > holder_token);
    Ok(())
}

/// A holder cut off from the store sees `lost()` before its lease ends in the store, and nobody else is
/// granted before the holder's validity ends.
pub async fn partitioned_holder_loses_before_anyone_else_is_granted<F: Factory>(
    f: &F,
) -> Result<()> {
    let ttl = f.short_ttl();
    let (cut_client, link) = f.partitionable_client().await?;
    let b = f.client().await?;
    let guard = cut_client.lock("partition").ttl(ttl).await?;
    let waiter = tokio::spawn({
        let b = b.clone();
        async move {
            let g = b.lock("partition").ttl(ttl).await;
            (Instant::now(), g)
        }
    });
    queue_until(&b, "partition", "the waiter is queued", |q| q.len() == 2).await?;
    link.set_cut(true);
    within(HANG, "the cut-off holder sees lost()", guard.lost()).await?;
    let lost_at = Instant::now();
    let status = guard.status();
    ensure!(status.state == LeaseState::Lost && !guard.is_valid());
    ensure!(
        lost_at < status.valid_until + drift_margin(ttl),
        "lost() fired at {lost_at:?}, after the store's earliest expiry {:?}",
        status.valid_until + drift_margin(ttl)
    );
    let (granted_at, next) = within(HANG, "the waiter is granted", waiter).await??;
    let next = next?;
    ensure!(
        lost_at < granted_at,
        "the waiter was granted before the holder knew it lost"
    );
    ensure!(
        status.valid_until <= granted_at,
        "the waiter was granted inside the holder's validity window"
    );
    ensure!(next.fencing_token() > guard.fencing_token());
    link.set_cut(false);
    Ok(())
}

/// A frozen store (SIGSTOP): the holder's `lost()` fires before its TTL ends; after the store thaws,
/// nobody is granted inside the holder's validity window.
pub async fn paused_store_makes_the_holder_lose_before_its_lease_ends<F: Factory>(
    f: &F,
) -> Result<()> {
    let faults = f.faults().context("store faults")?;
    let ttl = f.short_ttl();
    let a = f.client().await?;
    let guard = a.lock("paused").ttl(ttl).await?;
    faults.pause()?;
    let lost = within(
        HANG,
        "the holder sees lost() while the store is frozen",
        guard.lost(),
    )
    .await;
    let lost_at = Instant::now();
    faults.resume()?;
    lost?;
    let status = guard.status();
    ensure!(
        lost_at < status.valid_until + drift_margin(ttl),
        "lost() fired after the holder's TTL ended"
    );
    let b = f.client().await?;
    let next = within(
        HANG,
        "a new holder after the store thaws",
        b.lock("paused").ttl(ttl),
    )
    .await??;
    ensure!(status.valid_until <= Instant::now());
    ensure!(next.fencing_token() > guard.fencing_token());
    Ok(())
}

/// A holder whose lease expired releases late: the newer holder keeps its lock.
pub async fn stale_release_after_expiry_never_frees_a_newer_holder<F: Factory>(
    f: &F,
) -> Result<()> {
    let ttl = f.short_ttl();
    let (old_client, link) = f.partitionable_client().await?;
    let b = f.client().await?;
    let old = old_client.lock("stale").ttl(ttl).await?;
    let old_key = old.entry_key().clone();
    link.set_cut(true);
    within(HANG, "the old holder loses its lease", old.lost()).await?;
    let newer = within(HANG, "a newer holder", b.lock("stale").ttl(LONG_TTL)).await??;
    link.set_cut(false);
    // The stale releases: the guard's own, and a retried one through the driver.
    let _ = old.release().await;
    old_client.driver().release(&old_key).await?;
    let entries = queue(&b, "stale").await?;
    ensure!(
        entries.len() == 1 && entries[0].owner == newer.entry_key().owner && entries[0].granted,
        "the stale release touched the newer holder: {entries:?}"
    );
    ensure!(newer.is_valid());
    let err = old_client.lock("stale").try_acquire().await.err();
    ensure!(err.as_ref().is_some_and(Error::is_would_block), "{err:?}");
    Ok(())
}

/// Down-conversion is immediate, up-conversion waits for other holders ahead of new requests, and two
/// up-conversions waiting on each other fail one with `ConversionDeadlock`.
pub async fn conversion_up_down_and_deadlock<F: Factory>(f: &F) -> Result<()> {
    use LockMode::*;
    let (a, b, c) = (f.client().await?, f.client().await?, f.client().await?);
    let mut writer = a.lock("convert").mode(EX).ttl(LONG_TTL).await?;
    let first = writer.fencing_token();
    writer.convert(PR).await?;
    ensure!(writer.mode() == PR && writer.fencing_token() > first);
    let reader = b
        .lock("convert")
        .mode(PR)
        .ttl(LONG_TTL)
        .try_acquire()
        .await?;
    let up = tokio::spawn(async move {
        writer.convert(EX).await?;
        Ok::<_, Error>(writer)
    });
    queue_until(&c, "convert", "the up-conversion is pending", |q| {
        q.iter().any(|e| e.converting_to == Some(EX))
    })
    .await?;
    let err = c.lock("convert").mode(CR).try_acquire().await.err();
    ensure!(
        err.as_ref().is_some_and(Error::is_would_block),
        "a new request passed a pending up-conversion: {err:?}"
    );
    let mut reader = reader;
    let err = reader.convert(PW).await.err();
    ensure!(
        matches!(
            err,
            Some(Error::ConversionDeadlock {
                from: PR,
                to: PW,
                ..
            })
        ),
        "expected ConversionDeadlock, got {err:?}"
    );
    ensure!(reader.mode() == PR);
    let reader_token = reader.fencing_token();
    reader.release().await?;
    let writer = within(HANG, "the up-conversion is granted", up).await???;
    ensure!(writer.mode() == EX && writer.fencing_token() > reader_token);
    writer.release().await?;
    Ok(())
}

/// Names a store could misread are distinct locks.
pub async fn tricky_names_are_distinct_locks<F: Factory>(f: &F) -> Result<()> {
    let (a, b) = (f.client().await?, f.client().await?);
    let long = "k".repeat(LockName::MAX_LEN);
    let names = [
        "a",
        "a*",
        "a.>",
        "a/b",
        "a b",
        "ü",
        "a.b",
        "a%2Fb",
        "{a}",
        long.as_str(),
    ];
    let mut guards = Vec::new();
    for name in names {
        guards.push(
            a.lock(name)
                .ttl(LONG_TTL)
                .try_acquire()
                .await
                .with_context(|| format!("{name:.20?} collided with another name"))?,
        );
    }
    for name in names {
        let err = b.lock(name).try_acquire().await.err();
        ensure!(
            err.as_ref().is_some_and(Error::is_would_block),
            "{name:.20?}: {err:?}"
        );
        let entries = queue(&a, name).await?;
        ensure!(
            entries.len() == 1,
            "{name:.20?} sees {} entries",
            entries.len()
        );
    }
    for guard in guards {
        guard.release().await?;
    }
    Ok(())
}

/// Invalid names are rejected with a clear error and create nothing.
pub async fn invalid_names_are_rejected<F: Factory>(f: &F) -> Result<()> {
    let a = f.client().await?;
    for (name, says) in [
        (String::new(), "must not be empty"),
        ("n".repeat(LockName::MAX_LEN + 1), "limit is 4096 bytes"),
    ] {
        for err in [
            a.lock(&name).await.err(),
            a.lock(&name).try_acquire().await.err(),
        ] {
            let msg = err.as_ref().map(ToString::to_string).unwrap_or_default();
            ensure!(
                matches!(err, Some(Error::InvalidName { .. })) && msg.contains(says),
                "{name:.10?}: {msg}"
            );
        }
    }
    ensure!(queue(&a, &"n".repeat(LockName::MAX_LEN)).await?.is_empty());
    Ok(())
}

/// Several clients incrementing one counter under an `EX` lock never overlap and lose no update.
pub async fn separate_clients_contend_correctly<F: Factory>(f: &F) -> Result<()> {
    const CLIENTS: usize = 4;
    const ROUNDS: usize = 10;
    let counter = Arc::new(tokio::sync::Mutex::new(0usize));
    let inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (locks, counter, inside) = (f.client().await?, counter.clone(), inside.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let guard = locks.lock("counter").ttl(LONG_TTL).await?;
                ensure!(
                    inside.fetch_add(1, Ordering::SeqCst) == 0,
                    "two holders at once"
                );
                let value = *counter.lock().await;
                tokio::task::yield_now().await;
                *counter.lock().await = value + 1;
                inside.fetch_sub(1, Ordering::SeqCst);
                guard.release().await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        within(HANG * 2, "a contending client finishes", task).await???;
    }
    let total = *counter.lock().await;
    ensure!(total == CLIENTS * ROUNDS, "lost updates: {total}");
    Ok(())
}

/// A hundred tasks of one client ask for one name at once, as a new user's first load test does:
/// every one of them gets it, one at a time, none fails or times out.
pub async fn a_hundred_concurrent_acquirers_all_get_the_lock<F: Factory>(f: &F) -> Result<()> {
    const TASKS: usize = 100;
    let locks = f.client().await?;
    let inside = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (locks, inside, start) = (locks.clone(), inside.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let guard = locks.lock("crowd").ttl(LONG_TTL).await?;
            ensure!(
                inside.fetch_add(1, Ordering::SeqCst) == 0,
                "two holders at once"
            );
            tokio::task::yield_now().await;
            inside.fetch_sub(1, Ordering::SeqCst);
            let token = guard.fencing_token();
            guard.release().await?;
            anyhow::Ok(token)
        }));
    }
    let mut tokens = Vec::with_capacity(TASKS);
    for task in tasks {
        tokens.push(within(HANG * 4, "a crowded acquirer finishes", task).await???);
    }
    tokens.sort_unstable();
    tokens.dedup();
    ensure!(
        tokens.len() == TASKS,
        "{} distinct tokens for {TASKS} grants",
        tokens.len()
    );
    ensure!(
        queue(&locks, "crowd").await?.is_empty(),
        "entries left behind"
    );
    Ok(())
}

/// Many clients run thousands of random operations while links are cut and (for servers) the store is
/// paused; the checker finds no incompatible overlap of validity windows and no fencing inversion.
pub async fn history_under_faults_is_linearizable<F: Factory>(f: &F) -> Result<()> {
    history::run(f, history::Workload::default())
        .await?
        .check_and_print()
}

/// A client whose driver loses the replies that `faults` picks, after the store applied the call.
fn losing_replies(locks: &Locks, faults: &Arc<ReplyFaults>) -> Locks {
    Locks::from_arc(Arc::new(super::lost_replies::LostReplies::new(
        Arc::clone(locks.driver()),
        Arc::clone(faults),
    )))
}

/// An enqueue the store applied but whose reply was lost. Reported as an error: the cleanup removes
/// the entry it left (granted, here) long before its lease could run out. Never answered: the
/// acquire times out, and the entry, which no guard renews, is gone within two TTLs.
pub async fn enqueue_with_a_lost_reply_leaves_nothing_queued<F: Factory>(f: &F) -> Result<()> {
    let faults = ReplyFaults::new();
    let a = losing_replies(&f.client().await?, &faults);
    let b = f.client().await?;
    faults.arm(Call::Enqueue, LostReply::Error);
    let err = a.lock("lost/enqueue").ttl(LONG_TTL).await.err();
    ensure!(
        err.as_ref()
            .is_some_and(|e| e.to_string().contains("injected fault")),
        "the acquire must report the lost reply, got {err:?}"
    );
    queue_until(&b, "lost/enqueue", "the ghost entry is removed", |q| {
        q.is_empty()
    })
    .await?;
    b.lock("lost/enqueue")
        .try_acquire()
        .await?
        .release()
        .await?;

    let ttl = f.short_ttl();
    faults.arm(Call::Enqueue, LostReply::Dropped);
    let sent = Instant::now();
    let err = a.lock("lost/enqueue").ttl(ttl).timeout(ttl / 2).await.err();
    ensure!(
        err.as_ref().is_some_and(Error::is_timeout),
        "an unanswered enqueue must time out, got {err:?}"
    );
    let next = within(
        HANG,
        "the ghost of an unanswered enqueue expires",
        b.lock("lost/enqueue").ttl(LONG_TTL),
    )
    .await??;
    let freed_after = sent.elapsed();
    ensure!(
        freed_after <= ttl * 2,
        "the unanswered enqueue's entry held the name for {freed_after:?}; the bound is 2 × TTL ({ttl:?})"
    );
    next.release().await?;
    Ok(())
}

/// Renewals and releases whose replies are lost (as errors, or never answered) are retried: the lock
/// stays held through them, and the release takes effect.
pub async fn renewals_and_releases_with_lost_replies_are_retried<F: Factory>(f: &F) -> Result<()> {
    let ttl = f.short_ttl();
    let faults = ReplyFaults::new();
    let a = losing_replies(&f.client().await?, &faults);
    let b = f.client().await?;
    for reply in [LostReply::Error, LostReply::Dropped] {
        let guard = a.lock("lost/renew").ttl(ttl).await?;
        faults.arm(Call::Renew, reply);
        let before = faults.injected();
        // Time passing (renewals, one of them lost) is what this case tests.
        tokio::time::sleep(ttl * 2).await;
        ensure!(
            faults.injected() == before + 1,
            "the renewal fault did not strike"
        );
        ensure!(
            guard.is_valid() && guard.status().state == LeaseState::Held,
            "a renewal with a lost reply ({reply:?}) cost the lock: {:?}",
            guard.status()
        );
        let err = b.lock("lost/renew").try_acquire().await.err();
        ensure!(err.as_ref().is_some_and(Error::is_would_block), "{err:?}");
        faults.arm(Call::Release, reply);
        within(HANG, "a release with a lost reply", guard.release())
            .await?
            .with_context(|| format!("release with a lost reply ({reply:?})"))?;
        b.lock("lost/renew").try_acquire().await?.release().await?;
    }
    Ok(())
}

/// A conversion between the incomparable modes `PR` and `CW` whose reply is lost leaves the guard on
/// their meet, `CR` — the only mode compatible with whatever a neighbour holds beside either — and the
/// store is brought to `CR` too.
pub async fn incomparable_conversion_with_a_lost_reply_holds_the_meet<F: Factory>(
    f: &F,
) -> Result<()> {
    use LockMode::*;
    let faults = ReplyFaults::new();
    let a = losing_replies(&f.client().await?, &faults);
    let b = f.client().await?;
    for (held, asked) in [(PR, CW), (CW, PR)] {
        for reply in [LostReply::Error, LostReply::Dropped] {
            let name = format!("lost/convert/{held}-{asked}-{reply:?}");
            let mut guard = a.lock(&name).mode(held).ttl(LONG_TTL).await?;
            faults.arm(Call::Convert, reply);
            let converted = tokio::time::timeout(f.short_ttl(), guard.convert(asked)).await;
            ensure!(
                !matches!(converted, Ok(Ok(()))),
                "{held}→{asked}: the conversion succeeded despite its lost reply"
            );
            ensure!(
                guard.mode() == CR,
                "{held}→{asked} with a lost reply ({reply:?}) left the guard claiming {}",
                guard.mode()
            );
            queue_until(&b, &name, "the store settles on CR", |q| {
                q.len() == 1 && q[0].mode == CR && q[0].granted && q[0].converting_to.is_none()
            })
            .await?;
            // Newcomers in either mode fit beside what the guard claims now.
            let rival = b.lock(&name).mode(held).ttl(LONG_TTL).try_acquire().await?;
            rival.release().await?;
            let rival = b
                .lock(&name)
                .mode(asked)
                .ttl(LONG_TTL)
                .try_acquire()
                .await?;
            rival.release().await?;
            guard.release().await?;
        }
    }
    Ok(())
}

/// Guards abandoned without a release — dropped on a thread without a runtime, dropped with a client
/// that is leaked, dropped while their runtime shuts down — free their lock within two TTLs, even
/// while the same client keeps other locks alive.
pub async fn abandoned_guards_free_the_lock_within_two_ttls<F: Factory + Sync>(
    f: &F,
) -> Result<()> {
    let ttl = f.short_ttl();
    let owner = f.client().await?;
    let _busy = owner.lock("abandoned/busy").ttl(ttl).await?;
    let b = f.client().await?;

    // Dropped on a plain thread: the guard's drop cannot spawn its release.
    let guard = owner.lock("abandoned/thread").ttl(ttl).await?;
    let dropped = wait_behind(&b, "abandoned/thread").await?;
    let dropped_at = Instant::now();
    std::thread::spawn(move || drop(guard))
        .join()
        .map_err(|_| anyhow::anyhow!("the dropping thread panicked"))?;
    freed_within_two_ttls(
        dropped,
        dropped_at,
        ttl,
        "dropped on a thread without a runtime",
    )
    .await?;

    // The client is leaked (its connections and background work live on, holding another lock)
    // and the guard dropped without a runtime.
    let leaked = f.client().await?;
    let leaked_busy = leaked.lock("abandoned/leaked-busy").ttl(ttl).await?;
    let guard = leaked.lock("abandoned/leaked").ttl(ttl).await?;
    std::mem::forget(leaked);
    std::mem::forget(leaked_busy);
    let dropped = wait_behind(&b, "abandoned/leaked").await?;
    let dropped_at = Instant::now();
    std::thread::spawn(move || drop(guard))
        .join()
        .map_err(|_| anyhow::anyhow!("the dropping thread panicked"))?;
    freed_within_two_ttls(dropped, dropped_at, ttl, "dropped with a leaked client").await?;

    // Held by a task of a runtime that shuts down: the task, its keeper and its release all die.
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let dropped = std::thread::scope(|scope| {
        let worker = scope.spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let guard = rt.block_on(async {
                let locks = f.client().await?;
                anyhow::Ok(locks.lock("abandoned/shutdown").ttl(ttl).await?)
            })?;
            rt.spawn(async move {
                let _held = guard;
                std::future::pending::<()>().await
            });
            held_tx.send(())?;
            // Drive the runtime (the keeper renews) until told to shut it down.
            let _ = rt.block_on(shutdown_rx);
            drop(rt);
            Ok(())
        });
        let dropped = tokio::task::block_in_place(|| {
            held_rx.recv()?;
            let handle = tokio::runtime::Handle::current();
            let waiter = handle.block_on(wait_behind(&b, "abandoned/shutdown"))?;
            let dropped_at = Instant::now();
            shutdown_tx
                .send(())
                .map_err(|_| anyhow::anyhow!("the runtime thread is gone"))?;
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("the runtime thread panicked"))??;
            anyhow::Ok((waiter, dropped_at))
        })?;
        anyhow::Ok(dropped)
    })?;
    freed_within_two_ttls(
        dropped.0,
        dropped.1,
        ttl,
        "dropped while its runtime shut down",
    )
    .await?;
    Ok(())
}

/// Queues a waiter for `name` behind its holder; resolves to the instant it is granted.
async fn wait_behind(
    b: &Locks,
    name: &str,
) -> Result<tokio::task::JoinHandle<Result<(Instant, Guard)>>> {
    let waiter = tokio::spawn({
        let (b, name) = (b.clone(), name.to_owned());
        async move {
            let guard = b.lock(name).ttl(LONG_TTL).await?;
            anyhow::Ok((Instant::now(), guard))
        }
    });
    queue_until(b, name, "the waiter is queued behind the holder", |q| {
        q.len() == 2
    })
    .await?;
    Ok(waiter)
}

async fn freed_within_two_ttls(
    waiter: tokio::task::JoinHandle<Result<(Instant, Guard)>>,
    dropped_at: Instant,
    ttl: Duration,
    how: &str,
) -> Result<()> {
    let (granted_at, guard) = within(HANG, how, waiter).await???;
    let held_for = granted_at - dropped_at;
    ensure!(
        held_for <= ttl * 2,
        "a guard {how} held the lock for {held_for:?} after it was abandoned; the bound is 2 × TTL ({ttl:?})"
    );
    guard.release().await?;
    Ok(())
}

/// A blocking acquire that asks again, for up to twice [`HANG`], when the store fails it (as a user
/// would when a store error is not the fault under test).
async fn acquire_asking_again(locks: &Locks, name: &str, ttl: Duration) -> Result<Guard> {
    let give_up = Instant::now() + HANG * 2;
    loop {
        match locks.lock(name).ttl(ttl).await {
            Ok(guard) => return Ok(guard),
            Err(err) if Instant::now() < give_up => {
                tracing::info!(error = %err, name, "the acquire fails; asking again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// The store is killed (SIGKILL) and started again on its data while a lock is held and waited for:
/// the holder either keeps its lock (renewals succeed again, nobody else is granted) or sees `lost()`
/// before anyone else is granted; the waiter is granted afterwards; nothing is left behind.
pub async fn store_crash_and_restart_keeps_holders_safe<F: Factory>(f: &F) -> Result<()> {
    let faults = f.faults().context("store faults")?;
    let ttl = f.short_ttl();
    let (a, b) = (f.client().await?, f.client().await?);
    let guard = a.lock("restart").ttl(ttl).await?;
    let waiter = tokio::spawn({
        let b = b.clone();
        async move {
            // The waiter's own lease may lapse while the store is down; like any user it asks again.
            let guard = acquire_asking_again(&b, "restart", ttl).await?;
            anyhow::Ok((Instant::now(), guard))
        }
    });
    queue_until(&b, "restart", "the waiter is queued", |q| q.len() == 2).await?;
    let lost_at = tokio::spawn({
        let mut status = guard.watch();
        async move {
            let _ = status.wait_for(|s| s.state == LeaseState::Lost).await;
            Instant::now()
        }
    });
    faults.crash_and_restart()?;
    let restarted = Instant::now();
    // Clients reconnect on their own; the checks below start once the store answers again.
    let give_up = Instant::now() + HANG * 2;
    let c = loop {
        if let Ok(c) = f.client().await {
            if c.inspect("restart").await.is_ok() {
                break c;
            }
        }
        ensure!(
            Instant::now() < give_up,
            "the store does not answer after its restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Either a renewal sent after the restart is confirmed, or the lease is lost.
    let mut status = guard.watch();
    let settled = *within(
        HANG * 2,
        "the holder renews after the restart or loses",
        async {
            status
                .wait_for(|s| {
                    s.state == LeaseState::Lost
                        || (s.state == LeaseState::Held
                            && s.valid_until > restarted + ttl - drift_margin(ttl))
                })
                .await
        },
    )
    .await??;
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "store restart: the holder {}",
        if settled.state == LeaseState::Lost {
            "lost its lock"
        } else {
            "kept its lock"
        }
    );
    if settled.state == LeaseState::Lost {
        let lost_at = within(HANG, "the lost holder's watcher", lost_at).await??;
        let (granted_at, next) = within(HANG * 2, "the waiter is granted", waiter).await???;
        ensure!(
            settled.valid_until <= granted_at && lost_at <= granted_at,
            "the waiter was granted at {granted_at:?}, inside the lost holder's window ending {:?}",
            settled.valid_until
        );
        ensure!(next.fencing_token() > guard.fencing_token());
        next.release().await?;
    } else {
        lost_at.abort();
        ensure!(
            !waiter.is_finished(),
            "the waiter was granted while the holder kept its lock through the restart"
        );
        let err = c.lock("restart").try_acquire().await.err();
        ensure!(
            err.as_ref().is_some_and(Error::is_would_block),
            "a newcomer got a lock the holder kept through the restart: {err:?}"
        );
        let (released_at, token) = (Instant::now(), guard.fencing_token());
        guard.release().await?;
        let (granted_at, next) = within(HANG * 2, "the waiter is granted", waiter).await???;
        ensure!(granted_at >= released_at);
        ensure!(next.fencing_token() > token);
        next.release().await?;
    }
    queue_until(&b, "restart", "nothing is left behind", |q| q.is_empty()).await?;
    Ok(())
}

/// A register that accepts a write only with a fencing token at least as high as any it has seen:
/// the storage side of fencing, which turns away a holder that does not know it lost its lock.
#[derive(Debug, Default)]
pub struct FencedRegister {
    highest: u64,
    value: Option<String>,
}

impl FencedRegister {
    /// Writes `value` under `token`, or refuses it naming the newer token.
    pub fn write(&mut self, token: u64, value: &str) -> Result<()> {
        ensure!(
            token >= self.highest,
            "stale write refused: token {token} < {}",
            self.highest
        );
        self.highest = token;
        self.value = Some(value.to_owned());
        Ok(())
    }

    /// The value last accepted.
    pub fn value(&self) -> Option<&str> {
        self.value.as_deref()
    }
}

/// A holder process frozen (SIGSTOP) past its TTL while another client takes the lock and writes:
/// once thawed, its guard says at once that the lock may not be relied on, reports `lost()`, and the
/// fenced register turns its late write away by token.
pub async fn paused_holder_process_is_refused_by_the_fenced_register<F: Factory>(
    f: &F,
) -> Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let ttl = f.short_ttl().max(Duration::from_secs(2));
    let mut holder = Holder::start(f, "frozen", ttl, true).await?;
    let holder_token = holder.token;
    let pid = holder.process.id().context("the holder's pid")? as libc::pid_t;
    let mut stdin = holder.process.stdin.take().context("holder stdin")?;
    let mut register = FencedRegister::default();
    register.write(holder_token, "holder")?;

    // SAFETY: signals a child process this case started and still owns.
    ensure!(
        unsafe { libc::kill(pid, libc::SIGSTOP) } == 0,
        "SIGSTOP failed"
    );
    let b = f.client().await?;
    let thaw = |pid| {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) }
    };
    let newer = match within(
        HANG * 3,
        "the frozen holder's lease runs out",
        acquire_asking_again(&b, "frozen", LONG_TTL),
    )
    .await
    {
        Ok(Ok(guard)) => guard,
        other => {
            thaw(pid);
            other??;
            unreachable!("an error was returned above")
        }
    };
    ensure!(newer.fencing_token() > holder_token);
    register.write(newer.fencing_token(), "newer holder")?;
    ensure!(thaw(pid) == 0, "SIGCONT failed");

    stdin.write_all(b"WRITE\n").await?;
    let (mut write_reply, mut lost) = (None, false);
    while write_reply.is_none() || !lost {
        let line = holder.next_line().await?;
        match line.as_str() {
            "LOST" => lost = true,
            reply if reply.starts_with("WRITE ") => write_reply = Some(reply.to_owned()),
            other => bail!("unexpected holder output {other:?}"),
        }
    }
    let reply = write_reply.expect("the loop ends with a reply");
    ensure!(
        reply == format!("WRITE {holder_token} false"),
        "the thawed holder still trusted its lock: {reply:?}"
    );
    let refused = register.write(holder_token, "late write from the thawed holder");
    ensure!(refused.is_err(), "the register took the stale write");
    ensure!(register.value() == Some("newer holder"));
    ensure!(newer.is_valid());
    newer.release().await?;
    drop(stdin);
    holder.process.kill().await?;
    Ok(())
}

/// The fence register ([`dlock::Driver::raise_fence`]) only grows, under concurrent raises from two
/// clients too, is kept per name (tricky names included), and lives apart from the queue: it never
/// shows in `inspect`, and locking the name works as if it were not there.
///
/// A quorum keeps its tokens in its members' registers and cannot be a member itself: it answers
/// `Unsupported`, and only the locking part runs.
pub async fn fence_register_only_grows<F: Factory>(f: &F) -> Result<()> {
    use dlock::Driver as _;
    let (a, b) = (f.client().await?, f.client().await?);
    let (da, db) = (Arc::clone(a.driver()), Arc::clone(b.driver()));
    let fresh = LockName::new("fenced")?;
    let first = within(HANG, "reading a fresh register", da.raise_fence(&fresh, 0)).await?;
    let supported = match first {
        Ok(value) => {
            ensure!(value == 0, "a fresh register reads {value}, not 0");
            true
        }
        Err(Error::Unsupported {
            driver: "quorum", ..
        }) => false,
        Err(err) => return Err(err).context("reading a fresh register"),
    };
    if supported {
        let raise = |d: &Arc<dyn dlock::Driver>, name: &LockName, floor: u64| {
            let (d, name) = (Arc::clone(d), name.clone());
            async move {
                within(HANG, "a fence raise answers", d.raise_fence(&name, floor))
                    .await?
                    .with_context(|| format!("raising {name:?} to {floor}"))
            }
        };
        ensure!(raise(&da, &fresh, 5).await? == 5, "raising to 5");
        let lower = raise(&da, &fresh, 3).await?;
        ensure!(
            lower == 5,
            "raising to 3 after 5 gave {lower}: the register went down"
        );
        let seen = raise(&db, &fresh, 0).await?;
        ensure!(seen == 5, "the other client reads {seen}, not 5");

        let raced = LockName::new("fence-raced")?;
        let mut raises = tokio::task::JoinSet::new();
        for floor in 1..=32u64 {
            let d = if floor % 2 == 0 { &da } else { &db };
            let pending = raise(d, &raced, floor);
            raises.spawn(async move { (floor, pending.await) });
        }
        while let Some(done) = raises.join_next().await {
            let (floor, answer) = done?;
            let answer = answer?;
            ensure!(
                answer >= floor,
                "a concurrent raise to {floor} answered {answer}"
            );
        }
        let settled = raise(&da, &raced, 0).await?;
        ensure!(
            settled == 32,
            "after concurrent raises to 1..=32 the register is {settled}"
        );
    }

    let long = "k".repeat(LockName::MAX_LEN);
    let names = [
        "a",
        "a.fence",
        "a/b",
        "a.b",
        "_fence",
        "_fence.r",
        "_q",
        "a%2Efence",
        long.as_str(),
    ];
    if supported {
        for (i, name) in names.iter().enumerate() {
            let name = LockName::new(name)?;
            let value = 100 + i as u64;
            let got = within(HANG, "a fence raise answers", da.raise_fence(&name, value)).await??;
            ensure!(got == value, "{name:.20?} raised to {value} reads {got}");
        }
        for (i, name) in names.iter().enumerate() {
            let name = LockName::new(name)?;
            let got = within(HANG, "a fence read answers", db.raise_fence(&name, 0)).await??;
            ensure!(
                got == 100 + i as u64,
                "{name:.20?} reads {got}, not {}: registers of distinct names are shared",
                100 + i
            );
        }
    }
    for (i, name) in names.iter().enumerate() {
        ensure!(
            queue(&a, name).await?.is_empty(),
            "{name:.20?}: the register shows in inspect"
        );
        let guard = a
            .lock(*name)
            .mode(LockMode::EX)
            .ttl(LONG_TTL)
            .try_acquire()
            .await
            .with_context(|| format!("{name:.20?}: EX after raising its register"))?;
        let err = b.lock(*name).mode(LockMode::CR).try_acquire().await.err();
        ensure!(
            err.as_ref().is_some_and(Error::is_would_block),
            "{name:.20?}: a CR beside the EX: {err:?}"
        );
        let entries = queue(&b, name).await?;
        ensure!(
            entries.len() == 1 && entries[0].granted && entries[0].mode == LockMode::EX,
            "{name:.20?} while held: {entries:?}"
        );
        guard.release().await?;
        // A quorum may still be withdrawing the entry from a member that answered late.
        queue_until(&b, name, "nothing is left after the release", |q| {
            q.is_empty()
        })
        .await?;
        if supported {
            let name = LockName::new(name)?;
            let got = within(HANG, "a fence read answers", db.raise_fence(&name, 0)).await??;
            ensure!(
                got == 100 + i as u64,
                "{name:.20?}: locking changed the register to {got}"
            );
        }
    }
    Ok(())
}

/// Two jobs need the same two locks and name them in opposite orders. Taken through sessions (the
/// job going down is refused at once, holds nothing new, and takes them in rank order) or through
/// `lock_all`, they never deadlock.
pub async fn opposite_orders_never_deadlock_through_sessions_or_lock_all<F: Factory>(
    f: &F,
) -> Result<()> {
    const ROUNDS: usize = 60;
    async fn job(locks: Locks, first: &'static str, second: &'static str) -> Result<usize> {
        let mut refused = 0;
        for round in 0..ROUNDS {
            if round % 2 == 1 {
                locks
                    .lock_all([first, second])
                    .ttl(LONG_TTL)
                    .await?
                    .release()
                    .await?;
                continue;
            }
            let job = locks.session(dlock::LockOrder::by_name());
            let held = job.lock(first).ttl(LONG_TTL).await?;
            match job.lock(second).ttl(LONG_TTL).await {
                Ok(both) => {
                    both.release().await?;
                    held.release().await?;
                }
                Err(Error::OrderViolation { .. }) => {
                    refused += 1;
                    ensure!(
                        job.held().len() == 1,
                        "a refused request holds or reserves something: {:?}",
                        job.held()
                    );
                    held.release().await?;
                    let low = job.lock(second).ttl(LONG_TTL).await?;
                    let high = job.lock(first).ttl(LONG_TTL).await?;
                    high.release().await?;
                    low.release().await?;
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(refused)
    }
    let (a, b) = (f.client().await?, f.client().await?);
    let up = tokio::spawn(job(a, "order/a", "order/b"));
    let down = tokio::spawn(job(b, "order/b", "order/a"));
    let (up, down) = within(HANG * 4, "two jobs in opposite orders finish", async {
        tokio::join!(up, down)
    })
    .await?;
    let (up, down) = (up??, down??);
    ensure!(up == 0, "going up was refused {up} times");
    ensure!(
        down == ROUNDS / 2,
        "going down was refused {down} of {} times",
        ROUNDS / 2
    );
    Ok(())
}
