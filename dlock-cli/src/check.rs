//! `dlock check`: is the store there, what is it, and does a lock work on it.

use std::fmt::Write as _;
use std::time::Duration;

use dlock::LockMode;
use tokio::time::Instant;

use crate::exit::{show, Failure};
use crate::store::{redact, Store};

/// A report of the connected store, ending in one timed acquire and release of `name` (a fresh
/// name by default). Any failure of the acquire or the release is the check's failure.
pub async fn run(
    store: &Store,
    url: &str,
    connected_in: Duration,
    name: Option<String>,
) -> Result<String, Failure> {
    let caps = store.locks.capabilities().clone();
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let modes: Vec<&str> = caps.modes.iter().map(|m| m.short_name()).collect();
    let mut out = String::new();
    let mut line = |key: &str, value: &str| {
        let _ = writeln!(out, "{key:<26}{value}");
    };
    line("store", &redact(url));
    line("driver", caps.driver);
    line("server", &store.server_version().await);
    line("connected in", &millis(connected_in));
    line("modes", &modes.join(" "));
    line(
        "fencing tokens",
        match (caps.fencing, caps.fencing_total_order) {
            (true, true) => "yes, increasing with every grant",
            (true, false) => "yes, increasing along conflicting grants",
            (false, _) => "no",
        },
    );
    line("fair (FIFO)", yes_no(caps.fair));
    line("per-request TTL", yes_no(caps.per_request_ttl));
    line("conversion", yes_no(caps.conversion));
    line(
        "shared between processes",
        yes_no(caps.shared_between_processes),
    );
    line("minimum TTL", &show(caps.min_ttl));

    let name = name.unwrap_or_else(|| {
        format!(
            "dlock-check/{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )
    });
    // Long enough for any store's minimum; released at once, and a leftover ends by itself.
    let ttl = caps.min_ttl.max(Duration::from_secs(10));
    let started = Instant::now();
    let guard = store
        .locks
        .lock(name.clone())
        .mode(LockMode::EX)
        .ttl(ttl)
        .try_acquire()
        .await
        .map_err(|e| Failure {
            message: format!("check: acquiring {name:?} failed: {e}"),
            ..Failure::from(e)
        })?;
    let acquired_in = started.elapsed();
    let token = guard.fencing_token();
    let started = Instant::now();
    guard.release().await.map_err(|e| Failure {
        message: format!("check: releasing {name:?} failed: {e}"),
        ..Failure::from(e)
    })?;
    let released_in = started.elapsed();
    let _ = writeln!(
        out,
        "{:<26}EX on {name:?} in {}, fencing token {token}",
        "acquire",
        millis(acquired_in)
    );
    let _ = writeln!(out, "{:<26}{}", "release", millis(released_in));
    let _ = writeln!(out, "{:<26}ok", "check");
    Ok(out)
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
