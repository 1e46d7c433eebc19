//! Node types and node, cluster and cell states, named and numbered as in NEO.

use std::fmt;
use std::str::FromStr;

/// Error for a state name typed by a user or received on the wire.
#[derive(Debug, thiserror::Error)]
#[error("invalid {what} {input:?} (expected one of: {expected})")]
pub struct ParseStateError {
    pub what: &'static str,
    pub input: String,
    pub expected: String,
}

macro_rules! neo_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($var:ident = $num:literal => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
        #[repr(i32)]
        pub enum $name { $($var = $num),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $s),+ }
            }
            pub fn from_i32(v: i32) -> Option<$name> {
                match v { $($num => Some($name::$var),)+ _ => None }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl FromStr for $name {
            type Err = ParseStateError;
            fn from_str(s: &str) -> Result<$name, ParseStateError> {
                let up = s.to_ascii_uppercase();
                $(if up == $s { return Ok($name::$var); })+
                Err(ParseStateError {
                    what: $what,
                    input: s.to_string(),
                    expected: [$($s),+].join(", "),
                })
            }
        }
    };
}

neo_enum!(
    /// Kind of node.
    NodeType, "node type" {
        Master = 0 => "MASTER",
        Storage = 1 => "STORAGE",
        Client = 2 => "CLIENT",
        Admin = 3 => "ADMIN",
    }
);

neo_enum!(
    /// State of a node as seen by the primary master.
    NodeState, "node state" {
        Unknown = 0 => "UNKNOWN",
        Down = 1 => "DOWN",
        Running = 2 => "RUNNING",
        Pending = 3 => "PENDING",
    }
);

neo_enum!(
    /// State of the whole cluster.
    ClusterState, "cluster state" {
        Recovering = 0 => "RECOVERING",
        Verifying = 1 => "VERIFYING",
        Running = 2 => "RUNNING",
        Stopping = 3 => "STOPPING",
        StartingBackup = 4 => "STARTING_BACKUP",
        Backingup = 5 => "BACKINGUP",
        StoppingBackup = 6 => "STOPPING_BACKUP",
    }
);

neo_enum!(
    /// State of one cell (a partition on a storage node).
    CellState, "cell state" {
        OutOfDate = 0 => "OUT_OF_DATE",
        UpToDate = 1 => "UP_TO_DATE",
        Feeding = 2 => "FEEDING",
        Corrupted = 3 => "CORRUPTED",
        Discarded = 4 => "DISCARDED",
    }
);

impl NodeType {
    pub fn letter(self) -> char {
        match self {
            NodeType::Master => 'M',
            NodeType::Storage => 'S',
            NodeType::Client => 'C',
            NodeType::Admin => 'A',
        }
    }
    pub fn from_letter(c: char) -> Option<NodeType> {
        NodeType::ALL.iter().copied().find(|t| t.letter() == c)
    }
}

impl CellState {
    /// Readable cells serve loads: UP_TO_DATE and FEEDING.
    pub fn is_readable(self) -> bool {
        matches!(self, CellState::UpToDate | CellState::Feeding)
    }
    /// Writable cells receive every new write, including OUT_OF_DATE ones that are catching up.
    pub fn is_writable(self) -> bool {
        matches!(self, CellState::UpToDate | CellState::Feeding | CellState::OutOfDate)
    }
    /// One-letter code used by `neoctl print pt`.
    pub fn letter(self) -> char {
        match self {
            CellState::OutOfDate => 'O',
            CellState::UpToDate => 'U',
            CellState::Feeding => 'F',
            CellState::Corrupted => 'C',
            CellState::Discarded => '.',
        }
    }
}

impl ClusterState {
    /// States in which clients may read and write.
    pub fn is_serving(self) -> bool {
        matches!(self, ClusterState::Running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn names_roundtrip() {
        for s in ClusterState::ALL {
            assert_eq!(s.as_str().parse::<ClusterState>().unwrap(), *s);
            assert_eq!(ClusterState::from_i32(*s as i32), Some(*s));
        }
        assert_eq!("stopping".parse::<ClusterState>().unwrap(), ClusterState::Stopping);
        let e = "FOO".parse::<CellState>().unwrap_err().to_string();
        assert!(e.contains("UP_TO_DATE"), "{e}");
    }
}
