//! Which RequestAuthentications and AuthorizationPolicies apply to a
//! proxy, as Istio decides: those of the root namespace without a selector
//! (mesh-wide), those of the proxy's namespace without a selector, and
//! those (in the root or the proxy's namespace) whose selector matches its
//! labels or whose `targetRefs` name its Gateway API Gateway. They all
//! apply together; none overrides another.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::gateway_api::GATEWAY_NAME_LABEL;
use super::is_subset;
use super::peer_auth::ROOT_NAMESPACE;
use crate::config::istio::WorkloadSelector;
use crate::config::security::{AuthorizationPolicySpec, PolicyTargetReference, RequestAuthenticationSpec};
use crate::config::IstioObject;

fn applies(
    namespace: &str,
    selector: Option<&WorkloadSelector>,
    refs: &[&PolicyTargetReference],
    workload_namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    if !refs.is_empty() {
        // A Gateway API Gateway: its proxies carry its name as a label.
        return namespace == workload_namespace
            && refs.iter().any(|r| {
                r.kind == "Gateway"
                    && labels.get(GATEWAY_NAME_LABEL).map(String::as_str) == Some(r.name.as_str())
            });
    }
    if namespace != workload_namespace && namespace != ROOT_NAMESPACE {
        return false;
    }
    match selector {
        None => true,
        Some(s) => is_subset(&s.match_labels, labels),
    }
}

/// A policy that names the workloads it applies to.
pub trait Targeted {
    fn selector(&self) -> Option<&WorkloadSelector>;
    /// `targetRef` and `targetRefs` together.
    fn target_refs(&self) -> Vec<&PolicyTargetReference>;
    /// Whether the deprecated `targetRef` (one) is set.
    fn uses_target_ref(&self) -> bool;
}

impl Targeted for RequestAuthenticationSpec {
    fn selector(&self) -> Option<&WorkloadSelector> {
        self.selector.as_ref()
    }
    fn target_refs(&self) -> Vec<&PolicyTargetReference> {
        self.target_ref.iter().chain(&self.target_refs).collect()
    }
    fn uses_target_ref(&self) -> bool {
        self.target_ref.is_some()
    }
}

impl Targeted for AuthorizationPolicySpec {
    fn selector(&self) -> Option<&WorkloadSelector> {
        self.selector.as_ref()
    }
    fn target_refs(&self) -> Vec<&PolicyTargetReference> {
        self.target_ref.iter().chain(&self.target_refs).collect()
    }
    fn uses_target_ref(&self) -> bool {
        self.target_ref.is_some()
    }
}

/// The policies of `all` that apply to a workload of `namespace` with
/// `labels`, in their order (oldest first).
pub fn applying<'a, S: Targeted>(
    all: &'a [Arc<IstioObject<S>>],
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<&'a Arc<IstioObject<S>>> {
    all.iter()
        .filter(|p| {
            applies(
                p.namespace(),
                p.spec.selector(),
                &p.spec.target_refs(),
                namespace,
                labels,
            )
        })
        .collect()
}
