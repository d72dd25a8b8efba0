//! The smart client.
//!
//! It learns the members and ring parameters from any node (`Cluster.Status`)
//! and computes preference lists itself, so requests skip the extra hop
//! through a node that does not hold the key:
//!
//! * PUT and DELETE go to the key's first replica that answers, which
//!   coordinates the write (stamps a version, waits for W). When a node
//!   cannot be connected to, the client tries the next replica, then any
//!   other member. A write is never hedged or retried once it may have
//!   reached a coordinator: a timeout or a connection broken mid-request is
//!   reported as [`Error::Indeterminate`] (the write may or may not have been
//!   applied, and may take effect later). A coordinator's failure answer
//!   says itself whether the write took effect (`dkvs-outcome`): a refusal
//!   before anything reached a replica stays a refusal
//!   ([`Error::Unavailable`], [`Error::FailedPrecondition`], ...: not
//!   applied), and a failure after the write was sent (fewer than W
//!   acknowledgements, superseded, a replica's full disk) becomes
//!   [`Error::Indeterminate`] too.
//! * GET is coordinated by the client itself: it asks the key's N replicas
//!   in parallel (`ReplicaRead.Batch`, client-facing and read-only), answers
//!   from the first R replies with the newest version, and when a replica
//!   answered behind, has a node repair it in the background (a
//!   `KeyValue.Get` at ONE to the key's first live replica: a node's read
//!   repairs every replica behind). The client never writes to a replica.
//!   [`Client::close`] waits briefly for those requests, so a short-lived
//!   process (the CLI) still sends them. When the newest version is held by
//!   fewer than W of the replicas that answered (a QUORUM or ALL read), it
//!   must reach W replicas before it is answered; the client does not write
//!   to replicas itself but asks a node (`KeyValue.Get`, the key's first
//!   live replica first), which repairs before it answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;

use crate::background::Background;
use crate::coordinator::{PendingRepair, WriteAck, read_quorum};
use crate::error::{COORDINATOR_ERROR_HEADER, Error, Outcome, Result};
use crate::locks::Locked;
use crate::net::{
    CallError, Dialer, PeerPool, TcpDialer, call_within, describe_status, max_message_bytes,
    never_sent,
};
use crate::pb;
use crate::placement::{Placement, SharedPlacement};
use crate::quorum::Consistency;
use crate::record::Record;
use crate::ring::{Member, Ring};

/// How long a node that failed is tried last.
const DOWN_PENALTY: Duration = Duration::from_secs(2);
/// How long the client waits for a seed's answer before also asking the next.
const SEED_STAGGER: Duration = Duration::from_millis(100);

pub use crate::net::DEADLINE_HEADER;

/// Set on a write the client sends to a node other than the key's first
/// replica because that one did not answer or was believed down: the node
/// coordinates it instead of forwarding it to that replica (which, before
/// its failure detector convicts a frozen node, it would still believe up).
pub const COORDINATE_HERE_HEADER: &str = "dkvs-coordinate-here";

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Consistency of every request.
    pub consistency: Consistency,
    /// Deadline of one call to one node.
    pub rpc_timeout: Duration,
    /// Largest value the client will send or receive.
    pub max_value_bytes: usize,
    /// The token every call carries (none by default).
    pub bearer: crate::net::BearerStamp,
    /// TLS, with the CA the nodes' certificates chain to (none: plaintext).
    pub tls: Option<crate::security::tls::ClientTls>,
}

impl ClientOptions {
    /// What dials nodes: TLS when `tls` is set, else plain TCP.
    pub fn dialer(&self) -> Arc<dyn Dialer> {
        match &self.tls {
            Some(tls) => Arc::new(crate::net::TlsDialer::new(tls.clone())),
            None => Arc::new(TcpDialer::default()),
        }
    }

    /// A pool of channels to nodes with these options' dialer, token and
    /// message limit.
    pub fn peer_pool(&self) -> PeerPool {
        PeerPool::new(self.dialer(), max_message_bytes(self.max_value_bytes))
            .with_bearer(self.bearer.clone())
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            consistency: Consistency::Quorum,
            rpc_timeout: Duration::from_secs(3),
            max_value_bytes: crate::config::DEFAULT_MAX_VALUE_BYTES,
            bearer: crate::net::BearerStamp::default(),
            tls: None,
        }
    }
}

/// How often a client whose layout shows data moving asks whether the
/// move is over.
const LAYOUT_RECHECK: Duration = Duration::from_secs(1);

/// A connection to a DKVS cluster.
pub struct Client {
    /// Settings.
    options: ClientOptions,
    /// Channels to members.
    peers: Arc<PeerPool>,
    /// The cluster's layout as learned from a node: the read ring, N, and
    /// the layout version reads are placed with (refreshed when a replica
    /// serves a newer one).
    placement: SharedPlacement,
    /// When the client last asked for the layout while data was moving.
    layout_checked: Mutex<Instant>,
    /// Nodes that failed recently, and when.
    recently_down: Mutex<HashMap<String, Instant>>,
    /// Read repairs in flight.
    background: Background,
    /// The addresses the client was given, asked first for status.
    seeds: Vec<String>,
}

impl Client {
    /// Connects over TCP (or TLS, when the options say so), learning the
    /// cluster from the first of `seeds` that answers.
    pub async fn connect(seeds: &[String], options: ClientOptions) -> Result<Self> {
        let dialer = options.dialer();
        Self::connect_with(seeds, options, dialer).await
    }

    /// The options the client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Connects with a custom [`Dialer`].
    pub async fn connect_with(
        seeds: &[String],
        options: ClientOptions,
        dialer: Arc<dyn Dialer>,
    ) -> Result<Self> {
        let peers = Arc::new(
            PeerPool::new(dialer, max_message_bytes(options.max_value_bytes))
                .with_bearer(options.bearer.clone()),
        );
        let failures = match first_status(&peers, seeds, options.rpc_timeout).await {
            Ok((status, silent)) => {
                let placement = placement_of(&status)?;
                // Members the node believes down are tried last for a while.
                let now = Instant::now();
                // So are seeds that were still silent when another answered
                // (frozen, or overloaded: they get the penalty, not a timeout).
                let down: HashMap<String, Instant> = status
                    .members
                    .iter()
                    .filter(|m| m.state == pb::MemberState::Down as i32)
                    .map(|m| m.address.clone())
                    .chain(silent)
                    .map(|address| (address, now))
                    .collect();
                return Ok(Self {
                    placement: SharedPlacement::new(placement),
                    layout_checked: Mutex::new(Instant::now()),
                    peers,
                    options,
                    recently_down: Mutex::new(down),
                    background: Background::new(CancellationToken::new()),
                    seeds: seeds.to_vec(),
                });
            }
            Err(failures) => failures,
        };
        Err(if seeds.is_empty() {
            Error::Unavailable("no DKVS node address given (--nodes or DKVS_NODES)".to_string())
        } else {
            no_node_answered(&failures)
        })
    }

    /// The read ring of the layout the client knows.
    pub fn ring(&self) -> Arc<Ring> {
        self.placement.snapshot().ring().clone()
    }

    pub fn replicas(&self) -> usize {
        self.placement.snapshot().replicas()
    }

    /// The layout version the client places reads with (0: none known).
    pub fn layout_version(&self) -> u64 {
        self.placement.snapshot().version()
    }

    /// Asks the members for the cluster's layout and uses it if it is
    /// newer than the one known (a replica refused a read placed with an
    /// older one).
    pub async fn refresh_layout(&self) -> Result<()> {
        self.refresh_layout_to(0).await
    }

    /// [`Client::refresh_layout`], then, while the layout learned is older
    /// than `wanted` (what a replica that refused a read serves), asks the
    /// other members in turn: the first to answer may itself be behind (a
    /// member that cannot save its layout file stays behind for good, and
    /// every read would be refused as stale).
    async fn refresh_layout_to(&self, wanted: u64) -> Result<()> {
        let view = self.placement.snapshot();
        let mut addresses: Vec<String> = view.members().iter().map(|m| m.address.clone()).collect();
        addresses.extend(self.seeds.iter().cloned());
        addresses.dedup();
        let (status, _) = first_status(&self.peers, &addresses, self.options.rpc_timeout)
            .await
            .map_err(|failures| no_node_answered(&failures))?;
        let mut fresh = placement_of(&status)?;
        // Only a layout of the cluster this client already knows: a node of
        // another cluster at a seed's address must not take it over.
        let cluster_of = |p: &Placement| p.layout().map_or(0, |l| l.cluster_id);
        let own_cluster = cluster_of(&view);
        for address in addresses.iter().filter(|a| **a != status.address) {
            if fresh.version() >= wanted {
                break;
            }
            let asked = fetch_status(&self.peers, address, self.options.rpc_timeout).await;
            if let Ok(newer) = asked
                .map_err(|e| e.to_string())
                .and_then(|status| placement_of(&status).map_err(|e| e.to_string()))
                && newer.version() > fresh.version()
                && (own_cluster == 0 || cluster_of(&newer) == own_cluster)
            {
                fresh = newer;
            }
        }
        if fresh.version() > self.placement.snapshot().version() {
            self.placement.replace(fresh);
        }
        Ok(())
    }

    pub fn consistency(&self) -> Consistency {
        self.options.consistency
    }

    pub fn set_consistency(&mut self, consistency: Consistency) {
        self.options.consistency = consistency;
    }

    /// The key's replicas, in preference order.
    pub fn replicas_of(&self, key: &str) -> Vec<String> {
        self.placement
            .snapshot()
            .replicas_of(key)
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
            .write_on_coordinator(key, "PUT", |mut client, deadline, timeout, here| {
                let request = with_deadline(request.clone(), deadline, timeout, here);
                async move { client.put(request).await.map(|r| r.into_inner()) }
            })
            .await?;
        pb::write_ack(reply.version, reply.acks)
    }

    /// Deletes `key` (writes a tombstone).
    pub async fn delete(&self, key: &str) -> Result<WriteAck> {
        let request = pb::DeleteRequest {
            key: key.to_string(),
            consistency: pb::Consistency::from(self.options.consistency) as i32,
        };
        let reply = self
            .write_on_coordinator(key, "DELETE", |mut client, deadline, timeout, here| {
                let request = with_deadline(request.clone(), deadline, timeout, here);
                async move { client.delete(request).await.map(|r| r.into_inner()) }
            })
            .await?;
        pb::write_ack(reply.version, reply.acks)
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
        // Replicas believed down (by the node asked for status, or because
        // they just failed here) are not asked, so neither the read nor the
        // repairs after it wait for them; but only as many as the read can
        // spare. The belief may be stale (a node restarted within the
        // penalty): when the read fails without them, it is tried once more
        // asking every replica, which costs at most a timeout.
        let consistency = self.options.consistency;
        // While data moves, a QUORUM or ALL answer must first be held by W
        // replicas of every replica set: a node does that (the client never
        // writes to replicas).
        if self.placement.snapshot().is_moving() && consistency != Consistency::One {
            // Notice when the move is over (nodes coordinating the reads
            // never refuse them as stale).
            let due = {
                let mut last = self.layout_checked.locked();
                let due = last.elapsed() >= LAYOUT_RECHECK;
                if due {
                    *last = Instant::now();
                }
                due
            };
            if due {
                let _ = self.refresh_layout().await;
            }
            if self.placement.snapshot().is_moving() {
                return self.get_through_node(key).await;
            }
        }
        let timeout = self.options.rpc_timeout;
        let mut attempts = 0;
        let result = loop {
            let addresses = self.replicas_of(key);
            let (replicas, skipped) = self.read_handles(&addresses, true)?;
            let read = match read_quorum(replicas, key, consistency, timeout).await {
                Err(Error::QuorumNotReached { .. }) if skipped > 0 => {
                    let (everyone, _) = self.read_handles(&addresses, false)?;
                    read_quorum(everyone, key, consistency, timeout).await
                }
                answered => answered,
            };
            match read {
                // Placed with an old layout: learn the new one, read again.
                Err(Error::StaleLayout { current, .. }) if attempts < 3 => {
                    attempts += 1;
                    self.refresh_layout_to(current).await?;
                }
                other => break other?,
            }
        };
        if result.blocking.is_some() {
            return self.get_through_node(key).await;
        }
        self.repair_through_node(key, result.repair);
        Ok(result.record)
    }

    /// Once the read's late replies are in, and if a replica answered
    /// behind, asks a node to repair it (in the background): the key's
    /// replicas first, live ones before recently failed ones, until one
    /// answers. The client cannot write to replicas itself.
    fn repair_through_node(&self, key: &str, repair: PendingRepair) {
        let replicas = self.replicas_of(key);
        let mut nodes = self.candidates(&replicas);
        nodes.truncate(replicas.len().max(1));
        let (peers, key, timeout) = (
            self.peers.clone(),
            key.to_string(),
            self.options.rpc_timeout,
        );
        self.background.spawn(async move {
            let behind = repair.behind().await;
            if behind.is_empty() {
                return;
            }
            let mut failures = Vec::new();
            for node in &nodes {
                match peers.repair_through_node(node, &key, timeout).await {
                    Ok(()) => return,
                    Err(why) => failures.push(format!("{node}: {why}")),
                }
            }
            tracing::debug!(
                key,
                ?behind,
                ?failures,
                "no node could repair the replicas behind"
            );
        });
    }

    /// Handles to `addresses` for a read, and how many are marked not to be
    /// asked: with `skip_down`, replicas believed down, as many as the read
    /// can spare.
    fn read_handles(
        &self,
        addresses: &[String],
        skip_down: bool,
    ) -> Result<(Vec<crate::net::ReplicaHandle>, usize)> {
        let needed = self.options.consistency.required(addresses.len());
        let spare = addresses.len().saturating_sub(needed);
        let mut skipped = 0;
        let layout_version = self.layout_version();
        let handles = addresses
            .iter()
            .map(|address| {
                let mut handle = self.peers.read_handle(address)?;
                handle.layout_version = layout_version;
                if skip_down && skipped < spare && self.is_recently_down(address) {
                    skipped += 1;
                    handle.believed_down = Some(format!(
                        "failed or reported down within the last {} s",
                        DOWN_PENALTY.as_secs()
                    ));
                }
                Ok(handle)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((handles, skipped))
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
        let replicas = self.replicas_of(key);
        // Nodes that answered without reaching a quorum; at most N of them
        // are tried, so a failure every node sees alike (ALL with a replica
        // down) costs N answers, not one per member.
        let mut undecided = 0;
        let mut failures = Vec::new();
        for address in self.candidates(&replicas) {
            let mut client = self.peers.key_value_client(&address)?;
            match tokio::time::timeout(timeout, client.get(request.clone())).await {
                Ok(Ok(reply)) => return pb::record_from_get_response(reply.into_inner()),
                // A node that could not reach a quorum from where it stands
                // (say, on the minority side of a partition) decided nothing:
                // another node may reach one. A read has no effect to repeat
                // (its repair writes an existing version, if newer).
                Ok(Err(status))
                    if status.metadata().get(COORDINATOR_ERROR_HEADER).is_some()
                        && matches!(
                            status.code(),
                            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                        ) =>
                {
                    undecided += 1;
                    if undecided >= replicas.len() {
                        return Err(error_from_status(status));
                    }
                    failures.push(format!("{address}: {}", describe_status(&status)));
                }
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
        let candidates = self.candidates(&self.seeds);
        match first_status(&self.peers, &candidates, self.options.rpc_timeout).await {
            Ok((status, silent)) => {
                for address in &silent {
                    self.mark_down(address);
                }
                Ok(status)
            }
            Err(failures) => {
                for (address, _) in &failures {
                    self.mark_down(address);
                }
                Err(no_node_answered(&failures))
            }
        }
    }

    /// One page of the cluster's key listing (`KeyValue.List`, coordinated
    /// by a node): keys starting with `prefix` after `cursor` (empty: from
    /// the start), at most `limit` (0: the node's default), at this
    /// client's consistency. The cursor of the next page comes back; empty
    /// once the listing is complete. A node that does not answer is passed
    /// over for the next; a node's own refusal is the answer.
    pub async fn list_page(
        &self,
        prefix: &str,
        limit: u32,
        cursor: &str,
    ) -> Result<(Vec<(String, crate::clock::Version)>, String)> {
        let request = pb::ListRequest {
            prefix: prefix.to_string(),
            limit,
            cursor: cursor.to_string(),
            consistency: pb::Consistency::from(self.options.consistency) as i32,
        };
        // A page may read many windows: the node answers within half its
        // request deadline, and this call waits for that much at most.
        let timeout = self.options.rpc_timeout.max(Duration::from_secs(10));
        let mut failures = Vec::new();
        for address in self.candidates(&self.seeds) {
            let mut client = self.peers.key_value_client(&address)?;
            match tokio::time::timeout(timeout, client.list(request.clone())).await {
                Ok(Ok(reply)) => {
                    let reply = reply.into_inner();
                    let keys = reply
                        .keys
                        .into_iter()
                        .map(|listed| {
                            // Shown, never compared: no skew bound.
                            let version = listed.version.unwrap_or_default();
                            let version =
                                crate::clock::Version::new(version.lamport, version.node_id);
                            (listed.key, version)
                        })
                        .collect();
                    return Ok((keys, reply.cursor));
                }
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
            "no node answered the listing: {}",
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
        for member in self.placement.snapshot().members() {
            if !order.contains(&member.address) {
                order.push(member.address.clone());
            }
        }
        let down = self.recently_down.locked();
        let now = Instant::now();
        let is_down = |a: &String| {
            down.get(a)
                .is_some_and(|t| now.duration_since(*t) < DOWN_PENALTY)
        };
        let (mut up, failed): (Vec<_>, Vec<_>) = order.into_iter().partition(|a| !is_down(a));
        up.extend(failed);
        up
    }

    fn is_recently_down(&self, address: &str) -> bool {
        self.recently_down
            .locked()
            .get(address)
            .is_some_and(|t| t.elapsed() < DOWN_PENALTY)
    }

    fn mark_down(&self, address: &str) {
        self.recently_down
            .locked()
            .insert(address.to_string(), Instant::now());
    }

    /// Sends a write to the key's first replica that can take it (then to
    /// any other member) and returns its reply.
    ///
    /// `call` gets the attempt's deadline for [`DEADLINE_HEADER`], its
    /// timeout, and whether the node is asked to coordinate the write
    /// itself ([`COORDINATE_HERE_HEADER`]: it is not the key's first
    /// replica, which this client found down). A write
    /// goes to a second coordinator only when the attempt provably never
    /// reached the first: the connection could not be made. Anything
    /// else that is not a coordinator's answer — no reply within
    /// `rpc_timeout`, a connection that broke after the request left — makes
    /// the outcome indeterminate: the first coordinator may still apply the
    /// write, later, with its own version, so a copy sent elsewhere could be
    /// acknowledged now and overwritten by the abandoned one afterwards (or
    /// overwrite a later write). The node is marked down either way, so the
    /// next request tries the next replica first. An error decided by a
    /// coordinator (bad input, quorum not reached), or one that says the
    /// write was not applied (a node refusing it before its handler ran),
    /// is returned with the outcome it reports ([`error_from_status`]).
    async fn write_on_coordinator<T, F, Fut>(
        &self,
        key: &str,
        operation: &str,
        call: F,
    ) -> Result<T>
    where
        F: Fn(
            pb::key_value_client::KeyValueClient<crate::net::ClientChannel>,
            u64,
            Duration,
            bool,
        ) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let timeout = self.options.rpc_timeout;
        let mut refused = Vec::new();
        let replicas = self.replicas_of(key);
        for address in self.candidates(&replicas) {
            let client = self.peers.key_value_client(&address)?;
            let failover = replicas.first() != Some(&address);
            // A write the node shed (not applied, with a retry hint) is
            // sent again after the hint, jittered, within the timeout.
            let answer = crate::net::shed::call_until_not_shed(timeout, |left| {
                let deadline =
                    crate::clock::wall_clock_ms().saturating_add(left.as_millis() as u64);
                call(client.clone(), deadline, left, failover)
            })
            .await
            .ok_or(());
            let why = match answer {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(status))
                    if status.metadata().get(COORDINATOR_ERROR_HEADER).is_some()
                        || Outcome::of(status.metadata()) == Some(Outcome::NotApplied) =>
                {
                    return Err(error_from_status(status));
                }
                Ok(Err(status)) if never_sent(&status) => {
                    self.mark_down(&address);
                    refused.push(format!("{address}: {}", describe_status(&status)));
                    continue;
                }
                // tonic's own timer for the call's grpc-timeout, which
                // races with this one.
                Ok(Err(status)) if crate::net::is_tonic_timeout(&status) => {
                    format!("no answer within {} ms", timeout.as_millis())
                }
                Ok(Err(status)) => describe_status(&status),
                Err(_) => format!("no answer within {} ms", timeout.as_millis()),
            };
            self.mark_down(&address);
            let tried = if refused.is_empty() {
                String::new()
            } else {
                format!(" (not reached: {})", refused.join("; "))
            };
            return Err(Error::Indeterminate(format!(
                "{operation} of key {key:?} may or may not have been applied: \
                 coordinator {address}: {why}; it may still take effect later{tried}"
            )));
        }
        Err(Error::Unavailable(format!(
            "{operation} failed: no node could coordinate it: {}",
            refused.join("; ")
        )))
    }
}

/// `message` as a request carrying `deadline` (Unix ms) in [`DEADLINE_HEADER`]
/// and `timeout` in `grpc-timeout`: the node bounds its work by the relative
/// timeout, and tells a request its client gave up on by comparing send
/// times, never by comparing its clock with the client's.
fn with_deadline<T>(
    message: T,
    deadline: u64,
    timeout: Duration,
    coordinate_here: bool,
) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    let metadata = request.metadata_mut();
    metadata.insert(
        DEADLINE_HEADER,
        tonic::metadata::MetadataValue::from(deadline),
    );
    if coordinate_here {
        metadata.insert(
            COORDINATE_HERE_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
    }
    request
}

/// Asks `addresses` for `Cluster.Status` in turn, each [`SEED_STAGGER`]
/// after the previous unless one has answered (at once after one fails
/// outright); the first answer wins. A frozen node (connections accepted,
/// nothing answered) so costs the stagger, not a whole timeout. Otherwise
/// answers every address with why it failed.
async fn first_status(
    peers: &Arc<PeerPool>,
    addresses: &[String],
    timeout: Duration,
) -> std::result::Result<(pb::StatusResponse, Vec<String>), Vec<(String, CallError)>> {
    let mut failures = Vec::new();
    let mut asked: Vec<String> = Vec::new();
    let mut pending = addresses.iter();
    let mut asks = FuturesUnordered::new();
    let ask = |address: &String| {
        let (peers, address) = (peers.clone(), address.clone());
        async move {
            let answer = fetch_status(&peers, &address, timeout).await;
            (address, answer)
        }
    };
    let start = |address: &String, asked: &mut Vec<String>| {
        asked.push(address.clone());
        ask(address)
    };
    if let Some(address) = pending.next() {
        asks.push(start(address, &mut asked));
    }
    while !asks.is_empty() {
        let next = tokio::select! {
            biased;
            next = asks.next() => next,
            () = tokio::time::sleep(SEED_STAGGER), if pending.len() > 0 => {
                if let Some(address) = pending.next() {
                    asks.push(start(address, &mut asked));
                }
                continue;
            }
        };
        let Some((address, answer)) = next else { break };
        match answer {
            Ok(status) => {
                // Asked before the winner and still silent: likely frozen.
                let silent = asked
                    .into_iter()
                    .take_while(|a| *a != address)
                    .filter(|a| !failures.iter().any(|(f, _)| f == a))
                    .collect();
                return Ok((status, silent));
            }
            Err(why) => {
                failures.push((address, why));
                if let Some(address) = pending.next() {
                    asks.push(start(address, &mut asked));
                }
            }
        }
    }
    Err(failures)
}

async fn fetch_status(
    peers: &PeerPool,
    address: &str,
    timeout: Duration,
) -> std::result::Result<pb::StatusResponse, CallError> {
    let mut client = peers
        .cluster_client(address)
        .map_err(|e| CallError::Failed(e.to_string()))?;
    call_within(timeout, client.status(pb::StatusRequest {})).await
}

/// The error when no seed answered: a timeout (exit 4 in `DKVSClient`)
/// when every one of them was silent, unavailable otherwise.
fn no_node_answered(failures: &[(String, CallError)]) -> Error {
    let listed = failures
        .iter()
        .map(|(seed, why)| format!("{seed}: {why}"))
        .collect::<Vec<_>>()
        .join("; ");
    let mut message = format!("no DKVS node answered: {listed}");
    if [
        "transport error",
        "h2 protocol error",
        "InvalidContentType",
        "corrupt message",
    ]
    .iter()
    .any(|sign| listed.contains(sign))
    {
        message.push_str(
            " (a node serving TLS refuses plaintext, and a plaintext node refuses TLS: \
             pass --tls-ca (DKVS_TLS_CA) exactly when the nodes run with --tls-cert)",
        );
    } else if listed.contains("invalid peer certificate") {
        message.push_str(" (the node's certificate does not chain to --tls-ca, or does not name the address dialed)");
    }
    // Credentials that a node refused would be refused by every node.
    for (_, why) in failures {
        match why {
            CallError::Unauthenticated(why) => return Error::Unauthenticated(why.clone()),
            CallError::PermissionDenied(why) => return Error::PermissionDenied(why.clone()),
            _ => {}
        }
    }
    let all_silent = failures
        .iter()
        .all(|(_, why)| matches!(why, CallError::TimedOut(_)));
    if !failures.is_empty() && all_silent {
        Error::DeadlineExceeded(message)
    } else {
        Error::Unavailable(message)
    }
}

/// Turns a node's failure status back into an error: by its code and, for
/// a write, the outcome it reports (`dkvs-outcome`), which tells a refusal
/// (not applied) from a failure after the write was sent (unknown: the
/// write may still take effect, [`Error::Indeterminate`]). Without an
/// outcome (a read's failure) the code alone decides.
fn error_from_status(status: tonic::Status) -> Error {
    use tonic::Code;
    let message = status.message().to_string();
    let outcome = Outcome::of(status.metadata());
    match (status.code(), outcome) {
        (Code::InvalidArgument, _) => Error::InvalidArgument(message),
        (Code::DeadlineExceeded, _) => Error::DeadlineExceeded(message),
        // Sent, and failed after: fewer than W acknowledgements, superseded
        // by a concurrent write, a replica's full disk.
        (Code::Unavailable | Code::Aborted | Code::ResourceExhausted, Some(Outcome::Unknown)) => {
            Error::Indeterminate(message)
        }
        (Code::Unavailable, _) => Error::Unavailable(message),
        // A superseded write, from a node that reports no outcome.
        (Code::Aborted, None) => Error::Indeterminate(message),
        (Code::FailedPrecondition, None | Some(Outcome::NotApplied)) => {
            Error::FailedPrecondition(message)
        }
        (code, outcome) => Error::Remote {
            code,
            message,
            outcome,
        },
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;

/// The placement a `Cluster.Status` answer describes: its layout, or (from
/// a node without one) a ring of its members.
fn placement_of(status: &pb::StatusResponse) -> Result<Placement> {
    if let Some(layout) = status.layout.clone() {
        let layout = pb::layout_from(layout).map_err(|why| {
            Error::Unavailable(format!("{} sent a bad layout: {why}", status.address))
        })?;
        return Ok(Placement::of_layout(Arc::new(layout), ""));
    }
    let members = status
        .members
        .iter()
        .map(|m| Member::new(m.address.clone()));
    Ok(Placement::new(
        Arc::new(Ring::new(members, status.vnodes as usize)),
        status.replicas as usize,
        "",
    ))
}
