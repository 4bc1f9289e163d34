//! The conformance suite: test cases every driver must pass, written once as generic async functions
//! over a [`Factory`], and stamped out for a driver by [`conformance_suite!`](crate::conformance_suite).
//!
//! A case that needs something a driver does not claim (see [`Requirement`]) is generated as an
//! ignored test whose reason names the missing capability, so the skip shows in `cargo test` output;
//! the stamped test `declared_skips_match_capabilities` fails if the list of skips and the driver's
//! capabilities disagree.

pub mod cases;
pub mod containers;
pub mod etcd;
pub mod jetstream;
pub mod lost_replies;
pub mod memory;
pub mod quorum;
pub mod redis;

use std::time::Duration;

use dlock::{Capabilities, Locks};

/// A way to cut one client off from the store (a network partition of that client only): while cut,
/// its requests and the store's answers are held back; when restored, they flow again.
pub trait Link: Send + Sync {
    /// Cuts (`true`) or restores (`false`) the link.
    fn set_cut(&self, cut: bool);
}

/// Faults done to the store itself, for drivers whose store is a server: a store names its server
/// processes, and every fault acts on all of them.
pub trait StoreFaults: Sync {
    /// Every server process of the store.
    fn processes(&self) -> Vec<&crate::harness::ServerProcess>;

    /// Freezes the store (SIGSTOP on every server process): it neither answers nor expires anything.
    fn pause(&self) -> anyhow::Result<()> {
        self.processes().into_iter().try_for_each(|p| p.pause())
    }

    /// Thaws a paused store.
    fn resume(&self) -> anyhow::Result<()> {
        self.processes().into_iter().try_for_each(|p| p.resume())
    }

    /// Starts one fault of the store's choosing, for the history checker; [`StoreFaults::end_fault`]
    /// ends it. A pause unless the store names faults of its own (a cluster's between its members).
    fn start_fault(&self) -> anyhow::Result<()> {
        self.pause()
    }

    /// Ends the fault [`StoreFaults::start_fault`] started.
    fn end_fault(&self) -> anyhow::Result<()> {
        self.resume()
    }

    /// Kills the store (SIGKILL on every server process) and starts every process again on its ports
    /// and data. Waiting until it serves is left to the clients: their retries are under test.
    fn crash_and_restart(&self) -> anyhow::Result<()> {
        let processes = self.processes();
        processes.iter().try_for_each(|p| p.kill())?;
        processes.iter().try_for_each(|p| p.respawn())
    }
}

/// Everything a case needs from the store under test.
#[allow(async_fn_in_trait)]
pub trait Factory {
    /// A new client with its own connection(s) to the store. Clients of one factory share the store.
    async fn client(&self) -> anyhow::Result<Locks>;

    /// A new client whose link to the store can be cut.
    async fn partitionable_client(&self) -> anyhow::Result<(Locks, Box<dyn Link>)>;

    /// A URL for `dlock::connect` that reaches this store from another process, when it can be.
    fn url(&self) -> Option<String>;

    /// Store faults, when the store is a server.
    fn faults(&self) -> Option<&dyn StoreFaults>;

    /// A short lease TTL the driver accepts, used by the cases that wait for leases to run out.
    fn short_ttl(&self) -> Duration;

    /// What the driver claims.
    fn capabilities(&self) -> Capabilities;
}

/// A capability some cases need. A case is skipped (visibly) only when the driver lacks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// Locks are shared between processes (a holder in another process can crash).
    SharedBetweenProcesses,
    /// The store is a server that can be paused.
    StoreFaults,
    /// Lock conversion.
    Conversion,
}

impl Requirement {
    /// Whether a driver with `caps` and (or without) store faults meets the requirement.
    pub fn met(self, caps: &Capabilities, has_faults: bool) -> bool {
        match self {
            Requirement::SharedBetweenProcesses => caps.shared_between_processes,
            Requirement::StoreFaults => has_faults,
            Requirement::Conversion => caps.conversion,
        }
    }
}

/// The requirement of each case that has one; every other case runs on every driver.
pub fn requirement(case: &str) -> Option<Requirement> {
    match case {
        "holder_crash_frees_the_lock_within_ttl" => Some(Requirement::SharedBetweenProcesses),
        "paused_store_makes_the_holder_lose_before_its_lease_ends" => {
            Some(Requirement::StoreFaults)
        }
        "conversion_up_down_and_deadlock"
        | "incomparable_conversion_with_a_lost_reply_holds_the_meet" => {
            Some(Requirement::Conversion)
        }
        "store_crash_and_restart_keeps_holders_safe" => Some(Requirement::StoreFaults),
        "paused_holder_process_is_refused_by_the_fenced_register" => {
            Some(Requirement::SharedBetweenProcesses)
        }
        _ => None,
    }
}

/// Checks that `skipped` lists exactly the cases whose requirement the factory does not meet.
pub fn check_declared_skips<F: Factory>(factory: &F, all: &[&str], skipped: &[&str]) {
    let caps = factory.capabilities();
    let has_faults = factory.faults().is_some();
    for case in all {
        let unmet = requirement(case).is_some_and(|r| !r.met(&caps, has_faults));
        let declared = skipped.contains(case);
        assert_eq!(
            unmet,
            declared,
            "case {case}: the {} driver {} its requirement {:?}, but the suite {} it",
            caps.driver,
            if unmet { "does not meet" } else { "meets" },
            requirement(case),
            if declared { "skips" } else { "runs" },
        );
    }
}

/// Guards against a hang: a case step that should finish but does not fails after `limit` with `what`.
/// The limit is a hang guard far above any expected duration, never a speed assertion.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::IntoFuture<Output = T>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, fut.into_future())
        .await
        .map_err(|_| anyhow::anyhow!("hung for {limit:?}: {what}"))
}

/// Polls `check` until it holds, at most 3000 times 10 ms apart; for store states that no signal
/// announces. Fails naming `what` otherwise.
pub async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    for _ in 0..3000 {
        if check().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("{what}: still not the case after 3000 checks")
}

/// A partition of one client made by blackholing the TCP proxies (one per server) it reaches the
/// store through.
pub struct ProxyLink(pub Vec<crate::harness::TcpProxy>);

impl Link for ProxyLink {
    fn set_cut(&self, cut: bool) {
        for proxy in &self.0 {
            proxy.set_blackhole(cut);
        }
    }
}

/// Stamps out every conformance case for one driver, each as its own `#[tokio::test]`.
///
/// `setup` is an async fn returning `anyhow::Result<Option<impl Factory>>`, `None` when the store's
/// tests are opted out with `DLOCK_SKIP_SERVER_TESTS` (the harness prints the skip); `skip` lists cases
/// the driver does not claim, each with the reason shown by `cargo test`.
///
/// ```ignore
/// dlock_tests::conformance_suite!(
///     setup = dlock_tests::suite::memory::setup,
///     skip = {
///         holder_crash_frees_the_lock_within_ttl: "in-process store: not shared between processes",
///     }
/// );
/// ```
#[macro_export]
macro_rules! conformance_suite {
    (setup = $setup:path, skip = { $($skipped:ident : $reason:literal),* $(,)? } $(,)?) => {
        $crate::conformance_suite!(@cases $setup; [$($skipped),*];
            mode_pairs_coexist_or_block_per_the_matrix,
            fifo_grants_ex_pr_sequence_in_steps,
            try_acquire_would_block_leaves_nothing_queued,
            blocking_acquire_times_out_and_leaves_the_queue,
            cancelled_acquire_leaves_the_queue,
            dropping_a_guard_releases_the_lock,
            release_twice_is_harmless,
            fencing_tokens_increase_across_holders_and_clients,
            renewal_keeps_the_lock_for_three_ttls,
            holder_crash_frees_the_lock_within_ttl,
            partitioned_holder_loses_before_anyone_else_is_granted,
            paused_store_makes_the_holder_lose_before_its_lease_ends,
            stale_release_after_expiry_never_frees_a_newer_holder,
            conversion_up_down_and_deadlock,
            tricky_names_are_distinct_locks,
            invalid_names_are_rejected,
            separate_clients_contend_correctly,
            a_hundred_concurrent_acquirers_all_get_the_lock,
            history_under_faults_is_linearizable,
            enqueue_with_a_lost_reply_leaves_nothing_queued,
            renewals_and_releases_with_lost_replies_are_retried,
            incomparable_conversion_with_a_lost_reply_holds_the_meet,
            abandoned_guards_free_the_lock_within_two_ttls,
            store_crash_and_restart_keeps_holders_safe,
            paused_holder_process_is_refused_by_the_fenced_register,
            fence_register_only_grows,
            opposite_orders_never_deadlock_through_sessions_or_lock_all,
        );
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            #[ignore = $reason]
            async fn $skipped() {
                panic!("{} is skipped for this driver: {}", stringify!($skipped), $reason);
            }
        )*
    };
    (@cases $setup:path; [$($skipped:ident),*]; $($case:ident),* $(,)?) => {
        $crate::conformance_suite!(@each $setup; [$($skipped),*]; $($case),*);

        #[tokio::test]
        async fn declared_skips_match_capabilities() {
            let Some(factory) = $setup().await.expect("the store under test starts") else {
                return;
            };
            $crate::suite::check_declared_skips(
                &factory,
                &[$(stringify!($case)),*],
                &[$(stringify!($skipped)),*],
            );
        }
    };
    (@each $setup:path; [$($skipped:ident),*]; $case:ident $(, $rest:ident)*) => {
        $crate::conformance_suite!(@one $setup; [$($skipped),*]; $case);
        $crate::conformance_suite!(@each $setup; [$($skipped),*]; $($rest),*);
    };
    (@each $setup:path; [$($skipped:ident),*];) => {};
    (@one $setup:path; [$($skipped:ident),*]; $case:ident) => {
        $crate::__stamp_unless_skipped!($case, [$($skipped),*], {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                $crate::suite::cases::set_holder_binary(env!("CARGO_BIN_EXE_dlock-holder"));
                let Some(factory) = $setup().await.expect("the store under test starts") else {
                    return;
                };
                $crate::suite::cases::$case(&factory).await.expect(stringify!($case));
            }
        });
    };
}

/// The names of every case, in the order they are stamped.
pub const ALL_CASES: &[&str] = &[
    "mode_pairs_coexist_or_block_per_the_matrix",
    "fifo_grants_ex_pr_sequence_in_steps",
    "try_acquire_would_block_leaves_nothing_queued",
    "blocking_acquire_times_out_and_leaves_the_queue",
    "cancelled_acquire_leaves_the_queue",
    "dropping_a_guard_releases_the_lock",
    "release_twice_is_harmless",
    "fencing_tokens_increase_across_holders_and_clients",
    "renewal_keeps_the_lock_for_three_ttls",
    "holder_crash_frees_the_lock_within_ttl",
    "partitioned_holder_loses_before_anyone_else_is_granted",
    "paused_store_makes_the_holder_lose_before_its_lease_ends",
    "stale_release_after_expiry_never_frees_a_newer_holder",
    "conversion_up_down_and_deadlock",
    "tricky_names_are_distinct_locks",
    "invalid_names_are_rejected",
    "separate_clients_contend_correctly",
    "a_hundred_concurrent_acquirers_all_get_the_lock",
    "history_under_faults_is_linearizable",
    "enqueue_with_a_lost_reply_leaves_nothing_queued",
    "renewals_and_releases_with_lost_replies_are_retried",
    "incomparable_conversion_with_a_lost_reply_holds_the_meet",
    "abandoned_guards_free_the_lock_within_two_ttls",
    "store_crash_and_restart_keeps_holders_safe",
    "paused_holder_process_is_refused_by_the_fenced_register",
    "fence_register_only_grows",
    "opposite_orders_never_deadlock_through_sessions_or_lock_all",
];

/// Emits `$body` unless `$case` is in the skip list (a helper of [`conformance_suite!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __stamp_unless_skipped {
    ($case:ident, [], { $($body:tt)* }) => { $($body)* };
    ($case:ident, [$first:ident $(, $rest:ident)*], { $($body:tt)* }) => {
        $crate::__if_same_ident!($case, $first,
            {},
            { $crate::__stamp_unless_skipped!($case, [$($rest),*], { $($body)* }); }
        );
    };
}

/// Expands to the first body when both identifiers name the same conformance case, else the second
/// (a helper of [`conformance_suite!`]; one rule per case because `macro_rules` cannot compare two
/// captured identifiers directly).
#[doc(hidden)]
#[macro_export]
macro_rules! __if_same_ident {
    (mode_pairs_coexist_or_block_per_the_matrix, mode_pairs_coexist_or_block_per_the_matrix, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (fifo_grants_ex_pr_sequence_in_steps, fifo_grants_ex_pr_sequence_in_steps, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (try_acquire_would_block_leaves_nothing_queued, try_acquire_would_block_leaves_nothing_queued, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (blocking_acquire_times_out_and_leaves_the_queue, blocking_acquire_times_out_and_leaves_the_queue, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (cancelled_acquire_leaves_the_queue, cancelled_acquire_leaves_the_queue, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (dropping_a_guard_releases_the_lock, dropping_a_guard_releases_the_lock, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (release_twice_is_harmless, release_twice_is_harmless, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (fencing_tokens_increase_across_holders_and_clients, fencing_tokens_increase_across_holders_and_clients, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (renewal_keeps_the_lock_for_three_ttls, renewal_keeps_the_lock_for_three_ttls, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (holder_crash_frees_the_lock_within_ttl, holder_crash_frees_the_lock_within_ttl, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (partitioned_holder_loses_before_anyone_else_is_granted, partitioned_holder_loses_before_anyone_else_is_granted, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (paused_store_makes_the_holder_lose_before_its_lease_ends, paused_store_makes_the_holder_lose_before_its_lease_ends, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (stale_release_after_expiry_never_frees_a_newer_holder, stale_release_after_expiry_never_frees_a_newer_holder, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (conversion_up_down_and_deadlock, conversion_up_down_and_deadlock, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (tricky_names_are_distinct_locks, tricky_names_are_distinct_locks, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (invalid_names_are_rejected, invalid_names_are_rejected, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (separate_clients_contend_correctly, separate_clients_contend_correctly, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (history_under_faults_is_linearizable, history_under_faults_is_linearizable, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (enqueue_with_a_lost_reply_leaves_nothing_queued, enqueue_with_a_lost_reply_leaves_nothing_queued, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (renewals_and_releases_with_lost_replies_are_retried, renewals_and_releases_with_lost_replies_are_retried, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (incomparable_conversion_with_a_lost_reply_holds_the_meet, incomparable_conversion_with_a_lost_reply_holds_the_meet, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (abandoned_guards_free_the_lock_within_two_ttls, abandoned_guards_free_the_lock_within_two_ttls, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (store_crash_and_restart_keeps_holders_safe, store_crash_and_restart_keeps_holders_safe, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (paused_holder_process_is_refused_by_the_fenced_register, paused_holder_process_is_refused_by_the_fenced_register, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (fence_register_only_grows, fence_register_only_grows, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    (opposite_orders_never_deadlock_through_sessions_or_lock_all, opposite_orders_never_deadlock_through_sessions_or_lock_all, { $($then:tt)* }, { $($else:tt)* }) => { $($then)* };
    ($a:ident, $b:ident, { $($then:tt)* }, { $($else:tt)* }) => { $($else)* };
}
