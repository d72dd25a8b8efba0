//! A real DKVS cluster for integration tests: `DKVSServer` processes on
//! 127.0.0.1 with ports chosen by the OS, data in a temp dir, killed with
//! SIGKILL and restarted from the same data dir. Readiness is polled through
//! `grpc.health.v1.Health` with a deadline; every process is killed on drop.

#![allow(dead_code)]

pub mod http;
pub mod script;

use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dkvs::client::{Client, ClientOptions};
use dkvs::pb;
use dkvs::workload::{History, Recorder, Workload};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// How long a node may take to report SERVING.
const READY_DEADLINE: Duration = Duration::from_secs(30);

pub struct TestNode {
    /// `127.0.0.1:port`.
    pub address: String,
    /// The node's data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// Where the node's stderr goes.
    pub log: PathBuf,
    /// Full argument list, reused on restart.
    args: Vec<String>,
    /// The running process, if any.
    child: Option<Child>,
}

impl TestNode {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open node log");
        let child = Command::new(env!("CARGO_BIN_EXE_DKVSServer"))
            .args(&self.args)
            .env("RUST_LOG", "info,dkvs=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn DKVSServer");
        self.child = Some(child);
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

pub struct TestCluster {
    /// Holds every node's data and logs; removed on drop.
    dir: tempfile::TempDir,
    pub nodes: Vec<TestNode>,
    /// How the harness reaches nodes that serve TLS (none: plaintext).
    access: Option<TlsAccess>,
}

/// How the harness itself reaches a cluster that serves TLS with
/// `--auth-file`: the CA it trusts, and a token for `Cluster.Status`.
#[derive(Clone, Debug)]
pub struct TlsAccess {
    /// A PEM file of the CA certificates the nodes' certificates chain to.
    pub ca: PathBuf,
    /// A token of at least the `read` role.
    pub token: String,
}

/// An address on 127.0.0.1 whose port the OS picked as free just now.
pub fn free_address() -> String {
    format!("127.0.0.1:{}", free_ports(1)[0])
}

/// `count` addresses on 127.0.0.1 with ports the OS picked as free.
fn free_addresses(count: usize) -> Vec<String> {
    free_ports(count)
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect()
}

/// Ports the OS picked as free: bind port 0, note the port, release it.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind port 0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// A node's command line: its address, how it finds the cluster
/// (`--peers` or `--join`), its data dir, then DKVS_TEST_SERVER_FLAGS (the
/// suite with other settings, e.g. "--worker-threads 1" or
/// "--storage-engine fjall"), then `extra`.
fn node_args(
    address: &str,
    data_dir: &std::path::Path,
    (how, whom): (&str, &str),
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--listen".into(),
        address.into(),
        how.into(),
        whom.into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
    ];
    if let Ok(flags) = std::env::var("DKVS_TEST_SERVER_FLAGS") {
        args.extend(flags.split_whitespace().map(String::from));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

impl TestCluster {
    /// Starts `count` nodes (N = 3 replicas) and waits until all serve.
    pub async fn start(count: usize) -> Self {
        Self::start_with(count, &[]).await
    }

    /// Starts `count` nodes with extra flags for each.
    pub async fn start_with(count: usize, extra: &[&str]) -> Self {
        // A port released by `free_ports` can, rarely, be taken by another
        // process before the node binds it: then try again with new ports.
        let mut last_error = String::new();
        for _attempt in 0..3 {
            let mut cluster = Self::spawn_all(count, extra);
            match cluster.wait_all_ready().await {
                Ok(()) => return cluster,
                Err(error) => last_error = error,
            }
        }
        panic!("cluster did not start: {last_error}");
    }

    fn spawn_all(count: usize, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let addresses = free_addresses(count);
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::spawn_each(dir, &addresses, vec![extra; count], None)
    }

    /// Spawns one node per address, each with its own extra flags, without
    /// waiting for them.
    fn spawn_each(
        dir: tempfile::TempDir,
        addresses: &[String],
        extra: Vec<Vec<String>>,
        access: Option<TlsAccess>,
    ) -> Self {
        let peers = addresses.join(",");
        // One token per cluster, as startServers.sh gives each fresh one.
        let token = format!("test-{}", addresses.join("-"));
        let nodes = addresses
            .iter()
            .zip(extra)
            .enumerate()
            .map(|(i, (address, extra))| {
                let data_dir = dir.path().join(format!("node{i}"));
                let mut with_token = vec!["--cluster-token", &token];
                with_token.extend(extra.iter().map(String::as_str));
                let args = node_args(address, &data_dir, ("--peers", &peers), &with_token);
                let mut node = TestNode {
                    address: address.clone(),
                    data_dir,
                    log: dir.path().join(format!("node{i}.log")),
                    args,
                    child: None,
                };
                node.spawn();
                node
            })
            .collect();
        Self { dir, nodes, access }
    }

    /// Starts `count` nodes that also serve HTTP (`--http-listen`, each on
    /// a port of its own: see [`TestCluster::http_address`]), with `extra`
    /// flags, and waits until all serve.
    pub async fn start_with_http(count: usize, extra: &[&str]) -> Self {
        Self::start_with_door(count, "--http-listen", extra).await
    }

    /// Starts `count` nodes that also speak RESP (`--resp-listen`, each on
    /// a port of its own: see [`TestCluster::resp_address`]), with `extra`
    /// flags, and waits until all serve.
    pub async fn start_with_resp(count: usize, extra: &[&str]) -> Self {
        Self::start_with_door(count, "--resp-listen", extra).await
    }

    /// Starts `count` nodes each with `flag` (a listener) on a port of its
    /// own, and `extra`; waits until all serve.
    async fn start_with_door(count: usize, flag: &str, extra: &[&str]) -> Self {
        let mut last_error = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let addresses = free_addresses(count + count);
            let (grpc, doors) = addresses.split_at(count);
            let flags = doors
                .iter()
                .map(|door| {
                    let mut flags = vec![flag.to_string(), door.clone()];
                    flags.extend(extra.iter().map(|s| s.to_string()));
                    flags
                })
                .collect();
            let mut cluster = Self::spawn_each(dir, grpc, flags, None);
            match cluster.wait_all_ready().await {
                Ok(()) => return cluster,
                Err(error) => last_error = error,
            }
        }
        panic!("cluster did not start: {last_error}");
    }

    /// The `--resp-listen` address of node `i`, if it has one.
    pub fn resp_address(&self, i: usize) -> Option<String> {
        self.door_address(i, "--resp-listen")
    }

    /// The `--http-listen` address of node `i`, if it has one.
    pub fn http_address(&self, i: usize) -> Option<String> {
        self.door_address(i, "--http-listen")
    }

    /// The address node `i` was given with `flag`, if any.
    fn door_address(&self, i: usize, flag: &str) -> Option<String> {
        let args = &self.nodes[i].args;
        args.iter()
            .position(|a| a == flag)
            .and_then(|at| args.get(at + 1).cloned())
    }

    /// Starts `count` nodes that serve TLS (N = 3 replicas) and waits until
    /// all serve, polled over TLS with `access`. The addresses are picked
    /// first: `flags_for(dir, addresses)` (`dir` holds the nodes' data and
    /// logs) makes what the nodes need — certificates naming those exact
    /// addresses, say — and answers each node's extra flags.
    pub async fn start_secured(
        count: usize,
        access: TlsAccess,
        flags_for: impl Fn(&std::path::Path, &[String]) -> Vec<Vec<String>>,
    ) -> Self {
        let mut last_error = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let addresses = free_addresses(count);
            let extra = flags_for(dir.path(), &addresses);
            assert_eq!(extra.len(), count, "flags for every node");
            let mut cluster = Self::spawn_each(dir, &addresses, extra, Some(access.clone()));
            match cluster.wait_all_ready().await {
                Ok(()) => return cluster,
                Err(error) => last_error = error,
            }
        }
        panic!("secured cluster did not start: {last_error}");
    }

    async fn wait_all_ready(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            self.wait_ready(i).await?;
        }
        for i in 0..self.nodes.len() {
            self.wait_named(i).await?;
        }
        Ok(())
    }

    /// Polls node `i`'s layout until it names every member's instance
    /// (the `instances named` change that follows the first layout), so
    /// that tests start from one known version.
    pub async fn wait_named(&self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + READY_DEADLINE;
        let address = &self.nodes[i].address;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            let asked = match &self.access {
                None => {
                    self.membership(i)
                        .await
                        .get_layout(pb::GetLayoutRequest {})
                        .await
                }
                Some(access) => secured_layout(access, address).await,
            };
            match asked {
                Ok(layout) => {
                    let layout = layout.into_inner();
                    if layout.members.iter().all(|m| m.instance_id != 0) {
                        return Ok(());
                    }
                    last = format!(
                        "layout v{} names no instance for some members",
                        layout.version
                    );
                }
                Err(status) => last = status.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "node {address}: instances not named after {READY_DEADLINE:?} ({last}):\n{}",
            self.nodes[i].log_tail()
        ))
    }

    /// Polls node `i`'s health service until SERVING, or fails when the
    /// process exits or the deadline passes.
    pub async fn wait_ready(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + READY_DEADLINE;
        let address = self.nodes[i].address.clone();
        loop {
            if let Some(child) = self.nodes[i].child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.nodes[i].child = None;
                return Err(format!(
                    "node {address} exited with {status}:\n{}",
                    self.nodes[i].log_tail()
                ));
            }
            let serving = match &self.access {
                None => health_serving(&address).await,
                Some(access) => health_serving_tls(&access.ca, &address).await,
            };
            if serving {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "node {address} not SERVING after {READY_DEADLINE:?}:\n{}",
                    self.nodes[i].log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.address.clone()).collect()
    }

    pub fn index_of(&self, address: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.address == address)
            .expect("address is a member")
    }

    /// SIGKILLs node `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            // Child::kill sends SIGKILL on Unix.
            child.kill().expect("SIGKILL node");
            child.wait().expect("reap node");
        }
    }

    /// `Cluster.Status` as node `observer` sees it.
    pub async fn status(&self, observer: usize) -> pb::StatusResponse {
        self.cluster(observer)
            .await
            .status(pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner()
    }

    /// The layout node `observer` serves.
    pub async fn layout(&self, observer: usize) -> pb::Layout {
        self.status(observer).await.layout.expect("a layout")
    }

    /// A statistic summed over every running node that answers its own
    /// `Replica.Stats` within half a second (current counts: `Cluster.Status`
    /// carries counts as of each member's last heartbeat).
    pub async fn sum_stats(&self, stat: impl Fn(&pb::NodeStats) -> u64) -> u64 {
        let mut sum = 0;
        for i in 0..self.nodes.len() {
            if !self.nodes[i].is_running() {
                continue;
            }
            let mut replica = self.replica(i).await;
            let asked = tokio::time::timeout(
                Duration::from_millis(500),
                replica.stats(pb::StatsRequest {}),
            );
            if let Ok(Ok(stats)) = asked.await {
                sum += stat(&stats.into_inner());
            }
        }
        sum
    }

    /// Each node's own live-key count, asked of the node itself.
    pub async fn live_keys_per_node(&self) -> Vec<u64> {
        let mut keys = Vec::new();
        for i in 0..self.nodes.len() {
            let stats = self.replica(i).await.stats(pb::StatsRequest {}).await;
            keys.push(stats.expect("stats").into_inner().live_keys);
        }
        keys
    }

    /// Sends a signal (e.g. "-STOP", "-CONT") to node `i`.
    pub fn signal(&self, i: usize, signal: &str) {
        let pid = self.nodes[i].pid().expect("node is running");
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Freezes node `i` (SIGSTOP): its sockets stay open but it answers
    /// nothing. Returns once every thread has stopped (a thread busy in user
    /// space stops only at its next interrupt: it could still serve a
    /// request sent right after `kill` returned).
    pub fn pause(&self, i: usize) {
        self.signal(i, "-STOP");
        let pid = self.nodes[i].pid().expect("node is running");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|dir| dir.flatten().map(|t| t.path()).collect::<Vec<_>>())
                .unwrap_or_default();
            let stopped = |task: &std::path::PathBuf| {
                std::fs::read_to_string(task.join("stat")).is_ok_and(|stat| {
                    stat.rsplit_once(") ")
                        .and_then(|(_, rest)| rest.chars().next())
                        .is_some_and(|state| matches!(state, 'T' | 't'))
                })
            };
            if !tasks.is_empty() && tasks.iter().all(stopped) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("node {i} (pid {pid}) did not stop within 5 s of SIGSTOP");
    }

    /// Unfreezes node `i` (SIGCONT).
    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    /// Freezes node `i` (SIGSTOP) until the returned guard is dropped, which
    /// sends SIGCONT — also when the test fails while the node is frozen.
    pub fn pause_until_dropped(&self, i: usize) -> Frozen {
        let pid = self.nodes[i].pid().expect("node is running");
        self.pause(i);
        Frozen { pid }
    }

    /// Polls node `observer`'s Cluster.Status until `member` is in `state`.
    pub async fn wait_member_state(
        &self,
        observer: usize,
        member: usize,
        state: pb::MemberState,
        within: Duration,
    ) {
        let address = &self.nodes[member].address;
        eventually(within, async || {
            let status = self.status(observer).await;
            let seen = status
                .members
                .iter()
                .find(|m| m.address == *address)
                .map(|m| m.state);
            if seen == Some(state as i32) {
                Ok(())
            } else {
                Err(format!("{address} not {state:?}: {seen:?}"))
            }
        })
        .await
    }

    /// Sends SIGTERM to node `i` and waits (bounded) for it to exit.
    pub fn terminate(&mut self, i: usize) -> std::process::ExitStatus {
        let mut child = self.nodes[i].child.take().expect("node is running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().expect("wait node") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("node did not exit within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Adds flags to node `i`'s command line (later flags win), for its
    /// next start.
    pub fn add_flags(&mut self, i: usize, flags: &[&str]) {
        self.nodes[i]
            .args
            .extend(flags.iter().map(|s| s.to_string()));
    }

    /// Removes `flag` and its value from node `i`'s command line, for its
    /// next start.
    pub fn drop_flag(&mut self, i: usize, flag: &str) {
        let args = &mut self.nodes[i].args;
        while let Some(at) = args.iter().position(|a| a == flag) {
            args.drain(at..(at + 2).min(args.len()));
        }
    }

    /// Starts stopped node `i` without waiting for it.
    pub fn spawn_only(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} is still running");
        self.nodes[i].spawn();
    }

    /// Starts the stopped nodes `which` at once (first members wait for
    /// each other), then waits until each is ready.
    pub async fn restart_all(&mut self, which: &[usize]) {
        for &i in which {
            assert!(self.nodes[i].child.is_none(), "node {i} is still running");
            self.nodes[i].spawn();
        }
        for &i in which {
            if let Err(error) = self.wait_ready(i).await {
                panic!("restart failed: {error}");
            }
        }
    }

    /// Restarts node `i` with the same flags and data dir; waits until ready.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} is still running");
        self.nodes[i].spawn();
        if let Err(error) = self.wait_ready(i).await {
            panic!("restart failed: {error}");
        }
    }

    /// Starts node `i` again with the same flags and data dir, without
    /// waiting for it to serve (it may be meant to stop by itself).
    pub fn start_only(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} is still running");
        self.nodes[i].spawn();
    }

    /// Waits (bounded by `within`) for node `i` to exit by itself and
    /// answers how it exited; panics with its log when it does not.
    pub async fn wait_exit(&mut self, i: usize, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            let child = self.nodes[i].child.as_mut().expect("node is running");
            if let Some(status) = child.try_wait().expect("wait node") {
                self.nodes[i].child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "node {} did not exit within {within:?}:\n{}",
                    self.nodes[i].address,
                    self.nodes[i].log_tail()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Runs `DKVSClient --nodes <running nodes> args...` (off the async
    /// runtime: it blocks).
    pub async fn run_client(&self, args: &[&str]) -> std::process::Output {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.address.clone())
            .collect();
        let mut command = Command::new(env!("CARGO_BIN_EXE_DKVSClient"));
        command.arg("--nodes").arg(nodes.join(",")).args(args);
        tokio::task::spawn_blocking(move || command.output().expect("run DKVSClient"))
            .await
            .expect("the client task")
    }

    /// Deletes node `i`'s data dir (the node must be stopped): it comes
    /// back as a new instance.
    pub fn wipe(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} is still running");
        if self.nodes[i].data_dir.exists() {
            std::fs::remove_dir_all(&self.nodes[i].data_dir).expect("delete the data dir");
        }
    }

    /// Starts one more node that joins the cluster through node `seed`
    /// (`--join`), with `extra` flags; waits until it serves. Answers its
    /// index.
    pub async fn join(&mut self, seed: usize, extra: &[&str]) -> usize {
        self.join_at(seed, free_address(), extra).await
    }

    /// Like [`TestCluster::join`], at `address` (e.g. one a certificate
    /// names: see [`free_address`]).
    pub async fn join_at(&mut self, seed: usize, address: String, extra: &[&str]) -> usize {
        let i = self.spawn_joiner(seed, address, extra);
        if let Err(error) = self.wait_ready(i).await {
            panic!("joining node did not start: {error}");
        }
        i
    }

    /// Starts one more node at `address` that joins through node `seed`
    /// (`--join`), with `extra` flags, without waiting for it (it may be
    /// meant to fail). Answers its index.
    pub fn spawn_joiner(&mut self, seed: usize, address: String, extra: &[&str]) -> usize {
        let i = self.nodes.len();
        let data_dir = self.dir.path().join(format!("node{i}"));
        let args = node_args(
            &address,
            &data_dir,
            ("--join", &self.nodes[seed].address),
            extra,
        );
        let mut node = TestNode {
            address,
            data_dir,
            log: self.dir.path().join(format!("node{i}.log")),
            args,
            child: None,
        };
        node.spawn();
        self.nodes.push(node);
        i
    }

    /// Node `i`'s whole log so far.
    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// How node `i` exited, if it has (it is then no longer running).
    pub fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let child = self.nodes[i].child.as_mut()?;
        let status = child.try_wait().expect("wait node")?;
        self.nodes[i].child = None;
        Some(status)
    }

    /// The last lines of node `i`'s log.
    pub fn log_tail_of(&self, i: usize) -> String {
        self.nodes[i].log_tail()
    }

    /// A smart client that knows every node.
    pub async fn client(&self) -> Client {
        self.client_with(ClientOptions::default()).await
    }

    pub async fn client_with(&self, options: ClientOptions) -> Client {
        Client::connect(&self.addresses(), options)
            .await
            .expect("client connects")
    }

    /// A KeyValue client for node `i` (the node coordinates requests).
    pub async fn kv(&self, i: usize) -> pb::key_value_client::KeyValueClient<Channel> {
        pb::key_value_client::KeyValueClient::new(channel(&self.nodes[i].address).await)
            .max_encoding_message_size(8 << 20)
            .max_decoding_message_size(8 << 20)
    }

    /// The Replica client (for nodes only: the data path) for node `i`.
    pub async fn replica(&self, i: usize) -> pb::replica_client::ReplicaClient<NodeChannel> {
        pb::replica_client::ReplicaClient::new(self.node_channel(i).await)
    }

    /// A channel to node `i` whose calls carry its cluster id, as a
    /// member's do (the node-only services refuse calls without it). A
    /// call that already names an id keeps it.
    pub async fn node_channel(&self, i: usize) -> NodeChannel {
        let address = &self.nodes[i].address;
        let status = pb::cluster_client::ClusterClient::new(channel(address).await)
            .status(pb::StatusRequest {})
            .await;
        let id = status
            .ok()
            .and_then(|s| s.into_inner().layout)
            .map_or(0, |l| l.cluster_id);
        tonic::service::interceptor::InterceptedService::new(channel(address).await, Stamp(id))
    }

    /// The client-facing ReplicaRead client (the smart client's reads) for node `i`.
    pub async fn replica_read(
        &self,
        i: usize,
    ) -> pb::replica_read_client::ReplicaReadClient<Channel> {
        pb::replica_read_client::ReplicaReadClient::new(channel(&self.nodes[i].address).await)
    }

    /// The Membership client (for nodes only: layouts, joins) for node `i`.
    pub async fn membership(
        &self,
        i: usize,
    ) -> pb::membership_client::MembershipClient<NodeChannel> {
        pb::membership_client::MembershipClient::new(self.node_channel(i).await)
    }

    /// The Liveness client (for nodes only: heartbeats) for node `i`.
    pub async fn liveness(&self, i: usize) -> pb::liveness_client::LivenessClient<NodeChannel> {
        pb::liveness_client::LivenessClient::new(self.node_channel(i).await)
    }

    /// What node `i`'s own store holds for `key` (internal `Replica.Read`,
    /// bypassing quorums), if anything.
    pub async fn replica_record(&self, i: usize, key: &str) -> Option<pb::Record> {
        self.replica(i)
            .await
            .read(pb::ReplicaReadRequest {
                key: key.into(),
                ..Default::default()
            })
            .await
            .expect("replica read")
            .into_inner()
            .record
    }

    pub async fn cluster(&self, i: usize) -> pb::cluster_client::ClusterClient<Channel> {
        pb::cluster_client::ClusterClient::new(channel(&self.nodes[i].address).await)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                // A paused node must be resumed to die promptly on SIGKILL? No:
                // SIGKILL works on stopped processes too.
                let _ = child.kill();
                let _ = child.wait();
            }
            if panicking {
                eprintln!(
                    "---- last log lines of {} ----\n{}",
                    node.address,
                    node.log_tail()
                );
            }
        }
        let _ = &self.dir;
    }
}

/// A node frozen with SIGSTOP; dropping this sends SIGCONT.
pub struct Frozen {
    /// The frozen process.
    pid: u32,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let resumed = Command::new("kill")
            .args(["-CONT", &self.pid.to_string()])
            .status();
        if !matches!(resumed, Ok(status) if status.success()) && !std::thread::panicking() {
            panic!("kill -CONT {} failed: {resumed:?}", self.pid);
        }
    }
}

/// How often [`eventually`] polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `check` every [`POLL_INTERVAL`] until it answers `Ok`, and returns
/// what it answered. Once `within` has passed, panics with the last `Err`:
/// what `check` saw instead.
pub async fn eventually<T, E: std::fmt::Display>(
    within: Duration,
    mut check: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let observed = match check().await {
            Ok(value) => return value,
            Err(observed) => observed,
        };
        assert!(
            Instant::now() < deadline,
            "not within {within:?}: {observed}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

pub async fn channel(address: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("valid address")
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

/// A channel to `address` over TLS, trusting the CA certificates in `ca`
/// and presenting no certificate.
pub fn tls_channel(ca: &std::path::Path, address: &str) -> Channel {
    use dkvs::net::Dialer;
    let tls = dkvs::security::tls::ClientTls::for_ca(ca).expect("load the CA file");
    dkvs::net::TlsDialer::new(tls)
        .dial(address)
        .expect("valid address")
}

/// Whether the node at `address` answers SERVING on its health service
/// now, asked over TLS (trusting `ca`).
pub async fn health_serving_tls(ca: &std::path::Path, address: &str) -> bool {
    let mut client = HealthClient::new(tls_channel(ca, address));
    let request = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(Duration::from_secs(1), client.check(request)).await {
        Ok(Ok(reply)) => reply.into_inner().status == 1, // SERVING
        _ => false,
    }
}

/// The layout the node at `address` serves, from `Cluster.Status` over TLS
/// with `access`'s token (the node-to-node `GetLayout` needs a node
/// certificate).
async fn secured_layout(
    access: &TlsAccess,
    address: &str,
) -> Result<tonic::Response<pb::Layout>, tonic::Status> {
    let mut request = tonic::Request::new(pb::StatusRequest {});
    request.set_timeout(Duration::from_secs(2));
    let bearer = format!("Bearer {}", access.token)
        .parse()
        .map_err(|_| tonic::Status::invalid_argument("the token is not ASCII"))?;
    request.metadata_mut().insert("authorization", bearer);
    let status = pb::cluster_client::ClusterClient::new(tls_channel(&access.ca, address))
        .status(request)
        .await?
        .into_inner();
    status
        .layout
        .map(tonic::Response::new)
        .ok_or_else(|| tonic::Status::unavailable("no layout yet"))
}

/// Whether the node at `address` answers SERVING on its health service now.
pub async fn health_serving(address: &str) -> bool {
    let mut client = HealthClient::new(channel(address).await);
    let request = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(Duration::from_secs(1), client.check(request)).await {
        Ok(Ok(reply)) => reply.into_inner().status == 1, // SERVING
        _ => false,
    }
}

pub fn put_request(key: &str, value: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into(),
        value: value.as_bytes().to_vec().into(),
        consistency: 0,
    }
}

pub fn get_request(key: &str) -> pb::GetRequest {
    pb::GetRequest {
        key: key.into(),
        consistency: 0,
    }
}

/// The seed in environment variable `name` (to replay a run), or a new one
/// from the clock.
#[allow(dead_code)] // not every test binary replays a seeded schedule
pub fn seed_from_env(name: &str) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        })
}

impl TestCluster {
    /// Starts one node per `(address, data dir)` — fixed addresses, data
    /// dirs that already hold a cluster (the upgrade fixture) — with
    /// `--peers` naming them all and `extra` flags; waits until all serve.
    /// `dir` holds the data dirs and receives the logs. The flags in
    /// DKVS_TEST_SERVER_FLAGS are not added: the data dirs fix the engine.
    pub async fn start_on(
        dir: tempfile::TempDir,
        members: &[(String, PathBuf)],
        extra: &[&str],
    ) -> Self {
        let peers = members
            .iter()
            .map(|(address, _)| address.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let nodes = members
            .iter()
            .enumerate()
            .map(|(i, (address, data_dir))| {
                let mut args: Vec<String> = [
                    "--listen",
                    address,
                    "--peers",
                    &peers,
                    "--data-dir",
                    &data_dir.display().to_string(),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                args.extend(extra.iter().map(|s| s.to_string()));
                let mut node = TestNode {
                    address: address.clone(),
                    data_dir: data_dir.clone(),
                    log: dir.path().join(format!("node{i}.log")),
                    args,
                    child: None,
                };
                node.spawn();
                node
            })
            .collect();
        let mut cluster = Self {
            dir,
            nodes,
            access: None,
        };
        if let Err(error) = cluster.wait_all_ready().await {
            panic!("cluster did not start: {error}");
        }
        cluster
    }
}

/// Writes `k0..k{count}` = `v0..`: data for a layout change to move.
pub async fn preload(client: &Client, count: usize) {
    for i in 0..count {
        client
            .put(&format!("k{i}"), format!("v{i}"))
            .await
            .expect("preload");
    }
}

/// Checks every key [`preload`] wrote, read at ALL from the running
/// members; answers the client that read them.
pub async fn preloaded_at_all(cluster: &TestCluster, count: usize) -> Client {
    let all = cluster
        .client_with(ClientOptions {
            consistency: dkvs::quorum::Consistency::All,
            ..ClientOptions::default()
        })
        .await;
    for i in 0..count {
        assert_eq!(
            all.get(&format!("k{i}"))
                .await
                .expect("read at ALL")
                .as_deref(),
            Some(format!("v{i}").as_bytes()),
            "k{i}"
        );
    }
    all
}

/// Fails, naming the first twenty, when the checker found violations.
pub fn assert_no_violations(report: &dkvs::checker::Report) {
    assert!(
        report.is_valid(),
        "{} violations:\n{}",
        report.violations.len(),
        report
            .violations
            .iter()
            .take(20)
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Writers and readers on keys of their own, every operation recorded,
/// until [`Load::check`].
pub struct Load {
    workload: Workload,
    recorder: Recorder,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub async fn start(cluster: &TestCluster) -> Self {
        let client = Arc::new(
            cluster
                .client_with(ClientOptions {
                    rpc_timeout: Duration::from_secs(2),
                    ..ClientOptions::default()
                })
                .await,
        );
        let (workload, recorder) = (Workload::new(100), Recorder::new());
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..2)
            .map(|id| {
                let (client, recorder, stop) = (client.clone(), recorder.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut round = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        // A new client id each round keeps values unique.
                        let until = tokio::time::Instant::now() + Duration::from_millis(500);
                        let worker = 10 + 2 * round + id;
                        workload
                            .run_worker(worker, &client, worker as u64, until, &recorder)
                            .await;
                        round += 1;
                    }
                })
            })
            .collect();
        Self {
            workload,
            recorder,
            stop,
            workers,
        }
    }

    /// Stops the workers, reads every key at ALL, and checks the history:
    /// no acknowledged write lost, no stale or invented read.
    pub async fn check(mut self, cluster: &TestCluster) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in std::mem::take(&mut self.workers) {
            worker.await.expect("worker");
        }
        let reader = cluster
            .client_with(ClientOptions {
                consistency: dkvs::quorum::Consistency::All,
                ..ClientOptions::default()
            })
            .await;
        self.workload
            .final_reads(9, &reader, &self.recorder)
            .await
            .expect("final reads at ALL");
        let operations = self.recorder.len();
        let History { ops, .. } = self.recorder.take();
        let report = dkvs::checker::check(&ops);
        println!("operations: {operations}, {report}");
        assert!(
            operations > 50,
            "the workload ran ({operations} operations)"
        );
        assert_no_violations(&report);
    }
}

/// A test that fails stops the workers too: against a cluster already
/// killed, their calls can fail without ever yielding, and the runtime
/// could not shut down.
impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A channel whose calls carry a cluster id (see [`TestCluster::node_channel`]).
pub type NodeChannel = tonic::service::interceptor::InterceptedService<Channel, Stamp>;

/// Puts a cluster id in `dkvs-cluster-id`, unless the call names one.
#[derive(Clone, Copy)]
pub struct Stamp(pub u64);

impl tonic::service::Interceptor for Stamp {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let key = dkvs::net::CLUSTER_ID_METADATA;
        if self.0 != 0 && request.metadata().get(key).is_none() {
            let value = format!("{:016x}", self.0).parse().expect("ascii metadata");
            request.metadata_mut().insert(key, value);
        }
        Ok(request)
    }
}

/// Runs `DKVSServer` with `args` (and `--data-dir data_dir`), expecting it
/// to exit by itself within 20 s (a start it must refuse, say): its exit
/// code and what it printed. Panics, killing it, if it keeps running.
pub fn run_server_to_exit(args: &[&str], data_dir: &std::path::Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_DKVSServer"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn DKVSServer");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!(
                "DKVSServer {args:?} kept running where it should have exited:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("output");
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    (output.status.code(), text)
}
