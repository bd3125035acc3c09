//! meshd: an Istio-compatible xDS control plane for stock Envoy.
//!
//! Data flows one way through the stages, one module each:
//!
//! ```text
//!  source ──► config ──► model ──► translate ──► xds cache ──► xds server ──► Envoy
//!  (files)    (typed,    (push     (pure: proxy  (encoded,     (ADS SotW +
//!             validated, context)   + model ──►   versioned     delta, ACK/NACK)
//!             last good)            resources)    by content)
//! ```
//!
//! `debug` reads config, model, cache and stream state and never writes
//! them; `analyze` runs Istio's analyzers over a config snapshot;
//! `bootstrap` writes the Envoy bootstrap that points a proxy at meshd;
//! `serve` wires the stages together for `meshd serve`; `status` writes
//! meshd's conclusions back to the cluster's resources.

pub mod analyze;
pub mod bootstrap;
pub mod ca;
pub mod capture;
pub mod config;
pub mod debug;
pub mod inject;
pub mod loadgen;
pub mod model;
pub mod parallel;
pub mod process;
pub mod serve;
pub mod source;
pub mod status;
pub mod translate;
pub mod webhook;
pub mod xds;

/// Code generated from `proto/` by `build.rs`.
#[allow(warnings, clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    /// Istio's CA service (`istio.v1.auth`).
    pub mod istio_ca {
        tonic::include_proto!("istio.v1.auth");
    }
}
