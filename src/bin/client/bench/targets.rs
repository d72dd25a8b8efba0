//! What `DKVSClient bench` sends its load to: the smart client, each node in
//! turn, etcd's KV API, and the do-nothing `KeyValue` server that `--noop`
//! measures against.

use dkvs::Error;
use dkvs::client::Client;
use dkvs::net::Dialer;
use dkvs::pb;

use super::workload::Target;

/// The subset of etcd's KV API in `proto/etcd/kv.proto`, a client only.
/// build.rs compiles it with `dkvs.v1`; only this binary includes it.
mod etcd {
    #![allow(clippy::all, dead_code, missing_docs)]
    tonic::include_proto!("etcdserverpb");
}

/// Nodes in turn, each coordinating the requests it gets.
pub struct ViaNodeTarget {
    nodes: Vec<pb::key_value_client::KeyValueClient<dkvs::net::ClientChannel>>,
    next: std::sync::atomic::AtomicUsize,
    consistency: i32,
}

impl ViaNodeTarget {
    /// Over `options`' dialer (TCP or TLS), with its token.
    pub fn new(addresses: &[String], options: &dkvs::client::ClientOptions) -> Result<Self, Error> {
        let pool = options.peer_pool();
        Ok(Self {
            nodes: addresses
                .iter()
                .map(|address| pool.key_value_client(address))
                .collect::<Result<_, _>>()?,
            next: Default::default(),
            consistency: pb::Consistency::from(options.consistency) as i32,
        })
    }

    fn node(&self) -> pb::key_value_client::KeyValueClient<dkvs::net::ClientChannel> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.nodes[i % self.nodes.len()].clone()
    }
}

impl Target for ViaNodeTarget {
    async fn read(&self, key: String) -> Result<(), String> {
        let request = pb::GetRequest {
            key,
            consistency: self.consistency,
        };
        self.node()
            .get(request)
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }

    async fn update(&self, key: String, value: bytes::Bytes) -> Result<(), String> {
        let request = pb::PutRequest {
            key,
            value,
            consistency: self.consistency,
        };
        self.node()
            .put(request)
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }
}

/// The smart client, owned, for spawning.
pub struct OwnedSmartTarget(pub std::sync::Arc<Client>);

impl Target for OwnedSmartTarget {
    async fn read(&self, key: String) -> Result<(), String> {
        self.0
            .get(&key)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn update(&self, key: String, value: bytes::Bytes) -> Result<(), String> {
        self.0
            .put(&key, value)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// etcd's KV API as a benchmark target (each endpoint in turn; linearizable reads).
pub struct EtcdTarget {
    nodes: Vec<etcd::kv_client::KvClient<tonic::transport::Channel>>,
    next: std::sync::atomic::AtomicUsize,
}

impl EtcdTarget {
    pub fn new(addresses: &[String]) -> Result<Self, Error> {
        Ok(Self {
            nodes: channels(addresses)?
                .into_iter()
                .map(etcd::kv_client::KvClient::new)
                .collect(),
            next: Default::default(),
        })
    }
}

impl Target for EtcdTarget {
    async fn read(&self, key: String) -> Result<(), String> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request = etcd::RangeRequest {
            key: key.into_bytes().into(),
            ..Default::default()
        };
        self.nodes[i % self.nodes.len()]
            .clone()
            .range(request)
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }

    async fn update(&self, key: String, value: bytes::Bytes) -> Result<(), String> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request = etcd::PutRequest {
            key: key.into_bytes().into(),
            value,
            ..Default::default()
        };
        self.nodes[i % self.nodes.len()]
            .clone()
            .put(request)
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }
}

fn channels(addresses: &[String]) -> Result<Vec<tonic::transport::Channel>, Error> {
    addresses
        .iter()
        .map(|a| dkvs::net::TcpDialer::default().dial(a))
        .collect()
}

/// A do-nothing `dkvs.v1.KeyValue` server: the machine's one-hop gRPC ceiling.
struct NoopKeyValue;

#[tonic::async_trait]
impl pb::key_value_server::KeyValue for NoopKeyValue {
    async fn put(
        &self,
        _: tonic::Request<pb::PutRequest>,
    ) -> Result<tonic::Response<pb::PutResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::PutResponse {
            version: Some(pb::Version::default()),
            acks: 1,
        }))
    }

    async fn get(
        &self,
        _: tonic::Request<pb::GetRequest>,
    ) -> Result<tonic::Response<pb::GetResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::GetResponse::default()))
    }

    async fn delete(
        &self,
        _: tonic::Request<pb::DeleteRequest>,
    ) -> Result<tonic::Response<pb::DeleteResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::DeleteResponse {
            version: Some(pb::Version::default()),
            acks: 1,
        }))
    }

    async fn list(
        &self,
        _: tonic::Request<pb::ListRequest>,
    ) -> Result<tonic::Response<pb::ListResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::ListResponse::default()))
    }
}

/// Serves [`NoopKeyValue`] on `listen` until Ctrl-C (`DKVSClient noop-server`).
pub async fn noop_server(listen: std::net::SocketAddr) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot listen on {listen}: {e}")))?;
    eprintln!("noop KeyValue server on {listen}; Ctrl-C to stop");
    tonic::transport::Server::builder()
        .add_service(pb::key_value_server::KeyValueServer::new(NoopKeyValue))
        .serve_with_incoming_shutdown(dkvs::node::incoming(listener), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))
}
