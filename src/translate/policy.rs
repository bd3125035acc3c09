//! DestinationRule traffic policies as Envoy cluster settings: load
//! balancing (and the route hash policy consistent hashing needs),
//! connection pool limits, outlier detection. The most specific policy
//! wins field by field: a subset's port-level, the subset's, the rule's
//! port-level, the rule's.

use envoy_types::pb::envoy::config::cluster::v3::{
    circuit_breakers, cluster, CircuitBreakers, Cluster, OutlierDetection as EnvoyOutlier,
};
use envoy_types::pb::envoy::config::core::v3::RuntimeDouble;
use envoy_types::pb::envoy::config::route::v3::route_action;
use envoy_types::pb::envoy::r#type::v3::Percent;
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

/// Every load balancer and TLS setting of a rule: its own and its ports',
/// then each subset's and its ports'.
pub fn settings(
    dr: &DestinationRule,
) -> impl Iterator<Item = (Option<&LoadBalancerSettings>, Option<&ClientTlsSettings>)> {
    let subsets = dr.spec.subsets.iter().filter_map(|s| s.traffic_policy.as_ref());
    dr.spec.traffic_policy.iter().chain(subsets).flat_map(|p| {
        let ports = p
            .port_level_settings
            .iter()
            .map(|l| (l.load_balancer.as_ref(), l.tls.as_ref()));
        std::iter::once((p.load_balancer.as_ref(), p.tls.as_ref())).chain(ports)
    })
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
            if let Some(slow_start) = slow_start(lb, resource, diags) {
                cluster.lb_config = if cluster.lb_policy == cluster::LbPolicy::LeastRequest as i32 {
                    Some(cluster::LbConfig::LeastRequestLbConfig(
                        cluster::LeastRequestLbConfig {
                            slow_start_config: Some(slow_start),
                            ..Default::default()
                        },
                    ))
                } else if cluster.lb_policy == cluster::LbPolicy::RoundRobin as i32 {
                    Some(cluster::LbConfig::RoundRobinLbConfig(
                        cluster::RoundRobinLbConfig {
                            slow_start_config: Some(slow_start),
                        },
                    ))
                } else {
                    diags.push(Diagnostic {
                        resource: resource.to_string(),
                        field: "trafficPolicy.loadBalancer.warmup".into(),
                        message: "warmup applies to ROUND_ROBIN and LEAST_REQUEST only; it is left out"
                            .into(),
                    });
                    None
                };
            }
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

/// Envoy's slow start from `warmup` (or the older `warmupDurationSecs`),
/// with Istio's defaults: 10% minimum weight, linear (aggression 1.0).
fn slow_start(
    lb: &LoadBalancerSettings,
    resource: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<cluster::SlowStartConfig> {
    let (field, window, min_percent, aggression) = match (&lb.warmup, &lb.warmup_duration_secs) {
        (Some(w), _) => (
            "trafficPolicy.loadBalancer.warmup.duration",
            w.duration.as_str(),
            w.minimum_percent,
            w.aggression,
        ),
        (None, Some(secs)) => (
            "trafficPolicy.loadBalancer.warmupDurationSecs",
            secs.as_str(),
            None,
            None,
        ),
        (None, None) => return None,
    };
    let Some(window) = parse_duration(window).filter(|d| !d.is_zero()) else {
        diags.push(Diagnostic {
            resource: resource.to_string(),
            field: field.into(),
            message: format!("{window:?} is not a positive duration such as \"60s\"; warmup is left out"),
        });
        return None;
    };
    Some(cluster::SlowStartConfig {
        slow_start_window: Some(duration(window)),
        aggression: Some(RuntimeDouble {
            default_value: aggression.unwrap_or(1.0),
            runtime_key: String::new(),
        }),
        min_weight_percent: Some(Percent {
            value: min_percent.unwrap_or(10.0),
        }),
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::istio::Warmup;

    fn cluster_with(lb: LoadBalancerSettings) -> (Cluster, Vec<Diagnostic>) {
        let e = Effective {
            load_balancer: Some(&lb),
            ..Default::default()
        };
        let (mut cluster, mut diags) = (Cluster::default(), Vec::new());
        apply(&e, &mut cluster, "DestinationRule default/r", &mut diags);
        (cluster, diags)
    }

    #[test]
    fn warmup_is_slow_start_with_istio_defaults() {
        let (cluster, diags) = cluster_with(LoadBalancerSettings {
            warmup_duration_secs: Some("45s".into()),
            ..Default::default()
        });
        assert!(diags.is_empty(), "{diags:?}");
        let Some(cluster::LbConfig::RoundRobinLbConfig(rr)) = cluster.lb_config else {
            panic!("round robin slow start expected: {:?}", cluster.lb_config);
        };
        let ss = rr.slow_start_config.expect("slow start");
        assert_eq!(ss.slow_start_window.map(|d| d.seconds), Some(45));
        assert_eq!(ss.min_weight_percent.map(|p| p.value), Some(10.0));
        assert_eq!(ss.aggression.map(|a| a.default_value), Some(1.0));
    }

    #[test]
    fn bad_warmup_is_named_and_left_out() {
        let (cluster, diags) = cluster_with(LoadBalancerSettings {
            simple: Some("RANDOM".into()),
            warmup: Some(Warmup {
                duration: "30s".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(cluster.lb_config.is_none());
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].field, "trafficPolicy.loadBalancer.warmup");
        let (cluster, diags) = cluster_with(LoadBalancerSettings {
            warmup: Some(Warmup {
                duration: "soon".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(cluster.lb_config.is_none());
        assert_eq!(diags[0].field, "trafficPolicy.loadBalancer.warmup.duration");
        assert!(diags[0].message.contains("\"soon\""), "{}", diags[0].message);
    }
}
