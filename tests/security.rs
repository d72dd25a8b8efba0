//! Security on real processes (DESIGN.md, "Security"): 3-node clusters that
//! serve TLS only, with an auth file of `read`, `readwrite` and `admin`
//! tokens, probed from outside as a client, a stranger holding a token, a
//! node certificate of another CA, and a valid node certificate of an
//! address that is not a member.
//!
//! Certificates come from `DKVSClient certs`, made after the ports are
//! picked (a node certificate names its exact address). Every wait polls
//! with a deadline; certificate and token reloads are seen in the nodes'
//! logs or in calls that start to succeed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestCluster, TlsAccess, eventually, free_address, tls_channel};
use dkvs::net::{Dialer, TlsDialer};
use dkvs::pb;
use dkvs::security::tls::{ClientTls, NodeTls, TlsFiles};
use tonic::Code;
use tonic::transport::Channel;

/// The tokens every secured cluster starts with, one per role.
const TOKENS: &str = "read-token read\nrw-token readwrite\nadmin-token admin\n";
const READ: &str = "read-token";
const READ_WRITE: &str = "rw-token";
const ADMIN: &str = "admin-token";

/// What a node logs when a TLS handshake fails (at debug level).
const HANDSHAKE_FAILED: &str = "TLS handshake failed";

/// What a joining node logs each time no seed admitted it.
const JOIN_RETRY: &str = "no seed could add this node yet";

/// How long a certificate or token reload may take to show (the files are
/// checked every 2 s; the machine is shared and slow).
const RELOAD_DEADLINE: Duration = Duration::from_secs(20);

/// Makes a CA in `dir` (or reuses the one there) and a node certificate
/// for each address, with `DKVSClient certs`.
fn make_certs(dir: &Path, addresses: &[&str]) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_DKVSClient"));
    command.arg("certs").arg("--dir").arg(dir);
    for address in addresses {
        command.args(["--node", address]);
    }
    let output = command.output().expect("run DKVSClient certs");
    assert!(
        output.status.success(),
        "DKVSClient certs failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The certificate and key files `make_certs` wrote for `address` in `dir`.
fn node_files(dir: &Path, address: &str) -> (PathBuf, PathBuf) {
    let name = format!("node-{}", address.replace(':', "-"));
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    )
}

/// Replaces `path`'s contents at once (write aside, then rename), so a
/// reload never reads half a file.
fn replace_file(path: &Path, contents: &[u8]) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, contents).expect("write the new file");
    std::fs::rename(&aside, path).expect("move the new file in place");
}

fn read_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read a certificate file")
}

/// A secured cluster and its PKI directory:
///
/// * `ca1/`: the CA the nodes start with, and each node's certificate;
/// * `live/`: the files the nodes' flags name (copies, so that rotation can
///   replace them): `trust.pem` (`--tls-ca`), `node<i>.pem`, `node<i>-key.pem`;
/// * `tokens` (`--auth-file`).
struct Secured {
    /// Declared first: the nodes stop before their files go.
    cluster: TestCluster,
    pki: tempfile::TempDir,
}

impl Secured {
    async fn start(count: usize) -> Self {
        let pki = tempfile::tempdir().expect("tempdir");
        let root = pki.path().to_path_buf();
        std::fs::create_dir_all(root.join("live")).expect("mkdir live");
        std::fs::write(root.join("tokens"), TOKENS).expect("write the auth file");
        let access = TlsAccess {
            ca: root.join("live").join("trust.pem"),
            token: READ.to_string(),
        };
        let cluster = TestCluster::start_secured(count, access, |_, addresses| {
            let ca1 = root.join("ca1");
            let named: Vec<&str> = addresses.iter().map(String::as_str).collect();
            make_certs(&ca1, &named);
            let live = root.join("live");
            replace_file(&live.join("trust.pem"), &read_bytes(&ca1.join("ca.pem")));
            addresses
                .iter()
                .enumerate()
                .map(|(i, address)| {
                    let (cert, key) = node_files(&ca1, address);
                    replace_file(&live.join(format!("node{i}.pem")), &read_bytes(&cert));
                    replace_file(&live.join(format!("node{i}-key.pem")), &read_bytes(&key));
                    Secured::flags(&root, i)
                })
                .collect()
        })
        .await;
        Self { cluster, pki }
    }

    /// The security flags of node `i` (its files in `live/`).
    fn flags(root: &Path, i: usize) -> Vec<String> {
        let live = root.join("live");
        Secured::flags_of(
            &live.join(format!("node{i}.pem")),
            &live.join(format!("node{i}-key.pem")),
            &live.join("trust.pem"),
            &root.join("tokens"),
        )
    }

    /// The flags of a node serving TLS with these files and `--auth-file`.
    fn flags_of(cert: &Path, key: &Path, ca: &Path, tokens: &Path) -> Vec<String> {
        let mut flags = Vec::new();
        for (flag, file) in [
            ("--tls-cert", cert),
            ("--tls-key", key),
            ("--tls-ca", ca),
            ("--auth-file", tokens),
        ] {
            flags.push(flag.to_string());
            flags.push(file.display().to_string());
        }
        flags
    }

    fn root(&self) -> &Path {
        self.pki.path()
    }

    /// The first CA's directory.
    fn ca1(&self) -> PathBuf {
        self.root().join("ca1")
    }

    fn address(&self, i: usize) -> String {
        self.cluster.nodes[i].address.clone()
    }

    /// The CA file the nodes trust (`--tls-ca`): the first CA's
    /// certificate, both CAs' once rotation began.
    fn trust(&self) -> PathBuf {
        self.root().join("live").join("trust.pem")
    }

    /// A TLS channel to node `i` that trusts what the nodes trust and
    /// presents no certificate.
    fn channel(&self, i: usize) -> Channel {
        tls_channel(&self.trust(), &self.address(i))
    }

    /// A TLS channel to node `i` that trusts what the nodes trust and
    /// presents the certificate `cert` (with `key`).
    fn channel_presenting(&self, i: usize, cert: PathBuf, key: PathBuf) -> Channel {
        let tls = NodeTls::load(TlsFiles {
            cert,
            key,
            ca: self.trust(),
        })
        .expect("load the client's certificate");
        TlsDialer::new(ClientTls::Node(Arc::new(tls)))
            .dial(&self.address(i))
            .expect("valid address")
    }

    fn kv(&self, i: usize) -> pb::key_value_client::KeyValueClient<Channel> {
        pb::key_value_client::KeyValueClient::new(self.channel(i))
    }

    /// `Cluster.Status` of node `i`, asked with the admin token.
    async fn status(&self, i: usize) -> pb::StatusResponse {
        pb::cluster_client::ClusterClient::new(self.channel(i))
            .status(request(pb::StatusRequest {}, Some(ADMIN)))
            .await
            .expect("Cluster.Status with the admin token")
            .into_inner()
    }

    /// Whether `key` is found through node `i` (a QUORUM GET, readwrite token).
    async fn found(&self, i: usize, key: &str) -> bool {
        self.kv(i)
            .get(request(common::get_request(key), Some(READ_WRITE)))
            .await
            .expect("GET with the readwrite token")
            .into_inner()
            .found
    }

    /// PUT through node `i` with `token`.
    async fn put(&self, i: usize, key: &str, token: &str) -> Result<(), tonic::Status> {
        self.kv(i)
            .put(request(common::put_request(key, "v"), Some(token)))
            .await
            .map(|_| ())
    }

    /// Runs DKVSClient against this cluster with TLS (trusting what the
    /// nodes trust) and `args`, `env` added.
    fn client(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let ca = self.trust().display().to_string();
        let mut all = vec!["--tls-ca", &ca];
        all.extend_from_slice(args);
        self.client_plain(&all, env)
    }

    /// Runs DKVSClient against this cluster with exactly `args` and `env`.
    fn client_plain(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let nodes = self.cluster.addresses().join(",");
        let mut command = Command::new(env!("CARGO_BIN_EXE_DKVSClient"));
        for variable in ["DKVS_NODES", "DKVS_TLS_CA", "DKVS_TOKEN", "DKVS_TOKEN_FILE"] {
            command.env_remove(variable);
        }
        command
            .args(["--nodes", &nodes, "--timeout-ms", "5000"])
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("run DKVSClient")
    }

    /// Waits until node `i`'s log has `count` lines containing `text`.
    async fn wait_log(&self, i: usize, text: &str, count: usize) {
        eventually(RELOAD_DEADLINE, async || {
            let seen = self.cluster.log_of(i).matches(text).count();
            if seen >= count {
                Ok(())
            } else {
                Err(format!(
                    "node {i} logged {text:?} {seen} times, not {count}:\n{}",
                    self.cluster.log_tail_of(i)
                ))
            }
        })
        .await
    }
}

/// `message` with a deadline and, if given, `authorization: Bearer <token>`.
fn request<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(5));
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("ASCII token");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts DKVSClient exited with `code` and `text` in its stderr.
fn assert_exit(output: &Output, code: i32, text: &str, what: &str) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: exit code; stderr: {}",
        stderr(output)
    );
    assert!(
        stderr(output).contains(text),
        "{what}: stderr should say {text:?}: {}",
        stderr(output)
    );
}

fn assert_refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, what: &str) {
    match result {
        Err(status) => assert_eq!(status.code(), code, "{what}: {status:?}"),
        Ok(reply) => panic!("{what}: answered {reply:?}, expected {code:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_need_tls_and_a_token_of_the_right_role() {
    let secured = Secured::start(3).await;
    let address = secured.address(0);

    // 1. Plaintext is refused: a gRPC call, and DKVSClient without --tls-ca.
    let plaintext = pb::key_value_client::KeyValueClient::new(common::channel(&address).await)
        .get(request(common::get_request("k"), Some(READ_WRITE)))
        .await;
    assert!(plaintext.is_err(), "plaintext GET answered: {plaintext:?}");
    let output = secured.client_plain(&["GET", "k"], &[]);
    assert!(!output.status.success(), "plaintext DKVSClient succeeded");
    assert!(
        stderr(&output).contains("pass --tls-ca"),
        "DKVSClient without --tls-ca should say to pass it: {}",
        stderr(&output)
    );
    // With a token it does not even try: the token would travel in clear.
    let output = secured.client_plain(&["GET", "k"], &[("DKVS_TOKEN", READ_WRITE)]);
    assert_exit(
        &output,
        2,
        "--tls-ca",
        "DKVSClient with a token, without --tls-ca",
    );

    // 2. No token, or one the nodes do not know: UNAUTHENTICATED.
    assert_refused(
        secured
            .kv(0)
            .get(request(common::get_request("k"), None))
            .await,
        Code::Unauthenticated,
        "GET without a token",
    );
    assert_refused(
        secured
            .kv(1)
            .get(request(common::get_request("k"), Some("no-such-token")))
            .await,
        Code::Unauthenticated,
        "GET with an unknown token",
    );
    let output = secured.client(&["GET", "k"], &[]);
    assert_exit(
        &output,
        5,
        "Unauthenticated",
        "DKVSClient GET without a token",
    );
    let output = secured.client(&["GET", "k"], &[("DKVS_TOKEN", "no-such-token")]);
    assert_exit(
        &output,
        5,
        "Unauthenticated",
        "DKVSClient GET, unknown token",
    );

    // A read token may not write, and its PUT writes nothing.
    assert_refused(
        secured.put(0, "read-put", READ).await,
        Code::PermissionDenied,
        "PUT with a read token",
    );
    let output = secured.client(&["PUT", "read-put", "v"], &[("DKVS_TOKEN", READ)]);
    assert_exit(
        &output,
        5,
        "readwrite role",
        "DKVSClient PUT with a read token",
    );
    assert!(
        !secured.found(1, "read-put").await,
        "a read token's PUT wrote"
    );

    // A readwrite token works through DKVSClient, from a file or DKVS_TOKEN.
    let token_file = secured.root().join("rw-token-file");
    std::fs::write(&token_file, format!("{READ_WRITE}\n")).expect("write the token file");
    let token_file = token_file.display().to_string();
    let from_file = ["--token-file", token_file.as_str()];
    let output = secured.client(&[&from_file[..], &["PUT", "k", "v1"]].concat(), &[]);
    assert_exit(&output, 0, "", "PUT, token from --token-file");
    let output = secured.client(&["GET", "k"], &[("DKVS_TOKEN", READ_WRITE)]);
    assert_exit(&output, 0, "", "GET, token from DKVS_TOKEN");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "v1");
    let output = secured.client(&["DELETE", "k"], &[("DKVS_TOKEN", READ_WRITE)]);
    assert_exit(&output, 0, "", "DELETE, token from DKVS_TOKEN");
    let output = secured.client(&[&from_file[..], &["GET", "k"]].concat(), &[]);
    assert_exit(&output, 1, "", "GET of the deleted key");

    // An admin-only call with a readwrite token: PERMISSION_DENIED.
    assert_refused(
        pb::cluster_client::ClusterClient::new(secured.channel(2))
            .abort(request(pb::AbortRequest {}, Some(READ_WRITE)))
            .await,
        Code::PermissionDenied,
        "Cluster.Abort with a readwrite token",
    );
}

/// Every node-to-node RPC through `channel`, with `token`: what each answered.
async fn node_to_node_calls(
    channel: Channel,
    token: Option<&str>,
    forged_write: &pb::ReplicaWriteRequest,
    forged_layout: &pb::Layout,
) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    let mut replica = pb::replica_client::ReplicaClient::new(channel.clone());
    let mut membership = pb::membership_client::MembershipClient::new(channel.clone());
    let mut liveness = pb::liveness_client::LivenessClient::new(channel);
    let r = |m| request(m, token);
    let mut answers = Vec::new();
    let mut note = |name, result: Result<(), tonic::Status>| answers.push((name, result));
    note(
        "Replica.Write",
        replica.write(r(forged_write.clone())).await.map(drop),
    );
    note(
        "Replica.Read",
        replica
            .read(request(
                pb::ReplicaReadRequest {
                    key: forged_write.key.clone(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
    );
    let batch = pb::ReplicaBatchRequest {
        writes: vec![forged_write.clone()],
        reads: Vec::new(),
    };
    note(
        "Replica.Batch",
        replica.batch(request(batch, token)).await.map(drop),
    );
    let hint = pb::StoreHintRequest {
        target: "127.0.0.1:1".into(),
        key: forged_write.key.clone(),
        record: forged_write.record.clone(),
    };
    note(
        "Replica.StoreHint",
        replica.store_hint(request(hint, token)).await.map(drop),
    );
    note(
        "Replica.RangeDigests",
        replica
            .range_digests(request(pb::RangeDigestsRequest::default(), token))
            .await
            .map(drop),
    );
    note(
        "Replica.RangeEntries",
        replica
            .range_entries(request(pb::RangeEntriesRequest::default(), token))
            .await
            .map(drop),
    );
    note(
        "Replica.Stats",
        replica
            .stats(request(pb::StatsRequest {}, token))
            .await
            .map(drop),
    );
    note(
        "Membership.LayoutPrepare",
        membership
            .layout_prepare(request(pb::LayoutPrepareRequest::default(), token))
            .await
            .map(drop),
    );
    note(
        "Membership.LayoutAccept",
        membership
            .layout_accept(request(pb::LayoutAcceptRequest::default(), token))
            .await
            .map(drop),
    );
    note(
        "Membership.LayoutCommit",
        membership
            .layout_commit(request(forged_layout.clone(), token))
            .await
            .map(drop),
    );
    note(
        "Membership.LayoutVouch",
        membership
            .layout_vouch(request(pb::LayoutVouchRequest::default(), token))
            .await
            .map(drop),
    );
    note(
        "Membership.StreamRecords",
        membership
            .stream_records(request(pb::StreamRequest::default(), token))
            .await
            .map(drop),
    );
    note(
        "Liveness.Ping",
        liveness
            .ping(request(
                pb::PingRequest {
                    from: "127.0.0.1:1".into(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
    );
    answers
}

/// Node-to-node calls that would do harm if they got through.
struct Forged {
    /// A write of `forged` far ahead of any clock.
    write: pb::ReplicaWriteRequest,
    /// The layout served, 100 versions on and without its last member.
    layout: pb::Layout,
}

impl Forged {
    fn against(layout: &pb::Layout) -> Forged {
        let write = pb::ReplicaWriteRequest {
            key: "forged".into(),
            record: Some(pb::Record {
                version: Some(pb::Version {
                    lamport: 1 << 62,
                    node_id: 1,
                }),
                tombstone: false,
                value: b"forged".to_vec().into(),
                deleted_at_ms: 0,
            }),
            layout_version: layout.version,
            copy: false,
        };
        let mut forged_layout = layout.clone();
        forged_layout.version += 100;
        forged_layout.members.pop();
        forged_layout.change = "forged".into();
        Forged {
            write,
            layout: forged_layout,
        }
    }
}

/// Asserts every node-to-node RPC through `channel` (with `token`) fails
/// the way `refused` accepts.
async fn assert_each_refused(
    channel: Channel,
    token: Option<&str>,
    forged: &Forged,
    refused: impl Fn(&tonic::Status) -> bool,
    who: &str,
) {
    for (name, answer) in node_to_node_calls(channel, token, &forged.write, &forged.layout).await {
        match answer {
            Err(status) if refused(&status) => {}
            other => panic!("{name} from {who}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_to_node_services_refuse_all_but_member_certificates() {
    let mut secured = Secured::start(3).await;
    let layout = secured.status(0).await.layout.expect("a layout");
    let forged = Forged::against(&layout);

    // (a)-(c) A client over TLS, with no token or any token: refused.
    let by_the_gate = |status: &tonic::Status| {
        matches!(
            status.code(),
            Code::Unauthenticated | Code::PermissionDenied
        )
    };
    for token in [None, Some(READ_WRITE), Some(ADMIN)] {
        for i in 0..3 {
            let who = format!("a client with token {token:?} to node {i}");
            assert_each_refused(secured.channel(i), token, &forged, by_the_gate, &who).await;
        }
    }

    // (d) A node certificate of another CA (naming a member, even): the
    // handshake fails (the node sends an UnknownCA alert), so each call
    // fails in the client's transport and none reaches the gate.
    let ca2 = secured.root().join("ca2");
    let member = secured.address(1);
    make_certs(&ca2, &[&member]);
    let (cert, key) = node_files(&ca2, &member);
    let foreign = secured.channel_presenting(0, cert, key);
    let by_the_handshake = |status: &tonic::Status| {
        std::error::Error::source(status).is_some()
            && matches!(
                status.code(),
                Code::Unknown | Code::Cancelled | Code::Unavailable
            )
    };
    let who = "another CA's certificate";
    assert_each_refused(foreign, None, &forged, by_the_handshake, who).await;

    // (e) A valid certificate of an address that is not a member.
    a_non_member_certificate_opens_only_the_read_only_doors(&secured, &forged, &layout).await;

    // Nothing changed: the forged write is nowhere, the layout is the same,
    // and writes still work.
    for i in 0..3 {
        let status = secured.status(i).await;
        assert_eq!(status.layout.map(|l| l.version), Some(layout.version));
        assert_eq!(status.members.len(), 3, "members on node {i}");
    }
    assert!(!secured.found(0, "forged").await, "the forged write shows");
    for i in 0..3 {
        secured
            .put(i, &format!("after-{i}"), READ_WRITE)
            .await
            .expect("PUT after the forged calls");
    }

    // 4. A node of another CA cannot take part.
    a_node_of_another_ca_cannot_join(&mut secured, &ca2).await;
}

/// A valid node certificate (our CA) naming an address that is not a
/// member: the node services refuse it; the read-only layout fetch
/// answers; a join as another address than the certificate names is
/// refused.
async fn a_non_member_certificate_opens_only_the_read_only_doors(
    secured: &Secured,
    forged: &Forged,
    layout: &pb::Layout,
) {
    let stranger = free_address();
    make_certs(&secured.ca1(), &[&stranger]);
    let (cert, key) = node_files(&secured.ca1(), &stranger);
    let channel = secured.channel_presenting(0, cert, key);
    assert_refused(
        pb::replica_client::ReplicaClient::new(channel.clone())
            .write(request(forged.write.clone(), None))
            .await,
        Code::PermissionDenied,
        "Replica.Write from a non-member's certificate",
    );
    let mut membership = pb::membership_client::MembershipClient::new(channel);
    let fetched = membership
        .get_layout(request(pb::GetLayoutRequest {}, None))
        .await
        .expect("GetLayout with a non-member's node certificate")
        .into_inner();
    assert_eq!(fetched.version, layout.version);
    let join = pb::JoinRequest {
        address: free_address(),
        cluster_id: layout.cluster_id,
        instance_id: 7,
        replaces: String::new(),
    };
    assert_refused(
        membership.join(request(join, None)).await,
        Code::PermissionDenied,
        "Join as another address than the certificate names",
    );
}

/// A node whose certificate comes from another CA (it trusts ours too)
/// asks to join: its seed refuses the handshake, the joiner retries (or
/// gives up) and never serves, no member lists it, and the cluster keeps
/// serving.
async fn a_node_of_another_ca_cannot_join(secured: &mut Secured, ca2: &Path) {
    let outsider = free_address();
    make_certs(ca2, &[&outsider]);
    let (cert, key) = node_files(ca2, &outsider);
    let both = secured.root().join("both.pem");
    let bundle = [
        read_bytes(&secured.ca1().join("ca.pem")),
        read_bytes(&ca2.join("ca.pem")),
    ]
    .concat();
    std::fs::write(&both, bundle).expect("write the CA bundle");
    let flags = Secured::flags_of(&cert, &key, &both, &secured.root().join("tokens"));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let refused_before = secured.cluster.log_of(0).matches(HANDSHAKE_FAILED).count();
    let joiner = secured.cluster.spawn_joiner(0, outsider.clone(), &flags);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            !common::health_serving_tls(&both, &outsider).await,
            "the foreign node serves:\n{}",
            secured.cluster.log_tail_of(joiner)
        );
        let exited = secured.cluster.exited(joiner);
        let seed_refused = secured.cluster.log_of(0).matches(HANDSHAKE_FAILED).count();
        let retries = secured.cluster.log_of(joiner).matches(JOIN_RETRY).count();
        if seed_refused > refused_before && (retries >= 2 || exited.is_some()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the foreign node was not seen refused: the seed logged {} more failed \
             handshakes; the joiner retried {retries} times, exited {exited:?}:\n{}",
            seed_refused - refused_before,
            secured.cluster.log_tail_of(joiner)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..3 {
        let members = secured.status(i).await.members;
        assert!(
            members.iter().all(|m| m.address != outsider),
            "node {i} lists the foreign node: {members:?}"
        );
    }
    secured
        .put(1, "after-outsider", READ_WRITE)
        .await
        .expect("PUT while the foreign node knocks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_its_own_certificate_joins_under_tls() {
    let mut secured = Secured::start(3).await;
    let address = free_address();
    make_certs(&secured.ca1(), &[&address]);
    let live = secured.root().join("live");
    let (cert, key) = node_files(&secured.ca1(), &address);
    replace_file(&live.join("node3.pem"), &read_bytes(&cert));
    replace_file(&live.join("node3-key.pem"), &read_bytes(&key));
    let flags = Secured::flags(secured.root(), 3);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let joiner = secured.cluster.join_at(0, address.clone(), &flags).await;
    eventually(Duration::from_secs(30), async || {
        let members = secured.status(0).await.members;
        if members.iter().any(|m| m.address == address) {
            Ok(())
        } else {
            Err(format!("{address} not a member yet: {members:?}"))
        }
    })
    .await;
    secured
        .put(joiner, "through-joiner", READ_WRITE)
        .await
        .expect("PUT through the joiner");
    assert!(secured.found(joiner, "through-joiner").await);
    assert!(secured.found(0, "through-joiner").await);
}

/// Under mutual TLS a node whose join was aborted is refused by every
/// member's node doors, yet still learns it was removed (the layout fetch
/// and its vouches stay open to any node certificate) and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_joiner_learns_it_under_tls_and_exits_0() {
    let mut secured = Secured::start(3).await;
    for i in 0..300 {
        secured
            .put(0, &format!("key-{i}"), READ_WRITE)
            .await
            .expect("preload PUT");
    }
    let address = free_address();
    make_certs(&secured.ca1(), &[&address]);
    let live = secured.root().join("live");
    let (cert, key) = node_files(&secured.ca1(), &address);
    replace_file(&live.join("node3.pem"), &read_bytes(&cert));
    replace_file(&live.join("node3-key.pem"), &read_bytes(&key));
    let mut flags = Secured::flags(secured.root(), 3);
    // Slow streaming: the join stays in progress while it is aborted.
    flags.extend(["--stream-rate".to_string(), "20".to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let joiner = secured.cluster.spawn_joiner(0, address.clone(), &flags);
    eventually(Duration::from_secs(30), async || {
        let layout = secured.status(1).await.layout.unwrap_or_default();
        if layout.members.iter().any(|m| m.address == address) {
            Ok(())
        } else {
            Err(format!(
                "{address} not joining yet (layout v{})",
                layout.version
            ))
        }
    })
    .await;
    let aborted = pb::cluster_client::ClusterClient::new(secured.channel(1))
        .abort(request(pb::AbortRequest {}, Some(ADMIN)))
        .await
        .expect("abort with the admin token");
    let version = aborted.into_inner().layout.expect("layout").version;
    let exited = secured
        .cluster
        .wait_exit(joiner, Duration::from_secs(30))
        .await;
    let log = secured.cluster.log_tail_of(joiner);
    assert_eq!(exited.code(), Some(0), "{log}");
    assert!(
        log.contains(&format!("this node's join was aborted (layout v{version})")),
        "{log}"
    );
    assert!(secured.found(0, "key-7").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_tokens_rotate_without_a_restart() {
    let secured = Secured::start(3).await;
    let pids: Vec<Option<u32>> = secured.cluster.nodes.iter().map(|n| n.pid()).collect();
    let live = secured.root().join("live");
    let ca2 = secured.root().join("ca2");
    let addresses = secured.cluster.addresses();
    let named: Vec<&str> = addresses.iter().map(String::as_str).collect();
    make_certs(&ca2, &named);

    // Every node trusts both CAs, then presents a certificate of the second.
    let bundle = [
        read_bytes(&secured.ca1().join("ca.pem")),
        read_bytes(&ca2.join("ca.pem")),
    ]
    .concat();
    replace_file(&live.join("trust.pem"), &bundle);
    for i in 0..3 {
        secured.wait_log(i, "TLS certificates reloaded", 1).await;
    }
    for (i, address) in addresses.iter().enumerate() {
        let (cert, key) = node_files(&ca2, address);
        replace_file(&live.join(format!("node{i}-key.pem")), &read_bytes(&key));
        replace_file(&live.join(format!("node{i}.pem")), &read_bytes(&cert));
    }
    // A client that trusts only the second CA gets through to every node,
    // and node-to-node traffic (a QUORUM PUT) works on the new certificates.
    let ca2_only = ca2.join("ca.pem");
    for (i, address) in addresses.iter().enumerate() {
        eventually(RELOAD_DEADLINE, async || {
            pb::key_value_client::KeyValueClient::new(tls_channel(&ca2_only, address))
                .put(request(
                    common::put_request(&format!("ca2-{i}"), "v"),
                    Some(READ_WRITE),
                ))
                .await
                .map(drop)
        })
        .await;
    }
    let read = pb::key_value_client::KeyValueClient::new(tls_channel(&ca2_only, &addresses[2]))
        .get(request(common::get_request("ca2-0"), Some(READ)))
        .await
        .expect("GET trusting only the second CA");
    assert!(read.into_inner().found, "the PUT through node 0 reads back");

    // A token appended to the auth file is honoured without a restart.
    let tokens = secured.root().join("tokens");
    let appended = format!("{TOKENS}new-token readwrite\n");
    replace_file(&tokens, appended.as_bytes());
    for i in 0..3 {
        eventually(RELOAD_DEADLINE, async || {
            secured.put(i, "new-token-key", "new-token").await
        })
        .await;
    }

    // SIGHUP rereads the files too.
    replace_file(
        &tokens,
        format!("{appended}hup-token readwrite\n").as_bytes(),
    );
    secured.cluster.signal(0, "-HUP");
    secured.wait_log(0, "SIGHUP", 1).await;
    eventually(RELOAD_DEADLINE, async || {
        secured.put(0, "hup-key", "hup-token").await
    })
    .await;

    let after: Vec<Option<u32>> = secured.cluster.nodes.iter().map(|n| n.pid()).collect();
    assert_eq!(pids, after, "no node restarted");
}

/// Runs DKVSServer with `args` and waits (bounded) for it to exit.
fn server_refuses(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_DKVSServer"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn DKVSServer");
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("wait DKVSServer").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("reap DKVSServer");
            panic!("DKVSServer {args:?} kept running: {}", stderr(&output));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("DKVSServer output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_start_with_bad_security_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let address = free_address();
    let other = free_address();
    make_certs(&pki, &[&other]);
    let (cert, key) = node_files(&pki, &other);
    let ca = pki.join("ca.pem");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, TOKENS).expect("write the auth file");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a PEM file\n").expect("write garbage");
    let missing = dir.path().join("missing.pem");
    let data = dir.path().join("data").display().to_string();
    let path = |p: &Path| p.display().to_string();
    let node = |extra: &[String]| -> Vec<String> {
        let mut args: Vec<String> = [
            "--listen",
            &address,
            "--peers",
            &address,
            "--data-dir",
            &data,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend_from_slice(extra);
        args
    };
    let tls = |cert: &Path, key: &Path, ca: &Path| -> Vec<String> {
        vec![
            "--tls-cert".into(),
            path(cert),
            "--tls-key".into(),
            path(key),
            "--tls-ca".into(),
            path(ca),
        ]
    };
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "a certificate naming another address",
            node(&tls(&cert, &key, &ca)),
            "--tls-cert",
        ),
        (
            "--auth-file without TLS",
            node(&["--auth-file".into(), path(&tokens)]),
            "--auth-file",
        ),
        (
            "a missing certificate",
            node(&tls(&missing, &key, &ca)),
            "--tls-cert",
        ),
        (
            "a missing key",
            node(&tls(&cert, &missing, &ca)),
            "--tls-key",
        ),
        (
            "a missing CA file",
            node(&tls(&cert, &key, &missing)),
            "--tls-ca",
        ),
        (
            "a certificate that is not PEM",
            node(&tls(&garbage, &key, &ca)),
            "--tls-cert",
        ),
        (
            "a key that is not PEM",
            node(&tls(&cert, &garbage, &ca)),
            "--tls-key",
        ),
        (
            "a CA file that is not PEM",
            node(&tls(&cert, &key, &garbage)),
            "--tls-ca",
        ),
    ];
    for (what, args, flag) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = server_refuses(&args);
        assert_eq!(output.status.code(), Some(2), "{what}: {}", stderr(&output));
        assert!(
            stderr(&output).contains(flag),
            "{what}: the message should name {flag}: {}",
            stderr(&output)
        );
    }

    // --insecure-plaintext-auth allows tokens without TLS.
    let tokens = path(&tokens);
    let cluster =
        TestCluster::start_with(1, &["--auth-file", &tokens, "--insecure-plaintext-auth"]).await;
    assert_refused(
        cluster
            .kv(0)
            .await
            .get(request(common::get_request("k"), None))
            .await,
        Code::Unauthenticated,
        "plaintext GET without a token",
    );
    cluster
        .kv(0)
        .await
        .put(request(common::put_request("k", "v"), Some(READ_WRITE)))
        .await
        .expect("plaintext PUT with a readwrite token");
}
