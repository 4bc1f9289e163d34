//! dlock's side of each scenario. Every loop is bounded twice: by a deadline or a cycle count, and
//! every wait for a lock by [`WAIT_BOUND`], so a stuck store fails the run instead of hanging it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dlock::{Guard, LockMode, Locks};
use tokio::time::Instant;

use crate::alloc;
use crate::store::{Counters, Store};
use crate::TTL;

/// The longest any single acquire may wait.
pub const WAIT_BOUND: Duration = Duration::from_secs(30);

/// More cycles than any timed run gets through; only a bound.
pub const MAX_CYCLES: usize = 2_000_000;

async fn acquire(locks: &Locks, name: &str, mode: LockMode, ttl: Duration) -> Result<Guard> {
    acquire_within(locks, name, mode, ttl, WAIT_BOUND).await
}

async fn acquire_within(
    locks: &Locks,
    name: &str,
    mode: LockMode,
    ttl: Duration,
    bound: Duration,
) -> Result<Guard> {
    tokio::time::timeout(bound, locks.lock(name).mode(mode).ttl(ttl))
        .await
        .with_context(|| format!("acquiring {name:?} took over {bound:?}"))?
        .with_context(|| format!("acquiring {name:?}"))
}

/// A cycle on a name of its own for each client, so connections are open and scripts loaded before
/// anything is timed.
pub async fn warm(clients: &[Locks]) -> Result<()> {
    for (i, locks) in clients.iter().enumerate() {
        acquire(locks, &format!("bench/warm/{i}"), LockMode::EX, TTL)
            .await?
            .release()
            .await?;
    }
    Ok(())
}

/// Cycles done and the time they took, summed over the slices of a round.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    pub cycles: usize,
    pub time: Duration,
}

impl Tally {
    pub fn since(start: Instant, cycles: usize) -> Self {
        Tally {
            cycles,
            time: start.elapsed(),
        }
    }

    pub fn add(&mut self, other: Tally) {
        self.cycles += other.cycles;
        self.time += other.time;
    }

    pub fn rate(&self) -> f64 {
        self.cycles as f64 / self.time.as_secs_f64()
    }
}

/// A tally with the time of every cycle: a rate is a mean and carries every stall the machine adds
/// (a descheduled vCPU, another build's burst), the median cycle time does not.
#[derive(Debug, Default)]
pub struct Timed {
    pub tally: Tally,
    pub cycle_times: Vec<Duration>,
}

impl Timed {
    pub fn add(&mut self, other: Timed) {
        self.tally.add(other.tally);
        self.cycle_times.extend(other.cycle_times);
    }
}

/// Times a loop of cycles: call [`Laps::lap`] after each.
pub struct Laps {
    start: Instant,
    last: Instant,
    times: Vec<Duration>,
}

impl Laps {
    pub fn start() -> Self {
        let now = Instant::now();
        Laps {
            start: now,
            last: now,
            times: Vec::with_capacity(4096),
        }
    }

    pub fn lap(&mut self) {
        let now = Instant::now();
        self.times.push(now - self.last);
        self.last = now;
    }

    pub fn count(&self) -> usize {
        self.times.len()
    }

    pub fn finish(self) -> Timed {
        Timed {
            tally: Tally::since(self.start, self.times.len()),
            cycle_times: self.times,
        }
    }
}

/// Acquire + release cycles on one name for about `run`.
pub async fn uncontended(locks: &Locks, run: Duration) -> Result<Timed> {
    let mut laps = Laps::start();
    let deadline = Instant::now() + run;
    while laps.count() < MAX_CYCLES && (laps.count() < 3 || Instant::now() < deadline) {
        acquire(locks, "bench/uncontended", LockMode::EX, TTL)
            .await?
            .release()
            .await?;
        laps.lap();
    }
    Ok(laps.finish())
}

/// Latencies from a holder's release to the next grant, and how many grants there were.
#[derive(Debug, Default)]
pub struct Handoffs {
    pub samples: Vec<Duration>,
    pub grants: usize,
}

impl Handoffs {
    pub fn merge(&mut self, other: Handoffs) {
        self.samples.extend(other.samples);
        self.grants += other.grants;
    }
}

/// Records a grant: the latency since the last release, if one is pending.
#[derive(Clone, Default)]
pub struct HandoffClock {
    released_at: Arc<Mutex<Option<Instant>>>,
    samples: Arc<Mutex<Vec<Duration>>>,
    grants: Arc<AtomicUsize>,
}

impl HandoffClock {
    pub fn granted(&self) {
        self.grants.fetch_add(1, Ordering::Relaxed);
        if let Some(at) = self.released_at.lock().expect("not poisoned").take() {
            self.samples
                .lock()
                .expect("not poisoned")
                .push(at.elapsed());
        }
    }

    pub fn releasing(&self) {
        *self.released_at.lock().expect("not poisoned") = Some(Instant::now());
    }

    pub fn finish(&self) -> Handoffs {
        Handoffs {
            samples: std::mem::take(&mut *self.samples.lock().expect("not poisoned")),
            grants: self.grants.load(Ordering::Relaxed),
        }
    }
}

/// Every client in line for one `EX` lock, each taking it again as soon as it has released it (so
/// it queues behind the others), until `deadline` or `cycles` each.
pub async fn handoffs(
    clients: &[Locks],
    name: &str,
    ttl: Duration,
    deadline: Option<Instant>,
    cycles: usize,
) -> Result<Handoffs> {
    let clock = HandoffClock::default();
    let mut tasks = Vec::new();
    for locks in clients {
        let (locks, clock, name) = (locks.clone(), clock.clone(), name.to_owned());
        tasks.push(tokio::spawn(async move {
            for _ in 0..cycles {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let guard = acquire(&locks, &name, LockMode::EX, ttl).await?;
                clock.granted();
                // Lets the others run, as real work would, before the release is stamped.
                tokio::task::yield_now().await;
                clock.releasing();
                guard.release().await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(clock.finish())
}

/// `tasks` tasks sharing one client, each cycling over its own slice of 1000 names (so no two wait
/// for each other) for about `run`.
pub async fn many_names(locks: &Locks, tasks: usize, run: Duration) -> Result<Tally> {
    let start = Instant::now();
    let deadline = start + run;
    let per_task = (1000 / tasks).max(1);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let locks = locks.clone();
        handles.push(tokio::spawn(async move {
            let mut done = 0;
            while done < MAX_CYCLES && (done < 2 || Instant::now() < deadline) {
                let name = format!("bench/many/{t}/{}", done % per_task);
                acquire(&locks, &name, LockMode::PW, TTL)
                    .await?
                    .release()
                    .await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for handle in handles {
        total += handle.await??;
    }
    Ok(Tally::since(start, total))
}

/// What holding many locks costs the client and the store.
#[derive(Debug)]
pub struct Held {
    /// Heap bytes per held lock, from the counting allocator.
    pub heap_per_lock: f64,
    /// Store operations per TTL/3 (one keeper period) while the locks were held.
    pub store_per_period: Counters,
    /// Renewal calls from the keepers into the driver, per TTL/3.
    pub driver_per_period: f64,
    /// Locks whose lease lapsed while held: the store could not keep up with the renewals.
    pub lost: usize,
}

/// Takes `n` locks on one client, holds them for three TTLs, and releases them.
pub async fn held(store: &Store, n: usize, ttl: Duration) -> Result<Held> {
    const TASKS: usize = 32;
    let renewals = Arc::new(AtomicU64::new(0));
    let locks = store.counted_locks(renewals.clone()).await?;
    warm(std::slice::from_ref(&locks)).await?;
    settle_heap().await;
    let heap_before = alloc::live_bytes();
    let mut takers = Vec::new();
    for t in 0..TASKS {
        let locks = locks.clone();
        takers.push(tokio::spawn(async move {
            let mut guards = Vec::with_capacity(n / TASKS + 1);
            for i in (t..n).step_by(TASKS) {
                guards.push(acquire(&locks, &format!("bench/held/{i}"), LockMode::PR, ttl).await?);
            }
            anyhow::Ok(guards)
        }));
    }
    let mut guards = Vec::with_capacity(n);
    for taker in takers {
        guards.extend(taker.await??);
    }
    // Lets the acquiring tasks' leftovers (spawned enqueues, buffers) settle.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let heap_after = alloc::live_bytes();

    let before = store.counters().await?;
    let renewed_before = renewals.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(ttl * 3).await;
    let after = store.counters().await?;
    let renewed = renewals.load(Ordering::Relaxed) - renewed_before;
    let periods = start.elapsed().as_secs_f64() / (ttl / 3).as_secs_f64();

    let lost = guards.iter().filter(|g| !g.is_valid()).count();
    let mut releasers = Vec::new();
    let mut rest = guards;
    while !rest.is_empty() {
        let chunk: Vec<Guard> = rest.drain(..rest.len().min(n / TASKS + 1)).collect();
        releasers.push(tokio::spawn(async move {
            let mut result = Ok(());
            for guard in chunk {
                if let Err(err) = guard.release().await {
                    result = Err(err);
                }
            }
            result
        }));
    }
    for releaser in releasers {
        // A lost lock's release reports the loss; that is counted above, not a failure of the run.
        let _ = releaser.await?;
    }
    let delta = after - before;
    Ok(Held {
        heap_per_lock: (heap_after - heap_before) as f64 / n as f64,
        store_per_period: Counters {
            primary: delta.primary / periods,
            secondary: delta.secondary / periods,
        },
        driver_per_period: renewed as f64 / periods,
        lost,
    })
}

/// Waits (bounded) until the heap stops moving: connections and tasks of earlier scenarios are torn
/// down in the background, and their frees must not be taken off the held locks' bytes.
async fn settle_heap() {
    for _ in 0..40 {
        let before = alloc::live_bytes();
        tokio::time::sleep(Duration::from_millis(250)).await;
        if (alloc::live_bytes() - before).abs() < 16 * 1024 {
            return;
        }
    }
}

/// The outcome of a run of the mixed-mode scenario.
#[derive(Debug, Default)]
pub struct Mixed {
    pub tally: Tally,
    /// The longest a `PW` or `EX` request waited (every request is one, when `readers` is false).
    pub longest_writer_wait: Duration,
}

impl Mixed {
    pub fn merge(&mut self, other: Mixed) {
        self.tally.add(other.tally);
        self.longest_writer_wait = self.longest_writer_wait.max(other.longest_writer_wait);
    }
}

/// Every client cycles on one name for about `run`: with `readers`, 90 % of requests are `PR` and 10 %
/// `PW` or `EX` (half each); without, all are `EX`. Each holds the lock for 1 ms, as a short read or
/// update would, so readers overlap.
pub async fn mixed(clients: &[Locks], run: Duration, readers: bool) -> Result<Mixed> {
    let start = Instant::now();
    let deadline = start + run;
    let mut tasks = Vec::new();
    for locks in clients {
        let locks = locks.clone();
        tasks.push(tokio::spawn(async move {
            let (mut done, mut longest) = (0usize, Duration::ZERO);
            while done < MAX_CYCLES && (done < 1 || Instant::now() < deadline) {
                let r: f64 = rand::random();
                let mode = match (readers, r) {
                    (false, _) => LockMode::EX,
                    (true, r) if r < 0.9 => LockMode::PR,
                    (true, r) if r < 0.95 => LockMode::PW,
                    (true, _) => LockMode::EX,
                };
                let asked = Instant::now();
                let guard = acquire(&locks, "bench/mixed", mode, TTL).await?;
                if mode != LockMode::PR {
                    longest = longest.max(asked.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
                guard.release().await?;
                done += 1;
            }
            anyhow::Ok((done, longest))
        }));
    }
    let (mut total, mut longest) = (0, Duration::ZERO);
    for task in tasks {
        let (done, wait) = task.await??;
        total += done;
        longest = longest.max(wait);
    }
    Ok(Mixed {
        tally: Tally::since(start, total),
        longest_writer_wait: longest,
    })
}

/// The in-memory baseline for handoffs: the same line of tasks on a `tokio::sync::Mutex`.
pub async fn tokio_mutex_handoffs(tasks: usize, deadline: Instant) -> Result<Handoffs> {
    let mutex = Arc::new(tokio::sync::Mutex::new(()));
    let clock = HandoffClock::default();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (mutex, clock) = (mutex.clone(), clock.clone());
        handles.push(tokio::spawn(async move {
            let mut done = 0;
            while done < MAX_CYCLES && Instant::now() < deadline {
                let guard = mutex.lock().await;
                clock.granted();
                tokio::task::yield_now().await;
                clock.releasing();
                drop(guard);
                done += 1;
            }
        }));
    }
    for handle in handles {
        handle.await?;
    }
    Ok(clock.finish())
}

/// Store operations over a window of handoffs with a full line.
#[derive(Debug)]
pub struct QueueCost {
    pub grants: usize,
    pub counters: Counters,
}

/// Aborts its tasks when dropped, so no path out of a scenario leaves clients cycling.
struct AbortAll(Vec<tokio::task::JoinHandle<Result<()>>>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// How the queue-cost window is bounded.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Enough handoffs for a steady figure; the window ends when they are counted…
    pub grants: usize,
    /// …or after this long, if at least one handoff was counted…
    pub soft: Duration,
    /// …and fails if none came within this.
    pub hard: Duration,
    /// How long lining the waiters up may take.
    pub ramp: Duration,
}

/// Store operations per handoff with `waiters` clients waiting behind a holder (`clients[0]`; the
/// rest are the waiters), in steady state: the line is built first, the counters are read once it is
/// full, and the window ends while it still is (every client takes the lock again as soon as it has
/// released it). With 0 waiters, one client cycles alone.
pub async fn queue_cost(
    store: &Store,
    clients: &[Locks],
    name: &str,
    waiters: usize,
    ttl: Duration,
    window: Window,
) -> Result<QueueCost> {
    if waiters == 0 {
        let before = store.counters().await?;
        for _ in 0..window.grants {
            acquire(&clients[0], name, LockMode::EX, ttl)
                .await?
                .release()
                .await?;
        }
        return Ok(QueueCost {
            grants: window.grants,
            counters: store.counters().await? - before,
        });
    }
    let grants = Arc::new(AtomicUsize::new(0));
    // The first waiters wait out the whole ramp behind the holder.
    let bound = window.ramp + window.hard + WAIT_BOUND;
    let cycle = |locks: Locks, first: Option<Guard>| {
        let (grants, name) = (grants.clone(), name.to_owned());
        async move {
            if let Some(guard) = first {
                guard.release().await?;
            }
            for _ in 0..MAX_CYCLES {
                let guard = acquire_within(&locks, &name, LockMode::EX, ttl, bound).await?;
                grants.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
                guard.release().await?;
            }
            anyhow::Ok(())
        }
    };
    let holder = acquire(&clients[0], name, LockMode::EX, ttl).await?;
    let mut tasks = AbortAll(Vec::new());
    // Spaced out: the line is what is measured, not a crowd arriving at once.
    for locks in &clients[1..=waiters] {
        tasks.0.push(tokio::spawn(cycle(locks.clone(), None)));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ramp_end = Instant::now() + window.ramp;
    let mut lined_up = 0;
    while Instant::now() < ramp_end {
        lined_up = clients[0].inspect(name).await?.len();
        if lined_up > waiters {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if lined_up <= waiters {
        // Why the others are not in line: the clients that gave up, and the first one's error.
        let (mut gave_up, mut first) = (0, None);
        for task in std::mem::take(&mut tasks.0) {
            if !task.is_finished() {
                task.abort();
                continue;
            }
            gave_up += 1;
            if let (Ok(Err(err)), None) = (task.await, &first) {
                first = Some(format!("{err:#}"));
            }
        }
        let why = first.map_or(String::new(), |err| {
            format!("; {gave_up} clients gave up, the first with: {err}")
        });
        drop(holder);
        drain(&clients[0], name, ttl).await;
        bail!(
            "only {} of {waiters} waiters were in line after {:?}{why}",
            lined_up.saturating_sub(1),
            window.ramp
        );
    }
    let before = store.counters().await?;
    let start = Instant::now();
    tasks
        .0
        .push(tokio::spawn(cycle(clients[0].clone(), Some(holder))));
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let done = grants.load(Ordering::Relaxed);
        let elapsed = start.elapsed();
        if done >= window.grants || (done > 0 && elapsed >= window.soft) {
            break;
        }
        if elapsed >= window.hard {
            drop(tasks);
            drain(&clients[0], name, ttl).await;
            bail!("no handoff in {:?} with {waiters} waiters", window.hard);
        }
        if let Some(finished) = tasks.0.iter().position(|t| t.is_finished()) {
            let task = tasks.0.remove(finished);
            task.await??;
            bail!("a client left the line");
        }
    }
    let counters = store.counters().await? - before;
    let done = grants.load(Ordering::Relaxed);
    drop(tasks);
    drain(&clients[0], name, ttl).await;
    Ok(QueueCost {
        grants: done,
        counters,
    })
}

/// Waits (bounded by twice the lease, when every entry has expired anyway) until nothing is left in
/// line for `name`: the clients just stopped release in the background, and that work must not be
/// counted in the next window.
async fn drain(locks: &Locks, name: &str, ttl: Duration) {
    let give_up = Instant::now() + ttl * 2;
    while Instant::now() < give_up {
        if locks.inspect(name).await.is_ok_and(|q| q.is_empty()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "warning: the line for {name:?} did not empty within {:?}",
        ttl * 2
    );
}
