//! The ADS gRPC service: one task per stream, feeding requests and new
//! snapshots through `stream::StreamState` and sending what it decides.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{value::Kind as ValueKind, Struct, Value as PbValue};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tonic::{Request, Status};

use super::cache::{Encoded, Snapshot, SnapshotCache};
use super::request::{not_utf8, DecodeRequest, Framed, SotwRequest, Subscriptions};
use super::status::Registry;
use super::stream::{DeltaRequest, Outgoing, StreamState};
use super::wire::{RecentBodies, Requests, Wire};
use super::{metric, XdsType};
use crate::ca::auth::{credentials, Caller, Credentials};
use crate::ca::{SpiffeId, WorkloadCa};
use crate::model::Proxy;

/// The ADS service.
#[derive(Debug, Clone)]
pub struct AdsServer {
    cache: Arc<SnapshotCache>,
    registry: Arc<Registry>,
    /// Bounds how many streams compute a push at once.
    push_permits: Arc<Semaphore>,
    ca: Option<Arc<WorkloadCa>>,
    /// Whether this instance serves the TLS port (callers must authenticate).
    tls: bool,
    limits: Limits,
    /// Streams open now, on every port this server's clones serve.
    streams: Arc<std::sync::atomic::AtomicUsize>,
    /// The per-type metric handles, looked up once for every stream.
    metrics: Arc<metric::StreamMetrics>,
    /// Response bodies kept for the next streams sending the same batch.
    recent: Arc<RecentBodies>,
}

/// What one client may ask of the server. A client over a limit is
/// disconnected with a status that names it, and no other is slowed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// ADS streams open at once, over all clients.
    pub max_streams: usize,
    /// Resource names in one request.
    pub max_names: usize,
    /// Requests a second one stream may send, on average.
    pub requests_per_second: u32,
    /// Requests one stream may send in a burst above that rate.
    pub request_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_streams: 100_000,
            max_names: 100_000,
            // Far above what an Envoy sends (a request per type, then an
            // ACK per response, and responses are coalesced per stream).
            requests_per_second: 1_000,
            request_burst: 5_000,
        }
    }
}

/// A token bucket: `burst` requests at once, refilled at `rate` a second.
struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    fn new(limits: &Limits) -> RateLimit {
        RateLimit {
            rate: f64::from(limits.requests_per_second),
            burst: f64::from(limits.request_burst.max(1)),
            tokens: f64::from(limits.request_burst.max(1)),
            at: Instant::now(),
        }
    }

    /// Takes a token; false when the stream has none left.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// Holds one slot of the open-stream count while the stream lives.
struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl AdsServer {
    /// A server answering from `cache` and recording streams in `registry`.
    pub fn new(cache: Arc<SnapshotCache>, registry: Arc<Registry>) -> AdsServer {
        AdsServer {
            cache,
            registry,
            push_permits: Arc::new(Semaphore::new(DEFAULT_CONCURRENT_PUSHES)),
            ca: None,
            tls: false,
            limits: Limits::default(),
            streams: Arc::default(),
            metrics: Arc::new(metric::StreamMetrics::new()),
            recent: Arc::default(),
        }
    }

    /// Applies `limits` to every client.
    pub fn with_limits(mut self, limits: Limits) -> AdsServer {
        self.limits = limits;
        self
    }

    /// At most `n` streams compute a push at once (snapshot translation is
    /// the CPU-heavy part; sending is per stream and never blocks others).
    pub fn with_push_limit(mut self, n: usize) -> AdsServer {
        self.push_permits = Arc::new(Semaphore::new(n.max(1)));
        self
    }

    /// Authenticates callers with `ca` and gives authenticated proxies
    /// their workload certificates (`default`, `ROOTCA`) over SDS. `tls`:
    /// this instance serves the TLS port, where callers must authenticate.
    pub fn with_ca(mut self, ca: Arc<WorkloadCa>, tls: bool) -> AdsServer {
        self.ca = Some(ca);
        self.tls = tls;
        self
    }

    /// Who is calling; a refused caller ends the stream before it starts.
    async fn caller(&self, (authorization, certs): Credentials) -> Result<Option<Caller>, Status> {
        let Some(ca) = &self.ca else { return Ok(None) };
        ca.auth
            .authenticate(authorization.as_deref(), certs, self.tls)
            .await
            .map_err(|e| e.status())
    }
}

impl AdsServer {
    /// Starts a stream (`mode`: "sotw" or "delta"): authenticates the
    /// caller, then serves it on its own task, writing responses to `tx`.
    pub(super) async fn start<R, B>(
        &self,
        mode: &'static str,
        request: Request<B>,
        tx: mpsc::Sender<Result<Wire, Status>>,
    ) -> Result<(), Status>
    where
        R: XdsRequest + DecodeRequest,
        R::Decoder: Unpin,
        B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let open = self.streams.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let slot = StreamSlot(self.streams.clone());
        if open >= self.limits.max_streams {
            return Err(Status::resource_exhausted(format!(
                "meshd serves at most {} streams at once; try another replica or later",
                self.limits.max_streams
            )));
        }
        let caller = self.caller(credentials(&request)).await?;
        let subscriptions = Subscriptions::default();
        let requests = Requests::new(request.into_inner(), R::decoder(subscriptions.clone()));
        let conn = Connection::new(self, mode, caller);
        // The stream's own future, not one wrapped around it: a wrapper
        // keeps a second copy of everything `run` is handed.
        tokio::spawn(conn.run(requests, subscriptions, tx, slot));
        Ok(())
    }
}

/// A request of either variant, as the loop needs it.
pub(super) trait XdsRequest: Send + 'static {
    /// Whether the stream's reader compares requests with what the stream
    /// subscribes to (`Subscriptions`): SotW's does, delta's reads whole
    /// requests and needs nothing published.
    const READS_SUBSCRIPTIONS: bool = false;
    /// What decoding alone does not check; an error ends the stream.
    fn check(&self, _limits: &Limits) -> Result<(), Status> {
        Ok(())
    }
    /// The node, decoded (only the first request's is read).
    fn node(&self) -> Result<Option<Node>, Status>;
    fn type_url(&self) -> &str;
    fn response_nonce(&self) -> &str;
    /// Set when the request rejects the last response (a NACK).
    fn error_detail(&self) -> Option<&envoy_types::pb::google::rpc::Status>;
    /// Feeds the request to the state machine; an error (a name that is
    /// not UTF-8) ends the stream.
    fn apply(
        &self,
        t: XdsType,
        state: &mut StreamState,
        snapshot: &super::Snapshot,
    ) -> Result<Option<Outgoing>, Status>;
    /// Feeds a new snapshot to the state machine.
    fn push(state: &mut StreamState, snapshot: &super::Snapshot) -> Vec<Outgoing>;
    /// The response carrying `out`.
    fn wire(out: &Outgoing, recent: &RecentBodies) -> Wire;
}

/// A NACK's error, as the state machine records it.
fn rejection(detail: Option<&envoy_types::pb::google::rpc::Status>) -> Option<String> {
    detail.map(|s| format!("code {}: {}", s.code, s.message))
}

impl XdsRequest for SotwRequest {
    const READS_SUBSCRIPTIONS: bool = true;

    /// The names' UTF-8 is checked in `apply`, only when they are not the
    /// subscribed ones repeated.
    fn check(&self, limits: &Limits) -> Result<(), Status> {
        if self.name_count() > limits.max_names {
            return Err(too_many_names(limits));
        }
        Ok(())
    }
    fn node(&self) -> Result<Option<Node>, Status> {
        decode_node(self.node.as_ref())
    }
    fn type_url(&self) -> &str {
        &self.type_url
    }
    fn response_nonce(&self) -> &str {
        &self.response_nonce
    }
    fn error_detail(&self) -> Option<&envoy_types::pb::google::rpc::Status> {
        self.error_detail.as_ref()
    }
    fn apply(
        &self,
        t: XdsType,
        state: &mut StreamState,
        snapshot: &super::Snapshot,
    ) -> Result<Option<Outgoing>, Status> {
        let error = rejection(self.error_detail.as_ref());
        let (nonce, error) = (self.response_nonce.as_str(), error.as_deref());
        // An ACK of a thousand names, from every proxy at every push: when
        // they are the subscribed ones, nothing of them is checked or
        // collected again.
        if state.subscribed_names(t).is_some_and(|n| self.names_repeat(n)) {
            return Ok(state.sotw_request_as_subscribed(t, nonce, error, snapshot));
        }
        let names = self.names()?;
        Ok(state.sotw_request(t, &names, nonce, error, snapshot))
    }
    fn push(state: &mut StreamState, snapshot: &super::Snapshot) -> Vec<Outgoing> {
        state.sotw_push(snapshot)
    }
    fn wire(out: &Outgoing, recent: &RecentBodies) -> Wire {
        Wire::sotw(out, recent)
    }
}

/// A `DeltaDiscoveryRequest` as the server reads it, the names kept as
/// slices of the message (see `SotwRequest`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaRequestMessage {
    /// The `Node`, left encoded (see `SotwRequest`).
    #[prost(bytes = "bytes", optional, tag = "1")]
    pub node: Option<bytes::Bytes>,
    #[prost(string, tag = "2")]
    pub type_url: String,
    #[prost(bytes = "bytes", repeated, tag = "3")]
    pub resource_names_subscribe: Vec<bytes::Bytes>,
    #[prost(bytes = "bytes", repeated, tag = "4")]
    pub resource_names_unsubscribe: Vec<bytes::Bytes>,
    #[prost(btree_map = "string, string", tag = "5")]
    pub initial_resource_versions: BTreeMap<String, String>,
    #[prost(string, tag = "6")]
    pub response_nonce: String,
    #[prost(message, optional, tag = "7")]
    pub error_detail: Option<envoy_types::pb::google::rpc::Status>,
}

fn decode_node(node: Option<&bytes::Bytes>) -> Result<Option<Node>, Status> {
    use prost::Message;
    node.map(|b| Node::decode(b.clone()))
        .transpose()
        .map_err(|e| Status::invalid_argument(format!("the request's node does not decode: {e}")))
}

/// Names that are not all UTF-8 end the stream, as prost's `string` would.
fn check_names<'a>(names: impl IntoIterator<Item = &'a bytes::Bytes>, limits: &Limits) -> Result<(), Status> {
    let mut count = 0;
    for name in names {
        count += 1;
        if count > limits.max_names {
            return Err(too_many_names(limits));
        }
        if std::str::from_utf8(name).is_err() {
            return Err(not_utf8());
        }
    }
    Ok(())
}

fn too_many_names(limits: &Limits) -> Status {
    Status::invalid_argument(format!(
        "a request names more than {} resources",
        limits.max_names
    ))
}

/// The names, as `&str` (`check_names` passed).
fn names_of(names: &[bytes::Bytes]) -> Vec<&str> {
    names.iter().filter_map(|n| std::str::from_utf8(n).ok()).collect()
}

impl DecodeRequest for DeltaRequestMessage {
    type Decoder = Framed<DeltaRequestMessage>;
    fn decoder(_: Subscriptions) -> Framed<DeltaRequestMessage> {
        Framed::default()
    }
}

impl XdsRequest for DeltaRequestMessage {
    fn check(&self, limits: &Limits) -> Result<(), Status> {
        check_names(
            self.resource_names_subscribe
                .iter()
                .chain(&self.resource_names_unsubscribe),
            limits,
        )
    }
    fn node(&self) -> Result<Option<Node>, Status> {
        decode_node(self.node.as_ref())
    }
    fn type_url(&self) -> &str {
        &self.type_url
    }
    fn response_nonce(&self) -> &str {
        &self.response_nonce
    }
    fn error_detail(&self) -> Option<&envoy_types::pb::google::rpc::Status> {
        self.error_detail.as_ref()
    }
    fn apply(
        &self,
        t: XdsType,
        state: &mut StreamState,
        snapshot: &super::Snapshot,
    ) -> Result<Option<Outgoing>, Status> {
        let error = rejection(self.error_detail.as_ref());
        let subscribe = names_of(&self.resource_names_subscribe);
        let unsubscribe = names_of(&self.resource_names_unsubscribe);
        let req = DeltaRequest {
            type_: t,
            subscribe: &subscribe,
            unsubscribe: &unsubscribe,
            initial_versions: &self.initial_resource_versions,
            nonce: &self.response_nonce,
            error: error.as_deref(),
        };
        Ok(state.delta_request(&req, snapshot))
    }
    fn push(state: &mut StreamState, snapshot: &super::Snapshot) -> Vec<Outgoing> {
        state.delta_push(snapshot)
    }
    fn wire(out: &Outgoing, recent: &RecentBodies) -> Wire {
        Wire::delta(out, recent)
    }
}

/// What a turn of a stream's loop came to.
enum Step {
    /// Responses to send, computed from the snapshot; with the type a
    /// request was about, whose state it changed even when nothing is sent.
    Send(Vec<Outgoing>, Arc<Snapshot>, Option<XdsType>),
    /// A new generation is out: once a permit is free, compute the push
    /// (nothing before the proxy is known).
    Push,
    /// Nothing to do.
    Idle,
    /// The stream is over.
    Stop,
    /// The stream ends with this status.
    Fail(Status),
}

/// What a stream's requests read and set besides the protocol state.
struct Stream<'a> {
    /// The proxy, once its first request named it, and its registry id.
    proxy: &'a mut Option<(Proxy, u64)>,
    workload: &'a mut Option<Workload>,
    served: &'a mut Option<Served>,
}

/// A stream's last snapshot, and how many generations the cache had
/// installed when it was looked up.
type Served = (u64, Arc<Snapshot>);

/// One ADS stream.
struct Connection {
    cache: Arc<SnapshotCache>,
    registry: Arc<Registry>,
    push_permits: Arc<Semaphore>,
    metrics: Arc<metric::StreamMetrics>,
    recent: Arc<RecentBodies>,
    mode: &'static str,
    ca: Option<Arc<WorkloadCa>>,
    tls: bool,
    caller: Option<Caller>,
    limits: Limits,
}

/// A proxy's workload certificate as SDS resources, and when to renew it.
struct Workload {
    identity: SpiffeId,
    secrets: Vec<Arc<Encoded>>,
    renew_at: Instant,
}

/// Streams computing a push at once, by default.
pub const DEFAULT_CONCURRENT_PUSHES: usize = 64;

/// How long to wait before trying again when issuing fails.
const ISSUE_RETRY: Duration = Duration::from_secs(10);

impl Connection {
    fn new(server: &AdsServer, mode: &'static str, caller: Option<Caller>) -> Connection {
        Connection {
            cache: server.cache.clone(),
            registry: server.registry.clone(),
            push_permits: server.push_permits.clone(),
            metrics: server.metrics.clone(),
            recent: server.recent.clone(),
            mode,
            ca: server.ca.clone(),
            tls: server.tls,
            caller,
            limits: server.limits,
        }
    }

    /// The proxy's snapshot in the current generation: `served` again
    /// while no newer generation is out (an ACK needs no config key
    /// computed and looked up), else looked up and kept in `served`.
    fn serve(
        &self,
        served: &mut Option<Served>,
        proxy: &Proxy,
        workload: Option<&Workload>,
    ) -> Arc<Snapshot> {
        // Read before the lookup: the snapshot is of this install or a
        // later one, never an earlier one.
        let installs = self.cache.installs();
        if let Some((_, s)) = served.as_ref().filter(|(n, _)| *n == installs) {
            return s.clone();
        }
        let snapshot = self.snapshot(proxy, workload);
        *served = Some((installs, snapshot.clone()));
        snapshot
    }

    /// The proxy's snapshot, with its own workload certificates added.
    fn snapshot(&self, proxy: &Proxy, workload: Option<&Workload>) -> Arc<Snapshot> {
        let shared = self.cache.snapshot(proxy);
        let Some(w) = workload else { return shared };
        let mut resources = shared.resources.clone();
        let secrets = Arc::make_mut(resources.entry(XdsType::Secret).or_default());
        for s in &w.secrets {
            secrets.insert(s.name.clone(), s.clone());
        }
        let mut versions = shared.versions.clone();
        versions.insert(XdsType::Secret, super::cache::set_version(secrets));
        Arc::new(Snapshot {
            generation: shared.generation,
            resources,
            versions,
            diagnostics: shared.diagnostics.clone(),
            outbound: shared.outbound.clone(),
            walks: shared.walks.clone(),
        })
    }

    /// Issues (or renews) the certificate of `identity`.
    fn workload(&self, identity: SpiffeId) -> Option<Workload> {
        let ca = self.ca.as_ref()?;
        match ca.issue(&identity) {
            Ok(issued) => {
                let secrets = ca
                    .sds_secrets(&issued)
                    .iter()
                    .map(|s| Arc::new(Encoded::new(s.name.clone(), s)))
                    .collect();
                tracing::info!(%identity, "issued a workload certificate");
                Some(Workload {
                    identity,
                    secrets,
                    renew_at: Instant::now() + ca.ttl / 2,
                })
            }
            Err(e) => {
                tracing::error!(%identity, "cannot issue a workload certificate: {e}; retrying");
                // Keep the identity, without secrets, and try again soon.
                Some(Workload {
                    identity,
                    secrets: Vec::new(),
                    renew_at: Instant::now() + ISSUE_RETRY,
                })
            }
        }
    }

    async fn run<R: XdsRequest>(
        self,
        mut inbound: impl futures::Stream<Item = Result<R, Status>> + Send + Unpin,
        subscriptions: Subscriptions,
        tx: mpsc::Sender<Result<Wire, Status>>,
        _slot: StreamSlot,
    ) {
        let mut generations = self.cache.subscribe();
        let mut state = StreamState::default();
        let mut proxy: Option<(Proxy, u64)> = None;
        let mut workload: Option<Workload> = None;
        // The snapshot last served, reused while its generation is current.
        let mut served: Option<Served> = None;
        let mut rate = RateLimit::new(&self.limits);
        // What ends the stream with a status, sent once the loop is left.
        let mut failed: Option<Status> = None;
        loop {
            let renew_at = workload.as_ref().map(|w| w.renew_at);
            // The branches do not wait on anything themselves: their
            // futures would be kept in the stream's task next to the ones
            // `select!` holds, for every stream open.
            let step = tokio::select! {
                msg = futures::StreamExt::next(&mut inbound) => match msg {
                    Some(Ok(req)) => {
                        let stream = Stream { proxy: &mut proxy, workload: &mut workload, served: &mut served };
                        self.request(req, &mut rate, stream, &mut state, &subscriptions)
                    }
                    None => Step::Stop,
                    Some(Err(status)) => {
                        tracing::debug!(%status, "stream closed");
                        Step::Stop
                    }
                },
                changed = generations.changed() => match changed {
                    Err(_) => Step::Stop,
                    Ok(()) => Step::Push,
                },
                _ = sleep_until_some(renew_at) => match &proxy {
                    None => Step::Idle,
                    Some((p, _)) => {
                        workload = workload.take().and_then(|w| self.workload(w.identity));
                        served = None; // it carries the old certificates
                        let snapshot = self.serve(&mut served, p, workload.as_ref());
                        Step::Send(R::push(&mut state, &snapshot), snapshot, None)
                    }
                },
            };
            // Set when a new config generation is pushed: when its
            // computation started.
            let mut pushed: Option<Instant> = None;
            let (outgoing, snapshot, asked) = match step {
                Step::Send(outgoing, snapshot, asked) => (outgoing, snapshot, asked),
                Step::Idle => continue,
                Step::Stop => break,
                Step::Fail(status) => {
                    failed = Some(status);
                    break;
                }
                Step::Push => {
                    let Some((p, _)) = &proxy else { continue };
                    // A closed semaphore never happens; without a permit we
                    // would still compute, so the error is only ignored.
                    let _permit = self.push_permits.acquire().await;
                    pushed = Some(Instant::now());
                    let snapshot = self.serve(&mut served, p, workload.as_ref());
                    (R::push(&mut state, &snapshot), snapshot, None)
                }
            };
            let Some((p, id)) = &proxy else { break };
            let sent: Vec<XdsType> = outgoing.iter().map(|o| o.type_).collect();
            self.registry.update(
                *id,
                &state,
                asked,
                &sent,
                snapshot.generation,
                &snapshot.diagnostics,
            );
            let push_time = pushed.map(|started| started.elapsed().as_secs_f64());
            for out in outgoing {
                let wire = R::wire(&out, &self.recent);
                self.metrics.sent(out.type_, wire.len(), push_time);
                if tx.send(Ok(wire)).await.is_err() {
                    break;
                }
            }
            if pushed.is_some() && !sent.is_empty() {
                if let Some(since) = self.cache.pushed(snapshot.generation) {
                    self.metrics.converged(since.as_secs_f64());
                }
                tracing::debug!(
                    proxy = %p.id,
                    generation = snapshot.generation,
                    types = ?sent,
                    "pushed"
                );
            }
        }
        if let Some(status) = failed {
            let _ = tx.send(Err(status)).await;
        }
        if let Some((p, id)) = proxy {
            tracing::info!(proxy = %p.id, mode = self.mode, "proxy disconnected");
            self.registry.remove(id);
        }
    }

    /// What one request asks of the stream: checked, the proxy identified
    /// from its node if it is the first, then applied to the state.
    fn request<R: XdsRequest>(
        &self,
        req: R,
        rate: &mut RateLimit,
        stream: Stream<'_>,
        state: &mut StreamState,
        subscriptions: &Subscriptions,
    ) -> Step {
        let Stream {
            proxy,
            workload,
            served,
        } = stream;
        if let Err(status) = req.check(&self.limits) {
            return Step::Fail(status);
        }
        if !rate.take() {
            let status = Status::resource_exhausted(format!(
                "more than {} requests a second (bursts of {}) on one stream: disconnected",
                self.limits.requests_per_second, self.limits.request_burst
            ));
            tracing::warn!(proxy = ?proxy.as_ref().map(|(p, _)| &p.id), "{}", status.message());
            return Step::Fail(status);
        }
        if proxy.is_none() {
            match req.node().and_then(|node| self.identify(node.as_ref())) {
                Ok((p, id, identity)) => {
                    *workload = identity.and_then(|i| self.workload(i));
                    *proxy = Some((p, id));
                }
                Err(status) => return Step::Fail(status),
            }
        }
        let Some(t) = XdsType::from_url(req.type_url()) else {
            tracing::debug!(
                type_url = req.type_url(),
                "ignoring a request for an unknown type"
            );
            return Step::Idle;
        };
        let Some((p, _)) = proxy.as_ref() else {
            return Step::Stop;
        };
        if let Some(error) = req.error_detail() {
            self.metrics.rejected(t);
            tracing::warn!(
                proxy = %p.id,
                r#type = t.short_name(),
                nonce = req.response_nonce(),
                "proxy rejected the config: {}",
                error.message
            );
        }
        let snapshot = self.serve(served, p, workload.as_ref());
        let applied = req.apply(t, state, &snapshot);
        // What the stream's next requests most likely repeat.
        if R::READS_SUBSCRIPTIONS {
            subscriptions.publish(state);
        }
        match applied {
            Ok(out) => Step::Send(out.into_iter().collect(), snapshot, Some(t)),
            Err(status) => Step::Fail(status),
        }
    }

    /// Parses the node, checks it against the authenticated caller, and
    /// registers the stream. Returns the workload identity to issue for.
    fn identify(&self, node: Option<&Node>) -> Result<(Proxy, u64, Option<SpiffeId>), Status> {
        let node = node
            .ok_or_else(|| Status::invalid_argument("the first request of a stream must carry the node"))?;
        let metadata = node.metadata.as_ref().map(struct_to_json).unwrap_or_default();
        let mut proxy =
            Proxy::parse(&node.id, &metadata).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(l) = &node.locality {
            let parts = [&l.region, &l.zone, &l.sub_zone];
            let known: Vec<&str> = parts
                .iter()
                .map(|p| p.as_str())
                .take_while(|p| !p.is_empty())
                .collect();
            proxy.locality = known.join("/");
        }
        let identity = match (&self.caller, &self.ca) {
            (Some(caller), _) => {
                let id = &caller.id;
                if id.namespace != proxy.namespace || id.service_account != proxy.service_account {
                    return Err(Status::permission_denied(format!(
                        "node {} claims namespace {:?} and service account {:?}, but the caller authenticated as {caller}",
                        proxy.id, proxy.namespace, proxy.service_account
                    )));
                }
                // A pod-bound token speaks for that pod alone.
                if caller.pod.as_ref().is_some_and(|pod| *pod != proxy.pod_name) {
                    return Err(Status::permission_denied(format!(
                        "node {} claims pod {:?}, but the caller authenticated as {caller}",
                        proxy.id, proxy.pod_name
                    )));
                }
                Some(id.clone())
            }
            (None, Some(ca)) if ca.insecure_plaintext_identity && !self.tls => Some(
                SpiffeId::new(
                    ca.authority.trust_domain(),
                    &proxy.namespace,
                    &proxy.service_account,
                )
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            ),
            _ => None,
        };
        proxy.identity = identity.as_ref().map(ToString::to_string);
        tracing::info!(proxy = %proxy.id, mode = self.mode, identity = ?proxy.identity, "proxy connected");
        let id = self.registry.register(proxy.clone(), self.mode);
        Ok((proxy, id, identity))
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// google.protobuf.Struct as JSON.
pub fn struct_to_json(s: &Struct) -> Map<String, Value> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

fn value_to_json(v: &PbValue) -> Value {
    match &v.kind {
        Some(ValueKind::NullValue(_)) | None => Value::Null,
        Some(ValueKind::NumberValue(n)) => {
            serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
        }
        Some(ValueKind::StringValue(s)) => Value::String(s.clone()),
        Some(ValueKind::BoolValue(b)) => Value::Bool(*b),
        Some(ValueKind::StructValue(s)) => Value::Object(struct_to_json(s)),
        Some(ValueKind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
    }
}
