//! `neo-bench --replication`: a cluster of one storage holding `--objects` objects of
//! `--object-size` bytes; a second storage is added (`neoctl add`) and copies every partition.
//! Prints the copy's MB/s and objects/s until every cell is UP_TO_DATE, the storages' peak
//! resident memory meanwhile, and the commit rate of a client during the copy against the
//! rate just before it.

use crate::{BoxError, Cli, data};
use neo_client::{Client, ClientConfig};
use neo_lib::{CellState, NodeState, NodeType, Oid, Tid};
use neosimple::SimpleCluster;
use proto::{expect_answer, msg};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Objects per transaction while filling the database.
const FILL_BATCH: usize = 1000;

pub async fn run(cli: &Cli) -> Result<(), BoxError> {
    let exe = std::env::current_exe()?;
    let mut opts = crate::cluster_options(cli, exe.clone());
    opts.storages = 1;
    opts.spare_storages = 1;
    opts.replicas = 1;
    let mut cluster = SimpleCluster::start(&opts)?;
    let result = bench(cli, &exe, &mut cluster).await;
    cluster.stop(Duration::from_secs(30)).await;
    crate::drop_databases(cli.mysql.as_deref(), &opts.cluster, 2);
    result
}

async fn admin(cluster: &SimpleCluster, body: impl Into<proto::Body>) -> Result<proto::Body, BoxError> {
    cluster.admin_ask(body.into()).await
}

async fn bench(cli: &Cli, exe: &std::path::Path, cluster: &mut SimpleCluster) -> Result<(), BoxError> {
    cluster.wait_running(Duration::from_secs(60)).await?;
    let (objects, size) = (cli.objects, cli.object_size);
    println!(
        "replication: 1 storage with {objects} objects of {size} bytes ({:.0} MB), {} partitions, {}, {}",
        (objects * size) as f64 / 1e6,
        cli.partitions,
        if cli.tls { "TLS" } else { "plain TCP" },
        if cli.mysql.is_some() { "MySQL/MariaDB" } else { "SQLite" },
    );
    let mut cfg = ClientConfig::new(vec![cluster.master.clone()], cluster.cluster.clone());
    cfg.tls = cluster.client_tls.clone();
    cfg.compress = false; // random bytes: deflate would only cost time
    let c = Client::connect(cfg.clone()).await?;
    let start = Instant::now();
    let mut done = 0;
    while done < objects {
        let n = FILL_BATCH.min(objects - done);
        let mut txn = c.tpc_begin(b"bench", b"fill", b"").await?;
        for j in 0..n {
            let oid = c.new_oid().await?;
            c.store(&mut txn, oid, Tid::ZERO, &data(size, (done + j) as u64))?;
        }
        c.tpc_vote(&mut txn).await?;
        c.tpc_finish(txn).await?;
        done += n;
    }
    println!("  filled in {:.1} s", start.elapsed().as_secs_f64());
    // Commit rate without replication.
    let window = Duration::from_secs(cli.window_secs);
    let before = commit_rate(&c, window, size).await?;
    println!("  commits before the copy: {before:.0}/s (one client, one {size}-byte object each)");
    // A second storage joins and copies everything.
    cluster.respawn(exe, "storage2")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let b = admin(cluster, msg::AskNodeList { node_type: Some(NodeType::Storage as i32) }).await?;
        let list = expect_answer!(b, AnswerNodeList)?;
        if list.nodes.iter().any(|n| n.state == NodeState::Pending as i32) {
            break;
        }
        if Instant::now() > deadline {
            return Err("the new storage did not show up as pending".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let during = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (c, stop, during) = (c.clone(), stop.clone(), during.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if commit_one(&c, size).await.is_ok() {
                    during.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let start = Instant::now();
    expect_answer!(admin(cluster, msg::AddPendingNodes { nids: vec![] }).await?, Error)?;
    let mut peak: Vec<(String, u64)> = cluster.rss_kib();
    loop {
        for (name, kib) in cluster.rss_kib() {
            match peak.iter_mut().find(|(n, _)| *n == name) {
                Some(p) => p.1 = p.1.max(kib),
                None => peak.push((name, kib)),
            }
        }
        let b = admin(cluster, msg::AskPartitionList { min_offset: 0, max_offset: 0, nid: None }).await?;
        let pt = proto::convert::pt_from_msg(&expect_answer!(b, AnswerPartitionList)?)?;
        let cells: Vec<CellState> = pt.rows().iter().flatten().map(|c| c.state).collect();
        if cells.len() == 2 * cli.partitions as usize && cells.iter().all(|s| *s == CellState::UpToDate) {
            break;
        }
        if start.elapsed() > Duration::from_secs(3600) {
            return Err("replication did not finish in an hour".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    let during = during.load(Ordering::Relaxed) as f64 / elapsed;
    let after = commit_rate(&c, window, size).await?;
    let bytes = (objects * size) as f64;
    println!(
        "  copy: {elapsed:.1} s, {:.1} MB/s, {:.0} objects/s (data of the objects filled; the commits made meanwhile reach the new storage directly)",
        bytes / 1e6 / elapsed,
        objects as f64 / elapsed
    );
    println!(
        "  commits during the copy: {during:.0}/s, {:.0} % of the rate after it ({after:.0}/s, on both storages), {:.0} % of the rate before it (one storage)",
        during / after.max(1e-9) * 100.0,
        during / before.max(1e-9) * 100.0
    );
    println!("  peak resident memory during the copy:");
    for (name, kib) in peak {
        println!("    {name:<10} {:>8.1} MiB", kib as f64 / 1024.0);
    }
    c.close().await;
    Ok(())
}

async fn commit_one(c: &Client, size: usize) -> Result<Tid, BoxError> {
    let mut txn = c.tpc_begin(b"bench", b"", b"").await?;
    let oid: Oid = c.new_oid().await?;
    c.store(&mut txn, oid, Tid::ZERO, &data(size, oid.0))?;
    c.tpc_vote(&mut txn).await?;
    Ok(c.tpc_finish(txn).await?)
}

/// Single-object commits per second over `window`.
async fn commit_rate(c: &Client, window: Duration, size: usize) -> Result<f64, BoxError> {
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < window {
        commit_one(c, size).await?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}
