//! `meshd serve --kube` against a local API server that answers in the
//! Kubernetes wire format (no real API server can run here): the first
//! sync, changes of every kind reaching a connected ADS client, recovery
//! from `410 Gone` and dropped watches, readiness, namespace selection.

use std::time::Duration;

use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use serde_json::{json, Value};

use crate::common::ads::{AdsClient, CLUSTERS, ENDPOINTS, LISTENERS, ROUTES, SECRETS};
use crate::common::apiserver::{kubeconfig, ApiServer};
use crate::common::{eventually, free_port, openssl, Meshd};

const GATEWAY_NODE: &str = "router~127.0.0.1~gw-1.istio-system~istio-system.svc.cluster.local";
const HELLO: &str = "outbound|80||hello.default.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(20);

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: default}
spec:
  selector: {app: hello}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: hello-abc
  namespace: default
  labels: {kubernetes.io/service-name: hello}
addressType: IPv4
endpoints: [{addresses: [10.1.0.1], conditions: {ready: true}}]
ports: [{name: http, port: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Pod
metadata: {name: gw-1, namespace: istio-system, labels: {istio: ingressgateway}}
spec: {containers: [{name: istio-proxy, image: envoy}]}
status: {podIP: 127.0.0.1}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ['*']
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ['*']
    tls: {mode: SIMPLE, credentialName: hello-cert}
"#;

fn virtual_service(host: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: hello, namespace: default}}\n\
         spec:\n  hosts: [{host}]\n  gateways: [istio-system/gw]\n  http:\n  - route:\n    - destination: {{host: hello}}\n"
    )
}

fn slice(ip: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: hello-abc\n  namespace: default\n\
         \x20 labels: {{kubernetes.io/service-name: hello}}\naddressType: IPv4\n\
         endpoints: [{{addresses: [{ip}], conditions: {{ready: true}}}}]\nports: [{{name: http, port: 8080, protocol: TCP}}]\n"
    )
}

/// A Secret with a certificate and key made by openssl.
fn tls_secret(dir: &std::path::Path, namespace: &str, name: &str) -> String {
    crate::common::tls_secret(dir, namespace, name, "hello.example.com")
}

fn gateway_client(meshd: &Meshd) -> AdsClient {
    AdsClient::connect(
        meshd.xds_port,
        GATEWAY_NODE,
        "istio-system",
        &[("istio", "ingressgateway")],
        &[
            (CLUSTERS, &[]),
            (LISTENERS, &[]),
            (ENDPOINTS, &[HELLO]),
            (ROUTES, &["http.80"]),
            (SECRETS, &["kubernetes://hello-cert"]),
        ],
    )
}

fn endpoint_ips(ads: &AdsClient) -> Vec<String> {
    let Some(cla) = ads.get::<ClusterLoadAssignment>(ENDPOINTS, HELLO) else {
        return Vec::new();
    };
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(ep)) => {
                ep.address
                    .as_ref()
                    .and_then(|a| a.address.as_ref())
                    .map(|a| format!("{a:?}"))
            }
            _ => None,
        })
        .collect()
}

/// The hosts the gateway's port 80 routes (each domain also comes as
/// `host:*`, which is left out).
fn domains(ads: &AdsClient) -> Vec<String> {
    ads.get::<RouteConfiguration>(ROUTES, "http.80")
        .map(|rc| {
            rc.virtual_hosts
                .iter()
                .flat_map(|v| v.domains.clone())
                .filter(|d| !d.ends_with(":*"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the client's state passes `check`; the message says what
/// it holds otherwise.
fn until(what: &str, ads: &AdsClient, check: impl Fn(&AdsClient) -> bool) {
    eventually(what, WAIT, || {
        if check(ads) {
            Ok(())
        } else {
            Err(format!(
                "clusters {:?}, listeners {:?}, endpoints {:?}, domains {:?}",
                ads.names(CLUSTERS),
                ads.names(LISTENERS),
                endpoint_ips(ads),
                domains(ads)
            ))
        }
    });
}

/// The resources `/debug/configz` shows, as `Kind ns/name` → resource.
fn configz(meshd: &Meshd) -> (Vec<(String, Value)>, Value) {
    let body = meshd.json("/debug/configz");
    let resources = body["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let key = format!(
                "{} {}/{}",
                r["kind"].as_str().unwrap_or_default(),
                r["namespace"].as_str().unwrap_or_default(),
                r["name"].as_str().unwrap_or_default()
            );
            (key, r["resource"].clone())
        })
        .collect();
    (resources, body)
}

#[test]
fn kube_source_serves_the_cluster_and_follows_each_kind() {
    let work = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let kc = work.path().join("kubeconfig");
    kubeconfig(&kc, port);

    // The API server is not up yet: meshd starts, keeps trying, and is not ready.
    let meshd = Meshd::start_kube(&kc, work.path(), &[]);
    let (code, _) = meshd.get("/ready").expect("debug port");
    assert_eq!(code, 503, "ready before any sync");

    let api = ApiServer::start_at(port);
    api.apply(BASE);
    api.apply(&virtual_service("hello.example.com"));
    api.apply(&tls_secret(work.path(), "istio-system", "hello-cert"));
    meshd.wait_ready();

    let ads = gateway_client(&meshd);
    until("the first sync reaches the client", &ads, |a| {
        a.names(CLUSTERS).iter().any(|c| c == HELLO)
            && endpoint_ips(a).iter().any(|ip| ip.contains("10.1.0.1"))
            && domains(a).iter().any(|d| d == "hello.example.com")
            && a.names(LISTENERS).iter().any(|l| l == "0.0.0.0_443")
            && a.names(SECRETS).iter().any(|s| s == "kubernetes://hello-cert")
    });

    api.apply(&slice("10.1.0.2"));
    until("a changed EndpointSlice", &ads, |a| {
        let ips = endpoint_ips(a);
        ips.iter().any(|ip| ip.contains("10.1.0.2")) && !ips.iter().any(|ip| ip.contains("10.1.0.1"))
    });
    api.apply(&virtual_service("hello2.example.com"));
    until("a changed VirtualService", &ads, |a| {
        domains(a) == ["hello2.example.com"]
    });
    api.delete("v1", "secrets", "istio-system", "hello-cert");
    until("a deleted Secret takes its HTTPS server away", &ads, |a| {
        !a.names(LISTENERS).iter().any(|l| l == "0.0.0.0_443")
            && a.names(LISTENERS).iter().any(|l| l == "0.0.0.0_80")
    });
    api.delete("networking.istio.io/v1", "virtualservices", "default", "hello");
    until("a deleted VirtualService", &ads, |a| domains(a).is_empty());
    api.delete("v1", "services", "default", "hello");
    until("a deleted Service", &ads, |a| {
        !a.names(CLUSTERS).iter().any(|c| c == HELLO)
    });

    // Every kind: added, modified, deleted.
    let kinds: &[(&str, &str, &str, &str)] = &[
        ("Namespace", "v1", "namespaces", "kind: Namespace\nmetadata: {name: k-ns, LABELS}\n"),
        ("Node", "v1", "nodes", "kind: Node\nmetadata: {name: k-node, LABELS}\n"),
        ("Service", "v1", "services", "kind: Service\nmetadata: {name: k-svc, namespace: default, LABELS}\nspec: {ports: [{port: 80}]}\n"),
        ("EndpointSlice", "discovery.k8s.io/v1", "endpointslices",
         "kind: EndpointSlice\nmetadata: {name: k-eps, namespace: default, LABELS}\naddressType: IPv4\nendpoints: []\n"),
        ("Pod", "v1", "pods", "kind: Pod\nmetadata: {name: k-pod, namespace: default, LABELS}\nspec: {containers: [{name: c}]}\n"),
        ("Gateway", "networking.istio.io/v1", "gateways",
         "kind: Gateway\nmetadata: {name: k-gw, namespace: default, LABELS}\nspec: {selector: {app: x}, servers: [{port: {number: 81, name: http, protocol: HTTP}, hosts: ['*']}]}\n"),
        ("VirtualService", "networking.istio.io/v1", "virtualservices",
         "kind: VirtualService\nmetadata: {name: k-vs, namespace: default, LABELS}\nspec: {hosts: [k.example.com], http: [{route: [{destination: {host: hello}}]}]}\n"),
        ("DestinationRule", "networking.istio.io/v1", "destinationrules",
         "kind: DestinationRule\nmetadata: {name: k-dr, namespace: default, LABELS}\nspec: {host: hello}\n"),
        ("ServiceEntry", "networking.istio.io/v1", "serviceentries",
         "kind: ServiceEntry\nmetadata: {name: k-se, namespace: default, LABELS}\nspec: {hosts: [k.example.org], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DNS}\n"),
        ("Sidecar", "networking.istio.io/v1", "sidecars",
         "kind: Sidecar\nmetadata: {name: k-sc, namespace: default, LABELS}\nspec: {egress: [{hosts: ['./*']}]}\n"),
        ("PeerAuthentication", "security.istio.io/v1", "peerauthentications",
         "kind: PeerAuthentication\nmetadata: {name: k-pa, namespace: default, LABELS}\nspec: {mtls: {mode: PERMISSIVE}}\n"),
        ("RequestAuthentication", "security.istio.io/v1", "requestauthentications",
         "kind: RequestAuthentication\nmetadata: {name: k-ra, namespace: default, LABELS}\nspec: {jwtRules: [{issuer: i.test, jwks: '{\"keys\": []}'}]}\n"),
        ("AuthorizationPolicy", "security.istio.io/v1", "authorizationpolicies",
         "kind: AuthorizationPolicy\nmetadata: {name: k-ap, namespace: default, LABELS}\nspec: {action: AUDIT, rules: [{}]}\n"),
        ("Ingress", "networking.k8s.io/v1", "ingresses",
         "kind: Ingress\nmetadata: {name: k-ing, namespace: default, LABELS}\nspec: {defaultBackend: {service: {name: hello, port: {number: 80}}}}\n"),
        ("IngressClass", "networking.k8s.io/v1", "ingressclasses",
         "kind: IngressClass\nmetadata: {name: k-ic, LABELS}\nspec: {controller: istio.io/ingress-controller}\n"),
        ("GatewayClass", "gateway.networking.k8s.io/v1", "gatewayclasses",
         "kind: GatewayClass\nmetadata: {name: k-gc, LABELS}\nspec: {controllerName: istio.io/gateway-controller}\n"),
        ("K8sGateway", "gateway.networking.k8s.io/v1", "gateways",
         "kind: Gateway\nmetadata: {name: k-kgw, namespace: default, LABELS}\nspec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}\n"),
        ("HttpRoute", "gateway.networking.k8s.io/v1", "httproutes",
         "kind: HTTPRoute\nmetadata: {name: k-hr, namespace: default, LABELS}\nspec: {parentRefs: [{name: k-kgw}]}\n"),
    ];
    for (kind, api_version, plural, body) in kinds {
        let doc = |labels: &str| format!("apiVersion: {api_version}\n{}", body.replace("LABELS", labels));
        let name = body
            .split("name: ")
            .nth(1)
            .and_then(|r| r.split([',', '}']).next())
            .unwrap_or_default();
        let ns = if body.contains("namespace: default") {
            "default"
        } else {
            ""
        };
        let key = format!("{kind} {ns}/{name}");
        api.apply(&doc("labels: {rev: one}"));
        eventually(&format!("{key} added"), WAIT, || {
            let (resources, body) = configz(&meshd);
            match resources.iter().find(|(k, _)| *k == key) {
                Some((_, r)) if r["metadata"]["labels"]["rev"] == "one" => Ok(()),
                _ => Err(format!("{}", body["rejected"])),
            }
        });
        api.apply(&doc("labels: {rev: two}"));
        eventually(&format!("{key} modified"), WAIT, || {
            let (resources, _) = configz(&meshd);
            match resources.iter().find(|(k, _)| *k == key) {
                Some((_, r)) if r["metadata"]["labels"]["rev"] == "two" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
        api.delete(api_version, plural, ns, name);
        eventually(&format!("{key} deleted"), WAIT, || {
            let (resources, _) = configz(&meshd);
            match resources.iter().any(|(k, _)| *k == key) {
                false => Ok(()),
                true => Err("still there".into()),
            }
        });
    }

    // Secrets are only ever read one by one, by name.
    let secret_requests: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.resource == "secrets" && (r.verb == "list" || r.verb == "watch"))
        .collect();
    assert!(!secret_requests.is_empty());
    for r in &secret_requests {
        assert!(
            r.field_selector.starts_with("metadata.name=") && !r.namespace.is_empty(),
            "a Secret read that is not one named Secret: {r:?}"
        );
    }
}

#[test]
fn a_crd_installed_after_meshd_started_is_watched_without_a_restart() {
    let work = tempfile::tempdir().expect("tmp");
    let api = ApiServer::start();
    api.refuse("networking.istio.io", "virtualservices");
    api.apply(BASE);
    let kc = work.path().join("kubeconfig");
    api.kubeconfig(&kc);
    let meshd = Meshd::start_kube(&kc, work.path(), &[]);
    meshd.wait_ready();
    let served = |meshd: &Meshd| {
        let (_, body) = configz(meshd);
        body["kube"]["watches"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["watch"] == "virtualservices.networking.istio.io")
            .map(|w| w["served"].clone())
    };
    assert_eq!(served(&meshd), Some(Value::Bool(false)), "{}", configz(&meshd).1);
    let ads = gateway_client(&meshd);
    until("the gateway's routes without VirtualServices", &ads, |a| {
        a.names(LISTENERS).iter().any(|l| l == "0.0.0.0_80")
    });

    api.install("networking.istio.io", "virtualservices");
    api.apply(&virtual_service("hello.example.com"));
    until("the VirtualService of the CRD installed since", &ads, |a| {
        domains(a) == ["hello.example.com"]
    });
    assert_eq!(served(&meshd), Some(Value::Bool(true)), "{}", configz(&meshd).1);
}

#[test]
fn kube_source_recovers_from_gone_and_dropped_watches_without_losing_or_doubling() {
    let work = tempfile::tempdir().expect("tmp");
    let api = ApiServer::start();
    let kc = work.path().join("kubeconfig");
    api.kubeconfig(&kc);
    api.apply(BASE);
    api.apply(&virtual_service("hello.example.com"));
    api.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: default}\nspec: {ports: [{name: http, port: 80}]}\n",
    );
    let meshd = Meshd::start_kube(&kc, work.path(), &[]);
    meshd.wait_ready();
    let ads = gateway_client(&meshd);
    let other = "outbound|80||other.default.svc.cluster.local";
    until("the first sync", &ads, |a| {
        a.names(CLUSTERS).iter().any(|c| c == other) && domains(a) == ["hello.example.com"]
    });

    // Changes no watch saw, then the history compacted: only a relist
    // (after the 410) can find them.
    api.apply_unwatched(&virtual_service("relisted.example.com"));
    api.delete_unwatched("v1", "services", "default", "other");
    api.expire_history();
    until("the relist after 410 Gone", &ads, |a| {
        domains(a) == ["relisted.example.com"] && !a.names(CLUSTERS).iter().any(|c| c == other)
    });
    let (_, body) = configz(&meshd);
    let watches = body["kube"]["watches"].as_array().cloned().unwrap_or_default();
    let relisted = |label: &str| {
        watches
            .iter()
            .find(|w| w["watch"] == label)
            .and_then(|w| w["relists"].as_u64())
            .unwrap_or(0)
    };
    assert!(
        relisted("virtualservices.networking.istio.io") >= 1,
        "{watches:?}"
    );
    assert!(relisted("services") >= 1, "{watches:?}");

    // A dropped connection: the watch comes back from the version it saw,
    // and what changed meanwhile arrives once.
    api.drop_watches();
    api.apply(&virtual_service("dropped.example.com"));
    api.apply(&slice("10.1.0.9"));
    until("the changes made while the watch was down", &ads, |a| {
        domains(a) == ["dropped.example.com"] && endpoint_ips(a).iter().any(|ip| ip.contains("10.1.0.9"))
    });

    // Nothing lost, nothing doubled: meshd holds exactly what the API
    // server holds, and rejected nothing.
    let (resources, body) = configz(&meshd);
    assert_eq!(body["rejected"], serde_json::json!([]), "{body}");
    let mut held: Vec<String> = resources.into_iter().map(|(k, _)| k).collect();
    held.sort();
    let mut expected = Vec::new();
    for (kind, api_version, plural) in [
        ("Namespace", "v1", "namespaces"),
        ("Service", "v1", "services"),
        ("EndpointSlice", "discovery.k8s.io/v1", "endpointslices"),
        ("Pod", "v1", "pods"),
        ("Gateway", "networking.istio.io/v1", "gateways"),
        ("VirtualService", "networking.istio.io/v1", "virtualservices"),
    ] {
        for o in api.list(api_version, plural) {
            expected.push(format!(
                "{kind} {}/{}",
                o["metadata"]["namespace"].as_str().unwrap_or_default(),
                o["metadata"]["name"].as_str().unwrap_or_default()
            ));
        }
    }
    expected.sort();
    assert_eq!(held, expected);
}

#[test]
fn discovery_selectors_choose_the_namespaces_read() {
    let work = tempfile::tempdir().expect("tmp");
    let api = ApiServer::start();
    let kc = work.path().join("kubeconfig");
    api.kubeconfig(&kc);
    let namespace = |name: &str, env: &str| {
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{env: {env}}}}}\n")
    };
    let service = |ns: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: app, namespace: {ns}}}\nspec: {{ports: [{{port: 80}}]}}\n")
    };
    api.apply(&namespace("shop", "prod"));
    api.apply(&namespace("lab", "dev"));
    api.apply(&service("shop"));
    api.apply(&service("lab"));
    let meshd = Meshd::start_kube(&kc, work.path(), &["--discovery-selector", "env=prod"]);
    meshd.wait_ready();
    let services = || -> Vec<String> {
        let (resources, _) = configz(&meshd);
        resources
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with("Service "))
            .collect()
    };
    assert_eq!(services(), ["Service shop/app"]);
    // Labelling a namespace brings it in.
    api.apply(&namespace("lab", "prod"));
    eventually("lab selected", WAIT, || match services().as_slice() {
        [a, b] if a == "Service lab/app" && b == "Service shop/app" => Ok(()),
        other => Err(format!("{other:?}")),
    });
}

/// The root certificate's SHA-256 fingerprint, as openssl prints it.
fn fingerprint(dir: &std::path::Path, pem: &str) -> String {
    fingerprint_of_pem(dir, pem).unwrap_or_else(|| panic!("not a certificate: {pem}"))
}

/// The fingerprint, if `pem` is a certificate.
fn fingerprint_of_pem(dir: &std::path::Path, pem: &str) -> Option<String> {
    if !pem.contains("BEGIN CERTIFICATE") {
        return None;
    }
    let path = dir.join("root-from-cluster.pem");
    std::fs::write(&path, pem).expect("write");
    let out = openssl(
        dir,
        &[
            "x509",
            "-in",
            path.to_str().expect("path"),
            "-noout",
            "-fingerprint",
            "-sha256",
        ],
    );
    out.trim().rsplit('=').next().map(str::to_string)
}

fn secret_value(secret: &Value, key: &str) -> String {
    use base64::Engine;
    let b64 = secret["data"][key].as_str().unwrap_or_default();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    String::from_utf8(bytes).expect("text")
}

#[test]
fn replicas_share_one_root_made_once_and_publish_it_to_every_namespace() {
    let work = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let kc = work.path().join("kubeconfig");
    kubeconfig(&kc, port);
    // Both replicas start before the API server answers, so both are
    // trying to make the root when it comes up.
    let a = Meshd::start_kube(&kc, work.path(), &[]);
    let b = Meshd::start_kube(&kc, work.path(), &[]);
    let api = ApiServer::start_at(port);
    api.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n",
    );
    a.wait_ready();
    b.wait_ready();

    let root = |m: &Meshd| {
        m.json("/debug/certz")["root"]["fingerprint_sha256"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let secret = api
        .get("v1", "secrets", "istio-system", "istio-ca-secret")
        .expect("the CA Secret");
    let root_pem = secret_value(&secret, "root-cert.pem");
    let in_secret = fingerprint(work.path(), &root_pem);
    assert_eq!(root(&a), in_secret, "replica a signs with the Secret's root");
    assert_eq!(root(&b), in_secret, "replica b signs with the Secret's root");
    let creates = api
        .requests()
        .into_iter()
        .filter(|r| r.verb == "create" && r.resource == "secrets")
        .count();
    assert!(creates >= 1);
    let lease = api
        .get("coordination.k8s.io/v1", "leases", "istio-system", "meshd-ca")
        .expect("the CA Lease");
    assert!(lease["spec"]["holderIdentity"]
        .as_str()
        .is_some_and(|h| !h.is_empty()));

    // Every namespace, and one made later, gets the root as a ConfigMap.
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: late}\n");
    for ns in ["istio-system", "default", "late"] {
        eventually(&format!("istio-ca-root-cert in {ns}"), WAIT, || {
            match api.get("v1", "configmaps", ns, "istio-ca-root-cert") {
                Some(cm) if cm["data"]["root-cert.pem"] == root_pem.as_str() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
    }
}

#[test]
fn token_review_decides_who_gets_a_certificate() {
    use crate::common::ads::Claim;
    let work = tempfile::tempdir().expect("tmp");
    let api = ApiServer::start();
    let kc = work.path().join("kubeconfig");
    api.kubeconfig(&kc);
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n");
    api.token("good", Some("system:serviceaccount:default:sleep"), "sleep-1");
    api.token(
        "bound-elsewhere",
        Some("system:serviceaccount:default:sleep"),
        "sleep-2",
    );
    api.token("bad", None, "");
    let meshd = Meshd::start_kube(&kc, work.path(), &[]);
    meshd.wait_ready();

    let client = |token: &str| {
        let claim = Claim {
            node_id: "sidecar~10.0.0.5~sleep-1.default~default.svc.cluster.local",
            namespace: "default",
            service_account: "sleep",
            labels: &[("app", "sleep")],
            token: Some(token),
        };
        AdsClient::connect_as(meshd.xds_port, &claim, &[(SECRETS, &["default", "ROOTCA"])])
    };

    let good = client("good");
    eventually("a certificate for the reviewed identity", WAIT, || {
        let names = good.names(SECRETS);
        match (names.iter().any(|n| n == "default"), good.ended()) {
            (true, _) => Ok(()),
            (false, ended) => Err(format!("{names:?}, ended: {ended:?}")),
        }
    });
    let issued = meshd.json("/debug/certz")["certificates"].to_string();
    assert!(
        issued.contains("spiffe://cluster.local/ns/default/sa/sleep"),
        "{issued}"
    );
    let reviews: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.verb == "create" && r.group == "authentication.k8s.io" && r.resource == "tokenreviews")
        .collect();
    assert!(!reviews.is_empty(), "the token was reviewed by the API server");

    let bad = client("bad");
    let why = eventually("an unknown token is refused", WAIT, || {
        bad.ended().ok_or("still open".to_string())
    });
    assert!(
        why.starts_with("Unauthenticated") && why.contains("not valid"),
        "{why}"
    );

    let stolen = client("bound-elsewhere");
    let why = eventually("a token bound to another pod is refused", WAIT, || {
        stolen.ended().ok_or("still open".to_string())
    });
    assert!(
        why.starts_with("PermissionDenied") && why.contains("sleep-2"),
        "{why}"
    );
    assert!(stolen.names(SECRETS).is_empty());
}

const GATEWAY_API: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\n\
    metadata: {name: istio}\nspec: {controllerName: istio.io/gateway-controller}\n---\n\
    apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: web, namespace: default}\n\
    spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}\n---\n\
    apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: default}\n\
    spec: {parentRefs: [{name: web}], rules: [{backendRefs: [{name: hello, port: 80}]}]}\n---\n\
    apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: rpc, namespace: default}\n\
    spec: {parentRefs: [{name: web}], rules: [{matches: [{method: {service: pkg.Svc}}], \
    backendRefs: [{name: hello, port: 80}]}]}\n---\n\
    apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: raw, namespace: default}\n\
    spec: {parentRefs: [{name: web}], rules: [{backendRefs: [{name: hello, port: 80}]}]}\n---\n\
    apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {name: sni, namespace: default}\n\
    spec: {parentRefs: [{name: web}], rules: [{backendRefs: [{name: hello, port: 80}]}]}\n";

/// One object of each Istio kind meshd reads (`spec` written inline).
const ISTIO_OBJECTS: &[(&str, &str)] = &[
    ("networking.istio.io/v1", "kind: Gateway\nmetadata: {name: s-gw, namespace: default}\n\
      spec: {selector: {app: x}, servers: [{port: {number: 81, name: http, protocol: HTTP}, hosts: ['*']}]}\n"),
    ("networking.istio.io/v1", "kind: VirtualService\nmetadata: {name: s-vs, namespace: default}\n\
      spec: {hosts: [s.example.com], http: [{route: [{destination: {host: hello}}]}]}\n"),
    ("networking.istio.io/v1", "kind: DestinationRule\nmetadata: {name: s-dr, namespace: default}\nspec: {host: hello}\n"),
    ("networking.istio.io/v1", "kind: ServiceEntry\nmetadata: {name: s-se, namespace: default}\n\
      spec: {hosts: [s.example.org], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DNS}\n"),
    ("networking.istio.io/v1", "kind: Sidecar\nmetadata: {name: s-sc, namespace: default}\nspec: {egress: [{hosts: ['./*']}]}\n"),
    ("security.istio.io/v1", "kind: PeerAuthentication\nmetadata: {name: s-pa, namespace: default}\nspec: {mtls: {mode: PERMISSIVE}}\n"),
    ("security.istio.io/v1", "kind: RequestAuthentication\nmetadata: {name: s-ra, namespace: default}\n\
      spec: {jwtRules: [{issuer: https://issuer.test, jwksUri: 'https://issuer.test/jwks'}]}\n"),
    ("security.istio.io/v1", "kind: AuthorizationPolicy\nmetadata: {name: s-ap, namespace: default}\n\
      spec: {action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}\n"),
];

/// Every status meshd writes, as `group resource/status`.
const STATUS_RESOURCES: &[&str] = &[
    "gateway.networking.k8s.io gatewayclasses/status",
    "gateway.networking.k8s.io gateways/status",
    "gateway.networking.k8s.io httproutes/status",
    "networking.istio.io gateways/status",
    "networking.istio.io virtualservices/status",
    "networking.istio.io destinationrules/status",
    "networking.istio.io serviceentries/status",
    "networking.istio.io sidecars/status",
    "security.istio.io peerauthentications/status",
    "security.istio.io requestauthentications/status",
    "security.istio.io authorizationpolicies/status",
];

/// One rule of a Role or ClusterRole, flattened.
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
    /// `Some(ns)` for a Role's rules.
    namespace: Option<String>,
}

fn rbac_rules() -> Vec<Rule> {
    use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
    use serde::Deserialize;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/rbac.yaml");
    let text = std::fs::read_to_string(path).expect("deploy/rbac.yaml");
    let flatten = |rules: Vec<PolicyRule>, namespace: Option<String>| -> Vec<Rule> {
        rules
            .into_iter()
            .map(|r| Rule {
                groups: r.api_groups.unwrap_or_default(),
                resources: r.resources.unwrap_or_default(),
                verbs: r.verbs,
                names: r.resource_names.unwrap_or_default(),
                namespace: namespace.clone(),
            })
            .collect()
    };
    let mut rules = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value = serde_json::to_value(serde_norway::Value::deserialize(doc).expect("YAML")).expect("JSON");
        match value["kind"].as_str() {
            Some("ClusterRole") => {
                let role: ClusterRole = serde_json::from_value(value).expect("ClusterRole");
                rules.extend(flatten(role.rules.unwrap_or_default(), None));
            }
            Some("Role") => {
                let role: Role = serde_json::from_value(value).expect("Role");
                rules.extend(flatten(role.rules.unwrap_or_default(), role.metadata.namespace));
            }
            _ => {}
        }
    }
    rules
}

fn allows(rule: &Rule, r: &crate::common::apiserver::Request, verb: &str, resource: &str) -> bool {
    rule.groups.contains(&r.group)
        && rule.resources.iter().any(|x| x == resource)
        && rule.verbs.iter().any(|x| x == verb)
        && (rule.names.is_empty() || rule.names.contains(&r.name))
        && rule.namespace.as_ref().is_none_or(|ns| *ns == r.namespace)
}

#[test]
fn deploy_rbac_covers_exactly_the_requests_meshd_makes() {
    let work = tempfile::tempdir().expect("tmp");
    let api = ApiServer::start();
    let kc = work.path().join("kubeconfig");
    api.kubeconfig(&kc);
    // Everything that makes meshd ask for something: a gateway credential,
    // a stale root ConfigMap, the webhook configuration and a token to
    // review; then a second replica on a cluster that serves no
    // EndpointSlices, lost its CA Secret and holds an expired Lease.
    api.apply(BASE);
    api.apply(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio-ca-root-cert, namespace: default}\ndata: {root-cert.pem: stale}\n",
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    api.apply(&std::fs::read_to_string(root.join("deploy/webhook.yaml")).expect("webhook.yaml"));
    api.token("good", Some("system:serviceaccount:default:sleep"), "sleep-1");
    api.apply(GATEWAY_API);
    // Each Istio kind, good; a bad version of each comes later, so that the
    // analysis has something to write into its status.
    let istio: Vec<String> = ISTIO_OBJECTS
        .iter()
        .map(|(api_version, body)| format!("apiVersion: {api_version}\n{body}"))
        .collect();
    for doc in &istio {
        api.apply(doc);
    }

    let asked_everything = |meshd: &Meshd| {
        let claim = crate::common::ads::Claim {
            node_id: "sidecar~10.0.0.5~sleep-1.default~default.svc.cluster.local",
            namespace: "default",
            service_account: "sleep",
            labels: &[],
            token: Some("good"),
        };
        let client = AdsClient::connect_as(meshd.xds_port, &claim, &[(SECRETS, &["default"])]);
        let fingerprint = meshd.json("/debug/certz")["root"]["fingerprint_sha256"].clone();
        eventually("everything meshd asks for has been asked", WAIT, || {
            let published = api
                .get("v1", "configmaps", "default", "istio-ca-root-cert")
                .map(|cm| {
                    fingerprint_of_pem(
                        work.path(),
                        cm["data"]["root-cert.pem"].as_str().unwrap_or_default(),
                    )
                });
            let bundle = api
                .get(
                    "admissionregistration.k8s.io/v1",
                    "mutatingwebhookconfigurations",
                    "",
                    "meshd-sidecar-injector",
                )
                .map(|w| w["webhooks"][1]["clientConfig"]["caBundle"].is_string());
            let certificate = client.names(SECRETS).iter().any(|n| n == "default");
            let watched = api
                .requests()
                .iter()
                .any(|r| r.resource == "secrets" && r.verb == "watch");
            match (published, bundle) {
                (Some(Some(p)), Some(true))
                    if Value::String(p.clone()) == fingerprint && certificate && watched =>
                {
                    Ok(())
                }
                other => Err(format!(
                    "{other:?}, certificate {certificate}, secret watched {watched}"
                )),
            }
        });
    };
    let first = Meshd::start_kube(&kc, work.path(), &["--write-analysis-status"]);
    first.wait_ready();
    asked_everything(&first);
    for doc in &istio {
        api.apply(&doc.replace("spec: {", "spec: {bogus: 1, "));
    }
    eventually("every status written", WAIT, || {
        let updated: Vec<String> = api
            .requests()
            .into_iter()
            .filter(|r| r.verb == "update" && r.resource.ends_with("/status"))
            .map(|r| format!("{} {}", r.group, r.resource))
            .collect();
        let missing: Vec<&str> = STATUS_RESOURCES
            .iter()
            .copied()
            .filter(|want| !updated.iter().any(|u| u == want))
            .collect();
        match missing.is_empty() {
            true => Ok(()),
            false => Err(format!("not written: {missing:?}")),
        }
    });

    api.refuse("discovery.k8s.io", "endpointslices");
    api.delete_unwatched("v1", "secrets", "istio-system", "istio-ca-secret");
    api.apply(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {name: meshd-ca, namespace: istio-system}\n\
         spec: {holderIdentity: gone-1, leaseDurationSeconds: 15, renewTime: '2020-01-01T00:00:00.000000Z'}\n",
    );
    let second = Meshd::start_kube(&kc, work.path(), &["--write-analysis-status"]);
    second.wait_ready();
    asked_everything(&second);

    let rules = rbac_rules();
    let requests = api.requests();
    for r in &requests {
        assert!(
            rules.iter().any(|rule| allows(rule, r, &r.verb, &r.resource)),
            "deploy/rbac.yaml does not allow {r:?}"
        );
    }
    for rule in &rules {
        for resource in &rule.resources {
            for verb in &rule.verbs {
                assert!(
                    requests.iter().any(|r| r.verb == *verb
                        && r.resource == *resource
                        && allows(rule, r, verb, resource)),
                    "deploy/rbac.yaml grants {verb} {resource} ({:?}) that meshd never asks for",
                    rule.groups
                );
            }
        }
    }
}

/// An API server holding `BASE` and `GATEWAY_API`, and its kubeconfig.
fn gateway_api_cluster(dir: &std::path::Path) -> (ApiServer, std::path::PathBuf) {
    let api = ApiServer::start();
    let kc = dir.join("kubeconfig");
    api.kubeconfig(&kc);
    api.apply(BASE);
    api.apply(GATEWAY_API);
    (api, kc)
}

/// meshd writes its part of a status into the object as the API server
/// has it when written, not as meshd's watch last saw it: another
/// controller's entry written between meshd's read and its write stays,
/// and an object deleted meanwhile is left alone.
#[test]
fn status_writes_follow_the_object_as_the_api_server_has_it() {
    const GW: &str = "gateway.networking.k8s.io/v1";
    let work = tempfile::tempdir().expect("tmp");
    let (api, kc) = gateway_api_cluster(work.path());
    let theirs = json!({"parentRef": {"name": "mesh", "kind": "Service", "group": ""},
        "controllerName": "example.com/mesh-controller",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
    api.race_status_update(
        GW,
        "httproutes",
        "default",
        "web",
        json!({"parents": [theirs.clone()]}),
    );
    let meshd = Meshd::start_kube(&kc, work.path(), &[]);
    meshd.wait_ready();
    eventually("meshd's entry beside the other controller's", WAIT, || {
        let status = api
            .get(GW, "httproutes", "default", "web")
            .map(|o| o["status"].clone())
            .unwrap_or(Value::Null);
        let parents = status["parents"].as_array().cloned().unwrap_or_default();
        let ours = parents
            .iter()
            .any(|p| p["controllerName"] == "istio.io/gateway-controller" && p["parentRef"]["name"] == "web");
        match ours && parents.contains(&theirs) {
            true => Ok(()),
            false => Err(status.to_string()),
        }
    });
    // The write that came after the other controller's was answered 409,
    // and the status was read again.
    let route_status = |verb: &str| {
        api.requests()
            .iter()
            .filter(|r| r.verb == verb && r.resource == "httproutes/status" && r.name == "web")
            .count()
    };
    assert!(route_status("update") >= 2, "{} updates", route_status("update"));
    assert!(route_status("get") >= 2, "{} reads", route_status("get"));

    // A route deleted before meshd's watch says so: when meshd next means
    // to write its status (its backend Service goes), it finds nothing to
    // write, and that is not worth a warning.
    api.delete_unwatched(GW, "httproutes", "default", "web");
    let reads = route_status("get");
    api.delete("v1", "services", "default", "hello");
    eventually("the deleted route read", WAIT, || {
        match route_status("get") > reads {
            true => Ok(()),
            false => Err("not read".into()),
        }
    });
    // The writer's next pass (a listener added to the Gateway) starts once
    // that one is over.
    let gateway_writes = || {
        api.requests()
            .iter()
            .filter(|r| r.verb == "update" && r.resource == "gateways/status" && r.name == "web")
            .count()
    };
    let before = gateway_writes();
    api.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: web, namespace: default}\n\
         spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}, {name: alt, port: 8080, protocol: HTTP}]}\n",
    );
    eventually("the Gateway's new listener written", WAIT, || {
        match gateway_writes() > before {
            true => Ok(()),
            false => Err("not written".into()),
        }
    });
    let log = std::fs::read_to_string(&meshd.proc.log).expect("log");
    assert!(!log.contains("writing the status of"), "{log}");
}

#[test]
fn statuses_are_written_back_to_the_cluster() {
    let work = tempfile::tempdir().expect("tmp");
    let (api, kc) = gateway_api_cluster(work.path());
    let vs = |gateways: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: shop, namespace: default}}\n\
             spec: {{hosts: [shop.example.com], gateways: [{gateways}], http: [{{route: [{{destination: {{host: hello}}}}]}}]}}\n"
        )
    };
    api.apply(&vs("nope"));
    let meshd = Meshd::start_kube(&kc, work.path(), &["--write-analysis-status"]);
    meshd.wait_ready();
    let status = |api_version: &str, plural: &str, ns: &str, name: &str| {
        api.get(api_version, plural, ns, name)
            .map(|o| o["status"].clone())
            .unwrap_or(Value::Null)
    };
    let condition = |status: &Value, kind: &str| -> Option<(String, String)> {
        status["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == kind)
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or_default().to_string(),
                    c["lastTransitionTime"].as_str().unwrap_or_default().to_string(),
                )
            })
    };
    const GW: &str = "gateway.networking.k8s.io/v1";
    eventually("Gateway API statuses", WAIT, || {
        let class = status(GW, "gatewayclasses", "", "istio");
        let gateway = status(GW, "gateways", "default", "web");
        let route = status(GW, "httproutes", "default", "web");
        let rpc = status(GW, "grpcroutes", "default", "rpc");
        let attached = |route: &Value| {
            let parent = &route["parents"][0];
            parent["controllerName"] == "istio.io/gateway-controller"
                && condition(parent, "Accepted").is_some_and(|(s, _)| s == "True")
                && condition(parent, "ResolvedRefs").is_some_and(|(s, _)| s == "True")
        };
        let ok = condition(&class, "Accepted").is_some_and(|(s, t)| s == "True" && !t.is_empty())
            && condition(&gateway, "Accepted").is_some_and(|(s, _)| s == "True")
            && condition(&gateway, "Programmed").is_some_and(|(s, _)| s == "False")
            && gateway["listeners"][0]["attachedRoutes"] == 2
            && attached(&route)
            && attached(&rpc);
        match ok {
            true => Ok(()),
            false => Err(format!(
                "class {class}\ngateway {gateway}\nroute {route}\nGRPCRoute {rpc}"
            )),
        }
    });
    let messages = || {
        status("networking.istio.io/v1", "virtualservices", "default", "shop")["validationMessages"].clone()
    };
    eventually("the analysis in the VirtualService's status", WAIT, || {
        let m = messages();
        match m[0]["type"]["code"] == "IST0101" && m[0]["level"] == "ERROR" {
            true => Ok(()),
            false => Err(m.to_string()),
        }
    });
    assert_eq!(
        messages()[0]["documentationUrl"],
        "https://istio.io/latest/docs/reference/config/analysis/ist0101/"
    );
    // Fixed, the message goes.
    api.apply(&vs("istio-system/gw"));
    eventually("the analysis cleared", WAIT, || match messages() {
        Value::Array(m) if m.is_empty() => Ok(()),
        other => Err(other.to_string()),
    });

    // A proxy of the Gateway connects: it is Programmed, and Accepted keeps
    // the time it became so.
    let accepted_at = condition(&status(GW, "gateways", "default", "web"), "Accepted");
    let _proxy = AdsClient::connect(
        meshd.xds_port,
        "router~10.0.0.7~web-1.default~default.svc.cluster.local",
        "default",
        &[("gateway.networking.k8s.io/gateway-name", "web")],
        &[(LISTENERS, &[])],
    );
    eventually("the Gateway programmed", WAIT, || {
        let gateway = status(GW, "gateways", "default", "web");
        match condition(&gateway, "Programmed") {
            Some((s, _)) if s == "True" => Ok(()),
            _ => Err(gateway.to_string()),
        }
    });
    assert_eq!(
        condition(&status(GW, "gateways", "default", "web"), "Accepted"),
        accepted_at
    );

    // A route in another namespace refers to hello in default: refused
    // until a ReferenceGrant in default lets routes of that namespace.
    api.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: cross, namespace: shop}\n\
         spec: {parentRefs: [{name: web, namespace: default}], \
         rules: [{backendRefs: [{name: hello, namespace: default, port: 80}]}]}\n",
    );
    let refs = |want: &str| {
        let route = status(GW, "httproutes", "shop", "cross");
        let parent = &route["parents"][0];
        let reason = parent["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "ResolvedRefs"))
            .map(|c| c["reason"].as_str().unwrap_or_default().to_string());
        match reason.as_deref() == Some(want) {
            true => Ok(()),
            false => Err(route.to_string()),
        }
    };
    eventually("the cross-namespace backend refused", WAIT, || {
        refs("RefNotPermitted")
    });
    api.apply(
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\n\
         metadata: {name: shop-routes, namespace: default}\n\
         spec: {from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}], \
         to: [{group: '', kind: Service}]}\n",
    );
    eventually("the backend granted", WAIT, || refs("ResolvedRefs"));
}
