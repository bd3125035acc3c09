//! What meshd knows of a connected proxy, parsed from its xDS node.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value};

/// The two kinds of proxy, as Istio's node id names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A gateway (`router~...`): listeners come from Gateways.
    Router,
    /// A sidecar (`sidecar~...`).
    Sidecar,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Router => "router",
            Role::Sidecar => "sidecar",
        })
    }
}

/// Why a node could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The node id is not `ROLE~IP~POD.NS~NS.svc.cluster.local`.
    #[error(
        "node id {id:?} is not in Istio's form ROLE~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local: {reason}"
    )]
    BadId { id: String, reason: &'static str },
}

/// A connected Envoy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Proxy {
    pub id: String,
    pub role: Role,
    pub ip: String,
    pub pod_name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// The SPIFFE identity the proxy authenticated as (or, with
    /// `--insecure-plaintext-identity`, claimed), set by the xDS server.
    /// Without one, nothing that needs a workload certificate is generated.
    pub identity: Option<String>,
    /// No traffic capture (`INTERCEPTION_MODE: NONE` in the node metadata,
    /// as Istio's agent sends it): the app calls the sidecar's listeners on
    /// loopback and is called through the Sidecar resource's ingress ports.
    pub capture_none: bool,
    /// `REGION/ZONE/SUBZONE` from the node's `locality` (as Istio's agent
    /// fills it from the Pod's Node), empty when unknown.
    pub locality: String,
}

impl Proxy {
    /// Parses Istio's node id and the metadata Istio's agent sends
    /// (`NAMESPACE`, `LABELS`, `SERVICE_ACCOUNT`). Metadata wins over the id
    /// where both say something.
    pub fn parse(id: &str, metadata: &Map<String, Value>) -> Result<Proxy, ProxyError> {
        let bad = |reason| ProxyError::BadId {
            id: id.to_string(),
            reason,
        };
        let parts: Vec<&str> = id.split('~').collect();
        let [role, ip, pod, _domain] = parts[..] else {
            return Err(bad("it needs four parts separated by ~"));
        };
        let role = match role {
            "router" => Role::Router,
            "sidecar" => Role::Sidecar,
            _ => return Err(bad("the role must be router or sidecar")),
        };
        let (pod_name, id_namespace) = pod
            .rsplit_once('.')
            .ok_or(bad("the third part must be POD.NAMESPACE"))?;
        if pod_name.is_empty() || id_namespace.is_empty() {
            return Err(bad("the third part must be POD.NAMESPACE"));
        }
        let text = |key: &str| {
            metadata
                .get(key)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        let labels = metadata
            .get("LABELS")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Proxy {
            id: id.to_string(),
            role,
            ip: ip.to_string(),
            pod_name: pod_name.to_string(),
            namespace: text("NAMESPACE").unwrap_or(id_namespace).to_string(),
            labels,
            service_account: text("SERVICE_ACCOUNT").unwrap_or("default").to_string(),
            identity: None,
            capture_none: text("INTERCEPTION_MODE") == Some("NONE"),
            locality: String::new(),
        })
    }

    /// The node's properties translation depends on (the push context
    /// adds the workload's: see `translate::config_key`).
    pub fn config_key(&self) -> String {
        self.config_key_with(|_| true)
    }

    /// `config_key` with only the labels whose key `keep` accepts.
    /// Computed at every push of every stream: written into one buffer.
    pub fn config_key_with(&self, keep: impl Fn(&str) -> bool) -> String {
        use std::fmt::Write as _;
        let identity = if self.identity.is_some() { "id" } else { "-" };
        let capture = if self.capture_none { "none" } else { "-" };
        let mut key = String::with_capacity(128);
        let _ = write!(key, "{}|{}|", self.role, self.namespace);
        write_labels(&mut key, &self.labels, keep);
        let _ = write!(key, "|{identity}|{capture}|{}", self.locality);
        key
    }
}

/// `k=v,k2=v2` of the labels whose key `keep` accepts, in key order,
/// appended to `out`.
pub fn write_labels(out: &mut String, labels: &BTreeMap<String, String>, keep: impl Fn(&str) -> bool) {
    for (i, (k, v)) in labels.iter().filter(|(k, _)| keep(k)).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_node_ids_and_metadata() {
        let meta = serde_json::json!({"LABELS": {"istio": "ingressgateway"}, "NAMESPACE": "istio-system"});
        let p = Proxy::parse(
            "router~10.0.0.1~istio-ingressgateway-5d.istio-system~istio-system.svc.cluster.local",
            meta.as_object().expect("object"),
        )
        .expect("parses");
        assert_eq!(p.role, Role::Router);
        assert_eq!(p.pod_name, "istio-ingressgateway-5d");
        assert_eq!(p.namespace, "istio-system");
        assert_eq!(p.labels["istio"], "ingressgateway");
        assert_eq!(p.service_account, "default");
    }

    #[test]
    fn rejects_other_ids() {
        let empty = Map::new();
        assert!(Proxy::parse("envoy-1", &empty).is_err());
        assert!(Proxy::parse("ingress~1~a.b~c", &empty).is_err());
        assert!(Proxy::parse("router~1~nodot~c", &empty).is_err());
    }
}
