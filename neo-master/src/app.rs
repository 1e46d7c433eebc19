//! The master actor: connection registry, node registry, identification, dispatch of every
//! message to a handler, and broadcasts. Recovery/verification live in `recovery.rs`,
//! transactions in `transactions.rs`.

use crate::MasterError;
use crate::transactions::Transactions;
use neo_lib::config::{Address, NodeConfig};
use neo_lib::pt::{CellChange, PartitionTable};
use neo_lib::{ClusterState, ErrorCode, Nid, NodeInfo, NodeState, NodeType};
use proto::msg;
use proto::net::{NetConfig, receive_identification};
use proto::{Body, Incoming, Link, LinkError, Request};
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

pub type ConnId = u64;

/// What the actor reacts to.
pub enum Event {
    /// A peer sent a valid identification request.
    Identified {
        link: Link,
        incoming: Incoming,
        id: u32,
        req: msg::RequestIdentification,
    },
    /// A request or notification from an identified peer.
    Message {
        conn: ConnId,
        req: Request,
    },
    Closed {
        conn: ConnId,
    },
    /// Answer to a request the master sent (see `Master::spawn_ask`).
    Answer {
        conn: ConnId,
        nid: Nid,
        kind: AskKind,
        result: Result<Body, LinkError>,
    },
}

/// Which request an `Event::Answer` answers.
#[derive(Clone, Copy, Debug)]
pub enum AskKind {
    Recovery,
    PartitionTable,
    LockedTransactions,
    LastIds,
    /// `round`: answers to an earlier round of locks (see `transactions_storage_lost`) do not count.
    LockInformation {
        ttid: neo_lib::Tid,
        round: u32,
    },
    FinalTid {
        ttid: neo_lib::Tid,
    },
}

pub struct Conn {
    pub link: Link,
    pub nid: Nid,
    pub node_type: NodeType,
}

pub struct Node {
    pub info: NodeInfo,
    pub conn: Option<ConnId>,
}

pub struct Master {
    pub cfg: NodeConfig,
    pub nid: Nid,
    pub state: ClusterState,
    pub conns: HashMap<ConnId, Conn>,
    pub nodes: BTreeMap<Nid, Node>,
    pub pt: Option<PartitionTable>,
    pub tx: mpsc::Sender<Event>,
    pub shutdown: CancellationToken,
    started: Instant,
    last_timestamp: f64,
    pub recovery: crate::recovery::Recovery,
    pub tm: Transactions,
    /// Set when `SetClusterState(STOPPING)` was accepted: refuse new transactions, stop when
    /// the in-flight ones are done.
    pub stopping: bool,
    /// OUT_OF_DATE cells that missed a commit (its client did not write them): the greatest
    /// such TID. A cell becomes UP_TO_DATE only once replication copied up to it. Commits
    /// before this master started are all on the readable cells before any replication
    /// round can start (verification finished them), so nothing older is needed here.
    pub missed: HashMap<(u32, Nid), neo_lib::Tid>,
    /// The ptid at which each cell last became readable (absent: before this master started).
    pub readable_since: HashMap<(u32, Nid), neo_lib::Ptid>,
    /// Why the master stopped itself, if it did (the process then exits with an error).
    pub fatal: Option<String>,
    /// OUT_OF_DATE cells reset by verification (they lack an older transaction): named in
    /// every full table sent to storages until they are readable again.
    pub reset_cells: std::collections::BTreeSet<(u32, Nid)>,
}

impl Master {
    pub async fn start(cfg: NodeConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<(), MasterError> {
        let net = NetConfig {
            tls: cfg.tls.as_ref().map(proto::tls::TlsContext::load).transpose()?,
            max_frame: neo_lib::DEFAULT_MAX_FRAME,
        };
        let local = listener.local_addr().map_err(|err| MasterError::Listen { addr: cfg.bind.to_string(), err })?;
        let address = Address { host: cfg.bind.host.clone(), port: local.port() };
        let nid = cfg.nid.unwrap_or(Nid::new(NodeType::Master, 1));
        if nid.node_type() != Some(NodeType::Master) {
            return Err(MasterError::Config(format!("nid {nid} is not a master node id")));
        }
        let span = tracing::info_span!("master", nid = %nid, cluster = %cfg.cluster);
        let (tx, mut rx) = mpsc::channel::<Event>(4096);
        let mut m = Master {
            nid,
            state: ClusterState::Recovering,
            conns: HashMap::new(),
            nodes: BTreeMap::new(),
            pt: None,
            tx: tx.clone(),
            shutdown: shutdown.clone(),
            started: Instant::now(),
            last_timestamp: 0.0,
            recovery: Default::default(),
            tm: Transactions::default(),
            stopping: false,
            missed: HashMap::new(),
            readable_since: HashMap::new(),
            fatal: None,
            reset_cells: Default::default(),
            cfg,
        };
        match &m.cfg.database {
            Some(path) => {
                let path = std::path::PathBuf::from(path);
                if let Some(pt) = crate::state::load(&path, &m.cfg.cluster)? {
                    info!("partition table ptid {} loaded from {}", pt.ptid, path.display());
                    m.pt = Some(pt);
                }
            }
            None => warn!(
                "no `database` for this master: the newest partition table is not kept, so a storage that missed commits could be started alone (with `neoctl start`)"
            ),
        }
        m.register_absent_storages();
        let ts = m.timestamp();
        m.nodes.insert(
            nid,
            Node {
                info: NodeInfo {
                    node_type: NodeType::Master,
                    nid,
                    address: Some(address.clone()),
                    state: NodeState::Running,
                    id_timestamp: ts,
                },
                conn: None,
            },
        );
        async {
            info!("listening on {address}, cluster {:?}, RECOVERING", m.cfg.cluster);
            let accept_token = shutdown.child_token();
            tokio::spawn(accept_loop(listener, net, m.cfg.cluster.clone(), tx.clone(), accept_token.clone()));
            loop {
                let ev = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    ev = rx.recv() => match ev { Some(ev) => ev, None => break },
                };
                m.handle_event(ev).await;
                if m.state == ClusterState::Stopping && m.shutdown.is_cancelled() {
                    break;
                }
            }
            accept_token.cancel();
            // Let every link write what is queued (e.g. STOPPING) before the process exits.
            for c in m.conns.values() {
                c.link.close().await;
            }
            let links: Vec<Link> = m.conns.values().map(|c| c.link.clone()).collect();
            let all_closed = futures_join_all(links);
            if tokio::time::timeout(std::time::Duration::from_secs(5), all_closed).await.is_err() {
                warn!("some connections did not close in time");
            }
            info!("master stopped");
        }
        .instrument(span)
        .await;
        match m.fatal.take() {
            Some(why) => Err(MasterError::Fatal(why)),
            None => Ok(()),
        }
    }

    /// Strictly increasing identification timestamps.
    fn timestamp(&mut self) -> f64 {
        let t = self.started.elapsed().as_secs_f64().max(self.last_timestamp + 1e-6);
        self.last_timestamp = t;
        t
    }

    async fn handle_event(&mut self, ev: Event) {
        match ev {
            Event::Identified { link, incoming, id, req } => self.identify(link, incoming, id, req).await,
            Event::Message { conn, req } => self.dispatch(conn, req).await,
            Event::Closed { conn } => self.connection_lost(conn).await,
            Event::Answer { conn, nid, kind, result } => self.handle_answer(conn, nid, kind, result).await,
        }
    }

    /// Send a request to a peer from a task; its answer comes back as `Event::Answer`.
    pub fn spawn_ask(&self, conn: ConnId, kind: AskKind, body: Body) {
        let Some(c) = self.conns.get(&conn) else { return };
        let (link, nid, tx) = (c.link.clone(), c.nid, self.tx.clone());
        tokio::spawn(async move {
            let result = link.ask(body).await;
            let _ = tx.send(Event::Answer { conn, nid, kind, result }).await;
        });
    }

    pub async fn notify(&self, conn: ConnId, body: impl Into<Body>) {
        if let Some(c) = self.conns.get(&conn) {
            let _ = c.link.notify(body).await;
        }
    }

    pub async fn answer(&self, conn: ConnId, id: u32, body: impl Into<Body>) {
        if let Some(c) = self.conns.get(&conn) {
            let _ = c.link.answer(id, body).await;
        }
    }

    /// Connections of identified nodes of the given types.
    pub fn conns_of(&self, types: &[NodeType]) -> Vec<ConnId> {
        let mut v: Vec<ConnId> =
            self.conns.iter().filter(|(_, c)| types.contains(&c.node_type)).map(|(id, _)| *id).collect();
        v.sort();
        v
    }

    pub fn conn_of_node(&self, nid: Nid) -> Option<ConnId> {
        self.nodes.get(&nid).and_then(|n| n.conn)
    }

    /// Storages that are connected and RUNNING.
    pub fn running_storages(&self) -> Vec<Nid> {
        self.nodes
            .values()
            .filter(|n| n.info.node_type == NodeType::Storage && n.info.state == NodeState::Running && n.conn.is_some())
            .map(|n| n.info.nid)
            .collect()
    }

    /// Storages that are connected (PENDING or RUNNING).
    pub fn connected_storages(&self) -> Vec<Nid> {
        self.nodes
            .values()
            .filter(|n| n.info.node_type == NodeType::Storage && n.conn.is_some())
            .map(|n| n.info.nid)
            .collect()
    }

    /// Which nodes a peer of type `to` is told about.
    fn visible_to(to: NodeType, about: NodeType) -> bool {
        match to {
            NodeType::Admin => true,
            _ => matches!(about, NodeType::Master | NodeType::Storage),
        }
    }

    /// Broadcast changed node entries to everyone allowed to see them.
    pub async fn broadcast_nodes(&self, nids: &[Nid]) {
        let infos: Vec<&NodeInfo> = nids.iter().filter_map(|n| self.nodes.get(n)).map(|n| &n.info).collect();
        if infos.is_empty() {
            return;
        }
        for c in self.conns.values() {
            let nodes: Vec<msg::NodeInfo> = infos
                .iter()
                .filter(|i| Self::visible_to(c.node_type, i.node_type))
                .map(|i| proto::convert::node_to_msg(i))
                .collect();
            if !nodes.is_empty() {
                let _ = c.link.notify(msg::NotifyNodeInformation { nodes }).await;
            }
        }
    }

    pub async fn set_node_state(&mut self, nid: Nid, state: NodeState) {
        if let Some(n) = self.nodes.get_mut(&nid) {
            if n.info.state == state {
                return;
            }
            n.info.state = state;
        }
        self.broadcast_nodes(&[nid]).await;
    }

    pub async fn set_cluster_state(&mut self, state: ClusterState) {
        if self.state == state {
            return;
        }
        info!("cluster state {} -> {}", self.state, state);
        self.state = state;
        if state != ClusterState::Recovering {
            self.recovery.waiting.clear();
        }
        for c in self.conns.values() {
            let m = msg::NotifyClusterInformation { state: state as i32, detail: self.recovery.waiting.clone() };
            let _ = c.link.notify(m).await;
        }
    }

    /// The whole partition table as a message, with the reset cells for storages.
    pub fn pt_msg(&self) -> Option<msg::PartitionTableMsg> {
        let mut m = proto::convert::pt_to_msg(self.pt.as_ref()?);
        m.reset =
            self.reset_cells.iter().map(|(partition, nid)| msg::CellId { partition: *partition, nid: nid.0 }).collect();
        Some(m)
    }

    /// Send the whole partition table to storages and admins (and clients if `clients`).
    pub async fn send_pt_to_all(&self, clients: bool) {
        let Some(m) = self.pt_msg() else { return };
        for c in self.conns.values() {
            if matches!(c.node_type, NodeType::Storage | NodeType::Admin)
                || (clients && c.node_type == NodeType::Client)
            {
                let _ = c.link.notify(Body::SendPartitionTable(m.clone())).await;
            }
        }
    }

    /// Save the partition table (the master's `database`), before anyone is told about it:
    /// blocking IO on a blocking thread, awaited (the actor does nothing else meanwhile). A
    /// table that cannot be saved stops the master: going on could let a restart use an
    /// older one.
    pub async fn save_pt(&mut self) {
        let (Some(path), Some(pt)) = (self.cfg.database.clone(), self.pt.clone()) else { return };
        let cluster = self.cfg.cluster.clone();
        let path = std::path::PathBuf::from(path);
        let saved = tokio::task::spawn_blocking(move || crate::state::save(&path, &cluster, &pt)).await;
        let err = match saved {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!("cannot save the partition table: {err}: stopping");
        self.fatal.get_or_insert(format!("cannot save the partition table: {err}"));
        for c in self.conns.values() {
            c.link.abort();
        }
        self.shutdown.cancel();
    }

    /// Commit partition table changes, save the table, and notify every storage, admin and
    /// client.
    pub async fn commit_pt_changes(&mut self, changes: &[CellChange]) {
        let Some(pt) = &mut self.pt else { return };
        if changes.is_empty() {
            return;
        }
        let ptid = pt.commit_changes(changes);
        let replicas = pt.replicas;
        self.save_pt().await;
        if self.shutdown.is_cancelled() {
            return;
        }
        info!("partition table changed: ptid {ptid}, {changes:?}");
        for ch in changes {
            let cell = (ch.partition, ch.nid);
            if ch.state == neo_lib::CellState::OutOfDate {
                // Commits already past their finish (or committed, but maybe not unlocked on
                // the source yet) were not written to this cell and are not above the source's
                // last TID yet: the cell must replicate up to them.
                let floor = self.tm.partition_floor(ch.partition);
                let t = self.missed.entry(cell).or_insert(floor);
                *t = (*t).max(floor);
            }
            if ch.state.is_readable() {
                self.readable_since.insert(cell, ptid);
                self.missed.remove(&cell);
                self.reset_cells.remove(&cell);
            } else if ch.state == neo_lib::CellState::Discarded {
                self.readable_since.remove(&cell);
                self.missed.remove(&cell);
                self.reset_cells.remove(&cell);
            }
        }
        let m = proto::convert::changes_to_msg(ptid, replicas, changes);
        for c in self.conns.values() {
            if c.node_type != NodeType::Master {
                let _ = c.link.notify(m.clone()).await;
            }
        }
    }

    /// Add the storages of the partition table that are not connected to the node list, as
    /// DOWN and without an address; returns them.
    pub fn register_absent_storages(&mut self) -> Vec<Nid> {
        let Some(pt) = &self.pt else { return Vec::new() };
        let absent: Vec<Nid> = pt.nodes().into_iter().filter(|n| !self.nodes.contains_key(n)).collect();
        for &nid in &absent {
            let info = NodeInfo {
                node_type: NodeType::Storage,
                nid,
                address: None,
                state: NodeState::Down,
                id_timestamp: 0.0,
            };
            self.nodes.insert(nid, Node { info, conn: None });
        }
        absent
    }

    fn allocate_nid(&self, t: NodeType) -> Nid {
        let mut used: std::collections::BTreeSet<Nid> = self.nodes.keys().copied().collect();
        if let Some(pt) = &self.pt {
            used.extend(pt.nodes());
        }
        (1..=0xff_ffff).map(|n| Nid::new(t, n)).find(|n| !used.contains(n)).unwrap_or(Nid::new(t, 0xff_ffff))
    }

    async fn identify(&mut self, link: Link, incoming: Incoming, id: u32, req: msg::RequestIdentification) {
        let Some(node_type) = NodeType::from_i32(req.node_type) else {
            link.refuse(id, ErrorCode::ProtocolError, "invalid node type").await;
            return;
        };
        let address = match proto::convert::address(&req.address) {
            Ok(a) => a,
            Err(e) => {
                link.refuse(id, ErrorCode::ProtocolError, e.to_string()).await;
                return;
            }
        };
        let refuse = |code, msg: String| {
            let link = link.clone();
            async move {
                info!("refused {} from {}: {msg}", node_type, link.peer());
                link.refuse(id, code, msg).await;
            }
        };
        let (nid, state) = match node_type {
            NodeType::Master => {
                return refuse(ErrorCode::ProtocolError, "this master does not accept other masters".into()).await;
            }
            NodeType::Storage => {
                if self.stopping || self.state == ClusterState::Stopping {
                    return refuse(ErrorCode::NotReady, "cluster is stopping".into()).await;
                }
                if address.is_none() {
                    return refuse(ErrorCode::ProtocolError, "a storage must give its address".into()).await;
                }
                let nid = match req.nid.map(Nid) {
                    Some(n) if n.node_type() != Some(NodeType::Storage) => {
                        return refuse(ErrorCode::ProtocolError, format!("{n} is not a storage node id")).await;
                    }
                    Some(n) => {
                        if self.nodes.get(&n).is_some_and(|x| x.conn.is_some()) {
                            return refuse(ErrorCode::ProtocolError, format!("node {n} is already connected")).await;
                        }
                        n
                    }
                    None => self.allocate_nid(NodeType::Storage),
                };
                let in_pt = self.pt.as_ref().is_some_and(|pt| pt.nodes().contains(&nid));
                let state = match self.state {
                    ClusterState::Recovering => NodeState::Pending,
                    ClusterState::Running if in_pt => NodeState::Running,
                    ClusterState::Running => NodeState::Pending,
                    _ => return refuse(ErrorCode::NotReady, format!("cluster is {}", self.state)).await,
                };
                (nid, state)
            }
            NodeType::Client => {
                if self.stopping {
                    return refuse(ErrorCode::Denied, "cluster is stopping".into()).await;
                }
                if self.state != ClusterState::Running {
                    return refuse(ErrorCode::NotReady, format!("cluster is {}", self.state)).await;
                }
                (self.allocate_nid(NodeType::Client), NodeState::Running)
            }
            NodeType::Admin => (self.allocate_nid(NodeType::Admin), NodeState::Running),
        };
        let conn = link.conn_id();
        let ts = self.timestamp();
        let info = NodeInfo { node_type, nid, address, state, id_timestamp: ts };
        info!("{} {} identified from {} ({})", node_type, nid, link.peer(), state);
        let accept = msg::AcceptIdentification {
            node_type: NodeType::Master as i32,
            nid: Some(self.nid.0),
            your_nid: Some(nid.0),
            partitions: self.pt.as_ref().map(|p| p.np()).unwrap_or(0),
        };
        if link.answer(id, accept).await.is_err() {
            return;
        }
        self.conns.insert(conn, Conn { link: link.clone(), nid, node_type });
        self.nodes.insert(nid, Node { info, conn: Some(conn) });
        // Pump the rest of the connection into the actor.
        let tx = self.tx.clone();
        tokio::spawn(
            pump(conn, incoming, tx, link.clone()).instrument(tracing::debug_span!("peer", nid = %nid, conn = conn)),
        );
        // Full node list to the new node, then the new node to everyone else.
        let nodes: Vec<msg::NodeInfo> = self
            .nodes
            .values()
            .filter(|n| Self::visible_to(node_type, n.info.node_type))
            .map(|n| proto::convert::node_to_msg(&n.info))
            .collect();
        let _ = link.notify(msg::NotifyNodeInformation { nodes }).await;
        for c in self.conns.values() {
            if c.link.conn_id() != conn && Self::visible_to(c.node_type, node_type) {
                let m = proto::convert::node_to_msg(&self.nodes[&nid].info);
                let _ = c.link.notify(msg::NotifyNodeInformation { nodes: vec![m] }).await;
            }
        }
        let send_pt = match node_type {
            NodeType::Storage => self.state != ClusterState::Recovering,
            _ => true,
        };
        if send_pt && let Some(m) = self.pt_msg() {
            let _ = link.notify(Body::SendPartitionTable(m)).await;
        }
        let m = msg::NotifyClusterInformation { state: self.state as i32, detail: self.recovery.waiting.clone() };
        let _ = link.notify(m).await;
        if node_type == NodeType::Storage {
            match self.state {
                ClusterState::Recovering => self.recovery_storage_added(conn),
                ClusterState::Running if state == NodeState::Running => {
                    // A storage of the partition table came back: its cells stay OUT_OF_DATE
                    // (they were outdated when it left) and it receives new writes.
                    let _ = link.notify(msg::StartOperation { backup: false }).await;
                    self.tm.storage_starting(nid);
                }
                _ => {}
            }
        }
    }

    async fn dispatch(&mut self, conn: ConnId, req: Request) {
        let Some(c) = self.conns.get(&conn) else { return };
        let (nid, node_type) = (c.nid, c.node_type);
        let Request { id, body } = req;
        match body {
            Body::Ping(_) => self.answer(conn, id, msg::Pong {}).await,
            Body::AskBeginTransaction(m) => self.handle_begin(conn, nid, id, m).await,
            Body::AskNewOids(m) => self.handle_new_oids(conn, id, m).await,
            Body::AskFinishTransaction(m) => self.handle_finish(conn, nid, id, m).await,
            Body::AbortTransaction(m) => self.handle_abort(conn, m).await,
            Body::AskFinalTid(m) if node_type == NodeType::Client => self.handle_final_tid(conn, id, m).await,
            Body::AskLastTransaction(_) => {
                let tid = self.tm.last_tid.0;
                self.answer(conn, id, msg::AnswerLastTransaction { tid }).await
            }
            Body::NotifyReady(_) if node_type == NodeType::Storage => self.handle_ready(nid).await,
            Body::AskReplicationDone(m) if node_type == NodeType::Storage => {
                self.handle_replication_done(conn, nid, id, m).await
            }
            Body::NotifyReplicationProgress(m) if node_type == NodeType::Storage => {
                if let Some(mut p) = m.progress {
                    p.nid = nid.0;
                    // Without waiting: an admin that does not read must not stall the master.
                    let m = msg::NotifyReplicationProgress { progress: Some(p) };
                    for c in self.conns_of(&[NodeType::Admin]) {
                        if let Some(conn) = self.conns.get(&c) {
                            let _ = conn.link.try_notify(m);
                        }
                    }
                }
            }
            Body::AskClusterState(_) => {
                let m = msg::AnswerClusterState { state: self.state as i32, detail: self.recovery.waiting.clone() };
                self.answer(conn, id, m).await
            }
            Body::AskIds(_) => {
                let m = msg::AnswerIds {
                    last_oid: self.tm.last_oid.0,
                    last_tid: self.tm.last_tid.0,
                    ptid: self.pt.as_ref().map(|p| p.ptid.0).unwrap_or(0),
                    backup_tid: None,
                    max_stored_oid: self.tm.max_stored_oid.0,
                };
                self.answer(conn, id, m).await
            }
            Body::AskNodeList(m) => {
                let filter = m.node_type.and_then(NodeType::from_i32);
                let nodes = self
                    .nodes
                    .values()
                    .filter(|n| filter.is_none_or(|t| t == n.info.node_type))
                    .map(|n| proto::convert::node_to_msg(&n.info))
                    .collect();
                self.answer(conn, id, msg::AnswerNodeList { nodes }).await
            }
            Body::AskPartitionList(_) => match &self.pt {
                Some(pt) => self.answer(conn, id, Body::AnswerPartitionList(proto::convert::pt_to_msg(pt))).await,
                None => self.answer(conn, id, proto::error(ErrorCode::NotReady, "no partition table yet")).await,
            },
            Body::SetClusterState(m) if node_type == NodeType::Admin => self.handle_set_state(conn, id, m).await,
            Body::AddPendingNodes(m) if node_type == NodeType::Admin => self.handle_add_pending(conn, id, m).await,
            Body::TweakPartitionTable(m) if node_type == NodeType::Admin => self.handle_tweak(conn, id, m).await,
            Body::SetNodeState(m) if node_type == NodeType::Admin => self.handle_set_node_state(conn, id, m).await,
            Body::SetNumReplicas(m) if node_type == NodeType::Admin => self.handle_set_num_replicas(conn, id, m).await,
            Body::AskPack(m) if node_type == NodeType::Client => self.handle_pack(conn, id, m).await,
            other => {
                let name = proto::body_name(&other);
                debug!("unexpected {name} from {nid}");
                self.answer(conn, id, proto::error(ErrorCode::ProtocolError, format!("unexpected message {name}")))
                    .await
            }
        }
    }

    /// Pack: every running storage packs its readable partitions at min(tid, last tid); the
    /// client is answered once all of them are done. Runs in a task (a pack may be long).
    async fn handle_pack(&mut self, conn: ConnId, id: u32, m: msg::AskPack) {
        if self.state != ClusterState::Running {
            let e = proto::error(ErrorCode::NotReady, format!("cluster is {}", self.state));
            return self.answer(conn, id, e).await;
        }
        let Some(client) = self.conns.get(&conn).map(|c| c.link.clone()) else { return };
        let tid = m.tid.min(self.tm.last_tid.0);
        let links: Vec<(Nid, Link)> = self
            .running_storages()
            .into_iter()
            .filter_map(|n| self.conn_of_node(n).and_then(|c| self.conns.get(&c)).map(|c| (n, c.link.clone())))
            .collect();
        info!("pack at {:?} on {} storage(s)", neo_lib::Tid(tid), links.len());
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for (nid, link) in links {
                tasks.spawn(async move {
                    (nid, link.ask(msg::AskPack { tid }).await.and_then(|b| proto::expect_answer!(b, AnswerPack)))
                });
            }
            let mut failure = None;
            while let Some(r) = tasks.join_next().await {
                if let Ok((nid, Err(e))) = r {
                    warn!("pack failed on {nid}: {e}");
                    failure.get_or_insert(format!("pack failed on {nid}: {e}"));
                }
            }
            let answer: Body = match failure {
                None => msg::AnswerPack { tid }.into(),
                Some(e) => proto::error(ErrorCode::ProtocolError, e),
            };
            let _ = client.answer(id, answer).await;
        });
    }

    async fn handle_set_state(&mut self, conn: ConnId, id: u32, m: msg::SetClusterState) {
        let requested = ClusterState::from_i32(m.state);
        let reply = match requested {
            Some(ClusterState::Verifying) if self.state == ClusterState::Recovering => {
                info!("startup allowed by administrator");
                self.recovery.startup_allowed = true;
                proto::ack()
            }
            Some(ClusterState::Stopping) => {
                info!("cluster stop requested");
                self.stopping = true;
                proto::ack()
            }
            Some(s) => {
                proto::error(ErrorCode::Denied, format!("Invalid state requested: {s} (cluster is {})", self.state))
            }
            None => proto::error(ErrorCode::ProtocolError, "invalid cluster state"),
        };
        self.answer(conn, id, reply).await;
        if self.stopping {
            self.maybe_stop().await;
        } else {
            self.check_recovery().await;
        }
    }

    /// Stop the cluster once no transaction is in flight: every node is told STOPPING and exits.
    pub async fn maybe_stop(&mut self) {
        if !self.stopping || self.tm.has_pending() {
            return;
        }
        self.set_cluster_state(ClusterState::Stopping).await;
        for c in self.conns.values() {
            c.link.close().await;
        }
        self.shutdown.cancel();
    }

    pub async fn connection_lost(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else { return };
        let nid = c.nid;
        info!("{} {} disconnected", c.node_type, nid);
        match c.node_type {
            NodeType::Storage => {
                let in_pt = self.pt.as_ref().is_some_and(|pt| pt.nodes().contains(&nid));
                if let Some(n) = self.nodes.get_mut(&nid) {
                    n.conn = None;
                }
                if in_pt {
                    self.set_node_state(nid, NodeState::Down).await;
                } else {
                    self.forget_node(nid).await;
                }
                self.storage_lost(nid).await;
            }
            NodeType::Client => {
                self.forget_node(nid).await;
                self.client_lost(conn).await;
            }
            _ => self.forget_node(nid).await,
        }
    }

    pub async fn forget_node(&mut self, nid: Nid) {
        if let Some(mut n) = self.nodes.remove(&nid) {
            n.info.state = NodeState::Unknown;
            let m = proto::convert::node_to_msg(&n.info);
            for c in self.conns.values() {
                if Self::visible_to(c.node_type, n.info.node_type) {
                    let _ = c.link.notify(msg::NotifyNodeInformation { nodes: vec![m.clone()] }).await;
                }
            }
        }
    }

    /// A storage left: outdate its cells, stop waiting for it, and fall back to RECOVERING if
    /// the partition table is no longer operational.
    async fn storage_lost(&mut self, nid: Nid) {
        match self.state {
            ClusterState::Recovering => self.recovery_storage_lost(nid).await,
            ClusterState::Verifying => {
                warn!("storage {nid} lost during verification: back to recovery");
                self.restart_recovery().await;
            }
            ClusterState::Running => {
                if let Some(pt) = &self.pt {
                    let changes = pt.outdate_changes(nid);
                    self.commit_pt_changes(&changes).await;
                }
                self.tm.storage_starting_done(nid);
                // Check first: transactions waiting for this storage's lock must not be
                // acknowledged if some partition has no readable cell left.
                let running = self.running_storages();
                let operational = self.pt.as_ref().is_some_and(|pt| pt.operational(|n| running.contains(&n)));
                if !operational {
                    warn!("partition table not operational without {nid}: back to recovery");
                    self.restart_recovery().await;
                    return;
                }
                self.transactions_storage_lost(nid).await;
                self.maybe_begin_delayed().await;
            }
            _ => {}
        }
    }
}

async fn futures_join_all(links: Vec<Link>) {
    for l in links {
        l.closed().await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    net: NetConfig,
    cluster: String,
    tx: mpsc::Sender<Event>,
    token: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = token.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { warn!("accept failed: {e}"); tokio::time::sleep(std::time::Duration::from_millis(100)).await; continue; }
            },
        };
        let (net, cluster, tx) = (net.clone(), cluster.clone(), tx.clone());
        tokio::spawn(async move {
            let (link, mut incoming) = match proto::net::accept(tcp, &net).await {
                Ok(x) => x,
                Err(e) => {
                    warn!("connection from {peer} refused: {e}");
                    return;
                }
            };
            if let Some((id, req)) = receive_identification(&link, &mut incoming, &cluster).await {
                let _ = tx.send(Event::Identified { link, incoming, id, req }).await;
            }
        });
    }
}

async fn pump(conn: ConnId, mut incoming: Incoming, tx: mpsc::Sender<Event>, link: Link) {
    while let Some(req) = incoming.recv().await {
        if tx.send(Event::Message { conn, req }).await.is_err() {
            return;
        }
    }
    link.abort();
    let _ = tx.send(Event::Closed { conn }).await;
}
