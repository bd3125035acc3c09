//! Services and their endpoints, from Service + EndpointSlice/Endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use super::{PodInfo, DOMAIN_SUFFIX};
use crate::config::{ConfigSnapshot, Kind, Resource, ResourceKey, ServiceEntry};

/// A Kubernetes Service as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeshService {
    pub name: String,
    pub namespace: String,
    /// `name.namespace.svc.cluster.local`.
    pub hostname: String,
    pub selector: BTreeMap<String, String>,
    /// `spec.clusterIP`; `None` for headless services.
    pub cluster_ip: Option<String>,
    pub ports: Vec<ServicePort>,
    /// How its endpoints are found.
    pub resolution: Resolution,
    /// A ServiceEntry with `location: MESH_EXTERNAL` (the default).
    pub external: bool,
}

/// How a service's endpoints are found (ServiceEntry `resolution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Resolution {
    /// Known addresses, sent over EDS (Kubernetes services, STATIC).
    Endpoints,
    /// Envoy resolves the endpoints' names, every address an endpoint.
    Dns,
    /// Envoy resolves one name and uses one address at a time.
    DnsRoundRobin,
    /// To wherever the connection was going (NONE).
    Passthrough,
}

/// One port of a Service and the endpoints behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    /// The targetPort as written: a number, a container port name, or none.
    pub target_port: Option<String>,
    pub protocol: String,
    /// `appProtocol`, when set.
    pub app_protocol: Option<String>,
    /// Ready endpoints, sorted.
    pub endpoints: Vec<Endpoint>,
}

/// An address traffic for a service port is sent to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Endpoint {
    pub ip: String,
    pub port: u16,
    /// For an endpoint whose Pod is in the mesh (`security.istio.io/tlsMode:
    /// istio`): its namespace and service account, the identity it presents.
    pub mesh: Option<(String, String)>,
    /// The Pod the endpoint names (`targetRef`), as (namespace, name).
    #[serde(skip)]
    pub pod: Option<(String, String)>,
    /// The labels of the endpoint's Pod: what DestinationRule subsets select on.
    pub labels: BTreeMap<String, String>,
    /// `REGION/ZONE/SUBZONE` (from its Pod, or a ServiceEntry endpoint's
    /// `locality`), empty when unknown.
    pub locality: String,
}

impl MeshService {
    /// The port with this number, if the service has it.
    pub fn port(&self, number: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == number)
    }
}

impl ServicePort {
    /// Whether the port carries HTTP, by Istio's protocol selection: an
    /// `appProtocol` of http/http2/grpc/grpc-web, else a name of that
    /// protocol or prefixed by it and `-`. Everything else is TCP.
    pub fn is_http(&self) -> bool {
        const HTTP: &[&str] = &["http", "http2", "grpc", "grpc-web", "h2c"];
        if let Some(app) = &self.app_protocol {
            return HTTP.contains(&app.to_ascii_lowercase().as_str());
        }
        let name = self.name.to_ascii_lowercase();
        let prefix = name.split('-').next().unwrap_or_default();
        HTTP.contains(&prefix)
    }

    /// Whether the port carries HTTP/2 (gRPC included), by the same
    /// selection: an `appProtocol` or name (prefix) of http2, grpc,
    /// grpc-web or h2c. Envoy speaks HTTP/2 to such a port's endpoints.
    pub fn is_http2(&self) -> bool {
        const HTTP2: &[&str] = &["http2", "grpc", "grpc-web", "h2c"];
        if let Some(app) = &self.app_protocol {
            return HTTP2.contains(&app.to_ascii_lowercase().as_str());
        }
        let name = self.name.to_ascii_lowercase();
        HTTP2.contains(&name.split('-').next().unwrap_or_default())
    }

    /// Whether the port carries TLS the sidecar does not terminate
    /// (`https`/`tls` by appProtocol or name prefix): told apart by SNI.
    pub fn is_tls(&self) -> bool {
        const TLS: &[&str] = &["https", "tls"];
        if let Some(app) = &self.app_protocol {
            return TLS.contains(&app.to_ascii_lowercase().as_str());
        }
        let name = self.name.to_ascii_lowercase();
        TLS.contains(&name.split('-').next().unwrap_or_default())
    }

    /// The targetPort as a number, when it is one (or unset: then the port).
    pub fn target_number(&self) -> Option<u16> {
        match &self.target_port {
            None => Some(self.port),
            Some(t) => t.parse().ok(),
        }
    }
}

/// Indexes every Service of the generation with its endpoints.
pub(super) fn build(
    config: &ConfigSnapshot,
    pods: &BTreeMap<String, Arc<PodInfo>>,
    pods_by_name: &BTreeMap<(String, String), Arc<PodInfo>>,
) -> BTreeMap<String, Arc<MeshService>> {
    let mut slices: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    let mut endpoints: BTreeMap<(String, String), &Endpoints> = BTreeMap::new();
    for r in config.of_kind(Kind::EndpointSlice) {
        let Resource::EndpointSlice(s) = r else { continue };
        if let (Some(svc), Some(ns)) = (slice_service(s), &s.metadata.namespace) {
            slices.entry((ns.clone(), svc.to_string())).or_default().push(s);
        }
    }
    for r in config.of_kind(Kind::Endpoints) {
        let Resource::Endpoints(e) = r else { continue };
        let key = (
            e.metadata.namespace.clone().unwrap_or_default(),
            e.metadata.name.clone().unwrap_or_default(),
        );
        endpoints.insert(key, e);
    }
    let services: Vec<&Service> = config
        .of_kind(Kind::Service)
        .filter_map(|r| match r {
            Resource::Service(svc) => Some(svc),
            _ => None,
        })
        .collect();
    // Each Service is read apart from the others: on a large mesh, on every core.
    let large = services.len() >= crate::parallel::LARGE_MESH;
    let built = crate::parallel::map(large, &services, |svc| {
        let key = (
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        );
        let svc_slices = slices.get(&key).map(Vec::as_slice).unwrap_or_default();
        from_service(svc, svc_slices, endpoints.get(&key).copied(), pods, pods_by_name)
    });
    let mut out = BTreeMap::new();
    for service in built {
        out.insert(service.hostname.clone(), Arc::new(service));
    }
    for r in config.of_kind(Kind::ServiceEntry) {
        let Resource::ServiceEntry(se) = r else { continue };
        for svc in from_service_entry(se, pods) {
            out.entry(svc.hostname.clone()).or_insert_with(|| Arc::new(svc));
        }
    }
    out
}

/// One Kubernetes Service with its endpoints: from its EndpointSlices when
/// it has any, else from its Endpoints.
fn from_service(
    svc: &Service,
    svc_slices: &[&EndpointSlice],
    svc_endpoints: Option<&Endpoints>,
    pods: &BTreeMap<String, Arc<PodInfo>>,
    pods_by_name: &BTreeMap<(String, String), Arc<PodInfo>>,
) -> MeshService {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let ports = service_ports(svc)
        .into_iter()
        .map(|mut p| {
            p.endpoints = if svc_slices.is_empty() {
                svc_endpoints.map(|e| from_endpoints(&p, e)).unwrap_or_default()
            } else {
                from_slices(&p, svc_slices)
            };
            for e in &mut p.endpoints {
                // The Pod by its IP, else by the endpoint's targetRef.
                let pod = pods
                    .get(&e.ip)
                    .or_else(|| e.pod.as_ref().and_then(|k| pods_by_name.get(k)));
                e.labels = pod.map(|p| p.labels.clone()).unwrap_or_default();
                e.locality = pod.map(|p| p.locality.clone()).unwrap_or_default();
                e.mesh = pod
                    .filter(|pod| pod.mesh)
                    .map(|pod| (pod.namespace.clone(), pod.service_account.clone()));
            }
            p
        })
        .collect();
    let hostname = format!("{name}.{namespace}.{DOMAIN_SUFFIX}");
    let selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    let cluster_ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .filter(|ip| !ip.is_empty() && ip != "None");
    MeshService {
        name,
        namespace,
        hostname,
        selector,
        cluster_ip,
        ports,
        resolution: Resolution::Endpoints,
        external: false,
    }
}

/// `prev` with the Kubernetes Services `changed` (namespace, name) built
/// again from `config` (or dropped when gone); every other service keeps
/// its `Arc`. `None` when a changed host is also a ServiceEntry's: which
/// of the two wins is the full build's to decide.
pub(super) fn rebuild(
    prev: &BTreeMap<String, Arc<MeshService>>,
    config: &ConfigSnapshot,
    changed: &BTreeSet<(String, String)>,
    pods: &BTreeMap<String, Arc<PodInfo>>,
    pods_by_name: &BTreeMap<(String, String), Arc<PodInfo>>,
) -> Option<BTreeMap<String, Arc<MeshService>>> {
    let entry_hosts: BTreeSet<&str> = config
        .of_kind(Kind::ServiceEntry)
        .filter_map(|r| match r {
            Resource::ServiceEntry(se) => Some(se.spec.hosts.iter().map(String::as_str)),
            _ => None,
        })
        .flatten()
        .collect();
    let mut out = prev.clone();
    for (namespace, name) in changed {
        let hostname = format!("{name}.{namespace}.{DOMAIN_SUFFIX}");
        if entry_hosts.contains(hostname.as_str()) {
            return None;
        }
        out.remove(&hostname);
        let get = |kind: Kind| {
            let key = ResourceKey {
                kind,
                namespace: namespace.as_str().into(),
                name: name.as_str().into(),
            };
            config.resources.get(&key).map(|e| e.resource.as_ref())
        };
        let Some(Resource::Service(svc)) = get(Kind::Service) else {
            continue;
        };
        let svc_endpoints = match get(Kind::Endpoints) {
            Some(Resource::Endpoints(e)) => Some(e),
            _ => None,
        };
        let svc_slices: Vec<&EndpointSlice> = config
            .resources
            .range(ResourceKey::first_of(Kind::EndpointSlice, namespace)..)
            .take_while(|(k, _)| k.kind == Kind::EndpointSlice && *k.namespace == **namespace)
            .filter_map(|(_, e)| match e.resource.as_ref() {
                Resource::EndpointSlice(s) => Some(s),
                _ => None,
            })
            .filter(|s| slice_service(s) == Some(name.as_str()))
            .collect();
        let service = from_service(svc, &svc_slices, svc_endpoints, pods, pods_by_name);
        out.insert(hostname, Arc::new(service));
    }
    Some(out)
}

/// The Service an EndpointSlice belongs to (`kubernetes.io/service-name`).
pub(crate) fn slice_service(slice: &EndpointSlice) -> Option<&str> {
    slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .map(String::as_str)
}

/// The services a ServiceEntry adds: one per host.
fn from_service_entry(se: &ServiceEntry, pods: &BTreeMap<String, Arc<PodInfo>>) -> Vec<MeshService> {
    let spec = &se.spec;
    let resolution = match spec.resolution.as_deref() {
        Some("STATIC") => Resolution::Endpoints,
        Some("DNS") => Resolution::Dns,
        Some("DNS_ROUND_ROBIN") => Resolution::DnsRoundRobin,
        _ => Resolution::Passthrough,
    };
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .filter_map(|p| {
            let number = u16::try_from(p.number).ok()?;
            let target = p
                .target_port
                .and_then(|t| u16::try_from(t).ok())
                .unwrap_or(number);
            let proto = p.protocol.to_ascii_lowercase();
            Some(ServicePort {
                name: p.name.clone(),
                port: number,
                target_port: Some(target.to_string()),
                protocol: "TCP".into(),
                app_protocol: Some(if proto.is_empty() { "tcp".into() } else { proto }),
                endpoints: Vec::new(),
            })
        })
        .collect();
    let ns = se.namespace().to_string();
    spec.hosts
        .iter()
        .map(|host| {
            let ports = ports
                .iter()
                .map(|p| {
                    let mut p = p.clone();
                    let target = p.target_number().unwrap_or(p.port);
                    let mut eps: BTreeSet<Endpoint> = spec
                        .endpoints
                        .iter()
                        .map(|e| Endpoint {
                            ip: e.address.clone(),
                            port: e
                                .ports
                                .get(&p.name)
                                .and_then(|n| u16::try_from(*n).ok())
                                .unwrap_or(target),
                            mesh: None,
                            pod: None,
                            labels: e.labels.clone(),
                            locality: e.locality.clone().unwrap_or_default(),
                        })
                        .collect();
                    if let Some(sel) = &spec.workload_selector {
                        for (ip, pod) in pods {
                            if pod.namespace == ns && super::is_subset(&sel.labels, &pod.labels) {
                                eps.insert(Endpoint {
                                    ip: ip.clone(),
                                    port: target,
                                    mesh: pod
                                        .mesh
                                        .then(|| (pod.namespace.clone(), pod.service_account.clone())),
                                    pod: None,
                                    labels: pod.labels.clone(),
                                    locality: pod.locality.clone(),
                                });
                            }
                        }
                    }
                    if eps.is_empty() && matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin) {
                        eps.insert(Endpoint {
                            ip: host.clone(),
                            port: target,
                            mesh: None,
                            pod: None,
                            labels: BTreeMap::new(),
                            locality: String::new(),
                        });
                    }
                    p.endpoints = eps.into_iter().collect();
                    p
                })
                .collect();
            MeshService {
                name: host.clone(),
                namespace: ns.clone(),
                hostname: host.clone(),
                selector: BTreeMap::new(),
                cluster_ip: spec
                    .addresses
                    .first()
                    .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
                    .cloned(),
                ports,
                resolution,
                external: spec.location.as_deref() != Some("MESH_INTERNAL"),
            }
        })
        .collect()
}

fn service_ports(svc: &Service) -> Vec<ServicePort> {
    let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
    ports
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: u16::try_from(p.port).ok()?,
                target_port: p.target_port.as_ref().map(|t| match t {
                    IntOrString::Int(i) => i.to_string(),
                    IntOrString::String(s) => s.clone(),
                }),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                app_protocol: p.app_protocol.clone(),
                endpoints: Vec::new(),
            })
        })
        .collect()
}

/// Picks the endpoint port for a service port among `(name, port)` pairs:
/// by name, then by number (the targetPort), then the only one there is.
fn pick_port<'a>(sp: &ServicePort, ports: impl Iterator<Item = (&'a str, u16)> + Clone) -> Option<u16> {
    let by_name = ports.clone().find(|(n, _)| *n == sp.name).map(|(_, p)| p);
    let by_number = || {
        let target = sp.target_number()?;
        ports.clone().find(|(_, p)| *p == target).map(|(_, p)| p)
    };
    let only = || {
        let mut it = ports.clone();
        match (it.next(), it.next()) {
            (Some((_, p)), None) => Some(p),
            _ => None,
        }
    };
    by_name.or_else(by_number).or_else(only)
}

fn from_endpoints(sp: &ServicePort, e: &Endpoints) -> Vec<Endpoint> {
    let mut out = BTreeSet::new();
    for subset in e.subsets.iter().flatten() {
        let ports = subset.ports.as_deref().unwrap_or_default();
        let pairs = ports
            .iter()
            .filter_map(|p| Some((p.name.as_deref().unwrap_or_default(), u16::try_from(p.port).ok()?)));
        let Some(port) = pick_port(sp, pairs) else {
            continue;
        };
        for addr in subset.addresses.iter().flatten() {
            let pod = pod_ref(addr.target_ref.as_ref(), &e.metadata.namespace);
            out.insert(Endpoint {
                ip: addr.ip.clone(),
                port,
                mesh: None,
                pod,
                labels: BTreeMap::new(),
                locality: String::new(),
            });
        }
    }
    out.into_iter().collect()
}

/// The (namespace, name) of the Pod an endpoint's `targetRef` names.
fn pod_ref(
    target: Option<&k8s_openapi::api::core::v1::ObjectReference>,
    default_namespace: &Option<String>,
) -> Option<(String, String)> {
    let r = target.filter(|r| r.kind.as_deref() == Some("Pod"))?;
    let ns = r
        .namespace
        .clone()
        .or_else(|| default_namespace.clone())
        .unwrap_or_default();
    Some((ns, r.name.clone().unwrap_or_default()))
}

fn from_slices(sp: &ServicePort, slices: &[&EndpointSlice]) -> Vec<Endpoint> {
    let mut out = BTreeSet::new();
    for slice in slices {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let pairs = ports.iter().filter_map(|p| {
            Some((
                p.name.as_deref().unwrap_or_default(),
                u16::try_from(p.port?).ok()?,
            ))
        });
        let Some(port) = pick_port(sp, pairs) else {
            continue;
        };
        for ep in &slice.endpoints {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            let pod = pod_ref(ep.target_ref.as_ref(), &slice.metadata.namespace);
            for ip in &ep.addresses {
                out.insert(Endpoint {
                    ip: ip.clone(),
                    port,
                    mesh: None,
                    pod: pod.clone(),
                    labels: BTreeMap::new(),
                    locality: String::new(),
                });
            }
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_file;

    fn services(yaml: &str) -> BTreeMap<String, Arc<MeshService>> {
        build(
            &ConfigSnapshot::from_files(vec![parse_file("t.yaml", yaml)]),
            &BTreeMap::new(),
            &BTreeMap::new(),
        )
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: hw}\nspec:\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n  - {name: admin, port: 81, targetPort: 9090}\n";

    #[test]
    fn endpoints_ports_resolve_by_name_then_number() {
        let s = services(&format!(
            "{SVC}---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: hw}}\nsubsets:\n\
             - addresses: [{{ip: 10.0.0.2}}, {{ip: 10.0.0.1}}]\n  ports: [{{name: http, port: 8080}}, {{name: other, port: 9090}}]\n"
        ));
        let svc = &s["hw.default.svc.cluster.local"];
        let ips: Vec<_> = svc.ports[0]
            .endpoints
            .iter()
            .map(|e| format!("{}:{}", e.ip, e.port))
            .collect();
        assert_eq!(ips, vec!["10.0.0.1:8080", "10.0.0.2:8080"]);
        // "admin" has no port of that name: the number 9090 picks it.
        assert_eq!(svc.ports[1].endpoints[0].port, 9090);
    }

    #[test]
    fn slices_win_and_unready_endpoints_are_left_out() {
        let s = services(&format!(
            "{SVC}---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: hw}}\nsubsets:\n\
             - addresses: [{{ip: 10.9.9.9}}]\n  ports: [{{name: http, port: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: hw-abc\n  labels: {{kubernetes.io/service-name: hw}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n\
             - addresses: [10.0.0.5]\n- addresses: [10.0.0.6]\n  conditions: {{ready: false}}\n"
        ));
        let eps = &s["hw.default.svc.cluster.local"].ports[0].endpoints;
        assert_eq!(
            eps,
            &vec![Endpoint {
                ip: "10.0.0.5".into(),
                port: 8080,
                mesh: None,
                pod: None,
                labels: BTreeMap::new(),
                locality: String::new(),
            }]
        );
    }

    #[test]
    fn mesh_endpoints_by_pod_ip_or_target_ref() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: hw}\nspec:\n  ports: [{port: 80, targetPort: 8080}]\n---\n\
            apiVersion: v1\nkind: Endpoints\nmetadata: {name: hw}\nsubsets:\n\
            - addresses:\n  - {ip: 10.0.0.1}\n  - {ip: 10.0.0.2, targetRef: {kind: Pod, name: hw-b}}\n  - {ip: 10.0.0.3}\n  ports: [{port: 8080}]\n---\n\
            apiVersion: v1\nkind: Pod\nmetadata: {name: hw-a, labels: {security.istio.io/tlsMode: istio}}\nspec: {serviceAccountName: hw, containers: []}\nstatus: {podIP: 10.0.0.1}\n---\n\
            apiVersion: v1\nkind: Pod\nmetadata: {name: hw-b, labels: {security.istio.io/tlsMode: istio}}\nspec: {containers: []}\n";
        let push = crate::model::PushContext::new(Arc::new(ConfigSnapshot::from_files(vec![parse_file(
            "t.yaml", yaml,
        )])));
        let mesh: Vec<Option<(String, String)>> = push.services["hw.default.svc.cluster.local"].ports[0]
            .endpoints
            .iter()
            .map(|e| e.mesh.clone())
            .collect();
        assert_eq!(
            mesh,
            vec![
                Some(("default".into(), "hw".into())),
                Some(("default".into(), "default".into())),
                None,
            ]
        );
    }
}
