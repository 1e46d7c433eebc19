//! RECOVERING and VERIFYING: find the newest partition table among the storages, decide when
//! the cluster may start, finish or drop transactions interrupted by a stop, collect the last
//! TID/OID, then start the storages and go RUNNING.

use crate::app::{AskKind, ConnId, Master};
use neo_lib::pt::{CellChange, PartitionTable};
use neo_lib::{CellState, ClusterState, Nid, NodeState, NodeType, Oid, Ptid, Tid};
use proto::{Body, LinkError, msg};
use std::collections::{BTreeMap, BTreeSet};
use tracing::{info, warn};

/// A transaction some storage holds as voted or locked, seen by verification.
#[derive(Default)]
struct Unfinished {
    /// The final tid, if locked on some storage (or committed on some).
    tid: Option<Tid>,
    /// Storages holding it as voted or locked.
    holders: BTreeSet<Nid>,
    /// Those of `holders` that hold its lock.
    locked_on: BTreeSet<Nid>,
    /// Storages that already committed it.
    committed_on: BTreeSet<Nid>,
    /// Every partition it writes, as its locks recorded them (empty if unknown).
    partitions: BTreeSet<u32>,
}

#[derive(Default)]
pub struct Recovery {
    /// `neoctl start` was given (or the cluster restarts after losing operation).
    pub startup_allowed: bool,
    /// What RECOVERING waits for, as told to the log, the admin and neoctl ("" if nothing
    /// worth saying).
    pub waiting: String,
    /// Storages asked for their ptid and not answered yet.
    asked: BTreeSet<Nid>,
    /// ptid reported by each storage.
    ptids: BTreeMap<Nid, Ptid>,
    /// A partition table was requested from a storage and not received yet.
    pt_requested: bool,
    // --- verification
    verifying: BTreeSet<Nid>,
    locked: BTreeMap<Tid, Unfinished>,
    /// Transactions being looked up (AskFinalTid) on the storages that do not hold them as
    /// voted or locked: a storage may already have committed one before the previous master
    /// stopped.
    final_pending: BTreeMap<Tid, BTreeSet<Nid>>,
    last_ids: BTreeSet<Nid>,
    last_tid: Option<Tid>,
    last_oid: Option<Oid>,
}

impl Master {
    pub fn recovery_storage_added(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get(&conn) {
            self.recovery.asked.insert(c.nid);
        }
        self.spawn_ask(conn, AskKind::Recovery, msg::AskRecovery {}.into());
    }

    pub async fn recovery_storage_lost(&mut self, nid: Nid) {
        self.recovery.asked.remove(&nid);
        self.recovery.ptids.remove(&nid);
        self.check_recovery().await;
    }

    /// Back to RECOVERING after losing operation: storages become PENDING, clients are
    /// disconnected, transactions not yet committed are forgotten (storages drop them).
    pub async fn restart_recovery(&mut self) {
        self.set_cluster_state(ClusterState::Recovering).await;
        for c in self.conns_of(&[NodeType::Client]) {
            if let Some(conn) = self.conns.get(&c) {
                conn.link.close().await;
            }
        }
        for c in self.conns_of(&[NodeType::Storage]) {
            self.notify(c, msg::StopOperation {}).await;
        }
        self.tm.reset();
        // Verification finishes every acknowledged commit on the readable cells before any
        // replication round can start again: what was missed before is above no target.
        self.missed.clear();
        self.recovery = crate::recovery::Recovery { startup_allowed: true, ..Default::default() };
        for nid in self.connected_storages() {
            self.set_node_state(nid, NodeState::Pending).await;
            if let Some(conn) = self.conn_of_node(nid) {
                self.recovery_storage_added(conn);
            }
        }
    }

    pub async fn handle_answer(&mut self, conn: ConnId, nid: Nid, kind: AskKind, result: Result<Body, LinkError>) {
        match kind {
            AskKind::Recovery => {
                if !self.recovery.asked.remove(&nid) || self.state != ClusterState::Recovering {
                    return;
                }
                match result.and_then(|b| proto::expect_answer!(b, AnswerRecovery)) {
                    Ok(a) => {
                        self.recovery.ptids.insert(nid, Ptid(a.ptid));
                        let best = self.pt.as_ref().map(|p| p.ptid).unwrap_or(Ptid(0));
                        if a.ptid > best.0 && !self.recovery.pt_requested {
                            self.recovery.pt_requested = true;
                            self.spawn_ask(conn, AskKind::PartitionTable, msg::AskPartitionTable {}.into());
                        }
                    }
                    Err(e) => warn!("recovery answer from {nid}: {e}"),
                }
                self.check_recovery().await;
            }
            AskKind::PartitionTable => {
                self.recovery.pt_requested = false;
                if self.state != ClusterState::Recovering {
                    return;
                }
                match result.and_then(|b| proto::expect_answer!(b, AnswerPartitionTable)) {
                    Ok(m) => match proto::convert::pt_from_msg(&m) {
                        Ok(pt) if self.pt.as_ref().is_none_or(|p| pt.ptid > p.ptid) => {
                            info!("partition table {} (ptid {}) from {nid}", pt.np(), pt.ptid);
                            self.pt = Some(pt);
                            self.save_pt().await;
                            // Its storages that are not back are known, and DOWN (as NEO shows
                            // them), before the table that names them.
                            let absent = self.register_absent_storages();
                            self.broadcast_nodes(&absent).await;
                            for c in self.conns_of(&[NodeType::Admin]) {
                                if let Some(pt) = &self.pt {
                                    self.notify(c, Body::SendPartitionTable(proto::convert::pt_to_msg(pt))).await;
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(e) => warn!("invalid partition table from {nid}: {e}"),
                    },
                    Err(e) => warn!("partition table from {nid}: {e}"),
                }
                // A storage may have reported a newer ptid meanwhile.
                let best = self.pt.as_ref().map(|p| p.ptid).unwrap_or(Ptid(0));
                if let Some((n, _)) = self.recovery.ptids.iter().find(|(_, p)| **p > best)
                    && let Some(c) = self.conn_of_node(*n)
                {
                    self.recovery.pt_requested = true;
                    self.spawn_ask(c, AskKind::PartitionTable, msg::AskPartitionTable {}.into());
                }
                self.check_recovery().await;
            }
            AskKind::LockedTransactions => self.verification_locked(nid, result).await,
            AskKind::LastIds => self.verification_last_ids(nid, result).await,
            AskKind::LockInformation { ttid, round } => self.lock_answered(ttid, round, nid, result).await,
            AskKind::FinalTid { ttid } => self.verification_final_tid(ttid, nid, result).await,
        }
    }

    /// Decide whether the cluster can leave RECOVERING.
    pub async fn check_recovery(&mut self) {
        if self.state != ClusterState::Recovering || self.stopping {
            return;
        }
        if !self.recovery.asked.is_empty() || self.recovery.pt_requested {
            return; // wait for every connected storage to report its partition table id
        }
        let pending: Vec<Nid> = self.connected_storages();
        let best_seen = self.recovery.ptids.values().max().copied().unwrap_or(Ptid(0));
        match &self.pt {
            Some(pt) if pt.ptid.0 > 0 => {
                if pt.ptid < best_seen {
                    return; // the newest table is still being fetched
                }
                let readable_nodes: BTreeSet<Nid> =
                    pt.rows().iter().flatten().filter(|c| c.state.is_readable()).map(|c| c.nid).collect();
                let missing: Vec<Nid> = readable_nodes.iter().copied().filter(|n| !pending.contains(n)).collect();
                let operational = pt.operational(|n| pending.contains(&n));
                if !operational {
                    let stale: Vec<String> = self
                        .recovery
                        .ptids
                        .iter()
                        .filter(|(_, p)| **p < pt.ptid)
                        .map(|(n, p)| format!("{n} has ptid {p}"))
                        .collect();
                    let mut why = format!(
                        "waiting for {} (readable cells of partition table ptid {} without which some partition has none)",
                        join(&missing),
                        pt.ptid
                    );
                    if !stale.is_empty() {
                        why.push_str(&format!("; older tables are not used: {}", stale.join(", ")));
                    }
                    return self.set_waiting(why).await;
                }
                if !missing.is_empty() && !self.recovery.startup_allowed {
                    let why = format!("waiting for {} (or `neoctl start` to start without them)", join(&missing));
                    return self.set_waiting(why).await;
                }
            }
            _ => {
                let enough = match self.cfg.autostart {
                    Some(n) => pending.len() >= n as usize,
                    None => false,
                };
                if pending.is_empty() || !(self.recovery.startup_allowed || enough) {
                    return;
                }
                match PartitionTable::make(self.cfg.partitions, self.cfg.replicas, &pending) {
                    Ok(pt) => {
                        info!("new cluster: {} partitions, {} replicas, storages {:?}", pt.np(), pt.replicas, pending);
                        self.pt = Some(pt);
                        self.save_pt().await;
                    }
                    Err(e) => {
                        warn!("cannot create partition table: {e}");
                        return;
                    }
                }
            }
        }
        self.start_verification().await;
    }

    /// Say (once) what RECOVERING waits for: in the log, and to the admin (`neoctl print
    /// cluster`).
    async fn set_waiting(&mut self, why: String) {
        if self.recovery.waiting == why {
            return;
        }
        warn!("{why}");
        self.recovery.waiting = why;
        let m = msg::NotifyClusterInformation { state: self.state as i32, detail: self.recovery.waiting.clone() };
        for c in self.conns_of(&[NodeType::Admin]) {
            self.notify(c, m.clone()).await;
        }
    }

    async fn start_verification(&mut self) {
        let pending = self.connected_storages();
        // Cells of storages that did not come back are out of date.
        let changes: Vec<_> = match &self.pt {
            Some(pt) => {
                pt.nodes().into_iter().filter(|n| !pending.contains(n)).flat_map(|n| pt.outdate_changes(n)).collect()
            }
            None => return,
        };
        if !changes.is_empty()
            && let Some(pt) = &mut self.pt
        {
            pt.commit_changes(&changes);
            self.save_pt().await;
        }
        if self.shutdown.is_cancelled() {
            return;
        }
        let pt_nodes = self.pt.as_ref().map(|p| p.nodes()).unwrap_or_default();
        for nid in pending.iter().filter(|n| pt_nodes.contains(n)) {
            self.set_node_state(*nid, NodeState::Running).await;
        }
        for nid in pt_nodes.iter().filter(|n| !pending.contains(n)) {
            if let Some(n) = self.nodes.get(nid)
                && n.info.state != NodeState::Down
            {
                self.set_node_state(*nid, NodeState::Down).await;
            }
        }
        self.set_cluster_state(ClusterState::Verifying).await;
        self.send_pt_to_all(false).await;
        self.recovery.verifying = self.running_storages().into_iter().collect();
        self.recovery.locked.clear();
        for nid in self.recovery.verifying.clone() {
            if let Some(c) = self.conn_of_node(nid) {
                self.spawn_ask(c, AskKind::LockedTransactions, msg::AskLockedTransactions {}.into());
            }
        }
        if self.recovery.verifying.is_empty() {
            self.restart_recovery().await;
        }
    }

    async fn verification_locked(&mut self, nid: Nid, result: Result<Body, LinkError>) {
        if self.state != ClusterState::Verifying || !self.recovery.verifying.remove(&nid) {
            return;
        }
        match result.and_then(|b| proto::expect_answer!(b, AnswerLockedTransactions)) {
            Ok(a) => {
                for t in a.transactions {
                    let e = self.recovery.locked.entry(Tid(t.ttid)).or_default();
                    if let Some(tid) = t.tid {
                        e.tid = Some(Tid(tid));
                        e.partitions.extend(t.partitions);
                        e.locked_on.insert(nid);
                    }
                    e.holders.insert(nid);
                }
            }
            Err(e) => {
                warn!("verification: {nid}: {e}");
                return self.restart_recovery().await;
            }
        }
        if !self.recovery.verifying.is_empty() {
            return;
        }
        // Look every transaction up on the storages that do not hold it: an unlocked one may
        // have committed elsewhere, and a locked one must be on every readable cell it writes.
        let storages = self.running_storages();
        for (ttid, u) in &self.recovery.locked {
            let others: BTreeSet<Nid> = storages.iter().copied().filter(|n| !u.holders.contains(n)).collect();
            if !others.is_empty() {
                self.recovery.final_pending.insert(*ttid, others);
            }
        }
        if self.recovery.final_pending.is_empty() {
            return self.validate_and_ask_last_ids().await;
        }
        for (ttid, nids) in &self.recovery.final_pending {
            for n in nids {
                if let Some(c) = self.conn_of_node(*n) {
                    let ttid = *ttid;
                    self.spawn_ask(c, AskKind::FinalTid { ttid }, msg::AskFinalTid { ttid: ttid.0 }.into());
                }
            }
        }
    }

    async fn verification_final_tid(&mut self, ttid: Tid, nid: Nid, result: Result<Body, LinkError>) {
        if self.state != ClusterState::Verifying {
            return;
        }
        let Some(pending) = self.recovery.final_pending.get_mut(&ttid) else { return };
        if !pending.remove(&nid) {
            return;
        }
        match result.and_then(|b| proto::expect_answer!(b, AnswerFinalTid)) {
            Ok(a) => {
                if let (Some(tid), Some(e)) = (a.tid, self.recovery.locked.get_mut(&ttid)) {
                    e.tid = Some(Tid(tid));
                    e.committed_on.insert(nid);
                }
            }
            Err(e) => {
                warn!("verification: {nid}: {e}");
                return self.restart_recovery().await;
            }
        }
        if self.recovery.final_pending.values().all(BTreeSet::is_empty) {
            self.recovery.final_pending.clear();
            self.validate_and_ask_last_ids().await;
        }
    }

    /// Decide every unfinished transaction, then ask the last TID/OID.
    ///
    /// Not locked anywhere: dropped (storages drop what did not lock at StartOperation).
    /// Locked somewhere: acknowledged only if every readable cell of every partition it writes
    /// locked it durably (a vote is not synced, the lock is; the master locks again on the
    /// survivors when it loses a storage before acknowledging, so the table they saved is the
    /// one of the acknowledgement). So if some readable cell has neither its lock nor its
    /// commit, it was never acknowledged and is dropped everywhere. Otherwise it is committed
    /// where it is locked, and dropped where it only voted: an unsynced vote may be older than
    /// the last one (a vote again after a relock or a conflict), and such a cell is not
    /// readable anyway. Committed on some storage means acknowledged: it is kept even then,
    /// and the readable cells without it are outdated. Locks written before they recorded
    /// partitions (no partitions known): committed everywhere it voted, as votes were synced.
    async fn validate_and_ask_last_ids(&mut self) {
        let mut outdate = Vec::new();
        for (ttid, u) in std::mem::take(&mut self.recovery.locked) {
            let Some(tid) = u.tid else {
                info!("verification: dropping unfinished transaction {ttid:?}");
                continue;
            };
            let (validate, drop): (Vec<Nid>, Vec<Nid>) = if u.partitions.is_empty() {
                (u.holders.iter().copied().collect(), Vec::new())
            } else {
                let lacking: Vec<(u32, Nid)> = match &self.pt {
                    Some(pt) => u
                        .partitions
                        .iter()
                        .flat_map(|p| pt.readable_cells(*p).map(move |c| (*p, c.nid)))
                        .filter(|(_, n)| !u.locked_on.contains(n) && !u.committed_on.contains(n))
                        .collect(),
                    None => Vec::new(),
                };
                if !lacking.is_empty() && u.committed_on.is_empty() {
                    warn!(
                        "verification: dropping transaction {ttid:?} (locked as {tid:?} on {:?}): the readable cells {lacking:?} did not lock it, so it was not acknowledged",
                        u.locked_on
                    );
                    (Vec::new(), u.holders.iter().copied().collect())
                } else {
                    if !lacking.is_empty() {
                        warn!(
                            "verification: {ttid:?} committed as {tid:?} but missing from cells {lacking:?}: outdating them"
                        );
                        outdate.extend(lacking);
                    }
                    (u.locked_on.iter().copied().collect(), u.holders.difference(&u.locked_on).copied().collect())
                }
            };
            if !validate.is_empty() {
                info!("verification: validating transaction {ttid:?} as {tid:?} on {validate:?}");
            }
            for n in validate {
                if let Some(c) = self.conn_of_node(n) {
                    self.notify(c, msg::ValidateTransaction { ttid: ttid.0, tid: tid.0 }).await;
                }
            }
            for n in drop {
                if let Some(c) = self.conn_of_node(n) {
                    self.notify(c, msg::DropTransaction { ttid: ttid.0 }).await;
                }
            }
        }
        self.outdate_cells(outdate).await;
        self.recovery.last_ids = self.running_storages().into_iter().collect();
        self.recovery.last_tid = None;
        self.recovery.last_oid = None;
        for nid in self.recovery.last_ids.clone() {
            if let Some(c) = self.conn_of_node(nid) {
                self.spawn_ask(c, AskKind::LastIds, msg::AskLastIds {}.into());
            }
        }
    }

    async fn verification_last_ids(&mut self, nid: Nid, result: Result<Body, LinkError>) {
        if self.state != ClusterState::Verifying || !self.recovery.last_ids.remove(&nid) {
            return;
        }
        match result.and_then(|b| proto::expect_answer!(b, AnswerLastIds)) {
            Ok(a) => {
                if let Some(t) = a.last_tid {
                    self.recovery.last_tid = self.recovery.last_tid.max(Some(Tid(t)));
                }
                if let Some(o) = a.last_oid {
                    self.recovery.last_oid = self.recovery.last_oid.max(Some(Oid(o)));
                }
            }
            Err(e) => {
                warn!("verification: {nid}: {e}");
                return self.restart_recovery().await;
            }
        }
        if !self.recovery.last_ids.is_empty() {
            return;
        }
        let last_tid = self.recovery.last_tid.unwrap_or(Tid::ZERO);
        let next_oid = self.recovery.last_oid.map(|o| Oid(o.0 + 1)).unwrap_or(Oid::ZERO);
        self.tm.recovered(last_tid, next_oid);
        info!("verification done: last tid {last_tid:?}, next oid {next_oid:?}");
        for nid in self.running_storages() {
            self.tm.storage_starting(nid);
            if let Some(c) = self.conn_of_node(nid) {
                self.notify(c, msg::StartOperation { backup: false }).await;
            }
        }
        self.set_cluster_state(ClusterState::Running).await;
        self.recovery.startup_allowed = false;
    }

    /// Outdate cells found without a committed transaction, keeping at least one readable cell
    /// per partition; they replicate from scratch.
    async fn outdate_cells(&mut self, mut cells: Vec<(u32, Nid)>) {
        let Some(pt) = &self.pt else { return };
        cells.sort_unstable();
        cells.dedup();
        let mut changes = Vec::new();
        for (p, n) in cells {
            let readable_left = pt
                .readable_cells(p)
                .filter(|c| !changes.iter().any(|ch: &CellChange| ch.partition == p && ch.nid == c.nid))
                .count();
            if readable_left > 1 {
                // Discarded then added again: the storage starts this cell from nothing, as it
                // lacks a transaction older than its last one (replicating from its last TID
                // would never copy it).
                changes.push(CellChange { partition: p, nid: n, state: CellState::Discarded });
                changes.push(CellChange { partition: p, nid: n, state: CellState::OutOfDate });
            }
        }
        self.commit_pt_changes(&changes).await;
        // Named in every full table until readable again (after the change: its Discarded
        // half clears the mark).
        self.reset_cells
            .extend(changes.iter().filter(|c| c.state == CellState::OutOfDate).map(|c| (c.partition, c.nid)));
    }

    /// A storage finished StartOperation.
    pub async fn handle_ready(&mut self, nid: Nid) {
        self.tm.storage_starting_done(nid);
        self.maybe_begin_delayed().await;
    }
}

fn join(nids: &[Nid]) -> String {
    nids.iter().map(Nid::to_string).collect::<Vec<_>>().join(", ")
}
