//! Integration tests: real meshd, real stock Envoy, real HTTP backends and
//! real curl, on loopback only.

mod authz;
mod ca;
mod chaos;
mod common;
mod gateway_api;
mod goldens;
mod identity;
mod inject;
mod kube;
mod loadgen;
mod mesh;
mod netns;
mod operations;
mod scale;
mod seed;
mod sidecar;
mod tls;
mod traffic;
