//! The `DKVSClient` command line against a real cluster: output and exit codes.

mod common;

use std::io::{BufRead, Write};
use std::process::{Command, Output, Stdio};

use common::{TestCluster, eventually};
use dkvs::pb;

fn client(cluster: &TestCluster, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
        .arg("--nodes")
        .arg(cluster.addresses().join(","))
        .args(args)
        .output()
        .expect("run DKVSClient")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_delete_status_and_exit_codes() {
    let mut cluster = TestCluster::start(3).await;

    let put = client(&cluster, &["PUT", "mykey", "Hello Distributed World"]);
    assert_eq!(put.status.code(), Some(0), "{}", text(&put.stderr));
    let get = client(&cluster, &["GET", "mykey"]);
    assert_eq!(get.status.code(), Some(0));
    assert_eq!(text(&get.stdout), "Hello Distributed World");

    // Lower-case commands work too; a missing key exits 1 with a message.
    let missing = client(&cluster, &["get", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("not found"),
        "{}",
        text(&missing.stderr)
    );

    let delete = client(&cluster, &["DELETE", "mykey"]);
    assert_eq!(delete.status.code(), Some(0));
    assert_eq!(client(&cluster, &["GET", "mykey"]).status.code(), Some(1));

    // Usage errors exit 2, and so does input the cluster refuses.
    assert_eq!(
        client(&cluster, &["PUT", "only-a-key"]).status.code(),
        Some(2)
    );
    assert_eq!(client(&cluster, &["FROB"]).status.code(), Some(2));
    let long_key = "k".repeat(2000);
    let refused = client(&cluster, &["PUT", &long_key, "v"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused.stderr).contains("limit is 1024"),
        "{}",
        text(&refused.stderr)
    );

    let status = client(&cluster, &["status"]);
    assert_eq!(status.status.code(), Some(0));
    let table = text(&status.stdout);
    for address in cluster.addresses() {
        assert!(table.contains(&address), "{table}");
    }
    assert_eq!(table.matches(" UP ").count(), 3, "{table}");
    // Every column has its header, in order.
    let header: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("ADDRESS"))
        .expect("header line")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "ADDRESS",
            "NODE",
            "ID",
            "STATE",
            "PHI",
            "LIVE",
            "KEYS",
            "TOMBSTONES",
            "HINTS",
            "HLC",
            "SKEW",
            "UPTIME",
            "LAYOUT",
            "NOTE"
        ],
        "{table}"
    );
    assert!(
        table.contains("\nLayout v2, no change in progress (last change: instances named)\n"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.contains("(this node)"))
        .expect("own row");
    assert_eq!(row.split_whitespace().count(), 13, "{table}");
    assert_eq!(row.split_whitespace().nth(10), Some("v2"), "{table}");

    // With two of three nodes down: the status shows them DOWN, and a
    // quorum write fails with exit code 3 and says why.
    cluster.kill(1);
    cluster.kill(2);
    // The failure detector convicts them about a second after their last heartbeat.
    eventually(std::time::Duration::from_secs(10), async || {
        let status = text(&client(&cluster, &["status"]).stdout);
        if status.matches(" DOWN ").count() == 2 {
            Ok(())
        } else {
            Err(format!("never saw both DOWN:\n{status}"))
        }
    })
    .await;
    let unavailable = client(&cluster, &["PUT", "k", "v"]);
    assert_eq!(unavailable.status.code(), Some(3));
    assert!(
        text(&unavailable.stderr).contains("required replicas"),
        "{}",
        text(&unavailable.stderr)
    );
    let one = client(&cluster, &["--consistency", "one", "PUT", "k", "v"]);
    assert_eq!(one.status.code(), Some(0), "{}", text(&one.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_prompt_runs_commands_until_eof() {
    let cluster = TestCluster::start(3).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
        .env("DKVS_NODES", cluster.addresses().join(","))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn DKVSClient");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"PUT greeting \"hello there\"\nGET greeting\nGET absent\nbogus\nDELETE greeting\nGET greeting\n")
        .expect("write commands");
    let output = child.wait_with_output().expect("client exits at EOF");
    assert_eq!(output.status.code(), Some(0));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("hello there\n"), "{stdout}");
    assert_eq!(stdout.matches("OK").count(), 2, "{stdout}");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("key not found: absent"), "{stderr}");
    assert!(stderr.contains("key not found: greeting"), "{stderr}");
    assert!(stderr.contains("unrecognized subcommand"), "{stderr}");
}

/// A data dir keeps its engine: starting it with the other one is refused
/// with a message that says which flag to use, and nothing is touched.
#[test]
fn a_data_dir_written_by_one_engine_is_not_opened_by_the_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().to_str().expect("utf-8 path");
    let server = |engine: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_DKVSServer"))
            .args(["--listen", "127.0.0.1:0", "--peers", "127.0.0.1:0"])
            .args(["--data-dir", data_dir, "--storage-engine", engine])
            .output()
            .expect("run DKVSServer")
    };
    // Create a log-engine data dir the way a node does.
    std::fs::create_dir_all(dir.path().join("log")).expect("mkdir");
    let refused = server("fjall");
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("--storage-engine log"),
        "unhelpful message: {stderr}"
    );
    assert!(
        !dir.path().join("keyspaces").exists(),
        "fjall created files"
    );
}

/// A write whose coordinator does not answer is indeterminate: the command
/// says it may or may not have been applied and exits 4; the prompt says the
/// same and goes on, and its next write goes to the next replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indeterminate_write_exits_4_and_the_prompt_goes_on() {
    // The detector never convicts the frozen node here, so every client
    // still sees it up and sends it the key's writes; node-to-node calls
    // give up on it quickly, so `status` answers fast.
    let cluster = TestCluster::start_with(
        3,
        &["--phi-threshold", "1000000", "--rpc-timeout-ms", "300"],
    )
    .await;
    let key = "cli-frozen";
    let replicas = cluster.client().await.replicas_of(key);
    let first = cluster.index_of(&replicas[0]);
    // Seeds without the frozen node, so learning the cluster does not wait.
    let seeds = replicas[1..].join(",");
    let _frozen = cluster.pause_until_dropped(first);

    let put = Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
        .args(["--nodes", &seeds, "--timeout-ms", "1000", "PUT", key, "x"])
        .output()
        .expect("run DKVSClient");
    let stderr = text(&put.stderr);
    assert_eq!(put.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("may or may not have been applied") && stderr.contains(&replicas[0]),
        "{stderr}"
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
        .args(["--nodes", &seeds, "--timeout-ms", "1000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn DKVSClient");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("PUT {key} y\nPUT {key} z\nGET {key}\n").as_bytes())
        .expect("write commands");
    let output = child.wait_with_output().expect("client exits at EOF");
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("may or may not have been applied"),
        "{stderr}"
    );
    assert_eq!(stdout.matches("OK").count(), 1, "{stdout}");
    assert!(stdout.ends_with("z\n"), "{stdout}");
}

/// Runs `DKVSClient` with `args` and returns its output and how long the
/// process took, start to exit.
fn timed_client(seeds: &str, args: &[&str]) -> (Output, std::time::Duration) {
    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
        .args(["--nodes", seeds])
        .args(args)
        .output()
        .expect("run DKVSClient");
    (output, started.elapsed())
}

/// With one node frozen (SIGSTOP: its sockets accept but nothing answers),
/// `status`, `GET` and `PUT` each finish in under 300 ms, both before the
/// failure detector convicts it and after, even with the frozen node named
/// first among the seeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_does_not_slow_the_command_line() {
    const LIMIT: std::time::Duration = std::time::Duration::from_millis(300);
    let cluster = TestCluster::start(5).await;
    let frozen = 2;
    let frozen_address = cluster.addresses()[frozen].clone();
    let ring = cluster.client().await;
    // A key the frozen node coordinates (first replica), and one it only
    // replicates.
    let key_where = |position: usize| {
        (0..)
            .map(|i| format!("frozen-{position}-{i}"))
            .find(|k| ring.replicas_of(k)[position] == frozen_address)
            .expect("some key")
    };
    let (first_of, second_of) = (key_where(0), key_where(1));
    for key in [&first_of, &second_of] {
        let (put, _) = timed_client(&cluster.addresses().join(","), &["PUT", key, "before"]);
        assert_eq!(put.status.code(), Some(0), "{}", text(&put.stderr));
    }
    let mut seeds = vec![frozen_address.clone()];
    seeds.extend(
        cluster
            .addresses()
            .into_iter()
            .filter(|a| *a != frozen_address),
    );
    let seeds = seeds.join(",");
    ring.close().await;

    let _frozen = cluster.pause_until_dropped(frozen);
    // Each command is run twice and the faster run counts, so that one
    // hiccup of a shared machine does not fail the test.
    let fastest = |args: &[&str]| {
        let (first, first_took) = timed_client(&seeds, args);
        let (second, second_took) = timed_client(&seeds, args);
        if first_took <= second_took {
            (first, first_took)
        } else {
            (second, second_took)
        }
    };
    let check = |phase: &str, what: &str, (output, took): (Output, std::time::Duration)| {
        eprintln!("{phase}: {what} took {took:?}");
        assert_eq!(
            output.status.code(),
            Some(0),
            "{phase}: {what}: {}",
            text(&output.stderr)
        );
        assert!(
            took < LIMIT,
            "{phase}: {what} took {took:?}: {}",
            text(&output.stderr)
        );
        output
    };

    // Right after the freeze: the detector has not convicted it yet.
    let phase = "before conviction";
    let status = check(phase, "status", fastest(&["status"]));
    assert!(text(&status.stdout).contains(&frozen_address));
    let got = check(phase, "GET", fastest(&["GET", &first_of]));
    assert_eq!(text(&got.stdout), "before");
    check(phase, "PUT", fastest(&["PUT", &second_of, "during"]));

    // Once convicted, even a key the frozen node coordinates is written
    // through another replica.
    cluster
        .wait_member_state(
            0,
            frozen,
            pb::MemberState::Down,
            std::time::Duration::from_secs(10),
        )
        .await;
    let phase = "after conviction";
    let status = check(phase, "status", fastest(&["status"]));
    assert!(
        text(&status.stdout).contains("DOWN"),
        "{}",
        text(&status.stdout)
    );
    let got = check(phase, "GET", fastest(&["GET", &second_of]));
    assert_eq!(text(&got.stdout), "during");
    check(phase, "PUT", fastest(&["PUT", &first_of, "after"]));
    let got = check(phase, "GET", fastest(&["GET", &first_of]));
    assert_eq!(text(&got.stdout), "after");
}

/// When every node is silent the command times out: exit 4, like any other
/// timeout, not 3 (unavailable: refused connections, quorum not reached).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_never_answers_is_a_timeout() {
    let cluster = TestCluster::start(2).await;
    let _first = cluster.pause_until_dropped(0);
    let _second = cluster.pause_until_dropped(1);
    let seeds = cluster.addresses().join(",");
    for args in [&["GET", "k"][..], &["PUT", "k", "v"], &["status"]] {
        let (output, _) = timed_client(&seeds, &[&["--timeout-ms", "300"][..], args].concat());
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(4), "{args:?}: {stderr}");
        assert!(stderr.contains("no answer within 300 ms"), "{stderr}");
    }
}

/// The keys a `check` run used, from its first line: `check-RUN-key-`.
fn check_prefix(stdout: &str) -> String {
    let start = stdout.find("(check-").expect("the keys are named") + 1;
    let end = start + stdout[start..].find("key-").expect("key-") + "key-".len();
    stdout[start..end].to_string()
}

/// `DKVSClient check` on a healthy cluster: the verdict holds, exit 0, and
/// the run's keys are deleted afterwards. A second run with the same seed
/// (the same values) uses keys of its own, so it does not mistake the first
/// run's values for invented ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_holds_on_a_healthy_cluster() {
    let cluster = TestCluster::start(3).await;
    let check = client(
        &cluster,
        &[
            "check",
            "--duration",
            "3",
            "--keys",
            "8",
            "--workers",
            "3",
            "--seed",
            "42",
        ],
    );
    let (stdout, stderr) = (text(&check.stdout), text(&check.stderr));
    assert_eq!(check.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("checking 3 members at QUORUM: 3 workers on 8 keys (check-"),
        "{stdout}"
    );
    assert!(stdout.contains("seed 42 (--seed 42 repeats"), "{stdout}");
    let operations: usize = stdout
        .split("operations: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("an operations line");
    assert!(operations > 100, "{stdout}");
    assert!(stdout.contains("availability: 100.00%"), "{stdout}");
    assert!(
        stdout.contains("final reads at ALL: 8 of 8 keys"),
        "{stdout}"
    );
    assert!(stdout.contains("\nviolations: 0\n"), "{stdout}");
    assert!(stdout.contains("verdict: the history holds"), "{stdout}");
    // Not a terminal: no progress bar drawn on stderr.
    assert!(!stderr.contains('\r'), "{stderr}");
    let prefix = check_prefix(&stdout);
    for k in 0..8 {
        let get = client(&cluster, &["GET", &format!("{prefix}{k}")]);
        assert_eq!(get.status.code(), Some(1), "{prefix}{k} is still there");
    }

    let again = client(&cluster, &["check", "--duration", "1", "--seed", "42"]);
    let stdout = text(&again.stdout);
    assert_eq!(
        again.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&again.stderr)
    );
    assert_ne!(check_prefix(&stdout), prefix, "{stdout}");
}

/// The final reads at ALL need every replica: with a node down they wait
/// (`--final-wait`), then give up with the exit code of their error (3);
/// when the node comes back while they wait, the run ends with a verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_waits_for_every_replica_before_its_final_reads() {
    let mut cluster = TestCluster::start(3).await;
    cluster.kill(2);
    let seeds = cluster.addresses()[..2].join(",");
    let args = [
        "--nodes",
        &seeds,
        "check",
        "--duration",
        "1",
        "--keys",
        "4",
        "--workers",
        "2",
    ];
    let gave_up = Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
        .args(args)
        .args(["--final-wait", "1"])
        .output()
        .expect("run DKVSClient");
    let (stdout, stderr) = (text(&gave_up.stdout), text(&gave_up.stderr));
    assert_eq!(gave_up.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("the final reads at ALL need every replica of each key: waiting up to 1 s"),
        "{stderr}"
    );
    assert!(stderr.contains("gave up on the final reads"), "{stderr}");
    assert!(
        stdout.contains("final reads at ALL: 0 of 4 keys; gave up: "),
        "{stdout}"
    );
    assert!(stdout.contains("lost writes are not checked"), "{stdout}");

    // Again, and the node comes back once the final reads are waiting.
    let mut child = Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn DKVSClient");
    let stderr = child.stderr.take().expect("stderr");
    let (waiting_tx, waiting) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("waiting up to") {
                let _ = waiting_tx.send(());
            }
            lines.push(line);
        }
        lines.join("\n")
    });
    tokio::task::spawn_blocking(move || waiting.recv_timeout(std::time::Duration::from_secs(60)))
        .await
        .expect("join")
        .expect("the final reads wait for the node that is down");
    cluster.restart(2).await;
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("DKVSClient exits");
    let stderr = reader.join().expect("stderr reader");
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("every replica answered after"), "{stderr}");
    assert!(
        stdout.contains("final reads at ALL: 4 of 4 keys"),
        "{stdout}"
    );
    assert!(stdout.contains("verdict: the history holds"), "{stdout}");
}

/// Storage that acknowledges every record write and keeps none: a cluster
/// that loses acknowledged writes, for `check` to catch.
struct ForgetfulStorage(dkvs::storage::MemoryStorage);

impl dkvs::storage::Storage for ForgetfulStorage {
    fn get(&self, key: &[u8]) -> dkvs::Result<Option<dkvs::record::Record>> {
        self.0.get(key)
    }
    fn put(&self, _key: &[u8], _record: &dkvs::record::Record) -> dkvs::Result<()> {
        Ok(())
    }
    fn flush(&self) -> dkvs::Result<()> {
        self.0.flush()
    }
    fn for_each(
        &self,
        visit: &mut dyn FnMut(&[u8], &dkvs::record::Record),
        corrupt: &mut dyn FnMut(&[u8], String),
    ) -> dkvs::Result<()> {
        self.0.for_each(visit, corrupt)
    }
    fn scan(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &dkvs::record::Record),
    ) -> dkvs::Result<()> {
        self.0.scan(from, to, visit)
    }
    fn delete(&self, key: &[u8]) -> dkvs::Result<()> {
        self.0.delete(key)
    }
    fn get_meta(&self, name: &str) -> dkvs::Result<Option<u64>> {
        self.0.get_meta(name)
    }
    fn put_meta_durable(&self, name: &str, value: u64) -> dkvs::Result<()> {
        self.0.put_meta_durable(name, value)
    }
    fn sync(&self) -> dkvs::Result<()> {
        self.0.sync()
    }
    fn put_hint(&self, id: &[u8], bytes: &[u8]) -> dkvs::Result<()> {
        self.0.put_hint(id, bytes)
    }
    fn delete_hint(&self, id: &[u8]) -> dkvs::Result<()> {
        self.0.delete_hint(id)
    }
    fn hints(&self, prefix: &[u8], limit: usize) -> dkvs::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.0.hints(prefix, limit)
    }
}

/// `check` can fail: against three nodes (hosted in this process) whose
/// storage forgets every write, it reports the lost writes with the
/// operations involved and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_the_lost_writes_of_a_cluster_that_forgets() {
    use dkvs::config::ServerConfig;
    use dkvs::node::{Node, serve};
    use std::sync::Arc;

    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind port 0"),
        );
    }
    let addresses: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").to_string())
        .collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut nodes = Vec::new();
    for (listener, address) in listeners.into_iter().zip(&addresses) {
        let config = ServerConfig::from_arg_list(vec![
            "DKVSServer".into(),
            "--listen".into(),
            address.clone(),
            "--peers".into(),
            addresses.join(","),
        ])
        .expect("config");
        let storage = ForgetfulStorage(dkvs::storage::MemoryStorage::new());
        let node = Node::with_storage(
            config,
            Arc::new(storage),
            Arc::new(dkvs::net::TcpDialer::default()),
        )
        .expect("node");
        let mut stopped = stopped.clone();
        nodes.push(tokio::spawn(serve(
            node,
            dkvs::node::incoming(listener),
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
        )));
    }

    // Clients are served once the nodes agree on their cluster id.
    for address in &addresses {
        eventually(std::time::Duration::from_secs(30), async || {
            if common::health_serving(address).await {
                Ok(())
            } else {
                Err(format!("{address} not SERVING"))
            }
        })
        .await;
    }
    let seeds = addresses.join(",");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
            .args(["--nodes", &seeds, "check", "--duration", "1", "--keys", "4"])
            .output()
    })
    .await
    .expect("join")
    .expect("run DKVSClient");
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("final reads at ALL: 4 of 4 keys"),
        "{stdout}"
    );
    let violations = stdout
        .lines()
        .find(|l| l.starts_with("violations: "))
        .expect("a violations line");
    assert!(violations.contains("lost write"), "{violations}");
    // Each violation, then each operation involved on a line of its own.
    assert!(stdout.contains("\n1. "), "{stdout}");
    assert!(stdout.contains("\n     #"), "{stdout}");
    assert!(
        stdout.contains("verdict: the history does NOT hold"),
        "{stdout}"
    );
    assert!(stderr.contains("kept for inspection"), "{stderr}");
    let _ = stop.send(true);
    for node in nodes {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), node).await;
    }
}

/// The whitespace-separated words of `table`'s row for `address`, if any.
fn row_of(table: &str, address: &str) -> Option<Vec<String>> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(address))
        .map(|l| l.split_whitespace().map(String::from).collect())
}

/// `cluster wait` on a settled cluster exits 0 at once. A join that never
/// finishes (Membership.Join for an address where nothing listens: it stays
/// JOINING) keeps it waiting: with `--timeout-secs 1` it gives up after
/// about a second, says what it waited for, and exits 3; `status` shows
/// the change and the joining member, which serves no layout yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_wait_exits_0_when_settled_and_3_while_a_join_never_finishes() {
    let cluster = TestCluster::start(3).await;
    let seeds = cluster.addresses().join(",");
    let (settled, took) = timed_client(&seeds, &["cluster", "wait", "--timeout-secs", "30"]);
    let stdout = text(&settled.stdout);
    assert_eq!(
        settled.status.code(),
        Some(0),
        "{stdout}{}",
        text(&settled.stderr)
    );
    assert!(
        stdout
            .starts_with("settled: layout v2 (instances named), served by all 3 members (waited "),
        "{stdout}"
    );
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");

    let ghost = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        listener.local_addr().expect("local addr").to_string()
    };
    let layout = cluster
        .membership(0)
        .await
        .join(pb::JoinRequest {
            address: ghost.clone(),
            ..Default::default()
        })
        .await
        .expect("Membership.Join")
        .into_inner();
    assert_eq!(layout.version, 3);

    let (stuck, took) = timed_client(&seeds, &["cluster", "wait", "--timeout-secs", "1"]);
    let (stdout, stderr) = (text(&stuck.stdout), text(&stuck.stderr));
    assert_eq!(stuck.status.code(), Some(3), "{stdout}{stderr}");
    assert!(
        stdout.starts_with(&format!(
            "not settled after 1 s (--timeout-secs): layout v3, change in progress: {ghost} joins"
        )),
        "{stdout}"
    );
    // Not a terminal: a progress line, no redrawn bar.
    assert!(
        stderr.starts_with("cluster wait: 0 s: layout v3, change in progress"),
        "{stderr}"
    );
    assert!(!stderr.contains('\r'), "{stderr}");
    assert!(
        took >= std::time::Duration::from_secs(1) && took < std::time::Duration::from_secs(5),
        "gave up after {took:?}"
    );

    let status = client(&cluster, &["status"]);
    let table = text(&status.stdout);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
    assert!(
        table.contains(&format!(
            "\nLayout v3, change in progress: {ghost} joins (streaming its ranges;"
        )),
        "{table}"
    );
    let row = row_of(&table, &ghost).unwrap_or_else(|| panic!("no row for {ghost}:\n{table}"));
    // Reachable joining members show JOINING; this one never answers.
    assert!(["JOINING", "DOWN"].contains(&row[2].as_str()), "{table}");
    assert_eq!(row[10], "-", "it never answered a heartbeat: {table}");
    for address in cluster.addresses() {
        let row = row_of(&table, &address).expect("a row per member");
        assert_eq!((row[2].as_str(), row[10].as_str()), ("UP", "v3"), "{table}");
    }
}

/// While a node joins (slowed by --stream-rate, with keys to copy),
/// `status` shows the change, the member JOINING, and a row of data moving
/// with keys moved, estimates and percent done; `cluster wait` returns 0
/// once the move settled (layout v5: joins, finished joining, move
/// settled, after v2 named the instances), and `status` then shows every
/// member UP on v5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_join_in_progress_and_cluster_wait_returns_once_it_settled() {
    let mut cluster = TestCluster::start(3).await;
    let writer = cluster.client().await;
    for i in 0..300 {
        writer
            .put(&format!("join-{i}"), format!("value {i}"))
            .await
            .expect("put");
    }
    writer.close().await;
    let started = std::time::Instant::now();
    let joiner = cluster.join(0, &["--stream-rate", "25"]).await;
    let joiner_address = cluster.nodes[joiner].address.clone();
    let seeds = cluster.addresses()[..3].join(",");

    let table = eventually(std::time::Duration::from_secs(20), async || {
        let (status, _) = timed_client(&seeds, &["status"]);
        let table = text(&status.stdout);
        let moving = table
            .lines()
            .skip_while(|l| !l.starts_with("Data moving to joining nodes"))
            .find(|l| l.starts_with(&joiner_address))
            .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>());
        match (row_of(&table, &joiner_address), moving) {
            (Some(row), Some(moving)) if row[2] == "JOINING" && moving[2] != "0" => Ok(table),
            _ => Err(format!("no join with keys moved yet:\n{table}")),
        }
    })
    .await;
    eprintln!(
        "status during the join ({:.1} s after it began):\n{table}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        table.contains(&format!(
            "\nLayout v3, change in progress: {joiner_address} joins (streaming its ranges;"
        )),
        "{table}"
    );
    let header: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("JOINING "))
        .expect("the header of the moving data")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "JOINING", "DONE", "KEYS", "MOVED", "BYTES", "MOVED", "KEYS", "LEFT", "BYTES", "LEFT",
            "TIME", "LEFT", "NOTE"
        ],
        "{table}"
    );
    let moving: Vec<&str> = table
        .lines()
        .rev()
        .find(|l| l.starts_with(&joiner_address))
        .expect("a moving row")
        .split_whitespace()
        .collect();
    // Address, done, keys moved, bytes moved (2 words), keys left, bytes
    // left (2 words), time left.
    assert!(moving[1].ends_with('%'), "{table}");
    assert!(moving[2].parse::<u64>().is_ok_and(|n| n > 0), "{table}");
    assert!(moving[5].starts_with('~') || moving[5] == "?", "{table}");
    for address in &cluster.addresses()[..3] {
        let row = row_of(&table, address).expect("a row per member");
        assert_eq!((row[2].as_str(), row[10].as_str()), ("UP", "v3"), "{table}");
    }

    let (waited, took) = timed_client(&seeds, &["cluster", "wait", "--timeout-secs", "120"]);
    let (stdout, stderr) = (text(&waited.stdout), text(&waited.stderr));
    eprintln!(
        "cluster wait took {took:?} ({:.1} s after the join began):\n{stderr}{stdout}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(waited.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("settled: layout v5 (move settled), served by all 4 members (waited "),
        "{stdout}"
    );
    assert!(
        stderr.starts_with("cluster wait: 0 s: layout v"),
        "it said what it waited for: {stderr}"
    );

    // Each member's LAYOUT comes from its heartbeats: v5 within a beat or two.
    let table = eventually(std::time::Duration::from_secs(10), async || {
        let (status, _) = timed_client(&seeds, &["status"]);
        let table = text(&status.stdout);
        let all_v5 = cluster.addresses().iter().all(|address| {
            row_of(&table, address).is_some_and(|row| row[2] == "UP" && row[10] == "v5")
        });
        if all_v5 {
            Ok(table)
        } else {
            Err(format!("not every member UP on v5:\n{table}"))
        }
    })
    .await;
    assert!(
        table.contains("\nLayout v5, no change in progress (last change: move settled)\n"),
        "{table}"
    );
    assert!(!table.contains("Data moving"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_takes_a_binary_value_from_stdin_or_a_file() {
    use std::io::Write;
    let cluster = TestCluster::start(3).await;
    let value: Vec<u8> = (0..70_000u32).map(|i| (i % 256) as u8).collect();

    // PUT k - : stdin, byte for byte (NULs, newlines and all).
    let mut put = Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
        .arg("--nodes")
        .arg(cluster.addresses().join(","))
        .args(["PUT", "from-stdin", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run DKVSClient");
    put.stdin
        .take()
        .expect("stdin")
        .write_all(&value)
        .expect("feed stdin");
    let put = put.wait_with_output().expect("DKVSClient ran");
    assert_eq!(put.status.code(), Some(0), "{}", text(&put.stderr));

    // PUT k --file F.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("value.bin");
    std::fs::write(&file, &value[..1000]).expect("write value");
    let file = file.display().to_string();
    let put = client(&cluster, &["PUT", "from-file", "--file", &file]);
    assert_eq!(put.status.code(), Some(0), "{}", text(&put.stderr));

    let smart = cluster.client().await;
    let read = smart.get("from-stdin").await.expect("GET").expect("found");
    assert!(read.as_ref() == value.as_slice(), "stdin value changed");
    let read = smart.get("from-file").await.expect("GET").expect("found");
    assert!(read.as_ref() == &value[..1000], "file value changed");

    // A missing file is a usage error naming the flag, and nothing is
    // written.
    let missing = client(&cluster, &["PUT", "k", "--file", "/nonexistent/dkvs"]);
    assert_eq!(missing.status.code(), Some(2), "{}", text(&missing.stderr));
    assert!(
        text(&missing.stderr).contains("--file"),
        "{}",
        text(&missing.stderr)
    );
    assert_eq!(client(&cluster, &["GET", "k"]).status.code(), Some(1));

    // GET into a pipe writes the stored bytes and nothing else: the value
    // round-trips through a file byte for byte.
    let got = client(&cluster, &["GET", "from-stdin"]);
    assert_eq!(got.status.code(), Some(0), "{}", text(&got.stderr));
    assert!(got.stdout == value, "GET added or changed bytes");
}

/// `--output json` for GET (binary-safe), replicas and status; shell
/// completions; `status --watch` redrawing in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_completions_and_a_watched_status() {
    let cluster = TestCluster::start(3).await;
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let output = client(&cluster, &all);
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: {e}: {}{}",
                text(&output.stdout),
                text(&output.stderr)
            )
        })
    };
    assert!(client(&cluster, &["PUT", "text", "héllo"]).status.success());
    let binary = std::env::temp_dir().join(format!("dkvs-cli-{}.bin", std::process::id()));
    std::fs::write(&binary, [0xff, 0x00, 0xfe]).expect("write");
    let put = client(
        &cluster,
        &["PUT", "binary", "--file", &binary.display().to_string()],
    );
    let _ = std::fs::remove_file(&binary);
    assert!(put.status.success(), "{}", text(&put.stderr));

    let got = json(&["GET", "text"]);
    assert_eq!(got["found"], true);
    assert_eq!(got["value"], "héllo");
    assert_eq!(got["value_base64"], "aMOpbGxv");
    assert!(got["version"].as_str().is_some_and(|v| v.contains('@')));
    let got = json(&["GET", "binary"]);
    assert_eq!(got["value_base64"], "/wD+");
    assert!(got.get("value").is_none(), "not UTF-8: no `value`: {got}");
    // A missing key: found false, and exit 1 still.
    let missing = client(&cluster, &["GET", "nope", "--output", "json"]);
    assert_eq!(missing.status.code(), Some(1));
    let missing: serde_json::Value = serde_json::from_slice(&missing.stdout).expect("JSON");
    assert_eq!(missing["found"], false);

    let replicas = json(&["replicas", "text"]);
    assert_eq!(replicas["replicas"].as_array().map(Vec::len), Some(3));
    let status = json(&["status"]);
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3));
    assert_eq!(status["replicas"], 3);

    // Completions need no cluster.
    for shell in ["bash", "zsh", "fish"] {
        let script = Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
            .args(["--nodes", "127.0.0.1:1", "completions", shell])
            .output()
            .expect("run DKVSClient");
        assert!(script.status.success(), "{shell}: {}", text(&script.stderr));
        let script = text(&script.stdout);
        assert!(
            script.contains("DKVSClient") && script.contains("list"),
            "{shell}"
        );
    }

    // status --watch redraws (home, clear) every interval until stopped.
    let mut watch = Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
        .args(["--nodes", &cluster.addresses().join(",")])
        .args(["status", "--watch", "--interval-secs", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run DKVSClient");
    let stdout = watch.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut lines = std::io::BufReader::new(stdout);
        let mut buffer = Vec::new();
        while lines.read_until(b'\n', &mut buffer).unwrap_or(0) > 0 {
            seen.extend_from_slice(&buffer);
            buffer.clear();
            if text(&seen).matches("\x1b[H\x1b[2J").count() >= 3 {
                break;
            }
        }
        seen
    });
    let seen = tokio::task::spawn_blocking(move || reader.join().expect("reader"))
        .await
        .expect("the reader task");
    let _ = watch.kill();
    let _ = watch.wait();
    let seen = text(&seen);
    assert!(seen.matches("\x1b[H\x1b[2J").count() >= 3, "{seen}");
    assert!(seen.contains("Ctrl-C stops"), "{seen}");
}
