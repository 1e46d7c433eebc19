//! neostorage: stores object revisions for the partitions the primary master assigns to it,
//! takes write locks and detects conflicts during commit, and serves reads. The backend runs on
//! a dedicated database thread (`db`); `tm` holds in-memory transaction state and locks; `app`
//! has the master session and the client handlers.

mod app;
pub mod backend;
pub mod db;
pub mod testing;
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
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("stopped: {0}")]
    Fatal(String),
}

/// Which engine a `database` value names.
#[derive(Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite(std::path::PathBuf),
    /// A `mysql://` URL (with the password, if any: do not log it).
    Mysql(String),
}

/// Choose the engine: `adapter` if given (SQLite or MySQL); otherwise a `mysql://` URL or NEO's
/// `user[:password]@database[socket]` form means MySQL, anything else is a SQLite file path.
pub fn engine(database: &str, adapter: Option<&str>) -> Result<Engine, StorageError> {
    let bad = |msg: String| StorageError::Config(format!("database: {msg}"));
    let mysql = match adapter.map(str::to_ascii_lowercase).as_deref() {
        Some("mysql") => true,
        Some("sqlite") => false,
        Some(other) => {
            return Err(StorageError::Config(format!("adapter: unknown adapter {other:?} (SQLite or MySQL)")));
        }
        None => database.starts_with("mysql://") || database.contains('@'),
    };
    if mysql {
        backend::mysql::parse_database(database).map(Engine::Mysql).map_err(bad)
    } else if database.is_empty() {
        Err(bad("empty SQLite path".into()))
    } else {
        Ok(Engine::Sqlite(database.into()))
    }
}

/// Open the backend named by the configuration. Blocking: call it on the database thread.
pub fn open_backend(cfg: &NodeConfig) -> Result<Box<dyn Backend>, StorageError> {
    let database = cfg.database.clone().ok_or_else(|| StorageError::Config("no database given".into()))?;
    let engine = engine(&database, cfg.adapter.as_deref())?;
    let display = match &engine {
        Engine::Sqlite(p) => p.display().to_string(),
        Engine::Mysql(url) => backend::mysql::redact_database(url),
    };
    let opened: Result<Box<dyn Backend>, BackendError> = match &engine {
        Engine::Sqlite(path) => backend::sqlite::SqliteBackend::open(path, &cfg.cluster).map(|b| Box::new(b) as _),
        Engine::Mysql(url) => backend::mysql::MysqlBackend::open(url, &cfg.cluster).map(|b| Box::new(b) as _),
    };
    opened.map_err(|err| StorageError::Open { database: display, err })
}

/// A read-only connection of its own to the database of `cfg`, for a thread that serves
/// loads (`app::reads`): SQLite files only (None otherwise: loads go through the database
/// thread). Blocking.
pub fn open_reader(cfg: &NodeConfig) -> Option<Result<Box<dyn Backend>, BackendError>> {
    let database = cfg.database.as_deref()?;
    match engine(database, cfg.adapter.as_deref()).ok()? {
        Engine::Sqlite(path) if path != std::path::Path::new(":memory:") => {
            Some(backend::sqlite::SqliteBackend::open_reader(&path).map(|b| Box::new(b) as _))
        }
        _ => None,
    }
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
    let db = db::Db::open(move || open_backend(&cfg2)).await?;
    app::run(cfg, net, db, listener, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_from_database_value() {
        assert_eq!(engine("/var/lib/neo/s1.sqlite", None).unwrap(), Engine::Sqlite("/var/lib/neo/s1.sqlite".into()));
        assert!(matches!(engine("mysql://root@127.0.0.1:3306/neo", None).unwrap(), Engine::Mysql(_)));
        assert!(matches!(engine("neo:secret@neo1", None).unwrap(), Engine::Mysql(_)));
        assert!(matches!(engine("neo1", Some("MySQL")).unwrap(), Engine::Mysql(_)));
        assert_eq!(engine("a@b", Some("SQLite")).unwrap(), Engine::Sqlite("a@b".into()));
        let e = engine("x", Some("Oracle")).unwrap_err().to_string();
        assert!(e.contains("adapter"), "{e}");
        assert!(engine("mysql://", None).is_err());
        use backend::mysql::redact_database as redact;
        assert_eq!(redact("mysql://neo:secret@host:3306/db"), "mysql://neo:***@host:3306/db");
        assert_eq!(redact("mysql://root@host/db"), "mysql://root@host/db");
        // Invalid ones too, and NEO's form (whose socket path may hold '@').
        assert_eq!(redact("mysql://root:se%c@ret@host/db?x=1"), "mysql://root:***@host/db?x=1");
        assert_eq!(redact("neo:secret@neo1/run/a@/mysql.sock"), "neo:***@neo1/run/a@/mysql.sock");
        assert_eq!(redact("neo@neo1"), "neo@neo1");
        assert_eq!(redact(":secret@db"), ":***@db");
        assert_eq!(redact("root:secret@"), "root:***@");
        assert_eq!(redact("neo1"), "neo1");
    }
}
