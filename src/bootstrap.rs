//! `meshd bootstrap`: the Envoy bootstrap that starts a stock Envoy as a
//! gateway or sidecar of meshd, with Istio's node id and metadata, an admin
//! listener, and ADS over gRPC (HTTP/2) to meshd.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::model::DOMAIN_SUFFIX;

/// What a bootstrap is made from.
#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    /// `gateway` (Istio's `router`) or `sidecar`.
    pub role: String,
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub ip: String,
    /// meshd's xDS address, `HOST:PORT`.
    pub xds_addr: String,
    /// Envoy's admin listener, `IP:PORT`.
    pub admin_addr: String,
    /// Use incremental (delta) xDS instead of state of the world.
    pub delta: bool,
    /// Connect to meshd's TLS port instead of the plain one.
    pub tls: Option<XdsTls>,
    /// A service-account token sent as `authorization: Bearer` metadata.
    pub token: Option<String>,
    /// Rewritten HTTP probes a sidecar answers on 15021: path → app port
    /// and path (from `meshd inject`).
    pub probes: Vec<ProbeRewrite>,
    /// Istio's interception mode: `REDIRECT` (traffic is captured by the
    /// rules of `meshd iptables`) or `NONE` (the app calls the sidecar's
    /// bound listeners; a Sidecar resource gives its ingress ports).
    pub interception_mode: String,
    /// `REGION/ZONE/SUBZONE` of the proxy (Envoy's node locality), for
    /// locality-aware load balancing; empty when unknown.
    pub locality: String,
    /// Where Envoy serves its own stats for Prometheus (`/stats/prometheus`,
    /// Istio's 15090), `IP:PORT`; none when `None`.
    pub stats_addr: Option<String>,
}

/// One rewritten probe: kubelet asks `path` on 15021, Envoy asks the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRewrite {
    pub path: String,
    pub port: u16,
    pub target_path: String,
}

impl std::str::FromStr for ProbeRewrite {
    type Err = String;

    /// `PATH=PORT/TARGET`, e.g. `/app-health/web/livez=8080/healthz`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("--probe {s:?} is not PATH=PORT/TARGET_PATH");
        let (path, rest) = s.split_once('=').ok_or_else(bad)?;
        let (port, target) = rest.split_once('/').map_or((rest, ""), |(p, t)| (p, t));
        Ok(ProbeRewrite {
            path: path.to_string(),
            port: port.parse().map_err(|_| bad())?,
            target_path: format!("/{target}"),
        })
    }
}

/// The sidecar's health port: readiness, and rewritten app probes.
pub const HEALTH_PORT: u16 = 15021;

/// A static listener on 15021 (excluded from capture) answering
/// `/healthz/ready` and forwarding rewritten probes to the app on localhost.
fn health(probes: &[ProbeRewrite]) -> (Value, Vec<Value>) {
    let mut routes = vec![json!({
        "match": {"path": "/healthz/ready"},
        "direct_response": {"status": 200, "body": {"inline_string": "ready\n"}},
    })];
    let mut clusters = Vec::new();
    for p in probes {
        let cluster = format!("probe|{}", p.port);
        routes.push(json!({
            "match": {"path": p.path},
            "route": {"cluster": cluster, "regex_rewrite": {"pattern": {"regex": ".*"}, "substitution": p.target_path}},
        }));
        if !clusters.iter().any(|c: &Value| c["name"] == cluster) {
            clusters.push(json!({
                "name": cluster,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": cluster,
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket("127.0.0.1", p.port)}}]}],
                },
            }));
        }
    }
    let listener = json!({
        "name": "health",
        "address": socket("0.0.0.0", HEALTH_PORT),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "health",
                "route_config": {"virtual_hosts": [{"name": "health", "domains": ["*"], "routes": routes}]},
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                }],
            },
        }]}],
    });
    (listener, clusters)
}

/// How Envoy reaches meshd's TLS port.
#[derive(Debug, Clone)]
pub struct XdsTls {
    /// meshd's root certificate (file path on Envoy's disk).
    pub root_cert: String,
    /// The name meshd's serving certificate is checked for (and sent as SNI).
    pub server_name: String,
    /// A client certificate and key issued by meshd (file paths), to
    /// authenticate with instead of a token.
    pub client_cert: Option<(String, String)>,
}

/// Why a bootstrap could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    /// `--role` is neither gateway nor sidecar.
    #[error("--role must be gateway or sidecar, not {0:?}")]
    Role(String),
    /// An address is not `HOST:PORT`.
    #[error("{flag} must be HOST:PORT, not {value:?}")]
    Address { flag: &'static str, value: String },
}

/// Istio's node id for a proxy: `ROLE~IP~POD.NS~NS.svc.cluster.local`.
pub fn node_id(role: &str, ip: &str, name: &str, namespace: &str) -> String {
    format!("{role}~{ip}~{name}.{namespace}~{namespace}.{DOMAIN_SUFFIX}")
}

fn split_addr(flag: &'static str, value: &str) -> Result<(String, u16), BootstrapError> {
    let err = || BootstrapError::Address {
        flag,
        value: value.to_string(),
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(err)?;
    let port = port.parse().map_err(|_| err())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(err());
    }
    Ok((host.to_string(), port))
}

fn socket(host: &str, port: u16) -> Value {
    json!({"socket_address": {"address": host, "port_value": port}})
}

/// Envoy's node locality from `REGION/ZONE/SUBZONE`.
fn locality(l: &str) -> serde_json::Value {
    let mut parts = l.splitn(3, '/');
    let mut next = || parts.next().unwrap_or_default().to_string();
    json!({"region": next(), "zone": next(), "sub_zone": next()})
}

/// The bootstrap as a JSON value (Envoy reads it as YAML or JSON).
pub fn bootstrap(o: &BootstrapOptions) -> Result<Value, BootstrapError> {
    let role = match o.role.as_str() {
        "gateway" | "router" => "router",
        "sidecar" => "sidecar",
        other => return Err(BootstrapError::Role(other.to_string())),
    };
    let (xds_host, xds_port) = split_addr("--xds-addr", &o.xds_addr)?;
    let (admin_host, admin_port) = split_addr("--admin-addr", &o.admin_addr)?;
    // An IP needs no resolver; a name (a Kubernetes Service) is resolved by DNS.
    let xds_type = if xds_host.parse::<std::net::IpAddr>().is_ok() {
        "STATIC"
    } else {
        "STRICT_DNS"
    };
    let ads_type = if o.delta { "DELTA_GRPC" } else { "GRPC" };
    let ads = json!({"ads": {}, "resource_api_version": "V3"});
    let app = o
        .labels
        .get("app")
        .or_else(|| o.labels.get("istio"))
        .unwrap_or(&o.name);
    // Envoy reconnects its xDS stream with a jittered backoff from 0.5 s
    // that grows to 30 s by default: an Envoy that failed a few times
    // while meshd restarted could wait half a minute more for its config.
    // Capped at 5 s, as meshd is a single process that restarts whole.
    let mut grpc_service = json!({"envoy_grpc": {
        "cluster_name": "xds-grpc",
        "retry_policy": {"retry_back_off": {"base_interval": "0.5s", "max_interval": "5s"}},
    }});
    if let Some(token) = &o.token {
        grpc_service["initial_metadata"] =
            json!([{"key": "authorization", "value": format!("Bearer {}", token.trim())}]);
    }
    let mut xds_cluster = json!({
        "name": "xds-grpc",
        "type": xds_type,
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "xds-grpc",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(&xds_host, xds_port)}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
    });
    if let Some(tls) = &o.tls {
        xds_cluster["transport_socket"] = upstream_tls(tls);
    }
    let mut clusters = vec![xds_cluster];
    let mut listeners = Vec::new();
    if role == "sidecar" {
        let (listener, probe_clusters) = health(&o.probes);
        listeners.push(listener);
        clusters.extend(probe_clusters);
    }
    if let Some(addr) = &o.stats_addr {
        let (host, port) = split_addr("--stats-addr", addr)?;
        let admin = if admin_host == "0.0.0.0" {
            "127.0.0.1"
        } else {
            admin_host.as_str()
        };
        let (listener, cluster) = prometheus_stats(&host, port, admin, admin_port);
        listeners.push(listener);
        clusters.push(cluster);
    }
    Ok(json!({
        "node": {
            "id": node_id(role, &o.ip, &o.name, &o.namespace),
            "cluster": format!("{app}.{}", o.namespace),
            "locality": locality(&o.locality),
            "metadata": {
                "NAME": o.name,
                "NAMESPACE": o.namespace,
                "LABELS": o.labels,
                "SERVICE_ACCOUNT": o.service_account,
                "INSTANCE_IPS": o.ip,
                "INTERCEPTION_MODE": o.interception_mode,
            },
        },
        "admin": {"address": socket(&admin_host, admin_port)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": ads_type,
                "transport_api_version": "V3",
                "grpc_services": [grpc_service],
            },
            "cds_config": ads.clone(),
            "lds_config": ads,
        },
        "static_resources": {
            "clusters": clusters,
            "listeners": listeners,
        },
    }))
}

/// Istio's stats listener: `/stats/prometheus` of Envoy's admin, on an
/// address Prometheus can reach (the admin itself stays on loopback).
fn prometheus_stats(host: &str, port: u16, admin_host: &str, admin_port: u16) -> (Value, Value) {
    let cluster = json!({
        "name": "prometheus_stats",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "prometheus_stats",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(admin_host, admin_port)}}]}],
        },
    });
    let listener = json!({
        "name": "prometheus_stats",
        "address": socket(host, port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "stats",
                "route_config": {"virtual_hosts": [{
                    "name": "stats",
                    "domains": ["*"],
                    "routes": [{"match": {"path": "/stats/prometheus"}, "route": {"cluster": "prometheus_stats"}}],
                }]},
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                }],
            },
        }]}],
    });
    (listener, cluster)
}

fn upstream_tls(tls: &XdsTls) -> Value {
    let mut common = json!({
        "validation_context": {
            "trusted_ca": {"filename": tls.root_cert},
            "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": tls.server_name}}],
        },
        "alpn_protocols": ["h2"],
    });
    if let Some((cert, key)) = &tls.client_cert {
        common["tls_certificates"] =
            json!([{"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}]);
    }
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": tls.server_name,
            "common_tls_context": common,
        },
    })
}

/// Parses `k=v,k2=v2`.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("label {pair:?} is not KEY=VALUE"))?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> BootstrapOptions {
        BootstrapOptions {
            role: "gateway".into(),
            name: "istio-ingressgateway-1".into(),
            namespace: "istio-system".into(),
            labels: parse_labels("istio=ingressgateway").expect("labels"),
            service_account: "istio-ingressgateway-service-account".into(),
            ip: "127.0.0.1".into(),
            xds_addr: "127.0.0.1:15010".into(),
            admin_addr: "127.0.0.1:15000".into(),
            stats_addr: None,
            delta: false,
            tls: None,
            token: None,
            probes: Vec::new(),
            interception_mode: "REDIRECT".into(),
            locality: String::new(),
        }
    }

    #[test]
    fn gateway_bootstrap_has_istio_node_and_ads() {
        let b = bootstrap(&opts()).expect("bootstrap");
        assert_eq!(
            b["node"]["id"],
            "router~127.0.0.1~istio-ingressgateway-1.istio-system~istio-system.svc.cluster.local"
        );
        assert_eq!(b["node"]["metadata"]["LABELS"]["istio"], "ingressgateway");
        assert_eq!(b["dynamic_resources"]["ads_config"]["api_type"], "GRPC");
        assert_eq!(b["static_resources"]["clusters"][0]["type"], "STATIC");
        let grpc = &b["dynamic_resources"]["ads_config"]["grpc_services"][0]["envoy_grpc"];
        assert_eq!(grpc["retry_policy"]["retry_back_off"]["max_interval"], "5s");
    }

    #[test]
    fn tls_and_token() {
        let mut o = opts();
        o.tls = Some(XdsTls {
            root_cert: "/etc/meshd/root-cert.pem".into(),
            server_name: "meshd.istio-system.svc".into(),
            client_cert: None,
        });
        o.token = Some("abc.def.ghi\n".into());
        let b = bootstrap(&o).expect("bootstrap");
        let grpc = &b["dynamic_resources"]["ads_config"]["grpc_services"][0];
        assert_eq!(grpc["initial_metadata"][0]["value"], "Bearer abc.def.ghi");
        let tls = &b["static_resources"]["clusters"][0]["transport_socket"]["typed_config"];
        assert_eq!(tls["sni"], "meshd.istio-system.svc");
        assert_eq!(
            tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"],
            "/etc/meshd/root-cert.pem"
        );
    }

    #[test]
    fn sidecars_answer_health_and_rewritten_probes() {
        let mut o = opts();
        o.role = "sidecar".into();
        o.probes = vec!["/app-health/web/livez=8080/healthz".parse().expect("probe")];
        let b = bootstrap(&o).expect("bootstrap");
        let listener = &b["static_resources"]["listeners"][0];
        assert_eq!(listener["address"]["socket_address"]["port_value"], 15021);
        let routes = &listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
            ["virtual_hosts"][0]["routes"];
        assert_eq!(routes[1]["match"]["path"], "/app-health/web/livez");
        assert_eq!(routes[1]["route"]["regex_rewrite"]["substitution"], "/healthz");
        assert_eq!(b["static_resources"]["clusters"][1]["name"], "probe|8080");
        assert!("nonsense".parse::<ProbeRewrite>().is_err());
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut o = opts();
        o.role = "ingress".into();
        assert_eq!(bootstrap(&o), Err(BootstrapError::Role("ingress".into())));
        let mut o = opts();
        o.xds_addr = "nowhere".into();
        assert!(bootstrap(&o).is_err());
        assert!(parse_labels("a=b,c").is_err());
    }
}
