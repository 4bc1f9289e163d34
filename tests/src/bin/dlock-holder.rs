//! An out-of-process lock holder for crash and pause tests: connects to `--url`, takes `--name` in
//! `--mode` (default EX) with a `--ttl-ms` lease, prints `HELD <fencing token>` and holds the lock,
//! renewing it, until it is killed.
//!
//! With `--commands` it also serves its standard input: for each line `WRITE` it prints
//! `WRITE <fencing token> <valid>` (whether its guard still says the lock may be relied on), and it
//! prints `LOST` once its guard is lost instead of exiting; it exits at the end of its input.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut url = None;
    let mut name = None;
    let mut mode = dlock::LockMode::EX;
    let mut ttl = Duration::from_secs(2);
    let mut commands = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--commands" {
            commands = true;
            continue;
        }
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => url = Some(value),
            "--name" => name = Some(value),
            "--mode" => mode = value.parse()?,
            "--ttl-ms" => ttl = Duration::from_millis(value.parse().context("--ttl-ms")?),
            other => bail!("unknown flag {other}; usage: dlock-holder --url URL --name NAME [--mode M] [--ttl-ms N] [--commands]"),
        }
    }
    let url = url.context("--url is required")?;
    let name = name.context("--name is required")?;
    let locks = dlock::connect(&url).await?;
    let guard = locks.lock(name).mode(mode).ttl(ttl).await?;
    println!("HELD {}", guard.fencing_token());
    if !commands {
        guard.lost().await;
        bail!("lost the lock")
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut lost_reported = false;
    loop {
        tokio::select! {
            _ = guard.lost(), if !lost_reported => {
                println!("LOST");
                lost_reported = true;
            }
            line = lines.next_line() => match line?.as_deref() {
                Some("WRITE") => println!("WRITE {} {}", guard.fencing_token(), guard.is_valid()),
                Some(other) => bail!("unknown command {other:?}; the only command is WRITE"),
                None => return Ok(()),
            },
        }
    }
}
