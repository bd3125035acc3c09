//! ca: meshd's certificate authority. It owns the root of trust (made on
//! first start and kept under `--ca-dir`, or plugged in as Istio's
//! `ca-cert.pem`/`ca-key.pem`/`root-cert.pem`/`cert-chain.pem`), and issues
//! SPIFFE workload certificates (`spiffe://TD/ns/NS/sa/SA`), from a key it
//! makes or from a CSR. Who may get which identity is decided by the caller
//! (the xDS server authenticates); this module only signs.

pub mod auth;
mod authority;
pub mod cluster;
pub mod service;
mod store;
pub mod workload;

use std::fmt;

pub use authority::{Authority, Issued, IssuedRecord};
pub use store::{ephemeral, load_or_create, CaFiles};
pub use workload::WorkloadCa;

/// Istio's names for the CA's metrics, so existing dashboards read them.
pub mod metric {
    /// CSRs received by `CreateCertificate`.
    pub const CSR_COUNT: &str = "citadel_server_csr_count";
    /// Certificates issued (from CSRs and for SDS).
    pub const ISSUED: &str = "citadel_server_success_cert_issuance_count";
    /// Failed signings.
    pub const SIGN_ERRORS: &str = "citadel_server_csr_sign_err_count";
    /// Unix time at which the root certificate expires.
    pub const ROOT_EXPIRY: &str = "citadel_server_root_cert_expiry_timestamp";
}

/// Errors of the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The CA files are there but do not form a usable CA.
    #[error("CA files in {dir}: {reason}")]
    BadFiles { dir: String, reason: String },
    /// Signing failed.
    #[error("signing: {0}")]
    Sign(String),
    /// A CSR could not be used.
    #[error("bad CSR: {0}")]
    Csr(String),
    /// An identity is not a valid SPIFFE id.
    #[error("{0}")]
    Identity(String),
    /// The cluster could not be asked (with `--kube`).
    #[error("{0}")]
    Cluster(String),
}

/// A workload identity: `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    /// The identity of a service account in a trust domain.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<SpiffeId, CaError> {
        let ok = |s: &str| !s.is_empty() && !s.contains('/') && s.len() <= 253;
        if !ok(trust_domain) || !ok(namespace) || !ok(service_account) {
            return Err(CaError::Identity(format!(
                "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account} is not a valid identity"
            )));
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// Parses `spiffe://TD/ns/NS/sa/SA`.
    pub fn parse(uri: &str) -> Option<SpiffeId> {
        let rest = uri.strip_prefix("spiffe://")?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts[..] {
            [td, "ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa).ok(),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip() {
        let id = SpiffeId::new("cluster.local", "default", "sleep").expect("valid");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(SpiffeId::parse(&id.to_string()), Some(id));
        assert_eq!(SpiffeId::parse("spiffe://td/ns/a/sa/b/c"), None);
        assert!(SpiffeId::new("td", "", "sa").is_err());
    }
}
