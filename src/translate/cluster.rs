//! Outbound clusters (`outbound|PORT||HOST`, EDS) and their
//! ClusterLoadAssignments, one per service port.

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};

use super::{ads, duration, outbound_cluster_name, socket};
use crate::model::PushContext;

/// Istio's name for the cluster that drops traffic.
pub const BLACKHOLE: &str = "BlackHoleCluster";

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Every service port's cluster and endpoints, plus `BlackHoleCluster`.
pub fn outbound(push: &PushContext) -> (Vec<Cluster>, Vec<ClusterLoadAssignment>) {
    let mut clusters = vec![blackhole()];
    let mut assignments = Vec::new();
    for svc in push.services.values() {
        for port in &svc.ports {
            if !port.protocol.eq_ignore_ascii_case("TCP") {
                continue; // UDP/SCTP: Envoy proxies neither
            }
            let name = outbound_cluster_name(port.port, "", &svc.hostname);
            clusters.push(eds_cluster(&name));
            let lb_endpoints = port
                .endpoints
                .iter()
                .map(|e| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(&e.ip, e.port)),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect();
            assignments.push(ClusterLoadAssignment {
                cluster_name: name,
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints,
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
    }
    (clusters, assignments)
}

fn eds_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.to_string(),
        alt_stat_name: String::new(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.to_string(),
        }),
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        ..Default::default()
    }
}

fn blackhole() -> Cluster {
    Cluster {
        name: BLACKHOLE.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        ..Default::default()
    }
}
