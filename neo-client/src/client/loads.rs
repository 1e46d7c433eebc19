//! Loads: from the cache, else from a readable cell with failover (a wrong checksum counts as
//! a failure of that storage); a load in flight is registered so that an invalidation arriving
//! meanwhile bounds the revision it caches.

use super::{Client, Inner, sha1};
use crate::cache::Hit;
use crate::codec::decompress;
use crate::{ClientError, Result};
use neo_lib::{ErrorCode, Oid, Tid, lock};
use proto::{Body, LinkError, expect_answer, msg};
use std::sync::Arc;
use tokio::task::JoinSet;
use tracing::warn;

/// Loads in flight during a `prefetch`.
const PREFETCH_WINDOW: usize = 64;

/// Registers a load in flight so that invalidations arriving meanwhile are remembered; the
/// registration is dropped even if the load is cancelled.
pub(super) struct LoadingGuard<'a> {
    inner: &'a Inner,
    oid: Oid,
    done: bool,
}

impl<'a> LoadingGuard<'a> {
    pub(super) fn new(inner: &'a Inner, oid: Oid) -> Self {
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

/// An `AnswerObject` whose checksum is right. A wrong checksum counts as a failure of that
/// storage: the next cell is tried.
pub(super) fn checked_object(oid: Oid, b: Body) -> std::result::Result<msg::AnswerObject, LinkError> {
    let a = expect_answer!(b, AnswerObject)?;
    if !a.deleted && (a.checksum.len() != 20 || sha1(&a.data)[..] != a.checksum[..]) {
        warn!("wrong checksum for {oid:?}");
        return Err(LinkError::Unexpected(format!("wrong checksum for oid {oid}")));
    }
    Ok(a)
}

/// The outcome of a load request: the record (decompressed), None if there is no revision
/// before the bound, `NotFound` if the object does not exist.
pub(super) fn record_of(oid: Oid, answer: Result<msg::AnswerObject>) -> Result<Option<Record>> {
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

/// A revision as stored.
pub(super) struct Record {
    /// None for a deletion (or an undone creation).
    pub(super) data: Option<Vec<u8>>,
    serial: Tid,
    next_serial: Option<Tid>,
    /// The revision whose data this one reuses (undo).
    pub(super) data_serial: Option<Tid>,
}

/// A loaded revision.
pub(super) struct Loaded {
    data: Arc<Vec<u8>>,
    serial: Tid,
    next_serial: Option<Tid>,
}

/// A record as a load's result (a deletion is `NotFound`).
pub(super) fn loaded(oid: Oid, r: Option<Record>) -> Result<Option<Loaded>> {
    match r {
        None => Ok(None),
        Some(Record { data: None, .. }) => Err(ClientError::NotFound(oid)),
        Some(Record { data: Some(data), serial, next_serial, .. }) => {
            Ok(Some(Loaded { data: Arc::new(data), serial, next_serial }))
        }
    }
}

impl Client {
    async fn load_from_storages(&self, oid: Oid, at: Option<Tid>, before: Option<Tid>) -> Result<Option<Loaded>> {
        loaded(oid, self.load_record(oid, at, before).await?)
    }

    /// A revision as stored (data None for a deletion), bypassing the cache.
    pub(super) async fn load_record(&self, oid: Oid, at: Option<Tid>, before: Option<Tid>) -> Result<Option<Record>> {
        let req = msg::AskObject { oid: oid.0, at: at.map(|t| t.0), before: before.map(|t| t.0) };
        let answer = self.ask_readable(oid.0, || req.into(), |b| checked_object(oid, b)).await;
        record_of(oid, answer)
    }

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
    pub(super) fn cache_loaded(
        &self,
        oid: Oid,
        guard: LoadingGuard<'_>,
        res: Result<Option<Loaded>>,
    ) -> Result<Option<Hit>> {
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
}
