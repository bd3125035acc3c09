//! Istio's `IstioCertificateService/CreateCertificate`: agents that keep
//! their own keys send a CSR and get it signed for the identity they
//! authenticated as (never the one the CSR asks for).

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{metric, WorkloadCa};
use crate::pb::istio_ca::istio_certificate_service_server::IstioCertificateService;
use crate::pb::istio_ca::{IstioCertificateRequest, IstioCertificateResponse};

/// The CSR service on one port.
#[derive(Debug, Clone)]
pub struct CertificateService {
    ca: Arc<WorkloadCa>,
    tls: bool,
}

impl CertificateService {
    /// The service for the TLS port (`tls`) or the plain one.
    pub fn new(ca: Arc<WorkloadCa>, tls: bool) -> CertificateService {
        CertificateService { ca, tls }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CertificateService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        metrics::counter!(metric::CSR_COUNT).increment(1);
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let caller = self
            .ca
            .auth
            .authenticate(authorization, request.peer_certs(), self.tls)
            .await
            .map_err(|e| e.status())?
            .ok_or_else(|| {
                Status::unauthenticated(
                    "CreateCertificate needs a client certificate issued by meshd or a service-account token",
                )
            })?;
        let req = request.into_inner();
        let requested = u64::try_from(req.validity_duration).unwrap_or(0);
        let validity = match requested {
            0 => self.ca.ttl,
            secs => Duration::from_secs(secs).min(self.ca.ttl),
        };
        let chain = self
            .ca
            .authority
            .sign_csr(&req.csr, &caller.id, validity)
            .map_err(|e| {
                metrics::counter!(metric::SIGN_ERRORS).increment(1);
                Status::invalid_argument(e.to_string())
            })?;
        metrics::counter!(metric::ISSUED).increment(1);
        tracing::info!(identity = %caller, "signed a CSR");
        Ok(Response::new(IstioCertificateResponse { cert_chain: chain }))
    }
}
