//! `DKVSClient bench`: its arguments, the preload, and the measured run
//! against one of the targets.
//!
//! [`workload`] draws the operations and runs the closed loop; [`targets`]
//! holds what the load goes to: the smart client, each node in turn
//! (`--via-node`), etcd (`--etcd`) or a do-nothing server (`--noop`, served
//! by `DKVSClient noop-server`).

use std::time::Duration;

use dkvs::Error;
use dkvs::client::Client;

mod targets;
mod workload;

pub use targets::noop_server;
use targets::{EtcdTarget, OwnedSmartTarget, ViaNodeTarget};
use workload::{Distribution, Limit, OpGenerator, Report, Target, Workload, Zipfian, key_name};

// The flags of `DKVSClient bench` (a plain comment: a doc comment here would
// replace the subcommand's description in --help).
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
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
    pub threads: usize,
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
    pub etcd: bool,
    /// Drive a do-nothing KeyValue server (`DKVSClient noop-server`) at
    /// --nodes: the machine's one-hop gRPC ceiling.
    #[arg(long, conflicts_with = "via_node")]
    pub noop: bool,
}

/// Runs `DKVSClient bench`. `client` is `None` for --etcd and --noop, which
/// talk to `nodes` directly.
pub async fn run(
    client: Option<&Client>,
    nodes: &[String],
    options: &dkvs::client::ClientOptions,
    args: BenchArgs,
) -> Result<(), Error> {
    let consistency = options.consistency;
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
        _ if args.etcd => run_bench(EtcdTarget::new(nodes)?, &args).await?,
        _ if args.noop => run_bench(ViaNodeTarget::new(nodes, options)?, &args).await?,
        Some(client) if args.via_node => {
            let addresses: Vec<String> = client
                .ring()
                .members()
                .iter()
                .map(|m| m.address.clone())
                .collect();
            run_bench(ViaNodeTarget::new(&addresses, options)?, &args).await?
        }
        Some(client) => {
            let options = options.clone();
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
        for error in &report.sample_errors {
            eprintln!("  error: {error}");
        }
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
async fn run_bench<T: Target>(target: T, args: &BenchArgs) -> Result<Report, Error> {
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
    let report = workload::run(target, generators, value, limit, move |n| {
        shown.set_position(n)
    })
    .await;
    bar.finish_and_clear();
    Ok(report)
}
