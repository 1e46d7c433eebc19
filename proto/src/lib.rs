//! The neo-rs wire format and connections: protobuf messages (one `.proto` file per message
//! family, compiled with prost), length-prefixed frames with a maximum size, the `Link` that
//! matches answers to requests over one connection, and TLS set-up from `ca`/`cert`/`key`.

pub mod blocking;
pub mod convert;
pub mod frame;
pub mod link;
pub mod net;
pub mod node;
pub mod spin;
pub mod tls;

/// Generated protobuf types (package `neo`).
#[allow(clippy::all, missing_docs)]
pub mod msg {
    include!(concat!(env!("OUT_DIR"), "/neo.rs"));
}

pub use link::{Incoming, Link, LinkError, PendingAnswer, Request};
pub use msg::packet::Body;

/// `impl From<Message> for Body` for every variant whose message type is unique.
macro_rules! body_from {
    ($($var:ident),+ $(,)?) => {
        $(impl From<msg::$var> for Body {
            fn from(m: msg::$var) -> Body { Body::$var(m) }
        })+
    };
}
body_from!(
    RequestIdentification,
    AcceptIdentification,
    Error,
    Ping,
    Pong,
    NotifyNodeInformation,
    NotifyPartitionChanges,
    NotifyClusterInformation,
    AskRecovery,
    AnswerRecovery,
    AskPartitionTable,
    AskLastIds,
    AnswerLastIds,
    AskLockedTransactions,
    AnswerLockedTransactions,
    AskFinalTid,
    AnswerFinalTid,
    ValidateTransaction,
    DropTransaction,
    StartOperation,
    StopOperation,
    NotifyReady,
    AskBeginTransaction,
    AnswerBeginTransaction,
    AskNewOids,
    AnswerNewOids,
    AskStoreObject,
    AnswerStoreObject,
    AskStoreTransaction,
    AnswerStoreTransaction,
    AskVoteTransaction,
    AnswerVoteTransaction,
    AskFinishTransaction,
    AnswerTransactionFinished,
    AskLockInformation,
    AnswerInformationLocked,
    NotifyUnlockInformation,
    InvalidateObjects,
    AbortTransaction,
    NotifyDeadlock,
    AskRelockObject,
    AnswerRelockObject,
    AskPack,
    AnswerPack,
    AskObject,
    AnswerObject,
    AskLastTransaction,
    AnswerLastTransaction,
    AskObjectHistory,
    AnswerObjectHistory,
    AskTids,
    AnswerTids,
    AskTidsFrom,
    AnswerTidsFrom,
    AskTransactionInformation,
    AnswerTransactionInformation,
    AskObjectUndoSerial,
    AnswerObjectUndoSerial,
    AskClusterState,
    AnswerClusterState,
    AskNodeList,
    AnswerNodeList,
    AskPartitionList,
    SetClusterState,
    AskPrimary,
    AnswerPrimary,
    AskIds,
    AnswerIds,
    AddPendingNodes,
    TweakPartitionTable,
    AnswerTweakPartitionTable,
    SetNodeState,
    SetNumReplicas,
    AskPartitionLastTid,
    AnswerPartitionLastTid,
    AskFetchTransactions,
    AnswerFetchTransactions,
    AskFetchObjects,
    AnswerFetchObjects,
    AskReplicationDone,
    AnswerReplicationDone,
    NotifyReplicationProgress,
);

/// Name of a message, for logs and "unexpected message" errors.
pub fn body_name(b: &Body) -> String {
    let dbg = format!("{b:?}");
    dbg.split(['(', ' ', '{']).next().unwrap_or("?").to_string()
}

/// An `Error` answer.
pub fn error(code: neo_lib::ErrorCode, message: impl Into<String>) -> Body {
    Body::Error(msg::Error { code: code as i32, message: message.into() })
}

/// The positive `Error(ACK)` answer.
pub fn ack() -> Body {
    error(neo_lib::ErrorCode::Ack, "")
}
