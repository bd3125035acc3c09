//! Gateway API references across namespaces, through a stock Envoy: an
//! HTTPRoute's backendRef into another namespace is an invalid backend
//! (its share of the requests answered 500) until a ReferenceGrant there
//! allows it.

use std::time::Duration;

use crate::common::{curl, eventually, free_port, write, Backend, Envoy, Meshd, Pod};

const WAIT: Duration = Duration::from_secs(20);

/// A Service `name` in `namespace` on port 80, reaching 127.0.0.1:`backend`.
fn service(namespace: &str, name: &str, backend: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  ports: [{{name: http, port: 80, targetPort: {backend}}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: {name}, namespace: {namespace}}}
subsets:
- addresses: [{{ip: 127.0.0.1}}]
  ports: [{{name: http, port: {backend}}}]
---
"#
    )
}

#[test]
fn backends_in_another_namespace_need_a_reference_grant() {
    let work = tempfile::tempdir().expect("tmp");
    let local = Backend::start("local");
    let shared = Backend::start("shared");
    let port = free_port();
    let config = work.path().join("config");
    write(
        &config.join("routes.yaml"),
        &format!(
            r#"{local}{shared}apiVersion: v1
kind: Service
metadata: {{name: web-istio}}
spec:
  selector: {{gateway.networking.k8s.io/gateway-name: web}}
  ports: [{{name: http, port: 80, targetPort: {port}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: web}}
spec:
  gatewayClassName: istio
  listeners:
  - {{name: http, port: 80, protocol: HTTP}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web}}
spec:
  parentRefs: [{{name: web}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /cross}}}}]
    backendRefs: [{{name: shared, namespace: backends, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /split}}}}]
    backendRefs:
    - {{name: local, port: 80, weight: 50}}
    - {{name: shared, namespace: backends, port: 80, weight: 50}}
"#,
            local = service("default", "local", local.port),
            shared = service("backends", "shared", shared.port),
        ),
    );
    let meshd = Meshd::start(&config, work.path());
    let envoy = Envoy::start(
        &meshd,
        work.path(),
        &Pod {
            role: "gateway",
            name: "web-istio-1",
            namespace: "default",
            labels: "gateway.networking.k8s.io/gateway-name=web",
            delta: false,
        },
    );
    let get = |path: &str| {
        curl(&[&format!("http://127.0.0.1:{port}{path}")]).map(|(code, body)| {
            let version = body
                .lines()
                .find_map(|l| l.strip_prefix("Version: "))
                .unwrap_or_default()
                .to_string();
            (code, version)
        })
    };
    // What 40 requests to /split got: (200 from local, 200 from shared, 500).
    let split = || {
        let mut seen = (0, 0, 0);
        for _ in 0..40 {
            match get("/split") {
                Ok((200, v)) if v == "local" => seen.0 += 1,
                Ok((200, v)) if v == "shared" => seen.1 += 1,
                Ok((500, _)) => seen.2 += 1,
                other => panic!("{other:?}\n{}", envoy.proc.log_tail()),
            }
        }
        seen
    };

    eventually("the ungranted backend answers 500", WAIT, || {
        match get("/cross") {
            Ok((500, _)) => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        }
    });
    let (local_hits, shared_hits, errors) = split();
    assert_eq!(shared_hits, 0, "nothing reaches the ungranted backend");
    assert!(
        local_hits > 0 && errors > 0,
        "its half of the split gets 500, the other half the local backend: {local_hits} local, {errors} 500s"
    );

    write(
        &config.join("grant.yaml"),
        r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: default-routes, namespace: backends}
spec:
  from:
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}
  to:
  - {group: "", kind: Service, name: shared}
"#,
    );
    eventually("the granted backend answers", WAIT, || match get("/cross") {
        Ok((200, v)) if v == "shared" => Ok(()),
        other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
    });
    let (local_hits, shared_hits, errors) = split();
    assert_eq!(errors, 0, "no 500 once granted");
    assert!(
        local_hits > 0 && shared_hits > 0,
        "both backends share: {local_hits} local, {shared_hits} shared"
    );
}
