//! The link to the primary master: find it among the configured masters, identify as ADMIN,
//! then follow its notifications until the link closes (clear everything and reconnect) or the
//! cluster stops.

use crate::Shared;
use crate::state::{Primary, Update};
use neo_lib::config::Address;
use neo_lib::{Nid, NodeType};
use proto::net::{self, NetConfig};
use proto::{Body, Incoming, Link, msg};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Pause between two rounds of connection attempts (and after losing the primary master).
pub(crate) const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Why a session with the primary master ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The link closed: reconnect.
    Closed,
    /// The cluster is stopping: the admin exits.
    Stopping,
    /// The admin was asked to stop.
    Shutdown,
}

/// Everything needed to reach the masters.
pub(crate) struct MasterConfig {
    pub cluster: String,
    pub masters: Vec<Address>,
    pub net: NetConfig,
    /// Address neoctl reaches this admin at (told to the master).
    pub listen_addr: Address,
}

/// Keep a link to the primary master until `stop` is cancelled. Cancels `stop` itself when the
/// cluster goes STOPPING.
pub(crate) async fn run(shared: Arc<Shared>, mc: MasterConfig, stop: CancellationToken) {
    let mut announced = false;
    loop {
        for addr in &mc.masters {
            if stop.is_cancelled() {
                return;
            }
            let req = net::identification(&mc.cluster, NodeType::Admin, None, Some(&mc.listen_addr));
            let r = tokio::select! {
                _ = stop.cancelled() => return,
                r = net::connect_identified(addr, &mc.net, req) => r,
            };
            let (link, incoming, acc) = match r {
                Ok(x) => x,
                Err(e) => {
                    debug!("master {addr}: {e}");
                    continue;
                }
            };
            if acc.node_type != NodeType::Master as i32 {
                warn!("{addr} is not a master (node type {}): trying the next one", acc.node_type);
                link.abort();
                continue;
            }
            let primary = Primary { nid: acc.nid.map(Nid), address: addr.clone() };
            info!(
                "connected to primary master {} at {addr}; this admin is {}",
                primary.nid.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                acc.your_nid.map(|n| Nid(n).to_string()).unwrap_or_else(|| "?".into()),
            );
            announced = false;
            shared.connected(link.clone(), primary);
            let end = session(&shared, &link, incoming, &stop).await;
            shared.disconnected();
            match end {
                End::Closed => {
                    warn!("lost the connection to the primary master at {addr}: reconnecting");
                    break;
                }
                End::Stopping => {
                    stop.cancel();
                    return;
                }
                End::Shutdown => return,
            }
        }
        if !announced {
            info!("waiting for a primary master (tried {})", list(&mc.masters));
            announced = true;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETRY_DELAY) => {}
        }
    }
}

fn list(addrs: &[Address]) -> String {
    addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" ")
}

/// Follow the notifications of the primary master.
async fn session(shared: &Shared, link: &Link, mut incoming: Incoming, stop: &CancellationToken) -> End {
    loop {
        let req = tokio::select! {
            _ = stop.cancelled() => {
                link.close().await;
                return End::Shutdown;
            }
            r = incoming.recv() => match r {
                Some(r) => r,
                None => return End::Closed,
            },
        };
        let name = proto::body_name(&req.body);
        if let Body::Ping(_) = req.body {
            if link.answer(req.id, msg::Pong {}).await.is_err() {
                return End::Closed;
            }
            continue;
        }
        if let Body::NotifyClusterInformation(m) = &req.body
            && let Ok(s) = proto::convert::cluster_state(m.state)
        {
            info!("cluster state: {s} {}", m.detail);
        }
        // Short, non-async critical section.
        let r = shared.lock().view.apply(&req.body);
        match r {
            Ok(Update::Applied) => debug!("primary master: {name} applied"),
            Ok(Update::Ignored) => debug!("primary master: {name} ignored"),
            Ok(Update::Stopping) => {
                info!("the cluster is stopping: admin exits");
                link.close().await;
                return End::Stopping;
            }
            Err(e) => warn!("primary master: {name} ignored: {e}"),
        }
    }
}
