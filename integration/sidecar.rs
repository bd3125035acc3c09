//! A sidecar without traffic capture (Istio's `captureMode: NONE`, for
//! machines without iptables): the Sidecar resource's listeners are bound
//! on loopback, the app calls them, and callers reach the app through the
//! ingress listener. A VirtualService `tcp` route applies on the sidecar.

use std::time::Duration;

use crate::common::{
    curl, eventually, free_port, loopback_service, namespaced_service, write, Backend, Envoy, Meshd, Pod,
};

/// The sidecar of the pod `default/web-1` (labelled `app=web`), without
/// traffic capture.
fn web_sidecar(meshd: &Meshd, work: &std::path::Path) -> Envoy {
    Envoy::start_with_bootstrap_args(
        meshd,
        work,
        &Pod {
            role: "sidecar",
            name: "web-1",
            namespace: "default",
            labels: "app=web",
            delta: false,
        },
        &["--interception-mode", "NONE"],
    )
}

#[test]
fn sidecar_listeners_without_capture_carry_http_tcp_and_ingress() {
    let work = tempfile::tempdir().expect("tmp");
    let app = Backend::start("app");
    let reviews = Backend::start("reviews");
    let db = Backend::start("db");
    let db_next = Backend::start("db-next");
    let (http_port, tcp_port, next_port, ingress_port) = (free_port(), free_port(), free_port(), free_port());
    let config = format!(
        r#"{reviews}{db}{db_next}apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {{name: web}}
spec:
  workloadSelector:
    labels: {{app: web}}
  ingress:
  - port: {{number: {ingress_port}, protocol: HTTP, name: http}}
    defaultEndpoint: 127.0.0.1:{app}
    captureMode: NONE
  egress:
  - port: {{number: {tcp_port}, protocol: TCP, name: tcp}}
    captureMode: NONE
    hosts: [./db.default.svc.cluster.local]
  - captureMode: NONE
    hosts: [./reviews.default.svc.cluster.local, ./db-next.default.svc.cluster.local]
"#,
        reviews = loopback_service("reviews", "http", http_port, reviews.port),
        db = loopback_service("db", "tcp", tcp_port, db.port),
        db_next = loopback_service("db-next", "tcp", next_port, db_next.port),
        app = app.port,
    );
    write(&work.path().join("config/mesh.yaml"), &config);
    let meshd = Meshd::start(&work.path().join("config"), work.path());
    let envoy = web_sidecar(&meshd, work.path());
    let get = |port: u16, host: &str| {
        curl(&[
            "-H",
            &format!("Host: {host}"),
            &format!("http://127.0.0.1:{port}/"),
        ])
    };
    let answers = |what: &str, port: u16, host: &str, version: &str| {
        eventually(what, Duration::from_secs(15), || match get(port, host) {
            Ok((200, body)) if body.contains(&format!("Version: {version}\n")) => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        })
    };
    answers(
        "the app calls reviews on its loopback listener",
        http_port,
        "reviews",
        "reviews",
    );
    answers("raw TCP to db through its own egress port", tcp_port, "db", "db");
    answers(
        "callers reach the app through the ingress listener",
        ingress_port,
        "web",
        "app",
    );
    let (_, listeners) = envoy.admin("/listeners").expect("listeners");
    assert!(
        !listeners.contains("virtualOutbound") && !listeners.contains("virtualInbound"),
        "nothing is captured, so no capture listeners: {listeners}"
    );
    // A VirtualService tcp route moves db's traffic to db-next.
    write(
        &work.path().join("config/db-vs.yaml"),
        r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: db}
spec:
  hosts: [db]
  tcp:
  - route:
    - destination: {host: db-next}
"#,
    );
    answers(
        "the tcp route sends db's connections to db-next",
        tcp_port,
        "db",
        "db-next",
    );
    assert!(db_next.hits.load(std::sync::atomic::Ordering::SeqCst) > 0);
}

/// An HTTPRoute bound to a Service (the Gateway API for a mesh, GAMMA)
/// routes the sidecars' calls to it, as Istio binds it: a producer route
/// (in the Service's namespace) for every client, with the Gateway API's
/// path rules and precedence; a consumer route (in another namespace)
/// for its own namespace's clients only.
#[test]
fn an_http_route_bound_to_a_service_routes_the_mesh() {
    let work = tempfile::tempdir().expect("tmp");
    let (v1, v2) = (Backend::start("reviews-v1"), Backend::start("reviews-v2"));
    let (db, db_next) = (Backend::start("db"), Backend::start("db-next"));
    let (ratings, special, local) = (
        Backend::start("ratings"),
        Backend::start("ratings-special"),
        Backend::start("ratings-local"),
    );
    let (port, db_port, next_port, ratings_port) = (free_port(), free_port(), free_port(), free_port());
    let config = format!(
        r#"{reviews}{reviews_v2}{db}{db_next}{ratings}{special}{local}apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {{name: web}}
spec:
  workloadSelector:
    labels: {{app: web}}
  egress:
  - captureMode: NONE
    hosts: ["*/*"]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews}}
spec:
  parentRefs: [{{group: "", kind: Service, name: reviews, port: {port}}}]
  rules:
  - backendRefs: [{{name: reviews, port: {port}}}]
  - matches: [{{path: {{type: PathPrefix, value: /v2}}}}]
    backendRefs: [{{name: reviews-v2, port: {port}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: everything-to-v2, namespace: elsewhere}}
spec:
  parentRefs: [{{group: "", kind: Service, name: reviews, namespace: default}}]
  rules:
  - backendRefs: [{{name: reviews-v2, namespace: default, port: {port}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: ratings, namespace: backend}}
spec:
  parentRefs: [{{group: "", kind: Service, name: ratings}}]
  rules:
  - backendRefs: [{{name: ratings, port: {ratings_port}}}]
  - matches: [{{path: {{value: /special}}}}]
    backendRefs: [{{name: ratings-special, port: {ratings_port}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: ratings-here}}
spec:
  parentRefs: [{{group: "", kind: Service, name: ratings, namespace: backend}}]
  rules:
  - backendRefs: [{{name: ratings-local, port: {ratings_port}}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: db}}
spec:
  parentRefs: [{{group: "", kind: Service, name: db}}]
  rules:
  - backendRefs: [{{name: db-next, port: {next_port}}}]
"#,
        reviews = loopback_service("reviews", "http", port, v1.port),
        reviews_v2 = loopback_service("reviews-v2", "http-v2", port, v2.port),
        db = loopback_service("db", "tcp", db_port, db.port),
        db_next = loopback_service("db-next", "tcp", next_port, db_next.port),
        ratings = namespaced_service("backend", "ratings", "http", ratings_port, ratings.port),
        special = namespaced_service("backend", "ratings-special", "http", ratings_port, special.port),
        local = loopback_service("ratings-local", "http", ratings_port, local.port),
    );
    write(&work.path().join("config/mesh.yaml"), &config);
    let meshd = Meshd::start(&work.path().join("config"), work.path());
    let envoy = web_sidecar(&meshd, work.path());
    let version = |path: &str| {
        curl(&["-H", "Host: reviews", &format!("http://127.0.0.1:{port}{path}")]).map(|(code, body)| {
            let v = body
                .lines()
                .find_map(|l| l.strip_prefix("Version: "))
                .unwrap_or_default();
            (code, v.to_string())
        })
    };
    eventually(
        "the route sends /v2 to reviews-v2",
        Duration::from_secs(15),
        || match version("/v2/stars") {
            Ok((200, v)) if v == "reviews-v2" => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        },
    );
    // The catch-all rule is written first; the longer prefix still wins.
    // A prefix matches whole segments; the consumer route of another
    // namespace does not reach this client.
    assert_eq!(version("/v2"), Ok((200, "reviews-v2".to_string())));
    assert_eq!(version("/v2beta"), Ok((200, "reviews-v1".to_string())));
    assert_eq!(version("/"), Ok((200, "reviews-v1".to_string())));
    // The client's own namespace's route for ratings (a consumer route)
    // stands in for the Service's namespace's (the producer route), even
    // where the producer's has the longer path.
    eventually(
        "the consumer route serves this client",
        Duration::from_secs(15),
        || {
            let got = curl(&[
                "-H",
                "Host: ratings.backend.svc.cluster.local",
                &format!("http://127.0.0.1:{ratings_port}/special"),
            ]);
            match got {
                Ok((200, body)) if body.contains("Version: ratings-local") => Ok(()),
                other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
            }
        },
    );
    // A TCPRoute bound to db moves its connections to db-next.
    eventually(
        "db's connections go to db-next",
        Duration::from_secs(15),
        || match curl(&[&format!("http://127.0.0.1:{db_port}/")]) {
            Ok((200, body)) if body.contains("Version: db-next") => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        },
    );
    let status = meshd.json("/debug/configz");
    let accepted: Vec<String> = status["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["kind"] == "HttpRoute" || r["kind"] == "TcpRoute")
        .map(|r| {
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            let reason = text(&r["status"]["parents"][0]["conditions"][0]["reason"]);
            format!(
                "{} {}/{}: {reason}",
                text(&r["kind"]),
                text(&r["namespace"]),
                text(&r["name"])
            )
        })
        .collect();
    assert_eq!(
        accepted,
        [
            "HttpRoute backend/ratings: Accepted",
            "HttpRoute default/ratings-here: Accepted",
            "HttpRoute default/reviews: Accepted",
            "HttpRoute elsewhere/everything-to-v2: Accepted",
            "TcpRoute default/db: Accepted",
        ],
        "{status}"
    );
}
