//! An in-process ADS client for tests: one state-of-the-world stream that
//! subscribes like Envoy (wildcard CDS and LDS, named EDS, RDS and SDS),
//! ACKs every response and keeps what it was sent.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::protobuf::{value::Kind, Any, Struct, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub const CLUSTERS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const LISTENERS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const ROUTES: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRETS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// What the client holds, by type and resource name.
type Held = Arc<Mutex<HashMap<String, BTreeMap<String, Any>>>>;

pub struct AdsClient {
    held: Held,
    _runtime: tokio::runtime::Runtime,
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

impl AdsClient {
    /// Connects to `127.0.0.1:port` as `node_id` with these labels and
    /// namespace, and subscribes to `subscriptions` (type URL, resource
    /// names; no names is a wildcard).
    pub fn connect(
        port: u16,
        node_id: &str,
        namespace: &str,
        labels: &[(&str, &str)],
        subscriptions: &[(&str, &[&str])],
    ) -> AdsClient {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let held: Held = Arc::default();
        let labels = Struct {
            fields: labels.iter().map(|(k, v)| (k.to_string(), string(v))).collect(),
        };
        let metadata = Struct {
            fields: [
                ("NAMESPACE".to_string(), string(namespace)),
                (
                    "LABELS".to_string(),
                    Value {
                        kind: Some(Kind::StructValue(labels)),
                    },
                ),
            ]
            .into(),
        };
        let node = Node {
            id: node_id.into(),
            cluster: "test".into(),
            metadata: Some(metadata),
            ..Default::default()
        };
        let subscriptions: Vec<(String, Vec<String>)> = subscriptions
            .iter()
            .map(|(t, names)| (t.to_string(), names.iter().map(|n| n.to_string()).collect()))
            .collect();
        let store = held.clone();
        runtime.spawn(async move {
            let mut client = loop {
                match AggregatedDiscoveryServiceClient::connect(format!("http://127.0.0.1:{port}")).await {
                    Ok(c) => break c,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            let (tx, rx) = mpsc::channel(64);
            let names: HashMap<String, Vec<String>> = subscriptions.iter().cloned().collect();
            for (type_url, resource_names) in &subscriptions {
                let request = DiscoveryRequest {
                    node: Some(node.clone()),
                    type_url: type_url.clone(),
                    resource_names: resource_names.clone(),
                    ..Default::default()
                };
                let _ = tx.send(request).await;
            }
            let Ok(response) = client.stream_aggregated_resources(ReceiverStream::new(rx)).await else {
                return;
            };
            let mut responses = response.into_inner();
            while let Ok(Some(r)) = responses.message().await {
                {
                    let mut held = store.lock().expect("held");
                    let of_type = held.entry(r.type_url.clone()).or_default();
                    // CDS and LDS responses hold the whole set; EDS, RDS and
                    // SDS responses may hold only what changed.
                    if r.type_url == CLUSTERS || r.type_url == LISTENERS {
                        of_type.clear();
                    }
                    for any in r.resources {
                        let name = resource_name(&r.type_url, &any);
                        of_type.insert(name, any);
                    }
                }
                let ack = DiscoveryRequest {
                    node: Some(node.clone()),
                    type_url: r.type_url.clone(),
                    version_info: r.version_info.clone(),
                    response_nonce: r.nonce.clone(),
                    resource_names: names.get(&r.type_url).cloned().unwrap_or_default(),
                    ..Default::default()
                };
                if tx.send(ack).await.is_err() {
                    return;
                }
            }
        });
        AdsClient {
            held,
            _runtime: runtime,
        }
    }

    /// The names of the resources of a type the client holds.
    pub fn names(&self, type_url: &str) -> Vec<String> {
        let held = self.held.lock().expect("held");
        held.get(type_url)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// One resource, decoded.
    pub fn get<M: prost::Message + Default>(&self, type_url: &str, name: &str) -> Option<M> {
        let held = self.held.lock().expect("held");
        let any = held.get(type_url)?.get(name)?;
        M::decode(any.value.as_slice()).ok()
    }
}

/// The name of a resource, read from its first field (every xDS resource
/// type keeps its name there; a ClusterLoadAssignment's is `cluster_name`).
fn resource_name(_type_url: &str, any: &Any) -> String {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Named {
        #[prost(string, tag = "1")]
        name: String,
    }
    <Named as prost::Message>::decode(any.value.as_slice())
        .map(|n| n.name)
        .unwrap_or_default()
}
