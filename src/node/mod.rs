//! A DKVS node: storage, replica, coordinator and gRPC services on one port.
//!
//! This module wires the parts together ([`Node::open`]) and starts the
//! periodic workers; [`serve`] runs the server (`serve.rs`), and each gRPC
//! service has its own file: `kv.rs`, `cluster.rs`, `replica_read.rs`
//! (client-facing), `replica.rs`, `membership.rs`, `liveness.rs` (for
//! nodes only).
//!
//! [`Node::open`] opens the data directory and builds the parts;
//! [`serve`] runs the gRPC server over any stream of connections until the
//! shutdown future completes, then drains: health turns NOT_SERVING, the
//! server stops accepting and finishes in-flight requests, background tasks
//! (read repair, periodic fsync) stop, and the storage is synced.
//!
//! Services on the port: client-facing `dkvs.v1.KeyValue`,
//! `dkvs.v1.Cluster` (status) and `dkvs.v1.ReplicaRead` (the smart client's
//! replica reads); for nodes only `dkvs.v1.Replica` (the data path),
//! `dkvs.v1.Membership` (layouts, joins, streaming) and `dkvs.v1.Liveness`
//! (heartbeats); `grpc.health.v1.Health`, and server reflection v1 and
//! v1alpha.

mod access_gate;
mod cluster;
mod cluster_gate;
mod gate;
mod http;
mod http_json;
mod http_kv;
mod http_list;
mod join;
mod kv;
mod lateness;
mod liveness;
mod load;
mod membership;
mod metrics;
mod quota;
mod recovery;
mod replica;
mod replica_read;
mod resp;
mod resp_commands;
mod secure;
mod serve;
mod slow_body;
mod writes;

pub use access_gate::{Guard, VerifiedNode};
pub use http::HttpDoor;
pub use resp::RespDoor;
pub use secure::tls_incoming;
pub use serve::{incoming, serve, serve_guarded};

/// What `Cluster.Status` answered, as the JSON `GET /v1/cluster` serves
/// (ids and clocks as strings): `DKVSClient status --output json` prints it.
pub fn status_json(status: &crate::pb::StatusResponse) -> serde_json::Value {
    http_json::cluster(status)
}

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::antientropy::AntiEntropy;
use crate::background::Background;
use crate::clock::InstanceId;
use crate::clock::SkewBound;
use crate::config::ServerConfig;
use crate::coordinator::Coordinator;
use crate::error::{Error, Result};
use crate::heartbeat::Heartbeats;
use crate::hints::{HintBounds, HintDelivery, HintStore};
use crate::identity::Identity;
use crate::layout::Layout;
use crate::layout::paxos::LayoutState;
use crate::layout::progress::JoinProgress;
use crate::limits::Limits;
use crate::liveness::{FailureDetector, Liveness};
use crate::membership::Membership;
use crate::net::{Dialer, PeerPool, max_message_bytes};
use crate::placement::{Placement, ThisNode};
use crate::replica::ReplicaStore;
use crate::ring::Member;
use crate::serving::ClusterView;
use crate::serving::LayoutOwner;
use crate::serving::layout_file::LayoutStore;
use crate::serving::removal::Removal;
use crate::storage::{Engine, FjallStorage, FsyncPolicy, LogStorage, Storage};
use crate::workers::{Schedule, WorkerError, Workers};

/// Everything one node runs.
pub struct Node {
    /// The settings it was started with.
    config: ServerConfig,
    /// Who this node is.
    me: ThisNode,
    /// Placement, peers, liveness: what the parts share.
    cluster: Arc<ClusterView>,
    /// Input limits.
    limits: Limits,
    /// The storage engine.
    storage: Arc<dyn Storage>,
    /// This node's replica.
    replica: Arc<ReplicaStore>,
    /// Coordinates requests this node receives.
    coordinator: Arc<Coordinator>,
    /// Background tasks (repairs, trailing writes).
    background: Background,
    /// Cancelled when the node stops; stops every periodic worker.
    shutdown: CancellationToken,
    /// When the node started.
    started: Instant,
    /// Writes this node keeps for replicas that were down.
    hints: Arc<HintStore>,
    /// Delivers them.
    hint_delivery: Arc<HintDelivery>,
    /// Background convergence and tombstone collection.
    anti_entropy: Arc<AntiEntropy>,
    /// Pings peers; answers their pings.
    heartbeats: Arc<Heartbeats>,
    /// The read gate: whether replica reads are answered.
    identity: Arc<Identity>,
    /// The layout: changes, and the RPCs that agree on them.
    membership: Arc<Membership>,
    /// The periodic workers' reports (`Cluster.Status` shows them).
    workers: Workers,
    /// Stops the node once a layout names its instance as removed.
    removal: Arc<Removal>,
    /// Judges whether a client write arrived after its client gave up.
    arrivals: Arc<lateness::Arrivals>,
    /// Request and connection budgets.
    load: Arc<load::Load>,
    /// `--max-data-bytes` and the data dir's last measure.
    quota: Arc<quota::DataQuota>,
    /// Writes forwarded to, and coordinated for, other nodes.
    forward_counts: writes::ForwardCounts,
    /// Client requests and node-to-node calls, counted for Prometheus.
    metrics: metrics::NodeMetrics,
    /// Whether the node said SERVING (heard from its peers, caught up with
    /// the newest layout, agreed on the cluster id) and is not draining.
    serving: Arc<std::sync::atomic::AtomicBool>,
    /// Set when the node starts draining (SIGTERM, or its instance was
    /// removed): the HTTP door then refuses new reads and writes.
    draining: Arc<std::sync::atomic::AtomicBool>,
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

/// A data dir whose layout belongs to another cluster than
/// `--cluster-token` names is refused (one without an id gets the token's
/// through a layout change).
fn check_cluster_token(config: &ServerConfig, layout: &Layout) -> Result<()> {
    let wanted = config.cluster_token_id();
    if wanted == 0 || layout.cluster_id == 0 || layout.cluster_id == wanted {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "the data dir's layout v{} belongs to cluster {}, but --cluster-token gives {}: start it with \
         the token its cluster was started with, or wipe the data dir to start a new cluster",
        layout.version,
        crate::layout::cluster_id::show(layout.cluster_id),
        crate::layout::cluster_id::show(wanted)
    )))
}

impl Node {
    /// One page of a key listing, coordinated by this node (gRPC and
    /// HTTP share it).
    pub(crate) async fn list(
        &self,
        request: &crate::listing::ListRequest,
    ) -> crate::error::Result<crate::listing::ListPage> {
        self.membership.refuse_until_agreed()?;
        let lister = crate::listing::Lister {
            cluster: &self.cluster,
            replica: &self.replica,
            page_entries: self.limits.page_entries(0),
            // Half the request deadline: the answer, with its cursor, must
            // reach the caller in time.
            budget: self.config.request_timeout() / 2,
        };
        lister.list(request).await
    }

    /// Opens the node's data directory with the configured engine and
    /// builds the node.
    pub fn open(config: ServerConfig, dialer: Arc<dyn Dialer>) -> Result<Arc<Self>> {
        // Flags that contradict each other are refused before anything opens.
        config.validate().map_err(Error::InvalidArgument)?;
        let data_dir = config.data_dir();
        crate::storage::data_dir::prepare(&data_dir)?;
        let storage = Self::open_storage(&config)?;
        Self::with_parts(config, storage, LayoutStore::in_dir(&data_dir), dialer)
    }

    /// Opens the storage engine `config` names in its data dir (created
    /// before), refusing a data dir of the other engine.
    fn open_storage(config: &ServerConfig) -> Result<Arc<dyn Storage>> {
        let data_dir = config.data_dir();
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
        Ok(storage)
    }

    /// For `--join`: when the data dir holds no layout yet, asks the seeds
    /// to add this node and stores the layout that has it joining. A node
    /// restarted from its data dir rejoins with the layout it holds.
    pub async fn join_if_needed(config: &ServerConfig, dialer: Arc<dyn Dialer>) -> Result<()> {
        if config.join_seeds().is_empty() {
            return Ok(());
        }
        let data_dir = config.data_dir();
        crate::storage::data_dir::prepare(&data_dir)?;
        Self::join_with_store(config, &LayoutStore::in_dir(&data_dir), dialer).await
    }

    /// [`Node::join_if_needed`] with the layout kept in `store`.
    pub async fn join_with_store(
        config: &ServerConfig,
        store: &LayoutStore,
        dialer: Arc<dyn Dialer>,
    ) -> Result<()> {
        let seeds = config.join_seeds();
        if seeds.is_empty() {
            return Ok(());
        }
        if store.load()?.is_some_and(|s| s.committed.is_some()) {
            tracing::info!("the data dir holds a layout: rejoining with it (--join ignored)");
            return Ok(());
        }
        Self::join_with_store_as(config, store, dialer, InstanceId::NONE, Duration::ZERO).await
    }

    /// [`Node::join_with_store`] as instance `instance` (the data dir's),
    /// which the layout then names, retrying while no seed answers for
    /// `retry_for` (see [`crate::membership::request_join`]).
    pub async fn join_with_store_as(
        config: &ServerConfig,
        store: &LayoutStore,
        dialer: Arc<dyn Dialer>,
        instance: InstanceId,
        retry_for: Duration,
    ) -> Result<()> {
        let seeds = config.join_seeds();
        if seeds.is_empty() || store.load()?.is_some_and(|s| s.committed.is_some()) {
            return Ok(());
        }
        let peers = PeerPool::new(dialer, 64 << 20);
        // A joiner given --cluster-token joins only that cluster.
        peers.set_cluster_id(config.cluster_token_id());
        let address = config.advertised_address();
        tracing::info!(%address, %instance, seeds = ?seeds, "asking to join the cluster");
        let replaces = config.replace.clone().unwrap_or_default();
        if !replaces.is_empty() {
            tracing::info!(%replaces, "taking a dead member's place (--replace)");
        }
        let layout = crate::membership::request_join(
            &peers,
            &seeds,
            &address,
            instance,
            &replaces,
            config.request_timeout() * 4,
            retry_for,
        )
        .await?;
        tracing::info!(version = layout.version, "added to the layout as joining");
        store.save(&crate::layout::paxos::LayoutState {
            committed: Some(layout),
            ..Default::default()
        })
    }

    /// Builds the node over a given storage engine (its layout kept in
    /// memory).
    pub fn with_storage(
        config: ServerConfig,
        storage: Arc<dyn Storage>,
        dialer: Arc<dyn Dialer>,
    ) -> Result<Arc<Self>> {
        Self::with_parts(config, storage, LayoutStore::in_memory(), dialer)
    }

    /// Builds the node over a storage engine and a layout store.
    ///
    /// One piece: after the steps that check or open something (the
    /// helpers below), what is left is a list of constructors in the order
    /// the parts depend on each other (the layout owner before anything
    /// that places a request); split, it would only pass the parts around.
    pub fn with_parts(
        config: ServerConfig,
        storage: Arc<dyn Storage>,
        layout_store: LayoutStore,
        dialer: Arc<dyn Dialer>,
    ) -> Result<Arc<Self>> {
        config.validate().map_err(Error::InvalidArgument)?;
        let address = config.advertised_address();
        check_members(&config, &address)?;
        let (layout_state, layout) = stored_layout(&config, &layout_store, &address)?;
        let placement = placement_of(&config, layout.clone(), &address);
        let limits = Limits {
            max_key_bytes: config.max_key_bytes,
            max_value_bytes: config.max_value_bytes,
            max_batch_items: config.max_batch_items,
            max_page_entries: config.max_page_entries,
        };
        let bound = config.skew_bound();
        let (identity, me, replica) = open_replica(&storage, &placement, &layout, bound, address)?;
        let metrics = metrics::NodeMetrics::default();
        let (peers, liveness) = reach_peers(&config, dialer, &placement, &limits, bound, &metrics);
        let removal = Arc::new(Removal::new(&me.address, me.instance_id));
        let layouts = Arc::new(
            LayoutOwner::new(
                &me.address,
                layout_store,
                layout_state,
                placement,
                replica.clone(),
                liveness.clone(),
                peers.clone(),
                config.rpc_timeout(),
            )?
            .with_removal(removal.clone()),
        );
        let cluster = Arc::new(ClusterView::new(
            layouts.clone(),
            peers,
            liveness,
            config.rpc_timeout(),
        ));
        let progress = JoinProgress::default();
        let shutdown = CancellationToken::new();
        let background = Background::new(shutdown.child_token());
        let hints = open_hints(&storage, &config, &replica)?;
        let anti_entropy = Arc::new(AntiEntropy::new(
            replica.clone(),
            cluster.clone(),
            Duration::from_secs(config.tombstone_grace),
            identity.clone(),
        ));
        let coordinator = Arc::new(Coordinator::new(
            replica.clone(),
            cluster.clone(),
            config.request_timeout(),
            background.clone(),
            hints.clone(),
        ));
        let heartbeats = Arc::new(Heartbeats::new(
            me.clone(),
            cluster.clone(),
            identity.clone(),
            replica.clone(),
            progress.clone(),
            config.heartbeat_interval(),
        ));
        let membership = Membership::new(
            me.clone(),
            cluster.clone(),
            replica.clone(),
            layouts,
            progress,
            config.stream_rate,
            anti_entropy.clone(),
        );
        membership.wish_cluster_id(config.cluster_token_id());
        membership.keep_agreement_in(storage.clone())?;
        let load = load::Load::new(load::LoadLimits {
            per_connection: config.max_requests_per_connection,
            client_requests: config.max_client_requests,
            node_requests: config.max_node_requests,
            connections: config.max_connections,
        });
        let quota = Arc::new(quota::DataQuota::new(config.max_data_bytes));
        Ok(Arc::new(Self {
            membership,
            hint_delivery: Arc::new(HintDelivery::new(cluster.clone(), hints.clone())),
            config,
            me,
            cluster,
            limits,
            storage,
            replica,
            coordinator,
            background,
            shutdown,
            started: Instant::now(),
            hints,
            anti_entropy,
            heartbeats,
            identity,
            workers: Workers::new(),
            removal,
            arrivals: lateness::Arrivals::new(),
            load,
            quota,
            forward_counts: writes::ForwardCounts::default(),
            metrics,
            serving: Arc::default(),
            draining: Arc::default(),
        }))
    }

    pub fn address(&self) -> &str {
        &self.me.address
    }

    /// Whether the node serves: it said SERVING and is not draining.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    pub fn replica(&self) -> &Arc<ReplicaStore> {
        &self.replica
    }

    pub(crate) fn local_stats(&self) -> crate::net::messages::NodeStats {
        let stats = self.replica.stats();
        let ae = &self.anti_entropy.stats;
        crate::net::messages::NodeStats {
            live_keys: stats.live_keys,
            tombstones: stats.tombstones,
            hlc: stats.hlc,
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
            requests_shed: self.load.requests_shed(),
            connections_refused: self.load.connections_refused(),
            data_bytes: self.quota.bytes(),
            data_quota_reached: self.quota.is_full(),
            writes_forwarded: self.forward_counts.forwarded(),
            forwarded_writes_coordinated: self.forward_counts.coordinated(),
        }
    }

    /// Starts the periodic workers: heartbeats, hint delivery, anti-entropy,
    /// membership and (for `--fsync periodic`) fsync. Each reports to
    /// `self.workers` and stops when the node shuts down. Heartbeats never
    /// back off: the failure detector takes a late round for this node
    /// being paused, and a peer back up is found by the next ping.
    fn start_workers(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let heartbeat = self.config.heartbeat_interval();
        let heartbeats = self.heartbeats.clone();
        let hint_delivery = self.hint_delivery.clone();
        let anti_entropy = self.anti_entropy.clone();
        let (membership, heartbeats_for_moves) = (self.membership.clone(), self.heartbeats.clone());
        // The first anti-entropy round comes a second after start: a node
        // that was down is the one with the most to catch up.
        let exchange = Duration::from_secs(self.config.anti_entropy_interval.max(1));
        let deliver = Duration::from_millis(self.config.hint_delivery_interval_ms.max(10));
        let workers = &self.workers;
        let mut started = vec![
            workers.start(
                "heartbeats",
                Schedule::every(Duration::ZERO, heartbeat).without_backoff(),
                self.shutdown.clone(),
                move || {
                    let heartbeats = heartbeats.clone();
                    async move { heartbeats.round().await }
                },
            ),
            workers.start(
                "hint delivery",
                Schedule::every(Duration::ZERO, deliver),
                self.shutdown.clone(),
                move || {
                    let hint_delivery = hint_delivery.clone();
                    async move { hint_delivery.round().await }
                },
            ),
            workers.start(
                "anti-entropy",
                Schedule::every(exchange.min(Duration::from_secs(1)), exchange),
                self.shutdown.clone(),
                move || {
                    let anti_entropy = anti_entropy.clone();
                    async move { anti_entropy.round().await }
                },
            ),
            workers.start(
                "membership",
                Schedule::every(heartbeat, Duration::from_millis(300)),
                self.shutdown.clone(),
                move || {
                    let (membership, heartbeats) =
                        (membership.clone(), heartbeats_for_moves.clone());
                    async move { membership.round(&heartbeats).await }
                },
            ),
        ];
        started.extend(self.start_periodic_fsync());
        started.push(tokio::spawn(
            self.arrivals.clone().watch_stalls(self.shutdown.clone()),
        ));
        started.push(tokio::spawn(
            self.quota
                .clone()
                .watch(self.config.data_dir(), self.shutdown.clone()),
        ));
        started
    }

    /// Fsyncs every `--fsync-interval-ms` until shutdown (periodic policy).
    /// A round fails when the sync does. (A failed fsync is fatal inside
    /// the engine, `storage::fatal`: DKVSServer exits non-zero and every
    /// later write is refused; other errors, such as a full disk, are
    /// reported here, by the runner.)
    fn start_periodic_fsync(&self) -> Option<tokio::task::JoinHandle<()>> {
        if self.config.fsync != FsyncPolicy::Periodic {
            return None;
        }
        let interval = Duration::from_millis(self.config.fsync_interval_ms.max(1));
        let storage = self.storage.clone();
        Some(self.workers.start(
            "fsync",
            Schedule::every(interval, interval),
            self.shutdown.clone(),
            move || {
                let storage = storage.clone();
                async move {
                    match crate::seams::blocking(move || storage.sync()).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(error)) => Err(WorkerError::new(format!("sync failed: {error}"))),
                        Err(error) => Err(WorkerError::new(format!("sync task failed: {error}"))),
                    }
                }
            },
        ))
    }
}

/// Warns when `address` is missing from `--peers` (it then joins the ring
/// as an extra member) and refuses member addresses whose ids collide.
fn check_members(config: &ServerConfig, address: &str) -> Result<()> {
    let listed = config.peers.iter().any(|p| p.trim() == address);
    let others = config.peers.iter().filter(|p| !p.trim().is_empty()).count();
    if others > 0 && !listed {
        tracing::warn!(
            %address,
            "this node's address is not in --peers; it joins the ring as an extra member. \
             If --peers names it differently (e.g. localhost vs 127.0.0.1), use the same spelling or --advertise"
        );
    }
    let members: Vec<Member> = config
        .member_addresses()
        .into_iter()
        .map(Member::new)
        .collect();
    let ids: std::collections::HashSet<_> = members.iter().map(|m| m.member_id).collect();
    if ids.len() != members.len() {
        return Err(Error::InvalidArgument(
            "two member addresses hash to the same node id; change one of them".into(),
        ));
    }
    Ok(())
}

/// The layout state in `layout_store` (bootstrapped from the flags if it
/// holds none) and its committed layout, which must name `address`.
fn stored_layout(
    config: &ServerConfig,
    layout_store: &LayoutStore,
    address: &str,
) -> Result<(LayoutState, Arc<Layout>)> {
    let layout_state = Membership::load_or_bootstrap(layout_store, || {
        let mut first =
            Layout::bootstrap(&config.member_addresses(), config.replicas, config.vnodes);
        first.cluster_id = config.cluster_token_id();
        first
    })?;
    let layout = Arc::new(
        layout_state
            .committed
            .clone()
            .ok_or_else(|| Error::Internal("no layout after bootstrap".into()))?,
    );
    if !layout.is_member(address) {
        return Err(Error::InvalidArgument(format!(
            "the stored layout v{} does not name this node's address {address}; start it with the address it joined with (--listen/--advertise)",
            layout.version
        )));
    }
    check_cluster_token(config, &layout)?;
    let fixed =
        crate::config::checks::layout_flags(config, layout.version, layout.replicas, layout.vnodes);
    if let Err(why) = fixed {
        // A joiner learns N and vnodes from the cluster it joins, so its
        // flags could not be checked before: it goes on with the cluster's,
        // and is refused at a start once it is a full member.
        let joining = layout
            .member(address)
            .is_some_and(|m| m.role == crate::layout::Role::Joining);
        if !joining {
            return Err(Error::InvalidArgument(why));
        }
        tracing::warn!(
            "{why}. This node is joining and uses the cluster's values; once it has joined, a start \
             with these flags is refused"
        );
    }
    Ok((layout_state, layout))
}

/// The placement of `layout` seen from `address`, warning when it has
/// fewer members than `--replicas`.
fn placement_of(config: &ServerConfig, layout: Arc<Layout>, address: &str) -> Placement {
    let placement = Placement::of_layout(layout, address.to_string());
    if placement.replicas() < config.replicas {
        tracing::warn!(
            requested = config.replicas,
            members = placement.members().len(),
            "fewer members than --replicas; each key gets one replica per member"
        );
    }
    placement
}

/// Opens this node's identity and its replica over `storage`, the replica's
/// digests counted over `layout`'s read ring.
fn open_replica(
    storage: &Arc<dyn Storage>,
    placement: &Placement,
    layout: &Layout,
    bound: SkewBound,
    address: String,
) -> Result<(Arc<Identity>, ThisNode, Arc<ReplicaStore>)> {
    let sharing = placement
        .sharing_peers()
        .map(|m| m.address.clone())
        .collect();
    let identity = Arc::new(Identity::open(
        storage.clone(),
        sharing,
        is_fresh(&**storage)?,
    )?);
    let me = ThisNode {
        member_id: crate::ring::member_id_for(&address),
        instance_id: identity.instance_id,
        address,
    };
    let replica = Arc::new(
        ReplicaStore::open(
            me.instance_id,
            storage.clone(),
            placement.ring().clone(),
            bound,
        )?
        .with_read_gate(identity.clone()),
    );
    // Counted over the layout's read ring just now; serve that version.
    replica.digests_are_of(layout.version);
    tracing::info!(
        member_id = me.member_id.to_string(),
        instance_id = me.instance_id.to_string(),
        "identity"
    );
    Ok((identity, me, replica))
}

/// The pool of connections to the peers of `placement` and the failure
/// detector watching them.
fn reach_peers(
    config: &ServerConfig,
    dialer: Arc<dyn Dialer>,
    placement: &Placement,
    limits: &Limits,
    bound: SkewBound,
    metrics: &metrics::NodeMetrics,
) -> (Arc<PeerPool>, Liveness) {
    let peers = Arc::new(
        PeerPool::new(dialer, max_message_bytes(limits.max_value_bytes))
            .with_call_metrics(metrics.calls.clone())
            .with_skew_bound(bound)
            .with_sender(placement.me()),
    );
    let liveness = Liveness::new(FailureDetector::new(
        placement.peers().map(|m| m.address.clone()),
        Instant::now(),
        config.heartbeat_interval(),
        config.phi_threshold,
    ));
    (peers, liveness)
}

/// Opens the hint store over `storage`, bounded by the flags.
fn open_hints(
    storage: &Arc<dyn Storage>,
    config: &ServerConfig,
    replica: &ReplicaStore,
) -> Result<Arc<HintStore>> {
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
    Ok(hints)
}
