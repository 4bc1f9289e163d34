//! The conformance suite against the in-memory driver.

dlock_tests::conformance_suite!(
    setup = dlock_tests::suite::memory::setup,
    skip = {
        holder_crash_frees_the_lock_within_ttl: "the in-memory driver claims no sharing between processes (Capabilities::shared_between_processes)",
        paused_store_makes_the_holder_lose_before_its_lease_ends: "the in-memory store is no server that can be paused; partitioned_holder_loses_before_anyone_else_is_granted covers lost() for it",
        store_crash_and_restart_keeps_holders_safe: "the in-memory store is no server that can be killed and restarted: it lives and dies with its clients",
        paused_holder_process_is_refused_by_the_fenced_register: "the in-memory driver claims no sharing between processes (Capabilities::shared_between_processes)",
    }
);
