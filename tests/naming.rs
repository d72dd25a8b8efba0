//! Naming the instance each member votes as, with real processes: the
//! first members are named right after bootstrap, and a member that lost
//! its data dir is renamed by the others once it caught up (its old
//! instance on the removed list), after which it votes again. A recorded
//! workload runs throughout and is checked with the value checker.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{TestCluster, eventually};
use dkvs::pb;

/// Quick anti-entropy: a wiped member catches up (and is renamed) soon.
const FLAGS: &[&str] = &["--anti-entropy-interval", "1"];

/// The layout node `observer` serves.
fn named(layout: &pb::Layout, address: &str) -> u64 {
    layout
        .members
        .iter()
        .find(|m| m.address == address)
        .map_or(0, |m| m.instance_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_members_are_named_right_after_bootstrap() {
    let cluster = TestCluster::start_with(3, FLAGS).await;
    let v2 = cluster.layout(0).await;
    assert_eq!((v2.version, v2.change.as_str()), (2, "instances named"));
    for i in 0..3 {
        let own = cluster.status(i).await.instance_id;
        assert_ne!(own, 0);
        assert_eq!(named(&v2, &cluster.nodes[i].address), own, "node {i}");
    }
    assert!(v2.removed.is_empty());
}

/// A first member loses its data dir and comes back at its address with
/// `--peers`: it is a new instance, so it does not vote with its empty
/// acceptor until the others name it; once it caught up they do, its old
/// instance goes on the removed list, `cluster wait` returns 0, and it
/// votes: a join commits with another first member down, which needs the
/// renamed member's vote (2 of 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_member_is_renamed_by_the_others_and_then_votes() {
    let mut cluster = TestCluster::start_with(3, FLAGS).await;
    common::preload(&cluster.client().await, 300).await;
    let load = common::Load::start(&cluster).await;
    let address = cluster.nodes[2].address.clone();
    let old = cluster.status(2).await.instance_id;
    cluster.kill(2);
    cluster.wipe(2);
    cluster.restart(2).await;
    let new = cluster.status(2).await.instance_id;
    assert_ne!(new, old, "a wiped data dir is a new instance");

    let renamed = eventually(Duration::from_secs(60), async || {
        let layout = cluster.layout(0).await;
        if named(&layout, &address) == new {
            Ok(layout)
        } else {
            Err(format!(
                "v{} ({}) names {:x}, the new instance is {new:x}",
                layout.version,
                layout.change,
                named(&layout, &address)
            ))
        }
    })
    .await;
    assert_eq!(renamed.change, "instances named");
    let removed = renamed
        .removed
        .iter()
        .find(|r| r.address == address && r.instance_id == old)
        .unwrap_or_else(|| panic!("the old instance is on the removed list: {renamed:?}"));
    assert_eq!(
        removed.why,
        "replaced by a new instance (its data dir was lost)"
    );

    let nodes = cluster.addresses().join(",");
    let wait = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
            .args(["--nodes", &nodes, "cluster", "wait", "--timeout-secs", "30"])
            .output()
            .expect("run DKVSClient")
    })
    .await
    .expect("the client task");
    assert_eq!(
        wait.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&wait.stdout)
    );

    // Two of three acceptors: node 1 and the renamed node 2.
    cluster.kill(0);
    let joiner = cluster.join(1, FLAGS).await;
    let joined = cluster.layout(1).await;
    assert!(
        joined
            .members
            .iter()
            .any(|m| m.address == cluster.nodes[joiner].address),
        "the join committed: {joined:?}"
    );
    cluster.restart(0).await;
    load.check(&cluster).await;
}
