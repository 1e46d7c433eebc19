//! neostorage: stores object revisions for the partitions the primary master assigns to it,
//! takes write locks and detects conflicts during commit, and serves reads. The backend runs on
//! a dedicated database thread (`db`); `tm` holds in-memory transaction state and locks; `app`
//! has the master session and the client handlers.

mod app;
pub mod backend;
pub mod db;
pub mod tm;

pub use app::sha1;
use backend::{Backend, BackendError};
use neo_lib::config::NodeConfig;
use proto::net::NetConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot listen on {addr}: {err}")]
    Listen { addr: String, err: std::io::Error },
    #[error("TLS: {0}")]
    Tls(#[from] proto::tls::TlsError),
    #[error("database {database}: {err}")]
    Open { database: String, err: BackendError },
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("{0}")]
    DbClosed(#[from] db::DbClosed),
    #[error("protocol error from the master: {0}")]
    Protocol(String),
    #[error("configuration: {0}")]
    Config(String),
}

/// Open the backend named by the configuration (SQLite: `database` is a file path).
pub fn open_backend(cfg: &NodeConfig) -> Result<Box<dyn Backend>, StorageError> {
    let database = cfg.database.clone().ok_or_else(|| StorageError::Config("no database given".into()))?;
    let b = backend::sqlite::SqliteBackend::open(std::path::Path::new(&database), &cfg.cluster)
        .map_err(|err| StorageError::Open { database, err })?;
    Ok(Box::new(b))
}

/// Run a storage node until `shutdown` is cancelled or the cluster stops.
pub async fn run(cfg: NodeConfig, shutdown: CancellationToken) -> Result<(), StorageError> {
    let listener =
        proto::net::listen(&cfg.bind).await.map_err(|err| StorageError::Listen { addr: cfg.bind.to_string(), err })?;
    run_with_listener(cfg, listener, shutdown).await
}

/// Same as `run` with an already bound listener.
pub async fn run_with_listener(
    cfg: NodeConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StorageError> {
    let net = NetConfig {
        tls: cfg.tls.as_ref().map(proto::tls::TlsContext::load).transpose()?,
        max_frame: neo_lib::DEFAULT_MAX_FRAME,
    };
    let cfg2 = cfg.clone();
    let backend = tokio::task::spawn_blocking(move || open_backend(&cfg2))
        .await
        .map_err(|e| StorageError::Config(format!("cannot open the database: {e}")))??;
    let db =
        db::Db::spawn(backend).map_err(|e| StorageError::Config(format!("cannot start the database thread: {e}")))?;
    app::run(cfg, net, db, listener, shutdown).await
}
