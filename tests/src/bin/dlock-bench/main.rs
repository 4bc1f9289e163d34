//! The dlock bench tool: measures a driver side by side with its baselines — raw store floors and the
//! peers (`rslock` on Redis, etcd's Lock RPC on etcd) — in the same rounds, the sides taking turns in
//! slices so noise hits both alike, and reports medians of per-round ratios (the machines here are
//! small and shared: never trust one absolute time). BENCHMARKS.md has the results and how to read
//! them.
//!
//! ```text
//! cargo run --release -p dlock-tests --bin dlock-bench -- --driver redis --rounds 5 --json target/bench-redis.jsonl
//! cargo run --release -p dlock-tests --bin dlock-bench -- --driver etcd --quick --only uncontended,handoff
//! cargo run --release -p dlock-tests --bin dlock-bench -- --markdown BENCHMARKS.md target/bench-*.jsonl
//! ```
//!
//! Scenarios (`--only` names the groups; each runs `--rounds` times):
//! - **held**: 10,000 locks held on one client for three TTLs: store operations per TTL/3 spent
//!   renewing them, and client heap per held lock (from a counting allocator). First, while the
//!   process is small.
//! - **uncontended**: acquire + release on one name, rate and median cycle time, against the raw
//!   floor (the same two round trips done raw) and the peer.
//! - **handoff**: 8 clients in line for one `EX` lock; release → next grant, p50 and p99, against one
//!   raw store round trip and the peer's handoff; store operations per handoff, against the peer's.
//! - **many**: 1, 4, 16 and 64 tasks on one client, each on names of its own; acquires/s and the
//!   ratio to one task.
//! - **queue**: store operations per acquire + release with 0, 1, 16, 64 and 256 waiters in line
//!   (separate clients), from the store's own counters: flat means no thundering herd.
//! - **mixed**: 16 clients on one name, 90 % `PR` and 10 % `PW`/`EX`, against the same clients all
//!   `EX`: cycles/s and the longest wait of a writer.
//!
//! `--json FILE` writes one object per line: `{"driver", "scenario", "baseline", "ours", "theirs",
//! "unit", "advantage"}` (plus `advantage_min`/`advantage_max`, and `error` when a scenario could not
//! be measured); `advantage` > 1 means dlock is better (ours/theirs for rates, theirs/ours for
//! latencies and costs). `--markdown FILE JSONL…` rewrites the generated part of FILE from such files.

mod alloc;
mod markdown;
mod peers;
mod record;
mod store;
mod workloads;

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dlock::Locks;
use tokio::time::Instant;

use peers::Peer;
use record::{micros, percentile, Better, Report, Series};
use store::{Store, Target};
use workloads::{Tally, Timed};

#[global_allocator]
static ALLOC: alloc::CountingAlloc = alloc::CountingAlloc;

/// The lease TTL of every scenario but the held-locks one.
pub const TTL: Duration = Duration::from_secs(10);

/// Long enough that the renewals of 257 waiting entries are noise beside the handoffs being counted.
const QUEUE_TTL: Duration = Duration::from_secs(30);

pub const UNCONTENDED: &str = "uncontended acquire + release, one name";
pub const UNCONTENDED_P50: &str = "uncontended acquire + release, one name: cycle time p50";
pub const HANDOFF_P50: &str = "handoff p50, 8 clients in line for one EX lock";
pub const HANDOFF_P99: &str = "handoff p99, 8 clients in line for one EX lock";
pub const HANDOFF_OPS: &str = "store operations per handoff, 8 clients";
pub const MIXED_RATE: &str = "16 clients on one name, PR 90 % / PW+EX 10 %: cycles";
pub const MIXED_WAIT: &str = "16 clients on one name, PR 90 % / PW+EX 10 %: longest writer wait";
pub const TARGET_MEMORY: &str = "issue 12 target, 2 KiB";
pub const RENEWAL_BASELINE: &str = "a renewal per lock per TTL/3";

pub fn many_names(tasks: usize) -> String {
    format!("many names, {tasks} tasks on one client")
}
pub fn queue_cost(waiters: usize) -> String {
    let s = if waiters == 1 { "" } else { "s" };
    format!("store operations per acquire + release, {waiters} waiter{s}")
}
pub fn renewal_store(held: usize) -> String {
    format!("renewal store operations per TTL/3, {held} locks held")
}
pub fn renewal_driver(held: usize) -> String {
    format!("renewal calls into the driver per TTL/3, {held} locks held")
}
pub fn heap_per_lock(held: usize) -> String {
    format!("client heap per held lock, {held} held")
}

struct Options {
    target: Target,
    rounds: Option<usize>,
    scale: f64,
    quick: bool,
    json: Option<String>,
    markdown: Option<(String, Vec<String>)>,
    /// Scenario groups to run; all when empty.
    only: Vec<String>,
}

const GROUPS: [&str; 6] = ["uncontended", "handoff", "many", "queue", "held", "mixed"];

const USAGE: &str = "usage: dlock-bench [--driver memory|redis|etcd|jetstream] [--rounds N] [--scale F] [--quick] [--json FILE]\n                   [--only uncontended,handoff,many,queue,held,mixed]\n       dlock-bench --markdown FILE JSONL...";

fn parse() -> Result<Options> {
    let mut options = Options {
        target: Target::Memory,
        rounds: None,
        scale: 1.0,
        quick: false,
        json: None,
        markdown: None,
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--driver" => options.target = Target::parse(&value()?)?,
            "--rounds" => options.rounds = Some(value()?.parse().context("--rounds")?),
            "--scale" => options.scale = value()?.parse().context("--scale")?,
            "--quick" => options.quick = true,
            "--json" => options.json = Some(value()?),
            "--only" => {
                for group in value()?.split(',') {
                    if !GROUPS.contains(&group) {
                        bail!("--only {group:?}: the groups are {}", GROUPS.join(", "));
                    }
                    options.only.push(group.to_owned());
                }
            }
            "--markdown" => {
                let file = value()?;
                options.markdown = Some((file, args.by_ref().collect()));
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    if options.rounds == Some(0) {
        bail!("--rounds must be at least 1");
    }
    if options.scale.is_nan() || options.scale <= 0.0 {
        bail!("--scale must be above 0");
    }
    Ok(options)
}

/// How big each scenario is.
struct Plan {
    rounds: usize,
    /// One timed run of one side.
    run: Duration,
    /// Each round's run is cut into this many slices, the sides taking turns slice by slice, so a
    /// burst of load from elsewhere on the machine lands on both.
    slices: u32,
    held: Vec<usize>,
    held_ttl: Duration,
    held_rounds: usize,
    /// The window over which the queue-cost scenario counts handoffs.
    window: workloads::Window,
}

impl Plan {
    fn new(options: &Options) -> Self {
        let quick = options.quick;
        let rounds = options.rounds.unwrap_or(if quick { 1 } else { 5 });
        let run = Duration::from_secs_f64(if quick { 0.3 } else { 1.0 } * options.scale);
        let big = if quick { 2_000 } else { 10_000 };
        // On etcd the target is O(1) in the locks held, which takes two sizes to see.
        let held = if options.target == Target::Etcd {
            vec![big / 10, big]
        } else {
            vec![big]
        };
        Plan {
            rounds,
            run,
            slices: if quick { 3 } else { 10 },
            held,
            // Long enough that 10,000 renewals per TTL/3 are a load the store can carry here.
            held_ttl: Duration::from_secs(if quick { 2 } else { 5 }),
            held_rounds: if quick { 1 } else { rounds.min(3) },
            window: workloads::Window {
                grants: ((if quick { 100.0 } else { 300.0 }) * options.scale).ceil() as usize,
                soft: Duration::from_secs(if quick { 3 } else { 10 }),
                hard: Duration::from_secs(if quick { 10 } else { 60 }),
                ramp: Duration::from_secs(if quick { 10 } else { 60 }),
            },
        }
    }
}

/// Progress on stderr, so stdout stays the table.
struct Progress {
    driver: &'static str,
    start: Instant,
}

impl Progress {
    fn step(&self, what: &str, round: usize, rounds: usize) {
        eprintln!(
            "[{} +{:>5.1}s] {what}: round {}/{rounds}",
            self.driver,
            self.start.elapsed().as_secs_f64(),
            round + 1
        );
    }
}

/// Whether slice `slice` of round `round` runs dlock first; it alternates along both, so neither side
/// always gets the warmer or the quieter turn.
fn ours_first(round: usize, slice: u32) -> bool {
    (round + slice as usize).is_multiple_of(2)
}

async fn clients(store: &Store, n: usize) -> Result<Vec<Locks>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(store.locks().await?);
    }
    workloads::warm(&out).await?;
    Ok(out)
}

async fn peer(store: &Store, clients: usize) -> Result<Option<Peer>> {
    Ok(match (&store.redis, &store.etcd) {
        (Some(server), _) => Some(Peer::rslock(&server.url(), clients).await?),
        (_, Some((server, _))) => Some(Peer::etcd_lock(&server.endpoint(), clients).await?),
        _ => None,
    })
}

async fn uncontended(store: &Store, plan: &Plan, report: &mut Report, p: &Progress) -> Result<()> {
    let locks = clients(store, 1).await?.remove(0);
    let peer = peer(store, 1).await?;
    let (mut vs_floor, mut vs_peer) = (Series::default(), Series::default());
    let (mut p50_floor, mut p50_peer) = (Series::default(), Series::default());
    let slice = plan.run / plan.slices;
    for round in 0..plan.rounds {
        p.step("uncontended", round, plan.rounds);
        let (mut ours, mut floor, mut theirs) =
            (Timed::default(), Timed::default(), Timed::default());
        for s in 0..plan.slices {
            // dlock, the floor, the peer; or the other way round.
            let mut sides = [0, 1, 2];
            if !ours_first(round, s) {
                sides.reverse();
            }
            for side in sides {
                match (side, &peer) {
                    (0, _) => ours.add(workloads::uncontended(&locks, slice).await?),
                    (1, _) => floor.add(store.raw_floor(slice, 3, workloads::MAX_CYCLES).await?),
                    (_, Some(peer)) => theirs.add(peer.uncontended(slice).await?),
                    (_, None) => {}
                }
            }
        }
        vs_floor.push(ours.tally.rate(), floor.tally.rate(), Better::Higher);
        let p50 = |t: &mut Timed| micros(percentile(&mut t.cycle_times, 0.5));
        p50_floor.push(p50(&mut ours), p50(&mut floor), Better::Lower);
        if peer.is_some() {
            vs_peer.push(ours.tally.rate(), theirs.tally.rate(), Better::Higher);
            p50_peer.push(p50(&mut ours), p50(&mut theirs), Better::Lower);
        }
    }
    report.add(UNCONTENDED, store.floor_label(), "cycles/s", &vs_floor)?;
    if let Some(peer) = &peer {
        report.add(UNCONTENDED, peer.uncontended_label(), "cycles/s", &vs_peer)?;
    }
    report.add(UNCONTENDED_P50, store.floor_label(), "µs", &p50_floor)?;
    if let Some(peer) = &peer {
        report.add(UNCONTENDED_P50, peer.uncontended_label(), "µs", &p50_peer)?;
    }
    Ok(())
}

/// Handoffs of one side, summed over the slices of a round, with what they cost the store.
#[derive(Default)]
struct Side {
    handoffs: workloads::Handoffs,
    ops: store::Counters,
}

impl Side {
    async fn run<F>(&mut self, store: &Store, run: F) -> Result<()>
    where
        F: Future<Output = Result<workloads::Handoffs>>,
    {
        let before = store.counters().await?;
        let handoffs = run.await?;
        let d = store.counters().await? - before;
        self.ops.primary += d.primary;
        self.ops.secondary += d.secondary;
        self.handoffs.merge(handoffs);
        Ok(())
    }

    /// p50 and p99 in µs, and the store operations per grant.
    fn finish(mut self) -> Result<(f64, f64, store::Counters)> {
        if self.handoffs.samples.is_empty() {
            bail!("a handoff run measured no handoffs");
        }
        let grants = self.handoffs.grants.max(1) as f64;
        let samples = &mut self.handoffs.samples;
        Ok((
            micros(percentile(samples, 0.5)),
            micros(percentile(samples, 0.99)),
            store::Counters {
                primary: self.ops.primary / grants,
                secondary: self.ops.secondary / grants,
            },
        ))
    }
}

async fn handoff(store: &Store, plan: &Plan, report: &mut Report, p: &Progress) -> Result<()> {
    const CLIENTS: usize = 8;
    let ours_clients = clients(store, CLIENTS).await?;
    let peer = peer(store, CLIENTS).await?;
    let (mut p50_rtt, mut p99_rtt) = (Series::default(), Series::default());
    let (mut p50_peer, mut p99_peer, mut ops_peer, mut ops_peer2) = (
        Series::default(),
        Series::default(),
        Series::default(),
        Series::default(),
    );
    // Twice the usual run in half as many slices: there are fewer handoffs than cycles per second,
    // p99 needs samples, and each slice loses its first grant (no release before it).
    let slices = plan.slices.div_ceil(2);
    let slice = plan.run * 2 / slices;
    for round in 0..plan.rounds {
        p.step("handoff", round, plan.rounds);
        let (mut ours, mut theirs) = (Side::default(), Side::default());
        for s in 0..slices {
            let ours_run = async {
                workloads::handoffs(
                    &ours_clients,
                    "bench/handoff",
                    TTL,
                    Some(Instant::now() + slice),
                    workloads::MAX_CYCLES,
                )
                .await
            };
            let theirs_run = async {
                let deadline = Instant::now() + slice;
                match &peer {
                    Some(peer) => peer.handoffs(deadline).await,
                    None => workloads::tokio_mutex_handoffs(CLIENTS, deadline).await,
                }
            };
            if ours_first(round, s) {
                ours.run(store, ours_run).await?;
                theirs.run(store, theirs_run).await?;
            } else {
                theirs.run(store, theirs_run).await?;
                ours.run(store, ours_run).await?;
            }
        }
        let mut rtt = store.round_trips(200).await?;
        let (o50, o99, ours_ops) = ours.finish()?;
        let (t50, t99, theirs_ops) = theirs.finish()?;
        p50_rtt.push(o50, micros(percentile(&mut rtt, 0.5)), Better::Lower);
        p99_rtt.push(o99, micros(percentile(&mut rtt, 0.99)), Better::Lower);
        p50_peer.push(o50, t50, Better::Lower);
        p99_peer.push(o99, t99, Better::Lower);
        if peer.is_some() {
            ops_peer.push(ours_ops.primary, theirs_ops.primary, Better::Lower);
            ops_peer2.push(ours_ops.secondary, theirs_ops.secondary, Better::Lower);
        }
    }
    report.add(HANDOFF_P50, store.round_trip_label(), "µs", &p50_rtt)?;
    report.add(HANDOFF_P99, store.round_trip_label(), "µs", &p99_rtt)?;
    let peer_label = peer
        .as_ref()
        .map_or("tokio Mutex handoff", Peer::handoff_label);
    report.add(HANDOFF_P50, peer_label, "µs", &p50_peer)?;
    report.add(HANDOFF_P99, peer_label, "µs", &p99_peer)?;
    report.add(HANDOFF_OPS, peer_label, store.counter_labels().0, &ops_peer)?;
    if let (Some(secondary), Target::Etcd) = (store.counter_labels().1, store.target) {
        // The Lock RPC does its reads and writes inside the server, where gRPC counts none of them.
        let name = format!("{HANDOFF_OPS}, as {secondary}");
        report.add(&name, peer_label, secondary, &ops_peer2)?;
    }
    Ok(())
}

async fn many(store: &Store, plan: &Plan, report: &mut Report, p: &Progress) -> Result<()> {
    const TASKS: [usize; 4] = [1, 4, 16, 64];
    let locks = clients(store, 1).await?.remove(0);
    let mut series: Vec<Series> = TASKS.iter().map(|_| Series::default()).collect();
    let slice = plan.run / plan.slices;
    for round in 0..plan.rounds {
        p.step("many names", round, plan.rounds);
        let mut tallies = [Tally::default(); TASKS.len()];
        for s in 0..plan.slices {
            let order: Vec<usize> = if ours_first(round, s) {
                (0..TASKS.len()).collect()
            } else {
                (0..TASKS.len()).rev().collect()
            };
            for i in order {
                tallies[i].add(workloads::many_names(&locks, TASKS[i], slice).await?);
            }
        }
        for (i, s) in series.iter_mut().enumerate().skip(1) {
            s.push(tallies[i].rate(), tallies[0].rate(), Better::Higher);
        }
    }
    for (i, s) in series.iter().enumerate().skip(1) {
        report.add(&many_names(TASKS[i]), "the same, 1 task", "acquires/s", s)?;
    }
    Ok(())
}

async fn queue(store: &Store, plan: &Plan, report: &mut Report, p: &Progress) -> Result<()> {
    const WAITERS: [usize; 5] = [0, 1, 16, 64, 256];
    let renewals = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut line = Vec::with_capacity(WAITERS[WAITERS.len() - 1] + 1);
    for _ in 0..line.capacity() {
        line.push(store.counted_locks(renewals.clone()).await?);
    }
    workloads::warm(&line).await?;
    let (primary, secondary) = store.counter_labels();
    // Per waiter count: (primary, secondary) per handoff, for each round; or why it failed.
    let mut per: Vec<Vec<(f64, f64)>> = WAITERS.iter().map(|_| Vec::new()).collect();
    let mut failed: Vec<Option<anyhow::Error>> = WAITERS.iter().map(|_| None).collect();
    let mut floor: Vec<(f64, f64)> = Vec::new();
    for round in 0..plan.rounds {
        store.quiesce().await?;
        let before = store.counters().await?;
        let cycles = plan.window.grants;
        store.raw_floor(Duration::ZERO, cycles, cycles).await?;
        let d = store.counters().await? - before;
        floor.push((d.primary / cycles as f64, d.secondary / cycles as f64));
        for (i, &waiters) in WAITERS.iter().enumerate() {
            if failed[i].is_some() {
                continue;
            }
            p.step(
                &format!("queue cost, {waiters} waiters"),
                round,
                plan.rounds,
            );
            store.quiesce().await?;
            let name = format!("bench/queue/{round}/{waiters}");
            match workloads::queue_cost(store, &line, &name, waiters, QUEUE_TTL, plan.window).await
            {
                Ok(q) => per[i].push((
                    q.counters.primary / q.grants as f64,
                    q.counters.secondary / q.grants as f64,
                )),
                Err(err) => {
                    eprintln!(
                        "[{}] queue cost with {waiters} waiters failed: {err:#}",
                        p.driver
                    );
                    failed[i] = Some(err);
                }
            }
        }
    }
    let mut emit = |label: &str, pick: fn(&(f64, f64)) -> f64, suffix: &str| -> Result<()> {
        let series = |ours: &[(f64, f64)], theirs: &[(f64, f64)]| {
            let mut s = Series::default();
            for (o, t) in ours.iter().zip(theirs) {
                s.push(pick(o), pick(t), Better::Lower);
            }
            s
        };
        for (i, &waiters) in WAITERS.iter().enumerate() {
            let name = format!("{}{suffix}", queue_cost(waiters));
            let (baseline, theirs) = match i {
                0 => (store.floor_label(), &floor),
                1 => ("0 waiters", &per[0]),
                _ => ("1 waiter", &per[1]),
            };
            // The in-memory floor makes its calls on a driver of its own, which nothing counts; and the
            // floor's commands are round trips by construction, which the second count cannot see.
            if i == 0 && (store.target == Target::Memory || !suffix.is_empty()) {
                continue;
            }
            match &failed[i] {
                Some(err) => report.fail(&name, baseline, label, err)?,
                None => report.add(&name, baseline, label, &series(&per[i], theirs))?,
            }
        }
        Ok(())
    };
    emit(primary, |x| x.0, "")?;
    if let Some(secondary) = secondary {
        emit(secondary, |x| x.1, &format!(", as {secondary}"))?;
    }
    Ok(())
}

async fn held(store: &Store, plan: &Plan, report: &mut Report, p: &Progress) -> Result<()> {
    let (primary, secondary) = store.counter_labels();
    for &n in &plan.held {
        let (mut ops, mut ops2, mut calls, mut heap, mut lost) = (
            Series::default(),
            Series::default(),
            Series::default(),
            Series::default(),
            Series::default(),
        );
        let mut any_secondary = false;
        let mut any_lost = false;
        for round in 0..plan.held_rounds {
            p.step(&format!("{n} held locks"), round, plan.held_rounds);
            let h = workloads::held(store, n, plan.held_ttl).await?;
            ops.push(h.store_per_period.primary, n as f64, Better::Lower);
            ops2.push(h.store_per_period.secondary, n as f64, Better::Lower);
            calls.push(h.driver_per_period, n as f64, Better::Lower);
            heap.push(h.heap_per_lock, 2048.0, Better::Lower);
            lost.push(h.lost as f64, n as f64, Better::Lower);
            any_secondary |= h.store_per_period.secondary > 0.0;
            if h.lost > 0 {
                eprintln!(
                    "[{}] {} of {n} held locks were lost while held",
                    p.driver, h.lost
                );
                any_lost = true;
            }
        }
        report.add(&renewal_store(n), RENEWAL_BASELINE, primary, &ops)?;
        if any_lost {
            report.add(
                &format!("locks lost while held, {n} held"),
                "locks held",
                "locks",
                &lost,
            )?;
        }
        // etcd's renewals are lease keepalives, which touch no key: zero MVCC operations is no ratio.
        if let (Some(secondary), true) = (secondary, any_secondary) {
            let name = format!("{}, as {secondary}", renewal_store(n));
            report.add(&name, RENEWAL_BASELINE, secondary, &ops2)?;
        }
        // In memory the store's count is the driver's.
        if store.target != Target::Memory {
            report.add(&renewal_driver(n), RENEWAL_BASELINE, "driver calls", &calls)?;
        }
        report.add(&heap_per_lock(n), TARGET_MEMORY, "bytes", &heap)?;
    }
    Ok(())
}

async fn mixed(store: &Store, plan: &Plan, report: &mut Report, p: &Progress) -> Result<()> {
    let clients = clients(store, 16).await?;
    let (mut rate, mut wait) = (Series::default(), Series::default());
    let slices = plan.slices.div_ceil(2);
    let slice = plan.run * 2 / slices;
    for round in 0..plan.rounds {
        p.step("mixed modes", round, plan.rounds);
        let (mut mixed, mut ex) = (workloads::Mixed::default(), workloads::Mixed::default());
        for s in 0..slices {
            if ours_first(round, s) {
                mixed.merge(workloads::mixed(&clients, slice, true).await?);
                ex.merge(workloads::mixed(&clients, slice, false).await?);
            } else {
                ex.merge(workloads::mixed(&clients, slice, false).await?);
                mixed.merge(workloads::mixed(&clients, slice, true).await?);
            }
        }
        rate.push(mixed.tally.rate(), ex.tally.rate(), Better::Higher);
        wait.push(
            micros(mixed.longest_writer_wait),
            micros(ex.longest_writer_wait),
            Better::Lower,
        );
    }
    report.add(MIXED_RATE, "the same clients, all EX", "cycles/s", &rate)?;
    report.add(MIXED_WAIT, "longest wait, all EX", "µs", &wait)?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let options = parse()?;
    if let Some((file, inputs)) = &options.markdown {
        return markdown::update(file, inputs);
    }
    // On a runtime worker, as an application's code would be: `main`'s own thread is outside the
    // worker pool, and every wake-up of a task spawned from it would cross threads.
    tokio::spawn(run(options)).await?
}

async fn run(options: Options) -> Result<()> {
    let plan = Plan::new(&options);
    let driver = options.target.name();
    let progress = Progress {
        driver,
        start: Instant::now(),
    };
    eprintln!("[{driver}] starting the store");
    let store = Store::start(options.target).await?;
    println!(
        "dlock-bench: driver {driver}, {} rounds{}; medians, advantage > 1 means dlock is better",
        plan.rounds,
        if options.quick { " (quick)" } else { "" }
    );
    let mut report = Report::new(driver, options.json.as_deref())?;
    let wanted = |group: &str| options.only.is_empty() || options.only.iter().any(|g| g == group);
    // First, while the process is small and no earlier scenario's connections are being torn down.
    if wanted("held") {
        held(&store, &plan, &mut report, &progress).await?;
    }
    if wanted("uncontended") {
        uncontended(&store, &plan, &mut report, &progress).await?;
    }
    if wanted("handoff") {
        handoff(&store, &plan, &mut report, &progress).await?;
    }
    if wanted("many") {
        many(&store, &plan, &mut report, &progress).await?;
    }
    if wanted("queue") {
        queue(&store, &plan, &mut report, &progress).await?;
    }
    if wanted("mixed") {
        mixed(&store, &plan, &mut report, &progress).await?;
    }
    eprintln!(
        "[{driver}] done in {:.1}s",
        progress.start.elapsed().as_secs_f64()
    );
    Ok(())
}
