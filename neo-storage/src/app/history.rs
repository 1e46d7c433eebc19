//! Client requests beyond commit and load: object history, transaction listings (undo log and
//! iterator), transaction metadata, undo information; and the master's pack order. Each
//! checks that the partitions it touches are readable here, waits while a transaction it could
//! see is between lock and unlock (its committer may already ask about it), then runs one
//! database job.

use super::{Storage, internal, wait_while};
use crate::backend::BackendError;
use neo_lib::{ErrorCode, Oid, Tid};
use proto::{Body, msg};
use tracing::info;

/// Most entries a listing returns at once (the client pages).
const MAX_LENGTH: u32 = 100_000;

/// Run a database job and turn both kinds of failure into an error answer.
async fn job<T: Send + 'static>(
    st: &Storage,
    f: impl FnOnce(&mut dyn crate::backend::Backend) -> Result<T, BackendError> + Send + 'static,
) -> Result<T, Body> {
    st.db.call(f).await.map_err(internal)?.map_err(internal)
}

fn too_long(length: u32) -> Result<(), Body> {
    if length > MAX_LENGTH {
        return Err(proto::error(ErrorCode::ProtocolError, format!("length {length} above {MAX_LENGTH}")));
    }
    Ok(())
}

/// The partition of `id` if this node has a readable cell of it, else the error answer.
pub(super) fn readable_partition_of(st: &Storage, id: u64) -> Result<u32, Body> {
    match st.cell_of(id) {
        Some((p, state)) if state.is_readable() => Ok(p),
        Some((p, state)) => Err(proto::error(ErrorCode::NonReadableCell, format!("cell {p} is {state}"))),
        None => Err(proto::error(ErrorCode::NonReadableCell, "partition not assigned to this storage")),
    }
}

fn answer(r: Result<Body, Body>) -> Body {
    r.unwrap_or_else(|b| b)
}

pub(super) async fn history(st: &Storage, m: msg::AskObjectHistory) -> Body {
    answer(
        async {
            too_long(m.length)?;
            let oid = Oid(m.oid);
            let partition = readable_partition_of(st, oid.0)?;
            wait_while(st, |st| st.tm.is_read_locked(oid)).await?;
            let (offset, length) = (m.offset, m.length);
            let h = job(st, move |b| b.object_history(partition, oid, offset, length)).await?;
            if h.is_empty() && offset == 0 {
                return Err(proto::error(ErrorCode::OidDoesNotExist, format!("oid {oid} does not exist")));
            }
            let history = h.into_iter().map(|(t, size)| msg::HistoryEntry { serial: t.0, size }).collect();
            Ok(msg::AnswerObjectHistory { oid: oid.0, history }.into())
        }
        .await,
    )
}

pub(super) async fn tids(st: &Storage, m: msg::AskTids) -> Body {
    answer(
        async {
            too_long(m.length)?;
            st.check_readable(&m.partitions)?;
            let (offset, length, partitions) = (m.offset, m.length, m.partitions);
            wait_while(st, |st| st.tm.is_committing_upto(Tid::MAX)).await?;
            let tids = job(st, move |b| b.tids(&partitions, offset, length)).await?;
            Ok(msg::AnswerTids { tids: tids.into_iter().map(|t| t.0).collect() }.into())
        }
        .await,
    )
}

pub(super) async fn tids_from(st: &Storage, m: msg::AskTidsFrom) -> Body {
    answer(
        async {
            too_long(m.length)?;
            st.check_readable(&m.partitions)?;
            let (min, max, length, partitions) = (Tid(m.min), Tid(m.max), m.length, m.partitions);
            wait_while(st, |st| st.tm.is_committing_upto(max)).await?;
            let tids = job(st, move |b| b.tids_from(&partitions, min, max, length)).await?;
            Ok(msg::AnswerTidsFrom { tids: tids.into_iter().map(|t| t.0).collect() }.into())
        }
        .await,
    )
}

pub(super) async fn transaction_information(st: &Storage, m: msg::AskTransactionInformation) -> Body {
    answer(
        async {
            let tid = Tid(m.tid);
            let partition = readable_partition_of(st, tid.0)?;
            wait_while(st, |st| st.tm.is_committing_upto(tid)).await?;
            match job(st, move |b| b.transaction(partition, tid)).await? {
                Some(t) => Ok(msg::AnswerTransactionInformation {
                    tid: t.tid.0,
                    user: t.meta.user,
                    description: t.meta.description,
                    extension: t.meta.extension,
                    packed: t.packed,
                    oids: t.meta.oids.into_iter().map(|o| o.0).collect(),
                }
                .into()),
                None => Err(proto::error(ErrorCode::TidNotFound, format!("no transaction {tid:?}"))),
            }
        }
        .await,
    )
}

pub(super) async fn undo_serial(st: &Storage, m: msg::AskObjectUndoSerial) -> Body {
    answer(
        async {
            if m.oids.len() > MAX_LENGTH as usize {
                return Err(proto::error(ErrorCode::ProtocolError, "too many oids"));
            }
            let mut oids = Vec::with_capacity(m.oids.len());
            for o in m.oids {
                oids.push((readable_partition_of(st, o)?, Oid(o)));
            }
            wait_while(st, |st| oids.iter().any(|(_, o)| st.tm.is_read_locked(*o))).await?;
            let (undone, before) = (Tid(m.undone_tid), m.before.map(Tid));
            let objects = job(st, move |b| {
                let mut out = Vec::new();
                for (partition, oid) in oids {
                    if let Some(u) = b.undo_info(partition, oid, undone, before)? {
                        out.push(msg::UndoSerial {
                            oid: oid.0,
                            current: u.current.0,
                            undo_serial: u.undo_serial.map(|t| t.0),
                            is_current: u.is_current,
                        });
                    }
                }
                Ok(out)
            })
            .await?;
            Ok(msg::AnswerObjectUndoSerial { objects }.into())
        }
        .await,
    )
}

/// Pack every readable partition of this node at `tid`, one partition per database job, so
/// that the commits and reads queued meanwhile run between them instead of waiting for the
/// whole pack (each partition's pack is one database transaction, and packing again at the
/// same tid changes nothing).
pub(super) async fn pack(st: &Storage, tid: Tid) -> Body {
    let partitions = st.readable_partitions();
    info!("packing {} partition(s) at {tid:?}", partitions.len());
    answer(
        async {
            for p in partitions {
                job(st, move |b| b.pack(&[p], tid)).await?;
            }
            Ok(msg::AnswerPack { tid: tid.0 }.into())
        }
        .await,
    )
}
