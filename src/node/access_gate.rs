//! Who may call this node: the doors of [`crate::security::access`],
//! applied to every request before any handler runs.
//!
//! The caller is what the connection and headers prove: a node certificate
//! the TLS handshake verified (chains to `--tls-ca`; its `dkvs-node:ADDR`
//! SAN URI names the node), whether that address is a member or joiner of
//! the layout served now, and the bearer token. A refusal is answered at
//! once (UNAUTHENTICATED or PERMISSION_DENIED, outcome `not-applied`), so a
//! refused call never reaches a handler. A verified node address is passed
//! on to the handler as a [`VerifiedNode`] extension (`Membership.Join`
//! checks the joiner joins as the address its certificate names).

use std::sync::Arc;

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::error::Error;
use crate::security::access::{self, Caller, Policy, Refused};
use crate::security::auth::{AuthFile, bearer_token};
use crate::security::tls::{NodeTls, node_named_in};
use crate::serving::LayoutOwner;

/// What a node asks of its callers (`--tls-*`, `--auth-file`).
#[derive(Clone, Default)]
pub struct Guard {
    /// Connections are TLS (these files; node certificates can be checked).
    pub tls: Option<Arc<NodeTls>>,
    /// Client tokens, if required.
    pub auth: Option<Arc<AuthFile>>,
}

impl Guard {
    /// Whether any check is on.
    pub fn is_on(&self) -> bool {
        self.tls.is_some() || self.auth.is_some()
    }
}

/// The node address a verified certificate named, for the handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedNode(pub String);

/// Applies the doors (see the module doc); a [`super::gate::Admit`] rule.
#[derive(Clone)]
pub(super) struct AccessRule {
    pub(super) guard: Guard,
    pub(super) layouts: Arc<LayoutOwner>,
}

impl super::gate::Admit for AccessRule {
    /// Admits `request` (tagging it with the verified node), or refuses it.
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), tonic::Status> {
        // A caller cannot bring its own verified name.
        request.extensions_mut().remove::<VerifiedNode>();
        if !self.guard.is_on() {
            return Ok(());
        }
        let door = access::door_of(request.uri().path());
        let node = verified_node(request);
        let node_is_member = node.as_deref().is_some_and(|address| {
            self.layouts
                .placement()
                .layout()
                .is_some_and(|layout| layout.is_member(address))
        });
        let tokens = self.guard.auth.as_ref().map(|auth| auth.tokens());
        // The header matters only where a token is asked for.
        let token = match door {
            access::Door::Client(_) if tokens.is_some() => {
                bearer_token(request.headers().get(http::header::AUTHORIZATION))
                    .map_err(|why| tonic::Status::from(Error::Unauthenticated(why)))?
            }
            _ => None,
        };
        let caller = Caller {
            node: node.as_deref(),
            node_is_member,
            token,
        };
        let policy = Policy {
            tls: self.guard.tls.is_some(),
            tokens: tokens.as_deref(),
        };
        match access::admit(door, caller, policy) {
            Ok(()) => {
                if let Some(address) = node {
                    request.extensions_mut().insert(VerifiedNode(address));
                }
                Ok(())
            }
            Err(Refused::Unauthenticated(why)) => Err(Error::Unauthenticated(why).into()),
            Err(Refused::PermissionDenied(why)) => Err(Error::PermissionDenied(why).into()),
        }
    }
}

/// The node named by the certificate the caller presented (verified by the
/// handshake against the CA), if any.
fn verified_node<B>(request: &http::Request<B>) -> Option<String> {
    let info = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    node_named_in(certs.first()?)
}
