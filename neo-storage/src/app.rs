//! The storage node: its session with the primary master (partition table, recovery,
//! verification, lock/unlock), and the handlers of client requests (store, vote, load, abort).

use crate::StorageError;
use crate::backend::{Backend, BackendError, Load, NewData, NewObject, TxnMeta};
use crate::db::{Db, Queued};
use std::collections::HashMap;
mod history;
mod reads;
mod replication;
use crate::tm::{LockAttempt, Stored, Tm};
use neo_lib::config::{Address, NodeConfig};
use neo_lib::pt::PartitionTable;
use neo_lib::{CellState, ClusterState, ErrorCode, Nid, NodeInfo, NodeState, NodeType, Oid, Ptid, Tid};
use proto::net::{NetConfig, connect_identified, identification, receive_identification};
use proto::{Body, Incoming, Link, Request, msg};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

const ZERO_HASH: [u8; 20] = [0; 20];

pub fn sha1(data: &[u8]) -> [u8; 20] {
    let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, data);
    let mut out = [0u8; 20];
    out.copy_from_slice(d.as_ref());
    out
}

#[derive(Default)]
struct Shared {
    nid: Option<Nid>,
    pt: Option<PartitionTable>,
    /// Between StartOperation and StopOperation/master loss.
    ready: bool,
    /// Why the node stopped itself, if it did (the process then exits with an error).
    fatal: Option<String>,
    /// The other nodes as the master describes them (storages' addresses for replication).
    nodes: HashMap<Nid, NodeInfo>,
    /// Stops the replication task (the session with the master or operation ended).
    replication: Option<CancellationToken>,
}

pub struct Storage {
    cfg: NodeConfig,
    net: NetConfig,
    db: Db,
    tm: Tm,
    shared: Mutex<Shared>,
    /// Links of the connected clients, by connection id (to notify deadlocks).
    clients: Mutex<HashMap<u64, Link>>,
    /// Sockets of the read connections (`reads`), to shut them down when the node stops.
    reads: Mutex<HashMap<u64, std::net::TcpStream>>,
    address: Address,
    shutdown: CancellationToken,
    /// Wakes the replication task: the partition table or the node list changed.
    repl_kick: tokio::sync::Notify,
}

enum SessionEnd {
    /// The cluster is stopping, or this node was told to leave.
    Stop,
    /// The master connection was lost: reconnect.
    Lost,
}

impl Storage {
    fn with<R>(&self, f: impl FnOnce(&mut Shared) -> R) -> R {
        f(&mut neo_lib::lock(&self.shared))
    }

    /// (partition of `id`, state of this node's cell in it).
    fn cell_of(&self, id: u64) -> Option<(u32, CellState)> {
        self.with(|s| {
            let pt = s.pt.as_ref()?;
            let p = pt.partition_of(id);
            Some((p, pt.cell(p, s.nid?)?))
        })
    }

    fn np(&self) -> u32 {
        self.with(|s| s.pt.as_ref().map(|p| p.np()).unwrap_or(1))
    }

    /// Partitions of which this node has a readable cell.
    fn readable_partitions(&self) -> Vec<u32> {
        self.with(|s| match (&s.pt, s.nid) {
            (Some(pt), Some(nid)) => {
                (0..pt.np()).filter(|p| pt.cell(*p, nid).is_some_and(|c| c.is_readable())).collect()
            }
            _ => Vec::new(),
        })
    }

    /// Check that every partition of a request is readable here.
    fn check_readable(&self, partitions: &[u32]) -> Result<(), Body> {
        let readable = self.readable_partitions();
        match partitions.iter().find(|p| !readable.contains(p)) {
            Some(p) => Err(proto::error(ErrorCode::NonReadableCell, format!("partition {p} is not readable here"))),
            None => Ok(()),
        }
    }
}

pub async fn run(
    cfg: NodeConfig,
    net: NetConfig,
    db: Db,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StorageError> {
    let local = listener.local_addr().map_err(|err| StorageError::Listen { addr: cfg.bind.to_string(), err })?;
    let address = Address { host: cfg.bind.host.clone(), port: local.port() };
    let (nid, pt) = db
        .call(|b| -> Result<_, crate::backend::BackendError> {
            let nid = b.get_config("nid")?.and_then(|s| s.parse::<i32>().ok()).map(Nid);
            Ok((nid, b.load_pt()?))
        })
        .await??;
    let nid = nid.or(cfg.nid);
    let st = Arc::new(Storage {
        net,
        db,
        tm: Tm::default(),
        shared: Mutex::new(Shared { nid, pt, ready: false, fatal: None, nodes: HashMap::new(), replication: None }),
        clients: Mutex::new(HashMap::new()),
        reads: Mutex::new(HashMap::new()),
        address: address.clone(),
        shutdown: shutdown.clone(),
        repl_kick: tokio::sync::Notify::new(),
        cfg,
    });
    let span = tracing::info_span!("storage", nid = ?nid, cluster = %st.cfg.cluster);
    async {
        info!("listening on {address}");
        let peers = shutdown.child_token();
        tokio::spawn(accept_loop(st.clone(), listener, peers.clone()));
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            match master_session(&st).await {
                Some(SessionEnd::Stop) => break,
                Some(SessionEnd::Lost) => {
                    warn!("lost the primary master; reconnecting");
                    stop_replication(&st);
                    st.with(|s| s.ready = false);
                    abort_unvoted(&st).await;
                }
                None => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        stop_replication(&st);
        peers.cancel();
        reads::shut_down_all(&st);
        abort_unvoted(&st).await;
        info!("storage stopped");
    }
    .instrument(span)
    .await;
    st.db.clone().close().await;
    match st.with(|s| s.fatal.take()) {
        Some(why) => Err(StorageError::Fatal(why)),
        None => Ok(()),
    }
}

/// Connect to a master and serve it until the link closes. None: no master reachable.
async fn master_session(st: &Arc<Storage>) -> Option<SessionEnd> {
    let nid = st.with(|s| s.nid);
    let mut found = None;
    for addr in &st.cfg.masters {
        let req = identification(&st.cfg.cluster, NodeType::Storage, nid, Some(&st.address));
        let res = tokio::select! {
            _ = st.shutdown.cancelled() => return Some(SessionEnd::Stop),
            r = connect_identified(addr, &st.net, req) => r,
        };
        match res {
            Ok(x) => {
                found = Some(x);
                break;
            }
            Err(e) => debug!("master {addr}: {e}"),
        }
    }
    let (link, mut incoming, accept) = found?;
    if let Some(your) = accept.your_nid.map(Nid)
        && nid != Some(your)
    {
        info!("node id {your} assigned by the master");
        let s = your.0.to_string();
        match st.db.call(move |b| b.set_config("nid", Some(&s))).await {
            Ok(Ok(())) => st.with(|sh| sh.nid = Some(your)),
            Ok(Err(e)) => {
                warn!("cannot save node id: {e}");
                link.abort();
                return Some(SessionEnd::Lost);
            }
            Err(_) => return Some(SessionEnd::Stop),
        }
    }
    info!("connected to the primary master {}", link.peer());
    loop {
        let req = tokio::select! {
            _ = st.shutdown.cancelled() => { link.close().await; return Some(SessionEnd::Stop); }
            r = incoming.recv() => r,
        };
        let Some(req) = req else { return Some(SessionEnd::Lost) };
        match handle_master(st, &link, req).await {
            Ok(None) => {}
            Ok(Some(end)) => {
                link.close().await;
                return Some(end);
            }
            Err(e) => {
                warn!("{e}: closing the master connection");
                link.abort();
                return Some(SessionEnd::Lost);
            }
        }
    }
}

fn stop_replication(st: &Storage) {
    if let Some(t) = st.with(|s| s.replication.take()) {
        t.cancel();
    }
}

/// Install a new partition table (the master's, complete or changed): this node's cells that
/// changed get their replication progress set (or their rows purged) first, then the table
/// is saved, then the replication task looks at it.
async fn install_pt(
    st: &Storage,
    pt: PartitionTable,
    changes: Option<&[neo_lib::pt::CellChange]>,
    reset: &[(u32, Nid)],
) -> Result<(), StorageError> {
    // The new table is in force before the cells' rows are purged: nothing written for a
    // dropped cell after its purge (see `replication::store`).
    let (old, me) = st.with(|s| (s.pt.replace(pt.clone()), s.nid));
    if let Some(me) = me {
        let c = replication::cells_changed(me, old.as_ref(), &pt, changes, reset);
        if let Err(e) = replication::apply_cells_changed(st, c).await {
            // The next table the master sends is compared with this one again.
            st.with(|s| s.pt = old);
            return Err(e);
        }
    }
    save_pt(st).await?;
    st.repl_kick.notify_waiters();
    Ok(())
}

async fn save_pt(st: &Storage) -> Result<(), StorageError> {
    let Some(pt) = st.with(|s| s.pt.clone()) else { return Ok(()) };
    st.db.call(move |b| b.save_pt(&pt)).await??;
    Ok(())
}

/// One message from the master, in order. Ok(Some(..)) ends the session.
async fn handle_master(st: &Arc<Storage>, link: &Link, req: Request) -> Result<Option<SessionEnd>, StorageError> {
    let Request { id, body } = req;
    let proto_err = |e: proto::convert::ConvertError| StorageError::Protocol(e.to_string());
    match body {
        Body::NotifyNodeInformation(m) => {
            let me = st.with(|s| s.nid);
            for n in &m.nodes {
                if Some(Nid(n.nid)) == me && n.state == NodeState::Down as i32 {
                    info!("the master marked this node DOWN: stopping");
                    return Ok(Some(SessionEnd::Stop));
                }
            }
            let infos = m.nodes.iter().map(proto::convert::node_from_msg).collect::<Result<Vec<_>, _>>();
            let infos = infos.map_err(proto_err)?;
            st.with(|s| {
                for n in infos {
                    if n.state == NodeState::Unknown {
                        s.nodes.remove(&n.nid);
                    } else {
                        s.nodes.insert(n.nid, n);
                    }
                }
            });
            st.repl_kick.notify_waiters();
        }
        Body::SendPartitionTable(m) => {
            let pt = proto::convert::pt_from_msg(&m).map_err(proto_err)?;
            debug!("partition table ptid {}", pt.ptid);
            let reset: Vec<(u32, Nid)> = m.reset.iter().map(|c| (c.partition, Nid(c.nid))).collect();
            install_pt(st, pt, None, &reset).await?;
        }
        Body::NotifyPartitionChanges(m) => {
            let changes = proto::convert::changes_from_msg(&m).map_err(proto_err)?;
            let mut pt = st
                .with(|s| s.pt.clone())
                .ok_or_else(|| StorageError::Protocol("partition changes without a partition table".into()))?;
            pt.apply(Ptid(m.ptid), m.replicas, &changes).map_err(|e| StorageError::Protocol(e.to_string()))?;
            install_pt(st, pt, Some(&changes), &[]).await?;
        }
        Body::NotifyClusterInformation(m) => {
            if m.state == ClusterState::Stopping as i32 {
                info!("cluster is stopping");
                return Ok(Some(SessionEnd::Stop));
            }
        }
        Body::AskRecovery(_) => {
            let ptid = st.with(|s| s.pt.as_ref().map(|p| p.ptid).unwrap_or(Ptid(0)));
            let _ = link.answer(id, msg::AnswerRecovery { ptid: ptid.0, backup_tid: None, truncate_tid: None }).await;
        }
        Body::AskPartitionTable(_) => {
            let m = st.with(|s| s.pt.as_ref().map(proto::convert::pt_to_msg));
            let m = m.unwrap_or(msg::PartitionTableMsg {
                ptid: 0,
                replicas: 0,
                rows: vec![],
                progress: vec![],
                reset: vec![],
            });
            let _ = link.answer(id, Body::AnswerPartitionTable(m)).await;
        }
        Body::AskLockedTransactions(_) => {
            let list = st.db.call(|b| b.locked_transactions()).await??;
            let transactions = list
                .into_iter()
                .map(|t| msg::LockedTransaction { ttid: t.ttid.0, tid: t.tid.map(|t| t.0), partitions: t.partitions })
                .collect();
            let _ = link.answer(id, msg::AnswerLockedTransactions { transactions }).await;
        }
        Body::ValidateTransaction(m) => {
            let (ttid, tid) = (Tid(m.ttid), Tid(m.tid));
            info!("validating transaction {ttid:?} as {tid:?}");
            st.db.call_durable(move |b| b.lock(ttid, tid, &[])).await??;
            let unlocked = queue_unlock(st, ttid, tid).await?;
            unlock_or_stop(st, ttid, unlocked).await?;
            st.tm.release(ttid);
        }
        Body::DropTransaction(m) => {
            let ttid = Tid(m.ttid);
            warn!("dropping transaction {ttid:?} (verification: never acknowledged, or only voted here)");
            st.db.call_durable(move |b| b.abort(ttid)).await??;
            st.tm.release(ttid);
        }
        Body::AskLastIds(_) => {
            let (t, o) = st.db.call(|b| b.last_ids()).await??;
            let _ = link.answer(id, msg::AnswerLastIds { last_tid: t.map(|t| t.0), last_oid: o.map(|o| o.0) }).await;
        }
        Body::AskFinalTid(m) => {
            let ttid = Tid(m.ttid);
            let tid = match st.tm.locked_tid(ttid) {
                Some(t) => Some(t),
                None => st.db.call(move |b| b.final_tid(ttid)).await??,
            };
            let _ = link.answer(id, msg::AnswerFinalTid { tid: tid.map(|t| t.0), unknown: false }).await;
        }
        Body::StartOperation(_) => {
            // Verification decided the fate of every voted transaction: forget them all.
            st.db.call(|b| b.drop_unfinished()).await??;
            st.tm.release_all();
            st.with(|s| s.ready = true);
            info!("operational");
            let _ = link.notify(msg::NotifyReady {}).await;
            stop_replication(st);
            let token = st.shutdown.child_token();
            st.with(|s| s.replication = Some(token.clone()));
            tokio::spawn(replication::run(st.clone(), link.clone(), token).instrument(tracing::Span::current()));
        }
        Body::StopOperation(_) => {
            stop_replication(st);
            st.with(|s| s.ready = false);
            abort_unvoted(st).await;
        }
        Body::AskLockInformation(m) => {
            let (ttid, tid) = (Tid(m.ttid), Tid(m.tid));
            if !st.tm.is_voted(ttid) {
                // Its temporary data is gone (or never came): locking would commit nothing.
                warn!("lock of {ttid:?} that did not vote here");
                let e =
                    proto::error(ErrorCode::IncompleteTransaction, format!("transaction {ttid:?} did not vote here"));
                let _ = link.answer(id, e).await;
                return Ok(None);
            }
            st.tm.set_locked(ttid, tid);
            let partitions = m.partitions;
            // Queued now, in the order of the master's messages; answered once durable, while
            // the next messages are read: concurrent commits' locks then share one sync.
            let locked = st.db.queue_durable(move |b| b.lock(ttid, tid, &partitions)).await?;
            let (st, link) = (st.clone(), link.clone());
            tokio::spawn(
                async move {
                    match locked.await {
                        Ok(Ok(())) => {
                            let _ = link.answer(id, msg::AnswerInformationLocked { ttid: ttid.0 }).await;
                        }
                        // As for any database failure on a master's request: the master sees this
                        // storage go and outdates its cells (or relocks elsewhere) before committing.
                        Ok(Err(e)) => {
                            warn!("lock of {ttid:?} failed: {e}: closing the master connection");
                            link.abort();
                            if st.db.sync_failed() {
                                // Nothing this storage writes can be made durable any more.
                                stop_fatal(&st, format!("cannot sync the database: {e}"), "");
                            }
                        }
                        Err(_) => link.abort(),
                    }
                }
                .instrument(tracing::Span::current()),
            );
        }
        Body::NotifyUnlockInformation(m) => {
            let ttid = Tid(m.ttid);
            match st.tm.locked_tid(ttid) {
                Some(tid) => {
                    // Queued now, in order (a later request of the master sees it done); its
                    // locks are released once it is, while the next messages are read.
                    let unlocked = queue_unlock(st, ttid, tid).await?;
                    let st = st.clone();
                    tokio::spawn(
                        async move {
                            if unlock_or_stop(&st, ttid, unlocked).await.is_ok() {
                                st.tm.release(ttid);
                            }
                        }
                        .instrument(tracing::Span::current()),
                    );
                }
                None => warn!("unlock of unknown transaction {ttid:?}"),
            }
        }
        Body::AbortTransaction(m) => abort(st, Tid(m.ttid)).await,
        Body::AskPack(m) => {
            // In a task: a pack may be long. The database thread runs jobs in order, so every
            // unlock received before this request is done before the pack.
            let (st2, link2) = (st.clone(), link.clone());
            tokio::spawn(async move {
                let ans = history::pack(&st2, Tid(m.tid)).await;
                let _ = link2.answer(id, ans).await;
            });
        }
        Body::Ping(_) => {
            let _ = link.answer(id, msg::Pong {}).await;
        }
        other => debug!("ignored {} from the master", proto::body_name(&other)),
    }
    Ok(None)
}

/// Queue the unlock of a locked transaction on the database thread, in order with the master's
/// other requests (a pack requested after it runs after it, retries included).
async fn queue_unlock(st: &Storage, ttid: Tid, tid: Tid) -> Result<Queued<Result<u32, BackendError>>, StorageError> {
    Ok(st.db.queue_write(move |b| unlock_retrying(b, ttid, tid)).await?)
}

/// Unlock attempts before the storage gives up (see `unlock_retrying`).
const UNLOCK_ATTEMPTS: u32 = 5;

/// On the database thread: make a locked transaction permanent. The commit was acknowledged:
/// a failure is retried a few times (the thread waits meanwhile, so that no later job runs
/// before the unlock), then returned (see `unlock_or_stop`). Returns the attempts it took.
fn unlock_retrying(b: &mut dyn Backend, ttid: Tid, tid: Tid) -> Result<u32, BackendError> {
    let mut attempt = 1;
    loop {
        match b.unlock(ttid, tid) {
            Ok(()) => return Ok(attempt),
            Err(e) if attempt < UNLOCK_ATTEMPTS => {
                warn!("unlock of {ttid:?} failed (attempt {attempt}): {e}");
                std::thread::sleep(Duration::from_millis(200 << attempt.min(3)));
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Wait for a queued unlock; if it failed for good, stop this storage (its read locks must
/// not be released on data that was not written; the next verification replays the unlock
/// from the durable lock).
async fn unlock_or_stop(
    st: &Storage,
    ttid: Tid,
    queued: Queued<Result<u32, BackendError>>,
) -> Result<(), StorageError> {
    match queued.await.map_err(|_| crate::db::DbClosed)? {
        Ok(_) => Ok(()),
        Err(e) => {
            stop_fatal(st, format!("cannot unlock {ttid:?}: {e}"), " (verification will finish the transaction)");
            Err(StorageError::Backend(e))
        }
    }
}

/// Stop this storage for good: `why` is its exit error (`comment` only goes to the log).
fn stop_fatal(st: &Storage, why: String, comment: &str) {
    tracing::error!("{why}: stopping this storage{comment}");
    st.with(|s| s.fatal = Some(why));
    st.shutdown.cancel();
}

/// Abort a transaction that is not locked: release its locks and delete its temporary data.
async fn abort(st: &Storage, ttid: Tid) {
    if st.tm.locked_tid(ttid).is_some() {
        return; // a locked transaction is never aborted
    }
    if st.tm.abort(ttid) {
        debug!("abort {ttid:?}");
        if let Ok(Err(e)) = st.db.call(move |b| b.abort(ttid)).await {
            warn!("abort {ttid:?}: {e}")
        }
    }
}

/// Abort the transactions that did not vote; voted ones wait for the master's decision (the
/// next verification validates or drops them).
async fn abort_unvoted(st: &Storage) {
    for ttid in st.tm.all_unvoted() {
        abort(st, ttid).await;
    }
}

async fn accept_loop(st: Arc<Storage>, listener: TcpListener, token: CancellationToken) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = token.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { warn!("accept failed: {e}"); tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            },
        };
        let (st, token) = (st.clone(), token.clone());
        tokio::spawn(async move {
            match proto::net::accept_any(tcp, &st.net).await {
                Ok(proto::net::Accepted::Link(link, incoming)) => serve_peer(st, link, incoming, token).await,
                Ok(proto::net::Accepted::Reads(conn, socket)) => reads::start(st, conn, socket),
                Err(e) => warn!("connection from {peer} refused: {e}"),
            }
        });
    }
}

async fn serve_peer(st: Arc<Storage>, link: Link, mut incoming: Incoming, token: CancellationToken) {
    let Some((id, req)) = receive_identification(&link, &mut incoming, &st.cfg.cluster).await else { return };
    let peer_storage = req.node_type == NodeType::Storage as i32;
    if !peer_storage && req.node_type != NodeType::Client as i32 {
        link.refuse(id, ErrorCode::ProtocolError, "only clients and storages may connect to a storage").await;
        return;
    }
    if peer_storage && req.nid.map(Nid).is_none_or(|n| n.node_type() != Some(NodeType::Storage)) {
        link.refuse(id, ErrorCode::ProtocolError, "a storage must give its storage node id").await;
        return;
    }
    if !st.with(|s| s.ready) {
        link.refuse(id, ErrorCode::NotReady, "storage is not operational").await;
        return;
    }
    let nid = st.with(|s| s.nid);
    let accept = msg::AcceptIdentification {
        node_type: NodeType::Storage as i32,
        nid: nid.map(|n| n.0),
        your_nid: req.nid,
        partitions: st.np(),
    };
    if link.answer(id, accept).await.is_err() {
        return;
    }
    if peer_storage {
        return serve_storage(st, link, incoming, token).await;
    }
    let conn = link.conn_id();
    neo_lib::lock(&st.clients).insert(conn, link.clone());
    loop {
        let req = tokio::select! {
            _ = token.cancelled() => break,
            r = incoming.recv() => match r { Some(r) => r, None => break },
        };
        handle_client(&st, &link, req).await;
    }
    neo_lib::lock(&st.clients).remove(&conn);
    link.close().await;
    for ttid in st.tm.unvoted_of_conn(conn) {
        abort(&st, ttid).await;
    }
}

/// A storage replicating from this one: its requests are answered one at a time.
async fn serve_storage(st: Arc<Storage>, link: Link, mut incoming: Incoming, token: CancellationToken) {
    // SQLite: a read-only connection of this link's own (see `replication::serve`).
    let cfg = st.cfg.clone();
    let mut reader = match tokio::task::spawn_blocking(move || crate::open_reader(&cfg)).await {
        Ok(Some(Ok(r))) => Some(r),
        Ok(Some(Err(e))) => {
            warn!("replication source: cannot open a reader ({e}): reading on the database thread");
            None
        }
        _ => None,
    };
    loop {
        let req = tokio::select! {
            _ = token.cancelled() => break,
            r = incoming.recv() => match r { Some(r) => r, None => break },
        };
        let answer = match req.body {
            Body::Ping(_) => msg::Pong {}.into(),
            body => replication::serve(&st, &mut reader, body).await,
        };
        if link.answer(req.id, answer).await.is_err() {
            break;
        }
    }
    link.close().await;
    if let Some(r) = reader {
        // Closed on a blocking thread (it may checkpoint).
        let _ = tokio::task::spawn_blocking(move || drop(r)).await;
    }
}

async fn handle_client(st: &Arc<Storage>, link: &Link, req: Request) {
    let Request { id, body } = req;
    let (st2, link2) = (st.clone(), link.clone());
    match body {
        Body::AskStoreObject(m) => {
            // Counted here, in arrival order, so that a vote that follows waits for it.
            let ttid = Tid(m.ttid);
            st.tm.store_started(ttid);
            tokio::spawn(async move {
                let ans = store(&st2, link2.conn_id(), m).await;
                st2.tm.store_done(ttid);
                let _ = link2.answer(id, ans).await;
            });
        }
        Body::AskStoreTransaction(m) => {
            tokio::spawn(async move {
                let ttid = Tid(m.ttid);
                let meta = TxnMeta {
                    user: m.user,
                    description: m.description,
                    extension: m.extension,
                    oids: m.oids.into_iter().map(Oid).collect(),
                };
                // The metadata goes to the cells of partition(ttid): not taken here if this
                // node has no writable cell of it (the client then tells the master).
                let skipped = !st2.cell_of(ttid.0).is_some_and(|(_, state)| state.is_writable());
                let meta = (!skipped).then_some(meta);
                let ans = vote(&st2, link2.conn_id(), ttid, meta)
                    .await
                    .map(|conflicts| msg::AnswerStoreTransaction { conflicts, skipped }.into());
                let _ = link2.answer(id, ans.unwrap_or_else(|b| b)).await;
            });
        }
        Body::AskVoteTransaction(m) => {
            tokio::spawn(async move {
                let ans = vote(&st2, link2.conn_id(), Tid(m.ttid), None)
                    .await
                    .map(|conflicts| msg::AnswerVoteTransaction { conflicts }.into());
                let _ = link2.answer(id, ans.unwrap_or_else(|b| b)).await;
            });
        }
        Body::AskObject(m) => {
            tokio::spawn(async move {
                let ans = load(&st2, m).await;
                let _ = link2.answer(id, ans).await;
            });
        }
        Body::AbortTransaction(m) => abort(st, Tid(m.ttid)).await,
        Body::AskRelockObject(m) => {
            // Counted like a store: a vote that follows waits until the lock is taken back.
            let ttid = Tid(m.ttid);
            st.tm.store_started(ttid);
            tokio::spawn(async move {
                let ans = relock(&st2, ttid, Oid(m.oid)).await;
                st2.tm.store_done(ttid);
                let _ = link2.answer(id, ans).await;
            });
        }
        Body::AskObjectHistory(m) => {
            tokio::spawn(async move {
                let _ = link2.answer(id, history::history(&st2, m).await).await;
            });
        }
        Body::AskTids(m) => {
            tokio::spawn(async move {
                let _ = link2.answer(id, history::tids(&st2, m).await).await;
            });
        }
        Body::AskTidsFrom(m) => {
            tokio::spawn(async move {
                let _ = link2.answer(id, history::tids_from(&st2, m).await).await;
            });
        }
        Body::AskTransactionInformation(m) => {
            tokio::spawn(async move {
                let _ = link2.answer(id, history::transaction_information(&st2, m).await).await;
            });
        }
        Body::AskObjectUndoSerial(m) => {
            tokio::spawn(async move {
                let _ = link2.answer(id, history::undo_serial(&st2, m).await).await;
            });
        }
        Body::AskFinalTid(m) => {
            tokio::spawn(async move {
                let ttid = Tid(m.ttid);
                let ans = match st2.tm.locked_tid(ttid) {
                    Some(t) => Ok(Some(t)),
                    None => st2
                        .db
                        .call(move |b| b.final_tid(ttid))
                        .await
                        .map_err(internal)
                        .and_then(|r| r.map_err(internal)),
                };
                let ans = match ans {
                    Ok(tid) => msg::AnswerFinalTid { tid: tid.map(|t| t.0), unknown: false }.into(),
                    Err(b) => b,
                };
                let _ = link2.answer(id, ans).await;
            });
        }
        Body::Ping(_) => {
            let _ = link.answer(id, msg::Pong {}).await;
        }
        other => {
            let name = proto::body_name(&other);
            let _ = link.answer(id, proto::error(ErrorCode::ProtocolError, format!("unexpected message {name}"))).await;
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Body {
    proto::error(ErrorCode::ProtocolError, format!("storage error: {e}"))
}

async fn store(st: &Storage, conn: u64, m: msg::AskStoreObject) -> Body {
    let (ttid, oid) = (Tid(m.ttid), Oid(m.oid));
    if ttid > Tid::MAX || m.serial > Tid::MAX.0 || oid.0 > Tid::MAX.0 || m.data_serial.is_some_and(|t| t > Tid::MAX.0) {
        return proto::error(ErrorCode::ProtocolError, "ids out of range");
    }
    if !m.deleted && !m.check_only {
        if m.compression > 1 {
            return proto::error(ErrorCode::ProtocolError, format!("invalid compression {}", m.compression));
        }
        if m.checksum.len() != 20 || sha1(&m.data)[..] != m.checksum[..] {
            warn!("checksum mismatch for {oid:?} in {ttid:?}");
            return proto::error(ErrorCode::ProtocolError, format!("checksum mismatch for oid {oid}"));
        }
    }
    let skipped = msg::AnswerStoreObject { conflict: Some(0), locked_by: None, skipped: true };
    let Some((partition, state)) = st.cell_of(oid.0) else {
        return skipped.into();
    };
    if !state.is_writable() {
        return skipped.into();
    }
    if !st.tm.register(ttid, conn) {
        return proto::error(ErrorCode::ProtocolError, format!("transaction {ttid:?} is locked or aborted"));
    }
    // An OUT_OF_DATE cell takes the write without lock nor conflict check (the readable cells
    // do both) so that it has the data once it catches up.
    let lockless = !state.is_readable();
    if !lockless && let Some(answer) = take_write_lock(st, ttid, oid).await {
        return answer;
    }
    if m.check_only {
        // checkCurrentSerialInTransaction: the write lock is held until the transaction ends,
        // and the serial is checked at vote.
        if lockless {
            return msg::AnswerStoreObject { conflict: Some(0), locked_by: None, skipped: false }.into();
        }
        if !st.tm.add_checked(ttid, oid, partition, Tid(m.serial)) {
            return proto::error(ErrorCode::ProtocolError, format!("transaction {ttid:?} was aborted"));
        }
        return msg::AnswerStoreObject { conflict: None, locked_by: None, skipped: false }.into();
    }
    let data = if m.deleted {
        None
    } else {
        Some(Arc::new(NewData { checksum: m.checksum, compression: m.compression, data: m.data }))
    };
    // The serial is checked at vote, in the same database job as the write: the write lock taken
    // above is held until unlock or abort, so nothing can commit this object meanwhile.
    let base_serial = if lockless { None } else { Some(Tid(m.serial)) };
    let stored = Stored { partition, data, data_serial: m.data_serial.map(Tid), base_serial };
    if !st.tm.add_object(ttid, oid, stored) {
        return proto::error(ErrorCode::ProtocolError, format!("transaction {ttid:?} was aborted"));
    }
    let conflict = if lockless { Some(0) } else { None };
    msg::AnswerStoreObject { conflict, locked_by: None, skipped: false }.into()
}

/// Take the write lock of `oid` for `ttid`, waiting for older transactions (and for younger
/// ones, whose client is told to relock). Returns the answer to send instead of going on
/// (abort, shutdown).
async fn take_write_lock(st: &Storage, ttid: Tid, oid: Oid) -> Option<Body> {
    loop {
        let changed = st.tm.changed();
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match st.tm.try_lock(ttid, oid) {
            LockAttempt::Acquired => return None,
            LockAttempt::Gone => {
                return Some(proto::error(ErrorCode::ProtocolError, format!("transaction {ttid:?} was aborted")));
            }
            LockAttempt::Deadlock(holder) => {
                let link = st.tm.conn_of(holder).and_then(|c| neo_lib::lock(&st.clients).get(&c).cloned());
                if let Some(link) = link {
                    debug!("{ttid:?} waits for {holder:?} on {oid:?}: asking it to relock");
                    if link.try_notify(msg::NotifyDeadlock { ttid: holder.0, oid: oid.0 }).is_err() {
                        // Its client does not read: it is disconnected, which aborts it.
                        link.abort();
                    }
                }
                continue;
            }
            LockAttempt::Wait => {}
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = st.shutdown.cancelled() => {
                st.tm.stop_waiting(ttid, oid);
                return Some(proto::error(ErrorCode::NotReady, "storage is stopping"));
            }
        }
    }
}

/// Wait while `busy` holds, re-checking at every lock release (registered before the check so
/// that none is missed); NOT_READY if the storage stops meanwhile.
async fn wait_while(st: &Storage, busy: impl Fn(&Storage) -> bool) -> Result<(), Body> {
    loop {
        let changed = st.tm.changed();
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !busy(st) {
            return Ok(());
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = st.shutdown.cancelled() => return Err(proto::error(ErrorCode::NotReady, "storage is stopping")),
        }
    }
}

/// AskRelockObject: hand the lock of `oid` to the older transaction waiting for it, then take
/// it back (the transaction must vote again here).
async fn relock(st: &Storage, ttid: Tid, oid: Oid) -> Body {
    if !st.tm.relock(ttid, oid) {
        // Unknown (aborted) or already at its commit point: nothing to give back.
        return msg::AnswerRelockObject {}.into();
    }
    match take_write_lock(st, ttid, oid).await {
        Some(answer) => answer,
        None => msg::AnswerRelockObject {}.into(),
    }
}

/// Vote: check every stored object's base serial, then persist everything, in one database
/// job. Returns the conflicts found (then nothing is persisted and the transaction is not
/// voted).
async fn vote(st: &Storage, conn: u64, ttid: Tid, meta: Option<TxnMeta>) -> Result<Vec<msg::Conflict>, Body> {
    // The client may send its vote right after its stores: wait until they are done.
    wait_while(st, |st| st.tm.storing(ttid) > 0).await?;
    st.tm.register(ttid, conn);
    let (objects, checked, generation) = st
        .tm
        .objects_to_vote(ttid)
        .ok_or_else(|| proto::error(ErrorCode::ProtocolError, format!("unknown transaction {ttid:?}")))?;
    let meta_partition = ttid.partition(st.np());
    // One database job and transaction: the data rows, the temporary objects and the
    // metadata. Not synced: the lock's sync makes it durable (the log is written in order);
    // if a crash loses it, no storage acknowledged this commit and verification drops it.
    let mut checks: Vec<(u32, Oid, Tid)> =
        objects.iter().filter_map(|(oid, s)| s.base_serial.map(|b| (s.partition, *oid, b))).collect();
    checks.extend(checked);
    let objects: Vec<(u32, NewObject)> = objects
        .into_iter()
        .map(|(oid, s)| {
            let data = s.data.map(Arc::unwrap_or_clone);
            (s.partition, NewObject { oid, data, data_serial: s.data_serial })
        })
        .collect();
    let voted = st
        .db
        .queue_write(move |b| {
            let mut conflicts = Vec::new();
            let keys: Vec<(u32, Oid)> = checks.iter().map(|(partition, oid, _)| (*partition, *oid)).collect();
            let serials = b.last_serials(&keys)?;
            for ((_, oid, base), committed) in checks.into_iter().zip(serials) {
                let committed = committed.unwrap_or(Tid::ZERO);
                if committed != base {
                    conflicts.push(msg::Conflict { oid: oid.0, serial: base.0, committed: committed.0 });
                }
            }
            if conflicts.is_empty() {
                b.vote_data(ttid, &objects, meta.as_ref().map(|m| (meta_partition, m)))?;
            }
            Ok::<_, BackendError>(conflicts)
        })
        .await
        .map_err(internal)?;
    let conflicts = voted.await.map_err(|_| internal(crate::db::DbClosed))?.map_err(internal)?;
    if conflicts.is_empty() {
        st.tm.set_voted(ttid, generation);
    }
    Ok(conflicts)
}

async fn load(st: &Storage, m: msg::AskObject) -> Body {
    let oid = Oid(m.oid);
    let partition = match history::readable_partition_of(st, oid.0) {
        Ok(p) => p,
        Err(e) => return e,
    };
    // Wait while a transaction that already reached its commit point changes this object.
    if let Err(e) = wait_while(st, |st| st.tm.is_read_locked(oid)).await {
        return e;
    }
    let (at, before) = (m.at.map(Tid), m.before.map(Tid));
    object_answer(oid, st.db.call(move |b| b.load(partition, oid, at, before)).await)
}

/// The answer to AskObject, from what the database returned.
fn object_answer(oid: Oid, loaded: Result<Result<Load, BackendError>, crate::db::DbClosed>) -> Body {
    match loaded {
        Ok(Ok(Load::Found(r))) => {
            let deleted = r.checksum[..] == ZERO_HASH[..] && r.data.is_empty();
            msg::AnswerObject {
                oid: oid.0,
                serial: r.serial.0,
                next_serial: r.next_serial.map(|t| t.0),
                compression: r.compression,
                checksum: r.checksum,
                data: r.data,
                data_serial: r.data_serial.map(|t| t.0),
                deleted,
            }
            .into()
        }
        Ok(Ok(Load::NotFound)) => proto::error(ErrorCode::OidNotFound, format!("oid {oid} has no such revision")),
        Ok(Ok(Load::DoesNotExist)) => proto::error(ErrorCode::OidDoesNotExist, format!("oid {oid} does not exist")),
        Ok(Err(e)) => {
            // NOT_READY: the client tries another readable cell.
            warn!("load of {oid:?}: {e}");
            proto::error(ErrorCode::NotReady, format!("storage error: {e}"))
        }
        Err(e) => internal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sqlite::SqliteBackend;

    /// A failed unlock is retried on the database thread: another connection holds SQLite's
    /// write lock past the busy timeout, the first attempt fails, a later one commits.
    #[test]
    fn an_unlock_that_fails_once_is_retried_until_it_commits() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.sqlite");
        let mut b = SqliteBackend::open_shared(&path, "c")?;
        let (ttid, tid) = (Tid(10), Tid(11));
        let meta = TxnMeta { user: b"u".to_vec(), ..Default::default() };
        b.vote(ttid, &[], Some((0, &meta)))?;
        b.lock(ttid, tid, &[0])?;
        let other = rusqlite::Connection::open(&path)?;
        other.execute_batch("BEGIN IMMEDIATE")?;
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(3_300)); // past the first attempt
            other.execute_batch("COMMIT")
        });
        assert!(unlock_retrying(&mut b, ttid, tid)? > 1, "the first attempt fails");
        holder.join().map_err(|_| "holder panicked")??;
        assert_eq!(b.transaction(0, tid)?.map(|t| t.meta.user), Some(b"u".to_vec()));
        assert!(b.locked_transactions()?.is_empty());
        Ok(())
    }
}
