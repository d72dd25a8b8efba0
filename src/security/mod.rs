//! Who may call a node (DESIGN.md, "Security").
//!
//! * [`tls`] — the node's certificate, key and CA from PEM files, made into
//!   rustls configs and swapped whole when the files change (or on SIGHUP),
//!   so certificates rotate without a restart; the node's name in a peer's
//!   certificate (`dkvs-node:ADDR`).
//! * [`auth`] — client tokens and their roles (`--auth-file`), compared
//!   in constant time.
//! * [`access`] — which caller may reach which RPC: the one table of doors,
//!   and the verdict for a caller (pure; the tower layer that applies it is
//!   `crate::node`'s).
//!
//! The threat model and how to run secured: docs/SECURITY.md.

pub mod access;
pub mod auth;
pub mod reload;
pub mod tls;
