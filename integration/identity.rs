//! Workload identity: the TLS xDS port, service-account tokens and client
//! certificates, `default`/`ROOTCA` over SDS to a stock Envoy, the CSR
//! API, refusals with their own messages, and rotation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meshd::pb::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
use meshd::pb::istio_ca::IstioCertificateRequest;
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::common::{
    curl, eventually, free_port, loopback_service, meshd, write, Backend, Envoy, Meshd, MeshdPorts,
    OpenConnection, Pod,
};

const SECRET_URL: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// meshd with a CA directory and a token key, and what a test needs to talk to it.
struct Ca {
    work: tempfile::TempDir,
    meshd: Meshd,
    signer: EncodingKey,
    gateway_port: u16,
    _backend: Backend,
}

fn config_yaml(gateway_port: u16, backend: u16) -> String {
    format!(
        r#"{helloworld}# A gateway in the mesh: it serves with its own workload certificate and
# only lets in clients with a certificate from the mesh CA.
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {{name: mesh-gateway}}
spec:
  selector: {{app: sleep-gateway}}
  servers:
  - port: {{number: {gateway_port}, name: https-mesh, protocol: HTTPS}}
    tls: {{mode: ISTIO_MUTUAL}}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: helloworld}}
spec:
  hosts: ["*"]
  gateways: [mesh-gateway]
  http:
  - route:
    - destination: {{host: helloworld}}
"#,
        helloworld = loopback_service("helloworld", "http", 80, backend)
    )
}

impl Ca {
    fn start(extra: &[&str]) -> Ca {
        let work = tempfile::tempdir().expect("tmp");
        let key = rcgen::KeyPair::generate().expect("token key");
        let signer = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("signer");
        let public = work.path().join("token-key.pem");
        std::fs::write(&public, key.public_key_pem()).expect("write key");
        let backend = Backend::start("1.0.0");
        let gateway_port = free_port();
        let config = work.path().join("config");
        write(
            &config.join("mesh.yaml"),
            &config_yaml(gateway_port, backend.port),
        );
        let ca_dir = work.path().join("ca").display().to_string();
        let key_path = public.display().to_string();
        let mut args = vec!["--ca-dir", &ca_dir, "--token-key", &key_path];
        args.extend_from_slice(extra);
        let meshd = Meshd::start_with(&config, work.path(), MeshdPorts::free(), &args);
        Ca {
            work,
            meshd,
            signer,
            gateway_port,
            _backend: backend,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    fn root_pem(&self) -> String {
        std::fs::read_to_string(self.path("ca/root-cert.pem")).expect("root")
    }

    /// A Kubernetes-style service-account token for ns/sa, expiring in `secs`.
    fn token(&self, ns: &str, sa: &str, secs: i64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("time")
            .as_secs() as i64;
        let claims = serde_json::json!({
            "iss": "kubernetes/serviceaccount",
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": ["istio-ca"],
            "exp": now + secs,
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "0"}},
        });
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.signer).expect("token")
    }

    /// Issues a client certificate for ns/sa with `meshd ca issue`.
    fn client_cert(&self, ns: &str, sa: &str) -> PathBuf {
        let out = self.path(&format!("client-{ns}-{sa}"));
        let status = meshd(&[
            "ca",
            "issue",
            "--ca-dir",
            &self.path("ca").display().to_string(),
            "--namespace",
            ns,
            "--service-account",
            sa,
            "--out-dir",
            &out.display().to_string(),
        ]);
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        out
    }

    async fn channel(&self, client: Option<&Path>) -> Channel {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.root_pem()))
            .domain_name("localhost");
        if let Some(dir) = client {
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("client cert");
            tls = tls.identity(Identity::from_pem(read("cert-chain.pem"), read("key.pem")));
        }
        Channel::from_shared(format!("https://127.0.0.1:{}", self.meshd.xds_tls_port))
            .expect("uri")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .expect("connect")
    }
}

fn node(ns: &str, sa: &str) -> Node {
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    Node {
        id: format!("sidecar~127.0.0.1~{sa}-1.{ns}~{ns}.svc.cluster.local"),
        metadata: Some(Struct {
            fields: HashMap::from([
                ("NAMESPACE".to_string(), s(ns)),
                ("SERVICE_ACCOUNT".to_string(), s(sa)),
            ]),
        }),
        ..Default::default()
    }
}

/// Asks for `default` and `ROOTCA` over SDS as `node`, with an optional
/// token; returns the URI SAN of the `default` certificate, or the refusal.
async fn sds_identity(channel: Channel, node: Node, token: Option<String>) -> Result<String, tonic::Status> {
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let req = DiscoveryRequest {
        node: Some(node),
        type_url: SECRET_URL.into(),
        resource_names: vec!["default".into(), "ROOTCA".into()],
        ..Default::default()
    };
    let mut request = tonic::Request::new(tokio_stream::iter(vec![req]));
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().expect("metadata"));
    }
    let mut stream = client.stream_aggregated_resources(request).await?.into_inner();
    let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no response"))??
        .ok_or_else(|| tonic::Status::aborted("stream ended"))?;
    let mut names = Vec::new();
    let mut san = String::new();
    for any in &response.resources {
        let s = Secret::decode(any.value.as_slice()).expect("secret");
        names.push(s.name.clone());
        if let Some(secret::Type::TlsCertificate(c)) = &s.r#type {
            let pem = match c.certificate_chain.as_ref().and_then(|d| d.specifier.clone()) {
                Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) => b,
                _ => Vec::new(),
            };
            san = uri_san(&pem);
        }
    }
    names.sort();
    assert_eq!(
        names,
        vec!["ROOTCA", "default"],
        "exactly the two secrets asked for"
    );
    Ok(san)
}

fn uri_san(pem: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("c.pem"), pem).expect("write");
    let out = Command::new("openssl")
        .args(["x509", "-in", "c.pem", "-noout", "-ext", "subjectAltName"])
        .current_dir(dir.path())
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn tokens_and_certificates_get_exactly_their_identity() {
    let ca = Ca::start(&[]);
    let rt = runtime();
    rt.block_on(async {
        let sleep = ca.token("default", "sleep", 600);
        let san = sds_identity(
            ca.channel(None).await,
            node("default", "sleep"),
            Some(sleep.clone()),
        )
        .await
        .expect("a token for default/sleep gets default/sleep");
        assert_eq!(san, "URI:spiffe://cluster.local/ns/default/sa/sleep");

        let client = ca.client_cert("shop", "cart");
        let san = sds_identity(ca.channel(Some(&client)).await, node("shop", "cart"), None)
            .await
            .expect("a client certificate authenticates too");
        assert_eq!(san, "URI:spiffe://cluster.local/ns/shop/sa/cart");

        let refused = |r: Result<String, tonic::Status>| r.expect_err("refused");
        let no_token = refused(sds_identity(ca.channel(None).await, node("default", "sleep"), None).await);
        assert_eq!(no_token.code(), tonic::Code::Unauthenticated);
        assert!(no_token.message().contains("no credentials"), "{no_token:?}");

        let expired = ca.token("default", "sleep", -60);
        let expired =
            refused(sds_identity(ca.channel(None).await, node("default", "sleep"), Some(expired)).await);
        assert_eq!(expired.code(), tonic::Code::Unauthenticated);
        assert!(expired.message().contains("expired"), "{expired:?}");

        let other = ca.token("default", "other", 600);
        let other =
            refused(sds_identity(ca.channel(None).await, node("default", "sleep"), Some(other)).await);
        assert_eq!(other.code(), tonic::Code::PermissionDenied);
        assert!(
            other
                .message()
                .contains("authenticated as spiffe://cluster.local/ns/default/sa/other"),
            "{other:?}"
        );

        let mismatch =
            refused(sds_identity(ca.channel(Some(&client)).await, node("default", "sleep"), None).await);
        assert_eq!(mismatch.code(), tonic::Code::PermissionDenied);
        assert!(
            mismatch.message().contains("claims namespace \"default\""),
            "{mismatch:?}"
        );
    });
}

#[test]
fn plain_port_gives_no_identity_without_the_insecure_flag() {
    let ca = Ca::start(&[]);
    let rt = runtime();
    rt.block_on(async {
        let plain = Channel::from_shared(format!("http://127.0.0.1:{}", ca.meshd.xds_port))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut client = AggregatedDiscoveryServiceClient::new(plain);
        let req = DiscoveryRequest {
            node: Some(node("default", "sleep")),
            type_url: SECRET_URL.into(),
            resource_names: vec!["default".into()],
            ..Default::default()
        };
        let mut stream = client
            .stream_aggregated_resources(tokio_stream::iter(vec![req]))
            .await
            .expect("stream")
            .into_inner();
        let r = stream.message().await.expect("ok").expect("response");
        assert!(
            r.resources.is_empty(),
            "no workload certificate on the plain port"
        );
    });
}

#[test]
fn csr_is_signed_for_the_authenticated_identity_only() {
    let ca = Ca::start(&[]);
    let rt = runtime();
    rt.block_on(async {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["admin.example.com".to_string()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "asks for admin");
        let csr = params.serialize_request(&key).expect("csr").pem().expect("pem");
        let mut client = IstioCertificateServiceClient::new(ca.channel(None).await);
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr.clone(),
            validity_duration: 3600,
            metadata: None,
        });
        let token = ca.token("default", "sleep", 600);
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("metadata"),
        );
        let chain = client
            .create_certificate(request)
            .await
            .expect("signed")
            .into_inner()
            .cert_chain;
        assert_eq!(chain.len(), 2, "leaf and root");
        assert_eq!(
            uri_san(chain[0].as_bytes()),
            "URI:spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(chain[1].trim(), ca.root_pem().trim());

        let unauthenticated = client
            .create_certificate(IstioCertificateRequest {
                csr,
                validity_duration: 3600,
                metadata: None,
            })
            .await
            .expect_err("refused without credentials");
        assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);
    });
    let certz = ca.meshd.json("/debug/certz");
    assert_eq!(certz["trust_domain"], "cluster.local");
    let issued = certz["certificates"].as_array().cloned().unwrap_or_default();
    assert_eq!(issued.len(), 1, "only the authenticated request got one: {certz}");
    assert_eq!(
        issued[0]["identity"],
        "spiffe://cluster.local/ns/default/sa/sleep"
    );
    assert_eq!(issued[0]["via"], "csr");
    assert_eq!(issued[0]["count"], 1);
    let expires_in = issued[0]["expires_in_s"].as_u64().unwrap_or_default();
    assert!((3500..=3600).contains(&expires_in), "asked for an hour: {certz}");
    assert!(!certz.to_string().contains("PRIVATE KEY"), "no key on certz");
    let (_, metrics) = ca.meshd.get("/metrics").expect("metrics");
    assert!(metrics.contains("citadel_server_csr_count 2"), "{metrics}");
    assert!(
        metrics.contains("citadel_server_success_cert_issuance_count 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("citadel_server_root_cert_expiry_timestamp "),
        "{metrics}"
    );
}

#[test]
fn insecure_plaintext_identity_believes_the_node_and_says_so() {
    let ca = Ca::start(&["--insecure-plaintext-identity"]);
    let rt = runtime();
    rt.block_on(async {
        let plain = Channel::from_shared(format!("http://127.0.0.1:{}", ca.meshd.xds_port))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let san = sds_identity(plain, node("shop", "cart"), None)
            .await
            .expect("issued");
        assert_eq!(san, "URI:spiffe://cluster.local/ns/shop/sa/cart");
    });
    let sync = ca.meshd.json("/debug/syncz");
    let warnings = sync["warnings"].to_string();
    assert!(warnings.contains("--insecure-plaintext-identity"), "{sync}");
}

#[test]
fn restart_keeps_the_root_and_a_bad_ca_dir_stops_start_up() {
    let mut ca = Ca::start(&[]);
    let root = ca.root_pem();
    ca.meshd.proc.kill();
    let ports = MeshdPorts::free();
    let ca_dir = ca.path("ca").display().to_string();
    let key = ca.path("token-key.pem").display().to_string();
    ca.meshd = Meshd::start_with(
        &ca.path("config"),
        ca.work.path(),
        ports,
        &["--ca-dir", &ca_dir, "--token-key", &key],
    );
    assert_eq!(ca.root_pem(), root, "a restart never changes the root");
    ca.meshd.proc.kill();
    std::fs::write(ca.path("ca/ca-key.pem"), "not a key").expect("corrupt");
    let out = meshd(&[
        "serve",
        "--ca-dir",
        &ca_dir,
        "--xds-addr",
        "127.0.0.1:0",
        "--xds-tls-addr",
        "127.0.0.1:0",
        "--debug-addr",
        "127.0.0.1:0",
        "--webhook-addr",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ca-key.pem: not a usable PKCS#8 private key"),
        "{err}"
    );
}

/// A stock Envoy gateway connected over TLS with a token.
fn envoy_with_token(ca: &Ca, ns: &str, sa: &str) -> Envoy {
    envoy_with_token_as(ca, "gateway", "sleep-gateway-1", ns, sa)
}

/// A stock Envoy of `role` connected over TLS with a token for ns/sa.
fn envoy_with_token_as(ca: &Ca, role: &str, name: &str, ns: &str, sa: &str) -> Envoy {
    let token_file = ca.path("token");
    std::fs::write(&token_file, ca.token(ns, sa, 3600)).expect("token file");
    let root = ca.path("ca/root-cert.pem").display().to_string();
    let token = token_file.display().to_string();
    let tls_addr = format!("127.0.0.1:{}", ca.meshd.xds_tls_port);
    Envoy::start_with_bootstrap_args(
        &ca.meshd,
        ca.work.path(),
        &Pod {
            role,
            name,
            namespace: ns,
            labels: "app=sleep-gateway",
            delta: false,
        },
        &[
            "--service-account",
            sa,
            "--xds-addr",
            &tls_addr,
            "--xds-tls",
            "--root-cert",
            &root,
            "--xds-server-name",
            "localhost",
            "--token-file",
            &token,
        ],
    )
}

/// The URI SAN and serial of the `default` certificate Envoy holds.
fn envoy_cert(envoy: &Envoy) -> Result<(String, String), String> {
    let (_, certs) = envoy.admin("/certs")?;
    let v: serde_json::Value = serde_json::from_str(&certs).map_err(|e| e.to_string())?;
    let cert = v["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["cert_chain"].as_array().cloned().unwrap_or_default())
        .find(|c| c["subject_alt_names"][0]["uri"].is_string())
        .ok_or_else(|| format!("no workload certificate yet: {certs}"))?;
    Ok((
        cert["subject_alt_names"][0]["uri"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        cert["serial_number"].as_str().unwrap_or_default().to_string(),
    ))
}

#[test]
fn stock_envoy_sidecar_gets_default_for_its_token_identity_only() {
    let ca = Ca::start(&[]);
    // A sidecar on loopback (no capture rules here): its inbound listener
    // asks for `default` and `ROOTCA` over SDS.
    let envoy = envoy_with_token_as(&ca, "sidecar", "sleep-6d4f", "default", "sleep");
    let (uri, _) = eventually(
        "the sidecar holds its workload certificate",
        Duration::from_secs(15),
        || envoy_cert(&envoy),
    );
    assert_eq!(uri, "spiffe://cluster.local/ns/default/sa/sleep");
    let (_, certs) = envoy.admin("/certs").expect("certs");
    let mut ids: Vec<&str> = certs
        .match_indices("spiffe://")
        .map(|(i, _)| certs[i..].split('"').next().unwrap_or_default())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids,
        vec!["spiffe://cluster.local/ns/default/sa/sleep"],
        "one identity and no other"
    );
    let sync = ca.meshd.json("/debug/syncz");
    let proxy = &sync["proxies"][0];
    assert_eq!(proxy["role"], "sidecar");
    for t in ["cds", "lds", "sds"] {
        assert!(proxy["types"][t]["nack"].is_null(), "{t} NACKed: {sync}");
        assert_eq!(
            proxy["types"][t]["acked_version"], proxy["types"][t]["sent_version"],
            "{t}: {sync}"
        );
    }
    let dump = ca.meshd.json(&format!(
        "/debug/config_dump?proxy={}",
        proxy["proxy"].as_str().unwrap_or_default().replace('~', "%7E")
    ));
    let text = dump.to_string();
    assert!(text.contains("\"name\":\"default\""), "the dump lists the secret");
    assert!(!text.contains("PRIVATE KEY"), "never the key material");
}

#[test]
fn stock_envoy_gets_its_identity_and_serves_istio_mutual() {
    let ca = Ca::start(&[]);
    let envoy = envoy_with_token(&ca, "default", "sleep");
    let (uri, _) = eventually(
        "Envoy holds its workload certificate",
        Duration::from_secs(15),
        || envoy_cert(&envoy),
    );
    assert_eq!(uri, "spiffe://cluster.local/ns/default/sa/sleep");

    let client = ca.client_cert("default", "curl");
    let url = format!("https://127.0.0.1:{}/", ca.gateway_port);
    let (cert, key) = (client.join("cert-chain.pem"), client.join("key.pem"));
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    // The gateway's certificate names a SPIFFE identity, not a host: curl
    // checks the chain with openssl below, and the client side here.
    let (code, body) = eventually(
        "ISTIO_MUTUAL with a mesh client certificate",
        Duration::from_secs(15),
        || match curl(&["-k", "--cert", &cert, "--key", &key, &url]) {
            Ok((200, body)) => Ok((200, body)),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        },
    );
    assert_eq!(code, 200);
    assert!(body.contains("Hello, world!"));
    assert!(curl(&["-k", &url]).is_err(), "no client certificate: refused");
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", ca.gateway_port),
            "-CAfile",
        ])
        .arg(ca.path("ca/root-cert.pem"))
        .args(["-cert", &cert, "-key", &key, "-verify_return_error"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Verify return code: 0 (ok)"),
        "the gateway's chain verifies against meshd's root: {text}"
    );
}

#[test]
fn workload_certificates_rotate_before_expiry() {
    let ca = Ca::start(&["--workload-cert-ttl", "20s"]);
    let envoy = envoy_with_token(&ca, "default", "sleep");
    let (_, first) = eventually("first certificate", Duration::from_secs(15), || {
        envoy_cert(&envoy)
    });
    // A connection through the gateway, opened before the rotation.
    let client = ca.client_cert("default", "curl");
    let (cert, key) = (client.join("cert-chain.pem"), client.join("key.pem"));
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let mut conn = eventually(
        "a connection through ISTIO_MUTUAL",
        Duration::from_secs(15),
        || {
            let mut c = OpenConnection::open(ca.gateway_port, &["-cert", &cert, "-key", &key]);
            if c.get("localhost") {
                Ok(c)
            } else {
                Err("no answer yet".to_string())
            }
        },
    );
    // Half-life is 10 s: a new certificate arrives well before the 20 s expiry.
    let (_, second) = eventually(
        "a renewed certificate",
        Duration::from_secs(18),
        || match envoy_cert(&envoy) {
            Ok((_, serial)) if serial != first => Ok(((), serial)),
            other => Err(format!("{other:?}")),
        },
    );
    assert_ne!(first, second);
    assert!(
        conn.get("localhost"),
        "the connection opened before the rotation survives it"
    );
    let (_, stats) = envoy
        .admin("/stats?filter=listener_manager.listener_modified$")
        .expect("stats");
    assert_eq!(
        stats.trim(),
        "listener_manager.listener_modified: 0",
        "rotation drains no listener"
    );
}
