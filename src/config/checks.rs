//! Startup checks: settings that each parse but cannot work, refused before
//! anything is opened or sent, with a message that names the flag.
//!
//! Ranges a flag has on its own live in its clap parser (a TOML setting goes
//! through the same parser), and are checked here again for configurations
//! built in code. What needs more than one value, or a reason longer than a
//! range, is here: addresses that must be dialled, the size of the messages a
//! limit implies, and (once the data dir's layout is read) the flags the
//! cluster fixed at its start. A new limit adds its check to [`check`].

use super::ServerConfig;

/// Largest `--max-value-bytes`: 256 MiB. A value travels whole in one gRPC
/// message, which hyper buffers in memory before DKVS sees it; a replica
/// batch carries up to two such values ([`crate::net::max_message_bytes`]).
pub const MAX_VALUE_BYTES_LIMIT: usize = 256 << 20;

/// Largest gRPC message: its length prefix is 4 bytes.
pub const GRPC_MESSAGE_BYTES_MAX: usize = u32::MAX as usize;

/// Every check of one node's settings; the first problem found.
pub fn check(config: &ServerConfig) -> Result<(), String> {
    let own = config.advertised_address();
    addresses("--peers", &config.peers, Some(&own))?;
    addresses("--join", &config.join, None)?;
    if let Some(advertise) = &config.advertise {
        host_port(advertise.trim()).map_err(|why| format!("--advertise {advertise:?}: {why}"))?;
    }
    intervals(config)?;
    threshold("--phi-threshold", config.phi_threshold)?;
    value_bytes(config.max_value_bytes)?;
    Ok(())
}

/// A list of addresses (`--peers`, `--join`): each `host:port`, none twice,
/// and none with port 0 but this node's `own` (a lone node listening on a
/// port the OS picks). Empty entries (a trailing comma) are skipped.
pub fn addresses(flag: &str, entries: &[String], own: Option<&str>) -> Result<(), String> {
    let mut seen: Vec<&str> = Vec::new();
    for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let port = host_port(entry).map_err(|why| format!("{flag} entry {entry:?}: {why}"))?;
        if port == 0 && own != Some(entry) {
            return Err(format!("{flag} entry {entry:?}: port 0 cannot be dialled"));
        }
        if seen.contains(&entry) {
            return Err(format!(
                "{flag} names {entry} twice: list each address once"
            ));
        }
        seen.push(entry);
    }
    Ok(())
}

/// One address, `host:port`: the host an IPv4 address, a DNS name, or
/// `[IPv6]`; the port (returned) a number up to 65535.
pub fn host_port(address: &str) -> Result<u16, String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("not host:port (the port is missing)".into());
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err(format!("port {port:?} is not a number from 1 to 65535"));
    };
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<std::net::Ipv6Addr>()
            .map(|_| port)
            .map_err(|_| format!("{inner:?} is not an IPv6 address"));
    }
    if host.contains(':') {
        return Err("an IPv6 address is written [address]:port".into());
    }
    let name_like = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(name_like) {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    Ok(port)
}

/// Intervals and ages: none may be zero (clap's ranges say so too).
fn intervals(config: &ServerConfig) -> Result<(), String> {
    let intervals = [
        ("--fsync-interval-ms", config.fsync_interval_ms),
        ("--rpc-timeout-ms", config.rpc_timeout_ms),
        ("--request-timeout-ms", config.request_timeout_ms),
        ("--heartbeat-interval-ms", config.heartbeat_interval_ms),
        (
            "--hint-delivery-interval-ms",
            config.hint_delivery_interval_ms,
        ),
        ("--anti-entropy-interval", config.anti_entropy_interval),
        ("--max-hint-age-secs", config.max_hint_age_secs),
        ("--tombstone-grace", config.tombstone_grace),
        ("--max-clock-skew-ms", config.max_clock_skew_ms),
    ];
    match intervals.iter().find(|(_, value)| *value == 0) {
        Some((flag, _)) => Err(format!("{flag} must be at least 1")),
        None => Ok(()),
    }
}

/// A threshold: a finite number above zero.
pub fn threshold(flag: &str, value: f64) -> Result<(), String> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(format!("{flag} {value} must be a finite number above 0"))
    }
}

/// `--max-value-bytes`: at least 1, at most [`MAX_VALUE_BYTES_LIMIT`], and
/// its messages within what gRPC carries.
pub fn value_bytes(max_value_bytes: usize) -> Result<(), String> {
    let message = crate::net::max_message_bytes(max_value_bytes);
    if max_value_bytes == 0 {
        return Err("--max-value-bytes must be at least 1".into());
    }
    if max_value_bytes > MAX_VALUE_BYTES_LIMIT || message > GRPC_MESSAGE_BYTES_MAX {
        return Err(format!(
            "--max-value-bytes {max_value_bytes} is more than {MAX_VALUE_BYTES_LIMIT} (256 MiB): a \
             value travels whole in one gRPC message (up to {message} bytes with this setting), \
             held in memory by every node it passes; store larger objects elsewhere and keep \
             their names in DKVS"
        ));
    }
    Ok(())
}

/// The flags a cluster fixes when it starts (N and vnodes), against its
/// layout: a node started with others would believe in another placement
/// than the one every member uses.
pub fn layout_flags(
    config: &ServerConfig,
    layout_version: u64,
    layout_replicas: usize,
    layout_vnodes: usize,
) -> Result<(), String> {
    let differing = [
        ("--replicas", config.replicas, layout_replicas),
        ("--vnodes", config.vnodes, layout_vnodes),
    ];
    let Some((flag, given, cluster)) = differing
        .into_iter()
        .find(|(_, given, cluster)| given != cluster)
    else {
        return Ok(());
    };
    Err(format!(
        "{flag} {given} differs from this node's cluster, which uses {flag} {cluster} (its layout \
         v{layout_version}, fixed when the cluster was started): start this node with \
         {flag} {cluster}; a cluster's replica count and vnodes cannot be changed in place"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(flags: &[&str]) -> ServerConfig {
        let mut list = vec!["DKVSServer", "--listen", "127.0.0.1:7001"];
        list.extend_from_slice(flags);
        ServerConfig::from_arg_list(list.into_iter().map(String::from).collect()).expect("parse")
    }

    #[test]
    fn the_defaults_pass() {
        assert_eq!(check(&config(&[])), Ok(()));
    }

    #[test]
    fn addresses_are_host_and_port() {
        for good in [
            "127.0.0.1:7001",
            "node-1.example:7001",
            "[::1]:7001",
            "n1:1",
        ] {
            assert!(host_port(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("127.0.0.1", "port is missing"),
            ("127.0.0.1:70000", "not a number from 1 to 65535"),
            ("127.0.0.1:x", "not a number"),
            (":7001", "not a host name"),
            ("::1:7001", "[address]:port"),
            ("[::g]:7001", "not an IPv6 address"),
            ("no spaces:7001", "not a host name"),
            ("-bad:7001", "not a host name"),
            ("a..b:7001", "not a host name"),
        ] {
            let error = host_port(bad).expect_err(bad);
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn every_peers_and_join_entry_is_checked_naming_the_flag() {
        let error = check(&config(&["--peers", "127.0.0.1:7001,127.0.0.1"])).expect_err("peers");
        assert!(error.starts_with("--peers entry \"127.0.0.1\""), "{error}");
        let error = check(&config(&["--join", "seed"])).expect_err("join");
        assert!(error.starts_with("--join entry \"seed\""), "{error}");
        let error = check(&config(&["--advertise", "n1"])).expect_err("advertise");
        assert!(error.starts_with("--advertise"), "{error}");
        // A trailing comma is no entry.
        assert_eq!(check(&config(&["--peers", "127.0.0.1:7001,"])), Ok(()));
        // Port 0: only this node's own address (a lone node on a port the
        // OS picks) may have it.
        let error = check(&config(&["--peers", "127.0.0.1:7001,127.0.0.1:0"])).expect_err("0");
        assert!(error.contains("port 0 cannot be dialled"), "{error}");
        let lone = ServerConfig::from_arg_list(
            [
                "DKVSServer",
                "--listen",
                "127.0.0.1:0",
                "--peers",
                "127.0.0.1:0",
            ]
            .map(String::from)
            .to_vec(),
        )
        .expect("parse");
        assert_eq!(check(&lone), Ok(()));
    }

    #[test]
    fn duplicates_are_refused() {
        let error = check(&config(&[
            "--peers",
            "127.0.0.1:7001,127.0.0.1:7002, 127.0.0.1:7002",
        ]))
        .expect_err("duplicate");
        assert!(
            error.contains("--peers names 127.0.0.1:7002 twice"),
            "{error}"
        );
        let error =
            check(&config(&["--join", "127.0.0.1:7002,127.0.0.1:7002"])).expect_err("duplicate");
        assert!(
            error.contains("--join names 127.0.0.1:7002 twice"),
            "{error}"
        );
    }

    #[test]
    fn zero_intervals_are_refused() {
        let mut zero = config(&[]);
        zero.heartbeat_interval_ms = 0;
        assert_eq!(
            check(&zero),
            Err("--heartbeat-interval-ms must be at least 1".into())
        );
        let mut zero = config(&[]);
        zero.tombstone_grace = 0;
        assert!(
            check(&zero)
                .expect_err("zero")
                .starts_with("--tombstone-grace")
        );
        // And at parse time, naming the flag.
        let parsed = ServerConfig::from_arg_list(
            [
                "DKVSServer",
                "--listen",
                "127.0.0.1:7001",
                "--rpc-timeout-ms",
                "0",
            ]
            .map(String::from)
            .to_vec(),
        );
        assert!(
            parsed
                .expect_err("zero")
                .to_string()
                .contains("--rpc-timeout-ms")
        );
    }

    #[test]
    fn thresholds_are_finite_and_positive() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, 0.0] {
            let error = threshold("--phi-threshold", bad).expect_err("bad");
            assert!(error.starts_with("--phi-threshold"), "{error}");
        }
        assert_eq!(threshold("--phi-threshold", 8.0), Ok(()));
        let mut nan = config(&[]);
        nan.phi_threshold = f64::NAN;
        assert!(
            check(&nan)
                .expect_err("NaN")
                .contains("--phi-threshold NaN")
        );
    }

    #[test]
    fn values_must_fit_a_grpc_message() {
        assert_eq!(value_bytes(MAX_VALUE_BYTES_LIMIT), Ok(()));
        let error = value_bytes(MAX_VALUE_BYTES_LIMIT + 1).expect_err("too large");
        assert!(error.starts_with("--max-value-bytes 268435457"), "{error}");
        assert!(value_bytes(usize::MAX).is_err());
        assert!(value_bytes(0).is_err());
        // Parsed from the command line, past the limit: the same message.
        let config = config(&["--max-value-bytes", "4000000000"]);
        assert!(
            check(&config)
                .expect_err("large")
                .contains("one gRPC message")
        );
    }

    #[test]
    fn layout_flags_name_the_flag_that_differs_and_the_clusters_value() {
        let config = config(&["--replicas", "5"]);
        assert_eq!(
            layout_flags(&config, 4, 5, crate::config::DEFAULT_VNODES),
            Ok(())
        );
        let error = layout_flags(&config, 4, 3, crate::config::DEFAULT_VNODES).expect_err("N");
        assert!(
            error.starts_with("--replicas 5 differs") && error.contains("uses --replicas 3"),
            "{error}"
        );
        let error = layout_flags(&config, 4, 5, 16).expect_err("vnodes");
        assert!(
            error.contains("--vnodes 256 differs") && error.contains("--vnodes 16"),
            "{error}"
        );
    }
}
