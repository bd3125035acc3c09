//! analyze: Istio's configuration analyzers, over one config snapshot.
//!
//! Each finding carries Istio's message code (`IST0101`
//! ReferencedResourceNotFound, `IST0106` SchemaValidationError), the
//! resource and a reason that says what to do, so that the mistakes that
//! cost people hours (an unqualified gateway reference, a misspelt host)
//! are caught before a request is ever sent.

use std::fmt;

use serde::Serialize;

use crate::config::istio::Destination;
use crate::config::{ConfigSnapshot, Kind, Origin, Resource, VirtualService};
use crate::model::{resolve_host, PushContext};
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

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} [{}] ({}", self.level, self.code, self.resource)?;
        if let Some(o) = &self.origin {
            write!(f, ", {o}")?;
        }
        write!(f, ") {}", self.message)
    }
}

/// Runs every analyzer; findings sorted by level, then resource.
pub fn analyze(config: &ConfigSnapshot) -> Vec<Finding> {
    let push = PushContext::new(std::sync::Arc::new(config.clone()));
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
    for (key, entry) in &config.resources {
        if key.kind != Kind::VirtualService {
            continue;
        }
        let Resource::VirtualService(vs) = &*entry.resource else {
            continue;
        };
        let mut found = |message: String| {
            out.push(Finding {
                level: Level::Error,
                code: "IST0101",
                resource: key.to_string(),
                origin: Some(entry.origin.clone()),
                message,
            })
        };
        gateway_refs(&push, vs, &mut found);
        destination_hosts(&push, vs, &mut found);
    }
    out.sort();
    out.dedup();
    out
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

fn destination_hosts(push: &PushContext, vs: &VirtualService, found: &mut impl FnMut(String)) {
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
    for dest in http.chain(l4) {
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
    fn unknown_host_and_port() {
        let f = findings(&[GW, SVC, &vs("istio-system/ingressgateway", "hellowrld")]);
        assert!(
            f[0].message.contains("Referenced host not found: \"hellowrld\""),
            "{f:?}"
        );
    }
}
