//! The xDS server's Prometheus metrics, named and labelled as istiod's, so
//! dashboards built for Istio read them.

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
