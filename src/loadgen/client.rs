//! A simulated proxy: one ADS stream (state of the world or incremental)
//! that subscribes as Envoy does (clusters and listeners by wildcard, then
//! the endpoints of its EDS clusters and the route tables its listeners
//! name) and ACKs every response at once. It records what it received, by
//! type and in bytes, when it was first in sync, and when it first held
//! the scripted change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{value, Any, Struct, Value};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::xds::server::SotwRequest;
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

/// What all clients share: the change's marker and when it was written.
#[derive(Debug)]
pub struct Shared {
    pub marker: Vec<u8>,
    pub changed: Mutex<Option<Instant>>,
}

impl Shared {
    fn change_written(&self) -> bool {
        self.changed.lock().map(|c| c.is_some()).unwrap_or(false)
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s.to_string())),
    }
}

fn node(who: &Identity) -> Node {
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

/// The EDS clusters a response's clusters name.
fn eds_names(resources: &[Any]) -> BTreeSet<String> {
    resources
        .iter()
        .filter_map(|a| Cluster::decode(a.value.as_slice()).ok())
        .filter(|c| {
            c.cluster_discovery_type
                == Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::Eds as i32,
                ))
        })
        .map(|c| c.name)
        .collect()
}

/// The route tables a response's listeners name over RDS.
fn rds_names(resources: &[Any]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for l in resources
        .iter()
        .filter_map(|a| Listener::decode(a.value.as_slice()).ok())
    {
        for chain in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
            for f in &chain.filters {
                let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    continue;
                };
                if !any.type_url.ends_with("HttpConnectionManager") {
                    continue;
                }
                if let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice()) {
                    if let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier {
                        names.insert(rds.route_config_name);
                    }
                }
            }
        }
    }
    names
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Records one response (already ACKed).
fn record(stats: &Mutex<ClientStats>, shared: &Shared, t: XdsType, bytes: usize, resources: &[Any]) {
    let carries = resources.iter().any(|a| contains(&a.value, &shared.marker));
    let after = shared.change_written();
    if let Ok(mut s) = stats.lock() {
        *s.responses.entry(t).or_default() += 1;
        if after {
            *s.since_change.entry(t).or_default() += 1;
            s.bytes_since_change += bytes as u64;
            if carries && s.changed_at.is_none() {
                s.changed_at = Some(Instant::now());
            }
            if s.capture {
                let n = s.captured.len();
                s.captured.push(DiscoveryResponse {
                    type_url: t.url().to_string(),
                    version_info: format!("replay-{n}"),
                    nonce: n.to_string(),
                    resources: resources.to_vec(),
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
    eds: BTreeSet<String>,
    rds: BTreeSet<String>,
}

impl Sync {
    fn done(&self) -> bool {
        self.received.contains(&XdsType::Cluster)
            && self.received.contains(&XdsType::Listener)
            && (self.eds.is_empty() || self.received.contains(&XdsType::Endpoint))
            && (self.rds.is_empty() || self.received.contains(&XdsType::Route))
    }
}

fn mark_synced(stats: &Mutex<ClientStats>, sync: &Sync) {
    if sync.done() {
        if let Ok(mut s) = stats.lock() {
            s.synced_at.get_or_insert_with(Instant::now);
        }
    }
}

/// What a state-of-the-world client sends, in the request's wire format,
/// built once: the node (Envoy sends it on every request) and, per type,
/// the subscribed names. An ACK then costs the simulator no more than a
/// few reference counts, so the cores it shares with meshd go to meshd.
struct SotwRequests {
    node: bytes::Bytes,
    names: BTreeMap<XdsType, Vec<bytes::Bytes>>,
}

impl SotwRequests {
    fn new(who: &Identity) -> SotwRequests {
        SotwRequests {
            node: node(who).encode_to_vec().into(),
            names: BTreeMap::new(),
        }
    }

    fn subscribe(&mut self, t: XdsType, names: &BTreeSet<String>) {
        let names = names.iter().map(|n| bytes::Bytes::from(n.clone())).collect();
        self.names.insert(t, names);
    }

    fn request(&self, t: XdsType, version: &str, nonce: &str) -> SotwRequest {
        SotwRequest {
            node: Some(self.node.clone()),
            type_url: t.url().to_string(),
            resource_names: self.names.get(&t).cloned().unwrap_or_default(),
            version_info: version.to_string(),
            response_nonce: nonce.to_string(),
            error_detail: None,
        }
    }
}

/// Runs one state-of-the-world client until the stream ends.
pub async fn run_sotw(
    channel: Channel,
    who: Identity,
    stats: Arc<Mutex<ClientStats>>,
    shared: Arc<Shared>,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel::<SotwRequest>(64);
    let mut requests = SotwRequests::new(&who);
    for t in [XdsType::Cluster, XdsType::Listener] {
        let _ = tx.send(requests.request(t, "", "")).await;
    }
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(usize::MAX);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    );
    let codec = tonic_prost::ProstCodec::<SotwRequest, DiscoveryResponse>::default();
    let mut stream = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, codec)
        .await?
        .into_inner();
    let mut sync = Sync::default();
    // Last (version, nonce) per type, for requests that change names.
    let mut last: BTreeMap<XdsType, (String, String)> = BTreeMap::new();
    while let Some(resp) = stream.message().await? {
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
        record(&stats, &shared, t, resp.encoded_len(), &resp.resources);
        last.insert(t, (resp.version_info.clone(), resp.nonce.clone()));
        sync.received.insert(t);
        let follow = match t {
            XdsType::Cluster => Some((XdsType::Endpoint, eds_names(&resp.resources))),
            XdsType::Listener => Some((XdsType::Route, rds_names(&resp.resources))),
            _ => None,
        };
        if let Some((dep, wanted)) = follow {
            let held = if dep == XdsType::Endpoint {
                &mut sync.eds
            } else {
                &mut sync.rds
            };
            if *held != wanted {
                requests.subscribe(dep, &wanted);
                *held = wanted;
                let (version, nonce) = last.get(&dep).cloned().unwrap_or_default();
                if tx.send(requests.request(dep, &version, &nonce)).await.is_err() {
                    break;
                }
            }
        }
        mark_synced(&stats, &sync);
    }
    Ok(())
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
    let mut client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(usize::MAX);
    let mut stream = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut sync = Sync::default();
    // Per held cluster and listener, what it names (its EDS cluster, its
    // route tables), to know the subscriptions after a partial update.
    let mut names: BTreeMap<XdsType, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    while let Some(resp) = stream.message().await? {
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
        let anys: Vec<Any> = resp.resources.iter().filter_map(|r| r.resource.clone()).collect();
        record(&stats, &shared, t, resp.encoded_len(), &anys);
        sync.received.insert(t);
        let names_of = |a: &Any| match t {
            XdsType::Cluster => eds_names(std::slice::from_ref(a)),
            XdsType::Listener => rds_names(std::slice::from_ref(a)),
            _ => BTreeSet::new(),
        };
        let held = names.entry(t).or_default();
        for r in &resp.resources {
            if let Some(any) = &r.resource {
                held.insert(r.name.clone(), names_of(any));
            }
        }
        for name in &resp.removed_resources {
            held.remove(name);
        }
        let wanted = held.values().flatten().cloned().collect::<BTreeSet<String>>();
        let follow = match t {
            XdsType::Cluster => Some((XdsType::Endpoint, wanted)),
            XdsType::Listener => Some((XdsType::Route, wanted)),
            _ => None,
        };
        if let Some((dep, wanted)) = follow {
            let current = if dep == XdsType::Endpoint {
                &mut sync.eds
            } else {
                &mut sync.rds
            };
            let subscribe: Vec<String> = wanted.difference(current).cloned().collect();
            let unsubscribe: Vec<String> = current.difference(&wanted).cloned().collect();
            if !subscribe.is_empty() || !unsubscribe.is_empty() {
                *current = wanted;
                let req = DeltaDiscoveryRequest {
                    type_url: dep.url().to_string(),
                    resource_names_subscribe: subscribe,
                    resource_names_unsubscribe: unsubscribe,
                    ..Default::default()
                };
                if tx.send(req).await.is_err() {
                    break;
                }
            }
        }
        mark_synced(&stats, &sync);
    }
    Ok(())
}
