//! Semantic checks that serde cannot express, following Istio's own
//! validation webhook: required fields, host syntax, one action per HTTP
//! route, RE2 regexes, durations. Each check names the field it failed on.

use super::istio::{
    ClientTlsSettings, Destination, DestinationRuleSpec, GatewaySpec, HttpMatchRequest, HttpRoute,
    LocalityLbSetting, PeerAuthenticationSpec, Port, Server, ServiceEntrySpec, SidecarSpec, StringMatch,
    VirtualServiceSpec,
};
use super::Resource;

/// A failed check: the field path and the reason.
pub type Failure = (String, String);

type Checked = Result<(), Failure>;

fn fail(field: impl Into<String>, reason: impl Into<String>) -> Checked {
    Err((field.into(), reason.into()))
}

/// Checks a decoded resource; returns the first failure.
pub fn validate(resource: &Resource) -> Option<Failure> {
    let result = match resource {
        Resource::Gateway(g) => gateway(&g.spec),
        Resource::VirtualService(vs) => virtual_service(&vs.spec),
        Resource::PeerAuthentication(pa) => peer_authentication(&pa.spec),
        Resource::DestinationRule(dr) => destination_rule(&dr.spec),
        Resource::ServiceEntry(se) => service_entry(&se.spec),
        Resource::Sidecar(sc) => sidecar(&sc.spec),
        Resource::RequestAuthentication(ra) => request_authentication(&ra.spec),
        Resource::AuthorizationPolicy(ap) => authorization_policy(&ap.spec),
        Resource::K8sGateway(g) => k8s_gateway(&g.spec),
        _ => Ok(()),
    };
    result.err()
}

const PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "REDIS", "MYSQL", "TCP", "TLS",
];
const TLS_MODES: &[&str] = &[
    "PASSTHROUGH",
    "SIMPLE",
    "MUTUAL",
    "AUTO_PASSTHROUGH",
    "ISTIO_MUTUAL",
    "OPTIONAL_MUTUAL",
];

fn gateway(spec: &GatewaySpec) -> Checked {
    if spec.servers.is_empty() {
        return fail("spec.servers", "a Gateway needs at least one server");
    }
    for (i, server) in spec.servers.iter().enumerate() {
        gateway_server(&format!("spec.servers[{i}]"), server)?;
    }
    Ok(())
}

/// What the Gateway API's CRD schema checks of a listener's TLS mode and
/// allowed routes, which a cluster refuses at admission.
fn k8s_gateway(spec: &super::gateway_api::K8sGatewaySpec) -> Checked {
    for (i, l) in spec.listeners.iter().enumerate() {
        let at = format!("spec.listeners[{i}]");
        if let Some(mode) = l.tls.as_ref().and_then(|t| t.mode.as_deref()) {
            if !matches!(mode, "Terminate" | "Passthrough") {
                return fail(
                    format!("{at}.tls.mode"),
                    format!("`{mode}` is not Terminate or Passthrough"),
                );
            }
        }
        let Some(ns) = l.allowed_routes.as_ref().and_then(|a| a.namespaces.as_ref()) else {
            continue;
        };
        let at = format!("{at}.allowedRoutes.namespaces");
        match (ns.from.as_deref(), &ns.selector) {
            (None | Some("Same" | "All"), _) => {}
            (Some("Selector"), None) => {
                return fail(format!("{at}.selector"), "`from: Selector` needs a selector")
            }
            (Some("Selector"), Some(selector)) => {
                if let Err(e) = kube::core::Selector::try_from(selector.clone()) {
                    return fail(format!("{at}.selector"), format!("not a label selector: {e}"));
                }
            }
            (Some(other), _) => {
                return fail(
                    format!("{at}.from"),
                    format!("`{other}` is not Same, All or Selector"),
                )
            }
        }
    }
    Ok(())
}

fn gateway_server(at: &str, server: &Server) -> Checked {
    let Some(p) = &server.port else {
        return fail(format!("{at}.port"), "is required");
    };
    port(&format!("{at}.port"), p)?;
    let protocol = p.protocol.to_ascii_uppercase();
    if server.hosts.is_empty() {
        return fail(format!("{at}.hosts"), "a server needs at least one host");
    }
    for (j, host) in server.hosts.iter().enumerate() {
        let field = format!("{at}.hosts[{j}]");
        let dns = match host.split_once('/') {
            Some((ns, dns)) => {
                if ns != "*" && ns != "." && !is_dns_label(ns) {
                    return fail(field, format!("{ns:?} is not a namespace, \".\" or \"*\""));
                }
                dns
            }
            None => host.as_str(),
        };
        wildcard_host(&field, dns)?;
    }
    if let Some(tls) = &server.tls {
        if let Some(mode) = &tls.mode {
            if !TLS_MODES.contains(&mode.as_str()) {
                return fail(
                    format!("{at}.tls.mode"),
                    format!(
                        "unknown TLS mode {mode:?}; expected one of {}",
                        TLS_MODES.join(", ")
                    ),
                );
            }
        }
        if tls.credential_name.is_some() && !tls.credential_names.is_empty() {
            return fail(
                format!("{at}.tls.credentialNames"),
                "credentialName and credentialNames are exclusive",
            );
        }
        if tls.credential_names.len() > 2 {
            return fail(
                format!("{at}.tls.credentialNames"),
                "at most two certificates (an RSA and an ECDSA one)",
            );
        }
    } else if protocol == "HTTPS" || protocol == "TLS" {
        return fail(
            format!("{at}.tls"),
            format!("a server with protocol {protocol} needs tls settings"),
        );
    }
    Ok(())
}

const CLIENT_TLS_MODES: &[&str] = &["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"];

fn destination_rule(spec: &DestinationRuleSpec) -> Checked {
    if spec.host.is_empty() {
        return fail("spec.host", "is required");
    }
    wildcard_host("spec.host", &spec.host)?;
    let client_tls = |field: String, tls: &ClientTlsSettings| match &tls.mode {
        Some(mode) if !CLIENT_TLS_MODES.contains(&mode.as_str()) => fail(
            field,
            format!(
                "unknown mode {mode:?}; expected one of {}",
                CLIENT_TLS_MODES.join(", ")
            ),
        ),
        _ => Ok(()),
    };
    let policies = spec
        .traffic_policy
        .iter()
        .map(|p| ("spec.trafficPolicy".to_string(), p))
        .chain(spec.subsets.iter().enumerate().filter_map(|(i, s)| {
            s.traffic_policy
                .as_ref()
                .map(|p| (format!("spec.subsets[{i}].trafficPolicy"), p))
        }));
    for (at, policy) in policies {
        if let Some(tls) = &policy.tls {
            client_tls(format!("{at}.tls.mode"), tls)?;
        }
        if let Some(t) = &policy.tunnel {
            if !matches!(t.protocol.as_deref(), None | Some("CONNECT" | "POST")) {
                return fail(format!("{at}.tunnel.protocol"), "must be CONNECT or POST");
            }
            if t.target_host.is_empty() {
                return fail(format!("{at}.tunnel.targetHost"), "is required");
            }
            if t.target_port == 0 || t.target_port > 65535 {
                return fail(
                    format!("{at}.tunnel.targetPort"),
                    "must be a port number (1-65535)",
                );
            }
        }
        let lb = policy.load_balancer.as_ref();
        if let Some(l) = lb.and_then(|l| l.locality_lb_setting.as_ref()) {
            locality_lb(&format!("{at}.loadBalancer.localityLbSetting"), l)?;
        }
        for (i, port) in policy.port_level_settings.iter().enumerate() {
            if port
                .port
                .as_ref()
                .is_none_or(|p| p.number == 0 || p.number > 65535)
            {
                return fail(
                    format!("{at}.portLevelSettings[{i}].port"),
                    "a port number is required",
                );
            }
            if let Some(tls) = &port.tls {
                client_tls(format!("{at}.portLevelSettings[{i}].tls.mode"), tls)?;
            }
        }
    }
    for (i, subset) in spec.subsets.iter().enumerate() {
        if subset.name.is_empty() {
            return fail(format!("spec.subsets[{i}].name"), "is required");
        }
    }
    Ok(())
}

/// A locality pattern: `REGION[/ZONE[/SUBZONE]]`, `*` only as a whole
/// trailing segment.
fn locality_pattern(field: String, pattern: &str) -> Checked {
    let parts: Vec<&str> = pattern.split('/').collect();
    let wild = parts.iter().position(|p| p.contains('*'));
    let bad = pattern.is_empty()
        || parts.len() > 3
        || parts.iter().any(|p| p.is_empty())
        || wild.is_some_and(|i| parts[i] != "*" || i + 1 != parts.len());
    if bad {
        return fail(
            field,
            format!("{pattern:?} is not a locality (REGION/ZONE/SUBZONE, `*` only as the last part)"),
        );
    }
    Ok(())
}

fn locality_lb(at: &str, l: &LocalityLbSetting) -> Checked {
    if !l.distribute.is_empty() && !l.failover.is_empty() {
        return fail(
            format!("{at}.failover"),
            "distribute and failover cannot be set together",
        );
    }
    let mut froms = std::collections::BTreeSet::new();
    for (i, d) in l.distribute.iter().enumerate() {
        locality_pattern(format!("{at}.distribute[{i}].from"), &d.from)?;
        if !froms.insert(d.from.as_str()) {
            return fail(
                format!("{at}.distribute[{i}].from"),
                format!("{:?} is already distributed by an earlier entry", d.from),
            );
        }
        for to in d.to.keys() {
            locality_pattern(format!("{at}.distribute[{i}].to"), to)?;
        }
        let total: u32 = d.to.values().sum();
        if total != 100 {
            return fail(
                format!("{at}.distribute[{i}].to"),
                format!("the weights add up to {total}, not 100"),
            );
        }
    }
    for (i, f) in l.failover.iter().enumerate() {
        for (name, v) in [("from", &f.from), ("to", &f.to)] {
            if v.is_empty() || v.contains('*') {
                return fail(
                    format!("{at}.failover[{i}].{name}"),
                    format!("{v:?} is not a region (nor a locality without wildcards)"),
                );
            }
        }
        if f.from == f.to {
            return fail(
                format!("{at}.failover[{i}].to"),
                "a region cannot fail over to itself",
            );
        }
    }
    if let Some(i) = l.failover_priority.iter().position(String::is_empty) {
        return fail(format!("{at}.failoverPriority[{i}]"), "is empty");
    }
    Ok(())
}

fn service_entry(spec: &ServiceEntrySpec) -> Checked {
    if spec.hosts.is_empty() {
        return fail("spec.hosts", "a ServiceEntry needs at least one host");
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        wildcard_host(&format!("spec.hosts[{i}]"), h)?;
    }
    if spec.ports.is_empty() {
        return fail("spec.ports", "a ServiceEntry needs at least one port");
    }
    for (i, p) in spec.ports.iter().enumerate() {
        if p.number == 0 || p.number > 65535 {
            return fail(
                format!("spec.ports[{i}].number"),
                format!("{} is not a port number", p.number),
            );
        }
    }
    let resolution = spec.resolution.as_deref().unwrap_or("NONE");
    if !["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"].contains(&resolution) {
        return fail(
            "spec.resolution",
            format!("unknown resolution {resolution:?}; expected NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
        );
    }
    if let Some(location) = &spec.location {
        if location != "MESH_EXTERNAL" && location != "MESH_INTERNAL" {
            return fail(
                "spec.location",
                format!("unknown location {location:?}; expected MESH_EXTERNAL or MESH_INTERNAL"),
            );
        }
    }
    if resolution == "STATIC" && spec.endpoints.is_empty() && spec.workload_selector.is_none() {
        return fail(
            "spec.endpoints",
            "STATIC resolution needs endpoints or a workloadSelector",
        );
    }
    if resolution == "DNS_ROUND_ROBIN" && spec.endpoints.len() > 1 {
        return fail("spec.endpoints", "DNS_ROUND_ROBIN takes at most one endpoint");
    }
    Ok(())
}

const CAPTURE_MODES: &[&str] = &["DEFAULT", "IPTABLES", "NONE"];

fn port(at: &str, port: &Port) -> Checked {
    if port.number == 0 || port.number > 65535 {
        return fail(
            format!("{at}.number"),
            format!("{} is not a port number (1-65535)", port.number),
        );
    }
    let protocol = port.protocol.to_ascii_uppercase();
    if !PROTOCOLS.contains(&protocol.as_str()) {
        return fail(
            format!("{at}.protocol"),
            format!(
                "unknown protocol {:?}; expected one of {}",
                port.protocol,
                PROTOCOLS.join(", ")
            ),
        );
    }
    Ok(())
}

fn capture_mode(at: &str, mode: Option<&String>) -> Checked {
    match mode {
        Some(m) if !CAPTURE_MODES.contains(&m.as_str()) => fail(
            format!("{at}.captureMode"),
            format!(
                "unknown capture mode {m:?}; expected one of {}",
                CAPTURE_MODES.join(", ")
            ),
        ),
        _ => Ok(()),
    }
}

fn sidecar(spec: &SidecarSpec) -> Checked {
    let mut ingress_ports = std::collections::BTreeSet::new();
    for (i, l) in spec.ingress.iter().enumerate() {
        let at = format!("spec.ingress[{i}]");
        let Some(p) = &l.port else {
            return fail(format!("{at}.port"), "is required");
        };
        port(&format!("{at}.port"), p)?;
        if !ingress_ports.insert(p.number) {
            return fail(
                format!("{at}.port.number"),
                format!("port {} is already taken by another ingress listener", p.number),
            );
        }
        capture_mode(&at, l.capture_mode.as_ref())?;
        if let Some(bind) = &l.bind {
            if bind.parse::<std::net::IpAddr>().is_err() {
                return fail(format!("{at}.bind"), format!("{bind:?} is not an IP address"));
            }
        }
        let endpoint = l.default_endpoint.as_str();
        let ok = endpoint.starts_with("unix://")
            || endpoint
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.ip().is_loopback() || a.ip().is_unspecified());
        if !ok {
            return fail(
                format!("{at}.defaultEndpoint"),
                format!(
                    "{endpoint:?} must be 127.0.0.1:PORT, 0.0.0.0:PORT (the workload's own IP) or \
                     unix://PATH"
                ),
            );
        }
    }
    let mut egress_binds = std::collections::BTreeSet::new();
    for (i, l) in spec.egress.iter().enumerate() {
        let at = format!("spec.egress[{i}]");
        match &l.port {
            Some(p) => {
                port(&format!("{at}.port"), p)?;
                // Two listeners on one address and port would collide.
                if !egress_binds.insert((l.bind.clone(), p.number)) {
                    return fail(
                        format!("{at}.port.number"),
                        format!(
                            "port {} is already taken by another egress listener on the same bind",
                            p.number
                        ),
                    );
                }
            }
            None if i + 1 != spec.egress.len() => {
                return fail(
                    format!("{at}.port"),
                    "only the last egress listener may leave out the port (it catches all other ports)",
                );
            }
            None => {}
        }
        capture_mode(&at, l.capture_mode.as_ref())?;
        if let Some(bind) = &l.bind {
            if !bind.starts_with("unix://") && bind.parse::<std::net::IpAddr>().is_err() {
                return fail(
                    format!("{at}.bind"),
                    format!("{bind:?} is not an IP address or unix://PATH"),
                );
            }
        }
        if l.hosts.is_empty() {
            return fail(
                format!("{at}.hosts"),
                "an egress listener needs at least one host",
            );
        }
        for (j, host) in l.hosts.iter().enumerate() {
            let field = format!("{at}.hosts[{j}]");
            let Some((ns, dns)) = host.split_once('/') else {
                return fail(field, format!("{host:?} is not NAMESPACE/HOST"));
            };
            if !["*", ".", "~"].contains(&ns) && !is_dns_label(ns) {
                return fail(field, format!("{ns:?} is not a namespace, \".\", \"~\" or \"*\""));
            }
            wildcard_host(&field, dns)?;
        }
    }
    if let Some(mode) = spec
        .outbound_traffic_policy
        .as_ref()
        .and_then(|p| p.mode.as_ref())
    {
        if mode != "ALLOW_ANY" && mode != "REGISTRY_ONLY" {
            return fail(
                "spec.outboundTrafficPolicy.mode",
                format!("unknown mode {mode:?}; expected ALLOW_ANY or REGISTRY_ONLY"),
            );
        }
    }
    Ok(())
}

const MTLS_MODES: &[&str] = &["UNSET", "DISABLE", "PERMISSIVE", "STRICT"];

fn peer_authentication(spec: &PeerAuthenticationSpec) -> Checked {
    let mode_ok = |field: String, m: &crate::config::istio::MutualTls| match &m.mode {
        Some(mode) if !MTLS_MODES.contains(&mode.as_str()) => fail(
            field,
            format!("unknown mode {mode:?}; expected one of {}", MTLS_MODES.join(", ")),
        ),
        _ => Ok(()),
    };
    if let Some(m) = &spec.mtls {
        mode_ok("spec.mtls.mode".into(), m)?;
    }
    if !spec.port_level_mtls.is_empty() && spec.selector.is_none() {
        return fail(
            "spec.portLevelMtls",
            "portLevelMtls needs a selector: port-level settings apply to selected workloads only",
        );
    }
    for (port, m) in &spec.port_level_mtls {
        if *port == 0 || *port > 65535 {
            return fail(
                format!("spec.portLevelMtls.{port}"),
                format!("{port} is not a port number"),
            );
        }
        mode_ok(format!("spec.portLevelMtls.{port}.mode"), m)?;
    }
    Ok(())
}

fn request_authentication(spec: &crate::config::security::RequestAuthenticationSpec) -> Checked {
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        let at = |f: &str| format!("spec.jwtRules[{i}].{f}");
        if rule.issuer.is_empty() {
            return fail(at("issuer"), "is required");
        }
        if rule.jwks.is_some() && rule.jwks_uri.is_some() {
            return fail(at("jwks"), "give jwks or jwksUri, not both");
        }
        if let Some(jwks) = &rule.jwks {
            let keys = serde_json::from_str::<serde_json::Value>(jwks)
                .ok()
                .and_then(|v| v.get("keys").and_then(|k| k.as_array()).map(Vec::len));
            if keys.is_none() {
                return fail(at("jwks"), "not a JSON Web Key Set (a JSON object with `keys`)");
            }
        }
        if let Some(uri) = &rule.jwks_uri {
            if !(uri.starts_with("http://") || uri.starts_with("https://")) {
                return fail(
                    at("jwksUri"),
                    format!("{uri:?} is not an http:// or https:// URI"),
                );
            }
        }
        if let Some(t) = &rule.timeout {
            if crate::config::parse_duration(t).is_none() {
                return fail(at("timeout"), format!("{t:?} is not a duration"));
            }
        }
        for (j, h) in rule.from_headers.iter().enumerate() {
            if h.name.is_empty() {
                return fail(at(&format!("fromHeaders[{j}].name")), "is required");
            }
        }
        for (j, c) in rule.output_claim_to_headers.iter().enumerate() {
            if c.header.is_empty() || c.claim.is_empty() {
                return fail(
                    at(&format!("outputClaimToHeaders[{j}]")),
                    "header and claim are required",
                );
            }
        }
    }
    Ok(())
}

const AUTHZ_ACTIONS: &[&str] = &["ALLOW", "DENY", "AUDIT", "CUSTOM"];

fn authorization_policy(spec: &crate::config::security::AuthorizationPolicySpec) -> Checked {
    let action = spec.action();
    if !AUTHZ_ACTIONS.contains(&action.as_str()) {
        return fail(
            "spec.action",
            format!(
                "unknown action {action:?}; expected one of {}",
                AUTHZ_ACTIONS.join(", ")
            ),
        );
    }
    if action == "CUSTOM" && spec.provider.is_none() {
        return fail("spec.provider", "a CUSTOM policy names its provider");
    }
    if action != "CUSTOM" && spec.provider.is_some() {
        return fail("spec.provider", "only a CUSTOM policy has a provider");
    }
    if spec.selector.is_some() && (spec.target_ref.is_some() || !spec.target_refs.is_empty()) {
        return fail("spec.targetRefs", "give a selector or targetRefs, not both");
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        for (j, to) in rule.to.iter().enumerate() {
            let Some(op) = &to.operation else { continue };
            for (k, p) in op.ports.iter().chain(&op.not_ports).enumerate() {
                if !p.parse::<u16>().is_ok_and(|n| n > 0) {
                    return fail(
                        format!("spec.rules[{i}].to[{j}].operation.ports[{k}]"),
                        format!("{p:?} is not a port number"),
                    );
                }
            }
        }
        for (j, c) in rule.when.iter().enumerate() {
            if c.key.is_empty() {
                return fail(format!("spec.rules[{i}].when[{j}].key"), "is required");
            }
            if c.values.is_empty() && c.not_values.is_empty() {
                return fail(format!("spec.rules[{i}].when[{j}]"), "needs values or notValues");
            }
        }
        for (j, from) in rule.from.iter().enumerate() {
            let Some(src) = &from.source else { continue };
            let blocks = src
                .ip_blocks
                .iter()
                .chain(&src.not_ip_blocks)
                .chain(&src.remote_ip_blocks)
                .chain(&src.not_remote_ip_blocks);
            for b in blocks {
                if crate::config::security::cidr(b).is_none() {
                    return fail(
                        format!("spec.rules[{i}].from[{j}].source"),
                        format!("{b:?} is not an IP address or CIDR block"),
                    );
                }
            }
        }
    }
    Ok(())
}

fn virtual_service(spec: &VirtualServiceSpec) -> Checked {
    // Without hosts it is a delegate: only another VirtualService's
    // `delegate` uses it, and it cannot delegate again nor name gateways.
    if spec.hosts.is_empty() {
        if !spec.gateways.is_empty() {
            return fail(
                "spec.gateways",
                "a delegate VirtualService (no hosts) cannot name gateways",
            );
        }
        if let Some(i) = spec.http.iter().position(|h| h.delegate.is_some()) {
            return fail(
                format!("spec.http[{i}].delegate"),
                "a delegate VirtualService cannot delegate again",
            );
        }
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        let field = format!("spec.hosts[{i}]");
        if host.contains('/') {
            return fail(
                field,
                format!(
                    "{host:?}: hosts are not namespace-qualified; the namespace goes in metadata.namespace"
                ),
            );
        }
        wildcard_host(&field, host)?;
    }
    for (i, gw) in spec.gateways.iter().enumerate() {
        gateway_ref(&format!("spec.gateways[{i}]"), gw)?;
    }
    for (i, route) in spec.http.iter().enumerate() {
        http_route(&format!("spec.http[{i}]"), route)?;
    }
    let l4 = spec.tls.iter().map(|r| ("tls", &r.route)).enumerate();
    let l4 = l4.chain(spec.tcp.iter().map(|r| ("tcp", &r.route)).enumerate());
    for (i, (kind, routes)) in l4 {
        for (j, dest) in routes.iter().enumerate() {
            let field = format!("spec.{kind}[{i}].route[{j}].destination");
            destination(&field, dest.destination.as_ref())?;
        }
    }
    Ok(())
}

fn gateway_ref(field: &str, gw: &str) -> Checked {
    let ok = match gw.split_once('/') {
        Some((ns, name)) => is_dns_label(ns) && is_dns_subdomain(name),
        None => gw == "mesh" || is_dns_subdomain(gw),
    };
    if ok {
        Ok(())
    } else {
        fail(
            field,
            format!("{gw:?} is not a gateway reference (NAME, NAMESPACE/NAME or mesh)"),
        )
    }
}

fn http_route(at: &str, route: &HttpRoute) -> Checked {
    let actions = [
        !route.route.is_empty(),
        route.redirect.is_some(),
        route.direct_response.is_some(),
        route.delegate.is_some(),
    ];
    match actions.iter().filter(|a| **a).count() {
        0 => {
            return fail(
                at,
                "an HTTP route needs one of route, redirect, directResponse or delegate",
            )
        }
        1 => {}
        _ => {
            return fail(
                at,
                "an HTTP route may have only one of route, redirect, directResponse or delegate",
            )
        }
    }
    for (j, m) in route.matches.iter().enumerate() {
        http_match(&format!("{at}.match[{j}]"), m)?;
    }
    for (j, dest) in route.route.iter().enumerate() {
        let field = format!("{at}.route[{j}]");
        destination(&format!("{field}.destination"), dest.destination.as_ref())?;
        if !(0..=100).contains(&dest.weight) {
            return fail(
                format!("{field}.weight"),
                format!("{} is not in 0..100", dest.weight),
            );
        }
    }
    if route.route.len() > 1 && route.route.iter().all(|d| d.weight == 0) {
        return fail(format!("{at}.route"), "several destinations need weights");
    }
    if let Some(t) = &route.timeout {
        duration(&format!("{at}.timeout"), t)?;
    }
    if let Some(r) = &route.retries {
        if let Some(t) = &r.backoff {
            duration(&format!("{at}.retries.backoff"), t)?;
        }
        if let Some(t) = &r.per_try_timeout {
            duration(&format!("{at}.retries.perTryTimeout"), t)?;
        }
    }
    if let Some(d) = &route.direct_response {
        if !(200..=599).contains(&d.status) {
            return fail(
                format!("{at}.directResponse.status"),
                format!("{} is not an HTTP status", d.status),
            );
        }
    }
    Ok(())
}

fn http_match(at: &str, m: &HttpMatchRequest) -> Checked {
    let singles = [
        ("uri", &m.uri),
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ];
    for (name, sm) in singles {
        if let Some(sm) = sm {
            string_match(&format!("{at}.{name}"), sm, false)?;
        }
    }
    for (map_name, map) in [
        ("headers", &m.headers),
        ("queryParams", &m.query_params),
        ("withoutHeaders", &m.without_headers),
    ] {
        for (key, sm) in map {
            string_match(&format!("{at}.{map_name}.{key}"), sm, true)?;
        }
    }
    if let Some(port) = m.port {
        if port == 0 || port > 65535 {
            return fail(format!("{at}.port"), format!("{port} is not a port number"));
        }
    }
    Ok(())
}

fn string_match(field: &str, sm: &StringMatch, presence_ok: bool) -> Checked {
    let set = [&sm.exact, &sm.prefix, &sm.regex]
        .iter()
        .filter(|o| o.is_some())
        .count();
    if set > 1 {
        return fail(field, "only one of exact, prefix or regex may be set");
    }
    if set == 0 && !presence_ok {
        return fail(field, "one of exact, prefix or regex must be set");
    }
    if let Some(re) = &sm.regex {
        if let Err(e) = regex::Regex::new(re) {
            return fail(format!("{field}.regex"), format!("not a valid RE2 regex: {e}"));
        }
    }
    Ok(())
}

fn destination(field: &str, dest: Option<&Destination>) -> Checked {
    let Some(dest) = dest else {
        return fail(field, "is required");
    };
    if dest.host.is_empty() {
        return fail(format!("{field}.host"), "is required");
    }
    wildcard_host(&format!("{field}.host"), &dest.host)?;
    if let Some(port) = &dest.port {
        if port.number == 0 || port.number > 65535 {
            return fail(
                format!("{field}.port.number"),
                format!("{} is not a port number", port.number),
            );
        }
    }
    Ok(())
}

/// A host as Istio allows it: `*`, `*.suffix` or a DNS name.
fn wildcard_host(field: &str, host: &str) -> Checked {
    let name = host.strip_prefix("*.").unwrap_or(host);
    if host == "*" || (!name.is_empty() && name.split('.').all(is_dns_label)) {
        Ok(())
    } else {
        fail(
            field,
            format!("{host:?} is not a valid host (a DNS name, *.suffix or *)"),
        )
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Parses a duration as Istio writes them: `1.5s`, `100ms`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let units: [(&str, f64); 6] = [
        ("ms", 1e-3),
        ("us", 1e-6),
        ("ns", 1e-9),
        ("h", 3600.0),
        ("m", 60.0),
        ("s", 1.0),
    ];
    let (num, scale) = units
        .iter()
        .find_map(|(u, scale)| s.strip_suffix(u).map(|n| (n, *scale)))?;
    let n: f64 = num.parse().ok()?;
    (n.is_finite() && n >= 0.0).then(|| std::time::Duration::from_secs_f64(n * scale))
}

fn duration(field: &str, s: &str) -> Checked {
    match parse_duration(s) {
        Some(_) => Ok(()),
        None => fail(field, format!("{s:?} is not a duration (like 1.5s, 100ms, 1m)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("1.5s"),
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(
            parse_duration("100ms"),
            Some(std::time::Duration::from_millis(100))
        );
        assert_eq!(parse_duration("2m"), Some(std::time::Duration::from_secs(120)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("-1s"), None);
    }

    #[test]
    fn hosts() {
        assert!(wildcard_host("f", "*.fireflyclass.com").is_ok());
        assert!(wildcard_host("f", "*").is_ok());
        assert!(wildcard_host("f", "a.*.com").is_err());
        assert!(wildcard_host("f", "").is_err());
    }

    #[test]
    fn gateway_refs() {
        assert!(gateway_ref("f", "istio-system/ingressgateway").is_ok());
        assert!(gateway_ref("f", "mesh").is_ok());
        assert!(gateway_ref("f", "a/b/c").is_err());
    }

    #[test]
    fn credential_names_are_one_or_two_certificates_and_not_with_credential_name() {
        let field = |tls: &str| {
            let spec: GatewaySpec = serde_norway::from_str(&format!(
                "{{servers: [{{port: {{number: 443, name: https, protocol: HTTPS}}, hosts: ['*'], tls: {tls}}}]}}"
            ))
            .expect("yaml");
            gateway(&spec).err().map(|f| f.0)
        };
        assert_eq!(field("{mode: SIMPLE, credentialNames: [rsa, ecdsa]}"), None);
        let names = Some("spec.servers[0].tls.credentialNames".to_string());
        assert_eq!(
            field("{mode: SIMPLE, credentialName: a, credentialNames: [b]}"),
            names
        );
        assert_eq!(field("{mode: SIMPLE, credentialNames: [a, b, c]}"), names);
    }

    #[test]
    fn a_tunnel_needs_a_target_and_a_known_protocol() {
        let field = |tunnel: &str| {
            let spec: DestinationRuleSpec =
                serde_norway::from_str(&format!("{{host: proxy, trafficPolicy: {{tunnel: {tunnel}}}}}"))
                    .expect("yaml");
            destination_rule(&spec).err().map(|f| f.0)
        };
        assert_eq!(field("{targetHost: example.com, targetPort: 443}"), None);
        assert_eq!(
            field("{protocol: POST, targetHost: example.com, targetPort: 443}"),
            None
        );
        assert_eq!(
            field("{protocol: UDP, targetHost: example.com, targetPort: 443}").as_deref(),
            Some("spec.trafficPolicy.tunnel.protocol")
        );
        assert_eq!(
            field("{targetPort: 443}").as_deref(),
            Some("spec.trafficPolicy.tunnel.targetHost")
        );
        assert_eq!(
            field("{targetHost: example.com}").as_deref(),
            Some("spec.trafficPolicy.tunnel.targetPort")
        );
    }

    #[test]
    fn gateway_api_listeners_are_checked_as_their_schema_checks_them() {
        let spec = |listener: &str| -> super::super::gateway_api::K8sGatewaySpec {
            serde_norway::from_str(&format!("{{gatewayClassName: istio, listeners: [{listener}]}}"))
                .expect("yaml")
        };
        let ok = "{name: h, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Selector, \
                  selector: {matchExpressions: [{key: team, operator: In, values: [a, b]}]}}}}";
        assert!(k8s_gateway(&spec(ok)).is_ok());
        let failure = |listener: &str| k8s_gateway(&spec(listener)).expect_err("rejected");
        assert_eq!(
            failure("{name: h, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Selector}}}").0,
            "spec.listeners[0].allowedRoutes.namespaces.selector"
        );
        let (field, reason) = failure(
            "{name: h, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Selector, \
             selector: {matchExpressions: [{key: team, operator: Near, values: [a]}]}}}}",
        );
        assert_eq!(field, "spec.listeners[0].allowedRoutes.namespaces.selector");
        assert!(reason.contains("operator"), "{reason}");
        assert_eq!(
            failure("{name: h, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Others}}}").0,
            "spec.listeners[0].allowedRoutes.namespaces.from"
        );
        assert_eq!(
            failure("{name: t, port: 443, protocol: TLS, tls: {mode: Terminated}}").0,
            "spec.listeners[0].tls.mode"
        );
    }

    #[test]
    fn sidecar_listeners_are_checked_as_istio_checks_them() {
        let spec = |yaml: &str| -> SidecarSpec { serde_norway::from_str(yaml).expect("yaml") };
        let ok = spec(
            "ingress: [{port: {number: 9080, protocol: HTTP, name: http}, defaultEndpoint: '127.0.0.1:8080'}]\n\
             egress: [{port: {number: 3306, protocol: TCP, name: db}, hosts: ['*/mysql.foo.com']}, {hosts: ['./*']}]",
        );
        assert!(sidecar(&ok).is_ok());
        let field = |yaml: &str| sidecar(&spec(yaml)).expect_err("rejected").0;
        assert_eq!(
            field(
                "egress: [{hosts: ['./*']}, {port: {number: 80, protocol: HTTP, name: h}, hosts: ['./*']}]"
            ),
            "spec.egress[0].port"
        );
        assert_eq!(
            field("ingress: [{port: {number: 80, protocol: HTTP, name: h}, defaultEndpoint: '10.0.0.1:80'}]"),
            "spec.ingress[0].defaultEndpoint"
        );
        assert_eq!(field("egress: [{hosts: ['reviews']}]"), "spec.egress[0].hosts[0]");
        assert_eq!(
            field(
                "egress: [{port: {number: 80, protocol: HTTP, name: a}, hosts: ['./*']}, \
                 {port: {number: 80, protocol: HTTP, name: b}, hosts: ['./*']}]"
            ),
            "spec.egress[1].port.number"
        );
        assert_eq!(
            field("egress: [{captureMode: OFF, hosts: ['./*']}]"),
            "spec.egress[0].captureMode"
        );
    }
}
