//! PeerAuthentication, resolved as Istio resolves it: the mesh policy (root
//! namespace, no selector), then the namespace policy, then the workload
//! policy (selector), the most specific one that sets a mode winning, and
//! port-level modes of the workload policy on top. Without any policy a
//! workload is PERMISSIVE.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{is_subset, PushContext};
use crate::config::istio::MutualTls;
use crate::config::PeerAuthentication;

/// Istio's root namespace, where mesh-wide policies live.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// What an inbound port accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Plain text only.
    Disable,
    /// Mutual TLS and plain text.
    Permissive,
    /// Mutual TLS only.
    Strict,
}

/// The modes in force for one workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectiveMtls {
    pub mode: MtlsMode,
    /// Workload (target) port → mode, from the workload policy.
    pub ports: BTreeMap<u16, MtlsMode>,
}

impl EffectiveMtls {
    /// The mode of one workload port.
    pub fn for_port(&self, port: u16) -> MtlsMode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }
}

fn parse(m: Option<&MutualTls>) -> Option<MtlsMode> {
    match m.and_then(|m| m.mode.as_deref()) {
        Some("DISABLE") => Some(MtlsMode::Disable),
        Some("PERMISSIVE") => Some(MtlsMode::Permissive),
        Some("STRICT") => Some(MtlsMode::Strict),
        _ => None, // UNSET inherits
    }
}

/// The policies of one kind, oldest first (Istio's tie-break).
fn oldest<'a>(policies: impl Iterator<Item = &'a PeerAuthentication>) -> Option<&'a PeerAuthentication> {
    let created = |p: &PeerAuthentication| p.metadata.creation_timestamp.clone().map(|t| t.0);
    policies.min_by(|a, b| {
        created(a)
            .cmp(&created(b))
            .then_with(|| a.namespace().cmp(b.namespace()))
            .then_with(|| a.name().cmp(b.name()))
    })
}

/// The effective mutual TLS of a workload in `namespace` with `labels`.
pub fn resolve(push: &PushContext, namespace: &str, labels: &BTreeMap<String, String>) -> EffectiveMtls {
    let policies = || push.peer_authentications.iter().map(AsRef::as_ref);
    let unselected =
        |ns: &str| oldest(policies().filter(|p| p.namespace() == ns && p.spec.selector.is_none()));
    let mesh = unselected(ROOT_NAMESPACE);
    let ns = unselected(namespace);
    let workload = oldest(policies().filter(|p| {
        p.namespace() == namespace
            && p.spec
                .selector
                .as_ref()
                .is_some_and(|s| is_subset(&s.match_labels, labels))
    }));
    let mut mode = MtlsMode::Permissive;
    for policy in [mesh, ns, workload].into_iter().flatten() {
        if let Some(m) = parse(policy.spec.mtls.as_ref()) {
            mode = m;
        }
    }
    let ports = workload
        .map(|w| {
            w.spec
                .port_level_mtls
                .iter()
                .filter_map(|(port, m)| Some((u16::try_from(*port).ok()?, parse(Some(m)).unwrap_or(mode))))
                .collect()
        })
        .unwrap_or_default();
    EffectiveMtls { mode, ports }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_file, ConfigSnapshot};
    use std::sync::Arc;

    fn pa(ns: &str, name: &str, body: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}"
        )
    }

    fn push(docs: &[String]) -> PushContext {
        let snapshot = ConfigSnapshot::from_files(vec![parse_file("pa.yaml", &docs.join("---\n"))]);
        assert!(snapshot.rejections.is_empty(), "{:?}", snapshot.rejections);
        PushContext::new(Arc::new(snapshot))
    }

    fn labels(app: &str) -> BTreeMap<String, String> {
        [("app".to_string(), app.to_string())].into()
    }

    #[test]
    fn most_specific_wins_and_unset_inherits() {
        let p = push(&[
            pa("istio-system", "mesh", "  mtls: {mode: STRICT}\n"),
            pa("default", "ns", "  mtls: {mode: UNSET}\n"),
            pa(
                "default",
                "hw",
                "  selector: {matchLabels: {app: helloworld}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n    9090: {mode: UNSET}\n",
            ),
        ]);
        let other = resolve(&p, "default", &labels("other"));
        assert_eq!(
            other.mode,
            MtlsMode::Strict,
            "UNSET at namespace level inherits the mesh's STRICT"
        );
        let hw = resolve(&p, "default", &labels("helloworld"));
        assert_eq!(hw.mode, MtlsMode::Permissive);
        assert_eq!(hw.for_port(8080), MtlsMode::Disable);
        assert_eq!(
            hw.for_port(9090),
            MtlsMode::Permissive,
            "UNSET port inherits the workload mode"
        );
        assert_eq!(resolve(&p, "shop", &labels("x")).mode, MtlsMode::Strict);
        assert_eq!(
            resolve(&push(&[]), "default", &labels("x")).mode,
            MtlsMode::Permissive
        );
    }

    #[test]
    fn port_level_needs_a_selector() {
        let snapshot = ConfigSnapshot::from_files(vec![parse_file(
            "pa.yaml",
            &pa("default", "bad", "  portLevelMtls:\n    80: {mode: STRICT}\n"),
        )]);
        assert_eq!(
            snapshot.rejections[0].field.as_deref(),
            Some("spec.portLevelMtls")
        );
    }
}
