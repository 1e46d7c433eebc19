//! MySQL/MariaDB backend (InnoDB), through `mysql_async`.
//!
//! The trait is synchronous and only called from the storage's database thread: the backend
//! owns a current-thread tokio runtime and runs each call to completion with `block_on` over
//! ONE connection (no pool), so that a database transaction spans statements exactly like the
//! SQLite connection does. Each method is one database transaction (or one autocommitted
//! statement). Calls from inside an async runtime (where `block_on` would panic) fail.
//!
//! Layout: the logical schema of `sqlite.rs` (tables `config`, `pt`, `trans`, `obj`, `data`,
//! `ttrans`, `tobj`), modelled on NEO's MySQL DDL (InnoDB, MEDIUMBLOB payloads, `partition`
//! quoted since it is a reserved word). Ids (oid, tid, ttid, data id) are signed BIGINT holding
//! the `as i64` bit cast of their u64, exactly as in SQLite: TIDs fit in i64, both engines
//! share one representation, and a negative TID read back is detectable corruption.
//! `data.value` is a MEDIUMBLOB (< 16 MiB), and no statement may exceed the server's
//! `max_allowed_packet`: a record longer than one chunk (the smaller of 8 MiB and half of
//! `max_allowed_packet`, read at open) keeps its first chunk in `data.value` and the others in
//! `bigdata(data_id, n, value)`; `data.value_size` is the total length, checked at load.
//!
//! Durability: every commit is durable by itself when InnoDB runs with
//! `innodb_flush_log_at_trx_commit = 1` (the default; checked at open, with a warning
//! otherwise), so `sync` is a no-op. The price is one log flush per commit on this single
//! connection: the group commit the node does with `sync` does not apply here. So, as NEO
//! does, an unlock (which needs no durability: its lock is durable, and verification finishes
//! a locked transaction after a crash) is not committed by itself: it runs in an open
//! transaction (`Deferred`) that the next vote or lock commits with its own writes, or the
//! database thread when it goes idle (`Backend::idle`), or any other write before it starts,
//! or any call once it is `MAX_DEFER` old.
//! Every read runs on this connection and sees it. If the connection or that transaction is
//! lost, the next call first runs those unlocks again, committed (`Link::ready`): no read
//! ever misses a revision whose unlock was reported.
//!
//! Round trips: each statement waits for the server (about 200 µs on a small VM), so the
//! writes of a commit are scripts, several statements sent in one query (`run_script`, with
//! values inlined as integers and hexadecimal literals): a vote is one query for the conflict
//! checks (`last_serials`, one row of scalar subqueries) and one for its writes (data rows
//! deduplicated by `ON DUPLICATE KEY`, temporary objects, `ttrans`), an unlock one. A vote
//! longer than a chunk is written statement by statement.
//!
//! Lost connection (server restart, `KILL`, network cut): the call that notices it fails as
//! before (the server rolled its transaction back) and the connection is marked broken; the next
//! call reconnects first (same URL and session settings, schema version and cluster checked, no
//! migration), waiting up to `RECONNECT_FOR` for a restarting server. Reads, and the writes that
//! are idempotent by contract (`lock`, `unlock`, `abort`, `set_config`, `save_pt`,
//! `drop_unfinished`, `pack`, and replication's `store_replicated` (rows replaced, data
//! deduplicated), `set_replication_progress`, `purge_partition`), are retried once on a new
//! connection; `store_data`, `vote` and `vote_data` are not (the node aborts that transaction).
//! Nothing is kept across calls on the server side but committed rows: data ids (`held`,
//! `released`) stay valid.
//!
//! Replication: `store_replicated` writes like a vote (one script when it fits in a chunk, else
//! statement by statement with records split into `bigdata`; the deferred unlocks committed
//! with it) and prunes the data rows of the revisions it replaced; `fetch_objects` reads the
//! revisions along the `(partition, tid, oid)` key, then the data of those its size limit
//! takes (chunks reassembled). The progress of each partition is the `config` row
//! `replication.<partition>`.

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
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Row, Value};
use neo_lib::pt::{Cell, PartitionTable};
use neo_lib::{CellState, Nid, Oid, Ptid, Tid};
use std::time::{Duration, Instant};

/// Current schema version: the number of `MIGRATIONS` a database has applied.
pub const SCHEMA_VERSION: u32 = 2;

/// Schema migrations in order: a database at version N has applied the first N entries, each a
/// list of statements. DDL commits implicitly in MySQL, so a migration cannot be rolled back:
/// its statements must be idempotent (`IF NOT EXISTS`) so that an interrupted one is redone.
const MIGRATIONS: &[&[&str]] = &[
    // Version 1: initial schema.
    &[
        "CREATE TABLE IF NOT EXISTS config (
            name VARBINARY(255) NOT NULL PRIMARY KEY,
            value BLOB NULL
        ) ENGINE = InnoDB",
        "CREATE TABLE IF NOT EXISTS pt (
            `partition` INT UNSIGNED NOT NULL,
            nid INT NOT NULL,
            state TINYINT NOT NULL,
            PRIMARY KEY (`partition`, nid)
        ) ENGINE = InnoDB",
        "CREATE TABLE IF NOT EXISTS trans (
            `partition` INT UNSIGNED NOT NULL,
            tid BIGINT NOT NULL,
            packed BOOLEAN NOT NULL,
            oids MEDIUMBLOB NOT NULL,
            user BLOB NOT NULL,
            description BLOB NOT NULL,
            ext BLOB NOT NULL,
            ttid BIGINT NOT NULL,
            PRIMARY KEY (`partition`, tid),
            KEY ttid (ttid)
        ) ENGINE = InnoDB",
        "CREATE TABLE IF NOT EXISTS obj (
            `partition` INT UNSIGNED NOT NULL,
            oid BIGINT NOT NULL,
            tid BIGINT NOT NULL,
            data_id BIGINT NULL,
            value_tid BIGINT NULL,
            PRIMARY KEY (`partition`, oid, tid),
            KEY tid (`partition`, tid, oid),
            KEY (data_id)
        ) ENGINE = InnoDB",
        "CREATE TABLE IF NOT EXISTS data (
            id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            hash VARBINARY(20) NOT NULL,
            compression TINYINT UNSIGNED NOT NULL,
            value MEDIUMBLOB NOT NULL,
            value_size BIGINT UNSIGNED NOT NULL,
            UNIQUE KEY hash_compression (hash, compression)
        ) ENGINE = InnoDB",
        "CREATE TABLE IF NOT EXISTS bigdata (
            data_id BIGINT NOT NULL,
            n INT UNSIGNED NOT NULL,
            value MEDIUMBLOB NOT NULL,
            PRIMARY KEY (data_id, n)
        ) ENGINE = InnoDB",
        "CREATE TABLE IF NOT EXISTS ttrans (
            ttid BIGINT NOT NULL PRIMARY KEY,
            `partition` INT UNSIGNED NULL,
            tid BIGINT NULL,
            meta BOOLEAN NOT NULL,
            oids MEDIUMBLOB NULL,
            user BLOB NULL,
            description BLOB NULL,
            ext BLOB NULL
        ) ENGINE = InnoDB",
        "CREATE TABLE IF NOT EXISTS tobj (
            `partition` INT UNSIGNED NOT NULL,
            oid BIGINT NOT NULL,
            tid BIGINT NOT NULL,
            data_id BIGINT NULL,
            value_tid BIGINT NULL,
            PRIMARY KEY (tid, oid),
            KEY (data_id)
        ) ENGINE = InnoDB",
    ],
    // Version 2: the partitions a lock covers (verification checks every readable cell of
    // them holds the transaction).
    &["ALTER TABLE ttrans ADD COLUMN IF NOT EXISTS lock_partitions BLOB NULL"],
];

const _: () = assert!(MIGRATIONS.len() == SCHEMA_VERSION as usize);

/// Largest chunk of a record stored in one row (NEO uses 8 MiB chunks too).
const MAX_CHUNK: usize = 8 << 20;

/// Smallest `max_allowed_packet` we accept (the chunk size is half of it).
const MIN_PACKET: usize = 64 << 10;

/// MySQL error code: unknown database.
const ER_BAD_DB_ERROR: u16 = 1049;

/// How long a call waits for the server to come back after the connection was lost.
const RECONNECT_FOR: Duration = Duration::from_secs(30);

/// First and largest pause between reconnection attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// How long closing a broken connection may take (COM_QUIT to a dead peer).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Server (and client library) error codes meaning that the connection is gone, or that the
/// server cannot take it yet: ER_CON_COUNT_ERROR, ER_SERVER_SHUTDOWN, ER_ABORTING_CONNECTION,
/// ER_NEW_ABORTING_CONNECTION, ER_CONNECTION_KILLED (MariaDB), CR_SERVER_GONE_ERROR,
/// CR_SERVER_LOST, ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8).
const LOST_CODES: &[u16] = &[1040, 1053, 1152, 1184, 1927, 2006, 2013, 4031];

/// Whether `e` means that the connection is unusable (as opposed to an error of one statement).
fn is_connection_lost(e: &mysql_async::Error) -> bool {
    use mysql_async::{DriverError, Error};
    match e {
        Error::Io(_) => true,
        Error::Driver(d) => matches!(
            d,
            DriverError::ConnectionClosed
                | DriverError::PacketOutOfOrder
                | DriverError::UnexpectedPacket { .. }
                | DriverError::BadCompressedPacketHeader
                | DriverError::PoolDisconnected
        ),
        Error::Server(s) => LOST_CODES.contains(&s.code),
        Error::Other(_) | Error::Url(_) => false,
    }
}

thread_local! {
    /// Set by `db` when an error means the connection is lost. Errors become `BackendError`
    /// (which knows no driver) deep inside the calls; the backend runs them with `block_on` on
    /// its own (current-thread) runtime, thus on this thread, and reads the flag after each.
    static LOST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Map a driver error (the trait knows no driver, so no `From` impl), noting a lost connection.
fn db(e: mysql_async::Error) -> BackendError {
    if is_connection_lost(&e) {
        LOST.with(|l| l.set(true));
    }
    BackendError::Db(e.to_string())
}

// --- column readers: validate what the database returns instead of trusting it. `what` names
// the row for error messages; it is only evaluated on error.

/// Take column `idx` out of `row`.
fn take(row: &mut Row, idx: usize) -> Result<Value> {
    row.take::<Value, usize>(idx).ok_or_else(|| BackendError::Db(format!("result row has no column {idx}")))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::NULL => "NULL",
        Value::Bytes(_) => "bytes",
        Value::Int(_) | Value::UInt(_) => "integer",
        Value::Float(_) | Value::Double(_) => "float",
        Value::Date(..) => "date",
        Value::Time(..) => "time",
    }
}

fn opt_int(v: &Value, col: &str, what: &dyn Fn() -> String) -> Result<Option<i64>> {
    match v {
        Value::NULL => Ok(None),
        Value::Int(i) => Ok(Some(*i)),
        Value::UInt(u) => i64::try_from(*u)
            .map(Some)
            .map_err(|_| corrupt(format!("{}: column {col} holds {u}, out of range", what()))),
        // Text protocol (not used by prepared statements, but harmless to accept).
        Value::Bytes(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .map(Some)
            .ok_or_else(|| corrupt(format!("{}: column {col} holds bytes, expected an integer", what()))),
        other => Err(corrupt(format!("{}: column {col} holds a {} value, expected an integer", what(), kind(other)))),
    }
}

fn col_opt_int(row: &mut Row, idx: usize, col: &str, what: &dyn Fn() -> String) -> Result<Option<i64>> {
    opt_int(&take(row, idx)?, col, what)
}

fn col_int(row: &mut Row, idx: usize, col: &str, what: &dyn Fn() -> String) -> Result<i64> {
    col_opt_int(row, idx, col, what)?.ok_or_else(|| corrupt(format!("{}: column {col} is NULL", what())))
}

fn col_opt_tid(row: &mut Row, idx: usize, col: &str, what: &dyn Fn() -> String) -> Result<Option<Tid>> {
    col_opt_int(row, idx, col, what)?.map(|v| tid_of(v, col, what)).transpose()
}

fn col_tid(row: &mut Row, idx: usize, col: &str, what: &dyn Fn() -> String) -> Result<Tid> {
    tid_of(col_int(row, idx, col, what)?, col, what)
}

/// A BLOB column; with `lenient`, NULL is taken as empty (metadata columns).
fn col_blob(row: &mut Row, idx: usize, col: &str, lenient: bool, what: &dyn Fn() -> String) -> Result<Vec<u8>> {
    match take(row, idx)? {
        Value::Bytes(b) => Ok(b),
        Value::NULL if lenient => Ok(Vec::new()),
        other => Err(corrupt(format!("{}: column {col} holds a {} value, expected a blob", what(), kind(&other)))),
    }
}

// --- connection string

/// Percent-encode everything but unreserved URL characters.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The start of a socket path in NEO's `database` form.
fn is_socket_start(c: char) -> bool {
    matches!(c, '/' | '.' | '~')
}

/// In NEO's `[user[:password]@]database[unix_socket]` form, the '@' that ends the credentials:
/// the last one followed by a database name (a socket path may hold '@').
fn credentials_end(value: &str) -> Option<usize> {
    value
        .char_indices()
        .rev()
        .find(|&(i, c)| c == '@' && value[i + 1..].chars().next().is_some_and(|n| !is_socket_start(n) && n != '@'))
        .map(|(i, _)| i)
}

/// A MySQL `database` value (URL or NEO's form, valid or not) with its password replaced by
/// `***`, to show in errors and logs.
pub fn redact_database(value: &str) -> String {
    let (prefix, rest) = match value.find("://") {
        Some(i) => value.split_at(i + 3),
        None => ("", value),
    };
    // NEO's form: where parsing ends the credentials, else (invalid) the last '@'.
    let at = if prefix.is_empty() { credentials_end(rest).or_else(|| rest.rfind('@')) } else { rest.rfind('@') };
    match at.and_then(|at| rest[..at].split_once(':').map(|(user, _)| (user, at))) {
        Some((user, at)) => format!("{prefix}{user}:***{}", &rest[at..]),
        None => value.to_string(),
    }
}

const DATABASE_FORMS: &str = "expected [user[:password]@]database[unix_socket] (the socket path starting with '/', '.' or '~') \
     or mysql://user:password@host:port/database";

/// Parse a `--database` value: NEO's `[user[:password]@]database[unix_socket]` (the socket part
/// starts with `/`, `.` or `~`, as in NEO's mysql.py; without it, the server on localhost) or a
/// `mysql://user:password@host:port/database[?options]` URL. Returns a `mysql://` URL for
/// [`MysqlBackend::open`].
pub fn parse_database(value: &str) -> std::result::Result<String, String> {
    // Errors show the value without its password.
    let shown = || redact_database(value);
    if value.starts_with("mysql://") {
        let opts =
            Opts::from_url(value).map_err(|e| format!("invalid MySQL URL {:?}: {e}; {DATABASE_FORMS}", shown()))?;
        if opts.db_name().is_none_or(str::is_empty) {
            return Err(format!("MySQL URL {:?} names no database; {DATABASE_FORMS}", shown()));
        }
        return Ok(value.to_string());
    }
    let (credentials, rest) = match credentials_end(value) {
        Some(i) => (Some(&value[..i]), &value[i + 1..]),
        None => (None, value),
    };
    let (user, password) = match credentials {
        None => (None, None),
        Some(c) => {
            let (u, p) = match c.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (c, None),
            };
            if u.is_empty() {
                return Err(format!("invalid database {:?}: empty user name; {DATABASE_FORMS}", shown()));
            }
            (Some(u), p)
        }
    };
    let end = rest.find(is_socket_start).unwrap_or(rest.len());
    let (name, socket) = (&rest[..end], &rest[end..]);
    if name.is_empty() || name.contains('@') {
        return Err(format!("invalid database {:?}: no valid database name; {DATABASE_FORMS}", shown()));
    }
    let mut url = String::from("mysql://");
    if let Some(u) = user {
        url.push_str(&pct(u));
        if let Some(p) = password {
            url.push(':');
            url.push_str(&pct(p));
        }
        url.push('@');
    }
    url.push_str("localhost/");
    url.push_str(&pct(name));
    if !socket.is_empty() {
        let socket = match socket.strip_prefix('~') {
            Some(tail) if tail.is_empty() || tail.starts_with('/') => match std::env::var("HOME") {
                Ok(home) => format!("{home}{tail}"),
                Err(_) => socket.to_string(),
            },
            _ => socket.to_string(),
        };
        url.push_str("?socket=");
        url.push_str(&pct(&socket));
    }
    Ok(url)
}

// --- the backend

/// The MySQL storage backend. Not shared between threads: the node's database thread owns it.
pub struct MysqlBackend {
    link: Link,
    /// Data rows handed out by `store_data` and not voted yet (see `HeldData`).
    held: HeldData,
}

/// The connection, and what is needed to open it again.
struct Link {
    rt: tokio::runtime::Runtime,
    /// None when the connection was lost: the next call reconnects.
    conn: Option<Conn>,
    opts: Opts,
    cluster: String,
    /// Records longer than this are split into chunks of this size.
    chunk: usize,
    /// How long a reconnection may wait for the server.
    reconnect_for: Duration,
    /// Successful reconnections so far.
    reconnects: u64,
    /// Unlocks run but not committed yet (see the module documentation).
    deferred: Deferred,
}

/// Unlocks run in the connection's open transaction and not committed yet: the next commit of
/// a vote or a lock commits them too, or `idle`. Until then they are visible to this
/// connection only, which every read of the storage uses.
struct Deferred {
    /// (ttid, tid) of each, in order.
    unlocks: Vec<(Tid, Tid)>,
    /// Whether they are in the connection's open transaction; if not (the connection or the
    /// transaction was lost), the next call runs them again, committed, before anything else.
    open: bool,
    /// When the first of them ran: calls stop joining that transaction after `MAX_DEFER`
    /// (a storage that only serves reads for a while commits it).
    since: Option<Instant>,
    /// `MAX_DEFER` (tests change it).
    max: Duration,
}

impl Default for Deferred {
    fn default() -> Self {
        Deferred { unlocks: Vec::new(), open: false, since: None, max: MAX_DEFER }
    }
}

/// The longest an unlock stays uncommitted while the storage is busy with other calls.
const MAX_DEFER: Duration = Duration::from_millis(100);

impl std::fmt::Debug for MysqlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlBackend")
            .field("chunk", &self.link.chunk)
            .field("connected", &self.link.conn.is_some())
            .field("reconnects", &self.link.reconnects)
            .field("held", &self.held.len())
            .finish()
    }
}

impl Drop for MysqlBackend {
    fn drop(&mut self) {
        if self.link.deferred.open && tokio::runtime::Handle::try_current().is_err() {
            // Unlocks not committed are redone by the next verification; commit them anyway
            // (no reconnection: a lost connection lost them).
            let _ = self.link.exec("COMMIT".into());
        }
        if let Some(conn) = self.link.conn.take() {
            // block_on is impossible inside a runtime: then the driver closes it on drop.
            if tokio::runtime::Handle::try_current().is_err() {
                let _ = self.link.rt.block_on(async { tokio::time::timeout(CLOSE_TIMEOUT, conn.disconnect()).await });
            }
        }
    }
}

/// `block_on` panics inside an async runtime: refuse instead (the backend belongs to the
/// database thread).
fn outside_runtime() -> Result<()> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(BackendError::Db("the MySQL backend was called from an async task".into()));
    }
    Ok(())
}

async fn connect(opts: Opts) -> Result<Conn> {
    Conn::new(opts).await.map_err(db)
}

async fn begin(c: &mut Conn) -> Result<()> {
    c.query_drop("START TRANSACTION").await.map_err(db)
}

/// Commit if `r` is Ok, roll back otherwise; returns `r` (or the commit error).
async fn finish<T>(c: &mut Conn, r: Result<T>) -> Result<T> {
    match r {
        Ok(v) => {
            c.query_drop("COMMIT").await.map_err(db)?;
            Ok(v)
        }
        Err(e) => {
            // A failed rollback still tells (through `db`) whether the connection is lost.
            let _ = c.query_drop("ROLLBACK").await.map_err(db);
            Err(e)
        }
    }
}

/// Run `body` (statements, each ending with `;`) in ONE round trip: the statements go in one
/// query (mysql_async asks for CLIENT_MULTI_STATEMENTS), after `START TRANSACTION` unless one
/// is `open` (deferred unlocks), and before `COMMIT` if `commit` (the deferred unlocks are
/// committed with it). The server stops at a failing statement; the transaction is then
/// rolled back (deferred unlocks too: `Link::ready` runs them again). Values are inlined
/// (integers, `NULL`, `hex` literals): nothing else. See `MysqlBackend::committed` for the
/// state after a commit.
async fn run_script(c: &mut Conn, open: bool, body: &str, commit: bool) -> Result<()> {
    let start = if open { "" } else { "START TRANSACTION; " };
    let end = if commit { " COMMIT" } else { "" };
    let r = c.query_drop(format!("{start}{body}{end}")).await.map_err(db);
    if r.is_err() {
        // A failed rollback still tells (through `db`) whether the connection is lost.
        let _ = c.query_drop("ROLLBACK").await.map_err(db);
    }
    r
}

/// The statements of an unlock (see `Backend::unlock`), for a script.
fn unlock_statements(ttid: Tid, tid: Tid) -> String {
    let (ttid64, tid64) = (id64(ttid.0), id64(tid.0));
    format!(
        "INSERT INTO obj (`partition`, oid, tid, data_id, value_tid)
         SELECT `partition`, oid, {tid64}, data_id, value_tid FROM tobj WHERE tid = {ttid64}
         ON DUPLICATE KEY UPDATE data_id = VALUES(data_id), value_tid = VALUES(value_tid);
         INSERT INTO trans (`partition`, tid, packed, oids, user, description, ext, ttid)
         SELECT `partition`, {tid64}, 0, COALESCE(oids, ''), COALESCE(user, ''),
                COALESCE(description, ''), COALESCE(ext, ''), ttid
         FROM ttrans WHERE ttid = {ttid64} AND meta = 1
         ON DUPLICATE KEY UPDATE packed = VALUES(packed), oids = VALUES(oids), user = VALUES(user),
           description = VALUES(description), ext = VALUES(ext), ttid = VALUES(ttid);
         DELETE FROM tobj WHERE tid = {ttid64};
         DELETE FROM ttrans WHERE ttid = {ttid64}; "
    )
}

/// `b` as an SQL hexadecimal literal (`X'…'`), for scripts.
fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(3 + 2 * b.len());
    s.push_str("X'");
    for x in b {
        s.push(DIGITS[usize::from(x >> 4)] as char);
        s.push(DIGITS[usize::from(x & 15)] as char);
    }
    s.push('\'');
    s
}

/// An optional id as an SQL literal.
fn opt_id(v: Option<i64>) -> String {
    v.map_or_else(|| "NULL".to_string(), |v| v.to_string())
}

/// Objects whose last serials one query of `last_serials` reads.
const LAST_SERIALS_PER_QUERY: usize = 256;

/// Bytes of a vote script besides its values' literals: per object, and per vote.
const SCRIPT_PER_OBJECT: usize = 400;
const SCRIPT_OVERHEAD: usize = 1000;

/// The statements of `vote_data` as one script (see `run_script`), or None when it would be
/// longer than `limit` (then every record must fit in one chunk too, so `limit` is the chunk
/// size): each data row inserted or found (`ON DUPLICATE KEY`: the unique key on hash and
/// compression deduplicates, within the vote too) and its id kept in a session variable, the
/// temporary objects, the `ttrans` row.
fn vote_script(ttid: Tid, objects: &[(u32, NewObject)], meta: Option<(u32, &TxnMeta)>, limit: usize) -> Option<String> {
    use std::fmt::Write;
    let values: usize = objects.iter().map(|(_, o)| o.data.as_ref().map_or(0, |d| 2 * d.data.len())).sum();
    let meta_len =
        meta.map_or(0, |(_, m)| 2 * (8 * m.oids.len() + m.user.len() + m.description.len() + m.extension.len()));
    let estimate = SCRIPT_OVERHEAD + SCRIPT_PER_OBJECT * objects.len() + values + meta_len;
    if estimate > limit {
        return None;
    }
    let ttid64 = id64(ttid.0);
    let mut s = String::with_capacity(estimate);
    let mut rows = String::with_capacity(80 * objects.len());
    for (i, (partition, o)) in objects.iter().enumerate() {
        let data_id = match &o.data {
            Some(d) => data_statements(&mut s, i, d),
            None => "NULL".to_string(),
        };
        let _ = write!(
            rows,
            "{}({partition}, {}, {ttid64}, {data_id}, {})",
            if i == 0 { "" } else { ", " },
            id64(o.oid.0),
            opt_id(o.data_serial.map(|t| id64(t.0)))
        );
    }
    if !objects.is_empty() {
        let _ = write!(
            s,
            "INSERT INTO tobj (`partition`, oid, tid, data_id, value_tid) VALUES {rows}
             ON DUPLICATE KEY UPDATE `partition` = VALUES(`partition`), data_id = VALUES(data_id),
               value_tid = VALUES(value_tid); "
        );
    }
    let _ = match meta {
        Some((partition, m)) => write!(
            s,
            "INSERT INTO ttrans (ttid, `partition`, tid, meta, oids, user, description, ext)
             VALUES ({ttid64}, {partition}, NULL, 1, {}, {}, {}, {})
             ON DUPLICATE KEY UPDATE `partition` = VALUES(`partition`), meta = 1, oids = VALUES(oids),
               user = VALUES(user), description = VALUES(description), ext = VALUES(ext); ",
            hex(&encode_oids(&m.oids)),
            hex(&m.user),
            hex(&m.description),
            hex(&m.extension)
        ),
        None => write!(s, "INSERT INTO ttrans (ttid, meta) VALUES ({ttid64}, 0) ON DUPLICATE KEY UPDATE ttid = ttid; "),
    };
    Some(s)
}

/// Append to script `s` the statements that insert data `d` (in one chunk), or find the
/// identical row (`ON DUPLICATE KEY`: the unique key on hash and compression deduplicates),
/// and keep its id in the session variable `@d{i}`; returns the name of that variable.
fn data_statements(s: &mut String, i: usize, d: &NewData) -> String {
    use std::fmt::Write;
    let _ = write!(
        s,
        "INSERT INTO data (hash, compression, value, value_size) VALUES ({}, {}, {}, {})
         ON DUPLICATE KEY UPDATE id = LAST_INSERT_ID(id); SET @d{i} = LAST_INSERT_ID(); ",
        hex(&d.checksum),
        d.compression,
        hex(&d.data),
        d.data.len()
    );
    format!("@d{i}")
}

/// Bytes of a replication script besides its values' literals, per transaction.
const SCRIPT_PER_TRANSACTION: usize = 400;

/// The length `replicated_script` may reach (see `vote_script`): `store_replicated` writes
/// in one query when it is below the chunk size (then every record fits in one chunk too).
fn replicated_estimate(transactions: &[TxnInfo], objects: &[ReplObject]) -> usize {
    let values: usize = objects.iter().map(|o| o.data.as_ref().map_or(0, |d| 2 * d.data.len())).sum();
    let metas: usize = transactions
        .iter()
        .map(|t| {
            let m = &t.meta;
            SCRIPT_PER_TRANSACTION + 2 * (8 * m.oids.len() + m.user.len() + m.description.len() + m.extension.len())
        })
        .sum();
    SCRIPT_OVERHEAD + SCRIPT_PER_OBJECT * objects.len() + values + metas
}

/// The statements of `store_replicated` as one script (see `run_script`): the `trans` rows
/// and the `obj` rows (replacing those with the same key), their data rows inserted or
/// found as a vote does, the progress, and the pruning of the data rows among `replaced`
/// (those of the replaced revisions, not held) that nothing references any more.
fn replicated_script(
    partition: u32,
    transactions: &[TxnInfo],
    objects: &[ReplObject],
    progress: &ReplProgress,
    replaced: &[DataId],
) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(replicated_estimate(transactions, objects));
    for (i, t) in transactions.iter().enumerate() {
        let m = &t.meta;
        let _ = write!(
            s,
            "{}({partition}, {}, {}, {}, {}, {}, {}, {})",
            if i == 0 {
                "INSERT INTO trans (`partition`, tid, packed, oids, user, description, ext, ttid) VALUES "
            } else {
                ", "
            },
            id64(t.tid.0),
            u8::from(t.packed),
            hex(&encode_oids(&m.oids)),
            hex(&m.user),
            hex(&m.description),
            hex(&m.extension),
            id64(t.ttid.0)
        );
    }
    if !transactions.is_empty() {
        s.push_str(
            " ON DUPLICATE KEY UPDATE packed = VALUES(packed), oids = VALUES(oids), user = VALUES(user),
               description = VALUES(description), ext = VALUES(ext), ttid = VALUES(ttid); ",
        );
    }
    let mut rows = String::with_capacity(80 * objects.len());
    for (i, o) in objects.iter().enumerate() {
        let data_id = match &o.data {
            Some(d) => data_statements(&mut s, i, d),
            None => "NULL".to_string(),
        };
        let _ = write!(
            rows,
            "{}({partition}, {}, {}, {data_id}, {})",
            if i == 0 { "" } else { ", " },
            id64(o.oid.0),
            id64(o.tid.0),
            opt_id(o.data_serial.map(|t| id64(t.0)))
        );
    }
    if !objects.is_empty() {
        let _ = write!(
            s,
            "INSERT INTO obj (`partition`, oid, tid, data_id, value_tid) VALUES {rows}
             ON DUPLICATE KEY UPDATE data_id = VALUES(data_id), value_tid = VALUES(value_tid); "
        );
    }
    let _ = write!(
        s,
        "INSERT INTO config (name, value) VALUES ({}, {}) ON DUPLICATE KEY UPDATE value = VALUES(value); ",
        hex(progress_key(partition).as_bytes()),
        hex(encode_progress(progress).as_bytes())
    );
    if !replaced.is_empty() {
        let ids = replaced.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
        let _ = write!(
            s,
            "DELETE FROM data WHERE id IN ({ids})
               AND NOT EXISTS (SELECT 1 FROM obj WHERE obj.data_id = data.id)
               AND NOT EXISTS (SELECT 1 FROM tobj WHERE tobj.data_id = data.id);
             DELETE FROM bigdata WHERE data_id IN ({ids})
               AND NOT EXISTS (SELECT 1 FROM data WHERE data.id = bigdata.data_id); "
        );
    }
    s
}

/// Whether a failed call may be run again on a new connection (see the module documentation).
const RETRY: bool = true;
const NO_RETRY: bool = false;

/// Run `$fut` (a future using `$c`, evaluated again for a retry) on the backend's connection,
/// in autocommit mode: reconnect first if the connection was lost, commit the deferred unlocks
/// first (or run them again if they were lost, see `Link::ready`), and if the call loses the
/// connection, run it once more on a new connection when `$retry`.
macro_rules! on_conn {
    ($self:ident, $retry:expr, $c:ident, $fut:expr) => {
        call_on!($self, $retry, false, $c, $fut)
    };
}

/// `on_conn!` for the calls that join the transaction of deferred unlocks instead of
/// committing it first: reads (they see it), and the writes that end with their own commit
/// or unlock (`$fut` reads `$self.link.deferred.open` to know whether one is open).
macro_rules! joined {
    ($self:ident, $retry:expr, $c:ident, $fut:expr) => {
        call_on!($self, $retry, true, $c, $fut)
    };
}

macro_rules! call_on {
    ($self:ident, $retry:expr, $join:expr, $c:ident, $fut:expr) => {{
        outside_runtime()?;
        let mut retried = false;
        loop {
            $self.link.ensure()?;
            $self.link.ready($join)?;
            let rt = &$self.link.rt;
            let Some($c) = $self.link.conn.as_mut() else {
                break Err(BackendError::Db("no MySQL connection".into()));
            };
            LOST.with(|l| l.set(false));
            let r = rt.block_on($fut);
            let lost = $self.link.check_lost();
            if let Err(e) = &r
                && lost
                && $retry
                && !retried
            {
                tracing::warn!("MySQL connection lost ({e}): reconnecting to retry");
                retried = true;
                continue;
            }
            break r;
        }
    }};
}

/// Run `$body` (a future using `$c`) in one database transaction on the backend's connection,
/// as `on_conn!` does.
macro_rules! in_tx {
    ($self:ident, $retry:expr, $c:ident, $body:expr) => {
        on_conn!($self, $retry, $c, async {
            begin($c).await?;
            let r = $body.await;
            finish($c, r).await
        })
    };
}

impl Link {
    /// After a call: if it lost the connection (an error `db` classified as such, or the driver
    /// giving the connection up), drop it so that the next call reconnects. Returns whether it
    /// did.
    fn check_lost(&mut self) -> bool {
        let flagged = LOST.with(|l| l.replace(false));
        let lost = flagged || self.conn.as_ref().is_some_and(Conn::is_disconnected);
        if lost {
            // The server rolled the open transaction back.
            self.deferred.open = false;
        }
        if lost && let Some(conn) = self.conn.take() {
            tracing::warn!("MySQL connection lost: the next call reconnects");
            // Closing a dead connection fails at once; bound it for a silent peer.
            let _ = self.rt.block_on(async { tokio::time::timeout(CLOSE_TIMEOUT, conn.disconnect()).await });
        }
        lost
    }

    /// One statement (or script) on the connection, in whatever transaction is open; an error
    /// that loses the connection drops it (`check_lost`).
    fn exec(&mut self, sql: String) -> Result<()> {
        let r = match self.conn.as_mut() {
            Some(c) => self.rt.block_on(c.query_drop(sql)).map_err(db),
            None => Err(BackendError::Db("no MySQL connection".into())),
        };
        if r.is_err() {
            self.check_lost();
        }
        r
    }

    /// Before a call on a connection `ensure`d: commit the deferred unlocks unless the call
    /// `join`s their transaction, and run again, committed, those that were lost with their
    /// transaction (unlocks are idempotent: the locks they finish are durable). An error
    /// leaves them to the next call.
    fn ready(&mut self, join: bool) -> Result<()> {
        let young = self.deferred.since.is_some_and(|t| t.elapsed() < self.deferred.max);
        if self.deferred.unlocks.is_empty() || (self.deferred.open && join && young) {
            return Ok(());
        }
        if self.deferred.open {
            self.deferred.open = false;
            match self.exec("COMMIT".into()) {
                Ok(()) => {
                    self.deferred.unlocks.clear();
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(
                        "MySQL: commit of {} unlock(s) failed ({e}): running them again",
                        self.deferred.unlocks.len()
                    );
                    let _ = self.exec("ROLLBACK".into());
                    self.ensure()?;
                }
            }
        }
        let script: String = self.deferred.unlocks.iter().map(|(ttid, tid)| unlock_statements(*ttid, *tid)).collect();
        if let Err(e) = self.exec(format!("START TRANSACTION; {script} COMMIT")) {
            let _ = self.exec("ROLLBACK".into());
            return Err(e);
        }
        self.deferred.unlocks.clear();
        Ok(())
    }

    /// Reconnect if the connection was lost, retrying with a growing pause for at most
    /// `reconnect_for` (a restarting server) unless the failure cannot be transient.
    fn ensure(&mut self) -> Result<()> {
        if self.conn.is_some() {
            return Ok(());
        }
        let deadline = Instant::now() + self.reconnect_for;
        let mut pause = BACKOFF.0;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now()).max(BACKOFF.0);
            LOST.with(|l| l.set(false));
            let (opts, cluster) = (self.opts.clone(), self.cluster.as_str());
            let r = self.rt.block_on(async {
                match tokio::time::timeout(left, reconnect(opts, cluster)).await {
                    Ok(r) => r,
                    Err(_) => Err((BackendError::Db("timed out".into()), true)),
                }
            });
            let (e, transient) = match r {
                Ok((conn, chunk)) => {
                    // A smaller max_allowed_packet after a restart: smaller chunks from now on.
                    self.chunk = self.chunk.min(chunk);
                    self.conn = Some(conn);
                    self.reconnects += 1;
                    LOST.with(|l| l.set(false));
                    tracing::info!("MySQL connection reestablished after {attempts} attempt(s)");
                    return Ok(());
                }
                Err(e) => e,
            };
            LOST.with(|l| l.set(false));
            let now = Instant::now();
            if !transient || now + pause > deadline {
                return Err(BackendError::Db(format!(
                    "MySQL connection lost, and reconnecting failed after {attempts} attempt(s): {e}"
                )));
            }
            tracing::warn!("MySQL reconnection failed ({e}), retrying");
            std::thread::sleep(pause);
            pause = (pause * 2).min(BACKOFF.1);
        }
    }
}

/// Open a new connection for a backend already set up: session settings, then the checks that
/// the database is still the one opened (schema version and cluster); no migration. Returns the
/// connection and the chunk size; a failure says whether it may be transient.
async fn reconnect(opts: Opts, cluster: &str) -> std::result::Result<(Conn, usize), (BackendError, bool)> {
    // Transient: the server is unreachable or not ready (see `LOST_CODES`); access denied, a
    // missing database or a replaced schema are not.
    let transient = || LOST.with(|l| l.get());
    let mut c = connect(opts).await.map_err(|e| (e, transient()))?;
    let r = async {
        let chunk = session(&mut c, false).await?;
        let version = config_value(&mut c, "version").await?;
        if version.as_deref() != Some(SCHEMA_VERSION.to_string().as_str()) {
            return Err(corrupt(format!(
                "after reconnecting: schema version {version:?}, expected {SCHEMA_VERSION} (was the database replaced?)"
            )));
        }
        check_cluster(&mut c, cluster, false).await?;
        Ok(chunk)
    }
    .await;
    match r {
        Ok(chunk) => Ok((c, chunk)),
        Err(e) => {
            let transient = transient();
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, c.disconnect()).await;
            Err((e, transient))
        }
    }
}

/// Session settings and server checks; returns the chunk size. `warn`: log a server setting
/// that makes commits not durable.
async fn session(c: &mut Conn, warn: bool) -> Result<usize> {
    // Strict types; and never drop this (idle) connection: a storage may stay idle long.
    c.query_drop("SET SESSION sql_mode = 'TRADITIONAL', SESSION wait_timeout = 31536000").await.map_err(db)?;
    let row: Option<Row> =
        c.exec_first("SELECT @@max_allowed_packet, @@innodb_flush_log_at_trx_commit", ()).await.map_err(db)?;
    let mut row = row.ok_or_else(|| BackendError::Db("server variables: no row".into()))?;
    let what = || "server variables".to_string();
    let packet = col_opt_int(&mut row, 0, "max_allowed_packet", &what)?.unwrap_or(0);
    let flush = col_opt_int(&mut row, 1, "innodb_flush_log_at_trx_commit", &what)?;
    let packet = usize::try_from(packet).unwrap_or(0);
    if packet < MIN_PACKET {
        return Err(BackendError::Db(format!(
            "MySQL max_allowed_packet is {packet} bytes, at least {MIN_PACKET} are needed"
        )));
    }
    if warn && flush != Some(1) {
        tracing::warn!(
            "MySQL innodb_flush_log_at_trx_commit is {flush:?}, not 1: commits are not durable \
             (a crash of the MySQL host may lose recent transactions)"
        );
    }
    Ok((packet / 2).min(MAX_CHUNK))
}

impl MysqlBackend {
    /// Connect to `url` (`mysql://user:password@host:port/database`, see [`parse_database`]),
    /// create the database if it does not exist, create or upgrade its schema to
    /// `SCHEMA_VERSION`, and check that it belongs to cluster `cluster`.
    pub fn open(url: &str, cluster: &str) -> Result<MysqlBackend> {
        let opts = Opts::from_url(url).map_err(|e| BackendError::Db(format!("invalid MySQL URL: {e}")))?;
        let name = opts
            .db_name()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| BackendError::Db("MySQL URL names no database".into()))?
            .to_string();
        outside_runtime()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BackendError::Db(format!("cannot start the MySQL runtime: {e}")))?;
        let (conn, chunk) = rt.block_on(async {
            let mut conn = match Conn::new(opts.clone()).await {
                Ok(c) => c,
                Err(mysql_async::Error::Server(e)) if e.code == ER_BAD_DB_ERROR => {
                    let mut c = connect(OptsBuilder::from_opts(opts.clone()).db_name(None::<String>).into()).await?;
                    let q = format!("CREATE DATABASE IF NOT EXISTS `{}`", name.replace('`', "``"));
                    let r = c.query_drop(q).await.map_err(db);
                    let _ = c.disconnect().await;
                    r?;
                    connect(opts.clone()).await?
                }
                Err(e) => return Err(db(e)),
            };
            let r = Self::setup(&mut conn, cluster).await;
            match r {
                Ok(chunk) => Ok((conn, chunk)),
                Err(e) => {
                    let _ = conn.disconnect().await;
                    Err(e)
                }
            }
        })?;
        LOST.with(|l| l.set(false));
        let link = Link {
            rt,
            conn: Some(conn),
            opts,
            cluster: cluster.to_string(),
            chunk,
            reconnect_for: RECONNECT_FOR,
            reconnects: 0,
            deferred: Deferred::default(),
        };
        Ok(MysqlBackend { link, held: HeldData::default() })
    }

    /// Session settings, server checks and schema; returns the chunk size.
    async fn setup(c: &mut Conn, cluster: &str) -> Result<usize> {
        let chunk = session(c, true).await?;
        Self::init_schema(c, cluster).await?;
        Ok(chunk)
    }

    /// Create or upgrade the schema and check the cluster name. The version and cluster are
    /// checked before anything is written, so a wrong cluster leaves the database untouched.
    async fn init_schema(c: &mut Conn, cluster: &str) -> Result<()> {
        let has_config = first_int(
            c,
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'config'",
            (),
        )
        .await?;
        let version = if has_config.unwrap_or(0) > 0 {
            match config_value(c, "version").await? {
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
            check_cluster(c, cluster, false).await?;
        }
        for (i, statements) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            for sql in *statements {
                c.query_drop(*sql)
                    .await
                    .map_err(|e| BackendError::Db(format!("schema migration to version {}: {e}", i + 1)))?;
            }
        }
        begin(c).await?;
        let r = async {
            if version < SCHEMA_VERSION {
                set_config_row(c, "version", &SCHEMA_VERSION.to_string()).await?;
            }
            check_cluster(c, cluster, true).await
        }
        .await;
        finish(c, r).await
    }

    /// Drop one hold on each of `ids` (data stored by a transaction that is aborted before it
    /// voted). Call before `abort`, which then deletes the rows nothing references.
    pub fn release(&mut self, ids: &[DataId]) {
        self.held.release(ids);
    }

    /// After a joined write that ends with a commit (`run_script`): deferred unlocks were
    /// committed with it; if it failed, they were rolled back with it (and run again later).
    fn committed(&mut self, r: Result<()>) -> Result<()> {
        if r.is_ok() {
            self.link.deferred.unlocks.clear();
        }
        self.link.deferred.open = false;
        r
    }

    /// The server's id of the current connection (test hook: `KILL` it from elsewhere).
    #[cfg(test)]
    pub(crate) fn connection_id(&mut self) -> Result<u64> {
        let id = on_conn!(self, RETRY, c, first_int(c, "SELECT CONNECTION_ID()", ()))?;
        id.and_then(|v| u64::try_from(v).ok()).ok_or_else(|| BackendError::Db("no connection id".into()))
    }

    /// How long reads may join uncommitted unlocks (test hook; `MAX_DEFER` otherwise).
    #[cfg(test)]
    pub(crate) fn set_max_defer(&mut self, max: Duration) {
        self.link.deferred.max = max;
    }

    /// Successful reconnections so far (test hook).
    #[cfg(test)]
    pub(crate) fn reconnects(&self) -> u64 {
        self.link.reconnects
    }

    /// Reconnect to another TCP port from now on (test hook: an unreachable server).
    #[cfg(test)]
    pub(crate) fn set_port(&mut self, port: u16) {
        self.link.opts = OptsBuilder::from_opts(self.link.opts.clone()).tcp_port(port).into();
    }

    /// How long a reconnection may wait for the server (test hook).
    #[cfg(test)]
    pub(crate) fn set_reconnect_timeout(&mut self, timeout: Duration) {
        self.link.reconnect_for = timeout;
    }

    /// Chunk size used for large records (test hook: force chunking of small records).
    #[cfg(test)]
    pub(crate) fn set_chunk_size(&mut self, chunk: usize) {
        self.link.chunk = chunk.max(1);
    }
}

/// The integer in the first column of the first row of a query (None: no row, or NULL).
async fn first_int(c: &mut Conn, sql: &str, params: impl Into<mysql_async::Params> + Send) -> Result<Option<i64>> {
    let row: Option<Row> = c.exec_first(sql, params).await.map_err(db)?;
    match row {
        None => Ok(None),
        Some(mut row) => col_opt_int(&mut row, 0, "value", &|| sql.to_string()),
    }
}

async fn config_value(c: &mut Conn, key: &str) -> Result<Option<String>> {
    let row: Option<Row> = c.exec_first("SELECT value FROM config WHERE name = ?", (key,)).await.map_err(db)?;
    let Some(mut row) = row else {
        return Ok(None);
    };
    match take(&mut row, 0)? {
        Value::NULL => Ok(None),
        Value::Bytes(b) => {
            String::from_utf8(b).map(Some).map_err(|_| corrupt(format!("config {key:?}: value is not UTF-8")))
        }
        Value::Int(i) => Ok(Some(i.to_string())),
        Value::UInt(u) => Ok(Some(u.to_string())),
        other => Err(corrupt(format!("config {key:?}: value holds a {} value", kind(&other)))),
    }
}

async fn parse_config<T: std::str::FromStr>(c: &mut Conn, key: &str) -> Result<T> {
    let v = config_value(c, key).await?.ok_or_else(|| corrupt(format!("config {key:?} is missing")))?;
    v.parse().map_err(|_| corrupt(format!("config {key:?}: invalid value {v:?}")))
}

async fn set_config_row(c: &mut Conn, key: &str, value: &str) -> Result<()> {
    c.exec_drop(
        "INSERT INTO config (name, value) VALUES (?, ?) ON DUPLICATE KEY UPDATE value = VALUES(value)",
        (key, value),
    )
    .await
    .map_err(db)
}

/// Check the stored cluster name; with `store`, record `cluster` if none is stored yet.
async fn check_cluster(c: &mut Conn, cluster: &str, store: bool) -> Result<()> {
    match config_value(c, "name").await? {
        Some(found) if found != cluster => Err(BackendError::WrongCluster { found, expected: cluster.to_string() }),
        Some(_) => Ok(()),
        None if store => set_config_row(c, "name", cluster).await,
        None => Ok(()),
    }
}

/// Insert a data row (chunked if longer than `chunk`), or return the id of an identical one
/// (same checksum and compression). Call inside a transaction: the chunks go together.
async fn insert_data(c: &mut Conn, chunk: usize, checksum: &[u8], compression: u32, data: &[u8]) -> Result<DataId> {
    let existing: Option<Row> = c
        .exec_first("SELECT id FROM data WHERE hash = ? AND compression = ?", (checksum, compression))
        .await
        .map_err(db)?;
    if let Some(mut row) = existing {
        return col_int(&mut row, 0, "id", &|| "data row".to_string());
    }
    let mut chunks = data.chunks(chunk.max(1));
    let first = chunks.next().unwrap_or(&[]);
    c.exec_drop(
        "INSERT INTO data (hash, compression, value, value_size) VALUES (?, ?, ?, ?)",
        (checksum, compression, first, data.len() as u64),
    )
    .await
    .map_err(db)?;
    let id = c
        .last_insert_id()
        .and_then(|id| i64::try_from(id).ok())
        .ok_or_else(|| BackendError::Db("data: the server returned no insert id".into()))?;
    for (n, part) in chunks.enumerate() {
        c.exec_drop("INSERT INTO bigdata (data_id, n, value) VALUES (?, ?, ?)", (id, n as u64 + 1, part))
            .await
            .map_err(db)?;
    }
    Ok(id)
}

/// The data ids (distinct, not held) of the committed revisions among `objects` (of
/// `partition`), which writing `objects` replaces: one row of scalar subqueries (a primary
/// key seek each) per `LAST_SERIALS_PER_QUERY` objects.
async fn replaced_data_ids(
    c: &mut Conn,
    held: &HeldData,
    partition: u32,
    objects: &[ReplObject],
) -> Result<Vec<DataId>> {
    let mut out = Vec::new();
    for group in objects.chunks(LAST_SERIALS_PER_QUERY) {
        let columns: Vec<String> = group
            .iter()
            .map(|o| {
                format!(
                    "(SELECT data_id FROM obj WHERE `partition` = {partition} AND oid = {} AND tid = {})",
                    id64(o.oid.0),
                    id64(o.tid.0)
                )
            })
            .collect();
        let row: Option<Row> = c.query_first(format!("SELECT {}", columns.join(", "))).await.map_err(db)?;
        let mut row = row.ok_or_else(|| BackendError::Db("replaced revisions: the server returned no row".into()))?;
        for (i, o) in group.iter().enumerate() {
            out.extend(col_opt_int(&mut row, i, "data_id", &|| format!("object {} revision {}", o.oid, o.tid))?);
        }
    }
    out.retain(|id| !held.is_held(*id));
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// `store_replicated` in one round trip (see `replicated_script`), in the transaction of the
/// deferred unlocks if one is `open`, committed (with them).
async fn write_replicated_script(
    c: &mut Conn,
    open: bool,
    held: &HeldData,
    partition: u32,
    transactions: &[TxnInfo],
    objects: &[ReplObject],
    progress: &ReplProgress,
) -> Result<()> {
    let replaced = match replaced_data_ids(c, held, partition, objects).await {
        Ok(ids) => ids,
        Err(e) => {
            // As `run_script` does on failure: the deferred unlocks are run again later.
            let _ = c.query_drop("ROLLBACK").await.map_err(db);
            return Err(e);
        }
    };
    let script = replicated_script(partition, transactions, objects, progress, &replaced);
    run_script(c, open, &script, true).await
}

/// `store_replicated` statement by statement, in the open transaction (records longer than
/// `chunk` split into `bigdata`).
async fn write_replicated(
    c: &mut Conn,
    chunk: usize,
    held: &HeldData,
    partition: u32,
    transactions: &[TxnInfo],
    objects: &[ReplObject],
    progress: &ReplProgress,
) -> Result<()> {
    let replaced = replaced_data_ids(c, held, partition, objects).await?;
    for t in transactions {
        let m = &t.meta;
        c.exec_drop(
            "INSERT INTO trans (`partition`, tid, packed, oids, user, description, ext, ttid)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON DUPLICATE KEY UPDATE packed = VALUES(packed), oids = VALUES(oids), user = VALUES(user),
               description = VALUES(description), ext = VALUES(ext), ttid = VALUES(ttid)",
            (
                partition,
                id64(t.tid.0),
                t.packed,
                encode_oids(&m.oids),
                &m.user,
                &m.description,
                &m.extension,
                id64(t.ttid.0),
            ),
        )
        .await
        .map_err(db)?;
    }
    for o in objects {
        let data_id = match &o.data {
            Some(d) => Some(insert_data(c, chunk, &d.checksum, d.compression, &d.data).await?),
            None => None,
        };
        c.exec_drop(
            "INSERT INTO obj (`partition`, oid, tid, data_id, value_tid) VALUES (?, ?, ?, ?, ?)
             ON DUPLICATE KEY UPDATE data_id = VALUES(data_id), value_tid = VALUES(value_tid)",
            (partition, id64(o.oid.0), id64(o.tid.0), data_id, o.data_serial.map(|t| id64(t.0))),
        )
        .await
        .map_err(db)?;
    }
    set_config_row(c, &progress_key(partition), &encode_progress(progress)).await?;
    prune(c, held, replaced).await
}

/// A revision `fetch_objects` takes, before its data is read.
struct FetchedRow {
    oid: Oid,
    tid: Tid,
    data_serial: Option<Tid>,
    /// (data id, checksum, compression, size).
    data: Option<(DataId, Vec<u8>, u32, usize)>,
}

/// `fetch_objects`: the revisions (without their data) along the (partition, tid, oid) key,
/// as many as the budget takes, then the data of those only (each data row once).
async fn fetch_object_rows(
    c: &mut Conn,
    partition: u32,
    (min_tid, min_oid, max_tid): (i64, i64, i64),
    length: u32,
    max_bytes: usize,
) -> Result<Vec<ReplObject>> {
    let rows: Vec<Row> = c
        .exec(
            "SELECT o.oid, o.tid, o.data_id, o.value_tid, d.id, d.hash, d.compression, d.value_size
             FROM obj o FORCE INDEX (tid) LEFT JOIN data d ON d.id = o.data_id
             WHERE o.`partition` = ? AND ((o.tid = ? AND o.oid >= ?) OR (o.tid > ? AND o.tid <= ?))
             ORDER BY o.tid, o.oid LIMIT ?",
            (partition, min_tid, min_oid, min_tid, max_tid, length),
        )
        .await
        .map_err(db)?;
    let mut budget = FetchBudget::new(max_bytes);
    let mut taken = Vec::with_capacity(rows.len());
    // Data row → the first revision using it, to name it in errors.
    let mut users: std::collections::HashMap<DataId, (Oid, Tid, usize)> = std::collections::HashMap::new();
    // Data row → how many of the taken revisions use it.
    let mut uses: std::collections::HashMap<DataId, usize> = std::collections::HashMap::new();
    for mut row in rows {
        let row = &mut row;
        let oid = Oid(col_int(row, 0, "oid", &|| format!("object of partition {partition}"))? as u64);
        let tid = col_tid(row, 1, "tid", &|| format!("object {oid}"))?;
        let what = || format!("object {oid} revision {tid}");
        let data_id = col_opt_int(row, 2, "data_id", &what)?;
        let data_serial = col_opt_tid(row, 3, "value_tid", &what)?;
        let data = match data_id {
            None => None,
            Some(id) => {
                if col_opt_int(row, 4, "data.id", &what)?.is_none() {
                    return Err(corrupt(format!("{}: data row {id} does not exist", what())));
                }
                let what = || format!("object {oid} revision {tid} (data row {id})");
                let checksum = stored_checksum(col_blob(row, 5, "hash", false, &what)?, &what)?;
                let compression = compression_of(col_int(row, 6, "compression", &what)?, &what)?;
                let size = size_of(col_int(row, 7, "value_size", &what)?, &what)?;
                let size =
                    usize::try_from(size).map_err(|_| corrupt(format!("{}: invalid value size {size}", what())))?;
                Some((id, checksum, compression, size))
            }
        };
        if !budget.take(data.as_ref().map_or(0, |d| d.3 as u64)) {
            break;
        }
        if let Some((id, _, _, size)) = &data {
            users.entry(*id).or_insert((oid, tid, *size));
            *uses.entry(*id).or_insert(0) += 1;
        }
        taken.push(FetchedRow { oid, tid, data_serial, data });
    }
    let mut values = read_values(c, &users).await?;
    let mut out = Vec::with_capacity(taken.len());
    for r in taken {
        let data = match r.data {
            None => None,
            Some((id, checksum, compression, _)) => {
                // The last revision using a data row takes its value, the others a copy.
                let left = uses.get_mut(&id).map(|n| {
                    *n -= 1;
                    *n
                });
                let value = if left == Some(0) { values.remove(&id) } else { values.get(&id).cloned() };
                let data = value.ok_or_else(|| {
                    corrupt(format!("object {} revision {} (data row {id}): the data row vanished", r.oid, r.tid))
                })?;
                Some(NewData { checksum, compression, data })
            }
        };
        out.push(ReplObject { oid: r.oid, tid: r.tid, data, data_serial: r.data_serial });
    }
    Ok(out)
}

/// The values of the data rows `users` names (data id → a revision using it, and the size
/// the row records), chunks reassembled and checked against that size.
async fn read_values(
    c: &mut Conn,
    users: &std::collections::HashMap<DataId, (Oid, Tid, usize)>,
) -> Result<std::collections::HashMap<DataId, Vec<u8>>> {
    let mut values = std::collections::HashMap::with_capacity(users.len());
    if users.is_empty() {
        return Ok(values);
    }
    let what = |id: DataId| match users.get(&id) {
        Some((oid, tid, _)) => format!("object {oid} revision {tid} (data row {id})"),
        None => format!("data row {id}"),
    };
    let mut ids: Vec<DataId> = users.keys().copied().collect();
    ids.sort_unstable();
    let list = |ids: &[DataId]| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
    let rows: Vec<Row> =
        c.query(format!("SELECT id, value FROM data WHERE id IN ({})", list(&ids))).await.map_err(db)?;
    let mut big = Vec::new();
    for mut row in rows {
        let id = col_int(&mut row, 0, "id", &|| "data row".to_string())?;
        let value = col_blob(&mut row, 1, "value", false, &|| what(id))?;
        let size = users.get(&id).map_or(value.len(), |u| u.2);
        if value.len() < size {
            big.push(id);
        }
        values.insert(id, value);
    }
    if !big.is_empty() {
        let rows: Vec<Row> = c
            .query(format!(
                "SELECT data_id, n, value FROM bigdata WHERE data_id IN ({}) ORDER BY data_id, n",
                list(&big)
            ))
            .await
            .map_err(db)?;
        let mut expected: Option<(DataId, i64)> = None;
        for mut row in rows {
            let id = col_int(&mut row, 0, "bigdata.data_id", &|| "data chunk".to_string())?;
            let n = col_int(&mut row, 1, "bigdata.n", &|| what(id))?;
            let next = match expected {
                Some((last, k)) if last == id => k + 1,
                _ => 1,
            };
            if n != next {
                return Err(corrupt(format!("{}: chunk {next} is missing", what(id))));
            }
            expected = Some((id, n));
            let chunk = col_blob(&mut row, 2, "bigdata.value", false, &|| what(id))?;
            if let Some(value) = values.get_mut(&id) {
                value.extend_from_slice(&chunk);
            }
        }
    }
    for (id, (_, _, size)) in users {
        match values.get(id) {
            None => return Err(corrupt(format!("{}: the data row does not exist", what(*id)))),
            Some(v) if v.len() != *size => {
                return Err(corrupt(format!("{}: value of {} bytes, expected {size}", what(*id), v.len())));
            }
            Some(_) => {}
        }
    }
    Ok(values)
}

/// Rows per multi-row INSERT of temporary objects, largest first: any count is written with
/// few statements of a few fixed shapes (the statement cache keeps them prepared).
const BATCHES: [usize; 4] = [128, 32, 8, 1];

/// The rows of a vote: temporary objects keyed by ttid, and the `ttrans` row.
async fn write_vote(
    c: &mut Conn,
    ttid: Tid,
    objects: &[(u32, TempObject)],
    meta: Option<(u32, &TxnMeta)>,
) -> Result<()> {
    let ttid64 = id64(ttid.0);
    let mut rest = objects;
    while !rest.is_empty() {
        let n = BATCHES.iter().copied().find(|b| *b <= rest.len()).unwrap_or(1);
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        let mut sql = String::from("INSERT INTO tobj (`partition`, oid, tid, data_id, value_tid) VALUES ");
        let mut params: Vec<Value> = Vec::with_capacity(n * 5);
        for (i, (partition, o)) in batch.iter().enumerate() {
            sql.push_str(if i == 0 { "(?, ?, ?, ?, ?)" } else { ", (?, ?, ?, ?, ?)" });
            params.push(Value::from(*partition));
            params.push(Value::from(id64(o.oid.0)));
            params.push(Value::from(ttid64));
            params.push(Value::from(o.data_id));
            params.push(Value::from(o.data_serial.map(|t| id64(t.0))));
        }
        sql.push_str(
            " ON DUPLICATE KEY UPDATE `partition` = VALUES(`partition`), data_id = VALUES(data_id),
              value_tid = VALUES(value_tid)",
        );
        c.exec_drop(sql, params).await.map_err(db)?;
    }
    match meta {
        Some((partition, m)) => c
            .exec_drop(
                "INSERT INTO ttrans (ttid, `partition`, tid, meta, oids, user, description, ext)
                 VALUES (?, ?, NULL, 1, ?, ?, ?, ?)
                 ON DUPLICATE KEY UPDATE `partition` = VALUES(`partition`), meta = 1, oids = VALUES(oids),
                   user = VALUES(user), description = VALUES(description), ext = VALUES(ext)",
                (ttid64, partition, encode_oids(&m.oids), &m.user, &m.description, &m.extension),
            )
            .await
            .map_err(db),
        None => c
            .exec_drop("INSERT INTO ttrans (ttid, meta) VALUES (?, 0) ON DUPLICATE KEY UPDATE ttid = ttid", (ttid64,))
            .await
            .map_err(db),
    }
}

/// Delete the data rows among `ids` that are neither held nor referenced by obj or tobj, and
/// their chunks; a few statements of `BATCHES` rows each (in id order).
async fn prune(c: &mut Conn, held: &HeldData, ids: impl IntoIterator<Item = DataId>) -> Result<()> {
    let mut ids: Vec<DataId> = ids.into_iter().filter(|id| !held.is_held(*id)).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut rest = ids.as_slice();
    while !rest.is_empty() {
        let n = BATCHES.iter().copied().find(|b| *b <= rest.len()).unwrap_or(1);
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        let marks = vec!["?"; n].join(", ");
        let params: Vec<Value> = batch.iter().map(|id| Value::from(*id)).collect();
        c.exec_drop(
            format!(
                "DELETE FROM data WHERE id IN ({marks})
                   AND NOT EXISTS (SELECT 1 FROM obj WHERE obj.data_id = data.id)
                   AND NOT EXISTS (SELECT 1 FROM tobj WHERE tobj.data_id = data.id)"
            ),
            params.clone(),
        )
        .await
        .map_err(db)?;
        if c.affected_rows() > 0 {
            c.exec_drop(
                format!(
                    "DELETE FROM bigdata WHERE data_id IN ({marks})
                       AND NOT EXISTS (SELECT 1 FROM data WHERE data.id = bigdata.data_id)"
                ),
                params,
            )
            .await
            .map_err(db)?;
        }
    }
    Ok(())
}

/// The revisions `undo_info` needs, tagged with their kind (`UNDO_CURRENT`, ...). Parameters:
/// partition, oid, upper bound of current (inclusive); partition, oid, undone; partition, oid,
/// undone.
const UNDO_REVISIONS: &str = "SELECT 0, c.tid, c.value_tid FROM
       (SELECT tid, value_tid FROM obj WHERE `partition` = ? AND oid = ? AND tid <= ?
        ORDER BY tid DESC LIMIT 1) c
     UNION ALL
     SELECT 1, tid, value_tid FROM obj WHERE `partition` = ? AND oid = ? AND tid = ?
     UNION ALL
     SELECT 2, p.tid, p.value_tid FROM
       (SELECT tid, value_tid FROM obj WHERE `partition` = ? AND oid = ? AND tid < ?
        ORDER BY tid DESC LIMIT 1) p";

const _: () = assert!(super::common::UNDO_CURRENT == 0);
const _: () = assert!(super::common::UNDO_UNDONE == 1);
const _: () = assert!(super::common::UNDO_PREVIOUS == 2);

/// `UNION ALL` of the statement `select` makes for each of `partitions` (None if empty). Text
/// protocol, every value in the statement (integers): a prepared statement per partition list
/// would churn the connection's statement cache.
fn union_per_partition(partitions: &[u32], select: impl Fn(u32) -> String) -> Option<String> {
    let parts = distinct_partitions(partitions);
    if parts.is_empty() {
        return None;
    }
    Some(parts.into_iter().map(|p| format!("({})", select(p))).collect::<Vec<_>>().join(" UNION ALL "))
}

/// The TIDs in the first column of `rows`.
fn read_tids(rows: Vec<Row>) -> Result<Vec<Tid>> {
    rows.into_iter().map(|mut row| col_tid(&mut row, 0, "tid", &|| "transaction".to_string())).collect()
}

/// The columns of a `trans` row `read_txn` decodes, in order.
const TXN_COLUMNS: &str = "packed, oids, user, description, ext, ttid";

/// Decode the `TXN_COLUMNS` of transaction `tid` of `partition`, starting at column `first`.
fn read_txn(row: &mut Row, first: usize, partition: u32, tid: Tid) -> Result<TxnInfo> {
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

/// Load statements: `tid` condition none / `= at` / `< before` / both.
const LOAD_COLUMNS: &str = "SELECT o.tid, o.data_id, o.value_tid, d.id, d.hash, d.compression, d.value,
        (SELECT MIN(n.tid) FROM obj n WHERE n.`partition` = o.`partition` AND n.oid = o.oid
           AND n.tid > o.tid),
        d.value_size
    FROM obj o LEFT JOIN data d ON d.id = o.data_id
    WHERE o.`partition` = ? AND o.oid = ?";

/// Decode one row of `LOAD_COLUMNS`, fetching the other chunks of a large record.
async fn read_record(c: &mut Conn, mut row: Row, oid: Oid) -> Result<ObjectRecord> {
    let row = &mut row;
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
            let mut data = col_blob(row, 6, "value", false, &what)?;
            let size = col_int(row, 8, "value_size", &what)?;
            let size = usize::try_from(size).map_err(|_| corrupt(format!("{}: invalid value size {size}", what())))?;
            if size > data.len() {
                let chunks: Vec<Row> =
                    c.exec("SELECT n, value FROM bigdata WHERE data_id = ? ORDER BY n", (id,)).await.map_err(db)?;
                data.reserve_exact(size - data.len());
                for (i, mut chunk) in chunks.into_iter().enumerate() {
                    let n = col_int(&mut chunk, 0, "bigdata.n", &what)?;
                    if n != i as i64 + 1 {
                        return Err(corrupt(format!("{}: chunk {} is missing", what(), i + 1)));
                    }
                    data.extend_from_slice(&col_blob(&mut chunk, 1, "bigdata.value", false, &what)?);
                }
            }
            if data.len() != size {
                return Err(corrupt(format!("{}: value of {} bytes, expected {size}", what(), data.len())));
            }
            (compression, checksum, data)
        }
    };
    Ok(ObjectRecord { serial, next_serial, compression, checksum, data, data_serial })
}

async fn load_pt_rows(c: &mut Conn) -> Result<Option<PartitionTable>> {
    if config_value(c, "ptid").await?.is_none() {
        return Ok(None);
    }
    let ptid: u64 = parse_config(c, "ptid").await?;
    let replicas: u32 = parse_config(c, "replicas").await?;
    let np: u32 = parse_config(c, "partitions").await?;
    let mut rows: Vec<Vec<Cell>> = vec![Vec::new(); np as usize];
    let cells: Vec<Row> =
        c.exec("SELECT `partition`, nid, state FROM pt ORDER BY `partition`, nid", ()).await.map_err(db)?;
    for mut row in cells {
        let row = &mut row;
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
    PartitionTable::from_rows(Ptid(ptid), replicas, rows)
        .map(Some)
        .map_err(|e| corrupt(format!("partition table: {e}")))
}

impl Backend for MysqlBackend {
    fn engine(&self) -> &'static str {
        "MySQL"
    }

    fn get_config(&mut self, key: &str) -> Result<Option<String>> {
        on_conn!(self, RETRY, c, config_value(c, key))
    }

    fn set_config(&mut self, key: &str, value: Option<&str>) -> Result<()> {
        // Autocommitted, hence durable (see the module documentation).
        on_conn!(self, RETRY, c, async {
            match value {
                Some(v) => set_config_row(c, key, v).await,
                None => c.exec_drop("DELETE FROM config WHERE name = ?", (key,)).await.map_err(db),
            }
        })
    }

    fn load_pt(&mut self) -> Result<Option<PartitionTable>> {
        in_tx!(self, RETRY, c, load_pt_rows(c))
    }

    fn save_pt(&mut self, pt: &PartitionTable) -> Result<()> {
        in_tx!(self, RETRY, c, async {
            c.exec_drop("DELETE FROM pt", ()).await.map_err(db)?;
            let cells: Vec<(u64, i32, i32)> = pt
                .rows()
                .iter()
                .enumerate()
                .flat_map(|(p, row)| row.iter().map(move |cell| (p as u64, cell.nid.0, cell.state as i32)))
                .collect();
            c.exec_batch("INSERT INTO pt (`partition`, nid, state) VALUES (?, ?, ?)", cells).await.map_err(db)?;
            set_config_row(c, "ptid", &pt.ptid.0.to_string()).await?;
            set_config_row(c, "replicas", &pt.replicas.to_string()).await?;
            set_config_row(c, "partitions", &pt.np().to_string()).await
        })
    }

    fn last_ids(&mut self) -> Result<(Option<Tid>, Option<Oid>)> {
        // Loose index scans: one index dive per partition (GROUP BY on the leading column of
        // the primary keys) instead of full scans. One statement, so one consistent snapshot.
        on_conn!(self, RETRY, c, async {
            let row: Option<Row> = c
                .exec_first(
                    "SELECT
                       (SELECT MAX(m) FROM (SELECT MAX(tid) AS m FROM trans GROUP BY `partition`) t),
                       (SELECT MAX(m) FROM (SELECT MAX(oid) AS m FROM obj GROUP BY `partition`
                                            UNION ALL SELECT MAX(oid) FROM tobj) o)",
                    (),
                )
                .await
                .map_err(db)?;
            let mut row = row.ok_or_else(|| BackendError::Db("last_ids: no row".into()))?;
            let what = || "last ids".to_string();
            let tid = col_opt_tid(&mut row, 0, "trans.tid", &what)?;
            let oid = col_opt_int(&mut row, 1, "oid", &what)?.map(|v| Oid(v as u64));
            Ok((tid, oid))
        })
    }

    fn load(&mut self, partition: u32, oid: Oid, at: Option<Tid>, before: Option<Tid>) -> Result<Load> {
        let max = Tid::MAX.0;
        // A `before` beyond the largest storable TID excludes nothing; an `at` beyond it
        // matches nothing (-1 is never a valid stored TID).
        let before = before.filter(|b| b.0 <= max).map(|b| b.0 as i64);
        let at = at.map(|a| if a.0 <= max { a.0 as i64 } else { -1 });
        let oid64 = id64(oid.0);
        joined!(self, RETRY, c, async {
            let row: Option<Row> = match (at, before) {
                (None, None) => c.exec_first(format!("{LOAD_COLUMNS} ORDER BY o.tid DESC LIMIT 1"), (partition, oid64)),
                (Some(at), None) => c.exec_first(format!("{LOAD_COLUMNS} AND o.tid = ?"), (partition, oid64, at)),
                (None, Some(before)) => c.exec_first(
                    format!("{LOAD_COLUMNS} AND o.tid < ? ORDER BY o.tid DESC LIMIT 1"),
                    (partition, oid64, before),
                ),
                (Some(at), Some(before)) => {
                    c.exec_first(format!("{LOAD_COLUMNS} AND o.tid = ? AND o.tid < ?"), (partition, oid64, at, before))
                }
            }
            .await
            .map_err(db)?;
            if let Some(row) = row {
                return Ok(Load::Found(read_record(c, row, oid).await?));
            }
            let exists =
                first_int(c, "SELECT EXISTS (SELECT 1 FROM obj WHERE `partition` = ? AND oid = ?)", (partition, oid64))
                    .await?;
            Ok(if exists.unwrap_or(0) != 0 { Load::NotFound } else { Load::DoesNotExist })
        })
    }

    fn last_serial(&mut self, partition: u32, oid: Oid) -> Result<Option<Tid>> {
        joined!(self, RETRY, c, async {
            let row: Option<Row> = c
                .exec_first("SELECT MAX(tid) FROM obj WHERE `partition` = ? AND oid = ?", (partition, id64(oid.0)))
                .await
                .map_err(db)?;
            match row {
                None => Ok(None),
                Some(mut row) => col_opt_tid(&mut row, 0, "tid", &|| format!("object {oid}")),
            }
        })
    }

    fn last_serials(&mut self, objects: &[(u32, Oid)]) -> Result<Vec<Option<Tid>>> {
        let mut out = Vec::with_capacity(objects.len());
        // One row whose columns are the objects' last serials, per group: one round trip each.
        for group in objects.chunks(LAST_SERIALS_PER_QUERY) {
            let columns: Vec<String> = group
                .iter()
                .map(|(partition, oid)| {
                    format!("(SELECT MAX(tid) FROM obj WHERE `partition` = {partition} AND oid = {})", id64(oid.0))
                })
                .collect();
            let sql = format!("SELECT {}", columns.join(", "));
            let row: Option<Row> = joined!(self, RETRY, c, async { c.query_first(sql.as_str()).await.map_err(db) })?;
            let mut row = row.ok_or_else(|| BackendError::Db("last serials: the server returned no row".into()))?;
            for (i, (_, oid)) in group.iter().enumerate() {
                out.push(col_opt_tid(&mut row, i, "tid", &|| format!("object {oid}"))?);
            }
        }
        Ok(out)
    }

    fn transaction(&mut self, partition: u32, tid: Tid) -> Result<Option<TxnInfo>> {
        on_conn!(self, RETRY, c, async {
            let row: Option<Row> = c
                .exec_first(
                    format!("SELECT {TXN_COLUMNS} FROM trans WHERE `partition` = ? AND tid = ?"),
                    (partition, id64(tid.0)),
                )
                .await
                .map_err(db)?;
            match row {
                None => Ok(None),
                Some(mut row) => read_txn(&mut row, 0, partition, tid).map(Some),
            }
        })
    }

    fn object_history(&mut self, partition: u32, oid: Oid, offset: u32, length: u32) -> Result<Vec<(Tid, u64)>> {
        on_conn!(self, RETRY, c, async {
            let rows: Vec<Row> = c
                .exec(
                    "SELECT o.tid, o.data_id, d.id, d.value_size
                     FROM obj o LEFT JOIN data d ON d.id = o.data_id
                     WHERE o.`partition` = ? AND o.oid = ?
                     ORDER BY o.tid DESC LIMIT ? OFFSET ?",
                    (partition, id64(oid.0), length, offset),
                )
                .await
                .map_err(db)?;
            let mut out = Vec::with_capacity(rows.len());
            for mut row in rows {
                let row = &mut row;
                let serial = col_tid(row, 0, "tid", &|| format!("object {oid}"))?;
                let what = || format!("object {oid} revision {serial}");
                let size = match col_opt_int(row, 1, "data_id", &what)? {
                    None => 0,
                    Some(id) => {
                        if col_opt_int(row, 2, "data.id", &what)?.is_none() {
                            return Err(corrupt(format!("{}: data row {id} does not exist", what())));
                        }
                        let what = || format!("object {oid} revision {serial} (data row {id})");
                        size_of(col_int(row, 3, "value_size", &what)?, &what)?
                    }
                };
                out.push((serial, size));
            }
            Ok(out)
        })
    }

    fn tids(&mut self, partitions: &[u32], offset: u32, length: u32) -> Result<Vec<Tid>> {
        // Each partition newest first along the primary key (see `window_end`), in one
        // statement. Packed transactions are the oldest: the scan meets the others first.
        let limit = window_end(offset, length);
        let Some(sql) = union_per_partition(partitions, |p| {
            format!("SELECT tid FROM trans WHERE `partition` = {p} AND packed = 0 ORDER BY tid DESC LIMIT {limit}")
        }) else {
            return Ok(Vec::new());
        };
        let all = on_conn!(self, RETRY, c, async { read_tids(c.query(sql.as_str()).await.map_err(db)?) })?;
        Ok(merge_tids(all, true, offset, length))
    }

    fn tids_from(&mut self, partitions: &[u32], min: Tid, max: Tid, length: u32) -> Result<Vec<Tid>> {
        let Some((min, max)) = tid_range(min, max) else {
            return Ok(Vec::new());
        };
        let Some(sql) = union_per_partition(partitions, |p| {
            format!(
                "SELECT tid FROM trans WHERE `partition` = {p} AND tid >= {min} AND tid <= {max}
                 ORDER BY tid LIMIT {length}"
            )
        }) else {
            return Ok(Vec::new());
        };
        let all = on_conn!(self, RETRY, c, async { read_tids(c.query(sql.as_str()).await.map_err(db)?) })?;
        Ok(merge_tids(all, false, 0, length))
    }

    fn undo_info(&mut self, partition: u32, oid: Oid, undone: Tid, before: Option<Tid>) -> Result<Option<UndoInfo>> {
        let Some(current_max) = undo_current_max(before) else {
            return Ok(None);
        };
        if undone > Tid::MAX {
            return Ok(None);
        }
        let (oid64, undone64) = (id64(oid.0), id64(undone.0));
        let params: Vec<Value> = [(partition, current_max), (partition, undone64), (partition, undone64)]
            .iter()
            .flat_map(|&(p, t)| [Value::from(p), Value::from(oid64), Value::from(t)])
            .collect();
        // One statement, so one snapshot: current, undone and previous revisions.
        on_conn!(self, RETRY, c, async {
            let rows: Vec<Row> = c.exec(UNDO_REVISIONS, params.clone()).await.map_err(db)?;
            let mut revs = UndoRevisions::default();
            for mut row in rows {
                let row = &mut row;
                let what = || format!("object {oid} (undo of {undone})");
                let kind = col_int(row, 0, "kind", &what)?;
                let tid = col_tid(row, 1, "tid", &what)?;
                let value_tid = col_opt_tid(row, 2, "value_tid", &|| format!("object {oid} revision {tid}"))?;
                revs.set(kind, Revision { tid, value_tid }, &what)?;
            }
            Ok(revs.info())
        })
    }

    fn pack(&mut self, partitions: &[u32], tid: Tid) -> Result<()> {
        let Some(list) = partition_list(partitions) else {
            return Ok(());
        };
        let tid64 = tid_upper(tid);
        // Revisions older than the newest one <= tid of their object. The grouped derived table
        // (the newest revision <= tid per object: a loose index scan of the primary key, one
        // dive per object, as NEO forces too) is materialized, so obj may be deleted from
        // through it (MySQL refuses a DELETE whose subquery reads the same table).
        let older = format!(
            "FROM obj o JOIN (SELECT `partition`, oid, MAX(tid) AS m FROM obj FORCE INDEX (PRIMARY)
                              WHERE `partition` IN ({list}) AND tid <= {tid64}
                              GROUP BY `partition`, oid) t
               ON o.`partition` = t.`partition` AND o.oid = t.oid
             WHERE o.tid < t.m"
        );
        let held = &self.held;
        // Text protocol (values in the statements), as for `tids`. Durable on commit.
        in_tx!(self, RETRY, c, async {
            let rows: Vec<Row> =
                c.query(format!("SELECT DISTINCT o.data_id {older} AND o.data_id IS NOT NULL")).await.map_err(db)?;
            let mut candidates = Vec::with_capacity(rows.len());
            for mut row in rows {
                candidates.push(col_int(&mut row, 0, "data_id", &|| format!("revision packed at {tid}"))?);
            }
            c.query_drop(format!("DELETE o {older}")).await.map_err(db)?;
            // What remains <= tid is the newest revision of each object: a deletion goes too.
            c.query_drop(format!(
                "DELETE FROM obj WHERE `partition` IN ({list}) AND tid <= {tid64} AND data_id IS NULL"
            ))
            .await
            .map_err(db)?;
            c.query_drop(format!(
                "UPDATE trans SET packed = 1 WHERE `partition` IN ({list}) AND tid <= {tid64} AND packed = 0"
            ))
            .await
            .map_err(db)?;
            prune(c, held, candidates).await
        })
    }

    fn store_data(&mut self, _partition: u32, checksum: &[u8], compression: u32, data: &[u8]) -> Result<DataId> {
        check_data_args(checksum, compression)?;
        let id = in_tx!(self, NO_RETRY, c, insert_data(c, self.link.chunk, checksum, compression, data))?;
        self.held.hold(id);
        Ok(id)
    }

    fn vote(&mut self, ttid: Tid, objects: &[(u32, TempObject)], meta: Option<(u32, &TxnMeta)>) -> Result<()> {
        in_tx!(self, NO_RETRY, c, write_vote(c, ttid, objects, meta))?;
        // The voted objects now reference their data rows: drop the holds of store_data.
        self.held.voted(objects.iter().filter_map(|(_, o)| o.data_id));
        Ok(())
    }

    fn vote_data(&mut self, ttid: Tid, objects: &[(u32, NewObject)], meta: Option<(u32, &TxnMeta)>) -> Result<()> {
        for d in objects.iter().filter_map(|(_, o)| o.data.as_ref()) {
            check_data_args(&d.checksum, d.compression)?;
        }
        // One round trip when the statements fit in one query; else one per statement.
        if let Some(script) = vote_script(ttid, objects, meta, self.link.chunk) {
            let r = joined!(self, NO_RETRY, c, run_script(c, self.link.deferred.open, &script, true));
            return self.committed(r);
        }
        in_tx!(self, NO_RETRY, c, async {
            let chunk = self.link.chunk;
            let mut temp = Vec::with_capacity(objects.len());
            for (partition, o) in objects {
                let data_id = match &o.data {
                    Some(d) => Some(insert_data(c, chunk, &d.checksum, d.compression, &d.data).await?),
                    None => None,
                };
                temp.push((*partition, TempObject { oid: o.oid, data_id, data_serial: o.data_serial }));
            }
            write_vote(c, ttid, &temp, meta).await
        })
    }

    fn sync(&mut self) -> Result<()> {
        // Every commit is durable by itself (innodb_flush_log_at_trx_commit = 1).
        Ok(())
    }

    fn has_deferred(&self) -> bool {
        self.link.deferred.open
    }

    fn idle(&mut self) {
        if self.link.deferred.open {
            // A failure leaves them to the next call (`Link::ready`).
            if let Err(e) = self.link.ready(false) {
                tracing::warn!("MySQL: deferred unlocks not committed yet: {e}");
            }
        }
    }

    fn lock(&mut self, ttid: Tid, tid: Tid, partitions: &[u32]) -> Result<()> {
        let parts = encode_partitions(partitions).map_or_else(|| "NULL".to_string(), |p| hex(&p));
        let (ttid64, tid64) = (id64(ttid.0), id64(tid.0));
        // Commits the deferred unlocks too.
        let statement = format!(
            "INSERT INTO ttrans (ttid, tid, meta, lock_partitions) VALUES ({ttid64}, {tid64}, 0, {parts})
             ON DUPLICATE KEY UPDATE tid = VALUES(tid),
               lock_partitions = COALESCE(VALUES(lock_partitions), lock_partitions);"
        );
        // One statement: atomic by itself when no transaction is open.
        let r = joined!(self, RETRY, c, run_script(c, self.link.deferred.open, &statement, true));
        self.committed(r)
    }

    fn unlock(&mut self, ttid: Tid, tid: Tid) -> Result<()> {
        // One round trip, not committed (see `Deferred`): in the open transaction, or one it
        // starts.
        let u = unlock_statements(ttid, tid);
        let r = joined!(self, RETRY, c, run_script(c, self.link.deferred.open, &u, false));
        self.link.deferred.open = r.is_ok();
        if r.is_ok() {
            if self.link.deferred.unlocks.is_empty() {
                self.link.deferred.since = Some(Instant::now());
            }
            self.link.deferred.unlocks.push((ttid, tid));
        }
        r
    }

    fn abort(&mut self, ttid: Tid) -> Result<()> {
        let ttid64 = id64(ttid.0);
        let released = self.held.released();
        let held = &self.held;
        in_tx!(self, RETRY, c, async {
            let mut candidates = released.clone();
            let rows: Vec<Row> = c
                .exec("SELECT DISTINCT data_id FROM tobj WHERE tid = ? AND data_id IS NOT NULL", (ttid64,))
                .await
                .map_err(db)?;
            for mut row in rows {
                candidates.push(col_int(&mut row, 0, "data_id", &|| format!("temporary object of {ttid}"))?);
            }
            c.exec_drop("DELETE FROM tobj WHERE tid = ?", (ttid64,)).await.map_err(db)?;
            c.exec_drop("DELETE FROM ttrans WHERE ttid = ?", (ttid64,)).await.map_err(db)?;
            prune(c, held, candidates).await
        })?;
        self.held.clear_released();
        Ok(())
    }

    fn locked_transactions(&mut self) -> Result<Vec<LockedTxn>> {
        on_conn!(self, RETRY, c, async {
            let rows: Vec<Row> =
                c.exec("SELECT ttid, tid, lock_partitions FROM ttrans ORDER BY ttid", ()).await.map_err(db)?;
            let mut out = Vec::with_capacity(rows.len());
            for mut row in rows {
                let ttid = col_tid(&mut row, 0, "ttid", &|| "temporary transaction".to_string())?;
                let what = || format!("temporary transaction {ttid}");
                let tid = col_opt_tid(&mut row, 1, "tid", &what)?;
                let partitions = decode_partitions(&col_blob(&mut row, 2, "lock_partitions", true, &what)?, &what)?;
                out.push(LockedTxn { ttid, tid, partitions });
            }
            Ok(out)
        })
    }

    fn final_tid(&mut self, ttid: Tid) -> Result<Option<Tid>> {
        on_conn!(self, RETRY, c, async {
            let row: Option<Row> =
                c.exec_first("SELECT tid FROM trans WHERE ttid = ? LIMIT 1", (id64(ttid.0),)).await.map_err(db)?;
            match row {
                None => Ok(None),
                Some(mut row) => col_tid(&mut row, 0, "tid", &|| format!("transaction with ttid {ttid}")).map(Some),
            }
        })
    }

    fn drop_unfinished(&mut self) -> Result<()> {
        in_tx!(self, RETRY, c, async {
            c.exec_drop("DELETE FROM tobj WHERE tid IN (SELECT ttid FROM ttrans WHERE tid IS NULL)", ())
                .await
                .map_err(db)?;
            c.exec_drop("DELETE FROM ttrans WHERE tid IS NULL", ()).await.map_err(db)?;
            // Temporary objects without a transaction row cannot be unlocked: drop them too.
            c.exec_drop("DELETE FROM tobj WHERE tid NOT IN (SELECT ttid FROM ttrans)", ()).await.map_err(db)?;
            // No transaction is in flight: every data row nothing references goes, including
            // those stored before a crash by transactions that never voted.
            c.exec_drop(
                "DELETE FROM data WHERE NOT EXISTS (SELECT 1 FROM obj WHERE obj.data_id = data.id)
                   AND NOT EXISTS (SELECT 1 FROM tobj WHERE tobj.data_id = data.id)",
                (),
            )
            .await
            .map_err(db)?;
            c.exec_drop("DELETE FROM bigdata WHERE NOT EXISTS (SELECT 1 FROM data WHERE data.id = bigdata.data_id)", ())
                .await
                .map_err(db)
        })?;
        self.held.clear();
        Ok(())
    }

    fn release_data(&mut self, ids: &[DataId]) -> Result<()> {
        self.release(ids);
        Ok(())
    }

    fn partition_last_tid(&mut self, partition: u32) -> Result<Option<Tid>> {
        // Two index dives: the primary key of trans, the (partition, tid, oid) key of obj.
        on_conn!(self, RETRY, c, async {
            let row: Option<Row> = c
                .exec_first(
                    "SELECT (SELECT MAX(tid) FROM trans WHERE `partition` = ?),
                            (SELECT MAX(tid) FROM obj FORCE INDEX (tid) WHERE `partition` = ?)",
                    (partition, partition),
                )
                .await
                .map_err(db)?;
            let mut row = row.ok_or_else(|| BackendError::Db("partition_last_tid: no row".into()))?;
            let what = || format!("last TID of partition {partition}");
            let trans = col_opt_tid(&mut row, 0, "trans.tid", &what)?;
            let obj = col_opt_tid(&mut row, 1, "obj.tid", &what)?;
            Ok(trans.max(obj))
        })
    }

    fn fetch_transactions(&mut self, partition: u32, min: Tid, max: Tid, length: u32) -> Result<Vec<TxnInfo>> {
        let Some((min, max)) = tid_range(min, max) else {
            return Ok(Vec::new());
        };
        on_conn!(self, RETRY, c, async {
            let rows: Vec<Row> = c
                .exec(
                    format!(
                        "SELECT tid, {TXN_COLUMNS} FROM trans WHERE `partition` = ? AND tid >= ? AND tid <= ?
                         ORDER BY tid LIMIT ?"
                    ),
                    (partition, min, max, length),
                )
                .await
                .map_err(db)?;
            let mut out = Vec::with_capacity(rows.len());
            for mut row in rows {
                let tid = col_tid(&mut row, 0, "tid", &|| format!("transaction of partition {partition}"))?;
                out.push(read_txn(&mut row, 1, partition, tid)?);
            }
            Ok(out)
        })
    }

    fn fetch_objects(
        &mut self,
        partition: u32,
        min: (Tid, Oid),
        max: Tid,
        length: u32,
        max_bytes: usize,
    ) -> Result<Vec<ReplObject>> {
        let Some(range) = object_range(min, max) else {
            return Ok(Vec::new());
        };
        on_conn!(self, RETRY, c, fetch_object_rows(c, partition, range, length, max_bytes))
    }

    fn store_replicated(
        &mut self,
        partition: u32,
        transactions: &[TxnInfo],
        objects: &[ReplObject],
        progress: &ReplProgress,
    ) -> Result<()> {
        check_replicated(transactions, objects)?;
        // Idempotent (rows replaced, data deduplicated): retried on a new connection. Held
        // data rows are never pruned.
        let held = &self.held;
        if replicated_estimate(transactions, objects) <= self.link.chunk {
            // One round trip for the revisions it replaces, one for the writes, which commit
            // the deferred unlocks too (as a vote does).
            let r = joined!(
                self,
                RETRY,
                c,
                write_replicated_script(c, self.link.deferred.open, held, partition, transactions, objects, progress)
            );
            return self.committed(r);
        }
        let chunk = self.link.chunk;
        in_tx!(self, RETRY, c, write_replicated(c, chunk, held, partition, transactions, objects, progress))
    }

    fn replication_progress(&mut self, partition: u32) -> Result<Option<ReplProgress>> {
        let key = progress_key(partition);
        self.get_config(&key)?.map(|v| decode_progress(&key, &v)).transpose()
    }

    fn set_replication_progress(&mut self, partition: u32, progress: Option<&ReplProgress>) -> Result<()> {
        self.set_config(&progress_key(partition), progress.map(encode_progress).as_deref())
    }

    fn purge_partition(&mut self, partition: u32) -> Result<()> {
        let held = &self.held;
        let key = progress_key(partition);
        in_tx!(self, RETRY, c, async {
            let rows: Vec<Row> = c
                .exec("SELECT DISTINCT data_id FROM obj WHERE `partition` = ? AND data_id IS NOT NULL", (partition,))
                .await
                .map_err(db)?;
            let mut candidates = Vec::with_capacity(rows.len());
            for mut row in rows {
                candidates.push(col_int(&mut row, 0, "data_id", &|| format!("object of partition {partition}"))?);
            }
            c.exec_drop("DELETE FROM obj WHERE `partition` = ?", (partition,)).await.map_err(db)?;
            c.exec_drop("DELETE FROM trans WHERE `partition` = ?", (partition,)).await.map_err(db)?;
            // What replication saved is not here any more.
            c.exec_drop("DELETE FROM config WHERE name = ?", (key.as_str(),)).await.map_err(db)?;
            prune(c, held, candidates).await
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parsed(value: &str) -> Opts {
        Opts::from_url(&parse_database(value).unwrap()).unwrap()
    }

    #[test]
    fn parse_database_neo_form() {
        let o = parsed("neo");
        assert_eq!((o.user(), o.pass(), o.db_name(), o.socket()), (None, None, Some("neo"), None));
        assert_eq!(o.ip_or_hostname(), "localhost");
        let o = parsed("root@neo1");
        assert_eq!((o.user(), o.pass(), o.db_name()), (Some("root"), None, Some("neo1")));
        let o = parsed("user:secret@neo");
        assert_eq!((o.user(), o.pass(), o.db_name()), (Some("user"), Some("secret"), Some("neo")));
        // The password may hold ':' and '@' (NEO's regex: credentials end at the last '@').
        let o = parsed("u:p:w@x@db/run/mysql.sock");
        assert_eq!((o.user(), o.pass(), o.db_name()), (Some("u"), Some("p:w@x"), Some("db")));
        assert_eq!(o.socket(), Some("/run/mysql.sock"));
        let o = parsed("u:@neo/var/run/mysqld/mysqld.sock");
        // An empty password is no password.
        assert_eq!((o.user(), o.pass().unwrap_or("")), (Some("u"), ""));
        assert_eq!(o.socket(), Some("/var/run/mysqld/mysqld.sock"));
        let o = parsed("neo./mysql.sock");
        assert_eq!((o.db_name(), o.socket()), (Some("neo"), Some("./mysql.sock")));
        let o = parsed("neo~/s");
        let home = std::env::var("HOME").unwrap();
        assert_eq!(o.socket(), Some(format!("{home}/s").as_str()));
        // Characters that need escaping in a URL.
        let o = parsed("us%r:p w#?&@n-e_o/tmp/a b?c.sock");
        assert_eq!((o.user(), o.pass(), o.db_name()), (Some("us%r"), Some("p w#?&"), Some("n-e_o")));
        assert_eq!(o.socket(), Some("/tmp/a b?c.sock"));
    }

    /// Inside an async runtime the backend refuses to work (instead of tokio panicking).
    #[test]
    fn refuses_to_run_inside_a_runtime() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let r = rt.block_on(async { MysqlBackend::open("mysql://root@127.0.0.1:1/neo", "c").map(|_| ()) });
        assert!(matches!(r, Err(BackendError::Db(m)) if m.contains("async task")));
    }

    #[test]
    fn parse_database_url_form() {
        let url = "mysql://u:p@127.0.0.1:3307/neo?prefer_socket=false";
        assert_eq!(parse_database(url).unwrap(), url);
        let o = parsed(url);
        assert_eq!((o.ip_or_hostname(), o.tcp_port(), o.db_name()), ("127.0.0.1", 3307, Some("neo")));
    }

    #[test]
    fn parse_database_errors() {
        for bad in ["", "@neo", ":p@neo", "/tmp/sock", "user@", "user@/tmp/sock", "mysql://u@host", "mysql://u@h:x/db"]
        {
            let e = parse_database(bad).unwrap_err();
            assert!(e.contains("expected [user[:password]@]database[unix_socket]"), "{bad:?}: {e}");
        }
    }
}
