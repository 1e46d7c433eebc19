//! `neo-bench`: start a local cluster (real node processes, like neosimple) and print
//! throughput and latency figures of commits and loads, then the resident memory of each node.

mod replication;

use clap::Parser;
use neo_client::{Client, ClientConfig};
use neo_lib::{Oid, Tid};
use neosimple::{SimpleCluster, SimpleOptions};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser, Clone)]
#[command(name = "neo-bench", about = "Benchmark a local neo-rs cluster")]
struct Cli {
    #[arg(long, default_value_t = 2)]
    storages: usize,
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    #[arg(long, default_value_t = 12)]
    partitions: u32,
    /// Single-object transactions per phase.
    #[arg(long, default_value_t = 2000)]
    transactions: usize,
    /// 100-object transactions.
    #[arg(long, default_value_t = 100)]
    big_transactions: usize,
    /// Size of each object, in bytes.
    #[arg(long, default_value_t = 100)]
    object_size: usize,
    /// Use TLS between every node and the clients.
    #[arg(long)]
    tls: bool,
    /// Keep the cluster's files in this directory.
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// Run the storages on this MySQL/MariaDB server (mysql://user:password@host:port) instead of
    /// SQLite; their databases are dropped at the end.
    #[arg(long)]
    mysql: Option<String>,
    /// Only time the client's record encoding (compression, its check, decompression) for
    /// records of several sizes and shapes; no cluster.
    #[arg(long)]
    codec: bool,
    /// Time the copy of a database to a storage added to the cluster (see `--objects`),
    /// instead of the commit and load figures.
    #[arg(long)]
    replication: bool,
    /// With --replication: objects in the database to copy (of --object-size bytes).
    #[arg(long, default_value_t = 200_000)]
    objects: usize,
    /// With --replication: seconds over which the commit rate is measured before the copy.
    #[arg(long, default_value_t = 5)]
    window_secs: u64,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    if let Some(code) = neosimple::launcher::node_main(&args) {
        return code;
    }
    let cli = Cli::parse();
    if cli.codec {
        codec_figures();
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("neo-bench: {e}");
            return ExitCode::from(1);
        }
    };
    let r = if cli.replication { rt.block_on(replication::run(&cli)) } else { rt.block_on(run(cli)) };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("neo-bench: {e}");
            ExitCode::from(1)
        }
    }
}

struct Stats {
    n: usize,
    elapsed: Duration,
    lat: Vec<Duration>,
    /// Commits only: time in tpc_begin, the stores (with new_oid), tpc_vote and tpc_finish.
    phases: Vec<[Duration; 4]>,
}

/// Names of `Stats::phases`.
const PHASES: [&str; 4] = ["begin", "stores", "vote", "finish"];

impl Stats {
    fn pct(&self, p: f64) -> Duration {
        percentile(self.lat.clone(), p)
    }
    fn print(&self, what: &str, unit: &str) {
        println!(
            "{what:<44} {:>9.0} {unit}/s   p50 {:>7.0} µs   p99 {:>7.0} µs   ({} in {:.2} s)",
            self.n as f64 / self.elapsed.as_secs_f64(),
            self.pct(0.50).as_secs_f64() * 1e6,
            self.pct(0.99).as_secs_f64() * 1e6,
            self.n,
            self.elapsed.as_secs_f64()
        );
    }
    /// The median time of each commit phase, if any.
    fn print_phases(&self) {
        if self.phases.is_empty() {
            return;
        }
        let medians: Vec<String> = (0..PHASES.len())
            .map(|i| {
                let median = percentile(self.phases.iter().map(|p| p[i]).collect(), 0.5);
                format!("{} {:.0}", PHASES[i], median.as_secs_f64() * 1e6)
            })
            .collect();
        println!("  median µs per phase: {}", medians.join(", "));
    }
}

/// The `p` quantile of `v` (zero if empty).
fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default()
}

fn merge(parts: Vec<Stats>, elapsed: Duration) -> Stats {
    let mut s = Stats { n: 0, elapsed, lat: Vec::new(), phases: Vec::new() };
    for p in parts {
        s.n += p.n;
        s.lat.extend(p.lat);
        s.phases.extend(p.phases);
    }
    s
}

fn data(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand_like(seed);
    (0..size).map(|_| rng()).collect()
}

/// Deterministic pseudo-random bytes (incompressible enough for a benchmark).
fn fastrand_like(seed: u64) -> impl FnMut() -> u8 {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 24) as u8
    }
}

/// Time per record of the client's encoding: `compress` (deflate, then the check that the
/// stream inflates back to the record), the deflate alone and the check alone, and the
/// decompression of a load, for text-like and random records of several sizes.
fn codec_figures() {
    use neo_client::codec;
    let time = |n: usize, f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..n {
            f();
        }
        start.elapsed().as_secs_f64() * 1e6 / n as f64
    };
    println!("record encoding, µs per record: compress = deflate + check (only when smaller), decompress = load");
    for size in [200usize, 4 << 10, 64 << 10, 1 << 20, 16 << 20] {
        let words = b"(dp0 S'title' persistent mapping zodb \x80\x03 ";
        let text: Vec<u8> =
            words.iter().cycle().take(size).enumerate().map(|(i, b)| b ^ (i % 251 == 0) as u8).collect();
        for (shape, record) in [("text", text), ("random", data(size, size as u64))] {
            let n = ((64usize << 20) / size).clamp(3, 20_000);
            let compress = time(n, &mut || drop(std::hint::black_box(codec::compress(&record, true))));
            let deflate = time(n, &mut || drop(std::hint::black_box(codec::deflate(&record))));
            let z = codec::deflate(&record).unwrap_or_default();
            let check = time(n, &mut || {
                std::hint::black_box(codec::inflates_to(&z, &record));
            });
            let (c, stored) = codec::compress(&record, true);
            let load = time(n, &mut || drop(std::hint::black_box(codec::decompress(Oid(1), c, stored.clone()))));
            println!(
                "  {size:>9} B {shape:<6}  compress {compress:>9.1}  (deflate {deflate:>9.1}, check {check:>9.1})  decompress {load:>9.1}  stored {} B",
                stored.len()
            );
        }
    }
}

/// `count` transactions of `per_txn` new objects each; returns the stats and the oids.
async fn commits(
    c: &Client,
    count: usize,
    per_txn: usize,
    size: usize,
    seed: u64,
) -> Result<(Stats, Vec<Oid>), BoxError> {
    let mut lat = Vec::with_capacity(count);
    let mut phases = Vec::with_capacity(count);
    let mut oids = Vec::with_capacity(count * per_txn);
    let start = Instant::now();
    for i in 0..count {
        let t0 = Instant::now();
        let mut txn = c.tpc_begin(b"bench", b"", b"").await?;
        let t1 = Instant::now();
        for j in 0..per_txn {
            let oid = c.new_oid().await?;
            c.store(&mut txn, oid, Tid::ZERO, &data(size, seed + (i * per_txn + j) as u64))?;
            oids.push(oid);
        }
        let t2 = Instant::now();
        c.tpc_vote(&mut txn).await?;
        let t3 = Instant::now();
        c.tpc_finish(txn).await?;
        let t4 = Instant::now();
        lat.push(t4 - t0);
        phases.push([t1 - t0, t2 - t1, t3 - t2, t4 - t3]);
    }
    Ok((Stats { n: count, elapsed: start.elapsed(), lat, phases }, oids))
}

async fn loads(c: &Client, oids: &[Oid]) -> Result<Stats, BoxError> {
    let mut lat = Vec::with_capacity(oids.len());
    let start = Instant::now();
    for oid in oids {
        let t0 = Instant::now();
        c.load(*oid).await?;
        lat.push(t0.elapsed());
    }
    Ok(Stats { n: oids.len(), elapsed: start.elapsed(), lat, phases: Vec::new() })
}

async fn run(cli: Cli) -> Result<(), BoxError> {
    let exe = std::env::current_exe()?;
    let opts = cluster_options(&cli, exe);
    let mut cluster = SimpleCluster::start(&opts)?;
    cluster.wait_running(Duration::from_secs(60)).await?;
    println!(
        "cluster: {} storages, replicas {}, {} partitions, {}, {}, objects of {} bytes",
        cli.storages,
        cli.replicas,
        cli.partitions,
        if cli.tls { "TLS" } else { "plain TCP" },
        if cli.mysql.is_some() { "MySQL/MariaDB" } else { "SQLite" },
        cli.object_size
    );
    let mut cfg = ClientConfig::new(vec![cluster.master.clone()], cluster.cluster.clone());
    cfg.tls = cluster.client_tls.clone();
    let result = phases(&cli, &cfg, &cluster).await;
    println!("resident memory after the run:");
    for (name, kib) in cluster.rss_kib() {
        println!("  {name:<10} {:>8.1} MiB", kib as f64 / 1024.0);
    }
    cluster.stop(Duration::from_secs(20)).await;
    drop_databases(cli.mysql.as_deref(), &opts.cluster, cli.storages);
    result
}

/// The local cluster the command line asks for.
fn cluster_options(cli: &Cli, exe: std::path::PathBuf) -> SimpleOptions {
    let mut opts = SimpleOptions::new(exe);
    opts.storages = cli.storages;
    opts.replicas = cli.replicas;
    opts.partitions = cli.partitions;
    opts.tls = cli.tls;
    opts.data = cli.data.clone();
    opts.cluster = format!("bench{}", std::process::id());
    opts.mysql = cli.mysql.clone();
    opts
}

/// Drop the MySQL databases of the storages of cluster `cluster` (nothing on SQLite).
fn drop_databases(server: Option<&str>, cluster: &str, storages: usize) {
    let Some(server) = server else { return };
    for i in 1..=storages {
        let db = neosimple::launcher::mysql_database(cluster, i);
        if let Err(e) = neo_storage::testing::server_sql(server, None, &format!("DROP DATABASE IF EXISTS `{db}`")) {
            eprintln!("neo-bench: cannot drop database {db}: {e}");
        }
    }
}

/// CPU time used so far by each node process and by this process (the clients).
fn cpu_times(cluster: &SimpleCluster) -> Vec<(String, Duration)> {
    let mut t = cluster.cpu_times();
    let me = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    t.push(("clients".into(), neosimple::launcher::cpu_time_of_stat(&me)));
    t
}

/// Print the CPU time each process used per operation since `before`.
fn print_cpu(cluster: &SimpleCluster, before: &[(String, Duration)], ops: usize, what: &str) {
    let after = cpu_times(cluster);
    let per_op = |a: Duration, b: Duration| a.saturating_sub(b).as_micros() as f64 / ops.max(1) as f64;
    let mut total = 0.0;
    let mut parts = Vec::new();
    for ((name, a), (_, b)) in after.iter().zip(before) {
        let us = per_op(*a, *b);
        total += us;
        parts.push(format!("{name} {us:.0}"));
    }
    println!("  CPU per {what}: {total:.0} µs ({})", parts.join(", "));
}

async fn phases(cli: &Cli, cfg: &ClientConfig, cluster: &SimpleCluster) -> Result<(), BoxError> {
    let n = cli.transactions;
    let size = cli.object_size;
    // Warm up connections.
    let c1 = Client::connect(cfg.clone()).await?;
    commits(&c1, 20, 1, size, 0).await?;

    // Network baseline: one round trip to the master (ping) per operation.
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t0 = Instant::now();
        c1.sync().await?;
        lat.push(t0.elapsed());
    }
    Stats { n, elapsed: start.elapsed(), lat, phases: Vec::new() }
        .print("ping round trips to the master (baseline)", "pings");

    let before = cpu_times(cluster);
    let (s, oids) = commits(&c1, n, 1, size, 1_000).await?;
    s.print("single-object commits, 1 client", "commits");
    s.print_phases();
    print_cpu(cluster, &before, n, "commit");

    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Client::connect(cfg.clone()).await?);
    }
    let before = cpu_times(cluster);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (k, c) in clients.iter().enumerate() {
        let c = c.clone();
        tasks.push(tokio::spawn(async move { commits(&c, n / 4, 1, size, 10_000_000 * (k as u64 + 1)).await }));
    }
    let mut parts = Vec::new();
    let mut more_oids = Vec::new();
    for t in tasks {
        let (s, o) = t.await??;
        parts.push(s);
        more_oids.push(o);
    }
    merge(parts, start.elapsed()).print("single-object commits, 4 clients", "commits");
    print_cpu(cluster, &before, n / 4 * 4, "commit");

    let (s, _) = commits(&c1, cli.big_transactions, 100, size, 50_000_000).await?;
    s.print("100-object commits, 1 client", "commits");
    println!(
        "{:<44} {:>9.0} objects/s",
        "  (objects stored by 100-object commits)",
        (s.n * 100) as f64 / s.elapsed.as_secs_f64()
    );

    // Cold loads: a new client with an empty cache.
    let cold = Client::connect(cfg.clone()).await?;
    let before = cpu_times(cluster);
    let s = loads(&cold, &oids).await?;
    s.print("cold loads, 1 client", "loads");
    print_cpu(cluster, &before, oids.len(), "load");
    let (hits, misses, _) = cold.cache_stats();
    let s = loads(&cold, &oids).await?;
    s.print("warm loads (client cache), 1 client", "loads");
    let _ = (hits, misses);

    let start = Instant::now();
    let mut tasks = Vec::new();
    for o in more_oids {
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let c = Client::connect(cfg).await?;
            loads(&c, &o).await
        }));
    }
    let mut parts = Vec::new();
    for t in tasks {
        parts.push(t.await??);
    }
    merge(parts, start.elapsed()).print("cold loads, 4 clients", "loads");
    Ok(())
}
