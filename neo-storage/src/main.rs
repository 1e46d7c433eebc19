//! `neostorage -f neo.conf -s storage1`: a NEO storage node.

use clap::Parser;
use neo_lib::NodeType;
use neo_lib::config::NodeArgs;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "neostorage", version, about = "NEO storage node")]
struct Cli {
    #[command(flatten)]
    args: NodeArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    proto::node::run_node("neostorage", NodeType::Storage, &cli.args, neo_storage::run)
}
