//! Member faults under a quorum of three standalone Redis servers (each with `appendfsync always`):
//! one member killed or paused changes nothing, two members down fail requests cleanly and leave
//! nothing behind, and the history checker sees no violation while single members are paused.

use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{ensure, Result};
use dlock::{Capabilities, LeaseState, LockName, Locks};
use dlock_tests::harness::ServerProcess;
use dlock_tests::history::{self, Workload};
use dlock_tests::suite::quorum::{setup_redis, QuorumFactory};
use dlock_tests::suite::{eventually, within, Factory, Link, StoreFaults};

const HANG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_member_killed_or_paused_changes_nothing() -> Result<()> {
    let Some(f) = setup_redis().await? else {
        return Ok(());
    };
    let ttl = f.short_ttl();
    let (a, b) = (f.client().await?, f.client().await?);
    let holder = a.lock("m/held").ttl(ttl).await?;
    let waiter = tokio::spawn(b.lock("m/held").ttl(ttl).into_future());
    eventually("the waiter is queued", || async {
        Ok(b.inspect("m/held").await?.len() == 2)
    })
    .await?;
    for member in f.member_processes(0) {
        member.kill()?;
    }
    // Time passing, with renewals reaching two members of three, is what this checks.
    tokio::time::sleep(ttl * 2).await;
    ensure!(
        holder.is_valid() && holder.status().state == LeaseState::Held,
        "one member down cost the holder its lock: {:?}",
        holder.status()
    );
    ensure!(
        !waiter.is_finished(),
        "the waiter was granted beside the holder"
    );
    let token = holder.fencing_token();
    holder.release().await?;
    let next = within(HANG, "the waiter is granted with one member down", waiter).await???;
    let next_token = next.fencing_token();
    ensure!(next_token > token);
    next.release().await?;
    a.lock("m/other").ttl(ttl).await?.release().await?;
    // The member comes back on its data; another one freezes instead.
    f.restart_member(0)?;
    for member in f.member_processes(1) {
        member.pause()?;
    }
    let paused = within(
        HANG,
        "an acquire with member 1 paused",
        a.lock("m/held").ttl(ttl),
    )
    .await;
    for member in f.member_processes(1) {
        member.resume()?;
    }
    let guard = paused??;
    ensure!(guard.fencing_token() > next_token);
    guard.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_members_down_fail_cleanly_and_leave_nothing_behind() -> Result<()> {
    let Some(f) = setup_redis().await? else {
        return Ok(());
    };
    let ttl = f.short_ttl();
    let a = f.client().await?;
    let holder = a.lock("m/x").ttl(ttl).await?;
    for i in [1, 2] {
        for member in f.member_processes(i) {
            member.pause()?;
        }
    }
    within(
        HANG,
        "the holder sees lost() with two members frozen",
        holder.lost(),
    )
    .await?;
    ensure!(!holder.is_valid());
    let timeout = Duration::from_secs(3);
    let err = within(
        HANG,
        "an acquire with two members frozen",
        a.lock("m/y").ttl(ttl).timeout(timeout),
    )
    .await?
    .err();
    ensure!(
        err.as_ref()
            .is_some_and(|e| e.is_timeout() || e.is_transient()),
        "expected a timeout or a store error, got {err:?}"
    );
    for i in [1, 2] {
        for member in f.member_processes(i) {
            member.resume()?;
        }
    }
    let q = f.quorum_driver().await?;
    for name in ["m/x", "m/y"] {
        let name = LockName::new(name)?;
        eventually("every member forgets the entries", || async {
            let views = q.inspect_members(&name).await;
            Ok(views
                .iter()
                .all(|v| v.entries.as_ref().is_ok_and(|e| e.is_empty())))
        })
        .await?;
    }
    a.lock("m/x")
        .ttl(ttl)
        .try_acquire()
        .await?
        .release()
        .await?;
    Ok(())
}

/// The quorum factory, whose store faults pause one member at a time, in turn.
struct OneMemberAtATime {
    quorum: QuorumFactory,
    turn: AtomicUsize,
}

impl StoreFaults for OneMemberAtATime {
    fn processes(&self) -> Vec<&ServerProcess> {
        self.quorum
            .member_processes(self.turn.load(Ordering::SeqCst) % 3)
    }

    fn resume(&self) -> Result<()> {
        let resumed = self.processes().into_iter().try_for_each(|p| p.resume());
        self.turn.fetch_add(1, Ordering::SeqCst);
        resumed
    }
}

impl Factory for OneMemberAtATime {
    async fn client(&self) -> Result<Locks> {
        self.quorum.client().await
    }
    async fn partitionable_client(&self) -> Result<(Locks, Box<dyn Link>)> {
        self.quorum.partitionable_client().await
    }
    fn url(&self) -> Option<String> {
        self.quorum.url()
    }
    fn faults(&self) -> Option<&dyn StoreFaults> {
        Some(self)
    }
    fn short_ttl(&self) -> Duration {
        self.quorum.short_ttl()
    }
    fn capabilities(&self) -> Capabilities {
        self.quorum.capabilities()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_with_single_members_paused_is_linearizable() -> Result<()> {
    let Some(quorum) = setup_redis().await? else {
        return Ok(());
    };
    let f = OneMemberAtATime {
        quorum,
        turn: AtomicUsize::new(0),
    };
    let report = history::run(
        &f,
        Workload {
            clients: 4,
            ops_per_client: 150,
            faults: 12,
            ..Workload::default()
        },
    )
    .await?;
    report.check_and_print()
}
