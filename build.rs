//! Compiles `proto/` into Rust with tonic's prost codegen.
//!
//! A fresh clone must build with plain `cargo build` on a machine without a
//! system `protoc`, so the compiler comes from the `protoc-bin-vendored`
//! crate unless the `PROTOC` environment variable names one explicitly.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let protos = ["proto/dkvs/v1/dkvs.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-env-changed=PROTOC");

    let mut config = tonic_prost_build::Config::new();
    if env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    config.bytes(["."]);

    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("dkvs_descriptor.bin"))
        .compile_with_config(config, &protos, &["proto"])?;
    Ok(())
}
