//! Per-stream protocol state and the decisions made on it, as pure
//! functions: no gRPC, no clock. `server` feeds requests and new snapshots
//! in and sends what comes out.
//!
//! State of the world (xDS protocol, "ACK and NACK semantics"): a request
//! whose `response_nonce` is empty is a new subscription (or Envoy after a
//! control-plane restart) and is always answered; one carrying the nonce of
//! the last response ACKs it, or NACKs it when `error_detail` is set; one
//! carrying an older nonce is stale and ignored. A NACKed version is never
//! sent again: only new content is.
//!
//! Incremental ("Incremental xDS"): the server tracks which version of each
//! resource the client holds and sends only what differs, plus the names of
//! removed resources.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Serialize;

use super::cache::{content_hash, Encoded, Resources, Snapshot};
use super::wire::Batch;
use super::XdsType;

/// A response the stream must send.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub type_: XdsType,
    /// SotW: the version of the whole set; delta: the system version.
    pub version: String,
    pub nonce: String,
    /// Shared with the other streams sending the same resources, and so is
    /// their encoding.
    pub resources: Arc<Batch>,
    /// Delta only: names the client must drop.
    pub removed: Vec<String>,
}

/// A rejected response, as Envoy reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nack {
    /// The version that was rejected.
    pub version: String,
    pub nonce: String,
    pub error: String,
}

/// What one type's subscription looks like and what was sent for it.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeState {
    pub wildcard: bool,
    /// Shared between streams subscribing to the same names (see `intern`).
    pub names: Arc<BTreeSet<String>>,
    /// Version and nonce of the last response.
    pub sent_version: Option<String>,
    pub sent_nonce: Option<String>,
    pub acked_version: Option<String>,
    pub nack: Option<Nack>,
    /// What the proxy holds, as far as meshd knows: name → resource.
    pub held: Resources,
    /// Names to send again even if unchanged (their cluster changed, and
    /// Envoy warms a cluster only on a fresh ClusterLoadAssignment).
    pub force: BTreeSet<String>,
    /// Set for types the client has subscribed to at all.
    pub subscribed: bool,
}

impl Default for TypeState {
    fn default() -> TypeState {
        TypeState {
            wildcard: false,
            names: no_names(),
            sent_version: None,
            sent_nonce: None,
            acked_version: None,
            nack: None,
            held: nothing_held(),
            force: BTreeSet::new(),
            subscribed: false,
        }
    }
}

/// One empty map, held by every new subscription, and one empty set of
/// names, for every wildcard one: `Walks` tells subscriptions apart by
/// these two, so streams that ask for the same share one walk of the
/// snapshot, their first response and wildcard types included.
fn nothing_held() -> Resources {
    static EMPTY: std::sync::OnceLock<Resources> = std::sync::OnceLock::new();
    EMPTY.get_or_init(Resources::default).clone()
}

fn no_names() -> Arc<BTreeSet<String>> {
    static EMPTY: std::sync::OnceLock<Arc<BTreeSet<String>>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(Arc::default).clone()
}

/// How a SotW request relates to what was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Empty nonce: a new subscription or a reconnect. Always answered.
    Initial,
    /// Accepts the last response.
    Ack,
    /// Rejects the last response with this error.
    Nack(String),
    /// Answers an older response; a newer one is in flight.
    Stale,
}

/// Classifies a SotW request against the type's state.
pub fn classify(state: &TypeState, nonce: &str, error: Option<&str>) -> RequestKind {
    if nonce.is_empty() {
        return RequestKind::Initial;
    }
    if state.sent_nonce.as_deref() != Some(nonce) {
        return RequestKind::Stale;
    }
    match error {
        Some(e) => RequestKind::Nack(e.to_string()),
        None => RequestKind::Ack,
    }
}

/// The state of one ADS stream, both variants.
#[derive(Debug, Clone, Default)]
pub struct StreamState {
    pub types: super::TypeMap<TypeState>,
    nonce: u64,
}

impl StreamState {
    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    // ---- state of the world -------------------------------------------------

    /// Handles a SotW request; returns the response to send, if any.
    pub fn sotw_request(
        &mut self,
        t: XdsType,
        names: &[&str],
        nonce: &str,
        error: Option<&str>,
        snapshot: &Snapshot,
    ) -> Option<Outgoing> {
        self.sotw_request_with(t, Some(names), nonce, error, snapshot)
    }

    /// The names of a type's subscription, once subscribed, in order.
    pub fn subscribed_names(&self, t: XdsType) -> Option<&BTreeSet<String>> {
        self.types.get(&t).filter(|s| s.subscribed).map(|s| &*s.names)
    }

    /// `sotw_request` for a request that names what the type is subscribed
    /// to, as `subscribed_names` gives them, as an ACK does (the caller
    /// compared them): its names need no building or comparing again.
    pub fn sotw_request_as_subscribed(
        &mut self,
        t: XdsType,
        nonce: &str,
        error: Option<&str>,
        snapshot: &Snapshot,
    ) -> Option<Outgoing> {
        self.sotw_request_with(t, None, nonce, error, snapshot)
    }

    /// `names` is `None` when they are the subscribed ones.
    fn sotw_request_with(
        &mut self,
        t: XdsType,
        names: Option<&[&str]>,
        nonce: &str,
        error: Option<&str>,
        snapshot: &Snapshot,
    ) -> Option<Outgoing> {
        let state = self.types.entry_or_default(t);
        let kind = classify(state, nonce, error);
        if kind == RequestKind::Stale {
            // Ignored whole: the client re-sends its subscription with the
            // newer nonce, and the change is seen then.
            return None;
        }
        let (wildcard, same_names) = match names {
            // The subscribed names never hold "*" (see `intern_names`).
            None => (state.names.is_empty() && t.wildcard_by_default(), true),
            Some(names) => {
                let wildcard = names.contains(&"*") || (names.is_empty() && t.wildcard_by_default());
                // An ACK repeats the subscription, in Envoy's (sorted)
                // order: seen equal without building a set.
                let same = names.iter().copied().eq(state.names.iter().map(String::as_str)) || {
                    let wanted = intern_names(names);
                    let same = wanted == state.names;
                    state.names = wanted;
                    same
                };
                (wildcard, same)
            }
        };
        let changed = !state.subscribed || wildcard != state.wildcard || !same_names;
        // Names added to or dropped from a named subscription (Envoy's EDS
        // request after a cluster is added or removed, its RDS request after
        // a listener change) are answered with what the proxy does not hold
        // yet, as a push is.
        let resubscribed = state.subscribed && !state.wildcard && !wildcard && !same_names;
        state.subscribed = true;
        state.wildcard = wildcard;
        let initial = kind == RequestKind::Initial;
        match kind {
            RequestKind::Stale | RequestKind::Initial => {}
            RequestKind::Ack => {
                state.acked_version = state.sent_version.clone();
                state.nack = None;
            }
            RequestKind::Nack(error) => {
                state.nack = Some(Nack {
                    version: state.sent_version.clone().unwrap_or_default(),
                    nonce: nonce.to_string(),
                    error,
                });
            }
        }
        if resubscribed && !initial {
            self.sotw_resubscribed(t, snapshot)
        } else if initial || changed {
            Some(self.sotw_respond(t, snapshot, false))
        } else {
            None
        }
    }

    /// Answers a named subscription whose names changed with only the
    /// resources the proxy does not hold in their current version: the xDS
    /// protocol lets an EDS or RDS response carry a part of the set, and
    /// Envoy updates only the resources a response names. Sending every
    /// endpoint set again to every proxy that subscribes to one more
    /// cluster is what a new service's push spent its memory on. Names
    /// dropped are forgotten, so that they are sent again if they come
    /// back; a request that only drops names is not answered.
    fn sotw_resubscribed(&mut self, t: XdsType, snapshot: &Snapshot) -> Option<Outgoing> {
        let state = self.types.entry_or_default(t);
        if state.held.keys().any(|n| !state.names.contains(n)) {
            let names = state.names.clone();
            Arc::make_mut(&mut state.held).retain(|n, _| names.contains(n));
            share_if_equal(&mut state.held, snapshot.shared(t));
        }
        let selected = sotw_select(state, snapshot, t, true);
        if selected.resources.is_empty() {
            return None;
        }
        Some(self.sotw_send(t, snapshot, selected))
    }

    /// Handles a new snapshot: the responses to send, in push order.
    pub fn sotw_push(&mut self, snapshot: &Snapshot) -> Vec<Outgoing> {
        let mut out = Vec::new();
        for t in XdsType::ALL {
            let Some(state) = self.types.get(&t) else { continue };
            if !state.subscribed {
                continue;
            }
            let forced = !state.force.is_empty();
            if !forced && state.sent_version.is_some() && unchanged(state, snapshot.shared(t)) {
                continue;
            }
            // Named subscriptions (EDS, RDS, SDS) get only what changed: the
            // xDS protocol lets such a response carry a part of the set, and
            // resending every endpoint set to every proxy is what makes
            // control planes slow.
            let partial = !state.wildcard;
            let selected = sotw_select(state, snapshot, t, partial);
            let rejected = state.nack.as_ref().is_some_and(|n| n.version == selected.version);
            let changed = state.sent_version.as_deref() != Some(selected.version.as_str());
            if !(changed || forced) || rejected || (partial && selected.resources.is_empty()) {
                continue;
            }
            out.push(self.sotw_send(t, snapshot, selected));
        }
        out
    }

    fn sotw_respond(&mut self, t: XdsType, snapshot: &Snapshot, only_changed: bool) -> Outgoing {
        let state = self.types.entry_or_default(t);
        let selected = sotw_select(state, snapshot, t, only_changed);
        self.sotw_send(t, snapshot, selected)
    }

    /// Sends the `selected` resources of a type.
    fn sotw_send(&mut self, t: XdsType, snapshot: &Snapshot, selected: Selection) -> Outgoing {
        let nonce = self.next_nonce();
        let state = self.types.entry_or_default(t);
        let Selection {
            version,
            resources,
            covers,
            only_changed,
            fresh,
        } = selected;
        let before = state.sent_version.replace(version.clone());
        state.sent_nonce = Some(nonce.clone());
        state.force.clear();
        if state.wildcard || covers {
            // The proxy now holds all the snapshot has of this type: the
            // record is the snapshot's own map.
            state.held = snapshot.shared(t).cloned().unwrap_or_default();
        } else {
            let held = Arc::make_mut(&mut state.held);
            if !only_changed {
                held.retain(|n, _| state.names.contains(n));
            }
            for r in resources.iter() {
                held.insert(r.name.clone(), r.clone());
            }
            share_if_equal(&mut state.held, snapshot.shared(t));
        }
        let changed = before.as_deref() != Some(version.as_str());
        self.mark_dependents(t, changed, &fresh);
        Outgoing {
            type_: t,
            version,
            nonce,
            resources,
            removed: Vec::new(),
        }
    }

    /// After clusters change, their endpoints are sent again so Envoy can
    /// finish warming them.
    fn mark_dependents(&mut self, t: XdsType, changed: bool, sent: &[Arc<Encoded>]) {
        let Some(dep) = t.dependent() else { return };
        if !changed {
            return;
        }
        if let Some(d) = self.types.get_mut(&dep) {
            if d.subscribed {
                d.force.extend(sent.iter().map(|r| r.name.clone()));
            }
        }
    }

    // ---- incremental --------------------------------------------------------

    /// Handles a delta request; returns the response to send, if any.
    pub fn delta_request(&mut self, req: &DeltaRequest<'_>, snapshot: &Snapshot) -> Option<Outgoing> {
        let t = req.type_;
        let state = self.types.entry_or_default(t);
        let first = !state.subscribed;
        if !req.nonce.is_empty() {
            if let Some(error) = req.error {
                state.nack = Some(Nack {
                    version: state.sent_version.clone().unwrap_or_default(),
                    nonce: req.nonce.to_string(),
                    error: error.to_string(),
                });
            } else if state.sent_nonce.as_deref() == Some(req.nonce) {
                state.acked_version = state.sent_version.clone();
                state.nack = None;
            }
        }
        if first {
            state.subscribed = true;
            state.wildcard = req.subscribe.is_empty() && t.wildcard_by_default();
            for (name, version) in req.initial_versions {
                let held = Arc::make_mut(&mut state.held);
                if let Some(current) = snapshot.of(t).and_then(|m| m.get(name)) {
                    if &current.version == version {
                        held.insert(name.clone(), current.clone());
                        continue;
                    }
                }
                // Envoy holds something else (or something gone): remember a
                // placeholder so the diff replaces or removes it.
                held.insert(name.clone(), Arc::new(placeholder(name, version)));
            }
        }
        let mut changed = first;
        let edits = !req.subscribe.is_empty() || !req.unsubscribe.is_empty();
        if edits {
            changed = true;
            // The names as a list, sorted and deduplicated once by
            // `intern_names`: a first request subscribes to a thousand.
            let mut names: Vec<&str> = Vec::with_capacity(state.names.len() + req.subscribe.len());
            names.extend(state.names.iter().map(String::as_str));
            for name in req.subscribe {
                match *name {
                    "*" => state.wildcard = true,
                    n => names.push(n),
                }
            }
            if !req.unsubscribe.is_empty() {
                let mut gone: Vec<&str> = Vec::new();
                for name in req.unsubscribe {
                    match *name {
                        "*" => state.wildcard = false,
                        n => {
                            gone.push(n);
                            if state.held.contains_key(n) {
                                Arc::make_mut(&mut state.held).remove(n);
                            }
                        }
                    }
                }
                gone.sort_unstable();
                names.retain(|n| gone.binary_search(n).is_err());
            }
            let wanted = intern_names(&names);
            if wanted != state.names {
                state.names = wanted;
            }
        }
        if !changed {
            return None;
        }
        let out = self.delta_respond(t, snapshot);
        match out {
            Some(o) => Some(o),
            // The first answer is owed even when empty: Envoy finishes
            // initializing a wildcard type only on a response.
            None if first => Some(self.delta_send(t, snapshot, Arc::default(), Vec::new(), false)),
            None => None,
        }
    }

    /// Handles a new snapshot on a delta stream, in push order.
    pub fn delta_push(&mut self, snapshot: &Snapshot) -> Vec<Outgoing> {
        let mut out = Vec::new();
        for t in XdsType::ALL {
            if self.types.get(&t).is_some_and(|s| s.subscribed) {
                out.extend(self.delta_respond(t, snapshot));
            }
        }
        out
    }

    fn delta_respond(&mut self, t: XdsType, snapshot: &Snapshot) -> Option<Outgoing> {
        let state = self.types.get(&t)?;
        if state.force.is_empty() && state.sent_version.is_some() && unchanged(state, snapshot.shared(t)) {
            return None;
        }
        // A NACKed resource stays recorded as held, so the same version is
        // not sent again; new content has a new version and goes out.
        let Walk {
            send,
            removed,
            covers,
            ..
        } = snapshot.walks.walk(t, state, snapshot, true);
        if send.is_empty() && removed.is_empty() {
            if let Some(s) = self.types.get_mut(&t) {
                s.force.clear();
            }
            return None;
        }
        Some(self.delta_send(t, snapshot, send, removed, covers))
    }

    /// Sends `send` and `removed`; with `covers` (the subscription takes in
    /// every resource the snapshot has of the type), the proxy then holds
    /// exactly the snapshot's resources, and the record is the shared map.
    fn delta_send(
        &mut self,
        t: XdsType,
        snapshot: &Snapshot,
        send: Arc<Batch>,
        removed: Vec<String>,
        covers: bool,
    ) -> Outgoing {
        let nonce = self.next_nonce();
        let state = self.types.entry_or_default(t);
        match snapshot.shared(t) {
            Some(all) if covers => state.held = all.clone(),
            all if !send.is_empty() || !removed.is_empty() => {
                let held = Arc::make_mut(&mut state.held);
                for r in send.iter() {
                    held.insert(r.name.clone(), r.clone());
                }
                for n in &removed {
                    held.remove(n);
                }
                share_if_equal(&mut state.held, all);
            }
            _ => {}
        }
        let version = match snapshot.versions.get(&t) {
            Some(v) if snapshot.shared(t).is_some_and(|m| Arc::ptr_eq(m, &state.held)) => v.clone(),
            _ => super::cache::set_version(&state.held),
        };
        state.sent_version = Some(version.clone());
        state.sent_nonce = Some(nonce.clone());
        state.force.clear();
        let changed = !send.is_empty();
        self.mark_dependents(t, changed, &send);
        Outgoing {
            type_: t,
            version: format!("{}-{version}", snapshot.generation),
            nonce,
            resources: send,
            removed,
        }
    }
}

fn placeholder(name: &str, version: &str) -> Encoded {
    Encoded {
        name: name.to_string(),
        version: version.to_string(),
        wire: Default::default(),
    }
}

/// The parts of a DeltaDiscoveryRequest the state machine needs.
#[derive(Debug)]
pub struct DeltaRequest<'a> {
    pub type_: XdsType,
    pub subscribe: &'a [&'a str],
    pub unsubscribe: &'a [&'a str],
    pub initial_versions: &'a BTreeMap<String, String>,
    pub nonce: &'a str,
    pub error: Option<&'a str>,
}

/// Whether the proxy already holds exactly the snapshot's map of this
/// type (the same shared map): then nothing can differ, and the stream
/// skips the type without looking at its resources.
fn unchanged(state: &TypeState, current: Option<&Resources>) -> bool {
    current.is_some_and(|m| Arc::ptr_eq(m, &state.held))
}

/// Replaces a stream's record of what its proxy holds with the snapshot's
/// own map when they hold the same resources, so that streams share one
/// map instead of a copy each.
fn share_if_equal(held: &mut Resources, current: Option<&Resources>) {
    let Some(current) = current else { return };
    if Arc::ptr_eq(held, current) || held.len() != current.len() {
        return;
    }
    let same = held
        .iter()
        .zip(current.iter())
        .all(|((a, x), (b, y))| a == b && (Arc::ptr_eq(x, y) || x.version == y.version));
    if same {
        *held = current.clone();
    }
}

/// One shared copy of each set of subscribed names (without "*"): the
/// proxies of one config key subscribe to the same thousand cluster names,
/// and a copy per stream is what a large mesh's memory would go to. No
/// `String` is made when another stream already holds the same set.
fn intern_names(names: &[&str]) -> Arc<BTreeSet<String>> {
    let mut sorted = Vec::with_capacity(names.len());
    sorted.extend(names.iter().copied().filter(|n| *n != "*"));
    // A stable sort merges sorted runs: a delta request's names are the
    // subscribed ones (sorted) and the few it adds.
    sorted.sort();
    sorted.dedup();
    if sorted.is_empty() {
        return no_names();
    }
    match shared_names(&sorted) {
        Ok(shared) => shared,
        Err(key) => remember(key, Arc::new(sorted.iter().map(|n| n.to_string()).collect())),
    }
}

type NameSets = std::sync::Mutex<std::collections::HashMap<u64, std::sync::Weak<BTreeSet<String>>>>;

fn name_sets() -> &'static NameSets {
    static SETS: std::sync::OnceLock<NameSets> = std::sync::OnceLock::new();
    SETS.get_or_init(Default::default)
}

/// The shared set holding exactly `sorted` (sorted, without duplicates),
/// or the key to remember a new one under.
fn shared_names(sorted: &[&str]) -> Result<Arc<BTreeSet<String>>, u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for n in sorted {
        n.hash(&mut h);
    }
    let key = h.finish();
    let shared = name_sets()
        .lock()
        .ok()
        .and_then(|sets| sets.get(&key).and_then(|w| w.upgrade()));
    match shared {
        Some(set) if set.iter().map(String::as_str).eq(sorted.iter().copied()) => Ok(set),
        _ => Err(key),
    }
}

fn remember(key: u64, set: Arc<BTreeSet<String>>) -> Arc<BTreeSet<String>> {
    if let Ok(mut sets) = name_sets().lock() {
        sets.insert(key, Arc::downgrade(&set));
        // Forget sets no stream holds any more, now and then.
        if sets.len() > 1024 && sets.len().is_power_of_two() {
            sets.retain(|_, w| w.strong_count() > 0);
        }
    }
    set
}

/// One walk over a type's resources in the snapshot, the stream's
/// subscription and what the proxy holds, all in name order (no lookup per
/// resource: at a thousand clusters and thousands of proxies, the lookups
/// were most of a push).
#[derive(Debug, Clone)]
struct Walk {
    /// The subscribed resources: all of them, or with `only_changed` those
    /// the proxy does not hold in this version and those forced again.
    send: Arc<Batch>,
    /// Held names the snapshot no longer has.
    removed: Vec<String>,
    /// The subscription takes in every resource the snapshot has of the type.
    covers: bool,
    /// The subscribed resources the proxy does not hold in this version
    /// (sent, in any case): only their dependents are owed again.
    fresh: Arc<[Arc<Encoded>]>,
}

/// Walks made over one snapshot, by what they were made from. The streams
/// of one config key mostly subscribe to the same (interned) names and hold
/// the same (shared) map from the last push, so at a new snapshot they all
/// need the same walk: it is made once and its result shared. The key holds
/// the `Arc`s it names, so their addresses are not reused while it lives.
#[derive(Debug, Default)]
pub struct Walks {
    walks: std::sync::Mutex<Vec<(WalkKey, Walk)>>,
    /// The version of each subscribed part that does not cover its type,
    /// by type and (interned) names: it does not depend on what a proxy
    /// holds, so streams whose walks are their own share it too.
    parts: std::sync::Mutex<Vec<PartVersion>>,
}

/// A subscribed part's version: its type, its names and the version.
type PartVersion = (XdsType, Arc<BTreeSet<String>>, String);

#[derive(Debug)]
struct WalkKey {
    type_: XdsType,
    names: Arc<BTreeSet<String>>,
    held: Resources,
    wildcard: bool,
    only_changed: bool,
    /// Names sent again whatever the proxy holds: after a cluster change,
    /// the same few for every stream of a config key.
    force: BTreeSet<String>,
}

/// Different subscriptions one snapshot remembers walks for, at most.
const WALKS_KEPT: usize = 16;

impl Walks {
    /// The version of the part of `all` that `state`'s names take in (all
    /// of it, not only what is sent), made once per subscription.
    fn part_version(
        &self,
        t: XdsType,
        state: &TypeState,
        all: Option<&BTreeMap<String, Arc<Encoded>>>,
    ) -> String {
        let same = |(type_, names, _): &PartVersion| *type_ == t && Arc::ptr_eq(names, &state.names);
        let known = self
            .parts
            .lock()
            .ok()
            .and_then(|m| m.iter().find(|p| same(p)).map(|p| p.2.clone()));
        if let Some(version) = known {
            return version;
        }
        let mut names = state.names.iter().peekable();
        let parts: Vec<&[u8]> = (all.into_iter().flatten())
            .filter(|(name, _)| {
                while names.next_if(|n| n < name).is_some() {}
                names.next_if(|n| n == name).is_some()
            })
            .flat_map(|(name, e)| [name.as_bytes(), e.version.as_bytes()])
            .collect();
        let version = content_hash(&parts);
        if let Ok(mut memo) = self.parts.lock() {
            if memo.len() < WALKS_KEPT && !memo.iter().any(same) {
                memo.push((t, state.names.clone(), version.clone()));
            }
        }
        version
    }

    /// `walk` over the snapshot's resources of `t`, made once per distinct
    /// (names, held, forced names). Secrets make their own.
    fn walk(&self, t: XdsType, state: &TypeState, snapshot: &Snapshot, only_changed: bool) -> Walk {
        let all = snapshot.of(t);
        // Secrets are each workload's own: nothing to share.
        if t == XdsType::Secret {
            return walk(state, all, only_changed);
        }
        let same = |k: &WalkKey| {
            k.type_ == t
                && k.wildcard == state.wildcard
                && k.only_changed == only_changed
                && Arc::ptr_eq(&k.names, &state.names)
                && Arc::ptr_eq(&k.held, &state.held)
                && k.force == state.force
        };
        if let Some((_, w)) = self
            .walks
            .lock()
            .ok()
            .as_ref()
            .and_then(|m| m.iter().find(|(k, _)| same(k)))
        {
            return w.clone();
        }
        let out = walk(state, all, only_changed);
        if let Ok(mut memo) = self.walks.lock() {
            if memo.len() < WALKS_KEPT && !memo.iter().any(|(k, _)| same(k)) {
                let key = WalkKey {
                    type_: t,
                    names: state.names.clone(),
                    held: state.held.clone(),
                    wildcard: state.wildcard,
                    only_changed,
                    force: state.force.clone(),
                };
                memo.push((key, out.clone()));
            }
        }
        out
    }
}

fn walk(state: &TypeState, all: Option<&BTreeMap<String, Arc<Encoded>>>, only_changed: bool) -> Walk {
    let mut names = state.names.iter().peekable();
    let mut held = state.held.iter().peekable();
    let mut send = Vec::new();
    let mut removed = Vec::new();
    let mut covers = true;
    let mut fresh = Vec::new();
    for (name, e) in all.into_iter().flatten() {
        while let Some((h, _)) = held.next_if(|(h, _)| *h < name) {
            removed.push(h.clone());
        }
        let wanted = state.wildcard || {
            while names.next_if(|n| *n < name).is_some() {}
            names.next_if(|n| *n == name).is_some()
        };
        let holds = held.next_if(|(h, _)| *h == name);
        if !wanted {
            covers = false;
            continue;
        }
        let current = holds.is_some_and(|(_, x)| Arc::ptr_eq(x, e) || x.version == e.version);
        if !current {
            fresh.push(e.clone());
        }
        if !only_changed || !current || (!state.force.is_empty() && state.force.contains(name)) {
            send.push(e.clone());
        }
    }
    removed.extend(held.map(|(h, _)| h.clone()));
    Walk {
        send: Batch::new(send),
        removed,
        covers,
        fresh: fresh.into(),
    }
}

/// The resources of a type a stream subscribes to and their version.
struct Selection {
    version: String,
    /// All of them, or only the changed ones when `only_changed`.
    resources: Arc<Batch>,
    /// The subscription takes in every resource the snapshot has of the type.
    covers: bool,
    only_changed: bool,
    /// What of `resources` the proxy did not hold in this version.
    fresh: Arc<[Arc<Encoded>]>,
}

/// What a stream subscribes to of a type, with the snapshot's own version of
/// the type when the subscription takes in all of it; with `only_changed`,
/// only the resources the proxy does not hold in their current version.
fn sotw_select(state: &TypeState, snapshot: &Snapshot, t: XdsType, only_changed: bool) -> Selection {
    let Walk {
        send, covers, fresh, ..
    } = snapshot.walks.walk(t, state, snapshot, only_changed);
    let version = match snapshot.versions.get(&t) {
        _ if !covers => snapshot.walks.part_version(t, state, snapshot.of(t)),
        Some(version) => version.clone(),
        // All of the type, whose version the snapshot does not record.
        None => snapshot
            .of(t)
            .map_or_else(|| content_hash(&[]), super::cache::set_version),
    };
    Selection {
        version,
        resources: send,
        covers,
        only_changed,
        fresh,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(name: &str, version: &str) -> Arc<Encoded> {
        Arc::new(placeholder(name, version))
    }

    fn snapshot(t: XdsType, items: &[(&str, &str)]) -> Snapshot {
        let mut s = Snapshot::default();
        let map = items
            .iter()
            .map(|(n, v)| (n.to_string(), encoded(n, v)))
            .collect();
        s.resources.insert(t, Arc::new(map));
        s
    }

    /// The version of a part of a type is that of the names it takes in
    /// and their versions, whatever each proxy holds, and is made once per
    /// subscription for the streams that share a snapshot.
    #[test]
    fn a_subscribed_part_has_the_version_of_what_it_takes_in() {
        let snap = snapshot(XdsType::Endpoint, &[("a", "1"), ("b", "1"), ("c", "1")]);
        let expected = content_hash(&[b"a", b"1", b"c", b"1"]);
        let mut first = StreamState::default();
        let mut second = StreamState::default();
        let sent = first
            .sotw_request(XdsType::Endpoint, &["a", "c"], "", None, &snap)
            .expect("answered");
        assert_eq!(sent.version, expected);
        // The other stream holds something else before it asks for the same.
        second
            .sotw_request(XdsType::Endpoint, &["b"], "", None, &snap)
            .expect("answered");
        let other = second
            .sotw_request(XdsType::Endpoint, &["a", "c"], "", None, &snap)
            .expect("answered");
        assert_eq!(other.version, expected);
        assert_eq!(snap.walks.parts.lock().expect("parts").len(), 2, "[b] and [a, c]");
        // A change outside the part leaves it alone; one inside changes it.
        let outside = snapshot(XdsType::Endpoint, &[("a", "1"), ("b", "2"), ("c", "1")]);
        assert!(first.sotw_push(&outside).is_empty());
        let inside = snapshot(XdsType::Endpoint, &[("a", "1"), ("b", "2"), ("c", "2")]);
        let pushed = first.sotw_push(&inside);
        assert_eq!(pushed.len(), 1);
        assert_eq!(pushed[0].version, content_hash(&[b"a", b"1", b"c", b"2"]));
    }

    #[test]
    fn classify_table() {
        let state = TypeState {
            sent_nonce: Some("7".into()),
            ..Default::default()
        };
        let cases = [
            ("", None, RequestKind::Initial),
            ("", Some("e"), RequestKind::Initial),
            ("7", None, RequestKind::Ack),
            ("7", Some("bad"), RequestKind::Nack("bad".into())),
            ("6", None, RequestKind::Stale),
            ("6", Some("bad"), RequestKind::Stale),
        ];
        for (nonce, error, want) in cases {
            assert_eq!(
                classify(&state, nonce, error),
                want,
                "nonce {nonce:?} error {error:?}"
            );
        }
    }

    #[test]
    fn sotw_stale_request_changes_nothing_and_the_next_one_is_answered() {
        let snap = snapshot(XdsType::Endpoint, &[("a", "1"), ("b", "1")]);
        let mut s = StreamState::default();
        let first = s
            .sotw_request(XdsType::Endpoint, &["a"], "", None, &snap)
            .expect("answered");
        let second = s.sotw_push(&snapshot(XdsType::Endpoint, &[("a", "2"), ("b", "1")]));
        assert_eq!(second.len(), 1);
        // A request answering the first response is stale, even with new names.
        let names = ["a", "b"];
        assert_eq!(
            s.sotw_request(XdsType::Endpoint, &names, &first.nonce, None, &snap),
            None
        );
        let again = s.sotw_request(XdsType::Endpoint, &names, &second[0].nonce, None, &snap);
        let again = again.expect("the subscription change is answered");
        assert_eq!(again.resources.len(), 2);
    }

    #[test]
    fn sotw_names_added_get_only_what_the_proxy_lacks_and_names_dropped_are_forgotten() {
        let snap = snapshot(XdsType::Endpoint, &[("a", "1"), ("b", "1"), ("c", "1")]);
        let mut s = StreamState::default();
        let sent = |o: &Outgoing| -> Vec<String> { o.resources.iter().map(|r| r.name.clone()).collect() };
        let first = s
            .sotw_request(XdsType::Endpoint, &["a", "b"], "", None, &snap)
            .expect("answered");
        assert_eq!(sent(&first), ["a", "b"]);
        // A cluster is added: its endpoints alone go out, under the version
        // of all three.
        let added = s
            .sotw_request(XdsType::Endpoint, &["a", "b", "c"], &first.nonce, None, &snap)
            .expect("the new name is answered");
        assert_eq!(sent(&added), ["c"]);
        let mut again = StreamState::default();
        let whole = again
            .sotw_request(XdsType::Endpoint, &["a", "b", "c"], "", None, &snap)
            .expect("answered");
        assert_eq!(
            added.version, whole.version,
            "the version names the whole subscription"
        );
        // A cluster is removed: nothing to send.
        assert_eq!(
            s.sotw_request(XdsType::Endpoint, &["a", "c"], &added.nonce, None, &snap),
            None
        );
        assert_eq!(
            s.types[&XdsType::Endpoint].held.keys().collect::<Vec<_>>(),
            ["a", "c"]
        );
        // It comes back: the proxy no longer holds it, so it is sent.
        let back = s
            .sotw_request(XdsType::Endpoint, &["a", "b", "c"], &added.nonce, None, &snap)
            .expect("answered");
        assert_eq!(sent(&back), ["b"]);
        // A push then sends only what changed.
        let pushed = s.sotw_push(&snapshot(
            XdsType::Endpoint,
            &[("a", "1"), ("b", "2"), ("c", "1")],
        ));
        assert_eq!(pushed.iter().map(sent).collect::<Vec<_>>(), [["b"]]);
    }

    #[test]
    fn sotw_nacked_version_is_not_resent_but_new_content_is() {
        let snap = snapshot(XdsType::Listener, &[("l", "1")]);
        let mut s = StreamState::default();
        let r = s
            .sotw_request(XdsType::Listener, &[], "", None, &snap)
            .expect("answered");
        assert_eq!(
            s.sotw_request(XdsType::Listener, &[], &r.nonce, Some("bad"), &snap),
            None
        );
        assert_eq!(
            s.types[&XdsType::Listener]
                .nack
                .as_ref()
                .map(|n| n.version.clone()),
            Some(r.version)
        );
        assert!(s.sotw_push(&snap).is_empty(), "same content: no resend");
        let fixed = s.sotw_push(&snapshot(XdsType::Listener, &[("l", "2")]));
        assert_eq!(fixed.len(), 1, "new content goes out");
    }

    #[test]
    fn sotw_cluster_change_forces_endpoints_again() {
        let mut snap = snapshot(XdsType::Cluster, &[("c", "1")]);
        snap.resources.insert(
            XdsType::Endpoint,
            Arc::new([("c".to_string(), encoded("c", "1"))].into()),
        );
        let mut s = StreamState::default();
        s.sotw_request(XdsType::Cluster, &[], "", None, &snap)
            .expect("cds");
        s.sotw_request(XdsType::Endpoint, &["c"], "", None, &snap)
            .expect("eds");
        let mut changed = snapshot(XdsType::Cluster, &[("c", "2")]);
        changed.resources.insert(
            XdsType::Endpoint,
            Arc::new([("c".to_string(), encoded("c", "1"))].into()),
        );
        let out: Vec<XdsType> = s.sotw_push(&changed).iter().map(|o| o.type_).collect();
        assert_eq!(out, vec![XdsType::Cluster, XdsType::Endpoint]);
    }

    #[test]
    fn delta_first_wildcard_request_is_answered_even_when_empty() {
        let mut s = StreamState::default();
        let none = BTreeMap::new();
        let req = DeltaRequest {
            type_: XdsType::Cluster,
            subscribe: &[],
            unsubscribe: &[],
            initial_versions: &none,
            nonce: "",
            error: None,
        };
        let out = s.delta_request(&req, &Snapshot::default()).expect("answered");
        assert!(out.resources.is_empty() && out.removed.is_empty());
    }

    #[test]
    fn delta_initial_versions_decide_what_is_sent_and_removed() {
        let snap = snapshot(XdsType::Cluster, &[("same", "1"), ("changed", "2"), ("new", "1")]);
        let initial: BTreeMap<String, String> = [("same", "1"), ("changed", "1"), ("gone", "1")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let mut s = StreamState::default();
        let req = DeltaRequest {
            type_: XdsType::Cluster,
            subscribe: &[],
            unsubscribe: &[],
            initial_versions: &initial,
            nonce: "",
            error: None,
        };
        let out = s.delta_request(&req, &snap).expect("answered");
        let sent: Vec<&str> = out.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(sent, vec!["changed", "new"]);
        assert_eq!(out.removed, vec!["gone"]);
    }

    #[test]
    fn delta_cluster_change_resends_its_endpoints_only() {
        let mut snap = snapshot(XdsType::Cluster, &[("a", "1"), ("b", "1")]);
        let eds: BTreeMap<String, Arc<Encoded>> = [
            ("a".to_string(), encoded("a", "1")),
            ("b".to_string(), encoded("b", "1")),
        ]
        .into();
        snap.resources.insert(XdsType::Endpoint, Arc::new(eds.clone()));
        let none = BTreeMap::new();
        let mut s = StreamState::default();
        let mut req = DeltaRequest {
            type_: XdsType::Cluster,
            subscribe: &[],
            unsubscribe: &[],
            initial_versions: &none,
            nonce: "",
            error: None,
        };
        s.delta_request(&req, &snap).expect("cds");
        let names = ["a", "b"];
        req.type_ = XdsType::Endpoint;
        req.subscribe = &names;
        s.delta_request(&req, &snap).expect("eds");
        let mut changed = snapshot(XdsType::Cluster, &[("a", "2"), ("b", "1")]);
        changed.resources.insert(XdsType::Endpoint, Arc::new(eds));
        let out = s.delta_push(&changed);
        let sent: Vec<(XdsType, Vec<&str>)> = out
            .iter()
            .map(|o| (o.type_, o.resources.iter().map(|r| r.name.as_str()).collect()))
            .collect();
        assert_eq!(
            sent,
            vec![(XdsType::Cluster, vec!["a"]), (XdsType::Endpoint, vec!["a"])]
        );
    }

    #[test]
    fn streams_asking_for_the_same_share_one_batch_from_their_first_response() {
        let mut snap = snapshot(XdsType::Cluster, &[("a", "1"), ("b", "1")]);
        snap.resources.insert(
            XdsType::Endpoint,
            snapshot(XdsType::Endpoint, &[("a", "1"), ("b", "1")]).resources[&XdsType::Endpoint].clone(),
        );
        let (mut one, mut two) = (StreamState::default(), StreamState::default());
        // Wildcard clusters, then endpoints by name, each stream its own
        // (equal) list of names.
        let first = |s: &mut StreamState, t, names: &[&str]| {
            s.sotw_request(t, names, "", None, &snap).expect("answered")
        };
        let (a, b) = (
            first(&mut one, XdsType::Cluster, &[]),
            first(&mut two, XdsType::Cluster, &[]),
        );
        assert!(
            Arc::ptr_eq(&a.resources, &b.resources),
            "one walk of the clusters"
        );
        let (a, b) = (
            first(&mut one, XdsType::Endpoint, &["a", "b"]),
            first(&mut two, XdsType::Endpoint, &["b", "a"]),
        );
        assert!(
            Arc::ptr_eq(&a.resources, &b.resources),
            "one walk of the endpoints"
        );
        assert_eq!(a.resources.len(), 2);
        // Another subscription gets its own.
        let mut three = StreamState::default();
        let c = first(&mut three, XdsType::Endpoint, &["a"]);
        assert!(!Arc::ptr_eq(&a.resources, &c.resources));
        assert_eq!(c.resources.len(), 1);
    }
}
