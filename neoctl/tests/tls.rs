//! neoctl and the admin over TLS: a matching configuration gets through (the admin answers
//! NOT_READY as it has no master), mismatches fail on one line with exit status 1.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use neo_lib::NodeType;
use neo_lib::config::NodeConfig;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use tokio_util::sync::CancellationToken;

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// Write ca.pem, cert.pem and key.pem (a CA and one certificate signed by it) into `dir`.
fn make_certs(dir: &Path) -> [PathBuf; 3] {
    let ca_key = ok(KeyPair::generate());
    let mut ca_params = ok(CertificateParams::new(Vec::<String>::new()));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ok(ca_params.self_signed(&ca_key));
    let issuer = Issuer::new(ca_params, ca_key);
    let key = ok(KeyPair::generate());
    let mut params = ok(CertificateParams::new(vec!["neo-node".to_string()]));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = ok(params.signed_by(&key, &issuer));
    let paths = [dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem")];
    ok(std::fs::write(&paths[0], ca_cert.pem()));
    ok(std::fs::write(&paths[1], cert.pem()));
    ok(std::fs::write(&paths[2], key.serialize_pem()));
    paths
}

fn dead_port() -> u16 {
    ok(std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())).port()
}

async fn neoctl(args: Vec<String>) -> Output {
    ok(tokio::process::Command::new(env!("CARGO_BIN_EXE_neoctl")).args(args).output().await)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn start_admin(tls: Option<&[PathBuf; 3]>) -> (String, CancellationToken, tokio::task::JoinHandle<()>) {
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    values.insert("cluster".into(), "test".into());
    values.insert("masters".into(), format!("127.0.0.1:{}", dead_port()));
    if let Some([ca, cert, key]) = tls {
        values.insert("ca".into(), ca.display().to_string());
        values.insert("cert".into(), cert.display().to_string());
        values.insert("key".into(), key.display().to_string());
    }
    let cfg = ok(NodeConfig::from_values(&values, NodeType::Admin, "test"));
    let listener = ok(tokio::net::TcpListener::bind("127.0.0.1:0").await);
    let addr = format!("127.0.0.1:{}", ok(listener.local_addr()).port());
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = neo_admin::run_with_listener(cfg, listener, token).await {
            panic!("{e}");
        }
    });
    (addr, shutdown, task)
}

fn tls_args(paths: &[PathBuf; 3]) -> Vec<String> {
    let [ca, cert, key] = paths;
    vec![
        "--ca".into(),
        ca.display().to_string(),
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
    ]
}

#[tokio::test]
async fn tls_round_trip_and_mismatches() {
    let dir = ok(tempfile::tempdir());
    let certs = make_certs(dir.path());

    let (addr, shutdown, task) = start_admin(Some(&certs)).await;
    // Matching TLS: the request gets through.
    let mut args = vec!["-a".to_string(), addr.clone()];
    args.extend(tls_args(&certs));
    args.extend(["print".to_string(), "cluster".to_string()]);
    let o = neoctl(args).await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "neoctl: NOT_READY: Not connected to a primary master.\n");
    // neoctl without TLS against a TLS admin.
    let o = neoctl(vec!["-a".into(), addr.clone(), "print".into(), "cluster".into()]).await;
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.starts_with(&format!("neoctl: cannot reach admin at {addr}: ")), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    shutdown.cancel();
    ok(task.await);

    // neoctl with TLS against a plain admin.
    let (addr, shutdown, task) = start_admin(None).await;
    let mut args = vec!["-a".to_string(), addr.clone()];
    args.extend(tls_args(&certs));
    args.extend(["print".to_string(), "ids".to_string()]);
    let o = neoctl(args).await;
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.starts_with(&format!("neoctl: cannot reach admin at {addr}: ")), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    shutdown.cancel();
    ok(task.await);

    // Unreadable TLS files.
    let missing = dir.path().join("missing.pem");
    let o = neoctl(vec![
        "--ca".into(),
        missing.display().to_string(),
        "--cert".into(),
        certs[1].display().to_string(),
        "--key".into(),
        certs[2].display().to_string(),
        "start".into(),
    ])
    .await;
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.starts_with("neoctl: TLS: ") && err.contains("missing.pem"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
