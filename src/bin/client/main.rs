//! `DKVSClient`: the DKVS command-line client. See `DKVSClient --help`.
//!
//! This file holds the command line (clap), runs one command or the prompt,
//! and maps errors to exit codes. The prompt is in [`prompt`], the `status`
//! table in [`status`], `bench` and its targets in [`bench`](mod@bench),
//! `check` (a recorded workload and its verdict) in [`check`], `cluster
//! wait` in [`cluster`], `certs` (a CA and node certificates) in [`certs`].
//!
//! Exit codes ([`exit_code`], DESIGN.md's "Outcomes" table): 0 success;
//! 1 GET of a missing key, or a `check` whose history broke a promise; 2
//! usage error or input the cluster refused (INVALID_ARGUMENT); 3 not
//! applied: a write refused before anything reached a replica (too few
//! replicas up, no node reachable, a change in progress), a read
//! that could not reach R replicas, or a `cluster wait` whose layout change
//! was not over by its `--timeout-secs`, or a refused `cluster abort`; 4
//! outcome unknown (also a `cluster abort` that gave up): a PUT/DELETE
//! that failed after it was sent (fewer than W acknowledgements, superseded,
//! a replica's full disk), a deadline, or an indeterminate write (it may or
//! may not have been applied, and may take effect later), and a read that
//! timed out; 5 authentication and any other error.
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
use dkvs::error::Outcome as WriteOutcome;
use dkvs::quorum::Consistency;

// Without the `bench` feature `bench` only says it was left out.
#[cfg_attr(not(feature = "bench"), path = "no_bench.rs")]
mod bench;
mod certs;
mod check;
mod cluster;
mod progress;
mod prompt;
mod show;
mod status;

use bench::BenchArgs;
use certs::CertsArgs;
use check::CheckArgs;
use cluster::ClusterCommand;
use show::{ListArgs, Output, Printing, StatusArgs};

/// The addresses startServers.sh uses.
const DEFAULT_NODES: &str =
    "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003,127.0.0.1:7004,127.0.0.1:7005";

/// Exit codes, as `--help` shows them.
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  GET: the key does not exist; check: the history broke a promise
  2  usage error, or input the cluster refused (INVALID_ARGUMENT)
  3  not applied: refused before anything reached a replica (too few
     replicas up, no node reachable, a change in progress); a GET
     that could not reach enough replicas; cluster wait timed out;
     cluster abort refused
  4  outcome unknown: a PUT/DELETE that failed after it was sent (fewer
     than W acknowledgements, superseded, timed out): it may or may not
     have been applied and may still take effect; a GET that timed out;
     a cluster abort that gave up
  5  authentication, or any other error";

/// Talks to a DKVS cluster. With no command, opens an interactive prompt.
#[derive(Debug, Parser)]
#[command(name = "DKVSClient", version, about, after_help = EXIT_CODES_HELP)]
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

    /// Connect over TLS, trusting the nodes' certificates that chain to
    /// this CA certificate (PEM).
    #[arg(long, env = "DKVS_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,

    /// Send the token in this file (its first line) with every request.
    #[arg(long, env = "DKVS_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,

    /// Send this token with every request. It shows in `ps`: prefer
    /// --token-file or the DKVS_TOKEN variable.
    #[arg(long, env = "DKVS_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Send the token even without --tls-ca, in clear text (for nodes run
    /// with --insecure-plaintext-auth).
    #[arg(long)]
    insecure_plaintext_auth: bool,

    /// text (values as their bytes, tables) or json (for scripts: GET,
    /// status, replicas and list).
    #[arg(long, value_enum, global = true, default_value_t = Output::Text)]
    output: Output,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Store a value: PUT <key> <value> (several words are joined with
    /// spaces); PUT <key> - reads the value from stdin, PUT <key> --file F
    /// from a file (both byte for byte; --file right after the key: after
    /// a value word it is one more word).
    #[command(name = "PUT", visible_alias = "put")]
    Put {
        key: String,
        #[arg(
            required_unless_present = "file",
            num_args = 1..,
            allow_hyphen_values = true
        )]
        value: Vec<String>,
        /// Read the value from this file (binary-safe).
        #[arg(long, conflicts_with = "value")]
        file: Option<std::path::PathBuf>,
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
    ///
    /// A periodic worker of the node asked that failed 3 rounds in a row or
    /// more is named under the member table, with its last error.
    #[command(name = "status", alias = "STATUS")]
    Status(StatusArgs),
    /// List keys (every key, or those starting with --prefix), one per line.
    ///
    /// Keys come in ring order (by hash), not sorted. Each token range is
    /// read from N/2+1 of its replicas at QUORUM (see --consistency), so no
    /// key whose write was acknowledged at QUORUM before the listing reached
    /// it is missed; deleted keys are left out. The node asked pages through
    /// the ring; nothing is held whole anywhere. A listing is not a
    /// snapshot: keys written while it runs may or may not appear.
    #[command(name = "list", alias = "LIST", alias = "keys", alias = "KEYS")]
    List(ListArgs),
    /// Show which nodes hold a key, in preference order.
    #[command(name = "replicas", alias = "REPLICAS")]
    Replicas { key: String },
    /// Print a completion script for a shell (no cluster needed), e.g.
    /// `DKVSClient completions bash > /etc/bash_completion.d/DKVSClient`,
    /// or `source <(DKVSClient completions bash)` for this shell only.
    #[command(name = "completions")]
    Completions { shell: clap_complete::Shell },
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
    /// Membership: `cluster wait` waits until a layout change (a join) is
    /// over; `cluster abort` undoes a join in progress.
    #[command(name = "cluster", subcommand)]
    Cluster(ClusterCommand),
    /// Make a CA and node certificates for a secure cluster (no cluster needed).
    ///
    /// DKVSClient certs --dir DIR [--node HOST:PORT]... [--days N] [--force]
    ///
    /// Makes the CA in DIR (ca.pem, ca-key.pem) unless DIR holds one, then
    /// signs a certificate for each --node with it.
    #[command(name = "certs")]
    Certs(CertsArgs),
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
    /// A command that failed with this exit code (DESIGN's "Outcomes").
    Failed(u8),
}

impl Outcome {
    fn exit_code(self) -> ExitCode {
        match self {
            Outcome::Done => ExitCode::SUCCESS,
            Outcome::NotFound | Outcome::Violated => ExitCode::from(1),
            Outcome::Unsettled => ExitCode::from(3),
            Outcome::Failed(code) => ExitCode::from(code),
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
    // Talks to no cluster, so needs no CA or token (nor fails on theirs).
    if let Some(Command::Certs(args)) = &cli.command {
        return certs::run(args).exit_code();
    }
    if let Some(Command::Completions { shell }) = cli.command {
        print_completions(shell);
        return ExitCode::SUCCESS;
    }
    let printing = Printing {
        output: cli.output,
        newline_after_value: std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    let (bearer, tls) = match security_options(&cli) {
        Ok(security) => security,
        Err(why) => {
            eprintln!("DKVSClient: {why}");
            return ExitCode::from(2);
        }
    };
    let options = ClientOptions {
        consistency: cli.consistency,
        rpc_timeout: Duration::from_millis(cli.timeout_ms.max(1)),
        bearer,
        tls,
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
            return match bench::run(None, &nodes, &options, args).await {
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
            return cluster::run(command, &nodes, &options).await.exit_code();
        }
        _ => {}
    }
    let rpc_timeout = options.rpc_timeout;
    let client = match Client::connect(&nodes, options).await {
        Ok(client) => client,
        Err(error) => return report(&error),
    };
    let code = match cli.command {
        Some(command) => {
            let kind = Kind::of(&command);
            match execute(&client, command, rpc_timeout, printing).await {
                Ok(outcome) => outcome.exit_code(),
                Err(error) => report_as(&error, kind),
            }
        }
        None => prompt::prompt(&client, rpc_timeout).await,
    };
    client.close().await;
    code
}

/// The token and TLS settings the flags (or DKVS_TOKEN, DKVS_TOKEN_FILE,
/// DKVS_TLS_CA) give.
fn security_options(
    cli: &Cli,
) -> Result<
    (
        dkvs::net::BearerStamp,
        Option<dkvs::security::tls::ClientTls>,
    ),
    String,
> {
    let from_file = match &cli.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --token-file {}: {e}", path.display()))?;
            let token = text.lines().next().unwrap_or("").trim().to_string();
            if token.is_empty() {
                return Err(format!("--token-file {} is empty", path.display()));
            }
            Some(token)
        }
        None => None,
    };
    let on_command_line = std::env::args().any(|a| a == "--token" || a.starts_with("--token="));
    if on_command_line {
        eprintln!(
            "DKVSClient: warning: --token shows in `ps` to every user of this machine; prefer --token-file or DKVS_TOKEN"
        );
    }
    let token = from_file.or_else(|| cli.token.clone());
    let bearer = dkvs::net::BearerStamp::new(token.as_deref())?;
    let tls = match &cli.tls_ca {
        Some(ca) => Some(dkvs::security::tls::ClientTls::for_ca(ca)?),
        None => None,
    };
    if token.is_some() && tls.is_none() && !cli.insecure_plaintext_auth {
        return Err(
            "a token without --tls-ca (DKVS_TLS_CA) would travel in clear text: pass the \
             cluster's CA, or --insecure-plaintext-auth for nodes run that way"
                .into(),
        );
    }
    Ok((bearer, tls))
}

/// Whether a failed command had an outcome to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// PUT or DELETE: it may or may not have taken effect.
    Write,
    /// Anything else (GET, status, ...): it changes nothing.
    Read,
}

impl Kind {
    fn of(command: &Command) -> Kind {
        match command {
            Command::Put { .. } | Command::Delete { .. } => Kind::Write,
            _ => Kind::Read,
        }
    }
}

/// Prints an error of a command that changes nothing and picks its exit code.
fn report(error: &Error) -> ExitCode {
    report_as(error, Kind::Read)
}

/// Prints an error of a `kind` command and picks its exit code.
fn report_as(error: &Error, kind: Kind) -> ExitCode {
    // A refusal of credentials says so first, whichever way it came.
    let said = error.to_string();
    let label = match error.code() {
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::PermissionDenied => "permission denied",
        _ => "",
    };
    if label.is_empty() || said.to_lowercase().starts_with(label) {
        eprintln!("error: {said}");
    } else {
        eprintln!("error: {label}: {said}");
    }
    ExitCode::from(exit_code(error, kind))
}

/// The exit code of a failed command: DESIGN.md's "Outcomes" table, by
/// status code and, for a write, its outcome ([`Error::outcome`]; the
/// coordinator's `dkvs-outcome` as the smart client read it). A read
/// changes nothing, so it is judged as a write that was not applied.
fn exit_code(error: &Error, kind: Kind) -> u8 {
    use tonic::Code;
    let outcome = match kind {
        Kind::Write => error.outcome(),
        Kind::Read => WriteOutcome::NotApplied,
    };
    match (error.code(), outcome) {
        (Code::InvalidArgument, _) => 2,
        (Code::DeadlineExceeded, _) => 4,
        (
            Code::Unavailable | Code::ResourceExhausted | Code::FailedPrecondition | Code::Aborted,
            WriteOutcome::NotApplied,
        ) => 3,
        (
            Code::Unavailable | Code::ResourceExhausted | Code::Aborted | Code::Unknown,
            WriteOutcome::Unknown,
        ) => 4,
        _ => 5,
    }
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

/// Largest value read from stdin or a file: the largest any node takes
/// (`--max-value-bytes` at most 256 MiB); the node checks its own limit.
const MAX_VALUE_READ: u64 = 256 << 20;

/// The value of a PUT: its words joined with spaces, stdin for `-`, or the
/// file's bytes.
fn value_to_put(words: Vec<String>, file: Option<std::path::PathBuf>) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let (mut source, named): (Box<dyn Read>, String) = match (&file, words.as_slice()) {
        (Some(path), _) => {
            let opened = std::fs::File::open(path)
                .map_err(|e| Error::InvalidArgument(format!("--file {}: {e}", path.display())))?;
            (Box::new(opened), format!("--file {}", path.display()))
        }
        (None, [dash]) if dash == "-" => (Box::new(std::io::stdin().lock()), "stdin".into()),
        (None, _) => return Ok(words.join(" ").into_bytes()),
    };
    let mut value = Vec::new();
    source
        .by_ref()
        .take(MAX_VALUE_READ + 1)
        .read_to_end(&mut value)
        .map_err(|e| Error::InvalidArgument(format!("reading the value from {named}: {e}")))?;
    if value.len() as u64 > MAX_VALUE_READ {
        return Err(Error::InvalidArgument(format!(
            "the value from {named} is over {MAX_VALUE_READ} bytes, more than any node takes"
        )));
    }
    Ok(value)
}

/// A completion script for `shell` on stdout.
fn print_completions(shell: clap_complete::Shell) {
    use clap::CommandFactory;
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "DKVSClient",
        &mut std::io::stdout(),
    );
}

/// Runs one command; `rpc_timeout` is `--timeout-ms` (for the second
/// client `check` connects).
async fn execute(
    client: &Client,
    command: Command,
    rpc_timeout: Duration,
    printing: Printing,
) -> Result<Outcome, Error> {
    let mut out = std::io::stdout().lock();
    match command {
        Command::Put { key, value, file } => {
            let value = value_to_put(value, file)?;
            let ack = client.put(&key, value).await?;
            let _ = writeln!(out, "OK (version {}, {} acks)", ack.version, ack.acks);
            warn_if_only_hinted(ack.acks);
        }
        Command::Get { key } => {
            drop(out);
            if !show::get(client, &key, printing).await? {
                return Ok(Outcome::NotFound);
            }
        }
        Command::Delete { key } => {
            let ack = client.delete(&key).await?;
            let _ = writeln!(
                out,
                "OK (deleted, version {}, {} acks)",
                ack.version, ack.acks
            );
            warn_if_only_hinted(ack.acks);
        }
        Command::Status(args) => {
            drop(out);
            show::status(client, args, printing).await?;
        }
        Command::Bench(args) => {
            drop(out);
            bench::run(Some(client), &[], client.options(), args).await?;
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
            return Ok(cluster::run(command, &members, client.options()).await);
        }
        Command::Certs(args) => {
            drop(out);
            return Ok(certs::run(&args));
        }
        Command::List(args) => {
            drop(out);
            show::list(client, args, printing).await?;
        }
        Command::Replicas { key } => show::replicas(client, &key, printing),
        Command::Completions { shell } => print_completions(shell),
    }
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dkvs::error::RollCall;
    use tonic::Code;

    fn quorum(operation: &'static str, sent: bool) -> Error {
        Error::QuorumNotReached {
            operation,
            consistency: "QUORUM",
            acks: 0,
            needed: 2,
            replicas: 3,
            roll_call: Box::new(RollCall::default()),
            failures: vec![],
            sent,
        }
    }

    fn remote(code: Code, outcome: Option<WriteOutcome>) -> Error {
        Error::Remote {
            code,
            message: "m".into(),
            outcome,
        }
    }

    // One test per row of DESIGN.md's table (0 and 1 are not errors:
    // `Outcome::exit_code`).

    #[test]
    fn bad_input_exits_2() {
        let error = Error::InvalidArgument("key is empty".into());
        assert_eq!(exit_code(&error, Kind::Write), 2);
        assert_eq!(exit_code(&error, Kind::Read), 2);
    }

    #[test]
    fn a_write_refused_before_sending_exits_3() {
        // Too few replicas believed up, at the coordinator.
        let unsent = Error::Unavailable("PUT failed ...: not applied".into());
        assert_eq!(exit_code(&unsent, Kind::Write), 3);
        // No node could be reached to coordinate it.
        let unreached = Error::Unavailable("no node could coordinate it".into());
        assert_eq!(exit_code(&unreached, Kind::Write), 3);
        assert_eq!(exit_code(&quorum("PUT", false), Kind::Write), 3);
        // A quota the coordinator checks.
        let quota = remote(Code::ResourceExhausted, Some(WriteOutcome::NotApplied));
        assert_eq!(exit_code(&quota, Kind::Write), 3);
    }

    #[test]
    fn a_change_in_progress_exits_3() {
        let change = Error::FailedPrecondition("a join is in progress".into());
        assert_eq!(exit_code(&change, Kind::Write), 3);
        let contention = remote(Code::Aborted, Some(WriteOutcome::NotApplied));
        assert_eq!(exit_code(&contention, Kind::Write), 3);
    }

    #[test]
    fn a_write_that_failed_after_sending_exits_4() {
        // Quorum missed after sending, superseded: the client's Indeterminate.
        let indeterminate = Error::Indeterminate("may or may not have been applied".into());
        assert_eq!(exit_code(&indeterminate, Kind::Write), 4);
        assert_eq!(exit_code(&quorum("PUT", true), Kind::Write), 4);
        let deadline = Error::DeadlineExceeded("PUT did not finish within 3000 ms".into());
        assert_eq!(exit_code(&deadline, Kind::Write), 4);
        // A replica's full disk or quota.
        let full = remote(Code::ResourceExhausted, Some(WriteOutcome::Unknown));
        assert_eq!(exit_code(&full, Kind::Write), 4);
    }

    #[test]
    fn a_read_that_could_not_reach_r_exits_3_and_one_that_timed_out_4() {
        assert_eq!(exit_code(&quorum("GET", true), Kind::Read), 3);
        let nobody = Error::Unavailable("no DKVS node answered".into());
        assert_eq!(exit_code(&nobody, Kind::Read), 3);
        let late = Error::DeadlineExceeded("GET did not finish".into());
        assert_eq!(exit_code(&late, Kind::Read), 4);
    }

    #[test]
    fn authentication_exits_5() {
        for code in [Code::Unauthenticated, Code::PermissionDenied] {
            let refused = remote(code, Some(WriteOutcome::NotApplied));
            assert_eq!(exit_code(&refused, Kind::Write), 5, "{code:?}");
            assert_eq!(exit_code(&refused, Kind::Read), 5, "{code:?}");
        }
    }

    #[test]
    fn anything_else_exits_5() {
        assert_eq!(exit_code(&Error::Internal("bug".into()), Kind::Write), 5);
        assert_eq!(exit_code(&Error::Storage("io".into()), Kind::Read), 5);
        assert_eq!(
            exit_code(&remote(Code::Unimplemented, None), Kind::Write),
            5
        );
    }
}
