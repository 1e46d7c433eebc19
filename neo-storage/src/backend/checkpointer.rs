//! Background checkpoints of the SQLite write-ahead log.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its threshold: one commit
//! in a few dozen paid for copying a thousand pages into the database and syncing it (the p99
//! of commits). Here that commit only wakes a thread of its own, which copies them through its
//! own connection while the node goes on. A checkpoint that runs beside the writer cannot
//! catch up with it (the writer appends meanwhile), and the log restarts from its beginning
//! (overwritten in place, which keeps its fsyncs cheap) only after one that did: so the first
//! commit after the thread is done checkpoints the few pages appended meanwhile itself. Without
//! the thread (stopped), commits checkpoint themselves from `WAKE_PAGES`, as SQLite would; if
//! the log grows past `INLINE_PAGES` (the thread cannot keep up), every commit does too.

use super::BackendError;
use rusqlite::Connection;
use rusqlite::hooks::Wal;
use std::os::raw::c_int;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

/// Pages in the log from which a commit wakes the checkpointer (SQLite's default threshold
/// for its automatic checkpoint).
#[cfg(not(test))]
pub const WAKE_PAGES: c_int = 1000;
/// Pages in the log from which every commit checkpoints itself.
#[cfg(not(test))]
pub const INLINE_PAGES: c_int = 20_000;
// Tests write less.
#[cfg(test)]
pub const WAKE_PAGES: c_int = 50;
#[cfg(test)]
pub const INLINE_PAGES: c_int = 1_000;

/// Where the thread's current round is (shared by the thread and the commit hook).
const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;

/// The checkpointer thread of one database (file databases only); dropping it stops the
/// thread (the connection's commits then checkpoint themselves).
pub struct Checkpointer {
    wake: SyncSender<()>,
    stop: Arc<AtomicBool>,
    /// Checkpoints the thread ran.
    rounds: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Start the thread for the database at `path` and hook it to the commits of `conn`.
    pub fn start(conn: &mut Connection, path: &Path, busy_timeout: Duration) -> Result<Checkpointer, BackendError> {
        let err = |e: rusqlite::Error| BackendError::Db(format!("checkpointer of {}: {e}", path.display()));
        let own = Connection::open(path).map_err(err)?;
        own.busy_timeout(busy_timeout).map_err(err)?;
        // A checkpoint syncs the log before copying it and the database after (what makes
        // the copied frames reusable), whatever the commits' own setting.
        own.execute_batch("PRAGMA synchronous=NORMAL").map_err(err)?;
        let (wake, woken) = sync_channel::<()>(1);
        let stop = Arc::new(AtomicBool::new(false));
        let round = Arc::new(AtomicU8::new(IDLE));
        let rounds = Arc::new(AtomicU64::new(0));
        let (stopped, thread_round, thread_rounds) = (stop.clone(), round.clone(), rounds.clone());
        let thread = std::thread::Builder::new()
            .name("neo-ckpt".into())
            .spawn(move || {
                while woken.recv().is_ok() && !stopped.load(Ordering::Acquire) {
                    if let Err(e) = own.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::warn!("checkpoint of the write-ahead log failed: {e}");
                    }
                    thread_rounds.fetch_add(1, Ordering::Relaxed);
                    thread_round.store(DONE, Ordering::Release);
                }
            })
            .map_err(|e| BackendError::Db(format!("cannot start the checkpointer thread: {e}")))?;
        let hook_wake = wake.clone();
        // Replaces SQLite's automatic checkpoint (which is also a log hook). Errors of the
        // checkpoints here are ignored: returned, they would fail a statement whose commit
        // happened; the next commit tries again.
        conn.wal_hook(Some(move |wal: &mut Wal, pages: c_int| {
            if pages >= INLINE_PAGES {
                let _ = wal.checkpoint();
                return Ok(());
            }
            match round.load(Ordering::Acquire) {
                IDLE if pages >= WAKE_PAGES => {
                    round.store(RUNNING, Ordering::Release);
                    match hook_wake.try_send(()) {
                        Ok(()) | Err(TrySendError::Full(())) => {}
                        Err(TrySendError::Disconnected(())) => {
                            let _ = wal.checkpoint();
                            round.store(IDLE, Ordering::Release);
                        }
                    }
                }
                DONE => {
                    // The tail the thread could not copy: after it, the log restarts.
                    let _ = wal.checkpoint();
                    round.store(IDLE, Ordering::Release);
                }
                _ => {}
            }
            Ok(())
        }))
        .map_err(err)?;
        Ok(Checkpointer { wake, stop, rounds, thread: Some(thread) })
    }

    /// How many checkpoints the thread ran.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Full means the thread has a wake-up waiting: it sees `stop` then.
        let _ = self.wake.try_send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
