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

/// 3-member clusters on two networks (peers, clients) with faults between their members — the
/// leader cut off from its peers while its clients stay connected to it, a follower cut off (a
/// minority against a majority), a member killed and restarted with its data, and a rolling
/// restart — injected in turn with client link cuts and lost replies under the history checker,
/// which must find no violation.
mod member_faults {
    use dlock_tests::history::{self, Workload};
    use dlock_tests::suite::containers::{
        setup_etcd_3_5_cluster, setup_nats_2_11_cluster, ClusterFactory,
    };

    async fn history_under_member_faults(factory: Option<ClusterFactory>) {
        let Some(factory) = factory else {
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn etcd_3_5_cluster_history_is_linearizable() {
        history_under_member_faults(setup_etcd_3_5_cluster().await.expect("the cluster starts"))
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn nats_2_11_r3_cluster_history_is_linearizable() {
        history_under_member_faults(setup_nats_2_11_cluster().await.expect("the cluster starts"))
            .await;
    }
}

/// The member faults cut exactly the links they name: an isolated leader loses its peers (the other
/// two elect a new leader without it) but still answers its clients; rejoined, it follows the new
/// leader.
mod etcd_3_5_cluster_faults {
    use anyhow::{ensure, Result};
    use dlock_tests::harness::containers::{ContainerCluster, Launcher, ServerImage};
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
        let cluster = ContainerCluster::start(ServerImage::Etcd3_5).await?;
        let old = cluster.leader(0).await?;
        let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
        cluster.isolate(old)?;
        eventually("the other two members elect a new leader", || async {
            let a = cluster.leader(others[0]).await;
            let b = cluster.leader(others[1]).await;
            Ok(matches!((a, b), (Ok(a), Ok(b)) if a == b && a != old))
        })
        .await?;
        let health = http_get(cluster.client_addr(old), "/health").await?;
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

/// The same on NATS: the leader of the driver's stream, cut off from its peers, is replaced by one
/// of the other two while it still answers its clients' monitoring requests.
mod nats_2_11_cluster_faults {
    use std::net::SocketAddr;

    use anyhow::{ensure, Result};
    use dlock_tests::harness::containers::{ContainerCluster, Launcher, ServerImage};
    use dlock_tests::harness::net::http_get;
    use dlock_tests::harness::{self, Backend};
    use dlock_tests::suite::eventually;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_isolated_stream_leader_is_replaced() -> Result<()> {
        if !harness::require(Backend::Nats)
            || !harness::containers::require_launcher(Launcher::Containers)
        {
            return Ok(());
        }
        let cluster = ContainerCluster::start(ServerImage::Nats2_11).await?;
        let url = format!(
            "nats://{}?replicas=3&discover=false",
            (0..3)
                .map(|i| cluster.client_addr(i).to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        // The first lock creates the driver's R3 stream, whose leader the fault picks.
        let locks = dlock::connect(&url).await?;
        locks.lock("faults/stream").await?.release().await?;
        let old = cluster.leader(0).await?;
        let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
        cluster.isolate(old)?;
        eventually("the other two nodes elect a new stream leader", || async {
            let a = cluster.leader(others[0]).await;
            let b = cluster.leader(others[1]).await;
            Ok(matches!((a, b), (Ok(a), Ok(b)) if a == b && a != old))
        })
        .await?;
        // Its clients still reach it: the fault cut the peers' network only.
        let monitor = SocketAddr::new(cluster.client_addr(old).ip(), 8222);
        let varz = http_get(monitor, "/varz").await?;
        ensure!(
            varz.status == 200,
            "the isolated node must still answer on the clients' network: HTTP {}",
            varz.status
        );
        cluster.rejoin(old)?;
        cluster.wait_serving(old).await?;
        let new = cluster.leader(others[0]).await?;
        eventually(
            "the rejoined node follows the new stream leader",
            || async { Ok(cluster.leader(old).await.ok() == Some(new)) },
        )
        .await?;
        locks.lock("faults/stream").await?.release().await?;
        Ok(())
    }
}
