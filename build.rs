//! Compiles `proto/` into Rust with tonic's prost codegen.
//!
//! A fresh clone must build with plain `cargo build` on a machine without a
//! system `protoc`, so the compiler comes from the `protoc-bin-vendored`
//! crate unless the `PROTOC` environment variable names one explicitly.
//!
//! `dkvs.v1` is served (and described to reflection); the etcd subset is only
//! a client, for `DKVSClient bench --etcd`, and stays out of the descriptors.
//! The library includes `dkvs.v1` (src/pb.rs); only the DKVSClient binary
//! includes the etcd subset (src/bin/client/bench/targets.rs), and only with
//! the `bench` feature.

use std::{env, path::PathBuf};

fn prost_config() -> Result<tonic_prost_build::Config, Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    if env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    config.bytes(["."]);
    Ok(config)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    for proto in ["proto/dkvs/v1/dkvs.proto", "proto/etcd/kv.proto"] {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-env-changed=PROTOC");

    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("dkvs_descriptor.bin"))
        .compile_with_config(prost_config()?, &["proto/dkvs/v1/dkvs.proto"], &["proto"])?;
    // Only `DKVSClient bench --etcd` uses it (the `bench` feature).
    if env::var_os("CARGO_FEATURE_BENCH").is_some() {
        tonic_prost_build::configure()
            .build_server(false)
            .compile_with_config(prost_config()?, &["proto/etcd/kv.proto"], &["proto"])?;
    }
    Ok(())
}
