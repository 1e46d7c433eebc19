//! The master's side of replication: an OUT_OF_DATE cell that caught up asks to become
//! UP_TO_DATE; the master agrees only if nothing it knows of is missing from it.

use crate::app::{ConnId, Master};
use neo_lib::pt::CellChange;
use neo_lib::{CellState, ClusterState, ErrorCode, Nid, Ptid, Tid};
use proto::msg;
use tracing::{debug, info};

impl Master {
    /// `AskReplicationDone`: storage `nid` copied partition `m.partition` up to `m.tid` from
    /// `m.source`. Its cell becomes UP_TO_DATE unless the source was not readable for the
    /// whole round (rewind), or a commit that did not write the cell is above `m.tid` or not
    /// finished yet (replicate further).
    pub async fn handle_replication_done(&mut self, conn: ConnId, nid: Nid, id: u32, m: msg::AskReplicationDone) {
        let answer = match self.replication_done(nid, &m) {
            Ok(Some(change)) => {
                info!("{nid} replicated partition {} up to {:?} from {}", m.partition, Tid(m.tid), Nid(m.source));
                self.commit_pt_changes(&[change]).await;
                // The cells this one replaces (tweak) go once the row has caught up.
                let done = self.pt.as_ref().map(|pt| pt.feeding_done(m.partition)).unwrap_or_default();
                self.commit_pt_changes(&done).await;
                msg::AnswerReplicationDone { done: true, rewind: false, reason: String::new() }.into()
            }
            Ok(None) => msg::AnswerReplicationDone { done: true, rewind: false, reason: String::new() }.into(),
            Err(Refusal::Again(reason)) => {
                debug!("{nid}, partition {}: not done: {reason}", m.partition);
                msg::AnswerReplicationDone { done: false, rewind: false, reason }.into()
            }
            Err(Refusal::Rewind(reason)) => {
                info!("{nid}, partition {}: round refused: {reason}", m.partition);
                msg::AnswerReplicationDone { done: false, rewind: true, reason }.into()
            }
            Err(Refusal::Error(code, reason)) => proto::error(code, reason),
        };
        self.answer(conn, id, answer).await;
    }

    /// The change that makes the cell UP_TO_DATE, None if it is readable already.
    fn replication_done(&self, nid: Nid, m: &msg::AskReplicationDone) -> Result<Option<CellChange>, Refusal> {
        if self.state != ClusterState::Running {
            return Err(Refusal::Error(ErrorCode::NotReady, format!("cluster is {}", self.state)));
        }
        let Some(pt) = &self.pt else { return Err(Refusal::Error(ErrorCode::NotReady, "no partition table".into())) };
        let (p, tid, source) = (m.partition, Tid(m.tid), Nid(m.source));
        if p >= pt.np() {
            return Err(Refusal::Error(ErrorCode::ProtocolError, format!("no partition {p}")));
        }
        match pt.cell(p, nid) {
            Some(s) if s.is_readable() => return Ok(None),
            Some(CellState::OutOfDate) => {}
            other => {
                let state = other.map(|s| s.to_string()).unwrap_or_else(|| "no cell".into());
                return Err(Refusal::Error(ErrorCode::Denied, format!("{nid} has {state} in partition {p}")));
            }
        }
        if source == nid || !pt.cell(p, source).is_some_and(CellState::is_readable) {
            return Err(Refusal::Rewind(format!("{source} has no readable cell of partition {p}")));
        }
        let since = self.readable_since.get(&(p, source)).copied().unwrap_or(Ptid(0));
        if since > Ptid(m.ptid) {
            return Err(Refusal::Rewind(format!(
                "{source} became readable (ptid {since}) after the round started (ptid {})",
                m.ptid
            )));
        }
        if let Some(missed) = self.missed.get(&(p, nid))
            && *missed > tid
        {
            return Err(Refusal::Again(format!("commit {missed:?} did not write this cell")));
        }
        let in_flight =
            self.tm.txns.iter().find(|(_, t)| t.finish.as_ref().is_some_and(|f| f.missed.contains(&(p, nid))));
        if let Some((ttid, _)) = in_flight {
            return Err(Refusal::Again(format!("transaction {ttid:?}, being committed, did not write this cell")));
        }
        Ok(Some(CellChange { partition: p, nid, state: CellState::UpToDate }))
    }
}

enum Refusal {
    Again(String),
    Rewind(String),
    Error(ErrorCode, String),
}
