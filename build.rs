//! Compiles `proto/` (Istio's CA service) with protox, so no system `protoc`
//! is needed, and copies the Envoy API descriptor set that `envoy-types`
//! ships into `OUT_DIR`: the debug endpoints render resources as JSON with it,
//! and taking it from the crate keeps it in step with the generated types.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{anyhow, Context, Result};

fn main() -> Result<()> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=Cargo.lock");
    compile_istio_protos()?;
    copy_envoy_descriptors()
}

fn compile_istio_protos() -> Result<()> {
    let fds = protox::compile(["istio/v1/auth/ca.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(
            ".google.protobuf.Struct",
            "::envoy_types::pb::google::protobuf::Struct",
        )
        .compile_fds(fds)
        .context("generating Rust code for proto/")
}

/// Finds the `envoy-types` source directory through `cargo metadata` (the
/// only portable way to locate a dependency's files) and copies its
/// `types.bin` FileDescriptorSet.
fn copy_envoy_descriptors() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("Cargo.toml");
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--manifest-path",
        ])
        .arg(&manifest)
        // Only this target's packages: the others may never be downloaded.
        .arg("--filter-platform")
        .arg(std::env::var("TARGET")?)
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        return Err(anyhow!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let manifest_path = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .ok_or_else(|| anyhow!("envoy-types not found in cargo metadata"))?;
    let src = PathBuf::from(manifest_path)
        .parent()
        .ok_or_else(|| anyhow!("bad envoy-types manifest path"))?
        .join("src/generated/types.bin");
    let dst = PathBuf::from(std::env::var("OUT_DIR")?).join("envoy_descriptors.bin");
    std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}
