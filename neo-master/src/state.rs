//! What the master keeps on disk (its `database` option, a small text file): the newest
//! partition table the cluster used, so that after any sequence of stops and restarts the
//! master never starts the cluster on an older table (a storage that missed commits while it
//! was out of date must not be taken for up to date because the nodes with the newer table
//! are not back yet). Written atomically: a temporary file, fsynced, renamed over the old one,
//! then the directory fsynced.
//!
//! ```text
//! neo-master-state 1
//! cluster NAME
//! ptid 7
//! replicas 1
//! partitions 12
//! cell 0 S1 UP_TO_DATE
//! ...
//! ```

use neo_lib::pt::{Cell, PartitionTable};
use neo_lib::{CellState, Nid, NodeType, Ptid};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &str = "neo-master-state 1";
/// More partitions than this in a state file is corruption, not a cluster.
const MAX_PARTITIONS: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}, line {line}: {msg}")]
    Corrupt { path: PathBuf, line: usize, msg: String },
    #[error("{path} belongs to cluster {found:?}, not {expected:?}")]
    WrongCluster { path: PathBuf, found: String, expected: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StateError + '_ {
    move |err| StateError::Io { path: path.to_path_buf(), err }
}

/// The saved partition table, None if the file does not exist yet.
pub fn load(path: &Path, cluster: &str) -> Result<Option<PartitionTable>, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    parse(path, &text, cluster).map(Some)
}

fn parse(path: &Path, text: &str, cluster: &str) -> Result<PartitionTable, StateError> {
    let corrupt = |line: usize, msg: String| StateError::Corrupt { path: path.to_path_buf(), line, msg };
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty());
    match lines.next() {
        Some((_, l)) if l == MAGIC => {}
        Some((n, l)) => return Err(corrupt(n, format!("expected {MAGIC:?}, found {l:?}"))),
        None => return Err(corrupt(1, "empty file".into())),
    }
    let mut header = |key: &str| -> Result<(usize, String), StateError> {
        match lines.next() {
            Some((n, l)) => match l.split_once(' ') {
                Some((k, v)) if k == key => Ok((n, v.trim().to_string())),
                _ => Err(corrupt(n, format!("expected {key:?}, found {l:?}"))),
            },
            None => Err(corrupt(0, format!("missing {key:?}"))),
        }
    };
    let (_, found) = header("cluster")?;
    let number = |(n, v): (usize, String)| v.parse::<u64>().map_err(|e| corrupt(n, format!("{v:?}: {e}")));
    let ptid = number(header("ptid")?)?;
    let replicas = number(header("replicas")?)?;
    let np = number(header("partitions")?)?;
    if found != cluster {
        return Err(StateError::WrongCluster { path: path.to_path_buf(), found, expected: cluster.to_string() });
    }
    if np == 0 || np > u64::from(MAX_PARTITIONS) {
        return Err(corrupt(0, format!("invalid number of partitions {np}")));
    }
    let replicas = u32::try_from(replicas).map_err(|_| corrupt(0, format!("invalid replicas {replicas}")))?;
    let mut rows: Vec<Vec<Cell>> = vec![Vec::new(); np as usize];
    for (n, l) in lines {
        let w: Vec<&str> = l.split_whitespace().collect();
        let [kw, p, nid, state] = w[..] else { return Err(corrupt(n, format!("expected a cell, found {l:?}"))) };
        if kw != "cell" {
            return Err(corrupt(n, format!("expected a cell, found {l:?}")));
        }
        let p: u32 = p.parse().map_err(|e| corrupt(n, format!("partition {p:?}: {e}")))?;
        let nid: Nid = nid.parse().map_err(|e| corrupt(n, format!("node {nid:?}: {e}")))?;
        let state: CellState = state.parse().map_err(|e| corrupt(n, format!("{e}")))?;
        if nid.node_type() != Some(NodeType::Storage) || state == CellState::Discarded {
            return Err(corrupt(n, format!("invalid cell {l:?}")));
        }
        let row = rows.get_mut(p as usize).ok_or_else(|| corrupt(n, format!("partition {p} out of range")))?;
        if row.iter().any(|c| c.nid == nid) {
            return Err(corrupt(n, format!("cell {p} {nid} given twice")));
        }
        row.push(Cell { nid, state });
    }
    PartitionTable::from_rows(Ptid(ptid), replicas, rows).map_err(|e| corrupt(0, e.to_string()))
}

fn render(cluster: &str, pt: &PartitionTable) -> String {
    let mut s =
        format!("{MAGIC}\ncluster {cluster}\nptid {}\nreplicas {}\npartitions {}\n", pt.ptid.0, pt.replicas, pt.np());
    for (p, row) in pt.rows().iter().enumerate() {
        for c in row {
            s.push_str(&format!("cell {p} {} {}\n", c.nid, c.state));
        }
    }
    s
}

/// Save `pt` durably (blocking: call it from a blocking thread).
pub fn save(path: &Path, cluster: &str, pt: &PartitionTable) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(render(cluster, pt).as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u32) -> Nid {
        Nid::new(NodeType::Storage, n)
    }

    #[test]
    fn a_saved_table_loads_back_and_damage_is_a_clear_error() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("master.state");
        assert!(load(&path, "c")?.is_none());
        let mut pt = PartitionTable::make(5, 1, &[s(1), s(2), s(3)])?;
        pt.commit_changes(&pt.outdate_changes(s(2)));
        save(&path, "c", &pt)?;
        assert_eq!(load(&path, "c")?, Some(pt.clone()));
        assert!(matches!(load(&path, "other"), Err(StateError::WrongCluster { .. })));
        let good = std::fs::read_to_string(&path)?;
        let cases = [
            String::new(),
            "garbage".to_string(),
            good.replace("ptid", "ptdi"),
            good.replace("partitions 5", "partitions 0"),
            good.replace("partitions 5", "partitions x"),
            good.replace("UP_TO_DATE", "UP_TO_LATE"),
            good.replace("cell 0 S1", "cell 9 S1"),
            good.replace("cell 0 S1", "cell 0 M1"),
            good.replace("cell 0 S1", "cell 0"),
            format!("{good}cell 0 S1 UP_TO_DATE\n"),
            good.lines().take(3).collect::<Vec<_>>().join("\n"),
        ];
        for (i, text) in cases.iter().enumerate() {
            std::fs::write(&path, text)?;
            match load(&path, "c") {
                Err(StateError::Corrupt { msg, .. }) => assert!(!msg.is_empty()),
                other => panic!("case {i}: {other:?}"),
            }
        }
        Ok(())
    }
}
