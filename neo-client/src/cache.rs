//! Bounded object cache: revisions `(oid, tid, next_tid)` with their uncompressed data, evicted
//! least-recently-used first once the total data size exceeds the bound.

use neo_lib::{Oid, Tid};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Clone, Debug)]
struct Entry {
    tid: Tid,
    /// None: current revision (valid until an invalidation says otherwise).
    next_tid: Option<Tid>,
    data: Arc<Vec<u8>>,
    tick: u64,
}

pub struct Cache {
    max_size: usize,
    size: usize,
    tick: u64,
    items: HashMap<Oid, Vec<Entry>>,
    lru: BTreeMap<u64, (Oid, Tid)>,
    pub hits: u64,
    pub misses: u64,
}

/// A cached revision: data, its serial and the serial of the next revision.
pub type Hit = (Arc<Vec<u8>>, Tid, Option<Tid>);

impl Cache {
    pub fn new(max_size: usize) -> Cache {
        Cache { max_size, size: 0, tick: 0, items: HashMap::new(), lru: BTreeMap::new(), hits: 0, misses: 0 }
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }
    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }
    pub fn size(&self) -> usize {
        self.size
    }

    fn touch(&mut self, oid: Oid, idx: usize) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.items.get_mut(&oid).and_then(|v| v.get_mut(idx)) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, (oid, e.tid));
        }
    }

    /// Whether `load_before(oid, before)` would hit (not counted in the statistics).
    pub fn has_before(&self, oid: Oid, before: Tid) -> bool {
        self.items.get(&oid).is_some_and(|v| v.iter().any(|e| e.tid < before && e.next_tid.is_none_or(|n| n >= before)))
    }

    /// The revision visible before `before` (newest with tid < before, valid at before).
    pub fn load_before(&mut self, oid: Oid, before: Tid) -> Option<Hit> {
        let idx = self
            .items
            .get(&oid)
            .and_then(|v| v.iter().position(|e| e.tid < before && e.next_tid.is_none_or(|n| n >= before)));
        match idx {
            Some(i) => {
                self.hits += 1;
                self.touch(oid, i);
                let e = &self.items[&oid][i];
                Some((e.data.clone(), e.tid, e.next_tid))
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// The revision with exactly this serial.
    pub fn load_serial(&mut self, oid: Oid, serial: Tid) -> Option<Arc<Vec<u8>>> {
        let idx = self.items.get(&oid).and_then(|v| v.iter().position(|e| e.tid == serial));
        match idx {
            Some(i) => {
                self.hits += 1;
                self.touch(oid, i);
                Some(self.items[&oid][i].data.clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    pub fn store(&mut self, oid: Oid, tid: Tid, next_tid: Option<Tid>, data: Arc<Vec<u8>>) {
        if data.len() >= self.max_size {
            return;
        }
        let v = self.items.entry(oid).or_default();
        if let Some(e) = v.iter_mut().find(|e| e.tid == tid) {
            if e.next_tid.is_none() {
                e.next_tid = next_tid;
            }
            return;
        }
        // A current entry can only be added if no other current one exists.
        if next_tid.is_none() && v.iter().any(|e| e.next_tid.is_none()) {
            return;
        }
        self.tick += 1;
        self.size += data.len();
        v.push(Entry { tid, next_tid, data, tick: self.tick });
        self.lru.insert(self.tick, (oid, tid));
        self.evict();
    }

    fn evict(&mut self) {
        while self.size > self.max_size {
            let Some((_, (oid, tid))) = self.lru.pop_first() else { break };
            self.remove(oid, tid);
        }
    }

    fn remove(&mut self, oid: Oid, tid: Tid) {
        if let Some(v) = self.items.get_mut(&oid) {
            if let Some(i) = v.iter().position(|e| e.tid == tid) {
                let e = v.swap_remove(i);
                self.size -= e.data.len();
                self.lru.remove(&e.tick);
            }
            if v.is_empty() {
                self.items.remove(&oid);
            }
        }
    }

    /// A new revision `tid` of `oid` was committed: the current entry ends at `tid`.
    pub fn invalidate(&mut self, oid: Oid, tid: Tid) {
        if let Some(v) = self.items.get_mut(&oid) {
            for e in v.iter_mut() {
                if e.next_tid.is_none() && e.tid < tid {
                    e.next_tid = Some(tid);
                }
            }
        }
    }

    /// Forget every current entry (invalidations may have been missed).
    pub fn clear_current(&mut self) {
        let current: Vec<(Oid, Tid)> = self
            .items
            .iter()
            .flat_map(|(o, v)| v.iter().filter(|e| e.next_tid.is_none()).map(|e| (*o, e.tid)))
            .collect();
        for (o, t) in current {
            self.remove(o, t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_and_invalidation() {
        let mut c = Cache::new(1000);
        c.store(Oid(1), Tid(10), None, Arc::new(vec![1]));
        assert!(c.load_before(Oid(1), Tid(11)).is_some());
        assert!(c.load_before(Oid(1), Tid(10)).is_none());
        c.invalidate(Oid(1), Tid(20));
        assert_eq!(c.load_before(Oid(1), Tid(20)).map(|h| h.2), Some(Some(Tid(20))));
        assert!(c.load_before(Oid(1), Tid(21)).is_none());
        c.store(Oid(1), Tid(20), None, Arc::new(vec![2]));
        assert_eq!(c.load_before(Oid(1), Tid(100)).map(|h| h.1), Some(Tid(20)));
        assert!(c.load_serial(Oid(1), Tid(10)).is_some());
        c.clear_current();
        assert!(c.load_before(Oid(1), Tid(100)).is_none());
        assert!(c.load_serial(Oid(1), Tid(10)).is_some());
    }

    #[test]
    fn bounded() {
        let mut c = Cache::new(100);
        for i in 0..50u64 {
            c.store(Oid(i), Tid(1), None, Arc::new(vec![0; 10]));
            assert!(c.size() <= 100);
        }
        assert_eq!(c.len(), 10);
        // Least recently used went first.
        assert!(c.load_before(Oid(49), Tid(2)).is_some());
        assert!(c.load_before(Oid(0), Tid(2)).is_none());
        c.store(Oid(99), Tid(1), None, Arc::new(vec![0; 500]));
        assert!(c.load_before(Oid(99), Tid(2)).is_none());
    }
}
