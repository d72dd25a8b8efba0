//! Unit tests of `client` (kept apart so that the module reads as code).

use super::*;
use crate::clock::{Version, hlc_of_ms, wall_clock_ms};
use crate::net::fake::{FakeReplica, Script};
use crate::ring::member_id_for;
use tokio::io::AsyncReadExt;

fn pool() -> PeerPool {
    PeerPool::new(Arc::new(TcpDialer::default()), 4 << 20)
}

fn put_request() -> pb::PutRequest {
    pb::PutRequest {
        key: "k".into(),
        value: Bytes::from_static(b"v"),
        consistency: 0,
    }
}

#[tokio::test]
async fn a_refused_connection_provably_never_sent_the_request() {
    let address = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").to_string()
    }; // closed again: connecting is refused
    let mut client = pool().key_value_client(&address).expect("client");
    let status = client.put(put_request()).await.expect_err("refused");
    assert!(never_sent(&status), "{status:?}");
    // The channel remembers the failure; the next call is refused too.
    let status = client.put(put_request()).await.expect_err("refused");
    assert!(never_sent(&status), "{status:?}");
}

#[tokio::test]
async fn a_connection_broken_after_the_request_left_may_have_reached_it() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    // Accepts, reads what the client sends, then hangs up.
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut buffer = [0u8; 4096];
        let _ = socket.read(&mut buffer).await;
    });
    let mut client = pool().key_value_client(&address).expect("client");
    let status = client.put(put_request()).await.expect_err("hung up");
    assert!(!never_sent(&status), "{status:?}");
    server.await.expect("server task");
}

/// The replicas of every key of [`client_over`]'s ring.
const REPLICAS: [&str; 3] = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"];
/// A healthy replica's answer time.
const FAST: Duration = Duration::from_millis(10);

/// A client over three fake replicas answering as `scripts` say, as
/// [`Client::connect`] would have made it (rpc timeout 1 s).
fn client_over(scripts: [Script; 3]) -> (Client, Vec<Arc<FakeReplica>>) {
    let ring = Ring::new(REPLICAS.iter().map(|a| Member::new(*a)), 16);
    let fakes: Vec<Arc<FakeReplica>> = REPLICAS
        .iter()
        .zip(scripts)
        .map(|(address, script)| FakeReplica::new(address, Arc::new(ring.clone()), script))
        .collect();
    let client = Client {
        options: ClientOptions {
            rpc_timeout: Duration::from_secs(1),
            ..ClientOptions::default()
        },
        peers: Arc::new(PeerPool::with_fakes(fakes.iter().cloned())),
        placement: crate::placement::SharedPlacement::new(crate::placement::Placement::new(
            Arc::new(ring),
            3,
            "",
        )),
        layout_checked: Mutex::new(tokio::time::Instant::now()),
        recently_down: Mutex::new(HashMap::new()),
        background: Background::new(CancellationToken::new()),
        seeds: REPLICAS.map(String::from).to_vec(),
    };
    (client, fakes)
}

/// A value stored `ms_ago` milliseconds ago.
fn record_at(ms_ago: u64, value: &'static str) -> Record {
    let version = Version::new(
        hlc_of_ms(wall_clock_ms() - ms_ago),
        member_id_for("a node").0,
    );
    Record::value(version, Bytes::from_static(value.as_bytes()))
}

#[tokio::test(start_paused = true)]
async fn a_read_answers_at_r_without_waiting_for_a_frozen_replica() {
    let (client, fakes) = client_over([Script::Answer(FAST), Script::Answer(FAST), Script::Frozen]);
    let record = record_at(1000, "v");
    for fake in &fakes[..2] {
        fake.store().write_if_newer("k", &record).expect("seed");
    }
    let started = tokio::time::Instant::now();
    let read = client.get_record("k").await.expect("read");
    assert_eq!(read, Some(record));
    assert_eq!(started.elapsed(), FAST, "answered at R");
    assert_eq!(fakes[2].reads(), 1, "the frozen replica was asked too");
    // close waits half a second for repairs, not the frozen replica's
    // whole rpc timeout.
    let closing = tokio::time::Instant::now();
    client.close().await;
    assert_eq!(closing.elapsed(), Duration::from_millis(500));
    assert_eq!(fakes[2].holds("k"), None);
}

/// The client never writes to a replica (its pipe carries reads only): it
/// asks a node, which reads every replica and repairs those behind.
#[tokio::test(start_paused = true)]
async fn a_late_stale_replica_is_repaired_by_a_node_before_close_returns() {
    let slow = Duration::from_millis(100);
    let (client, fakes) = client_over([
        Script::Answer(FAST),
        Script::Answer(FAST),
        Script::Answer(slow),
    ]);
    let (old, new) = (record_at(2000, "old"), record_at(1000, "new"));
    for (fake, record) in fakes.iter().zip([&new, &new, &old]) {
        fake.store().write_if_newer("k", record).expect("seed");
    }
    let started = tokio::time::Instant::now();
    let read = client.get_record("k").await.expect("read");
    assert_eq!(read, Some(new.clone()));
    assert_eq!(started.elapsed(), FAST);
    client.close().await;
    // The late reply at 100 ms, then one node asked to repair (its answer
    // takes 10 or 100 ms, depending on which replica comes first).
    assert!(started.elapsed() > slow, "{:?}", started.elapsed());
    assert!(started.elapsed() <= slow * 2, "{:?}", started.elapsed());
    assert_eq!(fakes[2].holds("k"), Some(new));
    let asked: usize = fakes.iter().map(|f| f.repair_requests()).sum();
    assert_eq!(asked, 1, "one node asked to repair");
    let written: usize = fakes.iter().map(|f| f.writes()).sum();
    assert_eq!(written, 0, "the client wrote to no replica");
}

/// Replicas that all answered alike need no repair: no node is asked.
#[tokio::test(start_paused = true)]
async fn a_read_that_found_no_replica_behind_asks_no_node_to_repair() {
    let (client, fakes) = client_over([
        Script::Answer(FAST),
        Script::Answer(FAST),
        Script::Answer(FAST),
    ]);
    let record = record_at(1000, "v");
    for fake in &fakes {
        fake.store().write_if_newer("k", &record).expect("seed");
    }
    assert_eq!(client.get_record("k").await.expect("read"), Some(record));
    client.close().await;
    let asked: usize = fakes.iter().map(|f| f.repair_requests()).sum();
    assert_eq!(asked, 0);
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_failed_recently_is_not_asked_unless_the_read_needs_it() {
    let (client, fakes) = client_over([
        Script::Answer(FAST),
        Script::Answer(FAST),
        Script::Answer(Duration::ZERO),
    ]);
    let record = record_at(1000, "v");
    for fake in &fakes {
        fake.store().write_if_newer("k", &record).expect("seed");
    }
    client.mark_down(REPLICAS[2]);
    let started = tokio::time::Instant::now();
    assert_eq!(
        client.get_record("k").await.expect("read"),
        Some(record.clone())
    );
    assert_eq!(started.elapsed(), FAST);
    assert_eq!(
        fakes[2].reads(),
        0,
        "not asked while the read could spare it"
    );
    // Another replica fails: without the skipped one the read cannot reach
    // R, so it is tried once more asking every replica (the belief may be
    // stale, e.g. a node restarted within the penalty).
    fakes[1].set_script(Script::Fail(FAST * 2));
    let started = tokio::time::Instant::now();
    assert_eq!(client.get_record("k").await.expect("read"), Some(record));
    assert_eq!(
        started.elapsed(),
        FAST * 3,
        "the failed try, then R answers"
    );
    assert_eq!(fakes[2].reads(), 1, "asked on the second try");
    // When it really is down too, the error says who was asked.
    fakes[2].set_script(Script::Fail(FAST));
    let error = client.get_record("k").await.expect_err("one of two needed");
    match error {
        Error::QuorumNotReached { roll_call, .. } => {
            assert_eq!(roll_call.answered, vec![REPLICAS[0].to_string()]);
            assert!(roll_call.not_asked.is_empty(), "{roll_call:?}");
        }
        other => panic!("expected QuorumNotReached, got {other:?}"),
    }
}

/// A node's failure status, as the client turns it back into an error: the
/// outcome it reports decides between a refusal and an indeterminate write.
#[test]
fn a_coordinators_outcome_decides_refused_or_indeterminate() {
    let status = |error: Error| tonic::Status::from(error);
    let quorum = |sent| Error::QuorumNotReached {
        operation: "PUT",
        consistency: "QUORUM",
        acks: 1,
        needed: 2,
        replicas: 3,
        roll_call: Box::default(),
        failures: vec![],
        sent,
    };
    let unsent = error_from_status(status(quorum(false)));
    assert!(matches!(unsent, Error::Unavailable(_)), "{unsent:?}");
    assert_eq!(unsent.outcome(), Outcome::NotApplied);
    let sent = error_from_status(status(quorum(true)));
    assert!(matches!(sent, Error::Indeterminate(_)), "{sent:?}");
    assert_eq!(sent.outcome(), Outcome::Unknown);
    let full = error_from_status(status(Error::DiskFull {
        dir: "/d".into(),
        why: "full".into(),
    }));
    assert!(matches!(full, Error::Indeterminate(_)), "{full:?}");
    let change = error_from_status(status(Error::FailedPrecondition("a join".into())));
    assert_eq!(change.outcome(), Outcome::NotApplied);
    // A read's failure carries no outcome: the code decides.
    let read = error_from_status(quorum(true).into_read_status());
    assert!(matches!(read, Error::Unavailable(_)), "{read:?}");
    // Anything else keeps its code and the outcome the node reported.
    let mut denied = tonic::Status::permission_denied("no");
    Outcome::NotApplied.set_on(denied.metadata_mut());
    let denied = error_from_status(denied);
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert_eq!(denied.outcome(), Outcome::NotApplied);
}
