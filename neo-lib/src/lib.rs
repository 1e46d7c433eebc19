//! Shared NEO vocabulary used by every node: ids (TIDs, OIDs, node ids, ptids), node/cluster/cell
//! states, the partition table, the `neo.conf` model, wire error codes and logging set-up.
//!
//! Nothing here does network or database IO; the only IO is the log file writer.

pub mod config;
pub mod error;
pub mod ids;
pub mod logging;
pub mod node;
pub mod pt;
pub mod states;

pub use error::ErrorCode;
pub use ids::{Nid, Oid, Ptid, Tid};
pub use node::NodeInfo;
pub use pt::{Cell, CellChange, PartitionTable};
pub use states::{CellState, ClusterState, NodeState, NodeType};

/// Lock a mutex, ignoring poisoning (a panicking holder does not make the data unusable for
/// the short, non-async critical sections this project uses).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Version of the neo-rs wire protocol, checked at identification.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest object record (the application's bytes) a client stores.
pub const MAX_RECORD_SIZE: usize = 64 * 1024 * 1024;
/// Default maximum size of one frame on the wire (a largest record plus headers fits).
pub const DEFAULT_MAX_FRAME: usize = MAX_RECORD_SIZE + 64 * 1024;
