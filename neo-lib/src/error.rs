//! Error codes carried by `Error` answers on the wire (NEO's `ErrorCodes`).

use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(i32)]
pub enum ErrorCode {
    /// Positive answer to a request whose answer is an error packet.
    Ack = 0,
    /// An admin command was refused.
    Denied = 1,
    /// Retry later (the node is not ready for this request yet).
    NotReady = 2,
    OidNotFound = 3,
    TidNotFound = 4,
    OidDoesNotExist = 5,
    ProtocolError = 6,
    ReplicationError = 7,
    CheckingError = 8,
    BackendNotImplemented = 9,
    NonReadableCell = 10,
    ReadOnlyAccess = 11,
    IncompleteTransaction = 12,
    UndoPackError = 13,
}

impl ErrorCode {
    pub fn from_i32(v: i32) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            0 => Ack,
            1 => Denied,
            2 => NotReady,
            3 => OidNotFound,
            4 => TidNotFound,
            5 => OidDoesNotExist,
            6 => ProtocolError,
            7 => ReplicationError,
            8 => CheckingError,
            9 => BackendNotImplemented,
            10 => NonReadableCell,
            11 => ReadOnlyAccess,
            12 => IncompleteTransaction,
            13 => UndoPackError,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Ack => "ACK",
            Denied => "DENIED",
            NotReady => "NOT_READY",
            OidNotFound => "OID_NOT_FOUND",
            TidNotFound => "TID_NOT_FOUND",
            OidDoesNotExist => "OID_DOES_NOT_EXIST",
            ProtocolError => "PROTOCOL_ERROR",
            ReplicationError => "REPLICATION_ERROR",
            CheckingError => "CHECKING_ERROR",
            BackendNotImplemented => "BACKEND_NOT_IMPLEMENTED",
            NonReadableCell => "NON_READABLE_CELL",
            ReadOnlyAccess => "READ_ONLY_ACCESS",
            IncompleteTransaction => "INCOMPLETE_TRANSACTION",
            UndoPackError => "UNDO_PACK_ERROR",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
