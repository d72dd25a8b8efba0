//! The sender's cluster id on every node-to-node call.
//!
//! A node's `Replica`, `Membership` and `Liveness` clients all go through a
//! [`PeerChannel`]: the peer channel with a [`ClusterStamp`], which puts
//! this node's cluster id in the `dkvs-cluster-id` metadata of each call
//! (16 hex digits, as logs show ids). So the data path (writes, reads,
//! hints, anti-entropy) carries it as the layout calls and pings do, without
//! any call site doing so; the receiver checks it in one place
//! (`crate::node`'s cluster gate) before a handler runs.
//!
//! A node without a cluster id yet (a joiner without `--cluster-token`, a
//! cluster of the release before ids) sends none; the client-facing
//! services' clients carry none. Beside the id, a node's calls name their
//! sender's address (`dkvs-sender`), so that a receiver refusing them can
//! say in its log which node to stop; it is a label, trusted for nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The metadata key carrying the sender's cluster id.
pub const CLUSTER_ID_METADATA: &str = "dkvs-cluster-id";

/// The metadata key naming the sender's address (for logs only).
pub const SENDER_METADATA: &str = "dkvs-sender";

/// Longest sender address a receiver shows; a longer one is not shown.
const SENDER_BYTES_MAX: usize = 256;

/// A channel to a peer whose every call carries this node's cluster id.
pub type PeerChannel = InterceptedService<super::timed::TimedChannel, ClusterStamp>;

/// Puts the cluster id it shares with its [`super::PeerPool`] in each
/// call's metadata (none while it is 0), and the sender's address.
#[derive(Clone, Debug)]
pub struct ClusterStamp {
    /// The cluster id, set by the layout owner as layouts are adopted.
    pub(super) id: Arc<AtomicU64>,
    /// This node's address (none: not named).
    pub(super) sender: Option<AsciiMetadataValue>,
}

impl tonic::service::Interceptor for ClusterStamp {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let id = self.id.load(Ordering::Relaxed);
        if id != 0
            && let Ok(value) = crate::layout::cluster_id::show(id).parse()
        {
            request.metadata_mut().insert(CLUSTER_ID_METADATA, value);
            if let Some(sender) = &self.sender {
                request
                    .metadata_mut()
                    .insert(SENDER_METADATA, sender.clone());
            }
        }
        Ok(request)
    }
}

/// `address` as the `dkvs-sender` value (none if it cannot be one).
pub(super) fn sender_value(address: &str) -> Option<AsciiMetadataValue> {
    address.parse().ok()
}

/// The sender a call's headers name, if any (a label for logs).
pub fn sender_in(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(SENDER_METADATA)?
        .to_str()
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= SENDER_BYTES_MAX)
}

/// The cluster id a call's headers carry: 0 when they carry none; an error
/// saying what is wrong when the value is not one.
pub fn cluster_id_in(headers: &http::HeaderMap) -> Result<u64, String> {
    let Some(value) = headers.get(CLUSTER_ID_METADATA) else {
        return Ok(0);
    };
    value
        .to_str()
        .ok()
        .filter(|text| !text.is_empty() && text.len() <= 16)
        .and_then(|text| u64::from_str_radix(text, 16).ok())
        .ok_or_else(|| {
            format!(
                "the {CLUSTER_ID_METADATA} metadata must be a cluster id of up to 16 hex digits, not {:?}",
                String::from_utf8_lossy(value.as_bytes())
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn stamped(id: u64) -> http::HeaderMap {
        let mut stamp = ClusterStamp {
            id: Arc::new(AtomicU64::new(id)),
            sender: sender_value("127.0.0.1:7004"),
        };
        let request = stamp.call(tonic::Request::new(())).expect("stamped");
        request.metadata().clone().into_headers()
    }

    #[test]
    fn the_stamp_carries_the_id_and_the_receiver_reads_it_back() {
        let headers = stamped(0xab);
        assert_eq!(
            headers.get(CLUSTER_ID_METADATA).map(|v| v.as_bytes()),
            Some(&b"00000000000000ab"[..])
        );
        assert_eq!(cluster_id_in(&headers), Ok(0xab));
        assert_eq!(sender_in(&headers), Some("127.0.0.1:7004"));
        assert_eq!(cluster_id_in(&stamped(u64::MAX)), Ok(u64::MAX));
        // No id yet: nothing sent, read as none.
        let none = stamped(0);
        assert!(none.get(CLUSTER_ID_METADATA).is_none());
        assert_eq!(cluster_id_in(&none), Ok(0));
        assert_eq!(sender_in(&none), None);
    }

    #[test]
    fn a_value_that_is_no_id_is_refused_saying_so() {
        for bad in ["", "xyz", "12345678901234567", "-1"] {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                CLUSTER_ID_METADATA,
                http::HeaderValue::from_str(bad).expect("header"),
            );
            let why = cluster_id_in(&headers).expect_err(bad);
            assert!(why.contains(CLUSTER_ID_METADATA), "{why}");
        }
    }
}

/// A channel to a node's client-facing services whose every call carries
/// the client's token, if it has one (`authorization: Bearer <token>`).
pub type ClientChannel = InterceptedService<Channel, BearerStamp>;

/// Puts the client's token in each call's `authorization` metadata.
#[derive(Clone, Default)]
pub struct BearerStamp {
    /// `Bearer <token>`, marked sensitive (none: the client has no token).
    pub(super) authorization: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for BearerStamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("BearerStamp")
            .field("token", &self.authorization.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl BearerStamp {
    /// The stamp for `token`; an error when it cannot travel in a header.
    pub fn new(token: Option<&str>) -> Result<BearerStamp, String> {
        let Some(token) = token.map(str::trim) else {
            return Ok(BearerStamp::default());
        };
        if token.is_empty() {
            return Err("the token is empty".into());
        }
        let mut value: AsciiMetadataValue = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token has characters a header cannot carry (use printable ASCII)")?;
        value.set_sensitive(true);
        Ok(BearerStamp {
            authorization: Some(value),
        })
    }
}

impl tonic::service::Interceptor for BearerStamp {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}
