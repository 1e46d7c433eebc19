//! Restarts: the whole cluster, and a storage at a time.

use crate::commit::commit;
use neo_lib::{CellState, ClusterState, NodeType, Tid};
use neo_storage::backend::{Backend, NewData, NewObject, TxnMeta};
use neo_tests::{Cluster, Options};
use proto::msg;
use proto::net::{connect_identified, identification};

async fn the_whole_cluster_restarts_and_everything_is_still_there(opts: Options) {
    let mut cluster = Cluster::start(opts).await;
    let c = cluster.client().await;
    // len(storage): 0 for an empty database, then the greatest committed OID, across restarts;
    // OIDs allocated but not committed do not count.
    assert_eq!(c.max_stored_oid().await.unwrap(), neo_lib::Oid(0));
    let mut committed = Vec::new();
    for n in 0..200u32 {
        let oid = c.new_oid().await.unwrap();
        let data = format!("object {n}").into_bytes();
        committed.push((oid, commit(&c, oid, Tid::ZERO, &data).await.unwrap(), data));
    }
    let (last_oid, last_tid) = (committed.last().unwrap().0, committed.last().unwrap().1);
    assert!(c.new_oid().await.unwrap() > last_oid);
    assert_eq!(c.max_stored_oid().await.unwrap(), last_oid);
    c.close().await;
    cluster.restart().await;

    let c = cluster.client().await;
    assert_eq!(c.last_transaction(), last_tid);
    assert_eq!(c.max_stored_oid().await.unwrap(), last_oid);
    for (oid, tid, data) in &committed {
        assert_eq!(c.load(*oid).await.unwrap(), (data.clone(), *tid));
    }
    // OIDs and TIDs are never handed out twice.
    let oid = c.new_oid().await.unwrap();
    assert!(oid > last_oid, "{oid:?} after {last_oid:?}");
    let tid = commit(&c, oid, Tid::ZERO, b"after restart").await.unwrap();
    assert!(tid > last_tid);

    assert_every_storage_holds(&cluster, &committed).await;
}

/// Each storage holds a full replica: ask each one directly for every revision.
pub async fn assert_every_storage_holds(cluster: &Cluster, committed: &[(neo_lib::Oid, Tid, Vec<u8>)]) {
    let net = cluster.net();
    for addr in &cluster.storage_addrs {
        let req = identification(&cluster.name, NodeType::Client, None, None);
        let (link, _incoming, _) = connect_identified(addr, &net, req).await.unwrap();
        for (oid, tid, data) in committed {
            let b = link.ask(msg::AskObject { oid: oid.0, at: Some(tid.0), before: None }).await.unwrap();
            let a = proto::expect_answer!(b, AnswerObject).unwrap();
            assert_eq!(a.serial, tid.0);
            let raw = if a.compression == 0 { a.data } else { unzip(&a.data) };
            assert_eq!(&raw, data, "{oid:?} on {addr}");
        }
        link.close().await;
    }
}

fn unzip(data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(data).read_to_end(&mut out).unwrap();
    out
}

async fn a_storage_lost_during_commits_leaves_the_cluster_running_and_data_intact(opts: Options) {
    let mut cluster = Cluster::start(opts).await;
    let c = cluster.client().await;
    let mut committed = Vec::new();
    for n in 0..20u32 {
        let oid = c.new_oid().await.unwrap();
        committed.push((oid, commit(&c, oid, Tid::ZERO, &n.to_be_bytes()).await.unwrap()));
    }
    cluster.stop_storage(1).await;
    for n in 20..40u32 {
        let oid = c.new_oid().await.unwrap();
        committed.push((oid, commit(&c, oid, Tid::ZERO, &n.to_be_bytes()).await.unwrap()));
    }
    assert_eq!(cluster.cluster_state().await, Some(ClusterState::Running));
    let fresh = cluster.client().await;
    for (n, (oid, tid)) in committed.iter().enumerate() {
        assert_eq!(fresh.load(*oid).await.unwrap(), ((n as u32).to_be_bytes().to_vec(), *tid));
    }
}

/// A transaction as a crash leaves it in a storage's database: voted (temporary data), and
/// locked with its final tid if `tid` is given, or fully committed if `unlock`.
fn leave_transaction(
    db: &mut dyn Backend,
    np: u32,
    ttid: Tid,
    tid: Option<Tid>,
    unlock: bool,
    objects: &[(neo_lib::Oid, &[u8])],
) {
    let part = |id: u64| (id % u64::from(np)) as u32;
    let new: Vec<(u32, NewObject)> = objects
        .iter()
        .map(|(oid, data)| {
            let data = NewData { checksum: neo_storage::sha1(data).to_vec(), compression: 0, data: data.to_vec() };
            (part(oid.0), NewObject { oid: *oid, data: Some(data), data_serial: None })
        })
        .collect();
    let meta =
        TxnMeta { user: b"crash".to_vec(), oids: objects.iter().map(|(o, _)| *o).collect(), ..Default::default() };
    db.vote_data(ttid, &new, Some((part(ttid.0), &meta))).unwrap();
    if let Some(tid) = tid {
        let mut partitions: Vec<u32> = objects.iter().map(|(o, _)| part(o.0)).chain([part(ttid.0)]).collect();
        partitions.sort_unstable();
        partitions.dedup();
        db.lock(ttid, tid, &partitions).unwrap();
        if unlock {
            db.unlock(ttid, tid).unwrap();
        }
    }
    db.sync().unwrap();
}

/// Power loss between vote and lock: votes are not synced, so one replica may come back with
/// the transaction locked and the other without it, or with only its vote (maybe not the
/// last one). Either way that replica never locked it, so the commit was never acknowledged:
/// verification drops it everywhere, and keeps every replica up to date.
async fn a_transaction_one_replica_did_not_lock_is_dropped_at_restart(opts: Options) {
    let np = opts.partitions;
    let mut cluster = Cluster::start(opts).await;
    let c = cluster.client().await;
    let kept = c.new_oid().await.unwrap();
    let kept_tid = commit(&c, kept, Tid::ZERO, b"before the crash").await.unwrap();
    let (lost, voted) = (c.new_oid().await.unwrap(), c.new_oid().await.unwrap());
    c.close().await;
    cluster.stop_all().await;

    let (t1, t2) = (Tid(kept_tid.0 + 100 * u64::from(np)), Tid(kept_tid.0 + 200 * u64::from(np)));
    let t2_objects: &[(neo_lib::Oid, &[u8])] = &[(voted, b"voted everywhere")];
    cluster.with_storage_db(0, |db| {
        // Locked on storage 0, lost by storage 1: never acknowledged.
        let t1_objects: &[(neo_lib::Oid, &[u8])] = &[(kept, b"lost update"), (lost, b"lost")];
        leave_transaction(db, np, t1, Some(Tid(t1.0 + u64::from(np))), false, t1_objects);
        // Locked on storage 0, only voted on storage 1: not acknowledged either.
        leave_transaction(db, np, t2, Some(Tid(t2.0 + u64::from(np))), false, t2_objects);
    });
    cluster.with_storage_db(1, |db| leave_transaction(db, np, t2, None, false, t2_objects));
    cluster.restart().await;

    let c = cluster.client().await;
    assert_eq!(c.last_transaction(), kept_tid);
    assert_eq!(c.load(kept).await.unwrap(), (b"before the crash".to_vec(), kept_tid));
    for oid in [lost, voted] {
        assert!(matches!(c.load(oid).await, Err(neo_client::ClientError::NotFound(_))), "{:?}", c.load(oid).await);
    }
    assert!(cluster.cell_states().await.iter().all(|s| *s == CellState::UpToDate));
    assert_every_storage_holds(&cluster, &[(kept, kept_tid, b"before the crash".to_vec())]).await;
    c.close().await;
    cluster.stop_all().await;
    for i in 0..2 {
        assert!(cluster.with_storage_db(i, |db| db.locked_transactions().unwrap()).is_empty(), "storage {i}");
    }
}

/// A transaction committed on one replica and locked on another was acknowledged: a third
/// replica that only voted it cannot serve it (its vote may not be the last one), so its cells
/// are outdated, the vote dropped there, and the commit kept.
async fn a_replica_missing_an_acknowledged_transaction_is_outdated_at_restart(opts: Options) {
    let np = opts.partitions;
    let opts = Options { storages: 3, replicas: 2, ..opts };
    let mut cluster = Cluster::start(opts).await;
    let c = cluster.client().await;
    let oid = c.new_oid().await.unwrap();
    let first = commit(&c, oid, Tid::ZERO, b"first").await.unwrap();
    c.close().await;
    cluster.stop_all().await;
    let ttid = Tid(first.0 + 100 * u64::from(np));
    let tid = Tid(ttid.0 + u64::from(np));
    let objects: &[(neo_lib::Oid, &[u8])] = &[(oid, b"second")];
    cluster.with_storage_db(0, |db| leave_transaction(db, np, ttid, Some(tid), true, objects));
    cluster.with_storage_db(1, |db| leave_transaction(db, np, ttid, Some(tid), false, objects));
    cluster.with_storage_db(2, |db| leave_transaction(db, np, ttid, None, false, &[(oid, b"stale vote")]));
    cluster.restart().await;
    let c = cluster.client().await;
    assert_eq!(c.load(oid).await.unwrap(), (b"second".to_vec(), tid));
    // The partitions of the object and of the transaction's metadata were outdated on storage
    // 3 only, and reset: it replicates them from nothing (not from its last TID, which is above
    // the transaction it lacks), then serves the transaction alone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while cluster.cell_states().await.iter().any(|s| *s != CellState::UpToDate) {
        assert!(std::time::Instant::now() < deadline, "storage 3 did not catch up");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    c.close().await;
    cluster.stop_storage(0).await;
    cluster.stop_storage(1).await;
    let c = cluster.client().await;
    assert_eq!(c.load(oid).await.unwrap(), (b"second".to_vec(), tid), "from storage 3 alone");
    c.close().await;
    cluster.stop_all().await;
    assert!(cluster.with_storage_db(2, |db| db.locked_transactions().unwrap()).is_empty());
}

/// Going back to RECOVERING (both storages stopped) closes the clients' connections to the
/// master. A client calling `sync` all along never sees the close: each call that meets it
/// connects again and retries, also during recovery, and the commits go on once the cluster
/// runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncs_outlive_the_clients_disconnection_by_a_return_to_recovery() {
    let mut cluster = Cluster::start(Options { storages: 2, replicas: 1, ..Options::default() }).await;
    let c = cluster.client().await;
    let oid = c.new_oid().await.unwrap();
    let t1 = commit(&c, oid, Tid::ZERO, b"one").await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let syncing = {
        let (c, stop) = (c.clone(), stop.clone());
        tokio::spawn(async move {
            let mut done = 0u32;
            while !stop.is_cancelled() {
                if let Err(e) = c.sync().await {
                    return Err(format!("sync {done} failed: {e}"));
                }
                done += 1;
            }
            Ok(done)
        })
    };
    let opened = c.master_connections_opened();
    cluster.stop_storage(0).await;
    cluster.stop_storage(1).await;
    cluster.wait_state(ClusterState::Recovering).await;
    cluster.start_storage(0).await;
    cluster.start_storage(1).await;
    cluster.wait_state(ClusterState::Running).await;
    stop.cancel();
    let done = syncing.await.unwrap().unwrap();
    assert!(done > 0);
    assert!(c.master_connections_opened() > opened, "the master did not close the client's connection");
    let t2 = commit(&c, oid, t1, b"two").await.unwrap();
    assert_eq!(c.load(oid).await.unwrap(), (b"two".to_vec(), t2));
}

crate::both_backends!(
    the_whole_cluster_restarts_and_everything_is_still_there,
    a_storage_lost_during_commits_leaves_the_cluster_running_and_data_intact,
    a_transaction_one_replica_did_not_lock_is_dropped_at_restart,
    a_replica_missing_an_acknowledged_transaction_is_outdated_at_restart
);
