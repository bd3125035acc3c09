//! The Sidecar resource that applies to a sidecar proxy, and what it lets
//! the proxy see: its workload's own Sidecar (selector), else its
//! namespace's default, else the mesh default in the root namespace.

use super::peer_auth::ROOT_NAMESPACE;
use super::{is_subset, MeshService, Proxy, PushContext};
use crate::config::istio::{IstioIngressListener, Port};
use crate::config::{Kind, Resource, Sidecar};

/// One egress listener of a Sidecar resource: the hosts it may reach, on
/// one port or (without a port) on every port no other listener takes.
#[derive(Debug, Clone, Default)]
pub struct EgressListener {
    pub port: Option<Port>,
    /// The address to bind; unset means the capture default.
    pub bind: Option<String>,
    /// `captureMode: NONE`: the listener binds for real instead of waiting
    /// for captured connections.
    pub capture_none: bool,
    /// `NAMESPACE/HOST` patterns.
    hosts: Vec<(String, String)>,
}

impl EgressListener {
    /// Whether this listener may reach `svc`.
    pub fn visible(&self, svc: &MeshService) -> bool {
        self.hosts.iter().any(|(ns, host)| {
            let ns_ok = ns == "*" || *ns == svc.namespace;
            let host_ok = host == "*"
                || *host == svc.hostname
                || host
                    .strip_prefix('*')
                    .is_some_and(|suffix| svc.hostname.ends_with(suffix));
            ns != "~" && ns_ok && host_ok
        })
    }
}

/// What one sidecar may reach.
#[derive(Debug, Clone, Default)]
pub struct SidecarScope {
    /// The egress listeners; empty means everything on every port.
    pub egress: Vec<EgressListener>,
    /// The ingress listeners; empty means the ports of the Services that
    /// select the workload.
    pub ingress: Vec<IstioIngressListener>,
    /// REGISTRY_ONLY: unknown destinations are dropped, not passed through.
    pub registry_only: bool,
    /// The Sidecar resource in force, for diagnostics.
    pub source: Option<String>,
}

impl SidecarScope {
    /// The scope of `proxy`.
    pub fn of(push: &PushContext, proxy: &Proxy) -> SidecarScope {
        let sidecars: Vec<&Sidecar> = push
            .config
            .of_kind(Kind::Sidecar)
            .filter_map(|r| match r {
                Resource::Sidecar(s) => Some(s),
                _ => None,
            })
            .collect();
        let labels = push.pods.get(&proxy.ip).map_or(&proxy.labels, |p| &p.labels);
        let own = sidecars.iter().find(|s| {
            s.namespace() == proxy.namespace
                && s.spec
                    .workload_selector
                    .as_ref()
                    .is_some_and(|w| is_subset(&w.labels, labels))
        });
        let default = |ns: &str| {
            sidecars
                .iter()
                .find(|s| s.namespace() == ns && s.spec.workload_selector.is_none())
        };
        let Some(sc) = own
            .or_else(|| default(&proxy.namespace))
            .or_else(|| default(ROOT_NAMESPACE))
        else {
            return SidecarScope::default();
        };
        let egress = sc
            .spec
            .egress
            .iter()
            .map(|e| EgressListener {
                port: e.port.clone(),
                bind: e.bind.clone(),
                capture_none: e.capture_mode.as_deref() == Some("NONE"),
                hosts: e
                    .hosts
                    .iter()
                    .filter_map(|h| {
                        let (ns, host) = h.split_once('/')?;
                        let ns = if ns == "." { sc.namespace() } else { ns };
                        Some((ns.to_string(), host.to_string()))
                    })
                    .collect(),
            })
            .collect();
        SidecarScope {
            egress,
            ingress: sc.spec.ingress.clone(),
            registry_only: sc
                .spec
                .outbound_traffic_policy
                .as_ref()
                .and_then(|p| p.mode.as_deref())
                == Some("REGISTRY_ONLY"),
            source: Some(format!("Sidecar {}/{}", sc.namespace(), sc.name())),
        }
    }

    /// Whether the proxy may reach `svc` through any of its listeners.
    pub fn visible(&self, svc: &MeshService) -> bool {
        self.egress.is_empty() || self.egress.iter().any(|l| l.visible(svc))
    }

    /// The listener that catches every port without a listener of its own
    /// (the one without a port), if the Sidecar has one or has no egress.
    pub fn catch_all(&self) -> Option<EgressListener> {
        if self.egress.is_empty() {
            return Some(EgressListener {
                hosts: vec![("*".into(), "*".into())],
                ..Default::default()
            });
        }
        self.egress.iter().find(|l| l.port.is_none()).cloned()
    }
}
