//! `neomaster -f neo.conf -s master`: the primary master of a NEO cluster.

use clap::Parser;
use neo_lib::NodeType;
use neo_lib::config::NodeArgs;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "neomaster", version, about = "NEO master node")]
struct Cli {
    #[command(flatten)]
    args: NodeArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    proto::node::run_node("neomaster", NodeType::Master, &cli.args, neo_master::run)
}
