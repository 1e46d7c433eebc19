//! The database thread: the backend lives on its own OS thread and async code sends it jobs
//! through a bounded channel, so no database call ever runs on an async worker thread.

use crate::backend::Backend;
use std::sync::Mutex;
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce(&mut dyn Backend) + Send>;

enum Msg {
    Job(Job),
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
    pub fn spawn(mut backend: Box<dyn Backend>) -> std::io::Result<Db> {
        let (tx, mut rx) = mpsc::channel::<Msg>(1024);
        let thread = std::thread::Builder::new().name("neo-db".into()).spawn(move || {
            while let Some(Msg::Job(job)) = rx.blocking_recv() {
                job(backend.as_mut());
            }
        })?;
        Ok(Db { tx, thread: std::sync::Arc::new(Mutex::new(Some(thread))) })
    }

    /// Run `f` on the database thread and return its result.
    pub async fn call<R, F>(&self, f: F) -> Result<R, DbClosed>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Backend) -> R + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |b| {
            let _ = tx.send(f(b));
        });
        self.tx.send(Msg::Job(job)).await.map_err(|_| DbClosed)?;
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
