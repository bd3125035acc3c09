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

/// Finds the `envoy-types` source directory and copies its `types.bin`
/// FileDescriptorSet: through `cargo metadata` (which knows vendored and
/// patched sources), or, where it cannot answer offline, in cargo's registry
/// at the version `Cargo.lock` pins. `cargo metadata` resolves every package
/// of the lock file, development-only ones too, and a `cargo build` on a new
/// machine downloads only what it builds.
fn copy_envoy_descriptors() -> Result<()> {
    let dir = match envoy_types_from_metadata() {
        Ok(dir) => dir,
        Err(metadata) => envoy_types_in_registry().map_err(|registry| {
            anyhow!("envoy-types' sources were not found: {metadata:#}; {registry:#} (`cargo fetch --locked` downloads them)")
        })?,
    };
    let src = dir.join("src/generated/types.bin");
    let dst = PathBuf::from(std::env::var("OUT_DIR")?).join("envoy_descriptors.bin");
    std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

/// The `envoy-types` directory `cargo metadata` names.
fn envoy_types_from_metadata() -> Result<PathBuf> {
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
    PathBuf::from(manifest_path)
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("bad envoy-types manifest path {manifest_path}"))
}

/// `envoy-types-<version>` under `$CARGO_HOME/registry/src/*/`, the version
/// `Cargo.lock` pins.
fn envoy_types_in_registry() -> Result<PathBuf> {
    let lock_path = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("Cargo.lock");
    let lock =
        std::fs::read_to_string(&lock_path).with_context(|| format!("reading {}", lock_path.display()))?;
    let version = lock
        .split("[[package]]")
        .find_map(|entry| {
            let mut lines = entry.lines().map(str::trim);
            lines.find(|l| *l == "name = \"envoy-types\"")?;
            lines.find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"'))
        })
        .ok_or_else(|| anyhow!("envoy-types is not in {}", lock_path.display()))?;
    let home = match std::env::var_os("CARGO_HOME") {
        Some(home) => PathBuf::from(home),
        None => PathBuf::from(
            std::env::var_os("HOME").ok_or_else(|| anyhow!("neither CARGO_HOME nor HOME is set"))?,
        )
        .join(".cargo"),
    };
    let registry = home.join("registry/src");
    let wanted = format!("envoy-types-{version}");
    std::fs::read_dir(&registry)
        .with_context(|| format!("reading {}", registry.display()))?
        .filter_map(|index| Some(index.ok()?.path().join(&wanted)))
        .find(|dir| dir.join("Cargo.toml").is_file())
        .ok_or_else(|| anyhow!("{wanted} is not under {}", registry.display()))
}
