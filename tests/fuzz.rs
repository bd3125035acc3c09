//! Fuzzing without a nightly toolchain: proptest generators over every
//! input meshd takes from outside (config documents, ADS request
//! sequences, CSRs, node ids and metadata, bootstrap labels), each checked
//! to end in a result or a clear error and never a panic; and a replay of
//! the corpus in `testdata/fuzz/<target>/`, where the inputs that once
//! broke something stay as regression tests. `make test` runs a few hundred
//! cases per target; `make fuzz` runs many more, for a bounded time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::protobuf::{value::Kind as PbKind, Struct, Value as PbValue};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use meshd::config::{parse_file, ConfigSnapshot};
use meshd::model::{Proxy, PushContext};
use meshd::xds::{AdsServer, Registry, SnapshotCache};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

/// Panics anywhere in the process (spawned tasks included, where tokio
/// would otherwise swallow them).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/fuzz")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).expect("corpus file")))
        .collect()
}

// ---- config documents --------------------------------------------------------

/// Everything a config goes through: decoding and validation, the store,
/// the push context, translation for a gateway and a sidecar, analysis.
fn digest(text: &str) {
    let snapshot = ConfigSnapshot::from_files(vec![parse_file("fuzz.yaml", text)]);
    let push = PushContext::new(Arc::new(snapshot));
    let meta = |v: Value| v.as_object().cloned().unwrap_or_default();
    for (id, m) in [
        (
            "router~10.0.0.1~gw.istio-system~istio-system.svc.cluster.local",
            meta(json!({"LABELS": {"istio": "ingressgateway"}})),
        ),
        (
            "sidecar~10.0.0.2~app.default~default.svc.cluster.local",
            meta(json!({"LABELS": {"app": "hello"}})),
        ),
    ] {
        let proxy = Proxy::parse(id, &m).expect("a valid proxy");
        let _ = meshd::translate::generate(&push, &proxy);
    }
    let _ = meshd::analyze::analyze_push(&push);
}

const KINDS: &[(&str, &str)] = &[
    ("v1", "Service"),
    ("v1", "Endpoints"),
    ("v1", "Pod"),
    ("v1", "Secret"),
    ("v1", "Namespace"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("networking.istio.io/v1", "Gateway"),
    ("networking.istio.io/v1", "VirtualService"),
    ("networking.istio.io/v1", "DestinationRule"),
    ("networking.istio.io/v1", "ServiceEntry"),
    ("networking.istio.io/v1", "Sidecar"),
    ("security.istio.io/v1", "PeerAuthentication"),
    ("security.istio.io/v1", "RequestAuthentication"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("networking.k8s.io/v1", "Ingress"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
];

/// Field names the kinds above use, so generated specs reach deep.
const FIELDS: &[&str] = &[
    "hosts",
    "gateways",
    "http",
    "route",
    "destination",
    "host",
    "port",
    "number",
    "name",
    "protocol",
    "servers",
    "selector",
    "tls",
    "mode",
    "credentialName",
    "match",
    "uri",
    "prefix",
    "exact",
    "regex",
    "weight",
    "subset",
    "subsets",
    "labels",
    "trafficPolicy",
    "ports",
    "targetPort",
    "addresses",
    "ip",
    "subsets",
    "endpoints",
    "rules",
    "from",
    "to",
    "source",
    "operation",
    "paths",
    "methods",
    "principals",
    "requestPrincipals",
    "when",
    "key",
    "values",
    "jwtRules",
    "issuer",
    "jwksUri",
    "jwks",
    "action",
    "mtls",
    "portLevelMtls",
    "egress",
    "ingress",
    "listeners",
    "parentRefs",
    "backendRefs",
    "hostname",
    "rewrite",
    "timeout",
    "retries",
    "fault",
    "headers",
    "corsPolicy",
    "mirror",
    "delegate",
    "resolution",
    "location",
    "workloadSelector",
    "loadBalancer",
    "consistentHash",
    "outlierDetection",
    "connectionPool",
    "data",
    "stringData",
    "status",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (0u32..70000).prop_map(|n| json!(n)),
        "[a-zA-Z0-9./*:_ -]{0,24}".prop_map(Value::String),
        prop::sample::select(vec![
            "*",
            "",
            "default",
            "istio-system/gw",
            "hello",
            "10.0.0.1",
            "HTTP",
            "STRICT",
            "ALLOW",
            "DENY",
            "1s",
            "-1",
            "/"
        ])
        .prop_map(|s| json!(s)),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(FIELDS), inner), 0..6).prop_map(|kv| {
                Value::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

fn document() -> impl Strategy<Value = Value> {
    (prop::sample::select(KINDS), "[a-z]{1,6}", prop::sample::select(vec!["default", "istio-system", ""]), value(), value())
        .prop_map(|((api, kind), name, ns, spec, extra)| {
            let mut doc = json!({"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": ns}, "spec": spec});
            // Core kinds keep their data next to `spec`.
            doc["subsets"] = extra.clone();
            doc["data"] = extra;
            doc
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    #[test]
    fn config_text_never_panics(text in "(?s).{0,400}") {
        digest(&text);
    }

    #[test]
    fn config_documents_never_panic(docs in prop::collection::vec(document(), 1..6)) {
        let text = docs.iter().map(|d| serde_json::to_string(d).unwrap_or_default()).collect::<Vec<_>>().join("\n---\n");
        digest(&text);
    }

    /// The SotW request reader decodes by hand: any bytes, and a real
    /// request cut short or garbled, give a request or an error.
    #[test]
    fn sotw_request_frames_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), cut in 0usize..400) {
        use meshd::xds::request::SotwRequest;
        // The names are compared with subscriptions as they are read: one
        // the good request repeats, one it starts with.
        let name = "outbound|80||a.default.svc.cluster.local".to_string();
        let subscribed = [
            std::sync::Arc::new([name.clone(), "é".repeat(70)].into_iter().collect()),
            std::sync::Arc::new([name].into_iter().collect()),
        ];
        if let Ok(read) = SotwRequest::read(bytes.clone().into(), &subscribed) {
            let _ = read.names();
        }
        let good = prost::Message::encode_to_vec(&envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
            version_info: "v1".into(),
            resource_names: vec!["outbound|80||a.default.svc.cluster.local".into(), "é".repeat(70)],
            type_url: "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment".into(),
            response_nonce: "3".into(),
            ..Default::default()
        });
        let mut garbled = good.clone();
        for (i, b) in bytes.iter().enumerate() {
            let at = (i * 13 + cut) % garbled.len();
            garbled[at] ^= b;
        }
        for frame in [good[..cut.min(good.len())].to_vec(), garbled] {
            if let Ok(read) = SotwRequest::read(frame.into(), &subscribed) {
                let _ = read.names();
            }
        }
    }

    #[test]
    fn node_ids_and_metadata_never_panic(id in "(router|sidecar|x)?~?[0-9a-z.~]{0,40}", meta in value()) {
        let map = meta.as_object().cloned().unwrap_or_default();
        let _ = Proxy::parse(&id, &map);
        let _ = meshd::bootstrap::parse_labels(&id);
    }

    #[test]
    fn csrs_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), cut in 0usize..2000) {
        let ca = authority();
        let id = meshd::ca::SpiffeId::new("cluster.local", "default", "sleep").expect("id");
        let raw = String::from_utf8_lossy(&bytes).into_owned();
        let _ = ca.sign_csr(&raw, &id, Duration::from_secs(3600));
        // A real CSR cut short or with its body garbled.
        let good = csr();
        let end = cut.min(good.len());
        let _ = ca.sign_csr(&good[..end], &id, Duration::from_secs(3600));
        let mut garbled = good.into_bytes();
        for (i, b) in bytes.iter().enumerate().take(garbled.len().saturating_sub(60)) {
            let at = 40 + i * 7 % (garbled.len() - 60);
            garbled[at] ^= b & 0x1f;
        }
        let _ = ca.sign_csr(&String::from_utf8_lossy(&garbled), &id, Duration::from_secs(3600));
    }
}

/// Cases per property: `PROPTEST_CASES` when set (`make fuzz`), else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default)
}

fn authority() -> &'static meshd::ca::Authority {
    static CA: std::sync::OnceLock<meshd::ca::Authority> = std::sync::OnceLock::new();
    CA.get_or_init(|| meshd::ca::ephemeral("cluster.local").expect("CA"))
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["sleep.default".to_string()]).expect("params");
    params.serialize_request(&key).expect("csr").pem().expect("pem")
}

#[test]
fn the_config_corpus_replays() {
    for (name, bytes) in corpus("config") {
        let text = String::from_utf8_lossy(&bytes);
        if std::panic::catch_unwind(|| digest(&text)).is_err() {
            panic!("{name} panics");
        }
    }
}

// ---- ADS request sequences ----------------------------------------------------

const TYPES: &[&str] = &[
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
    "type.googleapis.com/envoy.unknown.v3.Nothing",
    "",
];

/// One request of a sequence.
#[derive(Debug, Clone)]
struct Step {
    type_url: &'static str,
    names: Vec<String>,
    version: String,
    nonce: String,
    nack: bool,
    node: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (
        prop::sample::select(TYPES),
        prop_oneof![
            4 => prop::collection::vec("[a-z0-9|.*_-]{0,30}", 0..5),
            1 => (0usize..3000).prop_map(|n| (0..n).map(|i| format!("outbound|80||s{i}.default.svc.cluster.local")).collect()),
        ],
        prop_oneof![Just(String::new()), "[0-9a-f]{0,16}"],
        prop_oneof![Just(String::new()), "[0-9]{1,3}", "[ -~]{0,20}"],
        any::<bool>(),
        prop::bool::weighted(0.8),
    )
        .prop_map(|(type_url, names, version, nonce, nack, node)| Step { type_url, names, version, nonce, nack, node })
}

fn fuzz_node() -> Node {
    let labels = Struct {
        fields: HashMap::from([(
            "istio".to_string(),
            PbValue {
                kind: Some(PbKind::StringValue("ingressgateway".into())),
            },
        )]),
    };
    Node {
        id: "router~127.0.0.1~gw.istio-system~istio-system.svc.cluster.local".into(),
        metadata: Some(Struct {
            fields: HashMap::from([(
                "LABELS".to_string(),
                PbValue {
                    kind: Some(PbKind::StructValue(labels)),
                },
            )]),
        }),
        ..Default::default()
    }
}

struct Ads {
    runtime: tokio::runtime::Runtime,
    client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
}

fn ads() -> &'static Ads {
    static ADS: std::sync::OnceLock<Ads> = std::sync::OnceLock::new();
    ADS.get_or_init(|| {
        count_panics();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let client = runtime.block_on(async {
            let text = std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/demo/gateway.yaml"),
            )
            .expect("demo");
            let snapshot = ConfigSnapshot::from_files(vec![parse_file("gateway.yaml", &text)]);
            let cache = Arc::new(SnapshotCache::new(Arc::new(PushContext::new(Arc::new(snapshot)))));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let server = AdsServer::new(cache, Arc::new(Registry::default()));
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(server.into_service())
                    .serve_with_incoming(TcpListenerStream::new(listener)),
            );
            AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
                .await
                .expect("connect")
                .max_decoding_message_size(64 << 20)
        });
        Ads { runtime, client }
    })
}

/// Plays a sequence on a new stream (state of the world or incremental)
/// and reads what comes back until the server goes quiet or ends it.
async fn play(
    mut client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    steps: Vec<Step>,
    delta: bool,
) {
    let quiet = Duration::from_millis(100);
    if delta {
        let (tx, rx) = mpsc::channel(steps.len() + 1);
        for s in &steps {
            let _ = tx.try_send(DeltaDiscoveryRequest {
                node: s.node.then(fuzz_node),
                type_url: s.type_url.into(),
                resource_names_subscribe: s.names.clone(),
                resource_names_unsubscribe: s.names.iter().take(1).cloned().collect(),
                response_nonce: s.nonce.clone(),
                error_detail: s.nack.then(|| RpcStatus {
                    code: 13,
                    message: "no".into(),
                    details: vec![],
                }),
                ..Default::default()
            });
        }
        drop(tx);
        if let Ok(resp) = client.delta_aggregated_resources(ReceiverStream::new(rx)).await {
            let mut rx = resp.into_inner();
            while let Ok(Ok(Some(_))) = tokio::time::timeout(quiet, rx.message()).await {}
        }
    } else {
        let (tx, rx) = mpsc::channel(steps.len() + 1);
        for s in &steps {
            let _ = tx.try_send(DiscoveryRequest {
                node: s.node.then(fuzz_node),
                type_url: s.type_url.into(),
                resource_names: s.names.clone(),
                version_info: s.version.clone(),
                response_nonce: s.nonce.clone(),
                error_detail: s.nack.then(|| RpcStatus {
                    code: 13,
                    message: "no".into(),
                    details: vec![],
                }),
                ..Default::default()
            });
        }
        drop(tx);
        if let Ok(resp) = client.stream_aggregated_resources(ReceiverStream::new(rx)).await {
            let mut rx = resp.into_inner();
            while let Ok(Ok(Some(_))) = tokio::time::timeout(quiet, rx.message()).await {}
        }
    }
}

/// After any sequence, a well-behaved client is still served.
async fn still_serving(mut client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>) {
    let (tx, rx) = mpsc::channel(1);
    tx.send(DiscoveryRequest {
        node: Some(fuzz_node()),
        type_url: TYPES[0].into(),
        ..Default::default()
    })
    .await
    .expect("send");
    let mut rx = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("a stream")
        .into_inner();
    let r = tokio::time::timeout(Duration::from_secs(5), rx.message())
        .await
        .expect("an answer")
        .expect("ok")
        .expect("a response");
    assert_eq!(r.type_url, TYPES[0]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    #[test]
    fn ads_request_sequences_never_panic(steps in prop::collection::vec(step(), 1..8), delta in any::<bool>()) {
        let ads = ads();
        let before = PANICS.load(Ordering::SeqCst);
        ads.runtime.block_on(async {
            play(ads.client.clone(), steps, delta).await;
            still_serving(ads.client.clone()).await;
        });
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), before, "meshd panicked");
    }
}

#[test]
fn the_ads_corpus_replays() {
    // Each corpus file: one request a line, `TYPE|NAMES,...|VERSION|NONCE`.
    let ads = ads();
    for (name, bytes) in corpus("ads") {
        let steps: Vec<Step> = String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let mut parts = l.split('|');
                let t = parts.next().unwrap_or_default();
                Step {
                    type_url: TYPES.iter().find(|u| u.ends_with(t)).copied().unwrap_or(TYPES[5]),
                    names: parts
                        .next()
                        .unwrap_or_default()
                        .split(',')
                        .filter(|n| !n.is_empty())
                        .map(str::to_string)
                        .collect(),
                    version: parts.next().unwrap_or_default().to_string(),
                    nonce: parts.next().unwrap_or_default().to_string(),
                    nack: false,
                    node: true,
                }
            })
            .collect();
        let before = PANICS.load(Ordering::SeqCst);
        for delta in [false, true] {
            ads.runtime.block_on(async {
                play(ads.client.clone(), steps.clone(), delta).await;
                still_serving(ads.client.clone()).await;
            });
        }
        assert_eq!(PANICS.load(Ordering::SeqCst), before, "{name} made meshd panic");
    }
}
