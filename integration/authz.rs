//! RequestAuthentication and AuthorizationPolicy through a stock Envoy
//! gateway: tokens signed here (RS256 with a key openssl makes, ES256 with
//! one rcgen makes), their JWKS served by a loopback HTTP server that Envoy
//! fetches through the cluster meshd generates, and real curl requests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::common::{
    curl, eventually, free_port, hello_mesh, openssl, serve_http, write, Backend, Envoy, GrpcAuthorizer,
    Meshd, Pod,
};

const ISSUER: &str = "https://issuer.meshd.test";
const WAIT: Duration = Duration::from_secs(20);

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key and its public JWK.
struct Signer {
    key: EncodingKey,
    alg: Algorithm,
    kid: &'static str,
    jwk: Value,
}

/// An RSA key made by openssl; its JWK from the modulus openssl prints.
fn rsa_signer(dir: &std::path::Path, kid: &'static str) -> Signer {
    let file = format!("{kid}.pem");
    openssl(dir, &["genrsa", "-out", &file, "2048"]);
    let pem = std::fs::read(dir.join(&file)).expect("key");
    let modulus = openssl(dir, &["rsa", "-in", &file, "-noout", "-modulus"]);
    let hex = modulus.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    Signer {
        key: EncodingKey::from_rsa_pem(&pem).expect("RSA key"),
        alg: Algorithm::RS256,
        kid,
        jwk: json!({"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid, "n": b64url(&n), "e": "AQAB"}),
    }
}

/// A P-256 key made by rcgen; its JWK from the uncompressed public point.
fn ec_signer(kid: &'static str) -> Signer {
    let key = rcgen::KeyPair::generate().expect("EC key");
    let point = key.public_key_raw();
    assert_eq!(point.len(), 65, "an uncompressed P-256 point");
    Signer {
        key: EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("EC key"),
        alg: Algorithm::ES256,
        kid,
        jwk: json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                    "x": b64url(&point[1..33]), "y": b64url(&point[33..])}),
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

impl Signer {
    fn token(&self, claims: Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.to_string());
        jsonwebtoken::encode(&header, &claims, &self.key).expect("token")
    }

    /// A token as the issuer gives it: for `sub`, in `groups`, valid an hour.
    fn valid(&self, sub: &str, groups: &[&str]) -> String {
        self.token(
            json!({"iss": ISSUER, "sub": sub, "aud": "hello", "groups": groups,
                          "iat": now(), "exp": now() + 3600}),
        )
    }
}

/// A loopback HTTP server answering the JWKS, on its own thread.
struct JwksServer {
    port: u16,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl JwksServer {
    fn start(jwks: Value) -> JwksServer {
        let body = jwks.to_string();
        let (port, stop) = serve_http("127.0.0.1", move |_| {
            axum::Router::new().route(
                "/jwks.json",
                axum::routing::get(move || {
                    let body = body.clone();
                    async move { ([("content-type", "application/json")], body) }
                }),
            )
        });
        JwksServer { port, _stop: stop }
    }
}

/// A hello backend behind the gateway on a free port, in `work/config`:
/// the backend (kept running), the gateway's port and the config dir.
fn hello_behind_gateway(work: &std::path::Path) -> (Backend, u16, std::path::PathBuf) {
    let backend = Backend::start("v1");
    let port = free_port();
    let dir = work.join("config");
    write(&dir.join("mesh.yaml"), &hello_mesh(port, backend.port, "v1"));
    (backend, port, dir)
}

fn request_authentication(jwks_port: u16) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: istio-system}}
spec:
  selector:
    matchLabels: {{istio: ingressgateway}}
  jwtRules:
  - issuer: {ISSUER}
    audiences: [hello]
    jwksUri: http://127.0.0.1:{jwks_port}/jwks.json
"#
    )
}

fn require_token() -> &'static str {
    r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: istio-system}
spec:
  selector:
    matchLabels: {istio: ingressgateway}
  action: ALLOW
  rules:
  - from:
    - source: {requestPrincipals: ["*"]}
"#
}

fn admins_only() -> &'static str {
    r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: istio-system}
spec:
  selector:
    matchLabels: {istio: ingressgateway}
  action: ALLOW
  rules:
  - from:
    - source: {requestPrincipals: ["https://issuer.meshd.test/*"]}
    when:
    - key: request.auth.claims[groups]
      values: [admin]
"#
}

#[test]
fn jwts_and_authorization_policies_at_the_gateway() {
    let work = tempfile::tempdir().expect("tmp");
    let rsa = rsa_signer(work.path(), "rsa-1");
    let ec = ec_signer("ec-1");
    let jwks = JwksServer::start(json!({"keys": [rsa.jwk, ec.jwk]}));
    let (_backend, port, dir) = hello_behind_gateway(work.path());
    write(&dir.join("jwt.yaml"), &request_authentication(jwks.port));
    let meshd = Meshd::start(&dir, work.path());
    let envoy = Envoy::start(
        &meshd,
        work.path(),
        &Pod::ingress_gateway("istio-ingressgateway-1"),
    );
    let url = format!("http://127.0.0.1:{port}/");
    let get = |token: Option<&str>| -> Result<u16, String> {
        let auth = token.map(|t| format!("Authorization: Bearer {t}"));
        let mut args = vec!["-H", "Host: hello.example.com"];
        if let Some(a) = &auth {
            args.extend(["-H", a.as_str()]);
        }
        args.push(&url);
        curl(&args).map(|(code, _)| code)
    };
    let expect = |what: &str, token: Option<&str>, want: u16| {
        eventually(what, WAIT, || match get(token) {
            Ok(code) if code == want => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        });
    };

    // RequestAuthentication alone: no token passes, good tokens pass (once
    // Envoy has fetched the JWKS), bad ones are refused with 401.
    expect("no token, no policy", None, 200);
    expect("a valid RS256 token", Some(&rsa.valid("alice", &["dev"])), 200);
    expect("a valid ES256 token", Some(&ec.valid("bob", &["admin"])), 200);
    let expired = rsa.token(json!({"iss": ISSUER, "sub": "alice", "aud": "hello", "exp": now() - 3600}));
    let wrong_issuer =
        rsa.token(json!({"iss": "https://other.test", "sub": "alice", "aud": "hello", "exp": now() + 3600}));
    let wrong_audience =
        rsa.token(json!({"iss": ISSUER, "sub": "alice", "aud": "other", "exp": now() + 3600}));
    let forged = {
        let stranger = ec_signer("ec-1"); // the same kid, another key
        stranger.valid("mallory", &["admin"])
    };
    for (what, token) in [
        ("expired", &expired),
        ("wrong issuer", &wrong_issuer),
        ("wrong audience", &wrong_audience),
        ("bad signature", &forged),
    ] {
        assert_eq!(get(Some(token)), Ok(401), "{what}");
    }

    // A token required.
    write(&dir.join("authz.yaml"), require_token());
    expect("no token under requestPrincipals: [*]", None, 403);
    assert_eq!(get(Some(&rsa.valid("alice", &["dev"]))), Ok(200), "a valid token");
    assert_eq!(get(Some(&expired)), Ok(401), "still 401 for a bad token");

    // A claim decides.
    write(&dir.join("authz.yaml"), admins_only());
    expect("a non-admin refused", Some(&rsa.valid("alice", &["dev"])), 403);
    assert_eq!(
        get(Some(&ec.valid("bob", &["admin", "dev"]))),
        Ok(200),
        "an admin admitted"
    );
    assert_eq!(get(None), Ok(403), "no token, no claim");
}

#[test]
fn custom_policies_ask_the_external_authorizer_of_the_mesh_config() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let work = tempfile::tempdir().expect("tmp");
    // An HTTP authorizer, as Istio's sample ext-authz: allows a request
    // whose x-ext-authz header says "allow".
    let checks = Arc::new(AtomicUsize::new(0));
    let counter = checks.clone();
    let (authz_port, _stop) = serve_http("127.0.0.1", move |_| {
        axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
            counter.fetch_add(1, Ordering::SeqCst);
            let allow = headers.get("x-ext-authz").is_some_and(|v| v == "allow");
            async move {
                let status = if allow {
                    axum::http::StatusCode::OK
                } else {
                    axum::http::StatusCode::FORBIDDEN
                };
                (
                    status,
                    [(
                        "x-ext-authz-check-result",
                        if allow { "allowed" } else { "denied" },
                    )],
                    "",
                )
            }
        })
    });
    let (_backend, port, dir) = hello_behind_gateway(work.path());
    write(
        &dir.join("custom.yaml"),
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: istio-system}
spec:
  selector:
    matchLabels: {istio: ingressgateway}
  action: CUSTOM
  provider: {name: sample-ext-authz}
  rules:
  - to:
    - operation: {paths: ["/ext/*"]}
"#,
    );
    let mesh_config = format!(
            "extensionProviders:\n- name: sample-ext-authz\n  envoyExtAuthzHttp:\n    service: 127.0.0.1\n    port: {authz_port}\n\
             \x20   includeRequestHeadersInCheck: [x-ext-authz]\n    headersToDownstreamOnDeny: [x-ext-authz-check-result]\n"
    );
    let (_meshd, envoy) = gateway_with_mesh_config(&dir, work.path(), &mesh_config);
    let get = |path: &str, allow: bool| -> Result<(u16, String), String> {
        let url = format!("http://127.0.0.1:{port}{path}");
        let mut args = vec!["-i", "-H", "Host: hello.example.com"];
        if allow {
            args.extend(["-H", "x-ext-authz: allow"]);
        }
        args.push(&url);
        curl(&args)
    };
    eventually(
        "the authorizer refuses /ext/ without its header",
        WAIT,
        || match get("/ext/a", false) {
            Ok((403, body))
                if body
                    .to_ascii_lowercase()
                    .contains("x-ext-authz-check-result: denied") =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        },
    );
    assert_eq!(
        get("/ext/a", true).map(|r| r.0),
        Ok(200),
        "allowed by the authorizer"
    );
    let before = checks.load(Ordering::SeqCst);
    assert_eq!(
        get("/other", false).map(|r| r.0),
        Ok(200),
        "paths the rule does not match"
    );
    assert_eq!(
        checks.load(Ordering::SeqCst),
        before,
        "are not sent to the authorizer"
    );
}

/// meshd on `dir` with the mesh config `mesh_config`, and a stock Envoy
/// ingress gateway on it.
fn gateway_with_mesh_config(
    dir: &std::path::Path,
    work: &std::path::Path,
    mesh_config: &str,
) -> (Meshd, Envoy) {
    let path = work.join("meshconfig.yaml");
    write(&path, mesh_config);
    let flag = path.display().to_string();
    let meshd = Meshd::start_with(
        dir,
        work,
        crate::common::MeshdPorts::free(),
        &["--mesh-config", &flag],
    );
    let envoy = Envoy::start(&meshd, work, &Pod::ingress_gateway("istio-ingressgateway-1"));
    (meshd, envoy)
}

#[test]
fn custom_policies_check_gateway_tcp_connections_with_a_grpc_authorizer() {
    use std::sync::atomic::Ordering;
    let work = tempfile::tempdir().expect("tmp");
    let authorizer = GrpcAuthorizer::start();
    let backend = Backend::start("v1");
    let (http_port, tcp_port) = (free_port(), free_port());
    let dir = work.path().join("config");
    // The gateway serves hello over HTTP on one port and as raw TCP on
    // another (Istio's 31400 example), both to the same backend.
    write(
        &dir.join("mesh.yaml"),
        &format!(
            r#"{gateway}{hello}{vs}---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: hello-tcp}}
spec:
  hosts: ["*"]
  gateways: [istio-system/ingressgateway]
  tcp:
  - match: [{{port: 31400}}]
    route:
    - destination: {{host: hello, port: {{number: 80}}}}
"#,
            gateway = crate::common::ingress_gateway_with_tcp(http_port, Some(tcp_port)),
            hello = crate::common::loopback_service("hello", "http", 80, backend.port),
            vs = crate::common::hello_virtual_service("v1", None),
        ),
    );
    // CUSTOM for what arrives on the TCP server's port (the port the
    // gateway listens on, as in Istio).
    let policy = dir.join("policy.yaml");
    write(
        &policy,
        &format!(
            r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext, namespace: istio-system}}
spec:
  selector:
    matchLabels: {{istio: ingressgateway}}
  action: CUSTOM
  provider: {{name: grpc-authz}}
  rules:
  - to:
    - operation: {{ports: ["{tcp_port}"]}}
"#
        ),
    );
    let mesh_config = format!(
            "extensionProviders:\n- name: grpc-authz\n  envoyExtAuthzGrpc:\n    service: 127.0.0.1\n    port: {}\n",
        authorizer.port
    );
    let (_meshd, envoy) = gateway_with_mesh_config(&dir, work.path(), &mesh_config);
    let over = |port: u16| {
        curl(&[
            "-H",
            "Host: hello.example.com",
            &format!("http://127.0.0.1:{port}/"),
        ])
    };
    eventually("hello over the gateway's HTTP port", WAIT, || {
        match over(http_port) {
            Ok((200, body)) if body.contains("Hello, world!") => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        }
    });
    assert_eq!(
        authorizer.checks_of(http_port),
        0,
        "the HTTP port is not the rule's: its requests are not sent to the authorizer"
    );
    eventually(
        "a TCP connection the authorizer refuses is closed",
        WAIT,
        || match over(tcp_port) {
            Err(e) if authorizer.checks_of(tcp_port) > 0 => Ok(e),
            other => Err(format!(
                "{other:?}, {} checks\n{}",
                authorizer.checks_of(tcp_port),
                envoy.proc.log_tail()
            )),
        },
    );
    authorizer.allow.store(true, Ordering::SeqCst);
    let before = authorizer.checks_of(tcp_port);
    match over(tcp_port) {
        Ok((200, body)) if body.contains("Hello, world!") => {}
        other => panic!("allowed by the authorizer: {other:?}\n{}", envoy.proc.log_tail()),
    }
    assert_eq!(
        authorizer.checks_of(tcp_port),
        before + 1,
        "one check per connection"
    );

    // The gateway's TCP chains carry ALLOW/DENY policies too.
    write(
        &policy,
        &format!(
            r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-tcp, namespace: istio-system}}
spec:
  selector:
    matchLabels: {{istio: ingressgateway}}
  action: DENY
  rules:
  - to:
    - operation: {{ports: ["{tcp_port}"]}}
"#
        ),
    );
    eventually(
        "a DENY policy closes the gateway's TCP connections",
        WAIT,
        || match over(tcp_port) {
            Err(e) => Ok(e),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        },
    );
    let checks = authorizer.checks_of(tcp_port);
    assert!(over(tcp_port).is_err(), "still closed");
    assert_eq!(
        authorizer.checks_of(tcp_port),
        checks,
        "by the RBAC filter, not the authorizer"
    );
    assert_eq!(
        over(http_port).map(|r| r.0),
        Ok(200),
        "the HTTP port is not the rule's"
    );
}
