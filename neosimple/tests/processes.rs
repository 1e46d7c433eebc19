//! neosimple as a user runs it: real node processes, TLS, a client, Ctrl-C; and node binaries
//! refusing a bad configuration with exit status 2.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use neo_client::{Client, ClientConfig};
use neo_lib::Tid;
use neo_lib::config::{Address, TlsFiles};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_neosimple");

#[allow(unsafe_code)]
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

fn node_processes(data: &std::path::Path) -> usize {
    let needle = data.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| {
            let c = String::from_utf8_lossy(c);
            c.contains("__node") && c.contains(&needle)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neosimple_starts_a_tls_cluster_that_serves_clients_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cluster");
    let mut child = Command::new(EXE)
        .args(["--storages", "2", "--replicas", "1", "--partitions", "6", "--tls", "--cluster", "proc-test"])
        .arg("--data")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut master, mut tls, mut running) = (None, None, false);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.contains("is RUNNING") {
            running = true;
        }
        if let Some(a) = line.strip_prefix("master: ") {
            master = Some(a.trim().parse::<Address>().unwrap());
        }
        if let Some(t) = line.strip_prefix("client TLS: ") {
            let w: Vec<&str> = t.split_whitespace().collect();
            tls = Some(TlsFiles { ca: w[1].into(), cert: w[3].into(), key: w[5].into() });
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    assert!(running, "neosimple did not report a running cluster");
    assert_eq!(node_processes(&data), 4, "master, 2 storages and admin run as processes");
    let mut cfg = ClientConfig::new(vec![master.unwrap()], "proc-test");
    cfg.tls = tls;
    let client = Client::connect(cfg).await.unwrap();
    let oid = client.new_oid().await.unwrap();
    let mut t = client.tpc_begin(b"", b"", b"").await.unwrap();
    client.store(&mut t, oid, Tid::ZERO, b"through real processes").unwrap();
    client.tpc_vote(&mut t).await.unwrap();
    let tid = client.tpc_finish(t).await.unwrap();
    assert_eq!(client.load(oid).await.unwrap(), (b"through real processes".to_vec(), tid));
    client.close().await;

    signal(child.id(), libc::SIGINT);
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "neosimple exited with {status}");
    assert_eq!(node_processes(&data), 0, "every node process stopped");
    // Databases and logs stay in --data.
    assert!(data.join("storage1.sqlite").exists() && data.join("master.log").exists());
}

#[test]
fn a_bad_configuration_value_names_file_section_and_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("neo.conf");
    std::fs::write(&conf, "[DEFAULT]\ncluster = c\n[master]\npartitions = lots\n").unwrap();
    for kind in ["master", "storage", "admin"] {
        let section = if kind == "storage" { "master" } else { kind };
        if kind == "admin" {
            std::fs::write(&conf, "[DEFAULT]\ncluster = c\n[admin]\nbind = nowhere:port\n").unwrap();
        }
        let out = Command::new(EXE).args(["__node", kind, "-f"]).arg(&conf).args(["-s", section]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{kind}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("neo.conf") && err.contains(&format!("[{section}]")), "{kind}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    // So is what the cluster cannot honour yet: several masters, backup mode.
    for (option, needle) in
        [("masters = 127.0.0.1:10000 127.0.0.1:10001", "several masters"), ("upstream_cluster = main", "backup mode")]
    {
        std::fs::write(
            &conf,
            format!("[DEFAULT]\ncluster = c\n{option}\n[master]\n[storage]\ndatabase = x\n[admin]\n"),
        )
        .unwrap();
        for kind in ["master", "storage", "admin"] {
            let out = Command::new(EXE).args(["__node", kind, "-f"]).arg(&conf).args(["-s", kind]).output().unwrap();
            assert_eq!(out.status.code(), Some(2), "{kind} with {option}: {out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(needle) && err.contains("not supported yet"), "{kind}: {err}");
        }
    }
    // An unknown option is an error too.
    std::fs::write(&conf, "[DEFAULT]\ncluster = c\n[master]\nreplica = 1\n").unwrap();
    let out = Command::new(EXE).args(["__node", "master", "-f"]).arg(&conf).args(["-s", "master"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("replica"));
}

#[test]
fn sighup_reopens_the_log_file_and_sigterm_stops_a_node_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = dir.path().join("master.log");
    let conf = dir.path().join("neo.conf");
    std::fs::write(
        &conf,
        format!(
            "[DEFAULT]\ncluster = c\nverbose = 1\n[master]\nbind = 127.0.0.1:{port}\nlogfile = {}\n",
            log.display()
        ),
    )
    .unwrap();
    let mut child =
        Command::new(EXE).args(["__node", "master", "-f"]).arg(&conf).args(["-s", "master"]).spawn().unwrap();
    let wait_for = |path: &std::path::Path, text: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::fs::read_to_string(path).is_ok_and(|t| t.contains(text)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} never contained {text:?}", path.display());
    };
    wait_for(&log, "listening on");
    // logrotate: move the file away, then SIGHUP; the node writes to a new file.
    let rotated = dir.path().join("master.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    signal(child.id(), libc::SIGHUP);
    wait_for(&log, "log file reopened");
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not stop the node");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    wait_for(&log, "master stopped");
    assert!(std::fs::read_to_string(&rotated).unwrap().contains("listening on"));
}

/// No password of a MySQL `database` value shows in any error or log line of a storage that
/// cannot open it, whatever is wrong (bad URL, no database, wrong password, no socket), in
/// either form (URL or NEO's), at the most verbose log level.
#[test]
fn a_mysql_password_never_shows_in_errors_or_logs() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("neo.conf");
    for db in [
        "mysql://root:secret@127.0.0.1:3306/neo_redact_test",
        "mysql://nobody:secret@127.0.0.1:3306/neo_redact_test",
        "mysql://root:secret@127.0.0.1:3306/",
        "mysql://root:se%cret@127.0.0.1:3306/x?bad=1",
        "mysql://root:secret@no-such-host.invalid:3306/x",
        "root:secret@",
        ":secret@db",
        "root:secret@neo_redact_test/no/such/mysqld.sock",
    ] {
        std::fs::write(&conf, format!("[DEFAULT]\ncluster = c\nverbose = 3\n[storage]\ndatabase = {db}\n")).unwrap();
        let out =
            Command::new(EXE).args(["__node", "storage", "-f"]).arg(&conf).args(["-s", "storage"]).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{db}: {text}");
        assert!(!text.contains("secret") && !text.contains("se%cret"), "{db}: {text}");
        assert!(text.contains("***") || text.contains("nobody") || text.contains("no-such-host"), "{db}: {text}");
    }
}

#[test]
fn an_unreachable_mysql_server_is_a_one_line_error_with_its_address_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("neo.conf");
    // Port 1 on loopback: nothing listens there.
    std::fs::write(&conf, "[DEFAULT]\ncluster = c\n[storage]\ndatabase = mysql://neo:secret@127.0.0.1:1/neo\n")
        .unwrap();
    let out = Command::new(EXE).args(["__node", "storage", "-f"]).arg(&conf).args(["-s", "storage"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(!err.contains("secret"), "the password is not printed: {err}");
}
