//! Request policies that cannot do what they say: an AuthorizationPolicy
//! naming a namespace that does not exist (`IST0101`), a policy selecting
//! no workload (`IST0127`), a port no selected workload serves (`MSH0006`),
//! request principals or `request.auth` conditions where no
//! RequestAuthentication applies, so no request ever carries them
//! (`MSH0007`), and the deprecated `targetRef` (`MSH0008`).

use std::collections::BTreeMap;

use super::{Finding, Level};
use crate::config::security::{AuthorizationPolicySpec, Rule};
use crate::config::{ConfigSnapshot, Entry, IstioObject, ResourceKey};
use crate::model::peer_auth::ROOT_NAMESPACE;
use crate::model::request_policy::{applying, Targeted};
use crate::model::{is_subset, PodInfo, PushContext};

/// The pods a policy of `namespace` with `selector` applies to, and the IPs
/// they have.
fn selected<'a>(
    push: &'a PushContext,
    namespace: &str,
    selector: &BTreeMap<String, String>,
) -> Vec<(&'a String, &'a PodInfo)> {
    push.pods
        .iter()
        .filter(|(_, p)| namespace == ROOT_NAMESPACE || p.namespace == namespace)
        .filter(|(_, p)| is_subset(selector, &p.labels))
        .map(|(ip, p)| (ip, &**p))
        .collect()
}

fn needs_token(rule: &Rule) -> bool {
    let principals = rule
        .from
        .iter()
        .filter_map(|f| f.source.as_ref())
        .any(|s| !s.request_principals.is_empty() || !s.not_request_principals.is_empty());
    principals || rule.when.iter().any(|c| c.key.starts_with("request.auth."))
}

fn targeted<S: Targeted>(
    key: &ResourceKey,
    entry: &Entry,
    policy: &IstioObject<S>,
    push: &PushContext,
    out: &mut Vec<Finding>,
) -> Option<Vec<String>> {
    let mut found = |level, code, message: String| out.push(Finding::about(level, code, key, entry, message));
    if policy.spec.uses_target_ref() {
        found(
            Level::Info,
            "MSH0008",
            "targetRef is deprecated: write targetRefs (a list) instead".into(),
        );
    }
    let selector = policy.spec.selector()?;
    // Only where the policy's namespace has pods: a file config often
    // declares none (its gateway, say), and a selector cannot be judged
    // without them.
    let known = push.pods.values().any(|p| p.namespace == policy.namespace());
    if !known {
        return None;
    }
    let pods = selected(push, policy.namespace(), &selector.match_labels);
    if pods.is_empty() {
        let labels: Vec<String> = selector
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        found(
            Level::Warning,
            "IST0127",
            format!(
                "No matching workloads for this resource with the following labels: {}",
                labels.join(",")
            ),
        );
        return None;
    }
    Some(pods.into_iter().map(|(ip, _)| ip.clone()).collect())
}

/// The request-policy analyzers.
pub(super) fn request_policies(push: &PushContext, config: &ConfigSnapshot, out: &mut Vec<Finding>) {
    for (key, entry) in &config.resources {
        match &*entry.resource {
            crate::config::Resource::RequestAuthentication(ra) => {
                targeted(key, entry, ra, push, out);
            }
            crate::config::Resource::AuthorizationPolicy(ap) => {
                let ips = targeted(key, entry, ap, push, out);
                authorization_policy(push, key, entry, &ap.spec, ap.namespace(), ips, out);
            }
            _ => {}
        }
    }
}

fn authorization_policy(
    push: &PushContext,
    key: &ResourceKey,
    entry: &Entry,
    spec: &AuthorizationPolicySpec,
    namespace: &str,
    ips: Option<Vec<String>>,
    out: &mut Vec<Finding>,
) {
    let mut found = |level, code, message: String| out.push(Finding::about(level, code, key, entry, message));
    for (i, rule) in spec.rules.iter().enumerate() {
        let sources = rule.from.iter().filter_map(|f| f.source.as_ref());
        for ns in sources.flat_map(|s| s.namespaces.iter().chain(&s.not_namespaces)) {
            if !ns.contains('*') && !push.namespaces.contains(ns) {
                found(
                    Level::Error,
                    "IST0101",
                    format!(
                        "Referenced namespace not found: {ns:?} (spec.rules[{i}].from.source.namespaces)"
                    ),
                );
            }
        }
        if let Some(ips) = &ips {
            let served: Vec<u16> = ips
                .iter()
                .flat_map(|ip| push.workload_ports.get(ip))
                .map(|(p, _)| p)
                .collect();
            let ports = rule
                .to
                .iter()
                .filter_map(|t| t.operation.as_ref())
                .flat_map(|o| o.ports.iter());
            for port in ports {
                let Ok(number) = port.parse::<u16>() else { continue };
                if !served.is_empty() && !served.contains(&number) {
                    found(
                        Level::Warning,
                        "MSH0006",
                        format!(
                            "port {number} (spec.rules[{i}].to.operation.ports) is not a port the selected workloads \
                             serve (they serve {}): this part of the rule never matches",
                            served.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
                        ),
                    );
                }
            }
        }
        if needs_token(rule) && !token_checked(push, namespace, spec) {
            found(
                Level::Warning,
                "MSH0007",
                format!(
                    "spec.rules[{i}] needs a verified token (requestPrincipals or request.auth), but no \
                     RequestAuthentication applies to these workloads: no request carries one, so the rule never \
                     matches"
                ),
            );
        }
    }
}

/// Whether some RequestAuthentication applies to the workloads a policy of
/// `namespace` applies to: judged on the policy's own selector labels.
fn token_checked(push: &PushContext, namespace: &str, spec: &AuthorizationPolicySpec) -> bool {
    let labels = spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .unwrap_or_default();
    if namespace == ROOT_NAMESPACE {
        return !push.request_authentications.is_empty();
    }
    if !applying(&push.request_authentications, namespace, &labels).is_empty() {
        return true;
    }
    // A RequestAuthentication with a selector of its own may still cover the
    // same workloads: count one in the namespace whose labels the policy's
    // selector does not contradict.
    push.request_authentications.iter().any(|ra| {
        ra.namespace() == namespace
            && ra.spec.selector.as_ref().is_some_and(|s| {
                s.match_labels
                    .iter()
                    .all(|(k, v)| labels.get(k).is_none_or(|mine| mine == v))
            })
    })
}
