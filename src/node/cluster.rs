//! `dkvs.v1.Cluster`: how this node sees the cluster, answered from what it
//! already knows.

use std::sync::Arc;
use tokio::time::Instant;

use tonic::{Request, Response, Status};

use super::Node;
use crate::clock::InstanceId;
use crate::error::Outcome;
use crate::liveness::PeerHealth;
use crate::pb;
use crate::placement::Placement;
use crate::quorum::Consistency;
use crate::ring::Member;
use crate::workers::WorkerReport;

pub(super) struct ClusterService(pub(super) Arc<Node>);

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    /// Answers from what this node already knows: the failure detector's
    /// view and each member's counts from its last answered heartbeat, with
    /// their age. It never waits for a member, so a frozen one (not yet
    /// convicted) cannot slow it.
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(status_of(&self.0)))
    }

    /// Undoes the join in progress (see [`crate::membership::Membership::abort`]).
    async fn abort(
        &self,
        _request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        abort(&self.0).await
    }

    /// Decommissions a live member (see [`crate::membership::Membership::leave`]).
    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let request = request.into_inner();
        let address = change_address(&request.address)?;
        let layout = self.0.membership.leave(address, request.force).await?;
        Ok(changed(layout))
    }

    /// Drops a dead member (see [`crate::membership::Membership::remove`]).
    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let request = request.into_inner();
        let address = change_address(&request.address)?;
        let layout = self
            .0
            .membership
            .remove(address, request.force, request.allow_data_loss)
            .await?;
        Ok(changed(layout))
    }
}

/// The member address a leave or remove names.
fn change_address(address: &str) -> Result<&str, Status> {
    if address.is_empty() || address.len() > 256 {
        return Err(Status::invalid_argument(
            "name the member as HOST:PORT, as `DKVSClient status` lists it",
        ));
    }
    Ok(address)
}

/// A committed change's answer, `applied`.
fn changed(layout: crate::layout::Layout) -> Response<pb::ChangeResponse> {
    tracing::info!(version = layout.version, change = %layout.change, "committed a membership change");
    let mut response = Response::new(pb::ChangeResponse {
        layout: Some(pb::Layout::from(&layout)),
    });
    Outcome::Applied.set_on(response.metadata_mut());
    response
}

/// What `Cluster.Status` answers (and `/metrics` shows): this node's view
/// of the cluster now.
pub(super) fn status_of(node: &Node) -> pb::StatusResponse {
    let view = node.cluster.placement();
    let healths = node
        .cluster
        .liveness
        .healths(view.members().iter().map(|m| m.address.as_str()));
    let now = Instant::now();
    let members = view
        .members()
        .iter()
        .zip(healths)
        .map(|(member, health)| member_status(node, &view, member, health, now))
        .collect();
    let quorum = Consistency::Quorum.required(view.replicas()) as u32;
    pb::StatusResponse {
        address: node.me.address.clone(),
        node_id: node.me.member_id.0,
        replicas: view.replicas() as u32,
        vnodes: view.ring().vnodes() as u32,
        write_quorum: quorum,
        read_quorum: quorum,
        members,
        instance_id: node.me.instance_id.0,
        layout: view.layout().map(|l| pb::Layout::from(l.as_ref())),
        moves: moves(node, &view),
        workers: node
            .workers
            .reports()
            .into_iter()
            .map(worker_status)
            .collect(),
        layout_forks: node
            .heartbeats
            .forks()
            .into_iter()
            .map(|(peer, fork)| pb::LayoutFork {
                peer,
                version: fork.version,
                mine: fork.mine,
                theirs: fork.theirs,
            })
            .collect(),
        catching_up: node.replica.read_refusal().is_some(),
        cleaned_up_layout: node.membership.cleaned_up(),
    }
}

/// `Cluster.Abort`'s answer: the layout without the change, `applied`.
async fn abort(node: &Node) -> Result<Response<pb::AbortResponse>, Status> {
    let layout = node.membership.abort().await?;
    tracing::info!(version = layout.version, change = %layout.change, "aborted the change in progress");
    let mut response = Response::new(pb::AbortResponse {
        layout: Some(pb::Layout::from(&layout)),
    });
    Outcome::Applied.set_on(response.metadata_mut());
    Ok(response)
}

/// `address`'s role in the layout `view` serves.
fn role_of(view: &Placement, address: &str) -> Option<crate::layout::Role> {
    view.layout()
        .and_then(|l| l.member(address).map(|m| m.role))
}

/// One member as this node sees it: its state and why, its counts from its
/// last answered heartbeat (with their age), its clock skew, instance and
/// layout version.
fn member_status(
    node: &Node,
    view: &Placement,
    member: &Member,
    health: PeerHealth,
    now: Instant,
) -> pb::Member {
    let itself = view.is_me(&member.address);
    let report = node.heartbeats.report(&member.address);
    let (stats, stats_age_ms) = if itself {
        (Some(node.local_stats()), 0)
    } else {
        match report.as_ref().and_then(|r| r.stats) {
            Some((stats, at)) => (
                Some(stats),
                now.saturating_duration_since(at).as_millis() as u64,
            ),
            None => (None, 0),
        }
    };
    // Why a member is believed down. One that is up but silent (frozen,
    // not yet convicted) shows in the age of its counts.
    let role = role_of(view, &member.address);
    let (state, error) = if (itself || health.up) && role == Some(crate::layout::Role::Joining) {
        (pb::MemberState::Joining, String::new())
    } else if (itself || health.up)
        && matches!(
            role,
            Some(crate::layout::Role::Leaving | crate::layout::Role::Removing)
        )
    {
        (pb::MemberState::Leaving, String::new())
    } else if itself || health.up {
        (pb::MemberState::Up, String::new())
    } else {
        let why = health
            .last_error
            .clone()
            .unwrap_or_else(|| "no heartbeat".into());
        (pb::MemberState::Down, why)
    };
    let instance_id = if itself {
        node.me.instance_id
    } else {
        (node.identity.known_instance(&member.address)).unwrap_or(InstanceId::NONE)
    };
    pb::Member {
        address: member.address.clone(),
        node_id: member.member_id.0,
        state: state as i32,
        stats: stats.map(pb::NodeStats::from),
        error,
        phi: health.phi,
        clock_skew_ms: report.as_ref().map_or(0, |r| r.clock_skew_ms),
        instance_id: instance_id.0,
        stats_age_ms,
        layout_version: if itself {
            view.version()
        } else {
            report.as_ref().map_or(0, |r| r.layout_version)
        },
    }
}

/// Data moving: this node's own streaming, and the last reports of the
/// other members that gain ranges.
fn moves(node: &Node, view: &Placement) -> Vec<pb::MoveProgress> {
    // The members streaming ranges they gain in the change `view` serves
    // (computed once: it walks every range of the ring).
    let gainers = view.layout().map(|l| l.gainers()).unwrap_or_default();
    let is_gaining = |address: &str| gainers.iter().any(|g| g == address);
    let mut moves = Vec::new();
    if let Some(progress) = node.membership.progress()
        && is_gaining(&node.me.address)
    {
        let mut progress = pb::MoveProgress::from(progress.report());
        progress.address = node.me.address.clone();
        moves.push(progress);
    }
    for (address, progress, age) in node.heartbeats.moves() {
        if is_gaining(&address) && address != node.me.address {
            let mut progress = pb::MoveProgress::from(progress);
            progress.address = address;
            progress.age_ms = age.as_millis() as u64;
            moves.push(progress);
        }
    }
    moves
}

/// A worker's report as `Cluster.Status` carries it.
fn worker_status((name, report): (&'static str, WorkerReport)) -> pb::WorkerStatus {
    pb::WorkerStatus {
        name: name.to_string(),
        rounds: report.rounds,
        failures: report.failures,
        consecutive_failures: report.consecutive_failures,
        last_error: report.last_error.unwrap_or_default(),
        last_error_unix_ms: report.last_error_unix_ms,
        last_success_unix_ms: report.last_success_unix_ms,
        state: report.state.name().to_string(),
    }
}
