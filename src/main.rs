//! The `meshd` command line. Exit codes: 0 success, 1 failure with a
//! one-line reason on stderr, 2 usage errors (clap's own).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use meshd::bootstrap::{bootstrap, parse_labels, BootstrapOptions, XdsTls};
use meshd::config::{ConfigSnapshot, FileLoad};
use meshd::serve::{self, ServeOptions};

#[derive(Debug, Parser)]
#[command(
    name = "meshd",
    version,
    about = "An Istio-compatible xDS control plane for stock Envoy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve xDS to Envoy proxies from a config directory (or the demo).
    Serve(ServeArgs),
    /// Print an Envoy bootstrap that connects a stock Envoy to meshd.
    Bootstrap {
        /// gateway or sidecar.
        #[arg(long)]
        role: String,
        /// Pod name.
        #[arg(long)]
        name: String,
        #[arg(long)]
        namespace: String,
        /// Pod labels, k=v,k2=v2.
        #[arg(long, default_value = "")]
        labels: String,
        #[arg(long, default_value = "default")]
        service_account: String,
        /// The proxy's IP (node id and INSTANCE_IPS).
        #[arg(long, default_value = "127.0.0.1")]
        ip: String,
        /// meshd's xDS address.
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds_addr: String,
        /// Envoy's admin listener.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin_addr: String,
        /// Serve Envoy's stats for Prometheus (`/stats/prometheus`) here,
        /// as Istio's proxies do on 0.0.0.0:15090 (injected sidecars do).
        #[arg(long)]
        stats_addr: Option<String>,
        /// Use incremental (delta) xDS.
        #[arg(long)]
        delta: bool,
        /// REDIRECT (traffic captured by `meshd iptables`) or NONE (no
        /// capture: the app calls the listeners a Sidecar resource binds).
        #[arg(long, default_value = "REDIRECT", value_parser = ["REDIRECT", "TPROXY", "NONE"])]
        interception_mode: String,
        /// The proxy's locality, REGION/ZONE/SUBZONE (Envoy's node
        /// locality), for locality-aware load balancing.
        #[arg(long, default_value = "")]
        locality: String,
        /// Connect to meshd's TLS port (give it as --xds-addr), trusting
        /// the root in --root-cert.
        #[arg(long, requires = "root_cert")]
        xds_tls: bool,
        /// meshd's root certificate (root-cert.pem), as a path Envoy reads.
        #[arg(long)]
        root_cert: Option<String>,
        /// The name meshd's serving certificate is checked for.
        #[arg(long, default_value = "meshd.istio-system.svc")]
        xds_server_name: String,
        /// A service-account token file; its token authenticates the proxy.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// A client certificate chain issued by meshd (path Envoy reads),
        /// to authenticate with instead of a token.
        #[arg(long, requires_all = ["client_key", "xds_tls"])]
        client_cert: Option<String>,
        /// The key of --client-cert (path Envoy reads).
        #[arg(long, requires = "client_cert")]
        client_key: Option<String>,
        /// A rewritten HTTP probe the sidecar answers on 15021:
        /// PATH=PORT/TARGET_PATH (repeatable; `meshd inject` writes these).
        #[arg(long)]
        probe: Vec<meshd::bootstrap::ProbeRewrite>,
        /// Write to FILE instead of stdout.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Check config files with Istio's analyzers; non-zero exit on findings.
    Analyze {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// `text`, or `json` (a list of {level, code, resource, origin, message}).
        #[arg(short, long, value_enum, default_value = "text")]
        output: AnalyzeFormat,
        /// Leave out findings: CODE=RESOURCE, RESOURCE as findings name it
        /// (`Kind namespace/name`), `*` matching anything
        /// (`IST0104=Gateway istio-system/*`). Repeatable.
        #[arg(short = 'S', long)]
        suppress: Vec<meshd::analyze::Suppression>,
    },
    /// The certificate authority: make or import a root, inspect it, issue
    /// a workload certificate to files.
    Ca {
        #[command(subcommand)]
        what: CaCommand,
    },
    /// Drive a meshd with simulated proxies and measure a config change:
    /// initial sync, per-client convergence, what was pushed, meshd's CPU
    /// and memory.
    Loadgen(LoadgenArgs),
    /// Add a stock Envoy sidecar to the Pods and workloads in FILE (like
    /// `istioctl kube-inject`); writes the result to stdout or -o.
    Inject {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Stock Envoy image for the istio-proxy container.
        #[arg(long, default_value = "envoyproxy/envoy:v1.40.0")]
        proxy_image: String,
        /// Image with the meshd binary, a shell and iptables, for the
        /// istio-init container (the Dockerfile's `init` target).
        #[arg(long, default_value = "meshd-init:latest")]
        meshd_image: String,
        /// meshd's TLS xDS address as pods reach it.
        #[arg(long, default_value = "meshd.istio-system.svc:15012")]
        xds_addr: String,
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Install the sidecar's traffic capture rules in the current network
    /// namespace (Istio's istio-iptables defaults; run as the pod's init).
    Iptables {
        /// Envoy's outbound capture port.
        #[arg(long, default_value_t = 15001)]
        proxy_port: u16,
        /// Envoy's inbound capture port.
        #[arg(long, default_value_t = 15006)]
        inbound_capture_port: u16,
        /// The proxy's uid: its own traffic is never captured.
        #[arg(long, default_value_t = 1337)]
        proxy_uid: u32,
        /// The proxy's gid: its own traffic is never captured.
        #[arg(long, default_value_t = 1337)]
        proxy_gid: u32,
        /// Inbound ports not captured (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "15090,15021,15020")]
        exclude_inbound_ports: Vec<u16>,
        /// Outbound ports not captured (comma-separated).
        #[arg(long, value_delimiter = ',')]
        exclude_outbound_ports: Vec<u16>,
        /// Outbound destinations not captured (CIDRs, comma-separated).
        #[arg(long, value_delimiter = ',')]
        exclude_outbound_cidrs: Vec<String>,
        /// Print the rules (iptables-restore format) instead of installing them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print what a running meshd serves (a client of its debug endpoints).
    Dump {
        #[arg(long, default_value = "127.0.0.1:15014")]
        debug_addr: SocketAddr,
        #[command(subcommand)]
        what: DumpWhat,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Directory of Kubernetes/Istio YAML or JSON, watched for changes.
    /// Without it (and without --kube) the embedded demo config is served.
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// Watch a Kubernetes cluster instead of a directory: in-cluster
    /// config, or KUBECONFIG (~/.kube/config) outside a cluster.
    #[arg(long, conflicts_with = "config_dir")]
    kube: bool,
    /// With --kube, read only namespaces whose labels match (repeatable; any
    /// match admits), as Istio's discoverySelectors: `env=prod,team=a` or a
    /// LabelSelector such as `{matchExpressions: [{key: env, operator: In,
    /// values: [prod]}]}`.
    #[arg(long = "discovery-selector", value_parser = meshd::source::parse_selector, requires = "kube")]
    discovery_selectors: Vec<kube::core::Selector>,
    /// Istio's mesh config (YAML: a MeshConfig, or the `istio` ConfigMap
    /// holding one under data.mesh); meshd reads its extensionProviders
    /// (envoyExtAuthzHttp, envoyExtAuthzGrpc) for CUSTOM AuthorizationPolicies.
    #[arg(long)]
    mesh_config: Option<PathBuf>,
    /// With --kube, write what the analyzers find into the status of Istio
    /// resources (`status.validationMessages`), as istiod does with
    /// PILOT_ENABLE_ANALYSIS. Gateway API status is always written.
    #[arg(long, requires = "kube")]
    write_analysis_status: bool,
    /// gRPC ADS listen address (plain text, for development and closed networks).
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds_addr: SocketAddr,
    /// TLS ADS and CA listen address; callers authenticate with a client
    /// certificate issued by meshd or a service-account token.
    #[arg(long, default_value = "127.0.0.1:15012")]
    xds_tls_addr: SocketAddr,
    /// Names in meshd's serving certificate for the TLS port (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "meshd.istio-system.svc,localhost,127.0.0.1"
    )]
    xds_dns_names: Vec<String>,
    /// Debug HTTP listen address (/ready, /debug/..., /metrics). They answer
    /// without authentication: keep it on loopback, or expect a warning.
    #[arg(long, default_value = "127.0.0.1:15014")]
    debug_addr: SocketAddr,
    /// Where the CA keeps its root (made on first start, or plugged in).
    /// Without it the root lives in memory and changes at every restart;
    /// with --kube, in the Secret istio-ca-secret (or a plugged-in cacerts)
    /// of --system-namespace, shared by every replica.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// With --kube: meshd's own namespace (its CA Secret and Lease); in a
    /// pod, pass the downward API's namespace.
    #[arg(long, default_value = "istio-system")]
    system_namespace: String,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Validity of workload certificates; they are renewed at half of it.
    #[arg(long, default_value = "24h", value_parser = parse_validity)]
    workload_cert_ttl: std::time::Duration,
    /// Public key (PEM, RSA or EC) that service-account tokens are signed with.
    #[arg(long)]
    token_key: Option<PathBuf>,
    /// Audience service-account tokens must carry.
    #[arg(long, default_value = "istio-ca")]
    token_audience: String,
    /// On the plain port, issue workload certificates for the identity the
    /// node metadata claims, unauthenticated. Never on a shared network.
    #[arg(long)]
    insecure_plaintext_identity: bool,
    /// HTTPS address of the sidecar injection webhook (`POST /inject`,
    /// AdmissionReview in, JSON patch out), like istiod's 15017.
    #[arg(long, default_value = "127.0.0.1:15017")]
    webhook_addr: SocketAddr,
    /// Serve a config change once the directory has been quiet this long.
    #[arg(long, default_value = "100ms", value_parser = parse_validity)]
    debounce_after: std::time::Duration,
    /// ... but never later than this after the first change.
    #[arg(long, default_value = "1s", value_parser = parse_validity)]
    debounce_max: std::time::Duration,
    /// A change to endpoints alone is served after this much quiet (istiod
    /// debounces endpoints like the rest unless PILOT_ENABLE_EDS_DEBOUNCE is
    /// off). At --debounce-after or above, endpoints wait like the rest.
    #[arg(long, default_value = "10ms", value_parser = parse_validity)]
    debounce_endpoints: std::time::Duration,
    /// Log lines as `text` or `json` (one object per line: timestamp,
    /// level, target, fields).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// What to log, in RUST_LOG syntax: a level, or per module
    /// (`info,meshd::xds=debug`). Without it, RUST_LOG, else `info`.
    #[arg(long)]
    log_level: Option<String>,
    /// Streams computing a push at once; a newer push replaces a queued
    /// older one per stream, so a slow proxy delays no other.
    #[arg(long, default_value_t = meshd::xds::server::DEFAULT_CONCURRENT_PUSHES)]
    max_concurrent_pushes: usize,
    /// ADS streams open at once, over all clients; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 100_000)]
    max_streams: usize,
    /// Resource names one request may carry; a request with more ends its
    /// stream with INVALID_ARGUMENT.
    #[arg(long, default_value_t = 100_000)]
    max_resource_names: usize,
    /// Requests a second one stream may send on average (bursts of
    /// --request-burst); a stream over it is ended with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1_000)]
    max_requests_per_second: u32,
    #[arg(long, default_value_t = 5_000)]
    request_burst: u32,
}

#[derive(Debug, clap::Args)]
struct LoadgenArgs {
    /// Soak: endpoint churn for this long before the change (`30m`), with
    /// meshd's memory sampled every second; the report gains `soak`.
    #[arg(long, value_parser = parse_validity)]
    soak: Option<std::time::Duration>,
    /// Endpoint changes a second during the soak.
    #[arg(long, default_value_t = 100, requires = "soak")]
    churn_rate: u32,
    /// Services in the synthetic mesh.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Endpoints per service.
    #[arg(long, default_value_t = 2)]
    endpoints: usize,
    /// Simulated proxies (client 0 is an ingress gateway, the rest sidecars).
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// The scripted change.
    #[arg(long, value_enum, default_value = "endpoint")]
    change: meshd::loadgen::Change,
    /// VirtualServices (each routes one service, on the mesh and the gateway).
    #[arg(long, default_value_t = 100)]
    virtual_services: usize,
    /// Namespaces the services and sidecars are spread over.
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    /// A Sidecar per namespace limiting its sidecars to their namespace.
    #[arg(long)]
    sidecar_scoping: bool,
    /// Incremental (delta) xDS instead of state of the world.
    #[arg(long)]
    delta: bool,
    /// Also fan the same responses out from a transport-only server.
    #[arg(long)]
    baseline: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Use a running meshd's plain xDS address instead of starting one;
    /// needs --config-dir, the directory it watches.
    #[arg(long, requires = "config_dir")]
    xds_addr: Option<String>,
    /// Where to write the mesh (default: a temporary directory).
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// The running meshd's process id, for its CPU and memory.
    #[arg(long)]
    meshd_pid: Option<u32>,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Make a self-signed root in DIR, or check the plugged-in files there
    /// (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem).
    Init {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Show the chain from the signing certificate to the root.
    Inspect {
        #[arg(long)]
        ca_dir: PathBuf,
    },
    /// Issue a workload certificate for spiffe://TD/ns/NS/sa/SA to files:
    /// cert-chain.pem, key.pem and root-cert.pem in --out-dir.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long)]
        namespace: String,
        #[arg(long, default_value = "default")]
        service_account: String,
        /// Validity, like 24h, 30m, 90s.
        #[arg(long, default_value = "24h", value_parser = parse_validity)]
        validity: std::time::Duration,
        #[arg(long)]
        out_dir: PathBuf,
    },
}

fn parse_validity(s: &str) -> Result<std::time::Duration, String> {
    meshd::config::parse_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?} is not a duration like 24h, 30m or 90s"))
}

#[derive(Debug, Subcommand)]
enum DumpWhat {
    /// Connected proxies and the sync state of each type, like `istioctl
    /// proxy-status`: SYNCED (acked), STALE (sent, not acked yet), NACK,
    /// NOT SENT.
    Proxies {
        #[arg(short, long, value_enum, default_value = "table")]
        output: DumpFormat,
    },
    /// Connected proxies and their sync state (/debug/syncz, JSON).
    Syncz,
    /// Loaded and rejected config (/debug/configz).
    Configz,
    /// What one proxy was sent: a table of its resources, or Envoy's config
    /// dump as JSON/YAML; `--type` (repeatable) keeps clusters, endpoints,
    /// listeners, routes or secrets only.
    Config {
        proxy: String,
        #[arg(long = "type", value_parser = ["clusters", "endpoints", "listeners", "routes", "secrets", "cds", "eds", "lds", "rds", "sds"])]
        types: Vec<String>,
        #[arg(short, long, value_enum, default_value = "json")]
        output: DumpFormat,
    },
    /// Services, ports and endpoints (/debug/registryz).
    Registry,
    /// The last pushes: trigger, proxies, duration (/debug/push_status).
    Pushes,
    /// Certificates issued, by identity (/debug/certz).
    Certs,
    /// The mutual TLS in force for one proxy (/debug/authenticationz).
    Authn { proxy: String },
    /// Which virtual host and route a request would take through each
    /// route configuration PROXY was sent, or why it would get a 404.
    Routes {
        proxy: String,
        /// The request's Host (`:authority`).
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// A request header, `name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
    },
    /// Compares what meshd sent PROXY with what that Envoy holds (its admin
    /// `/config_dump`): clusters, listeners and routes. Exits 1 when they
    /// differ.
    Diff {
        proxy: String,
        /// The Envoy's admin address.
        #[arg(long)]
        admin: SocketAddr,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DumpFormat {
    Table,
    Json,
    Yaml,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(a) => {
            init_logging(a.log_format, a.log_level.as_deref())?;
            let opts = ServeOptions {
                config_dir: a.config_dir,
                kube: a.kube,
                discovery_selectors: a.discovery_selectors,
                write_analysis_status: a.write_analysis_status,
                xds_addr: a.xds_addr,
                xds_tls_addr: a.xds_tls_addr,
                xds_dns_names: a.xds_dns_names,
                debug_addr: a.debug_addr,
                ca_dir: a.ca_dir,
                system_namespace: a.system_namespace,
                trust_domain: a.trust_domain,
                workload_cert_ttl: a.workload_cert_ttl,
                token_key: a.token_key,
                token_audience: a.token_audience,
                insecure_plaintext_identity: a.insecure_plaintext_identity,
                webhook_addr: a.webhook_addr,
                debounce: meshd::source::Debounce {
                    quiet: a.debounce_after,
                    max: a.debounce_max,
                    endpoints: a.debounce_endpoints,
                },
                max_concurrent_pushes: a.max_concurrent_pushes,
                limits: meshd::xds::Limits {
                    max_streams: a.max_streams,
                    max_names: a.max_resource_names,
                    requests_per_second: a.max_requests_per_second,
                    request_burst: a.request_burst,
                },
                mesh: std::sync::Arc::new(match &a.mesh_config {
                    Some(path) => meshd::config::mesh::MeshConfig::load(path)
                        .map_err(|e| anyhow::anyhow!("--mesh-config {e}"))?,
                    None => Default::default(),
                }),
            };
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            rt.block_on(serve::run(opts, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bootstrap {
            role,
            name,
            namespace,
            labels,
            service_account,
            ip,
            xds_addr,
            admin_addr,
            stats_addr,
            delta,
            interception_mode,
            locality,
            xds_tls,
            root_cert,
            xds_server_name,
            token_file,
            client_cert,
            client_key,
            probe,
            output,
        } => {
            let token = match token_file {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("--token-file {}", path.display()))?,
                ),
                None => None,
            };
            let tls = match (xds_tls, root_cert) {
                (true, Some(root_cert)) => Some(XdsTls {
                    root_cert,
                    server_name: xds_server_name,
                    client_cert: client_cert.zip(client_key),
                }),
                _ => None,
            };
            let opts = BootstrapOptions {
                role,
                name,
                namespace,
                labels: parse_labels(&labels).map_err(|e| anyhow!("--labels: {e}"))?,
                service_account,
                ip,
                xds_addr,
                admin_addr,
                stats_addr,
                delta,
                tls,
                token,
                probes: probe,
                interception_mode,
                locality,
            };
            let text = serde_norway::to_string(&bootstrap(&opts)?)?;
            match output {
                Some(path) => {
                    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?
                }
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Analyze {
            paths,
            output,
            suppress,
        } => analyze(&paths, output, &suppress),
        Command::Loadgen(a) => {
            let o = meshd::loadgen::Options {
                mesh: meshd::loadgen::MeshSpec {
                    services: a.services,
                    endpoints: a.endpoints,
                    virtual_services: a.virtual_services,
                    namespaces: a.namespaces,
                    sidecar_scoping: a.sidecar_scoping,
                },
                clients: a.clients,
                change: a.change,
                delta: a.delta,
                baseline: a.baseline,
                xds_addr: a.xds_addr,
                config_dir: a.config_dir,
                meshd_pid: a.meshd_pid,
                meshd_bin: std::env::current_exe().context("finding the meshd binary")?,
                soak: a.soak.map(|duration| meshd::loadgen::Soak {
                    duration,
                    rate: a.churn_rate,
                }),
            };
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let report = rt.block_on(meshd::loadgen::run(&o))?;
            if a.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca { what } => ca(what),
        Command::Inject {
            file,
            proxy_image,
            meshd_image,
            xds_addr,
            output,
        } => {
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let o = meshd::inject::InjectOptions {
                proxy_image,
                meshd_image,
                xds_addr,
            };
            let injected =
                meshd::inject::inject_yaml(&text, &o).with_context(|| file.display().to_string())?;
            match output {
                Some(path) => {
                    std::fs::write(&path, injected).with_context(|| format!("writing {}", path.display()))?
                }
                None => print!("{injected}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Iptables {
            proxy_port,
            inbound_capture_port,
            proxy_uid,
            proxy_gid,
            exclude_inbound_ports,
            exclude_outbound_ports,
            exclude_outbound_cidrs,
            dry_run,
        } => {
            let o = meshd::capture::CaptureOptions {
                outbound_port: proxy_port,
                inbound_port: inbound_capture_port,
                proxy_uid,
                proxy_gid,
                exclude_inbound_ports,
                exclude_outbound_ports,
                exclude_outbound_cidrs,
            };
            if dry_run {
                print!("{}", meshd::capture::rules(&o));
            } else {
                meshd::capture::install(&o)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dump { debug_addr, what } => dump(debug_addr, what),
    }
}

fn dump(debug_addr: SocketAddr, what: DumpWhat) -> Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    let get = |addr: SocketAddr, path: &str| rt.block_on(http_get(addr, path));
    let json = |text: &str| -> Result<serde_json::Value> { Ok(serde_json::from_str(text)?) };
    let path = match what {
        DumpWhat::Proxies { output } => {
            let syncz = json(&get(debug_addr, "/debug/syncz")?)?;
            match output {
                DumpFormat::Table => print!("{}", meshd::debug::dump::proxies_table(&syncz)),
                DumpFormat::Json => println!("{}", serde_json::to_string_pretty(&syncz)?),
                DumpFormat::Yaml => print!("{}", serde_norway::to_string(&syncz)?),
            }
            return Ok(ExitCode::SUCCESS);
        }
        DumpWhat::Diff { proxy, admin } => {
            let sent = json(&get(
                debug_addr,
                &format!("/debug/config_dump?proxy={}", encode_query(&proxy)),
            )?)?;
            let held = json(
                &get(admin, "/config_dump")
                    .with_context(|| format!("reading the Envoy's admin /config_dump at {admin}"))?,
            )?;
            let diff = meshd::debug::dump::diff(&sent, &held).map_err(anyhow::Error::msg)?;
            print!("{diff}");
            return Ok(if diff.in_sync() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        DumpWhat::Routes {
            proxy,
            host,
            path,
            method,
            headers,
        } => {
            let sent = json(&get(
                debug_addr,
                &format!("/debug/config_dump?proxy={}", encode_query(&proxy)),
            )?)?;
            let headers = headers
                .iter()
                .map(|h| match h.split_once(':') {
                    Some((k, v)) => Ok((k.trim().to_ascii_lowercase(), v.trim().to_string())),
                    None => Err(anyhow::anyhow!("-H {h:?}: expected `name: value`")),
                })
                .collect::<Result<Vec<_>>>()?;
            let req = meshd::translate::simulate::Request {
                host,
                path,
                method,
                headers,
            };
            print!(
                "{}",
                meshd::debug::dump::explain_routes(&sent, &req).map_err(anyhow::Error::msg)?
            );
            return Ok(ExitCode::SUCCESS);
        }
        DumpWhat::Syncz => "/debug/syncz".to_string(),
        DumpWhat::Configz => "/debug/configz".to_string(),
        DumpWhat::Config { proxy, types, output } => {
            let mut path = format!("/debug/config_dump?proxy={}", encode_query(&proxy));
            if !types.is_empty() {
                path.push_str(&format!("&types={}", types.join(",")));
            }
            let dump = json(&get(debug_addr, &path)?)?;
            match output {
                DumpFormat::Table => print!("{}", meshd::debug::dump::config_table(&dump)),
                DumpFormat::Json => println!("{}", serde_json::to_string_pretty(&dump)?),
                DumpFormat::Yaml => print!("{}", serde_norway::to_string(&dump)?),
            }
            return Ok(ExitCode::SUCCESS);
        }
        DumpWhat::Registry => "/debug/registryz".to_string(),
        DumpWhat::Pushes => "/debug/push_status".to_string(),
        DumpWhat::Certs => "/debug/certz".to_string(),
        DumpWhat::Authn { proxy } => format!("/debug/authenticationz?proxy={}", encode_query(&proxy)),
    };
    println!("{}", get(debug_addr, &path)?);
    Ok(ExitCode::SUCCESS)
}

fn ca(what: CaCommand) -> Result<ExitCode> {
    use meshd::ca::{load_or_create, SpiffeId};
    match what {
        CaCommand::Init { ca_dir, trust_domain } => {
            let ca = load_or_create(&ca_dir, &trust_domain)?;
            println!("CA ready in {}", ca_dir.display());
            println!("  root fingerprint (SHA-256): {}", ca.root_fingerprint());
            ca.describe().iter().for_each(|l| println!("  {l}"));
        }
        CaCommand::Inspect { ca_dir } => {
            let files = ["ca-cert.pem", "ca-key.pem", "root-cert.pem"];
            if let Some(missing) = files.iter().find(|f| !ca_dir.join(f).exists()) {
                bail!(
                    "{} has no {missing}: run `meshd ca init --ca-dir {}` first",
                    ca_dir.display(),
                    ca_dir.display()
                );
            }
            let ca = load_or_create(&ca_dir, "cluster.local")?;
            ca.describe().iter().for_each(|l| println!("{l}"));
        }
        CaCommand::Issue {
            ca_dir,
            trust_domain,
            namespace,
            service_account,
            validity,
            out_dir,
        } => {
            let ca = load_or_create(&ca_dir, &trust_domain)?;
            let id = SpiffeId::new(&trust_domain, &namespace, &service_account)?;
            let issued = ca.issue(&id, validity)?;
            std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
            let write = |name: &str, text: &str| {
                let path = out_dir.join(name);
                std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
            };
            write("cert-chain.pem", &issued.cert_chain)?;
            write("key.pem", &issued.key)?;
            write("root-cert.pem", ca.root_pem())?;
            println!("issued {id} to {}", out_dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AnalyzeFormat {
    Text,
    Json,
}

fn analyze(
    paths: &[PathBuf],
    output: AnalyzeFormat,
    suppress: &[meshd::analyze::Suppression],
) -> Result<ExitCode> {
    let mut files: Vec<FileLoad> = Vec::new();
    for path in paths {
        if path.is_dir() {
            files.extend(meshd::source::load_dir_named(path, path)?);
        } else {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            files.push(meshd::config::parse_file(&path.display().to_string(), &text));
        }
    }
    let mut findings = meshd::analyze::analyze(&ConfigSnapshot::from_files(files));
    findings.retain(|f| !suppress.iter().any(|s| s.matches(f)));
    if let AnalyzeFormat::Json = output {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    }
    if findings.is_empty() {
        if let AnalyzeFormat::Json = output {
            return Ok(ExitCode::SUCCESS);
        }
        let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        println!(
            "✔ No validation issues found when analyzing {}.",
            shown.join(", ")
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let AnalyzeFormat::Text = output {
        for f in &findings {
            println!("{f}");
        }
    }
    use meshd::analyze::Level;
    let serious = findings
        .iter()
        .filter(|f| matches!(f.level, Level::Error | Level::Warning))
        .count();
    if serious == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    bail!("{serious} error(s) or warning(s)")
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr as `format`, filtered by `level` (RUST_LOG syntax), else
/// by RUST_LOG, else at `info`.
fn init_logging(format: LogFormat, level: Option<&str>) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(level) => EnvFilter::try_new(level).with_context(|| format!("--log-level {level:?}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to meshd's debug endpoint at {addr}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        bail!("{path}: {status}: {}", text.trim());
    }
    Ok(text)
}
