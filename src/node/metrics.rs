//! A node's Prometheus metrics (`GET /metrics`): the request and call
//! series it counts as it goes ([`NodeMetrics`]), and at each scrape what it
//! already keeps for `Cluster.Status`, encoded by [`NodeCollector`].

use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::Node;
use crate::metrics::{
    Answered, CallMetrics, Operation, RequestMetrics, counter, gauge, labelled_counters,
    labelled_gauges,
};
use crate::pb;
use crate::quorum::Consistency;

/// What a node counts as requests and calls go.
#[derive(Default)]
pub(super) struct NodeMetrics {
    pub(super) requests: Arc<RequestMetrics>,
    pub(super) calls: Arc<CallMetrics>,
}

/// Everything `GET /metrics` shows for `node`.
pub(super) fn registry(node: &Arc<Node>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(node.metrics.requests.clone()));
    registry.register_collector(Box::new(NodeCollector(Arc::downgrade(node))));
    registry.register_collector(Box::new(crate::metrics::process::ProcessCollector));
    registry
}

/// The label index of a request's raw consistency field
/// ([`crate::metrics::CONSISTENCIES`]; unspecified is QUORUM).
pub(super) fn consistency_label(raw: i32) -> usize {
    match pb::consistency_from(raw) {
        Ok(Consistency::One) => 0,
        Ok(Consistency::Quorum) => 1,
        Ok(Consistency::All) => 2,
        Ok(Consistency::Any) => 3,
        Err(_) => 4,
    }
}

/// Counts one client request when it is answered ([`Recording::answered`])
/// or, if its future is dropped first (the caller cancelled, or its
/// `grpc-timeout` ran out in tonic), as CANCELLED with an `unknown`
/// outcome for a write: slow requests are counted too.
pub(super) struct Recording<'a> {
    node: &'a Node,
    operation: Operation,
    consistency: usize,
    started: Instant,
    done: bool,
}

impl<'a> Recording<'a> {
    pub(super) fn start(node: &'a Node, operation: Operation, consistency: usize) -> Self {
        Self {
            node,
            operation,
            consistency,
            started: Instant::now(),
            done: false,
        }
    }

    /// Counts the request answered `answer`.
    pub(super) fn answered<T>(mut self, answer: &Result<tonic::Response<T>, tonic::Status>) {
        let (code, outcome) = match answer {
            Ok(_) => (0, self.success_outcome()),
            Err(status) => {
                let outcome = match crate::error::Outcome::of(status.metadata()) {
                    Some(crate::error::Outcome::Applied) => 1,
                    Some(crate::error::Outcome::NotApplied) => 2,
                    Some(crate::error::Outcome::Unknown) => 3,
                    None => 0,
                };
                (status.code() as i32, outcome)
            }
        };
        self.count(code, outcome);
    }

    fn writes(&self) -> bool {
        matches!(self.operation, Operation::Put | Operation::Delete)
    }

    fn success_outcome(&self) -> usize {
        if self.writes() { 1 } else { 0 }
    }

    fn count(&mut self, code: i32, outcome: usize) {
        self.done = true;
        let answered = Answered {
            operation: self.operation,
            consistency: self.consistency,
            code,
            outcome,
        };
        self.node
            .metrics
            .requests
            .record(answered, self.started.elapsed());
    }
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        if !self.done {
            let outcome = if self.writes() { 3 } else { 0 };
            self.count(tonic::Code::Cancelled as i32, outcome);
        }
    }
}

/// Encodes, at each scrape, what the node keeps for `Cluster.Status`.
/// Holds the node weakly: a scrape during shutdown finds nothing.
#[derive(Debug)]
struct NodeCollector(Weak<Node>);

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(node) = self.0.upgrade() else {
            return Ok(());
        };
        let status = super::cluster::status_of(&node);
        // Calls to addresses no longer members are kept but not shown, so
        // the series do not grow with every address a peer ever had.
        let view = node.cluster.placement();
        node.metrics
            .calls
            .encode_peers(&mut encoder, |peer| view.is_member(peer))?;
        build_and_config(&node, &mut encoder)?;
        local_counts(&node, &mut encoder)?;
        members(&node, &status, &mut encoder)?;
        layout_and_moves(&node, &status, &mut encoder)?;
        workers(&status, &mut encoder)
    }
}

fn build_and_config(node: &Node, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    labelled_gauges(
        e,
        "dkvs_build_info",
        "Always 1; the labels say which DKVS this node runs.",
        [(
            vec![
                ("version", env!("CARGO_PKG_VERSION").to_string()),
                ("address", node.me.address.clone()),
            ],
            1.0,
        )],
    )?;
    gauge(
        e,
        "dkvs_ready",
        "1 when the node serves reads and writes (GET /health/ready answers 200).",
        f64::from(u8::from(super::http::readiness(node).is_ready())),
    )?;
    gauge(
        e,
        "dkvs_max_clock_skew_seconds",
        "--max-clock-skew-ms: versions further ahead of this node's clock are refused.",
        node.config.max_clock_skew_ms as f64 / 1e3,
    )?;
    gauge(
        e,
        "dkvs_data_quota_bytes",
        "--max-data-bytes (0: no quota).",
        node.config.max_data_bytes as f64,
    )
}

/// This node's own counts (`NodeStats` of `Cluster.Status`).
fn local_counts(node: &Node, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let stats = node.local_stats();
    let gauges: [(&str, &str, f64); 7] = [
        (
            "dkvs_live_keys",
            "Keys whose newest local version is a value.",
            stats.live_keys as f64,
        ),
        (
            "dkvs_tombstones",
            "Keys whose newest local version is a tombstone.",
            stats.tombstones as f64,
        ),
        (
            "dkvs_hints_pending",
            "Hints held for replicas that were down.",
            stats.hints_pending as f64,
        ),
        (
            "dkvs_hints_pending_bytes",
            "Bytes of the hints held.",
            node.hints.bytes() as f64,
        ),
        (
            "dkvs_data_bytes",
            "Bytes of the files in the node's data dir.",
            super::quota::bytes_under(&node.config.data_dir()) as f64,
        ),
        (
            "dkvs_data_quota_reached",
            "1 when the data dir is at or over --max-data-bytes: new values refused, deletes taken.",
            f64::from(u8::from(stats.data_quota_reached)),
        ),
        (
            "dkvs_future_records",
            "Records found at start-up with a version no node can have issued (served as failed reads until replaced).",
            stats.future_records as f64,
        ),
    ];
    for (name, help, value) in gauges {
        gauge(e, name, help, value)?;
    }
    if let Some((free, size)) = crate::metrics::process::disk_space(&node.config.data_dir()) {
        gauge(
            e,
            "dkvs_disk_free_bytes",
            "Free bytes (for the node's user) on the file system of the data dir.",
            free as f64,
        )?;
        gauge(
            e,
            "dkvs_disk_size_bytes",
            "Size of the file system of the data dir.",
            size as f64,
        )?;
    }
    local_counters(node, &stats, e)
}

/// This node's own counters since it started.
///
/// One piece: a table, one metric (name, help, value) per entry; split, it
/// would only be two tables.
fn local_counters(
    node: &Node,
    stats: &crate::net::messages::NodeStats,
    e: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let counters: [(&str, &str, u64); 15] = [
        (
            "dkvs_read_repair_writes",
            "Read-repair writes this node sent to replicas found behind (after the answer, or before it when blocking).",
            stats.read_repairs,
        ),
        (
            "dkvs_blocking_read_repairs",
            "Reads whose newest version was held by fewer than W replicas, written to W before the answer.",
            stats.blocking_read_repairs,
        ),
        (
            "dkvs_hints_stored",
            "Hints stored for replicas that were down.",
            node.hints.stored(),
        ),
        (
            "dkvs_hints_delivered",
            "Hints delivered to their replica.",
            stats.hints_delivered,
        ),
        (
            "dkvs_hints_dropped",
            "Hints given up on: expired, corrupt, target gone, or refused because the store was full.",
            node.hints.dropped(),
        ),
        (
            "dkvs_anti_entropy_exchanges",
            "Anti-entropy exchanges with a peer.",
            stats.anti_entropy_exchanges,
        ),
        (
            "dkvs_anti_entropy_in_sync",
            "Anti-entropy exchanges that found the trees equal at the root.",
            stats.anti_entropy_in_sync,
        ),
        (
            "dkvs_anti_entropy_keys_repaired",
            "Keys copied to or from a peer by anti-entropy.",
            stats.anti_entropy_keys_repaired,
        ),
        (
            "dkvs_tombstones_purged",
            "Tombstones purged after their grace period.",
            stats.tombstones_purged,
        ),
        (
            "dkvs_tombstone_gc_skipped",
            "Tombstone-collection checks skipped because a replica of the key was believed down.",
            stats.tombstone_gc_skipped,
        ),
        (
            "dkvs_damaged_entries_skipped",
            "Damaged stretches of the data files skipped at start-up.",
            stats.damaged_entries_skipped,
        ),
        (
            "dkvs_requests_shed",
            "Requests refused because a budget was spent (load shed, not applied).",
            stats.requests_shed,
        ),
        (
            "dkvs_connections_refused",
            "Connections closed as they arrived (--max-connections).",
            stats.connections_refused,
        ),
        (
            "dkvs_writes_forwarded",
            "Client writes forwarded to the key's first live replica.",
            stats.writes_forwarded,
        ),
        (
            "dkvs_forwarded_writes_coordinated",
            "Writes another node forwarded that this node coordinated.",
            stats.forwarded_writes_coordinated,
        ),
    ];
    for (name, help, value) in counters {
        counter(e, name, help, value)?;
    }
    Ok(())
}

/// Each member as this node sees it, and the ranges short of a quorum.
fn members(
    node: &Node,
    status: &pb::StatusResponse,
    e: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let peers: Vec<&pb::Member> = status
        .members
        .iter()
        .filter(|m| m.address != node.me.address)
        .collect();
    let per_peer = |value: fn(&pb::Member) -> f64| {
        peers
            .iter()
            .map(move |m| (vec![("peer", m.address.clone())], value(m)))
            .collect::<Vec<_>>()
    };
    labelled_gauges(
        e,
        "dkvs_peer_up",
        "1 while this node's failure detector believes the peer up.",
        per_peer(|m| f64::from(u8::from(m.state != pb::MemberState::Down as i32))),
    )?;
    labelled_gauges(
        e,
        "dkvs_peer_phi",
        "The failure detector's suspicion of the peer (down at --phi-threshold).",
        per_peer(|m| m.phi),
    )?;
    labelled_gauges(
        e,
        "dkvs_peer_clock_skew_seconds",
        "The peer's wall clock minus this node's, as its last answered heartbeat measured.",
        per_peer(|m| m.clock_skew_ms as f64 / 1e3),
    )?;
    labelled_gauges(
        e,
        "dkvs_peer_layout_version",
        "The layout version the peer served at its last answered heartbeat.",
        per_peer(|m| m.layout_version as f64),
    )?;
    let states = [
        ("up", pb::MemberState::Up),
        ("joining", pb::MemberState::Joining),
        ("down", pb::MemberState::Down),
    ];
    labelled_gauges(
        e,
        "dkvs_members",
        "Members of the layout this node serves, by state as it sees them (itself included).",
        states.map(|(name, state)| {
            let n = status
                .members
                .iter()
                .filter(|m| m.state == state as i32)
                .count();
            (vec![("state", name.to_string())], n as f64)
        }),
    )?;
    gauge(
        e,
        "dkvs_ranges_below_quorum",
        "Ring ranges with fewer than W replicas this node believes up: QUORUM writes to their keys fail.",
        ranges_below_quorum(node) as f64,
    )
}

/// Ring ranges of the layout served whose replicas believed up are fewer
/// than a quorum.
fn ranges_below_quorum(node: &Node) -> usize {
    let view = node.cluster.placement();
    let ring = view.ring();
    let n = view.replicas();
    let quorum = Consistency::Quorum.required(n);
    let healths = node
        .cluster
        .liveness
        .healths(view.members().iter().map(|m| m.address.as_str()));
    let up: std::collections::HashSet<&str> = view
        .members()
        .iter()
        .zip(healths)
        .filter(|(m, h)| h.up || view.is_me(&m.address))
        .map(|(m, _)| m.address.as_str())
        .collect();
    (0..ring.range_count())
        .filter(|&i| {
            let replicas = ring.range_replicas(i, n);
            replicas
                .iter()
                .filter(|m| up.contains(m.address.as_str()))
                .count()
                < quorum
        })
        .count()
}

/// The layout served, a change in progress, and the data it moves.
fn layout_and_moves(
    node: &Node,
    status: &pb::StatusResponse,
    e: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let view = node.cluster.placement();
    gauge(
        e,
        "dkvs_layout_version",
        "The layout version this node serves.",
        view.version() as f64,
    )?;
    gauge(
        e,
        "dkvs_layout_change_in_progress",
        "1 while the layout served has a change in progress (members joining, or old replica sets still written).",
        f64::from(u8::from(!view.is_settled())),
    )?;
    gauge(
        e,
        "dkvs_layout_forks",
        "Peers whose layout differs from this node's at the same version (0 when healthy).",
        status.layout_forks.len() as f64,
    )?;
    gauge(
        e,
        "dkvs_catching_up",
        "1 while this node's data dir is new and still catching up (it answers no replica reads).",
        f64::from(u8::from(status.catching_up)),
    )?;
    let per_move = |value: fn(&pb::MoveProgress) -> f64| {
        status
            .moves
            .iter()
            .map(move |m| (vec![("member", m.address.clone())], value(m)))
            .collect::<Vec<_>>()
    };
    labelled_gauges(
        e,
        "dkvs_move_keys",
        "Keys a joining member has received in the change in progress (gone once it ends).",
        per_move(|m| m.keys_moved as f64),
    )?;
    labelled_gauges(
        e,
        "dkvs_move_bytes",
        "Bytes a joining member has received in the change in progress (gone once it ends).",
        per_move(|m| m.bytes_moved as f64),
    )?;
    labelled_gauges(
        e,
        "dkvs_move_done_ratio",
        "Of the hash space a joining member receives, the part done (0 to 1).",
        per_move(|m| f64::from(m.done_ppm) / 1e6),
    )?;
    labelled_gauges(
        e,
        "dkvs_move_remaining_seconds",
        "Estimated time left of a joining member's streaming (0: not yet known).",
        per_move(|m| m.eta_ms as f64 / 1e3),
    )
}

/// The periodic workers' rounds and failures.
fn workers(status: &pb::StatusResponse, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let per_worker = |value: fn(&pb::WorkerStatus) -> u64| {
        status
            .workers
            .iter()
            .map(move |w| (vec![("worker", w.name.clone())], value(w)))
            .collect::<Vec<_>>()
    };
    labelled_counters(
        e,
        "dkvs_worker_rounds",
        "Rounds a periodic worker ended, failed or not.",
        per_worker(|w| w.rounds),
    )?;
    labelled_counters(
        e,
        "dkvs_worker_failures",
        "Rounds a periodic worker failed.",
        per_worker(|w| w.failures),
    )?;
    labelled_gauges(
        e,
        "dkvs_worker_consecutive_failures",
        "Rounds a periodic worker failed since its last success (0: the last one succeeded).",
        per_worker(|w| u64::from(w.consecutive_failures))
            .into_iter()
            .map(|(l, v)| (l, v as f64)),
    )
}
