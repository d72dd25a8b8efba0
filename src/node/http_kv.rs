//! `GET|PUT|DELETE /v1/kv/{key}`: the key-value API over HTTP (DESIGN
//! "HTTP" and "Outcomes"), for curl and scripts.
//!
//! The key is the rest of the path, percent-decoded (it may hold `/`;
//! invalid UTF-8 is 400); the value is the raw body; `?consistency=one|
//! quorum|all` (and `any` for writes). A found key answers its bytes with
//! its version in `ETag` and `X-DKVS-Version` (`lamport@node_id`, as the
//! CLI prints it); a missing one 404. Writes go through the one write entry
//! point ([`Node::write`], forwarded to the key's first live replica like a
//! gRPC write) and every write answer carries `X-DKVS-Outcome`. Errors are
//! JSON, `{"error", "code", "outcome"}`, with the HTTP status the Outcomes
//! table gives ([`http_status`]). A body over `--max-value-bytes` is 413,
//! answered from `Content-Length` before any of it is read, or once the
//! limit is passed for a body without one. With `--auth-file`, reads need
//! a `read` token and writes `readwrite`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tonic::Code;

use super::Node;
use super::access_gate::Guard;
use super::writes::{ClientWrite, Entry};
use crate::error::{Error, Outcome};
use crate::quorum::Consistency;
use crate::security::auth::{Role, bearer_token};

/// The path prefix of the key-value API.
pub(super) const KV_PREFIX: &str = "/v1/kv/";

/// The HTTP status of an answer with gRPC `code` and, for a write,
/// `outcome` (DESIGN "Outcomes").
pub(super) fn http_status(code: Code, outcome: Option<Outcome>) -> StatusCode {
    let after_sending = outcome == Some(Outcome::Unknown);
    if after_sending
        && !matches!(
            code,
            Code::Unavailable | Code::Aborted | Code::ResourceExhausted | Code::DeadlineExceeded
        )
    {
        // An unknown outcome is never a client error (4xx): the write may
        // have applied (say, a forwarded write's answer that named none).
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    match code {
        Code::Ok => StatusCode::OK,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unavailable | Code::Aborted | Code::ResourceExhausted | Code::DeadlineExceeded
            if after_sending =>
        {
            StatusCode::GATEWAY_TIMEOUT
        }
        Code::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Answers a request to `/v1/kv/...` for `node`.
pub(super) async fn kv(node: &Arc<Node>, guard: &Guard, request: Request) -> Response {
    let writes = match *request.method() {
        Method::GET | Method::HEAD => false,
        Method::PUT | Method::DELETE => true,
        _ => {
            let mut refused = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "use GET, PUT or DELETE on /v1/kv/{key}",
                Code::Unimplemented,
                None,
            );
            refused.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, PUT, DELETE"),
            );
            return refused;
        }
    };
    let not_applied = writes.then_some(Outcome::NotApplied);
    let role = if writes { Role::ReadWrite } else { Role::Read };
    if let Some(refused) = refuse_caller(guard, &request, role, not_applied) {
        return refused;
    }
    if node.draining.load(std::sync::atomic::Ordering::Relaxed) {
        let mut refused = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is stopping; send the request to another node",
            Code::Unavailable,
            not_applied,
        );
        retry_after(&mut refused, 1);
        return refused;
    }
    let _slot = match admit_client(node, not_applied) {
        Ok(slot) => slot,
        Err(refused) => return refused,
    };
    let parsed = key_of(request.uri().path())
        .and_then(|key| Ok((key, consistency_of(request.uri().query(), writes)?)));
    let (key, consistency) = match parsed {
        Ok(parsed) => parsed,
        Err(why) => return failure(&Error::InvalidArgument(why), not_applied),
    };
    match *request.method() {
        Method::GET | Method::HEAD => get(node, &key, consistency).await,
        Method::PUT => {
            let timeout = std::time::Duration::from_millis(node.config.request_body_timeout_ms);
            let value = match body_within(request, node.limits.max_value_bytes, timeout).await {
                Ok(value) => value,
                Err(refused) => return refused,
            };
            write(node, key, Some(value), consistency).await
        }
        _ => write(node, key, None, consistency).await,
    }
}

async fn get(node: &Node, key: &str, consistency: Consistency) -> Response {
    let read = async {
        node.membership.refuse_until_agreed()?;
        node.limits.check_key(key)?;
        node.coordinator.get(key, consistency).await
    };
    match read.await {
        Ok(Some(record)) if record.value.is_some() => {
            let version = record.version.to_string();
            let mut response = Body::from(record.value.unwrap_or_default()).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            versioned(headers, &version);
            response
        }
        Ok(_) => error(
            StatusCode::NOT_FOUND,
            &format!("key not found: {key}"),
            Code::NotFound,
            None,
        ),
        Err(why) => failure(&why, None),
    }
}

async fn write(
    node: &Arc<Node>,
    key: String,
    value: Option<Bytes>,
    consistency: Consistency,
) -> Response {
    let write = ClientWrite {
        key,
        value,
        consistency,
        timeout: None,
    };
    match node.write(write, Entry::Client { forward: true }).await {
        Ok(ack) => {
            let version = ack.version.to_string();
            let body = serde_json::json!({ "version": version, "acks": ack.acks });
            let mut response = (
                [(header::CONTENT_TYPE, "application/json")],
                format!("{body}\n"),
            )
                .into_response();
            let headers = response.headers_mut();
            versioned(headers, &version);
            headers.insert(
                "x-dkvs-outcome",
                HeaderValue::from_static(Outcome::Applied.name()),
            );
            response
        }
        Err(why) => {
            let outcome = why.outcome();
            failure(&why, Some(outcome))
        }
    }
}

/// `GET /v1/cluster`: this node's view of the cluster, as
/// `DKVSClient status` shows it, in JSON.
pub(super) fn cluster(node: &Node, guard: &Guard, request: &Request) -> Response {
    if let Some(refused) = refuse_caller(guard, request, Role::Read, None) {
        return refused;
    }
    let status = super::cluster::status_of(node);
    let mut body = super::http_json::cluster(&status);
    // The share of the keys each member replicates on the ring reads use
    // (the dashboard draws it).
    let view = node.cluster.placement();
    let ring: Vec<serde_json::Value> = view
        .ring()
        .replica_shares(view.replicas())
        .into_iter()
        .map(|(address, share)| serde_json::json!({ "address": address, "share": share }))
        .collect();
    body["ring"] = ring.into();
    json_answer(StatusCode::OK, &body)
}

/// `GET /v1/replicas/{key}`: the key's replicas and the version each holds
/// (asked directly, one call each, none waiting on another), as JSON.
pub(super) async fn replicas(node: &Node, guard: &Guard, request: Request) -> Response {
    if let Some(refused) = refuse_caller(guard, &request, Role::Read, None) {
        return refused;
    }
    let path = request.uri().path().replacen("/v1/replicas/", KV_PREFIX, 1);
    drop(request);
    let key = match key_of(&path) {
        Ok(key) => key,
        Err(why) => return failure(&Error::InvalidArgument(why), None),
    };
    if let Err(why) = node.limits.check_key(&key) {
        return failure(&why, None);
    }
    let view = node.cluster.placement();
    let handles = match node.cluster.replica_handles(&view, &key, &node.replica) {
        Ok(handles) => handles,
        Err(why) => return failure(&why, None),
    };
    let timeout = node.config.rpc_timeout();
    let reads = handles.iter().map(|h| h.read(&key, timeout));
    let held = futures::future::join_all(reads).await;
    let replicas: Vec<serde_json::Value> = handles
        .iter()
        .zip(held)
        .map(|(handle, held)| {
            let (version, deleted, error) = match held {
                Ok(Some(record)) => (
                    Some(record.version.to_string()),
                    record.value.is_none(),
                    None,
                ),
                Ok(None) => (None, false, None),
                Err(why) => (None, false, Some(format!("{why:?}"))),
            };
            serde_json::json!({
                "address": handle.address,
                "version": version,
                "deleted": deleted,
                "error": error,
            })
        })
        .collect();
    let body = serde_json::json!({
        "key": key,
        "layout_version": view.version(),
        "replicas": replicas,
    });
    json_answer(StatusCode::OK, &body)
}

/// `body` as a JSON answer with `status`.
pub(super) fn json_answer(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

/// Puts `version` in `ETag` (quoted) and `X-DKVS-Version`.
fn versioned(headers: &mut axum::http::HeaderMap, version: &str) {
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        headers.insert(header::ETAG, etag);
    }
    if let Ok(version) = HeaderValue::from_str(version) {
        headers.insert("x-dkvs-version", version);
    }
}

/// The key a `/v1/kv/...` path names: the rest of the path,
/// percent-decoded, UTF-8.
pub(super) fn key_of(path: &str) -> Result<String, String> {
    let raw = path.strip_prefix(KV_PREFIX).unwrap_or_default();
    if raw.is_empty() {
        return Err(
            "no key: use /v1/kv/{key} (the key is the rest of the path), or GET /v1/kv?prefix= to list keys"
                .into(),
        );
    }
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|key| key.into_owned())
        .map_err(|_| "the key is not UTF-8 once percent-decoded; a key must be UTF-8".into())
}

/// The `consistency` query parameter (QUORUM when absent). Any other
/// parameter, a repeated or an empty one is refused, so a misspelt one
/// never silently means QUORUM.
pub(super) fn consistency_of(query: Option<&str>, writes: bool) -> Result<Consistency, String> {
    let mut asked = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("consistency", value)) if asked.is_none() => asked = Some(value),
            Some(("consistency", _)) => return Err("consistency is given twice".into()),
            _ => {
                return Err(format!(
                    "unknown query parameter {pair:?}: /v1/kv/{{key}} takes only consistency=one|quorum|all"
                ));
            }
        }
    }
    match asked.map(|c| c.to_ascii_lowercase()).as_deref() {
        None | Some("quorum") => Ok(Consistency::Quorum),
        Some("one") => Ok(Consistency::One),
        Some("all") => Ok(Consistency::All),
        Some("any") if writes => Ok(Consistency::Any),
        Some(other) => Err(format!(
            "unknown consistency {other:?}: use one, quorum or all{}",
            if writes { " (or any, for writes)" } else { "" }
        )),
    }
}

/// The request's body, at most `limit` bytes, arrived within `timeout`:
/// 413 past the limit (from `Content-Length` before reading anything when
/// it is given), 408 when it is too slow, 400 when it breaks off; all not
/// applied.
async fn body_within(
    request: Request,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, Response> {
    use http_body_util::BodyExt;
    let refused = |status, why: &str, code| error(status, why, code, Some(Outcome::NotApplied));
    let too_large = |size: &str| {
        refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the value is {size} bytes; the limit is {limit} bytes (--max-value-bytes)"),
            Code::InvalidArgument,
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared
        && declared > limit as u64
    {
        return Err(too_large(&declared.to_string()));
    }
    let limited = http_body_util::Limited::new(request.into_body(), limit);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(why)) if why.is::<http_body_util::LengthLimitError>() => Err(too_large("more than")),
        Ok(Err(why)) => Err(refused(
            StatusCode::BAD_REQUEST,
            &format!("the request body broke off: {why}"),
            Code::InvalidArgument,
        )),
        Err(_) => Err(refused(
            StatusCode::REQUEST_TIMEOUT,
            &format!(
                "the request body did not arrive within {} ms (--request-body-timeout-ms)",
                timeout.as_millis()
            ),
            Code::DeadlineExceeded,
        )),
    }
}

/// Adds `Retry-After: seconds`.
pub(super) fn retry_after(response: &mut Response, seconds: u32) {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
}

/// A slot of --max-client-requests, as a gRPC request takes, held until
/// the answer: the HTTP door is no way around the node's budget. Spent:
/// 503 with `Retry-After` (and `outcome`, a write's: not applied).
pub(super) fn admit_client(
    node: &Arc<Node>,
    outcome: Option<Outcome>,
) -> Result<super::load::Slot, Response> {
    node.load
        .admit(super::load::Budget::Clients, None)
        .map_err(|budget| {
            let status = node.load.refusal(budget);
            let mut refused = error(
                StatusCode::SERVICE_UNAVAILABLE,
                status.message(),
                Code::Unavailable,
                outcome,
            );
            retry_after(&mut refused, 1);
            refused
        })
}

/// With `--auth-file`: 401 without a known token, 403 for a role below
/// `role`.
pub(super) fn refuse_caller(
    guard: &Guard,
    request: &Request,
    role: Role,
    outcome: Option<Outcome>,
) -> Option<Response> {
    let auth = guard.auth.as_ref()?;
    let refuse = |status, why: &str, code| {
        let mut response = error(status, why, code, outcome);
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    };
    let token = match bearer_token(request.headers().get(header::AUTHORIZATION)) {
        Err(why) => {
            return Some(refuse(
                StatusCode::UNAUTHORIZED,
                &why,
                Code::Unauthenticated,
            ));
        }
        Ok(None) => {
            let why = "this node requires a token: send `Authorization: Bearer <token>`";
            return Some(refuse(StatusCode::UNAUTHORIZED, why, Code::Unauthenticated));
        }
        Ok(Some(token)) => token,
    };
    match auth.tokens().role_of(token) {
        None => Some(refuse(
            StatusCode::UNAUTHORIZED,
            "unknown token",
            Code::Unauthenticated,
        )),
        Some(held) if held < role => Some(refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "this token's role is {}; this request needs {}",
                held.name(),
                role.name()
            ),
            Code::PermissionDenied,
        )),
        Some(_) => None,
    }
}

/// The answer to a request that failed with `why` (`outcome`: a write's).
pub(super) fn failure(why: &Error, outcome: Option<Outcome>) -> Response {
    let code = why.code();
    let mut response = error(http_status(code, outcome), &why.to_string(), code, outcome);
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        retry_after(&mut response, 1);
    }
    response
}

/// A JSON error answer; a write's carries `X-DKVS-Outcome`.
pub(super) fn error(
    status: StatusCode,
    why: &str,
    code: Code,
    outcome: Option<Outcome>,
) -> Response {
    let body = serde_json::json!({
        "error": why,
        "code": crate::metrics::code_name(code as i32),
        "outcome": outcome.map(Outcome::name),
    });
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response();
    if let Some(outcome) = outcome {
        response
            .headers_mut()
            .insert("x-dkvs-outcome", HeaderValue::from_static(outcome.name()));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_outcomes_table() {
        let unknown = Some(Outcome::Unknown);
        let not_applied = Some(Outcome::NotApplied);
        for (code, outcome, status) in [
            (Code::Ok, Some(Outcome::Applied), 200),
            (Code::NotFound, None, 404),
            (Code::InvalidArgument, not_applied, 400),
            (Code::Unavailable, not_applied, 503),
            (Code::ResourceExhausted, not_applied, 507),
            (Code::FailedPrecondition, not_applied, 409),
            (Code::Aborted, not_applied, 409),
            (Code::Unavailable, unknown, 504),
            (Code::Aborted, unknown, 504),
            (Code::ResourceExhausted, unknown, 504),
            (Code::DeadlineExceeded, unknown, 504),
            (Code::Unavailable, None, 503),
            (Code::DeadlineExceeded, None, 504),
            (Code::Unauthenticated, not_applied, 401),
            (Code::PermissionDenied, not_applied, 403),
            (Code::Internal, unknown, 500),
            (Code::InvalidArgument, unknown, 500),
            (Code::FailedPrecondition, unknown, 500),
            (Code::NotFound, unknown, 500),
            (Code::Unimplemented, unknown, 500),
        ] {
            assert_eq!(
                http_status(code, outcome).as_u16(),
                status,
                "{code:?} {outcome:?}"
            );
        }
    }

    #[test]
    fn the_key_is_the_rest_of_the_path_percent_decoded() {
        assert_eq!(key_of("/v1/kv/a/b c"), Ok("a/b c".into()));
        assert_eq!(key_of("/v1/kv/a%2Fb%20c%C3%A9"), Ok("a/b cé".into()));
        assert!(key_of("/v1/kv/").is_err());
        assert!(key_of("/v1/kv/%FF%FE").unwrap_err().contains("UTF-8"));
        // A lone % is kept as it is, as browsers and curl send it.
        assert_eq!(key_of("/v1/kv/100%"), Ok("100%".into()));
    }

    #[test]
    fn consistency_comes_from_the_query_and_any_is_for_writes() {
        assert_eq!(consistency_of(None, false), Ok(Consistency::Quorum));
        assert_eq!(
            consistency_of(Some("consistency=ONE"), false),
            Ok(Consistency::One)
        );
        assert_eq!(
            consistency_of(Some("consistency=all"), true),
            Ok(Consistency::All)
        );
        assert_eq!(
            consistency_of(Some("consistency=any"), true),
            Ok(Consistency::Any)
        );
        assert!(consistency_of(Some("consistency=any"), false).is_err());
        assert!(consistency_of(Some("consistency=most"), true).is_err());
        assert!(consistency_of(Some("consistency=one&consistency=all"), false).is_err());
        assert!(consistency_of(Some("consistancy=all"), true).is_err());
        assert!(consistency_of(Some("consistency"), true).is_err());
        assert!(consistency_of(Some("consistency="), true).is_err());
    }
}
