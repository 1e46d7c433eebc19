//! The admin without a reachable master: neoctl requests get NOT_READY, protocol errors keep
//! the connection, and a shutdown stops it cleanly.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use neo_lib::config::NodeConfig;
use neo_lib::{ErrorCode, NodeType};
use proto::net::{self, NetConfig};
use proto::{Body, LinkError, msg};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A local port nobody listens on.
fn dead_port() -> u16 {
    match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => panic!("{e}"),
    }
}

fn config() -> NodeConfig {
    let values: BTreeMap<String, String> = [
        ("cluster".to_string(), "test".to_string()),
        ("masters".to_string(), format!("127.0.0.1:{}", dead_port())),
        ("bind".to_string(), "127.0.0.1:0".to_string()),
    ]
    .into_iter()
    .collect();
    match NodeConfig::from_values(&values, NodeType::Admin, "test") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn remote_code(r: Result<Body, LinkError>) -> Option<ErrorCode> {
    match r {
        Err(LinkError::Remote { code, .. }) => Some(code),
        _ => None,
    }
}

#[tokio::test]
async fn not_ready_without_master_and_clean_shutdown() {
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => panic!("{e}"),
    };
    let addr = match listener.local_addr() {
        Ok(a) => neo_lib::config::Address { host: "127.0.0.1".into(), port: a.port() },
        Err(e) => panic!("{e}"),
    };
    let shutdown = CancellationToken::new();
    let admin = tokio::spawn(neo_admin::run_with_listener(config(), listener, shutdown.clone()));

    let (link, _incoming) = match net::connect(&addr, &NetConfig::default()).await {
        Ok(x) => x,
        Err(e) => panic!("{e}"),
    };
    let r = link.ask(msg::AskClusterState {}).await;
    assert_eq!(
        r,
        Err(LinkError::Remote { code: ErrorCode::NotReady, message: "Not connected to a primary master.".into() })
    );
    // Identification is refused, the connection stays open.
    let r = link.ask(net::identification("test", NodeType::Admin, None, None)).await;
    assert_eq!(remote_code(r), Some(ErrorCode::ProtocolError));
    let r = link.ask(msg::Ping {}).await;
    assert_eq!(r, Err(LinkError::Remote { code: ErrorCode::ProtocolError, message: "unexpected message Ping".into() }));
    // Forwarded commands are NOT_READY too.
    let r = link.ask(msg::SetClusterState { state: 1 }).await;
    assert_eq!(remote_code(r), Some(ErrorCode::NotReady));
    let r = link.ask(msg::AskNodeList { node_type: None }).await;
    assert_eq!(remote_code(r), Some(ErrorCode::NotReady));
    assert!(!link.is_closed());

    // A second, concurrent connection is served too.
    let (link2, _incoming2) = match net::connect(&addr, &NetConfig::default()).await {
        Ok(x) => x,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(remote_code(link2.ask(msg::AskPrimary {}).await), Some(ErrorCode::NotReady));

    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(10), admin).await {
        Ok(Ok(Ok(()))) => {}
        other => panic!("admin did not stop cleanly: {other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(5), link.closed()).await.unwrap_or_else(|_| panic!("link not closed"));
    // The listener is gone.
    assert!(net::connect(&addr, &NetConfig::default()).await.is_err());
}
