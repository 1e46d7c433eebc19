//! The admin node with a real master: what `neoctl print …`, `start` and `set cluster` get.

use neo_lib::{CellState, ClusterState, NodeState, NodeType};
use neo_tests::{Cluster, Options};
use proto::{expect_answer, msg};
use std::time::{Duration, Instant};

async fn nodes(c: &Cluster) -> Vec<neo_lib::NodeInfo> {
    let b = c.admin_ask(msg::AskNodeList { node_type: None }).await.unwrap();
    expect_answer!(b, AnswerNodeList).unwrap().nodes.iter().map(|n| proto::convert::node_from_msg(n).unwrap()).collect()
}

async fn a_new_cluster_waits_for_neoctl_start_then_runs(opts: Options) {
    let c = Cluster::start(Options { autostart: false, partitions: 6, ..opts }).await;
    // Both storages register as PENDING and nothing starts by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pending = nodes(&c)
            .await
            .iter()
            .filter(|n| n.node_type == NodeType::Storage && n.state == NodeState::Pending)
            .count();
        if pending == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "storages never became PENDING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.cluster_state().await, Some(ClusterState::Recovering));
    let e = c.admin_ask(msg::AskPartitionList { min_offset: 0, max_offset: 0, nid: None }).await.unwrap_err();
    assert_eq!(e.code(), Some(neo_lib::ErrorCode::NotReady), "{e}");
    // A state that cannot be requested now is DENIED; the connection stays usable.
    let e = c.admin_ask(msg::SetClusterState { state: ClusterState::Running as i32 }).await.unwrap_err();
    assert_eq!(e.code(), Some(neo_lib::ErrorCode::Denied), "{e}");

    // neoctl start
    c.admin_ask(msg::SetClusterState { state: ClusterState::Verifying as i32 }).await.unwrap();
    c.wait_state(ClusterState::Running).await;
    let b = c.admin_ask(msg::AskPartitionList { min_offset: 0, max_offset: 0, nid: None }).await.unwrap();
    let pt = proto::convert::pt_from_msg(&expect_answer!(b, AnswerPartitionList).unwrap()).unwrap();
    assert_eq!((pt.np(), pt.replicas), (6, 1));
    for p in 0..6 {
        let row = pt.row(p);
        assert_eq!(row.len(), 2, "two cells on distinct storages");
        assert_ne!(row[0].nid, row[1].nid);
        assert!(row.iter().all(|cell| cell.state == CellState::UpToDate));
    }
    let all = nodes(&c).await;
    assert_eq!(all.iter().filter(|n| n.node_type == NodeType::Storage && n.state == NodeState::Running).count(), 2);
    assert!(all.iter().any(|n| n.node_type == NodeType::Master && n.state == NodeState::Running));
    assert!(all.iter().any(|n| n.node_type == NodeType::Admin));

    // print ids after a commit
    let client = c.client().await;
    let oid = client.new_oid().await.unwrap();
    let tid = crate::commit::commit(&client, oid, neo_lib::Tid::ZERO, b"x").await.unwrap();
    let b = c.admin_ask(msg::AskIds {}).await.unwrap();
    let ids = expect_answer!(b, AnswerIds).unwrap();
    assert_eq!(ids.last_tid, tid.0);
    assert!(ids.last_oid >= oid.0);
    assert_eq!(ids.ptid, pt.ptid.0);
    let b = c.admin_ask(msg::AskPrimary {}).await.unwrap();
    assert_eq!(expect_answer!(b, AnswerPrimary).unwrap().address, c.master_addr.to_string());
}

/// After a full stop only one storage comes back: `print node` lists the other as DOWN (it is
/// in the last partition table), `print pt` shows its cells, and the cluster waits for it;
/// once it is back, it is RUNNING.
async fn after_a_full_restart_print_node_lists_the_storages_not_back_as_down(opts: Options) {
    let mut c = Cluster::start(opts).await;
    c.stop_all().await;
    c.start_master().await;
    c.start_storage(0).await;
    c.start_admin().await;
    let storages = |all: Vec<neo_lib::NodeInfo>| -> Vec<(NodeState, bool)> {
        let mut v: Vec<(NodeState, bool)> = all
            .into_iter()
            .filter(|n| n.node_type == NodeType::Storage)
            .map(|n| (n.state, n.address.is_some()))
            .collect();
        v.sort_by_key(|(s, _)| *s as i32);
        v
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let (down, all) = loop {
        // The admin answers NOT_READY until it is connected to the master.
        let all = match c.admin_ask(msg::AskNodeList { node_type: None }).await {
            Ok(b) => expect_answer!(b, AnswerNodeList)
                .unwrap()
                .nodes
                .iter()
                .map(|n| proto::convert::node_from_msg(n).unwrap())
                .collect(),
            Err(_) => Vec::new(),
        };
        if storages(all.clone()) == [(NodeState::Down, false), (NodeState::Pending, true)] {
            let down = all.iter().find(|n| n.state == NodeState::Down).unwrap().nid;
            break (down, all);
        }
        assert!(Instant::now() < deadline, "storages: {:?}", storages(all));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(c.cluster_state().await, Some(ClusterState::Recovering));
    let b = c.admin_ask(msg::AskPartitionList { min_offset: 0, max_offset: 0, nid: None }).await.unwrap();
    let pt = proto::convert::pt_from_msg(&expect_answer!(b, AnswerPartitionList).unwrap()).unwrap();
    let in_pt = pt.nodes();
    assert!(in_pt.contains(&down) && in_pt.len() == 2, "cells of {in_pt:?}, nodes {all:?}");
    assert_eq!(pt.partitions_of(down).len(), pt.np() as usize, "replicas 1 on 2 storages: a cell in every partition");

    c.start_storage(1).await;
    c.wait_state(ClusterState::Running).await;
    let all = nodes(&c).await;
    assert!(all.iter().any(|n| n.nid == down && n.state == NodeState::Running && n.address.is_some()), "{all:?}");
}

crate::both_backends!(
    a_new_cluster_waits_for_neoctl_start_then_runs,
    after_a_full_restart_print_node_lists_the_storages_not_back_as_down
);
