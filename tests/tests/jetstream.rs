//! The conformance suite against the JetStream driver: a single server (R1 stream) and a 3-node
//! cluster (R3 stream), on NATS 2.9 (client-clock leases) and NATS 2.11+ (per-message TTL leases).
//! Every topology claims every capability, so no case is skipped.

mod single_2_9 {
    dlock_tests::conformance_suite!(
        setup = dlock_tests::suite::jetstream::setup_single_2_9,
        skip = {}
    );
}

mod cluster_2_9 {
    dlock_tests::conformance_suite!(
        setup = dlock_tests::suite::jetstream::setup_cluster_2_9,
        skip = {}
    );
}

mod single_2_11 {
    dlock_tests::conformance_suite!(
        setup = dlock_tests::suite::jetstream::setup_single_2_11,
        skip = {}
    );
}

mod cluster_2_11 {
    dlock_tests::conformance_suite!(
        setup = dlock_tests::suite::jetstream::setup_cluster_2_11,
        skip = {}
    );
}
