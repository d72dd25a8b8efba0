//! `DKVSClient`: the DKVS command-line client. See `DKVSClient --help`.
//!
//! Exit codes: 0 success; 1 GET of a missing key; 2 usage error or input the
//! cluster refused (INVALID_ARGUMENT); 3 cluster unavailable (quorum not
//! reached, no node answered); 4 timeout; 5 any other error.
#![allow(non_snake_case)]

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use dkvs::Error;
use dkvs::client::{Client, ClientOptions};
use dkvs::pb;
use dkvs::quorum::Consistency;

/// The addresses startServers.sh uses.
const DEFAULT_NODES: &str =
    "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003,127.0.0.1:7004,127.0.0.1:7005";

/// Talks to a DKVS cluster. With no command, opens an interactive prompt.
#[derive(Debug, Parser)]
#[command(name = "DKVSClient", version, about)]
struct Cli {
    /// Comma-separated addresses of cluster nodes to contact first (any one
    /// is enough; the client learns the rest).
    #[arg(long, env = "DKVS_NODES", default_value = DEFAULT_NODES, value_delimiter = ',')]
    nodes: Vec<String>,

    /// How many replicas must answer each request.
    #[arg(long, value_enum, default_value_t = ConsistencyArg::Quorum)]
    consistency: ConsistencyArg,

    /// Deadline of each call to a node, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ConsistencyArg {
    One,
    Quorum,
    All,
    /// Writes only: one replica or one stored hint is enough.
    Any,
}

impl From<ConsistencyArg> for Consistency {
    fn from(c: ConsistencyArg) -> Self {
        match c {
            ConsistencyArg::One => Consistency::One,
            ConsistencyArg::Quorum => Consistency::Quorum,
            ConsistencyArg::All => Consistency::All,
            ConsistencyArg::Any => Consistency::Any,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Store a value: PUT <key> <value> (several words are joined with spaces).
    #[command(name = "PUT", visible_alias = "put")]
    Put {
        key: String,
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        value: Vec<String>,
    },
    /// Print a key's value; exit code 1 when the key does not exist.
    #[command(name = "GET", visible_alias = "get")]
    Get { key: String },
    /// Delete a key.
    #[command(
        name = "DELETE",
        visible_alias = "delete",
        alias = "DEL",
        alias = "del"
    )]
    Delete { key: String },
    /// Show every member, up or down, with key counts (like `nodetool status`).
    #[command(name = "status", alias = "STATUS")]
    Status,
    /// Show which nodes hold a key, in preference order.
    #[command(name = "replicas", alias = "REPLICAS")]
    Replicas { key: String },
}

/// Commands typed at the interactive prompt.
#[derive(Debug, Parser)]
#[command(no_binary_name = true, name = "", disable_help_flag = true)]
struct PromptLine {
    #[command(subcommand)]
    command: Command,
}

/// How a command ended.
enum Outcome {
    Done,
    NotFound,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("DKVSClient: cannot start the async runtime: {error}");
            return ExitCode::from(5);
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let options = ClientOptions {
        consistency: cli.consistency.into(),
        rpc_timeout: Duration::from_millis(cli.timeout_ms.max(1)),
        ..ClientOptions::default()
    };
    let nodes: Vec<String> = cli
        .nodes
        .iter()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    let client = match Client::connect(&nodes, options).await {
        Ok(client) => client,
        Err(error) => return report(&error),
    };
    let code = match cli.command {
        Some(command) => match execute(&client, command).await {
            Ok(Outcome::Done) => ExitCode::SUCCESS,
            Ok(Outcome::NotFound) => ExitCode::from(1),
            Err(error) => report(&error),
        },
        None => prompt(&client).await,
    };
    client.close().await;
    code
}

/// Prints an error and picks the exit code for it.
fn report(error: &Error) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(match error {
        Error::InvalidArgument(_) => 2,
        Error::QuorumNotReached { .. } | Error::Unavailable(_) => 3,
        Error::DeadlineExceeded(_) => 4,
        _ => 5,
    })
}

async fn execute(client: &Client, command: Command) -> Result<Outcome, Error> {
    let mut out = std::io::stdout().lock();
    match command {
        Command::Put { key, value } => {
            let ack = client.put(&key, value.join(" ")).await?;
            let _ = writeln!(out, "OK (version {}, {} acks)", ack.version, ack.acks);
        }
        Command::Get { key } => match client.get(&key).await? {
            Some(value) => {
                let _ = out.write_all(&value);
                let _ = writeln!(out);
            }
            None => {
                eprintln!("key not found: {key}");
                return Ok(Outcome::NotFound);
            }
        },
        Command::Delete { key } => {
            let ack = client.delete(&key).await?;
            let _ = writeln!(
                out,
                "OK (deleted, version {}, {} acks)",
                ack.version, ack.acks
            );
        }
        Command::Status => {
            let status = client.status().await?;
            let _ = write!(out, "{}", status_table(&status));
        }
        Command::Replicas { key } => {
            for (rank, address) in client.replicas_of(&key).iter().enumerate() {
                let _ = writeln!(out, "{}. {address}", rank + 1);
            }
        }
    }
    Ok(Outcome::Done)
}

/// A `nodetool status`-like table.
fn status_table(status: &pb::StatusResponse) -> String {
    let mut table = format!(
        "DKVS cluster as seen by {} — {} members, N={} replicas, W={} R={} (quorum), {} vnodes per node\n\n",
        status.address,
        status.members.len(),
        status.replicas,
        status.write_quorum,
        status.read_quorum,
        status.vnodes
    );
    table.push_str(&format!(
        "{:<22} {:<17} {:<5} {:>5} {:>10} {:>10} {:>12} {:>9}  {}\n",
        "ADDRESS",
        "NODE ID",
        "STATE",
        "PHI",
        "LIVE KEYS",
        "TOMBSTONES",
        "LAMPORT",
        "UPTIME",
        "NOTE"
    ));
    for member in &status.members {
        let up = member.state == pb::MemberState::Up as i32;
        let (keys, tombstones, hints, lamport, uptime) = match &member.stats {
            Some(s) => (
                s.live_keys.to_string(),
                s.tombstones.to_string(),
                s.hints_pending.to_string(),
                s.lamport.to_string(),
                format!("{}s", s.uptime_ms / 1000),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        let note = if member.address == status.address {
            "(this node)".to_string()
        } else {
            member.error.clone()
        };
        table.push_str(&format!(
            "{:<22} {:016x}  {:<5} {:>5.1} {:>10} {:>10} {:>7} {:>12} {:>9}  {}\n",
            member.address,
            member.node_id,
            if up { "UP" } else { "DOWN" },
            member.phi.min(99.9),
            keys,
            tombstones,
            hints,
            lamport,
            uptime,
            note
        ));
    }
    table
}

/// The interactive prompt: one command per line until EOF, `exit` or `quit`.
async fn prompt(client: &Client) -> ExitCode {
    let stdin = std::io::stdin();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    if interactive {
        eprintln!(
            "DKVS — {} members. Commands: PUT <key> <value>, GET <key>, DELETE <key>, status, replicas <key>, exit.",
            client.ring().members().len()
        );
    }
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let Some(Ok(line)) = lines.next() else {
            if interactive {
                eprintln!();
            }
            return ExitCode::SUCCESS;
        };
        let words = match split_words(&line) {
            Ok(words) => words,
            Err(why) => {
                eprintln!("error: {why}");
                continue;
            }
        };
        match words.first().map(|w| w.to_ascii_lowercase()).as_deref() {
            None => continue,
            Some("exit" | "quit") => return ExitCode::SUCCESS,
            Some("help") => {
                eprintln!(
                    "PUT <key> <value> | GET <key> | DELETE <key> | status | replicas <key> | exit"
                );
                continue;
            }
            Some(_) => {}
        }
        match PromptLine::try_parse_from(words) {
            Ok(parsed) => match execute(client, parsed.command).await {
                Ok(_) => {}
                Err(error) => eprintln!("error: {error}"),
            },
            Err(error) => eprintln!("{}", error.render().to_string().trim_end()),
        }
    }
}

/// Splits a prompt line into words; double or single quotes group words.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => match chars.next() {
                Some(escaped) => current.push(escaped),
                None => return Err("line ends with a backslash".into()),
            },
            (Some(_), c) => current.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            (None, c) => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err("unclosed quote".into());
    }
    if in_word {
        words.push(current);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_words_honour_quotes() {
        assert_eq!(
            split_words(r#"PUT k "hello world" 'a b'"#).ok(),
            Some(vec![
                "PUT".into(),
                "k".into(),
                "hello world".into(),
                "a b".into()
            ])
        );
        assert_eq!(
            split_words(r#"PUT k """#).ok(),
            Some(vec!["PUT".into(), "k".into(), "".into()])
        );
        assert!(split_words("PUT k \"oops").is_err());
    }

    #[test]
    fn prompt_lines_parse_like_the_command_line() {
        let parsed = PromptLine::try_parse_from(["put", "k", "v", "w"]).expect("parse");
        assert!(
            matches!(parsed.command, Command::Put { ref value, .. } if value.join(" ") == "v w")
        );
        assert!(PromptLine::try_parse_from(["GET"]).is_err());
    }
}
