//! Cluster scenario tests: one binary, one module per area.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bad_input;
mod commit;
mod restart;
