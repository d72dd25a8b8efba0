//! The client-facing read service, `dkvs.v1.ReplicaRead`: the smart
//! client's reads go through it (and need nothing else from a node but
//! `Cluster.Status`), and nothing but a read gets through it.

mod common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{TestCluster, channel, put_request};
use dkvs::client::{Client, ClientOptions};
use dkvs::pb;
use tonic::{Request, Response, Status};

/// A stand-in node serving only `Cluster` and `ReplicaRead`: one member,
/// N = 1, every key held at one version. It keeps the reads it was sent.
#[derive(Clone)]
struct ReadsOnlyNode {
    /// `127.0.0.1:port`.
    address: String,
    /// Every read it was sent.
    reads: Arc<Mutex<Vec<pb::ReplicaReadRequest>>>,
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ReadsOnlyNode {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(pb::StatusResponse {
            address: self.address.clone(),
            replicas: 1,
            vnodes: 8,
            write_quorum: 1,
            read_quorum: 1,
            members: vec![pb::Member {
                address: self.address.clone(),
                state: pb::MemberState::Up as i32,
                ..Default::default()
            }],
            ..Default::default()
        }))
    }

    async fn abort(
        &self,
        _request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        Err(Status::unimplemented("a stand-in node changes no layout"))
    }

    async fn leave(
        &self,
        _request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        Err(Status::unimplemented("a stand-in node changes no layout"))
    }

    async fn remove(
        &self,
        _request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        Err(Status::unimplemented("a stand-in node changes no layout"))
    }
}

#[tonic::async_trait]
impl pb::replica_read_server::ReplicaRead for ReadsOnlyNode {
    async fn batch(
        &self,
        request: Request<pb::ReplicaReadBatchRequest>,
    ) -> Result<Response<pb::ReplicaReadBatchResponse>, Status> {
        let request = request.into_inner();
        let reads = request
            .reads
            .iter()
            .map(|read| pb::ReadResult {
                record: Some(pb::Record {
                    version: Some(pb::Version {
                        lamport: 7 << 16,
                        node_id: 1,
                    }),
                    value: Bytes::from(format!("value of {}", read.key)),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        self.reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(request.reads);
        Ok(Response::new(pb::ReplicaReadBatchResponse { reads }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smart_client_reads_through_the_client_facing_replica_read_service() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let node = ReadsOnlyNode {
        address: listener.local_addr().expect("address").to_string(),
        reads: Arc::default(),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::cluster_server::ClusterServer::new(node.clone()))
            .add_service(pb::replica_read_server::ReplicaReadServer::new(
                node.clone(),
            ))
            .serve_with_incoming_shutdown(dkvs::node::incoming(listener), {
                let stop = stop.clone();
                async move { stop.cancelled().await }
            }),
    );
    for consistency in [
        dkvs::quorum::Consistency::One,
        dkvs::quorum::Consistency::Quorum,
        dkvs::quorum::Consistency::All,
    ] {
        let options = ClientOptions {
            consistency,
            ..ClientOptions::default()
        };
        let client = Client::connect(std::slice::from_ref(&node.address), options)
            .await
            .expect("connect");
        let value = client
            .get("k1")
            .await
            .expect("a read with no Replica service");
        assert_eq!(value.as_deref(), Some(&b"value of k1"[..]));
        client.close().await;
    }
    let reads = node.reads.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(reads.len(), 3, "{reads:?}");
    assert!(
        reads.iter().all(|r| r.key == "k1" && !r.for_repair),
        "{reads:?}"
    );
    stop.cancel();
    server
        .await
        .expect("server task")
        .expect("the stand-in node served");
}

/// `ReplicaReadBatchRequest` cannot express a write: it has reads and
/// nothing else (field 1, where `ReplicaBatchRequest` carries writes, is
/// reserved). So this sends a write batch encoded for `Replica.Batch` to
/// `ReplicaRead.Batch` by hand, and checks it was not applied; and that the
/// one read a node keeps for itself (`for_repair`) is refused. The smart
/// client's own pipe refuses writes before sending (a unit test in
/// src/net/pipe.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_read_refuses_anything_that_is_not_a_read() {
    let cluster = TestCluster::start(1).await;
    let address = cluster.nodes[0].address.clone();
    cluster
        .kv(0)
        .await
        .put(put_request("kept", "v1"))
        .await
        .expect("put");
    let held = cluster.replica_record(0, "kept").await.expect("held");

    let now = dkvs::clock::hlc_of_ms(dkvs::clock::wall_clock_ms());
    let write = |key: &str| pb::ReplicaWriteRequest {
        key: key.into(),
        record: Some(pb::Record {
            version: Some(pb::Version {
                lamport: now + (1 << 16),
                node_id: 99,
            }),
            value: Bytes::from_static(b"smuggled"),
            ..Default::default()
        }),
        layout_version: 0,
        copy: false,
    };
    let smuggled = pb::ReplicaBatchRequest {
        writes: vec![write("kept"), write("new")],
        reads: vec![pb::ReplicaReadRequest {
            key: "kept".into(),
            ..Default::default()
        }],
    };
    let mut grpc = tonic::client::Grpc::new(channel(&address).await);
    grpc.ready().await.expect("ready");
    let reply = grpc
        .unary(
            Request::new(smuggled),
            http::uri::PathAndQuery::from_static("/dkvs.v1.ReplicaRead/Batch"),
            tonic_prost::ProstCodec::<pb::ReplicaBatchRequest, pb::ReplicaBatchResponse>::default(),
        )
        .await
        .expect("the reads of the batch are answered")
        .into_inner();
    assert!(reply.writes.is_empty(), "no write answered: {reply:?}");
    assert_eq!(reply.reads.len(), 1);
    assert_eq!(reply.reads[0].record.as_ref(), Some(&held), "{reply:?}");
    assert_eq!(
        cluster.replica_record(0, "kept").await.as_ref(),
        Some(&held),
        "the smuggled write was not applied"
    );
    assert_eq!(cluster.replica_record(0, "new").await, None);

    let reads = cluster
        .replica_read(0)
        .await
        .batch(pb::ReplicaReadBatchRequest {
            reads: vec![
                pb::ReplicaReadRequest {
                    key: "kept".into(),
                    for_repair: true,
                    ..Default::default()
                },
                pb::ReplicaReadRequest {
                    key: "kept".into(),
                    ..Default::default()
                },
            ],
        })
        .await
        .expect("batch")
        .into_inner()
        .reads;
    assert!(reads[0].rejected, "{:?}", reads[0]);
    assert!(reads[0].error.contains("nodes only"), "{:?}", reads[0]);
    assert_eq!(reads[1].record.as_ref(), Some(&held));
}
