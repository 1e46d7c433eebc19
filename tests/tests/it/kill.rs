//! Real node processes killed with SIGKILL (nothing flushed, no goodbye) again and again while
//! two clients commit: every acknowledged commit survives, and is on every storage once they
//! all caught up.

use neo_client::{Client, ClientConfig};
use neo_lib::{CellState, ClusterState, Oid, Tid};
use neosimple::{SimpleCluster, SimpleOptions};
use proto::{expect_answer, msg};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_neo-test-node");

/// How long storages are killed and restarted (NEO_KILL_SECS, default 20 s).
fn kill_period() -> Duration {
    let secs = std::env::var("NEO_KILL_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    Duration::from_secs(secs)
}

async fn cell_states(cluster: &SimpleCluster) -> Option<Vec<CellState>> {
    let b = cluster.admin_ask(msg::AskPartitionList { min_offset: 0, max_offset: 0, nid: None }.into()).await.ok()?;
    let pt = proto::convert::pt_from_msg(&expect_answer!(b, AnswerPartitionList).ok()?).ok()?;
    Some(pt.rows().iter().flatten().map(|c| c.state).collect())
}

async fn cluster_state(cluster: &SimpleCluster) -> Option<ClusterState> {
    let b = cluster.admin_ask(msg::AskClusterState {}.into()).await.ok()?;
    expect_answer!(b, AnswerClusterState).ok().and_then(|a| ClusterState::from_i32(a.state))
}

/// Wait until the cluster is RUNNING with every cell UP_TO_DATE.
async fn wait_caught_up(cluster: &SimpleCluster, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let states = cell_states(cluster).await;
        if cluster_state(cluster).await == Some(ClusterState::Running)
            && states.as_ref().is_some_and(|s| s.iter().all(|c| *c == CellState::UpToDate))
        {
            return;
        }
        assert!(Instant::now() < deadline, "not caught up after {secs} s: {states:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Commit until `stop`: new objects and new revisions of this writer's objects; returns the
/// acknowledged revisions (oid -> newest (tid, data)) and the number of failed commits.
async fn writer(c: Client, w: usize, stop: Arc<Mutex<bool>>) -> (BTreeMap<Oid, (Tid, Vec<u8>)>, usize) {
    let mut acked: BTreeMap<Oid, (Tid, Vec<u8>)> = BTreeMap::new();
    let mut failed = 0;
    let mut n = 0usize;
    while !*stop.lock().unwrap() {
        n += 1;
        let oid = if n.is_multiple_of(4) || acked.is_empty() {
            match c.new_oid().await {
                Ok(o) => o,
                Err(_) => {
                    failed += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        } else {
            *acked.keys().nth(fastrand::usize(..acked.len())).unwrap()
        };
        let serial = acked.get(&oid).map(|(t, _)| *t).unwrap_or(Tid::ZERO);
        let data = format!("writer {w} commit {n} ").repeat(1 + n % 40).into_bytes();
        match crate::commit::commit(&c, oid, serial, &data).await {
            Ok(tid) => {
                acked.insert(oid, (tid, data));
            }
            Err(_) => {
                // An unknown outcome (connection lost during finish) is resolved by the client;
                // a failure here committed nothing: the object keeps its acknowledged revision.
                failed += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    c.close().await;
    (acked, failed)
}

async fn storages_killed_again_and_again_while_two_clients_commit(storages: usize, replicas: u32, mysql: bool) {
    let server = if mysql {
        if !neo_tests::mysql_available() {
            return;
        }
        Some(std::env::var("NEO_TEST_MYSQL").unwrap_or_else(|_| neo_storage::testing::DEFAULT_SERVER.into()))
    } else {
        None
    };
    let mut opts = SimpleOptions::new(EXE.into());
    opts.storages = storages;
    opts.replicas = replicas;
    opts.partitions = 6;
    opts.tls = true;
    opts.cluster = format!("kill{}", fastrand::u32(..));
    opts.mysql = server.clone();
    let mut cluster = SimpleCluster::start(&opts).unwrap();
    let drop_databases = scopeguard(server.clone(), opts.cluster.clone(), storages);
    cluster.wait_running(Duration::from_secs(60)).await.unwrap();
    let mut cfg = ClientConfig::new(vec![cluster.master.clone()], &cluster.cluster);
    cfg.tls = cluster.client_tls.clone();
    let stop = Arc::new(Mutex::new(false));
    let mut writers = Vec::new();
    for w in 0..2 {
        let c = Client::connect(cfg.clone()).await.unwrap();
        writers.push(tokio::spawn(writer(c, w, stop.clone())));
    }
    // Kill a storage, let the cluster notice, start it again; over and over.
    let sections: Vec<String> = (1..=storages).map(|i| format!("storage{i}")).collect();
    let until = Instant::now() + kill_period();
    let mut kills = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(1000..2500))).await;
        let victim = &sections[fastrand::usize(..storages)];
        cluster.kill(victim).unwrap();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(200..1500))).await;
        cluster.respawn(EXE.as_ref(), victim).unwrap();
    }
    wait_caught_up(&cluster, 120).await;
    *stop.lock().unwrap() = true;
    let mut acked = BTreeMap::new();
    let mut failed = 0;
    for w in writers {
        let (a, f) = tokio::time::timeout(Duration::from_secs(120), w).await.unwrap().unwrap();
        acked.extend(a);
        failed += f;
    }
    eprintln!("{kills} kills, {} objects acknowledged, {failed} commits failed", acked.len());
    assert!(acked.len() >= 20, "too few commits acknowledged: {}", acked.len());
    wait_caught_up(&cluster, 120).await;
    // Each storage alone (the others killed) has every acknowledged revision.
    for alone in &sections {
        for other in sections.iter().filter(|s| *s != alone) {
            cluster.kill(other).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while cluster_state(&cluster).await != Some(ClusterState::Running) {
            assert!(Instant::now() < deadline, "cluster not RUNNING on {alone} alone");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let c = Client::connect(cfg.clone()).await.unwrap();
        for (oid, (tid, data)) in &acked {
            let (got, serial) = c.load(*oid).await.unwrap_or_else(|e| panic!("{alone} alone: {oid:?}: {e}"));
            assert!(serial == *tid && got == *data, "{alone} alone: {oid:?} is at {serial:?}, acknowledged {tid:?}");
        }
        c.close().await;
        for other in sections.iter().filter(|s| *s != alone) {
            cluster.respawn(EXE.as_ref(), other).unwrap();
        }
        wait_caught_up(&cluster, 120).await;
    }
    cluster.stop(Duration::from_secs(30)).await;
    drop(drop_databases);
}

/// Drops the MySQL databases of the cluster's storages when dropped.
struct DropDatabases(Option<String>, String, usize);

fn scopeguard(server: Option<String>, cluster: String, storages: usize) -> DropDatabases {
    DropDatabases(server, cluster, storages)
}

impl Drop for DropDatabases {
    fn drop(&mut self) {
        let Some(server) = &self.0 else { return };
        for i in 1..=self.2 {
            let db = neosimple::launcher::mysql_database(&self.1, i);
            let _ = neo_storage::testing::server_sql(server, None, &format!("DROP DATABASE IF EXISTS `{db}`"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_storages_one_replica_sqlite() {
    storages_killed_again_and_again_while_two_clients_commit(2, 1, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_storages_two_replicas_sqlite() {
    storages_killed_again_and_again_while_two_clients_commit(3, 2, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_storages_one_replica_mysql() {
    storages_killed_again_and_again_while_two_clients_commit(2, 1, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_storages_two_replicas_mysql() {
    storages_killed_again_and_again_while_two_clients_commit(3, 2, true).await
}
