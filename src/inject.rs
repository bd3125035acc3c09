//! Sidecar injection, as `istioctl kube-inject` and Istio's webhook do it,
//! with a stock Envoy: an init container runs `meshd iptables` (the capture
//! rules) and `meshd bootstrap` (Envoy's bootstrap, into a shared volume),
//! and the `istio-proxy` container runs stock Envoy from it as uid 1337.
//! HTTP probes are rewritten to Envoy's 15021 (not captured), which
//! forwards them to the app, so kubelet checks keep working under STRICT.

use serde_json::{json, Map, Value};

/// Images and addresses the injected containers use.
#[derive(Debug, Clone)]
pub struct InjectOptions {
    /// Stock Envoy.
    pub proxy_image: String,
    /// An image with the `meshd` binary, for the init container.
    pub meshd_image: String,
    /// meshd's TLS xDS address as pods reach it.
    pub xds_addr: String,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            proxy_image: "envoyproxy/envoy:v1.40.0".into(),
            meshd_image: "meshd-init:latest".into(),
            xds_addr: "meshd.istio-system.svc:15012".into(),
        }
    }
}

/// Why a document could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The input is not YAML/JSON documents.
    #[error("{0}")]
    Parse(String),
    /// The output could not be written.
    #[error("writing YAML: {0}")]
    Write(String),
}

/// The kinds whose pods are described by `spec.template`.
const WORKLOAD_KINDS: &[&str] = &[
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "ReplicationController",
];

/// The port Envoy answers rewritten probes on (not captured inbound).
pub const PROBE_PORT: u16 = crate::bootstrap::HEALTH_PORT;
/// Where an injected sidecar serves Envoy's stats for Prometheus, as Istio's
/// do (the pod is annotated for scraping there).
pub const STATS_PORT: u16 = 15090;

/// Injects every workload in a YAML stream; other documents pass through.
pub fn inject_yaml(text: &str, o: &InjectOptions) -> Result<String, InjectError> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let yaml = serde_norway::Value::deserialize(doc).map_err(|e| InjectError::Parse(e.to_string()))?;
        let mut value = serde_json::to_value(yaml).map_err(|e| InjectError::Parse(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        inject_document(&mut value, o);
        out.push(serde_norway::to_string(&value).map_err(|e| InjectError::Write(e.to_string()))?);
    }
    Ok(out.join("---\n"))
}

/// Injects one document in place: a Pod, a workload with a pod template,
/// or a `List` of them.
pub fn inject_document(doc: &mut Value, o: &InjectOptions) {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if kind == "List" {
        for item in doc
            .get_mut("items")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            inject_document(item, o);
        }
    } else if kind == "Pod" {
        inject_pod(doc, o);
    } else if WORKLOAD_KINDS.contains(&kind.as_str()) {
        if let Some(template) = doc.pointer_mut("/spec/template") {
            inject_pod(template, o);
        }
    }
}

fn object<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !v.get(key).is_some_and(Value::is_object) {
        v[key] = json!({});
    }
    match v.get_mut(key) {
        Some(Value::Object(m)) => m,
        _ => unreachable!("just made an object"),
    }
}

fn array<'a>(v: &'a mut Value, key: &str) -> &'a mut Vec<Value> {
    if !v.get(key).is_some_and(Value::is_array) {
        v[key] = json!([]);
    }
    match v.get_mut(key) {
        Some(Value::Array(a)) => a,
        _ => unreachable!("just made an array"),
    }
}

/// Whether the pod opts out (`sidecar.istio.io/inject: "false"`, as a label
/// or an annotation) or is injected already.
pub fn skip(pod: &Value) -> bool {
    let opted_out = ["labels", "annotations"].iter().any(|k| {
        pod.pointer(&format!("/metadata/{k}/sidecar.istio.io~1inject"))
            .and_then(Value::as_str)
            == Some("false")
    });
    let injected = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .is_some_and(|cs| cs.iter().any(|c| c["name"] == "istio-proxy"));
    opted_out || injected
}

/// A probe rewritten to Envoy, and where it really goes.
struct Probe {
    path: String,
    port: u64,
    target_path: String,
}

/// Rewrites the HTTP probes of every app container to 15021.
fn rewrite_probes(spec: &mut Value) -> Vec<Probe> {
    let mut probes = Vec::new();
    for c in spec
        .get_mut("containers")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        let name = c["name"].as_str().unwrap_or_default().to_string();
        let ports = c.get("ports").cloned().unwrap_or(Value::Null);
        for (kind, suffix) in [
            ("livenessProbe", "livez"),
            ("readinessProbe", "readyz"),
            ("startupProbe", "startupz"),
        ] {
            let Some(get) = c.get_mut(kind).and_then(|p| p.get_mut("httpGet")) else {
                continue;
            };
            let port = match &get["port"] {
                Value::Number(n) => n.as_u64(),
                Value::String(named) => ports
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["name"] == named.as_str())
                    .and_then(|p| p["containerPort"].as_u64()),
                _ => None,
            };
            let Some(port) = port else { continue };
            let path = format!("/app-health/{name}/{suffix}");
            probes.push(Probe {
                path: path.clone(),
                port,
                target_path: get["path"].as_str().unwrap_or("/").to_string(),
            });
            get["port"] = json!(PROBE_PORT);
            get["path"] = json!(path);
        }
    }
    probes
}

fn inject_pod(pod: &mut Value, o: &InjectOptions) {
    if skip(pod) {
        return;
    }
    let labels: Vec<String> = pod
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some(format!("{k}={}", v.as_str()?)))
                .collect()
        })
        .unwrap_or_default();
    let meta = object(pod, "metadata");
    let labels_obj = meta.entry("labels").or_insert_with(|| json!({}));
    labels_obj["security.istio.io/tlsMode"] = json!("istio");
    let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
    annotations["sidecar.istio.io/status"] = json!(
        r#"{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["meshd-envoy","istio-token","istio-ca-root-cert"]}"#
    );
    // Where Prometheus finds the sidecar's stats, as Istio annotates its
    // pods. An app's own prometheus.io annotations are kept (Istio would
    // merge the app's metrics into the sidecar's; meshd does not).
    for (key, value) in [
        ("prometheus.io/scrape", "true".to_string()),
        ("prometheus.io/port", STATS_PORT.to_string()),
        ("prometheus.io/path", "/stats/prometheus".to_string()),
    ] {
        if annotations.get(key).is_none() {
            annotations[key] = json!(value);
        }
    }
    if !pod.get("spec").is_some_and(Value::is_object) {
        pod["spec"] = json!({});
    }
    let spec = &mut pod["spec"];
    let probes = rewrite_probes(spec);
    let mut bootstrap = vec![
        "meshd bootstrap --role sidecar".to_string(),
        "--name \"$POD_NAME\" --namespace \"$POD_NAMESPACE\" --ip \"$POD_IP\"".into(),
        "--service-account \"$SERVICE_ACCOUNT\"".into(),
        format!("--labels '{}'", labels.join(",")),
        format!("--xds-addr {} --xds-tls", o.xds_addr),
        format!("--stats-addr 0.0.0.0:{STATS_PORT}"),
        "--root-cert /var/run/secrets/istio/root-cert.pem".into(),
        "--token-file /var/run/secrets/tokens/istio-token".into(),
    ];
    for p in &probes {
        bootstrap.push(format!("--probe '{}={}{}'", p.path, p.port, p.target_path));
    }
    bootstrap.push("-o /etc/meshd/envoy.yaml".into());
    let field = |path: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": path}}});
    let env = json!([
        {"name": "POD_NAME", "valueFrom": field("metadata.name")["valueFrom"]},
        {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")["valueFrom"]},
        {"name": "POD_IP", "valueFrom": field("status.podIP")["valueFrom"]},
        {"name": "SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")["valueFrom"]},
    ]);
    let init = json!({
        "name": "istio-init",
        "image": o.meshd_image,
        "command": ["sh", "-c"],
        "args": [format!("meshd iptables && {}", bootstrap.join(" "))],
        "env": env,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "meshd-envoy", "mountPath": "/etc/meshd"},
            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens"},
            {"name": "istio-ca-root-cert", "mountPath": "/var/run/secrets/istio"},
        ],
    });
    array(spec, "initContainers").insert(0, init);
    array(spec, "containers").push(json!({
        "name": "istio-proxy",
        "image": o.proxy_image,
        "args": ["-c", "/etc/meshd/envoy.yaml", "--disable-hot-restart", "-l", "warning"],
        "ports": [
            {"name": "health", "containerPort": PROBE_PORT, "protocol": "TCP"},
            {"name": "http-envoy-prom", "containerPort": STATS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": PROBE_PORT}, "periodSeconds": 2},
        "securityContext": {
            "runAsUser": 1337,
            "runAsGroup": 1337,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "meshd-envoy", "mountPath": "/etc/meshd", "readOnly": true}],
    }));
    let volumes = array(spec, "volumes");
    volumes.push(json!({"name": "meshd-envoy", "emptyDir": {"medium": "Memory"}}));
    volumes.push(json!({"name": "istio-token", "projected": {"sources": [
        {"serviceAccountToken": {"audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}
    ]}}));
    volumes.push(json!({"name": "istio-ca-root-cert", "configMap": {"name": "istio-ca-root-cert"}}));
}
