//! A sidecar without traffic capture (Istio's `captureMode: NONE`, for
//! machines without iptables): the Sidecar resource's listeners are bound
//! on loopback, the app calls them, and callers reach the app through the
//! ingress listener. A VirtualService `tcp` route applies on the sidecar.

use std::time::Duration;

use crate::common::{curl, eventually, free_port, loopback_service, write, Backend, Envoy, Meshd, Pod};

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
    let envoy = Envoy::start_with_bootstrap_args(
        &meshd,
        work.path(),
        &Pod {
            role: "sidecar",
            name: "web-1",
            namespace: "default",
            labels: "app=web",
            delta: false,
        },
        &["--interception-mode", "NONE"],
    );
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
