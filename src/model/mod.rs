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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

pub use credential::{not_a_ca, CredentialError, Credentials, ServerCredential};
pub use proxy::{label_list, Proxy, ProxyError, Role};
pub use service::{Endpoint, MeshService, Resolution, ServicePort};

use serde::Serialize;

use crate::config::{
    ConfigSnapshot, DestinationRule, Gateway, IstioObject, Kind, PeerAuthentication, Resource, VirtualService,
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
    pub pods: BTreeMap<String, Arc<PodInfo>>,
    /// The ports each workload IP serves as some service's endpoint, and
    /// whether the port speaks HTTP.
    pub workload_ports: BTreeMap<String, BTreeMap<u16, bool>>,
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
        let services = service::build(&config, &pods, &pods_by_name);
        let mut secrets = Vec::new();
        let mut peer_authentications = Vec::new();
        let mut request_authentications = Vec::new();
        let mut authorization_policies = Vec::new();
        let mut destination_rules = Vec::new();
        let mut gateways = BTreeMap::new();
        let mut virtual_services: Vec<Arc<VirtualService>> = Vec::new();
        let mut namespaces = BTreeSet::new();
        for entry in config.resources.values() {
            let meta = entry.resource.metadata();
            match (&*entry.resource, &meta.namespace) {
                (Resource::Namespace(ns), _) => {
                    namespaces.insert(ns.metadata.name.clone().unwrap_or_default());
                }
                (_, Some(ns)) => {
                    namespaces.insert(ns.clone());
                }
                _ => {}
            }
            match &*entry.resource {
                Resource::Gateway(g) => {
                    let key = (g.namespace().to_string(), g.name().to_string());
                    gateways.insert(key, Arc::new(g.clone()));
                }
                Resource::VirtualService(vs) => virtual_services.push(Arc::new(vs.clone())),
                Resource::Secret(secret) => secrets.push(Arc::new(secret.clone())),
                Resource::PeerAuthentication(pa) => peer_authentications.push(Arc::new(pa.clone())),
                Resource::RequestAuthentication(ra) => request_authentications.push(Arc::new(ra.clone())),
                Resource::AuthorizationPolicy(ap) => authorization_policies.push(Arc::new(ap.clone())),
                Resource::DestinationRule(dr) => destination_rules.push(Arc::new(dr.clone())),
                _ => {}
            }
        }
        let virtual_services = oldest_first(virtual_services);
        let mut push = PushContext {
            config,
            services,
            gateways,
            virtual_services,
            virtual_services_by_host: std::collections::HashMap::new(),
            namespaces,
            credentials: Credentials::new(secrets, now),
            peer_authentications,
            request_authentications: oldest_first(request_authentications),
            authorization_policies: oldest_first(authorization_policies),
            mesh: Arc::default(),
            destination_rules: oldest_first(destination_rules),
            destination_rules_by_host: std::collections::HashMap::new(),
            pods,
            workload_ports: BTreeMap::new(),
            trust_domain: "cluster.local".into(),
            sidecar_label_keys: BTreeSet::new(),
        };
        for svc in push.services.values() {
            for sp in &svc.ports {
                for e in &sp.endpoints {
                    let ports = push.workload_ports.entry(e.ip.clone()).or_default();
                    *ports.entry(e.port).or_default() |= sp.is_http();
                }
            }
        }
        let (gateway, mut generated_routes) = ingress::convert(&push);
        let (api_gateways, api_routes) = gateway_api::convert(&push.config);
        generated_routes.extend(api_routes);
        for gw in gateway.into_iter().chain(api_gateways) {
            let key = (gw.namespace().to_string(), gw.name().to_string());
            push.gateways.insert(key, Arc::new(gw));
        }
        if !generated_routes.is_empty() {
            let mut all = std::mem::take(&mut push.virtual_services);
            all.extend(generated_routes.into_iter().map(Arc::new));
            push.virtual_services = oldest_first(all);
        }
        push.sidecar_label_keys = sidecar_label_keys(&push);
        for (i, dr) in push.destination_rules.iter().enumerate() {
            let host = resolve_host(&dr.spec.host, dr.namespace());
            let key = if host.starts_with('*') {
                "*".to_string()
            } else {
                host
            };
            push.destination_rules_by_host.entry(key).or_default().push(i);
        }
        for (i, vs) in push.virtual_services.iter().enumerate() {
            let hosts: BTreeSet<String> = vs
                .spec
                .hosts
                .iter()
                .map(|h| resolve_host(h, vs.namespace()))
                .collect();
            for host in hosts {
                push.virtual_services_by_host.entry(host).or_default().push(i);
            }
        }
        push
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
