//! A history checker: many clients run random lock operations while faults are injected; every
//! granted interval is recorded with its validity window and fencing token, and the checker asserts
//! that incompatible modes never overlap on one name and that fencing tokens increase along every pair
//! of conflicting holders.

use std::fmt;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Result};
use dlock::{Error, Guard, LockMode, Locks};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::suite::lost_replies::{LostReplies, ReplyFaults};
use crate::suite::{within, Factory, Link};

/// The shape of a random history.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Concurrent clients, each with its own cuttable link to the store.
    pub clients: usize,
    /// Operations each client runs.
    pub ops_per_client: usize,
    /// Lock names the clients contend on.
    pub names: usize,
    /// Faults injected while the clients run (link cuts, and store faults where the store has them).
    pub faults: usize,
    /// The share of those faults done to the store ([`StoreFaults::start_fault`]) rather than to one
    /// client's link.
    ///
    /// [`StoreFaults::start_fault`]: crate::suite::StoreFaults::start_fault
    pub store_faults: f64,
    /// Seed of the random choices (printed with the report, so a failure can be replayed).
    pub seed: u64,
    /// The share of enqueue, convert, renew and release calls whose reply is lost after the store
    /// applied them (half reported as errors, half never answered).
    pub lost_replies: f64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            clients: 6,
            ops_per_client: 300,
            names: 3,
            faults: 40,
            store_faults: 0.3,
            seed: rand::random(),
            lost_replies: 0.01,
        }
    }
}

/// One interval during which a holder relied on a lock in one mode.
#[derive(Clone, Debug)]
pub struct Interval {
    /// Which name (index into the workload's names).
    pub name: usize,
    /// Identifies the guard (intervals of one guard, split by conversions, are not compared).
    pub guard: u64,
    /// The mode held.
    pub mode: LockMode,
    /// The grant's fencing token.
    pub token: u64,
    /// When the holder learned of the grant.
    pub start: Instant,
    /// When the holder stopped relying on it: at release, or at the end of its validity window.
    pub end: Instant,
}

/// What a history run did.
#[derive(Debug, Default)]
pub struct Report {
    /// The workload's seed.
    pub seed: u64,
    /// Operations attempted.
    pub operations: usize,
    /// Granted intervals recorded.
    pub intervals: Vec<Interval>,
    /// `try_acquire` refusals.
    pub would_block: usize,
    /// Acquires that timed out.
    pub timeouts: usize,
    /// Acquires cancelled by dropping their future.
    pub cancelled: usize,
    /// Guards that turned Lost while held (or acquires that failed as Lost).
    pub lost: usize,
    /// Conversions granted.
    pub conversions: usize,
    /// Conversions refused as deadlocks.
    pub deadlocks: usize,
    /// Other errors (store unreachable while faults were on).
    pub errors: usize,
    /// Faults injected (link cuts and store pauses).
    pub faults: usize,
    /// Replies lost after the store applied the call.
    pub lost_replies: usize,
}

impl Report {
    /// Checks the recorded intervals: no two incompatible intervals of different guards on one name
    /// overlap, and of two such intervals the later one has the greater fencing token. Returns a line
    /// saying what was checked.
    pub fn check(&self) -> Result<String> {
        let mut pairs = 0usize;
        let names = self
            .intervals
            .iter()
            .map(|i| i.name)
            .max()
            .map_or(0, |n| n + 1);
        for name in 0..names {
            let mut on_name: Vec<&Interval> =
                self.intervals.iter().filter(|i| i.name == name).collect();
            on_name.sort_by_key(|i| i.start);
            for (x, a) in on_name.iter().enumerate() {
                for b in &on_name[x + 1..] {
                    if a.guard == b.guard || a.mode.compatible_with(b.mode) {
                        continue;
                    }
                    pairs += 1;
                    ensure!(
                        b.start >= a.end,
                        "incompatible holders overlapped on name {name}: {a:?} and {b:?} (seed {})",
                        self.seed
                    );
                    ensure!(
                        a.token < b.token,
                        "fencing token went backwards on name {name}: {a:?} then {b:?} (seed {})",
                        self.seed
                    );
                }
            }
        }
        ensure!(!self.intervals.is_empty(), "the history granted nothing");
        Ok(format!(
            "check passed: {} intervals, {pairs} conflicting pairs checked for overlap and token order",
            self.intervals.len()
        ))
    }
}

impl Report {
    /// [`Report::check`], with the run's counts and the verdict written to standard error: libtest
    /// hides the output of passing tests written with `println!`, and the counts are worth seeing in
    /// every run.
    pub fn check_and_print(&self) -> Result<()> {
        let checked = self.check();
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "{self}; {}",
            match &checked {
                Ok(summary) => summary.clone(),
                Err(err) => format!("VIOLATION: {err}"),
            }
        );
        checked.map(drop)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "history (seed {}): {} operations, {} granted intervals, {} would-block, {} timeouts, {} cancelled, {} lost, {} conversions, {} conversion deadlocks, {} store errors, {} faults injected, {} replies lost",
            self.seed,
            self.operations,
            self.intervals.len(),
            self.would_block,
            self.timeouts,
            self.cancelled,
            self.lost,
            self.conversions,
            self.deadlocks,
            self.errors,
            self.faults,
            self.lost_replies
        )
    }
}

/// The share of grants held across renewals (up to two TTLs) instead of for a moment.
const LONG_HOLDS: f64 = 0.05;

const MODES: [(LockMode, u32); 6] = [
    (LockMode::NL, 1),
    (LockMode::CR, 2),
    (LockMode::CW, 2),
    (LockMode::PR, 3),
    (LockMode::PW, 2),
    (LockMode::EX, 3),
];

fn random_mode(rng: &mut StdRng) -> LockMode {
    let total: u32 = MODES.iter().map(|(_, w)| w).sum();
    let mut pick = rng.random_range(0..total);
    for (mode, weight) in MODES {
        if pick < weight {
            return mode;
        }
        pick -= weight;
    }
    unreachable!("pick is below the total weight")
}

/// Runs `workload` against the factory's store and returns what happened; call [`Report::check`].
pub async fn run<F: Factory>(factory: &F, workload: Workload) -> Result<Report> {
    let ttl = factory.short_ttl();
    let report = Arc::new(Mutex::new(Report {
        seed: workload.seed,
        ..Report::default()
    }));
    let mut links: Vec<Arc<dyn Link>> = Vec::new();
    let mut reply_faults = Vec::new();
    let mut clients = Vec::new();
    for id in 0..workload.clients {
        let (locks, link) = factory.partitionable_client().await?;
        links.push(Arc::from(link));
        let faults = ReplyFaults::random(workload.seed ^ ((id as u64) << 8), workload.lost_replies);
        reply_faults.push(Arc::clone(&faults));
        let locks = Locks::from_arc(Arc::new(LostReplies::new(
            Arc::clone(locks.driver()),
            faults,
        )));
        let report = report.clone();
        let rng = StdRng::seed_from_u64(workload.seed.wrapping_add(id as u64));
        clients.push(tokio::spawn(client_loop(
            locks, id, rng, workload, ttl, report,
        )));
    }
    let done = Arc::new(AtomicBool::new(false));
    let mut rng = StdRng::seed_from_u64(workload.seed ^ 0xfa17);
    let injector = async {
        for _ in 0..workload.faults {
            if done.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(ttl.mul_f64(rng.random_range(0.05..0.3))).await;
            let outage = ttl.mul_f64(rng.random_range(0.2..2.0));
            match factory.faults() {
                Some(faults) if rng.random_bool(workload.store_faults) => {
                    faults.start_fault()?;
                    tokio::time::sleep(outage).await;
                    faults.end_fault()?;
                }
                _ => {
                    let link = &links[rng.random_range(0..links.len())];
                    link.set_cut(true);
                    tokio::time::sleep(outage).await;
                    link.set_cut(false);
                }
            }
            report.lock().expect("not poisoned").faults += 1;
        }
        anyhow::Ok(())
    };
    let clients_done = async {
        for client in clients {
            client.await??;
        }
        done.store(true, Ordering::SeqCst);
        anyhow::Ok(())
    };
    let limit = Duration::from_secs(300);
    let (faulted, finished) = within(limit, "the history run", async {
        tokio::join!(injector, clients_done)
    })
    .await?;
    faulted?;
    finished?;
    let finished_at = Instant::now();
    // With every fault healed and every guard gone, nothing may stay queued past one TTL: entries
    // whose release or cleanup was lost expire with their lease, which nobody renews any more.
    let fresh = factory.client().await?;
    let give_up = finished_at + ttl + Duration::from_secs(1);
    for name in 0..workload.names {
        loop {
            let left = fresh.inspect(&format!("h/{name}")).await?;
            if left.is_empty() {
                break;
            }
            ensure!(
                Instant::now() < give_up,
                "name h/{name} still has entries one TTL ({ttl:?}) + 1 s after the history ended: {left:?} (seed {})",
                workload.seed
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for name in 0..workload.names {
        within(
            Duration::from_secs(60),
            "every lock is free after the faults",
            fresh.lock(format!("h/{name}")).ttl(ttl),
        )
        .await??
        .release()
        .await?;
    }
    let mut report = std::mem::take(&mut *report.lock().expect("not poisoned"));
    report.lost_replies = reply_faults.iter().map(|f| f.injected()).sum();
    Ok(report)
}

async fn client_loop(
    locks: Locks,
    id: usize,
    mut rng: StdRng,
    workload: Workload,
    ttl: Duration,
    report: Arc<Mutex<Report>>,
) -> Result<()> {
    let record = |f: &dyn Fn(&mut Report)| f(&mut report.lock().expect("not poisoned"));
    for op in 0..workload.ops_per_client {
        let name = rng.random_range(0..workload.names);
        let request = locks
            .lock(format!("h/{name}"))
            .mode(random_mode(&mut rng))
            .ttl(ttl);
        let attempt = rng.random_range(0..10);
        let acquired = match attempt {
            0..=2 => request.try_acquire().await,
            3..=8 => {
                request
                    .timeout(Duration::from_millis(rng.random_range(5..60)))
                    .await
            }
            _ => {
                let pending = tokio::spawn(request.into_future());
                tokio::task::yield_now().await;
                pending.abort();
                match pending.await {
                    Ok(result) => result,
                    Err(_) => {
                        record(&|r| r.cancelled += 1);
                        continue;
                    }
                }
            }
        };
        record(&|r| r.operations += 1);
        let mut guard = match acquired {
            Ok(guard) => guard,
            Err(Error::WouldBlock { .. }) => {
                record(&|r| r.would_block += 1);
                continue;
            }
            Err(Error::Timeout { .. }) => {
                record(&|r| r.timeouts += 1);
                continue;
            }
            Err(Error::Lost { .. }) => {
                record(&|r| r.lost += 1);
                continue;
            }
            Err(_) => {
                record(&|r| r.errors += 1);
                continue;
            }
        };
        let guard_id = ((id as u64) << 32) | op as u64;
        let mut start = Instant::now();
        if rng.random_bool(0.2) {
            let held = guard.mode();
            // The incomparable pair (PR and CW) gets a share of its own: it is where a client that
            // cannot know the outcome must fall back to the meet.
            let target = match held {
                LockMode::PR if rng.random_bool(0.3) => LockMode::CW,
                LockMode::CW if rng.random_bool(0.3) => LockMode::PR,
                _ => random_mode(&mut rng),
            };
            let token = guard.fencing_token();
            let called = Instant::now();
            push(
                &report,
                name,
                guard_id,
                held,
                token,
                start,
                end_of(&guard, called),
            );
            let converted = tokio::time::timeout(
                Duration::from_millis(rng.random_range(5..60)),
                guard.convert(target),
            )
            .await;
            // While the conversion is in flight the holder may rely only on what both the old and
            // the new mode allow.
            push(
                &report,
                name,
                guard_id,
                held.meet(target),
                token,
                called,
                end_of(&guard, Instant::now()),
            );
            start = Instant::now();
            match converted {
                Ok(Ok(())) => record(&|r| r.conversions += 1),
                Ok(Err(Error::ConversionDeadlock { .. })) => record(&|r| r.deadlocks += 1),
                _ => {}
            }
        }
        let end = if rng.random_bool(LONG_HOLDS) {
            // A hold across renewals (and, when a fault strikes, across the loss of the lease): the
            // holder works until its lock is lost or its work is done, as a careful user would, so a
            // late lost() or a too-long validity window shows up as an overlap.
            let work = ttl.mul_f64(rng.random_range(0.3..2.0));
            tokio::select! {
                _ = guard.lost() => Instant::now(),
                _ = tokio::time::sleep(work) => Instant::now(),
            }
        } else {
            if rng.random_bool(0.5) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..3))).await;
            } else {
                tokio::task::yield_now().await;
            }
            end_of(&guard, Instant::now())
        };
        push(
            &report,
            name,
            guard_id,
            guard.mode(),
            guard.fencing_token(),
            start,
            end,
        );
        if guard.status().state == dlock::LeaseState::Lost {
            record(&|r| r.lost += 1);
        }
        if guard.release().await.is_err() {
            record(&|r| r.errors += 1);
        }
    }
    Ok(())
}

/// A holder that does not watch `lost()` relies on the lock until `now` or the end of its validity
/// window, whichever is first.
fn end_of(guard: &Guard, now: Instant) -> Instant {
    now.min(guard.status().valid_until)
}

fn push(
    report: &Mutex<Report>,
    name: usize,
    guard: u64,
    mode: LockMode,
    token: u64,
    start: Instant,
    end: Instant,
) {
    if end > start {
        report
            .lock()
            .expect("not poisoned")
            .intervals
            .push(Interval {
                name,
                guard,
                mode,
                token,
                start,
                end,
            });
    }
}
