//! The xDS server's Prometheus metrics, named and labelled as istiod's, so
//! dashboards built for Istio read them.

use super::XdsType;
use crate::config::{Change, ResourceKey};

/// Gauge: connected ADS streams, by proxy `type` (`sidecar`, `router`).
pub const XDS: &str = "pilot_xds";
/// Counter: responses sent, by xDS `type` (`cds`, `eds`, `lds`, `rds`, `sds`).
pub const PUSHES: &str = "pilot_xds_pushes";
/// Counter: responses a proxy rejected (NACKs), by xDS `type`.
pub const REJECTS: &str = "pilot_total_xds_rejects";
/// Histogram (seconds): from a config generation being installed to a
/// proxy's push of it being written.
pub const CONVERGENCE: &str = "pilot_proxy_convergence_time";
/// Histogram (seconds): computing one proxy's push, by xDS `type`.
pub const PUSH_TIME: &str = "pilot_xds_push_time";
/// Histogram (bytes): the size of each response, by xDS `type`.
pub const CONFIG_SIZE: &str = "pilot_xds_config_size_bytes";
/// Counter: service registry changes (Services, Endpoints, EndpointSlices,
/// Pods, Nodes, Namespaces), by `type` and `event` (`add`, `update`, `delete`).
pub const REG_EVENTS: &str = "pilot_k8s_reg_events";
/// Counter: Istio and Gateway API config changes, by `type` and `event`.
pub const CFG_EVENTS: &str = "pilot_k8s_cfg_events";

/// Histogram buckets, as istiod sets them.
pub const BUCKETS: [(&str, &[f64]); 3] = [
    (CONVERGENCE, &[0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0]),
    (PUSH_TIME, &[0.01, 0.1, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0]),
    (
        CONFIG_SIZE,
        &[1.0, 10000.0, 1000000.0, 4000000.0, 10000000.0, 40000000.0],
    ),
];

/// One stream's handles on the per-type metrics, looked up once when the
/// stream starts rather than on every push.
#[derive(Clone)]
pub struct StreamMetrics {
    pushes: [metrics::Counter; 5],
    rejects: [metrics::Counter; 5],
    sizes: [metrics::Histogram; 5],
    push_times: [metrics::Histogram; 5],
    convergence: metrics::Histogram,
}

impl StreamMetrics {
    pub fn new() -> StreamMetrics {
        let label = |i: usize| XdsType::ALL[i].short_name();
        StreamMetrics {
            pushes: std::array::from_fn(|i| metrics::counter!(PUSHES, "type" => label(i))),
            rejects: std::array::from_fn(|i| metrics::counter!(REJECTS, "type" => label(i))),
            sizes: std::array::from_fn(|i| metrics::histogram!(CONFIG_SIZE, "type" => label(i))),
            push_times: std::array::from_fn(|i| metrics::histogram!(PUSH_TIME, "type" => label(i))),
            convergence: metrics::histogram!(CONVERGENCE),
        }
    }

    /// A response of `bytes` went out; `push_time` when a new generation's
    /// push was computed for it.
    pub fn sent(&self, t: XdsType, bytes: usize, push_time: Option<f64>) {
        let i = index(t);
        self.pushes[i].increment(1);
        self.sizes[i].record(bytes as f64);
        if let Some(seconds) = push_time {
            self.push_times[i].record(seconds);
        }
    }

    pub fn rejected(&self, t: XdsType) {
        self.rejects[index(t)].increment(1);
    }

    pub fn converged(&self, seconds: f64) {
        self.convergence.record(seconds);
    }
}

impl std::fmt::Debug for StreamMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamMetrics").finish_non_exhaustive()
    }
}

impl Default for StreamMetrics {
    fn default() -> Self {
        StreamMetrics::new()
    }
}

fn index(t: XdsType) -> usize {
    XdsType::ALL.iter().position(|a| *a == t).unwrap_or(0)
}

/// Counts the resources a new generation changed, as istiod counts the
/// events of its registries (`pilot_k8s_reg_events`) and config stores
/// (`pilot_k8s_cfg_events`).
pub fn count_config_changes(changes: &[(&ResourceKey, Change)]) {
    use crate::config::Kind;
    for (key, change) in changes {
        let name = match key.kind {
            Kind::Service
            | Kind::Endpoints
            | Kind::EndpointSlice
            | Kind::Pod
            | Kind::Node
            | Kind::Namespace => REG_EVENTS,
            _ => CFG_EVENTS,
        };
        metrics::counter!(name, "type" => kind_label(key.kind), "event" => change.label()).increment(1);
    }
}

fn kind_label(kind: crate::config::Kind) -> &'static str {
    use crate::config::Kind;
    match kind {
        Kind::Secret => "Secret",
        Kind::Gateway => "Gateway",
        Kind::VirtualService => "VirtualService",
        Kind::DestinationRule => "DestinationRule",
        Kind::ServiceEntry => "ServiceEntry",
        Kind::Sidecar => "Sidecar",
        Kind::PeerAuthentication => "PeerAuthentication",
        Kind::RequestAuthentication => "RequestAuthentication",
        Kind::AuthorizationPolicy => "AuthorizationPolicy",
        Kind::Ingress => "Ingress",
        Kind::IngressClass => "IngressClass",
        Kind::GatewayClass => "GatewayClass",
        Kind::K8sGateway => "KubernetesGateway",
        Kind::HttpRoute => "HTTPRoute",
        Kind::GrpcRoute => "GRPCRoute",
        Kind::TcpRoute => "TCPRoute",
        Kind::TlsRoute => "TLSRoute",
        Kind::ReferenceGrant => "ReferenceGrant",
        Kind::Namespace => "Namespaces",
        Kind::Node => "Nodes",
        Kind::Service => "Services",
        Kind::Endpoints => "Endpoints",
        Kind::EndpointSlice => "EndpointSlice",
        Kind::Pod => "Pods",
    }
}
