//! Which caller may reach which RPC: the doors of a node, and the verdict
//! for one call.
//!
//! Every gRPC path goes through one [`Door`]:
//!
//! | door | paths | who passes |
//! |---|---|---|
//! | open | health, reflection | anyone |
//! | client(role) | `KeyValue`, `Cluster`, `ReplicaRead` | a token of that role or stronger (when `--auth-file` is set) |
//! | node | `Replica`, `Membership`, `Liveness` | a member's or joiner's node certificate (when TLS is on) |
//! | any node | `Membership.Join`, `Membership.GetLayout`, `Membership.LayoutVouch` | any node certificate (a joiner, or a removed node learning it was removed: it fetches the layout and verifies it with the members' vouches, both read-only) |
//!
//! Tokens never open the node-to-node services, whatever their role: only a
//! certificate that chains to the CA and names a node (`dkvs-node:ADDR`)
//! does. A path this table does not know is a node path (closed). Without
//! TLS no caller can prove it is a node, so the node-to-node services take
//! any caller (DESIGN: run with TLS; `--insecure-plaintext-auth` says so).

use super::auth::{Role, Tokens};

/// How a path is guarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    /// Health and reflection.
    Open,
    /// A client-facing RPC that needs at least this role.
    Client(Role),
    /// A node-to-node RPC: members and joiners only.
    Node,
    /// A node-to-node RPC any node may use (join, and the read-only layout
    /// fetch and vouches).
    AnyNode,
}

/// The door of a gRPC path (`/package.Service/Method`).
pub fn door_of(path: &str) -> Door {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Door::Node;
    };
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => Door::Open,
        "dkvs.v1.KeyValue" => match method {
            "Get" | "List" => Door::Client(Role::Read),
            "Put" | "Delete" => Door::Client(Role::ReadWrite),
            _ => Door::Client(Role::Admin),
        },
        "dkvs.v1.Cluster" => match method {
            "Status" => Door::Client(Role::Read),
            _ => Door::Client(Role::Admin),
        },
        "dkvs.v1.ReplicaRead" => Door::Client(Role::Read),
        "dkvs.v1.Membership" if matches!(method, "Join" | "GetLayout" | "LayoutVouch") => {
            Door::AnyNode
        }
        _ => Door::Node,
    }
}

/// What this node requires of callers.
#[derive(Clone, Copy)]
pub struct Policy<'a> {
    /// Whether connections are TLS (so node certificates can be checked).
    pub tls: bool,
    /// Client tokens (`--auth-file`), if required.
    pub tokens: Option<&'a Tokens>,
}

/// Who is calling, as far as the connection and headers tell.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller<'a> {
    /// The address a verified certificate names (`dkvs-node:ADDR`).
    pub node: Option<&'a str>,
    /// Whether that address is a member or joiner of the layout served.
    pub node_is_member: bool,
    /// The bearer token sent, if any.
    pub token: Option<&'a str>,
}

/// Why a call is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No credential, or one not known here.
    Unauthenticated(String),
    /// Known, but not allowed this.
    PermissionDenied(String),
}

/// The verdict for `caller` at `door` under `policy`.
pub fn admit(door: Door, caller: Caller<'_>, policy: Policy<'_>) -> Result<(), Refused> {
    match door {
        Door::Open => Ok(()),
        Door::Node | Door::AnyNode if !policy.tls => Ok(()),
        Door::AnyNode => match caller.node {
            Some(_) => Ok(()),
            None => Err(no_node_certificate()),
        },
        Door::Node => match caller.node {
            Some(_) if caller.node_is_member => Ok(()),
            Some(address) => Err(Refused::PermissionDenied(format!(
                "this RPC is for the cluster's nodes only, and the certificate names {address}, \
                 which is not a member or joiner of the layout this node serves \
                 (a removed node may only join again or fetch the layout)"
            ))),
            None => Err(no_node_certificate()),
        },
        Door::Client(needed) => {
            let Some(tokens) = policy.tokens else {
                return Ok(());
            };
            let Some(token) = caller.token else {
                return Err(Refused::Unauthenticated(
                    "this node requires a token: send `authorization: Bearer <token>` \
                     (DKVSClient: --token-file FILE or DKVS_TOKEN)"
                        .into(),
                ));
            };
            match tokens.role_of(token) {
                None => Err(Refused::Unauthenticated(
                    "the token is not one this node knows (check the token, or the node's --auth-file)".into(),
                )),
                Some(role) if role >= needed => Ok(()),
                Some(role) => Err(Refused::PermissionDenied(format!(
                    "this needs the {needed} role and the token's role is {role}"
                ))),
            }
        }
    }
}

fn no_node_certificate() -> Refused {
    Refused::Unauthenticated(
        "this RPC is for the cluster's nodes only: it needs a node certificate (SAN URI \
         dkvs-node:HOST:PORT) signed by the cluster's CA; client tokens do not open it"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_has_its_door() {
        for (path, door) in [
            ("/grpc.health.v1.Health/Check", Door::Open),
            ("/grpc.health.v1.Health/Watch", Door::Open),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Door::Open,
            ),
            (
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                Door::Open,
            ),
            ("/dkvs.v1.KeyValue/Get", Door::Client(Role::Read)),
            ("/dkvs.v1.KeyValue/Put", Door::Client(Role::ReadWrite)),
            ("/dkvs.v1.KeyValue/Delete", Door::Client(Role::ReadWrite)),
            ("/dkvs.v1.KeyValue/Whatever", Door::Client(Role::Admin)),
            ("/dkvs.v1.Cluster/Status", Door::Client(Role::Read)),
            ("/dkvs.v1.Cluster/Abort", Door::Client(Role::Admin)),
            ("/dkvs.v1.ReplicaRead/Batch", Door::Client(Role::Read)),
            ("/dkvs.v1.Replica/Write", Door::Node),
            ("/dkvs.v1.Replica/RangeEntries", Door::Node),
            ("/dkvs.v1.Membership/LayoutCommit", Door::Node),
            ("/dkvs.v1.Membership/LayoutVouch", Door::AnyNode),
            ("/dkvs.v1.Membership/StreamRecords", Door::Node),
            ("/dkvs.v1.Membership/Join", Door::AnyNode),
            ("/dkvs.v1.Membership/GetLayout", Door::AnyNode),
            ("/dkvs.v1.Liveness/Ping", Door::Node),
            ("/unknown.Service/Method", Door::Node),
            ("garbage", Door::Node),
            ("", Door::Node),
        ] {
            assert_eq!(door_of(path), door, "{path}");
        }
    }

    #[test]
    fn tokens_never_open_a_node_door_and_certificates_open_only_for_members() {
        let tokens = Tokens::parse("admin-token admin\n").expect("tokens");
        let secured = Policy {
            tls: true,
            tokens: Some(&tokens),
        };
        let admin = Caller {
            token: Some("admin-token"),
            ..Caller::default()
        };
        let member = Caller {
            node: Some("127.0.0.1:7001"),
            node_is_member: true,
            token: None,
        };
        let removed = Caller {
            node: Some("127.0.0.1:7009"),
            node_is_member: false,
            token: Some("admin-token"),
        };
        assert!(matches!(
            admit(Door::Node, admin, secured),
            Err(Refused::Unauthenticated(_))
        ));
        assert!(matches!(
            admit(Door::AnyNode, admin, secured),
            Err(Refused::Unauthenticated(_))
        ));
        assert_eq!(admit(Door::Node, member, secured), Ok(()));
        assert!(matches!(
            admit(Door::Node, removed, secured),
            Err(Refused::PermissionDenied(_))
        ));
        assert_eq!(admit(Door::AnyNode, removed, secured), Ok(()));
        // A node certificate opens no client door: nodes never call them,
        // and a token's role is the one thing that does.
        assert!(matches!(
            admit(Door::Client(Role::Read), member, secured),
            Err(Refused::Unauthenticated(_))
        ));
        assert_eq!(admit(Door::Client(Role::Admin), removed, secured), Ok(()));
        assert_eq!(admit(Door::Open, Caller::default(), secured), Ok(()));
    }

    #[test]
    fn roles_open_what_they_should() {
        let tokens = Tokens::parse("r read\nrw readwrite\na admin\n").expect("tokens");
        let policy = Policy {
            tls: false,
            tokens: Some(&tokens),
        };
        let with = |token| Caller {
            token: Some(token),
            ..Caller::default()
        };
        assert_eq!(admit(Door::Client(Role::Read), with("r"), policy), Ok(()));
        assert!(matches!(
            admit(Door::Client(Role::ReadWrite), with("r"), policy),
            Err(Refused::PermissionDenied(m)) if m.contains("readwrite") && m.contains("read")
        ));
        assert_eq!(
            admit(Door::Client(Role::ReadWrite), with("rw"), policy),
            Ok(())
        );
        assert!(admit(Door::Client(Role::Admin), with("rw"), policy).is_err());
        assert_eq!(admit(Door::Client(Role::Admin), with("a"), policy), Ok(()));
        assert!(matches!(
            admit(Door::Client(Role::Read), with("nope"), policy),
            Err(Refused::Unauthenticated(_))
        ));
        assert!(matches!(
            admit(Door::Client(Role::Read), Caller::default(), policy),
            Err(Refused::Unauthenticated(_))
        ));
        // No auth file: client doors are open; no TLS: node doors too.
        let open = Policy {
            tls: false,
            tokens: None,
        };
        assert_eq!(
            admit(Door::Client(Role::Admin), Caller::default(), open),
            Ok(())
        );
        assert_eq!(admit(Door::Node, Caller::default(), open), Ok(()));
    }
}
