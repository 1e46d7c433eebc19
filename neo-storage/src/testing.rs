//! Test support: a private database on the MySQL/MariaDB server named by `NEO_TEST_MYSQL`
//! (default `mysql://root@127.0.0.1:3306`), dropped when the value is dropped. Without the
//! variable, an unreachable server makes `TestDatabase::new` return None after saying why on
//! stderr (the test is skipped); with it, it is an error.

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder};
use std::time::Duration;

pub const DEFAULT_SERVER: &str = "mysql://root@127.0.0.1:3306";

/// Connection options of `server` (an error names it without its password).
fn server_opts(server: &str) -> Result<Opts, String> {
    Opts::from_url(server).map_err(|e| format!("invalid URL {:?}: {e}", crate::backend::mysql::redact_database(server)))
}

/// Run `sql` on `server` (in `database` if given), from a thread of its own.
pub fn server_sql(server: &str, database: Option<&str>, sql: &str) -> Result<(), String> {
    let (server, database, sql) = (server.to_string(), database.map(str::to_string), sql.to_string());
    std::thread::spawn(move || {
        let opts = server_opts(&server)?;
        let opts: Opts = OptsBuilder::from_opts(opts).db_name(database).into();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(async {
            let mut c = tokio::time::timeout(Duration::from_secs(10), Conn::new(opts))
                .await
                .map_err(|_| "connection timed out".to_string())?
                .map_err(|e| e.to_string())?;
            let r = c.query_drop(sql).await.map_err(|e| e.to_string());
            let _ = c.disconnect().await;
            r
        })
    })
    .join()
    .map_err(|_| "the SQL thread failed".to_string())?
}

/// `KILL` every connection using database `database` on `server` (as if the server had
/// dropped them); returns how many were killed.
pub fn kill_connections(server: &str, database: &str) -> Result<usize, String> {
    let (server, database) = (server.to_string(), database.to_string());
    std::thread::spawn(move || {
        let opts = server_opts(&server)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(async {
            let mut c = Conn::new(opts).await.map_err(|e| e.to_string())?;
            let ids: Vec<u64> = c
                .exec("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = ?", (database,))
                .await
                .map_err(|e| e.to_string())?;
            let mut n = 0;
            for id in ids {
                if c.query_drop(format!("KILL {id}")).await.is_ok() {
                    n += 1;
                }
            }
            let _ = c.disconnect().await;
            Ok(n)
        })
    })
    .join()
    .map_err(|_| "the SQL thread failed".to_string())?
}

/// A database of its own on the test server.
pub struct TestDatabase {
    pub server: String,
    pub name: String,
    /// `mysql://…/name`: a storage's `database` value.
    pub url: String,
}

impl TestDatabase {
    pub fn new() -> Result<Option<TestDatabase>, String> {
        let (server, required) = match std::env::var("NEO_TEST_MYSQL") {
            Ok(s) => (s, true),
            Err(_) => (DEFAULT_SERVER.to_string(), false),
        };
        if let Err(e) = server_sql(&server, None, "SELECT 1") {
            let shown = crate::backend::mysql::redact_database(&server);
            if required {
                return Err(format!("NEO_TEST_MYSQL={shown}: {e}"));
            }
            eprintln!("MySQL tests skipped: {shown}: {e}");
            return Ok(None);
        }
        let name = format!("neo_it_{}", fastrand::u64(..));
        let base = server.split('?').next().unwrap_or(&server).trim_end_matches('/');
        let base = match base.strip_prefix("mysql://").and_then(|rest| rest.find('/')) {
            Some(i) => &base[..i + "mysql://".len()],
            None => base,
        };
        let url = format!("{base}/{name}");
        Ok(Some(TestDatabase { server, name, url }))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let sql = format!("SET SESSION lock_wait_timeout = 10; DROP DATABASE IF EXISTS `{}`", self.name);
        let _ = server_sql(&self.server, None, &sql);
    }
}
