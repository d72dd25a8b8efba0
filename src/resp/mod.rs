//! The Redis protocol (RESP2 and RESP3), pure: parsing requests (arrays
//! of bulk strings, and inline commands typed into `nc` or telnet) out of
//! a buffer, bounded, and encoding replies. The server that uses it is
//! `node::resp`.

use bytes::{Buf, BytesMut};

/// Bounds on what one request may be, as Redis's own settings are
/// (`proto-max-bulk-len`, the inline buffer, the multibulk count).
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// The longest bulk string (a key or a value).
    pub max_bulk: usize,
    /// The most arguments in one command.
    pub max_args: usize,
    /// The longest inline command line.
    pub max_inline: usize,
    /// The most bytes of bulk strings in one command.
    pub max_command: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_bulk: 512 << 20,
            max_args: 1 << 20,
            max_inline: 64 << 10,
            max_command: 1 << 30,
        }
    }
}

/// A request that breaks the protocol: answered with this error (Redis's
/// words), then the connection is closed, as Redis does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// The longest `*N` or `$N` header line.
const MAX_HEADER: usize = 32;

/// Parses commands out of a connection's bytes as they arrive. A command
/// is taken apart as its pieces come: each bulk string is copied out once,
/// and what was parsed is not parsed again on the next read (a client
/// sending a byte at a time costs linear time, not quadratic).
#[derive(Debug, Default)]
pub struct Parser {
    /// A multibulk command begun: the arguments so far.
    partial: Option<Partial>,
    /// How far the current inline line has been searched for its end.
    inline_scanned: usize,
}

#[derive(Debug)]
struct Partial {
    remaining: usize,
    args: Vec<Vec<u8>>,
    bytes: usize,
}

impl Parser {
    /// Whether no command is begun (nothing buffered belongs to one).
    pub fn is_idle(&self, buffer: &[u8]) -> bool {
        self.partial.is_none() && buffer.is_empty()
    }

    /// The next whole command at the front of `buffer`, consuming it, or
    /// `None` when more bytes are needed. Empty inline lines are skipped
    /// (Redis ignores them).
    pub fn next(
        &mut self,
        buffer: &mut BytesMut,
        bounds: Bounds,
    ) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
        loop {
            if self.partial.is_none() {
                let Some(&first) = buffer.first() else {
                    return Ok(None);
                };
                if first != b'*' {
                    match self.inline(buffer, bounds)? {
                        Some(args) if args.is_empty() => continue,
                        parsed => return Ok(parsed),
                    }
                }
                let Some(count) = header(buffer, "multibulk")? else {
                    return Ok(None);
                };
                if count > bounds.max_args as i64 {
                    return Err(ProtocolError(
                        "Protocol error: invalid multibulk length".into(),
                    ));
                }
                if count <= 0 {
                    continue;
                }
                self.partial = Some(Partial {
                    remaining: count as usize,
                    args: Vec::new(),
                    bytes: 0,
                });
            }
            let Some(partial) = self.partial.as_mut() else {
                continue;
            };
            while partial.remaining > 0 {
                match buffer.first() {
                    None => return Ok(None),
                    Some(b'$') => {}
                    Some(&other) => {
                        return Err(ProtocolError(format!(
                            "Protocol error: expected '$', got '{}'",
                            char::from(other)
                        )));
                    }
                }
                let Some(end) = line_end(buffer, 1) else {
                    return short_header(buffer, "bulk").map(|()| None);
                };
                let length = integer(buffer, 1, end)
                    .filter(|&n| n >= 0 && n as u64 <= bounds.max_bulk as u64)
                    .ok_or_else(|| ProtocolError("Protocol error: invalid bulk length".into()))?
                    as usize;
                if partial.bytes + length > bounds.max_command {
                    return Err(ProtocolError(
                        "Protocol error: the command is larger than this node takes".into(),
                    ));
                }
                let start = end + 2;
                if buffer.len() < start + length + 2 {
                    return Ok(None);
                }
                if &buffer[start + length..start + length + 2] != b"\r\n" {
                    return Err(ProtocolError(
                        "Protocol error: bulk string not followed by CRLF".into(),
                    ));
                }
                partial.args.push(buffer[start..start + length].to_vec());
                buffer.advance(start + length + 2);
                partial.bytes += length;
                partial.remaining -= 1;
            }
            return Ok(self.partial.take().map(|done| done.args));
        }
    }

    /// An inline command (a line ending with \n; nc sends no \r).
    fn inline(
        &mut self,
        buffer: &mut BytesMut,
        bounds: Bounds,
    ) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
        let from = self.inline_scanned.min(buffer.len());
        let Some(newline) = buffer[from..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|at| from + at)
        else {
            self.inline_scanned = buffer.len();
            return too_long_line(buffer, bounds).map(|()| None);
        };
        self.inline_scanned = 0;
        if newline > bounds.max_inline {
            return Err(ProtocolError(
                "Protocol error: too big inline request".into(),
            ));
        }
        let line = buffer[..newline]
            .strip_suffix(b"\r")
            .unwrap_or(&buffer[..newline]);
        let args = split_inline(line)
            .ok_or_else(|| ProtocolError("Protocol error: unbalanced quotes in request".into()))?;
        buffer.advance(newline + 1);
        Ok(Some(args))
    }
}

/// The position of the `\r\n` that ends the line starting at `from`.
fn line_end(buffer: &[u8], from: usize) -> Option<usize> {
    let end = buffer.len().min(from + MAX_HEADER);
    buffer
        .get(from..end)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|at| from + at)
}

/// An integer line (`*N` or `$N`) starting at `from` (after its marker).
fn integer(buffer: &[u8], from: usize, end: usize) -> Option<i64> {
    std::str::from_utf8(buffer.get(from..end)?)
        .ok()?
        .parse()
        .ok()
}

/// A `*N` header at the front of `buffer`, consumed; `None` when it has
/// not all arrived.
fn header(buffer: &mut BytesMut, what: &str) -> Result<Option<i64>, ProtocolError> {
    let Some(end) = line_end(buffer, 1) else {
        return short_header(buffer, what).map(|()| None);
    };
    let count = integer(buffer, 1, end)
        .ok_or_else(|| ProtocolError(format!("Protocol error: invalid {what} length")))?;
    buffer.advance(end + 2);
    Ok(Some(count))
}

/// A header line with no end yet: an error once it is longer than a
/// header may be.
fn short_header(buffer: &[u8], what: &str) -> Result<(), ProtocolError> {
    if buffer.len() > MAX_HEADER {
        return Err(ProtocolError(format!(
            "Protocol error: invalid {what} length"
        )));
    }
    Ok(())
}

/// A line with no end yet: an error once it is longer than any may be.
fn too_long_line(buffer: &[u8], bounds: Bounds) -> Result<(), ProtocolError> {
    if buffer.len() > bounds.max_inline {
        return Err(ProtocolError(
            "Protocol error: too big inline request".into(),
        ));
    }
    Ok(())
}

/// Splits an inline command as Redis does (`sdssplitargs`): words separated
/// by blanks; "double quotes" with \n, \r, \t, \", \\ and \xHH escapes;
/// 'single quotes' with \' only. `None` for unbalanced quotes.
pub fn split_inline(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            return Some(args);
        }
        let word = match line[i] {
            quote @ (b'"' | b'\'') => {
                let (word, next) = quoted(line, i + 1, quote)?;
                i = next;
                word
            }
            _ => {
                let start = i;
                while i < line.len() && !line[i].is_ascii_whitespace() {
                    i += 1;
                }
                line[start..i].to_vec()
            }
        };
        args.push(word);
    }
}

/// The word of a quote that opened just before `line[i]`, and where the
/// next word may start; `None` when it never closes or a closing quote is
/// not followed by a blank.
fn quoted(line: &[u8], mut i: usize, quote: u8) -> Option<(Vec<u8>, usize)> {
    let mut word = Vec::new();
    loop {
        let byte = *line.get(i)?;
        if byte == quote {
            i += 1;
            if line.get(i).is_some_and(|b| !b.is_ascii_whitespace()) {
                return None;
            }
            return Some((word, i));
        }
        if byte != b'\\' {
            word.push(byte);
            i += 1;
            continue;
        }
        // Escapes: in single quotes only \'; in double quotes \xHH and the
        // C ones.
        let escaped = *line.get(i + 1)?;
        if quote == b'\'' {
            if escaped == b'\'' {
                word.push(b'\'');
                i += 2;
            } else {
                word.push(byte);
                i += 1;
            }
            continue;
        }
        if escaped == b'x'
            && let Some(value) = hex_pair(line.get(i + 2..i + 4))
        {
            word.push(value);
            i += 4;
            continue;
        }
        word.push(match escaped {
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'b' => 8,
            b'a' => 7,
            other => other,
        });
        i += 2;
    }
}

fn hex_pair(pair: Option<&[u8]>) -> Option<u8> {
    let pair = std::str::from_utf8(pair?).ok()?;
    u8::from_str_radix(pair, 16).ok()
}

/// A reply, encoded for the protocol version the connection speaks.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Vec<u8>),
    /// A missing value: `$-1` in RESP2, `_` in RESP3.
    Null,
    Array(Vec<Reply>),
    /// Pairs: a map in RESP3, a flat array in RESP2.
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    pub fn ok() -> Self {
        Reply::Simple("OK".into())
    }

    pub fn error(message: impl Into<String>) -> Self {
        Reply::Error(message.into())
    }

    pub fn bulk(text: impl Into<Vec<u8>>) -> Self {
        Reply::Bulk(text.into())
    }

    /// Appends the reply's bytes in RESP `version` (2 or 3) to `out`.
    pub fn encode(&self, version: u8, out: &mut Vec<u8>) {
        match self {
            Reply::Simple(text) => {
                out.push(b'+');
                out.extend(one_line(text).as_bytes());
                out.extend(b"\r\n");
            }
            Reply::Error(text) => {
                out.push(b'-');
                out.extend(one_line(text).as_bytes());
                out.extend(b"\r\n");
            }
            Reply::Integer(n) => out.extend(format!(":{n}\r\n").as_bytes()),
            Reply::Bulk(bytes) => {
                out.extend(format!("${}\r\n", bytes.len()).as_bytes());
                out.extend(bytes);
                out.extend(b"\r\n");
            }
            Reply::Null if version >= 3 => out.extend(b"_\r\n"),
            Reply::Null => out.extend(b"$-1\r\n"),
            Reply::Array(items) => {
                out.extend(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    item.encode(version, out);
                }
            }
            Reply::Map(pairs) if version >= 3 => {
                out.extend(format!("%{}\r\n", pairs.len()).as_bytes());
                for (key, value) in pairs {
                    key.encode(version, out);
                    value.encode(version, out);
                }
            }
            Reply::Map(pairs) => {
                out.extend(format!("*{}\r\n", pairs.len() * 2).as_bytes());
                for (key, value) in pairs {
                    key.encode(version, out);
                    value.encode(version, out);
                }
            }
        }
    }
}

/// A simple string or error must be one line.
fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
