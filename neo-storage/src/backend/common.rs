//! Helpers shared by every engine: id conversions, oid lists, validation of stored values.

use super::{BackendError, ReplObject, ReplProgress, Result, TxnInfo};
use neo_lib::{Oid, Tid};

/// Length of a SHA-1 checksum.
pub(crate) const CHECKSUM_LEN: usize = 20;

pub(crate) fn check_data_args(checksum: &[u8], compression: u32) -> Result<()> {
    if checksum.len() != CHECKSUM_LEN {
        return Err(BackendError::Db(format!("data: checksum of {} bytes, expected {CHECKSUM_LEN}", checksum.len())));
    }
    if compression > 1 {
        return Err(BackendError::Db(format!("data: unknown compression {compression}")));
    }
    Ok(())
}

pub(crate) fn compression_of(v: i64, what: &dyn Fn() -> String) -> Result<u32> {
    match v {
        0 | 1 => Ok(v as u32),
        _ => Err(corrupt(format!("{}: unknown compression {v}", what()))),
    }
}

pub(crate) fn corrupt(msg: impl Into<String>) -> BackendError {
    BackendError::Corrupt(msg.into())
}

pub(crate) fn decode_oids(blob: &[u8], what: &dyn Fn() -> String) -> Result<Vec<Oid>> {
    if !blob.len().is_multiple_of(8) {
        return Err(corrupt(format!("{}: oid list of {} bytes is not a multiple of 8", what(), blob.len())));
    }
    Ok(blob
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            Oid(u64::from_be_bytes(b))
        })
        .collect())
}

pub(crate) fn encode_oids(oids: &[Oid]) -> Vec<u8> {
    oids.iter().flat_map(|o| o.to_bytes()).collect()
}

/// The partition list a lock records (`ttrans.lock_partitions`): 4 big-endian bytes each;
/// NULL (None) when empty.
pub(crate) fn encode_partitions(partitions: &[u32]) -> Option<Vec<u8>> {
    (!partitions.is_empty()).then(|| partitions.iter().flat_map(|p| p.to_be_bytes()).collect())
}

pub(crate) fn decode_partitions(blob: &[u8], what: &dyn Fn() -> String) -> Result<Vec<u32>> {
    if !blob.len().is_multiple_of(4) {
        return Err(corrupt(format!("{}: partition list of {} bytes is not a multiple of 4", what(), blob.len())));
    }
    Ok(blob.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Bind value of a u64 id (bit cast, as stored).
pub(crate) fn id64(v: u64) -> i64 {
    v as i64
}

pub(crate) fn tid_of(v: i64, col: &str, what: &dyn Fn() -> String) -> Result<Tid> {
    u64::try_from(v).map(Tid).map_err(|_| corrupt(format!("{}: column {col} holds a negative TID ({v})", what())))
}

/// Data rows handed out by `store_data` that no vote references yet, with how many times each
/// was handed out (two transactions may store identical data and get the same deduplicated
/// row). Pruning never deletes a held row, so the data of a transaction still being stored
/// survives the abort of another transaction sharing it. A vote drops one hold per voted
/// object; `release` (data of a transaction aborted before its vote) drops one too and makes
/// the row a candidate for the next prune (`abort`). Data ids are never reused, so a stale hold
/// cannot protect a new row.
#[derive(Debug, Default)]
pub(crate) struct HeldData {
    held: std::collections::HashMap<super::DataId, u32>,
    released: std::collections::HashSet<super::DataId>,
}

impl HeldData {
    /// `store_data` handed out `id`.
    pub(crate) fn hold(&mut self, id: super::DataId) {
        *self.held.entry(id).or_insert(0) += 1;
        self.released.remove(&id);
    }

    fn drop_hold(&mut self, id: super::DataId, release: bool) {
        if let Some(n) = self.held.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&id);
                if release {
                    self.released.insert(id);
                }
            }
        }
    }

    /// A vote now references these rows.
    pub(crate) fn voted(&mut self, ids: impl IntoIterator<Item = super::DataId>) {
        for id in ids {
            self.drop_hold(id, false);
        }
    }

    /// The transaction holding these rows was aborted before its vote.
    pub(crate) fn release(&mut self, ids: &[super::DataId]) {
        for id in ids {
            self.drop_hold(*id, true);
        }
    }

    pub(crate) fn is_held(&self, id: super::DataId) -> bool {
        self.held.contains_key(&id)
    }

    /// Rows released and not pruned yet: candidates for pruning.
    pub(crate) fn released(&self) -> Vec<super::DataId> {
        self.released.iter().copied().collect()
    }

    /// The released rows were pruned (kept until then, so a failed prune is retried).
    pub(crate) fn clear_released(&mut self) {
        self.released.clear();
    }

    pub(crate) fn len(&self) -> usize {
        self.held.len()
    }

    /// No transaction is in flight any more.
    pub(crate) fn clear(&mut self) {
        self.held.clear();
        self.released.clear();
    }
}

// --- history, undo and pack

/// `partitions` sorted, without duplicates.
pub(crate) fn distinct_partitions(partitions: &[u32]) -> Vec<u32> {
    let mut p = partitions.to_vec();
    p.sort_unstable();
    p.dedup();
    p
}

/// `partitions` as an SQL list for `IN (...)` ("0, 3, 5": sorted, without duplicates), None if
/// empty. The numbers are written into the statement (they are integers, nothing to escape):
/// the list has no length limit, unlike bound parameters.
pub(crate) fn partition_list(partitions: &[u32]) -> Option<String> {
    let p = distinct_partitions(partitions);
    if p.is_empty() {
        return None;
    }
    Some(p.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))
}

/// `tids` and `tids_from` read each partition in TID order along its primary key, at most this
/// many rows (enough for the `offset`/`length` window of the union), and `merge_tids` the lists:
/// a few index rows per partition instead of sorting every transaction of the partitions.
pub(crate) fn window_end(offset: u32, length: u32) -> u64 {
    u64::from(offset) + u64::from(length)
}

/// The `offset`/`length` window of the union of per-partition TID lists (see `window_end`):
/// newest first for the undo log, oldest first for the iterator.
pub(crate) fn merge_tids(mut tids: Vec<Tid>, newest_first: bool, offset: u32, length: u32) -> Vec<Tid> {
    if newest_first {
        tids.sort_unstable_by(|a, b| b.cmp(a));
    } else {
        tids.sort_unstable();
    }
    tids.into_iter().skip(offset as usize).take(length as usize).collect()
}

/// Bind value of an inclusive upper TID bound: TIDs above the largest storable one include
/// every stored TID.
pub(crate) fn tid_upper(tid: Tid) -> i64 {
    id64(tid.0.min(Tid::MAX.0))
}

/// The inclusive `(min, max)` bind values of `min <= tid <= max`, None if no stored TID can
/// match.
pub(crate) fn tid_range(min: Tid, max: Tid) -> Option<(i64, i64)> {
    if min > max || min > Tid::MAX {
        return None;
    }
    Some((id64(min.0), tid_upper(max)))
}

/// Bind value of the inclusive upper bound of "current" for `undo_info`: `tid < before`, or
/// every TID when `before` is None; None if no TID is below `before`.
pub(crate) fn undo_current_max(before: Option<Tid>) -> Option<i64> {
    match before {
        None => Some(tid_upper(Tid::MAX)),
        Some(b) => b.0.checked_sub(1).map(|m| tid_upper(Tid(m))),
    }
}

/// A stored size (`LENGTH(value)`, `value_size`) as a history size.
pub(crate) fn size_of(v: i64, what: &dyn Fn() -> String) -> Result<u64> {
    u64::try_from(v).map_err(|_| corrupt(format!("{}: negative data size {v}", what())))
}

/// One revision as `undo_info` sees it: its serial and its back-pointer (`value_tid`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Revision {
    pub(crate) tid: Tid,
    pub(crate) value_tid: Option<Tid>,
}

impl Revision {
    /// The serial whose data this revision has: its back-pointer if any, else itself (a
    /// deletion without back-pointer resolves to itself too).
    fn data_serial(self) -> Tid {
        self.value_tid.unwrap_or(self.tid)
    }
}

/// Which revision a row of an engine's `undo_info` query is (its first column).
pub(crate) const UNDO_CURRENT: i64 = 0;
pub(crate) const UNDO_UNDONE: i64 = 1;
pub(crate) const UNDO_PREVIOUS: i64 = 2;

/// The revisions `undo_info` looks at, filled from the rows of an engine's query.
#[derive(Debug, Default)]
pub(crate) struct UndoRevisions {
    /// Newest revision before the snapshot.
    pub(crate) current: Option<Revision>,
    /// The undone revision.
    pub(crate) undone: Option<Revision>,
    /// The revision just before the undone one.
    pub(crate) previous: Option<Revision>,
}

impl UndoRevisions {
    /// Record a row tagged `kind` (`UNDO_CURRENT`, ...).
    pub(crate) fn set(&mut self, kind: i64, rev: Revision, what: &dyn Fn() -> String) -> Result<()> {
        let slot = match kind {
            UNDO_CURRENT => &mut self.current,
            UNDO_UNDONE => &mut self.undone,
            UNDO_PREVIOUS => &mut self.previous,
            _ => return Err(BackendError::Db(format!("{}: unexpected row kind {kind}", what()))),
        };
        *slot = Some(rev);
        Ok(())
    }

    /// NEO's `findUndoTID`: None without a current or an undone revision. The data the undo
    /// goes back to is that of the previous revision, through its back-pointer (if the previous
    /// revision is a deletion, its own serial: the undo restores a deleted state); None if the
    /// undone revision created the object. The undo is "current" if the current revision has
    /// the same data as the undone one.
    pub(crate) fn info(self) -> Option<super::UndoInfo> {
        let (current, undone) = (self.current?, self.undone?);
        Some(super::UndoInfo {
            current: current.tid,
            undo_serial: self.previous.map(Revision::data_serial),
            is_current: current.data_serial() == undone.data_serial(),
        })
    }
}

// --- replication

/// The `packed` column of a `trans` row.
pub(crate) fn packed_of(v: i64, what: &dyn Fn() -> String) -> Result<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(corrupt(format!("{}: invalid packed flag {v}", what()))),
    }
}

/// A stored checksum, checked to be a SHA-1.
pub(crate) fn stored_checksum(checksum: Vec<u8>, what: &dyn Fn() -> String) -> Result<Vec<u8>> {
    if checksum.len() != CHECKSUM_LEN {
        return Err(corrupt(format!("{}: checksum of {} bytes, expected {CHECKSUM_LEN}", what(), checksum.len())));
    }
    Ok(checksum)
}

/// The inclusive bind values of `(tid, oid) >= min AND tid <= max` for `fetch_objects`:
/// (min tid, min oid, max tid), None if no stored revision can match. Oids are compared as
/// stored (the `as i64` bit cast; oids stay below 2^63).
pub(crate) fn object_range(min: (Tid, Oid), max: Tid) -> Option<(i64, i64, i64)> {
    let (min_tid, max_tid) = tid_range(min.0, max)?;
    Some((min_tid, id64(min.1.0), max_tid))
}

/// The size limit of a `fetch_objects` answer: rows are taken while their data fits in
/// `max_bytes`, the first one whatever its size.
#[derive(Debug)]
pub(crate) struct FetchBudget {
    max_bytes: u64,
    used: u64,
    rows: usize,
}

impl FetchBudget {
    pub(crate) fn new(max_bytes: usize) -> FetchBudget {
        FetchBudget { max_bytes: u64::try_from(max_bytes).unwrap_or(u64::MAX), used: 0, rows: 0 }
    }

    /// Whether a row with `size` bytes of data is taken (if not, the answer ends before it).
    pub(crate) fn take(&mut self, size: u64) -> bool {
        let used = self.used.saturating_add(size);
        if self.rows > 0 && used > self.max_bytes {
            return false;
        }
        self.used = used;
        self.rows += 1;
        true
    }
}

/// Check what `store_replicated` is given before writing any of it: every TID storable, data
/// with a SHA-1 and a known compression.
pub(crate) fn check_replicated(transactions: &[TxnInfo], objects: &[ReplObject]) -> Result<()> {
    let storable = |tid: Tid, what: &dyn Fn() -> String| {
        if tid > Tid::MAX {
            return Err(BackendError::Db(format!("{}: TID {tid} is too large to be stored", what())));
        }
        Ok(())
    };
    for t in transactions {
        storable(t.tid, &|| format!("replicated transaction {}", t.tid))?;
        storable(t.ttid, &|| format!("replicated transaction {} (ttid)", t.tid))?;
    }
    for o in objects {
        let what = || format!("replicated object {} revision {}", o.oid, o.tid);
        storable(o.tid, &what)?;
        if let Some(s) = o.data_serial {
            storable(s, &what)?;
        }
        if let Some(d) = &o.data {
            check_data_args(&d.checksum, d.compression).map_err(|e| BackendError::Db(format!("{}: {e}", what())))?;
        }
    }
    Ok(())
}

/// The `config` key holding the saved progress of the replication of `partition`.
pub(crate) fn progress_key(partition: u32) -> String {
    format!("replication.{partition}")
}

/// A `ReplProgress` as saved: six hexadecimal numbers, "next_trans next_obj.tid next_obj.oid
/// base_trans base_obj.tid base_obj.oid".
pub(crate) fn encode_progress(p: &ReplProgress) -> String {
    format!(
        "{:016x} {:016x} {:016x} {:016x} {:016x} {:016x}",
        p.next_trans.0, p.next_obj.0.0, p.next_obj.1.0, p.base_trans.0, p.base_obj.0.0, p.base_obj.1.0
    )
}

/// Parse a progress saved by `encode_progress` under `key`; anything else is corruption.
pub(crate) fn decode_progress(key: &str, value: &str) -> Result<ReplProgress> {
    let bad = || corrupt(format!("config {key:?}: invalid replication progress {value:?}"));
    let mut numbers = [0u64; 6];
    let mut fields = value.split(' ');
    for n in &mut numbers {
        let field = fields.next().ok_or_else(bad)?;
        if field.is_empty() || field.len() > 16 || !field.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *n = u64::from_str_radix(field, 16).map_err(|_| bad())?;
    }
    if fields.next().is_some() {
        return Err(bad());
    }
    let [next_trans, next_tid, next_oid, base_trans, base_tid, base_oid] = numbers;
    Ok(ReplProgress {
        next_trans: Tid(next_trans),
        next_obj: (Tid(next_tid), Oid(next_oid)),
        base_trans: Tid(base_trans),
        base_obj: (Tid(base_tid), Oid(base_oid)),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn progress_round_trips_and_garbage_is_corrupt() {
        let p = ReplProgress {
            next_trans: Tid(1),
            next_obj: (Tid(2), Oid(3)),
            base_trans: Tid(u64::MAX),
            base_obj: (Tid(Tid::MAX.0), Oid(0)),
        };
        let key = progress_key(7);
        assert_eq!(key, "replication.7");
        assert_eq!(decode_progress(&key, &encode_progress(&p)).unwrap(), p);
        assert_eq!(decode_progress(&key, &encode_progress(&ReplProgress::ZERO)).unwrap(), ReplProgress::ZERO);
        for bad in [
            "",
            "1 2 3 4 5",
            "1 2 3 4 5 6 7",
            "1 2 3 4 5 x",
            "1  2 3 4 5 6",
            "+1 2 3 4 5 6",
            "1 2 3 4 5 10000000000000000",
        ] {
            match decode_progress(&key, bad) {
                Err(BackendError::Corrupt(m)) => assert!(m.contains("replication.7"), "{m}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn fetch_budget_takes_the_first_row_whatever_its_size() {
        // Past the limit with the first row: nothing more, not even an empty record.
        let mut b = FetchBudget::new(10);
        assert!(b.take(100));
        assert!(!b.take(0));
        let mut b = FetchBudget::new(10);
        assert!(b.take(4) && b.take(6) && b.take(0));
        assert!(!b.take(1));
        let mut b = FetchBudget::new(0);
        assert!(b.take(0) && b.take(0));
        assert!(!b.take(1));
    }
}
