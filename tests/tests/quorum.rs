//! The conformance suite against the majority quorum: over three in-memory stores, over three
//! standalone Redis servers, and over Redis, etcd and NATS JetStream together.

mod memory {
    dlock_tests::conformance_suite!(
        setup = dlock_tests::suite::quorum::setup_memory,
        skip = {
            holder_crash_frees_the_lock_within_ttl: "in-memory members are not shared between processes (Capabilities::shared_between_processes)",
            paused_holder_process_is_refused_by_the_fenced_register: "in-memory members are not shared between processes (Capabilities::shared_between_processes)",
            paused_store_makes_the_holder_lose_before_its_lease_ends: "in-memory members are no servers that can be paused; the Redis and mixed quorums run it",
            store_crash_and_restart_keeps_holders_safe: "in-memory members are no servers that can be restarted; the Redis and mixed quorums run it",
        }
    );
}

mod redis {
    dlock_tests::conformance_suite!(setup = dlock_tests::suite::quorum::setup_redis, skip = {});
}

mod mixed {
    dlock_tests::conformance_suite!(setup = dlock_tests::suite::quorum::setup_mixed, skip = {});
}
