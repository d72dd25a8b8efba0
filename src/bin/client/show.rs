//! The commands that print what the cluster holds or how it stands — GET,
//! `status`, `replicas`, `list` — as text for people or, with `--output
//! json`, as JSON for scripts.

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use dkvs::Error;
use dkvs::client::Client;

/// How results are printed (`--output`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people: values as their bytes, tables, one key per line.
    #[default]
    Text,
    /// For scripts: one JSON document (`list`: one object per line).
    Json,
}

/// How this run prints.
#[derive(Clone, Copy, Debug)]
pub struct Printing {
    pub output: Output,
    /// Whether GET ends a value with a newline: on a terminal and at the
    /// prompt, so the next line starts clean; never into a pipe or a file,
    /// so the bytes come out exactly as stored.
    pub newline_after_value: bool,
}

/// `list`'s options.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only keys that start with this.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Stop after this many keys (0: all of them).
    #[arg(long, default_value_t = 0)]
    limit: u64,
    /// Also print each key's newest version (KEY, a tab, VERSION; in JSON
    /// the version is always there).
    #[arg(long)]
    versions: bool,
}

/// `status`'s options.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Also list every periodic worker of the node asked, healthy or not.
    #[arg(long, short = 'v')]
    workers: bool,
    /// Redraw the status in place every --interval-secs until Ctrl-C (a
    /// node that stops answering is shown as an error line, and the
    /// watch goes on).
    #[arg(long, short = 'w')]
    watch: bool,
    /// Seconds between redraws with --watch.
    #[arg(long, default_value_t = 2, requires = "watch")]
    interval_secs: u64,
}

/// GET: the value's bytes, or JSON with `value_base64` (and `value` when
/// the bytes are UTF-8). Whether the key was found.
pub async fn get(client: &Client, key: &str, printing: Printing) -> Result<bool, Error> {
    let record = client.get_record(key).await?;
    let mut out = std::io::stdout().lock();
    let found = record.as_ref().and_then(|r| r.value.as_ref());
    match (printing.output, found) {
        (Output::Text, Some(value)) => {
            let _ = out.write_all(value);
            if printing.newline_after_value {
                let _ = writeln!(out);
            }
        }
        (Output::Text, None) => eprintln!("key not found: {key}"),
        (Output::Json, _) => {
            let mut json = serde_json::json!({
                "key": key,
                "found": found.is_some(),
                "version": record.as_ref().map(|r| r.version.to_string()),
            });
            if let Some(value) = found {
                json["value_base64"] = base64::engine::general_purpose::STANDARD
                    .encode(value)
                    .into();
                if let Ok(text) = std::str::from_utf8(value) {
                    json["value"] = text.into();
                }
            }
            let _ = writeln!(out, "{json}");
        }
    }
    Ok(found.is_some())
}

/// `status`: the member table (and workers), once or redrawn in place.
pub async fn status(client: &Client, args: StatusArgs, printing: Printing) -> Result<(), Error> {
    if !args.watch {
        let status = client.status().await?;
        print!("{}", render_status(&status, args.workers, printing.output));
        return Ok(());
    }
    let interval = Duration::from_secs(args.interval_secs.max(1));
    loop {
        let shown = match client.status().await {
            Ok(status) => render_status(&status, args.workers, printing.output),
            Err(why) => format!("error: {why}\n"),
        };
        let taken = time_of_day();
        // Home, clear the screen, draw: the table stays in one place.
        print!(
            "\x1b[H\x1b[2J{shown}\nevery {}s, {taken}; Ctrl-C stops\n",
            interval.as_secs()
        );
        let _ = std::io::stdout().flush();
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn render_status(status: &dkvs::pb::StatusResponse, workers: bool, output: Output) -> String {
    if output == Output::Json {
        let json = dkvs::node::status_json(status);
        return format!(
            "{}\n",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        );
    }
    let now_ms = dkvs::clock::wall_clock_ms();
    let mut shown = crate::status::status_table(status, now_ms);
    if workers {
        shown.push('\n');
        shown.push_str(&crate::status::workers_table(status, now_ms));
    }
    shown
}

/// The time of day (UTC, HH:MM:SS) for the watch's footer.
fn time_of_day() -> String {
    let seconds = dkvs::clock::wall_clock_ms() / 1000 % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// `replicas`: the key's preference list, computed from the ring.
pub fn replicas(client: &Client, key: &str, printing: Printing) {
    let replicas = client.replicas_of(key);
    let mut out = std::io::stdout().lock();
    match printing.output {
        Output::Text => {
            for (rank, address) in replicas.iter().enumerate() {
                let _ = writeln!(out, "{}. {address}", rank + 1);
            }
        }
        Output::Json => {
            let json = serde_json::json!({ "key": key, "replicas": replicas });
            let _ = writeln!(out, "{json}");
        }
    }
}

/// `list`: the keys of a listing, page after page, until it is complete
/// or `--limit` keys (0: no limit) were printed.
pub async fn list(client: &Client, args: ListArgs, printing: Printing) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    let (mut cursor, mut printed) = (String::new(), 0u64);
    loop {
        let left = match args.limit {
            0 => 0,
            limit => (limit - printed).min(1000) as u32,
        };
        let (keys, next) = client.list_page(&args.prefix, left, &cursor).await?;
        for (key, version) in keys {
            let line = match (printing.output, args.versions) {
                (Output::Json, _) => {
                    serde_json::json!({ "key": key, "version": version.to_string() }).to_string()
                }
                (Output::Text, true) => format!("{key}\t{version}"),
                (Output::Text, false) => key,
            };
            // A closed pipe (`| head`) ends the listing quietly.
            if writeln!(out, "{line}").is_err() {
                return Ok(());
            }
            printed += 1;
            if printed == args.limit {
                return Ok(());
            }
        }
        if next.is_empty() {
            return Ok(());
        }
        cursor = next;
    }
}
