//! The conformance suite against the Redis driver: on a single server, and on a 3-master Redis
//! Cluster. Both claim every capability, so no case is skipped.

mod single {
    dlock_tests::conformance_suite!(setup = dlock_tests::suite::redis::setup_single, skip = {});
}

mod cluster {
    dlock_tests::conformance_suite!(setup = dlock_tests::suite::redis::setup_cluster, skip = {});
}
