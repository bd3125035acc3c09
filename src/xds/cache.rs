//! The snapshot cache: per push generation, one encoded snapshot per proxy
//! config key, so a resource set shared by many proxies is translated and
//! encoded once. Resource versions are content hashes, so the same config
//! gives the same versions across restarts.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::XdsType;
use crate::model::{Proxy, PushContext};
use crate::translate::{self, Diagnostic};

/// One resource, encoded once: its name, its content version and the `Any`
/// that goes on the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub name: String,
    /// First 16 hex digits of the SHA-256 of the encoded bytes.
    pub version: String,
    pub body: Any,
}

impl Encoded {
    /// Encodes a resource. prost encodes fields in tag order; translation
    /// avoids proto map fields (whose order is a HashMap's), so equal
    /// resources give equal bytes.
    pub fn new<M: Message + Name>(name: String, message: &M) -> Encoded {
        let value = message.encode_to_vec();
        Encoded {
            name,
            version: content_hash(&[&value]),
            body: Any {
                type_url: M::type_url(),
                value,
            },
        }
    }
}

/// Hex SHA-256 prefix of some byte strings.
pub fn content_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything one proxy is owed, by type and name.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    pub resources: BTreeMap<XdsType, BTreeMap<String, Arc<Encoded>>>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Snapshot {
    /// The resources of one type.
    pub fn of(&self, t: XdsType) -> Option<&BTreeMap<String, Arc<Encoded>>> {
        self.resources.get(&t)
    }
}

struct Generation {
    push: Arc<PushContext>,
    snapshots: DashMap<String, Arc<Snapshot>>,
    /// Equal resources of different config keys share one encoding.
    interned: DashMap<(XdsType, String), Arc<Encoded>>,
}

/// The cache. Streams read it; `update` installs a new push context and
/// wakes every stream.
pub struct SnapshotCache {
    current: RwLock<Arc<Generation>>,
    notify: watch::Sender<u64>,
}

impl std::fmt::Debug for SnapshotCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotCache")
            .field("generation", &*self.notify.borrow())
            .finish()
    }
}

impl SnapshotCache {
    /// A cache serving `push`.
    pub fn new(push: Arc<PushContext>) -> SnapshotCache {
        let generation = push.config.generation;
        SnapshotCache {
            current: RwLock::new(Arc::new(Generation::new(push))),
            notify: watch::Sender::new(generation),
        }
    }

    /// Installs a new push context; streams are woken and recompute.
    pub fn update(&self, push: Arc<PushContext>) {
        let generation = push.config.generation;
        let next = Arc::new(Generation::new(push));
        match self.current.write() {
            Ok(mut g) => *g = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        self.notify.send_replace(generation);
    }

    /// A receiver that changes whenever a new generation is installed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// The push context being served.
    pub fn push_context(&self) -> Arc<PushContext> {
        self.generation().push.clone()
    }

    fn generation(&self) -> Arc<Generation> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The snapshot for a proxy in the current generation, translated and
    /// encoded on first use by any proxy with the same config key.
    pub fn snapshot(&self, proxy: &Proxy) -> Arc<Snapshot> {
        let generation = self.generation();
        let key = translate::config_key(&generation.push, proxy);
        if let Some(s) = generation.snapshots.get(&key) {
            return s.clone();
        }
        let snapshot = Arc::new(generation.build(proxy));
        let shared = generation.snapshots.entry(key).or_insert(snapshot).clone();
        shared
    }
}

impl Generation {
    fn new(push: Arc<PushContext>) -> Generation {
        Generation {
            push,
            snapshots: DashMap::new(),
            interned: DashMap::new(),
        }
    }

    fn build(&self, proxy: &Proxy) -> Snapshot {
        let out = translate::generate(&self.push, proxy);
        let mut resources = BTreeMap::new();
        let mut add = |t: XdsType, e: Encoded| {
            let e = self.intern(t, e);
            resources
                .entry(t)
                .or_insert_with(BTreeMap::new)
                .insert(e.name.clone(), e);
        };
        for c in &out.clusters {
            add(XdsType::Cluster, Encoded::new(c.name.clone(), c));
        }
        for c in &out.endpoints {
            add(XdsType::Endpoint, Encoded::new(c.cluster_name.clone(), c));
        }
        for l in &out.listeners {
            add(XdsType::Listener, Encoded::new(l.name.clone(), l));
        }
        for r in &out.routes {
            add(XdsType::Route, Encoded::new(r.name.clone(), r));
        }
        for s in &out.secrets {
            add(XdsType::Secret, Encoded::new(s.name.clone(), s));
        }
        for d in &out.diagnostics {
            tracing::warn!(proxy = %proxy.id, resource = %d.resource, field = %d.field, "{}", d.message);
        }
        for t in XdsType::ALL {
            resources.entry(t).or_default();
        }
        Snapshot {
            generation: self.push.config.generation,
            resources,
            diagnostics: out.diagnostics,
        }
    }

    fn intern(&self, t: XdsType, e: Encoded) -> Arc<Encoded> {
        let key = (t, e.name.clone());
        if let Some(existing) = self.interned.get(&key) {
            if existing.version == e.version {
                return existing.clone();
            }
            return Arc::new(e);
        }
        self.interned.entry(key).or_insert_with(|| Arc::new(e)).clone()
    }
}
