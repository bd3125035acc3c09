//! The seed's "Sidecars" and "mTLS" parts on a small mesh built on this
//! machine: every pod is a network namespace the test creates (a veth to a
//! bridge in a namespace of its own, addresses from 10.254.0.0/24), with its
//! app and, where injected, a stock Envoy sidecar running as uid 1337 behind
//! the capture rules `meshd iptables` installs. meshd runs in the topology
//! too. Nothing leaves these namespaces; they are removed at the end.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::common::{eventually, meshd_bin, write};
use crate::netns::{envoy_for_sidecars, run, Topology};

const MESHD_IP: &str = "10.254.0.2";
const HELLO_IP: &str = "10.254.0.10";
const CURL_IP: &str = "10.254.0.20";
const GATEWAY_IP: &str = "10.254.0.30";
const OUTSIDER_IP: &str = "10.254.0.40";
const HELLO_VIP: &str = "10.96.0.10";

fn config_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: istio-system}}
---
apiVersion: v1
kind: Service
metadata: {{name: istio-ingressgateway, namespace: istio-system}}
spec:
  clusterIP: 10.96.0.30
  selector: {{istio: ingressgateway}}
  ports: [{{name: http2, port: 80, targetPort: 8080}}]
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
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: helloworld}}
spec:
  hosts: [helloworld.fireflyclass.com]
  gateways: [istio-system/ingressgateway]
  http:
  - route:
    - destination: {{host: helloworld.default.svc.cluster.local, port: {{number: 80}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: helloworld}}
spec:
  clusterIP: {HELLO_VIP}
  selector: {{app: helloworld}}
  ports:
  - {{name: http-web, port: 80, targetPort: 8080}}
  - {{name: admin, port: 90, targetPort: 9090}}
---
apiVersion: v1
kind: Endpoints
metadata: {{name: helloworld}}
subsets:
- addresses: [{{ip: {HELLO_IP}}}]
  ports: [{{name: http-web, port: 8080}}, {{name: admin, port: 9090}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: helloworld-695c77f7bd-wptgw
  labels: {{app: helloworld, security.istio.io/tlsMode: istio}}
spec:
  serviceAccountName: helloworld
  containers: [{{name: hello-app, image: gcr.io/google-samples/hello-app:1.0}}]
status: {{podIP: {HELLO_IP}}}
"#
    )
}

fn curltest_pod(injected: bool) -> String {
    let mesh = if injected {
        ", security.istio.io/tlsMode: istio"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: curltest\n  labels: {{run: curltest{mesh}}}\nspec:\n  serviceAccountName: curltest\n  containers: [{{name: curltest, image: infoblox/dnstools}}]\nstatus: {{podIP: {CURL_IP}}}\n"
    )
}

fn peer_authentication(spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: default\nspec:\n{spec}")
}

/// kube-proxy's part, for pods without a sidecar: the service VIP DNATed
/// to the pod, in a chain the injection can unhook.
fn kube_proxy(t: &Topology, ns: &str) {
    let ipt = |args: &[&str]| run(t.exec(ns).arg("iptables").args(["-t", "nat"]).args(args));
    ipt(&["-N", "KUBE-SERVICES"]);
    ipt(&["-A", "OUTPUT", "-j", "KUBE-SERVICES"]);
    for (port, target) in [("80", "8080"), ("90", "9090")] {
        ipt(&[
            "-A",
            "KUBE-SERVICES",
            "-d",
            HELLO_VIP,
            "-p",
            "tcp",
            "--dport",
            port,
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{HELLO_IP}:{target}"),
        ]);
    }
}

/// Who a proxy is, as its bootstrap says.
#[derive(Clone, Copy)]
struct Workload<'a> {
    role: &'a str,
    name: &'a str,
    namespace: &'a str,
    sa: &'a str,
    labels: &'a str,
    ip: &'a str,
    /// Extra `meshd bootstrap` flags.
    extra: &'a [&'a str],
}

struct Mesh {
    t: Topology,
    signer: EncodingKey,
    envoy: PathBuf,
    meshd_ns: String,
}

impl Mesh {
    fn start() -> Mesh {
        let mut t = Topology::new();
        let key = rcgen::KeyPair::generate().expect("key");
        let signer = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("signer");
        std::fs::write(t.path("token-key.pem"), key.public_key_pem()).expect("key");
        let config = t.path("config");
        write(&config.join("mesh.yaml"), &config_yaml());
        write(&config.join("curltest.yaml"), &curltest_pod(false));
        let envoy = envoy_for_sidecars(t.dir.path());
        let meshd_ns = t.pod("cp", MESHD_IP);
        let mut cmd = t.exec(&meshd_ns);
        cmd.arg(meshd_bin())
            .args(["serve", "--config-dir"])
            .arg(&config)
            .args([
                "--xds-addr",
                "0.0.0.0:15010",
                "--xds-tls-addr",
                "0.0.0.0:15012",
                "--debug-addr",
                "127.0.0.1:15014",
            ])
            .arg("--ca-dir")
            .arg(t.path("ca"))
            .arg("--token-key")
            .arg(t.path("token-key.pem"))
            .args(["--xds-dns-names", &format!("meshd.istio-system.svc,{MESHD_IP}")]);
        t.spawn(cmd, "meshd.log");
        let m = Mesh {
            t,
            signer,
            envoy,
            meshd_ns,
        };
        eventually("meshd ready", Duration::from_secs(20), || {
            m.t.curl(&m.meshd_ns, &["http://127.0.0.1:15014/ready"])
                .map(|_| ())
                .map_err(|e| format!("{e:?}\n{}", m.t.log("meshd.log")))
        });
        // The root must be readable by the sidecars' uid.
        std::fs::copy(m.t.path("ca/root-cert.pem"), m.t.path("root-cert.pem")).expect("root");
        std::fs::set_permissions(m.t.path("root-cert.pem"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        m
    }

    fn token(&self, ns: &str, sa: &str) -> PathBuf {
        let claims = serde_json::json!({
            "iss": "kubernetes/serviceaccount",
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": ["istio-ca"],
            "exp": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs() + 3600,
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "0"}},
        });
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.signer).expect("token");
        let path = self.t.path(&format!("{ns}-{sa}.token"));
        std::fs::write(&path, token).expect("token");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        path
    }

    /// Starts a stock Envoy in `pod_ns` as uid 1337, from `meshd bootstrap`.
    fn envoy(&mut self, pod_ns: &str, w: &Workload<'_>) {
        let Workload {
            role,
            name,
            namespace,
            sa,
            labels,
            ip,
            extra,
        } = *w;
        let bootstrap = self.t.path(&format!("{name}.yaml"));
        let token = self.token(namespace, sa);
        run(Command::new(meshd_bin())
            .args([
                "bootstrap",
                "--role",
                role,
                "--name",
                name,
                "--namespace",
                namespace,
                "--labels",
                labels,
            ])
            .args([
                "--service-account",
                sa,
                "--ip",
                ip,
                "--xds-addr",
                &format!("{MESHD_IP}:15012"),
                "--xds-tls",
            ])
            .arg("--root-cert")
            .arg(self.t.path("root-cert.pem"))
            .arg("--token-file")
            .arg(&token)
            .args(extra)
            .args(["--admin-addr", "127.0.0.1:15000", "-o"])
            .arg(&bootstrap));
        std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut cmd = self.t.exec(pod_ns);
        cmd.args(["setpriv", "--reuid", "1337", "--regid", "1337", "--clear-groups"])
            .arg(&self.envoy)
            .arg("-c")
            .arg(&bootstrap)
            .args(["--disable-hot-restart", "-l", "info"]);
        let log = format!("{name}-envoy.log");
        self.t.spawn(cmd, &log);
        let t = &self.t;
        eventually(&format!("{name}'s Envoy ready"), Duration::from_secs(30), || {
            t.curl(pod_ns, &["http://127.0.0.1:15000/ready"])
                .map(|_| ())
                .map_err(|e| format!("{e:?}\n{}", t.log(&log)))
        });
    }

    fn app(&mut self, ns: &str, port: u16) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hello_backend.py");
        let mut cmd = self.t.exec(ns);
        cmd.arg("python3")
            .arg(script)
            .args(["--bind", "0.0.0.0", "--port", &port.to_string()]);
        self.t.spawn(cmd, &format!("app-{port}.log"));
    }

    fn set_policy(&self, spec: Option<&str>) {
        let path = self.t.path("config/peer-authentication.yaml");
        match spec {
            Some(s) => write(&path, &peer_authentication(s)),
            None => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Waits until curl from `ns` to `url` gets Hello, world!.
fn wait_hello(m: &Mesh, what: &str, ns: &str, args: &[&str]) {
    eventually(what, Duration::from_secs(20), || match m.t.curl(ns, args) {
        Ok(body) if body.contains("Hello, world!") => Ok(()),
        other => Err(format!("{other:?}")),
    });
}

/// Waits until curl from `ns` is reset (exit 52 or 56), as under STRICT.
fn wait_reset(m: &Mesh, what: &str, ns: &str, args: &[&str]) {
    eventually(what, Duration::from_secs(20), || match m.t.curl(ns, args) {
        Err((52 | 56, _)) => Ok(()),
        other => Err(format!("{other:?}")),
    });
}

#[test]
fn seed_sidecars_and_mtls_on_a_namespace_mesh() {
    let mut m = Mesh::start();
    let hw = m.t.pod("hw", HELLO_IP);
    let ct = m.t.pod("ct", CURL_IP);
    let out = m.t.pod("out", OUTSIDER_IP);
    let gw = m.t.pod("gw", GATEWAY_IP);
    m.app(&hw, 8080);
    m.app(&hw, 9090);
    // helloworld is injected: capture rules, then its sidecar.
    run(m.t.exec(&hw).arg(meshd_bin()).arg("iptables"));
    m.envoy(
        &hw,
        &Workload {
            role: "sidecar",
            name: "helloworld-695c77f7bd-wptgw",
            namespace: "default",
            sa: "helloworld",
            labels: "app=helloworld",
            ip: HELLO_IP,
            // What `meshd inject` writes for hello-app's liveness probe.
            extra: &["--probe", "/app-health/hello-app/livez=8080/"],
        },
    );
    kube_proxy(&m.t, &ct);
    kube_proxy(&m.t, &out);
    let svc = "http://helloworld.default.svc.cluster.local/";
    let resolve = format!("helloworld.default.svc.cluster.local:80:{HELLO_VIP}");
    let hello = ["--resolve", resolve.as_str(), svc];

    // PERMISSIVE (no policy): curltest without a sidecar gets through.
    wait_hello(&m, "PERMISSIVE: plain text from curltest", &ct, &hello);

    // STRICT on the namespace: plain text is reset.
    m.set_policy(Some("  mtls:\n    mode: STRICT\n"));
    wait_reset(&m, "STRICT: plain text from curltest is reset", &ct, &hello);

    // Kubelet's probe, rewritten to the sidecar's 15021, still works.
    let probe = format!("http://{HELLO_IP}:15021/app-health/hello-app/livez");
    wait_hello(
        &m,
        "the rewritten liveness probe under STRICT",
        &out,
        &[probe.as_str()],
    );

    // The ingress gateway (with its own identity) still serves.
    m.envoy(
        &gw,
        &Workload {
            role: "gateway",
            name: "istio-ingressgateway-5d8f",
            namespace: "istio-system",
            sa: "istio-ingressgateway-service-account",
            labels: "istio=ingressgateway",
            ip: GATEWAY_IP,
            extra: &[],
        },
    );
    let gateway = format!("http://{GATEWAY_IP}:8080/");
    wait_hello(
        &m,
        "the ingress gateway under STRICT",
        &out,
        &["-H", "Host: helloworld.fireflyclass.com", &gateway],
    );

    // curltest gets a sidecar: the curl works again, over mutual TLS.
    write(&m.t.path("config/curltest.yaml"), &curltest_pod(true));
    run(m
        .t
        .exec(&ct)
        .args(["iptables", "-t", "nat", "-D", "OUTPUT", "-j", "KUBE-SERVICES"]));
    run(m.t.exec(&ct).arg(meshd_bin()).arg("iptables"));
    m.envoy(
        &ct,
        &Workload {
            role: "sidecar",
            name: "curltest",
            namespace: "default",
            sa: "curltest",
            labels: "run=curltest",
            ip: CURL_IP,
            extra: &[],
        },
    );
    let pcap = m.t.path("hw.pcap");
    let mut cap = m.t.exec(&hw);
    cap.args(["tcpdump", "-i", "eth0", "-Z", "root", "-U", "-s", "0", "-w"])
        .arg(&pcap)
        .args(["tcp", "port", "8080"]);
    m.t.spawn(cap, "tcpdump.log");
    eventually("tcpdump listening", Duration::from_secs(10), || {
        let log = m.t.log("tcpdump.log");
        if log.contains("listening on") {
            Ok(())
        } else {
            Err(log)
        }
    });
    wait_hello(&m, "curltest with a sidecar, under STRICT", &ct, &hello);
    // What crossed the wire to helloworld: keep requesting until the capture
    // (which starts asynchronously) holds an exchange.
    let sni: &[u8] = b"outbound_.80_._.helloworld.default.svc.cluster.local";
    let wire = eventually("a captured exchange", Duration::from_secs(20), || {
        let body = m.t.curl(&ct, &hello).map_err(|e| format!("{e:?}"))?;
        assert!(body.contains("Hello, world!"));
        let wire = std::fs::read(&pcap).map_err(|e| e.to_string())?;
        if wire.windows(sni.len()).any(|w| w == sni) {
            Ok(wire)
        } else {
            Err(format!("{} bytes captured so far", wire.len()))
        }
    });
    let plaintext: &[u8] = b"Hello, world!";
    assert!(
        !wire.windows(plaintext.len()).any(|w| w == plaintext),
        "no plaintext Hello, world! on the wire"
    );

    // A port-level PERMISSIVE exception under the STRICT namespace lets
    // plain text through on that port only.
    let hw_policy = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: helloworld\n  namespace: default\nspec:\n  selector:\n    matchLabels: {app: helloworld}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n";
    write(&m.t.path("config/helloworld-pa.yaml"), hw_policy);
    wait_hello(&m, "port 8080 admits plain text", &out, &hello);
    let admin = format!("helloworld.default.svc.cluster.local:90:{HELLO_VIP}");
    wait_reset(
        &m,
        "port 9090 stays STRICT",
        &out,
        &[
            "--resolve",
            &admin,
            "http://helloworld.default.svc.cluster.local:90/",
        ],
    );

    // The seed's "how do I check mTLS?", answered by meshd: helloworld's
    // sidecar accepts mutual TLS only, but plain text on 8080; curltest's
    // sidecar reaches helloworld with mutual TLS to its mesh endpoints.
    let debug = |path: &str| -> serde_json::Value {
        let body =
            m.t.curl(&m.meshd_ns, &[&format!("http://127.0.0.1:15014{path}")])
                .unwrap_or_else(|e| panic!("{path}: {e:?}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    };
    let sync = debug("/debug/syncz");
    let proxy_at = |ip: &str| -> String {
        sync["proxies"]
            .as_array()
            .and_then(|all| all.iter().find(|p| p["ip"] == ip))
            .and_then(|p| p["proxy"].as_str())
            .unwrap_or_else(|| panic!("no proxy at {ip}: {sync}"))
            .to_string()
    };
    let hello_authn = debug(&format!("/debug/authenticationz?proxy={}", proxy_at(HELLO_IP)));
    assert_eq!(hello_authn["inbound"]["mode"], "STRICT", "{hello_authn}");
    assert_eq!(
        hello_authn["inbound"]["ports"]["8080"], "PERMISSIVE",
        "{hello_authn}"
    );
    let curl_authn = debug(&format!("/debug/authenticationz?proxy={}", proxy_at(CURL_IP)));
    let to_hello = curl_authn["outbound"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|c| c["cluster"] == "outbound|80||helloworld.default.svc.cluster.local")
        })
        .unwrap_or_else(|| panic!("{curl_authn}"));
    assert_eq!(to_hello["tls"], "AUTO", "{curl_authn}");

    // An AuthorizationPolicy on helloworld denies the curltest identity (as
    // its mutual TLS certificate proves it): 403 from helloworld's sidecar,
    // while the gateway's identity still gets through.
    let deny = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-curltest, namespace: default}
spec:
  selector:
    matchLabels: {app: helloworld}
  action: DENY
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/curltest]}
"#;
    write(&m.t.path("config/deny-curltest.yaml"), deny);
    eventually(
        "curltest denied by identity",
        Duration::from_secs(20),
        || match m.t.curl(&ct, &hello) {
            // curl -f: the 403 is an error (22) that names the status.
            Err((22, e)) if e.contains("403") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    wait_hello(
        &m,
        "the gateway's identity is not denied",
        &out,
        &["-H", "Host: helloworld.fireflyclass.com", &gateway],
    );
}
