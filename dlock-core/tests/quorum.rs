//! The majority quorum over in-memory members: majorities, step-back under contention, fencing across
//! members whose own tokens do not compare, member failures, conversion.

use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dlock_core::{
    Capabilities, Driver, Enqueued, EntryInfo, EntryKey, EntryRequest, Error, Grant, Guard,
    LockMode, LockName, Locks, MemoryDriver, Queued, Quorum, Result,
};
use rand::Rng;
use tokio::time::{timeout, Instant};

/// A member that can be taken down (every call hangs, as against a frozen server), that delays each
/// call by a random few hundred microseconds (so concurrent requests reach members in different
/// orders), and whose own fencing tokens are offset (so they do not compare with other members').
#[derive(Clone)]
struct Member {
    store: MemoryDriver,
    down: Arc<AtomicBool>,
    jitter: bool,
    token_offset: u64,
    /// While set, a blocking enqueue reaches the store at once and its answer a second later.
    slow_queueing: Arc<AtomicBool>,
}

impl Member {
    fn new(store: &MemoryDriver) -> Self {
        Member {
            store: store.clone(),
            down: Arc::default(),
            jitter: false,
            token_offset: 0,
            slow_queueing: Arc::default(),
        }
    }

    async fn gate(&self) {
        if self.jitter {
            let pause = rand::rng().random_range(0..400);
            tokio::time::sleep(Duration::from_micros(pause)).await;
        }
        if self.down.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }

    fn offset(&self, grant: Grant) -> Grant {
        Grant {
            token: grant.token + self.token_offset,
            ..grant
        }
    }
}

#[async_trait]
impl Driver for Member {
    fn capabilities(&self) -> Capabilities {
        self.store.capabilities()
    }
    async fn enqueue(&self, request: &EntryRequest) -> Result<Enqueued> {
        self.gate().await;
        let answer = self.store.enqueue(request).await;
        if request.wait && self.slow_queueing.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let answer = answer?;
        Ok(Enqueued {
            queued: match answer.queued {
                Queued::Granted(g) => Queued::Granted(self.offset(g)),
                Queued::Waiting => Queued::Waiting,
            },
            ..answer
        })
    }
    async fn wait(&self, key: &EntryKey) -> Result<Grant> {
        self.gate().await;
        Ok(self.offset(self.store.wait(key).await?))
    }
    async fn renew(&self, key: &EntryKey, ttl: Duration) -> Result<Instant> {
        self.gate().await;
        self.store.renew(key, ttl).await
    }
    async fn release(&self, key: &EntryKey) -> Result<()> {
        self.gate().await;
        self.store.release(key).await
    }
    async fn convert(&self, key: &EntryKey, mode: LockMode) -> Result<Queued> {
        self.gate().await;
        Ok(match self.store.convert(key, mode).await? {
            Queued::Granted(g) => Queued::Granted(self.offset(g)),
            Queued::Waiting => Queued::Waiting,
        })
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

fn stores(n: usize) -> Vec<MemoryDriver> {
    (0..n).map(|_| MemoryDriver::new()).collect()
}

fn quorum_of(members: &[Member]) -> Locks {
    Locks::new(Quorum::new(members.iter().cloned()).unwrap())
}

fn name(s: &str) -> LockName {
    LockName::new(s).unwrap()
}

/// `EX` on "x" taken directly on members 1 and 2, by a client of each store: no majority is free.
async fn held_directly_on_two(stores: &[MemoryDriver]) -> Vec<Guard> {
    let mut held = Vec::new();
    for store in &stores[1..3] {
        held.push(Locks::new(store.clone()).lock("x").await.unwrap());
    }
    held
}

/// Waits (bounded) until every member grants the name's one entry: a quorum grant returns once a
/// majority granted, while the last member's answer is still on its way.
async fn settled_on_every_member(stores: &[MemoryDriver], lock: &str) {
    for _ in 0..10_000 {
        let mut settled = true;
        for store in stores {
            let entries = store.inspect(&name(lock)).await.unwrap();
            settled &= entries.len() == 1 && entries[0].granted;
        }
        if settled {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("the members never all granted {lock:?}");
}

#[test]
fn a_quorum_needs_an_odd_number_of_at_least_three_members() {
    for n in [0, 1, 2, 4] {
        let err = Quorum::new(stores(n)).unwrap_err();
        assert!(err.to_string().contains("odd number"), "{n}: {err}");
    }
    assert_eq!(Quorum::new(stores(5)).unwrap().majority(), 3);
}

#[tokio::test]
async fn a_grant_needs_a_majority_and_a_minority_grant_is_given_back() {
    let stores = stores(3);
    let members: Vec<Member> = stores.iter().map(Member::new).collect();
    let locks = quorum_of(&members);
    // Someone else holds the name directly on two members: no majority is free.
    let held = held_directly_on_two(&stores).await;
    let err = locks.lock("x").try_acquire().await.unwrap_err();
    assert!(err.is_would_block(), "{err}");
    assert!(
        stores[0].inspect(&name("x")).await.unwrap().is_empty(),
        "the grant on the minority member was not given back"
    );
    for guard in held {
        guard.release().await.unwrap();
    }
    let guard = locks.lock("x").await.unwrap();
    // A majority granted; the third member's answer may still be on its way.
    settled_on_every_member(&stores, "x").await;
    for store in &stores {
        assert_eq!(store.inspect(&name("x")).await.unwrap().len(), 1);
    }
    guard.release().await.unwrap();
}

/// Clients racing over members reached in random orders split the members between them again and
/// again (each granted by a different member); stepping back and queueing in member order lets one
/// of them win every time. Bounded run, mutual exclusion checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contending_clients_always_make_progress() {
    for (clients, n) in [(3, 3), (5, 5), (5, 3), (3, 5)] {
        const ROUNDS: usize = 60;
        let stores = stores(n);
        let inside = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let members: Vec<Member> = stores
                .iter()
                .map(|s| Member {
                    jitter: true,
                    ..Member::new(s)
                })
                .collect();
            let (locks, inside) = (quorum_of(&members), Arc::clone(&inside));
            tasks.push(tokio::spawn(async move {
                for _ in 0..ROUNDS {
                    let guard = locks.lock("x").ttl(Duration::from_secs(10)).await.unwrap();
                    assert_eq!(
                        inside.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two holders at once"
                    );
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    guard.release().await.unwrap();
                }
            }));
        }
        timeout(Duration::from_secs(120), async {
            for task in tasks {
                task.await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{clients} clients over {n} members stopped making progress"));
    }
}

/// Members' own tokens differ by orders of magnitude; the quorum's tokens still increase along
/// conflicting grants while members drop out and come back.
#[tokio::test]
async fn fencing_tokens_increase_through_member_loss_and_return() {
    let stores = stores(3);
    let members: Vec<Member> = stores
        .iter()
        .enumerate()
        .map(|(i, s)| Member {
            token_offset: [1_000_000_000, 0, 1_000][i],
            ..Member::new(s)
        })
        .collect();
    let locks = quorum_of(&members);
    let ttl = Duration::from_secs(10);
    let mut last = 0;
    for down in [None, Some(0), Some(1), Some(2), None, Some(0), Some(2)] {
        for m in &members {
            m.down.store(false, Ordering::SeqCst);
        }
        if let Some(i) = down {
            members[i].down.store(true, Ordering::SeqCst);
        }
        let guard = locks.lock("fenced").ttl(ttl).await.unwrap();
        assert!(
            guard.fencing_token() > last,
            "member {down:?} down: token {} after {last}",
            guard.fencing_token()
        );
        last = guard.fencing_token();
        guard.release().await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn one_member_down_changes_nothing_two_members_down_lose_the_lock() {
    let stores = stores(3);
    let members: Vec<Member> = stores.iter().map(Member::new).collect();
    let locks = quorum_of(&members);
    let ttl = Duration::from_secs(3);
    let guard = locks.lock("x").ttl(ttl).await.unwrap();
    members[2].down.store(true, Ordering::SeqCst);
    tokio::time::sleep(ttl * 3).await;
    assert!(
        guard.is_valid(),
        "one member down cost the lock: {:?}",
        guard.status()
    );
    let err = locks.lock("x").try_acquire().await.unwrap_err();
    assert!(err.is_would_block(), "{err}");
    members[1].down.store(true, Ordering::SeqCst);
    let went = Instant::now();
    timeout(ttl, guard.lost())
        .await
        .expect("with two members down the holder loses within one TTL");
    assert!(went.elapsed() < ttl);
    // Acquires fail cleanly within their timeout while no majority answers.
    let err = locks
        .lock("y")
        .ttl(ttl)
        .timeout(Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(err.is_timeout() || err.is_transient(), "{err}");
    // The members come back: nothing is left behind once the leases ran out.
    members[1].down.store(false, Ordering::SeqCst);
    members[2].down.store(false, Ordering::SeqCst);
    tokio::time::sleep(ttl * 2).await;
    for store in &stores {
        assert!(store.inspect(&name("x")).await.unwrap().is_empty());
        assert!(store.inspect(&name("y")).await.unwrap().is_empty());
    }
    locks.lock("x").try_acquire().await.unwrap();
}

#[tokio::test]
async fn conversion_goes_through_the_majority() {
    let stores = stores(3);
    let members: Vec<Member> = stores.iter().map(Member::new).collect();
    let (a, b) = (quorum_of(&members), quorum_of(&members));
    let mut reader = a.lock("x").mode(LockMode::PR).await.unwrap();
    let other = b.lock("x").mode(LockMode::PR).await.unwrap();
    let up = tokio::spawn(async move {
        reader.convert(LockMode::EX).await.unwrap();
        reader
    });
    while !stores[0]
        .inspect(&name("x"))
        .await
        .unwrap()
        .iter()
        .any(|e| e.converting_to == Some(LockMode::EX))
    {
        tokio::task::yield_now().await;
    }
    let err = b
        .lock("x")
        .mode(LockMode::CR)
        .try_acquire()
        .await
        .unwrap_err();
    assert!(err.is_would_block(), "{err}");
    let before = other.fencing_token();
    other.release().await.unwrap();
    let mut writer = timeout(Duration::from_secs(10), up).await.unwrap().unwrap();
    assert_eq!(writer.mode(), LockMode::EX);
    assert!(writer.fencing_token() > before);
    // A majority holds EX; a member whose grant came too late had it withdrawn and keeps PR.
    let mut in_ex = 0;
    for store in &stores {
        let q = store.inspect(&name("x")).await.unwrap();
        assert_eq!(q.len(), 1);
        in_ex += usize::from(q[0].mode == LockMode::EX);
    }
    assert!(in_ex >= 2, "EX on {in_ex} members");
    writer.convert(LockMode::CR).await.unwrap();
    b.lock("x").mode(LockMode::PW).try_acquire().await.unwrap();
}

#[tokio::test]
async fn crossing_up_conversions_never_deadlock() {
    let stores = stores(3);
    let members: Vec<Member> = stores.iter().map(Member::new).collect();
    let (a, b) = (quorum_of(&members), quorum_of(&members));
    // Each converts up; a refused one gives its lock back, as a careful caller does.
    let convert = |mut guard: dlock_core::Guard| async move {
        match guard.convert(LockMode::EX).await {
            Ok(()) => Ok(guard),
            Err(err) => {
                guard.release().await.unwrap();
                Err(err)
            }
        }
    };
    let ga = a.lock("x").mode(LockMode::PR).await.unwrap();
    let gb = b.lock("x").mode(LockMode::PR).await.unwrap();
    let (ra, rb) = tokio::join!(
        timeout(Duration::from_secs(10), convert(ga)),
        timeout(Duration::from_secs(10), convert(gb))
    );
    let (ra, rb) = (ra.expect("a hung"), rb.expect("b hung"));
    let refused = [ra.as_ref().err(), rb.as_ref().err()]
        .into_iter()
        .flatten()
        .inspect(|err| assert!(matches!(err, Error::ConversionDeadlock { .. }), "{err}"))
        .count();
    assert!(refused >= 1, "neither crossing conversion was refused");
}

#[tokio::test(start_paused = true)]
async fn inspect_merges_the_members_and_inspect_members_shows_each() {
    let stores = stores(3);
    let members: Vec<Member> = stores.iter().map(Member::new).collect();
    let quorum = Quorum::new(members.iter().cloned()).unwrap();
    let locks = Locks::new(quorum.clone());
    let _holder = locks.lock("x").mode(LockMode::PW).await.unwrap();
    settled_on_every_member(&stores, "x").await;
    members[1].down.store(true, Ordering::SeqCst);
    let merged = locks.inspect("x").await.unwrap();
    assert_eq!(merged.len(), 1);
    assert!(merged[0].granted && merged[0].mode == LockMode::PW);
    let views = quorum.inspect_members(&name("x")).await;
    assert_eq!(views.len(), 3);
    assert!(
        views[0].member.starts_with("0:memory"),
        "{}",
        views[0].member
    );
    assert!(views[1]
        .entries
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("did not answer"));
    assert_eq!(views[2].entries.as_ref().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn inspect_shows_members_that_disagree_on_the_mode_as_a_conversion_under_way() {
    let stores = stores(3);
    let members: Vec<Member> = stores.iter().map(Member::new).collect();
    let locks = quorum_of(&members);
    let guard = locks.lock("x").mode(LockMode::PR).await.unwrap();
    settled_on_every_member(&stores, "x").await;
    // One member is brought down to CR ahead of the others, as a settling conversion does.
    stores[0]
        .convert(guard.entry_key(), LockMode::CR)
        .await
        .unwrap();
    let merged = locks.inspect("x").await.unwrap();
    assert_eq!(merged.len(), 1);
    assert!(merged[0].granted);
    assert_eq!(merged[0].mode, LockMode::CR, "what the entry surely holds");
    assert_eq!(
        merged[0].converting_to,
        Some(LockMode::PR),
        "what it may still keep newcomers out as"
    );
    guard.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_acquire_cancelled_while_a_member_queues_it_leaves_nothing_there() {
    let stores = stores(3);
    let members: Vec<Member> = stores.iter().map(Member::new).collect();
    let locks = quorum_of(&members);
    // Two members are held directly, so the request climbs: member 0 grants it, member 1 queues it.
    let held = held_directly_on_two(&stores).await;
    members[1].slow_queueing.store(true, Ordering::SeqCst);
    let acquire = tokio::spawn(locks.lock("x").into_future());
    for _ in 0..10_000 {
        if stores[1].inspect(&name("x")).await.unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(stores[1].inspect(&name("x")).await.unwrap().len(), 2);
    // Cancelled while member 1 has the entry but has not answered yet.
    acquire.abort();
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (i, store) in stores.iter().enumerate() {
        let entries = store.inspect(&name("x")).await.unwrap();
        let direct_holder = usize::from(i > 0);
        assert_eq!(entries.len(), direct_holder, "member {i}: {entries:?}");
    }
    drop(held);
}
