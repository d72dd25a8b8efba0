//! Real network partitions between real hosts.
//!
//! Five `DKVSServer` processes run in network namespaces of their own, each
//! a host with its own address, joined by a bridge. The bridge lives in a
//! namespace of its own too (a "switch"), so the host's firewall never sees
//! the cluster's traffic; the test process reaches the nodes through one
//! veth from the host into that switch. While workers run the recorded
//! workload ([`dkvs::workload`]) through a smart client on the host side,
//! one fault at a time is injected and healed:
//!
//! * **isolate**: one node drops everything in and out (iptables DROP in its
//!   namespace): a silent, symmetric partition from peers and clients;
//! * **one-way**: one node drops only what it sends to the other nodes: it
//!   still hears them (writes reach it, its acks never leave), and clients
//!   still reach it;
//! * **split**: two nodes drop everything to and from the other three, a
//!   minority/majority split, clients reaching both sides;
//! * **link down**: `ip link set down` on one node's interface, a cut that
//!   fails fast on that node ("Network is unreachable");
//! * **slow link**: `tc tbf` (256 kbit/s, 400 ms of queue) on both ends of
//!   one node's link (this kernel has no netem).
//!
//! Once every fault is healed every key is read at ALL, and the whole
//! history goes to [`dkvs::checker::check`]. It asserts no violation, that
//! the majority side kept acknowledging writes during the split, and that
//! everything reads back after healing; it prints each scenario's figures.
//!
//! It needs root (namespaces, iptables) and installs Debian's `iptables`
//! when missing; without them it prints `skipped: <why>` and passes. Every
//! namespace and link it makes is removed when it ends, also when it
//! panics; leftovers of runs that died (their pid is gone) are removed at
//! start. `DKVS_PARTITION_SEED=S` replays a schedule (victims, workers).
//!
//! `cargo test --test partitions -- --nocapture`

mod common;

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use dkvs::checker::{self, Action, Op, ReadOutcome, WriteOutcome};
use dkvs::client::{Client, ClientOptions};
use dkvs::pb;
use dkvs::quorum::Consistency;
use dkvs::workload::{History, Recorder, Rng, Workload};
use tokio::time::Instant;

/// Nodes (hosts), each in its own namespace.
const NODES: usize = 5;
/// Workers running the workload during each scenario.
const WORKERS: usize = 4;
/// Keys the workload touches.
const KEYS: u64 = 16;
/// The port every node listens on (each has an address of its own).
const PORT: u16 = 7001;
/// Load before a fault, the fault itself, and load after healing.
const LEAD: Duration = Duration::from_millis(500);
const FAULT: Duration = Duration::from_secs(3);
const TAIL: Duration = Duration::from_secs(2);
/// How long a node may take to report SERVING at start.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long the cluster may take to see every member up after a heal.
const HEAL_DEADLINE: Duration = Duration::from_secs(15);
/// How long the final reads at ALL may keep retrying.
const FINAL_READ_DEADLINE: Duration = Duration::from_secs(20);
/// Bound on any one `ip`, `iptables` or `tc` command.
const COMMAND_DEADLINE: Duration = Duration::from_secs(10);
/// Flags for short timings: faults are seconds long.
const SERVER_FLAGS: &[&str] = &[
    "--heartbeat-interval-ms",
    "100",
    "--rpc-timeout-ms",
    "500",
    "--request-timeout-ms",
    "1000",
    "--hint-delivery-interval-ms",
    "200",
    "--anti-entropy-interval",
    "2",
    "--worker-threads",
    "1",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_stays_correct_across_real_partitions() {
    let started = std::time::Instant::now();
    if let Err(why) = privileges() {
        eprintln!("skipped: {why}");
        return;
    }
    remove_leftovers();
    let mut lab = match Lab::build() {
        Ok(lab) => lab,
        Err(Setup::Skip(why)) => {
            eprintln!("skipped: {why}");
            return;
        }
        Err(Setup::Broken(why)) => panic!("network setup failed: {why}"),
    };
    let seed = common::seed_from_env("DKVS_PARTITION_SEED");
    println!(
        "partitions: seed {seed} (DKVS_PARTITION_SEED={seed} replays the schedule); nodes {}",
        lab.addresses().join(" ")
    );
    lab.start_servers();
    lab.wait_all_serving().await;
    println!("cluster serving after {:.1?}", started.elapsed());

    let client = Arc::new(
        Client::connect(
            &lab.addresses(),
            ClientOptions {
                rpc_timeout: Duration::from_millis(1500),
                ..ClientOptions::default()
            },
        )
        .await
        .expect("client connects"),
    );
    let recorder = Recorder::new();
    let workload = Workload::new(KEYS);
    let mut rng = Rng::new(seed ^ 0x9E37_79B9_7F4A_7C15);
    let schedule = vec![
        Fault::Isolate(rng.below(NODES as u64) as usize),
        Fault::MuteOutgoing(rng.below(NODES as u64) as usize),
        Fault::Split(pick_minority(&mut rng)),
        Fault::LinkDown(rng.below(NODES as u64) as usize),
        Fault::Slow(rng.below(NODES as u64) as usize),
    ];
    let mut scenarios = Vec::new();
    for (number, fault) in schedule.into_iter().enumerate() {
        let first = recorder.len();
        let until = Instant::now() + LEAD + FAULT + TAIL;
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                // Worker ids are unique across scenarios: a worker's values
                // (`c<id>-<n>`) must never repeat in one history.
                let id = number * WORKERS + w;
                let (client, recorder) = (client.clone(), recorder.clone());
                let seed = seed.wrapping_add(id as u64 * 7919);
                tokio::spawn(async move {
                    workload
                        .run_worker(id, &client, seed, until, &recorder)
                        .await
                })
            })
            .collect();
        tokio::time::sleep(LEAD).await;
        let fault_start = workload.tick();
        lab.inject(&fault);
        tokio::time::sleep(FAULT).await;
        lab.heal(&fault);
        let healed = workload.tick();
        for worker in workers {
            worker.await.expect("worker task");
        }
        let last = recorder.len();
        let heal_wait = Instant::now();
        lab.wait_all_up(HEAL_DEADLINE).await;
        scenarios.push(Scenario {
            fault,
            ops: first..last,
            fault_start,
            healed,
            all_up_after: heal_wait.elapsed(),
        });
    }
    let workload_ops = recorder.len();

    // Every link is healed and every node sees every other up: read every
    // key at ALL. These reads begin after every write has ended, so a stale
    // one is a lost write. A read that fails (a channel still stuck on a
    // healed connection) is tried again, within a bound.
    let final_reader = Client::connect(
        &lab.addresses(),
        ClientOptions {
            consistency: Consistency::All,
            rpc_timeout: Duration::from_secs(2),
            ..ClientOptions::default()
        },
    )
    .await
    .expect("final reader connects");
    let final_deadline = Instant::now() + FINAL_READ_DEADLINE;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match workload
            .final_reads(scenarios.len() * WORKERS, &final_reader, &recorder)
            .await
        {
            Ok(()) => break,
            Err(error) if Instant::now() < final_deadline => {
                println!("final reads, attempt {attempts}: {error}; again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!(
                "after healing, reads at ALL still fail after {FINAL_READ_DEADLINE:?}: {error}"
            ),
        }
    }

    let History {
        ops: history,
        errors,
    } = recorder.take();
    let report = checker::check(&history);

    for scenario in &scenarios {
        scenario.print(&history, &errors, &lab, &client);
    }
    let workload_figures = Figures::of(&history[..workload_ops]);
    println!("workload: {workload_figures}");
    println!(
        "final reads at ALL: {} ({} attempt(s))",
        history.len() - workload_ops,
        attempts
    );
    println!("checked: {report}");
    println!("wall time {:.1?}", started.elapsed());

    if !report.is_valid() {
        let mut text = String::new();
        for violation in report.violations.iter().take(20) {
            text.push_str(&format!("{violation}\n"));
            for &i in &violation.ops {
                text.push_str(&format!("    {}\n", checker::describe(&history, i)));
            }
        }
        panic!(
            "{} violations (seed {seed}, DKVS_PARTITION_SEED={seed} replays the schedule):\n{text}",
            report.violations.len()
        );
    }
    assert!(
        workload_ops > 100,
        "too few operations ({workload_ops}) to mean anything"
    );
    for scenario in &scenarios {
        if let Fault::Split(minority) = &scenario.fault {
            let (majority_keys, _) = split_writes(scenario, &history, &lab, &client, minority);
            assert!(
                majority_keys > 0,
                "no write was acknowledged during the split {:?} for keys with a write quorum \
                 on the majority side",
                minority
            );
        }
    }
    client.close().await;
    final_reader.close().await;
    drop(lab);
    println!("cleaned up; total {:.1?}", started.elapsed());
}

/// Two distinct nodes: the minority side of a split.
fn pick_minority(rng: &mut Rng) -> Vec<usize> {
    let a = rng.below(NODES as u64) as usize;
    let b = (a + 1 + rng.below(NODES as u64 - 1) as usize) % NODES;
    let mut minority = vec![a, b];
    minority.sort();
    minority
}

/// One fault, by node index.
#[derive(Clone, Debug)]
enum Fault {
    /// The node drops every packet in and out.
    Isolate(usize),
    /// The node drops what it sends to the other nodes.
    MuteOutgoing(usize),
    /// These nodes drop everything to and from the others.
    Split(Vec<usize>),
    /// The node's interface is down.
    LinkDown(usize),
    /// The node's link is shaped to 256 kbit/s both ways.
    Slow(usize),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Isolate(v) => write!(f, "isolate node {v} (iptables DROP in and out)"),
            Fault::MuteOutgoing(v) => {
                write!(
                    f,
                    "one-way: node {v} drops what it sends to the other nodes"
                )
            }
            Fault::Split(minority) => {
                let majority: Vec<usize> = (0..NODES).filter(|i| !minority.contains(i)).collect();
                write!(f, "split {minority:?} | {majority:?} (iptables DROP)")
            }
            Fault::LinkDown(v) => write!(f, "ip link set down on node {v}"),
            Fault::Slow(v) => write!(f, "slow link on node {v} (tc tbf 256kbit, 400 ms)"),
        }
    }
}

/// One fault injected under load, and where its ops are in the history.
struct Scenario {
    fault: Fault,
    /// Indices of this scenario's workload ops in the history.
    ops: std::ops::Range<usize>,
    /// Ticks when the fault began and when it was healed.
    fault_start: u64,
    healed: u64,
    /// How long after the load stopped every node saw every member up.
    all_up_after: Duration,
}

impl Scenario {
    fn print(&self, history: &[Op], errors: &[(usize, String)], lab: &Lab, client: &Client) {
        let ops = &history[self.ops.clone()];
        let during: Vec<Op> = ops
            .iter()
            .filter(|op| op.start >= self.fault_start && op.start < self.healed)
            .cloned()
            .collect();
        let after: Vec<Op> = ops
            .iter()
            .filter(|op| op.start >= self.healed)
            .cloned()
            .collect();
        println!("scenario: {}", self.fault);
        println!("  all ops:        {}", Figures::of(ops));
        println!(
            "  during fault:   {} ({:.1} s)",
            Figures::of(&during),
            (self.healed - self.fault_start) as f64 / 1e6
        );
        println!("  after heal:     {}", Figures::of(&after));
        if let Fault::Split(minority) = &self.fault {
            let (majority, minority_keys) = split_writes(self, history, lab, client, minority);
            println!(
                "  acked during the split: {majority} writes to keys with a write quorum of \
                 replicas on the majority side, {minority_keys} to keys with one on the minority side"
            );
        }
        println!(
            "  every node saw every member up {:.1?} after the load stopped",
            self.all_up_after
        );
        let during_fault = |i: &usize| {
            self.ops.contains(i)
                && history[*i].start >= self.fault_start
                && history[*i].start < self.healed
        };
        for (i, why) in errors.iter().filter(|(i, _)| during_fault(i)).take(2) {
            println!("  e.g. {}: {why}", checker::describe(history, *i));
        }
    }
}

/// Writes acknowledged entirely within a split: (to keys that have a write
/// quorum of replicas on the majority side, to keys that do not).
fn split_writes(
    scenario: &Scenario,
    history: &[Op],
    lab: &Lab,
    client: &Client,
    minority: &[usize],
) -> (usize, usize) {
    let addresses = lab.addresses();
    let needed = Consistency::Quorum.required(client.replicas());
    let mut counts = (0, 0);
    for op in &history[scenario.ops.clone()] {
        let acked = matches!(
            op.action,
            Action::Put {
                outcome: WriteOutcome::Acked(_),
                ..
            } | Action::Delete {
                outcome: WriteOutcome::Acked(_)
            }
        );
        if !acked || op.start < scenario.fault_start || op.end >= scenario.healed {
            continue;
        }
        let on_majority = client
            .replicas_of(&op.key)
            .iter()
            .filter(|a| {
                let node = addresses.iter().position(|x| x == *a);
                node.is_some_and(|n| !minority.contains(&n))
            })
            .count();
        if on_majority >= needed {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
    }
    counts
}

/// Counts over some ops.
struct Figures {
    ops: usize,
    writes: usize,
    ok: usize,
    failed_reads: usize,
    indeterminate: usize,
}

impl Figures {
    fn of(ops: &[Op]) -> Self {
        let mut figures = Figures {
            ops: ops.len(),
            writes: 0,
            ok: 0,
            failed_reads: 0,
            indeterminate: 0,
        };
        for op in ops {
            match &op.action {
                Action::Put { outcome, .. } | Action::Delete { outcome } => {
                    figures.writes += 1;
                    match outcome {
                        WriteOutcome::Acked(_) => figures.ok += 1,
                        _ => figures.indeterminate += 1,
                    }
                }
                Action::Get {
                    outcome: ReadOutcome::Failed,
                } => figures.failed_reads += 1,
                Action::Get { .. } => figures.ok += 1,
            }
        }
        figures
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let availability = if self.ops == 0 {
            100.0
        } else {
            self.ok as f64 * 100.0 / self.ops as f64
        };
        write!(
            f,
            "{} ops ({} writes, {} reads), failed reads {}, indeterminate writes {}, availability {:.2}%",
            self.ops,
            self.writes,
            self.ops - self.writes,
            self.failed_reads,
            self.indeterminate,
            availability
        )
    }
}

// ---------------------------------------------------------------------------
// The network: namespaces, links, servers.
// ---------------------------------------------------------------------------

/// Why the network could not be built.
enum Setup {
    /// The machine cannot do it (no privileges, no iptables): skip.
    Skip(String),
    /// It should have worked: fail.
    Broken(String),
}

/// One DKVSServer process in its namespace.
struct Server {
    child: Child,
    log: PathBuf,
}

/// The namespaces, links and servers of one run. Dropping it kills the
/// servers and removes every namespace and link it made.
struct Lab {
    /// `dkvs<pid>`: every name this run makes starts with it.
    tag: String,
    /// The third octet of this run's subnet, 10.231.<subnet>.0/24.
    subnet: u8,
    /// Namespaces made, to delete.
    namespaces: Vec<String>,
    /// The host end of the veth into the switch, once made.
    host_link: Option<String>,
    /// Servers started (index = node).
    servers: Vec<Server>,
    /// Data dirs and logs.
    dir: tempfile::TempDir,
}

impl Lab {
    fn switch(&self) -> String {
        format!("{}s", self.tag)
    }

    fn node_ns(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }

    fn ip_of(&self, i: usize) -> String {
        format!("10.231.{}.{}", self.subnet, i + 1)
    }

    fn addresses(&self) -> Vec<String> {
        (0..NODES)
            .map(|i| format!("{}:{PORT}", self.ip_of(i)))
            .collect()
    }

    /// Makes the switch, the host link, and one namespace per node.
    fn build() -> Result<Self, Setup> {
        let tag = format!("dkvs{}", std::process::id());
        let mut lab = Lab {
            tag,
            subnet: 0,
            namespaces: Vec::new(),
            host_link: None,
            servers: Vec::new(),
            dir: tempfile::tempdir().map_err(|e| Setup::Broken(format!("tempdir: {e}")))?,
        };
        // The first namespace tells whether this machine lets us at all.
        let switch = lab.switch();
        run("ip", &["netns", "add", &switch])
            .map_err(|e| Setup::Skip(format!("cannot create a network namespace: {e}")))?;
        lab.namespaces.push(switch.clone());
        ensure_iptables(&switch).map_err(Setup::Skip)?;
        lab.build_links().map_err(Setup::Broken)?;
        // tbf is the one qdisc this test needs; a kernel without it is
        // another kind of machine.
        let probe = lab.node_ns(0);
        run(
            "tc",
            &[
                "-n", &probe, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "256kbit",
                "burst", "16kb", "latency", "400ms",
            ],
        )
        .map_err(|e| Setup::Skip(format!("tc tbf does not work here: {e}")))?;
        run("tc", &["-n", &probe, "qdisc", "del", "dev", "eth0", "root"]).map_err(Setup::Broken)?;
        Ok(lab)
    }

    fn build_links(&mut self) -> Result<(), String> {
        let switch = self.switch();
        run("ip", &["-n", &switch, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &["-n", &switch, "link", "add", "br0", "type", "bridge"],
        )?;
        run("ip", &["-n", &switch, "link", "set", "br0", "up"])?;
        // The host's way in: a veth whose other end is a bridge port.
        let host_link = format!("{}h", self.tag);
        run(
            "ip",
            &[
                "link", "add", &host_link, "type", "veth", "peer", "name", "hostport", "netns",
                &switch,
            ],
        )?;
        self.host_link = Some(host_link.clone());
        run(
            "ip",
            &["-n", &switch, "link", "set", "hostport", "master", "br0"],
        )?;
        run("ip", &["-n", &switch, "link", "set", "hostport", "up"])?;
        // Up first: the subnet's route appears only on a link that is up.
        run("ip", &["link", "set", &host_link, "up"])?;
        self.subnet = claim_subnet(&host_link)?;
        for i in 0..NODES {
            let ns = self.node_ns(i);
            run("ip", &["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            let port = format!("port{i}");
            run(
                "ip",
                &[
                    "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ],
            )?;
            run(
                "ip",
                &["-n", &switch, "link", "set", &port, "master", "br0"],
            )?;
            run("ip", &["-n", &switch, "link", "set", &port, "up"])?;
            let address = format!("{}/24", self.ip_of(i));
            run("ip", &["-n", &ns, "addr", "add", &address, "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Starts one DKVSServer in each node's namespace.
    fn start_servers(&mut self) {
        let peers = self.addresses().join(",");
        // The server dies with this test process even if the test is
        // SIGKILLed (no Drop then), when setpriv can arrange it.
        let pdeathsig = run("setpriv", &["--help"]).is_ok();
        for (i, address) in self.addresses().into_iter().enumerate() {
            let data_dir = self.dir.path().join(format!("node{i}"));
            let log = self.dir.path().join(format!("node{i}.log"));
            let mut args: Vec<String> = vec!["netns".into(), "exec".into(), self.node_ns(i)];
            if pdeathsig {
                args.extend(["setpriv", "--pdeathsig", "KILL", "--"].map(String::from));
            }
            args.push(env!("CARGO_BIN_EXE_DKVSServer").into());
            args.extend(
                [
                    "--listen",
                    &address,
                    "--peers",
                    &peers,
                    "--data-dir",
                    &data_dir.display().to_string(),
                ]
                .map(String::from),
            );
            args.extend(SERVER_FLAGS.iter().map(|s| s.to_string()));
            if let Ok(flags) = std::env::var("DKVS_TEST_SERVER_FLAGS") {
                args.extend(flags.split_whitespace().map(String::from));
            }
            let out = File::create(&log).expect("create node log");
            let child = Command::new("ip")
                .args(&args)
                .env("RUST_LOG", "info,dkvs=debug")
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("clone log handle"))
                .stderr(out)
                .spawn()
                .expect("spawn DKVSServer in its namespace");
            self.servers.push(Server { child, log });
        }
    }

    /// Polls every node's health service until SERVING, with a deadline.
    async fn wait_all_serving(&mut self) {
        let deadline = Instant::now() + READY_DEADLINE;
        for (i, address) in self.addresses().into_iter().enumerate() {
            loop {
                if let Ok(Some(status)) = self.servers[i].child.try_wait() {
                    panic!(
                        "node {i} ({address}) exited with {status}:\n{}",
                        log_tail(&self.servers[i].log)
                    );
                }
                if common::health_serving(&address).await {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {i} ({address}) not SERVING after {READY_DEADLINE:?}:\n{}",
                    log_tail(&self.servers[i].log)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Polls until every node answers Cluster.Status with every member UP.
    async fn wait_all_up(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let addresses = self.addresses();
        loop {
            let mut missing = Vec::new();
            for address in &addresses {
                let mut cluster =
                    pb::cluster_client::ClusterClient::new(common::channel(address).await);
                let asked = tokio::time::timeout(
                    Duration::from_secs(1),
                    cluster.status(pb::StatusRequest {}),
                );
                match asked.await {
                    Ok(Ok(status)) => {
                        let status = status.into_inner();
                        let up = status
                            .members
                            .iter()
                            .filter(|m| m.state == pb::MemberState::Up as i32)
                            .count();
                        if up < NODES {
                            missing.push(format!("{address} sees {up} of {NODES} up"));
                        }
                    }
                    Ok(Err(error)) => missing.push(format!("{address}: {}", error.message())),
                    Err(_) => missing.push(format!("{address}: no answer within 1 s")),
                }
            }
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not every node sees every member up {within:?} after healing: {}",
                missing.join("; ")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs iptables in node `i`'s namespace.
    fn iptables(&self, i: usize, rule: &[&str]) {
        let ns = self.node_ns(i);
        let mut args = vec!["netns", "exec", &ns, "iptables", "-w"];
        args.extend_from_slice(rule);
        run("ip", &args).unwrap_or_else(|e| panic!("iptables in node {i}: {e}"));
    }

    /// Drops every packet between node `i` and node `j`'s address, or only
    /// what `i` sends to it.
    fn drop_towards(&self, i: usize, j: usize, both_ways: bool) {
        let peer = self.ip_of(j);
        self.iptables(i, &["-A", "OUTPUT", "-d", &peer, "-j", "DROP"]);
        if both_ways {
            self.iptables(i, &["-A", "INPUT", "-s", &peer, "-j", "DROP"]);
        }
    }

    fn tbf(&self, i: usize, add: bool) {
        let (ns, switch, port) = (self.node_ns(i), self.switch(), format!("port{i}"));
        for (namespace, dev) in [(ns.as_str(), "eth0"), (switch.as_str(), port.as_str())] {
            let mut args = vec!["-n", namespace, "qdisc"];
            if add {
                args.extend([
                    "add", "dev", dev, "root", "tbf", "rate", "256kbit", "burst", "16kb",
                    "latency", "400ms",
                ]);
            } else {
                args.extend(["del", "dev", dev, "root"]);
            }
            run("tc", &args).unwrap_or_else(|e| panic!("tc on node {i}: {e}"));
        }
    }

    fn inject(&self, fault: &Fault) {
        match fault {
            Fault::Isolate(v) => {
                self.iptables(*v, &["-A", "INPUT", "-i", "eth0", "-j", "DROP"]);
                self.iptables(*v, &["-A", "OUTPUT", "-o", "eth0", "-j", "DROP"]);
            }
            Fault::MuteOutgoing(v) => {
                for j in (0..NODES).filter(|j| j != v) {
                    self.drop_towards(*v, j, false);
                }
            }
            Fault::Split(minority) => {
                for &m in minority {
                    for j in (0..NODES).filter(|j| !minority.contains(j)) {
                        self.drop_towards(m, j, true);
                    }
                }
            }
            Fault::LinkDown(v) => {
                let ns = self.node_ns(*v);
                run("ip", &["-n", &ns, "link", "set", "eth0", "down"])
                    .unwrap_or_else(|e| panic!("link down: {e}"));
            }
            Fault::Slow(v) => self.tbf(*v, true),
        }
    }

    fn heal(&self, fault: &Fault) {
        let flush = |i: usize| self.iptables(i, &["-F"]);
        match fault {
            Fault::Isolate(v) | Fault::MuteOutgoing(v) => flush(*v),
            Fault::Split(minority) => minority.iter().for_each(|&m| flush(m)),
            Fault::LinkDown(v) => {
                let ns = self.node_ns(*v);
                run("ip", &["-n", &ns, "link", "set", "eth0", "up"])
                    .unwrap_or_else(|e| panic!("link up: {e}"));
            }
            Fault::Slow(v) => self.tbf(*v, false),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for (i, server) in self.servers.iter_mut().enumerate() {
            let _ = server.child.kill();
            let _ = server.child.wait();
            if panicking {
                eprintln!(
                    "---- last log lines of node {i} ----\n{}",
                    log_tail(&server.log)
                );
            }
        }
        // Deleting a namespace destroys its interfaces, and a veth goes with
        // its peer; the host end is deleted explicitly too (namespace
        // teardown is asynchronous).
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
        if let Some(link) = &self.host_link
            && link_exists(link)
            && let Err(e) = run("ip", &["link", "del", link])
            && link_exists(link)
        {
            eprintln!("cleanup: {e}");
        }
    }
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

/// Runs `program` with a deadline; its stdout, or why it failed.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    run_within(program, args, COMMAND_DEADLINE, &[])
}

fn run_within(
    program: &str,
    args: &[&str],
    limit: Duration,
    env: &[(&str, &str)],
) -> Result<String, String> {
    let shown = format!("{program} {}", args.join(" "));
    // Output goes to files, not pipes: a full pipe cannot block the child.
    let mut out = tempfile::tempfile().map_err(|e| format!("{shown}: {e}"))?;
    let mut err = tempfile::tempfile().map_err(|e| format!("{shown}: {e}"))?;
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| format!("{shown}: {e}"))?)
        .stderr(err.try_clone().map_err(|e| format!("{shown}: {e}"))?)
        .spawn()
        .map_err(|e| format!("{shown}: {e}"))?;
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{shown}: no exit within {limit:?}"));
            }
            Err(e) => return Err(format!("{shown}: {e}")),
        }
    };
    let read = |file: &mut File| {
        let mut text = String::new();
        let _ = file.rewind();
        let _ = file.read_to_string(&mut text);
        text
    };
    if status.success() {
        Ok(read(&mut out))
    } else {
        Err(format!("{shown}: {status}: {}", read(&mut err).trim()))
    }
}

/// Root is needed for namespaces and iptables.
fn privileges() -> Result<(), String> {
    if !cfg!(target_os = "linux") {
        return Err("network namespaces are Linux only".into());
    }
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if uid != "0" {
        return Err(format!(
            "needs root for network namespaces and iptables (effective uid {uid})"
        ));
    }
    run("ip", &["-V"]).map_err(|e| format!("iproute2's `ip` is not usable: {e}"))?;
    Ok(())
}

/// Makes sure iptables works inside a namespace, installing Debian's
/// `iptables` package if the command is missing.
fn ensure_iptables(ns: &str) -> Result<(), String> {
    if run("iptables", &["--version"]).is_err() {
        install_iptables()?;
    }
    run("ip", &["netns", "exec", ns, "iptables", "-w", "-L", "-n"])
        .map(|_| ())
        .map_err(|e| format!("iptables does not work in a namespace: {e}"))
}

fn install_iptables() -> Result<(), String> {
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    let install = [
        "install",
        "-y",
        "-q",
        "-o",
        "DPkg::Lock::Timeout=30",
        "iptables",
    ];
    eprintln!("partitions: iptables is missing; apt-get install -y iptables");
    let limit = Duration::from_secs(120);
    let mut result = run_within("apt-get", &install, limit, &env);
    if result
        .as_ref()
        .is_err_and(|e| e.contains("Unable to locate package"))
    {
        // No package lists yet (a fresh image): fetch them once.
        let _ = run_within("apt-get", &["update", "-q"], Duration::from_secs(60), &env);
        result = run_within("apt-get", &install, limit, &env);
    }
    let last_line = |e: String| e.lines().last().unwrap_or("").to_string();
    result.map_err(|e| {
        format!(
            "iptables is missing and could not be installed: {}",
            last_line(e)
        )
    })?;
    run("iptables", &["--version"])
        .map(|_| ())
        .map_err(|e| format!("iptables installed but not usable: {e}"))
}

/// Picks a free 10.231.<x>.0/24 for this run and gives the host end of the
/// switch link its .254 address: one not routed on this host already, and
/// still the only route for it once claimed (two runs at once never share).
fn claim_subnet(host_link: &str) -> Result<u8, String> {
    let first = (std::process::id() % 200) as usize;
    for step in 0..240 {
        let x = ((first + step) % 240 + 10) as u8;
        let prefix = format!("10.231.{x}.");
        if routes_for(&prefix)? > 0 {
            continue;
        }
        run(
            "ip",
            &["addr", "add", &format!("{prefix}254/24"), "dev", host_link],
        )?;
        if routes_for(&prefix)? == 1 {
            return Ok(x);
        }
        // Another run claimed it at the same moment: let it have it.
        run(
            "ip",
            &["addr", "del", &format!("{prefix}254/24"), "dev", host_link],
        )?;
    }
    Err("no free 10.231.x.0/24 subnet".into())
}

/// Routes and addresses on this host within `prefix` (e.g. "10.231.7.").
fn routes_for(prefix: &str) -> Result<usize, String> {
    let routes = run("ip", &["-4", "route", "show", "table", "all"])?;
    Ok(routes
        .lines()
        .filter(|l| l.starts_with(prefix) && !l.starts_with("local") && !l.starts_with("broadcast"))
        .count())
}

fn link_exists(link: &str) -> bool {
    run("ip", &["link", "show", "dev", link]).is_ok()
}

/// The pid in a name this test makes (`dkvs<pid>s`, `dkvs<pid>n<i>`,
/// `dkvs<pid>h`), if `name` is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("dkvs")?;
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (pid, suffix) = rest.split_at(digits);
    let ours = suffix == "s"
        || suffix == "h"
        || suffix
            .strip_prefix('n')
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
    if ours { pid.parse().ok() } else { None }
}

/// Removes namespaces and links of earlier runs that died without cleaning
/// up: names this test makes whose pid no longer exists (or is this
/// process's, which has made nothing yet: an earlier run had the same pid).
/// Servers still running in such a namespace (that run was SIGKILLed) are
/// killed first.
fn remove_leftovers() {
    let me = std::process::id();
    let dead = |pid: u32| pid == me || !Path::new(&format!("/proc/{pid}")).exists();
    let namespaces = run("ip", &["netns", "list"]).unwrap_or_default();
    for ns in namespaces
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        if !owner_pid(ns).is_some_and(dead) {
            continue;
        }
        let pids = run("ip", &["netns", "pids", ns]).unwrap_or_default();
        for pid in pids.split_whitespace() {
            let _ = run("kill", &["-KILL", pid]);
        }
        match run("ip", &["netns", "del", ns]) {
            Ok(_) => eprintln!("partitions: removed namespace {ns} left by a dead run"),
            Err(e) => eprintln!("partitions: could not remove leftover {ns}: {e}"),
        }
    }
    let links = run("ip", &["-o", "link", "show"]).unwrap_or_default();
    for line in links.lines() {
        // "12: dkvs123h@if3: <...>"
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if owner_pid(name).is_some_and(dead) {
            match run("ip", &["link", "del", name]) {
                Ok(_) => eprintln!("partitions: removed link {name} left by a dead run"),
                Err(e) => eprintln!("partitions: could not remove leftover {name}: {e}"),
            }
        }
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
