//! Commits, reads, conflicts and invalidations on a cluster of 1 master and 2 storages with
//! replicas 1 and 12 partitions, over TLS.

use neo_client::{Client, ClientError};
use neo_lib::{ClusterState, Oid, Tid};
use neo_tests::{Cluster, Options};
use std::time::Duration;

pub async fn commit(c: &Client, oid: Oid, serial: Tid, data: &[u8]) -> Result<Tid, ClientError> {
    let mut t = c.tpc_begin(b"user", b"test", b"").await?;
    c.store(&mut t, oid, serial, data)?;
    match c.tpc_vote(&mut t).await {
        Ok(()) => c.tpc_finish(t).await,
        Err(e) => {
            c.tpc_abort(t).await?;
            Err(e)
        }
    }
}

fn payload(client: usize, n: usize) -> Vec<u8> {
    format!("client {client} transaction {n} ").repeat(1 + n % 7).into_bytes()
}

async fn two_clients_commit_1000_transactions_and_a_fresh_client_reads_them_all(opts: Options) {
    let cluster = Cluster::start(opts).await;
    let mut tasks = Vec::new();
    for client in 0..2 {
        let c = cluster.client().await;
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for n in 0..500 {
                let oid = c.new_oid().await.unwrap();
                let tid = commit(&c, oid, Tid::ZERO, &payload(client, n)).await.unwrap();
                out.push((oid, tid, payload(client, n)));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 1000);
    let mut tids: Vec<Tid> = all.iter().map(|x| x.1).collect();
    tids.sort();
    tids.dedup();
    assert_eq!(tids.len(), 1000, "every commit has its own TID");

    let fresh = cluster.client().await;
    assert_eq!(fresh.last_transaction(), *tids.last().unwrap());
    for (oid, tid, data) in &all {
        let (got, serial) = fresh.load(*oid).await.unwrap();
        assert_eq!(&got, data, "data of {oid:?}");
        assert_eq!(serial, *tid);
        assert_eq!(fresh.load_serial(*oid, *tid).await.unwrap(), *data);
        assert_eq!(fresh.load_before(*oid, *tid).await.unwrap(), None, "no revision before creation");
    }
    let (hits, misses, _) = fresh.cache_stats();
    assert!(misses >= 1000 && hits >= 1000, "hits {hits} misses {misses}");
}

/// The stores of a transaction go out at once; on a fresh client, each store finds no
/// connection to its storage yet. They share one per storage (a storage swamped with
/// hundreds of simultaneous connections reset some, and the client took that for a storage
/// failure, which outdated it), even with several such clients at the same time.
async fn the_stores_of_a_big_transaction_share_one_connection_per_storage(opts: Options) {
    let storages = opts.storages as u64;
    let cluster = Cluster::start(opts).await;
    let mut tasks = Vec::new();
    for client in 0..4 {
        let c = cluster.client().await;
        tasks.push(tokio::spawn(async move {
            let mut t = c.tpc_begin(b"", b"", b"").await.unwrap();
            let mut stored = Vec::new();
            for n in 0..300 {
                let oid = c.new_oid().await.unwrap();
                c.store(&mut t, oid, Tid::ZERO, &payload(client, n)).unwrap();
                stored.push((oid, payload(client, n)));
            }
            c.tpc_vote(&mut t).await.unwrap();
            c.tpc_finish(t).await.unwrap();
            assert_eq!(c.storage_connections_opened(), storages, "client {client}");
            stored
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert!(cluster.cell_states().await.iter().all(|s| *s == neo_lib::CellState::UpToDate));
    let fresh = cluster.client().await;
    for (oid, data) in &all {
        assert_eq!(&fresh.load(*oid).await.unwrap().0, data);
    }
}

async fn two_clients_updating_the_same_object_one_gets_a_conflict_naming_the_oid(opts: Options) {
    let cluster = Cluster::start(opts).await;
    let (a, b) = (cluster.client().await, cluster.client().await);
    let oid = a.new_oid().await.unwrap();
    let base = commit(&a, oid, Tid::ZERO, b"v0").await.unwrap();
    b.sync().await.unwrap();
    assert_eq!(b.load(oid).await.unwrap(), (b"v0".to_vec(), base));

    // Sequential: A commits first, B's store based on the same serial conflicts.
    let ta = commit(&a, oid, base, b"from a").await.unwrap();
    let err = commit(&b, oid, base, b"from b").await.unwrap_err();
    match &err {
        ClientError::Conflict { oid: o, serial, committed, .. } => {
            assert_eq!(*o, oid);
            assert_eq!(*serial, base);
            assert_eq!(*committed, ta);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(err.to_string().contains(&format!("oid 0x{oid}")), "{err}");

    // Concurrent: both transactions are open at the same time; exactly one commits.
    let (ra, rb) = tokio::join!(commit(&a, oid, ta, b"a again"), commit(&b, oid, ta, b"b again"));
    let ok = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "exactly one commit wins: {ra:?} {rb:?}");
    let loser = match (ra, rb) {
        (Err(e), _) | (_, Err(e)) => e,
        _ => unreachable!(),
    };
    assert!(matches!(loser, ClientError::Conflict { oid: o, .. } if o == oid), "{loser:?}");
    // The object is usable afterwards (locks were released).
    b.sync().await.unwrap();
    let (_, serial) = b.load(oid).await.unwrap();
    commit(&b, oid, serial, b"final").await.unwrap();
}

async fn a_client_sees_another_clients_commit_through_the_invalidation_callback(opts: Options) {
    let cluster = Cluster::start(opts).await;
    let (a, b) = (cluster.client().await, cluster.client().await);
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    b.set_invalidation_callback(move |i| {
        if let neo_client::Invalidation::Objects(tid, oids) = i {
            let _ = tx.try_send((tid, oids.to_vec()));
        }
    });
    let oid = a.new_oid().await.unwrap();
    let t1 = commit(&a, oid, Tid::ZERO, b"one").await.unwrap();
    let (tid, oids) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert_eq!((tid, oids), (t1, vec![oid]));
    // last_transaction moves once the callback returned (ZODB's rule): sync is the barrier.
    b.sync().await.unwrap();
    assert!(b.last_transaction() >= t1);
    // B caches the object, A changes it: B is told and reads the new data.
    assert_eq!(b.load(oid).await.unwrap().0, b"one");
    let t2 = commit(&a, oid, t1, b"two").await.unwrap();
    let (tid, _) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert_eq!(tid, t2);
    b.sync().await.unwrap();
    assert_eq!(b.load(oid).await.unwrap(), (b"two".to_vec(), t2));
    assert_eq!(b.load_before(oid, t2).await.unwrap().unwrap(), (b"one".to_vec(), t1, Some(t2)));
    // The committing client is not notified of its own commit.
    assert_eq!(a.last_transaction(), t2);
}

async fn aborted_transactions_leave_nothing_and_deleted_objects_are_not_found(opts: Options) {
    let cluster = Cluster::start(opts).await;
    let c = cluster.client().await;
    let oid = c.new_oid().await.unwrap();
    let mut t = c.tpc_begin(b"", b"", b"").await.unwrap();
    c.store(&mut t, oid, Tid::ZERO, b"never").unwrap();
    c.tpc_vote(&mut t).await.unwrap();
    c.tpc_abort(t).await.unwrap();
    assert!(matches!(c.load(oid).await, Err(ClientError::NotFound(o)) if o == oid));
    // The abort released the lock: a new transaction can store the object.
    let t1 = commit(&c, oid, Tid::ZERO, b"now").await.unwrap();
    let mut t = c.tpc_begin(b"", b"", b"").await.unwrap();
    c.delete_object(&mut t, oid, t1).unwrap();
    c.tpc_vote(&mut t).await.unwrap();
    c.tpc_finish(t).await.unwrap();
    let fresh = cluster.client().await;
    assert!(matches!(fresh.load(oid).await, Err(ClientError::NotFound(_))));
    assert_eq!(fresh.load_serial(oid, t1).await.unwrap(), b"now");
    // Records of unusual sizes, compressible or not.
    for size in [0usize, 1, 100, 70_000, 3 << 20] {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let o = c.new_oid().await.unwrap();
        let tid = commit(&c, o, Tid::ZERO, &data).await.unwrap();
        assert_eq!(fresh.load_serial(o, tid).await.unwrap(), data, "size {size}");
    }
}

async fn neoctl_stop_lets_in_flight_transactions_finish_and_every_node_exits(opts: Options) {
    let mut cluster = Cluster::start(opts).await;
    let c = cluster.client().await;
    let other = cluster.client().await;
    let oid = c.new_oid().await.unwrap();
    let mut t = c.tpc_begin(b"", b"", b"").await.unwrap();
    c.store(&mut t, oid, Tid::ZERO, b"in flight").unwrap();
    let ack = cluster.admin_ask(proto::msg::SetClusterState { state: ClusterState::Stopping as i32 }).await;
    assert!(ack.is_ok(), "{ack:?}");
    // New transactions and new clients are refused while this one is still in progress.
    let e = other.tpc_begin(b"", b"", b"").await.err().unwrap();
    assert!(e.to_string().contains("stopping"), "{e}");
    let mut cfg = cluster.client_config();
    cfg.connect_timeout = Duration::from_millis(300);
    assert!(Client::connect(cfg).await.is_err());
    c.tpc_vote(&mut t).await.unwrap();
    let tid = c.tpc_finish(t).await.unwrap();
    assert!(tid > Tid::ZERO);
    cluster.wait_all_exited().await.unwrap();
    // Restart: the in-flight transaction was committed.
    cluster.restart().await;
    let fresh = cluster.client().await;
    assert_eq!(fresh.load(oid).await.unwrap(), (b"in flight".to_vec(), tid));
}

/// A client committing in a loop when the cluster is stopped gets a clear error within seconds
/// (not after its connect timeout: the master told it the cluster was stopping), and so do its
/// later calls; once the cluster is started again, the same client goes on.
async fn a_commit_loop_gets_a_clear_error_within_seconds_of_a_stop_and_goes_on_after_a_restart(opts: Options) {
    let mut cluster = Cluster::start(opts).await;
    let c = cluster.client().await;
    let oid = c.new_oid().await.unwrap();
    let mut serial = commit(&c, oid, Tid::ZERO, b"0").await.unwrap();
    let looping = c.clone();
    let writer = tokio::spawn(async move {
        for n in 1.. {
            match commit(&looping, oid, serial, n.to_string().as_bytes()).await {
                Ok(tid) => serial = tid,
                Err(e) => return (std::time::Instant::now(), e),
            }
        }
        unreachable!()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stop = std::time::Instant::now();
    cluster.admin_ask(proto::msg::SetClusterState { state: ClusterState::Stopping as i32 }).await.unwrap();
    let (when, e) = tokio::time::timeout(Duration::from_secs(20), writer).await.unwrap().unwrap();
    assert!(when - stop < Duration::from_secs(5), "the error came {:?} after the stop", when - stop);
    assert!(matches!(e, ClientError::Stopped { .. }), "{e:?}");
    assert!(e.to_string().contains("stopped or stopping"), "{e}");
    cluster.wait_all_exited().await.unwrap();
    let t0 = std::time::Instant::now();
    let e = c.tpc_begin(b"", b"", b"").await.err().unwrap();
    assert!(matches!(e, ClientError::Stopped { .. }) && t0.elapsed() < Duration::from_secs(5), "{e:?}");

    // Started again: a master that answers (NOT_READY while it recovers) is waited for.
    cluster.start_master().await;
    let waiting = c.clone();
    let begin = tokio::spawn(async move { waiting.tpc_begin(b"", b"", b"").await.map(drop) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!begin.is_finished(), "{:?}", begin.await);
    for i in 0..cluster.opts.storages {
        cluster.start_storage(i).await;
    }
    cluster.start_admin().await;
    begin.await.unwrap().unwrap();
    let (data, last) = c.load(oid).await.unwrap();
    let tid = commit(&c, oid, last, b"after the restart").await.unwrap();
    assert!(tid > last && !data.is_empty());
}

crate::both_backends!(
    a_commit_loop_gets_a_clear_error_within_seconds_of_a_stop_and_goes_on_after_a_restart,
    the_stores_of_a_big_transaction_share_one_connection_per_storage,
    two_clients_commit_1000_transactions_and_a_fresh_client_reads_them_all,
    two_clients_updating_the_same_object_one_gets_a_conflict_naming_the_oid,
    a_client_sees_another_clients_commit_through_the_invalidation_callback,
    aborted_transactions_leave_nothing_and_deleted_objects_are_not_found,
    neoctl_stop_lets_in_flight_transactions_finish_and_every_node_exits
);
