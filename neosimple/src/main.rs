//! `neosimple`: start a local NEO cluster (real processes, SQLite, optional TLS) and keep it in
//! the foreground until Ctrl-C.

use clap::Parser;
use neosimple::{SimpleCluster, SimpleOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "neosimple", version, about = "Start a local NEO cluster on loopback (SQLite storages)")]
struct Cli {
    /// Number of storage nodes.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    storages: u32,
    /// Replicas of each partition.
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Number of partitions.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=65535))]
    partitions: u32,
    /// Use TLS with a generated certificate authority.
    #[arg(long)]
    tls: bool,
    /// Directory for databases, logs and neo.conf (default: a temporary directory, deleted at exit).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Cluster name.
    #[arg(long, default_value = "neosimple")]
    cluster: String,
    /// Put the storages on this MySQL/MariaDB server (mysql://user:password@host:port), one
    /// database each (neosimple_<cluster>_storage<N>, kept); default: SQLite files.
    #[arg(long)]
    mysql: Option<String>,
    /// More logs in the node log files.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    if let Some(code) = neosimple::launcher::node_main(&args) {
        return code;
    }
    let cli = Cli::parse();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("neosimple: cannot find my own executable: {e}");
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("neosimple: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let mut opts = SimpleOptions::new(exe);
        opts.storages = cli.storages as usize;
        opts.replicas = cli.replicas;
        opts.partitions = cli.partitions;
        opts.tls = cli.tls;
        opts.data = cli.data;
        opts.cluster = cli.cluster;
        opts.verbose = cli.verbose;
        opts.mysql = cli.mysql;
        let mut cluster = match SimpleCluster::start(&opts) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("neosimple: {e}");
                return ExitCode::from(1);
            }
        };
        if let Err(e) = cluster.wait_running(Duration::from_secs(60)).await {
            eprintln!("neosimple: {e}");
            cluster.terminate();
            return ExitCode::from(1);
        }
        println!("NEO cluster {:?} is RUNNING", cluster.cluster);
        println!("master: {}", cluster.master);
        println!("admin:  {}   (neoctl -a {} print node)", cluster.admin, cluster.admin);
        println!("data:   {}", cluster.dir.display());
        if let Some(t) = &cluster.client_tls {
            println!("client TLS: --ca {} --cert {} --key {}", t.ca.display(), t.cert.display(), t.key.display());
        }
        // The configuration as written, but MySQL passwords.
        let shown: Vec<String> = cluster
            .conf_text
            .lines()
            .map(|l| match l.strip_prefix("database = ") {
                Some(db) => format!("database = {}", neo_storage::backend::mysql::redact_database(db)),
                None => l.to_string(),
            })
            .collect();
        println!("--- {} ---\n{}", cluster.conf_path.display(), shown.join("\n"));
        println!("Press Ctrl-C to stop the cluster.");
        let code = wait_for_stop(&mut cluster).await;
        println!("stopping...");
        cluster.stop(Duration::from_secs(15)).await;
        println!("stopped");
        code
    })
}

async fn wait_for_stop(cluster: &mut SimpleCluster) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        eprintln!("neosimple: cannot install signal handlers");
        return ExitCode::from(1);
    };
    loop {
        tokio::select! {
            _ = int.recv() => return ExitCode::SUCCESS,
            _ = term.recv() => return ExitCode::SUCCESS,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                match cluster.exited() {
                    Some((master, true)) if master == "master" => {
                        println!("the cluster was stopped (neoctl set cluster STOPPING)");
                        return ExitCode::SUCCESS;
                    }
                    Some((dead, _)) => {
                        let log = cluster.dir.join(format!("{dead}.stderr"));
                        eprintln!("neosimple: node {dead} exited unexpectedly; see {}", log.display());
                        return ExitCode::from(1);
                    }
                    None => {}
                }
            }
        }
    }
}
