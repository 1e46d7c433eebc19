//! Two-phase commit: `Transaction`, new oids, stores (and checkCurrentSerial, deletions) sent
//! to every writable cell, votes queued behind them that collect every conflict and relock on
//! deadlock notifications, finish (its outcome recovered when the master is lost) and abort.

use super::{Client, is_storage_failure, remote, sha1};
use crate::codec::compress;
use crate::{ClientError, Result};
use neo_lib::{ErrorCode, Nid, Oid, Tid, lock};
use proto::{Link, LinkError, expect_answer, msg};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// OIDs asked from the master at a time.
const OID_BATCH: u32 = 100;
const ZERO_HASH: [u8; 20] = [0; 20];

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
pub(super) struct TxnShared {
    relocks: Mutex<Relocks>,
    changed: tokio::sync::Notify,
}

/// Outcome of one store sent to one storage.
struct StoreOutcome {
    oid: Oid,
    nid: Nid,
    partition: u32,
    /// checkCurrentSerial: nothing written.
    check: bool,
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
    /// Cells (partition, storage) that took a write of this transaction, and those that
    /// skipped one (no writable cell there): the master is told which cells took all of
    /// them, so that a cell that missed the transaction is caught up or outdated.
    stored_on: BTreeSet<(u32, Nid)>,
    skipped_on: BTreeSet<(u32, Nid)>,
    /// Per partition, the cells every write of this transaction to it was sent to (a cell
    /// added to the table after the first write missed that one, whatever it took later).
    targets: HashMap<u32, BTreeSet<Nid>>,
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

impl Client {
    // ------------------------------------------------------------------ begin and stores

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
            stored_on: BTreeSet::new(),
            skipped_on: BTreeSet::new(),
            targets: HashMap::new(),
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
        let (partition, cells) = self.write_cells(oid.0);
        if cells.is_empty() {
            return Err(ClientError::NoStorage(format!("oid {oid}: no writable cell")));
        }
        let check = m.check_only;
        if !check {
            narrow_targets(txn, partition, &cells);
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
                StoreOutcome { oid, nid, partition, check, serial, result }
            });
        }
        Ok(())
    }

    // ------------------------------------------------------------------ votes

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
        let (meta_partition, meta_cells) = self.write_cells(txn.ttid.0);
        let took_meta = |n: &Nid| {
            txn.voted_on.contains(n)
                && txn.stored_on.contains(&(meta_partition, *n))
                && !txn.skipped_on.contains(&(meta_partition, *n))
        };
        if !meta_cells.iter().any(took_meta) {
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
        let (meta_partition, meta_cells) = self.write_cells(txn.ttid.0);
        narrow_targets(txn, meta_partition, &meta_cells);
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
                    Ok(l) => l
                        .ask(m)
                        .await
                        .and_then(|b| expect_answer!(b, AnswerStoreTransaction))
                        .map(|a| (a.conflicts, Some(a.skipped))),
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
                        .map(|a| (a.conflicts, None)),
                    Err(e) => Err(e),
                };
                (nid, r)
            });
        }
        while let Some(r) = txn.stores.join_next().await {
            let Ok(o) = r else { continue };
            match o.result {
                Ok(a) if a.skipped => {
                    debug!("{} has no writable cell for {:?}", o.nid, o.oid);
                    txn.skipped_on.insert((o.partition, o.nid));
                }
                Ok(a) => match a.conflict {
                    None => {
                        *txn.locked.entry(o.oid).or_default() += 1;
                        if !o.check {
                            txn.stored_on.insert((o.partition, o.nid));
                        }
                    }
                    // Accepted without lock (OUT_OF_DATE cell): it votes, locks and unlocks to
                    // get the data.
                    Some(0) => {
                        if !o.check {
                            txn.stored_on.insert((o.partition, o.nid));
                        }
                    }
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
                Ok((conflicts, _)) if !conflicts.is_empty() => {
                    // The storage persisted nothing: resolve and vote again, or abort.
                    for c in conflicts {
                        let (oid, serial) = (Oid(c.oid), Tid(c.serial));
                        let read = txn.checked.contains_key(&oid);
                        add_conflict(txn, oid, serial, Tid(c.committed), read);
                    }
                }
                Ok((_, meta_skipped)) => {
                    txn.involved.insert(nid);
                    txn.voted_on.insert(nid);
                    match meta_skipped {
                        Some(true) => {
                            txn.skipped_on.insert((meta_partition, nid));
                        }
                        Some(false) => {
                            txn.stored_on.insert((meta_partition, nid));
                        }
                        None => {}
                    }
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

    // ------------------------------------------------------------------ finish and abort

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
            written: txn
                .stored_on
                .iter()
                .filter(|c| !txn.skipped_on.contains(c) && !txn.failed.contains(&c.1))
                .filter(|(p, n)| txn.targets.get(p).is_some_and(|t| t.contains(n)))
                .map(|&(partition, nid)| msg::CellId { partition, nid: nid.0 })
                .collect(),
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
}

/// Keep, as the cells that took every write to `partition`, only those also among `cells`
/// (the cells this write goes to).
fn narrow_targets(txn: &mut Transaction, partition: u32, cells: &[Nid]) {
    txn.targets
        .entry(partition)
        .and_modify(|t| t.retain(|n| cells.contains(n)))
        .or_insert_with(|| cells.iter().copied().collect());
}

/// Record a conflict (once per oid) with the data the transaction stored for that oid.
fn add_conflict(txn: &mut Transaction, oid: Oid, serial: Tid, committed: Tid, read: bool) {
    if txn.conflicts.iter().any(|c| c.oid == oid) {
        return;
    }
    let data = txn.objects.iter().find(|(o, _)| *o == oid).and_then(|(_, d)| d.clone());
    txn.conflicts.push(ConflictInfo { oid, serial, committed, read, data });
}

/// An older transaction waits for a lock we hold on that storage: unless we are finishing,
/// let it pass and take the lock back (the vote waits for this and votes again there).
pub(super) fn relock(shared: Arc<TxnShared>, nid: Nid, link: Link, m: msg::NotifyDeadlock) {
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
