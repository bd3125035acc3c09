//! Traffic management through a stock Envoy gateway: a 90/10 canary
//! between DestinationRule subsets, the switch to 0/100 without a failed
//! request, header routing, retries, injected faults, mirroring and
//! consistent hashing, PROXY protocol to upstreams. Backends listen on distinct loopback addresses, so
//! that Pods (and so subsets) tell them apart.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{
    curl, eventually, free_port, ingress_gateway, loopback_service, write, Backend, Envoy, Meshd, Pod,
};

struct Traffic {
    work: tempfile::TempDir,
    port: u16,
    v1: Backend,
    v2: Backend,
    _flaky: Backend,
    _sticky: (Backend, Backend),
    _meshd: Meshd,
    envoy: Envoy,
}

fn reviews_vs(weights: (u32, u32)) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews.example.com]
  gateways: [istio-system/ingressgateway]
  http:
  - match:
    - headers:
        end-user: {{exact: jason}}
    route:
    - destination: {{host: reviews, subset: v2}}
  - match:
    - uri: {{prefix: /fault-abort}}
    fault:
      abort: {{httpStatus: 418, percentage: {{value: 100}}}}
    route:
    - destination: {{host: reviews, subset: v1}}
  - match:
    - uri: {{prefix: /fault-delay}}
    fault:
      delay: {{fixedDelay: 1s, percentage: {{value: 100}}}}
    route:
    - destination: {{host: reviews, subset: v1}}
  - match:
    - uri: {{prefix: /cors}}
    corsPolicy:
      allowOrigins: [{{exact: "https://ok.example"}}]
      allowMethods: [GET]
    route:
    - destination: {{host: reviews, subset: v1}}
  - match:
    - uri: {{prefix: /mirror}}
    route:
    - destination: {{host: reviews, subset: v1}}
    mirror: {{host: reviews, subset: v2}}
    mirrorPercentage: {{value: 100}}
  - route:
    - destination: {{host: reviews, subset: v1}}
      weight: {}
    - destination: {{host: reviews, subset: v2}}
      weight: {}
"#,
        weights.0, weights.1
    )
}

fn config(port: u16, v1: u16, v2: u16, flaky: u16, sticky: (u16, u16)) -> String {
    let (s1, s2) = sticky;
    format!(
        r#"{gateway}apiVersion: v1
kind: Service
metadata: {{name: reviews}}
spec:
  selector: {{app: reviews}}
  ports: [{{name: http, port: 80}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: reviews}}
subsets:
- addresses: [{{ip: 127.0.0.2}}]
  ports: [{{name: http, port: {v1}}}]
- addresses: [{{ip: 127.0.0.3}}]
  ports: [{{name: http, port: {v2}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-v1, labels: {{app: reviews, version: v1}}}}
spec: {{containers: []}}
status: {{podIP: 127.0.0.2}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-v2, labels: {{app: reviews, version: v2}}}}
spec: {{containers: []}}
status: {{podIP: 127.0.0.3}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: reviews}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: flaky}}
spec:
  ports: [{{name: http, port: 80}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: flaky}}
subsets:
- addresses: [{{ip: 127.0.0.1}}]
  ports: [{{name: http, port: {flaky}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: flaky}}
spec:
  hosts: [flaky.example.com, flaky-no-retries.example.com]
  gateways: [istio-system/ingressgateway]
  http:
  - match:
    - authority: {{prefix: flaky-no-retries}}
    retries: {{attempts: 0}}
    route:
    - destination: {{host: flaky}}
  - retries: {{attempts: 3, retryOn: 5xx}}
    route:
    - destination: {{host: flaky}}
---
apiVersion: v1
kind: Service
metadata: {{name: sticky}}
spec:
  ports: [{{name: http, port: 80}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: sticky}}
subsets:
- addresses: [{{ip: 127.0.0.4}}]
  ports: [{{name: http, port: {s1}}}]
- addresses: [{{ip: 127.0.0.5}}]
  ports: [{{name: http, port: {s2}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: sticky}}
spec:
  host: sticky
  trafficPolicy:
    loadBalancer:
      consistentHash: {{httpHeaderName: x-user}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: sticky}}
spec:
  hosts: [sticky.example.com]
  gateways: [istio-system/ingressgateway]
  http:
  - route:
    - destination: {{host: sticky}}
"#,
        gateway = ingress_gateway(port)
    )
}

impl Traffic {
    fn start() -> Traffic {
        let work = tempfile::tempdir().expect("tmp");
        let port = free_port();
        let v1 = Backend::start_at("127.0.0.2", "v1", false);
        let v2 = Backend::start_at("127.0.0.3", "v2", false);
        let flaky = Backend::start_at("127.0.0.1", "flaky", true);
        let sticky = (
            Backend::start_at("127.0.0.4", "s1", false),
            Backend::start_at("127.0.0.5", "s2", false),
        );
        let dir = work.path().join("config");
        write(
            &dir.join("mesh.yaml"),
            &config(port, v1.port, v2.port, flaky.port, (sticky.0.port, sticky.1.port)),
        );
        write(&dir.join("reviews-vs.yaml"), &reviews_vs((90, 10)));
        let meshd = Meshd::start(&dir, work.path());
        let envoy = Envoy::start(
            &meshd,
            work.path(),
            &Pod::ingress_gateway("istio-ingressgateway-1"),
        );
        let t = Traffic {
            work,
            port,
            v1,
            v2,
            _flaky: flaky,
            _sticky: sticky,
            _meshd: meshd,
            envoy,
        };
        eventually(
            "the gateway routes reviews",
            Duration::from_secs(15),
            || match t.get("reviews.example.com", "/", &[]) {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}\n{}", t.envoy.proc.log_tail())),
            },
        );
        t
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn get(&self, host: &str, path: &str, extra: &[&str]) -> Result<(u16, String), String> {
        let h = format!("Host: {host}");
        let url = self.url(path);
        let mut args = vec!["-H", h.as_str()];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&args)
    }

    /// `n` requests on one keep-alive connection; each response's status
    /// and body, as one curl prints them.
    fn many(&self, n: usize, write_out: &str) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-H", "Host: reviews.example.com", "-w", write_out]);
        for _ in 0..n {
            cmd.arg(self.url("/"));
        }
        cmd
    }
}

#[test]
fn canary_shift_header_routing_faults_and_mirror() {
    let t = Traffic::start();

    // 90/10 over 2,000 requests: within ±3 percentage points.
    let out = t.many(2000, "").output().expect("curl");
    let body = String::from_utf8_lossy(&out.stdout);
    let v1 = body.matches("Version: v1").count();
    let v2 = body.matches("Version: v2").count();
    assert_eq!(v1 + v2, 2000, "every request answered");
    assert!((1740..=1860).contains(&v1), "v1 got {v1} of 2000 (90% ± 3)");

    // The switch to 0/100 under load: no failed request.
    let mut load = t.many(3000, "%{http_code}\n");
    let load = load
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("load");
    write(
        &t.work.path().join("config/reviews-vs.yaml"),
        &reviews_vs((0, 100)),
    );
    eventually("all traffic on v2", Duration::from_secs(15), || {
        match t.get("reviews.example.com", "/", &[]) {
            Ok((200, body)) if body.contains("Version: v2") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let out = load.wait_with_output().expect("load");
    let text = String::from_utf8_lossy(&out.stdout);
    // Bodies and the status line written after each: keep the statuses.
    let codes: Vec<&str> = text
        .lines()
        .filter(|l| l.len() == 3 && l.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    let failed: Vec<&&str> = codes.iter().filter(|c| **c != "200").collect();
    assert_eq!(codes.len(), 3000);
    assert!(failed.is_empty(), "failed requests during the switch: {failed:?}");
    let after = t.many(100, "").output().expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&after.stdout)
            .matches("Version: v2")
            .count(),
        100
    );

    // Header-based routing.
    let (code, body) = t
        .get("reviews.example.com", "/", &["-H", "end-user: jason"])
        .expect("jason");
    assert_eq!((code, body.contains("Version: v2")), (200, true));

    // Injected abort and delay.
    let (code, _) = t.get("reviews.example.com", "/fault-abort", &[]).expect("abort");
    assert_eq!(code, 418);
    let start = Instant::now();
    let (code, _) = t.get("reviews.example.com", "/fault-delay", &[]).expect("delay");
    assert_eq!(code, 200);
    assert!(
        start.elapsed() >= Duration::from_millis(950),
        "delayed by {:?}",
        start.elapsed()
    );

    // CORS: a preflight from an allowed origin is answered for it.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "-X",
            "OPTIONS",
            "-H",
            "Host: reviews.example.com",
        ])
        .args([
            "-H",
            "Origin: https://ok.example",
            "-H",
            "Access-Control-Request-Method: GET",
        ])
        .arg(t.url("/cors"))
        .output()
        .expect("curl");
    let headers = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        headers.contains("access-control-allow-origin: https://ok.example"),
        "{headers}"
    );

    // Mirroring: v1 answers, v2 gets a copy.
    let before = t.v2.hits.load(std::sync::atomic::Ordering::SeqCst);
    let v1_before = t.v1.hits.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..5 {
        let (code, body) = t.get("reviews.example.com", "/mirror", &[]).expect("mirror");
        assert_eq!((code, body.contains("Version: v1")), (200, true));
    }
    assert_eq!(t.v1.hits.load(std::sync::atomic::Ordering::SeqCst) - v1_before, 5);
    eventually("the mirror got copies", Duration::from_secs(5), || {
        let copies = t.v2.hits.load(std::sync::atomic::Ordering::SeqCst) - before;
        if copies == 5 {
            Ok(())
        } else {
            Err(format!("{copies} copies"))
        }
    });
}

#[test]
fn retries_recover_and_consistent_hash_sticks() {
    let t = Traffic::start();
    // The backend fails every other request; three retries hide it.
    for _ in 0..20 {
        let (code, _) = t.get("flaky.example.com", "/", &[]).expect("flaky");
        assert_eq!(code, 200);
    }
    // With retries off, the failures show.
    let codes: Vec<u16> = (0..10)
        .map(|_| {
            t.get("flaky-no-retries.example.com", "/", &[])
                .expect("no retries")
                .0
        })
        .collect();
    assert!(codes.contains(&503), "{codes:?}");

    // One user, one backend.
    let backend_of = |user: &str| {
        let (code, body) = t
            .get("sticky.example.com", "/", &["-H", &format!("x-user: {user}")])
            .expect("sticky");
        assert_eq!(code, 200);
        body.lines()
            .find(|l| l.starts_with("Version:"))
            .unwrap_or_default()
            .to_string()
    };
    let first = backend_of("alice");
    for _ in 0..30 {
        assert_eq!(backend_of("alice"), first);
    }
    let seen: std::collections::BTreeSet<String> =
        (0..40).map(|i| backend_of(&format!("user-{i}"))).collect();
    assert_eq!(
        seen.len(),
        2,
        "different users spread over both backends: {seen:?}"
    );
}

#[test]
fn service_entry_with_dns_resolution_reaches_an_external_service() {
    let work = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let external = Backend::start("external");
    let config = format!(
        r#"{gateway}# An "external" service by name: Envoy resolves localhost itself.
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: api-external}}
spec:
  hosts: [api.external.example]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {backend}}}]
  endpoints:
  - address: localhost
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: external}}
spec:
  hosts: [external.example.com]
  gateways: [istio-system/ingressgateway]
  http:
  - route:
    - destination: {{host: api.external.example, port: {{number: 80}}}}
"#,
        gateway = ingress_gateway(port),
        backend = external.port
    );
    write(&work.path().join("config/mesh.yaml"), &config);
    let meshd = Meshd::start(&work.path().join("config"), work.path());
    let envoy = Envoy::start(
        &meshd,
        work.path(),
        &Pod::ingress_gateway("istio-ingressgateway-2"),
    );
    let url = format!("http://127.0.0.1:{port}/");
    eventually(
        "the ServiceEntry answers through the gateway",
        Duration::from_secs(15),
        || match curl(&["-H", "Host: external.example.com", &url]) {
            Ok((200, body)) if body.contains("Version: external") => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        },
    );
    let (_, clusters) = envoy.admin("/clusters").expect("clusters");
    assert!(
        clusters.contains("outbound|80||api.external.example"),
        "{clusters}"
    );
}

/// A DestinationRule `tunnel` carries the gateway's TCP to a service
/// through an HTTP CONNECT proxy (a stock Envoy that opens tunnels to the
/// backend's address only), as Istio applies it: without the tunnel the
/// proxy answers the gateway's bytes with 404.
#[test]
fn a_tunnel_carries_tcp_through_a_connect_proxy() {
    let work = tempfile::tempdir().expect("tmp");
    let (http_port, tcp_port, proxy_port) = (free_port(), free_port(), free_port());
    let backend = Backend::start("tunnelled");
    let _proxy = crate::common::connect_proxy(work.path(), proxy_port, backend.port);
    let dir = work.path().join("config");
    write(
        &dir.join("mesh.yaml"),
        &format!(
            r#"{gateway}apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: forward-proxy}}
spec:
  hosts: [proxy.corp.example]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 3128, name: tcp, protocol: TCP, targetPort: {proxy_port}}}]
  endpoints: [{{address: 127.0.0.1}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: through-proxy}}
spec:
  hosts: ["*"]
  gateways: [istio-system/ingressgateway]
  tcp:
  - route:
    - destination: {{host: proxy.corp.example, port: {{number: 3128}}}}
"#,
            gateway = crate::common::ingress_gateway_with_tcp(http_port, Some(tcp_port)),
        ),
    );
    let tunnel = dir.join("tunnel.yaml");
    let meshd = Meshd::start(&dir, work.path());
    let envoy = Envoy::start(
        &meshd,
        work.path(),
        &Pod::ingress_gateway("istio-ingressgateway-4"),
    );
    let url = format!("http://127.0.0.1:{tcp_port}/");
    eventually(
        "the proxy refuses plain bytes",
        Duration::from_secs(15),
        || match curl(&[&url]) {
            Ok((404, _)) => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        },
    );
    write(
        &tunnel,
        &format!(
            r#"apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: forward-proxy}}
spec:
  host: proxy.corp.example
  trafficPolicy:
    tunnel: {{protocol: CONNECT, targetHost: 127.0.0.1, targetPort: {}}}
"#,
            backend.port
        ),
    );
    eventually(
        "the backend answers through the tunnel",
        Duration::from_secs(15),
        || match curl(&[&url]) {
            Ok((200, body)) if body.contains("Version: tunnelled") => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        },
    );
}

/// An AUTO_PASSTHROUGH gateway (Istio's east-west gateway) forwards a TLS
/// stream by its SNI, `outbound_.PORT_.SUBSET_.HOST`, to the endpoints of
/// that service and subset, its TLS untouched: the site's own server
/// answers the handshake.
#[test]
fn auto_passthrough_forwards_by_the_sni_of_a_service_and_subset() {
    let work = tempfile::tempdir().expect("tmp");
    crate::common::self_signed(work.path(), "site", "site.default.svc.cluster.local");
    let site_port = free_port();
    let _site = crate::common::s_server(work.path(), site_port, "site");
    let gateway_port = free_port();
    write(
        &work.path().join("config/mesh.yaml"),
        &format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: istio-ingressgateway, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  ports: [{{name: tls, port: 15443, targetPort: {gateway_port}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {{name: cross-network, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 15443, name: tls, protocol: TLS}}
    tls: {{mode: AUTO_PASSTHROUGH}}
    hosts: ["*.local"]
---
{site}apiVersion: v1
kind: Pod
metadata: {{name: site-v2, labels: {{app: site, version: v2}}}}
spec: {{containers: [{{name: site, image: site}}]}}
status: {{podIP: 127.0.0.1}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: site}}
spec:
  host: site
  subsets:
  - {{name: v2, labels: {{version: v2}}}}
  - {{name: v3, labels: {{version: v3}}}}
"#,
            site = loopback_service("site", "tls", 443, site_port),
        ),
    );
    let meshd = Meshd::start(&work.path().join("config"), work.path());
    let envoy = Envoy::start(
        &meshd,
        work.path(),
        &Pod::ingress_gateway("istio-eastwestgateway-1"),
    );
    let through = |subset: &str| {
        let sni = format!("outbound_.443_.{subset}_.site.default.svc.cluster.local");
        curl(&[
            "-k",
            "--resolve",
            &format!("{sni}:{gateway_port}:127.0.0.1"),
            &format!("https://{sni}:{gateway_port}/"),
        ])
    };
    for subset in ["", "v2"] {
        eventually(
            &format!("the site through SNI subset {subset}"),
            Duration::from_secs(15),
            || match through(subset) {
                Ok((200, body)) if body.contains("s_server") => Ok(()),
                other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
            },
        );
    }
    // A subset without endpoints, and one no DestinationRule defines, get
    // nothing.
    assert!(through("v3").is_err());
    assert!(through("v9").is_err());
}

/// A backend that speaks HTTP only after a PROXY protocol v1 header, and
/// answers with that header: what a load balancer behind Envoy would see.
fn proxy_protocol_backend() -> (u16, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut first = String::new();
            if reader.read_line(&mut first).is_err() {
                continue;
            }
            let first = first.trim_end().to_string();
            // The rest of the request head, up to the blank line.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let status = if first.starts_with("PROXY ") {
                "200 OK"
            } else {
                "400 Bad Request"
            };
            let body = format!("{first}\n");
            let mut stream = reader.into_inner();
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tx.send(first);
        }
    });
    (port, rx)
}

#[test]
fn proxy_protocol_header_opens_each_upstream_connection() {
    let work = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let (backend, seen) = proxy_protocol_backend();
    let config = format!(
        r#"{gateway}{legacy}apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: legacy}}
spec:
  host: legacy
  trafficPolicy:
    proxyProtocol: {{version: V1}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: legacy}}
spec:
  hosts: [legacy.example.com]
  gateways: [istio-system/ingressgateway]
  http:
  - route:
    - destination: {{host: legacy}}
"#,
        legacy = loopback_service("legacy", "http", 80, backend),
        gateway = ingress_gateway(port)
    );
    write(&work.path().join("config/mesh.yaml"), &config);
    let meshd = Meshd::start(&work.path().join("config"), work.path());
    let envoy = Envoy::start(
        &meshd,
        work.path(),
        &Pod::ingress_gateway("istio-ingressgateway-3"),
    );
    let url = format!("http://127.0.0.1:{port}/");
    let body = eventually(
        "the backend answers behind a PROXY header",
        Duration::from_secs(15),
        || match curl(&["-H", "Host: legacy.example.com", &url]) {
            Ok((200, body)) => Ok(body),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        },
    );
    // The header carries curl's connection to the gateway, not Envoy's
    // own: the backend learns the real client and the address it dialled.
    assert!(body.starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 "), "{body}");
    assert!(body.trim_end().ends_with(&format!(" {port}")), "{body}");
    let first = seen
        .recv_timeout(Duration::from_secs(5))
        .expect("the backend saw a connection");
    assert!(
        first.starts_with("PROXY "),
        "every connection opens with the header: {first}"
    );
}

/// The gateway runs in us-east/z1. With outlier detection, the reviews
/// endpoint on a us-east/z1 Node takes all traffic; when it starts failing
/// it is ejected and the region `failover` names (eu-west) takes over,
/// before the nearer-by-name but unlisted us-west.
#[test]
fn locality_failover_keeps_traffic_near_until_it_fails() {
    let work = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let near = Backend::start_at("127.0.0.21", "near", false);
    let failover = Backend::start_at("127.0.0.22", "failover", false);
    let other = Backend::start_at("127.0.0.23", "other", false);
    let node = |name: &str, region: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{topology.kubernetes.io/region: {region}, topology.kubernetes.io/zone: z1}}\n---\n"
        )
    };
    let pod = |name: &str, node: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: reviews}}}}\nspec: {{nodeName: {node}, containers: [{{name: app, image: reviews}}]}}\nstatus: {{podIP: {ip}}}\n---\n"
        )
    };
    let config = format!(
        r#"{gateway}{n1}{n2}{n3}{p1}{p2}{p3}apiVersion: v1
kind: Service
metadata: {{name: reviews}}
spec:
  selector: {{app: reviews}}
  ports: [{{name: http, port: 9080}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: reviews}}
subsets:
- addresses: [{{ip: 127.0.0.21}}]
  ports: [{{name: http, port: {near}}}]
- addresses: [{{ip: 127.0.0.22}}]
  ports: [{{name: http, port: {failover}}}]
- addresses: [{{ip: 127.0.0.23}}]
  ports: [{{name: http, port: {other}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: reviews}}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}
    loadBalancer:
      localityLbSetting:
        failover: [{{from: us-east, to: eu-west}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews.example.com]
  gateways: [istio-system/ingressgateway]
  http:
  - route:
    - destination: {{host: reviews}}
    retries: {{attempts: 0}}
"#,
        gateway = ingress_gateway(port),
        n1 = node("east", "us-east"),
        n2 = node("eu", "eu-west"),
        n3 = node("west", "us-west"),
        p1 = pod("reviews-near", "east", "127.0.0.21"),
        p2 = pod("reviews-failover", "eu", "127.0.0.22"),
        p3 = pod("reviews-other", "west", "127.0.0.23"),
        near = near.port,
        failover = failover.port,
        other = other.port,
    );
    write(&work.path().join("config/mesh.yaml"), &config);
    let meshd = Meshd::start(&work.path().join("config"), work.path());
    let envoy = Envoy::start_with_bootstrap_args(
        &meshd,
        work.path(),
        &Pod::ingress_gateway("istio-ingressgateway-3"),
        &["--locality", "us-east/z1"],
    );
    let url = format!("http://127.0.0.1:{port}/");
    let version = || match curl(&["-H", "Host: reviews.example.com", &url]) {
        Ok((code, body)) => body
            .lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .map_or(format!("status {code}"), str::to_string),
        Err(e) => e,
    };
    eventually(
        "reviews answers through the gateway",
        Duration::from_secs(15),
        || match version().as_str() {
            "near" => Ok(()),
            other => Err(format!("{other}\n{}", envoy.proc.log_tail())),
        },
    );
    let answers: Vec<String> = (0..40).map(|_| version()).collect();
    assert!(
        answers.iter().all(|v| v == "near"),
        "the same-zone endpoint takes everything while healthy: {answers:?}"
    );
    near.failing.store(true, std::sync::atomic::Ordering::SeqCst);
    // The first failure ejects it; from then on the failover region answers.
    eventually(
        "traffic moves to the failover region",
        Duration::from_secs(15),
        || {
            let answers: Vec<String> = (0..20).map(|_| version()).collect();
            if answers.iter().all(|v| v == "failover") {
                Ok(())
            } else {
                Err(format!("{answers:?}"))
            }
        },
    );
    assert_eq!(
        other.hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "us-west is never tried"
    );
}
