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
    /// Why the stream ended, once it has.
    ended: Arc<Mutex<Option<String>>>,
    _runtime: tokio::runtime::Runtime,
}

/// Who a client says it is.
pub struct Claim<'a> {
    pub node_id: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    /// Sent as `authorization: Bearer TOKEN`.
    pub token: Option<&'a str>,
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
        let claim = Claim {
            node_id,
            namespace,
            service_account: "default",
            labels,
            token: None,
        };
        AdsClient::connect_as(port, &claim, subscriptions)
    }

    /// Connects with a full claim of identity.
    pub fn connect_as(port: u16, claim: &Claim<'_>, subscriptions: &[(&str, &[&str])]) -> AdsClient {
        let Claim {
            node_id,
            namespace,
            service_account,
            labels,
            token,
        } = *claim;
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
                ("SERVICE_ACCOUNT".to_string(), string(service_account)),
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
        let ended: Arc<Mutex<Option<String>>> = Arc::default();
        let end = ended.clone();
        let token = token.map(|t| format!("Bearer {t}"));
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
            let mut request = tonic::Request::new(ReceiverStream::new(rx));
            if let Some(token) = token.and_then(|t| t.parse().ok()) {
                request.metadata_mut().insert("authorization", token);
            }
            let fail = |status: tonic::Status| Some(format!("{:?}: {}", status.code(), status.message()));
            let mut responses = match client.stream_aggregated_resources(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    *end.lock().expect("ended") = fail(status);
                    return;
                }
            };
            loop {
                let r = match responses.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        *end.lock().expect("ended") = Some("closed".into());
                        return;
                    }
                    Err(status) => {
                        *end.lock().expect("ended") = fail(status);
                        return;
                    }
                };
                {
                    let mut held = store.lock().expect("held");
                    let of_type = held.entry(r.type_url.clone()).or_default();
                    // CDS and LDS responses hold the whole set; EDS, RDS and
                    // SDS responses may hold only what changed.
                    if r.type_url == CLUSTERS || r.type_url == LISTENERS {
                        of_type.clear();
                    }
                    for any in r.resources {
                        let name = resource_name(&any);
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
            ended,
            _runtime: runtime,
        }
    }

    /// Why the stream ended (`Code: message`), if it has.
    pub fn ended(&self) -> Option<String> {
        self.ended.lock().expect("ended").clone()
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
fn resource_name(any: &Any) -> String {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Named {
        #[prost(string, tag = "1")]
        name: String,
    }
    <Named as prost::Message>::decode(any.value.as_slice())
        .map(|n| n.name)
        .unwrap_or_default()
}
