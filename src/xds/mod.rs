//! xds: the snapshot cache, the per-stream protocol state, and the ADS
//! server (state of the world and incremental).
//!
//! `cache` turns a push context into per-proxy snapshots of encoded,
//! content-versioned resources, shared by every proxy with the same config
//! key. `stream` holds the protocol decisions (respond, ACK, NACK, what
//! changed) as pure functions over per-stream state. `server` is the thin
//! gRPC loop around them; `status` is what the debug endpoints read.

pub mod cache;
pub mod metric;
pub mod request;
pub mod server;
pub mod status;
pub mod stream;
pub mod wire;

use std::fmt;

use serde::Serialize;

pub use cache::{Encoded, Resources, Snapshot, SnapshotCache};
pub use server::{AdsServer, Limits};
pub use status::Registry;
pub use wire::AdsService;

/// A value per resource type, in type order: the few types a stream uses,
/// stored side by side (a `BTreeMap` node has room for eleven, and a
/// stream's per-type state is what a large mesh's streams are made of).
#[derive(Debug, Clone, PartialEq)]
pub struct TypeMap<V>(Vec<(XdsType, V)>);

impl<V> Default for TypeMap<V> {
    fn default() -> TypeMap<V> {
        TypeMap(Vec::new())
    }
}

impl<V> TypeMap<V> {
    pub fn get(&self, t: &XdsType) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == t).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, t: &XdsType) -> Option<&mut V> {
        self.0.iter_mut().find(|(k, _)| k == t).map(|(_, v)| v)
    }

    /// The value of `t`, made with `V::default()` when there is none.
    pub fn entry_or_default(&mut self, t: XdsType) -> &mut V
    where
        V: Default,
    {
        let at = match self.0.binary_search_by(|(k, _)| k.cmp(&t)) {
            Ok(at) => at,
            Err(at) => {
                self.0.reserve_exact(1);
                self.0.insert(at, (t, V::default()));
                at
            }
        };
        &mut self.0[at].1
    }

    pub fn iter(&self) -> impl Iterator<Item = (&XdsType, &V)> {
        self.into_iter()
    }
}

impl<V> std::ops::Index<&XdsType> for TypeMap<V> {
    type Output = V;
    fn index(&self, t: &XdsType) -> &V {
        self.get(t).expect("no value for this type")
    }
}

impl<'a, V> IntoIterator for &'a TypeMap<V> {
    type Item = (&'a XdsType, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (XdsType, V)>, fn(&'a (XdsType, V)) -> Self::Item>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

/// The resource types meshd serves, in make-before-break push order:
/// clusters before their endpoints, listeners before their routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum XdsType {
    Cluster,
    Endpoint,
    Listener,
    Route,
    Secret,
}

impl XdsType {
    /// Every type, in push order (CDS → EDS → LDS → RDS → SDS).
    pub const ALL: [XdsType; 5] = [
        XdsType::Cluster,
        XdsType::Endpoint,
        XdsType::Listener,
        XdsType::Route,
        XdsType::Secret,
    ];

    /// The short name istiod and Envoy's stats use: `cds`, `eds`, `lds`,
    /// `rds`, `sds`.
    pub fn short_name(self) -> &'static str {
        match self {
            XdsType::Cluster => "cds",
            XdsType::Endpoint => "eds",
            XdsType::Listener => "lds",
            XdsType::Route => "rds",
            XdsType::Secret => "sds",
        }
    }

    /// The type URL Envoy uses for this type.
    pub fn url(self) -> &'static str {
        match self {
            XdsType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            XdsType::Endpoint => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            XdsType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            XdsType::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            XdsType::Secret => "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        }
    }

    /// The type for a type URL, if meshd serves it.
    pub fn from_url(url: &str) -> Option<XdsType> {
        XdsType::ALL.into_iter().find(|t| t.url() == url)
    }

    /// Whether an empty subscription means "everything" (legacy wildcard,
    /// xDS protocol: "How the client specifies what resources to return").
    pub fn wildcard_by_default(self) -> bool {
        matches!(self, XdsType::Cluster | XdsType::Listener)
    }

    /// The type that must be sent again after this type changes: Envoy
    /// finishes warming a changed cluster only when a ClusterLoadAssignment
    /// for it arrives, even an unchanged one. (A changed listener needs no
    /// such help: it shares the route configuration Envoy already has.)
    pub fn dependent(self) -> Option<XdsType> {
        match self {
            XdsType::Cluster => Some(XdsType::Endpoint),
            _ => None,
        }
    }
}

impl fmt::Display for XdsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdsType::Cluster => "cds",
            XdsType::Endpoint => "eds",
            XdsType::Listener => "lds",
            XdsType::Route => "rds",
            XdsType::Secret => "sds",
        })
    }
}
