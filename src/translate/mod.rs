//! translate: pure functions from (push context, proxy) to Envoy resources.
//!
//! No I/O, no clock, no randomness, no logging: the same inputs give the
//! same resources, sorted by name, so goldens are stable and proxies with the
//! same config key can share one result. What cannot be honoured becomes a
//! `Diagnostic` next to the resources (best effort, as Envoy Gateway does);
//! encoding, versioning and sending are left to `xds`, but for the default
//! virtual hosts `listeners_with` takes from a `VirtualHostCache`, which
//! are encoded once so that every config key's route table shares them.

mod cluster;
mod gateway;
mod locality;

pub use cluster::{ClusterKey, ClusterObjects, ServiceClusters};
pub use gateway::{intersect as gateway_host_intersect, resolve_gateway_ref};
pub use sidecar::VirtualHostCache;
mod policy;
mod route;
mod route_policy;
mod security;
mod sidecar;
pub mod simulate;
mod tls;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source, socket_address, Address, AggregatedConfigSource, ApiVersion, ConfigSource,
    SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::Cors;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::{BoolValue, Duration};
use envoy_types::util::pack_any;
use serde::Serialize;

use crate::model::sidecar_scope::SidecarScope;
use crate::model::{Proxy, PushContext, Role};

/// Something in the config that translation could not honour, said in terms
/// of the resource and field the user wrote.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Diagnostic {
    /// `VirtualService default/helloworld`.
    pub resource: String,
    /// `spec.http[0].route[0].destination.host`.
    pub field: String,
    pub message: String,
}

/// Everything one proxy is owed, each list sorted by resource name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generated {
    pub clusters: Vec<Cluster>,
    pub endpoints: Vec<ClusterLoadAssignment>,
    pub listeners: Vec<Listener>,
    pub routes: Vec<RouteConfiguration>,
    /// SDS Secrets the listeners name, in the proxy's own namespace only.
    pub secrets: Vec<Secret>,
    pub diagnostics: Vec<Diagnostic>,
    /// Route tables some of whose virtual hosts came already encoded, from
    /// a `VirtualHostCache` (`listeners_with`): by table name, each such
    /// host's encoded `VirtualHost` and its position in the table. The
    /// table's `virtual_hosts` holds the others, in order.
    pub encoded_vhosts: BTreeMap<String, Vec<(usize, bytes::Bytes)>>,
}

/// What a proxy's translation depends on: proxies with equal keys in one
/// push context get the same resources, so they share one translated and
/// encoded set. Replicas of a workload share: a sidecar's inbound side
/// depends on the ports its workload serves (found through its IP) and
/// its Pod's labels, not on the IP itself, unless a listener binds the IP
/// (no capture, with ingress listeners) or forwards to it (an ingress
/// `defaultEndpoint` of `0.0.0.0:PORT`).
pub fn config_key(push: &PushContext, proxy: &Proxy) -> String {
    if proxy.role == Role::Router {
        return proxy.config_key();
    }
    // Only the labels something selects sidecars by.
    let relevant = |k: &str| push.sidecar_label_keys.contains(k);
    // Computed at every push of every stream: written into one buffer.
    let mut key = proxy.config_key_with(relevant);
    if let Some(pod) = push.pods.get(&proxy.ip) {
        key.push_str("|pod:");
        crate::model::write_labels(&mut key, &pod.labels, relevant);
    }
    key.push_str("|ports:");
    for (i, (p, http)) in sidecar::workload_ports(push, proxy).enumerate() {
        let sep = if i > 0 { "," } else { "" };
        let _ = write!(key, "{sep}{p}{}", if http { "h" } else { "t" });
    }
    let scope = SidecarScope::of(push, proxy);
    let binds_ip = !scope.ingress.is_empty()
        && (proxy.capture_none
            || scope.ingress.iter().any(|l| {
                l.default_endpoint.starts_with("0.0.0.0:") || l.capture_mode.as_deref() == Some("NONE")
            }));
    if binds_ip {
        let _ = write!(key, "|ip:{}", proxy.ip);
    }
    key
}

/// Translates the push context for one proxy: `outbound` and `listeners`
/// together.
pub fn generate(push: &PushContext, proxy: &Proxy) -> Generated {
    combine(outbound(push, proxy), listeners(push, proxy))
}

/// One proxy's whole translation from its two halves.
pub fn combine(mut out: Generated, rest: Generated) -> Generated {
    out.clusters.extend(rest.clusters);
    out.endpoints.extend(rest.endpoints);
    out.listeners.extend(rest.listeners);
    out.routes.extend(rest.routes);
    out.secrets.extend(rest.secrets);
    out.diagnostics.extend(rest.diagnostics);
    out.encoded_vhosts.extend(rest.encoded_vhosts);
    finish(&mut out);
    out
}

/// The outbound clusters and their endpoints, one per service port (and
/// subset) the proxy may reach, the Secrets they name (DestinationRule
/// `credentialName`), and what their translation could not honour. They do
/// not depend on VirtualServices.
pub fn outbound(push: &PushContext, proxy: &Proxy) -> Generated {
    let mut out = Generated::default();
    cluster::outbound(push, proxy, &scope_of(push, proxy), &mut out);
    finish(&mut out);
    out
}

/// The services whose clusters `outbound` translates for a proxy, each
/// with what its clusters depend on (`ServiceClusters::key`), so that
/// config keys can share them: `outbound` is each of these translated,
/// then `outbound_rest`.
pub fn outbound_services<'a>(push: &'a PushContext, proxy: &'a Proxy) -> Vec<ServiceClusters<'a>> {
    cluster::services(push, proxy, &scope_of(push, proxy), None)
}

/// What `outbound` adds to the services' translations (`BlackHoleCluster`),
/// everything then put in order.
pub fn outbound_rest(out: &mut Generated) {
    out.clusters.push(cluster::blackhole());
    finish(out);
}

/// Everything else: listeners, routes and the secrets they name, and the
/// clusters they alone need (inbound, passthrough, policy services).
pub fn listeners(push: &PushContext, proxy: &Proxy) -> Generated {
    listeners_with(push, proxy, None)
}

/// `listeners`, with the virtual hosts of services no VirtualService
/// routes taken from `cache` already encoded (`Generated::encoded_vhosts`)
/// rather than built for every config key: a sidecar that sees a thousand
/// services has a thousand of them in one route table.
pub fn listeners_with(push: &PushContext, proxy: &Proxy, cache: Option<&VirtualHostCache>) -> Generated {
    let mut out = Generated::default();
    let scope = scope_of(push, proxy);
    match proxy.role {
        Role::Router => gateway::build(push, proxy, &mut out),
        Role::Sidecar => sidecar::build(push, proxy, &scope, cache, &mut out),
    }
    finish(&mut out);
    out
}

fn scope_of(push: &PushContext, proxy: &Proxy) -> SidecarScope {
    match proxy.role {
        Role::Sidecar => SidecarScope::of(push, proxy),
        Role::Router => SidecarScope::default(),
    }
}

/// Sorts each list by name; of two same-named secrets the first stays.
fn finish(out: &mut Generated) {
    out.clusters.sort_by(|a, b| a.name.cmp(&b.name));
    out.endpoints.sort_by(|a, b| a.cluster_name.cmp(&b.cluster_name));
    out.listeners.sort_by(|a, b| a.name.cmp(&b.name));
    out.routes.sort_by(|a, b| a.name.cmp(&b.name));
    out.secrets.sort_by(|a, b| a.name.cmp(&b.name));
    out.secrets.dedup_by(|a, b| a.name == b.name);
    out.diagnostics.sort();
    out.diagnostics.dedup();
}

/// The ClusterLoadAssignments a proxy gets for the services `hosts`
/// (those it may reach): what an endpoint-only change alters.
pub fn endpoints_of(
    push: &PushContext,
    proxy: &Proxy,
    hosts: &std::collections::BTreeSet<String>,
) -> Vec<ClusterLoadAssignment> {
    let mut out = Generated::default();
    cluster::outbound_of(push, proxy, &scope_of(push, proxy), Some(hosts), &mut out);
    out.endpoints
}

/// Istio's outbound cluster name: `outbound|PORT|SUBSET|HOST`.
pub fn outbound_cluster_name(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// The port, subset and host an outbound cluster name holds
/// (`outbound_cluster_name` read back); `None` for other clusters.
fn outbound_cluster_parts(name: &str) -> Option<(&str, &str, &str)> {
    let mut parts = name.splitn(4, '|');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("outbound"), Some(port), Some(subset), Some(host)) => Some((port, subset, host)),
        _ => None,
    }
}

/// A config source that points back at the ADS stream the proxy is on.
fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        // Zero: wait for the control plane as long as it takes, as Istio does,
        // rather than start a listener or cluster without its routes/endpoints.
        initial_fetch_timeout: Some(Duration { seconds: 0, nanos: 0 }),
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource::default(),
        )),
        ..Default::default()
    }
}

/// An HTTP connection manager with the router filter, after `policy` (the
/// request policies' filters, which run first). `edge`: trust the peer
/// address rather than X-Forwarded-For (gateways).
fn http_connection_manager(
    stat_prefix: &str,
    routes: http_connection_manager::RouteSpecifier,
    edge: bool,
    policy: &[HttpFilter],
) -> Filter {
    let hcm = HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(routes),
        http_filters: policy
            .iter()
            .cloned()
            .chain([
                // Acts only on routes that carry a fault (typed_per_filter_config).
                HttpFilter {
                    name: route_policy::FAULT_FILTER.into(),
                    config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                        HttpFault::default(),
                    ))),
                    ..Default::default()
                },
                HttpFilter {
                    name: "envoy.filters.http.cors".into(),
                    config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Cors::default()))),
                    ..Default::default()
                },
                HttpFilter {
                    name: "envoy.filters.http.router".into(),
                    config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Router::default()))),
                    ..Default::default()
                },
            ])
            .collect(),
        use_remote_address: edge.then_some(BoolValue { value: true }),
        local_reply_config: policy
            .iter()
            .any(|f| f.name == security::JWT_FILTER)
            .then(security::local_reply),
        server_name: "istio-envoy".into(),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
    }
}

/// Routes from RDS, on the ADS stream.
fn rds(route_name: &str) -> http_connection_manager::RouteSpecifier {
    http_connection_manager::RouteSpecifier::Rds(Rds {
        config_source: Some(ads()),
        route_config_name: route_name.to_string(),
    })
}

/// A TCP proxy to one cluster, through a tunnel when one is given
/// (`cluster::tunnel`).
fn tcp_proxy(stat_prefix: &str, cluster: &str, tunnel: Option<tcp_proxy::TunnelingConfig>) -> Filter {
    let proxy = TcpProxy {
        stat_prefix: stat_prefix.to_string(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
        tunneling_config: tunnel,
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(proxy))),
    }
}

fn socket(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

fn duration(d: std::time::Duration) -> Duration {
    Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::{parse_file, ConfigSnapshot};

    const MESH: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
        spec:\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\n\
        apiVersion: v1\nkind: Endpoints\nmetadata: {name: web, namespace: shop}\nsubsets:\n\
        - addresses: [{ip: 10.0.0.1}, {ip: 10.0.0.2}]\n  ports: [{name: http, port: 8080}]\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: admin, namespace: shop}\n\
        spec:\n  ports: [{name: tcp, port: 9000}]\n---\n\
        apiVersion: v1\nkind: Endpoints\nmetadata: {name: admin, namespace: shop}\nsubsets:\n\
        - addresses: [{ip: 10.0.0.3}]\n  ports: [{name: tcp, port: 9000}]\n";

    fn sidecar(ip: &str, pod: &str, meta: serde_json::Value) -> Proxy {
        let id = format!("sidecar~{ip}~{pod}.shop~shop.svc.cluster.local");
        Proxy::parse(&id, meta.as_object().expect("object")).expect("proxy")
    }

    #[test]
    fn a_tunnel_is_the_destination_rules_and_a_subsets_own_comes_first() {
        let dr = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
            metadata: {name: admin, namespace: shop}\nspec:\n  host: admin\n\
            \x20 trafficPolicy: {tunnel: {targetHost: db.example.com, targetPort: 5432}}\n\
            \x20 subsets:\n\
            \x20 - {name: v2, labels: {v: '2'}, trafficPolicy: {tunnel: {protocol: POST, targetHost: '2001:db8::1', targetPort: 443}}}\n\
            \x20 - {name: v3, labels: {v: '3'}}\n";
        let snapshot = ConfigSnapshot::from_files(vec![parse_file("m.yaml", &format!("{MESH}{dr}"))]);
        assert!(snapshot.rejections.is_empty(), "{:?}", snapshot.rejections);
        let push = PushContext::new(Arc::new(snapshot));
        let proxy = sidecar("10.0.0.9", "client", serde_json::json!({}));
        let host = "admin.shop.svc.cluster.local";
        let tunnel = |clusters: &[(String, u32)]| {
            cluster::tunnel(&push, &proxy, clusters).map(|t| (t.hostname, t.use_post))
        };
        let one = |subset: &str| vec![(outbound_cluster_name(9000, subset, host), 1)];
        assert_eq!(tunnel(&one("")), Some(("db.example.com:5432".to_string(), false)));
        assert_eq!(tunnel(&one("v2")), Some(("[2001:db8::1]:443".to_string(), true)));
        assert_eq!(
            tunnel(&one("v3")),
            Some(("db.example.com:5432".to_string(), false))
        );
        // Split between clusters, as Istio has it: no tunnel.
        let split = [one("v2"), one("v3")].concat();
        assert_eq!(tunnel(&split), None);
        let web = vec![(outbound_cluster_name(80, "", "web.shop.svc.cluster.local"), 1)];
        assert_eq!(tunnel(&web), None);
    }

    #[test]
    fn an_auto_passthrough_gateway_gets_sni_dnat_twins_without_tls() {
        let gateway = |mode: &str| {
            format!(
                "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ew, namespace: istio-system}}\n\
                 spec: {{selector: {{istio: eastwestgateway}}, servers: [{{port: {{number: 15443, name: tls, protocol: TLS}}, \
                 tls: {{mode: {mode}}}, hosts: ['*.local']}}]}}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: admin, namespace: shop}}\n\
                 spec: {{host: admin, trafficPolicy: {{tls: {{mode: SIMPLE}}}}, subsets: [{{name: v2, labels: {{v: '2'}}}}]}}\n"
            )
        };
        let router = Proxy::parse(
            "router~10.0.0.7~ew-1.istio-system~istio-system.svc.cluster.local",
            serde_json::json!({"LABELS": {"istio": "eastwestgateway"}})
                .as_object()
                .expect("object"),
        )
        .expect("proxy");
        let clusters_of = |mode: &str| {
            let snapshot =
                ConfigSnapshot::from_files(vec![parse_file("m.yaml", &format!("{MESH}{}", gateway(mode)))]);
            assert!(snapshot.rejections.is_empty(), "{:?}", snapshot.rejections);
            outbound(&PushContext::new(Arc::new(snapshot)), &router)
        };
        let out = clusters_of("AUTO_PASSTHROUGH");
        let cluster = |name: &str| out.clusters.iter().find(|c| c.name == name);
        let original =
            cluster("outbound|9000|v2|admin.shop.svc.cluster.local").expect("the subset's cluster");
        assert!(original.transport_socket.is_some(), "the rule's TLS");
        // The subset's twin selects as the subset does: no Pod is v2.
        for (twin, count) in [
            ("outbound_.9000_._.admin.shop.svc.cluster.local", 1),
            ("outbound_.9000_.v2_.admin.shop.svc.cluster.local", 0),
        ] {
            let c = cluster(twin).expect(twin);
            assert!(
                c.transport_socket.is_none() && c.transport_socket_matches.is_empty(),
                "{twin}"
            );
            assert_eq!(
                c.eds_cluster_config.as_ref().map(|e| e.service_name.as_str()),
                Some(twin)
            );
            let endpoints = out
                .endpoints
                .iter()
                .find(|e| e.cluster_name == twin)
                .expect("its endpoints");
            assert_eq!(
                endpoints
                    .endpoints
                    .iter()
                    .map(|l| l.lb_endpoints.len())
                    .sum::<usize>(),
                count
            );
        }
        // Another TLS mode: no twins.
        let out = clusters_of("PASSTHROUGH");
        assert!(!out.clusters.iter().any(|c| c.name.starts_with("outbound_.")));
    }

    #[test]
    fn replicas_share_a_config_key_and_workloads_with_other_ports_do_not() {
        let push = PushContext::new(Arc::new(ConfigSnapshot::from_files(vec![parse_file(
            "m.yaml", MESH,
        )])));
        let labels = serde_json::json!({"LABELS": {"app": "web"}});
        let a = config_key(&push, &sidecar("10.0.0.1", "web-a", labels.clone()));
        let b = config_key(&push, &sidecar("10.0.0.2", "web-b", labels.clone()));
        let other = config_key(&push, &sidecar("10.0.0.3", "web-c", labels));
        assert_eq!(a, b, "replicas serving the same ports share");
        assert_ne!(
            a, other,
            "a workload serving other ports gets its own inbound side"
        );
        // Sharing is sound: the shared resources name no replica's address.
        let shared = generate(&push, &sidecar("10.0.0.1", "web-a", serde_json::json!({})));
        let text = format!("{:?}{:?}", shared.clusters, shared.listeners);
        assert!(!text.contains("10.0.0.1"), "{text}");
        let none = serde_json::json!({"LABELS": {"app": "web"}, "INTERCEPTION_MODE": "NONE"});
        assert_eq!(
            config_key(&push, &sidecar("10.0.0.1", "web-a", none.clone())),
            config_key(&push, &sidecar("10.0.0.2", "web-b", none)),
            "without ingress listeners nothing binds the IP"
        );
    }
}
