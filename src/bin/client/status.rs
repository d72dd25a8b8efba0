//! The `status` command's table, like `nodetool status`: the layout the
//! asked node serves and the change in progress, then every member it
//! knows with its state, counts, clock, skew and the layout version it
//! serves, then a line per worker of the asked node that keeps failing
//! (nothing when none does), then, while data moves to a joining node, its
//! progress. `status --workers` adds the table of the asked node's workers.

use dkvs::pb;

/// Age from which a member's counts are shown as old (four default
/// heartbeat intervals).
const STALE_COUNTS_MS: u64 = 2_000;

/// Failed rounds in a row from which `status` names a worker as failing
/// (one or two may be a blip: a peer restarting, a slow disk).
const FAILING_ROUNDS_MIN: u32 = 3;

/// The whole answer: the header, the layout line, the member table, the
/// workers failing and, during a join, the table of data moving. `now_ms`
/// (unix ms) dates the workers' last errors.
pub fn status_table(status: &pb::StatusResponse, now_ms: u64) -> String {
    let mut table = format!(
        "DKVS cluster as seen by {} — {} members, N={} replicas, W={} R={} (quorum), {} vnodes per node\n",
        status.address,
        status.members.len(),
        status.replicas,
        status.write_quorum,
        status.read_quorum,
        status.vnodes
    );
    if let Some(layout) = &status.layout {
        table.push_str(&layout_line(layout));
        table.push('\n');
        // Instances that may not come back (they stop if they do).
        for removed in &layout.removed {
            table.push_str(&format!(
                "removed: {} (instance {}, v{}: {})\n",
                removed.address,
                dkvs::clock::InstanceId(removed.instance_id),
                removed.version,
                removed.why
            ));
        }
    }
    table.push('\n');
    table.push_str(&format!(
        "{:<22} {:<17} {:<7} {:>5} {:>10} {:>10} {:>7} {:>19} {:>8} {:>9} {:>6}  {}\n",
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
        "LAYOUT",
        "NOTE"
    ));
    for member in &status.members {
        table.push_str(&member_row(&status.address, member));
    }
    for lines in [failing_lines(status, now_ms), fork_lines(status)] {
        if !lines.is_empty() {
            table.push('\n');
            table.push_str(&lines);
        }
    }
    if !status.moves.is_empty() {
        let joining = status.layout.as_ref().is_some_and(|l| {
            l.members.iter().all(|m| {
                m.role != pb::LayoutRole::Leaving as i32
                    && m.role != pb::LayoutRole::Removing as i32
            })
        });
        table.push('\n');
        table.push_str(&moves_table(&status.moves, joining));
    }
    // No blanks after an empty NOTE.
    without_trailing_blanks(&table)
}

/// One member's row of the table, as `asked` (the answering node) sees it.
fn member_row(asked: &str, member: &pb::Member) -> String {
    let (keys, tombstones, hints, hlc, uptime) = match &member.stats {
        Some(s) => (
            s.live_keys.to_string(),
            s.tombstones.to_string(),
            s.hints_pending.to_string(),
            s.lamport.to_string(),
            format!("{}s", s.uptime_ms / 1000),
        ),
        None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
    };
    let itself = member.address == asked;
    let note = if itself {
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
    // What a member refuses, whoever it is.
    let mut notes: Vec<String> = vec![note].into_iter().filter(|n| !n.is_empty()).collect();
    if let Some(stats) = member.stats.as_ref() {
        if stats.data_quota_reached {
            notes.push("DATA QUOTA REACHED: new values refused".into());
        }
        if stats.requests_shed > 0 {
            notes.push(format!("{} requests shed since start", stats.requests_shed));
        }
    }
    let note = notes.join("; ");
    // The member's clock minus the asked node's, from heartbeats.
    let skew = if itself {
        "-".to_string()
    } else {
        format!("{:+}ms", member.clock_skew_ms)
    };
    format!(
        "{:<22} {:016x}  {:<7} {:>5.1} {:>10} {:>10} {:>7} {:>19} {:>8} {:>9} {:>6}  {}\n",
        member.address,
        member.node_id,
        state_name(member.state),
        member.phi.min(99.9),
        keys,
        tombstones,
        hints,
        hlc,
        skew,
        uptime,
        served_version(member.layout_version),
        note
    )
}

/// A line per worker of the asked node that failed rounds in a row (empty
/// when all are healthy).
fn failing_lines(status: &pb::StatusResponse, now_ms: u64) -> String {
    status
        .workers
        .iter()
        .filter(|w| w.consecutive_failures >= FAILING_ROUNDS_MIN)
        .map(|w| failing_line(&status.address, w, now_ms) + "\n")
        .collect()
}

/// A line per peer serving another layout at the asked node's version
/// (empty when the cluster has one layout, as it must).
fn fork_lines(status: &pb::StatusResponse) -> String {
    status
        .layout_forks
        .iter()
        .map(|fork| {
            format!(
                "LAYOUT FORK: {} serves another layout at v{} ({:016x}) than {} ({:016x}); the cluster has two member lists at one version\n",
                fork.peer, fork.version, fork.theirs, status.address, fork.mine
            )
        })
        .collect()
}

/// Each line of `text` without the blanks at its end.
fn without_trailing_blanks(text: &str) -> String {
    text.lines()
        .map(|l| format!("{}\n", l.trim_end()))
        .collect()
}

/// One worker that keeps failing, for the operator: which, where, since
/// how many rounds, and why.
fn failing_line(address: &str, worker: &pb::WorkerStatus, now_ms: u64) -> String {
    format!(
        "worker {} on {address} failing: {} rounds in a row, last error {}: {}",
        worker.name,
        worker.consecutive_failures,
        ago(worker.last_error_unix_ms, now_ms),
        worker.last_error
    )
}

/// `2.5s ago` (`3m05s ago` from a minute) for a unix-ms time `now_ms` is
/// that far past; `never` for 0.
fn ago(at_ms: u64, now_ms: u64) -> String {
    let age_ms = now_ms.saturating_sub(at_ms);
    match at_ms {
        0 => "never".into(),
        _ if age_ms < 60_000 => format!("{:.1}s ago", age_ms as f64 / 1000.0),
        _ => format!("{} ago", duration(age_ms)),
    }
}

/// `status --workers`: every periodic worker of the node that answered,
/// with its state, rounds, failures (in all and in a row), last success
/// and last error.
pub fn workers_table(status: &pb::StatusResponse, now_ms: u64) -> String {
    if status.workers.is_empty() {
        return format!(
            "Workers on {}: none reported (a node of an older version)\n",
            status.address
        );
    }
    let mut table = format!("Workers on {}:\n", status.address);
    table.push_str(&format!(
        "{:<14} {:<12} {:>8} {:>9} {:>9} {:>13}  {}\n",
        "WORKER", "STATE", "ROUNDS", "FAILURES", "IN A ROW", "LAST SUCCESS", "LAST ERROR"
    ));
    for worker in &status.workers {
        let last_error = if worker.last_error_unix_ms == 0 {
            "-".to_string()
        } else {
            format!(
                "{}: {}",
                ago(worker.last_error_unix_ms, now_ms),
                worker.last_error
            )
        };
        table.push_str(&format!(
            "{:<14} {:<12} {:>8} {:>9} {:>9} {:>13}  {}\n",
            worker.name,
            worker.state,
            worker.rounds,
            worker.failures,
            worker.consecutive_failures,
            ago(worker.last_success_unix_ms, now_ms),
            last_error
        ));
    }
    without_trailing_blanks(&table)
}

/// The STATE column: UP, DOWN, or JOINING (in the layout as joining and
/// reachable: it takes writes and receives its ranges, answers no read yet).
pub fn state_name(state: i32) -> &'static str {
    match pb::MemberState::try_from(state) {
        Ok(pb::MemberState::Up) => "UP",
        Ok(pb::MemberState::Joining) => "JOINING",
        Ok(pb::MemberState::Leaving) => "LEAVING",
        Ok(pb::MemberState::Down) => "DOWN",
        _ => "?",
    }
}

/// The LAYOUT column: the version a member serves as of its last
/// heartbeat (`-` until one was answered).
fn served_version(version: u64) -> String {
    if version == 0 {
        "-".into()
    } else {
        format!("v{version}")
    }
}

/// One line on the layout: its version and the change in progress, or the
/// last change when none is.
pub fn layout_line(layout: &pb::Layout) -> String {
    let joining: Vec<&str> = layout
        .members
        .iter()
        .filter(|m| m.role == pb::LayoutRole::Joining as i32)
        .map(|m| m.address.as_str())
        .collect();
    let version = layout.version;
    let leaving = layout.members.iter().any(|m| {
        m.role == pb::LayoutRole::Leaving as i32 || m.role == pb::LayoutRole::Removing as i32
    });
    if leaving && layout.previous.is_empty() {
        // Which members still have to stream (the pure rules say).
        let waiting = dkvs::pb::layout_from(layout.clone())
            .map(|l| l.waiting_for_streams())
            .unwrap_or_default();
        let why = if waiting.is_empty() {
            "reads move next".to_string()
        } else {
            format!(
                "waiting for {} to stream the ranges they take",
                waiting.join(", ")
            )
        };
        format!(
            "Layout v{version}, change in progress: {} ({why}; writes go to the old and the new replica sets, reads to the old)",
            layout.change
        )
    } else if !joining.is_empty() {
        format!(
            "Layout v{version}, change in progress: {} (streaming {} ranges; writes go to the old and the new replica sets, reads to the old)",
            layout.change,
            if joining.len() == 1 { "its" } else { "their" }
        )
    } else if !layout.previous.is_empty() {
        format!(
            "Layout v{version}, change in progress: {} (the old replica sets get writes too until every member serves v{version})",
            layout.change
        )
    } else {
        format!(
            "Layout v{version}, no change in progress (last change: {})",
            layout.change
        )
    }
}

/// The data moving to joining nodes: done, moved, and estimates of what is
/// left from the rate so far.
fn moves_table(moves: &[pb::MoveProgress], joining: bool) -> String {
    let mut table = String::from(if joining {
        "Data moving to joining nodes (what is left is estimated from the rate so far):\n"
    } else {
        "Data moving to the members taking ranges (what is left is estimated from the rate so far):\n"
    });
    table.push_str(&format!(
        "{:<22} {:>7} {:>12} {:>12} {:>12} {:>12} {:>10}  {}\n",
        if joining { "JOINING" } else { "TAKING" },
        "DONE",
        "KEYS MOVED",
        "BYTES MOVED",
        "KEYS LEFT",
        "BYTES LEFT",
        "TIME LEFT",
        "NOTE"
    ));
    for progress in moves {
        // Estimates are 0 both when done and when not yet known (the node
        // extrapolates only once keys moved and 1% is done).
        let known = progress.done_ppm >= 1_000_000
            || (progress.keys_moved > 0 && progress.done_ppm >= 10_000);
        let estimate = |text: String| {
            if known {
                format!("~{text}")
            } else {
                "?".into()
            }
        };
        let mut notes = Vec::new();
        if progress.stalled_ms > 0 {
            notes.push(format!(
                "stalled {}: {}",
                duration(progress.stalled_ms),
                progress.stalled_why
            ));
        }
        if progress.age_ms >= STALE_COUNTS_MS {
            notes.push(format!(
                "reported {:.1}s ago",
                progress.age_ms as f64 / 1000.0
            ));
        }
        let note = notes.join("; ");
        table.push_str(&format!(
            "{:<22} {:>7} {:>12} {:>12} {:>12} {:>12} {:>10}  {}\n",
            progress.address,
            percent(progress.done_ppm),
            progress.keys_moved,
            bytes(progress.bytes_moved),
            estimate(progress.keys_remaining.to_string()),
            estimate(bytes(progress.bytes_remaining)),
            estimate(duration(progress.eta_ms)),
            note
        ));
    }
    table
}

/// Millionths as a percentage with one decimal.
pub fn percent(ppm: u32) -> String {
    format!("{:.1}%", f64::from(ppm.min(1_000_000)) / 10_000.0)
}

/// A byte count in B, KiB, MiB or GiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Milliseconds as `45s`, `3m05s` or `2h07m`.
pub fn duration(ms: u64) -> String {
    let seconds = ms.div_ceil(1000);
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(address: &str, state: pb::MemberState, layout_version: u64) -> pb::Member {
        pb::Member {
            address: address.into(),
            node_id: 1,
            state: state as i32,
            layout_version,
            ..Default::default()
        }
    }

    fn layout_member(address: &str, role: pb::LayoutRole) -> pb::LayoutMember {
        pb::LayoutMember {
            address: address.into(),
            member_id: 1,
            role: role as i32,
            tokens: vec![1],
            ..Default::default()
        }
    }

    #[test]
    // One piece: one status table built once, then checked part by part.
    fn a_join_in_progress_shows_in_the_layout_line_the_rows_and_the_moves() {
        let status = pb::StatusResponse {
            address: "a:1".into(),
            replicas: 3,
            vnodes: 8,
            write_quorum: 2,
            read_quorum: 2,
            members: vec![
                member("a:1", pb::MemberState::Up, 2),
                member("b:1", pb::MemberState::Down, 1),
                member("c:1", pb::MemberState::Joining, 2),
                member("d:1", pb::MemberState::Up, 0),
            ],
            layout: Some(pb::Layout {
                version: 2,
                members: vec![
                    layout_member("a:1", pb::LayoutRole::Active),
                    layout_member("c:1", pb::LayoutRole::Joining),
                ],
                change: "c:1 joins".into(),
                ..Default::default()
            }),
            moves: vec![
                pb::MoveProgress {
                    address: "c:1".into(),
                    keys_moved: 1200,
                    bytes_moved: 3 << 20,
                    done_ppm: 250_000,
                    keys_remaining: 3600,
                    bytes_remaining: 9 << 20,
                    eta_ms: 125_000,
                    age_ms: 2500,
                    ..Default::default()
                },
                pb::MoveProgress {
                    address: "e:1".into(),
                    stalled_ms: 40_000,
                    stalled_why: "b:1: unreachable (tcp connect error)".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let table = status_table(&status, 0);
        assert!(
            table.contains("Layout v2, change in progress: c:1 joins (streaming its ranges;"),
            "{table}"
        );
        let row = |address: &str| -> Vec<String> {
            table
                .lines()
                .find(|l| l.starts_with(address))
                .unwrap_or_else(|| panic!("no row for {address}:\n{table}"))
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        assert_eq!(row("c:1")[2], "JOINING");
        assert_eq!(row("b:1")[2], "DOWN");
        // LAYOUT is the column before NOTE: v2, v1, or - when unknown.
        assert_eq!(row("a:1")[10], "v2");
        assert_eq!(row("b:1")[10], "v1");
        assert_eq!(row("d:1")[10], "-");
        let moving = table
            .lines()
            .skip_while(|l| !l.starts_with("Data moving"))
            .collect::<Vec<_>>();
        assert!(moving[1].starts_with("JOINING"), "{table}");
        assert_eq!(
            moving[2].split_whitespace().collect::<Vec<_>>(),
            [
                "c:1", "25.0%", "1200", "3.0", "MiB", "~3600", "~9.0", "MiB", "~2m05s", "reported",
                "2.5s", "ago"
            ]
        );
        // Nothing streamed yet: the estimates are not known; and why
        // streaming is stuck.
        assert_eq!(
            moving[3].split_whitespace().collect::<Vec<_>>(),
            [
                "e:1",
                "0.0%",
                "0",
                "0",
                "B",
                "?",
                "?",
                "?",
                "stalled",
                "40s:",
                "b:1:",
                "unreachable",
                "(tcp",
                "connect",
                "error)"
            ]
        );
    }

    #[test]
    fn a_finished_join_and_a_settled_layout_say_so() {
        let mut layout = pb::Layout {
            version: 3,
            members: vec![layout_member("a:1", pb::LayoutRole::Active)],
            previous: vec!["a:1".into()],
            change: "c:1 finished joining".into(),
            ..Default::default()
        };
        assert_eq!(
            layout_line(&layout),
            "Layout v3, change in progress: c:1 finished joining (the old replica sets get writes too until every member serves v3)"
        );
        layout.version = 4;
        layout.previous.clear();
        layout.change = "move settled".into();
        assert_eq!(
            layout_line(&layout),
            "Layout v4, no change in progress (last change: move settled)"
        );
    }

    fn worker(name: &str, consecutive_failures: u32, last_error: &str) -> pb::WorkerStatus {
        pb::WorkerStatus {
            name: name.into(),
            rounds: 40,
            failures: u64::from(consecutive_failures) + 1,
            consecutive_failures,
            last_error: last_error.into(),
            last_error_unix_ms: if last_error.is_empty() { 0 } else { 97_000 },
            last_success_unix_ms: 90_000,
            state: if consecutive_failures > 1 {
                "backing off"
            } else {
                "idle"
            }
            .into(),
        }
    }

    fn two_members() -> pb::StatusResponse {
        pb::StatusResponse {
            address: "a:1".into(),
            members: vec![
                member("a:1", pb::MemberState::Up, 1),
                member("b:1", pb::MemberState::Down, 1),
            ],
            moves: vec![pb::MoveProgress {
                address: "c:1".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn healthy_workers_add_nothing_to_status() {
        let bare = status_table(&two_members(), 100_000);
        let mut status = two_members();
        status.workers = vec![
            worker("heartbeats", 0, ""),
            worker("anti-entropy", 2, "no anti-entropy exchange completed"),
        ];
        assert_eq!(status_table(&status, 100_000), bare);
    }

    #[test]
    fn a_layout_fork_is_named_after_the_member_table() {
        let mut status = two_members();
        status.layout_forks = vec![pb::LayoutFork {
            peer: "b:2".into(),
            version: 7,
            mine: 0xaa,
            theirs: 0xbb,
        }];
        let table = status_table(&status, 100_000);
        assert!(
            table.lines().any(|l| l
                == "LAYOUT FORK: b:2 serves another layout at v7 (00000000000000bb) than a:1 (00000000000000aa); the cluster has two member lists at one version"),
            "{table}"
        );
        assert!(!status_table(&two_members(), 100_000).contains("FORK"));
    }

    #[test]
    fn a_worker_failing_rounds_in_a_row_is_named_after_the_member_table() {
        let mut status = two_members();
        status.workers = vec![
            worker("heartbeats", 5, "no peer answered a heartbeat (1 asked)"),
            worker("fsync", 1, "sync failed"),
        ];
        let table = status_table(&status, 100_000);
        let lines: Vec<&str> = table.lines().collect();
        let failing = lines
            .iter()
            .position(|l| l.starts_with("worker "))
            .unwrap_or_else(|| panic!("no failing worker line:\n{table}"));
        assert_eq!(
            lines[failing],
            "worker heartbeats on a:1 failing: 5 rounds in a row, last error 3.0s ago: no peer answered a heartbeat (1 asked)"
        );
        assert!(
            lines[failing - 2].starts_with("b:1"),
            "after the members:\n{table}"
        );
        assert_eq!(lines[failing - 1], "");
        assert!(lines[failing + 2].starts_with("Data moving"), "{table}");
        assert_eq!(
            table.matches("worker ").count(),
            1,
            "fsync failed once only"
        );
    }

    #[test]
    fn status_workers_lists_every_worker() {
        let mut status = two_members();
        status.workers = vec![
            worker("heartbeats", 0, ""),
            worker(
                "anti-entropy",
                4,
                "no anti-entropy exchange completed (2 tried)",
            ),
        ];
        let table = workers_table(&status, 100_000);
        let lines: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines[0], ["Workers", "on", "a:1:"]);
        assert_eq!(lines[1][0], "WORKER");
        assert_eq!(
            lines[2],
            ["heartbeats", "idle", "40", "1", "0", "10.0s", "ago", "-"]
        );
        assert_eq!(
            lines[3][..10],
            [
                "anti-entropy",
                "backing",
                "off",
                "40",
                "5",
                "4",
                "10.0s",
                "ago",
                "3.0s",
                "ago:"
            ]
        );
        assert!(table.ends_with("(2 tried)\n"), "{table}");
        assert_eq!(ago(1, 185_001), "3m05s ago");
        status.workers.clear();
        assert!(workers_table(&status, 0).contains("none reported"));
    }

    #[test]
    fn sizes_and_durations_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(1), "1s");
        assert_eq!(duration(59_000), "59s");
        assert_eq!(duration(185_000), "3m05s");
        assert_eq!(duration(7_620_000), "2h07m");
        assert_eq!(percent(1_000_000), "100.0%");
        assert_eq!(percent(123_456), "12.3%");
    }
}
