//! `bench` and `noop-server` in a build without the `bench` feature: they
//! take any arguments and say how to get them.

use dkvs::Error;
use dkvs::client::{Client, ClientOptions};

/// The arguments of `bench`, taken and not used.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// One thread: nothing runs.
    #[arg(skip = 1usize)]
    pub threads: usize,
    /// Never: (with `noop`) makes `DKVSClient` answer before connecting.
    #[arg(skip = false)]
    pub etcd: bool,
    #[arg(skip = true)]
    pub noop: bool,
    /// bench's arguments (this build has no `bench`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    _ignored: Vec<String>,
}

fn not_built(command: &str) -> Error {
    Error::InvalidArgument(format!(
        "this DKVSClient was built without the `bench` feature, so it has no `{command}`: \
         build it with `cargo build --release` (the feature is on by default)"
    ))
}

pub async fn run(
    _client: Option<&Client>,
    _nodes: &[String],
    _options: &ClientOptions,
    _args: BenchArgs,
) -> Result<(), Error> {
    Err(not_built("bench"))
}

pub async fn noop_server(_listen: std::net::SocketAddr) -> Result<(), Error> {
    Err(not_built("noop-server"))
}
