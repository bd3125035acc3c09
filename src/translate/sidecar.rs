//! Sidecar proxies, on Istio's model: traffic reaches Envoy through the
//! capture rules, outbound on 15001 (`virtualOutbound`, handing each
//! connection to the listener for its original destination) and inbound on
//! 15006 (`virtualInbound`, one filter chain per workload port and
//! transport). PeerAuthentication decides, per port, whether inbound
//! accepts mutual TLS, plain text or both.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use prost::Message;

use envoy_types::pb::envoy::config::core::v3::{address, transport_socket, Address, Pipe, TransportSocket};
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
use super::route::{http_routes, l4_clusters, RouteScope};
use super::security::PolicyFilters;
use super::tls::istio_common_tls_context;
use super::{
    duration, http_connection_manager, outbound_cluster_name, rds, socket, tcp_proxy, Diagnostic, Generated,
};
use crate::config::{DestinationRule, VirtualService};
use crate::model::peer_auth::{self, MtlsMode};
use crate::model::sidecar_scope::{EgressListener, SidecarScope};
use crate::model::{is_subset, MeshService, Proxy, PushContext};

/// Where listeners bind: every address (captured), or loopback (bound, for
/// the app to call).
const ANY: &str = "0.0.0.0";
const LOCALHOST: &str = "127.0.0.1";

/// Istio's capture ports.
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
pub const INBOUND_CAPTURE_PORT: u16 = 15006;

/// Adds a sidecar's listeners, routes and special clusters to `out`; with
/// a `cache`, default virtual hosts come from it, already encoded (see
/// `Generated::encoded_vhosts`).
pub fn build(
    push: &PushContext,
    proxy: &Proxy,
    scope: &SidecarScope,
    cache: Option<&VirtualHostCache>,
    out: &mut Generated,
) {
    inbound(push, proxy, scope, out);
    outbound(push, proxy, scope, cache, out);
    out.clusters.extend(cluster::passthrough());
}

/// The workload's ports (what the app listens on, found through the
/// endpoints with the proxy's IP), and whether each speaks HTTP.
pub(super) fn workload_ports<'a>(
    push: &'a PushContext,
    proxy: &Proxy,
) -> impl Iterator<Item = (u16, bool)> + 'a {
    push.workload_ports.get(&proxy.ip)
}

fn tls_inspector() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
            TlsInspector::default(),
        ))),
        ..Default::default()
    }
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
        tls_inspector(),
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
            routes: vec![route_to(cluster)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Every path to one cluster, with no timeout.
fn route_to(cluster: &str) -> Route {
    Route {
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
    }
}

/// One inbound chain: for a port (or every other port) and a transport.
fn inbound_chain(
    port: Option<u16>,
    transport: &str,
    http: bool,
    cluster: &str,
    mtls: bool,
    policy: &PolicyFilters,
) -> FilterChain {
    let stat = format!(
        "inbound_0.0.0.0_{}",
        port.map_or("passthrough".to_string(), |p| p.to_string())
    );
    let filter = if http {
        http_connection_manager(
            &stat,
            RouteSpecifier::RouteConfig(all_to(cluster, cluster)),
            false,
            &policy.http,
        )
    } else {
        tcp_proxy(&stat, cluster, None)
    };
    let filters = if http {
        vec![filter]
    } else {
        policy.tcp.iter().cloned().chain([filter]).collect()
    };
    let kind = if mtls { "mtls" } else { "plaintext" };
    FilterChain {
        name: format!("{cluster}:{kind}"),
        filter_chain_match: Some(FilterChainMatch {
            destination_port: port.map(|p| UInt32Value { value: u32::from(p) }),
            transport_protocol: transport.to_string(),
            ..Default::default()
        }),
        filters,
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
    policy: &PolicyFilters,
) -> Vec<FilterChain> {
    let chain = |transport: &str, mtls: bool| inbound_chain(port, transport, http, cluster, mtls, policy);
    match mode {
        MtlsMode::Disable => vec![chain("", false)],
        MtlsMode::Permissive if identity => vec![chain("tls", true), chain("raw_buffer", false)],
        MtlsMode::Permissive => vec![chain("", false)],
        MtlsMode::Strict if identity => vec![chain("tls", true)],
        MtlsMode::Strict => Vec::new(),
    }
}

fn inbound(push: &PushContext, proxy: &Proxy, scope: &SidecarScope, out: &mut Generated) {
    let labels = push.pods.get(&proxy.ip).map_or(&proxy.labels, |p| &p.labels);
    let mtls = peer_auth::resolve(push, &proxy.namespace, labels);
    let policy = super::security::filters(push, &proxy.namespace, labels, out);
    let identity = proxy.identity.is_some();
    let strict_without_identity = |port: u16, out: &mut Generated| {
        out.diagnostics.push(Diagnostic {
            resource: format!("sidecar in {}", proxy.namespace),
            field: format!("inbound port {port}"),
            message: "STRICT mutual TLS, but this sidecar has no workload certificate (connect it to the \
                      TLS xDS port with a token): the port admits nothing"
                .into(),
        });
    };
    if !scope.ingress.is_empty() {
        let mut chains = Vec::new();
        for (i, listener) in scope.ingress.iter().enumerate() {
            let Some(port) = listener.port.as_ref() else {
                continue;
            };
            let Ok(number) = u16::try_from(port.number) else {
                continue;
            };
            let resource = scope.source.clone().unwrap_or_default();
            for (field, set) in [
                ("tls", listener.tls.is_some()),
                ("connectionPool", listener.connection_pool.is_some()),
            ] {
                if set {
                    out.diagnostics.push(Diagnostic {
                        resource: resource.clone(),
                        field: format!("spec.ingress[{i}].{field}"),
                        message: "not applied yet; the listener is served without it".into(),
                    });
                }
            }
            let none = proxy.capture_none || listener.capture_mode.as_deref() == Some("NONE");
            let endpoint = listener.default_endpoint.as_str();
            let unix = endpoint.starts_with("unix://");
            let target = if unix {
                socket_or_pipe(endpoint, 0)
            } else {
                let (host, app_port) = endpoint.rsplit_once(':').unwrap_or((LOCALHOST, "0"));
                // 0.0.0.0 means the workload's own address.
                let host = if host == ANY { proxy.ip.as_str() } else { host };
                socket(host, app_port.parse().unwrap_or(0))
            };
            let cluster = format!("inbound|{number}||");
            let http =
                ["HTTP", "HTTP2", "GRPC", "GRPC-WEB"].contains(&port.protocol.to_ascii_uppercase().as_str());
            out.clusters
                .push(cluster::inbound_to(number, target, !none && !unix, http));
            let mode = mtls.for_port(number);
            if mode == MtlsMode::Strict && !identity {
                strict_without_identity(number, out);
            }
            if !http {
                out.diagnostics.extend(policy.tcp_unchecked.iter().cloned());
            }
            let port_chains = chains_for(Some(number), mode, identity, http, &cluster, &policy);
            if none {
                let bind = listener.bind.as_deref().unwrap_or(&proxy.ip);
                out.listeners.push(Listener {
                    name: format!("{bind}_{number}"),
                    address: Some(socket(bind, number)),
                    listener_filters: vec![tls_inspector()],
                    filter_chains: port_chains,
                    ..Default::default()
                });
            } else {
                chains.extend(port_chains);
            }
        }
        if !proxy.capture_none {
            chains.extend(chains_for(
                None,
                mtls.mode,
                identity,
                false,
                INBOUND_PASSTHROUGH,
                &policy,
            ));
            virtual_inbound(chains, out);
        }
        return;
    }
    if proxy.capture_none {
        out.diagnostics.push(Diagnostic {
            resource: format!("sidecar in {}", proxy.namespace),
            field: "inbound".into(),
            message:
                "this sidecar captures no traffic (INTERCEPTION_MODE NONE) and no Sidecar resource gives \
                      it ingress listeners: nothing reaches the workload through it"
                    .into(),
        });
        return;
    }
    let mut chains = Vec::new();
    for (port, http) in workload_ports(push, proxy) {
        let mode = mtls.for_port(port);
        let cluster = format!("inbound|{port}||");
        chains.extend(chains_for(Some(port), mode, identity, http, &cluster, &policy));
        out.clusters.push(cluster::inbound(port, http));
        if mode == MtlsMode::Strict && !identity {
            strict_without_identity(port, out);
        }
        if !http {
            out.diagnostics.extend(policy.tcp_unchecked.iter().cloned());
        }
    }
    // Ports no Service names still reach the app, under the workload's mode.
    chains.extend(chains_for(
        None,
        mtls.mode,
        identity,
        false,
        INBOUND_PASSTHROUGH,
        &policy,
    ));
    virtual_inbound(chains, out);
}

/// The listener captured inbound connections arrive on, with `chains`.
fn virtual_inbound(chains: Vec<FilterChain>, out: &mut Generated) {
    out.listeners.push(Listener {
        name: "virtualInbound".into(),
        address: Some(socket("0.0.0.0", INBOUND_CAPTURE_PORT)),
        listener_filters: original_dst_and_tls_inspector(),
        filter_chains: chains,
        // What no chain admits (plain text under STRICT) is closed.
        default_filter_chain: Some(FilterChain {
            name: "BlackHoleFilterChain".into(),
            filters: vec![tcp_proxy(BLACKHOLE, BLACKHOLE, None)],
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

/// The virtual hosts of services no VirtualService routes for the proxy,
/// encoded once per push context and shared by every config key that has
/// them. Such a host is the same for every sidecar that sees the service
/// but for two things, both in its key: whether the sidecar is in the
/// service's namespace (the short name is a domain then), and which
/// DestinationRule applies to it (its consistent-hash policy). Keyed by
/// the addresses of the service and the rule in the push context the
/// cache was made for, and used with that push context alone; the next
/// push context's cache starts with the entries whose objects it shares
/// (`carried`).
#[derive(Debug)]
pub struct VirtualHostCache {
    /// The address of the push context the keys point into.
    push: usize,
    hosts: dashmap::DashMap<(usize, u16, bool, usize), Bytes>,
}

impl VirtualHostCache {
    /// An empty cache for translations against `push`.
    pub fn new(push: &PushContext) -> VirtualHostCache {
        VirtualHostCache {
            push: std::ptr::from_ref(push) as usize,
            hosts: Default::default(),
        }
    }

    /// A cache for translations against `push` holding the entries of
    /// `prev` (made for an earlier push context, alive while this runs)
    /// whose service and rule `push` still holds (`objects`, of `push`):
    /// an address both contexts hold is one object, shared by
    /// `PushContext::next`, and such a host reads nothing else of the
    /// context. A change that leaves most services alone encodes only its
    /// own hosts again.
    pub fn carried(
        prev: &VirtualHostCache,
        push: &PushContext,
        objects: &super::ClusterObjects,
    ) -> VirtualHostCache {
        let next = VirtualHostCache::new(push);
        for e in prev.hosts.iter() {
            let (service, _, _, rule) = *e.key();
            if objects.hold_objects(service, rule) {
                next.hosts.insert(*e.key(), e.value().clone());
            }
        }
        next
    }

    /// The virtual hosts held.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    fn serves(&self, push: &PushContext) -> bool {
        self.push == std::ptr::from_ref(push) as usize
    }
}

/// What the services one egress listener sees contribute to one port.
#[derive(Default)]
struct PortPlan {
    vhosts: Vec<VirtualHost>,
    /// Virtual hosts already encoded (from a `VirtualHostCache`), each
    /// with its position among all of the port's.
    encoded: Vec<(usize, Bytes)>,
    /// Chains for TLS services told apart by SNI on the port's listener.
    sni: Vec<FilterChain>,
    /// Services told apart by address: their address (if any), host and
    /// chains.
    by_address: Vec<(Option<String>, String, Vec<FilterChain>)>,
}

/// How an outbound listener is reached: through capture (`bind_to_port`
/// false, handed over by `virtualOutbound`) or bound for real
/// (`captureMode: NONE`).
#[derive(Clone, Copy)]
struct Binding<'a> {
    ip: &'a str,
    bound: bool,
}

impl Binding<'_> {
    fn apply(&self, port: u16, name: String, chains: Vec<FilterChain>, sni: bool) -> Listener {
        Listener {
            name,
            address: Some(socket_or_pipe(self.ip, port)),
            listener_filters: if sni { vec![tls_inspector()] } else { Vec::new() },
            filter_chains: chains,
            bind_to_port: (!self.bound).then_some(BoolValue { value: false }),
            ..Default::default()
        }
    }
}

/// A socket address, or a Unix socket for `unix://PATH`.
fn socket_or_pipe(bind: &str, port: u16) -> Address {
    match bind.strip_prefix("unix://") {
        Some(path) => Address {
            address: Some(address::Address::Pipe(Pipe {
                path: path.to_string(),
                ..Default::default()
            })),
        },
        None => socket(bind, port),
    }
}

fn outbound(
    push: &PushContext,
    proxy: &Proxy,
    scope: &SidecarScope,
    cache: Option<&VirtualHostCache>,
    out: &mut Generated,
) {
    let own_ports: BTreeSet<u16> = scope
        .egress
        .iter()
        .filter_map(|l| u16::try_from(l.port.as_ref()?.number).ok())
        .collect();
    for listener in &scope.egress {
        let Some(port) = listener.port.as_ref().and_then(|p| u16::try_from(p.number).ok()) else {
            continue;
        };
        let none = proxy.capture_none || listener.capture_none;
        let ip = listener
            .bind
            .as_deref()
            .unwrap_or(if none { LOCALHOST } else { ANY });
        let binding = Binding { ip, bound: none };
        let name = if ip == ANY {
            format!("{ANY}_{port}")
        } else {
            format!("{ip}_{port}")
        };
        let plan = plan_port(push, proxy, scope, listener, port, true, cache, out);
        finish_port(scope, binding, port, &name, plan, true, out);
    }
    let catch_all = scope.catch_all();
    let none = proxy.capture_none || catch_all.as_ref().is_some_and(|l| l.capture_none);
    if let Some(listener) = &catch_all {
        let ports: BTreeSet<u16> = push
            .services
            .values()
            .filter(|s| listener.visible(s))
            .flat_map(|s| s.ports.iter())
            .filter(|p| p.protocol.eq_ignore_ascii_case("TCP") && !own_ports.contains(&p.port))
            .map(|p| p.port)
            .collect();
        let ip = listener
            .bind
            .as_deref()
            .unwrap_or(if none { LOCALHOST } else { ANY });
        for port in ports {
            let plan = plan_port(push, proxy, scope, listener, port, none, cache, out);
            let name = format!("{ip}_{port}");
            finish_port(scope, Binding { ip, bound: none }, port, &name, plan, none, out);
        }
    }
    if none {
        // Nothing is captured: the app calls the bound listeners itself.
        return;
    }
    out.listeners.push(Listener {
        name: "virtualOutbound".into(),
        address: Some(socket(ANY, OUTBOUND_CAPTURE_PORT)),
        use_original_dst: Some(BoolValue { value: true }),
        filter_chains: vec![fallback_chain(scope)],
        ..Default::default()
    });
}

/// Where a connection to no known destination goes: nowhere under
/// REGISTRY_ONLY, else where it was going.
fn fallback_chain(scope: &SidecarScope) -> FilterChain {
    if scope.registry_only {
        FilterChain {
            name: "BlackHoleFilterChain".into(),
            filters: vec![tcp_proxy(BLACKHOLE, BLACKHOLE, None)],
            ..Default::default()
        }
    } else {
        FilterChain {
            name: "PassthroughFilterChain".into(),
            filters: vec![tcp_proxy(PASSTHROUGH, PASSTHROUGH, None)],
            ..Default::default()
        }
    }
}

/// What the services `listener` sees on `port` need; with `single`, all
/// of them on one listener.
#[allow(clippy::too_many_arguments)]
fn plan_port(
    push: &PushContext,
    proxy: &Proxy,
    scope: &SidecarScope,
    listener: &EgressListener,
    port: u16,
    single: bool,
    cache: Option<&VirtualHostCache>,
    out: &mut Generated,
) -> PortPlan {
    let mut plan = PortPlan::default();
    // Another push context's cache would name other services.
    let cache = cache.filter(|c| c.serves(push));
    for svc in push
        .services
        .values()
        .filter(|s| listener.visible(s) && scope.visible(s))
    {
        let Some(sp) = svc
            .ports
            .iter()
            .find(|p| p.port == port && p.protocol.eq_ignore_ascii_case("TCP"))
        else {
            continue;
        };
        if sp.is_http() {
            let routes = mesh_routes(push, proxy, svc, port, &mut out.diagnostics);
            let vhost = |routes| VirtualHost {
                name: format!("{}:{port}", svc.hostname),
                domains: domains(svc, port, &proxy.namespace),
                routes,
                ..Default::default()
            };
            if !routes.is_empty() {
                plan.vhosts.push(vhost(routes));
                continue;
            }
            let dr = push.destination_rule(&proxy.namespace, &proxy.labels, &svc.hostname, &svc.namespace);
            let default = || vhost(default_route(dr, svc, port));
            match cache {
                Some(cache) => {
                    let key = (
                        std::sync::Arc::as_ptr(svc) as usize,
                        port,
                        svc.namespace == proxy.namespace,
                        dr.map_or(0, |dr| std::ptr::from_ref(dr) as usize),
                    );
                    let found = cache.hosts.get(&key).map(|e| e.value().clone());
                    let encoded = found.unwrap_or_else(|| {
                        let bytes = Bytes::from(default().encode_to_vec());
                        cache.hosts.entry(key).or_insert(bytes).clone()
                    });
                    plan.encoded
                        .push((plan.vhosts.len() + plan.encoded.len(), encoded));
                }
                None => plan.vhosts.push(default()),
            }
            continue;
        }
        let cluster = outbound_cluster_name(port, "", &svc.hostname);
        let default = |diags: &mut Vec<Diagnostic>| {
            tcp_route(push, proxy, svc, port, diags).unwrap_or_else(|| FilterChain {
                filters: vec![tcp_proxy(
                    &cluster,
                    &cluster,
                    super::cluster::tunnel(push, proxy, &[(cluster.clone(), 1)]),
                )],
                ..Default::default()
            })
        };
        let own_address = !single && svc.cluster_ip.is_some();
        if sp.is_tls() {
            let mut chains = tls_rule_chains(push, proxy, svc, port, &mut out.diagnostics);
            if own_address {
                // On its own address: what no rule names goes to the service.
                chains.push(default(&mut out.diagnostics));
                plan.by_address
                    .push((svc.cluster_ip.clone(), svc.hostname.clone(), chains));
            } else {
                if !chains.iter().any(|c| names(c, &svc.hostname)) {
                    let clusters = vec![(cluster, 1)];
                    let tunnel = super::cluster::tunnel(push, proxy, &clusters);
                    chains.push(super::tls::sni_chain(
                        vec![svc.hostname.clone()],
                        clusters,
                        tunnel,
                    ));
                }
                plan.sni.extend(chains);
            }
        } else {
            let chain = default(&mut out.diagnostics);
            plan.by_address
                .push((svc.cluster_ip.clone(), svc.hostname.clone(), vec![chain]));
        }
    }
    plan
}

/// The route to a service no VirtualService routes: to its cluster, with
/// the hash policy its DestinationRule (`dr`, the one that applies to the
/// proxy) needs for consistent hashing.
fn default_route(dr: Option<&DestinationRule>, svc: &MeshService, port: u16) -> Vec<Route> {
    let mut route = route_to(&outbound_cluster_name(port, "", &svc.hostname));
    if let Some(route::Action::Route(action)) = &mut route.action {
        action.hash_policy =
            super::policy::hash_policy(super::policy::effective(dr, None, port).load_balancer);
    }
    vec![route]
}

/// Turns one port's plan into listeners and a route table. With `single`
/// (a bound listener, or one an egress listener names) everything on the
/// port shares one listener; otherwise TCP services get a listener on their
/// own address, as capture tells them apart by it.
fn finish_port(
    scope: &SidecarScope,
    binding: Binding<'_>,
    port: u16,
    name: &str,
    plan: PortPlan,
    single: bool,
    out: &mut Generated,
) {
    let mut by_address = plan.by_address.into_iter();
    if !single {
        for (ip, _, chains) in by_address.by_ref() {
            // Services without an address are reached through the
            // passthrough.
            if let Some(ip) = ip {
                let at = Binding {
                    ip: &ip,
                    bound: false,
                };
                let sni = chains.len() > 1;
                out.listeners
                    .push(at.apply(port, format!("{ip}_{port}"), chains, sni));
            }
        }
    }
    let mut chains = plan.sni;
    let sni = !chains.is_empty();
    let route_name = if binding.ip == ANY {
        port.to_string()
    } else {
        name.to_string()
    };
    if !plan.vhosts.is_empty() || !plan.encoded.is_empty() {
        out.routes.push(route_table(scope, &route_name, plan.vhosts));
        if !plan.encoded.is_empty() {
            out.encoded_vhosts.insert(route_name.clone(), plan.encoded);
        }
        chains.push(FilterChain {
            filter_chain_match: sni.then(|| FilterChainMatch {
                transport_protocol: "raw_buffer".into(),
                ..Default::default()
            }),
            filters: vec![http_connection_manager(
                &format!("outbound_{}_{port}", binding.ip),
                rds(&route_name),
                false,
                &[],
            )],
            ..Default::default()
        });
    }
    let mut rest = by_address.map(|(_, host, chains)| (host, chains));
    if chains.is_empty() {
        if let Some((_, first)) = rest.next() {
            chains = first;
        }
    } else if sni {
        // TLS to a name no chain lists goes where other unknown traffic goes.
        chains.push(fallback_chain(scope));
    }
    for (host, _) in rest {
        out.diagnostics.push(Diagnostic {
            resource: scope.source.clone().unwrap_or_else(|| "sidecar".into()),
            field: format!("egress port {port}"),
            message: format!(
                "service {host} shares port {port} with another service on one listener and is told \
                 apart by neither Host nor SNI; only the first is reachable there"
            ),
        });
    }
    if !chains.is_empty() {
        let sni = chains.len() > 1;
        out.listeners
            .push(binding.apply(port, name.to_string(), chains, sni));
    }
}

/// A port's route table: its services' virtual hosts, then where unknown
/// hosts go (ALLOW_ANY: where they were going; REGISTRY_ONLY: 502, as
/// Istio answers).
fn route_table(scope: &SidecarScope, name: &str, mut vhosts: Vec<VirtualHost>) -> RouteConfiguration {
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
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vhosts,
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

/// The VirtualServices bound to the mesh (no `gateways`, or `mesh` among
/// them), exported to the proxy's namespace, that name `svc`, oldest first.
/// The mesh VirtualServices for `svc` that serve this sidecar, and
/// whether they all come from Gateway API routes bound to the Service;
/// then those from the sidecar's own namespace (GAMMA consumer routes),
/// if any, stand in for the Service's namespace's (producer routes).
fn bound_to_service<'a>(
    push: &'a PushContext,
    proxy: &'a Proxy,
    svc: &'a MeshService,
) -> (Vec<&'a VirtualService>, bool) {
    let mut services: Vec<&VirtualService> = mesh_virtual_services(push, proxy, svc).collect();
    let gateway_api = !services.is_empty() && services.iter().all(|vs| super::route::gateway_semantics(vs));
    if gateway_api && services.iter().any(|vs| vs.namespace() == proxy.namespace) {
        services.retain(|vs| vs.namespace() == proxy.namespace);
    }
    (services, gateway_api)
}

fn mesh_virtual_services<'a>(
    push: &'a PushContext,
    proxy: &'a Proxy,
    svc: &'a MeshService,
) -> impl Iterator<Item = &'a VirtualService> + 'a {
    push.virtual_services_by_host
        .get(&svc.hostname)
        .into_iter()
        .flatten()
        .map(|i| &*push.virtual_services[*i])
        .filter(move |vs| {
            let for_mesh = vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh");
            // exportTo: "*" (the default), "." (its own namespace) or names.
            let exported = vs.spec.export_to.is_empty()
                || vs.spec.export_to.iter().any(|e| {
                    e == "*" || e == &proxy.namespace || (e == "." && vs.namespace() == proxy.namespace)
                });
            for_mesh && exported
        })
}

/// Whether an L4 match (port, sourceLabels, gateways) applies to this
/// sidecar's traffic on `port`.
fn l4_applies(
    port: Option<u32>,
    source_labels: &BTreeMap<String, String>,
    gateways: &[String],
    proxy: &Proxy,
    at: u16,
) -> bool {
    port.is_none_or(|p| p == u32::from(at))
        && is_subset(source_labels, &proxy.labels)
        && (gateways.is_empty() || gateways.iter().any(|g| g == "mesh"))
}

/// The chain of the first mesh VirtualService `tcp` rule that applies to
/// `svc` on `port`, if any.
fn tcp_route(
    push: &PushContext,
    proxy: &Proxy,
    svc: &MeshService,
    port: u16,
    diags: &mut Vec<Diagnostic>,
) -> Option<FilterChain> {
    for vs in bound_to_service(push, proxy, svc).0 {
        for (i, rule) in vs.spec.tcp.iter().enumerate() {
            let applies = rule.matches.is_empty()
                || rule
                    .matches
                    .iter()
                    .any(|m| l4_applies(m.port, &m.source_labels, &m.gateways, proxy, port));
            if applies {
                let clusters = l4_clusters(push, vs, &format!("spec.tcp[{i}]"), &rule.route, diags);
                let tunnel = super::cluster::tunnel(push, proxy, &clusters);
                let mut chain = super::tls::tcp_chain(clusters, tunnel)?;
                chain.name = format!("tcp:{}:{port}", svc.hostname);
                return Some(chain);
            }
        }
    }
    None
}

/// The SNI chains of each mesh VirtualService `tls` rule that applies to
/// `svc` on `port`, for its `sniHosts` (the first rule naming a host wins).
fn tls_rule_chains(
    push: &PushContext,
    proxy: &Proxy,
    svc: &MeshService,
    port: u16,
    diags: &mut Vec<Diagnostic>,
) -> Vec<FilterChain> {
    let mut chains = Vec::new();
    let mut taken = BTreeSet::new();
    for vs in bound_to_service(push, proxy, svc).0 {
        for (i, rule) in vs.spec.tls.iter().enumerate() {
            for m in &rule.matches {
                if !l4_applies(m.port, &m.source_labels, &m.gateways, proxy, port) {
                    continue;
                }
                let names: Vec<String> = m
                    .sni_hosts
                    .iter()
                    .filter(|h| taken.insert((*h).clone()))
                    .cloned()
                    .collect();
                let clusters = l4_clusters(push, vs, &format!("spec.tls[{i}]"), &rule.route, diags);
                if !names.is_empty() && !clusters.is_empty() {
                    let tunnel = super::cluster::tunnel(push, proxy, &clusters);
                    chains.push(super::tls::sni_chain(names, clusters, tunnel));
                }
            }
        }
    }
    chains
}

/// Whether `chain` matches the SNI `host`.
fn names(chain: &FilterChain, host: &str) -> bool {
    chain
        .filter_chain_match
        .as_ref()
        .is_some_and(|m| m.server_names.iter().any(|n| n == host))
}

/// Routes of the mesh VirtualServices for this service, merged oldest
/// first; in the Gateway API's precedence when they all come from
/// Gateway API routes bound to the service.
fn mesh_routes(
    push: &PushContext,
    proxy: &Proxy,
    svc: &MeshService,
    port: u16,
    diags: &mut Vec<Diagnostic>,
) -> Vec<Route> {
    let scope = RouteScope {
        gateway: None,
        port,
        proxy_namespace: &proxy.namespace,
        proxy_labels: &proxy.labels,
    };
    let (services, gateway_api) = bound_to_service(push, proxy, svc);
    let mut routes: Vec<Route> = services
        .into_iter()
        .flat_map(|vs| http_routes(push, vs, &scope, diags))
        .collect();
    if gateway_api {
        super::route::sort_by_gateway_precedence(&mut routes);
    }
    routes
}
