//! `Link`: one connection to a peer, shared by cheap clones. A writer task sends packets in
//! order (answers and notifications share one queue, so order is kept); a reader task routes
//! answers to the `ask` that waits for them and queues requests/notifications on `Incoming`.
//!
//! Rule for users: the loop that consumes `Incoming` must not await an answer on the same link
//! inline (spawn a task instead), or a full queue could stop the answer from being read.

use crate::frame::{self, FrameError, FrameReader, MAGIC};
use crate::msg::Packet;
use crate::msg::packet::Body;
use bytes::BytesMut;
use neo_lib::ErrorCode;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

/// Capacity of the outgoing queue of a link (packets).
const OUT_QUEUE: usize = 4096;
/// Capacity of the incoming request queue of a link.
const IN_QUEUE: usize = 1024;
/// A peer must send its magic within this delay.
const MAGIC_TIMEOUT: Duration = Duration::from_secs(10);

/// A request or notification received from the peer.
#[derive(Debug)]
pub struct Request {
    pub id: u32,
    pub body: Body,
}

pub type Incoming = mpsc::Receiver<Request>;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LinkError {
    #[error("connection to {0} closed")]
    Closed(String),
    #[error("{code}: {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("unexpected answer {0}")]
    Unexpected(String),
}

impl LinkError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            LinkError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }
}

enum Out {
    Packet(Packet),
    /// Flush what was queued before, then close.
    Close,
}

struct Inner {
    tx: mpsc::Sender<Out>,
    pending: Mutex<HashMap<u32, oneshot::Sender<Body>>>,
    next_id: AtomicU32,
    closed: CancellationToken,
    peer: String,
    conn_id: u64,
    /// Requests/notifications handed to `Incoming` so far (see `delivered`).
    delivered: AtomicU64,
}

#[derive(Clone)]
pub struct Link(Arc<Inner>);

/// The answer to a request already sent (see `Link::send_request`).
pub struct PendingAnswer {
    rx: oneshot::Receiver<Body>,
    peer: String,
}

impl PendingAnswer {
    /// Wait for the answer. An `Error` answer other than ACK becomes `LinkError::Remote`.
    pub async fn answer(self) -> Result<Body, LinkError> {
        match self.rx.await {
            Ok(b) => remote_error(b),
            Err(_) => Err(LinkError::Closed(self.peer)),
        }
    }
}

/// An answer as a result: an `Error` answer other than ACK becomes `LinkError::Remote`.
pub fn remote_error(b: Body) -> Result<Body, LinkError> {
    match b {
        Body::Error(e) if e.code != ErrorCode::Ack as i32 => Err(LinkError::Remote {
            code: ErrorCode::from_i32(e.code).unwrap_or(ErrorCode::ProtocolError),
            message: e.message,
        }),
        b => Ok(b),
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Link#{}({})", self.0.conn_id, self.0.peer)
    }
}

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

impl Link {
    /// Start the reader and writer tasks of a connection (plain or TLS stream).
    pub fn spawn<S>(stream: S, peer: String, max_frame: usize) -> (Link, Incoming)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::spawn_with(stream, peer, max_frame, false)
    }

    /// `spawn` for a connection whose peer's magic was already read (and checked).
    pub fn spawn_magic_read<S>(stream: S, peer: String, max_frame: usize) -> (Link, Incoming)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::spawn_with(stream, peer, max_frame, true)
    }

    fn spawn_with<S>(stream: S, peer: String, max_frame: usize, magic_read: bool) -> (Link, Incoming)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let (tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (in_tx, in_rx) = mpsc::channel(IN_QUEUE);
        let conn_id = CONN_IDS.fetch_add(1, Ordering::Relaxed);
        let link = Link(Arc::new(Inner {
            tx,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            closed: CancellationToken::new(),
            peer,
            conn_id,
            delivered: AtomicU64::new(0),
        }));
        let span = tracing::debug_span!("link", conn = conn_id, peer = %link.0.peer);
        tokio::spawn(writer(w, out_rx, link.0.closed.clone()).instrument(span.clone()));
        tokio::spawn(reader(FrameReader::new(r, max_frame), in_tx, link.clone(), magic_read).instrument(span));
        (link, in_rx)
    }

    pub fn peer(&self) -> &str {
        &self.0.peer
    }
    pub fn conn_id(&self) -> u64 {
        self.0.conn_id
    }
    /// Number of requests/notifications received and queued on `Incoming` so far. An answer
    /// is routed only after everything received before it was counted here, so a consumer that
    /// has processed this many messages has seen everything sent before that answer.
    pub fn delivered(&self) -> u64 {
        self.0.delivered.load(Ordering::Acquire)
    }
    pub fn is_closed(&self) -> bool {
        self.0.closed.is_cancelled()
    }
    /// Completes when the connection is closed.
    pub async fn closed(&self) {
        self.0.closed.cancelled().await
    }
    /// Close now, dropping what is still queued.
    pub fn abort(&self) {
        self.0.closed.cancel();
    }
    /// Close after what is already queued was written.
    pub async fn close(&self) {
        if self.0.tx.send(Out::Close).await.is_err() {
            self.0.closed.cancel();
        }
    }

    fn closed_err(&self) -> LinkError {
        LinkError::Closed(self.0.peer.clone())
    }

    async fn send(&self, p: Packet) -> Result<(), LinkError> {
        if self.is_closed() {
            return Err(self.closed_err());
        }
        self.0.tx.send(Out::Packet(p)).await.map_err(|_| self.closed_err())
    }

    /// Send a request and wait for its answer. An `Error` answer other than ACK becomes
    /// `LinkError::Remote`.
    pub async fn ask(&self, body: impl Into<Body>) -> Result<Body, LinkError> {
        self.send_request(body).await?.answer().await
    }

    /// Queue a request (in order with everything sent before on this link) and return the
    /// pending answer without waiting for it.
    pub async fn send_request(&self, body: impl Into<Body>) -> Result<PendingAnswer, LinkError> {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.0.pending.lock() {
            p.insert(id, tx);
        }
        if self.is_closed() {
            self.forget(id);
            return Err(self.closed_err());
        }
        if let Err(e) = self.send(Packet { id, answer: false, body: Some(body.into()) }).await {
            self.forget(id);
            return Err(e);
        }
        Ok(PendingAnswer { rx, peer: self.0.peer.clone() })
    }

    fn forget(&self, id: u32) {
        if let Ok(mut p) = self.0.pending.lock() {
            p.remove(&id);
        }
    }

    /// Send a notification (no answer expected).
    pub async fn notify(&self, body: impl Into<Body>) -> Result<(), LinkError> {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        self.send(Packet { id, answer: false, body: Some(body.into()) }).await
    }

    /// Send a notification without waiting: if the peer's queue is full (it does not read), the
    /// connection is closed rather than blocking the sender.
    pub fn try_notify(&self, body: impl Into<Body>) -> Result<(), LinkError> {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        self.try_send(Packet { id, answer: false, body: Some(body.into()) })
    }

    /// Answer without waiting (see `try_notify`).
    pub fn try_answer(&self, id: u32, body: impl Into<Body>) -> Result<(), LinkError> {
        self.try_send(Packet { id, answer: true, body: Some(body.into()) })
    }

    fn try_send(&self, p: Packet) -> Result<(), LinkError> {
        if self.is_closed() {
            return Err(self.closed_err());
        }
        match self.0.tx.try_send(Out::Packet(p)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!("{}: peer does not read its messages: closing", self.0.peer);
                self.abort();
                Err(self.closed_err())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.closed_err()),
        }
    }

    /// Answer request `id`.
    pub async fn answer(&self, id: u32, body: impl Into<Body>) -> Result<(), LinkError> {
        self.send(Packet { id, answer: true, body: Some(body.into()) }).await
    }

    /// Answer request `id` with an error and close the connection once it is written.
    pub async fn refuse(&self, id: u32, code: ErrorCode, message: impl Into<String>) {
        let _ = self.answer(id, crate::error(code, message)).await;
        self.close().await;
    }
}

async fn writer<W: AsyncWrite>(w: W, mut rx: mpsc::Receiver<Out>, closed: CancellationToken) {
    let mut w = Box::pin(w);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let res: std::io::Result<()> = async {
        w.write_all(MAGIC).await?;
        w.flush().await?;
        loop {
            let first = tokio::select! {
                _ = closed.cancelled() => return Ok(()),
                o = rx.recv() => o,
            };
            let mut close = false;
            match first {
                None | Some(Out::Close) => close = true,
                Some(Out::Packet(p)) => frame::encode(&p, &mut buf),
            }
            // Batch whatever is already queued into one write.
            while !close && buf.len() < 256 * 1024 {
                match rx.try_recv() {
                    Ok(Out::Packet(p)) => frame::encode(&p, &mut buf),
                    Ok(Out::Close) => close = true,
                    Err(_) => break,
                }
            }
            if !buf.is_empty() {
                w.write_all(&buf).await?;
                w.flush().await?;
                buf.clear();
            }
            if close {
                let _ = w.shutdown().await;
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = res {
        debug!("write error: {e}");
    }
    closed.cancel();
}

async fn reader<R: AsyncRead + Unpin>(
    mut r: FrameReader<R>,
    in_tx: mpsc::Sender<Request>,
    link: Link,
    magic_read: bool,
) {
    let closed = link.0.closed.clone();
    let res: Result<(), FrameError> = async {
        if !magic_read {
            tokio::select! {
                _ = closed.cancelled() => return Ok(()),
                m = tokio::time::timeout(MAGIC_TIMEOUT, r.read_magic()) => match m {
                    Ok(res) => res?,
                    Err(_) => return Err(FrameError::BadMagic(Vec::new())),
                },
            }
        }
        loop {
            let p = tokio::select! {
                _ = closed.cancelled() => return Ok(()),
                p = r.read_packet() => p?,
            };
            let Some(p) = p else { return Ok(()) };
            let Some(body) = p.body else {
                warn!("packet without body from {}: closing", link.peer());
                return Ok(());
            };
            if p.answer {
                let waiter = link.0.pending.lock().ok().and_then(|mut m| m.remove(&p.id));
                match waiter {
                    Some(w) => {
                        let _ = w.send(body);
                    }
                    None => debug!("answer to unknown request {} ignored", p.id),
                }
            } else {
                let req = Request { id: p.id, body };
                link.0.delivered.fetch_add(1, Ordering::AcqRel);
                tokio::select! {
                    _ = closed.cancelled() => return Ok(()),
                    r = in_tx.send(req) => if r.is_err() { return Ok(()) },
                }
            }
        }
    }
    .await;
    match res {
        Ok(()) => debug!("connection closed"),
        Err(FrameError::Io(e)) => debug!("connection error: {e}"),
        Err(FrameError::Truncated) => debug!("connection closed by peer"),
        Err(e) => warn!("closing connection from {}: {e}", link.peer()),
    }
    closed.cancel();
    if let Ok(mut p) = link.0.pending.lock() {
        p.clear();
    }
}

/// Extract the expected answer variant or fail with `LinkError::Unexpected`.
#[macro_export]
macro_rules! expect_answer {
    ($body:expr, $var:ident) => {
        match $body {
            $crate::Body::$var(m) => Ok(m),
            other => Err($crate::LinkError::Unexpected($crate::body_name(&other))),
        }
    };
}
