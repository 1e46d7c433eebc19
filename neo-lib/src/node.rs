//! What the cluster knows about one node.

use crate::config::Address;
use crate::{Nid, NodeState, NodeType};

#[derive(Clone, Debug, PartialEq)]
pub struct NodeInfo {
    pub node_type: NodeType,
    pub nid: Nid,
    /// Listening address (none for clients).
    pub address: Option<Address>,
    pub state: NodeState,
    /// Identification time on the primary master (monotonic, strictly increasing).
    pub id_timestamp: f64,
}
