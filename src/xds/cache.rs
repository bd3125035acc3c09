//! The snapshot cache: per push generation, one encoded snapshot per proxy
//! config key, so a resource set shared by many proxies is translated and
//! encoded once. Resource versions are content hashes, so the same config
//! gives the same versions across restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::XdsType;
use crate::config::{Change, ConfigSnapshot, Kind, ResourceKey};
use crate::model::{Proxy, PushContext, DOMAIN_SUFFIX};
use crate::translate::{self, Diagnostic, Generated};

/// One resource, encoded once: its name, its content version and the `Any`
/// that goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub name: String,
    /// First 16 hex digits of the SHA-256 of the encoded bytes.
    pub version: String,
    /// The resource as an encoded `Any`, as it goes into every response
    /// that carries it (shared, never copied per stream).
    pub wire: bytes::Bytes,
}

impl Encoded {
    /// Encodes a resource. prost encodes fields in tag order; translation
    /// avoids proto map fields (whose order is a HashMap's), so equal
    /// resources give equal bytes.
    ///
    /// The `Any` is written by hand, in one buffer of its exact size
    /// (`type_url` = 1, `value` = 2, as prost writes them), rather than
    /// the message encoded and then copied into an `Any`.
    pub fn new<M: Message + Name>(name: String, message: &M) -> Encoded {
        Encoded::with_value(name, &M::type_url(), message.encoded_len(), |buf| {
            message.encode_raw(buf)
        })
    }

    /// A route table some of whose virtual hosts are already encoded (at
    /// their positions in `encoded`, the others in `table.virtual_hosts`):
    /// the same bytes `new` gives for the whole table. prost writes fields
    /// in tag order, `name` (1) and `virtual_hosts` (2) first, so the
    /// table is its name, each virtual host as field 2, then the table's
    /// other fields as prost writes them with those two left out.
    pub fn route_table(table: &mut RouteConfiguration, encoded: &[(usize, bytes::Bytes)]) -> Encoded {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
        let name = std::mem::take(&mut table.name);
        let vhosts = std::mem::take(&mut table.virtual_hosts);
        // Each host in table order: encoded, or to encode.
        let mut order: Vec<Result<&bytes::Bytes, &VirtualHost>> =
            Vec::with_capacity(vhosts.len() + encoded.len());
        let mut built = vhosts.iter();
        let mut ready = encoded.iter().peekable();
        loop {
            let at = order.len();
            if let Some((_, bytes)) = ready.next_if(|(pos, _)| *pos <= at) {
                order.push(Ok(bytes));
            } else if let Some(vhost) = built.next() {
                order.push(Err(vhost));
            } else if let Some((_, bytes)) = ready.next() {
                order.push(Ok(bytes));
            } else {
                break;
            }
        }
        let host_len = |h: &Result<&bytes::Bytes, &VirtualHost>| match h {
            Ok(bytes) => bytes.len(),
            Err(vhost) => vhost.encoded_len(),
        };
        let name_len = if name.is_empty() {
            0
        } else {
            1 + encoded_len_varint(name.len() as u64) + name.len()
        };
        let hosts_len: usize = order
            .iter()
            .map(|h| 1 + encoded_len_varint(host_len(h) as u64) + host_len(h))
            .sum();
        let len = name_len + hosts_len + table.encoded_len();
        let out = Encoded::with_value(name.clone(), &RouteConfiguration::type_url(), len, |buf| {
            if !name.is_empty() {
                prost::encoding::string::encode(1, &name, buf);
            }
            for h in &order {
                encode_key(2, WireType::LengthDelimited, buf);
                encode_varint(host_len(h) as u64, buf);
                match h {
                    Ok(bytes) => buf.extend_from_slice(bytes),
                    Err(vhost) => vhost.encode_raw(buf),
                }
            }
            table.encode_raw(buf);
        });
        table.name = name;
        table.virtual_hosts = vhosts;
        out
    }

    /// An `Any` of `type_url` whose value, `len` bytes, `write` writes.
    fn with_value(name: String, type_url: &str, len: usize, write: impl FnOnce(&mut Vec<u8>)) -> Encoded {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
        let mut wire = Vec::with_capacity(
            2 + encoded_len_varint(type_url.len() as u64)
                + type_url.len()
                + encoded_len_varint(len as u64)
                + len,
        );
        encode_key(1, WireType::LengthDelimited, &mut wire);
        encode_varint(type_url.len() as u64, &mut wire);
        wire.extend_from_slice(type_url.as_bytes());
        // An empty value is left out, as proto3 leaves out empty bytes.
        if len > 0 {
            encode_key(2, WireType::LengthDelimited, &mut wire);
            encode_varint(len as u64, &mut wire);
        }
        let start = wire.len();
        write(&mut wire);
        debug_assert_eq!(wire.len() - start, len, "the value is as long as said");
        let version = content_hash(&[&wire[start..]]);
        Encoded {
            name,
            version,
            wire: wire.into(),
        }
    }

    /// The resource as an `Any` (decoded again: for debug dumps and tests).
    pub fn body(&self) -> Any {
        Any::decode(self.wire.clone()).unwrap_or_default()
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

/// Resources of one type by name, shared: by the proxies of one config
/// key, and by each stream as the record of what its proxy holds (copied
/// only when a stream's record comes to differ).
pub type Resources = Arc<BTreeMap<String, Arc<Encoded>>>;

/// Everything one proxy is owed, by type and name.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    pub resources: BTreeMap<XdsType, Resources>,
    /// The version of each type's whole set, computed once: what a stream
    /// that takes in all of a type sends as its version.
    pub versions: BTreeMap<XdsType, String>,
    pub diagnostics: Vec<Diagnostic>,
    /// The Secrets and diagnostics of the outbound clusters' translation
    /// (`translate::outbound`; its clusters and endpoints left out), kept
    /// for a patch that translates only the listeners again.
    pub outbound: Arc<Generated>,
    /// The streams' walks over it, shared (see `Walks`); also by the
    /// per-workload copies that add a proxy's own secrets.
    pub walks: Arc<super::stream::Walks>,
}

/// The version of a set of resources: a hash of their names and versions,
/// in name order. The same resources give the same version, across restarts.
pub fn set_version(resources: &BTreeMap<String, Arc<Encoded>>) -> String {
    let parts: Vec<&[u8]> = resources
        .values()
        .flat_map(|e| [e.name.as_bytes(), e.version.as_bytes()])
        .collect();
    content_hash(&parts)
}

impl Snapshot {
    /// The resources of one type.
    pub fn of(&self, t: XdsType) -> Option<&BTreeMap<String, Arc<Encoded>>> {
        self.resources.get(&t).map(|m| &**m)
    }

    /// The resources of one type, as the shared map.
    pub fn shared(&self, t: XdsType) -> Option<&Resources> {
        self.resources.get(&t)
    }
}

struct Generation {
    push: Arc<PushContext>,
    snapshots: DashMap<String, Arc<Snapshot>>,
    /// Equal resources of different config keys share one encoding.
    interned: DashMap<(XdsType, String), Arc<Encoded>>,
    /// The virtual hosts no VirtualService routes, encoded once for every
    /// config key (`translate::listeners_with`).
    vhosts: translate::VirtualHostCache,
    /// Each service's outbound clusters and endpoints, encoded once for
    /// every config key whose proxies read the same of it
    /// (`translate::ClusterKey`, which points into `push`).
    services: DashMap<translate::ClusterKey, Arc<ServiceOutbound>>,
    /// The previous generation's `services` (and what it carried) still
    /// valid in this one (`carried_services`), moved into `services` as
    /// they are used: a change that leaves most services alone translates
    /// only its own.
    carried: std::collections::HashMap<translate::ClusterKey, Carried>,
    /// Resource maps equal between config keys, shared: by type and set
    /// version (and compared, should two versions collide).
    maps: DashMap<(XdsType, String), Resources>,
    /// The endpoint patches made: from a previous map (by address; held
    /// here, so the address is not reused) and the new assignments (by
    /// address; held by the patched map) to the patched map and its
    /// version. Config keys that shared a map before an endpoint change
    /// share the patched one, made once.
    patched: DashMap<(usize, Vec<usize>), Patched>,
    /// When only endpoints or only VirtualServices changed since the
    /// previous generation: its snapshots, which are patched instead of
    /// translated again.
    base: Option<Base>,
    /// Its push, as `/debug/push_status` shows it.
    stats: Arc<PushStats>,
}

/// One service's part of a proxy's outbound half, its clusters and
/// endpoints encoded.
struct ServiceOutbound {
    clusters: Vec<Arc<Encoded>>,
    endpoints: Vec<Arc<Encoded>>,
    secrets: Vec<envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret>,
    diagnostics: Vec<Diagnostic>,
}

/// A service's part carried from an earlier generation, and how many
/// generations that translated clusters since have not used it.
#[derive(Clone)]
struct Carried {
    part: Arc<ServiceOutbound>,
    idle: u8,
}

/// Generations that translate clusters and leave a carried part unused,
/// after which it is dropped. A part is only of use to proxies that read
/// the same of its service (`ClusterKey`: locality, labels a failover
/// ranks by, namespace): when no such proxy is left, as after a rollout
/// gave every pod new labels, nothing else would ever drop it. A part
/// dropped too soon is translated again.
const CARRIED_IDLE_MAX: u8 = 8;

/// An endpoint patch: the map patched, the result and its version.
struct Patched {
    _from: Resources,
    map: Resources,
    version: String,
}

/// The previous generation's snapshots and what changed since.
struct Base {
    snapshots: std::collections::HashMap<String, Arc<Snapshot>>,
    patch: Patch,
}

/// What a patch of a previous snapshot translates again.
enum Patch {
    /// The endpoints of these services (hosts): all an endpoint-only
    /// change can alter.
    Endpoints(BTreeSet<String>),
    /// Listeners, routes and their secrets: all a change of VirtualServices
    /// alone can alter (clusters and endpoints do not depend on them).
    Listeners,
}

/// What of the previous generation's snapshots `changes` leave valid.
fn patch_for(
    prev: &ConfigSnapshot,
    next: &ConfigSnapshot,
    changes: &[(&ResourceKey, Change)],
) -> Option<Patch> {
    if let Some(hosts) = endpoint_only_change(prev, next, changes) {
        return Some(Patch::Endpoints(hosts));
    }
    changes
        .iter()
        .all(|(key, _)| key.kind == Kind::VirtualService)
        .then_some(Patch::Listeners)
}

/// When only endpoints changed between two generations (`changes` between
/// them): the hosts of the services whose endpoints changed.
fn endpoint_only_change(
    prev: &ConfigSnapshot,
    next: &ConfigSnapshot,
    changes: &[(&ResourceKey, Change)],
) -> Option<BTreeSet<String>> {
    let services = prev.endpoint_only(next, changes)?;
    Some(
        services
            .into_iter()
            .map(|(namespace, name)| format!("{name}.{namespace}.{DOMAIN_SUFFIX}"))
            .collect(),
    )
}

/// The cache. Streams read it; `update` installs a new push context and
/// wakes every stream.
pub struct SnapshotCache {
    current: RwLock<Arc<Generation>>,
    notify: watch::Sender<u64>,
    /// See `installs`.
    installs: std::sync::atomic::AtomicU64,
    /// The last pushes, newest last.
    history: std::sync::Mutex<std::collections::VecDeque<Arc<PushStats>>>,
}

/// Pushes `/debug/push_status` remembers.
const PUSH_HISTORY: usize = 20;

/// Changes named in a push's trigger, at most.
const TRIGGER_NAMES: usize = 10;

/// One config generation's push: what triggered it, how many proxies it
/// reached and how long the last of them took.
#[derive(Debug)]
pub struct PushStats {
    pub generation: u64,
    pub installed: std::time::SystemTime,
    installed_at: std::time::Instant,
    /// The changed resources ("VirtualService default/hello updated").
    pub trigger: Vec<String>,
    /// Only endpoints changed: an EDS-only push.
    pub endpoint_only: bool,
    proxies: std::sync::atomic::AtomicU64,
    /// Microseconds from installation to the last proxy's push written.
    last_push_us: std::sync::atomic::AtomicU64,
}

impl PushStats {
    fn new(generation: u64, trigger: Vec<String>, endpoint_only: bool) -> PushStats {
        PushStats {
            generation,
            installed: std::time::SystemTime::now(),
            installed_at: std::time::Instant::now(),
            trigger,
            endpoint_only,
            proxies: Default::default(),
            last_push_us: Default::default(),
        }
    }

    /// Proxies pushed this generation so far.
    pub fn proxies(&self) -> u64 {
        self.proxies.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// From installation to the last proxy's push written.
    pub fn last_push(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.last_push_us.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// What changed between two generations, as a push's trigger.
fn trigger(changes: &[(&ResourceKey, Change)]) -> Vec<String> {
    let mut out: Vec<String> = changes
        .iter()
        .take(TRIGGER_NAMES)
        .map(|(key, change)| format!("{key} {}", change.past_tense()))
        .collect();
    if changes.len() > TRIGGER_NAMES {
        out.push(format!("and {} more", changes.len() - TRIGGER_NAMES));
    }
    out
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
        let stats = Arc::new(PushStats::new(generation, vec!["first config".into()], false));
        SnapshotCache {
            current: RwLock::new(Arc::new(Generation::new(push, stats.clone()))),
            notify: watch::Sender::new(generation),
            installs: std::sync::atomic::AtomicU64::new(0),
            history: std::sync::Mutex::new([stats].into()),
        }
    }

    /// Installs a new push context; streams are woken and recompute.
    pub fn update(&self, push: Arc<PushContext>) {
        let prev = self.generation();
        let changes = prev.push.config.changes(&push.config);
        self.install(&prev, push.clone(), &changes);
    }

    /// `update`, given the changes from `from` to `push`
    /// (`ConfigSnapshot::changes`), as `PushContext::next_with` took them:
    /// not computed again when `from` is the push context being served.
    pub fn update_from(
        &self,
        from: &Arc<PushContext>,
        push: Arc<PushContext>,
        changes: &[(&ResourceKey, Change)],
    ) {
        let prev = self.generation();
        if Arc::ptr_eq(&prev.push, from) {
            self.install(&prev, push, changes);
        } else {
            self.update(push);
        }
    }

    fn install(&self, prev: &Generation, push: Arc<PushContext>, changes: &[(&ResourceKey, Change)]) {
        let generation = push.config.generation;
        super::metric::count_config_changes(changes);
        // Validity is judged at each generation's time: when a judgment may
        // differ, nothing of the previous snapshots is kept.
        let patch = patch_for(&prev.push.config, &push.config, changes)
            .filter(|_| prev.push.credentials.judged_alike(&push.credentials));
        let endpoint_only = matches!(patch, Some(Patch::Endpoints(_)));
        let stats = Arc::new(PushStats::new(generation, trigger(changes), endpoint_only));
        if let Ok(mut history) = self.history.lock() {
            if history.len() == PUSH_HISTORY {
                history.pop_front();
            }
            history.push_back(stats.clone());
        }
        let mut next = Generation::new(push, stats);
        let objects = translate::ClusterObjects::of(&next.push);
        next.carried = carried_services(prev, &next.push, &objects);
        next.vhosts = translate::VirtualHostCache::carried(&prev.vhosts, &next.push, &objects);
        if let Some(patch) = patch {
            let snapshots = prev
                .snapshots
                .iter()
                .map(|e| (e.key().clone(), e.value().clone()))
                .collect();
            next.base = Some(Base { snapshots, patch });
        }
        let next = Arc::new(next);
        let old = match self.current.write() {
            Ok(mut g) => std::mem::replace(&mut *g, next),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), next),
        };
        self.installs.fetch_add(1, std::sync::atomic::Ordering::Release);
        self.notify.send_replace(generation);
        retire(old);
    }

    /// How many generations were installed: it moves (after the
    /// generation is served) at every install, even one of the same
    /// config generation.
    pub fn installs(&self) -> u64 {
        self.installs.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A receiver that changes whenever a new generation is installed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// The push context being served.
    pub fn push_context(&self) -> Arc<PushContext> {
        self.generation().push.clone()
    }

    /// Records a push of `generation` written to a proxy; returns the time
    /// since that generation was installed (its convergence), or `None`
    /// when the generation is no longer the current one.
    pub fn pushed(&self, generation: u64) -> Option<std::time::Duration> {
        let g = self.generation();
        if g.stats.generation != generation {
            return None;
        }
        let since = g.stats.installed_at.elapsed();
        g.stats.proxies.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let us = u64::try_from(since.as_micros()).unwrap_or(u64::MAX);
        g.stats
            .last_push_us
            .fetch_max(us, std::sync::atomic::Ordering::Relaxed);
        Some(since)
    }

    /// The last pushes, newest first.
    pub fn push_history(&self) -> Vec<Arc<PushStats>> {
        match self.history.lock() {
            Ok(h) => h.iter().rev().cloned().collect(),
            Err(_) => Vec::new(),
        }
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
        let snapshot = match generation
            .base
            .as_ref()
            .and_then(|b| Some((b, b.snapshots.get(&key)?)))
        {
            Some((base, previous)) => Arc::new(match &base.patch {
                Patch::Endpoints(hosts) => generation.patch_endpoints(proxy, previous, hosts),
                Patch::Listeners => generation.patch_listeners(proxy, previous),
            }),
            None => Arc::new(generation.build(proxy)),
        };
        let shared = generation.snapshots.entry(key).or_insert(snapshot).clone();
        shared
    }
}

impl Generation {
    fn new(push: Arc<PushContext>, stats: Arc<PushStats>) -> Generation {
        Generation {
            vhosts: translate::VirtualHostCache::new(&push),
            services: DashMap::new(),
            carried: std::collections::HashMap::new(),
            maps: DashMap::new(),
            patched: DashMap::new(),
            push,
            snapshots: DashMap::new(),
            interned: DashMap::new(),
            base: None,
            stats,
        }
    }

    /// The previous snapshot of a config key with the endpoints of `hosts`
    /// translated again: all an endpoint-only change can alter.
    fn patch_endpoints(&self, proxy: &Proxy, previous: &Snapshot, hosts: &BTreeSet<String>) -> Snapshot {
        let updates: Vec<Arc<Encoded>> = translate::endpoints_of(&self.push, proxy, hosts)
            .iter()
            .map(|cla| self.intern(XdsType::Endpoint, Encoded::new(cla.cluster_name.clone(), cla)))
            .collect();
        let from = previous
            .resources
            .get(&XdsType::Endpoint)
            .cloned()
            .unwrap_or_default();
        let key = (
            Arc::as_ptr(&from) as usize,
            updates.iter().map(|e| Arc::as_ptr(e) as usize).collect(),
        );
        let (map, version) = match self.patched.entry(key) {
            dashmap::Entry::Occupied(done) => (done.get().map.clone(), done.get().version.clone()),
            dashmap::Entry::Vacant(todo) => {
                let mut map = (*from).clone();
                map.extend(updates.into_iter().map(|e| (e.name.clone(), e)));
                let (map, version) = self.share(XdsType::Endpoint, map);
                todo.insert(Patched {
                    _from: from,
                    map: map.clone(),
                    version: version.clone(),
                });
                (map, version)
            }
        };
        let mut resources = previous.resources.clone();
        resources.insert(XdsType::Endpoint, map);
        let mut versions = previous.versions.clone();
        versions.insert(XdsType::Endpoint, version);
        Snapshot {
            generation: self.push.config.generation,
            resources,
            versions,
            diagnostics: previous.diagnostics.clone(),
            outbound: previous.outbound.clone(),
            walks: Arc::default(),
        }
    }

    /// The previous snapshot of a config key with its listeners, routes and
    /// secrets translated again, its clusters and endpoints kept.
    fn patch_listeners(&self, proxy: &Proxy, previous: &Snapshot) -> Snapshot {
        let kept = Generated {
            secrets: previous.outbound.secrets.clone(),
            diagnostics: previous.outbound.diagnostics.clone(),
            ..Default::default()
        };
        let mut out = translate::combine(kept, self.listeners(proxy));
        warn(proxy, &out.diagnostics);
        let mut resources = previous.resources.clone();
        let mut versions = previous.versions.clone();
        for (t, map) in self.encode(&mut out, &[XdsType::Listener, XdsType::Route, XdsType::Secret]) {
            let (map, version) = self.share(t, map);
            versions.insert(t, version);
            resources.insert(t, map);
        }
        Snapshot {
            generation: self.push.config.generation,
            resources,
            versions,
            diagnostics: out.diagnostics,
            outbound: previous.outbound.clone(),
            walks: Arc::default(),
        }
    }

    fn build(&self, proxy: &Proxy) -> Snapshot {
        // The halves read only the push context: on a large mesh, made at
        // once. Listeners and routes come from the listener half alone, so
        // its thread encodes and shares them too (they intern under types
        // of their own, apart from the outbound half's).
        let large = self.push.services.len() >= crate::parallel::LARGE_MESH;
        const OWN: [XdsType; 2] = [XdsType::Listener, XdsType::Route];
        let ((outbound, mut shared), (listeners, own)) = crate::parallel::join(
            large,
            || self.outbound(proxy),
            || {
                let mut half = self.listeners(proxy);
                let own: Vec<_> = (self.encode(&mut half, &OWN).into_iter())
                    .map(|(t, m)| (t, self.share(t, m)))
                    .collect();
                (half, own)
            },
        );
        let kept = Arc::new(Generated {
            secrets: outbound.secrets.clone(),
            diagnostics: outbound.diagnostics.clone(),
            ..Default::default()
        });
        let mut out = translate::combine(outbound, listeners);
        warn(proxy, &out.diagnostics);
        let mut resources = BTreeMap::new();
        let mut versions = BTreeMap::new();
        let rest: Vec<XdsType> = XdsType::ALL.into_iter().filter(|t| !OWN.contains(t)).collect();
        let rest = self.encode(&mut out, &rest).into_iter().map(|(t, m)| {
            // The listener half's clusters after the services', as in one
            // translation sorted by name.
            let mut all = shared.remove(&t).unwrap_or_default();
            all.extend(m);
            (t, self.share(t, all))
        });
        for (t, (map, version)) in own.into_iter().chain(rest) {
            resources.insert(t, map);
            versions.insert(t, version);
        }
        Snapshot {
            generation: self.push.config.generation,
            versions,
            resources,
            diagnostics: out.diagnostics,
            outbound: kept,
            walks: Arc::default(),
        }
    }

    /// A proxy's outbound half (`translate::outbound`): its services'
    /// clusters and endpoints encoded, by type, each service's shared with
    /// the generation's other config keys whose proxies read the same of
    /// it; the rest (`BlackHoleCluster`, Secrets, diagnostics) translated.
    fn outbound(&self, proxy: &Proxy) -> (Generated, BTreeMap<XdsType, BTreeMap<String, Arc<Encoded>>>) {
        let mut out = Generated::default();
        let (mut clusters, mut endpoints) = (BTreeMap::new(), BTreeMap::new());
        for service in translate::outbound_services(&self.push, proxy) {
            let part = self.service_outbound(&service);
            clusters.extend(part.clusters.iter().map(|e| (e.name.clone(), e.clone())));
            endpoints.extend(part.endpoints.iter().map(|e| (e.name.clone(), e.clone())));
            out.secrets.extend(part.secrets.iter().cloned());
            out.diagnostics.extend(part.diagnostics.iter().cloned());
        }
        translate::outbound_rest(&mut out);
        let encoded = [(XdsType::Cluster, clusters), (XdsType::Endpoint, endpoints)];
        (out, encoded.into())
    }

    /// One service's clusters and endpoints, translated and encoded on
    /// first use by a config key whose proxies read what this one does.
    fn service_outbound(&self, service: &translate::ServiceClusters<'_>) -> Arc<ServiceOutbound> {
        let key = service.key();
        if let Some(part) = self.services.get(&key) {
            return part.clone();
        }
        if let Some(carried) = self.carried.get(&key) {
            return self
                .services
                .entry(key)
                .or_insert_with(|| carried.part.clone())
                .clone();
        }
        let mut out = Generated::default();
        service.translate(&self.push, &mut out);
        let part = Arc::new(ServiceOutbound {
            clusters: (out.clusters.iter())
                .map(|c| self.intern(XdsType::Cluster, Encoded::new(c.name.clone(), c)))
                .collect(),
            endpoints: (out.endpoints.iter())
                .map(|c| self.intern(XdsType::Endpoint, Encoded::new(c.cluster_name.clone(), c)))
                .collect(),
            secrets: out.secrets,
            diagnostics: out.diagnostics,
        });
        self.services.entry(key).or_insert(part).clone()
    }

    /// A proxy's listener half, its default virtual hosts shared with the
    /// generation's other config keys.
    fn listeners(&self, proxy: &Proxy) -> Generated {
        translate::listeners_with(&self.push, proxy, Some(&self.vhosts))
    }

    /// The resources of `types` in `out`, encoded and interned, by type
    /// (every type given has its map, empty or not). Route tables are
    /// lent out while encoded (`Encoded::route_table`).
    fn encode(
        &self,
        out: &mut Generated,
        types: &[XdsType],
    ) -> Vec<(XdsType, BTreeMap<String, Arc<Encoded>>)> {
        types
            .iter()
            .map(|&t| {
                let mut map = BTreeMap::new();
                let mut add = |e: Encoded| {
                    let e = self.intern(t, e);
                    map.insert(e.name.clone(), e);
                };
                match t {
                    XdsType::Cluster => out
                        .clusters
                        .iter()
                        .for_each(|c| add(Encoded::new(c.name.clone(), c))),
                    XdsType::Endpoint => out
                        .endpoints
                        .iter()
                        .for_each(|c| add(Encoded::new(c.cluster_name.clone(), c))),
                    XdsType::Listener => out
                        .listeners
                        .iter()
                        .for_each(|l| add(Encoded::new(l.name.clone(), l))),
                    XdsType::Route => out.routes.iter_mut().for_each(|r| {
                        add(match out.encoded_vhosts.get(&r.name) {
                            Some(encoded) => Encoded::route_table(r, encoded),
                            None => Encoded::new(r.name.clone(), &*r),
                        })
                    }),
                    XdsType::Secret => out
                        .secrets
                        .iter()
                        .for_each(|s| add(Encoded::new(s.name.clone(), s))),
                }
                (t, map)
            })
            .collect()
    }

    /// `map` and its set version; the map another config key made, when
    /// equal.
    fn share(&self, t: XdsType, map: BTreeMap<String, Arc<Encoded>>) -> (Resources, String) {
        let version = set_version(&map);
        let shared = match self.maps.entry((t, version.clone())) {
            dashmap::Entry::Occupied(e) if **e.get() == map => e.get().clone(),
            dashmap::Entry::Occupied(_) => Arc::new(map),
            dashmap::Entry::Vacant(e) => e.insert(Arc::new(map)).clone(),
        };
        (shared, version)
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

/// The service clusters `prev` made or carried that hold in `push` too:
/// those of services and rules that `push` still holds (`ClusterObjects`),
/// when what else a service's clusters read is the same (the trust domain,
/// and the Secrets, judged alike). What `prev` carried and did not use is
/// carried on: a generation that patched its snapshots (an endpoint or a
/// VirtualService change) uses none, and the one after it still has them;
/// a generation that translated clusters and left it unused makes it older
/// (`CARRIED_IDLE_MAX`).
fn carried_services(
    prev: &Generation,
    push: &PushContext,
    objects: &translate::ClusterObjects,
) -> std::collections::HashMap<translate::ClusterKey, Carried> {
    if prev.push.trust_domain != push.trust_domain || !prev.push.credentials.judged_alike(&push.credentials) {
        return std::collections::HashMap::new();
    }
    let aging = u8::from(prev.base.is_none());
    let mut carried: std::collections::HashMap<_, _> = (prev.carried.iter())
        .filter(|(key, c)| objects.hold(key) && c.idle + aging <= CARRIED_IDLE_MAX)
        .map(|(key, c)| {
            let c = Carried {
                part: c.part.clone(),
                idle: c.idle + aging,
            };
            (key.clone(), c)
        })
        .collect();
    for e in prev.services.iter().filter(|e| objects.hold(e.key())) {
        let c = Carried {
            part: e.value().clone(),
            idle: 0,
        };
        carried.insert(e.key().clone(), c);
    }
    carried
}

/// Drops a generation no longer served off the async workers, once the
/// streams were told of the next: its caches are thousands of small
/// allocations, and freeing them held the write lock streams read the
/// generation through, and the push, for a millisecond or more.
fn retire(old: Arc<Generation>) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(move || drop(old))),
        Err(_) => drop(old),
    }
}

/// Logs what a proxy's translation could not honour.
fn warn(proxy: &Proxy, diagnostics: &[Diagnostic]) {
    for d in diagnostics {
        tracing::warn!(proxy = %proxy.id, resource = %d.resource, field = %d.field, "{}", d.message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_file;
    use envoy_types::pb::envoy::config::route::v3::{route, RouteConfiguration};

    fn push(reviews_ips: &str, extra: &str) -> Arc<PushContext> {
        let yaml = format!(
            "apiVersion: networking.istio.io/v1beta1\nkind: Gateway\nmetadata: {{name: gw, namespace: istio-system}}\n\
             spec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - port: {{number: 80, name: http, protocol: HTTP}}\n    hosts: ['*']\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: 9080}}]\n---\n\
             apiVersion: v1\nkind: Endpoints\nmetadata: {{name: reviews, namespace: default}}\nsubsets:\n- addresses: [{reviews_ips}]\n  ports: [{{name: http, port: 9080}}]\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: r1, namespace: default, labels: {{version: v1}}}}\nstatus: {{podIP: 10.0.0.1}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: r2, namespace: default, labels: {{version: v2}}}}\nstatus: {{podIP: 10.0.0.2}}\n---\n\
             apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\n\
             spec:\n  host: reviews\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: ratings, namespace: default}}\nspec:\n  ports: [{{name: http, port: 80}}]\n---\n\
             apiVersion: v1\nkind: Endpoints\nmetadata: {{name: ratings, namespace: default}}\nsubsets:\n- addresses: [{{ip: 10.0.1.1}}]\n  ports: [{{name: http, port: 80}}]\n{extra}"
        );
        let snapshot = ConfigSnapshot::from_files(vec![parse_file("m.yaml", &yaml)]);
        assert!(snapshot.rejections.is_empty(), "{:?}", snapshot.rejections);
        Arc::new(PushContext::new(Arc::new(snapshot)))
    }

    fn proxies() -> Vec<Proxy> {
        let gw = serde_json::json!({"LABELS": {"istio": "ingressgateway"}});
        let sc = serde_json::json!({"LABELS": {"app": "sleep"}});
        vec![
            Proxy::parse(
                "router~10.1.0.1~gw-1.istio-system~istio-system.svc.cluster.local",
                gw.as_object().expect("object"),
            )
            .expect("gateway"),
            Proxy::parse(
                "sidecar~10.1.0.2~sleep-1.default~default.svc.cluster.local",
                sc.as_object().expect("object"),
            )
            .expect("sidecar"),
        ]
    }

    fn versions(s: &Snapshot) -> BTreeMap<(XdsType, String), String> {
        s.resources
            .iter()
            .flat_map(|(t, m)| m.values().map(move |e| ((*t, e.name.clone()), e.version.clone())))
            .collect()
    }

    #[test]
    fn an_endpoint_change_patches_the_previous_snapshots_to_what_a_full_translation_gives() {
        let before = push("{ip: 10.0.0.1}", "");
        let after = push("{ip: 10.0.0.1}, {ip: 10.0.0.2}", "");
        assert_eq!(
            endpoint_only_change(
                &before.config,
                &after.config,
                &before.config.changes(&after.config)
            ),
            Some(BTreeSet::from(["reviews.default.svc.cluster.local".to_string()]))
        );
        let other = push(
            "{ip: 10.0.0.1}",
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        );
        assert_eq!(
            endpoint_only_change(
                &before.config,
                &other.config,
                &before.config.changes(&other.config)
            ),
            None
        );
        for proxy in proxies() {
            let cache = SnapshotCache::new(before.clone());
            let old = cache.snapshot(&proxy);
            cache.update(after.clone());
            let patched = cache.snapshot(&proxy);
            let fresh = SnapshotCache::new(after.clone()).snapshot(&proxy);
            assert_eq!(versions(&patched), versions(&fresh), "{}", proxy.id);
            // The patch reused the unchanged resources instead of encoding
            // them again, and changed the subsets' endpoints.
            let cluster = "outbound|80||ratings.default.svc.cluster.local";
            let (o, p) = (
                &old.resources[&XdsType::Cluster][cluster],
                &patched.resources[&XdsType::Cluster][cluster],
            );
            assert!(Arc::ptr_eq(o, p), "{}", proxy.id);
            let v2 = "outbound|80|v2|reviews.default.svc.cluster.local";
            assert_ne!(
                old.resources[&XdsType::Endpoint][v2].version,
                patched.resources[&XdsType::Endpoint][v2].version
            );
        }
    }

    /// Config keys whose endpoints were equal share one map; after an
    /// endpoint change those that get equal assignments share one patched
    /// map, made once, and one that gets others (ranked from another
    /// locality) has its own. Each equals a whole translation.
    #[test]
    fn config_keys_with_equal_endpoints_share_one_patched_map() {
        let extra = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: east, namespace: default, labels: {istio-locality: us-east.z1}}\nstatus: {podIP: 10.0.0.3}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {name: west, namespace: default, labels: {istio-locality: us-west.z2}}\nstatus: {podIP: 10.0.0.4}\n\
             ---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: ranked, namespace: default}\n\
             spec:\n  host: ratings\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 5}\n";
        let with_ratings = |ips: &str| {
            let base = push("{ip: 10.0.0.1}", extra);
            let mut config = (*base.config).clone();
            let yaml = format!(
                "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: ratings, namespace: default}}\nsubsets:\n- addresses: [{ips}]\n  ports: [{{name: http, port: 80}}]\n"
            );
            let ratings = ConfigSnapshot::from_files(vec![parse_file("r.yaml", &yaml)]);
            for (key, value) in ratings.resources {
                config.resources.insert(key, value);
            }
            config.generation += u64::from(!ips.is_empty());
            Arc::new(PushContext::new(Arc::new(config)))
        };
        let sidecar = |ns: &str, locality: &str| {
            let mut proxy = client(ns, serde_json::json!({"app": "client"}));
            proxy.locality = locality.into();
            proxy
        };
        let proxies = [
            sidecar("default", "us-east/z1"),
            sidecar("shop", "us-east/z1"),
            sidecar("default", "us-west/z2"),
        ];
        let (before, after) = (with_ratings(""), with_ratings("{ip: 10.0.0.3}, {ip: 10.0.0.4}"));
        let cache = SnapshotCache::new(before.clone());
        let old: Vec<Arc<Snapshot>> = proxies.iter().map(|p| cache.snapshot(p)).collect();
        let endpoints = |s: &Snapshot| s.resources[&XdsType::Endpoint].clone();
        assert!(Arc::ptr_eq(&endpoints(&old[0]), &endpoints(&old[1])));
        assert!(Arc::ptr_eq(&endpoints(&old[0]), &endpoints(&old[2])));
        cache.update(after.clone());
        assert!(cache.push_history()[0].endpoint_only);
        let new: Vec<Arc<Snapshot>> = proxies.iter().map(|p| cache.snapshot(p)).collect();
        for (proxy, patched) in proxies.iter().zip(&new) {
            let fresh = SnapshotCache::new(after.clone()).snapshot(proxy);
            assert_eq!(versions(patched), versions(&fresh), "{}", proxy.id);
            assert_eq!(patched.versions, fresh.versions, "{}", proxy.id);
        }
        assert!(Arc::ptr_eq(&endpoints(&new[0]), &endpoints(&new[1])));
        assert!(!Arc::ptr_eq(&endpoints(&new[0]), &endpoints(&new[2])));
        let cluster = "outbound|80||ratings.default.svc.cluster.local";
        assert_ne!(
            endpoints(&new[0])[cluster].version,
            endpoints(&new[2])[cluster].version,
            "ranked from the proxy's own locality"
        );
    }

    /// Two maps whose set versions collide are not taken for each other.
    #[test]
    fn maps_with_colliding_versions_are_not_shared() {
        let g = Generation::new(
            push("{ip: 10.0.0.1}", ""),
            Arc::new(PushStats::new(0, Vec::new(), false)),
        );
        let map = |name: &str| {
            let e = Arc::new(Encoded::new(name.into(), &RouteConfiguration::default()));
            BTreeMap::from([(name.to_string(), e)])
        };
        let (a, b) = (map("a"), map("b"));
        g.maps.insert((XdsType::Route, set_version(&b)), Arc::new(a));
        let (shared, version) = g.share(XdsType::Route, b.clone());
        assert_eq!(*shared, b);
        assert_eq!(version, set_version(&b));
        let (again, _) = g.share(XdsType::Route, map("c"));
        let (same, _) = g.share(XdsType::Route, map("c"));
        assert!(Arc::ptr_eq(&again, &same), "equal maps are shared");
    }

    /// Changes handed in are used against the push context they were
    /// found from, and found again when another one is being served.
    #[test]
    fn changes_handed_in_are_used_only_against_the_push_context_served() {
        let before = push("{ip: 10.0.0.1}", "");
        let after = push("{ip: 10.0.0.1}, {ip: 10.0.0.2}", "");
        let cache = SnapshotCache::new(before.clone());
        let changes = before.config.changes(&after.config);
        cache.update_from(&before, after.clone(), &changes);
        let last = &cache.push_history()[0];
        assert!(last.endpoint_only);
        assert_eq!(last.trigger.len(), 1, "{:?}", last.trigger);
        assert!(last.trigger[0].contains("reviews"), "{:?}", last.trigger);
        // `before` is no longer served: the (wrong) empty list is ignored.
        let other = push(
            "{ip: 10.0.0.1}",
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        );
        cache.update_from(&before, other, &[]);
        let last = &cache.push_history()[0];
        assert!(!last.endpoint_only, "{:?}", last.trigger);
        assert!(
            last.trigger.iter().any(|t| t.contains("Namespace")),
            "{:?}",
            last.trigger
        );
    }

    /// The hand-written `Any` is the bytes prost writes for one, and the
    /// version hashes the message's own encoding, empty or not.
    #[test]
    fn an_encoded_resource_is_the_any_prost_writes() {
        use envoy_types::pb::envoy::config::cluster::v3::Cluster;
        use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
        let cluster = Cluster {
            name: "outbound|80||reviews.default.svc.cluster.local".into(),
            ..Default::default()
        };
        let big = translate::generate(&push("{ip: 10.0.0.1}", ""), &proxies()[1]);
        let route = big.routes.first().expect("a route table");
        let empty = ClusterLoadAssignment::default();
        let cases = [
            (
                Encoded::new(cluster.name.clone(), &cluster),
                cluster.encode_to_vec(),
                Cluster::type_url(),
            ),
            (
                Encoded::new(route.name.clone(), route),
                route.encode_to_vec(),
                RouteConfiguration::type_url(),
            ),
            (
                Encoded::new(String::new(), &empty),
                Vec::new(),
                ClusterLoadAssignment::type_url(),
            ),
        ];
        for (encoded, value, type_url) in cases {
            assert_eq!(encoded.version, content_hash(&[&value]));
            let any = Any { type_url, value };
            assert_eq!(encoded.wire, any.encode_to_vec());
            assert_eq!(encoded.body(), any);
        }
    }

    /// The time the golden scenarios are translated at.
    fn golden_time() -> std::time::SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_893_456_000)
    }

    /// A golden scenario's config (`dir`) as a push context at
    /// `golden_time`.
    fn golden_push(dir: &std::path::Path) -> Arc<PushContext> {
        let files = crate::source::load_dir(&dir.join("config")).expect("golden config");
        Arc::new(PushContext::new_at(
            Arc::new(ConfigSnapshot::from_files(files)),
            golden_time(),
        ))
    }

    /// A change that leaves most services alone (a new Service), and two
    /// that alter what many services' clusters read (a mesh-wide
    /// DestinationRule, a Secret a rule's `credentialName` names): every
    /// golden proxy is served what a cache started on the new push context
    /// serves it, and after the new Service the other services' clusters
    /// are the very encodings of the generation before (carried over, not
    /// translated again), as are the virtual hosts no VirtualService
    /// routes (which the route tables splice in).
    #[test]
    fn service_clusters_carry_over_to_the_next_generation_only_when_unchanged() {
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden");
        let service = "apiVersion: v1\nkind: Service\nmetadata: {name: added, namespace: default}\n\
                       spec:\n  selector: {app: added}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n\
                       ---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: added, namespace: default}\n\
                       subsets:\n- addresses: [{ip: 10.9.0.1}]\n  ports: [{name: http, port: 8080}]\n";
        let rule = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
                    metadata: {name: added-everywhere, namespace: istio-system}\n\
                    spec:\n  host: '*.svc.cluster.local'\n  \
                    trafficPolicy: {connectionPool: {tcp: {maxConnections: 7}}}\n";
        // gateway-tls's client credential without its CA.
        let secrets =
            std::fs::read_to_string(golden.join("gateway-tls/config/secrets.yaml")).expect("secrets");
        let secret: String = (secrets.split("\n---\n"))
            .find(|d| d.contains("name: egress-credential"))
            .expect("egress-credential")
            .lines()
            .filter(|l| !l.trim_start().starts_with("ca.crt:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let (mut carried, mut changed, mut hosts_carried) = (0, 0, 0);
        for scenario in [
            "destination-rules",
            "sidecar-mtls",
            "locality",
            "traffic",
            "gateway-tls",
        ] {
            let dir = golden.join(scenario);
            let earlier = golden_push(&dir);
            let proxies = scenario_proxies(&dir);
            for (change, text) in [("service", service), ("rule", rule), ("secret", secret.as_str())] {
                let later = with_document(&earlier, text);
                let cache = SnapshotCache::new(earlier.clone());
                let before: Vec<Arc<Snapshot>> = proxies.iter().map(|p| cache.snapshot(p)).collect();
                cache.update(later.clone());
                if change == "service" {
                    hosts_carried += cache.generation().vhosts.len();
                }
                let fresh = SnapshotCache::new(later);
                for (proxy, before) in proxies.iter().zip(&before) {
                    let what = format!("{scenario}, {change}, {}", proxy.id);
                    let served = cache.snapshot(proxy);
                    let expected = fresh.snapshot(proxy);
                    assert_eq!(versions(&served), versions(&expected), "{what}");
                    assert_eq!(served.diagnostics, expected.diagnostics, "{what}");
                    changed += usize::from(versions(before) != versions(&served));
                    if change == "service" {
                        carried += same_service_clusters(before, &served);
                    }
                }
            }
        }
        assert!(
            carried >= 30 && changed >= 10 && hosts_carried > 0,
            "{carried} clusters carried, {changed} snapshots changed, {hosts_carried} virtual hosts carried"
        );
    }

    /// The virtual hosts of services no VirtualService routes carry over
    /// to the next generation while their service and DestinationRule are
    /// the same objects, and are encoded again when the rule is new or the
    /// service changed: after each change the route tables are what a
    /// cache started on the new push context serves.
    #[test]
    fn default_virtual_hosts_carry_over_only_while_their_service_and_rule_are_unchanged() {
        let proxy = client("default", serde_json::json!({"app": "client"}));
        let mut earlier = push("{ip: 10.0.0.1}", "");
        let cache = SnapshotCache::new(earlier.clone());
        let mut before = cache.snapshot(&proxy);
        let held = cache.generation().vhosts.len();
        assert!(held >= 2, "reviews and ratings: {held}");
        let hashed = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
                      metadata: {name: ratings, namespace: default}\nspec:\n  host: ratings\n  \
                      trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}\n";
        for (change, text, carried) in [
            (
                "a new service",
                "apiVersion: v1\nkind: Service\nmetadata: {name: added, namespace: default}\n\
                 spec:\n  ports: [{name: http, port: 80}]\n",
                held,
            ),
            ("a rule for ratings", hashed, held + 1),
            (
                "an address for ratings",
                "apiVersion: v1\nkind: Service\nmetadata: {name: ratings, namespace: default}\n\
                 spec:\n  clusterIP: 10.96.0.9\n  ports: [{name: http, port: 80}]\n",
                held,
            ),
        ] {
            let later = with_document(&earlier, text);
            cache.update(later.clone());
            assert_eq!(cache.generation().vhosts.len(), carried, "{change}");
            let served = cache.snapshot(&proxy);
            let fresh = SnapshotCache::new(later.clone()).snapshot(&proxy);
            let routes = |s: &Snapshot| s.resources.get(&XdsType::Route).cloned().unwrap_or_default();
            assert_eq!(routes(&served), routes(&fresh), "{change}");
            assert_ne!(routes(&served), routes(&before), "{change}");
            (earlier, before) = (later, served);
        }
        let table = before
            .of(XdsType::Route)
            .and_then(|m| m.get("80"))
            .expect("route table 80");
        let table = RouteConfiguration::decode(table.body().value.as_slice()).expect("a route table");
        let ratings = table
            .virtual_hosts
            .iter()
            .find(|v| v.name.starts_with("ratings."))
            .expect("ratings' host");
        assert!(
            matches!(&ratings.routes[0].action, Some(route::Action::Route(a)) if !a.hash_policy.is_empty()),
            "{ratings:?}"
        );
        assert!(ratings.domains.iter().any(|d| d == "10.96.0.9"), "{ratings:?}");
    }

    /// `push`'s next push context, with the documents of `text` added (or
    /// replacing those of the same kind, namespace and name).
    fn with_document(push: &PushContext, text: &str) -> Arc<PushContext> {
        let mut config = (*push.config).clone();
        config.generation += 1;
        let added = ConfigSnapshot::from_files(vec![parse_file("changed.yaml", text)]);
        config.resources.extend(added.resources);
        Arc::new(push.next(Arc::new(config), golden_time()))
    }

    /// The services' clusters (`outbound|…`) `after` holds in the very
    /// encodings `before` held.
    fn same_service_clusters(before: &Snapshot, after: &Snapshot) -> usize {
        let clusters = |s: &Snapshot| s.resources.get(&XdsType::Cluster).cloned().unwrap_or_default();
        let (was, is) = (clusters(before), clusters(after));
        is.iter()
            .filter(|(name, e)| {
                name.starts_with("outbound|") && was.get(*name).is_some_and(|o| Arc::ptr_eq(o, e))
            })
            .count()
    }

    /// A generation that patches its snapshots (an endpoint change) uses
    /// none of the service clusters it carried: the next one still has
    /// them, after more such generations than a carried part may go unused
    /// through generations that translate clusters.
    #[test]
    fn service_clusters_carry_over_through_patched_generations() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden/traffic");
        let first = golden_push(&dir);
        let mut moves = Vec::new();
        for i in 0..=CARRIED_IDLE_MAX {
            let endpoints = format!(
                "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: reviews, namespace: default}}\n\
                 subsets:\n- addresses: [{{ip: 127.0.0.{}}}]\n  ports: [{{name: http, port: 9080}}]\n",
                10 + i
            );
            let from = moves.last().unwrap_or(&first);
            let moved = with_document(from, &endpoints);
            assert!(from.config.endpoint_only_change(&moved.config).is_some());
            moves.push(moved);
        }
        let moved = moves.last().expect("moved").clone();
        let added = with_document(
            &moved,
            "apiVersion: v1\nkind: Service\nmetadata: {name: added, namespace: default}\n\
             spec:\n  ports: [{name: http, port: 80}]\n",
        );
        let proxies = scenario_proxies(&dir);
        let cache = SnapshotCache::new(first);
        let before: Vec<Arc<Snapshot>> = proxies.iter().map(|p| cache.snapshot(p)).collect();
        for moved in moves {
            cache.update(moved);
            proxies.iter().for_each(|p| drop(cache.snapshot(p)));
        }
        cache.update(added.clone());
        let fresh = SnapshotCache::new(added);
        let mut carried = 0;
        for (proxy, before) in proxies.iter().zip(&before) {
            let served = cache.snapshot(proxy);
            assert_eq!(
                versions(&served),
                versions(&fresh.snapshot(proxy)),
                "{}",
                proxy.id
            );
            carried += same_service_clusters(before, &served);
        }
        assert!(carried > 0, "nothing carried through the endpoint change");
    }

    /// A service's clusters carried for proxies that are gone (here of
    /// another locality; after a rollout, of other labels) are dropped
    /// once `CARRIED_IDLE_MAX` generations that translated clusters went by
    /// without them; a proxy back before that is served them. Either way
    /// it is served what a cache started on the push context serves.
    #[test]
    fn carried_service_clusters_no_proxy_reads_are_dropped_after_a_while() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden/traffic");
        let first = golden_push(&dir);
        let at = |locality: &str| {
            let mut proxy = client("default", serde_json::json!({"app": "client"}));
            proxy.locality = locality.into();
            proxy
        };
        let (east, west) = (at("us-east/z1"), at("us-west/z2"));
        // West's clusters still carried when it comes back at generation
        // `back`, east served at every generation before.
        let carried_when_back = |back: u8| {
            let cache = SnapshotCache::new(first.clone());
            drop(cache.snapshot(&east));
            let before = cache.snapshot(&west);
            let mut push = first.clone();
            for g in 1..=back {
                let service = format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: added-{g}, namespace: default}}\n\
                     spec:\n  ports: [{{name: http, port: 80}}]\n"
                );
                push = with_document(&push, &service);
                cache.update(push.clone());
                if g < back {
                    drop(cache.snapshot(&east));
                }
            }
            let served = cache.snapshot(&west);
            let fresh = SnapshotCache::new(push).snapshot(&west);
            assert_eq!(versions(&served), versions(&fresh), "back at {back}");
            same_service_clusters(&before, &served)
        };
        assert!(carried_when_back(CARRIED_IDLE_MAX + 1) > 0);
        assert_eq!(carried_when_back(CARRIED_IDLE_MAX + 2), 0);
    }

    /// A sidecar `client` in `namespace`, with `labels`.
    fn client(namespace: &str, labels: serde_json::Value) -> Proxy {
        let meta = serde_json::json!({ "LABELS": labels });
        Proxy::parse(
            &format!("sidecar~10.1.0.9~client.{namespace}~{namespace}.svc.cluster.local"),
            meta.as_object().expect("object"),
        )
        .expect("sidecar")
    }

    /// An endpoint change whose generation falls after a gateway
    /// certificate expired (gateway-tls's `expired-credential` ends
    /// 2026-11-26 19:12:10 UTC): the listeners judged it valid before and
    /// must not be kept, so the snapshot is translated whole.
    #[test]
    fn a_certificate_ending_between_generations_is_judged_again() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden/gateway-tls");
        let files = crate::source::load_dir(&dir.join("config")).expect("golden config");
        let before = Arc::new(ConfigSnapshot::from_files(files));
        let moved = parse_file(
            "moved.yaml",
            "apiVersion: v1\nkind: Endpoints\nmetadata: {name: helloworld, namespace: default}\n\
             subsets:\n- addresses: [{ip: 10.2.0.9}]\n  ports: [{name: http, port: 8080}]\n",
        );
        let mut after = (*before).clone();
        after.generation += 1;
        after
            .resources
            .extend(ConfigSnapshot::from_files(vec![moved]).resources);
        let after = Arc::new(after);
        assert!(before.endpoint_only_change(&after).is_some());
        let day = |s: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
        let (noon, next_day) = (day(1_795_694_400), day(1_795_737_600));
        let earlier = Arc::new(PushContext::new_at(before.clone(), noon));
        let later = Arc::new(earlier.next(after.clone(), next_day));
        let gateway = scenario_proxies(&dir).remove(0);
        let cache = SnapshotCache::new(earlier.clone());
        let old = cache.snapshot(&gateway);
        cache.update(later.clone());
        let served = cache.snapshot(&gateway);
        let fresh = SnapshotCache::new(later).snapshot(&gateway);
        assert_ne!(
            old.versions[&XdsType::Listener],
            fresh.versions[&XdsType::Listener],
            "the expired server is left out"
        );
        assert_eq!(versions(&served), versions(&fresh));
        assert_eq!(served.diagnostics, fresh.diagnostics);
    }

    /// The proxies a golden scenario names, as (id, metadata).
    fn scenario_proxies(dir: &std::path::Path) -> Vec<Proxy> {
        #[derive(serde::Deserialize)]
        struct Scenario {
            proxies: Vec<Named>,
        }
        #[derive(serde::Deserialize)]
        struct Named {
            id: String,
            #[serde(default)]
            metadata: serde_json::Map<String, serde_json::Value>,
        }
        let text = std::fs::read_to_string(dir.join("scenario.yaml")).expect("scenario.yaml");
        let scenario: Scenario = serde_norway::from_str(&text).expect("scenario");
        scenario
            .proxies
            .iter()
            .map(|p| Proxy::parse(&p.id, &p.metadata).expect("proxy"))
            .collect()
    }

    /// A snapshot's resources, as they go on the wire.
    fn wires(served: &Snapshot) -> BTreeMap<(XdsType, String), bytes::Bytes> {
        served
            .resources
            .iter()
            .flat_map(|(t, m)| m.values().map(move |e| ((*t, e.name.clone()), e.wire.clone())))
            .collect()
    }

    /// A whole translation encoded by a generation of its own, which has
    /// no virtual host to splice and no service's clusters to share.
    fn encoded_apart(
        push: &Arc<PushContext>,
        whole: &Generated,
    ) -> BTreeMap<(XdsType, String), bytes::Bytes> {
        let apart = Generation::new(push.clone(), Arc::new(PushStats::new(0, Vec::new(), false)));
        apart
            .encode(&mut whole.clone(), &XdsType::ALL)
            .into_iter()
            .flat_map(|(t, m)| {
                m.into_values()
                    .map(move |e| ((t, e.name.clone()), e.wire.clone()))
            })
            .collect()
    }

    /// A mesh large enough that its push context's services and its
    /// snapshots are made on every core: the push context equals the one
    /// an update from an empty mesh makes service by service, and each
    /// proxy is served what one thread's whole translation gives.
    #[test]
    fn a_large_mesh_is_served_what_one_thread_makes_of_it() {
        let n = crate::parallel::LARGE_MESH;
        let mut items = vec![serde_json::json!({
            "apiVersion": "networking.istio.io/v1beta1", "kind": "Gateway",
            "metadata": {"name": "gw", "namespace": "istio-system"},
            "spec": {"selector": {"istio": "ingressgateway"},
                     "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}
        })];
        for i in 0..n {
            let (name, namespace) = (format!("svc-{i}"), format!("ns-{}", i % 7));
            let meta = serde_json::json!({"name": name, "namespace": namespace});
            items.push(serde_json::json!({
                "apiVersion": "v1", "kind": "Service", "metadata": meta,
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080},
                                   {"name": "tcp-db", "port": 5432}]}
            }));
            // Each workload IP is some other services' endpoint too.
            let ips: Vec<_> = [i % 211, i % 97 + 300]
                .iter()
                .map(|k| serde_json::json!({"ip": format!("10.1.{}.{}", k / 250, k % 250 + 1)}))
                .collect();
            items.push(serde_json::json!({
                "apiVersion": "v1", "kind": "Endpoints", "metadata": meta,
                "subsets": [{"addresses": ips,
                             "ports": [{"name": "http", "port": 8080}, {"name": "tcp-db", "port": 5432}]}]
            }));
            if i % 50 == 0 {
                items.push(serde_json::json!({
                    "apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService", "metadata": meta,
                    "spec": {"hosts": [name, format!("{name}.example.com")], "gateways": ["istio-system/gw", "mesh"],
                             "http": [{"route": [{"destination": {"host": format!("svc-{}", i + 1)}}]}]}
                }));
            }
        }
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        let config = Arc::new(ConfigSnapshot::from_files(vec![parse_file(
            "mesh.json",
            &list.to_string(),
        )]));
        assert!(config.rejections.is_empty(), "{:?}", config.rejections.first());
        let push = Arc::new(PushContext::new_at(config.clone(), golden_time()));
        let empty = Arc::new(ConfigSnapshot::from_files(Vec::new()));
        let one_by_one = PushContext::new_at(empty, golden_time()).next(config, golden_time());
        assert_eq!(push.services.len(), n);
        assert_eq!(push.services, one_by_one.services);
        assert_eq!(push.workload_ports, one_by_one.workload_ports);
        assert_eq!(push.gateways, one_by_one.gateways);
        assert_eq!(push.virtual_services, one_by_one.virtual_services);
        assert_eq!(push.virtual_services_by_host, one_by_one.virtual_services_by_host);
        let cache = SnapshotCache::new(push.clone());
        let mut proxies = proxies();
        proxies.push(client("ns-3", serde_json::json!({"app": "db"})));
        for proxy in &proxies {
            let whole = translate::generate(&push, proxy);
            assert!(whole.clusters.len() > n, "{}", proxy.id);
            assert_eq!(
                wires(&cache.snapshot(proxy)),
                encoded_apart(&push, &whole),
                "{}",
                proxy.id
            );
        }
    }

    /// Every golden scenario's proxies, served from one cache (so the
    /// default virtual hosts one proxy's translation encodes are spliced
    /// into the other config keys' route tables): every resource, route
    /// tables included, is byte for byte what encoding the whole
    /// translation gives.
    #[test]
    fn route_tables_with_shared_virtual_hosts_encode_as_whole_tables_do() {
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden");
        let (mut tables, mut shared, mut hashed) = (0, 0, 0);
        for dir in std::fs::read_dir(&golden).expect("testdata/golden") {
            let dir = dir.expect("entry").path();
            if !dir.join("config").is_dir() {
                continue; // the demo scenario serves the embedded config
            }
            let push = golden_push(&dir);
            let cache = SnapshotCache::new(push.clone());
            let vhosts = translate::VirtualHostCache::new(&push);
            for proxy in &scenario_proxies(&dir) {
                let what = format!("{}, {}", dir.display(), proxy.id);
                let whole = translate::generate(&push, proxy);
                assert!(whole.encoded_vhosts.is_empty(), "{what}");
                assert_eq!(
                    wires(&cache.snapshot(proxy)),
                    encoded_apart(&push, &whole),
                    "{what}"
                );
                tables += whole.routes.len();
                let spliced = translate::listeners_with(&push, proxy, Some(&vhosts));
                for (_, bytes) in spliced.encoded_vhosts.values().flatten() {
                    let vhost = VirtualHost::decode(bytes.clone()).expect("a virtual host");
                    shared += 1;
                    hashed += usize::from(vhost.routes.iter().any(
                        |r| matches!(&r.action, Some(route::Action::Route(a)) if !a.hash_policy.is_empty()),
                    ));
                }
            }
        }
        assert!(
            tables > 20 && shared > 10 && hashed > 0,
            "{tables} tables, {shared} shared hosts, {hashed} hashed"
        );
    }

    /// Sidecars that differ in one thing an outbound cluster reads of them
    /// (namespace, locality, a label `failoverPriority` ranks by, having a
    /// workload certificate), all served from one cache, which shares each
    /// service's clusters between the config keys that read the same of
    /// it: each is served what it is served alone, diagnostics included,
    /// and each of the four tells some of them apart.
    #[test]
    fn shared_service_clusters_are_told_apart_by_what_they_read_of_the_proxy() {
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden");
        let mut told_apart = BTreeSet::new();
        for scenario in ["locality", "gateway-tls"] {
            let push = golden_push(&golden.join(scenario));
            let mut proxies = Vec::new();
            for namespace in ["default", "istio-system"] {
                for locality in ["us-east/z1", "us-west/z2"] {
                    for network in ["net-a", "net-b"] {
                        for identity in [true, false] {
                            let labels = serde_json::json!({"app": "client", "network": network});
                            let mut proxy = client(namespace, labels);
                            proxy.locality = locality.into();
                            proxy.identity =
                                identity.then(|| format!("spiffe://cluster.local/ns/{namespace}/sa/client"));
                            proxies.push((
                                [namespace, locality, network, ["-", "id"][usize::from(identity)]],
                                proxy,
                            ));
                        }
                    }
                }
            }
            let shared = SnapshotCache::new(push.clone());
            let outbound = |s: &Snapshot| -> BTreeMap<(XdsType, String), bytes::Bytes> {
                [XdsType::Cluster, XdsType::Endpoint, XdsType::Secret]
                    .into_iter()
                    .flat_map(|t| {
                        s.resources[&t]
                            .values()
                            .map(move |e| ((t, e.name.clone()), e.wire.clone()))
                    })
                    .collect()
            };
            let mut served = Vec::new();
            for (traits, proxy) in &proxies {
                let got = shared.snapshot(proxy);
                let alone = SnapshotCache::new(push.clone()).snapshot(proxy);
                let what = format!("{scenario}, {traits:?}");
                let wires = |s: &Snapshot| -> BTreeMap<(XdsType, String), bytes::Bytes> {
                    s.resources
                        .iter()
                        .flat_map(|(t, m)| m.values().map(move |e| ((*t, e.name.clone()), e.wire.clone())))
                        .collect()
                };
                assert_eq!(wires(&got), wires(&alone), "{what}");
                assert_eq!(got.diagnostics, alone.diagnostics, "{what}");
                assert_eq!(got.outbound, alone.outbound, "{what}");
                served.push((traits, outbound(&got), got.outbound.clone()));
            }
            for (a, out_a, kept_a) in &served {
                for (b, out_b, kept_b) in &served {
                    let differing: Vec<usize> = (0..4).filter(|&i| a[i] != b[i]).collect();
                    if let [i] = differing[..] {
                        if out_a != out_b || kept_a != kept_b {
                            told_apart.insert(["namespace", "locality", "label", "identity"][i]);
                        }
                    }
                }
            }
        }
        assert_eq!(
            told_apart,
            BTreeSet::from(["namespace", "locality", "label", "identity"]),
            "what each tells apart"
        );
    }

    /// A DestinationRule puts the proxy's namespace in its services' cluster
    /// keys only when it names a `credentialName`, and the proxy's labels
    /// only when it ranks by `failoverPriority`: other rules leave proxies
    /// of every namespace and labels sharing one translation.
    #[test]
    fn a_rule_puts_namespace_or_labels_in_the_key_only_when_it_reads_them() {
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden");
        // Whether sidecars a and b, (namespace, network label), get one key
        // for `host`'s clusters (keys point into the push context, so both
        // are made from one).
        let same_key = |scenario: &str, a: (&str, &str), b: (&str, &str), host: &str| {
            let push = golden_push(&golden.join(scenario));
            let key = |(namespace, network): (&str, &str)| {
                let proxy = client(
                    namespace,
                    serde_json::json!({"app": "client", "network": network}),
                );
                let services = translate::outbound_services(&push, &proxy);
                let s = services.iter().find(|s| s.service.hostname == host).expect(host);
                assert!(s.rule.is_some(), "{host} is under a rule");
                s.key()
            };
            key(a) == key(b)
        };
        // reviews: failover by region only.
        let reviews = "reviews.default.svc.cluster.local";
        assert!(same_key(
            "locality",
            ("default", "net-a"),
            ("istio-system", "net-a"),
            reviews
        ));
        assert!(same_key(
            "locality",
            ("default", "net-a"),
            ("default", "net-b"),
            reviews
        ));
        // details: failoverPriority by network.
        let details = "details.internal";
        assert!(same_key(
            "locality",
            ("default", "net-a"),
            ("istio-system", "net-a"),
            details
        ));
        assert!(!same_key(
            "locality",
            ("default", "net-a"),
            ("default", "net-b"),
            details
        ));
        // secure: TLS originated with a credentialName.
        let secure = "secure.default.svc.cluster.local";
        assert!(!same_key(
            "gateway-tls",
            ("default", "net-a"),
            ("istio-system", "net-a"),
            secure
        ));
        assert!(same_key(
            "gateway-tls",
            ("default", "net-a"),
            ("default", "net-b"),
            secure
        ));
    }

    /// A `credentialName` or `failoverPriority` counts wherever the rule has
    /// it: in a subset's policy for one port as at the top.
    #[test]
    fn a_rule_reads_the_proxy_through_its_subsets_and_ports_too() {
        let push = push(
            "{ip: 10.0.0.1}",
            "---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: ratings, namespace: default}\n\
             spec:\n  host: ratings\n  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy:\n      \
             loadBalancer: {localityLbSetting: {failoverPriority: [network]}}\n      \
             portLevelSettings:\n      - port: {number: 80}\n        tls: {mode: SIMPLE, credentialName: ratings-ca}\n",
        );
        let proxy = &proxies()[1];
        let services = translate::outbound_services(&push, proxy);
        let view = |host: &str| {
            let s = services.iter().find(|s| s.service.hostname == host).expect(host);
            assert!(s.rule.is_some(), "{host} is under a rule");
            (s.view.namespace.is_some(), s.view.labels.is_some())
        };
        assert_eq!(view("ratings.default.svc.cluster.local"), (true, true));
        assert_eq!(view("reviews.default.svc.cluster.local"), (false, false));
    }

    /// Two sidecars outside the service's namespace, one under a
    /// consistent-hash DestinationRule exported to its own namespace only:
    /// their default virtual hosts for `ratings` differ, and neither is
    /// served the other's.
    #[test]
    fn a_shared_virtual_host_is_told_apart_by_the_destination_rule_that_applies() {
        let push = push(
            "{ip: 10.0.0.1}",
            "---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: sticky, namespace: shop}\n\
             spec:\n  host: ratings.default.svc.cluster.local\n  exportTo: ['.']\n  trafficPolicy:\n    loadBalancer:\n      consistentHash: {httpHeaderName: x-user}\n",
        );
        let sidecar = |ns: &str| client(ns, serde_json::json!({"app": "client"}));
        let cache = SnapshotCache::new(push.clone());
        let mut tables = Vec::new();
        for proxy in [sidecar("shop"), sidecar("blog")] {
            let served = cache.snapshot(&proxy);
            let whole = translate::generate(&push, &proxy);
            let table = whole
                .routes
                .iter()
                .find(|r| r.name == "80")
                .expect("port 80's table");
            assert_eq!(
                *served.resources[&XdsType::Route]["80"],
                Encoded::new("80".into(), table),
                "{}",
                proxy.id
            );
            tables.push(table.clone());
        }
        let hashed = |t: &RouteConfiguration| {
            t.virtual_hosts.iter().any(|v| {
                v.name.starts_with("ratings.")
                    && v.routes.iter().any(
                        |r| matches!(&r.action, Some(route::Action::Route(a)) if !a.hash_policy.is_empty()),
                    )
            })
        };
        assert!(hashed(&tables[0]) && !hashed(&tables[1]));
        // A cache made for another push context is not used.
        let other = translate::VirtualHostCache::new(&PushContext::new(push.config.clone()));
        let out = translate::listeners_with(&push, &sidecar("blog"), Some(&other));
        assert!(out.encoded_vhosts.is_empty());
        let own = translate::VirtualHostCache::new(&push);
        assert!(!translate::listeners_with(&push, &sidecar("blog"), Some(&own))
            .encoded_vhosts
            .is_empty());
    }

    /// From every golden scenario, each VirtualService taken away and put
    /// back: the previous snapshots, their listeners, routes and secrets
    /// translated again, equal a whole translation, diagnostics included.
    #[test]
    fn a_virtual_service_change_patches_the_listeners_to_what_a_full_translation_gives() {
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden");
        let mut checked = 0;
        for dir in std::fs::read_dir(&golden).expect("testdata/golden") {
            let dir = dir.expect("entry").path();
            if !dir.join("config").is_dir() {
                continue; // the demo scenario serves the embedded config
            }
            let files = crate::source::load_dir(&dir.join("config")).expect("golden config");
            let full = Arc::new(ConfigSnapshot::from_files(files));
            let proxies = scenario_proxies(&dir);
            let keys: Vec<&ResourceKey> = full
                .resources
                .keys()
                .filter(|k| k.kind == Kind::VirtualService)
                .collect();
            for key in keys {
                let mut without = (*full).clone();
                without.generation += 1;
                without.resources.remove(key);
                let without = Arc::new(without);
                for (from, to, what) in [(&full, &without, "deleted"), (&without, &full, "added")] {
                    let changes = from.changes(to);
                    assert!(
                        matches!(patch_for(from, to, &changes), Some(Patch::Listeners)),
                        "{key} {what} in {}",
                        dir.display()
                    );
                    let (before, after) = (
                        Arc::new(PushContext::new_at(from.clone(), golden_time())),
                        Arc::new(PushContext::new_at(to.clone(), golden_time())),
                    );
                    for proxy in &proxies {
                        let cache = SnapshotCache::new(before.clone());
                        let old = cache.snapshot(proxy);
                        cache.update(after.clone());
                        let patched = cache.snapshot(proxy);
                        let fresh = SnapshotCache::new(after.clone()).snapshot(proxy);
                        let what = format!("{key} {what} in {}, {}", dir.display(), proxy.id);
                        assert_eq!(versions(&patched), versions(&fresh), "{what}");
                        assert_eq!(patched.versions, fresh.versions, "{what}");
                        assert_eq!(patched.diagnostics, fresh.diagnostics, "{what}");
                        assert_eq!(patched.outbound, fresh.outbound, "{what}");
                        // The clusters were kept, not encoded again.
                        assert!(
                            Arc::ptr_eq(
                                &old.resources[&XdsType::Cluster],
                                &patched.resources[&XdsType::Cluster]
                            ),
                            "{what}"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 20, "only {checked} patches checked");
    }
}
