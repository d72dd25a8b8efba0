//! The `--config FILE` reader: TOML whose keys are `DKVSServer`'s flag names,
//! turned into `--name=value` arguments that the flags' own clap parsers
//! check (the ranges live there), every error naming the file's line.

use super::ServerConfig;

pub(super) fn config_file_in(args: &[String]) -> Option<String> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        if arg == "--config" {
            return iter.next().cloned();
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(path.to_string());
        }
    }
    None
}

/// The line without its comment: `#` starts one outside double quotes.
/// Only used to read a line of the old format for the message that says how
/// to fix it.
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (at, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return &line[..at],
            _ => {}
        }
    }
    line
}

/// A problem in the config file, at a line (and column, when TOML gives one).
#[derive(Debug)]
pub(super) struct FileError {
    line: usize,
    column: Option<usize>,
    message: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(column) = self.column {
            write!(f, ", column {column}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The 1-based line and column (in characters) of byte offset `at` of `text`.
fn position(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = &text.as_bytes()[..at];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = text
        .get(line_start..at)
        .map_or(at - line_start, |part| part.chars().count())
        + 1;
    (line, column)
}

/// Line `number` (1-based) of `text`, without its line break.
fn line_of(text: &str, number: usize) -> &str {
    text.lines().nth(number.saturating_sub(1)).unwrap_or("")
}

/// What TOML value a flag takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A flag without a value: `true` or `false`.
    Switch,
    /// A whole number (clap parses it and checks its range).
    Integer,
    /// A number, with or without a fraction.
    Number,
    /// A string (addresses, paths, names such as `always`).
    Text,
    /// A comma-separated list: an array of strings, or one string.
    List,
}

impl Kind {
    fn of(arg: &clap::Arg) -> Kind {
        use std::any::TypeId;
        if !arg.get_action().takes_values() {
            return Kind::Switch;
        }
        if arg.get_value_delimiter().is_some() {
            return Kind::List;
        }
        let id = arg.get_value_parser().type_id();
        let integers = [
            TypeId::of::<u8>(),
            TypeId::of::<u16>(),
            TypeId::of::<u32>(),
            TypeId::of::<u64>(),
            TypeId::of::<usize>(),
            TypeId::of::<i8>(),
            TypeId::of::<i16>(),
            TypeId::of::<i32>(),
            TypeId::of::<i64>(),
            TypeId::of::<isize>(),
        ];
        if integers.iter().any(|t| id == *t) {
            Kind::Integer
        } else if id == TypeId::of::<f64>() || id == TypeId::of::<f32>() {
            Kind::Number
        } else {
            Kind::Text
        }
    }

    fn wanted(self) -> &'static str {
        match self {
            Kind::Switch => "true or false",
            Kind::Integer => "a whole number",
            Kind::Number => "a number",
            Kind::Text => "a string",
            Kind::List => "an array of strings (or one comma-separated string)",
        }
    }
}

fn toml_type(value: &toml::de::DeValue<'_>) -> &'static str {
    use toml::de::DeValue;
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// A TOML integer as decimal digits (TOML also allows 0x, 0o and 0b).
fn decimal(integer: &toml::de::DeInteger<'_>) -> Option<String> {
    i128::from_str_radix(integer.as_str(), integer.radix())
        .ok()
        .map(|n| n.to_string())
}

/// A string in TOML syntax, for messages that show how to write a value.
fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The value of setting `key` (flag `arg`) as the text of a command-line
/// value; `None` for a switch set to `false` (left out). `raw` is how the
/// value is written in the file.
fn value_text(
    key: &str,
    kind: Kind,
    value: &toml::de::DeValue<'_>,
    raw: &str,
) -> Result<Option<String>, String> {
    use toml::de::DeValue;
    let text = match (kind, value) {
        (Kind::Switch, DeValue::Boolean(on)) => return Ok(on.then(String::new)),
        (Kind::Integer | Kind::Number, DeValue::Integer(integer)) => {
            decimal(integer).ok_or_else(|| format!("`{key} = {raw}`: the number is too large"))?
        }
        (Kind::Number, DeValue::Float(float)) => float.as_str().to_string(),
        (Kind::Text | Kind::List, DeValue::String(text)) => text.to_string(),
        (Kind::List, DeValue::Array(items)) => {
            let mut texts = Vec::with_capacity(items.len());
            for item in items.iter() {
                match item.get_ref() {
                    DeValue::String(text) if !text.contains(',') => texts.push(text.to_string()),
                    DeValue::String(text) => {
                        return Err(format!(
                            "`{key}`: an item of the array contains a comma ({}); give each as its own string",
                            quoted(text)
                        ));
                    }
                    other => {
                        return Err(format!(
                            "`{key}` takes {}, but an item of the array is {}: write {key} = [\"a\", \"b\"]",
                            kind.wanted(),
                            toml_type(other)
                        ));
                    }
                }
            }
            texts.join(",")
        }
        (_, other) => {
            let hint = match (kind, other) {
                (Kind::Integer | Kind::Number, DeValue::String(text))
                    if text.trim().parse::<f64>().is_ok() =>
                {
                    format!(": write {key} = {} (numbers take no quotes)", text.trim())
                }
                (
                    Kind::Text | Kind::List,
                    DeValue::Integer(_) | DeValue::Float(_) | DeValue::Boolean(_),
                ) => {
                    format!(": quote it, {key} = {}", quoted(raw))
                }
                _ => String::new(),
            };
            return Err(format!(
                "`{key}` takes {}, not {}{hint}",
                kind.wanted(),
                toml_type(other)
            ));
        }
    };
    Ok(Some(text))
}

/// Checks one setting's value with the flag's own clap parser (the ranges
/// live there), so that a bad value is reported at its line in the file.
fn check_with_clap(arg: &clap::Arg, argument: &str) -> Result<(), String> {
    clap::Command::new("DKVSServer")
        .no_binary_name(true)
        .arg(arg.clone().required(false))
        .try_get_matches_from([argument])
        .map(drop)
        .map_err(|error| {
            let rendered = error.render().to_string();
            let message = rendered.strip_prefix("error: ").unwrap_or(&rendered);
            let message = message
                .split_once("\n\nFor more information")
                .map_or(message, |(message, _)| message);
            message.trim_end().to_string()
        })
}

/// For a TOML syntax error on a line of the old `name = value` format, whose
/// strings were not quoted (`listen = 127.0.0.1:7001`): a message that shows
/// the line as TOML. `None` if the line is not such a line.
fn unquoted_value_hint(command: &clap::Command, line: &str) -> Option<String> {
    let (name, value) = strip_comment(line).split_once('=')?;
    let (name, value) = (name.trim(), value.trim());
    let flag = name.replace('_', "-");
    let takes_text = command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(flag.as_str()))
        .is_some_and(|arg| matches!(Kind::of(arg), Kind::Text | Kind::List));
    if !takes_text
        || value.is_empty()
        || value.contains('=')
        || value.starts_with(['"', '\'', '[', '{'])
    {
        return None;
    }
    if toml::de::DeValue::parse(value).is_ok() {
        return None;
    }
    Some(format!(
        "`{name} = {value}` is not TOML; quote strings: {name} = {}",
        quoted(value)
    ))
}

/// Reads a TOML config file into `--name=value` arguments, each with the id
/// of its flag. Keys are the flag names (`_` may stand for `-`); every error
/// names the line.
pub(super) fn file_to_args(text: &str) -> Result<Vec<(clap::Id, String)>, FileError> {
    let command = <ServerConfig as clap::CommandFactory>::command();
    let document = toml::de::DeTable::parse(text).map_err(|error| {
        let (line, column) = error.span().map_or((1, None), |span| {
            let (line, column) = position(text, span.start);
            (line, Some(column))
        });
        let source = line_of(text, line);
        match unquoted_value_hint(&command, source) {
            Some(message) => FileError {
                line,
                column: None,
                message,
            },
            None => FileError {
                line,
                column,
                message: format!(
                    "`{}`: {} (the file is TOML: `name = value` lines, strings in double quotes)",
                    source.trim(),
                    error.message().trim_end()
                ),
            },
        }
    })?;
    // In the order of the file, so that the first problem is the one reported.
    let mut entries: Vec<_> = document.get_ref().iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    let mut seen: Vec<(String, usize)> = Vec::new();
    let mut args = Vec::new();
    for (key, value) in entries {
        let (line, _) = position(text, key.span().start);
        let error = |message: String| FileError {
            line,
            column: None,
            message,
        };
        let written: &str = key.get_ref();
        let name = written.replace('_', "-");
        if name == "config" {
            return Err(error(format!(
                "`{written}`: a config file cannot name another (--config is a command-line flag)"
            )));
        }
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(name.as_str()))
            .filter(|_| name != "help" && name != "version")
            .ok_or_else(|| {
                error(format!(
                    "unknown setting `{written}` (settings are DKVSServer's flag names, see DKVSServer --help)"
                ))
            })?;
        if let Some((_, first)) = seen.iter().find(|(seen, _)| *seen == name) {
            return Err(error(format!(
                "`{written}` sets --{name} again (already set on line {first})"
            )));
        }
        seen.push((name.clone(), line));
        let raw = text.get(value.span()).unwrap_or("").trim();
        let Some(value) =
            value_text(written, Kind::of(arg), value.get_ref(), raw).map_err(error)?
        else {
            continue;
        };
        let argument = if value.is_empty() && Kind::of(arg) == Kind::Switch {
            format!("--{name}")
        } else {
            format!("--{name}={value}")
        };
        check_with_clap(arg, &argument).map_err(error)?;
        args.push((arg.get_id().clone(), argument));
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_is_true_or_false() {
        use toml::de::DeValue;
        let on = value_text("x", Kind::Switch, &DeValue::Boolean(true), "true");
        assert_eq!(on, Ok(Some(String::new())));
        let off = value_text("x", Kind::Switch, &DeValue::Boolean(false), "false");
        assert_eq!(off, Ok(None));
        let error = value_text("x", Kind::Switch, &DeValue::String("yes".into()), "\"yes\"")
            .expect_err("a string");
        assert!(error.contains("takes true or false"), "{error}");
    }
}
