//! Test harness: a whole cluster of in-process nodes (master, storages, admin) on loopback, each
//! on its own port, with real sockets and (by default) real TLS from a throw-away CA, in its own
//! temporary directory. Nodes can be stopped and restarted on the same ports and databases.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use neo_client::{Client, ClientConfig};
use neo_lib::config::{Address, NodeConfig, TlsFiles};
use neo_lib::{ClusterState, NodeType};
use neosimple::certs::TestCa;
use proto::net::NetConfig;
use proto::{Body, expect_answer, msg};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Install a log subscriber once (RUST_LOG selects what is shown).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .with_test_writer()
        .try_init();
}

/// True if a MySQL server is available for tests (see `neo_storage::testing`); panics if
/// NEO_TEST_MYSQL names one that is unreachable.
pub fn mysql_available() -> bool {
    neo_storage::testing::TestDatabase::new().unwrap().is_some()
}

#[derive(Clone, Debug)]
pub struct Options {
    pub storages: usize,
    pub replicas: u32,
    pub partitions: u32,
    pub tls: bool,
    /// Start a new cluster as soon as all storages are pending (else: wait for `neoctl start`).
    pub autostart: bool,
    pub backends: Backends,
}

/// Storage engines of a test cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backends {
    Sqlite,
    /// Every storage on its own database of the MySQL/MariaDB test server.
    Mysql,
    /// The first storage on SQLite, the others on MySQL.
    Mixed,
}

impl Default for Options {
    fn default() -> Self {
        Options { storages: 2, replicas: 1, partitions: 12, tls: true, autostart: true, backends: Backends::Sqlite }
    }
}

struct Running {
    token: CancellationToken,
    join: JoinHandle<Result<(), String>>,
}

impl Running {
    async fn stop(self) -> Result<(), String> {
        self.token.cancel();
        match tokio::time::timeout(Duration::from_secs(20), self.join).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(format!("node task failed: {e}")),
            Err(_) => Err("node did not stop in 20 s".into()),
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub name: String,
    pub opts: Options,
    pub node_tls: Option<TlsFiles>,
    pub client_tls: Option<TlsFiles>,
    pub master_addr: Address,
    pub admin_addr: Address,
    pub storage_addrs: Vec<Address>,
    master: Option<Running>,
    admin: Option<Running>,
    storages: Vec<Option<Running>>,
    /// `database` of each storage.
    databases: Vec<String>,
    /// MySQL databases to drop at the end (after the nodes).
    mysql: Vec<neo_storage::testing::TestDatabase>,
}

async fn bind(addr: &Address) -> TcpListener {
    // The port of a stopped node may take a moment to be free again.
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind((addr.host.as_str(), addr.port)).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot bind {addr}");
}

fn local(l: &TcpListener) -> Address {
    Address { host: "127.0.0.1".into(), port: l.local_addr().unwrap().port() }
}

impl Cluster {
    /// Start master, storages and admin, and wait until the cluster is RUNNING.
    pub async fn start(opts: Options) -> Cluster {
        Self::try_start(opts).await.expect("no MySQL server for a MySQL cluster")
    }

    /// Like `start`, but None (the test is skipped) if the cluster needs MySQL and no server is
    /// reachable while NEO_TEST_MYSQL is unset.
    pub async fn try_start(opts: Options) -> Option<Cluster> {
        init_logs();
        let dir = tempfile::Builder::new().prefix("neo-test-").tempdir().unwrap();
        let mut mysql = Vec::new();
        let mut databases = Vec::new();
        for i in 0..opts.storages {
            let on_mysql = match opts.backends {
                Backends::Sqlite => false,
                Backends::Mysql => true,
                Backends::Mixed => i > 0,
            };
            if on_mysql {
                let db = neo_storage::testing::TestDatabase::new().unwrap()?;
                databases.push(db.url.clone());
                mysql.push(db);
            } else {
                databases.push(dir.path().join(format!("storage{}.sqlite", i + 1)).display().to_string());
            }
        }
        let (node_tls, client_tls) = if opts.tls {
            let ca = TestCa::new(dir.path(), "ca").unwrap();
            (Some(ca.issue("node").unwrap()), Some(ca.issue("client").unwrap()))
        } else {
            (None, None)
        };
        let any = Address { host: "127.0.0.1".into(), port: 0 };
        let ml = bind(&any).await;
        let al = bind(&any).await;
        let mut sls = Vec::new();
        for _ in 0..opts.storages {
            sls.push(bind(&any).await);
        }
        let mut c = Cluster {
            name: format!("test-{}", fastrand::u32(..)),
            master_addr: local(&ml),
            admin_addr: local(&al),
            storage_addrs: sls.iter().map(local).collect(),
            storages: (0..opts.storages).map(|_| None).collect(),
            dir,
            opts,
            node_tls,
            client_tls,
            master: None,
            admin: None,
            databases,
            mysql,
        };
        c.spawn_master(ml);
        for (i, l) in sls.into_iter().enumerate() {
            c.spawn_storage(i, l);
        }
        c.spawn_admin(al);
        if c.opts.autostart {
            c.wait_state(ClusterState::Running).await;
        } else {
            c.wait_state(ClusterState::Recovering).await;
        }
        Some(c)
    }

    fn values(&self, extra: &[(&str, String)]) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("cluster".to_string(), self.name.clone());
        m.insert("masters".to_string(), self.master_addr.to_string());
        m.insert("partitions".to_string(), self.opts.partitions.to_string());
        m.insert("replicas".to_string(), self.opts.replicas.to_string());
        if let Some(t) = &self.node_tls {
            m.insert("ca".into(), t.ca.display().to_string());
            m.insert("cert".into(), t.cert.display().to_string());
            m.insert("key".into(), t.key.display().to_string());
        }
        for (k, v) in extra {
            m.insert(k.to_string(), v.clone());
        }
        m
    }

    fn config(&self, t: NodeType, extra: &[(&str, String)]) -> NodeConfig {
        NodeConfig::from_values(&self.values(extra), t, "test").unwrap()
    }

    fn spawn_master(&mut self, l: TcpListener) {
        let mut extra = vec![("bind", self.master_addr.to_string())];
        if self.opts.autostart {
            extra.push(("autostart", self.opts.storages.to_string()));
        }
        extra.push(("database", self.dir.path().join("master.state").display().to_string()));
        let cfg = self.config(NodeType::Master, &extra);
        let token = CancellationToken::new();
        let t = token.clone();
        let join =
            tokio::spawn(async move { neo_master::run_with_listener(cfg, l, t).await.map_err(|e| e.to_string()) });
        self.master = Some(Running { token, join });
    }

    /// Kill the MySQL connections of every MySQL storage (as a server restart would); returns
    /// how many were killed.
    pub fn kill_mysql_connections(&self) -> usize {
        self.mysql.iter().map(|db| neo_storage::testing::kill_connections(&db.server, &db.name).unwrap()).sum()
    }

    /// The `database` value of storage `i` (a SQLite path or a MySQL URL).
    pub fn storage_db(&self, i: usize) -> &str {
        &self.databases[i]
    }

    /// Run `f` on the database of storage `i`, opened directly (while the storage is stopped)
    /// on a thread of its own (a backend may not run inside the async runtime): to set up what
    /// a crash would leave behind, or look at it.
    pub fn with_storage_db<R: Send>(
        &self,
        i: usize,
        f: impl FnOnce(&mut dyn neo_storage::backend::Backend) -> R + Send,
    ) -> R {
        let cfg = self.config(
            NodeType::Storage,
            &[("bind", self.storage_addrs[i].to_string()), ("database", self.storage_db(i).to_string())],
        );
        std::thread::scope(|s| s.spawn(move || f(neo_storage::open_backend(&cfg).unwrap().as_mut())).join().unwrap())
    }

    /// A new storage (same engine as the last one), started: it is PENDING until `neoctl add`.
    /// Returns its index.
    pub async fn add_storage(&mut self) -> usize {
        let i = self.storages.len();
        let on_mysql = self.databases.last().is_some_and(|d| d.starts_with("mysql://"));
        if on_mysql {
            let db = neo_storage::testing::TestDatabase::new().unwrap().expect("a MySQL server");
            self.databases.push(db.url.clone());
            self.mysql.push(db);
        } else {
            self.databases.push(self.dir.path().join(format!("storage{}.sqlite", i + 1)).display().to_string());
        }
        let l = bind(&Address { host: "127.0.0.1".into(), port: 0 }).await;
        self.storage_addrs.push(local(&l));
        self.storages.push(None);
        self.spawn_storage(i, l);
        i
    }

    fn spawn_storage(&mut self, i: usize, l: TcpListener) {
        let cfg = self.config(
            NodeType::Storage,
            &[("bind", self.storage_addrs[i].to_string()), ("database", self.storage_db(i).to_string())],
        );
        let token = CancellationToken::new();
        let t = token.clone();
        let join =
            tokio::spawn(async move { neo_storage::run_with_listener(cfg, l, t).await.map_err(|e| e.to_string()) });
        self.storages[i] = Some(Running { token, join });
    }

    fn spawn_admin(&mut self, l: TcpListener) {
        let cfg = self.config(NodeType::Admin, &[("bind", self.admin_addr.to_string())]);
        let token = CancellationToken::new();
        let t = token.clone();
        let join =
            tokio::spawn(async move { neo_admin::run_with_listener(cfg, l, t).await.map_err(|e| e.to_string()) });
        self.admin = Some(Running { token, join });
    }

    /// Connection settings of a client or neoctl of this cluster.
    pub fn net(&self) -> NetConfig {
        NetConfig {
            tls: self.client_tls.as_ref().map(|f| proto::tls::TlsContext::load(f).unwrap()),
            max_frame: neo_lib::DEFAULT_MAX_FRAME,
        }
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new(vec![self.master_addr.clone()], self.name.clone());
        cfg.tls = self.client_tls.clone();
        cfg.connect_timeout = Duration::from_secs(30);
        cfg
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.client_config()).await.unwrap()
    }

    /// Ask the admin node, as neoctl does.
    pub async fn admin_ask(&self, body: impl Into<Body>) -> Result<Body, proto::LinkError> {
        let (link, _incoming) = proto::net::connect(&self.admin_addr, &self.net())
            .await
            .map_err(|e| proto::LinkError::Closed(e.to_string()))?;
        let r = link.ask(body).await;
        link.close().await;
        r
    }

    /// The cell states of the partition table, as the admin reports them.
    pub async fn cell_states(&self) -> Vec<neo_lib::CellState> {
        let b = self.admin_ask(msg::AskPartitionList { min_offset: 0, max_offset: 0, nid: None }).await.unwrap();
        let pt = proto::convert::pt_from_msg(&expect_answer!(b, AnswerPartitionList).unwrap()).unwrap();
        pt.rows().iter().flatten().map(|c| c.state).collect()
    }

    pub async fn cluster_state(&self) -> Option<ClusterState> {
        let b = self.admin_ask(msg::AskClusterState {}).await.ok()?;
        expect_answer!(b, AnswerClusterState).ok().and_then(|a| ClusterState::from_i32(a.state))
    }

    /// Wait (up to 30 s) until the admin reports `state`.
    pub async fn wait_state(&self, state: ClusterState) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.cluster_state().await == Some(state) {
                return;
            }
            assert!(Instant::now() < deadline, "cluster did not reach {state} (now {:?})", self.cluster_state().await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop a storage node (as SIGTERM does).
    pub async fn stop_storage(&mut self, i: usize) {
        if let Some(r) = self.storages[i].take() {
            r.stop().await.unwrap();
        }
    }

    /// Wait (up to 20 s) for storage `i` to exit by itself; its result (Err: why it failed).
    pub async fn wait_storage_exit(&mut self, i: usize) -> Result<(), String> {
        let Some(r) = self.storages[i].take() else { return Err(format!("storage {i} is not running")) };
        match tokio::time::timeout(Duration::from_secs(20), r.join).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(format!("node task failed: {e}")),
            Err(_) => panic!("storage {i} did not exit in 20 s"),
        }
    }

    pub async fn start_storage(&mut self, i: usize) {
        let l = bind(&self.storage_addrs[i]).await;
        self.spawn_storage(i, l);
    }

    /// Start the master again (after a stop), on its port.
    pub async fn start_master(&mut self) {
        let ml = bind(&self.master_addr).await;
        self.spawn_master(ml);
    }

    /// Start the admin again (after a stop), on its port.
    pub async fn start_admin(&mut self) {
        let al = bind(&self.admin_addr).await;
        self.spawn_admin(al);
    }

    /// Stop every node (SIGTERM-like), then start them all again on the same ports and
    /// databases and wait until the cluster is RUNNING.
    pub async fn restart(&mut self) {
        self.stop_all().await;
        self.start_master().await;
        for i in 0..self.storages.len() {
            self.start_storage(i).await;
        }
        self.start_admin().await;
        self.wait_state(ClusterState::Running).await;
    }

    /// Stop the master (as SIGTERM does).
    pub async fn stop_master(&mut self) {
        if let Some(m) = self.master.take() {
            m.stop().await.unwrap();
        }
    }

    /// Stop the master and start it again on the same port; the storages reconnect and the
    /// cluster goes through recovery and verification again.
    pub async fn restart_master(&mut self) {
        if let Some(m) = self.master.take() {
            m.stop().await.unwrap();
        }
        self.start_master().await;
        self.wait_state(ClusterState::Running).await;
    }

    /// Stop every node, the master first (so that it does not outdate the cells of storages
    /// that stop after it decided anything).
    pub async fn stop_all(&mut self) {
        if let Some(m) = self.master.take() {
            m.stop().await.unwrap();
        }
        for i in 0..self.storages.len() {
            self.stop_storage(i).await;
        }
        if let Some(a) = self.admin.take() {
            a.stop().await.unwrap();
        }
    }

    /// Wait (up to 20 s) for every node to exit by itself (after `set cluster STOPPING`).
    pub async fn wait_all_exited(&mut self) -> Result<(), String> {
        let mut nodes: Vec<Running> = Vec::new();
        nodes.extend(self.master.take());
        nodes.extend(self.admin.take());
        nodes.extend(self.storages.iter_mut().filter_map(Option::take));
        for n in nodes {
            match tokio::time::timeout(Duration::from_secs(20), n.join).await {
                Ok(Ok(r)) => r?,
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("a node did not exit".into()),
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let nodes = self.master.iter().chain(self.admin.iter()).chain(self.storages.iter().flatten());
        for n in nodes {
            n.token.cancel();
        }
        if !self.mysql.is_empty() {
            // Let the storages close their connections before the databases are dropped.
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}
