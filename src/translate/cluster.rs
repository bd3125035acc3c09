//! Outbound clusters (`outbound|PORT||HOST`, EDS) and their
//! ClusterLoadAssignments, one per service port; with auto mTLS, as Istio
//! does it: endpoints whose Pod is in the mesh carry `tlsMode: istio`
//! metadata, and the cluster's transport socket match sends them Istio
//! mutual TLS (the proxy's `default` certificate, the peer checked against
//! `ROOTCA` and its SPIFFE identity) and everything else plain text.
//! Also the special clusters sidecars need.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{common_lb_config, CommonLbConfig};
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{proxy_protocol_config, ProxyProtocolConfig};
use envoy_types::pb::envoy::config::core::v3::{
    transport_socket, Address, BindConfig, Metadata, SocketAddress, TransportSocket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::TunnelingConfig;
use envoy_types::pb::envoy::extensions::transport_sockets::proxy_protocol::v3::ProxyProtocolUpstreamTransport;
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
use envoy_types::pb::google::protobuf::{value, Struct, Value};
use envoy_types::util::pack_any;

use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, CertificateValidationContext, CommonTlsContext, TlsCertificate,
};

use super::locality::{self, LocalityPolicy};
use super::policy;
use super::tls::{credential_secrets, istio_common_tls_context, san_matchers, sds};
use super::{ads, duration, outbound_cluster_name, socket, Diagnostic, Generated};
use crate::config::istio::{ClientTlsSettings, ProxyProtocol, Subset};
use crate::config::DestinationRule;
use crate::model::sidecar_scope::SidecarScope;
use crate::model::{is_subset, MeshService, Proxy, PushContext, Resolution, ServicePort};

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
/// A DestinationRule's `tls` decides how a cluster talks to its endpoints;
/// without one, a proxy with a workload certificate uses auto mTLS.
pub fn outbound(push: &PushContext, proxy: &Proxy, scope: &SidecarScope, out: &mut Generated) {
    out.clusters.push(blackhole());
    outbound_of(push, proxy, scope, None, out);
}

/// The outbound clusters and endpoints of the services the proxy may
/// reach; of those named by `only` when given.
pub fn outbound_of(
    push: &PushContext,
    proxy: &Proxy,
    scope: &SidecarScope,
    only: Option<&BTreeSet<String>>,
    out: &mut Generated,
) {
    for s in services(push, proxy, scope, only) {
        s.translate(push, out);
    }
}

/// What a proxy's outbound clusters of a service read of the proxy: its
/// locality and whether it has a workload certificate; its namespace only
/// when the DestinationRule that applies names a `credentialName` (whose
/// Secrets are the proxy's namespace's), and its labels only when the rule
/// ranks endpoints by `failoverPriority`. Nothing else of the proxy reaches
/// `ServiceClusters::translate`.
#[derive(Debug, Clone, Copy)]
pub struct ClusterView<'a> {
    pub locality: &'a str,
    pub identity: bool,
    pub namespace: Option<&'a str>,
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// A gateway with an AUTO_PASSTHROUGH server: each cluster also gets
    /// its SNI-DNAT twin (`sni_dnat_name`), which passes the client's own
    /// mutual TLS through.
    pub sni_dnat: bool,
}

/// One service as a proxy's outbound clusters take it: the service, the
/// DestinationRule that applies to it for this proxy, and what of the
/// proxy they read.
#[derive(Debug, Clone, Copy)]
pub struct ServiceClusters<'a> {
    pub service: &'a MeshService,
    pub rule: Option<&'a DestinationRule>,
    pub view: ClusterView<'a>,
}

/// What a service's outbound clusters are a function of, besides the push
/// context the service and rule belong to (they are told apart by
/// address): within one push context, equal keys give equal clusters,
/// endpoints, Secrets and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterKey {
    service: usize,
    rule: usize,
    locality: String,
    identity: bool,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    sni_dnat: bool,
}

/// The services and DestinationRules of a push context, by address. A
/// `ClusterKey` made in an earlier push context whose service and rule are
/// both among them names the very objects it was made of (the earlier
/// context holds its objects while it lives, so an address both hold is one
/// object, shared by `PushContext::next`): the clusters it gave are the
/// ones it gives now, as long as nothing else they read changed (the trust
/// domain, the Secrets a rule's `credentialName` names).
pub struct ClusterObjects {
    services: HashSet<usize>,
    rules: HashSet<usize>,
}

impl ClusterObjects {
    pub fn of(push: &PushContext) -> ClusterObjects {
        ClusterObjects {
            services: push.services.values().map(|s| Arc::as_ptr(s) as usize).collect(),
            rules: push
                .destination_rules
                .iter()
                .map(|r| Arc::as_ptr(r) as usize)
                .collect(),
        }
    }

    /// Whether `key`'s service and rule are objects of this push context.
    pub fn hold(&self, key: &ClusterKey) -> bool {
        self.hold_objects(key.service, key.rule)
    }

    /// Whether a service and a rule (0: none), by address, are objects of
    /// this push context.
    pub fn hold_objects(&self, service: usize, rule: usize) -> bool {
        self.services.contains(&service) && (rule == 0 || self.rules.contains(&rule))
    }
}

/// The services a proxy may reach (those named by `only` when given),
/// each with what its clusters depend on.
pub fn services<'a>(
    push: &'a PushContext,
    proxy: &'a Proxy,
    scope: &SidecarScope,
    only: Option<&BTreeSet<String>>,
) -> Vec<ServiceClusters<'a>> {
    // Only some hosts (an endpoint change's): looked up, not every
    // service of the mesh walked. Either way in hostname order.
    let picked: Vec<&'a Arc<MeshService>> = match only {
        Some(hosts) => hosts.iter().filter_map(|h| push.services.get(h)).collect(),
        None => push.services.values().collect(),
    };
    let sni_dnat = proxy.role == crate::model::Role::Router
        && push.gateways_for(proxy).any(|gw| {
            gw.spec
                .servers
                .iter()
                .any(|s| s.tls.as_ref().and_then(|t| t.mode.as_deref()) == Some("AUTO_PASSTHROUGH"))
        });
    picked
        .into_iter()
        .filter(|s| scope.visible(s))
        .map(|service| {
            let rule = push.destination_rule(
                &proxy.namespace,
                &proxy.labels,
                &service.hostname,
                &service.namespace,
            );
            let settings = || rule.into_iter().flat_map(policy::settings);
            let credentials = settings().any(|(_, tls)| tls.is_some_and(|t| t.credential_name.is_some()));
            let ranked = settings().any(|(lb, _)| {
                lb.and_then(|l| l.locality_lb_setting.as_ref())
                    .is_some_and(|l| !l.failover_priority.is_empty())
            });
            ServiceClusters {
                service,
                rule,
                view: ClusterView {
                    locality: &proxy.locality,
                    identity: proxy.identity.is_some(),
                    namespace: credentials.then_some(proxy.namespace.as_str()),
                    labels: ranked.then_some(&proxy.labels),
                    sni_dnat,
                },
            }
        })
        .collect()
}

impl ServiceClusters<'_> {
    /// What the clusters depend on (see `ClusterKey`).
    pub fn key(&self) -> ClusterKey {
        ClusterKey {
            service: std::ptr::from_ref(self.service) as usize,
            rule: self.rule.map_or(0, |r| std::ptr::from_ref(r) as usize),
            locality: self.view.locality.to_string(),
            identity: self.view.identity,
            namespace: self.view.namespace.map(str::to_string),
            labels: self.view.labels.cloned(),
            sni_dnat: self.view.sni_dnat,
        }
    }

    /// The service's clusters (one per TCP port and subset) and their
    /// endpoints, the Secrets they name and what could not be honoured.
    pub fn translate(&self, push: &PushContext, out: &mut Generated) {
        let (svc, dr, view) = (self.service, self.rule, self.view);
        let mesh_locality = locality::mesh_default();
        let subsets =
            std::iter::once(None).chain(dr.into_iter().flat_map(|d| d.spec.subsets.iter().map(Some)));
        let subsets: Vec<Option<&Subset>> = subsets.collect();
        for port in &svc.ports {
            if !port.protocol.eq_ignore_ascii_case("TCP") {
                continue; // UDP/SCTP: Envoy proxies neither
            }
            for subset in &subsets {
                let name =
                    outbound_cluster_name(port.port, subset.map_or("", |s| s.name.as_str()), &svc.hostname);
                let policy = policy::effective(dr, *subset, port.port);
                let selected: Vec<&crate::model::Endpoint> = port
                    .endpoints
                    .iter()
                    .filter(|e| subset.is_none_or(|s| is_subset(&s.labels, &e.labels)))
                    .collect();
                let setting = policy.load_balancer.and_then(|l| l.locality_lb_setting.as_ref());
                if setting.is_some_and(|s| !s.failover.is_empty()) && policy.outlier_detection.is_none() {
                    out.diagnostics.push(Diagnostic {
                        resource: dr_name(dr),
                        field: "spec.trafficPolicy.loadBalancer.localityLbSetting.failover".into(),
                        message: format!(
                            "failover needs outlierDetection to see endpoints fail; {name} balances over all localities"
                        ),
                    });
                }
                let localities = LocalityPolicy {
                    proxy: view.locality,
                    proxy_labels: view.labels,
                    setting: setting.or(Some(&mesh_locality)),
                    outlier_detection: policy.outlier_detection.is_some(),
                };
                let (load_assignment, weighted) = assignment(&name, &selected, &localities);
                let dnat_assignment = view.sni_dnat.then(|| load_assignment.clone());
                let mut cluster = match svc.resolution {
                    Resolution::Endpoints => {
                        out.endpoints.push(load_assignment);
                        eds_cluster(&name)
                    }
                    Resolution::Dns | Resolution::DnsRoundRobin => {
                        dns_cluster(&name, svc.resolution, load_assignment)
                    }
                    Resolution::Passthrough => original_dst(&name),
                };
                if weighted {
                    cluster.common_lb_config = Some(CommonLbConfig {
                        locality_config_specifier: Some(
                            common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(
                                common_lb_config::LocalityWeightedLbConfig::default(),
                            ),
                        ),
                        ..Default::default()
                    });
                }
                policy::apply(&policy, &mut cluster, &dr_name(dr), &mut out.diagnostics);
                if let Some(endpoints) = dnat_assignment {
                    let dnat = sni_dnat(&cluster, sni_dnat_name(&name), endpoints, out);
                    out.clusters.push(dnat);
                }
                transport(push, view, svc, port, dr, policy.tls, &mut cluster, out);
                if port.is_http2() {
                    http2(&mut cluster);
                }
                let proxy_protocol = subset
                    .and_then(|s| s.traffic_policy.as_ref())
                    .and_then(|p| p.proxy_protocol.as_ref())
                    .or(dr
                        .and_then(|d| d.spec.traffic_policy.as_ref())
                        .and_then(|p| p.proxy_protocol.as_ref()));
                if let Some(pp) = proxy_protocol {
                    with_proxy_protocol(pp, &mut cluster, &dr_name(dr), &mut out.diagnostics);
                }
                out.clusters.push(cluster);
            }
        }
    }
}

/// The SNI-DNAT twin of cluster `outbound|PORT|SUBSET|HOST`, as Istio
/// names it: `outbound_.PORT_.SUBSET_.HOST` (`outbound_.PORT_._.HOST`
/// without a subset), the SNI a client in another network asks an
/// AUTO_PASSTHROUGH gateway for.
pub fn sni_dnat_name(cluster: &str) -> String {
    let (port, subset, host) = super::outbound_cluster_parts(cluster).unwrap_or_default();
    format!("outbound_.{port}_.{subset}_.{host}")
}

/// A cluster's SNI-DNAT twin, named `name`: the same endpoints (its own
/// copy of their assignment, so that endpoint changes reach it as they
/// reach the cluster) and policies, without a transport socket, for the
/// client's mutual TLS passes through the gateway untouched.
fn sni_dnat(
    cluster: &Cluster,
    name: String,
    mut endpoints: ClusterLoadAssignment,
    out: &mut Generated,
) -> Cluster {
    let mut dnat = cluster.clone();
    endpoints.cluster_name.clone_from(&name);
    match dnat.eds_cluster_config.as_mut() {
        Some(eds) => {
            eds.service_name.clone_from(&name);
            out.endpoints.push(endpoints);
        }
        None => {
            if let Some(inline) = dnat.load_assignment.as_mut() {
                inline.cluster_name.clone_from(&name);
            }
        }
    }
    dnat.name = name;
    dnat.transport_socket = None;
    dnat.transport_socket_matches.clear();
    dnat
}

/// Speaks HTTP/2 to the upstream (a gRPC service, an `http2` port).
pub(super) fn http2(cluster: &mut Cluster) {
    use envoy_types::pb::envoy::config::core::v3::Http2ProtocolOptions;
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
        explicit_http_config, ExplicitHttpConfig, UpstreamProtocolOptions,
    };
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                Http2ProtocolOptions::default(),
            )),
        })),
        ..Default::default()
    };
    cluster.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        pack_any(options),
    );
}

/// Speaks to the upstream in the protocol the downstream request came in:
/// an inbound HTTP port, which gRPC (HTTP/2) and HTTP/1.1 callers share.
fn downstream_protocol(cluster: &mut Cluster) {
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
        UpstreamProtocolOptions, UseDownstreamHttpConfig,
    };
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(
            UseDownstreamHttpConfig::default(),
        )),
        ..Default::default()
    };
    cluster.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        pack_any(options),
    );
}

/// How a cluster talks to its endpoints: the rule's `tls`, else auto mTLS
/// when the proxy has a workload certificate, else plain text.
#[allow(clippy::too_many_arguments)] // one cluster's whole context; splitting it would only hide that
fn transport(
    push: &PushContext,
    view: ClusterView<'_>,
    svc: &MeshService,
    port: &ServicePort,
    dr: Option<&DestinationRule>,
    tls: Option<&ClientTlsSettings>,
    cluster: &mut Cluster,
    out: &mut Generated,
) {
    let identity = view.identity;
    match tls {
        None if identity => cluster.transport_socket_matches = auto_mtls(push, svc, port),
        None => {}
        Some(tls) => match tls.mode.as_deref().unwrap_or("DISABLE") {
            "ISTIO_MUTUAL" if identity => {
                cluster.transport_socket = Some(tls_socket(istio_upstream(push, svc, port)));
            }
            "ISTIO_MUTUAL" => out.diagnostics.push(Diagnostic {
                resource: dr_name(dr),
                field: "spec.trafficPolicy.tls.mode".into(),
                message: format!(
                    "ISTIO_MUTUAL to {} needs this proxy's workload certificate, which it has not: plain text is used",
                    cluster.name
                ),
            }),
            "SIMPLE" | "MUTUAL" => {
                // The view has the namespace when the rule names a credential,
                // the only time `origination` reads it.
                let namespace = view.namespace.unwrap_or_default();
                cluster.transport_socket = origination(push, namespace, svc, tls, out).map(tls_socket);
            }
            _ => {} // DISABLE: plain text, even to mesh endpoints
        },
    }
}

/// The endpoints of a cluster in locality groups; `true` when the groups
/// carry weights.
fn assignment(
    name: &str,
    endpoints: &[&crate::model::Endpoint],
    localities: &LocalityPolicy<'_>,
) -> (ClusterLoadAssignment, bool) {
    let lb = |e: &crate::model::Endpoint| LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(socket(&e.ip, e.port)),
            ..Default::default()
        })),
        metadata: e.mesh.as_ref().map(|_| mesh_metadata()),
        ..Default::default()
    };
    let (groups, weighted) = locality::groups(endpoints, localities, lb);
    let assignment = ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: groups,
        ..Default::default()
    };
    (assignment, weighted)
}

fn dr_name(dr: Option<&DestinationRule>) -> String {
    dr.map(|d| format!("DestinationRule {}/{}", d.namespace(), d.name()))
        .unwrap_or_default()
}

/// The tunnel TCP to `clusters` goes through when it goes to one
/// cluster (`outbound|PORT|SUBSET|HOST`) whose DestinationRule, as the
/// proxy sees it, asks for one (`trafficPolicy.tunnel`, a subset's own
/// first), as Istio applies it: Envoy's TCP proxy then opens an HTTP
/// CONNECT (or POST) request for `targetHost:targetPort` to the cluster
/// and carries the connection inside it.
pub(super) fn tunnel(
    push: &PushContext,
    proxy: &Proxy,
    clusters: &[(String, u32)],
) -> Option<TunnelingConfig> {
    let [(cluster, _)] = clusters else { return None };
    let (_, subset, host) = super::outbound_cluster_parts(cluster)?;
    let svc = push.services.get(host)?;
    let dr = push.destination_rule(&proxy.namespace, &proxy.labels, host, &svc.namespace)?;
    let own = dr
        .spec
        .subsets
        .iter()
        .find(|s| !subset.is_empty() && s.name == subset)
        .and_then(|s| s.traffic_policy.as_ref())
        .and_then(|p| p.tunnel.as_ref());
    let t = own.or_else(|| dr.spec.traffic_policy.as_ref()?.tunnel.as_ref())?;
    Some(TunnelingConfig {
        hostname: if t.target_host.contains(':') {
            format!("[{}]:{}", t.target_host, t.target_port)
        } else {
            format!("{}:{}", t.target_host, t.target_port)
        },
        use_post: t.protocol.as_deref() == Some("POST"),
        ..Default::default()
    })
}

/// Wraps every transport socket of `cluster` (plain text where it has
/// none) so that a PROXY protocol header opens each upstream connection.
fn with_proxy_protocol(
    pp: &ProxyProtocol,
    cluster: &mut Cluster,
    resource: &str,
    diags: &mut Vec<Diagnostic>,
) {
    let version = match pp.version.as_deref().unwrap_or("V1") {
        "V1" => proxy_protocol_config::Version::V1,
        "V2" => proxy_protocol_config::Version::V2,
        other => {
            diags.push(Diagnostic {
                resource: resource.to_string(),
                field: "spec.trafficPolicy.proxyProtocol.version".into(),
                message: format!(
                    "{other:?} is neither V1 nor V2; no PROXY header is sent to {}",
                    cluster.name
                ),
            });
            return;
        }
    };
    let wrap = |inner: Option<TransportSocket>| TransportSocket {
        name: "envoy.transport_sockets.upstream_proxy_protocol".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(
            ProxyProtocolUpstreamTransport {
                config: Some(ProxyProtocolConfig {
                    version: version as i32,
                    ..Default::default()
                }),
                transport_socket: Some(inner.unwrap_or_else(raw_buffer)),
                ..Default::default()
            },
        ))),
    };
    for m in &mut cluster.transport_socket_matches {
        m.transport_socket = Some(wrap(m.transport_socket.take()));
    }
    if cluster.transport_socket_matches.is_empty() || cluster.transport_socket.is_some() {
        cluster.transport_socket = Some(wrap(cluster.transport_socket.take()));
    }
}

fn raw_buffer() -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.raw_buffer".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(
            RawBuffer::default(),
        ))),
    }
}

fn tls_socket(tls: UpstreamTlsContext) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(tls))),
    }
}

/// Istio mutual TLS to a service port's mesh endpoints.
fn istio_upstream(push: &PushContext, svc: &MeshService, port: &ServicePort) -> UpstreamTlsContext {
    let identities: BTreeSet<String> = port
        .endpoints
        .iter()
        .filter_map(|e| e.mesh.as_ref())
        .map(|(ns, sa)| push.spiffe(ns, sa))
        .collect();
    UpstreamTlsContext {
        common_tls_context: Some(istio_common_tls_context(
            identities.into_iter().collect(),
            Vec::new(),
        )),
        sni: format!("outbound_.{}_._.{}", port.port, svc.hostname),
        ..Default::default()
    }
}

/// The system's CA bundle, which SIMPLE/MUTUAL origination trusts when the
/// rule names no CA (as Istio verifies against the system roots).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// SIMPLE and MUTUAL: TLS originated to a (usually external) service.
fn origination(
    push: &PushContext,
    namespace: &str,
    svc: &MeshService,
    tls: &ClientTlsSettings,
    out: &mut Generated,
) -> Option<UpstreamTlsContext> {
    let file = |p: &str| {
        Some(DataSource {
            specifier: Some(data_source::Specifier::Filename(p.to_string())),
            ..Default::default()
        })
    };
    let mut common = CommonTlsContext::default();
    let mut validation = CertificateValidationContext {
        match_typed_subject_alt_names: tls
            .subject_alt_names
            .iter()
            .flat_map(|s| san_matchers(s))
            .collect(),
        ..Default::default()
    };
    if let Some(cred) = &tls.credential_name {
        // A Secret of the proxy's own namespace, as for gateways.
        let mut secrets = Vec::new();
        let mut diags = Vec::new();
        let names = credential_secrets(
            push,
            namespace,
            cred,
            tls.mode.as_deref() == Some("MUTUAL"),
            &mut secrets,
            &mut diags,
        );
        out.diagnostics
            .extend(diags.into_iter().map(|message| Diagnostic {
                resource: format!("DestinationRule for {}", svc.hostname),
                field: "spec.trafficPolicy.tls.credentialName".into(),
                message,
            }));
        let (cert, ca) = names?;
        out.secrets.append(&mut secrets);
        common
            .tls_certificate_sds_secret_configs
            .extend(cert.map(|n| sds(&n)));
        common.validation_context_type = Some(
            common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(validation),
                    validation_context_sds_secret_config: Some(sds(&ca)),
                    ..Default::default()
                },
            ),
        );
    } else {
        if let (Some(cert), Some(key)) = (&tls.client_certificate, &tls.private_key) {
            common.tls_certificates = vec![TlsCertificate {
                certificate_chain: file(cert),
                private_key: file(key),
                ..Default::default()
            }];
        }
        if tls.insecure_skip_verify != Some(true) {
            validation.trusted_ca = file(tls.ca_certificates.as_deref().unwrap_or(SYSTEM_ROOTS));
            common.validation_context_type = Some(
                common_tls_context::ValidationContextType::ValidationContext(validation),
            );
        }
    }
    Some(UpstreamTlsContext {
        common_tls_context: Some(common),
        sni: tls.sni.clone().unwrap_or_else(|| svc.hostname.clone()),
        ..Default::default()
    })
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
            transport_socket: Some(raw_buffer()),
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

/// A ServiceEntry with DNS resolution: Envoy resolves the endpoints'
/// names itself (IPv4, as Istio asks for).
fn dns_cluster(name: &str, resolution: Resolution, load_assignment: ClusterLoadAssignment) -> Cluster {
    let kind = if resolution == Resolution::DnsRoundRobin {
        cluster::DiscoveryType::LogicalDns
    } else {
        cluster::DiscoveryType::StrictDns
    };
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(kind as i32)),
        dns_lookup_family: cluster::DnsLookupFamily::V4Only as i32,
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        load_assignment: Some(load_assignment),
        ..Default::default()
    }
}

/// A cluster to wherever each connection was going (a ServiceEntry with
/// resolution NONE, the passthrough clusters, inbound clusters).
fn original_dst(name: &str) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        ..Default::default()
    }
}

pub(super) fn blackhole() -> Cluster {
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
    let mut inbound = original_dst(INBOUND_PASSTHROUGH);
    inbound.upstream_bind_config = bind_inbound_source();
    vec![original_dst(PASSTHROUGH), inbound]
}

/// `inbound|PORT||`: the app, at the address the captured connection was
/// going to (the workload's own), reached from 127.0.0.6; as Istio does,
/// so that replicas of one workload share the cluster.
pub fn inbound(port: u16, http: bool) -> Cluster {
    let mut cluster = original_dst(&format!("inbound|{port}||"));
    cluster.upstream_bind_config = bind_inbound_source();
    if http {
        downstream_protocol(&mut cluster);
    }
    cluster
}

/// `inbound|PORT||` to `address`; from 127.0.0.6 when traffic is captured
/// (so that the capture rules let the connection through).
pub fn inbound_to(port: u16, address: Address, captured: bool, http: bool) -> Cluster {
    let name = format!("inbound|{port}||");
    let mut cluster = Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        upstream_bind_config: if captured { bind_inbound_source() } else { None },
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name,
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(address),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    if http {
        downstream_protocol(&mut cluster);
    }
    cluster
}
