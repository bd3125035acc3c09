//! config: typed resources, their validation, and the store that holds the
//! last good generation.
//!
//! This stage owns the meaning of a document: which kinds meshd reads, which
//! fields they may have, and what makes one invalid. It does not know where
//! documents come from (that is `source`) nor what they turn into (`model`,
//! `translate`). A document that fails is reported with its file, document
//! index, kind/name and field path, and left out; the store then keeps
//! serving the last good version of that resource.

pub mod gateway_api;
pub mod ingress;
pub mod istio;
pub mod mesh;
mod parse;
pub mod security;
mod store;
mod validate;

pub use validate::parse_duration;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, Namespace, Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub use parse::{decode_document, parse_file, DocumentLoad, FileLoad};
pub use store::{ConfigStore, Preview};

/// The kinds of resource meshd reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Namespace,
    Node,
    Service,
    Endpoints,
    EndpointSlice,
    Pod,
    Secret,
    Gateway,
    VirtualService,
    DestinationRule,
    ServiceEntry,
    Sidecar,
    PeerAuthentication,
    RequestAuthentication,
    AuthorizationPolicy,
    Ingress,
    IngressClass,
    GatewayClass,
    K8sGateway,
    HttpRoute,
    GrpcRoute,
    TcpRoute,
    TlsRoute,
    ReferenceGrant,
}

impl Kind {
    /// The kind for a document's `apiVersion` group and `kind`, if meshd reads it.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        match (group, kind) {
            ("", "Namespace") => Some(Kind::Namespace),
            ("", "Node") => Some(Kind::Node),
            ("", "Service") => Some(Kind::Service),
            ("", "Endpoints") => Some(Kind::Endpoints),
            ("discovery.k8s.io", "EndpointSlice") => Some(Kind::EndpointSlice),
            ("", "Pod") => Some(Kind::Pod),
            ("", "Secret") => Some(Kind::Secret),
            ("networking.istio.io", "Gateway") => Some(Kind::Gateway),
            ("networking.istio.io", "VirtualService") => Some(Kind::VirtualService),
            ("networking.istio.io", "DestinationRule") => Some(Kind::DestinationRule),
            ("networking.istio.io", "ServiceEntry") => Some(Kind::ServiceEntry),
            ("networking.istio.io", "Sidecar") => Some(Kind::Sidecar),
            ("security.istio.io", "PeerAuthentication") => Some(Kind::PeerAuthentication),
            ("security.istio.io", "RequestAuthentication") => Some(Kind::RequestAuthentication),
            ("security.istio.io", "AuthorizationPolicy") => Some(Kind::AuthorizationPolicy),
            ("networking.k8s.io" | "extensions", "Ingress") => Some(Kind::Ingress),
            ("networking.k8s.io", "IngressClass") => Some(Kind::IngressClass),
            ("gateway.networking.k8s.io", "GatewayClass") => Some(Kind::GatewayClass),
            ("gateway.networking.k8s.io", "Gateway") => Some(Kind::K8sGateway),
            ("gateway.networking.k8s.io", "HTTPRoute") => Some(Kind::HttpRoute),
            ("gateway.networking.k8s.io", "GRPCRoute") => Some(Kind::GrpcRoute),
            ("gateway.networking.k8s.io", "TCPRoute") => Some(Kind::TcpRoute),
            ("gateway.networking.k8s.io", "TLSRoute") => Some(Kind::TlsRoute),
            ("gateway.networking.k8s.io", "ReferenceGrant") => Some(Kind::ReferenceGrant),
            _ => None,
        }
    }

    /// Whether resources of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(
            self,
            Kind::Namespace | Kind::Node | Kind::IngressClass | Kind::GatewayClass
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::K8sGateway => f.write_str("Gateway.gateway.networking.k8s.io"),
            Kind::HttpRoute => f.write_str("HTTPRoute"),
            Kind::GrpcRoute => f.write_str("GRPCRoute"),
            Kind::TcpRoute => f.write_str("TCPRoute"),
            Kind::TlsRoute => f.write_str("TLSRoute"),
            other => fmt::Debug::fmt(other, f),
        }
    }
}

/// Identifies a resource: kind, namespace (empty for cluster-scoped kinds), name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ResourceKey {
    pub kind: Kind,
    /// Shared, so that copying a generation's keys copies no text.
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ResourceKey {
    /// The first key of `kind` in `namespace` (all namespaces when empty),
    /// to start a range at: the empty strings are one shared `Arc`, so
    /// making it allocates no more than the namespace.
    pub fn first_of(kind: Kind, namespace: &str) -> ResourceKey {
        static EMPTY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "".into());
        ResourceKey {
            kind,
            namespace: if namespace.is_empty() {
                EMPTY.clone()
            } else {
                namespace.into()
            },
            name: EMPTY.clone(),
        }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// An Istio custom resource: Kubernetes metadata around a typed `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioObject<S> {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: S,
    /// Written by controllers; read and ignored.
    #[serde(default, skip_serializing)]
    pub status: Option<serde_json::Value>,
}

impl<S> IstioObject<S> {
    /// The object's name.
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    /// The object's namespace (the loader fills in `default`).
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or_default()
    }
}

/// A Gateway resource.
pub type Gateway = IstioObject<istio::GatewaySpec>;
/// A VirtualService resource.
pub type VirtualService = IstioObject<istio::VirtualServiceSpec>;
/// A DestinationRule resource.
pub type DestinationRule = IstioObject<istio::DestinationRuleSpec>;
/// A ServiceEntry resource.
pub type ServiceEntry = IstioObject<istio::ServiceEntrySpec>;
/// A Gateway API Gateway.
pub type GatewayClass = IstioObject<gateway_api::GatewayClassSpec>;
pub type K8sGateway = IstioObject<gateway_api::K8sGatewaySpec>;
/// A Gateway API HTTPRoute.
pub type HttpRoute = IstioObject<gateway_api::HttpRouteSpec>;
/// A Gateway API GRPCRoute.
pub type GrpcRoute = IstioObject<gateway_api::GrpcRouteSpec>;
/// A Gateway API TCPRoute.
pub type TcpRoute = IstioObject<gateway_api::L4RouteSpec>;
/// A Gateway API TLSRoute.
pub type TlsRoute = IstioObject<gateway_api::L4RouteSpec>;
/// A Gateway API ReferenceGrant.
pub type ReferenceGrant = IstioObject<gateway_api::ReferenceGrantSpec>;
/// A Sidecar resource.
pub type Sidecar = IstioObject<istio::SidecarSpec>;
/// A PeerAuthentication resource.
pub type PeerAuthentication = IstioObject<istio::PeerAuthenticationSpec>;
/// A RequestAuthentication resource.
pub type RequestAuthentication = IstioObject<security::RequestAuthenticationSpec>;
/// An AuthorizationPolicy resource.
pub type AuthorizationPolicy = IstioObject<security::AuthorizationPolicySpec>;

/// One resource of a kind meshd reads.
// Resources live behind `Arc` in the store, so the variants' size spread
// costs nothing worth a second allocation per resource.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Resource {
    Namespace(Namespace),
    Node(Node),
    Service(Service),
    Endpoints(Endpoints),
    EndpointSlice(EndpointSlice),
    Pod(Pod),
    Secret(Arc<Secret>),
    Gateway(Arc<Gateway>),
    VirtualService(Arc<VirtualService>),
    DestinationRule(Arc<DestinationRule>),
    ServiceEntry(ServiceEntry),
    Sidecar(Sidecar),
    PeerAuthentication(Arc<PeerAuthentication>),
    RequestAuthentication(Arc<RequestAuthentication>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    Ingress(ingress::Ingress),
    IngressClass(ingress::IngressClass),
    GatewayClass(GatewayClass),
    K8sGateway(K8sGateway),
    HttpRoute(HttpRoute),
    GrpcRoute(GrpcRoute),
    TcpRoute(TcpRoute),
    TlsRoute(TlsRoute),
    ReferenceGrant(ReferenceGrant),
}

impl Resource {
    /// The resource's Kubernetes metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::Namespace(r) => &r.metadata,
            Resource::Node(r) => &r.metadata,
            Resource::Service(r) => &r.metadata,
            Resource::Endpoints(r) => &r.metadata,
            Resource::EndpointSlice(r) => &r.metadata,
            Resource::Pod(r) => &r.metadata,
            Resource::Secret(r) => &r.metadata,
            Resource::Gateway(r) => &r.metadata,
            Resource::VirtualService(r) => &r.metadata,
            Resource::DestinationRule(r) => &r.metadata,
            Resource::ServiceEntry(r) => &r.metadata,
            Resource::Sidecar(r) => &r.metadata,
            Resource::PeerAuthentication(r) => &r.metadata,
            Resource::RequestAuthentication(r) => &r.metadata,
            Resource::AuthorizationPolicy(r) => &r.metadata,
            Resource::Ingress(r) => &r.metadata,
            Resource::IngressClass(r) => &r.metadata,
            Resource::GatewayClass(r) => &r.metadata,
            Resource::K8sGateway(r) => &r.metadata,
            Resource::HttpRoute(r) => &r.metadata,
            Resource::GrpcRoute(r) => &r.metadata,
            Resource::TcpRoute(r) | Resource::TlsRoute(r) => &r.metadata,
            Resource::ReferenceGrant(r) => &r.metadata,
        }
    }

    /// The resource's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Namespace(_) => Kind::Namespace,
            Resource::Node(_) => Kind::Node,
            Resource::Service(_) => Kind::Service,
            Resource::Endpoints(_) => Kind::Endpoints,
            Resource::EndpointSlice(_) => Kind::EndpointSlice,
            Resource::Pod(_) => Kind::Pod,
            Resource::Secret(_) => Kind::Secret,
            Resource::Gateway(_) => Kind::Gateway,
            Resource::VirtualService(_) => Kind::VirtualService,
            Resource::DestinationRule(_) => Kind::DestinationRule,
            Resource::ServiceEntry(_) => Kind::ServiceEntry,
            Resource::Sidecar(_) => Kind::Sidecar,
            Resource::PeerAuthentication(_) => Kind::PeerAuthentication,
            Resource::RequestAuthentication(_) => Kind::RequestAuthentication,
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Resource::Ingress(_) => Kind::Ingress,
            Resource::IngressClass(_) => Kind::IngressClass,
            Resource::GatewayClass(_) => Kind::GatewayClass,
            Resource::K8sGateway(_) => Kind::K8sGateway,
            Resource::HttpRoute(_) => Kind::HttpRoute,
            Resource::GrpcRoute(_) => Kind::GrpcRoute,
            Resource::TcpRoute(_) => Kind::TcpRoute,
            Resource::TlsRoute(_) => Kind::TlsRoute,
            Resource::ReferenceGrant(_) => Kind::ReferenceGrant,
        }
    }

    /// The resource's key.
    pub fn key(&self) -> ResourceKey {
        let meta = self.metadata();
        ResourceKey {
            kind: self.kind(),
            namespace: meta.namespace.as_deref().unwrap_or_default().into(),
            name: meta.name.as_deref().unwrap_or_default().into(),
        }
    }
}

/// Where a resource was read from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Origin {
    /// Shared by the origins of one file's documents.
    pub file: Arc<str>,
    /// 1-based index of the document in its file; 0 for the file as a
    /// whole, and for an object read from the cluster (whose `file` is its
    /// API path).
    pub document: usize,
    /// 1-based line the document starts on; 0 when not known.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            // A file as a whole, or an object from the cluster.
            0 if self.document == 0 => f.write_str(&self.file),
            0 => write!(f, "{}: document {}", self.file, self.document),
            line => write!(f, "{}:{line}: document {}", self.file, self.document),
        }
    }
}

/// A document that was left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{origin}{}{}: {reason}", .key.as_ref().map(|k| format!(" ({k})")).unwrap_or_default(), .field.as_ref().map(|f| format!(": field {f}")).unwrap_or_default())]
pub struct Rejection {
    pub origin: Origin,
    /// The resource, when the document got far enough to name it.
    pub key: Option<ResourceKey>,
    /// The field path (`spec.http[0].route[0].destination.host`), when known.
    pub field: Option<String>,
    pub reason: String,
    /// True when an earlier good version of the same resource is still served.
    pub last_good_kept: bool,
}

/// One stored resource and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub origin: Origin,
    pub resource: Arc<Resource>,
}

/// How a resource changed from one generation to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Updated,
    Deleted,
}

impl Change {
    /// The `event` label istiod's registry metrics use.
    pub fn label(self) -> &'static str {
        match self {
            Change::Added => "add",
            Change::Updated => "update",
            Change::Deleted => "delete",
        }
    }

    pub fn past_tense(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Updated => "updated",
            Change::Deleted => "deleted",
        }
    }
}

/// One generation of configuration: every good resource, by key, and every
/// rejected document. Immutable once built; shared through `Arc`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigSnapshot {
    pub generation: u64,
    pub resources: BTreeMap<ResourceKey, Entry>,
    pub rejections: Vec<Rejection>,
}

impl ConfigSnapshot {
    /// Builds a snapshot straight from documents (no earlier generation), as
    /// `meshd analyze` and the tests do.
    pub fn from_files(files: Vec<FileLoad>) -> ConfigSnapshot {
        // Built, not applied: no store keeps it, so it is moved out rather
        // than copied.
        Arc::unwrap_or_clone(ConfigStore::default().rebuild(files))
    }

    /// Every resource that differs between this generation and `next`, in
    /// key order (one walk over both; unchanged files share their `Arc`s).
    pub fn changes<'a>(&'a self, next: &'a ConfigSnapshot) -> Vec<(&'a ResourceKey, Change)> {
        let mut out = Vec::new();
        let mut before = self.resources.iter().peekable();
        for (key, entry) in &next.resources {
            while let Some((k, _)) = before.next_if(|(k, _)| *k < key) {
                out.push((k, Change::Deleted));
            }
            match before.next_if(|(k, _)| *k == key) {
                Some((_, old)) => {
                    let same = Arc::ptr_eq(&old.resource, &entry.resource) || old.resource == entry.resource;
                    if !same {
                        out.push((key, Change::Updated));
                    }
                }
                None => out.push((key, Change::Added)),
            }
        }
        out.extend(before.map(|(k, _)| (k, Change::Deleted)));
        out
    }

    /// When `next` differs from this generation only in endpoints
    /// (Endpoints and EndpointSlices): the services, as (namespace, name),
    /// whose endpoints changed. `None` when anything else changed.
    pub fn endpoint_only_change(&self, next: &ConfigSnapshot) -> Option<BTreeSet<(String, String)>> {
        self.endpoint_only(next, &self.changes(next))
    }

    /// `endpoint_only_change`, given `changes` (`self.changes(next)`).
    pub fn endpoint_only(
        &self,
        next: &ConfigSnapshot,
        changes: &[(&ResourceKey, Change)],
    ) -> Option<BTreeSet<(String, String)>> {
        let mut services = BTreeSet::new();
        for (key, _) in changes {
            let (a, b) = (self.resources.get(key), next.resources.get(key));
            let service = match key.kind {
                Kind::Endpoints => key.name.to_string(),
                Kind::EndpointSlice => {
                    let label = |e: Option<&Entry>| {
                        e.and_then(|e| e.resource.metadata().labels.as_ref())
                            .and_then(|l| l.get("kubernetes.io/service-name").cloned())
                    };
                    label(a).or_else(|| label(b))?
                }
                _ => return None,
            };
            services.insert((key.namespace.to_string(), service));
        }
        Some(services)
    }

    /// Resources of one kind, in key order.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Resource> {
        // Keys sort by kind first: the kind's resources are one range.
        self.resources
            .range(ResourceKey::first_of(kind, "")..)
            .take_while(move |(k, _)| k.kind == kind)
            .map(|(_, e)| e.resource.as_ref())
    }
}
