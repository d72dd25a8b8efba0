//! Flags, the TOML file, ranges and cross-flag checks.

use super::*;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn defaults_and_members() {
    let config = ServerConfig::from_arg_list(args(&[
        "DKVSServer",
        "--listen",
        "127.0.0.1:7001",
        "--peers",
        "127.0.0.1:7002,127.0.0.1:7001, 127.0.0.1:7003",
    ]))
    .expect("parse");
    assert_eq!(config.replicas, 3);
    assert_eq!(config.vnodes, DEFAULT_VNODES);
    assert_eq!(config.fsync, FsyncPolicy::Periodic);
    assert_eq!(
        config.member_addresses(),
        args(&["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])
    );
    assert_eq!(config.data_dir(), PathBuf::from("data/127.0.0.1_7001"));
}

/// Parses `--config FILE` (FILE holding `text`) followed by `flags`;
/// an error is returned as the message DKVSServer prints.
fn with_file(text: &str, flags: &[&str]) -> Result<ServerConfig, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.toml");
    std::fs::write(&path, text).expect("write");
    let path = path.to_str().expect("utf-8 path").to_string();
    let mut list = vec!["DKVSServer", "--config", &path];
    list.extend_from_slice(flags);
    ServerConfig::from_arg_list(args(&list))
        .map_err(|error| error.to_string().replace(&path, "node.toml"))
}

#[test]
fn a_toml_file_sets_every_kind_of_value() {
    let config = with_file(
        r#"# a node
listen = "127.0.0.1:7001"
peers = ["127.0.0.1:7002", "127.0.0.1:7003"]   # an array
data_dir = 'data/n1'
replicas = 5
vnodes = 0x40              # hex is TOML too
phi_threshold = 9.5        # `_` or `-`
heartbeat-interval-ms = 250
fsync = "always"
storage-engine = "fjall"
max-hint-bytes = 1_000_000
"#,
        &[],
    )
    .expect("parse");
    assert_eq!(config.listen.to_string(), "127.0.0.1:7001");
    assert_eq!(
        config.member_addresses(),
        args(&["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])
    );
    assert_eq!(config.data_dir(), PathBuf::from("data/n1"));
    assert_eq!(config.replicas, 5);
    assert_eq!(config.vnodes, 64);
    assert_eq!(config.phi_threshold, 9.5);
    assert_eq!(config.heartbeat_interval_ms, 250);
    assert_eq!(config.fsync, FsyncPolicy::Always);
    assert_eq!(config.storage_engine, Engine::Fjall);
    assert_eq!(config.max_hint_bytes, 1_000_000);
    // Peers may also be one comma-separated string, as on the command line;
    // a whole number is a number where a fraction is allowed.
    let config = with_file(
        "listen = \"127.0.0.1:7001\"\npeers = \"127.0.0.1:7002, 127.0.0.1:7003\"\nphi-threshold = 12\n",
        &[],
    )
    .expect("parse");
    assert_eq!(config.member_addresses().len(), 3);
    assert_eq!(config.phi_threshold, 12.0);
}

#[test]
fn config_file_is_overridden_by_flags() {
    let config = with_file(
        "listen = \"127.0.0.1:7001\"\nreplicas = 5\nvnodes = 64\npeers = [\"127.0.0.1:7002\"]\n",
        &["--replicas", "2", "--peers=127.0.0.1:7009"],
    )
    .expect("parse");
    assert_eq!(config.listen.to_string(), "127.0.0.1:7001");
    assert_eq!(config.replicas, 2);
    assert_eq!(config.vnodes, 64);
    assert_eq!(
        config.member_addresses(),
        args(&["127.0.0.1:7001", "127.0.0.1:7009"])
    );
}

/// The error for `text`, which must name `line` of node.toml.
fn file_error(text: &str, line: &str) -> String {
    let error = with_file(text, &[]).expect_err(text);
    assert!(error.contains(&format!("node.toml {line}")), "{error}");
    assert_eq!(error.matches("node.toml").count(), 1, "{error}");
    error
}

#[test]
fn an_unknown_setting_names_its_line() {
    let error = file_error("listen = \"127.0.0.1:7001\"\n\nbogus_flag = 1\n", "line 3:");
    assert!(error.contains("unknown setting `bogus_flag`"), "{error}");
    // --help and --version are no settings.
    file_error("help = true\n", "line 1:");
}

#[test]
fn a_syntax_error_names_its_line_and_column() {
    let error = file_error(
        "listen = \"127.0.0.1:7001\"\nreplicas = = 3\n",
        "line 2, column 12:",
    );
    assert!(error.contains("`replicas = = 3`"), "{error}");
    let error = file_error("# a node\ndata_dir = \"d\n", "line 2, column");
    assert!(error.contains("string"), "{error}");
}

#[test]
fn a_value_of_the_wrong_type_names_its_line() {
    let error = file_error("listen = \"127.0.0.1:7001\"\nreplicas = \"3\"\n", "line 2:");
    assert!(
        error.contains("`replicas` takes a whole number, not a string: write replicas = 3"),
        "{error}"
    );
    let error = file_error("listen = 7001\n", "line 1:");
    assert!(
        error.contains("`listen` takes a string, not an integer: quote it, listen = \"7001\""),
        "{error}"
    );
    let error = file_error(
        "listen = \"127.0.0.1:7001\"\nphi-threshold = true\n",
        "line 2:",
    );
    assert!(error.contains("takes a number, not a boolean"), "{error}");
    let error = file_error(
        "listen = \"127.0.0.1:7001\"\npeers = [\"127.0.0.1:7002\", 7003]\n",
        "line 2:",
    );
    assert!(
        error.contains("an item of the array is an integer"),
        "{error}"
    );
    let error = file_error("listen = \"127.0.0.1:7001\"\n[peers]\na = 1\n", "line 2:");
    assert!(error.contains("not a table"), "{error}");
}

#[test]
fn a_value_out_of_range_names_the_range_and_its_line() {
    let error = file_error("listen = \"127.0.0.1:7001\"\n\nvnodes = 0\n", "line 3:");
    assert!(error.contains("0 is not in 1..=65536"), "{error}");
    let error = file_error(
        "listen = \"127.0.0.1:7001\"\nphi_threshold = 0.0\n",
        "line 2:",
    );
    assert!(error.contains("0 < phi <= 1000000"), "{error}");
    let error = file_error(
        "listen = \"127.0.0.1:7001\"\nfsync = \"sometimes\"\n",
        "line 2:",
    );
    assert!(
        error.contains("[possible values: always, periodic]"),
        "{error}"
    );
    file_error("listen = \"localhost\"\n", "line 1:");
}

#[test]
fn a_config_file_cannot_name_another_nor_set_a_flag_twice() {
    let error = file_error(
        "listen = \"127.0.0.1:7001\"\nconfig = \"other.toml\"\n",
        "line 2:",
    );
    assert!(error.contains("cannot name another"), "{error}");
    let error = file_error(
        "phi-threshold = 8.0\nlisten = \"127.0.0.1:7001\"\nphi_threshold = 9.0\n",
        "line 3:",
    );
    assert!(error.contains("already set on line 1"), "{error}");
}

#[test]
fn a_hash_inside_a_string_is_part_of_the_value() {
    let config = with_file(
        "listen = \"127.0.0.1:7001\"\ndata_dir = \"d#x\"  # the data\n",
        &[],
    )
    .expect("parse");
    assert_eq!(config.data_dir(), PathBuf::from("d#x"));
}

#[test]
fn the_old_unquoted_format_is_refused_with_the_fix() {
    let error = file_error("# a node\nlisten = 127.0.0.1:7001\n", "line 2:");
    assert!(
        error.contains(
            "`listen = 127.0.0.1:7001` is not TOML; quote strings: listen = \"127.0.0.1:7001\""
        ),
        "{error}"
    );
    let error = file_error(
        "listen = \"127.0.0.1:7001\"\nfsync = always   # fsync before every ack\n",
        "line 2:",
    );
    assert!(
        error.contains("`fsync = always` is not TOML; quote strings: fsync = \"always\""),
        "{error}"
    );
}

#[test]
fn values_that_make_no_sense_are_refused_with_the_range() {
    for (flag, value) in [
        ("--phi-threshold", "0"),
        ("--phi-threshold", "-1"),
        ("--worker-threads", "0"),
        ("--max-key-bytes", "0"),
        ("--max-value-bytes", "0"),
        ("--rpc-timeout-ms", "0"),
        ("--heartbeat-interval-ms", "0"),
        ("--anti-entropy-interval", "0"),
    ] {
        let error = ServerConfig::from_arg_list(args(&[
            "DKVSServer",
            "--listen",
            "127.0.0.1:7001",
            &format!("{flag}={value}"),
        ]))
        .expect_err(flag);
        assert!(error.to_string().contains(flag), "{flag}: {error}");
    }
}

#[test]
fn tombstone_grace_must_cover_clock_skew_and_hint_age() {
    let parse = |extra: &[&str]| {
        let mut list = vec!["DKVSServer", "--listen", "127.0.0.1:7001"];
        list.extend_from_slice(extra);
        ServerConfig::from_arg_list(args(&list)).expect("parse")
    };
    assert_eq!(parse(&[]).validate(), Ok(()));
    let error = parse(&["--tombstone-grace", "121", "--max-hint-age-secs", "1"])
        .validate()
        .expect_err("1 s + 2 x 60 s skew + heartbeat > 121 s");
    assert!(error.contains("--max-clock-skew-ms"), "{error}");
    assert_eq!(
        parse(&[
            "--tombstone-grace",
            "3",
            "--max-hint-age-secs",
            "1",
            "--max-clock-skew-ms",
            "500"
        ])
        .validate(),
        Ok(())
    );
    let error = parse(&["--tombstone-grace", "100", "--max-hint-age-secs", "100"])
        .validate()
        .expect_err("hint age");
    assert!(error.contains("--max-hint-age-secs"), "{error}");
}

#[test]
fn zero_replicas_is_rejected() {
    let error = ServerConfig::from_arg_list(args(&[
        "DKVSServer",
        "--listen",
        "127.0.0.1:7001",
        "--replicas",
        "0",
    ]))
    .expect_err("zero replicas");
    assert!(error.to_string().contains("replicas"), "{error}");
}

#[test]
fn a_bootstrapping_node_must_be_in_its_own_peers() {
    let parse = |list: &[&str]| {
        let mut all = vec!["DKVSServer", "--listen", "127.0.0.1:7001"];
        all.extend_from_slice(list);
        ServerConfig::from_arg_list(args(&all)).expect("parse")
    };
    let missing = parse(&["--peers", "127.0.0.1:7002,127.0.0.1:7003"])
        .validate()
        .expect_err("refused");
    assert!(
        missing.starts_with("127.0.0.1:7001 is not in --peers")
            && missing.contains("joins with --join SEED"),
        "{missing}"
    );
    parse(&["--peers", "127.0.0.1:7002,127.0.0.1:7001"])
        .validate()
        .expect("listed");
    // Spelled as --advertise gives it; a lone node; a joiner.
    parse(&["--advertise", "n1:7001", "--peers", "n1:7001,n2:7001"])
        .validate()
        .expect("advertised");
    parse(&[]).validate().expect("alone");
    parse(&["--join", "127.0.0.1:7002"])
        .validate()
        .expect("joins");
}

#[test]
fn the_cluster_token_is_a_flag_and_a_setting() {
    let config = with_file(
        "listen = \"127.0.0.1:7001\"\ncluster-token = \"blue\"\n",
        &[],
    )
    .expect("parse");
    assert_eq!(config.cluster_token.as_deref(), Some("blue"));
    assert_eq!(
        config.cluster_token_id(),
        crate::layout::cluster_id::id_of_token("blue")
    );
    let flag = with_file(
        "cluster-token = \"blue\"\n",
        &["--listen", "127.0.0.1:7001", "--cluster-token", "red"],
    )
    .expect("parse");
    assert_eq!(flag.cluster_token.as_deref(), Some("red"));
    let none = with_file("listen = \"127.0.0.1:7001\"\n", &[]).expect("parse");
    assert_eq!(none.cluster_token_id(), 0);
}

#[test]
fn tokens_need_tls_unless_plaintext_is_asked_for_and_tls_needs_all_three_files() {
    let parse = |list: &[&str]| {
        let mut all = vec!["DKVSServer", "--listen", "127.0.0.1:7001"];
        all.extend_from_slice(list);
        ServerConfig::from_arg_list(args(&all)).expect("parse")
    };
    let tls = [
        "--tls-cert",
        "n.pem",
        "--tls-key",
        "n-key.pem",
        "--tls-ca",
        "ca.pem",
    ];
    let error = parse(&["--auth-file", "tokens"])
        .validate()
        .expect_err("no TLS");
    assert!(error.contains("--insecure-plaintext-auth"), "{error}");
    parse(&["--auth-file", "tokens", "--insecure-plaintext-auth"])
        .validate()
        .expect("asked for");
    let mut secured = vec!["--auth-file", "tokens"];
    secured.extend(tls);
    let config = parse(&secured);
    config.validate().expect("TLS");
    assert_eq!(
        config.tls_files().map(|f| f.ca),
        Some(std::path::PathBuf::from("ca.pem"))
    );
    assert!(parse(&[]).tls_files().is_none());
    // One TLS file without the others is a usage error.
    assert!(
        ServerConfig::try_parse_from([
            "DKVSServer",
            "--listen",
            "127.0.0.1:7001",
            "--tls-cert",
            "n.pem"
        ])
        .is_err()
    );
    // The config file takes them too, the switch as a boolean.
    let from_file = with_file(
        "listen = \"127.0.0.1:7001\"\nauth-file = \"tokens\"\ninsecure-plaintext-auth = true\n",
        &[],
    )
    .expect("parse");
    from_file
        .validate()
        .expect("plaintext asked for in the file");
}
