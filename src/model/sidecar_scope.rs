//! The Sidecar resource that applies to a sidecar proxy, and what it lets
//! the proxy see: its workload's own Sidecar (selector), else its
//! namespace's default, else the mesh default in the root namespace.

use super::peer_auth::ROOT_NAMESPACE;
use super::{is_subset, MeshService, Proxy, PushContext};
use crate::config::{Kind, Resource, Sidecar};

/// What one sidecar may reach.
#[derive(Debug, Clone, Default)]
pub struct SidecarScope {
    /// `NAMESPACE/HOST` patterns; `None` means everything.
    hosts: Option<Vec<(String, String)>>,
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
        let hosts: Vec<(String, String)> = sc
            .spec
            .egress
            .iter()
            .flat_map(|e| e.hosts.iter())
            .filter_map(|h| {
                let (ns, host) = h.split_once('/')?;
                let ns = if ns == "." { sc.namespace() } else { ns };
                Some((ns.to_string(), host.to_string()))
            })
            .collect();
        SidecarScope {
            hosts: (!sc.spec.egress.is_empty()).then_some(hosts),
            registry_only: sc
                .spec
                .outbound_traffic_policy
                .as_ref()
                .and_then(|p| p.mode.as_deref())
                == Some("REGISTRY_ONLY"),
            source: Some(format!("Sidecar {}/{}", sc.namespace(), sc.name())),
        }
    }

    /// Whether the proxy may reach `svc`.
    pub fn visible(&self, svc: &MeshService) -> bool {
        let Some(hosts) = &self.hosts else { return true };
        hosts.iter().any(|(ns, host)| {
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
