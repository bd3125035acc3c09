//! The registry of connected proxies and what each stream sent, acked and
//! NACKed: written by the stream loops, read by the debug endpoints.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use dashmap::DashMap;

use super::cache::Resources;
use super::stream::{Nack, StreamState};
use super::XdsType;
use crate::model::Proxy;
use crate::translate::Diagnostic;

/// One connected stream.
#[derive(Debug, Clone)]
pub struct ConnectionStatus {
    pub id: u64,
    pub proxy: Proxy,
    /// `sotw` or `delta`.
    pub mode: &'static str,
    pub connected_since: SystemTime,
    pub types: super::TypeMap<TypeStatus>,
    /// Config generation of the last snapshot the stream computed.
    pub generation: u64,
    pub diagnostics: Vec<Diagnostic>,
}

/// Per type: what was sent and how the proxy answered.
#[derive(Debug, Clone, Default)]
pub struct TypeStatus {
    pub sent_version: Option<String>,
    pub sent_nonce: Option<String>,
    pub acked_version: Option<String>,
    pub nack: Option<Nack>,
    pub last_sent: Option<SystemTime>,
    /// What the proxy holds, as far as meshd knows.
    pub held: Resources,
}

/// Every connected stream.
#[derive(Debug, Default)]
pub struct Registry {
    connections: DashMap<u64, ConnectionStatus>,
    next_id: AtomicU64,
}

impl Registry {
    /// Records a new stream for `proxy`; returns its id.
    pub fn register(&self, proxy: Proxy, mode: &'static str) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(super::metric::XDS, "type" => role_label(&proxy)).increment(1.0);
        self.connections.insert(
            id,
            ConnectionStatus {
                id,
                proxy,
                mode,
                connected_since: SystemTime::now(),
                types: Default::default(),
                generation: 0,
                diagnostics: Vec::new(),
            },
        );
        id
    }

    /// Copies the stream's protocol state in: of the type a request was
    /// about (`asked`) and of the types a response just went out for
    /// (`sent`), the only ones whose state can have changed.
    pub fn update(
        &self,
        id: u64,
        state: &StreamState,
        asked: Option<XdsType>,
        sent: &[XdsType],
        generation: u64,
        diagnostics: &[Diagnostic],
    ) {
        let Some(mut conn) = self.connections.get_mut(&id) else {
            return;
        };
        conn.generation = generation;
        if conn.diagnostics != diagnostics {
            conn.diagnostics = diagnostics.to_vec();
        }
        let now = SystemTime::now();
        let changed = state
            .types
            .iter()
            .filter(|(t, _)| asked == Some(**t) || sent.contains(t));
        for (t, s) in changed {
            let status = conn.types.entry_or_default(*t);
            // An ACK changes one field of one type: `clone_from` reuses
            // what is there instead of allocating every string again.
            status.sent_version.clone_from(&s.sent_version);
            status.sent_nonce.clone_from(&s.sent_nonce);
            status.acked_version.clone_from(&s.acked_version);
            if status.nack != s.nack {
                status.nack.clone_from(&s.nack);
            }
            if sent.contains(t) {
                status.last_sent = Some(now);
                status.held = s.held.clone();
            }
        }
    }

    /// Forgets a closed stream.
    pub fn remove(&self, id: u64) {
        if let Some((_, conn)) = self.connections.remove(&id) {
            metrics::gauge!(super::metric::XDS, "type" => role_label(&conn.proxy)).decrement(1.0);
        }
    }

    /// Every stream, oldest first.
    pub fn list(&self) -> Vec<ConnectionStatus> {
        let mut all: Vec<_> = self.connections.iter().map(|c| c.value().clone()).collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// The newest stream of the proxy with this node id.
    pub fn find(&self, proxy_id: &str) -> Option<ConnectionStatus> {
        self.list().into_iter().rev().find(|c| c.proxy.id == proxy_id)
    }
}

/// The `type` label of `pilot_xds`.
fn role_label(proxy: &Proxy) -> &'static str {
    match proxy.role {
        crate::model::Role::Router => "router",
        crate::model::Role::Sidecar => "sidecar",
    }
}
