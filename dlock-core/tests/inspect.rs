//! `inspect` on the in-memory driver reports each granted entry's fencing token: the token its guard
//! holds, the held mode's token while a conversion is pending, and none for a waiter.

use std::future::IntoFuture;

use dlock_core::{LockMode, Locks, MemoryDriver};

#[tokio::test]
async fn inspect_reports_the_tokens_of_granted_entries_only() {
    let locks = Locks::new(MemoryDriver::new());
    let mut a = locks.lock("x").mode(LockMode::PR).await.unwrap();
    let b = locks.lock("x").mode(LockMode::PR).await.unwrap();
    let waiter = tokio::spawn(locks.lock("x").mode(LockMode::CW).into_future());
    for _ in 0..10_000 {
        if locks.inspect("x").await.unwrap().len() == 3 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let entries = locks.inspect("x").await.unwrap();
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert_eq!(entries[0].token, Some(a.fencing_token()));
    assert_eq!(entries[1].token, Some(b.fencing_token()));
    assert_eq!((entries[2].granted, entries[2].token), (false, None));

    // A pending up-conversion keeps the token of the mode still held.
    let held_token = a.fencing_token();
    let converting = tokio::spawn(async move {
        a.convert(LockMode::EX).await.unwrap();
        a
    });
    for _ in 0..10_000 {
        if locks.inspect("x").await.unwrap()[0].converting_to.is_some() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let entries = locks.inspect("x").await.unwrap();
    assert_eq!(entries[0].converting_to, Some(LockMode::EX), "{entries:?}");
    assert_eq!(entries[0].token, Some(held_token));

    b.release().await.unwrap();
    let a = converting.await.unwrap();
    let entries = locks.inspect("x").await.unwrap();
    assert_eq!(entries[0].mode, LockMode::EX);
    assert_eq!(entries[0].token, Some(a.fencing_token()));
    assert!(a.fencing_token() > held_token);
    a.release().await.unwrap();
    let w = waiter.await.unwrap().unwrap();
    assert_eq!(
        locks.inspect("x").await.unwrap()[0].token,
        Some(w.fencing_token())
    );
}
