//! Opening and accepting connections (plain TCP or TLS) and the identification exchange that
//! starts every connection.

use crate::link::{Incoming, Link, LinkError, Request};
use crate::msg::{AcceptIdentification, RequestIdentification};
use crate::tls::TlsContext;
use crate::{Body, expect_answer};
use neo_lib::config::Address;
use neo_lib::{ErrorCode, Nid, NodeType, PROTOCOL_VERSION};
use std::pin::Pin;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

/// Any byte stream a link can run on.
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncStream for T {}
pub type BoxStream = Pin<Box<dyn AsyncStream>>;

/// Delay for TCP connect, TLS handshake and identification.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot connect to {addr}: {err}")]
    Connect { addr: String, err: std::io::Error },
    #[error("TLS handshake with {addr} failed: {err}")]
    Tls { addr: String, err: std::io::Error },
    #[error("{addr}: timed out")]
    Timeout { addr: String },
    #[error("{addr}: {err}")]
    Link { addr: String, err: LinkError },
}

impl NetError {
    /// The error code of a refusal by the peer, if it was one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            NetError::Link { err, .. } => err.code(),
            _ => None,
        }
    }
}

/// Connection settings shared by everything a node opens.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub tls: Option<TlsContext>,
    pub max_frame: usize,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig { tls: None, max_frame: neo_lib::DEFAULT_MAX_FRAME }
    }
}

/// Open a connection (TCP, then TLS if configured) and start its link.
pub async fn connect(addr: &Address, net: &NetConfig) -> Result<(Link, Incoming), NetError> {
    let a = addr.to_string();
    let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect((addr.host.as_str(), addr.port)))
        .await
        .map_err(|_| NetError::Timeout { addr: a.clone() })?
        .map_err(|err| NetError::Connect { addr: a.clone(), err })?;
    let _ = tcp.set_nodelay(true);
    let stream: BoxStream = match &net.tls {
        None => Box::pin(tcp),
        Some(tls) => {
            let conn = tokio_rustls::TlsConnector::from(tls.client.clone());
            let name = rustls::pki_types::ServerName::try_from("neo-node")
                .map_err(|e| NetError::Tls { addr: a.clone(), err: std::io::Error::other(e) })?;
            let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.connect(name, tcp))
                .await
                .map_err(|_| NetError::Timeout { addr: a.clone() })?
                .map_err(|err| NetError::Tls { addr: a.clone(), err })?;
            Box::pin(s)
        }
    };
    Ok(Link::spawn(stream, a, net.max_frame))
}

/// Finish accepting a TCP connection (TLS handshake if configured) and start its link.
pub async fn accept(tcp: TcpStream, net: &NetConfig) -> Result<(Link, Incoming), NetError> {
    let a = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let _ = tcp.set_nodelay(true);
    let stream: BoxStream = match &net.tls {
        None => Box::pin(tcp),
        Some(tls) => Box::pin(tls_accept(tcp, tls, &a).await?),
    };
    Ok(Link::spawn(stream, a, net.max_frame))
}

/// The server's TLS handshake on an accepted connection.
async fn tls_accept(
    tcp: TcpStream,
    tls: &TlsContext,
    a: &str,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, NetError> {
    let acc = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    tokio::time::timeout(HANDSHAKE_TIMEOUT, acc.accept(tcp))
        .await
        .map_err(|_| NetError::Timeout { addr: a.to_string() })?
        .map_err(|err| NetError::Tls { addr: a.to_string(), err })
}

/// A connection accepted by `accept_any`.
pub enum Accepted {
    Link(Link, Incoming),
    /// A read connection (`READ_MAGIC`), to serve on a thread of its own, and a handle on its
    /// socket (to shut it down from elsewhere).
    Reads(crate::blocking::BlockingConn, std::net::TcpStream),
}

/// `accept`, for a node that also serves read connections: the peer's magic tells which.
pub async fn accept_any(tcp: TcpStream, net: &NetConfig) -> Result<Accepted, NetError> {
    let a = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let _ = tcp.set_nodelay(true);
    match &net.tls {
        None => {
            dispatch(tcp, a, net, |tcp| {
                let (std, handle) = blocking_socket(tcp)?;
                Ok((Box::new(std), handle))
            })
            .await
        }
        Some(tls) => {
            let s = tls_accept(tcp, tls, &a).await?;
            dispatch(s, a, net, |s| {
                let (tcp, conn) = s.into_inner();
                let (std, handle) = blocking_socket(tcp)?;
                Ok((Box::new(rustls::StreamOwned::new(conn, std)), handle))
            })
            .await
        }
    }
}

/// A read connection's stream as blocking IO, and a handle on its socket.
type BlockingParts = (Box<dyn crate::blocking::Stream>, std::net::TcpStream);

/// Read the peer's magic on `s`: start a link, or turn `s` into a read connection with
/// `blocking`.
async fn dispatch<S>(
    mut s: S,
    a: String,
    net: &NetConfig,
    blocking: impl FnOnce(S) -> std::io::Result<BlockingParts>,
) -> Result<Accepted, NetError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    use crate::frame::{MAGIC, READ_MAGIC};
    use tokio::io::AsyncReadExt;
    let closed = |a: &str, why: String| NetError::Link { addr: a.to_string(), err: LinkError::Closed(why) };
    let mut m = [0u8; 8];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, s.read_exact(&mut m)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(closed(&a, e.to_string())),
        Err(_) => return Err(NetError::Timeout { addr: a }),
    }
    if &m == MAGIC {
        let (link, incoming) = Link::spawn_magic_read(s, a, net.max_frame);
        return Ok(Accepted::Link(link, incoming));
    }
    if &m != READ_MAGIC {
        return Err(closed(&a, format!("bad magic {m:02x?}")));
    }
    let (stream, handle) = blocking(s).map_err(|e| closed(&a, e.to_string()))?;
    let socket = handle.try_clone().map_err(|e| closed(&a, e.to_string()))?;
    let conn = crate::blocking::BlockingConn::accepted_reads(stream, socket, a.clone(), net.max_frame)
        .map_err(|err| NetError::Link { addr: a, err })?;
    Ok(Accepted::Reads(conn, handle))
}

/// A blocking socket for a read connection's thread (and a handle on it): writes give up after
/// a minute, reads after HANDSHAKE_TIMEOUT (the server may allow more once the peer identified
/// itself).
fn blocking_socket(tcp: TcpStream) -> std::io::Result<(std::net::TcpStream, std::net::TcpStream)> {
    let std = tcp.into_std()?;
    std.set_nonblocking(false)?;
    std.set_write_timeout(Some(Duration::from_secs(60)))?;
    std.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let handle = std.try_clone()?;
    Ok((std, handle))
}

/// Bind a listener on `addr` (port 0 picks a free port).
pub async fn listen(addr: &Address) -> std::io::Result<TcpListener> {
    TcpListener::bind((addr.host.as_str(), addr.port)).await
}

/// Build the identification request of a node.
pub fn identification(
    cluster: &str,
    node_type: NodeType,
    nid: Option<Nid>,
    address: Option<&Address>,
) -> RequestIdentification {
    RequestIdentification {
        protocol_version: PROTOCOL_VERSION,
        cluster: cluster.to_string(),
        node_type: node_type as i32,
        nid: nid.map(|n| n.0),
        address: address.map(|a| a.to_string()).unwrap_or_default(),
        read_only: false,
    }
}

/// Connect and identify; returns the link once the peer accepted.
pub async fn connect_identified(
    addr: &Address,
    net: &NetConfig,
    req: RequestIdentification,
) -> Result<(Link, Incoming, AcceptIdentification), NetError> {
    let (link, incoming) = connect(addr, net).await?;
    let a = addr.to_string();
    let res = tokio::time::timeout(HANDSHAKE_TIMEOUT, link.ask(req))
        .await
        .map_err(|_| NetError::Timeout { addr: a.clone() })
        .and_then(|r| {
            r.and_then(|b| expect_answer!(b, AcceptIdentification)).map_err(|err| NetError::Link { addr: a, err })
        });
    match res {
        Ok(acc) => Ok((link, incoming, acc)),
        Err(e) => {
            link.abort();
            Err(e)
        }
    }
}

/// Acceptor side: wait for the peer's identification and check protocol version and cluster
/// name. On failure the peer gets an error answer, the connection is closed and `None` returned.
pub async fn receive_identification(
    link: &Link,
    incoming: &mut Incoming,
    cluster: &str,
) -> Option<(u32, RequestIdentification)> {
    let first = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming.recv()) => r.ok().flatten(),
        _ = link.closed() => None,
    };
    let Some(Request { id, body }) = first else {
        link.abort();
        return None;
    };
    let req = match body {
        Body::RequestIdentification(r) => r,
        other => {
            warn!("{}: first packet is {}, not an identification: closing", link.peer(), crate::body_name(&other));
            link.refuse(id, ErrorCode::ProtocolError, "identification required").await;
            return None;
        }
    };
    if let Err(msg) = check_identification(&req, cluster) {
        warn!("{}: refused: {msg}", link.peer());
        link.refuse(id, ErrorCode::ProtocolError, msg).await;
        return None;
    }
    Some((id, req))
}

/// Check a peer's identification against our protocol version and cluster name.
pub fn check_identification(req: &RequestIdentification, cluster: &str) -> Result<(), String> {
    if req.protocol_version != PROTOCOL_VERSION {
        return Err(format!("protocol version mismatch: yours {}, ours {}", req.protocol_version, PROTOCOL_VERSION));
    }
    if req.cluster != cluster {
        return Err(format!("invalid cluster name {:?} (ours is {cluster:?})", req.cluster));
    }
    Ok(())
}
