//! Nodes hosted in the test process through the library API (`Node` +
//! `serve`), on real loopback sockets bound to port 0 before the nodes start,
//! with in-memory storage. This is the seam a network simulator will use, and
//! it checks that the shutdown signal drains a node and stops its tasks.

use std::sync::Arc;
use std::time::Duration;

use dkvs::client::{Client, ClientOptions};
use dkvs::config::ServerConfig;
use dkvs::net::TcpDialer;
use dkvs::node::{Node, serve};
use dkvs::storage::MemoryStorage;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

struct InProcessNode {
    node: Arc<Node>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<dkvs::Result<()>>,
}

/// Waits until every node at `addresses` reports SERVING (once its cluster
/// id is agreed), within 30 s.
async fn wait_serving(addresses: &[String]) {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for address in addresses {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .expect("valid address")
            .connect_lazy();
        let mut health = HealthClient::new(channel);
        loop {
            let request = HealthCheckRequest {
                service: String::new(),
            };
            if let Ok(reply) = health.check(request).await
                && reply.into_inner().status == 1
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{address} not SERVING"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn start_cluster(count: usize) -> (Vec<String>, Vec<InProcessNode>) {
    let mut listeners = Vec::new();
    for _ in 0..count {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind port 0"));
    }
    let addresses: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").to_string())
        .collect();
    let mut nodes = Vec::new();
    for (listener, address) in listeners.into_iter().zip(&addresses) {
        let config = ServerConfig::from_arg_list(vec![
            "DKVSServer".into(),
            "--listen".into(),
            address.clone(),
            "--peers".into(),
            addresses.join(","),
        ])
        .expect("config");
        let node = Node::with_storage(
            config,
            Arc::new(MemoryStorage::new()),
            Arc::new(TcpDialer::default()),
        )
        .expect("node");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(node.clone(), dkvs::node::incoming(listener), async {
            let _ = stopped.await;
        }));
        nodes.push(InProcessNode {
            node,
            stop: Some(stop),
            task,
        });
    }
    wait_serving(&addresses).await;
    (addresses, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_nodes_serve_and_stop_on_their_shutdown_signal() {
    let (addresses, mut nodes) = start_cluster(3).await;
    // Listeners were bound before the servers started, and every node
    // serves (its cluster id agreed) once start_cluster returns.
    let client = Client::connect(&addresses, ClientOptions::default())
        .await
        .expect("connect");
    for i in 0..50 {
        client
            .put(&format!("k{i}"), format!("v{i}"))
            .await
            .expect("put");
    }
    for i in 0..50 {
        assert_eq!(
            client.get(&format!("k{i}")).await.expect("get").as_deref(),
            Some(format!("v{i}").as_bytes())
        );
    }
    // Every key is on all three nodes (N = 3 of 3 members) once trailing
    // replica writes land.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while nodes
        .iter()
        .any(|n| n.node.replica().stats().live_keys < 50)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replicas never caught up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Stop one node through its signal: serve() drains and returns Ok.
    let stopping = nodes.remove(0);
    stopping
        .stop
        .expect("signal")
        .send(())
        .expect("node still running");
    let result = tokio::time::timeout(Duration::from_secs(10), stopping.task)
        .await
        .expect("node stops within 10 s")
        .expect("serve task");
    assert!(result.is_ok(), "{result:?}");

    // The other two still make a quorum.
    client
        .put("after-stop", "ok")
        .await
        .expect("put with one node stopped");
    assert_eq!(
        client.get("after-stop").await.expect("get").as_deref(),
        Some(&b"ok"[..])
    );
    client.close().await;
    for node in nodes {
        let _ = node.stop.map(|s| s.send(()));
        let _ = tokio::time::timeout(Duration::from_secs(10), node.task).await;
    }
}
