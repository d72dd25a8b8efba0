//! Abandoning a join, with real processes: `DKVSClient cluster abort`
//! while a node is still joining (dead, wiped, or alive), the aborted
//! instance stopping with exit 0 when it comes back, the refusal once reads
//! have moved, and an abort that commits with a member down and a dead
//! joiner (joiners do not vote). A recorded workload runs through the
//! membership changes and is checked with the value checker.

mod common;

use std::process::Output;
use std::time::Duration;

use common::{TestCluster, eventually};
use dkvs::pb;

/// Quick anti-entropy, as in the membership tests.
const FLAGS: &[&str] = &["--anti-entropy-interval", "1"];

/// A joiner that streams slowly, so that it is still joining when the test
/// acts (the preload below takes it several seconds).
const SLOW_JOINER: &[&str] = &["--anti-entropy-interval", "1", "--stream-rate", "100"];

/// Keys written before a join: data for it to move.
const PRELOADED: usize = 600;

/// Runs `DKVSClient --nodes <running nodes> args...`.
async fn dkvs_client(cluster: &TestCluster, args: &[&str]) -> Output {
    cluster.run_client(args).await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits until the joining node `joiner` reports keys moved.
async fn streaming(cluster: &TestCluster, joiner: usize) {
    eventually(Duration::from_secs(30), async || {
        let status = cluster.status(joiner).await;
        match status.moves.first() {
            Some(progress) if progress.keys_moved > 0 => Ok(()),
            _ => Err(format!("no progress yet: {:?}", status.moves)),
        }
    })
    .await;
}

/// The layout node `observer` serves.
fn role_of(layout: &pb::Layout, address: &str) -> Option<i32> {
    layout
        .members
        .iter()
        .find(|m| m.address == address)
        .map(|m| m.role)
}

/// The reproduction: a joiner killed with -9 while JOINING and its data
/// dir deleted. Before abort existed the change could not be undone:
/// `cluster wait` never returned 0 and every later join was refused. Now
/// `cluster abort` exits 0, `cluster wait` exits 0, the same address joins
/// again with a fresh dir, and no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_wiped_joiner_is_aborted_and_the_next_join_succeeds() {
    let mut cluster = TestCluster::start_with(3, FLAGS).await;
    common::preload(&cluster.client().await, PRELOADED).await;
    let load = common::Load::start(&cluster).await;
    let joiner = cluster.join(0, SLOW_JOINER).await;
    let address = cluster.nodes[joiner].address.clone();
    streaming(&cluster, joiner).await;
    cluster.kill(joiner);
    cluster.wipe(joiner);
    let joining = cluster.layout(0).await;
    assert_eq!(
        role_of(&joining, &address),
        Some(pb::LayoutRole::Joining as i32)
    );
    let instance = joining
        .members
        .iter()
        .find(|m| m.address == address)
        .map(|m| m.instance_id)
        .expect("joiner");
    assert_ne!(instance, 0, "the layout names the joiner's instance");

    // The change is stuck: nothing settles, and another join is refused.
    let wait = dkvs_client(&cluster, &["cluster", "wait", "--timeout-secs", "2"]).await;
    assert_eq!(wait.status.code(), Some(3), "{}", text(&wait.stdout));
    let refused = cluster
        .membership(1)
        .await
        .join(pb::JoinRequest {
            address: "127.0.0.1:9".into(),
            ..Default::default()
        })
        .await
        .expect_err("one change at a time");
    assert!(refused.message().contains(&format!("{address} joins")));

    let abort = dkvs_client(&cluster, &["cluster", "abort"]).await;
    assert_eq!(
        abort.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        text(&abort.stdout),
        text(&abort.stderr)
    );
    assert!(
        text(&abort.stdout).contains(&format!("{address} join aborted")),
        "{}",
        text(&abort.stdout)
    );
    let wait = dkvs_client(&cluster, &["cluster", "wait", "--timeout-secs", "30"]).await;
    assert_eq!(
        wait.status.code(),
        Some(0),
        "{}{}",
        text(&wait.stdout),
        text(&wait.stderr)
    );
    let aborted = cluster.layout(1).await;
    assert_eq!(role_of(&aborted, &address), None);
    assert!(
        aborted
            .removed
            .iter()
            .any(|r| r.address == address && r.instance_id == instance && r.why == "join aborted")
    );
    let status = dkvs_client(&cluster, &["status"]).await;
    assert!(
        text(&status.stdout).contains(&format!(
            "removed: {address} (instance {instance:016x}, v{}: join aborted)",
            aborted.version
        )),
        "{}",
        text(&status.stdout)
    );

    // The same address, a fresh data dir: a new instance joins.
    cluster.add_flags(joiner, &["--stream-rate", "0"]);
    cluster.restart(joiner).await;
    let wait = dkvs_client(&cluster, &["cluster", "wait", "--timeout-secs", "40"]).await;
    assert_eq!(
        wait.status.code(),
        Some(0),
        "{}{}",
        text(&wait.stdout),
        text(&wait.stderr)
    );
    let grown = cluster.layout(0).await;
    let member = grown
        .members
        .iter()
        .find(|m| m.address == address)
        .expect("joined again");
    assert_eq!(member.role, pb::LayoutRole::Active as i32);
    assert_ne!(member.instance_id, instance, "as a new instance");
    load.check(&cluster).await;
    common::preloaded_at_all(&cluster, PRELOADED).await;
}

/// The aborted instance: alive, it learns the abort and exits 0; restarted
/// from its kept data dir, it exits 0 again with the message, and serves
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_instance_stops_with_exit_0_and_says_why() {
    let mut cluster = TestCluster::start_with(3, FLAGS).await;
    common::preload(&cluster.client().await, PRELOADED).await;
    let joiner = cluster.join(0, SLOW_JOINER).await;
    streaming(&cluster, joiner).await;
    let aborted = cluster
        .cluster(1)
        .await
        .abort(pb::AbortRequest {})
        .await
        .expect("abort while joining");
    assert_eq!(
        dkvs::error::Outcome::of(aborted.metadata()),
        Some(dkvs::error::Outcome::Applied)
    );
    let version = aborted.into_inner().layout.expect("layout").version;
    let message = format!(
        "this node's join was aborted (layout v{version}); wipe its data dir and --join again"
    );
    let exited = cluster.wait_exit(joiner, Duration::from_secs(20)).await;
    assert_eq!(exited.code(), Some(0), "{}", cluster.log_tail_of(joiner));
    assert!(
        cluster.log_tail_of(joiner).contains(&message),
        "{}",
        cluster.log_tail_of(joiner)
    );
    // Again, from the kept data dir.
    std::fs::write(&cluster.nodes[joiner].log, "").expect("clear the log");
    cluster.start_only(joiner);
    let exited = cluster.wait_exit(joiner, Duration::from_secs(20)).await;
    assert_eq!(exited.code(), Some(0), "{}", cluster.log_tail_of(joiner));
    let log = cluster.log_tail_of(joiner);
    assert!(log.contains(&message), "{log}");
    // The members never took it back.
    let now = cluster.layout(0).await;
    assert_eq!(now.version, version);
    assert_eq!(role_of(&now, &cluster.nodes[joiner].address), None);
}

/// Once the joiner finished joining, reads use the new replica sets:
/// abort refuses with FAILED_PRECONDITION and says to run `cluster wait`
/// (exit 3 from the CLI). With nothing in progress it says so. (A member
/// kept down holds the move in "finished joining": settling waits for it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_is_refused_once_reads_moved_and_when_nothing_is_in_progress() {
    let mut cluster = TestCluster::start_with(3, FLAGS).await;
    let refused = cluster
        .cluster(0)
        .await
        .abort(pb::AbortRequest {})
        .await
        .expect_err("nothing to abort");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("nothing to abort"),
        "{}",
        refused.message()
    );
    common::preload(&cluster.client().await, PRELOADED).await;
    cluster.kill(2);
    let joiner = cluster.join(0, FLAGS).await;
    let address = cluster.nodes[joiner].address.clone();
    let finished = eventually(Duration::from_secs(40), async || {
        let layout = cluster.layout(0).await;
        if role_of(&layout, &address) == Some(pb::LayoutRole::Active as i32)
            && !layout.previous.is_empty()
        {
            Ok(layout)
        } else {
            Err(format!("v{}: {}", layout.version, layout.change))
        }
    })
    .await;
    let abort = dkvs_client(&cluster, &["cluster", "abort"]).await;
    let stderr = text(&abort.stderr);
    assert_eq!(abort.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("cluster wait") && stderr.contains(&format!("{address} finished joining")),
        "{stderr}"
    );
    assert_eq!(
        cluster.layout(0).await.version,
        finished.version,
        "nothing changed"
    );
    cluster.restart(2).await;
    let wait = dkvs_client(&cluster, &["cluster", "wait", "--timeout-secs", "40"]).await;
    assert_eq!(wait.status.code(), Some(0), "{}", text(&wait.stdout));
    common::preloaded_at_all(&cluster, PRELOADED).await;
}

/// Finding 6: three members, one of them down, and a dead joiner. Were
/// the joiner an acceptor, 2 of 4 voters would be alive and nothing could
/// commit; the active members vote, 2 of 3 is a majority, and the abort
/// commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_commits_with_a_member_down_and_a_dead_joiner() {
    let mut cluster = TestCluster::start_with(3, FLAGS).await;
    common::preload(&cluster.client().await, PRELOADED).await;
    let load = common::Load::start(&cluster).await;
    let joiner = cluster.join(0, SLOW_JOINER).await;
    let address = cluster.nodes[joiner].address.clone();
    streaming(&cluster, joiner).await;
    cluster.kill(joiner);
    cluster.kill(2);
    let abort = dkvs_client(&cluster, &["cluster", "abort"]).await;
    assert_eq!(
        abort.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        text(&abort.stdout),
        text(&abort.stderr)
    );
    for observer in [0, 1] {
        eventually(Duration::from_secs(10), async || {
            let layout = cluster.layout(observer).await;
            match role_of(&layout, &address) {
                None => Ok(()),
                Some(_) => Err(format!("node {observer} serves v{}", layout.version)),
            }
        })
        .await;
    }
    // The member comes back and learns the abort; reads at ALL need it.
    cluster.restart(2).await;
    let wait = dkvs_client(&cluster, &["cluster", "wait", "--timeout-secs", "30"]).await;
    assert_eq!(wait.status.code(), Some(0), "{}", text(&wait.stdout));
    load.check(&cluster).await;
    common::preloaded_at_all(&cluster, PRELOADED).await;
}
