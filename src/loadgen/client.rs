//! A simulated proxy: one ADS stream (state of the world or incremental)
//! that subscribes as Envoy does (clusters and listeners by wildcard, then
//! the endpoints of its EDS clusters and the route tables its listeners
//! name) and ACKs every response at once. It records what it received, by
//! type and in bytes, when it was first in sync, and when it first held
//! the scripted change.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes};
use envoy_types::pb::envoy::config::cluster::v3::cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{value, Any, Struct, Value};
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::xds::XdsType;

/// Who the simulated proxy is.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// What one client saw. `since_change` counts only what arrived after the
/// change was written.
#[derive(Debug, Default, Clone)]
pub struct ClientStats {
    pub responses: BTreeMap<XdsType, u64>,
    pub since_change: BTreeMap<XdsType, u64>,
    pub bytes_since_change: u64,
    pub synced_at: Option<Instant>,
    /// When the client had ACKed a response carrying the change's marker.
    pub changed_at: Option<Instant>,
    pub error: Option<String>,
    /// Keep what arrives after the change (for the baseline to replay).
    pub capture: bool,
    pub captured: Vec<DiscoveryResponse>,
}

/// What all clients share: the change's marker, when it was written, and
/// running counts. The harness polls the counts while it waits; reading
/// each client's stats instead would take 2,000 locks every poll, on the
/// cores the clients and meshd are measured on.
#[derive(Debug)]
pub struct Shared {
    /// Searches for the marker (every resource of every response is
    /// scanned: the search must not cost the proxies' cores more than
    /// reading the bytes).
    marker: memchr::memmem::Finder<'static>,
    changed: OnceLock<Instant>,
    /// Responses received, summed over the clients.
    responses: AtomicU64,
    /// Clients in sync.
    synced: AtomicUsize,
    /// Clients that hold the change.
    holding: AtomicUsize,
    /// Clients whose stream failed.
    failed: AtomicUsize,
}

impl Shared {
    pub fn new(marker: &[u8]) -> Shared {
        Shared {
            marker: memchr::memmem::Finder::new(marker).into_owned(),
            changed: OnceLock::new(),
            responses: AtomicU64::new(0),
            synced: AtomicUsize::new(0),
            holding: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
        }
    }

    /// Marks the change as written now (the first call counts); returns
    /// when.
    pub fn write_change(&self) -> Instant {
        *self.changed.get_or_init(Instant::now)
    }

    /// Responses received so far, summed over the clients.
    pub fn responses(&self) -> u64 {
        self.responses.load(Ordering::Relaxed)
    }

    /// Clients in sync so far.
    pub fn synced(&self) -> usize {
        self.synced.load(Ordering::Relaxed)
    }

    /// Clients that hold the change so far.
    pub fn holding(&self) -> usize {
        self.holding.load(Ordering::Relaxed)
    }

    /// Clients whose stream failed so far.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Relaxed)
    }

    /// Records that a client's stream failed with `error`.
    pub fn fail(&self, stats: &Mutex<ClientStats>, error: String) {
        if let Ok(mut s) = stats.lock() {
            s.error = Some(error);
        }
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `bytes` hold the marker.
    fn marks(&self, bytes: &[u8]) -> bool {
        !self.marker.needle().is_empty() && self.marker.find(bytes).is_some()
    }

    fn change_written(&self) -> bool {
        self.changed.get().is_some()
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s.to_string())),
    }
}

pub(super) fn node(who: &Identity) -> Node {
    let labels = Struct {
        fields: who
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), string_value(v)))
            .collect(),
    };
    let metadata = Struct {
        fields: [
            ("NAMESPACE".to_string(), string_value(&who.namespace)),
            (
                "LABELS".to_string(),
                Value {
                    kind: Some(value::Kind::StructValue(labels)),
                },
            ),
        ]
        .into(),
    };
    Node {
        id: who.id.clone(),
        cluster: format!("loadgen.{}", who.namespace),
        metadata: Some(metadata),
        ..Default::default()
    }
}

// What the simulator reads of clusters and listeners, in their wire
// format: prost skips every other field without building it, as a proxy
// that needs only these would.

/// A Cluster's name and discovery type (`type`, in a oneof).
#[derive(Clone, PartialEq, prost::Message)]
struct ClusterHead {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int32, optional, tag = "2")]
    discovery_type: Option<i32>,
}

/// A Listener's filter chains.
#[derive(Clone, PartialEq, prost::Message)]
struct ListenerHead {
    #[prost(message, repeated, tag = "3")]
    filter_chains: Vec<ChainHead>,
    #[prost(message, optional, tag = "25")]
    default_filter_chain: Option<ChainHead>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ChainHead {
    #[prost(message, repeated, tag = "3")]
    filters: Vec<FilterHead>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct FilterHead {
    #[prost(message, optional, tag = "4")]
    typed_config: Option<Any>,
}

/// An HttpConnectionManager's RDS source.
#[derive(Clone, PartialEq, prost::Message)]
struct HcmHead {
    #[prost(message, optional, tag = "3")]
    rds: Option<RdsHead>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RdsHead {
    #[prost(string, tag = "2")]
    route_config_name: String,
}

/// An `Any` as the simulator reads it: both fields left as slices of the
/// received message, so a response of a thousand resources is not copied
/// a thousand times (`type_url` is a string on the wire, read as bytes).
#[derive(Clone, PartialEq, prost::Message)]
struct AnyHead {
    #[prost(bytes = "bytes", tag = "1")]
    type_url: bytes::Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    value: bytes::Bytes,
}

impl AnyHead {
    fn to_any(&self) -> Any {
        Any {
            type_url: String::from_utf8_lossy(&self.type_url).into_owned(),
            value: self.value.to_vec(),
        }
    }
}

/// A `DiscoveryResponse` as the simulator reads it.
#[derive(Clone, PartialEq, prost::Message)]
struct SotwResponse {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(message, repeated, tag = "2")]
    resources: Vec<AnyHead>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    nonce: String,
}

/// A `DeltaDiscoveryResponse` as the simulator reads it.
#[derive(Clone, PartialEq, prost::Message)]
struct DeltaResponse {
    #[prost(message, repeated, tag = "2")]
    resources: Vec<ResourceHead>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    nonce: String,
    #[prost(string, repeated, tag = "6")]
    removed_resources: Vec<String>,
}

/// A delta `Resource`: its name (a slice, made a `String` only for the
/// clusters and listeners the simulator keeps) and the resource.
#[derive(Clone, PartialEq, prost::Message)]
struct ResourceHead {
    #[prost(message, optional, tag = "2")]
    resource: Option<AnyHead>,
    #[prost(bytes = "bytes", tag = "3")]
    name: bytes::Bytes,
}

/// Received bytes not read yet, as the chunks (HTTP/2 DATA frames) they
/// came in. A response is decoded from its chunks where they lie: a field
/// within one chunk is a slice of it, and only a field that straddles two
/// is copied, and what was read is freed for the next stream's use. So no
/// simulated proxy keeps a buffer the size of its largest response
/// (tonic's decoder keeps one per stream: at 2,000 proxies, 1.2 GB and
/// 300,000 page faults on the cores the sync is measured on).
#[derive(Debug, Default)]
struct Chunks {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Chunks {
    fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.len += data.len();
            self.chunks.push_back(data);
        }
    }

    /// The first `n` bytes (at most all), as chunks of their own.
    fn split_to(&mut self, n: usize) -> Chunks {
        let mut taken = Chunks::default();
        while taken.len < n {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let want = n - taken.len;
            let part = if front.len() <= want {
                self.chunks.pop_front().unwrap_or_default()
            } else {
                front.split_to(want)
            };
            self.len -= part.len();
            taken.push(part);
        }
        taken
    }
}

impl Buf for Chunks {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| &c[..])
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let step = n.min(front.len());
            front.advance(step);
            self.len -= step;
            n -= step;
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        if let Some(front) = self.chunks.front_mut() {
            if front.len() >= len {
                let bytes = front.split_to(len);
                self.len -= len;
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                return bytes;
            }
        }
        let mut copy = bytes::BytesMut::with_capacity(len);
        copy.put((&mut *self).take(len));
        copy.freeze()
    }
}

/// The responses of one ADS stream, each decoded into `R` with its size
/// on the wire (the heads leave fields out, so their own encoded length
/// would be short of it).
struct Responses<R> {
    body: tonic::body::Body,
    received: Chunks,
    /// The length of the message being received, once its prefix is read.
    message: Option<usize>,
    _response: std::marker::PhantomData<fn() -> R>,
}

impl<R: Message + Default> Responses<R> {
    fn new(body: tonic::body::Body) -> Responses<R> {
        Responses {
            body,
            received: Chunks::default(),
            message: None,
            _response: std::marker::PhantomData,
        }
    }

    /// The next response; `None` when the stream ends with an OK status.
    async fn message(&mut self) -> Result<Option<(R, usize)>, tonic::Status> {
        use http_body_util::BodyExt;
        loop {
            if self.message.is_none() && self.received.len >= 5 {
                let mut prefix = [0u8; 5];
                self.received.copy_to_slice(&mut prefix);
                if prefix[0] != 0 {
                    return Err(tonic::Status::internal("a compressed response"));
                }
                let [_, a, b, c, d] = prefix;
                self.message = Some(u32::from_be_bytes([a, b, c, d]) as usize);
            }
            if let Some(len) = self.message.filter(|len| self.received.len >= *len) {
                self.message = None;
                let mut message = self.received.split_to(len);
                return R::decode(&mut message)
                    .map(|r| Some((r, len)))
                    .map_err(|e| tonic::Status::internal(format!("a response does not decode: {e}")));
            }
            let Some(frame) = self.body.frame().await else {
                if self.message.is_some() || self.received.len > 0 {
                    return Err(tonic::Status::internal("the stream ended inside a response"));
                }
                return Ok(None);
            };
            match frame?.into_data() {
                Ok(data) => self.received.push(data),
                Err(frame) => {
                    if let Some(status) = frame.trailers_ref().and_then(tonic::Status::from_header_map) {
                        if status.code() != tonic::Code::Ok {
                            return Err(status);
                        }
                    }
                }
            }
        }
    }
}

/// A message with its gRPC prefix (uncompressed).
fn framed(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = bytes::BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    message.encode_raw(&mut buf);
    buf.freeze()
}

/// The EDS clusters a response's clusters name (their encoded values).
fn eds_names<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> BTreeSet<String> {
    values.into_iter().filter_map(eds_name).collect()
}

/// The name of a cluster (its encoded value) if it takes its endpoints
/// from EDS.
fn eds_name(value: &[u8]) -> Option<String> {
    ClusterHead::decode(value)
        .ok()
        .filter(|c| c.discovery_type == Some(cluster::DiscoveryType::Eds as i32))
        .map(|c| c.name)
}

/// The route tables a response's listeners name over RDS (their encoded
/// values).
fn rds_names<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for l in values.into_iter().filter_map(|v| ListenerHead::decode(v).ok()) {
        for chain in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
            for any in chain.filters.iter().filter_map(|f| f.typed_config.as_ref()) {
                if !any.type_url.ends_with("HttpConnectionManager") {
                    continue;
                }
                if let Ok(HcmHead { rds: Some(rds) }) = HcmHead::decode(any.value.as_slice()) {
                    names.insert(rds.route_config_name);
                }
            }
        }
    }
    names
}

/// Records one response (already ACKed).
fn record(stats: &Mutex<ClientStats>, shared: &Shared, t: XdsType, bytes: usize, resources: &[&AnyHead]) {
    let carries = resources.iter().any(|a| shared.marks(&a.value));
    let after = shared.change_written();
    if let Ok(mut s) = stats.lock() {
        *s.responses.entry(t).or_default() += 1;
        shared.responses.fetch_add(1, Ordering::Relaxed);
        if after {
            *s.since_change.entry(t).or_default() += 1;
            s.bytes_since_change += bytes as u64;
            if carries && s.changed_at.is_none() {
                s.changed_at = Some(Instant::now());
                shared.holding.fetch_add(1, Ordering::Relaxed);
            }
            if s.capture {
                let n = s.captured.len();
                s.captured.push(DiscoveryResponse {
                    type_url: t.url().to_string(),
                    version_info: format!("replay-{n}"),
                    nonce: n.to_string(),
                    resources: resources.iter().map(|a| a.to_any()).collect(),
                    ..Default::default()
                });
            }
        }
    }
}

/// Which types the client has received since it subscribed to them.
#[derive(Default)]
struct Sync {
    received: BTreeSet<XdsType>,
    /// Whether the client subscribes to any endpoints, any route tables.
    eds: bool,
    rds: bool,
    /// Whether the client was counted in sync (once).
    counted: bool,
}

impl Sync {
    fn done(&self) -> bool {
        self.received.contains(&XdsType::Cluster)
            && self.received.contains(&XdsType::Listener)
            && (!self.eds || self.received.contains(&XdsType::Endpoint))
            && (!self.rds || self.received.contains(&XdsType::Route))
    }
}

/// Records when the client was first in sync.
fn mark_synced(stats: &Mutex<ClientStats>, shared: &Shared, sync: &mut Sync) {
    if sync.counted || !sync.done() {
        return;
    }
    sync.counted = true;
    if let Ok(mut s) = stats.lock() {
        s.synced_at = Some(Instant::now());
    }
    shared.synced.fetch_add(1, Ordering::Relaxed);
}

/// A state-of-the-world request as the simulator sends it: a
/// `DiscoveryRequest` in its wire format whose node (Envoy sends it on
/// every request) and subscribed names were encoded once. An ACK then
/// costs the simulator a copy of bytes, so the cores it shares with meshd
/// go to meshd. Encode only.
#[derive(Debug, Clone, Default)]
struct Ack {
    version_info: String,
    /// The encoded `Node` (field 2).
    node: bytes::Bytes,
    /// Every `resource_names` entry (field 3), encoded.
    names: bytes::Bytes,
    type_url: &'static str,
    response_nonce: String,
}

/// A length-delimited field: key, length, bytes.
fn put_field(tag: u32, value: &[u8], buf: &mut impl bytes::BufMut) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(value.len() as u64, buf);
    buf.put_slice(value);
}

fn field_len(tag: u32, value: &[u8]) -> usize {
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(value.len() as u64) + value.len()
}

impl prost::Message for Ack {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        if !self.version_info.is_empty() {
            put_field(1, self.version_info.as_bytes(), buf);
        }
        put_field(2, &self.node, buf);
        buf.put_slice(&self.names);
        put_field(4, self.type_url.as_bytes(), buf);
        if !self.response_nonce.is_empty() {
            put_field(5, self.response_nonce.as_bytes(), buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        let optional = |tag: u32, s: &str| {
            if s.is_empty() {
                0
            } else {
                field_len(tag, s.as_bytes())
            }
        };
        optional(1, &self.version_info)
            + field_len(2, &self.node)
            + self.names.len()
            + field_len(4, self.type_url.as_bytes())
            + optional(5, &self.response_nonce)
    }

    fn clear(&mut self) {
        *self = Ack::default();
    }
}

/// What a state-of-the-world client sends, built once: its node and, per
/// type, its subscribed names.
struct SotwRequests {
    node: bytes::Bytes,
    names: BTreeMap<XdsType, bytes::Bytes>,
}

impl SotwRequests {
    fn new(who: &Identity) -> SotwRequests {
        SotwRequests {
            node: node(who).encode_to_vec().into(),
            names: BTreeMap::new(),
        }
    }

    fn subscribe(&mut self, t: XdsType, names: &BTreeSet<String>) {
        let mut encoded = Vec::new();
        for n in names {
            prost::encoding::string::encode(3, n, &mut encoded);
        }
        self.names.insert(t, encoded.into());
    }

    fn request(&self, t: XdsType, version: &str, nonce: &str) -> Ack {
        Ack {
            version_info: version.to_string(),
            node: self.node.clone(),
            names: self.names.get(&t).cloned().unwrap_or_default(),
            type_url: t.url(),
            response_nonce: nonce.to_string(),
        }
    }
}

/// Opens an ADS stream (`method`: `StreamAggregatedResources` or
/// `DeltaAggregatedResources`) that sends what `rx` gives.
async fn open<Q, R>(
    mut channel: Channel,
    method: &'static str,
    rx: mpsc::Receiver<Q>,
) -> Result<Responses<R>, tonic::Status>
where
    Q: Message + Send + 'static,
    R: Message + Default,
{
    use tonic::codegen::http;
    use tonic::codegen::Service;
    futures::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting: {e}")))?;
    let frames = ReceiverStream::new(rx).map(|q| Ok::<_, tonic::Status>(http_body::Frame::data(framed(&q))));
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/{method}"
        ))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(frames)))
        .map_err(|e| tonic::Status::internal(format!("{method}: {e}")))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{method}: {e}")))?;
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
    }
    if response.status() != http::StatusCode::OK {
        return Err(tonic::Status::unknown(format!(
            "{method}: HTTP {}",
            response.status()
        )));
    }
    Ok(Responses::new(response.into_body()))
}

/// Runs one state-of-the-world client until the stream ends.
pub async fn run_sotw(
    channel: Channel,
    who: Identity,
    stats: Arc<Mutex<ClientStats>>,
    shared: Arc<Shared>,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel::<Ack>(64);
    let mut requests = SotwRequests::new(&who);
    for t in [XdsType::Cluster, XdsType::Listener] {
        let _ = tx.send(requests.request(t, "", "")).await;
    }
    let mut stream = open::<Ack, SotwResponse>(channel, "StreamAggregatedResources", rx).await?;
    let mut sync = Sync::default();
    // The names subscribed to, per type.
    let mut subscribed: BTreeMap<XdsType, BTreeSet<String>> = BTreeMap::new();
    // Last (version, nonce) per type, for requests that change names.
    let mut last: BTreeMap<XdsType, (String, String)> = BTreeMap::new();
    while let Some((resp, size)) = stream.message().await? {
        let Some(t) = XdsType::from_url(&resp.type_url) else {
            continue;
        };
        if tx
            .send(requests.request(t, &resp.version_info, &resp.nonce))
            .await
            .is_err()
        {
            break;
        }
        let anys: Vec<&AnyHead> = resp.resources.iter().collect();
        record(&stats, &shared, t, size, &anys);
        last.insert(t, (resp.version_info.clone(), resp.nonce.clone()));
        sync.received.insert(t);
        let values = || resp.resources.iter().map(|a| &a.value[..]);
        let follow = match t {
            XdsType::Cluster => Some((XdsType::Endpoint, eds_names(values()))),
            XdsType::Listener => Some((XdsType::Route, rds_names(values()))),
            _ => None,
        };
        if let Some((dep, wanted)) = follow {
            let held = subscribed.entry(dep).or_default();
            if *held != wanted {
                requests.subscribe(dep, &wanted);
                if dep == XdsType::Endpoint {
                    sync.eds = !wanted.is_empty();
                } else {
                    sync.rds = !wanted.is_empty();
                }
                *held = wanted;
                let (version, nonce) = last.get(&dep).cloned().unwrap_or_default();
                if tx.send(requests.request(dep, &version, &nonce)).await.is_err() {
                    break;
                }
            }
        }
        mark_synced(&stats, &shared, &mut sync);
    }
    Ok(())
}

/// What a delta client's held listeners name: their route tables, per
/// listener and counted (listeners may share one), so that an update of a
/// few listeners changes the subscriptions by what those few name.
#[derive(Default)]
struct Follows {
    /// Each held resource's names.
    held: HashMap<String, Vec<String>, foldhash::fast::RandomState>,
    /// How many held resources name each.
    named: HashMap<String, usize, foldhash::fast::RandomState>,
}

/// Names to subscribe to and to drop.
#[derive(Default)]
struct Subscription {
    subscribe: Vec<String>,
    unsubscribe: Vec<String>,
}

impl Subscription {
    /// `name` is wanted now (dropped and wanted again within one
    /// response: neither).
    fn want(&mut self, name: &str) {
        match self.unsubscribe.iter().position(|u| u == name) {
            Some(i) => {
                self.unsubscribe.swap_remove(i);
            }
            None => self.subscribe.push(name.to_string()),
        }
    }

    /// `name` is no longer wanted (wanted and dropped within one
    /// response: neither).
    fn drop_name(&mut self, name: String) {
        match self.subscribe.iter().position(|s| *s == name) {
            Some(i) => {
                self.subscribe.swap_remove(i);
            }
            None => self.unsubscribe.push(name),
        }
    }
}

/// A delta client's EDS clusters: those of its held clusters that take
/// their endpoints from EDS, each by its own name (the cluster's name is
/// all the simulator reads of it besides its type).
#[derive(Default)]
struct EdsClusters(HashSet<String, foldhash::fast::RandomState>);

impl EdsClusters {
    /// The cluster `name` is held now, and is an EDS cluster or not.
    fn hold(&mut self, name: &str, eds: bool, changes: &mut Subscription) {
        if !eds {
            self.drop_resource(name, changes);
        } else if !self.0.contains(name) {
            self.0.insert(name.to_string());
            changes.want(name);
        }
    }

    /// The cluster `name` is no longer held.
    fn drop_resource(&mut self, name: &str, changes: &mut Subscription) {
        if let Some(name) = self.0.take(name) {
            changes.drop_name(name);
        }
    }
}

impl Follows {
    /// The resource `name` is held and names `names` now.
    fn hold(&mut self, name: String, names: Vec<String>, changes: &mut Subscription) {
        for n in &names {
            let count = self.named.entry(n.clone()).or_default();
            *count += 1;
            if *count == 1 {
                changes.want(n);
            }
        }
        if let Some(before) = self.held.insert(name, names) {
            self.forget(before, changes);
        }
    }

    /// The resource `name` is no longer held.
    fn drop_resource(&mut self, name: &str, changes: &mut Subscription) {
        if let Some(before) = self.held.remove(name) {
            self.forget(before, changes);
        }
    }

    fn forget(&mut self, names: Vec<String>, changes: &mut Subscription) {
        for n in names {
            let Some(count) = self.named.get_mut(&n) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                self.named.remove(&n);
                changes.drop_name(n);
            }
        }
    }
}

/// Runs one incremental (delta) client until the stream ends.
pub async fn run_delta(
    channel: Channel,
    who: Identity,
    stats: Arc<Mutex<ClientStats>>,
    shared: Arc<Shared>,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
    let node = node(&who);
    for t in [XdsType::Cluster, XdsType::Listener] {
        let _ = tx
            .send(DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: t.url().to_string(),
                ..Default::default()
            })
            .await;
    }
    let mut stream =
        open::<DeltaDiscoveryRequest, DeltaResponse>(channel, "DeltaAggregatedResources", rx).await?;
    let mut sync = Sync::default();
    let mut eds = EdsClusters::default();
    let mut routes = Follows::default();
    while let Some((resp, size)) = stream.message().await? {
        let Some(t) = XdsType::from_url(&resp.type_url) else {
            continue;
        };
        let ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        if tx.send(ack).await.is_err() {
            break;
        }
        let anys: Vec<&AnyHead> = resp
            .resources
            .iter()
            .filter_map(|r| r.resource.as_ref())
            .collect();
        record(&stats, &shared, t, size, &anys);
        sync.received.insert(t);
        let dep = match t {
            XdsType::Cluster => Some(XdsType::Endpoint),
            XdsType::Listener => Some(XdsType::Route),
            _ => None,
        };
        if let Some(dep) = dep {
            let mut changes = Subscription::default();
            for r in &resp.resources {
                let Some(any) = &r.resource else { continue };
                let name = String::from_utf8_lossy(&r.name);
                if t == XdsType::Cluster {
                    eds.hold(&name, eds_name(&any.value).is_some(), &mut changes);
                } else {
                    let named = rds_names([&any.value[..]]).into_iter().collect();
                    routes.hold(name.into_owned(), named, &mut changes);
                }
            }
            for name in &resp.removed_resources {
                if t == XdsType::Cluster {
                    eds.drop_resource(name, &mut changes);
                } else {
                    routes.drop_resource(name, &mut changes);
                }
            }
            sync.eds = !eds.0.is_empty();
            sync.rds = !routes.named.is_empty();
            if !changes.subscribe.is_empty() || !changes.unsubscribe.is_empty() {
                let req = DeltaDiscoveryRequest {
                    type_url: dep.url().to_string(),
                    resource_names_subscribe: changes.subscribe,
                    resource_names_unsubscribe: changes.unsubscribe,
                    ..Default::default()
                };
                if tx.send(req).await.is_err() {
                    break;
                }
            }
        }
        mark_synced(&stats, &shared, &mut sync);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        http_connection_manager::RouteSpecifier, HttpConnectionManager,
    };

    /// An `Ack` is the `DiscoveryRequest` Envoy would send.
    #[test]
    fn an_ack_is_a_discovery_request() {
        use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
        let who = Identity {
            id: "sidecar~10.1.0.9~a-0.default~default.svc.cluster.local".into(),
            namespace: "default".into(),
            labels: [("app".to_string(), "a".to_string())].into(),
        };
        let mut requests = SotwRequests::new(&who);
        let names: BTreeSet<String> =
            ["outbound|80||a.default.svc.cluster.local".to_string(), "é".into()].into();
        requests.subscribe(XdsType::Endpoint, &names);
        let ack = requests.request(XdsType::Endpoint, "v1", "7");
        let read = DiscoveryRequest::decode(ack.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(ack.encoded_len(), ack.encode_to_vec().len());
        assert_eq!(
            read,
            DiscoveryRequest {
                version_info: "v1".into(),
                node: Some(node(&who)),
                resource_names: names.into_iter().collect(),
                type_url: XdsType::Endpoint.url().into(),
                response_nonce: "7".into(),
                ..Default::default()
            }
        );
    }

    /// The names read from the heads are those the full messages hold, for
    /// what meshd sends a sidecar and a gateway of a golden scenario.
    #[test]
    fn heads_read_what_the_full_messages_hold() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden/http-routing/config");
        let config =
            crate::config::ConfigSnapshot::from_files(crate::source::load_dir(&dir).expect("testdata"));
        let cache =
            crate::xds::SnapshotCache::new(Arc::new(crate::model::PushContext::new(Arc::new(config))));
        let proxies = [
            (
                "sidecar~10.1.0.9~client-0.default~default.svc.cluster.local",
                serde_json::json!({}),
            ),
            (
                "router~10.9.0.1~gw-0.istio-system~istio-system.svc.cluster.local",
                serde_json::json!({"LABELS": {"istio": "ingressgateway"}}),
            ),
        ];
        for (id, meta) in proxies {
            let proxy = crate::model::Proxy::parse(id, meta.as_object().expect("object")).expect("proxy");
            let snapshot = cache.snapshot(&proxy);
            let anys = |t: XdsType| -> Vec<Any> {
                snapshot
                    .of(t)
                    .into_iter()
                    .flatten()
                    .map(|(_, e)| e.body())
                    .collect()
            };
            let clusters = anys(XdsType::Cluster);
            let full: BTreeSet<String> = clusters
                .iter()
                .filter_map(|a| Cluster::decode(a.value.as_slice()).ok())
                .filter(|c| {
                    c.cluster_discovery_type
                        == Some(cluster::ClusterDiscoveryType::Type(
                            cluster::DiscoveryType::Eds as i32,
                        ))
                })
                .map(|c| c.name)
                .collect();
            assert!(!full.is_empty(), "{id} has EDS clusters");
            assert_eq!(
                eds_names(clusters.iter().map(|a| a.value.as_slice())),
                full,
                "{id}"
            );
            let listeners = anys(XdsType::Listener);
            let mut full = BTreeSet::new();
            for l in listeners
                .iter()
                .filter_map(|a| Listener::decode(a.value.as_slice()).ok())
            {
                for chain in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
                    for f in &chain.filters {
                        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                            continue;
                        };
                        if let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice()) {
                            if let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier {
                                full.insert(rds.route_config_name);
                            }
                        }
                    }
                }
            }
            assert!(!full.is_empty(), "{id} has RDS route tables");
            assert_eq!(
                rds_names(listeners.iter().map(|a| a.value.as_slice())),
                full,
                "{id}"
            );
        }
    }

    /// A stream's DATA frames: each message with its gRPC prefix, cut into
    /// `cut`-byte frames (so fields straddle them), then `status` as
    /// trailers.
    fn frames(messages: &[Vec<u8>], cut: usize, status: Option<tonic::Status>) -> tonic::body::Body {
        let mut wire = Vec::new();
        for m in messages {
            wire.push(0u8);
            wire.extend((m.len() as u32).to_be_bytes());
            wire.extend(m);
        }
        let mut frames: Vec<Result<http_body::Frame<Bytes>, tonic::Status>> = wire
            .chunks(cut)
            .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        if let Some(status) = status {
            let mut trailers = tonic::codegen::http::HeaderMap::new();
            status.add_header(&mut trailers).expect("a status encodes");
            frames.push(Ok(http_body::Frame::trailers(trailers)));
        }
        tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames)))
    }

    /// The heads read what the full responses hold, state of the world and
    /// incremental, whole or cut into frames of a few bytes, and the reader
    /// gives the size of the message as sent.
    #[tokio::test]
    async fn heads_read_responses_as_the_full_messages_do() {
        use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
        let anys = [
            Any {
                type_url: XdsType::Cluster.url().into(),
                value: b"\x0a\x03abc".to_vec(),
            },
            Any {
                type_url: XdsType::Cluster.url().into(),
                value: b"\x0a\x01\xc3\xa9".to_vec(),
            },
        ];
        let sotw = DiscoveryResponse {
            version_info: "v1".into(),
            resources: anys.to_vec(),
            canary: true,
            type_url: XdsType::Cluster.url().into(),
            nonce: "3".into(),
            ..Default::default()
        };
        let delta = DeltaDiscoveryResponse {
            system_version_info: "s".into(),
            resources: anys
                .iter()
                .enumerate()
                .map(|(i, a)| Resource {
                    name: format!("c{i}"),
                    version: "v".into(),
                    resource: Some(a.clone()),
                    ..Default::default()
                })
                .collect(),
            type_url: XdsType::Cluster.url().into(),
            removed_resources: vec!["gone".into()],
            nonce: "4".into(),
            ..Default::default()
        };
        async fn decode<R: Message + Default + PartialEq + std::fmt::Debug>(message: Vec<u8>) -> (R, usize) {
            let mut whole = Responses::<R>::new(frames(std::slice::from_ref(&message), usize::MAX, None));
            let (head, size) = whole.message().await.expect("decodes").expect("a response");
            assert!(whole.message().await.expect("ends well").is_none());
            for cut in [1, 7, 20] {
                let mut cut_up = Responses::<R>::new(frames(&[message.clone(), message.clone()], cut, None));
                for _ in 0..2 {
                    let read = cut_up.message().await.expect("decodes").expect("a response");
                    assert_eq!((&read.0, read.1), (&head, size), "cut into {cut}-byte frames");
                }
                assert!(cut_up.message().await.expect("ends well").is_none());
            }
            (head, size)
        }
        let (head, size) = decode::<SotwResponse>(sotw.encode_to_vec()).await;
        assert_eq!(size, sotw.encoded_len());
        assert_eq!(
            (
                head.version_info.as_str(),
                head.type_url.as_str(),
                head.nonce.as_str()
            ),
            ("v1", sotw.type_url.as_str(), "3")
        );
        assert_eq!(
            head.resources.iter().map(AnyHead::to_any).collect::<Vec<_>>(),
            anys
        );
        let (head, size) = decode::<DeltaResponse>(delta.encode_to_vec()).await;
        assert_eq!(size, delta.encoded_len());
        assert_eq!(
            (head.type_url.as_str(), head.nonce.as_str()),
            (delta.type_url.as_str(), "4")
        );
        assert_eq!(head.removed_resources, ["gone"]);
        let names: Vec<&[u8]> = head.resources.iter().map(|r| &r.name[..]).collect();
        assert_eq!(names, [&b"c0"[..], b"c1"]);
        let read: Vec<Any> = (head.resources.iter())
            .filter_map(|r| r.resource.as_ref().map(AnyHead::to_any))
            .collect();
        assert_eq!(read, anys);
    }

    /// A delta client subscribes to what its held resources name, counted
    /// across them, and to nothing twice.
    #[test]
    fn follows_count_what_held_resources_name() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut follows = Follows::default();
        let mut first = Subscription::default();
        follows.hold("l1".into(), names(&["80", "90"]), &mut first);
        follows.hold("l2".into(), names(&["80"]), &mut first);
        assert_eq!(
            (first.subscribe, first.unsubscribe),
            (names(&["80", "90"]), names(&[]))
        );

        let mut same = Subscription::default();
        follows.hold("l1".into(), names(&["80", "90"]), &mut same);
        assert!(same.subscribe.is_empty() && same.unsubscribe.is_empty());

        // l1 drops 90 and l2 goes; 80 is still named by l1.
        let mut fewer = Subscription::default();
        follows.hold("l1".into(), names(&["80"]), &mut fewer);
        follows.drop_resource("l2", &mut fewer);
        assert_eq!((fewer.subscribe, fewer.unsubscribe), (names(&[]), names(&["90"])));

        // Within one response, 80 is dropped by l1 and named by l3: it
        // stays; 70 is named by l1 then dropped with it: never asked for.
        let mut moved = Subscription::default();
        follows.hold("l1".into(), names(&["70"]), &mut moved);
        follows.hold("l3".into(), names(&["80"]), &mut moved);
        follows.drop_resource("l1", &mut moved);
        assert_eq!((moved.subscribe, moved.unsubscribe), (names(&[]), names(&[])));
        assert_eq!(follows.named.keys().collect::<Vec<_>>(), ["80"]);
    }

    /// A delta client subscribes to the endpoints of its EDS clusters, by
    /// their names, and drops them with the clusters.
    #[test]
    fn eds_clusters_follow_the_held_clusters() {
        let mut eds = EdsClusters::default();
        let mut first = Subscription::default();
        eds.hold("a", true, &mut first);
        eds.hold("b", true, &mut first);
        eds.hold("static", false, &mut first);
        eds.hold("a", true, &mut first);
        assert_eq!(
            (first.subscribe, first.unsubscribe),
            (vec!["a".to_string(), "b".into()], vec![])
        );

        let mut next = Subscription::default();
        eds.hold("a", false, &mut next);
        eds.drop_resource("b", &mut next);
        eds.drop_resource("never held", &mut next);
        eds.hold("c", true, &mut next);
        eds.drop_resource("c", &mut next);
        assert_eq!(
            (next.subscribe, next.unsubscribe),
            (vec![], vec!["a".to_string(), "b".into()])
        );
        assert!(eds.0.is_empty());
    }

    /// A stream that ends with an error status, or inside a response, is an
    /// error; one that ends with OK is the end.
    #[tokio::test]
    async fn a_stream_ends_as_its_status_says() {
        let message = DiscoveryResponse {
            nonce: "1".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let refused = tonic::Status::permission_denied("no");
        let mut responses =
            Responses::<SotwResponse>::new(frames(std::slice::from_ref(&message), 3, Some(refused)));
        assert_eq!(
            responses.message().await.expect("a response").map(|r| r.0.nonce),
            Some("1".into())
        );
        let err = responses.message().await.expect_err("the status");
        assert_eq!((err.code(), err.message()), (tonic::Code::PermissionDenied, "no"));

        let ok = Some(tonic::Status::ok(""));
        let mut responses = Responses::<SotwResponse>::new(frames(std::slice::from_ref(&message), 3, ok));
        assert!(responses.message().await.expect("a response").is_some());
        assert!(responses.message().await.expect("ends well").is_none());

        let mut cut_short = message.clone();
        cut_short.truncate(message.len() - 1);
        let mut wire = vec![0u8];
        wire.extend((message.len() as u32).to_be_bytes());
        wire.extend(cut_short);
        let body = tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter([Ok::<
            _,
            tonic::Status,
        >(
            http_body::Frame::data(Bytes::from(wire)),
        )])));
        let err = Responses::<SotwResponse>::new(body)
            .message()
            .await
            .expect_err("cut short");
        assert_eq!(err.code(), tonic::Code::Internal);
    }

    /// A client knows a resource carries the change by the marker in its
    /// bytes, wherever it is.
    #[test]
    fn the_marker_is_found_anywhere_in_a_resource_and_nowhere_else() {
        let shared = Shared::new(b"loadgen-change");
        assert!(shared.marks(b"loadgen-change"));
        assert!(shared.marks(b"\x0a\x12x-loadgen-change-y"));
        assert!(!shared.marks(b"loadgen-chang"));
        assert!(!shared.marks(b""));
        assert!(!Shared::new(b"").marks(b"anything"));
    }
}
