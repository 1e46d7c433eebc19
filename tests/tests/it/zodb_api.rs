//! The ZODB storage API beyond load/store, at the Rust level: deadlock avoidance (relock),
//! conflict resolution, checkCurrentSerial, history, undo, iterator and pack. (ZODB's own
//! conformance suite runs these through the Python binding: neo-python/run-zodb-tests.)

use neo_client::{Client, ClientError};
use neo_lib::{Oid, Tid};
use neo_tests::{Cluster, Options};
use std::time::Duration;

async fn commit(c: &Client, oid: Oid, serial: Tid, data: &[u8]) -> Result<Tid, ClientError> {
    let mut t = c.tpc_begin(b"u", b"d", b"").await?;
    c.store(&mut t, oid, serial, data)?;
    c.tpc_vote(&mut t).await?;
    c.tpc_finish(t).await
}

/// Two oids whose partitions live on different storages (2 storages, replicas 0).
async fn oids_on_two_storages(c: &Client) -> (Oid, Oid) {
    let a = c.new_oid().await.unwrap();
    loop {
        let b = c.new_oid().await.unwrap();
        let (_, np) = c.pt_info().unwrap();
        let ca = c.cells((a.0 % u64::from(np)) as u32);
        let cb = c.cells((b.0 % u64::from(np)) as u32);
        if ca[0].0 != cb[0].0 {
            return (a, b);
        }
    }
}

/// Two transactions lock two objects held by different storages in opposite orders. The
/// older one finds the younger's lock: the storage tells the younger's client to relock, the
/// older commits, and the younger gets a conflict naming the older's commit; nothing hangs.
async fn opposite_lock_orders_on_two_storages_do_not_deadlock(opts: Options) {
    let cluster = Cluster::start(Options { storages: 2, replicas: 0, partitions: 2, ..opts }).await;
    let (c1, c2) = (cluster.client().await, cluster.client().await);
    let (a, b) = oids_on_two_storages(&c1).await;
    let ta = commit(&c1, a, Tid::ZERO, b"a0").await.unwrap();
    let tb = commit(&c1, b, Tid::ZERO, b"b0").await.unwrap();
    let mut old = c1.tpc_begin(b"", b"old", b"").await.unwrap();
    let mut young = c2.tpc_begin(b"", b"young", b"").await.unwrap();
    assert!(old.ttid() < young.ttid());
    c2.store(&mut young, b, tb, b"b-young").unwrap();
    c1.store(&mut old, a, ta, b"a-old").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // both locks taken
    c2.store(&mut young, a, ta, b"a-young").unwrap(); // waits for the older
    c1.store(&mut old, b, tb, b"b-old").unwrap(); // held by the younger: relock
    let (c1b, c2b) = (c1.clone(), c2.clone());
    let old_done = tokio::spawn(async move {
        c1b.tpc_vote(&mut old).await?;
        c1b.tpc_finish(old).await
    });
    let young_done = tokio::spawn(async move {
        let r = c2b.tpc_vote(&mut young).await;
        let _ = c2b.tpc_abort(young).await;
        r
    });
    let limit = Duration::from_secs(30);
    let old_tid = tokio::time::timeout(limit, old_done).await.expect("older transaction hangs").unwrap().unwrap();
    let young_r = tokio::time::timeout(limit, young_done).await.expect("younger transaction hangs").unwrap();
    match young_r {
        Err(ClientError::Conflict { committed, .. }) => assert_eq!(committed, old_tid),
        other => panic!("expected a conflict for the younger transaction, got {other:?}"),
    }
    let c3 = cluster.client().await;
    assert_eq!(c3.load(a).await.unwrap(), (b"a-old".to_vec(), old_tid));
    assert_eq!(c3.load(b).await.unwrap(), (b"b-old".to_vec(), old_tid));
}

/// A conflict resolved by the hook commits the merged data; an unresolvable one aborts.
async fn conflicts_are_resolved_by_the_hook_or_reported(opts: Options) {
    let cluster = Cluster::start(opts).await;
    let (c1, c2) = (cluster.client().await, cluster.client().await);
    let oid = c1.new_oid().await.unwrap();
    let t0 = commit(&c1, oid, Tid::ZERO, b"1").await.unwrap();
    let t1 = commit(&c2, oid, t0, b"2").await.unwrap();
    // c1 still bases its change on t0: the hook adds both increments to the committed value.
    let mut t = c1.tpc_begin(b"", b"", b"").await.unwrap();
    c1.store(&mut t, oid, t0, b"5").unwrap();
    let resolved = c1
        .tpc_vote_resolving(&mut t, |o, committed, old, new| {
            assert_eq!((o, committed, old), (oid, t1, t0));
            let n: u32 = std::str::from_utf8(new).ok()?.parse().ok()?;
            Some((n + 1).to_string().into_bytes())
        })
        .await
        .unwrap();
    assert_eq!(resolved, vec![oid]);
    let t2 = c1.tpc_finish(t).await.unwrap();
    assert_eq!(c2.load_serial(oid, t2).await.unwrap(), b"6");
    let mut t = c2.tpc_begin(b"", b"", b"").await.unwrap();
    c2.store(&mut t, oid, t1, b"x").unwrap();
    let e = c2.tpc_vote_resolving(&mut t, |_, _, _, _| None).await.unwrap_err();
    assert!(matches!(e, ClientError::Conflict { committed, .. } if committed == t2), "{e:?}");
    c2.tpc_abort(t).await.unwrap();
}

/// checkCurrentSerial: a changed object is a read conflict; an unchanged one stays locked
/// until the transaction ends (a concurrent writer waits, then conflicts).
async fn check_current_serial_reports_read_conflicts(opts: Options) {
    let cluster = Cluster::start(opts).await;
    let (c1, c2) = (cluster.client().await, cluster.client().await);
    let (a, b) = (c1.new_oid().await.unwrap(), c1.new_oid().await.unwrap());
    let ta = commit(&c1, a, Tid::ZERO, b"a").await.unwrap();
    let tb = commit(&c1, b, Tid::ZERO, b"b").await.unwrap();
    let ta2 = commit(&c2, a, ta, b"a2").await.unwrap();
    let mut t = c1.tpc_begin(b"", b"", b"").await.unwrap();
    c1.check_current_serial(&mut t, a, ta).unwrap();
    c1.store(&mut t, b, tb, b"b2").unwrap();
    let e = c1.tpc_vote(&mut t).await.unwrap_err();
    assert_eq!(e, ClientError::ReadConflict { oid: a, serial: ta, committed: ta2 });
    c1.tpc_abort(t).await.unwrap();
    // Fresh read: commits, and a is not modified by it.
    let mut t = c1.tpc_begin(b"", b"", b"").await.unwrap();
    c1.check_current_serial(&mut t, a, ta2).unwrap();
    c1.store(&mut t, b, tb, b"b3").unwrap();
    c1.tpc_vote(&mut t).await.unwrap();
    let tb3 = c1.tpc_finish(t).await.unwrap();
    c2.sync().await.unwrap();
    assert_eq!(c2.load(a).await.unwrap(), (b"a2".to_vec(), ta2));
    assert_eq!(c2.load(b).await.unwrap(), (b"b3".to_vec(), tb3));
}

/// history, the undo log, undo (plain and of a creation), the iterator and pack.
async fn history_undo_iterator_and_pack(opts: Options) {
    let cluster = Cluster::start(opts).await;
    let c = cluster.client().await;
    let oid = c.new_oid().await.unwrap();
    let mut tids = vec![];
    let mut serial = Tid::ZERO;
    for i in 0..3u8 {
        serial = commit(&c, oid, serial, &[i]).await.unwrap();
        tids.push(serial);
    }
    let h = c.history(oid, 10).await.unwrap();
    assert_eq!(h.iter().map(|e| e.serial).collect::<Vec<_>>(), vec![tids[2], tids[1], tids[0]]);
    assert_eq!(h[0].description, b"d");
    assert!(matches!(c.history(Oid(0x7fff_0000), 1).await, Err(ClientError::NotFound(_))));
    assert_eq!(c.undoable_tids(0, 10).await.unwrap(), vec![tids[2], tids[1], tids[0]]);
    assert_eq!(c.undoable_tids(1, 1).await.unwrap(), vec![tids[1]]);
    // Undo the last transaction: back to revision 1, as a back-pointer.
    let mut t = c.tpc_begin(b"", b"undo", b"").await.unwrap();
    let oids = c.undo(&mut t, tids[2], |_, _, _, _, _| None).await.unwrap();
    assert_eq!(oids, vec![oid]);
    c.tpc_vote(&mut t).await.unwrap();
    let undo_tid = c.tpc_finish(t).await.unwrap();
    assert_eq!(c.load(oid).await.unwrap(), (vec![1], undo_tid));
    // Undoing the creation of an object changed since would need resolution: refused.
    let mut t = c.tpc_begin(b"", b"", b"").await.unwrap();
    assert!(matches!(c.undo(&mut t, tids[0], |_, _, _, _, _| None).await, Err(ClientError::Undo(_))));
    c.tpc_abort(t).await.unwrap();
    // The iterator sees every transaction with its records; the undo record points back.
    let mut it = c.iterator(None, None);
    let mut seen = vec![];
    while let Some(txn) = it.next().await.unwrap() {
        seen.push((txn.info.tid, txn.records.iter().map(|r| (r.data.clone(), r.data_txn)).collect::<Vec<_>>()));
    }
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[3], (undo_tid, vec![(Some(vec![1]), Some(tids[1]))]));
    let mut it = c.iterator(Some(tids[1]), Some(tids[2]));
    assert_eq!(it.next().await.unwrap().unwrap().info.tid, tids[1]);
    assert_eq!(it.next().await.unwrap().unwrap().info.tid, tids[2]);
    assert!(it.next().await.unwrap().is_none());
    // Pack at the last transaction: only the current revision is left, and no transaction up
    // to the pack can be undone any more.
    assert_eq!(c.pack(undo_tid).await.unwrap(), undo_tid);
    assert_eq!(c.load(oid).await.unwrap(), (vec![1], undo_tid));
    assert!(matches!(c.load_serial(oid, tids[0]).await, Err(ClientError::NotFound(_))));
    assert_eq!(c.history(oid, 10).await.unwrap().len(), 1);
    assert!(c.undoable_tids(0, 10).await.unwrap().is_empty());
}

/// ZODB `prefetch`: a new client loads 300 objects with many requests in flight; every load
/// that follows is a cache hit with the right data, whichever storage holds the object. An oid
/// that does not exist is ignored.
async fn prefetch_fills_the_cache(opts: Options) {
    let cluster = Cluster::start(Options { storages: 2, replicas: 0, ..opts }).await;
    let c = cluster.client().await;
    let mut t = c.tpc_begin(b"", b"", b"").await.unwrap();
    let mut oids = vec![];
    for i in 0..300u32 {
        let oid = c.new_oid().await.unwrap();
        c.store(&mut t, oid, Tid::ZERO, &i.to_be_bytes()).unwrap();
        oids.push(oid);
    }
    c.tpc_vote(&mut t).await.unwrap();
    let tid = c.tpc_finish(t).await.unwrap();
    let fresh = cluster.client().await;
    let mut asked = oids.clone();
    asked.push(Oid(u64::MAX >> 1));
    fresh.prefetch(&asked, tid.next()).await;
    let (hits, misses, _) = fresh.cache_stats();
    for (i, oid) in oids.iter().enumerate() {
        let (data, serial, _) = fresh.load_before(*oid, tid.next()).await.unwrap().unwrap();
        assert_eq!((data, serial), ((i as u32).to_be_bytes().to_vec(), tid));
    }
    let (hits2, misses2, _) = fresh.cache_stats();
    assert_eq!(misses2, misses, "a prefetched object was loaded again");
    assert_eq!(hits2 - hits, 300);
}

/// Loads on a plain thread, as the Python binding makes them (request and answer on the calling
/// thread, over its own TLS connection): the same answers as the async path for the current
/// revision, an old one, a bound before the creation and an oid that does not exist. Once both
/// storages were restarted, pooled connections are dead: the blocking path gives way (None) at
/// most once per connection, and the async path still answers.
async fn blocking_loads_answer_as_async_loads(opts: Options) {
    let mut cluster = Cluster::start(Options { storages: 2, replicas: 1, ..opts }).await;
    let c = cluster.client().await;
    let oid = c.new_oid().await.unwrap();
    let t1 = commit(&c, oid, Tid::ZERO, b"one").await.unwrap();
    let t2 = commit(&c, oid, t1, b"two").await.unwrap();
    let fresh = cluster.client().await;
    let f = fresh.clone();
    let got = tokio::task::spawn_blocking(move || {
        let load = |o: Oid, b: Tid| match f.load_before_blocking(o, b) {
            Some(Ok(Some((d, s, n)))) => Ok(Some((d.as_ref().clone(), s, n))),
            Some(Ok(None)) => Ok(None),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("not served".to_string()),
        };
        (load(oid, t2.next()), load(oid, t2), load(oid, t1), load(Oid(u64::MAX >> 1), t2.next()))
    })
    .await
    .unwrap();
    assert_eq!(got.0, Ok(Some((b"two".to_vec(), t2, None))));
    assert_eq!(got.1, Ok(Some((b"one".to_vec(), t1, Some(t2)))));
    assert_eq!(got.2, Ok(None));
    assert!(got.3.as_ref().is_err_and(|e| e.contains("not found") || e.contains("does not exist")), "{:?}", got.3);
    for (before, expected) in [(t2.next(), (b"two".to_vec(), t2, None)), (t2, (b"one".to_vec(), t1, Some(t2)))] {
        assert_eq!(fresh.load_before(oid, before).await.unwrap(), Some(expected));
    }
    // Restart the storages: the pooled connections die with them.
    cluster.stop_storage(0).await;
    cluster.stop_storage(1).await;
    cluster.start_storage(0).await;
    cluster.start_storage(1).await;
    cluster.wait_state(neo_lib::ClusterState::Running).await;
    fresh.sync().await.unwrap();
    let t3 = commit(&c, oid, t2, b"three").await.unwrap();
    fresh.sync().await.unwrap();
    let f = fresh.clone();
    let served = tokio::task::spawn_blocking(move || {
        (0..20)
            .filter_map(|_| f.load_before_blocking(oid, t3.next()))
            .map(|r| r.map(|h| h.map(|h| h.1)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(served.len() >= 20 - 4, "{} of 20 loads served", served.len());
    assert!(served.iter().all(|r| matches!(r, Ok(Some(t)) if *t == t3)));
    assert_eq!(fresh.load_before(oid, t3.next()).await.unwrap(), Some((b"three".to_vec(), t3, None)));
}

crate::both_backends!(
    blocking_loads_answer_as_async_loads,
    prefetch_fills_the_cache,
    opposite_lock_orders_on_two_storages_do_not_deadlock,
    conflicts_are_resolved_by_the_hook_or_reported,
    check_current_serial_reports_read_conflicts,
    history_undo_iterator_and_pack
);
