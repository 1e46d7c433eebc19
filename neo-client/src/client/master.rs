//! The session with the primary master: (re)connection, requests retried across lost
//! connections and NOT_READY, barriers, and the pump that applies its notifications (node
//! list, partition table, cluster state, invalidations) in order.

use super::{Client, Inner, remote};
use crate::{ClientError, Result};
use neo_lib::{ClusterState, ErrorCode, Nid, NodeState, NodeType, Oid, Ptid, Tid, lock};
use proto::net::{connect_identified, identification};
use proto::{Body, Incoming, Link, LinkError, expect_answer, msg};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// What the invalidation callback is told, in commit order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation<'a> {
    /// Another client committed `tid`, changing these objects.
    Objects(Tid, &'a [Oid]),
    /// Commits up to `tid` may have been missed (the client connected to the master again and
    /// the last TID had moved meanwhile: a master restart, the cluster back to RECOVERING, a
    /// lost connection): every object cached before must be considered changed. Python NEO's
    /// client calls ZODB's `DB.invalidateCache()` then.
    All(Tid),
}

pub(super) struct MasterConn {
    pub(super) link: Link,
    /// Messages of this link processed by its pump (for `sync` barriers).
    processed: watch::Receiver<u64>,
}

impl Client {
    pub(super) async fn master(&self) -> Result<Link> {
        if self.0.closed.is_cancelled() {
            return Err(ClientError::Closed);
        }
        if let Some(m) = &lock(&self.0.state).master
            && !m.link.is_closed()
        {
            return Ok(m.link.clone());
        }
        let _guard = self.0.connecting.lock().await;
        if let Some(m) = &lock(&self.0.state).master
            && !m.link.is_closed()
        {
            return Ok(m.link.clone());
        }
        self.connect_master().await
    }

    async fn connect_master(&self) -> Result<Link> {
        let cfg = &self.0.cfg;
        let deadline = Instant::now() + cfg.connect_timeout;
        let mut pause = Duration::from_millis(100);
        let mut last = String::from("no master address");
        loop {
            for addr in &cfg.masters {
                let mut req = identification(&cfg.cluster, NodeType::Client, None, None);
                req.read_only = cfg.read_only;
                match connect_identified(addr, &self.0.net, req).await {
                    Ok((link, incoming, accept)) => match self.start_master(link, incoming, accept).await {
                        Ok(link) => {
                            self.0.master_connects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return Ok(link);
                        }
                        Err(e) => last = e.to_string(),
                    },
                    Err(e) if e.code() == Some(ErrorCode::Denied) => {
                        // The master refuses clients: the cluster is stopping.
                        return Err(self.stopped(&e.to_string()));
                    }
                    Err(e) => {
                        debug!("master {addr}: {e}");
                        if e.code() == Some(ErrorCode::NotReady) {
                            // A master answers: the cluster is starting (again); wait for it.
                            lock(&self.0.state).cluster_state = None;
                        }
                        last = e.to_string();
                    }
                }
            }
            if lock(&self.0.state).cluster_state == Some(ClusterState::Stopping) {
                // Told that the cluster was stopping, and no master answers: it is stopped,
                // not restarting. Say so now rather than after the connect timeout.
                return Err(self.stopped(&last));
            }
            if Instant::now() >= deadline || self.0.closed.is_cancelled() {
                return Err(ClientError::NotConnected { cluster: cfg.cluster.clone(), last });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// The cluster is stopping or stopped: remember it, and the error to report.
    fn stopped(&self, last: &str) -> ClientError {
        lock(&self.0.state).cluster_state = Some(ClusterState::Stopping);
        ClientError::Stopped { cluster: self.0.cfg.cluster.clone(), last: last.to_string() }
    }

    async fn start_master(&self, link: Link, incoming: Incoming, accept: msg::AcceptIdentification) -> Result<Link> {
        let (ptx, prx) = watch::channel(0u64);
        lock(&self.0.state).nid = accept.your_nid.map(Nid);
        tokio::spawn(master_pump(Arc::downgrade(&self.0), link.clone(), incoming, ptx));
        let ltid =
            match link.ask(msg::AskLastTransaction {}).await.and_then(|b| expect_answer!(b, AnswerLastTransaction)) {
                Ok(a) => Tid(a.tid),
                Err(e) => {
                    link.abort();
                    return Err(remote(e));
                }
            };
        // The node list and partition table were sent before that answer: apply them before
        // anyone uses this connection.
        let target = link.delivered();
        let mut processed = prx.clone();
        let _ = processed.wait_for(|n| *n >= target).await;
        let missed = {
            // Lock order everywhere: cache, then state.
            let mut cache = lock(&self.0.cache);
            let mut s = lock(&self.0.state);
            // Invalidations may have been missed while disconnected (not on the first
            // connection: nothing was cached then).
            let missed = s.last_tid != ltid && s.last_tid != Tid::ZERO;
            if missed {
                cache.clear_current();
                // A load in flight may bring back a revision that was current before: it is
                // cached as valid up to the last TID only.
                for e in s.loading.values_mut() {
                    e.1 = Some(e.1.map_or(ltid, |t| t.max(ltid)));
                }
            }
            missed
        };
        if missed {
            // Told before `last_transaction` moves: whoever reads the new last TID finds the
            // application's caches invalidated (ZODB's rule).
            let cb = lock(&self.0.callback).clone();
            if let Some(cb) = cb {
                cb(Invalidation::All(ltid));
            }
        }
        {
            let mut s = lock(&self.0.state);
            s.last_tid = s.last_tid.max(ltid);
            s.master = Some(MasterConn { link: link.clone(), processed: prx });
        }
        info!("connected to the primary master {} (last tid {ltid:?})", link.peer());
        Ok(link)
    }

    /// Ask the master, reconnecting when the connection was lost and retrying NOT_READY, until
    /// the connect timeout.
    pub(super) async fn ask_master(&self, body: Body) -> Result<Body> {
        self.ask_master_on(body).await.map(|(_, b)| b)
    }

    /// `ask_master`, also returning the connection that answered.
    async fn ask_master_on(&self, body: Body) -> Result<(Link, Body)> {
        let deadline = Instant::now() + self.0.cfg.connect_timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let link = self.master().await?;
            match link.ask(body.clone()).await {
                Ok(b) => return Ok((link, b)),
                Err(LinkError::Closed(_)) if Instant::now() < deadline => {}
                Err(LinkError::Remote { code: ErrorCode::NotReady, .. }) if Instant::now() < deadline => {}
                Err(LinkError::Remote { code: ErrorCode::Denied, message }) => {
                    // The master denies a client's request only when the cluster is stopping.
                    return Err(self.stopped(&message));
                }
                Err(e) => return Err(remote(e)),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Wait until the invalidations sent by the master before its last answer on `link` were
    /// processed.
    pub(super) async fn barrier(&self, link: &Link) {
        let target = link.delivered();
        let rx = {
            let s = lock(&self.0.state);
            match &s.master {
                Some(m) if m.link.conn_id() == link.conn_id() => m.processed.clone(),
                _ => return,
            }
        };
        let mut rx = rx;
        let _ = rx.wait_for(|n| *n >= target).await;
    }

    /// Network barrier with the master: afterwards, every commit acknowledged before the call
    /// has been seen (invalidations processed, `last_transaction` up to date).
    /// Like any request to the master, it outlives a lost connection (the master closes the
    /// clients' when the cluster goes back to RECOVERING): it connects again and retries.
    pub async fn sync(&self) -> Result<()> {
        let (link, _) = self.ask_master_on(msg::Ping {}.into()).await?;
        self.barrier(&link).await;
        Ok(())
    }
}

/// Process the master's notifications in order.
async fn master_pump(inner: std::sync::Weak<Inner>, link: Link, mut incoming: Incoming, processed: watch::Sender<u64>) {
    let mut count = 0u64;
    while let Some(req) = incoming.recv().await {
        let Some(inner) = inner.upgrade() else { break };
        let close = handle_master_message(&inner, &link, req).await;
        count += 1;
        processed.send_replace(count);
        if close {
            link.abort();
            break;
        }
    }
    link.abort();
    processed.send_replace(u64::MAX);
    if let Some(inner) = inner.upgrade() {
        let mut s = lock(&inner.state);
        if s.master.as_ref().is_some_and(|m| m.link.conn_id() == link.conn_id()) {
            s.master = None;
        }
    }
    debug!("master connection closed");
}

/// Returns true to close the master connection.
async fn handle_master_message(inner: &Inner, link: &Link, req: proto::Request) -> bool {
    match req.body {
        Body::NotifyNodeInformation(m) => {
            let mut s = lock(&inner.state);
            for n in &m.nodes {
                let Ok(info) = proto::convert::node_from_msg(n) else {
                    warn!("invalid node information from the master");
                    continue;
                };
                if info.state != NodeState::Running
                    && let Some(l) = s.storages.remove(&info.nid)
                {
                    l.abort();
                }
                if info.state == NodeState::Unknown {
                    s.nodes.remove(&info.nid);
                } else {
                    s.nodes.insert(info.nid, info);
                }
            }
        }
        Body::SendPartitionTable(m) => match proto::convert::pt_from_msg(&m) {
            Ok(pt) => lock(&inner.state).pt = Some(pt),
            Err(e) => {
                warn!("invalid partition table from the master: {e}");
                return true;
            }
        },
        Body::NotifyPartitionChanges(m) => {
            let mut s = lock(&inner.state);
            let ok = match (proto::convert::changes_from_msg(&m), s.pt.as_mut()) {
                (Ok(ch), Some(pt)) => pt.apply(Ptid(m.ptid), m.replicas, &ch).is_ok(),
                _ => false,
            };
            if !ok {
                warn!("cannot apply partition table changes: resynchronizing");
                s.pt = None;
                return true;
            }
        }
        Body::NotifyClusterInformation(m) => {
            let state = ClusterState::from_i32(m.state);
            lock(&inner.state).cluster_state = state;
            if state == Some(ClusterState::Stopping) {
                return true;
            }
        }
        Body::InvalidateObjects(m) => {
            let tid = Tid(m.tid);
            let oids: Vec<Oid> = m.oids.into_iter().map(Oid).collect();
            {
                let mut cache = lock(&inner.cache);
                let mut s = lock(&inner.state);
                for o in &oids {
                    cache.invalidate(*o, tid);
                    if let Some(e) = s.loading.get_mut(o) {
                        e.1 = Some(e.1.map_or(tid, |t| t.max(tid)));
                    }
                }
            }
            if !m.committer {
                let cb = lock(&inner.callback).clone();
                if let Some(cb) = cb {
                    cb(Invalidation::Objects(tid, &oids));
                }
            } else if let Some(ttid) = m.ttid {
                let f = lock(&inner.state).finish_callbacks.remove(&Tid(ttid));
                if let Some(f) = f {
                    f(tid);
                }
            }
            let mut s = lock(&inner.state);
            s.last_tid = s.last_tid.max(tid);
        }
        Body::StopOperation(_) => return true,
        Body::Ping(_) => {
            let _ = link.answer(req.id, msg::Pong {}).await;
        }
        other => debug!("ignored {} from the master", proto::body_name(&other)),
    }
    false
}
