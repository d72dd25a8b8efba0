//! A DKVS node: storage, replica, coordinator and gRPC services on one port.
//!
//! [`Node::open`] opens the data directory and builds the parts;
//! [`serve`] runs the gRPC server over any stream of connections until the
//! shutdown future completes, then drains: health turns NOT_SERVING, the
//! server stops accepting and finishes in-flight requests, background tasks
//! (read repair, periodic fsync) stop, and the storage is synced.
//!
//! Services on the port: `dkvs.v1.KeyValue` (clients), `dkvs.v1.Cluster`
//! (status), `dkvs.v1.Replica` (internal: nodes and the smart client only),
//! `grpc.health.v1.Health`, and server reflection v1 and v1alpha.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::antientropy::AntiEntropy;
use crate::clock::{NodeId, Version, wall_clock_ms};
use crate::config::ServerConfig;
use crate::coordinator::{Background, Coordinator};
use crate::error::{Error, Result};
use crate::failure::FailureDetector;
use crate::hints::{HintBounds, HintStore};
use crate::identity::Identity;
use crate::limits::Limits;
use crate::net::{Dialer, PeerPool, ReplicaError, max_message_bytes};
use crate::pb;
use crate::quorum::Consistency;
use crate::record::Record;
use crate::replica::ReplicaStore;
use crate::ring::{Member, Ring};
use crate::storage::{Engine, FjallStorage, FsyncPolicy, LogStorage, Storage};

/// What a peer's last answered heartbeat told this node.
struct PeerReport {
    /// The peer's wall clock minus this node's, in ms.
    clock_skew_ms: i64,
    /// The peer's counts, and when they arrived (absent from older nodes).
    stats: Option<(pb::NodeStats, Instant)>,
}

/// Everything one node runs.
pub struct Node {
    /// The settings it was started with.
    config: ServerConfig,
    /// This node as a ring member.
    me: Member,
    /// The ring (static membership, from --peers).
    ring: Arc<Ring>,
    /// Replicas per key in effect: --replicas capped at the member count.
    replicas: usize,
    /// Input limits.
    limits: Limits,
    /// The storage engine.
    storage: Arc<dyn Storage>,
    /// This node's replica.
    replica: Arc<ReplicaStore>,
    /// Coordinates requests this node receives.
    coordinator: Arc<Coordinator>,
    /// Channels to peers.
    peers: Arc<PeerPool>,
    /// Background tasks (repairs, trailing writes).
    background: Background,
    /// Cancelled when the node stops; stops every background loop.
    shutdown: CancellationToken,
    /// When the node started.
    started: Instant,
    /// Which peers are believed down (std mutex: held for a lookup or an update).
    liveness: Arc<Mutex<FailureDetector>>,
    /// Writes this node keeps for replicas that were down.
    hints: Arc<HintStore>,
    /// Background convergence and tombstone collection.
    anti_entropy: Arc<AntiEntropy>,
    /// What each peer's last answered heartbeat told (std mutex: held for
    /// one map operation).
    peer_reports: Mutex<std::collections::HashMap<String, PeerReport>>,
    /// Member and instance ids, and whether replica reads are answered.
    identity: Arc<Identity>,
    /// Members being pinged back (see [`Node::ping_back`]); std mutex: held
    /// for one set operation.
    pinging_back: Mutex<HashSet<String>>,
    /// Cancelled once the first round of heartbeats has ended: health
    /// turns SERVING then, when peers have heard who this node is.
    first_heartbeats: CancellationToken,
}

/// Whether `storage` is a data dir that never held anything: no clock
/// ceiling, no identity, no record, no hint. (Scans only on the first start
/// of a data dir without an instance id.)
fn is_fresh(storage: &dyn Storage) -> Result<bool> {
    if storage.get_meta("instance_id")?.is_some() || storage.get_meta("clock_ceiling")?.is_some() {
        return Ok(false);
    }
    let held = std::cell::Cell::new(false);
    storage.for_each_held(&mut |_, _| held.set(true), &mut |_, _| held.set(true))?;
    Ok(!held.get() && storage.hint_ids(&[], 1)?.is_empty())
}

impl Node {
    /// Opens the node's data directory with the configured engine and
    /// builds the node.
    pub fn open(config: ServerConfig, dialer: Arc<dyn Dialer>) -> Result<Arc<Self>> {
        let data_dir = config.data_dir();
        std::fs::create_dir_all(&data_dir).map_err(|e| {
            Error::Storage(format!(
                "cannot create data dir {}: {e}",
                data_dir.display()
            ))
        })?;
        // The log engine lives in <data-dir>/log, fjall in <data-dir> itself.
        let log_dir = data_dir.join("log");
        let holds_fjall = data_dir.join("keyspaces").exists();
        let storage: Arc<dyn Storage> = match config.storage_engine {
            Engine::Log if holds_fjall && !log_dir.exists() => {
                return Err(Error::InvalidArgument(format!(
                    "{} holds data of the fjall engine; start this node with --storage-engine fjall",
                    data_dir.display()
                )));
            }
            Engine::Fjall if log_dir.exists() && !holds_fjall => {
                return Err(Error::InvalidArgument(format!(
                    "{} holds data of the log engine; start this node with --storage-engine log",
                    data_dir.display()
                )));
            }
            Engine::Log => Arc::new(LogStorage::open(&log_dir, config.fsync)?),
            Engine::Fjall => Arc::new(FjallStorage::open(&data_dir, config.fsync)?),
        };
        Self::with_storage(config, storage, dialer)
    }

    /// Builds the node over a given storage engine.
    pub fn with_storage(
        config: ServerConfig,
        storage: Arc<dyn Storage>,
        dialer: Arc<dyn Dialer>,
    ) -> Result<Arc<Self>> {
        let me = Member::new(config.advertised_address());
        let listed = config.peers.iter().any(|p| p.trim() == me.address);
        let others = config.peers.iter().filter(|p| !p.trim().is_empty()).count();
        if others > 0 && !listed {
            tracing::warn!(
                address = %me.address,
                "this node's address is not in --peers; it joins the ring as an extra member. \
                 If --peers names it differently (e.g. localhost vs 127.0.0.1), use the same spelling or --advertise"
            );
        }
        let members: Vec<Member> = config
            .member_addresses()
            .into_iter()
            .map(Member::new)
            .collect();
        let ids: HashSet<_> = members.iter().map(|m| m.node_id).collect();
        if ids.len() != members.len() {
            return Err(Error::InvalidArgument(
                "two member addresses hash to the same node id; change one of them".into(),
            ));
        }
        let ring = Arc::new(Ring::new(members, config.vnodes));
        let replicas = config.replicas.min(ring.members().len());
        if replicas < config.replicas {
            tracing::warn!(
                requested = config.replicas,
                members = ring.members().len(),
                "fewer members than --replicas; each key gets one replica per member"
            );
        }
        let limits = Limits {
            max_key_bytes: config.max_key_bytes,
            max_value_bytes: config.max_value_bytes,
        };
        config.validate().map_err(Error::InvalidArgument)?;
        let bound = config.skew_bound();
        let sharing: std::collections::BTreeSet<String> = ring
            .members()
            .iter()
            .filter(|m| {
                m.address != me.address
                    && !ring
                        .shared_ranges(&me.address, &m.address, replicas)
                        .is_empty()
            })
            .map(|m| m.address.clone())
            .collect();
        let identity = Arc::new(Identity::open(
            storage.clone(),
            sharing,
            is_fresh(&*storage)?,
        )?);
        let replica = Arc::new(ReplicaStore::open(
            identity.instance_id,
            storage.clone(),
            ring.clone(),
            bound,
        )?);
        replica.set_read_gate(identity.clone());
        tracing::info!(
            member_id = format!("{:016x}", me.node_id),
            instance_id = format!("{:016x}", identity.instance_id),
            "identity"
        );
        let peers = Arc::new(
            PeerPool::new(dialer, max_message_bytes(limits.max_value_bytes)).with_skew_bound(bound),
        );
        let shutdown = CancellationToken::new();
        let background = Background::new(shutdown.child_token());
        let liveness = Arc::new(Mutex::new(FailureDetector::new(
            ring.members()
                .iter()
                .filter(|m| m.address != me.address)
                .map(|m| m.address.clone()),
            Instant::now(),
            config.heartbeat_interval(),
            config.phi_threshold,
        )));
        let hints = Arc::new(HintStore::open(
            storage.clone(),
            HintBounds {
                max_hints: config.max_hints,
                max_bytes: config.max_hint_bytes,
                max_age: Duration::from_secs(config.max_hint_age_secs),
                skew: replica.bound(),
            },
        )?);
        if !hints.is_empty() {
            tracing::info!(
                hints = hints.len(),
                bytes = hints.bytes(),
                "hints waiting for delivery"
            );
        }
        let anti_entropy = Arc::new(AntiEntropy {
            replica: replica.clone(),
            ring: ring.clone(),
            me: me.address.clone(),
            replicas,
            peers: peers.clone(),
            liveness: liveness.clone(),
            rpc_timeout: config.rpc_timeout(),
            grace: Duration::from_secs(config.tombstone_grace),
            stats: Arc::default(),
            gc_cursor: Mutex::default(),
            identity: identity.clone(),
        });
        let coordinator = Arc::new(Coordinator::new(
            replica.clone(),
            me.address.clone(),
            ring.clone(),
            replicas,
            peers.clone(),
            config.rpc_timeout(),
            config.request_timeout(),
            background.clone(),
            liveness.clone(),
            hints.clone(),
        ));
        Ok(Arc::new(Self {
            config,
            me,
            ring,
            replicas,
            limits,
            storage,
            replica,
            coordinator,
            peers,
            background,
            shutdown,
            started: Instant::now(),
            liveness,
            hints,
            anti_entropy,
            peer_reports: Mutex::default(),
            identity,
            pinging_back: Mutex::default(),
            first_heartbeats: CancellationToken::new(),
        }))
    }

    pub fn address(&self) -> &str {
        &self.me.address
    }

    pub fn replica(&self) -> &Arc<ReplicaStore> {
        &self.replica
    }

    fn local_stats(&self) -> pb::NodeStats {
        let stats = self.replica.stats();
        let ae = &self.anti_entropy.stats;
        pb::NodeStats {
            live_keys: stats.live_keys,
            tombstones: stats.tombstones,
            lamport: stats.lamport,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            read_repairs: self.background.repairs_sent(),
            blocking_read_repairs: self.coordinator.blocking_repairs(),
            hints_pending: self.hints.len(),
            hints_delivered: self.hints.delivered(),
            anti_entropy_exchanges: ae.exchanges.load(Ordering::Relaxed),
            anti_entropy_in_sync: ae.in_sync.load(Ordering::Relaxed),
            anti_entropy_keys_repaired: ae.keys_repaired.load(Ordering::Relaxed),
            tombstones_purged: ae.tombstones_purged.load(Ordering::Relaxed),
            future_records: stats.future_records,
            tombstone_gc_skipped: ae.tombstones_skipped.load(Ordering::Relaxed),
            damaged_entries_skipped: self.storage.damaged_entries_skipped(),
        }
    }

    /// Pings every peer each `--heartbeat-interval-ms` until shutdown and
    /// feeds the answers to the failure detector. A peer believed down keeps
    /// being pinged: that is how it is found up again.
    fn start_heartbeats(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            let interval = node.config.heartbeat_interval();
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let peers: Vec<String> = node
                .ring
                .members()
                .iter()
                .filter(|m| m.address != node.me.address)
                .map(|m| m.address.clone())
                .collect();
            // The state last logged per peer, to log each change once.
            let mut reported: std::collections::HashMap<String, bool> =
                peers.iter().map(|p| (p.clone(), true)).collect();
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = node.shutdown.cancelled() => break,
                }
                node.liveness
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .round_started(Instant::now());
                let pings = peers.iter().map(|address| node.ping(address, interval));
                let results = futures::future::join_all(pings).await;
                node.first_heartbeats.cancel();
                let now = Instant::now();
                let mut liveness = node.liveness.lock().unwrap_or_else(|p| p.into_inner());
                let down: std::collections::BTreeSet<String> = peers
                    .iter()
                    .filter(|p| !liveness.is_up(p, now))
                    .cloned()
                    .collect();
                if let Err(why) = node.identity.settle(&down) {
                    tracing::warn!(%why, "cannot record the read gate");
                }
                for (address, result) in peers.iter().zip(results) {
                    match result {
                        Ok(()) => liveness.heartbeat(address, now),
                        Err(why) => {
                            tracing::debug!(peer = %address, %why, "heartbeat failed");
                            liveness.failed(address, why)
                        }
                    }
                    let is_up = liveness.is_up(address, now);
                    if reported.insert(address.clone(), is_up) != Some(is_up) {
                        let health = liveness.health(address, now);
                        tracing::info!(peer = %address, up = is_up, phi = health.phi, error = ?health.last_error, "peer state changed");
                    }
                }
            }
        })
    }

    /// One heartbeat to `address`: carries this node's HLC, merges the
    /// peer's, and measures the peer's clock skew from its wall clock (the
    /// midpoint of the call is taken as the moment it answered).
    async fn ping(&self, address: &str, timeout: Duration) -> std::result::Result<(), String> {
        let mut client = self
            .peers
            .replica_client(address)
            .map_err(|e| e.to_string())?;
        let ping = pb::PingRequest {
            from: self.me.address.clone(),
            hlc: self.replica.stats().lamport,
            instance_id: self.identity.instance_id,
            known_instance_id: self
                .identity
                .known_instance(address)
                .map_err(|e| e.to_string())?,
            serves_reads: self.identity.read_refusal().is_none(),
        };
        let sent_ms = wall_clock_ms();
        let answer = crate::net::call_within(timeout, client.ping(ping)).await?;
        let midpoint_ms = sent_ms + wall_clock_ms().saturating_sub(sent_ms) / 2;
        let skew_ms = answer.wall_ms as i64 - midpoint_ms as i64;
        let bound = self.replica.bound();
        let report = PeerReport {
            clock_skew_ms: skew_ms,
            stats: answer.stats.map(|stats| (stats, Instant::now())),
        };
        let was = self
            .peer_reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(address.to_string(), report)
            .map(|old| old.clock_skew_ms);
        let half = (bound.max_skew_ms / 2) as i64;
        let far = |skew: i64| skew.abs() > half;
        if far(skew_ms) && !was.is_some_and(far) {
            tracing::warn!(
                peer = address,
                skew_ms,
                max_clock_skew_ms = bound.max_skew_ms,
                "a peer's clock is more than half --max-clock-skew-ms away from this node's; check NTP on both hosts"
            );
        }
        // An answer without an instance id (a node of an older version)
        // tells nothing about who was here.
        if answer.instance_id != 0 {
            self.identity
                .learn_peer(address, answer.instance_id, answer.serves_reads)
                .and_then(|_| self.identity.heard(address, answer.known_instance_id))
                .map_err(|e| e.to_string())?;
        }
        if !self
            .replica
            .observe(Version::new(answer.hlc, answer.node_id))
        {
            tracing::warn!(
                peer = address,
                hlc = answer.hlc,
                "a peer's clock is beyond --max-clock-skew-ms; not merged"
            );
        }
        Ok(())
    }

    /// Sends `address` a heartbeat now, in the background, unless one sent
    /// this way is still in flight.
    fn ping_back(self: &Arc<Self>, address: &str) {
        {
            let mut pinging = self.pinging_back.lock().unwrap_or_else(|p| p.into_inner());
            if !pinging.insert(address.to_string()) {
                return;
            }
        }
        let (node, address) = (self.clone(), address.to_string());
        tokio::spawn(async move {
            let timeout = node.config.heartbeat_interval();
            if let Err(why) = node.ping(&address, timeout).await {
                tracing::debug!(peer = %address, %why, "ping back failed");
            }
            node.pinging_back
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&address);
        });
    }

    /// Every `--anti-entropy-interval` seconds, syncs with each live peer and
    /// collects old tombstones, until shutdown.
    fn start_anti_entropy(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            let interval = Duration::from_secs(node.config.anti_entropy_interval.max(1));
            // The first round comes a second after start: a node that was
            // down is the one with the most to catch up.
            let first = tokio::time::Instant::now() + interval.min(Duration::from_secs(1));
            let mut ticker = tokio::time::interval_at(first, interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = node.shutdown.cancelled() => break,
                }
                tokio::select! {
                    () = node.anti_entropy.round() => {}
                    () = node.shutdown.cancelled() => break,
                }
            }
        })
    }

    /// `Replica.Read` on this node's store.
    fn replica_read(&self, request: pb::ReplicaReadRequest) -> Result<pb::ReplicaReadResponse> {
        self.limits.check_key(&request.key)?;
        let record = if request.for_repair {
            self.replica.read(&request.key)?
        } else {
            self.replica.read_for_quorum(&request.key)?
        };
        Ok(pb::ReplicaReadResponse {
            record: record.as_ref().map(pb::Record::from),
        })
    }

    /// Validates a replica write: its key, record and value size.
    fn check_write(&self, request: pb::ReplicaWriteRequest) -> Result<(String, Record)> {
        self.limits.check_key(&request.key)?;
        let record = pb::record_from(
            request
                .record
                .ok_or_else(|| Error::InvalidArgument("record is required".into()))?,
            self.replica.bound(),
        )?;
        if let Some(value) = &record.value {
            self.limits.check_value(value)?;
        }
        Ok((request.key, record))
    }

    /// `Replica.Write` on this node's store.
    fn replica_write(&self, request: pb::ReplicaWriteRequest) -> Result<pb::ReplicaWriteResponse> {
        let (key, record) = self.check_write(request)?;
        let outcome = self.replica.write_if_newer(&key, &record)?;
        Ok(pb::ReplicaWriteResponse {
            applied: outcome.applied,
            held: Some(outcome.held.into()),
        })
    }

    fn check_ring(&self, range_count: u32) -> Result<()> {
        if range_count as usize != self.ring.range_count() {
            return Err(Error::InvalidArgument(format!(
                "ring mismatch: the caller has {range_count} token ranges, this node {} (check --peers and --vnodes on every node)",
                self.ring.range_count()
            )));
        }
        Ok(())
    }

    /// Every `--hint-delivery-interval-ms`, offers held hints to their
    /// replicas that the failure detector sees up, until shutdown.
    fn start_hint_delivery(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            let interval = Duration::from_millis(node.config.hint_delivery_interval_ms.max(10));
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = node.shutdown.cancelled() => break,
                }
                for target in node.hints.targets() {
                    tokio::select! {
                        result = node.deliver_hints(target) => {
                            if let Err(why) = result {
                                tracing::debug!(%why, "hint delivery paused");
                            }
                        }
                        () = node.shutdown.cancelled() => return,
                    }
                }
            }
        })
    }

    /// Delivers `target`'s hints, oldest first, while it can be reached.
    /// A hint the target rejects (INVALID_ARGUMENT: say a value over its
    /// `--max-value-bytes`) is dropped with a log line, so it does not block
    /// the hints behind it; anti-entropy repairs what it carried. A target
    /// that fails or times out pauses delivery until the next round.
    async fn deliver_hints(&self, target: NodeId) -> Result<(), String> {
        let Some(member) = self.ring.member(target) else {
            // Not a member any more: nobody to deliver to.
            let dropped = self.hints.drop_target(target).map_err(|e| e.to_string())?;
            tracing::info!(
                target,
                dropped,
                "dropped the hints of a node that is not a member"
            );
            return Ok(());
        };
        if !self
            .liveness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_up(&member.address, Instant::now())
        {
            return Ok(());
        }
        let replica = self
            .peers
            .replica_handle(&member.address, None)
            .map_err(|e| e.to_string())?;
        let timeout = self.config.rpc_timeout();
        loop {
            let batch = self
                .hints
                .for_target(target, 256, crate::hints::now_ms())
                .map_err(|e| e.to_string())?;
            if batch.is_empty() {
                return Ok(());
            }
            for stored in batch {
                let hint = &stored.hint;
                match replica.write(&hint.key, &hint.record, timeout).await {
                    Ok(_) => self.hints.remove(&stored, true),
                    Err(ReplicaError::Rejected(why)) => {
                        tracing::warn!(
                            replica = %member.address,
                            key = %hint.key,
                            version = %hint.record.version,
                            %why,
                            "dropping a hint its replica rejects; anti-entropy will repair the replica"
                        );
                        self.hints.remove(&stored, false)
                    }
                    Err(ReplicaError::Failed(why)) => {
                        return Err(format!("{}: {why}", member.address));
                    }
                }
                .map_err(|e| e.to_string())?;
            }
        }
    }

    /// Fsyncs every `--fsync-interval-ms` until shutdown (periodic policy).
    fn start_periodic_fsync(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        if self.config.fsync != FsyncPolicy::Periodic {
            return None;
        }
        let interval = Duration::from_millis(self.config.fsync_interval_ms.max(1));
        let storage = self.storage.clone();
        let shutdown = self.shutdown.clone();
        Some(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = shutdown.cancelled() => break,
                }
                let storage = storage.clone();
                // A failed fsync is fatal inside the engine (storage::fatal:
                // DKVSServer exits non-zero; every later write is refused);
                // other errors, such as a full disk, are only reported here.
                match tokio::task::spawn_blocking(move || storage.sync()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::error!(%error, "periodic sync failed"),
                    Err(error) => tracing::error!(%error, "periodic fsync task failed"),
                }
            }
        }))
    }
}

/// Accepted connections from `listener`, with Nagle's algorithm off (tonic
/// does not touch sockets it did not accept itself; with Nagle on, a reply's
/// trailing frames wait ~40 ms for the peer's delayed ACK).
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves `node` over `incoming` until `shutdown` completes, then drains.
/// For TCP, pass [`incoming`]`(listener)`.
pub async fn serve<I, IO, IE>(
    node: Arc<Node>,
    incoming: I,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()>
where
    I: Stream<Item = std::result::Result<IO, IE>> + Send,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let max_message = max_message_bytes(node.limits.max_value_bytes);
    let (health, health_service) = tonic_health::server::health_reporter();
    // tonic starts the overall status ("") as SERVING: not before peers
    // have heard from this node (see below).
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;

    let key_value = pb::key_value_server::KeyValueServer::new(KeyValueService(node.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let cluster = pb::cluster_server::ClusterServer::new(ClusterService(node.clone()));
    let replica = pb::replica_server::ReplicaServer::new(ReplicaService(node.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);

    let fsync_task = node.start_periodic_fsync();
    let heartbeat_task = node.start_heartbeats();
    let hint_task = node.start_hint_delivery();
    let anti_entropy_task = node.start_anti_entropy();
    // SERVING once the first heartbeats have told peers who this node is
    // (and this node what they knew at its address), bounded by twice the
    // heartbeat interval; the server answers meanwhile.
    let serving = {
        let (health, node) = (health.clone(), node.clone());
        tokio::spawn(async move {
            let wait = node.config.heartbeat_interval() * 2;
            let _ = tokio::time::timeout(wait, node.first_heartbeats.cancelled()).await;
            if !node.shutdown.is_cancelled() {
                for service in ["", "dkvs.v1.KeyValue", "dkvs.v1.Cluster", "dkvs.v1.Replica"] {
                    health
                        .set_service_status(service, tonic_health::ServingStatus::Serving)
                        .await;
                }
            }
        })
    };
    tracing::info!(
        address = node.address(),
        members = node.ring.members().len(),
        replicas = node.replicas,
        "serving"
    );

    let drain_health = health.clone();
    let stop_serving = serving.abort_handle();
    let signal = async move {
        shutdown.await;
        stop_serving.abort();
        tracing::info!("shutting down: NOT_SERVING, draining requests");
        for service in ["", "dkvs.v1.KeyValue", "dkvs.v1.Cluster", "dkvs.v1.Replica"] {
            drain_health
                .set_service_status(service, tonic_health::ServingStatus::NotServing)
                .await;
        }
    };
    let served = Server::builder()
        .layer(EdgeStatusLayer {
            max_message: max_message_bytes(node.limits.max_value_bytes),
        })
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(key_value)
        .add_service(cluster)
        .add_service(replica)
        .serve_with_incoming_shutdown(incoming, signal)
        .await;

    // Stop background work, then make sure everything is on disk.
    node.background.close(Duration::from_secs(2)).await;
    node.shutdown.cancel();
    if let Some(task) = fsync_task {
        let _ = task.await;
    }
    let _ = heartbeat_task.await;
    let _ = hint_task.await;
    let _ = anti_entropy_task.await;
    serving.abort();
    let storage = node.storage.clone();
    tokio::task::spawn_blocking(move || storage.sync())
        .await
        .map_err(|e| Error::Internal(format!("final sync task: {e}")))??;
    tracing::info!("stopped");
    served.map_err(|e| Error::Internal(format!("gRPC server: {e}")))
}

/// Bytes a record adds to a reply, roughly.
fn record_size(record: &Option<pb::Record>) -> usize {
    record.as_ref().map_or(16, |r| r.value.len() + 32)
}

/// Rewrites the statuses tonic itself produces before a handler runs, so
/// they carry the right code and a message a person can act on:
///
/// * a request it cannot decode (e.g. a key that is not UTF-8) is the
///   caller's mistake: INVALID_ARGUMENT instead of INTERNAL (tonic's message,
///   which names the field, is kept);
/// * a request over the message limit: RESOURCE_EXHAUSTED naming the limit
///   and the flag that sets it, instead of OUT_OF_RANGE;
/// * an unknown service or method: UNIMPLEMENTED naming it and what is
///   served, instead of an empty message.
#[derive(Clone, Copy)]
struct EdgeStatusLayer {
    /// The largest message this node accepts, in bytes.
    max_message: usize,
}

impl<S> tower::Layer<S> for EdgeStatusLayer {
    type Service = EdgeStatus<S>;

    fn layer(&self, inner: S) -> EdgeStatus<S> {
        EdgeStatus {
            inner,
            max_message: self.max_message,
        }
    }
}

/// The service [`EdgeStatusLayer`] wraps around the router.
#[derive(Clone)]
struct EdgeStatus<S> {
    /// The router.
    inner: S,
    /// See [`EdgeStatusLayer::max_message`].
    max_message: usize,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for EdgeStatus<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = std::result::Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path().to_string();
        let max_message = self.max_message;
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            rewrite_edge_status(response.headers_mut(), &path, max_message);
            Ok(response)
        })
    }
}

/// See [`EdgeStatusLayer`].
fn rewrite_edge_status(headers: &mut http::HeaderMap, path: &str, max_message: usize) {
    let status = headers.get("grpc-status").map(|s| s.as_bytes().to_vec());
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    let rewritten = match status.as_deref() {
        Some(b"13") if message.starts_with("failed to decode Protobuf message") => {
            Some((tonic::Code::InvalidArgument, message))
        }
        Some(b"11") if message.starts_with("Error, decoded message length too large") => Some((
            tonic::Code::ResourceExhausted,
            format!(
                "{path}: the request is larger than this node's message limit of {max_message} bytes \
                 (twice --max-value-bytes plus 64 KiB, at least 4 MiB); send smaller values ({message})"
            ),
        )),
        Some(b"12") if message.is_empty() => Some((
            tonic::Code::Unimplemented,
            format!(
                "unknown method {path}: this node serves dkvs.v1.KeyValue, dkvs.v1.Cluster, \
                 dkvs.v1.Replica (nodes only), grpc.health.v1.Health and server reflection; \
                 `grpcurl -plaintext HOST:PORT list` shows them"
            ),
        )),
        _ => None,
    };
    if let Some((code, message)) = rewritten {
        let status = tonic::Status::new(code, message);
        // Status::add_header writes grpc-status and a percent-encoded grpc-message.
        if status.add_header(headers).is_err() {
            headers.insert("grpc-status", http::HeaderValue::from(code as i32));
        }
    }
}

/// Decodes a percent-encoded `grpc-message`.
fn percent_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `dkvs.v1.KeyValue`: client requests, coordinated by this node.
struct KeyValueService(Arc<Node>);

#[tonic::async_trait]
impl pb::key_value_server::KeyValue for KeyValueService {
    #[tracing::instrument(level = "debug", skip_all, fields(key = %request.get_ref().key))]
    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        refuse_if_abandoned(&request, "PUT")?;
        let request = request.into_inner();
        let node = &self.0;
        node.limits.check_key(&request.key)?;
        node.limits.check_value(&request.value)?;
        let consistency = pb::consistency_from(request.consistency)?;
        let ack = node
            .coordinator
            .put(&request.key, Some(request.value), consistency)
            .await?;
        Ok(Response::new(pb::PutResponse {
            version: Some(ack.version.into()),
            acks: ack.acks as u32,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %request.get_ref().key))]
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let request = request.into_inner();
        let node = &self.0;
        node.limits.check_key(&request.key)?;
        let consistency = pb::read_consistency_from(request.consistency)?;
        let record = node.coordinator.get(&request.key, consistency).await?;
        Ok(Response::new(get_response(record)))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %request.get_ref().key))]
    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        refuse_if_abandoned(&request, "DELETE")?;
        let request = request.into_inner();
        let node = &self.0;
        node.limits.check_key(&request.key)?;
        let consistency = pb::consistency_from(request.consistency)?;
        let ack = node
            .coordinator
            .put(&request.key, None, consistency)
            .await?;
        Ok(Response::new(pb::DeleteResponse {
            version: Some(ack.version.into()),
            acks: ack.acks as u32,
        }))
    }
}

/// Refuses a client write taken up after the deadline its client set
/// ([`crate::client::DEADLINE_HEADER`]), before any work: the client has
/// given up and reported the write indeterminate, so applying it now (say,
/// after this node was frozen) could overwrite writes acknowledged since.
fn refuse_if_abandoned<T>(request: &Request<T>, operation: &str) -> Result<()> {
    let Some(deadline) = request.metadata().get(crate::client::DEADLINE_HEADER) else {
        return Ok(());
    };
    let deadline: u64 = deadline
        .to_str()
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} must be milliseconds since the Unix epoch",
                crate::client::DEADLINE_HEADER
            ))
        })?;
    let now = crate::hints::now_ms();
    if now > deadline {
        return Err(Error::DeadlineExceeded(format!(
            "{operation} refused and not applied: it reached the node {} ms after its client's \
             deadline (by the node's clock; if this repeats, client and node clocks disagree)",
            now - deadline
        )));
    }
    Ok(())
}

/// The Get answer for the newest record found.
pub fn get_response(record: Option<Record>) -> pb::GetResponse {
    match record {
        Some(Record {
            version,
            value: Some(value),
            ..
        }) => pb::GetResponse {
            found: true,
            value,
            version: Some(version.into()),
        },
        Some(Record {
            version,
            value: None,
            ..
        }) => pb::GetResponse {
            found: false,
            value: Default::default(),
            version: Some(version.into()),
        },
        None => pb::GetResponse::default(),
    }
}

/// `dkvs.v1.Replica`: this node's local store, for other nodes and the
/// smart client. Bypasses quorums; not for applications.
struct ReplicaService(Arc<Node>);

#[tonic::async_trait]
impl pb::replica_server::Replica for ReplicaService {
    async fn read(
        &self,
        request: Request<pb::ReplicaReadRequest>,
    ) -> Result<Response<pb::ReplicaReadResponse>, Status> {
        Ok(Response::new(self.0.replica_read(request.into_inner())?))
    }

    async fn write(
        &self,
        request: Request<pb::ReplicaWriteRequest>,
    ) -> Result<Response<pb::ReplicaWriteResponse>, Status> {
        Ok(Response::new(self.0.replica_write(request.into_inner())?))
    }

    async fn batch(
        &self,
        request: Request<pb::ReplicaBatchRequest>,
    ) -> Result<Response<pb::ReplicaBatchResponse>, Status> {
        let request = request.into_inner();
        let node = &self.0;
        // Validate every write, apply the valid ones with one flush.
        let checked: Vec<Result<(String, Record)>> = request
            .writes
            .into_iter()
            .map(|w| node.check_write(w))
            .collect();
        let valid: Vec<(&str, &Record)> = checked
            .iter()
            .filter_map(|c| c.as_ref().ok())
            .map(|(k, r)| (k.as_str(), r))
            .collect();
        let mut applied = node.replica.write_many(valid).into_iter();
        let writes = checked
            .iter()
            .map(|c| {
                let outcome = match c {
                    Ok(_) => applied
                        .next()
                        .unwrap_or_else(|| Err(Error::Internal("write result missing".into()))),
                    Err(Error::ClockSkew(why)) => Err(Error::ClockSkew(why.clone())),
                    Err(error) => Err(Error::InvalidArgument(error.to_string())),
                };
                match outcome {
                    Ok(o) => pb::WriteResult {
                        applied: o.applied,
                        held: Some(o.held.into()),
                        ..Default::default()
                    },
                    Err(error) => pb::WriteResult {
                        rejected: matches!(error, Error::InvalidArgument(_)),
                        error: error.to_string(),
                        ..Default::default()
                    },
                }
            })
            .collect();
        // Keep the reply well under the message limit: records that do not
        // fit are deferred, and the caller fetches them one by one.
        let budget = max_message_bytes(node.limits.max_value_bytes) / 2;
        let mut reply_bytes = 0usize;
        let reads = request
            .reads
            .into_iter()
            .map(|read| match node.replica_read(read) {
                Ok(reply)
                    if reply_bytes > 0 && reply_bytes + record_size(&reply.record) > budget =>
                {
                    pb::ReadResult {
                        deferred: true,
                        ..Default::default()
                    }
                }
                Ok(reply) => {
                    reply_bytes += record_size(&reply.record);
                    pb::ReadResult {
                        record: reply.record,
                        ..Default::default()
                    }
                }
                Err(error) => pb::ReadResult {
                    rejected: matches!(error, Error::InvalidArgument(_)),
                    error: error.to_string(),
                    ..Default::default()
                },
            })
            .collect();
        Ok(Response::new(pb::ReplicaBatchResponse { writes, reads }))
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::NodeStats>, Status> {
        Ok(Response::new(self.0.local_stats()))
    }

    async fn store_hint(
        &self,
        request: Request<pb::StoreHintRequest>,
    ) -> Result<Response<pb::StoreHintResponse>, Status> {
        let request = request.into_inner();
        let node = &self.0;
        node.limits.check_key(&request.key)?;
        let target = node
            .ring
            .members()
            .iter()
            .find(|m| m.address == request.target)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "hint target {:?} is not a cluster member",
                    request.target
                ))
            })?;
        let record = pb::record_from(
            request
                .record
                .ok_or_else(|| Error::InvalidArgument("record is required".into()))?,
            node.replica.bound(),
        )?;
        if let Some(value) = &record.value {
            node.limits.check_value(value)?;
        }
        node.replica.observe(record.version);
        node.hints.store(&crate::hints::Hint {
            target: target.node_id,
            key: request.key,
            record,
            created_ms: crate::hints::now_ms(),
        })?;
        Ok(Response::new(pb::StoreHintResponse {}))
    }

    async fn range_digests(
        &self,
        request: Request<pb::RangeDigestsRequest>,
    ) -> Result<Response<pb::RangeDigestsResponse>, Status> {
        let request = request.into_inner();
        let node = &self.0;
        node.check_ring(request.range_count)?;
        if !node
            .ring
            .members()
            .iter()
            .any(|m| m.address == request.peer)
        {
            return Err(Error::InvalidArgument(format!(
                "{:?} is not a cluster member",
                request.peer
            ))
            .into());
        }
        let leaves = node.anti_entropy.leaves_with(&request.peer);
        Ok(Response::new(pb::RangeDigestsResponse {
            root: crate::antientropy::root(&leaves),
            leaves: if request.leaves {
                leaves
                    .into_iter()
                    .map(|(range, digest)| pb::RangeDigest {
                        range: range as u32,
                        digest,
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }))
    }

    async fn range_entries(
        &self,
        request: Request<pb::RangeEntriesRequest>,
    ) -> Result<Response<pb::RangeEntriesResponse>, Status> {
        let request = request.into_inner();
        let node = &self.0;
        node.check_ring(request.range_count)?;
        let entries = node
            .replica
            .range_entries(request.range as usize)?
            .into_iter()
            .map(|e| pb::RangeEntry {
                key: e.key,
                version: Some(e.version.into()),
                tombstone: e.tombstone,
                deleted_at_ms: e.deleted_at_ms,
            })
            .collect();
        Ok(Response::new(pb::RangeEntriesResponse { entries }))
    }

    async fn ping(
        &self,
        request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        let node = &self.0;
        let request = request.into_inner();
        // A sender's clock beyond the skew bound is simply not merged.
        node.replica.observe(Version::new(request.hlc, 0));
        // The sender could be anyone claiming a member's address: learn
        // nothing from it. A node not yet answering reads pings that member
        // back at once instead (one at a time per member), and learns from
        // the answer of the address it dialled.
        let is_member = node
            .ring
            .members()
            .iter()
            .any(|m| m.address == request.from);
        if is_member && node.identity.read_refusal().is_some() {
            node.ping_back(&request.from);
        }
        let known = if is_member {
            node.identity.known_instance(&request.from)?
        } else {
            0
        };
        Ok(Response::new(pb::PingResponse {
            node_id: node.me.node_id,
            hlc: node.replica.stats().lamport,
            wall_ms: wall_clock_ms(),
            instance_id: node.identity.instance_id,
            known_instance_id: known,
            serves_reads: node.identity.read_refusal().is_none(),
            stats: Some(node.local_stats()),
        }))
    }
}

/// `dkvs.v1.Cluster`: how this node sees the cluster.
struct ClusterService(Arc<Node>);

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    /// Answers from what this node already knows: the failure detector's
    /// view and each member's counts from its last answered heartbeat, with
    /// their age. It never waits for a member, so a frozen one (not yet
    /// convicted) cannot slow it.
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let node = &self.0;
        let now = Instant::now();
        let liveness = node.liveness.lock().unwrap_or_else(|p| p.into_inner());
        let reports = node.peer_reports.lock().unwrap_or_else(|p| p.into_inner());
        let members = node
            .ring
            .members()
            .iter()
            .map(|member| {
                let health = liveness.health(&member.address, now);
                let itself = member.address == node.me.address;
                let report = reports.get(&member.address);
                let (stats, stats_age_ms) = if itself {
                    (Some(node.local_stats()), 0)
                } else {
                    match report.and_then(|r| r.stats.as_ref()) {
                        Some((stats, at)) => (
                            Some(*stats),
                            now.saturating_duration_since(*at).as_millis() as u64,
                        ),
                        None => (None, 0),
                    }
                };
                // A member's last heartbeat may have failed before the
                // detector convicts it: say why either way.
                let (state, error) = if itself || health.up {
                    let why = health.last_error.clone().unwrap_or_default();
                    (pb::MemberState::Up, why)
                } else {
                    let why = health
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "no heartbeat".into());
                    (pb::MemberState::Down, why)
                };
                let instance_id = if itself {
                    node.identity.instance_id
                } else {
                    node.identity.known_instance(&member.address).unwrap_or(0)
                };
                pb::Member {
                    address: member.address.clone(),
                    node_id: member.node_id,
                    state: state as i32,
                    stats,
                    error,
                    phi: health.phi,
                    clock_skew_ms: report.map_or(0, |r| r.clock_skew_ms),
                    instance_id,
                    stats_age_ms,
                }
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            address: node.me.address.clone(),
            node_id: node.me.node_id,
            replicas: node.replicas as u32,
            vnodes: node.ring.vnodes() as u32,
            write_quorum: Consistency::Quorum.required(node.replicas) as u32,
            read_quorum: Consistency::Quorum.required(node.replicas) as u32,
            members,
            instance_id: node.identity.instance_id,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(code: &str, message: &str, path: &str) -> tonic::Status {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "grpc-status",
            http::HeaderValue::from_str(code).expect("code"),
        );
        if !message.is_empty() {
            let encoded: String = message
                .bytes()
                .map(|b| {
                    if b == b' ' {
                        "%20".to_string()
                    } else {
                        (b as char).to_string()
                    }
                })
                .collect();
            headers.insert(
                "grpc-message",
                http::HeaderValue::from_str(&encoded).expect("message"),
            );
        }
        rewrite_edge_status(&mut headers, path, 4 << 20);
        tonic::Status::from_header_map(&headers).expect("a status")
    }

    #[test]
    fn edge_statuses_get_the_right_code_and_a_message() {
        let big = status_of(
            "11",
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
            "/dkvs.v1.KeyValue/Put",
        );
        assert_eq!(big.code(), tonic::Code::ResourceExhausted);
        assert!(big.message().contains("4194304"), "{}", big.message());
        assert!(
            big.message().contains("--max-value-bytes"),
            "{}",
            big.message()
        );
        let unknown = status_of("12", "", "/dkvs.v1.KeyValue/Nope");
        assert_eq!(unknown.code(), tonic::Code::Unimplemented);
        assert!(unknown.message().contains("/dkvs.v1.KeyValue/Nope"));
        let undecodable = status_of("13", "failed to decode Protobuf message: key", "/x");
        assert_eq!(undecodable.code(), tonic::Code::InvalidArgument);
        assert!(undecodable.message().contains("key"));
        // Everything else is left alone.
        let other = status_of("14", "replica down", "/x");
        assert_eq!(
            (other.code(), other.message()),
            (tonic::Code::Unavailable, "replica down")
        );
    }
}
