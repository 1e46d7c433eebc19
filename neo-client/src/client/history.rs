//! The rest of the ZODB storage API: history, the undo log and undo, the iterator over
//! transactions, and pack. Listings ask every partition of one readable cell each, grouped by
//! storage, and retry another cell when a storage fails.

use super::loads::Record;
use super::{Client, is_storage_failure, remote};
use crate::{ClientError, Result};
use neo_lib::{ErrorCode, Nid, Oid, Tid, lock};
use proto::{Body, LinkError, expect_answer, msg};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use tokio::task::JoinSet;
use tracing::debug;

/// Transactions fetched per round trip by the iterator.
const ITERATOR_BATCH: u32 = 100;

/// One revision in `history`, newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub serial: Tid,
    /// Size of the record as stored.
    pub size: u64,
    pub user: Vec<u8>,
    pub description: Vec<u8>,
    pub extension: Vec<u8>,
}

/// Metadata of a committed transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnInfo {
    pub tid: Tid,
    pub user: Vec<u8>,
    pub description: Vec<u8>,
    pub extension: Vec<u8>,
    /// Older than a pack: some of its records may be gone.
    pub packed: bool,
    pub oids: Vec<Oid>,
}

/// One object record of a transaction, as the iterator returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataRecord {
    pub oid: Oid,
    pub tid: Tid,
    /// None for a deletion or an undone creation.
    pub data: Option<Vec<u8>>,
    /// The transaction whose data this record reuses (undo), if any.
    pub data_txn: Option<Tid>,
}

/// A transaction as the iterator returns it, with its records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransactionRecord {
    pub info: TxnInfo,
    pub records: Vec<DataRecord>,
}

/// What undoing a transaction means for one of its objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UndoPlan {
    pub oid: Oid,
    /// Serial currently committed.
    pub current: Tid,
    /// Serial whose data the object goes back to; None: the undone transaction created it.
    pub undo_serial: Option<Tid>,
    /// The current revision is the undone one (or has its data): no resolution needed.
    pub is_current: bool,
}

/// Iterator over committed transactions with start <= tid <= stop, oldest first, as of its
/// creation (later commits are not seen).
pub struct TxnIterator {
    client: Client,
    next_min: Tid,
    max: Tid,
    buffer: VecDeque<Tid>,
}

impl TxnIterator {
    /// The next transaction with its records (records packed away are skipped).
    pub async fn next(&mut self) -> Result<Option<TransactionRecord>> {
        if self.buffer.is_empty() && self.next_min <= self.max {
            self.fill().await?;
        }
        let Some(tid) = self.buffer.pop_front() else { return Ok(None) };
        let info = self.client.transaction_info(tid).await?;
        let mut records = Vec::with_capacity(info.oids.len());
        for oid in &info.oids {
            match self.client.load_record(*oid, Some(tid), None).await {
                Ok(Some(Record { data, data_serial, .. })) => {
                    records.push(DataRecord { oid: *oid, tid, data, data_txn: data_serial })
                }
                Ok(None) | Err(ClientError::NotFound(_)) => {} // packed away
                Err(e) => return Err(e),
            }
        }
        Ok(Some(TransactionRecord { info, records }))
    }

    async fn fill(&mut self) -> Result<()> {
        let (min, max) = (self.next_min, self.max);
        let answers = self
            .client
            .ask_partitions(
                |partitions| msg::AskTidsFrom { min: min.0, max: max.0, length: ITERATOR_BATCH, partitions }.into(),
                |b| expect_answer!(b, AnswerTidsFrom).map(|a| a.tids),
            )
            .await?;
        // A storage that returned a full batch may have more below the others' last ones: keep
        // only what is known complete.
        let bound = answers.iter().filter(|a| a.len() >= ITERATOR_BATCH as usize).filter_map(|a| a.last()).min();
        let mut tids: Vec<u64> = answers.iter().flatten().copied().filter(|t| bound.is_none_or(|b| t <= b)).collect();
        tids.sort_unstable();
        tids.dedup();
        self.next_min = match bound {
            Some(b) => Tid(*b).next(),
            None => self.max.next(),
        };
        self.buffer.extend(tids.into_iter().map(Tid));
        Ok(())
    }
}

impl Client {
    /// Ask one request per group of partitions, each group to one storage having them all
    /// readable, covering every partition once. Returns the parsed answers.
    async fn ask_partitions<T: Send + 'static>(
        &self,
        make: impl Fn(Vec<u32>) -> Body,
        parse: impl Fn(Body) -> std::result::Result<T, LinkError> + Send + Sync + Copy + 'static,
    ) -> Result<Vec<T>> {
        let known = lock(&self.0.state).pt.as_ref().map(|p| p.np());
        let np = match known {
            Some(np) => np,
            None => {
                self.sync().await?;
                lock(&self.0.state).pt.as_ref().map(|p| p.np()).unwrap_or(0)
            }
        };
        let mut remaining: BTreeSet<u32> = (0..np).collect();
        let mut excluded: BTreeSet<Nid> = BTreeSet::new();
        let mut out = Vec::new();
        for _attempt in 0..4 {
            if remaining.is_empty() {
                break;
            }
            let mut groups: BTreeMap<Nid, Vec<u32>> = BTreeMap::new();
            for p in &remaining {
                let nid = self.partition_candidates(*p).into_iter().find(|n| !excluded.contains(n));
                match nid {
                    Some(n) => groups.entry(n).or_default().push(*p),
                    None => return Err(ClientError::NoStorage(format!("partition {p}: no readable cell"))),
                }
            }
            let mut tasks = JoinSet::new();
            for (nid, partitions) in groups {
                let (client, body) = (self.clone(), make(partitions.clone()));
                tasks.spawn(async move {
                    let r = match client.storage_link(nid).await {
                        Ok(l) => l.ask(body).await.and_then(parse),
                        Err(e) => Err(e),
                    };
                    (nid, partitions, r)
                });
            }
            while let Some(r) = tasks.join_next().await {
                let Ok((nid, partitions, r)) = r else { continue };
                match r {
                    Ok(t) => {
                        for p in partitions {
                            remaining.remove(&p);
                        }
                        out.push(t);
                    }
                    Err(e) if is_storage_failure(&e) => {
                        debug!("listing on {nid} failed: {e}");
                        self.mark_failed(nid);
                        excluded.insert(nid);
                    }
                    Err(e) => return Err(remote(e)),
                }
            }
        }
        if let Some(p) = remaining.first() {
            return Err(ClientError::NoStorage(format!("partition {p}: every readable cell failed")));
        }
        Ok(out)
    }

    /// Ask a readable cell of partition(`id`), trying the next one on storage failures.
    pub(super) async fn ask_readable<T>(
        &self,
        id: u64,
        make: impl Fn() -> Body,
        parse: impl Fn(Body) -> std::result::Result<T, LinkError>,
    ) -> Result<T> {
        let mut last_err = String::from("no readable cell");
        for attempt in 0..2 {
            if attempt > 0 {
                self.sync().await?;
            }
            for nid in self.read_candidates(Oid(id)) {
                let link = match self.storage_link(nid).await {
                    Ok(l) => l,
                    Err(e) => {
                        self.mark_failed(nid);
                        last_err = e.to_string();
                        continue;
                    }
                };
                match link.ask(make()).await.and_then(&parse) {
                    Ok(t) => return Ok(t),
                    Err(e) if is_storage_failure(&e) => {
                        self.mark_failed(nid);
                        last_err = e.to_string();
                    }
                    Err(e) => return Err(remote(e)),
                }
            }
        }
        Err(ClientError::NoStorage(last_err))
    }

    /// Metadata of a committed transaction (`Remote` TID_NOT_FOUND if there is none).
    pub async fn transaction_info(&self, tid: Tid) -> Result<TxnInfo> {
        let a = self
            .ask_readable(
                tid.0,
                || msg::AskTransactionInformation { tid: tid.0 }.into(),
                |b| expect_answer!(b, AnswerTransactionInformation),
            )
            .await?;
        Ok(TxnInfo {
            tid: Tid(a.tid),
            user: a.user,
            description: a.description,
            extension: a.extension,
            packed: a.packed,
            oids: a.oids.into_iter().map(Oid).collect(),
        })
    }

    /// Up to `size` revisions of `oid`, newest first, with their transactions' metadata.
    /// `NotFound` if the object does not exist.
    pub async fn history(&self, oid: Oid, size: u32) -> Result<Vec<HistoryEntry>> {
        let a = self
            .ask_readable(
                oid.0,
                || msg::AskObjectHistory { oid: oid.0, offset: 0, length: size }.into(),
                |b| expect_answer!(b, AnswerObjectHistory),
            )
            .await
            .map_err(|e| match e {
                ClientError::Remote { code: ErrorCode::OidDoesNotExist, .. } => ClientError::NotFound(oid),
                e => e,
            })?;
        let mut out = Vec::with_capacity(a.history.len());
        for h in a.history {
            let serial = Tid(h.serial);
            let (user, description, extension) = match self.transaction_info(serial).await {
                Ok(t) => (t.user, t.description, t.extension),
                Err(ClientError::Remote { code: ErrorCode::TidNotFound, .. }) => Default::default(),
                Err(e) => return Err(e),
            };
            out.push(HistoryEntry { serial, size: h.size, user, description, extension });
        }
        Ok(out)
    }

    /// Undoable (not packed) transactions, newest first: skip `offset`, at most `length`.
    pub async fn undoable_tids(&self, offset: u32, length: u32) -> Result<Vec<Tid>> {
        let want = offset.saturating_add(length);
        let answers = self
            .ask_partitions(
                |partitions| msg::AskTids { offset: 0, length: want, partitions }.into(),
                |b| expect_answer!(b, AnswerTids).map(|a| a.tids),
            )
            .await?;
        let mut tids: Vec<u64> = answers.into_iter().flatten().collect();
        tids.sort_unstable_by(|a, b| b.cmp(a));
        tids.dedup();
        Ok(tids.into_iter().skip(offset as usize).take(length as usize).map(Tid).collect())
    }

    /// Iterate over committed transactions with start <= tid <= stop (both inclusive; stop
    /// defaults to, and is capped at, the last transaction now).
    pub fn iterator(&self, start: Option<Tid>, stop: Option<Tid>) -> TxnIterator {
        let last = self.last_transaction();
        let max = stop.map_or(last, |s| s.min(last));
        TxnIterator { client: self.clone(), next_min: start.unwrap_or(Tid::ZERO), max, buffer: VecDeque::new() }
    }

    /// What undoing transaction `undone` means for each of its objects, "current" being the
    /// last committed revision. `Undo` error if it cannot be undone (packed away, unknown).
    pub async fn undo_plan(&self, undone: Tid) -> Result<Vec<UndoPlan>> {
        let info = match self.transaction_info(undone).await {
            Ok(i) => i,
            Err(ClientError::Remote { code: ErrorCode::TidNotFound, .. }) => {
                return Err(ClientError::Undo("non-undoable transaction".into()));
            }
            Err(e) => return Err(e),
        };
        let before = self.last_transaction().next();
        let mut by_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        {
            let s = lock(&self.0.state);
            let Some(pt) = &s.pt else { return Err(ClientError::NoStorage("no partition table".into())) };
            for o in &info.oids {
                by_partition.entry(pt.partition_of(o.0)).or_default().push(o.0);
            }
        }
        let mut out = Vec::with_capacity(info.oids.len());
        for oids in by_partition.into_values() {
            let first = oids[0];
            let a = self
                .ask_readable(
                    first,
                    || {
                        msg::AskObjectUndoSerial { undone_tid: undone.0, before: Some(before.0), oids: oids.clone() }
                            .into()
                    },
                    |b| expect_answer!(b, AnswerObjectUndoSerial),
                )
                .await?;
            if a.objects.len() != oids.len() {
                return Err(ClientError::Undo("non-undoable transaction".into()));
            }
            // After a pack, the oldest revision left looks like a creation: undoing it would
            // delete the object.
            if info.packed && a.objects.iter().any(|u| u.undo_serial.is_none()) {
                return Err(ClientError::Undo("non-undoable transaction (packed)".into()));
            }
            out.extend(a.objects.into_iter().map(|u| UndoPlan {
                oid: Oid(u.oid),
                current: Tid(u.current),
                undo_serial: u.undo_serial.map(Tid),
                is_current: u.is_current,
            }));
        }
        Ok(out)
    }

    /// Store the undo of one object whose current revision is the undone one: the data of
    /// `undo_serial` again (with a back-pointer), or a deletion when it is None.
    pub async fn store_undo(
        &self,
        txn: &mut super::Transaction,
        oid: Oid,
        current: Tid,
        undo_serial: Option<Tid>,
    ) -> Result<()> {
        let Some(u) = undo_serial else { return self.delete_object(txn, oid, current) };
        match self.load_record(oid, Some(u), None).await? {
            Some(r) => self.store_with(txn, oid, current, r.data.as_deref(), Some(u)),
            None => Err(ClientError::Undo(format!("oid {oid}: revision {u} was packed away"))),
        }
    }

    /// Undo transaction `undone` within `txn`, resolving objects changed since with
    /// `resolve(oid, current serial, undone serial, data to go back to, current data)`.
    /// Returns the oids changed.
    pub async fn undo(
        &self,
        txn: &mut super::Transaction,
        undone: Tid,
        resolve: impl Fn(Oid, Tid, Tid, &[u8], &[u8]) -> Option<Vec<u8>>,
    ) -> Result<Vec<Oid>> {
        let plan = self.undo_plan(undone).await?;
        let mut oids = Vec::with_capacity(plan.len());
        for p in plan {
            if p.is_current {
                self.store_undo(txn, p.oid, p.current, p.undo_serial).await?;
            } else {
                let undo_data = match p.undo_serial {
                    Some(u) => self.load_record(p.oid, Some(u), None).await?.and_then(|r| r.data),
                    None => None,
                };
                let current = self.load_record(p.oid, Some(p.current), None).await?.and_then(|r| r.data);
                let resolved = match (undo_data, current) {
                    (Some(u), Some(c)) => resolve(p.oid, p.current, undone, &u, &c),
                    _ => None,
                };
                let Some(data) = resolved else {
                    return Err(ClientError::Undo(format!(
                        "oid {}: some data were modified by a later transaction",
                        p.oid
                    )));
                };
                self.store(txn, p.oid, p.current, &data)?;
            }
            oids.push(p.oid);
        }
        Ok(oids)
    }

    /// Pack: drop the revisions that were not current at `tid` (clamped to the last
    /// transaction). Returns once every storage is done; clears the cache.
    pub async fn pack(&self, tid: Tid) -> Result<Tid> {
        if self.0.cfg.read_only {
            return Err(ClientError::ReadOnly);
        }
        let a = self.ask_master(msg::AskPack { tid: tid.0 }.into()).await?;
        let a = expect_answer!(a, AnswerPack).map_err(remote)?;
        self.clear_cache();
        Ok(Tid(a.tid))
    }

    /// Data and data_txn of one revision as stored (None data: deletion), or None if absent.
    pub async fn load_revision(&self, oid: Oid, serial: Tid) -> Result<Option<(Option<Vec<u8>>, Option<Tid>)>> {
        Ok(self.load_record(oid, Some(serial), None).await?.map(|r| (r.data, r.data_serial)))
    }
}
