//! The oversell story: a shop has 10 units of a product and 50 buyers arrive at once.
//!
//! Without a lock every buyer reads the stock, waits on the network, and writes it back: most read the
//! same "10 left" and the shop sells far more than it has. With an `EX` lock per product the
//! read-modify-write is serialised and the shop sells exactly 10. The stock table also checks fencing
//! tokens, so a buyer whose lock had been lost could not write with a stale token.
//!
//! ```text
//! cargo run --example inventory                                   # in-memory driver
//! cargo run --example inventory --features redis -- --url redis://127.0.0.1:6379
//! ```

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use dlock::{LockMode, Locks};
use tokio::sync::Mutex;

const UNITS: u64 = 10;
const BUYERS: usize = 50;

/// A stock table reached over a (simulated) network: every call takes a moment, as a database would.
struct StockTable {
    rows: Mutex<Row>,
}

struct Row {
    units: u64,
    /// The highest fencing token seen; writes with a lower one are refused.
    fence: u64,
}

impl StockTable {
    fn new(units: u64) -> Self {
        StockTable {
            rows: Mutex::new(Row { units, fence: 0 }),
        }
    }

    async fn read(&self) -> u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.rows.lock().await.units
    }

    async fn write(&self, units: u64, token: Option<u64>) -> anyhow::Result<()> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let mut row = self.rows.lock().await;
        if let Some(token) = token {
            if token < row.fence {
                bail!("stale fencing token {token} (table has seen {})", row.fence);
            }
            row.fence = token;
        }
        row.units = units;
        Ok(())
    }
}

struct Outcome {
    sold: u64,
    tokens: Vec<u64>,
}

async fn run(locks: Option<Locks>) -> anyhow::Result<Outcome> {
    let table = Arc::new(StockTable::new(UNITS));
    let sold = Arc::new(AtomicU64::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut buyers = Vec::with_capacity(BUYERS);
    for _ in 0..BUYERS {
        let (table, sold, tokens, locks) =
            (table.clone(), sold.clone(), tokens.clone(), locks.clone());
        buyers.push(tokio::spawn(async move {
            let guard = match &locks {
                Some(locks) => Some(
                    locks
                        .lock("product/42")
                        .mode(LockMode::EX)
                        .ttl(Duration::from_secs(10))
                        .timeout(Duration::from_secs(60))
                        .await?,
                ),
                None => None,
            };
            let token = guard.as_ref().map(|g| g.fencing_token());
            let units = table.read().await;
            if units > 0 {
                table.write(units - 1, token).await?;
                sold.fetch_add(1, Ordering::SeqCst);
                if let Some(token) = token {
                    tokens.lock().expect("not poisoned").push(token);
                }
            }
            if let Some(guard) = guard {
                guard.release().await?;
            }
            anyhow::Ok(())
        }));
    }
    for buyer in buyers {
        buyer.await??;
    }
    let tokens = std::mem::take(&mut *tokens.lock().expect("not poisoned"));
    Ok(Outcome {
        sold: sold.load(Ordering::SeqCst),
        tokens,
    })
}

fn report(label: &str, outcome: &Outcome) {
    println!(
        "{label}: {} units in stock, {BUYERS} buyers, sold: {}, oversold: {}",
        UNITS,
        outcome.sold,
        outcome.sold.saturating_sub(UNITS)
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = common::store_url("inventory")?;
    let unlocked = run(None).await?;
    report("without a lock", &unlocked);

    let locks = dlock::connect(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let locked = run(Some(locks)).await?;
    report(&format!("with an EX lock ({url})"), &locked);

    let increasing = locked.tokens.windows(2).all(|w| w[0] < w[1]);
    println!(
        "fencing tokens of the {} sales, in sale order: {:?} ({})",
        locked.tokens.len(),
        locked.tokens,
        if increasing {
            "strictly increasing"
        } else {
            "NOT increasing"
        }
    );
    if locked.sold != UNITS || !increasing {
        bail!("the locked run must sell exactly {UNITS} units with increasing fencing tokens");
    }
    Ok(())
}
