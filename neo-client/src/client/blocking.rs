//! Loads for a thread that blocks anyway (a Python thread in a ZODB load): the request goes
//! out and the answer comes back on the calling thread, over a blocking connection to the
//! storage taken from a small pool, without the two thread wake-ups that a trip through the
//! async runtime costs. Anything unusual (no partition table yet, a cell that is not ready, a
//! connection error) is left to the async path, which knows how to wait, retry and fail over.

use super::Client;
use super::loads::{LoadingGuard, checked_object, loaded, record_of};
use crate::Result;
use crate::cache::Hit;
use neo_lib::{ErrorCode, Nid, NodeType, Oid, Tid, lock};
use proto::blocking::BlockingConn;
use proto::net::identification;
use proto::{LinkError, msg};
use std::time::Duration;
use tracing::debug;

/// Idle blocking connections kept per storage (more are closed after use).
const POOL_PER_STORAGE: usize = 4;
/// A blocking load that makes no progress for this long gives up (the async path takes over).
const BLOCKING_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    /// `load_before` on the calling thread, which must not be a runtime worker (it blocks on
    /// the network). `None`: this path could not serve it; use `load_before` (async).
    pub fn load_before_blocking(&self, oid: Oid, before: Tid) -> Option<Result<Option<Hit>>> {
        if let Some(hit) = lock(&self.0.cache).load_before(oid, before) {
            return Some(Ok(Some(hit)));
        }
        if std::process::id() != self.0.pid {
            // A forked child shares the pooled sockets with its parent: answers could cross.
            return None;
        }
        let nid = *self.read_candidates(oid).first()?;
        if lock(&self.0.state).failed.contains_key(&nid) {
            return None;
        }
        let mut conn = self.blocking_conn(nid)?;
        let guard = LoadingGuard::new(&self.0, oid);
        let req = msg::AskObject { oid: oid.0, at: None, before: Some(before.0) };
        let answer = match conn.ask(req.into()).and_then(|b| checked_object(oid, b)) {
            Ok(a) => Ok(a),
            Err(LinkError::Remote { code: code @ (ErrorCode::OidNotFound | ErrorCode::OidDoesNotExist), message }) => {
                Err(crate::ClientError::Remote { code, message })
            }
            Err(e) => {
                // Not ready, not readable, closed, timed out...: the async path decides.
                debug!("blocking load of {oid:?} from {nid}: {e}");
                if matches!(e, LinkError::Remote { .. }) {
                    self.put_back(nid, conn);
                }
                return None;
            }
        };
        self.put_back(nid, conn);
        let res = record_of(oid, answer).and_then(|r| loaded(oid, r));
        Some(self.cache_loaded(oid, guard, res))
    }

    fn blocking_conn(&self, nid: Nid) -> Option<BlockingConn> {
        if let Some(c) = lock(&self.0.blocking).get_mut(&nid).and_then(|v| v.pop()) {
            return Some(c);
        }
        let (addr, me) = {
            let s = lock(&self.0.state);
            (s.nodes.get(&nid).and_then(|n| n.address.clone())?, s.nid)
        };
        let req = identification(&self.0.cfg.cluster, NodeType::Client, me, None);
        match BlockingConn::connect_reads(&addr, &self.0.net, req, BLOCKING_TIMEOUT) {
            Ok(c) => Some(c),
            Err(e) => {
                // Like a failed link: later loads try the other cells first.
                debug!("blocking connection to {nid}: {e}");
                self.mark_failed(nid);
                None
            }
        }
    }

    fn put_back(&self, nid: Nid, conn: BlockingConn) {
        if self.0.closed.is_cancelled() {
            return;
        }
        let mut pool = lock(&self.0.blocking);
        let idle = pool.entry(nid).or_default();
        if idle.len() < POOL_PER_STORAGE {
            idle.push(conn);
        }
    }
}
