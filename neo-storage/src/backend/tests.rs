//! Backend conformance suite: engine-independent checks that every `Backend` must pass.
//!
//! Each check is a `pub(crate)` function taking either a fresh backend (`&mut dyn Backend`), an
//! [`Open`] function that opens the same database again and again (restart, cluster name), and
//! for corruption checks a [`RawSql`] function that runs SQL on that database through a separate
//! connection. The `#[test]` wrappers at the bottom run them on SQLite; another engine adds its
//! own wrappers calling the same functions.
#![allow(clippy::unwrap_used)]

use super::{
    Backend, BackendError, DataId, Load, LockedTxn, ObjectRecord, Result, TempObject, TxnInfo, TxnMeta, UndoInfo,
};
use neo_lib::pt::{Cell, CellChange, PartitionTable};
use neo_lib::{CellState, Nid, NodeType, Oid, Ptid, Tid};

/// Opens the database under test for the given cluster name; every call opens the same one.
pub(crate) type Open<'a> = &'a dyn Fn(&str) -> Result<Box<dyn Backend>>;
/// Runs raw SQL (statements separated by `;`) on the database under test through a separate
/// connection, to plant corruption.
pub(crate) type RawSql<'a> = &'a dyn Fn(&str);

/// Cluster name used by the suite.
pub(crate) const CLUSTER: &str = "conformance";
/// Partitions used to place objects and transaction metadata.
const NP: u32 = 4;

// --- helpers

fn sha1(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, data).as_ref().to_vec()
}

fn part(id: u64) -> u32 {
    (id % u64::from(NP)) as u32
}

fn s(n: u32) -> Nid {
    Nid::new(NodeType::Storage, n)
}

/// Store `data` (raw) for `oid` and return the temporary object to vote.
fn store(b: &mut dyn Backend, oid: u64, data: &[u8]) -> TempObject {
    let id = b.store_data(part(oid), &sha1(data), 0, data).unwrap();
    TempObject { oid: Oid(oid), data_id: Some(id), data_serial: None }
}

fn deletion(oid: u64) -> TempObject {
    TempObject { oid: Oid(oid), data_id: None, data_serial: None }
}

fn meta_for(user: &str, objects: &[TempObject]) -> TxnMeta {
    TxnMeta {
        user: user.as_bytes().to_vec(),
        description: format!("description of {user}").into_bytes(),
        extension: vec![0x80, 0x03, b'}', b'q', 0, b'.'],
        oids: objects.iter().map(|o| o.oid).collect(),
    }
}

fn with_parts(objects: &[TempObject]) -> Vec<(u32, TempObject)> {
    objects.iter().map(|o| (part(o.oid.0), o.clone())).collect()
}

/// Vote (with metadata), lock and unlock `objects` under ttid `tid - 1`, final tid `tid`.
fn commit_objects(b: &mut dyn Backend, tid: u64, objects: &[TempObject]) -> TxnMeta {
    let ttid = Tid(tid - 1);
    let meta = meta_for(&format!("user{tid}"), objects);
    b.vote(ttid, &with_parts(objects), Some((part(ttid.0), &meta))).unwrap();
    b.lock(ttid, Tid(tid), &[]).unwrap();
    b.unlock(ttid, Tid(tid)).unwrap();
    meta
}

/// Commit `data` for each oid (None = deletion) at `tid`.
fn commit(b: &mut dyn Backend, tid: u64, objects: &[(u64, Option<&[u8]>)]) {
    let objects: Vec<TempObject> = objects
        .iter()
        .map(|(oid, data)| match data {
            Some(d) => store(b, *oid, d),
            None => deletion(*oid),
        })
        .collect();
    commit_objects(b, tid, &objects);
}

fn load(b: &mut dyn Backend, oid: u64, at: Option<u64>, before: Option<u64>) -> Load {
    b.load(part(oid), Oid(oid), at.map(Tid), before.map(Tid)).unwrap()
}

fn found(l: Load) -> ObjectRecord {
    match l {
        Load::Found(r) => r,
        other => panic!("expected a record, got {other:?}"),
    }
}

fn latest(b: &mut dyn Backend, oid: u64) -> ObjectRecord {
    found(load(b, oid, None, None))
}

/// Whether a data row identical to `data` still exists: store_data reuses it iff it does.
/// (Takes a hold on the row, as any store_data does.)
fn data_row_is(b: &mut dyn Backend, data: &[u8], id: DataId) -> bool {
    b.store_data(0, &sha1(data), 0, data).unwrap() == id
}

fn sorted_pt(pt: &PartitionTable) -> PartitionTable {
    let rows = pt
        .rows()
        .iter()
        .map(|row| {
            let mut row = row.clone();
            row.sort_by_key(|c| c.nid);
            row
        })
        .collect();
    PartitionTable::from_rows(pt.ptid, pt.replicas, rows).unwrap()
}

fn sorted_locked(b: &mut dyn Backend) -> Vec<(Tid, Option<Tid>)> {
    let mut v = locked(b);
    v.sort();
    v
}

/// (ttid, final tid) of the transactions with temporary data.
fn locked(b: &mut dyn Backend) -> Vec<(Tid, Option<Tid>)> {
    b.locked_transactions().unwrap().into_iter().map(|t| (t.ttid, t.tid)).collect()
}

fn assert_corrupt<T: std::fmt::Debug>(r: Result<T>, needle: &str) {
    match r {
        Err(BackendError::Corrupt(msg)) => {
            assert!(msg.contains(needle), "corruption message {msg:?} does not name {needle:?}")
        }
        other => panic!("expected a Corrupt error naming {needle:?}, got {other:?}"),
    }
}

// --- checks on a fresh backend

/// Latest revision, exact `at`, `before`, next_serial, NotFound vs DoesNotExist, last_serial.
/// `vote_data` writes data, temporary objects and metadata at once (deduplicated data, a
/// deletion), visible after lock and unlock only.
pub(crate) fn vote_data_stores_data_objects_and_metadata(b: &mut dyn Backend) {
    use super::{NewData, NewObject};
    let new = |oid: u64, d: Option<&[u8]>| {
        (
            part(oid),
            NewObject {
                oid: Oid(oid),
                data: d.map(|d| NewData { checksum: sha1(d).to_vec(), compression: 0, data: d.to_vec() }),
                data_serial: None,
            },
        )
    };
    let objs = vec![new(1, Some(b"same")), new(2, Some(b"same")), new(3, None)];
    let meta = TxnMeta { user: b"u".to_vec(), oids: vec![Oid(1), Oid(2), Oid(3)], ..Default::default() };
    b.vote_data(Tid(50), &objs, Some((part(50), &meta))).unwrap();
    assert_eq!(b.load(part(1), Oid(1), None, None).unwrap(), Load::DoesNotExist);
    assert_eq!(locked(b), vec![(Tid(50), None)]);
    b.lock(Tid(50), Tid(60), &[]).unwrap();
    b.unlock(Tid(50), Tid(60)).unwrap();
    for oid in [1, 2] {
        match b.load(part(oid), Oid(oid), None, None).unwrap() {
            Load::Found(r) => assert_eq!((r.serial, r.data.as_slice()), (Tid(60), &b"same"[..])),
            other => panic!("{other:?}"),
        }
    }
    match b.load(part(3), Oid(3), None, None).unwrap() {
        Load::Found(r) => assert!(r.data.is_empty() && r.checksum == vec![0; 20]),
        other => panic!("{other:?}"),
    }
    // Metadata stays in partition(ttid) (the master gives the final tid the same partition).
    assert_eq!(b.transaction(part(50), Tid(60)).unwrap().map(|t| t.meta.user), Some(b"u".to_vec()));
    // Bad arguments are refused and leave nothing behind.
    let bad = vec![(
        0,
        NewObject {
            oid: Oid(9),
            data: Some(NewData { checksum: vec![1], compression: 0, data: vec![] }),
            data_serial: None,
        },
    )];
    assert!(b.vote_data(Tid(70), &bad, None).is_err());
    assert!(b.locked_transactions().unwrap().is_empty());
}

/// `vote_data` objects: `data` for each oid (None = deletion).
fn new_objects(objects: &[(u64, Option<&[u8]>)]) -> Vec<(u32, super::NewObject)> {
    use super::{NewData, NewObject};
    objects
        .iter()
        .map(|(oid, d)| {
            let data = d.map(|d| NewData { checksum: sha1(d), compression: 0, data: d.to_vec() });
            (part(*oid), NewObject { oid: Oid(*oid), data, data_serial: None })
        })
        .collect()
}

/// `last_serials` answers what `last_serial` does for each object, in order, for more objects
/// than one request of an engine reads (MySQL: 256), existing or not; a vote may store data
/// that a committed revision already has.
pub(crate) fn last_serials_and_data_reused_across_votes(b: &mut dyn Backend) {
    let oids: Vec<u64> = (1..=300).collect();
    let objects: Vec<(u64, Option<&[u8]>)> = oids.iter().map(|o| (*o, Some(&b"shared"[..]))).collect();
    b.vote_data(Tid(50), &new_objects(&objects), None).unwrap();
    b.lock(Tid(50), Tid(60), &[]).unwrap();
    b.unlock(Tid(50), Tid(60)).unwrap();
    b.vote_data(Tid(70), &new_objects(&[(2, Some(b"shared")), (5, None)]), None).unwrap();
    b.lock(Tid(70), Tid(80), &[]).unwrap();
    b.unlock(Tid(70), Tid(80)).unwrap();
    let keys: Vec<(u32, Oid)> = (0..=310).map(|o| (part(o), Oid(o))).collect();
    let serials = b.last_serials(&keys).unwrap();
    assert_eq!(serials.len(), keys.len());
    for ((partition, oid), serial) in keys.iter().zip(&serials) {
        assert_eq!(*serial, b.last_serial(*partition, *oid).unwrap(), "{oid}");
        let expected = match oid.0 {
            2 | 5 => Some(Tid(80)),
            1..=300 => Some(Tid(60)),
            _ => None,
        };
        assert_eq!(*serial, expected, "{oid}");
    }
    assert!(b.last_serials(&[]).unwrap().is_empty());
    assert_eq!(latest(b, 2).data, b"shared");
    assert_eq!(latest(b, 300).data, b"shared");
    assert_eq!(latest(b, 5).data, b"");
}

pub(crate) fn load_revisions(b: &mut dyn Backend) {
    commit(b, 100, &[(1, Some(b"v100")), (2, Some(b"other"))]);
    commit(b, 200, &[(1, Some(b"v200"))]);
    commit(b, 300, &[(1, Some(b"v300"))]);

    let r = latest(b, 1);
    assert_eq!(r.serial, Tid(300));
    assert_eq!(r.next_serial, None);
    assert_eq!(r.data, b"v300");
    assert_eq!(r.checksum, sha1(b"v300"));
    assert_eq!(r.compression, 0);
    assert_eq!(r.data_serial, None);

    let r = found(load(b, 1, Some(200), None));
    assert_eq!((r.serial, r.next_serial), (Tid(200), Some(Tid(300))));
    assert_eq!(r.data, b"v200");
    let r = found(load(b, 1, Some(100), None));
    assert_eq!((r.serial, r.next_serial), (Tid(100), Some(Tid(200))));
    assert_eq!(r.data, b"v100");
    assert_eq!(load(b, 1, Some(150), None), Load::NotFound);
    assert_eq!(load(b, 1, Some(u64::MAX), None), Load::NotFound);

    let r = found(load(b, 1, None, Some(300)));
    assert_eq!((r.serial, r.next_serial), (Tid(200), Some(Tid(300))));
    let r = found(load(b, 1, None, Some(201)));
    assert_eq!(r.serial, Tid(200));
    let r = found(load(b, 1, None, Some(101)));
    assert_eq!((r.serial, r.next_serial), (Tid(100), Some(Tid(200))));
    assert_eq!(load(b, 1, None, Some(100)), Load::NotFound);
    assert_eq!(load(b, 1, None, Some(1)), Load::NotFound);
    assert_eq!(found(load(b, 1, None, Some(u64::MAX))).serial, Tid(300));
    assert_eq!(found(load(b, 1, Some(200), Some(300))).serial, Tid(200));
    assert_eq!(load(b, 1, Some(300), Some(300)), Load::NotFound);

    // Other objects are independent.
    let r = latest(b, 2);
    assert_eq!((r.serial, r.next_serial), (Tid(100), None));
    assert_eq!(r.data, b"other");

    // Unknown oid, and a known oid looked up in the wrong partition.
    assert_eq!(load(b, 9, None, None), Load::DoesNotExist);
    assert_eq!(load(b, 9, Some(100), None), Load::DoesNotExist);
    assert_eq!(load(b, 9, None, Some(300)), Load::DoesNotExist);
    assert_eq!(b.load(part(1) + 1, Oid(1), None, None).unwrap(), Load::DoesNotExist);

    assert_eq!(b.last_serial(part(1), Oid(1)).unwrap(), Some(Tid(300)));
    assert_eq!(b.last_serial(part(2), Oid(2)).unwrap(), Some(Tid(100)));
    assert_eq!(b.last_serial(part(9), Oid(9)).unwrap(), None);
}

/// A deletion (no data) and an undo-style back pointer (data_serial).
pub(crate) fn deletion_and_back_pointer(b: &mut dyn Backend) {
    commit(b, 100, &[(3, Some(b"alive"))]);
    commit(b, 200, &[(3, None)]);
    let r = latest(b, 3);
    assert_eq!(r.serial, Tid(200));
    assert_eq!(r.compression, 0);
    assert_eq!(r.checksum, vec![0u8; 20]);
    assert!(r.data.is_empty());
    assert_eq!(r.data_serial, None);
    assert_eq!(found(load(b, 3, None, Some(200))).data, b"alive");

    // Undo of the deletion: reuses the data of revision 100.
    let mut undo = store(b, 3, b"alive");
    undo.data_serial = Some(Tid(100));
    commit_objects(b, 300, &[undo]);
    let r = latest(b, 3);
    assert_eq!(r.serial, Tid(300));
    assert_eq!(r.data, b"alive");
    assert_eq!(r.data_serial, Some(Tid(100)));

    // A deletion carrying a back pointer.
    let mut del = deletion(3);
    del.data_serial = Some(Tid(200));
    commit_objects(b, 400, &[del]);
    let r = latest(b, 3);
    assert_eq!((r.data.len(), r.data_serial), (0, Some(Tid(200))));
    assert_eq!(r.checksum, vec![0u8; 20]);
}

/// Identical (checksum, compression) share one data row.
pub(crate) fn dedup(b: &mut dyn Backend) {
    let a = b.store_data(0, &sha1(b"same"), 0, b"same").unwrap();
    let a2 = b.store_data(1, &sha1(b"same"), 0, b"same").unwrap();
    assert_eq!(a, a2);
    let c = b.store_data(0, &sha1(b"same"), 1, b"same").unwrap();
    assert_ne!(a, c, "different compression must be a different row");
    let d = b.store_data(0, &sha1(b"different"), 0, b"different").unwrap();
    assert_ne!(a, d);
    assert_ne!(c, d);
    // Two objects sharing the row load the same bytes.
    let objs = [
        TempObject { oid: Oid(1), data_id: Some(a), data_serial: None },
        TempObject { oid: Oid(2), data_id: Some(a2), data_serial: None },
        TempObject { oid: Oid(3), data_id: Some(c), data_serial: None },
    ];
    commit_objects(b, 100, &objs);
    assert_eq!(latest(b, 1).data, b"same");
    assert_eq!(latest(b, 2).data, b"same");
    let r = latest(b, 3);
    assert_eq!((r.compression, r.data.as_slice()), (1, &b"same"[..]));
}

/// Voted data is invisible until unlock; metadata and final tid appear at unlock; unlock is
/// idempotent.
pub(crate) fn commit_visibility(b: &mut dyn Backend) {
    let (ttid, tid) = (Tid(50), Tid(60));
    let objs = [store(b, 5, b"five"), store(b, 6, b"six")];
    let meta = meta_for("alice", &objs);
    let mp = part(ttid.0);
    b.vote(ttid, &with_parts(&objs), Some((mp, &meta))).unwrap();
    assert_eq!(load(b, 5, None, None), Load::DoesNotExist);
    assert_eq!(b.last_serial(part(5), Oid(5)).unwrap(), None);
    assert_eq!(locked(b), vec![(ttid, None)]);
    assert_eq!(b.last_ids().unwrap(), (None, Some(Oid(6))));

    b.lock(ttid, tid, &[mp, part(5)]).unwrap();
    let expected = LockedTxn { ttid, tid: Some(tid), partitions: vec![mp, part(5)] };
    assert_eq!(b.locked_transactions().unwrap(), vec![expected.clone()]);
    // Locking again without partitions (verification's validation) keeps them.
    b.lock(ttid, tid, &[]).unwrap();
    assert_eq!(b.locked_transactions().unwrap(), vec![expected]);
    assert_eq!(load(b, 5, None, None), Load::DoesNotExist);
    assert_eq!(b.final_tid(ttid).unwrap(), None);
    assert_eq!(b.transaction(mp, tid).unwrap(), None);

    b.unlock(ttid, tid).unwrap();
    let r = latest(b, 5);
    assert_eq!((r.serial, r.data.as_slice()), (tid, &b"five"[..]));
    assert_eq!(latest(b, 6).data, b"six");
    assert_eq!(b.final_tid(ttid).unwrap(), Some(tid));
    let expected = TxnInfo { tid, ttid, packed: false, meta: meta.clone() };
    assert_eq!(b.transaction(mp, tid).unwrap(), Some(expected.clone()));
    assert_eq!(b.transaction(mp, ttid).unwrap(), None);
    assert!(b.locked_transactions().unwrap().is_empty());
    assert_eq!(b.last_ids().unwrap(), (Some(tid), Some(Oid(6))));

    // Idempotent.
    b.unlock(ttid, tid).unwrap();
    assert_eq!(latest(b, 5).serial, tid);
    assert_eq!(b.transaction(mp, tid).unwrap(), Some(expected));
    assert!(b.locked_transactions().unwrap().is_empty());

    // Empty metadata round-trips.
    let objs = [store(b, 7, b"seven")];
    let empty = TxnMeta::default();
    b.vote(Tid(70), &with_parts(&objs), Some((part(70), &empty))).unwrap();
    b.lock(Tid(70), Tid(80), &[]).unwrap();
    b.unlock(Tid(70), Tid(80)).unwrap();
    let t = b.transaction(part(70), Tid(80)).unwrap().unwrap();
    assert_eq!(t.meta, empty);
}

/// Only the node given metadata at vote stores the transaction; several votes add up.
pub(crate) fn metadata_only_on_holders(b: &mut dyn Backend) {
    let objs = [store(b, 1, b"one")];
    b.vote(Tid(70), &with_parts(&objs), None).unwrap();
    b.lock(Tid(70), Tid(80), &[]).unwrap();
    b.unlock(Tid(70), Tid(80)).unwrap();
    assert_eq!(latest(b, 1).serial, Tid(80));
    for p in 0..NP {
        assert_eq!(b.transaction(p, Tid(80)).unwrap(), None);
    }
    assert_eq!(b.final_tid(Tid(70)).unwrap(), None);
    assert_eq!(b.last_ids().unwrap(), (None, Some(Oid(1))));

    // Metadata first, then more objects without it: metadata kept.
    let first = [store(b, 2, b"two")];
    let second = [store(b, 3, b"three")];
    let meta = meta_for("bob", &[first[0].clone(), second[0].clone()]);
    b.vote(Tid(90), &with_parts(&first), Some((part(90), &meta))).unwrap();
    b.vote(Tid(90), &with_parts(&second), None).unwrap();
    b.lock(Tid(90), Tid(95), &[]).unwrap();
    b.unlock(Tid(90), Tid(95)).unwrap();
    assert_eq!(latest(b, 2).serial, Tid(95));
    assert_eq!(latest(b, 3).serial, Tid(95));
    assert_eq!(b.transaction(part(90), Tid(95)).unwrap().unwrap().meta, meta);

    // Objects first, metadata later.
    let first = [store(b, 4, b"four")];
    let second = [store(b, 5, b"five")];
    let meta = meta_for("carol", &[first[0].clone(), second[0].clone()]);
    b.vote(Tid(110), &with_parts(&first), None).unwrap();
    b.vote(Tid(110), &with_parts(&second), Some((part(110), &meta))).unwrap();
    b.lock(Tid(110), Tid(120), &[]).unwrap();
    b.unlock(Tid(110), Tid(120)).unwrap();
    assert_eq!(latest(b, 4).data, b"four");
    assert_eq!(latest(b, 5).data, b"five");
    let t = b.transaction(part(110), Tid(120)).unwrap().unwrap();
    assert_eq!((t.ttid, t.meta), (Tid(110), meta));
    assert_eq!(b.final_tid(Tid(110)).unwrap(), Some(Tid(120)));

    // Metadata only, no object on this node.
    let meta = TxnMeta { oids: vec![Oid(42)], ..meta_for("dave", &[]) };
    b.vote(Tid(130), &[], Some((part(130), &meta))).unwrap();
    b.lock(Tid(130), Tid(140), &[]).unwrap();
    b.unlock(Tid(130), Tid(140)).unwrap();
    assert_eq!(b.transaction(part(130), Tid(140)).unwrap().unwrap().meta, meta);
}

/// Abort drops temporary data and the data rows nothing else uses.
pub(crate) fn abort_prunes(b: &mut dyn Backend) {
    commit(b, 100, &[(1, Some(b"shared"))]);
    let objs = [store(b, 2, b"shared"), store(b, 3, b"unique"), deletion(4)];
    let (shared_id, unique_id) = (objs[0].data_id.unwrap(), objs[1].data_id.unwrap());
    let meta = meta_for("eve", &objs);
    b.vote(Tid(200), &with_parts(&objs), Some((part(200), &meta))).unwrap();
    assert_eq!(b.last_ids().unwrap().1, Some(Oid(4)));
    b.abort(Tid(200)).unwrap();
    assert!(b.locked_transactions().unwrap().is_empty());
    for oid in [2, 3, 4] {
        assert_eq!(load(b, oid, None, None), Load::DoesNotExist);
    }
    assert_eq!(b.last_ids().unwrap(), (Some(Tid(100)), Some(Oid(1))));
    assert_eq!(latest(b, 1).data, b"shared");
    assert!(data_row_is(b, b"shared", shared_id), "data shared with a committed object was deleted");
    assert!(!data_row_is(b, b"unique", unique_id), "unreferenced data row survived abort");
    // Abort after unlock, or of an unknown ttid: no-op.
    b.abort(Tid(99)).unwrap();
    b.abort(Tid(12345)).unwrap();
    assert_eq!(latest(b, 1).data, b"shared");

    // Data stored by a transaction that has not voted yet survives other aborts...
    let pending = b.store_data(0, &sha1(b"pending"), 0, b"pending").unwrap();
    b.abort(Tid(300)).unwrap();
    assert!(data_row_is(b, b"pending", pending));
    // ...and is removed once nothing is in flight any more.
    b.drop_unfinished().unwrap();
    assert!(!data_row_is(b, b"pending", pending));
    assert_eq!(latest(b, 1).data, b"shared");
}

/// Two transactions get the same deduplicated row; aborting the first keeps it for the second.
pub(crate) fn shared_data_survives_abort(b: &mut dyn Backend) {
    let t1 = [store(b, 1, b"dup")];
    let t2 = [store(b, 2, b"dup")];
    assert_eq!(t1[0].data_id, t2[0].data_id);
    b.vote(Tid(10), &with_parts(&t1), None).unwrap();
    b.abort(Tid(10)).unwrap();
    b.vote(Tid(20), &with_parts(&t2), None).unwrap();
    // Also after both voted: aborting one keeps the row referenced by the other.
    let t3 = [store(b, 3, b"dup")];
    b.vote(Tid(30), &with_parts(&t3), None).unwrap();
    b.abort(Tid(30)).unwrap();
    b.lock(Tid(20), Tid(25), &[]).unwrap();
    b.unlock(Tid(20), Tid(25)).unwrap();
    let r = latest(b, 2);
    assert_eq!((r.serial, r.data.as_slice()), (Tid(25), &b"dup"[..]));
    assert_eq!(load(b, 1, None, None), Load::DoesNotExist);
    assert_eq!(load(b, 3, None, None), Load::DoesNotExist);
}

/// locked_transactions lists voted and locked transactions; final_tid finds committed ones.
pub(crate) fn locked_and_final(b: &mut dyn Backend) {
    assert!(b.locked_transactions().unwrap().is_empty());
    let o1 = [store(b, 1, b"a")];
    b.vote(Tid(10), &with_parts(&o1), None).unwrap();
    let o2 = [store(b, 2, b"b")];
    let m2 = meta_for("m2", &o2);
    b.vote(Tid(20), &with_parts(&o2), Some((part(20), &m2))).unwrap();
    b.lock(Tid(20), Tid(25), &[]).unwrap();
    // Lock without a vote on this node (its objects are elsewhere): still recorded.
    b.lock(Tid(30), Tid(35), &[]).unwrap();
    assert_eq!(sorted_locked(b), vec![(Tid(10), None), (Tid(20), Some(Tid(25))), (Tid(30), Some(Tid(35)))]);
    b.unlock(Tid(20), Tid(25)).unwrap();
    assert_eq!(b.final_tid(Tid(20)).unwrap(), Some(Tid(25)));
    assert_eq!(b.final_tid(Tid(10)).unwrap(), None);
    assert_eq!(b.final_tid(Tid(25)).unwrap(), None);
    assert_eq!(sorted_locked(b), vec![(Tid(10), None), (Tid(30), Some(Tid(35)))]);
    b.unlock(Tid(30), Tid(35)).unwrap();
    b.abort(Tid(10)).unwrap();
    assert!(b.locked_transactions().unwrap().is_empty());
    // Large TIDs (the largest storable one).
    let o = [store(b, 3, b"c")];
    let m = meta_for("max", &o);
    b.vote(Tid(Tid::MAX.0 - 1), &with_parts(&o), Some((0, &m))).unwrap();
    b.lock(Tid(Tid::MAX.0 - 1), Tid::MAX, &[]).unwrap();
    assert_eq!(locked(b), vec![(Tid(Tid::MAX.0 - 1), Some(Tid::MAX))]);
    b.unlock(Tid(Tid::MAX.0 - 1), Tid::MAX).unwrap();
    assert_eq!(b.final_tid(Tid(Tid::MAX.0 - 1)).unwrap(), Some(Tid::MAX));
    assert_eq!(latest(b, 3).serial, Tid::MAX);
    assert_eq!(found(load(b, 3, None, Some(u64::MAX))).serial, Tid::MAX);
    assert_eq!(found(load(b, 3, Some(Tid::MAX.0), None)).serial, Tid::MAX);
    assert_eq!(b.last_ids().unwrap().0, Some(Tid::MAX));
}

/// drop_unfinished forgets voted-only transactions and keeps locked ones.
pub(crate) fn drop_unfinished(b: &mut dyn Backend) {
    commit(b, 5, &[(1, Some(b"base"))]);
    let o1 = [store(b, 1000, b"unfinished"), store(b, 1, b"unfinished-1")];
    b.vote(Tid(10), &with_parts(&o1), Some((part(10), &meta_for("u", &o1)))).unwrap();
    let o2 = [store(b, 8, b"locked")];
    let m2 = meta_for("l", &o2);
    b.vote(Tid(20), &with_parts(&o2), Some((part(20), &m2))).unwrap();
    b.lock(Tid(20), Tid(25), &[]).unwrap();
    assert_eq!(b.last_ids().unwrap().1, Some(Oid(1000)));

    b.drop_unfinished().unwrap();
    assert_eq!(locked(b), vec![(Tid(20), Some(Tid(25)))]);
    assert_eq!(b.last_ids().unwrap(), (Some(Tid(5)), Some(Oid(8))));
    assert_eq!(load(b, 1000, None, None), Load::DoesNotExist);
    assert_eq!(latest(b, 1).data, b"base");
    assert!(!data_row_is(b, b"unfinished", o1[0].data_id.unwrap()));

    b.unlock(Tid(20), Tid(25)).unwrap();
    assert_eq!(latest(b, 8).data, b"locked");
    assert_eq!(b.transaction(part(20), Tid(25)).unwrap().unwrap().meta, m2);
    assert!(b.locked_transactions().unwrap().is_empty());
    b.drop_unfinished().unwrap();
    assert_eq!(latest(b, 8).data, b"locked");
    assert_eq!(latest(b, 1).data, b"base");
}

/// save_pt / load_pt round trip (cell order within a row is not significant).
pub(crate) fn partition_table(b: &mut dyn Backend) {
    assert_eq!(b.load_pt().unwrap(), None);
    let mut pt = PartitionTable::make(5, 1, &[s(1), s(2), s(3)]).unwrap();
    pt.commit_changes(&[
        CellChange { partition: 0, nid: s(1), state: CellState::OutOfDate },
        CellChange { partition: 1, nid: s(3), state: CellState::Feeding },
        CellChange { partition: 2, nid: s(2), state: CellState::Corrupted },
        CellChange { partition: 4, nid: Nid(0x7fff_ffff), state: CellState::OutOfDate },
    ]);
    b.save_pt(&pt).unwrap();
    let loaded = b.load_pt().unwrap().unwrap();
    assert_eq!(sorted_pt(&loaded), sorted_pt(&pt));
    assert_eq!(loaded.ptid, Ptid(2));

    // Replacing with a smaller table with empty rows.
    let mut empty = PartitionTable::new(3, 2);
    empty.ptid = Ptid(7);
    b.save_pt(&empty).unwrap();
    assert_eq!(b.load_pt().unwrap(), Some(empty));

    // Large ptid, one cell.
    let one = PartitionTable::from_rows(Ptid(u64::MAX), 0, vec![vec![Cell { nid: s(9), state: CellState::UpToDate }]])
        .unwrap();
    b.save_pt(&one).unwrap();
    assert_eq!(b.load_pt().unwrap(), Some(one));
}

/// last_ids covers committed transactions and committed and voted oids.
pub(crate) fn last_ids(b: &mut dyn Backend) {
    assert_eq!(b.last_ids().unwrap(), (None, None));
    commit(b, 100, &[(3, Some(b"x"))]);
    assert_eq!(b.last_ids().unwrap(), (Some(Tid(100)), Some(Oid(3))));
    commit(b, 150, &[(2, Some(b"y")), (1, None)]);
    assert_eq!(b.last_ids().unwrap(), (Some(Tid(150)), Some(Oid(3))));
    // Voted only: oid counted, tid not.
    let o = [store(b, 9, b"z")];
    b.vote(Tid(200), &with_parts(&o), Some((part(200), &meta_for("v", &o)))).unwrap();
    assert_eq!(b.last_ids().unwrap(), (Some(Tid(150)), Some(Oid(9))));
    b.lock(Tid(200), Tid(210), &[]).unwrap();
    assert_eq!(b.last_ids().unwrap(), (Some(Tid(150)), Some(Oid(9))));
    b.unlock(Tid(200), Tid(210)).unwrap();
    assert_eq!(b.last_ids().unwrap(), (Some(Tid(210)), Some(Oid(9))));
    // Every partition counts, whichever has the highest values.
    commit(b, 300, &[(4, Some(b"w"))]);
    assert_eq!(b.last_ids().unwrap(), (Some(Tid(300)), Some(Oid(9))));
    let o = [store(b, 17, b"q")];
    b.vote(Tid(400), &with_parts(&o), None).unwrap();
    assert_eq!(b.last_ids().unwrap(), (Some(Tid(300)), Some(Oid(17))));
    b.abort(Tid(400)).unwrap();
    assert_eq!(b.last_ids().unwrap(), (Some(Tid(300)), Some(Oid(9))));
}

/// Configuration keys: set, overwrite, delete.
pub(crate) fn config(b: &mut dyn Backend) {
    assert_eq!(b.get_config("nid").unwrap(), None);
    b.set_config("nid", Some("S1")).unwrap();
    assert_eq!(b.get_config("nid").unwrap().as_deref(), Some("S1"));
    b.set_config("nid", Some("S2")).unwrap();
    assert_eq!(b.get_config("nid").unwrap().as_deref(), Some("S2"));
    b.set_config("other", Some("")).unwrap();
    assert_eq!(b.get_config("other").unwrap().as_deref(), Some(""));
    b.set_config("nid", None).unwrap();
    assert_eq!(b.get_config("nid").unwrap(), None);
    assert_eq!(b.get_config("other").unwrap().as_deref(), Some(""));
    b.set_config("missing", None).unwrap();
    b.set_config("unicode", Some("clüster ✓")).unwrap();
    assert_eq!(b.get_config("unicode").unwrap().as_deref(), Some("clüster ✓"));
    // The cluster name is stored at open.
    assert_eq!(b.get_config("name").unwrap().as_deref(), Some(CLUSTER));
}

/// Records of 0 B, 1 B, 1 MiB and 20 MiB are stored and loaded intact.
pub(crate) fn record_sizes(b: &mut dyn Backend) {
    let sizes = [0usize, 1, 1 << 20, 20 << 20];
    let datas: Vec<Vec<u8>> =
        sizes.iter().map(|n| (0..*n).map(|i| (i.wrapping_mul(7) % 251) as u8).collect()).collect();
    let objs: Vec<TempObject> = datas.iter().enumerate().map(|(i, d)| store(b, 10 + i as u64, d)).collect();
    commit_objects(b, 100, &objs);
    for (i, d) in datas.iter().enumerate() {
        let r = latest(b, 10 + i as u64);
        assert_eq!(r.data.len(), d.len());
        assert!(r.data == *d, "record of {} bytes differs", d.len());
        assert_eq!(r.checksum, sha1(d));
    }
    // A compressed record keeps its compression flag.
    let z = b"x\x9c\x03\x00\x00\x00\x00\x01";
    let id = b.store_data(0, &sha1(z), 1, z).unwrap();
    commit_objects(b, 200, &[TempObject { oid: Oid(20), data_id: Some(id), data_serial: None }]);
    let r = latest(b, 20);
    assert_eq!((r.compression, r.data.as_slice()), (1, &z[..]));
}

/// Random sequences of commits of records of every size (0 B to 3 MiB; for MySQL, with a small
/// chunk size, many across chunk boundaries) and shape (random, zeros, repeated, the same
/// record again: deduplicated), through both ways a vote writes (`vote_data`, and `store_data`
/// then `vote`), raw and compressed: every revision loads back as it was stored, with its
/// checksum and compression, after any later commit.
pub(crate) fn random_records_round_trip(b: &mut dyn Backend) {
    use std::collections::BTreeMap;
    let mut rng = fastrand::Rng::with_seed(18);
    let mut committed: BTreeMap<(u64, u64), (u32, Vec<u8>)> = BTreeMap::new();
    let mut previous: Vec<Vec<u8>> = vec![Vec::new()];
    for round in 0..40u64 {
        let tid = 100 + round * 10;
        let mut objects = Vec::new();
        for k in 0..rng.u64(1..6) {
            let n = match rng.u8(0..4) {
                0 => rng.usize(0..300),
                1 => rng.usize(0..70_000),
                2 => ((1usize << rng.u32(6..=21)) + rng.usize(0..3)).saturating_sub(1),
                _ => rng.usize(0..(3 << 20)),
            };
            let data: Vec<u8> = match rng.u8(0..4) {
                0 => std::iter::repeat_with(|| rng.u8(..)).take(n).collect(),
                1 => vec![0; n],
                2 => previous[rng.usize(..previous.len())].clone(),
                _ => (0..n).map(|i| (i as u64 * 7 + tid) as u8).collect(),
            };
            previous.push(data.clone());
            objects.push((round * 8 + k + 1, rng.u32(0..2), data));
        }
        if rng.bool() {
            let new: Vec<(u32, super::NewObject)> = objects
                .iter()
                .map(|(oid, compression, d)| {
                    let data = super::NewData { checksum: sha1(d), compression: *compression, data: d.clone() };
                    (part(*oid), super::NewObject { oid: Oid(*oid), data: Some(data), data_serial: None })
                })
                .collect();
            b.vote_data(Tid(tid - 1), &new, None).unwrap();
        } else {
            let temp: Vec<(u32, TempObject)> = objects
                .iter()
                .map(|(oid, compression, d)| {
                    let id = b.store_data(part(*oid), &sha1(d), *compression, d).unwrap();
                    (part(*oid), TempObject { oid: Oid(*oid), data_id: Some(id), data_serial: None })
                })
                .collect();
            b.vote(Tid(tid - 1), &temp, None).unwrap();
        }
        b.lock(Tid(tid - 1), Tid(tid), &[]).unwrap();
        b.unlock(Tid(tid - 1), Tid(tid)).unwrap();
        for (oid, compression, d) in objects {
            committed.insert((oid, tid), (compression, d));
        }
        // Every revision so far, in random order.
        let mut keys: Vec<&(u64, u64)> = committed.keys().collect();
        rng.shuffle(&mut keys);
        for key @ (oid, tid) in keys.into_iter().take(12) {
            let r = found(load(b, *oid, Some(*tid), None));
            let (compression, d) = &committed[key];
            assert!(r.data == *d, "oid {oid} at {tid}: {} bytes back for {}", r.data.len(), d.len());
            assert_eq!((r.compression, r.checksum.as_slice()), (*compression, sha1(d).as_slice()));
        }
    }
}

// --- history, undo log, iterator, undo, pack

/// Every partition of the suite.
const ALL: [u32; NP as usize] = [0, 1, 2, 3];

fn history(b: &mut dyn Backend, oid: u64, offset: u32, length: u32) -> Vec<(u64, u64)> {
    b.object_history(part(oid), Oid(oid), offset, length).unwrap().into_iter().map(|(t, n)| (t.0, n)).collect()
}

fn tids(b: &mut dyn Backend, partitions: &[u32], offset: u32, length: u32) -> Vec<u64> {
    b.tids(partitions, offset, length).unwrap().into_iter().map(|t| t.0).collect()
}

fn tids_from(b: &mut dyn Backend, partitions: &[u32], min: u64, max: u64, length: u32) -> Vec<u64> {
    b.tids_from(partitions, Tid(min), Tid(max), length).unwrap().into_iter().map(|t| t.0).collect()
}

/// undo_info as (current, undo_serial, is_current).
fn undo(b: &mut dyn Backend, oid: u64, undone: u64, before: Option<u64>) -> Option<(u64, Option<u64>, bool)> {
    b.undo_info(part(oid), Oid(oid), Tid(undone), before.map(Tid))
        .unwrap()
        .map(|u| (u.current.0, u.undo_serial.map(|t| t.0), u.is_current))
}

/// A revision of `oid` reusing the data of revision `serial` (an undo): same data, back-pointer.
fn back_pointer(b: &mut dyn Backend, oid: u64, data: &[u8], serial: u64) -> TempObject {
    TempObject { data_serial: Some(Tid(serial)), ..store(b, oid, data) }
}

fn packed(b: &mut dyn Backend, tid: u64) -> bool {
    b.transaction(part(tid - 1), Tid(tid)).unwrap().unwrap().packed
}

/// object_history: committed revisions newest first, offset and length, sizes as stored (0 for
/// a deletion).
pub(crate) fn object_history(b: &mut dyn Backend) {
    commit(b, 100, &[(1, Some(b"a")), (2, Some(b"two"))]);
    commit(b, 200, &[(1, Some(b"bbbb"))]);
    commit(b, 300, &[(1, None)]);
    commit(b, 400, &[(1, Some(b"cc"))]);
    // A compressed record: the size of its stored (compressed) bytes.
    let z = b"x\x9c\x03\x00\x00\x00\x00\x01";
    let id = b.store_data(part(1), &sha1(z), 1, z).unwrap();
    commit_objects(b, 500, &[TempObject { oid: Oid(1), data_id: Some(id), data_serial: None }]);
    // An undo: the size of the data it reuses.
    let u = back_pointer(b, 1, b"bbbb", 200);
    commit_objects(b, 600, &[u]);

    let all = vec![(600, 4), (500, 8), (400, 2), (300, 0), (200, 4), (100, 1)];
    assert_eq!(history(b, 1, 0, 100), all);
    assert_eq!(history(b, 1, 0, u32::MAX), all);
    assert_eq!(history(b, 1, 0, 6), all);
    assert_eq!(history(b, 1, 0, 1), [(600, 4)]);
    assert_eq!(history(b, 1, 1, 2), [(500, 8), (400, 2)]);
    assert_eq!(history(b, 1, 3, 1), [(300, 0)]);
    assert_eq!(history(b, 1, 5, 10), [(100, 1)]);
    assert!(history(b, 1, 6, 10).is_empty());
    assert!(history(b, 1, u32::MAX, u32::MAX).is_empty());
    assert!(history(b, 1, 0, 0).is_empty());
    assert_eq!(history(b, 2, 0, 10), [(100, 3)]);
    // Unknown object; known object asked in the wrong partition.
    assert!(history(b, 9, 0, 10).is_empty());
    assert!(b.object_history(part(1) + 1, Oid(1), 0, 10).unwrap().is_empty());
    // Voted and locked: not yet a revision.
    let o = [store(b, 2, b"voted")];
    b.vote(Tid(700), &with_parts(&o), None).unwrap();
    b.lock(Tid(700), Tid(710), &[]).unwrap();
    assert_eq!(history(b, 2, 0, 10), [(100, 3)]);
    b.unlock(Tid(700), Tid(710)).unwrap();
    assert_eq!(history(b, 2, 0, 10), [(710, 5), (100, 3)]);
}

/// tids (undo log): newest first, offset and length, packed ones hidden; tids_from (iterator):
/// oldest first within inclusive bounds, packed ones included. Both only see transactions whose
/// metadata is in the given partitions.
pub(crate) fn tids_and_tids_from(b: &mut dyn Backend) {
    // Metadata in partition(ttid = tid - 1): 101 → 0, 202 → 1, 303 → 2, 404 → 3, 505 → 0, 606 → 1.
    for (i, tid) in [101u64, 202, 303, 404, 505, 606].into_iter().enumerate() {
        commit(b, tid, &[(i as u64 + 1, Some(format!("v{tid}").as_bytes()))]);
    }
    // Objects without metadata on this node: not one of its transactions.
    let o = [store(b, 9, b"nine")];
    b.vote(Tid(700), &with_parts(&o), None).unwrap();
    b.lock(Tid(700), Tid(707), &[]).unwrap();
    b.unlock(Tid(700), Tid(707)).unwrap();
    // Locked, not unlocked: not committed yet (metadata in partition 3).
    let o = [store(b, 10, b"ten")];
    b.vote(Tid(807), &with_parts(&o), Some((part(807), &meta_for("locked", &o)))).unwrap();
    b.lock(Tid(807), Tid(808), &[]).unwrap();

    assert_eq!(tids(b, &ALL, 0, 100), [606, 505, 404, 303, 202, 101]);
    assert_eq!(tids(b, &ALL, 0, u32::MAX), [606, 505, 404, 303, 202, 101]);
    assert_eq!(tids(b, &ALL, 2, 2), [404, 303]);
    assert_eq!(tids(b, &ALL, 5, 10), [101]);
    assert!(tids(b, &ALL, 6, 10).is_empty());
    assert!(tids(b, &ALL, u32::MAX, 10).is_empty());
    assert!(tids(b, &ALL, 0, 0).is_empty());
    assert_eq!(tids(b, &[0], 0, 10), [505, 101]);
    assert_eq!(tids(b, &[3, 1, 1], 0, 10), [606, 404, 202]);
    assert_eq!(tids(b, &[1], 1, 1), [202]);
    assert!(tids(b, &[7], 0, 10).is_empty());
    assert!(tids(b, &[], 0, 10).is_empty());

    assert_eq!(tids_from(b, &ALL, 0, u64::MAX, 100), [101, 202, 303, 404, 505, 606]);
    assert_eq!(tids_from(b, &ALL, 0, u64::MAX, u32::MAX), [101, 202, 303, 404, 505, 606]);
    assert_eq!(tids_from(b, &ALL, 202, 505, 100), [202, 303, 404, 505]);
    assert_eq!(tids_from(b, &ALL, 203, 504, 100), [303, 404]);
    assert_eq!(tids_from(b, &ALL, 202, 505, 2), [202, 303]);
    assert_eq!(tids_from(b, &ALL, 303, 303, 10), [303]);
    assert_eq!(tids_from(b, &ALL, 304, 404, 1), [404]);
    assert!(tids_from(b, &ALL, 505, 202, 10).is_empty());
    assert!(tids_from(b, &ALL, 0, u64::MAX, 0).is_empty());
    assert!(tids_from(b, &ALL, 607, u64::MAX, 10).is_empty());
    assert!(tids_from(b, &ALL, u64::MAX, u64::MAX, 10).is_empty());
    assert_eq!(tids_from(b, &[1], 0, u64::MAX, 10), [202, 606]);
    assert_eq!(tids_from(b, &[2, 0, 2], 200, u64::MAX, 10), [303, 505]);
    assert!(tids_from(b, &[], 0, u64::MAX, 10).is_empty());

    // The largest storable TID.
    b.unlock(Tid(807), Tid(808)).unwrap();
    commit(b, Tid::MAX.0, &[(11, Some(b"max"))]);
    let max = Tid::MAX.0;
    assert_eq!(tids(b, &ALL, 0, 3), [max, 808, 606]);
    assert_eq!(tids_from(b, &ALL, 700, u64::MAX, 10), [808, max]);
    assert_eq!(tids_from(b, &ALL, max, max, 10), [max]);
    assert_eq!(tids_from(b, &ALL, max, u64::MAX, 10), [max]);
    assert_eq!(tids_from(b, &ALL, 0, max - 1, 10), [101, 202, 303, 404, 505, 606, 808]);

    // Packed transactions leave the undo log, not the iterator; only the packed partitions.
    b.pack(&[0, 1, 2], Tid(505)).unwrap();
    assert!(packed(b, 101) && packed(b, 202) && packed(b, 303) && packed(b, 505));
    assert!(!packed(b, 404) && !packed(b, 606) && !packed(b, 808));
    assert_eq!(tids(b, &ALL, 0, 100), [max, 808, 606, 404]);
    assert_eq!(tids(b, &ALL, 1, 2), [808, 606]);
    assert!(tids(b, &[0], 0, 100).is_empty());
    assert_eq!(tids(b, &[3], 0, 100), [808, 404]);
    assert_eq!(tids_from(b, &ALL, 0, u64::MAX, 100), [101, 202, 303, 404, 505, 606, 808, max]);
    assert_eq!(tids_from(b, &[0], 0, u64::MAX, 100), [101, 505]);
    b.pack(&ALL, Tid(max)).unwrap();
    assert!(tids(b, &ALL, 0, 100).is_empty());
    assert_eq!(tids_from(b, &ALL, 0, u64::MAX, 100), [101, 202, 303, 404, 505, 606, 808, max]);
}

/// undo_info: current revision, the data to go back to (through back-pointers) and whether the
/// undone data is current, as NEO's findUndoTID.
pub(crate) fn undo_info(b: &mut dyn Backend) {
    commit(b, 100, &[(1, Some(b"v1"))]);
    commit(b, 200, &[(1, Some(b"v2"))]);
    commit(b, 300, &[(1, Some(b"v3"))]);
    // Undo of the latest revision: it is current, back to the previous one.
    assert_eq!(
        b.undo_info(part(1), Oid(1), Tid(300), None).unwrap(),
        Some(UndoInfo { current: Tid(300), undo_serial: Some(Tid(200)), is_current: true })
    );
    // Undo of an older revision, changed since: not current.
    assert_eq!(undo(b, 1, 200, None), Some((300, Some(100), false)));
    // Undo of the creation: nothing to go back to.
    assert_eq!(undo(b, 1, 100, None), Some((300, None, false)));
    // `before` bounds the current revision (exclusive).
    assert_eq!(undo(b, 1, 200, Some(300)), Some((200, Some(100), true)));
    assert_eq!(undo(b, 1, 200, Some(201)), Some((200, Some(100), true)));
    assert_eq!(undo(b, 1, 200, Some(200)), Some((100, Some(100), false)));
    assert_eq!(undo(b, 1, 100, Some(101)), Some((100, None, true)));
    assert_eq!(undo(b, 1, 300, Some(u64::MAX)), Some((300, Some(200), true)));
    // No revision before the snapshot.
    assert_eq!(undo(b, 1, 100, Some(100)), None);
    assert_eq!(undo(b, 1, 100, Some(0)), None);

    // 300 undone by 400: a back-pointer to the data of 200.
    let u = back_pointer(b, 1, b"v2", 200);
    commit_objects(b, 400, &[u]);
    // Undoing the undo goes back to 300...
    assert_eq!(undo(b, 1, 400, None), Some((400, Some(300), true)));
    // ...300 is not current any more, but 200 is, through the back-pointer.
    assert_eq!(undo(b, 1, 300, None), Some((400, Some(200), false)));
    assert_eq!(undo(b, 1, 200, None), Some((400, Some(100), true)));
    // 400 undone by 500 (a redo): a back-pointer to the data of 300.
    let r = back_pointer(b, 1, b"v3", 300);
    commit_objects(b, 500, &[r]);
    // Undoing the redo goes back to the data of 400, that is of 200 (resolved back-pointer).
    assert_eq!(undo(b, 1, 500, None), Some((500, Some(200), true)));
    assert_eq!(undo(b, 1, 400, None), Some((500, Some(300), false)));
    assert_eq!(undo(b, 1, 300, None), Some((500, Some(200), true)));
    assert_eq!(undo(b, 1, 300, Some(500)), Some((400, Some(200), false)));

    // Deletions.
    commit(b, 600, &[(2, Some(b"x"))]);
    commit(b, 700, &[(2, None)]);
    assert_eq!(undo(b, 2, 700, None), Some((700, Some(600), true)));
    commit(b, 800, &[(2, Some(b"y"))]);
    // The revision before 800 is a deletion: undoing 800 goes back to it (deleted).
    assert_eq!(undo(b, 2, 800, None), Some((800, Some(700), true)));
    assert_eq!(undo(b, 2, 700, None), Some((800, Some(600), false)));
    assert_eq!(undo(b, 2, 600, None), Some((800, None, false)));

    // Unknown: object, revision, partition; the largest TIDs; a revision not committed yet.
    assert_eq!(undo(b, 9, 100, None), None);
    assert_eq!(undo(b, 1, 150, None), None);
    assert_eq!(undo(b, 1, 600, None), None);
    assert_eq!(undo(b, 1, u64::MAX, None), None);
    assert_eq!(undo(b, 1, Tid::MAX.0, None), None);
    assert_eq!(b.undo_info(part(1) + 1, Oid(1), Tid(100), None).unwrap(), None);
    let o = [store(b, 1, b"voted")];
    b.vote(Tid(900), &with_parts(&o), None).unwrap();
    b.lock(Tid(900), Tid(910), &[]).unwrap();
    assert_eq!(undo(b, 1, 910, None), None);
    b.unlock(Tid(900), Tid(910)).unwrap();
    assert_eq!(undo(b, 1, 910, None), Some((910, Some(300), true)));
    assert_eq!(undo(b, 1, 910, Some(910)), Some((500, Some(300), false)));
}

/// pack: per object, the revisions older than the newest one <= the pack TID go, and that one
/// too if it is a deletion; metadata is marked packed; data rows nothing references any more
/// go, those still used by other objects, temporary objects or held by a store are kept; only
/// the given partitions; idempotent.
pub(crate) fn pack(b: &mut dyn Backend) {
    // Metadata in partition(tid - 1): 101 → 0, 202 → 1, 204 → 3, 303 → 2, 404 → 3, 505 → 0.
    // Objects of partitions 0, 1, 2 (packed), and 3 (not packed): oid 3.
    let a1 = store(b, 1, b"a1");
    let a2 = store(b, 1, b"a2");
    let a3 = store(b, 1, b"a3");
    let b1 = store(b, 2, b"b1");
    let c1 = store(b, 5, b"c1");
    let shared = store(b, 4, b"shared");
    let p3 = store(b, 3, b"p3-old");
    let id = |o: &TempObject| o.data_id.unwrap();
    let (id_a1, id_a2, id_a3, id_b1, id_c1, id_shared, id_p3) =
        (id(&a1), id(&a2), id(&a3), id(&b1), id(&c1), id(&shared), id(&p3));
    let mut v101 = vec![a1, b1, c1, shared, p3];
    v101.push(store(b, 8, b"shared"));
    v101.push(store(b, 6, b"t-old"));
    v101.push(store(b, 9, b"h-old"));
    v101.push(store(b, 12, b"x"));
    commit_objects(b, 101, &v101);
    let v202 = [a2, deletion(2), store(b, 4, b"d2"), store(b, 6, b"t-new"), store(b, 9, b"h-new")];
    commit_objects(b, 202, &v202);
    commit(b, 204, &[(3, Some(b"p3-new"))]);
    commit_objects(b, 303, &[a3, deletion(5)]);
    commit(b, 404, &[(1, Some(b"a4")), (13, Some(b"new"))]);
    commit(b, 505, &[(5, Some(b"c2")), (12, Some(b"y"))]);
    // Voted, not committed: references the data of oid 6 at 101.
    let t = [store(b, 10, b"t-old")];
    b.vote(Tid(350), &with_parts(&t), None).unwrap();
    // Stored, not voted yet: holds the data of oid 9 at 101.
    let held = store(b, 9, b"h-old");

    let check = |b: &mut dyn Backend| {
        // Old revisions are gone, the newest one <= 303 and the newer ones are kept.
        assert_eq!(history(b, 1, 0, 10), [(404, 2), (303, 2)]);
        assert_eq!(load(b, 1, Some(101), None), Load::NotFound);
        assert_eq!(load(b, 1, Some(202), None), Load::NotFound);
        assert_eq!(load(b, 1, None, Some(303)), Load::NotFound);
        let r = found(load(b, 1, Some(303), None));
        assert_eq!((r.data.as_slice(), r.next_serial), (&b"a3"[..], Some(Tid(404))));
        assert_eq!(latest(b, 1).data, b"a4");
        // Deleted at 202 <= 303: gone.
        assert_eq!(load(b, 2, None, None), Load::DoesNotExist);
        assert_eq!(load(b, 2, Some(101), None), Load::DoesNotExist);
        assert!(history(b, 2, 0, 10).is_empty());
        assert_eq!(b.last_serial(part(2), Oid(2)).unwrap(), None);
        // Deleted at 303, created again at 505: only 505.
        assert_eq!(history(b, 5, 0, 10), [(505, 2)]);
        assert_eq!(load(b, 5, Some(303), None), Load::NotFound);
        assert_eq!(load(b, 5, None, Some(505)), Load::NotFound);
        assert_eq!(latest(b, 5).data, b"c2");
        // Newest revision <= 303 far older than 303: kept.
        assert_eq!(history(b, 12, 0, 10), [(505, 1), (101, 1)]);
        assert_eq!(found(load(b, 12, Some(101), None)).data, b"x");
        // Created after 303: untouched.
        assert_eq!(history(b, 13, 0, 10), [(404, 3)]);
        // Data shared with a kept revision of another object.
        assert_eq!(history(b, 4, 0, 10), [(202, 2)]);
        assert_eq!(latest(b, 8).data, b"shared");
        assert_eq!(history(b, 6, 0, 10), [(202, 5)]);
        assert_eq!(history(b, 9, 0, 10), [(202, 5)]);
        // Partition 3 is not packed.
        assert_eq!(history(b, 3, 0, 10), [(204, 6), (101, 6)]);
        assert_eq!(found(load(b, 3, Some(101), None)).data, b"p3-old");
        // Metadata: kept, marked packed up to 303 in the packed partitions.
        assert!(packed(b, 101) && packed(b, 202) && packed(b, 303));
        assert!(!packed(b, 204) && !packed(b, 404) && !packed(b, 505));
        assert_eq!(b.transaction(part(100), Tid(101)).unwrap().unwrap().meta.user, b"user101");
        assert_eq!(tids(b, &ALL, 0, 10), [505, 404, 204]);
        assert_eq!(tids_from(b, &ALL, 0, u64::MAX, 10), [101, 202, 204, 303, 404, 505]);
        // Packed revisions cannot be undone.
        assert_eq!(undo(b, 1, 202, None), None);
        assert_eq!(undo(b, 1, 404, None), Some((404, Some(303), true)));
        // The oldest revision left looks like a creation.
        assert_eq!(undo(b, 1, 303, None), Some((404, None, false)));
        // Temporary data is untouched.
        assert_eq!(locked(b), vec![(Tid(350), None)]);
        assert_eq!(b.last_ids().unwrap(), (Some(Tid(505)), Some(Oid(13))));
    };
    b.pack(&[0, 1, 2], Tid(303)).unwrap();
    check(b);
    // Idempotent, also at an older TID; no partition: nothing.
    b.pack(&[2, 1, 0], Tid(303)).unwrap();
    check(b);
    b.pack(&[0, 1, 2], Tid(202)).unwrap();
    check(b);
    b.pack(&[], Tid(505)).unwrap();
    check(b);

    // Data referenced by a temporary object or held by a store survived.
    b.lock(Tid(350), Tid(606), &[]).unwrap();
    b.unlock(Tid(350), Tid(606)).unwrap();
    assert_eq!(latest(b, 10).data, b"t-old");
    commit_objects(b, 707, &[held]);
    assert_eq!(latest(b, 9).data, b"h-old");
    // Unreferenced data rows were deleted (store_data makes a new row), the others kept.
    assert!(!data_row_is(b, b"a1", id_a1));
    assert!(!data_row_is(b, b"a2", id_a2));
    assert!(!data_row_is(b, b"b1", id_b1));
    assert!(!data_row_is(b, b"c1", id_c1));
    assert!(data_row_is(b, b"a3", id_a3));
    assert!(data_row_is(b, b"shared", id_shared));
    assert!(data_row_is(b, b"p3-old", id_p3));
    b.drop_unfinished().unwrap();

    // Everything, up to the last transaction.
    b.pack(&ALL, Tid(u64::MAX)).unwrap();
    assert_eq!(history(b, 1, 0, 10), [(404, 2)]);
    assert_eq!(history(b, 3, 0, 10), [(204, 6)]);
    assert_eq!(history(b, 4, 0, 10), [(202, 2)]);
    assert_eq!(history(b, 9, 0, 10), [(707, 5)]);
    assert_eq!(latest(b, 8).data, b"shared");
    assert!(!data_row_is(b, b"a3", id_a3));
    assert!(!data_row_is(b, b"p3-old", id_p3));
    assert!(data_row_is(b, b"shared", id_shared));
    assert!(tids(b, &ALL, 0, 10).is_empty());
    // 606 has no metadata here.
    assert_eq!(tids_from(b, &ALL, 0, u64::MAX, 10), [101, 202, 204, 303, 404, 505, 707]);
}

// --- checks that reopen the database

/// Everything committed or locked survives closing and reopening the database.
pub(crate) fn restart(open: Open<'_>) {
    let pt = PartitionTable::make(NP, 0, &[s(1)]).unwrap();
    {
        let mut b = open(CLUSTER).unwrap();
        commit(&mut *b, 100, &[(1, Some(b"one"))]);
        let o2 = [store(&mut *b, 2, b"two")];
        let m2 = meta_for("two", &o2);
        b.vote(Tid(200), &with_parts(&o2), Some((part(200), &m2))).unwrap();
        b.lock(Tid(200), Tid(210), &[]).unwrap();
        let o3 = [store(&mut *b, 3, b"three")];
        b.vote(Tid(300), &with_parts(&o3), None).unwrap();
        b.save_pt(&pt).unwrap();
        b.set_config("nid", Some("S1")).unwrap();
        // Stored but never voted: lost.
        b.store_data(0, &sha1(b"orphan"), 0, b"orphan").unwrap();
    }
    {
        let mut b = open(CLUSTER).unwrap();
        assert_eq!(latest(&mut *b, 1).data, b"one");
        assert_eq!(b.transaction(part(99), Tid(100)).unwrap().unwrap().ttid, Tid(99));
        assert_eq!(sorted_locked(&mut *b), vec![(Tid(200), Some(Tid(210))), (Tid(300), None)]);
        assert_eq!(b.last_ids().unwrap(), (Some(Tid(100)), Some(Oid(3))));
        assert_eq!(b.load_pt().unwrap().map(|p| sorted_pt(&p)), Some(sorted_pt(&pt)));
        assert_eq!(b.get_config("nid").unwrap().as_deref(), Some("S1"));
        assert_eq!(b.get_config("name").unwrap().as_deref(), Some(CLUSTER));
        b.drop_unfinished().unwrap();
        assert_eq!(locked(b.as_mut()), vec![(Tid(200), Some(Tid(210)))]);
        b.unlock(Tid(200), Tid(210)).unwrap();
        assert_eq!(latest(&mut *b, 2).data, b"two");
        assert_eq!(load(&mut *b, 3, None, None), Load::DoesNotExist);
    }
    {
        let mut b = open(CLUSTER).unwrap();
        assert_eq!(latest(&mut *b, 2).serial, Tid(210));
        assert_eq!(b.final_tid(Tid(200)).unwrap(), Some(Tid(210)));
        assert!(b.locked_transactions().unwrap().is_empty());
        assert_eq!(b.last_ids().unwrap(), (Some(Tid(210)), Some(Oid(2))));
    }
}

/// A database belongs to the cluster that created it.
pub(crate) fn wrong_cluster(open: Open<'_>) {
    drop(open("alpha").unwrap());
    match open("beta") {
        Err(BackendError::WrongCluster { found, expected }) => {
            assert_eq!((found.as_str(), expected.as_str()), ("alpha", "beta"))
        }
        Err(e) => panic!("expected WrongCluster, got {e}"),
        Ok(_) => panic!("expected WrongCluster, got a backend"),
    }
    let mut b = open("alpha").unwrap();
    assert_eq!(b.get_config("name").unwrap().as_deref(), Some("alpha"));
}

/// A database written by a newer program is refused.
pub(crate) fn schema_too_new(open: Open<'_>, raw: RawSql<'_>) {
    drop(open(CLUSTER).unwrap());
    raw("UPDATE config SET value = '99' WHERE name = 'version'");
    match open(CLUSTER) {
        Err(BackendError::SchemaTooNew { found, supported }) => {
            assert_eq!(found, 99);
            assert!(supported < 99);
        }
        Err(e) => panic!("expected SchemaTooNew, got {e}"),
        Ok(_) => panic!("expected SchemaTooNew, got a backend"),
    }
}

/// A version 1 database (before locks recorded their partitions) is upgraded on open and keeps
/// its locked transactions.
pub(crate) fn schema_upgrade_from_v1(open: Open<'_>, raw: RawSql<'_>) {
    {
        let mut b = open(CLUSTER).unwrap();
        b.lock(Tid(10), Tid(11), &[]).unwrap();
        b.sync().unwrap();
    }
    raw("ALTER TABLE ttrans DROP COLUMN lock_partitions");
    raw("UPDATE config SET value = '1' WHERE name = 'version'");
    let mut b = open(CLUSTER).unwrap();
    assert_eq!(b.get_config("version").unwrap().as_deref(), Some("2"));
    assert_eq!(
        b.locked_transactions().unwrap(),
        vec![LockedTxn { ttid: Tid(10), tid: Some(Tid(11)), partitions: vec![] }]
    );
    b.lock(Tid(12), Tid(13), &[2]).unwrap();
    assert_eq!(b.locked_transactions().unwrap()[1].partitions, vec![2]);
}

/// Garbage in the database is reported as `Corrupt`, naming what is wrong, never a panic.
pub(crate) fn corrupt_rows(open: Open<'_>, raw: RawSql<'_>) {
    let mut b = open(CLUSTER).unwrap();
    let b = &mut *b;
    commit(b, 100, &[(1, Some(b"d1")), (2, Some(b"d2")), (3, Some(b"d3")), (4, Some(b"d4")), (5, Some(b"d5"))]);
    // Idle, as the database thread gets: nothing deferred blocks the other connection.
    b.idle();
    let data_of = |oid: u64| format!("(SELECT data_id FROM obj WHERE oid = {oid})");

    raw(&format!("UPDATE data SET hash = X'010203' WHERE id = {}", data_of(1)));
    assert_corrupt(b.load(part(1), Oid(1), None, None), &Oid(1).to_string());
    raw(&format!("UPDATE data SET compression = 7 WHERE id = {}", data_of(2)));
    assert_corrupt(b.load(part(2), Oid(2), Some(Tid(100)), None), &Oid(2).to_string());
    raw("UPDATE obj SET data_id = 987654321 WHERE oid = 3");
    assert_corrupt(b.load(part(3), Oid(3), None, Some(Tid(200))), &Oid(3).to_string());
    raw("UPDATE obj SET value_tid = -5 WHERE oid = 4");
    assert_corrupt(b.load(part(4), Oid(4), None, None), &Oid(4).to_string());
    // The others still load.
    assert_eq!(latest(b, 5).data, b"d5");

    raw("UPDATE trans SET oids = X'0102030405' WHERE tid = 100");
    assert_corrupt(b.transaction(part(99), Tid(100)), &Tid(100).to_string());

    let pt = PartitionTable::make(NP, 0, &[s(1)]).unwrap();
    b.save_pt(&pt).unwrap();
    raw("UPDATE pt SET state = 42 WHERE partition = 1");
    assert_corrupt(b.load_pt(), "state");
    b.save_pt(&pt).unwrap();
    raw("UPDATE pt SET partition = 77 WHERE partition = 2");
    assert_corrupt(b.load_pt(), "partition");
    b.save_pt(&pt).unwrap();
    raw("UPDATE config SET value = 'many' WHERE name = 'partitions'");
    assert_corrupt(b.load_pt(), "partitions");

    b.lock(Tid(500), Tid(510), &[]).unwrap();
    raw("UPDATE ttrans SET tid = -1 WHERE ttid = 500");
    assert_corrupt(b.locked_transactions(), &Tid(500).to_string());
}

/// Garbage read by history, the undo log and undo is `Corrupt` too.
pub(crate) fn corrupt_history_rows(open: Open<'_>, raw: RawSql<'_>) {
    let mut b = open(CLUSTER).unwrap();
    let b = &mut *b;
    commit(b, 100, &[(1, Some(b"d1")), (2, Some(b"d2")), (3, Some(b"d3"))]);
    commit(b, 200, &[(1, Some(b"e1")), (2, Some(b"e2")), (3, Some(b"e3"))]);
    b.idle();
    raw("UPDATE obj SET data_id = 987654321 WHERE oid = 1 AND tid = 100");
    assert_corrupt(b.object_history(part(1), Oid(1), 0, 10), &Oid(1).to_string());
    assert_eq!(history(b, 1, 0, 1), [(200, 2)]);
    raw("UPDATE obj SET value_tid = -5 WHERE oid = 2 AND tid = 100");
    assert_corrupt(b.undo_info(part(2), Oid(2), Tid(200), None), &Oid(2).to_string());
    raw("UPDATE obj SET tid = -7 WHERE oid = 3 AND tid = 100");
    assert_corrupt(b.object_history(part(3), Oid(3), 0, 10), &Oid(3).to_string());
    raw("UPDATE trans SET tid = -3 WHERE tid = 100");
    assert_corrupt(b.tids(&ALL, 0, 10), "tid");
    assert_eq!(tids(b, &ALL, 0, 1), [200]);
}

// --- replication

/// Seed of a random test: `NEO_TEST_SEED` if set, else a new one each run, printed if the
/// test fails (run it again with `NEO_TEST_SEED=<seed>`).
struct Seed(u64);

impl Seed {
    fn new() -> Seed {
        Seed(std::env::var("NEO_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..)))
    }
}

impl Drop for Seed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("random test failed with seed {0}: NEO_TEST_SEED={0} runs it again", self.0);
        }
    }
}

/// Data of an object revision in the replication tests: (compression, bytes).
type Data = (u32, Vec<u8>);

/// One object revision of a transaction of the replication tests.
#[derive(Clone, Debug)]
struct Rev {
    oid: u64,
    /// None: a deletion.
    data: Option<Data>,
    data_serial: Option<u64>,
}

/// A transaction of the replication tests: ttid `tid - 1`, metadata in partition(ttid).
#[derive(Clone, Debug)]
struct Txn {
    tid: u64,
    revs: Vec<Rev>,
}

impl Txn {
    fn ttid(&self) -> Tid {
        Tid(self.tid - 1)
    }

    fn meta(&self) -> TxnMeta {
        TxnMeta {
            user: format!("user{}", self.tid).into_bytes(),
            description: format!("transaction {}", self.tid).into_bytes(),
            extension: vec![0x80, 0x03, b'}', b'q', (self.tid % 256) as u8, b'.'],
            oids: self.revs.iter().map(|r| Oid(r.oid)).collect(),
        }
    }

    /// Vote (through `vote_data`, or `store_data` then `vote`) and lock.
    fn vote_and_lock(&self, b: &mut dyn Backend, with_vote_data: bool) {
        let meta = self.meta();
        let meta = Some((part(self.ttid().0), &meta));
        if with_vote_data {
            let objects: Vec<(u32, super::NewObject)> = self
                .revs
                .iter()
                .map(|r| {
                    let data = r.data.as_ref().map(|(compression, d)| super::NewData {
                        checksum: sha1(d),
                        compression: *compression,
                        data: d.clone(),
                    });
                    let o = super::NewObject { oid: Oid(r.oid), data, data_serial: r.data_serial.map(Tid) };
                    (part(r.oid), o)
                })
                .collect();
            b.vote_data(self.ttid(), &objects, meta).unwrap();
        } else {
            let objects: Vec<(u32, TempObject)> = self
                .revs
                .iter()
                .map(|r| {
                    let data_id = r.data.as_ref().map(|(c, d)| b.store_data(part(r.oid), &sha1(d), *c, d).unwrap());
                    (part(r.oid), TempObject { oid: Oid(r.oid), data_id, data_serial: r.data_serial.map(Tid) })
                })
                .collect();
            b.vote(self.ttid(), &objects, meta).unwrap();
        }
        b.lock(self.ttid(), Tid(self.tid), &[]).unwrap();
        b.sync().unwrap();
    }

    fn unlock(&self, b: &mut dyn Backend) {
        b.unlock(self.ttid(), Tid(self.tid)).unwrap();
    }

    fn commit(&self, b: &mut dyn Backend, with_vote_data: bool) {
        self.vote_and_lock(b, with_vote_data);
        self.unlock(b);
    }
}

/// Objects of the replication tests: oids 1..=REPL_OIDS, spread over the NP partitions.
const REPL_OIDS: u64 = 24;

/// A record of `n` bytes of one of a few shapes.
fn random_bytes(rng: &mut fastrand::Rng, n: usize) -> Vec<u8> {
    match rng.u8(0..3) {
        0 => {
            let base: Vec<u8> = std::iter::repeat_with(|| rng.u8(..)).take(n.min(1 << 16)).collect();
            base.iter().copied().cycle().take(n).collect()
        }
        1 => vec![rng.u8(..); n],
        _ => {
            let k = rng.u64(..);
            (0..n as u64).map(|i| (i.wrapping_mul(k | 1) >> 7) as u8).collect()
        }
    }
}

/// The committed revisions of each object so far, to make deletions and undos of.
type Revisions = std::collections::BTreeMap<u64, Vec<(u64, Option<Data>)>>;

/// A random transaction at `tid`: 1 to 5 objects, each a new record (0 B to 3 MiB; `big`
/// adds one above MySQL's chunk of 8 MiB), the data of another revision (deduplicated), an
/// undo (the data of an older revision of the object with a back-pointer to it), or a
/// deletion.
fn random_txn(rng: &mut fastrand::Rng, tid: u64, revisions: &mut Revisions, pool: &mut Vec<Data>, big: bool) -> Txn {
    let mut oids: Vec<u64> = (1..=REPL_OIDS).collect();
    rng.shuffle(&mut oids);
    oids.truncate(rng.usize(1..=5));
    let mut revs = Vec::new();
    for (i, oid) in oids.into_iter().enumerate() {
        let history = revisions.get(&oid).cloned().unwrap_or_default();
        let alive = history.last().is_some_and(|(_, d)| d.is_some());
        let with_data: Vec<&(u64, Option<Data>)> = history.iter().filter(|(_, d)| d.is_some()).collect();
        let choice = rng.u8(0..20);
        let rev = if big && i == 0 {
            let n = (8 << 20) + rng.usize(1..5000);
            let data = (0u32, random_bytes(rng, n));
            Rev { oid, data: Some(data), data_serial: None }
        } else if choice < 2 && alive {
            // A deletion, sometimes with a back-pointer.
            let data_serial = if rng.u8(0..4) == 0 { history.last().map(|(t, _)| *t) } else { None };
            Rev { oid, data: None, data_serial }
        } else if choice < 5 && !with_data.is_empty() {
            let (serial, data) = with_data[rng.usize(..with_data.len())];
            Rev { oid, data: data.clone(), data_serial: Some(*serial) }
        } else if choice < 9 && !pool.is_empty() {
            Rev { oid, data: Some(pool[rng.usize(..pool.len())].clone()), data_serial: None }
        } else {
            let n = match rng.u8(0..40) {
                0..=3 => 0,
                4..=23 => rng.usize(1..300),
                24..=38 => rng.usize(300..70_000),
                _ => rng.usize((1 << 20)..(3 << 20)),
            };
            let data = (rng.u32(0..2), random_bytes(rng, n));
            if n < (1 << 20) {
                pool.push(data.clone());
            }
            Rev { oid, data: Some(data), data_serial: None }
        };
        revs.push(rev);
    }
    for r in &revs {
        revisions.entry(r.oid).or_default().push((tid, r.data.clone()));
    }
    Txn { tid, revs }
}

/// Size of the data of fetched revisions.
fn fetched_size(objects: &[super::ReplObject]) -> usize {
    objects.iter().map(|o| o.data.as_ref().map_or(0, |d| d.data.len())).sum()
}

/// A short description of the first difference between two lists of revisions.
fn first_difference(a: &[super::ReplObject], b: &[super::ReplObject]) -> String {
    let brief = |o: Option<&super::ReplObject>| {
        o.map(|o| {
            let data = o.data.as_ref().map(|d| (d.compression, d.data.len(), d.checksum.clone()));
            format!("{:?} {:?} {data:?} {:?}", o.oid, o.tid, o.data_serial)
        })
    };
    match (0..a.len().max(b.len())).find(|i| a.get(*i) != b.get(*i)) {
        None => "none".to_string(),
        Some(i) => format!("#{i}: {:?} vs {:?}", brief(a.get(i)), brief(b.get(i))),
    }
}

/// A replication of each partition from `src` to `dst`, chunk by chunk, as a storage would
/// run it: rounds up to the last TID of the partition on the source when the round starts,
/// with the progress saved by `store_replicated` (or `set_replication_progress`).
#[derive(Default)]
struct Replicator {
    /// The upper bound of the current round of each partition.
    rounds: std::collections::HashMap<u32, Tid>,
}

impl Replicator {
    /// One chunk of the replication of `partition` (at most `length` rows of each kind,
    /// `max_bytes` of data), checking what the source returns. Returns false if the partition
    /// had nothing left to copy.
    fn step(
        &mut self,
        src: &mut dyn Backend,
        dst: &mut dyn Backend,
        partition: u32,
        length: u32,
        max_bytes: usize,
        batch: bool,
    ) -> bool {
        let saved = dst.replication_progress(partition).unwrap();
        let mut progress = saved.unwrap_or(super::ReplProgress::ZERO);
        let max = match self.rounds.get(&partition) {
            Some(max) => *max,
            None => {
                let Some(last) = src.partition_last_tid(partition).unwrap() else { return false };
                if progress.next_trans > last && progress.next_obj.0 > last {
                    return false;
                }
                // A new round.
                progress.base_trans = progress.next_trans;
                progress.base_obj = progress.next_obj;
                self.rounds.insert(partition, last);
                last
            }
        };
        let transactions = if progress.next_trans <= max {
            src.fetch_transactions(partition, progress.next_trans, max, length).unwrap()
        } else {
            Vec::new()
        };
        let mut previous = progress.next_trans;
        for t in &transactions {
            assert!(t.tid >= previous && t.tid <= max, "transaction {:?} out of order or bounds", t.tid);
            assert_eq!(src.transaction(partition, t.tid).unwrap().as_ref(), Some(t));
            previous = t.tid.next();
        }
        progress.next_trans = match transactions.last() {
            Some(last) if transactions.len() == length as usize => last.tid.next(),
            _ => max.next(),
        };
        let objects = if progress.next_obj.0 <= max {
            src.fetch_objects(partition, progress.next_obj, max, length, max_bytes).unwrap()
        } else {
            Vec::new()
        };
        // Ordered, in bounds, cut exactly where the size limit says.
        let mut previous = progress.next_obj;
        for o in &objects {
            assert!(
                (o.tid, o.oid) >= previous && o.tid <= max,
                "revision {:?} {:?} out of order or bounds",
                o.oid,
                o.tid
            );
            previous = (o.tid, Oid(o.oid.0 + 1));
            if let Some(d) = &o.data {
                assert!(d.checksum == sha1(&d.data), "checksum of {:?} {:?}", o.oid, o.tid);
            }
        }
        if progress.next_obj.0 <= max && max_bytes != usize::MAX {
            let uncut = src.fetch_objects(partition, progress.next_obj, max, length, usize::MAX).unwrap();
            assert!(uncut.starts_with(&objects), "a chunk is not the start of the uncut one");
            if let Some(next) = uncut.get(objects.len()) {
                assert!(!objects.is_empty(), "the first revision is always returned");
                let with_next = fetched_size(&objects) + fetched_size(std::slice::from_ref(next));
                assert!(
                    with_next > max_bytes,
                    "cut at {} bytes of {max_bytes} before {next:?}",
                    fetched_size(&objects)
                );
            }
            if objects.len() > 1 {
                assert!(fetched_size(&objects) <= max_bytes);
            }
        }
        progress.next_obj = match objects.last() {
            Some(last) => (last.tid, Oid(last.oid.0 + 1)),
            None => (max.next(), Oid::ZERO),
        };
        let batched = batch && dst.begin_batch();
        dst.store_replicated(partition, &transactions, &objects, &progress).unwrap();
        if batched {
            dst.commit_batch().unwrap();
        }
        dst.sync().unwrap();
        assert_eq!(dst.replication_progress(partition).unwrap(), Some(progress));
        if progress.next_trans > max && progress.next_obj.0 > max {
            self.rounds.remove(&partition);
        }
        true
    }

    /// Replicate every partition until it has nothing left to copy.
    fn finish(&mut self, src: &mut dyn Backend, dst: &mut dyn Backend, length: u32, max_bytes: usize) {
        for p in ALL {
            while self.step(src, dst, p, length, max_bytes, false) {}
        }
    }
}

/// Every read of `partition` gives the same on both backends: transactions (metadata, undo
/// log, iterator), every revision of every object (loads at, before and latest, history,
/// undo information, last serial), and the revisions as replication fetches them.
fn assert_same_partition(a: &mut dyn Backend, b: &mut dyn Backend, partition: u32) {
    let p = partition;
    assert_eq!(a.partition_last_tid(p).unwrap(), b.partition_last_tid(p).unwrap(), "partition {p}: last TID");
    let ta = a.fetch_transactions(p, Tid::ZERO, Tid(u64::MAX), u32::MAX).unwrap();
    let tb = b.fetch_transactions(p, Tid::ZERO, Tid(u64::MAX), u32::MAX).unwrap();
    assert!(ta == tb, "partition {p}: {} vs {} transactions differ", ta.len(), tb.len());
    for t in &ta {
        assert_eq!(b.transaction(p, t.tid).unwrap().as_ref(), Some(t), "partition {p}");
    }
    assert_eq!(a.tids(&[p], 0, u32::MAX).unwrap(), b.tids(&[p], 0, u32::MAX).unwrap(), "partition {p}: undo log");
    assert_eq!(
        a.tids_from(&[p], Tid::ZERO, Tid(u64::MAX), u32::MAX).unwrap(),
        b.tids_from(&[p], Tid::ZERO, Tid(u64::MAX), u32::MAX).unwrap(),
        "partition {p}: iterator"
    );
    let oa = a.fetch_objects(p, (Tid::ZERO, Oid::ZERO), Tid(u64::MAX), u32::MAX, usize::MAX).unwrap();
    let ob = b.fetch_objects(p, (Tid::ZERO, Oid::ZERO), Tid(u64::MAX), u32::MAX, usize::MAX).unwrap();
    assert!(oa == ob, "partition {p}: revisions differ: {}", first_difference(&oa, &ob));
    let mut oids: Vec<Oid> = oa.iter().map(|o| o.oid).collect();
    oids.sort_unstable();
    oids.dedup();
    for oid in oids {
        let what = format!("partition {p} object {oid:?}");
        let history = a.object_history(p, oid, 0, u32::MAX).unwrap();
        assert_eq!(history, b.object_history(p, oid, 0, u32::MAX).unwrap(), "{what}: history");
        assert_eq!(a.last_serial(p, oid).unwrap(), b.last_serial(p, oid).unwrap(), "{what}: last serial");
        let same = |x: Load, y: Load, how: &str| assert!(x == y, "{what}: {how} differs");
        same(a.load(p, oid, None, None).unwrap(), b.load(p, oid, None, None).unwrap(), "latest");
        for (serial, _) in history {
            same(a.load(p, oid, Some(serial), None).unwrap(), b.load(p, oid, Some(serial), None).unwrap(), "at");
            same(a.load(p, oid, None, Some(serial)).unwrap(), b.load(p, oid, None, Some(serial)).unwrap(), "before");
            assert_eq!(
                a.undo_info(p, oid, serial, None).unwrap(),
                b.undo_info(p, oid, serial, None).unwrap(),
                "{what}: undo of {serial:?}"
            );
        }
    }
}

/// Replication of random histories: the source commits transactions (vote, lock, unlock),
/// an older part of them packed; the destination copies each partition chunk by chunk (small
/// `length` and `max_bytes`, sometimes inside a batch) while it also commits some of the same
/// transactions directly, voted and unlocked before, during or after their replication. Then
/// every read of every partition is the same on both. Records of 0 B to a few MiB, one above
/// MySQL's chunk; deletions, undo back-pointers, data shared by several objects.
pub(crate) fn replication_of_random_histories(src: &mut dyn Backend, dst: &mut dyn Backend) {
    let seed = Seed::new();
    let mut rng = fastrand::Rng::with_seed(seed.0);
    let mut revisions = Revisions::new();
    let mut pool: Vec<Data> = Vec::new();
    let mut tid = 1000u64;
    // Metadata in partition(tid - 1): every partition.
    let mut next_tid = |rng: &mut fastrand::Rng| {
        tid += rng.u64(2..40);
        tid
    };
    // An older history, packed: the source only.
    let mut packed_at = 0;
    for i in 0..12 {
        let tid = next_tid(&mut rng);
        let t = random_txn(&mut rng, tid, &mut revisions, &mut pool, false);
        t.commit(src, rng.bool());
        if i == 7 {
            packed_at = t.tid;
        }
    }
    let packed_partitions: Vec<u32> = ALL.into_iter().filter(|_| rng.u8(0..4) != 0).collect();
    src.pack(&packed_partitions, Tid(packed_at)).unwrap();
    // Packed revisions cannot be undone any more.
    revisions.clear();

    // Transactions the destination also receives: voted (and locked) and unlocked later.
    let mut direct: Vec<(Txn, bool)> = Vec::new();
    let mut replicator = Replicator::default();
    let big_at = rng.usize(0..45);
    for i in 0..45 {
        let tid = next_tid(&mut rng);
        let t = random_txn(&mut rng, tid, &mut revisions, &mut pool, i == big_at);
        t.commit(src, rng.bool());
        if rng.bool() {
            direct.push((t, false));
        }
        for _ in 0..rng.usize(0..5) {
            match rng.u8(0..5) {
                0 | 1 if !direct.is_empty() => {
                    // Vote and lock, or unlock, a transaction the destination also receives.
                    let k = rng.usize(..direct.len());
                    if direct[k].1 {
                        direct.remove(k).0.unlock(dst);
                    } else {
                        direct[k].0.vote_and_lock(dst, rng.bool());
                        direct[k].1 = true;
                    }
                }
                _ => {
                    let p = rng.u32(0..NP);
                    let (length, max_bytes) =
                        (rng.u32(1..8), if rng.u8(0..5) == 0 { usize::MAX } else { rng.usize(0..200_000) });
                    replicator.step(src, dst, p, length, max_bytes, rng.bool());
                }
            }
        }
    }
    for (t, voted) in direct {
        if !voted {
            t.vote_and_lock(dst, rng.bool());
        }
        if rng.bool() {
            t.unlock(dst);
        } else {
            // Unlocked after its replication.
            replicator.finish(src, dst, rng.u32(1..8), rng.usize(0..200_000));
            t.unlock(dst);
        }
    }
    replicator.finish(src, dst, rng.u32(1..8), rng.usize(0..200_000));
    assert!(dst.locked_transactions().unwrap().is_empty());
    for p in ALL {
        assert_same_partition(src, dst, p);
    }
    assert_eq!(src.last_ids().unwrap(), dst.last_ids().unwrap());
    // Once replicated, a transaction the destination receives again changes nothing.
    let again = src.fetch_transactions(0, Tid::ZERO, Tid(u64::MAX), 3).unwrap();
    let objects = src.fetch_objects(0, (Tid::ZERO, Oid::ZERO), Tid(u64::MAX), 5, usize::MAX).unwrap();
    let progress = dst.replication_progress(0).unwrap().unwrap();
    dst.store_replicated(0, &again, &objects, &progress).unwrap();
    assert_same_partition(src, dst, 0);
}

/// Replicate everything of `src` into `dst` (a fresh cell), chunk by chunk.
fn replicate_all(src: &mut dyn Backend, dst: &mut dyn Backend) {
    Replicator::default().finish(src, dst, 3, 50);
}

/// An interrupted replication resumes from the progress it saved, in a destination opened
/// again (when the engine's database outlives the backend).
pub(crate) fn replication_resumes(src: &mut dyn Backend, open_dst: Open<'_>) {
    let mut rng = fastrand::Rng::with_seed(7);
    let (mut revisions, mut pool) = (Revisions::new(), Vec::new());
    for i in 0..12u64 {
        random_txn(&mut rng, 100 + 10 * i, &mut revisions, &mut pool, false).commit(src, i % 2 == 0);
    }
    let saved = {
        let mut dst = open_dst(CLUSTER).unwrap();
        let dst = &mut *dst;
        assert_eq!(dst.replication_progress(1).unwrap(), None);
        let mut replicator = Replicator::default();
        for _ in 0..3 {
            assert!(replicator.step(src, dst, 1, 2, 100, false));
        }
        // Nothing else of the partition is here.
        let here = dst.fetch_objects(1, (Tid::ZERO, Oid::ZERO), Tid(u64::MAX), u32::MAX, usize::MAX).unwrap();
        assert!(here.len() <= 6);
        dst.replication_progress(1).unwrap().unwrap()
    };
    assert!(saved.next_obj > (Tid::ZERO, Oid::ZERO) && saved.next_trans > Tid::ZERO);
    let mut dst = open_dst(CLUSTER).unwrap();
    let dst = &mut *dst;
    assert_eq!(dst.replication_progress(1).unwrap(), Some(saved));
    assert_eq!(dst.replication_progress(2).unwrap(), None);
    // The round the first destination started is not known any more: a new round from the
    // saved progress copies the rest.
    let mut replicator = Replicator::default();
    assert!(replicator.step(src, dst, 1, 2, 100, false));
    let round = dst.replication_progress(1).unwrap().unwrap();
    assert_eq!((round.base_trans, round.base_obj), (saved.next_trans, saved.next_obj));
    replicator.finish(src, dst, 2, 100);
    assert_same_partition(src, dst, 1);
    // The progress is saved with what it describes, and by itself.
    let all = super::ReplProgress::after(src.partition_last_tid(1).unwrap().unwrap());
    assert_eq!(
        dst.replication_progress(1).unwrap().map(|p| (p.next_trans, p.next_obj)),
        Some((all.next_trans, all.next_obj))
    );
    dst.set_replication_progress(3, Some(&all)).unwrap();
    dst.set_replication_progress(1, None).unwrap();
    drop(replicator);
    let mut dst = open_dst(CLUSTER).unwrap();
    assert_eq!(dst.replication_progress(3).unwrap(), Some(all));
    assert_eq!(dst.replication_progress(1).unwrap(), None);
    dst.set_replication_progress(3, None).unwrap();
    assert_eq!(dst.replication_progress(3).unwrap(), None);
    assert_same_partition(src, &mut *dst, 1);
}

/// fetch_transactions and fetch_objects: inclusive bounds, order, length, the size limit
/// (reached exactly, and the first revision whatever its size), packed transactions,
/// deletions and back-pointers as loads report them, data as stored.
pub(crate) fn fetch_for_replication(b: &mut dyn Backend) {
    // Partition 1: oids 1, 5, 9, 13, 17; metadata of every transaction (ttid 101, 201, ...).
    commit(b, 102, &[(1, Some(b"aaaa")), (5, Some(b"bb")), (9, Some(b""))]);
    commit(b, 202, &[(5, None), (2, Some(b"other partition"))]);
    let z = b"x\x9c\x03\x00\x00\x00\x00\x01";
    let id = b.store_data(1, &sha1(z), 1, z).unwrap();
    let u = back_pointer(b, 1, b"aaaa", 102);
    commit_objects(b, 302, &[u, TempObject { oid: Oid(9), data_id: Some(id), data_serial: None }]);
    commit(b, 402, &[(13, Some(b"cccccc"))]);
    // Voted and locked, not committed: not there.
    let o = [store(b, 17, b"temporary")];
    b.vote(Tid(501), &with_parts(&o), Some((1, &meta_for("t", &o)))).unwrap();
    b.lock(Tid(501), Tid(502), &[]).unwrap();

    let txns = |b: &mut dyn Backend, min: u64, max: u64, length: u32| -> Vec<u64> {
        b.fetch_transactions(1, Tid(min), Tid(max), length).unwrap().iter().map(|t| t.tid.0).collect()
    };
    assert_eq!(txns(b, 0, u64::MAX, 100), [102, 202, 302, 402]);
    assert_eq!(txns(b, 0, u64::MAX, u32::MAX), [102, 202, 302, 402]);
    assert_eq!(txns(b, 102, 302, 100), [102, 202, 302]);
    assert_eq!(txns(b, 103, 302, 100), [202, 302]);
    assert_eq!(txns(b, 0, 301, 100), [102, 202]);
    assert_eq!(txns(b, 202, 202, 100), [202]);
    assert_eq!(txns(b, 0, u64::MAX, 1), [102]);
    assert_eq!(txns(b, 103, u64::MAX, 2), [202, 302]);
    assert!(txns(b, 0, u64::MAX, 0).is_empty());
    assert!(txns(b, 302, 102, 10).is_empty());
    assert!(txns(b, 403, u64::MAX, 10).is_empty());
    assert!(txns(b, u64::MAX, u64::MAX, 10).is_empty());
    assert!(b.fetch_transactions(2, Tid::ZERO, Tid(u64::MAX), 10).unwrap().is_empty());
    for t in b.fetch_transactions(1, Tid::ZERO, Tid(u64::MAX), 10).unwrap() {
        assert_eq!(b.transaction(1, t.tid).unwrap(), Some(t));
    }
    b.pack(&[1], Tid(102)).unwrap();
    let t = b.fetch_transactions(1, Tid::ZERO, Tid(u64::MAX), 10).unwrap();
    assert_eq!(
        t.iter().map(|t| (t.tid.0, t.packed)).collect::<Vec<_>>(),
        [(102, true), (202, false), (302, false), (402, false)]
    );
    assert_eq!(t[0].meta, TxnMeta { oids: vec![Oid(1), Oid(5), Oid(9)], ..meta_for("user102", &[]) });
    assert_eq!(t[0].ttid, Tid(101));

    let objs = |b: &mut dyn Backend, min: (u64, u64), max: u64, length: u32, max_bytes: usize| -> Vec<(u64, u64)> {
        b.fetch_objects(1, (Tid(min.0), Oid(min.1)), Tid(max), length, max_bytes)
            .unwrap()
            .iter()
            .map(|o| (o.tid.0, o.oid.0))
            .collect()
    };
    let all = [(102, 1), (102, 5), (102, 9), (202, 5), (302, 1), (302, 9), (402, 13)];
    assert_eq!(objs(b, (0, 0), u64::MAX, 100, usize::MAX), all);
    assert_eq!(objs(b, (0, 0), u64::MAX, u32::MAX, usize::MAX), all);
    assert_eq!(objs(b, (102, 5), u64::MAX, 100, usize::MAX), all[1..]);
    assert_eq!(objs(b, (102, 6), 302, 100, usize::MAX), [(102, 9), (202, 5), (302, 1), (302, 9)]);
    assert_eq!(objs(b, (102, 10), 301, 100, usize::MAX), [(202, 5)]);
    assert_eq!(objs(b, (302, 9), 302, 100, usize::MAX), [(302, 9)]);
    assert_eq!(objs(b, (0, 0), u64::MAX, 2, usize::MAX), all[..2]);
    assert!(objs(b, (0, 0), u64::MAX, 0, usize::MAX).is_empty());
    assert!(objs(b, (403, 0), u64::MAX, 10, usize::MAX).is_empty());
    assert!(objs(b, (302, 0), 202, 10, usize::MAX).is_empty());
    assert!(objs(b, (u64::MAX, 0), u64::MAX, 10, usize::MAX).is_empty());
    // Sizes 4, 2, 0, 0 (deletion), 4, 8, 6: the limit reached exactly, passed, the first
    // revision alone above it.
    assert_eq!(objs(b, (0, 0), u64::MAX, 100, 6), all[..4]);
    assert_eq!(objs(b, (0, 0), u64::MAX, 100, 5), all[..1]);
    assert_eq!(objs(b, (0, 0), u64::MAX, 100, 0), all[..1]);
    assert_eq!(objs(b, (102, 9), u64::MAX, 100, 0), all[2..4]);
    assert_eq!(objs(b, (302, 9), u64::MAX, 100, 1), [(302, 9)]);
    assert_eq!(objs(b, (0, 0), u64::MAX, 100, 10), all[..5]);

    let fetched = b.fetch_objects(1, (Tid::ZERO, Oid::ZERO), Tid(u64::MAX), 100, usize::MAX).unwrap();
    let data = |d: &[u8], compression: u32| Some(super::NewData { checksum: sha1(d), compression, data: d.to_vec() });
    let r = |oid: u64, tid: u64, data: Option<super::NewData>, serial: Option<u64>| super::ReplObject {
        oid: Oid(oid),
        tid: Tid(tid),
        data,
        data_serial: serial.map(Tid),
    };
    let expected = vec![
        r(1, 102, data(b"aaaa", 0), None),
        r(5, 102, data(b"bb", 0), None),
        r(9, 102, data(b"", 0), None),
        r(5, 202, None, None),
        r(1, 302, data(b"aaaa", 0), Some(102)),
        r(9, 302, data(z, 1), None),
        r(13, 402, data(b"cccccc", 0), None),
    ];
    assert_eq!(fetched, expected);
    // As loads report them.
    for o in &fetched {
        let l = found(b.load(1, o.oid, Some(o.tid), None).unwrap());
        assert_eq!(o.data_serial, l.data_serial);
        match &o.data {
            Some(d) => assert_eq!((d.compression, &d.checksum, &d.data), (l.compression, &l.checksum, &l.data)),
            None => assert!(l.data.is_empty() && l.checksum == [0; 20]),
        }
    }
    b.unlock(Tid(501), Tid(502)).unwrap();
    assert_eq!(objs(b, (402, 14), u64::MAX, 10, usize::MAX), [(502, 17)]);
}

/// partition_last_tid: the greatest TID of committed metadata or revisions of the partition,
/// never of temporary data.
pub(crate) fn partition_last_tid_ignores_temporary_data(b: &mut dyn Backend) {
    let last = |b: &mut dyn Backend, p: u32| b.partition_last_tid(p).unwrap().map(|t| t.0);
    assert_eq!(last(b, 0), None);
    // Objects in partitions 1 and 2, metadata in partition 3 (ttid 99).
    commit(b, 100, &[(1, Some(b"a")), (6, Some(b"b"))]);
    assert_eq!((last(b, 0), last(b, 1), last(b, 2), last(b, 3)), (None, Some(100), Some(100), Some(100)));
    // Voted, locked: temporary.
    let o = [store(b, 4, b"c"), store(b, 5, b"d")];
    b.vote(Tid(199), &with_parts(&o), Some((part(199), &meta_for("t", &o)))).unwrap();
    assert_eq!((last(b, 0), last(b, 1), last(b, 3)), (None, Some(100), Some(100)));
    b.lock(Tid(199), Tid(200), &[0, 1, 3]).unwrap();
    assert_eq!((last(b, 0), last(b, 1), last(b, 3)), (None, Some(100), Some(100)));
    b.unlock(Tid(199), Tid(200)).unwrap();
    assert_eq!((last(b, 0), last(b, 1), last(b, 2), last(b, 3)), (Some(200), Some(200), Some(100), Some(200)));
    // Metadata only (its objects elsewhere), objects only.
    b.vote(Tid(301), &[], Some((2, &TxnMeta::default()))).unwrap();
    b.lock(Tid(301), Tid(302), &[]).unwrap();
    b.unlock(Tid(301), Tid(302)).unwrap();
    let o = [store(b, 8, b"e")];
    b.vote(Tid(401), &with_parts(&o), None).unwrap();
    b.lock(Tid(401), Tid(402), &[]).unwrap();
    b.unlock(Tid(401), Tid(402)).unwrap();
    assert_eq!((last(b, 0), last(b, 1), last(b, 2), last(b, 3)), (Some(402), Some(200), Some(302), Some(200)));
    // Also from replication, and the largest TID.
    let t = TxnInfo { tid: Tid::MAX, ttid: Tid(7), packed: false, meta: TxnMeta::default() };
    b.store_replicated(1, &[t], &[], &super::ReplProgress::ZERO).unwrap();
    assert_eq!(last(b, 1), Some(Tid::MAX.0));
    let o = super::ReplObject { oid: Oid(10), tid: Tid(999), data: None, data_serial: None };
    b.store_replicated(2, &[], &[o], &super::ReplProgress::ZERO).unwrap();
    assert_eq!(last(b, 2), Some(999));
    // A transaction voted again after a commit.
    let o = [store(b, 12, b"f")];
    b.vote(Tid(1000), &with_parts(&o), None).unwrap();
    assert_eq!(last(b, 0), Some(402));
    b.abort(Tid(1000)).unwrap();
}

/// store_replicated writes transactions, revisions and progress together, replacing rows
/// with the same key: a revision whose data changes does not leak its old data row; the
/// cell can also receive the transaction directly (unlock before or after); data is
/// deduplicated with what votes store; bad input writes nothing.
pub(crate) fn store_replicated_replaces_and_prunes(b: &mut dyn Backend) {
    let nd = |d: &[u8], compression: u32| Some(super::NewData { checksum: sha1(d), compression, data: d.to_vec() });
    let r = |oid: u64, tid: u64, data: Option<super::NewData>| super::ReplObject {
        oid: Oid(oid),
        tid: Tid(tid),
        data,
        data_serial: None,
    };
    let progress = |n: u64| super::ReplProgress::after(Tid(n));
    let t = |tid: u64, packed: bool| TxnInfo { tid: Tid(tid), ttid: Tid(tid - 1), packed, meta: meta_for("r", &[]) };
    b.store_replicated(1, &[t(100, true)], &[r(1, 100, nd(b"old", 0)), r(5, 100, nd(b"kept", 0))], &progress(100))
        .unwrap();
    assert_eq!(b.replication_progress(1).unwrap(), Some(progress(100)));
    let old_id = b.store_data(1, &sha1(b"old"), 0, b"old").unwrap();
    b.release_data(&[old_id]).unwrap();
    assert_eq!(latest(b, 1).data, b"old");
    assert_eq!(b.transaction(1, Tid(100)).unwrap(), Some(t(100, true)));
    // Replaced: new data and metadata, the old data row goes.
    b.store_replicated(1, &[t(100, false)], &[r(1, 100, nd(b"new", 1))], &progress(100)).unwrap();
    let l = latest(b, 1);
    assert_eq!((l.data.as_slice(), l.compression), (&b"new"[..], 1));
    assert_eq!(b.transaction(1, Tid(100)).unwrap(), Some(t(100, false)));
    assert!(!data_row_is(b, b"old", old_id), "the data row of a replaced revision leaked");
    b.abort(Tid(1)).unwrap();
    // Data shared with a vote, with another partition, and with a temporary object survives.
    commit(b, 200, &[(2, Some(b"shared"))]);
    let shared_id = b.store_data(2, &sha1(b"shared"), 0, b"shared").unwrap();
    b.release_data(&[shared_id]).unwrap();
    b.store_replicated(1, &[], &[r(9, 300, nd(b"shared", 0)), r(13, 300, nd(b"temp", 0))], &progress(300)).unwrap();
    let o = [store(b, 3, b"temp")];
    let temp_id = o[0].data_id.unwrap();
    b.vote(Tid(400), &with_parts(&o), None).unwrap();
    b.store_replicated(1, &[], &[r(9, 300, nd(b"x", 0)), r(13, 300, None)], &progress(300)).unwrap();
    assert_eq!(latest(b, 2).data, b"shared");
    assert!(data_row_is(b, b"shared", shared_id));
    assert!(data_row_is(b, b"temp", temp_id));
    b.abort(Tid(1)).unwrap();
    b.lock(Tid(400), Tid(410), &[]).unwrap();
    b.unlock(Tid(400), Tid(410)).unwrap();
    assert_eq!(latest(b, 3).data, b"temp");
    assert_eq!(latest(b, 13).data, b"");

    // A transaction also received directly: unlocked after its replication...
    let direct = [store(b, 17, b"direct"), deletion(21)];
    let meta = meta_for("direct", &direct);
    b.vote(Tid(499), &with_parts(&direct), Some((1, &meta))).unwrap();
    b.lock(Tid(499), Tid(501), &[]).unwrap();
    let replicated = TxnInfo { tid: Tid(501), ttid: Tid(499), packed: false, meta: meta.clone() };
    b.store_replicated(
        1,
        std::slice::from_ref(&replicated),
        &[r(17, 501, nd(b"direct", 0)), r(21, 501, None)],
        &progress(501),
    )
    .unwrap();
    b.unlock(Tid(499), Tid(501)).unwrap();
    assert_eq!(b.transaction(1, Tid(501)).unwrap().as_ref(), Some(&replicated));
    assert_eq!(history(b, 17, 0, 10), [(501, 6)]);
    assert_eq!(history(b, 21, 0, 10), [(501, 0)]);
    // ...and replicated after its unlock.
    let o = [store(b, 25, b"again")];
    commit_objects(b, 602, &o);
    let replicated = b.fetch_transactions(1, Tid(602), Tid(602), 1).unwrap();
    let objects = b.fetch_objects(1, (Tid(602), Oid::ZERO), Tid(602), 10, usize::MAX).unwrap();
    assert_eq!(objects.len(), 1);
    b.store_replicated(1, &replicated, &objects, &progress(602)).unwrap();
    assert_eq!(latest(b, 25).data, b"again");
    assert_eq!(b.fetch_transactions(1, Tid(602), Tid(602), 1).unwrap(), replicated);
    assert_eq!(b.replication_progress(1).unwrap(), Some(progress(602)));

    // Bad input is refused and writes nothing (the progress neither).
    let bad = super::ReplObject {
        data: Some(super::NewData { checksum: vec![1, 2], compression: 0, data: b"bad".to_vec() }),
        ..r(29, 700, None)
    };
    assert!(b.store_replicated(1, &[t(700, false)], &[r(33, 700, nd(b"ok", 0)), bad], &progress(700)).is_err());
    let bad = r(33, 700, nd(b"ok", 5));
    assert!(b.store_replicated(1, &[t(700, false)], &[bad], &progress(700)).is_err());
    let bad = TxnInfo { tid: Tid(u64::MAX), ..t(700, false) };
    assert!(b.store_replicated(1, &[bad], &[], &progress(700)).is_err());
    assert_eq!(b.replication_progress(1).unwrap(), Some(progress(602)));
    assert!(b.fetch_transactions(1, Tid(700), Tid(700), 1).unwrap().is_empty());
    assert_eq!(load(b, 33, None, None), Load::DoesNotExist);
    // Nothing at all, just the progress.
    b.store_replicated(1, &[], &[], &progress(800)).unwrap();
    assert_eq!(b.replication_progress(1).unwrap(), Some(progress(800)));
    assert!(b.locked_transactions().unwrap().is_empty());
}

/// purge_partition deletes the committed transactions and revisions of one partition (and
/// its saved progress) and the data rows nothing references any more; other partitions, data
/// they share, temporary data and held data stay.
pub(crate) fn purge_partition_keeps_the_others(b: &mut dyn Backend) {
    // Partition 1: oids 1, 5; partition 2: oids 2, 6. Metadata of 102 in partition 1, of 203
    // in partition 2.
    commit(b, 102, &[(1, Some(b"shared")), (5, Some(b"only 1")), (2, Some(b"two"))]);
    commit(b, 203, &[(6, Some(b"shared")), (5, Some(b"only 1 again")), (1, None)]);
    let only_id = b.store_data(1, &sha1(b"only 1"), 0, b"only 1").unwrap();
    b.release_data(&[only_id]).unwrap();
    let shared_id = b.store_data(1, &sha1(b"shared"), 0, b"shared").unwrap();
    b.release_data(&[shared_id]).unwrap();
    b.abort(Tid(1)).unwrap();
    b.set_replication_progress(1, Some(&super::ReplProgress::after(Tid(203)))).unwrap();
    b.set_replication_progress(2, Some(&super::ReplProgress::after(Tid(203)))).unwrap();
    // Voted (partition 1) and held data of partition 1.
    let t = [store(b, 9, b"temporary")];
    let temp_id = t[0].data_id.unwrap();
    b.vote(Tid(301), &with_parts(&t), Some((1, &meta_for("t", &t)))).unwrap();
    let held = store(b, 13, b"held");
    let before: Vec<Load> = [2, 6].iter().map(|oid| load(b, *oid, None, None)).collect();
    let other = b.fetch_objects(2, (Tid::ZERO, Oid::ZERO), Tid(u64::MAX), 100, usize::MAX).unwrap();
    let other_txns = b.fetch_transactions(2, Tid::ZERO, Tid(u64::MAX), 100).unwrap();

    b.purge_partition(1).unwrap();
    let check = |b: &mut dyn Backend| {
        assert_eq!(b.partition_last_tid(1).unwrap(), None);
        assert!(b.fetch_transactions(1, Tid::ZERO, Tid(u64::MAX), 100).unwrap().is_empty());
        assert!(b.fetch_objects(1, (Tid::ZERO, Oid::ZERO), Tid(u64::MAX), 100, usize::MAX).unwrap().is_empty());
        assert_eq!(load(b, 1, None, None), Load::DoesNotExist);
        assert_eq!(load(b, 5, Some(102), None), Load::DoesNotExist);
        assert!(b.transaction(1, Tid(102)).unwrap().is_none());
        assert_eq!(b.replication_progress(1).unwrap(), None);
        // The other partition: untouched.
        assert_eq!(b.replication_progress(2).unwrap(), Some(super::ReplProgress::after(Tid(203))));
        let after: Vec<Load> = [2, 6].iter().map(|oid| load(b, *oid, None, None)).collect();
        assert!(after == before, "partition 2 changed");
        assert_eq!(b.fetch_objects(2, (Tid::ZERO, Oid::ZERO), Tid(u64::MAX), 100, usize::MAX).unwrap(), other);
        assert_eq!(b.fetch_transactions(2, Tid::ZERO, Tid(u64::MAX), 100).unwrap(), other_txns);
        assert_eq!(latest(b, 6).data, b"shared");
        assert_eq!(sorted_locked(b), vec![(Tid(301), None)]);
    };
    check(b);
    // Idempotent; and a partition without anything.
    b.purge_partition(1).unwrap();
    b.purge_partition(3).unwrap();
    check(b);
    assert!(data_row_is(b, b"shared", shared_id));
    assert!(!data_row_is(b, b"only 1", only_id), "data of the purged partition only survived");
    b.abort(Tid(1)).unwrap();
    // Temporary and held data survived.
    b.lock(Tid(301), Tid(302), &[]).unwrap();
    b.unlock(Tid(301), Tid(302)).unwrap();
    assert_eq!(latest(b, 9).data, b"temporary");
    assert!(data_row_is(b, b"temporary", temp_id));
    commit_objects(b, 402, &[held]);
    assert_eq!(latest(b, 13).data, b"held");
    // The partition can be replicated again from a cell that has it.
    assert_eq!(b.partition_last_tid(1).unwrap(), Some(Tid(402)));
}

/// Replicating a partition into a cell, purging it there, and replicating it again gives
/// the same partition; the others stay.
pub(crate) fn purge_then_replicate_again(src: &mut dyn Backend, dst: &mut dyn Backend) {
    let mut rng = fastrand::Rng::with_seed(11);
    let (mut revisions, mut pool) = (Revisions::new(), Vec::new());
    for i in 0..10u64 {
        random_txn(&mut rng, 100 + 10 * i, &mut revisions, &mut pool, false).commit(src, i % 2 == 1);
    }
    replicate_all(src, dst);
    for p in ALL {
        assert_same_partition(src, dst, p);
    }
    dst.purge_partition(3).unwrap();
    assert_eq!(dst.partition_last_tid(3).unwrap(), None);
    for p in [0, 1, 2] {
        assert_same_partition(src, dst, p);
    }
    replicate_all(src, dst);
    for p in ALL {
        assert_same_partition(src, dst, p);
    }
}

/// Garbage read by replication is `Corrupt`, naming what is wrong: a saved progress, the
/// rows fetch_transactions and fetch_objects read.
pub(crate) fn corrupt_replication_rows(open: Open<'_>, raw: RawSql<'_>) {
    let mut b = open(CLUSTER).unwrap();
    let b = &mut *b;
    commit(b, 102, &[(1, Some(b"d1")), (5, Some(b"d5")), (9, Some(b"d9")), (13, Some(b"d13"))]);
    b.set_replication_progress(1, Some(&super::ReplProgress::after(Tid(102)))).unwrap();
    b.idle();
    raw("UPDATE config SET value = 'garbage' WHERE name = 'replication.1'");
    assert_corrupt(b.replication_progress(1), "replication.1");
    raw("UPDATE config SET value = '1 2 3 4 5' WHERE name = 'replication.1'");
    assert_corrupt(b.replication_progress(1), "replication.1");
    assert_eq!(b.replication_progress(2).unwrap(), None);
    b.set_replication_progress(1, Some(&super::ReplProgress::ZERO)).unwrap();
    assert_eq!(b.replication_progress(1).unwrap(), Some(super::ReplProgress::ZERO));
    b.idle();

    let fetch = |b: &mut dyn Backend, oid: u64| {
        b.fetch_objects(1, (Tid(102), Oid(oid)), Tid(102), 1, usize::MAX).map(|v| v.len())
    };
    let data_of = |oid: u64| format!("(SELECT data_id FROM obj WHERE oid = {oid})");
    raw(&format!("UPDATE data SET hash = X'010203' WHERE id = {}", data_of(1)));
    assert_corrupt(fetch(b, 1), &Oid(1).to_string());
    raw(&format!("UPDATE data SET compression = 7 WHERE id = {}", data_of(5)));
    assert_corrupt(fetch(b, 5), &Oid(5).to_string());
    raw("UPDATE obj SET data_id = 987654321 WHERE oid = 9");
    assert_corrupt(fetch(b, 9), &Oid(9).to_string());
    raw("UPDATE obj SET value_tid = -5 WHERE oid = 13");
    assert_corrupt(fetch(b, 13), &Oid(13).to_string());
    raw("UPDATE trans SET packed = 3 WHERE tid = 102");
    assert_corrupt(b.fetch_transactions(1, Tid::ZERO, Tid(u64::MAX), 10), "packed");
    raw("UPDATE trans SET packed = 0, oids = X'0102' WHERE tid = 102");
    assert_corrupt(b.fetch_transactions(1, Tid::ZERO, Tid(u64::MAX), 10), &Tid(102).to_string());
    raw("UPDATE trans SET oids = X'', ttid = -3 WHERE tid = 102");
    assert_corrupt(b.fetch_transactions(1, Tid::ZERO, Tid(u64::MAX), 10), &Tid(102).to_string());
    raw("UPDATE trans SET ttid = 101, tid = -3 WHERE tid = 102");
    assert_corrupt(b.partition_last_tid(1), "tid");
}

// --- SQLite

mod sqlite {
    use super::*;
    use crate::backend::sqlite::SqliteBackend;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    fn memory() -> Box<dyn Backend> {
        Box::new(SqliteBackend::open(Path::new(":memory:"), CLUSTER).unwrap())
    }

    /// A database file in a temporary directory.
    struct FileDb {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    impl FileDb {
        fn new() -> FileDb {
            let dir = tempfile::TempDir::new().unwrap();
            let path = dir.path().join("neo.sqlite");
            FileDb { _dir: dir, path }
        }
        fn open(&self, cluster: &str) -> Result<Box<dyn Backend>> {
            SqliteBackend::open_shared(&self.path, cluster).map(|b| Box::new(b) as Box<dyn Backend>)
        }
        fn backend(&self) -> Box<dyn Backend> {
            self.open(CLUSTER).unwrap()
        }
        fn raw(&self, sql: &str) {
            let c = rusqlite::Connection::open(&self.path).unwrap();
            c.busy_timeout(Duration::from_secs(10)).unwrap();
            c.execute_batch(sql).unwrap();
        }
    }

    /// Run each fresh-backend check on an in-memory and on a file database.
    macro_rules! fresh {
        ($($name:ident),* $(,)?) => {
            mod memory {
                $(#[test] fn $name() { super::super::$name(&mut *super::memory()); })*
            }
            mod file {
                $(#[test] fn $name() {
                    let db = super::FileDb::new();
                    super::super::$name(&mut *db.backend());
                })*
            }
        };
    }

    fresh!(
        vote_data_stores_data_objects_and_metadata,
        last_serials_and_data_reused_across_votes,
        load_revisions,
        deletion_and_back_pointer,
        dedup,
        commit_visibility,
        metadata_only_on_holders,
        abort_prunes,
        shared_data_survives_abort,
        locked_and_final,
        drop_unfinished,
        partition_table,
        last_ids,
        config,
        record_sizes,
        random_records_round_trip,
        object_history,
        tids_and_tids_from,
        undo_info,
        pack,
        fetch_for_replication,
        partition_last_tid_ignores_temporary_data,
        store_replicated_replaces_and_prunes,
        purge_partition_keeps_the_others,
    );

    #[test]
    fn restart() {
        let db = FileDb::new();
        super::restart(&|c| db.open(c));
    }

    #[test]
    fn wrong_cluster() {
        let db = FileDb::new();
        super::wrong_cluster(&|c| db.open(c));
    }

    #[test]
    fn schema_too_new() {
        let db = FileDb::new();
        super::schema_too_new(&|c| db.open(c), &|sql| db.raw(sql));
    }

    #[test]
    fn schema_upgrade_from_v1() {
        let db = FileDb::new();
        super::schema_upgrade_from_v1(&|c| db.open(c), &|sql| db.raw(sql));
    }

    #[test]
    fn corrupt_rows() {
        let db = FileDb::new();
        super::corrupt_rows(&|c| db.open(c), &|sql| db.raw(sql));
    }

    #[test]
    fn corrupt_history_rows() {
        let db = FileDb::new();
        super::corrupt_history_rows(&|c| db.open(c), &|sql| db.raw(sql));
    }

    #[test]
    fn corrupt_replication_rows() {
        let db = FileDb::new();
        super::corrupt_replication_rows(&|c| db.open(c), &|sql| db.raw(sql));
    }

    #[test]
    fn replication_of_random_histories() {
        let db = FileDb::new();
        super::replication_of_random_histories(&mut *memory(), &mut *db.backend());
    }

    #[test]
    fn replication_of_random_histories_into_memory() {
        let db = FileDb::new();
        super::replication_of_random_histories(&mut *db.backend(), &mut *memory());
    }

    #[test]
    fn replication_resumes() {
        let db = FileDb::new();
        super::replication_resumes(&mut *memory(), &|c| db.open(c));
    }

    #[test]
    fn purge_then_replicate_again() {
        let db = FileDb::new();
        super::purge_then_replicate_again(&mut *memory(), &mut *db.backend());
    }

    // --- SQLite specifics

    /// Data of a transaction aborted before it voted goes once the node releases it.
    #[test]
    fn release_then_abort_prunes() {
        let mut b = SqliteBackend::open(Path::new(":memory:"), CLUSTER).unwrap();
        let id = b.store_data(0, &sha1(b"x"), 0, b"x").unwrap();
        b.abort(Tid(1)).unwrap();
        assert!(data_row_is(&mut b, b"x", id)); // now held twice
        b.release(&[id]);
        b.abort(Tid(1)).unwrap();
        assert!(data_row_is(&mut b, b"x", id), "row pruned while still held");
        b.release(&[id, id]);
        b.abort(Tid(1)).unwrap();
        assert!(!data_row_is(&mut b, b"x", id), "released row not pruned");
        // Releasing unknown ids is harmless.
        b.release(&[12345]);
        b.abort(Tid(1)).unwrap();
    }

    /// Values of the wrong SQL type are corruption too.
    #[test]
    fn wrong_types_are_corrupt() {
        let db = FileDb::new();
        let mut b = db.backend();
        commit(&mut *b, 100, &[(1, Some(b"a")), (2, Some(b"b")), (3, Some(b"c"))]);
        db.raw("UPDATE obj SET data_id = 'garbage' WHERE oid = 1");
        assert_corrupt(b.load(part(1), Oid(1), None, None), &Oid(1).to_string());
        db.raw("UPDATE data SET value = 'text' WHERE id = (SELECT data_id FROM obj WHERE oid = 2)");
        assert_corrupt(b.load(part(2), Oid(2), None, None), &Oid(2).to_string());
        db.raw("UPDATE trans SET packed = 3");
        assert_corrupt(b.transaction(part(99), Tid(100)), "packed");
        assert_eq!(latest(&mut *b, 3).data, b"c");
    }

    /// A data value of the wrong SQL type is corruption for history too.
    #[test]
    fn history_of_a_wrong_type_is_corrupt() {
        let db = FileDb::new();
        let mut b = db.backend();
        commit(&mut *b, 100, &[(1, Some(b"a"))]);
        commit(&mut *b, 200, &[(1, Some(b"b"))]);
        db.raw("UPDATE data SET value = 'text' WHERE id = (SELECT data_id FROM obj WHERE oid = 1 AND tid = 100)");
        assert_corrupt(b.object_history(part(1), Oid(1), 0, 10), &Oid(1).to_string());
        assert_eq!(history(&mut *b, 1, 0, 1), [(200, 1)]);
    }

    /// Values of the wrong SQL type are corruption for replication too.
    #[test]
    fn replication_of_a_wrong_type_is_corrupt() {
        let db = FileDb::new();
        let mut b = db.backend();
        commit(&mut *b, 100, &[(1, Some(b"a")), (5, Some(b"b"))]);
        let fetch = |b: &mut dyn Backend, oid: u64| {
            b.fetch_objects(1, (Tid(100), Oid(oid)), Tid(100), 1, usize::MAX).map(|v| v.len())
        };
        db.raw("UPDATE data SET value = 'text' WHERE id = (SELECT data_id FROM obj WHERE oid = 1)");
        assert_corrupt(fetch(&mut *b, 1), &Oid(1).to_string());
        db.raw("UPDATE obj SET data_id = 'garbage' WHERE oid = 5");
        assert_corrupt(fetch(&mut *b, 5), &Oid(5).to_string());
        db.raw("UPDATE config SET value = X'00' WHERE name = 'replication.1'");
        assert_eq!(b.replication_progress(1).unwrap(), None);
        b.set_replication_progress(1, Some(&crate::backend::ReplProgress::ZERO)).unwrap();
        db.raw("UPDATE config SET value = X'00' WHERE name = 'replication.1'");
        assert_corrupt(b.replication_progress(1), "replication.1");
    }

    /// store_replicated joins an open batch (as a savepoint): committed with it, or undone
    /// alone when it fails.
    #[test]
    fn store_replicated_in_a_batch() {
        use crate::backend::{NewData, ReplObject, ReplProgress};
        let db = FileDb::new();
        drop(db.backend());
        db.raw(
            "CREATE TRIGGER no_99 BEFORE INSERT ON obj WHEN NEW.oid = 99
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        );
        let mut b = SqliteBackend::open(&db.path, CLUSTER).unwrap();
        let t = |tid: u64| TxnInfo { tid: Tid(tid), ttid: Tid(tid - 1), packed: false, meta: TxnMeta::default() };
        let data = Some(NewData { checksum: sha1(b"r"), compression: 0, data: b"r".to_vec() });
        let o = ReplObject { oid: Oid(1), tid: Tid(100), data, data_serial: None };
        let progress = ReplProgress::after(Tid(100));
        assert!(b.begin_batch());
        commit(&mut b, 50, &[(5, Some(b"direct"))]);
        b.store_replicated(1, &[t(100)], std::slice::from_ref(&o), &progress).unwrap();
        // Fails at its last row: undoes its own writes only.
        let refused = [ReplObject { oid: Oid(3), ..o.clone() }, ReplObject { oid: Oid(99), ..o.clone() }];
        let e = b.store_replicated(3, &[t(200)], &refused, &progress).unwrap_err();
        assert!(e.to_string().contains("refused by the test"), "{e}");
        // Not visible to other connections before the batch commits.
        let mut reader = SqliteBackend::open_reader(&db.path).unwrap();
        assert_eq!(reader.replication_progress(1).unwrap(), None);
        b.commit_batch().unwrap();
        b.sync().unwrap();
        assert_eq!(reader.replication_progress(1).unwrap(), Some(progress));
        assert_eq!(latest(&mut reader, 1).data, b"r");
        assert_eq!(latest(&mut reader, 5).data, b"direct");
        assert_eq!(history(&mut reader, 1, 0, 10), [(100, 1)]);
        assert_eq!(reader.transaction(1, Tid(100)).unwrap(), Some(t(100)));
        assert_eq!(reader.replication_progress(3).unwrap(), None);
        assert!(reader.transaction(3, Tid(200)).unwrap().is_none());
        assert_eq!(load(&mut reader, 3, None, None), Load::DoesNotExist);
    }

    /// A reader sees every commit of the storage's connection, while it is open, and cannot
    /// write.
    #[test]
    fn a_reader_sees_the_commits_of_the_open_backend() {
        let db = FileDb::new();
        let mut b = SqliteBackend::open(&db.path, CLUSTER).unwrap();
        commit(&mut b, 100, &[(1, Some(b"a"))]);
        let mut r = SqliteBackend::open_reader(&db.path).unwrap();
        assert_eq!(latest(&mut r, 1).data, b"a");
        commit(&mut b, 200, &[(1, Some(b"b")), (2, Some(b"c"))]);
        assert_eq!(latest(&mut r, 1).data, b"b");
        assert_eq!(latest(&mut r, 2).data, b"c");
        assert_eq!(load(&mut r, 3, None, None), Load::DoesNotExist);
        assert!(r.set_config("k", Some("v")).is_err());
        assert_eq!(latest(&mut b, 1).data, b"b");
    }

    /// Votes and unlocks leave a write-back due (started once); a sync, which writes
    /// everything, clears it; locks and reads leave none; nothing to do in memory.
    #[cfg(target_os = "linux")] // sync_file_range
    #[test]
    fn votes_and_unlocks_are_written_back_once_before_the_next_sync() {
        let db = FileDb::new();
        let mut b = SqliteBackend::open(&db.path, CLUSTER).unwrap();
        assert!(!b.start_writeback(), "nothing committed yet");
        let o = store(&mut b, 1, b"a");
        let meta = meta_for("u", std::slice::from_ref(&o));
        b.vote(Tid(99), &with_parts(std::slice::from_ref(&o)), Some((part(99), &meta))).unwrap();
        assert!(b.start_writeback(), "a vote was committed");
        assert!(!b.start_writeback(), "already started");
        b.lock(Tid(99), Tid(100), &[]).unwrap();
        assert!(!b.start_writeback(), "a lock waits for its sync");
        b.vote(Tid(100), &[], None).unwrap();
        b.sync().unwrap();
        assert!(!b.start_writeback(), "the sync wrote everything");
        b.unlock(Tid(99), Tid(100)).unwrap();
        assert!(b.start_writeback(), "an unlock was committed");
        assert_eq!(latest(&mut b, 1).data, b"a");
        assert!(!b.start_writeback(), "a read writes nothing");
        let mut m = memory();
        commit(&mut *m, 100, &[(1, Some(b"a"))]);
        assert!(!m.start_writeback(), "no file in memory");
    }

    /// A second process (connection) cannot use a database a storage has open.
    #[test]
    fn a_second_open_of_the_same_file_fails() {
        let db = FileDb::new();
        let mut first = SqliteBackend::open(&db.path, CLUSTER).unwrap();
        first.set_config("k", Some("v")).unwrap();
        let second = SqliteBackend::open(&db.path, CLUSTER);
        assert!(second.is_err(), "the database was opened twice");
        drop(first);
        let mut again = SqliteBackend::open(&db.path, CLUSTER).unwrap();
        assert_eq!(again.get_config("k").unwrap().as_deref(), Some("v"));
    }

    #[test]
    fn file_uses_wal_and_reopens() {
        let db = FileDb::new();
        drop(db.backend());
        let c = rusqlite::Connection::open(&db.path).unwrap();
        let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode.to_ascii_lowercase(), "wal");
        let version: String = c.query_row("SELECT value FROM config WHERE name = 'version'", [], |r| r.get(0)).unwrap();
        assert_eq!(version, crate::backend::sqlite::SCHEMA_VERSION.to_string());
        drop(c);
        let mut b = db.backend();
        assert_eq!(b.engine(), "SQLite");
        assert_eq!(b.get_config("name").unwrap().as_deref(), Some(CLUSTER));
    }

    #[test]
    fn store_data_rejects_bad_arguments() {
        let mut b = memory();
        assert!(b.store_data(0, b"short", 0, b"x").is_err());
        assert!(b.store_data(0, &sha1(b"x"), 7, b"x").is_err());
    }
}

// --- MySQL (MariaDB): the same checks, each on its own database of the server named by
// NEO_TEST_MYSQL (default mysql://root@127.0.0.1:3306). Without the variable, an unreachable
// server skips the tests (saying why on stderr); with it, it fails them.

mod mysql {
    use super::*;
    use crate::backend::mysql::MysqlBackend;
    use mysql_async::prelude::Queryable;
    use mysql_async::{Conn, Opts, OptsBuilder};
    use std::time::Duration;

    const DEFAULT_SERVER: &str = "mysql://root@127.0.0.1:3306";

    use crate::testing::server_sql;

    /// A private database on the test server, dropped with this value.
    struct TestDb {
        server: String,
        name: String,
        url: String,
    }

    impl TestDb {
        /// None (after saying why on stderr) if the server is unreachable and NEO_TEST_MYSQL
        /// is unset; panics if it is set.
        fn new() -> Option<TestDb> {
            let (server, required) = match std::env::var("NEO_TEST_MYSQL") {
                Ok(s) => (s, true),
                Err(_) => (DEFAULT_SERVER.to_string(), false),
            };
            if let Err(e) = server_sql(&server, None, "SELECT 1") {
                if required {
                    panic!("NEO_TEST_MYSQL={server}: {e}");
                }
                eprintln!("MySQL tests skipped: {server}: {e}");
                return None;
            }
            let name = format!("neo_test_{}", fastrand::u64(..));
            let (base, query) = match server.split_once('?') {
                Some((b, q)) => (b, format!("?{q}")),
                None => (server.as_str(), String::new()),
            };
            let base = base.trim_end_matches('/');
            // A server URL naming a database: replace it by ours.
            let base = match base.strip_prefix("mysql://").and_then(|rest| rest.find('/')) {
                Some(i) => &base[..i + "mysql://".len()],
                None => base,
            };
            let url = format!("{base}/{name}{query}");
            Some(TestDb { server, name, url })
        }

        fn open(&self, cluster: &str) -> Result<Box<dyn Backend>> {
            MysqlBackend::open(&self.url, cluster).map(|b| Box::new(b) as Box<dyn Backend>)
        }

        fn backend(&self) -> Box<dyn Backend> {
            self.open(CLUSTER).unwrap()
        }

        /// Raw SQL written for the suite (SQLite syntax where it matters): `partition` is a
        /// reserved word in MySQL, so quote it.
        fn raw(&self, sql: &str) {
            server_sql(&self.server, Some(&self.name), &quote_partition(sql)).unwrap();
        }
    }

    impl TestDb {
        /// The integer a one-row, one-column query returns.
        fn query_int(&self, sql: &str) -> i64 {
            let opts = Opts::from_url(&self.server).unwrap();
            let opts: Opts = OptsBuilder::from_opts(opts).db_name(Some(&self.name)).into();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut c = Conn::new(opts).await.unwrap();
                let v: Option<i64> = c.query_first(sql).await.unwrap();
                c.disconnect().await.unwrap();
                v.unwrap()
            })
        }
    }

    /// `sql` with the word `partition` (not `partitions`, ...) quoted.
    fn quote_partition(sql: &str) -> String {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '`';
        let mut out = String::with_capacity(sql.len() + 8);
        let mut rest = sql;
        while let Some(i) = rest.find("partition") {
            let (before, after) = (&rest[..i], &rest[i + "partition".len()..]);
            out.push_str(before);
            let whole = !out.ends_with(word) && !after.starts_with(word);
            out.push_str(if whole { "`partition`" } else { "partition" });
            rest = after;
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn quote_partition_quotes_whole_words_only() {
        assert_eq!(
            quote_partition("UPDATE pt SET partition = 7 WHERE name = 'partitions' AND `partition` = 1"),
            "UPDATE pt SET `partition` = 7 WHERE name = 'partitions' AND `partition` = 1"
        );
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            if let Err(e) = server_sql(&self.server, None, &format!("DROP DATABASE IF EXISTS `{}`", self.name)) {
                eprintln!("cannot drop test database {}: {e}", self.name);
            }
        }
    }

    /// Run each fresh-backend check on a new database.
    macro_rules! fresh {
        ($($name:ident),* $(,)?) => {
            $(#[test] fn $name() {
                let Some(db) = TestDb::new() else { return };
                let mut b = db.backend();
                super::$name(&mut *b);
            })*
        };
    }

    fresh!(
        vote_data_stores_data_objects_and_metadata,
        last_serials_and_data_reused_across_votes,
        load_revisions,
        deletion_and_back_pointer,
        dedup,
        commit_visibility,
        metadata_only_on_holders,
        abort_prunes,
        shared_data_survives_abort,
        locked_and_final,
        drop_unfinished,
        partition_table,
        last_ids,
        config,
        record_sizes,
        random_records_round_trip,
        object_history,
        tids_and_tids_from,
        undo_info,
        pack,
        fetch_for_replication,
        partition_last_tid_ignores_temporary_data,
        store_replicated_replaces_and_prunes,
        purge_partition_keeps_the_others,
    );

    #[test]
    fn restart() {
        let Some(db) = TestDb::new() else { return };
        super::restart(&|c| db.open(c));
    }

    #[test]
    fn wrong_cluster() {
        let Some(db) = TestDb::new() else { return };
        super::wrong_cluster(&|c| db.open(c));
    }

    #[test]
    fn schema_too_new() {
        let Some(db) = TestDb::new() else { return };
        super::schema_too_new(&|c| db.open(c), &|sql| db.raw(sql));
    }

    #[test]
    fn schema_upgrade_from_v1() {
        let Some(db) = TestDb::new() else { return };
        super::schema_upgrade_from_v1(&|c| db.open(c), &|sql| db.raw(sql));
    }

    #[test]
    fn corrupt_rows() {
        let Some(db) = TestDb::new() else { return };
        super::corrupt_rows(&|c| db.open(c), &|sql| db.raw(sql));
    }

    #[test]
    fn corrupt_history_rows() {
        let Some(db) = TestDb::new() else { return };
        super::corrupt_history_rows(&|c| db.open(c), &|sql| db.raw(sql));
    }

    #[test]
    fn corrupt_replication_rows() {
        let Some(db) = TestDb::new() else { return };
        super::corrupt_replication_rows(&|c| db.open(c), &|sql| db.raw(sql));
    }

    // --- replication between two cells, of this engine or of both

    #[test]
    fn replication_of_random_histories() {
        let (Some(a), Some(b)) = (TestDb::new(), TestDb::new()) else { return };
        super::replication_of_random_histories(&mut *a.backend(), &mut *b.backend());
    }

    /// Both cells store records in chunks of 64 KiB: most records of a few KiB or more are
    /// split, written statement by statement, and reassembled when fetched.
    #[test]
    fn replication_of_random_histories_in_small_chunks() {
        let (Some(a), Some(b)) = (TestDb::new(), TestDb::new()) else { return };
        let mut src = MysqlBackend::open(&a.url, CLUSTER).unwrap();
        src.set_chunk_size(64 << 10);
        let mut dst = MysqlBackend::open(&b.url, CLUSTER).unwrap();
        dst.set_chunk_size(64 << 10);
        super::replication_of_random_histories(&mut src, &mut dst);
    }

    #[test]
    fn replication_from_sqlite() {
        let Some(db) = TestDb::new() else { return };
        let mut src = crate::backend::sqlite::SqliteBackend::open(std::path::Path::new(":memory:"), CLUSTER).unwrap();
        super::replication_of_random_histories(&mut src, &mut *db.backend());
    }

    #[test]
    fn replication_to_sqlite() {
        let Some(db) = TestDb::new() else { return };
        let mut dst = crate::backend::sqlite::SqliteBackend::open(std::path::Path::new(":memory:"), CLUSTER).unwrap();
        super::replication_of_random_histories(&mut *db.backend(), &mut dst);
    }

    #[test]
    fn replication_resumes() {
        let (Some(a), Some(b)) = (TestDb::new(), TestDb::new()) else { return };
        super::replication_resumes(&mut *a.backend(), &|c| b.open(c));
    }

    #[test]
    fn purge_then_replicate_again() {
        let (Some(a), Some(b)) = (TestDb::new(), TestDb::new()) else { return };
        super::purge_then_replicate_again(&mut *a.backend(), &mut *b.backend());
    }

    // --- MySQL specifics

    /// Records around and across chunk boundaries round-trip, with a tiny chunk size; their
    /// chunks go with their data row when it is pruned.
    #[test]
    fn chunked_records() {
        let Some(db) = TestDb::new() else { return };
        let mut b = MysqlBackend::open(&db.url, CLUSTER).unwrap();
        b.set_chunk_size(100);
        let sizes = [0usize, 1, 99, 100, 101, 200, 250, 1000];
        let datas: Vec<Vec<u8>> =
            sizes.iter().map(|n| (0..*n).map(|i| (i.wrapping_mul(13) % 256) as u8).collect()).collect();
        let objs: Vec<TempObject> = datas.iter().enumerate().map(|(i, d)| store(&mut b, 10 + i as u64, d)).collect();
        commit_objects(&mut b, 100, &objs);
        for (i, d) in datas.iter().enumerate() {
            let r = latest(&mut b, 10 + i as u64);
            assert!(r.data == *d, "record of {} bytes differs", d.len());
        }
        // The chunks of an aborted record go with it.
        let big: Vec<u8> = (0..450u32).map(|i| (i % 7) as u8).collect();
        let o = [store(&mut b, 50, &big)];
        b.vote(Tid(200), &with_parts(&o), None).unwrap();
        b.abort(Tid(200)).unwrap();
        // 101: 1, 200: 1, 250: 2, 1000: 9 extra chunks.
        assert_eq!(db.query_int("SELECT COUNT(*) FROM bigdata"), 13);
        // Missing chunks are corruption.
        db.raw("DELETE FROM bigdata WHERE n = 2");
        assert_corrupt(b.load(part(17), Oid(17), None, None), &Oid(17).to_string());
        b.drop_unfinished().unwrap();
    }

    /// Random records across chunk boundaries (chunks of 64 KiB).
    #[test]
    fn random_records_in_small_chunks() {
        let Some(db) = TestDb::new() else { return };
        let mut b = MysqlBackend::open(&db.url, CLUSTER).unwrap();
        b.set_chunk_size(64 << 10);
        super::random_records_round_trip(&mut b);
    }

    /// History reports the whole size of a chunked record; pack deletes the chunks of the data
    /// rows it prunes, and keeps those of rows still referenced.
    #[test]
    fn pack_prunes_chunks() {
        let Some(db) = TestDb::new() else { return };
        let mut b = MysqlBackend::open(&db.url, CLUSTER).unwrap();
        b.set_chunk_size(100);
        let big = |n: usize, k: u8| -> Vec<u8> { (0..n).map(|i| (i as u8).wrapping_mul(k)).collect() };
        commit(&mut b, 100, &[(1, Some(&big(250, 3))), (2, Some(&big(150, 5)))]);
        commit(&mut b, 200, &[(1, Some(&big(120, 7))), (3, Some(&big(150, 5)))]);
        commit(&mut b, 300, &[(2, Some(b"small"))]);
        assert_eq!(history(&mut b, 1, 0, 10), [(200, 120), (100, 250)]);
        // 250: 2 chunks, 150: 1, 120: 1.
        assert_eq!(db.query_int("SELECT COUNT(*) FROM bigdata"), 4);
        b.pack(&ALL, Tid(300)).unwrap();
        // The 250-byte record is gone with its chunks; the 150-byte one is still used by oid 3.
        assert_eq!(db.query_int("SELECT COUNT(*) FROM bigdata"), 2);
        assert_eq!(latest(&mut b, 3).data, big(150, 5));
        assert_eq!(latest(&mut b, 1).data, big(120, 7));
        assert_eq!(history(&mut b, 2, 0, 10), [(300, 5)]);
    }

    /// Replication writes records longer than a chunk into `bigdata`, fetches them whole, and
    /// reports missing chunks as corruption; purging a partition deletes the chunks of the
    /// data rows it prunes.
    #[test]
    fn replication_of_chunked_records() {
        use crate::backend::{NewData, ReplObject, ReplProgress};
        let Some(db) = TestDb::new() else { return };
        let mut b = MysqlBackend::open(&db.url, CLUSTER).unwrap();
        b.set_chunk_size(100);
        let big = |n: usize, k: u8| -> Vec<u8> { (0..n).map(|i| (i as u8).wrapping_mul(k)).collect() };
        let r = |oid: u64, tid: u64, d: Vec<u8>| ReplObject {
            oid: Oid(oid),
            tid: Tid(tid),
            data: Some(NewData { checksum: sha1(&d), compression: 0, data: d }),
            data_serial: None,
        };
        // 250 bytes: 2 extra chunks, 150: 1, 100: none; shared by partitions 1 and 2.
        let objects = [r(1, 100, big(250, 3)), r(5, 100, big(150, 5)), r(9, 100, big(100, 7))];
        b.store_replicated(1, &[], &objects, &ReplProgress::after(Tid(100))).unwrap();
        b.store_replicated(2, &[], &[r(2, 100, big(150, 5))], &ReplProgress::after(Tid(100))).unwrap();
        assert_eq!(db.query_int("SELECT COUNT(*) FROM bigdata"), 3);
        let fetched = b.fetch_objects(1, (Tid::ZERO, Oid::ZERO), Tid(u64::MAX), 10, usize::MAX).unwrap();
        assert!(fetched == objects, "chunked records differ");
        assert_eq!(latest(&mut b, 1).data, big(250, 3));
        // Budget: by the whole size of a record.
        assert_eq!(b.fetch_objects(1, (Tid::ZERO, Oid::ZERO), Tid(u64::MAX), 10, 399).unwrap().len(), 1);
        assert_eq!(b.fetch_objects(1, (Tid::ZERO, Oid::ZERO), Tid(u64::MAX), 10, 400).unwrap().len(), 2);
        // Replaced by a small record: its chunks go with its data row.
        b.store_replicated(1, &[], &[r(1, 100, b"small".to_vec())], &ReplProgress::after(Tid(100))).unwrap();
        assert_eq!(db.query_int("SELECT COUNT(*) FROM bigdata"), 1);
        b.purge_partition(1).unwrap();
        assert_eq!(db.query_int("SELECT COUNT(*) FROM bigdata"), 1, "still used by partition 2");
        assert_eq!(latest(&mut b, 2).data, big(150, 5));
        b.purge_partition(2).unwrap();
        assert_eq!(db.query_int("SELECT COUNT(*) FROM bigdata"), 0);
        assert_eq!(db.query_int("SELECT COUNT(*) FROM data"), 0);
        // Missing or extra bytes are corruption.
        b.store_replicated(1, &[], &[r(1, 100, big(250, 3)), r(5, 100, big(150, 5))], &ReplProgress::ZERO).unwrap();
        db.raw("DELETE FROM bigdata WHERE n = 2");
        let e = b.fetch_objects(1, (Tid::ZERO, Oid::ZERO), Tid(u64::MAX), 1, usize::MAX);
        assert_corrupt(e, &Oid(1).to_string());
        db.raw("UPDATE data SET value_size = 151 WHERE value_size = 150");
        let e = b.fetch_objects(1, (Tid(100), Oid(5)), Tid(u64::MAX), 1, usize::MAX);
        assert_corrupt(e, &Oid(5).to_string());
    }

    /// store_replicated commits the deferred unlocks with its own writes, in one query or
    /// statement by statement, and is retried after a lost connection.
    #[test]
    fn store_replicated_commits_deferred_unlocks_and_survives_a_killed_connection() {
        use crate::backend::{NewData, ReplObject, ReplProgress};
        let Some(db) = TestDb::new() else { return };
        let mut b = MysqlBackend::open(&db.url, CLUSTER).unwrap();
        b.set_max_defer(Duration::from_secs(3600));
        let outside = |db: &TestDb| db.query_int("SELECT COUNT(*) FROM obj");
        let r = |oid: u64, tid: u64, d: &[u8]| ReplObject {
            oid: Oid(oid),
            tid: Tid(tid),
            data: Some(NewData { checksum: sha1(d), compression: 0, data: d.to_vec() }),
            data_serial: None,
        };
        commit_one(&mut b, 60, 1, b"a");
        assert_eq!(outside(&db), 0, "not committed yet");
        b.store_replicated(2, &[], &[r(2, 50, b"b")], &ReplProgress::after(Tid(50))).unwrap();
        assert_eq!(outside(&db), 2, "committed together");
        assert!(!b.has_deferred());
        // Statement by statement (longer than a chunk).
        commit_one(&mut b, 70, 3, b"c");
        b.set_chunk_size(100);
        b.store_replicated(2, &[], &[r(6, 50, &[7; 300])], &ReplProgress::after(Tid(50))).unwrap();
        assert_eq!(outside(&db), 4);
        assert!(!b.has_deferred());
        // A lost connection: retried.
        commit_one(&mut b, 80, 4, b"d");
        kill(&db, &mut b);
        b.store_replicated(2, &[], &[r(10, 50, b"e")], &ReplProgress::after(Tid(55))).unwrap();
        assert_eq!(outside(&db), 6);
        kill(&db, &mut b);
        b.store_replicated(2, &[], &[r(14, 50, &[8; 300])], &ReplProgress::after(Tid(56))).unwrap();
        kill(&db, &mut b);
        b.purge_partition(3).unwrap();
        kill(&db, &mut b);
        assert_eq!(b.fetch_objects(2, (Tid::ZERO, Oid::ZERO), Tid(u64::MAX), 10, usize::MAX).unwrap().len(), 4);
        kill(&db, &mut b);
        assert_eq!(b.replication_progress(2).unwrap(), Some(ReplProgress::after(Tid(56))));
        kill(&db, &mut b);
        assert_eq!(b.partition_last_tid(2).unwrap(), Some(Tid(50)));
        kill(&db, &mut b);
        assert_eq!(b.fetch_transactions(1, Tid::ZERO, Tid(u64::MAX), 10).unwrap().len(), 1);
        assert_eq!(latest(&mut b, 4).data, b"d");
        assert_eq!(latest(&mut b, 14).data, [8; 300]);
    }

    /// The largest record (64 MiB: four times a MEDIUMBLOB, and more than the server's default
    /// max_allowed_packet) round-trips.
    #[test]
    fn record_larger_than_a_mediumblob() {
        let Some(db) = TestDb::new() else { return };
        let mut b = db.backend();
        let data: Vec<u8> = (0..(64usize << 20)).map(|i| (i.wrapping_mul(31) % 253) as u8).collect();
        let o = [store(&mut *b, 1, &data)];
        commit_objects(&mut *b, 100, &o);
        let r = latest(&mut *b, 1);
        assert_eq!(r.data.len(), data.len());
        assert!(r.data == data);
        assert_eq!(r.checksum, sha1(&data));
    }

    /// A vote too long for one query (here: longer than a chunk of 100 bytes) is written
    /// statement by statement, with the same result; records longer than a chunk too.
    #[test]
    fn votes_statement_by_statement_when_too_long_for_one_query() {
        let Some(db) = TestDb::new() else { return };
        let mut b = MysqlBackend::open(&db.url, CLUSTER).unwrap();
        b.set_chunk_size(100);
        super::vote_data_stores_data_objects_and_metadata(&mut b);
        super::last_serials_and_data_reused_across_votes(&mut b);
        let big: Vec<u8> = (0..450u32).map(|i| (i % 7) as u8).collect();
        b.vote_data(Tid(500), &super::new_objects(&[(400, Some(&big))]), None).unwrap();
        b.lock(Tid(500), Tid(510), &[]).unwrap();
        b.unlock(Tid(500), Tid(510)).unwrap();
        assert!(latest(&mut b, 400).data == big);
        assert_eq!(db.query_int("SELECT COUNT(*) FROM bigdata"), 4);
    }

    /// A vote in one query deduplicates data within the vote and against committed rows; when
    /// one of its statements fails, nothing of it stays and the connection goes on.
    #[test]
    fn a_vote_in_one_query_is_all_or_nothing() {
        let Some(db) = TestDb::new() else { return };
        let mut b = MysqlBackend::open(&db.url, CLUSTER).unwrap();
        let objs = super::new_objects(&[(1, Some(b"same")), (2, Some(b"same")), (3, Some(b"other"))]);
        b.vote_data(Tid(50), &objs, None).unwrap();
        b.lock(Tid(50), Tid(60), &[]).unwrap();
        b.unlock(Tid(50), Tid(60)).unwrap();
        b.vote_data(Tid(70), &super::new_objects(&[(4, Some(b"same"))]), None).unwrap();
        assert_eq!(db.query_int("SELECT COUNT(*) FROM data"), 2);
        b.abort(Tid(70)).unwrap();

        // The last statement (ttrans) fails: the data rows and objects before it go too.
        db.raw(
            "CREATE TRIGGER no_ttrans BEFORE INSERT ON ttrans FOR EACH ROW
             SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused by the test'",
        );
        let objs = super::new_objects(&[(5, Some(b"five")), (6, Some(b"same"))]);
        let meta = TxnMeta { user: b"u".to_vec(), oids: vec![Oid(5), Oid(6)], ..Default::default() };
        let e = b.vote_data(Tid(80), &objs, Some((part(80), &meta))).unwrap_err();
        assert!(e.to_string().contains("refused by the test"), "{e}");
        assert_eq!(db.query_int("SELECT COUNT(*) FROM data"), 2);
        assert_eq!(db.query_int("SELECT COUNT(*) FROM tobj"), 0);
        db.raw("DROP TRIGGER no_ttrans");
        b.vote_data(Tid(80), &objs, Some((part(80), &meta))).unwrap();
        b.lock(Tid(80), Tid(90), &[]).unwrap();
        b.unlock(Tid(80), Tid(90)).unwrap();
        assert_eq!(latest(&mut b, 5).data, b"five");
        assert_eq!(latest(&mut b, 6).data, b"same");
        assert_eq!(b.transaction(part(80), Tid(90)).unwrap().map(|t| t.meta), Some(meta));
        assert_eq!(b.reconnects(), 0, "the same connection throughout");
    }

    /// Vote (one object, `data`), lock and unlock: ttid `tid - 1`, final tid `tid`.
    fn commit_one(b: &mut MysqlBackend, tid: u64, oid: u64, data: &[u8]) {
        let meta = TxnMeta { user: b"u".to_vec(), oids: vec![Oid(oid)], ..Default::default() };
        b.vote_data(Tid(tid - 1), &super::new_objects(&[(oid, Some(data))]), Some((part(tid - 1), &meta))).unwrap();
        b.lock(Tid(tid - 1), Tid(tid), &[]).unwrap();
        b.unlock(Tid(tid - 1), Tid(tid)).unwrap();
    }

    /// An unlock is not committed by itself: the next vote or lock commits it with its own
    /// writes, or `idle`; this connection's reads see it meanwhile. If the connection or its
    /// transaction is lost first, the next call runs it again: no read misses it.
    #[test]
    fn unlocks_are_committed_with_the_next_commit_or_run_again() {
        let Some(db) = TestDb::new() else { return };
        let mut b = MysqlBackend::open(&db.url, CLUSTER).unwrap();
        let outside = |db: &TestDb| db.query_int("SELECT COUNT(*) FROM obj");
        // Reads join the open transaction however slow this machine is, until said otherwise.
        b.set_max_defer(Duration::from_secs(3600));
        commit_one(&mut b, 60, 1, b"a");
        assert_eq!(latest(&mut b, 1).data, b"a");
        assert_eq!(outside(&db), 0, "not committed yet");
        b.vote_data(Tid(69), &super::new_objects(&[(2, Some(b"b"))]), None).unwrap();
        assert_eq!(outside(&db), 1, "committed with the vote");
        b.lock(Tid(69), Tid(70), &[]).unwrap();
        b.unlock(Tid(69), Tid(70)).unwrap();
        commit_one(&mut b, 80, 3, b"c");
        assert_eq!(outside(&db), 2, "the lock of 80 committed the unlock of 70");
        b.idle();
        assert_eq!(outside(&db), 3, "committed when idle");
        b.idle();

        // The connection is lost with an unlock deferred: the next read runs it again first.
        let id = b.connection_id().unwrap();
        commit_one(&mut b, 90, 4, b"d");
        server_sql(&db.server, None, &format!("KILL {id}")).unwrap();
        assert_eq!(latest(&mut b, 4).data, b"d");
        assert_eq!(b.reconnects(), 1);
        assert_eq!(outside(&db), 4, "run again, committed");

        // A vote that fails rolls deferred unlocks back with it: run again too. (The trigger
        // is created while nothing is deferred: an open transaction blocks DDL on its tables.)
        db.raw(
            "CREATE TRIGGER no_ttrans BEFORE INSERT ON ttrans FOR EACH ROW
             IF NEW.ttid = 109 THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused by the test'; END IF",
        );
        commit_one(&mut b, 100, 5, b"e");
        let meta = TxnMeta { user: b"u".to_vec(), oids: vec![Oid(6)], ..Default::default() };
        assert!(b.vote_data(Tid(109), &super::new_objects(&[(6, Some(b"f"))]), Some((part(109), &meta))).is_err());
        db.raw("DROP TRIGGER no_ttrans");
        assert_eq!(latest(&mut b, 5).data, b"e");
        assert_eq!(outside(&db), 5);
        assert!(b.locked_transactions().unwrap().is_empty());

        // Reads alone join the open transaction for a while only (`MAX_DEFER`).
        commit_one(&mut b, 110, 6, b"f");
        assert_eq!(latest(&mut b, 6).data, b"f");
        assert_eq!(outside(&db), 5, "not committed by a read");
        b.set_max_defer(Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(latest(&mut b, 6).data, b"f");
        assert_eq!(outside(&db), 6, "committed by a read once old enough");

        // Closing commits what is deferred.
        commit_one(&mut b, 120, 7, b"g");
        drop(b);
        assert_eq!(outside(&db), 7);
        let mut b = MysqlBackend::open(&db.url, CLUSTER).unwrap();
        assert_eq!(latest(&mut b, 7).data, b"g");
    }

    #[test]
    fn engine_and_schema_version() {
        let Some(db) = TestDb::new() else { return };
        let mut b = db.backend();
        assert_eq!(b.engine(), "MySQL");
        assert_eq!(b.get_config("version").unwrap(), Some(crate::backend::mysql::SCHEMA_VERSION.to_string()));
        assert!(b.store_data(0, b"short", 0, b"x").is_err());
        assert!(b.store_data(0, &sha1(b"x"), 7, b"x").is_err());
    }

    /// A database that does not exist yet is created.
    #[test]
    fn creates_the_database() {
        let Some(db) = TestDb::new() else { return };
        drop(db.backend());
        server_sql(&db.server, Some(&db.name), "SELECT 1 FROM config").unwrap();
    }

    // --- lost connections

    /// KILL the backend's current connection from another one.
    fn kill(db: &TestDb, b: &mut MysqlBackend) -> u64 {
        let id = b.connection_id().unwrap();
        server_sql(&db.server, None, &format!("KILL {id}")).unwrap();
        id
    }

    /// After its connection is killed, the backend reconnects: reads and the idempotent writes
    /// are retried, committed data is intact, and a vote interrupted by a KILL either succeeds
    /// or fails cleanly, the backend working again on the next call in both cases.
    #[test]
    fn survives_a_killed_connection() {
        use crate::backend::{NewData, NewObject};
        let Some(db) = TestDb::new() else { return };
        let mut b = MysqlBackend::open(&db.url, CLUSTER).unwrap();
        commit(&mut b, 100, &[(1, Some(b"one")), (2, Some(b"two"))]);

        let old = kill(&db, &mut b);
        assert_eq!(b.get_config("name").unwrap().as_deref(), Some(CLUSTER));
        assert_eq!(b.reconnects(), 1);
        assert_ne!(b.connection_id().unwrap(), old, "a new connection");

        // lock and unlock, each right after a KILL.
        let o = [store(&mut b, 3, b"three")];
        let meta = meta_for("u200", &o);
        b.vote(Tid(199), &with_parts(&o), Some((part(199), &meta))).unwrap();
        kill(&db, &mut b);
        b.lock(Tid(199), Tid(200), &[]).unwrap();
        kill(&db, &mut b);
        assert_eq!(locked(&mut b), vec![(Tid(199), Some(Tid(200)))]);
        kill(&db, &mut b);
        b.unlock(Tid(199), Tid(200)).unwrap();
        kill(&db, &mut b);
        b.unlock(Tid(199), Tid(200)).unwrap();
        assert_eq!(latest(&mut b, 3).data, b"three");
        assert_eq!(b.transaction(part(199), Tid(200)).unwrap().map(|t| t.meta), Some(meta));
        // Previously committed data is intact.
        assert_eq!(latest(&mut b, 1).data, b"one");
        assert_eq!((latest(&mut b, 2).data, latest(&mut b, 2).serial), (b"two".to_vec(), Tid(100)));

        // A vote right after a KILL: no retry, but no panic either.
        let data = b"five".to_vec();
        let objs = vec![(
            part(5),
            NewObject {
                oid: Oid(5),
                data: Some(NewData { checksum: sha1(&data), compression: 0, data: data.clone() }),
                data_serial: None,
            },
        )];
        let meta = TxnMeta { user: b"v".to_vec(), oids: vec![Oid(5)], ..Default::default() };
        kill(&db, &mut b);
        let before = b.reconnects();
        match b.vote_data(Tid(299), &objs, Some((part(299), &meta))) {
            Ok(()) => {
                b.lock(Tid(299), Tid(300), &[]).unwrap();
                b.unlock(Tid(299), Tid(300)).unwrap();
                assert_eq!(latest(&mut b, 5).data, data);
            }
            Err(e) => {
                assert!(matches!(e, BackendError::Db(_)), "{e:?}");
                b.abort(Tid(299)).unwrap();
                assert_eq!(load(&mut b, 5, None, None), Load::DoesNotExist);
                // The node votes again: it works.
                b.vote_data(Tid(299), &objs, Some((part(299), &meta))).unwrap();
            }
        }
        assert_eq!(b.reconnects(), before + 1);
        // abort, drop_unfinished, set_config and save_pt, each right after a KILL.
        kill(&db, &mut b);
        b.abort(Tid(999)).unwrap();
        kill(&db, &mut b);
        b.drop_unfinished().unwrap();
        kill(&db, &mut b);
        b.set_config("test", Some("value")).unwrap();
        kill(&db, &mut b);
        let pt = PartitionTable::make(NP, 0, &[s(1)]).unwrap();
        b.save_pt(&pt).unwrap();
        kill(&db, &mut b);
        assert_eq!(b.load_pt().unwrap().map(|p| sorted_pt(&p)), Some(sorted_pt(&pt)));
        assert_eq!(b.get_config("test").unwrap().as_deref(), Some("value"));
        assert_eq!(latest(&mut b, 1).data, b"one");
    }

    /// Reads after a KILL return the right values.
    #[test]
    fn reads_after_a_killed_connection() {
        let Some(db) = TestDb::new() else { return };
        let mut b = MysqlBackend::open(&db.url, CLUSTER).unwrap();
        commit(&mut b, 100, &[(1, Some(b"a")), (7, Some(b"seven"))]);
        commit(&mut b, 200, &[(1, Some(b"b"))]);
        kill(&db, &mut b);
        assert_eq!(b.last_ids().unwrap(), (Some(Tid(200)), Some(Oid(7))));
        kill(&db, &mut b);
        let r = found(load(&mut b, 1, Some(100), None));
        assert_eq!((r.serial, r.next_serial, r.data), (Tid(100), Some(Tid(200)), b"a".to_vec()));
        kill(&db, &mut b);
        let r = found(load(&mut b, 1, None, Some(200)));
        assert_eq!((r.serial, r.data), (Tid(100), b"a".to_vec()));
        kill(&db, &mut b);
        let r = latest(&mut b, 1);
        assert_eq!((r.serial, r.next_serial, r.data), (Tid(200), None, b"b".to_vec()));
        kill(&db, &mut b);
        assert_eq!(load(&mut b, 8, None, None), Load::DoesNotExist);
        kill(&db, &mut b);
        assert_eq!(b.last_serial(part(7), Oid(7)).unwrap(), Some(Tid(100)));
        kill(&db, &mut b);
        assert_eq!(b.final_tid(Tid(199)).unwrap(), Some(Tid(200)));
        kill(&db, &mut b);
        assert_eq!(b.transaction(part(199), Tid(200)).unwrap().map(|t| t.ttid), Some(Tid(199)));
        // Kept across reconnections: holds on data rows (the row of a release is pruned).
        let o = store(&mut b, 9, b"held");
        kill(&db, &mut b);
        b.abort(Tid(300)).unwrap();
        assert!(data_row_is(&mut b, b"held", o.data_id.unwrap()), "a held row survives abort");
        b.release(&[o.data_id.unwrap(), o.data_id.unwrap()]);
        kill(&db, &mut b);
        b.abort(Tid(300)).unwrap();
        let hash = hex(&sha1(b"held"));
        assert_eq!(
            db.query_int(&format!("SELECT COUNT(*) FROM data WHERE hash = x'{hash}'")),
            0,
            "released, then pruned"
        );
        assert_eq!(b.last_ids().unwrap(), (Some(Tid(200)), Some(Oid(7))));
        assert_eq!(b.reconnects(), 10, "one reconnection per KILL");
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// A reconnection that cannot succeed returns an error at once (no 30 s wait for a
    /// permanent failure), and the backend recovers when the cause goes away.
    #[test]
    fn failed_reconnection_is_an_error() {
        let Some(db) = TestDb::new() else { return };
        let mut b = MysqlBackend::open(&db.url, CLUSTER).unwrap();
        b.set_reconnect_timeout(Duration::from_secs(5));
        commit(&mut b, 100, &[(1, Some(b"a"))]);
        // The database now belongs to another cluster: reconnecting must refuse it.
        db.raw("UPDATE config SET value = 'other' WHERE name = 'name'");
        kill(&db, &mut b);
        let start = std::time::Instant::now();
        let e = b.last_ids().unwrap_err();
        assert!(matches!(e, BackendError::WrongCluster { .. } | BackendError::Db(_)), "{e:?}");
        assert!(format!("{e}").contains("other"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(4), "a permanent failure is not retried");
        // Every call tries again, and fails the same way.
        assert!(b.lock(Tid(1), Tid(2), &[]).is_err());
        db.raw(&format!("UPDATE config SET value = '{CLUSTER}' WHERE name = 'name'"));
        assert_eq!(b.last_ids().unwrap(), (Some(Tid(100)), Some(Oid(1))));
        // An unreachable server is waited for, for a bounded time.
        kill(&db, &mut b);
        b.set_port(1);
        b.set_reconnect_timeout(Duration::from_secs(1));
        let start = std::time::Instant::now();
        let e = b.last_ids().unwrap_err();
        assert!(format!("{e}").contains("reconnecting failed"), "{e}");
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(500) && waited < Duration::from_secs(10), "{waited:?}");
        let port = Opts::from_url(&db.url).unwrap().tcp_port();
        b.set_port(port);
        assert_eq!(b.last_ids().unwrap(), (Some(Tid(100)), Some(Oid(1))));
        // A missing database is permanent too.
        kill(&db, &mut b);
        server_sql(&db.server, None, &format!("DROP DATABASE `{}`", db.name)).unwrap();
        let start = std::time::Instant::now();
        assert!(b.get_config("name").is_err());
        assert!(start.elapsed() < Duration::from_secs(4));
    }
}
