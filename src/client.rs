//! The smart client.
//!
//! It learns the members and ring parameters from any node (`Cluster.Status`)
//! and computes preference lists itself, so requests skip the extra hop
//! through a node that does not hold the key:
//!
//! * PUT and DELETE go to the key's first replica that answers, which
//!   coordinates the write (stamps a version, waits for W). When a node is
//!   unreachable the client tries the next replica, then any other member.
//! * GET is coordinated by the client itself: it asks the key's N replicas
//!   in parallel (internal `Replica.Read`), answers from the first R replies
//!   with the newest version, and repairs stale replicas in the background.
//!   [`Client::close`] waits briefly for those repairs, so a short-lived
//!   process (the CLI) still sends them. When the newest version is held by
//!   fewer than W of the replicas that answered (a QUORUM or ALL read), it
//!   must reach W replicas before it is answered; the client does not write
//!   to replicas itself but asks a node (`KeyValue.Get`, the key's first
//!   live replica first), which repairs before it answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;

use crate::coordinator::{Background, WriteAck, read_quorum};
use crate::error::{COORDINATOR_ERROR_HEADER, Error, Result};
use crate::net::{Dialer, PeerPool, TcpDialer, call_within, describe_status, max_message_bytes};
use crate::pb;
use crate::quorum::Consistency;
use crate::record::Record;
use crate::ring::{Member, Ring};

/// How long a node that failed is tried last.
const DOWN_PENALTY: Duration = Duration::from_secs(2);

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Consistency of every request.
    pub consistency: Consistency,
    /// Deadline of one call to one node.
    pub rpc_timeout: Duration,
    /// Largest value the client will send or receive.
    pub max_value_bytes: usize,
    /// When a coordinator has not answered a PUT/DELETE after this long, the
    /// request is also sent to the next candidate (a hedged request), so one
    /// frozen node does not stall writes for the whole `rpc_timeout`.
    pub hedge_after: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            consistency: Consistency::Quorum,
            rpc_timeout: Duration::from_secs(3),
            max_value_bytes: crate::config::DEFAULT_MAX_VALUE_BYTES,
            hedge_after: Duration::from_millis(500),
        }
    }
}

/// A connection to a DKVS cluster.
pub struct Client {
    /// Settings.
    options: ClientOptions,
    /// Channels to members.
    peers: Arc<PeerPool>,
    /// The cluster's ring, as learned from a node.
    ring: Ring,
    /// Replicas per key, N.
    replicas: usize,
    /// Nodes that failed recently, and when.
    recently_down: Mutex<HashMap<String, Instant>>,
    /// Read repairs in flight.
    background: Background,
    /// The addresses the client was given, asked first for status.
    seeds: Vec<String>,
}

impl Client {
    /// Connects over TCP, learning the cluster from the first of `seeds` that answers.
    pub async fn connect(seeds: &[String], options: ClientOptions) -> Result<Self> {
        Self::connect_with(seeds, options, Arc::new(TcpDialer::default())).await
    }

    /// Connects with a custom [`Dialer`].
    pub async fn connect_with(
        seeds: &[String],
        options: ClientOptions,
        dialer: Arc<dyn Dialer>,
    ) -> Result<Self> {
        let peers = Arc::new(PeerPool::new(
            dialer,
            max_message_bytes(options.max_value_bytes),
        ));
        let mut failures = Vec::new();
        for seed in seeds {
            match fetch_status(&peers, seed, options.rpc_timeout).await {
                Ok(status) => {
                    let members = status
                        .members
                        .iter()
                        .map(|m| Member::new(m.address.clone()));
                    let ring = Ring::new(members, status.vnodes as usize);
                    // Members the node believes down are tried last for a while.
                    let now = Instant::now();
                    let down: HashMap<String, Instant> = status
                        .members
                        .iter()
                        .filter(|m| m.state == pb::MemberState::Down as i32)
                        .map(|m| (m.address.clone(), now))
                        .collect();
                    return Ok(Self {
                        replicas: status.replicas as usize,
                        ring,
                        peers,
                        options,
                        recently_down: Mutex::new(down),
                        background: Background::new(CancellationToken::new()),
                        seeds: seeds.to_vec(),
                    });
                }
                Err(why) => failures.push(format!("{seed}: {why}")),
            }
        }
        Err(Error::Unavailable(if seeds.is_empty() {
            "no DKVS node address given (--nodes or DKVS_NODES)".to_string()
        } else {
            format!("no DKVS node answered: {}", failures.join("; "))
        }))
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    pub fn consistency(&self) -> Consistency {
        self.options.consistency
    }

    pub fn set_consistency(&mut self, consistency: Consistency) {
        self.options.consistency = consistency;
    }

    /// The key's replicas, in preference order.
    pub fn replicas_of(&self, key: &str) -> Vec<String> {
        self.ring
            .preference_list(key.as_bytes(), self.replicas)
            .into_iter()
            .map(|m| m.address.clone())
            .collect()
    }

    /// Stores `value` under `key`.
    pub async fn put(&self, key: &str, value: impl Into<Bytes>) -> Result<WriteAck> {
        let request = pb::PutRequest {
            key: key.to_string(),
            value: value.into(),
            consistency: pb::Consistency::from(self.options.consistency) as i32,
        };
        let reply = self
            .on_coordinator(key, "PUT", |mut client| {
                let request = request.clone();
                async move { client.put(request).await.map(|r| r.into_inner()) }
            })
            .await?;
        write_ack(reply.version, reply.acks)
    }

    /// Deletes `key` (writes a tombstone).
    pub async fn delete(&self, key: &str) -> Result<WriteAck> {
        let request = pb::DeleteRequest {
            key: key.to_string(),
            consistency: pb::Consistency::from(self.options.consistency) as i32,
        };
        let reply = self
            .on_coordinator(key, "DELETE", |mut client| {
                let request = request.clone();
                async move { client.delete(request).await.map(|r| r.into_inner()) }
            })
            .await?;
        write_ack(reply.version, reply.acks)
    }

    /// Reads `key`: its value, or `None` when it does not exist or was deleted.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.get_record(key).await?.and_then(|record| record.value))
    }

    /// Reads `key` with its version (a tombstone when it was deleted).
    pub async fn get_record(&self, key: &str) -> Result<Option<Record>> {
        if self.options.consistency == Consistency::Any {
            return Err(Error::InvalidArgument(
                "consistency ANY applies to writes only; read at ONE, QUORUM or ALL".into(),
            ));
        }
        let replicas = self
            .replicas_of(key)
            .iter()
            .map(|address| self.peers.replica_handle(address, None))
            .collect::<Result<Vec<_>>>()?;
        let result = read_quorum(
            replicas,
            key,
            self.options.consistency,
            self.options.rpc_timeout,
        )
        .await?;
        if result.blocking.is_some() {
            return self.get_through_node(key).await;
        }
        result.repair.schedule(&self.background);
        Ok(result.record)
    }

    /// Reads `key` through a node's `KeyValue.Get`, which repairs the newest
    /// version to W replicas before answering: the key's replicas first
    /// (live ones before recently failed ones), then any other member. A
    /// read has no side effect the client could duplicate, so a node that
    /// fails or does not answer is simply followed by the next one.
    async fn get_through_node(&self, key: &str) -> Result<Option<Record>> {
        let request = pb::GetRequest {
            key: key.to_string(),
            consistency: pb::Consistency::from(self.options.consistency) as i32,
        };
        let timeout = self.options.rpc_timeout;
        let mut failures = Vec::new();
        for address in self.candidates(&self.replicas_of(key)) {
            let mut client = self.peers.key_value_client(&address)?;
            match tokio::time::timeout(timeout, client.get(request.clone())).await {
                Ok(Ok(reply)) => return record_from_get(reply.into_inner()),
                Ok(Err(status)) if status.metadata().get(COORDINATOR_ERROR_HEADER).is_some() => {
                    return Err(error_from_status(status));
                }
                Ok(Err(status)) => {
                    self.mark_down(&address);
                    failures.push(format!("{address}: {}", describe_status(&status)));
                }
                Err(_) => {
                    self.mark_down(&address);
                    failures.push(format!(
                        "{address}: no answer within {} ms",
                        timeout.as_millis()
                    ));
                }
            }
        }
        Err(Error::Unavailable(format!(
            "GET of {key:?} needs a node to repair the newest version to a quorum before answering, and none could: {}",
            failures.join("; ")
        )))
    }

    /// How the cluster looks from the first node that answers: the
    /// addresses the client was given first, then the other members.
    pub async fn status(&self) -> Result<pb::StatusResponse> {
        let mut failures = Vec::new();
        for address in self.candidates(&self.seeds) {
            match fetch_status(&self.peers, &address, self.options.rpc_timeout).await {
                Ok(status) => return Ok(status),
                Err(why) => {
                    self.mark_down(&address);
                    failures.push(format!("{address}: {why}"));
                }
            }
        }
        Err(Error::Unavailable(format!(
            "no DKVS node answered: {}",
            failures.join("; ")
        )))
    }

    /// Waits up to half a second for background read repairs to finish.
    pub async fn close(&self) {
        self.background.close(Duration::from_millis(500)).await;
    }

    /// Members in the order to try them: `first` (in order), then the rest;
    /// recently failed nodes last.
    fn candidates(&self, first: &[String]) -> Vec<String> {
        let mut order: Vec<String> = first.to_vec();
        for member in self.ring.members() {
            if !order.contains(&member.address) {
                order.push(member.address.clone());
            }
        }
        let down = self
            .recently_down
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        let is_down = |a: &String| {
            down.get(a)
                .is_some_and(|t| now.duration_since(*t) < DOWN_PENALTY)
        };
        let (mut up, failed): (Vec<_>, Vec<_>) = order.into_iter().partition(|a| !is_down(a));
        up.extend(failed);
        up
    }

    fn mark_down(&self, address: &str) {
        self.recently_down
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(address.to_string(), Instant::now());
    }

    /// Sends a request to the key's first replica that answers (then to any
    /// other member), and returns its reply. A node that fails is skipped; a
    /// node that is slow to answer gets company: after `hedge_after` the next
    /// candidate is asked too, and the first answer wins (at most two in
    /// flight). An error decided by a coordinator (bad input, quorum not
    /// reached) is returned as is.
    async fn on_coordinator<T, F, Fut>(&self, key: &str, operation: &str, call: F) -> Result<T>
    where
        F: Fn(pb::key_value_client::KeyValueClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let mut candidates = self.candidates(&self.replicas_of(key)).into_iter();
        let mut in_flight = FuturesUnordered::new();
        let mut failures = Vec::new();
        let mut all_timed_out = true;
        let timeout = self.options.rpc_timeout;
        let attempt = |address: String| -> Result<_> {
            let client = self.peers.key_value_client(&address)?;
            let reply = call(client);
            Ok(async move { (address, tokio::time::timeout(timeout, reply).await) })
        };
        loop {
            if in_flight.is_empty() {
                match candidates.next() {
                    Some(address) => in_flight.push(attempt(address)?),
                    None => break,
                }
            }
            let hedge = tokio::time::sleep(self.options.hedge_after);
            tokio::select! {
                Some((address, outcome)) = in_flight.next() => match outcome {
                    Ok(Ok(reply)) => return Ok(reply),
                    Ok(Err(status)) if status.metadata().get(COORDINATOR_ERROR_HEADER).is_some() => {
                        return Err(error_from_status(status));
                    }
                    Ok(Err(status)) => {
                        self.mark_down(&address);
                        all_timed_out = false;
                        failures.push(format!("{address}: {}", describe_status(&status)));
                    }
                    Err(_) => {
                        self.mark_down(&address);
                        failures.push(format!("{address}: no answer within {} ms", timeout.as_millis()));
                    }
                },
                () = hedge, if in_flight.len() < 2 => {
                    if let Some(address) = candidates.next() {
                        in_flight.push(attempt(address)?);
                    }
                }
            }
        }
        let message = format!(
            "{operation} failed: no node could coordinate it: {}",
            failures.join("; ")
        );
        Err(if all_timed_out && !failures.is_empty() {
            Error::DeadlineExceeded(message)
        } else {
            Error::Unavailable(message)
        })
    }
}

async fn fetch_status(
    peers: &PeerPool,
    address: &str,
    timeout: Duration,
) -> std::result::Result<pb::StatusResponse, String> {
    let mut client = peers.cluster_client(address).map_err(|e| e.to_string())?;
    call_within(timeout, client.status(pb::StatusRequest {})).await
}

fn write_ack(version: Option<pb::Version>, acks: u32) -> Result<WriteAck> {
    let version = version
        .ok_or_else(|| Error::Internal("the coordinator answered without a version".into()))?;
    Ok(WriteAck {
        version: version.into(),
        acks: acks as usize,
    })
}

/// The record a node's `KeyValue.Get` answered (a tombstone when the key
/// was deleted, `None` when no replica knows it).
fn record_from_get(reply: pb::GetResponse) -> Result<Option<Record>> {
    match (reply.found, reply.version) {
        (true, Some(version)) => Ok(Some(Record::value(version.into(), reply.value))),
        (false, Some(version)) => Ok(Some(Record::tombstone(version.into()))),
        (false, None) => Ok(None),
        (true, None) => Err(Error::Internal(
            "the coordinator answered a found key without its version".into(),
        )),
    }
}

/// Turns a coordinator's status back into the error it came from (by code).
fn error_from_status(status: tonic::Status) -> Error {
    let message = status.message().to_string();
    match status.code() {
        tonic::Code::InvalidArgument => Error::InvalidArgument(message),
        tonic::Code::Unavailable => Error::Unavailable(message),
        tonic::Code::DeadlineExceeded => Error::DeadlineExceeded(message),
        _ => Error::Internal(format!("{:?}: {message}", status.code())),
    }
}
