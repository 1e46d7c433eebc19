//! A blocking connection, for a caller that waits for the answer anyway (a Python thread in a
//! ZODB load): the calling thread writes the request and reads the answer itself. Going through
//! a `Link` instead costs two thread wake-ups per request (the runtime's, then the caller's),
//! about 20 µs each on a small VM (60 µs or more on one whose idle CPUs halt). A read spins a
//! little before it blocks (`crate::spin`), so that an answer or request that comes quickly
//! wakes nothing at all. Same magic, framing, TLS and identification as `net`; one request at
//! a time; after any error the connection must be dropped.

use crate::frame::{self, FrameError, MAGIC, READ_MAGIC};
use crate::link::{LinkError, remote_error};
use crate::msg::{Packet, RequestIdentification};
use crate::net::{HANDSHAKE_TIMEOUT, NetConfig, NetError};
use crate::spin::Spinner;
use crate::{Body, expect_answer};
use bytes::BytesMut;
use neo_lib::config::Address;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub struct BlockingConn {
    stream: Box<dyn Stream>,
    /// The stream's socket (a second handle): non-blocking while spinning, and its timeouts.
    socket: TcpStream,
    spinner: Spinner,
    buf: BytesMut,
    max: usize,
    next_id: u32,
    peer: String,
}

impl std::fmt::Debug for BlockingConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockingConn({})", self.peer)
    }
}

impl BlockingConn {
    /// Connect (TCP, then TLS if configured) and identify with `req`. Every later read or
    /// write fails after `timeout` without progress.
    pub fn connect_identified(
        addr: &Address,
        net: &NetConfig,
        req: RequestIdentification,
        timeout: Duration,
    ) -> Result<BlockingConn, NetError> {
        Self::connect_with(addr, net, req, timeout, MAGIC)
    }

    /// `connect_identified` for a connection that only loads objects (`READ_MAGIC`): a
    /// storage serves it on a thread of its own.
    pub fn connect_reads(
        addr: &Address,
        net: &NetConfig,
        req: RequestIdentification,
        timeout: Duration,
    ) -> Result<BlockingConn, NetError> {
        Self::connect_with(addr, net, req, timeout, READ_MAGIC)
    }

    /// The server's end of a read connection whose `READ_MAGIC` was received: sends `MAGIC`.
    pub fn accepted_reads(
        stream: Box<dyn Stream>,
        socket: TcpStream,
        peer: String,
        max: usize,
    ) -> Result<BlockingConn, LinkError> {
        let mut c = BlockingConn {
            stream,
            socket,
            spinner: Spinner::default(),
            buf: BytesMut::with_capacity(16 * 1024),
            max,
            next_id: 1,
            peer,
        };
        c.stream.write_all(MAGIC).and_then(|_| c.stream.flush()).map_err(|e| c.io(e))?;
        Ok(c)
    }

    /// Server side: the next request (id, body); answers and packets without body are
    /// skipped.
    pub fn next_request(&mut self) -> Result<(u32, Body), LinkError> {
        loop {
            let p = self.read_packet()?;
            if let (false, Some(body)) = (p.answer, p.body) {
                return Ok((p.id, body));
            }
        }
    }

    /// Server side: answer request `id`.
    pub fn answer(&mut self, id: u32, body: Body) -> Result<(), LinkError> {
        let mut out = BytesMut::new();
        frame::encode(&Packet { id, answer: true, body: Some(body) }, &mut out);
        self.stream.write_all(&out).and_then(|_| self.stream.flush()).map_err(|e| self.io(e))
    }

    fn connect_with(
        addr: &Address,
        net: &NetConfig,
        req: RequestIdentification,
        timeout: Duration,
        magic: &[u8; 8],
    ) -> Result<BlockingConn, NetError> {
        let peer = addr.to_string();
        let connect_err = |err| NetError::Connect { addr: peer.clone(), err };
        let mut last = std::io::Error::other("no address");
        let mut tcp = None;
        for sa in (addr.host.as_str(), addr.port).to_socket_addrs().map_err(connect_err)? {
            match TcpStream::connect_timeout(&sa, HANDSHAKE_TIMEOUT) {
                Ok(t) => {
                    tcp = Some(t);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let tcp = tcp.ok_or_else(|| connect_err(last))?;
        let _ = tcp.set_nodelay(true);
        tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(connect_err)?;
        tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(connect_err)?;
        let socket = tcp.try_clone().map_err(connect_err)?;
        let stream: Box<dyn Stream> = match &net.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let tls_err = |e: rustls::Error| NetError::Tls { addr: peer.clone(), err: std::io::Error::other(e) };
                let name = rustls::pki_types::ServerName::try_from("neo-node")
                    .map_err(|e| NetError::Tls { addr: peer.clone(), err: std::io::Error::other(e) })?;
                let conn = rustls::ClientConnection::new(tls.client.clone(), name).map_err(tls_err)?;
                let mut s = rustls::StreamOwned::new(conn, tcp);
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock).map_err(|err| NetError::Tls { addr: peer.clone(), err })?;
                }
                Box::new(s)
            }
        };
        let mut c = BlockingConn {
            stream,
            socket,
            spinner: Spinner::default(),
            buf: BytesMut::with_capacity(64 * 1024),
            max: net.max_frame,
            next_id: 1,
            peer,
        };
        let link_err = |err| NetError::Link { addr: addr.to_string(), err };
        c.stream.write_all(magic).and_then(|_| c.stream.flush()).map_err(|e| link_err(c.io(e)))?;
        c.read_magic().map_err(link_err)?;
        let ans = c.ask(req.into()).map_err(link_err)?;
        expect_answer!(ans, AcceptIdentification).map_err(link_err)?;
        c.socket.set_read_timeout(Some(timeout)).map_err(|err| NetError::Connect { addr: c.peer.clone(), err })?;
        c.socket.set_write_timeout(Some(timeout)).map_err(|err| NetError::Connect { addr: c.peer.clone(), err })?;
        Ok(c)
    }

    /// A blocking read now fails after `timeout` without data (None: never).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), LinkError> {
        self.socket.set_read_timeout(timeout).map_err(|e| self.io(e))
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    fn io(&self, e: std::io::Error) -> LinkError {
        LinkError::Closed(format!("{} ({e})", self.peer))
    }

    fn frame_err(&self, e: FrameError) -> LinkError {
        match e {
            FrameError::Io(e) => self.io(e),
            other => LinkError::Closed(format!("{} ({other})", self.peer)),
        }
    }

    fn read_magic(&mut self) -> Result<(), LinkError> {
        let mut magic = [0u8; 8];
        self.stream.read_exact(&mut magic).map_err(|e| self.io(e))?;
        if &magic != MAGIC {
            return Err(self.frame_err(FrameError::BadMagic(magic.to_vec())));
        }
        Ok(())
    }

    fn read_packet(&mut self) -> Result<Packet, LinkError> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(p) = frame::parse(&mut self.buf, self.max).map_err(|e| self.frame_err(e))? {
                return Ok(p);
            }
            let n = match self.spin_read(&mut chunk)? {
                Some(n) => n,
                None => self.stream.read(&mut chunk).map_err(|e| self.io(e))?,
            };
            if n == 0 {
                return Err(self.frame_err(FrameError::Truncated));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Read without sleeping for a while (see `crate::spin`): an answer that comes within
    /// tens of microseconds is then taken without a thread wake-up. None: nothing came (the
    /// caller reads blocking then).
    fn spin_read(&mut self, chunk: &mut [u8]) -> Result<Option<usize>, LinkError> {
        let (stream, spinner, socket) = (&mut self.stream, &mut self.spinner, &self.socket);
        let mut nonblocking = Ok(false);
        let got = spinner.spin(|| {
            if nonblocking.as_ref().is_ok_and(|set| !set) {
                nonblocking = socket.set_nonblocking(true).map(|_| true);
            }
            if nonblocking.is_err() {
                return Some(Ok(0)); // stop spinning; the error is returned below
            }
            match stream.read(chunk) {
                Ok(n) => Some(Ok(n)),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => None,
                Err(e) => Some(Err(e)),
            }
        });
        let restored = match nonblocking {
            Ok(true) => socket.set_nonblocking(false),
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        restored.map_err(|e| self.io(e))?;
        got.transpose().map_err(|e| self.io(e))
    }

    /// Send a request and wait for its answer; an `Error` answer other than ACK becomes
    /// `LinkError::Remote` (the connection stays usable then). Requests or notifications from
    /// the peer meanwhile are ignored (nothing is sent unasked to a connection that only reads).
    pub fn ask(&mut self, body: Body) -> Result<Body, LinkError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut out = BytesMut::new();
        frame::encode(&Packet { id, answer: false, body: Some(body) }, &mut out);
        self.stream.write_all(&out).and_then(|_| self.stream.flush()).map_err(|e| self.io(e))?;
        loop {
            let p = self.read_packet()?;
            if p.answer && p.id == id {
                let body = p.body.ok_or_else(|| LinkError::Unexpected("answer without body".into()))?;
                return remote_error(body);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg;
    use crate::net::{accept, identification, receive_identification};
    use neo_lib::{ErrorCode, NodeType};

    fn addr(l: &std::net::TcpListener) -> Address {
        Address { host: "127.0.0.1".into(), port: l.local_addr().unwrap().port() }
    }

    fn request() -> RequestIdentification {
        identification("test", NodeType::Client, None, None)
    }

    /// A peer speaking neo-rs on a runtime of its own: accepts the identification of cluster
    /// "test", answers AskObject with NOT_READY and Ping with Pong.
    fn serve_one(l: std::net::TcpListener) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                l.set_nonblocking(true).unwrap();
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                let (tcp, _) = l.accept().await.unwrap();
                let (link, mut incoming) = accept(tcp, &NetConfig::default()).await.unwrap();
                let Some((id, _)) = receive_identification(&link, &mut incoming, "test").await else {
                    link.closed().await; // the refusal is written before the runtime goes
                    return;
                };
                let acc = msg::AcceptIdentification { node_type: NodeType::Storage as i32, ..Default::default() };
                link.answer(id, acc).await.unwrap();
                while let Some(r) = incoming.recv().await {
                    let ans = match r.body {
                        Body::Ping(_) => msg::Pong {}.into(),
                        _ => crate::error(ErrorCode::NotReady, "not yet"),
                    };
                    link.answer(r.id, ans).await.unwrap();
                }
            })
        })
    }

    #[test]
    fn refusals_keep_the_connection_and_answers_match() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = addr(&l);
        let server = serve_one(l);
        let mut c = BlockingConn::connect_identified(&a, &NetConfig::default(), request(), Duration::from_secs(10))
            .expect("identified");
        let ask = msg::AskObject { oid: 1, at: None, before: None };
        assert!(matches!(c.ask(ask.into()), Err(LinkError::Remote { code: ErrorCode::NotReady, .. })));
        assert!(matches!(c.ask(msg::Ping {}.into()), Ok(Body::Pong(_))));
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn a_refused_identification_or_a_foreign_peer_is_an_error() {
        // Wrong cluster name: the peer refuses with an error answer.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = addr(&l);
        let server = serve_one(l);
        let mut req = request();
        req.cluster = "other".into();
        let e = BlockingConn::connect_identified(&a, &NetConfig::default(), req, Duration::from_secs(10)).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::ProtocolError), "{e}");
        server.join().unwrap();
        // Not a neo-rs peer at all.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = addr(&l);
        let http = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        });
        let e = BlockingConn::connect_identified(&a, &NetConfig::default(), request(), Duration::from_secs(10))
            .unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
        http.join().unwrap();
    }

    /// `accept_any` tells a read connection from a link by its magic; the read connection is
    /// then served with blocking IO (identification, then one answer per request).
    #[test]
    fn accept_any_serves_read_connections_and_links() {
        use crate::net::{Accepted, accept_any, connect_identified};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = addr(&l);
        let server = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                l.set_nonblocking(true).unwrap();
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                let mut kinds = Vec::new();
                for _ in 0..2 {
                    let (tcp, _) = l.accept().await.unwrap();
                    match accept_any(tcp, &NetConfig::default()).await.unwrap() {
                        Accepted::Reads(mut conn, _socket) => {
                            kinds.push("reads");
                            std::thread::spawn(move || {
                                let (id, body) = conn.next_request().unwrap();
                                assert!(matches!(body, Body::RequestIdentification(_)));
                                let acc = msg::AcceptIdentification {
                                    node_type: NodeType::Storage as i32,
                                    ..Default::default()
                                };
                                conn.answer(id, acc.into()).unwrap();
                                while let Ok((id, body)) = conn.next_request() {
                                    let ans = match body {
                                        Body::AskObject(m) => {
                                            msg::AnswerObject { oid: m.oid, ..Default::default() }.into()
                                        }
                                        _ => crate::error(ErrorCode::ProtocolError, "no"),
                                    };
                                    conn.answer(id, ans).unwrap();
                                }
                            })
                            .join()
                            .unwrap();
                        }
                        Accepted::Link(link, mut incoming) => {
                            kinds.push("link");
                            let (id, _) = receive_identification(&link, &mut incoming, "test").await.unwrap();
                            let acc =
                                msg::AcceptIdentification { node_type: NodeType::Storage as i32, ..Default::default() };
                            link.answer(id, acc).await.unwrap();
                            let r = incoming.recv().await.unwrap();
                            link.answer(r.id, msg::Pong {}).await.unwrap();
                            link.closed().await;
                        }
                    }
                }
                kinds
            })
        });
        let mut c = BlockingConn::connect_reads(&a, &NetConfig::default(), request(), Duration::from_secs(10)).unwrap();
        for oid in [3, 4] {
            match c.ask(msg::AskObject { oid, at: None, before: None }.into()).unwrap() {
                Body::AnswerObject(o) => assert_eq!(o.oid, oid),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(c.ask(msg::Ping {}.into()), Err(LinkError::Remote { code: ErrorCode::ProtocolError, .. })));
        drop(c);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (link, _incoming, _) = connect_identified(&a, &NetConfig::default(), request()).await.unwrap();
            assert!(matches!(link.ask(msg::Ping {}).await, Ok(Body::Pong(_))));
            link.close().await;
            link.closed().await;
        });
        assert_eq!(server.join().unwrap(), ["reads", "link"]);
    }

    fn tls() -> NetConfig {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["neo-node".to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let ctx = crate::tls::TlsContext::from_der(vec![ca.der().clone()], vec![cert.der().clone()], key).unwrap();
        NetConfig { tls: Some(ctx), ..NetConfig::default() }
    }

    /// Reads spin a little before blocking (`crate::spin`): over TLS, answers that come while
    /// the client spins, answers that come long after (the spin gave up, then backed off) and
    /// answers of many TLS records all arrive whole and in order.
    #[test]
    fn spinning_reads_get_whole_answers_over_tls() {
        use crate::net::{Accepted, accept_any};
        let net = tls();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = addr(&l);
        let server_net = net.clone();
        let server = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let conn = rt.block_on(async move {
                l.set_nonblocking(true).unwrap();
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                let (tcp, _) = l.accept().await.unwrap();
                match accept_any(tcp, &server_net).await.unwrap() {
                    Accepted::Reads(conn, _socket) => conn,
                    Accepted::Link(..) => panic!("a read connection was expected"),
                }
            });
            let mut conn = conn;
            let (id, _) = conn.next_request().unwrap();
            let acc = msg::AcceptIdentification { node_type: NodeType::Storage as i32, ..Default::default() };
            conn.answer(id, acc.into()).unwrap();
            // Oid 2 is answered late; oid 3 with 200 kB (about 13 TLS records).
            while let Ok((id, Body::AskObject(m))) = conn.next_request() {
                if m.oid == 2 {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let size = if m.oid == 3 { 200_000 } else { 10 };
                let data = (0..size).map(|i| (i as u64 * 7 + m.oid) as u8).collect();
                conn.answer(id, msg::AnswerObject { oid: m.oid, data, ..Default::default() }.into()).unwrap();
            }
        });
        let mut c = BlockingConn::connect_reads(&a, &net, request(), Duration::from_secs(10)).unwrap();
        c.spinner = Spinner::new(Duration::from_micros(500));
        // Late answers in a row make the spinner back off; then it spins again.
        let oids = [1, 3, 2, 1, 2, 2, 2, 2, 3, 1].into_iter().chain(std::iter::repeat_n(1, 70)).chain([3, 2, 1]);
        for oid in oids {
            match c.ask(msg::AskObject { oid, at: None, before: None }.into()).unwrap() {
                Body::AnswerObject(o) => {
                    let size = if oid == 3 { 200_000 } else { 10 };
                    assert_eq!(o.oid, oid);
                    assert_eq!(o.data.len(), size);
                    assert!(o.data.iter().enumerate().all(|(i, b)| *b == (i as u64 * 7 + oid) as u8), "oid {oid}");
                }
                other => panic!("{other:?}"),
            }
        }
        drop(c);
        server.join().unwrap();
    }
}
