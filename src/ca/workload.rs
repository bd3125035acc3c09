//! Workload certificates as SDS Secrets, named as Istio names them:
//! `default` (the workload's certificate chain and key) and `ROOTCA` (the
//! root it validates peers against).

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, TlsCertificate,
};

use super::auth::Authenticator;
use super::{Authority, CaError, Issued, SpiffeId};

/// The SDS name of a workload's own certificate.
pub const DEFAULT_SECRET: &str = "default";
/// The SDS name of the root workloads trust.
pub const ROOT_SECRET: &str = "ROOTCA";

/// The CA as the xDS server uses it: who is calling, and their certificates.
#[derive(Debug)]
pub struct WorkloadCa {
    pub authority: Arc<Authority>,
    pub auth: Authenticator,
    /// Validity of workload certificates; they are renewed at half of it.
    pub ttl: Duration,
    /// Believe the node metadata's identity on the plain port.
    pub insecure_plaintext_identity: bool,
}

impl WorkloadCa {
    /// A fresh certificate for `id`.
    pub fn issue(&self, id: &SpiffeId) -> Result<Issued, CaError> {
        let issued = self.authority.issue(id, self.ttl);
        let name = if issued.is_ok() {
            super::metric::ISSUED
        } else {
            super::metric::SIGN_ERRORS
        };
        metrics::counter!(name).increment(1);
        issued
    }

    /// `default` and `ROOTCA` for an issued certificate.
    pub fn sds_secrets(&self, issued: &Issued) -> [Secret; 2] {
        let inline = |s: &str| {
            Some(DataSource {
                specifier: Some(data_source::Specifier::InlineBytes(s.as_bytes().to_vec())),
                ..Default::default()
            })
        };
        [
            Secret {
                name: DEFAULT_SECRET.into(),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(&issued.cert_chain),
                    private_key: inline(&issued.key),
                    ..Default::default()
                })),
            },
            Secret {
                name: ROOT_SECRET.into(),
                r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
                    trusted_ca: inline(self.authority.root_pem()),
                    ..Default::default()
                })),
            },
        ]
    }
}
