//! `neoadmin`: the NEO admin node process.

use clap::Parser;
use neo_lib::NodeType;
use neo_lib::config::NodeArgs;
use std::process::ExitCode;

/// NEO admin node: relays neoctl commands to the primary master.
#[derive(Parser, Debug)]
#[command(name = "neoadmin", version)]
struct Cli {
    #[command(flatten)]
    args: NodeArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    proto::node::run_node("neoadmin", NodeType::Admin, &cli.args, neo_admin::run)
}
