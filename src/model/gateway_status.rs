//! Gateway API status, in the shape the Gateway API asks a controller to
//! write and with the condition types and reasons it defines: the
//! GatewayClass `Accepted`; the Gateway `Accepted` and `Programmed`, with
//! per-listener `Accepted`, `ResolvedRefs`, `Conflicted`, `Programmed` and
//! `attachedRoutes`; the HTTPRoute per parent `Accepted` and
//! `ResolvedRefs`. In file mode it is shown on `/debug/configz`.

use serde_json::{json, Value};

use super::gateway_api::{
    admits, attached_listeners, backend_problem, exists, gateways, invalid_kinds, listener_kinds,
    mesh_parent, names_service, parent_gateway, protocol_kinds, served_classes, ungranted_certificate,
    unsupported_filter, CONTROLLER_NAME,
};
use crate::config::gateway_api::{Listener, ParentRef};
use crate::config::{ConfigSnapshot, GatewayClass, HttpRoute, K8sGateway, Kind, Resource};

fn condition(kind: &str, ok: bool, reason: &str, message: &str, generation: Option<i64>) -> Value {
    json!({
        "type": kind,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "observedGeneration": generation.unwrap_or(0),
    })
}

/// The Gateway API status meshd gives a resource, if it is a Gateway API
/// resource meshd handles. A Gateway is `Programmed` while one of its
/// proxies (labelled with its name, in its namespace) is connected.
pub fn status_of(config: &ConfigSnapshot, resource: &Resource, connected: &[super::Proxy]) -> Option<Value> {
    match resource {
        Resource::HttpRoute(_) | Resource::GrpcRoute(_) | Resource::TcpRoute(_) | Resource::TlsRoute(_) => {
            super::gateway_api::as_http(resource).map(|route| route_status(config, &route))
        }
        Resource::K8sGateway(gw) => {
            let programmed = connected.iter().any(|p| {
                p.namespace == gw.namespace()
                    && p.labels
                        .get(super::gateway_api::GATEWAY_NAME_LABEL)
                        .map(String::as_str)
                        == Some(gw.name())
            });
            gateway_status(config, gw, programmed)
        }
        Resource::GatewayClass(class) => class_status(class),
        _ => None,
    }
}

/// A GatewayClass's status, when it names meshd's (Istio's) controller.
pub fn class_status(class: &GatewayClass) -> Option<Value> {
    (class.spec.controller_name == CONTROLLER_NAME).then(|| {
        json!({"conditions": [condition(
            "Accepted",
            true,
            "Accepted",
            "Handled by meshd",
            class.metadata.generation,
        )]})
    })
}

/// Whether a route hostname and a listener hostname can both match one
/// request.
fn hostnames_meet(listener: Option<&str>, route: &str) -> bool {
    let Some(listener) = listener else { return true };
    let covers = |pattern: &str, host: &str| {
        pattern == host
            || pattern
                .strip_prefix('*')
                .is_some_and(|suffix| host.ends_with(suffix) && host.len() > suffix.len())
    };
    covers(listener, route) || covers(route, listener)
}

/// Whether the route, through `p`, attaches to listener `l` of `gw`.
fn attaches(config: &ConfigSnapshot, hr: &HttpRoute, gw: &K8sGateway, p: &ParentRef, l: &Listener) -> bool {
    attached_listeners(gw, p).any(|a| a.name == l.name)
        && admits(config, gw, l, hr.namespace())
        && listener_kinds(l).contains(&hr.kind.as_str())
        && (hr.spec.hostnames.is_empty()
            || hr
                .spec
                .hostnames
                .iter()
                .any(|h| hostnames_meet(l.hostname.as_deref(), h)))
}

/// What is wrong with one listener, as (condition type, reason, message).
fn listener_problem(
    config: &ConfigSnapshot,
    gw: &K8sGateway,
    l: &Listener,
) -> Option<(&'static str, &'static str, String)> {
    if protocol_kinds(l).is_empty() {
        return Some((
            "Accepted",
            "UnsupportedProtocol",
            format!(
                "protocol {} is not served (HTTP, HTTPS, TCP and TLS are)",
                l.protocol
            ),
        ));
    }
    let invalid = invalid_kinds(l);
    if !invalid.is_empty() {
        return Some((
            "ResolvedRefs",
            "InvalidRouteKinds",
            format!(
                "a {} listener does not take {} (it takes {})",
                l.protocol,
                invalid.join(", "),
                protocol_kinds(l).join(", ")
            ),
        ));
    }
    for other in gw
        .spec
        .listeners
        .iter()
        .filter(|o| o.name != l.name && o.port == l.port)
    {
        if other.protocol != l.protocol {
            return Some((
                "Conflicted",
                "ProtocolConflict",
                format!(
                    "listener {} uses port {} with protocol {}",
                    other.name, l.port, other.protocol
                ),
            ));
        }
        if other.hostname == l.hostname {
            return Some((
                "Conflicted",
                "HostnameConflict",
                format!(
                    "listener {} uses port {} with the same hostname",
                    other.name, l.port
                ),
            ));
        }
    }
    let tls = l.tls.as_ref();
    let terminate = matches!(l.protocol.as_str(), "HTTPS" | "TLS")
        && tls.and_then(|t| t.mode.as_deref()) != Some("Passthrough");
    if terminate {
        let certs = tls.map(|t| t.certificate_refs.as_slice()).unwrap_or_default();
        if certs.is_empty() {
            return Some((
                "ResolvedRefs",
                "InvalidCertificateRef",
                format!(
                    "a {} listener that terminates TLS needs a certificateRef",
                    l.protocol
                ),
            ));
        }
        if let Some(cert) = ungranted_certificate(config, gw, l) {
            let ns = cert.namespace.as_deref().unwrap_or_default();
            return Some((
                "ResolvedRefs",
                "RefNotPermitted",
                format!(
                    "Secret {ns}/{} is in another namespace, and no ReferenceGrant in {ns} lets Gateways of {} \
                     refer to it",
                    cert.name,
                    gw.namespace()
                ),
            ));
        }
        for cert in certs {
            let ns = cert.namespace.as_deref().unwrap_or(gw.namespace());
            if cert.kind.as_deref().unwrap_or("Secret") != "Secret"
                || !exists(config, Kind::Secret, ns, &cert.name)
            {
                return Some((
                    "ResolvedRefs",
                    "InvalidCertificateRef",
                    format!("Secret {ns}/{} does not exist", cert.name),
                ));
            }
        }
    }
    None
}

/// A Gateway's status, when its class is served. `programmed` says
/// whether a proxy of the Gateway is connected.
pub fn gateway_status(config: &ConfigSnapshot, gw: &K8sGateway, programmed: bool) -> Option<Value> {
    if !served_classes(config).contains(&gw.spec.gateway_class_name) {
        return None;
    }
    let generation = gw.metadata.generation;
    let routes = super::gateway_api::routes(config);
    let mut invalid = Vec::new();
    let listeners: Vec<Value> = gw
        .spec
        .listeners
        .iter()
        .map(|l| {
            let attached = routes
                .iter()
                .filter(|hr| {
                    hr.spec.parent_refs.iter().any(|p| {
                        parent_gateway(&[gw], hr.namespace(), p).is_some() && attaches(config, hr, gw, p, l)
                    })
                })
                .count();
            let problem = listener_problem(config, gw, l);
            if let Some((_, reason, _)) = &problem {
                invalid.push(format!("{} ({reason})", l.name));
            }
            let failed = |kind: &str| problem.as_ref().filter(|(k, _, _)| *k == kind);
            let accepted = failed("Accepted");
            let refs = failed("ResolvedRefs");
            let conflict = failed("Conflicted");
            json!({
                "name": l.name,
                "supportedKinds": listener_kinds(l)
                    .iter()
                    .map(|kind| json!({"group": "gateway.networking.k8s.io", "kind": kind}))
                    .collect::<Vec<_>>(),
                "attachedRoutes": attached,
                "conditions": [
                    condition("Accepted", accepted.is_none(), accepted.map_or("Accepted", |p| p.1),
                        accepted.map_or("", |p| p.2.as_str()), generation),
                    condition("ResolvedRefs", refs.is_none(), refs.map_or("ResolvedRefs", |p| p.1),
                        refs.map_or("", |p| p.2.as_str()), generation),
                    // Conflicted is a negative condition: True means trouble.
                    json!({
                        "type": "Conflicted",
                        "status": if conflict.is_some() { "True" } else { "False" },
                        "reason": conflict.map_or("NoConflicts", |p| p.1),
                        "message": conflict.map_or("", |p| p.2.as_str()),
                        "observedGeneration": generation.unwrap_or(0),
                    }),
                    condition("Programmed", problem.is_none(), if problem.is_none() { "Programmed" } else { "Invalid" },
                        "", generation),
                ],
            })
        })
        .collect();
    let (accepted_reason, accepted_message) = if invalid.is_empty() {
        ("Accepted", String::new())
    } else {
        (
            "ListenersNotValid",
            format!("listeners not served: {}", invalid.join(", ")),
        )
    };
    let programmed_message = if programmed {
        String::new()
    } else {
        format!(
            "no proxy labelled {}={} in namespace {} is connected",
            super::gateway_api::GATEWAY_NAME_LABEL,
            gw.name(),
            gw.namespace()
        )
    };
    Some(json!({
        "conditions": [
            condition("Accepted", true, accepted_reason, &accepted_message, generation),
            condition("Programmed", programmed, if programmed { "Programmed" } else { "Pending" },
                &programmed_message, generation),
        ],
        "listeners": listeners,
    }))
}

/// An HTTPRoute's status: per parentRef, whether it attached (`Accepted`)
/// and whether its backends exist (`ResolvedRefs`).
pub fn route_status(config: &ConfigSnapshot, hr: &HttpRoute) -> Value {
    let gws = gateways(config);
    let generation = hr.metadata.generation;
    let missing_backend = hr
        .spec
        .rules
        .iter()
        .flat_map(|r| &r.backend_refs)
        .find_map(|b| backend_problem(config, (&hr.kind, hr.namespace()), b));
    let refs = condition(
        "ResolvedRefs",
        missing_backend.is_none(),
        missing_backend.as_ref().map_or("ResolvedRefs", |m| m.reason()),
        missing_backend.as_ref().map_or("", |m| m.message()),
        generation,
    );
    // A rule with a filter meshd cannot apply answers every request with an
    // error; the rest of the route is served.
    let partly_invalid = hr.spec.rules.iter().find_map(unsupported_filter).map(|kind| {
        let message =
            format!("filter type {kind} is not supported: its rule answers every request with an error");
        condition("PartiallyInvalid", true, "UnsupportedValue", &message, generation)
    });
    let parents: Vec<Value> = hr
        .spec
        .parent_refs
        .iter()
        .filter_map(|p| {
            let ns = p.namespace.as_deref().unwrap_or(hr.namespace());
            let mesh = names_service(p).then(|| mesh_parent(config, (&hr.kind, hr.namespace()), p).err());
            let problem = match parent_gateway(&gws, hr.namespace(), p) {
                // A Service (GAMMA): the route binds to the mesh.
                _ if mesh.is_some() => mesh.flatten().map(|why| ("NoMatchingParent", why)),
                // Another class's Gateway: its controller says how the
                // route fares there, not meshd.
                None if p.kind.as_deref().unwrap_or("Gateway") == "Gateway"
                    && exists(config, Kind::K8sGateway, ns, &p.name) =>
                {
                    return None;
                }
                None => Some((
                    "NoMatchingParent",
                    format!("no Gateway of a class meshd serves named {ns}/{}", p.name),
                )),
                Some(gw) if attached_listeners(gw, p).next().is_none() => {
                    let mut wanted = Vec::new();
                    if let Some(s) = &p.section_name {
                        wanted.push(format!("sectionName {s:?}"));
                    }
                    if let Some(port) = p.port {
                        wanted.push(format!("port {port}"));
                    }
                    Some((
                        "NoMatchingParent",
                        format!(
                            "Gateway {ns}/{} has no listener with {}",
                            p.name,
                            wanted.join(" and ")
                        ),
                    ))
                }
                Some(gw) if !attached_listeners(gw, p).any(|l| admits(config, gw, l, hr.namespace())) => {
                    Some((
                        "NotAllowedByListeners",
                        format!(
                            "no listener of Gateway {ns}/{} admits routes from namespace {}",
                            p.name,
                            hr.namespace()
                        ),
                    ))
                }
                Some(gw)
                    if !attached_listeners(gw, p).any(|l| listener_kinds(l).contains(&hr.kind.as_str())) =>
                {
                    Some((
                        "NotAllowedByListeners",
                        format!("no listener of Gateway {ns}/{} takes {}s", p.name, hr.kind),
                    ))
                }
                Some(gw) if !attached_listeners(gw, p).any(|l| attaches(config, hr, gw, p, l)) => Some((
                    "NoMatchingListenerHostname",
                    format!(
                        "no listener of Gateway {ns}/{} matches the route's hostnames",
                        p.name
                    ),
                )),
                Some(_) => None,
            };
            let mut conditions = vec![
                condition(
                    "Accepted",
                    problem.is_none(),
                    problem.as_ref().map_or("Accepted", |x| x.0),
                    problem.as_ref().map_or("", |x| x.1.as_str()),
                    generation,
                ),
                refs.clone(),
            ];
            if let Some(partly) = &partly_invalid {
                conditions.push(partly.clone());
            }
            Some(json!({
                "parentRef": p,
                "controllerName": CONTROLLER_NAME,
                "conditions": conditions,
            }))
        })
        .collect();
    json!({ "parents": with_others(parents, hr.status.as_ref().unwrap_or(&Value::Null)) })
}

/// meshd's own route parent entries (`mine`), then every other
/// controller's entry of the route status `current`, as it wrote it: the
/// Gateway API asks each controller to write only its own.
pub fn with_others(mut mine: Vec<Value>, current: &Value) -> Vec<Value> {
    let theirs = current["parents"].as_array().into_iter().flatten();
    mine.extend(theirs.filter(|p| p["controllerName"] != CONTROLLER_NAME).cloned());
    mine
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_file, Resource};

    const CONFIG: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: mesh-gateways}
spec: {controllerName: istio.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: other}
spec: {controllerName: example.com/gateway}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: default}
spec:
  gatewayClassName: mesh-gateways
  listeners:
  - {name: http, port: 80, protocol: HTTP, hostname: "*.example.com"}
  - {name: shared, port: 80, protocol: HTTP, hostname: "*.example.com"}
  - {name: https, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: missing-cert}]}}
  - {name: udp, port: 9000, protocol: UDP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: theirs, namespace: default}
spec:
  gatewayClassName: other
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: default}
spec: {ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: hello, namespace: default}
spec:
  parentRefs: [{name: web, sectionName: http}]
  hostnames: [hello.example.com]
  rules: [{backendRefs: [{name: hello, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: elsewhere, namespace: default}
spec:
  parentRefs: [{name: web, sectionName: http}, {name: web, sectionName: nope}, {name: missing}]
  hostnames: [hello.other.org]
  rules: [{backendRefs: [{name: gone, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: foreign, namespace: team-a}
spec:
  parentRefs: [{name: web, namespace: default, sectionName: http}]
  rules: [{backendRefs: [{name: hello, port: 80}]}]
"#;

    fn config() -> ConfigSnapshot {
        let snapshot = ConfigSnapshot::from_files(vec![parse_file("gw.yaml", CONFIG)]);
        assert!(snapshot.rejections.is_empty(), "{:?}", snapshot.rejections);
        snapshot
    }

    fn find<'a>(config: &'a ConfigSnapshot, kind: Kind, name: &str) -> &'a Resource {
        config
            .of_kind(kind)
            .find(|r| r.metadata().name.as_deref() == Some(name))
            .expect("in the config")
    }

    /// (type, status, reason) of each condition.
    fn conditions(v: &Value) -> Vec<(String, String, String)> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                (s("type"), s("status"), s("reason"))
            })
            .collect()
    }

    fn has(v: &Value, kind: &str, status: &str, reason: &str) -> bool {
        conditions(v).contains(&(kind.into(), status.into(), reason.into()))
    }

    #[test]
    fn classes_naming_istios_controller_are_accepted() {
        let config = config();
        let Resource::GatewayClass(ours) = find(&config, Kind::GatewayClass, "mesh-gateways") else {
            panic!("class")
        };
        let status = class_status(ours).expect("ours");
        assert!(has(&status["conditions"], "Accepted", "True", "Accepted"));
        let Resource::GatewayClass(theirs) = find(&config, Kind::GatewayClass, "other") else {
            panic!("class")
        };
        assert!(class_status(theirs).is_none());
        let Resource::K8sGateway(gw) = find(&config, Kind::K8sGateway, "theirs") else {
            panic!("gateway")
        };
        assert!(
            gateway_status(&config, gw, false).is_none(),
            "another controller's Gateway"
        );
    }

    #[test]
    fn gateway_and_listener_conditions() {
        let config = config();
        let Resource::K8sGateway(gw) = find(&config, Kind::K8sGateway, "web") else {
            panic!("gateway")
        };
        let status = gateway_status(&config, gw, false).expect("served class");
        assert!(has(
            &status["conditions"],
            "Accepted",
            "True",
            "ListenersNotValid"
        ));
        assert!(has(&status["conditions"], "Programmed", "False", "Pending"));
        let listener = |name: &str| {
            status["listeners"]
                .as_array()
                .and_then(|l| l.iter().find(|l| l["name"] == name))
                .cloned()
                .expect("listener")
        };
        let http = listener("http");
        assert!(has(&http["conditions"], "Conflicted", "True", "HostnameConflict"));
        assert_eq!(
            http["attachedRoutes"], 1,
            "hello attaches; other hostnames and namespaces do not"
        );
        assert!(has(
            &listener("https")["conditions"],
            "ResolvedRefs",
            "False",
            "InvalidCertificateRef"
        ));
        assert!(has(
            &listener("udp")["conditions"],
            "Accepted",
            "False",
            "UnsupportedProtocol"
        ));
        let programmed = gateway_status(&config, gw, true).expect("served class");
        assert!(has(&programmed["conditions"], "Programmed", "True", "Programmed"));
    }

    #[test]
    fn a_route_keeps_other_controllers_parents_and_gets_none_for_their_gateways() {
        let theirs = json!({
            "parentRef": {"name": "theirs"},
            "controllerName": "example.com/gateway",
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"}],
        });
        let text = format!(
            "{CONFIG}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{name: both, namespace: default}}\n\
             spec:\n  parentRefs: [{{name: web, sectionName: http}}, {{name: theirs}}]\n\
             \x20 hostnames: [both.example.com]\n  rules: [{{backendRefs: [{{name: hello, port: 80}}]}}]\n\
             status: {{parents: [{theirs}]}}\n"
        );
        let config = ConfigSnapshot::from_files(vec![parse_file("gw.yaml", &text)]);
        assert!(config.rejections.is_empty(), "{:?}", config.rejections);
        let Resource::HttpRoute(hr) = find(&config, Kind::HttpRoute, "both") else {
            panic!("route")
        };
        let status = route_status(&config, hr);
        let parents = status["parents"].as_array().expect("parents");
        // meshd's entry for its own Gateway, none for the other class's,
        // and the other controller's as it wrote it.
        assert_eq!(parents.len(), 2, "{status}");
        assert_eq!(parents[0]["controllerName"], CONTROLLER_NAME);
        assert_eq!(parents[0]["parentRef"]["name"], "web");
        assert!(has(&parents[0]["conditions"], "Accepted", "True", "Accepted"));
        assert_eq!(parents[1], theirs);
    }

    #[test]
    fn route_parents_say_why_they_did_not_attach() {
        let config = config();
        let route = |name: &str| {
            let Resource::HttpRoute(hr) = find(&config, Kind::HttpRoute, name) else {
                panic!("route")
            };
            route_status(&config, hr)
        };
        let hello = route("hello");
        assert!(has(
            &hello["parents"][0]["conditions"],
            "Accepted",
            "True",
            "Accepted"
        ));
        assert!(has(
            &hello["parents"][0]["conditions"],
            "ResolvedRefs",
            "True",
            "ResolvedRefs"
        ));
        assert_eq!(hello["parents"][0]["controllerName"], CONTROLLER_NAME);
        let elsewhere = route("elsewhere");
        let parent = |i: usize| elsewhere["parents"][i]["conditions"].clone();
        assert!(has(&parent(0), "Accepted", "False", "NoMatchingListenerHostname"));
        assert!(has(&parent(1), "Accepted", "False", "NoMatchingParent"));
        assert!(has(&parent(2), "Accepted", "False", "NoMatchingParent"));
        assert!(has(&parent(0), "ResolvedRefs", "False", "BackendNotFound"));
        let foreign = route("foreign");
        assert!(has(
            &foreign["parents"][0]["conditions"],
            "Accepted",
            "False",
            "NotAllowedByListeners"
        ));
    }
}
