//! The NEO admin node: keeps a copy of the cluster state (node list, partition table, cluster
//! state) received from the primary master, answers neoctl from it and forwards neoctl's
//! commands to the primary master.

pub mod state;

mod ctl;
mod master;

use neo_lib::config::{Address, NodeConfig};
use proto::Link;
use proto::net::NetConfig;
use proto::tls::{TlsContext, TlsError};
use state::{ClusterView, Primary};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// How long connections get to close at shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Fatal errors of the admin node.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {err}")]
    Listen { addr: String, err: std::io::Error },
    #[error("no master address configured")]
    NoMasters,
}

/// State shared by the master link and the neoctl connections.
#[derive(Default)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
}

#[derive(Default)]
pub(crate) struct Inner {
    pub view: ClusterView,
    /// Link to the primary master, when connected.
    pub master: Option<(Link, Primary)>,
}

impl Shared {
    /// Lock for a short, non-async section (never held across `.await`).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn connected(&self, link: Link, primary: Primary) {
        self.lock().master = Some((link, primary));
    }

    /// The primary master was lost: forget everything it told.
    pub(crate) fn disconnected(&self) {
        let mut g = self.lock();
        g.master = None;
        g.view.clear();
    }
}

/// Connection settings from the node configuration (loads the TLS files if configured).
fn net_config(cfg: &NodeConfig) -> Result<NetConfig, AdminError> {
    let tls = match &cfg.tls {
        Some(files) => Some(TlsContext::load(files)?),
        None => None,
    };
    Ok(NetConfig { tls, max_frame: neo_lib::DEFAULT_MAX_FRAME })
}

/// Run the admin node: listen on `cfg.bind` and serve until `shutdown` is cancelled or the
/// cluster stops.
pub async fn run(cfg: NodeConfig, shutdown: CancellationToken) -> Result<(), AdminError> {
    let listener =
        proto::net::listen(&cfg.bind).await.map_err(|err| AdminError::Listen { addr: cfg.bind.to_string(), err })?;
    run_with_listener(cfg, listener, shutdown).await
}

/// Run the admin node on an already bound listener (tests bind port 0 first).
pub async fn run_with_listener(
    cfg: NodeConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    let net = net_config(&cfg)?;
    if cfg.masters.is_empty() {
        return Err(AdminError::NoMasters);
    }
    let local = listener.local_addr().map_err(|err| AdminError::Listen { addr: cfg.bind.to_string(), err })?;
    let listen_addr = Address { host: local.ip().to_string(), port: local.port() };
    info!(
        "admin listening on {listen_addr}{} (cluster {:?})",
        if net.tls.is_some() { " with TLS" } else { "" },
        cfg.cluster
    );

    let stop = shutdown.child_token();
    let shared = Arc::new(Shared::default());
    let tracker = TaskTracker::new();
    let mc = master::MasterConfig {
        cluster: cfg.cluster.clone(),
        masters: cfg.masters.clone(),
        net: net.clone(),
        listen_addr,
    };
    tracker.spawn(master::run(shared.clone(), mc, stop.clone()));

    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    debug!("connection from {peer}");
                    tracker.spawn(ctl::serve(shared.clone(), tcp, net.clone(), stop.clone()));
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    // Avoid spinning on e.g. too many open files.
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            },
        }
    }
    drop(listener);
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(CLOSE_TIMEOUT, tracker.wait()).await.is_err() {
        warn!("some connections did not close in time");
    }
    if let Some((link, _)) = shared.lock().master.take() {
        link.abort();
    }
    info!("admin stopped");
    Ok(())
}
