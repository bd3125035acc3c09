//! `meshd serve`: wires the stages together. A source publishes config
//! generations; each becomes a push context installed in the snapshot
//! cache; the ADS server streams from the cache; the debug server reads it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::{ConfigSnapshot, ConfigStore};
use crate::debug::{self, DebugState};
use crate::model::PushContext;
use crate::source::{self, SourceError};
use crate::xds::{AdsServer, Registry, SnapshotCache};

/// `meshd serve` flags.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Directory of YAML/JSON config, watched; `None` serves the demo.
    pub config_dir: Option<PathBuf>,
    /// Watch a Kubernetes cluster instead (not available yet).
    pub kube: bool,
    pub xds_addr: SocketAddr,
    pub debug_addr: SocketAddr,
    /// Where the CA keeps its root (used once the CA is built).
    pub ca_dir: Option<PathBuf>,
    pub trust_domain: String,
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
    /// A feature that a later release brings.
    #[error("{0}")]
    NotAvailable(&'static str),
}

/// Runs until `shutdown` completes or a server fails.
pub async fn run(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    if opts.kube {
        return Err(ServeError::NotAvailable(
            "--kube: the Kubernetes source is not built yet; use --config-dir DIR",
        ));
    }
    let xds_listener = bind("xDS", opts.xds_addr).await?;
    let debug_listener = bind("debug", opts.debug_addr).await?;

    let (config_tx, mut config_rx) = watch::channel(Arc::new(ConfigSnapshot::default()));
    match &opts.config_dir {
        Some(dir) => source::watch_dir(dir.clone(), ConfigStore::default(), config_tx)?,
        None => {
            tracing::info!("no --config-dir: serving the embedded demo configuration");
            config_tx.send_replace(source::embedded_demo());
            // Keep the sender alive so the receiver below stays open.
            tokio::spawn(async move { config_tx.closed().await });
        }
    }
    let first = config_rx.borrow_and_update().clone();
    let cache = Arc::new(SnapshotCache::new(Arc::new(PushContext::new(first))));
    let registry = Arc::new(Registry::default());
    let ready = Arc::new(AtomicBool::new(false));

    let updater = cache.clone();
    tokio::spawn(async move {
        while config_rx.changed().await.is_ok() {
            let config = config_rx.borrow_and_update().clone();
            updater.update(Arc::new(PushContext::new(config)));
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

    let ads = AdsServer::new(cache.clone(), registry.clone());
    let xds = tonic::transport::Server::builder()
        .add_service(AggregatedDiscoveryServiceServer::new(ads))
        .serve_with_incoming_shutdown(TcpListenerStream::new(xds_listener), stopped(stop_rx.clone()));
    let state = DebugState {
        cache,
        registry,
        ready: ready.clone(),
    };
    let debug = axum::serve(debug_listener, debug::router(state)).with_graceful_shutdown(stopped(stop_rx));

    tracing::info!(xds = %opts.xds_addr, debug = %opts.debug_addr, trust_domain = %opts.trust_domain, "meshd serving");
    ready.store(true, Ordering::Release);
    let xds = async {
        xds.await.map_err(|e| ServeError::Server {
            what: "xDS",
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
    tokio::try_join!(xds, debug).map(|_| ())
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })
}
