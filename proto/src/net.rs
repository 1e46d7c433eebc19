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
        Some(tls) => {
            let acc = tokio_rustls::TlsAcceptor::from(tls.server.clone());
            let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, acc.accept(tcp))
                .await
                .map_err(|_| NetError::Timeout { addr: a.clone() })?
                .map_err(|err| NetError::Tls { addr: a.clone(), err })?;
            Box::pin(s)
        }
    };
    Ok(Link::spawn(stream, a, net.max_frame))
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
    if req.protocol_version != PROTOCOL_VERSION {
        warn!("{}: refused: protocol version {} (ours is {})", link.peer(), req.protocol_version, PROTOCOL_VERSION);
        let msg = format!("protocol version mismatch: yours {}, ours {}", req.protocol_version, PROTOCOL_VERSION);
        link.refuse(id, ErrorCode::ProtocolError, msg).await;
        return None;
    }
    if req.cluster != cluster {
        warn!("{}: refused: cluster name {:?} (ours is {:?})", link.peer(), req.cluster, cluster);
        link.refuse(id, ErrorCode::ProtocolError, format!("invalid cluster name {:?}", req.cluster)).await;
        return None;
    }
    Some((id, req))
}
