//! Helpers for the integration tests: a real `meshd` binary, a real stock
//! Envoy (from `make envoy`), a real HTTP backend and real `curl`, all on
//! loopback. Every wait polls a condition until a deadline.

#![allow(dead_code)] // each test file uses a different part

pub mod ads;
pub mod apiserver;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The stock Envoy binary: `$MESHD_ENVOY`, else `.venv/bin/envoy`.
pub fn envoy_bin() -> PathBuf {
    let path = std::env::var_os("MESHD_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy"));
    assert!(
        path.exists(),
        "stock Envoy not found at {}: run `make envoy` (integration tests need it)",
        path.display()
    );
    path
}

pub fn meshd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshd")
}

/// A port nobody listens on right now, never the same twice in one run.
/// Taken below Linux's ephemeral range (32768 and up), so that the ports
/// the kernel hands to backends bound on port 0 and to outgoing
/// connections never land on one a test has chosen but not bound yet.
pub fn free_port() -> u16 {
    const FIRST: u16 = 20_000;
    const LAST: u16 = 32_767;
    static NEXT: Mutex<Option<u16>> = Mutex::new(None);
    let mut next = NEXT.lock().unwrap_or_else(|p| p.into_inner());
    // Start where another run at the same time is unlikely to be.
    let mut port = next.unwrap_or(FIRST + (std::process::id() % 6_000) as u16);
    for _ in FIRST..=LAST {
        let candidate = port;
        port = if port >= LAST { FIRST } else { port + 1 };
        if TcpListener::bind(("0.0.0.0", candidate)).is_ok() {
            *next = Some(port);
            return candidate;
        }
    }
    panic!("no free port between {FIRST} and {LAST}");
}

/// Polls `check` every 100 ms until it returns `Ok` or `timeout` passes.
pub fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("{what}: still not true after {timeout:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(cmd: &mut Command, log: PathBuf) -> Proc {
    let file = std::fs::File::create(&log).expect("log file");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    Proc { child, log }
}

/// A stock Envoy on `port` acting as an HTTP/1.1 CONNECT proxy that opens
/// tunnels to `127.0.0.1:target` only (a CONNECT for any other authority
/// gets 404, as does any request that is not a CONNECT); ready when it
/// returns.
pub fn connect_proxy(work: &Path, port: u16, target: u16) -> Proc {
    let admin_port = free_port();
    let config = work.join(format!("connect-proxy-{port}.yaml"));
    write(
        &config,
        &format!(
            r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}}}
static_resources:
  listeners:
  - name: connect
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: connect
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts:
            - name: target
              domains: ["127.0.0.1:{target}"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route: {{cluster: target, upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]}}
  clusters:
  - name: target
    type: STATIC
    load_assignment:
      cluster_name: target
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {target}}}}}}}}}]}}]
"#
        ),
    );
    let proc = spawn(
        Command::new(envoy_bin())
            .arg("-c")
            .arg(&config)
            .args(["--base-id", &admin_port.to_string()])
            .args(["-l", "info"]),
        work.join(format!("connect-proxy-{port}.log")),
    );
    eventually(
        "the CONNECT proxy's /ready",
        Duration::from_secs(30),
        || match curl(&[&format!("http://127.0.0.1:{admin_port}/ready")]) {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}\n{}", proc.log_tail())),
        },
    );
    proc
}

/// `curl` with these arguments; returns (HTTP status, body).
pub fn curl(args: &[&str]) -> Result<(u16, String), String> {
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "5", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .map_err(|e| format!("running curl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code: u16 = code.trim().parse().unwrap_or(0);
    if !out.status.success() || code == 0 {
        return Err(format!(
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((code, body.to_string()))
}

/// The loopback ports a meshd listens on.
#[derive(Debug, Clone, Copy)]
pub struct MeshdPorts {
    pub xds: u16,
    pub xds_tls: u16,
    pub debug: u16,
    pub webhook: u16,
}

impl MeshdPorts {
    pub fn free() -> MeshdPorts {
        MeshdPorts {
            xds: free_port(),
            xds_tls: free_port(),
            debug: free_port(),
            webhook: free_port(),
        }
    }
}

/// A running `meshd serve` on free loopback ports.
pub struct Meshd {
    pub proc: Proc,
    pub xds_port: u16,
    pub xds_tls_port: u16,
    pub debug_port: u16,
    pub webhook_port: u16,
}

impl Meshd {
    pub fn start(config_dir: &Path, work: &Path) -> Meshd {
        Meshd::start_with(config_dir, work, MeshdPorts::free(), &[])
    }

    /// Starts meshd on `ports` with extra `serve` flags.
    pub fn start_with(config_dir: &Path, work: &Path, ports: MeshdPorts, extra: &[&str]) -> Meshd {
        let mut cmd = Command::new(meshd_bin());
        cmd.arg("serve").arg("--config-dir").arg(config_dir);
        let m = Meshd::launch(cmd, work, ports, extra);
        m.wait_ready();
        m
    }

    /// Starts `meshd serve --kube` on the cluster `kubeconfig` names and
    /// returns once its debug port answers, ready or not.
    pub fn start_kube(kubeconfig: &Path, work: &Path, extra: &[&str]) -> Meshd {
        let mut cmd = Command::new(meshd_bin());
        cmd.arg("serve").arg("--kube").env("KUBECONFIG", kubeconfig);
        let m = Meshd::launch(cmd, work, MeshdPorts::free(), extra);
        eventually("meshd's debug port", Duration::from_secs(20), || {
            m.get("/ready").map_err(|e| format!("{e}\n{}", m.proc.log_tail()))
        });
        m
    }

    fn launch(mut cmd: Command, work: &Path, ports: MeshdPorts, extra: &[&str]) -> Meshd {
        let proc = spawn(
            cmd.args(["--xds-addr", &format!("127.0.0.1:{}", ports.xds)])
                .args(["--xds-tls-addr", &format!("127.0.0.1:{}", ports.xds_tls)])
                .args(["--debug-addr", &format!("127.0.0.1:{}", ports.debug)])
                .args(["--webhook-addr", &format!("127.0.0.1:{}", ports.webhook)])
                .args(extra),
            work.join(format!("meshd-{}-{}.log", ports.xds, std::process::id())),
        );
        Meshd {
            proc,
            xds_port: ports.xds,
            xds_tls_port: ports.xds_tls,
            debug_port: ports.debug,
            webhook_port: ports.webhook,
        }
    }

    /// Waits until `/ready` answers 200.
    pub fn wait_ready(&self) {
        eventually("meshd /ready", Duration::from_secs(20), || {
            match self.get("/ready") {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}\n{}", self.proc.log_tail())),
            }
        });
    }

    /// GET a debug path with curl.
    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        curl(&[&format!("http://127.0.0.1:{}{path}", self.debug_port)])
    }

    /// GET a debug path that answers JSON.
    pub fn json(&self, path: &str) -> serde_json::Value {
        let (code, body) = self.get(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }
}

/// `meshd` with these arguments, to completion.
pub fn meshd(args: &[&str]) -> Output {
    Command::new(meshd_bin())
        .args(args)
        .output()
        .expect("running meshd")
}

/// Who an Envoy is: what `meshd bootstrap` is told.
pub struct Pod<'a> {
    pub role: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub labels: &'a str,
    pub delta: bool,
}

impl Pod<'_> {
    /// An ingress gateway replica, as Istio's chart labels it.
    pub fn ingress_gateway(name: &str) -> Pod<'_> {
        Pod {
            role: "gateway",
            name,
            namespace: "istio-system",
            labels: "istio=ingressgateway",
            delta: false,
        }
    }
}

/// A stock Envoy started from `meshd bootstrap`.
pub struct Envoy {
    pub proc: Proc,
    pub admin_port: u16,
    pub node_id: String,
}

impl Envoy {
    /// Starts Envoy for `pod` against `meshd` and waits for its admin /ready.
    pub fn start(control: &Meshd, work: &Path, pod: &Pod<'_>) -> Envoy {
        Envoy::start_with_bootstrap_args(control, work, pod, &[])
    }

    /// As `start`, with extra `meshd bootstrap` flags; an `--xds-addr` among
    /// them replaces meshd's plain port.
    pub fn start_with_bootstrap_args(control: &Meshd, work: &Path, pod: &Pod<'_>, extra: &[&str]) -> Envoy {
        let admin_port = free_port();
        let bootstrap = work.join(format!("envoy-{admin_port}.yaml"));
        let xds = match extra.iter().position(|a| *a == "--xds-addr") {
            Some(i) => extra.get(i + 1).map(|a| a.to_string()).unwrap_or_default(),
            None => format!("127.0.0.1:{}", control.xds_port),
        };
        let admin = format!("127.0.0.1:{admin_port}");
        let path = bootstrap.display().to_string();
        let mut args = vec![
            "bootstrap",
            "--role",
            pod.role,
            "--name",
            pod.name,
            "--namespace",
            pod.namespace,
            "--labels",
            pod.labels,
            "--xds-addr",
            &xds,
            "--admin-addr",
            &admin,
            "-o",
            &path,
        ];
        if pod.delta {
            args.push("--delta");
        }
        let mut rest = extra.iter();
        while let Some(arg) = rest.next() {
            if *arg == "--xds-addr" {
                rest.next();
            } else {
                args.push(arg);
            }
        }
        let out = meshd(&args);
        assert!(
            out.status.success(),
            "meshd bootstrap: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let proc = spawn(
            Command::new(envoy_bin())
                .arg("-c")
                .arg(&bootstrap)
                // Envoys on one machine need distinct shared-memory ids.
                .args(["--base-id", &admin_port.to_string()])
                .args(["-l", "info"]),
            work.join(format!("envoy-{admin_port}.log")),
        );
        let role = if pod.role == "gateway" { "router" } else { pod.role };
        let envoy = Envoy {
            proc,
            admin_port,
            node_id: format!(
                "{role}~127.0.0.1~{}.{ns}~{ns}.svc.cluster.local",
                pod.name,
                ns = pod.namespace
            ),
        };
        eventually("envoy admin /ready", Duration::from_secs(30), || {
            match envoy.admin("/ready") {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}\n{}", envoy.proc.log_tail())),
            }
        });
        envoy
    }

    /// GET an admin path.
    /// Whether the Envoy's own route configuration (its admin config
    /// dump) holds `text`.
    pub fn holds_route(&self, text: &str) -> bool {
        self.admin("/config_dump?resource=dynamic_route_configs")
            .is_ok_and(|(code, body)| code == 200 && body.contains(text))
    }

    pub fn admin(&self, path: &str) -> Result<(u16, String), String> {
        curl(&[&format!("http://127.0.0.1:{}{path}", self.admin_port)])
    }
}

/// Serves the router `app(port)` makes on a loopback `ip`, on its own
/// thread and runtime, until the returned sender is dropped.
pub fn serve_http(
    ip: &str,
    app: impl FnOnce(u16) -> axum::Router + Send + 'static,
) -> (u16, tokio::sync::oneshot::Sender<()>) {
    serve_on_thread(ip, move |listener, port, stopped| async move {
        let _ = axum::serve(listener, app(port))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    })
}

/// Runs the server `serve(listener, port, stopped)` makes on a loopback
/// `ip`, on its own thread and runtime; it should end once `stopped`
/// resolves, which it does when the returned sender is dropped.
pub fn serve_on_thread<F>(
    ip: &str,
    serve: impl FnOnce(tokio::net::TcpListener, u16, tokio::sync::oneshot::Receiver<()>) -> F + Send + 'static,
) -> (u16, tokio::sync::oneshot::Sender<()>)
where
    F: std::future::Future<Output = ()>,
{
    let listener = std::net::TcpListener::bind(format!("{ip}:0")).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            serve(listener, port, rx).await;
        });
    });
    (port, tx)
}

/// A gRPC authorizer (`envoy.service.auth.v3.Authorization`) on a loopback
/// port: answers OK while `allow` is set, PERMISSION_DENIED otherwise, and
/// keeps the destination port of each check.
pub struct GrpcAuthorizer {
    pub port: u16,
    pub allow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    checked_ports: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Decide {
    allow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    checked_ports: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
}

#[tonic::async_trait]
impl envoy_types::ext_authz::v3::pb::Authorization for Decide {
    async fn check(
        &self,
        request: tonic::Request<envoy_types::ext_authz::v3::pb::CheckRequest>,
    ) -> Result<tonic::Response<envoy_types::ext_authz::v3::pb::CheckResponse>, tonic::Status> {
        use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
        let port = request
            .get_ref()
            .attributes
            .as_ref()
            .and_then(|a| a.destination.as_ref())
            .and_then(|d| d.address.as_ref())
            .and_then(|a| match &a.address {
                Some(address::Address::SocketAddress(s)) => match s.port_specifier {
                    Some(socket_address::PortSpecifier::PortValue(p)) => Some(p),
                    _ => None,
                },
                _ => None,
            })
            .unwrap_or_default();
        self.checked_ports.lock().expect("ports").push(port);
        let allow = self.allow.load(std::sync::atomic::Ordering::SeqCst);
        Ok(tonic::Response::new(
            envoy_types::ext_authz::v3::pb::CheckResponse {
                status: Some(envoy_types::pb::google::rpc::Status {
                    code: if allow {
                        0
                    } else {
                        tonic::Code::PermissionDenied as i32
                    },
                    ..Default::default()
                }),
                ..Default::default()
            },
        ))
    }
}

impl GrpcAuthorizer {
    pub fn start() -> GrpcAuthorizer {
        let allow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checked_ports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let decide = Decide {
            allow: allow.clone(),
            checked_ports: checked_ports.clone(),
        };
        let (port, stop) = serve_on_thread("127.0.0.1", move |listener, _, stopped| async move {
            let _ = tonic::transport::Server::builder()
                .add_service(envoy_types::ext_authz::v3::pb::AuthorizationServer::new(decide))
                .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        GrpcAuthorizer {
            port,
            allow,
            checked_ports,
            _stop: stop,
        }
    }

    pub fn checks_of(&self, port: u16) -> usize {
        let ports = self.checked_ports.lock().expect("ports");
        ports.iter().filter(|&&p| p == u32::from(port)).count()
    }
}

/// A real HTTP backend answering like the seed's hello-app, on its own
/// thread and runtime.
pub struct Backend {
    pub port: u16,
    /// Requests received.
    pub hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// While set, every request is answered 503.
    pub failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Backend {
    pub fn start(version: &'static str) -> Backend {
        Backend::start_at("127.0.0.1", version, false)
    }

    /// A backend on a loopback `ip`; `flaky` answers every other request 503.
    pub fn start_at(ip: &str, version: &'static str, flaky: bool) -> Backend {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let hits = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let down = failing.clone();
        let (port, tx) = serve_http(ip, move |port| {
            axum::Router::new().fallback(move || {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let down = down.load(Ordering::SeqCst);
                async move {
                    let status = if down || (flaky && n % 2 == 0) {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        axum::http::StatusCode::OK
                    };
                    (
                        status,
                        format!("Hello, world!\nVersion: {version}\nHostname: backend-{port}\n"),
                    )
                }
            })
        });
        Backend {
            port,
            hits,
            failing,
            _shutdown: tx,
        }
    }
}

/// A Service `name` whose `port` (named `port_name`) reaches one endpoint,
/// 127.0.0.1:`backend`: YAML documents ending in `---`.
pub fn loopback_service(name: &str, port_name: &str, port: u16, backend: u16) -> String {
    namespaced_service("default", name, port_name, port, backend)
}

/// `loopback_service` in `namespace`.
pub fn namespaced_service(namespace: &str, name: &str, port_name: &str, port: u16, backend: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  ports: [{{name: {port_name}, port: {port}, targetPort: {backend}}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: {name}, namespace: {namespace}}}
subsets:
- addresses: [{{ip: 127.0.0.1}}]
  ports: [{{name: {port_name}, port: {backend}}}]
---
"#
    )
}

/// The ingress gateway's Service (port 80 to `port`, where the gateway
/// Envoy listens) and a Gateway for every host on it: YAML documents ending
/// in `---`.
pub fn ingress_gateway(port: u16) -> String {
    ingress_gateway_with_tcp(port, None)
}

/// As `ingress_gateway`, with a TCP server on 31400 too (Istio's sample
/// TCP port) when `tcp` names the port the gateway Envoy listens on for it.
pub fn ingress_gateway_with_tcp(port: u16, tcp: Option<u16>) -> String {
    let (tcp_port, tcp_server) = match tcp {
        Some(tcp) => (
            format!("\n  - {{name: tcp, port: 31400, targetPort: {tcp}}}"),
            "\n  - port: {number: 31400, name: tcp, protocol: TCP}\n    hosts: [\"*\"]",
        ),
        None => (String::new(), ""),
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: istio-ingressgateway, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  ports:
  - {{name: http2, port: 80, targetPort: {port}}}{tcp_port}
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {{name: ingressgateway, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: ["*"]{tcp_server}
---
"#
    )
}

/// The VirtualService `hello` on the ingress gateway: every request to
/// The ingress gateway on `port` in front of a `hello` service on a
/// loopback backend port, routed by `hello_virtual_service(version)`.
pub fn hello_mesh(port: u16, backend: u16, version: &str) -> String {
    format!(
        "{}{}{}",
        ingress_gateway(port),
        loopback_service("hello", "http", 80, backend),
        hello_virtual_service(version, None)
    )
}

/// hello.example.com goes to `hello` with header `x-config-version:
/// VERSION`, and with `uri_regex` a first route matching it.
pub fn hello_virtual_service(version: &str, uri_regex: Option<&str>) -> String {
    let matching = uri_regex
        .map(|re| format!("  - match:\n    - uri: {{regex: \"{re}\"}}\n    route:\n    - destination: {{host: hello}}\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: hello}}
spec:
  hosts: [hello.example.com]
  gateways: [istio-system/ingressgateway]
  http:
{matching}  - route:
    - destination: {{host: hello}}
    headers:
      request:
        set: {{x-config-version: {version}}}
"#
    )
}

/// Writes a file, creating its directory.
pub fn write(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    // Write to a temp name and rename so the watcher never sees half a file.
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// An `openssl s_client` connection kept open, to send requests on later.
pub struct OpenConnection {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl OpenConnection {
    /// Connects to 127.0.0.1:`port` with these extra `s_client` flags.
    pub fn open(port: u16, flags: &[&str]) -> OpenConnection {
        use std::io::BufRead;
        let mut child = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-quiet"])
            .args(flags)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_client");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        OpenConnection { child, lines }
    }

    /// Sends a GET for `host` on the open connection; true when Hello,
    /// world! comes back.
    pub fn get(&mut self, host: &str) -> bool {
        use std::io::Write;
        let Some(stdin) = self.child.stdin.as_mut() else {
            return false;
        };
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        if stdin
            .write_all(req.as_bytes())
            .and_then(|_| stdin.flush())
            .is_err()
        {
            return false;
        }
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            if line.contains("Hello, world!") {
                return true;
            }
        }
        false
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts a command succeeded; returns its stdout.
pub fn succeeded(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `openssl ARGS` in `dir`, which must succeed; returns its stdout.
/// `openssl s_server -www` on `port` with `NAME.crt` and `NAME.key` of
/// `dir`: a TLS server that answers an HTTP GET with a page about the
/// session (it contains "s_server").
pub fn s_server(dir: &Path, port: u16, name: &str) -> Proc {
    let log = dir.join(format!("s_server-{port}.log"));
    let child = Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            &port.to_string(),
            "-cert",
            &format!("{name}.crt"),
            "-key",
            &format!("{name}.key"),
            "-www",
            "-quiet",
        ])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_server");
    Proc { child, log }
}

/// A self-signed certificate for `host` (EC P-256, a day): `NAME.crt` and
/// `NAME.key` in `dir`.
pub fn self_signed(dir: &Path, name: &str, host: &str) {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    let (subject, san) = (format!("/CN={host}"), format!("subjectAltName=DNS:{host}"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "1",
            "-subj",
            &subject,
            "-addext",
            &san,
        ],
    );
}

/// A `kubernetes.io/tls` Secret `namespace/name` with a certificate for
/// `host` that `self_signed` makes as `name` in `dir`: YAML.
pub fn tls_secret(dir: &Path, namespace: &str, name: &str, host: &str) -> String {
    self_signed(dir, name, host);
    secret_of(dir, namespace, name)
}

/// The `kubernetes.io/tls` Secret `namespace/name` of `NAME.crt` and
/// `NAME.key` in `dir`, as a YAML document.
pub fn secret_of(dir: &Path, namespace: &str, name: &str) -> String {
    use base64::Engine;
    let b64 = |ext: &str| {
        let pem = std::fs::read(dir.join(format!("{name}.{ext}"))).expect("pem");
        base64::engine::general_purpose::STANDARD.encode(pem)
    };
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {namespace}}}\ntype: kubernetes.io/tls\n\
         data: {{tls.crt: {}, tls.key: {}}}\n",
        b64("crt"),
        b64("key")
    )
}

pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl");
    succeeded(out, &format!("openssl {args:?}"))
}
