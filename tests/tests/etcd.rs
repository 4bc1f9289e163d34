//! The conformance suite against the etcd driver: a single member and a 3-member cluster, each on
//! etcd 3.4 and 3.5. The driver claims every capability, so no case is skipped.

mod single_3_4 {
    dlock_tests::conformance_suite!(
        setup = dlock_tests::suite::etcd::setup_single_3_4,
        skip = {}
    );
}

mod cluster_3_4 {
    dlock_tests::conformance_suite!(
        setup = dlock_tests::suite::etcd::setup_cluster_3_4,
        skip = {}
    );
}

mod single_3_5 {
    dlock_tests::conformance_suite!(
        setup = dlock_tests::suite::etcd::setup_single_3_5,
        skip = {}
    );
}

mod cluster_3_5 {
    dlock_tests::conformance_suite!(
        setup = dlock_tests::suite::etcd::setup_cluster_3_5,
        skip = {}
    );
}
