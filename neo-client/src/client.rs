//! The `Client` and what its parts share: the state behind one lock (node list, partition
//! table, connections, loads and transactions in flight), the cache, connection and close.
//! Each responsibility is a module: `master` (the session with the primary master), `storages`
//! (links to storages, cell choice), `loads` (reads, with failover and the cache), `tpc`
//! (two-phase commit), `history` (history, undo, iterator, pack), `blocking` (loads on the
//! calling thread).

use crate::cache::Cache;
use crate::{ClientConfig, ClientError, Result};
use neo_lib::pt::PartitionTable;
use neo_lib::{CellState, ClusterState, ErrorCode, Nid, NodeInfo, Oid, Ptid, Tid, lock};
use proto::net::NetConfig;
use proto::{Link, LinkError};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

mod blocking;
mod history;
mod loads;
mod master;
mod storages;
mod tpc;
pub use history::{DataRecord, HistoryEntry, TransactionRecord, TxnInfo, TxnIterator, UndoPlan};
pub use master::Invalidation;
use master::MasterConn;
use tpc::TxnShared;
pub use tpc::{ConflictInfo, FinishCallback, Transaction};

type Callback = Arc<dyn Fn(Invalidation<'_>) + Send + Sync>;

#[derive(Default)]
struct State {
    master: Option<MasterConn>,
    nid: Option<Nid>,
    pt: Option<PartitionTable>,
    nodes: HashMap<Nid, NodeInfo>,
    /// As the master last said (STOPPING also when it denied a request: the cluster is
    /// stopping); each connection to the master is told the current state first.
    cluster_state: Option<ClusterState>,
    last_tid: Tid,
    storages: HashMap<Nid, Link>,
    failed: HashMap<Nid, Instant>,
    oids: VecDeque<Oid>,
    /// Loads in flight: oid -> (count, tid of an invalidation received meanwhile).
    loading: HashMap<Oid, (u32, Option<Tid>)>,
    /// Transactions between begin and vote, by ttid (for deadlock notifications).
    txns: HashMap<Tid, Arc<TxnShared>>,
    /// tpc_finish callbacks by ttid, called by the master pump with our own invalidation.
    finish_callbacks: HashMap<Tid, FinishCallback>,
}

struct Inner {
    cfg: ClientConfig,
    net: NetConfig,
    state: Mutex<State>,
    cache: Mutex<Cache>,
    callback: Mutex<Option<Callback>>,
    /// Serializes (re)connections to the master. An async mutex on purpose: it is held while
    /// connecting, and only protects that sequence.
    connecting: tokio::sync::Mutex<()>,
    /// Serializes connections to each storage (async mutexes, as `connecting`): the many
    /// stores of a transaction that find no connection to a storage wait for one instead of
    /// each opening its own. Each gate holds the last failure to connect, with its time.
    storage_connecting: Mutex<HashMap<Nid, StorageGate>>,
    /// Connections opened to storages so far (diagnostics).
    storage_connects: std::sync::atomic::AtomicU64,
    /// Connections opened to the master (the first one included).
    master_connects: std::sync::atomic::AtomicU64,
    closed: CancellationToken,
    /// Idle blocking connections to storages (`load_before_blocking`).
    blocking: Mutex<HashMap<Nid, Vec<proto::blocking::BlockingConn>>>,
    /// The process that opened the connections.
    pid: u32,
}

type StorageGate = Arc<tokio::sync::Mutex<Option<(Instant, LinkError)>>>;

/// A connection to a NEO cluster. Cheap to clone; every clone shares the same connections,
/// cache and state.
#[derive(Clone)]
pub struct Client(Arc<Inner>);

fn remote(e: LinkError) -> ClientError {
    match e {
        LinkError::Remote { code: ErrorCode::UndoPackError, message } => ClientError::Undo(message),
        LinkError::Remote { code, message } => ClientError::Remote { code, message },
        other => ClientError::Remote { code: ErrorCode::ProtocolError, message: other.to_string() },
    }
}

/// Is this error worth retrying on another storage?
fn is_storage_failure(e: &LinkError) -> bool {
    match e {
        LinkError::Closed(_) => true,
        LinkError::Remote { code, .. } => matches!(code, ErrorCode::NotReady | ErrorCode::NonReadableCell),
        LinkError::Unexpected(_) => true,
    }
}

pub(crate) fn sha1(data: &[u8]) -> [u8; 20] {
    let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, data);
    let mut out = [0u8; 20];
    out.copy_from_slice(d.as_ref());
    out
}

impl Client {
    /// Connect to the cluster (retrying until `cfg.connect_timeout`).
    pub async fn connect(cfg: ClientConfig) -> Result<Client> {
        let tls = match &cfg.tls {
            Some(files) => Some(
                proto::tls::TlsContext::load(files)
                    .map_err(|e| ClientError::NotConnected { cluster: cfg.cluster.clone(), last: e.to_string() })?,
            ),
            None => None,
        };
        let net = NetConfig { tls, max_frame: neo_lib::DEFAULT_MAX_FRAME };
        let cache = Mutex::new(Cache::new(cfg.cache_size));
        let client = Client(Arc::new(Inner {
            cfg,
            net,
            state: Mutex::new(State::default()),
            cache,
            callback: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            closed: CancellationToken::new(),
            blocking: Mutex::new(HashMap::new()),
            storage_connecting: Mutex::new(HashMap::new()),
            storage_connects: Default::default(),
            master_connects: Default::default(),
            pid: std::process::id(),
        }));
        client.master().await?;
        Ok(client)
    }

    /// Called (from the client's network tasks) with each other client's commit, and with
    /// `Invalidation::All` when commits may have been missed, in commit order and before
    /// `last_transaction` reports them. Keep it short and non-blocking.
    pub fn set_invalidation_callback(&self, f: impl Fn(Invalidation<'_>) + Send + Sync + 'static) {
        *lock(&self.0.callback) = Some(Arc::new(f));
    }

    /// Close every connection.
    pub async fn close(&self) {
        self.0.closed.cancel();
        let (master, storages) = {
            let mut s = lock(&self.0.state);
            (s.master.take(), std::mem::take(&mut s.storages))
        };
        lock(&self.0.blocking).clear();
        if let Some(m) = master {
            m.link.close().await;
        }
        for l in storages.values() {
            l.close().await;
        }
    }

    /// The last committed TID whose invalidations were delivered.
    pub fn last_transaction(&self) -> Tid {
        lock(&self.0.state).last_tid
    }

    pub fn cache_stats(&self) -> (u64, u64, usize) {
        let c = lock(&self.0.cache);
        (c.hits, c.misses, c.len())
    }

    /// Empty the object cache (benchmarks, tests).
    pub fn clear_cache(&self) {
        let mut c = lock(&self.0.cache);
        *c = Cache::new(self.0.cfg.cache_size);
    }

    pub fn cluster_state(&self) -> Option<ClusterState> {
        lock(&self.0.state).cluster_state
    }

    /// How many connections this client opened to the master (the first one included).
    pub fn master_connections_opened(&self) -> u64 {
        self.0.master_connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many connections this client opened to storages (read connections aside).
    pub fn storage_connections_opened(&self) -> u64 {
        self.0.storage_connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Partition table as this client knows it (ptid, number of partitions).
    pub fn pt_info(&self) -> Option<(Ptid, u32)> {
        lock(&self.0.state).pt.as_ref().map(|p| (p.ptid, p.np()))
    }

    /// Cell states of a partition as this client knows them.
    pub fn cells(&self, partition: u32) -> Vec<(Nid, CellState)> {
        lock(&self.0.state)
            .pt
            .as_ref()
            .map(|p| p.row(partition).iter().map(|c| (c.nid, c.state)).collect())
            .unwrap_or_default()
    }
}
