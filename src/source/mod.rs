//! source: turns the outside world into config generations.
//!
//! The file source reads a directory of YAML/JSON documents and watches it;
//! the cluster source watches a Kubernetes API server; the embedded source
//! serves the demo configuration compiled into the binary. Each hands
//! `config::ConfigStore` complete readings and publishes each new generation
//! on a `watch` channel. What a document means is left to `config`.

mod file;
mod kube;

pub use file::{load_dir, load_dir_named, watch_dir, Debounce};
pub use kube::{api_resource, parse_selector, watch_cluster, KubeOptions, KubeSync, WatchStatus};

use std::sync::Arc;

use crate::config::{parse_file, ConfigSnapshot, ConfigStore};

/// Errors of the sources.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The config directory could not be listed.
    #[error("reading config directory {path}: {source}")]
    ReadDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file watcher could not be started.
    #[error("watching {path}: {source}")]
    Watch {
        path: String,
        #[source]
        source: notify::Error,
    },
}

/// The demo configuration (`testdata/demo`), compiled in: the seed's
/// helloworld Service behind the `istio-system/ingressgateway` Gateway.
pub const DEMO: &[(&str, &str)] = &[
    (
        "demo/gateway.yaml",
        include_str!("../../testdata/demo/gateway.yaml"),
    ),
    (
        "demo/helloworld.yaml",
        include_str!("../../testdata/demo/helloworld.yaml"),
    ),
    (
        "demo/virtualservice.yaml",
        include_str!("../../testdata/demo/virtualservice.yaml"),
    ),
];

/// Builds the one generation of the embedded demo configuration.
pub fn embedded_demo() -> Arc<ConfigSnapshot> {
    let files = DEMO.iter().map(|(name, text)| parse_file(name, text)).collect();
    ConfigStore::default().apply(files)
}

/// Logs a new generation: each rejection that was not there before, then
/// what the generation holds.
fn log_generation(before: &ConfigSnapshot, next: &ConfigSnapshot, from: &str) {
    for r in next.rejections.iter().filter(|r| !before.rejections.contains(r)) {
        let kept = if r.last_good_kept {
            "; serving its last good version"
        } else {
            ""
        };
        tracing::warn!("rejected {r}{kept}");
    }
    tracing::info!(
        generation = next.generation,
        resources = next.resources.len(),
        rejected = next.rejections.len(),
        "config loaded from {from}"
    );
}
