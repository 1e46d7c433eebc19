//! The database thread: the backend lives on its own OS thread and async code sends it jobs
//! through a bounded channel, so no database call ever runs on an async worker thread.
//!
//! Group commit: a durable job (`call_durable`: vote, lock) is answered only after
//! `Backend::sync`, and the thread runs every job already queued before syncing, so concurrent
//! transactions share one fsync.

use crate::backend::{Backend, BackendError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce(&mut dyn Backend) + Send>;
/// A durable job returns the function that delivers its result once the sync is done.
type Reply = Box<dyn FnOnce(Result<(), &BackendError>) + Send>;
type DurableJob = Box<dyn FnOnce(&mut dyn Backend) -> Reply + Send>;

/// At most this many durable jobs share one sync.
const GROUP_MAX: usize = 128;

enum Msg {
    Job(Job),
    Durable(DurableJob),
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
        let thread = std::thread::Builder::new().name("neo-db".into()).spawn(move || match open() {
            Ok(backend) => {
                let _ = opened_tx.send(Ok(()));
                serve(backend, rx);
            }
            Err(e) => {
                let _ = opened_tx.send(Err(e));
            }
        })?;
        let db = Db { tx, thread: std::sync::Arc::new(Mutex::new(Some(thread))) };
        match opened_rx.await {
            Ok(Ok(())) => Ok(db),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::other("the database thread died while opening").into()),
        }
    }

    pub fn spawn(backend: Box<dyn Backend>) -> std::io::Result<Db> {
        let (tx, rx) = mpsc::channel::<Msg>(1024);
        let thread = std::thread::Builder::new().name("neo-db".into()).spawn(move || serve(backend, rx))?;
        Ok(Db { tx, thread: std::sync::Arc::new(Mutex::new(Some(thread))) })
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

    /// Run `f` on the database thread; its result is delivered once what it committed is
    /// durable (`Backend::sync`, shared with the other durable jobs queued meanwhile).
    pub async fn call_durable<T, F>(&self, f: F) -> Result<Result<T, BackendError>, DbClosed>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Backend) -> Result<T, BackendError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: DurableJob = Box::new(move |b| {
            let result = f(b);
            Box::new(move |synced: Result<(), &BackendError>| {
                let result = match (result, synced) {
                    (Ok(v), Ok(())) => Ok(v),
                    (Ok(_), Err(e)) => Err(BackendError::Db(format!("cannot make the commit durable: {e}"))),
                    (Err(e), _) => Err(e),
                };
                let _ = tx.send(result);
            })
        });
        self.tx.send(Msg::Durable(job)).await.map_err(|_| DbClosed)?;
        rx.await.map_err(|_| DbClosed)
    }

    /// Stop the thread once the queued jobs are done and wait for it (closes the database).
    pub async fn close(self) {
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        let _ = self.tx.send(Msg::Stop).await;
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
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

/// The database thread's loop (see the module comment for group commit).
fn serve(mut backend: Box<dyn Backend>, mut rx: mpsc::Receiver<Msg>) {
    let mut replies: Vec<Reply> = Vec::new();
    // The jobs of a commit come one network round trip apart: waiting for the next one
    // awake saves a thread wake-up (see `proto::spin`).
    let mut spinner = proto::spin::Spinner::new(proto::spin::node_budget());
    let mut next = rx.blocking_recv();
    loop {
        match next {
            Some(Msg::Job(job)) => job(backend.as_mut()),
            Some(Msg::Durable(job)) => replies.push(job(backend.as_mut())),
            Some(Msg::Stop) | None => break,
        }
        next = if replies.len() < GROUP_MAX { rx.try_recv().ok() } else { None };
        if next.is_none() {
            if !replies.is_empty() {
                let synced = backend.sync();
                for r in replies.drain(..) {
                    r(synced.as_ref().map(|_| ()));
                }
            }
            next = spinner.spin(|| rx.try_recv().ok()).or_else(|| rx.blocking_recv());
        }
    }
    if !replies.is_empty() {
        let synced = backend.sync();
        for r in replies.drain(..) {
            r(synced.as_ref().map(|_| ()));
        }
    }
}
