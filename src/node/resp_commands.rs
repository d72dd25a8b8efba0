//! What each Redis command does on a DKVS node (DESIGN "RESP").
//!
//! Plain commands map to DKVS operations: GET, MGET, EXISTS, STRLEN, TYPE
//! are quorum reads; SET (without options), MSET, DEL, UNLINK (and DELETE,
//! the seed's word) are plain writes through the one write entry point.
//! Multi-key commands act on each key on its own: no cross-key atomicity.
//! Every command that reads before it writes (SET with NX/XX/GET/KEEPTTL,
//! GETSET, GETDEL, INCR, APPEND, ...) and every expiry needs compare-and-set
//! or expiring keys, which this DKVS does not have yet: they are refused,
//! never done as a read then a write (which would undo a concurrent SET).
//! Errors are worded as Redis words them; `-TRYAGAIN` only for a refusal
//! made before any work.

use std::sync::Arc;

use super::Node;
use super::writes::{ClientWrite, Entry};
use crate::error::{Error, Outcome};
use crate::listing::{ListRequest, Position};
use crate::quorum::Consistency;
use crate::resp::Reply;
use crate::security::auth::{AuthFile, Role};

/// One connection's state.
pub struct Session {
    pub id: u64,
    /// RESP 2 or 3 (`HELLO`).
    pub version: u8,
    pub consistency: Consistency,
    /// The role of the token given with AUTH (everything, without tokens).
    role: Option<Role>,
    auth: Option<Arc<AuthFile>>,
    name: Vec<u8>,
    /// QUIT was asked: the connection closes after its reply.
    pub quit: bool,
}

impl Session {
    /// Whether the connection may run data commands (AUTH done, or no
    /// tokens required).
    pub fn authenticated(&self) -> bool {
        self.role.is_some()
    }

    pub fn new(id: u64, consistency: Consistency, auth: Option<Arc<AuthFile>>) -> Self {
        Self {
            id,
            version: 2,
            consistency,
            role: auth.is_none().then_some(Role::Admin),
            auth,
            name: Vec::new(),
            quit: false,
        }
    }
}

/// The commands refused for now, and what each needs.
const NEEDS_CAS: &[&str] = &[
    "setnx",
    "getset",
    "getdel",
    "incr",
    "decr",
    "incrby",
    "decrby",
    "incrbyfloat",
    "append",
    "setrange",
    "msetnx",
];
const NEEDS_EXPIRY: &[&str] = &[
    "setex",
    "psetex",
    "getex",
    "expire",
    "pexpire",
    "expireat",
    "pexpireat",
];

/// What `COMMAND COUNT` counts.
const COMMANDS: &[&str] = &[
    "ping",
    "echo",
    "quit",
    "hello",
    "auth",
    "select",
    "client",
    "command",
    "info",
    "config",
    "dbsize",
    "get",
    "set",
    "mget",
    "mset",
    "del",
    "unlink",
    "delete",
    "exists",
    "strlen",
    "type",
    "ttl",
    "pttl",
    "persist",
    "scan",
    "consistency",
];

fn arity(name: &str) -> Reply {
    Reply::error(format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

fn text(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).into_owned()
}

/// Runs one command for `session`.
pub async fn execute(node: &Arc<Node>, session: &mut Session, args: Vec<Vec<u8>>) -> Reply {
    let name = text(&args[0]).to_ascii_lowercase();
    let rest = &args[1..];
    // Without a token only these (as Redis does before AUTH).
    if session.role.is_none() && !matches!(name.as_str(), "auth" | "hello" | "quit" | "ping") {
        return Reply::error("NOAUTH Authentication required.");
    }
    match name.as_str() {
        "ping" => match rest {
            [] => Reply::Simple("PONG".into()),
            [message] => Reply::Bulk(message.clone()),
            _ => arity(&name),
        },
        "echo" => match rest {
            [message] => Reply::Bulk(message.clone()),
            _ => arity(&name),
        },
        "quit" => {
            session.quit = true;
            Reply::ok()
        }
        "hello" => hello(session, rest),
        "auth" => match rest {
            [token] | [_, token] => auth(session, token),
            _ => arity(&name),
        },
        "select" => match rest {
            [db] if db.as_slice() == b"0" => Reply::ok(),
            [_] => Reply::error("ERR DB index is out of range"),
            _ => arity(&name),
        },
        "client" => client(session, rest),
        "command" => command(rest),
        "info" => info(node, session),
        "config" => config(rest),
        "dbsize" => dbsize(node),
        "consistency" => consistency(session, rest),
        _ => data(node, session, &name, rest).await,
    }
}

/// The commands that touch keys.
async fn data(node: &Arc<Node>, session: &mut Session, name: &str, rest: &[Vec<u8>]) -> Reply {
    let writes = matches!(name, "set" | "mset" | "del" | "unlink" | "delete");
    if writes && session.role < Some(Role::ReadWrite) {
        return Reply::error(format!(
            "NOPERM this token's role cannot run the '{name}' command (it needs readwrite)"
        ));
    }
    // A slot of --max-client-requests, as every client request takes.
    let _slot = match node.load.admit(super::load::Budget::Clients, None) {
        Ok(slot) => slot,
        Err(budget) => {
            let refused = node.load.refusal(budget);
            return Reply::error(format!("TRYAGAIN {}", refused.message()));
        }
    };
    let consistency = session.consistency;
    match name {
        "get" => match rest {
            [key] => match read(node, key, consistency).await {
                Ok(value) => value.map_or(Reply::Null, Reply::Bulk),
                Err(reply) => reply,
            },
            _ => arity(name),
        },
        "set" => match rest {
            [key, value] => write(node, key, Some(value.clone()), consistency)
                .await
                .map_or_else(|e| e, |()| Reply::ok()),
            [_, _, option, ..] => set_option(option),
            _ => arity(name),
        },
        "mget" | "mset" | "del" | "unlink" | "delete" | "exists" => {
            many_keys(node, name, rest, consistency).await
        }
        "strlen" | "type" | "ttl" | "pttl" | "persist" => match rest {
            [key] => match read(node, key, consistency).await {
                Ok(value) => about_one_key(name, value.as_deref()),
                Err(reply) => reply,
            },
            _ => arity(name),
        },
        "scan" => scan(node, session, rest).await,
        "keys" => Reply::error(
            "ERR KEYS is not supported by DKVS (it would read every key of the cluster at once): use SCAN",
        ),
        name if NEEDS_CAS.contains(&name) => Reply::error(format!(
            "ERR {} reads before it writes and needs compare-and-set, which this DKVS does not have yet (it is never done as a read then a write, which could undo a concurrent SET)",
            name.to_ascii_uppercase()
        )),
        name if NEEDS_EXPIRY.contains(&name) => Reply::error(format!(
            "ERR {} needs expiring keys, which this DKVS does not have yet",
            name.to_ascii_uppercase()
        )),
        _ => unknown(name, rest),
    }
}

/// The commands that take many keys: each key on its own, in order (no
/// cross-key atomicity); the first failure is the answer.
async fn many_keys(
    node: &Arc<Node>,
    name: &str,
    rest: &[Vec<u8>],
    consistency: Consistency,
) -> Reply {
    match name {
        "mget" if !rest.is_empty() => {
            let (mut values, mut bytes) = (Vec::with_capacity(rest.len()), 0usize);
            for key in rest {
                match read(node, key, consistency).await {
                    Ok(value) => {
                        bytes += value.as_ref().map_or(0, Vec::len);
                        if bytes > MAX_REPLY_BYTES {
                            return Reply::error(format!(
                                "ERR MGET's values pass {} MiB: ask for fewer keys at once",
                                MAX_REPLY_BYTES >> 20
                            ));
                        }
                        values.push(value.map_or(Reply::Null, Reply::Bulk));
                    }
                    Err(reply) => return reply,
                }
            }
            Reply::Array(values)
        }
        "mset" if !rest.is_empty() && rest.len() % 2 == 0 => {
            // Every pair checked before the first write, so a bad key or
            // value refuses the whole command with nothing written.
            for pair in rest.chunks(2) {
                if let Err(reply) = writable(node, &pair[0], Some(&pair[1])) {
                    return reply;
                }
            }
            for (done, pair) in rest.chunks(2).enumerate() {
                if let Err(reply) = write(node, &pair[0], Some(pair[1].clone()), consistency).await
                {
                    return partly_done("MSET", done, rest.len() / 2, reply);
                }
            }
            Reply::ok()
        }
        "del" | "unlink" | "delete" if !rest.is_empty() => {
            for key in rest {
                if let Err(reply) = writable(node, key, None) {
                    return reply;
                }
            }
            let mut removed = 0;
            for (done, key) in rest.iter().enumerate() {
                // The count says which keys a read found holding a value;
                // the tombstone is written whatever the read saw (a value
                // a stale replica missed is deleted too).
                if let Ok(Some(_)) = read(node, key, consistency).await {
                    removed += 1;
                }
                if let Err(reply) = write(node, key, None, consistency).await {
                    return partly_done("DEL", done, rest.len(), reply);
                }
            }
            Reply::Integer(removed)
        }
        "exists" if !rest.is_empty() => {
            let mut found = 0;
            for key in rest {
                match read(node, key, consistency).await {
                    Ok(Some(_)) => found += 1,
                    Ok(None) => {}
                    Err(reply) => return reply,
                }
            }
            Reply::Integer(found)
        }
        _ => arity(name),
    }
}

/// The most value bytes one MGET answers.
const MAX_REPLY_BYTES: usize = 64 << 20;

/// Whether `key` (and `value`) would be taken by a write: checked for
/// every key of a multi-key write before any is written.
fn writable(node: &Node, key: &[u8], value: Option<&[u8]>) -> Result<(), Reply> {
    let key = key_of(key)?;
    node.limits
        .check_key(key)
        .and_then(|()| value.map_or(Ok(()), |v| node.limits.check_value(v)))
        .map_err(|why| Reply::error(format!("ERR {why}")))
}

/// The reply when a multi-key write failed at key `done` (counting from 0)
/// of `total`: the keys before it were written, so it is never TRYAGAIN
/// (a retry would write them again, over any write made since).
fn partly_done(command: &str, done: usize, total: usize, failed: Reply) -> Reply {
    let said = match failed {
        Reply::Error(said) => said,
        _ => String::new(),
    };
    let said = said
        .strip_prefix("TRYAGAIN ")
        .or_else(|| said.strip_prefix("ERR "))
        .unwrap_or(&said)
        .to_string();
    if done == 0 {
        return Reply::Error(format!("ERR {said}"));
    }
    Reply::error(format!(
        "ERR {command} wrote the first {done} of {total} keys, then failed: {said}"
    ))
}

/// STRLEN, TYPE, TTL, PTTL, PERSIST of a key holding `value` (or none).
/// No DKVS key expires yet: TTL is -1 for a key, -2 without one; PERSIST
/// has nothing to remove.
fn about_one_key(name: &str, value: Option<&[u8]>) -> Reply {
    match (name, value) {
        ("strlen", value) => Reply::Integer(value.map_or(0, |v| v.len() as i64)),
        ("type", Some(_)) => Reply::Simple("string".into()),
        ("type", None) => Reply::Simple("none".into()),
        ("ttl" | "pttl", Some(_)) => Reply::Integer(-1),
        ("ttl" | "pttl", None) => Reply::Integer(-2),
        _ => Reply::Integer(0),
    }
}

/// `ERR unknown command 'foo', with args beginning with: 'a' 'b' `, as
/// Redis words it.
fn unknown(name: &str, rest: &[Vec<u8>]) -> Reply {
    let args: String = rest
        .iter()
        .take(8)
        .map(|a| format!("'{}' ", text(a).chars().take(128).collect::<String>()))
        .collect();
    Reply::error(format!(
        "ERR unknown command '{name}', with args beginning with: {args}"
    ))
}

/// SET with options: each needs what this DKVS does not have yet.
fn set_option(option: &[u8]) -> Reply {
    match text(option).to_ascii_uppercase().as_str() {
        "NX" | "XX" | "GET" | "KEEPTTL" => Reply::error(
            "ERR SET with NX, XX, GET or KEEPTTL reads before it writes and needs compare-and-set, which this DKVS does not have yet; a plain SET works",
        ),
        "EX" | "PX" | "EXAT" | "PXAT" => Reply::error(
            "ERR SET with EX, PX, EXAT or PXAT needs expiring keys, which this DKVS does not have yet; a plain SET works",
        ),
        _ => Reply::error("ERR syntax error"),
    }
}

/// A key from the wire: DKVS keys are UTF-8 text.
fn key_of(key: &[u8]) -> Result<&str, Reply> {
    std::str::from_utf8(key).map_err(|_| {
        Reply::error("ERR DKVS keys are UTF-8 text; this key is not (values may be any bytes)")
    })
}

async fn read(node: &Node, key: &[u8], consistency: Consistency) -> Result<Option<Vec<u8>>, Reply> {
    let key = key_of(key)?;
    let read = async {
        node.membership.refuse_until_agreed()?;
        node.limits.check_key(key)?;
        node.coordinator.get(key, consistency).await
    };
    match read.await {
        Ok(record) => Ok(record.and_then(|r| r.value).map(|v| v.to_vec())),
        Err(why) => Err(failure(&why, None)),
    }
}

async fn write(
    node: &Arc<Node>,
    key: &[u8],
    value: Option<Vec<u8>>,
    consistency: Consistency,
) -> Result<(), Reply> {
    let key = key_of(key)?.to_string();
    let write = ClientWrite {
        key,
        value: value.map(bytes::Bytes::from),
        consistency,
        timeout: None,
    };
    match node.write(write, Entry::Client { forward: true }).await {
        Ok(_) => Ok(()),
        Err(why) => Err(failure(&why, Some(why.outcome()))),
    }
}

/// The reply to a failed operation (`outcome`: a write's). `-TRYAGAIN`
/// only for a refusal before any work that a retry may get past (go-redis
/// retries it); an unknown outcome says so, never TRYAGAIN.
fn failure(why: &Error, outcome: Option<Outcome>) -> Reply {
    let said = why.to_string();
    let retryable = matches!(
        why.code(),
        tonic::Code::Unavailable | tonic::Code::Aborted | tonic::Code::DeadlineExceeded
    );
    match outcome {
        Some(Outcome::Unknown) => Reply::error(format!(
            "ERR {said} (outcome unknown: the write may or may not have been applied)"
        )),
        Some(Outcome::NotApplied) | None if retryable => Reply::error(format!("TRYAGAIN {said}")),
        _ => Reply::error(format!("ERR {said}")),
    }
}

fn auth(session: &mut Session, token: &[u8]) -> Reply {
    let Some(auth) = &session.auth else {
        return Reply::error(
            "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
        );
    };
    match auth.tokens().role_of(&text(token)) {
        Some(role) => {
            session.role = Some(role);
            Reply::ok()
        }
        None => Reply::error("WRONGPASS invalid username-password pair or user is disabled."),
    }
}

fn hello(session: &mut Session, rest: &[Vec<u8>]) -> Reply {
    let mut rest = rest.iter();
    if let Some(version) = rest.next() {
        match text(version).as_str() {
            "2" => session.version = 2,
            "3" => session.version = 3,
            _ => return Reply::error("NOPROTO unsupported protocol version"),
        }
    }
    while let Some(option) = rest.next() {
        match text(option).to_ascii_uppercase().as_str() {
            "AUTH" => {
                let (Some(_user), Some(token)) = (rest.next(), rest.next()) else {
                    return Reply::error("ERR syntax error");
                };
                if let Reply::Error(refused) = auth(session, token) {
                    return Reply::Error(refused);
                }
            }
            "SETNAME" => match rest.next() {
                Some(name) => session.name = name.clone(),
                None => return Reply::error("ERR syntax error"),
            },
            _ => return Reply::error("ERR syntax error"),
        }
    }
    if session.role.is_none() {
        return Reply::error(
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
        );
    }
    Reply::Map(vec![
        (Reply::bulk("server"), Reply::bulk("redis")),
        (Reply::bulk("version"), Reply::bulk(REDIS_VERSION)),
        (
            Reply::bulk("proto"),
            Reply::Integer(i64::from(session.version)),
        ),
        (Reply::bulk("id"), Reply::Integer(session.id as i64)),
        (Reply::bulk("mode"), Reply::bulk("standalone")),
        (Reply::bulk("role"), Reply::bulk("master")),
        (Reply::bulk("modules"), Reply::Array(Vec::new())),
    ])
}

/// The Redis version clients are told (the commands DKVS answers are
/// those of Redis 7.0's strings).
const REDIS_VERSION: &str = "7.0.0";

fn client(session: &mut Session, rest: &[Vec<u8>]) -> Reply {
    let Some(sub) = rest.first() else {
        return arity("client");
    };
    match (text(sub).to_ascii_uppercase().as_str(), &rest[1..]) {
        ("SETNAME", [name]) => {
            session.name = name.clone();
            Reply::ok()
        }
        ("GETNAME", []) if session.name.is_empty() => Reply::Null,
        ("GETNAME", []) => Reply::Bulk(session.name.clone()),
        ("ID", []) => Reply::Integer(session.id as i64),
        ("SETINFO", [_, _]) => Reply::ok(),
        ("INFO", []) | ("LIST", _) => Reply::bulk(format!(
            "id={} name={} db=0 resp={}\n",
            session.id,
            text(&session.name),
            session.version
        )),
        (other, _) => Reply::error(format!(
            "ERR unknown subcommand or wrong number of arguments for '{other}'. Try CLIENT HELP."
        )),
    }
}

fn command(rest: &[Vec<u8>]) -> Reply {
    match rest.first().map(|s| text(s).to_ascii_uppercase()) {
        None => Reply::Array(Vec::new()),
        Some(sub) if sub == "COUNT" => Reply::Integer(COMMANDS.len() as i64),
        Some(sub) if sub == "INFO" => Reply::Array(rest[1..].iter().map(|_| Reply::Null).collect()),
        Some(sub) if sub == "DOCS" => Reply::Map(Vec::new()),
        Some(other) => Reply::error(format!(
            "ERR unknown subcommand '{other}'. Try COMMAND HELP."
        )),
    }
}

/// CONFIG GET of what redis-benchmark and tools ask; nothing is settable.
fn config(rest: &[Vec<u8>]) -> Reply {
    match rest.first().map(|s| text(s).to_ascii_uppercase()) {
        Some(sub) if sub == "GET" && rest.len() >= 2 => {
            let mut pairs = Vec::new();
            for name in &rest[1..] {
                let value = match text(name).to_ascii_lowercase().as_str() {
                    "save" => "",
                    "appendonly" => "no",
                    "databases" => "1",
                    _ => continue,
                };
                pairs.push((Reply::Bulk(name.clone()), Reply::bulk(value)));
            }
            Reply::Map(pairs)
        }
        Some(sub) if sub == "GET" => arity("config|get"),
        _ => Reply::error("ERR DKVS answers CONFIG GET only: settings are DKVSServer flags"),
    }
}

fn dbsize(node: &Node) -> Reply {
    Reply::Integer(approximate_keys(&super::cluster::status_of(node)) as i64)
}

/// Keys in the cluster, approximately: the members' live keys over N.
fn approximate_keys(status: &crate::pb::StatusResponse) -> u64 {
    let live: u64 = status
        .members
        .iter()
        .filter_map(|m| m.stats.as_ref())
        .map(|s| s.live_keys)
        .sum();
    live / u64::from(status.replicas.max(1))
}

fn info(node: &Node, session: &Session) -> Reply {
    let status = super::cluster::status_of(node);
    let layout = status.layout.as_ref();
    let members: Vec<String> = status
        .members
        .iter()
        .map(|m| {
            let state =
                crate::pb::MemberState::try_from(m.state).map_or("UNKNOWN".to_string(), |s| {
                    s.as_str_name()
                        .trim_start_matches("MEMBER_STATE_")
                        .to_string()
                });
            format!("{}:{}", m.address, state)
        })
        .collect();
    let text = format!(
        "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\ndkvs_version:{}\r\nos:{}\r\n\r\n\
         # Clients\r\nclient_id:{}\r\nresp:{}\r\n\r\n\
         # Keyspace\r\ndb0:keys={},expires=0,avg_ttl=0\r\n\r\n\
         # Dkvs\r\naddress:{}\r\nreplicas:{}\r\nwrite_quorum:{}\r\nlayout_version:{}\r\nlayout_change:{}\r\nmembers:{}\r\nconsistency:{}\r\n",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        session.id,
        session.version,
        approximate_keys(&status),
        status.address,
        status.replicas,
        status.write_quorum,
        layout.map_or(0, |l| l.version),
        layout.map_or("", |l| l.change.as_str()),
        members.join(","),
        consistency_name(session.consistency),
    );
    Reply::Bulk(text.into_bytes())
}

fn consistency_name(consistency: Consistency) -> &'static str {
    match consistency {
        Consistency::One => "one",
        Consistency::Quorum => "quorum",
        Consistency::All => "all",
        Consistency::Any => "any",
    }
}

/// `CONSISTENCY [ONE|QUORUM|ALL]` (DKVS's own): this connection's level
/// from now on; without an argument, the level in use.
fn consistency(session: &mut Session, rest: &[Vec<u8>]) -> Reply {
    match rest {
        [] => Reply::bulk(consistency_name(session.consistency)),
        [level] => {
            session.consistency = match text(level).to_ascii_lowercase().as_str() {
                "one" => Consistency::One,
                "quorum" => Consistency::Quorum,
                "all" => Consistency::All,
                _ => return Reply::error("ERR consistency must be ONE, QUORUM or ALL"),
            };
            Reply::ok()
        }
        _ => arity("consistency"),
    }
}

/// `SCAN cursor [MATCH pattern] [COUNT count] [TYPE type]` over the key
/// listing. The cursor is the hash the next page starts at (0: the start,
/// and the end), so it is a number, as clients expect.
async fn scan(node: &Node, session: &Session, rest: &[Vec<u8>]) -> Reply {
    let Some(cursor) = rest.first() else {
        return arity("scan");
    };
    let Ok(cursor) = text(cursor).parse::<u64>() else {
        return Reply::error("ERR invalid cursor");
    };
    let (mut pattern, mut count, mut only_strings) = (None, 10usize, true);
    let mut options = rest[1..].iter();
    while let Some(option) = options.next() {
        let value = options.next();
        match (text(option).to_ascii_uppercase().as_str(), value) {
            ("MATCH", Some(p)) if p.len() <= 256 => pattern = Some(p.clone()),
            ("MATCH", Some(_)) => return Reply::error("ERR MATCH pattern longer than 256 bytes"),
            ("COUNT", Some(n)) => match text(n).parse::<usize>() {
                Ok(n) if n >= 1 => count = n.min(crate::listing::MAX_LIMIT),
                _ => return Reply::error("ERR value is not an integer or out of range"),
            },
            ("TYPE", Some(t)) => only_strings = text(t).eq_ignore_ascii_case("string"),
            _ => return Reply::error("ERR syntax error"),
        }
    }
    // A pattern that is a literal prefix then `*` narrows the listing.
    let prefix = pattern
        .as_deref()
        .map(|p| {
            p.iter()
                .take_while(|b| !b"*?[\\".contains(b))
                .copied()
                .collect::<Vec<u8>>()
        })
        .map(|p| text(&p))
        .unwrap_or_default();
    let asked = ListRequest {
        prefix,
        limit: count,
        from: Position::from_scan_cursor(cursor),
        consistency: session.consistency,
    };
    let page = match node.list(&asked).await {
        Ok(page) => page,
        Err(why) => return failure(&why, None),
    };
    let page_next = page.next.clone();
    // Matching costs up to the pattern's length times each key's: off the
    // async threads.
    let matching = tokio::task::spawn_blocking(move || {
        page.keys
            .into_iter()
            .filter(|_| only_strings)
            .filter(|l| pattern.as_deref().is_none_or(|p| glob(p, l.key.as_bytes())))
            .map(|l| Reply::Bulk(l.key.into_bytes()))
            .collect::<Vec<_>>()
    });
    let next = page_next;
    let keys = match matching.await {
        Ok(keys) => keys,
        Err(_) => return Reply::error("ERR SCAN's matching stopped"),
    };
    let next = next.map_or(0, |at| at.to_scan_cursor());
    Reply::Array(vec![Reply::bulk(next.to_string()), Reply::Array(keys)])
}

/// Redis's glob: `*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\x`. Greedy with one
/// backtrack point (the last `*`): time bounded by the pattern's length
/// times the text's, whatever the client sends.
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if pattern.get(p) == Some(&b'*') {
            star = Some((p, t));
            p += 1;
            continue;
        }
        if let Some((matched, width)) = one_char(pattern, p, text[t])
            && matched
        {
            p += width;
            t += 1;
            continue;
        }
        match star {
            Some((star_p, star_t)) => {
                // The last `*` takes one more character.
                star = Some((star_p, star_t + 1));
                p = star_p + 1;
                t = star_t + 1;
            }
            None => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&b| b == b'*')
}

/// Whether the one-character token at `pattern[p]` matches `c`, and how
/// many pattern bytes it spans; `None` past the pattern's end.
fn one_char(pattern: &[u8], p: usize, c: u8) -> Option<(bool, usize)> {
    match *pattern.get(p)? {
        b'?' => Some((true, 1)),
        b'\\' if p + 1 < pattern.len() => Some((pattern[p + 1] == c, 2)),
        b'[' => {
            let Some(close) = pattern[p + 1..].iter().position(|&b| b == b']') else {
                return Some((c == b'[', 1));
            };
            let class = &pattern[p + 1..p + 1 + close];
            let (negate, class) = match class.first() {
                Some(b'^') => (true, &class[1..]),
                _ => (false, class),
            };
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    hit |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            Some((hit != negate, close + 2))
        }
        literal => Some((literal == c, 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_as_redis_does() {
        let long = "a".repeat(1000);
        for (pattern, text, expected) in [
            ("users:*", "users:1", true),
            ("users:*", "orders:1", false),
            ("h?llo", "hello", true),
            ("h[ae]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-c]llo", "hbllo", true),
            ("a\\*b", "a*b", true),
            ("*", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("*a*a*a*a*a*a*a*a*a*a*b", long.as_str(), false),
        ] {
            assert_eq!(
                glob(pattern.as_bytes(), text.as_bytes()),
                expected,
                "{pattern} {text}"
            );
        }
    }

    #[test]
    fn unknown_commands_and_arity_are_worded_as_redis_words_them() {
        let Reply::Error(said) = unknown("foo", &[b"a".to_vec(), b"b".to_vec()]) else {
            panic!()
        };
        assert_eq!(
            said,
            "ERR unknown command 'foo', with args beginning with: 'a' 'b' "
        );
        let Reply::Error(said) = arity("get") else {
            panic!()
        };
        assert_eq!(said, "ERR wrong number of arguments for 'get' command");
    }
}
