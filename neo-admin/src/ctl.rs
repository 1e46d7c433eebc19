//! Serving neoctl: connections without identification, one request after the other, answered
//! from the admin's copy of the cluster state or forwarded to the primary master.

use crate::Shared;
use crate::state::{ClusterView, Primary};
use neo_lib::ErrorCode;
use proto::convert;
use proto::net::{self, NetConfig};
use proto::{Body, Link, LinkError, msg};
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub(crate) const NOT_CONNECTED: &str = "Not connected to a primary master.";

/// What to do with one request from neoctl.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    /// Answer with this body.
    Answer(Body),
    /// Forward this request to the primary master and relay its answer.
    Forward(Body),
}

fn not_ready(message: &str) -> Action {
    Action::Answer(proto::error(ErrorCode::NotReady, message))
}

/// Decide the answer to one request, given the admin's view and the primary master it is
/// connected to (`None`: not connected).
pub(crate) fn decide(view: &ClusterView, primary: Option<&Primary>, body: Body) -> Action {
    let connected = primary.is_some();
    match body {
        Body::RequestIdentification(_) => {
            Action::Answer(proto::error(ErrorCode::ProtocolError, "neoctl connections need no identification"))
        }
        Body::AskClusterState(_)
        | Body::AskNodeList(_)
        | Body::AskPartitionList(_)
        | Body::AskPrimary(_)
        | Body::SetClusterState(_)
        | Body::AskIds(_)
        | Body::AskLastTransaction(_)
        | Body::AddPendingNodes(_)
        | Body::TweakPartitionTable(_)
        | Body::SetNodeState(_)
        | Body::SetNumReplicas(_)
            if !connected =>
        {
            not_ready(NOT_CONNECTED)
        }
        Body::AskClusterState(_) => match view.cluster_state {
            Some(s) => {
                Action::Answer(msg::AnswerClusterState { state: s as i32, detail: view.cluster_detail.clone() }.into())
            }
            None => not_ready("The cluster state is not known yet."),
        },
        Body::AskNodeList(m) => {
            let filter = match m.node_type.map(convert::node_type).transpose() {
                Ok(f) => f,
                Err(e) => {
                    return Action::Answer(proto::error(ErrorCode::ProtocolError, e.to_string()));
                }
            };
            let nodes = view.node_list(filter).iter().map(convert::node_to_msg).collect();
            Action::Answer(msg::AnswerNodeList { nodes }.into())
        }
        Body::AskPartitionList(_) => match view.pt_msg() {
            Some(m) => Action::Answer(Body::AnswerPartitionList(m)),
            None => not_ready("The partition table is not known yet."),
        },
        Body::AskPrimary(_) => match primary {
            Some(p) => Action::Answer(
                msg::AnswerPrimary { nid: p.nid.map(|n| n.0).unwrap_or(0), address: p.address.to_string() }.into(),
            ),
            None => not_ready(NOT_CONNECTED),
        },
        b @ (Body::SetClusterState(_)
        | Body::AskIds(_)
        | Body::AskLastTransaction(_)
        | Body::AddPendingNodes(_)
        | Body::TweakPartitionTable(_)
        | Body::SetNodeState(_)
        | Body::SetNumReplicas(_)) => Action::Forward(b),
        other => Action::Answer(proto::error(
            ErrorCode::ProtocolError,
            format!("unexpected message {}", proto::body_name(&other)),
        )),
    }
}

/// The answer to relay to neoctl for the result of a forwarded request.
pub(crate) fn relay(result: Result<Body, LinkError>) -> Body {
    match result {
        Ok(b) => b,
        Err(LinkError::Remote { code, message }) => proto::error(code, message),
        Err(LinkError::Closed(_)) => proto::error(ErrorCode::NotReady, NOT_CONNECTED),
        Err(LinkError::Unexpected(what)) => {
            proto::error(ErrorCode::ProtocolError, format!("unexpected answer {what} from the primary master"))
        }
    }
}

/// Serve one neoctl connection until it closes or the admin stops.
pub(crate) async fn serve(shared: Arc<Shared>, tcp: TcpStream, net: NetConfig, stop: CancellationToken) {
    let accepted = tokio::select! {
        _ = stop.cancelled() => return,
        r = net::accept(tcp, &net) => r,
    };
    let (link, mut incoming) = match accepted {
        Ok(x) => x,
        Err(e) => {
            info!("neoctl connection failed: {e}");
            return;
        }
    };
    debug!("neoctl connected from {}", link.peer());
    loop {
        let req = tokio::select! {
            _ = stop.cancelled() => break,
            r = incoming.recv() => match r {
                Some(r) => r,
                None => break,
            },
        };
        let name = proto::body_name(&req.body);
        debug!("{}: {name}", link.peer());
        // Short, non-async critical section.
        let (action, master) = {
            let g = shared.lock();
            let primary = g.master.as_ref().map(|(_, p)| p);
            let action = decide(&g.view, primary, req.body);
            (action, g.master.as_ref().map(|(l, _)| l.clone()))
        };
        let answer = match action {
            Action::Answer(b) => b,
            Action::Forward(b) => match master {
                None => proto::error(ErrorCode::NotReady, NOT_CONNECTED),
                Some(master) => {
                    info!("forwarding {name} from neoctl {} to the primary master", link.peer());
                    // Not interrupted by `stop`: the answer to `set cluster STOPPING` arrives
                    // just before the master tells everyone to stop, and must be relayed.
                    tokio::select! {
                        _ = link.closed() => break,
                        r = forward(master, b) => r,
                    }
                }
            },
        };
        if link.answer(req.id, answer).await.is_err() {
            break;
        }
    }
    debug!("neoctl connection from {} closed", link.peer());
    link.close().await;
}

/// Ask the primary master in a task of its own and return the answer to relay.
async fn forward(master: Link, body: Body) -> Body {
    match tokio::spawn(async move { master.ask(body).await }).await {
        Ok(r) => relay(r),
        Err(e) => proto::error(ErrorCode::NotReady, format!("forwarding failed: {e}")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use neo_lib::config::Address;
    use neo_lib::{ClusterState, Nid, NodeInfo, NodeState, NodeType, PartitionTable};

    fn err_of(a: &Action) -> Option<(i32, String)> {
        match a {
            Action::Answer(Body::Error(e)) => Some((e.code, e.message.clone())),
            _ => None,
        }
    }

    fn primary() -> Primary {
        Primary { nid: Some(Nid::new(NodeType::Master, 1)), address: Address { host: "127.0.0.1".into(), port: 10000 } }
    }

    fn view() -> ClusterView {
        let mut v = ClusterView::new();
        v.set_cluster_state(ClusterState::Running as i32).unwrap();
        let nodes: Vec<msg::NodeInfo> = [
            (NodeType::Storage, Nid::new(NodeType::Storage, 2)),
            (NodeType::Master, Nid::new(NodeType::Master, 1)),
            (NodeType::Storage, Nid::new(NodeType::Storage, 1)),
        ]
        .iter()
        .map(|(t, nid)| {
            convert::node_to_msg(&NodeInfo {
                node_type: *t,
                nid: *nid,
                address: Some(Address { host: "127.0.0.1".into(), port: 1 }),
                state: NodeState::Running,
                id_timestamp: 0.0,
            })
        })
        .collect();
        v.update_nodes(&nodes).unwrap();
        let pt = PartitionTable::make(3, 0, &[Nid::new(NodeType::Storage, 1)]).unwrap();
        v.set_pt(&convert::pt_to_msg(&pt)).unwrap();
        v
    }

    #[test]
    fn not_connected_is_not_ready() {
        let v = view();
        for b in [
            Body::AskClusterState(msg::AskClusterState {}),
            Body::AskNodeList(msg::AskNodeList { node_type: None }),
            Body::AskPartitionList(msg::AskPartitionList { min_offset: 0, max_offset: 0, nid: None }),
            Body::AskPrimary(msg::AskPrimary {}),
            Body::SetClusterState(msg::SetClusterState { state: 1 }),
            Body::AskIds(msg::AskIds {}),
            Body::AskLastTransaction(msg::AskLastTransaction {}),
        ] {
            let a = decide(&v, None, b);
            assert_eq!(err_of(&a), Some((ErrorCode::NotReady as i32, NOT_CONNECTED.to_string())));
        }
    }

    #[test]
    fn local_answers() {
        let v = view();
        let p = primary();
        let a = decide(&v, Some(&p), Body::AskClusterState(msg::AskClusterState {}));
        assert_eq!(
            a,
            Action::Answer(Body::AnswerClusterState(msg::AnswerClusterState { state: 2, detail: String::new() }))
        );
        let a = decide(&v, Some(&p), Body::AskNodeList(msg::AskNodeList { node_type: None }));
        let Action::Answer(Body::AnswerNodeList(l)) = a else { panic!("{a:?}") };
        let nids: Vec<String> = l.nodes.iter().map(|n| Nid(n.nid).to_string()).collect();
        assert_eq!(nids, ["M1", "S1", "S2"]);
        let a = decide(&v, Some(&p), Body::AskNodeList(msg::AskNodeList { node_type: Some(NodeType::Storage as i32) }));
        let Action::Answer(Body::AnswerNodeList(l)) = a else { panic!("{a:?}") };
        assert_eq!(l.nodes.len(), 2);
        let a = decide(&v, Some(&p), Body::AskNodeList(msg::AskNodeList { node_type: Some(17) }));
        assert_eq!(err_of(&a).map(|e| e.0), Some(ErrorCode::ProtocolError as i32));
        let a = decide(
            &v,
            Some(&p),
            Body::AskPartitionList(msg::AskPartitionList { min_offset: 1, max_offset: 2, nid: None }),
        );
        let Action::Answer(Body::AnswerPartitionList(pt)) = a else { panic!("{a:?}") };
        assert_eq!(pt.rows.len(), 3);
        let a = decide(&v, Some(&p), Body::AskPrimary(msg::AskPrimary {}));
        assert_eq!(
            a,
            Action::Answer(Body::AnswerPrimary(msg::AnswerPrimary {
                nid: Nid::new(NodeType::Master, 1).0,
                address: "127.0.0.1:10000".into()
            }))
        );
        // Connected but nothing received yet.
        let empty = ClusterView::new();
        let a = decide(&empty, Some(&p), Body::AskClusterState(msg::AskClusterState {}));
        assert_eq!(err_of(&a).map(|e| e.0), Some(ErrorCode::NotReady as i32));
        let a = decide(
            &empty,
            Some(&p),
            Body::AskPartitionList(msg::AskPartitionList { min_offset: 0, max_offset: 0, nid: None }),
        );
        assert_eq!(err_of(&a).map(|e| e.0), Some(ErrorCode::NotReady as i32));
    }

    #[test]
    fn forwards_and_errors() {
        let v = view();
        let p = primary();
        for b in [
            Body::SetClusterState(msg::SetClusterState { state: 1 }),
            Body::AskIds(msg::AskIds {}),
            Body::AskLastTransaction(msg::AskLastTransaction {}),
        ] {
            assert_eq!(decide(&v, Some(&p), b.clone()), Action::Forward(b));
        }
        let ident = Body::RequestIdentification(net::identification("c", NodeType::Admin, None, None));
        for pr in [None, Some(&p)] {
            let a = decide(&v, pr, ident.clone());
            assert_eq!(
                err_of(&a),
                Some((ErrorCode::ProtocolError as i32, "neoctl connections need no identification".into()))
            );
            let a = decide(&v, pr, Body::Ping(msg::Ping {}));
            assert_eq!(err_of(&a), Some((ErrorCode::ProtocolError as i32, "unexpected message Ping".into())));
        }
    }

    #[test]
    fn relay_answers() {
        let ok =
            Body::AnswerIds(msg::AnswerIds { last_oid: 1, last_tid: 2, ptid: 3, backup_tid: None, max_stored_oid: 1 });
        assert_eq!(relay(Ok(ok.clone())), ok);
        assert_eq!(relay(Ok(proto::ack())), proto::ack());
        let denied = relay(Err(LinkError::Remote { code: ErrorCode::Denied, message: "no".into() }));
        assert_eq!(denied, proto::error(ErrorCode::Denied, "no"));
        assert_eq!(relay(Err(LinkError::Closed("m".into()))), proto::error(ErrorCode::NotReady, NOT_CONNECTED));
        let Body::Error(e) = relay(Err(LinkError::Unexpected("Pong".into()))) else { panic!() };
        assert_eq!(e.code, ErrorCode::ProtocolError as i32);
    }
}
