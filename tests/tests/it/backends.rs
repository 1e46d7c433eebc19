//! The same cluster on MySQL/MariaDB storages, and on a mix of SQLite and MySQL storages holding
//! replicas of the same partitions. Skipped (saying so) when no server is reachable and
//! NEO_TEST_MYSQL is unset; CI sets it.

use crate::commit::commit;
use crate::restart::assert_every_storage_holds;
use neo_client::ClientError;
use neo_lib::Tid;
use neo_tests::{Backends, Cluster, Options};

async fn commit_and_restart(backends: Backends) {
    let Some(mut cluster) = Cluster::try_start(Options { backends, ..Options::default() }).await else { return };
    let (a, b) = (cluster.client().await, cluster.client().await);
    let mut committed = Vec::new();
    for n in 0..60usize {
        let c = if n % 2 == 0 { &a } else { &b };
        let oid = c.new_oid().await.unwrap();
        let data = format!("{backends:?} object {n} ").repeat(1 + n % 20).into_bytes();
        committed.push((oid, commit(c, oid, Tid::ZERO, &data).await.unwrap(), data));
    }
    // A conflict is detected on these storages too.
    let (oid, base, _) = committed[0].clone();
    commit(&a, oid, base, b"a wins").await.unwrap();
    let e = commit(&b, oid, base, b"b loses").await.unwrap_err();
    assert!(matches!(e, ClientError::Conflict { oid: o, .. } if o == oid), "{e:?}");
    let (_, last) = a.load(oid).await.unwrap();
    committed[0] = (oid, last, b"a wins".to_vec());
    a.close().await;
    b.close().await;

    cluster.restart().await;
    let fresh = cluster.client().await;
    for (oid, tid, data) in &committed {
        assert_eq!(fresh.load(*oid).await.unwrap(), (data.clone(), *tid));
    }
    assert_every_storage_holds(&cluster, &committed[1..]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_on_mysql_storages_commits_restarts_and_reads_everything_back() {
    commit_and_restart(Backends::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_storage_and_a_mysql_storage_hold_replicas_of_the_same_partitions() {
    commit_and_restart(Backends::Mixed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_connections_killed_under_load_lose_nothing_acknowledged() {
    let Some(cluster) = Cluster::try_start(Options { backends: Backends::Mysql, ..Options::default() }).await else {
        return;
    };
    let c = cluster.client().await;
    let mut acked = Vec::new();
    let mut failed = 0;
    for n in 0..60u32 {
        if n == 20 || n == 40 {
            assert!(cluster.kill_mysql_connections() >= 2, "each storage had a connection");
        }
        let oid = c.new_oid().await.unwrap();
        let data = format!("commit {n}").into_bytes();
        match commit(&c, oid, Tid::ZERO, &data).await {
            Ok(tid) => acked.push((oid, tid, data)),
            Err(_) => failed += 1,
        }
    }
    // Only a transaction in flight when its connection died may fail.
    assert!(failed <= 4, "{failed} commits failed");
    assert_eq!(cluster.cluster_state().await, Some(neo_lib::ClusterState::Running));
    let fresh = cluster.client().await;
    for (oid, tid, data) in &acked {
        assert_eq!(fresh.load(*oid).await.unwrap(), (data.clone(), *tid));
    }
    assert_every_storage_holds(&cluster, &acked).await;
}
