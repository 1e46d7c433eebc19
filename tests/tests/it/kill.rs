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

/// The storages' MySQL server (Some(None): SQLite); None: MySQL wanted but not available (the
/// test is skipped).
fn server(mysql: bool) -> Option<Option<String>> {
    if !mysql {
        return Some(None);
    }
    if !neo_tests::mysql_available() {
        return None;
    }
    Some(Some(std::env::var("NEO_TEST_MYSQL").unwrap_or_else(|_| neo_storage::testing::DEFAULT_SERVER.into())))
}

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
    let Some(server) = server(mysql) else { return };
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

/// Run `f` on storage `i`'s database of a `SimpleCluster`, opened directly (its process is
/// stopped), on a thread of its own (a MySQL backend runs its own runtime).
fn with_storage<R: Send + 'static>(
    cluster: &SimpleCluster,
    server: Option<&str>,
    i: usize,
    f: impl FnOnce(&mut dyn neo_storage::backend::Backend) -> R + Send + 'static,
) -> R {
    let (dir, name, server) = (cluster.dir.clone(), cluster.cluster.clone(), server.map(str::to_string));
    std::thread::spawn(move || {
        let mut db: Box<dyn neo_storage::backend::Backend> = match server {
            Some(s) => {
                let url = format!("{}/{}", s.trim_end_matches('/'), neosimple::launcher::mysql_database(&name, i));
                Box::new(neo_storage::backend::mysql::MysqlBackend::open(&url, &name).unwrap())
            }
            None => Box::new(
                neo_storage::backend::sqlite::SqliteBackend::open(&dir.join(format!("storage{i}.sqlite")), &name)
                    .unwrap(),
            ),
        };
        f(db.as_mut())
    })
    .join()
    .unwrap()
}

/// Every committed transaction and object revision of partition `p`.
fn partition_rows(
    db: &mut dyn neo_storage::backend::Backend,
    p: u32,
) -> (Vec<neo_storage::backend::TxnInfo>, Vec<neo_storage::backend::ReplObject>) {
    let t = db.fetch_transactions(p, Tid::ZERO, Tid::MAX, u32::MAX).unwrap();
    let o = db.fetch_objects(p, (Tid::ZERO, neo_lib::Oid::ZERO), Tid::MAX, u32::MAX, usize::MAX).unwrap();
    (t, o)
}

/// The storages' cell states (nid, partition, state) and the nid of each storage section.
async fn cells(cluster: &SimpleCluster) -> Vec<(neo_lib::Nid, u32, CellState)> {
    let b = cluster.admin_ask(msg::AskPartitionList { min_offset: 0, max_offset: 0, nid: None }.into()).await.unwrap();
    let pt = proto::convert::pt_from_msg(&expect_answer!(b, AnswerPartitionList).unwrap()).unwrap();
    (0..pt.np()).flat_map(|p| pt.row(p).iter().map(move |c| (c.nid, p, c.state)).collect::<Vec<_>>()).collect()
}

async fn nid_of_port(cluster: &SimpleCluster, port: u16) -> Option<neo_lib::Nid> {
    let b = cluster.admin_ask(msg::AskNodeList { node_type: None }.into()).await.ok()?;
    let list = expect_answer!(b, AnswerNodeList).ok()?;
    list.nodes.iter().find(|n| n.address.ends_with(&format!(":{port}"))).map(|n| neo_lib::Nid(n.nid))
}

/// Wait until `cond` holds on the cell states (up to `secs`).
async fn wait_cells(
    cluster: &SimpleCluster,
    secs: u64,
    what: &str,
    cond: impl Fn(&[(neo_lib::Nid, u32, CellState)]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let c = cells(cluster).await;
        if cond(&c) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A storage added to a cluster copies its cells; its source is killed in the middle, then
/// the new storage itself: the copy goes on from another source, resumes from the progress
/// the new storage saved, and ends with exactly the source's data in every partition it got.
async fn replication_survives_the_kill_of_its_source_then_of_its_destination(mysql: bool) {
    let Some(server) = server(mysql) else { return };
    let mut opts = SimpleOptions::new(EXE.into());
    opts.storages = 2;
    opts.spare_storages = 1;
    opts.replicas = 1;
    opts.partitions = 6;
    opts.tls = true;
    opts.cluster = format!("resume{}", fastrand::u32(..));
    opts.mysql = server.clone();
    let mut cluster = SimpleCluster::start(&opts).unwrap();
    let _drop = scopeguard(server.clone(), opts.cluster.clone(), 3);
    cluster.wait_running(Duration::from_secs(60)).await.unwrap();
    let mut cfg = ClientConfig::new(vec![cluster.master.clone()], &cluster.cluster);
    cfg.tls = cluster.client_tls.clone();
    cfg.compress = false;
    let c = Client::connect(cfg.clone()).await.unwrap();
    let mut acked = Vec::new();
    for t in 0..12u64 {
        let mut txn = c.tpc_begin(b"", b"", b"").await.unwrap();
        for j in 0..400u64 {
            let oid = c.new_oid().await.unwrap();
            let data: Vec<u8> = (0..16_000u64).map(|k| ((k * 31 + j * 7 + t) % 251) as u8).collect();
            c.store(&mut txn, oid, Tid::ZERO, &data).unwrap();
            acked.push((oid, data));
        }
        c.tpc_vote(&mut txn).await.unwrap();
        c.tpc_finish(txn).await.unwrap();
    }
    // Storage 3 joins and gets cells.
    cluster.respawn(EXE.as_ref(), "storage3").unwrap();
    let conf = cluster.conf_text.clone();
    let port = |section: &str| -> u16 {
        let text = &conf;
        let at = text.find(&format!("[{section}]")).unwrap();
        let bind = text[at..].lines().find_map(|l| l.strip_prefix("bind = ")).unwrap();
        bind.rsplit(':').next().unwrap().parse().unwrap()
    };
    let (p1, p3) = (port("storage1"), port("storage3"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let s3 = loop {
        if let Some(n) = nid_of_port(&cluster, p3).await {
            break n;
        }
        assert!(Instant::now() < deadline, "storage3 did not connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let s1 = nid_of_port(&cluster, p1).await.unwrap();
    let b = cluster.admin_ask(msg::AddPendingNodes { nids: vec![s3.0] }.into()).await.unwrap();
    assert!(matches!(b, proto::Body::Error(ref e) if e.code == 0), "{b:?}");
    let of = |c: &[(neo_lib::Nid, u32, CellState)], nid, state| c.iter().filter(|x| x.0 == nid && x.2 == state).count();
    // Kill a source once the copy has begun, and `print pt` shows how far it is.
    wait_cells(&cluster, 60, "storage 3 gets cells", |c| of(c, s3, CellState::OutOfDate) > 0).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b =
            cluster.admin_ask(msg::AskPartitionList { min_offset: 0, max_offset: 0, nid: None }.into()).await.unwrap();
        let m = expect_answer!(b, AnswerPartitionList).unwrap();
        if m.progress.iter().any(|c| neo_lib::Nid(c.nid) == s3 && c.percent < 100) {
            break;
        }
        assert!(Instant::now() < deadline, "no replication progress reported");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    cluster.kill("storage1").unwrap();
    wait_cells(&cluster, 30, "storage 1 outdated", |c| of(c, s1, CellState::UpToDate) == 0).await;
    // Then the destination, in the middle of a partition if it can be caught there.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let left = of(&cells(&cluster).await, s3, CellState::OutOfDate);
    cluster.kill("storage3").unwrap();
    let progress: Vec<(u32, neo_storage::backend::ReplProgress)> = with_storage(&cluster, server.as_deref(), 3, |db| {
        (0..6).filter_map(|p| db.replication_progress(p).unwrap().map(|r| (p, r))).collect()
    });
    eprintln!("storage 3 killed with {left} cells to copy; saved progress: {progress:?}");
    assert!(!progress.is_empty() || left == 0, "no progress saved for the cells left to copy");
    cluster.respawn(EXE.as_ref(), "storage3").unwrap();
    cluster.respawn(EXE.as_ref(), "storage1").unwrap();
    wait_caught_up(&cluster, 120).await;
    let readback = Client::connect(cfg.clone()).await.unwrap();
    for (oid, data) in &acked {
        assert!(readback.load(*oid).await.unwrap().0 == *data, "{oid:?}");
    }
    readback.close().await;
    c.close().await;
    // Record by record, every partition of storage 3 is what another storage holding it has.
    let s2 = nid_of_port(&cluster, port("storage2")).await.unwrap();
    let final_cells = cells(&cluster).await;
    cluster.stop(Duration::from_secs(30)).await;
    let index = |n: neo_lib::Nid| {
        if n == s1 {
            1
        } else if n == s2 {
            2
        } else {
            3
        }
    };
    let mine: Vec<u32> = final_cells.iter().filter(|c| c.0 == s3).map(|c| c.1).collect();
    assert!(!mine.is_empty());
    for p in mine {
        let other = final_cells.iter().find(|c| c.1 == p && c.0 != s3).map(|c| index(c.0)).unwrap();
        let a = with_storage(&cluster, server.as_deref(), other, move |db| partition_rows(db, p));
        let b = with_storage(&cluster, server.as_deref(), 3, move |db| partition_rows(db, p));
        assert!(a.0 == b.0, "partition {p}: transactions differ ({} vs {})", a.0.len(), b.0.len());
        assert!(a.1 == b.1, "partition {p}: objects differ ({} vs {})", a.1.len(), b.1.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_survives_source_and_destination_kills_sqlite() {
    replication_survives_the_kill_of_its_source_then_of_its_destination(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_survives_source_and_destination_kills_mysql() {
    replication_survives_the_kill_of_its_source_then_of_its_destination(true).await
}
