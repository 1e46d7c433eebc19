//! The neoctl binary: exit codes and messages against an admin that has no master, an
//! unreachable address, and usage errors.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use neo_lib::NodeType;
use neo_lib::config::NodeConfig;
use std::collections::BTreeMap;
use std::process::Output;
use tokio_util::sync::CancellationToken;

fn dead_port() -> u16 {
    match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => panic!("{e}"),
    }
}

async fn neoctl(args: &[String]) -> Output {
    let r = tokio::process::Command::new(env!("CARGO_BIN_EXE_neoctl")).args(args).output().await;
    match r {
        Ok(o) => o,
        Err(e) => panic!("{e}"),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn exit_codes() {
    // Unreachable admin: one line, exit 1.
    let addr = format!("127.0.0.1:{}", dead_port());
    let o = neoctl(&["-a".into(), addr.clone(), "print".into(), "cluster".into()]).await;
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(err.starts_with(&format!("neoctl: cannot reach admin at {addr}: ")), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(o.stdout.is_empty());

    // Usage errors: exit 2.
    for args in [vec!["frobnicate"], vec!["set", "cluster", "FOO"], vec!["print", "node", "BAR"], vec![]] {
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let o = neoctl(&args).await;
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o.stderr));
    }
    let o = neoctl(&["set".into(), "cluster".into(), "FOO".into()]).await;
    assert!(text(&o.stderr).contains("RUNNING"), "{}", text(&o.stderr));

    // An admin without master: NOT_READY, exit 1.
    let values: BTreeMap<String, String> =
        [("cluster".to_string(), "test".to_string()), ("masters".to_string(), format!("127.0.0.1:{}", dead_port()))]
            .into_iter()
            .collect();
    let cfg = match NodeConfig::from_values(&values, NodeType::Admin, "test") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => panic!("{e}"),
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let shutdown = CancellationToken::new();
    let admin = tokio::spawn(neo_admin::run_with_listener(cfg, listener, shutdown.clone()));
    let addr = format!("127.0.0.1:{port}");
    for cmd in [vec!["print", "cluster"], vec!["start"], vec!["--json", "print", "ids"]] {
        let mut args = vec!["-a".to_string(), addr.clone()];
        args.extend(cmd.iter().map(|s| s.to_string()));
        let o = neoctl(&args).await;
        assert_eq!(o.status.code(), Some(1), "{cmd:?}");
        assert_eq!(text(&o.stderr), "neoctl: NOT_READY: Not connected to a primary master.\n", "{cmd:?}");
        assert!(o.stdout.is_empty());
    }
    shutdown.cancel();
    assert!(matches!(admin.await, Ok(Ok(()))));
}
