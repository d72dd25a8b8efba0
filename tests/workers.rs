//! The node's periodic workers report their failures: a worker that keeps
//! failing for real shows in `Cluster.Status` and in `DKVSClient status`.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{TestCluster, eventually};

/// `DKVSClient --nodes <address> args...`: asks that node only.
fn client(address: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
        .args(["--nodes", address])
        .args(args)
        .output()
        .expect("run DKVSClient")
}

/// The stdout of a `DKVSClient` run that must succeed.
fn stdout(output: Output) -> Result<String, String> {
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    match output.status.code() {
        Some(0) => Ok(text),
        code => Err(format!(
            "exit {code:?}: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        )),
    }
}

/// The row of `worker` in `status --workers`, split on blanks.
fn worker_row(table: &str, worker: &str) -> Option<Vec<String>> {
    table
        .lines()
        .find(|l| l.starts_with(worker))
        .map(|l| l.split_whitespace().map(String::from).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_that_no_peer_answers_show_as_a_failing_worker_in_status() {
    let mut cluster = TestCluster::start(3).await;
    let survivor = cluster.nodes[0].address.clone();

    // Healthy: every worker listed, none named as failing (the first
    // heartbeats may fail while the peers start).
    let workers = eventually(Duration::from_secs(20), async || {
        let workers = stdout(client(&survivor, &["status", "--workers"]))?;
        if workers.contains("\nworker ") {
            return Err(format!("a worker is failing:\n{workers}"));
        }
        Ok(workers)
    })
    .await;
    for name in ["heartbeats", "hint delivery", "anti-entropy", "membership"] {
        assert!(worker_row(&workers, name).is_some(), "{name}:\n{workers}");
    }
    let healthy = stdout(client(&survivor, &["status"])).expect("status");
    assert!(!healthy.contains("Workers on"), "{healthy}");

    // Both peers gone: no heartbeat of the survivor is answered, and each
    // round of its heartbeats worker fails.
    cluster.kill(1);
    cluster.kill(2);
    let workers = eventually(Duration::from_secs(30), async || {
        let workers = stdout(client(&survivor, &["status", "--workers"]))?;
        let row = worker_row(&workers, "heartbeats").ok_or(format!("no row:\n{workers}"))?;
        // WORKER STATE ROUNDS FAILURES IN-A-ROW ...
        let in_a_row: u32 = row[4].parse().map_err(|_| workers.clone())?;
        if in_a_row < 5 {
            return Err(format!("not failing yet:\n{workers}"));
        }
        Ok(workers)
    })
    .await;
    let row = worker_row(&workers, "heartbeats").expect("heartbeats row");
    assert_eq!(row[1], "idle", "heartbeats never back off:\n{workers}");
    let failures: u64 = row[3].parse().expect("failures");
    assert!(failures >= 5, "{workers}");
    assert!(
        workers.contains("no peer answered a heartbeat (2 asked)"),
        "{workers}"
    );

    let status = stdout(client(&survivor, &["status"])).expect("status");
    let failing = status
        .lines()
        .find(|l| l.starts_with("worker heartbeats on "))
        .unwrap_or_else(|| panic!("no failing line:\n{status}"));
    assert!(
        failing.starts_with(&format!("worker heartbeats on {survivor} failing: ")),
        "{failing}"
    );
    assert!(
        failing.contains(" rounds in a row, last error "),
        "{failing}"
    );
    assert!(
        failing.contains("no peer answered a heartbeat (2 asked)"),
        "{failing}"
    );
    // The line comes after the member table, once per failing worker.
    let lines: Vec<&str> = status.lines().collect();
    let members_end = lines
        .iter()
        .rposition(|l| {
            cluster
                .addresses()
                .iter()
                .any(|a| l.starts_with(a.as_str()))
        })
        .expect("member rows");
    let failing_at = lines
        .iter()
        .position(|l| *l == failing)
        .expect("failing line");
    assert!(failing_at > members_end, "{status}");

    // A peer back: heartbeats succeed again, and status says nothing more.
    cluster.restart(1).await;
    eventually(Duration::from_secs(30), async || {
        let status = stdout(client(&survivor, &["status"]))?;
        match status.contains("\nworker heartbeats") {
            true => Err(format!("still failing:\n{status}")),
            false => Ok(()),
        }
    })
    .await;
}
