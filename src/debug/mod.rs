//! debug: the HTTP endpoints people and tools read to see what meshd
//! loaded and what each proxy was sent. It reads config, model, cache and
//! stream state and never writes them.
//!
//! - `/ready`: 200 once config is loaded (with `--kube`, once every watch
//!   was listed) and the xDS port listens; 503 before.
//! - `/debug/syncz`: every connected proxy; per type the version sent,
//!   acked, or NACKed with Envoy's error.
//! - `/debug/config_dump?proxy=ID[&types=clusters,routes]`: what that
//!   proxy was sent, in the shape of Envoy's own `/config_dump` (private
//!   keys redacted, as Envoy does), all sections or those named.
//! - `/debug/configz`: every resource as loaded, the rejected documents and,
//!   with `--kube`, the state of each watch.
//! - `/debug/registryz`: every service, its ports and endpoints (with their
//!   mesh TLS mode).
//! - `/debug/push_status`: the last pushes: trigger, proxies, duration.
//! - `/debug/certz`: the CA's root and the certificates issued, by identity.
//! - `/debug/authenticationz?proxy=ID`: the mutual TLS a proxy's workload
//!   accepts per port, and whether each of its outbound clusters uses it.
//! - `/metrics`: Prometheus text, with Istio's metric names where Istio has one.

pub mod dump;
pub mod render;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use envoy_types::pb::envoy::admin::v3::{
    clusters_config_dump, endpoints_config_dump, listeners_config_dump, routes_config_dump,
    secrets_config_dump, ClustersConfigDump, ConfigDump, EndpointsConfigDump, ListenersConfigDump,
    RoutesConfigDump, SecretsConfigDump,
};
use envoy_types::pb::google::protobuf::Timestamp;
use envoy_types::util::pack_any;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};

use crate::config::Resource;
use crate::model::gateway_status;
use crate::xds::status::{ConnectionStatus, TypeStatus};
use crate::xds::{Registry, SnapshotCache, XdsType};

/// What the endpoints read.
#[derive(Debug, Clone)]
pub struct DebugState {
    pub cache: Arc<SnapshotCache>,
    pub registry: Arc<Registry>,
    /// Set once config is loaded and the xDS port is listening.
    pub ready: Arc<AtomicBool>,
    /// Renders `/metrics`; `None` where no recorder is installed (tests).
    pub metrics: Option<PrometheusHandle>,
    /// Things an operator must know, shown on `/debug/syncz`.
    pub warnings: Vec<String>,
    /// The CA, for `/debug/certz`.
    pub authority: Arc<crate::ca::Authority>,
    /// The cluster source, when meshd watches one: `/ready` waits for its
    /// first sync and `/debug/configz` shows its watches.
    pub kube: Option<Arc<crate::source::KubeSync>>,
}

/// The debug router.
pub fn router(state: DebugState) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/debug/syncz", get(syncz))
        .route("/debug/config_dump", get(config_dump))
        .route("/debug/configz", get(configz))
        .route("/debug/registryz", get(registryz))
        .route("/debug/push_status", get(push_status))
        .route("/debug/certz", get(certz))
        .route("/debug/authenticationz", get(authenticationz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn ready(State(s): State<DebugState>) -> Response {
    let synced = s.kube.as_ref().is_none_or(|k| k.synced());
    if s.ready.load(Ordering::Acquire) && synced {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(s): State<DebugState>) -> Response {
    match &s.metrics {
        Some(handle) => {
            crate::process::record_metrics();
            (
                [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "no metrics recorder\n").into_response(),
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn type_json(t: &TypeStatus) -> Value {
    json!({
        "sent_version": t.sent_version,
        "sent_nonce": t.sent_nonce,
        "acked_version": t.acked_version,
        "nack": t.nack,
        "last_sent": t.last_sent.map(unix),
        "resources": t.held.len(),
    })
}

fn connection_json(c: &ConnectionStatus) -> Value {
    let types: BTreeMap<String, Value> = c
        .types
        .iter()
        .map(|(t, s)| (t.to_string(), type_json(s)))
        .collect();
    json!({
        "proxy": c.proxy.id,
        "ip": c.proxy.ip,
        "role": c.proxy.role,
        "namespace": c.proxy.namespace,
        "labels": c.proxy.labels,
        "service_account": c.proxy.service_account,
        "identity": c.proxy.identity,
        "mode": c.mode,
        "connected_since": unix(c.connected_since),
        "generation": c.generation,
        "types": types,
        "diagnostics": c.diagnostics,
    })
}

async fn syncz(State(s): State<DebugState>) -> Json<Value> {
    let proxies: Vec<Value> = s.registry.list().iter().map(connection_json).collect();
    Json(json!({
        "generation": s.cache.push_context().config.generation,
        "warnings": s.warnings,
        "proxies": proxies,
    }))
}

/// Every service with its ports and endpoints, as the current generation
/// sees them; `tls_mode` is `istio` for endpoints whose Pod is in the mesh.
async fn registryz(State(s): State<DebugState>) -> Json<Value> {
    let push = s.cache.push_context();
    let services: Vec<Value> = push
        .services
        .values()
        .map(|svc| {
            let ports: Vec<Value> = svc
                .ports
                .iter()
                .map(|p| {
                    let endpoints: Vec<Value> = p
                        .endpoints
                        .iter()
                        .map(|e| {
                            json!({
                                "address": e.ip,
                                "port": e.port,
                                "tls_mode": if e.mesh.is_some() { "istio" } else { "disabled" },
                                "service_account": e.mesh.as_ref().map(|(ns, sa)| format!("{ns}/{sa}")),
                                "labels": e.labels,
                                "locality": e.locality,
                            })
                        })
                        .collect();
                    json!({
                        "name": p.name,
                        "port": p.port,
                        "protocol": p.protocol,
                        "app_protocol": p.app_protocol,
                        "target_port": p.target_port,
                        "endpoints": endpoints,
                    })
                })
                .collect();
            json!({
                "hostname": svc.hostname,
                "namespace": svc.namespace,
                "name": svc.name,
                "cluster_ip": svc.cluster_ip,
                "resolution": svc.resolution,
                "mesh_external": svc.external,
                "ports": ports,
            })
        })
        .collect();
    Json(json!({
        "generation": push.config.generation,
        "services": services,
    }))
}

/// The last pushes, newest first: what triggered each, how many proxies
/// it reached and when the last of them was written.
async fn push_status(State(s): State<DebugState>) -> Json<Value> {
    let pushes: Vec<Value> = s
        .cache
        .push_history()
        .iter()
        .map(|p| {
            json!({
                "generation": p.generation,
                "installed": unix(p.installed),
                "trigger": p.trigger,
                "endpoint_only": p.endpoint_only,
                "proxies": p.proxies(),
                "last_push_ms": p.last_push().as_secs_f64() * 1000.0,
            })
        })
        .collect();
    Json(json!({ "pushes": pushes }))
}

/// The CA's root and the last certificate issued to each identity (never
/// a key).
async fn certz(State(s): State<DebugState>) -> Json<Value> {
    let now = SystemTime::now();
    let left = |t: SystemTime| t.duration_since(now).map(|d| d.as_secs()).unwrap_or(0);
    let certificates: Vec<Value> = s
        .authority
        .issued()
        .iter()
        .map(|r| {
            json!({
                "identity": r.identity,
                "via": r.via,
                "issued": unix(r.issued),
                "not_after": unix(r.not_after),
                "expires_in_s": left(r.not_after),
                "count": r.count,
            })
        })
        .collect();
    Json(json!({
        "trust_domain": s.authority.trust_domain(),
        "root": {
            "fingerprint_sha256": s.authority.root_fingerprint(),
            "not_after": unix(s.authority.root_not_after()),
            "expires_in_s": left(s.authority.root_not_after()),
        },
        "certificates": certificates,
    }))
}

/// "How do I check mTLS?": what the proxy's workload accepts (the
/// PeerAuthentications in force, per port) and how each of its outbound
/// clusters connects.
async fn authenticationz(State(s): State<DebugState>, Query(q): Query<ProxyQuery>) -> Response {
    let conn = match connection(&s, q.proxy) {
        Ok(conn) => conn,
        Err(response) => return response,
    };
    let push = s.cache.push_context();
    let proxy = &conn.proxy;
    let labels = push.pods.get(&proxy.ip).map_or(&proxy.labels, |p| &p.labels);
    let mtls = crate::model::peer_auth::resolve(&push, &proxy.namespace, labels);
    let clusters: Vec<Value> = conn
        .types
        .get(&XdsType::Cluster)
        .map(|t| {
            t.held
                .values()
                .map(|e| json!({"cluster": e.name, "tls": upstream_tls(&e.body())}))
                .collect()
        })
        .unwrap_or_default();
    Json(json!({
        "proxy": proxy.id,
        "identity": proxy.identity,
        "inbound": {
            "mode": mtls.mode,
            "ports": mtls.ports,
        },
        "outbound": clusters,
    }))
    .into_response()
}

/// How a cluster connects upstream: `ISTIO_MUTUAL` (the workload
/// certificate, over SDS `default`), `AUTO` (mutual TLS to the endpoints
/// whose Pods are in the mesh, plain text to the others), `TLS` (other
/// certificates), or `DISABLE`.
fn upstream_tls(cluster: &envoy_types::pb::google::protobuf::Any) -> &'static str {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::{transport_socket, TransportSocket};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
    use prost::Message;
    let Ok(cluster) = Cluster::decode(cluster.value.as_slice()) else {
        return "UNKNOWN";
    };
    let tls = |socket: &TransportSocket| {
        let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
            return None;
        };
        let ctx = UpstreamTlsContext::decode(any.value.as_slice()).ok()?;
        let common = ctx.common_tls_context.unwrap_or_default();
        let workload = common
            .tls_certificate_sds_secret_configs
            .iter()
            .any(|c| c.name == crate::ca::workload::DEFAULT_SECRET);
        Some(if workload { "ISTIO_MUTUAL" } else { "TLS" })
    };
    if let Some(kind) = cluster.transport_socket.as_ref().and_then(tls) {
        return kind;
    }
    let auto = cluster
        .transport_socket_matches
        .iter()
        .filter_map(|m| m.transport_socket.as_ref())
        .any(|t| tls(t) == Some("ISTIO_MUTUAL"));
    if auto {
        "AUTO"
    } else {
        "DISABLE"
    }
}

/// The connected proxy a `?proxy=ID` names, or the response saying why not.
#[allow(clippy::result_large_err)]
fn connection(s: &DebugState, proxy: Option<String>) -> Result<ConnectionStatus, Response> {
    let Some(id) = proxy else {
        let ids: Vec<String> = s.registry.list().into_iter().map(|c| c.proxy.id).collect();
        return Err((
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "give ?proxy=ID; connected proxies are listed", "proxies": ids})),
        )
            .into_response());
    };
    s.registry.find(&id).ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no connected proxy {id}")})),
        )
            .into_response()
    })
}

#[derive(Debug, serde::Deserialize)]
struct ProxyQuery {
    proxy: Option<String>,
    /// `types=clusters,routes` (or `cds,rds`): only those sections.
    types: Option<String>,
}

/// The config dump sections, in Envoy's order, with the xDS short names.
const DUMP_SECTIONS: [(&str, &str); 5] = [
    ("clusters", "cds"),
    ("endpoints", "eds"),
    ("listeners", "lds"),
    ("routes", "rds"),
    ("secrets", "sds"),
];

async fn config_dump(State(s): State<DebugState>, Query(q): Query<ProxyQuery>) -> Response {
    let wanted: Vec<usize> = match &q.types {
        None => (0..DUMP_SECTIONS.len()).collect(),
        Some(types) => {
            let mut wanted = Vec::new();
            for t in types.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                match DUMP_SECTIONS
                    .iter()
                    .position(|(long, short)| t == *long || t == *short)
                {
                    Some(i) => wanted.push(i),
                    None => {
                        let known: Vec<&str> = DUMP_SECTIONS.iter().map(|(l, _)| *l).collect();
                        return (
                            StatusCode::BAD_REQUEST,
                            Json(json!({"error": format!("unknown type {t:?}; types are {}", known.join(", "))})),
                        )
                            .into_response();
                    }
                }
            }
            wanted
        }
    };
    let conn = match connection(&s, q.proxy) {
        Ok(conn) => conn,
        Err(response) => return response,
    };
    let mut whole = dump(&conn);
    whole.configs = whole
        .configs
        .into_iter()
        .enumerate()
        .filter(|(i, _)| wanted.contains(i))
        .map(|(_, c)| c)
        .collect();
    match render::message_to_json(&whole) {
        Ok(v) => Json(v).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e}))).into_response(),
    }
}

/// The proxy's resources as Envoy's ConfigDump.
fn dump(conn: &ConnectionStatus) -> ConfigDump {
    let empty = TypeStatus::default();
    let of = |t: XdsType| conn.types.get(&t).unwrap_or(&empty);
    let stamp = |s: &TypeStatus| {
        s.last_sent.map(|t| {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            Timestamp {
                seconds: i64::try_from(d.as_secs()).unwrap_or_default(),
                nanos: i32::try_from(d.subsec_nanos()).unwrap_or_default(),
            }
        })
    };
    let version = |s: &TypeStatus| s.sent_version.clone().unwrap_or_default();

    let cds = of(XdsType::Cluster);
    let clusters = ClustersConfigDump {
        version_info: version(cds),
        dynamic_active_clusters: cds
            .held
            .values()
            .map(|e| clusters_config_dump::DynamicCluster {
                version_info: version(cds),
                cluster: Some(e.body()),
                last_updated: stamp(cds),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let lds = of(XdsType::Listener);
    let listeners = ListenersConfigDump {
        version_info: version(lds),
        dynamic_listeners: lds
            .held
            .values()
            .map(|e| listeners_config_dump::DynamicListener {
                name: e.name.clone(),
                active_state: Some(listeners_config_dump::DynamicListenerState {
                    version_info: version(lds),
                    listener: Some(e.body()),
                    last_updated: stamp(lds),
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let rds = of(XdsType::Route);
    let routes = RoutesConfigDump {
        dynamic_route_configs: rds
            .held
            .values()
            .map(|e| routes_config_dump::DynamicRouteConfig {
                version_info: version(rds),
                route_config: Some(e.body()),
                last_updated: stamp(rds),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let eds = of(XdsType::Endpoint);
    let endpoints = EndpointsConfigDump {
        dynamic_endpoint_configs: eds
            .held
            .values()
            .map(|e| endpoints_config_dump::DynamicEndpointConfig {
                version_info: version(eds),
                endpoint_config: Some(e.body()),
                last_updated: stamp(eds),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let sds = of(XdsType::Secret);
    let secrets = SecretsConfigDump {
        dynamic_active_secrets: sds
            .held
            .values()
            .map(|e| secrets_config_dump::DynamicSecret {
                name: e.name.clone(),
                version_info: version(sds),
                last_updated: stamp(sds),
                secret: Some(render::redacted_secret_any(&e.body())),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    ConfigDump {
        configs: vec![
            pack_any(clusters),
            pack_any(endpoints),
            pack_any(listeners),
            pack_any(routes),
            pack_any(secrets),
        ],
    }
}

/// A resource for display: Secrets show their keys, never their values.
fn redacted(resource: &Resource) -> Value {
    match resource {
        Resource::Secret(secret) => {
            let keys: Vec<&String> = secret
                .data
                .iter()
                .flat_map(|d| d.keys())
                .chain(secret.string_data.iter().flat_map(|d| d.keys()))
                .collect();
            json!({"metadata": secret.metadata, "type": secret.type_, "keys": keys, "values": "redacted"})
        }
        other => serde_json::to_value(other).unwrap_or(Value::Null),
    }
}

async fn configz(State(s): State<DebugState>) -> Json<Value> {
    let config = s.cache.push_context().config.clone();
    let proxies: Vec<crate::model::Proxy> = s.registry.list().into_iter().map(|c| c.proxy).collect();
    let resources: Vec<Value> = config
        .resources
        .iter()
        .map(|(key, entry)| {
            let mut v = json!({
                "kind": key.kind,
                "namespace": key.namespace,
                "name": key.name,
                "file": entry.origin.file,
                "document": entry.origin.document,
                "line": entry.origin.line,
                "resource": redacted(&entry.resource),
            });
            if let Some(status) = gateway_status::status_of(&config, &entry.resource, &proxies) {
                v["status"] = status;
            }
            v
        })
        .collect();
    let rejected: Vec<Value> = config
        .rejections
        .iter()
        .map(|r| {
            json!({
                "file": r.origin.file,
                "document": r.origin.document,
                "line": r.origin.line,
                "kind": r.key.as_ref().map(|k| k.kind),
                "namespace": r.key.as_ref().map(|k| k.namespace.clone()),
                "name": r.key.as_ref().map(|k| k.name.clone()),
                "field": r.field,
                "reason": r.reason,
                "last_good_kept": r.last_good_kept,
                "message": r.to_string(),
            })
        })
        .collect();
    let mut body = json!({ "generation": config.generation, "resources": resources, "rejected": rejected });
    if let Some(kube) = &s.kube {
        body["kube"] = kube.status();
    }
    Json(body)
}
