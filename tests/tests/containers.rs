//! The conformance suite on containers (the `containers` launcher): one server of every store and
//! version the suite covers, each in a container on a private network of its own, started by
//! `testcontainers` from local images (`scripts/build-test-images`) or the images `DLOCK_IMAGE_*`
//! name. `DLOCK_TEST_SERVERS=processes` leaves these out, visibly.

mod redis_7 {
    dlock_tests::conformance_suite!(
        setup = dlock_tests::suite::containers::setup_redis_7,
        skip = {}
    );
}

mod etcd_3_4 {
    dlock_tests::conformance_suite!(
        setup = dlock_tests::suite::containers::setup_etcd_3_4,
        skip = {}
    );
}

mod etcd_3_5 {
    dlock_tests::conformance_suite!(
        setup = dlock_tests::suite::containers::setup_etcd_3_5,
        skip = {}
    );
}

mod nats_2_9 {
    dlock_tests::conformance_suite!(
        setup = dlock_tests::suite::containers::setup_nats_2_9,
        skip = {}
    );
}

mod nats_2_11 {
    dlock_tests::conformance_suite!(
        setup = dlock_tests::suite::containers::setup_nats_2_11,
        skip = {}
    );
}
