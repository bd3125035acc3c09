//! DestinationRule traffic policies as Envoy cluster settings: load
//! balancing (and the route hash policy consistent hashing needs),
//! connection pool limits, outlier detection. The most specific policy
//! wins field by field: a subset's port-level, the subset's, the rule's
//! port-level, the rule's.

use envoy_types::pb::envoy::config::cluster::v3::{
    circuit_breakers, cluster, CircuitBreakers, Cluster, OutlierDetection as EnvoyOutlier,
};
use envoy_types::pb::envoy::config::route::v3::route_action;
use envoy_types::pb::google::protobuf::UInt32Value;

use super::{duration, Diagnostic};
use crate::config::istio::{
    ClientTlsSettings, ConnectionPoolSettings, LoadBalancerSettings, OutlierDetection, PortTrafficPolicy,
    Subset, TrafficPolicy,
};
use crate::config::{parse_duration, DestinationRule};

/// The policy in force for one cluster.
#[derive(Debug, Default, Clone, Copy)]
pub struct Effective<'a> {
    pub load_balancer: Option<&'a LoadBalancerSettings>,
    pub connection_pool: Option<&'a ConnectionPoolSettings>,
    pub outlier_detection: Option<&'a OutlierDetection>,
    pub tls: Option<&'a ClientTlsSettings>,
}

fn port_level(policy: Option<&TrafficPolicy>, port: u16) -> Option<&PortTrafficPolicy> {
    policy?
        .port_level_settings
        .iter()
        .find(|p| p.port.as_ref().map(|p| p.number) == Some(u32::from(port)))
}

/// The effective policy of (rule, subset, port).
pub fn effective<'a>(
    dr: Option<&'a DestinationRule>,
    subset: Option<&'a Subset>,
    port: u16,
) -> Effective<'a> {
    let top = dr.and_then(|d| d.spec.traffic_policy.as_ref());
    let sub = subset.and_then(|s| s.traffic_policy.as_ref());
    let (top_port, sub_port) = (port_level(top, port), port_level(sub, port));
    Effective {
        load_balancer: sub_port
            .and_then(|p| p.load_balancer.as_ref())
            .or(sub.and_then(|p| p.load_balancer.as_ref()))
            .or(top_port.and_then(|p| p.load_balancer.as_ref()))
            .or(top.and_then(|p| p.load_balancer.as_ref())),
        connection_pool: sub_port
            .and_then(|p| p.connection_pool.as_ref())
            .or(sub.and_then(|p| p.connection_pool.as_ref()))
            .or(top_port.and_then(|p| p.connection_pool.as_ref()))
            .or(top.and_then(|p| p.connection_pool.as_ref())),
        outlier_detection: sub_port
            .and_then(|p| p.outlier_detection.as_ref())
            .or(sub.and_then(|p| p.outlier_detection.as_ref()))
            .or(top_port.and_then(|p| p.outlier_detection.as_ref()))
            .or(top.and_then(|p| p.outlier_detection.as_ref())),
        tls: sub_port
            .and_then(|p| p.tls.as_ref())
            .or(sub.and_then(|p| p.tls.as_ref()))
            .or(top_port.and_then(|p| p.tls.as_ref()))
            .or(top.and_then(|p| p.tls.as_ref())),
    }
}

fn u32v(v: Option<u32>) -> Option<UInt32Value> {
    v.map(|value| UInt32Value { value })
}

/// Applies load balancing, limits and outlier detection to `cluster`.
pub fn apply(e: &Effective<'_>, cluster: &mut Cluster, resource: &str, diags: &mut Vec<Diagnostic>) {
    if let Some(lb) = e.load_balancer {
        if let Some(hash) = &lb.consistent_hash {
            let maglev = hash.maglev.is_some();
            cluster.lb_policy = if maglev {
                cluster::LbPolicy::Maglev as i32
            } else {
                cluster::LbPolicy::RingHash as i32
            };
            if let (false, Some(min)) = (maglev, hash.minimum_ring_size) {
                cluster.lb_config = Some(cluster::LbConfig::RingHashLbConfig(cluster::RingHashLbConfig {
                    minimum_ring_size: Some(envoy_types::pb::google::protobuf::UInt64Value { value: min }),
                    ..Default::default()
                }));
            }
        } else {
            cluster.lb_policy = match lb.simple.as_deref().unwrap_or("ROUND_ROBIN") {
                "LEAST_REQUEST" | "LEAST_CONN" => cluster::LbPolicy::LeastRequest as i32,
                "RANDOM" => cluster::LbPolicy::Random as i32,
                "ROUND_ROBIN" | "UNSPECIFIED" => cluster::LbPolicy::RoundRobin as i32,
                other => {
                    diags.push(Diagnostic {
                        resource: resource.to_string(),
                        field: "trafficPolicy.loadBalancer.simple".into(),
                        message: format!("{other} is not applied yet; round robin is used"),
                    });
                    cluster::LbPolicy::RoundRobin as i32
                }
            };
        }
    }
    if let Some(pool) = e.connection_pool {
        let tcp = pool.tcp.as_ref();
        let http = pool.http.as_ref();
        if let Some(t) = tcp
            .and_then(|t| t.connect_timeout.as_deref())
            .and_then(parse_duration)
        {
            cluster.connect_timeout = Some(duration(t));
        }
        cluster.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![circuit_breakers::Thresholds {
                max_connections: u32v(tcp.and_then(|t| t.max_connections)),
                max_pending_requests: u32v(http.and_then(|h| h.http1_max_pending_requests)),
                max_requests: u32v(http.and_then(|h| h.http2_max_requests)),
                max_retries: u32v(http.and_then(|h| h.max_retries)),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    if let Some(o) = e.outlier_detection {
        let d = |s: &Option<String>| s.as_deref().and_then(parse_duration).map(duration);
        let five_xx = o.consecutive5xx_errors.or(o.consecutive_errors);
        cluster.outlier_detection = Some(EnvoyOutlier {
            consecutive_5xx: u32v(five_xx),
            enforcing_consecutive_5xx: u32v(Some(if five_xx.is_some_and(|n| n > 0) { 100 } else { 0 })),
            consecutive_gateway_failure: u32v(o.consecutive_gateway_errors),
            enforcing_consecutive_gateway_failure: u32v(o.consecutive_gateway_errors.map(|_| 100)),
            interval: d(&o.interval),
            base_ejection_time: d(&o.base_ejection_time),
            max_ejection_percent: u32v(o.max_ejection_percent),
            split_external_local_origin_errors: o.split_external_local_origin_errors.unwrap_or(false),
            consecutive_local_origin_failure: u32v(o.consecutive_local_origin_failures),
            ..Default::default()
        });
    }
}

/// The route hash policy consistent hashing to this destination needs.
pub fn hash_policy(lb: Option<&LoadBalancerSettings>) -> Vec<route_action::HashPolicy> {
    use route_action::hash_policy::{ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter};
    let Some(hash) = lb.and_then(|l| l.consistent_hash.as_ref()) else {
        return Vec::new();
    };
    let specifier = if let Some(h) = &hash.http_header_name {
        PolicySpecifier::Header(Header {
            header_name: h.to_ascii_lowercase(),
            ..Default::default()
        })
    } else if let Some(c) = &hash.http_cookie {
        PolicySpecifier::Cookie(Cookie {
            name: c.name.clone(),
            ttl: c.ttl.as_deref().and_then(parse_duration).map(duration),
            path: c.path.clone().unwrap_or_default(),
            ..Default::default()
        })
    } else if hash.use_source_ip == Some(true) {
        PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
    } else if let Some(q) = &hash.http_query_parameter_name {
        PolicySpecifier::QueryParameter(QueryParameter { name: q.clone() })
    } else {
        return Vec::new();
    };
    vec![route_action::HashPolicy {
        policy_specifier: Some(specifier),
        terminal: false,
    }]
}
