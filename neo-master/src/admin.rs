//! Administration requests relayed by the admin node from neoctl: add pending storages, tweak
//! the partition table, kill or drop storages, set the number of replicas. Each is checked as
//! a whole first: a refused request changes nothing.

use crate::app::{ConnId, Master};
use neo_lib::pt::CellChange;
use neo_lib::{CellState, ClusterState, ErrorCode, Nid, NodeState, NodeType};
use proto::{Body, msg};
use std::collections::BTreeSet;
use tracing::{info, warn};

fn denied(message: impl Into<String>) -> Body {
    proto::error(ErrorCode::Denied, message)
}

impl Master {
    fn require_running(&self) -> Result<(), Body> {
        if self.state != ClusterState::Running || self.stopping {
            return Err(denied(format!("the cluster is {} (this needs RUNNING)", self.state)));
        }
        Ok(())
    }

    /// Storages named by an administration request: each a known storage node.
    fn named_storages(&self, nids: &[i32]) -> Result<Vec<Nid>, Body> {
        let mut out = Vec::new();
        for n in nids.iter().map(|n| Nid(*n)) {
            let known = self.nodes.get(&n).is_some_and(|x| x.info.node_type == NodeType::Storage)
                || self.pt.as_ref().is_some_and(|pt| pt.nodes().contains(&n));
            if !known {
                return Err(denied(format!("{n} is not a storage node of this cluster")));
            }
            if !out.contains(&n) {
                out.push(n);
            }
        }
        Ok(out)
    }

    /// The storages that hold data after a tweak: the running ones, plus `joining`. Refused
    /// while a storage of the partition table is not running (drop it or bring it back).
    fn tweak_changes(&self, joining: &[Nid]) -> Result<Vec<CellChange>, Body> {
        let Some(pt) = &self.pt else { return Err(denied("no partition table yet")) };
        let running = self.running_storages();
        if let Some(down) = pt.nodes().into_iter().find(|n| !running.contains(n)) {
            return Err(denied(format!("{down} is not running: drop it (neoctl drop) or bring it back first")));
        }
        let mut nodes: Vec<Nid> = pt.nodes().into_iter().collect();
        nodes.extend_from_slice(joining);
        pt.tweak(&nodes).map_err(|e| denied(e.to_string()))
    }

    /// `neoctl add [S…]`: pending storages become RUNNING, then a tweak gives them cells.
    pub async fn handle_add_pending(&mut self, conn: ConnId, id: u32, m: msg::AddPendingNodes) {
        let r = self.add_pending(m).await;
        self.answer(conn, id, r.unwrap_or_else(|e| e)).await;
    }

    async fn add_pending(&mut self, m: msg::AddPendingNodes) -> Result<Body, Body> {
        self.require_running()?;
        let pending: Vec<Nid> = self
            .nodes
            .values()
            .filter(|n| n.info.node_type == NodeType::Storage && n.info.state == NodeState::Pending && n.conn.is_some())
            .map(|n| n.info.nid)
            .collect();
        let nids = if m.nids.is_empty() {
            if pending.is_empty() {
                return Err(denied("no storage is pending"));
            }
            pending.clone()
        } else {
            self.named_storages(&m.nids)?
        };
        if let Some(n) = nids.iter().find(|n| !pending.contains(n)) {
            return Err(denied(format!("{n} is not pending")));
        }
        let changes = self.tweak_changes(&nids)?;
        info!("adding storages {nids:?}");
        for nid in &nids {
            self.set_node_state(*nid, NodeState::Running).await;
            self.tm.storage_starting(*nid);
            if let Some(c) = self.conn_of_node(*nid) {
                self.notify(c, msg::StartOperation { backup: false }).await;
            }
        }
        self.commit_pt_changes(&changes).await;
        Ok(proto::ack())
    }

    /// `neoctl tweak [--dry-run]`.
    pub async fn handle_tweak(&mut self, conn: ConnId, id: u32, m: msg::TweakPartitionTable) {
        let r = match self.require_running().and_then(|()| self.tweak_changes(&[])) {
            Ok(changes) => {
                let changed = !changes.is_empty();
                if !m.dry_run && changed {
                    info!("tweak: {} cell changes", changes.len());
                    self.commit_pt_changes(&changes).await;
                }
                match &self.pt {
                    Some(pt) => {
                        let mut result = pt.clone();
                        if m.dry_run {
                            result.commit_changes(&changes);
                        }
                        msg::AnswerTweakPartitionTable { changed, pt: Some(proto::convert::pt_to_msg(&result)) }.into()
                    }
                    None => denied("no partition table yet"),
                }
            }
            Err(e) => e,
        };
        self.answer(conn, id, r).await;
    }

    /// `neoctl kill S…` (DOWN) and `neoctl drop S…` (UNKNOWN).
    pub async fn handle_set_node_state(&mut self, conn: ConnId, id: u32, m: msg::SetNodeState) {
        let r = match NodeState::from_i32(m.state) {
            Some(NodeState::Down) => self.kill(&m.nids).await,
            Some(NodeState::Unknown) => self.drop_nodes(&m.nids).await,
            Some(s) => Err(denied(format!("a node cannot be set {s} (only DOWN: kill, or UNKNOWN: drop)"))),
            None => Err(proto::error(ErrorCode::ProtocolError, "invalid node state")),
        };
        self.answer(conn, id, r.unwrap_or_else(|e| e)).await;
    }

    /// Partitions that would have no readable cell on a running storage without `gone`.
    fn last_copies(&self, gone: &[Nid]) -> Vec<u32> {
        let Some(pt) = &self.pt else { return Vec::new() };
        let running = self.running_storages();
        (0..pt.np())
            .filter(|p| !pt.readable_cells(*p).any(|c| running.contains(&c.nid) && !gone.contains(&c.nid)))
            .filter(|p| pt.readable_cells(*p).any(|c| gone.contains(&c.nid)))
            .collect()
    }

    async fn kill(&mut self, nids: &[i32]) -> Result<Body, Body> {
        if nids.iter().any(|n| Nid(*n) == self.nid) {
            return Err(denied(format!("{} is the primary master: it cannot be killed", self.nid)));
        }
        let nids = self.named_storages(nids)?;
        if let Some(n) = nids.iter().find(|n| self.conn_of_node(**n).is_none()) {
            return Err(denied(format!("{n} is not connected")));
        }
        if self.state == ClusterState::Running {
            let last = self.last_copies(&nids);
            if !last.is_empty() {
                return Err(denied(format!("{nids:?} hold the last readable copies of partitions {last:?}")));
            }
        }
        for nid in nids {
            warn!("killing {nid} (neoctl kill)");
            self.set_node_state(nid, NodeState::Down).await;
            if let Some(c) = self.conn_of_node(nid)
                && let Some(conn) = self.conns.get(&c)
            {
                // The node was told it is DOWN (it stops); the link goes now.
                conn.link.close().await;
                self.connection_lost(c).await;
            }
        }
        Ok(proto::ack())
    }

    async fn drop_nodes(&mut self, nids: &[i32]) -> Result<Body, Body> {
        if self.state == ClusterState::Recovering && !self.stopping {
            return self.drop_missing(nids).await;
        }
        self.require_running()?;
        let nids = self.named_storages(nids)?;
        let last = self.last_copies(&nids);
        if !last.is_empty() {
            return Err(denied(format!("{nids:?} hold the last readable copies of partitions {last:?}")));
        }
        let Some(pt) = &self.pt else { return Err(denied("no partition table yet")) };
        let gone: BTreeSet<Nid> = nids.iter().copied().collect();
        let mut changes = Vec::new();
        for p in 0..pt.np() {
            let row = pt.row(p);
            for c in row.iter().filter(|c| gone.contains(&c.nid)) {
                changes.push(CellChange { partition: p, nid: c.nid, state: CellState::Discarded });
            }
            // FEEDING cells were to go once their replacements caught up: with a cell of the
            // row dropped, they stay.
            if row.iter().any(|c| gone.contains(&c.nid)) {
                for c in row.iter().filter(|c| c.state == CellState::Feeding && !gone.contains(&c.nid)) {
                    changes.push(CellChange { partition: p, nid: c.nid, state: CellState::UpToDate });
                }
            }
        }
        warn!("dropping {nids:?} (neoctl drop)");
        self.commit_pt_changes(&changes).await;
        for nid in nids {
            // Connected: it leaves (its cells are gone, it purges them); known only: forgotten.
            if let Some(c) = self.conn_of_node(nid)
                && let Some(conn) = self.conns.get(&c)
            {
                conn.link.close().await;
                self.connection_lost(c).await;
            } else {
                self.forget_node(nid).await;
            }
        }
        Ok(proto::ack())
    }

    /// `neoctl drop` while RECOVERING waits for storages that hold the newest data: the
    /// operator gives up on them. Only storages that are not connected; their cells are
    /// discarded, and a partition left without a readable cell falls back to the cells that
    /// remain (OUT_OF_DATE: they miss what only the dropped storages had). Refused if a
    /// partition would have no cell at all.
    async fn drop_missing(&mut self, nids: &[i32]) -> Result<Body, Body> {
        let nids = self.named_storages(nids)?;
        if let Some(n) = nids.iter().find(|n| self.conn_of_node(**n).is_some()) {
            return Err(denied(format!("{n} is connected: only storages that are not back can be dropped now")));
        }
        let Some(pt) = &self.pt else { return Err(denied("no partition table yet")) };
        let gone: BTreeSet<Nid> = nids.iter().copied().collect();
        let mut changes = Vec::new();
        let mut fallback = Vec::new();
        for p in 0..pt.np() {
            let row = pt.row(p);
            if !row.iter().any(|c| gone.contains(&c.nid)) {
                continue;
            }
            let rest: Vec<_> =
                row.iter().filter(|c| !gone.contains(&c.nid) && c.state != CellState::Corrupted).collect();
            if rest.is_empty() {
                return Err(denied(format!("partition {p} has no cell outside {nids:?}")));
            }
            changes.extend(row.iter().filter(|c| gone.contains(&c.nid)).map(|c| CellChange {
                partition: p,
                nid: c.nid,
                state: CellState::Discarded,
            }));
            if !rest.iter().any(|c| c.state.is_readable()) {
                fallback.push(p);
                changes.extend(rest.iter().map(|c| CellChange {
                    partition: p,
                    nid: c.nid,
                    state: CellState::UpToDate,
                }));
            }
        }
        if fallback.is_empty() {
            warn!("dropping {nids:?} (neoctl drop)");
        } else {
            warn!(
                "dropping {nids:?} (neoctl drop): partitions {fallback:?} fall back to older copies; the commits only the dropped storages had are lost"
            );
        }
        self.commit_pt_changes(&changes).await;
        for nid in nids {
            self.forget_node(nid).await;
        }
        self.check_recovery().await;
        Ok(proto::ack())
    }

    /// `neoctl set numreplicas N`: recorded in the partition table; `tweak` moves the cells.
    pub async fn handle_set_num_replicas(&mut self, conn: ConnId, id: u32, m: msg::SetNumReplicas) {
        let r = match self.require_running() {
            Err(e) => e,
            Ok(()) if m.replicas > 64 => denied(format!("{} replicas is more than 64", m.replicas)),
            Ok(()) => match self.pt.as_mut() {
                Some(pt) => {
                    let ptid = pt.set_replicas(m.replicas);
                    info!("replicas set to {} (ptid {ptid})", m.replicas);
                    self.save_pt().await;
                    let m = proto::convert::changes_to_msg(ptid, m.replicas, &[]);
                    for c in self.conns.values() {
                        if c.node_type != NodeType::Master {
                            let _ = c.link.notify(m.clone()).await;
                        }
                    }
                    proto::ack()
                }
                None => denied("no partition table yet"),
            },
        };
        self.answer(conn, id, r).await;
    }
}
