//! `GET /v1/cluster`: what `DKVSClient status` shows, as JSON. Ids are 16
//! hex digits, as the CLI and the logs print them (a JSON number cannot
//! hold every u64); clocks are decimal strings for the same reason;
//! versions are `lamport@node_id` strings.

use serde_json::{Value, json};

use crate::pb;

/// An id as the CLI shows it.
fn id(value: u64) -> String {
    format!("{value:016x}")
}

/// `Cluster.Status`'s answer as JSON.
pub(super) fn cluster(status: &pb::StatusResponse) -> Value {
    json!({
        "address": status.address,
        "node_id": id(status.node_id),
        "instance_id": id(status.instance_id),
        "replicas": status.replicas,
        "vnodes": status.vnodes,
        "write_quorum": status.write_quorum,
        "read_quorum": status.read_quorum,
        "catching_up": status.catching_up,
        "members": status.members.iter().map(member).collect::<Vec<_>>(),
        "layout": status.layout.as_ref().map(layout),
        "moves": status.moves.iter().map(moving).collect::<Vec<_>>(),
        "workers": status.workers.iter().map(worker).collect::<Vec<_>>(),
        "layout_forks": status.layout_forks.iter().map(|f| json!({
            "peer": f.peer,
            "version": f.version,
            "mine": id(f.mine),
            "theirs": id(f.theirs),
        })).collect::<Vec<_>>(),
    })
}

fn member(member: &pb::Member) -> Value {
    let state = match pb::MemberState::try_from(member.state) {
        Ok(pb::MemberState::Up) => "UP",
        Ok(pb::MemberState::Down) => "DOWN",
        Ok(pb::MemberState::Joining) => "JOINING",
        Ok(pb::MemberState::Leaving) => "LEAVING",
        _ => "UNKNOWN",
    };
    json!({
        "address": member.address,
        "node_id": id(member.node_id),
        "instance_id": id(member.instance_id),
        "state": state,
        "error": member.error,
        "phi": member.phi,
        "clock_skew_ms": member.clock_skew_ms,
        "layout_version": member.layout_version,
        "stats_age_ms": member.stats_age_ms,
        "stats": member.stats.as_ref().map(stats),
    })
}

fn stats(stats: &pb::NodeStats) -> Value {
    json!({
        "live_keys": stats.live_keys,
        "tombstones": stats.tombstones,
        "hlc": stats.lamport.to_string(),
        "uptime_ms": stats.uptime_ms,
        "read_repairs": stats.read_repairs,
        "blocking_read_repairs": stats.blocking_read_repairs,
        "hints_pending": stats.hints_pending,
        "hints_delivered": stats.hints_delivered,
        "anti_entropy_exchanges": stats.anti_entropy_exchanges,
        "anti_entropy_in_sync": stats.anti_entropy_in_sync,
        "anti_entropy_keys_repaired": stats.anti_entropy_keys_repaired,
        "tombstones_purged": stats.tombstones_purged,
        "future_records": stats.future_records,
        "tombstone_gc_skipped": stats.tombstone_gc_skipped,
        "damaged_entries_skipped": stats.damaged_entries_skipped,
        "requests_shed": stats.requests_shed,
        "connections_refused": stats.connections_refused,
        "data_bytes": stats.data_bytes,
        "data_quota_reached": stats.data_quota_reached,
        "writes_forwarded": stats.writes_forwarded,
        "forwarded_writes_coordinated": stats.forwarded_writes_coordinated,
    })
}

fn layout(layout: &pb::Layout) -> Value {
    json!({
        "version": layout.version,
        "cluster_id": id(layout.cluster_id),
        "replicas": layout.replicas,
        "vnodes": layout.vnodes,
        "change": layout.change,
        "previous": layout.previous,
        "members": layout.members.iter().map(|m| json!({
            "address": m.address,
            "member_id": id(m.member_id),
            "instance_id": id(m.instance_id),
            "role": match pb::LayoutRole::try_from(m.role) {
                Ok(pb::LayoutRole::Joining) => "JOINING",
                Ok(pb::LayoutRole::Leaving) => "LEAVING",
                Ok(pb::LayoutRole::Removing) => "REMOVING",
                _ => "ACTIVE",
            },
        })).collect::<Vec<_>>(),
        "removed": layout.removed.iter().map(|r| json!({
            "address": r.address,
            "instance_id": id(r.instance_id),
            "version": r.version,
            "why": r.why,
        })).collect::<Vec<_>>(),
    })
}

fn moving(progress: &pb::MoveProgress) -> Value {
    json!({
        "address": progress.address,
        "layout_version": progress.layout_version,
        "keys_moved": progress.keys_moved,
        "bytes_moved": progress.bytes_moved,
        "done_ratio": f64::from(progress.done_ppm) / 1e6,
        "keys_remaining": progress.keys_remaining,
        "bytes_remaining": progress.bytes_remaining,
        "eta_ms": progress.eta_ms,
        "ranges_done": progress.ranges_done,
        "ranges_total": progress.ranges_total,
        "age_ms": progress.age_ms,
        "stalled_ms": progress.stalled_ms,
        "stalled_why": progress.stalled_why,
    })
}

fn worker(worker: &pb::WorkerStatus) -> Value {
    json!({
        "name": worker.name,
        "state": worker.state,
        "rounds": worker.rounds,
        "failures": worker.failures,
        "consecutive_failures": worker.consecutive_failures,
        "last_error": worker.last_error,
        "last_error_unix_ms": worker.last_error_unix_ms,
        "last_success_unix_ms": worker.last_success_unix_ms,
    })
}
