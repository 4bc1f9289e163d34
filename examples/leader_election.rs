//! Leader election: four candidates campaign for one `EX` lock, and whoever holds it leads.
//!
//! Each candidate is a "process" of its own — its own thread, runtime and client — queued in FIFO
//! order for the office. The leader works (a heartbeat into a shared log, stamped with its fencing
//! token) inside `tokio::select!` beside `guard.lost()`, and checks `is_valid()` before each write.
//! Four terms show the ways a term ends:
//!
//! 1. the leader resigns (`release()`), and the next candidate takes over at once;
//! 2. the leader freezes — its whole process stops, lease keeper included, as in a long GC pause or
//!    SIGSTOP — so its lease runs out and the next candidate takes over; when it wakes, its guard is
//!    invalid at once and `lost()` fires, and it steps down without writing;
//! 3. the leader crashes (its runtime is torn down with the lock held, nothing is released), and
//!    the next candidate takes over when the lease ends;
//! 4. the last leader resigns.
//!
//! The program checks that no leader took office while an earlier one's validity window was still
//! open, that fencing tokens strictly increase from term to term, and that the log never took a
//! heartbeat with a token lower than one it had already seen. It exits non-zero otherwise.
//!
//! ```text
//! cargo run --example leader_election                                   # in-memory driver
//! cargo run --example leader_election --features redis -- --url redis://127.0.0.1:6379
//! ```

mod common;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use dlock::{Guard, LeaseState, LeaseStatus, LockMode};
use tokio::sync::watch;
use tokio::time::Instant;

const OFFICE: &str = "office/leader";
const CANDIDATES: [&str; 4] = ["ada", "brian", "chen", "dora"];
const HEARTBEATS_PER_TERM: usize = 5;
const HEARTBEAT: Duration = Duration::from_millis(50);
/// Short enough that the takeovers after a freeze and a crash are quick to watch.
const SHORT_TTL: Duration = Duration::from_millis(500);
/// Hang guards: far above what any step needs.
const CAMPAIGN_LIMIT: Duration = Duration::from_secs(60);
const FREEZE_LIMIT: Duration = Duration::from_secs(30);

/// How the term with this index ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Script {
    Resign,
    Freeze,
    Crash,
}

fn script(term: usize) -> Script {
    match term {
        1 => Script::Freeze,
        2 => Script::Crash,
        _ => Script::Resign,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    Resigned,
    SteppedDownAfterLoss,
    Crashed,
}

/// What every candidate can see: the terms so far and the heartbeat log. It stands in for the
/// outside world the leader acts on; the check that no two leaders overlap lives here.
struct Board {
    state: Mutex<BoardState>,
    changed: Condvar,
}

#[derive(Default)]
struct BoardState {
    terms: Vec<Term>,
    /// The highest fencing token seen: of a heartbeat, or of a leader taking office.
    highest_token: u64,
    violations: Vec<String>,
}

struct Term {
    leader: &'static str,
    token: u64,
    /// The leader's lease as its guard sees it: whether, and until when, it may believe it leads.
    lease: watch::Receiver<LeaseStatus>,
    heartbeats: usize,
    /// When the leader stopped working (resigned, froze or crashed), to time the takeover.
    silent_since: Option<Instant>,
    ending: Option<Ending>,
}

impl Board {
    fn state(&self) -> MutexGuard<'_, BoardState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new leader and returns its term. At this moment the new leader starts to believe
    /// it leads, so every earlier leader's validity window must be over.
    fn begin_term(&self, leader: &'static str, guard: &Guard) -> usize {
        let now = Instant::now();
        let token = guard.fencing_token();
        let mut s = self.state();
        let mut violations = Vec::new();
        for earlier in &s.terms {
            let status = *earlier.lease.borrow();
            let believes = matches!(status.state, LeaseState::Held | LeaseState::Suspect)
                && now < status.valid_until;
            if believes {
                violations.push(format!(
                    "{leader} took office while {} still believed it led (for {:?} more)",
                    earlier.leader,
                    status.valid_until - now
                ));
            }
        }
        if let Some(last) = s.terms.last() {
            if token <= last.token {
                violations.push(format!(
                    "{leader}'s token {token} is not above {}'s {}",
                    last.leader, last.token
                ));
            }
            let takeover = last.silent_since.map(|t| now - t).unwrap_or_default();
            println!(
                "{leader}: takes office {takeover:?} after {} went silent (token {token})",
                last.leader
            );
        } else {
            println!("{leader}: takes office first (token {token})");
        }
        s.violations.extend(violations);
        // Taking office raises the fence at once, so that a deposed leader's write is refused even
        // before the new leader's first heartbeat.
        s.highest_token = s.highest_token.max(token);
        s.terms.push(Term {
            leader,
            token,
            lease: guard.watch(),
            heartbeats: 0,
            silent_since: None,
            ending: None,
        });
        self.changed.notify_all();
        s.terms.len() - 1
    }

    /// A leader's write to the outside world, refused, as fenced storage would, when a newer
    /// leader has taken office.
    fn heartbeat(&self, term: usize, token: u64) -> anyhow::Result<()> {
        let mut s = self.state();
        if token < s.highest_token {
            let msg = format!(
                "{} wrote with token {token} after token {} had taken office",
                s.terms[term].leader, s.highest_token
            );
            s.violations.push(msg);
            bail!("its heartbeat with token {token} was refused: a newer leader has taken office");
        }
        s.highest_token = token;
        s.terms[term].heartbeats += 1;
        Ok(())
    }

    fn went_silent(&self, term: usize) {
        self.state().terms[term].silent_since = Some(Instant::now());
    }

    fn ended(&self, term: usize, ending: Ending) {
        self.state().terms[term].ending = Some(ending);
    }

    /// Blocks the calling thread until term `term` has begun.
    fn wait_for_term(&self, term: usize, limit: Duration) -> anyhow::Result<()> {
        let s = self.state();
        let (s, waited) = self
            .changed
            .wait_timeout_while(s, limit, |s| s.terms.len() <= term)
            .unwrap_or_else(|p| p.into_inner());
        ensure!(
            !waited.timed_out(),
            "nobody took office within {limit:?} (terms so far: {})",
            s.terms.len()
        );
        Ok(())
    }
}

/// One candidate: its own thread and single-threaded runtime, so that freezing the thread stops
/// everything the "process" runs, and dropping the runtime is a crash.
fn candidate(
    me: &'static str,
    url: String,
    ttl: Duration,
    board: Arc<Board>,
) -> anyhow::Result<Ending> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ending = runtime.block_on(campaign(me, &url, ttl, &board));
    // After a crash the guard is still alive inside a task; dropping the runtime drops it with no
    // chance to release, as a dying process would: the store frees the lock when its lease ends.
    drop(runtime);
    ending
}

async fn campaign(
    me: &'static str,
    url: &str,
    ttl: Duration,
    board: &Board,
) -> anyhow::Result<Ending> {
    let locks = dlock::connect(url)
        .await
        .with_context(|| format!("{me}: connecting to {url}"))?;
    let guard = locks
        .lock(OFFICE)
        .mode(LockMode::EX)
        .ttl(ttl)
        .timeout(CAMPAIGN_LIMIT)
        .await
        .with_context(|| format!("{me}: campaigning"))?;
    let term = board.begin_term(me, &guard);
    let token = guard.fencing_token();
    let script = script(term);
    let mut ticker = tokio::time::interval(HEARTBEAT);
    let mut beats = 0;
    while beats < HEARTBEATS_PER_TERM {
        tokio::select! {
            biased;
            () = guard.lost() => {
                println!("{me}: lost() fired: steps down at once");
                board.ended(term, Ending::SteppedDownAfterLoss);
                return Ok(Ending::SteppedDownAfterLoss);
            }
            _ = ticker.tick() => {}
        }
        // lost() fires from the keeper task, which may not have run yet after a pause; the validity
        // deadline is known without it.
        if !guard.is_valid() {
            println!("{me}: wakes up; is_valid() is false at once: it steps down without writing");
            tokio::time::timeout(ttl, guard.lost())
                .await
                .with_context(|| format!("{me}: lost() did not fire within {ttl:?} of waking"))?;
            println!("{me}: lost() fired as well");
            board.ended(term, Ending::SteppedDownAfterLoss);
            return Ok(Ending::SteppedDownAfterLoss);
        }
        board.heartbeat(term, token)?;
        beats += 1;
        if script == Script::Freeze && beats == 2 {
            println!("{me}: freezes (think: a long GC pause), lease keeper and all");
            board.went_silent(term);
            // Blocking the thread on purpose: nothing on this runtime runs until someone else
            // has taken office, which can only happen once this lease has run out.
            board.wait_for_term(term + 1, FREEZE_LIMIT)?;
        }
    }
    board.went_silent(term);
    match script {
        Script::Resign => {
            println!("{me}: resigns after {beats} heartbeats");
            guard.release().await?;
            board.ended(term, Ending::Resigned);
            Ok(Ending::Resigned)
        }
        Script::Crash => {
            println!("{me}: crashes after {beats} heartbeats, holding the lock");
            board.ended(term, Ending::Crashed);
            tokio::spawn(async move {
                let _held = guard;
                std::future::pending::<()>().await
            });
            Ok(Ending::Crashed)
        }
        Script::Freeze => bail!("{me}: was frozen past its lease and yet still valid"),
    }
}

fn main() -> anyhow::Result<()> {
    let url = common::store_url("leader_election")?;
    let ttl = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let locks = dlock::connect(&url)
                .await
                .with_context(|| format!("connecting to {url}"))?;
            anyhow::Ok(SHORT_TTL.max(locks.capabilities().min_ttl))
        })?;
    println!(
        "{} candidates campaign for {OFFICE:?} on {url} (lease TTL {ttl:?})",
        CANDIDATES.len()
    );
    let board = Arc::new(Board {
        state: Mutex::default(),
        changed: Condvar::new(),
    });
    let candidates: Vec<_> = CANDIDATES
        .iter()
        .map(|&me| {
            let (url, board) = (url.clone(), Arc::clone(&board));
            std::thread::Builder::new()
                .name(me.to_owned())
                .spawn(move || candidate(me, url, ttl, board))
        })
        .collect::<Result<_, _>>()?;
    let mut failures = Vec::new();
    for (me, handle) in CANDIDATES.iter().zip(candidates) {
        match handle.join() {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => failures.push(format!("{me}: {err:#}")),
            Err(_) => failures.push(format!("{me}: panicked")),
        }
    }

    let s = board.state();
    println!("terms:");
    for (i, t) in s.terms.iter().enumerate() {
        let ending = t
            .ending
            .map_or("still in office".to_owned(), |e| format!("{e:?}"));
        println!(
            "  {}. {:<6} token {:>6}  {} heartbeats  {ending}",
            i + 1,
            t.leader,
            t.token,
            t.heartbeats,
        );
    }
    failures.extend(s.violations.iter().cloned());
    if s.terms.len() != CANDIDATES.len() {
        failures.push(format!(
            "{} terms, expected one per candidate ({})",
            s.terms.len(),
            CANDIDATES.len()
        ));
    }
    for (i, t) in s.terms.iter().enumerate() {
        let expected = match script(i) {
            Script::Resign => Ending::Resigned,
            Script::Freeze => Ending::SteppedDownAfterLoss,
            Script::Crash => Ending::Crashed,
        };
        if t.ending != Some(expected) {
            failures.push(format!(
                "term {} ({}) ended {:?}, expected {expected:?}",
                i + 1,
                t.leader,
                t.ending
            ));
        }
        if t.heartbeats == 0 {
            failures.push(format!("term {} ({}) did no work", i + 1, t.leader));
        }
    }
    if !failures.is_empty() {
        bail!("leader election went wrong:\n  {}", failures.join("\n  "));
    }
    println!(
        "ok: one leader at a time, fencing tokens strictly increasing across {} terms, no stale heartbeat",
        s.terms.len()
    );
    Ok(())
}
