//! `neoctl`: control a NEO cluster through its admin node. One connection per invocation, no
//! identification, one request, its answer printed as text or JSON.

mod cli;
mod output;

use clap::Parser;
use cli::{Cli, Command};
use neo_lib::config::Address;
use output::CtlError;
use proto::net::{self, NetConfig, NetError};
use proto::tls::TlsContext;
use proto::{Body, LinkError};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

/// How long neoctl waits for the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Map a connection failure to the one-line error neoctl prints.
fn net_error(addr: &Address, e: NetError) -> CtlError {
    let reason = match e {
        NetError::Connect { err, .. } => err.to_string(),
        NetError::Tls { err, .. } => format!("TLS handshake failed: {err}"),
        NetError::Timeout { .. } => "timed out".to_string(),
        NetError::Link { err, .. } => return link_error(addr, err),
    };
    CtlError::Unreachable { addr: addr.to_string(), reason }
}

fn link_error(addr: &Address, e: LinkError) -> CtlError {
    match e {
        LinkError::Remote { code, message } => CtlError::Remote { code, message },
        LinkError::Closed(_) => {
            CtlError::Unreachable { addr: addr.to_string(), reason: "connection closed by the admin".into() }
        }
        LinkError::Unexpected(what) => CtlError::Unexpected(what),
    }
}

/// Send the request of `cmd` to the admin at `addr` and return its answer.
async fn ask(addr: &Address, net: &NetConfig, cmd: &Command, timeout: Duration) -> Result<Body, CtlError> {
    let (link, _incoming) = net::connect(addr, net).await.map_err(|e| net_error(addr, e))?;
    let r = tokio::time::timeout(timeout, link.ask(cmd.request())).await;
    link.close().await;
    match r {
        Err(_) => Err(CtlError::Timeout { addr: addr.to_string(), secs: timeout.as_secs() }),
        Ok(r) => r.map_err(|e| link_error(addr, e)),
    }
}

/// Run the command line: the text to print, or the failure.
async fn run(cli: &Cli, cmd: &Command) -> Result<String, CtlError> {
    let tls = match cli.tls_files() {
        Some(files) => Some(TlsContext::load(&files).map_err(|e| CtlError::Tls(e.to_string()))?),
        None => None,
    };
    let net = NetConfig { tls, max_frame: neo_lib::DEFAULT_MAX_FRAME };
    let answer = ask(&cli.address, &net, cmd, REQUEST_TIMEOUT).await?;
    output::format_answer(cmd, answer, cli.json)
}

fn main() -> ExitCode {
    // Usage errors: clap prints the usage and exits with status 2.
    let cli = Cli::parse();
    let cmd = match cli.command() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("neoctl: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(run(&cli, &cmd)),
        Err(e) => Err(CtlError::Invalid(format!("cannot start runtime: {e}"))),
    };
    let code = output::exit_code(&result);
    match result {
        Ok(text) if text.is_empty() => {}
        Ok(text) => {
            // A closed stdout (e.g. `| head`) is not worth a panic.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
        Err(e) => eprintln!("neoctl: {e}"),
    }
    ExitCode::from(code)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use neo_lib::ErrorCode;

    fn addr() -> Address {
        Address { host: "127.0.0.1".into(), port: 9999 }
    }

    #[test]
    fn error_mapping() {
        let e = net_error(
            &addr(),
            NetError::Connect {
                addr: "127.0.0.1:9999".into(),
                err: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            },
        );
        assert!(e.to_string().starts_with("cannot reach admin at 127.0.0.1:9999: "), "{e}");
        let e = net_error(&addr(), NetError::Timeout { addr: "x".into() });
        assert_eq!(e.to_string(), "cannot reach admin at 127.0.0.1:9999: timed out");
        let e = link_error(&addr(), LinkError::Remote { code: ErrorCode::Denied, message: "nope".into() });
        assert_eq!(e.to_string(), "DENIED: nope");
        let e = link_error(&addr(), LinkError::Closed("x".into()));
        assert_eq!(e.to_string(), "cannot reach admin at 127.0.0.1:9999: connection closed by the admin");
        assert_eq!(e.exit_code(), 1);
    }

    #[tokio::test]
    async fn unreachable_admin() {
        // A port nobody listens on.
        let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(a) => a.port(),
            Err(e) => panic!("{e}"),
        };
        let a = Address { host: "127.0.0.1".into(), port };
        let r = ask(&a, &NetConfig::default(), &Command::PrintCluster, REQUEST_TIMEOUT).await;
        match r {
            Err(CtlError::Unreachable { addr, reason }) => {
                assert_eq!(addr, a.to_string());
                assert!(reason.contains("refused"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        // Accepts the TCP connection but never speaks NEO.
        let l = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        };
        let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
        let hold = tokio::spawn(async move {
            let c = l.accept().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(c);
        });
        let a = Address { host: "127.0.0.1".into(), port };
        let r = ask(&a, &NetConfig::default(), &Command::PrintCluster, Duration::from_millis(300)).await;
        assert_eq!(r, Err(CtlError::Timeout { addr: a.to_string(), secs: 0 }));
        hold.abort();
    }
}
