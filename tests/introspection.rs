//! Health and server reflection (v1 and v1alpha), as grpcurl uses them.

mod common;

use common::{TestCluster, channel};
use tonic_reflection::pb::{v1, v1alpha};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_list_every_service() {
    let cluster = TestCluster::start(1).await;
    let address = &cluster.nodes[0].address;

    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(channel(address).await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut replies = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("v1 reflection")
        .into_inner();
    let reply = replies
        .message()
        .await
        .expect("v1 reply")
        .expect("one reply");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("unexpected v1 reply");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for wanted in [
        "dkvs.v1.KeyValue",
        "dkvs.v1.Cluster",
        "dkvs.v1.ReplicaRead",
        "dkvs.v1.Replica",
        "dkvs.v1.Membership",
        "dkvs.v1.Liveness",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} missing from {names:?}"
        );
    }

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel(address).await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "dkvs.v1.KeyValue".into(),
            ),
        ),
    };
    let mut replies = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("v1alpha reflection")
        .into_inner();
    let reply = replies
        .message()
        .await
        .expect("v1alpha reply")
        .expect("one reply");
    assert!(
        matches!(
            reply.message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref files))
                if !files.file_descriptor_proto.is_empty()
        ),
        "v1alpha describes dkvs.v1.KeyValue: {reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_each_service_serving() {
    let cluster = TestCluster::start(1).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        channel(&cluster.nodes[0].address).await,
    );
    for service in [
        "",
        "dkvs.v1.KeyValue",
        "dkvs.v1.Cluster",
        "dkvs.v1.ReplicaRead",
        "dkvs.v1.Replica",
        "dkvs.v1.Membership",
        "dkvs.v1.Liveness",
    ] {
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(
            reply.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_and_unknown_methods_get_codes_and_messages() {
    let cluster = TestCluster::start(1).await;
    // Default --max-value-bytes is 1 MiB: the message limit is 4 MiB.
    let huge = dkvs::pb::PutRequest {
        key: "huge".into(),
        value: vec![0u8; 5 << 20].into(),
        consistency: 0,
    };
    let status = cluster
        .kv(0)
        .await
        .put(huge)
        .await
        .expect_err("over the message limit");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("4194304"), "{}", status.message());
    // An unknown method of a known service, and an unknown service.
    for path in ["/dkvs.v1.KeyValue/Nope", "/dkvs.v9.Nothing/Get"] {
        let mut grpc = tonic::client::Grpc::new(channel(&cluster.nodes[0].address).await);
        grpc.ready().await.expect("ready");
        let status = grpc
            .unary(
                tonic::Request::new(dkvs::pb::GetRequest::default()),
                http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::<dkvs::pb::GetRequest, dkvs::pb::GetResponse>::default(),
            )
            .await
            .expect_err("no such method");
        assert_eq!(
            status.code(),
            tonic::Code::Unimplemented,
            "{path}: {status:?}"
        );
        assert!(status.message().contains(path), "{}", status.message());
    }
}
