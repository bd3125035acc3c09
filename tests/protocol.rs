//! Protocol tests: an in-process ADS client drives meshd's real ADS server
//! (tonic, on 127.0.0.1:0) through the xDS state machine, for state of the
//! world and incremental: first request, ACK, NACK, push order,
//! unsubscribe/resubscribe, removal, reconnect.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use meshd::config::{parse_file, ConfigSnapshot};
use meshd::model::PushContext;
use meshd::xds::{AdsServer, Limits, Registry, SnapshotCache, XdsType};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;
use tonic::Streaming;

const CDS: XdsType = XdsType::Cluster;
const EDS: XdsType = XdsType::Endpoint;
const LDS: XdsType = XdsType::Listener;
const RDS: XdsType = XdsType::Route;

const NODE_ID: &str = "router~127.0.0.1~gw-1.istio-system~istio-system.svc.cluster.local";
const HELLO: &str = "outbound|80||helloworld.default.svc.cluster.local";
const OTHER: &str = "outbound|80||other.default.svc.cluster.local";

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}}}\nsubsets:\n- addresses: [{{ip: {ip}}}]\n  ports: [{{name: http, port: 8080}}]\n"
    )
}

fn config(services: &[(&str, &str)], vs_host: &str) -> Arc<PushContext> {
    config_on_ports(services, vs_host, &[80])
}

fn config_on_ports(services: &[(&str, &str)], vs_host: &str, ports: &[u16]) -> Arc<PushContext> {
    config_with(services, vs_host, ports, &[])
}

fn config_with(services: &[(&str, &str)], vs_host: &str, ports: &[u16], extra: &[&str]) -> Arc<PushContext> {
    let servers: String = ports
        .iter()
        .map(|p| format!("  - port: {{number: {p}, name: http-{p}, protocol: HTTP}}\n    hosts: ['*']\n"))
        .collect();
    let mut docs = vec![format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: Gateway\nmetadata: {{name: gw, namespace: istio-system}}\n\
         spec:\n  selector: {{istio: ingressgateway}}\n  servers:\n{servers}---\n\
         apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {{name: hw}}\nspec:\n  hosts: [{vs_host}]\n  gateways: [istio-system/gw]\n  http:\n  - route:\n    - destination: {{host: helloworld}}\n"
    )];
    docs.extend(services.iter().map(|(n, ip)| service(n, ip)));
    docs.extend(extra.iter().map(|d| d.to_string()));
    let snapshot = ConfigSnapshot::from_files(vec![parse_file("t.yaml", &docs.join("---\n"))]);
    assert!(snapshot.rejections.is_empty(), "{:?}", snapshot.rejections);
    Arc::new(PushContext::new(Arc::new(snapshot)))
}

fn base() -> Arc<PushContext> {
    config(
        &[("helloworld", "10.0.0.1"), ("other", "10.0.0.2")],
        "hello.example.com",
    )
}

struct Server {
    cache: Arc<SnapshotCache>,
    registry: Arc<Registry>,
    client: AggregatedDiscoveryServiceClient<Channel>,
}

async fn server() -> Server {
    server_with(Limits::default()).await
}

async fn server_with(limits: Limits) -> Server {
    let cache = Arc::new(SnapshotCache::new(base()));
    let registry = Arc::new(Registry::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let ads = AdsServer::new(cache.clone(), registry.clone()).with_limits(limits);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ads.into_service())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    Server {
        cache,
        registry,
        client,
    }
}

fn node() -> Node {
    let labels = Struct {
        fields: HashMap::from([(
            "istio".to_string(),
            Value {
                kind: Some(Kind::StringValue("ingressgateway".into())),
            },
        )]),
    };
    Node {
        id: NODE_ID.into(),
        metadata: Some(Struct {
            fields: HashMap::from([(
                "LABELS".to_string(),
                Value {
                    kind: Some(Kind::StructValue(labels)),
                },
            )]),
        }),
        ..Default::default()
    }
}

async fn next<T>(rx: &mut Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), rx.message())
        .await
        .expect("a response within 5 s")
        .expect("stream ok")
        .expect("stream open")
}

// ---- state of the world ------------------------------------------------------

struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Sotw {
    async fn open(s: &mut Server) -> Sotw {
        let (tx, rx) = mpsc::channel(16);
        let rx = s
            .client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        Sotw { tx, rx }
    }

    async fn send(&self, t: XdsType, names: &[&str], version: &str, nonce: &str, error: Option<&str>) {
        let req = DiscoveryRequest {
            version_info: version.into(),
            node: Some(node()),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: t.url().into(),
            response_nonce: nonce.into(),
            error_detail: error.map(|e| RpcStatus {
                code: 13,
                message: e.into(),
                details: vec![],
            }),
            ..Default::default()
        };
        self.tx.send(req).await.expect("send");
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        next(&mut self.rx).await
    }

    /// Subscribes and ACKs; returns the response.
    async fn subscribe(&mut self, t: XdsType, names: &[&str]) -> DiscoveryResponse {
        self.send(t, names, "", "", None).await;
        let r = self.recv().await;
        assert_eq!(r.type_url, t.url());
        self.ack(t, names, &r).await;
        r
    }

    async fn ack(&self, t: XdsType, names: &[&str], r: &DiscoveryResponse) {
        self.send(t, names, &r.version_info, &r.nonce, None).await;
    }
}

fn names_sotw(
    r: &DiscoveryResponse,
    field: impl Fn(&envoy_types::pb::google::protobuf::Any) -> String,
) -> Vec<String> {
    r.resources.iter().map(field).collect()
}

fn decoded_name(a: &envoy_types::pb::google::protobuf::Any) -> String {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    let v = a.value.as_slice();
    match XdsType::from_url(&a.type_url) {
        Some(XdsType::Cluster) => Cluster::decode(v).map(|c| c.name),
        Some(XdsType::Endpoint) => ClusterLoadAssignment::decode(v).map(|c| c.cluster_name),
        Some(XdsType::Listener) => Listener::decode(v).map(|l| l.name),
        Some(XdsType::Route) => RouteConfiguration::decode(v).map(|r| r.name),
        _ => Ok(String::new()),
    }
    .expect("decodes")
}

/// The full SotW start, as Envoy does it: CDS, EDS, LDS, RDS, each ACKed.
async fn sotw_started(s: &mut Server) -> Sotw {
    let mut c = Sotw::open(s).await;
    let cds = c.subscribe(CDS, &[]).await;
    let clusters = names_sotw(&cds, decoded_name);
    assert!(
        clusters.contains(&HELLO.to_string()) && clusters.contains(&OTHER.to_string()),
        "{clusters:?}"
    );
    let eds = c.subscribe(EDS, &[HELLO, OTHER]).await;
    assert_eq!(names_sotw(&eds, decoded_name), vec![HELLO, OTHER]);
    let lds = c.subscribe(LDS, &[]).await;
    assert_eq!(names_sotw(&lds, decoded_name), vec!["0.0.0.0_80"]);
    let rds = c.subscribe(RDS, &["http.80"]).await;
    assert_eq!(names_sotw(&rds, decoded_name), vec!["http.80"]);
    c
}

#[tokio::test]
async fn sotw_first_request_and_ack() {
    let mut s = server().await;
    let mut c = sotw_started(&mut s).await;
    // Requests on a stream are handled in order: once this one is answered,
    // every ACK before it has been recorded.
    let r = c.subscribe(EDS, &[HELLO]).await;
    assert_eq!(names_sotw(&r, decoded_name), vec![HELLO]);
    let conn = s.registry.find(NODE_ID).expect("registered");
    for t in [CDS, LDS, RDS] {
        let st = &conn.types[&t];
        assert!(st.sent_version.is_some(), "{t} sent");
        assert_eq!(st.acked_version, st.sent_version, "{t} acked");
        assert!(st.nack.is_none());
    }
}

#[tokio::test]
async fn sotw_nack_is_recorded_and_not_resent() {
    let mut s = server().await;
    let mut c = Sotw::open(&mut s).await;
    c.send(LDS, &[], "", "", None).await;
    let lds = c.recv().await;
    c.send(
        LDS,
        &[],
        "",
        &lds.nonce,
        Some("Proto constraint validation failed"),
    )
    .await;
    // The next message is the answer to the next request, not an LDS resend.
    c.send(CDS, &[], "", "", None).await;
    let r = c.recv().await;
    assert_eq!(r.type_url, CDS.url());
    let conn = s.registry.find(NODE_ID).expect("registered");
    let nack = conn.types[&LDS].nack.clone().expect("nack recorded");
    assert_eq!(nack.version, lds.version_info);
    assert!(nack.error.contains("Proto constraint validation failed"));
    // A push that changes clusters but not listeners: CDS goes out, and the
    // rejected LDS version does not come back with it.
    s.cache.update(config(
        &[
            ("helloworld", "10.0.0.1"),
            ("other", "10.0.0.2"),
            ("third", "10.0.0.3"),
        ],
        "hello.example.com",
    ));
    let r = c.recv().await;
    assert_eq!(r.type_url, CDS.url());
    c.send(RDS, &["http.80"], "", "", None).await;
    let r = c.recv().await;
    assert_eq!(r.type_url, RDS.url(), "the push held no LDS resend");
}

#[tokio::test]
async fn sotw_push_is_ordered_cds_eds_lds_rds() {
    let mut s = server().await;
    let mut c = sotw_started(&mut s).await;
    // A new service and a changed cluster (CDS, then the changed
    // cluster's EDS), a new gateway port (LDS) and a new VirtualService
    // host (RDS) at once.
    s.cache.update(config_with(
        &[
            ("helloworld", "10.0.0.1"),
            ("other", "10.0.0.2"),
            ("third", "10.0.0.3"),
        ],
        "hello2.example.com",
        &[80, 8081],
        &["apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: hw}\n\
           spec:\n  host: helloworld\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 10}\n"],
    ));
    let cds = c.recv().await;
    assert_eq!(cds.type_url, CDS.url());
    assert!(names_sotw(&cds, decoded_name).contains(&"outbound|80||third.default.svc.cluster.local".into()));
    // The EDS subscription is unchanged, yet the changed cluster's endpoints
    // are sent again so Envoy can warm it; the unchanged cluster's are not.
    let eds = c.recv().await;
    assert_eq!(eds.type_url, EDS.url());
    assert_eq!(names_sotw(&eds, decoded_name), vec![HELLO.to_string()]);
    let lds = c.recv().await;
    assert_eq!(lds.type_url, LDS.url());
    assert_eq!(names_sotw(&lds, decoded_name), vec!["0.0.0.0_80", "0.0.0.0_8081"]);
    let rds = c.recv().await;
    assert_eq!(rds.type_url, RDS.url());
    let route = RouteConfiguration::decode(rds.resources[0].value.as_slice()).expect("decodes");
    assert_eq!(route.virtual_hosts[0].name, "hello2.example.com:80");
}

#[tokio::test]
async fn sotw_unsubscribe_and_resubscribe() {
    let mut s = server().await;
    let mut c = sotw_started(&mut s).await;
    let r = c.subscribe(EDS, &[HELLO]).await;
    assert_eq!(names_sotw(&r, decoded_name), vec![HELLO]);
    let r = c.subscribe(EDS, &[HELLO, OTHER]).await;
    assert_eq!(names_sotw(&r, decoded_name), vec![HELLO, OTHER]);
}

#[tokio::test]
async fn sotw_removed_service_leaves_cds() {
    let mut s = server().await;
    let mut c = sotw_started(&mut s).await;
    s.cache
        .update(config(&[("helloworld", "10.0.0.1")], "hello.example.com"));
    let r = c.recv().await;
    assert_eq!(r.type_url, CDS.url());
    let names = names_sotw(&r, decoded_name);
    assert!(
        names.contains(&HELLO.to_string()) && !names.contains(&OTHER.to_string()),
        "{names:?}"
    );
}

#[tokio::test]
async fn sotw_reconnect_with_current_versions_gets_the_same_versions() {
    let mut s = server().await;
    let c = sotw_started(&mut s).await;
    let conn = s.registry.find(NODE_ID).expect("registered");
    let versions: Vec<String> = [CDS, LDS]
        .iter()
        .map(|t| conn.types[t].sent_version.clone().expect("sent"))
        .collect();
    drop(c);
    // After a control-plane restart Envoy sends its versions with an empty nonce.
    let mut c = Sotw::open(&mut s).await;
    c.send(CDS, &[], &versions[0], "", None).await;
    let r = c.recv().await;
    assert_eq!(
        r.version_info, versions[0],
        "the same content has the same version"
    );
    c.send(LDS, &[], &versions[1], "", None).await;
    let r = c.recv().await;
    assert_eq!(r.version_info, versions[1]);
}

// ---- incremental -------------------------------------------------------------

struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

#[derive(Default)]
struct DeltaReq<'a> {
    subscribe: &'a [&'a str],
    unsubscribe: &'a [&'a str],
    initial: &'a [(&'a str, &'a str)],
    nonce: &'a str,
    error: Option<&'a str>,
}

impl Delta {
    async fn open(s: &mut Server) -> Delta {
        let (tx, rx) = mpsc::channel(16);
        let rx = s
            .client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        Delta { tx, rx }
    }

    async fn send(&self, t: XdsType, r: DeltaReq<'_>) {
        let req = DeltaDiscoveryRequest {
            node: Some(node()),
            type_url: t.url().into(),
            resource_names_subscribe: r.subscribe.iter().map(|n| n.to_string()).collect(),
            resource_names_unsubscribe: r.unsubscribe.iter().map(|n| n.to_string()).collect(),
            initial_resource_versions: r
                .initial
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            response_nonce: r.nonce.into(),
            error_detail: r.error.map(|e| RpcStatus {
                code: 13,
                message: e.into(),
                details: vec![],
            }),
            ..Default::default()
        };
        self.tx.send(req).await.expect("send");
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        next(&mut self.rx).await
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        let t = XdsType::from_url(&r.type_url).expect("known type");
        self.send(
            t,
            DeltaReq {
                nonce: &r.nonce,
                ..Default::default()
            },
        )
        .await;
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    r.resources.iter().map(|x| x.name.clone()).collect()
}

async fn delta_started(s: &mut Server) -> (Delta, DeltaDiscoveryResponse) {
    let mut d = Delta::open(s).await;
    d.send(CDS, DeltaReq::default()).await;
    let cds = d.recv().await;
    assert!(names(&cds).contains(&HELLO.to_string()));
    d.ack(&cds).await;
    d.send(
        EDS,
        DeltaReq {
            subscribe: &[HELLO, OTHER],
            ..Default::default()
        },
    )
    .await;
    let eds = d.recv().await;
    assert_eq!(names(&eds), vec![HELLO, OTHER]);
    d.ack(&eds).await;
    d.send(LDS, DeltaReq::default()).await;
    let lds = d.recv().await;
    d.ack(&lds).await;
    d.send(
        RDS,
        DeltaReq {
            subscribe: &["http.80"],
            ..Default::default()
        },
    )
    .await;
    let rds = d.recv().await;
    assert_eq!(names(&rds), vec!["http.80"]);
    d.ack(&rds).await;
    (d, cds)
}

#[tokio::test]
async fn delta_push_sends_only_changes_in_order() {
    let mut s = server().await;
    let (mut d, _) = delta_started(&mut s).await;
    // Only helloworld's endpoint changes.
    s.cache.update(config(
        &[("helloworld", "10.0.0.9"), ("other", "10.0.0.2")],
        "hello.example.com",
    ));
    let r = d.recv().await;
    assert_eq!(r.type_url, EDS.url());
    assert_eq!(names(&r), vec![HELLO], "only the changed ClusterLoadAssignment");
    d.ack(&r).await;
    // A new service and a route change: CDS, then its EDS, then RDS.
    s.cache.update(config(
        &[
            ("helloworld", "10.0.0.9"),
            ("other", "10.0.0.2"),
            ("third", "10.0.0.3"),
        ],
        "hello2.example.com",
    ));
    let order: Vec<String> = [d.recv().await, d.recv().await]
        .iter()
        .map(|r| XdsType::from_url(&r.type_url).expect("type").to_string())
        .collect();
    assert_eq!(
        order,
        vec!["cds", "rds"],
        "third's EDS is not subscribed yet; LDS is unchanged"
    );
}

#[tokio::test]
async fn delta_nack_is_recorded_and_not_resent() {
    let mut s = server().await;
    let mut d = Delta::open(&mut s).await;
    d.send(LDS, DeltaReq::default()).await;
    let lds = d.recv().await;
    d.send(
        LDS,
        DeltaReq {
            nonce: &lds.nonce,
            error: Some("bad listener"),
            ..Default::default()
        },
    )
    .await;
    d.send(CDS, DeltaReq::default()).await;
    let r = d.recv().await;
    assert_eq!(r.type_url, CDS.url(), "no LDS resend after the NACK");
    let conn = s.registry.find(NODE_ID).expect("registered");
    assert_eq!(
        conn.types[&LDS].nack.as_ref().map(|n| n.error.as_str()),
        Some("code 13: bad listener")
    );
}

#[tokio::test]
async fn delta_unsubscribe_resubscribe_and_removal() {
    let mut s = server().await;
    let (mut d, _) = delta_started(&mut s).await;
    d.send(
        EDS,
        DeltaReq {
            unsubscribe: &[OTHER],
            ..Default::default()
        },
    )
    .await;
    d.send(
        EDS,
        DeltaReq {
            subscribe: &[OTHER],
            ..Default::default()
        },
    )
    .await;
    let r = d.recv().await;
    assert_eq!(names(&r), vec![OTHER], "resubscribing sends it again");
    d.ack(&r).await;
    s.cache
        .update(config(&[("helloworld", "10.0.0.1")], "hello.example.com"));
    let cds = d.recv().await;
    assert_eq!(cds.type_url, CDS.url());
    assert_eq!(cds.removed_resources, vec![OTHER]);
    assert!(cds.resources.is_empty());
    let eds = d.recv().await;
    assert_eq!(eds.type_url, EDS.url());
    assert_eq!(eds.removed_resources, vec![OTHER]);
}

#[tokio::test]
async fn delta_reconnect_with_known_versions_sends_nothing() {
    let mut s = server().await;
    let (d, cds) = delta_started(&mut s).await;
    drop(d);
    let initial: Vec<(String, String)> = cds
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    let initial: Vec<(&str, &str)> = initial.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let mut d = Delta::open(&mut s).await;
    d.send(
        CDS,
        DeltaReq {
            initial: &initial,
            ..Default::default()
        },
    )
    .await;
    let r = d.recv().await;
    assert!(
        r.resources.is_empty() && r.removed_resources.is_empty(),
        "{:?}",
        names(&r)
    );
}

#[tokio::test]
async fn sotw_endpoint_change_sends_only_that_assignment() {
    let mut s = server().await;
    let mut c = sotw_started(&mut s).await;
    s.cache.update(config(
        &[("helloworld", "10.0.0.9"), ("other", "10.0.0.2")],
        "hello.example.com",
    ));
    let r = c.recv().await;
    assert_eq!(r.type_url, EDS.url(), "an endpoint change is an EDS-only push");
    assert_eq!(
        names_sotw(&r, decoded_name),
        vec![HELLO],
        "only the changed ClusterLoadAssignment"
    );
    // Nothing else follows: the next message answers the next request.
    c.ack(EDS, &[HELLO, OTHER], &r).await;
    c.send(LDS, &[], "", "", None).await;
    assert_eq!(c.recv().await.type_url, LDS.url());
}

// ---- limits ----------------------------------------------------------------

/// The status a stream ended with.
async fn ended<T>(rx: &mut Streaming<T>) -> tonic::Status {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.message())
            .await
            .expect("the stream ends within 5 s")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("closed without a status"),
            Err(status) => return status,
        }
    }
}

#[tokio::test]
async fn a_client_over_a_limit_is_cut_off_with_a_reason_and_others_go_on() {
    let limits = Limits {
        max_streams: 2,
        max_names: 100,
        requests_per_second: 5,
        request_burst: 10,
    };
    let mut s = server_with(limits).await;
    let mut calm = Sotw::open(&mut s).await;
    calm.subscribe(CDS, &[]).await;

    // Too many names in one request.
    let mut greedy = Sotw::open(&mut s).await;
    let names: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    greedy.send(EDS, &refs, "", "", None).await;
    let status = ended(&mut greedy.rx).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("more than 100 resources"), "{status:?}");

    // A flood of requests on one stream.
    let mut noisy = Sotw::open(&mut s).await;
    for _ in 0..40 {
        noisy.send(CDS, &[], "", "", None).await;
    }
    let status = ended(&mut noisy.rx).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("requests a second"), "{status:?}");

    // More streams than allowed: the extra one is refused at once.
    let mut second = Sotw::open(&mut s).await;
    second.subscribe(CDS, &[]).await;
    let (tx, rx) = mpsc::channel(1);
    let third = s
        .client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await;
    drop(tx);
    let status = match third {
        Err(status) => status,
        Ok(resp) => ended(&mut resp.into_inner()).await,
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    // The calm client was not disturbed: it still gets pushes.
    s.cache.update(config(
        &[
            ("helloworld", "10.0.0.1"),
            ("other", "10.0.0.2"),
            ("third", "10.0.0.3"),
        ],
        "hello.example.com",
    ));
    let pushed = calm.recv().await;
    assert_eq!(pushed.type_url, CDS.url());
}
