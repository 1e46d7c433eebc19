//! Replication, both ends.
//!
//! Destination: while the node is operational, a task (`run`) takes this node's OUT_OF_DATE
//! cells one at a time and copies, from a readable cell of another storage, what the cell
//! misses: transactions (metadata), then object revisions, in bounded chunks, each chunk
//! stored with the progress it makes (`ReplProgress`) in one database transaction, so that an
//! interrupted replication resumes where it stopped. A round copies up to the source's last
//! TID of the partition at its start; the commits after it reach the cell directly (it is
//! writable). At the end of a round the progress is synced and the master is asked to make
//! the cell UP_TO_DATE; it refuses if a commit that did not write the cell is above the
//! round's TID (another round follows) or if the source was not readable for the whole round
//! (the round starts again from where it began).
//!
//! Source: `serve` answers a replicating storage from readable cells only.
//!
//! Progress bookkeeping when the partition table changes (`cells_changed`): a cell that was
//! readable here and becomes OUT_OF_DATE has everything up to its last TID (commits reach a
//! cell in TID order, and a commit that missed it outdated it before its TID was chosen); a
//! new cell (or one reset by the master: discarded and added again in one change) starts from
//! nothing, after its old rows are purged; a readable cell forgets its progress; a dropped
//! cell is purged.

use super::{Storage, internal};
use crate::backend::{Backend, BackendError, NewData, ReplObject, ReplProgress, TxnInfo, TxnMeta};
use neo_lib::pt::{CellChange, PartitionTable};
use neo_lib::{CellState, ErrorCode, Nid, NodeState, NodeType, Oid, Ptid, Tid};
use proto::net::{connect_identified, identification};
use proto::{Body, Link, expect_answer, msg};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Transactions asked at a time.
const TRANS_CHUNK: u32 = 1_000;
/// Object revisions asked at a time, and about how many bytes of data.
const OBJ_CHUNK: u32 = 1_000;
/// Small: a chunk's write holds the database thread that commits need (2 MiB on MySQL was
/// faster, 15 MB/s against 9, but took the storage to 270 MiB of memory).
const OBJ_BYTES: usize = 256 << 10;
/// Most a source sends at once, whatever it is asked.
const MAX_CHUNK: u32 = 10_000;
const MAX_BYTES: usize = 16 << 20;
/// How often the progress of a cell is reported (`neoctl print pt`).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Pause between rounds that did not finish a cell.
const RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error("source {0}: {1}")]
    Source(Nid, String),
    #[error("master: {0}")]
    Master(String),
    #[error("database: {0}")]
    Db(String),
}

fn db_err(e: impl std::fmt::Display) -> ReplError {
    ReplError::Db(e.to_string())
}

/// What a partition table change means for this node's cells, to be applied before the new
/// table is saved.
#[derive(Default, Debug)]
pub(super) struct CellsChanged {
    /// Cells that were readable and are OUT_OF_DATE now: complete up to their last TID.
    outdated: Vec<u32>,
    /// New cells (or reset ones): purged, then replicated from nothing.
    fresh: Vec<u32>,
    /// Cells readable now: no progress to keep.
    readable: Vec<u32>,
    /// Cells this node no longer has.
    dropped: Vec<u32>,
}

impl CellsChanged {
    pub(super) fn is_empty(&self) -> bool {
        self.outdated.is_empty() && self.fresh.is_empty() && self.readable.is_empty() && self.dropped.is_empty()
    }
}

/// Compare this node's cells in `old` and `new`; `changes` (an incremental change) may reset
/// a cell by discarding it and adding it again; a full table names the cells that were reset
/// (`reset`, for a node that missed that change). A reset cell this node was already
/// replicating from nothing keeps its progress.
pub(super) fn cells_changed(
    me: Nid,
    old: Option<&PartitionTable>,
    new: &PartitionTable,
    changes: Option<&[CellChange]>,
    reset_cells: &[(u32, Nid)],
) -> CellsChanged {
    let mut reset: BTreeSet<u32> = reset_cells
        .iter()
        .filter(|(p, n)| *n == me && old.and_then(|pt| pt.cell(*p, me)) != Some(CellState::OutOfDate))
        .map(|(p, _)| *p)
        .collect();
    if let Some(changes) = changes {
        let mut discarded = BTreeSet::new();
        for ch in changes.iter().filter(|c| c.nid == me) {
            if ch.state == CellState::Discarded {
                discarded.insert(ch.partition);
            } else if discarded.contains(&ch.partition) {
                reset.insert(ch.partition);
            }
        }
    }
    let mut out = CellsChanged::default();
    for p in 0..new.np() {
        let before = old.and_then(|pt| pt.cell(p, me));
        let after = new.cell(p, me);
        match (before, after) {
            (_, Some(CellState::OutOfDate)) if reset.contains(&p) => out.fresh.push(p),
            (Some(b), Some(CellState::OutOfDate)) if b.is_readable() => out.outdated.push(p),
            (Some(CellState::OutOfDate), Some(CellState::OutOfDate)) => {}
            (_, Some(CellState::OutOfDate)) => out.fresh.push(p),
            (b, Some(a)) if a.is_readable() && !b.is_some_and(CellState::is_readable) => out.readable.push(p),
            (Some(_), None) => out.dropped.push(p),
            _ => {}
        }
    }
    // Dropped from the cluster: every partition is purged, also rows of partitions it no
    // longer had (a transaction that voted before such a cell went, unlocked after).
    if new.partitions_of(me).is_empty() && old.is_some_and(|pt| !pt.partitions_of(me).is_empty()) {
        out.dropped = (0..new.np()).collect();
    }
    out
}

/// Apply `cells_changed`'s outcome to the database (on the database thread, in order with
/// the master's other requests: a cell's last TID is taken after every unlock received
/// before the change).
pub(super) async fn apply_cells_changed(st: &Storage, c: CellsChanged) -> Result<(), crate::StorageError> {
    if c.is_empty() {
        return Ok(());
    }
    info!("cells changed: {c:?}");
    st.db
        .call(move |b| -> Result<(), BackendError> {
            for p in c.outdated {
                let last = b.partition_last_tid(p)?;
                let progress = last.map(ReplProgress::after).unwrap_or(ReplProgress::ZERO);
                b.set_replication_progress(p, Some(&progress))?;
            }
            for p in c.fresh {
                b.purge_partition(p)?;
                b.set_replication_progress(p, Some(&ReplProgress::ZERO))?;
            }
            for p in c.readable {
                if b.replication_progress(p)?.is_some() {
                    b.set_replication_progress(p, None)?;
                }
            }
            for p in c.dropped {
                b.purge_partition(p)?;
                b.set_replication_progress(p, None)?;
            }
            Ok(())
        })
        .await??;
    Ok(())
}

/// The destination's task: replicate every OUT_OF_DATE cell of this node until `token` is
/// cancelled (the master session ended or operation stopped).
pub(super) async fn run(st: Arc<Storage>, master: Link, token: CancellationToken) {
    let mut sources: HashMap<Nid, Link> = HashMap::new();
    loop {
        let kick = st.repl_kick.notified();
        tokio::pin!(kick);
        kick.as_mut().enable();
        let todo = out_of_date_partitions(&st);
        let mut pending = false;
        for p in todo {
            if token.is_cancelled() {
                return;
            }
            let round = tokio::select! {
                _ = token.cancelled() => return,
                r = replicate(&st, &master, &mut sources, p) => r,
            };
            match round {
                Ok(true) => {}
                Ok(false) => pending = true,
                Err(e) => {
                    pending = true;
                    warn!("replication of partition {p}: {e}");
                    if let ReplError::Source(nid, _) = e
                        && let Some(l) = sources.remove(&nid)
                    {
                        l.abort();
                    }
                }
            }
        }
        let wait = if pending { RETRY } else { Duration::from_secs(5) };
        tokio::select! {
            _ = token.cancelled() => break,
            _ = &mut kick => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
    for l in sources.values() {
        l.close().await;
    }
}

fn out_of_date_partitions(st: &Storage) -> Vec<u32> {
    st.with(|s| match (&s.pt, s.nid) {
        (Some(pt), Some(me)) => (0..pt.np()).filter(|p| pt.cell(*p, me) == Some(CellState::OutOfDate)).collect(),
        _ => Vec::new(),
    })
}

/// A readable cell of `p` on another running storage whose address is known (random among
/// them), with the ptid of the table it was chosen from.
fn pick_source(st: &Storage, p: u32) -> Option<(Nid, neo_lib::config::Address, Ptid)> {
    st.with(|s| {
        let pt = s.pt.as_ref()?;
        let me = s.nid?;
        let mut candidates: Vec<(Nid, neo_lib::config::Address)> = pt
            .readable_cells(p)
            .filter(|c| c.nid != me)
            .filter_map(|c| {
                let n = s.nodes.get(&c.nid)?;
                (n.state == NodeState::Running).then_some(())?;
                Some((c.nid, n.address.clone()?))
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let (nid, addr) = candidates.swap_remove(fastrand::usize(..candidates.len()));
        Some((nid, addr, pt.ptid))
    })
}

async fn source_link(
    st: &Storage,
    sources: &mut HashMap<Nid, Link>,
    nid: Nid,
    addr: &neo_lib::config::Address,
) -> Result<Link, ReplError> {
    if let Some(l) = sources.get(&nid).filter(|l| !l.is_closed()) {
        return Ok(l.clone());
    }
    let me = st.with(|s| s.nid);
    let req = identification(&st.cfg.cluster, NodeType::Storage, me, Some(&st.address));
    let (link, mut incoming, _) =
        connect_identified(addr, &st.net, req).await.map_err(|e| ReplError::Source(nid, e.to_string()))?;
    // Nothing is expected from a source but answers: drain (and answer pings).
    let l2 = link.clone();
    tokio::spawn(async move {
        while let Some(r) = incoming.recv().await {
            if let Body::Ping(_) = r.body {
                let _ = l2.answer(r.id, msg::Pong {}).await;
            }
        }
        l2.abort();
    });
    sources.insert(nid, link.clone());
    Ok(link)
}

/// One round for partition `p`. Ok(true): the cell is UP_TO_DATE (or about to be: the
/// master's change follows); Ok(false): not yet (no source, or the master wants more).
async fn replicate(
    st: &Arc<Storage>,
    master: &Link,
    sources: &mut HashMap<Nid, Link>,
    p: u32,
) -> Result<bool, ReplError> {
    let Some((source, addr, ptid)) = pick_source(st, p) else {
        debug!("partition {p}: no source to replicate from");
        return Ok(false);
    };
    let link = source_link(st, sources, source, &addr).await?;
    let src = |e: proto::LinkError| ReplError::Source(source, e.to_string());
    let np = st.np();
    let mut progress = st.db.call(move |b| b.replication_progress(p)).await.map_err(db_err)?.map_err(db_err)?;
    let mut progress = progress.take().unwrap_or(ReplProgress::ZERO);
    let a = link
        .ask(msg::AskPartitionLastTid { partition: p })
        .await
        .and_then(|b| expect_answer!(b, AnswerPartitionLastTid));
    let target = Tid(a.map_err(src)?.tid.unwrap_or(0));
    if target > Tid::MAX {
        return Err(ReplError::Source(source, format!("invalid last tid {target:?}")));
    }
    progress.base_trans = progress.next_trans;
    progress.base_obj = progress.next_obj;
    save_progress(st, p, progress).await?;
    let started = std::time::Instant::now();
    // The first chunk is reported at once.
    let mut reported = started.checked_sub(PROGRESS_EVERY).unwrap_or(started);
    let report = |progress: &ReplProgress, reported: &mut std::time::Instant| {
        if reported.elapsed() < PROGRESS_EVERY {
            return;
        }
        *reported = std::time::Instant::now();
        let percent = percent_done(progress, target);
        let m = msg::NotifyReplicationProgress { progress: Some(msg::CellProgress { partition: p, nid: 0, percent }) };
        let _ = master.try_notify(m);
    };
    let (mut txn_count, mut obj_count, mut bytes) = (0usize, 0usize, 0usize);
    // Transactions.
    while progress.next_trans <= target {
        let m = msg::AskFetchTransactions {
            partition: p,
            min_tid: progress.next_trans.0,
            max_tid: target.0,
            length: TRANS_CHUNK,
        };
        let a = link.ask(m).await.and_then(|b| expect_answer!(b, AnswerFetchTransactions)).map_err(src)?;
        let full = a.transactions.len() >= TRANS_CHUNK as usize;
        let txns = check_transactions(a.transactions, p, np, progress.next_trans, target)
            .map_err(|e| ReplError::Source(source, e))?;
        let before = progress;
        progress.next_trans = match (full, txns.last()) {
            (true, Some(last)) => last.tid.next(),
            _ => target.next(),
        };
        txn_count += txns.len();
        store(st, p, txns, Vec::new(), before, progress).await?;
        report(&progress, &mut reported);
    }
    // Object revisions.
    let mut last_durable = st.db.stats().durable.load(std::sync::atomic::Ordering::Relaxed);
    while progress.next_obj.0 <= target {
        let (min_tid, min_oid) = progress.next_obj;
        let chunk_started = std::time::Instant::now();
        let m = msg::AskFetchObjects {
            partition: p,
            min_tid: min_tid.0,
            min_oid: min_oid.0,
            max_tid: target.0,
            length: OBJ_CHUNK,
            max_bytes: OBJ_BYTES as u64,
        };
        let a = link.ask(m).await.and_then(|b| expect_answer!(b, AnswerFetchObjects)).map_err(src)?;
        let objects =
            check_objects(a.objects, p, np, progress.next_obj, target).map_err(|e| ReplError::Source(source, e))?;
        let before = progress;
        progress.next_obj = match objects.last() {
            Some(last) => (last.tid, Oid(last.oid.0 + 1)),
            None => (target.next(), Oid::ZERO),
        };
        obj_count += objects.len();
        bytes += objects.iter().map(|o| o.data.as_ref().map_or(0, |d| d.data.len())).sum::<usize>();
        store(st, p, Vec::new(), objects, before, progress).await?;
        report(&progress, &mut reported);
        // Commits ran meanwhile (locks were synced): leave them as much time as the chunk took,
        // so that the copy takes at most half of the database thread while the cluster is
        // busy, and runs at full speed when it is idle (bench/BENCHMARKS.md, "Replication").
        let durable = st.db.stats().durable.load(std::sync::atomic::Ordering::Relaxed);
        if durable != last_durable {
            last_durable = durable;
            tokio::time::sleep(chunk_started.elapsed()).await;
        }
    }
    // Durable before the master is told: it will never ask for it again.
    st.db.call_durable(|b| b.sync()).await.map_err(db_err)?.map_err(db_err)?;
    if txn_count + obj_count > 0 {
        info!(
            "partition {p}: copied {txn_count} transactions and {obj_count} object revisions ({bytes} bytes) from {source} up to {target:?} in {:.3}s",
            started.elapsed().as_secs_f64()
        );
    }
    let m = msg::AskReplicationDone { partition: p, tid: target.0, source: source.0, ptid: ptid.0 };
    let a = master
        .ask(m)
        .await
        .and_then(|b| expect_answer!(b, AnswerReplicationDone))
        .map_err(|e| ReplError::Master(e.to_string()))?;
    if a.done {
        return Ok(true);
    }
    if a.rewind {
        info!("partition {p}: round from {source} refused ({}): starting it again", a.reason);
        progress.next_trans = progress.base_trans;
        progress.next_obj = progress.base_obj;
        save_progress(st, p, progress).await?;
    } else {
        debug!("partition {p}: not done: {}", a.reason);
    }
    Ok(false)
}

/// How far a round is, in percent of the TIDs it copies: transactions count for a fifth, object
/// revisions for the rest; 99 at most (100 is UP_TO_DATE).
fn percent_done(r: &ReplProgress, target: Tid) -> u32 {
    let fraction = |from: Tid, at: Tid| {
        if target <= from {
            return 1.0;
        }
        (at.0.saturating_sub(from.0) as f64 / (target.0 - from.0) as f64).clamp(0.0, 1.0)
    };
    let done = 0.2 * fraction(r.base_trans, r.next_trans) + 0.8 * fraction(r.base_obj.0, r.next_obj.0);
    ((done * 100.0) as u32).min(99)
}

async fn save_progress(st: &Storage, p: u32, progress: ReplProgress) -> Result<(), ReplError> {
    st.db.call(move |b| b.set_replication_progress(p, Some(&progress))).await.map_err(db_err)?.map_err(db_err)
}

async fn store(
    st: &Arc<Storage>,
    p: u32,
    txns: Vec<TxnInfo>,
    objects: Vec<ReplObject>,
    before: ReplProgress,
    progress: ReplProgress,
) -> Result<(), ReplError> {
    // Not synced (the round's end is): syncing each chunk let commits go faster meanwhile
    // (22 % of their rate against 14 %) but the copy slower (38 MB/s against 45-60 on SQLite,
    // see bench/BENCHMARKS.md). The cell is checked on the database thread, in order with the
    // purge of a dropped cell (the table changes before its purge is queued): a chunk of a cell
    // that is gone is not written after its purge.
    let st2 = st.clone();
    st.db
        .call(move |b| {
            let me = st2.with(|s| s.nid);
            if st2.with(|s| s.pt.as_ref().zip(me).and_then(|(pt, me)| pt.cell(p, me))) != Some(CellState::OutOfDate) {
                return Err(BackendError::Db(format!("partition {p} is no longer out of date here")));
            }
            // The cell may have been dropped and added again (purged, progress reset) since
            // the round's last chunk: then this round's cursor is not the cell's any more.
            if b.replication_progress(p)? != Some(before) {
                return Err(BackendError::Db(format!("partition {p} was reset during the round")));
            }
            b.store_replicated(p, &txns, &objects, &progress)
        })
        .await
        .map_err(db_err)?
        .map_err(db_err)
}

/// Check what a source sent: in range, in order, in the partition.
fn check_transactions(
    list: Vec<msg::ReplicatedTransaction>,
    p: u32,
    np: u32,
    min: Tid,
    max: Tid,
) -> Result<Vec<TxnInfo>, String> {
    let mut prev: Option<Tid> = None;
    let mut out = Vec::with_capacity(list.len());
    for t in list {
        let tid = Tid(t.tid);
        if tid < min || tid > max || prev.is_some_and(|x| x >= tid) {
            return Err(format!("transaction {tid:?} out of order or out of [{min:?}, {max:?}]"));
        }
        if tid.partition(np) != p || Tid(t.ttid) > Tid::MAX || t.oids.iter().any(|o| *o > Tid::MAX.0) {
            return Err(format!("transaction {tid:?} does not belong to partition {p} or has invalid ids"));
        }
        prev = Some(tid);
        out.push(TxnInfo {
            tid,
            ttid: Tid(t.ttid),
            packed: t.packed,
            meta: TxnMeta {
                user: t.user,
                description: t.description,
                extension: t.extension,
                oids: t.oids.into_iter().map(Oid).collect(),
            },
        });
    }
    Ok(out)
}

/// Check what a source sent: in range and order, in the partition, and every record's
/// checksum against its bytes.
fn check_objects(
    list: Vec<msg::ReplicatedObject>,
    p: u32,
    np: u32,
    min: (Tid, Oid),
    max: Tid,
) -> Result<Vec<ReplObject>, String> {
    let mut prev: Option<(Tid, Oid)> = None;
    let mut out = Vec::with_capacity(list.len());
    for o in list {
        let key = (Tid(o.tid), Oid(o.oid));
        if key < min || key.0 > max || prev.is_some_and(|x| x >= key) {
            return Err(format!("object {:?} at {:?} out of order or out of range", key.1, key.0));
        }
        if o.oid > Tid::MAX.0 || (o.oid % u64::from(np.max(1))) as u32 != p {
            return Err(format!("object {:?} does not belong to partition {p}", key.1));
        }
        if o.data_serial.is_some_and(|t| t > Tid::MAX.0) {
            return Err(format!("object {:?} at {:?}: invalid data serial", key.1, key.0));
        }
        let data = if o.deleted {
            None
        } else {
            if o.compression > 1 {
                return Err(format!("object {:?} at {:?}: invalid compression {}", key.1, key.0, o.compression));
            }
            if o.checksum.len() != 20 || super::sha1(&o.data)[..] != o.checksum[..] {
                return Err(format!("object {:?} at {:?}: checksum mismatch", key.1, key.0));
            }
            Some(NewData { checksum: o.checksum, compression: o.compression, data: o.data })
        };
        prev = Some(key);
        out.push(ReplObject { oid: key.1, tid: key.0, data, data_serial: o.data_serial.map(Tid) });
    }
    Ok(out)
}

/// A source's database job for one request of a replicating storage.
type SourceJob = Box<dyn FnOnce(&mut dyn Backend) -> Result<Body, BackendError> + Send>;

/// Source side: a request of a replicating storage, answered from readable cells only. Read
/// with `reader` (a read-only connection of this replication link's own, SQLite), so that the
/// copy does not hold the database thread that commits need; else on the database thread.
pub(super) async fn serve(st: &Arc<Storage>, reader: &mut Option<Box<dyn Backend>>, body: Body) -> Body {
    let job = match source_job(st, body) {
        Ok(job) => job,
        Err(answer) => return answer,
    };
    let answer = match reader.take() {
        Some(mut r) => match tokio::task::spawn_blocking(move || {
            let a = job(r.as_mut());
            (r, a)
        })
        .await
        {
            Ok((r, a)) => {
                *reader = Some(r);
                a
            }
            Err(e) => return internal(e),
        },
        None => match st.db.call(job).await {
            Ok(a) => a,
            Err(e) => return internal(e),
        },
    };
    answer.unwrap_or_else(internal)
}

fn source_job(st: &Storage, body: Body) -> Result<SourceJob, Body> {
    Ok(match body {
        Body::AskPartitionLastTid(m) => {
            let p = m.partition;
            readable(st, p)?;
            Box::new(move |b| Ok(msg::AnswerPartitionLastTid { tid: b.partition_last_tid(p)?.map(|t| t.0) }.into()))
        }
        Body::AskFetchTransactions(m) => {
            let p = m.partition;
            readable(st, p)?;
            let (min, max, length) = (Tid(m.min_tid), Tid(m.max_tid), m.length.clamp(1, MAX_CHUNK));
            Box::new(move |b| {
                let list = b.fetch_transactions(p, min, max, length)?;
                let transactions = list
                    .into_iter()
                    .map(|t| msg::ReplicatedTransaction {
                        tid: t.tid.0,
                        ttid: t.ttid.0,
                        packed: t.packed,
                        user: t.meta.user,
                        description: t.meta.description,
                        extension: t.meta.extension,
                        oids: t.meta.oids.into_iter().map(|o| o.0).collect(),
                    })
                    .collect();
                Ok(msg::AnswerFetchTransactions { transactions }.into())
            })
        }
        Body::AskFetchObjects(m) => {
            let p = m.partition;
            readable(st, p)?;
            let min = (Tid(m.min_tid), Oid(m.min_oid));
            let (max, length) = (Tid(m.max_tid), m.length.clamp(1, MAX_CHUNK));
            let max_bytes = usize::try_from(m.max_bytes).unwrap_or(MAX_BYTES).clamp(1, MAX_BYTES);
            Box::new(move |b| {
                let list = b.fetch_objects(p, min, max, length, max_bytes)?;
                let objects = list
                    .into_iter()
                    .map(|o| {
                        let deleted = o.data.is_none();
                        let d = o.data.unwrap_or(NewData { checksum: Vec::new(), compression: 0, data: Vec::new() });
                        msg::ReplicatedObject {
                            oid: o.oid.0,
                            tid: o.tid.0,
                            deleted,
                            compression: d.compression,
                            checksum: d.checksum,
                            data: d.data,
                            data_serial: o.data_serial.map(|t| t.0),
                        }
                    })
                    .collect();
                Ok(msg::AnswerFetchObjects { objects }.into())
            })
        }
        other => {
            return Err(proto::error(
                ErrorCode::ProtocolError,
                format!("unexpected message {}", proto::body_name(&other)),
            ));
        }
    })
}

fn readable(st: &Storage, p: u32) -> Result<(), Body> {
    if !st.with(|s| s.ready) {
        return Err(proto::error(ErrorCode::NotReady, "storage is not operational"));
    }
    st.check_readable(&[p])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(oid: u64, tid: u64, data: &[u8]) -> msg::ReplicatedObject {
        msg::ReplicatedObject {
            oid,
            tid,
            deleted: false,
            compression: 0,
            checksum: crate::sha1(data).to_vec(),
            data: data.to_vec(),
            data_serial: None,
        }
    }

    /// What a source sends is checked before anything is stored: order, range, partition,
    /// ids, compression and every checksum. Random damage to a good answer is refused (or, if
    /// harmless, accepted as is), never a panic.
    #[test]
    fn a_bad_answer_from_a_source_is_refused() {
        let (np, p) = (4u32, 1u32);
        let good: Vec<msg::ReplicatedObject> =
            (0..20u64).map(|i| object(1 + 4 * (i % 5), 100 + i / 5, format!("data {i}").as_bytes())).collect();
        let mut sorted = good.clone();
        sorted.sort_by_key(|o| (o.tid, o.oid));
        let min = (Tid(100), Oid(0));
        assert_eq!(check_objects(sorted.clone(), p, np, min, Tid(103)).map(|v| v.len()), Ok(20));
        let refused = |list: Vec<msg::ReplicatedObject>| check_objects(list, p, np, min, Tid(103)).is_err();
        let mut bad = sorted.clone();
        bad[3].data.push(0);
        assert!(refused(bad), "checksum");
        let mut bad = sorted.clone();
        bad.swap(2, 7);
        assert!(refused(bad), "order");
        let mut bad = sorted.clone();
        bad[0].oid = 2;
        assert!(refused(bad), "partition");
        let mut bad = sorted.clone();
        bad[19].tid = 104;
        assert!(refused(bad), "above the target");
        let mut bad = sorted.clone();
        bad[5].compression = 7;
        assert!(refused(bad), "compression");
        let mut bad = sorted.clone();
        bad[5].data_serial = Some(u64::MAX);
        assert!(refused(bad), "data serial");
        let mut bad = sorted.clone();
        bad[0].oid = u64::MAX - 2; // in the partition, beyond the largest oid
        assert!(refused(bad), "oid range");
        let mut rng = fastrand::Rng::with_seed(19);
        for _ in 0..2000 {
            let mut list = sorted.clone();
            let i = rng.usize(..list.len());
            match rng.u8(..6) {
                0 => list[i].tid = rng.u64(..),
                1 => list[i].oid = rng.u64(..),
                2 => list[i].checksum.truncate(rng.usize(..21)),
                3 => list[i].deleted = rng.bool(),
                4 => list[i].data = (0..rng.usize(..64)).map(|_| rng.u8(..)).collect(),
                _ => list.truncate(i),
            }
            if let Ok(v) = check_objects(list, p, np, min, Tid(103)) {
                assert!(v.windows(2).all(|w| (w[0].tid, w[0].oid) < (w[1].tid, w[1].oid)));
                assert!(v.iter().all(|o| o.oid.0 % 4 == 1 && o.tid <= Tid(103)));
            }
        }
        let txn = |tid: u64| msg::ReplicatedTransaction { tid, ttid: tid, oids: vec![1, 5], ..Default::default() };
        let ok = vec![txn(101), txn(105), txn(109)];
        assert_eq!(check_transactions(ok, p, np, Tid(100), Tid(110)).map(|v| v.len()), Ok(3));
        assert!(check_transactions(vec![txn(102)], p, np, Tid(100), Tid(110)).is_err(), "partition");
        assert!(check_transactions(vec![txn(105), txn(101)], p, np, Tid(100), Tid(110)).is_err(), "order");
        assert!(check_transactions(vec![txn(113)], p, np, Tid(100), Tid(110)).is_err(), "range");
        let mut t = txn(101);
        t.oids.push(u64::MAX);
        assert!(check_transactions(vec![t], p, np, Tid(100), Tid(110)).is_err(), "oids");
    }

    #[test]
    fn cells_changed_sets_progress_by_transition() {
        let s = |n| Nid::new(NodeType::Storage, n);
        let old = PartitionTable::make(4, 1, &[s(1), s(2)]).ok();
        let mut new = old.clone().unwrap_or_else(|| PartitionTable::new(4, 1));
        let changes = [
            CellChange { partition: 0, nid: s(1), state: CellState::OutOfDate },
            CellChange { partition: 1, nid: s(1), state: CellState::Discarded },
            CellChange { partition: 1, nid: s(1), state: CellState::OutOfDate },
            CellChange { partition: 2, nid: s(1), state: CellState::Discarded },
            CellChange { partition: 3, nid: s(1), state: CellState::Feeding },
        ];
        new.commit_changes(&changes);
        let c = cells_changed(s(1), old.as_ref(), &new, Some(&changes), &[]);
        assert_eq!((c.outdated, c.fresh, c.readable, c.dropped), (vec![0], vec![1], vec![], vec![2]));
        // A full table (no change list): a cell this node did not have before is fresh.
        let c = cells_changed(
            s(3),
            old.as_ref(),
            &{
                let mut t = new.clone();
                t.commit_changes(&[CellChange { partition: 2, nid: s(3), state: CellState::OutOfDate }]);
                t
            },
            None,
            &[],
        );
        assert_eq!(c.fresh, vec![2]);
        // A full table naming a reset cell that was readable here: fresh, not "outdated"
        // (its last TID is above a transaction it lacks); one already OUT_OF_DATE here: kept.
        let c = cells_changed(s(1), old.as_ref(), &new, None, &[(0, s(1))]);
        assert_eq!((c.outdated, c.fresh), (vec![1], vec![0]));
        let c = cells_changed(s(1), Some(&new), &new, None, &[(0, s(1)), (1, s(1))]);
        assert!(c.is_empty(), "{c:?}");
    }
}
