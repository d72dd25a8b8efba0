//! The interactive prompt: `DKVSClient` with no command reads commands from
//! stdin, one a line, parsed like the command line.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use dkvs::client::Client;

use crate::show::{Output, Printing};
use crate::{Command, execute};

/// At the prompt values end with a newline (the next prompt starts on its
/// own line) and results print as text.
const AT_THE_PROMPT: Printing = Printing {
    output: Output::Text,
    newline_after_value: true,
};

/// Commands typed at the interactive prompt.
#[derive(Debug, Parser)]
#[command(no_binary_name = true, name = "", disable_help_flag = true)]
struct PromptLine {
    #[command(subcommand)]
    command: Command,
}

/// The interactive prompt: one command per line until EOF, `exit` or `quit`.
/// `rpc_timeout` is `--timeout-ms`, for commands that connect a second
/// client (`check`).
pub async fn prompt(client: &Client, rpc_timeout: Duration) -> ExitCode {
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
                    "PUT <key> <value> | GET <key> | DELETE <key> | list [--prefix P] | status | replicas <key> | exit"
                );
                continue;
            }
            Some(_) => {}
        }
        match PromptLine::try_parse_from(words) {
            Ok(parsed) => match execute(client, parsed.command, rpc_timeout, AT_THE_PROMPT).await {
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
