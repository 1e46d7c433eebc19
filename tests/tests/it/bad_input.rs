//! Bad input: foreign certificates, random bytes, oversized frames, wrong protocol version or
//! cluster name. Each is refused on its own connection while the node keeps serving.

use crate::commit::commit;
use neo_client::{Client, ClientConfig};
use neo_lib::config::Address;
use neo_lib::{ErrorCode, NodeType, Tid};
use neo_tests::{Cluster, Options};
use neosimple::certs::TestCa;
use proto::net::{NetConfig, connect_identified, identification};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn all_ports(c: &Cluster) -> Vec<Address> {
    let mut v = vec![c.master_addr.clone(), c.admin_addr.clone()];
    v.extend(c.storage_addrs.iter().cloned());
    v
}

/// The cluster still commits and reads.
async fn still_serving(c: &Cluster) {
    let client = c.client().await;
    let oid = client.new_oid().await.unwrap();
    let tid = commit(&client, oid, Tid::ZERO, b"still serving").await.unwrap();
    assert_eq!(client.load(oid).await.unwrap(), (b"still serving".to_vec(), tid));
    client.close().await;
}

/// The peer closes the connection (reads EOF or an error) within a few seconds.
async fn closed_by_peer(mut s: TcpStream) {
    let mut buf = vec![0u8; 4096];
    let r = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "connection was not closed by the node");
}

async fn a_node_whose_certificate_comes_from_another_ca_is_refused(opts: Options) {
    let cluster = Cluster::start(opts).await;
    let other = TestCa::new(cluster.dir.path(), "other-ca").unwrap();
    let intruder = other.issue("intruder").unwrap();
    let net = NetConfig { tls: Some(proto::tls::TlsContext::load(&intruder).unwrap()), max_frame: 1 << 20 };
    for addr in all_ports(&cluster) {
        let req = identification(&cluster.name, NodeType::Client, None, None);
        let r = connect_identified(&addr, &net, req).await;
        assert!(r.is_err(), "{addr} accepted a certificate from another CA");
    }
    // A client with such a certificate cannot connect.
    let mut cfg: ClientConfig = cluster.client_config();
    cfg.tls = Some(intruder);
    cfg.connect_timeout = Duration::from_millis(500);
    assert!(Client::connect(cfg).await.is_err());
    // Plain TCP to a TLS cluster is refused too.
    let plain = NetConfig::default();
    let req = identification(&cluster.name, NodeType::Client, None, None);
    assert!(connect_identified(&cluster.master_addr, &plain, req).await.is_err());
    still_serving(&cluster).await;
}

async fn random_bytes_and_oversized_frames_are_refused_while_nodes_keep_serving(opts: Options) {
    // Without TLS the bytes reach the frame decoder directly.
    let cluster = Cluster::start(Options { tls: false, ..opts }).await;
    let mut rng = fastrand::Rng::with_seed(42);
    for addr in all_ports(&cluster) {
        // Random bytes instead of the magic.
        let mut s = TcpStream::connect((addr.host.as_str(), addr.port)).await.unwrap();
        let junk: Vec<u8> = (0..1000).map(|_| rng.u8(..)).collect();
        let _ = s.write_all(&junk).await;
        closed_by_peer(s).await;
        // Right magic, then a frame announcing 2 GiB.
        let mut s = TcpStream::connect((addr.host.as_str(), addr.port)).await.unwrap();
        let mut bytes = proto::frame::MAGIC.to_vec();
        bytes.extend_from_slice(&0x8000_0000u32.to_be_bytes());
        bytes.extend_from_slice(&[0u8; 64]);
        let _ = s.write_all(&bytes).await;
        closed_by_peer(s).await;
        // Right magic, then a frame that is not a valid packet.
        let mut s = TcpStream::connect((addr.host.as_str(), addr.port)).await.unwrap();
        let mut bytes = proto::frame::MAGIC.to_vec();
        let body: Vec<u8> = (0..200).map(|_| rng.u8(..)).collect();
        bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&body);
        let _ = s.write_all(&bytes).await;
        closed_by_peer(s).await;
        // An HTTP request.
        let mut s = TcpStream::connect((addr.host.as_str(), addr.port)).await.unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        closed_by_peer(s).await;
    }
    still_serving(&cluster).await;
}

async fn a_wrong_protocol_version_or_cluster_name_is_refused_with_an_error_code(opts: Options) {
    let cluster = Cluster::start(opts).await;
    let net = cluster.net();
    for addr in [cluster.master_addr.clone()].iter().chain(cluster.storage_addrs.iter()) {
        let mut req = identification(&cluster.name, NodeType::Client, None, None);
        req.protocol_version += 1;
        let e = connect_identified(addr, &net, req).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::ProtocolError), "{e}");
        assert!(e.to_string().contains("protocol version"), "{e}");
        let req = identification("another-cluster", NodeType::Client, None, None);
        let e = connect_identified(addr, &net, req).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::ProtocolError), "{e}");
        assert!(e.to_string().contains("cluster name"), "{e}");
    }
    // A refused request leaves the connection usable: an unexpected message on an identified
    // connection gets an error answer, and the next request works.
    let req = identification(&cluster.name, NodeType::Client, None, None);
    let (link, _incoming, _) = connect_identified(&cluster.master_addr, &net, req).await.unwrap();
    let e = link.ask(proto::msg::AskLockedTransactions {}).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::ProtocolError));
    let b = link.ask(proto::msg::AskLastTransaction {}).await.unwrap();
    assert!(proto::expect_answer!(b, AnswerLastTransaction).is_ok());
    still_serving(&cluster).await;
}

/// Read connections (a storage serves them on a thread of their own) check the
/// identification like links do, refuse anything but loads with an error answer and stay
/// usable, and are refused by masters.
async fn read_connections_check_identification_and_answer_only_loads(opts: Options) {
    use proto::blocking::BlockingConn;
    let mut cluster = Cluster::start(opts).await;
    let c = cluster.client().await;
    let oid = c.new_oid().await.unwrap();
    let tid = commit(&c, oid, Tid::ZERO, b"read me").await.unwrap();
    let (net, name, storage, master) =
        (cluster.net(), cluster.name.clone(), cluster.storage_addrs[0].clone(), cluster.master_addr.clone());
    let conn = tokio::task::spawn_blocking(move || {
        let t = Duration::from_secs(10);
        let mut req = identification(&name, NodeType::Client, None, None);
        req.protocol_version += 1;
        let e = BlockingConn::connect_reads(&storage, &net, req, t).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::ProtocolError), "{e}");
        let req = identification("another-cluster", NodeType::Client, None, None);
        let e = BlockingConn::connect_reads(&storage, &net, req, t).unwrap_err();
        assert!(e.to_string().contains("cluster name"), "{e}");
        let req = identification(&name, NodeType::Client, None, None);
        assert!(BlockingConn::connect_reads(&master, &net, req.clone(), t).is_err(), "a master took a read connection");
        let mut conn = BlockingConn::connect_reads(&storage, &net, req, t).unwrap();
        let e = conn.ask(proto::msg::AskLastTransaction {}.into()).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::ProtocolError), "{e}");
        let b = conn.ask(proto::msg::AskObject { oid: oid.0, at: None, before: None }.into()).unwrap();
        let a = proto::expect_answer!(b, AnswerObject).unwrap();
        assert_eq!(a.serial, tid.0);
        let e = conn.ask(proto::msg::AskObject { oid: oid.0 + 1, at: None, before: None }.into()).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::OidDoesNotExist), "{e}");
        conn
    })
    .await
    .unwrap();
    still_serving(&cluster).await;
    c.close().await;
    // A storage that stops closes its read connections.
    cluster.stop_storage(0).await;
    let mut conn = conn;
    let r =
        tokio::task::spawn_blocking(move || conn.ask(proto::msg::AskObject { oid: 0, at: None, before: None }.into()))
            .await
            .unwrap();
    assert!(matches!(r, Err(proto::LinkError::Closed(_))), "{r:?}");
}

crate::both_backends!(
    read_connections_check_identification_and_answer_only_loads,
    a_node_whose_certificate_comes_from_another_ca_is_refused,
    random_bytes_and_oversized_frames_are_refused_while_nodes_keep_serving,
    a_wrong_protocol_version_or_cluster_name_is_refused_with_an_error_code
);
