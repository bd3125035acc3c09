//! The sidecar injection webhook: Kubernetes posts an AdmissionReview for
//! each new Pod, and gets back the same mutation `meshd inject` makes, as a
//! JSON patch. Served over TLS with meshd's own serving certificate.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::Resource;
use crate::inject::{inject_document, InjectOptions};
use crate::xds::SnapshotCache;

/// What the webhook reads.
#[derive(Clone)]
struct WebhookState {
    cache: Arc<SnapshotCache>,
    options: Arc<InjectOptions>,
}

/// The webhook's routes (`POST /inject`).
pub fn router(cache: Arc<SnapshotCache>, options: InjectOptions) -> Router {
    Router::new()
        .route("/inject", post(review))
        .with_state(WebhookState {
            cache,
            options: Arc::new(options),
        })
}

/// Whether meshd's config says a namespace does not want injection: it is
/// known and not labelled `istio-injection=enabled`. Unknown namespaces are
/// left to the webhook configuration's namespaceSelector.
fn namespace_declines(cache: &SnapshotCache, namespace: &str) -> bool {
    let push = cache.push_context();
    push.config.resources.values().any(|e| match &*e.resource {
        Resource::Namespace(ns) if ns.metadata.name.as_deref() == Some(namespace) => {
            let label = ns.metadata.labels.as_ref().and_then(|l| l.get("istio-injection"));
            label.map(String::as_str) != Some("enabled")
        }
        _ => false,
    })
}

/// The AdmissionReview response for one request.
pub fn respond(review: &Value, declined: bool, options: &InjectOptions) -> Value {
    let request = &review["request"];
    let uid = request["uid"].clone();
    let original = request["object"].clone();
    let pod_opts_in = original
        .pointer("/metadata/labels/sidecar.istio.io~1inject")
        .and_then(Value::as_str)
        == Some("true");
    let mut pod = original.clone();
    if !declined || pod_opts_in {
        if pod.get("kind").is_none() {
            pod["kind"] = json!("Pod");
        }
        inject_document(&mut pod, options);
    }
    let mut response = json!({"uid": uid, "allowed": true});
    if pod != original {
        let patch = json!([
            {"op": "add", "path": "/metadata/labels", "value": pod["metadata"]["labels"]},
            {"op": "add", "path": "/metadata/annotations", "value": pod["metadata"]["annotations"]},
            {"op": "replace", "path": "/spec", "value": pod["spec"]},
        ]);
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch.to_string()));
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

async fn review(State(s): State<WebhookState>, Json(review): Json<Value>) -> Json<Value> {
    let namespace = review["request"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let declined = namespace_declines(&s.cache, &namespace);
    Json(respond(&review, declined, &s.options))
}

/// Serves `router` over TLS on `listener` until `stop` completes.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("webhook accept: {e}");
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::debug!(%peer, "webhook TLS handshake: {e}");
                    return;
                }
            };
            if let Err(e) = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, "webhook connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_with_a_json_patch_or_nothing() {
        let review = json!({"request": {"uid": "u-1", "namespace": "default", "object": {
            "apiVersion": "v1", "metadata": {"name": "p", "labels": {"app": "x"}},
            "spec": {"containers": [{"name": "app", "image": "app"}]}}}});
        let out = respond(&review, false, &InjectOptions::default());
        assert_eq!(out["response"]["uid"], "u-1");
        assert_eq!(out["response"]["allowed"], true);
        let patch = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().expect("patch"))
            .expect("base64");
        let patch: Value = serde_json::from_slice(&patch).expect("json");
        assert_eq!(patch[2]["op"], "replace");
        assert_eq!(patch[2]["value"]["containers"][1]["name"], "istio-proxy");
        let declined = respond(&review, true, &InjectOptions::default());
        assert!(declined["response"].get("patch").is_none());
    }
}
