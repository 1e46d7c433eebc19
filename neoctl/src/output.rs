//! Turning the admin's answers into neoctl's output (text or JSON), errors and exit codes.

use crate::cli::Command;
use neo_lib::{ErrorCode, Nid, NodeInfo, PartitionTable, Tid};
use proto::convert;
use proto::{Body, msg};
use serde_json::{Value, json};
use std::fmt;

/// Why a command failed. Every failure exits with status 1 (usage errors, 2, are clap's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtlError {
    /// Connection refused, TLS failure, connection closed...
    Unreachable { addr: String, reason: String },
    /// The admin (or the master behind it) answered an error.
    Remote { code: ErrorCode, message: String },
    /// No answer in time.
    Timeout { addr: String, secs: u64 },
    /// The answer is not the one expected for the command.
    Unexpected(String),
    /// The answer or the arguments are not valid.
    Invalid(String),
    /// The TLS files cannot be loaded.
    Tls(String),
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CtlError::Unreachable { addr, reason } => {
                write!(f, "cannot reach admin at {addr}: {reason}")
            }
            CtlError::Remote { code, message } => write!(f, "{code}: {message}"),
            CtlError::Timeout { addr, secs } => {
                write!(f, "no answer from admin at {addr} within {secs} s")
            }
            CtlError::Unexpected(what) => write!(f, "unexpected answer {what} from admin"),
            CtlError::Invalid(what) => f.write_str(what),
            CtlError::Tls(what) => write!(f, "TLS: {what}"),
        }
    }
}

impl CtlError {
    pub fn exit_code(&self) -> u8 {
        1
    }
}

/// Exit status for the result of a command.
pub fn exit_code(r: &Result<String, CtlError>) -> u8 {
    match r {
        Ok(_) => 0,
        Err(e) => e.exit_code(),
    }
}

fn invalid(e: impl fmt::Display) -> CtlError {
    CtlError::Invalid(format!("invalid answer from admin: {e}"))
}

fn unexpected(b: &Body) -> CtlError {
    CtlError::Unexpected(proto::body_name(b))
}

fn hex(v: u64) -> String {
    format!("0x{v:016x}")
}

/// Format the answer to `cmd` (empty string: nothing to print).
pub fn format_answer(cmd: &Command, answer: Body, json: bool) -> Result<String, CtlError> {
    match (cmd, answer) {
        (_, Body::Error(e)) if e.code != ErrorCode::Ack as i32 => Err(CtlError::Remote {
            code: ErrorCode::from_i32(e.code).unwrap_or(ErrorCode::ProtocolError),
            message: e.message,
        }),
        (Command::PrintCluster, Body::AnswerClusterState(m)) => {
            let s = convert::cluster_state(m.state).map_err(invalid)?;
            Ok(match (json, m.detail.is_empty()) {
                (true, true) => json!({ "state": s.as_str() }).to_string(),
                (true, false) => json!({ "state": s.as_str(), "detail": m.detail }).to_string(),
                (false, true) => s.to_string(),
                (false, false) => format!("{s} ({})", m.detail),
            })
        }
        (Command::PrintNode(_), Body::AnswerNodeList(m)) => {
            let nodes = m.nodes.iter().map(convert::node_from_msg).collect::<Result<Vec<_>, _>>().map_err(invalid)?;
            Ok(format_nodes(&nodes, json))
        }
        (Command::PrintPt { min, max }, Body::AnswerPartitionList(m)) => {
            let pt = convert::pt_from_msg(&m).map_err(invalid)?;
            let progress: Vec<(u32, Nid, u32)> =
                m.progress.iter().map(|c| (c.partition, Nid(c.nid), c.percent)).collect();
            format_pt_progress(&pt, &progress, *min, *max, json)
        }
        (Command::PrintIds, Body::AnswerIds(m)) => Ok(format_ids(&m, json)),
        (Command::PrintPrimary, Body::AnswerPrimary(m)) => {
            let nid = Nid(m.nid).to_string();
            Ok(if json {
                json!({ "nid": nid, "address": m.address }).to_string()
            } else {
                format!("{nid} {}", m.address)
            })
        }
        (Command::Tweak { .. }, Body::AnswerTweakPartitionTable(m)) => {
            let pt = m.pt.as_ref().ok_or_else(|| CtlError::Invalid("tweak answer without a table".into()))?;
            let pt = convert::pt_from_msg(pt).map_err(invalid)?;
            let grid = format_pt(&pt, None, None, json)?;
            Ok(if json {
                format!("{{\"changed\":{},\"pt\":{grid}}}", m.changed)
            } else if m.changed {
                grid
            } else {
                format!("# nothing to change\n{grid}")
            })
        }
        (
            Command::SetClusterState(_) | Command::Add(_) | Command::SetNodeState(..) | Command::SetNumReplicas(_),
            Body::Error(_),
        ) => Ok(if json { json!({ "ok": true }).to_string() } else { String::new() }),
        (_, other) => Err(unexpected(&other)),
    }
}

/// `print node`: one line per node, or a JSON list.
pub fn format_nodes(nodes: &[NodeInfo], json: bool) -> String {
    if json {
        let v: Vec<Value> = nodes
            .iter()
            .map(|n| {
                json!({
                    "type": n.node_type.as_str(),
                    "nid": n.nid.to_string(),
                    "address": n.address.as_ref().map(|a| a.to_string()),
                    "state": n.state.as_str(),
                    "id_timestamp": n.id_timestamp,
                })
            })
            .collect();
        return Value::Array(v).to_string();
    }
    nodes
        .iter()
        .map(|n| {
            let addr = n.address.as_ref().map(|a| a.to_string()).unwrap_or_else(|| "-".into());
            format!("{} {} {} {}", n.node_type, n.nid, addr, n.state)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The partitions `min..max` (`max` excluded, 0 or absent = to the end) of a table of `np`.
pub fn pt_range(np: u32, min: Option<u32>, max: Option<u32>) -> Result<std::ops::Range<u32>, CtlError> {
    let start = min.unwrap_or(0);
    let end = match max {
        None | Some(0) => np,
        Some(m) => m.min(np),
    };
    if start >= np {
        return Err(CtlError::Invalid(format!("invalid partition offset {start}: the table has {np} partitions")));
    }
    if start >= end {
        return Err(CtlError::Invalid(format!("invalid partition range {start}..{end}: MAX must be greater than MIN")));
    }
    Ok(start..end)
}

/// `print pt`: the whole grid without bounds, else one line per partition.
pub fn format_pt(pt: &PartitionTable, min: Option<u32>, max: Option<u32>, json: bool) -> Result<String, CtlError> {
    format_pt_progress(pt, &[], min, max, json)
}

/// `print pt` with the replication progress of OUT_OF_DATE cells, `(partition, nid,
/// percent)`: after the cell in per-partition lines and JSON, on a last line under the grid.
pub fn format_pt_progress(
    pt: &PartitionTable,
    progress: &[(u32, Nid, u32)],
    min: Option<u32>,
    max: Option<u32>,
    json: bool,
) -> Result<String, CtlError> {
    let percent = |p: u32, n: Nid| progress.iter().find(|(pp, nn, _)| *pp == p && *nn == n).map(|x| x.2);
    let bounded = min.is_some() || max.is_some();
    let range = if bounded { pt_range(pt.np(), min, max)? } else { 0..pt.np() };
    if json {
        let rows: Vec<Value> = range
            .map(|p| {
                let cells: Vec<Value> = pt
                    .row(p)
                    .iter()
                    .map(|c| match percent(p, c.nid) {
                        Some(pc) => json!({ "nid": c.nid.to_string(), "state": c.state.as_str(), "progress": pc }),
                        None => json!({ "nid": c.nid.to_string(), "state": c.state.as_str() }),
                    })
                    .collect();
                json!({ "partition": p, "cells": cells })
            })
            .collect();
        return Ok(json!({ "ptid": pt.ptid.0, "replicas": pt.replicas, "rows": rows }).to_string());
    }
    if !bounded {
        let mut out = pt.format_grid().trim_end().to_string();
        let mut shown: Vec<String> = Vec::new();
        for (p, n, pc) in progress {
            if pt.cell(*p, *n).is_some() {
                shown.push(format!("{n} {p}: {pc}%"));
            }
        }
        if !shown.is_empty() {
            out.push_str(&format!("\n# replicating: {}", shown.join(", ")));
        }
        return Ok(out);
    }
    let mut lines = vec![format!("# ptid: {}, replicas: {}", pt.ptid, pt.replicas)];
    for p in range {
        let cells: Vec<String> = pt
            .row(p)
            .iter()
            .map(|c| match percent(p, c.nid) {
                Some(pc) => format!("{} {} {pc}%", c.nid, c.state.letter()),
                None => format!("{} {}", c.nid, c.state.letter()),
            })
            .collect();
        lines.push(format!("{p:>3} | {}", cells.join("  ")).trim_end().to_string());
    }
    Ok(lines.join("\n"))
}

/// A TID in hex with its date, e.g. `0x03e1... (2026-11-23 10:00:00.123456 UTC)`.
pub fn tid_with_date(tid: u64) -> String {
    if tid == 0 {
        return hex(tid);
    }
    format!("{} ({})", hex(tid), format_utc(Tid(tid).to_unix()))
}

/// `print ids`.
pub fn format_ids(m: &msg::AnswerIds, json: bool) -> String {
    if json {
        return json!({
            "last_oid": hex(m.last_oid),
            "last_tid": hex(m.last_tid),
            "last_ptid": m.ptid,
            "backup_tid": m.backup_tid.map(hex),
        })
        .to_string();
    }
    let mut lines = vec![
        format!("last_oid = {}", hex(m.last_oid)),
        format!("last_tid = {}", tid_with_date(m.last_tid)),
        format!("last_ptid = {}", m.ptid),
    ];
    if let Some(b) = m.backup_tid {
        lines.push(format!("backup_tid = {}", tid_with_date(b)));
    }
    lines.join("\n")
}

/// UTC date of a UNIX time, to the microsecond: `2026-11-23 10:00:00.123456 UTC`.
pub fn format_utc(secs: f64) -> String {
    const US_PER_DAY: i64 = 86_400_000_000;
    // `as` saturates on overflow and maps NaN to 0.
    let us = (secs * 1e6).round() as i64;
    let days = us.div_euclid(US_PER_DAY);
    let rem = us.rem_euclid(US_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    let h = rem / 3_600_000_000;
    let mi = rem / 60_000_000 % 60;
    let s = rem / 1_000_000 % 60;
    let frac = rem % 1_000_000;
    format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}.{frac:06} UTC")
}

/// (year, month, day) of a number of days since 1970-01-01 (proleptic Gregorian; Howard
/// Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use neo_lib::config::Address;
    use neo_lib::pt::CellChange;
    use neo_lib::{CellState, ClusterState, NodeState, NodeType, Ptid};

    fn s(n: u32) -> Nid {
        Nid::new(NodeType::Storage, n)
    }

    fn out(cmd: Command, b: Body, json: bool) -> String {
        match format_answer(&cmd, b, json) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(1_795_428_000.123456), "2026-11-23 10:00:00.123456 UTC");
        assert_eq!(format_utc(0.0), "1970-01-01 00:00:00.000000 UTC");
        assert_eq!(format_utc(-2_208_988_800.0), "1900-01-01 00:00:00.000000 UTC");
        assert_eq!(format_utc(951_868_799.999999), "2000-02-29 23:59:59.999999 UTC");
        assert_eq!(format_utc(f64::NAN), "1970-01-01 00:00:00.000000 UTC");
    }

    #[test]
    fn cluster_state() {
        let b = || {
            Body::AnswerClusterState(msg::AnswerClusterState { state: ClusterState::Running as i32, detail: "".into() })
        };
        assert_eq!(out(Command::PrintCluster, b(), false), "RUNNING");
        assert_eq!(out(Command::PrintCluster, b(), true), r#"{"state":"RUNNING"}"#);
        let waiting = || {
            let detail = "waiting for S2".to_string();
            Body::AnswerClusterState(msg::AnswerClusterState { state: ClusterState::Recovering as i32, detail })
        };
        assert_eq!(out(Command::PrintCluster, waiting(), false), "RECOVERING (waiting for S2)");
        assert_eq!(out(Command::PrintCluster, waiting(), true), r#"{"detail":"waiting for S2","state":"RECOVERING"}"#);
        let bad = Body::AnswerClusterState(msg::AnswerClusterState { state: 99, detail: "".into() });
        assert!(matches!(format_answer(&Command::PrintCluster, bad, false), Err(CtlError::Invalid(_))));
    }

    #[test]
    fn nodes() {
        let nodes = [
            NodeInfo {
                node_type: NodeType::Storage,
                nid: s(1),
                address: Some(Address { host: "127.0.0.1".into(), port: 20001 }),
                state: NodeState::Running,
                id_timestamp: 2.5,
            },
            NodeInfo {
                node_type: NodeType::Client,
                nid: Nid::new(NodeType::Client, 3),
                address: None,
                state: NodeState::Running,
                id_timestamp: 3.0,
            },
        ];
        let b =
            || Body::AnswerNodeList(msg::AnswerNodeList { nodes: nodes.iter().map(convert::node_to_msg).collect() });
        assert_eq!(
            out(Command::PrintNode(None), b(), false),
            "STORAGE S1 127.0.0.1:20001 RUNNING\nCLIENT C3 - RUNNING"
        );
        let j: Value = serde_json::from_str(&out(Command::PrintNode(None), b(), true)).unwrap();
        assert_eq!(
            j,
            json!([
                {"type": "STORAGE", "nid": "S1", "address": "127.0.0.1:20001", "state": "RUNNING", "id_timestamp": 2.5},
                {"type": "CLIENT", "nid": "C3", "address": null, "state": "RUNNING", "id_timestamp": 3.0},
            ])
        );
        let empty = Body::AnswerNodeList(msg::AnswerNodeList { nodes: vec![] });
        assert_eq!(out(Command::PrintNode(Some(NodeType::Admin)), empty.clone(), false), "");
        assert_eq!(out(Command::PrintNode(Some(NodeType::Admin)), empty, true), "[]");
    }

    fn table() -> PartitionTable {
        let mut pt = PartitionTable::make(5, 1, &[s(1), s(2)]).unwrap();
        pt.apply(Ptid(2), 1, &[CellChange { partition: 3, nid: s(2), state: CellState::OutOfDate }]).unwrap();
        pt
    }

    #[test]
    fn partition_table() {
        let pt = table();
        let b = || Body::AnswerPartitionList(convert::pt_to_msg(&pt));
        let grid = out(Command::PrintPt { min: None, max: None }, b(), false);
        assert_eq!(grid, pt.format_grid().trim_end());
        assert!(grid.starts_with("# ptid: 2, replicas: 1"));
        let rows = out(Command::PrintPt { min: Some(3), max: None }, b(), false);
        assert_eq!(rows, "# ptid: 2, replicas: 1\n  3 | S1 U  S2 O\n  4 | S1 U  S2 U");
        let rows = out(Command::PrintPt { min: Some(2), max: Some(3) }, b(), false);
        assert_eq!(rows, "# ptid: 2, replicas: 1\n  2 | S1 U  S2 U");
        let j: Value = serde_json::from_str(&out(Command::PrintPt { min: Some(3), max: Some(4) }, b(), true)).unwrap();
        assert_eq!(
            j,
            json!({"ptid": 2, "replicas": 1, "rows": [
                {"partition": 3, "cells": [{"nid": "S1", "state": "UP_TO_DATE"}, {"nid": "S2", "state": "OUT_OF_DATE"}]}
            ]})
        );
        let j: Value = serde_json::from_str(&out(Command::PrintPt { min: None, max: None }, b(), true)).unwrap();
        assert_eq!(j["rows"].as_array().map(Vec::len), Some(5));
        // Bad bounds.
        let e = format_answer(&Command::PrintPt { min: Some(5), max: None }, b(), false).unwrap_err();
        assert!(matches!(e, CtlError::Invalid(_)), "{e:?}");
        let e = format_answer(&Command::PrintPt { min: Some(3), max: Some(2) }, b(), false).unwrap_err();
        assert!(matches!(e, CtlError::Invalid(_)), "{e:?}");
        assert_eq!(pt_range(5, None, Some(0)), Ok(0..5));
        assert_eq!(pt_range(5, Some(1), Some(50)), Ok(1..5));
        // Replication progress of the OUT_OF_DATE cell.
        let with_progress = || {
            let mut m = convert::pt_to_msg(&pt);
            m.progress = vec![msg::CellProgress { partition: 3, nid: s(2).0, percent: 42 }];
            Body::AnswerPartitionList(m)
        };
        let grid = out(Command::PrintPt { min: None, max: None }, with_progress(), false);
        assert!(grid.ends_with("\n# replicating: S2 3: 42%"), "{grid}");
        let rows = out(Command::PrintPt { min: Some(3), max: Some(4) }, with_progress(), false);
        assert_eq!(rows, "# ptid: 2, replicas: 1\n  3 | S1 U  S2 O 42%");
        let j: Value =
            serde_json::from_str(&out(Command::PrintPt { min: Some(3), max: Some(4) }, with_progress(), true)).unwrap();
        assert_eq!(j["rows"][0]["cells"][1], json!({"nid": "S2", "state": "OUT_OF_DATE", "progress": 42}));
        // Malformed table.
        let mut m = convert::pt_to_msg(&pt);
        m.rows.clear();
        let e = format_answer(&Command::PrintPt { min: None, max: None }, Body::AnswerPartitionList(m), false);
        assert!(matches!(e, Err(CtlError::Invalid(_))));
    }

    #[test]
    fn ids() {
        let tid = Tid::from_unix(1_795_428_000.123456).0;
        let m = msg::AnswerIds { last_oid: 0x2a, last_tid: tid, ptid: 7, backup_tid: None, max_stored_oid: 0x29 };
        let text = out(Command::PrintIds, Body::AnswerIds(m), false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "last_oid = 0x000000000000002a");
        assert_eq!(lines[1], format!("last_tid = 0x{tid:016x} (2026-11-23 10:00:00.123456 UTC)"));
        assert_eq!(lines[2], "last_ptid = 7");
        assert_eq!(lines.len(), 3);
        let j: Value = serde_json::from_str(&out(Command::PrintIds, Body::AnswerIds(m), true)).unwrap();
        assert_eq!(
            j,
            json!({"last_oid": "0x000000000000002a", "last_tid": format!("0x{tid:016x}"), "last_ptid": 7, "backup_tid": null})
        );
        let m = msg::AnswerIds { backup_tid: Some(tid), last_tid: 0, ..m };
        let text = out(Command::PrintIds, Body::AnswerIds(m), false);
        assert!(text.contains("last_tid = 0x0000000000000000\n"), "{text}");
        assert!(text.ends_with(&format!("backup_tid = 0x{tid:016x} (2026-11-23 10:00:00.123456 UTC)")), "{text}");
        let j: Value = serde_json::from_str(&out(Command::PrintIds, Body::AnswerIds(m), true)).unwrap();
        assert_eq!(j["backup_tid"], json!(format!("0x{tid:016x}")));
    }

    #[test]
    fn primary() {
        let b = || {
            Body::AnswerPrimary(msg::AnswerPrimary {
                nid: Nid::new(NodeType::Master, 1).0,
                address: "127.0.0.1:10000".into(),
            })
        };
        assert_eq!(out(Command::PrintPrimary, b(), false), "M1 127.0.0.1:10000");
        assert_eq!(out(Command::PrintPrimary, b(), true), r#"{"address":"127.0.0.1:10000","nid":"M1"}"#);
    }

    #[test]
    fn ack_and_errors() {
        let set = Command::SetClusterState(ClusterState::Verifying);
        assert_eq!(out(set.clone(), proto::ack(), false), "");
        assert_eq!(out(set.clone(), proto::ack(), true), r#"{"ok":true}"#);
        let r = format_answer(&set, proto::error(ErrorCode::Denied, "Invalid state requested"), false);
        let e = r.clone().unwrap_err();
        assert_eq!(e.to_string(), "DENIED: Invalid state requested");
        assert_eq!(exit_code(&r), 1);
        let r = format_answer(&Command::PrintCluster, proto::error(ErrorCode::NotReady, "Not connected"), true);
        assert_eq!(r.clone().unwrap_err().to_string(), "NOT_READY: Not connected");
        assert_eq!(exit_code(&r), 1);
        // An answer of the wrong kind.
        let r = format_answer(&Command::PrintCluster, Body::Pong(msg::Pong {}), false);
        assert_eq!(r, Err(CtlError::Unexpected("Pong".into())));
        let r = format_answer(&Command::PrintCluster, proto::ack(), false);
        assert!(matches!(r, Err(CtlError::Unexpected(_))));
        assert_eq!(exit_code(&Ok(String::new())), 0);
        let e =
            CtlError::Unreachable { addr: "127.0.0.1:9999".into(), reason: "Connection refused (os error 111)".into() };
        assert_eq!(e.to_string(), "cannot reach admin at 127.0.0.1:9999: Connection refused (os error 111)");
        assert_eq!(e.exit_code(), 1);
        assert_eq!(
            CtlError::Timeout { addr: "a:1".into(), secs: 30 }.to_string(),
            "no answer from admin at a:1 within 30 s"
        );
    }
}
