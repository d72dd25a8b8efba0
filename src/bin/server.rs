//! `DKVSServer`: one DKVS storage node. See `DKVSServer --help`.
#![allow(non_snake_case)]

/// mimalloc: the request path allocates many small buffers; glibc malloc
/// showed up as the top symbol in `perf` profiles of a loaded node.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::sync::Arc;

use dkvs::config::ServerConfig;
use dkvs::net::TcpDialer;
use dkvs::node::{Node, incoming, serve};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = match ServerConfig::from_args() {
        Ok(config) => config,
        // Prints the problem (or --help) and exits: 2 for usage errors.
        Err(error) => error.exit(),
    };
    if let Err(why) = config.validate() {
        eprintln!("DKVSServer: {why}");
        return ExitCode::from(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // A failed fsync stops the process (docs/STORAGE.md, "Failed fsyncs").
    dkvs::storage::set_fatal_handler(dkvs::storage::exit_on_fatal);
    let runtime = match dkvs::runtime(config.worker_threads) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("DKVSServer: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Once: logs and this message both go to stderr.
            eprintln!("DKVSServer: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ServerConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let data_dir = config.data_dir();
    let joining = !config.join_seeds().is_empty();
    let node = Node::open_joining(config, Arc::new(TcpDialer::default()))
        .await
        .map_err(|e| {
            let doing = if joining {
                "cannot join or open node"
            } else {
                "cannot open node"
            };
            anyhow::anyhow!("{doing} (data dir {}): {e}", data_dir.display())
        })?;
    serve(node.clone(), incoming(listener), shutdown_signal()).await?;
    // A removed instance stops with exit 0 (restart-on-failure leaves it
    // down), saying why.
    if let Some(notice) = node.removal_notice() {
        eprintln!("DKVSServer: {notice}");
    }
    Ok(())
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops the node");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
