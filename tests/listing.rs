//! Key listings (`KeyValue.List`, `GET /v1/kv?prefix=`, `DKVSClient
//! list`) on real `DKVSServer` processes: every acknowledged key exactly
//! once across many small pages while other keys are written, deleted keys
//! left out, prefixes, forged cursors, a node down (QUORUM still complete)
//! and two down (refused, not silently short).

mod common;

use std::collections::BTreeSet;

use common::TestCluster;
use common::http;

/// Pages of 7 entries per replica: a listing of a few hundred keys crosses
/// many windows and every token range.
const FLAGS: &[&str] = &["--max-page-entries", "7"];

fn text(output: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Every key of the HTTP listing through node `door`, page after page of
/// `limit`: the keys in the order given and the number of pages.
async fn http_listing(
    cluster: &TestCluster,
    door: usize,
    query: &str,
    limit: usize,
) -> (Vec<String>, usize) {
    let address = cluster.http_address(door).expect("http");
    let (mut keys, mut cursor, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let path = format!("/v1/kv?{query}&limit={limit}&cursor={cursor}");
        let answer = http::get(&address, &path, &[]).await.expect("GET /v1/kv");
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
        let page: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
        let listed = page["keys"].as_array().expect("keys");
        assert!(
            listed.len() <= limit,
            "a page over its limit: {}",
            answer.body
        );
        for entry in listed {
            keys.push(entry["key"].as_str().expect("key").to_string());
            assert!(entry["version"].as_str().is_some_and(|v| v.contains('@')));
        }
        pages += 1;
        assert!(pages < 10_000, "the listing does not end");
        match page["cursor"].as_str() {
            Some(next) => {
                assert_eq!(page["complete"], false);
                cursor = next.to_string();
            }
            None => {
                assert_eq!(page["complete"], true);
                return (keys, pages);
            }
        }
    }
}

fn no_duplicates(keys: &[String]) -> BTreeSet<String> {
    let set: BTreeSet<String> = keys.iter().cloned().collect();
    assert_eq!(set.len(), keys.len(), "a key listed twice");
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_key_is_listed_once_across_pages_while_others_are_written() {
    let mut cluster = TestCluster::start_with_http(3, FLAGS).await;
    let client = cluster.client().await;
    let mut expected = BTreeSet::new();
    for i in 0..240 {
        let key = format!("k/{i:03}");
        client.put(&key, format!("v{i}")).await.expect("put");
        expected.insert(key);
    }
    for special in ["users/ada lovelace/é", "users/bob", "a&b=c?d"] {
        client.put(special, "x").await.expect("put");
        expected.insert(special.to_string());
    }
    for i in (0..240).step_by(8) {
        let key = format!("k/{i:03}");
        client.delete(&key).await.expect("delete");
        expected.remove(&key);
    }

    // Pages of 9 through node 1 while another task writes new keys: every
    // key written and not deleted before is there once; a new key may or
    // may not be (a listing is no snapshot), but never twice.
    let writer = {
        let client = cluster.client().await;
        tokio::spawn(async move {
            for i in 0..150 {
                let _ = client.put(&format!("new/{i}"), "n").await;
            }
        })
    };
    let (listed, pages) = http_listing(&cluster, 1, "prefix=", 9).await;
    writer.await.expect("writer");
    let listed = no_duplicates(&listed);
    assert!(pages > expected.len() / 9, "{pages} pages");
    let missing: Vec<&String> = expected.difference(&listed).collect();
    assert!(
        missing.is_empty(),
        "keys missing from the listing: {missing:?}"
    );
    let extra: Vec<&String> = listed
        .difference(&expected)
        .filter(|k| !k.starts_with("new/"))
        .collect();
    assert!(
        extra.is_empty(),
        "deleted or unknown keys listed: {extra:?}"
    );

    // A prefix, percent-encoded as curl sends it; keys with `&`, `=`, `?`.
    let (users, _) = http_listing(&cluster, 2, "prefix=users%2F", 1).await;
    let users = no_duplicates(&users);
    assert_eq!(
        users.into_iter().collect::<Vec<_>>(),
        ["users/ada lovelace/é", "users/bob"]
    );
    let (odd, _) = http_listing(&cluster, 0, "prefix=a%26b%3D", 5).await;
    assert_eq!(odd, ["a&b=c?d"]);

    // The CLI: the same keys; --limit stops; JSON lines parse.
    let all = cluster.run_client(&["list"]).await;
    assert!(all.status.success(), "{}", text(&all));
    let cli: Vec<String> = String::from_utf8_lossy(&all.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let cli = no_duplicates(&cli);
    assert!(expected.is_subset(&cli), "{}", text(&all));
    let some = cluster
        .run_client(&["list", "--prefix", "k/", "--limit", "10", "--versions"])
        .await;
    assert!(some.status.success(), "{}", text(&some));
    let lines: Vec<String> = String::from_utf8_lossy(&some.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 10, "{}", text(&some));
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("k/") && l.contains('\t'))
    );
    let json = cluster
        .run_client(&["list", "--prefix", "users/", "--output", "json"])
        .await;
    assert!(json.status.success(), "{}", text(&json));
    let objects: Vec<serde_json::Value> = String::from_utf8_lossy(&json.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(objects.len(), 2, "{}", text(&json));

    // One node down: QUORUM still reads two replicas of every range.
    cluster.kill(2);
    let (after_kill, _) = http_listing(&cluster, 0, "prefix=k%2F", 50).await;
    let after_kill = no_duplicates(&after_kill);
    let expected_k: BTreeSet<String> = expected
        .iter()
        .filter(|k| k.starts_with("k/"))
        .cloned()
        .collect();
    assert_eq!(after_kill, expected_k);

    // Two down: no range has two replicas up, and the listing says so
    // rather than answer short.
    cluster.kill(1);
    let refused = cluster.run_client(&["list"]).await;
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("replicas needed"),
        "{}",
        text(&refused)
    );
    // At ONE the survivor lists what it holds.
    let one = cluster
        .run_client(&["--consistency", "one", "list", "--prefix", "k/"])
        .await;
    assert!(one.status.success(), "{}", text(&one));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_listing_request_gets_a_reason_and_the_node_stays_healthy() {
    let cluster = TestCluster::start_with_http(3, FLAGS).await;
    let address = cluster.http_address(0).expect("http");
    for (query, says) in [
        ("cursor=00", "not one a listing gave"),
        ("cursor=ffffffffffffffffzz", "not one a listing gave"),
        ("limit=100000", "above the most"),
        ("colour=blue", "unknown query parameter"),
        ("prefix=%C3", "not UTF-8"),
    ] {
        let answer = http::get(&address, &format!("/v1/kv?{query}"), &[])
            .await
            .expect("GET");
        assert_eq!(answer.status, 400, "{query}: {}", answer.body);
        assert!(answer.body.contains(says), "{query}: {}", answer.body);
        assert!(answer.body.contains("INVALID_ARGUMENT"), "{}", answer.body);
    }
    // A cursor past every key (the last hash): a complete, empty page.
    let last = format!("/v1/kv?cursor={}", "ff".repeat(40));
    let answer = http::get(&address, &last, &[]).await.expect("GET");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.body.contains("\"complete\":true"), "{}", answer.body);
    // The gRPC door refuses the same way.
    let mut kv = cluster.kv(1).await;
    let refused = kv
        .list(dkvs::pb::ListRequest {
            cursor: "nothex".into(),
            ..Default::default()
        })
        .await
        .expect_err("a forged cursor");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let mut cursor = String::new();
    for call in 0.. {
        assert!(call < 100, "an empty cluster's listing does not end");
        let listed = kv
            .list(dkvs::pb::ListRequest {
                cursor,
                ..Default::default()
            })
            .await
            .expect("an empty cluster lists")
            .into_inner();
        assert!(listed.keys.is_empty());
        if listed.cursor.is_empty() {
            break;
        }
        cursor = listed.cursor;
    }
    assert!(common::health_serving(&cluster.nodes[0].address).await);
}
