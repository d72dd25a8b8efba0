//! One cluster, one id, with real processes: a bootstrapping node must be
//! in its own --peers; the first members serve only once a majority agree
//! on the cluster id; two clusters never take each other's messages; and a
//! node left over from an older cluster cannot take over a new one started
//! at the same addresses (its layout has a higher version).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestCluster, eventually};
use dkvs::checker;
use dkvs::client::{Client, ClientOptions};
use dkvs::pb;
use dkvs::workload::{History, Recorder, Workload};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn log_of(cluster: &TestCluster, i: usize) -> String {
    std::fs::read_to_string(&cluster.nodes[i].log).unwrap_or_default()
}

async fn layout_of(cluster: &TestCluster, i: usize) -> pb::Layout {
    cluster
        .membership(i)
        .await
        .get_layout(pb::GetLayoutRequest {})
        .await
        .expect("GetLayout")
        .into_inner()
}

#[test]
fn a_bootstrapping_node_not_in_its_own_peers_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_DKVSServer"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--peers",
            "127.0.0.1:1,127.0.0.1:2",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("run DKVSServer");
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("127.0.0.1:0 is not in --peers")
            && stderr.contains("joins with --join SEED"),
        "{stderr}"
    );
    // Nothing was written: the data dir holds no layout.
    assert!(!dir.path().join("layout").exists());
}

/// A first member alone is a minority: it does not serve clients (health
/// NOT_SERVING, writes refused saying why) until a second one confirms the
/// first layout and id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_members_serve_once_a_majority_agree() {
    let mut cluster = TestCluster::start(3).await;
    for i in 0..3 {
        cluster.kill(i);
        std::fs::remove_dir_all(&cluster.nodes[i].data_dir).expect("wipe");
        cluster.add_flags(i, &["--cluster-token", "majority"]);
    }
    // Only node 0: one of three first members.
    cluster.spawn_only(0);
    let refusal = eventually(Duration::from_secs(20), async || {
        match cluster.kv(0).await.put(common::put_request("k", "v")).await {
            // Not "connection refused": the node is up and says why not.
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && status.message().contains("does not serve clients yet") =>
            {
                Ok(status)
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        refusal.message().contains("cluster id is not agreed"),
        "{}",
        refusal.message()
    );
    eventually(Duration::from_secs(20), async || {
        let log = log_of(&cluster, 0);
        if log.contains("1 of 3 first members confirm") {
            Ok(())
        } else {
            Err("no log line saying what it waits for".to_string())
        }
    })
    .await;
    assert!(!common::health_serving(&cluster.nodes[0].address).await);
    // A second one makes a majority: both serve, the third is not waited for.
    cluster.restart_all(&[1]).await;
    cluster.wait_ready(0).await.expect("node 0 serves");
    cluster
        .kv(0)
        .await
        .put(common::put_request("k", "v"))
        .await
        .expect("put once a majority agree");
    // Agreed once, a node restarted alone serves at once: it keeps the id
    // it agreed on in its data dir.
    cluster.kill(0);
    cluster.kill(1);
    cluster.restart(0).await;
}

/// Two clusters started with different tokens never merge: a heartbeat, a
/// layout commit (ten versions ahead) and a layout proposal carrying the
/// other cluster's id are refused, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_with_different_tokens_never_merge() {
    let a = TestCluster::start(3).await;
    let b = TestCluster::start(1).await;
    let (layout_a, layout_b) = (layout_of(&a, 0).await, layout_of(&b, 0).await);
    assert!(layout_a.cluster_id != 0 && layout_b.cluster_id != 0);
    assert_ne!(layout_a.cluster_id, layout_b.cluster_id);

    let ping = a
        .liveness(0)
        .await
        .ping(pb::PingRequest {
            from: b.nodes[0].address.clone(),
            cluster_id: layout_b.cluster_id,
            layout_version: 10,
            ..Default::default()
        })
        .await
        .expect_err("a ping from another cluster");
    assert_eq!(ping.code(), tonic::Code::FailedPrecondition);
    assert!(
        ping.message().starts_with(&format!(
            "message from another cluster (id {:016x}, this cluster {:016x})",
            layout_b.cluster_id, layout_a.cluster_id
        )),
        "{}",
        ping.message()
    );
    // Without an id, once this cluster has one: refused too.
    let bare = a
        .liveness(0)
        .await
        .ping(pb::PingRequest {
            from: b.nodes[0].address.clone(),
            ..Default::default()
        })
        .await
        .expect_err("a ping without a cluster id");
    assert_eq!(bare.code(), tonic::Code::FailedPrecondition);

    let mut forged = layout_b.clone();
    forged.version = layout_a.version + 10;
    let commit = a
        .membership(0)
        .await
        .layout_commit(forged)
        .await
        .expect_err("another cluster's layout");
    assert_eq!(commit.code(), tonic::Code::FailedPrecondition);
    let prepare = a
        .membership(1)
        .await
        .layout_prepare(pb::LayoutPrepareRequest {
            version: layout_a.version + 1,
            ballot: Some(pb::Ballot {
                round: 1 << 40,
                proposer: 1,
            }),
            base_hash: 0,
            cluster_id: layout_b.cluster_id,
            ..Default::default()
        })
        .await
        .expect_err("another cluster's proposal");
    assert_eq!(prepare.code(), tonic::Code::FailedPrecondition);
    // The join of a node that names another cluster is refused as well.
    let join = a
        .membership(2)
        .await
        .join(pb::JoinRequest {
            address: "127.0.0.1:9".into(),
            cluster_id: layout_b.cluster_id,
            ..Default::default()
        })
        .await
        .expect_err("a joiner of another cluster");
    assert_eq!(join.code(), tonic::Code::FailedPrecondition);

    // Nothing changed, and the refusal is in the log.
    for i in 0..3 {
        let layout = layout_of(&a, i).await;
        assert_eq!(
            (layout.version, layout.members.len(), layout.cluster_id),
            (layout_a.version, 3, layout_a.cluster_id)
        );
    }
    assert_eq!(layout_of(&b, 0).await.version, layout_b.version);
    assert!(
        log_of(&a, 0).contains("refused: message from another cluster"),
        "{}",
        a.log_tail_of(0)
    );
}

/// Runs a recorded workload through `client` for `duration`, then reads
/// every key back at ALL through `final_reader`; panics on any violation.
async fn workload_holds(client: Client, final_reader: Client, duration: Duration) {
    let client = Arc::new(client);
    let recorder = Recorder::new();
    let workload = Workload::new(100);
    let until = tokio::time::Instant::now() + duration;
    let workers: Vec<_> = (0..3)
        .map(|id| {
            let (client, recorder) = (client.clone(), recorder.clone());
            tokio::spawn(async move {
                workload
                    .run_worker(id, &client, id as u64 + 1, until, &recorder)
                    .await
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("worker");
    }
    workload
        .final_reads(9, &final_reader, &recorder)
        .await
        .expect("final reads at ALL");
    let History { ops, errors } = recorder.take();
    let report = checker::check(&ops);
    println!("operations: {}, {report}", ops.len());
    for (index, why) in errors.iter().take(5) {
        println!("  {}: {why}", checker::describe(&ops, *index));
    }
    common::assert_no_violations(&report);
}

/// The takeover: a cluster grown to four is stopped, the first three data
/// dirs are wiped but not the added node's, and all four restart. The
/// three start a new cluster; the added node's layout (a higher version,
/// another cluster) must not be adopted, and it must not take part.
async fn an_old_node_does_not_take_over_a_new_cluster(token: Option<&str>) {
    let mut cluster = TestCluster::start_with(3, &["--anti-entropy-interval", "1"]).await;
    let old = cluster.join(0, &["--anti-entropy-interval", "1"]).await;
    let grown = eventually(Duration::from_secs(60), async || {
        let layout = layout_of(&cluster, old).await;
        let settled = layout.members.len() == 4 && layout.previous.is_empty();
        let active = layout
            .members
            .iter()
            .all(|m| m.role == pb::LayoutRole::Active as i32);
        if settled && active {
            Ok(layout)
        } else {
            Err(format!("layout v{}: {}", layout.version, layout.change))
        }
    })
    .await;
    for i in 0..4 {
        cluster.kill(i);
    }
    for i in 0..3 {
        std::fs::remove_dir_all(&cluster.nodes[i].data_dir).expect("wipe");
        cluster.drop_flag(i, "--cluster-token");
        if let Some(token) = token {
            cluster.add_flags(i, &["--cluster-token", token]);
        }
    }
    cluster.restart_all(&[0, 1, 2, old]).await;
    let first = cluster.addresses()[..3].to_vec();
    let client = Client::connect(&first, ClientOptions::default())
        .await
        .expect("client of the new cluster");
    let final_reader = Client::connect(
        &first,
        ClientOptions {
            consistency: dkvs::quorum::Consistency::All,
            ..ClientOptions::default()
        },
    )
    .await
    .expect("client");
    // The old node pings the new ones all along the workload.
    workload_holds(client, final_reader, Duration::from_secs(4)).await;
    let new_id = layout_of(&cluster, 0).await.cluster_id;
    assert!(new_id != 0 && new_id != grown.cluster_id);
    for i in 0..3 {
        let status = cluster.status(i).await;
        let layout = status.layout.expect("a layout");
        assert_eq!(
            (layout.members.len(), layout.cluster_id),
            (3, new_id),
            "node {i} serves layout v{} ({})",
            layout.version,
            layout.change
        );
        assert!(layout.version < grown.version, "v{}", layout.version);
        assert!(
            status
                .members
                .iter()
                .all(|m| m.address != cluster.nodes[old].address)
        );
    }
    // Both sides say so in their logs.
    let refused =
        (0..3).any(|i| log_of(&cluster, i).contains("refused: message from another cluster"));
    assert!(refused, "{}", cluster.log_tail_of(0));
    assert!(
        log_of(&cluster, old).contains("a peer refuses this node as from another cluster"),
        "{}",
        cluster.log_tail_of(old)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_node_does_not_take_over_a_new_cluster_with_a_token() {
    an_old_node_does_not_take_over_a_new_cluster(Some("the-new-cluster")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_node_does_not_take_over_a_new_cluster_with_a_random_id() {
    an_old_node_does_not_take_over_a_new_cluster(None).await;
}

/// A cluster started without a token gets its id through one change; a
/// member wiped after that and one more change, restarted with its usual
/// `--peers`, bootstraps a first layout without an id. It must still catch
/// up (the layout a majority vouches for is this cluster's) and serve,
/// instead of refusing every newer layout as "not the assignment of mine".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_wiped_after_the_id_assignment_catches_up_and_serves() {
    let mut cluster = TestCluster::start(3).await;
    for i in 0..3 {
        cluster.kill(i);
        cluster.wipe(i);
        cluster.drop_flag(i, "--cluster-token");
    }
    cluster.restart_all(&[0, 1, 2]).await;
    eventually(Duration::from_secs(20), async || {
        let layout = layout_of(&cluster, 0).await;
        if layout.cluster_id != 0 {
            Ok(())
        } else {
            Err(format!("v{}: {}", layout.version, layout.change))
        }
    })
    .await;
    let joined = cluster.join(0, &[]).await;
    let settled = eventually(Duration::from_secs(30), async || {
        let layout = layout_of(&cluster, 0).await;
        let active = layout
            .members
            .iter()
            .all(|m| m.role == pb::LayoutRole::Active as i32);
        if layout.members.len() == 4 && active && layout.previous.is_empty() {
            Ok(layout)
        } else {
            Err(format!("v{}: {}", layout.version, layout.change))
        }
    })
    .await;
    assert!(
        settled.version >= 3,
        "the assignment and the join's changes"
    );

    cluster.kill(2);
    cluster.wipe(2);
    cluster.restart(2).await; // waits for SERVING: never, before the fix
    // It serves the settled layout, or the one after it that names its new
    // instance (the others rename it as soon as it answers).
    eventually(Duration::from_secs(20), async || {
        let layout = layout_of(&cluster, 2).await;
        let renamed = layout.version == settled.version + 1
            && layout.change == "instances named"
            && layout_of(&cluster, 0).await == layout;
        if layout == settled || renamed {
            Ok(())
        } else {
            Err(format!(
                "node 2 serves v{}: {}",
                layout.version, layout.change
            ))
        }
    })
    .await;
    let client = cluster.client().await;
    client.put("after", "wipe").await.expect("put");
    assert_eq!(
        client.get("after").await.expect("get").as_deref(),
        Some(&b"wipe"[..])
    );
    let _ = joined;
}

/// The metadata every node-to-node call carries: the sender's cluster id.
const CLUSTER_ID_METADATA: &str = "dkvs-cluster-id";

/// The address a stamped call names as its sender (for the refuser's log).
const SENDER: &str = "127.0.0.1:7004";

/// `message` as a call from the node at [`SENDER`] of cluster `id` (`None`:
/// a node of the release before the data path carried it).
fn from_cluster<T>(id: Option<u64>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(id) = id {
        let value = format!("{id:016x}").parse().expect("ascii metadata");
        request.metadata_mut().insert(CLUSTER_ID_METADATA, value);
        let sender = SENDER.parse().expect("ascii metadata");
        request.metadata_mut().insert("dkvs-sender", sender);
    }
    request
}

/// The data path takes calls from this cluster's nodes only: a replica
/// write, a batch, a hint and anti-entropy calls sent by another cluster's
/// node are refused before anything is done (FAILED_PRECONDITION naming
/// both ids, logged once), and nothing is stored; a call without the
/// metadata is refused as well, and one with this cluster's id accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clusters_data_path_calls_are_refused() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client().await;
    common::preload(&client, 5).await;
    let layout = layout_of(&cluster, 0).await;
    let own = layout.cluster_id;
    assert_ne!(own, 0);
    let foreign = Some(!own);
    // A version newer than k0's and k1's: a write the store would apply.
    let held = cluster
        .replica_record(0, "k0")
        .await
        .and_then(|r| r.version)
        .expect("k0's version");
    let newer = |value: &str| pb::Record {
        version: Some(pb::Version {
            lamport: held.lamport + 1_000,
            node_id: held.node_id,
        }),
        value: value.as_bytes().to_vec().into(),
        ..Default::default()
    };
    let write = |key: &str, value: &str| pb::ReplicaWriteRequest {
        key: key.into(),
        record: Some(newer(value)),
        ..Default::default()
    };
    let range_count = layout.members.iter().map(|m| m.tokens.len()).sum::<usize>() as u32;
    let entries = pb::RangeEntriesRequest {
        range: 0,
        range_count,
        layout_version: layout.version,
        ..Default::default()
    };

    let refusals = vec![
        (
            "write",
            cluster
                .replica(0)
                .await
                .write(from_cluster(foreign, write("foreign", "b")))
                .await
                .map(|_| ()),
        ),
        (
            "batch",
            cluster
                .replica(0)
                .await
                .batch(from_cluster(
                    foreign,
                    pb::ReplicaBatchRequest {
                        writes: vec![write("k0", "b"), write("k1", "b")],
                        reads: vec![],
                    },
                ))
                .await
                .map(|_| ()),
        ),
        (
            "hint",
            cluster
                .replica(0)
                .await
                .store_hint(from_cluster(
                    foreign,
                    pb::StoreHintRequest {
                        target: cluster.nodes[1].address.clone(),
                        key: "k2".into(),
                        record: Some(newer("b")),
                    },
                ))
                .await
                .map(|_| ()),
        ),
        (
            "range digests",
            cluster
                .replica(0)
                .await
                .range_digests(from_cluster(
                    foreign,
                    pb::RangeDigestsRequest {
                        peer: cluster.nodes[1].address.clone(),
                        leaves: true,
                        range_count,
                        layout_version: layout.version,
                    },
                ))
                .await
                .map(|_| ()),
        ),
        (
            "range entries",
            cluster
                .replica(0)
                .await
                .range_entries(from_cluster(foreign, entries))
                .await
                .map(|_| ()),
        ),
    ];
    for (call, answer) in refusals {
        let status = answer.expect_err(call);
        assert_eq!(
            status.code(),
            tonic::Code::FailedPrecondition,
            "{call}: {status:?}"
        );
        assert!(
            status.message().contains(&format!("{:016x}", !own))
                && status.message().contains(&format!("{own:016x}")),
            "{call}: {}",
            status.message()
        );
        assert!(
            status.message().contains("--cluster-token"),
            "{}",
            status.message()
        );
    }

    // Nothing stored: every preloaded key keeps its value at ALL, and no
    // replica holds the foreign key.
    let all = common::preloaded_at_all(&cluster, 5).await;
    assert_eq!(all.get("foreign").await.expect("read at ALL"), None);
    for i in 0..3 {
        assert!(
            cluster.replica_record(i, "foreign").await.is_none(),
            "node {i}"
        );
    }
    // Refused calls from one sender are logged once, naming it.
    let logged = eventually(Duration::from_secs(10), async || {
        let log = log_of(&cluster, 0);
        let lines = log
            .lines()
            .filter(|l| l.contains("refused: message from another cluster"))
            .inspect(|l| assert!(l.contains(&format!("sender=\"{SENDER}\"")), "{l}"))
            .count();
        if lines > 0 {
            Ok(lines)
        } else {
            Err("not logged yet".to_string())
        }
    })
    .await;
    assert_eq!(logged, 1, "{}", cluster.log_tail_of(0));

    // A call without the metadata is refused too (DESIGN, Upgrades: once a
    // cluster has an id, messages without one are refused), and nothing
    // is stored; with this cluster's own id the same calls are accepted.
    let unstamped =
        pb::replica_client::ReplicaClient::new(common::channel(&cluster.nodes[0].address).await)
            .write(write("from-nobody", "no"))
            .await
            .expect_err("a write without a cluster id");
    assert_eq!(unstamped.code(), tonic::Code::FailedPrecondition);
    assert!(
        unstamped.message().contains("message without a cluster id"),
        "{}",
        unstamped.message()
    );
    assert!(cluster.replica_record(0, "from-nobody").await.is_none());
    for id in [Some(own)] {
        cluster
            .replica(0)
            .await
            .write(from_cluster(id, write(&format!("from-{id:?}"), "ok")))
            .await
            .expect("a write from this cluster");
        assert!(
            cluster
                .replica_record(0, &format!("from-{id:?}"))
                .await
                .is_some()
        );
        eventually(Duration::from_secs(20), async || {
            let layout = layout_of(&cluster, 0).await;
            let request = pb::RangeEntriesRequest {
                range: 0,
                range_count: layout.members.iter().map(|m| m.tokens.len()).sum::<usize>() as u32,
                layout_version: layout.version,
                ..Default::default()
            };
            cluster
                .replica(0)
                .await
                .range_entries(from_cluster(id, request))
                .await
                .map(|_| ())
                .map_err(|status| format!("{status:?}"))
        })
        .await;
    }
}
