//! The `neo.conf` model: NEO's INI format (`[DEFAULT]` plus one section per node), the command
//! line options shared by `neomaster`, `neostorage` and `neoadmin`, and their validated merge.
//! Every error names the file, the section and the key.

use crate::{Nid, NodeType};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A `host:port` address (`[v6]:port` for IPv6).
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Address {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Address, String> {
        Address::parse(s, None)
    }
}

impl Address {
    /// Parse `host:port`, `[v6]:port`, or a bare host when `default_port` is given.
    pub fn parse(s: &str, default_port: Option<u16>) -> Result<Address, String> {
        let bad = || format!("{s:?} is not an address (expected HOST:PORT or [IPv6]:PORT)");
        let s = s.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest.split_once(']').ok_or_else(bad)?;
            match p.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if p.is_empty() => (h, None),
                None => return Err(bad()),
            }
        } else if s.matches(':').count() == 1 {
            let (h, p) = s.split_once(':').ok_or_else(bad)?;
            (h, Some(p))
        } else {
            (s, None) // bare host or bare IPv6
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace()) {
            return Err(bad());
        }
        let port = match (port, default_port) {
            (Some(p), _) => p.parse::<u16>().map_err(|_| bad())?,
            (None, Some(d)) => d,
            (None, None) => return Err(bad()),
        };
        Ok(Address { host: host.to_string(), port })
    }
}

/// Why a configuration could not be loaded. Binaries exit with status 2 on any of these.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {err}")]
    Io { file: String, err: std::io::Error },
    #[error("{file}:{line}: {msg}")]
    Syntax { file: String, line: usize, msg: String },
    #[error("{file}: no section [{section}]")]
    NoSection { file: String, section: String },
    #[error("{origin}: {key}: {msg}")]
    Value { origin: String, key: String, msg: String },
    #[error("{origin}: missing required option '{key}'")]
    Missing { origin: String, key: String },
}

/// A parsed INI file: `DEFAULT` values and named sections (keys normalized `-` → `_`).
#[derive(Clone, Debug, Default)]
pub struct IniFile {
    pub path: String,
    pub defaults: BTreeMap<String, String>,
    pub sections: BTreeMap<String, BTreeMap<String, String>>,
}

impl IniFile {
    pub fn read(path: &Path) -> Result<IniFile, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Io { file: file.clone(), err })?;
        IniFile::parse(&file, &text)
    }

    /// Parse INI text: `[section]`, `key = value` or `key: value`, `#`/`;` comments, indented
    /// continuation lines appended to the previous value (as Python's ConfigParser).
    pub fn parse(file: &str, text: &str) -> Result<IniFile, ConfigError> {
        let mut ini = IniFile { path: file.to_string(), ..Default::default() };
        let mut current: Option<String> = None;
        let mut last_key: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let syntax = |msg: String| ConfigError::Syntax { file: file.to_string(), line: line_no, msg };
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
                continue;
            }
            if raw.starts_with(char::is_whitespace) {
                if let (Some(k), Some(sec)) = (&last_key, &current) {
                    let map = ini.section_mut(sec);
                    if let Some(v) = map.get_mut(k) {
                        if !v.is_empty() {
                            v.push(' ');
                        }
                        v.push_str(trimmed);
                        continue;
                    }
                }
                return Err(syntax(format!("unexpected indented line {trimmed:?}")));
            }
            if let Some(rest) = trimmed.strip_prefix('[') {
                let name =
                    rest.strip_suffix(']').ok_or_else(|| syntax(format!("bad section header {trimmed:?}")))?.trim();
                if name.is_empty() {
                    return Err(syntax("empty section name".into()));
                }
                ini.section_mut(name);
                current = Some(name.to_string());
                last_key = None;
                continue;
            }
            let sec = current.clone().ok_or_else(|| syntax(format!("option {trimmed:?} before any [section]")))?;
            let pos =
                trimmed.find(['=', ':']).ok_or_else(|| syntax(format!("expected 'key = value', got {trimmed:?}")))?;
            let key = trimmed[..pos].trim().replace('-', "_").to_ascii_lowercase();
            if key.is_empty() {
                return Err(syntax("empty option name".into()));
            }
            let value = trimmed[pos + 1..].trim().to_string();
            ini.section_mut(&sec).insert(key.clone(), value);
            last_key = Some(key);
        }
        Ok(ini)
    }

    fn section_mut(&mut self, name: &str) -> &mut BTreeMap<String, String> {
        if name == "DEFAULT" { &mut self.defaults } else { self.sections.entry(name.to_string()).or_default() }
    }

    /// Values of a section with the defaults merged in.
    pub fn merged(&self, section: &str) -> Result<BTreeMap<String, String>, ConfigError> {
        let sec = self
            .sections
            .get(section)
            .ok_or_else(|| ConfigError::NoSection { file: self.path.clone(), section: section.to_string() })?;
        let mut out = self.defaults.clone();
        out.extend(sec.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(out)
    }
}

/// Options known in `neo.conf` (after `-` → `_`). Any other key is an error.
pub const KNOWN_KEYS: &[&str] = &[
    "cluster",
    "masters",
    "replicas",
    "partitions",
    "ca",
    "cert",
    "key",
    "upstream_cluster",
    "upstream_masters",
    "bind",
    "database",
    "engine",
    "adapter",
    "logfile",
    "nid",
    "autostart",
    "wait",
    "verbose",
];

/// Command-line options shared by the node binaries (NEO's flags). Each overrides the value from
/// the `-f` file's section `-s`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct NodeArgs {
    /// Configuration file (neo.conf).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Section of the configuration file for this node (default: the node kind).
    #[arg(short = 's', long = "section")]
    pub section: Option<String>,
    /// Cluster name.
    #[arg(short = 'c', long)]
    pub cluster: Option<String>,
    /// Master addresses, space separated (HOST:PORT or [IPv6]:PORT).
    #[arg(short = 'm', long)]
    pub masters: Option<String>,
    /// Address to listen on.
    #[arg(short = 'b', long)]
    pub bind: Option<String>,
    /// Storage database: a SQLite file path, or MySQL as `mysql://user:password@host:port/db` or
    /// NEO's `[user[:password]@]database[unix_socket]`.
    #[arg(short = 'd', long)]
    pub database: Option<String>,
    /// Storage backend: SQLite or MySQL; by default chosen from --database.
    #[arg(short = 'a', long)]
    pub adapter: Option<String>,
    /// Master: number of partitions of a new cluster.
    #[arg(short = 'p', long)]
    pub partitions: Option<u32>,
    /// Master: number of replicas of each partition of a new cluster.
    #[arg(short = 'r', long)]
    pub replicas: Option<u32>,
    /// Master: start a new cluster as soon as this many storages are pending.
    #[arg(short = 'A', long)]
    pub autostart: Option<u32>,
    /// Node id to request (e.g. S1); mostly for tests.
    #[arg(short = 'i', long)]
    pub nid: Option<String>,
    /// Certificate authority (PEM) for TLS; with --cert and --key.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Certificate of this node (PEM).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Private key of this node (PEM).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Log file (default: standard error). SIGHUP reopens it.
    #[arg(short = 'l', long)]
    pub logfile: Option<PathBuf>,
    /// More logs (-v info, -vv debug, -vvv trace).
    #[arg(short = 'v', long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// TLS files: all three or none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Validated configuration of one node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_type: NodeType,
    pub cluster: String,
    pub masters: Vec<Address>,
    pub bind: Address,
    pub database: Option<String>,
    pub adapter: Option<String>,
    pub partitions: u32,
    pub replicas: u32,
    pub autostart: Option<u32>,
    pub nid: Option<Nid>,
    pub tls: Option<TlsFiles>,
    pub logfile: Option<PathBuf>,
    pub verbose: u8,
}

pub const DEFAULT_MASTER_PORT: u16 = 10000;
pub const DEFAULT_ADMIN_PORT: u16 = 9999;

impl NodeConfig {
    pub fn default_section(t: NodeType) -> &'static str {
        match t {
            NodeType::Master => "master",
            NodeType::Storage => "storage",
            NodeType::Admin => "admin",
            NodeType::Client => "client",
        }
    }

    /// Merge the file section (if `-f`) with command-line options and validate.
    pub fn load(args: &NodeArgs, node_type: NodeType) -> Result<NodeConfig, ConfigError> {
        let mut values = BTreeMap::new();
        let mut origin = "command line".to_string();
        if let Some(file) = &args.file {
            let ini = IniFile::read(file)?;
            let section = args.section.clone().unwrap_or_else(|| Self::default_section(node_type).into());
            values = ini.merged(&section)?;
            origin = format!("{} [{}]", file.display(), section);
            for key in values.keys() {
                if !KNOWN_KEYS.contains(&key.as_str()) {
                    return Err(ConfigError::Value {
                        origin,
                        key: key.clone(),
                        msg: format!("unknown option (known: {})", KNOWN_KEYS.join(", ")),
                    });
                }
            }
        }
        let mut set = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                values.insert(k.to_string(), v);
            }
        };
        set("cluster", args.cluster.clone());
        set("masters", args.masters.clone());
        set("bind", args.bind.clone());
        set("database", args.database.clone());
        set("adapter", args.adapter.clone());
        set("partitions", args.partitions.map(|v| v.to_string()));
        set("replicas", args.replicas.map(|v| v.to_string()));
        set("autostart", args.autostart.map(|v| v.to_string()));
        set("nid", args.nid.clone());
        set("ca", args.ca.as_ref().map(|p| p.display().to_string()));
        set("cert", args.cert.as_ref().map(|p| p.display().to_string()));
        set("key", args.key.as_ref().map(|p| p.display().to_string()));
        set("logfile", args.logfile.as_ref().map(|p| p.display().to_string()));
        let mut cfg = Self::from_values(&values, node_type, &origin)?;
        cfg.verbose = cfg.verbose.max(args.verbose);
        Ok(cfg)
    }

    /// Validate a map of option values (already merged) for a node of type `node_type`.
    pub fn from_values(
        values: &BTreeMap<String, String>,
        node_type: NodeType,
        origin: &str,
    ) -> Result<NodeConfig, ConfigError> {
        let verr =
            |key: &str, msg: String| ConfigError::Value { origin: origin.to_string(), key: key.to_string(), msg };
        let get = |k: &str| values.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
        let cluster = get("cluster")
            .ok_or_else(|| ConfigError::Missing { origin: origin.to_string(), key: "cluster".into() })?
            .to_string();
        if cluster.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(verr("cluster", "must not contain spaces".into()));
        }
        let parse_addrs = |key: &str, default: Option<&str>| -> Result<Vec<Address>, ConfigError> {
            let s = get(key).or(default).unwrap_or("");
            s.split_whitespace()
                .map(|a| Address::parse(a, Some(DEFAULT_MASTER_PORT)).map_err(|m| verr(key, m)))
                .collect()
        };
        let masters = parse_addrs("masters", Some("127.0.0.1:10000"))?;
        if masters.is_empty() && node_type != NodeType::Master {
            return Err(verr("masters", "at least one master address is needed".into()));
        }
        if masters.len() > 1 {
            // Each master would call itself primary: clients could reach different clusters
            // of the same name.
            return Err(verr(
                "masters",
                format!(
                    "{} addresses given; several masters (election, failover) are not supported yet: give the one master's address",
                    masters.len()
                ),
            ));
        }
        // A backup cluster would come up writable: refused until backup mode exists.
        for key in ["upstream_cluster", "upstream_masters"] {
            if get(key).is_some() {
                return Err(verr(
                    key,
                    "backup mode (upstream_cluster, upstream_masters) is not supported yet: remove these options"
                        .into(),
                ));
            }
        }
        let default_bind = match node_type {
            NodeType::Master => "127.0.0.1:10000",
            NodeType::Admin => "127.0.0.1:9999",
            _ => "127.0.0.1:0",
        };
        let bind = Address::parse(get("bind").unwrap_or(default_bind), Some(0)).map_err(|m| verr("bind", m))?;
        let num = |key: &str, default: u32, min: u32, max: u32| -> Result<u32, ConfigError> {
            match get(key) {
                None => Ok(default),
                Some(s) => match s.parse::<u32>() {
                    Ok(v) if (min..=max).contains(&v) => Ok(v),
                    _ => Err(verr(key, format!("{s:?} is not an integer between {min} and {max}"))),
                },
            }
        };
        let partitions = num("partitions", 100, 1, 65_535)?;
        let replicas = num("replicas", 0, 0, 255)?;
        let autostart = match get("autostart") {
            None => None,
            Some(_) => Some(num("autostart", 0, 1, 10_000)?),
        };
        let verbose = num("verbose", 0, 0, 3)? as u8;
        let nid = match get("nid") {
            None => None,
            Some(s) => Some(s.parse::<Nid>().map_err(|e| verr("nid", e.to_string()))?),
        };
        let path = |k: &str| get(k).map(PathBuf::from);
        let tls = match (path("ca"), path("cert"), path("key")) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles { ca, cert, key }),
            _ => {
                return Err(verr("ca", "ca, cert and key must be given together (or none of them)".into()));
            }
        };
        let database = get("database").map(str::to_string);
        if node_type == NodeType::Storage && database.is_none() {
            return Err(ConfigError::Missing { origin: origin.to_string(), key: "database".into() });
        }
        let adapter = get("adapter").map(str::to_string);
        if let Some(a) = &adapter
            && !a.eq_ignore_ascii_case("sqlite")
            && !a.eq_ignore_ascii_case("mysql")
        {
            return Err(verr("adapter", format!("unsupported adapter {a:?} (supported: SQLite, MySQL)")));
        }
        if let Some(e) = get("engine")
            && !["innodb", "rocksdb"].contains(&e.to_ascii_lowercase().as_str())
        {
            return Err(verr("engine", format!("{e:?} is not InnoDB or RocksDB")));
        }
        if let Some(w) = get("wait") {
            w.parse::<f64>().map_err(|_| verr("wait", format!("{w:?} is not a number of seconds")))?;
        }
        Ok(NodeConfig {
            node_type,
            cluster,
            masters,
            bind,
            database,
            adapter,
            partitions,
            replicas,
            autostart,
            nid,
            tls,
            logfile: path("logfile"),
            verbose,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_ini_and_merge() {
        let text = "[DEFAULT]\ncluster = test\nmasters =\n  [::1]:10001\n\
                    partitions: 12\n# comment\n[master]\nbind = 127.0.0.1:10000\n\
                    [storage1]\ndatabase = /tmp/s1.sqlite\n";
        let ini = IniFile::parse("neo.conf", text).unwrap();
        let m = ini.merged("storage1").unwrap();
        let cfg = NodeConfig::from_values(&m, NodeType::Storage, "x").unwrap();
        assert_eq!(cfg.masters.len(), 1);
        assert_eq!(cfg.masters[0].host, "::1");
        assert_eq!(cfg.masters[0].to_string(), "[::1]:10001");
        assert_eq!(cfg.partitions, 12);
        assert_eq!(cfg.database.as_deref(), Some("/tmp/s1.sqlite"));
        assert!(matches!(ini.merged("nope"), Err(ConfigError::NoSection { .. })));
    }

    #[test]
    fn bad_values_name_the_key() {
        let ini = IniFile::parse("f.conf", "[master]\ncluster=c\npartitions = many\n").unwrap();
        let e = NodeConfig::from_values(&ini.merged("master").unwrap(), NodeType::Master, "f.conf [master]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.conf [master]") && e.contains("partitions"), "{e}");
        let e = IniFile::parse("f.conf", "[a]\nnovalue\n").unwrap_err().to_string();
        assert!(e.contains("f.conf:2"), "{e}");
        let e = IniFile::parse("f.conf", "x = 1\n").unwrap_err().to_string();
        assert!(e.contains("before any"), "{e}");
        let m: BTreeMap<String, String> =
            [("cluster", "c"), ("ca", "/x")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(NodeConfig::from_values(&m, NodeType::Master, "o").is_err());
        let m: BTreeMap<String, String> =
            [("cluster", "c")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let e = NodeConfig::from_values(&m, NodeType::Storage, "o").unwrap_err().to_string();
        assert!(e.contains("database"), "{e}");
        assert!(Address::parse("host:notaport", None).is_err());
        assert!(Address::parse("host", None).is_err());
    }

    /// What the cluster cannot honour yet is refused, naming the option, for every node:
    /// several masters (each would be primary), backup mode (the cluster would be writable).
    #[test]
    fn several_masters_and_backup_mode_are_refused() {
        let cases = [
            ("masters", "127.0.0.1:10000 127.0.0.1:10001 127.0.0.1:10002", "3 addresses given"),
            ("upstream_cluster", "main", "backup mode"),
            ("upstream_masters", "10.0.0.1:10000", "backup mode"),
        ];
        for (key, value, needle) in cases {
            for t in [NodeType::Master, NodeType::Storage, NodeType::Admin] {
                let m: BTreeMap<String, String> = [("cluster", "c"), ("database", "/x.sqlite"), (key, value)]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                let e = NodeConfig::from_values(&m, t, "neo.conf [n]").unwrap_err().to_string();
                assert!(e.contains(key) && e.contains(needle) && e.contains("not supported yet"), "{e}");
            }
        }
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../neo.conf.example");
        let ini = IniFile::read(&path).unwrap();
        assert!(!ini.sections.is_empty());
        let mut seen = std::collections::BTreeSet::new();
        for name in ini.sections.keys() {
            let t = if name.starts_with("master") {
                NodeType::Master
            } else if name.starts_with("storage") {
                NodeType::Storage
            } else if name.starts_with("admin") {
                NodeType::Admin
            } else {
                panic!("unexpected section {name}");
            };
            let values = ini.merged(name).unwrap();
            for k in values.keys() {
                assert!(KNOWN_KEYS.contains(&k.as_str()), "unknown key {k}");
                seen.insert(k.clone());
            }
            NodeConfig::from_values(&values, t, name).unwrap();
        }
        // The example documents every option, at least as a comment.
        let text = std::fs::read_to_string(&path).unwrap();
        for k in KNOWN_KEYS {
            assert!(text.contains(&format!("{k} ")) || text.contains(&format!("{k}=")), "{k} undocumented");
        }
    }
}
