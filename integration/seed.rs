//! The seed walk-through's "Let's Play" part, replayed against meshd with a
//! stock Envoy gateway: the unqualified gateway reference that 404s, the
//! analyzer that names it, the fix served without a restart.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::common::{curl, eventually, free_port, meshd, write, Backend, Envoy, Meshd, MeshdPorts, Pod};

const HOST: &str = "Host: helloworld.fireflyclass.com";

fn gateway_yaml(target_port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: istio-system
---
apiVersion: v1
kind: Service
metadata:
  name: istio-ingressgateway
  namespace: istio-system
spec:
  type: LoadBalancer
  selector:
    istio: ingressgateway
  ports:
  - name: http2
    port: 80
    targetPort: {target_port}
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata:
  name: ingressgateway
  namespace: istio-system
spec:
  selector:
    istio: ingressgateway
  servers:
  - hosts:
    - '*'
    port:
      name: http
      number: 80
      protocol: HTTP
"#
    )
}

fn helloworld_yaml(backend_port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: helloworld
spec:
  selector:
    app: helloworld
  ports:
  - name: http
    port: 80
    targetPort: {backend_port}
---
apiVersion: v1
kind: Endpoints
metadata:
  name: helloworld
subsets:
- addresses:
  - ip: 127.0.0.1
  ports:
  - name: http
    port: {backend_port}
"#
    )
}

fn virtual_service_yaml(gateway: &str, host: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: helloworld
spec:
  hosts:
  - "helloworld.fireflyclass.com"
  gateways:
  - {gateway}
  http:
    - route:
      - destination:
          host: {host}
          port:
            number: 80
"#
    )
}

/// A config dir, meshd, a backend and a gateway Envoy, as the seed sets them up.
struct Setup {
    work: tempfile::TempDir,
    gateway_port: u16,
    _backend: Backend,
    meshd: Meshd,
    envoy: Envoy,
}

impl Setup {
    fn new(gateway_ref: &str, delta: bool) -> Setup {
        let work = tempfile::tempdir().expect("tempdir");
        let backend = Backend::start("1.0.0");
        let gateway_port = free_port();
        let config = work.path().join("config");
        write(&config.join("gateway.yaml"), &gateway_yaml(gateway_port));
        write(&config.join("helloworld.yaml"), &helloworld_yaml(backend.port));
        write(
            &config.join("virtualservice.yaml"),
            &virtual_service_yaml(gateway_ref, "helloworld.default.svc.cluster.local"),
        );
        let meshd = Meshd::start(&config, work.path());
        let pod = Pod {
            role: "gateway",
            name: "istio-ingressgateway-5d8f",
            namespace: "istio-system",
            labels: "istio=ingressgateway,app=istio-ingressgateway",
            delta,
        };
        let envoy = Envoy::start(&meshd, work.path(), &pod);
        Setup {
            work,
            gateway_port,
            _backend: backend,
            meshd,
            envoy,
        }
    }

    fn config(&self) -> std::path::PathBuf {
        self.work.path().join("config")
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.gateway_port)
    }

    fn get(&self) -> Result<(u16, String), String> {
        curl(&["-H", HOST, &self.url()])
    }

    /// Waits until the gateway answers `code` with a body containing `text`.
    fn wait_for(&self, what: &str, code: u16, text: &str) {
        eventually(what, Duration::from_secs(10), || match self.get() {
            Ok((c, body)) if c == code && body.contains(text) => Ok(()),
            other => Err(format!("{other:?}\nenvoy:\n{}", self.envoy.proc.log_tail())),
        });
    }

    /// The proxy's entry in /debug/syncz.
    fn syncz(&self) -> Value {
        let all = self.meshd.json("/debug/syncz");
        let proxies = all["proxies"].as_array().cloned().unwrap_or_default();
        proxies
            .into_iter()
            .find(|p| p["proxy"] == self.envoy.node_id)
            .unwrap_or_else(|| panic!("{} not in syncz: {all}", self.envoy.node_id))
    }
}

fn analyze(dir: &Path) -> (bool, String) {
    let out = meshd(&["analyze", &dir.display().to_string()]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn replay_lets_play(delta: bool) {
    let s = Setup::new("ingressgateway", delta);

    // The gateway listens, but the unqualified reference binds nothing: 404.
    s.wait_for("404 for the unqualified gateway reference", 404, "");
    let (ok, report) = analyze(&s.config());
    assert!(!ok, "analyze must fail on the unqualified reference:\n{report}");
    assert!(report.contains("IST0101"), "{report}");
    assert!(
        report.contains("\"istio-system/ingressgateway\""),
        "analyze suggests the fix:\n{report}"
    );

    // The seed's fix, applied to the watched file: no restart.
    write(
        &s.config().join("virtualservice.yaml"),
        &virtual_service_yaml(
            "istio-system/ingressgateway",
            "helloworld.default.svc.cluster.local",
        ),
    );
    s.wait_for("Hello, world! after the fix", 200, "Hello, world!");
    let (ok, report) = analyze(&s.config());
    assert!(ok, "analyze is clean after the fix:\n{report}");

    // Every type is acked at the version sent, with no NACK.
    let sync = s.syncz();
    assert_eq!(sync["mode"], if delta { "delta" } else { "sotw" });
    for t in ["cds", "eds", "lds", "rds"] {
        let ty = &sync["types"][t];
        assert!(ty["nack"].is_null(), "{t} NACKed: {sync}");
        assert_eq!(ty["acked_version"], ty["sent_version"], "{t} not acked: {sync}");
    }
}

#[test]
fn lets_play_sotw() {
    replay_lets_play(false);
}

#[test]
fn lets_play_delta() {
    replay_lets_play(true);
}

#[test]
fn config_dump_matches_what_envoy_holds() {
    let s = Setup::new("istio-system/ingressgateway", false);
    s.wait_for("Hello, world!", 200, "Hello, world!");
    let dump = s.meshd.json(&format!(
        "/debug/config_dump?proxy={}",
        s.envoy.node_id.replace('~', "%7E")
    ));
    let text = dump.to_string();
    assert!(
        text.contains(&format!("\"name\":\"0.0.0.0_{}\"", s.gateway_port)),
        "{text}"
    );
    assert!(text.contains("helloworld.fireflyclass.com:80"), "{text}");
    assert!(
        text.contains("outbound|80||helloworld.default.svc.cluster.local"),
        "{text}"
    );
    let (_, envoy_routes) = s
        .envoy
        .admin("/config_dump?resource=dynamic_route_configs")
        .expect("envoy dump");
    assert!(
        envoy_routes.contains("helloworld.fireflyclass.com:80"),
        "{envoy_routes}"
    );
}

#[test]
fn bad_documents_leave_the_served_config_unchanged() {
    let s = Setup::new("istio-system/ingressgateway", false);
    s.wait_for("Hello, world!", 200, "Hello, world!");
    let before = s.syncz();

    write(
        &s.config().join("broken.yaml"),
        "apiVersion: v1\nkind: [Service\n",
    );
    write(
        &s.config().join("other-vs.yaml"),
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata:\n  name: other\n\
         spec:\n  hosts: [other.example.com]\n  gateway: [istio-system/ingressgateway]\n  http:\n  - route:\n    - destination: {host: helloworld}\n",
    );
    // An invalid edit of the served VirtualService: its last good version stays.
    write(
        &s.config().join("virtualservice.yaml"),
        &virtual_service_yaml("istio-system/ingressgateway", "\"\""),
    );

    let rejected = eventually("three rejections in configz", Duration::from_secs(10), || {
        let configz = s.meshd.json("/debug/configz");
        let rejected = configz["rejected"].as_array().cloned().unwrap_or_default();
        if rejected.len() == 3 {
            Ok(rejected)
        } else {
            Err(configz.to_string())
        }
    });
    let by_file = |f: &str| {
        rejected
            .iter()
            .find(|r| r["file"] == f)
            .unwrap_or_else(|| panic!("no rejection for {f}: {rejected:?}"))
            .clone()
    };
    assert!(by_file("broken.yaml")["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("not valid YAML"));
    let other = by_file("other-vs.yaml");
    assert_eq!(other["name"], "other");
    assert_eq!(other["field"], "spec.gateway");
    assert!(
        other["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown field `gateway`"),
        "{other}"
    );
    let hw = by_file("virtualservice.yaml");
    assert_eq!(hw["field"], "spec.http[0].route[0].destination.host");
    assert_eq!(hw["last_good_kept"], true);

    // Nothing served changed: same versions, and the route still works.
    let after = s.syncz();
    for t in ["cds", "eds", "lds", "rds"] {
        assert_eq!(
            before["types"][t]["sent_version"], after["types"][t]["sent_version"],
            "{t}"
        );
    }
    assert_eq!(s.get().expect("curl").0, 200);
}

#[test]
fn restart_with_the_same_config_sends_nothing_new() {
    let mut s = Setup::new("istio-system/ingressgateway", false);
    s.wait_for("Hello, world!", 200, "Hello, world!");
    let before = s.syncz();
    let ports = MeshdPorts {
        xds: s.meshd.xds_port,
        xds_tls: s.meshd.xds_tls_port,
        debug: s.meshd.debug_port,
        webhook: s.meshd.webhook_port,
    };
    s.meshd.proc.kill();
    s.meshd = Meshd::start_with(&s.config(), s.work.path(), ports, &[]);
    // Envoy reconnects and re-subscribes with the versions it has.
    let after = eventually("Envoy reconnected and acked", Duration::from_secs(20), || {
        let sync = s.meshd.json("/debug/syncz");
        let p = sync["proxies"]
            .as_array()
            .and_then(|a| a.first().cloned())
            .ok_or("no proxy yet")?;
        let acked = ["cds", "eds", "lds", "rds"]
            .iter()
            .all(|t| p["types"][t]["acked_version"].is_string());
        if acked {
            Ok(p)
        } else {
            Err(p.to_string())
        }
    });
    for t in ["cds", "eds", "lds", "rds"] {
        assert_eq!(
            before["types"][t]["sent_version"], after["types"][t]["sent_version"],
            "{t}"
        );
    }
    // Envoy saw no change: no listener or cluster was modified.
    let (_, stats) = s
        .envoy
        .admin("/stats?filter=(listener_modified|cluster_modified)$")
        .expect("stats");
    assert_eq!(stats.lines().count(), 2, "both counters are reported: {stats}");
    for line in stats.lines() {
        assert!(
            line.ends_with(": 0"),
            "Envoy changed config after the restart: {stats}"
        );
    }
    assert_eq!(s.get().expect("curl").0, 200);
}

const SEED_INGRESS: &str = r#"kind: Ingress
apiVersion: extensions/v1beta1
metadata:
  name: helloworld
spec:
  rules:
    - host: helloworld.fireflyclass.com
      http:
        paths:
          - backend:
              serviceName: helloworld
              servicePort: 80
            path: /
"#;

#[test]
fn seed_ingress_without_class_404s_and_analyze_says_why() {
    // The seed's VirtualService attempt is not bound (unqualified gateway),
    // so only the Ingress could serve the host.
    let s = Setup::new("ingressgateway", false);
    write(&s.config().join("ingress.yaml"), SEED_INGRESS);
    s.wait_for("404: an Ingress without class istio is not served", 404, "");
    let (ok, report) = analyze(&s.config());
    assert!(!ok);
    assert!(report.contains("Ingress default/helloworld"), "{report}");
    assert!(report.contains("kubernetes.io/ingress.class: istio"), "{report}");

    // With Istio's class annotation, the gateway serves it.
    let annotated = SEED_INGRESS.replace(
        "  name: helloworld\n",
        "  name: helloworld\n  annotations:\n    kubernetes.io/ingress.class: istio\n",
    );
    write(&s.config().join("ingress.yaml"), &annotated);
    s.wait_for("Hello, world! through the Ingress", 200, "Hello, world!");
}

#[test]
fn gateway_api_httproute_serves_helloworld() {
    let work = tempfile::tempdir().expect("tempdir");
    let backend = Backend::start("1.0.0");
    let port = free_port();
    let config = work.path().join("config");
    write(&config.join("helloworld.yaml"), &helloworld_yaml(backend.port));
    write(
        &config.join("gateway-api.yaml"),
        &format!(
            r#"apiVersion: v1
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
metadata: {{name: helloworld}}
spec:
  parentRefs: [{{name: web}}]
  hostnames: [helloworld.fireflyclass.com]
  rules:
  - backendRefs: [{{name: helloworld, port: 80}}]
"#
        ),
    );
    let meshd = Meshd::start(&config, work.path());
    let envoy = Envoy::start(
        &meshd,
        work.path(),
        &Pod {
            role: "gateway",
            name: "web-istio-6c9f",
            namespace: "default",
            labels: "gateway.networking.k8s.io/gateway-name=web",
            delta: false,
        },
    );
    let url = format!("http://127.0.0.1:{port}/");
    eventually(
        "Hello, world! through the HTTPRoute",
        Duration::from_secs(15),
        || match curl(&["-H", HOST, &url]) {
            Ok((200, body)) if body.contains("Hello, world!") => Ok(()),
            other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
        },
    );
    let configz = meshd.json("/debug/configz");
    let route = configz["resources"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["kind"] == "HttpRoute").cloned())
        .expect("the HTTPRoute in configz");
    let accepted = &route["status"]["parents"][0]["conditions"][0];
    assert_eq!(
        (&accepted["type"], &accepted["status"]),
        (&"Accepted".into(), &"True".into()),
        "{route}"
    );
    // The Gateway is programmed once its proxy is connected; its listener
    // counts the route.
    let gateway = configz["resources"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["kind"] == "K8sGateway").cloned())
        .expect("the Gateway in configz");
    let conditions = gateway["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        conditions
            .iter()
            .any(|c| c["type"] == "Programmed" && c["status"] == "True"),
        "{gateway}"
    );
    assert_eq!(
        gateway["status"]["listeners"][0]["attachedRoutes"], 1,
        "{gateway}"
    );
}
