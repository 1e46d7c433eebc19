//! neosimple: start a whole NEO cluster on loopback (real node processes, SQLite storages,
//! optional TLS), for trying neo-rs out, for the benchmark and for tests.

pub mod certs;
pub mod launcher;

pub use launcher::{SimpleCluster, SimpleOptions};
