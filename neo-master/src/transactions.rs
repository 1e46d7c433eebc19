//! TID/OID allocation and the master's side of two-phase commit: begin, finish (lock on every
//! involved storage), commit in TID order (answer, invalidations, unlock), abort.

use crate::app::{AskKind, ConnId, Master};
use neo_lib::pt::CellChange;
use neo_lib::{CellState, ErrorCode, Nid, NodeType, Oid, Tid};
use proto::{Body, LinkError, msg};
use std::collections::{BTreeMap, BTreeSet};
use tracing::{debug, info, warn};

/// At most this many OIDs per AskNewOids.
const MAX_NEW_OIDS: u32 = 1000;

pub struct Txn {
    pub conn: ConnId,
    pub finish: Option<Finish>,
}

pub struct Finish {
    pub req_id: u32,
    /// Clients that asked AskFinalTid for this transaction (after losing their connection).
    pub final_waiters: Vec<(ConnId, u32)>,
    pub oids: Vec<u64>,
    pub involved: Vec<Nid>,
    pub waiting: BTreeSet<Nid>,
    pub tid: Tid,
    /// Every partition the transaction writes (its objects' and its metadata's): recorded
    /// with each lock, for verification.
    pub partitions: Vec<u32>,
    /// Locks are asked again (a new round) when a storage is lost before the commit is
    /// acknowledged.
    pub round: u32,
    /// OUT_OF_DATE cells of its partitions that did not take its writes: replication must
    /// copy it before they may become UP_TO_DATE (see `Master::missed`).
    pub missed: Vec<(u32, Nid)>,
}

#[derive(Default)]
pub struct Transactions {
    pub last_tid: Tid,
    pub last_oid: Oid,
    /// Greatest OID of a committed object (storages' last OID at recovery, then each commit's).
    pub max_stored_oid: Oid,
    /// Next OID to hand out.
    next_oid: Oid,
    /// Greatest TID or TTID handed out: new ones are strictly greater.
    last_allocated: Tid,
    pub txns: BTreeMap<Tid, Txn>,
    /// Final tid -> ttid, committed in this order.
    queue: BTreeMap<Tid, Tid>,
    /// Storages between StartOperation and NotifyReady: begins wait for them.
    starting: BTreeSet<Nid>,
    /// Begins delayed while storages are starting: (conn, request id, explicit tid).
    delayed: Vec<(ConnId, u32, Option<u64>)>,
    /// ttid -> tid of recent commits, for clients that lost their connection during finish.
    recent: BTreeMap<Tid, Tid>,
    /// The greatest TID committed in each partition (objects or metadata).
    partition_last: BTreeMap<u32, Tid>,
}

/// How many recent commits are remembered for AskFinalTid.
const RECENT_COMMITS: usize = 10_000;

impl Transactions {
    pub fn reset(&mut self) {
        self.txns.clear();
        self.queue.clear();
        self.starting.clear();
        self.delayed.clear();
    }

    pub fn recovered(&mut self, last_tid: Tid, next_oid: Oid) {
        self.last_tid = last_tid;
        self.max_stored_oid = Oid(next_oid.0.saturating_sub(1));
        self.last_allocated = self.last_allocated.max(last_tid);
        // Oid 0 is ZODB's root object: created explicitly, never handed out by new_oid.
        self.next_oid = self.next_oid.max(next_oid).max(Oid(1));
        self.last_oid = Oid(self.next_oid.0.saturating_sub(1));
    }

    /// The greatest TID of a transaction committed in `partition`, or being committed there
    /// (past its finish): what a cell that becomes OUT_OF_DATE now must replicate up to.
    pub fn partition_floor(&self, partition: u32) -> Tid {
        let committing = self
            .txns
            .values()
            .filter_map(|t| t.finish.as_ref())
            .filter(|f| f.partitions.contains(&partition))
            .map(|f| f.tid)
            .max();
        let committed = self.partition_last.get(&partition).copied();
        committing.max(committed).unwrap_or(Tid::ZERO)
    }

    pub fn has_pending(&self) -> bool {
        !self.txns.is_empty()
    }

    pub fn storage_starting(&mut self, nid: Nid) {
        self.starting.insert(nid);
    }
    pub fn storage_starting_done(&mut self, nid: Nid) {
        self.starting.remove(&nid);
    }

    /// A new TID: from the clock, strictly greater than any given out; for a final TID, in the
    /// same partition as its ttid (transaction metadata is stored by partition(ttid)).
    pub fn next_tid(&mut self, ttid: Option<Tid>, np: u32) -> Tid {
        let mut tid = Tid::now();
        if tid <= self.last_allocated {
            tid = self.last_allocated.next();
        }
        if let Some(ttid) = ttid {
            let np = u64::from(np.max(1));
            let delta = (ttid.0 % np + np - tid.0 % np) % np;
            tid = Tid(tid.0 + delta);
        }
        self.last_allocated = tid;
        tid
    }
}

impl Master {
    fn np(&self) -> u32 {
        self.pt.as_ref().map(|p| p.np()).unwrap_or(1)
    }

    pub async fn handle_begin(&mut self, conn: ConnId, nid: Nid, id: u32, m: msg::AskBeginTransaction) {
        if self.stopping {
            return self.answer(conn, id, proto::error(ErrorCode::Denied, "cluster is stopping")).await;
        }
        if self.state != neo_lib::ClusterState::Running {
            return self
                .answer(conn, id, proto::error(ErrorCode::NotReady, format!("cluster is {}", self.state)))
                .await;
        }
        if !self.tm.starting.is_empty() {
            self.tm.delayed.push((conn, id, m.tid));
            return;
        }
        self.begin(conn, nid, id, m.tid).await;
    }

    async fn begin(&mut self, conn: ConnId, nid: Nid, id: u32, tid: Option<u64>) {
        let ttid = match tid {
            Some(t) => {
                let t = Tid(t);
                if t <= self.tm.last_allocated || t > Tid::MAX || !self.tm.txns.is_empty() {
                    let msg = format!(
                        "cannot begin with tid {t:?}: it must be greater than {:?} and no other transaction may be in progress",
                        self.tm.last_allocated
                    );
                    return self.answer(conn, id, proto::error(ErrorCode::Denied, msg)).await;
                }
                self.tm.last_allocated = t;
                t
            }
            None => {
                let np = self.np();
                self.tm.next_tid(None, np)
            }
        };
        self.tm.txns.insert(ttid, crate::transactions::Txn { conn, finish: None });
        debug!("begin {ttid:?} for {nid}");
        self.answer(conn, id, msg::AnswerBeginTransaction { ttid: ttid.0 }).await;
    }

    pub async fn maybe_begin_delayed(&mut self) {
        if !self.tm.starting.is_empty() {
            return;
        }
        for (conn, id, tid) in std::mem::take(&mut self.tm.delayed) {
            let Some(nid) = self.conns.get(&conn).map(|c| c.nid) else { continue };
            self.begin(conn, nid, id, tid).await;
        }
    }

    pub async fn handle_new_oids(&mut self, conn: ConnId, id: u32, m: msg::AskNewOids) {
        if self.state != neo_lib::ClusterState::Running {
            return self
                .answer(conn, id, proto::error(ErrorCode::NotReady, format!("cluster is {}", self.state)))
                .await;
        }
        let n = m.count.clamp(1, MAX_NEW_OIDS);
        let first = self.tm.next_oid.0;
        let Some(next) = first.checked_add(u64::from(n)).filter(|n| *n <= Tid::MAX.0) else {
            return self.answer(conn, id, proto::error(ErrorCode::Denied, "no more object ids")).await;
        };
        self.tm.next_oid = Oid(next);
        self.tm.last_oid = Oid(self.tm.next_oid.0 - 1);
        let oids = (first..first + u64::from(n)).collect();
        self.answer(conn, id, msg::AnswerNewOids { oids }).await;
    }

    pub async fn handle_finish(&mut self, conn: ConnId, nid: Nid, id: u32, m: msg::AskFinishTransaction) {
        let ttid = Tid(m.ttid);
        let valid = self.tm.txns.get(&ttid).is_some_and(|t| t.conn == conn && t.finish.is_none());
        if !valid {
            let e = proto::error(ErrorCode::ProtocolError, format!("unknown transaction {ttid:?}"));
            return self.answer(conn, id, e).await;
        }
        // Storages that failed for the client while still running for us are disconnected
        // first: their cells become OUT_OF_DATE (or the cluster stops if it cannot do without
        // them) before the commit point, so no replica silently misses this transaction.
        for n in m.failed.iter().map(|n| Nid(*n)) {
            if let Some(c) = self.conn_of_node(n) {
                warn!("{nid} reports that storage {n} failed during {ttid:?}: disconnecting it");
                if let Some(conn) = self.conns.get(&c) {
                    conn.link.abort();
                }
                self.connection_lost(c).await;
            }
        }
        if !self.tm.txns.contains_key(&ttid) {
            let e =
                proto::error(ErrorCode::IncompleteTransaction, "the cluster lost storages needed by this transaction");
            return self.answer(conn, id, e).await;
        }
        let np = self.np();
        let mut partitions: Vec<u32> =
            m.oids.iter().chain(std::iter::once(&ttid.0)).map(|o| (o % u64::from(np.max(1))) as u32).collect();
        partitions.sort_unstable();
        partitions.dedup();
        let written: BTreeSet<(u32, Nid)> = m.written.iter().map(|c| (c.partition, Nid(c.nid))).collect();
        let missed = match self.cells_missed(ttid, nid, &partitions, &written).await {
            Ok(missed) => missed,
            Err(e) => {
                self.tm.txns.remove(&ttid);
                self.answer(conn, id, e).await;
                return self.maybe_stop().await;
            }
        };
        let running = self.running_storages();
        let mut involved: Vec<Nid> = m.involved.iter().map(|n| Nid(*n)).filter(|n| running.contains(n)).collect();
        involved.sort();
        involved.dedup();
        if involved.is_empty() {
            self.tm.txns.remove(&ttid);
            let e = proto::error(ErrorCode::IncompleteTransaction, "no storage of this transaction is running");
            self.answer(conn, id, e).await;
            return self.maybe_stop().await;
        }
        // Stores of an object above the allocator's mark bump it (copied histories).
        if let Some(max) = m.oids.iter().max().copied() {
            if max > Tid::MAX.0 {
                self.tm.txns.remove(&ttid);
                let e = proto::error(ErrorCode::ProtocolError, format!("invalid oid {max:#x}"));
                return self.answer(conn, id, e).await;
            }
            if max >= self.tm.next_oid.0 {
                self.tm.next_oid = Oid(max + 1);
                self.tm.last_oid = Oid(max);
            }
        }
        let tid = if self.tm.last_allocated == ttid && self.tm.txns.len() == 1 && self.tm.queue.is_empty() {
            ttid // explicit-tid begin: keep it
        } else {
            self.tm.next_tid(Some(ttid), np)
        };
        debug!("finish {ttid:?} as {tid:?} for {nid} on {involved:?}");
        if let Some(t) = self.tm.txns.get_mut(&ttid) {
            t.finish = Some(Finish {
                req_id: id,
                final_waiters: Vec::new(),
                oids: m.oids,
                involved: involved.clone(),
                waiting: involved.iter().copied().collect(),
                tid,
                partitions,
                round: 0,
                missed,
            });
        }
        self.tm.queue.insert(tid, ttid);
        self.ask_locks(ttid);
    }

    /// The writable cells of `partitions` that did not take all of the transaction's writes
    /// (`written`, as the client reports them). A readable one is outdated now, before any
    /// lock, so that no readable cell lacks a committed transaction (or the transaction is
    /// refused if a partition would have no readable cell left); the OUT_OF_DATE ones are
    /// returned: replication copies the transaction to them.
    async fn cells_missed(
        &mut self,
        ttid: Tid,
        client: Nid,
        partitions: &[u32],
        written: &BTreeSet<(u32, Nid)>,
    ) -> Result<Vec<(u32, Nid)>, Body> {
        let Some(pt) = &self.pt else { return Err(proto::error(ErrorCode::NotReady, "no partition table")) };
        if written.is_empty() {
            return Err(proto::error(ErrorCode::ProtocolError, "the finish names no cell that took the transaction"));
        }
        let mut outdate = Vec::new();
        let mut missed = Vec::new();
        for &p in partitions {
            for c in pt.writable_cells(p) {
                if written.contains(&(p, c.nid)) {
                    continue;
                }
                if c.state.is_readable() {
                    outdate.push(CellChange { partition: p, nid: c.nid, state: CellState::OutOfDate });
                } else {
                    missed.push((p, c.nid));
                }
            }
        }
        if !outdate.is_empty() {
            let lost: Vec<u32> = partitions
                .iter()
                .copied()
                .filter(|p| {
                    !pt.readable_cells(*p).any(|c| !outdate.iter().any(|o| o.partition == *p && o.nid == c.nid))
                })
                .collect();
            if !lost.is_empty() {
                warn!("{client}'s {ttid:?} reached no readable cell of partitions {lost:?}: refused");
                let e = format!("no readable cell of partitions {lost:?} took the transaction");
                return Err(proto::error(ErrorCode::IncompleteTransaction, e));
            }
            warn!("{client}'s {ttid:?} did not write the readable cells {outdate:?}: outdating them");
            missed.extend(outdate.iter().map(|c| (c.partition, c.nid)));
            self.commit_pt_changes(&outdate).await;
        }
        Ok(missed)
    }

    /// Ask every involved storage of `ttid` (still waited for) to lock it.
    fn ask_locks(&self, ttid: Tid) {
        let Some(f) = self.tm.txns.get(&ttid).and_then(|t| t.finish.as_ref()) else { return };
        for s in &f.waiting {
            if let Some(c) = self.conn_of_node(*s) {
                let m = msg::AskLockInformation { ttid: ttid.0, tid: f.tid.0, partitions: f.partitions.clone() };
                self.spawn_ask(c, AskKind::LockInformation { ttid, round: f.round }, m.into());
            }
        }
    }

    pub async fn lock_answered(&mut self, ttid: Tid, round: u32, nid: Nid, result: Result<Body, LinkError>) {
        if let Err(e) = result.and_then(|b| proto::expect_answer!(b, AnswerInformationLocked)) {
            // Only a real answer counts as locked. A storage that failed is disconnected: its
            // cells are outdated (or the cluster goes back to recovery) before anyone is told
            // the transaction committed.
            warn!("lock of {ttid:?} on {nid} failed: {e}: disconnecting it");
            if let Some(c) = self.conn_of_node(nid) {
                if let Some(conn) = self.conns.get(&c) {
                    conn.link.abort();
                }
                self.connection_lost(c).await;
            }
            return;
        }
        if let Some(f) = self.tm.txns.get_mut(&ttid).and_then(|t| t.finish.as_mut())
            && f.round == round
        {
            f.waiting.remove(&nid);
        }
        self.commit_ready().await;
    }

    /// Commit, in TID order, every transaction at the head of the queue that all its storages
    /// locked: answer the client, invalidate the others, unlock the storages.
    async fn commit_ready(&mut self) {
        while let Some((&tid, &ttid)) = self.tm.queue.first_key_value() {
            let ready = self.tm.txns.get(&ttid).and_then(|t| t.finish.as_ref()).is_none_or(|f| f.waiting.is_empty());
            if !ready {
                break;
            }
            self.tm.queue.remove(&tid);
            let Some(txn) = self.tm.txns.remove(&ttid) else { continue };
            let Some(f) = txn.finish else { continue };
            // Invalidations go to every client, the committer included (flagged, just before
            // its answer), without waiting: a client that does not read is disconnected rather
            // than stalling every commit.
            let max_oid = f.oids.iter().max().copied();
            let mut inval = msg::InvalidateObjects { tid: tid.0, oids: f.oids, committer: false, ttid: None };
            for c in self.conns_of(&[NodeType::Client]) {
                if let Some(cl) = self.conns.get(&c) {
                    inval.committer = c == txn.conn;
                    inval.ttid = inval.committer.then_some(ttid.0);
                    let _ = cl.link.try_notify(inval.clone());
                }
            }
            if let Some(cl) = self.conns.get(&txn.conn) {
                let _ = cl.link.try_answer(f.req_id, msg::AnswerTransactionFinished { ttid: ttid.0, tid: tid.0 });
            }
            for (c, id) in f.final_waiters {
                if let Some(cl) = self.conns.get(&c) {
                    let _ = cl.link.try_answer(id, msg::AnswerFinalTid { tid: Some(tid.0), unknown: false });
                }
            }
            self.tm.recent.insert(ttid, tid);
            while self.tm.recent.len() > RECENT_COMMITS {
                self.tm.recent.pop_first();
            }
            for s in &f.involved {
                if let Some(c) = self.conn_of_node(*s) {
                    self.notify(c, msg::NotifyUnlockInformation { ttid: ttid.0 }).await;
                }
            }
            self.tm.last_tid = tid;
            for p in &f.partitions {
                let t = self.tm.partition_last.entry(*p).or_insert(tid);
                *t = (*t).max(tid);
            }
            for cell in f.missed {
                let t = self.missed.entry(cell).or_insert(tid);
                *t = (*t).max(tid);
            }
            if let Some(max) = max_oid {
                self.tm.max_stored_oid = self.tm.max_stored_oid.max(Oid(max));
            }
            debug!("committed {ttid:?} as {tid:?}");
        }
        self.maybe_stop().await;
    }

    /// A client lost its connection during tpc_finish and asks what became of `ttid`.
    pub async fn handle_final_tid(&mut self, conn: ConnId, id: u32, m: msg::AskFinalTid) {
        let ttid = Tid(m.ttid);
        if let Some(tid) = self.tm.recent.get(&ttid) {
            let tid = tid.0;
            return self.answer(conn, id, msg::AnswerFinalTid { tid: Some(tid), unknown: false }).await;
        }
        if let Some(f) = self.tm.txns.get_mut(&ttid).and_then(|t| t.finish.as_mut()) {
            f.final_waiters.push((conn, id));
            return;
        }
        let unknown = !self.tm.txns.contains_key(&ttid);
        self.answer(conn, id, msg::AnswerFinalTid { tid: None, unknown }).await;
    }

    pub async fn handle_abort(&mut self, conn: ConnId, m: msg::AbortTransaction) {
        let ttid = Tid(m.ttid);
        let abortable = self.tm.txns.get(&ttid).is_some_and(|t| t.conn == conn && t.finish.is_none());
        if !abortable {
            return;
        }
        self.tm.txns.remove(&ttid);
        for n in m.nids {
            if let Some(c) = self.conn_of_node(Nid(n)) {
                self.notify(c, msg::AbortTransaction { ttid: ttid.0, nids: vec![] }).await;
            }
        }
        self.maybe_stop().await;
    }

    /// A client left: its transactions that did not reach finish are aborted on every storage;
    /// those being finished complete without it.
    pub async fn client_lost(&mut self, conn: ConnId) {
        let lost: Vec<Tid> =
            self.tm.txns.iter().filter(|(_, t)| t.conn == conn && t.finish.is_none()).map(|(k, _)| *k).collect();
        for ttid in lost {
            info!("aborting {ttid:?} of a disconnected client");
            self.tm.txns.remove(&ttid);
            for c in self.conns_of(&[NodeType::Storage]) {
                self.notify(c, msg::AbortTransaction { ttid: ttid.0, nids: vec![] }).await;
            }
        }
        self.maybe_stop().await;
    }

    /// Stop waiting for a lost storage's lock answers (its cells were just outdated). The
    /// commits it took part in and not acknowledged yet are locked again on the other
    /// storages: a storage handles the master's messages in order, so its new answer means it
    /// saved the partition table without `nid`'s cells first. Otherwise a crash right after
    /// the acknowledgement could bring back a table where `nid` still looks up to date without
    /// the transaction, and verification would drop it as never acknowledged.
    pub async fn transactions_storage_lost(&mut self, nid: Nid) {
        let mut relock = Vec::new();
        for (ttid, t) in self.tm.txns.iter_mut() {
            if let Some(f) = t.finish.as_mut()
                && f.involved.contains(&nid)
            {
                f.involved.retain(|n| *n != nid);
                f.waiting = f.involved.iter().copied().collect();
                f.round += 1;
                relock.push(*ttid);
            }
        }
        for ttid in relock {
            self.ask_locks(ttid);
        }
        self.commit_ready().await;
    }
}
