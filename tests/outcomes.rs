//! Every answer to a write says whether it took effect (`dkvs-outcome`,
//! DESIGN.md "Outcomes"), and `DKVSClient`'s exit code follows: 3 when
//! nothing was sent (safe to retry), 4 when the write was sent and failed
//! (it may still take effect). Real processes, killed with SIGKILL.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{TestCluster, get_request, put_request};
use dkvs::error::{OUTCOME_HEADER, Outcome};
use dkvs::pb;

fn client(nodes: &[String], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
        .arg("--nodes")
        .arg(nodes.join(","))
        .args(args)
        .output()
        .expect("run DKVSClient")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The outcome a status carries (None: it has none).
fn outcome_of(status: &tonic::Status) -> Option<Outcome> {
    Outcome::of(status.metadata())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_carry_their_outcome_and_an_unsent_put_exits_3() {
    let mut cluster = TestCluster::start(3).await;
    let mut kv = cluster.kv(0).await;

    // Done: applied, on Put and on Delete (a response header).
    let put = kv.put(put_request("k", "v")).await.expect("put");
    assert_eq!(Outcome::of(put.metadata()), Some(Outcome::Applied));
    let delete = kv
        .delete(pb::DeleteRequest {
            key: "k".into(),
            consistency: 0,
        })
        .await
        .expect("delete");
    assert_eq!(Outcome::of(delete.metadata()), Some(Outcome::Applied));
    // Bad input: not applied. A read has no outcome, failed or not.
    let refused = kv
        .put(put_request("", "v"))
        .await
        .expect_err("an empty key");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(outcome_of(&refused), Some(Outcome::NotApplied));
    let read = kv.get(get_request("k")).await.expect("get");
    assert!(read.metadata().get(OUTCOME_HEADER).is_none());
    let bad_read = kv.get(get_request("")).await.expect_err("an empty key");
    assert_eq!(outcome_of(&bad_read), None);

    // Two of three killed and convicted: a QUORUM write is refused before
    // anything is sent, and nothing is stored, not even on node 0.
    cluster.kill(1);
    cluster.kill(2);
    for member in [1, 2] {
        cluster
            .wait_member_state(0, member, pb::MemberState::Down, Duration::from_secs(10))
            .await;
    }
    let unsent = kv
        .put(put_request("unsent", "v"))
        .await
        .expect_err("one replica up of two needed");
    assert_eq!(unsent.code(), tonic::Code::Unavailable, "{unsent:?}");
    assert_eq!(outcome_of(&unsent), Some(Outcome::NotApplied), "{unsent:?}");
    assert!(unsent.message().contains("not applied"), "{unsent:?}");

    let put = client(&cluster.addresses(), &["PUT", "unsent", "v"]);
    let stderr = text(&put.stderr);
    assert_eq!(put.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("not applied"), "{stderr}");
    assert_eq!(cluster.replica_record(0, "unsent").await, None);

    // A read that cannot reach R replicas: UNAVAILABLE, no outcome, exit 3.
    let read = kv
        .get(get_request("unsent"))
        .await
        .expect_err("one replica up of two needed");
    assert_eq!(read.code(), tonic::Code::Unavailable);
    assert_eq!(outcome_of(&read), None);
    let get = client(&cluster.addresses(), &["GET", "unsent"]);
    assert_eq!(get.status.code(), Some(3), "{}", text(&get.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_sent_to_replicas_that_died_unnoticed_is_unknown_and_exits_4() {
    // The detector never convicts here: the dead replicas stay believed
    // up, so writes are sent to them.
    let mut cluster = TestCluster::start_with(3, &["--phi-threshold", "1000000"]).await;
    let mut kv = cluster.kv(0).await;
    kv.put(put_request("warm", "v")).await.expect("put");
    cluster.kill(1);
    cluster.kill(2);

    // Node 0 stores the write and misses its quorum: it may take effect.
    let failed = kv
        .put(put_request("sent", "v"))
        .await
        .expect_err("one ack of two needed");
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    assert_eq!(outcome_of(&failed), Some(Outcome::Unknown), "{failed:?}");
    assert!(
        cluster.replica_record(0, "sent").await.is_some(),
        "node 0 holds the write it reported failed"
    );

    // The command line, whichever replica it tries first (the dead ones
    // refuse connections, so the write goes to node 0), exits 4.
    let live = [cluster.nodes[0].address.clone()];
    let put = client(&live, &["PUT", "sent-by-cli", "v"]);
    let stderr = text(&put.stderr);
    assert_eq!(put.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("may or may not have been applied"),
        "{stderr}"
    );
    let delete = client(&live, &["DELETE", "sent-by-cli"]);
    assert_eq!(delete.status.code(), Some(4), "{}", text(&delete.stderr));
}
