//! Restarts: the whole cluster, and a storage at a time.

use crate::commit::commit;
use neo_lib::{ClusterState, NodeType, Tid};
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

crate::both_backends!(
    the_whole_cluster_restarts_and_everything_is_still_there,
    a_storage_lost_during_commits_leaves_the_cluster_running_and_data_intact
);
