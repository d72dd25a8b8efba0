//! Shrinking and healing a cluster, with real processes under a recorded
//! workload: `DKVSClient cluster leave` of a live member (its data moves,
//! then it exits 0 by itself), `cluster remove` of a dead one (the
//! survivors rebuild its ranges), the refusals (below N, a member up or
//! down, too few surviving copies) and a remove while a leave is stalled on
//! the member removed. Every run is checked with the value checker: no
//! acknowledged write lost, no stale read.

mod common;

use std::process::Output;
use std::time::Duration;

use common::{TestCluster, eventually};
use dkvs::pb;

/// Quick anti-entropy, as in the membership tests.
const FLAGS: &[&str] = &["--anti-entropy-interval", "1"];

/// Members that stream slowly, so that a leave is still streaming when the
/// test acts.
const SLOW: &[&str] = &["--anti-entropy-interval", "1", "--stream-rate", "60"];

/// Keys written before a change: data for it to move.
const PRELOADED: usize = 400;

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The layout node `observer` serves.
fn why_removed(layout: &pb::Layout, address: &str) -> Option<String> {
    layout
        .removed
        .iter()
        .find(|r| r.address == address)
        .map(|r| r.why.clone())
}

/// Waits until every running member believes node `i` down.
async fn down_everywhere(cluster: &TestCluster, i: usize) {
    for observer in 0..cluster.nodes.len() {
        if observer != i && cluster.nodes[observer].is_running() {
            cluster
                .wait_member_state(observer, i, pb::MemberState::Down, Duration::from_secs(30))
                .await;
        }
    }
}

/// `cluster wait` exits 0 within `secs`.
async fn settles(cluster: &TestCluster, secs: u64) {
    let secs = secs.to_string();
    let wait = cluster
        .run_client(&["cluster", "wait", "--timeout-secs", &secs])
        .await;
    assert_eq!(wait.status.code(), Some(0), "{}", text(&wait));
}

/// Node `i`, restarted from its data dir after it left or was removed,
/// learns so, says what to do and exits 0.
async fn stays_gone(cluster: &mut TestCluster, i: usize, says: &str) {
    cluster.start_only(i);
    let exited = cluster.wait_exit(i, Duration::from_secs(30)).await;
    let log = cluster.log_tail_of(i);
    assert_eq!(exited.code(), Some(0), "{log}");
    assert!(log.contains(says), "{log}");
    assert!(log.contains("wipe its data dir and --join again"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_leaves_under_load_its_data_moves_and_it_exits_0() {
    let mut cluster = TestCluster::start_with(4, FLAGS).await;
    common::preload(&cluster.client().await, PRELOADED).await;
    let load = common::Load::start(&cluster).await;
    let leaver = 3;
    let address = cluster.nodes[leaver].address.clone();

    // The plan first: what would move, from whom; nothing changes.
    let before = cluster.layout(0).await.version;
    let plan = cluster
        .run_client(&["cluster", "plan", "leave", &address])
        .await;
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    let said = text(&plan);
    assert!(
        said.contains(&format!("Plan (nothing changed): {address} leaves"))
            && said.contains(&format!("{address} (giving them up)"))
            && said.contains("Every range keeps W replicas up during the move"),
        "{said}"
    );
    assert_eq!(cluster.layout(0).await.version, before);

    let leave = cluster
        .run_client(&[
            "cluster",
            "leave",
            &address,
            "--wait",
            "--timeout-secs",
            "90",
        ])
        .await;
    assert_eq!(leave.status.code(), Some(0), "{}", text(&leave));
    let said = text(&leave);
    assert!(
        said.contains(&format!("leaving: {address} leaves")),
        "{said}"
    );
    assert!(said.contains(&format!("{address} left")), "{said}");

    // It exited by itself, with 0 and a message.
    let exited = cluster.wait_exit(leaver, Duration::from_secs(30)).await;
    let log = cluster.log_tail_of(leaver);
    assert_eq!(exited.code(), Some(0), "{log}");
    assert!(log.contains("this node left the cluster"), "{log}");

    settles(&cluster, 60).await;
    let shrunk = cluster.layout(0).await;
    assert!(shrunk.members.iter().all(|m| m.address != address));
    assert_eq!(shrunk.members.len(), 3);
    assert_eq!(why_removed(&shrunk, &address).as_deref(), Some("left"));
    let status = cluster.run_client(&["status"]).await;
    assert!(
        text(&status).contains(&format!("removed: {address}")),
        "{}",
        text(&status)
    );

    load.check(&cluster).await;
    common::preloaded_at_all(&cluster, PRELOADED).await;
    stays_gone(&mut cluster, leaver, "this node left the cluster").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_below_n_or_of_a_dead_member_and_a_remove_of_a_live_one_are_refused() {
    let mut cluster = TestCluster::start_with(3, FLAGS).await;
    let before = cluster.layout(0).await;
    let third = cluster.nodes[2].address.clone();

    let plan = cluster
        .run_client(&["cluster", "plan", "leave", &third])
        .await;
    assert_eq!(plan.status.code(), Some(3), "{}", text(&plan));
    assert!(
        text(&plan).contains("would be refused") && text(&plan).contains("fewer than N = 3"),
        "{}",
        text(&plan)
    );
    let below_n = cluster.run_client(&["cluster", "leave", &third]).await;
    assert_eq!(below_n.status.code(), Some(3), "{}", text(&below_n));
    assert!(
        text(&below_n).contains("fewer than N = 3"),
        "{}",
        text(&below_n)
    );

    let live = cluster.run_client(&["cluster", "remove", &third]).await;
    assert_eq!(live.status.code(), Some(3), "{}", text(&live));
    assert!(
        text(&live).contains("use `DKVSClient cluster leave"),
        "{}",
        text(&live)
    );

    cluster.kill(2);
    down_everywhere(&cluster, 2).await;
    let dead = cluster
        .run_client(&["cluster", "leave", &third, "--force"])
        .await;
    // --force takes it past both N and its being down; abort undoes it.
    assert_eq!(dead.status.code(), Some(0), "{}", text(&dead));
    let abort = cluster.run_client(&["cluster", "abort"]).await;
    assert_eq!(abort.status.code(), Some(0), "{}", text(&abort));
    let after = cluster.layout(0).await;
    assert_eq!(after.members.len(), before.members.len());
    assert!(after.removed.is_empty());
    let unforced = cluster.run_client(&["cluster", "leave", &third]).await;
    assert_eq!(unforced.status.code(), Some(3), "{}", text(&unforced));
    assert!(
        text(&unforced).contains("use `DKVSClient cluster remove"),
        "{}",
        text(&unforced)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_is_removed_and_its_ranges_rebuilt_under_load() {
    let mut cluster = TestCluster::start_with(4, FLAGS).await;
    common::preload(&cluster.client().await, PRELOADED).await;
    let load = common::Load::start(&cluster).await;
    let dead = 3;
    let address = cluster.nodes[dead].address.clone();
    cluster.kill(dead);
    down_everywhere(&cluster, dead).await;

    let remove = cluster.run_client(&["cluster", "remove", &address]).await;
    assert_eq!(remove.status.code(), Some(0), "{}", text(&remove));
    assert!(
        text(&remove).contains(&format!("removing: {address} is removed")),
        "{}",
        text(&remove)
    );
    settles(&cluster, 90).await;
    let healed = cluster.layout(0).await;
    assert_eq!(healed.members.len(), 3);
    assert_eq!(why_removed(&healed, &address).as_deref(), Some("removed"));
    // The hints held for the dead member (the load wrote while it was
    // down) are not left behind: they went to the replicas their keys
    // have now (the history check below shows nothing was lost).
    eventually(Duration::from_secs(30), async || {
        let pending = cluster.sum_stats(|s| s.hints_pending).await;
        if pending == 0 {
            Ok(())
        } else {
            Err(format!("{pending} hints still pending"))
        }
    })
    .await;

    load.check(&cluster).await;
    // Every key is on all three survivors again: readable at ALL.
    common::preloaded_at_all(&cluster, PRELOADED).await;
    stays_gone(&mut cluster, dead, "was removed from the cluster").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remove_with_too_few_surviving_copies_is_refused_unless_data_loss_is_allowed() {
    let mut cluster = TestCluster::start_with(5, FLAGS).await;
    common::preload(&cluster.client().await, 100).await;
    for i in [3, 4] {
        cluster.kill(i);
    }
    for i in [3, 4] {
        down_everywhere(&cluster, i).await;
    }
    let address = cluster.nodes[4].address.clone();
    let before = cluster.layout(0).await.version;
    let refused = cluster.run_client(&["cluster", "remove", &address]).await;
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    let said = text(&refused);
    assert!(
        said.contains("fewer than the 2 surviving copies") && said.contains("--allow-data-loss"),
        "{said}"
    );
    assert_eq!(cluster.layout(0).await.version, before, "nothing changed");

    let lossy = cluster
        .run_client(&["cluster", "remove", &address, "--allow-data-loss"])
        .await;
    assert_eq!(lossy.status.code(), Some(0), "{}", text(&lossy));
    // The other dead member takes ranges in that change and cannot stream
    // them: the change says it waits for it, and removing it too (during
    // the change) lets it finish.
    let stuck = cluster
        .run_client(&["cluster", "wait", "--timeout-secs", "3"])
        .await;
    let other = cluster.nodes[3].address.clone();
    assert!(
        text(&stuck).contains(&format!("waiting for {other} to stream")),
        "{}",
        text(&stuck)
    );
    let second = cluster
        .run_client(&["cluster", "remove", &other, "--allow-data-loss"])
        .await;
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    settles(&cluster, 90).await;
    let after = cluster.layout(0).await;
    assert_eq!(after.members.len(), 3);
    assert_eq!(why_removed(&after, &address).as_deref(), Some("removed"));
    assert_eq!(why_removed(&after, &other).as_deref(), Some("removed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remove_while_a_leave_is_stalled_on_the_removed_member() {
    // About sixty records for each member to take: four seconds or more.
    let mut cluster =
        TestCluster::start_with(5, &["--anti-entropy-interval", "1", "--stream-rate", "15"]).await;
    common::preload(&cluster.client().await, PRELOADED).await;
    let load = common::Load::start(&cluster).await;
    let (leaver, stalled) = (4, 3);
    let leaver_address = cluster.nodes[leaver].address.clone();
    let stalled_address = cluster.nodes[stalled].address.clone();

    let leave = cluster
        .run_client(&["cluster", "leave", &leaver_address])
        .await;
    assert_eq!(leave.status.code(), Some(0), "{}", text(&leave));
    // A member taking some of the leaver's ranges dies before it streamed
    // them: the leave cannot move the reads.
    eventually(Duration::from_secs(10), async || {
        let waiting = cluster.layout(0).await;
        let checked = dkvs::pb::layout_from(waiting).expect("valid");
        let waiting = checked.waiting_for_streams();
        if waiting.contains(&stalled_address) {
            Ok(())
        } else {
            Err(format!("v{}: waiting for {waiting:?}", checked.version))
        }
    })
    .await;
    cluster.kill(stalled);
    down_everywhere(&cluster, stalled).await;
    let stuck = cluster
        .run_client(&["cluster", "wait", "--timeout-secs", "2"])
        .await;
    assert_eq!(stuck.status.code(), Some(3), "{}", text(&stuck));

    let remove = cluster
        .run_client(&["cluster", "remove", &stalled_address])
        .await;
    assert_eq!(remove.status.code(), Some(0), "{}", text(&remove));
    let both = cluster.layout(0).await;
    let exited = cluster.wait_exit(leaver, Duration::from_secs(120)).await;
    assert_eq!(exited.code(), Some(0), "{}", cluster.log_tail_of(leaver));
    settles(&cluster, 60).await;
    let after = cluster.layout(0).await;
    assert_eq!(after.members.len(), 3, "{both:?}");
    assert_eq!(
        why_removed(&after, &leaver_address).as_deref(),
        Some("left")
    );
    assert_eq!(
        why_removed(&after, &stalled_address).as_deref(),
        Some("removed")
    );
    load.check(&cluster).await;
    eventually(Duration::from_secs(30), async || {
        let client = cluster.client().await;
        match client.get("k0").await {
            Ok(Some(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    common::preloaded_at_all(&cluster, PRELOADED).await;
}

/// A member frozen while another leaves misses the end of the move and the
/// leaver's exit. The leaver can no longer vouch for the layouts it voted
/// on, yet the frozen member, thawed, still verifies and adopts the newest
/// one (the others that stayed vouch), and the next change goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_a_departure_catches_up_and_the_next_change_runs() {
    let mut cluster = TestCluster::start_with(4, SLOW).await;
    common::preload(&cluster.client().await, PRELOADED).await;
    let (leaver, frozen) = (3, 2);
    let leaver_address = cluster.nodes[leaver].address.clone();
    let frozen_address = cluster.nodes[frozen].address.clone();
    let leave = cluster
        .run_client(&["cluster", "leave", &leaver_address])
        .await;
    assert_eq!(leave.status.code(), Some(0), "{}", text(&leave));
    // Frozen once it streamed its part: the others finish without it.
    eventually(Duration::from_secs(60), async || {
        let layout = cluster.layout(0).await;
        if layout.streamed.contains(&frozen_address) || !layout.previous.is_empty() {
            Ok(())
        } else {
            Err(format!("v{}: {}", layout.version, layout.change))
        }
    })
    .await;
    cluster.pause(frozen);
    let exited = cluster.wait_exit(leaver, Duration::from_secs(90)).await;
    assert_eq!(exited.code(), Some(0), "{}", cluster.log_tail_of(leaver));
    let settled = cluster.layout(0).await;
    assert!(settled.removed.iter().any(|r| r.address == leaver_address));

    cluster.resume(frozen);
    eventually(Duration::from_secs(30), async || {
        let held = cluster.layout(frozen).await;
        if held.version >= settled.version {
            Ok(())
        } else {
            Err(format!(
                "{frozen_address} holds v{}, not v{}",
                held.version, settled.version
            ))
        }
    })
    .await;
    settles(&cluster, 60).await;
    // Not wedged: a join goes through.
    cluster.join(0, FLAGS).await;
    settles(&cluster, 90).await;
    assert_eq!(cluster.layout(1).await.members.len(), 4);
}

/// `DKVSServer --replace DEAD --join SEED` at another address: one change
/// removes the dead member and gives its ring tokens to the new node,
/// which streams exactly its ranges from the other replicas and serves
/// reads once it holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_replaces_a_dead_member_under_load() {
    let mut cluster = TestCluster::start_with(4, FLAGS).await;
    common::preload(&cluster.client().await, PRELOADED).await;
    let load = common::Load::start(&cluster).await;
    let dead = 3;
    let dead_address = cluster.nodes[dead].address.clone();
    let tokens = cluster
        .layout(0)
        .await
        .members
        .iter()
        .find(|m| m.address == dead_address)
        .map(|m| m.tokens.clone())
        .expect("a member");
    cluster.kill(dead);
    down_everywhere(&cluster, dead).await;

    let plan = cluster
        .run_client(&["cluster", "plan", "replace", &dead_address])
        .await;
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    assert!(text(&plan).contains("replaces"), "{}", text(&plan));

    let new = cluster
        .join(
            0,
            &["--anti-entropy-interval", "1", "--replace", &dead_address],
        )
        .await;
    let new_address = cluster.nodes[new].address.clone();
    settles(&cluster, 90).await;
    let replaced = cluster.layout(0).await;
    assert_eq!(replaced.members.len(), 4);
    let member = replaced
        .members
        .iter()
        .find(|m| m.address == new_address)
        .expect("the new node is a member");
    assert_eq!(member.role, pb::LayoutRole::Active as i32);
    assert_eq!(member.tokens, tokens, "it took the dead member's tokens");
    assert_eq!(
        why_removed(&replaced, &dead_address).as_deref(),
        Some("removed")
    );

    load.check(&cluster).await;
    common::preloaded_at_all(&cluster, PRELOADED).await;
    stays_gone(&mut cluster, dead, "was removed from the cluster").await;
}

/// When a majority is lost for good, `--force-new-layout --allow-data-loss`
/// on a survivor starts a new layout with it alone; refused while a
/// majority answers (also when the flag is left on after recovery); the
/// cluster then grows again with joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivor_of_a_lost_majority_starts_a_new_layout() {
    const FORCE: &[&str] = &["--force-new-layout", "--allow-data-loss"];
    let mut cluster = TestCluster::start_with(3, FLAGS).await;
    common::preload(&cluster.client().await, 100).await;
    let survivor = 0;

    // With the others up, refused: the cluster is not lost.
    cluster.kill(survivor);
    cluster.add_flags(survivor, FORCE);
    cluster.start_only(survivor);
    let refused = cluster.wait_exit(survivor, Duration::from_secs(30)).await;
    let log = cluster.log_tail_of(survivor);
    assert_eq!(refused.code(), Some(1), "{log}");
    assert!(log.contains("the cluster is not lost"), "{log}");
    // (drop_flag takes the flag and the word after it: both flags.)
    cluster.drop_flag(survivor, "--force-new-layout");
    cluster.restart(survivor).await;

    // The majority is lost for good.
    let before = cluster.layout(survivor).await;
    cluster.kill(1);
    cluster.kill(2);
    cluster.kill(survivor);
    cluster.add_flags(survivor, FORCE);
    cluster.restart(survivor).await;
    let forced = cluster.layout(survivor).await;
    assert_eq!(forced.version, before.version + 1);
    assert_eq!(forced.members.len(), 1);
    for lost in [1, 2] {
        assert_eq!(
            why_removed(&forced, &cluster.nodes[lost].address).as_deref(),
            Some("dropped by --force-new-layout")
        );
    }
    // It serves alone, with what it held: every key (N was 3 of 3).
    common::preloaded_at_all(&cluster, 100).await;
    let client = cluster.client().await;
    client.put("after", "forced").await.expect("a write");

    // The cluster grows again.
    cluster.join(survivor, FLAGS).await;
    settles(&cluster, 90).await;
    assert_eq!(cluster.layout(survivor).await.members.len(), 2);
    common::preloaded_at_all(&cluster, 100).await;

    // The flag left on: refused now that a majority answers.
    cluster.kill(survivor);
    cluster.start_only(survivor);
    let again = cluster.wait_exit(survivor, Duration::from_secs(30)).await;
    assert_eq!(again.code(), Some(1), "{}", cluster.log_tail_of(survivor));
}

/// A small seeded random source for the nemesis (splitmix64).
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % sides as u64) as usize
    }
}

/// The nodes that are running and members of the layout node `observer`
/// serves (also reaps nodes that exited by themselves: a leaver).
async fn running_members(cluster: &mut TestCluster) -> Vec<usize> {
    for i in 0..cluster.nodes.len() {
        cluster.exited(i);
    }
    let observer = (0..cluster.nodes.len())
        .find(|&i| cluster.nodes[i].is_running())
        .expect("a running node");
    let layout = cluster.layout(observer).await;
    (0..cluster.nodes.len())
        .filter(|&i| {
            cluster.nodes[i].is_running()
                && layout
                    .members
                    .iter()
                    .any(|m| m.address == cluster.nodes[i].address)
        })
        .collect()
}

/// The membership nemesis: joins, leaves, removes and replaces mixed with
/// kills and pauses, for `DKVS_NEMESIS_SECS` (default 300) seconds under
/// the recorded workload, each change followed by `cluster wait`; then
/// every acknowledged write is checked. Seeded by `DKVS_NEMESIS_SEED`.
/// Long: run it with `cargo test --test shrink -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn membership_nemesis() {
    let secs: u64 = std::env::var("DKVS_NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let seed = common::seed_from_env("DKVS_NEMESIS_SEED");
    println!("membership nemesis: {secs} s, DKVS_NEMESIS_SEED={seed}");
    let mut dice = Dice(seed);
    let mut cluster = TestCluster::start_with(5, FLAGS).await;
    common::preload(&cluster.client().await, PRELOADED).await;
    let load = common::Load::start(&cluster).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut done: Vec<String> = Vec::new();
    while tokio::time::Instant::now() < deadline {
        let members = running_members(&mut cluster).await;
        let pick = members[dice.roll(members.len())];
        let address = cluster.nodes[pick].address.clone();
        let seed_node = *members
            .iter()
            .find(|&&m| m != pick)
            .expect("another member");
        let step = match dice.roll(6) {
            0 if members.len() < 7 => {
                let new = cluster.join(seed_node, FLAGS).await;
                format!("join {}", cluster.nodes[new].address)
            }
            1 if members.len() > 3 => {
                let leave = cluster
                    .run_client(&[
                        "cluster",
                        "leave",
                        &address,
                        "--wait",
                        "--timeout-secs",
                        "120",
                    ])
                    .await;
                format!("leave {address}: exit {:?}", leave.status.code())
            }
            2 if members.len() > 3 => {
                cluster.kill(pick);
                down_everywhere(&cluster, pick).await;
                let remove = cluster.run_client(&["cluster", "remove", &address]).await;
                format!("kill and remove {address}: exit {:?}", remove.status.code())
            }
            3 => {
                cluster.kill(pick);
                down_everywhere(&cluster, pick).await;
                let new = cluster
                    .join(
                        seed_node,
                        &["--anti-entropy-interval", "1", "--replace", &address],
                    )
                    .await;
                format!(
                    "kill {address}, replace it with {}",
                    cluster.nodes[new].address
                )
            }
            4 => {
                cluster.pause(pick);
                tokio::time::sleep(Duration::from_millis(500 + 300 * dice.roll(10) as u64)).await;
                cluster.resume(pick);
                format!("pause {address}")
            }
            _ => {
                cluster.kill(pick);
                tokio::time::sleep(Duration::from_millis(200 * dice.roll(10) as u64)).await;
                cluster.restart(pick).await;
                format!("kill and restart {address}")
            }
        };
        let wait = cluster
            .run_client(&["cluster", "wait", "--timeout-secs", "120"])
            .await;
        assert_eq!(
            wait.status.code(),
            Some(0),
            "after {step} (steps so far: {done:?}): {}",
            text(&wait)
        );
        println!("nemesis step {}: {step}", done.len() + 1);
        done.push(step);
    }
    load.check(&cluster).await;
    common::preloaded_at_all(&cluster, PRELOADED).await;
    println!("membership nemesis: {} steps, 0 violations", done.len());
}
