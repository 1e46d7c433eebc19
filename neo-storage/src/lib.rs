//! neostorage: stores object revisions for the partitions the primary master assigns to it,
//! takes write locks and detects conflicts during commit, and serves reads.

pub mod backend;
