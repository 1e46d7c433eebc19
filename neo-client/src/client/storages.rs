//! Links to storages and the choice of cells: one link per storage, opened once whoever needs
//! it meanwhile, whose pump answers pings and hands `NotifyDeadlock` to the transaction's
//! relock; readable cells in random order, failed storages last; writable cells for stores.

use super::tpc::relock;
use super::{Client, Inner};
use neo_lib::{Nid, NodeState, NodeType, Oid, Tid, lock};
use proto::net::{connect_identified, identification};
use proto::{Body, Incoming, Link, LinkError, msg};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::debug;

/// How long a storage that failed is tried last.
const FAILURE_PENALTY: Duration = Duration::from_secs(600);

impl Client {
    /// The connection to storage `nid`, opened if needed (once, whoever else needs it
    /// meanwhile).
    pub(super) async fn storage_link(&self, nid: Nid) -> std::result::Result<Link, LinkError> {
        if let Some(l) = self.live_storage_link(nid) {
            return Ok(l);
        }
        let asked = Instant::now();
        let gate = lock(&self.0.storage_connecting).entry(nid).or_default().clone();
        let mut last_failure = gate.lock().await;
        if let Some(l) = self.live_storage_link(nid) {
            return Ok(l);
        }
        // Whoever held the gate while we waited failed to connect: so do we.
        if let Some((when, e)) = last_failure.as_ref()
            && *when >= asked
        {
            return Err(e.clone());
        }
        let connected = self.connect_storage(nid).await;
        match &connected {
            Ok(link) => {
                *last_failure = None;
                lock(&self.0.state).storages.insert(nid, link.clone());
            }
            Err(e) => *last_failure = Some((Instant::now(), e.clone())),
        }
        connected
    }

    async fn connect_storage(&self, nid: Nid) -> std::result::Result<Link, LinkError> {
        let (addr, me) = {
            let s = lock(&self.0.state);
            let addr = s.nodes.get(&nid).and_then(|n| n.address.clone());
            (addr, s.nid)
        };
        let addr = addr.ok_or_else(|| LinkError::Closed(format!("{nid} (no address)")))?;
        let req = identification(&self.0.cfg.cluster, NodeType::Client, me, None);
        let (link, incoming, _) = connect_identified(&addr, &self.0.net, req).await.map_err(|e| match e {
            proto::net::NetError::Link { err, .. } => err,
            other => LinkError::Closed(other.to_string()),
        })?;
        tokio::spawn(storage_pump(Arc::downgrade(&self.0), nid, link.clone(), incoming));
        self.0.storage_connects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(link)
    }

    fn live_storage_link(&self, nid: Nid) -> Option<Link> {
        lock(&self.0.state).storages.get(&nid).filter(|l| !l.is_closed()).cloned()
    }

    pub(super) fn mark_failed(&self, nid: Nid) {
        lock(&self.0.state).failed.insert(nid, Instant::now());
    }

    /// Readable cells of partition(`oid`) on running storages, failed ones last.
    pub(super) fn read_candidates(&self, oid: Oid) -> Vec<Nid> {
        let p = match &lock(&self.0.state).pt {
            Some(pt) => pt.partition_of(oid.0),
            None => return vec![],
        };
        self.partition_candidates(p)
    }

    /// Readable cells of `partition` on running storages, failed ones last.
    pub(super) fn partition_candidates(&self, partition: u32) -> Vec<Nid> {
        let s = lock(&self.0.state);
        let Some(pt) = &s.pt else { return vec![] };
        let mut v: Vec<(Option<Instant>, u64, Nid)> = pt
            .readable_cells(partition)
            .filter(|c| s.nodes.get(&c.nid).is_some_and(|n| n.state == NodeState::Running))
            .map(|c| {
                let failed = s.failed.get(&c.nid).copied().filter(|t| t.elapsed() < FAILURE_PENALTY);
                (failed, fastrand::u64(..), c.nid)
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, _, n)| n).collect()
    }

    /// Writable cells of `partition` on running storages.
    pub(super) fn write_cells(&self, partition_of: u64) -> (u32, Vec<Nid>) {
        let s = lock(&self.0.state);
        let Some(pt) = &s.pt else { return (0, vec![]) };
        let p = pt.partition_of(partition_of);
        let cells = pt
            .writable_cells(p)
            .filter(|c| s.nodes.get(&c.nid).is_some_and(|n| n.state == NodeState::Running))
            .map(|c| c.nid)
            .collect();
        (p, cells)
    }
}

async fn storage_pump(inner: std::sync::Weak<Inner>, nid: Nid, link: Link, mut incoming: Incoming) {
    while let Some(req) = incoming.recv().await {
        match req.body {
            Body::Ping(_) => {
                let _ = link.answer(req.id, msg::Pong {}).await;
            }
            Body::NotifyDeadlock(m) => {
                let Some(inner) = inner.upgrade() else { break };
                let shared = lock(&inner.state).txns.get(&Tid(m.ttid)).cloned();
                if let Some(shared) = shared {
                    relock(shared, nid, link.clone(), m);
                }
            }
            other => debug!("ignored {} from storage {nid}", proto::body_name(&other)),
        }
    }
    link.abort();
}
