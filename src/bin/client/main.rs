//! `DKVSClient`: the DKVS command-line client. See `DKVSClient --help`.
//!
//! Exit codes: 0 success; 1 GET of a missing key; 2 usage error or input the
//! cluster refused (INVALID_ARGUMENT); 3 cluster unavailable (quorum not
//! reached, no node answered); 4 timeout, or a PUT/DELETE whose outcome is
//! indeterminate (it may or may not have been applied, and may take effect
//! later); 5 any other error.
#![allow(non_snake_case)]

/// mimalloc: the request path allocates many small buffers; glibc malloc
/// showed up as the top symbol in `perf` profiles of a loaded node.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use dkvs::Error;
use dkvs::client::{Client, ClientOptions};
use dkvs::net::Dialer;
use dkvs::pb;
use dkvs::quorum::Consistency;

mod bench;

use bench::workload::{Distribution, Limit, OpGenerator, Target, Workload, Zipfian, key_name};

/// The addresses startServers.sh uses.
const DEFAULT_NODES: &str =
    "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003,127.0.0.1:7004,127.0.0.1:7005";

/// Talks to a DKVS cluster. With no command, opens an interactive prompt.
#[derive(Debug, Parser)]
#[command(name = "DKVSClient", version, about)]
struct Cli {
    /// Comma-separated addresses of cluster nodes to contact first (any one
    /// is enough; the client learns the rest).
    #[arg(long, env = "DKVS_NODES", default_value = DEFAULT_NODES, value_delimiter = ',')]
    nodes: Vec<String>,

    /// How many replicas must answer each request.
    #[arg(long, value_enum, default_value_t = ConsistencyArg::Quorum)]
    consistency: ConsistencyArg,

    /// Deadline of each call to a node, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ConsistencyArg {
    One,
    Quorum,
    All,
    /// Writes only: one replica or one stored hint is enough.
    Any,
}

impl From<ConsistencyArg> for Consistency {
    fn from(c: ConsistencyArg) -> Self {
        match c {
            ConsistencyArg::One => Consistency::One,
            ConsistencyArg::Quorum => Consistency::Quorum,
            ConsistencyArg::All => Consistency::All,
            ConsistencyArg::Any => Consistency::Any,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Store a value: PUT <key> <value> (several words are joined with spaces).
    #[command(name = "PUT", visible_alias = "put")]
    Put {
        key: String,
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        value: Vec<String>,
    },
    /// Print a key's value; exit code 1 when the key does not exist.
    #[command(name = "GET", visible_alias = "get")]
    Get { key: String },
    /// Delete a key.
    #[command(
        name = "DELETE",
        visible_alias = "delete",
        alias = "DEL",
        alias = "del"
    )]
    Delete { key: String },
    /// Show every member, up or down, with key counts (like `nodetool status`).
    #[command(name = "status", alias = "STATUS")]
    Status,
    /// Show which nodes hold a key, in preference order.
    #[command(name = "replicas", alias = "REPLICAS")]
    Replicas { key: String },
    /// Closed-loop YCSB-style load: throughput and latency percentiles.
    #[command(name = "bench")]
    Bench(BenchArgs),
    /// Serve a do-nothing dkvs.v1.KeyValue (for `bench --noop`).
    #[command(name = "noop-server", hide = true)]
    NoopServer {
        #[arg(long, default_value = "127.0.0.1:7199")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// a = 50% reads/50% updates, b = 95/5, c = reads only, w = updates only.
    #[arg(long, value_enum, default_value_t = Workload::A)]
    workload: Workload,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Requests in flight (closed-loop workers).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Client threads; 1 (the default) drives every worker from one thread,
    /// which costs the least CPU per request. Raise it when one core cannot
    /// keep up with the cluster.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds to run (ignored with --ops).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Run this many requests instead of for --duration.
    #[arg(long)]
    ops: Option<u64>,
    /// How keys are drawn.
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    distribution: Distribution,
    /// Send every request to a node (each node in turn), which coordinates
    /// it, instead of using the smart client.
    #[arg(long)]
    via_node: bool,
    /// Skip writing every key once before the measured run.
    #[arg(long)]
    no_preload: bool,
    /// Print the result as one JSON object on stdout (no progress bar).
    #[arg(long)]
    json: bool,
    /// Seed for key and operation choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Drive etcd instead: --nodes are etcd client endpoints, used in turn
    /// (Put for updates, linearizable Range for reads).
    #[arg(long, conflicts_with_all = ["via_node", "noop"])]
    etcd: bool,
    /// Drive a do-nothing KeyValue server (`DKVSClient noop-server`) at
    /// --nodes: the machine's one-hop gRPC ceiling.
    #[arg(long, conflicts_with = "via_node")]
    noop: bool,
}

/// Commands typed at the interactive prompt.
#[derive(Debug, Parser)]
#[command(no_binary_name = true, name = "", disable_help_flag = true)]
struct PromptLine {
    #[command(subcommand)]
    command: Command,
}

/// How a command ended.
enum Outcome {
    Done,
    NotFound,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Some(Command::Bench(args)) => args.threads,
        _ => 1,
    };
    let runtime = match dkvs::runtime(Some(threads)) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("DKVSClient: cannot start the async runtime: {error}");
            return ExitCode::from(5);
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let options = ClientOptions {
        consistency: cli.consistency.into(),
        rpc_timeout: Duration::from_millis(cli.timeout_ms.max(1)),
        ..ClientOptions::default()
    };
    let nodes: Vec<String> = cli
        .nodes
        .iter()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    // Commands that do not talk to a DKVS cluster.
    match cli.command {
        Some(Command::Bench(args)) if args.etcd || args.noop => {
            return match bench(None, &nodes, options.consistency, args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => report(&error),
            };
        }
        Some(Command::NoopServer { listen }) => {
            return match noop_server(listen).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => report(&error),
            };
        }
        _ => {}
    }
    let client = match Client::connect(&nodes, options).await {
        Ok(client) => client,
        Err(error) => return report(&error),
    };
    let code = match cli.command {
        Some(command) => match execute(&client, command).await {
            Ok(Outcome::Done) => ExitCode::SUCCESS,
            Ok(Outcome::NotFound) => ExitCode::from(1),
            Err(error) => report(&error),
        },
        None => prompt(&client).await,
    };
    client.close().await;
    code
}

/// Prints an error and picks the exit code for it.
fn report(error: &Error) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(match error {
        Error::InvalidArgument(_) => 2,
        Error::QuorumNotReached { .. } | Error::Unavailable(_) => 3,
        Error::DeadlineExceeded(_) | Error::Indeterminate(_) => 4,
        _ => 5,
    })
}

/// A write at consistency ANY acknowledged with 0 acks is held only as a
/// hint on some node: say what that risks.
fn warn_if_only_hinted(acks: usize) {
    if acks == 0 {
        eprintln!(
            "note: no replica holds this write yet, only a hint kept for a replica that is down (--consistency any): \
             reads miss it until the hint is delivered, and it is lost if the node holding the hint loses its disk \
             or the hint expires (--max-hint-age-secs) first"
        );
    }
}

async fn execute(client: &Client, command: Command) -> Result<Outcome, Error> {
    let mut out = std::io::stdout().lock();
    match command {
        Command::Put { key, value } => {
            let ack = client.put(&key, value.join(" ")).await?;
            let _ = writeln!(out, "OK (version {}, {} acks)", ack.version, ack.acks);
            warn_if_only_hinted(ack.acks);
        }
        Command::Get { key } => match client.get(&key).await? {
            Some(value) => {
                let _ = out.write_all(&value);
                let _ = writeln!(out);
            }
            None => {
                eprintln!("key not found: {key}");
                return Ok(Outcome::NotFound);
            }
        },
        Command::Delete { key } => {
            let ack = client.delete(&key).await?;
            let _ = writeln!(
                out,
                "OK (deleted, version {}, {} acks)",
                ack.version, ack.acks
            );
            warn_if_only_hinted(ack.acks);
        }
        Command::Status => {
            let status = client.status().await?;
            let _ = write!(out, "{}", status_table(&status));
        }
        Command::Bench(args) => {
            drop(out);
            let consistency = client.consistency();
            bench(Some(client), &[], consistency, args).await?;
        }
        Command::NoopServer { listen } => {
            drop(out);
            noop_server(listen).await?;
        }
        Command::Replicas { key } => {
            for (rank, address) in client.replicas_of(&key).iter().enumerate() {
                let _ = writeln!(out, "{}. {address}", rank + 1);
            }
        }
    }
    Ok(Outcome::Done)
}

/// Nodes in turn, each coordinating the requests it gets.
struct ViaNodeTarget {
    nodes: Vec<pb::key_value_client::KeyValueClient<tonic::transport::Channel>>,
    next: std::sync::atomic::AtomicUsize,
    consistency: i32,
}

impl ViaNodeTarget {
    fn new(addresses: &[String], consistency: Consistency) -> Result<Self, Error> {
        Ok(Self {
            nodes: channels(addresses)?
                .into_iter()
                .map(pb::key_value_client::KeyValueClient::new)
                .collect(),
            next: Default::default(),
            consistency: pb::Consistency::from(consistency) as i32,
        })
    }

    fn node(&self) -> pb::key_value_client::KeyValueClient<tonic::transport::Channel> {
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
struct OwnedSmartTarget(std::sync::Arc<Client>);

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
struct EtcdTarget {
    nodes: Vec<pb::etcd::kv_client::KvClient<tonic::transport::Channel>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Target for EtcdTarget {
    async fn read(&self, key: String) -> Result<(), String> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request = pb::etcd::RangeRequest {
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
        let request = pb::etcd::PutRequest {
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

/// Runs `DKVSClient bench`. `client` is `None` for --etcd and --noop, which
/// talk to `nodes` directly.
async fn bench(
    client: Option<&Client>,
    nodes: &[String],
    consistency: Consistency,
    args: BenchArgs,
) -> Result<(), Error> {
    let system = if args.etcd {
        "etcd"
    } else if args.noop {
        "noop-grpc"
    } else if args.via_node {
        "dkvs-via-node"
    } else {
        "dkvs-smart-client"
    };
    let label = format!(
        "{system} workload {:?} {} keys {} B values {:?} concurrency {} consistency {}",
        args.workload,
        args.keys,
        args.value_size,
        args.distribution,
        args.concurrency.max(1),
        consistency.name()
    );
    let report = match client {
        _ if args.etcd => {
            let nodes = channels(nodes)?
                .into_iter()
                .map(pb::etcd::kv_client::KvClient::new)
                .collect();
            run_bench(
                EtcdTarget {
                    nodes,
                    next: Default::default(),
                },
                &args,
            )
            .await?
        }
        _ if args.noop => run_bench(ViaNodeTarget::new(nodes, consistency)?, &args).await?,
        Some(client) if args.via_node => {
            let addresses: Vec<String> = client
                .ring()
                .members()
                .iter()
                .map(|m| m.address.clone())
                .collect();
            run_bench(ViaNodeTarget::new(&addresses, consistency)?, &args).await?
        }
        Some(client) => {
            let options = dkvs::client::ClientOptions {
                consistency,
                ..Default::default()
            };
            let addresses: Vec<String> = client
                .ring()
                .members()
                .iter()
                .map(|m| m.address.clone())
                .collect();
            let owned = Client::connect(&addresses, options).await?;
            run_bench(OwnedSmartTarget(std::sync::Arc::new(owned)), &args).await?
        }
        None => return Err(Error::InvalidArgument("bench needs a cluster".into())),
    };
    if args.json {
        println!("{}", report.json(&label));
    } else {
        print!("{}", report.text(&label));
        for error in &report.sample_errors {
            println!("  error: {error}");
        }
    }
    Ok(())
}

fn progress_bar(interactive: bool, length: Option<u64>, what: &str) -> indicatif::ProgressBar {
    let bar = match (interactive, length) {
        (false, _) => indicatif::ProgressBar::hidden(),
        (true, Some(n)) => indicatif::ProgressBar::new(n),
        (true, None) => indicatif::ProgressBar::new_spinner(),
    };
    let template = format!(
        "{what} {{spinner}} [{{elapsed_precise}}] {{wide_bar}} {{human_pos}} ops ({{per_sec}})"
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

/// Preloads every key once, then runs the measured closed loop.
async fn run_bench<T: Target>(
    target: T,
    args: &BenchArgs,
) -> Result<bench::workload::Report, Error> {
    let interactive = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let value = bytes::Bytes::from(vec![b'x'; args.value_size]);
    let zipfian = (args.distribution == Distribution::Zipfian)
        .then(|| std::sync::Arc::new(Zipfian::new(args.keys)));
    let concurrency = args.concurrency.max(1);
    let limit = match args.ops {
        Some(ops) => Limit::Ops(ops),
        None => Limit::Duration(Duration::from_secs(args.duration.max(1))),
    };
    let target = std::sync::Arc::new(target);
    if !args.no_preload {
        let bar = progress_bar(interactive, Some(args.keys), "preload");
        let next_key = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (target, value, next_key, keys) =
                (target.clone(), value.clone(), next_key.clone(), args.keys);
            tasks.push(tokio::spawn(async move {
                loop {
                    let k = next_key.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k >= keys {
                        break Ok::<(), String>(());
                    }
                    target.update(key_name(k), value.clone()).await?;
                }
            }));
        }
        let ticker = {
            let (bar, next_key, keys) = (bar.clone(), next_key.clone(), args.keys);
            tokio::spawn(async move {
                loop {
                    bar.set_position(
                        next_key
                            .load(std::sync::atomic::Ordering::Relaxed)
                            .min(keys),
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };
        for task in tasks {
            let outcome = task.await;
            if !matches!(outcome, Ok(Ok(()))) {
                ticker.abort();
                return Err(match outcome {
                    Ok(Err(why)) => Error::Unavailable(format!("preload failed: {why}")),
                    Err(why) => Error::Internal(format!("preload task: {why}")),
                    Ok(Ok(())) => Error::Internal("unreachable".into()),
                });
            }
        }
        ticker.abort();
        bar.finish_and_clear();
    }
    let generators = (0..concurrency as u64)
        .map(|w| {
            OpGenerator::new(
                args.seed.wrapping_mul(1000).wrapping_add(w),
                args.keys,
                args.workload,
                zipfian.clone(),
            )
        })
        .collect();
    let bar = progress_bar(interactive, args.ops, "bench");
    let shown = bar.clone();
    let report = bench::workload::run(target, generators, value, limit, move |n| {
        shown.set_position(n)
    })
    .await;
    bar.finish_and_clear();
    Ok(report)
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
}

async fn noop_server(listen: std::net::SocketAddr) -> Result<(), Error> {
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

/// A `nodetool status`-like table.
/// Age from which a member's counts are shown as old (four default
/// heartbeat intervals).
const STALE_COUNTS_MS: u64 = 2_000;

fn status_table(status: &pb::StatusResponse) -> String {
    let mut table = format!(
        "DKVS cluster as seen by {} — {} members, N={} replicas, W={} R={} (quorum), {} vnodes per node\n\n",
        status.address,
        status.members.len(),
        status.replicas,
        status.write_quorum,
        status.read_quorum,
        status.vnodes
    );
    table.push_str(&format!(
        "{:<22} {:<17} {:<5} {:>5} {:>10} {:>10} {:>7} {:>19} {:>8} {:>9}  {}\n",
        "ADDRESS",
        "NODE ID",
        "STATE",
        "PHI",
        "LIVE KEYS",
        "TOMBSTONES",
        "HINTS",
        "HLC",
        "SKEW",
        "UPTIME",
        "NOTE"
    ));
    for member in &status.members {
        let up = member.state == pb::MemberState::Up as i32;
        let (keys, tombstones, hints, lamport, uptime) = match &member.stats {
            Some(s) => (
                s.live_keys.to_string(),
                s.tombstones.to_string(),
                s.hints_pending.to_string(),
                s.lamport.to_string(),
                format!("{}s", s.uptime_ms / 1000),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        let note = if member.address == status.address {
            "(this node)".to_string()
        } else {
            let mut note = member.error.clone();
            // Counts come from the member's last answered heartbeat: say so
            // once they are older than a few heartbeats.
            if member.stats.is_some() && member.stats_age_ms >= STALE_COUNTS_MS {
                if !note.is_empty() {
                    note.push_str("; ");
                }
                note.push_str(&format!(
                    "counts from {:.1}s ago",
                    member.stats_age_ms as f64 / 1000.0
                ));
            }
            note
        };
        // The member's clock minus the asked node's, from heartbeats.
        let skew = if member.address == status.address {
            "-".to_string()
        } else {
            format!("{:+}ms", member.clock_skew_ms)
        };
        table.push_str(&format!(
            "{:<22} {:016x}  {:<5} {:>5.1} {:>10} {:>10} {:>7} {:>19} {:>8} {:>9}  {}\n",
            member.address,
            member.node_id,
            if up { "UP" } else { "DOWN" },
            member.phi.min(99.9),
            keys,
            tombstones,
            hints,
            lamport,
            skew,
            uptime,
            note
        ));
    }
    table
}

/// The interactive prompt: one command per line until EOF, `exit` or `quit`.
async fn prompt(client: &Client) -> ExitCode {
    let stdin = std::io::stdin();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    if interactive {
        eprintln!(
            "DKVS — {} members. Commands: PUT <key> <value>, GET <key>, DELETE <key>, status, replicas <key>, exit.",
            client.ring().members().len()
        );
    }
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let Some(Ok(line)) = lines.next() else {
            if interactive {
                eprintln!();
            }
            return ExitCode::SUCCESS;
        };
        let words = match split_words(&line) {
            Ok(words) => words,
            Err(why) => {
                eprintln!("error: {why}");
                continue;
            }
        };
        match words.first().map(|w| w.to_ascii_lowercase()).as_deref() {
            None => continue,
            Some("exit" | "quit") => return ExitCode::SUCCESS,
            Some("help") => {
                eprintln!(
                    "PUT <key> <value> | GET <key> | DELETE <key> | status | replicas <key> | exit"
                );
                continue;
            }
            Some(_) => {}
        }
        match PromptLine::try_parse_from(words) {
            Ok(parsed) => match execute(client, parsed.command).await {
                Ok(_) => {}
                Err(error) => eprintln!("error: {error}"),
            },
            Err(error) => eprintln!("{}", error.render().to_string().trim_end()),
        }
    }
}

/// Splits a prompt line into words; double or single quotes group words.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => match chars.next() {
                Some(escaped) => current.push(escaped),
                None => return Err("line ends with a backslash".into()),
            },
            (Some(_), c) => current.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            (None, c) => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err("unclosed quote".into());
    }
    if in_word {
        words.push(current);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_words_honour_quotes() {
        assert_eq!(
            split_words(r#"PUT k "hello world" 'a b'"#).ok(),
            Some(vec![
                "PUT".into(),
                "k".into(),
                "hello world".into(),
                "a b".into()
            ])
        );
        assert_eq!(
            split_words(r#"PUT k """#).ok(),
            Some(vec!["PUT".into(), "k".into(), "".into()])
        );
        assert!(split_words("PUT k \"oops").is_err());
    }

    #[test]
    fn prompt_lines_parse_like_the_command_line() {
        let parsed = PromptLine::try_parse_from(["put", "k", "v", "w"]).expect("parse");
        assert!(
            matches!(parsed.command, Command::Put { ref value, .. } if value.join(" ") == "v w")
        );
        assert!(PromptLine::try_parse_from(["GET"]).is_err());
    }
}
