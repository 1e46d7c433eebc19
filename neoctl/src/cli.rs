//! Command line of neoctl (clap derive) and the request each command sends to the admin.

use clap::{Parser, Subcommand};
use neo_lib::config::{Address, DEFAULT_ADMIN_PORT, TlsFiles};
use neo_lib::{ClusterState, Nid, NodeState, NodeType};
use proto::{Body, msg};
use std::path::PathBuf;

/// Control a NEO cluster through its admin node.
#[derive(Parser, Debug)]
#[command(name = "neoctl", version)]
pub struct Cli {
    /// Address of the admin node (HOST:PORT or [IPv6]:PORT).
    #[arg(short = 'a', long = "address", default_value = "127.0.0.1:9999", value_parser = parse_address)]
    pub address: Address,
    /// Certificate authority (PEM) for TLS; with --cert and --key.
    #[arg(long, requires_all = ["cert", "key"])]
    pub ca: Option<PathBuf>,
    /// Certificate of neoctl (PEM).
    #[arg(long, requires_all = ["ca", "key"])]
    pub cert: Option<PathBuf>,
    /// Private key of neoctl (PEM).
    #[arg(long, requires_all = ["ca", "cert"])]
    pub key: Option<PathBuf>,
    /// Print answers as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Print information about the cluster.
    Print {
        #[command(subcommand)]
        what: PrintCmd,
    },
    /// Allow the cluster to start (SetClusterState VERIFYING, accepted in RECOVERING).
    Start,
    /// Change a setting of the cluster.
    Set {
        #[command(subcommand)]
        what: SetCmd,
    },
    /// Pending storages join the cluster and get cells (all pending ones if none is named).
    Add {
        #[arg(value_name = "NID", value_parser = parse_storage)]
        nids: Vec<Nid>,
    },
    /// Spread the cells evenly over the running storages.
    Tweak {
        /// Print the resulting partition table without changing anything.
        #[arg(short = 'n', long)]
        dry_run: bool,
    },
    /// Storages leave the cluster for good: their cells are discarded (refused if a partition
    /// would lose its last readable copy).
    Drop {
        #[arg(value_name = "NID", required = true, value_parser = parse_storage)]
        nids: Vec<Nid>,
    },
    /// Stop storages: their cells go OUT_OF_DATE (refused on the last readable copy).
    Kill {
        #[arg(value_name = "NID", required = true, value_parser = parse_storage)]
        nids: Vec<Nid>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PrintCmd {
    /// Cluster state.
    Cluster,
    /// Known nodes, optionally of one type (MASTER, STORAGE, CLIENT, ADMIN).
    Node {
        #[arg(value_name = "TYPE")]
        node_type: Option<NodeType>,
    },
    /// Partition table: the whole grid, or partitions MIN..MAX (MAX excluded; 0 = to the end).
    Pt { min: Option<u32>, max: Option<u32> },
    /// Last OID, last TID, last ptid (and backup TID).
    Ids,
    /// Primary master.
    Primary,
}

#[derive(Subcommand, Debug)]
pub enum SetCmd {
    /// Ask for a cluster state (e.g. STOPPING).
    Cluster {
        #[arg(value_name = "STATE")]
        state: ClusterState,
    },
    /// Set the state of storages: DOWN (as kill) or UNKNOWN (as drop).
    Node {
        /// Storage node ids, then the state.
        #[arg(value_name = "NID... STATE", num_args = 2.., required = true, value_parser = parse_nid_or_state)]
        args: Vec<NidOrState>,
    },
    /// Number of replicas of each partition (then `tweak` moves the cells).
    #[command(alias = "replicas")]
    Numreplicas {
        #[arg(value_name = "N")]
        replicas: u32,
    },
}

/// An argument of `set node`: a storage node id, or (the last one) a node state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NidOrState {
    Nid(Nid),
    State(NodeState),
}

fn parse_nid_or_state(s: &str) -> Result<NidOrState, String> {
    match s.parse::<NodeState>() {
        Ok(state) => Ok(NidOrState::State(state)),
        Err(_) => parse_storage(s).map(NidOrState::Nid),
    }
}

fn parse_storage(s: &str) -> Result<Nid, String> {
    let nid: Nid = s.parse().map_err(|e| format!("{e}"))?;
    match nid.node_type() {
        Some(NodeType::Storage) => Ok(nid),
        _ => Err(format!("{s} is not a storage node id (S1, S2, ...)")),
    }
}

/// A parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    PrintCluster,
    PrintNode(Option<NodeType>),
    PrintPt { min: Option<u32>, max: Option<u32> },
    PrintIds,
    PrintPrimary,
    SetClusterState(ClusterState),
    Add(Vec<Nid>),
    Tweak { dry_run: bool },
    SetNodeState(Vec<Nid>, NodeState),
    SetNumReplicas(u32),
}

fn parse_address(s: &str) -> Result<Address, String> {
    Address::parse(s, Some(DEFAULT_ADMIN_PORT))
}

impl Cli {
    /// The command to run; Err: a usage error (exit status 2).
    pub fn command(&self) -> Result<Command, String> {
        Ok(match &self.command {
            Cmd::Print { what } => match what {
                PrintCmd::Cluster => Command::PrintCluster,
                PrintCmd::Node { node_type } => Command::PrintNode(*node_type),
                PrintCmd::Pt { min, max } => Command::PrintPt { min: *min, max: *max },
                PrintCmd::Ids => Command::PrintIds,
                PrintCmd::Primary => Command::PrintPrimary,
            },
            Cmd::Start => Command::SetClusterState(ClusterState::Verifying),
            Cmd::Set { what: SetCmd::Cluster { state } } => Command::SetClusterState(*state),
            Cmd::Add { nids } => Command::Add(nids.clone()),
            Cmd::Tweak { dry_run } => Command::Tweak { dry_run: *dry_run },
            Cmd::Drop { nids } => Command::SetNodeState(nids.clone(), NodeState::Unknown),
            Cmd::Kill { nids } => Command::SetNodeState(nids.clone(), NodeState::Down),
            Cmd::Set { what: SetCmd::Node { args } } => {
                let (last, nids) = args.split_last().ok_or("set node: NID... STATE expected")?;
                let NidOrState::State(state) = last else {
                    return Err("set node: the last argument must be a node state (DOWN or UNKNOWN)".into());
                };
                let nids = nids
                    .iter()
                    .map(|a| match a {
                        NidOrState::Nid(n) => Ok(*n),
                        NidOrState::State(s) => Err(format!("set node: {s} is not a storage node id")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Command::SetNodeState(nids, *state)
            }
            Cmd::Set { what: SetCmd::Numreplicas { replicas } } => Command::SetNumReplicas(*replicas),
        })
    }

    /// The TLS files, when all three were given (clap enforces all or none).
    pub fn tls_files(&self) -> Option<TlsFiles> {
        match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => {
                Some(TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() })
            }
            _ => None,
        }
    }
}

impl Command {
    /// The request sent to the admin for this command.
    pub fn request(&self) -> Body {
        match self {
            Command::PrintCluster => msg::AskClusterState {}.into(),
            Command::PrintNode(t) => msg::AskNodeList { node_type: t.map(|t| t as i32) }.into(),
            Command::PrintPt { min, max } => {
                msg::AskPartitionList { min_offset: min.unwrap_or(0), max_offset: max.unwrap_or(0), nid: None }.into()
            }
            Command::PrintIds => msg::AskIds {}.into(),
            Command::PrintPrimary => msg::AskPrimary {}.into(),
            Command::SetClusterState(s) => msg::SetClusterState { state: *s as i32 }.into(),
            Command::Add(nids) => msg::AddPendingNodes { nids: nids.iter().map(|n| n.0).collect() }.into(),
            Command::Tweak { dry_run } => msg::TweakPartitionTable { dry_run: *dry_run }.into(),
            Command::SetNodeState(nids, state) => {
                msg::SetNodeState { nids: nids.iter().map(|n| n.0).collect(), state: *state as i32 }.into()
            }
            Command::SetNumReplicas(n) => msg::SetNumReplicas { replicas: *n }.into(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("neoctl").chain(args.iter().copied()))
    }

    fn cmd(args: &[&str]) -> Command {
        match parse(args).map(|c| c.command()) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!("{args:?}: {e}"),
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn parses_every_command() {
        assert_eq!(cmd(&["print", "cluster"]), Command::PrintCluster);
        assert_eq!(cmd(&["print", "node"]), Command::PrintNode(None));
        assert_eq!(cmd(&["print", "node", "storage"]), Command::PrintNode(Some(NodeType::Storage)));
        assert_eq!(cmd(&["print", "node", "MASTER"]), Command::PrintNode(Some(NodeType::Master)));
        assert_eq!(cmd(&["print", "pt"]), Command::PrintPt { min: None, max: None });
        assert_eq!(cmd(&["print", "pt", "3"]), Command::PrintPt { min: Some(3), max: None });
        assert_eq!(cmd(&["print", "pt", "3", "7"]), Command::PrintPt { min: Some(3), max: Some(7) });
        assert_eq!(cmd(&["print", "ids"]), Command::PrintIds);
        assert_eq!(cmd(&["print", "primary"]), Command::PrintPrimary);
        assert_eq!(cmd(&["start"]), Command::SetClusterState(ClusterState::Verifying));
        assert_eq!(cmd(&["set", "cluster", "STOPPING"]), Command::SetClusterState(ClusterState::Stopping));
        assert_eq!(cmd(&["set", "cluster", "starting_backup"]), Command::SetClusterState(ClusterState::StartingBackup));
        let (s1, s2) = (Nid::new(NodeType::Storage, 1), Nid::new(NodeType::Storage, 2));
        assert_eq!(cmd(&["add"]), Command::Add(vec![]));
        assert_eq!(cmd(&["add", "S1", "S2"]), Command::Add(vec![s1, s2]));
        assert_eq!(cmd(&["tweak"]), Command::Tweak { dry_run: false });
        assert_eq!(cmd(&["tweak", "-n"]), Command::Tweak { dry_run: true });
        assert_eq!(cmd(&["tweak", "--dry-run"]), Command::Tweak { dry_run: true });
        assert_eq!(cmd(&["drop", "S2"]), Command::SetNodeState(vec![s2], NodeState::Unknown));
        assert_eq!(cmd(&["kill", "S1", "S2"]), Command::SetNodeState(vec![s1, s2], NodeState::Down));
        assert_eq!(cmd(&["set", "node", "S1", "S2", "down"]), Command::SetNodeState(vec![s1, s2], NodeState::Down));
        assert_eq!(cmd(&["set", "numreplicas", "2"]), Command::SetNumReplicas(2));
        assert_eq!(cmd(&["set", "replicas", "0"]), Command::SetNumReplicas(0));
    }

    #[test]
    fn global_options() {
        let c = parse(&["print", "cluster"]).unwrap();
        assert_eq!(c.address.to_string(), "127.0.0.1:9999");
        assert!(!c.json);
        assert!(c.tls_files().is_none());
        let c = parse(&["-a", "10.0.0.1:1234", "--json", "print", "ids"]).unwrap();
        assert_eq!(c.address, Address { host: "10.0.0.1".into(), port: 1234 });
        assert!(c.json);
        let c = parse(&["-a", "[::1]:5", "print", "ids", "--json"]).unwrap();
        assert_eq!(c.address.host, "::1");
        assert!(c.json);
        let c = parse(&["-a", "example.org", "print", "ids"]).unwrap();
        assert_eq!(c.address.port, 9999);
        let c = parse(&["--ca", "ca.pem", "--cert", "c.pem", "--key", "k.pem", "start"]).unwrap();
        let t = c.tls_files().unwrap();
        assert_eq!(t.key, PathBuf::from("k.pem"));
    }

    #[test]
    fn usage_errors() {
        let kind = |args: &[&str]| parse(args).map(|_| ()).unwrap_err().kind();
        assert_eq!(kind(&[]), ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand);
        assert_eq!(kind(&["frobnicate"]), ErrorKind::InvalidSubcommand);
        assert_eq!(kind(&["print"]), ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand);
        assert_eq!(kind(&["print", "node", "FOO"]), ErrorKind::ValueValidation);
        assert_eq!(kind(&["print", "pt", "x"]), ErrorKind::ValueValidation);
        assert_eq!(kind(&["print", "pt", "1", "2", "3"]), ErrorKind::UnknownArgument);
        assert_eq!(kind(&["set", "cluster"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(kind(&["-a", "host:99999", "print", "ids"]), ErrorKind::ValueValidation);
        assert_eq!(kind(&["--ca", "ca.pem", "start"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(kind(&["drop"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(kind(&["kill", "M1"]), ErrorKind::ValueValidation);
        assert_eq!(kind(&["add", "S"]), ErrorKind::ValueValidation);
        assert_eq!(kind(&["set", "node", "S1"]), ErrorKind::TooFewValues);
        assert_eq!(kind(&["set", "numreplicas", "x"]), ErrorKind::ValueValidation);
        let usage = |args: &[&str]| parse(args).unwrap().command().unwrap_err();
        assert!(usage(&["set", "node", "S1", "S2"]).contains("node state"));
        assert!(usage(&["set", "node", "DOWN", "DOWN"]).contains("not a storage node id"));
        let e = parse(&["set", "cluster", "FOO"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        assert_eq!(e.exit_code(), 2);
        let text = e.to_string();
        assert!(text.contains("RECOVERING") && text.contains("STOPPING_BACKUP"), "{text}");
    }

    #[test]
    fn requests() {
        assert_eq!(Command::PrintCluster.request(), Body::AskClusterState(msg::AskClusterState {}));
        assert_eq!(
            Command::PrintNode(Some(NodeType::Storage)).request(),
            Body::AskNodeList(msg::AskNodeList { node_type: Some(1) })
        );
        assert_eq!(
            Command::PrintPt { min: Some(2), max: None }.request(),
            Body::AskPartitionList(msg::AskPartitionList { min_offset: 2, max_offset: 0, nid: None })
        );
        assert_eq!(Command::PrintIds.request(), Body::AskIds(msg::AskIds {}));
        assert_eq!(Command::PrintPrimary.request(), Body::AskPrimary(msg::AskPrimary {}));
        assert_eq!(
            Command::SetClusterState(ClusterState::Verifying).request(),
            Body::SetClusterState(msg::SetClusterState { state: 1 })
        );
    }
}
