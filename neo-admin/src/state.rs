//! What the admin knows about the cluster, as told by the primary master: cluster state, node
//! list and partition table. Pure data with the update rules applied to each notification.

use neo_lib::config::Address;
use neo_lib::pt::PtError;
use neo_lib::{ClusterState, Nid, NodeInfo, NodeState, NodeType, PartitionTable, Ptid};
use proto::convert::{self, ConvertError};
use proto::{Body, msg};
use std::collections::BTreeMap;

/// The primary master the admin is connected to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Primary {
    /// Node id of the master (from its `AcceptIdentification`), if it gave one.
    pub nid: Option<Nid>,
    /// Address the admin connected to.
    pub address: Address,
}

/// Why a notification from the master was not applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpdateError {
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error(transparent)]
    Pt(#[from] PtError),
    #[error("partition table changes for ptid {0} received before any partition table")]
    NoTable(Ptid),
}

/// What applying a message from the master did.
#[derive(Debug, PartialEq, Eq)]
pub enum Update {
    /// The state was updated.
    Applied,
    /// The cluster is stopping: the admin must exit.
    Stopping,
    /// The message is not a notification the admin keeps track of.
    Ignored,
}

/// The admin's copy of the cluster state.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    pub cluster_state: Option<ClusterState>,
    /// Why the cluster is in that state, when the master says (e.g. what RECOVERING waits for).
    pub cluster_detail: String,
    nodes: BTreeMap<Nid, NodeInfo>,
    pub pt: Option<PartitionTable>,
    /// Replication progress of OUT_OF_DATE cells, in percent: (partition, nid) -> percent.
    pub progress: BTreeMap<(u32, Nid), u32>,
}

impl ClusterView {
    pub fn new() -> ClusterView {
        ClusterView::default()
    }

    /// Forget everything (the link to the primary master was lost).
    pub fn clear(&mut self) {
        *self = ClusterView::default();
    }

    pub fn node(&self, nid: Nid) -> Option<&NodeInfo> {
        self.nodes.get(&nid)
    }

    /// Nodes of type `filter` (all if `None`), sorted by type then nid.
    pub fn node_list(&self, filter: Option<NodeType>) -> Vec<NodeInfo> {
        let mut v: Vec<NodeInfo> =
            self.nodes.values().filter(|n| filter.is_none_or(|t| n.node_type == t)).cloned().collect();
        v.sort_by_key(|n| (n.node_type, n.nid));
        v
    }

    /// Upsert each node by nid; state UNKNOWN removes it. Nothing is changed if any entry is
    /// malformed.
    pub fn update_nodes(&mut self, nodes: &[msg::NodeInfo]) -> Result<(), ConvertError> {
        let nodes = nodes.iter().map(convert::node_from_msg).collect::<Result<Vec<_>, _>>()?;
        for n in nodes {
            if n.state == NodeState::Unknown {
                self.nodes.remove(&n.nid);
            } else {
                self.nodes.insert(n.nid, n);
            }
        }
        Ok(())
    }

    /// Replace the partition table.
    pub fn set_pt(&mut self, m: &msg::PartitionTableMsg) -> Result<(), ConvertError> {
        self.pt = Some(convert::pt_from_msg(m)?);
        self.forget_progress();
        Ok(())
    }

    /// Progress is kept only for cells that are OUT_OF_DATE.
    fn forget_progress(&mut self) {
        let pt = self.pt.as_ref();
        self.progress.retain(|(p, n), _| pt.is_some_and(|pt| pt.cell(*p, *n) == Some(neo_lib::CellState::OutOfDate)));
    }

    /// The partition table as neoctl gets it: with the replication progress of its cells.
    pub fn pt_msg(&self) -> Option<msg::PartitionTableMsg> {
        let mut m = convert::pt_to_msg(self.pt.as_ref()?);
        m.progress = self
            .progress
            .iter()
            .map(|((partition, nid), percent)| msg::CellProgress {
                partition: *partition,
                nid: nid.0,
                percent: *percent,
            })
            .collect();
        Some(m)
    }

    /// Apply incremental changes; on error the table is left as it was.
    pub fn apply_pt_changes(&mut self, m: &msg::NotifyPartitionChanges) -> Result<(), UpdateError> {
        let changes = convert::changes_from_msg(m)?;
        let pt = self.pt.as_mut().ok_or(UpdateError::NoTable(Ptid(m.ptid)))?;
        pt.apply(Ptid(m.ptid), m.replicas, &changes)?;
        self.forget_progress();
        Ok(())
    }

    /// Record a new cluster state.
    pub fn set_cluster_state(&mut self, state: i32) -> Result<ClusterState, ConvertError> {
        let s = convert::cluster_state(state)?;
        self.cluster_state = Some(s);
        Ok(s)
    }

    /// Apply one notification from the primary master.
    pub fn apply(&mut self, body: &Body) -> Result<Update, UpdateError> {
        match body {
            Body::NotifyNodeInformation(m) => self.update_nodes(&m.nodes)?,
            Body::SendPartitionTable(m) => self.set_pt(m)?,
            Body::NotifyPartitionChanges(m) => self.apply_pt_changes(m)?,
            Body::NotifyReplicationProgress(m) => {
                if let Some(p) = &m.progress {
                    let cell = (p.partition, Nid(p.nid));
                    if self.pt.as_ref().is_some_and(|pt| pt.cell(cell.0, cell.1) == Some(neo_lib::CellState::OutOfDate))
                    {
                        self.progress.insert(cell, p.percent.min(100));
                    }
                }
            }
            Body::NotifyClusterInformation(m) => {
                self.cluster_detail = m.detail.clone();
                if self.set_cluster_state(m.state)? == ClusterState::Stopping {
                    return Ok(Update::Stopping);
                }
            }
            _ => return Ok(Update::Ignored),
        }
        Ok(Update::Applied)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use neo_lib::{CellState, pt::CellChange};

    fn s(n: u32) -> Nid {
        Nid::new(NodeType::Storage, n)
    }

    fn node(t: NodeType, nid: Nid, state: NodeState) -> msg::NodeInfo {
        convert::node_to_msg(&NodeInfo {
            node_type: t,
            nid,
            address: Some(Address { host: "127.0.0.1".into(), port: 20000 + nid.number() as u16 }),
            state,
            id_timestamp: 1.5,
        })
    }

    #[test]
    fn nodes_upsert_remove_and_sort() {
        let mut v = ClusterView::new();
        let m1 = Nid::new(NodeType::Master, 1);
        let c1 = Nid::new(NodeType::Client, 1);
        v.update_nodes(&[
            node(NodeType::Storage, s(2), NodeState::Running),
            node(NodeType::Client, c1, NodeState::Running),
            node(NodeType::Storage, s(1), NodeState::Pending),
            node(NodeType::Master, m1, NodeState::Running),
        ])
        .unwrap();
        let order: Vec<Nid> = v.node_list(None).iter().map(|n| n.nid).collect();
        assert_eq!(order, vec![m1, s(1), s(2), c1]);
        // Upsert: S1 becomes RUNNING.
        v.update_nodes(&[node(NodeType::Storage, s(1), NodeState::Running)]).unwrap();
        assert_eq!(v.node(s(1)).map(|n| n.state), Some(NodeState::Running));
        assert_eq!(v.node_list(None).len(), 4);
        // UNKNOWN removes.
        v.update_nodes(&[node(NodeType::Client, c1, NodeState::Unknown)]).unwrap();
        assert!(v.node(c1).is_none());
        let storages: Vec<Nid> = v.node_list(Some(NodeType::Storage)).iter().map(|n| n.nid).collect();
        assert_eq!(storages, vec![s(1), s(2)]);
        assert!(v.node_list(Some(NodeType::Admin)).is_empty());
        // Removing an unknown node is harmless.
        v.update_nodes(&[node(NodeType::Storage, s(9), NodeState::Unknown)]).unwrap();
        assert_eq!(v.node_list(None).len(), 3);
    }

    #[test]
    fn malformed_node_message_changes_nothing() {
        let mut v = ClusterView::new();
        let mut bad = node(NodeType::Storage, s(2), NodeState::Running);
        bad.state = 77;
        let r = v.update_nodes(&[node(NodeType::Storage, s(1), NodeState::Running), bad]);
        assert!(r.is_err());
        assert!(v.node_list(None).is_empty());
        let mut bad_type = node(NodeType::Storage, s(1), NodeState::Running);
        bad_type.node_type = -1;
        let body = Body::NotifyNodeInformation(msg::NotifyNodeInformation { nodes: vec![bad_type] });
        assert!(matches!(v.apply(&body), Err(UpdateError::Convert(_))));
    }

    #[test]
    fn pt_replace_and_apply() {
        let mut v = ClusterView::new();
        let pt = PartitionTable::make(4, 1, &[s(1), s(2)]).unwrap();
        let change = |ptid: u64, p: u32, nid: Nid, st: CellState| {
            convert::changes_to_msg(Ptid(ptid), 1, &[CellChange { partition: p, nid, state: st }])
        };
        // Changes before any table: refused.
        assert_eq!(v.apply_pt_changes(&change(2, 0, s(1), CellState::OutOfDate)), Err(UpdateError::NoTable(Ptid(2))));
        assert_eq!(v.apply(&Body::SendPartitionTable(convert::pt_to_msg(&pt))), Ok(Update::Applied));
        assert_eq!(v.pt.as_ref(), Some(&pt));
        // Next ptid: applied.
        let body = Body::NotifyPartitionChanges(change(2, 0, s(1), CellState::OutOfDate));
        assert_eq!(v.apply(&body), Ok(Update::Applied));
        let cur = v.pt.clone().unwrap();
        assert_eq!(cur.ptid, Ptid(2));
        assert_eq!(cur.cell(0, s(1)), Some(CellState::OutOfDate));
        // Discarded removes the cell.
        v.apply_pt_changes(&change(3, 0, s(1), CellState::Discarded)).unwrap();
        assert_eq!(v.pt.as_ref().unwrap().cell(0, s(1)), None);
        let before = v.pt.clone();
        // Gap in ptid: error, table kept.
        let r = v.apply_pt_changes(&change(5, 1, s(1), CellState::OutOfDate));
        assert!(matches!(r, Err(UpdateError::Pt(PtError::NotNext { .. }))), "{r:?}");
        assert_eq!(v.pt, before);
        // Partition out of range: error, table kept.
        let r = v.apply_pt_changes(&change(4, 9, s(1), CellState::OutOfDate));
        assert!(matches!(r, Err(UpdateError::Pt(PtError::BadPartition { .. }))), "{r:?}");
        assert_eq!(v.pt, before);
        // Bad cell state: error, table kept.
        let mut bad = change(4, 1, s(1), CellState::OutOfDate);
        bad.changes[0].state = 99;
        assert!(matches!(v.apply_pt_changes(&bad), Err(UpdateError::Convert(_))));
        assert_eq!(v.pt, before);
        // A full table replaces the current one.
        let other = PartitionTable::make(2, 0, &[s(3)]).unwrap();
        v.set_pt(&convert::pt_to_msg(&other)).unwrap();
        assert_eq!(v.pt.as_ref(), Some(&other));
        // A malformed full table leaves the current one.
        let mut bad_pt = convert::pt_to_msg(&pt);
        bad_pt.rows.clear();
        assert!(v.set_pt(&bad_pt).is_err());
        assert_eq!(v.pt.as_ref(), Some(&other));
    }

    #[test]
    fn cluster_state_and_stopping() {
        let mut v = ClusterView::new();
        let notify =
            |s: i32| Body::NotifyClusterInformation(msg::NotifyClusterInformation { state: s, detail: String::new() });
        assert_eq!(v.apply(&notify(ClusterState::Running as i32)), Ok(Update::Applied));
        assert_eq!(v.cluster_state, Some(ClusterState::Running));
        assert!(v.apply(&notify(42)).is_err());
        assert_eq!(v.cluster_state, Some(ClusterState::Running));
        assert_eq!(v.apply(&notify(ClusterState::Stopping as i32)), Ok(Update::Stopping));
        assert_eq!(v.apply(&Body::Ping(msg::Ping {})), Ok(Update::Ignored));
        v.update_nodes(&[node(NodeType::Storage, s(1), NodeState::Running)]).unwrap();
        v.clear();
        assert_eq!(v.cluster_state, None);
        assert!(v.pt.is_none());
        assert!(v.node_list(None).is_empty());
    }
}
