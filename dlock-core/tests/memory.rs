//! The in-memory driver's lease, cancellation and conversion behaviour, on tokio's paused clock: time
//! only moves when every task waits, so "before", "after" and "at once" are exact, not timings.

use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dlock_core::{
    Capabilities, Driver, Enqueued, EntryInfo, EntryKey, EntryRequest, Error, Grant, LeaseState,
    LockMode, LockName, Locks, MemoryDriver, Queued, Renewal, Result,
};
use tokio::time::{timeout, Instant};

const TTL: Duration = Duration::from_secs(3);

/// The memory driver behind a switchable network cut: while cut, every call from this client hangs,
/// as it would against an unreachable store, while the store itself (and its clock) goes on.
#[derive(Clone)]
struct Partitionable {
    store: MemoryDriver,
    cut: Arc<AtomicBool>,
    /// While set, renewals fail at once with a store error (the store answers, but badly).
    failing_renewals: Arc<AtomicBool>,
    /// While set, conversions reach the store but their answers are held back.
    held_answers: Arc<tokio::sync::watch::Sender<bool>>,
    /// How many of the next enqueues, and of the next conversions, the store applies while the
    /// reply is lost (the caller gets a store error).
    lost_enqueue_replies: Arc<AtomicUsize>,
    lost_convert_replies: Arc<AtomicUsize>,
    /// How many of the conversions after those fail before they reach the store.
    refused_converts: Arc<AtomicUsize>,
    /// How many of the next renewals, and of the next releases, the store applies while the reply
    /// never comes.
    dropped_renew_replies: Arc<AtomicUsize>,
    dropped_release_replies: Arc<AtomicUsize>,
    /// Renewals of this name fail at once with a store error.
    failing_renewals_of: Arc<std::sync::Mutex<Option<String>>>,
    /// How many of the next waits fail with a store error after a moment (an election under way).
    failing_waits: Arc<AtomicUsize>,
}

/// Takes one from `counter` if it is above zero.
fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn lost_reply() -> Error {
    Error::backend_msg(
        "memory",
        "injected: the store applied the request, the reply was lost",
    )
}

impl Partitionable {
    fn new(store: &MemoryDriver) -> Self {
        Partitionable {
            store: store.clone(),
            cut: Arc::new(AtomicBool::new(false)),
            failing_renewals: Arc::new(AtomicBool::new(false)),
            held_answers: Arc::new(tokio::sync::watch::channel(false).0),
            lost_enqueue_replies: Arc::default(),
            lost_convert_replies: Arc::default(),
            refused_converts: Arc::default(),
            dropped_renew_replies: Arc::default(),
            dropped_release_replies: Arc::default(),
            failing_renewals_of: Arc::default(),
            failing_waits: Arc::default(),
        }
    }

    async fn gate(&self) {
        if self.cut.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

#[async_trait]
impl Driver for Partitionable {
    fn capabilities(&self) -> Capabilities {
        self.store.capabilities()
    }
    async fn enqueue(&self, request: &EntryRequest) -> Result<Enqueued> {
        self.gate().await;
        let answer = self.store.enqueue(request).await;
        if take_one(&self.lost_enqueue_replies) {
            return Err(lost_reply());
        }
        answer
    }
    async fn wait(&self, key: &EntryKey) -> Result<Grant> {
        self.gate().await;
        if take_one(&self.failing_waits) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Err(Error::backend_msg(
                "memory",
                "injected: no server answers for the queue",
            ));
        }
        self.store.wait(key).await
    }
    async fn renew(&self, key: &EntryKey, ttl: Duration) -> Result<Instant> {
        self.gate().await;
        let failing_name =
            self.failing_renewals_of.lock().unwrap().as_deref() == Some(key.name.as_str());
        if failing_name || self.failing_renewals.load(Ordering::SeqCst) {
            return Err(Error::backend_msg("memory", "injected renewal failure"));
        }
        let answer = self.store.renew(key, ttl).await;
        if take_one(&self.dropped_renew_replies) {
            std::future::pending::<()>().await;
        }
        answer
    }
    async fn release(&self, key: &EntryKey) -> Result<()> {
        self.gate().await;
        let answer = self.store.release(key).await;
        if take_one(&self.dropped_release_replies) {
            std::future::pending::<()>().await;
        }
        answer
    }
    async fn convert(&self, key: &EntryKey, mode: LockMode) -> Result<Queued> {
        self.gate().await;
        let lost = take_one(&self.lost_convert_replies);
        if !lost && take_one(&self.refused_converts) {
            return Err(Error::backend_msg(
                "memory",
                "injected: the store is unavailable",
            ));
        }
        let answer = self.store.convert(key, mode).await;
        let _ = self.held_answers.subscribe().wait_for(|held| !held).await;
        if lost {
            return Err(lost_reply());
        }
        answer
    }
    async fn inspect(&self, name: &LockName) -> Result<Vec<EntryInfo>> {
        self.gate().await;
        self.store.inspect(name).await
    }
    async fn raise_fence(&self, name: &LockName, floor: u64) -> Result<u64> {
        self.gate().await;
        self.store.raise_fence(name, floor).await
    }
}

fn name(s: &str) -> LockName {
    LockName::new(s).unwrap()
}

#[tokio::test(start_paused = true)]
async fn lease_expiry_frees_a_lock_nobody_renews() {
    let store = MemoryDriver::new();
    let crashed = EntryKey {
        name: name("x"),
        owner: dlock_core::OwnerId::parse("crashed-1").unwrap(),
    };
    let queued = store
        .enqueue(&EntryRequest {
            key: crashed,
            mode: LockMode::EX,
            ttl: TTL,
            wait: true,
        })
        .await
        .unwrap();
    assert!(matches!(queued.queued, Queued::Granted(_)));
    let locks = Locks::new(store);
    let start = Instant::now();
    assert!(locks
        .lock("x")
        .try_acquire()
        .await
        .unwrap_err()
        .is_would_block());
    let guard = locks.lock("x").timeout(TTL * 2).await.unwrap();
    assert_eq!(
        start.elapsed(),
        TTL,
        "granted exactly when the crashed holder's lease ran out"
    );
    assert!(guard.is_valid());
}

#[tokio::test(start_paused = true)]
async fn renewal_keeps_a_lock_past_three_ttls() {
    let locks = Locks::new(MemoryDriver::new());
    let guard = locks.lock("x").ttl(TTL).await.unwrap();
    tokio::time::sleep(TTL * 3 + TTL / 2).await;
    assert!(guard.is_valid());
    assert_eq!(guard.status().state, LeaseState::Held);
    assert!(locks
        .lock("x")
        .try_acquire()
        .await
        .unwrap_err()
        .is_would_block());
    assert!(guard.status().valid_until > Instant::now() + TTL / 2);
}

#[tokio::test(start_paused = true)]
async fn cut_off_holder_sees_lost_before_the_store_frees_the_lock() {
    let store = MemoryDriver::new();
    let holder_link = Partitionable::new(&store);
    let holder = Locks::new(holder_link.clone());
    let guard = holder.lock("x").ttl(TTL).await.unwrap();
    holder_link.cut.store(true, Ordering::SeqCst);
    let other = Locks::new(store.clone());
    let waiter = tokio::spawn(async move {
        let g = other.lock("x").await.unwrap();
        (Instant::now(), g)
    });
    guard.lost().await;
    let lost_at = Instant::now();
    assert_eq!(guard.status().state, LeaseState::Lost);
    assert!(!guard.is_valid());
    let entries = store.inspect(&name("x")).await.unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e.granted && e.owner == guard.entry_key().owner),
        "the store still holds the entry when the holder learns it lost it"
    );
    let (granted_at, _g) = waiter.await.unwrap();
    assert!(
        lost_at < granted_at,
        "lost at {lost_at:?}, next grant at {granted_at:?}"
    );
    assert!(lost_at <= guard.status().valid_until);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_waiting_acquire_lets_the_next_waiter_in_at_once() {
    let locks = Locks::new(MemoryDriver::new());
    let holder = locks.lock("x").ttl(TTL).await.unwrap();
    let dropped = tokio::spawn(locks.lock("x").ttl(TTL).into_future());
    let next = tokio::spawn(locks.lock("x").ttl(TTL).into_future());
    // Both waiters are queued once the clock may move.
    while locks.inspect("x").await.unwrap().len() < 3 {
        tokio::task::yield_now().await;
    }
    dropped.abort();
    while locks.inspect("x").await.unwrap().len() > 2 {
        tokio::task::yield_now().await;
    }
    holder.release().await.unwrap();
    let start = Instant::now();
    let guard = timeout(TTL / 2, next)
        .await
        .expect("granted without waiting for a ghost's lease")
        .unwrap()
        .unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    drop(guard);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_guard_releases_it() {
    let locks = Locks::new(MemoryDriver::new());
    let guard = locks.lock("x").ttl(TTL).await.unwrap();
    let waiter = tokio::spawn(locks.lock("x").ttl(TTL).into_future());
    drop(guard);
    let start = Instant::now();
    timeout(TTL / 2, waiter)
        .await
        .expect("granted before the lease could expire")
        .unwrap()
        .unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_release_dropped_before_it_ends_still_releases() {
    let locks = Locks::new(MemoryDriver::new());
    let guard = locks.lock("x").ttl(TTL).await.unwrap();
    let waiter = tokio::spawn(locks.lock("x").ttl(TTL).into_future());
    // The release future is dropped before it is ever polled.
    drop(guard.release());
    let start = Instant::now();
    timeout(TTL / 2, waiter)
        .await
        .expect("granted before the lease could expire")
        .unwrap()
        .unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_release_cancelled_while_the_store_is_cut_off_releases_once_it_answers() {
    let store = MemoryDriver::new();
    let link = Partitionable::new(&store);
    let guard = Locks::new(link.clone()).lock("x").ttl(TTL).await.unwrap();
    let waiter = tokio::spawn(Locks::new(store.clone()).lock("x").ttl(TTL).into_future());
    link.cut.store(true, Ordering::SeqCst);
    let release = tokio::spawn(guard.release());
    tokio::task::yield_now().await;
    release.abort();
    assert!(release.await.unwrap_err().is_cancelled());
    link.cut.store(false, Ordering::SeqCst);
    let start = Instant::now();
    timeout(TTL / 2, waiter)
        .await
        .expect("granted before the lease could expire")
        .unwrap()
        .unwrap();
    assert!(start.elapsed() < TTL / 2);
}

#[tokio::test(start_paused = true)]
async fn stale_release_never_removes_a_newer_holders_entry() {
    let store = MemoryDriver::new();
    let old_link = Partitionable::new(&store);
    let old = Locks::new(old_link.clone())
        .lock("x")
        .ttl(TTL)
        .await
        .unwrap();
    let old_key = old.entry_key().clone();
    old_link.cut.store(true, Ordering::SeqCst);
    old.lost().await;
    let newer = Locks::new(store.clone()).lock("x").ttl(TTL).await.unwrap();
    // The old holder's release arrives late, after the newer holder got the lock.
    store.release(&old_key).await.unwrap();
    store.release(&old_key).await.unwrap();
    let entries = store.inspect(&name("x")).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].owner, newer.entry_key().owner);
    assert!(newer.fencing_token() > old.fencing_token());
}

#[tokio::test(start_paused = true)]
async fn conversion_down_is_immediate_and_up_waits_for_other_holders() {
    let locks = Locks::new(MemoryDriver::new());
    let mut writer = locks.lock("x").mode(LockMode::EX).await.unwrap();
    let first_token = writer.fencing_token();
    writer.convert(LockMode::PR).await.unwrap();
    assert_eq!(writer.mode(), LockMode::PR);
    assert!(writer.fencing_token() > first_token);
    let reader = locks
        .lock("x")
        .mode(LockMode::PR)
        .try_acquire()
        .await
        .unwrap();
    let up = tokio::spawn(async move {
        writer.convert(LockMode::EX).await.unwrap();
        writer
    });
    while !locks
        .inspect("x")
        .await
        .unwrap()
        .iter()
        .any(|e| e.converting_to.is_some())
    {
        tokio::task::yield_now().await;
    }
    // The pending up-conversion goes before requests queued after it.
    assert!(locks
        .lock("x")
        .mode(LockMode::CR)
        .try_acquire()
        .await
        .unwrap_err()
        .is_would_block());
    let reader_token = reader.fencing_token();
    reader.release().await.unwrap();
    let writer = up.await.unwrap();
    assert_eq!(writer.mode(), LockMode::EX);
    assert!(writer.fencing_token() > reader_token);
}

#[tokio::test(start_paused = true)]
async fn mutual_up_conversions_fail_one_with_deadlock() {
    let locks = Locks::new(MemoryDriver::new());
    let mut a = locks.lock("x").mode(LockMode::PR).await.unwrap();
    let mut b = locks.lock("x").mode(LockMode::PR).await.unwrap();
    let a_up = tokio::spawn(async move {
        a.convert(LockMode::EX).await.unwrap();
        a
    });
    while !locks
        .inspect("x")
        .await
        .unwrap()
        .iter()
        .any(|e| e.converting_to.is_some())
    {
        tokio::task::yield_now().await;
    }
    let err = b.convert(LockMode::EX).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::ConversionDeadlock {
                from: LockMode::PR,
                to: LockMode::EX,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(b.mode(), LockMode::PR);
    b.release().await.unwrap();
    let a = a_up.await.unwrap();
    assert_eq!(a.mode(), LockMode::EX);
}

#[tokio::test(start_paused = true)]
async fn cancelled_conversion_is_withdrawn() {
    let locks = Locks::new(MemoryDriver::new());
    let mut a = locks.lock("x").mode(LockMode::PR).await.unwrap();
    let b = locks.lock("x").mode(LockMode::PR).await.unwrap();
    assert!(timeout(TTL, a.convert(LockMode::EX)).await.is_err());
    while locks
        .inspect("x")
        .await
        .unwrap()
        .iter()
        .any(|e| e.converting_to.is_some())
    {
        tokio::task::yield_now().await;
    }
    assert_eq!(a.mode(), LockMode::PR);
    locks
        .lock("x")
        .mode(LockMode::CR)
        .try_acquire()
        .await
        .unwrap();
    drop(b);
}

#[tokio::test(start_paused = true)]
async fn timeout_leaves_the_queue() {
    let locks = Locks::new(MemoryDriver::new());
    let _holder = locks.lock("x").await.unwrap();
    let err = locks
        .lock("x")
        .timeout(Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    while locks.inspect("x").await.unwrap().len() > 1 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn lock_all_takes_names_in_canonical_order_and_releases_on_failure() {
    let locks = Locks::new(MemoryDriver::new());
    let guards = locks.lock_all(["c", "a", "b", "a"]).await.unwrap();
    let names: Vec<&str> = guards.iter().map(|g| g.name().as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    drop(guards);
    let _b = locks.lock("b").await.unwrap();
    let err = locks
        .lock_all(["a", "b"])
        .timeout(Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.is_timeout());
    while !locks.inspect("a").await.unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let locks = Locks::new(MemoryDriver::new());
    let msg = locks.lock("").await.unwrap_err().to_string();
    assert!(msg.contains("must not be empty"), "{msg}");
    let long = "n".repeat(LockName::MAX_LEN + 1);
    let msg = locks.lock(long).await.unwrap_err().to_string();
    assert!(msg.contains("limit is 4096 bytes"), "{msg}");
    let msg = locks
        .lock("x")
        .ttl(Duration::ZERO)
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("TTL above zero"), "{msg}");
    let msg = locks
        .lock("x")
        .ttl(Duration::from_millis(1))
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("needs at least"), "{msg}");
    let msg = "writer".parse::<LockMode>().unwrap_err().to_string();
    assert!(msg.contains("unknown lock mode \"writer\""), "{msg}");
    assert!(
        locks.inspect("x").await.unwrap().is_empty(),
        "bad requests leave nothing queued"
    );
}

#[test]
fn metrics_count_acquires_and_hold_time() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let locks = Locks::new(MemoryDriver::new());
            let g = locks.lock("x").await.unwrap();
            assert!(locks.lock("x").try_acquire().await.is_err());
            g.release().await.unwrap();
        });
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let count = |outcome: &str| {
        snapshot
            .iter()
            .find(|(k, ..)| {
                k.key().name() == dlock_core::metrics::ACQUIRE_TOTAL
                    && k.key()
                        .labels()
                        .any(|l| l.key() == "outcome" && l.value() == outcome)
            })
            .map(|(.., v)| match v {
                DebugValue::Counter(c) => *c,
                _ => 0,
            })
    };
    assert_eq!(count("granted"), Some(1));
    assert_eq!(count("would_block"), Some(1));
    assert!(snapshot
        .iter()
        .any(|(k, ..)| k.key().name() == dlock_core::metrics::HOLD_SECONDS));
}

#[test]
fn hold_time_of_a_lost_lock_ends_with_its_validity() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let store = MemoryDriver::new();
            let link = Partitionable::new(&store);
            let guard = Locks::new(link.clone()).lock("x").ttl(TTL).await.unwrap();
            link.failing_renewals.store(true, Ordering::SeqCst);
            guard.lost().await;
            // The guard lives on long after the loss; the lock was not held meanwhile.
            tokio::time::sleep(TTL * 10).await;
            drop(guard);
        });
    });
    let held: Vec<f64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| k.key().name() == dlock_core::metrics::HOLD_SECONDS)
        .flat_map(|(.., v)| match v {
            DebugValue::Histogram(values) => values.into_iter().map(|v| v.into_inner()).collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(
        held[0] <= TTL.as_secs_f64(),
        "recorded {held:?} s for a TTL of {TTL:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn unreachable_store_fails_instead_of_hanging() {
    let store = MemoryDriver::new();
    let link = Partitionable::new(&store);
    let locks = Locks::new(link.clone());
    let guard = locks.lock("held").ttl(TTL).await.unwrap();
    link.cut.store(true, Ordering::SeqCst);
    let err = locks.lock("x").ttl(TTL).try_acquire().await.unwrap_err();
    assert!(err.to_string().contains("did not answer"), "{err}");
    let err = locks.lock("x").ttl(TTL).timeout(TTL / 3).await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let err = guard.release().await.unwrap_err();
    assert!(
        err.to_string().contains("did not confirm the release"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn failing_renewals_make_the_lease_suspect_then_held_again() {
    let store = MemoryDriver::new();
    let link = Partitionable::new(&store);
    let locks = Locks::new(link.clone());
    let guard = locks.lock("x").ttl(TTL).await.unwrap();
    let mut states = guard.watch();
    link.failing_renewals.store(true, Ordering::SeqCst);
    states
        .wait_for(|s| s.state == LeaseState::Suspect)
        .await
        .unwrap();
    assert!(
        guard.is_valid(),
        "a suspect lease is still valid until its deadline"
    );
    link.failing_renewals.store(false, Ordering::SeqCst);
    states
        .wait_for(|s| s.state == LeaseState::Held)
        .await
        .unwrap();
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(guard.status().state, LeaseState::Held);
    assert!(guard.is_valid());
}

#[tokio::test(start_paused = true)]
async fn renewals_failing_past_the_deadline_lose_the_lock() {
    let store = MemoryDriver::new();
    let link = Partitionable::new(&store);
    let locks = Locks::new(link.clone());
    let guard = locks.lock("x").ttl(TTL).await.unwrap();
    let deadline_before_failures = guard.status().valid_until;
    link.failing_renewals.store(true, Ordering::SeqCst);
    guard.lost().await;
    assert_eq!(
        Instant::now(),
        deadline_before_failures,
        "lost exactly at the validity deadline"
    );
    assert_eq!(guard.status().state, LeaseState::Lost);
}

#[tokio::test(start_paused = true)]
async fn cancelled_down_conversion_never_leaves_the_guard_claiming_more_than_the_store() {
    let store = MemoryDriver::new();
    let link = Partitionable::new(&store);
    let mut guard = Locks::new(link.clone())
        .lock("x")
        .mode(LockMode::EX)
        .await
        .unwrap();
    link.held_answers.send_replace(true);
    // The store applies the down-conversion, but its answer never arrives before the caller gives up.
    assert!(timeout(TTL / 3, guard.convert(LockMode::PR)).await.is_err());
    assert_eq!(
        guard.mode(),
        LockMode::PR,
        "the guard must fall back to the weaker mode"
    );
    let entries = store.inspect(&name("x")).await.unwrap();
    assert_eq!(entries[0].mode, LockMode::PR);
    let reader = Locks::new(store.clone())
        .lock("x")
        .mode(LockMode::PR)
        .try_acquire()
        .await
        .unwrap();
    link.held_answers.send_replace(false);
    // The next conversion waits for the background settling, then works as usual.
    let up = tokio::spawn(async move {
        guard.convert(LockMode::EX).await.unwrap();
        guard
    });
    while !store
        .inspect(&name("x"))
        .await
        .unwrap()
        .iter()
        .any(|e| e.converting_to == Some(LockMode::EX))
    {
        tokio::task::yield_now().await;
    }
    reader.release().await.unwrap();
    let guard = up.await.unwrap();
    assert_eq!(guard.mode(), LockMode::EX);
}

#[tokio::test(start_paused = true)]
async fn cancelled_up_conversion_falls_back_to_the_held_mode_even_if_granted() {
    let store = MemoryDriver::new();
    let link = Partitionable::new(&store);
    let mut guard = Locks::new(link.clone())
        .lock("x")
        .mode(LockMode::PR)
        .await
        .unwrap();
    link.held_answers.send_replace(true);
    // Granted at once in the store, but the answer is held back and the caller gives up.
    assert!(timeout(TTL / 3, guard.convert(LockMode::EX)).await.is_err());
    assert_eq!(guard.mode(), LockMode::PR);
    link.held_answers.send_replace(false);
    // The store is brought back down to what the guard claims.
    while store.inspect(&name("x")).await.unwrap()[0].mode != LockMode::PR {
        tokio::task::yield_now().await;
    }
    Locks::new(store.clone())
        .lock("x")
        .mode(LockMode::PR)
        .try_acquire()
        .await
        .unwrap();
    drop(guard);
}

#[tokio::test(start_paused = true)]
async fn converting_a_lost_lock_fails_even_while_the_store_still_has_it() {
    let store = MemoryDriver::new();
    let link = Partitionable::new(&store);
    let mut guard = Locks::new(link.clone())
        .lock("x")
        .mode(LockMode::PR)
        .ttl(TTL)
        .await
        .unwrap();
    link.failing_renewals.store(true, Ordering::SeqCst);
    guard.lost().await;
    assert!(
        !store.inspect(&name("x")).await.unwrap().is_empty(),
        "the store keeps the entry for the drift margin"
    );
    let err = guard.convert(LockMode::EX).await.unwrap_err();
    assert!(err.is_lost(), "{err}");
}

/// Polls the store (advancing the paused clock by 1 ms a step) until `pred` holds for `name`'s queue,
/// failing if it does not within `limit`.
async fn queue_within(
    store: &MemoryDriver,
    name_: &str,
    limit: Duration,
    pred: impl Fn(&[EntryInfo]) -> bool,
) {
    timeout(limit, async {
        while !pred(&store.inspect(&name(name_)).await.unwrap()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!("the queue of {name_:?} did not reach the expected state within {limit:?}")
    });
}

#[tokio::test(start_paused = true)]
async fn enqueue_whose_reply_is_lost_is_removed_at_once() {
    let store = MemoryDriver::new();
    let link = Partitionable::new(&store);
    link.lost_enqueue_replies.store(1, Ordering::SeqCst);
    let err = Locks::new(link.clone())
        .lock("x")
        .ttl(TTL)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("reply was lost"), "{err}");
    // The store granted the entry; the cleanup must remove it long before its lease would.
    queue_within(&store, "x", TTL / 10, |q| q.is_empty()).await;
    Locks::new(store.clone())
        .lock("x")
        .try_acquire()
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn incomparable_conversion_with_a_lost_reply_falls_back_to_the_meet() {
    for (held, asked) in [(LockMode::PR, LockMode::CW), (LockMode::CW, LockMode::PR)] {
        let store = MemoryDriver::new();
        let link = Partitionable::new(&store);
        let mut guard = Locks::new(link.clone())
            .lock("x")
            .mode(held)
            .ttl(TTL)
            .await
            .unwrap();
        link.lost_convert_replies.store(1, Ordering::SeqCst);
        guard.convert(asked).await.unwrap_err();
        assert_eq!(
            guard.mode(),
            LockMode::CR,
            "{held}→{asked} with a lost reply"
        );
        queue_within(&store, "x", TTL / 10, |q| {
            q.len() == 1 && q[0].mode == LockMode::CR && q[0].converting_to.is_none()
        })
        .await;
        // A newcomer in the held mode is compatible with what the guard now claims, whichever of
        // the two modes the store had settled on.
        let rival = Locks::new(store.clone())
            .lock("x")
            .mode(held)
            .try_acquire()
            .await
            .unwrap();
        assert!(rival.mode().compatible_with(guard.mode()));
    }
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_conversion_is_settled_even_when_the_first_attempts_fail() {
    let store = MemoryDriver::new();
    let link = Partitionable::new(&store);
    let mut guard = Locks::new(link.clone())
        .lock("x")
        .mode(LockMode::PR)
        .ttl(TTL)
        .await
        .unwrap();
    let _other = Locks::new(store.clone())
        .lock("x")
        .mode(LockMode::PR)
        .await
        .unwrap();
    // The up-conversion is queued in the store and its reply lost; the next two attempts to withdraw
    // it fail before they reach the store.
    link.lost_convert_replies.store(1, Ordering::SeqCst);
    link.refused_converts.store(2, Ordering::SeqCst);
    guard.convert(LockMode::EX).await.unwrap_err();
    assert_eq!(guard.mode(), LockMode::PR);
    queue_within(&store, "x", TTL / 3, |q| {
        q.iter().all(|e| e.converting_to.is_none())
    })
    .await;
    assert_eq!(link.refused_converts.load(Ordering::SeqCst), 0);
    Locks::new(store.clone())
        .lock("x")
        .mode(LockMode::CR)
        .try_acquire()
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn lock_all_fails_rather_than_return_a_guard_lost_while_it_waited() {
    let store = MemoryDriver::new();
    let link = Partitionable::new(&store);
    let blocker = Locks::new(store.clone()).lock("b").await.unwrap();
    let locks = Locks::new(link.clone());
    let all = tokio::spawn(locks.lock_all(["a", "b"]).ttl(TTL).into_future());
    queue_within(&store, "b", TTL / 10, |q| q.len() == 2).await;
    // "a" is held by the request now; its renewals start failing, so it is lost before "b" is free.
    *link.failing_renewals_of.lock().unwrap() = Some("a".into());
    tokio::time::sleep(TTL * 2).await;
    blocker.release().await.unwrap();
    let err = all.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::Lost { name } if name == "a"),
        "expected Lost for a, got {err}"
    );
    queue_within(&store, "b", TTL / 10, |q| q.is_empty()).await;
}

#[tokio::test(start_paused = true)]
async fn unanswered_renewals_and_releases_are_retried() {
    let store = MemoryDriver::new();
    let link = Partitionable::new(&store);
    let guard = Locks::new(link.clone()).lock("x").ttl(TTL).await.unwrap();
    link.dropped_renew_replies.store(1, Ordering::SeqCst);
    tokio::time::sleep(TTL * 3).await;
    assert_eq!(link.dropped_renew_replies.load(Ordering::SeqCst), 0);
    assert_eq!(
        guard.status().state,
        LeaseState::Held,
        "an unanswered renewal cost the lock"
    );
    assert!(guard.is_valid());
    link.dropped_release_replies.store(1, Ordering::SeqCst);
    let asked = Instant::now();
    guard.release().await.unwrap();
    assert!(asked.elapsed() < TTL, "the caller waited out the whole TTL");
    assert!(store.inspect(&name("x")).await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn store_errors_while_waiting_do_not_end_the_wait() {
    let store = MemoryDriver::new();
    let link = Partitionable::new(&store);
    let locks = Locks::new(link.clone());
    let holder = locks.lock("w").ttl(TTL).await.unwrap();
    link.failing_waits.store(5, Ordering::SeqCst);
    let waiter = tokio::spawn(locks.lock("w").ttl(TTL).into_future());
    // Several TTLs of failing waits: the waiter's keeper holds its place in line meanwhile.
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(
        link.failing_waits.load(Ordering::SeqCst),
        0,
        "every failure was met"
    );
    assert!(!waiter.is_finished(), "a store error ended the wait");
    holder.release().await.unwrap();
    let granted = timeout(TTL, waiter).await.unwrap().unwrap().unwrap();
    assert_eq!(granted.mode(), LockMode::EX);

    // The same for a pending up-conversion.
    let mut upgrading = locks.lock("c").mode(LockMode::PR).ttl(TTL).await.unwrap();
    let other = locks.lock("c").mode(LockMode::PR).ttl(TTL).await.unwrap();
    link.failing_waits.store(5, Ordering::SeqCst);
    let converted = async {
        upgrading.convert(LockMode::EX).await.unwrap();
        upgrading
    };
    let release_other = async {
        tokio::time::sleep(TTL * 2).await;
        assert_eq!(link.failing_waits.load(Ordering::SeqCst), 0);
        other.release().await.unwrap();
    };
    let (upgraded, ()) = tokio::join!(converted, release_other);
    assert_eq!(upgraded.mode(), LockMode::EX);
}

#[tokio::test(start_paused = true)]
async fn a_wait_that_keeps_failing_ends_when_its_lease_is_lost() {
    let store = MemoryDriver::new();
    let link = Partitionable::new(&store);
    let locks = Locks::new(link.clone());
    let _holder = Locks::new(store.clone()).lock("w").ttl(TTL).await.unwrap();
    link.failing_waits.store(usize::MAX, Ordering::SeqCst);
    let waiter = tokio::spawn(locks.lock("w").ttl(TTL).into_future());
    tokio::time::sleep(TTL).await;
    link.failing_renewals.store(true, Ordering::SeqCst);
    let ended = timeout(TTL * 2, waiter).await.unwrap().unwrap();
    assert!(matches!(ended, Err(Error::Lost { .. })), "{ended:?}");
}

/// The memory driver, counting the keeper's renewal calls and the renewals they carry.
#[derive(Clone, Default)]
struct CountingRenewals {
    store: MemoryDriver,
    calls: Arc<AtomicUsize>,
    renewals: Arc<AtomicUsize>,
}

#[async_trait]
impl Driver for CountingRenewals {
    fn capabilities(&self) -> Capabilities {
        self.store.capabilities()
    }
    async fn enqueue(&self, request: &EntryRequest) -> Result<Enqueued> {
        self.store.enqueue(request).await
    }
    async fn wait(&self, key: &EntryKey) -> Result<Grant> {
        self.store.wait(key).await
    }
    async fn renew(&self, key: &EntryKey, ttl: Duration) -> Result<Instant> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.renewals.fetch_add(1, Ordering::SeqCst);
        self.store.renew(key, ttl).await
    }
    async fn renew_many(&self, renewals: &[Renewal<'_>]) -> Vec<Result<Instant>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.renewals.fetch_add(renewals.len(), Ordering::SeqCst);
        let mut answers = Vec::new();
        for r in renewals {
            answers.push(self.store.renew(r.key, r.ttl).await);
        }
        answers
    }
    async fn release(&self, key: &EntryKey) -> Result<()> {
        self.store.release(key).await
    }
    async fn convert(&self, key: &EntryKey, mode: LockMode) -> Result<Queued> {
        self.store.convert(key, mode).await
    }
    async fn inspect(&self, name: &LockName) -> Result<Vec<EntryInfo>> {
        self.store.inspect(name).await
    }
    async fn raise_fence(&self, name: &LockName, floor: u64) -> Result<u64> {
        self.store.raise_fence(name, floor).await
    }
}

#[tokio::test(start_paused = true)]
async fn one_keeper_renews_many_held_locks_in_a_few_batches() {
    const HELD: usize = 300;
    let driver = CountingRenewals::default();
    let locks = Locks::new(driver.clone());
    let mut guards = Vec::new();
    // Taken over a whole renewal interval, so their renewals fall due at different instants.
    for i in 0..HELD {
        guards.push(locks.lock(format!("held/{i}")).ttl(TTL).await.unwrap());
        tokio::time::sleep(TTL / 3 / HELD as u32).await;
    }
    let (calls, renewals) = (
        driver.calls.load(Ordering::SeqCst),
        driver.renewals.load(Ordering::SeqCst),
    );
    tokio::time::sleep(TTL * 3).await;
    let calls = driver.calls.load(Ordering::SeqCst) - calls;
    let renewals = driver.renewals.load(Ordering::SeqCst) - renewals;
    assert!(
        guards.iter().all(|g| g.is_valid()),
        "every lock is still held"
    );
    // Nine renewal intervals: every lock renewed at least once per interval ...
    assert!(renewals >= HELD * 9, "{renewals} renewals of {HELD} locks");
    // ... in batches: at most four per interval (a lock may go a quarter interval early to join one),
    // plus one for the interval under way.
    assert!(
        calls <= 4 * 10,
        "{calls} renewal calls for {renewals} renewals"
    );
    // A released lock is renewed no more.
    let released: Vec<_> = guards.drain(..HELD / 2).collect();
    for guard in released {
        guard.release().await.unwrap();
    }
    let before = driver.renewals.load(Ordering::SeqCst);
    tokio::time::sleep(TTL).await;
    let renewed = driver.renewals.load(Ordering::SeqCst) - before;
    assert!(
        renewed <= (HELD / 2) * 4,
        "{renewed} renewals of {} locks in one TTL",
        HELD / 2
    );
    assert!(guards.iter().all(|g| g.is_valid()));
}
