//! `startServers.sh` run for real: against the debug binaries cargo built for
//! the tests (`DKVS_BIN_DIR`, so nothing is built in release), with its run and
//! data dirs in a temp dir and its ports below the OS's ephemeral range, so it
//! touches neither `./run` nor the ports other tests are given. Every node it
//! starts is stopped when the test ends, pass or fail.

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::script::Script;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Start 3, refuse 5, status, a stop that does not wait for each node in
/// turn, and status with nothing running.
#[test]
fn start_refuses_another_size_and_stop_is_parallel() {
    let script = Script::new();
    let none = script.run(&["status"]);
    assert!(
        text(&none.stdout).contains("no DKVS node is running"),
        "{}",
        text(&none.stdout)
    );

    let started = script.run(&["3"]);
    assert!(
        started.status.success(),
        "start 3 failed: {}{}",
        text(&started.stdout),
        text(&started.stderr)
    );
    assert!(text(&started.stdout).contains("DKVS cluster: 3 node(s)"));
    assert!((1..=3).all(|i| listening(script.port(i))));

    // Again with the same size: only the missing nodes, here none.
    let again = script.run(&["3"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(text(&again.stdout).matches("already running").count(), 3);

    // Another size would split the cluster onto two rings.
    let refused = script.run(&["5"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stdout));
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("a cluster of 3 node(s) is already running"),
        "{stderr}"
    );
    assert!(stderr.contains("./startServers.sh stop"), "{stderr}");
    assert!(stderr.contains("./startServers.sh add"), "{stderr}");
    assert!(!listening(script.port(4)) && !listening(script.port(5)));

    let status = script.run(&["status"]);
    let stdout = text(&status.stdout);
    assert_eq!(stdout.matches(" running, pid ").count(), 3, "{stdout}");
    assert!(stdout.contains("3 of 3 node(s) running"), "{stdout}");

    let began = Instant::now();
    let stopped = script.run(&["stop"]);
    let took = began.elapsed();
    assert!(
        text(&stopped.stdout).contains("stopped 3 node(s)"),
        "{}",
        text(&stopped.stdout)
    );
    assert!(took < Duration::from_secs(3), "stop took {took:?}");
    assert!((1..=3).all(|i| !listening(script.port(i))));
    assert!(script.pids().is_empty(), "pid files left behind");

    let status = script.run(&["status"]);
    assert!(text(&status.stdout).contains("no DKVS node is running"));
}

/// A node that exits while starting is reported at once with its log, and
/// the script exits 1; a port taken by another process is refused up front.
#[test]
fn a_node_that_cannot_start_is_reported_at_once() {
    let script = Script::new();
    let began = Instant::now();
    let failed = script.run_with_flags(&["2"], "--no-such-flag");
    let took = began.elapsed();
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed.stdout));
    let stderr = text(&failed.stderr);
    assert!(stderr.contains("exited while starting"), "{stderr}");
    assert!(
        stderr.contains("--no-such-flag"),
        "log tail missing: {stderr}"
    );
    assert!(
        stderr.contains("2 of 2 node(s) failed to start"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(5), "noticed only after {took:?}");

    let _taken = TcpListener::bind(("127.0.0.1", script.port(1))).expect("bind");
    let refused = script.run(&["1"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("already in use"), "{stderr}");
    assert!(script.pids().iter().all(|&pid| !alive(pid)));
}

fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A node killed but not yet reaped by its parent (a zombie: `kill -0` still
/// succeeds on it) counts as stopped: status says so, stop does not wait for
/// it, and start starts the node again.
#[test]
fn a_zombie_node_counts_as_stopped() {
    let script = Script::new();
    let port = script.port(1);
    std::fs::create_dir_all(script.run_dir()).expect("mkdir run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_DKVSServer"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--peers", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(script.dir.path().join("data").join(format!("node-{port}")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn DKVSServer");
    let pid = child.id();
    std::fs::write(
        script.run_dir().join(format!("node-{port}.pid")),
        format!("{pid}\n"),
    )
    .expect("write pid file");
    // This test process is its parent and does not reap it yet.
    child.kill().expect("kill");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(") ")
            .next()
            .is_some_and(|rest| rest.starts_with('Z'))
    }) {
        assert!(Instant::now() < deadline, "node never became a zombie");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(alive(pid), "kill -0 should still succeed on a zombie");

    let status = script.run(&["status"]);
    let stdout = text(&status.stdout);
    assert!(stdout.contains("has not reaped it"), "{stdout}");
    assert!(stdout.contains("no DKVS node is running"), "{stdout}");

    let started = script.run(&["1"]);
    assert!(
        started.status.success(),
        "{}{}",
        text(&started.stdout),
        text(&started.stderr)
    );
    assert!(!text(&started.stdout).contains("already running"));
    assert!(listening(port));
    let _ = child.wait();
}

/// `DKVSClient cluster wait` against the script's first node: its stdout,
/// once it exits 0.
fn settled(script: &Script) -> String {
    let output = Command::new(Script::bin_dir().join("DKVSClient"))
        .args(["--nodes", &format!("127.0.0.1:{}", script.port(1))])
        .args(["cluster", "wait", "--timeout-secs", "60"])
        .output()
        .expect("run DKVSClient");
    assert_eq!(
        output.status.code(),
        Some(0),
        "cluster wait: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// `add` needs a running cluster; then each `add` starts one node on the
/// next port that joins it (`--join` with the running nodes), waiting for
/// the change before it to end, and prints its restart command. Running
/// the script again finds every node running; `stop` stops the added
/// nodes too; a later start restarts them with the others (they are
/// members of the layout kept in the data).
#[test]
fn add_grows_the_running_cluster_and_stop_stops_the_added_nodes_too() {
    let script = Script::new();
    let refused = script.run(&["add"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stdout));
    assert!(
        text(&refused.stderr).contains("no DKVS cluster is running"),
        "{}",
        text(&refused.stderr)
    );

    let started = script.run(&["3"]);
    assert!(
        started.status.success(),
        "{}{}",
        text(&started.stdout),
        text(&started.stderr)
    );
    assert!(text(&started.stdout).contains("./startServers.sh add"));
    let seeds: Vec<String> = (1..=3)
        .map(|i| format!("127.0.0.1:{}", script.port(i)))
        .collect();

    let added = script.run(&["add"]);
    let stdout = text(&added.stdout);
    assert!(added.status.success(), "{stdout}{}", text(&added.stderr));
    let fourth = script.port(4);
    assert!(
        stdout.starts_with(&format!(
            "node-{fourth} joins the cluster (through {})",
            seeds.join(",")
        )),
        "{stdout}"
    );
    let restart = format!(
        "--listen 127.0.0.1:{fourth} --join {} --data-dir {}",
        seeds.join(","),
        script.data_dir().join(format!("node-{fourth}")).display()
    );
    assert!(stdout.contains(&restart), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "& echo $! > {}",
            script
                .run_dir()
                .join(format!("node-{fourth}.pid"))
                .display()
        )),
        "{stdout}"
    );
    assert!(listening(fourth));

    // At once: `add` waits for the change in progress (this join) itself.
    let again = script.run(&["add"]);
    let stdout = text(&again.stdout);
    assert!(again.status.success(), "{stdout}{}", text(&again.stderr));
    let fifth = script.port(5);
    assert!(
        stdout.starts_with(&format!("node-{fifth} joins")),
        "{stdout}"
    );
    let verdict = settled(&script);
    assert!(
        verdict.starts_with("settled: layout v8 (move settled), served by all 5 members"),
        "{verdict}"
    );

    let status = text(&script.run(&["status"]).stdout);
    assert!(status.contains("5 of 5 node(s) running"), "{status}");
    let again = script.run(&["3"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(
        text(&again.stdout).matches("already running").count(),
        5,
        "{}",
        text(&again.stdout)
    );

    let stopped = script.run(&["stop"]);
    assert!(
        text(&stopped.stdout).contains("stopped 5 node(s)"),
        "{}",
        text(&stopped.stdout)
    );
    assert!((1..=5).all(|i| !listening(script.port(i))));
    assert!(script.pids().is_empty(), "pid files left behind");

    let restarted = script.run(&["3"]);
    let stdout = text(&restarted.stdout);
    assert!(
        restarted.status.success(),
        "{stdout}{}",
        text(&restarted.stderr)
    );
    assert!(
        stdout.contains("DKVS cluster: 3 node(s) and 2 added with ./startServers.sh add"),
        "{stdout}"
    );
    assert!((1..=5).all(|i| listening(script.port(i))));
    let verdict = settled(&script);
    assert!(
        verdict.starts_with("settled: layout v8 (move settled), served by all 5 members"),
        "{verdict}"
    );
}

/// A fresh cluster gets a new random --cluster-token, kept in the run dir:
/// a restart on the same data reuses it, a start on wiped data dirs makes
/// another (a new cluster, which a node left from the old one cannot join).
#[test]
fn each_fresh_cluster_gets_its_own_token() {
    let script = Script::new();
    let token_file = script.run_dir().join("cluster-token");
    let token = || {
        std::fs::read_to_string(&token_file)
            .expect("run/cluster-token")
            .trim()
            .to_string()
    };
    let started = script.run(&["1"]);
    assert!(started.status.success(), "{}", text(&started.stderr));
    let first = token();
    assert!(
        first.len() == 16 && first.chars().all(|c| c.is_ascii_hexdigit()),
        "{first:?}"
    );
    assert!(
        text(&started.stdout).contains(&format!("--cluster-token {first}")),
        "{}",
        text(&started.stdout)
    );
    assert!(script.run(&["stop"]).status.success());
    let again = script.run(&["1"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(token(), first, "a restart reuses the token");
    assert!(script.run(&["stop"]).status.success());
    std::fs::remove_dir_all(script.data_dir()).expect("wipe the data");
    let fresh = script.run(&["1"]);
    assert!(fresh.status.success(), "{}", text(&fresh.stderr));
    assert_ne!(token(), first, "wiped data dirs make a new cluster");
    assert!(script.run(&["stop"]).status.success());
}

/// Runs the test build's `DKVSClient` against the first node of `script`'s
/// cluster with the CA of its secure dir and, when given, the token file
/// `<role>.token` from it; none of the caller's own DKVS_* settings.
fn secure_client(script: &Script, role: Option<&str>, args: &[&str]) -> std::process::Output {
    let secure = script.run_dir().join("secure");
    let mut command = Command::new(Script::bin_dir().join("DKVSClient"));
    command
        .env_remove("DKVS_TLS_CA")
        .env_remove("DKVS_TOKEN")
        .env_remove("DKVS_TOKEN_FILE")
        .env_remove("DKVS_NODES")
        .args(["--nodes", &format!("127.0.0.1:{}", script.port(1))])
        .arg("--tls-ca")
        .arg(secure.join("ca.pem"));
    if let Some(role) = role {
        command
            .arg("--token-file")
            .arg(secure.join(format!("{role}.token")));
    }
    command.args(args).output().expect("run DKVSClient")
}

/// `DKVSClient cluster wait` with the admin token, until it exits 0: the
/// nodes listen at once, and serve clients once they agree on the cluster.
fn settled_secure(script: &Script) {
    let wait = secure_client(
        script,
        Some("admin"),
        &["cluster", "wait", "--timeout-secs", "60"],
    );
    assert_eq!(
        wait.status.code(),
        Some(0),
        "cluster wait: {}{}",
        text(&wait.stdout),
        text(&wait.stderr)
    );
}

/// `--secure`: a CA, a certificate per node and a token per role under
/// run/secure; every node serves TLS and checks tokens (none refused with
/// UNAUTHENTICATED, too weak a role with PERMISSION_DENIED); the printed
/// commands name those files; `add` and a later plain start keep TLS, since
/// the data remembers it; `stop` stops it all.
#[test]
fn a_secure_cluster_serves_tls_and_tokens_and_stays_secure() {
    use std::os::unix::fs::PermissionsExt;
    let script = Script::new();
    let started = script.run(&["3", "--secure"]);
    let stdout = text(&started.stdout);
    assert!(
        started.status.success(),
        "start 3 --secure failed: {stdout}{}",
        text(&started.stderr)
    );
    let secure = script.run_dir().join("secure");
    for i in 1..=3 {
        let node = format!("node-127.0.0.1-{}", script.port(i));
        assert!(secure.join(format!("{node}.pem")).is_file(), "{node}");
        assert!(
            stdout.contains(&format!(
                "--tls-cert {}",
                secure.join(format!("{node}.pem")).display()
            )),
            "{stdout}"
        );
    }
    for role in ["read", "readwrite", "admin"] {
        let path = secure.join(format!("{role}.token"));
        let token = std::fs::read_to_string(&path).expect("token file");
        let token = token.trim();
        assert!(
            token.len() == 32 && token.chars().all(|c| c.is_ascii_hexdigit()),
            "{token:?}"
        );
        let mode = std::fs::metadata(&path)
            .expect("token")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{role}.token");
    }
    let ca = secure.join("ca.pem").display().to_string();
    assert!(
        stdout.contains(&format!(
            "DKVS_TLS_CA={ca} DKVS_TOKEN_FILE={}",
            secure.join("readwrite.token").display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("grpcurl --cacert {ca}")),
        "{stdout}"
    );
    assert!(!stdout.contains("-plaintext"), "{stdout}");

    settled_secure(&script);
    let put = secure_client(&script, Some("readwrite"), &["PUT", "k", "v"]);
    assert!(put.status.success(), "PUT: {}", text(&put.stderr));
    let get = secure_client(&script, Some("readwrite"), &["GET", "k"]);
    assert!(get.status.success(), "GET: {}", text(&get.stderr));
    assert_eq!(text(&get.stdout).trim(), "v");

    let anonymous = secure_client(&script, None, &["GET", "k"]);
    assert!(!anonymous.status.success(), "a GET without a token worked");
    let stderr = text(&anonymous.stderr).to_lowercase();
    assert!(
        stderr.contains("unauthenticated") || stderr.contains("requires a token"),
        "{stderr}"
    );
    let reader = secure_client(&script, Some("read"), &["PUT", "k", "w"]);
    assert!(!reader.status.success(), "a PUT with the read token worked");
    let stderr = text(&reader.stderr).to_lowercase();
    assert!(
        stderr.contains("permission denied") || stderr.contains("needs the readwrite role"),
        "{stderr}"
    );

    grpcurl_as_printed(&text(&started.stdout));

    // `add` signs the new node's certificate and starts it with TLS.
    let added = script.run(&["add"]);
    let stdout = text(&added.stdout);
    assert!(
        added.status.success(),
        "add: {stdout}{}",
        text(&added.stderr)
    );
    let fourth = format!("node-127.0.0.1-{}", script.port(4));
    assert!(secure.join(format!("{fourth}.pem")).is_file());
    assert!(
        stdout.contains(&format!(
            "--tls-cert {}",
            secure.join(format!("{fourth}.pem")).display()
        )),
        "{stdout}"
    );
    settled_secure(&script);
    let status = text(&script.run(&["status"]).stdout);
    assert!(status.contains("4 of 4 node(s) running"), "{status}");
    assert!(status.contains("secure"), "{status}");

    // Stopped and started again without --secure: still TLS (its data says
    // so), with the same CA and tokens.
    let stopped = script.run(&["stop"]);
    assert!(
        text(&stopped.stdout).contains("stopped 4 node(s)"),
        "{}",
        text(&stopped.stdout)
    );
    assert!((1..=4).all(|i| !listening(script.port(i))));
    assert!(script.pids().is_empty(), "pid files left behind");
    let again = script.run(&["3"]);
    let stdout = text(&again.stdout);
    assert!(again.status.success(), "{stdout}{}", text(&again.stderr));
    assert!(stdout.contains("--tls-ca"), "{stdout}");
    settled_secure(&script);
    let get = secure_client(&script, Some("read"), &["GET", "k"]);
    assert!(
        get.status.success(),
        "GET after restart: {}",
        text(&get.stderr)
    );
    assert_eq!(text(&get.stdout).trim(), "v");
    let stopped = script.run(&["stop"]);
    assert!(
        text(&stopped.stdout).contains("stopped 4 node(s)"),
        "{}",
        text(&stopped.stdout)
    );
    assert!(script.pids().is_empty(), "pid files left behind");
}

/// grpcurl, if this machine has it (CI installs it and sets
/// DKVS_REQUIRE_GRPCURL=1, which makes its absence a failure).
fn grpcurl() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("grpcurl"))
            .find(|path| path.is_file())
    });
    if found.is_none() && std::env::var_os("DKVS_REQUIRE_GRPCURL").is_some() {
        panic!("DKVS_REQUIRE_GRPCURL is set but grpcurl is not on PATH");
    }
    found
}

/// The grpcurl commands `--secure` printed work as printed: `list` without
/// a token, a Get with the readwrite token (the key `k` holds `v`).
fn grpcurl_as_printed(printed: &str) {
    let Some(grpcurl) = grpcurl() else {
        eprintln!("grpcurl not installed: its commands are not tried (CI tries them)");
        return;
    };
    let dir = grpcurl.parent().expect("a directory").to_path_buf();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let line = |needle: &str| {
        printed
            .lines()
            .map(str::trim)
            .find(|line| line.starts_with("grpcurl --cacert") && line.contains(needle))
            .unwrap_or_else(|| panic!("no grpcurl line with {needle:?} in:\n{printed}"))
            .to_string()
    };
    let run = |command: &str| {
        std::process::Command::new("bash")
            .arg("-c")
            .arg(command)
            .env("PATH", &path)
            .output()
            .expect("bash runs")
    };
    let list = run(&line(" list"));
    assert!(
        list.status.success() && text(&list.stdout).contains("dkvs.v1.KeyValue"),
        "{}{}",
        text(&list.stdout),
        text(&list.stderr)
    );
    let get = run(&line("KeyValue/Get").replace("mykey", "k"));
    let answer = text(&get.stdout);
    // Bytes come back base64-encoded in grpcurl's JSON: "v" is "dg==".
    assert!(
        get.status.success() && answer.contains("dg=="),
        "{answer}{}",
        text(&get.stderr)
    );
}

/// `--secure` over the data of a plaintext cluster, or `add --secure` to a
/// running plaintext one, says what to do and starts nothing.
#[test]
fn secure_over_a_plaintext_cluster_is_refused_with_what_to_do() {
    let script = Script::new();
    let started = script.run(&["1"]);
    assert!(started.status.success(), "{}", text(&started.stderr));
    let add = script.run(&["add", "--secure"]);
    assert_eq!(add.status.code(), Some(1), "{}", text(&add.stdout));
    assert!(
        text(&add.stderr).contains("the running cluster is plaintext"),
        "{}",
        text(&add.stderr)
    );
    assert!(!listening(script.port(2)));
    assert!(script.run(&["stop"]).status.success());

    let refused = script.run(&["1", "--secure"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stdout));
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("belongs to a plaintext cluster"),
        "{stderr}"
    );
    assert!(stderr.contains("./startServers.sh 1 --secure"), "{stderr}");
    assert!(!listening(script.port(1)));
    assert!(!script.run_dir().join("secure").exists());
}

/// `DKVSClient` against the script's first node.
fn client(script: &Script, args: &[&str]) -> std::process::Output {
    Command::new(Script::bin_dir().join("DKVSClient"))
        .args(["--nodes", &format!("127.0.0.1:{}", script.port(1))])
        .args(args)
        .output()
        .expect("run DKVSClient")
}

/// A node that left (`cluster leave`) or was removed (`cluster remove`)
/// exits 0; the script then shows it gone, does not start it again and
/// does not count it as failed, and the rest of the cluster restarts as
/// before.
#[test]
fn nodes_that_left_or_were_removed_are_not_started_again() {
    let script = Script::new();
    let started = script.run(&["5"]);
    assert!(started.status.success(), "{}", text(&started.stderr));
    settled(&script);
    let (fourth, fifth) = (script.port(4), script.port(5));

    let leave = client(
        &script,
        &["cluster", "leave", &format!("127.0.0.1:{fifth}"), "--wait"],
    );
    assert_eq!(leave.status.code(), Some(0), "{}", text(&leave.stderr));
    let status = text(&script.run(&["status"]).stdout);
    assert!(
        status.contains(&format!("node-{fifth} gone: it left or was removed")),
        "{status}"
    );
    assert!(
        status.contains("4 of 4 node(s) running (1 gone: left or removed)"),
        "{status}"
    );

    // A dead node removed, then the script run again: the running members
    // list it as removed, so the script does not start it.
    // Its pid file (every node's command line names it in --peers).
    let pid: u32 = std::fs::read_to_string(script.run_dir().join(format!("node-{fourth}.pid")))
        .expect("the fourth node's pid file")
        .trim()
        .parse()
        .expect("a pid");
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    // Removed once the others believe it down (a bounded poll).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let remove = client(
            &script,
            &["cluster", "remove", &format!("127.0.0.1:{fourth}")],
        );
        if remove.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "{}", text(&remove.stderr));
        std::thread::sleep(Duration::from_millis(300));
    }
    settled(&script);
    let again = script.run(&["5"]);
    let stdout = text(&again.stdout);
    assert!(again.status.success(), "{stdout}{}", text(&again.stderr));
    // The running members list it as removed: it is not even started.
    assert!(
        stdout.contains(&format!(
            "node-{fourth} left or was removed from the cluster: not started"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "node-{fifth} left or was removed from the cluster: not started"
        )),
        "{stdout}"
    );

    let stopped = script.run(&["stop"]);
    assert!(
        text(&stopped.stdout).contains("stopped 3 node(s)"),
        "{}",
        text(&stopped.stdout)
    );
    let restarted = script.run(&["5"]);
    assert!(restarted.status.success(), "{}", text(&restarted.stderr));
    assert!(!listening(fourth) && !listening(fifth));
    let verdict = settled(&script);
    assert!(verdict.contains("served by all 3 members"), "{verdict}");
}
