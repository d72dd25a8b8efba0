use std::time::Duration;

use prometheus_client::registry::Registry;

use super::process::{parse_boot_time, parse_max_fds, parse_stat};
use super::*;

#[test]
fn an_observation_lands_in_the_first_bucket_whose_bound_is_not_below_it() {
    assert_eq!(bucket_of(0), 0);
    assert_eq!(bucket_of(500_000), 0);
    assert_eq!(bucket_of(500_001), 1);
    assert_eq!(bucket_of(10_000_000_000), BUCKETS_SECONDS.len() - 1);
    assert_eq!(bucket_of(10_000_000_001), BUCKETS_SECONDS.len());
    assert_eq!(bucket_of(u64::MAX), BUCKETS_SECONDS.len());
}

#[test]
fn a_histogram_encodes_cumulative_buckets_its_sum_and_count() {
    let requests = RequestMetrics::default();
    let put = Answered {
        operation: Operation::Put,
        consistency: 1,
        code: 0,
        outcome: 1,
    };
    requests.record(put, Duration::from_micros(300));
    requests.record(put, Duration::from_millis(3));
    requests.record(put, Duration::from_secs(60));
    let mut registry = Registry::default();
    registry.register_collector(Box::new(requests));
    let text = render(&registry);
    let labels = r#"operation="put",consistency="quorum""#;
    for line in [
        format!(r#"dkvs_client_request_duration_seconds_bucket{{{labels},le="0.0005"}} 1"#),
        format!(r#"dkvs_client_request_duration_seconds_bucket{{{labels},le="0.0025"}} 1"#),
        format!(r#"dkvs_client_request_duration_seconds_bucket{{{labels},le="0.005"}} 2"#),
        format!(r#"dkvs_client_request_duration_seconds_bucket{{{labels},le="10"}} 2"#),
        format!(r#"dkvs_client_request_duration_seconds_bucket{{{labels},le="+Inf"}} 3"#),
        format!(r#"dkvs_client_request_duration_seconds_count{{{labels}}} 3"#),
        format!(r#"dkvs_client_request_duration_seconds_sum{{{labels}}} 60.0033"#),
        r#"dkvs_client_requests_total{operation="put",consistency="quorum",code="OK",outcome="applied"} 3"#.to_string(),
    ] {
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
}

#[test]
fn requests_are_counted_by_code_and_outcome_and_idle_series_are_left_out() {
    let requests = RequestMetrics::default();
    let unknown = Answered {
        operation: Operation::Delete,
        consistency: 2,
        code: 14,
        outcome: 3,
    };
    requests.record(unknown, Duration::from_millis(1));
    // A code no gRPC version has, or an outcome past the list: counted,
    // not a panic.
    requests.record(
        Answered {
            code: 99,
            outcome: 17,
            ..unknown
        },
        Duration::from_millis(1),
    );
    assert_eq!(requests.answered(Operation::Delete, 14), 1);
    assert_eq!(requests.answered(Operation::Delete, 2), 1);
    let mut registry = Registry::default();
    registry.register_collector(Box::new(requests));
    let text = render(&registry);
    assert!(text.contains(
        r#"dkvs_client_requests_total{operation="delete",consistency="all",code="UNAVAILABLE",outcome="unknown"} 1"#
    ));
    // Idle: only each operation's OK series at QUORUM.
    assert!(text.contains(
        r#"dkvs_client_requests_total{operation="get",consistency="quorum",code="OK",outcome="none"} 0"#
    ));
    assert!(!text.contains(r#"operation="get",consistency="one""#));
    assert!(text.contains("# TYPE dkvs_client_requests_total counter"));
}

/// Shows the calls to peers other than 127.0.0.1:7009, as a node whose
/// layout no longer has that one.
#[derive(Debug)]
struct Members(std::sync::Arc<CallMetrics>);

impl prometheus_client::collector::Collector for Members {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        self.0
            .encode_peers(&mut encoder, |peer| peer != "127.0.0.1:7009")
    }
}

#[test]
fn peer_calls_are_named_by_their_method_and_listed_once_made() {
    assert_eq!(CALLS[call_index("/dkvs.v1.Replica/Batch")], "Replica/Batch");
    assert_eq!(CALLS[call_index("/dkvs.v1.Liveness/Ping")], "Liveness/Ping");
    assert_eq!(CALLS[call_index("/grpc.health.v1.Health/Check")], "other");
    let calls = std::sync::Arc::new(CallMetrics::default());
    let peer = calls.for_peer("127.0.0.1:7002");
    assert!(std::sync::Arc::ptr_eq(
        &peer,
        &calls.for_peer("127.0.0.1:7002")
    ));
    let ping = peer.call("/dkvs.v1.Liveness/Ping");
    ping.duration.observe(Duration::from_millis(2));
    ping.failed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    calls
        .for_peer("127.0.0.1:7009")
        .call("/dkvs.v1.Liveness/Ping")
        .duration
        .observe(Duration::from_millis(1));
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Members(calls)));
    let text = render(&registry);
    assert!(text.contains(
        r#"dkvs_peer_call_duration_seconds_count{peer="127.0.0.1:7002",call="Liveness/Ping"} 1"#
    ));
    // A peer that is no longer a member is not shown.
    assert!(!text.contains("7009"), "{text}");
    assert!(
        text.contains(
            r#"dkvs_peer_calls_failed_total{peer="127.0.0.1:7002",call="Liveness/Ping"} 1"#
        )
    );
    assert!(!text.contains("Replica/Batch"), "{text}");
}

#[test]
fn proc_stat_is_read_past_a_command_name_with_spaces_and_parentheses() {
    let stat = "4242 (DKVS (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 7 0 12345 \
                987654321 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
    assert_eq!(
        parse_stat(stat),
        Some(process::Stat {
            cpu_ticks: 300,
            start_ticks: 12345,
            threads: 7,
            virtual_bytes: 987_654_321,
            resident_pages: 2048,
        })
    );
    assert_eq!(parse_stat("garbage"), None);
    assert_eq!(parse_stat("1 (x) S 1"), None);
    assert_eq!(
        parse_boot_time("cpu 1 2\nbtime 1700000000\n"),
        Some(1_700_000_000)
    );
    assert_eq!(
        parse_max_fds(
            "Limit Soft Hard Units\nMax open files            1024                 4096                 files\n"
        ),
        Some(1024)
    );
}

#[test]
fn disk_space_is_read_for_a_dir_and_none_for_a_missing_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (free, size) = process::disk_space(dir.path()).expect("statvfs of a temp dir");
    assert!(size > 0 && free <= size, "free {free} of {size}");
    assert_eq!(process::disk_space(&dir.path().join("missing")), None);
}
