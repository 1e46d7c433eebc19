//! neomaster: the primary master. It registers nodes, owns the partition table, drives the
//! cluster states (RECOVERING → VERIFYING → RUNNING → STOPPING), allocates OIDs and TIDs and
//! coordinates two-phase commit. All state lives in one actor task (`app::Master`) fed by one
//! pump task per connection, so handlers are plain functions on `&mut Master`.

mod admin;
mod app;
mod recovery;
mod replication;
pub mod state;
mod transactions;

use neo_lib::config::NodeConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("cannot listen on {addr}: {err}")]
    Listen { addr: String, err: std::io::Error },
    #[error("TLS: {0}")]
    Tls(#[from] proto::tls::TlsError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Fatal(String),
    #[error("master state: {0}")]
    State(#[from] state::StateError),
}

/// Run a master until `shutdown` is cancelled or the cluster is stopped.
pub async fn run(cfg: NodeConfig, shutdown: CancellationToken) -> Result<(), MasterError> {
    let listener =
        proto::net::listen(&cfg.bind).await.map_err(|err| MasterError::Listen { addr: cfg.bind.to_string(), err })?;
    run_with_listener(cfg, listener, shutdown).await
}

/// Same as `run` with an already bound listener (tests bind port 0 first).
pub async fn run_with_listener(
    cfg: NodeConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), MasterError> {
    app::Master::start(cfg, listener, shutdown).await
}
