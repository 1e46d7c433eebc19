//! `neo_rs._neo`: the Python binding of neo-client. It exposes a low-level `Client` whose
//! methods take and return ZODB's 8-byte oids and tids; the ZODB storage class built on it is
//! the pure-Python `neo_rs.Storage` (python/neo_rs/__init__.py), which maps errors to ZODB's
//! exceptions and runs conflict resolution.
//!
//! Every `Client` of a process shares one small tokio runtime. Every call that waits on the
//! network releases the GIL (`Python::detach`) while the runtime works. Runtime threads never
//! take the GIL: other clients' invalidations and the tpc_finish callbacks are queued in
//! commit order (`Events`) and Python takes them (`take_events`) before it reports a last
//! transaction, so a busy Python thread never stalls the network work of the whole process.

use neo_client::{Client as RsClient, ClientConfig, ClientError, Invalidation, Transaction, TxnIterator};
use neo_lib::config::{Address, TlsFiles};
use neo_lib::{Oid, Tid};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::runtime::Runtime;

create_exception!(
    _neo,
    NeoError,
    PyException,
    "Error of the neo-rs client: args are (kind, message, oid, serial, committed)."
);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The Python exception for a client error: kind is one of conflict, read_conflict,
/// not_found, read_only, transaction, undo, storage; oid and serials are ints or None.
fn error(e: ClientError) -> PyErr {
    let msg = e.to_string();
    let (kind, oid, serial, committed) = match e {
        ClientError::Conflict { oid, serial, committed, .. } => {
            ("conflict", Some(oid.0), Some(serial.0), Some(committed.0))
        }
        ClientError::ReadConflict { oid, serial, committed } => {
            ("read_conflict", Some(oid.0), Some(serial.0), Some(committed.0))
        }
        ClientError::NotFound(oid) => ("not_found", Some(oid.0), None, None),
        ClientError::ReadOnly => ("read_only", None, None, None),
        ClientError::Transaction(_) => ("transaction", None, None, None),
        ClientError::Undo(_) => ("undo", None, None, None),
        _ => ("storage", None, None, None),
    };
    NeoError::new_err((kind, msg, oid, serial, committed))
}

fn id8(b: &[u8], what: &str) -> PyResult<u64> {
    let a: [u8; 8] =
        b.try_into().map_err(|_| PyValueError::new_err(format!("{what} must be 8 bytes, not {}", b.len())))?;
    Ok(u64::from_be_bytes(a))
}

fn oid(b: &[u8]) -> PyResult<Oid> {
    id8(b, "oid").map(Oid)
}

fn tid(b: &[u8]) -> PyResult<Tid> {
    id8(b, "tid").map(Tid)
}

fn b8<'py>(py: Python<'py>, v: u64) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &v.to_be_bytes())
}

fn opt_bytes<'py>(py: Python<'py>, d: Option<&[u8]>) -> Bound<'py, PyAny> {
    match d {
        Some(d) => PyBytes::new(py, d).into_any(),
        None => py.None().into_bound(py),
    }
}

fn opt_b8<'py>(py: Python<'py>, t: Option<Tid>) -> Bound<'py, PyAny> {
    match t {
        Some(t) => b8(py, t.0).into_any(),
        None => py.None().into_bound(py),
    }
}

/// A transaction in two-phase commit (opaque to Python).
#[pyclass(module = "neo_rs._neo")]
struct Txn {
    rt: Arc<Runtime>,
    inner: Mutex<Option<Transaction>>,
}

impl Drop for Txn {
    fn drop(&mut self) {
        // Dropping an unfinished transaction aborts it in the background: on the runtime.
        let _guard = self.rt.enter();
        lock(&self.inner).take();
    }
}

/// An iterator over transactions (see `Client.iterator`).
#[pyclass(module = "neo_rs._neo")]
struct TxnIter {
    rt: Arc<Runtime>,
    inner: Mutex<TxnIterator>,
}

#[pymethods]
impl TxnIter {
    /// The next transaction as (tid, packed, user, description, extension,
    /// [(oid, data or None, data_txn or None)]), or None at the end.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let rt = self.rt.clone();
        let r = py.detach(|| {
            let mut it = lock(&self.inner);
            rt.block_on(it.next())
        });
        let Some(t) = r.map_err(error)? else { return Ok(None) };
        let records = t
            .records
            .iter()
            .map(|r| {
                PyTuple::new(py, [b8(py, r.oid.0).into_any(), opt_bytes(py, r.data.as_deref()), opt_b8(py, r.data_txn)])
            })
            .collect::<PyResult<Vec<_>>>()?;
        let items: Vec<Bound<'py, PyAny>> = vec![
            b8(py, t.info.tid.0).into_any(),
            t.info.packed.into_pyobject(py)?.to_owned().into_any(),
            PyBytes::new(py, &t.info.user).into_any(),
            PyBytes::new(py, &t.info.description).into_any(),
            PyBytes::new(py, &t.info.extension).into_any(),
            records.into_pyobject(py)?.into_any(),
        ];
        Ok(Some(PyTuple::new(py, items)?))
    }
}

/// The process's client runtime, shared by every `Client`: two worker threads whatever the
/// number of storages a program opens (ZODB's race tests open dozens at once; a runtime each
/// meant hundreds of threads fighting for the GIL and the cores). A child process made by
/// `fork` gets a runtime of its own (the parent's threads do not exist there).
fn runtime() -> PyResult<Arc<Runtime>> {
    static RT: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut g = lock(&RT);
    if let Some((p, rt)) = g.as_ref()
        && *p == pid
    {
        return Ok(rt.clone());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::env::var("NEO_WORKERS").ok().and_then(|s| s.parse().ok()).unwrap_or(2))
        .thread_name("neo-client")
        .enable_all()
        .build()
        .map_err(|e| PyValueError::new_err(format!("cannot start the client runtime: {e}")))?;
    let rt = Arc::new(rt);
    if let Some((_, old)) = g.replace((pid, rt.clone())) {
        // The parent's runtime in a forked child: its threads are gone, dropping it could block.
        std::mem::forget(old);
    }
    Ok(rt)
}

/// What the runtime hands over to Python, in commit order.
enum Event {
    /// Another client committed `tid`, changing these objects.
    Invalidate(Tid, Vec<Oid>),
    /// Too many invalidations were waiting: every cached object must be considered changed.
    InvalidateAll,
    /// This process committed `tid`: run the tpc_finish callback registered as this token.
    Finished(Tid, u64),
}

/// Invalidations kept at most before they are replaced by one `InvalidateAll` (a process
/// that commits nothing and never starts a transaction must not hoard them).
const MAX_QUEUED_INVALIDATIONS: usize = 10_000;

/// The queue of `Event`s, filled by runtime threads without the GIL.
#[derive(Default)]
struct Events {
    queue: VecDeque<Event>,
    /// `Invalidate` events in the queue.
    invalidations: usize,
    /// An `InvalidateAll` is in the queue (further invalidations are covered by it).
    all: bool,
}

impl Events {
    fn push(&mut self, e: Event) {
        match e {
            Event::InvalidateAll => return self.invalidate_all(),
            Event::Invalidate(..) if self.all => return,
            Event::Invalidate(..) if self.invalidations >= MAX_QUEUED_INVALIDATIONS => return self.invalidate_all(),
            Event::Invalidate(..) => self.invalidations += 1,
            Event::Finished(..) => {}
        }
        self.queue.push_back(e);
    }

    /// One `InvalidateAll` replaces the invalidations queued (it covers them); finish events
    /// stay (their callbacks must run).
    fn invalidate_all(&mut self) {
        self.queue.retain(|e| matches!(e, Event::Finished(..)));
        self.queue.push_back(Event::InvalidateAll);
        self.invalidations = 0;
        self.all = true;
    }

    fn take(&mut self) -> VecDeque<Event> {
        self.invalidations = 0;
        self.all = false;
        std::mem::take(&mut self.queue)
    }
}

/// A connection to a neo-rs cluster.
#[pyclass(module = "neo_rs._neo")]
struct Client {
    rt: Arc<Runtime>,
    client: RsClient,
    events: Arc<Mutex<Events>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        // The runtime outlives this client: close its connections (a no-op after `close`).
        let c = self.client.clone();
        self.rt.spawn(async move { c.close().await });
    }
}

impl Client {
    fn block<'py, T: Send>(
        &self,
        py: Python<'py>,
        f: impl std::future::Future<Output = neo_client::Result<T>> + Send,
    ) -> PyResult<T> {
        let rt = self.rt.clone();
        py.detach(move || rt.block_on(f)).map_err(error)
    }

    fn with_txn<R>(&self, txn: &Txn, f: impl FnOnce(&mut Transaction) -> PyResult<R>) -> PyResult<R> {
        let mut g = lock(&txn.inner);
        match g.as_mut() {
            Some(t) => f(t),
            None => Err(error(ClientError::Transaction("transaction already finished or aborted".into()))),
        }
    }
}

/// Send the client's logs (`tracing`) to `logfile` (appended to), or to stderr when RUST_LOG
/// is set; RUST_LOG filters them (default: info). Logging is per process: the first client
/// that sets it up decides, later `logfile`s are only checked to be writable.
fn init_logging(logfile: Option<&str>) -> PyResult<()> {
    static DONE: Mutex<bool> = Mutex::new(false);
    let file = match logfile {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| pyo3::exceptions::PyOSError::new_err(format!("logfile {path}: {e}")))?,
        ),
        None => None,
    };
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // try_init fails if the process already has a subscriber: then that one is kept.
    match file {
        Some(file) => drop(builder.with_ansi(false).with_writer(Mutex::new(file)).try_init()),
        None if std::env::var_os("RUST_LOG").is_some() => drop(builder.with_writer(std::io::stderr).try_init()),
        None => return Ok(()),
    }
    *done = true;
    Ok(())
}

#[pymethods]
impl Client {
    /// Connect to the cluster `name` through `masters` ("host:port host:port", spaces or commas).
    #[new]
    #[pyo3(signature = (masters, name, read_only=false, ca=None, cert=None, key=None, cache_size=None, compress=true, connect_timeout=60.0, logfile=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        masters: &str,
        name: &str,
        read_only: bool,
        ca: Option<String>,
        cert: Option<String>,
        key: Option<String>,
        cache_size: Option<usize>,
        compress: bool,
        connect_timeout: f64,
        logfile: Option<String>,
    ) -> PyResult<Client> {
        init_logging(logfile.as_deref())?;
        let masters = masters
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(|s| Address::parse(s, None).map_err(|e| PyValueError::new_err(format!("master_nodes: {e}"))))
            .collect::<PyResult<Vec<_>>>()?;
        if masters.is_empty() {
            return Err(PyValueError::new_err("master_nodes: no address"));
        }
        let mut cfg = ClientConfig::new(masters, name);
        cfg.read_only = read_only;
        cfg.compress = compress;
        if let Some(c) = cache_size {
            cfg.cache_size = c;
        }
        if !connect_timeout.is_finite() || connect_timeout < 0.0 {
            return Err(PyValueError::new_err("connect_timeout must be a positive number of seconds"));
        }
        cfg.connect_timeout = Duration::from_secs_f64(connect_timeout);
        cfg.tls = match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles { ca: ca.into(), cert: cert.into(), key: key.into() }),
            (None, None, None) => None,
            _ => return Err(PyValueError::new_err("ca, cert and key go together")),
        };
        let rt = runtime()?;
        let rt2 = rt.clone();
        let client = py.detach(move || rt2.block_on(RsClient::connect(cfg))).map_err(error)?;
        Ok(Client { rt, client, events: Arc::default() })
    }

    fn close(&self, py: Python<'_>) {
        let (rt, c) = (self.rt.clone(), self.client.clone());
        py.detach(move || rt.block_on(c.close()));
    }

    /// Queue other clients' invalidations from now on (see `take_events`).
    fn queue_invalidations(&self) {
        let events = self.events.clone();
        self.client.set_invalidation_callback(move |i| {
            lock(&events).push(match i {
                Invalidation::Objects(t, oids) => Event::Invalidate(t, oids.to_vec()),
                Invalidation::All(_) => Event::InvalidateAll,
            });
        });
    }

    /// Take what was queued, in commit order: ("i", tid, [oid]) for another client's commit,
    /// ("a", None, None) when every cached object must be considered changed, ("f", tid,
    /// token) for the commit of `tpc_finish(txn, token)`. Everything up to the
    /// `last_transaction()` read before this call is in it.
    fn take_events<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let taken = lock(&self.events).take();
        taken
            .into_iter()
            .map(|e| match e {
                Event::Invalidate(t, oids) => {
                    let oids: Vec<Bound<'py, PyBytes>> = oids.iter().map(|o| b8(py, o.0)).collect();
                    PyTuple::new(
                        py,
                        ["i".into_pyobject(py)?.into_any(), b8(py, t.0).into_any(), oids.into_pyobject(py)?.into_any()],
                    )
                }
                Event::InvalidateAll => PyTuple::new(
                    py,
                    ["a".into_pyobject(py)?.into_any(), py.None().into_bound(py), py.None().into_bound(py)],
                ),
                Event::Finished(t, token) => PyTuple::new(
                    py,
                    ["f".into_pyobject(py)?.into_any(), b8(py, t.0).into_any(), token.into_pyobject(py)?.into_any()],
                ),
            })
            .collect()
    }

    fn last_transaction<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        b8(py, self.client.last_transaction().0)
    }

    fn sync(&self, py: Python<'_>) -> PyResult<()> {
        let c = self.client.clone();
        self.block(py, async move { c.sync().await })
    }

    fn new_oid<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let c = self.client.clone();
        let o = self.block(py, async move { c.new_oid().await })?;
        Ok(b8(py, o.0))
    }

    /// The greatest OID of a committed object, as an int (0 for an empty database).
    fn max_stored_oid(&self, py: Python<'_>) -> PyResult<u64> {
        let c = self.client.clone();
        Ok(self.block(py, async move { c.max_stored_oid().await })?.0)
    }

    /// (data, serial, next serial or None), or None if the object was created later.
    fn load_before<'py>(&self, py: Python<'py>, oid_: &[u8], before: &[u8]) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let (o, b, c) = (oid(oid_)?, tid(before)?, self.client.clone());
        // On this thread first (no runtime hop); the async path for anything unusual.
        let r = match py.detach(|| c.load_before_blocking(o, b)) {
            Some(r) => r.map_err(error)?,
            None => self.block(py, async move { c.load_before_shared(o, b).await })?,
        };
        match r {
            None => Ok(None),
            Some((d, s, n)) => {
                Ok(Some(PyTuple::new(py, [PyBytes::new(py, &d).into_any(), b8(py, s.0).into_any(), opt_b8(py, n)])?))
            }
        }
    }

    /// Load these objects, as they were before `before`, into the client cache (ZODB
    /// `prefetch`); returns once they are there. Errors are left to the loads that follow.
    fn prefetch(&self, py: Python<'_>, oids: Vec<Vec<u8>>, before: &[u8]) -> PyResult<()> {
        let oids = oids.iter().map(|o| oid(o)).collect::<PyResult<Vec<_>>>()?;
        let (b, c) = (tid(before)?, self.client.clone());
        self.block(py, async move {
            c.prefetch(&oids, b).await;
            Ok(())
        })
    }

    fn load_serial<'py>(&self, py: Python<'py>, oid_: &[u8], serial: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let (o, s, c) = (oid(oid_)?, tid(serial)?, self.client.clone());
        let d = self.block(py, async move { c.load_serial(o, s).await })?;
        Ok(PyBytes::new(py, &d))
    }

    /// A revision as stored: (data or None for a deletion, data_txn or None), or None.
    fn load_revision<'py>(&self, py: Python<'py>, oid_: &[u8], serial: &[u8]) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let (o, s, c) = (oid(oid_)?, tid(serial)?, self.client.clone());
        let r = self.block(py, async move { c.load_revision(o, s).await })?;
        match r {
            None => Ok(None),
            Some((d, t)) => Ok(Some(PyTuple::new(py, [opt_bytes(py, d.as_deref()), opt_b8(py, t)])?)),
        }
    }

    /// [(serial, size, user, description, extension)], newest first.
    fn history<'py>(&self, py: Python<'py>, oid_: &[u8], size: u32) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let (o, c) = (oid(oid_)?, self.client.clone());
        let h = self.block(py, async move { c.history(o, size).await })?;
        h.iter()
            .map(|e| {
                PyTuple::new(
                    py,
                    [
                        b8(py, e.serial.0).into_any(),
                        e.size.into_pyobject(py)?.into_any(),
                        PyBytes::new(py, &e.user).into_any(),
                        PyBytes::new(py, &e.description).into_any(),
                        PyBytes::new(py, &e.extension).into_any(),
                    ],
                )
            })
            .collect()
    }

    /// Undoable transactions, newest first.
    fn undoable_tids<'py>(&self, py: Python<'py>, offset: u32, length: u32) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let c = self.client.clone();
        let t = self.block(py, async move { c.undoable_tids(offset, length).await })?;
        Ok(t.iter().map(|t| b8(py, t.0)).collect())
    }

    /// (tid, user, description, extension, packed, [oids]).
    fn transaction_info<'py>(&self, py: Python<'py>, tid_: &[u8]) -> PyResult<Bound<'py, PyTuple>> {
        let (t, c) = (tid(tid_)?, self.client.clone());
        let i = self.block(py, async move { c.transaction_info(t).await })?;
        let oids: Vec<Bound<'py, PyBytes>> = i.oids.iter().map(|o| b8(py, o.0)).collect();
        let items: Vec<Bound<'py, PyAny>> = vec![
            b8(py, i.tid.0).into_any(),
            PyBytes::new(py, &i.user).into_any(),
            PyBytes::new(py, &i.description).into_any(),
            PyBytes::new(py, &i.extension).into_any(),
            i.packed.into_pyobject(py)?.to_owned().into_any(),
            oids.into_pyobject(py)?.into_any(),
        ];
        PyTuple::new(py, items)
    }

    #[pyo3(signature = (start=None, stop=None))]
    fn iterator(&self, start: Option<&[u8]>, stop: Option<&[u8]>) -> PyResult<TxnIter> {
        let start = start.map(tid).transpose()?;
        let stop = stop.map(tid).transpose()?;
        Ok(TxnIter { rt: self.rt.clone(), inner: Mutex::new(self.client.iterator(start, stop)) })
    }

    /// [(oid, current serial, undo serial or None, is_current)] for undoing `tid`.
    fn undo_plan<'py>(&self, py: Python<'py>, tid_: &[u8]) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let (t, c) = (tid(tid_)?, self.client.clone());
        let plan = self.block(py, async move { c.undo_plan(t).await })?;
        plan.iter()
            .map(|p| {
                PyTuple::new(
                    py,
                    [
                        b8(py, p.oid.0).into_any(),
                        b8(py, p.current.0).into_any(),
                        opt_b8(py, p.undo_serial),
                        p.is_current.into_pyobject(py)?.to_owned().into_any(),
                    ],
                )
            })
            .collect()
    }

    /// Pack at `tid`; returns the tid actually used.
    fn pack<'py>(&self, py: Python<'py>, tid_: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let (t, c) = (tid(tid_)?, self.client.clone());
        let r = self.block(py, async move { c.pack(t).await })?;
        Ok(b8(py, r.0))
    }

    #[pyo3(signature = (user, description, extension, tid_=None))]
    fn tpc_begin(
        &self,
        py: Python<'_>,
        user: &[u8],
        description: &[u8],
        extension: &[u8],
        tid_: Option<&[u8]>,
    ) -> PyResult<Txn> {
        let t = tid_.map(tid).transpose()?;
        let (c, u, d, e) = (self.client.clone(), user.to_vec(), description.to_vec(), extension.to_vec());
        let txn = self.block(py, async move {
            match t {
                Some(t) => c.tpc_begin_with_tid(t, &u, &d, &e).await,
                None => c.tpc_begin(&u, &d, &e).await,
            }
        })?;
        Ok(Txn { rt: self.rt.clone(), inner: Mutex::new(Some(txn)) })
    }

    /// Store `data` (None: delete) based on `serial`, optionally copied from `data_serial`.
    #[pyo3(signature = (txn, oid_, serial, data, data_serial=None))]
    fn store(
        &self,
        txn: &Txn,
        oid_: &[u8],
        serial: &[u8],
        data: Option<&[u8]>,
        data_serial: Option<&[u8]>,
    ) -> PyResult<()> {
        let (o, s) = (oid(oid_)?, tid(serial)?);
        let ds = data_serial.map(tid).transpose()?;
        let _guard = self.rt.enter();
        self.with_txn(txn, |t| self.client.store_with(t, o, s, data, ds).map_err(error))
    }

    fn check_current_serial(&self, txn: &Txn, oid_: &[u8], serial: &[u8]) -> PyResult<()> {
        let (o, s) = (oid(oid_)?, tid(serial)?);
        let _guard = self.rt.enter();
        self.with_txn(txn, |t| self.client.check_current_serial(t, o, s).map_err(error))
    }

    /// Store the undo of `oid` (its current revision is the undone one).
    fn store_undo(
        &self,
        py: Python<'_>,
        txn: &Txn,
        oid_: &[u8],
        current: &[u8],
        undo_serial: Option<&[u8]>,
    ) -> PyResult<()> {
        let (o, cur) = (oid(oid_)?, tid(current)?);
        let u = undo_serial.map(tid).transpose()?;
        let c = self.client.clone();
        self.with_txn(txn, |t| self.block(py, async move { c.store_undo(t, o, cur, u).await }))
    }

    /// Vote. Returns the conflicts as [(oid, serial, committed, read, data or None)]; the
    /// transaction is voted only when the list is empty.
    fn tpc_vote<'py>(&self, py: Python<'py>, txn: &Txn) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let c = self.client.clone();
        self.with_txn(txn, |t| {
            let r = {
                let rt = self.rt.clone();
                let t2 = &mut *t;
                py.detach(move || rt.block_on(c.tpc_vote(t2)))
            };
            match r {
                Ok(()) => Ok(Vec::new()),
                Err(ClientError::Conflict { .. } | ClientError::ReadConflict { .. }) if !t.conflicts().is_empty() => t
                    .conflicts()
                    .iter()
                    .map(|c| {
                        PyTuple::new(
                            py,
                            [
                                b8(py, c.oid.0).into_any(),
                                b8(py, c.serial.0).into_any(),
                                b8(py, c.committed.0).into_any(),
                                c.read.into_pyobject(py)?.to_owned().into_any(),
                                opt_bytes(py, c.data.as_deref().map(|d| d.as_slice())),
                            ],
                        )
                    })
                    .collect(),
                Err(e) => Err(error(e)),
            }
        })
    }

    /// Commit and return the tid. With a `token`, ("f", tid, token) is queued in order with
    /// other clients' invalidations, before `last_transaction` reports tid (see `take_events`).
    #[pyo3(signature = (txn, token=None))]
    fn tpc_finish<'py>(&self, py: Python<'py>, txn: &Txn, token: Option<u64>) -> PyResult<Bound<'py, PyBytes>> {
        let t = lock(&txn.inner).take();
        let Some(t) = t else {
            return Err(error(ClientError::Transaction("transaction already finished or aborted".into())));
        };
        let events = self.events.clone();
        let cb: neo_client::FinishCallback = Box::new(move |tid| {
            if let Some(token) = token {
                lock(&events).push(Event::Finished(tid, token));
            }
        });
        let c = self.client.clone();
        let tid = self.block(py, async move { c.tpc_finish_with(t, cb).await })?;
        Ok(b8(py, tid.0))
    }

    fn tpc_abort(&self, py: Python<'_>, txn: &Txn) -> PyResult<()> {
        let t = lock(&txn.inner).take();
        if let Some(t) = t {
            let c = self.client.clone();
            self.block(py, async move { c.tpc_abort(t).await })?;
        }
        Ok(())
    }

    /// (hits, misses, bytes cached).
    fn cache_stats(&self) -> (u64, u64, usize) {
        self.client.cache_stats()
    }

    fn clear_cache(&self) {
        self.client.clear_cache();
    }
}

#[pymodule]
fn _neo(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Client>()?;
    m.add_class::<Txn>()?;
    m.add_class::<TxnIter>()?;
    m.add("NeoError", m.py().get_type::<NeoError>())?;
    Ok(())
}
