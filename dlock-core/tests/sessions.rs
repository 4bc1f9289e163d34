//! Order-enforcing sessions and multi-lock requests with a mode per name, on the in-memory driver.

use std::future::IntoFuture;
use std::time::Duration;

use dlock_core::{Error, LockMode, LockOrder, Locks, MemoryDriver};
use tokio::time::timeout;

#[tokio::test]
async fn a_session_refuses_to_go_down_and_queues_nothing() {
    let locks = Locks::new(MemoryDriver::new());
    let job = locks.session(LockOrder::by_name());
    let b = job.lock("account/b").await.unwrap();
    let err = job.lock("account/a").await.unwrap_err();
    match &err {
        Error::OrderViolation {
            requested,
            held,
            requested_rank,
            held_rank,
        } => {
            assert_eq!(
                (requested.as_str(), held.as_str()),
                ("account/a", "account/b")
            );
            assert!(requested_rank.contains("account/a") && held_rank.contains("account/b"));
        }
        other => panic!("expected OrderViolation, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("account/a") && msg.contains("account/b"),
        "{msg}"
    );
    assert!(
        locks.inspect("account/a").await.unwrap().is_empty(),
        "the refused request queued"
    );
    // The same name again is not above itself either.
    assert!(matches!(
        job.lock("account/b").try_acquire().await.unwrap_err(),
        Error::OrderViolation { .. }
    ));
    // Going up is fine; releasing lowers the bar again.
    let c = job.lock("account/c").mode(LockMode::PR).await.unwrap();
    assert_eq!(job.held().len(), 2);
    c.release().await.unwrap();
    b.release().await.unwrap();
    assert!(job.held().is_empty());
    job.lock("account/a").await.unwrap();
}

#[tokio::test]
async fn explicit_ranks_are_unique_and_cover_every_name() {
    let dup = LockOrder::explicit([("a", 1), ("b", 1)]).unwrap_err();
    assert!(dup.to_string().contains("rank 1"), "{dup}");
    let order = LockOrder::explicit([("ledger", 1), ("account/a", 2)]).unwrap();
    let locks = Locks::new(MemoryDriver::new());
    let job = locks.session(order);
    let unranked = job.lock("account/z").await.unwrap_err();
    assert!(unranked.to_string().contains("no rank"), "{unranked}");
    let _ledger = job.lock("ledger").await.unwrap();
    let _a = job.lock("account/a").await.unwrap();
    let err = LockOrder::explicit([("", 1)]).unwrap_err();
    assert!(matches!(err, Error::InvalidName { .. }));
}

#[tokio::test]
async fn a_failed_or_cancelled_session_request_gives_its_rank_back() {
    let locks = Locks::new(MemoryDriver::new());
    let _blocker = locks.lock("b").await.unwrap();
    let job = locks.session(LockOrder::by_name());
    let err = job.lock("b").try_acquire().await.unwrap_err();
    assert!(err.is_would_block());
    assert!(job.held().is_empty());
    let pending = tokio::spawn(job.lock("b").into_future());
    while job.held().is_empty() {
        tokio::task::yield_now().await;
    }
    pending.abort();
    let _ = pending.await;
    assert!(job.held().is_empty());
    job.lock("a").await.unwrap();
}

/// Two jobs need accounts a and b, naming them in opposite orders. Through sessions (taking in
/// rank order after a refusal) and through lock_all, thousands of rounds never deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opposite_orders_never_deadlock_through_sessions_or_lock_all() {
    const ROUNDS: usize = 2000;
    let store = MemoryDriver::new();
    let mut jobs = Vec::new();
    for (first, second) in [("a", "b"), ("b", "a")] {
        let locks = Locks::new(store.clone());
        jobs.push(tokio::spawn(async move {
            let mut refused = 0;
            for round in 0..ROUNDS {
                if round % 2 == 0 {
                    let job = locks.session(LockOrder::by_name());
                    let g1 = job.lock(first).await.unwrap();
                    match job.lock(second).await {
                        Ok(g2) => drop((g1, g2)),
                        Err(Error::OrderViolation { .. }) => {
                            refused += 1;
                            drop(g1);
                            let _both = (
                                job.lock(second).await.unwrap(),
                                job.lock(first).await.unwrap(),
                            );
                        }
                        Err(err) => panic!("round {round}: {err}"),
                    }
                } else {
                    let both = locks.lock_all([first, second]).await.unwrap();
                    assert_eq!(both[0].name().as_str(), "a");
                }
            }
            refused
        }));
    }
    let refused = timeout(Duration::from_secs(120), async {
        let mut refused = Vec::new();
        for job in jobs {
            refused.push(job.await.unwrap());
        }
        refused
    })
    .await
    .expect("the jobs deadlocked");
    assert_eq!(refused[0], 0, "going up is never refused");
    assert_eq!(refused[1], ROUNDS / 2, "going down is always refused");
}

#[tokio::test]
async fn lock_all_takes_each_name_in_its_own_mode_once() {
    let locks = Locks::new(MemoryDriver::new());
    let all = locks
        .lock_all([
            ("account/b", LockMode::CW),
            ("account/a", LockMode::EX),
            ("account/b", LockMode::PR),
            ("ledger", LockMode::CR),
        ])
        .await
        .unwrap();
    let got: Vec<(&str, LockMode)> = all.iter().map(|g| (g.name().as_str(), g.mode())).collect();
    assert_eq!(
        got,
        [
            ("account/a", LockMode::EX),
            ("account/b", LockMode::PW),
            ("ledger", LockMode::CR)
        ]
    );
    assert_eq!(locks.inspect("account/b").await.unwrap().len(), 1);
    let reader = locks
        .lock("ledger")
        .mode(LockMode::PW)
        .try_acquire()
        .await
        .unwrap();
    drop(reader);
    all.release().await.unwrap();
    assert!(locks.inspect("account/a").await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn lock_all_lost_fires_when_any_lock_is_lost() {
    let store = MemoryDriver::new();
    let ttl = Duration::from_secs(3);
    let locks = Locks::new(store.clone());
    let all = locks.lock_all(["a", "b"]).ttl(ttl).await.unwrap();
    assert!(all.is_valid());
    // Another client's release of b's entry stands in for the store losing it.
    store_drop(&store, &all[1]).await;
    timeout(ttl, all.lost()).await.expect("lost() fires for b");
    assert!(!all.is_valid());
    assert!(all[0].is_valid());
}

async fn store_drop(store: &MemoryDriver, guard: &dlock_core::Guard) {
    use dlock_core::Driver;
    store.release(guard.entry_key()).await.unwrap();
}
