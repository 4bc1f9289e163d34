//! Observability: dlock's metrics in Prometheus's text format, and its tracing spans and events
//! in a log.
//!
//! dlock records metrics through the `metrics` facade and logs through `tracing`; it installs
//! nothing itself. This program installs a Prometheus recorder (`metrics-exporter-prometheus`,
//! without its HTTP listener: a service would serve `handle.render()` on its own `/metrics`
//! route) and a `tracing-subscriber` fmt subscriber that prints every `dlock.acquire` span when it
//! closes, with its fields and timings, and dlock's warnings. Then it goes through what a service
//! meets: an uncontended lock, a contended one (a waiter queued behind a holder), a `try_acquire`
//! that would block, an acquire that times out, a lease that renews itself, and a holder stalled
//! past its lease that loses its lock.
//!
//! The program checks that the rendered text counts exactly those outcomes in
//! `dlock_acquire_total`, has the wait and hold histograms, at least one confirmed renewal and the
//! loss, and that the log shows the `dlock.acquire` spans and the "lock lost" warning. It exits
//! non-zero otherwise.
//!
//! ```text
//! cargo run --example observability                                     # in-memory driver
//! cargo run --example observability --features redis -- --url redis://127.0.0.1:6379
//! ```

mod common;

use std::future::IntoFuture;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use dlock::Locks;
use metrics_exporter_prometheus::PrometheusBuilder;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::EnvFilter;

/// Short, so that the renewal and the loss come quickly.
const SHORT_TTL: Duration = Duration::from_millis(300);
/// Hang guard for every wait: far above what any step needs.
const LIMIT: Duration = Duration::from_secs(30);

/// Everything the subscriber writes goes to stdout and is kept, so the program can check its log.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        std::io::stdout().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Polls the queue until it has `len` entries. The API has no signal for "a request is queued",
/// so this is a bounded wait on the store's own view.
async fn queued(locks: &Locks, name: &str, len: usize) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while locks.inspect(name).await?.len() < len {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{name}: fewer than {len} entries queued after {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// A holder on a thread and runtime of its own, stalled (the thread blocked, lease keeper and
/// all) for longer than its lease, as a long GC pause or SIGSTOP would. Returns whether `lost()`
/// fired once it ran again.
fn stalled_holder(url: String, ttl: Duration) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let locks = dlock::connect(&url).await?;
        let guard = locks.lock("orders/5").ttl(ttl).timeout(LIMIT).await?;
        println!("-- a holder of orders/5 stalls for twice its lease TTL");
        // The stall itself, not a wait for anything: nothing on this runtime runs meanwhile.
        std::thread::sleep(ttl * 2);
        let fired = tokio::time::timeout(ttl, guard.lost()).await.is_ok();
        anyhow::Ok(fired)
    })
}

/// The value of the sample whose line starts with `metric{` and has every one of `labels`.
fn sample(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = common::store_url("observability")?;
    // Before the first lock: the metrics macros go to whatever recorder is installed when they run.
    let prometheus = PrometheusBuilder::new()
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    let log = Captured::default();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new("warn,dlock_core=debug"))
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer({
            let log = log.clone();
            move || log.clone()
        })
        .init();

    let locks = dlock::connect(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let driver = locks.capabilities().driver;
    let ttl = SHORT_TTL.max(locks.capabilities().min_ttl);
    println!("-- on {url} (driver {driver:?})");

    println!("-- an uncontended lock");
    locks.lock("orders/1").await?.release().await?;

    println!("-- a contended lock: a waiter queues behind the holder");
    let holder = locks.lock("orders/2").await?;
    let waiter = tokio::spawn(locks.lock("orders/2").timeout(LIMIT).into_future());
    queued(&locks, "orders/2", 2).await?;
    holder.release().await?;
    waiter.await??.release().await?;

    println!("-- a try_acquire on a held lock, and an acquire that times out");
    let holder = locks.lock("orders/3").await?;
    let busy = locks.lock("orders/3").try_acquire().await;
    ensure!(
        busy.as_ref().is_err_and(|e| e.is_would_block()),
        "try_acquire on a held lock: {busy:?}"
    );
    let late = locks
        .lock("orders/3")
        .timeout(Duration::from_millis(100))
        .await;
    ensure!(
        matches!(late, Err(dlock::Error::Timeout { .. })),
        "acquire with a timeout on a held lock: {late:?}"
    );
    holder.release().await?;

    println!("-- a lease that renews itself (TTL {ttl:?}, renewed about every TTL/3)");
    let renewing = locks.lock("orders/4").ttl(ttl).await?;
    let mut status = renewing.watch();
    // The keeper publishes each confirmed renewal on the guard's status channel.
    tokio::time::timeout(LIMIT, status.changed())
        .await
        .context("no renewal within the hang guard")??;
    renewing.release().await?;

    let stalled = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || stalled_holder(url, ttl)).await??
    };
    ensure!(stalled, "the stalled holder's lost() did not fire");

    let text = prometheus.render();
    println!("-- the Prometheus text a /metrics route would serve:\n{text}");

    let driver_label = format!("driver=\"{driver}\"");
    let d = driver_label.as_str();
    let mut failures = Vec::new();
    // Six granted: orders/1, the holder and the waiter of orders/2, orders/3, orders/4, orders/5.
    for (outcome, count) in [("granted", 6.0), ("would_block", 1.0), ("timeout", 1.0)] {
        let got = sample(
            &text,
            "dlock_acquire_total",
            &[d, &format!("outcome=\"{outcome}\"")],
        );
        if got != Some(count) {
            failures.push(format!(
                "dlock_acquire_total{{outcome=\"{outcome}\"}} is {got:?}, expected {count}"
            ));
        }
    }
    for (metric, labels, at_least) in [
        ("dlock_acquire_wait_seconds_count", vec![d], 6.0),
        ("dlock_hold_seconds_count", vec![d], 6.0),
        ("dlock_renewals_total", vec![d, "outcome=\"ok\""], 1.0),
        ("dlock_lost_total", vec![d], 1.0),
    ] {
        let got = sample(&text, metric, &labels);
        if got.is_none_or(|v| v < at_least) {
            failures.push(format!("{metric} is {got:?}, expected at least {at_least}"));
        }
    }
    let logged = log.text();
    let spans = logged.matches("dlock.acquire{").count();
    if spans < 8 {
        failures.push(format!(
            "the log shows {spans} dlock.acquire spans, expected one per acquire (8)"
        ));
    }
    if !logged.contains("dlock: lock lost") {
        failures.push("the log does not show the \"dlock: lock lost\" warning".into());
    }
    if !failures.is_empty() {
        bail!("observability check failed:\n  {}", failures.join("\n  "));
    }
    println!("ok: every outcome counted, {spans} dlock.acquire spans and the loss in the log");
    Ok(())
}
