//! A read-mostly cache: many readers share it under `PR`, and one refresher rewrites it now and
//! then by converting its lock up and down, so that no reader ever sees a half-written value.
//!
//! The cached value has several parts (think: a price list spread over a few keys of a shared
//! store), and writing it takes one round trip per part. Readers take `PR`, a shared read lock.
//! The refresher holds `CR` between refreshes: compatible with `PR`, so it never blocks a reader,
//! and it keeps the refresher's place on the lock. To write, it converts `CR` → `PW`: `PW` is
//! incompatible with `PR`, so the conversion waits for the readers inside to finish, and it takes
//! priority over readers that ask later, so a steady stream of readers cannot starve it. After
//! the write it converts back down to `CR`, which is granted at once and lets the readers in again.
//!
//! The program first runs the same readers and refresher without a lock and counts the torn reads
//! it sees, then runs them with the lock and checks that every reader saw whole values only, never
//! older than one it had seen before, that no reader held `PR` while a write was going on, that
//! all readers held `PR` at once (beside the refresher's `CR`), and that a new `PR` request is
//! refused while the refresher holds `PW`. It exits non-zero otherwise.
//!
//! ```text
//! cargo run --example read_mostly_cache                                 # in-memory driver
//! cargo run --example read_mostly_cache --features redis -- --url redis://127.0.0.1:6379
//! ```

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use dlock::{LockMode, Locks};
use tokio::sync::Barrier;
use tokio::time::Instant;

const NAME: &str = "cache/prices";
const PARTS: usize = 8;
const READERS: usize = 6;
const REFRESHES: usize = 5;
const TTL: Duration = Duration::from_secs(10);
/// Hang guard for every wait: far above what any step needs.
const LIMIT: Duration = Duration::from_secs(30);

struct Cache {
    parts: Vec<AtomicU64>,
    /// Set by the refresher from the moment it starts writing until it has written the last part.
    writing: AtomicBool,
}

impl Cache {
    fn new() -> Self {
        Cache {
            parts: (0..PARTS).map(|_| AtomicU64::new(0)).collect(),
            writing: AtomicBool::new(false),
        }
    }

    async fn write(&self, version: u64) {
        self.writing.store(true, Ordering::SeqCst);
        for part in &self.parts {
            part.store(version, Ordering::SeqCst);
            // One round trip per part.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.writing.store(false, Ordering::SeqCst);
    }

    async fn read(&self) -> Vec<u64> {
        let mut seen = Vec::with_capacity(PARTS);
        for part in &self.parts {
            seen.push(part.load(Ordering::SeqCst));
            tokio::task::yield_now().await;
        }
        seen
    }
}

#[derive(Default)]
struct Tally {
    reads: AtomicUsize,
    torn: AtomicUsize,
    /// Reads during which the refresher was writing although the reader held `PR`.
    overlapping: AtomicUsize,
    /// Reads that saw an older version than the same reader had seen before.
    went_back: AtomicUsize,
}

/// Reads until the refresher is done. With `locks`, every read is made under `PR`; the first one
/// waits at `all_in` while holding it, so that all readers hold `PR` at once and the refresher can
/// see them in the store.
async fn reader(
    locks: Option<Locks>,
    cache: Arc<Cache>,
    tally: Arc<Tally>,
    done: Arc<AtomicBool>,
    all_in: Option<Arc<Barrier>>,
) -> anyhow::Result<()> {
    let mut all_in = all_in;
    let mut newest = 0;
    while !done.load(Ordering::SeqCst) {
        let guard = match &locks {
            Some(locks) => Some(
                locks
                    .lock(NAME)
                    .mode(LockMode::PR)
                    .ttl(TTL)
                    .timeout(LIMIT)
                    .await
                    .context("reader: taking PR")?,
            ),
            None => None,
        };
        if let Some(barrier) = all_in.take() {
            // Twice: all hold PR at once, and keep holding it until the refresher has looked.
            barrier.wait().await;
            barrier.wait().await;
        }
        let during_write = cache.writing.load(Ordering::SeqCst);
        let seen = cache.read().await;
        let during_write = during_write || cache.writing.load(Ordering::SeqCst);
        if guard.is_some() && during_write {
            tally.overlapping.fetch_add(1, Ordering::SeqCst);
        }
        if seen.iter().any(|&v| v != seen[0]) {
            tally.torn.fetch_add(1, Ordering::SeqCst);
        } else if seen[0] < newest {
            tally.went_back.fetch_add(1, Ordering::SeqCst);
        } else {
            newest = seen[0];
        }
        tally.reads.fetch_add(1, Ordering::SeqCst);
        if let Some(guard) = guard {
            guard.release().await?;
        }
    }
    Ok(())
}

struct Refreshes {
    versions: Vec<u64>,
    longest_wait: Duration,
}

/// Rewrites the cache `REFRESHES` times. With `locks`, it holds `CR` throughout and converts to
/// `PW` for each write.
async fn refresher(
    locks: Option<Locks>,
    cache: Arc<Cache>,
    all_in: Option<Arc<Barrier>>,
) -> anyhow::Result<Refreshes> {
    let mut guard = match &locks {
        Some(locks) => Some(
            locks
                .lock(NAME)
                .mode(LockMode::CR)
                .ttl(TTL)
                .timeout(LIMIT)
                .await
                .context("refresher: taking CR")?,
        ),
        None => None,
    };
    if let (Some(barrier), Some(locks)) = (all_in, &locks) {
        barrier.wait().await;
        let queue = locks.inspect(NAME).await?;
        let granted: Vec<LockMode> = queue.iter().filter(|e| e.granted).map(|e| e.mode).collect();
        let readers = granted.iter().filter(|&&m| m == LockMode::PR).count();
        ensure!(
            readers == READERS && granted.contains(&LockMode::CR),
            "expected {READERS} PR holders and the refresher's CR at once, the store shows {granted:?}"
        );
        println!("  all {READERS} readers hold PR beside the refresher's CR; the store grants {granted:?}");
        barrier.wait().await;
    }
    let mut refreshes = Refreshes {
        versions: Vec::new(),
        longest_wait: Duration::ZERO,
    };
    for round in 0..REFRESHES {
        // The refresh interval: readers have the cache to themselves meanwhile.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let version = match (&mut guard, &locks) {
            (Some(guard), Some(locks)) => {
                let asked = Instant::now();
                tokio::time::timeout(LIMIT, guard.convert(LockMode::PW))
                    .await
                    .context("refresher: converting to PW")??;
                let waited = asked.elapsed();
                refreshes.longest_wait = refreshes.longest_wait.max(waited);
                if round == 0 {
                    let refused = locks.lock(NAME).mode(LockMode::PR).try_acquire().await;
                    ensure!(
                        refused.as_ref().is_err_and(|e| e.is_would_block()),
                        "a new reader was not refused while the refresher held PW: {refused:?}"
                    );
                    println!("  while the refresher holds PW, a new PR request gets WouldBlock");
                }
                // The token of the PW grant: greater than every earlier grant's, so a fine version.
                guard.fencing_token()
            }
            _ => refreshes.versions.last().copied().unwrap_or(0) + 1,
        };
        cache.write(version).await;
        if let Some(guard) = &mut guard {
            // Down-conversions are granted at once.
            tokio::time::timeout(LIMIT, guard.convert(LockMode::CR))
                .await
                .context("refresher: converting back to CR")??;
        }
        refreshes.versions.push(version);
    }
    if let Some(guard) = guard {
        guard.release().await?;
    }
    Ok(refreshes)
}

struct Run {
    tally: Arc<Tally>,
    refreshes: Refreshes,
}

async fn run(url: Option<&str>) -> anyhow::Result<Run> {
    let cache = Arc::new(Cache::new());
    let tally = Arc::new(Tally::default());
    let done = Arc::new(AtomicBool::new(false));
    // Readers share one client; the refresher is another process with its own.
    let (reader_locks, refresher_locks) = match url {
        Some(url) => (
            Some(
                dlock::connect(url)
                    .await
                    .with_context(|| format!("connecting to {url}"))?,
            ),
            Some(dlock::connect(url).await?),
        ),
        None => (None, None),
    };
    let all_in = url.map(|_| Arc::new(Barrier::new(READERS + 1)));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            tokio::spawn(reader(
                reader_locks.clone(),
                cache.clone(),
                tally.clone(),
                done.clone(),
                all_in.clone(),
            ))
        })
        .collect();
    let refreshed = refresher(refresher_locks, cache.clone(), all_in).await;
    done.store(true, Ordering::SeqCst);
    let refreshes = match refreshed {
        Ok(refreshes) => refreshes,
        Err(err) => {
            // Readers may be waiting at the barrier for a refresher that is gone.
            readers.iter().for_each(|r| r.abort());
            return Err(err);
        }
    };
    for reader in readers {
        reader.await??;
    }
    Ok(Run { tally, refreshes })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = common::store_url("read_mostly_cache")?;

    println!(
        "without a lock: {READERS} readers, one refresher, {REFRESHES} refreshes of {PARTS} parts"
    );
    let unlocked = run(None).await?;
    let t = &unlocked.tally;
    println!(
        "  {} reads, {} of them saw a half-written value",
        t.reads.load(Ordering::SeqCst),
        t.torn.load(Ordering::SeqCst)
    );

    println!("with the lock on {url}: readers take PR, the refresher holds CR and converts to PW to write");
    let locked = run(Some(&url)).await?;
    let t = &locked.tally;
    let (reads, torn, overlapping, went_back) = (
        t.reads.load(Ordering::SeqCst),
        t.torn.load(Ordering::SeqCst),
        t.overlapping.load(Ordering::SeqCst),
        t.went_back.load(Ordering::SeqCst),
    );
    println!(
        "  {reads} reads: {torn} half-written, {overlapping} during a write, {went_back} older than one seen before"
    );
    println!(
        "  versions written (the PW grants' fencing tokens): {:?}; longest wait for PW: {:?}",
        locked.refreshes.versions, locked.refreshes.longest_wait
    );
    let increasing = locked.refreshes.versions.windows(2).all(|w| w[0] < w[1]);
    if torn != 0 || overlapping != 0 || went_back != 0 || !increasing || reads == 0 {
        bail!("with the lock, every read must see a whole value, never during a write, never going back");
    }
    println!("ok: no reader saw a half-written value");
    Ok(())
}
