//! Sidecar proxies, on Istio's model: traffic reaches Envoy through the
//! capture rules, outbound on 15001 (`virtualOutbound`, handing each
//! connection to the listener for its original destination) and inbound on
//! 15006 (`virtualInbound`, one filter chain per workload port and
//! transport). PeerAuthentication decides, per port, whether inbound
//! accepts mutual TLS, plain text or both.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::{transport_socket, TransportSocket};
use envoy_types::pb::envoy::config::listener::v3::{
    listener_filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, route_match, DirectResponseAction, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use envoy_types::util::pack_any;

use super::cluster::{self, BLACKHOLE, INBOUND_PASSTHROUGH, PASSTHROUGH};
use super::route::{http_routes, RouteScope};
use super::tls::istio_common_tls_context;
use super::{
    duration, http_connection_manager, outbound_cluster_name, rds, socket, tcp_proxy, Diagnostic, Generated,
};
use crate::model::peer_auth::{self, MtlsMode};
use crate::model::sidecar_scope::SidecarScope;
use crate::model::{resolve_host, MeshService, Proxy, PushContext, DOMAIN_SUFFIX};

/// Istio's capture ports.
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
pub const INBOUND_CAPTURE_PORT: u16 = 15006;

/// Adds a sidecar's listeners, routes and special clusters to `out`.
pub fn build(push: &PushContext, proxy: &Proxy, scope: &SidecarScope, out: &mut Generated) {
    inbound(push, proxy, out);
    outbound(push, proxy, scope, out);
    out.clusters.extend(cluster::passthrough());
}

/// A workload port: what the app listens on, and whether it speaks HTTP.
fn workload_ports(push: &PushContext, proxy: &Proxy) -> BTreeMap<u16, bool> {
    let mut ports: BTreeMap<u16, bool> = BTreeMap::new();
    for svc in push.services.values() {
        for sp in &svc.ports {
            for e in sp.endpoints.iter().filter(|e| e.ip == proxy.ip) {
                *ports.entry(e.port).or_default() |= sp.is_http();
            }
        }
    }
    ports
}

fn original_dst_and_tls_inspector() -> Vec<ListenerFilter> {
    vec![
        ListenerFilter {
            name: "envoy.filters.listener.original_dst".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
                OriginalDst::default(),
            ))),
            ..Default::default()
        },
        ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
                TlsInspector::default(),
            ))),
            ..Default::default()
        },
    ]
}

/// Istio mutual TLS on the inbound side: the sidecar's own certificate,
/// and a client certificate from the mesh required.
fn inbound_mtls() -> TransportSocket {
    let mut common = istio_common_tls_context(Vec::new(), Vec::new());
    common.alpn_protocols = vec!["h2".into(), "http/1.1".into()];
    let context = DownstreamTlsContext {
        common_tls_context: Some(common),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(context))),
    }
}

/// A route table sending everything to one cluster.
fn all_to(name: &str, cluster: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: name.to_string(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_string())),
                    timeout: Some(duration(std::time::Duration::ZERO)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// One inbound chain: for a port (or every other port) and a transport.
fn inbound_chain(port: Option<u16>, transport: &str, http: bool, cluster: &str, mtls: bool) -> FilterChain {
    let stat = format!(
        "inbound_0.0.0.0_{}",
        port.map_or("passthrough".to_string(), |p| p.to_string())
    );
    let filter = if http {
        http_connection_manager(
            &stat,
            RouteSpecifier::RouteConfig(all_to(cluster, cluster)),
            false,
        )
    } else {
        tcp_proxy(&stat, cluster)
    };
    let kind = if mtls { "mtls" } else { "plaintext" };
    FilterChain {
        name: format!("{cluster}:{kind}"),
        filter_chain_match: Some(FilterChainMatch {
            destination_port: port.map(|p| UInt32Value { value: u32::from(p) }),
            transport_protocol: transport.to_string(),
            ..Default::default()
        }),
        filters: vec![filter],
        transport_socket: mtls.then(inbound_mtls),
        ..Default::default()
    }
}

/// The chains of one port under one mode. Without a workload certificate
/// the sidecar cannot speak mutual TLS: STRICT then admits nothing.
fn chains_for(
    port: Option<u16>,
    mode: MtlsMode,
    identity: bool,
    http: bool,
    cluster: &str,
) -> Vec<FilterChain> {
    match mode {
        MtlsMode::Disable => vec![inbound_chain(port, "", http, cluster, false)],
        MtlsMode::Permissive if identity => vec![
            inbound_chain(port, "tls", http, cluster, true),
            inbound_chain(port, "raw_buffer", http, cluster, false),
        ],
        MtlsMode::Permissive => vec![inbound_chain(port, "", http, cluster, false)],
        MtlsMode::Strict if identity => vec![inbound_chain(port, "tls", http, cluster, true)],
        MtlsMode::Strict => Vec::new(),
    }
}

fn inbound(push: &PushContext, proxy: &Proxy, out: &mut Generated) {
    let labels = push.pods.get(&proxy.ip).map_or(&proxy.labels, |p| &p.labels);
    let mtls = peer_auth::resolve(push, &proxy.namespace, labels);
    let identity = proxy.identity.is_some();
    let mut chains = Vec::new();
    for (port, http) in workload_ports(push, proxy) {
        let mode = mtls.for_port(port);
        let cluster = format!("inbound|{port}||");
        chains.extend(chains_for(Some(port), mode, identity, http, &cluster));
        out.clusters.push(cluster::inbound(&proxy.ip, port));
        if mode == MtlsMode::Strict && !identity {
            out.diagnostics.push(Diagnostic {
                resource: format!("proxy {}", proxy.id),
                field: format!("inbound port {port}"),
                message:
                    "STRICT mutual TLS, but this sidecar has no workload certificate (connect it to the \
                          TLS xDS port with a token): the port admits nothing"
                        .into(),
            });
        }
    }
    // Ports no Service names still reach the app, under the workload's mode.
    chains.extend(chains_for(None, mtls.mode, identity, false, INBOUND_PASSTHROUGH));
    out.listeners.push(Listener {
        name: "virtualInbound".into(),
        address: Some(socket("0.0.0.0", INBOUND_CAPTURE_PORT)),
        listener_filters: original_dst_and_tls_inspector(),
        filter_chains: chains,
        // What no chain admits (plain text under STRICT) is closed.
        default_filter_chain: Some(FilterChain {
            name: "BlackHoleFilterChain".into(),
            filters: vec![tcp_proxy(BLACKHOLE, BLACKHOLE)],
            ..Default::default()
        }),
        ..Default::default()
    });
}

/// The names a service is reached by from the proxy's namespace, as
/// Istio's virtual host domains list them.
fn domains(svc: &MeshService, port: u16, from_namespace: &str) -> Vec<String> {
    let mut names = vec![
        svc.hostname.clone(),
        format!("{}.{}.svc", svc.name, svc.namespace),
        format!("{}.{}", svc.name, svc.namespace),
    ];
    if svc.namespace == from_namespace {
        names.push(svc.name.clone());
    }
    names.extend(svc.cluster_ip.clone());
    let mut out: Vec<String> = names
        .iter()
        .flat_map(|n| [n.clone(), format!("{n}:{port}")])
        .collect();
    out.sort();
    out.dedup();
    out
}

fn outbound(push: &PushContext, proxy: &Proxy, scope: &SidecarScope, out: &mut Generated) {
    let mut http_ports: BTreeMap<u16, Vec<VirtualHost>> = BTreeMap::new();
    for svc in push.services.values().filter(|s| scope.visible(s)) {
        for sp in svc
            .ports
            .iter()
            .filter(|p| p.protocol.eq_ignore_ascii_case("TCP"))
        {
            let cluster = outbound_cluster_name(sp.port, "", &svc.hostname);
            if sp.is_http() {
                let routes = mesh_routes(push, proxy, svc, sp.port, &mut out.diagnostics);
                let routes = if routes.is_empty() {
                    all_to(&cluster, &cluster).virtual_hosts.remove(0).routes
                } else {
                    routes
                };
                http_ports.entry(sp.port).or_default().push(VirtualHost {
                    name: format!("{}:{}", svc.hostname, sp.port),
                    domains: domains(svc, sp.port, &proxy.namespace),
                    routes,
                    ..Default::default()
                });
                continue;
            }
            // TCP is told apart by address: services without one are
            // reached through the passthrough.
            let Some(cluster_ip) = &svc.cluster_ip else {
                continue;
            };
            out.listeners.push(Listener {
                name: format!("{cluster_ip}_{}", sp.port),
                address: Some(socket(cluster_ip, sp.port)),
                filter_chains: vec![FilterChain {
                    filters: vec![tcp_proxy(&cluster, &cluster)],
                    ..Default::default()
                }],
                bind_to_port: Some(BoolValue { value: false }),
                ..Default::default()
            });
        }
    }
    for (port, mut vhosts) in http_ports {
        let name = port.to_string();
        // Unknown hosts on a known port go where they were going (ALLOW_ANY),
        // or nowhere (REGISTRY_ONLY: 502, as Istio answers).
        if scope.registry_only {
            vhosts.push(VirtualHost {
                name: "block_all".into(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::DirectResponse(DirectResponseAction {
                        status: 502,
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            });
        } else {
            let mut allow_any = all_to("allow_any", PASSTHROUGH).virtual_hosts.remove(0);
            allow_any.name = "allow_any".into();
            vhosts.push(allow_any);
        }
        out.routes.push(RouteConfiguration {
            name: name.clone(),
            virtual_hosts: vhosts,
            validate_clusters: Some(BoolValue { value: false }),
            ..Default::default()
        });
        out.listeners.push(Listener {
            name: format!("0.0.0.0_{port}"),
            address: Some(socket("0.0.0.0", port)),
            filter_chains: vec![FilterChain {
                filters: vec![http_connection_manager(
                    &format!("outbound_0.0.0.0_{port}"),
                    rds(&name),
                    false,
                )],
                ..Default::default()
            }],
            bind_to_port: Some(BoolValue { value: false }),
            ..Default::default()
        });
    }
    out.listeners.push(Listener {
        name: "virtualOutbound".into(),
        address: Some(socket("0.0.0.0", OUTBOUND_CAPTURE_PORT)),
        use_original_dst: Some(BoolValue { value: true }),
        filter_chains: vec![if scope.registry_only {
            FilterChain {
                name: "BlackHoleFilterChain".into(),
                filters: vec![tcp_proxy(BLACKHOLE, BLACKHOLE)],
                ..Default::default()
            }
        } else {
            FilterChain {
                name: "PassthroughFilterChain".into(),
                filters: vec![tcp_proxy(PASSTHROUGH, PASSTHROUGH)],
                ..Default::default()
            }
        }],
        ..Default::default()
    });
}

/// Routes of the VirtualServices bound to the mesh (no `gateways`, or
/// `mesh` among them) for this service, merged oldest first.
fn mesh_routes(
    push: &PushContext,
    proxy: &Proxy,
    svc: &MeshService,
    port: u16,
    diags: &mut Vec<Diagnostic>,
) -> Vec<Route> {
    let mut seen = BTreeSet::new();
    let mut routes = Vec::new();
    for vs in &push.virtual_services {
        let for_mesh = vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh");
        // exportTo: "*" (the default), "." (its own namespace) or names.
        let exported = vs.spec.export_to.is_empty()
            || vs.spec.export_to.iter().any(|e| {
                e == "*" || e == &proxy.namespace || (e == "." && vs.namespace() == proxy.namespace)
            });
        if !exported {
            continue;
        }
        let names_it = vs.spec.hosts.iter().any(|h| {
            resolve_host(h, vs.namespace()) == svc.hostname
                || h == &format!("{}.{}.{DOMAIN_SUFFIX}", svc.name, svc.namespace)
        });
        if for_mesh && names_it && seen.insert((vs.namespace(), vs.name())) {
            let scope = RouteScope {
                gateway: None,
                port,
                proxy_namespace: &proxy.namespace,
                proxy_labels: &proxy.labels,
            };
            routes.extend(http_routes(push, vs, &scope, diags));
        }
    }
    routes
}
