//! The seed's TLS part against meshd and a stock Envoy gateway: a CA and a
//! wildcard certificate made with openssl exactly as the seed makes them,
//! the `fireflyclass-credential` Secret, the `ingressgateway-tls` Gateway;
//! then MUTUAL, PASSTHROUGH, httpsRedirect and a Secret rotation.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;

use crate::common::{
    curl, eventually, free_port, loopback_service, openssl, s_server, write, Backend, Envoy, Meshd,
    OpenConnection, Pod, Proc,
};

const HOST: &str = "helloworld.fireflyclass.com";

const CA_CONF: &str = "[ req ]
prompt             = no
x509_extensions    = v3_req
default_bits       = 2048
default_md         = sha256
distinguished_name = req_distinguished_name

[ req_distinguished_name ]
countryName         = US
stateOrProvinceName = Colorado
localityName        = Boulder
organizationName    = fireflyclass.com
commonName          = ca.fireflyclass.com

[ v3_req ]
basicConstraints       = critical, CA:TRUE
# keyCertSign is required for this to be a true CA
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always,issuer
";

const FIREFLYCLASS_CONF: &str = "[ req ]
prompt             = no
x509_extensions    = v3_req
default_bits       = 2048
default_md         = sha256
distinguished_name = req_distinguished_name

[ req_distinguished_name ]
countryName                = US
stateOrProvinceName        = Colorado
localityName               = Boulder
organizationName           = FireflyClass
commonName                 = *.fireflyclass.com

[ v3_req ]
basicConstraints       = CA:FALSE
keyUsage               = digitalSignature, nonRepudiation, keyEncipherment, dataEncipherment
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always,issuer
extendedKeyUsage       = serverAuth
subjectAltName         = @alt_names

[alt_names]
# redundent - but required to make wildcard certs work
DNS.1   = *.fireflyclass.com
DNS.2   = fireflyclass.com
";

/// The seed's CA and `*.fireflyclass.com` certificate, under `dir` with
/// file names prefixed by `prefix` (so a second set can be made to rotate to).
fn seed_certificates(dir: &Path, prefix: &str) {
    std::fs::write(dir.join("ca.conf"), CA_CONF).expect("ca.conf");
    std::fs::write(dir.join("fireflyclass.conf"), FIREFLYCLASS_CONF).expect("fireflyclass.conf");
    let f = |name: &str| format!("./{prefix}{name}");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-config",
            "./ca.conf",
            "-extensions",
            "v3_req",
            "-days",
            "3650",
            "-nodes",
            "-keyout",
            &f("ca.key"),
            "-out",
            &f("ca.crt"),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-config",
            "./fireflyclass.conf",
            "-extensions",
            "v3_req",
            "-nodes",
            "-keyout",
            &f("fireflyclass.key"),
            "-out",
            &f("fireflyclass.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &f("fireflyclass.csr"),
            "-CA",
            &f("ca.crt"),
            "-CAkey",
            &f("ca.key"),
            "-CAcreateserial",
            "-out",
            &f("fireflyclass.crt"),
            "-days",
            "3650",
            "-sha256",
            "-extensions",
            "v3_req",
            "-extfile",
            "./fireflyclass.conf",
        ],
    );
}

/// A client certificate signed by its own CA (`{prefix}client.*`).
fn client_certificate(dir: &Path, prefix: &str) {
    let f = |name: &str| format!("./{prefix}{name}");
    let subj = format!("/CN={prefix}client-ca");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-days",
            "30",
            "-nodes",
            "-subj",
            &subj,
            "-keyout",
            &f("client-ca.key"),
            "-out",
            &f("client-ca.crt"),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=client.fireflyclass.com",
            "-keyout",
            &f("client.key"),
            "-out",
            &f("client.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &f("client.csr"),
            "-CA",
            &f("client-ca.crt"),
            "-CAkey",
            &f("client-ca.key"),
            "-CAcreateserial",
            "-out",
            &f("client.crt"),
            "-days",
            "30",
        ],
    );
}

/// `kubectl create -n NS secret generic NAME --from-file=KEY=FILE ...`, as YAML.
fn secret_yaml(dir: &Path, namespace: &str, name: &str, files: &[(&str, &str)]) -> String {
    let data = files
        .iter()
        .map(|(key, file)| {
            (
                key.to_string(),
                ByteString(std::fs::read(dir.join(file)).expect("read cert file")),
            )
        })
        .collect();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    serde_norway::to_string(&secret).expect("secret yaml")
}

struct Ports {
    http: u16,
    https: u16,
    mtls: u16,
    redirect: u16,
}

fn gateways_yaml(p: &Ports) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: istio-ingressgateway, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  ports:
  - {{name: http2, port: 80, targetPort: {http}}}
  - {{name: https, port: 443, targetPort: {https}}}
  - {{name: https-mtls, port: 9443, targetPort: {mtls}}}
  - {{name: http-redirect, port: 8088, targetPort: {redirect}}}
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {{name: ingressgateway, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - hosts: ["*"]
    port: {{name: http, number: 80, protocol: HTTP}}
---
kind: Gateway
apiVersion: networking.istio.io/v1beta1

metadata:
  name: ingressgateway-tls
  namespace: istio-system
spec:
  selector:
    istio: ingressgateway # use istio ingress Service
  servers:
  - port:
      number: 443
      name: https
      protocol: HTTPS
    tls:
      mode: SIMPLE
      httpsRedirect: true
      credentialName: fireflyclass-credential
    hosts:
      - "*"
  - port: {{number: 443, name: tls-passthrough, protocol: TLS}}
    tls: {{mode: PASSTHROUGH}}
    hosts: [secure.fireflyclass.com]
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {{name: mtls, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 9443, name: https-mtls, protocol: HTTPS}}
    tls: {{mode: MUTUAL, credentialName: mtls-credential}}
    hosts: [mtls.fireflyclass.com]
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {{name: redirect, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 8088, name: http-redirect, protocol: HTTP}}
    tls: {{httpsRedirect: true}}
    hosts: [helloworld.fireflyclass.com]
"#,
        http = p.http,
        https = p.https,
        mtls = p.mtls,
        redirect = p.redirect,
    )
}

fn apps_yaml(backend: u16, secure_backend: u16) -> String {
    format!(
        r#"{helloworld}{secure}apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: helloworld
spec:
  hosts:
  - "helloworld.fireflyclass.com"
  - "mtls.fireflyclass.com"
  gateways:
  - istio-system/ingressgateway
  - istio-system/ingressgateway-tls
  - istio-system/mtls
  - istio-system/redirect
  http:
    - route:
      - destination:
          host: helloworld.default.svc.cluster.local
          port:
            number: 80
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: secure}}
spec:
  hosts: [secure.fireflyclass.com]
  gateways: [istio-system/ingressgateway-tls]
  tls:
  - match:
    - sniHosts: [secure.fireflyclass.com]
    route:
    - destination: {{host: secure, port: {{number: 443}}}}
"#,
        helloworld = loopback_service("helloworld", "http", 80, backend),
        secure = loopback_service("secure", "https", 443, secure_backend)
    )
}

struct Setup {
    work: tempfile::TempDir,
    ports: Ports,
    _backend: Backend,
    _secure_backend: Proc,
    meshd: Meshd,
    envoy: Envoy,
}

impl Setup {
    fn new() -> Setup {
        let work = tempfile::tempdir().expect("tempdir");
        let dir = work.path();
        seed_certificates(dir, "");
        client_certificate(dir, "");
        client_certificate(dir, "foreign-");
        // The passthrough backend terminates TLS itself, with a certificate
        // from a CA of its own, so curl can tell who answered.
        seed_certificates(dir, "backend-");
        let backend = Backend::start("1.0.0");
        let secure_port = free_port();
        let secure_backend = s_server(dir, secure_port, "backend-fireflyclass");
        let ports = Ports {
            http: free_port(),
            https: free_port(),
            mtls: free_port(),
            redirect: free_port(),
        };
        let config = dir.join("config");
        write(&config.join("gateways.yaml"), &gateways_yaml(&ports));
        write(&config.join("apps.yaml"), &apps_yaml(backend.port, secure_port));
        let secrets = [
            secret_yaml(
                dir,
                "istio-system",
                "fireflyclass-credential",
                &[("cert", "fireflyclass.crt"), ("key", "fireflyclass.key")],
            ),
            // The seed's -cacert Secret, holding the server certificate; SIMPLE never reads it.
            secret_yaml(
                dir,
                "istio-system",
                "fireflyclass-credential-cacert",
                &[("cacert", "fireflyclass.crt")],
            ),
            secret_yaml(
                dir,
                "istio-system",
                "mtls-credential",
                &[("cert", "fireflyclass.crt"), ("key", "fireflyclass.key")],
            ),
            secret_yaml(
                dir,
                "istio-system",
                "mtls-credential-cacert",
                &[("cacert", "client-ca.crt")],
            ),
        ];
        write(&config.join("secrets.yaml"), &secrets.join("---\n"));
        let meshd = Meshd::start(&config, dir);
        let pod = Pod::ingress_gateway("istio-ingressgateway-7c9f");
        let envoy = Envoy::start(&meshd, dir, &pod);
        Setup {
            work,
            ports,
            _backend: backend,
            _secure_backend: secure_backend,
            meshd,
            envoy,
        }
    }

    fn dir(&self) -> PathBuf {
        self.work.path().to_path_buf()
    }

    fn file(&self, name: &str) -> String {
        self.dir().join(name).display().to_string()
    }

    /// curl https://HOST:PORT/ resolved to loopback, with extra arguments.
    fn https(&self, host: &str, port: u16, extra: &[&str]) -> Result<(u16, String), String> {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}/");
        let mut args = vec!["--resolve", &resolve];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&args)
    }

    fn wait_https(&self, what: &str, host: &str, port: u16, extra: &[&str], text: &str) {
        eventually(what, Duration::from_secs(15), || {
            match self.https(host, port, extra) {
                Ok((200, body)) if body.contains(text) => Ok(()),
                other => Err(format!("{other:?}\n{}", self.envoy.proc.log_tail())),
            }
        });
    }
}

#[test]
fn seed_tls_simple_with_credential_name() {
    let s = Setup::new();
    let ca = s.file("ca.crt");
    s.wait_https(
        "curl --cacert ./ca.crt gets Hello, world!",
        HOST,
        s.ports.https,
        &["--cacert", &ca],
        "Hello, world!",
    );
    // Without the seed's CA, curl cannot verify the certificate.
    let err = s
        .https(HOST, s.ports.https, &[])
        .expect_err("verification must fail");
    assert!(err.contains("certificate"), "{err}");
    // The plain-HTTP Gateway keeps working beside it.
    let (code, body) = curl(&[
        "-H",
        &format!("Host: {HOST}"),
        &format!("http://127.0.0.1:{}/", s.ports.http),
    ])
    .expect("http");
    assert_eq!((code, body.contains("Hello, world!")), (200, true));
    // The key went over SDS, never into the listener.
    let (_, listeners) = s
        .envoy
        .admin("/config_dump?resource=dynamic_listeners")
        .expect("dump");
    assert!(
        listeners.contains("kubernetes://fireflyclass-credential"),
        "{listeners}"
    );
    assert!(!listeners.contains("PRIVATE KEY"));
}

#[test]
fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let s = Setup::new();
    let ca = s.file("ca.crt");
    let (cert, key) = (s.file("client.crt"), s.file("client.key"));
    s.wait_https(
        "MUTUAL with a good client certificate",
        "mtls.fireflyclass.com",
        s.ports.mtls,
        &["--cacert", &ca, "--cert", &cert, "--key", &key],
        "Hello, world!",
    );
    let none = s.https("mtls.fireflyclass.com", s.ports.mtls, &["--cacert", &ca]);
    assert!(none.is_err(), "no client certificate must be refused: {none:?}");
    let (fcert, fkey) = (s.file("foreign-client.crt"), s.file("foreign-client.key"));
    let foreign = s.https(
        "mtls.fireflyclass.com",
        s.ports.mtls,
        &["--cacert", &ca, "--cert", &fcert, "--key", &fkey],
    );
    assert!(
        foreign.is_err(),
        "a certificate from another CA must be refused: {foreign:?}"
    );
}

#[test]
fn passthrough_is_terminated_by_the_backend() {
    let s = Setup::new();
    let backend_ca = s.file("backend-ca.crt");
    // Only the backend's own CA verifies: Envoy passed the TLS stream through.
    s.wait_https(
        "PASSTHROUGH by SNI",
        "secure.fireflyclass.com",
        s.ports.https,
        &["--cacert", &backend_ca],
        "s_server",
    );
    let gateway_ca = s.file("ca.crt");
    let err = s.https(
        "secure.fireflyclass.com",
        s.ports.https,
        &["--cacert", &gateway_ca],
    );
    assert!(
        err.is_err(),
        "the gateway's certificate must not be the one presented: {err:?}"
    );
}

#[test]
fn https_redirect_answers_plain_http_with_301() {
    let s = Setup::new();
    let url = format!("http://127.0.0.1:{}/some/path", s.ports.redirect);
    let (code, _) = eventually(
        "301 from the redirect server",
        Duration::from_secs(15),
        || match curl(&["-H", &format!("Host: {HOST}"), "-o", "/dev/null", "-D", "-", &url]) {
            Ok((301, headers)) => Ok((301, headers)),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(code, 301);
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{redirect_url}",
            "-H",
            &format!("Host: {HOST}"),
            &url,
        ])
        .output()
        .expect("curl");
    let location = String::from_utf8_lossy(&out.stdout);
    assert!(
        location.starts_with("https://helloworld.fireflyclass.com"),
        "{location}"
    );
    assert!(location.ends_with("/some/path"), "{location}");
}

#[test]
fn rotated_secret_is_served_without_cutting_connections() {
    let s = Setup::new();
    let ca = s.file("ca.crt");
    s.wait_https(
        "first certificate",
        HOST,
        s.ports.https,
        &["--cacert", &ca],
        "Hello, world!",
    );
    let mut conn = OpenConnection::open(
        s.ports.https,
        &["-servername", HOST, "-CAfile", &ca, "-verify_return_error"],
    );
    assert!(conn.get(HOST), "the connection opened before the rotation works");

    // Rotate: a new CA and certificate under the same Secret name.
    seed_certificates(&s.dir(), "new-");
    let secrets = [
        secret_yaml(
            &s.dir(),
            "istio-system",
            "fireflyclass-credential",
            &[("cert", "new-fireflyclass.crt"), ("key", "new-fireflyclass.key")],
        ),
        secret_yaml(
            &s.dir(),
            "istio-system",
            "fireflyclass-credential-cacert",
            &[("cacert", "new-fireflyclass.crt")],
        ),
        secret_yaml(
            &s.dir(),
            "istio-system",
            "mtls-credential",
            &[("cert", "fireflyclass.crt"), ("key", "fireflyclass.key")],
        ),
        secret_yaml(
            &s.dir(),
            "istio-system",
            "mtls-credential-cacert",
            &[("cacert", "client-ca.crt")],
        ),
    ];
    write(&s.dir().join("config/secrets.yaml"), &secrets.join("---\n"));
    let new_ca = s.file("new-ca.crt");
    s.wait_https(
        "the rotated certificate",
        HOST,
        s.ports.https,
        &["--cacert", &new_ca],
        "Hello, world!",
    );

    assert!(
        conn.get(HOST),
        "the connection opened before the rotation survives it"
    );
    // Only the Secret changed: no listener was modified or drained.
    let (_, stats) = s
        .envoy
        .admin("/stats?filter=listener_manager.listener_modified$")
        .expect("stats");
    assert_eq!(stats.trim(), "listener_manager.listener_modified: 0");
    let sync = s.meshd.json("/debug/syncz");
    let sds = &sync["proxies"][0]["types"]["sds"];
    assert_eq!(sds["acked_version"], sds["sent_version"], "{sync}");
}
