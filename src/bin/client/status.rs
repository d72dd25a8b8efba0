//! The `status` command's table, like `nodetool status`: every member the
//! asked node knows, its state, counts, clock and skew.

use dkvs::pb;

/// Age from which a member's counts are shown as old (four default
/// heartbeat intervals).
const STALE_COUNTS_MS: u64 = 2_000;

/// The table: one line per member, up or down.
pub fn status_table(status: &pb::StatusResponse) -> String {
    let mut table = format!(
        "DKVS cluster as seen by {} — {} members, N={} replicas, W={} R={} (quorum), {} vnodes per node\n\n",
        status.address,
        status.members.len(),
        status.replicas,
        status.write_quorum,
        status.read_quorum,
        status.vnodes
    );
    table.push_str(&format!(
        "{:<22} {:<17} {:<5} {:>5} {:>10} {:>10} {:>7} {:>19} {:>8} {:>9}  {}\n",
        "ADDRESS",
        "NODE ID",
        "STATE",
        "PHI",
        "LIVE KEYS",
        "TOMBSTONES",
        "HINTS",
        "HLC",
        "SKEW",
        "UPTIME",
        "NOTE"
    ));
    for member in &status.members {
        let up = member.state == pb::MemberState::Up as i32;
        let (keys, tombstones, hints, lamport, uptime) = match &member.stats {
            Some(s) => (
                s.live_keys.to_string(),
                s.tombstones.to_string(),
                s.hints_pending.to_string(),
                s.lamport.to_string(),
                format!("{}s", s.uptime_ms / 1000),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        let note = if member.address == status.address {
            "(this node)".to_string()
        } else {
            let mut note = member.error.clone();
            // Counts come from the member's last answered heartbeat: say so
            // once they are older than a few heartbeats.
            if member.stats.is_some() && member.stats_age_ms >= STALE_COUNTS_MS {
                if !note.is_empty() {
                    note.push_str("; ");
                }
                note.push_str(&format!(
                    "counts from {:.1}s ago",
                    member.stats_age_ms as f64 / 1000.0
                ));
            }
            note
        };
        // The member's clock minus the asked node's, from heartbeats.
        let skew = if member.address == status.address {
            "-".to_string()
        } else {
            format!("{:+}ms", member.clock_skew_ms)
        };
        table.push_str(&format!(
            "{:<22} {:016x}  {:<5} {:>5.1} {:>10} {:>10} {:>7} {:>19} {:>8} {:>9}  {}\n",
            member.address,
            member.node_id,
            if up { "UP" } else { "DOWN" },
            member.phi.min(99.9),
            keys,
            tombstones,
            hints,
            lamport,
            skew,
            uptime,
            note
        ));
    }
    table
}
