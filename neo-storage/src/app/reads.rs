//! Read connections (`proto::frame::READ_MAGIC`): a client thread that loads objects one at a
//! time, waiting for each answer (a Python thread in a ZODB load), is served by a thread of
//! its own with blocking IO and, on SQLite, a read-only database connection of its own. A
//! load then wakes one thread here instead of three (network task, database thread, network
//! task again), which is most of its cost on a small VM. A load of an object between lock and
//! unlock waits for the unlock (polling, up to 2 s). Anything unusual (a cell that is not
//! readable, a longer wait, a database error) is answered NOT_READY or NON_READABLE_CELL, and
//! the client takes its async path, which knows how to wait and retry.

use super::{Storage, object_answer};
use crate::backend::Backend;
use neo_lib::{ErrorCode, NodeType, Oid, Tid};
use proto::blocking::BlockingConn;
use proto::{Body, LinkError, msg};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tracing::{debug, warn};

static IDS: AtomicU64 = AtomicU64::new(1);

/// How long a load waits for the unlock of the object it reads, and how often it looks.
const READ_LOCK_WAIT: Duration = Duration::from_secs(2);
const READ_LOCK_POLL: Duration = Duration::from_micros(200);

/// Serve an accepted read connection on a new thread.
pub(super) fn start(st: Arc<Storage>, conn: BlockingConn, socket: std::net::TcpStream) {
    if st.shutdown.is_cancelled() {
        let _ = socket.shutdown(std::net::Shutdown::Both);
        return;
    }
    let id = IDS.fetch_add(1, Ordering::Relaxed);
    neo_lib::lock(&st.reads).insert(id, socket);
    let st2 = st.clone();
    let spawned = std::thread::Builder::new().name("neo-reads".into()).spawn(move || {
        let peer = conn.peer().to_string();
        if let Err(e) = serve(&st2, conn) {
            debug!("read connection from {peer}: {e}");
        }
        neo_lib::lock(&st2.reads).remove(&id);
    });
    if let Err(e) = spawned {
        warn!("cannot start a thread for a read connection: {e}");
        if let Some(s) = neo_lib::lock(&st.reads).remove(&id) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Close every read connection (their threads then exit).
pub(super) fn shut_down_all(st: &Storage) {
    for (_, s) in neo_lib::lock(&st.reads).drain() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}

/// A read connection that stays idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Reads time out after `HANDSHAKE_TIMEOUT` until the identification (as on links), then after
/// `IDLE_TIMEOUT`.
fn serve(st: &Storage, mut conn: BlockingConn) -> Result<(), LinkError> {
    let (id, body) = conn.next_request()?;
    let req = match body {
        Body::RequestIdentification(r) => r,
        other => {
            let what = proto::body_name(&other);
            return conn
                .answer(id, proto::error(ErrorCode::ProtocolError, format!("identification required, not {what}")));
        }
    };
    if let Err(m) = proto::net::check_identification(&req, &st.cfg.cluster) {
        warn!("{}: refused: {m}", conn.peer());
        return conn.answer(id, proto::error(ErrorCode::ProtocolError, m));
    }
    if req.node_type != NodeType::Client as i32 {
        return conn.answer(id, proto::error(ErrorCode::ProtocolError, "only clients open read connections"));
    }
    if !st.with(|s| s.ready) {
        return conn.answer(id, proto::error(ErrorCode::NotReady, "storage is not operational"));
    }
    let accept = msg::AcceptIdentification {
        node_type: NodeType::Storage as i32,
        nid: st.with(|s| s.nid).map(|n| n.0),
        your_nid: req.nid,
        partitions: st.np(),
    };
    conn.answer(id, accept.into())?;
    conn.set_read_timeout(Some(IDLE_TIMEOUT))?;
    // On SQLite, a connection of our own; otherwise (or if it cannot be opened) the database
    // thread.
    let mut reader = match crate::open_reader(&st.cfg) {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            warn!("read connection: cannot open the database ({e}): loading through the database thread");
            None
        }
        None => None,
    };
    loop {
        let (id, body) = conn.next_request()?;
        let answer = match body {
            Body::AskObject(m) => load(st, reader.as_deref_mut(), m),
            other => proto::error(
                ErrorCode::ProtocolError,
                format!("{} on a read connection (only AskObject)", proto::body_name(&other)),
            ),
        };
        conn.answer(id, answer)?;
    }
}

fn load(st: &Storage, reader: Option<&mut (dyn Backend + 'static)>, m: msg::AskObject) -> Body {
    let oid = Oid(m.oid);
    let partition = match super::history::readable_partition_of(st, oid.0) {
        Ok(p) => p,
        Err(e) => return e,
    };
    // Between lock and unlock (usually well under a millisecond): wait for the unlock, a while;
    // after that the client's async path waits.
    let mut waited = Duration::ZERO;
    while st.tm.is_read_locked(oid) {
        if waited >= READ_LOCK_WAIT || st.shutdown.is_cancelled() {
            return proto::error(ErrorCode::NotReady, format!("oid {oid} is being committed"));
        }
        std::thread::sleep(READ_LOCK_POLL);
        waited += READ_LOCK_POLL;
    }
    let (at, before) = (m.at.map(Tid), m.before.map(Tid));
    let loaded = match reader {
        Some(r) => Ok(r.load(partition, oid, at, before)),
        None => st.db.call_blocking(move |b| b.load(partition, oid, at, before)),
    };
    object_answer(oid, loaded)
}
