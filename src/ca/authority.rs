//! A loaded CA: its signing certificate and key, the chain up to the root,
//! and the issuing of workload certificates.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SubjectPublicKeyInfo,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::prelude::FromDer;

use super::{CaError, SpiffeId};

/// A certificate the CA issued, with the key it made for it.
#[derive(Debug, Clone)]
pub struct Issued {
    pub identity: SpiffeId,
    /// Leaf first, then the intermediates (never the root), PEM.
    pub cert_chain: String,
    /// PKCS#8 PEM.
    pub key: String,
    pub not_after: SystemTime,
}

/// A CA ready to sign.
pub struct Authority {
    trust_domain: String,
    key: KeyPair,
    /// The signing certificate (`ca-cert.pem`).
    cert_pem: String,
    /// Certificates between the signing certificate and the root,
    /// excluding both, in order (PEM, concatenated).
    intermediates: String,
    /// The root (`root-cert.pem`).
    root_pem: String,
    root_not_after: SystemTime,
    /// The last certificate issued to each identity.
    issued: dashmap::DashMap<String, IssuedRecord>,
}

/// What `/debug/certz` shows of an identity's certificates (never a key).
#[derive(Debug, Clone, serde::Serialize)]
pub struct IssuedRecord {
    pub identity: String,
    /// `sds` (meshd made the key and sent it over SDS) or `csr` (signed a
    /// request from istio-agent or another client).
    pub via: &'static str,
    /// Of the last one.
    pub issued: SystemTime,
    pub not_after: SystemTime,
    /// Certificates issued to this identity since meshd started.
    pub count: u64,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// How long before its validity starts a leaf is dated, for clock skew.
const BACKDATE: Duration = Duration::from_secs(60);

impl Authority {
    pub(super) fn new(
        trust_domain: &str,
        key: KeyPair,
        cert_pem: String,
        intermediates: String,
        root_pem: String,
        root_not_after: SystemTime,
    ) -> Authority {
        Authority {
            trust_domain: trust_domain.to_string(),
            key,
            cert_pem,
            intermediates,
            root_pem,
            root_not_after,
            issued: Default::default(),
        }
    }

    /// The last certificate issued to each identity, by identity.
    pub fn issued(&self) -> Vec<IssuedRecord> {
        let mut all: Vec<IssuedRecord> = self.issued.iter().map(|r| r.value().clone()).collect();
        all.sort_by(|a, b| a.identity.cmp(&b.identity));
        all
    }

    fn record(&self, id: &SpiffeId, via: &'static str, validity: Duration) {
        let now = SystemTime::now();
        let mut entry = self.issued.entry(id.to_string()).or_insert_with(|| IssuedRecord {
            identity: id.to_string(),
            via,
            issued: now,
            not_after: now,
            count: 0,
        });
        entry.via = via;
        entry.issued = now;
        entry.not_after = now + validity;
        entry.count += 1;
    }

    /// The trust domain identities are issued in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate, PEM: what every workload trusts (`ROOTCA`).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root certificate's SHA-256 fingerprint, as `openssl x509
    /// -fingerprint -sha256` prints it (`AB:CD:...`): what tells two roots
    /// apart at a glance.
    pub fn root_fingerprint(&self) -> String {
        use sha2::Digest;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(self.root_pem.as_bytes())
            .map(|d| d.as_ref().to_vec())
            .unwrap_or_default();
        let digest = sha2::Sha256::digest(&der);
        digest
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    /// When the root expires.
    pub fn root_not_after(&self) -> SystemTime {
        self.root_not_after
    }

    /// The chain above a leaf: the signing certificate and intermediates,
    /// without the root when the signer is not the root itself.
    fn chain_above_leaf(&self) -> String {
        if self.cert_pem.trim() == self.root_pem.trim() {
            return String::new();
        }
        format!(
            "{}{}",
            ensure_newline(&self.cert_pem),
            ensure_newline(&self.intermediates)
        )
    }

    fn leaf_params(
        &self,
        id: &SpiffeId,
        now: SystemTime,
        validity: Duration,
    ) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::default();
        let uri =
            rcgen::string::Ia5String::try_from(id.to_string()).map_err(|e| CaError::Sign(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        // Istio's workload certificates carry the identity only in the SAN.
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + validity).into();
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        Ok(params)
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, CaError> {
        Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(|e| CaError::Sign(e.to_string()))
    }

    fn sign(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        validity: Duration,
    ) -> Result<String, CaError> {
        let now = SystemTime::now();
        let params = self.leaf_params(id, now, validity)?;
        let cert = params
            .signed_by(public_key, &self.issuer()?)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(format!("{}{}", cert.pem(), self.chain_above_leaf()))
    }

    /// Issues a certificate for `id` with a fresh ECDSA P-256 key.
    pub fn issue(&self, id: &SpiffeId, validity: Duration) -> Result<Issued, CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let cert_chain = self.sign(id, &key, validity)?;
        self.record(id, "sds", validity);
        Ok(Issued {
            identity: id.clone(),
            cert_chain,
            key: key.serialize_pem(),
            not_after: SystemTime::now() + validity,
        })
    }

    /// Issues meshd's own serving certificate for its TLS xDS port, with
    /// these DNS names (and IP addresses, where a name parses as one).
    pub fn issue_server(&self, names: &[String], validity: Duration) -> Result<Issued, CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        for name in names {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    rcgen::string::Ia5String::try_from(name.as_str())
                        .map_err(|e| CaError::Sign(e.to_string()))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        params.distinguished_name.push(DnType::CommonName, "meshd");
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + validity).into();
        params.serial_number = Some(random_serial()?);
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(Issued {
            identity: SpiffeId::new(&self.trust_domain, "istio-system", "meshd")?,
            cert_chain: format!("{}{}", cert.pem(), self.chain_above_leaf()),
            key: key.serialize_pem(),
            not_after: now + validity,
        })
    }

    /// One line per certificate from the signer to the root: subject,
    /// issuer and expiry, for `meshd ca inspect`.
    pub fn describe(&self) -> Vec<String> {
        let pems = [
            self.cert_pem.as_str(),
            self.intermediates.as_str(),
            self.root_pem.as_str(),
        ];
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for pem in pems.iter().flat_map(|p| split_pem(p)) {
            if seen.contains(&pem) {
                continue;
            }
            let Ok(der) = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()) else {
                continue;
            };
            if let Ok((_, c)) = x509_parser::parse_x509_certificate(der.as_ref()) {
                out.push(format!(
                    "subject: {} | issuer: {} | not after: {}",
                    c.subject(),
                    c.issuer(),
                    c.validity().not_after
                ));
            }
            seen.push(pem);
        }
        out
    }

    /// Signs the public key of a PEM CSR for `id`, the identity the caller
    /// authenticated as. Nothing else of the CSR is used: its subject and
    /// requested extensions are ignored. Returns leaf, chain, root.
    pub fn sign_csr(&self, csr_pem: &str, id: &SpiffeId, validity: Duration) -> Result<Vec<String>, CaError> {
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| CaError::Csr(format!("not a PEM certificate request: {e}")))?;
        let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| CaError::Csr(format!("does not parse: {e}")))?;
        csr.verify_signature()
            .map_err(|e| CaError::Csr(format!("its signature does not verify: {e}")))?;
        let spki = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|e| CaError::Csr(format!("unsupported public key: {e}")))?;
        let chain = self.sign(id, &spki, validity)?;
        self.record(id, "csr", validity);
        let mut out: Vec<String> = split_pem(&chain);
        out.push(ensure_newline(&self.root_pem));
        Ok(out)
    }
}

/// 16 random bytes with the top bit clear (a positive serial).
fn random_serial() -> Result<rcgen::SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| CaError::Sign("no randomness for a serial number".into()))?;
    bytes[0] &= 0x7f;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

pub(super) fn ensure_newline(pem: &str) -> String {
    let t = pem.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!("{t}\n")
    }
}

/// Splits concatenated PEM certificates.
pub(super) fn split_pem(pem: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in pem.lines() {
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END") {
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

/// The parameters of a self-signed root for `trust_domain`, valid `years`.
pub(super) fn root_params(
    trust_domain: &str,
    now: SystemTime,
    years: u64,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "meshd root CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + Duration::from_secs(years * 365 * 24 * 3600)).into();
    params.serial_number = Some(random_serial()?);
    Ok(params)
}
