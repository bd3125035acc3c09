//! Gateway API references across namespaces, through a stock Envoy: an
//! HTTPRoute's backendRef into another namespace is an invalid backend
//! (its share of the requests answered 500), and a listener's certificate
//! in another namespace is not served, until a ReferenceGrant there
//! allows it.

use std::time::Duration;

use crate::common::{
    curl, eventually, free_port, namespaced_service, s_server, self_signed, tls_secret, write, Backend,
    Envoy, Meshd, Pod,
};

const WAIT: Duration = Duration::from_secs(20);

/// A Service `name` in `namespace` on port 80 (named `http`), reaching
/// 127.0.0.1:`backend`.
fn service(namespace: &str, name: &str, backend: u16) -> String {
    namespaced_service(namespace, name, "http", 80, backend)
}

/// The Gateway API Gateway `web` of `default` with one `listener` on
/// `listener_port`, and the Service of its proxies, which listen on
/// `port`: YAML documents ending in `---`.
fn web_yaml(port: u16, listener_port: u16, listener: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web-istio}}
spec:
  selector: {{gateway.networking.k8s.io/gateway-name: web}}
  ports: [{{name: web, port: {listener_port}, targetPort: {port}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: web}}
spec:
  gatewayClassName: istio
  listeners: [{listener}]
---
"#
    )
}

/// A stock Envoy serving the Gateway API Gateway `web` of `default`.
fn web_gateway(meshd: &Meshd, work: &std::path::Path) -> Envoy {
    Envoy::start(
        meshd,
        work,
        &Pod {
            role: "gateway",
            name: "web-istio-1",
            namespace: "default",
            labels: "gateway.networking.k8s.io/gateway-name=web",
            delta: false,
        },
    )
}

/// The Service `secure` (to 127.0.0.1:`backend`), the `secrets`, the
/// Gateway `web` with one HTTPS `listener` on 443 (its proxies listening
/// on `port`) and an HTTPRoute sending everything to `secure`: YAML.
fn secure_site(backend: u16, port: u16, secrets: &str, listener: &str) -> String {
    format!(
        r#"{hello}{secrets}---
{web}apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: secure}}
spec:
  parentRefs: [{{name: web}}]
  rules:
  - backendRefs: [{{name: secure, port: 80}}]
"#,
        hello = service("default", "secure", backend),
        web = web_yaml(port, 443, listener),
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
            r#"{local}{shared}{web}apiVersion: gateway.networking.k8s.io/v1
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
            web = web_yaml(port, 80, "{name: http, port: 80, protocol: HTTP}"),
        ),
    );
    let meshd = Meshd::start(&config, work.path());
    let envoy = web_gateway(&meshd, work.path());
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

#[test]
fn a_certificate_in_another_namespace_needs_a_reference_grant() {
    let work = tempfile::tempdir().expect("tmp");
    let backend = Backend::start("secure");
    let port = free_port();
    // The site's certificate, self-signed, in the namespace `certs`.
    let secret = tls_secret(work.path(), "certs", "site", "secure.example.com");
    let config = work.path().join("config");
    write(
        &config.join("site.yaml"),
        &secure_site(
            backend.port,
            port,
            &secret,
            "{name: https, port: 443, protocol: HTTPS, hostname: secure.example.com, \
             tls: {certificateRefs: [{name: site, namespace: certs}]}}",
        ),
    );
    let meshd = Meshd::start(&config, work.path());
    let envoy = web_gateway(&meshd, work.path());
    let listener_refs = || {
        let configz = meshd.json("/debug/configz");
        let gateway = configz["resources"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["kind"] == "K8sGateway").cloned())
            .unwrap_or_default();
        gateway["status"]["listeners"][0]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "ResolvedRefs").cloned())
            .unwrap_or_default()
    };
    eventually("the listener refused its certificate", WAIT, || {
        let refs = listener_refs();
        match refs["reason"] == "RefNotPermitted" {
            true => Ok(()),
            false => Err(refs.to_string()),
        }
    });
    let resolve = format!("secure.example.com:{port}:127.0.0.1");
    let url = format!("https://secure.example.com:{port}/");
    let get = || {
        curl(&[
            "--cacert",
            &work.path().join("site.crt").display().to_string(),
            "--resolve",
            &resolve,
            &url,
        ])
    };
    assert!(get().is_err(), "the listener is not served without the grant");

    write(
        &config.join("grant.yaml"),
        r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: web-certificates, namespace: certs}
spec:
  from:
  - {group: gateway.networking.k8s.io, kind: Gateway, namespace: default}
  to:
  - {group: "", kind: Secret}
"#,
    );
    eventually("HTTPS with the granted certificate", WAIT, || match get() {
        Ok((200, body)) if body.contains("Version: secure") => Ok(()),
        other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
    });
    assert_eq!(listener_refs()["status"], "True");
}

#[test]
fn a_listener_admits_the_routes_of_the_namespaces_its_selector_matches() {
    let work = tempfile::tempdir().expect("tmp");
    let (a, b) = (Backend::start("team-a"), Backend::start("team-b"));
    let port = free_port();
    let route = |ns: &str| {
        format!(
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: app, namespace: {ns}}}
spec:
  parentRefs: [{{name: web, namespace: default}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /{ns}}}}}]
    backendRefs: [{{name: app, port: 80}}]
---
"#
        )
    };
    let namespaces = |b_labels: &str| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: team-a, labels: {{shared: 'true'}}}}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {{name: team-b, labels: {{{b_labels}}}}}\n"
        )
    };
    let config = work.path().join("config");
    write(
        &config.join("routes.yaml"),
        &format!(
            "{}{}{}{}{}",
            service("team-a", "app", a.port),
            service("team-b", "app", b.port),
            web_yaml(
                port,
                80,
                "{name: http, port: 80, protocol: HTTP, \
                 allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {shared: 'true'}}}}}",
            ),
            route("team-a"),
            route("team-b"),
        ),
    );
    write(&config.join("namespaces.yaml"), &namespaces(""));
    let meshd = Meshd::start(&config, work.path());
    let envoy = web_gateway(&meshd, work.path());
    let get = |path: &str| curl(&[&format!("http://127.0.0.1:{port}{path}")]);
    eventually(
        "the route of the labelled namespace is served",
        WAIT,
        || match get("/team-a") {
            Ok((200, body)) if body.contains("Version: team-a") => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        },
    );
    assert_eq!(
        get("/team-b").map(|(code, _)| code),
        Ok(404),
        "team-b's route is not admitted"
    );
    let team_b_reason = || {
        let configz = meshd.json("/debug/configz");
        configz["resources"]
            .as_array()
            .and_then(|r| {
                r.iter()
                    .find(|r| r["kind"] == "HttpRoute" && r["namespace"] == "team-b")
                    .map(|r| r["status"]["parents"][0]["conditions"][0]["reason"].clone())
            })
            .unwrap_or_default()
    };
    assert_eq!(team_b_reason(), "NotAllowedByListeners");

    // Labelling the namespace admits its route, with no change to the
    // route or the Gateway.
    write(&config.join("namespaces.yaml"), &namespaces("shared: 'true'"));
    eventually(
        "the newly labelled namespace's route is served",
        WAIT,
        || match get("/team-b") {
            Ok((200, body)) if body.contains("Version: team-b") => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        },
    );
    assert_eq!(team_b_reason(), "Accepted");
}

#[test]
fn grpc_routes_send_each_method_to_its_backend() {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
    use std::sync::atomic::Ordering;
    let work = tempfile::tempdir().expect("tmp");
    // Two gRPC services of the same API: one allows every check, the
    // other denies it.
    let allow = crate::common::GrpcAuthorizer::start();
    allow.allow.store(true, Ordering::SeqCst);
    let deny = crate::common::GrpcAuthorizer::start();
    let port = free_port();
    let grpc_service = |name: &str, backend: u16| namespaced_service("default", name, "grpc", 80, backend);
    let config = work.path().join("config");
    // A rule naming a service outranks one matching headers alone (the
    // GRPCRoute's precedence), so the rule for the ungranted backend names
    // the method too.
    write(
        &config.join("grpc.yaml"),
        &format!(
            r#"{allow}{deny}{web}apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: checks}}
spec:
  parentRefs: [{{name: web}}]
  rules:
  - matches:
    - method: {{service: envoy.service.auth.v3.Authorization, method: Check}}
      headers: [{{name: x-decider, value: strict}}]
    backendRefs: [{{name: deny, port: 80}}]
  - matches:
    - method: {{service: envoy.service.auth.v3.Authorization, method: Check}}
      headers: [{{name: x-decider, value: elsewhere}}]
    backendRefs: [{{name: deny, namespace: other, port: 80}}]
  - matches:
    - method: {{service: envoy.service.auth.v3.Authorization}}
    backendRefs: [{{name: allow, port: 80}}]
"#,
            allow = grpc_service("allow", allow.port),
            deny = grpc_service("deny", deny.port),
            web = web_yaml(port, 80, "{name: http, port: 80, protocol: HTTP}"),
        ),
    );
    let meshd = Meshd::start(&config, work.path());
    let envoy = web_gateway(&meshd, work.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The decision the backend a call reaches makes (0: OK, 7: denied).
    let check = |decider: Option<&str>| -> Result<i32, String> {
        runtime.block_on(async {
            let mut client = AuthorizationClient::connect(format!("http://127.0.0.1:{port}"))
                .await
                .map_err(|e| e.to_string())?;
            let mut request = tonic::Request::new(CheckRequest::default());
            if let Some(d) = decider {
                request
                    .metadata_mut()
                    .insert("x-decider", d.parse().expect("header"));
            }
            let response = client
                .check(request)
                .await
                .map_err(|e| format!("{:?}", e.code()))?;
            Ok(response.into_inner().status.map_or(-1, |s| s.code))
        })
    };
    eventually("a gRPC call through the GRPCRoute", WAIT, || match check(None) {
        Ok(0) => Ok(()),
        other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
    });
    assert_eq!(
        check(Some("strict")),
        Ok(7),
        "the header match picks the other backend"
    );
    assert_eq!(check(Some("lenient")), Ok(0));
    assert_eq!(
        check(Some("elsewhere")),
        Err("Unavailable".to_string()),
        "a backend in another namespace, not granted"
    );
    let configz = meshd.json("/debug/configz");
    let route = configz["resources"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["kind"] == "GrpcRoute").cloned())
        .expect("the GRPCRoute in configz");
    let accepted = &route["status"]["parents"][0]["conditions"][0];
    assert_eq!(
        (&accepted["type"], &accepted["status"]),
        (&"Accepted".into(), &"True".into()),
        "{route}"
    );
}

#[test]
fn tcp_and_tls_routes_forward_connections() {
    let work = tempfile::tempdir().expect("tmp");
    let hello = Backend::start("tcp");
    // A TLS site that terminates its own TLS, behind a TLS listener in
    // Passthrough mode.
    self_signed(work.path(), "site", "secure.example.com");
    let site_port = free_port();
    let _site = s_server(work.path(), site_port, "site");
    // The gateway's own certificate, for the TLS listener that terminates.
    let db_cert = tls_secret(work.path(), "default", "db", "db.example.com");
    let (tcp_port, tls_port, terminate_port) = (free_port(), free_port(), free_port());
    let config = work.path().join("config");
    write(
        &config.join("l4.yaml"),
        &format!(
            r#"{hello}{site}{db_cert}---
apiVersion: v1
kind: Service
metadata: {{name: web-istio}}
spec:
  selector: {{gateway.networking.k8s.io/gateway-name: web}}
  ports:
  - {{name: tcp, port: 9000, targetPort: {tcp_port}}}
  - {{name: tls, port: 443, targetPort: {tls_port}}}
  - {{name: db, port: 5433, targetPort: {terminate_port}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: web}}
spec:
  gatewayClassName: istio
  listeners:
  - {{name: tcp, port: 9000, protocol: TCP}}
  - {{name: tls, port: 443, protocol: TLS, hostname: secure.example.com, tls: {{mode: Passthrough}}}}
  - {{name: db, port: 5433, protocol: TLS, hostname: db.example.com, tls: {{certificateRefs: [{{name: db}}]}}}}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: plain}}
spec:
  parentRefs: [{{name: web, sectionName: tcp}}]
  rules: [{{backendRefs: [{{name: hello, port: 80}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: terminated}}
spec:
  parentRefs: [{{name: web, sectionName: db}}]
  rules: [{{backendRefs: [{{name: hello, port: 80}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {{name: secure}}
spec:
  parentRefs: [{{name: web}}]
  hostnames: [secure.example.com]
  rules: [{{backendRefs: [{{name: site, port: 80}}]}}]
"#,
            hello = service("default", "hello", hello.port),
            site = namespaced_service("default", "site", "tls", 80, site_port),
        ),
    );
    let meshd = Meshd::start(&config, work.path());
    let envoy = web_gateway(&meshd, work.path());
    eventually("HTTP over the TCPRoute", WAIT, || {
        match curl(&[&format!("http://127.0.0.1:{tcp_port}/")]) {
            Ok((200, body)) if body.contains("Version: tcp") => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        }
    });
    // Only the site's own certificate verifies: the gateway passed the
    // TLS stream through by its SNI.
    let resolve = format!("secure.example.com:{tls_port}:127.0.0.1");
    let cacert = work.path().join("site.crt").display().to_string();
    eventually("TLS through the TLSRoute", WAIT, || {
        match curl(&[
            "--cacert",
            &cacert,
            "--resolve",
            &resolve,
            &format!("https://secure.example.com:{tls_port}/"),
        ]) {
            Ok((200, body)) if body.contains("s_server") => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        }
    });
    // The TLS listener that terminates presents the gateway's certificate
    // and carries the decrypted stream to the TCPRoute's backend.
    let resolve = format!("db.example.com:{terminate_port}:127.0.0.1");
    let cacert = work.path().join("db.crt").display().to_string();
    eventually(
        "TLS terminated, then TCP through the TCPRoute",
        WAIT,
        || match curl(&[
            "--cacert",
            &cacert,
            "--resolve",
            &resolve,
            &format!("https://db.example.com:{terminate_port}/"),
        ]) {
            Ok((200, body)) if body.contains("Version: tcp") => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        },
    );
    let configz = meshd.json("/debug/configz");
    let routes = configz["resources"].as_array().cloned().unwrap_or_default();
    let routes = routes
        .iter()
        .filter(|r| r["kind"] == "TcpRoute" || r["kind"] == "TlsRoute");
    assert_eq!(routes.clone().count(), 3, "{configz}");
    for route in routes {
        let accepted = &route["status"]["parents"][0]["conditions"][0];
        assert_eq!(
            (&accepted["type"], &accepted["status"]),
            (&"Accepted".into(), &"True".into()),
            "{route}"
        );
    }
}

#[test]
fn http_route_filters_rewrite_redirect_mirror_and_tag_a_backend() {
    use std::sync::atomic::Ordering;
    let work = tempfile::tempdir().expect("tmp");
    // A backend that answers with the path it was asked for.
    let (echo_port, _echo) = crate::common::serve_http("127.0.0.1", |_| {
        axum::Router::new().fallback(|uri: axum::http::Uri| async move { format!("path {}", uri.path()) })
    });
    let mirror = Backend::start("mirror");
    let fallback = Backend::start("fallback");
    let port = free_port();
    let config = work.path().join("config");
    // The catch-all rule comes first: the Gateway API's precedence (the
    // longer path first) still gives every other path its own rule.
    write(
        &config.join("filters.yaml"),
        &format!(
            r#"{echo}{mirror}{fallback}{web}apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web}}
spec:
  parentRefs: [{{name: web}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /}}}}]
    backendRefs: [{{name: fallback, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /old}}}}]
    filters:
    - type: URLRewrite
      urlRewrite: {{path: {{type: ReplaceFullPath, replaceFullPath: /new}}}}
    - type: RequestMirror
      requestMirror: {{backendRef: {{name: mirror, port: 80}}}}
    backendRefs: [{{name: echo, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /moved}}}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}, statusCode: 302}}
  - matches: [{{path: {{type: PathPrefix, value: /strip}}}}]
    filters:
    - type: URLRewrite
      urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /}}}}
    backendRefs: [{{name: echo, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /api/}}}}]
    filters:
    - type: URLRewrite
      urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}}
    backendRefs: [{{name: echo, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /gone}}}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /}}, statusCode: 302}}
  - matches: [{{path: {{type: PathPrefix, value: /guarded}}}}]
    filters: [{{type: ExtensionRef, extensionRef: {{group: example.com, kind: Authorizer, name: strict}}}}]
    backendRefs: [{{name: echo, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /drained}}}}]
    backendRefs: [{{name: echo, port: 80, weight: 0}}, {{name: mirror, port: 80, weight: 0}}]
  - matches: [{{path: {{type: PathPrefix, value: /tagged}}}}]
    backendRefs:
    - name: echo
      port: 80
      filters:
      - type: ResponseHeaderModifier
        responseHeaderModifier: {{set: [{{name: x-backend, value: echo}}]}}
"#,
            echo = service("default", "echo", echo_port),
            mirror = service("default", "mirror", mirror.port),
            fallback = service("default", "fallback", fallback.port),
            web = web_yaml(port, 80, "{name: http, port: 80, protocol: HTTP}"),
        ),
    );
    let meshd = Meshd::start(&config, work.path());
    let envoy = web_gateway(&meshd, work.path());
    eventually("the whole path rewritten", WAIT, || {
        match curl(&[&format!("http://127.0.0.1:{port}/old/deep/path?q=1")]) {
            Ok((200, body)) if body == "path /new" => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        }
    });
    // A redirect that keeps what follows the matched prefix.
    match curl(&["-i", &format!("http://127.0.0.1:{port}/moved/deep")]) {
        Ok((302, head))
            if head
                .to_ascii_lowercase()
                .contains(&format!("location: http://127.0.0.1:{port}/new/deep")) => {}
        other => panic!("the prefix redirect: {other:?}"),
    }
    // A prefix matches whole segments and is replaced by them, as the
    // Gateway API has it: no `//`, and `/stripped` is not under `/strip`.
    for (path, expected) in [
        ("/strip/a/b?q=1", Ok((200, "path /a/b".to_string()))),
        ("/strip", Ok((200, "path /".to_string()))),
        ("/api/users", Ok((200, "path /v2/users".to_string()))),
        ("/api", Ok((200, "path /v2".to_string()))),
    ] {
        assert_eq!(
            curl(&[&format!("http://127.0.0.1:{port}{path}")]),
            expected,
            "{path}"
        );
    }
    let version = |path: &str| {
        curl(&[&format!("http://127.0.0.1:{port}{path}")]).map(|(code, body)| {
            (
                code,
                body.lines()
                    .find_map(|l| l.strip_prefix("Version: "))
                    .map(str::to_string),
            )
        })
    };
    assert_eq!(
        curl(&[&format!("http://127.0.0.1:{port}/guarded")]).map(|(code, _)| code),
        Ok(500),
        "a filter meshd cannot apply is not skipped"
    );
    assert_eq!(
        curl(&[&format!("http://127.0.0.1:{port}/drained")]).map(|(code, _)| code),
        Ok(500),
        "every backend weighs nothing: the rule answers 500, and the route table is still taken"
    );
    assert_eq!(
        version("/stripped"),
        Ok((200, Some("fallback".to_string()))),
        "a prefix matches whole segments: /stripped is the catch-all's"
    );
    match curl(&["-i", &format!("http://127.0.0.1:{port}/gone/deep")]) {
        Ok((302, head))
            if head
                .to_ascii_lowercase()
                .contains(&format!("location: http://127.0.0.1:{port}/deep\r")) => {}
        other => panic!("the prefix redirect to /: {other:?}"),
    }
    // A backend's own filter: its answers carry the header.
    match curl(&["-i", &format!("http://127.0.0.1:{port}/tagged")]) {
        Ok((200, head)) if head.to_ascii_lowercase().contains("x-backend: echo") => {}
        other => panic!("the backend's response header: {other:?}"),
    }
    eventually("a copy of each request at the mirror", WAIT, || {
        match mirror.hits.load(Ordering::SeqCst) {
            0 => Err("no mirrored request yet".to_string()),
            _ => Ok(()),
        }
    });
}

/// A rule's `retry` (the codes it retries on, how many times) and
/// `attempts: 0`, through a stock Envoy: a backend failing every other
/// request with 500 (which Istio's default policy does not retry) is
/// whole behind the retrying rule, and one failing with 503 (which it
/// does) shows its failures behind the rule that turns retries off.
#[test]
fn a_rule_retries_the_codes_it_names() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let work = tempfile::tempdir().expect("tmp");
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let (fickle_port, _fickle) = crate::common::serve_http("127.0.0.1", move |_| {
        axum::Router::new().fallback(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                match n % 2 {
                    0 => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down"),
                    _ => (axum::http::StatusCode::OK, "up"),
                }
            }
        })
    });
    let flaky = Backend::start_at("127.0.0.1", "flaky", true);
    let port = free_port();
    let config = work.path().join("config");
    write(
        &config.join("retries.yaml"),
        &format!(
            r#"{fickle}{flaky}{web}apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web}}
spec:
  parentRefs: [{{name: web}}]
  rules:
  - matches: [{{path: {{value: /retried}}}}]
    retry: {{codes: [500], attempts: 2, backoff: 10ms}}
    backendRefs: [{{name: fickle, port: 80}}]
  - matches: [{{path: {{value: /plain}}}}]
    backendRefs: [{{name: fickle, port: 80}}]
  - matches: [{{path: {{value: /never}}}}]
    retry: {{attempts: 0}}
    backendRefs: [{{name: flaky, port: 80}}]
"#,
            fickle = service("default", "fickle", fickle_port),
            flaky = service("default", "flaky", flaky.port),
            web = web_yaml(port, 80, "{name: http, port: 80, protocol: HTTP}"),
        ),
    );
    let meshd = Meshd::start(&config, work.path());
    let envoy = web_gateway(&meshd, work.path());
    let codes = |path: &str| -> Vec<u16> {
        (0..10)
            .map(|_| curl(&[&format!("http://127.0.0.1:{port}{path}")]).map_or(0, |(code, _)| code))
            .collect()
    };
    eventually("the routes are served", WAIT, || {
        match curl(&[&format!("http://127.0.0.1:{port}/retried")]) {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        }
    });
    assert!(codes("/retried").iter().all(|c| *c == 200), "500s are retried");
    assert!(
        codes("/plain").contains(&500),
        "without the rule's codes, a 500 is not retried"
    );
    assert!(
        codes("/never").contains(&503),
        "attempts: 0 turns Istio's default retries off"
    );
}

/// A listener with two certificates, an ECDSA and an RSA one (Istio's
/// `credentialNames`): stock Envoy presents the one the client can verify.
#[test]
fn a_listener_presents_the_certificate_the_client_can_verify() {
    let work = tempfile::tempdir().expect("tmp");
    let backend = Backend::start("secure");
    let port = free_port();
    let ecdsa = tls_secret(work.path(), "default", "site-ecdsa", "secure.example.com");
    crate::common::openssl(
        work.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            "site-rsa.key",
            "-out",
            "site-rsa.crt",
            "-subj",
            "/CN=secure.example.com",
            "-addext",
            "subjectAltName=DNS:secure.example.com",
        ],
    );
    let rsa = crate::common::secret_of(work.path(), "default", "site-rsa");
    let config = work.path().join("config");
    write(
        &config.join("site.yaml"),
        &secure_site(
            backend.port,
            port,
            &format!("{ecdsa}---\n{rsa}"),
            "{name: https, port: 443, protocol: HTTPS, hostname: secure.example.com, \
             tls: {certificateRefs: [{name: site-ecdsa}, {name: site-rsa}]}}",
        ),
    );
    let meshd = Meshd::start(&config, work.path());
    let envoy = web_gateway(&meshd, work.path());
    let resolve = format!("secure.example.com:{port}:127.0.0.1");
    eventually("HTTPS through the listener", WAIT, || {
        match curl(&[
            "--cacert",
            &work.path().join("site-ecdsa.crt").display().to_string(),
            "--resolve",
            &resolve,
            &format!("https://secure.example.com:{port}/"),
        ]) {
            Ok((200, body)) if body.contains("Version: secure") => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        }
    });
    // The key of the certificate presented to a client that signs with
    // only one kind of key.
    let presented = |sigalgs: &str| {
        crate::common::openssl(
            work.path(),
            &[
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "secure.example.com",
                "-sigalgs",
                sigalgs,
            ],
        )
        .lines()
        .find_map(|l| l.strip_prefix("Server public key is ").map(str::to_string))
        .unwrap_or_default()
    };
    assert_eq!(presented("ECDSA+SHA256"), "256 bit");
    assert_eq!(presented("RSA-PSS+SHA256:RSA+SHA256"), "2048 bit");
}
