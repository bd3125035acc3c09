//! The manifests in `deploy/` are what `kubectl apply -k deploy/` sends to a
//! cluster: each document must be a kind the API server knows, decode into
//! its k8s-openapi type, and lose nothing on the way (a field the type does
//! not know would be dropped by the API server too, or refused).

use std::path::{Path, PathBuf};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let yaml =
                serde_norway::Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(yaml).expect("JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The first place where `a` has something `b` does not, or differs.
fn lost(a: &Value, b: &Value, at: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x.iter().find_map(|(k, v)| match y.get(k) {
            Some(w) => lost(v, w, &format!("{at}.{k}")),
            None => Some(format!("{at}.{k} is not a field of the type")),
        }),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| lost(v, w, &format!("{at}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{at}: {a} became {b}")),
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<(), String> {
    let typed: T = serde_path_to_error::deserialize(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match lost(doc, &back, "") {
        None => Ok(()),
        Some(what) => Err(what),
    }
}

fn check(doc: &Value) -> Result<(), String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("v1", "Namespace") => round_trip::<Namespace>(doc),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(doc),
        ("v1", "Service") => round_trip::<Service>(doc),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(doc),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(doc),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => round_trip::<ClusterRoleBinding>(doc),
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(doc),
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
            round_trip::<MutatingWebhookConfiguration>(doc)
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(doc)
        }
        _ => Err(format!("{api_version} {kind} is not a kind this test knows")),
    }
}

#[derive(Deserialize)]
struct Kustomization {
    resources: Vec<String>,
}

/// Every Kubernetes manifest under deploy/ (Prometheus' scrape config and
/// Grafana's dashboard are not).
fn manifests(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("deploy/") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            if !path.ends_with("prometheus") && !path.ends_with("grafana") {
                manifests(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "yaml") && !path.ends_with("kustomization.yaml") {
            out.push(path);
        }
    }
}

#[test]
fn every_manifest_decodes_into_its_type_and_kustomize_applies_them_all() {
    let kustomization: Kustomization = serde_norway::from_str(
        &std::fs::read_to_string(deploy().join("kustomization.yaml")).expect("kustomization.yaml"),
    )
    .expect("a Kustomization");
    let mut listed: Vec<PathBuf> = kustomization.resources.iter().map(|r| deploy().join(r)).collect();
    listed.sort();
    let mut found = Vec::new();
    manifests(&deploy(), &mut found);
    found.sort();
    assert_eq!(
        listed, found,
        "kustomization.yaml lists every manifest, and only those"
    );

    let mut kinds = Vec::new();
    for path in &found {
        for (i, doc) in documents(path).iter().enumerate() {
            if let Err(e) = check(doc) {
                panic!("{} document {}: {e}", path.display(), i + 1);
            }
            kinds.push(doc["kind"].as_str().unwrap_or_default().to_string());
        }
    }
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "Role",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "MutatingWebhookConfiguration",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "deploy/ has no {kind}");
    }
}

#[test]
fn the_crds_serve_every_kind_meshd_reads_in_the_versions_istio_serves() {
    let mut served = Vec::new();
    for file in ["crds/istio.yaml", "crds/gateway-api.yaml"] {
        for doc in documents(&deploy().join(file)) {
            let crd: CustomResourceDefinition = serde_json::from_value(doc).expect("a CRD");
            let storage: Vec<_> = crd.spec.versions.iter().filter(|v| v.storage).collect();
            assert_eq!(storage.len(), 1, "{:?}: one storage version", crd.metadata.name);
            for v in &crd.spec.versions {
                served.push(format!("{}/{} {}", crd.spec.group, v.name, crd.spec.names.kind));
            }
        }
    }
    for kind in [
        "Gateway",
        "VirtualService",
        "DestinationRule",
        "ServiceEntry",
        "Sidecar",
    ] {
        for version in ["v1alpha3", "v1beta1", "v1"] {
            let want = format!("networking.istio.io/{version} {kind}");
            assert!(served.contains(&want), "{want} is not served");
        }
    }
    for kind in [
        "PeerAuthentication",
        "RequestAuthentication",
        "AuthorizationPolicy",
    ] {
        for version in ["v1beta1", "v1"] {
            let want = format!("security.istio.io/{version} {kind}");
            assert!(served.contains(&want), "{want} is not served");
        }
    }
    for kind in ["GatewayClass", "Gateway", "HTTPRoute", "GRPCRoute"] {
        let want = format!("gateway.networking.k8s.io/v1 {kind}");
        assert!(served.contains(&want), "{want} is not served");
    }
    for want in [
        "gateway.networking.k8s.io/v1beta1 ReferenceGrant",
        "gateway.networking.k8s.io/v1alpha2 TCPRoute",
        "gateway.networking.k8s.io/v1alpha2 TLSRoute",
    ] {
        assert!(served.iter().any(|s| s == want), "{want} is not served");
    }
}
