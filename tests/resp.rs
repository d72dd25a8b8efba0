//! The RESP door (`--resp-listen`) on real `DKVSServer` processes: the
//! seed's `nc` session byte for byte, RESP2 and RESP3, pipelining,
//! binary values, errors worded as Redis words them, hostile input (the
//! node stays healthy), and Debian's `redis-cli` (commands, `--pipe`,
//! `--scan`) and `redis-benchmark`. `.ci/run` installs `redis-tools` when
//! missing and sets `DKVS_REQUIRE_REDIS_TOOLS=1`, so CI really runs them;
//! elsewhere those parts say why they skip.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::TestCluster;

/// Sends `request` on a fresh connection and reads until `expected` bytes
/// came, the node closed, or it stayed silent for a second after answering
/// (10 s before any answer): what the node answered.
fn exchange(address: &str, request: &[u8], expected: usize) -> Vec<u8> {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let mut chunk = [0u8; 65536];
    while answer.len() < expected {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            }
        }
    }
    answer
}

async fn talk(address: &str, request: &[u8], expected: usize) -> Vec<u8> {
    let (address, request) = (address.to_string(), request.to_vec());
    tokio::task::spawn_blocking(move || exchange(&address, &request, expected))
        .await
        .expect("the exchange")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A command as a RESP array of bulk strings.
fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend(b"\r\n");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_nc_session_and_redis_commands_work_through_any_node() {
    let cluster = TestCluster::start_with_resp(3, &[]).await;
    let door = |i: usize| cluster.resp_address(i).expect("resp");

    // The first system this one grew from, typed into nc, byte for byte.
    let session = talk(&door(0), b"SET a 10\nGET a\nDELETE a\nGET a\n", 22).await;
    assert_eq!(text(&session), "+OK\r\n$2\r\n10\r\n:1\r\n$-1\r\n");

    // Pipelined RESP2 through node 1: a binary value written and read back
    // (through node 2 too), MSET/MGET, EXISTS, STRLEN, TYPE, TTL, DEL.
    let value: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let mut pipeline = command(&[b"SET", b"bin", &value]);
    pipeline.extend(command(&[b"GET", b"bin"]));
    pipeline.extend(command(&[b"MSET", b"k1", b"v1", b"k2", b"v2"]));
    pipeline.extend(command(&[b"MGET", b"k1", b"nope", b"k2"]));
    pipeline.extend(command(&[b"EXISTS", b"k1", b"k2", b"nope"]));
    pipeline.extend(command(&[b"STRLEN", b"bin"]));
    pipeline.extend(command(&[b"TYPE", b"k1"]));
    pipeline.extend(command(&[b"TTL", b"k1"]));
    pipeline.extend(command(&[b"TTL", b"nope"]));
    pipeline.extend(command(&[b"DEL", b"k1", b"nope"]));
    let mut expected = b"+OK\r\n".to_vec();
    expected.extend(format!("$100000\r\n").as_bytes());
    expected.extend_from_slice(&value);
    expected.extend(b"\r\n+OK\r\n*3\r\n$2\r\nv1\r\n$-1\r\n$2\r\nv2\r\n:2\r\n:100000\r\n+string\r\n:-1\r\n:-2\r\n:1\r\n");
    let answer = talk(&door(1), &pipeline, expected.len()).await;
    assert!(answer == expected, "answered {}", text(&answer));
    let mut bulk = b"$100000\r\n".to_vec();
    bulk.extend_from_slice(&value);
    bulk.extend(b"\r\n");
    let read_back = talk(&door(2), &command(&[b"GET", b"bin"]), bulk.len()).await;
    assert!(read_back == bulk, "another node reads other bytes");

    // RESP3 after HELLO 3: a map, and null as `_`.
    let hello = talk(
        &door(0),
        &[command(&[b"HELLO", b"3"]), command(&[b"GET", b"nope"])].concat(),
        100,
    )
    .await;
    let hello = text(&hello);
    assert!(
        hello.starts_with("%7\r\n") && hello.contains("standalone"),
        "{hello}"
    );
    assert!(hello.ends_with("_\r\n"), "{hello}");

    // Errors as Redis words them; the connection stays usable.
    let errors = talk(
        &door(0),
        &[
            command(&[b"FOO", b"a", b"b"]),
            command(&[b"GET"]),
            command(&[b"INCR", b"k2"]),
            command(&[b"SET", b"k", b"v", b"NX"]),
            command(&[b"KEYS", b"*"]),
            command(&[b"SELECT", b"1"]),
            command(&[b"SET", b"\xff\xfe", b"v"]),
            command(&[b"PING"]),
        ]
        .concat(),
        400,
    )
    .await;
    let errors = text(&errors);
    for said in [
        "-ERR unknown command 'foo', with args beginning with: 'a' 'b' \r\n",
        "-ERR wrong number of arguments for 'get' command\r\n",
        "-ERR INCR reads before it writes and needs compare-and-set",
        "-ERR SET with NX, XX, GET or KEEPTTL",
        "-ERR KEYS is not supported by DKVS",
        "-ERR DB index is out of range\r\n",
        "-ERR DKVS keys are UTF-8 text",
        "+PONG\r\n",
    ] {
        assert!(errors.contains(said), "no {said:?} in {errors}");
    }

    // CONSISTENCY is per connection.
    let levels = talk(
        &door(0),
        &[
            command(&[b"CONSISTENCY", b"all"]),
            command(&[b"CONSISTENCY"]),
            command(&[b"GET", b"k2"]),
        ]
        .concat(),
        30,
    )
    .await;
    assert_eq!(text(&levels), "+OK\r\n$3\r\nall\r\n$2\r\nv2\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_errors_and_the_node_stays_healthy() {
    let cluster = TestCluster::start_with_resp(
        3,
        &[
            "--max-value-bytes",
            "1024",
            "--request-body-timeout-ms",
            "1000",
        ],
    )
    .await;
    let door = cluster.resp_address(0).expect("resp");
    for (request, says) in [
        (b"*99999999999\r\n".to_vec(), "invalid multibulk length"),
        (b"*1\r\n$999999999\r\n".to_vec(), "invalid bulk length"),
        (b"*1\r\n$-7\r\n".to_vec(), "invalid bulk length"),
        (b"*1\r\n:5\r\n".to_vec(), "expected '$'"),
        (b"SET \"open\n".to_vec(), "unbalanced quotes"),
        (vec![b'x'; 70_000], "too big inline request"),
    ] {
        let answer = text(&talk(&door, &request, 200).await);
        assert!(
            answer.starts_with("-ERR Protocol error") && answer.contains(says),
            "{answer}"
        );
    }
    // A value over --max-value-bytes (within the protocol's bound) is the
    // node's refusal; the connection goes on.
    let answer = text(
        &talk(
            &door,
            &[command(&[b"SET", b"k", &[b'v'; 1500]]), command(&[b"PING"])].concat(),
            100,
        )
        .await,
    );
    assert!(
        answer.starts_with("-ERR") && answer.ends_with("+PONG\r\n"),
        "{answer}"
    );
    // 10,000 pipelined commands, answered in order.
    let mut many = Vec::new();
    for i in 0..10_000 {
        many.extend(command(&[b"ECHO", format!("{i}").as_bytes()]));
    }
    let expected: usize = (0..10_000)
        .map(|i: usize| {
            let digits = i.to_string().len();
            format!("${digits}\r\n").len() + digits + 2
        })
        .sum();
    let answer = talk(&door, &many, expected).await;
    let answer = text(&answer);
    let echoed: Vec<&str> = answer
        .split("\r\n")
        .filter(|l| !l.starts_with('$') && !l.is_empty())
        .collect();
    assert_eq!(echoed.len(), 10_000);
    assert!(echoed.iter().enumerate().all(|(i, e)| *e == i.to_string()));
    // A multi-key write with one bad key writes nothing at all.
    let long_key = vec![b'k'; 1500];
    let answer = text(
        &talk(
            &door,
            &[
                command(&[b"MSET", b"first", b"1", &long_key, b"2"]),
                command(&[b"EXISTS", b"first"]),
            ]
            .concat(),
            100,
        )
        .await,
    );
    assert!(
        answer.starts_with("-ERR") && answer.ends_with(":0\r\n"),
        "{answer}"
    );
    // A command that trickles in is cut off at the body timeout, however
    // often a byte arrives.
    let trickle = {
        let door = door.clone();
        tokio::task::spawn_blocking(move || {
            let mut stream = TcpStream::connect(&door).expect("connect");
            let started = std::time::Instant::now();
            let mut answer = Vec::new();
            for byte in b"*2\r\n$4\r\nECHO\r\n$20\r\nabcdefghijklmnopqrst\r\n" {
                if stream.write_all(&[*byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
                if started.elapsed() > Duration::from_secs(4) {
                    break;
                }
            }
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.read_to_end(&mut answer);
            text(&answer)
        })
        .await
        .expect("the trickle")
    };
    assert!(trickle.contains("did not arrive in time"), "{trickle}");
    // A half-sent command, then the client goes: nothing breaks.
    let _ = talk(&door, b"*3\r\n$3\r\nSET\r\n$1\r\nk", 0).await;
    assert!(common::health_serving(&cluster.nodes[0].address).await);
    assert_eq!(text(&talk(&door, b"PING\r\n", 7).await), "+PONG\r\n");
}

/// Debian's redis-cli and redis-benchmark, if installed (CI installs them).
fn redis_tools() -> bool {
    let found = Command::new("redis-cli")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("DKVS_REQUIRE_REDIS_TOOLS").is_none(),
            "DKVS_REQUIRE_REDIS_TOOLS is set but redis-cli is not installed"
        );
        eprintln!("skipped: no redis-cli here (Debian: apt-get install redis-tools)");
    }
    found
}

fn run(program: &str, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(bytes) = stdin {
        input.write_all(bytes).expect("feed");
    }
    drop(input);
    child.wait_with_output().expect("wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_and_redis_benchmark_work_unchanged() {
    if !redis_tools() {
        return;
    }
    let cluster = TestCluster::start_with_resp(3, &[]).await;
    let door = cluster.resp_address(1).expect("resp");
    let (host, port) = door.rsplit_once(':').expect("host:port");
    let (host, port) = (host.to_string(), port.to_string());
    let cli = move |args: &[&str], stdin: Option<&[u8]>| {
        let mut all = vec!["-h", &host, "-p", &port];
        all.extend_from_slice(args);
        run("redis-cli", &all, stdin)
    };
    let outcome = tokio::task::spawn_blocking(move || {
        let set = cli(&["SET", "greeting", "hello world"], None);
        assert_eq!(text(&set.stdout), "OK\n", "{}", text(&set.stderr));
        let get = cli(&["GET", "greeting"], None);
        assert_eq!(text(&get.stdout), "hello world\n");
        let missing = cli(&["GET", "nope"], None);
        assert_eq!(text(&missing.stdout), "\n");
        let info = cli(&["INFO"], None);
        assert!(text(&info.stdout).contains("redis_mode:standalone"));
        // RESP3 through redis-cli -3.
        let three = cli(&["-3", "GET", "greeting"], None);
        assert_eq!(
            text(&three.stdout),
            "hello world\n",
            "{}",
            text(&three.stderr)
        );

        // --pipe: a mass insert of raw RESP.
        let mut mass = Vec::new();
        for i in 0..500 {
            mass.extend(command(&[b"SET", format!("mass:{i}").as_bytes(), b"x"]));
        }
        let piped = cli(&["--pipe"], Some(&mass));
        let said = text(&piped.stdout);
        assert!(
            said.contains("errors: 0, replies: 500"),
            "{said}{}",
            text(&piped.stderr)
        );

        // --scan walks the listing with SCAN's cursor.
        let scanned = cli(&["--scan", "--pattern", "mass:*"], None);
        let mut keys: Vec<String> = text(&scanned.stdout).lines().map(str::to_string).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 500, "{}", text(&scanned.stderr));

        // redis-benchmark: SET and GET, pipelined, no errors.
        let bench = run(
            "redis-benchmark",
            &[
                "-h",
                door.rsplit_once(':').unwrap().0,
                "-p",
                door.rsplit_once(':').unwrap().1,
                "-t",
                "set,get",
                "-n",
                "2000",
                "-P",
                "8",
                "-q",
            ],
            None,
        );
        let said = text(&bench.stdout);
        assert!(
            bench.status.success() && said.contains("SET:") && said.contains("GET:"),
            "{said}{}",
            text(&bench.stderr)
        );
        said
    })
    .await
    .expect("redis tools");
    eprintln!("{outcome}");
}

/// A maintained Rust Redis client (redis-rs, synchronous) against any node:
/// its handshake, typed SET/GET/MGET/DEL, binary values, a pipeline, a
/// refused INCR surfacing as an error, not a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_redis_client_works_unchanged() {
    let cluster = TestCluster::start_with_resp(3, &[]).await;
    let doors: Vec<String> = (0..3)
        .map(|i| format!("redis://{}/", cluster.resp_address(i).expect("resp")))
        .collect();
    tokio::task::spawn_blocking(move || {
        let connect = |i: usize| {
            redis::Client::open(doors[i].as_str())
                .expect("a redis URL")
                .get_connection()
                .expect("a connection")
        };
        let mut first = connect(0);
        let value: Vec<u8> = (0..=255u8).collect();
        let () = redis::cmd("SET")
            .arg("bin")
            .arg(&value)
            .query(&mut first)
            .expect("SET");
        let mut second = connect(1);
        let read: Vec<u8> = redis::cmd("GET")
            .arg("bin")
            .query(&mut second)
            .expect("GET");
        assert_eq!(read, value);
        let missing: Option<String> = redis::cmd("GET")
            .arg("nope")
            .query(&mut second)
            .expect("GET");
        assert_eq!(missing, None);
        let (a, b): (String, Option<String>) = redis::pipe()
            .cmd("SET")
            .arg("p1")
            .arg("one")
            .ignore()
            .cmd("GET")
            .arg("p1")
            .cmd("GET")
            .arg("p2")
            .query(&mut connect(2))
            .expect("a pipeline");
        assert_eq!((a.as_str(), b), ("one", None));
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg("p1")
            .arg("nope")
            .query(&mut first)
            .expect("MGET");
        assert_eq!(values, [Some("one".to_string()), None]);
        let removed: i64 = redis::cmd("DEL")
            .arg("p1")
            .arg("bin")
            .query(&mut first)
            .expect("DEL");
        assert_eq!(removed, 2);
        let refused = redis::cmd("INCR").arg("counter").query::<i64>(&mut first);
        let refused = refused.expect_err("INCR needs compare-and-set");
        assert!(refused.to_string().contains("compare-and-set"), "{refused}");
    })
    .await
    .expect("the redis client");
}
