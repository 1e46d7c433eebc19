//! Process plumbing shared by the node binaries: configuration loading (exit 2 on a bad value),
//! logging, SIGTERM/SIGINT for a clean stop, SIGHUP to reopen the log file, exit codes.

use neo_lib::NodeType;
use neo_lib::config::{NodeArgs, NodeConfig};
use neo_lib::logging::{self, LogHandle};
use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Cancel `shutdown` on SIGTERM or SIGINT; reopen the log file on SIGHUP.
pub fn spawn_signal_handlers(shutdown: CancellationToken, log: LogHandle) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
        else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); shutdown.cancel(); }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); shutdown.cancel(); }
                _ = hup.recv() => {
                    if let Err(e) = log.reopen() { eprintln!("cannot reopen log file: {e}"); }
                    tracing::info!("log file reopened");
                }
            }
        }
    });
}

/// Run a node: load its configuration from `args` (exit 2 with a message naming file, section
/// and key if invalid), set up logging and signals, then run `run` on the node's runtime (one
/// thread that stays awake a little after each wake-up, see `crate::spin::node_runtime`).
/// Exit 0 on a clean stop, 1 on a fatal error (printed on one line).
pub fn run_node<F, Fut, E>(name: &str, node_type: NodeType, args: &NodeArgs, run: F) -> ExitCode
where
    F: FnOnce(NodeConfig, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let cfg = match NodeConfig::load(args, node_type) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    let log = match logging::init(cfg.logfile.as_deref(), cfg.verbose) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{name}: cannot open log file: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match crate::spin::node_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let to_file = cfg.logfile.is_some();
    let code = rt.block_on(async {
        let shutdown = CancellationToken::new();
        spawn_signal_handlers(shutdown.clone(), log);
        match run(cfg, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                if to_file {
                    tracing::error!("{e}");
                }
                eprintln!("{name}: {e}");
                ExitCode::from(1)
            }
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}
