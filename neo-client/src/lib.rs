//! neo-client: the ZODB storage API over a NEO cluster. A `Client` follows the primary master
//! (node list, partition table, invalidations), talks directly to storages for loads and for
//! the stores/votes of two-phase commit, and keeps a bounded cache of object revisions.
//!
//! Loads read from any readable cell and retry another on failure. The master connection is
//! reopened on demand; NOT_READY answers (cluster starting) are retried, never fatal.

pub mod cache;
mod client;
pub mod codec;

pub use client::{
    Client, ConflictInfo, DataRecord, FinishCallback, HistoryEntry, Invalidation, Transaction, TransactionRecord,
    TxnInfo, TxnIterator, UndoPlan,
};

use neo_lib::config::{Address, TlsFiles};
use neo_lib::{ErrorCode, Oid, Tid};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub masters: Vec<Address>,
    pub cluster: String,
    pub tls: Option<TlsFiles>,
    /// Bound of the object cache, in bytes of uncompressed data.
    pub cache_size: usize,
    pub read_only: bool,
    /// Compress records with zlib when that makes them smaller.
    pub compress: bool,
    /// How long to keep trying to reach a primary master (connection refused, NOT_READY).
    pub connect_timeout: Duration,
}

impl ClientConfig {
    pub fn new(masters: Vec<Address>, cluster: impl Into<String>) -> ClientConfig {
        ClientConfig {
            masters,
            cluster: cluster.into(),
            tls: None,
            cache_size: 20 * 1024 * 1024,
            read_only: false,
            compress: true,
            connect_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// A store found the object changed since `serial` (ZODB `ConflictError`).
    #[error("{}", conflict_message(*.oid, *.serial, *.committed, *.locked_by))]
    Conflict { oid: Oid, serial: Tid, committed: Tid, locked_by: Option<Tid> },
    /// An object read by the transaction (checkCurrentSerialInTransaction) changed since
    /// `serial` (ZODB `ReadConflictError`).
    #[error(
        "database read conflict error (oid 0x{oid}, serial this txn read 0x{serial}, serial currently committed 0x{committed})"
    )]
    ReadConflict { oid: Oid, serial: Tid, committed: Tid },
    /// An undo that cannot be done (ZODB `UndoError`).
    #[error("undo error: {0}")]
    Undo(String),
    /// No such object or revision (ZODB `POSKeyError`).
    #[error("object {0} not found")]
    NotFound(Oid),
    #[error("no storage available for {0}")]
    NoStorage(String),
    #[error("cannot reach a primary master of cluster {cluster:?}: {last}")]
    NotConnected { cluster: String, last: String },
    /// The cluster was stopped (`neoctl set cluster STOPPING`), or is stopping.
    #[error(
        "cluster {cluster:?} is stopped or stopping (neoctl set cluster STOPPING); start it again to go on ({last})"
    )]
    Stopped { cluster: String, last: String },
    #[error("{code}: {message}")]
    Remote { code: ErrorCode, message: String },
    /// Write on a read-only client (ZODB `ReadOnlyError`).
    #[error("read-only client")]
    ReadOnly,
    /// Misuse of two-phase commit (ZODB `StorageTransactionError`).
    #[error("transaction error: {0}")]
    Transaction(String),
    #[error("corrupt data for {oid}: {msg}")]
    Corrupt { oid: Oid, msg: String },
    #[error("the client is closed")]
    Closed,
    /// A record larger than `neo_lib::MAX_RECORD_SIZE`.
    #[error("record of {size} bytes for oid {oid} is larger than the maximum of {} bytes", neo_lib::MAX_RECORD_SIZE)]
    TooLarge { oid: Oid, size: usize },
}

fn conflict_message(oid: Oid, serial: Tid, committed: Tid, locked_by: Option<Tid>) -> String {
    match locked_by {
        Some(t) => format!(
            "database conflict error (oid 0x{oid}, serial this txn started with 0x{serial}: being modified by concurrent transaction 0x{t}, committed serial 0x{committed})"
        ),
        None => format!(
            "database conflict error (oid 0x{oid}, serial this txn started with 0x{serial}, serial currently committed 0x{committed})"
        ),
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;
