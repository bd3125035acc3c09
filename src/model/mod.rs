//! model: the push context, an immutable set of indexes built from one
//! config generation and shared through `Arc` by every translation of that
//! generation; and `Proxy`, what meshd knows of a connected Envoy.
//!
//! This stage answers lookups (the service for a host, the Gateways for a
//! workload, the endpoints of a service port). It does not build Envoy
//! resources; that is `translate`.

mod credential;
pub mod gateway_api;
pub mod gateway_status;
pub mod ingress;
pub mod peer_auth;
mod proxy;
pub mod request_policy;
mod service;
pub mod sidecar_scope;
mod workload_ports;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

pub use credential::{not_a_ca, CredentialError, Credentials, ServerCredential};
pub use proxy::{write_labels, Proxy, ProxyError, Role};
pub use service::{Endpoint, MeshService, Resolution, ServicePort};
pub use workload_ports::WorkloadPorts;

use serde::Serialize;

use crate::config::{
    Change, ConfigSnapshot, DestinationRule, Gateway, IstioObject, Kind, PeerAuthentication, Resource,
    VirtualService,
};

/// The cluster DNS suffix of service hostnames.
pub const DOMAIN_SUFFIX: &str = "svc.cluster.local";

/// Indexes over one config generation.
#[derive(Debug, Default)]
pub struct PushContext {
    pub config: Arc<ConfigSnapshot>,
    /// Services by hostname (`name.ns.svc.cluster.local`).
    pub services: BTreeMap<String, Arc<MeshService>>,
    /// Every Gateway, by namespace then name.
    pub gateways: BTreeMap<(String, String), Arc<Gateway>>,
    /// Every VirtualService in Istio's precedence order: oldest first
    /// (creationTimestamp), then namespace/name.
    pub virtual_services: Vec<Arc<VirtualService>>,
    /// Indexes into `virtual_services` by each host a VirtualService names
    /// (resolved to its FQDN), in precedence order.
    pub virtual_services_by_host: std::collections::HashMap<String, Vec<usize>>,
    /// Namespaces that exist (declared or holding a resource).
    pub namespaces: BTreeSet<String>,
    /// TLS credentials from Secrets, checked at the generation's time.
    pub credentials: Credentials,
    /// Every PeerAuthentication.
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
    /// Every RequestAuthentication, oldest first.
    pub request_authentications: Vec<Arc<crate::config::RequestAuthentication>>,
    /// Every AuthorizationPolicy, oldest first.
    pub authorization_policies: Vec<Arc<crate::config::AuthorizationPolicy>>,
    /// The mesh-wide settings (`--mesh-config`).
    pub mesh: Arc<crate::config::mesh::MeshConfig>,
    /// Every DestinationRule, oldest first.
    pub destination_rules: Vec<Arc<DestinationRule>>,
    /// Indexes into `destination_rules` by resolved host; wildcard hosts
    /// under `*`.
    destination_rules_by_host: std::collections::HashMap<String, Vec<usize>>,
    /// Pods by IP (`status.podIP`): labels, identity, whether in the mesh.
    pub pods: Arc<BTreeMap<String, Arc<PodInfo>>>,
    /// The same Pods by (namespace, name), for endpoints that name theirs.
    pods_by_name: Arc<BTreeMap<(String, String), Arc<PodInfo>>>,
    /// The ports each workload IP serves as some service's endpoint, and
    /// whether the port speaks HTTP.
    pub workload_ports: WorkloadPorts,
    /// The SPIFFE trust domain identities are issued in.
    pub trust_domain: String,
    /// The label keys some resource selects sidecars by (Sidecar,
    /// DestinationRule and PeerAuthentication selectors, VirtualService
    /// `sourceLabels`, `failoverPriority`): no other label changes what a
    /// sidecar gets.
    pub sidecar_label_keys: BTreeSet<String>,
}

/// What the mesh needs to know of a Pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Carries `security.istio.io/tlsMode: istio`: it has a sidecar that
    /// speaks Istio mutual TLS.
    pub mesh: bool,
    /// `REGION/ZONE/SUBZONE`, empty when unknown.
    pub locality: String,
}

impl PushContext {
    /// The same generation under the mesh settings `mesh`.
    pub fn with_mesh(mut self, mesh: Arc<crate::config::mesh::MeshConfig>) -> PushContext {
        self.mesh = mesh;
        self
    }

    /// Builds the indexes for one generation, judging certificates now.
    pub fn new(config: Arc<ConfigSnapshot>) -> PushContext {
        PushContext::new_at(config, SystemTime::now())
    }

    /// Builds the indexes, judging certificate validity at `now` (tests
    /// and goldens pin it).
    pub fn new_at(config: Arc<ConfigSnapshot>, now: SystemTime) -> PushContext {
        let (pods, pods_by_name) = index_pods(&config);
        let services = service::build(&config, &pods, &pods_by_name);
        let mut push = PushContext {
            services,
            namespaces: namespaces(&config),
            credentials: Credentials::new(secrets(&config), now),
            pods: Arc::new(pods),
            pods_by_name: Arc::new(pods_by_name),
            trust_domain: "cluster.local".into(),
            config,
            ..PushContext::default()
        };
        // The workload ports and the policy and routing indexes are read
        // apart from each other: on a large mesh, at once.
        let large = push.services.len() >= crate::parallel::LARGE_MESH;
        let services: Vec<Arc<MeshService>> = push.services.values().cloned().collect();
        let ((), workload_ports) = crate::parallel::join(
            large,
            || {
                push.index_policies();
                push.index_routing();
            },
            move || WorkloadPorts::of(&services),
        );
        push.workload_ports = workload_ports;
        push.sidecar_label_keys = sidecar_label_keys(&push);
        push
    }

    /// The indexes of `config`, a later generation than this one's, built
    /// from this one: only what the changed resources feed is built again
    /// (an endpoint change rebuilds only its services; a VirtualService
    /// edit only the routing indexes), everything else is shared or
    /// copied. Gives what `new_at(config, now)` gives, with this
    /// generation's mesh settings and trust domain.
    pub fn next(&self, config: Arc<ConfigSnapshot>, now: SystemTime) -> PushContext {
        let changes = self.config.changes(&config);
        self.next_with(config.clone(), now, &changes)
    }

    /// `next`, given `changes` (`self.config.changes(&config)`), which the
    /// caller also hands to the snapshot cache.
    pub fn next_with(
        &self,
        config: Arc<ConfigSnapshot>,
        now: SystemTime,
        changes: &[(&crate::config::ResourceKey, Change)],
    ) -> PushContext {
        let kinds: BTreeSet<Kind> = changes.iter().map(|(k, _)| k.kind).collect();
        let touched = |of: &[Kind]| of.iter().any(|k| kinds.contains(k));
        let mut push = PushContext {
            config: config.clone(),
            services: BTreeMap::new(),
            gateways: self.gateways.clone(),
            virtual_services: self.virtual_services.clone(),
            virtual_services_by_host: self.virtual_services_by_host.clone(),
            namespaces: self.namespaces.clone(),
            credentials: self.credentials.at(now),
            peer_authentications: self.peer_authentications.clone(),
            request_authentications: self.request_authentications.clone(),
            authorization_policies: self.authorization_policies.clone(),
            mesh: self.mesh.clone(),
            destination_rules: self.destination_rules.clone(),
            destination_rules_by_host: self.destination_rules_by_host.clone(),
            pods: self.pods.clone(),
            pods_by_name: self.pods_by_name.clone(),
            workload_ports: self.workload_ports.clone(),
            trust_domain: self.trust_domain.clone(),
            sidecar_label_keys: self.sidecar_label_keys.clone(),
        };
        if touched(&[Kind::Pod, Kind::Node]) {
            let (pods, pods_by_name) = index_pods(&config);
            push.pods = Arc::new(pods);
            push.pods_by_name = Arc::new(pods_by_name);
        }
        let rebuilt = if touched(&[Kind::ServiceEntry, Kind::Node]) {
            None
        } else {
            self.changed_services(&config, changes).and_then(|changed| {
                let services =
                    service::rebuild(&self.services, &config, &changed, &push.pods, &push.pods_by_name)?;
                Some((services, changed))
            })
        };
        match rebuilt {
            Some((services, changed)) => {
                for (ns, name) in &changed {
                    let host = format!("{name}.{ns}.{DOMAIN_SUFFIX}");
                    if let Some(old) = self.services.get(&host) {
                        push.workload_ports.remove(old);
                    }
                    if let Some(new) = services.get(&host) {
                        push.workload_ports.add(new);
                    }
                }
                push.services = services;
            }
            None => {
                push.services = service::build(&config, &push.pods, &push.pods_by_name);
                push.workload_ports = WorkloadPorts::of(push.services.values());
            }
        }
        let added_or_deleted = changes.iter().any(|(_, c)| !matches!(c, Change::Updated));
        if added_or_deleted || touched(&[Kind::Namespace]) {
            push.namespaces = namespaces(&config);
        }
        if touched(&[Kind::Secret]) {
            push.credentials = Credentials::new(secrets(&config), now);
        }
        if touched(&[
            Kind::PeerAuthentication,
            Kind::RequestAuthentication,
            Kind::AuthorizationPolicy,
            Kind::DestinationRule,
        ]) {
            push.index_policies();
        }
        // Ingress backends name service ports, by number or by name.
        let ingress_ports =
            touched(&[Kind::Service, Kind::ServiceEntry]) && config.of_kind(Kind::Ingress).next().is_some();
        // A Gateway API listener may admit routes by their namespace's labels.
        let namespace_labels =
            touched(&[Kind::Namespace]) && config.of_kind(Kind::K8sGateway).next().is_some();
        let routing = touched(ROUTING_KINDS) || ingress_ports || namespace_labels;
        if routing {
            push.index_routing();
        }
        if touched(SELECTING_KINDS) || routing {
            push.sidecar_label_keys = sidecar_label_keys(&push);
        }
        push
    }

    /// The Kubernetes Services, as (namespace, name), whose `MeshService`
    /// `changes` can alter: their Service, Endpoints or EndpointSlices
    /// changed, or a Pod one of their endpoints names. `None` when a
    /// changed Pod may be selected by a ServiceEntry's workloadSelector.
    fn changed_services(
        &self,
        next: &ConfigSnapshot,
        changes: &[(&crate::config::ResourceKey, Change)],
    ) -> Option<BTreeSet<(String, String)>> {
        let mut out = BTreeSet::new();
        let mut pod_ips = BTreeSet::new();
        let mut pod_names = BTreeSet::new();
        for (key, _) in changes {
            let versions = [self.config.resources.get(key), next.resources.get(key)];
            let versions = versions.iter().flatten().map(|e| e.resource.as_ref());
            match key.kind {
                Kind::Service | Kind::Endpoints => {
                    out.insert((key.namespace.to_string(), key.name.to_string()));
                }
                Kind::EndpointSlice => {
                    for r in versions {
                        if let Resource::EndpointSlice(s) = r {
                            if let Some(svc) = service::slice_service(s) {
                                out.insert((key.namespace.to_string(), svc.to_string()));
                            }
                        }
                    }
                }
                Kind::Pod => {
                    for r in versions {
                        if let Resource::Pod(p) = r {
                            pod_ips.extend(p.status.as_ref().and_then(|s| s.pod_ip.clone()));
                        }
                    }
                    pod_names.insert((key.namespace.to_string(), key.name.to_string()));
                }
                _ => {}
            }
        }
        if pod_names.is_empty() {
            return Some(out);
        }
        let selects_pods = self
            .config
            .of_kind(Kind::ServiceEntry)
            .chain(next.of_kind(Kind::ServiceEntry))
            .any(|r| matches!(r, Resource::ServiceEntry(se) if se.spec.workload_selector.is_some()));
        if selects_pods {
            return None;
        }
        // Kubernetes Services only: a ServiceEntry's are named by their host
        // and name no Pods without a workloadSelector.
        for svc in self.services.values().filter(|s| s.name != s.hostname) {
            let names_pod =
                svc.ports.iter().flat_map(|p| &p.endpoints).any(|e| {
                    pod_ips.contains(&e.ip) || e.pod.as_ref().is_some_and(|p| pod_names.contains(p))
                });
            if names_pod {
                out.insert((svc.namespace.clone(), svc.name.clone()));
            }
        }
        Some(out)
    }

    /// Indexes PeerAuthentications, RequestAuthentications,
    /// AuthorizationPolicies and DestinationRules (by host).
    fn index_policies(&mut self) {
        self.peer_authentications = of_kind(&self.config, Kind::PeerAuthentication, |r| match r {
            Resource::PeerAuthentication(pa) => Some(pa),
            _ => None,
        });
        self.request_authentications =
            oldest_first(of_kind(&self.config, Kind::RequestAuthentication, |r| match r {
                Resource::RequestAuthentication(ra) => Some(ra),
                _ => None,
            }));
        self.authorization_policies =
            oldest_first(of_kind(&self.config, Kind::AuthorizationPolicy, |r| match r {
                Resource::AuthorizationPolicy(ap) => Some(ap),
                _ => None,
            }));
        self.destination_rules = oldest_first(of_kind(&self.config, Kind::DestinationRule, |r| match r {
            Resource::DestinationRule(dr) => Some(dr),
            _ => None,
        }));
        let mut by_host: std::collections::HashMap<String, Vec<usize>> = std::collections::HashMap::new();
        for (i, dr) in self.destination_rules.iter().enumerate() {
            let host = resolve_host(&dr.spec.host, dr.namespace());
            let key = if host.starts_with('*') {
                "*".to_string()
            } else {
                host
            };
            by_host.entry(key).or_default().push(i);
        }
        self.destination_rules_by_host = by_host;
    }

    /// Indexes Gateways and VirtualServices, with those Ingresses and
    /// Gateway API resources turn into, and the VirtualServices by host.
    fn index_routing(&mut self) {
        let mut gateways: BTreeMap<(String, String), Arc<Gateway>> =
            of_kind(&self.config, Kind::Gateway, |r| match r {
                Resource::Gateway(g) => Some(g),
                _ => None,
            })
            .into_iter()
            .map(|g| ((g.namespace().to_string(), g.name().to_string()), g))
            .collect();
        let mut virtual_services = of_kind(&self.config, Kind::VirtualService, |r| match r {
            Resource::VirtualService(vs) => Some(vs),
            _ => None,
        });
        let (gateway, generated_routes) = ingress::convert(self);
        let (api_gateways, api_routes) = gateway_api::convert(&self.config);
        for gw in gateway.into_iter().chain(api_gateways) {
            let key = (gw.namespace().to_string(), gw.name().to_string());
            gateways.insert(key, Arc::new(gw));
        }
        virtual_services.extend(generated_routes.into_iter().chain(api_routes).map(Arc::new));
        self.gateways = gateways;
        self.virtual_services = oldest_first(virtual_services);
        let mut by_host: std::collections::HashMap<String, Vec<usize>> = std::collections::HashMap::new();
        for (i, vs) in self.virtual_services.iter().enumerate() {
            let hosts: BTreeSet<String> = vs
                .spec
                .hosts
                .iter()
                .map(|h| resolve_host(h, vs.namespace()))
                .collect();
            for host in hosts {
                by_host.entry(host).or_default().push(i);
            }
        }
        self.virtual_services_by_host = by_host;
    }

    /// The Gateways whose selector matches the proxy's labels (Gateway
    /// API Gateways: in their own namespace only).
    pub fn gateways_for<'a>(&'a self, proxy: &'a Proxy) -> impl Iterator<Item = &'a Arc<Gateway>> {
        self.gateways.values().filter(|g| {
            let scoped = g
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(gateway_api::SCOPE_ANNOTATION));
            is_subset(&g.spec.selector, &proxy.labels) && (!scoped || g.namespace() == proxy.namespace)
        })
    }

    /// The Services in the proxy's namespace whose selector picks the proxy:
    /// the Services that front it.
    pub fn services_selecting<'a>(&'a self, proxy: &'a Proxy) -> impl Iterator<Item = &'a Arc<MeshService>> {
        self.services.values().filter(|s| {
            s.namespace == proxy.namespace && !s.selector.is_empty() && is_subset(&s.selector, &proxy.labels)
        })
    }

    /// Pods are read for labels and identities; their count, for registryz.
    pub fn pod_count(&self) -> usize {
        self.config.of_kind(Kind::Pod).count()
    }

    /// Sets the trust domain identities are issued in (default `cluster.local`).
    pub fn with_trust_domain(mut self, trust_domain: &str) -> PushContext {
        self.trust_domain = trust_domain.to_string();
        self
    }

    /// The DestinationRule that applies to `host` for a proxy in
    /// `proxy_namespace` with `proxy_labels`, as Istio picks it: one in the
    /// proxy's namespace (a rule whose workloadSelector picks the proxy
    /// first), else the host's namespace, else the root namespace; among
    /// equals the oldest; rules not exported to the proxy's namespace are
    /// skipped.
    pub fn destination_rule(
        &self,
        proxy_namespace: &str,
        proxy_labels: &BTreeMap<String, String>,
        host: &str,
        service_namespace: &str,
    ) -> Option<&DestinationRule> {
        // The rules naming this host exactly or by a wildcard, oldest first.
        let mut candidates: Vec<usize> = [host, "*"]
            .iter()
            .filter_map(|h| self.destination_rules_by_host.get(*h))
            .flatten()
            .copied()
            .collect();
        candidates.sort_unstable();
        let candidates = || candidates.iter().map(|i| &self.destination_rules[*i]);
        let matching = |dr: &&Arc<DestinationRule>| {
            let h = resolve_host(&dr.spec.host, dr.namespace());
            let host_ok = h == host || h.strip_prefix('*').is_some_and(|suffix| host.ends_with(suffix));
            let exported = dr.spec.export_to.is_empty()
                || dr.spec.export_to.iter().any(|e| {
                    e == "*" || e == proxy_namespace || (e == "." && dr.namespace() == proxy_namespace)
                });
            host_ok && exported
        };
        let selected = |dr: &&Arc<DestinationRule>| {
            dr.namespace() == proxy_namespace
                && dr
                    .spec
                    .workload_selector
                    .as_ref()
                    .is_some_and(|w| is_subset(&w.match_labels, proxy_labels))
        };
        if let Some(dr) = candidates().filter(selected).find(matching) {
            return Some(dr);
        }
        [proxy_namespace, service_namespace, peer_auth::ROOT_NAMESPACE]
            .iter()
            .find_map(|ns| {
                candidates()
                    .filter(|dr| dr.namespace() == *ns && dr.spec.workload_selector.is_none())
                    .find(matching)
            })
            .map(AsRef::as_ref)
    }

    /// The SPIFFE identity of a service account.
    pub fn spiffe(&self, namespace: &str, service_account: &str) -> String {
        format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.trust_domain
        )
    }
}

/// The kinds the Gateway and VirtualService indexes are built from.
const ROUTING_KINDS: &[Kind] = &[
    Kind::Gateway,
    Kind::VirtualService,
    Kind::Ingress,
    Kind::IngressClass,
    Kind::GatewayClass,
    Kind::K8sGateway,
    Kind::HttpRoute,
    Kind::GrpcRoute,
    Kind::TcpRoute,
    Kind::TlsRoute,
    Kind::ReferenceGrant,
];

/// The kinds whose resources select sidecars by label
/// (`sidecar_label_keys`), besides VirtualServices (`sourceLabels`).
const SELECTING_KINDS: &[Kind] = &[
    Kind::Sidecar,
    Kind::PeerAuthentication,
    Kind::RequestAuthentication,
    Kind::AuthorizationPolicy,
    Kind::DestinationRule,
];

/// The resources of one kind, shared with the config snapshot.
fn of_kind<T>(
    config: &ConfigSnapshot,
    kind: Kind,
    pick: impl Fn(&Resource) -> Option<&Arc<T>>,
) -> Vec<Arc<T>> {
    config.of_kind(kind).filter_map(pick).cloned().collect()
}

/// Pods by IP and by (namespace, name).
type PodIndexes = (
    BTreeMap<String, Arc<PodInfo>>,
    BTreeMap<(String, String), Arc<PodInfo>>,
);

fn index_pods(config: &ConfigSnapshot) -> PodIndexes {
    let nodes: BTreeMap<String, &k8s_openapi::api::core::v1::Node> = config
        .of_kind(Kind::Node)
        .filter_map(|r| match r {
            Resource::Node(n) => Some((n.metadata.name.clone().unwrap_or_default(), n)),
            _ => None,
        })
        .collect();
    let mut pods = BTreeMap::new();
    let mut pods_by_name = BTreeMap::new();
    for r in config.of_kind(Kind::Pod) {
        let Resource::Pod(pod) = r else { continue };
        let (ip, info) = pod_info(pod, &nodes);
        let info = Arc::new(info);
        pods_by_name.insert((info.namespace.clone(), info.name.clone()), info.clone());
        if let Some(ip) = ip {
            pods.insert(ip, info);
        }
    }
    (pods, pods_by_name)
}

/// The namespaces that exist: declared, or holding a resource.
fn namespaces(config: &ConfigSnapshot) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for entry in config.resources.values() {
        match &*entry.resource {
            Resource::Namespace(ns) => {
                out.insert(ns.metadata.name.clone().unwrap_or_default());
            }
            r => {
                if let Some(ns) = r.metadata().namespace.as_ref().filter(|ns| !out.contains(*ns)) {
                    out.insert(ns.clone());
                }
            }
        }
    }
    out
}

fn secrets(config: &ConfigSnapshot) -> Vec<Arc<k8s_openapi::api::core::v1::Secret>> {
    of_kind(config, Kind::Secret, |r| match r {
        Resource::Secret(s) => Some(s),
        _ => None,
    })
}

/// The label keys that select sidecars anywhere in the config.
fn sidecar_label_keys(push: &PushContext) -> BTreeSet<String> {
    use crate::config::istio::TrafficPolicy;
    let mut keys = BTreeSet::new();
    for r in push.config.of_kind(Kind::Sidecar) {
        if let Resource::Sidecar(sc) = r {
            keys.extend(
                sc.spec
                    .workload_selector
                    .iter()
                    .flat_map(|w| w.labels.keys().cloned()),
            );
        }
    }
    let request_policies = push
        .request_authentications
        .iter()
        .filter_map(|ra| ra.spec.selector.as_ref())
        .chain(
            push.authorization_policies
                .iter()
                .filter_map(|ap| ap.spec.selector.as_ref()),
        );
    for selector in request_policies {
        keys.extend(selector.match_labels.keys().cloned());
    }
    for pa in &push.peer_authentications {
        keys.extend(
            pa.spec
                .selector
                .iter()
                .flat_map(|w| w.match_labels.keys().cloned()),
        );
    }
    let failover = |p: &TrafficPolicy| -> Vec<String> {
        let lbs = p.load_balancer.iter().chain(
            p.port_level_settings
                .iter()
                .filter_map(|pl| pl.load_balancer.as_ref()),
        );
        lbs.filter_map(|lb| lb.locality_lb_setting.as_ref())
            .flat_map(|l| {
                l.failover_priority
                    .iter()
                    .map(|k| k.split('=').next().unwrap_or(k).to_string())
            })
            .collect()
    };
    for dr in &push.destination_rules {
        keys.extend(
            dr.spec
                .workload_selector
                .iter()
                .flat_map(|w| w.match_labels.keys().cloned()),
        );
        let policies = dr
            .spec
            .traffic_policy
            .iter()
            .chain(dr.spec.subsets.iter().filter_map(|s| s.traffic_policy.as_ref()));
        keys.extend(policies.flat_map(failover));
    }
    for vs in &push.virtual_services {
        let http = vs
            .spec
            .http
            .iter()
            .flat_map(|r| &r.matches)
            .map(|m| &m.source_labels);
        let tcp = vs
            .spec
            .tcp
            .iter()
            .flat_map(|r| &r.matches)
            .map(|m| &m.source_labels);
        let tls = vs
            .spec
            .tls
            .iter()
            .flat_map(|r| &r.matches)
            .map(|m| &m.source_labels);
        keys.extend(http.chain(tcp).chain(tls).flat_map(|l| l.keys().cloned()));
    }
    keys
}

/// A Pod's locality, as Istio finds it: its `istio-locality` label
/// (`REGION.ZONE.SUBZONE`), else its Node's `topology.kubernetes.io/region`
/// and `zone` labels with the Pod's `topology.istio.io/subzone`.
fn pod_locality(
    pod: &k8s_openapi::api::core::v1::Pod,
    labels: &BTreeMap<String, String>,
    nodes: &BTreeMap<String, &k8s_openapi::api::core::v1::Node>,
) -> String {
    if let Some(l) = labels.get("istio-locality").filter(|l| !l.is_empty()) {
        return l.replace('.', "/");
    }
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .and_then(|n| nodes.get(n));
    let Some(node_labels) = node.and_then(|n| n.metadata.labels.as_ref()) else {
        return String::new();
    };
    let get = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| node_labels.get(*k))
            .cloned()
            .unwrap_or_default()
    };
    let region = get(&[
        "topology.kubernetes.io/region",
        "failure-domain.beta.kubernetes.io/region",
    ]);
    let zone = get(&[
        "topology.kubernetes.io/zone",
        "failure-domain.beta.kubernetes.io/zone",
    ]);
    let subzone = labels
        .get("topology.istio.io/subzone")
        .cloned()
        .unwrap_or_default();
    match (region.is_empty(), zone.is_empty(), subzone.is_empty()) {
        (true, _, _) => String::new(),
        (false, true, _) => region,
        (false, false, true) => format!("{region}/{zone}"),
        (false, false, false) => format!("{region}/{zone}/{subzone}"),
    }
}

/// The Pod's IP (once it has one) and what the mesh needs of it.
fn pod_info(
    pod: &k8s_openapi::api::core::v1::Pod,
    nodes: &BTreeMap<String, &k8s_openapi::api::core::v1::Node>,
) -> (Option<String>, PodInfo) {
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty());
    let labels: BTreeMap<String, String> = pod
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mesh = labels.get("security.istio.io/tlsMode").map(String::as_str) == Some("istio");
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    (
        ip,
        PodInfo {
            name: pod.metadata.name.clone().unwrap_or_default(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            locality: pod_locality(pod, &labels, nodes),
            labels,
            service_account,
            mesh,
        },
    )
}

/// Istio's precedence among resources of one kind: oldest first
/// (creationTimestamp), then namespace/name.
fn oldest_first<S>(mut v: Vec<Arc<IstioObject<S>>>) -> Vec<Arc<IstioObject<S>>> {
    v.sort_by(|a, b| {
        let created = |o: &IstioObject<S>| o.metadata.creation_timestamp.clone().map(|t| t.0);
        created(a)
            .cmp(&created(b))
            .then_with(|| a.namespace().cmp(b.namespace()))
            .then_with(|| a.name().cmp(b.name()))
    });
    v
}

/// Whether every `selector` label is in `labels`.
pub fn is_subset(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The FQDN a possibly short host refers to, as Istio resolves VirtualService
/// destinations: a name without dots is a service in `namespace`.
pub fn resolve_host(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.starts_with('*') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.{DOMAIN_SUFFIX}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_file;

    /// Every index of `a` equals `b`'s (the config and mesh settings aside).
    fn assert_same_indexes(a: &PushContext, b: &PushContext, what: &str) {
        assert_eq!(a.services, b.services, "services after {what}");
        assert_eq!(a.gateways, b.gateways, "gateways after {what}");
        assert_eq!(
            a.virtual_services, b.virtual_services,
            "virtual services after {what}"
        );
        assert_eq!(
            a.virtual_services_by_host, b.virtual_services_by_host,
            "virtual services by host after {what}"
        );
        assert_eq!(a.namespaces, b.namespaces, "namespaces after {what}");
        assert_eq!(a.credentials, b.credentials, "credentials after {what}");
        assert_eq!(a.peer_authentications, b.peer_authentications, "{what}");
        assert_eq!(a.request_authentications, b.request_authentications, "{what}");
        assert_eq!(a.authorization_policies, b.authorization_policies, "{what}");
        assert_eq!(a.destination_rules, b.destination_rules, "{what}");
        assert_eq!(a.destination_rules_by_host, b.destination_rules_by_host, "{what}");
        assert_eq!(a.pods, b.pods, "pods after {what}");
        assert_eq!(a.pods_by_name, b.pods_by_name, "pods by name after {what}");
        assert_eq!(a.workload_ports, b.workload_ports, "workload ports after {what}");
        assert_eq!(
            a.sidecar_label_keys, b.sidecar_label_keys,
            "label keys after {what}"
        );
    }

    /// From every golden scenario, each resource taken away and put back
    /// again, and every scenario followed by every other: the indexes
    /// `next` updates equal those built from scratch.
    #[test]
    fn updated_indexes_equal_rebuilt_ones() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden");
        let mut scenarios = Vec::new();
        for dir in std::fs::read_dir(&golden).expect("testdata/golden") {
            let dir = dir.expect("entry").path().join("config");
            if !dir.is_dir() {
                continue; // the demo scenario serves the embedded config
            }
            let files = crate::source::load_dir(&dir).expect("golden config");
            scenarios.push((dir, Arc::new(ConfigSnapshot::from_files(files))));
        }
        scenarios.sort_by(|a, b| a.0.cmp(&b.0));
        let check = |from: &Arc<ConfigSnapshot>, to: &Arc<ConfigSnapshot>, what: &str| {
            let updated = PushContext::new_at(from.clone(), now).next(to.clone(), now);
            assert_same_indexes(&updated, &PushContext::new_at(to.clone(), now), what);
        };
        for (dir, full) in &scenarios {
            for key in full.resources.keys() {
                let mut without = (**full).clone();
                without.resources.remove(key);
                let without = Arc::new(without);
                check(full, &without, &format!("{key} deleted in {}", dir.display()));
                check(&without, full, &format!("{key} added in {}", dir.display()));
            }
        }
        for (a, from) in &scenarios {
            for (b, to) in &scenarios {
                check(from, to, &format!("{} followed by {}", a.display(), b.display()));
            }
        }
    }

    /// One resource of a small universe, by kind, slot and variant: two
    /// configs drawn from it share names, so one becomes the other by
    /// updates, additions and deletions of every kind the indexes read.
    fn universe_doc(kind: u8, slot: u8, v: u8) -> String {
        let ns = ["a", "b"][usize::from(slot % 2)];
        let svc = format!("s{}", slot % 3);
        let ip = |k: u8| format!("10.0.0.{}", 1 + (k % 5));
        let port = ["http", "tcp", "grpc"][usize::from(v % 3)];
        match kind % 12 {
            0 => format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: {ns}}}\n\
                 spec: {{selector: {{app: {svc}}}, ports: [{{name: {port}, port: 80, targetPort: {}}}]}}\n",
                8080 + u16::from(v % 2)
            ),
            1 => format!(
                "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {svc}, namespace: {ns}}}\n\
                 subsets: [{{addresses: [{{ip: {}, targetRef: {{kind: Pod, name: p{}, namespace: {ns}}}}}, {{ip: {}}}], ports: [{{name: {port}, port: 8080}}]}}]\n",
                ip(v),
                v % 3,
                ip(v / 3)
            ),
            2 => format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-x{}, namespace: {ns}, labels: {{kubernetes.io/service-name: s{}}}}}\n\
                 addressType: IPv4\nendpoints: [{{addresses: [{}]}}]\nports: [{{name: {port}, port: 8080}}]\n",
                slot % 2,
                v % 3,
                ip(v + 1)
            ),
            3 => format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{}, namespace: {ns}, labels: {{app: s{}{}}}}}\n\
                 spec: {{serviceAccountName: sa{}, nodeName: n{}}}\nstatus: {{podIP: {}}}\n",
                slot % 3,
                v % 3,
                if v % 2 == 0 { ", security.istio.io/tlsMode: istio" } else { "" },
                v % 2,
                v % 2,
                ip(v / 2)
            ),
            4 => format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: n{}, labels: {{topology.kubernetes.io/region: r{v}}}}}\n",
                slot % 2
            ),
            5 => format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {svc}, namespace: {ns}}}\n\
                 spec: {{hosts: [s{}], http: [{{match: [{{sourceLabels: {{k{v}: x}}}}], route: [{{destination: {{host: {svc}}}}}]}}]}}\n",
                v % 3
            ),
            6 => format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {svc}, namespace: {ns}}}\n\
                 spec: {{host: s{}, subsets: [{{name: v{v}, labels: {{app: {svc}}}}}]}}\n",
                v % 3
            ),
            7 => format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se{}, namespace: {ns}}}\n\
                 spec: {{hosts: [s{}.{ns}.svc.cluster.local], ports: [{{number: 80, name: http, protocol: HTTP}}], resolution: STATIC{}}}\n",
                slot % 2,
                v % 3,
                if v % 2 == 0 { ", workloadSelector: {labels: {app: s0}}" } else { ", endpoints: [{address: 10.1.0.1}]" }
            ),
            8 => format!(
                "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: i{}, namespace: {ns}}}\n\
                 spec: {{ingressClassName: istio, rules: [{{host: h{v}.example.com, http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: s{}, port: {{name: {port}}}}}}}}}]}}}}]}}\n",
                slot % 2,
                v % 3
            ),
            9 => format!(
                "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: g{}, namespace: {ns}}}\n\
                 spec: {{selector: {{istio: ingressgateway}}, servers: [{{port: {{number: {}, name: http, protocol: HTTP}}, hosts: ['*']}}]}}\n",
                slot % 2,
                80 + u16::from(v % 2)
            ),
            10 => format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: pa{}, namespace: {ns}}}\n\
                 spec: {{selector: {{matchLabels: {{k{v}: y}}}}, mtls: {{mode: STRICT}}}}\n",
                slot % 2
            ),
            _ => format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{v: x{v}}}}}\n"),
        }
    }

    fn universe(docs: &[(u8, u8, u8)]) -> Arc<ConfigSnapshot> {
        let text = docs
            .iter()
            .map(|(k, slot, v)| universe_doc(*k, *slot, *v))
            .collect::<Vec<_>>()
            .join("---\n");
        // A later document of the same key replaces an earlier one.
        Arc::new(ConfigSnapshot::from_files(vec![parse_file("u.yaml", &text)]))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Any config of the universe followed by any other (most resources
        /// kept, some changed, dropped or added): the updated indexes are
        /// the rebuilt ones.
        #[test]
        fn updated_indexes_equal_rebuilt_ones_for_any_change(
            before in proptest::collection::vec((0u8..12, 0u8..6, 0u8..6), 1..24),
            edits in proptest::collection::vec((0u8..3, 0u8..12, 0u8..6, 0u8..6), 0..6),
        ) {
            let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
            let mut after = before.clone();
            for (op, k, slot, v) in edits {
                match op {
                    0 if !after.is_empty() => {
                        let at = usize::from(slot) % after.len();
                        after.remove(at);
                    }
                    1 if !after.is_empty() => {
                        let at = usize::from(slot) % after.len();
                        after[at].2 = v;
                    }
                    _ => after.push((k, slot, v)),
                }
            }
            let (from, to) = (universe(&before), universe(&after));
            proptest::prop_assume!(from.rejections.is_empty() && to.rejections.is_empty());
            let updated = PushContext::new_at(from, now).next(to.clone(), now);
            assert_same_indexes(&updated, &PushContext::new_at(to, now), "a drawn change");
        }
    }

    /// Updates in place: an endpoint moved, a Pod's IP and labels changed,
    /// a Service's port renamed, a VirtualService and a Secret edited.
    #[test]
    fn updated_resources_equal_rebuilt_ones() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let docs = |ip: &str, pod_ip: &str, app: &str, port: &str, prefix: &str| {
            format!(
                "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec: {{selector: {{app: web}}, ports: [{{name: {port}, port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Endpoints
metadata: {{name: web, namespace: shop}}
subsets: [{{addresses: [{{ip: {ip}, targetRef: {{kind: Pod, name: web-1, namespace: shop}}}}, {{ip: 10.0.0.9}}], ports: [{{name: {port}, port: 8080}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1, namespace: shop, labels: {{app: {app}, security.istio.io/tlsMode: istio}}}}
spec: {{serviceAccountName: web}}
status: {{podIP: {pod_ip}}}
---
apiVersion: v1
kind: Service
metadata: {{name: other, namespace: shop}}
spec: {{ports: [{{name: tcp, port: 9000}}]}}
---
apiVersion: v1
kind: Endpoints
metadata: {{name: other, namespace: shop}}
subsets: [{{addresses: [{{ip: {pod_ip}}}], ports: [{{name: tcp, port: 9000}}]}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web]
  http: [{{match: [{{uri: {{prefix: {prefix}}}}}], route: [{{destination: {{host: web}}}}]}}]
"
            )
        };
        let snapshot = |text: String| {
            let snapshot = ConfigSnapshot::from_files(vec![parse_file("mesh.yaml", &text)]);
            assert!(snapshot.rejections.is_empty(), "{:?}", snapshot.rejections);
            Arc::new(snapshot)
        };
        let base = docs("10.0.0.1", "10.0.0.1", "web", "http", "/");
        let steps = [
            (
                "an endpoint moved",
                docs("10.0.0.2", "10.0.0.1", "web", "http", "/"),
            ),
            (
                "a Pod's IP changed",
                docs("10.0.0.1", "10.0.0.3", "web", "http", "/"),
            ),
            (
                "a Pod's labels changed",
                docs("10.0.0.1", "10.0.0.1", "web-v2", "http", "/"),
            ),
            ("a port renamed", docs("10.0.0.1", "10.0.0.1", "web", "tcp", "/")),
            (
                "a route edited",
                docs("10.0.0.1", "10.0.0.1", "web", "http", "/v2"),
            ),
        ];
        let from = snapshot(base);
        let before = PushContext::new_at(from.clone(), now);
        for (what, text) in steps {
            let to = snapshot(text);
            let updated = before.next(to.clone(), now);
            assert_same_indexes(&updated, &PushContext::new_at(to.clone(), now), what);
        }
        // An endpoint change builds only its own service again.
        let moved = before.next(snapshot(docs("10.0.0.2", "10.0.0.1", "web", "http", "/")), now);
        let other = "other.shop.svc.cluster.local";
        assert!(Arc::ptr_eq(&before.services[other], &moved.services[other]));
        assert!(Arc::ptr_eq(
            &before.virtual_services[0],
            &moved.virtual_services[0]
        ));
    }

    fn dr(ns: &str, name: &str, extra: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: reviews.default.svc.cluster.local\n{extra}"
        )
    }

    #[test]
    fn destination_rule_precedence_selector_and_export() {
        let docs = [
            dr("default", "svc-ns", ""),
            dr("shop", "shop-ns", "  exportTo: [\".\"]\n"),
            dr(
                "shop",
                "shop-selected",
                "  workloadSelector: {matchLabels: {app: cart}}\n",
            ),
            dr("istio-system", "root", ""),
        ];
        let snapshot = ConfigSnapshot::from_files(vec![parse_file("dr.yaml", &docs.join("---\n"))]);
        assert!(snapshot.rejections.is_empty(), "{:?}", snapshot.rejections);
        let push = PushContext::new(Arc::new(snapshot));
        let pick = |ns: &str, app: &str| {
            let labels: BTreeMap<String, String> = [("app".to_string(), app.to_string())].into();
            push.destination_rule(ns, &labels, "reviews.default.svc.cluster.local", "default")
                .map(|d| d.name().to_string())
        };
        assert_eq!(
            pick("shop", "cart").as_deref(),
            Some("shop-selected"),
            "a selector picking the proxy wins"
        );
        assert_eq!(
            pick("shop", "other").as_deref(),
            Some("shop-ns"),
            "then the proxy's namespace"
        );
        assert_eq!(
            pick("web", "x").as_deref(),
            Some("svc-ns"),
            "then the service's namespace"
        );
        assert_eq!(pick("default", "x").as_deref(), Some("svc-ns"));
    }
}
