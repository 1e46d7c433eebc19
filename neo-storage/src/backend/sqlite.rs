//! SQLite backend: one database file per storage node (`:memory:` for tests).
//!
//! Layout (every id is an INTEGER holding the `as i64` bit cast of its u64; TIDs fit in i64):
//! - `config(name, value)`: key/value settings (`version`, `name`, `nid`, `ptid`, ...);
//! - `pt(partition, nid, state)`: the partition table, plus config keys `ptid`, `replicas` and
//!   `partitions` so that a table whose rows are all empty round-trips;
//! - `trans` / `obj`: committed transaction metadata and object revisions;
//! - `data`: record payloads, deduplicated by the unique index on (hash, compression);
//! - `ttrans` / `tobj`: voted (temporary) transactions and objects keyed by ttid, moved to
//!   `trans` / `obj` by `unlock`.
//!
//! Durability: the connection runs with `synchronous=NORMAL` in WAL mode (commits append to the
//! log without fsync); `sync` fdatasyncs the log, making every commit so far durable.
//! `set_config`, `save_pt`, `drop_unfinished`, `pack`, `set_replication_progress` and
//! `purge_partition` sync themselves; `vote`, `vote_data`, `lock` and `store_replicated` rely on
//! the caller's `sync` (group commit, done for locks: the log is appended in
//! order, so syncing a lock also makes the votes before it durable); `unlock` is never synced: the next
//! verification replays it from the durable `lock` if a crash loses it.
//!
//! Replication keeps the progress of each partition in the `config` row
//! `replication.<partition>`, written by `store_replicated` with the rows it describes.

use super::common::{
    CHECKSUM_LEN, FetchBudget, HeldData, Revision, UndoRevisions, check_data_args, check_replicated, compression_of,
    corrupt, decode_oids, decode_partitions, decode_progress, distinct_partitions, encode_oids, encode_partitions,
    encode_progress, id64, merge_tids, object_range, packed_of, partition_list, progress_key, size_of, stored_checksum,
    tid_of, tid_range, tid_upper, undo_current_max, window_end,
};
use super::{
    Backend, BackendError, DataId, Load, LockedTxn, NewData, NewObject, ObjectRecord, ReplObject, ReplProgress, Result,
    TempObject, TxnInfo, TxnMeta, UndoInfo,
};
use neo_lib::pt::{Cell, PartitionTable};
use neo_lib::{CellState, Nid, Oid, Ptid, Tid};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, Row, params};
use std::path::Path;
use std::time::Duration;

/// Current schema version: the number of `MIGRATIONS` a database has applied.
pub const SCHEMA_VERSION: u32 = 2;

/// Schema migrations in order: a database at version N has applied the first N entries. A new
/// schema version appends an entry (and bumps `SCHEMA_VERSION`); entries are never edited.
const MIGRATIONS: &[&str] = &[
    // Version 1: initial schema.
    "CREATE TABLE config (
        name TEXT PRIMARY KEY,
        value TEXT
    ) WITHOUT ROWID;
    CREATE TABLE pt (
        partition INTEGER NOT NULL,
        nid INTEGER NOT NULL,
        state INTEGER NOT NULL,
        PRIMARY KEY (partition, nid)
    ) WITHOUT ROWID;
    CREATE TABLE trans (
        partition INTEGER NOT NULL,
        tid INTEGER NOT NULL,
        packed INTEGER NOT NULL,
        oids BLOB NOT NULL,
        user BLOB NOT NULL,
        description BLOB NOT NULL,
        ext BLOB NOT NULL,
        ttid INTEGER NOT NULL,
        PRIMARY KEY (partition, tid)
    ) WITHOUT ROWID;
    CREATE INDEX trans_ttid ON trans (ttid);
    CREATE TABLE obj (
        partition INTEGER NOT NULL,
        oid INTEGER NOT NULL,
        tid INTEGER NOT NULL,
        data_id INTEGER NULL,
        value_tid INTEGER NULL,
        PRIMARY KEY (partition, oid, tid)
    ) WITHOUT ROWID;
    CREATE INDEX obj_partition_tid_oid ON obj (partition, tid, oid);
    CREATE INDEX obj_data_id ON obj (data_id);
    CREATE TABLE data (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        hash BLOB NOT NULL,
        compression INTEGER NOT NULL,
        value BLOB NOT NULL
    );
    CREATE UNIQUE INDEX data_hash_compression ON data (hash, compression);
    CREATE TABLE ttrans (
        ttid INTEGER PRIMARY KEY,
        partition INTEGER NULL,
        tid INTEGER NULL,
        meta INTEGER NOT NULL,
        oids BLOB,
        user BLOB,
        description BLOB,
        ext BLOB
    );
    CREATE TABLE tobj (
        partition INTEGER NOT NULL,
        oid INTEGER NOT NULL,
        tid INTEGER NOT NULL,
        data_id INTEGER NULL,
        value_tid INTEGER NULL,
        PRIMARY KEY (tid, oid)
    ) WITHOUT ROWID;",
    // Version 2: the partitions a lock covers (verification checks every readable cell of
    // them holds the transaction).
    "ALTER TABLE ttrans ADD COLUMN lock_partitions BLOB NULL;",
];

const _: () = assert!(MIGRATIONS.len() == SCHEMA_VERSION as usize);

/// Log pages (about 13 per commit) between two automatic checkpoints: a log of up to 16 MiB.
const WAL_CHECKPOINT_PAGES: u32 = 4000;

/// How long a statement waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(3);

/// Map a driver error (the trait knows no driver, so no `From` impl).
fn db(e: rusqlite::Error) -> BackendError {
    BackendError::Db(e.to_string())
}

// --- column readers: validate what the database returns instead of trusting it. `what` names
// the row for error messages; it is only evaluated on error.

fn col_opt_int(row: &Row<'_>, idx: usize, col: &str, what: &dyn Fn() -> String) -> Result<Option<i64>> {
    match row.get_ref(idx).map_err(db)? {
        ValueRef::Null => Ok(None),
        ValueRef::Integer(v) => Ok(Some(v)),
        other => {
            Err(corrupt(format!("{}: column {col} holds a {} value, expected an integer", what(), other.data_type())))
        }
    }
}

fn col_int(row: &Row<'_>, idx: usize, col: &str, what: &dyn Fn() -> String) -> Result<i64> {
    col_opt_int(row, idx, col, what)?.ok_or_else(|| corrupt(format!("{}: column {col} is NULL", what())))
}

fn col_opt_tid(row: &Row<'_>, idx: usize, col: &str, what: &dyn Fn() -> String) -> Result<Option<Tid>> {
    col_opt_int(row, idx, col, what)?.map(|v| tid_of(v, col, what)).transpose()
}

fn col_tid(row: &Row<'_>, idx: usize, col: &str, what: &dyn Fn() -> String) -> Result<Tid> {
    tid_of(col_int(row, idx, col, what)?, col, what)
}

/// A BLOB column; with `lenient`, TEXT is taken as bytes and NULL as empty (metadata columns).
fn col_blob(row: &Row<'_>, idx: usize, col: &str, lenient: bool, what: &dyn Fn() -> String) -> Result<Vec<u8>> {
    match row.get_ref(idx).map_err(db)? {
        ValueRef::Blob(b) => Ok(b.to_vec()),
        ValueRef::Text(t) if lenient => Ok(t.to_vec()),
        ValueRef::Null if lenient => Ok(Vec::new()),
        other => Err(corrupt(format!("{}: column {col} holds a {} value, expected a blob", what(), other.data_type()))),
    }
}

/// Start writing the dirty pages of the file at `path` to disk, without waiting for the writes
/// and without flushing the disk's cache (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). Opened by
/// name, as `sync_wal` does.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn start_writeback_of(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    // SAFETY: a system call on a descriptor that `f` keeps open; no memory is passed.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Elsewhere there is no such call: the lock's sync writes everything.
#[cfg(not(target_os = "linux"))]
fn start_writeback_of(_: &Path) -> std::io::Result<()> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "sync_file_range is Linux's"))
}

/// The SQLite storage backend. Not shared between threads: the node's database thread owns it.
pub struct SqliteBackend {
    conn: Connection,
    /// The write-ahead log, fsynced after the commits that must be durable (None in memory).
    wal: Option<std::path::PathBuf>,
    /// Data rows handed out by `store_data` and not voted yet (see `HeldData`).
    held: HeldData,
    /// The lock file that makes this process the owner of the database (None in memory, for
    /// tests' shared opens and for readers).
    _owner: Option<std::fs::File>,
    /// A vote or an unlock was committed since the last sync or write-back (`start_writeback`).
    writeback_due: bool,
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend").field("path", &self.conn.path()).field("held", &self.held.len()).finish()
    }
}

impl SqliteBackend {
    /// Make every commit so far durable: fdatasync the write-ahead log (SQLite appends
    /// commits to it; with `synchronous=NORMAL` it only syncs it at checkpoints).
    fn sync_wal(&self) -> Result<()> {
        if let Some(wal) = &self.wal {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(wal)
                .map_err(|e| BackendError::Db(format!("{}: {e}", wal.display())))?;
            f.sync_data().map_err(|e| BackendError::Db(format!("fsync {}: {e}", wal.display())))?;
        }
        Ok(())
    }

    fn unlock_rows(&mut self, ttid: Tid, tid: Tid) -> Result<()> {
        let (ttid64, tid64) = (id64(ttid.0), id64(tid.0));
        let tx = self.conn.savepoint().map_err(db)?;
        tx.prepare_cached(
            "INSERT OR REPLACE INTO obj (partition, oid, tid, data_id, value_tid)
             SELECT partition, oid, ?2, data_id, value_tid FROM tobj WHERE tid = ?1",
        )
        .map_err(db)?
        .execute([ttid64, tid64])
        .map_err(db)?;
        tx.prepare_cached(
            "INSERT OR REPLACE INTO trans (partition, tid, packed, oids, user, description, ext, ttid)
             SELECT partition, ?2, 0, COALESCE(oids, X''), COALESCE(user, X''),
                    COALESCE(description, X''), COALESCE(ext, X''), ttid
             FROM ttrans WHERE ttid = ?1 AND meta = 1",
        )
        .map_err(db)?
        .execute([ttid64, tid64])
        .map_err(db)?;
        tx.prepare_cached("DELETE FROM tobj WHERE tid = ?1").map_err(db)?.execute([ttid64]).map_err(db)?;
        tx.prepare_cached("DELETE FROM ttrans WHERE ttid = ?1").map_err(db)?.execute([ttid64]).map_err(db)?;
        tx.commit().map_err(db)
    }

    fn abort_rows(&mut self, ttid: Tid) -> Result<()> {
        let ttid64 = id64(ttid.0);
        let tx = self.conn.savepoint().map_err(db)?;
        let mut candidates = self.held.released();
        {
            let mut stmt = tx
                .prepare_cached("SELECT DISTINCT data_id FROM tobj WHERE tid = ?1 AND data_id IS NOT NULL")
                .map_err(db)?;
            let mut q = stmt.query([ttid64]).map_err(db)?;
            while let Some(row) = q.next().map_err(db)? {
                candidates.push(col_int(row, 0, "data_id", &|| format!("temporary object of {ttid}"))?);
            }
        }
        tx.prepare_cached("DELETE FROM tobj WHERE tid = ?1").map_err(db)?.execute([ttid64]).map_err(db)?;
        tx.prepare_cached("DELETE FROM ttrans WHERE ttid = ?1").map_err(db)?.execute([ttid64]).map_err(db)?;
        Self::prune(&tx, &self.held, candidates)?;
        tx.commit().map_err(db)?;
        self.held.clear_released();
        Ok(())
    }

    /// Open (creating it if needed) the database at `path` (`:memory:` for a private in-memory
    /// database) for cluster `cluster`, upgrading its schema to `SCHEMA_VERSION`.
    pub fn open(path: &Path, cluster: &str) -> Result<SqliteBackend> {
        Self::open_with(path, cluster, true)
    }

    /// Like `open`, without the lock file, so tests can alter the file from another
    /// connection while the backend is open.
    #[cfg(test)]
    pub fn open_shared(path: &Path, cluster: &str) -> Result<SqliteBackend> {
        Self::open_with(path, cluster, false)
    }

    fn open_with(path: &Path, cluster: &str, take_lock: bool) -> Result<SqliteBackend> {
        let memory = path == Path::new(":memory:");
        // One storage process owns the file: a second one on the same file fails (instead of
        // writing beside the first) on the lock of `<path>.lock`, held while the backend is
        // open. SQLite's own locking stays normal, so read connections (`open_reader`) can
        // read while this one writes.
        let owner = if memory || !take_lock { None } else { Some(lock_owner(path)?) };
        let mut conn = if memory { Connection::open_in_memory() } else { Connection::open(path) }.map_err(db)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
        if !memory {
            let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(db)?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(BackendError::Db(format!(
                    "cannot enable WAL journal mode on {} (got {mode})",
                    path.display()
                )));
            }
        }
        // Commits do not fsync by themselves; the ones that must be durable call `sync_wal`.
        // (Switching `synchronous` per commit would expire every prepared statement.)
        // Checkpoints every WAL_CHECKPOINT_PAGES log pages instead of SQLite's 1,000: fewer of
        // them (each copies the pages to the database file and fsyncs both), the pages that
        // every commit rewrites copied once for more commits (see the README's figures).
        conn.execute_batch(&format!(
            "PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=OFF; PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES};"
        ))
        .map_err(db)?;
        conn.set_prepared_statement_cache_capacity(64);
        // The bundled SQLite has STAT4, which re-prepares a statement each time a bound value
        // changes (to re-plan with statistics): that cost about 100 µs per load. Our queries
        // have one good plan; keep it.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map_err(db)?;
        Self::init_schema(&mut conn, cluster)?;
        let wal = if memory { None } else { Some(wal_path(path)) };
        Ok(SqliteBackend { conn, wal, held: HeldData::default(), _owner: owner, writeback_due: false })
    }

    /// A read-only connection to the database of a running storage, for loads on a thread of
    /// their own (each statement reads the last commit). Only reads may be called on it.
    pub fn open_reader(path: &Path) -> Result<SqliteBackend> {
        use rusqlite::OpenFlags;
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags).map_err(db)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
        conn.set_prepared_statement_cache_capacity(16);
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map_err(db)?;
        // One reader per read connection: a small page cache each (the OS caches the file).
        conn.execute_batch("PRAGMA cache_size = -1024").map_err(db)?;
        Ok(SqliteBackend { conn, wal: None, held: HeldData::default(), _owner: None, writeback_due: false })
    }

    /// Create or upgrade the schema and check the cluster name, in one transaction (rolled back
    /// on any error, so a wrong cluster leaves the file untouched).
    fn init_schema(conn: &mut Connection, cluster: &str) -> Result<()> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db)?;
        let has_config: bool = tx
            .query_row("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type='table' AND name='config')", [], |r| {
                r.get(0)
            })
            .map_err(db)?;
        let version = if has_config {
            let v: Option<String> = tx
                .query_row("SELECT value FROM config WHERE name='version'", [], |r| r.get(0))
                .optional()
                .map_err(db)?
                .flatten();
            match v {
                None => 0,
                Some(v) => v.parse::<u32>().map_err(|_| corrupt(format!("config: invalid schema version {v:?}")))?,
            }
        } else {
            0
        };
        if version > SCHEMA_VERSION {
            return Err(BackendError::SchemaTooNew { found: version, supported: SCHEMA_VERSION });
        }
        if version > 0 {
            // Check the cluster before touching anything.
            check_cluster(&tx, cluster)?;
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql)
                .map_err(|e| BackendError::Db(format!("schema migration to version {}: {e}", i + 1)))?;
        }
        if version < SCHEMA_VERSION {
            tx.execute(
                "INSERT OR REPLACE INTO config (name, value) VALUES ('version', ?1)",
                [SCHEMA_VERSION.to_string()],
            )
            .map_err(db)?;
        }
        check_cluster(&tx, cluster)?;
        tx.commit().map_err(db)
    }

    /// Drop one hold on each of `ids` (data stored by a transaction that is aborted before it
    /// voted). Call before `abort`, which then deletes the rows nothing references.
    pub fn release(&mut self, ids: &[DataId]) {
        self.held.release(ids);
    }

    /// Delete the data rows among `ids` that are neither held nor referenced by obj or tobj.
    fn prune(tx: &Connection, held: &HeldData, ids: impl IntoIterator<Item = DataId>) -> Result<()> {
        let mut stmt = tx
            .prepare_cached(
                "DELETE FROM data WHERE id = ?1
                   AND NOT EXISTS (SELECT 1 FROM obj WHERE data_id = ?1)
                   AND NOT EXISTS (SELECT 1 FROM tobj WHERE data_id = ?1)",
            )
            .map_err(db)?;
        for id in ids {
            if !held.is_held(id) {
                stmt.execute([id]).map_err(db)?;
            }
        }
        Ok(())
    }
}

fn check_cluster(conn: &Connection, cluster: &str) -> Result<()> {
    let found: Option<Option<String>> =
        conn.query_row("SELECT value FROM config WHERE name='name'", [], |r| r.get(0)).optional().map_err(db)?;
    match found.flatten() {
        Some(found) if found != cluster => Err(BackendError::WrongCluster { found, expected: cluster.to_string() }),
        Some(_) => Ok(()),
        None => {
            conn.execute("INSERT OR REPLACE INTO config (name, value) VALUES ('name', ?1)", [cluster]).map_err(db)?;
            Ok(())
        }
    }
}

fn config_value(conn: &Connection, key: &str) -> Result<Option<String>> {
    let mut stmt = conn.prepare_cached("SELECT value FROM config WHERE name = ?1").map_err(db)?;
    let mut rows = stmt.query([key]).map_err(db)?;
    let Some(row) = rows.next().map_err(db)? else {
        return Ok(None);
    };
    match row.get_ref(0).map_err(db)? {
        ValueRef::Null => Ok(None),
        ValueRef::Text(t) => {
            String::from_utf8(t.to_vec()).map(Some).map_err(|_| corrupt(format!("config {key:?}: value is not UTF-8")))
        }
        ValueRef::Integer(i) => Ok(Some(i.to_string())),
        other => Err(corrupt(format!("config {key:?}: value holds a {} value", other.data_type()))),
    }
}

fn parse_config<T: std::str::FromStr>(conn: &Connection, key: &str) -> Result<T> {
    let v = config_value(conn, key)?.ok_or_else(|| corrupt(format!("config {key:?} is missing")))?;
    v.parse().map_err(|_| corrupt(format!("config {key:?}: invalid value {v:?}")))
}

/// Load statements: `tid` condition none / `= at` / `< before` / both.
const LOAD_COLUMNS: &str = "SELECT o.tid, o.data_id, o.value_tid, d.id, d.hash, d.compression, d.value,
        (SELECT MIN(n.tid) FROM obj n WHERE n.partition = o.partition AND n.oid = o.oid
           AND n.tid > o.tid)
    FROM obj o LEFT JOIN data d ON d.id = o.data_id
    WHERE o.partition = ?1 AND o.oid = ?2";

impl Backend for SqliteBackend {
    fn engine(&self) -> &'static str {
        "SQLite"
    }

    fn get_config(&mut self, key: &str) -> Result<Option<String>> {
        config_value(&self.conn, key)
    }

    fn set_config(&mut self, key: &str, value: Option<&str>) -> Result<()> {
        match value {
            Some(v) => self
                .conn
                .prepare_cached("INSERT OR REPLACE INTO config (name, value) VALUES (?1, ?2)")
                .map_err(db)?
                .execute([key, v]),
            None => self.conn.prepare_cached("DELETE FROM config WHERE name = ?1").map_err(db)?.execute([key]),
        }
        .map_err(db)?;
        self.sync_wal()
    }

    fn load_pt(&mut self) -> Result<Option<PartitionTable>> {
        let tx = self.conn.transaction().map_err(db)?;
        if config_value(&tx, "ptid")?.is_none() {
            return Ok(None);
        }
        let ptid: u64 = parse_config(&tx, "ptid")?;
        let replicas: u32 = parse_config(&tx, "replicas")?;
        let np: u32 = parse_config(&tx, "partitions")?;
        let mut rows: Vec<Vec<Cell>> = vec![Vec::new(); np as usize];
        {
            let mut stmt =
                tx.prepare_cached("SELECT partition, nid, state FROM pt ORDER BY partition, nid").map_err(db)?;
            let mut q = stmt.query([]).map_err(db)?;
            while let Some(row) = q.next().map_err(db)? {
                let what = || "partition table row".to_string();
                let partition = col_int(row, 0, "partition", &what)?;
                let nid = col_int(row, 1, "nid", &what)?;
                let state = col_int(row, 2, "state", &what)?;
                let what = || format!("partition table cell (partition {partition}, nid {nid})");
                let slot = usize::try_from(partition)
                    .ok()
                    .and_then(|p| rows.get_mut(p))
                    .ok_or_else(|| corrupt(format!("{}: partition out of range (table has {np})", what())))?;
                let nid = i32::try_from(nid).map_err(|_| corrupt(format!("{}: invalid node id", what())))?;
                let state = i32::try_from(state)
                    .ok()
                    .and_then(CellState::from_i32)
                    .ok_or_else(|| corrupt(format!("{}: invalid cell state {state}", what())))?;
                slot.push(Cell { nid: Nid(nid), state });
            }
        }
        tx.commit().map_err(db)?;
        PartitionTable::from_rows(Ptid(ptid), replicas, rows)
            .map(Some)
            .map_err(|e| corrupt(format!("partition table: {e}")))
    }

    fn save_pt(&mut self, pt: &PartitionTable) -> Result<()> {
        let tx = self.conn.transaction().map_err(db)?;
        tx.prepare_cached("DELETE FROM pt").map_err(db)?.execute([]).map_err(db)?;
        {
            let mut ins =
                tx.prepare_cached("INSERT INTO pt (partition, nid, state) VALUES (?1, ?2, ?3)").map_err(db)?;
            for (p, row) in pt.rows().iter().enumerate() {
                for cell in row {
                    ins.execute(params![p as i64, cell.nid.0, cell.state as i32]).map_err(db)?;
                }
            }
            let mut cfg =
                tx.prepare_cached("INSERT OR REPLACE INTO config (name, value) VALUES (?1, ?2)").map_err(db)?;
            cfg.execute(["ptid", &pt.ptid.0.to_string()]).map_err(db)?;
            cfg.execute(["replicas", &pt.replicas.to_string()]).map_err(db)?;
            cfg.execute(["partitions", &pt.np().to_string()]).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        self.sync_wal()
    }

    fn last_ids(&mut self) -> Result<(Option<Tid>, Option<Oid>)> {
        // Skip scans over the leading `partition` column of the primary keys: one index seek
        // per partition instead of a full scan.
        // One statement, so one consistent snapshot.
        let mut stmt = self
            .conn
            .prepare_cached(
                "WITH RECURSIVE
                       tp(p) AS (SELECT MIN(partition) FROM trans
                                 UNION ALL
                                 SELECT (SELECT MIN(partition) FROM trans WHERE partition > p)
                                 FROM tp WHERE p IS NOT NULL),
                       op(p) AS (SELECT MIN(partition) FROM obj
                                 UNION ALL
                                 SELECT (SELECT MIN(partition) FROM obj WHERE partition > p)
                                 FROM op WHERE p IS NOT NULL)
                     SELECT
                       (SELECT MAX((SELECT MAX(tid) FROM trans WHERE partition = tp.p))
                          FROM tp WHERE p IS NOT NULL),
                       (SELECT MAX(m) FROM (
                          SELECT (SELECT MAX(oid) FROM obj WHERE partition = op.p) AS m
                            FROM op WHERE p IS NOT NULL
                          UNION ALL
                          SELECT MAX(oid) FROM tobj))",
            )
            .map_err(db)?;
        let mut q = stmt.query([]).map_err(db)?;
        let row = q.next().map_err(db)?.ok_or_else(|| BackendError::Db("last_ids: no row".into()))?;
        let what = || "last ids".to_string();
        let tid = col_opt_tid(row, 0, "trans.tid", &what)?;
        let oid = col_opt_int(row, 1, "oid", &what)?.map(|v| Oid(v as u64));
        Ok((tid, oid))
    }

    fn load(&mut self, partition: u32, oid: Oid, at: Option<Tid>, before: Option<Tid>) -> Result<Load> {
        let max = Tid::MAX.0;
        // A `before` beyond the largest storable TID excludes nothing; an `at` beyond it
        // matches nothing (-1 is never a valid stored TID).
        let before = before.filter(|b| b.0 <= max);
        let at = at.map(|a| if a.0 <= max { a.0 as i64 } else { -1 });
        let (part, oid64) = (i64::from(partition), id64(oid.0));
        let found = {
            let mut stmt;
            let mut q = match (at, before) {
                (None, None) => {
                    stmt =
                        self.conn.prepare_cached(&format!("{LOAD_COLUMNS} ORDER BY o.tid DESC LIMIT 1")).map_err(db)?;
                    stmt.query(params![part, oid64])
                }
                (Some(at), None) => {
                    stmt = self.conn.prepare_cached(&format!("{LOAD_COLUMNS} AND o.tid = ?3")).map_err(db)?;
                    stmt.query(params![part, oid64, at])
                }
                (None, Some(before)) => {
                    stmt = self
                        .conn
                        .prepare_cached(&format!("{LOAD_COLUMNS} AND o.tid < ?3 ORDER BY o.tid DESC LIMIT 1"))
                        .map_err(db)?;
                    stmt.query(params![part, oid64, before.0 as i64])
                }
                (Some(at), Some(before)) => {
                    stmt = self
                        .conn
                        .prepare_cached(&format!("{LOAD_COLUMNS} AND o.tid = ?3 AND o.tid < ?4"))
                        .map_err(db)?;
                    stmt.query(params![part, oid64, at, before.0 as i64])
                }
            }
            .map_err(db)?;
            match q.next().map_err(db)? {
                None => None,
                Some(row) => Some(read_record(row, oid)?),
            }
        };
        if let Some(record) = found {
            return Ok(Load::Found(record));
        }
        let exists: bool = self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM obj WHERE partition = ?1 AND oid = ?2)")
            .map_err(db)?
            .query_row(params![part, oid64], |r| r.get(0))
            .map_err(db)?;
        Ok(if exists { Load::NotFound } else { Load::DoesNotExist })
    }

    fn last_serial(&mut self, partition: u32, oid: Oid) -> Result<Option<Tid>> {
        let mut stmt =
            self.conn.prepare_cached("SELECT MAX(tid) FROM obj WHERE partition = ?1 AND oid = ?2").map_err(db)?;
        let mut q = stmt.query(params![i64::from(partition), id64(oid.0)]).map_err(db)?;
        match q.next().map_err(db)? {
            None => Ok(None),
            Some(row) => col_opt_tid(row, 0, "tid", &|| format!("object {oid}")),
        }
    }

    fn transaction(&mut self, partition: u32, tid: Tid) -> Result<Option<TxnInfo>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {TXN_COLUMNS} FROM trans WHERE partition = ?1 AND tid = ?2"))
            .map_err(db)?;
        let mut q = stmt.query(params![i64::from(partition), id64(tid.0)]).map_err(db)?;
        match q.next().map_err(db)? {
            None => Ok(None),
            Some(row) => read_txn(row, 0, partition, tid).map(Some),
        }
    }

    fn object_history(&mut self, partition: u32, oid: Oid, offset: u32, length: u32) -> Result<Vec<(Tid, u64)>> {
        // LENGTH and typeof read the size of a blob from the record header, not the blob.
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT o.tid, o.data_id, d.id, typeof(d.value), LENGTH(d.value)
                 FROM obj o LEFT JOIN data d ON d.id = o.data_id
                 WHERE o.partition = ?1 AND o.oid = ?2
                 ORDER BY o.tid DESC LIMIT ?3 OFFSET ?4",
            )
            .map_err(db)?;
        let mut q =
            stmt.query(params![i64::from(partition), id64(oid.0), i64::from(length), i64::from(offset)]).map_err(db)?;
        let mut out = Vec::new();
        while let Some(row) = q.next().map_err(db)? {
            let serial = col_tid(row, 0, "tid", &|| format!("object {oid}"))?;
            let what = || format!("object {oid} revision {serial}");
            let size = match col_opt_int(row, 1, "data_id", &what)? {
                None => 0,
                Some(id) => {
                    if col_opt_int(row, 2, "data.id", &what)?.is_none() {
                        return Err(corrupt(format!("{}: data row {id} does not exist", what())));
                    }
                    let what = || format!("object {oid} revision {serial} (data row {id})");
                    let kind: String = row.get(3).map_err(db)?;
                    if kind != "blob" {
                        return Err(corrupt(format!("{}: column value holds a {kind} value, expected a blob", what())));
                    }
                    size_of(col_int(row, 4, "length of value", &what)?, &what)?
                }
            };
            out.push((serial, size));
        }
        Ok(out)
    }

    fn tids(&mut self, partitions: &[u32], offset: u32, length: u32) -> Result<Vec<Tid>> {
        // Each partition newest first along the primary key (see `window_end`). Packed
        // transactions are the oldest: the scan meets the others first.
        let limit = window_end(offset, length) as i64;
        let tx = self.conn.transaction().map_err(db)?;
        let mut all = Vec::new();
        {
            let mut stmt = tx
                .prepare_cached("SELECT tid FROM trans WHERE partition = ?1 AND packed = 0 ORDER BY tid DESC LIMIT ?2")
                .map_err(db)?;
            for p in distinct_partitions(partitions) {
                read_tids(stmt.query(params![i64::from(p), limit]).map_err(db)?, &mut all)?;
            }
        }
        tx.commit().map_err(db)?;
        Ok(merge_tids(all, true, offset, length))
    }

    fn tids_from(&mut self, partitions: &[u32], min: Tid, max: Tid, length: u32) -> Result<Vec<Tid>> {
        let Some((min, max)) = tid_range(min, max) else {
            return Ok(Vec::new());
        };
        let tx = self.conn.transaction().map_err(db)?;
        let mut all = Vec::new();
        {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT tid FROM trans WHERE partition = ?1 AND tid >= ?2 AND tid <= ?3 ORDER BY tid LIMIT ?4",
                )
                .map_err(db)?;
            for p in distinct_partitions(partitions) {
                read_tids(stmt.query(params![i64::from(p), min, max, i64::from(length)]).map_err(db)?, &mut all)?;
            }
        }
        tx.commit().map_err(db)?;
        Ok(merge_tids(all, false, 0, length))
    }

    fn undo_info(&mut self, partition: u32, oid: Oid, undone: Tid, before: Option<Tid>) -> Result<Option<UndoInfo>> {
        let Some(current_max) = undo_current_max(before) else {
            return Ok(None);
        };
        if undone > Tid::MAX {
            return Ok(None);
        }
        // One statement, so one snapshot: current, undone and previous revisions.
        let mut stmt = self.conn.prepare_cached(UNDO_REVISIONS).map_err(db)?;
        let mut q = stmt.query(params![i64::from(partition), id64(oid.0), current_max, id64(undone.0)]).map_err(db)?;
        let mut revs = UndoRevisions::default();
        while let Some(row) = q.next().map_err(db)? {
            let what = || format!("object {oid} (undo of {undone})");
            let kind = col_int(row, 0, "kind", &what)?;
            let tid = col_tid(row, 1, "tid", &what)?;
            let value_tid = col_opt_tid(row, 2, "value_tid", &|| format!("object {oid} revision {tid}"))?;
            revs.set(kind, Revision { tid, value_tid }, &what)?;
        }
        Ok(revs.info())
    }

    fn pack(&mut self, partitions: &[u32], tid: Tid) -> Result<()> {
        let Some(list) = partition_list(partitions) else {
            return Ok(());
        };
        let tid64 = tid_upper(tid);
        // Revisions with a newer revision <= tid: all but the newest one <= tid, per object.
        // The outer scan uses the (partition, tid, oid) index, the subquery one seek of the
        // primary key per row.
        let older = format!(
            "partition IN ({list}) AND tid <= ?1
             AND EXISTS (SELECT 1 FROM obj n WHERE n.partition = obj.partition AND n.oid = obj.oid
                         AND n.tid > obj.tid AND n.tid <= ?1)"
        );
        let tx = self.conn.transaction().map_err(db)?;
        let mut candidates = Vec::new();
        {
            let mut stmt = tx
                .prepare(&format!("SELECT DISTINCT data_id FROM obj WHERE {older} AND data_id IS NOT NULL"))
                .map_err(db)?;
            let mut q = stmt.query([tid64]).map_err(db)?;
            while let Some(row) = q.next().map_err(db)? {
                candidates.push(col_int(row, 0, "data_id", &|| format!("revision packed at {tid}"))?);
            }
        }
        tx.prepare(&format!("DELETE FROM obj WHERE {older}")).map_err(db)?.execute([tid64]).map_err(db)?;
        // What remains <= tid is the newest revision of each object: a deletion goes too.
        tx.prepare(&format!("DELETE FROM obj WHERE partition IN ({list}) AND tid <= ?1 AND data_id IS NULL"))
            .map_err(db)?
            .execute([tid64])
            .map_err(db)?;
        tx.prepare(&format!("UPDATE trans SET packed = 1 WHERE partition IN ({list}) AND tid <= ?1 AND packed = 0"))
            .map_err(db)?
            .execute([tid64])
            .map_err(db)?;
        Self::prune(&tx, &self.held, candidates)?;
        tx.commit().map_err(db)?;
        self.sync_wal()
    }

    fn store_data(&mut self, _partition: u32, checksum: &[u8], compression: u32, data: &[u8]) -> Result<DataId> {
        check_data_args(checksum, compression)?;
        // Durable with the following vote.
        let id = insert_data(&self.conn, checksum, compression, data)?;
        self.held.hold(id);
        Ok(id)
    }

    fn vote(&mut self, ttid: Tid, objects: &[(u32, TempObject)], meta: Option<(u32, &TxnMeta)>) -> Result<()> {
        let tx = self.conn.savepoint().map_err(db)?;
        write_vote(&tx, ttid, objects, meta)?;
        tx.commit().map_err(db)?;
        self.writeback_due = true;
        // The voted objects now reference their data rows: drop the holds of store_data.
        self.held.voted(objects.iter().filter_map(|(_, o)| o.data_id));
        Ok(())
    }

    fn lock(&mut self, ttid: Tid, tid: Tid, partitions: &[u32]) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO ttrans (ttid, tid, meta, lock_partitions) VALUES (?1, ?2, 0, ?3)
                 ON CONFLICT (ttid) DO UPDATE SET tid = excluded.tid,
                   lock_partitions = COALESCE(excluded.lock_partitions, ttrans.lock_partitions)",
            )
            .map_err(db)?
            .execute(params![id64(ttid.0), id64(tid.0), encode_partitions(partitions)])
            .map_err(db)?;
        // The commit point: durable after `sync`.
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.writeback_due = false;
        self.sync_wal()
    }

    fn begin_batch(&mut self) -> bool {
        // Immediate: the write lock first, so that no job in it can find its snapshot stale
        // when it starts writing (a writer of another process could only be a test's; if it
        // holds the lock past the busy timeout, the jobs run one by one as without batches).
        self.conn.is_autocommit() && self.conn.execute_batch("BEGIN IMMEDIATE").is_ok()
    }

    fn commit_batch(&mut self) -> Result<()> {
        if self.conn.is_autocommit() {
            return Ok(());
        }
        let committed = self.conn.execute_batch("COMMIT").map_err(db);
        if committed.is_err() && !self.conn.is_autocommit() {
            // Still open (SQLite keeps it after some failures): drop it.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        committed
    }

    fn start_writeback(&mut self) -> bool {
        if !std::mem::take(&mut self.writeback_due) {
            return false;
        }
        let Some(wal) = &self.wal else { return false };
        // A log that cannot be opened or written back is left to the sync.
        let started = start_writeback_of(wal);
        if let Err(e) = &started {
            tracing::debug!("write-back of {}: {e}", wal.display());
        }
        started.is_ok()
    }

    fn unlock(&mut self, ttid: Tid, tid: Tid) -> Result<()> {
        // No fsync: the decision is durable since `lock`; if this commit is lost in a crash,
        // the next verification finds the locked transaction and unlocks it again.
        self.unlock_rows(ttid, tid)?;
        self.writeback_due = true;
        Ok(())
    }

    fn abort(&mut self, ttid: Tid) -> Result<()> {
        self.abort_rows(ttid)
    }

    fn locked_transactions(&mut self) -> Result<Vec<LockedTxn>> {
        let mut stmt =
            self.conn.prepare_cached("SELECT ttid, tid, lock_partitions FROM ttrans ORDER BY ttid").map_err(db)?;
        let mut q = stmt.query([]).map_err(db)?;
        let mut out = Vec::new();
        while let Some(row) = q.next().map_err(db)? {
            let ttid = col_tid(row, 0, "ttid", &|| "temporary transaction".to_string())?;
            let what = || format!("temporary transaction {ttid}");
            let tid = col_opt_tid(row, 1, "tid", &what)?;
            let partitions = decode_partitions(&col_blob(row, 2, "lock_partitions", true, &what)?, &what)?;
            out.push(LockedTxn { ttid, tid, partitions });
        }
        Ok(out)
    }

    fn final_tid(&mut self, ttid: Tid) -> Result<Option<Tid>> {
        let mut stmt = self.conn.prepare_cached("SELECT tid FROM trans WHERE ttid = ?1 LIMIT 1").map_err(db)?;
        let mut q = stmt.query([id64(ttid.0)]).map_err(db)?;
        match q.next().map_err(db)? {
            None => Ok(None),
            Some(row) => col_tid(row, 0, "tid", &|| format!("transaction with ttid {ttid}")).map(Some),
        }
    }

    fn release_data(&mut self, ids: &[DataId]) -> Result<()> {
        self.release(ids);
        Ok(())
    }

    fn drop_unfinished(&mut self) -> Result<()> {
        let tx = self.conn.savepoint().map_err(db)?;
        tx.prepare_cached("DELETE FROM tobj WHERE tid IN (SELECT ttid FROM ttrans WHERE tid IS NULL)")
            .map_err(db)?
            .execute([])
            .map_err(db)?;
        tx.prepare_cached("DELETE FROM ttrans WHERE tid IS NULL").map_err(db)?.execute([]).map_err(db)?;
        // Temporary objects without a transaction row cannot be unlocked: drop them too.
        tx.prepare_cached("DELETE FROM tobj WHERE tid NOT IN (SELECT ttid FROM ttrans)")
            .map_err(db)?
            .execute([])
            .map_err(db)?;
        // No transaction is in flight: every data row nothing references goes, including those
        // stored before a crash by transactions that never voted. One pass over `data` with
        // index lookups; only done at startup/recovery.
        tx.prepare_cached(
            "DELETE FROM data WHERE NOT EXISTS (SELECT 1 FROM obj WHERE obj.data_id = data.id)
               AND NOT EXISTS (SELECT 1 FROM tobj WHERE tobj.data_id = data.id)",
        )
        .map_err(db)?
        .execute([])
        .map_err(db)?;
        tx.commit().map_err(db)?;
        self.held.clear();
        self.sync_wal()
    }

    fn vote_data(&mut self, ttid: Tid, objects: &[(u32, NewObject)], meta: Option<(u32, &TxnMeta)>) -> Result<()> {
        let tx = self.conn.savepoint().map_err(db)?;
        let mut temp = Vec::with_capacity(objects.len());
        for (partition, o) in objects {
            let data_id = match &o.data {
                Some(d) => {
                    check_data_args(&d.checksum, d.compression)?;
                    Some(insert_data(&tx, &d.checksum, d.compression, &d.data)?)
                }
                None => None,
            };
            temp.push((*partition, TempObject { oid: o.oid, data_id, data_serial: o.data_serial }));
        }
        write_vote(&tx, ttid, &temp, meta)?;
        tx.commit().map_err(db)?;
        self.writeback_due = true;
        Ok(())
    }

    fn partition_last_tid(&mut self, partition: u32) -> Result<Option<Tid>> {
        // Two index seeks: the primary key of trans, the (partition, tid, oid) index of obj.
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT (SELECT MAX(tid) FROM trans WHERE partition = ?1),
                        (SELECT MAX(tid) FROM obj INDEXED BY obj_partition_tid_oid WHERE partition = ?1)",
            )
            .map_err(db)?;
        let mut q = stmt.query([i64::from(partition)]).map_err(db)?;
        let row = q.next().map_err(db)?.ok_or_else(|| BackendError::Db("partition_last_tid: no row".into()))?;
        let what = || format!("last TID of partition {partition}");
        let trans = col_opt_tid(row, 0, "trans.tid", &what)?;
        let obj = col_opt_tid(row, 1, "obj.tid", &what)?;
        Ok(trans.max(obj))
    }

    fn fetch_transactions(&mut self, partition: u32, min: Tid, max: Tid, length: u32) -> Result<Vec<TxnInfo>> {
        let Some((min, max)) = tid_range(min, max) else {
            return Ok(Vec::new());
        };
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT tid, {TXN_COLUMNS} FROM trans WHERE partition = ?1 AND tid >= ?2 AND tid <= ?3
                 ORDER BY tid LIMIT ?4"
            ))
            .map_err(db)?;
        let mut q = stmt.query(params![i64::from(partition), min, max, i64::from(length)]).map_err(db)?;
        let mut out = Vec::new();
        while let Some(row) = q.next().map_err(db)? {
            let tid = col_tid(row, 0, "tid", &|| format!("transaction of partition {partition}"))?;
            out.push(read_txn(row, 1, partition, tid)?);
        }
        Ok(out)
    }

    fn fetch_objects(
        &mut self,
        partition: u32,
        min: (Tid, Oid),
        max: Tid,
        length: u32,
        max_bytes: usize,
    ) -> Result<Vec<ReplObject>> {
        let Some((min_tid, min_oid, max_tid)) = object_range(min, max) else {
            return Ok(Vec::new());
        };
        // Along the (partition, tid, oid) index. A value is read only once its row is taken
        // (typeof and LENGTH read the size of a blob from the record header).
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT o.oid, o.tid, o.data_id, o.value_tid, d.id, d.hash, d.compression,
                        typeof(d.value), LENGTH(d.value), d.value
                 FROM obj o INDEXED BY obj_partition_tid_oid LEFT JOIN data d ON d.id = o.data_id
                 WHERE o.partition = ?1 AND (o.tid, o.oid) >= (?2, ?3) AND o.tid <= ?4
                 ORDER BY o.tid, o.oid LIMIT ?5",
            )
            .map_err(db)?;
        let mut q =
            stmt.query(params![i64::from(partition), min_tid, min_oid, max_tid, i64::from(length)]).map_err(db)?;
        let mut budget = FetchBudget::new(max_bytes);
        let mut out = Vec::new();
        while let Some(row) = q.next().map_err(db)? {
            let oid = Oid(col_int(row, 0, "oid", &|| format!("object of partition {partition}"))? as u64);
            let tid = col_tid(row, 1, "tid", &|| format!("object {oid}"))?;
            let what = || format!("object {oid} revision {tid}");
            let data_id = col_opt_int(row, 2, "data_id", &what)?;
            let data_serial = col_opt_tid(row, 3, "value_tid", &what)?;
            let data = match data_id {
                None => {
                    if !budget.take(0) {
                        break;
                    }
                    None
                }
                Some(id) => {
                    if col_opt_int(row, 4, "data.id", &what)?.is_none() {
                        return Err(corrupt(format!("{}: data row {id} does not exist", what())));
                    }
                    let what = || format!("object {oid} revision {tid} (data row {id})");
                    let kind: String = row.get(7).map_err(db)?;
                    if kind != "blob" {
                        return Err(corrupt(format!("{}: column value holds a {kind} value, expected a blob", what())));
                    }
                    if !budget.take(size_of(col_int(row, 8, "length of value", &what)?, &what)?) {
                        break;
                    }
                    let checksum = stored_checksum(col_blob(row, 5, "hash", false, &what)?, &what)?;
                    let compression = compression_of(col_int(row, 6, "compression", &what)?, &what)?;
                    Some(NewData { checksum, compression, data: col_blob(row, 9, "value", false, &what)? })
                }
            };
            out.push(ReplObject { oid, tid, data, data_serial });
        }
        Ok(out)
    }

    fn store_replicated(
        &mut self,
        partition: u32,
        transactions: &[TxnInfo],
        objects: &[ReplObject],
        progress: &ReplProgress,
    ) -> Result<()> {
        check_replicated(transactions, objects)?;
        let part = i64::from(partition);
        // A savepoint: its own transaction, or part of the open batch.
        let tx = self.conn.savepoint().map_err(db)?;
        // Data rows the replaced revisions referenced: pruned if nothing else does.
        let mut replaced = Vec::new();
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO trans (partition, tid, packed, oids, user, description, ext, ttid)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(db)?;
            for t in transactions {
                let m = &t.meta;
                ins.execute(params![
                    part,
                    id64(t.tid.0),
                    i64::from(t.packed),
                    encode_oids(&m.oids),
                    m.user,
                    m.description,
                    m.extension,
                    id64(t.ttid.0)
                ])
                .map_err(db)?;
            }
            let mut old = tx
                .prepare_cached("SELECT data_id FROM obj WHERE partition = ?1 AND oid = ?2 AND tid = ?3")
                .map_err(db)?;
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO obj (partition, oid, tid, data_id, value_tid) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(db)?;
            for o in objects {
                let (oid64, tid64) = (id64(o.oid.0), id64(o.tid.0));
                {
                    let mut q = old.query(params![part, oid64, tid64]).map_err(db)?;
                    if let Some(row) = q.next().map_err(db)? {
                        let what = || format!("object {} revision {}", o.oid, o.tid);
                        replaced.extend(col_opt_int(row, 0, "data_id", &what)?);
                    }
                }
                let data_id = match &o.data {
                    Some(d) => Some(insert_data(&tx, &d.checksum, d.compression, &d.data)?),
                    None => None,
                };
                ins.execute(params![part, oid64, tid64, data_id, o.data_serial.map(|t| id64(t.0))]).map_err(db)?;
            }
        }
        tx.prepare_cached("INSERT OR REPLACE INTO config (name, value) VALUES (?1, ?2)")
            .map_err(db)?
            .execute([progress_key(partition), encode_progress(progress)])
            .map_err(db)?;
        Self::prune(&tx, &self.held, replaced)?;
        tx.commit().map_err(db)?;
        // Durable after the next sync, like a vote.
        self.writeback_due = true;
        Ok(())
    }

    fn replication_progress(&mut self, partition: u32) -> Result<Option<ReplProgress>> {
        let key = progress_key(partition);
        config_value(&self.conn, &key)?.map(|v| decode_progress(&key, &v)).transpose()
    }

    fn set_replication_progress(&mut self, partition: u32, progress: Option<&ReplProgress>) -> Result<()> {
        self.set_config(&progress_key(partition), progress.map(encode_progress).as_deref())
    }

    fn purge_partition(&mut self, partition: u32) -> Result<()> {
        let part = i64::from(partition);
        let tx = self.conn.savepoint().map_err(db)?;
        let mut candidates = Vec::new();
        {
            let mut stmt = tx
                .prepare_cached("SELECT DISTINCT data_id FROM obj WHERE partition = ?1 AND data_id IS NOT NULL")
                .map_err(db)?;
            let mut q = stmt.query([part]).map_err(db)?;
            while let Some(row) = q.next().map_err(db)? {
                candidates.push(col_int(row, 0, "data_id", &|| format!("object of partition {partition}"))?);
            }
        }
        tx.prepare_cached("DELETE FROM obj WHERE partition = ?1").map_err(db)?.execute([part]).map_err(db)?;
        tx.prepare_cached("DELETE FROM trans WHERE partition = ?1").map_err(db)?.execute([part]).map_err(db)?;
        // What replication saved is not here any more.
        tx.prepare_cached("DELETE FROM config WHERE name = ?1")
            .map_err(db)?
            .execute([progress_key(partition)])
            .map_err(db)?;
        Self::prune(&tx, &self.held, candidates)?;
        tx.commit().map_err(db)?;
        self.sync_wal()
    }
}

/// The revisions `undo_info` needs, tagged with their kind (`UNDO_CURRENT`, ...): the newest
/// with tid <= ?3, the one at ?4, the newest before ?4.
const UNDO_REVISIONS: &str = "SELECT 0, tid, value_tid FROM
       (SELECT tid, value_tid FROM obj WHERE partition = ?1 AND oid = ?2 AND tid <= ?3
        ORDER BY tid DESC LIMIT 1)
     UNION ALL
     SELECT 1, tid, value_tid FROM obj WHERE partition = ?1 AND oid = ?2 AND tid = ?4
     UNION ALL
     SELECT 2, tid, value_tid FROM
       (SELECT tid, value_tid FROM obj WHERE partition = ?1 AND oid = ?2 AND tid < ?4
        ORDER BY tid DESC LIMIT 1)";

const _: () = assert!(super::common::UNDO_CURRENT == 0);
const _: () = assert!(super::common::UNDO_UNDONE == 1);
const _: () = assert!(super::common::UNDO_PREVIOUS == 2);

/// Append the TIDs in the first column of `q` to `out`.
fn read_tids(mut q: rusqlite::Rows<'_>, out: &mut Vec<Tid>) -> Result<()> {
    while let Some(row) = q.next().map_err(db)? {
        out.push(col_tid(row, 0, "tid", &|| "transaction".to_string())?);
    }
    Ok(())
}

/// Take the lock that makes one process the owner of the database at `path` (released when
/// the returned file is closed, also by a crash).
fn lock_owner(path: &Path) -> Result<std::fs::File> {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    let lock_path = std::path::PathBuf::from(p);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| BackendError::Db(format!("{}: {e}", lock_path.display())))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(BackendError::Db(format!(
            "{} is in use by another process (locked: {})",
            path.display(),
            lock_path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(BackendError::Db(format!("cannot lock {}: {e}", lock_path.display())))
        }
    }
}

/// Path of the write-ahead log of the database at `path`.
fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push("-wal");
    std::path::PathBuf::from(p)
}

/// Insert a data row, or return the id of an identical one (same checksum and compression).
fn insert_data(conn: &Connection, checksum: &[u8], compression: u32, data: &[u8]) -> Result<DataId> {
    let existing: Option<DataId> = conn
        .prepare_cached("SELECT id FROM data WHERE hash = ?1 AND compression = ?2")
        .map_err(db)?
        .query_row(params![checksum, i64::from(compression)], |r| r.get(0))
        .optional()
        .map_err(db)?;
    if let Some(id) = existing {
        return Ok(id);
    }
    conn.prepare_cached("INSERT INTO data (hash, compression, value) VALUES (?1, ?2, ?3)")
        .map_err(db)?
        .execute(params![checksum, i64::from(compression), data])
        .map_err(db)?;
    Ok(conn.last_insert_rowid())
}

/// The rows of a vote: temporary objects keyed by ttid, and the `ttrans` row.
fn write_vote(tx: &Connection, ttid: Tid, objects: &[(u32, TempObject)], meta: Option<(u32, &TxnMeta)>) -> Result<()> {
    let ttid64 = id64(ttid.0);
    let mut ins = tx
        .prepare_cached(
            "INSERT OR REPLACE INTO tobj (partition, oid, tid, data_id, value_tid)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(db)?;
    for (partition, o) in objects {
        ins.execute(params![i64::from(*partition), id64(o.oid.0), ttid64, o.data_id, o.data_serial.map(|t| id64(t.0))])
            .map_err(db)?;
    }
    write_ttrans(tx, ttid64, meta)
}

/// The `ttrans` row of a voted transaction (with its metadata on the cells of partition(ttid)).
fn write_ttrans(tx: &Connection, ttid64: i64, meta: Option<(u32, &TxnMeta)>) -> Result<()> {
    match meta {
        Some((partition, m)) => tx
            .prepare_cached(
                "INSERT INTO ttrans (ttid, partition, tid, meta, oids, user, description, ext)
                 VALUES (?1, ?2, NULL, 1, ?3, ?4, ?5, ?6)
                 ON CONFLICT (ttid) DO UPDATE SET partition = excluded.partition, meta = 1,
                   oids = excluded.oids, user = excluded.user,
                   description = excluded.description, ext = excluded.ext",
            )
            .map_err(db)?
            .execute(params![ttid64, i64::from(partition), encode_oids(&m.oids), m.user, m.description, m.extension]),
        None => tx
            .prepare_cached("INSERT INTO ttrans (ttid, meta) VALUES (?1, 0) ON CONFLICT (ttid) DO NOTHING")
            .map_err(db)?
            .execute([ttid64]),
    }
    .map_err(db)?;
    Ok(())
}

/// The columns of a `trans` row `read_txn` decodes, in order.
const TXN_COLUMNS: &str = "packed, oids, user, description, ext, ttid";

/// Decode the `TXN_COLUMNS` of transaction `tid` of `partition`, starting at column `first`.
fn read_txn(row: &Row<'_>, first: usize, partition: u32, tid: Tid) -> Result<TxnInfo> {
    let what = || format!("transaction {tid} (partition {partition})");
    let packed = packed_of(col_int(row, first, "packed", &what)?, &what)?;
    let oids = decode_oids(&col_blob(row, first + 1, "oids", true, &what)?, &what)?;
    Ok(TxnInfo {
        tid,
        ttid: col_tid(row, first + 5, "ttid", &what)?,
        packed,
        meta: TxnMeta {
            user: col_blob(row, first + 2, "user", true, &what)?,
            description: col_blob(row, first + 3, "description", true, &what)?,
            extension: col_blob(row, first + 4, "ext", true, &what)?,
            oids,
        },
    })
}

/// Decode one row of `LOAD_COLUMNS`.
fn read_record(row: &Row<'_>, oid: Oid) -> Result<ObjectRecord> {
    let serial = col_tid(row, 0, "tid", &|| format!("object {oid}"))?;
    let what = || format!("object {oid} revision {serial}");
    let data_id = col_opt_int(row, 1, "data_id", &what)?;
    let data_serial = col_opt_tid(row, 2, "value_tid", &what)?;
    let next_serial = col_opt_tid(row, 7, "next tid", &what)?;
    let (compression, checksum, data) = match data_id {
        None => (0, vec![0u8; CHECKSUM_LEN], Vec::new()),
        Some(id) => {
            if col_opt_int(row, 3, "data.id", &what)?.is_none() {
                return Err(corrupt(format!("{}: data row {id} does not exist", what())));
            }
            let what = || format!("object {oid} revision {serial} (data row {id})");
            let checksum = stored_checksum(col_blob(row, 4, "hash", false, &what)?, &what)?;
            let compression = compression_of(col_int(row, 5, "compression", &what)?, &what)?;
            (compression, checksum, col_blob(row, 6, "value", false, &what)?)
        }
    };
    Ok(ObjectRecord { serial, next_serial, compression, checksum, data, data_serial })
}
