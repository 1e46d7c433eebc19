//! Cluster scenario tests: one binary, one module per area.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// For each scenario `async fn name(opts: Options)`, a module `name` with two tests: `sqlite`
/// and `mysql` (skipped, saying so, when no MySQL server is reachable and NEO_TEST_MYSQL is
/// unset).
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(neo_tests::Options::default()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                if neo_tests::mysql_available() {
                    super::$name(neo_tests::Options { backends: neo_tests::Backends::Mysql, ..Default::default() }).await
                }
            }
        }
    )*};
}

mod admin;
mod backends;
mod bad_input;
mod commit;
mod failover;
mod kill;
mod records;
mod replication;
mod restart;
mod zodb_api;
