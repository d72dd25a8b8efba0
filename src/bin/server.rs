//! `DKVSServer`: one DKVS storage node. See `DKVSServer --help`.
#![allow(non_snake_case)]

/// mimalloc: the request path allocates many small buffers; glibc malloc
/// showed up as the top symbol in `perf` profiles of a loaded node.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::sync::Arc;

use dkvs::config::{LogFormat, ServerConfig};
use dkvs::logs::JsonLines;
use dkvs::net::{Dialer, TcpDialer, TlsDialer};
use dkvs::node::{Guard, HttpDoor, Node, RespDoor, incoming, serve_guarded, tls_incoming};
use dkvs::security::auth::AuthFile;
use dkvs::security::tls::{ClientTls, NodeTls};
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
    // Files and dirs the node creates are its owner's only (0600, 0700).
    dkvs::storage::data_dir::restrict_new_files();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs
            .with_ansi(false)
            .event_format(JsonLines {
                node: config.advertised_address().into(),
            })
            .init(),
    }
    let guard = match load_guard(&config) {
        Ok(guard) => guard,
        Err(why) => {
            eprintln!("DKVSServer: {why}");
            return ExitCode::from(2);
        }
    };
    // A failed fsync stops the process (docs/STORAGE.md, "Failed fsyncs").
    dkvs::storage::set_fatal_handler(dkvs::storage::exit_on_fatal);
    let runtime = match dkvs::runtime(config.worker_threads) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("DKVSServer: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, guard)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<BadSetup>() => {
            eprintln!("DKVSServer: {error}");
            ExitCode::from(2)
        }
        Err(error) => {
            // Once: logs and this message both go to stderr.
            eprintln!("DKVSServer: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A setup the data dir refuses (exit 2, as a usage error).
#[derive(Debug)]
struct BadSetup(String);

impl std::fmt::Display for BadSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadSetup {}

/// The certificates and tokens the flags name, loaded and checked.
fn load_guard(config: &ServerConfig) -> Result<Guard, String> {
    let tls = match config.tls_files() {
        Some(files) => {
            warn_if_others_can_read(&files.key, "--tls-key");
            let address = config.advertised_address();
            Some(Arc::new(NodeTls::load_for_node(files, &address)?))
        }
        None => None,
    };
    let auth = match &config.auth_file {
        Some(path) => Some(Arc::new(AuthFile::load(path)?)),
        None => None,
    };
    if let Some(auth) = &auth {
        warn_if_others_can_read(auth.path(), "--auth-file");
    }
    match (&tls, &auth) {
        (None, Some(_)) => tracing::warn!(
            "--insecure-plaintext-auth: tokens travel in clear text, and the node-to-node \
             services take anyone's calls, so tokens do not protect the data: anyone who \
             reaches the port can read and write every key through them"
        ),
        (Some(_), None) => tracing::warn!(
            "TLS without --auth-file: the node-to-node services are closed to all but the \
             cluster's nodes, but any client that trusts the CA may read, write and change \
             membership"
        ),
        _ => {}
    }
    Ok(Guard { tls, auth })
}

/// Warns when users other than the owner may read a secret file.
fn warn_if_others_can_read(path: &std::path::Path, flag: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "{flag} is readable by other users of this machine: chmod 600 it"
            );
        }
    }
}

async fn run(config: ServerConfig, guard: Guard) -> anyhow::Result<()> {
    // From now on SIGHUP rereads certificates and tokens instead of ending
    // the process (tokio keeps its handler once one is registered), also
    // while the node is still opening or joining.
    #[cfg(unix)]
    if guard.is_on() {
        let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    // The HTTP door opens first: a liveness probe passes while the node
    // opens a large data dir or joins (readiness says "opening").
    let http = match config.http_listen {
        Some(address) => Some(HttpDoor::open(address, &guard).await?),
        None => None,
    };
    // So does the RESP door: a client is told LOADING, not refused.
    let resp = match config.resp_listen {
        Some(address) => Some(RespDoor::open(address, &guard, config.resp_consistency).await?),
        None => None,
    };
    let data_dir = config.data_dir();
    let joining = !config.join_seeds().is_empty();
    let dialer: Arc<dyn Dialer> = match &guard.tls {
        Some(tls) => Arc::new(TlsDialer::new(ClientTls::Node(tls.clone()))),
        None => Arc::new(TcpDialer::default()),
    };
    let node = Node::open_joining(config, dialer).await.map_err(|e| {
        let doing = if joining {
            "cannot join or open node"
        } else {
            "cannot open node"
        };
        let said = format!("{doing} (data dir {}): {e}", data_dir.display());
        // Flags that do not fit the data dir (its engine, cluster, N or
        // vnodes, a dir that is not DKVS's): a usage error, like the
        // checks before it.
        match e {
            dkvs::Error::InvalidArgument(_) => anyhow::Error::new(BadSetup(said)),
            _ => anyhow::anyhow!(said),
        }
    })?;
    if let Some(http) = &http {
        http.attach(&node);
    }
    if let Some(resp) = &resp {
        resp.attach(&node);
    }
    match guard.tls.clone() {
        Some(tls) => {
            let connections = tls_incoming(listener, tls);
            serve_guarded(node.clone(), connections, guard, shutdown_signal()).await?
        }
        None => serve_guarded(node.clone(), incoming(listener), guard, shutdown_signal()).await?,
    }
    if let Some(http) = http {
        http.close().await;
    }
    if let Some(resp) = resp {
        resp.close().await;
    }
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
