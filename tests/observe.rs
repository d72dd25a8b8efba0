//! Seeing inside a running cluster as operators do (DESIGN "HTTP"): real
//! `DKVSServer` processes with `--http-listen`, scraped over HTTP, checked
//! with Prometheus's own `promtool check metrics`, their counters moving
//! with traffic; health for load balancers through a join; tokens and TLS
//! on the HTTP door; JSON logs that never name a key.
//!
//! promtool comes from Debian's `prometheus` package; `.ci/run` installs
//! it and sets DKVS_REQUIRE_PROMTOOL=1, so CI always runs it. Elsewhere a
//! missing promtool skips that one check, saying so.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::http::{self, Sample};
use common::{TestCluster, eventually};
use dkvs::pb;

/// Every sample of node `i`'s `/metrics`, after checking the answer is the
/// Prometheus text format: its content type, our own parse, and promtool's.
async fn scrape(cluster: &TestCluster, i: usize) -> Vec<Sample> {
    let address = cluster.http_address(i).expect("node serves HTTP");
    let answer = http::get(&address, "/metrics", &[])
        .await
        .expect("GET /metrics");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    promtool_check_metrics(&answer.body);
    http::samples(&answer.body).unwrap_or_else(|e| panic!("{e}\n{}", answer.body))
}

/// `promtool check metrics` on `text`: Prometheus's own parser and linter.
fn promtool_check_metrics(text: &str) {
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => {
            assert!(
                std::env::var_os("DKVS_REQUIRE_PROMTOOL").is_none(),
                "promtool is required (DKVS_REQUIRE_PROMTOOL) but cannot run: {error}"
            );
            eprintln!("promtool not found ({error}): skipping `promtool check metrics`");
            return;
        }
    };
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("promtool stdin");
        stdin.write_all(text.as_bytes()).expect("feed promtool");
    }
    let output = child.wait_with_output().expect("promtool ran");
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scraped ---\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The sum over every node of the samples named `name` with `labels`.
async fn cluster_sum(cluster: &TestCluster, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for i in 0..cluster.nodes.len() {
        total += http::sum(&scrape(cluster, i).await, name, labels);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_move_with_traffic_and_never_name_a_key() {
    let cluster = TestCluster::start_with_http(3, &["--log-format", "json"]).await;
    let requests = "dkvs_client_requests_total";
    let ok_puts = [("operation", "put"), ("code", "OK"), ("outcome", "applied")];
    let puts_before = cluster_sum(&cluster, requests, &ok_puts).await;
    let batches = [("call", "Replica/Batch")];
    let calls = "dkvs_peer_call_duration_seconds_count";
    let batches_before = cluster_sum(&cluster, calls, &batches).await;

    let client = cluster.client().await;
    let key = |i: usize| format!("observe-secret-key-{i}");
    for i in 0..40 {
        client.put(&key(i), b"v".to_vec()).await.expect("put");
    }
    for i in 0..10 {
        client.get(&key(i)).await.expect("get");
        client.delete(&key(30 + i)).await.expect("delete");
    }
    // A request refused before anything happened: counted with its code
    // and its outcome.
    let mut bad = pb::PutRequest {
        key: "k".into(),
        value: b"v".to_vec().into(),
        ..Default::default()
    };
    bad.consistency = 99;
    let refused = cluster.kv(0).await.put(bad).await;
    assert_eq!(
        refused.expect_err("refused").code(),
        tonic::Code::InvalidArgument
    );

    // The smart client sends each key's writes to its first replica: every
    // write is counted once, by the node that answered it. (A node reuses
    // a scrape for a second: poll until the counts are past the traffic.)
    eventually(Duration::from_secs(10), async || {
        match cluster_sum(&cluster, requests, &ok_puts).await - puts_before {
            40.0 => Ok(()),
            other => Err(format!("{other} puts counted, not 40")),
        }
    })
    .await;
    let deletes = [
        ("operation", "delete"),
        ("code", "OK"),
        ("outcome", "applied"),
    ];
    assert_eq!(cluster_sum(&cluster, requests, &deletes).await, 10.0);
    let replica_reads = [("operation", "replica_read"), ("code", "OK")];
    assert!(cluster_sum(&cluster, requests, &replica_reads).await >= 10.0);
    let invalid = [
        ("operation", "put"),
        ("consistency", "invalid"),
        ("code", "INVALID_ARGUMENT"),
        ("outcome", "not_applied"),
    ];
    assert_eq!(
        http::sum(&scrape(&cluster, 0).await, requests, &invalid),
        1.0
    );
    let durations = [("operation", "put")];
    let duration_count = "dkvs_client_request_duration_seconds_count";
    assert!(cluster_sum(&cluster, duration_count, &durations).await >= 41.0);
    // Writes reach the other replicas in batches, each call timed per peer.
    assert!(cluster_sum(&cluster, calls, &batches).await > batches_before);

    // What the node keeps: live keys (30 values on 3 replicas each), its
    // peers up, nothing below quorum, the process.
    eventually(Duration::from_secs(10), async || {
        match cluster_sum(&cluster, "dkvs_live_keys", &[]).await {
            90.0 => Ok(()),
            other => Err(format!("{other} live keys on the nodes, not 90")),
        }
    })
    .await;
    let node0 = scrape(&cluster, 0).await;
    assert_eq!(http::sum(&node0, "dkvs_peer_up", &[]), 2.0);
    assert_eq!(http::sum(&node0, "dkvs_ranges_below_quorum", &[]), 0.0);
    assert_eq!(http::sum(&node0, "dkvs_ready", &[]), 1.0);
    assert!(http::sum(&node0, "dkvs_layout_version", &[]) >= 1.0);
    assert!(http::sum(&node0, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(http::sum(&node0, "dkvs_disk_size_bytes", &[]) > 0.0);
    let workers = node0
        .iter()
        .filter(|s| s.name == "dkvs_worker_rounds_total");
    assert!(workers.count() >= 4, "every periodic worker is listed");

    // A node that goes down: its peers see it and the ranges it holds lose
    // a replica (still a quorum of 2 out of 3).
    let mut cluster = cluster;
    cluster.kill(2);
    let down = cluster.addresses()[2].clone();
    eventually(Duration::from_secs(20), async || {
        let node0 = scrape(&cluster, 0).await;
        match http::sum(&node0, "dkvs_peer_up", &[("peer", &down)]) {
            0.0 => Ok(()),
            up => Err(format!("{down} still up ({up}) in node 0's metrics")),
        }
    })
    .await;

    // No key in the metrics, and none in the logs (the nodes log at debug:
    // keys appear as hashes), which are JSON lines naming their node.
    let text = http::get(&cluster.http_address(0).expect("http"), "/metrics", &[])
        .await
        .expect("scrape")
        .body;
    assert!(!text.contains("observe-secret-key"), "a key in the metrics");
    for i in 0..3 {
        let log = cluster.log_of(i);
        assert!(
            !log.contains("observe-secret-key"),
            "a key in node {i}'s log"
        );
        let mut lines = 0;
        for line in log.lines().filter(|l| l.starts_with('{')) {
            let parsed: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(parsed["node"], cluster.addresses()[i].as_str(), "{line}");
            assert!(
                parsed["level"].is_string() && parsed["message"].is_string(),
                "{line}"
            );
            lines += 1;
        }
        assert!(lines > 5, "node {i} logged JSON lines");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_open_live_and_ready_says_why_not_while_a_node_joins() {
    let mut cluster = TestCluster::start_with_http(3, &[]).await;
    let http0 = cluster.http_address(0).expect("http");
    let live = http::get(&http0, "/health/live", &[]).await.expect("live");
    assert_eq!((live.status, live.body.as_str()), (200, "live\n"));
    let ready = http::get(&http0, "/health/ready?verbose", &[])
        .await
        .expect("ready");
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert!(
        ready.body.starts_with("ready\n") && ready.body.contains("\n[+] started ok\n"),
        "{}",
        ready.body
    );
    let missing = http::get(&http0, "/nothing", &[]).await.expect("404");
    assert_eq!(missing.status, 404);

    // Give the joiner something to copy, slowly, so that it is seen
    // joining: not ready, saying why, then ready once it holds its ranges.
    let client = cluster.client().await;
    common::preload(&client, 600).await;
    let joiner_http = common::free_address();
    let joiner = cluster.spawn_joiner(
        0,
        common::free_address(),
        &["--http-listen", &joiner_http, "--stream-rate", "300"],
    );
    let mut saw = Vec::new();
    let ready = eventually(Duration::from_secs(90), async || {
        let answer = http::get(&joiner_http, "/health/ready?verbose", &[]).await?;
        if answer.status == 200 {
            return Ok(answer);
        }
        assert_eq!(answer.status, 503, "{}", answer.body);
        let reason = answer.body.lines().next().unwrap_or_default().to_string();
        if !saw.contains(&reason) {
            saw.push(reason);
        }
        Err(format!("not ready: {}", answer.body))
    })
    .await;
    assert!(ready.body.starts_with("ready\n"), "{}", ready.body);
    assert!(
        saw.iter()
            .any(|r| r.starts_with("not ready: joining: receiving its ranges")),
        "the joiner said it was receiving its ranges while it did; it said {saw:?}"
    );
    assert!(cluster.exited(joiner).is_none_or(|s| s.success()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_a_token_when_tokens_are_on_and_health_stays_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "read-token read\nrw-token readwrite\n").expect("auth file");
    let tokens = tokens.display().to_string();
    let cluster =
        TestCluster::start_with_http(1, &["--auth-file", &tokens, "--insecure-plaintext-auth"])
            .await;
    let address = cluster.http_address(0).expect("http");
    let refused = http::get(&address, "/metrics", &[]).await.expect("answer");
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
    assert!(
        refused.body.contains("Authorization: Bearer"),
        "{}",
        refused.body
    );
    let unknown = [("Authorization", "Bearer nobody")];
    assert_eq!(
        http::get(&address, "/metrics", &unknown)
            .await
            .expect("answer")
            .status,
        401
    );
    for token in ["read-token", "rw-token"] {
        let bearer = format!("Bearer {token}");
        let answer = http::get(&address, "/metrics", &[("Authorization", &bearer)])
            .await
            .expect("answer");
        assert_eq!(answer.status, 200, "{token}: {}", answer.body);
        assert!(answer.body.contains("dkvs_build_info"));
    }
    for path in ["/health/live", "/health/ready"] {
        assert_eq!(
            http::get(&address, path, &[]).await.expect(path).status,
            200,
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_door_speaks_tls_when_the_node_does() {
    let pki = tempfile::tempdir().expect("tempdir");
    let root = pki.path().to_path_buf();
    std::fs::write(root.join("tokens"), "read-token read\n").expect("auth file");
    let access = common::TlsAccess {
        ca: root.join("ca.pem"),
        token: "read-token".into(),
    };
    let http_address = common::free_address();
    let cluster = TestCluster::start_secured(1, access, |_, addresses| {
        let output = Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
            .args(["certs", "--dir"])
            .arg(&root)
            .args(["--node", &addresses[0]])
            .output()
            .expect("DKVSClient certs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let name = format!("node-{}", addresses[0].replace(':', "-"));
        let file = |suffix: &str| root.join(format!("{name}{suffix}")).display().to_string();
        vec![vec![
            "--tls-cert".into(),
            file(".pem"),
            "--tls-key".into(),
            file("-key.pem"),
            "--tls-ca".into(),
            root.join("ca.pem").display().to_string(),
            "--auth-file".into(),
            root.join("tokens").display().to_string(),
            "--http-listen".into(),
            http_address.clone(),
        ]]
    })
    .await;
    let ca = pki.path().join("ca.pem");
    let ready = http::get_tls(&ca, &http_address, "/health/ready", &[])
        .await
        .expect("https");
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    let bearer = [("Authorization", "Bearer read-token")];
    let metrics = http::get_tls(&ca, &http_address, "/metrics", &bearer)
        .await
        .expect("https");
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    // Plain HTTP on the TLS door gets nothing.
    assert!(
        http::get(&http_address, "/health/live", &[])
            .await
            .is_err_and(|e| !e.is_empty())
            || http::get(&http_address, "/health/live", &[])
                .await
                .is_ok_and(|a| a.status != 200)
    );
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_door_opens_before_the_node_and_bounds_connections_per_host() {
    // A node that cannot join (its seed is down) keeps retrying: its door
    // is open meanwhile, live but not ready.
    let dir = tempfile::tempdir().expect("tempdir");
    let http_address = common::free_address();
    let log = std::fs::File::create(dir.path().join("node.log")).expect("log");
    let node = Command::new(env!("CARGO_BIN_EXE_DKVSServer"))
        .args([
            "--listen",
            &common::free_address(),
            "--join",
            &common::free_address(),
        ])
        .args(["--http-listen", &http_address, "--data-dir"])
        .arg(dir.path().join("data"))
        .env("DKVS_JOIN_RETRY_SECS", "60")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start DKVSServer");
    let _node = KillOnDrop(node);
    let live = eventually(Duration::from_secs(20), async || {
        http::get(&http_address, "/health/live", &[]).await
    })
    .await;
    assert_eq!((live.status, live.body.as_str()), (200, "live\n"));
    let ready = http::get(&http_address, "/health/ready", &[])
        .await
        .expect("ready");
    assert_eq!(ready.status, 503);
    assert!(
        ready.body.starts_with("not ready: opening:"),
        "{}",
        ready.body
    );
    let put = http::request(&http_address, "PUT", "/v1/kv/k", &[], b"v")
        .await
        .expect("PUT");
    assert_eq!(put.status, 503, "{}", put.body);
    assert_eq!(put.header("x-dkvs-outcome"), Some("not-applied"));
    let metrics = http::get(&http_address, "/metrics", &[])
        .await
        .expect("metrics");
    assert_eq!(metrics.status, 503, "{}", metrics.body);

    // One host holds at most 32 connections: the next is closed at once,
    // and once they go, it is served again.
    let mut idle = Vec::new();
    for _ in 0..32 {
        idle.push(
            tokio::net::TcpStream::connect(&http_address)
                .await
                .expect("connect"),
        );
    }
    let refused = http::get(&http_address, "/health/live", &[]).await;
    assert!(
        refused.is_err(),
        "a 33rd connection from one host is closed: {refused:?}"
    );
    drop(idle);
    eventually(Duration::from_secs(10), async || {
        http::get(&http_address, "/health/live", &[]).await
    })
    .await;
}

/// Runs `tool args` for the checks of `deploy/prometheus/`; `None` when
/// the tool is missing and not required (see the module doc).
fn run_prometheus_tool(tool: &str, args: &[&str]) -> Option<std::process::Output> {
    run_prometheus_tool_in(tool, args, ".")
}

/// [`run_prometheus_tool`] in the directory `dir`.
fn run_prometheus_tool_in(tool: &str, args: &[&str], dir: &str) -> Option<std::process::Output> {
    match Command::new(tool).args(args).current_dir(dir).output() {
        Ok(output) => Some(output),
        Err(error) => {
            assert!(
                std::env::var_os("DKVS_REQUIRE_PROMTOOL").is_none(),
                "{tool} is required (DKVS_REQUIRE_PROMTOOL) but cannot run: {error}"
            );
            eprintln!("{tool} not found ({error}): skipping");
            None
        }
    }
}

#[test]
fn the_shipped_scrape_config_and_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
    for args in [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let Some(output) = run_prometheus_tool_in("promtool", &args, dir) else {
            return;
        };
        assert!(
            output.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// A process killed (and reaped) when dropped, even when a test fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `deploy/prometheus/prometheus.yml` pointed at `targets`, scraping and
/// evaluating every second, with the shipped alert rules.
fn shipped_config_for(targets: &[String]) -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
    let shipped = std::fs::read_to_string(format!("{dir}/prometheus.yml")).expect("read config");
    let local: String = (1..=5)
        .map(|i| format!("          - 127.0.0.1:800{i}\n"))
        .collect();
    let ours: String = targets
        .iter()
        .map(|t| format!("          - {t}\n"))
        .collect();
    let mut config = shipped.clone();
    for (from, to) in [
        (local.as_str(), ours.as_str()),
        ("scrape_interval: 5s", "scrape_interval: 1s"),
        ("evaluation_interval: 5s", "evaluation_interval: 1s"),
        ("  - alerts.yml", &format!("  - {dir}/alerts.yml")),
    ] {
        assert!(
            config.contains(from),
            "the shipped prometheus.yml no longer has {from:?}: update this test"
        );
        config = config.replace(from, to);
    }
    config
}

/// `GET /api/v1/...` on Prometheus at `address`, its `data` as JSON.
async fn prometheus_api(address: &str, path: &str) -> Result<serde_json::Value, String> {
    let answer = http::get(address, &format!("/api/v1/{path}"), &[]).await?;
    let body: serde_json::Value =
        serde_json::from_str(&answer.body).map_err(|e| format!("{path}: {e}: {}", answer.body))?;
    match body["status"].as_str() {
        Some("success") => Ok(body["data"].clone()),
        _ => Err(format!("{path}: {}", answer.body)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_cluster_with_the_shipped_config_and_rules() {
    if run_prometheus_tool("prometheus", &["--version"]).is_none() {
        return;
    }
    let cluster = TestCluster::start_with_http(3, &[]).await;
    let targets: Vec<String> = (0..3)
        .map(|i| cluster.http_address(i).expect("http"))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(&config, shipped_config_for(&targets)).expect("write config");
    let web = common::free_address();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
    let prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    let _prometheus = KillOnDrop(prometheus);

    // Every node scraped and up.
    eventually(Duration::from_secs(60), async || {
        let up = prometheus_api(&web, "query?query=up").await?;
        let ups: Vec<&str> = up["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["value"][1].as_str())
            .collect();
        match ups.as_slice() {
            ["1", "1", "1"] => Ok(()),
            _ => Err(format!("up: {up}")),
        }
    })
    .await;
    // The node's own series arrived: each of 3 nodes sees 3 members up.
    eventually(Duration::from_secs(30), async || {
        let query = "query?query=sum(dkvs_members%7Bstate%3D%22up%22%7D)";
        let members = prometheus_api(&web, query).await?;
        match members["result"][0]["value"][1].as_str() {
            Some("9") => Ok(()),
            _ => Err(format!("members up: {members}")),
        }
    })
    .await;
    // The shipped rules loaded and evaluate cleanly, and nothing fires on
    // a healthy cluster.
    let rules = eventually(Duration::from_secs(30), async || {
        let rules = prometheus_api(&web, "rules").await?;
        let all: Vec<serde_json::Value> = rules["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = all.iter().all(|r| {
            r["lastEvaluation"]
                .as_str()
                .is_some_and(|t| !t.starts_with("0001"))
        });
        if all.len() >= 10 && evaluated {
            Ok(all)
        } else {
            Err(format!("rules not all evaluated yet: {rules}"))
        }
    })
    .await;
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
        assert_ne!(rule["state"], "firing", "{rule}");
    }
}
