//! Node configuration: command-line flags, optionally read from a file.
//!
//! Every setting is a `DKVSServer` flag. `--config FILE` reads the same
//! settings from a TOML file whose keys are the flag names without the
//! leading dashes (`_` may stand for `-`):
//!
//! ```toml
//! listen = "127.0.0.1:7001"
//! peers = ["127.0.0.1:7001", "127.0.0.1:7002"]  # or "a,b", as on the command line
//! replicas = 3
//! phi-threshold = 8.0
//! fsync = "always"
//! ```
//!
//! Strings are quoted, numbers are not. Each setting becomes a `--name=value`
//! argument checked by the flag's own clap parser, so the ranges live in one
//! place; a problem (TOML syntax, an unknown key, a value of the wrong type or
//! out of range, a `config` key) is reported with the file and line. Flags
//! given on the command line replace the file's settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clap::builder::TypedValueParser;

use crate::storage::{Engine, FsyncPolicy};

pub mod checks;
mod file;

use file::{config_file_in, file_to_args};

/// Default tokens per node on the ring.
pub const DEFAULT_VNODES: usize = 256;
/// Default `--stream-rate`: records per second a joining node copies.
pub const DEFAULT_STREAM_RATE: u64 = 50_000;
/// Default replication factor N.
pub const DEFAULT_REPLICAS: usize = 3;
/// Default key limit, in bytes of UTF-8.
pub const DEFAULT_MAX_KEY_BYTES: usize = 1024;
/// Default value limit: 1 MiB.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Defaults of the request limits (see docs/OPERATIONS.md, "Limits").
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 256;
pub const DEFAULT_MAX_REQUESTS_PER_CONNECTION: usize = 128;
pub const DEFAULT_MAX_CLIENT_REQUESTS: usize = 1024;
pub const DEFAULT_MAX_NODE_REQUESTS: usize = 2048;

/// Default `--max-batch-items`: eight times the most any DKVS sender puts
/// in one call (a node's or the smart client's batch pipe sends at most
/// 512 items, a joining node at most 1024 intervals per stream request).
pub const DEFAULT_MAX_BATCH_ITEMS: usize = 4096;
/// Smallest `--max-batch-items`: what DKVS's own senders need.
pub const MIN_MAX_BATCH_ITEMS: usize = 1024;
// Nodes' own batches never reach a receiver's cap.
const _: () = assert!(crate::net::MAX_BATCH_ITEMS <= MIN_MAX_BATCH_ITEMS);
/// Default `--max-page-entries`: keys in one page of a range listing.
pub const DEFAULT_MAX_PAGE_ENTRIES: usize = 1024;
/// Default `--request-body-timeout-ms`: the longest deadline any DKVS
/// caller sets on one call (a node's batch call, 10 s).
pub const DEFAULT_REQUEST_BODY_TIMEOUT_MS: u64 = 10_000;

/// One DKVS storage node.
#[derive(Clone, Debug, Parser)]
#[command(name = "DKVSServer", version, about, long_about = None, args_override_self = true)]
pub struct ServerConfig {
    /// Address to listen on, e.g. 127.0.0.1:7001.
    #[arg(long)]
    pub listen: SocketAddr,

    /// Address peers and clients reach this node at, exactly as it appears in
    /// --peers (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,

    /// Comma-separated addresses of the first members of a new cluster,
    /// this node's own address included (as --advertise or --listen spells
    /// it). Every first member must be given the same list; a node that is
    /// not one of them joins with --join.
    #[arg(long, value_delimiter = ',', default_value = "")]
    pub peers: Vec<String>,

    /// A token naming the cluster, the same on every --peers node (like
    /// etcd's --initial-cluster-token): the cluster id is its hash, so two
    /// clusters started with different tokens never take each other's
    /// messages. Without one, the first members agree on a random id.
    #[arg(long)]
    pub cluster_token: Option<String>,

    /// Comma-separated addresses of running members: join their cluster
    /// (used only when the data dir holds no layout yet; a node restarted
    /// from its data dir rejoins with the layout it holds).
    #[arg(long, value_delimiter = ',', default_value = "")]
    pub join: Vec<String>,

    /// With --join: take the place of this dead member (its address as
    /// `DKVSClient status` lists it). One change removes it and makes this
    /// node a joiner with its ring tokens; this node streams its ranges
    /// from the other replicas and serves reads once it holds them. At the
    /// dead member's own address (a rebuilt machine) it is a plain --join.
    #[arg(long)]
    pub replace: Option<String>,

    /// Recovery when a majority of the members is lost for good: start a
    /// new layout in which this node (a survivor, from its data dir) is
    /// the only member and every other member is removed. Needs
    /// --allow-data-loss; refused when a majority of the members this node
    /// knows still answers. Writes only the lost members held are gone;
    /// other survivors must be wiped and --join again. Remove the flag once
    /// the node started.
    #[arg(long)]
    pub force_new_layout: bool,

    /// With --force-new-layout: accept that writes held only by the lost
    /// members are gone.
    #[arg(long)]
    pub allow_data_loss: bool,

    /// Records per second a joining node copies from the members giving it
    /// their ranges (0: as fast as it can).
    #[arg(long, default_value_t = DEFAULT_STREAM_RATE)]
    pub stream_rate: u64,

    /// Directory for this node's data (created if missing).
    /// Default: ./data/<listen address>.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Replication factor N: replicas per key (capped at the member count).
    #[arg(long, default_value_t = DEFAULT_REPLICAS, value_parser = clap::value_parser!(u32).range(1..=64).map(|v| v as usize))]
    pub replicas: usize,

    /// Virtual nodes (ring tokens) per member. Every node must use the same value.
    #[arg(long, default_value_t = DEFAULT_VNODES, value_parser = clap::value_parser!(u32).range(1..=65536).map(|v| v as usize))]
    pub vnodes: usize,

    /// Read settings from this TOML file (keys are the flag names, e.g.
    /// `listen = "127.0.0.1:7001"`); command-line flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Storage engine: `log` (append-only log, every key indexed in memory;
    /// fastest) or `fjall` (LSM tree; keys need not fit in memory). A data
    /// dir keeps the engine it was created with.
    #[arg(long, value_enum, default_value_t = Engine::Log)]
    pub storage_engine: Engine,

    /// When writes reach stable storage: `periodic` (handed to the OS before
    /// the ack, so a crash or SIGKILL loses nothing; fsync every
    /// --fsync-interval-ms) or `always` (fsync before every ack).
    #[arg(long, value_enum, default_value_t = FsyncPolicy::Periodic)]
    pub fsync: FsyncPolicy,

    /// Background fsync interval for --fsync periodic, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub fsync_interval_ms: u64,

    /// Deadline of each node-to-node call, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub rpc_timeout_ms: u64,

    /// Deadline of a whole client request coordinated by this node, in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub request_timeout_ms: u64,

    /// How often each node sends every peer a heartbeat, in milliseconds.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub heartbeat_interval_ms: u64,

    /// Failure-detector threshold: a peer whose phi (suspicion level) reaches
    /// this is believed down. 8 convicts a silent peer about a second after
    /// its last heartbeat at the default interval; higher is more tolerant.
    #[arg(long, default_value_t = 8.0, value_parser = parse_phi_threshold)]
    pub phi_threshold: f64,

    /// Most hints (writes kept for replicas that are down) this node holds.
    #[arg(long, default_value_t = 100_000)]
    pub max_hints: u64,

    /// Most bytes of hints this node holds (besides --max-hints): a hint
    /// that would exceed it is refused, and anti-entropy repairs its replica.
    #[arg(long, default_value_t = 1 << 30)]
    pub max_hint_bytes: u64,

    /// Hints older than this many seconds are dropped instead of delivered
    /// (anti-entropy repairs what they carried).
    #[arg(long, default_value_t = 3 * 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_hint_age_secs: u64,

    /// How often hints are offered to replicas that are back, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub hint_delivery_interval_ms: u64,

    /// Seconds between anti-entropy rounds: each node compares its hash tree
    /// over shared token ranges with every live peer and copies what differs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub anti_entropy_interval: u64,

    /// Seconds a tombstone is kept after its delete before it may be purged
    /// (only once every replica of the key holds it). Its age comes from the
    /// physical part of its version. Must exceed --max-hint-age-secs + 2 x
    /// --max-clock-skew-ms + the heartbeat interval, so that no hint and no
    /// write that begins after a purge can be stamped below the tombstone,
    /// whichever node coordinates it.
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub tombstone_grace: u64,

    /// Largest clock difference tolerated between nodes, in milliseconds.
    /// A version whose wall-clock part is further ahead of this node's wall
    /// clock is refused (so one bad clock or message cannot drag the
    /// cluster's clocks into the future), and a node whose own clock would
    /// run that far ahead refuses to stamp writes. Keep hosts in sync with
    /// NTP; a node warns when a peer's clock is half this far off.
    #[arg(long, default_value_t = crate::clock::DEFAULT_MAX_CLOCK_SKEW_MS, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub max_clock_skew_ms: u64,

    /// Threads serving requests (default: one per CPU). 1 runs the whole
    /// node on one thread (tokio's current-thread runtime): no hand-offs
    /// between threads, the fastest choice when several nodes share a small
    /// machine's cores (a local cluster, a benchmark). Disk syncs and
    /// compaction run on their own threads either way.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024).map(|v| v as usize))]
    pub worker_threads: Option<usize>,

    /// Longest key accepted, in bytes of UTF-8.
    #[arg(long, default_value_t = DEFAULT_MAX_KEY_BYTES, value_parser = clap::value_parser!(u32).range(1..=65_536).map(|v| v as usize))]
    pub max_key_bytes: usize,

    /// This node's certificate chain (PEM, its own certificate first). With
    /// --tls-key and --tls-ca the node serves TLS only, and talks to its
    /// peers over mutual TLS: the certificate must name the node as a SAN
    /// URI `dkvs-node:<address>` (its --advertise, else --listen) and its
    /// host (an IP or DNS SAN). Reloaded when the file changes and on SIGHUP.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, SEC1 or PKCS#1).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,

    /// The CA certificates (PEM) that peers' node certificates chain to;
    /// also the CA clients check this node's certificate with.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,

    /// Client tokens: one `<token> <role>` per line (roles read, readwrite,
    /// admin; a token may be written `sha256:<hex>`). Clients then send
    /// `authorization: Bearer <token>`. Needs TLS (tokens would travel in
    /// clear text) unless --insecure-plaintext-auth. Reloaded when the file
    /// changes and on SIGHUP.
    #[arg(long)]
    pub auth_file: Option<PathBuf>,

    /// Allow --auth-file without TLS: tokens travel in clear text and the
    /// node-to-node services cannot tell nodes from others (only for a
    /// network every host of which is trusted).
    #[arg(long)]
    pub insecure_plaintext_auth: bool,

    /// Largest value accepted, in bytes (at most 256 MiB: a value travels
    /// whole in one gRPC message).
    #[arg(long, default_value_t = DEFAULT_MAX_VALUE_BYTES, value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub max_value_bytes: usize,

    /// Most connections served at once; past it a new connection is closed
    /// at once (the client tries another node).
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|v| v as usize))]
    pub max_connections: usize,

    /// Most concurrent HTTP/2 streams (calls) a client may open on one
    /// connection; the client queues past it.
    #[arg(long, default_value_t = DEFAULT_MAX_STREAMS_PER_CONNECTION, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_streams_per_connection: u32,

    /// Most requests in progress from one connection; past it a request is
    /// refused at once (UNAVAILABLE, not applied, with a retry-after-ms hint).
    #[arg(long, default_value_t = DEFAULT_MAX_REQUESTS_PER_CONNECTION, value_parser = clap::value_parser!(u32).range(1..=65_536).map(|v| v as usize))]
    pub max_requests_per_connection: usize,

    /// Most client requests (KeyValue, Cluster, ReplicaRead) in progress on
    /// this node; past it a client request is refused at once, like above.
    #[arg(long, default_value_t = DEFAULT_MAX_CLIENT_REQUESTS, value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|v| v as usize))]
    pub max_client_requests: usize,

    /// Most bytes this node's data dir may hold (0: no quota). At or past
    /// it, new values are refused (RESOURCE_EXHAUSTED); deletes still work,
    /// and writes are taken again once it is below.
    #[arg(long, default_value_t = 0)]
    pub max_data_bytes: u64,

    /// Most node-to-node requests (replication, heartbeats, membership) in
    /// progress on this node: their own budget, so a client flood cannot
    /// starve them.
    #[arg(long, default_value_t = DEFAULT_MAX_NODE_REQUESTS, value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|v| v as usize))]
    pub max_node_requests: usize,

    /// Most items (reads, writes, intervals) one node-to-node or replica
    /// batch call may carry; a call with more is refused with
    /// INVALID_ARGUMENT. At least 1024, what DKVS's own senders need.
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH_ITEMS, value_parser = clap::value_parser!(u32).range(MIN_MAX_BATCH_ITEMS as i64..=1_000_000).map(|v| v as usize))]
    pub max_batch_items: usize,

    /// Most keys in one page of a range listing (anti-entropy and hand-offs
    /// page through a range with this many keys per answer).
    #[arg(long, default_value_t = DEFAULT_MAX_PAGE_ENTRIES, value_parser = clap::value_parser!(u32).range(1..=65_536).map(|v| v as usize))]
    pub max_page_entries: usize,

    /// Longest a request's body may take to arrive, in milliseconds, counted
    /// from its headers; a slower one is refused (DEADLINE_EXCEEDED) and its
    /// stream reset.
    #[arg(long, default_value_t = DEFAULT_REQUEST_BODY_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub request_body_timeout_ms: u64,

    /// Also serve HTTP on this address, e.g. 127.0.0.1:8001: `/metrics`
    /// (Prometheus), `/health/live` and `/health/ready` (load balancers).
    /// With the node's TLS and tokens when it has them (`/metrics` needs a
    /// read token; health stays open). Off by default.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,

    /// Also speak the Redis protocol (RESP2/RESP3, and inline commands for
    /// `nc`) on this address, e.g. 127.0.0.1:9001, for redis-cli and Redis
    /// libraries: GET, SET, DEL, MGET, MSET, SCAN, ... on any key. With the
    /// node's TLS and tokens when it has them (AUTH takes a token). Off by
    /// default.
    #[arg(long)]
    pub resp_listen: Option<SocketAddr>,

    /// The consistency RESP connections read and write at unless one asks
    /// for another (`CONSISTENCY ONE|QUORUM|ALL`).
    #[arg(long, value_enum, default_value_t = crate::quorum::Consistency::Quorum)]
    pub resp_consistency: crate::quorum::Consistency,

    /// Log lines as `text` (for people) or `json` (one object per line, for
    /// log collectors).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl ServerConfig {
    /// Parses the process arguments, merging `--config FILE` if given.
    /// Errors (and `--help`) are clap errors: `error.exit()` prints them and
    /// exits with clap's codes (2 for usage errors, 0 for help).
    pub fn from_args() -> Result<Self, clap::Error> {
        Self::from_arg_list(std::env::args().collect())
    }

    /// Parses an argument list (program name first), merging `--config FILE`.
    pub fn from_arg_list(args: Vec<String>) -> Result<Self, clap::Error> {
        let file_error = |message: String| {
            clap::Error::raw(clap::error::ErrorKind::InvalidValue, format!("{message}\n"))
        };
        let merged = match config_file_in(&args) {
            Some(path) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| file_error(format!("cannot read --config {path}: {e}")))?;
                let from_file =
                    file_to_args(&text).map_err(|e| file_error(format!("{path} {e}")))?;
                // A flag on the command line replaces the file's setting,
                // a list (--peers) too, which clap would append to.
                let on_command_line = <Self as clap::CommandFactory>::command()
                    .ignore_errors(true)
                    .try_get_matches_from(&args)
                    .ok();
                let given = |id: &clap::Id| {
                    on_command_line.as_ref().is_some_and(|matches| {
                        matches.value_source(id.as_str())
                            == Some(clap::parser::ValueSource::CommandLine)
                    })
                };
                // Program name, the file's settings, then the command line.
                let mut merged = vec![args[0].clone()];
                merged.extend(
                    from_file
                        .into_iter()
                        .filter(|(id, _)| !given(id))
                        .map(|(_, argument)| argument),
                );
                merged.extend(args.into_iter().skip(1));
                merged
            }
            None => args,
        };
        Self::try_parse_from(merged)
    }

    /// The address this node is known by.
    pub fn advertised_address(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// Every member's address, this node's included, without duplicates or blanks.
    /// Seeds given with --join (trimmed, without empties).
    pub fn join_seeds(&self) -> Vec<String> {
        self.join
            .iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect()
    }

    pub fn member_addresses(&self) -> Vec<String> {
        let mut members: Vec<String> = self
            .peers
            .iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        members.push(self.advertised_address());
        members.sort();
        members.dedup();
        members
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| {
            PathBuf::from("data").join(self.listen.to_string().replace(':', "_"))
        })
    }

    pub fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.rpc_timeout_ms.max(1))
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.max(10))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }

    pub fn skew_bound(&self) -> crate::clock::SkewBound {
        crate::clock::SkewBound::new(self.max_clock_skew_ms)
    }

    /// Checks that settings agree with each other. Runs before anything is
    /// opened, so a usage error appears at once even on a large data dir.
    pub fn validate(&self) -> Result<(), String> {
        checks::check(self)?;
        self.validate_peers()?;
        if self.force_new_layout && !self.allow_data_loss {
            return Err(
                "--force-new-layout drops every other member and whatever only they held: \
                 add --allow-data-loss to say you accept that"
                    .into(),
            );
        }
        if self.force_new_layout && (!self.join_seeds().is_empty() || self.replace.is_some()) {
            return Err(
                "--force-new-layout starts from this node's own data dir: no --join or --replace"
                    .into(),
            );
        }
        if let Some(dead) = &self.replace
            && self.join_seeds().is_empty()
        {
            return Err(format!(
                "--replace {dead} needs --join SEED[,SEED...]: the running members that add this node in its place"
            ));
        }
        if self.auth_file.is_some() && self.tls_files().is_none() && !self.insecure_plaintext_auth {
            return Err(
                "--auth-file without TLS would send every token in clear text: add --tls-cert, \
                 --tls-key and --tls-ca, or --insecure-plaintext-auth if every host on the \
                 network is trusted"
                    .into(),
            );
        }
        let floor_ms = self
            .max_hint_age_secs
            .saturating_mul(1000)
            .saturating_add(self.max_clock_skew_ms.saturating_mul(2))
            .saturating_add(self.heartbeat_interval().as_millis() as u64);
        if self.tombstone_grace.saturating_mul(1000) <= floor_ms {
            return Err(format!(
                "--tombstone-grace ({} s) must exceed --max-hint-age-secs ({} s) + 2 x --max-clock-skew-ms ({} ms) \
                 + --heartbeat-interval-ms ({} ms) = {floor_ms} ms, or a late hint, or a write coordinated by a node \
                 whose clock is behind, could be stamped below a purged tombstone and bring the key back",
                self.tombstone_grace,
                self.max_hint_age_secs,
                self.max_clock_skew_ms,
                self.heartbeat_interval().as_millis()
            ));
        }
        Ok(())
    }
}

impl ServerConfig {
    /// A bootstrapping node (--peers without --join) must be in its own
    /// --peers: every first member then builds the same first layout.
    fn validate_peers(&self) -> Result<(), String> {
        let peers: Vec<&str> = self
            .peers
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .collect();
        let address = self.advertised_address();
        if peers.is_empty() || !self.join_seeds().is_empty() || peers.contains(&address.as_str()) {
            return Ok(());
        }
        Err(format!(
            "{address} is not in --peers ({}): a node that is not one of the first members joins \
             with --join SEED; a first member lists its own address in --peers, spelled as \
             --advertise (or --listen) gives it",
            peers.join(",")
        ))
    }

    /// The TLS files, when all three are given.
    pub fn tls_files(&self) -> Option<crate::security::tls::TlsFiles> {
        Some(crate::security::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ca: self.tls_ca.clone()?,
        })
    }

    /// The cluster id `--cluster-token` gives (0: none given).
    pub fn cluster_token_id(&self) -> u64 {
        self.cluster_token
            .as_deref()
            .map_or(0, crate::layout::cluster_id::id_of_token)
    }
}

/// `--phi-threshold`: a positive, finite number.
fn parse_phi_threshold(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if value.is_finite() && value > 0.0 && value <= 1e6 {
        Ok(value)
    } else {
        Err(format!("{value} is not in 0 < phi <= 1000000"))
    }
}

#[cfg(test)]
mod tests;
