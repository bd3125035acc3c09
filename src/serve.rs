//! `meshd serve`: wires the stages together. A source publishes config
//! generations; each becomes a push context installed in the snapshot
//! cache; the ADS server streams from the cache; the debug server reads it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::analyze::Analysis;
use crate::ca::auth::{Authenticator, TokenReviewer, TokenVerifier};
use crate::ca::service::CertificateService;
use crate::ca::{self, CaError, Issued, WorkloadCa};
use crate::config::{ConfigSnapshot, ConfigStore};
use crate::debug::{self, DebugState};
use crate::inject::InjectOptions;
use crate::model::PushContext;
use crate::pb::istio_ca::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::source::{self, SourceError};
use crate::webhook;
use crate::xds::{AdsServer, Registry, SnapshotCache};

/// `meshd serve` flags.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Directory of YAML/JSON config, watched; `None` serves the demo.
    pub config_dir: Option<PathBuf>,
    /// Watch a Kubernetes cluster instead.
    pub kube: bool,
    /// Namespaces read from the cluster (all when empty).
    pub discovery_selectors: Vec<kube::core::Selector>,
    /// With `kube`: write analysis findings into Istio resources'
    /// `status.validationMessages`.
    pub write_analysis_status: bool,
    pub xds_addr: SocketAddr,
    pub debug_addr: SocketAddr,
    /// TLS xDS and CA address (like istiod's 15012): callers authenticate.
    pub xds_tls_addr: SocketAddr,
    /// DNS names (and IPs) in meshd's serving certificate for the TLS port.
    pub xds_dns_names: Vec<String>,
    /// Where the CA keeps its root; without it the root lives in memory
    /// only, or with `kube` in a Secret of `system_namespace`.
    pub ca_dir: Option<PathBuf>,
    /// meshd's namespace in a cluster: its CA Secret and Lease.
    pub system_namespace: String,
    pub trust_domain: String,
    /// Validity of workload certificates (renewed at half of it).
    pub workload_cert_ttl: Duration,
    /// Public key (PEM) that service-account tokens are verified with.
    pub token_key: Option<PathBuf>,
    /// Audience tokens must carry.
    pub token_audience: String,
    /// On the plain port, believe the node metadata's identity.
    pub insecure_plaintext_identity: bool,
    /// HTTPS address of the sidecar injection webhook (`POST /inject`).
    pub webhook_addr: SocketAddr,
    /// When config changes are served.
    pub debounce: source::Debounce,
    /// Streams computing a push at once.
    pub max_concurrent_pushes: usize,
    /// What one client may ask.
    pub limits: crate::xds::Limits,
    /// Mesh-wide settings (`--mesh-config`): the extension providers.
    pub mesh: Arc<crate::config::mesh::MeshConfig>,
}

/// Why `meshd serve` could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listening address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The config source failed to start.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A server stopped with an error.
    #[error("{what} server failed: {reason}")]
    Server { what: &'static str, reason: String },
    /// No Kubernetes client configuration was found.
    #[error("--kube: {0}")]
    Kube(String),
    /// The CA could not start.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The TLS port could not be set up.
    #[error("TLS xDS port: {0}")]
    Tls(String),
}

/// meshd's serving certificate for the TLS port lasts this long.
const SERVING_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// The CA: from `--ca-dir`; else, with `--kube`, the cluster's shared root
/// (whose tokens the API server also reviews); else a root in memory.
async fn workload_ca(
    opts: &ServeOptions,
    client: Option<&kube::Client>,
) -> Result<Arc<WorkloadCa>, ServeError> {
    let authority = match (&opts.ca_dir, client) {
        (Some(dir), _) => ca::load_or_create(dir, &opts.trust_domain)?,
        (None, Some(client)) => {
            let authority = ca::cluster::load_or_create(
                client,
                &opts.system_namespace,
                &opts.trust_domain,
                &holder_identity(),
            )
            .await?;
            tokio::spawn(ca::cluster::publish_root(
                client.clone(),
                authority.root_pem().to_string(),
            ));
            authority
        }
        (None, None) => {
            tracing::warn!("no --ca-dir: the CA root lives in memory and changes at every restart");
            ca::ephemeral(&opts.trust_domain)?
        }
    };
    let reviewer = match (client, &opts.token_key) {
        (Some(client), None) => Some(TokenReviewer {
            client: client.clone(),
            audience: opts.token_audience.clone(),
        }),
        _ => None,
    };
    let tokens = match &opts.token_key {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| CaError::Io {
                path: path.display().to_string(),
                source,
            })?;
            Some(TokenVerifier::from_pem(&pem, &opts.token_audience)?)
        }
        None => None,
    };
    if opts.insecure_plaintext_identity {
        tracing::warn!(
            "--insecure-plaintext-identity: proxies on the plain port get certificates for whatever identity their node metadata claims"
        );
    }
    let expiry = authority
        .root_not_after()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    metrics::gauge!(ca::metric::ROOT_EXPIRY).set(expiry.as_secs_f64());
    Ok(Arc::new(WorkloadCa {
        authority: Arc::new(authority),
        auth: Authenticator {
            trust_domain: opts.trust_domain.clone(),
            tokens,
            reviewer,
        },
        ttl: opts.workload_cert_ttl,
        insecure_plaintext_identity: opts.insecure_plaintext_identity,
    }))
}

fn tls_config(ca: &WorkloadCa, serving: &Issued) -> ServerTlsConfig {
    ServerTlsConfig::new()
        .identity(Identity::from_pem(&serving.cert_chain, &serving.key))
        .client_ca_root(Certificate::from_pem(ca.authority.root_pem()))
        .client_auth_optional(true)
}

/// Names this replica in the CA Lease: the pod (POD_NAME, else the
/// HOSTNAME a pod gets) and the process.
fn holder_identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "meshd".into());
    format!("{host}-{}", std::process::id())
}

/// Answers 503 on the debug port while meshd waits for the cluster (for
/// its CA root) before it can serve anything; `stop` hands the port on.
struct NotReadyYet {
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl NotReadyYet {
    /// Serves a twin of `listener` (the same socket) until stopped.
    fn serve(listener: TcpListener) -> std::io::Result<(NotReadyYet, TcpListener)> {
        let socket = listener.into_std()?;
        let twin = TcpListener::from_std(socket.try_clone()?)?;
        let listener = TcpListener::from_std(socket)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = axum::Router::new().fallback(|| async {
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "not ready: waiting for the cluster (CA root)\n",
            )
        });
        let done = tokio::spawn(async move {
            let _ = axum::serve(twin, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok((NotReadyYet { stop, done }, listener))
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.done.await;
    }
}

/// TLS for the injection webhook, with meshd's serving certificate.
fn webhook_tls(serving: &Issued) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |e: String| ServeError::Tls(format!("webhook certificate: {e}"));
    let chain = CertificateDer::pem_slice_iter(serving.cert_chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(serving.key.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| bad(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Runs until `shutdown` completes or a server fails.
pub async fn run(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let metrics = install_metrics();
    if let Some(handle) = metrics.clone() {
        // Histogram samples wait in the recorder until drained: without a
        // scrape they would pile up for ever (the soak showed meshd's RSS
        // climbing ~5 MB a minute under churn).
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                handle.run_upkeep();
            }
        });
    }
    let client = match opts.kube {
        true => Some(
            kube::Client::try_default()
                .await
                .map_err(|e| ServeError::Kube(format!("no cluster to talk to: {e}")))?,
        ),
        false => None,
    };
    let xds_listener = bind("xDS", opts.xds_addr).await?;
    let xds_tls_listener = bind("TLS xDS", opts.xds_tls_addr).await?;
    let debug_listener = bind("debug", opts.debug_addr).await?;
    let webhook_listener = bind("injection webhook", opts.webhook_addr).await?;
    // Only the cluster's CA root can keep meshd waiting before it serves.
    let (ca, debug_listener) = if client.is_some() && opts.ca_dir.is_none() {
        let (waiting, debug_listener) =
            NotReadyYet::serve(debug_listener).map_err(|source| ServeError::Bind {
                what: "debug",
                addr: opts.debug_addr,
                source,
            })?;
        let ca = workload_ca(&opts, client.as_ref()).await?;
        waiting.stop().await;
        (ca, debug_listener)
    } else {
        (workload_ca(&opts, client.as_ref()).await?, debug_listener)
    };

    let (config_tx, mut config_rx) = watch::channel(Arc::new(ConfigSnapshot::default()));
    let mut kube_sync = None;
    match (&opts.config_dir, client.clone()) {
        (Some(dir), _) => source::watch_dir(dir.clone(), ConfigStore::default(), config_tx, opts.debounce)?,
        (None, Some(client)) => {
            let kube_opts = source::KubeOptions {
                discovery_selectors: opts.discovery_selectors.clone(),
                debounce: opts.debounce,
            };
            kube_sync = Some(source::watch_cluster(
                client,
                kube_opts,
                ConfigStore::default(),
                config_tx,
            ));
        }
        (None, None) => {
            tracing::info!("no --config-dir: serving the embedded demo configuration");
            config_tx.send_replace(source::embedded_demo());
            // Keep the sender alive so the receiver below stays open.
            tokio::spawn(async move { config_tx.closed().await });
        }
    }
    let first = config_rx.borrow_and_update().clone();
    let cache = Arc::new(SnapshotCache::new(Arc::new(
        PushContext::new(first).with_mesh(opts.mesh.clone()),
    )));
    let registry = Arc::new(Registry::default());
    let ready = Arc::new(AtomicBool::new(false));

    let updater = cache.clone();
    let analyzer = Analyzer::new();
    if let (Some(client), Some(_)) = (client, &kube_sync) {
        // Subscribed before the first generation is analyzed.
        tokio::spawn(crate::status::write_statuses(
            client,
            analyzer.subscribe(),
            registry.clone(),
            opts.write_analysis_status,
        ));
    }
    analyzer.run(cache.push_context());
    tokio::spawn(async move {
        while config_rx.changed().await.is_ok() {
            let config = config_rx.borrow_and_update().clone();
            let started = std::time::Instant::now();
            let generation = config.generation;
            // Only what the changed resources feed is indexed again; the
            // changes are found once, for the push context and the cache.
            let prev = updater.push_context();
            let changes = prev.config.changes(&config);
            let push = Arc::new(prev.next_with(config.clone(), std::time::SystemTime::now(), &changes));
            updater.update_from(&prev, push.clone(), &changes);
            tracing::debug!(generation, elapsed = ?started.elapsed(), "push context built");
            analyzer.run(push);
            drop(changes);
            // The old push context's last holder may be here: its indexes
            // (a mesh's worth) are freed off the runtime's workers, which
            // are pushing the new one.
            tokio::task::spawn_blocking(move || drop(prev));
        }
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let serving = ca.authority.issue_server(&opts.xds_dns_names, SERVING_CERT_TTL)?;
    let webhook = webhook::serve_tls(
        webhook_listener,
        webhook_tls(&serving)?,
        webhook::router(cache.clone(), InjectOptions::default()),
        stopped(stop_rx.clone()),
    );
    tokio::spawn(webhook);
    let authority = ca.authority.clone();
    let ads = AdsServer::new(cache.clone(), registry.clone())
        .with_push_limit(opts.max_concurrent_pushes)
        .with_limits(opts.limits);
    let xds = tonic::transport::Server::builder()
        .add_service(ads.clone().with_ca(ca.clone(), false).into_service())
        .add_service(IstioCertificateServiceServer::new(CertificateService::new(
            ca.clone(),
            false,
        )))
        .serve_with_incoming_shutdown(no_delay(xds_listener), stopped(stop_rx.clone()));
    let xds_tls = tonic::transport::Server::builder()
        .tls_config(tls_config(&ca, &serving))
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .add_service(ads.with_ca(ca.clone(), true).into_service())
        .add_service(IstioCertificateServiceServer::new(CertificateService::new(
            ca, true,
        )))
        .serve_with_incoming_shutdown(no_delay(xds_tls_listener), stopped(stop_rx.clone()));
    let mut warnings = Vec::new();
    if opts.insecure_plaintext_identity {
        warnings.push(format!(
            "--insecure-plaintext-identity: proxies on {} get certificates for the identity their node metadata claims, unauthenticated",
            opts.xds_addr
        ));
    }
    if !opts.debug_addr.ip().is_loopback() {
        let warning = format!(
            "--debug-addr {}: the debug endpoints (configuration, proxies, metrics) answer anyone who reaches this address, without authentication",
            opts.debug_addr
        );
        tracing::warn!("{warning}");
        warnings.push(warning);
    }
    let state = DebugState {
        cache,
        registry,
        ready: ready.clone(),
        metrics,
        warnings,
        authority,
        kube: kube_sync,
    };
    let debug = axum::serve(debug_listener, debug::router(state)).with_graceful_shutdown(stopped(stop_rx));

    tracing::info!(
        xds = %opts.xds_addr,
        xds_tls = %opts.xds_tls_addr,
        debug = %opts.debug_addr,
        trust_domain = %opts.trust_domain,
        "meshd serving"
    );
    ready.store(true, Ordering::Release);
    let xds = async {
        xds.await.map_err(|e| ServeError::Server {
            what: "xDS",
            reason: e.to_string(),
        })
    };
    let xds_tls = async {
        xds_tls.await.map_err(|e| ServeError::Server {
            what: "TLS xDS",
            reason: e.to_string(),
        })
    };
    let debug = async {
        debug.await.map_err(|e| ServeError::Server {
            what: "debug",
            reason: e.to_string(),
        })
    };
    // The first server to fail ends `meshd serve`; on shutdown both finish.
    tokio::try_join!(xds, xds_tls, debug).map(|_| ())
}

/// Runs the analyzers over each new generation off the push path, and logs
/// the findings that were not there before (so a mistake is reported once,
/// when it is made), at warn for errors and warnings, info otherwise;
/// hands each analysis on to its subscribers (the status writer), so that
/// a generation is analyzed once.
#[derive(Clone)]
struct Analyzer {
    state: Arc<std::sync::Mutex<AnalyzerState>>,
    analyzed: Arc<watch::Sender<Option<Arc<Analysis>>>>,
}

#[derive(Default)]
struct AnalyzerState {
    running: bool,
    /// The generation to analyze next, when one arrived while running.
    pending: Option<Arc<PushContext>>,
    reported: std::collections::BTreeSet<String>,
}

impl Analyzer {
    fn new() -> Analyzer {
        Analyzer {
            state: Default::default(),
            analyzed: Arc::new(watch::channel(None).0),
        }
    }

    /// The newest generation analyzed, from the next one on.
    fn subscribe(&self) -> watch::Receiver<Option<Arc<Analysis>>> {
        self.analyzed.subscribe()
    }

    fn run(&self, push: Arc<PushContext>) {
        let Ok(mut state) = self.state.lock() else { return };
        if state.running {
            state.pending = Some(push); // the latest wins
            return;
        }
        state.running = true;
        drop(state);
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut next = Some(push);
            while let Some(push) = next.take() {
                let findings = crate::analyze::analyze_push(&push);
                let Ok(mut state) = me.state.lock() else { return };
                let now: std::collections::BTreeSet<String> =
                    findings.iter().map(ToString::to_string).collect();
                for f in findings
                    .iter()
                    .filter(|f| !state.reported.contains(&f.to_string()))
                {
                    match f.level {
                        crate::analyze::Level::Info => tracing::info!(code = f.code, "{f}"),
                        _ => tracing::warn!(code = f.code, "{f}"),
                    }
                }
                state.reported = now;
                // Kept only for a subscriber: the analysis holds its push
                // context until the next one replaces it.
                if me.analyzed.receiver_count() > 0 {
                    me.analyzed
                        .send_replace(Some(Arc::new(Analysis { push, findings })));
                }
                next = state.pending.take();
                if next.is_none() {
                    state.running = false;
                }
            }
        });
    }
}

/// Installs the Prometheus recorder (once per process) and returns what
/// renders it.
fn install_metrics() -> Option<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in crate::xds::metric::BUCKETS {
        builder = match builder.set_buckets_for_metric(Matcher::Full(name.to_string()), buckets) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("metric {name}: {e}");
                return None;
            }
        };
    }
    let recorder = builder.build_recorder();
    // Fixes process_start_time_seconds at start-up.
    crate::process::record_metrics();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).ok().map(|_| handle)
}

/// Connections the kernel queues until meshd accepts them (capped by
/// `net.core.somaxconn`). Thousands of proxies connect at once after a
/// restart; each connection the queue overflows waits for its SYN to be
/// sent again (after 1 s, then 2 s more, ...). tokio's default is 1,024.
const ACCEPT_BACKLOG: u32 = 4096;

/// The connections a listener accepts, with Nagle's algorithm off (as
/// tonic's own listener has it, and as Envoy's xDS client does): a
/// response's last partial segment is sent at once rather than after the
/// proxy's delayed ACK of the one before, which held one push in ten back
/// by 40 ms.
fn no_delay(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    let err = |source| ServeError::Bind { what, addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    // As `TcpListener::bind` does: a restarted meshd binds at once.
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(ACCEPT_BACKLOG).map_err(err)
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn xds_connections_are_accepted_with_nagle_off() {
        let listener = bind("xDS", "127.0.0.1:0".parse().expect("address"))
            .await
            .expect("bound");
        let addr = listener.local_addr().expect("address");
        let mut incoming = no_delay(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connected");
        let accepted = incoming.next().await.expect("a connection").expect("accepted");
        assert!(accepted.nodelay().expect("readable option"));
    }
}
