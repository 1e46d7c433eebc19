//! The node processes of the scenario tests that kill nodes (`SimpleCluster` runs
//! `neo-test-node __node master|storage|admin -f neo.conf -s SECTION`): built with the tests,
//! so that they always run the code under test.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    neosimple::launcher::node_main(&args).unwrap_or_else(|| {
        eprintln!("usage: neo-test-node __node master|storage|admin -f neo.conf -s SECTION");
        ExitCode::from(2)
    })
}
