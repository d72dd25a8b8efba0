//! A minimal HTTP/1.1 client for the nodes' HTTP door (`--http-listen`):
//! one request per connection, plain or TLS, with a deadline, and the
//! Prometheus text format read back into samples.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// An answer: status code, headers (names lowercased), body (as text,
/// lossily, and as bytes).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub bytes: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on `address` (plain HTTP), with extra `headers`.
pub async fn get(address: &str, path: &str, headers: &[(&str, &str)]) -> Result<Answer, String> {
    request(address, "GET", path, headers, b"").await
}

/// `method path` on `address` (plain HTTP), with extra `headers` and
/// `body` (sent with its Content-Length when not empty).
pub async fn request(
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Answer, String> {
    let stream = connect(address).await?;
    exchange(stream, address, method, path, headers, body).await
}

/// `GET path` on `address` over TLS, trusting the CA certificates in `ca`,
/// offering only HTTP/1.1 in ALPN.
pub async fn get_tls(
    ca: &std::path::Path,
    address: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    let mut config = (*dkvs::security::tls::ClientTls::for_ca(ca)?.config()).clone();
    // As curl --http1.1, Python's urllib3 and most health checkers offer.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = std::sync::Arc::new(config);
    let stream = connect(address).await?;
    let ip: std::net::IpAddr = address
        .rsplit_once(':')
        .and_then(|(host, _)| host.parse().ok())
        .ok_or("an ip:port address")?;
    let name = rustls::pki_types::ServerName::IpAddress(ip.into());
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS handshake with {address}: {e}"))?;
    exchange(stream, address, "GET", path, headers, b"").await
}

async fn connect(address: &str) -> Result<tokio::net::TcpStream, String> {
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .map_err(|_| format!("connecting to {address} timed out"))?
    .map_err(|e| format!("connecting to {address}: {e}"))
}

async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Answer, String> {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let exchange = async {
        // A server may answer before it has read the body (413 from
        // Content-Length) and close: as curl does, read the answer even
        // when sending the rest failed.
        let sent = match stream.write_all(request.as_bytes()).await {
            Ok(()) => stream.write_all(body).await,
            Err(error) => Err(error),
        };
        let mut bytes = Vec::new();
        let read = stream.read_to_end(&mut bytes).await;
        match (sent, read) {
            (_, Ok(_)) if !bytes.is_empty() => Ok(bytes),
            (Err(error), _) | (Ok(()), Err(error)) => Err(error),
            (Ok(()), Ok(_)) => Ok(bytes),
        }
    };
    let bytes = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .map_err(|_| format!("{method} {path} on {address} timed out"))?
        .map_err(|e| format!("{method} {path} on {address}: {e}"))?;
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&bytes[..end]).map_err(|e| format!("headers not UTF-8: {e}"))?;
    let body = &bytes[end + 4..];
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let bytes = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
    })
}

/// The body of a `Transfer-Encoding: chunked` answer.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk without its size line")?;
        let size_line = std::str::from_utf8(&rest[..line_end]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("chunk size {size_line:?}: {e}"))?;
        let after = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = after.get(..size).ok_or("a chunk shorter than its size")?;
        body.extend_from_slice(chunk);
        rest = after[size..]
            .strip_prefix(b"\r\n")
            .ok_or("a chunk without its CRLF")?;
    }
}

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of a scrape; `Err` names the first line that is not a
/// comment, a blank line or `name{label="value",...} number`.
pub fn samples(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("not a sample: {line:?}");
        let (series, value) = line.rsplit_once(' ').ok_or_else(bad)?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            number => number.parse().map_err(|_| bad())?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').ok_or_else(bad)?;
                let mut labels = Vec::new();
                for pair in rest.split("\",").filter(|p| !p.is_empty()) {
                    let (label, value) = pair.split_once("=\"").ok_or_else(bad)?;
                    labels.push((label.to_string(), value.trim_end_matches('"').to_string()));
                }
                (name, labels)
            }
        };
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if !valid_name {
            return Err(bad());
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(samples)
}

/// The sum of the samples named `name` whose labels include every pair of
/// `labels`.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| labels.iter().all(|(l, v)| s.label(l) == Some(*v)))
        .map(|s| s.value)
        .sum()
}
