//! Spinning before sleeping, for a thread that waits for something which usually comes within
//! tens or hundreds of microseconds (the answer to a load on a read connection, the next job of
//! a storage's database thread, the next packet of a commit for a node).
//!
//! On a small VM, waking a sleeping thread costs more than the work it waits for: a loopback
//! round trip between two processes that sleep in `recv` takes about 75 µs, against about 10 µs
//! when neither sleeps. A `Spinner` keeps its thread awake for a short budget, yielding the
//! CPU to any other runnable thread at each turn, and sleeps only if nothing came by then. It
//! adapts: after a few waits in a row that outlast the budget (a peer that is slow, a busy
//! machine, an idle connection), it stops spinning for a while, so that a thread that mostly
//! waits long costs little CPU.
//!
//! Three kinds of waits spin: a read on a `BlockingConn` (both ends of a read connection), the
//! storage's database thread between jobs, and a node's runtime after each wake-up
//! (`node_runtime`). `NEO_SPIN_US` sets the budget of the first (0: never spin); the other two,
//! which wait for the next step of a commit, spin twice as long (`node_budget`): between two
//! steps the client does its own work (ZODB's, a few hundred microseconds per commit), where a
//! read connection's peer answers at once.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Spinning budget when `NEO_SPIN_US` does not say otherwise.
pub const DEFAULT_BUDGET: Duration = Duration::from_micros(500);
/// After this many misses in a row (waits that outlasted the budget) ...
const MISSES_BEFORE_BACKOFF: u32 = 3;
/// ... this many waits sleep at once.
const BACKOFF_WAITS: u32 = 64;

/// The budget of this process's read connections (`Spinner::default`): `NEO_SPIN_US`
/// microseconds (0 disables all spinning, `node_budget` included), else `DEFAULT_BUDGET`. An
/// invalid value is ignored (with the default taken).
pub fn process_budget() -> Duration {
    static BUDGET: std::sync::LazyLock<Duration> =
        std::sync::LazyLock::new(|| parse_budget(std::env::var("NEO_SPIN_US").ok().as_deref()));
    *BUDGET
}

/// The budget of a node's runtime and of a storage's database thread: twice `process_budget`
/// (see the module comment; the measurements are in the README's benchmark section).
pub fn node_budget() -> Duration {
    node_budget_of(process_budget())
}

fn node_budget_of(read_budget: Duration) -> Duration {
    read_budget * 2
}

fn parse_budget(v: Option<&str>) -> Duration {
    v.and_then(|s| s.trim().parse::<u64>().ok())
        .map(|us| Duration::from_micros(us.min(10_000)))
        .unwrap_or(DEFAULT_BUDGET)
}

/// The spinning state of one waiting thread (or connection).
#[derive(Debug, Clone)]
pub struct Spinner {
    budget: Duration,
    misses: u32,
    /// Waits left that sleep at once (back-off).
    skip: u32,
}

impl Default for Spinner {
    fn default() -> Self {
        Spinner::new(process_budget())
    }
}

impl Spinner {
    pub fn new(budget: Duration) -> Spinner {
        Spinner { budget, misses: 0, skip: 0 }
    }

    /// Call `poll` until it returns `Some` or the budget is spent (then None: the caller
    /// sleeps). `poll` must not block. With no budget, or during a back-off, `poll` is not
    /// called at all.
    pub fn spin<T>(&mut self, mut poll: impl FnMut() -> Option<T>) -> Option<T> {
        if self.budget.is_zero() {
            return None;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        let start = Instant::now();
        loop {
            if let Some(v) = poll() {
                self.misses = 0;
                return Some(v);
            }
            std::thread::yield_now();
            if start.elapsed() >= self.budget {
                self.misses += 1;
                if self.misses >= MISSES_BEFORE_BACKOFF {
                    self.misses = 0;
                    self.skip = BACKOFF_WAITS;
                }
                return None;
            }
        }
    }
}

/// The single-threaded runtime of a node process. It stays awake for the spinning budget after
/// each wake-up: a task keeps yielding, which makes the runtime poll its sockets without
/// sleeping meanwhile, so that the next packet of an exchange in progress (a commit's lock
/// after its vote, a load after a load) is taken without the cost of waking the thread.
pub fn node_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let activity = Arc::new(Notify::new());
    let woken = activity.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_unpark(move || woken.notify_one())
        .build()?;
    let budget = node_budget();
    if !budget.is_zero() {
        rt.spawn(keep_awake(activity, budget));
    }
    Ok(rt)
}

/// After each `activity` signal, yield for `budget`. Each turn also gives the CPU to any other
/// runnable thread of the machine (`sched_yield`, which returns at once when there is none:
/// not a blocking call).
async fn keep_awake(activity: Arc<Notify>, budget: Duration) {
    loop {
        activity.notified().await;
        let start = Instant::now();
        while start.elapsed() < budget {
            std::thread::yield_now();
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's runtime serves its sockets while it keeps itself awake, and stops although
    /// its spinning task never ends.
    #[test]
    fn a_node_runtime_keeps_serving_and_stops() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = node_runtime().unwrap();
        let echoed = rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = l.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).await.is_ok() {
                    s.write_all(&b).await.unwrap();
                }
            });
            let mut c = tokio::net::TcpStream::connect(a).await.unwrap();
            let mut echoed = Vec::new();
            for i in 0..50u8 {
                c.write_all(&[i]).await.unwrap();
                let mut b = [0u8; 1];
                c.read_exact(&mut b).await.unwrap();
                echoed.push(b[0]);
                if i % 10 == 0 {
                    // Long enough for the runtime to go back to sleep between some exchanges.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            echoed
        });
        assert_eq!(echoed, (0..50).collect::<Vec<u8>>());
        rt.shutdown_timeout(Duration::from_secs(5));
    }

    #[test]
    fn the_budget_comes_from_the_environment_value() {
        assert_eq!(parse_budget(None), DEFAULT_BUDGET);
        assert_eq!(parse_budget(Some("0")), Duration::ZERO);
        assert_eq!(parse_budget(Some(" 50 ")), Duration::from_micros(50));
        assert_eq!(parse_budget(Some("lots")), DEFAULT_BUDGET);
        assert_eq!(parse_budget(Some("99999999")), Duration::from_millis(10), "capped");
        assert_eq!(node_budget_of(DEFAULT_BUDGET), Duration::from_micros(1000));
        assert_eq!(node_budget_of(Duration::ZERO), Duration::ZERO, "off stays off");
    }

    /// Polls made by a wait for something that never comes (always a miss).
    fn polls_of_a_miss(s: &mut Spinner) -> u32 {
        let mut polls = 0;
        let got = s.spin(|| {
            polls += 1;
            None::<()>
        });
        assert_eq!(got, None);
        polls
    }

    /// Polls made by a wait for something that comes at the `n`th poll.
    fn polls_of_a_hit(s: &mut Spinner, n: u32) -> Option<u32> {
        let mut polls = 0;
        s.spin(|| {
            polls += 1;
            (polls == n).then_some(polls)
        })
    }

    #[test]
    fn spins_until_the_value_comes_and_backs_off_after_misses() {
        let mut s = Spinner::new(Duration::from_millis(1));
        assert_eq!(polls_of_a_hit(&mut s, 3), Some(3), "found while spinning");
        // Each wait for what never comes polls until the budget is spent ...
        for _ in 0..MISSES_BEFORE_BACKOFF {
            assert!(polls_of_a_miss(&mut s) > 1);
        }
        // ... then the next waits give up at once, without polling.
        for _ in 0..BACKOFF_WAITS {
            assert_eq!(polls_of_a_miss(&mut s), 0);
        }
        // Back to spinning.
        assert_eq!(polls_of_a_hit(&mut s, 2), Some(2));
        // A zero budget never spins.
        assert_eq!(polls_of_a_miss(&mut Spinner::new(Duration::ZERO)), 0);
    }
}
