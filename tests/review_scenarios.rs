//! The membership review's scenarios with real processes, each under
//! recorded operations checked by the value checker (0 violations):
//!
//! * a replacement behind its read gate is no streaming source for a join
//!   (neither the range's giver nor one of the N−W+1 sources);
//! * a source that cannot adopt the join's layout (its layout file cannot
//!   be saved) is waited for a bounded time, then left to the other old
//!   replicas;
//! * `--join` whose seeds never answer gives up, saying the join may have
//!   committed and what to run;
//! * a wiped original member restarted with its first `--peers` waits,
//!   before answering reads, for the member that joined later too.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestCluster, eventually};
use dkvs::checker::{self, Op};
use dkvs::client::{Client, ClientOptions};
use dkvs::pb;
use dkvs::quorum::Consistency;
use dkvs::workload::{Recorder, Workload, read_outcome, write_outcome_of};

/// Puts and gets whose every outcome is recorded for the checker.
struct Recorded {
    recorder: Recorder,
    /// The checker's clock.
    workload: Workload,
}

impl Recorded {
    fn new() -> Self {
        Self {
            recorder: Recorder::new(),
            workload: Workload::new(1),
        }
    }

    /// Puts `value` at `key` through `client` as checker client `id`;
    /// answers whether it was acknowledged.
    async fn put(&self, id: usize, client: &Client, key: &str, value: &str) -> bool {
        let start = self.workload.tick();
        let (outcome, error) = match client.put(key, value.to_string()).await {
            Ok(ack) => (checker::WriteOutcome::Acked(ack.version), None),
            Err(error) => (write_outcome_of(&error), Some(error.to_string())),
        };
        let acked = error.is_none();
        let op = Op::put(id, key, value, start, self.workload.tick(), outcome);
        self.recorder.record(op, error);
        acked
    }

    /// Gets `key` through `client` as checker client `id`; answers whether
    /// the read was answered (a failed read says nothing about the data).
    async fn get(&self, id: usize, client: &Client, key: &str) -> bool {
        let start = self.workload.tick();
        let (outcome, error) = match client.get_record(key).await {
            Ok(record) => (read_outcome(record), None),
            Err(error) => (checker::ReadOutcome::Failed, Some(error.to_string())),
        };
        let answered = error.is_none();
        self.recorder.record(
            Op::get(id, key, start, self.workload.tick(), outcome),
            error,
        );
        answered
    }

    /// Checks the history; fails on any violation. Answers how many
    /// operations there were and why those that failed did.
    fn check(&self) -> (usize, Vec<String>) {
        let history = self.recorder.take();
        let report = checker::check(&history.ops);
        println!("operations: {}, {report}", history.ops.len());
        // Why operations failed, most common first (up to the first colon).
        let mut why_counts = std::collections::BTreeMap::<String, usize>::new();
        for (_, why) in &history.errors {
            let head = why.split(": ").take(2).collect::<Vec<_>>().join(": ");
            *why_counts.entry(head).or_default() += 1;
        }
        let mut why_counts: Vec<_> = why_counts.into_iter().collect();
        why_counts.sort_by(|x, y| y.1.cmp(&x.1));
        for (why, count) in why_counts.iter().take(5) {
            println!("  {count} failed: {why}");
        }
        for violation in report.violations.iter().take(5) {
            println!("  {violation}");
        }
        common::assert_no_violations(&report);
        let errors = history.errors.into_iter().map(|(_, why)| why).collect();
        (history.ops.len(), errors)
    }
}

/// Why node `i` refuses replica reads now (its read gate), or `None` when
/// it answers them.
async fn gate_refusal(cluster: &TestCluster, i: usize) -> Option<String> {
    let asked = cluster
        .replica(i)
        .await
        .read(pb::ReplicaReadRequest {
            key: "gate-probe".into(),
            ..Default::default()
        })
        .await;
    match asked {
        Ok(_) => None,
        Err(status) => Some(status.message().to_string()),
    }
}

/// "S of P peers synced" in a catching-up gate's refusal: (S, P).
fn peers_synced(refusal: &str) -> Option<(usize, usize)> {
    let words: Vec<&str> = refusal
        .split(|c: char| c.is_whitespace() || c == ':')
        .filter(|w| !w.is_empty())
        .collect();
    let at = words
        .windows(3)
        .position(|w| w[1..] == ["peers", "synced"])?;
    let (synced, of) = (words.get(at.checked_sub(2)?)?, words.get(at)?);
    Some((synced.parse().ok()?, of.parse().ok()?))
}

/// The layout node `observer` serves.
async fn layout_of(cluster: &TestCluster, observer: usize) -> pb::Layout {
    cluster
        .status(observer)
        .await
        .layout
        .expect("Status carries the layout")
}

/// Whether `layout` has no change in progress.
fn is_settled(layout: &pb::Layout) -> bool {
    layout.previous.is_empty()
        && layout
            .members
            .iter()
            .all(|m| m.role == pb::LayoutRole::Active as i32)
}

/// Waits until node `observer` serves a settled layout that has `member`
/// active, newer than `after`; answers it.
async fn settled_with(
    cluster: &TestCluster,
    observer: usize,
    member: usize,
    after: u64,
    within: Duration,
) -> pb::Layout {
    let address = cluster.nodes[member].address.clone();
    eventually(within, async || {
        let layout = layout_of(cluster, observer).await;
        let has = layout.members.iter().any(|m| m.address == address);
        if layout.version > after && has && is_settled(&layout) {
            Ok(layout)
        } else {
            Err(format!("v{}: {}", layout.version, layout.change))
        }
    })
    .await
}

/// A replacement behind its read gate must not hand a joiner its partial
/// data. Five members, N = 3, no hints, and anti-entropy only in the
/// first second after each start (a one-hour interval). While member B is
/// down, every key is written, so a key whose replicas are {A, B, C} is on
/// A and C only. C is then wiped, and B and C restarted while A is frozen:
/// their first anti-entropy rounds miss A, so neither gets those keys,
/// and C's gate stays closed. A sixth node joins (paced, so that its own
/// first round comes while it still owns nothing); for the ranges C gives
/// up to it, C is the giver. Were C a source, the joiner would copy
/// nothing for those keys, and with A down a QUORUM read from {B, joiner}
/// would miss them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_behind_its_read_gate_is_no_streaming_source() {
    const KEYS: usize = 1000;
    let flags = ["--anti-entropy-interval", "3600", "--max-hints", "0"];
    let (a, b, c) = (0, 1, 2);
    let mut cluster = TestCluster::start_with(5, &flags).await;
    let ops = Recorded::new();
    cluster.kill(b);
    let client = cluster.client().await;
    write_most_of(&ops, &client, KEYS).await;

    cluster.kill(c);
    cluster.wipe(c);
    let frozen = cluster.pause_until_dropped(a);
    cluster.restart(b).await;
    cluster.restart(c).await;
    for node in [b, c] {
        first_anti_entropy_round(&cluster, node).await;
    }
    let refusal = gate_refusal(&cluster, c).await;
    let synced = refusal.as_deref().and_then(peers_synced);
    assert!(
        synced.is_some_and(|(synced, of)| synced < of),
        "node C catches up, A not synced: {refusal:?}"
    );
    println!("node C: {refusal:?}");
    drop(frozen);

    let before = layout_of(&cluster, b).await.version;
    let joiner_flags = [&flags[..], &["--stream-rate", "200"]].concat();
    let joiner = cluster.join(b, &joiner_flags).await;
    settled_with(&cluster, b, joiner, before, Duration::from_secs(120)).await;
    let joiner_log = std::fs::read_to_string(&cluster.nodes[joiner].log).expect("joiner's log");
    assert!(
        joiner_log.contains("cannot be a source for a join yet"),
        "C refused to be the giver"
    );
    assert!(
        gate_refusal(&cluster, c).await.is_some(),
        "node C still catches up (it never synced with A)"
    );

    // A down: each key is read from its other replicas. A key C gave up
    // is on A and the joiner (if it streamed from A) only.
    cluster.kill(a);
    let client = cluster.client().await;
    let mut answered = 0;
    for i in 0..KEYS {
        answered += usize::from(ops.get(2, &client, &format!("k{i}")).await);
    }
    println!("with A down: {answered} of {KEYS} reads answered");
    cluster.restart(a).await;
    let client = cluster.client().await;
    for i in 0..KEYS {
        ops.get(3, &client, &format!("k{i}")).await;
    }
    ops.check();
}

/// Waits until node `i` completed its first anti-entropy round.
async fn first_anti_entropy_round(cluster: &TestCluster, i: usize) {
    eventually(Duration::from_secs(30), async || {
        let status = cluster.status(i).await;
        let worker = status.workers.iter().find(|w| w.name == "anti-entropy");
        match worker {
            Some(worker) if worker.rounds + worker.failures > 0 => Ok(()),
            other => Err(format!("node {i}'s anti-entropy: {other:?}")),
        }
    })
    .await
}

/// A source that cannot adopt the join's layout (its layout file cannot
/// be saved, as on a full disk) answers "not yet the join's layout" for
/// good. The joiner waits for it a bounded time, then streams from the
/// other old replicas and finishes joining, under a recorded workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_cannot_adopt_the_joins_layout_is_left_to_the_others() {
    const PRELOADED: usize = 300;
    let flags = ["--anti-entropy-interval", "1"];
    let stuck = 2;
    let mut cluster = TestCluster::start_with(3, &flags).await;
    common::preload(&cluster.client().await, PRELOADED).await;

    let ops = std::sync::Arc::new(Recorded::new());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = std::sync::Arc::new(cluster.client().await);
    let workers: Vec<_> = (0..2)
        .map(|id| {
            let (client, ops, stop) = (client.clone(), ops.clone(), stop.clone());
            tokio::spawn(async move {
                let workload = Workload {
                    t0: ops.workload.t0,
                    ..Workload::new(100)
                };
                let mut round = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let until = tokio::time::Instant::now() + Duration::from_millis(500);
                    let worker = 10 + 2 * round as usize + id;
                    workload
                        .run_worker(worker, &client, worker as u64, until, &ops.recorder)
                        .await;
                    round += 1;
                }
            })
        })
        .collect();

    // The layout file is written to `layout.tmp`, then renamed: a
    // directory there makes every save fail (also for root, whom file
    // modes do not stop).
    let blocker = cluster.nodes[stuck].data_dir.join("layout.tmp");
    std::fs::create_dir_all(blocker.join("full")).expect("block layout saves");
    let before = layout_of(&cluster, 0).await.version;
    let started = Instant::now();
    let joiner = cluster.join(0, &flags).await;
    let joiner_address = cluster.nodes[joiner].address.clone();
    // Finished joining: the joiner is active (the move itself settles
    // only once every member that is up serves it, so not while the
    // stuck source is up and behind).
    eventually(Duration::from_secs(90), async || {
        let layout = layout_of(&cluster, 0).await;
        let active = layout
            .members
            .iter()
            .any(|m| m.address == joiner_address && m.role == pb::LayoutRole::Active as i32);
        if layout.version > before && active {
            Ok(())
        } else {
            Err(format!("v{}: {}", layout.version, layout.change))
        }
    })
    .await;
    println!(
        "finished joining {:.1}s after it began, around a source stuck behind",
        started.elapsed().as_secs_f64()
    );
    assert!(
        cluster.status(stuck).await.layout.expect("layout").version <= before,
        "the stuck source did not adopt the join's layout"
    );

    // The disk has room again: the source catches up and the move settles.
    std::fs::remove_dir_all(&blocker).expect("unblock layout saves");
    settled_with(&cluster, stuck, joiner, before, Duration::from_secs(60)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("worker");
    }
    println!("workload: {} operations", ops.recorder.len());
    let all = common::preloaded_at_all(&cluster, PRELOADED).await;
    let workload = Workload {
        t0: ops.workload.t0,
        ..Workload::new(100)
    };
    workload
        .final_reads(9, &all, &ops.recorder)
        .await
        .expect("final reads at ALL");
    let (operations, errors) = ops.check();
    // The smart client finds a member serving the newer layout even when
    // the first to answer it is the stuck one.
    let stale = errors.iter().filter(|e| e.contains("stale layout")).count();
    assert!(
        stale * 100 <= operations,
        "{stale} of {operations} operations failed as placed with a stale layout"
    );
}

/// `--join` whose seeds never answer (one refuses connections, one
/// accepts them and says nothing) stops after its retry period with a
/// message: the join may have committed, and what to run. The period is
/// 60 s; DKVS_JOIN_RETRY_SECS shortens it for this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_whose_seeds_never_answer_gives_up_saying_what_to_do() {
    const RETRY_SECS: u64 = 3;
    let dir = tempfile::tempdir().expect("tempdir");
    // Nobody listens on a port released at once; a bound listener that is
    // never accepted from holds connections open and answers nothing.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed_address = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_address = silent.local_addr().expect("addr").to_string();
    let me = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let my_address = me.local_addr().expect("addr").to_string();
    drop(me);
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_DKVSServer"))
        .args(["--listen", &my_address])
        .args(["--join", &format!("{closed_address},{silent_address}")])
        .args(["--data-dir", &dir.path().join("node").display().to_string()])
        .args(["--request-timeout-ms", "500"])
        .env("DKVS_JOIN_RETRY_SECS", RETRY_SECS.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn DKVSServer");
    let deadline = started + Duration::from_secs(RETRY_SECS + 30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the joiner did not give up within {:?}", started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = started.elapsed();
    let output = child.wait_with_output().expect("joiner's stderr");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    println!("gave up after {:.1}s: {last}", took.as_secs_f64());
    assert!(!status.success(), "gave up: {status}");
    assert!(
        took >= Duration::from_secs(RETRY_SECS),
        "it retried for the whole period first ({took:?})"
    );
    for said in [
        "may still have committed",
        "DKVSClient status",
        "--join",
        "DKVSClient cluster abort",
        &format!("within {RETRY_SECS} s"),
        &closed_address,
        &silent_address,
    ] {
        assert!(last.contains(said), "the message names {said:?}: {last}");
    }
    assert!(
        stderr.contains("retrying"),
        "it said it was retrying: {stderr}"
    );
    drop(silent);
}

/// A wiped original member restarted with its first `--peers` must wait,
/// before answering reads, for the member that joined later. Three
/// members, then D joins and the move settles. While original member Y is
/// down (no hints), every key is written: a key whose replicas are
/// {X, Y, D} is on X and D only. D goes down; X is wiped and restarted
/// with the first members' `--peers`. Had X's gate waited for Y and Z only
/// (the first layout's members), it would open after syncing with them,
/// and a QUORUM read from {X, Y} would miss the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_member_waits_for_members_that_joined_later_before_serving_reads() {
    const KEYS: usize = 300;
    let flags = ["--anti-entropy-interval", "1", "--max-hints", "0"];
    let (x, y) = (0, 1);
    let mut cluster = TestCluster::start_with(3, &flags).await;
    let before = layout_of(&cluster, x).await.version;
    let d = cluster.join(x, &flags).await;
    settled_with(&cluster, x, d, before, Duration::from_secs(90)).await;
    // Every node serves the settled layout before Y goes down.
    let settled = layout_of(&cluster, x).await.version;
    eventually(Duration::from_secs(20), async || {
        for i in 0..cluster.nodes.len() {
            let version = layout_of(&cluster, i).await.version;
            if version < settled {
                return Err(format!("node {i} serves v{version}, not v{settled}"));
            }
        }
        Ok(())
    })
    .await;

    let ops = Recorded::new();
    cluster.kill(y);
    let client = cluster.client().await;
    write_most_of(&ops, &client, KEYS).await;

    cluster.kill(d);
    cluster.kill(x);
    cluster.wipe(x);
    cluster.restart(y).await;
    cluster.restart(x).await;
    // X syncs with Y and Z within seconds; it must go on refusing reads
    // while D, which it shares ranges with, is down.
    let refusal = eventually(Duration::from_secs(30), async || {
        match gate_refusal(&cluster, x).await {
            Some(why) if why.contains("2 of 3 peers synced") => Ok(why),
            Some(why) => Err(format!("node X's gate: {why}")),
            None => panic!("node X answers reads while D, which holds writes it lost, is down"),
        }
    })
    .await;
    println!("node X: {refusal}");

    let client = cluster.client().await;
    let mut answered = 0;
    for i in 0..KEYS {
        answered += usize::from(ops.get(2, &client, &format!("k{i}")).await);
    }
    println!("with D down: {answered} of {KEYS} reads answered");

    cluster.restart(d).await;
    eventually(Duration::from_secs(30), async || {
        match gate_refusal(&cluster, x).await {
            None => Ok(()),
            Some(why) => Err(format!("node X's gate: {why}")),
        }
    })
    .await;
    let all = cluster
        .client_with(ClientOptions {
            consistency: Consistency::All,
            ..ClientOptions::default()
        })
        .await;
    for i in 0..KEYS {
        ops.get(3, &all, &format!("k{i}")).await;
    }
    ops.check();
}

/// Writes `k0..k{keys}` = `v0..` through `client`, recorded; at least 90%
/// must be acknowledged (a node is down, so some may not be).
async fn write_most_of(ops: &Recorded, client: &dkvs::client::Client, keys: usize) {
    let mut acked = 0;
    for i in 0..keys {
        acked += usize::from(ops.put(1, client, &format!("k{i}"), &format!("v{i}")).await);
    }
    assert!(
        acked > keys * 9 / 10,
        "{acked} of {keys} writes acknowledged"
    );
}
