//! The `Client`: master session, storage connections, reads, and two-phase commit.

use crate::cache::{Cache, Hit};
use crate::{ClientConfig, ClientError, Result};
use neo_lib::pt::PartitionTable;
use neo_lib::{CellState, ClusterState, ErrorCode, Nid, NodeInfo, NodeState, NodeType, Oid, Ptid, Tid};
use proto::net::{NetConfig, connect_identified, identification};
use proto::{Body, Incoming, Link, LinkError, expect_answer, msg};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long a storage that failed is tried last.
const FAILURE_PENALTY: Duration = Duration::from_secs(600);
/// OIDs asked from the master at a time.
const OID_BATCH: u32 = 100;
/// Loads in flight during a `prefetch`.
const PREFETCH_WINDOW: usize = 64;
const ZERO_HASH: [u8; 20] = [0; 20];

type Callback = Arc<dyn Fn(Invalidation<'_>) + Send + Sync>;

/// What the invalidation callback is told, in commit order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation<'a> {
    /// Another client committed `tid`, changing these objects.
    Objects(Tid, &'a [Oid]),
    /// Commits up to `tid` may have been missed (the client connected to the master again and
    /// the last TID had moved meanwhile: a master restart, the cluster back to RECOVERING, a
    /// lost connection): every object cached before must be considered changed. Python NEO's
    /// client calls ZODB's `DB.invalidateCache()` then.
    All(Tid),
}
/// Called with the TID of a commit of this client, in order with the invalidations of others.
pub type FinishCallback = Box<dyn FnOnce(Tid) + Send>;

/// Deadlock-avoidance state of a transaction, shared with the storage pumps (which receive
/// `NotifyDeadlock` and relock).
#[derive(Default)]
struct Relocks {
    /// The vote succeeded: notifications are ignored from then on (the storages wait for our
    /// commit, which waits for nobody).
    finishing: bool,
    /// Relock requests sent and not answered yet.
    pending: usize,
    /// Storages where a relock happened since the last vote round (to vote again).
    relocked: BTreeSet<Nid>,
}

#[derive(Default)]
struct TxnShared {
    relocks: Mutex<Relocks>,
    changed: tokio::sync::Notify,
}

struct MasterConn {
    link: Link,
    /// Messages of this link processed by its pump (for `sync` barriers).
    processed: watch::Receiver<u64>,
}

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

/// Outcome of one store sent to one storage.
struct StoreOutcome {
    oid: Oid,
    nid: Nid,
    serial: Tid,
    result: std::result::Result<msg::AnswerStoreObject, LinkError>,
}

/// A conflict found by `tpc_vote`: the caller may resolve it (store new data based on
/// `committed`) and vote again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflictInfo {
    pub oid: Oid,
    /// Serial the transaction based its change (or its read) on.
    pub serial: Tid,
    /// Serial currently committed.
    pub committed: Tid,
    /// The object was only checked (checkCurrentSerialInTransaction): a read conflict.
    pub read: bool,
    /// The data this transaction stored (None for a deletion or a check).
    pub data: Option<Arc<Vec<u8>>>,
}

impl ConflictInfo {
    fn error(&self) -> ClientError {
        if self.read {
            ClientError::ReadConflict { oid: self.oid, serial: self.serial, committed: self.committed }
        } else {
            ClientError::Conflict { oid: self.oid, serial: self.serial, committed: self.committed, locked_by: None }
        }
    }
}

/// A transaction in two-phase commit (from `tpc_begin` to `tpc_finish`/`tpc_abort`).
pub struct Transaction {
    ttid: Tid,
    user: Vec<u8>,
    description: Vec<u8>,
    extension: Vec<u8>,
    /// Stored objects and their new data (None for a deletion), in store order.
    objects: Vec<(Oid, Option<Arc<Vec<u8>>>)>,
    stores: JoinSet<StoreOutcome>,
    /// One per store task: fires once its request is queued on the storage link (the vote
    /// must be queued after it).
    queued: Vec<tokio::sync::oneshot::Receiver<()>>,
    /// Storages that locked at least one object or voted.
    involved: BTreeSet<Nid>,
    /// Storages contacted (to abort).
    contacted: BTreeSet<Nid>,
    /// Storages that failed during this transaction.
    failed: BTreeSet<Nid>,
    /// Number of cells that locked each object.
    locked: HashMap<Oid, usize>,
    /// Objects checked by `check_current_serial` (not modified): oid -> serial read.
    checked: BTreeMap<Oid, Tid>,
    /// Storages whose last vote succeeded and that received no store since.
    voted_on: BTreeSet<Nid>,
    /// Conflicts found by the last `tpc_vote`.
    conflicts: Vec<ConflictInfo>,
    shared: Arc<TxnShared>,
    voted: bool,
    /// Finished or aborted: nothing to clean up on drop.
    done: bool,
    client: Client,
}

impl Transaction {
    pub fn ttid(&self) -> Tid {
        self.ttid
    }

    /// Conflicts found by the last `tpc_vote` (empty if it succeeded).
    pub fn conflicts(&self) -> &[ConflictInfo] {
        &self.conflicts
    }

    /// Oids stored (modified, created or deleted) so far.
    pub fn oids(&self) -> Vec<Oid> {
        self.objects.iter().map(|(o, _)| *o).collect()
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        self.stores.abort_all();
        {
            let mut s = lock(&self.client.0.state);
            s.txns.remove(&self.ttid);
            s.finish_callbacks.remove(&self.ttid);
        }
        if !self.done {
            // Dropped without tpc_finish/tpc_abort (error path, cancelled call): release the
            // storages' locks and the master's record in the background.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (client, ttid, contacted) = (self.client.clone(), self.ttid, self.contacted.clone());
                rt.spawn(async move { client.send_abort(ttid, &contacted).await });
            }
        }
    }
}

use neo_lib::lock;

mod blocking;
mod history;
use crate::codec::{compress, decompress};
pub use history::{DataRecord, HistoryEntry, TransactionRecord, TxnInfo, TxnIterator, UndoPlan};

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

/// Registers a load in flight so that invalidations arriving meanwhile are remembered; the
/// registration is dropped even if the load is cancelled.
struct LoadingGuard<'a> {
    inner: &'a Inner,
    oid: Oid,
    done: bool,
}

impl<'a> LoadingGuard<'a> {
    fn new(inner: &'a Inner, oid: Oid) -> Self {
        lock(&inner.state).loading.entry(oid).or_insert((0, None)).0 += 1;
        LoadingGuard { inner, oid, done: false }
    }

    /// Unregister; returns the tid of an invalidation of the oid received during the load.
    fn finish(mut self) -> Option<Tid> {
        self.done = true;
        Self::unregister(self.inner, self.oid)
    }

    fn unregister(inner: &Inner, oid: Oid) -> Option<Tid> {
        let mut s = lock(&inner.state);
        match s.loading.get_mut(&oid) {
            Some(e) if e.0 > 1 => {
                e.0 -= 1;
                e.1
            }
            Some(e) => {
                let t = e.1;
                s.loading.remove(&oid);
                t
            }
            None => None,
        }
    }
}

impl Drop for LoadingGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            Self::unregister(self.inner, self.oid);
        }
    }
}

/// A revision as stored.
/// A store of `oid` based on `serial` without data (a deletion or a check sets its flag).
fn no_data_store(txn: &Transaction, oid: Oid, serial: Tid) -> msg::AskStoreObject {
    msg::AskStoreObject {
        oid: oid.0,
        serial: serial.0,
        compression: 0,
        checksum: ZERO_HASH.to_vec(),
        data: vec![],
        data_serial: None,
        ttid: txn.ttid.0,
        deleted: false,
        check_only: false,
    }
}

/// An `AnswerObject` whose checksum is right. A wrong checksum counts as a failure of that
/// storage: the next cell is tried.
fn checked_object(oid: Oid, b: Body) -> std::result::Result<msg::AnswerObject, LinkError> {
    let a = expect_answer!(b, AnswerObject)?;
    if !a.deleted && (a.checksum.len() != 20 || sha1(&a.data)[..] != a.checksum[..]) {
        warn!("wrong checksum for {oid:?}");
        return Err(LinkError::Unexpected(format!("wrong checksum for oid {oid}")));
    }
    Ok(a)
}

/// The outcome of a load request: the record (decompressed), None if there is no revision
/// before the bound, `NotFound` if the object does not exist.
fn record_of(oid: Oid, answer: Result<msg::AnswerObject>) -> Result<Option<Record>> {
    let a = match answer {
        Ok(a) => a,
        Err(ClientError::Remote { code: ErrorCode::OidDoesNotExist, .. }) => return Err(ClientError::NotFound(oid)),
        Err(ClientError::Remote { code: ErrorCode::OidNotFound, .. }) => return Ok(None),
        Err(ClientError::NoStorage(e)) => return Err(ClientError::NoStorage(format!("oid {oid}: {e}"))),
        Err(e) => return Err(e),
    };
    let (serial, next_serial, data_serial) = (Tid(a.serial), a.next_serial.map(Tid), a.data_serial.map(Tid));
    let data = if a.deleted { None } else { Some(decompress(oid, a.compression, a.data)?) };
    Ok(Some(Record { data, serial, next_serial, data_serial }))
}

struct Record {
    /// None for a deletion (or an undone creation).
    data: Option<Vec<u8>>,
    serial: Tid,
    next_serial: Option<Tid>,
    /// The revision whose data this one reuses (undo).
    data_serial: Option<Tid>,
}

/// A loaded revision.
struct Loaded {
    data: Arc<Vec<u8>>,
    serial: Tid,
    next_serial: Option<Tid>,
}

/// A record as a load's result (a deletion is `NotFound`).
fn loaded(oid: Oid, r: Option<Record>) -> Result<Option<Loaded>> {
    match r {
        None => Ok(None),
        Some(Record { data: None, .. }) => Err(ClientError::NotFound(oid)),
        Some(Record { data: Some(data), serial, next_serial, .. }) => {
            Ok(Some(Loaded { data: Arc::new(data), serial, next_serial }))
        }
    }
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

    // ------------------------------------------------------------------ master session

    async fn master(&self) -> Result<Link> {
        if self.0.closed.is_cancelled() {
            return Err(ClientError::Closed);
        }
        if let Some(m) = &lock(&self.0.state).master
            && !m.link.is_closed()
        {
            return Ok(m.link.clone());
        }
        let _guard = self.0.connecting.lock().await;
        if let Some(m) = &lock(&self.0.state).master
            && !m.link.is_closed()
        {
            return Ok(m.link.clone());
        }
        self.connect_master().await
    }

    async fn connect_master(&self) -> Result<Link> {
        let cfg = &self.0.cfg;
        let deadline = Instant::now() + cfg.connect_timeout;
        let mut pause = Duration::from_millis(100);
        let mut last = String::from("no master address");
        loop {
            for addr in &cfg.masters {
                let mut req = identification(&cfg.cluster, NodeType::Client, None, None);
                req.read_only = cfg.read_only;
                match connect_identified(addr, &self.0.net, req).await {
                    Ok((link, incoming, accept)) => match self.start_master(link, incoming, accept).await {
                        Ok(link) => {
                            self.0.master_connects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return Ok(link);
                        }
                        Err(e) => last = e.to_string(),
                    },
                    Err(e) if e.code() == Some(ErrorCode::Denied) => {
                        // The master refuses clients: the cluster is stopping.
                        return Err(self.stopped(&e.to_string()));
                    }
                    Err(e) => {
                        debug!("master {addr}: {e}");
                        if e.code() == Some(ErrorCode::NotReady) {
                            // A master answers: the cluster is starting (again); wait for it.
                            lock(&self.0.state).cluster_state = None;
                        }
                        last = e.to_string();
                    }
                }
            }
            if lock(&self.0.state).cluster_state == Some(ClusterState::Stopping) {
                // Told that the cluster was stopping, and no master answers: it is stopped,
                // not restarting. Say so now rather than after the connect timeout.
                return Err(self.stopped(&last));
            }
            if Instant::now() >= deadline || self.0.closed.is_cancelled() {
                return Err(ClientError::NotConnected { cluster: cfg.cluster.clone(), last });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// The cluster is stopping or stopped: remember it, and the error to report.
    fn stopped(&self, last: &str) -> ClientError {
        lock(&self.0.state).cluster_state = Some(ClusterState::Stopping);
        ClientError::Stopped { cluster: self.0.cfg.cluster.clone(), last: last.to_string() }
    }

    async fn start_master(&self, link: Link, incoming: Incoming, accept: msg::AcceptIdentification) -> Result<Link> {
        let (ptx, prx) = watch::channel(0u64);
        lock(&self.0.state).nid = accept.your_nid.map(Nid);
        tokio::spawn(master_pump(Arc::downgrade(&self.0), link.clone(), incoming, ptx));
        let ltid =
            match link.ask(msg::AskLastTransaction {}).await.and_then(|b| expect_answer!(b, AnswerLastTransaction)) {
                Ok(a) => Tid(a.tid),
                Err(e) => {
                    link.abort();
                    return Err(remote(e));
                }
            };
        // The node list and partition table were sent before that answer: apply them before
        // anyone uses this connection.
        let target = link.delivered();
        let mut processed = prx.clone();
        let _ = processed.wait_for(|n| *n >= target).await;
        let missed = {
            // Lock order everywhere: cache, then state.
            let mut cache = lock(&self.0.cache);
            let mut s = lock(&self.0.state);
            // Invalidations may have been missed while disconnected (not on the first
            // connection: nothing was cached then).
            let missed = s.last_tid != ltid && s.last_tid != Tid::ZERO;
            if missed {
                cache.clear_current();
                // A load in flight may bring back a revision that was current before: it is
                // cached as valid up to the last TID only.
                for e in s.loading.values_mut() {
                    e.1 = Some(e.1.map_or(ltid, |t| t.max(ltid)));
                }
            }
            missed
        };
        if missed {
            // Told before `last_transaction` moves: whoever reads the new last TID finds the
            // application's caches invalidated (ZODB's rule).
            let cb = lock(&self.0.callback).clone();
            if let Some(cb) = cb {
                cb(Invalidation::All(ltid));
            }
        }
        {
            let mut s = lock(&self.0.state);
            s.last_tid = s.last_tid.max(ltid);
            s.master = Some(MasterConn { link: link.clone(), processed: prx });
        }
        info!("connected to the primary master {} (last tid {ltid:?})", link.peer());
        Ok(link)
    }

    /// Ask the master, reconnecting when the connection was lost and retrying NOT_READY, until
    /// the connect timeout.
    async fn ask_master(&self, body: Body) -> Result<Body> {
        self.ask_master_on(body).await.map(|(_, b)| b)
    }

    /// `ask_master`, also returning the connection that answered.
    async fn ask_master_on(&self, body: Body) -> Result<(Link, Body)> {
        let deadline = Instant::now() + self.0.cfg.connect_timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let link = self.master().await?;
            match link.ask(body.clone()).await {
                Ok(b) => return Ok((link, b)),
                Err(LinkError::Closed(_)) if Instant::now() < deadline => {}
                Err(LinkError::Remote { code: ErrorCode::NotReady, .. }) if Instant::now() < deadline => {}
                Err(LinkError::Remote { code: ErrorCode::Denied, message }) => {
                    // The master denies a client's request only when the cluster is stopping.
                    return Err(self.stopped(&message));
                }
                Err(e) => return Err(remote(e)),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Wait until the invalidations sent by the master before its last answer on `link` were
    /// processed.
    async fn barrier(&self, link: &Link) {
        let target = link.delivered();
        let rx = {
            let s = lock(&self.0.state);
            match &s.master {
                Some(m) if m.link.conn_id() == link.conn_id() => m.processed.clone(),
                _ => return,
            }
        };
        let mut rx = rx;
        let _ = rx.wait_for(|n| *n >= target).await;
    }

    /// Network barrier with the master: afterwards, every commit acknowledged before the call
    /// has been seen (invalidations processed, `last_transaction` up to date).
    /// Like any request to the master, it outlives a lost connection (the master closes the
    /// clients' when the cluster goes back to RECOVERING): it connects again and retries.
    pub async fn sync(&self) -> Result<()> {
        let (link, _) = self.ask_master_on(msg::Ping {}.into()).await?;
        self.barrier(&link).await;
        Ok(())
    }

    // ------------------------------------------------------------------ storages

    /// The connection to storage `nid`, opened if needed (once, whoever else needs it
    /// meanwhile).
    async fn storage_link(&self, nid: Nid) -> std::result::Result<Link, LinkError> {
        if let Some(l) = self.live_storage_link(nid) {
            return Ok(l);
        }
        let asked = Instant::now();
        let gate = lock(&self.0.storage_connecting).entry(nid).or_default().clone();
        let mut last_failure = gate.lock().await;
        if let Some(l) = self.live_storage_link(nid) {
            return Ok(l);
        }
        // Whoever held the gate while we waited failed to connect: so do we.
        if let Some((when, e)) = last_failure.as_ref()
            && *when >= asked
        {
            return Err(e.clone());
        }
        let connected = self.connect_storage(nid).await;
        match &connected {
            Ok(link) => {
                *last_failure = None;
                lock(&self.0.state).storages.insert(nid, link.clone());
            }
            Err(e) => *last_failure = Some((Instant::now(), e.clone())),
        }
        connected
    }

    async fn connect_storage(&self, nid: Nid) -> std::result::Result<Link, LinkError> {
        let (addr, me) = {
            let s = lock(&self.0.state);
            let addr = s.nodes.get(&nid).and_then(|n| n.address.clone());
            (addr, s.nid)
        };
        let addr = addr.ok_or_else(|| LinkError::Closed(format!("{nid} (no address)")))?;
        let req = identification(&self.0.cfg.cluster, NodeType::Client, me, None);
        let (link, incoming, _) = connect_identified(&addr, &self.0.net, req).await.map_err(|e| match e {
            proto::net::NetError::Link { err, .. } => err,
            other => LinkError::Closed(other.to_string()),
        })?;
        tokio::spawn(storage_pump(Arc::downgrade(&self.0), nid, link.clone(), incoming));
        self.0.storage_connects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(link)
    }

    /// How many connections this client opened to the master (the first one included).
    pub fn master_connections_opened(&self) -> u64 {
        self.0.master_connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many connections this client opened to storages (read connections aside).
    pub fn storage_connections_opened(&self) -> u64 {
        self.0.storage_connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn live_storage_link(&self, nid: Nid) -> Option<Link> {
        lock(&self.0.state).storages.get(&nid).filter(|l| !l.is_closed()).cloned()
    }

    fn mark_failed(&self, nid: Nid) {
        lock(&self.0.state).failed.insert(nid, Instant::now());
    }

    /// Readable cells of partition(`oid`) on running storages, failed ones last.
    fn read_candidates(&self, oid: Oid) -> Vec<Nid> {
        let p = match &lock(&self.0.state).pt {
            Some(pt) => pt.partition_of(oid.0),
            None => return vec![],
        };
        self.partition_candidates(p)
    }

    /// Readable cells of `partition` on running storages, failed ones last.
    fn partition_candidates(&self, partition: u32) -> Vec<Nid> {
        let s = lock(&self.0.state);
        let Some(pt) = &s.pt else { return vec![] };
        let mut v: Vec<(Option<Instant>, u64, Nid)> = pt
            .readable_cells(partition)
            .filter(|c| s.nodes.get(&c.nid).is_some_and(|n| n.state == NodeState::Running))
            .map(|c| {
                let failed = s.failed.get(&c.nid).copied().filter(|t| t.elapsed() < FAILURE_PENALTY);
                (failed, fastrand::u64(..), c.nid)
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, _, n)| n).collect()
    }

    /// Writable cells of `partition` on running storages.
    fn write_cells(&self, partition_of: u64) -> (u32, Vec<Nid>) {
        let s = lock(&self.0.state);
        let Some(pt) = &s.pt else { return (0, vec![]) };
        let p = pt.partition_of(partition_of);
        let cells = pt
            .writable_cells(p)
            .filter(|c| s.nodes.get(&c.nid).is_some_and(|n| n.state == NodeState::Running))
            .map(|c| c.nid)
            .collect();
        (p, cells)
    }

    async fn load_from_storages(&self, oid: Oid, at: Option<Tid>, before: Option<Tid>) -> Result<Option<Loaded>> {
        loaded(oid, self.load_record(oid, at, before).await?)
    }

    /// A revision as stored (data None for a deletion), bypassing the cache.
    async fn load_record(&self, oid: Oid, at: Option<Tid>, before: Option<Tid>) -> Result<Option<Record>> {
        let req = msg::AskObject { oid: oid.0, at: at.map(|t| t.0), before: before.map(|t| t.0) };
        let answer = self.ask_readable(oid.0, || req.into(), |b| checked_object(oid, b)).await;
        record_of(oid, answer)
    }

    // ------------------------------------------------------------------ reads

    /// Newest revision of `oid` as of the last transaction: (data, serial).
    pub async fn load(&self, oid: Oid) -> Result<(Vec<u8>, Tid)> {
        let before = self.last_transaction().next();
        match self.load_before(oid, before).await? {
            Some((data, serial, _)) => Ok((data, serial)),
            None => Err(ClientError::NotFound(oid)),
        }
    }

    /// Revision of `oid` visible before `before`: (data, serial, next serial), None if the
    /// object was created later; `NotFound` if it does not exist at all.
    pub async fn load_before(&self, oid: Oid, before: Tid) -> Result<Option<(Vec<u8>, Tid, Option<Tid>)>> {
        Ok(self.load_before_shared(oid, before).await?.map(|(d, t, n)| (d.as_ref().clone(), t, n)))
    }

    /// ZODB `prefetch`: load these revisions into the cache with up to `PREFETCH_WINDOW`
    /// requests in flight (the storages answer them in batches), and return once they are
    /// there. A hint: errors are ignored; the load that follows reports them.
    pub async fn prefetch(&self, oids: &[Oid], before: Tid) {
        let mut loads = JoinSet::new();
        for &oid in oids {
            if lock(&self.0.cache).has_before(oid, before) {
                continue;
            }
            if loads.len() >= PREFETCH_WINDOW {
                loads.join_next().await;
            }
            let c = self.clone();
            loads.spawn(async move {
                let _ = c.load_before_shared(oid, before).await;
            });
        }
        while loads.join_next().await.is_some() {}
    }

    /// `load_before` without copying the data out of the cache.
    pub async fn load_before_shared(&self, oid: Oid, before: Tid) -> Result<Option<Hit>> {
        if let Some(hit) = lock(&self.0.cache).load_before(oid, before) {
            return Ok(Some(hit));
        }
        let guard = LoadingGuard::new(&self.0, oid);
        let res = self.load_from_storages(oid, None, Some(before)).await;
        self.cache_loaded(oid, guard, res)
    }

    /// Cache what a `load_before` got (see `LoadingGuard`) and return it.
    fn cache_loaded(&self, oid: Oid, guard: LoadingGuard<'_>, res: Result<Option<Loaded>>) -> Result<Option<Hit>> {
        // Under the cache lock, so that no invalidation slips between the check and the insert.
        let mut cache = lock(&self.0.cache);
        let invalidated = guard.finish();
        let Some(l) = res? else { return Ok(None) };
        let mut next = l.next_serial;
        if next.is_none() {
            // An invalidation that arrived during the load ends this revision.
            next = invalidated.filter(|t| *t > l.serial);
        }
        cache.store(oid, l.serial, next, l.data.clone());
        drop(cache);
        Ok(Some((l.data, l.serial, next)))
    }

    /// The revision of `oid` with exactly this serial.
    pub async fn load_serial(&self, oid: Oid, serial: Tid) -> Result<Vec<u8>> {
        if let Some(d) = lock(&self.0.cache).load_serial(oid, serial) {
            return Ok(d.as_ref().clone());
        }
        match self.load_from_storages(oid, Some(serial), None).await? {
            Some(l) => {
                // Only a revision known to be closed is cached here (a current one could be
                // invalidated while this load is in flight).
                if let Some(next) = l.next_serial {
                    lock(&self.0.cache).store(oid, l.serial, Some(next), l.data.clone());
                }
                Ok(l.data.as_ref().clone())
            }
            None => Err(ClientError::NotFound(oid)),
        }
    }

    // ------------------------------------------------------------------ writes

    /// A new object id, never handed out before.
    pub async fn new_oid(&self) -> Result<Oid> {
        if self.0.cfg.read_only {
            return Err(ClientError::ReadOnly);
        }
        if let Some(o) = lock(&self.0.state).oids.pop_front() {
            return Ok(o);
        }
        let a = self.ask_master(msg::AskNewOids { count: OID_BATCH }.into()).await?;
        let a = expect_answer!(a, AnswerNewOids).map_err(remote)?;
        let mut s = lock(&self.0.state);
        s.oids.extend(a.oids.into_iter().map(Oid));
        s.oids
            .pop_front()
            .ok_or_else(|| ClientError::Remote { code: ErrorCode::ProtocolError, message: "no oid".into() })
    }

    /// The greatest OID of a committed object, `Oid(0)` if none: about the number of objects
    /// (ZODB's root is 0; deleted objects and gaps left by aborted transactions still count).
    pub async fn max_stored_oid(&self) -> Result<Oid> {
        let a = self.ask_master(msg::AskIds {}.into()).await?;
        let a = expect_answer!(a, AnswerIds).map_err(remote)?;
        Ok(Oid(a.max_stored_oid))
    }

    /// Begin a transaction.
    pub async fn tpc_begin(&self, user: &[u8], description: &[u8], extension: &[u8]) -> Result<Transaction> {
        self.begin(None, user, description, extension).await
    }

    /// Begin a transaction that will commit with exactly `tid` (copying history); refused if
    /// another transaction is in progress or `tid` is not above the last one.
    pub async fn tpc_begin_with_tid(
        &self,
        tid: Tid,
        user: &[u8],
        description: &[u8],
        extension: &[u8],
    ) -> Result<Transaction> {
        self.begin(Some(tid), user, description, extension).await
    }

    async fn begin(&self, tid: Option<Tid>, user: &[u8], description: &[u8], extension: &[u8]) -> Result<Transaction> {
        if self.0.cfg.read_only {
            return Err(ClientError::ReadOnly);
        }
        let a = self.ask_master(msg::AskBeginTransaction { tid: tid.map(|t| t.0) }.into()).await?;
        let a = expect_answer!(a, AnswerBeginTransaction).map_err(remote)?;
        let shared = Arc::new(TxnShared::default());
        lock(&self.0.state).txns.insert(Tid(a.ttid), shared.clone());
        Ok(Transaction {
            ttid: Tid(a.ttid),
            user: user.to_vec(),
            description: description.to_vec(),
            extension: extension.to_vec(),
            objects: Vec::new(),
            stores: JoinSet::new(),
            queued: Vec::new(),
            involved: BTreeSet::new(),
            contacted: BTreeSet::new(),
            failed: BTreeSet::new(),
            locked: HashMap::new(),
            checked: BTreeMap::new(),
            voted_on: BTreeSet::new(),
            conflicts: Vec::new(),
            shared,
            voted: false,
            done: false,
            client: self.clone(),
        })
    }

    fn check_txn(&self, txn: &Transaction) -> Result<()> {
        if !Arc::ptr_eq(&txn.client.0, &self.0) {
            return Err(ClientError::Transaction("transaction of another client".into()));
        }
        if txn.voted {
            return Err(ClientError::Transaction("transaction already voted".into()));
        }
        Ok(())
    }

    /// Store a new revision of `oid` based on `serial` (zero for a new object). Conflicts are
    /// reported by `tpc_vote`.
    pub fn store(&self, txn: &mut Transaction, oid: Oid, serial: Tid, data: &[u8]) -> Result<()> {
        self.store_with(txn, oid, serial, Some(data), None)
    }

    /// `store` of data copied from revision `data_serial` of the same object (undo): the storage
    /// records the back-pointer. `data` None deletes the object (undo of its creation).
    pub fn store_with(
        &self,
        txn: &mut Transaction,
        oid: Oid,
        serial: Tid,
        data: Option<&[u8]>,
        data_serial: Option<Tid>,
    ) -> Result<()> {
        self.check_txn(txn)?;
        let Some(data) = data else { return self.delete_object(txn, oid, serial) };
        if data.len() > neo_lib::MAX_RECORD_SIZE {
            return Err(ClientError::TooLarge { oid, size: data.len() });
        }
        let (compression, stored) = compress(data, self.0.cfg.compress);
        let checksum = sha1(&stored).to_vec();
        let m = msg::AskStoreObject {
            oid: oid.0,
            serial: serial.0,
            compression,
            checksum,
            data: stored,
            data_serial: data_serial.map(|t| t.0),
            ttid: txn.ttid.0,
            deleted: false,
            check_only: false,
        };
        self.send_store(txn, oid, serial, m, Some(Arc::new(data.to_vec())))
    }

    /// ZODB `checkCurrentSerialInTransaction`: `oid` must still be at `serial` when the
    /// transaction commits; it stays locked until then. A change is reported by `tpc_vote` as
    /// a read conflict.
    pub fn check_current_serial(&self, txn: &mut Transaction, oid: Oid, serial: Tid) -> Result<()> {
        self.check_txn(txn)?;
        if txn.objects.iter().any(|(o, _)| *o == oid) {
            return Ok(()); // stored: its serial is checked anyway
        }
        let m = msg::AskStoreObject { check_only: true, ..no_data_store(txn, oid, serial) };
        txn.checked.insert(oid, serial);
        self.send_request_to_cells(txn, oid, serial, m)
    }

    /// Delete `oid` (ZODB IExternalGC `deleteObject`).
    pub fn delete_object(&self, txn: &mut Transaction, oid: Oid, serial: Tid) -> Result<()> {
        self.check_txn(txn)?;
        let m = msg::AskStoreObject { deleted: true, ..no_data_store(txn, oid, serial) };
        self.send_store(txn, oid, serial, m, None)
    }

    fn send_store(
        &self,
        txn: &mut Transaction,
        oid: Oid,
        serial: Tid,
        m: msg::AskStoreObject,
        data: Option<Arc<Vec<u8>>>,
    ) -> Result<()> {
        txn.objects.retain(|(o, _)| *o != oid);
        txn.objects.push((oid, data));
        txn.checked.remove(&oid);
        self.send_request_to_cells(txn, oid, serial, m)
    }

    fn send_request_to_cells(
        &self,
        txn: &mut Transaction,
        oid: Oid,
        serial: Tid,
        m: msg::AskStoreObject,
    ) -> Result<()> {
        let (_, cells) = self.write_cells(oid.0);
        if cells.is_empty() {
            return Err(ClientError::NoStorage(format!("oid {oid}: no writable cell")));
        }
        for nid in cells {
            txn.contacted.insert(nid);
            txn.voted_on.remove(&nid);
            let (client, m) = (self.clone(), m.clone());
            let (queued_tx, queued_rx) = tokio::sync::oneshot::channel();
            txn.queued.push(queued_rx);
            txn.stores.spawn(async move {
                let result = match client.storage_link(nid).await {
                    Ok(link) => match link.send_request(m).await {
                        Ok(pending) => {
                            let _ = queued_tx.send(());
                            pending.answer().await.and_then(|b| expect_answer!(b, AnswerStoreObject))
                        }
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                StoreOutcome { oid, nid, serial, result }
            });
        }
        Ok(())
    }

    /// Persist the transaction on every storage it stored to (and on the cells of
    /// partition(ttid), which take its metadata), then check every store and vote answer.
    /// The votes are queued right behind the stores (each storage votes once the stores it
    /// received are done), so stores and votes cost one round trip. After success,
    /// `tpc_finish` cannot fail because of a conflict.
    ///
    /// On conflicts, the error is the first one and `txn.conflicts()` lists them all; the
    /// transaction stays open: store resolved data (based on the committed serial) and vote
    /// again, or abort. A storage that asked to relock (deadlock avoidance) is voted again.
    pub async fn tpc_vote(&self, txn: &mut Transaction) -> Result<()> {
        self.check_txn(txn)?;
        txn.conflicts.clear();
        let mut fatal = None;
        loop {
            self.vote_round(txn, &mut fatal).await;
            // Relocks requested meanwhile: wait for them, then vote again where they happened.
            let relocked = loop {
                let changed = txn.shared.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                {
                    let mut r = lock(&txn.shared.relocks);
                    if r.pending == 0 {
                        let relocked = std::mem::take(&mut r.relocked);
                        if relocked.is_empty() && fatal.is_none() && txn.conflicts.is_empty() {
                            // From now on, deadlock notifications are ignored: we are finishing.
                            r.finishing = true;
                        }
                        break relocked;
                    }
                }
                changed.await;
            };
            for nid in &relocked {
                txn.voted_on.remove(nid);
            }
            if relocked.is_empty() || fatal.is_some() || !txn.conflicts.is_empty() {
                break; // relocked storages are voted again by the next tpc_vote
            }
            debug!("{:?} relocked on {relocked:?}: voting again", txn.ttid);
        }
        if let Some(e) = fatal {
            return Err(e);
        }
        if let Some(c) = txn.conflicts.first() {
            return Err(c.error());
        }
        for nid in &txn.failed {
            txn.involved.remove(nid);
        }
        for (oid, _) in &txn.objects {
            if txn.locked.get(oid).copied().unwrap_or(0) == 0 {
                return Err(ClientError::NoStorage(format!("oid {oid}: no storage accepted the store")));
            }
        }
        let (_, meta_cells) = self.write_cells(txn.ttid.0);
        if !meta_cells.iter().any(|n| txn.voted_on.contains(n)) {
            return Err(ClientError::NoStorage(format!("transaction {:?}: no storage took its metadata", txn.ttid)));
        }
        txn.voted = true;
        lock(&self.0.state).txns.remove(&txn.ttid);
        Ok(())
    }

    /// `tpc_vote`, resolving conflicts with `resolve(oid, committed serial, old serial, our
    /// data)`, which returns the merged data or None to give up. Returns the resolved oids.
    pub async fn tpc_vote_resolving(
        &self,
        txn: &mut Transaction,
        resolve: impl Fn(Oid, Tid, Tid, &[u8]) -> Option<Vec<u8>>,
    ) -> Result<Vec<Oid>> {
        let mut resolved = Vec::new();
        loop {
            match self.tpc_vote(txn).await {
                Ok(()) => return Ok(resolved),
                Err(e @ (ClientError::Conflict { .. } | ClientError::ReadConflict { .. })) => {
                    for c in txn.conflicts.clone() {
                        let new = match (&c.data, c.read) {
                            (Some(d), false) => resolve(c.oid, c.committed, c.serial, d),
                            _ => None,
                        };
                        let Some(new) = new else { return Err(c.error()) };
                        self.store(txn, c.oid, c.committed, &new)?;
                        resolved.push(c.oid);
                    }
                    if txn.conflicts.is_empty() {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One round of votes: to every storage contacted (and the cells of partition(ttid)) that
    /// has not voted since its last store; collects store answers, conflicts and failures.
    async fn vote_round(&self, txn: &mut Transaction, fatal: &mut Option<ClientError>) {
        for q in txn.queued.drain(..) {
            let _ = q.await; // an error means the store failed before sending: seen below
        }
        // Metadata to the cells of partition(ttid), a plain vote to the other storages.
        let (_, meta_cells) = self.write_cells(txn.ttid.0);
        let oids: Vec<u64> = txn.objects.iter().map(|(o, _)| o.0).collect();
        let mut votes = JoinSet::new();
        for nid in meta_cells.iter().copied().filter(|n| !txn.voted_on.contains(n) && !txn.failed.contains(n)) {
            txn.contacted.insert(nid);
            let m = msg::AskStoreTransaction {
                ttid: txn.ttid.0,
                user: txn.user.clone(),
                description: txn.description.clone(),
                extension: txn.extension.clone(),
                oids: oids.clone(),
            };
            let client = self.clone();
            votes.spawn(async move {
                let r = match client.storage_link(nid).await {
                    Ok(l) => {
                        l.ask(m).await.and_then(|b| expect_answer!(b, AnswerStoreTransaction)).map(|a| a.conflicts)
                    }
                    Err(e) => Err(e),
                };
                (nid, r)
            });
        }
        let others: Vec<Nid> = txn
            .contacted
            .iter()
            .copied()
            .filter(|n| !meta_cells.contains(n) && !txn.voted_on.contains(n) && !txn.failed.contains(n))
            .collect();
        for nid in others {
            let (client, ttid) = (self.clone(), txn.ttid.0);
            votes.spawn(async move {
                let r = match client.storage_link(nid).await {
                    Ok(l) => l
                        .ask(msg::AskVoteTransaction { ttid })
                        .await
                        .and_then(|b| expect_answer!(b, AnswerVoteTransaction))
                        .map(|a| a.conflicts),
                    Err(e) => Err(e),
                };
                (nid, r)
            });
        }
        while let Some(r) = txn.stores.join_next().await {
            let Ok(o) = r else { continue };
            match o.result {
                Ok(a) => match a.conflict {
                    None => *txn.locked.entry(o.oid).or_default() += 1,
                    // Accepted without lock (OUT_OF_DATE cell): it votes, locks and unlocks to
                    // get the data.
                    Some(0) => {}
                    Some(c) => {
                        let read = txn.checked.contains_key(&o.oid);
                        add_conflict(txn, o.oid, o.serial, Tid(c), read);
                    }
                },
                Err(e) if is_storage_failure(&e) => {
                    warn!("store of {:?} on {} failed: {e}", o.oid, o.nid);
                    self.mark_failed(o.nid);
                    txn.failed.insert(o.nid);
                }
                Err(e) => {
                    fatal.get_or_insert(remote(e));
                }
            }
        }
        while let Some(r) = votes.join_next().await {
            let Ok((nid, r)) = r else { continue };
            match r {
                Ok(conflicts) if !conflicts.is_empty() => {
                    // The storage persisted nothing: resolve and vote again, or abort.
                    for c in conflicts {
                        let (oid, serial) = (Oid(c.oid), Tid(c.serial));
                        let read = txn.checked.contains_key(&oid);
                        add_conflict(txn, oid, serial, Tid(c.committed), read);
                    }
                }
                Ok(_) => {
                    txn.involved.insert(nid);
                    txn.voted_on.insert(nid);
                }
                Err(e) if is_storage_failure(&e) => {
                    warn!("vote on {nid} failed: {e}");
                    self.mark_failed(nid);
                    txn.failed.insert(nid);
                }
                Err(e) => {
                    fatal.get_or_insert(remote(e));
                }
            }
        }
    }

    /// Commit: returns the TID. Invalidations of earlier commits are processed first.
    pub async fn tpc_finish(&self, txn: Transaction) -> Result<Tid> {
        self.tpc_finish_with(txn, Box::new(|_| {})).await
    }

    /// `tpc_finish`, calling `f(tid)` in order with the invalidations of other clients' commits
    /// and before `last_transaction` reports `tid` (ZODB's tpc_finish callback). `f` runs on a
    /// runtime thread and must not call back into this client.
    pub async fn tpc_finish_with(&self, mut txn: Transaction, f: FinishCallback) -> Result<Tid> {
        if !txn.voted {
            return Err(ClientError::Transaction("tpc_finish before tpc_vote".into()));
        }
        txn.done = true;
        lock(&self.0.state).finish_callbacks.insert(txn.ttid, f);
        let m = msg::AskFinishTransaction {
            ttid: txn.ttid.0,
            oids: txn.objects.iter().map(|(o, _)| o.0).collect(),
            involved: txn.involved.iter().map(|n| n.0).collect(),
            failed: txn.failed.iter().map(|n| n.0).collect(),
        };
        let link = self.master().await?;
        let tid = match link.ask(m).await.and_then(|b| expect_answer!(b, AnswerTransactionFinished)) {
            Ok(a) => {
                // Our own invalidation was sent just before the answer: once it is processed
                // (and the callback called), the cache is in order with every other commit.
                self.barrier(&link).await;
                Tid(a.tid)
            }
            Err(LinkError::Closed(_)) => {
                // The outcome is unknown: ask, never guess (a retry would commit twice).
                let tid = match self.recover_final_tid(txn.ttid).await {
                    Ok(t) => t,
                    Err(e) => {
                        lock(&self.0.state).finish_callbacks.remove(&txn.ttid);
                        return Err(e);
                    }
                };
                {
                    let mut cache = lock(&self.0.cache);
                    for (oid, _) in &txn.objects {
                        cache.invalidate(*oid, tid);
                    }
                }
                self.run_finish_callback(txn.ttid, tid);
                let mut s = lock(&self.0.state);
                s.last_tid = s.last_tid.max(tid);
                return Ok(tid);
            }
            Err(e) => {
                lock(&self.0.state).finish_callbacks.remove(&txn.ttid);
                return Err(remote(e));
            }
        };
        // Normally called by the master pump already.
        self.run_finish_callback(txn.ttid, tid);
        let mut cache = lock(&self.0.cache);
        let mut s = lock(&self.0.state);
        // Cache the new revisions as current unless a later commit was already processed.
        let newest = s.last_tid <= tid;
        for (oid, data) in txn.objects.drain(..) {
            cache.invalidate(oid, tid);
            if let (Some(d), true) = (data, newest) {
                cache.store(oid, tid, None, d);
            }
        }
        s.last_tid = s.last_tid.max(tid);
        Ok(tid)
    }

    fn run_finish_callback(&self, ttid: Tid, tid: Tid) {
        let f = lock(&self.0.state).finish_callbacks.remove(&ttid);
        if let Some(f) = f {
            f(tid);
        }
    }

    /// After losing the master during tpc_finish: the final TID if `ttid` committed.
    async fn recover_final_tid(&self, ttid: Tid) -> Result<Tid> {
        warn!("connection lost during tpc_finish of {ttid:?}: asking for its outcome");
        let a = self.ask_master(msg::AskFinalTid { ttid: ttid.0 }.into()).await?;
        let a = expect_answer!(a, AnswerFinalTid).map_err(remote)?;
        if let Some(tid) = a.tid {
            return Ok(Tid(tid));
        }
        if a.unknown {
            // The master restarted: the storages holding the transaction's metadata know.
            let (_, cells) = self.write_cells(ttid.0);
            for nid in cells {
                let Ok(link) = self.storage_link(nid).await else { continue };
                if let Ok(b) = link.ask(msg::AskFinalTid { ttid: ttid.0 }).await
                    && let Ok(Some(tid)) = expect_answer!(b, AnswerFinalTid).map(|a| a.tid)
                {
                    return Ok(Tid(tid));
                }
            }
        }
        Err(ClientError::Transaction(format!("transaction {ttid:?} was not committed")))
    }

    /// Abort: every storage contacted and the master forget the transaction.
    pub async fn tpc_abort(&self, mut txn: Transaction) -> Result<()> {
        txn.stores.abort_all();
        txn.done = true;
        self.send_abort(txn.ttid, &txn.contacted).await;
        Ok(())
    }

    async fn send_abort(&self, ttid: Tid, contacted: &BTreeSet<Nid>) {
        let ttid = ttid.0;
        for nid in contacted {
            let link = lock(&self.0.state).storages.get(nid).cloned();
            if let Some(l) = link {
                let _ = l.notify(msg::AbortTransaction { ttid, nids: vec![] }).await;
            }
        }
        if let Ok(link) = self.master().await {
            let _ = link.notify(msg::AbortTransaction { ttid, nids: contacted.iter().map(|n| n.0).collect() }).await;
        }
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

/// Record a conflict (once per oid) with the data the transaction stored for that oid.
fn add_conflict(txn: &mut Transaction, oid: Oid, serial: Tid, committed: Tid, read: bool) {
    if txn.conflicts.iter().any(|c| c.oid == oid) {
        return;
    }
    let data = txn.objects.iter().find(|(o, _)| *o == oid).and_then(|(_, d)| d.clone());
    txn.conflicts.push(ConflictInfo { oid, serial, committed, read, data });
}

/// Process the master's notifications in order.
async fn master_pump(inner: std::sync::Weak<Inner>, link: Link, mut incoming: Incoming, processed: watch::Sender<u64>) {
    let mut count = 0u64;
    while let Some(req) = incoming.recv().await {
        let Some(inner) = inner.upgrade() else { break };
        let close = handle_master_message(&inner, &link, req).await;
        count += 1;
        processed.send_replace(count);
        if close {
            link.abort();
            break;
        }
    }
    link.abort();
    processed.send_replace(u64::MAX);
    if let Some(inner) = inner.upgrade() {
        let mut s = lock(&inner.state);
        if s.master.as_ref().is_some_and(|m| m.link.conn_id() == link.conn_id()) {
            s.master = None;
        }
    }
    debug!("master connection closed");
}

/// Returns true to close the master connection.
async fn handle_master_message(inner: &Inner, link: &Link, req: proto::Request) -> bool {
    match req.body {
        Body::NotifyNodeInformation(m) => {
            let mut s = lock(&inner.state);
            for n in &m.nodes {
                let Ok(info) = proto::convert::node_from_msg(n) else {
                    warn!("invalid node information from the master");
                    continue;
                };
                if info.state != NodeState::Running
                    && let Some(l) = s.storages.remove(&info.nid)
                {
                    l.abort();
                }
                if info.state == NodeState::Unknown {
                    s.nodes.remove(&info.nid);
                } else {
                    s.nodes.insert(info.nid, info);
                }
            }
        }
        Body::SendPartitionTable(m) => match proto::convert::pt_from_msg(&m) {
            Ok(pt) => lock(&inner.state).pt = Some(pt),
            Err(e) => {
                warn!("invalid partition table from the master: {e}");
                return true;
            }
        },
        Body::NotifyPartitionChanges(m) => {
            let mut s = lock(&inner.state);
            let ok = match (proto::convert::changes_from_msg(&m), s.pt.as_mut()) {
                (Ok(ch), Some(pt)) => pt.apply(Ptid(m.ptid), m.replicas, &ch).is_ok(),
                _ => false,
            };
            if !ok {
                warn!("cannot apply partition table changes: resynchronizing");
                s.pt = None;
                return true;
            }
        }
        Body::NotifyClusterInformation(m) => {
            let state = ClusterState::from_i32(m.state);
            lock(&inner.state).cluster_state = state;
            if state == Some(ClusterState::Stopping) {
                return true;
            }
        }
        Body::InvalidateObjects(m) => {
            let tid = Tid(m.tid);
            let oids: Vec<Oid> = m.oids.into_iter().map(Oid).collect();
            {
                let mut cache = lock(&inner.cache);
                let mut s = lock(&inner.state);
                for o in &oids {
                    cache.invalidate(*o, tid);
                    if let Some(e) = s.loading.get_mut(o) {
                        e.1 = Some(e.1.map_or(tid, |t| t.max(tid)));
                    }
                }
            }
            if !m.committer {
                let cb = lock(&inner.callback).clone();
                if let Some(cb) = cb {
                    cb(Invalidation::Objects(tid, &oids));
                }
            } else if let Some(ttid) = m.ttid {
                let f = lock(&inner.state).finish_callbacks.remove(&Tid(ttid));
                if let Some(f) = f {
                    f(tid);
                }
            }
            let mut s = lock(&inner.state);
            s.last_tid = s.last_tid.max(tid);
        }
        Body::StopOperation(_) => return true,
        Body::Ping(_) => {
            let _ = link.answer(req.id, msg::Pong {}).await;
        }
        other => debug!("ignored {} from the master", proto::body_name(&other)),
    }
    false
}

async fn storage_pump(inner: std::sync::Weak<Inner>, nid: Nid, link: Link, mut incoming: Incoming) {
    while let Some(req) = incoming.recv().await {
        match req.body {
            Body::Ping(_) => {
                let _ = link.answer(req.id, msg::Pong {}).await;
            }
            Body::NotifyDeadlock(m) => {
                let Some(inner) = inner.upgrade() else { break };
                let shared = lock(&inner.state).txns.get(&Tid(m.ttid)).cloned();
                if let Some(shared) = shared {
                    relock(shared, nid, link.clone(), m);
                }
            }
            other => debug!("ignored {} from storage {nid}", proto::body_name(&other)),
        }
    }
    link.abort();
}

/// An older transaction waits for a lock we hold on that storage: unless we are finishing,
/// let it pass and take the lock back (the vote waits for this and votes again there).
fn relock(shared: Arc<TxnShared>, nid: Nid, link: Link, m: msg::NotifyDeadlock) {
    {
        let mut r = lock(&shared.relocks);
        if r.finishing {
            return;
        }
        r.pending += 1;
    }
    debug!("relocking {:?} of {:?} on {nid}", Oid(m.oid), Tid(m.ttid));
    tokio::spawn(async move {
        let r = link.ask(msg::AskRelockObject { ttid: m.ttid, oid: m.oid }).await;
        if let Err(e) = r.and_then(|b| expect_answer!(b, AnswerRelockObject)) {
            // The vote on that storage fails and reports it.
            warn!("relock on {nid} failed: {e}");
        }
        {
            let mut r = lock(&shared.relocks);
            r.pending -= 1;
            r.relocked.insert(nid);
        }
        shared.changed.notify_waiters();
    });
}
