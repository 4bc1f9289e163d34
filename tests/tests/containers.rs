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

/// A 3-member etcd cluster on two networks (peers, clients) with faults between its members — the
/// leader cut off from its peers while its clients stay connected to it, a follower cut off (a
/// minority against a majority), a member killed and restarted with its data, and a rolling
/// restart — injected in turn with client link cuts and lost replies under the history checker,
/// which must find no violation.
mod etcd_3_5_cluster {
    use dlock_tests::history::{self, Workload};
    use dlock_tests::suite::containers::setup_etcd_3_5_cluster;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn history_under_partitions_kills_and_rolling_restarts_of_members_is_linearizable() {
        let Some(factory) = setup_etcd_3_5_cluster().await.expect("the cluster starts") else {
            return;
        };
        let workload = Workload {
            store_faults: 0.6,
            ..Workload::default()
        };
        let report = history::run(&factory, workload)
            .await
            .expect("the history runs");
        let tally = factory.tally();
        println!("member faults injected: {tally:?}");
        report.check_and_print().expect("no violation");
        assert!(
            tally.iter().all(|&(_, n)| n > 0),
            "every member fault must strike at least once: {tally:?}"
        );
    }
}

/// The member faults cut exactly the links they name: an isolated leader loses its peers (the other
/// two elect a new leader without it) but still answers its clients; rejoined, it follows the new
/// leader.
mod etcd_3_5_cluster_faults {
    use anyhow::{ensure, Result};
    use dlock_tests::harness::containers::{EtcdContainerCluster, Launcher, ServerImage};
    use dlock_tests::harness::net::http_get;
    use dlock_tests::harness::{self, Backend};
    use dlock_tests::suite::eventually;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_isolated_leader_loses_its_peers_but_not_its_clients() -> Result<()> {
        if !harness::require(Backend::Etcd)
            || !harness::containers::require_launcher(Launcher::Containers)
        {
            return Ok(());
        }
        let cluster = EtcdContainerCluster::start(ServerImage::Etcd3_5).await?;
        let old = cluster.leader(0).await?;
        let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
        cluster.isolate(old)?;
        eventually("the other two members elect a new leader", || async {
            let a = cluster.leader(others[0]).await;
            let b = cluster.leader(others[1]).await;
            Ok(matches!((a, b), (Ok(a), Ok(b)) if a == b && a != old))
        })
        .await?;
        let health = http_get(cluster.members()[old].client_addr(), "/health").await?;
        ensure!(
            !health.body.contains("\"true\""),
            "the isolated member still calls itself healthy: {}",
            health.body
        );
        cluster.rejoin(old)?;
        cluster.wait_serving(old).await?;
        let new = cluster.leader(others[0]).await?;
        eventually("the rejoined member follows the new leader", || async {
            Ok(cluster.leader(old).await.ok() == Some(new))
        })
        .await?;
        Ok(())
    }
}
