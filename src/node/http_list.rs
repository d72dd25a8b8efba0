//! `GET /v1/kv?prefix=P&limit=N&cursor=C`: the key listing over HTTP
//! ([`crate::listing`]), as JSON:
//!
//! ```text
//! {"keys": [{"key": "users/ada", "version": "1234@5678"}, ...],
//!  "cursor": "9f...", "complete": false}
//! ```
//!
//! Pass `cursor` back to get the next page; `complete` is true (and
//! `cursor` null) once the whole ring has been listed. Keys come in ring
//! order, not lexical. `consistency=one|quorum|all` as for a read. With
//! `--auth-file`, a `read` token.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;

use super::Node;
use super::access_gate::Guard;
use super::http_kv::{admit_client, failure, json_answer, refuse_caller};
use crate::error::Error;
use crate::listing::{ListRequest, Position};
use crate::quorum::Consistency;
use crate::security::auth::Role;

/// Answers `GET /v1/kv?...` for `node`.
pub(super) async fn list(node: &Arc<Node>, guard: &Guard, request: Request) -> Response {
    if let Some(refused) = refuse_caller(guard, &request, Role::Read, None) {
        return refused;
    }
    // A slot of --max-client-requests, as any client request takes.
    let _slot = match admit_client(node, None) {
        Ok(slot) => slot,
        Err(refused) => return refused,
    };
    let asked = match list_request(request.uri().query()) {
        Ok(asked) => asked,
        Err(why) => return failure(&why, None),
    };
    drop(request);
    match node.list(&asked).await {
        Ok(page) => {
            let keys: Vec<serde_json::Value> = page
                .keys
                .iter()
                .map(|listed| {
                    serde_json::json!({ "key": listed.key, "version": listed.version.to_string() })
                })
                .collect();
            let body = serde_json::json!({
                "keys": keys,
                "cursor": page.next.as_ref().map(Position::to_cursor),
                "complete": page.next.is_none(),
            });
            json_answer(StatusCode::OK, &body)
        }
        Err(why) => failure(&why, None),
    }
}

/// The listing a query string asks for. An unknown, repeated or
/// undecodable parameter is refused, so a misspelt one never silently
/// lists everything.
pub(super) fn list_request(query: Option<&str>) -> Result<ListRequest, Error> {
    let mut asked = ListRequest {
        prefix: String::new(),
        limit: super::kv::DEFAULT_LIST_LIMIT,
        from: Position::start(),
        consistency: Consistency::Quorum,
    };
    let mut seen: Vec<&str> = Vec::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
        if seen.contains(&name) {
            return Err(Error::InvalidArgument(format!("{name} is given twice")));
        }
        seen.push(name);
        let value = percent_encoding::percent_decode_str(&raw.replace('+', " "))
            .decode_utf8()
            .map_err(|_| {
                Error::InvalidArgument(format!("{name} is not UTF-8 once percent-decoded"))
            })?
            .into_owned();
        match name {
            "prefix" => asked.prefix = value,
            "cursor" => asked.from = Position::from_cursor(&value)?,
            "limit" => {
                let limit = value.parse::<u32>().map_err(|_| {
                    Error::InvalidArgument(format!("limit {value:?} is not a whole number"))
                })?;
                asked.limit = super::kv::list_limit(limit)?;
            }
            "consistency" => {
                asked.consistency = match value.to_ascii_lowercase().as_str() {
                    "quorum" => Consistency::Quorum,
                    "one" => Consistency::One,
                    "all" => Consistency::All,
                    other => {
                        return Err(Error::InvalidArgument(format!(
                            "unknown consistency {other:?}: use one, quorum or all"
                        )));
                    }
                }
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown query parameter {other:?}: /v1/kv takes prefix, limit, cursor and consistency"
                )));
            }
        }
    }
    Ok(asked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn a_query_names_prefix_limit_cursor_and_consistency() {
        let cursor = Position::after_key("a").to_cursor();
        let asked = list_request(Some(&format!(
            "prefix=users%2Fa+b&limit=5&cursor={cursor}&consistency=ALL"
        )))
        .unwrap();
        assert_eq!(asked.prefix, "users/a b");
        assert_eq!(asked.limit, 5);
        assert_eq!(asked.from, Position::after_key("a"));
        assert_eq!(asked.consistency, Consistency::All);
        let none = list_request(None).unwrap();
        assert_eq!((none.prefix.as_str(), none.limit), ("", 1000));
    }

    #[test]
    fn a_bad_query_is_refused_with_what_to_do() {
        for (query, says) in [
            ("prefx=a", "unknown query parameter"),
            ("prefix=a&prefix=b", "given twice"),
            ("limit=-1", "not a whole number"),
            ("limit=10001", "above the most"),
            ("cursor=xyz", "not one a listing gave"),
            ("consistency=any", "unknown consistency"),
            ("prefix=%FF", "not UTF-8"),
        ] {
            let refused = list_request(Some(query)).unwrap_err();
            assert_eq!(refused.code(), Code::InvalidArgument, "{query}");
            assert!(refused.to_string().contains(says), "{query}: {refused}");
        }
    }
}
