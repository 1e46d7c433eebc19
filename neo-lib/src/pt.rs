//! The partition table: `np` rows (partitions), each a list of cells `(nid, state)`, versioned by
//! a ptid. Pure data and its invariants; the master decides changes, every node applies them.

use crate::{CellState, Nid, Ptid};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Cell {
    pub nid: Nid,
    pub state: CellState,
}

/// One change of a cell: `state == Discarded` removes the cell.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CellChange {
    pub partition: u32,
    pub nid: Nid,
    pub state: CellState,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PtError {
    #[error("partition table change for ptid {got} does not follow ptid {have}")]
    NotNext { have: Ptid, got: Ptid },
    #[error("partition {partition} out of range (table has {np} partitions)")]
    BadPartition { partition: u32, np: u32 },
    #[error("cannot make a partition table without storage nodes")]
    NoNodes,
    #[error("the partition table must have at least one partition")]
    NoPartitions,
}

/// The distinct nodes, sorted, and how many cells each partition gets over them.
fn spread_over(nodes: &[Nid], replicas: u32) -> Result<(Vec<Nid>, usize), PtError> {
    let mut nodes: Vec<Nid> = nodes.to_vec();
    nodes.sort();
    nodes.dedup();
    if nodes.is_empty() {
        return Err(PtError::NoNodes);
    }
    let repeats = (replicas as usize + 1).min(nodes.len());
    Ok((nodes, repeats))
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PartitionTable {
    pub ptid: Ptid,
    pub replicas: u32,
    rows: Vec<Vec<Cell>>,
}

impl PartitionTable {
    /// An empty table (no cells) of `np` partitions; ptid 0 means "no table yet".
    pub fn new(np: u32, replicas: u32) -> PartitionTable {
        PartitionTable { ptid: Ptid(0), replicas, rows: vec![Vec::new(); np as usize] }
    }

    /// Build a table from rows received from a peer or read from disk.
    pub fn from_rows(ptid: Ptid, replicas: u32, rows: Vec<Vec<Cell>>) -> Result<PartitionTable, PtError> {
        if rows.is_empty() {
            return Err(PtError::NoPartitions);
        }
        Ok(PartitionTable { ptid, replicas, rows })
    }

    /// A new table for a new cluster: each partition gets `min(replicas+1, nodes)` cells on
    /// distinct nodes, spread round robin so every node gets the same share (±1). ptid 1.
    pub fn make(np: u32, replicas: u32, nodes: &[Nid]) -> Result<PartitionTable, PtError> {
        if np == 0 {
            return Err(PtError::NoPartitions);
        }
        let (nodes, repeats) = spread_over(nodes, replicas)?;
        let n = nodes.len();
        let rows = (0..np as usize)
            .map(|p| {
                (0..repeats).map(|i| Cell { nid: nodes[(p * repeats + i) % n], state: CellState::UpToDate }).collect()
            })
            .collect();
        Ok(PartitionTable { ptid: Ptid(1), replicas, rows })
    }

    pub fn np(&self) -> u32 {
        self.rows.len() as u32
    }
    pub fn rows(&self) -> &[Vec<Cell>] {
        &self.rows
    }
    pub fn row(&self, partition: u32) -> &[Cell] {
        self.rows.get(partition as usize).map(Vec::as_slice).unwrap_or(&[])
    }
    /// Partition of an oid or tid value.
    pub fn partition_of(&self, id: u64) -> u32 {
        (id % u64::from(self.np().max(1))) as u32
    }
    pub fn is_empty(&self) -> bool {
        self.rows.iter().all(Vec::is_empty)
    }

    pub fn readable_cells(&self, partition: u32) -> impl Iterator<Item = &Cell> {
        self.row(partition).iter().filter(|c| c.state.is_readable())
    }
    pub fn writable_cells(&self, partition: u32) -> impl Iterator<Item = &Cell> {
        self.row(partition).iter().filter(|c| c.state.is_writable())
    }
    pub fn cell(&self, partition: u32, nid: Nid) -> Option<CellState> {
        self.row(partition).iter().find(|c| c.nid == nid).map(|c| c.state)
    }

    /// Every node with at least one cell.
    pub fn nodes(&self) -> BTreeSet<Nid> {
        self.rows.iter().flatten().map(|c| c.nid).collect()
    }
    /// Partitions where `nid` has a cell (any state).
    pub fn partitions_of(&self, nid: Nid) -> Vec<u32> {
        (0..self.np()).filter(|p| self.cell(*p, nid).is_some()).collect()
    }

    /// True when every partition has at least one readable cell on a node for which `up` holds.
    pub fn operational(&self, up: impl Fn(Nid) -> bool) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|row| row.iter().any(|c| c.state.is_readable() && up(c.nid)))
    }

    /// Apply changes carried by a notification for ptid `ptid` (must be current + 1).
    pub fn apply(&mut self, ptid: Ptid, replicas: u32, changes: &[CellChange]) -> Result<(), PtError> {
        if ptid.0 != self.ptid.0 + 1 {
            return Err(PtError::NotNext { have: self.ptid, got: ptid });
        }
        for ch in changes {
            if ch.partition >= self.np() {
                return Err(PtError::BadPartition { partition: ch.partition, np: self.np() });
            }
        }
        for ch in changes {
            self.set_cell(*ch);
        }
        self.ptid = ptid;
        self.replicas = replicas;
        Ok(())
    }

    fn set_cell(&mut self, ch: CellChange) {
        let Some(row) = self.rows.get_mut(ch.partition as usize) else { return };
        if ch.state == CellState::Discarded {
            row.retain(|c| c.nid != ch.nid);
        } else if let Some(c) = row.iter_mut().find(|c| c.nid == ch.nid) {
            c.state = ch.state;
        } else {
            row.push(Cell { nid: ch.nid, state: ch.state });
        }
    }

    /// Master side: record changes decided locally, bumping the ptid. Returns the new ptid.
    pub fn commit_changes(&mut self, changes: &[CellChange]) -> Ptid {
        for ch in changes {
            self.set_cell(*ch);
        }
        self.ptid = Ptid(self.ptid.0 + 1);
        self.ptid
    }

    /// Changes that mark the readable cells of `nid` OUT_OF_DATE, except where the node holds the
    /// last readable cell of a partition (so the cluster can restart from it). FEEDING cells of
    /// a lost node are discarded.
    pub fn outdate_changes(&self, nid: Nid) -> Vec<CellChange> {
        let mut out = Vec::new();
        for (p, row) in self.rows.iter().enumerate() {
            let Some(cell) = row.iter().find(|c| c.nid == nid) else { continue };
            if !cell.state.is_readable() {
                continue;
            }
            let others = row.iter().filter(|c| c.nid != nid && c.state.is_readable()).count();
            if others == 0 {
                continue;
            }
            let state = if cell.state == CellState::Feeding { CellState::Discarded } else { CellState::OutOfDate };
            out.push(CellChange { partition: p as u32, nid, state });
        }
        out
    }

    /// NEO's `tweak`: the changes that spread the cells evenly over `nodes` (the storages that
    /// hold data from now on): each partition gets `min(replicas + 1, nodes)` cells on distinct
    /// nodes, each node `⌊np·repeats/N⌋` cells or one more, keeping cells where they are as much
    /// as possible. New cells are OUT_OF_DATE (they replicate); a readable cell that must go
    /// becomes FEEDING (still written and read) while its partition has fewer readable cells
    /// that stay than it should, so no partition ever has fewer readable copies because of a
    /// tweak; it is discarded once its replacements are UP_TO_DATE (`feeding_done`). Other
    /// cells that must go, and every cell on a node not in `nodes`, are discarded (readable
    /// ones only when enough readable cells stay).
    pub fn tweak(&self, nodes: &[Nid]) -> Result<Vec<CellChange>, PtError> {
        let (nodes, repeats) = spread_over(nodes, self.replicas)?;
        let n = nodes.len();
        let rank = |s: CellState| match s {
            CellState::UpToDate => 0,
            CellState::Feeding => 1,
            CellState::OutOfDate => 2,
            _ => 3,
        };
        // Cells that stay, per partition: on `nodes`, best first, at most `repeats`.
        let mut keep: Vec<Vec<Cell>> = self
            .rows
            .iter()
            .map(|row| {
                let mut cells: Vec<Cell> =
                    row.iter().filter(|c| nodes.contains(&c.nid) && rank(c.state) < 3).copied().collect();
                cells.sort_by_key(|c| (rank(c.state), c.nid));
                cells.truncate(repeats);
                cells
            })
            .collect();
        let mut load: BTreeMap<Nid, usize> = nodes.iter().map(|n| (*n, 0)).collect();
        for c in keep.iter().flatten() {
            *load.entry(c.nid).or_default() += 1;
        }
        // Partitions short of cells get new ones on the least loaded nodes.
        for row in keep.iter_mut() {
            while row.len() < repeats {
                let Some(u) =
                    nodes.iter().filter(|u| !row.iter().any(|c| c.nid == **u)).min_by_key(|u| (load[*u], **u)).copied()
                else {
                    break;
                };
                row.push(Cell { nid: u, state: CellState::OutOfDate });
                *load.entry(u).or_default() += 1;
            }
        }
        // Quotas: the nodes holding the most get the remainder's extra cell.
        let total = self.rows.len() * repeats;
        let mut by_load: Vec<Nid> = nodes.clone();
        by_load.sort_by_key(|n| (std::cmp::Reverse(load[n]), *n));
        let quota: BTreeMap<Nid, usize> =
            by_load.iter().enumerate().map(|(i, nid)| (*nid, total / n + usize::from(i < total % n))).collect();
        // Move cells from nodes over their quota to nodes under it, along the shortest chain
        // of moves (A gives a partition to B, which gives another to C, ...): each move takes a
        // partition that has the giver and not the taker, OUT_OF_DATE cells first (nothing
        // readable moves when something else can).
        let movable = |keep: &[Vec<Cell>], x: Nid, y: Nid| -> Option<usize> {
            keep.iter()
                .enumerate()
                .filter(|(_, row)| !row.iter().any(|c| c.nid == y))
                .filter_map(|(p, row)| row.iter().find(|c| c.nid == x).map(|c| (std::cmp::Reverse(rank(c.state)), p)))
                .min()
                .map(|(_, p)| p)
        };
        loop {
            let path = by_load.iter().filter(|o| load[*o] > quota[*o]).find_map(|o| {
                let mut prev: BTreeMap<Nid, Nid> = BTreeMap::new();
                let mut queue = std::collections::VecDeque::from([*o]);
                while let Some(x) = queue.pop_front() {
                    for &y in &nodes {
                        if y == *o || prev.contains_key(&y) || movable(&keep, x, y).is_none() {
                            continue;
                        }
                        prev.insert(y, x);
                        if load[&y] < quota[&y] {
                            let mut path = vec![y];
                            while let Some(p) = prev.get(path.last()?) {
                                path.push(*p);
                            }
                            path.reverse();
                            return Some(path);
                        }
                        queue.push_back(y);
                    }
                }
                None
            });
            let Some(path) = path else { break };
            // From the taker back to the first giver: each move stays possible.
            for pair in path.windows(2).rev() {
                let (x, y) = (pair[0], pair[1]);
                let Some(p) = movable(&keep, x, y) else { break };
                keep[p].retain(|c| c.nid != x);
                keep[p].push(Cell { nid: y, state: CellState::OutOfDate });
            }
            let (first, last) = (path[0], path[path.len() - 1]);
            *load.entry(first).or_default() -= 1;
            *load.entry(last).or_default() += 1;
        }
        // The changes from the current table to `keep`.
        let mut changes = Vec::new();
        for (p, (row, kept)) in self.rows.iter().zip(&keep).enumerate() {
            let p = p as u32;
            for c in kept {
                match self.cell(p, c.nid) {
                    None => changes.push(CellChange { partition: p, nid: c.nid, state: CellState::OutOfDate }),
                    Some(CellState::Feeding) => {
                        changes.push(CellChange { partition: p, nid: c.nid, state: CellState::UpToDate })
                    }
                    Some(_) => {}
                }
            }
            let readable_kept = kept.iter().filter(|c| self.cell(p, c.nid).is_some_and(CellState::is_readable)).count();
            for c in row.iter().filter(|c| !kept.iter().any(|k| k.nid == c.nid)) {
                let state = if c.state.is_readable() && readable_kept < repeats {
                    CellState::Feeding
                } else {
                    CellState::Discarded
                };
                if state != c.state {
                    changes.push(CellChange { partition: p, nid: c.nid, state });
                }
            }
        }
        Ok(changes)
    }

    /// After a cell of `partition` became UP_TO_DATE: its FEEDING cells are discarded once no
    /// cell of the partition is OUT_OF_DATE any more (their replacements are all readable).
    pub fn feeding_done(&self, partition: u32) -> Vec<CellChange> {
        let row = self.row(partition);
        if row.iter().any(|c| c.state == CellState::OutOfDate) {
            return Vec::new();
        }
        row.iter()
            .filter(|c| c.state == CellState::Feeding)
            .map(|c| CellChange { partition, nid: c.nid, state: CellState::Discarded })
            .collect()
    }

    /// A new number of replicas (no cell changes): the next ptid.
    pub fn set_replicas(&mut self, replicas: u32) -> Ptid {
        self.replicas = replicas;
        self.ptid = Ptid(self.ptid.0 + 1);
        self.ptid
    }

    /// Summary `{state: count}` as NEO's monitoring prints it.
    pub fn summary(&self) -> Vec<(CellState, usize)> {
        CellState::ALL
            .iter()
            .map(|s| (*s, self.rows.iter().flatten().filter(|c| c.state == *s).count()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The compact grid of `neoctl print pt`: one column per node, one letter per cell.
    pub fn format_grid(&self) -> String {
        let nodes: Vec<Nid> = self.nodes().into_iter().collect();
        let mut out = format!("# ptid: {}, replicas: {}\n", self.ptid, self.replicas);
        let _ = writeln!(out, "{:>5} | {}", "", nodes.iter().map(|n| format!("{n:>4}")).collect::<Vec<_>>().join(" "));
        for (p, row) in self.rows.iter().enumerate() {
            let cells: Vec<String> = nodes
                .iter()
                .map(|n| {
                    let l = row.iter().find(|c| c.nid == *n).map(|c| c.state.letter()).unwrap_or('.');
                    format!("{l:>4}")
                })
                .collect();
            let _ = writeln!(out, "{p:>5} | {}", cells.join(" "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeType;

    fn s(n: u32) -> Nid {
        Nid::new(NodeType::Storage, n)
    }

    #[test]
    fn make_spreads_replicas_on_distinct_nodes() {
        let pt = PartitionTable::make(12, 1, &[s(1), s(2)]).unwrap();
        assert_eq!(pt.np(), 12);
        for p in 0..12 {
            let row = pt.row(p);
            assert_eq!(row.len(), 2);
            assert_ne!(row[0].nid, row[1].nid);
        }
        let pt = PartitionTable::make(10, 0, &[s(1), s(2), s(3)]).unwrap();
        let counts: Vec<usize> = (1..=3).map(|n| pt.partitions_of(s(n)).len()).collect();
        assert!(counts.iter().all(|c| *c == 3 || *c == 4), "{counts:?}");
        assert!(pt.operational(|_| true));
        assert!(!pt.operational(|n| n != s(2)));
        assert!(PartitionTable::make(1, 0, &[]).is_err());
    }

    #[test]
    fn outdate_keeps_last_readable_cell() {
        let mut pt = PartitionTable::make(4, 1, &[s(1), s(2)]).unwrap();
        let ch = pt.outdate_changes(s(1));
        assert_eq!(ch.len(), 4);
        pt.commit_changes(&ch);
        assert_eq!(pt.ptid, Ptid(2));
        assert!(pt.operational(|n| n == s(2)));
        assert!(!pt.operational(|n| n == s(1)));
        // s2 now holds the last readable cells: it is not outdated.
        assert!(pt.outdate_changes(s(2)).is_empty());
    }

    /// Apply `changes` as replication would end: OUT_OF_DATE cells become UP_TO_DATE one by
    /// one, each followed by `feeding_done`.
    fn replicate_all(pt: &mut PartitionTable) {
        loop {
            let Some((p, nid)) = (0..pt.np())
                .find_map(|p| pt.row(p).iter().find(|c| c.state == CellState::OutOfDate).map(|c| (p, c.nid)))
            else {
                return;
            };
            pt.commit_changes(&[CellChange { partition: p, nid, state: CellState::UpToDate }]);
            let done = pt.feeding_done(p);
            pt.commit_changes(&done);
        }
    }

    #[test]
    fn tweak_balances_keeps_copies_readable_and_is_stable() {
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..1000 {
            let np = rng.u32(1..40);
            let replicas = rng.u32(0..4);
            let first: Vec<Nid> = (1..=rng.u32(1..6)).map(s).collect();
            let mut pt = PartitionTable::make(np, replicas, &first).unwrap();
            // Some cells out of date, as after losses.
            for p in 0..np {
                if rng.bool() {
                    let row = pt.row(p).to_vec();
                    if row.len() > 1 {
                        let c = row[rng.usize(..row.len())];
                        pt.commit_changes(&[CellChange { partition: p, nid: c.nid, state: CellState::OutOfDate }]);
                    }
                }
            }
            // Nodes join and leave.
            let mut nodes: Vec<Nid> = first.clone();
            for n in 10..10 + rng.u32(0..4) {
                nodes.push(s(n));
            }
            if nodes.len() > 1 && rng.bool() {
                nodes.remove(rng.usize(..nodes.len()));
            }
            let before = pt.clone();
            let changes = pt.tweak(&nodes).unwrap();
            pt.commit_changes(&changes);
            let repeats = (replicas as usize + 1).min(nodes.len());
            for p in 0..np {
                let readable_before = before.readable_cells(p).count();
                let readable_after = pt.readable_cells(p).count();
                assert!(
                    readable_after >= readable_before.min(repeats),
                    "round {round}, partition {p}: {readable_before} readable cells before, {readable_after} after"
                );
                let mut seen: Vec<Nid> = pt.row(p).iter().map(|c| c.nid).collect();
                seen.sort();
                seen.dedup();
                assert_eq!(seen.len(), pt.row(p).len(), "round {round}: two cells of partition {p} on one node");
            }
            replicate_all(&mut pt);
            let mut load: BTreeMap<Nid, usize> = nodes.iter().map(|n| (*n, 0)).collect();
            for p in 0..np {
                let row = pt.row(p);
                assert_eq!(row.len(), repeats, "round {round}, partition {p}: {row:?}");
                assert!(row.iter().all(|c| c.state == CellState::UpToDate && nodes.contains(&c.nid)), "{row:?}");
                for c in row {
                    *load.get_mut(&c.nid).unwrap() += 1;
                }
            }
            let (min, max) = (load.values().min().unwrap(), load.values().max().unwrap());
            assert!(max - min <= 1, "round {round}: unbalanced {load:?}");
            assert!(pt.tweak(&nodes).unwrap().is_empty(), "round {round}: a second tweak changes something");
        }
    }

    #[test]
    fn apply_requires_next_ptid() {
        let mut pt = PartitionTable::make(2, 0, &[s(1)]).unwrap();
        let ch = [CellChange { partition: 0, nid: s(2), state: CellState::OutOfDate }];
        assert!(pt.apply(Ptid(3), 0, &ch).is_err());
        pt.apply(Ptid(2), 0, &ch).unwrap();
        assert_eq!(pt.cell(0, s(2)), Some(CellState::OutOfDate));
        let bad = [CellChange { partition: 9, nid: s(2), state: CellState::OutOfDate }];
        assert!(pt.apply(Ptid(3), 0, &bad).is_err());
        assert!(pt.format_grid().contains("S1"));
    }
}
