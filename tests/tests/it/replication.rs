//! Redundancy: a storage that was down catches up by replication while commits go on, then
//! serves alone; replication survives the loss of its source and of its destination.

use crate::commit::commit;
use neo_client::Client;
use neo_lib::{CellState, ClusterState, Oid, Tid};
use neo_tests::{Backends, Cluster, Options};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Every revision acknowledged: oid -> [(tid, data)], oldest first.
type Acked = BTreeMap<Oid, Vec<(Tid, Vec<u8>)>>;

/// Wait (up to `secs`) until every cell of the partition table is UP_TO_DATE.
async fn wait_up_to_date(cluster: &Cluster, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let states = cluster.cell_states().await;
        if states.iter().all(|s| *s == CellState::UpToDate) {
            return;
        }
        assert!(Instant::now() < deadline, "cells not UP_TO_DATE after {secs} s: {states:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Data of every size, some shared by several objects (deduplicated by the storages).
fn payload(n: usize) -> Vec<u8> {
    match n % 9 {
        0 => Vec::new(),
        1 => b"shared data".to_vec(),
        2 => (0..(3 << 20)).map(|i| (i * 7 + n) as u8).collect(), // above MySQL's chunk size
        3 => fastrand::Rng::with_seed(n as u64).u64(..).to_le_bytes().repeat(5000),
        _ => format!("revision {n} ").repeat(1 + n % 50).into_bytes(),
    }
}

/// Commit `count` transactions from `c`: new objects and new revisions of earlier ones.
async fn write(c: &Client, acked: &mut Acked, count: usize, start: usize) {
    for n in start..start + count {
        let oid = if n.is_multiple_of(3) || acked.is_empty() {
            c.new_oid().await.unwrap()
        } else {
            *acked.keys().nth(fastrand::usize(..acked.len())).unwrap()
        };
        let serial = acked.get(&oid).and_then(|v| v.last()).map(|(t, _)| *t).unwrap_or(Tid::ZERO);
        let data = payload(n);
        if let Ok(tid) = commit(c, oid, serial, &data).await {
            acked.entry(oid).or_default().push((tid, data));
        }
    }
}

/// Every acknowledged revision is readable through `c` (current ones by `load`, all by
/// `load_serial`).
async fn check_all(c: &Client, acked: &Acked, what: &str) {
    for (oid, revisions) in acked {
        for (tid, data) in revisions {
            let got = c.load_serial(*oid, *tid).await.unwrap_or_else(|e| panic!("{what}: {oid:?} at {tid:?}: {e}"));
            assert!(got == *data, "{what}: {oid:?} at {tid:?}: wrong data ({} bytes)", got.len());
        }
        let (tid, data) = revisions.last().unwrap();
        let (got, serial) = c.load(*oid).await.unwrap();
        assert!(serial == *tid && got == *data, "{what}: current revision of {oid:?}");
    }
}

async fn a_storage_that_was_down_catches_up_while_commits_go_on_then_serves_alone(opts: Options) {
    let mut cluster = Cluster::start(opts).await;
    let c = cluster.client().await;
    let mut acked = Acked::new();
    write(&c, &mut acked, 40, 0).await;
    cluster.stop_storage(1).await;
    write(&c, &mut acked, 60, 40).await;
    assert!(cluster.cell_states().await.contains(&CellState::OutOfDate));
    // Back: it replicates what it missed while a writer goes on committing.
    cluster.start_storage(1).await;
    let writer = {
        let c = cluster.client().await;
        let mut mine = Acked::new();
        tokio::spawn(async move {
            write(&c, &mut mine, 60, 1000).await;
            c.close().await;
            mine
        })
    };
    wait_up_to_date(&cluster, 60).await;
    acked.extend(writer.await.unwrap());
    // The storage that stayed leaves: the one that caught up serves everything alone.
    cluster.stop_storage(0).await;
    assert_eq!(cluster.cluster_state().await, Some(ClusterState::Running));
    let fresh = cluster.client().await;
    check_all(&fresh, &acked, "after catching up, alone").await;
    // It takes commits alone, and the other one catches up in turn.
    write(&fresh, &mut acked, 10, 2000).await;
    cluster.start_storage(0).await;
    wait_up_to_date(&cluster, 60).await;
    cluster.stop_storage(1).await;
    let last = cluster.client().await;
    check_all(&last, &acked, "the first storage after catching up in turn").await;
}

crate::both_backends!(a_storage_that_was_down_catches_up_while_commits_go_on_then_serves_alone);

/// Source and destination on different engines (SQLite and MySQL), both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_between_sqlite_and_mysql() {
    if neo_tests::mysql_available() {
        a_storage_that_was_down_catches_up_while_commits_go_on_then_serves_alone(Options {
            backends: Backends::Mixed,
            ..Default::default()
        })
        .await
    }
}

/// NEO's weak point: a replica that missed commits, started alone after a full stop, must not
/// become the cluster's data. Stop A; commit; stop B; stop the master; start the master and A
/// alone: the cluster waits (even when told to start), and once B is back every acknowledged
/// commit is there, also on A after it caught up.
async fn a_stale_replica_restarted_alone_never_becomes_the_data(opts: Options) {
    let mut cluster = Cluster::start(opts).await;
    let c = cluster.client().await;
    let mut acked = Acked::new();
    write(&c, &mut acked, 10, 0).await;
    cluster.stop_storage(0).await;
    write(&c, &mut acked, 10, 10).await;
    c.close().await;
    cluster.stop_storage(1).await;
    cluster.stop_master().await;
    cluster.start_master().await;
    cluster.start_storage(0).await;
    cluster.wait_state(ClusterState::Recovering).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(cluster.cluster_state().await, Some(ClusterState::Recovering));
    // An operator's `neoctl start` does not override the newer table either.
    let answer = cluster.admin_ask(proto::msg::SetClusterState { state: ClusterState::Verifying as i32 }).await;
    assert!(answer.is_ok(), "{answer:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(cluster.cluster_state().await, Some(ClusterState::Recovering));
    // `neoctl print cluster` says why.
    let b = cluster.admin_ask(proto::msg::AskClusterState {}).await.unwrap();
    let detail = proto::expect_answer!(b, AnswerClusterState).unwrap().detail;
    assert!(detail.contains("waiting for S") && detail.contains("has ptid"), "{detail}");
    cluster.start_storage(1).await;
    cluster.wait_state(ClusterState::Running).await;
    let c = cluster.client().await;
    check_all(&c, &acked, "once the storage with the newer table is back").await;
    c.close().await;
    wait_up_to_date(&cluster, 60).await;
    cluster.stop_storage(1).await;
    let c = cluster.client().await;
    check_all(&c, &acked, "the stale replica after catching up, alone").await;
}

crate::both_backends!(a_stale_replica_restarted_alone_never_becomes_the_data);

async fn admin(cluster: &Cluster, body: impl Into<proto::Body>) -> Result<proto::Body, String> {
    match cluster.admin_ask(body).await {
        Ok(proto::Body::Error(e)) if e.code != neo_lib::ErrorCode::Ack as i32 => Err(e.message),
        Ok(b) => Ok(b),
        Err(e) => Err(e.to_string()),
    }
}

async fn table(cluster: &Cluster) -> neo_lib::PartitionTable {
    let b = cluster.admin_ask(proto::msg::AskPartitionList { min_offset: 0, max_offset: 0, nid: None }).await;
    proto::convert::pt_from_msg(&proto::expect_answer!(b.unwrap(), AnswerPartitionList).unwrap()).unwrap()
}

async fn storage_nids(cluster: &Cluster) -> Vec<(neo_lib::Nid, neo_lib::NodeState)> {
    storage_list(cluster).await.into_iter().map(|n| (n.nid, n.state)).collect()
}

async fn storage_list(cluster: &Cluster) -> Vec<neo_lib::NodeInfo> {
    let b = cluster.admin_ask(proto::msg::AskNodeList { node_type: Some(neo_lib::NodeType::Storage as i32) }).await;
    let list = proto::expect_answer!(b.unwrap(), AnswerNodeList).unwrap();
    list.nodes.iter().map(|n| proto::convert::node_from_msg(n).unwrap()).collect()
}

/// The harness index of storage `nid` (by its address).
async fn index_of(cluster: &Cluster, nid: neo_lib::Nid) -> usize {
    let list = storage_list(cluster).await;
    let addr = list.iter().find(|n| n.nid == nid).and_then(|n| n.address.clone()).unwrap();
    cluster.storage_addrs.iter().position(|a| *a == addr).unwrap()
}

/// A storage joins a running cluster under load (`neoctl add`, which tweaks), replicates and
/// serves; an old one is dropped; then the others stop one by one: every commit is still
/// readable. Refused requests change nothing.
async fn a_storage_added_under_load_takes_over_from_one_that_is_dropped(opts: Options) {
    let mut cluster = Cluster::start(Options { storages: 2, replicas: 1, ..opts }).await;
    let c = cluster.client().await;
    let mut acked = Acked::new();
    write(&c, &mut acked, 30, 0).await;
    let before = storage_nids(&cluster).await;
    let pt0 = table(&cluster).await;
    // Bad requests: unknown node, add of a node that is not pending, drop of the last copies.
    let e = admin(
        &cluster,
        proto::msg::AddPendingNodes { nids: vec![neo_lib::Nid::new(neo_lib::NodeType::Storage, 77).0] },
    )
    .await;
    assert!(e.unwrap_err().contains("not a storage node of this cluster"));
    let e = admin(&cluster, proto::msg::AddPendingNodes { nids: vec![before[0].0.0] }).await;
    assert!(e.unwrap_err().contains("is not pending"));
    let e = admin(&cluster, proto::msg::AddPendingNodes { nids: vec![] }).await;
    assert!(e.unwrap_err().contains("no storage is pending"));
    let all: Vec<i32> = before.iter().map(|(n, _)| n.0).collect();
    let e = admin(&cluster, proto::msg::SetNodeState { nids: all, state: neo_lib::NodeState::Unknown as i32 }).await;
    assert!(e.unwrap_err().contains("last readable copies"));
    assert!(table(&cluster).await == pt0, "a refused request changed the partition table");
    // A third storage joins while a writer commits.
    let new = cluster.add_storage().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let joined = loop {
        let now = storage_nids(&cluster).await;
        if let Some((n, _)) =
            now.iter().find(|(n, s)| *s == neo_lib::NodeState::Pending && !before.iter().any(|b| b.0 == *n))
        {
            break *n;
        }
        assert!(Instant::now() < deadline, "the new storage is not pending: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let writer = {
        let c = cluster.client().await;
        tokio::spawn(async move {
            let mut mine = Acked::new();
            write(&c, &mut mine, 60, 5000).await;
            c.close().await;
            mine
        })
    };
    admin(&cluster, proto::msg::AddPendingNodes { nids: vec![] }).await.unwrap();
    acked.extend(writer.await.unwrap());
    wait_up_to_date(&cluster, 60).await;
    let pt = table(&cluster).await;
    let load = |n: neo_lib::Nid| pt.partitions_of(n).len();
    assert!((7..=9).contains(&load(joined)), "the new storage has {} cells of 24: {pt:?}", load(joined));
    // A tweak now changes nothing.
    let b = admin(&cluster, proto::msg::TweakPartitionTable { dry_run: true }).await.unwrap();
    assert!(!proto::expect_answer!(b, AnswerTweakPartitionTable).unwrap().changed);
    // Drop the first storage: the two others hold every partition again after a tweak.
    let dropped = before[0].0;
    let dropped_index = index_of(&cluster, dropped).await;
    let kept = 1 - dropped_index;
    admin(&cluster, proto::msg::SetNodeState { nids: vec![dropped.0], state: neo_lib::NodeState::Unknown as i32 })
        .await
        .unwrap();
    let b = admin(&cluster, proto::msg::TweakPartitionTable { dry_run: false }).await.unwrap();
    assert!(proto::expect_answer!(b, AnswerTweakPartitionTable).unwrap().changed);
    wait_up_to_date(&cluster, 60).await;
    let pt = table(&cluster).await;
    assert!(!pt.nodes().contains(&dropped), "{pt:?}");
    write(&c, &mut acked, 10, 9000).await;
    c.close().await;
    // The dropped storage came back as a stranger: PENDING, without cells, its data deleted.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !storage_nids(&cluster).await.contains(&(dropped, neo_lib::NodeState::Pending)) {
        assert!(Instant::now() < deadline, "the dropped storage is not pending: {:?}", storage_nids(&cluster).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.stop_storage(dropped_index).await;
    let left = cluster.with_storage_db(dropped_index, |db| {
        (0..12u32)
            .filter_map(|p| {
                let t = db.fetch_transactions(p, Tid::ZERO, Tid::MAX, 10).unwrap();
                let o = db.fetch_objects(p, (Tid::ZERO, neo_lib::Oid::ZERO), Tid::MAX, 10, 1 << 20).unwrap();
                let found =
                    (t.iter().map(|t| t.tid).collect::<Vec<_>>(), o.iter().map(|o| (o.oid, o.tid)).collect::<Vec<_>>());
                (!found.0.is_empty() || !found.1.is_empty()).then_some((p, found))
            })
            .collect::<Vec<_>>()
    });
    assert!(left.is_empty(), "the dropped storage kept data: {left:?}");
    // Each of the two that stay serves everything alone.
    for (alone, other) in [(kept, new), (new, kept)] {
        cluster.stop_storage(other).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster.cluster_state().await != Some(ClusterState::Running) {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let c = cluster.client().await;
        check_all(&c, &acked, &format!("storage {alone} alone")).await;
        c.close().await;
        cluster.start_storage(other).await;
        wait_up_to_date(&cluster, 60).await;
    }
}

crate::both_backends!(a_storage_added_under_load_takes_over_from_one_that_is_dropped);

/// The way out when the storage with the newest data is lost for good: the operator drops it
/// while the cluster waits, and the cluster starts on the stale replica, explicitly without
/// what only the dropped storage had.
async fn an_operator_can_give_up_on_a_lost_storage_and_start_on_an_older_copy(opts: Options) {
    let mut cluster = Cluster::start(opts).await;
    let c = cluster.client().await;
    let (mut first, mut second) = (Acked::new(), Acked::new());
    write(&c, &mut first, 10, 0).await;
    cluster.stop_storage(0).await;
    write(&c, &mut second, 10, 10).await;
    c.close().await;
    let lost = storage_list(&cluster).await.into_iter().find(|n| n.state == neo_lib::NodeState::Running).unwrap();
    cluster.stop_storage(1).await;
    cluster.stop_master().await;
    cluster.start_master().await;
    cluster.start_storage(0).await;
    cluster.wait_state(ClusterState::Recovering).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cluster.cluster_state().await, Some(ClusterState::Recovering));
    // Refused: an unknown node; accepted: the lost one.
    let unknown = neo_lib::Nid::new(neo_lib::NodeType::Storage, 99);
    let drop =
        |nid: neo_lib::Nid| proto::msg::SetNodeState { nids: vec![nid.0], state: neo_lib::NodeState::Unknown as i32 };
    assert!(admin(&cluster, drop(unknown)).await.unwrap_err().contains("not a storage node of this cluster"));
    admin(&cluster, drop(lost.nid)).await.unwrap();
    cluster.wait_state(ClusterState::Running).await;
    let c = cluster.client().await;
    check_all(&c, &first, "the older copy").await;
    for oid in second.keys() {
        assert!(c.load(*oid).await.is_err(), "{oid:?} was only on the dropped storage");
    }
    assert!(!table(&cluster).await.nodes().contains(&lost.nid));
}

crate::both_backends!(an_operator_can_give_up_on_a_lost_storage_and_start_on_an_older_copy);
