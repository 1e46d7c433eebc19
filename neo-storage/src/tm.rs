//! The storage's in-memory transaction state: which transactions stored what, object write
//! locks (taken at store, released at unlock/abort), and read locks between lock and unlock
//! (loads of those objects wait so nobody reads a revision older than an acknowledged commit).
//!
//! Deadlock freedom (until NEO's relock protocol lands): a younger transaction waits for an
//! older lock holder; an older one finding a lock held by a younger, not yet voted transaction
//! gets a conflict instead of waiting, so waits always go from young to old and never cycle.

use crate::backend::NewData;
use neo_lib::{Oid, Tid};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// An object stored by a transaction, waiting for the vote.
#[derive(Clone, Debug)]
pub struct Stored {
    pub partition: u32,
    /// None for a deletion. Written to the database by the vote, in the same transaction as
    /// the temporary object.
    pub data: Option<Arc<NewData>>,
    pub data_serial: Option<Tid>,
    /// Serial the client based this store on, checked against the last committed one at vote
    /// (under the write lock); None for a lockless store to an OUT_OF_DATE cell.
    pub base_serial: Option<Tid>,
}

#[derive(Debug)]
pub struct TxnState {
    /// Link of the client that began it.
    pub conn: u64,
    pub objects: BTreeMap<Oid, Stored>,
    pub voted: bool,
    pub locked: Option<Tid>,
}

/// Result of trying to take a write lock.
#[derive(Debug, PartialEq, Eq)]
pub enum LockAttempt {
    /// Taken (or already held by this transaction).
    Acquired,
    /// Held by an older or voted transaction: wait and retry.
    Wait,
    /// Held by this younger transaction that has not voted: give up with a conflict.
    Conflict(Tid),
    /// The transaction was aborted meanwhile.
    Gone,
}

/// How many aborted ttids are remembered (a store arriving after its abort must not revive it).
const ABORTED_MEMORY: usize = 10_000;

#[derive(Default)]
struct Inner {
    txns: HashMap<Tid, TxnState>,
    /// Stores received and not answered yet, per transaction (a vote waits for them).
    storing: HashMap<Tid, usize>,
    aborted: std::collections::HashSet<Tid>,
    aborted_order: std::collections::VecDeque<Tid>,
    write_locks: HashMap<Oid, Tid>,
    read_locks: HashMap<Oid, Tid>,
}

/// Shared handle; critical sections are short and never span an `.await`.
#[derive(Clone, Default)]
pub struct Tm {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
}

impl Tm {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut neo_lib::lock(&self.inner))
    }

    /// Wait for the next release of a lock (register before re-checking to not miss one).
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Register `ttid` for a client link (no-op if known). Returns false if it is locked
    /// already (no more stores accepted) or was aborted.
    pub fn register(&self, ttid: Tid, conn: u64) -> bool {
        self.with(|s| {
            if s.aborted.contains(&ttid) {
                return false;
            }
            let t = s.txns.entry(ttid).or_insert_with(|| TxnState {
                conn,
                objects: BTreeMap::new(),
                voted: false,
                locked: None,
            });
            t.locked.is_none()
        })
    }

    /// A store of `ttid` arrived (called in arrival order, before the vote can be handled).
    pub fn store_started(&self, ttid: Tid) {
        self.with(|s| *s.storing.entry(ttid).or_default() += 1);
    }

    /// A store of `ttid` was answered.
    pub fn store_done(&self, ttid: Tid) {
        self.with(|s| {
            if let Some(n) = s.storing.get_mut(&ttid) {
                *n -= 1;
                if *n == 0 {
                    s.storing.remove(&ttid);
                }
            }
        });
        self.changed.notify_waiters();
    }

    /// Stores of `ttid` still in progress.
    pub fn storing(&self, ttid: Tid) -> usize {
        self.with(|s| s.storing.get(&ttid).copied().unwrap_or(0))
    }

    /// True if `ttid` voted on this storage (its temporary data is persistent).
    pub fn is_voted(&self, ttid: Tid) -> bool {
        self.with(|s| s.txns.get(&ttid).is_some_and(|t| t.voted))
    }

    pub fn try_lock(&self, ttid: Tid, oid: Oid) -> LockAttempt {
        self.with(|s| {
            if !s.txns.contains_key(&ttid) {
                return LockAttempt::Gone;
            }
            match s.write_locks.get(&oid).copied() {
                None => {
                    s.write_locks.insert(oid, ttid);
                    LockAttempt::Acquired
                }
                Some(h) if h == ttid => LockAttempt::Acquired,
                Some(h) if h < ttid => LockAttempt::Wait,
                Some(h) => {
                    let voted = s.txns.get(&h).is_some_and(|t| t.voted || t.locked.is_some());
                    if voted { LockAttempt::Wait } else { LockAttempt::Conflict(h) }
                }
            }
        })
    }

    /// Record a stored object. Returns false if the transaction is gone.
    pub fn add_object(&self, ttid: Tid, oid: Oid, obj: Stored) -> bool {
        self.with(|s| match s.txns.get_mut(&ttid) {
            Some(t) => {
                t.objects.insert(oid, obj);
                true
            }
            None => false,
        })
    }

    /// Objects to vote.
    pub fn objects_to_vote(&self, ttid: Tid) -> Option<Vec<(Oid, Stored)>> {
        self.with(|s| s.txns.get_mut(&ttid).map(|t| t.objects.iter().map(|(o, st)| (*o, st.clone())).collect()))
    }

    pub fn set_voted(&self, ttid: Tid) {
        self.with(|s| {
            if let Some(t) = s.txns.get_mut(&ttid) {
                t.voted = true;
            }
        });
    }

    /// The commit decision: read-lock the transaction's objects until unlock.
    pub fn set_locked(&self, ttid: Tid, tid: Tid) {
        self.with(|s| {
            if let Some(t) = s.txns.get_mut(&ttid) {
                t.locked = Some(tid);
                let oids: Vec<Oid> = t.objects.keys().copied().collect();
                for o in oids {
                    s.read_locks.insert(o, ttid);
                }
            }
        });
    }

    pub fn locked_tid(&self, ttid: Tid) -> Option<Tid> {
        self.with(|s| s.txns.get(&ttid).and_then(|t| t.locked))
    }

    /// True if a load of `oid` must wait for a commit in progress.
    pub fn is_read_locked(&self, oid: Oid) -> bool {
        self.with(|s| s.read_locks.contains_key(&oid))
    }

    /// Forget a transaction and release its locks. Returns false if it was unknown.
    pub fn release(&self, ttid: Tid) -> bool {
        let known = self.with(|s| {
            let known = s.txns.remove(&ttid).is_some();
            s.write_locks.retain(|_, h| *h != ttid);
            s.read_locks.retain(|_, h| *h != ttid);
            known
        });
        self.changed.notify_waiters();
        known
    }

    /// Like `release`, and remember that `ttid` was aborted so late stores are refused.
    pub fn abort(&self, ttid: Tid) -> bool {
        self.with(|s| {
            if s.aborted.insert(ttid) {
                s.aborted_order.push_back(ttid);
                if s.aborted_order.len() > ABORTED_MEMORY
                    && let Some(old) = s.aborted_order.pop_front()
                {
                    s.aborted.remove(&old);
                }
            }
        });
        self.release(ttid)
    }

    /// Forget every transaction (after verification decided their fate).
    pub fn release_all(&self) {
        self.with(|s| {
            s.txns.clear();
            s.write_locks.clear();
            s.read_locks.clear();
        });
        self.changed.notify_waiters();
    }

    /// Transactions of a client link that did not vote (to abort when it disconnects; voted ones
    /// are decided by the master).
    pub fn unvoted_of_conn(&self, conn: u64) -> Vec<Tid> {
        self.with(|s| {
            s.txns.iter().filter(|(_, t)| t.conn == conn && !t.voted && t.locked.is_none()).map(|(k, _)| *k).collect()
        })
    }

    /// Every transaction that did not vote (to abort when the master is lost or operation
    /// stops; voted ones wait for the next verification).
    pub fn all_unvoted(&self) -> Vec<Tid> {
        self.with(|s| s.txns.iter().filter(|(_, t)| !t.voted && t.locked.is_none()).map(|(k, _)| *k).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn young_waits_old_conflicts() {
        let tm = Tm::default();
        let (old, young) = (Tid(10), Tid(20));
        tm.register(old, 1);
        tm.register(young, 2);
        assert_eq!(tm.try_lock(young, Oid(1)), LockAttempt::Acquired);
        // The older transaction finds a lock of a younger one that did not vote: conflict.
        assert_eq!(tm.try_lock(old, Oid(1)), LockAttempt::Conflict(young));
        tm.set_voted(young);
        assert_eq!(tm.try_lock(old, Oid(1)), LockAttempt::Wait);
        assert_eq!(tm.try_lock(old, Oid(2)), LockAttempt::Acquired);
        // The younger waits for the older one.
        assert_eq!(tm.try_lock(young, Oid(2)), LockAttempt::Wait);
        assert!(tm.release(old));
        assert_eq!(tm.try_lock(young, Oid(2)), LockAttempt::Acquired);
        assert_eq!(tm.try_lock(old, Oid(3)), LockAttempt::Gone);
        // An aborted transaction cannot be revived by a late store.
        tm.abort(young);
        assert!(!tm.register(young, 2));
    }

    #[test]
    fn read_locks_between_lock_and_unlock() {
        let tm = Tm::default();
        tm.register(Tid(5), 1);
        tm.add_object(Tid(5), Oid(7), Stored { partition: 0, data: None, data_serial: None, base_serial: None });
        assert!(!tm.is_read_locked(Oid(7)));
        tm.set_locked(Tid(5), Tid(6));
        assert!(tm.is_read_locked(Oid(7)));
        assert!(tm.unvoted_of_conn(1).is_empty());
        tm.release(Tid(5));
        assert!(!tm.is_read_locked(Oid(7)));
    }
}
