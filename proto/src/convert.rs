//! Conversions between wire messages and `neo-lib` types, validated once, on receive.

use crate::msg;
use neo_lib::config::Address;
use neo_lib::pt::{Cell, CellChange, PartitionTable};
use neo_lib::{CellState, ClusterState, Nid, NodeInfo, NodeState, NodeType, Ptid};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} in message: {value}")]
pub struct ConvertError {
    pub what: &'static str,
    pub value: String,
}

fn bad(what: &'static str, value: impl ToString) -> ConvertError {
    ConvertError { what, value: value.to_string() }
}

pub fn node_type(v: i32) -> Result<NodeType, ConvertError> {
    NodeType::from_i32(v).ok_or_else(|| bad("node type", v))
}
pub fn node_state(v: i32) -> Result<NodeState, ConvertError> {
    NodeState::from_i32(v).ok_or_else(|| bad("node state", v))
}
pub fn cluster_state(v: i32) -> Result<ClusterState, ConvertError> {
    ClusterState::from_i32(v).ok_or_else(|| bad("cluster state", v))
}
pub fn cell_state(v: i32) -> Result<CellState, ConvertError> {
    CellState::from_i32(v).ok_or_else(|| bad("cell state", v))
}
pub fn address(s: &str) -> Result<Option<Address>, ConvertError> {
    if s.is_empty() {
        return Ok(None);
    }
    Address::parse(s, None).map(Some).map_err(|_| bad("address", s))
}

pub fn node_to_msg(n: &NodeInfo) -> msg::NodeInfo {
    msg::NodeInfo {
        node_type: n.node_type as i32,
        nid: n.nid.0,
        address: n.address.as_ref().map(|a| a.to_string()).unwrap_or_default(),
        state: n.state as i32,
        id_timestamp: n.id_timestamp,
    }
}

pub fn node_from_msg(m: &msg::NodeInfo) -> Result<NodeInfo, ConvertError> {
    Ok(NodeInfo {
        node_type: node_type(m.node_type)?,
        nid: Nid(m.nid),
        address: address(&m.address)?,
        state: node_state(m.state)?,
        id_timestamp: m.id_timestamp,
    })
}

pub fn pt_to_msg(pt: &PartitionTable) -> msg::PartitionTableMsg {
    msg::PartitionTableMsg {
        ptid: pt.ptid.0,
        replicas: pt.replicas,
        rows: pt
            .rows()
            .iter()
            .map(|row| msg::PartitionRow {
                cells: row.iter().map(|c| msg::CellInfo { nid: c.nid.0, state: c.state as i32 }).collect(),
            })
            .collect(),
        progress: Vec::new(),
        reset: Vec::new(),
    }
}

pub fn pt_from_msg(m: &msg::PartitionTableMsg) -> Result<PartitionTable, ConvertError> {
    if m.rows.len() > 65_535 {
        return Err(bad("number of partitions", m.rows.len()));
    }
    let rows = m
        .rows
        .iter()
        .map(|r| {
            r.cells
                .iter()
                .map(|c| Ok(Cell { nid: Nid(c.nid), state: cell_state(c.state)? }))
                .collect::<Result<Vec<_>, ConvertError>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    PartitionTable::from_rows(Ptid(m.ptid), m.replicas, rows).map_err(|e| bad("partition table", e))
}

pub fn changes_to_msg(ptid: Ptid, replicas: u32, changes: &[CellChange]) -> msg::NotifyPartitionChanges {
    msg::NotifyPartitionChanges {
        ptid: ptid.0,
        replicas,
        changes: changes
            .iter()
            .map(|c| msg::CellChangeMsg { partition: c.partition, nid: c.nid.0, state: c.state as i32 })
            .collect(),
    }
}

pub fn changes_from_msg(m: &msg::NotifyPartitionChanges) -> Result<Vec<CellChange>, ConvertError> {
    m.changes
        .iter()
        .map(|c| Ok(CellChange { partition: c.partition, nid: Nid(c.nid), state: cell_state(c.state)? }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pt_roundtrip_and_bad_values() {
        let s1 = Nid::new(NodeType::Storage, 1);
        let pt = PartitionTable::make(3, 0, &[s1]).unwrap();
        let m = pt_to_msg(&pt);
        assert_eq!(pt_from_msg(&m).unwrap(), pt);
        let mut bad_m = m.clone();
        bad_m.rows[0].cells[0].state = 42;
        assert!(pt_from_msg(&bad_m).is_err());
        let mut empty = m;
        empty.rows.clear();
        assert!(pt_from_msg(&empty).is_err());
        assert!(address("nonsense").is_err());
        assert_eq!(address("").unwrap(), None);
    }
}
