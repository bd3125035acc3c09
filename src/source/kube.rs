//! The cluster source: one kube-rs watcher per kind meshd reads, feeding
//! the same config store as the file source does.
//!
//! Each watcher lists, then watches from the list's resourceVersion; a
//! `410 Gone`, a watch that times out or a dropped connection is handled by
//! kube-rs (a relist, or a new watch from the last version seen), and a
//! relist replaces what the kind held only once it is complete, so nothing
//! is lost or counted twice. Every object is decoded and validated like a
//! document of a file (its API path is its origin), and the whole set is
//! handed to `ConfigStore` after the same debounce as file changes.
//!
//! Nothing is served until every watched kind has been listed once: until
//! then `/ready` answers 503. A kind whose API the cluster does not serve
//! (a CRD not installed) is left out with a warning and looked for again,
//! at most a minute apart, so that a CRD installed after meshd started is
//! watched from then on, as istiod does; EndpointSlices fall back to
//! Endpoints. Secrets are never listed as a whole: only those that a
//! gateway names (`credentialName`, `certificateRefs`, an Ingress's
//! `secretName`, a DestinationRule's `credentialName`) are watched, each by
//! a field-selected watch of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use super::{log_generation, Debounce};
use crate::config::{
    decode_document, ConfigSnapshot, ConfigStore, DocumentLoad, FileLoad, Kind, Origin, Resource,
};

/// Where a kind lives in the Kubernetes API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Watched {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    config: Kind,
}

const fn watched(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    config: Kind,
) -> Watched {
    Watched {
        group,
        version,
        kind,
        plural,
        config,
    }
}

const ISTIO_NET: &str = "networking.istio.io";
const GATEWAY_API: &str = "gateway.networking.k8s.io";

/// Every kind listed and watched as a whole.
const WATCHED: &[Watched] = &[
    watched("", "v1", "Namespace", "namespaces", Kind::Namespace),
    watched("", "v1", "Node", "nodes", Kind::Node),
    watched("", "v1", "Service", "services", Kind::Service),
    ENDPOINT_SLICES,
    watched("", "v1", "Pod", "pods", Kind::Pod),
    watched(ISTIO_NET, "v1", "Gateway", "gateways", Kind::Gateway),
    watched(
        ISTIO_NET,
        "v1",
        "VirtualService",
        "virtualservices",
        Kind::VirtualService,
    ),
    watched(
        ISTIO_NET,
        "v1",
        "DestinationRule",
        "destinationrules",
        Kind::DestinationRule,
    ),
    watched(
        ISTIO_NET,
        "v1",
        "ServiceEntry",
        "serviceentries",
        Kind::ServiceEntry,
    ),
    watched(ISTIO_NET, "v1", "Sidecar", "sidecars", Kind::Sidecar),
    watched(
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
        Kind::PeerAuthentication,
    ),
    watched(
        "security.istio.io",
        "v1",
        "RequestAuthentication",
        "requestauthentications",
        Kind::RequestAuthentication,
    ),
    watched(
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
        Kind::AuthorizationPolicy,
    ),
    watched("networking.k8s.io", "v1", "Ingress", "ingresses", Kind::Ingress),
    watched(
        "networking.k8s.io",
        "v1",
        "IngressClass",
        "ingressclasses",
        Kind::IngressClass,
    ),
    watched(
        GATEWAY_API,
        "v1",
        "GatewayClass",
        "gatewayclasses",
        Kind::GatewayClass,
    ),
    watched(GATEWAY_API, "v1", "Gateway", "gateways", Kind::K8sGateway),
    watched(GATEWAY_API, "v1", "HTTPRoute", "httproutes", Kind::HttpRoute),
    watched(GATEWAY_API, "v1", "GRPCRoute", "grpcroutes", Kind::GrpcRoute),
    watched(GATEWAY_API, "v1alpha2", "TCPRoute", "tcproutes", Kind::TcpRoute),
    watched(GATEWAY_API, "v1alpha2", "TLSRoute", "tlsroutes", Kind::TlsRoute),
    watched(
        GATEWAY_API,
        "v1beta1",
        "ReferenceGrant",
        "referencegrants",
        Kind::ReferenceGrant,
    ),
];

const ENDPOINT_SLICES: Watched = watched(
    "discovery.k8s.io",
    "v1",
    "EndpointSlice",
    "endpointslices",
    Kind::EndpointSlice,
);
/// Read where the cluster serves no EndpointSlices.
const ENDPOINTS: Watched = watched("", "v1", "Endpoints", "endpoints", Kind::Endpoints);
const SECRETS: Watched = watched("", "v1", "Secret", "secrets", Kind::Secret);

impl Watched {
    fn api_version(&self) -> String {
        match self.group {
            "" => self.version.to_string(),
            group => format!("{group}/{}", self.version),
        }
    }

    fn resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.into(),
            version: self.version.into(),
            api_version: self.api_version(),
            kind: self.kind.into(),
            plural: self.plural.into(),
        }
    }

    /// The object's API path, as `kubectl get --raw` takes it.
    fn path(&self, namespace: &str, name: &str) -> String {
        let root = match self.group {
            "" => "/api/v1".to_string(),
            group => format!("/apis/{group}/{}", self.version),
        };
        match namespace {
            "" => format!("{root}/{}/{name}", self.plural),
            ns => format!("{root}/namespaces/{ns}/{}/{name}", self.plural),
        }
    }

    /// What `/debug/configz` calls the watch.
    fn label(&self) -> String {
        match self.group {
            "" => self.plural.to_string(),
            group => format!("{}.{group}", self.plural),
        }
    }
}

/// Where a kind meshd reads lives in the API (the version meshd reads).
pub fn api_resource(kind: Kind) -> Option<ApiResource> {
    WATCHED
        .iter()
        .chain([&ENDPOINTS, &SECRETS])
        .find(|w| w.config == kind)
        .map(Watched::resource)
}

/// `meshd serve --kube` settings.
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    /// Namespaces whose labels match any of these are read (all when empty),
    /// as Istio's `discoverySelectors`.
    pub discovery_selectors: Vec<Selector>,
    pub debounce: Debounce,
}

/// Parses a `--discovery-selector`: a LabelSelector in YAML or JSON
/// (`{matchLabels: {env: prod}}`, as in Istio's mesh config), or the short
/// form `key=value,key2=value2`.
pub fn parse_selector(text: &str) -> Result<Selector, String> {
    let text = text.trim();
    let selector: LabelSelector = if text.starts_with('{') {
        serde_norway::from_str(text).map_err(|e| format!("not a LabelSelector: {e}"))?
    } else {
        let labels = text
            .split(',')
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
                _ => Err(format!("`{pair}` is not key=value")),
            })
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        LabelSelector {
            match_labels: Some(labels),
            match_expressions: None,
        }
    };
    Selector::try_from(selector).map_err(|e| e.to_string())
}

/// How the cluster source stands, for `/ready` and `/debug/configz`.
#[derive(Debug, Default)]
pub struct KubeSync {
    state: Mutex<SyncState>,
}

#[derive(Debug, Default, Clone, Serialize)]
struct SyncState {
    /// True once every watch was listed and the first generation served.
    synced: bool,
    watches: Vec<WatchStatus>,
}

/// One watch, as `/debug/configz` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WatchStatus {
    pub watch: String,
    /// Listed at least once.
    pub synced: bool,
    /// False when the cluster does not serve this kind (CRD not installed).
    pub served: bool,
    pub objects: usize,
    /// Complete lists after the first (a `410 Gone`, a restarted watch).
    pub relists: u64,
    pub last_error: Option<String>,
}

impl KubeSync {
    /// Whether the first full sync has been served.
    pub fn synced(&self) -> bool {
        self.state.lock().map(|s| s.synced).unwrap_or(false)
    }

    /// The state of every watch, as JSON.
    pub fn status(&self) -> Value {
        self.state
            .lock()
            .ok()
            .and_then(|s| serde_json::to_value(&*s).ok())
            .unwrap_or(Value::Null)
    }
}

type ObjectKey = (String, String);

/// How long a kind the cluster does not serve waits before it is looked
/// for again: doubling from the first, up to the last.
const UNSERVED_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

/// What a watch task reports to the source.
enum Update {
    /// An event, its object decoded (in the watch's own task).
    Seen(usize, Box<Seen>),
    Failed(usize, String),
    /// The cluster does not serve this kind.
    NotServed(usize),
}

/// A watch event with its object decoded.
enum Seen {
    /// A (re)list starts.
    Listing,
    Listed(ObjectKey, DocumentLoad),
    /// The list is complete: it replaces what the watch held.
    ListDone,
    Applied(ObjectKey, DocumentLoad),
    Deleted(ObjectKey),
}

impl Seen {
    fn from_event(watched: Watched, event: Event<DynamicObject>) -> Seen {
        match event {
            Event::Init => Seen::Listing,
            Event::InitApply(obj) => {
                let (key, doc) = decode(watched, obj);
                Seen::Listed(key, doc)
            }
            Event::InitDone => Seen::ListDone,
            Event::Apply(obj) => {
                let (key, doc) = decode(watched, obj);
                Seen::Applied(key, doc)
            }
            Event::Delete(obj) => Seen::Deleted(object_key(&obj)),
        }
    }
}

/// One running watch and the objects it holds.
struct Slot {
    watched: Watched,
    /// For Secrets: the one (namespace, name) watched.
    only: Option<ObjectKey>,
    /// Each object read as a file of its own, made once: the store is
    /// handed all of them at each change.
    objects: BTreeMap<ObjectKey, FileLoad>,
    /// Objects of a list in progress; they replace `objects` when it completes.
    listing: Option<BTreeMap<ObjectKey, FileLoad>>,
    synced: bool,
    served: bool,
    relists: u64,
    last_error: Option<String>,
    task: AbortHandle,
}

/// Starts watching the cluster. The first generation is published once
/// every kind has been listed; `KubeSync` says when that happened.
pub fn watch_cluster(
    client: Client,
    opts: KubeOptions,
    store: ConfigStore,
    tx: watch::Sender<Arc<ConfigSnapshot>>,
) -> Arc<KubeSync> {
    let sync = Arc::new(KubeSync::default());
    let (updates_tx, updates) = mpsc::channel(1024);
    let mut source = ClusterSource {
        client,
        opts,
        store,
        tx,
        sync: sync.clone(),
        updates_tx,
        slots: BTreeMap::new(),
        next_slot: 0,
    };
    for w in WATCHED {
        source.start(*w, None);
    }
    tokio::spawn(source.run(updates));
    sync
}

struct ClusterSource {
    client: Client,
    opts: KubeOptions,
    store: ConfigStore,
    tx: watch::Sender<Arc<ConfigSnapshot>>,
    sync: Arc<KubeSync>,
    updates_tx: mpsc::Sender<Update>,
    slots: BTreeMap<usize, Slot>,
    next_slot: usize,
}

impl ClusterSource {
    fn start(&mut self, watched: Watched, only: Option<ObjectKey>) {
        let id = self.next_slot;
        self.next_slot += 1;
        let task = tokio::spawn(watch_kind(
            self.client.clone(),
            watched,
            only.clone(),
            id,
            self.updates_tx.clone(),
        ))
        .abort_handle();
        self.slots.insert(
            id,
            Slot {
                watched,
                only,
                objects: BTreeMap::new(),
                listing: None,
                synced: false,
                served: true,
                relists: 0,
                last_error: None,
                task,
            },
        );
    }

    async fn run(mut self, mut updates: mpsc::Receiver<Update>) {
        let debounce = self.opts.debounce;
        while let Some(update) = updates.recv().await {
            let mut endpoints_only = self.apply(update);
            let deadline = tokio::time::Instant::now() + debounce.max;
            loop {
                let quiet = if endpoints_only {
                    debounce.endpoints.min(debounce.quiet)
                } else {
                    debounce.quiet
                };
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(quiet.min(left), updates.recv()).await {
                    Ok(Some(update)) => endpoints_only &= self.apply(update),
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            // Endpoints name no Secret: a batch of endpoint changes alone
            // (most of a cluster's churn) leaves the Secrets followed as
            // they are, and the objects unwalked.
            if !endpoints_only {
                self.follow_secrets();
            }
            // The first generation waits for every watch (the Secrets the
            // config names included); later ones never wait for a new
            // Secret watch, which might not sync (forbidden, say).
            if self.synced() || self.slots.values().all(|s| s.synced) {
                self.publish();
            }
            self.report();
            if self.tx.is_closed() {
                break;
            }
        }
        for slot in self.slots.values() {
            slot.task.abort();
        }
    }

    /// Takes in one update; says whether it touched nothing but endpoints.
    fn apply(&mut self, update: Update) -> bool {
        let (id, seen) = match update {
            Update::Seen(id, seen) => (id, *seen),
            Update::Failed(id, error) => {
                if let Some(slot) = self.slots.get_mut(&id) {
                    tracing::warn!(watch = %slot.watched.label(), "{error}");
                    slot.last_error = Some(error);
                }
                return false;
            }
            Update::NotServed(id) => {
                let Some(slot) = self.slots.get_mut(&id) else {
                    return false;
                };
                slot.served = false;
                slot.synced = true;
                if slot.watched == ENDPOINT_SLICES {
                    tracing::info!("the cluster serves no EndpointSlices: reading Endpoints");
                    self.start(ENDPOINTS, None);
                } else {
                    tracing::warn!(
                        "the cluster does not serve {} ({}): install meshd's CRDs (deploy/crds) to use it; \
                         meshd looks for it again at most a minute apart",
                        slot.watched.kind,
                        slot.watched.api_version()
                    );
                }
                return false;
            }
        };
        let Some(slot) = self.slots.get_mut(&id) else {
            return false; // a Secret watch stopped meanwhile
        };
        if !slot.served {
            tracing::info!(
                "the cluster serves {} ({}) now: watching it",
                slot.watched.kind,
                slot.watched.api_version()
            );
            slot.served = true;
            // Its first list is not a relist.
            slot.synced = false;
        }
        let endpoints = matches!(slot.watched.config, Kind::EndpointSlice | Kind::Endpoints);
        match seen {
            Seen::Listing => slot.listing = Some(BTreeMap::new()),
            Seen::Listed(key, doc) => {
                slot.listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key, object_load(doc));
            }
            Seen::ListDone => {
                slot.objects = slot.listing.take().unwrap_or_default();
                if slot.synced {
                    slot.relists += 1;
                }
                slot.synced = true;
                slot.last_error = None;
                return false;
            }
            Seen::Applied(key, doc) => {
                slot.objects.insert(key, object_load(doc));
            }
            Seen::Deleted(key) => {
                slot.objects.remove(&key);
            }
        }
        endpoints
    }

    /// Starts a watch for each Secret the config names and stops those
    /// it no longer names.
    fn follow_secrets(&mut self) {
        let resources = self
            .slots
            .values()
            .filter(|s| s.watched != SECRETS)
            .flat_map(|s| s.objects.values())
            .filter_map(object_resource);
        let wanted = referenced_secrets(resources);
        let stale: Vec<usize> = self
            .slots
            .iter()
            .filter(|(_, s)| s.only.as_ref().is_some_and(|k| !wanted.contains(k)))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(slot) = self.slots.remove(&id) {
                slot.task.abort();
            }
        }
        let watching: BTreeSet<ObjectKey> = self.slots.values().filter_map(|s| s.only.clone()).collect();
        for key in wanted.difference(&watching) {
            self.start(SECRETS, Some(key.clone()));
        }
    }

    /// Hands everything the watches hold to the store and publishes the
    /// generation if it changed.
    fn publish(&mut self) {
        let selected = self.selected_namespaces();
        let files: Vec<FileLoad> = self
            .slots
            .values()
            .flat_map(|s| s.objects.iter())
            .filter(|((ns, _), _)| ns.is_empty() || selected.as_ref().is_none_or(|sel| sel.contains(ns)))
            .map(|(_, load)| load.clone())
            .collect();
        let before = self.store.current();
        let first = !self.synced();
        let next = self.store.apply(files);
        if next.generation != before.generation || first {
            log_generation(&before, &next, "the cluster");
            self.tx.send_replace(next);
        }
        if let Ok(mut state) = self.sync.state.lock() {
            state.synced = true;
        }
    }

    fn synced(&self) -> bool {
        self.sync.synced()
    }

    /// The namespaces the discovery selectors admit; `None` admits all.
    fn selected_namespaces(&self) -> Option<BTreeSet<String>> {
        if self.opts.discovery_selectors.is_empty() {
            return None;
        }
        let namespaces = self
            .slots
            .values()
            .filter(|s| s.watched.config == Kind::Namespace)
            .flat_map(|s| s.objects.values())
            .filter_map(object_resource);
        Some(
            namespaces
                .filter(|ns| {
                    let labels = ns.metadata().labels.clone().unwrap_or_default();
                    self.opts.discovery_selectors.iter().any(|s| s.matches(&labels))
                })
                .map(|ns| ns.key().name.to_string())
                .collect(),
        )
    }

    fn report(&self) {
        let watches = self
            .slots
            .values()
            .map(|s| WatchStatus {
                watch: match &s.only {
                    Some((ns, name)) => format!("{} {ns}/{name}", s.watched.label()),
                    None => s.watched.label(),
                },
                synced: s.synced,
                served: s.served,
                objects: s.objects.len(),
                relists: s.relists,
                last_error: s.last_error.clone(),
            })
            .collect();
        if let Ok(mut state) = self.sync.state.lock() {
            state.watches = watches;
        }
    }
}

/// Runs one watch for as long as the source wants it: finds out whether
/// the cluster serves the kind (retrying while the API server cannot be
/// reached), then relays the watcher's events.
async fn watch_kind(
    client: Client,
    watched: Watched,
    only: Option<ObjectKey>,
    id: usize,
    out: mpsc::Sender<Update>,
) {
    let resource = watched.resource();
    let api: Api<DynamicObject> = match &only {
        Some((ns, _)) => Api::namespaced_with(client, ns, &resource),
        None => Api::all_with(client, &resource),
    };
    let mut config = watcher::Config::default();
    if let Some((_, name)) = &only {
        config = config.fields(&format!("metadata.name={name}"));
    }
    if only.is_none() {
        let mut wait = Duration::from_millis(200);
        let mut unserved = UNSERVED_RETRY.0;
        let mut reported = false;
        loop {
            match api.list_metadata(&ListParams::default().limit(1)).await {
                Ok(_) => break,
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    if !reported && out.send(Update::NotServed(id)).await.is_err() {
                        return;
                    }
                    reported = true;
                    // Without EndpointSlices, Endpoints are read instead.
                    if watched == ENDPOINT_SLICES {
                        return;
                    }
                    tokio::time::sleep(unserved).await;
                    unserved = (unserved * 2).min(UNSERVED_RETRY.1);
                }
                Err(e) => {
                    let error = format!("listing {}: {e}", watched.label());
                    if out.send(Update::Failed(id, error)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let update = match event {
            Ok(event) => Update::Seen(id, Box::new(Seen::from_event(watched, event))),
            Err(e) => Update::Failed(id, format!("watching {}: {e}", watched.label())),
        };
        if out.send(update).await.is_err() {
            return;
        }
    }
}

/// An object's document as the file the store reads it as.
fn object_load(doc: DocumentLoad) -> FileLoad {
    FileLoad {
        file: doc.origin.file.clone(),
        documents: Ok(Arc::from([doc])),
    }
}

/// The resource of an object read (`object_load`), when it decoded.
fn object_resource(load: &FileLoad) -> Option<&Arc<Resource>> {
    load.documents.as_ref().ok()?.first()?.result.as_ref().ok()
}

fn object_key(obj: &DynamicObject) -> ObjectKey {
    (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

/// Decodes an object like a document of a file; its API path is its origin.
fn decode(watched: Watched, mut obj: DynamicObject) -> (ObjectKey, DocumentLoad) {
    let key = object_key(&obj);
    // Kept by the API server for its own bookkeeping; never read here.
    obj.metadata.managed_fields = None;
    let mut value = serde_json::to_value(&obj).unwrap_or(Value::Null);
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), Value::String(watched.api_version()));
        map.insert("kind".into(), Value::String(watched.kind.into()));
    }
    let origin = Origin {
        file: watched.path(&key.0, &key.1).into(),
        document: 0,
        line: 0,
    };
    (key, decode_document(origin, value))
}

/// The Secrets (namespace, name) that the config can ask for: each
/// credential a gateway, an Ingress or a DestinationRule names, with its
/// `-cacert` companion, in the namespaces where the proxies that use it run
/// (the resource's own, and those of the pods a Gateway selects).
fn referenced_secrets<'a>(resources: impl Iterator<Item = &'a Arc<Resource>> + Clone) -> BTreeSet<ObjectKey> {
    let pods_matching = |selector: &BTreeMap<String, String>| -> BTreeSet<String> {
        resources
            .clone()
            .filter_map(|r| match &**r {
                Resource::Pod(pod) if !selector.is_empty() => {
                    let labels = pod.metadata.labels.as_ref()?;
                    selector
                        .iter()
                        .all(|(k, v)| labels.get(k) == Some(v))
                        .then(|| pod.metadata.namespace.clone().unwrap_or_default())
                }
                _ => None,
            })
            .collect()
    };
    let mut wanted = BTreeSet::new();
    let mut want = |namespaces: &BTreeSet<String>, name: &str| {
        for ns in namespaces {
            wanted.insert((ns.clone(), name.to_string()));
            wanted.insert((ns.clone(), format!("{name}-cacert")));
        }
    };
    for resource in resources.clone() {
        let own =
            || -> BTreeSet<String> { [resource.metadata().namespace.clone().unwrap_or_default()].into() };
        match &**resource {
            Resource::Gateway(gw) => {
                let mut namespaces = pods_matching(&gw.spec.selector);
                namespaces.extend(own());
                for tls in gw.spec.servers.iter().filter_map(|s| s.tls.as_ref()) {
                    for name in tls.credential_name.iter().chain(&tls.credential_names) {
                        want(&namespaces, name);
                    }
                }
            }
            Resource::K8sGateway(gw) => {
                let gw_ns = resource.metadata().namespace.clone().unwrap_or_default();
                // Into another namespace only where a ReferenceGrant there
                // lets the Gateway's namespace read it.
                let granted = |ns: &str, name: &str| {
                    resources.clone().any(|r| match &**r {
                        Resource::ReferenceGrant(g) => {
                            g.metadata.namespace.as_deref() == Some(ns)
                                && g.spec.allows(("Gateway", &gw_ns), ("Secret", name))
                        }
                        _ => false,
                    })
                };
                for r in gw
                    .spec
                    .listeners
                    .iter()
                    .filter_map(|l| l.tls.as_ref())
                    .flat_map(|t| &t.certificate_refs)
                {
                    match r.namespace.as_deref() {
                        Some(ns) if ns != gw_ns && !granted(ns, &r.name) => {}
                        Some(ns) => want(&[ns.to_string()].into(), &r.name),
                        None => want(&own(), &r.name),
                    }
                }
            }
            Resource::Ingress(ing) => {
                let mut namespaces =
                    pods_matching(&[("istio".to_string(), "ingressgateway".to_string())].into());
                namespaces.extend(own());
                for name in ing.spec.tls.iter().filter_map(|t| t.secret_name.as_ref()) {
                    want(&namespaces, name);
                }
            }
            Resource::DestinationRule(dr) => {
                let policies = dr
                    .spec
                    .traffic_policy
                    .iter()
                    .chain(dr.spec.subsets.iter().filter_map(|s| s.traffic_policy.as_ref()));
                for policy in policies {
                    let tls = policy
                        .tls
                        .iter()
                        .chain(policy.port_level_settings.iter().filter_map(|p| p.tls.as_ref()));
                    for name in tls.filter_map(|t| t.credential_name.as_ref()) {
                        want(&own(), name);
                    }
                }
            }
            _ => {}
        }
    }
    wanted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_file;

    fn resources(yaml: &str) -> Vec<Arc<Resource>> {
        let load = parse_file("t.yaml", yaml);
        load.documents
            .expect("parses")
            .iter()
            .map(|d| d.result.clone().expect("valid"))
            .collect()
    }

    #[test]
    fn secrets_are_followed_where_the_gateway_pods_run() {
        let rs = resources(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: default}\n\
             spec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n\
             \x20   hosts: ['*']\n    tls: {mode: SIMPLE, credentialName: hello-cert}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: gw-1, namespace: istio-system, labels: {istio: ingressgateway}}\n\
             spec: {containers: [{name: envoy}]}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: app, namespace: apps, labels: {app: x}}\n\
             spec: {containers: [{name: app}]}\n",
        );
        let wanted = referenced_secrets(rs.iter());
        let names: Vec<String> = wanted.iter().map(|(ns, n)| format!("{ns}/{n}")).collect();
        assert_eq!(
            names,
            [
                "default/hello-cert",
                "default/hello-cert-cacert",
                "istio-system/hello-cert",
                "istio-system/hello-cert-cacert"
            ]
        );
    }

    #[test]
    fn a_certificate_in_another_namespace_is_followed_only_with_a_grant() {
        let gateway = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: web, namespace: shop}\n\
            spec:\n  gatewayClassName: istio\n  listeners:\n\
            \x20 - {name: a, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: own}]}}\n\
            \x20 - {name: b, port: 8443, protocol: HTTPS, tls: {certificateRefs: [{name: site, namespace: certs}]}}\n";
        let names = |docs: &str| -> Vec<String> {
            let rs = resources(docs);
            referenced_secrets(rs.iter())
                .iter()
                .map(|(ns, n)| format!("{ns}/{n}"))
                .collect()
        };
        assert_eq!(names(gateway), ["shop/own", "shop/own-cacert"]);
        let grant = "---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\n\
            metadata: {name: g, namespace: certs}\n\
            spec: {from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: shop}], to: [{group: '', kind: Secret}]}\n";
        assert_eq!(
            names(&format!("{gateway}{grant}")),
            ["certs/site", "certs/site-cacert", "shop/own", "shop/own-cacert"]
        );
    }

    #[test]
    fn discovery_selectors_take_both_forms() {
        let labels: BTreeMap<String, String> = [("env".to_string(), "prod".to_string())].into();
        assert!(parse_selector("env=prod").expect("short form").matches(&labels));
        assert!(!parse_selector("env=dev").expect("short form").matches(&labels));
        let sel = parse_selector("{matchExpressions: [{key: env, operator: In, values: [prod, stage]}]}")
            .expect("LabelSelector");
        assert!(sel.matches(&labels));
        assert!(parse_selector("env").is_err());
    }

    #[test]
    fn objects_are_decoded_with_their_api_path() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "hw", "namespace": "default", "resourceVersion": "7",
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"hosts": ["hw"], "http": [{"route": [{"destination": {"host": ""}}]}]}
        }))
        .expect("object");
        let vs = WATCHED
            .iter()
            .find(|w| w.config == Kind::VirtualService)
            .expect("watched");
        let (key, doc) = decode(*vs, obj);
        assert_eq!(key, ("default".to_string(), "hw".to_string()));
        let rejection = doc.result.expect_err("empty host");
        assert_eq!(
            rejection.to_string(),
            "/apis/networking.istio.io/v1/namespaces/default/virtualservices/hw (VirtualService default/hw): \
             field spec.http[0].route[0].destination.host: is required"
        );
    }
}
