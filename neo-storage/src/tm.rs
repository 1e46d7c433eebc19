//! The storage's in-memory transaction state: which transactions stored what, object write
//! locks (taken at store, released at unlock/abort), and read locks between lock and unlock
//! (loads of those objects wait so nobody reads a revision older than an acknowledged commit).
//!
//! Deadlock avoidance (NEO's relock protocol): a younger transaction waits for an older lock
//! holder. An older one finding a lock held by a younger transaction that has not reached its
//! commit point also waits, but the younger one's client is notified (`NotifyDeadlock`); unless
//! it is already finishing, it asks to relock (`AskRelockObject`): the lock goes to the oldest
//! waiter, the younger transaction queues for it again and must vote again on this storage
//! (its base serial is checked anew). Waits that remain go from young to old, or towards a
//! transaction that is finishing and waits for nobody, so they never cycle.

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
    /// Bumped by each relock: a vote started before a relock does not count.
    pub generation: u64,
    /// Objects only checked (checkCurrentSerialInTransaction): locked and checked at vote, not
    /// written.
    pub checked: BTreeMap<Oid, (u32, Tid)>,
}

/// Result of trying to take a write lock.
#[derive(Debug, PartialEq, Eq)]
pub enum LockAttempt {
    /// Taken (or already held by this transaction).
    Acquired,
    /// Held by an older or voted transaction: wait and retry.
    Wait,
    /// Held by this younger transaction that has not reached its commit point: wait, and have
    /// its client told (once per transaction and object) that it should relock.
    Deadlock(Tid),
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
    /// Transactions waiting for the write lock of an object.
    waiters: HashMap<Oid, std::collections::BTreeSet<Tid>>,
    /// (holder, oid) pairs whose holder's client was told about a deadlock.
    deadlock_notified: std::collections::HashSet<(Tid, Oid)>,
}

impl Inner {
    fn remove_waiter(&mut self, oid: Oid, ttid: Tid) {
        if let Some(w) = self.waiters.get_mut(&oid) {
            w.remove(&ttid);
            if w.is_empty() {
                self.waiters.remove(&oid);
            }
        }
    }
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
                generation: 0,
                checked: BTreeMap::new(),
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
                s.remove_waiter(oid, ttid);
                return LockAttempt::Gone;
            }
            let attempt = match s.write_locks.get(&oid).copied() {
                None => {
                    s.write_locks.insert(oid, ttid);
                    LockAttempt::Acquired
                }
                Some(h) if h == ttid => LockAttempt::Acquired,
                Some(h) if h < ttid => LockAttempt::Wait,
                Some(h) => {
                    let finishing = s.txns.get(&h).is_none_or(|t| t.locked.is_some());
                    if finishing || !s.deadlock_notified.insert((h, oid)) {
                        LockAttempt::Wait
                    } else {
                        LockAttempt::Deadlock(h)
                    }
                }
            };
            if attempt == LockAttempt::Acquired {
                s.remove_waiter(oid, ttid);
            } else {
                s.waiters.entry(oid).or_default().insert(ttid);
            }
            attempt
        })
    }

    /// Stop waiting for the lock of `oid` (the waiting request was cancelled).
    pub fn stop_waiting(&self, ttid: Tid, oid: Oid) {
        self.with(|s| s.remove_waiter(oid, ttid));
    }

    /// Client link of a transaction (to send it a `NotifyDeadlock`).
    pub fn conn_of(&self, ttid: Tid) -> Option<u64> {
        self.with(|s| s.txns.get(&ttid).map(|t| t.conn))
    }

    /// Relock: if `ttid` holds the lock of `oid` and has not reached its commit point, give the
    /// lock to the oldest older transaction waiting for it, and make `ttid` vote again. Returns
    /// false if the transaction is unknown or already locked (nothing to do then).
    pub fn relock(&self, ttid: Tid, oid: Oid) -> bool {
        let done = self.with(|s| {
            let Some(t) = s.txns.get_mut(&ttid) else { return false };
            if t.locked.is_some() {
                return false;
            }
            t.voted = false;
            t.generation += 1;
            s.deadlock_notified.remove(&(ttid, oid));
            if s.write_locks.get(&oid) != Some(&ttid) {
                return true;
            }
            let older =
                s.waiters.get(&oid).and_then(|w| w.iter().copied().find(|w| *w < ttid && s.txns.contains_key(w)));
            match older {
                Some(o) => {
                    s.write_locks.insert(oid, o);
                }
                None => {
                    s.write_locks.remove(&oid);
                }
            }
            true
        });
        self.changed.notify_waiters();
        done
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

    /// Record an object checked by checkCurrentSerialInTransaction. Returns false if the
    /// transaction is gone.
    pub fn add_checked(&self, ttid: Tid, oid: Oid, partition: u32, serial: Tid) -> bool {
        self.with(|s| match s.txns.get_mut(&ttid) {
            Some(t) => {
                t.checked.insert(oid, (partition, serial));
                true
            }
            None => false,
        })
    }

    /// What to vote: the stored objects, the checked ones (partition, oid, serial), and the
    /// generation to pass to `set_voted`.
    #[allow(clippy::type_complexity)]
    pub fn objects_to_vote(&self, ttid: Tid) -> Option<(Vec<(Oid, Stored)>, Vec<(u32, Oid, Tid)>, u64)> {
        self.with(|s| {
            s.txns.get_mut(&ttid).map(|t| {
                let objects = t.objects.iter().map(|(o, st)| (*o, st.clone())).collect();
                let checked =
                    t.checked.iter().filter(|(o, _)| !t.objects.contains_key(o)).map(|(o, (p, t))| (*p, *o, *t));
                (objects, checked.collect(), t.generation)
            })
        })
    }

    /// The vote started at `generation` succeeded; it counts unless a relock came meanwhile.
    pub fn set_voted(&self, ttid: Tid, generation: u64) {
        self.with(|s| {
            if let Some(t) = s.txns.get_mut(&ttid)
                && t.generation == generation
            {
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

    /// True if a transaction with final tid <= `tid` reached its commit point here and is not
    /// unlocked yet (listings up to `tid` wait for it, so they never miss an acknowledged
    /// commit).
    pub fn is_committing_upto(&self, tid: Tid) -> bool {
        self.with(|s| s.txns.values().any(|t| t.locked.is_some_and(|l| l <= tid)))
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
            s.deadlock_notified.retain(|(h, _)| *h != ttid);
            s.waiters.retain(|_, w| {
                w.remove(&ttid);
                !w.is_empty()
            });
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
            s.waiters.clear();
            s.deadlock_notified.clear();
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
        // The older transaction finds a lock of a younger one before its commit point: it waits
        // and the younger one's client is told, once.
        assert_eq!(tm.try_lock(old, Oid(1)), LockAttempt::Deadlock(young));
        assert_eq!(tm.try_lock(old, Oid(1)), LockAttempt::Wait);
        tm.set_voted(young, 0);
        assert!(tm.is_voted(young));
        // Relock: the lock goes to the older waiter, the younger must vote again and waits.
        assert!(tm.relock(young, Oid(1)));
        assert!(!tm.is_voted(young));
        assert_eq!(tm.try_lock(young, Oid(1)), LockAttempt::Wait);
        assert_eq!(tm.try_lock(old, Oid(1)), LockAttempt::Acquired);
        // A vote started before the relock does not count.
        tm.set_voted(young, 0);
        assert!(!tm.is_voted(young));
        assert_eq!(tm.try_lock(old, Oid(2)), LockAttempt::Acquired);
        // The younger waits for the older one.
        assert_eq!(tm.try_lock(young, Oid(2)), LockAttempt::Wait);
        assert!(tm.release(old));
        assert_eq!(tm.try_lock(young, Oid(2)), LockAttempt::Acquired);
        assert_eq!(tm.try_lock(young, Oid(1)), LockAttempt::Acquired);
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
