//! TID/OID allocation and the master's side of two-phase commit: begin, finish (lock on every
//! involved storage), commit in TID order (answer, invalidations, unlock), abort.

use crate::app::{AskKind, ConnId, Master};
use neo_lib::{ErrorCode, Nid, NodeType, Oid, Tid};
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
    pub oids: Vec<u64>,
    pub involved: Vec<Nid>,
    pub waiting: BTreeSet<Nid>,
}

#[derive(Default)]
pub struct Transactions {
    pub last_tid: Tid,
    pub last_oid: Oid,
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
}

impl Transactions {
    pub fn reset(&mut self) {
        self.txns.clear();
        self.queue.clear();
        self.starting.clear();
        self.delayed.clear();
    }

    pub fn recovered(&mut self, last_tid: Tid, next_oid: Oid) {
        self.last_tid = last_tid;
        self.last_allocated = self.last_allocated.max(last_tid);
        self.next_oid = self.next_oid.max(next_oid);
        self.last_oid = Oid(self.next_oid.0.saturating_sub(1));
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
        self.tm.next_oid = Oid(first + u64::from(n));
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
        if let Some(max) = m.oids.iter().max()
            && *max >= self.tm.next_oid.0
        {
            self.tm.next_oid = Oid(max + 1);
            self.tm.last_oid = Oid(*max);
        }
        let np = self.np();
        let tid = if self.tm.last_allocated == ttid && self.tm.txns.len() == 1 && self.tm.queue.is_empty() {
            ttid // explicit-tid begin: keep it
        } else {
            self.tm.next_tid(Some(ttid), np)
        };
        debug!("finish {ttid:?} as {tid:?} for {nid} on {involved:?}");
        if let Some(t) = self.tm.txns.get_mut(&ttid) {
            t.finish = Some(Finish {
                req_id: id,
                oids: m.oids,
                involved: involved.clone(),
                waiting: involved.iter().copied().collect(),
            });
        }
        self.tm.queue.insert(tid, ttid);
        for s in involved {
            if let Some(c) = self.conn_of_node(s) {
                self.spawn_ask(
                    c,
                    AskKind::LockInformation { ttid },
                    msg::AskLockInformation { ttid: ttid.0, tid: tid.0 }.into(),
                );
            }
        }
    }

    pub async fn lock_answered(&mut self, ttid: Tid, nid: Nid, result: Result<Body, LinkError>) {
        if let Err(e) = result.and_then(|b| proto::expect_answer!(b, AnswerInformationLocked)) {
            // The storage is gone or failed: its cells get outdated when its connection closes.
            warn!("lock of {ttid:?} on {nid} failed: {e}");
            if let Some(c) = self.conn_of_node(nid)
                && let Some(conn) = self.conns.get(&c)
            {
                conn.link.abort();
            }
        }
        if let Some(f) = self.tm.txns.get_mut(&ttid).and_then(|t| t.finish.as_mut()) {
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
            self.answer(txn.conn, f.req_id, msg::AnswerTransactionFinished { ttid: ttid.0, tid: tid.0 }).await;
            let inval = msg::InvalidateObjects { tid: tid.0, oids: f.oids };
            for c in self.conns_of(&[NodeType::Client]) {
                if c != txn.conn {
                    self.notify(c, inval.clone()).await;
                }
            }
            for s in &f.involved {
                if let Some(c) = self.conn_of_node(*s) {
                    self.notify(c, msg::NotifyUnlockInformation { ttid: ttid.0 }).await;
                }
            }
            self.tm.last_tid = tid;
            debug!("committed {ttid:?} as {tid:?}");
        }
        self.maybe_stop().await;
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

    /// Stop waiting for a lost storage's lock answers.
    pub async fn transactions_storage_lost(&mut self, nid: Nid) {
        for t in self.tm.txns.values_mut() {
            if let Some(f) = t.finish.as_mut() {
                f.waiting.remove(&nid);
                f.involved.retain(|n| *n != nid);
            }
        }
        self.commit_ready().await;
    }
}
