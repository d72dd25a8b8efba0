//! The node-to-node services take calls from this cluster's nodes only.
//!
//! Every node-to-node call carries its sender's cluster id in its metadata
//! (`dkvs-cluster-id`, put there by the peer channel: see
//! [`crate::net::PeerChannel`]). [`ClusterRule`], around the whole
//! server, checks it for `dkvs.v1.Replica`, `dkvs.v1.Membership` and
//! `dkvs.v1.Liveness` before any handler runs, with the layout owner's rule
//! ([`crate::serving::LayoutOwner::check_caller`]): a call from another
//! cluster — an old cluster's node restarted beside a new one, a node
//! started with another `--cluster-token` — is refused with
//! FAILED_PRECONDITION naming both ids and what to do, and logged once per
//! sender and id (the address the call names as its sender, else its
//! host). So the data path (writes, reads, hints,
//! anti-entropy) refuses such a node by itself, not only because its
//! heartbeats are refused.
//!
//! Once this node has a cluster id, a call without the metadata is refused
//! too (DESIGN, Upgrades: the upgrade policy is stop all, upgrade, start,
//! so every node of the cluster sends it), saying the sender holds no
//! layout of this cluster; any call is accepted while this node has no
//! cluster id yet. Not checked: the client-facing services (`KeyValue`,
//! `Cluster`, `ReplicaRead`, health, reflection); `Membership.GetLayout`
//! and `Membership.LayoutVouch`, which change nothing: a layout names its
//! cluster, and the asker judges it (a member that lost its data dir has no
//! cluster id until it has fetched and verified the layout through them);
//! and `Membership.Join`, sent by a node that has no layout yet
//! (the request carries the cluster id the joiner knows, if any, and its
//! handler judges it).

use std::sync::Arc;

use crate::serving::LayoutOwner;

/// The services whose calls are checked: those for nodes only (paths as
/// gRPC sends them, `/package.Service/`).
const CHECKED_SERVICES: [&str; 3] = [
    "/dkvs.v1.Replica/",
    "/dkvs.v1.Membership/",
    "/dkvs.v1.Liveness/",
];

/// Node-to-node methods that are not checked (see the module doc).
const UNCHECKED_METHODS: [&str; 3] = [
    "/dkvs.v1.Membership/GetLayout",
    "/dkvs.v1.Membership/LayoutVouch",
    "/dkvs.v1.Membership/Join",
];

/// Refuses node-to-node calls from another cluster (see the module doc);
/// a [`super::gate::Admit`] rule.
#[derive(Clone)]
pub(super) struct ClusterRule {
    /// Knows this node's cluster id and logs each foreign sender once.
    pub(super) layouts: Arc<LayoutOwner>,
}

impl super::gate::Admit for ClusterRule {
    /// Whether `request` may reach its handler; the status to answer if not.
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), tonic::Status> {
        let path = request.uri().path();
        if !is_checked(path) {
            return Ok(());
        }
        let theirs = crate::net::cluster_id_in(request.headers())
            .map_err(tonic::Status::invalid_argument)?;
        let sender = sender_of(request);
        (self.layouts)
            .check_caller(theirs, &sender)
            .map_err(tonic::Status::from)
    }
}

/// Who sent `request`, for the log: the address it names (`dkvs-sender`:
/// a label, not trusted), else the host it came from.
fn sender_of<B>(request: &http::Request<B>) -> String {
    if let Some(named) = crate::net::sender_in(request.headers()) {
        return named.to_string();
    }
    let extensions = request.extensions();
    extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<tonic::transport::server::TlsConnectInfo<
                    tonic::transport::server::TcpConnectInfo,
                >>()
                .map(|tls| tls.get_ref())
        })
        .and_then(|info| info.remote_addr())
        .map_or_else(
            || "a node at an unknown address".to_string(),
            |address| format!("a node at {}", address.ip()),
        )
}

/// Whether calls to `path` are checked.
fn is_checked(path: &str) -> bool {
    CHECKED_SERVICES.iter().any(|s| path.starts_with(s)) && !UNCHECKED_METHODS.contains(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_node_to_node_services_are_checked() {
        for path in [
            "/dkvs.v1.Replica/Write",
            "/dkvs.v1.Replica/Batch",
            "/dkvs.v1.Replica/RangeEntries",
            "/dkvs.v1.Membership/LayoutCommit",
            "/dkvs.v1.Liveness/Ping",
        ] {
            assert!(is_checked(path), "{path}");
        }
        for path in [
            "/dkvs.v1.KeyValue/Put",
            "/dkvs.v1.Cluster/Status",
            "/dkvs.v1.ReplicaRead/Batch",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/dkvs.v1.Membership/GetLayout",
            "/dkvs.v1.Membership/LayoutVouch",
            "/dkvs.v1.Membership/Join",
        ] {
            assert!(!is_checked(path), "{path}");
        }
    }
}
