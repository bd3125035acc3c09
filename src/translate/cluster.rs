//! Outbound clusters (`outbound|PORT||HOST`, EDS) and their
//! ClusterLoadAssignments, one per service port; with auto mTLS, as Istio
//! does it: endpoints whose Pod is in the mesh carry `tlsMode: istio`
//! metadata, and the cluster's transport socket match sends them Istio
//! mutual TLS (the proxy's `default` certificate, the peer checked against
//! `ROOTCA` and its SPIFFE identity) and everything else plain text.
//! Also the special clusters sidecars need.

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    transport_socket, BindConfig, Metadata, SocketAddress, TransportSocket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
use envoy_types::pb::google::protobuf::{value, Struct, Value};
use envoy_types::util::pack_any;

use super::tls::istio_common_tls_context;
use super::{ads, duration, outbound_cluster_name, socket};
use crate::model::{MeshService, PushContext, ServicePort};

/// Istio's name for the cluster that drops traffic.
pub const BLACKHOLE: &str = "BlackHoleCluster";
/// Istio's name for the cluster that forwards to the original destination.
pub const PASSTHROUGH: &str = "PassthroughCluster";
/// Istio's name for the inbound cluster to the original destination.
pub const INBOUND_PASSTHROUGH: &str = "InboundPassthroughCluster";
/// The source address sidecars use to reach their app, so that the
/// capture rules let that traffic through (Istio's choice).
pub const INBOUND_SOURCE: &str = "127.0.0.6";

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The endpoint metadata key transport socket matches read.
const SOCKET_MATCH: &str = "envoy.transport_socket_match";

/// Every service port's cluster and endpoints, plus `BlackHoleCluster`.
/// With `mtls` (the proxy has a workload certificate) clusters send mesh
/// endpoints Istio mutual TLS.
pub fn outbound(push: &PushContext, mtls: bool) -> (Vec<Cluster>, Vec<ClusterLoadAssignment>) {
    let mut clusters = vec![blackhole()];
    let mut assignments = Vec::new();
    for svc in push.services.values() {
        for port in &svc.ports {
            if !port.protocol.eq_ignore_ascii_case("TCP") {
                continue; // UDP/SCTP: Envoy proxies neither
            }
            let name = outbound_cluster_name(port.port, "", &svc.hostname);
            let mut cluster = eds_cluster(&name);
            if mtls {
                cluster.transport_socket_matches = auto_mtls(push, svc, port);
            }
            clusters.push(cluster);
            let lb_endpoints = port
                .endpoints
                .iter()
                .map(|e| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(&e.ip, e.port)),
                        ..Default::default()
                    })),
                    metadata: e.mesh.as_ref().map(|_| mesh_metadata()),
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

fn string_struct(key: &str, value: &str) -> Struct {
    // One key: prost's map encoding order cannot vary, so versions stay stable.
    Struct {
        fields: HashMap::from([(
            key.to_string(),
            Value {
                kind: Some(value::Kind::StringValue(value.to_string())),
            },
        )]),
    }
}

/// `tlsMode: istio` under `envoy.transport_socket_match`.
fn mesh_metadata() -> Metadata {
    Metadata {
        filter_metadata: HashMap::from([(SOCKET_MATCH.to_string(), string_struct("tlsMode", "istio"))]),
        ..Default::default()
    }
}

fn auto_mtls(
    push: &PushContext,
    svc: &MeshService,
    port: &ServicePort,
) -> Vec<cluster::TransportSocketMatch> {
    let identities: BTreeSet<String> = port
        .endpoints
        .iter()
        .filter_map(|e| e.mesh.as_ref())
        .map(|(ns, sa)| push.spiffe(ns, sa))
        .collect();
    let tls = UpstreamTlsContext {
        common_tls_context: Some(istio_common_tls_context(
            identities.into_iter().collect(),
            Vec::new(),
        )),
        sni: format!("outbound_.{}_._.{}", port.port, svc.hostname),
        ..Default::default()
    };
    vec![
        cluster::TransportSocketMatch {
            name: "tlsMode-istio".into(),
            r#match: Some(string_struct("tlsMode", "istio")),
            transport_socket: Some(TransportSocket {
                name: "envoy.transport_sockets.tls".into(),
                config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(tls))),
            }),
        },
        cluster::TransportSocketMatch {
            name: "tlsMode-disabled".into(),
            r#match: Some(Struct::default()),
            transport_socket: Some(TransportSocket {
                name: "envoy.transport_sockets.raw_buffer".into(),
                config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(
                    RawBuffer::default(),
                ))),
            }),
        },
    ]
}

fn eds_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.to_string(),
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

fn bind_inbound_source() -> Option<BindConfig> {
    Some(BindConfig {
        source_address: Some(SocketAddress {
            address: INBOUND_SOURCE.into(),
            port_specifier: Some(
                envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(0),
            ),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// `PassthroughCluster` and `InboundPassthroughCluster`: to wherever the
/// connection was going.
pub fn passthrough() -> Vec<Cluster> {
    let original_dst = |name: &str| Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        ..Default::default()
    };
    let mut inbound = original_dst(INBOUND_PASSTHROUGH);
    inbound.upstream_bind_config = bind_inbound_source();
    vec![original_dst(PASSTHROUGH), inbound]
}

/// `inbound|PORT||`: the app on the proxy's own address, reached from
/// 127.0.0.6.
pub fn inbound(ip: &str, port: u16) -> Cluster {
    let name = format!("inbound|{port}||");
    Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        upstream_bind_config: bind_inbound_source(),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name,
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(ip, port)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}
