//! The database thread: the backend lives on its own OS thread and async code sends it jobs
//! through a bounded channel, so no database call ever runs on an async worker thread.
//!
//! Group commit: a durable job (`call_durable`, `queue_durable`: lock) is answered only after
//! `Backend::sync`, and the thread runs every job already queued before syncing, so concurrent
//! transactions share one fsync. (A sync thread of its own, letting this one run votes and
//! unlocks during a sync, was tried: 1-client commits became slower by its wake-ups, see the
//! README.) A failed sync fails every later durable job (`Sticky`).
//!
//! Shared transactions: the writes of a commit (`queue_write`: vote, unlock)
//! and the durable jobs run, when more jobs are already queued behind them, inside one
//! database transaction that ends when the queue is empty (`Backend::begin_batch`; each
//! write's own transaction becomes a savepoint in it). The commits of concurrent transactions
//! rewrite the same pages (the last leaf of each table and index), which SQLite's log then
//! holds once per batch instead of once per write. A write's result is delivered only once
//! its batch is committed (an unlock releases its locks only on committed rows). A batch that
//! cannot commit fails its writes and, like a failed sync, every later durable job. Plain jobs
//! (`call`, `queue`: reads, configuration) run outside batches.
//!
//! Deferred work: a backend may leave work to finish (`Backend::has_deferred`; MySQL: an
//! unlock not committed, which the next commit commits with its own writes). Then the idle
//! thread waits up to `DEFER_FOR` for a job to share it with before `Backend::idle` finishes
//! it, and sleeps only after that.
//!
//! Write-back when idle: once the queue has been empty for `WRITEBACK_AFTER`, the thread asks
//! the backend to start writing what the last jobs committed (`Backend::start_writeback`), so
//! that the lock's sync, one or two network round trips later, finds little left to write.

use crate::backend::{Backend, BackendError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce(&mut dyn Backend) + Send>;
/// A write or durable job returns the function that delivers its result once its batch is
/// committed (and, for a durable job, synced): it is given the outcome of that.
type Reply = Box<dyn FnOnce(Result<(), &BackendError>) + Send>;
type WriteJob = Box<dyn FnOnce(&mut dyn Backend) -> Reply + Send>;

/// The result of a queued job (an error if the thread stopped).
pub type Queued<R> = oneshot::Receiver<R>;
/// The result of a queued durable job, once it is durable.
pub type Durable<T> = Queued<Result<T, BackendError>>;

/// An idle thread starts the write-back after spinning this long (see `serve`).
const WRITEBACK_AFTER: std::time::Duration = std::time::Duration::from_micros(50);

/// At most this many write and durable jobs share one batch, and durable jobs one sync.
const GROUP_MAX: usize = 128;

enum Msg {
    Job(Job),
    Write(WriteJob),
    Durable(WriteJob),
    /// Finish: the thread drops the backend (closing the database) and exits.
    Stop,
}

#[derive(Debug, thiserror::Error)]
#[error("the database thread has stopped")]
pub struct DbClosed;

/// Handle on the database thread (cheap to clone).
#[derive(Clone)]
pub struct Db {
    tx: mpsc::Sender<Msg>,
    thread: std::sync::Arc<Mutex<Option<JoinHandle<()>>>>,
    stats: Arc<Stats>,
}

/// What the thread counted (for the log at close, and tests).
#[derive(Default, Debug)]
pub struct Stats {
    /// Durable jobs run.
    pub durable: AtomicU64,
    /// Syncs done for them (fewer when they shared syncs).
    pub syncs: AtomicU64,
    /// A sync failed: no durable job can succeed any more (see `Sticky`).
    pub sync_failed: AtomicBool,
    /// Write-backs started when idle (`Backend::start_writeback`).
    pub writebacks: AtomicU64,
    /// Batches opened (database transactions shared by several jobs).
    pub batches: AtomicU64,
    /// Write and durable jobs run in a batch.
    pub batched: AtomicU64,
}

impl Db {
    /// Start the thread and open the backend on it with `open` (a backend may need its own
    /// runtime, which cannot start inside the node's); returns once it is open.
    pub async fn open<E, F>(open: F) -> Result<Db, E>
    where
        E: Send + 'static + From<std::io::Error>,
        F: FnOnce() -> Result<Box<dyn Backend>, E> + Send + 'static,
    {
        let (opened_tx, opened_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel::<Msg>(1024);
        let stats = Arc::new(Stats::default());
        let stats2 = stats.clone();
        let thread = std::thread::Builder::new().name("neo-db".into()).spawn(move || match open() {
            Ok(backend) => {
                let _ = opened_tx.send(Ok(()));
                serve(backend, rx, &stats2);
            }
            Err(e) => {
                let _ = opened_tx.send(Err(e));
            }
        })?;
        let db = Db { tx, thread: Arc::new(Mutex::new(Some(thread))), stats };
        match opened_rx.await {
            Ok(Ok(())) => Ok(db),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::other("the database thread died while opening").into()),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Whether a sync failed (every durable job fails since).
    pub fn sync_failed(&self) -> bool {
        self.stats.sync_failed.load(Ordering::Relaxed)
    }

    /// Run `f` on the database thread and return its result.
    pub async fn call<R, F>(&self, f: F) -> Result<R, DbClosed>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Backend) -> R + Send + 'static,
    {
        let (job, rx) = job(f);
        self.tx.send(Msg::Job(job)).await.map_err(|_| DbClosed)?;
        rx.await.map_err(|_| DbClosed)
    }

    /// Queue `f` as `call` does and return at once the receiver of its result: requests
    /// after it reach the thread after it, without waiting for it to run.
    pub async fn queue<R, F>(&self, f: F) -> Result<Queued<R>, DbClosed>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Backend) -> R + Send + 'static,
    {
        let (job, rx) = job(f);
        self.tx.send(Msg::Job(job)).await.map_err(|_| DbClosed)?;
        Ok(rx)
    }

    /// `call` from a thread outside the async runtime (which it blocks until the answer).
    pub fn call_blocking<R, F>(&self, f: F) -> Result<R, DbClosed>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Backend) -> R + Send + 'static,
    {
        let (job, rx) = job(f);
        self.tx.blocking_send(Msg::Job(job)).map_err(|_| DbClosed)?;
        rx.blocking_recv().map_err(|_| DbClosed)
    }

    /// Queue the write `f` and return at once the receiver of its result, delivered once what
    /// it wrote is committed (maybe in a batch with the jobs queued after it, see the module
    /// comment); the requests after it reach the thread after it.
    pub async fn queue_write<T, F>(&self, f: F) -> Result<Durable<T>, DbClosed>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Backend) -> Result<T, BackendError> + Send + 'static,
    {
        self.send_write(Msg::Write, write_job(f, "cannot commit")).await
    }

    /// Run `f` on the database thread; its result is delivered once what it committed is
    /// durable (`Backend::sync`, shared with the other durable jobs queued meanwhile).
    pub async fn call_durable<T, F>(&self, f: F) -> Result<Result<T, BackendError>, DbClosed>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Backend) -> Result<T, BackendError> + Send + 'static,
    {
        self.queue_durable(f).await?.await.map_err(|_| DbClosed)
    }

    /// Queue `f` as `call_durable` does and return at once the receiver of its result: the
    /// caller goes on with the requests after it (which reach the thread after `f`), and
    /// several of them share one sync.
    pub async fn queue_durable<T, F>(&self, f: F) -> Result<Durable<T>, DbClosed>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Backend) -> Result<T, BackendError> + Send + 'static,
    {
        self.send_write(Msg::Durable, write_job(f, "cannot make the commit durable")).await
    }

    async fn send_write<T>(
        &self,
        kind: fn(WriteJob) -> Msg,
        (job, rx): (WriteJob, Durable<T>),
    ) -> Result<Durable<T>, DbClosed> {
        self.tx.send(kind(job)).await.map_err(|_| DbClosed)?;
        Ok(rx)
    }

    /// Stop the thread once the queued jobs are done and wait for it (closes the database).
    pub async fn close(self) {
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        let _ = self.tx.send(Msg::Stop).await;
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
            let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
            let (durable, syncs, writebacks) =
                (load(&self.stats.durable), load(&self.stats.syncs), load(&self.stats.writebacks));
            let (batches, batched) = (load(&self.stats.batches), load(&self.stats.batched));
            tracing::info!(
                "database closed ({durable} durable jobs made durable by {syncs} syncs; {writebacks} write-backs; \
                 {batched} jobs in {batches} shared transactions)"
            );
        }
    }
}

/// A job running `f`, and the receiver of its result.
fn job<R, F>(f: F) -> (Job, oneshot::Receiver<R>)
where
    R: Send + 'static,
    F: FnOnce(&mut dyn Backend) -> R + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move |b| {
        let _ = tx.send(f(b));
    });
    (job, rx)
}

/// A write or durable job running `f`, and the receiver of its result, delivered with the
/// outcome of its batch's commit or sync (`failed` says what an error of that means).
fn write_job<T, F>(f: F, failed: &'static str) -> (WriteJob, Durable<T>)
where
    T: Send + 'static,
    F: FnOnce(&mut dyn Backend) -> Result<T, BackendError> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let job: WriteJob = Box::new(move |b| {
        let result = f(b);
        Box::new(move |done: Result<(), &BackendError>| {
            let result = match (result, done) {
                (Ok(v), Ok(())) => Ok(v),
                (Ok(_), Err(e)) => Err(BackendError::Db(format!("{failed}: {e}"))),
                (Err(e), _) => Err(e),
            };
            let _ = tx.send(result);
        })
    });
    (job, rx)
}

/// The database transaction shared by the write and durable jobs run while others were
/// queued (see the module comment).
#[derive(Default)]
struct Batch {
    open: bool,
    /// Results of the writes run in it, delivered once it is committed.
    written: Vec<Reply>,
}

impl Batch {
    /// Open one before a write if more jobs wait behind it and the backend can.
    fn begin_if(&mut self, more_queued: bool, backend: &mut dyn Backend, stats: &Stats) {
        if !self.open && more_queued && backend.begin_batch() {
            self.open = true;
            stats.batches.fetch_add(1, Ordering::Relaxed);
        }
        if self.open {
            stats.batched.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Deliver a write's result now if no batch is open (the write committed by itself),
    /// else once the batch is committed.
    fn written(&mut self, reply: Reply) {
        if self.open { self.written.push(reply) } else { reply(Ok(())) }
    }

    /// Commit the open batch, if any, and deliver its writes' results. A batch that cannot
    /// commit is rolled back: its writes fail, and so does every later sync (`Sticky`).
    fn end(&mut self, commit: impl FnOnce() -> Result<(), BackendError>, syncs: &mut Sticky, stats: &Stats) {
        if !std::mem::take(&mut self.open) {
            return;
        }
        let committed = commit();
        if let Err(e) = &committed {
            syncs.fail(format!("a shared transaction could not commit: {e}"));
            stats.sync_failed.store(true, Ordering::Relaxed);
        }
        for r in self.written.drain(..) {
            r(committed.as_ref().map(|_| ()));
        }
    }

    fn len(&self) -> usize {
        self.written.len()
    }
}

/// The database thread's loop (see the module comment for group commit and batches).
fn serve(mut backend: Box<dyn Backend>, mut rx: mpsc::Receiver<Msg>, stats: &Stats) {
    let mut syncs = Sticky::default();
    let mut replies: Vec<Reply> = Vec::new();
    let mut batch = Batch::default();
    // The jobs of a commit come one network round trip apart: waiting for the next one
    // awake saves a thread wake-up (see `proto::spin`).
    let mut spinner = proto::spin::Spinner::new(proto::spin::node_budget());
    // Timers only, for `wait_for` (None if it cannot be built: no waiting then).
    let timer = tokio::runtime::Builder::new_current_thread().enable_time().build().ok();
    let mut next = rx.blocking_recv();
    loop {
        match next {
            Some(Msg::Job(job)) => {
                batch.end(|| backend.commit_batch(), &mut syncs, stats);
                job(backend.as_mut())
            }
            Some(Msg::Write(job)) => {
                batch.begin_if(!rx.is_empty(), backend.as_mut(), stats);
                batch.written(job(backend.as_mut()));
            }
            Some(Msg::Durable(job)) => {
                batch.begin_if(!rx.is_empty(), backend.as_mut(), stats);
                replies.push(job(backend.as_mut()));
            }
            Some(Msg::Stop) | None => break,
        }
        next = if replies.len() + batch.len() < GROUP_MAX { rx.try_recv().ok() } else { None };
        if next.is_none() {
            batch.end(|| backend.commit_batch(), &mut syncs, stats);
            if !replies.is_empty() {
                sync(backend.as_mut(), &mut replies, &mut syncs, stats);
            }
            // Idle: the write-back starts once the answers of the last jobs had time to go
            // out (its system call would compete with them for the CPU), or before sleeping.
            let idle = std::time::Instant::now();
            next = spinner.spin(|| {
                let m = rx.try_recv().ok();
                if m.is_none() && idle.elapsed() >= WRITEBACK_AFTER {
                    write_back(backend.as_mut(), stats);
                }
                m
            });
            if next.is_none() {
                write_back(backend.as_mut(), stats);
                if backend.has_deferred() {
                    // Deferred work waits a while for a job to share it with.
                    match wait_for(timer.as_ref(), &mut rx, DEFER_FOR) {
                        Waited::Job(m) => next = Some(m),
                        Waited::Closed => break,
                        Waited::Timeout => {}
                    }
                }
                if next.is_none() {
                    backend.idle();
                    next = rx.blocking_recv();
                }
            }
        }
    }
    batch.end(|| backend.commit_batch(), &mut syncs, stats);
    if !replies.is_empty() {
        sync(backend.as_mut(), &mut replies, &mut syncs, stats);
    }
    backend.idle();
}

/// Sync for the durable jobs run since the last sync and deliver their results.
fn sync(backend: &mut dyn Backend, replies: &mut Vec<Reply>, syncs: &mut Sticky, stats: &Stats) {
    stats.durable.fetch_add(replies.len() as u64, Ordering::Relaxed);
    stats.syncs.fetch_add(1, Ordering::Relaxed);
    let synced = syncs.sync(|| backend.sync());
    if synced.is_err() {
        stats.sync_failed.store(true, Ordering::Relaxed);
    }
    for r in replies.drain(..) {
        r(synced);
    }
}

/// Start the backend's write-back if one is due (a no-op otherwise, see `start_writeback`).
/// How long deferred work (`Backend::has_deferred`) waits for the next job to share it with
/// before `Backend::idle` finishes it: a client committing in a loop sends its next commit
/// within a few milliseconds.
const DEFER_FOR: std::time::Duration = std::time::Duration::from_millis(20);

enum Waited {
    Job(Msg),
    Closed,
    Timeout,
}

/// The next message, if one comes within `d` (at once without a timer runtime).
fn wait_for(timer: Option<&tokio::runtime::Runtime>, rx: &mut mpsc::Receiver<Msg>, d: std::time::Duration) -> Waited {
    let Some(rt) = timer else { return Waited::Timeout };
    match rt.block_on(async { tokio::time::timeout(d, rx.recv()).await }) {
        Ok(Some(m)) => Waited::Job(m),
        Ok(None) => Waited::Closed,
        Err(_) => Waited::Timeout,
    }
}

fn write_back(backend: &mut dyn Backend, stats: &Stats) {
    if backend.start_writeback() {
        stats.writebacks.fetch_add(1, Ordering::Relaxed);
    }
}

/// Syncs that fail for good: once one failed, the system may have dropped the pages it could
/// not write, and a later sync that succeeds would not make them durable.
#[derive(Default)]
struct Sticky {
    failed: Option<BackendError>,
}

impl Sticky {
    /// Fail every later sync (what was written may not be on disk).
    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            tracing::error!("{why}: every later commit of this storage fails");
            self.failed = Some(BackendError::Db(format!("{why}, no later commit is durable here")));
        }
    }

    fn sync(&mut self, sync: impl FnOnce() -> Result<(), BackendError>) -> Result<(), &BackendError> {
        if self.failed.is_none()
            && let Err(e) = sync()
        {
            tracing::error!("{e}: every later commit of this storage fails");
            self.failed = Some(BackendError::Db(format!("a sync failed, no later commit is durable here: {e}")));
        }
        match &self.failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sqlite::SqliteBackend;
    use neo_lib::Tid;

    #[tokio::test]
    async fn durable_jobs_queued_together_share_one_sync() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.sqlite");
        let db = open_sqlite(&path).await?;
        let (blocker, go_tx) = hold_thread(&db).await?;
        let mut pending = Vec::new();
        for i in 0..10u32 {
            pending.push(db.queue_durable(move |b| b.set_config(&format!("k{i}"), Some("v")).map(|()| i)).await?);
        }
        go_tx.send(())?;
        blocker.await??;
        for (i, p) in pending.into_iter().enumerate() {
            assert_eq!(p.await??, i as u32);
        }
        assert_eq!(db.stats().durable.load(Ordering::Relaxed), 10);
        assert_eq!(db.stats().syncs.load(Ordering::Relaxed), 1, "the 10 jobs queued together share one sync");
        // One after the other, each has its own.
        db.call_durable(|b| b.set_config("a", Some("1"))).await??;
        db.call_durable(|b| b.set_config("b", Some("1"))).await??;
        assert_eq!(db.stats().syncs.load(Ordering::Relaxed), 3);
        assert_eq!(db.call(|b| b.get_config("k9")).await??.as_deref(), Some("v"));
        db.close().await;
        Ok(())
    }

    /// The database thread on a SQLite database at `path` (created for cluster "c").
    async fn open_sqlite(path: &std::path::Path) -> Result<Db, std::io::Error> {
        let path = path.to_owned();
        Db::open(move || -> Result<Box<dyn Backend>, std::io::Error> {
            Ok(Box::new(SqliteBackend::open(&path, "c").map_err(std::io::Error::other)?))
        })
        .await
    }

    /// A job that keeps the thread busy until `go` is sent, so that the next ones queue up.
    async fn hold_thread(
        db: &Db,
    ) -> Result<(tokio::task::JoinHandle<Result<(), DbClosed>>, std::sync::mpsc::Sender<()>), Box<dyn std::error::Error>>
    {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let db2 = db.clone();
        let blocker = tokio::spawn(async move {
            db2.call(move |_| {
                let _ = started_tx.send(());
                let _ = go_rx.recv();
            })
            .await
        });
        tokio::task::spawn_blocking(move || started_rx.recv()).await??;
        Ok((blocker, go_tx))
    }

    #[tokio::test]
    async fn writes_queued_together_share_one_transaction_committed_before_their_answers()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.sqlite");
        let db = open_sqlite(&path).await?;
        // Alone in the queue: committed by itself, no shared transaction.
        db.queue_write(|b| b.set_config("alone", Some("1"))).await?.await??;
        assert_eq!(db.stats().batches.load(Ordering::Relaxed), 0);
        let (blocker, go) = hold_thread(&db).await?;
        let mut pending = Vec::new();
        for i in 0..10u32 {
            let reader_path = path.clone();
            pending.push(
                db.queue_write(move |b| {
                    // Another connection does not see the previous write yet: not committed.
                    let mut reader = SqliteBackend::open_reader(&reader_path)?;
                    let seen = if i > 0 { reader.get_config(&format!("k{}", i - 1))? } else { None };
                    b.set_config(&format!("k{i}"), Some("v"))?;
                    Ok((i, seen))
                })
                .await?,
            );
        }
        // A write that fails leaves the others alone.
        let failed = db.queue_write(|_| Err::<(), _>(BackendError::Db("refused".into()))).await?;
        let durable = db.queue_durable(|b| b.set_config("d", Some("1"))).await?;
        go.send(())?;
        blocker.await??;
        for (i, p) in pending.into_iter().enumerate() {
            assert_eq!(p.await??, (i as u32, None), "write {i} ran in the shared transaction");
        }
        assert!(failed.await?.is_err_and(|e| e.to_string().contains("refused")));
        durable.await??;
        assert_eq!(db.stats().batches.load(Ordering::Relaxed), 1);
        assert_eq!(db.stats().batched.load(Ordering::Relaxed), 12);
        // Answered once committed: every write is visible to another connection.
        let mut reader = SqliteBackend::open_reader(&path)?;
        for key in ["k0", "k9", "d", "alone"] {
            assert!(reader.get_config(key)?.is_some(), "{key} committed");
        }
        // Plain jobs run outside shared transactions.
        let (blocker, go) = hold_thread(&db).await?;
        let reads: Vec<_> = [db.queue(|b| b.get_config("k1")).await?, db.queue(|b| b.get_config("k2")).await?].into();
        go.send(())?;
        blocker.await??;
        for r in reads {
            assert_eq!(r.await??.as_deref(), Some("v"));
        }
        assert_eq!(db.stats().batches.load(Ordering::Relaxed), 1);
        db.close().await;
        Ok(())
    }

    #[test]
    fn a_shared_transaction_that_cannot_commit_fails_its_writes_and_every_later_sync()
    -> Result<(), Box<dyn std::error::Error>> {
        let (mut batch, mut syncs, stats) =
            (Batch { open: true, written: Vec::new() }, Sticky::default(), Stats::default());
        let (job, mut rx) = write_job(|_| Ok(7u32), "cannot commit");
        // The job's work is done (its result computed); delivery waits for the commit.
        let mut backend = SqliteBackend::open(std::path::Path::new(":memory:"), "c")?;
        batch.written(job(&mut backend));
        assert!(rx.try_recv().is_err(), "not delivered before the commit");
        batch.end(|| Err(BackendError::Db("EIO".into())), &mut syncs, &stats);
        let e = rx.try_recv()?.map(|_| "delivered as committed".to_string()).unwrap_or_else(|e| e.to_string());
        assert!(e.contains("cannot commit") && e.contains("EIO"), "{e}");
        assert!(stats.sync_failed.load(Ordering::Relaxed));
        let later = refused_sync(&mut syncs);
        assert!(later.contains("could not commit") && later.contains("no later commit is durable"));
        // Closed: ending it again does nothing.
        batch.end(|| panic!("no second commit"), &mut syncs, &stats);
        Ok(())
    }

    #[cfg(target_os = "linux")] // sync_file_range
    #[tokio::test]
    async fn the_thread_starts_a_write_back_once_idle_after_a_vote() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.sqlite");
        let db = open_sqlite(&path).await?;
        let writebacks = |db: &Db| db.stats().writebacks.load(Ordering::Relaxed);
        db.call(|b| b.get_config("a")).await??;
        db.call(|b| b.vote(Tid(1), &[], None)).await??;
        // Started after the job's answer, once the queue is empty.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while writebacks(&db) == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(writebacks(&db), 1);
        // Reads and a durable job (its sync writes everything) start none.
        db.call(|b| b.get_config("a")).await??;
        db.call_durable(|b| b.vote(Tid(2), &[], None)).await??;
        db.call(|b| b.get_config("a")).await??;
        assert_eq!(writebacks(&db), 1);
        assert_eq!(db.stats().syncs.load(Ordering::Relaxed), 1);
        db.close().await;
        Ok(())
    }

    #[tokio::test]
    async fn a_storage_whose_log_cannot_be_synced_fails_its_durable_jobs_for_good()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.sqlite");
        let db = open_sqlite(&path).await?;
        db.call_durable(|b| b.set_config("a", Some("1"))).await??;
        assert!(!db.sync_failed());
        // The log's name gone, the next sync cannot open it.
        let mut wal = path.into_os_string();
        wal.push("-wal");
        std::fs::remove_file(&wal)?;
        let e = db.call_durable(|b| b.get_config("a")).await?.map_err(|e| e.to_string()).unwrap_err();
        assert!(e.contains("durable"), "{e}");
        assert!(db.sync_failed());
        // Even with the file back, nothing is durable any more.
        std::fs::write(&wal, b"")?;
        let e = db.call_durable(|b| b.get_config("a")).await?.map_err(|e| e.to_string()).unwrap_err();
        assert!(e.contains("no later commit is durable"), "{e}");
        db.close().await;
        Ok(())
    }

    /// One more sync on `syncs`, which has failed: it is not tried, and fails; its error.
    fn refused_sync(syncs: &mut Sticky) -> String {
        let mut called = false;
        let later = syncs.sync(|| {
            called = true;
            Ok(())
        });
        assert!(!called, "no sync is tried after a failure");
        later.map(|()| "a sync succeeded".to_string()).unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn a_failed_sync_fails_every_later_one() {
        let mut s = Sticky::default();
        assert!(s.sync(|| Ok(())).is_ok());
        let e = s.sync(|| Err(BackendError::Db("EIO".into()))).map_err(|e| e.to_string()).unwrap_err();
        assert!(e.contains("EIO"), "{e}");
        assert!(refused_sync(&mut s).contains("no later commit is durable"));
    }

    /// Deferred work (MySQL: an unlock not committed yet, see `Backend::has_deferred`) is
    /// finished when no job comes to share it with: another connection then sees the unlock.
    #[tokio::test]
    async fn deferred_work_is_finished_when_the_thread_goes_idle() -> Result<(), Box<dyn std::error::Error>> {
        use crate::backend::mysql::MysqlBackend;
        use crate::backend::{Load, NewData, NewObject};
        use neo_lib::Oid;
        let Some(test_db) = crate::testing::TestDatabase::new()? else { return Ok(()) };
        let url = test_db.url.clone();
        let db = Db::open(move || -> Result<Box<dyn Backend>, std::io::Error> {
            Ok(Box::new(MysqlBackend::open(&url, "c").map_err(std::io::Error::other)?))
        })
        .await?;
        let data = b"deferred".to_vec();
        let checksum = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &data).as_ref().to_vec();
        let object =
            NewObject { oid: Oid(1), data: Some(NewData { checksum, compression: 0, data }), data_serial: None };
        db.queue_write(move |b| b.vote_data(Tid(10), &[(1, object)], None)).await?.await??;
        db.queue_durable(|b| b.lock(Tid(10), Tid(11), &[])).await?.await??;
        db.queue_write(|b| b.unlock(Tid(10), Tid(11))).await?.await??;
        // Another connection sees it once the thread went idle (after `DEFER_FOR`).
        let url = test_db.url.clone();
        // (A thread outside the runtime: the backend refuses to block a runtime thread.)
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = seen_tx.send((|| -> Result<bool, BackendError> {
                let mut other = MysqlBackend::open(&url, "c")?;
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while std::time::Instant::now() < deadline {
                    if matches!(other.load(1, Oid(1), None, None)?, Load::Found(_)) {
                        return Ok(true);
                    }
                    std::thread::sleep(DEFER_FOR / 4);
                }
                Ok(false)
            })());
        });
        let seen = seen_rx.await??;
        assert!(seen, "the unlock was committed when the thread went idle");
        assert!(!db.call(|b| b.has_deferred()).await?);
        db.close().await;
        Ok(())
    }
}
