//! Helpers shared by every engine: id conversions, oid lists, validation of stored values.

use super::{BackendError, Result};
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
