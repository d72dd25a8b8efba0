//! Layouts that cannot be forged: a node adopts a layout it did not choose
//! itself only once a majority of the active members of the layout it
//! holds vouch that it was chosen. One `LayoutCommit` from a process that is
//! not a member once made every node adopt a layout pointing at ports where
//! nothing listens (364 of 366 writes failed); now it changes nothing.

mod common;

use std::time::Duration;

use common::{TestCluster, eventually};
use dkvs::pb;

/// The layout node `i` serves.
async fn layout_of(cluster: &TestCluster, i: usize) -> pb::Layout {
    cluster
        .status(i)
        .await
        .layout
        .expect("Status carries the layout")
}

/// `layout` moved `ahead` versions on, with the members at `moved` pointed
/// at addresses where nothing listens (member ids recomputed, tokens kept):
/// what an attacker who read one layout could send.
fn forged(layout: &pb::Layout, ahead: u64, moved: &[usize]) -> pb::Layout {
    let mut forged = layout.clone();
    forged.version += ahead;
    forged.change = "forged".into();
    for (n, &i) in moved.iter().enumerate() {
        let address = format!("127.0.0.1:{}", 9 + n);
        forged.members[i].address = address.clone();
        forged.members[i].member_id = dkvs::ring::member_id_for(&address).0;
    }
    forged.members.sort_by(|a, b| a.address.cmp(&b.address));
    forged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_layout_commit_from_a_non_member_changes_nothing() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client().await;
    for i in 0..50 {
        client
            .put(&format!("before-{i}"), format!("v{i}"))
            .await
            .expect("put before");
    }
    let honest = layout_of(&cluster, 0).await;

    // Ten versions ahead to one node, then one version ahead to every node.
    let mut attacker = cluster.membership(0).await;
    let refused = attacker
        .layout_commit(forged(&honest, 10, &[0, 1]))
        .await
        .expect_err("a forged layout must be refused");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("not confirmed by a majority"),
        "the refusal says why: {}",
        refused.message()
    );
    for i in 0..3 {
        let mut attacker = cluster.membership(i).await;
        let refused = attacker
            .layout_commit(forged(&honest, 1, &[1, 2]))
            .await
            .expect_err("a forged layout one version ahead must be refused too");
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
    }

    // Heartbeats spread a layout within a few intervals: give them time to
    // spread one, then check every node still serves the honest layout.
    let heartbeats_spread_layouts_within = Duration::from_millis(1500);
    let deadline = tokio::time::Instant::now() + heartbeats_spread_layouts_within;
    while tokio::time::Instant::now() < deadline {
        for i in 0..3 {
            let layout = layout_of(&cluster, i).await;
            assert_eq!(
                layout, honest,
                "node {i} serves another layout after a forged commit"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The cluster goes on serving: every write succeeds and every key reads.
    for i in 0..50 {
        client
            .put(&format!("after-{i}"), format!("w{i}"))
            .await
            .expect("put after a forged commit");
    }
    for i in 0..50 {
        let before = client.get(&format!("before-{i}")).await.expect("get");
        assert_eq!(before.as_deref(), Some(format!("v{i}").as_bytes()));
        let after = client.get(&format!("after-{i}")).await.expect("get");
        assert_eq!(after.as_deref(), Some(format!("w{i}").as_bytes()));
    }
    for i in 0..3 {
        assert!(
            cluster.status(i).await.layout_forks.is_empty(),
            "no fork is reported"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chosen_layout_reaches_every_member_and_each_vouches_for_it() {
    let mut cluster = TestCluster::start(3).await;
    let joined = cluster.join(0, &[]).await;
    // The join's layouts reach every node, each verified by the others.
    let everyone = eventually(Duration::from_secs(30), async || {
        let first = layout_of(&cluster, 0).await;
        for i in 1..=joined {
            let layout = layout_of(&cluster, i).await;
            if layout != first {
                return Err(format!(
                    "node {i} serves v{}, node 0 v{}",
                    layout.version, first.version
                ));
            }
        }
        if first
            .members
            .iter()
            .any(|m| m.role != pb::LayoutRole::Active as i32)
        {
            return Err(format!("v{} still has a joining member", first.version));
        }
        Ok(first)
    })
    .await;
    // Every member vouches for the layout it serves, by its hash.
    let mut hashes = Vec::new();
    for i in 0..=joined {
        let vouch = cluster
            .membership(i)
            .await
            .layout_vouch(pb::LayoutVouchRequest {
                version: everyone.version,
            })
            .await
            .expect("vouch")
            .into_inner();
        assert!(vouch.adopted, "node {i} adopted v{}", everyone.version);
        hashes.push(vouch.adopted_hash);
    }
    hashes.dedup();
    assert_eq!(hashes.len(), 1, "one hash at one version: {hashes:?}");
    // Nobody vouches for a version that was never chosen.
    let vouch = cluster
        .membership(0)
        .await
        .layout_vouch(pb::LayoutVouchRequest {
            version: everyone.version + 5,
        })
        .await
        .expect("vouch")
        .into_inner();
    assert!(!vouch.adopted && !vouch.accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_settles_without_a_member_that_is_down_and_it_catches_up_before_serving() {
    let mut cluster = TestCluster::start_with(3, &["--anti-entropy-interval", "1"]).await;
    let client = cluster.client().await;
    for i in 0..30 {
        client
            .put(&format!("k{i}"), format!("v{i}"))
            .await
            .expect("put");
    }
    cluster.kill(2);
    let joined = cluster.join(0, &["--anti-entropy-interval", "1"]).await;
    // The join finishes and the move settles with node 2 down: settling
    // waits for the members that are up only.
    let settled = eventually(Duration::from_secs(40), async || {
        let layout = layout_of(&cluster, 0).await;
        let joining = layout
            .members
            .iter()
            .any(|m| m.role != pb::LayoutRole::Active as i32);
        if layout.members.len() != 4 || joining || !layout.previous.is_empty() {
            return Err(format!(
                "node 0 serves v{}: {}",
                layout.version, layout.change
            ));
        }
        for i in [1, joined] {
            let other = layout_of(&cluster, i).await;
            if other.version != layout.version {
                return Err(format!("node {i} serves v{}", other.version));
            }
        }
        Ok(layout)
    })
    .await;
    // Node 2 comes back with the layout from before the join: it serves
    // the newest, verified by the others, by the time it says SERVING.
    cluster.restart(2).await;
    let layout = layout_of(&cluster, 2).await;
    assert_eq!(
        layout.version, settled.version,
        "a node back from down caught up before serving"
    );
    for i in 0..30 {
        let value = client.get(&format!("k{i}")).await.expect("get");
        assert_eq!(value.as_deref(), Some(format!("v{i}").as_bytes()));
    }
}
