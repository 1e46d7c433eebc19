//! Failures while clients work: a storage stops in the middle of commits, the master restarts.

use crate::commit::commit;
use neo_lib::{ClusterState, Oid, Tid};
use neo_tests::{Cluster, Options};
use std::time::Duration;

async fn stop_a_storage_during_commits_the_cluster_stays_running_and_acknowledged_data_is_intact(opts: Options) {
    let mut cluster = Cluster::start(opts).await;
    let mut writers = Vec::new();
    for w in 0..2u32 {
        let c = cluster.client().await;
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0;
            for n in 0..150u32 {
                let data = format!("writer {w} commit {n}").into_bytes();
                let Ok(oid) = c.new_oid().await else { continue };
                match commit(&c, oid, Tid::ZERO, &data).await {
                    Ok(tid) => acked.push((oid, tid, data)),
                    Err(_) => failed += 1,
                }
            }
            (acked, failed)
        }));
    }
    // Stop storage 2 while both writers are committing.
    tokio::time::sleep(Duration::from_millis(150)).await;
    cluster.stop_storage(1).await;
    let mut acked: Vec<(Oid, Tid, Vec<u8>)> = Vec::new();
    for w in writers {
        let (a, failed) = tokio::time::timeout(Duration::from_secs(120), w).await.unwrap().unwrap();
        assert!(failed <= 5, "{failed} commits failed (only those in flight at the stop may)");
        acked.extend(a);
    }
    assert!(acked.len() >= 290, "{} commits acknowledged", acked.len());
    assert_eq!(cluster.cluster_state().await, Some(ClusterState::Running));
    // Everything acknowledged is readable, from the storage that stayed.
    let fresh = cluster.client().await;
    for (oid, tid, data) in &acked {
        assert_eq!(fresh.load(*oid).await.unwrap(), (data.clone(), *tid), "{oid:?}");
    }
    // New commits keep working.
    let oid = fresh.new_oid().await.unwrap();
    let tid = commit(&fresh, oid, Tid::ZERO, b"after the loss").await.unwrap();
    acked.push((oid, tid, b"after the loss".to_vec()));
    fresh.close().await;
    // And after a restart of everything (the stopped storage comes back with what it voted
    // and locked before it stopped), verification keeps every acknowledged commit.
    cluster.restart().await;
    let fresh = cluster.client().await;
    for (oid, tid, data) in &acked {
        assert_eq!(fresh.load(*oid).await.unwrap(), (data.clone(), *tid), "{oid:?} after restart");
    }
}

async fn a_client_survives_a_master_restart(opts: Options) {
    let mut cluster = Cluster::start(opts).await;
    let c = cluster.client().await;
    let oid = c.new_oid().await.unwrap();
    let t1 = commit(&c, oid, Tid::ZERO, b"before").await.unwrap();
    cluster.restart_master().await;
    // The client reconnects by itself (retrying while the cluster is not ready) and goes on.
    let t2 = commit(&c, oid, t1, b"after").await.unwrap();
    assert!(t2 > t1);
    assert_eq!(c.load(oid).await.unwrap(), (b"after".to_vec(), t2));
    let other = cluster.client().await;
    assert_eq!(other.load(oid).await.unwrap(), (b"after".to_vec(), t2));
    assert!(other.new_oid().await.unwrap() > oid);
}

/// A client idle across a master restart misses the invalidations of the commits made
/// meanwhile: when it connects again, it is told to invalidate everything (before its last
/// TID moves), and loads the new data; a client that missed nothing is not told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_missed_commits_while_the_master_restarted_invalidates_everything() {
    use neo_client::Invalidation;
    use std::sync::{Arc, Mutex};
    let mut cluster = Cluster::start(Options::default()).await;
    let (idle, other) = (cluster.client().await, cluster.client().await);
    let seen: Arc<Mutex<Vec<(String, Tid)>>> = Arc::default();
    let log = seen.clone();
    let watched = idle.clone();
    idle.set_invalidation_callback(move |i| {
        let entry = match i {
            Invalidation::Objects(tid, _) => ("objects".to_string(), tid),
            Invalidation::All(tid) => ("all".to_string(), tid),
        };
        // Told before the last TID moves.
        assert!(watched.last_transaction() < entry.1, "{entry:?} after the last TID moved");
        log.lock().unwrap().push(entry);
    });
    let oid = other.new_oid().await.unwrap();
    let t1 = commit(&other, oid, Tid::ZERO, b"before").await.unwrap();
    idle.sync().await.unwrap();
    assert_eq!(idle.load(oid).await.unwrap(), (b"before".to_vec(), t1));
    assert_eq!(seen.lock().unwrap().clone(), [("objects".to_string(), t1)]);

    cluster.restart_master().await;
    let t2 = commit(&other, oid, t1, b"after").await.unwrap();
    idle.sync().await.unwrap();
    assert_eq!(seen.lock().unwrap().last().cloned(), Some(("all".to_string(), t2)));
    assert_eq!(idle.last_transaction(), t2);
    assert_eq!(idle.load(oid).await.unwrap(), (b"after".to_vec(), t2));

    // Nothing committed while the master was away: nothing to invalidate.
    let before = seen.lock().unwrap().len();
    cluster.restart_master().await;
    idle.sync().await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), before);
    assert_eq!(idle.load(oid).await.unwrap(), (b"after".to_vec(), t2));
}

/// SQLite only: the failure is injected by taking the write-ahead log's name away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_that_cannot_sync_its_database_stops_and_the_cluster_goes_on_without_it() {
    let mut cluster = Cluster::start(Options::default()).await;
    let c = cluster.client().await;
    let a = c.new_oid().await.unwrap();
    let ta = commit(&c, a, Tid::ZERO, b"before").await.unwrap();
    // Storage 1's next fsync cannot open its log: that lock fails, and so would every later one.
    std::fs::remove_file(format!("{}-wal", cluster.storage_db(0))).unwrap();
    let b = c.new_oid().await.unwrap();
    let tb = commit(&c, b, Tid::ZERO, b"during").await.unwrap();
    let why = cluster.wait_storage_exit(0).await.unwrap_err();
    assert!(why.contains("cannot sync the database"), "{why}");
    assert_eq!(cluster.cluster_state().await, Some(ClusterState::Running));
    // Acknowledged commits are all readable from the storage left, and commits go on.
    let fresh = cluster.client().await;
    assert_eq!(fresh.load(a).await.unwrap(), (b"before".to_vec(), ta));
    assert_eq!(fresh.load(b).await.unwrap(), (b"during".to_vec(), tb));
    let tc = commit(&fresh, a, ta, b"after").await.unwrap();
    assert_eq!(fresh.load(a).await.unwrap(), (b"after".to_vec(), tc));
}

crate::both_backends!(
    stop_a_storage_during_commits_the_cluster_stays_running_and_acknowledged_data_is_intact,
    a_client_survives_a_master_restart
);
