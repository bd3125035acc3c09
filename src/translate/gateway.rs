//! Gateway proxies (`router`): one listener per bound port of the Gateways
//! that select the proxy, and one RDS route configuration per listener with a
//! virtual host per VirtualService host bound to those Gateways.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::listener::v3::{
    listener_filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
};
use envoy_types::pb::envoy::config::route::v3::{virtual_host, Route, RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;

use super::route::{http_routes, RouteScope};
use super::tls::{self, Mode};
use super::{http_connection_manager, rds, socket, Diagnostic, Generated};
use crate::config::istio::Server;
use crate::config::{Gateway, VirtualService};
use crate::model::{Proxy, PushContext};

/// The protocols a gateway serves as plain HTTP.
const HTTP_PROTOCOLS: &[&str] = &["HTTP", "HTTP2", "GRPC", "GRPC-WEB"];

/// A Gateway server that lands on one of the proxy's ports.
pub struct BoundServer<'a> {
    pub gateway: &'a Arc<Gateway>,
    pub index: usize,
    pub server: &'a Server,
    /// The port number the Gateway names (virtual host names carry it).
    pub port: u16,
    kind: ServerKind,
}

/// How a server is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerKind {
    /// Plain HTTP, routed through the port's shared `http.PORT` routes.
    Http,
    /// TLS, terminated or passed through.
    Tls(Mode),
    /// Plain TCP, forwarded by VirtualService `tcp:` routes.
    Tcp,
    /// TLS terminated, then forwarded by `tcp:` routes.
    TlsTcp(Mode),
}

impl BoundServer<'_> {
    fn resource(&self) -> String {
        format!("Gateway {}/{}", self.gateway.namespace(), self.gateway.name())
    }

    /// Istio's route name for a terminating server:
    /// `https.PORT.PORT_NAME.GATEWAY.NAMESPACE`.
    fn https_route_name(&self) -> String {
        let port_name = self
            .server
            .port
            .as_ref()
            .map(|p| p.name.as_str())
            .unwrap_or_default();
        format!(
            "https.{}.{port_name}.{}.{}",
            self.port,
            self.gateway.name(),
            self.gateway.namespace()
        )
    }
}

/// How a server with this protocol and TLS settings is served, or why not.
fn server_kind(server: &Server) -> Result<ServerKind, String> {
    let protocol = server
        .port
        .as_ref()
        .map(|p| p.protocol.to_ascii_uppercase())
        .unwrap_or_default();
    if HTTP_PROTOCOLS.contains(&protocol.as_str()) {
        return Ok(ServerKind::Http);
    }
    if ["TCP", "MONGO", "MYSQL", "REDIS"].contains(&protocol.as_str()) && server.tls.is_none() {
        return Ok(ServerKind::Tcp);
    }
    let tls = server
        .tls
        .as_ref()
        .ok_or_else(|| format!("{protocol} servers need tls settings"))?;
    let mode = Mode::of(tls).ok_or_else(|| {
        format!(
            "tls mode {} is not served yet",
            tls.mode.as_deref().unwrap_or_default()
        )
    })?;
    match (protocol.as_str(), mode.terminates()) {
        ("HTTPS", _) | ("TLS", false) => Ok(ServerKind::Tls(mode)),
        ("TLS", true) => Ok(ServerKind::TlsTcp(mode)),
        _ => Err(format!("{protocol} servers are not served yet")),
    }
}

/// Adds the proxy's gateway listeners, route configurations and Secrets.
pub fn build(push: &PushContext, proxy: &Proxy, out: &mut Generated) {
    let policy = super::security::filters(push, &proxy.namespace, &proxy.labels, out);
    let mut by_bind_port: BTreeMap<u16, Vec<BoundServer<'_>>> = BTreeMap::new();
    for gateway in push.gateways_for(proxy) {
        for (index, server) in gateway.spec.servers.iter().enumerate() {
            let Some(port) = server.port.as_ref().and_then(|p| u16::try_from(p.number).ok()) else {
                continue; // validation already refused it
            };
            let kind = match server_kind(server) {
                Ok(k) => k,
                Err(why) => {
                    out.diagnostics.push(Diagnostic {
                        resource: format!("Gateway {}/{}", gateway.namespace(), gateway.name()),
                        field: format!("spec.servers[{index}]"),
                        message: format!("{why}; this server is left out"),
                    });
                    continue;
                }
            };
            let bind = bind_port(push, proxy, port, out);
            by_bind_port.entry(bind).or_default().push(BoundServer {
                gateway,
                index,
                server,
                port,
                kind,
            });
        }
    }
    for (bind, servers) in by_bind_port {
        let mut listener = ListenerBuild::new(bind);
        let http: Vec<&BoundServer<'_>> = servers.iter().filter(|s| s.kind == ServerKind::Http).collect();
        if !http.is_empty() {
            let route_name = format!("http.{bind}");
            out.routes.push(route_configuration(
                push,
                proxy,
                &route_name,
                &http,
                &mut out.diagnostics,
            ));
            let chain = FilterChain {
                filters: vec![http_connection_manager(
                    &format!("outbound_0.0.0.0_{bind}"),
                    rds(&route_name),
                    true,
                    &policy.http,
                )],
                ..Default::default()
            };
            listener.add(chain, &http[0].resource(), &mut out.diagnostics);
        }
        for bound in &servers {
            if matches!(bound.kind, ServerKind::Tcp | ServerKind::TlsTcp(_)) {
                if let Some(chain) = tcp_chain(push, proxy, bound, out) {
                    let chain = policy.guard_tcp(chain, &mut out.diagnostics);
                    listener.add(chain, &bound.resource(), &mut out.diagnostics);
                }
                continue;
            }
            let ServerKind::Tls(mode) = bound.kind else {
                continue;
            };
            let chains = match mode {
                Mode::Passthrough => tls::passthrough_chains(push, proxy, bound, &mut out.diagnostics)
                    .into_iter()
                    .map(|chain| policy.guard_tcp(chain, &mut out.diagnostics))
                    .collect(),
                Mode::AutoPassthrough => tls::auto_passthrough_chains(push, proxy)
                    .into_iter()
                    .map(|chain| policy.guard_tcp(chain, &mut out.diagnostics))
                    .collect(),
                _ => {
                    let Some(socket) = tls::downstream_transport(
                        push,
                        proxy,
                        bound,
                        mode,
                        &mut out.diagnostics,
                        &mut out.secrets,
                    ) else {
                        continue;
                    };
                    let route_name = bound.https_route_name();
                    out.routes.push(route_configuration(
                        push,
                        proxy,
                        &route_name,
                        &[bound],
                        &mut out.diagnostics,
                    ));
                    vec![FilterChain {
                        name: route_name.clone(),
                        filter_chain_match: Some(FilterChainMatch {
                            server_names: sni_names(bound.server),
                            transport_protocol: "tls".into(),
                            ..Default::default()
                        }),
                        filters: vec![http_connection_manager(
                            &format!("outbound_0.0.0.0_{bind}"),
                            rds(&route_name),
                            true,
                            &policy.http,
                        )],
                        transport_socket: Some(socket),
                        ..Default::default()
                    }]
                }
            };
            for chain in chains {
                listener.add(chain, &bound.resource(), &mut out.diagnostics);
            }
        }
        if let Some(l) = listener.finish() {
            out.listeners.push(l);
        }
    }
}

/// A TCP (or TLS-terminating) server's chain: the first VirtualService
/// `tcp:` route bound to its Gateway and port, forwarding to its
/// destinations by weight.
fn tcp_chain(
    push: &PushContext,
    proxy: &Proxy,
    bound: &BoundServer<'_>,
    out: &mut Generated,
) -> Option<FilterChain> {
    let gw = bound.gateway;
    for vs in push.virtual_services.iter().filter(|vs| binds(vs, gw)) {
        for (i, rule) in vs.spec.tcp.iter().enumerate() {
            let applies = rule.matches.is_empty()
                || rule.matches.iter().any(|m| {
                    let gw_ok = m.gateways.is_empty()
                        || m.gateways.iter().any(|g| {
                            resolve_gateway_ref(g, vs.namespace())
                                == Some((gw.namespace().to_string(), gw.name().to_string()))
                        });
                    gw_ok && m.port.is_none_or(|p| p == u32::from(bound.port))
                });
            if !applies {
                continue;
            }
            let clusters = super::route::l4_clusters(
                push,
                vs,
                &format!("spec.tcp[{i}]"),
                &rule.route,
                &mut out.diagnostics,
            );
            let tunnel = super::cluster::tunnel(push, proxy, &clusters);
            let mut chain = tls::tcp_chain(clusters, tunnel)?;
            if let ServerKind::TlsTcp(mode) = bound.kind {
                chain.transport_socket = tls::downstream_transport(
                    push,
                    proxy,
                    bound,
                    mode,
                    &mut out.diagnostics,
                    &mut out.secrets,
                );
                chain.transport_socket.as_ref()?;
                chain.filter_chain_match = Some(FilterChainMatch {
                    server_names: sni_names(bound.server),
                    transport_protocol: "tls".into(),
                    ..Default::default()
                });
            }
            chain.name = format!("tcp.{}.{}.{}", bound.port, gw.name(), gw.namespace());
            return Some(chain);
        }
    }
    out.diagnostics.push(Diagnostic {
        resource: bound.resource(),
        field: format!("spec.servers[{}]", bound.index),
        message: "no VirtualService tcp route is bound to this server; it is left out".into(),
    });
    None
}

/// SNI names of a server: its hosts without the namespace part; none when
/// a host is `*` (then any SNI, or none, matches).
fn sni_names(server: &Server) -> Vec<String> {
    let hosts: Vec<&str> = server
        .hosts
        .iter()
        .map(|h| h.split_once('/').map_or(h.as_str(), |(_, host)| host))
        .collect();
    if hosts.contains(&"*") {
        return Vec::new();
    }
    let mut names: Vec<String> = hosts.into_iter().map(str::to_string).collect();
    names.sort();
    names.dedup();
    names
}

/// A listener in the making: filter chains with distinct matches.
struct ListenerBuild {
    bind: u16,
    chains: Vec<FilterChain>,
}

impl ListenerBuild {
    fn new(bind: u16) -> ListenerBuild {
        ListenerBuild {
            bind,
            chains: Vec::new(),
        }
    }

    /// Adds a chain unless one with the same match is there: Envoy would
    /// reject the whole listener, so the later one is left out.
    fn add(&mut self, chain: FilterChain, resource: &str, diags: &mut Vec<Diagnostic>) {
        if let Some(same) = self
            .chains
            .iter()
            .find(|c| c.filter_chain_match == chain.filter_chain_match)
        {
            let names = chain
                .filter_chain_match
                .as_ref()
                .map(|m| m.server_names.join(","))
                .unwrap_or_default();
            diags.push(Diagnostic {
                resource: resource.to_string(),
                field: "spec.servers".into(),
                message: format!(
                    "port {} already has a filter chain ({}) for SNI [{names}]; {} is left out",
                    self.bind, same.name, chain.name
                ),
            });
            return;
        }
        self.chains.push(chain);
    }

    fn finish(self) -> Option<Listener> {
        if self.chains.is_empty() {
            return None;
        }
        let tls = self.chains.iter().any(|c| c.filter_chain_match.is_some());
        let listener_filters = if tls {
            vec![ListenerFilter {
                name: "envoy.filters.listener.tls_inspector".into(),
                config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
                    TlsInspector::default(),
                ))),
                ..Default::default()
            }]
        } else {
            Vec::new()
        };
        Some(Listener {
            name: format!("0.0.0.0_{}", self.bind),
            address: Some(socket("0.0.0.0", self.bind)),
            filter_chains: self.chains,
            listener_filters,
            ..Default::default()
        })
    }
}

/// The port the listener binds: the targetPort that a Service fronting the
/// gateway workload maps the server port to, as Istio does; else the port.
fn bind_port(push: &PushContext, proxy: &Proxy, port: u16, out: &mut Generated) -> u16 {
    for svc in push.services_selecting(proxy) {
        if let Some(sp) = svc.port(port) {
            match sp.target_number() {
                Some(target) => return target,
                None => out.diagnostics.push(Diagnostic {
                    resource: format!("Service {}/{}", svc.namespace, svc.name),
                    field: format!("spec.ports[port={port}].targetPort"),
                    message: format!(
                        "named targetPort {:?} cannot be resolved for a gateway; binding port {port}",
                        sp.target_port.as_deref().unwrap_or_default()
                    ),
                }),
            }
        }
    }
    port
}

/// One virtual host in the making.
#[derive(Default)]
struct VhostBuild {
    port: u16,
    routes: Vec<Route>,
    /// VirtualServices already merged in (a VS host may meet several servers).
    merged: BTreeSet<(String, String)>,
    https_redirect: bool,
    /// Whether every VirtualService merged in came from a Gateway API
    /// route, whose rules take the Gateway API's precedence.
    gateway_api: Option<bool>,
}

fn route_configuration(
    push: &PushContext,
    proxy: &Proxy,
    name: &str,
    servers: &[&BoundServer<'_>],
    diags: &mut Vec<Diagnostic>,
) -> RouteConfiguration {
    let mut vhosts: BTreeMap<String, VhostBuild> = BTreeMap::new();
    for bound in servers {
        let gw = bound.gateway;
        let redirect =
            bound.kind == ServerKind::Http && bound.server.tls.as_ref().is_some_and(|t| t.https_redirect);
        for vs in push.virtual_services.iter().filter(|vs| binds(vs, gw)) {
            for vs_host in &vs.spec.hosts {
                for server_host in &bound.server.hosts {
                    let Some(host) = intersect(vs, vs_host, gw, server_host) else {
                        continue;
                    };
                    let vhost = vhosts.entry(host).or_default();
                    vhost.port = bound.port;
                    vhost.https_redirect |= redirect;
                    let key = (vs.namespace().to_string(), vs.name().to_string());
                    if vhost.merged.insert(key) {
                        let scope = RouteScope {
                            gateway: Some((gw.namespace(), gw.name())),
                            port: bound.port,
                            proxy_namespace: &proxy.namespace,
                            proxy_labels: &proxy.labels,
                        };
                        vhost.routes.extend(http_routes(push, vs, &scope, diags));
                        let converted = super::route::gateway_semantics(vs);
                        vhost.gateway_api = Some(vhost.gateway_api.unwrap_or(true) && converted);
                    }
                }
            }
        }
        if bound.server.hosts.is_empty() {
            diags.push(Diagnostic {
                resource: format!("Gateway {}/{}", gw.namespace(), gw.name()),
                field: format!("spec.servers[{}].hosts", bound.index),
                message: "no hosts".into(),
            });
        }
    }
    let virtual_hosts = vhosts
        .into_iter()
        .map(|(host, mut v)| {
            if v.gateway_api == Some(true) {
                super::route::sort_by_gateway_precedence(&mut v.routes);
            }
            let domains = if host == "*" {
                vec!["*".to_string()]
            } else {
                vec![host.clone(), format!("{host}:*")]
            };
            VirtualHost {
                name: format!("{host}:{}", v.port),
                domains,
                routes: v.routes,
                require_tls: if v.https_redirect {
                    virtual_host::TlsRequirementType::All as i32
                } else {
                    virtual_host::TlsRequirementType::None as i32
                },
                ..Default::default()
            }
        })
        .collect();
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts,
        // Istio validates clusters itself; Envoy's check would reject a whole
        // route table for one missing destination.
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

/// Whether the VirtualService names this Gateway in `gateways:`, resolved as
/// Istio resolves it: `NAME` is in the VirtualService's namespace,
/// `NS/NAME` is qualified, and the old `NAME.NS.svc.cluster.local` form works.
pub fn binds(vs: &VirtualService, gw: &Gateway) -> bool {
    vs.spec.gateways.iter().any(|r| {
        resolve_gateway_ref(r, vs.namespace()) == Some((gw.namespace().to_string(), gw.name().to_string()))
    })
}

/// `(namespace, name)` of a gateway reference; `None` for `mesh`.
pub fn resolve_gateway_ref(reference: &str, vs_namespace: &str) -> Option<(String, String)> {
    if reference == "mesh" {
        return None;
    }
    if let Some((ns, name)) = reference.split_once('/') {
        return Some((ns.to_string(), name.to_string()));
    }
    let mut labels = reference.split('.');
    match (labels.next(), labels.next()) {
        (Some(name), Some(ns)) => Some((ns.to_string(), name.to_string())),
        _ => Some((vs_namespace.to_string(), reference.to_string())),
    }
}

/// The host a virtual host serves when VirtualService host `vs_host` meets
/// Gateway server host `server_host` (`[NS/]HOST`): the more specific of the
/// two, or `None` when they do not overlap or the namespace part excludes
/// the VirtualService.
pub fn intersect(vs: &VirtualService, vs_host: &str, gw: &Gateway, server_host: &str) -> Option<String> {
    let (ns, host) = server_host.split_once('/').unwrap_or(("*", server_host));
    let ns_ok = match ns {
        "*" => true,
        "." => vs.namespace() == gw.namespace(),
        ns => vs.namespace() == ns,
    };
    if !ns_ok {
        return None;
    }
    if covers(host, vs_host) {
        Some(vs_host.to_string())
    } else if covers(vs_host, host) {
        Some(host.to_string())
    } else {
        None
    }
}

/// Whether every name `inner` matches is matched by `outer`.
fn covers(outer: &str, inner: &str) -> bool {
    if outer == "*" || outer == inner {
        return true;
    }
    match outer.strip_prefix('*') {
        // "*.foo.com" covers "a.foo.com" and "*.a.foo.com".
        Some(suffix) => inner.trim_start_matches('*').ends_with(suffix) && inner.len() > suffix.len(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_references_resolve_as_istio_does() {
        assert_eq!(
            resolve_gateway_ref("ingressgateway", "default"),
            Some(("default".into(), "ingressgateway".into()))
        );
        assert_eq!(
            resolve_gateway_ref("istio-system/ingressgateway", "default"),
            Some(("istio-system".into(), "ingressgateway".into()))
        );
        assert_eq!(
            resolve_gateway_ref("ingressgateway.istio-system.svc.cluster.local", "default"),
            Some(("istio-system".into(), "ingressgateway".into()))
        );
        assert_eq!(resolve_gateway_ref("mesh", "default"), None);
    }

    #[test]
    fn host_coverage() {
        assert!(covers("*", "a.b.com"));
        assert!(covers("*.b.com", "a.b.com"));
        assert!(covers("*.b.com", "*.a.b.com"));
        assert!(!covers("*.b.com", "b.com"));
        assert!(!covers("a.b.com", "*.b.com"));
        assert!(!covers("a.b.com", "c.b.com"));
    }
}
