//! Cluster scenario tests: one binary, one module per area.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admin;
mod backends;
mod bad_input;
mod commit;
mod failover;
mod restart;
