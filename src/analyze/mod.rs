//! analyze: Istio's configuration analyzers, over one config snapshot.
//!
//! Each finding carries Istio's message code (`IST0101`
//! ReferencedResourceNotFound, `IST0106` SchemaValidationError, `IST0161`
//! InvalidGatewayCredential, `IST0103` PodMissingProxy, `IST0104`
//! GatewayPortNotOnWorkload, `IST0132` a VirtualService host its Gateway
//! does not accept, `IST0128`/`IST0129` a DestinationRule
//! originating TLS without verifying the server; meshd's own
//! `MSH0001` for a DestinationRule subset no route names, `MSH0002` for an
//! HTTPRoute parent it does not attach to, `MSH0003` for a Gateway API
//! listener that is not served, `MSH0004` for `httpsRedirect` on an HTTPS
//! server, where it does nothing, `MSH0005` for an HTTP probe STRICT mutual
//! TLS refuses; the request-policy analyzers in `security`: IST0101 for
//! an unknown namespace, IST0127 for a selector that selects nothing,
//! MSH0006 for a port no selected workload serves, MSH0007 for request
//! principals where no RequestAuthentication applies, MSH0008 for the
//! deprecated `targetRef`; `IST0108` for an unknown annotation of Istio's
//! domain, and `galley.istio.io/analyze-suppress` honoured; `MSH0009` for
//! a namespace without sidecars whose PeerAuthentication or mesh
//! VirtualService expects them; `MSH0010` for a GRPCRoute backend whose
//! Service port does not say it speaks HTTP/2; `MSH0011` for a route rule
//! with a filter meshd cannot apply, which answers with an error), the
//! resource and a reason that says what to do, so that the mistakes that
//! cost people hours (an unqualified gateway reference, a misspelt host)
//! are caught before a request is ever sent.

mod annotations;
mod security;

use std::fmt;

use serde::Serialize;

use crate::config::istio::Destination;
use crate::config::{ConfigSnapshot, Gateway, Kind, Origin, Resource, VirtualService};
use crate::model::peer_auth::{self, MtlsMode};
use crate::model::{is_subset, resolve_host, CredentialError, PodInfo, PushContext};
use crate::translate::resolve_gateway_ref;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Level {
    Error,
    Warning,
    Info,
}

/// One analyzer message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    pub level: Level,
    /// Istio's message code.
    pub code: &'static str,
    /// `VirtualService default/helloworld`.
    pub resource: String,
    pub origin: Option<Origin>,
    pub message: String,
}

impl Finding {
    /// A finding about the resource `key`, read from `entry`.
    pub fn about(
        level: Level,
        code: &'static str,
        key: &crate::config::ResourceKey,
        entry: &crate::config::Entry,
        message: String,
    ) -> Finding {
        Finding {
            level,
            code,
            resource: key.to_string(),
            origin: Some(entry.origin.clone()),
            message,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} [{}] ({}", self.level, self.code, self.resource)?;
        if let Some(o) = &self.origin {
            write!(f, ", {o}")?;
        }
        write!(f, ") {}", self.message)
    }
}

/// A `--suppress CODE=RESOURCE` rule, as `istioctl analyze` takes them:
/// RESOURCE as findings name it (`Kind namespace/name`), where `*` matches
/// any run of characters (`IST0104=Gateway istio-system/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppression {
    code: String,
    resource: String,
}

impl std::str::FromStr for Suppression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((code, resource)) if !code.trim().is_empty() && !resource.trim().is_empty() => {
                Ok(Suppression {
                    code: code.trim().to_string(),
                    resource: resource.trim().to_string(),
                })
            }
            _ => Err(format!(
                "{s:?}: expected CODE=RESOURCE, like \"IST0104=Gateway istio-system/*\""
            )),
        }
    }
}

impl Suppression {
    pub fn matches(&self, f: &Finding) -> bool {
        (self.code == "*" || self.code == f.code) && glob(&self.resource, &f.resource)
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else { return true };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i == parts.len() - 1 {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

/// Runs every analyzer; findings sorted by level, then resource.
pub fn analyze(config: &ConfigSnapshot) -> Vec<Finding> {
    analyze_at(config, std::time::SystemTime::now())
}

/// `analyze`, judging certificate validity at `now`.
pub fn analyze_at(config: &ConfigSnapshot, now: std::time::SystemTime) -> Vec<Finding> {
    analyze_push(&PushContext::new_at(std::sync::Arc::new(config.clone()), now))
}

/// A generation and what the analyzers found in it.
#[derive(Debug)]
pub struct Analysis {
    pub push: std::sync::Arc<PushContext>,
    pub findings: Vec<Finding>,
}

/// `analyze` over a push context already built (what `meshd serve` runs
/// on each new generation).
pub fn analyze_push(push: &PushContext) -> Vec<Finding> {
    let config = &*push.config;
    let mut out = Vec::new();
    for r in &config.rejections {
        out.push(Finding {
            level: Level::Error,
            code: "IST0106",
            resource: r
                .key
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "document".into()),
            origin: Some(r.origin.clone()),
            message: format!(
                "Schema validation error: {}{}",
                r.field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default(),
                r.reason
            ),
        });
    }
    sidecar_coverage(push, config, &mut out);
    sidecars_expected(push, config, &mut out);
    traffic_references(push, config, &mut out);
    gateway_servers(config, &mut out);
    probes_under_strict(push, config, &mut out);
    hosts_on_gateways(push, config, &mut out);
    destination_rule_tls(config, &mut out);
    gateway_api(config, &mut out);
    grpc_backends(push, config, &mut out);
    security::request_policies(push, config, &mut out);
    annotations::unknown(config, &mut out);
    for (key, entry) in &config.resources {
        let Resource::Ingress(ing) = &*entry.resource else {
            continue;
        };
        if !crate::model::ingress::served(config, ing) {
            let class = ing
                .spec
                .ingress_class_name
                .as_deref()
                .map_or("none".to_string(), |c| format!("{c:?}"));
            out.push(Finding::about(Level::Warning, "IST0101", key, entry, format!(
                    "Referenced ingress class not found: class {class} is not served by the mesh, so no gateway \
                     serves this Ingress (set ingressClassName: istio, or the annotation kubernetes.io/ingress.class: istio)"
                )));
        }
    }
    for (key, entry) in &config.resources {
        if let Resource::Gateway(gw) = &*entry.resource {
            let mut found = |code: &'static str, message: String| {
                out.push(Finding::about(Level::Error, code, key, entry, message))
            };
            gateway_credentials(push, config, gw, &mut found);
            continue;
        }
        if key.kind != Kind::VirtualService {
            continue;
        }
        let Resource::VirtualService(vs) = &*entry.resource else {
            continue;
        };
        let mut found =
            |message: String| out.push(Finding::about(Level::Error, "IST0101", key, entry, message));
        gateway_refs(push, vs, &mut found);
        destination_hosts(push, vs, &mut found);
    }
    annotations::suppressed(config, &mut out);
    out.sort();
    out.dedup();
    out
}

/// Gateway API trouble, as the status conditions a controller writes say
/// it: `MSH0002` for a route parent it does not attach to, `IST0101` for a
/// backend Service that does not exist, `MSH0003` for a listener that is
/// not served.
/// MSH0010: a GRPCRoute backend whose Service port neither its name nor
/// its `appProtocol` declares HTTP/2. Envoy then speaks HTTP/1.1 to it,
/// and every gRPC call through the route fails with a protocol error.
fn grpc_backends(push: &PushContext, config: &ConfigSnapshot, out: &mut Vec<Finding>) {
    for (key, entry) in &config.resources {
        let Resource::GrpcRoute(route) = &*entry.resource else {
            continue;
        };
        for (i, rule) in route.spec.rules.iter().enumerate() {
            for (j, b) in rule.backend_refs.iter().enumerate() {
                let ns = b.namespace.as_deref().unwrap_or(route.namespace());
                let host = format!("{}.{ns}.{}", b.name, crate::model::DOMAIN_SUFFIX);
                let port = b.port.and_then(|p| u16::try_from(p).ok());
                let Some(port) = push
                    .services
                    .get(&host)
                    .and_then(|s| port.and_then(|p| s.port(p)))
                else {
                    continue;
                };
                if port.is_http2() {
                    continue;
                }
                out.push(Finding::about(
                    Level::Warning,
                    "MSH0010",
                    key,
                    entry,
                    format!(
                        "spec.rules[{i}].backendRefs[{j}]: port {} of Service {ns}/{} is named {:?}{}, which does not \
                         say HTTP/2, so Envoy speaks HTTP/1.1 to it and every gRPC call fails with a protocol error: \
                         name the port grpc (or grpc-...), or set appProtocol: grpc",
                        port.port,
                        b.name,
                        port.name,
                        port.app_protocol
                            .as_ref()
                            .map(|a| format!(" with appProtocol {a:?}"))
                            .unwrap_or_default()
                    ),
                ));
            }
        }
    }
}

/// A Gateway's servers: `httpsRedirect` where it does nothing (MSH0004),
/// ports the gateway workload's Service does not expose (IST0104).
fn gateway_servers(config: &ConfigSnapshot, out: &mut Vec<Finding>) {
    for (key, entry) in &config.resources {
        let Resource::Gateway(gw) = &*entry.resource else {
            continue;
        };
        let mut found = |code: &'static str, message: String| {
            out.push(Finding::about(Level::Warning, code, key, entry, message))
        };
        // The Services in front of the gateway's pods: what selects them.
        let services: Vec<(String, Vec<i32>)> = config
            .of_kind(Kind::Service)
            .filter_map(|r| match r {
                Resource::Service(svc) => Some(svc),
                _ => None,
            })
            .filter_map(|svc| {
                let spec = svc.spec.as_ref()?;
                let selector = spec.selector.as_ref().filter(|s| !s.is_empty())?;
                let selects = is_subset(selector, &gw.spec.selector)
                    || (!gw.spec.selector.is_empty() && is_subset(&gw.spec.selector, selector));
                selects.then(|| {
                    let name = format!(
                        "{}/{}",
                        svc.metadata.namespace.as_deref().unwrap_or("default"),
                        svc.metadata.name.as_deref().unwrap_or_default()
                    );
                    let ports = spec.ports.iter().flatten().map(|p| p.port).collect();
                    (name, ports)
                })
            })
            .collect();
        for (i, server) in gw.spec.servers.iter().enumerate() {
            let Some(port) = &server.port else { continue };
            let https = ["HTTPS", "TLS"].contains(&port.protocol.to_ascii_uppercase().as_str());
            if https && server.tls.as_ref().is_some_and(|t| t.https_redirect) {
                found(
                    "MSH0004",
                    format!(
                        "spec.servers[{i}].tls.httpsRedirect is set on the {} server on port {}, where it does \
                         nothing: requests there are already TLS. Set it on the HTTP server (port 80) of the \
                         hosts you want redirected to https",
                        port.protocol, port.number
                    ),
                );
            }
            let exposed = services
                .iter()
                .any(|(_, ports)| ports.iter().any(|p| i64::from(*p) == i64::from(port.number)));
            if !services.is_empty() && !exposed {
                let selector: Vec<String> =
                    gw.spec.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let names: Vec<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
                found(
                    "IST0104",
                    format!(
                        "The gateway refers to a port that is not exposed on the workload (pod selector {}; port \
                         {}): add port {} to Service {}, or use one of its ports",
                        selector.join(","),
                        port.number,
                        port.number,
                        names.join(", ")
                    ),
                );
            }
        }
    }
}

/// HTTP probes the kubelet sends in plain text to a port where STRICT
/// mutual TLS refuses them (MSH0005): the pod never becomes ready, or is
/// restarted, and nothing in the app's logs says why.
fn probes_under_strict(push: &PushContext, config: &ConfigSnapshot, out: &mut Vec<Finding>) {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    for (key, entry) in &config.resources {
        let Resource::Pod(pod) = &*entry.resource else {
            continue;
        };
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let meshed = labels.get("security.istio.io/tlsMode").map(String::as_str) == Some("istio");
        let Some(spec) = pod.spec.as_ref().filter(|_| meshed) else {
            continue;
        };
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let mtls = peer_auth::resolve(push, namespace, &labels);
        for c in spec.containers.iter().filter(|c| c.name != "istio-proxy") {
            let probes = [
                ("liveness", &c.liveness_probe),
                ("readiness", &c.readiness_probe),
                ("startup", &c.startup_probe),
            ];
            for (kind, probe) in probes {
                let Some(get) = probe.as_ref().and_then(|p| p.http_get.as_ref()) else {
                    continue;
                };
                let port = match &get.port {
                    IntOrString::Int(n) => u16::try_from(*n).ok(),
                    IntOrString::String(name) => c
                        .ports
                        .iter()
                        .flatten()
                        .find(|p| p.name.as_deref() == Some(name))
                        .and_then(|p| u16::try_from(p.container_port).ok()),
                };
                let Some(port) = port.filter(|p| *p != crate::inject::PROBE_PORT) else {
                    continue;
                };
                if mtls.for_port(port) != MtlsMode::Strict {
                    continue;
                }
                out.push(Finding::about(Level::Warning, "MSH0005", key, entry, format!(
                        "container {}: the kubelet's {kind} probe (HTTP, port {port}) is plain text, and STRICT \
                         mutual TLS on that port refuses it, so the pod never passes it. Inject the pod with \
                         `meshd inject` (it rewrites HTTP probes to the sidecar's {}), or give port {port} a \
                         PERMISSIVE portLevelMtls",
                        c.name,
                        crate::inject::PROBE_PORT
                    )));
            }
        }
    }
}

/// VirtualService hosts that no server of a Gateway it binds to accepts
/// (IST0132): the route exists but that gateway never serves it.
fn hosts_on_gateways(push: &PushContext, config: &ConfigSnapshot, out: &mut Vec<Finding>) {
    for (key, entry) in &config.resources {
        let Resource::VirtualService(vs) = &*entry.resource else {
            continue;
        };
        for reference in &vs.spec.gateways {
            let Some(gw_key) = resolve_gateway_ref(reference, vs.namespace()) else {
                continue; // mesh
            };
            let Some(gw) = push.gateways.get(&gw_key) else {
                continue; // IST0101 says so
            };
            let missing: Vec<&str> = vs
                .spec
                .hosts
                .iter()
                .filter(|h| {
                    !gw.spec.servers.iter().any(|server| {
                        server
                            .hosts
                            .iter()
                            .any(|sh| crate::translate::gateway_host_intersect(vs, h, gw, sh).is_some())
                    })
                })
                .map(String::as_str)
                .collect();
            if missing.is_empty() {
                continue;
            }
            out.push(Finding::about(
                Level::Warning,
                "IST0132",
                key,
                entry,
                format!(
                    "one or more host [{}] defined in VirtualService {}/{} not found in Gateway {}/{}: add \
                     it to the hosts of one of the Gateway's servers, or fix the host",
                    missing.join(", "),
                    vs.namespace(),
                    vs.name(),
                    gw_key.0,
                    gw_key.1
                ),
            ));
        }
    }
}

/// DestinationRules that originate TLS without verifying the server:
/// IST0128 (the rule's policy), IST0129 (a port's).
fn destination_rule_tls(config: &ConfigSnapshot, out: &mut Vec<Finding>) {
    for (key, entry) in &config.resources {
        let Resource::DestinationRule(dr) = &*entry.resource else {
            continue;
        };
        let Some(policy) = &dr.spec.traffic_policy else {
            continue;
        };
        let unverified = |tls: &crate::config::istio::ClientTlsSettings| {
            let mode = tls.mode.as_deref().unwrap_or_default();
            ["SIMPLE", "MUTUAL"].contains(&mode)
                && tls.ca_certificates.as_deref().unwrap_or_default().is_empty()
                && tls.credential_name.as_deref().unwrap_or_default().is_empty()
                && tls.insecure_skip_verify != Some(true)
        };
        let mut found = |code: &'static str, mode: &str, port: Option<u32>| {
            let at = port.map(|p| format!(" on port {p}")).unwrap_or_default();
            out.push(Finding::about(Level::Warning, code, key, entry, format!(
                    "TLS mode is {mode}{at} but no caCertificates (or credentialName) are set to validate the \
                     server identity of host {}: the proxy connects to whatever answers. Set caCertificates, \
                     or insecureSkipVerify: true if that is meant",
                    dr.spec.host
                )));
        };
        if let Some(tls) = policy.tls.as_ref().filter(|t| unverified(t)) {
            found("IST0128", tls.mode.as_deref().unwrap_or_default(), None);
        }
        for p in &policy.port_level_settings {
            if let Some(tls) = p.tls.as_ref().filter(|t| unverified(t)) {
                let number = p.port.as_ref().map(|p| p.number);
                found("IST0129", tls.mode.as_deref().unwrap_or_default(), number);
            }
        }
    }
}

fn gateway_api(config: &ConfigSnapshot, out: &mut Vec<Finding>) {
    use crate::model::gateway_status::{gateway_status, route_status};
    let failed = |conditions: &serde_json::Value, kind: &str| {
        conditions.as_array().into_iter().flatten().find_map(|c| {
            // Conflicted and PartiallyInvalid are negative: True means trouble.
            let negative = matches!(kind, "Conflicted" | "PartiallyInvalid");
            let bad = c["type"] == kind && c["status"] == if negative { "True" } else { "False" };
            bad.then(|| {
                format!(
                    "{}: {}",
                    c["reason"].as_str().unwrap_or_default(),
                    c["message"].as_str().unwrap_or_default()
                )
            })
        })
    };
    for (key, entry) in &config.resources {
        let mut add =
            |level, code, message: String| out.push(Finding::about(level, code, key, entry, message));
        match &*entry.resource {
            Resource::HttpRoute(_)
            | Resource::GrpcRoute(_)
            | Resource::TcpRoute(_)
            | Resource::TlsRoute(_) => {
                let Some(route) = crate::model::gateway_api::as_http(&entry.resource) else {
                    continue;
                };
                let status = route_status(config, &route);
                for parent in status["parents"].as_array().into_iter().flatten() {
                    let name = parent["parentRef"]["name"].as_str().unwrap_or_default();
                    if let Some(why) = failed(&parent["conditions"], "Accepted") {
                        add(
                            Level::Warning,
                            "MSH0002",
                            format!("Not attached to parent {name}: {why}"),
                        );
                    }
                    if let Some(why) = failed(&parent["conditions"], "ResolvedRefs") {
                        add(
                            Level::Error,
                            "IST0101",
                            format!("Referenced backend not found: {why}"),
                        );
                    }
                    if let Some(why) = failed(&parent["conditions"], "PartiallyInvalid") {
                        add(
                            Level::Error,
                            "MSH0011",
                            format!("A rule answers every request with an error: {why}"),
                        );
                    }
                }
            }
            Resource::K8sGateway(gw) => {
                let Some(status) = gateway_status(config, gw, true) else {
                    continue;
                };
                for l in status["listeners"].as_array().into_iter().flatten() {
                    let name = l["name"].as_str().unwrap_or_default();
                    for kind in ["Accepted", "ResolvedRefs", "Conflicted"] {
                        if let Some(why) = failed(&l["conditions"], kind) {
                            add(
                                Level::Warning,
                                "MSH0003",
                                format!("Listener {name} is not served: {why}"),
                            );
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// IST0103 PodMissingProxy: a pod without a sidecar where the mesh expects
/// one (its namespace has meshed pods or asks for injection), saying which
/// STRICT workloads will refuse its plain text.
fn sidecar_coverage(push: &PushContext, config: &ConfigSnapshot, out: &mut Vec<Finding>) {
    let injection_enabled = |ns: &str| injection_enabled(config, ns);
    let pods: Vec<&PodInfo> = push.pods.values().map(AsRef::as_ref).collect();
    let strict: Vec<String> = pods
        .iter()
        .filter(|p| p.mesh)
        .filter(|p| {
            let m = peer_auth::resolve(push, &p.namespace, &p.labels);
            m.mode == MtlsMode::Strict || m.ports.values().any(|m| *m == MtlsMode::Strict)
        })
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    for pod in pods.iter().filter(|p| !p.mesh) {
        let meshed_neighbours = pods.iter().any(|p| p.mesh && p.namespace == pod.namespace);
        if !meshed_neighbours && !injection_enabled(&pod.namespace) {
            continue;
        }
        let refused = match strict.as_slice() {
            [] => String::new(),
            s => format!(
                "; STRICT mutual TLS refuses its plain-text connections to {}",
                s.join(", ")
            ),
        };
        out.push(Finding {
            level: Level::Warning,
            code: "IST0103",
            resource: format!("Pod {}/{}", pod.namespace, pod.name),
            origin: None,
            message: format!("The pod is missing the Istio proxy{refused}"),
        });
    }
}

/// Whether the namespace is labelled `istio-injection=enabled`.
fn injection_enabled(config: &ConfigSnapshot, ns: &str) -> bool {
    config.of_kind(Kind::Namespace).any(|r| {
        r.metadata().name.as_deref() == Some(ns)
            && r.metadata()
                .labels
                .as_ref()
                .is_some_and(|l| l.get("istio-injection").map(String::as_str) == Some("enabled"))
    })
}

/// `MSH0009`: a namespace whose workloads all run without sidecars (and
/// where injection is not enabled) while its own resources expect them: a
/// PeerAuthentication asking for mutual TLS that no sidecar enforces, or a
/// mesh VirtualService that the requests its workloads send never meet.
fn sidecars_expected(push: &PushContext, config: &ConfigSnapshot, out: &mut Vec<Finding>) {
    let mut namespaces: std::collections::BTreeMap<&str, (usize, usize)> = std::collections::BTreeMap::new();
    for pod in push.pods.values() {
        let e = namespaces.entry(pod.namespace.as_str()).or_default();
        e.0 += 1;
        e.1 += usize::from(pod.mesh);
    }
    let injection = |ns: &str| injection_enabled(config, ns);
    let bare: Vec<&str> = namespaces
        .iter()
        .filter(|(ns, (pods, meshed))| *pods > 0 && *meshed == 0 && !injection(ns))
        .map(|(ns, _)| *ns)
        .collect();
    let advice = "label the namespace istio-injection=enabled (or inject its workloads) and restart its pods";
    for (key, entry) in &config.resources {
        if !bare.contains(&&*key.namespace) {
            continue;
        }
        let message = match &*entry.resource {
            Resource::PeerAuthentication(pa) => {
                let modes = pa.spec.mtls.iter().chain(pa.spec.port_level_mtls.values());
                let strict = modes.filter_map(|m| m.mode.as_deref()).any(|m| m == "STRICT");
                strict.then(|| {
                    format!(
                        "the workloads of namespace {} run without sidecars, so nothing enforces this STRICT mutual TLS and they accept plain text: {advice}",
                        key.namespace
                    )
                })
            }
            Resource::VirtualService(vs) => {
                let mesh = vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh");
                (mesh && !vs.spec.hosts.is_empty()).then(|| {
                    format!(
                        "the workloads of namespace {} run without sidecars, so the requests they send to {} do not follow this VirtualService's routes: {advice}",
                        key.namespace,
                        vs.spec.hosts.join(", ")
                    )
                })
            }
            _ => None,
        };
        if let Some(message) = message {
            out.push(Finding::about(Level::Warning, "MSH0009", key, entry, message));
        }
    }
}

/// Subsets routed to but not defined, subsets that select no endpoint,
/// Gateways whose selector picks no known workload, and VirtualServices
/// that share a host on one Gateway.
fn traffic_references(push: &PushContext, config: &ConfigSnapshot, out: &mut Vec<Finding>) {
    let mut add = |level: Level, code: &'static str, key: &crate::config::ResourceKey, message: String| {
        let origin = config.resources.get(key).map(|e| e.origin.clone());
        out.push(Finding {
            level,
            code,
            resource: key.to_string(),
            origin,
            message,
        });
    };
    let key = |kind: Kind, ns: &str, name: &str| crate::config::ResourceKey {
        kind,
        namespace: ns.into(),
        name: name.into(),
    };
    let mut on_gateway: std::collections::BTreeMap<(String, String, String), Vec<String>> =
        Default::default();
    for vs in &push.virtual_services {
        let vs_key = key(Kind::VirtualService, vs.namespace(), vs.name());
        if !config.resources.contains_key(&vs_key) {
            continue; // made from an Ingress
        }
        let dests = vs
            .spec
            .http
            .iter()
            .flat_map(|h| h.route.iter().filter_map(|r| r.destination.as_ref()));
        for d in dests {
            let Some(subset) = &d.subset else { continue };
            let host = resolve_host(&d.host, vs.namespace());
            let svc_ns = push
                .services
                .get(&host)
                .map(|s| s.namespace.clone())
                .unwrap_or_default();
            let defined = push
                .destination_rule(vs.namespace(), &Default::default(), &host, &svc_ns)
                .is_some_and(|dr| dr.spec.subsets.iter().any(|s| &s.name == subset));
            if !defined {
                add(
                    Level::Error,
                    "IST0101",
                    &vs_key,
                    format!(
                        "Referenced host+subset in destinationrule not found: \"{}+{subset}\"",
                        d.host
                    ),
                );
            }
        }
        for gw in &vs.spec.gateways {
            if let Some((ns, name)) = resolve_gateway_ref(gw, vs.namespace()) {
                for h in &vs.spec.hosts {
                    on_gateway
                        .entry((ns.clone(), name.clone(), h.clone()))
                        .or_default()
                        .push(format!("{}/{}", vs.namespace(), vs.name()));
                }
            }
        }
    }
    for ((ns, name, host), vss) in on_gateway {
        if vss.len() > 1 {
            let first = vss[0].split_once('/').unwrap_or_default();
            add(
                Level::Warning,
                "IST0109",
                &key(Kind::VirtualService, first.0, first.1),
                format!(
                    "The VirtualServices {} on Gateway {ns}/{name} all define host {host}: their rules are merged oldest first, and a later rule may never match",
                    vss.join(", ")
                ),
            );
        }
    }
    // Every (host, subset) a route, mirror or L4 route names.
    let mut used: std::collections::BTreeSet<(String, String)> = Default::default();
    for vs in &push.virtual_services {
        for d in destinations(vs) {
            if let Some(subset) = &d.subset {
                used.insert((resolve_host(&d.host, vs.namespace()), subset.clone()));
            }
        }
    }
    for dr in &push.destination_rules {
        let dr_host = resolve_host(&dr.spec.host, dr.namespace());
        if !dr_host.starts_with('*') {
            for subset in &dr.spec.subsets {
                if !used.contains(&(dr_host.clone(), subset.name.clone())) {
                    add(
                        Level::Info,
                        "MSH0001",
                        &key(Kind::DestinationRule, dr.namespace(), dr.name()),
                        format!(
                            "Subset {:?} of {dr_host} is named by no VirtualService route: no traffic reaches it",
                            subset.name
                        ),
                    );
                }
            }
        }
        let Some(svc) = push.services.get(&dr_host) else {
            continue;
        };
        for subset in &dr.spec.subsets {
            let selects = svc
                .ports
                .iter()
                .flat_map(|p| p.endpoints.iter())
                .any(|e| is_subset(&subset.labels, &e.labels));
            if !selects {
                add(
                    Level::Warning,
                    "IST0101",
                    &key(Kind::DestinationRule, dr.namespace(), dr.name()),
                    format!(
                        "Referenced subset {:?} selects no endpoint of {} (no Pod carries its labels)",
                        subset.name, svc.hostname
                    ),
                );
            }
        }
    }
    // Only where the config describes the Gateway's namespace's Pods:
    // elsewhere the gateway workloads are simply not in the files.
    {
        for ((ns, name), gw) in &push.gateways {
            let gw_key = key(Kind::Gateway, ns, name);
            let pods_known = push.pods.values().any(|p| &p.namespace == ns);
            if !config.resources.contains_key(&gw_key) || !pods_known {
                continue;
            }
            if !push
                .pods
                .values()
                .any(|p| is_subset(&gw.spec.selector, &p.labels))
            {
                let selector: Vec<String> =
                    gw.spec.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                add(
                    Level::Error,
                    "IST0101",
                    &gw_key,
                    format!("Referenced selector not found: \"{}\"", selector.join(",")),
                );
            }
        }
    }
}

/// The namespaces a Gateway's workloads run in: those of the Pods its
/// selector picks, else the Gateway's own (where such Pods usually are).
fn workload_namespaces(config: &ConfigSnapshot, gw: &Gateway) -> Vec<String> {
    let mut namespaces: Vec<String> = config
        .of_kind(Kind::Pod)
        .filter_map(|r| match r {
            Resource::Pod(p) => {
                let labels = p
                    .metadata
                    .labels
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                is_subset(&gw.spec.selector, &labels)
                    .then(|| p.metadata.namespace.clone().unwrap_or_default())
            }
            _ => None,
        })
        .collect();
    namespaces.sort();
    namespaces.dedup();
    if namespaces.is_empty() {
        namespaces.push(gw.namespace().to_string());
    }
    namespaces
}

/// IST0101 for a credentialName with no Secret where the gateway runs,
/// IST0161 for one whose certificate is unusable.
fn gateway_credentials(
    push: &PushContext,
    config: &ConfigSnapshot,
    gw: &Gateway,
    found: &mut impl FnMut(&'static str, String),
) {
    for (i, server) in gw.spec.servers.iter().enumerate() {
        let Some(tls) = &server.tls else { continue };
        let Some(name) = tls
            .credential_name
            .as_deref()
            .or(tls.credential_names.first().map(String::as_str))
        else {
            continue;
        };
        let mode = tls.mode.as_deref().unwrap_or("PASSTHROUGH");
        if !matches!(mode, "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL") {
            continue;
        }
        for ns in workload_namespaces(config, gw) {
            let mut report = |e: CredentialError| {
                match e {
                CredentialError::Missing { namespace, name } => found(
                    "IST0101",
                    format!(
                        "Referenced credentialName not found: \"{name}\" (spec.servers[{i}].tls; no Secret {namespace}/{name}: \
                         a gateway reads Secrets from the namespace its pods run in)"
                    ),
                ),
                other => found(
                    "IST0161",
                    format!("InvalidGatewayCredential: spec.servers[{i}].tls.credentialName: {other}"),
                ),
            }
            };
            if let Err(e) = push.credentials.server(&ns, name) {
                report(e);
            }
            if mode != "SIMPLE" {
                match push.credentials.client_ca(&ns, name) {
                    Err(e) => report(e),
                    Ok((source, bundle)) => {
                        if let Some(problem) = crate::model::not_a_ca(&bundle) {
                            found(
                                "IST0161",
                                format!(
                                    "InvalidGatewayCredential: spec.servers[{i}].tls.credentialName: Secret {ns}/{source}: \
                                     {problem}: client certificates are checked against it and none will verify. Put \
                                     the CA that signs the clients' certificates there (not the server's own certificate)"
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
}

fn gateway_refs(push: &PushContext, vs: &VirtualService, found: &mut impl FnMut(String)) {
    let in_matches = vs
        .spec
        .http
        .iter()
        .flat_map(|h| h.matches.iter().flat_map(|m| m.gateways.iter()));
    for reference in vs.spec.gateways.iter().chain(in_matches) {
        let Some((ns, name)) = resolve_gateway_ref(reference, vs.namespace()) else {
            continue;
        };
        if push.gateways.contains_key(&(ns.clone(), name.clone())) {
            continue;
        }
        let elsewhere: Vec<String> = push
            .gateways
            .keys()
            .filter(|(_, n)| *n == name)
            .map(|(other_ns, n)| format!("{other_ns}/{n}"))
            .collect();
        let hint = match elsewhere.as_slice() {
            [] => String::new(),
            [one] => format!("; a Gateway of that name exists in another namespace: write \"{one}\""),
            many => format!("; Gateways of that name exist as {}", many.join(", ")),
        };
        found(format!(
            "Referenced gateway not found: \"{reference}\" (looked for Gateway {ns}/{name}{}){hint}",
            if reference.contains('/') {
                ""
            } else {
                ": an unqualified name means the VirtualService's own namespace"
            }
        ));
    }
}

/// Every destination a VirtualService names: HTTP routes and mirrors,
/// then TLS and TCP routes.
fn destinations(vs: &VirtualService) -> impl Iterator<Item = &Destination> {
    let spec = &vs.spec;
    let http = spec.http.iter().flat_map(|h| {
        h.route
            .iter()
            .filter_map(|r| r.destination.as_ref())
            .chain(h.mirror.as_ref())
            .chain(h.mirrors.iter().filter_map(|m| m.destination.as_ref()))
    });
    let l4 = spec
        .tls
        .iter()
        .flat_map(|t| t.route.iter())
        .chain(spec.tcp.iter().flat_map(|t| t.route.iter()))
        .filter_map(|r| r.destination.as_ref());
    http.chain(l4)
}

fn destination_hosts(push: &PushContext, vs: &VirtualService, found: &mut impl FnMut(String)) {
    for dest in destinations(vs) {
        check_destination(push, vs, dest, found);
    }
}

fn check_destination(
    push: &PushContext,
    vs: &VirtualService,
    dest: &Destination,
    found: &mut impl FnMut(String),
) {
    if dest.host.starts_with('*') {
        return;
    }
    let fqdn = resolve_host(&dest.host, vs.namespace());
    let Some(svc) = push.services.get(&fqdn) else {
        let resolved = if fqdn == dest.host {
            String::new()
        } else {
            format!(" (resolved as {fqdn})")
        };
        found(format!("Referenced host not found: \"{}\"{resolved}", dest.host));
        return;
    };
    if let Some(port) = &dest.port {
        if u16::try_from(port.number)
            .ok()
            .and_then(|p| svc.port(p))
            .is_none()
        {
            let ports: Vec<String> = svc.ports.iter().map(|p| p.port.to_string()).collect();
            found(format!(
                "Referenced host \"{}\" has no port {} (its ports: {})",
                dest.host,
                port.number,
                ports.join(", ")
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_file;

    const GW: &str = "apiVersion: networking.istio.io/v1beta1\nkind: Gateway\nmetadata: {name: ingressgateway, namespace: istio-system}\n\
        spec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\n";
    const SVC: &str =
        "apiVersion: v1\nkind: Service\nmetadata: {name: helloworld}\nspec:\n  ports: [{port: 80}]\n";

    fn vs(gateway: &str, host: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {{name: helloworld}}\nspec:\n  hosts: [helloworld.fireflyclass.com]\n  gateways: [{gateway}]\n  http:\n  - route:\n    - destination: {{host: {host}, port: {{number: 80}}}}\n"
        )
    }

    fn findings(docs: &[&str]) -> Vec<Finding> {
        analyze(&ConfigSnapshot::from_files(vec![parse_file(
            "c.yaml",
            &docs.join("---\n"),
        )]))
    }

    #[test]
    fn unqualified_gateway_is_ist0101_with_a_hint() {
        let f = findings(&[
            GW,
            SVC,
            &vs("ingressgateway", "helloworld.default.svc.cluster.local"),
        ]);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].code, "IST0101");
        let line = f[0].to_string();
        assert!(line.contains("Gateway default/ingressgateway"), "{line}");
        assert!(line.contains("\"istio-system/ingressgateway\""), "{line}");
    }

    #[test]
    fn qualified_gateway_and_known_host_are_clean() {
        assert_eq!(
            findings(&[GW, SVC, &vs("istio-system/ingressgateway", "helloworld")]),
            vec![]
        );
    }

    #[test]
    fn gateway_credentials_missing_invalid_and_expired() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden/gateway-tls/config");
        let files = crate::source::load_dir(&dir).expect("testdata");
        let in_2030 = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_893_456_000);
        let f = analyze_at(&ConfigSnapshot::from_files(files), in_2030);
        // The broken servers' ports are not on the gateway's Service either
        // (IST0104), the HTTPS server carries the seed's httpsRedirect
        // (MSH0004), and one VirtualService binds a gateway that accepts
        // only one of its hosts (IST0132): only the credential findings are
        // looked at here.
        assert!(f
            .iter()
            .any(|f| f.code == "MSH0004" && f.message.starts_with("spec.servers[0]")));
        let lines: Vec<String> = f
            .iter()
            .filter(|f| !["IST0104", "IST0132", "MSH0004"].contains(&f.code))
            .map(|f| format!("{} {}", f.code, f.message))
            .collect();
        let has = |code: &str, text: &str| lines.iter().any(|l| l.starts_with(code) && l.contains(text));
        assert!(has("IST0101", "\"missing-credential\""), "{lines:#?}");
        assert!(has("IST0101", "noca-credential-cacert"), "{lines:#?}");
        assert!(has("IST0161", "does not match the key"), "{lines:#?}");
        assert!(has("IST0161", "expired"), "{lines:#?}");
        assert_eq!(lines.len(), 4, "the good credentials raise nothing: {lines:#?}");
    }

    #[test]
    fn pods_without_sidecars_are_warned_about_strict() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden/sidecar-mtls/config");
        let f = analyze(&ConfigSnapshot::from_files(
            crate::source::load_dir(&dir).expect("testdata"),
        ));
        let missing: Vec<&Finding> = f.iter().filter(|f| f.code == "IST0103").collect();
        assert_eq!(missing.len(), 1, "{f:#?}");
        assert_eq!(missing[0].resource, "Pod default/curltest");
        assert_eq!(missing[0].level, Level::Warning);
        assert!(
            missing[0].message.contains("STRICT mutual TLS refuses"),
            "{}",
            missing[0].message
        );
    }

    #[test]
    fn subsets_selectors_and_shared_hosts() {
        let docs = [
            GW,
            SVC,
            "apiVersion: v1\nkind: Pod\nmetadata: {name: hw-1, labels: {app: helloworld, version: v1}}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.1}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: gw-1, namespace: istio-system, labels: {istio: other}}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.9}\n",
            "apiVersion: v1\nkind: Endpoints\nmetadata: {name: helloworld}\nsubsets:\n- addresses: [{ip: 10.0.0.1}]\n  ports: [{port: 8080}]\n",
            "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: hw}\nspec:\n  host: helloworld\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n",
            "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: a}\nspec:\n  hosts: [h.example.com]\n  gateways: [istio-system/ingressgateway]\n  http:\n  - route:\n    - destination: {host: helloworld, subset: v3}\n",
            "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: b}\nspec:\n  hosts: [h.example.com]\n  gateways: [istio-system/ingressgateway]\n  http:\n  - route:\n    - destination: {host: helloworld, subset: v1}\n",
        ];
        let f = findings(&docs);
        let lines: Vec<String> = f
            .iter()
            .map(|f| format!("{} {} {}", f.code, f.resource, f.message))
            .collect();
        let has = |code: &str, text: &str| lines.iter().any(|l| l.starts_with(code) && l.contains(text));
        assert!(has("IST0101", "\"helloworld+v3\""), "{lines:#?}");
        assert!(has("IST0101", "subset \"v2\" selects no endpoint"), "{lines:#?}");
        assert!(
            has(
                "IST0101",
                "Referenced selector not found: \"istio=ingressgateway\""
            ),
            "{lines:#?}"
        );
        assert!(has("IST0109", "define host h.example.com"), "{lines:#?}");
        let unused: Vec<&Finding> = f.iter().filter(|f| f.code == "MSH0001").collect();
        assert_eq!(unused.len(), 1, "only v2 is named by no route: {lines:#?}");
        assert_eq!(unused[0].level, Level::Info);
        assert!(unused[0].message.contains("Subset \"v2\""), "{lines:#?}");
    }

    #[test]
    fn unknown_host_and_port() {
        let f = findings(&[GW, SVC, &vs("istio-system/ingressgateway", "hellowrld")]);
        assert!(
            f[0].message.contains("Referenced host not found: \"hellowrld\""),
            "{f:?}"
        );
    }

    #[test]
    fn gateway_api_routes_and_listeners_that_are_not_served() {
        let f = findings(&[
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: web, namespace: default}\n\
             spec:\n  gatewayClassName: istio\n  listeners:\n  - {name: http, port: 80, protocol: HTTP}\n  \
             - {name: udp, port: 53, protocol: UDP}\n",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: default}\n\
             spec:\n  parentRefs: [{name: web, sectionName: admin}]\n  rules: [{backendRefs: [{name: nowhere, port: 80}]}]\n",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: ext, namespace: default}\n\
             spec:\n  parentRefs: [{name: web}]\n  rules: [{filters: [{type: ExtensionRef}]}]\n",
        ]);
        let codes: Vec<(&str, &str)> = f.iter().map(|f| (f.code, f.resource.as_str())).collect();
        assert!(codes.contains(&("MSH0002", "HTTPRoute default/r")), "{f:?}");
        assert!(codes.contains(&("IST0101", "HTTPRoute default/r")), "{f:?}");
        assert!(codes.contains(&("MSH0011", "HTTPRoute default/ext")), "{f:?}");
        assert!(
            codes.contains(&("MSH0003", "Gateway.gateway.networking.k8s.io default/web")),
            "{f:?}"
        );
    }

    #[test]
    fn a_grpc_route_to_a_port_that_does_not_say_http2_is_msh0010() {
        let docs = |port_name: &str| {
            [
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: rpc, namespace: default}}\n\
                     spec: {{ports: [{{name: {port_name}, port: 9000}}]}}\n"
                ),
                "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: r, namespace: default}\n\
                 spec: {rules: [{backendRefs: [{name: rpc, port: 9000}]}]}\n"
                    .to_string(),
            ]
        };
        let codes_for = |port_name: &str| {
            let docs = docs(port_name);
            let f = findings(&[&docs[0], &docs[1]]);
            f.iter()
                .filter(|f| f.code == "MSH0010")
                .map(|f| f.message.clone())
                .collect::<Vec<_>>()
        };
        let found = codes_for("http");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("appProtocol: grpc"), "{found:?}");
        assert!(codes_for("grpc").is_empty());
        assert!(codes_for("grpc-api").is_empty());
    }

    const GW_SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: istio-ingressgateway, namespace: istio-system}\n\
        spec:\n  selector: {istio: ingressgateway}\n  ports: [{name: http2, port: 80}, {name: https, port: 443}]\n";

    fn gateway(servers: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1beta1\nkind: Gateway\nmetadata: {{name: gw, namespace: istio-system}}\n\
             spec:\n  selector: {{istio: ingressgateway}}\n  servers:\n{servers}"
        )
    }

    fn codes(f: &[Finding]) -> Vec<&'static str> {
        f.iter().map(|f| f.code).collect()
    }

    #[test]
    fn a_gateway_port_the_service_does_not_expose_is_ist0104() {
        let http = "  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\n";
        assert_eq!(codes(&findings(&[GW_SVC, &gateway(http)])), Vec::<&str>::new());
        let odd = "  - port: {number: 8080, name: http, protocol: HTTP}\n    hosts: ['*']\n";
        let f = findings(&[GW_SVC, &gateway(odd)]);
        assert_eq!(codes(&f), ["IST0104"], "{f:?}");
        assert!(
            f[0].message.contains("port 8080") && f[0].message.contains("istio-system/istio-ingressgateway")
        );
        // Without a Service in front of the gateway there is nothing to compare.
        assert_eq!(codes(&findings(&[&gateway(odd)])), Vec::<&str>::new());
    }

    #[test]
    fn https_redirect_on_the_https_server_is_msh0004() {
        let tls = "    tls: {mode: SIMPLE, credentialName: cert, httpsRedirect: true}\n";
        let on_https =
            format!("  - port: {{number: 443, name: https, protocol: HTTPS}}\n    hosts: ['*']\n{tls}");
        let f = findings(&[GW_SVC, &gateway(&on_https)]);
        let redirect: Vec<&Finding> = f.iter().filter(|f| f.code == "MSH0004").collect();
        assert_eq!(redirect.len(), 1, "{f:?}");
        assert!(
            redirect[0].message.contains("HTTP server (port 80)"),
            "{}",
            redirect[0].message
        );
        // Where it belongs, on the HTTP server, it is fine.
        let on_http = "  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\n    tls: {httpsRedirect: true}\n";
        assert!(!codes(&findings(&[GW_SVC, &gateway(on_http)])).contains(&"MSH0004"));
    }

    #[test]
    fn tls_origination_without_a_ca_is_ist0128_or_ist0129_per_port() {
        let dr = |policy: &str| {
            format!(
                "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {{name: ext}}\n\
                 spec:\n  host: api.example.com\n  trafficPolicy:\n{policy}"
            )
        };
        let se = "apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\nmetadata: {name: ext}\n\
                  spec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: DNS\n";
        let f = findings(&[se, &dr("    tls: {mode: SIMPLE}\n")]);
        assert_eq!(codes(&f), ["IST0128"], "{f:?}");
        assert!(f[0].message.contains("api.example.com"));
        let f = findings(&[
            se,
            &dr("    portLevelSettings:\n    - port: {number: 443}\n      tls: {mode: SIMPLE}\n"),
        ]);
        assert_eq!(codes(&f), ["IST0129"], "{f:?}");
        assert!(f[0].message.contains("on port 443"));
        let verified = dr("    tls: {mode: SIMPLE, caCertificates: /etc/certs/ca.pem}\n");
        assert_eq!(codes(&findings(&[se, &verified])), Vec::<&str>::new());
        let mesh = dr("    tls: {mode: ISTIO_MUTUAL}\n");
        assert_eq!(codes(&findings(&[se, &mesh])), Vec::<&str>::new());
    }

    #[test]
    fn suppressions_match_code_and_resource_globs() {
        let f = Finding {
            level: Level::Warning,
            code: "IST0104",
            resource: "Gateway istio-system/gw".into(),
            origin: None,
            message: String::new(),
        };
        let rule = |s: &str| s.parse::<Suppression>().expect("rule");
        assert!(rule("IST0104=Gateway istio-system/*").matches(&f));
        assert!(rule("IST0104=*").matches(&f));
        assert!(rule("*=Gateway */gw").matches(&f));
        assert!(rule("IST0104=Gateway istio-system/gw").matches(&f));
        assert!(!rule("IST0101=*").matches(&f));
        assert!(!rule("IST0104=Gateway default/*").matches(&f));
        assert!(!rule("IST0104=Gateway istio-system/g").matches(&f));
        assert!("IST0104".parse::<Suppression>().is_err());
    }

    #[test]
    fn a_host_the_gateway_does_not_accept_is_ist0132() {
        let gw =
            gateway("  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*.example.com']\n");
        let vs = |host: &str| {
            format!(
                "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {{name: web}}\nspec:\n  \
                 hosts: [{host}]\n  gateways: [istio-system/gw]\n  http:\n  - route:\n    - destination: {{host: helloworld}}\n"
            )
        };
        let f = findings(&[GW_SVC, SVC, &gw, &vs("www.example.com")]);
        assert_eq!(codes(&f), Vec::<&str>::new(), "{f:?}");
        let f = findings(&[GW_SVC, SVC, &gw, &vs("www.example.org")]);
        assert_eq!(codes(&f), ["IST0132"], "{f:?}");
        assert!(
            f[0].message.contains("[www.example.org]") && f[0].message.contains("Gateway istio-system/gw")
        );
    }

    #[test]
    fn probes_strict_mtls_refuses_are_msh0005() {
        let pod = |port: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels: {{app: web, security.istio.io/tlsMode: istio}}\n\
                 spec:\n  containers:\n  - name: app\n    image: web\n    ports: [{{name: http, containerPort: 8080}}]\n\
                 \x20   readinessProbe:\n      httpGet: {{path: /ready, port: {port}}}\n  - name: istio-proxy\n    image: envoy\n\
                 status: {{podIP: 10.0.0.5}}\n"
            )
        };
        let pa = |mode: &str| {
            format!(
                "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: default}}\n\
                 spec:\n  mtls: {{mode: {mode}}}\n"
            )
        };
        let probe_findings = |docs: &[&str]| -> Vec<Finding> {
            findings(docs)
                .into_iter()
                .filter(|f| f.code == "MSH0005")
                .collect()
        };
        let f = probe_findings(&[&pod("8080"), &pa("STRICT")]);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(
            f[0].message.contains("readiness probe (HTTP, port 8080)"),
            "{}",
            f[0].message
        );
        // A named port resolves through the container's ports.
        assert_eq!(probe_findings(&[&pod("http"), &pa("STRICT")]).len(), 1);
        // Rewritten to the sidecar's health port, or not STRICT: fine.
        assert!(probe_findings(&[&pod("15021"), &pa("STRICT")]).is_empty());
        assert!(probe_findings(&[&pod("8080"), &pa("PERMISSIVE")]).is_empty());
    }

    #[test]
    fn a_cacert_that_is_not_a_ca_is_ist0161() {
        use base64::Engine;
        let key = rcgen::KeyPair::generate().expect("key");
        let server = rcgen::CertificateParams::new(vec!["gw.example.com".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("server cert");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "clients CA");
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
        let secret = |cacert: &str| {
            format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: gw-cred, namespace: istio-system}}\ntype: Opaque\n\
                 data: {{cert: {}, key: {}, cacert: {}}}\n",
                b64(&server.pem()),
                b64(&key.serialize_pem()),
                b64(cacert)
            )
        };
        let gw = gateway(
            "  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: ['*']\n    \
             tls: {mode: MUTUAL, credentialName: gw-cred}\n",
        );
        let invalid = |docs: &[&str]| -> Vec<Finding> {
            findings(docs)
                .into_iter()
                .filter(|f| f.code == "IST0161")
                .collect()
        };
        // The seed's mistake: the server's own certificate as the CA.
        let f = invalid(&[GW_SVC, &gw, &secret(&server.pem())]);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(
            f[0].message.contains("holds no CA certificate"),
            "{}",
            f[0].message
        );
        assert!(invalid(&[GW_SVC, &gw, &secret(&ca.pem())]).is_empty());
    }
}
