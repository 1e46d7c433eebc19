//! The storage backend interface. It knows nothing of any database driver: one module per engine
//! (`sqlite`, `mysql`) implements `Backend`, and one conformance suite (`tests` below) runs
//! against every engine.
//!
//! Backends are synchronous; the node calls them only from the database thread (`crate::db`),
//! never from async worker threads.
//!
//! Commit discipline: `set_config`, `save_pt`, `drop_unfinished` and `pack` are durable when
//! they return; `vote`, `vote_data` and `lock` are durable after the following `sync`. The node
//! answers a vote without syncing and a lock only after it (grouping the syncs of concurrent
//! transactions): commits reach the disk in order, so a durable lock makes its vote durable
//! too, and a vote lost in a crash is one no storage acknowledged the commit of (verification
//! then drops it, see the master's recovery). `unlock` and `abort` need not be durable: a lost
//! unlock is replayed by verification from the durable lock, a lost abort by `drop_unfinished`.

mod common;
pub mod mysql;
pub mod sqlite;
#[cfg(test)]
mod tests;

use neo_lib::pt::PartitionTable;
use neo_lib::{Oid, Tid};

/// A transaction with temporary data, as verification sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockedTxn {
    pub ttid: Tid,
    /// The final tid once locked.
    pub tid: Option<Tid>,
    /// Every partition the transaction writes, as its lock recorded them (empty if not locked
    /// or unknown).
    pub partitions: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("database error: {0}")]
    Db(String),
    #[error("corrupt database: {0}")]
    Corrupt(String),
    #[error("database belongs to cluster {found:?}, not {expected:?}")]
    WrongCluster { found: String, expected: String },
    #[error("database schema version {found} is newer than this program supports ({supported})")]
    SchemaTooNew { found: u32, supported: u32 },
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// Identifier of a row of the data table (deduplicated by checksum and compression).
pub type DataId = i64;

/// One stored record as returned by a load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRecord {
    /// TID of this revision.
    pub serial: Tid,
    /// TID of the next revision of the object, if any.
    pub next_serial: Option<Tid>,
    /// 0 raw, 1 zlib. 0 with empty data and a zero checksum for a deletion.
    pub compression: u32,
    /// SHA-1 of `data` (20 bytes), 20 zero bytes for a deletion.
    pub checksum: Vec<u8>,
    pub data: Vec<u8>,
    /// For undo back-pointers: TID whose data this revision reuses.
    pub data_serial: Option<Tid>,
}

/// Outcome of a load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Load {
    Found(ObjectRecord),
    /// The object exists but has no revision matching the request (e.g. created later).
    NotFound,
    /// No revision of this object at all.
    DoesNotExist,
}

/// An object of a transaction being voted: `data_id` None means deletion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TempObject {
    pub oid: Oid,
    pub data_id: Option<DataId>,
    pub data_serial: Option<Tid>,
}

/// New data of an object being voted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewData {
    /// SHA-1 of `data` (20 bytes).
    pub checksum: Vec<u8>,
    /// 0 raw, 1 zlib.
    pub compression: u32,
    pub data: Vec<u8>,
}

/// An object of a transaction being voted, with its data: `data` None means deletion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewObject {
    pub oid: Oid,
    pub data: Option<NewData>,
    pub data_serial: Option<Tid>,
}

/// Transaction metadata, stored by the cells of partition(ttid).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TxnMeta {
    pub user: Vec<u8>,
    pub description: Vec<u8>,
    pub extension: Vec<u8>,
    /// Every oid of the transaction (also those stored on other partitions).
    pub oids: Vec<Oid>,
}

/// Committed transaction metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnInfo {
    pub tid: Tid,
    pub ttid: Tid,
    pub packed: bool,
    pub meta: TxnMeta,
}

/// What undoing a revision needs to know about one object (NEO's `findUndoTID`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UndoInfo {
    /// Serial of the newest revision of the object before the snapshot.
    pub current: Tid,
    /// Serial whose data the object goes back to (the revision before the undone one, following
    /// its back-pointer to the revision that really holds the data); None when the undone
    /// revision created the object (undoing it deletes the object).
    pub undo_serial: Option<Tid>,
    /// True if the current revision has the same data as the undone one (the current revision
    /// is the undone one, or a back-pointer to its data): the undo needs no conflict resolution.
    pub is_current: bool,
}

/// A committed object revision as replication copies it from one cell to another: `data`
/// None is a deletion; the data is as stored (compressed or not, with its checksum).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplObject {
    pub oid: Oid,
    pub tid: Tid,
    pub data: Option<NewData>,
    /// Undo back-pointer: the TID whose data this revision reuses.
    pub data_serial: Option<Tid>,
}

/// How far an OUT_OF_DATE cell has caught up, saved with what replication wrote so that an
/// interrupted replication resumes where it stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReplProgress {
    /// Every committed transaction (metadata) of the partition with `tid < next_trans` is here.
    pub next_trans: Tid,
    /// Every committed object revision of the partition with `(tid, oid) < next_obj` is here.
    pub next_obj: (Tid, Oid),
    /// Where the current round started: a round whose source turned out to be stale (the
    /// master refuses its end) starts again from here.
    pub base_trans: Tid,
    pub base_obj: (Tid, Oid),
}

impl ReplProgress {
    /// Nothing of the partition is known to be here.
    pub const ZERO: ReplProgress = ReplProgress {
        next_trans: Tid::ZERO,
        next_obj: (Tid::ZERO, Oid::ZERO),
        base_trans: Tid::ZERO,
        base_obj: (Tid::ZERO, Oid::ZERO),
    };

    /// Everything up to `tid` included is here.
    pub fn after(tid: Tid) -> ReplProgress {
        let next = tid.next();
        ReplProgress { next_trans: next, next_obj: (next, Oid::ZERO), base_trans: next, base_obj: (next, Oid::ZERO) }
    }
}

/// The interface every storage engine implements.
pub trait Backend: Send {
    /// Engine name for logs ("SQLite").
    fn engine(&self) -> &'static str;

    // --- configuration (keys: "name" (cluster), "nid", "ptid", "replicas", "partitions", ...)
    fn get_config(&mut self, key: &str) -> Result<Option<String>>;
    /// `None` deletes the key. Durable on return.
    fn set_config(&mut self, key: &str, value: Option<&str>) -> Result<()>;

    // --- partition table
    /// The stored table (ptid, replicas, every cell), or None if never saved.
    fn load_pt(&mut self) -> Result<Option<PartitionTable>>;
    /// Replace the stored table by `pt`. Durable on return.
    fn save_pt(&mut self, pt: &PartitionTable) -> Result<()>;

    // --- reads
    /// Highest committed TID and highest OID in committed *and* voted data.
    fn last_ids(&mut self) -> Result<(Option<Tid>, Option<Oid>)>;
    /// Load a revision of `oid` (partition `partition`): `at` = exact serial, `before` = newest
    /// revision with serial < before; neither = newest revision.
    fn load(&mut self, partition: u32, oid: Oid, at: Option<Tid>, before: Option<Tid>) -> Result<Load>;
    /// Serial of the newest committed revision of `oid`, None if the object does not exist.
    fn last_serial(&mut self, partition: u32, oid: Oid) -> Result<Option<Tid>>;
    /// `last_serial` of each object, in order (an engine with a server answers in one request).
    fn last_serials(&mut self, objects: &[(u32, Oid)]) -> Result<Vec<Option<Tid>>> {
        objects.iter().map(|(partition, oid)| self.last_serial(*partition, *oid)).collect()
    }
    /// Committed transaction metadata by final tid.
    fn transaction(&mut self, partition: u32, tid: Tid) -> Result<Option<TxnInfo>>;
    /// Committed revisions of `oid` (partition `partition`), newest first, skipping the first
    /// `offset` and returning at most `length`: (serial, size in bytes of the data as stored;
    /// 0 for a deletion). Empty if the object does not exist.
    fn object_history(&mut self, partition: u32, oid: Oid, offset: u32, length: u32) -> Result<Vec<(Tid, u64)>>;
    /// Committed transactions whose metadata is in one of `partitions` and that were not packed,
    /// newest first, skipping `offset`, at most `length` (the undo log).
    fn tids(&mut self, partitions: &[u32], offset: u32, length: u32) -> Result<Vec<Tid>>;
    /// Committed transactions whose metadata is in one of `partitions`, packed or not, with
    /// `min <= tid <= max`, oldest first, at most `length` (the iterator).
    fn tids_from(&mut self, partitions: &[u32], min: Tid, max: Tid, length: u32) -> Result<Vec<Tid>>;
    /// Undo information for `oid` and the revision `undone` (see `UndoInfo`), with "current"
    /// meaning the newest revision with serial < `before` (newest of all if None). None if the
    /// object has no revision `undone` (not part of that transaction, or packed away) or no
    /// revision before `before`.
    fn undo_info(&mut self, partition: u32, oid: Oid, undone: Tid, before: Option<Tid>) -> Result<Option<UndoInfo>>;
    /// Pack `partitions` at `tid`: for every object, delete the revisions older than its newest
    /// revision with serial <= `tid`, and that revision too if it is a deletion (the object is
    /// then gone); mark the metadata of transactions <= `tid` as packed (kept, hidden from
    /// `tids`); delete data rows nothing references any more (neither committed nor temporary
    /// objects, nor held data). Idempotent; durable on return. Never touches temporary data.
    fn pack(&mut self, partitions: &[u32], tid: Tid) -> Result<()>;

    // --- commit path
    /// Insert a data row (or reuse an identical one: same checksum and compression) for an
    /// object of partition `partition`. Not necessarily durable until the following `vote`.
    fn store_data(&mut self, partition: u32, checksum: &[u8], compression: u32, data: &[u8]) -> Result<DataId>;
    /// Persist a transaction as temporary data: `objects` (each with its partition computed by
    /// the caller) keyed by `ttid`, plus metadata when this node holds partition(ttid).
    /// Calling vote twice for the same ttid adds objects. Durable after `sync`.
    fn vote(&mut self, ttid: Tid, objects: &[(u32, TempObject)], meta: Option<(u32, &TxnMeta)>) -> Result<()>;
    /// `store_data` for each object, then `vote`, as one unit: what the node calls at vote
    /// time. Engines override it to write everything in one database transaction.
    fn vote_data(&mut self, ttid: Tid, objects: &[(u32, NewObject)], meta: Option<(u32, &TxnMeta)>) -> Result<()> {
        let mut temp = Vec::with_capacity(objects.len());
        let mut ids = Vec::new();
        for (partition, o) in objects {
            let data_id = match &o.data {
                Some(d) => match self.store_data(*partition, &d.checksum, d.compression, &d.data) {
                    Ok(id) => {
                        ids.push(id);
                        Some(id)
                    }
                    Err(e) => {
                        let _ = self.release_data(&ids);
                        return Err(e);
                    }
                },
                None => None,
            };
            temp.push((*partition, TempObject { oid: o.oid, data_id, data_serial: o.data_serial }));
        }
        let r = self.vote(ttid, &temp, meta);
        if r.is_err() {
            let _ = self.release_data(&ids);
        }
        r
    }
    /// Make every commit done so far durable (one fsync for all of them).
    fn sync(&mut self) -> Result<()>;
    /// Start writing to disk what was committed since the last `sync` or call, without waiting
    /// and without making anything durable, so that the next `sync` (the commit's critical
    /// path) has less left to write. A hint the database thread gives, maybe many times, when
    /// it has nothing queued: cheap when nothing is due. Errors are left to `sync`. Returns
    /// whether it started writes.
    fn start_writeback(&mut self) -> bool {
        false
    }
    /// Whether the backend deferred work that `idle` finishes (MySQL: unlocks not committed
    /// yet, which the next commit would commit with its own writes).
    fn has_deferred(&self) -> bool {
        false
    }
    /// The database thread has had nothing to do for a while (see `db::DEFER_FOR`) and goes
    /// to sleep, or stops: finish what the backend deferred. Errors are left to the next call.
    fn idle(&mut self) {}
    /// Open a database transaction that the next writes join, until `commit_batch` (each
    /// method's own transaction becomes a savepoint in it: a method that fails undoes only its
    /// own changes), if the backend can. Returns whether one was opened. While it is open,
    /// nothing written is visible to other connections.
    fn begin_batch(&mut self) -> bool {
        false
    }
    /// Commit the transaction opened by `begin_batch`; if that fails, it is rolled back.
    fn commit_batch(&mut self) -> Result<()> {
        Ok(())
    }
    /// Record the commit decision: the final tid of `ttid`, and every partition the transaction
    /// writes (kept from an earlier lock when empty). Durable after `sync`.
    fn lock(&mut self, ttid: Tid, tid: Tid, partitions: &[u32]) -> Result<()>;
    /// Make the transaction permanent under `tid`: temporary objects and metadata become
    /// committed. Idempotent. Not necessarily durable on return (see the commit discipline).
    fn unlock(&mut self, ttid: Tid, tid: Tid) -> Result<()>;
    /// Delete the temporary data of `ttid` (no-op if unknown) and unreferenced data rows.
    fn abort(&mut self, ttid: Tid) -> Result<()>;
    /// Transactions with temporary data, in ttid order.
    fn locked_transactions(&mut self) -> Result<Vec<LockedTxn>>;
    /// Final tid of a committed transaction, looked up by its ttid.
    fn final_tid(&mut self, ttid: Tid) -> Result<Option<Tid>>;
    /// Delete all temporary data of transactions that were not locked, and unreferenced data.
    fn drop_unfinished(&mut self) -> Result<()>;
    /// Give back data ids returned by `store_data` for a transaction aborted before its vote,
    /// so that the following `abort` can delete them if nothing else uses them.
    fn release_data(&mut self, ids: &[DataId]) -> Result<()>;

    // --- replication (an OUT_OF_DATE cell copies what it missed from a readable cell)
    /// Greatest TID of a committed transaction (metadata) or object revision of `partition`;
    /// None if it has none. Temporary data does not count.
    fn partition_last_tid(&mut self, partition: u32) -> Result<Option<Tid>>;
    /// Committed transactions (metadata) of `partition` with `min <= tid <= max`, packed or
    /// not, oldest first, at most `length`.
    fn fetch_transactions(&mut self, partition: u32, min: Tid, max: Tid, length: u32) -> Result<Vec<TxnInfo>>;
    /// Committed object revisions of `partition` with `(tid, oid) >= min` and `tid <= max`,
    /// ordered by `(tid, oid)`, at most `length`, and stopping before the record that would
    /// take the total size of their data past `max_bytes` (the first record is always
    /// returned, whatever its size).
    fn fetch_objects(
        &mut self,
        partition: u32,
        min: (Tid, Oid),
        max: Tid,
        length: u32,
        max_bytes: usize,
    ) -> Result<Vec<ReplObject>>;
    /// Write replicated transactions and object revisions of `partition` (replacing a row with
    /// the same key: a transaction the cell also received directly is written twice, with the
    /// same content) and save `progress` for the partition, as one unit: after a crash either
    /// all of it is there or none. Durable after the following `sync`.
    fn store_replicated(
        &mut self,
        partition: u32,
        transactions: &[TxnInfo],
        objects: &[ReplObject],
        progress: &ReplProgress,
    ) -> Result<()>;
    /// The saved progress of the replication of `partition`, None if none is saved.
    fn replication_progress(&mut self, partition: u32) -> Result<Option<ReplProgress>>;
    /// Save (or, with None, forget) the progress of the replication of `partition`. Durable
    /// on return.
    fn set_replication_progress(&mut self, partition: u32, progress: Option<&ReplProgress>) -> Result<()>;
    /// Delete every committed transaction and object revision of `partition` (and the data
    /// rows nothing references any more): the cell was dropped, or starts again from nothing.
    /// Temporary data is not touched. Durable on return.
    fn purge_partition(&mut self, partition: u32) -> Result<()>;
}
