//! `DKVSClient`: the DKVS command-line client. See `DKVSClient --help`.
//!
//! This file holds the command line (clap), runs one command or the prompt,
//! and maps errors to exit codes. The prompt is in [`prompt`], the `status`
//! table in [`status`], `bench` and its targets in [`bench`](mod@bench),
//! `check` (a recorded workload and its verdict) in [`check`], `cluster
//! wait` in [`cluster`].
//!
//! Exit codes: 0 success; 1 GET of a missing key, or a `check` whose history
//! broke a promise; 2 usage error or input the
//! cluster refused (INVALID_ARGUMENT); 3 cluster unavailable (quorum not
//! reached, no node answered), or a `cluster wait` whose layout change was
//! not over by its `--timeout-secs` (the contract's code for it); 4
//! timeout, or a PUT/DELETE whose outcome is
//! indeterminate (it may or may not have been applied, and may take effect
//! later); 5 any other error.
#![allow(non_snake_case)]

/// mimalloc: the request path allocates many small buffers; glibc malloc
/// showed up as the top symbol in `perf` profiles of a loaded node.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dkvs::Error;
use dkvs::client::{Client, ClientOptions};
use dkvs::quorum::Consistency;

mod bench;
mod check;
mod cluster;
mod prompt;
mod status;

use bench::BenchArgs;
use check::CheckArgs;
use cluster::ClusterCommand;

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
    #[arg(long, value_enum, default_value_t = Consistency::Quorum)]
    consistency: Consistency,

    /// Deadline of each call to a node, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,

    #[command(subcommand)]
    command: Option<Command>,
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
    /// Show the layout and every member (up, down, joining) with key counts, and data moving (like `nodetool status`).
    #[command(name = "status", alias = "STATUS")]
    Status,
    /// Show which nodes hold a key, in preference order.
    #[command(name = "replicas", alias = "REPLICAS")]
    Replicas { key: String },
    /// Closed-loop YCSB-style load: throughput and latency percentiles.
    #[command(name = "bench")]
    Bench(BenchArgs),
    /// Jepsen-style check of a running cluster: a recorded workload and its verdict.
    ///
    /// Concurrent workers write and read keys of their own while you kill,
    /// pause and restart nodes; every operation is recorded, every key is
    /// read at ALL at the end, and the history is judged (stale, lost,
    /// non-monotonic or invented reads). Exit 0 when it holds, 1 when it
    /// does not.
    #[command(name = "check")]
    Check(CheckArgs),
    /// Membership: `cluster wait` waits until a layout change (a join) is over.
    #[command(name = "cluster", subcommand)]
    Cluster(ClusterCommand),
    /// Serve a do-nothing dkvs.v1.KeyValue (for `bench --noop`).
    #[command(name = "noop-server", hide = true)]
    NoopServer {
        #[arg(long, default_value = "127.0.0.1:7199")]
        listen: std::net::SocketAddr,
    },
}

/// How a command ended.
enum Outcome {
    Done,
    NotFound,
    /// `check` found the history broke a promise.
    Violated,
    /// `cluster wait` gave up before the change was over.
    Unsettled,
}

impl Outcome {
    fn exit_code(self) -> ExitCode {
        match self {
            Outcome::Done => ExitCode::SUCCESS,
            Outcome::NotFound | Outcome::Violated => ExitCode::from(1),
            Outcome::Unsettled => ExitCode::from(3),
        }
    }
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
        consistency: cli.consistency,
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
            return match bench::run(None, &nodes, options.consistency, args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => report(&error),
            };
        }
        Some(Command::NoopServer { listen }) => {
            return match bench::noop_server(listen).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => report(&error),
            };
        }
        // It asks every member itself, and keeps asking while none answers.
        Some(Command::Cluster(command)) => {
            return cluster::run(command, &nodes, options.rpc_timeout)
                .await
                .exit_code();
        }
        _ => {}
    }
    let rpc_timeout = options.rpc_timeout;
    let client = match Client::connect(&nodes, options).await {
        Ok(client) => client,
        Err(error) => return report(&error),
    };
    let code = match cli.command {
        Some(command) => match execute(&client, command, rpc_timeout).await {
            Ok(outcome) => outcome.exit_code(),
            Err(error) => report(&error),
        },
        None => prompt::prompt(&client, rpc_timeout).await,
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

/// Runs one command; `rpc_timeout` is `--timeout-ms` (for the second
/// client `check` connects).
async fn execute(
    client: &Client,
    command: Command,
    rpc_timeout: Duration,
) -> Result<Outcome, Error> {
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
            let _ = write!(out, "{}", status::status_table(&status));
        }
        Command::Bench(args) => {
            drop(out);
            let consistency = client.consistency();
            bench::run(Some(client), &[], consistency, args).await?;
        }
        Command::NoopServer { listen } => {
            drop(out);
            bench::noop_server(listen).await?;
        }
        Command::Check(args) => {
            drop(out);
            return check::run(client, args, rpc_timeout).await;
        }
        Command::Cluster(command) => {
            // At the prompt: the members the client knows are the seeds.
            drop(out);
            let members: Vec<String> = client
                .ring()
                .members()
                .iter()
                .map(|m| m.address.clone())
                .collect();
            return Ok(cluster::run(command, &members, rpc_timeout).await);
        }
        Command::Replicas { key } => {
            for (rank, address) in client.replicas_of(&key).iter().enumerate() {
                let _ = writeln!(out, "{}. {address}", rank + 1);
            }
        }
    }
    Ok(Outcome::Done)
}
