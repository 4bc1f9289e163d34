//! An out-of-process lock holder for crash tests: connects to `--url`, takes `--name` in `--mode`
//! (default EX) with a `--ttl-ms` lease, prints `HELD <fencing token>` and holds the lock, renewing it,
//! until it is killed.

use std::time::Duration;

use anyhow::{bail, Context};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut url = None;
    let mut name = None;
    let mut mode = dlock::LockMode::EX;
    let mut ttl = Duration::from_secs(2);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => url = Some(value),
            "--name" => name = Some(value),
            "--mode" => mode = value.parse()?,
            "--ttl-ms" => ttl = Duration::from_millis(value.parse().context("--ttl-ms")?),
            other => bail!("unknown flag {other}; usage: dlock-holder --url URL --name NAME [--mode M] [--ttl-ms N]"),
        }
    }
    let url = url.context("--url is required")?;
    let name = name.context("--name is required")?;
    let locks = dlock::connect(&url).await?;
    let guard = locks.lock(name).mode(mode).ttl(ttl).await?;
    println!("HELD {}", guard.fencing_token());
    guard.lost().await;
    bail!("lost the lock")
}
